"""The emulator's clock and its settings that tests may change while it runs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024
DAY = 86_400


class Clock:
    """Wall-clock time plus an offset that tests move forward instead of sleeping.

    Everything that expires (codes, access tokens, fault windows) and the event-age
    check read this clock, so advancing it ages all of them consistently.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def as_dict(self) -> dict[str, Any]:
        moment = datetime.fromtimestamp(self.now(), UTC)
        return {"now": moment.isoformat().replace("+00:00", "Z"), "offset_seconds": self.offset}


class ConfigError(ValueError):
    """A config change names an unknown setting or gives it a value of the wrong type."""


@dataclasses.dataclass(slots=True)
class Config:
    """Behaviour switches, changed at run time by ``POST /_emulator/config``."""

    # LwA
    rotate_refresh_tokens: bool = False
    decline_authorizations: bool = False
    consent_page: bool = False
    expires_in_as_string: bool = False
    allowed_redirect_uris: list[str] | None = None
    # Events API
    omit_empty_outcome_arrays: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_event_age_seconds: int = 21 * DAY
    max_future_seconds: int = 3600
    # Recording: bounded so that a long benchmark cannot exhaust memory.
    max_recorded_requests: int = 10_000
    max_recorded_events: int = 100_000

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply ``changes`` all or nothing."""
        current = self.as_dict()
        for name, value in changes.items():
            if name not in current:
                raise ConfigError(f"unknown setting {name!r}")
            _check_value(name, current[name], value)
        for name, value in changes.items():
            setattr(self, name, list(value) if isinstance(value, list) else value)


def _check_value(name: str, current: Any, value: Any) -> None:
    if name == "allowed_redirect_uris":
        if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return
        raise ConfigError(f"{name} must be a list of URLs or null")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false")
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer")
