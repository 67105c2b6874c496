"""Encryption of stored tokens, the key ring, the embedded key file, secret hashing."""

from __future__ import annotations

import base64
import stat
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app import crypto
from app.config import ConfigError, isolated_settings
from app.crypto import (
    DecryptError,
    KeyRing,
    KeyRingError,
    SecretText,
    hash_secret,
    keyring_from_settings,
    load_or_create_key_file,
    new_key_entry,
    verify_secret,
)

KEY = bytes(range(32))
KEY_B64 = base64.urlsafe_b64encode(KEY).decode()  # padded
assert KEY_B64.endswith("=")


def test_parse_accepts_padded_and_unpadded_entries_newest_first() -> None:
    ring = KeyRing.parse(f" k2:{KEY_B64.rstrip('=')} , k1:{KEY_B64},")
    assert ring.key_ids == ("k2", "k1")
    assert ring.primary_id == "k2"
    assert repr(ring) == "KeyRing(key_ids=['k2', 'k1'])"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no key"),
        ("k1", "expected <key id>"),
        ("k1:not*base64", "not base64url"),
        (f"k1:{base64.urlsafe_b64encode(b'short').decode()}", "32 bytes"),
        (f"k1:{KEY_B64},k1:{KEY_B64}", "appears twice"),
        (f"bad.id:{KEY_B64}", "key id"),
    ],
)
def test_parse_refuses_bad_entries_without_echoing_them(text: str, problem: str) -> None:
    with pytest.raises(KeyRingError, match=problem) as error:
        KeyRing.parse(text)
    assert KEY_B64.rstrip("=") not in str(error.value)
    assert isinstance(error.value, ConfigError)


def test_encrypt_decrypt_round_trip_and_format() -> None:
    ring = KeyRing.parse(new_key_entry("k1"))
    token = ring.encrypt("Atzr|secret", "out_a")
    assert token.startswith("v1.k1.")
    assert "Atzr" not in token
    assert ring.encrypt("Atzr|secret", "out_a") != token  # a fresh nonce every time
    plain = ring.decrypt(token, "out_a")
    assert isinstance(plain, SecretText)
    assert plain.reveal() == "Atzr|secret"
    assert ring.decrypt(ring.encrypt(SecretText("ünïcode"), "o"), "o").reveal() == "ünïcode"


def test_ciphertext_is_bound_to_its_output_and_purpose() -> None:
    ring = KeyRing.parse(new_key_entry("k1"))
    token = ring.encrypt("Atzr|secret", "out_a")
    with pytest.raises(DecryptError, match="another output"):
        ring.decrypt(token, "out_b")
    with pytest.raises(DecryptError):
        ring.decrypt(token, "out_a", purpose=crypto.PURPOSE_ACCESS)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # altered tag
        lambda t: t.replace("v1.", "v2.", 1),
        lambda t: t.replace(".k1.", ".k9.", 1),  # unknown key
        lambda t: "v1.k1.",
        lambda t: "v1.k1.AAAA",  # truncated
        lambda t: "garbage",
        lambda t: t + "*",
    ],
)
def test_malformed_or_altered_ciphertexts_raise_decrypt_error(mangle: object) -> None:
    ring = KeyRing.parse(new_key_entry("k1"))
    token = ring.encrypt("Atzr|secret", "out_a")
    with pytest.raises(DecryptError) as error:
        ring.decrypt(mangle(token), "out_a")  # type: ignore[operator]
    assert "Atzr" not in str(error.value)


def test_rotation() -> None:
    old_entry, new_entry = new_key_entry("k1"), new_key_entry("k2")
    old, both, new = (KeyRing.parse(t) for t in (old_entry, f"{new_entry},{old_entry}", new_entry))
    token = old.encrypt("tok", "out_a")
    assert both.needs_rotation(token)
    assert not old.needs_rotation(token)
    rotated = both.rotate(token, "out_a")
    assert crypto.key_id_of(rotated) == "k2"
    assert not both.needs_rotation(rotated)
    assert both.rotate(rotated, "out_a") == rotated
    assert new.decrypt(rotated, "out_a").reveal() == "tok"
    with pytest.raises(DecryptError, match="not configured"):
        new.decrypt(token, "out_a")
    with pytest.raises(DecryptError):
        both.needs_rotation("nonsense")


def test_secret_text_never_shows_its_value() -> None:
    secret = SecretText("Atzr|secret")
    assert repr(secret) == "'***'"
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert "Atzr" not in repr({"token": secret})
    assert secret == SecretText("Atzr|secret")
    assert secret != SecretText("other")
    assert secret != "Atzr|secret"
    assert bool(secret)
    assert not SecretText("")
    with pytest.raises(TypeError):
        hash(secret)


def test_module_helpers_use_the_installed_ring() -> None:
    ring = KeyRing.parse(new_key_entry("k1"))
    crypto.set_default_keyring(ring)
    try:
        token = crypto.encrypt("tok", "out_a")
        assert crypto.default_keyring() is ring
        assert crypto.decrypt(token, "out_a").reveal() == "tok"
        assert not crypto.needs_rotation(token)
        other = KeyRing.parse(new_key_entry("k2"))
        assert crypto.needs_rotation(token, keyring=other) is True
    finally:
        crypto.set_default_keyring(None)


# --- Connection secrets ---------------------------------------------------------------


def test_secret_hash_verifies_in_constant_form() -> None:
    secret = crypto.new_secret()
    stored = hash_secret(secret)
    assert secret.reveal() not in stored
    assert stored.startswith("scrypt$16384$8$1$")
    assert hash_secret(secret) != stored  # salted
    assert verify_secret(secret, stored)
    assert verify_secret(secret.reveal(), stored)
    assert not verify_secret(secret.reveal() + "x", stored)
    assert not verify_secret(secret, "scrypt$broken")
    assert not verify_secret(secret, "bcrypt$1$2$3$4$5")
    crypto.dummy_verify(secret)  # runs, returns nothing


# --- The embedded default key file -----------------------------------------------------


def test_key_file_is_created_0600_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "state" / "relay.key"
    settings = isolated_settings(key_file=path)
    with capture_logs() as logs:
        ring = keyring_from_settings(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry["event"] for entry in logs] == ["encryption_key_file_created"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["path"] == str(path)
    assert path.read_text().split(":")[-1].strip() not in str(logs)

    with capture_logs() as again:
        same = keyring_from_settings(settings)
    assert again == []
    token = ring.encrypt("tok", "out_a")
    assert same.decrypt(token, "out_a").reveal() == "tok"
    assert not list(path.parent.glob(".relay-key-*"))  # no temporary left behind


def test_key_file_with_loose_permissions_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    path.write_text(f"# comment\n{new_key_entry('k1')}\n")
    path.chmod(0o644)
    with capture_logs() as logs:
        ring = load_or_create_key_file(path)
    assert ring.key_ids == ("k1",)
    assert [entry["event"] for entry in logs] == ["encryption_key_file_permissions"]


def test_broken_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    path.write_text("k1:nope\n")
    with pytest.raises(KeyRingError, match="key file"):
        load_or_create_key_file(path)


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    rings: list[KeyRing] = []
    threads = [
        threading.Thread(target=lambda: rings.append(load_or_create_key_file(path)))
        for _ in range(8)
    ]
    with capture_logs():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    token = rings[0].encrypt("tok", "o")
    assert all(ring.decrypt(token, "o").reveal() == "tok" for ring in rings)


def test_configured_keys_win_and_no_file_is_written(tmp_path: Path) -> None:
    path = tmp_path / "relay.key"
    settings = isolated_settings(key_file=path, encryption_keys=new_key_entry("prod1"))
    assert keyring_from_settings(settings).primary_id == "prod1"
    assert not path.exists()


def test_production_refuses_without_keys(tmp_path: Path) -> None:
    # Settings already refuse; the key ring refuses too, should it get such settings.
    settings = isolated_settings(key_file=tmp_path / "relay.key").model_copy(
        update={"env": "production"}
    )
    with pytest.raises(KeyRingError, match="production"):
        keyring_from_settings(settings)
    assert not (tmp_path / "relay.key").exists()
