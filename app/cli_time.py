"""Reading instants given by people (command line, query strings)."""

from __future__ import annotations

from datetime import UTC, datetime

from app.errors import SettingsError


def parse_instant(text: str, name: str) -> datetime:
    """An ISO 8601 date-time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SettingsError(name, f"{text!r} is not an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
