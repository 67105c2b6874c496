"""What the emulator's Events API received, for tests, the demo and benchmarks.

Recording must stay cheap on the request path, including for a long benchmark. A
call keeps the body and the answer as the bytes that crossed the wire, not as
parsed JSON: bytes are one object each, which the garbage collector never scans,
whereas keeping millions of parsed dicts alive made every collection slower and
slowed the whole emulator. Parsing happens only when someone reads
``/_emulator/received``. Retention is bounded (``max_recorded_requests`` /
``max_recorded_events``, oldest evicted first); the counters in ``stats`` always
cover every request.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from datetime import UTC, datetime
from typing import Any

from app import jsonutil
from app.emulator.state import Config


@dataclasses.dataclass(slots=True)
class RecordedCall:
    received_at: float
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""  # empty when it was not read (over the size limit)
    body_bytes: int = 0
    status: int | None = None  # None: the connection was dropped without an answer
    response: bytes = b""
    fault: dict[str, Any] | None = None
    events: int = 0  # in the body: the retention budget counts these
    accepted: int = 0
    rejected: int = 0
    id: int = 0

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    def accepted_events(self) -> list[Any]:
        if not self.accepted:
            return []
        return [entry["event"] for entry in jsonutil.loads(self.response)["success"]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": _iso(self.received_at),
            "account_id": self.header(b"amazon-ads-accountid"),
            "headers": _readable_headers(self.headers),
            "body": _parsed(self.body),
            "body_bytes": self.body_bytes,
            "status": self.status,
            "response": _parsed(self.response),
            "fault": self.fault,
        }


def event_count(body: Any) -> int:
    """Events in a parsed request body, for the retention budget (0 if malformed)."""
    events = body.get("events") if isinstance(body, dict) else None
    return len(events) if isinstance(events, list) else 0


def _parsed(raw: bytes) -> Any:
    """JSON as JSON, anything else as text, nothing as None."""
    if not raw:
        return None
    try:
        return jsonutil.loads(raw)
    except jsonutil.InvalidJSONError:
        return raw.decode("utf-8", "replace")


def _iso(moment: float) -> str:
    return (
        datetime.fromtimestamp(moment, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _readable_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        if name == "authorization":
            # The scheme stays visible for assertions; the credential never leaves.
            scheme, _, _ = text.partition(" ")
            text = f"{scheme} <redacted>"
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return headers


class Recorder:
    def __init__(self, config: Config) -> None:
        self._config = config
        self.clear()

    def clear(self) -> None:
        self._calls: deque[RecordedCall] = deque()
        self._retained_events = 0
        self._next_id = 1
        self._statuses: Counter[str] = Counter()
        self._accepted = 0
        self._rejected = 0
        self._evicted = 0

    def add(self, call: RecordedCall) -> None:
        call.id = self._next_id
        self._next_id += 1
        self._count(call)
        self._calls.append(call)
        self._retained_events += call.events
        self._evict()

    def _count(self, call: RecordedCall) -> None:
        self._statuses["dropped" if call.status is None else str(call.status)] += 1
        self._accepted += call.accepted
        self._rejected += call.rejected

    def _evict(self) -> None:
        config = self._config
        while self._calls and (
            len(self._calls) > config.max_recorded_requests
            or self._retained_events > config.max_recorded_events
        ):
            self._retained_events -= self._calls.popleft().events
            self._evicted += 1

    def requests(self) -> list[dict[str, Any]]:
        return [call.as_dict() for call in self._calls]

    def accepted_events(self, *, account_id: str | None, unique: bool) -> list[Any]:
        """Accepted events in arrival order; ``unique`` keeps the last one per eventId,
        as Amazon does ("for events with the same eventId only the latest is kept")."""
        events = [
            event
            for call in self._calls
            if account_id is None or call.header(b"amazon-ads-accountid") == account_id
            for event in call.accepted_events()
        ]
        if not unique:
            return events
        latest: dict[Any, int] = {}
        for position, event in enumerate(events):
            latest[event.get("eventId", ("no id", position))] = position
        return [events[position] for position in sorted(latest.values())]

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self._next_id - 1,
            "statuses": dict(self._statuses),
            "accepted_events": self._accepted,
            "rejected_events": self._rejected,
            "retained_requests": len(self._calls),
            "evicted_requests": self._evicted,
        }
