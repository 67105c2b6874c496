"""A 413 splits a delivery in two, but only for the process that still holds its lease.

The dispatcher's ``_split`` is called directly: it needs only the database, and the
case it guards (a process whose lease ran out while Amazon answered 413, and another
process that claimed the delivery since) is hard to stage through HTTP.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db.models import Delivery, OutputStatus
from app.delivery.dispatcher import Dispatcher, DispatcherConfig

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LEASE = 60


def dispatcher(
    sessionmaker: async_sessionmaker[AsyncSession], worker_id: str, now: datetime
) -> Dispatcher:
    config = DispatcherConfig(client_id="c", max_age_seconds=86_400, lease_seconds=LEASE)
    unused: Any = None  # _split sends nothing: no HTTP client, tokens or endpoints
    return Dispatcher(
        sessionmaker, unused, unused, unused, config, clock=lambda: now, worker_id=worker_id
    )


async def test_only_the_lease_holder_splits(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    body = orjson.dumps({"events": [{"eventId": str(n)} for n in range(4)]})
    async with sessionmaker() as session:
        output = await repo.create_output(session, name="Shop", advertiser_id="1", now=T0)
        await repo.set_status(session, output.id, OutputStatus.CONFIGURED, now=T0)
        new = repo.NewDelivery(
            output_id=output.id, source="mparticle", body=body, index_map=[0, 1, 2, 3]
        )
        (delivery_id,) = await repo.insert_deliveries(session, [new], now=T0)
        await session.commit()
        (first,) = await repo.claim_due(session, "first", 1, T0, LEASE)
        await session.commit()
    # The first holder's lease ran out, and a second process claimed the delivery.
    later = T0 + timedelta(seconds=LEASE + 1)
    async with sessionmaker() as session:
        (second,) = await repo.claim_due(session, "second", 1, later, LEASE)
        await session.commit()

    async def rows() -> list[Delivery]:
        async with sessionmaker() as session:
            found = list(await repo.list_deliveries(session, limit=10))
            for delivery in found:
                await session.refresh(delivery, ["body"])  # deferred in listings
            return found

    await dispatcher(sessionmaker, "first", later)._split(first)
    assert [(d.id, d.event_count) for d in await rows()] == [(delivery_id, 4)]  # untouched

    await dispatcher(sessionmaker, "second", later)._split(second)
    halves = {d.id: d for d in await rows()}
    assert sorted(d.event_count for d in halves.values()) == [2, 2]
    assert halves[delivery_id].index_map == [0, 1]
    (other,) = [d for d in halves.values() if d.id != delivery_id]
    assert other.index_map == [2, 3]
    assert orjson.loads(other.body) == {"events": [{"eventId": "2"}, {"eventId": "3"}]}
