"""Outcomes the dispatcher writes that are hard to stage through HTTP and the emulator.

``_split`` and ``_retry`` are called directly: they need only the database. A 413
splits a delivery in two, but only for the process that still holds its lease; a
delivery given up after a 207 keeps what Amazon said of each event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.amazon.results import Reading, Verdict
from app.db import repository as repo
from app.db.models import Delivery, OutputStatus
from app.delivery.dispatcher import Dispatcher, DispatcherConfig

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LEASE = 60
MAX_AGE = 86_400


def dispatcher(
    sessionmaker: async_sessionmaker[AsyncSession], worker_id: str, now: datetime
) -> Dispatcher:
    config = DispatcherConfig(client_id="c", max_age_seconds=MAX_AGE, lease_seconds=LEASE)
    unused: Any = None  # _split sends nothing: no HTTP client, tokens or endpoints
    return Dispatcher(
        sessionmaker, unused, unused, unused, config, clock=lambda: now, worker_id=worker_id
    )


async def queued(sessionmaker: async_sessionmaker[AsyncSession], events: int) -> str:
    """A delivery of ``events`` events (index_map 0…), due at T0; its id."""
    body = orjson.dumps({"events": [{"eventId": str(n)} for n in range(events)]})
    async with sessionmaker() as session:
        output = await repo.create_output(session, name="Shop", advertiser_id="1", now=T0)
        await repo.set_status(session, output.id, OutputStatus.CONFIGURED, now=T0)
        new = repo.NewDelivery(
            output_id=output.id, source="mparticle", body=body, index_map=list(range(events))
        )
        (delivery_id,) = await repo.insert_deliveries(session, [new], now=T0)
        await session.commit()
        return str(delivery_id)


async def claimed(
    sessionmaker: async_sessionmaker[AsyncSession], worker_id: str, now: datetime
) -> Delivery:
    """The one due delivery, claimed by ``worker_id`` at ``now``."""
    async with sessionmaker() as session:
        (delivery,) = await repo.claim_due(session, worker_id, 1, now, LEASE)
        await session.commit()
        return delivery


async def rows(sessionmaker: async_sessionmaker[AsyncSession]) -> list[Delivery]:
    async with sessionmaker() as session:
        found = list(await repo.list_deliveries(session, limit=10))
        for delivery in found:
            await session.refresh(delivery, ["body"])  # deferred in listings
        return found


async def test_only_the_lease_holder_splits(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    delivery_id = await queued(sessionmaker, 4)
    first = await claimed(sessionmaker, "first", T0)
    # The first holder's lease ran out, and a second process claimed the delivery.
    later = T0 + timedelta(seconds=LEASE + 1)
    second = await claimed(sessionmaker, "second", later)

    await dispatcher(sessionmaker, "first", later)._split(first)
    untouched = [(delivery_id, 4)]
    assert [(d.id, d.event_count) for d in await rows(sessionmaker)] == untouched

    await dispatcher(sessionmaker, "second", later)._split(second)
    halves = {d.id: d for d in await rows(sessionmaker)}
    assert sorted(d.event_count for d in halves.values()) == [2, 2]
    assert halves[delivery_id].index_map == [0, 1]
    (other,) = [d for d in halves.values() if d.id != delivery_id]
    assert other.index_map == [2, 3]
    assert orjson.loads(other.body) == {"events": [{"eventId": "2"}, {"eventId": "3"}]}


async def test_a_delivery_given_up_after_a_207_keeps_what_amazon_said(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    delivery_id = await queued(sessionmaker, 3)
    held = await claimed(sessionmaker, "w", T0)
    # Amazon accepted events 0 and 2 and throttled 1, after RELAY_DELIVERY_MAX_AGE.
    too_late = T0 + timedelta(seconds=MAX_AGE + 1)
    reading = Reading(Verdict.RETRY, pending_positions=[1], error="throttled")
    said = [{"index": 0, "status": "ok"}, {"index": 2, "status": "ok"}]
    await dispatcher(sessionmaker, "w", too_late)._retry(
        held, 207, reading, results=said, error="throttled"
    )
    (dead,) = await rows(sessionmaker)
    assert (dead.id, dead.status, dead.last_status_code) == (delivery_id, "dead", 207)
    assert dead.results == said
    # An admin's retry would send only the throttled event.
    assert (dead.index_map, dead.event_count) == ([1], 1)
    assert orjson.loads(dead.body) == {"events": [{"eventId": "1"}]}
