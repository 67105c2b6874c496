"""Accepting an inbound batch: map it and queue its deliveries in one transaction.

Either every Events API request of the batch is durably queued (or, when every event
was dropped, the record of that), or (any error) nothing is: the caller's transaction
commits after this returns, and the client is answered only after the commit.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession

from app.amazon.settings import OutputSettings
from app.db import repository as repo
from app.db.hot import BatchWriter, SessionWriter
from app.db.models import Connection, Output
from app.pipeline import PreparedBatch, prepare_batch

if TYPE_CHECKING:
    from app.delivery.dispatcher import Handoff


@dataclass(slots=True)
class BatchSummary:
    received: int
    accepted: int
    dropped: list[dict[str, Any]]
    deliveries: list[str]
    custom_data_skipped: int = 0
    drop_reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "dropped": self.dropped, "deliveries": self.deliveries}


@functools.lru_cache(maxsize=512)
def _settings(output_id: str, updated_at: datetime, connection_id: str, raw: str) -> OutputSettings:
    # Keyed by the output's updated_at: an edited output gets freshly validated settings.
    return OutputSettings.from_mapping({**orjson.loads(raw), "connection_id": connection_id})


def settings_for(output: Output, connection_id: str) -> OutputSettings:
    raw = orjson.dumps(output.mapping_settings()).decode()
    return _settings(output.id, output.updated_at, connection_id, raw)


async def accept_batch(
    session: AsyncSession,
    *,
    output: Output,
    connection: Connection,
    payload: Any,
    now: datetime,
    handoff: Handoff | None = None,
) -> BatchSummary:
    """Map ``payload`` (already decoded) and queue one delivery per Amazon request.

    With ``handoff``, as many deliveries as this process's dispatcher has free slots for
    are queued already leased to it, for it to send after the commit (no claim needed).
    """
    settings = settings_for(output, connection.id)
    prepared = prepare_batch(payload, connection.source, settings=settings, now=now)
    return await store_batch(
        SessionWriter(session),
        prepared,
        output=output,
        connection=connection,
        now=now,
        handoff=handoff,
    )


async def store_batch(
    writer: BatchWriter,
    prepared: PreparedBatch,
    *,
    output: Output,
    connection: Connection,
    now: datetime,
    handoff: Handoff | None = None,
) -> BatchSummary:
    """Queue a batch mapped by ``prepare_batch`` (``accept_batch``'s second half).

    ``writer`` is a ``SessionWriter`` inside the caller's transaction, or, for a batch
    that is one statement, the runtime's ``HotStatements``.
    """
    source = connection.source
    dropped = prepared.dropped
    items = [
        repo.NewDelivery(
            output_id=output.id,
            source=source,
            body=body,
            index_map=index_map,
            connection_id=connection.id,
            # The batch's drops are kept with its first request, for the deliveries view
            # and the drop counts (app/db/stats.py).
            dropped=dropped if position == 0 else None,
        )
        for position, (body, index_map) in enumerate(
            zip(prepared.bodies, prepared.index_maps, strict=True)
        )
    ]
    lease = handoff.lease(len(items), now) if handoff is not None and items else None
    rows = repo.delivery_rows(items, now=now, lease=lease)
    if rows:
        await writer.insert_deliveries(rows)
    if handoff is not None and lease is not None:
        handoff.add(rows[: lease.count])
    ids = [row["id"] for row in rows]
    if not ids and dropped:
        # No request, so no first request to keep the drops: the batch's only trace.
        # Only here, so a batch with deliveries costs no extra statement while it holds
        # SQLite's write lock (docs/decisions/0011-drop-records.md).
        await writer.record_dropped_batch(
            repo.dropped_batch_row(
                output_id=output.id,
                connection_id=connection.id,
                source=source,
                dropped=dropped,
                now=now,
            )
        )
    return BatchSummary(
        received=prepared.forwarded + len(dropped),
        accepted=prepared.forwarded,
        dropped=dropped,
        deliveries=ids,
        custom_data_skipped=prepared.custom_data_skipped,
        drop_reasons=prepared.drop_reasons,
    )
