"""The source adapter contract: one inbound payload -> canonical events + rejects."""

from __future__ import annotations

from typing import Any, Protocol

from app import jsonutil
from app.canonical import ParsedBatch
from app.errors import PayloadError


class InvalidEventError(Exception):
    """One event has a field of the wrong type; it is dropped as invalid_event."""


def decode_json(body: bytes) -> Any:
    try:
        return jsonutil.loads(body)
    except jsonutil.InvalidJSONError as error:
        raise PayloadError(f"body is not valid JSON: {error}") from None


class SourceAdapter(Protocol):
    """A pure translator from one wire format to canonical events.

    ``decode`` turns the request body into a payload (JSON for most sources);
    ``parse`` turns one payload into events. Both raise ``PayloadError`` when the
    payload as a whole is unusable; a single bad event becomes an ``invalid_event``
    reject instead, and the others go on.
    """

    name: str

    def decode(self, body: bytes, content_type: str | None = None) -> Any: ...

    def parse(self, payload: Any) -> ParsedBatch: ...
