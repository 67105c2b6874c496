"""Faults injected on command: what goes wrong, for which endpoint, for how long.

A fault lasts ``count`` requests or ``seconds`` of emulator time (whichever ends
first when both are given; one request when neither is). Faults queue in order of
registration: a request meets the first live fault for its endpoint, so
``[503 x3, 429 x1]`` answers three 503s and then one 429.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from app.amazon.schema import ERROR_CODES

TARGETS = ("events", "token")
MAX_DELAY_SECONDS = 600.0
_KEYS = frozenset(
    {"target", "status", "code", "retry_after", "delay", "drop_connection", "per_event_error"}
    | {"count", "seconds"}
)

# The body code Amazon sends with each whole-request status.
_EVENTS_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    413: "CONTENT_TOO_LARGE",
    429: "TOO_MANY_REQUESTS",
}
_TOKEN_ERRORS = {
    400: "invalid_request",
    401: "invalid_client",
    429: "temporarily_unavailable",
    503: "temporarily_unavailable",
}


class FaultError(ValueError):
    """A fault description the emulator cannot apply."""


@dataclasses.dataclass(slots=True)
class Fault:
    target: str = "events"
    status: int | None = None
    code: str | None = None
    retry_after: int | str | None = None
    delay: float = 0.0
    drop_connection: bool = False
    per_event_error: str | None = None
    remaining: int | None = 1  # requests left; None: until the time window ends
    until: float | None = None  # emulator-clock end of the time window

    def live(self, now: float) -> bool:
        return self.remaining != 0 and (self.until is None or now < self.until)

    def body(self) -> dict[str, str]:
        """The JSON answered with ``status``, in the style of the faulted endpoint."""
        assert self.status is not None
        message = f"Injected fault: HTTP {self.status}"
        server_side = self.status >= 500
        if self.target == "token":
            fallback = "server_error" if server_side else "invalid_request"
            error = self.code or _TOKEN_ERRORS.get(self.status, fallback)
            return {"error": error, "error_description": message}
        fallback = "INTERNAL_ERROR" if server_side else "BAD_REQUEST"
        return {"code": self.code or _EVENTS_CODES.get(self.status, fallback), "message": message}

    def action(self) -> dict[str, Any]:
        """What the fault does, without its extent: recorded with each faulted request."""
        action = {
            "target": self.target,
            "status": self.status,
            "code": self.code,
            "retry_after": self.retry_after,
            "delay": self.delay or None,
            "drop_connection": self.drop_connection or None,
            "per_event_error": self.per_event_error,
        }
        return {name: value for name, value in action.items() if value is not None}

    def describe(self, now: float) -> dict[str, Any]:
        extent = {
            "remaining": self.remaining,
            "seconds_left": None if self.until is None else round(self.until - now, 3),
        }
        return self.action() | {name: value for name, value in extent.items() if value is not None}


def parse_fault(spec: Any, now: float) -> Fault:
    if not isinstance(spec, Mapping):
        raise FaultError("a fault is a JSON object")
    unknown = set(spec) - _KEYS
    if unknown:
        raise FaultError(f"unknown fault keys: {', '.join(sorted(unknown))}")
    fault = Fault(
        target=_target(spec),
        status=_status(spec),
        retry_after=_retry_after(spec),
        delay=_number(spec, "delay", MAX_DELAY_SECONDS, default=0.0),
        drop_connection=_flag(spec, "drop_connection"),
        per_event_error=_per_event_error(spec),
    )
    fault.code = _code(spec, fault)
    _check_action(fault)
    _set_extent(fault, spec, now)
    return fault


def _target(spec: Mapping[str, Any]) -> str:
    target = spec.get("target", "events")
    if target not in TARGETS:
        raise FaultError(f"target must be one of {', '.join(TARGETS)}")
    return str(target)


def _integer(spec: Mapping[str, Any], name: str) -> int | None:
    value = spec.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise FaultError(f"{name} must be an integer")
    return value


def _status(spec: Mapping[str, Any]) -> int | None:
    status = _integer(spec, "status")
    if status is not None and not 400 <= status <= 599:
        raise FaultError("status must be an HTTP error status, 400..599")
    return status


def _retry_after(spec: Mapping[str, Any]) -> int | str | None:
    # A string passes through verbatim, so HTTP-date forms can be tested too.
    value = spec.get("retry_after")
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise FaultError("retry_after must be a non-negative integer or a non-empty string")


def _number(spec: Mapping[str, Any], name: str, high: float, *, default: float) -> float:
    value = spec.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise FaultError(f"{name} must be a number of seconds, 0..{high:g}")
    return float(value)


def _flag(spec: Mapping[str, Any], name: str) -> bool:
    value = spec.get(name, False)
    if not isinstance(value, bool):
        raise FaultError(f"{name} must be true or false")
    return value


def _per_event_error(spec: Mapping[str, Any]) -> str | None:
    code = spec.get("per_event_error")
    if code is None:
        return None
    if code not in ERROR_CODES:
        raise FaultError("per_event_error must be one of Amazon's ErrorCode values")
    return str(code)


def _code(spec: Mapping[str, Any], fault: Fault) -> str | None:
    code = spec.get("code")
    if code is None:
        return None
    if fault.status is None:
        raise FaultError("code goes with status")
    if not isinstance(code, str) or not code:
        raise FaultError("code must be a non-empty string")
    if fault.target == "events" and code not in ERROR_CODES:
        raise FaultError("code must be one of Amazon's ErrorCode values")
    return code


def _check_action(fault: Fault) -> None:
    actions = [fault.status is not None, fault.drop_connection, fault.per_event_error is not None]
    if sum(actions) > 1:
        raise FaultError("give at most one of status, drop_connection, per_event_error")
    if not any(actions) and fault.delay == 0:
        raise FaultError("a fault needs status, drop_connection, per_event_error or delay")
    if fault.retry_after is not None and fault.status is None:
        raise FaultError("retry_after goes with status")
    if fault.per_event_error is not None and fault.target != "events":
        raise FaultError("per_event_error applies to the events target only")


def _set_extent(fault: Fault, spec: Mapping[str, Any], now: float) -> None:
    count = _integer(spec, "count")
    if count is not None and count < 1:
        raise FaultError("count must be at least 1")
    seconds = spec.get("seconds")
    if seconds is not None:
        fault.until = now + _number(spec, "seconds", 86_400.0, default=0.0)
    fault.remaining = count if count is not None or seconds is not None else 1


class FaultQueue:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, faults: list[Fault]) -> None:
        self._faults.extend(faults)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, target: str, now: float) -> Fault | None:
        """The fault the next ``target`` request meets, with one use consumed."""
        if not self._faults:
            return None  # the hot path of every request without faults
        self._faults = [fault for fault in self._faults if fault.live(now)]
        for fault in self._faults:
            if fault.target == target:
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def pending(self, now: float) -> list[dict[str, Any]]:
        return [fault.describe(now) for fault in self._faults if fault.live(now)]
