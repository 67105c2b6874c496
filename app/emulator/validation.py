"""Per-event validation of a CreateEvent request, giving the 207 ``success``/``error`` arrays.

Two layers: Amazon's schema (``app.amazon.schema``, via the fast check) and rules
Amazon states in prose or that the emulator adds to catch relay bugs:

- eventTime more than ``max_event_age_seconds`` (21 days) in the past, or more than
  ``max_future_seconds`` (1 hour) ahead of the emulator's clock;
- a calendar date that the format allows but that does not exist;
- PII match keys (EMAIL, PHONE, names, address parts) must be SHA-256 hex, lowercase;
- MATCH_ID at most 100 characters; unitsSold within int32 (its declared format).

Every failure is reported with code ``BAD_REQUEST``, as Amazon does for bad events.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from app.amazon import schema
from app.emulator.fastcheck import event_check
from app.emulator.state import Config

MAX_ERRORS_PER_EVENT = 20  # ErrorsIndex.errors maxItems in Amazon's schema
HASHED_MATCH_KEYS = frozenset(
    {"EMAIL", "PHONE", "FIRST_NAME", "LAST_NAME", "ADDRESS", "CITY", "STATE", "POSTAL"}
)
MAX_MATCH_ID = 100
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INT32 = range(-(2**31), 2**31)

Problem = dict[str, str]


def outcomes(
    events: list[Any], *, now: float, config: Config
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Amazon's 207 arrays: valid events echoed in ``success``, the rest in ``error``."""
    success: list[dict[str, Any]] = []
    error: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        problems = event_errors(event, index, now=now, config=config)
        if problems:
            error.append({"index": index, "errors": problems[:MAX_ERRORS_PER_EVENT]})
        else:
            success.append({"index": index, "event": event})
    return success, error


def injected_outcomes(events: list[Any], code: str) -> list[dict[str, Any]]:
    """Every event refused with ``code``: the per_event_error fault."""
    problem = {"code": code, "message": f"Injected fault: {code}"}
    return [{"index": index, "errors": [problem]} for index in range(len(events))]


def event_errors(event: Any, index: int, *, now: float, config: Config) -> list[Problem]:
    if not event_check()(event):
        problems = _schema_problems(event, index)
        if problems:
            return problems
        # The fast check refused what the schema accepts: the schema is the authority.
    return _emulator_problems(event, index, now=now, config=config)


def _schema_problems(event: Any, index: int) -> list[Problem]:
    problems = []
    for text in schema.request_errors({"events": [event]}):
        path, _, message = text.partition(": ")
        problems.append(_problem(message, _field_location(path, index)))
    return problems


def _field_location(path: str, index: int) -> str:
    """``events/0/matchKeys/1/values`` (one-event body) → ``events[index].matchKeys[1].values``.

    Amazon's format for fieldLocation is undocumented; this one reads naturally.
    """
    location = f"events[{index}]"
    for part in path.split("/")[2:]:
        location += f"[{part}]" if part.isdigit() else f".{part}"
    return location


def _problem(message: str, field_location: str) -> Problem:
    return {"code": "BAD_REQUEST", "message": message, "fieldLocation": field_location}


def _emulator_problems(
    event: dict[str, Any], index: int, *, now: float, config: Config
) -> list[Problem]:
    # Runs only on schema-valid events, so the shapes below are guaranteed.
    problems = _time_problems(event["eventTime"], index, now=now, config=config)
    for position, key in enumerate(event["matchKeys"]):
        problem = _match_key_problem(key["type"], key["values"][0])
        if problem:
            problems.append(_problem(problem, f"events[{index}].matchKeys[{position}].values"))
    units = event.get("unitsSold")
    if units is not None and units not in _INT32:
        problems.append(_problem("unitsSold is outside int32", f"events[{index}].unitsSold"))
    return problems


def _time_problems(text: str, index: int, *, now: float, config: Config) -> list[Problem]:
    location = f"events[{index}].eventTime"
    # The schema check already matched EVENT_TIME; fractions are irrelevant at this scale.
    offset = "+00:00" if text.endswith("Z") else text[-6:]
    try:
        moment = datetime.fromisoformat(text[:19] + offset).timestamp()
    except ValueError:
        return [_problem("eventTime is not a valid date-time", location)]
    if moment < now - config.max_event_age_seconds:
        days = config.max_event_age_seconds / 86_400
        return [_problem(f"eventTime is more than {days:g} days in the past", location)]
    if moment > now + config.max_future_seconds:
        return [_problem("eventTime is in the future", location)]
    return []


def _match_key_problem(key_type: str, value: str) -> str | None:
    if key_type in HASHED_MATCH_KEYS and not _SHA256_HEX.fullmatch(value):
        return f"{key_type} values must be SHA-256 hashes (64 lowercase hex characters)"
    if key_type == "MATCH_ID" and len(value) > MAX_MATCH_ID:
        return f"MATCH_ID values must be at most {MAX_MATCH_ID} characters"
    return None
