"""Who is calling: connection credentials (ingest) and the admin token.

Connection secrets are stored as scrypt hashes (tens of milliseconds to check, on
purpose). A successful check is remembered in memory for a minute, keyed by a
SHA-256 of key and secret, so a busy connection pays for scrypt once a minute, not
on every batch (and once, not once per request in flight, when the minute is up);
``active`` and the stored hash are still read on every call, so a deactivated or
rotated connection is refused at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

CACHE_SECONDS = 60.0
CACHE_SIZE = 4096
FAILURES_ALLOWED = 20  # failed attempts per client address and identity …
ADDRESS_FAILURES_ALLOWED = 200  # … or per address over all identities …
FAILURE_WINDOW_SECONDS = 60.0  # … within this window before it gets 429s
ADMIN_IDENTITY = "admin"  # failures with the admin bearer token are counted under this

_Key = TypeVar("_Key")


@dataclass(frozen=True, slots=True)
class Credentials:
    key: str
    secret: str


def parse_basic(header: str | None) -> Credentials | None:
    """HTTP Basic: ``key:secret`` (mParticle), or a Segment write key ``key.secret:``."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if "\x00" in decoded:  # no key or secret holds one, and the database refuses it
        return None
    user, _, password = decoded.partition(":")
    if password:
        return Credentials(user, password)
    return from_write_key(user)


def from_write_key(write_key: str | None) -> Credentials | None:
    """A write key is ``<key>.<secret>``: Segment sends it alone, as the Basic user name."""
    if not write_key or "\x00" in write_key:
        return None
    key, dot, secret = write_key.partition(".")
    return Credentials(key, secret) if dot and key and secret else None


def write_key(key: str, secret: str) -> str:
    return f"{key}.{secret}"


class ConnectionAuthCache:
    def __init__(self, seconds: float = CACHE_SECONDS, size: int = CACHE_SIZE) -> None:
        self._seconds = seconds
        self._size = size
        self._entries: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._checking: dict[tuple[bytes, str], asyncio.Future[bool]] = {}

    @staticmethod
    def _fingerprint(credentials: Credentials) -> bytes:
        return hashlib.sha256(f"{credentials.key}\n{credentials.secret}".encode()).digest()

    def verified(self, credentials: Credentials, secret_hash: str) -> bool:
        entry = self._entries.get(self._fingerprint(credentials))
        if entry is None:
            return False
        stored_hash, expires = entry
        return expires > time.monotonic() and hmac.compare_digest(stored_hash, secret_hash)

    async def check(
        self,
        credentials: Credentials,
        secret_hash: str,
        verify: Callable[[str, str], bool],
    ) -> bool:
        """``verified``, else ``verify(secret, secret_hash)`` in a thread, remembered if it
        holds. Callers presenting the same key, secret and stored hash while a check runs
        share it: when an entry expires under load, the requests in flight would each
        pay for scrypt at the same moment (seen in a profile: 11 % of a worker's time
        in one 20 s window). Only the same secret shares, so nobody learns anything."""
        if self.verified(credentials, secret_hash):
            return True
        flight = (self._fingerprint(credentials), secret_hash)
        pending = self._checking.get(flight)
        if pending is None:
            pending = asyncio.ensure_future(
                asyncio.to_thread(verify, credentials.secret, secret_hash)
            )
            self._checking[flight] = pending

            def forget(done: asyncio.Future[bool]) -> None:
                if self._checking.get(flight) is done:
                    del self._checking[flight]

            pending.add_done_callback(forget)
        # Shielded: a caller that goes away (client disconnect) leaves the check running
        # for the others.
        ok = await asyncio.shield(pending)
        if ok:
            self.remember(credentials, secret_hash)
        return ok

    def remember(self, credentials: Credentials, secret_hash: str) -> None:
        fingerprint = self._fingerprint(credentials)
        self._entries[fingerprint] = (secret_hash, time.monotonic() + self._seconds)
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class FailedAuthLimiter:
    """Counts failed authentications; too many → 429 for a while.

    Failures are counted per (client address, identity tried): the admin token, or a
    connection's key id. A client that keeps failing with one connection's key (an old
    secret left in a deployment, a guesser) is stopped without locking out the other
    connections, or the admin, behind the same address (a NAT, a proxy). An address
    also has a larger budget over all identities, so cycling through key ids does not
    buy unlimited secret checks (each costs a scrypt hash).
    """

    def __init__(
        self,
        allowed: int = FAILURES_ALLOWED,
        window: float = FAILURE_WINDOW_SECONDS,
        address_allowed: int = ADDRESS_FAILURES_ALLOWED,
    ) -> None:
        self._allowed = allowed
        self._address_allowed = address_allowed
        self._window = window
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._address_failures: dict[str, list[float]] = {}

    def _recent(self, table: dict[_Key, list[float]], key: _Key, now: float) -> list[float]:
        times = [t for t in table.get(key, []) if t > now - self._window]
        if times:
            table[key] = times
        else:
            table.pop(key, None)
        return times

    def blocked(self, client: str, identity: str = "") -> bool:
        now = time.monotonic()
        return (
            len(self._recent(self._failures, (client, identity), now)) >= self._allowed
            or len(self._recent(self._address_failures, client, now)) >= self._address_allowed
        )

    def failed(self, client: str, identity: str = "") -> None:
        now = time.monotonic()
        pair = (client, identity)
        self._failures[pair] = [*self._recent(self._failures, pair, now), now]
        self._address_failures[client] = [*self._recent(self._address_failures, client, now), now]
        if len(self._failures) > 100_000:  # a flood of addresses: forget the oldest
            self._failures.clear()
            self._address_failures.clear()


def token_ok(given: str | None, expected: str | None) -> bool:
    """A given token against the configured one, in constant time; none configured
    lets nobody in."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())
