"""Retention: delivered requests are pruned after RELAY_RETENTION_DAYS, a little at a time.

Small batches in short transactions keep locks and the write-ahead log short, so
pruning never holds up ingest: ingest only inserts new rows and the dispatcher claims
only queued ones, while pruning deletes finished rows. Failed and dead deliveries are
kept (an operator may still retry them), as are deliveries still queued.

Every relay process runs this loop. On PostgreSQL each batch first takes a
transaction-scoped advisory lock without waiting: if another process holds it, that
process is pruning, and this one leaves the round to it instead of queueing behind its
row locks to delete rows that are already gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db.base import utcnow
from app.logs import get_logger

log = get_logger(__name__)

INTERVAL_SECONDS = 300.0
BATCH_SIZE = 500
PAUSE_BETWEEN_BATCHES = 0.05
# Distinct from the migration lock (app.db.migrate.ADVISORY_LOCK_ID): "relayret" in ASCII.
PRUNE_LOCK_ID: Final = 0x72656C6179726574


async def _pruning_is_ours(session: AsyncSession) -> bool:
    """On PostgreSQL, whether this transaction got the pruning lock (never waits)."""
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite has one writer at a time anyway
    got = await session.scalar(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": PRUNE_LOCK_ID})
    return bool(got)


async def prune_once(
    sessionmaker: async_sessionmaker[AsyncSession],
    retention_days: int,
    *,
    now: datetime,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Delete delivered rows older than the retention, batch by batch; returns how many
    this call deleted (0 when another process was pruning)."""
    cutoff = now - timedelta(days=retention_days)
    total = 0
    while True:
        async with sessionmaker() as session, session.begin():
            if not await _pruning_is_ours(session):
                break
            deleted = await repo.prune_delivered(session, cutoff, batch_size)
            # Records of all-dropped batches age out with the deliveries they stand for.
            deleted_drops = await repo.prune_dropped_batches(session, cutoff, batch_size)
        total += deleted
        if deleted < batch_size and deleted_drops < batch_size:
            break
        await asyncio.sleep(PAUSE_BETWEEN_BATCHES)
    async with sessionmaker() as session, session.begin():
        await repo.prune_oauth_states(session, older_than=now - timedelta(days=1))
    return total


async def prune_forever(
    sessionmaker: async_sessionmaker[AsyncSession],
    retention_days: int,
    *,
    interval: float = INTERVAL_SECONDS,
    clock: Callable[[], datetime] = utcnow,
) -> None:
    while True:
        try:
            deleted = await prune_once(sessionmaker, retention_days, now=clock())
        except Exception as error:  # the database may be away for a while: try next time
            # The first line only: SQLAlchemy appends the statement and its parameters.
            first_line = (str(error).splitlines() or [""])[0][:200]
            log.warning("retention_failed", error=type(error).__name__, detail=first_line)
        else:
            if deleted:
                log.info("retention_pruned", deliveries=deleted, days=retention_days)
        await asyncio.sleep(interval)
