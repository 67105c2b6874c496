"""Single statements outside a transaction (app/db/session.create_autocommit_sessionmaker),
on both backends: an outcome written that way is durable at once, a read that way holds
no transaction open, and a single ingested batch is exactly one statement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from e2e_helpers import sdk_batch
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db.hot import BatchWriter, SessionStatements, hot_statements
from app.db.models import DeliveryStatus
from app.db.session import create_autocommit_sessionmaker
from app.ingest import settings_for, store_batch
from app.pipeline import prepare_batch

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


async def _leased_delivery(sessionmaker: async_sessionmaker[AsyncSession]) -> str:
    async with sessionmaker() as session, session.begin():
        output = await repo.create_output(session, name="Shop", advertiser_id="123456", now=T0)
        item = repo.NewDelivery(
            output_id=output.id, source="mparticle", body=b'{"events":[]}', index_map=[0]
        )
        lease = repo.Lease("worker-1", T0 + timedelta(seconds=60), 1)
        rows = await repo.insert_delivery_rows(session, [item], now=T0, lease=lease)
    return str(rows[0]["id"])


async def test_an_outcome_written_without_a_transaction_is_there_at_once(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    delivery_id = await _leased_delivery(sessionmaker)
    autocommit = create_autocommit_sessionmaker(engine)
    async with autocommit() as session, session.begin():
        held = await repo.complete(
            session,
            delivery_id,
            worker_id="worker-1",
            now=T0,
            status=DeliveryStatus.DELIVERED,
            status_code=207,
            results=[{"index": 0, "status": "ok"}],
        )
        assert held
        # Another connection sees it before this block ends: it committed on its own.
        async with sessionmaker() as other:
            (seen,) = await repo.get_deliveries(other, [delivery_id])
            assert seen.status == DeliveryStatus.DELIVERED
    # The lease check still holds: another worker's outcome is not written.
    async with autocommit() as session, session.begin():
        assert not await repo.complete(
            session, delivery_id, worker_id="worker-2", now=T0, status=DeliveryStatus.FAILED
        )
    async with sessionmaker() as session:
        (seen,) = await repo.get_deliveries(session, [delivery_id])
        assert seen.status == DeliveryStatus.DELIVERED
        assert seen.results == [{"index": 0, "status": "ok"}]


async def test_a_read_without_a_transaction_does_not_hold_one_open(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    delivery_id = await _leased_delivery(sessionmaker)
    autocommit = create_autocommit_sessionmaker(engine)
    async with autocommit() as reader:
        (first,) = await repo.get_deliveries(reader, [delivery_id])
        assert first.status == DeliveryStatus.IN_FLIGHT
        # A writer commits while the reading session is still open (SQLite: with a read
        # transaction open this reader would keep its old snapshot).
        async with sessionmaker() as writer, writer.begin():
            assert await repo.complete(
                writer,
                delivery_id,
                worker_id="worker-1",
                now=T0,
                status=DeliveryStatus.DELIVERED,
            )
        reader.expunge_all()
        (again,) = await repo.get_deliveries(reader, [delivery_id])
        assert again.status == DeliveryStatus.DELIVERED


# --- ingest: one batch, one statement ---------------------------------------------------


DROPPED_ONLY = {"events": [{"event_type": "custom_event", "data": {"event_name": "x"}}]}


@pytest.mark.parametrize(
    ("payload", "requests"),
    [
        (sdk_batch([1, 2]), 1),  # the usual batch: one Events API request
        (DROPPED_ONLY, 0),  # every event dropped: the record of the drops
    ],
)
async def test_the_ingest_stores_a_single_batch_with_one_statement(
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    payload: dict[str, Any],
    requests: int,
) -> None:
    """The ingest writes a one-request (or all-dropped) batch outside a transaction
    (app/api/ingest._accept), which is only all-or-nothing because ``store_batch`` makes
    exactly one statement of it: this holds it to that, through the backend's own hot
    statements (asyncpg directly on PostgreSQL) and through the session statements
    (whose SQL is counted)."""
    async with sessionmaker() as session, session.begin():
        output = await repo.create_output(session, name="Shop", advertiser_id="123456", now=T0)
        created = await repo.create_connection(
            session, output_id=output.id, source="mparticle", name="web"
        )
    now = datetime.now(UTC)  # the SDK's events are stamped now
    prepared = prepare_batch(
        payload, "mparticle", settings=settings_for(output, created.connection.id), now=now
    )
    assert len(prepared.bodies) == requests
    autocommit = create_autocommit_sessionmaker(engine)

    class Counting:
        """A BatchWriter that counts its calls (each is one statement by contract)."""

        def __init__(self, inner: BatchWriter) -> None:
            self.inner = inner
            self.calls: list[str] = []

        async def insert_deliveries(self, rows: Sequence[Mapping[str, Any]]) -> None:
            self.calls.append("insert_deliveries")
            await self.inner.insert_deliveries(rows)

        async def record_dropped_batch(self, row: Mapping[str, Any]) -> None:
            self.calls.append("record_dropped_batch")
            await self.inner.record_dropped_batch(row)

    hot = hot_statements(engine, autocommit)
    writer = Counting(hot)
    try:
        summary = await store_batch(
            writer, prepared, output=output, connection=created.connection, now=now
        )
    finally:
        await hot.aclose()
    assert writer.calls == (["insert_deliveries"] if requests else ["record_dropped_batch"])
    assert len(summary.deliveries) == requests
    async with sessionmaker() as session:
        stored = await repo.get_deliveries(session, summary.deliveries)
        dropped = await repo.recent_dropped_batches(session, output.id)
    assert [d.id for d in stored] == summary.deliveries
    assert len(dropped) == (0 if requests else 1)

    # The session statements (an in-memory SQLite database's): exactly one SQL statement.
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        again = await store_batch(
            SessionStatements(autocommit),
            prepared,
            output=output,
            connection=created.connection,
            now=now,
        )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert len(statements) == 1, statements
    assert statements[0].lstrip().upper().startswith("INSERT")
    assert len(again.deliveries) == requests
