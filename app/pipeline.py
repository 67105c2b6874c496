"""Orchestration of the pure steps: decode -> adapter -> mapper.

Shared by ``relay map``, the preview route and ingest, so all three give the same
answer for the same payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from app.amazon.mapping import MapResult, map_events
from app.amazon.settings import OutputSettings
from app.sources import adapter


def output_settings(raw: Mapping[str, Any]) -> OutputSettings:
    return OutputSettings.from_mapping(raw)


def map_parsed(payload: Any, source: str, *, settings: OutputSettings, now: datetime) -> MapResult:
    parsed = adapter(source).parse(payload)
    return map_events(
        parsed.events, source=source, settings=settings, now=now, rejects=parsed.rejects
    )


def map_payload(
    source: str,
    body: bytes,
    *,
    settings: OutputSettings,
    now: datetime,
    content_type: str | None = None,
) -> MapResult:
    payload = adapter(source).decode(body, content_type)
    return map_parsed(payload, source, settings=settings, now=now)
