"""Secrets at rest: AES-GCM under a key ring, and salted hashes of connection secrets.

Ciphertexts read ``v1.<key id>.<base64url(nonce || ciphertext || tag)>``. The key id
travels with the ciphertext so that any key of the ring decrypts and rotation knows what
is stale. The associated data binds each ciphertext to the output it belongs to (and to
its purpose), so a ciphertext copied onto another row does not decrypt: see
docs/decisions/0002-encrypted-refresh-tokens.md.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.config import ConfigError
from app.errors import RelayError

if TYPE_CHECKING:
    from app.config import Settings

log = structlog.get_logger(__name__)

VERSION: Final = "v1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
PURPOSE_REFRESH: Final = "refresh_token"
PURPOSE_ACCESS: Final = "access_token"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


class CryptoError(RelayError):
    """Base of the encryption errors; messages never contain key or plaintext material."""

    code = "crypto_error"


class DecryptError(CryptoError):
    """A ciphertext is malformed, under an unknown key, altered, or bound to another row."""

    code = "decrypt_failed"


class KeyRingError(ConfigError):
    """``RELAY_ENCRYPTION_KEYS`` or the key file cannot be used."""


class SecretText:
    """A plaintext secret in memory: ``str``/``repr`` show ``***``; ``reveal()`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretText):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]  # a secret has no business in a set


def _b64decode(text: str) -> bytes:
    """Strict base64url, padded or not: stray characters are an error, not skipped."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except binascii.Error as error:
        raise ValueError("not base64url") from error


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def new_key_entry(key_id: str | None = None) -> str:
    """A fresh ``<key id>:<base64url of 32 random bytes>`` entry for RELAY_ENCRYPTION_KEYS."""
    kid = key_id or f"k{datetime.now(UTC):%Y%m%d%H%M%S}"
    if not _KEY_ID.fullmatch(kid):
        raise KeyRingError("a key id is 1..32 letters, digits, '_' or '-'")
    return f"{kid}:{_b64encode(secrets.token_bytes(KEY_BYTES))}"


def _associated_data(kid: str, purpose: str, output_id: str) -> bytes:
    # Version and key id are authenticated too, so the header cannot be rewritten.
    return f"relay:{VERSION}:{kid}:{purpose}:output:{output_id}".encode()


class KeyRing:
    """Keys newest first: the first encrypts, every one decrypts."""

    __slots__ = ("_ciphers", "_ids")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise KeyRingError("RELAY_ENCRYPTION_KEYS has no key")
        ids: list[str] = []
        ciphers: dict[str, AESGCM] = {}
        for position, (kid, secret) in enumerate(keys, start=1):
            if not _KEY_ID.fullmatch(kid):
                raise KeyRingError(
                    f"RELAY_ENCRYPTION_KEYS entry {position}: the key id must be 1..32 "
                    "letters, digits, '_' or '-'"
                )
            if kid in ciphers:
                raise KeyRingError(f"RELAY_ENCRYPTION_KEYS: key id {kid!r} appears twice")
            if len(secret) != KEY_BYTES:
                raise KeyRingError(
                    f"RELAY_ENCRYPTION_KEYS entry {kid!r}: the key must be {KEY_BYTES} bytes"
                )
            ids.append(kid)
            ciphers[kid] = AESGCM(secret)
        self._ids = tuple(ids)
        self._ciphers = ciphers

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """Parse ``k2:<b64url>,k1:<b64url>`` (newest first; commas or newlines between)."""
        keys: list[tuple[str, bytes]] = []
        entries = [part.strip() for part in re.split(r"[,\n]", text)]
        for position, entry in enumerate((e for e in entries if e), start=1):
            kid, sep, encoded = entry.partition(":")
            if not sep:
                raise KeyRingError(
                    f"RELAY_ENCRYPTION_KEYS entry {position}: expected <key id>:<base64url key>"
                )
            try:
                secret = _b64decode(encoded.strip())
            except ValueError:
                raise KeyRingError(
                    f"RELAY_ENCRYPTION_KEYS entry {position}: the key is not base64url"
                ) from None
            keys.append((kid.strip(), secret))
        return cls(keys)

    @property
    def primary_id(self) -> str:
        return self._ids[0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return self._ids

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={list(self._ids)!r})"

    def encrypt(
        self, plaintext: str | SecretText, output_id: str, *, purpose: str = PURPOSE_REFRESH
    ) -> str:
        """Encrypt under the newest key, bound to ``output_id`` and ``purpose``."""
        text = plaintext.reveal() if isinstance(plaintext, SecretText) else plaintext
        kid = self._ids[0]
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[kid].encrypt(
            nonce, text.encode("utf-8"), _associated_data(kid, purpose, output_id)
        )
        return f"{VERSION}.{kid}.{_b64encode(nonce + sealed)}"

    def decrypt(self, token: str, output_id: str, *, purpose: str = PURPOSE_REFRESH) -> SecretText:
        """Decrypt a token made by ``encrypt`` for the same ``output_id`` and ``purpose``.

        Raises DecryptError, without detail that could help an attacker, otherwise.
        """
        kid, payload = _split(token)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecryptError(f"ciphertext is under key {kid!r}, which is not configured")
        if len(payload) < NONCE_BYTES + 16:
            raise DecryptError("ciphertext is truncated")
        try:
            plain = cipher.decrypt(
                payload[:NONCE_BYTES],
                payload[NONCE_BYTES:],
                _associated_data(kid, purpose, output_id),
            )
        except InvalidTag:
            raise DecryptError(
                "ciphertext does not authenticate (altered, or belongs to another output)"
            ) from None
        return SecretText(plain.decode("utf-8"))

    def needs_rotation(self, token: str) -> bool:
        """True when ``token`` is not under the newest key (``rotate`` would change it)."""
        kid, _ = _split(token)
        return kid != self._ids[0]

    def rotate(self, token: str, output_id: str, *, purpose: str = PURPOSE_REFRESH) -> str:
        """The same plaintext under the newest key; unchanged if already there."""
        if not self.needs_rotation(token):
            return token
        return self.encrypt(
            self.decrypt(token, output_id, purpose=purpose), output_id, purpose=purpose
        )


def key_id_of(token: str) -> str:
    """The id of the key a ciphertext is under (raises DecryptError if it is not one)."""
    return _split(token)[0]


def _split(token: str) -> tuple[str, bytes]:
    version, _, rest = token.partition(".")
    kid, _, encoded = rest.partition(".")
    if version != VERSION or not _KEY_ID.fullmatch(kid) or not encoded:
        raise DecryptError("not a relay ciphertext")
    try:
        return kid, _b64decode(encoded)
    except ValueError:
        raise DecryptError("not a relay ciphertext") from None


# --- The embedded default: a local key file --------------------------------------------


def keyring_from_settings(settings: Settings) -> KeyRing:
    """The key ring for this process.

    ``RELAY_ENCRYPTION_KEYS`` when set. Otherwise, in development only, the key file at
    ``RELAY_KEY_FILE``, created (mode 0600) on first use with a warning in the log.
    """
    if settings.encryption_keys is not None:
        return KeyRing.parse(settings.encryption_keys.get_secret_value())
    if settings.is_production:
        raise KeyRingError("RELAY_ENV=production requires RELAY_ENCRYPTION_KEYS")
    return load_or_create_key_file(settings.key_file)


def load_or_create_key_file(path: Path) -> KeyRing:
    """Read the key file, creating it with one new key (mode 0600) if it does not exist."""
    path = path.expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if _create_key_file(path):
            log.warning(
                "encryption_key_file_created",
                path=str(path),
                hint="no RELAY_ENCRYPTION_KEYS set; a new key was written to this file. "
                "Back it up: without it stored tokens cannot be decrypted. For production set "
                "RELAY_ENCRYPTION_KEYS (run `relay keygen`) and add this file's entry after it.",
            )
        text = path.read_text(encoding="utf-8")
    if path.stat().st_mode & 0o077:
        log.warning("encryption_key_file_permissions", path=str(path), expected="0600")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    try:
        return KeyRing.parse("\n".join(lines))
    except KeyRingError as error:
        raise KeyRingError(f"key file {path}: {error.message}") from None


def _create_key_file(path: Path) -> bool:
    """Write a new key file atomically; False if another process created it first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    content = (
        "# Encryption key of the relay's embedded default (RELAY_ENCRYPTION_KEYS format).\n"
        "# Keep it secret and back it up; losing it makes stored tokens unreadable.\n"
        f"{new_key_entry()}\n"
    )
    # mkstemp creates the file with mode 0600; os.link publishes it only complete and
    # fails if the name exists, so two processes starting together agree on one key.
    handle, temporary = tempfile.mkstemp(prefix=".relay-key-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o600)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)


# --- Connection secrets: stored only as salted hashes ---------------------------------

# scrypt (RFC 7914) at n=2**14, r=8, p=1, about 40 ms here. The secrets are 256-bit
# random, so the cost is defence in depth rather than what protects them; callers run
# verify_secret in a thread and may cache a success. The parameters are stored in each
# hash, so raising them later needs no migration.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_LEN = 2**14, 8, 1, 32
_HASH_PREFIX = "scrypt"


SECRET_PREFIX = "rs_"  # noqa: S105 (a label, not a secret)


def new_secret() -> SecretText:
    """A new connection secret: ``rs_`` and 256 bits in base64url.

    The prefix names what it is to a reader and to secret scanners, as ``rk_`` does for
    keys. It also keeps the secret from starting with ``-`` (1 in 64 base64url strings
    would), which a command line would take for an option: ``relay upload --secret -x…``.
    """
    return SecretText(SECRET_PREFIX + secrets.token_urlsafe(32))


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=128 * r * n * 2
    )


def hash_secret(secret: str | SecretText) -> str:
    """``scrypt$<n>$<r>$<p>$<salt>$<hash>``: the only form in which a secret is stored."""
    text = secret.reveal() if isinstance(secret, SecretText) else secret
    salt = os.urandom(16)
    digest = _scrypt(text, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_LEN)
    fields: Iterable[str] = (
        _HASH_PREFIX,
        str(_SCRYPT_N),
        str(_SCRYPT_R),
        str(_SCRYPT_P),
        _b64encode(salt),
        _b64encode(digest),
    )
    return "$".join(fields)


def verify_secret(secret: str | SecretText, encoded: str) -> bool:
    """Whether ``secret`` matches ``encoded`` (compared in constant time)."""
    text = secret.reveal() if isinstance(secret, SecretText) else secret
    try:
        prefix, n, r, p, salt, digest = encoded.split("$")
        if prefix != _HASH_PREFIX:
            return False
        expected = _b64decode(digest)
        actual = _scrypt(text, _b64decode(salt), int(n), int(r), int(p), len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    return hash_secret(secrets.token_urlsafe(32))


def dummy_verify(secret: str | SecretText) -> None:
    """Spend the time of one verification, so an unknown key answers as slowly as a known one."""
    verify_secret(secret, _dummy_hash())


# --- A process-wide key ring, for callers without one at hand ---------------------------

_default_keyring: KeyRing | None = None


def set_default_keyring(keyring: KeyRing | None) -> None:
    """Install the ring the module-level helpers use (None: load from settings on next use)."""
    global _default_keyring  # one ring per process, set at start-up
    _default_keyring = keyring


def default_keyring() -> KeyRing:
    """The installed ring, or one built from ``load_settings()`` on first use."""
    global _default_keyring
    if _default_keyring is None:
        from app.config import load_settings

        _default_keyring = keyring_from_settings(load_settings())
    return _default_keyring


def encrypt(
    plaintext: str | SecretText,
    output_id: str,
    *,
    purpose: str = PURPOSE_REFRESH,
    keyring: KeyRing | None = None,
) -> str:
    """``KeyRing.encrypt`` with ``keyring`` or the process-wide ring."""
    return (keyring or default_keyring()).encrypt(plaintext, output_id, purpose=purpose)


def decrypt(
    token: str,
    output_id: str,
    *,
    purpose: str = PURPOSE_REFRESH,
    keyring: KeyRing | None = None,
) -> SecretText:
    """``KeyRing.decrypt`` with ``keyring`` or the process-wide ring."""
    return (keyring or default_keyring()).decrypt(token, output_id, purpose=purpose)


def needs_rotation(token: str, *, keyring: KeyRing | None = None) -> bool:
    """``KeyRing.needs_rotation`` with ``keyring`` or the process-wide ring."""
    return (keyring or default_keyring()).needs_rotation(token)
