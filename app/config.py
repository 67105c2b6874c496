"""Process settings: environment variables prefixed ``RELAY_``, and ``.env`` if present.

Validation fails closed: a production process refuses to start without encryption keys,
an admin token and an https public URL, and every secret is a ``SecretStr`` so that no
repr, log line or validation error can show it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.errors import RelayError

Environment = Literal["development", "production"]
LogFormat = Literal["json", "console"]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./relay.db"
# 32 was too few on two busy cores: with Amazon (the emulator) slowed by the load, bursts
# of ingest found every slot taken and their deliveries went through the claim path,
# which then fell behind (docs/decisions/0020-dispatch-concurrency.md).
DISPATCH_CONCURRENCY = 64

# Operators paste URLs in the forms their providers give them; the async drivers are
# the only ones installed, so the plain forms are rewritten rather than refused.
_URL_SCHEMES = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


class ConfigError(RelayError):
    """The settings cannot run the relay; the message names the setting, never its value."""

    code = "config_error"


def normalize_database_url(url: str) -> str:
    """Rewrite ``postgres://``, ``postgresql://`` and ``sqlite://`` to their async drivers."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in _URL_SCHEMES:
        raise ConfigError(
            "RELAY_DATABASE_URL must start with sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    return f"{_URL_SCHEMES[scheme.lower()]}://{rest}"


def mask_database_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and reprs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo.split("/")[0]:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _http_url(name: str, value: str, *, base_only: bool = False) -> str:
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} must be an http:// or https:// URL")
    if base_only and (parts.path or parts.query or parts.fragment):
        raise ValueError(f"{name} must be scheme, host and optional port only")
    return text


class Settings(BaseSettings):
    """Every ``RELAY_*`` setting (service.md §Settings)."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        # A validation error must not echo a secret the operator mistyped.
        hide_input_in_errors=True,
        frozen=True,
    )

    database_url: str = DEFAULT_DATABASE_URL
    encryption_keys: SecretStr | None = None
    admin_token: SecretStr | None = None
    # When set, GET /metrics asks for it as a bearer token (decision 0024).
    metrics_token: SecretStr | None = None
    lwa_client_id: str = ""
    lwa_client_secret: SecretStr | None = None
    public_url: str = "http://127.0.0.1:8000"
    amazon_api_url: str | None = None
    lwa_authorize_url: str | None = None
    lwa_token_url: str | None = None
    delivery_max_age: int = Field(default=86400, gt=0, description="seconds")
    delivery_lease_seconds: int = Field(default=60, gt=0)
    # Deliveries one process keeps in flight to Amazon at once (its dispatcher's slots).
    # A process sends at most this many divided by Amazon's latency per second: 64 at
    # 200 ms is 320 requests/s. Fresh batches are handed to a free slot by the request
    # that stored them; without one they wait in the queue for the dearer claim path.
    dispatch_concurrency: int = Field(default=DISPATCH_CONCURRENCY, ge=1, le=1024)
    # Per process: ingest requests and the in-flight deliveries' outcomes share this pool.
    # Connections past pool_size ("overflow") are closed when returned, and opening one
    # costs PostgreSQL a process and both sides a handshake, far more CPU than the
    # statement it serves. Under a soak at 196 batches/s a pool of 20 + 10 opened 11 new
    # sessions a second, and that churn tipped the machine into overload. So the pool
    # keeps every connection it opens, up to 30 (opened only as concurrency needs them),
    # and callers past that wait for one (backpressure) instead of opening more.
    database_pool_size: int = Field(default=30, ge=1)
    database_max_overflow: int = Field(default=0, ge=0)
    log_format: LogFormat = "console"
    env: Environment = "development"
    retention_days: int = Field(default=7, ge=0)
    key_file: Path = Path("./relay.key")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            return normalize_database_url(value)
        except ConfigError as error:
            raise ValueError(error.message) from None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        return _http_url("RELAY_PUBLIC_URL", value)

    @field_validator("amazon_api_url")
    @classmethod
    def _amazon_api_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url("RELAY_AMAZON_API_URL", value, base_only=True)

    @field_validator("lwa_authorize_url", "lwa_token_url")
    @classmethod
    def _lwa_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url("RELAY_LWA_*_URL", value)

    @field_validator("encryption_keys")
    @classmethod
    def _encryption_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # Imported here because crypto imports this module for ConfigError.
        from app.crypto import KeyRing

        try:
            KeyRing.parse(value.get_secret_value())
        except ConfigError as error:
            raise ValueError(error.message) from None
        return value

    @model_validator(mode="after")
    def _fail_closed_in_production(self) -> Settings:
        if self.env != "production":
            return self
        missing = [
            name
            for name, secret in (
                ("RELAY_ENCRYPTION_KEYS", self.encryption_keys),
                ("RELAY_ADMIN_TOKEN", self.admin_token),
            )
            if secret is None or not secret.get_secret_value().strip()
        ]
        if missing:
            raise ConfigError(f"RELAY_ENV=production requires {' and '.join(missing)}")
        if not self.public_url.startswith("https://"):
            raise ConfigError("RELAY_ENV=production requires an https:// RELAY_PUBLIC_URL")
        if "log_format" not in self.model_fields_set:
            # Production logs go to a collector; an explicit setting still wins.
            object.__setattr__(self, "log_format", "json")
        return self

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/oauth/amazon/callback"

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, mask_database_url(value) if name == "database_url" else value


class _IsolatedSettings(Settings):
    """Settings from defaults and explicit values only: no environment, no ``.env``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def _build(cls: type[Settings], overrides: dict[str, Any]) -> Settings:
    try:
        return cls(**overrides)
    except ValidationError as error:
        # Field names and reasons only: inputs are hidden (hide_input_in_errors).
        problems = "; ".join(
            f"RELAY_{'.'.join(str(part) for part in item['loc']).upper()}: {item['msg']}"
            if item["loc"]
            else item["msg"]
            for item in error.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and ``.env``; ``overrides`` (field names) win.

    Raises ConfigError, naming the setting, for any invalid or missing value.
    """
    return _build(Settings, overrides)


def isolated_settings(**overrides: Any) -> Settings:
    """Settings from defaults and ``overrides`` only, ignoring the environment and ``.env``.

    For tests, so that a developer's shell or ``.env`` cannot change their outcome.
    """
    return _build(_IsolatedSettings, overrides)
