"""Read-only counts for the web UI: events forwarded and dropped, per output and per hour.

"Forwarded" is the sum of ``event_count`` over the deliveries created in the window
(events queued for Amazon); "dropped" counts the entries of their ``dropped`` JSON (the
batch's drops are kept with its first delivery, see app/ingest.py). A batch whose
every event was dropped creates no delivery, so its drops are not counted here: the
``relay_events_dropped_total`` metric has them.

The JSON functions differ by backend (SQLite's JSON1, PostgreSQL's jsonb); ``dropped``
may hold SQL NULL or a JSON ``null``, which both count as no drops. Every query is
bounded by ``created_at`` and, where an output is named, uses the
``(output_id, created_at)`` index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, case, cast, func, literal, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Delivery

HOUR = timedelta(hours=1)
_HOUR_KEY = "%Y-%m-%dT%H"  # what both backends' hour expressions produce


@dataclass(frozen=True, slots=True)
class Totals:
    forwarded: int = 0
    dropped: int = 0
    deliveries: int = 0


@dataclass(frozen=True, slots=True)
class HourCount:
    start: datetime  # aware UTC, on the hour
    forwarded: int
    dropped: int


def _postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _dropped_array(session: AsyncSession) -> ColumnElement[Any]:
    """``dropped`` when it is a JSON array, else an empty array (never NULL)."""
    if _postgres(session):
        return case(
            (func.jsonb_typeof(Delivery.dropped) == "array", Delivery.dropped),
            else_=cast(literal("[]"), JSONB),
        )
    return case(
        (func.json_type(Delivery.dropped) == "array", Delivery.dropped),
        else_=literal("[]"),
    )


def _drop_count(session: AsyncSession) -> ColumnElement[int]:
    length = "jsonb_array_length" if _postgres(session) else "json_array_length"
    return getattr(func, length)(_dropped_array(session), type_=Integer)  # type: ignore[no-any-return]


def _hour_key(session: AsyncSession) -> ColumnElement[str]:
    if _postgres(session):
        return func.to_char(func.timezone("UTC", Delivery.created_at), 'YYYY-MM-DD"T"HH24')
    # SQLite stores the UTC time as text (app.db.base.UTCDateTime).
    return func.strftime(_HOUR_KEY, Delivery.created_at)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def totals_by_output(
    session: AsyncSession, output_ids: Sequence[str], *, since: datetime
) -> dict[str, Totals]:
    """Per output: events forwarded and dropped by deliveries created at or after ``since``.

    Every id asked for is in the answer (zeros when it has no deliveries).
    """
    answer = {output_id: Totals() for output_id in output_ids}
    if not output_ids:
        return answer
    rows = await session.execute(
        select(
            Delivery.output_id,
            func.coalesce(func.sum(Delivery.event_count), 0),
            func.coalesce(func.sum(_drop_count(session)), 0),
            func.count(),
        )
        .where(Delivery.output_id.in_(list(output_ids)), Delivery.created_at >= since)
        .group_by(Delivery.output_id)
    )
    for output_id, forwarded, dropped, deliveries in rows:
        answer[output_id] = Totals(int(forwarded), int(dropped), int(deliveries))
    return answer


async def hourly(
    session: AsyncSession,
    output_ids: Sequence[str],
    *,
    now: datetime,
    hours: int = 24,
) -> list[HourCount]:
    """Forwarded and dropped per UTC hour by these outputs together, oldest first:
    ``hours`` buckets, the last being the hour ``now`` is in (so far). Hours without
    deliveries are zeros."""
    if hours < 1:
        raise ValueError("hours must be at least 1")
    first = floor_hour(now) - (hours - 1) * HOUR
    key = _hour_key(session)
    statement = select(
        key,
        func.coalesce(func.sum(Delivery.event_count), 0),
        func.coalesce(func.sum(_drop_count(session)), 0),
    ).where(Delivery.output_id.in_(list(output_ids)), Delivery.created_at >= first)
    found: dict[str, tuple[int, int]] = {}
    if output_ids:
        rows = await session.execute(statement.group_by(key))
        found = {str(hour): (int(forwarded), int(dropped)) for hour, forwarded, dropped in rows}
    buckets = []
    for position in range(hours):
        start = first + position * HOUR
        forwarded, dropped = found.get(start.strftime(_HOUR_KEY), (0, 0))
        buckets.append(HourCount(start=start, forwarded=forwarded, dropped=dropped))
    return buckets


async def drop_reasons(
    session: AsyncSession, output_ids: Sequence[str], *, since: datetime
) -> list[tuple[str, int]]:
    """``(reason, count)`` of the events these outputs' batches dropped since ``since``,
    most first."""
    if not output_ids:
        return []
    array = _dropped_array(session)
    if _postgres(session):
        items = func.jsonb_array_elements(array).table_valued("value", joins_implicitly=True)
        reason: ColumnElement[Any] = func.jsonb_extract_path_text(items.c.value, "reason")
    else:
        items = func.json_each(array).table_valued("value", joins_implicitly=True)
        reason = func.json_extract(items.c.value, "$.reason")
    label = func.coalesce(reason, "unknown").label("reason")
    statement = (
        select(label, func.count().label("events"))
        .select_from(Delivery)
        .join(items, true())
        .where(Delivery.output_id.in_(list(output_ids)), Delivery.created_at >= since)
    )
    rows = await session.execute(statement.group_by(label).order_by(func.count().desc(), label))
    return [(str(name), int(count)) for name, count in rows]
