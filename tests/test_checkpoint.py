"""SQLite's log is checkpointed by a thread of its own (app/db/checkpoint.py), not inside
the relay's commits: the writer's commits only append to the log, the checkpointer
copies it back into the database file soon after, and the log stays bounded."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import checkpoint
from app.db.hot import checkpointed_writer
from app.db.session import create_engine

PAGE = 4096
BLOB = 50 * PAGE  # 50 pages a row: 30 rows pass SQLite's own checkpoint line (1,000)
ROWS = 30


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    path = tmp_path / "relay.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        yield engine
    finally:
        await engine.dispose()


def _insert(row_id: int) -> Callable[[Connection], None]:
    def insert(connection: Connection) -> None:
        connection.execute(
            text("INSERT INTO blobs (id, body) VALUES (:id, randomblob(:size))"),
            {"id": row_id, "size": BLOB},
        )

    return insert


def _database_file(engine: AsyncEngine) -> Path:
    assert engine.url.database is not None
    return Path(engine.url.database)


def _wal(engine: AsyncEngine) -> Path:
    return Path(f"{_database_file(engine)}-wal")


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10.0
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_writers_commits_never_checkpoint_below_the_backstop(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpointer is kept from running: what lands in the database file now could
    # only have been copied there by a commit.
    monkeypatch.setattr(checkpoint.Checkpointer, "written", lambda self: None)
    grouped, checkpointer = checkpointed_writer(engine)
    try:
        for row_id in range(ROWS):
            await grouped.run(_insert(row_id))
        assert _database_file(engine).stat().st_size < 20 * PAGE  # the table's rows are not there
        assert _wal(engine).stat().st_size > ROWS * BLOB  # all of them are in the log
    finally:
        await asyncio.to_thread(grouped.close)
        await asyncio.to_thread(checkpointer.close)


async def test_the_checkpointer_copies_the_log_back_soon_after_the_commits(
    engine: AsyncEngine,
) -> None:
    grouped, checkpointer = checkpointed_writer(engine)
    try:
        for row_id in range(ROWS):
            await grouped.run(_insert(row_id))
        await _until(lambda: _database_file(engine).stat().st_size > ROWS * BLOB)
        await asyncio.sleep(2 * checkpoint.CHECKPOINT_EVERY_SECONDS)  # that pass has ended
        assert checkpointer.checkpoints >= 1
        assert _threads_named("relay-sqlite-checkpoint")

        # Written again and again, the log is reused from its start once checkpointed:
        # it stays near what is written between two checkpoints (a round here: each
        # round waits until the last one is in the database file, and a pass more), not
        # near all that was written (four rounds).
        for round_ in range(1, 4):
            for row_id in range(round_ * ROWS, (round_ + 1) * ROWS):
                await grouped.run(_insert(row_id))
            size = (round_ + 1) * ROWS * BLOB
            await _until(lambda size=size: _database_file(engine).stat().st_size > size)
            await asyncio.sleep(2 * checkpoint.CHECKPOINT_EVERY_SECONDS)
        assert _wal(engine).stat().st_size < 2 * ROWS * BLOB
        with sqlite3.connect(_database_file(engine)) as db:
            assert db.execute("SELECT count(*) FROM blobs").fetchone() == (4 * ROWS,)
    finally:
        await asyncio.to_thread(grouped.close)
        await asyncio.to_thread(checkpointer.close)
    assert not _threads_named("relay-sqlite-checkpoint")


async def test_an_idle_writer_starts_no_checkpointer(engine: AsyncEngine) -> None:
    grouped, checkpointer = checkpointed_writer(engine)
    await asyncio.to_thread(grouped.close)
    await asyncio.to_thread(checkpointer.close)
    assert checkpointer.checkpoints == 0
    assert not _threads_named("relay-sqlite-checkpoint")
