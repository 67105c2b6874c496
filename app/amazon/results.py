"""Reading Amazon's answer to one Events API request (pure; amazon-api.md §Responses).

A 207 carries per-event outcomes; ``index`` is into the request's ``events``, and
the delivery's index map turns it back into the inbound batch's index.

Amazon's 207 echoes every event it accepted, so its body is as large as the request
(about 90 KB for 100 events). ``read_answer`` reads the usual all-accepted answer from
the raw bytes with a decoder that validates the whole document but builds only the
indexes (msgspec: about an eighth of the time of building every echoed event as Python
objects, which was a sixth of the relay's time per batch, docs/benchmarks.md).
Anything else is read by ``read_response`` from the fully parsed body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from app import jsonutil

# Per-event codes worth sending again (alone); every other per-event error is final.
RETRYABLE_EVENT_CODES = frozenset({"TOO_MANY_REQUESTS", "INTERNAL_ERROR"})
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
FINAL_STATUSES = frozenset({400, 403, 404})
MAX_RETRY_AFTER = 3600.0


class Verdict(StrEnum):
    DONE = "done"  # every event has a final outcome
    RETRY = "retry"  # send again later (all events, or the ones left)
    REFRESH = "refresh"  # 401: refresh the access token and try once more
    SPLIT = "split"  # 413: send the halves separately
    FAILED = "failed"  # the request as a whole is refused for good


@dataclass(frozen=True, slots=True)
class EventResult:
    index: int  # inbound index
    ok: bool
    code: str | None = None
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.ok:
            return {"index": self.index, "status": "ok"}
        return {
            "index": self.index,
            "status": "rejected",
            "code": self.code,
            "message": self.message,
        }


@dataclass(slots=True)
class Reading:
    verdict: Verdict
    results: list[EventResult] = field(default_factory=list)
    # positions (in the request's events) still to send, for a partial retry
    pending_positions: list[int] = field(default_factory=list)
    retry_after: float | None = None
    error: str | None = None


def retry_after_seconds(header: str | None) -> float | None:
    """Retry-After in seconds (capped at an hour); HTTP dates are not used by Amazon."""
    if not header:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        return f"{body.get('code', '')}: {body.get('message', '')}".strip(": ")[:500]
    return ""


# An answer's body as JSON, or None when it is empty or not JSON.
parse_body = jsonutil.loads_or_none


class _Accepted(msgspec.Struct):
    """One item of a 207's ``success``: only its index is read, the echo is skipped."""

    index: int


class _MultiStatus(msgspec.Struct):
    success: list[_Accepted] = []
    error: list[msgspec.Raw] = []


_MULTI_STATUS = msgspec.json.Decoder(_MultiStatus)


def _all_accepted_raw(raw: bytes, count: int) -> bool:
    """``raw`` is Amazon's usual 207 (see ``_all_accepted``), read without building it.

    Where this says True, ``parse_body`` + ``_all_accepted`` say True as well, with one
    exception: a number orjson cannot hold (an integer beyond 64 bits, a float beyond a
    double's range) inside an echoed event. orjson refuses the whole body (it would read
    as "not JSON", every outcome unknown); this skips the echo. Amazon confirmed every
    event, so resending them all because of what it echoed would be wrong.
    msgspec does not check the UTF-8 of what it skips, so that is checked here.
    """
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            return False
    try:
        reply = _MULTI_STATUS.decode(raw)
    except msgspec.MsgspecError:
        return False  # another shape (or not JSON): the general reading decides
    if reply.error or len(reply.success) != count:
        return False
    return all(item.index == position for position, item in enumerate(reply.success))


def read_answer(
    status: int | None, raw: bytes, retry_after: str | None, index_map: list[int]
) -> Reading:
    """What to do after Amazon answered ``status`` with the body bytes ``raw``."""
    if status == 207 and _all_accepted_raw(raw, len(index_map)):
        return _done(index_map)
    return read_response(status, parse_body(raw), retry_after, index_map)


# EventResult(i, ok=True) for every inbound index i seen so far: they are immutable, so
# one instance serves every delivery (building 100 frozen dataclasses cost more than
# reading Amazon's answer). Indexes past the cache's end (batches of more than 10,000
# events) get instances of their own.
_ACCEPTED: list[EventResult] = []
_ACCEPTED_CACHED = 10_000


def _accepted(index: int) -> EventResult:
    if 0 <= index < len(_ACCEPTED):
        return _ACCEPTED[index]
    if not 0 <= index < _ACCEPTED_CACHED:
        return EventResult(index, ok=True)
    _ACCEPTED.extend(EventResult(i, ok=True) for i in range(len(_ACCEPTED), index + 1))
    return _ACCEPTED[index]


def _done(index_map: list[int]) -> Reading:
    return Reading(Verdict.DONE, results=[_accepted(index) for index in index_map])


def read_response(
    status: int | None, body: Any, retry_after: str | None, index_map: list[int]
) -> Reading:
    """What to do after Amazon answered ``status`` (None: no answer at all)."""
    if status is None:
        return Reading(
            Verdict.RETRY,
            pending_positions=list(range(len(index_map))),
            error="no answer (timeout or connection error)",
        )
    if status == 207 and isinstance(body, dict):
        return _read_multi_status(body, index_map)
    if status == 401:
        return Reading(Verdict.REFRESH, error=_error_text(body) or "unauthorized")
    if status == 413:
        return Reading(Verdict.SPLIT, error="request too large")
    if status in RETRYABLE_STATUSES or status >= 500:
        return Reading(
            Verdict.RETRY,
            pending_positions=list(range(len(index_map))),
            retry_after=retry_after_seconds(retry_after),
            error=f"HTTP {status} {_error_text(body)}".strip(),
        )
    if 200 <= status < 300:
        # A 2xx that is not a readable 207: every outcome unknown, so resend later.
        return Reading(
            Verdict.RETRY,
            pending_positions=list(range(len(index_map))),
            error=f"HTTP {status} without per-event results",
        )
    return Reading(Verdict.FAILED, error=f"HTTP {status} {_error_text(body)}".strip())


def _all_accepted(body: dict[str, Any], count: int) -> bool:
    """Amazon's usual 207: no error, and every position once in ``success``, in order."""
    if body.get("error"):
        return False
    success = body.get("success")
    if type(success) is not list or len(success) != count:
        return False
    for position, item in enumerate(success):
        if type(item) is not dict:
            return False
        index = item.get("index")
        if type(index) is not int or index != position:
            return False
    return True


def _read_multi_status(body: dict[str, Any], index_map: list[int]) -> Reading:
    if _all_accepted(body, len(index_map)):
        # What the general reading below gives for it, without its sets and sorts.
        return _done(index_map)
    seen: dict[int, EventResult] = {}
    retry: set[int] = set()
    for item in body.get("success") or []:
        position = item.get("index") if isinstance(item, dict) else None
        if isinstance(position, int) and 0 <= position < len(index_map):
            seen[position] = _accepted(index_map[position])
    for item in body.get("error") or []:
        position = item.get("index") if isinstance(item, dict) else None
        if not isinstance(position, int) or not 0 <= position < len(index_map):
            continue
        errors = item.get("errors") or [{}]
        first = errors[0] if isinstance(errors[0], dict) else {}
        codes = {e.get("code") for e in errors if isinstance(e, dict)}
        if codes & RETRYABLE_EVENT_CODES and not (codes - RETRYABLE_EVENT_CODES):
            retry.add(position)
            seen.pop(position, None)
            continue
        seen[position] = EventResult(
            index_map[position],
            ok=False,
            code=str(first.get("code") or "UNKNOWN"),
            message=str(first.get("message") or "")[:500],
        )
    # An index in neither array has an unknown outcome: it is sent again.
    pending = sorted(retry | {p for p in range(len(index_map)) if p not in seen})
    results = [seen[p] for p in sorted(seen)]
    if pending:
        return Reading(
            Verdict.RETRY,
            results=results,
            pending_positions=pending,
            error="some events had no final outcome",
        )
    return Reading(Verdict.DONE, results=results)
