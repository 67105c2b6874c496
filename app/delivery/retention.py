"""Retention: delivered requests are pruned after RELAY_RETENTION_DAYS, a little at a time.

Small batches in short transactions keep locks and the write-ahead log short, so
pruning never holds up ingest. Failed and dead deliveries are kept (an operator may
still retry them), as are deliveries still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db.base import utcnow
from app.logs import get_logger

log = get_logger(__name__)

INTERVAL_SECONDS = 300.0
BATCH_SIZE = 500
PAUSE_BETWEEN_BATCHES = 0.05


async def prune_once(
    sessionmaker: async_sessionmaker[AsyncSession],
    retention_days: int,
    *,
    now: datetime,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Delete delivered rows older than the retention, batch by batch; returns how many."""
    cutoff = now - timedelta(days=retention_days)
    total = 0
    while True:
        async with sessionmaker() as session, session.begin():
            deleted = await repo.prune_delivered(session, cutoff, batch_size)
        total += deleted
        if deleted < batch_size:
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
        with contextlib.suppress(Exception):  # the database may be away; try next time
            deleted = await prune_once(sessionmaker, retention_days, now=clock())
            if deleted:
                log.info("retention_pruned", deliveries=deleted, days=retention_days)
        await asyncio.sleep(interval)
