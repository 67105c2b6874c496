"""Grouped SQLite transactions (app/db/grouped.py): work waiting for the thread shares
one commit; an answer means committed; one failure costs the others nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from app.db.grouped import MAX_GROUP, GroupedTransactions
from app.db.session import create_engine, create_sqlite_thread_engine

THREAD = "relay-sqlite-under-test"
SCHEMA = (
    "CREATE TABLE parents (id INTEGER PRIMARY KEY)",
    "CREATE TABLE children (id INTEGER PRIMARY KEY,"
    " parent_id INTEGER NOT NULL REFERENCES parents(id))",
    "INSERT INTO parents (id) VALUES (1)",
)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "grouped.db"
    with sqlite3.connect(path) as db:
        for statement in SCHEMA:
            db.execute(statement)
    return path


@pytest.fixture
async def grouped(database: Path) -> AsyncIterator[GroupedTransactions]:
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    runner = GroupedTransactions(create_sqlite_thread_engine(engine), name=THREAD)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.close)
        await engine.dispose()


def _child(child_id: int, parent_id: int = 1) -> Callable[[Connection], int]:
    def insert(connection: Connection) -> int:
        connection.execute(
            text("INSERT INTO children (id, parent_id) VALUES (:id, :parent)"),
            {"id": child_id, "parent": parent_id},
        )
        return child_id

    return insert


def _stored(database: Path) -> list[int]:
    """What another connection sees: only committed rows."""
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT id FROM children ORDER BY id")]


class Gate:
    """Work that holds the thread until released, so that what follows queues up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, _connection: Connection) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "gate"


async def _queue_behind(
    grouped: GroupedTransactions, works: list[Callable[[Connection], object]]
) -> list[object]:
    """Run ``works`` as one group: all are queued while a gate holds the thread."""
    gate = Gate()
    first = asyncio.ensure_future(grouped.run(gate))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    tasks = [asyncio.ensure_future(grouped.run(work)) for work in works]
    await asyncio.sleep(0)  # every task has queued its work
    gate.release.set()
    assert await first == "gate"
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def test_work_waiting_for_the_thread_shares_one_transaction(
    grouped: GroupedTransactions, database: Path
) -> None:
    outcomes = await _queue_behind(grouped, [_child(i) for i in range(1, 31)])
    assert outcomes == list(range(1, 31))
    assert _stored(database) == list(range(1, 31))
    # The gate's transaction, then one for the thirty.
    assert (grouped.groups, grouped.works) == (2, 31)


async def test_a_group_is_at_most_max_group(grouped: GroupedTransactions, database: Path) -> None:
    count = MAX_GROUP + 5
    outcomes = await _queue_behind(grouped, [_child(i) for i in range(1, count + 1)])
    assert outcomes == list(range(1, count + 1))
    assert grouped.groups == 3  # the gate, MAX_GROUP, the 5 left over
    assert len(_stored(database)) == count


async def test_a_failing_statement_fails_alone(
    grouped: GroupedTransactions, database: Path
) -> None:
    outcomes = await _queue_behind(grouped, [_child(1), _child(2, parent_id=99), _child(3)])
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], IntegrityError)
    assert outcomes[2] == 3
    assert _stored(database) == [1, 3]
    # The gate, the group (rolled back), then each of the three alone.
    assert grouped.groups == 5


async def test_a_failed_commit_fails_only_the_work_that_caused_it(
    grouped: GroupedTransactions, database: Path
) -> None:
    """A deferred foreign key is checked at COMMIT: the group's commit fails, nothing of
    it is stored, and run alone only the culprit's commit fails."""

    def deferred_orphan(connection: Connection) -> int:
        connection.execute(text("PRAGMA defer_foreign_keys = ON"))
        return _child(2, parent_id=99)(connection)

    outcomes = await _queue_behind(grouped, [_child(1), deferred_orphan, _child(3)])
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], IntegrityError)
    assert outcomes[2] == 3
    assert _stored(database) == [1, 3]


async def test_an_answer_means_committed(grouped: GroupedTransactions, database: Path) -> None:
    for child_id in (1, 2, 3):
        assert await grouped.run(_child(child_id)) == child_id
        assert child_id in _stored(database)


async def test_a_cancelled_caller_does_not_stop_the_others(
    grouped: GroupedTransactions, database: Path
) -> None:
    gate = Gate()
    first = asyncio.ensure_future(grouped.run(gate))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    cancelled = asyncio.ensure_future(grouped.run(_child(1)))
    kept = asyncio.ensure_future(grouped.run(_child(2)))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.release.set()
    assert await first == "gate"
    assert await kept == 2
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The statement was already queued: it ran, as one on a connection would have.
    assert _stored(database) == [1, 2]
    assert await grouped.run(_child(3)) == 3


async def test_close_finishes_queued_work_and_a_later_run_starts_again(
    grouped: GroupedTransactions, database: Path
) -> None:
    tasks = [asyncio.ensure_future(grouped.run(_child(i))) for i in range(1, 11)]
    await asyncio.sleep(0)
    await asyncio.to_thread(grouped.close)
    assert await asyncio.gather(*tasks) == list(range(1, 11))
    assert not any(thread.name == THREAD for thread in threading.enumerate())
    assert await grouped.run(_child(11)) == 11
    assert _stored(database) == list(range(1, 12))


async def test_an_orm_read_in_a_group_leaves_the_group_s_writes_alone(
    grouped: GroupedTransactions, database: Path
) -> None:
    """``ThreadStatements`` reads through a Session on the group's connection: closing
    that session must not roll back what the group wrote before it."""

    def read(connection: Connection) -> list[int]:
        with Session(connection, expire_on_commit=False) as session:
            return list(session.scalars(text("SELECT id FROM children ORDER BY id")))

    outcomes = await _queue_behind(grouped, [_child(1), read, _child(2), read])
    assert outcomes == [1, [1], 2, [1, 2]]
    assert _stored(database) == [1, 2]


async def test_work_that_ends_the_thread_fails_its_group_and_the_thread_goes_on(
    grouped: GroupedTransactions, database: Path
) -> None:
    def fatal(_connection: Connection) -> None:
        raise SystemExit("the thread ends here")

    outcomes = await _queue_behind(grouped, [_child(1), fatal])
    # Nothing of the group was committed, and nobody is left waiting.
    assert all(isinstance(outcome, DBAPIError) for outcome in outcomes), outcomes
    assert _stored(database) == []
    assert await grouped.run(_child(2)) == 2
    assert _stored(database) == [2]
