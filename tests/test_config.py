"""Settings: RELAY_* environment, .env, fail-closed production, no secrets in reprs."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, Settings, isolated_settings, load_settings, mask_database_url
from app.crypto import new_key_entry

KEYS = new_key_entry("k1")
PRODUCTION = {
    "env": "production",
    "encryption_keys": KEYS,
    "admin_token": "admin-token-value",
    "public_url": "https://relay.example.com/",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RELAY_* variable or .env of the developer's may reach these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("RELAY_") and name != "RELAY_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = isolated_settings()
    assert settings.database_url == "sqlite+aiosqlite:///./relay.db"
    assert settings.encryption_keys is None
    assert settings.admin_token is None
    assert settings.lwa_client_id == ""
    assert settings.lwa_client_secret is None
    assert settings.metrics_token is None  # /metrics open, not closed to everyone
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.redirect_uri == "http://127.0.0.1:8000/oauth/amazon/callback"
    assert (settings.amazon_api_url, settings.lwa_authorize_url, settings.lwa_token_url) == (
        None,
    ) * 3
    assert (settings.delivery_max_age, settings.delivery_lease_seconds) == (86400, 60)
    assert (settings.log_format, settings.env, settings.retention_days) == (
        "console",
        "development",
        7,
    )
    assert settings.key_file == Path("./relay.key")
    assert (settings.dispatch_concurrency, settings.database_pool_size) == (64, 30)
    assert not settings.is_production


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "RELAY_ADMIN_TOKEN=from-dotenv\nRELAY_DELIVERY_LEASE_SECONDS=30\nUNRELATED=1\n"
    )
    monkeypatch.setenv("RELAY_DELIVERY_LEASE_SECONDS", "45")  # the environment beats .env
    monkeypatch.setenv("RELAY_AMAZON_API_URL", "http://127.0.0.1:9100/")
    monkeypatch.setenv("RELAY_LWA_TOKEN_URL", "http://127.0.0.1:9100/auth/o2/token")
    monkeypatch.setenv("RELAY_LWA_CLIENT_SECRET", "")  # empty means unset
    monkeypatch.setenv("RELAY_METRICS_TOKEN", "")  # as docker-compose passes an unset one
    monkeypatch.setenv("RELAY_DATABASE_URL", "postgres://relay:pw@db:5432/relay")
    settings = load_settings(retention_days=3)
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "from-dotenv"
    assert settings.delivery_lease_seconds == 45
    assert settings.retention_days == 3
    assert settings.amazon_api_url == "http://127.0.0.1:9100"
    assert settings.lwa_token_url == "http://127.0.0.1:9100/auth/o2/token"
    assert settings.lwa_client_secret is None
    assert settings.database_url == "postgresql+asyncpg://relay:pw@db:5432/relay"
    # isolated_settings ignores all of it.
    assert isolated_settings().admin_token is None


def test_repr_shows_no_secret() -> None:
    settings = isolated_settings(
        encryption_keys=KEYS,
        admin_token="admin-token-value",
        lwa_client_secret="lwa-secret-value",
        metrics_token="metrics-token-value",
        database_url="postgresql+asyncpg://relay:db-password@db/relay",
    )
    secrets = (KEYS.split(":")[1], "admin-token-value", "lwa-secret-value", "db-password")
    for text in (repr(settings), str(settings)):
        for secret in (*secrets, "metrics-token-value"):
            assert secret not in text
    assert "relay:***@db/relay" in repr(settings)


def test_mask_database_url() -> None:
    assert (
        mask_database_url("postgresql+asyncpg://u:p@h:5432/d")
        == "postgresql+asyncpg://u:***@h:5432/d"
    )
    assert mask_database_url("postgresql+asyncpg://u@h/d") == "postgresql+asyncpg://u@h/d"
    assert mask_database_url("sqlite+aiosqlite:///./relay.db") == "sqlite+aiosqlite:///./relay.db"


def test_production_accepts_a_complete_configuration() -> None:
    settings = isolated_settings(**PRODUCTION)
    assert settings.is_production
    assert settings.public_url == "https://relay.example.com"
    assert settings.log_format == "json"  # production default; explicit wins:
    assert isolated_settings(**PRODUCTION, log_format="console").log_format == "console"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ({"encryption_keys": None}, "RELAY_ENCRYPTION_KEYS"),
        ({"admin_token": None}, "RELAY_ADMIN_TOKEN"),
        ({"admin_token": "   "}, "RELAY_ADMIN_TOKEN"),
        ({"public_url": "http://relay.example.com"}, "https:// RELAY_PUBLIC_URL"),
    ],
)
def test_production_refuses_incomplete_configuration(
    missing: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        isolated_settings(**(PRODUCTION | missing))


def test_production_refusal_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_ENV", "production")
    with pytest.raises(ConfigError, match="RELAY_ENCRYPTION_KEYS and RELAY_ADMIN_TOKEN"):
        load_settings()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("encryption_keys", "k1:tooShortSecretMaterial"),
        ("delivery_lease_seconds", 0),
        ("env", "staging"),
        ("log_format", "xml"),
        ("public_url", "ftp://relay"),
        ("amazon_api_url", "http://127.0.0.1:9100/adsApi/v1"),
        ("database_url", "mysql://x/y"),
        ("dispatch_concurrency", 0),
        ("dispatch_concurrency", 5000),
    ],
)
def test_invalid_values_name_the_setting_not_the_value(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as error:
        isolated_settings(**{field: value})
    assert f"RELAY_{field.upper()}" in str(error.value)
    assert "tooShortSecretMaterial" not in str(error.value)


def test_settings_are_immutable() -> None:
    settings = isolated_settings()
    with pytest.raises(Exception, match="frozen"):
        settings.env = "production"  # type: ignore[misc]
    assert isinstance(settings, Settings)
