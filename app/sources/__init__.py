"""Source adapters, registered explicitly: one module per inbound format."""

from __future__ import annotations

from app.sources import mparticle, records, segment
from app.sources.base import SourceAdapter

SOURCES: dict[str, SourceAdapter] = {
    mparticle.NAME: mparticle.ADAPTER,
    segment.NAME: segment.ADAPTER,
    records.NAME: records.ADAPTER,
}


def adapter(name: str) -> SourceAdapter:
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(SOURCES)}") from None
