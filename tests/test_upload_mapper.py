"""``relay upload`` in database mode with its mapper process (DatabaseSink's ``mapper``).

Batches are mapped in another process with the output's settings as of the previous
batch; what is queued must be what ``accept_batch`` would have queued in the batch's own
transaction, including after the output's settings change in the middle of a file.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select
from test_upload import csv_text, new_output

from app import upload
from app.db import repository as repo
from app.db.models import Delivery
from app.db.session import create_engine, create_sessionmaker
from app.upload import BatchOutcome, DatabaseSink, UploadOptions, stream_upload


@pytest.fixture(scope="module")
def mapper() -> Any:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@asynccontextmanager
async def sink_for(
    database_url: str, output_id: str, mapper: Executor | None
) -> AsyncIterator[DatabaseSink]:
    engine = create_engine(database_url)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session, session.begin():
            connection_id, _ = await upload.upload_connection(session, output_id)
        yield DatabaseSink(sessionmaker, output_id, connection_id, mapper=mapper)
    finally:
        await engine.dispose()


async def queued(database_url: str) -> list[tuple[list[int], list[Any], Any]]:
    """(index map, events, drops) of every delivery, in the order they were queued."""
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            rows = (await session.scalars(select(Delivery).order_by(Delivery.created_at))).all()
            return [(d.index_map, orjson.loads(d.body)["events"], d.dropped) for d in rows]
    finally:
        await engine.dispose()


async def test_mapped_in_the_worker_equals_mapped_in_the_transaction(
    database_url: str, tmp_path: Path, mapper: Executor
) -> None:
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(1_300, bad_every=97))
    results = []
    for worker in (None, mapper):
        output_id = await new_output(database_url)
        async with sink_for(database_url, output_id, worker) as sink:
            report = await stream_upload(
                UploadOptions(file, output_id=output_id, restart=True, concurrency=3), sink
            )
        assert report.complete
        assert report.error is None
        results.append((report.totals.as_dict(), upload.rejects_path(file).read_bytes()))
    assert results[0] == results[1]
    assert results[0][0]["forwarded"] == 1_287
    # Both outputs' deliveries: the same requests, the same drops (the connection, and
    # so the deterministic eventIds, differ per output: compare all but the ids).
    deliveries = await queued(database_url)
    assert len(deliveries) == 6

    def without_ids(delivery: tuple[list[int], list[Any], Any]) -> Any:
        index_map, events, dropped = delivery
        return index_map, [{**e, "eventId": None} for e in events], dropped

    by_output = [deliveries[:3], deliveries[3:]]
    assert [without_ids(d) for d in by_output[0]] == [without_ids(d) for d in by_output[1]]


class ChangeAfterFirst:
    """A sink that runs ``change`` (a database edit) once its first batch is queued."""

    def __init__(self, sink: DatabaseSink, database_url: str, change: Any) -> None:
        self._sink = sink
        self._database_url = database_url
        self._change = change
        self.target = sink.target
        self.connection_id = sink.connection_id
        self.sent = 0

    async def send(self, records: list[Any]) -> BatchOutcome:
        outcome = await self._sink.send(records)
        self.sent += 1
        if self.sent == 1:
            engine = create_engine(self._database_url)
            try:
                async with create_sessionmaker(engine)() as session, session.begin():
                    await self._change(session, self._sink)
            finally:
                await engine.dispose()
        return outcome


async def deactivate(session: Any, sink: DatabaseSink) -> None:
    await repo.update_connection(session, str(sink.connection_id), {"active": False})


async def delete(session: Any, sink: DatabaseSink) -> None:
    await repo.delete_output(session, sink.output_id)


def edit(changes: dict[str, Any]) -> Any:
    async def change(session: Any, sink: DatabaseSink) -> None:
        await repo.update_output(session, sink.output_id, changes)

    return change


async def test_settings_changed_between_batches_are_used_at_once(
    database_url: str, tmp_path: Path, mapper: Executor
) -> None:
    """The second batch was mapped (in the worker) with the first batch's settings; its
    transaction sees the edit and maps it again with the new ones."""
    output_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(40))
    async with sink_for(database_url, output_id, mapper) as sink:
        editing = ChangeAfterFirst(sink, database_url, edit({"data_set_name": "crm_import"}))
        report = await stream_upload(
            UploadOptions(file, output_id=output_id, batch_size=10, concurrency=1), editing
        )
    assert report.complete
    assert report.totals.forwarded == 40
    batches = [events for _, events, _ in await queued(database_url)]
    assert [len(events) for events in batches] == [10, 10, 10, 10]
    assert all("dataSetName" not in e["eventDescription"] for e in batches[0])
    assert all(e["eventDescription"]["dataSetName"] == "crm_import" for e in batches[1])
    assert all(e["eventDescription"]["dataSetName"] == "crm_import" for e in batches[3])


async def test_a_lost_mapper_stops_the_upload_resumably(database_url: str, tmp_path: Path) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(30))
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pool.shutdown()
    async with sink_for(database_url, output_id, pool) as sink:
        options = UploadOptions(file, output_id=output_id, batch_size=10, concurrency=1)
        report = await stream_upload(options, sink)
    # The first batch is mapped in its transaction (the sink has no settings yet); the
    # next one needs the mapper, which is gone: the run stops with an error, resumable.
    assert not report.complete
    assert report.error is not None
    point = upload.load_checkpoint(upload.checkpoint_path(file))
    assert point is not None
    assert point.rows_done == 10


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (deactivate, "the 'relay upload' connection is gone or inactive"),
        (delete, "no longer exists"),
    ],
)
async def test_a_connection_deactivated_or_an_output_deleted_stops_the_upload(
    database_url: str, tmp_path: Path, mapper: Executor, change: Any, error: str
) -> None:
    """Each batch reads the connection and its output again (one query once the
    connection's key is known): a change between batches stops the next one."""
    output_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(30))
    async with sink_for(database_url, output_id, mapper) as sink:
        report = await stream_upload(
            UploadOptions(file, output_id=output_id, batch_size=10, concurrency=1),
            ChangeAfterFirst(sink, database_url, change),
        )
    assert not report.complete
    assert report.error is not None
    assert error in report.error
    assert report.totals.rows == 10
