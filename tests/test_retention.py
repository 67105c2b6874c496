"""Retention pruning: delivered rows go after RELAY_RETENTION_DAYS, in small batches."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db.base import utcnow
from app.db.models import Delivery, DeliveryStatus
from app.delivery.retention import prune_once


async def _queue(session: AsyncSession, output_id: str, count: int) -> list[str]:
    items = [
        repo.NewDelivery(
            output_id=output_id, source="mparticle", body=b'{"events":[]}', index_map=[0]
        )
        for _ in range(count)
    ]
    return await repo.insert_deliveries(session, items)


async def test_prune_removes_only_old_delivered_rows(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    now = utcnow()
    async with sessionmaker() as session, session.begin():
        output = await repo.create_output(session, name="o", advertiser_id="1")
        old_delivered = await _queue(session, output.id, 7)
        old_dead = await _queue(session, output.id, 2)
        recent_delivered = await _queue(session, output.id, 3)
        pending = await _queue(session, output.id, 2)
        ten_days_ago = now - timedelta(days=10)
        for ids, status, when in (
            (old_delivered, DeliveryStatus.DELIVERED, ten_days_ago),
            (old_dead, DeliveryStatus.DEAD, ten_days_ago),
            (recent_delivered, DeliveryStatus.DELIVERED, now - timedelta(days=1)),
            (pending, DeliveryStatus.PENDING, ten_days_ago),
        ):
            await session.execute(
                update(Delivery).where(Delivery.id.in_(ids)).values(status=status, updated_at=when)
            )

    deleted = await prune_once(sessionmaker, 7, now=now, batch_size=3)

    assert deleted == 7  # in batches of 3: 3 + 3 + 1
    async with sessionmaker() as session:
        left = {d.id for d in await repo.list_deliveries(session, limit=1000)}
    assert left == set(old_dead) | set(recent_delivered) | set(pending)


async def test_prune_removes_old_records_of_all_dropped_batches(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    now = utcnow()
    drops = [{"index": 0, "reason": "unmapped_event"}]
    async with sessionmaker() as session, session.begin():
        output = await repo.create_output(session, name="o", advertiser_id="1")
        for when in [now - timedelta(days=10)] * 5 + [now - timedelta(days=1)] * 2:
            await repo.record_dropped_batch(
                session, output_id=output.id, source="mparticle", dropped=drops, now=when
            )

    # No delivery is old enough to go: the loop must still go on while drop records do.
    await prune_once(sessionmaker, 7, now=now, batch_size=2)

    async with sessionmaker() as session:
        left = await repo.recent_dropped_batches(session, output.id, limit=100)
    assert len(left) == 2
    assert all(now - row.created_at < timedelta(days=2) for row in left)
