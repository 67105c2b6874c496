"""Read-only counts for the web UI: events forwarded and dropped, per output and per hour.

"Forwarded" is the sum of ``event_count`` over the deliveries created in the window
(events queued for Amazon). "Dropped" adds up the two places a batch's drops are kept,
each batch being in exactly one of them (app/ingest.py): the ``dropped`` JSON of its
first delivery, or, for a batch whose every event was dropped and that therefore has no
delivery, its ``dropped_batches`` row (docs/decisions/0011-drop-records.md).

The JSON functions differ by backend (SQLite's JSON1, PostgreSQL's jsonb); a delivery's
``dropped`` may hold SQL NULL or a JSON ``null``, which both count as no drops. Every
query is bounded by ``created_at`` and uses the table's ``(output_id, created_at)``
index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, case, cast, func, literal, select, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.db.models import Delivery, DeliveryStatus, DroppedBatch, Output

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
    """A delivery's ``dropped`` when it is a JSON array, else an empty array (never NULL)."""
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


def _hour_key(session: AsyncSession, created_at: InstrumentedAttribute[datetime]) -> Any:
    if _postgres(session):
        return func.to_char(func.timezone("UTC", created_at), 'YYYY-MM-DD"T"HH24')
    # SQLite stores the UTC time as text (app.db.base.UTCDateTime).
    return func.strftime(_HOUR_KEY, created_at)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def totals_by_output(
    session: AsyncSession, output_ids: Sequence[str], *, since: datetime
) -> dict[str, Totals]:
    """Per output: events forwarded and dropped by the batches accepted since ``since``,
    and the deliveries made of them.

    Every id asked for is in the answer (zeros when it has none).
    """
    if not output_ids:
        return {}
    ids = list(output_ids)
    delivery_rows = await session.execute(
        select(
            Delivery.output_id,
            func.coalesce(func.sum(Delivery.event_count), 0),
            func.coalesce(func.sum(_drop_count(session)), 0),
            func.count(),
        )
        .where(Delivery.output_id.in_(ids), Delivery.created_at >= since)
        .group_by(Delivery.output_id)
    )
    answer = {output_id: Totals() for output_id in ids}
    for output_id, forwarded, dropped, deliveries in delivery_rows:
        answer[output_id] = Totals(int(forwarded), int(dropped), int(deliveries))
    batch_rows = await session.execute(
        select(DroppedBatch.output_id, func.sum(DroppedBatch.dropped_count))
        .where(DroppedBatch.output_id.in_(ids), DroppedBatch.created_at >= since)
        .group_by(DroppedBatch.output_id)
    )
    for output_id, dropped in batch_rows:
        found = answer[output_id]
        answer[output_id] = Totals(found.forwarded, found.dropped + int(dropped), found.deliveries)
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
    events are zeros."""
    if hours < 1:
        raise ValueError("hours must be at least 1")
    first = floor_hour(now) - (hours - 1) * HOUR
    forwarded: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    if output_ids:
        ids = list(output_ids)
        delivery_hour = _hour_key(session, Delivery.created_at)
        rows = await session.execute(
            select(
                delivery_hour,
                func.coalesce(func.sum(Delivery.event_count), 0),
                func.coalesce(func.sum(_drop_count(session)), 0),
            )
            .where(Delivery.output_id.in_(ids), Delivery.created_at >= first)
            .group_by(delivery_hour)
        )
        for hour, events, drops in rows:
            forwarded[str(hour)] += int(events)
            dropped[str(hour)] += int(drops)
        batch_hour = _hour_key(session, DroppedBatch.created_at)
        rows = await session.execute(
            select(batch_hour, func.sum(DroppedBatch.dropped_count))
            .where(DroppedBatch.output_id.in_(ids), DroppedBatch.created_at >= first)
            .group_by(batch_hour)
        )
        for hour, drops in rows:
            dropped[str(hour)] += int(drops)
    buckets = []
    for position in range(hours):
        start = first + position * HOUR
        key = start.strftime(_HOUR_KEY)
        buckets.append(HourCount(start=start, forwarded=forwarded[key], dropped=dropped[key]))
    return buckets


async def _reasons(
    session: AsyncSession,
    array: ColumnElement[Any] | InstrumentedAttribute[Any],
    table: Any,
    where: Sequence[ColumnElement[bool]],
) -> Counter[str]:
    """How many entries of the JSON array ``array`` of ``table``'s rows have each reason."""
    if _postgres(session):
        items = func.jsonb_array_elements(array).table_valued("value", joins_implicitly=True)
        reason: ColumnElement[Any] = func.jsonb_extract_path_text(items.c.value, "reason")
    else:
        items = func.json_each(array).table_valued("value", joins_implicitly=True)
        reason = func.json_extract(items.c.value, "$.reason")
    label = func.coalesce(reason, "unknown").label("reason")
    rows = await session.execute(
        select(label, func.count())
        .select_from(table)
        .join(items, true())
        .where(*where)
        .group_by(label)
    )
    return Counter({str(name): int(count) for name, count in rows})


async def drop_reasons(
    session: AsyncSession, output_ids: Sequence[str], *, since: datetime
) -> list[tuple[str, int]]:
    """``(reason, count)`` of the events these outputs' batches dropped since ``since``,
    most first."""
    if not output_ids:
        return []
    ids = list(output_ids)
    counts = await _reasons(
        session,
        _dropped_array(session),
        Delivery,
        [Delivery.output_id.in_(ids), Delivery.created_at >= since],
    )
    counts += await _reasons(
        session,
        DroppedBatch.dropped,
        DroppedBatch,
        [DroppedBatch.output_id.in_(ids), DroppedBatch.created_at >= since],
    )
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


async def dead_deliveries(session: AsyncSession) -> int:
    """How many deliveries are dead (ran out of time; an admin may retry them)."""
    count = await session.scalar(
        select(func.count()).select_from(Delivery).where(Delivery.status == DeliveryStatus.DEAD)
    )
    return int(count or 0)


async def outputs_by_status(session: AsyncSession) -> dict[str, int]:
    """The number of outputs in each status (statuses with none are absent)."""
    rows = await session.execute(select(Output.status, func.count()).group_by(Output.status))
    return {str(status): int(count) for status, count in rows.all()}
