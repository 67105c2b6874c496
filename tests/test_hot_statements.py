"""The per-batch statements (app/db/hot.py) do to the rows exactly what the repository's
session functions do, on both backends: on PostgreSQL they are asyncpg calls written
by hand, on SQLite the repository's statements on a connection of their own in grouped
transactions, so every column they read or write is compared with the ORM's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db.base import LZ4_FRAME_MAGIC
from app.db.hot import (
    DriverStatements,
    HotStatements,
    SessionStatements,
    SessionWriter,
    ThreadStatements,
    hot_statements,
)
from app.db.models import (
    Connection,
    Delivery,
    DeliveryStatus,
    DroppedBatch,
    Output,
    OutputStatus,
)
from app.db.session import create_autocommit_sessionmaker

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# JSON the engine writes in two ways: orjson, and json for integers beyond 64 bits.
AWKWARD_DROPS: list[dict[str, Any]] = [
    {"index": 0, "reason": "missing_match_key", "detail": 'é ✓ \u2028 "quoted"'},
    {"index": 1, "reason": "invalid_value", "detail": 2**70},
]


def _columns(row: Any) -> dict[str, Any]:
    return {attr.key: getattr(row, attr.key) for attr in inspect(type(row)).column_attrs}


@pytest.fixture
async def hot(engine: AsyncEngine) -> AsyncIterator[HotStatements]:
    statements = hot_statements(engine, create_autocommit_sessionmaker(engine))
    try:
        yield statements
    finally:
        await statements.aclose()


async def _new_output(session: AsyncSession, **fields: Any) -> Output:
    return await repo.create_output(
        session,
        name="Shop ✓",
        advertiser_id="123456",
        now=T0,
        conversion_rules=[{"event_name": "buy", "conversion": "PURCHASE", "n": 2**66}],
        **fields,
    )


async def _output_and_connection(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> tuple[Output, Connection]:
    async with sessionmaker() as session, session.begin():
        output = await _new_output(session, data_set_name="web")
        created = await repo.create_connection(
            session, output_id=output.id, source="mparticle", name="web"
        )
    return output, created.connection


def test_each_backend_has_its_own_statements(backend: str, hot: HotStatements) -> None:
    expected = ThreadStatements if backend == "sqlite" else DriverStatements
    assert type(hot) is expected


async def test_an_in_memory_sqlite_database_keeps_the_sessions() -> None:
    """A second connection to ``:memory:`` would open another, empty database."""
    from app.db.session import create_engine

    engine = create_engine("sqlite+aiosqlite:///:memory:")
    try:
        statements = hot_statements(engine, create_autocommit_sessionmaker(engine))
        assert type(statements) is SessionStatements
        await statements.aclose()
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_s_threads_start_with_their_first_statement_and_stop_on_close(
    engine: AsyncEngine,
) -> None:
    """One thread for reads and one for writes, each started by its first statement."""
    import threading

    def threads(name: str) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == name]

    before = {name: threads(name) for name in ("relay-sqlite", "relay-sqlite-reads")}
    statements = hot_statements(engine, create_autocommit_sessionmaker(engine))
    assert {name: threads(name) for name in before} == before  # never ingests: no thread
    assert await statements.connection_with_output("no such key") is None
    assert len(threads("relay-sqlite-reads")) == len(before["relay-sqlite-reads"]) + 1
    assert threads("relay-sqlite") == before["relay-sqlite"]
    assert not await statements.update_held("dlv_none", "worker", {"status": "delivered"})
    assert len(threads("relay-sqlite")) == len(before["relay-sqlite"]) + 1
    await statements.aclose()
    assert {name: threads(name) for name in before} == before


async def test_the_connection_and_output_read_as_the_orm_reads_them(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    _, connection = await _output_and_connection(sessionmaker)
    async with sessionmaker() as session:
        expected = await repo.get_connection_with_output(session, connection.key)
    found = await hot.connection_with_output(connection.key)
    assert expected is not None
    assert found is not None
    assert _columns(found[0]) == _columns(expected[0])
    assert _columns(found[1]) == _columns(expected[1])
    assert found[1].mapping_settings() == expected[1].mapping_settings()
    assert found[1].updated_at.tzinfo is not None
    assert await hot.connection_with_output("rk_nobody") is None


def _items(output: Output, connection: Connection) -> list[repo.NewDelivery]:
    return [
        repo.NewDelivery(
            output_id=output.id,
            source="mparticle",
            body=b'{"events":[{"eventId":"e\\u00e9"}]}\x00\xff',
            index_map=[3, 1, 2**65],
            connection_id=connection.id,
            dropped=AWKWARD_DROPS,
        ),
        repo.NewDelivery(
            output_id=output.id, source="segment", body=b"{}", index_map=[0], dropped=None
        ),
    ]


async def _stored(
    sessionmaker: async_sessionmaker[AsyncSession], ids: list[str]
) -> list[dict[str, Any]]:
    async with sessionmaker() as session:
        rows = await repo.get_deliveries(session, ids)
    return [_columns(row) for row in rows]


async def test_inserted_deliveries_are_the_rows_the_session_writes(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements, backend: str
) -> None:
    output, connection = await _output_and_connection(sessionmaker)
    lease = repo.Lease("worker-1", T0 + timedelta(seconds=60), 1)
    by_hot = repo.delivery_rows(_items(output, connection), now=T0, lease=lease)
    by_session = repo.delivery_rows(_items(output, connection), now=T0, lease=lease)
    await hot.insert_deliveries(by_hot)
    async with sessionmaker() as session, session.begin():
        await SessionWriter(session).insert_deliveries(by_session)
    hot_rows = await _stored(sessionmaker, [row["id"] for row in by_hot])
    session_rows = await _stored(sessionmaker, [row["id"] for row in by_session])
    assert len(hot_rows) == len(session_rows) == 2
    for mine, theirs in zip(hot_rows, session_rows, strict=True):
        for key in ("id", "batch_id"):
            assert mine.pop(key) != theirs.pop(key)
        assert mine == theirs
    assert hot_rows[0]["status"] == DeliveryStatus.IN_FLIGHT
    assert hot_rows[0]["dropped"] == AWKWARD_DROPS
    assert hot_rows[0]["index_map"] == [3, 1, 2**65]
    # Stored alike too (on SQLite an LZ4 frame: app.db.base.StoredBody).
    async with sessionmaker() as session:
        raw: dict[str, bytes] = dict(
            (await session.execute(text("SELECT id, body FROM deliveries"))).all()
        )
    for mine, theirs in zip(by_hot, by_session, strict=True):
        assert raw[mine["id"]] == raw[theirs["id"]]
        assert raw[mine["id"]].startswith(LZ4_FRAME_MAGIC) == (backend == "sqlite")


async def test_a_dropped_batch_is_the_row_the_session_writes(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    output, connection = await _output_and_connection(sessionmaker)

    def row() -> dict[str, Any]:
        return repo.dropped_batch_row(
            output_id=output.id,
            connection_id=connection.id,
            source="records",
            dropped=AWKWARD_DROPS,
            now=T0,
        )

    mine, theirs = row(), row()
    await hot.record_dropped_batch(mine)
    async with sessionmaker() as session, session.begin():
        await SessionWriter(session).record_dropped_batch(theirs)
    async with sessionmaker() as session:
        stored = {
            batch.batch_id: _columns(batch) for batch in await session.scalars(select(DroppedBatch))
        }
    assert stored[mine["batch_id"]] | {"batch_id": None} == stored[theirs["batch_id"]] | {
        "batch_id": None
    }
    assert stored[mine["batch_id"]]["dropped"] == AWKWARD_DROPS


async def test_an_outcome_is_written_as_complete_writes_it_and_only_by_the_holder(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    output, connection = await _output_and_connection(sessionmaker)
    lease = repo.Lease("worker-1", T0 + timedelta(seconds=60), 2)
    rows = repo.delivery_rows(_items(output, connection), now=T0, lease=lease)
    async with sessionmaker() as session, session.begin():
        await repo.insert_rows(session, rows)
    mine, theirs = (row["id"] for row in rows)
    results = [{"index": 3, "status": "ok"}, {"index": 2**65, "status": "error", "code": "X"}]
    done = T0 + timedelta(seconds=5)
    values = repo.completion(
        now=done, status=DeliveryStatus.PARTIAL, status_code=207, results=results, error="é"
    )
    # Another worker's outcome is refused and changes nothing.
    assert not await hot.update_held(mine, "worker-2", values)
    assert (await _stored(sessionmaker, [mine]))[0]["status"] == DeliveryStatus.IN_FLIGHT
    assert await hot.update_held(mine, "worker-1", values)
    async with sessionmaker() as session, session.begin():
        assert await repo.complete(
            session,
            theirs,
            worker_id="worker-1",
            now=done,
            status=DeliveryStatus.PARTIAL,
            status_code=207,
            results=results,
            error="é",
        )
    written, expected = await _stored(sessionmaker, [mine, theirs])
    for changed in ("status", "results", "last_status_code", "last_error", "updated_at"):
        assert written[changed] == expected[changed], changed
    assert written["leased_by"] is None
    assert written["lease_expires_at"] is None
    assert written["results"] == results
    # Once written it is no longer held: a second outcome is refused.
    assert not await hot.update_held(mine, "worker-1", values)


# --- Claims ---------------------------------------------------------------------------

SECOND = timedelta(seconds=1)
# The due deliveries of _claim_scene, oldest due first.
DUE_IN_ORDER = ["early", "expired", "other", "late"]


async def _live_output(
    session: AsyncSession, status: OutputStatus = OutputStatus.CONFIGURED
) -> Output:
    output = await _new_output(session)
    await repo.set_status(session, output.id, status, now=T0)
    return output


def _one(output: Output, n: int = 1) -> list[repo.NewDelivery]:
    return [
        repo.NewDelivery(
            output_id=output.id,
            source="mparticle",
            body=b'{"events":[{"eventId":"%d\\u00e9"}]}\x00\xff' % i,
            index_map=[i, 2**65],
            dropped=AWKWARD_DROPS,
        )
        for i in range(n)
    ]


async def _claim_scene(sessionmaker: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    """Deliveries in every state a claim must tell apart, by name; claims run at T0."""
    async with sessionmaker.begin() as session:
        live = await _live_output(session)
        other = await _live_output(session)
        reauth = await _live_output(session, OutputStatus.NEEDS_REAUTH)
        disabled = await _live_output(session)
        await repo.update_output(session, disabled.id, {"enabled": False})
        at = {
            "late": (live, T0 - timedelta(seconds=1), None),
            "early": (live, T0 - timedelta(seconds=20), None),
            "other": (other, T0 - timedelta(seconds=10), None),
            "future": (live, T0 + timedelta(seconds=1), None),
            "expired": (live, T0 - timedelta(seconds=15), repo.Lease("dead", T0, 1)),
            "held": (
                live,
                T0 - timedelta(seconds=40),
                repo.Lease("alive", T0 + timedelta(seconds=30), 1),
            ),
            "reauth": (reauth, T0 - timedelta(seconds=50), None),
            "disabled": (disabled, T0 - timedelta(seconds=50), None),
        }
        ids = {}
        for name, (output, queued, lease) in at.items():
            (ids[name],) = await repo.insert_deliveries(
                session, _one(output), now=queued, lease=lease
            )
    return ids


@pytest.mark.parametrize("side", ["hot", "sessions"])
async def test_a_claim_is_the_repository_s_claim(
    engine: AsyncEngine,
    sessionmaker: async_sessionmaker[AsyncSession],
    hot: HotStatements,
    side: str,
) -> None:
    """Due (pending and due, or leased by a process whose lease ran out) and of a live
    output (enabled, logged in): claimed oldest due first, each column as the ORM's own
    claim leaves it, with its output as the ORM reads it. The same through the backend's
    own statements and through autocommit sessions (in-memory SQLite's)."""
    if side == "sessions":
        hot = SessionStatements(create_autocommit_sessionmaker(engine))
    ids = await _claim_scene(sessionmaker)
    names = {i: name for name, i in ids.items()}
    async with sessionmaker() as session:
        by_session = await repo.claim_due(session, "worker-1", 10, T0, 60)
        expected = [_columns(d) for d in by_session]
        await session.rollback()
    claimed = await hot.claim_due("worker-1", 10, T0, 60)
    assert [names[d.id] for d, _ in claimed] == DUE_IN_ORDER
    assert [_columns(d) for d, _ in claimed] == expected
    for delivery, _ in claimed:
        assert delivery.status == DeliveryStatus.IN_FLIGHT
        assert delivery.leased_by == "worker-1"
        assert delivery.lease_expires_at == T0 + timedelta(seconds=60)
        assert delivery.updated_at == T0
        assert delivery.attempts == (2 if names[delivery.id] == "expired" else 1)
        assert delivery.index_map == [0, 2**65]
        assert delivery.dropped == AWKWARD_DROPS
    # What the claim returned is what it stored.
    stored = {row["id"]: row for row in await _stored(sessionmaker, [d.id for d, _ in claimed])}
    assert all(_columns(d) == stored[d.id] for d, _ in claimed)
    async with sessionmaker() as session:
        for delivery, output in claimed:
            read = await repo.get_output(session, delivery.output_id)
            assert read is not None
            assert _columns(output) == _columns(read)
    # One Output object per output.
    outputs = {d.output_id: o for d, o in claimed}
    assert all(o is outputs[d.output_id] for d, o in claimed)
    # Nothing else is due now; the future one is once its time comes.
    assert await hot.claim_due("worker-2", 10, T0, 60) == []
    (later,) = await hot.claim_due("worker-2", 10, T0 + SECOND, 60)
    assert names[later[0].id] == "future"


async def test_a_claim_takes_at_most_its_limit_oldest_first(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    ids = await _claim_scene(sessionmaker)
    names = {i: name for name, i in ids.items()}
    assert await hot.claim_due("w", 0, T0, 60) == []
    taken = []
    for _ in range(len(DUE_IN_ORDER)):
        (pair,) = await hot.claim_due("w", 1, T0, 60)
        taken.append(names[pair[0].id])
    assert taken == DUE_IN_ORDER
    assert await hot.claim_due("w", 1, T0, 60) == []


async def test_concurrent_claims_never_share_a_delivery(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    async with sessionmaker.begin() as session:
        output = await _live_output(session)
        ids = await repo.insert_deliveries(session, _one(output, 40), now=T0)

    async def claimer(worker: str) -> list[str]:
        got: list[str] = []
        while batch := await hot.claim_due(worker, 3, T0, 60):
            got += [d.id for d, _ in batch]
        return got

    results = await asyncio.gather(*(claimer(f"w{n}") for n in range(4)))
    claimed = [i for result in results for i in result]
    assert len(claimed) == len(set(claimed)), "a delivery was claimed twice"
    assert sorted(claimed) == sorted(ids)
    rows = await _stored(sessionmaker, ids)
    assert {row["attempts"] for row in rows} == {1}


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_claim_skips_rows_another_claim_holds_uncommitted(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    """Another process's claim, not yet committed, does not make this one wait, and the
    two share nothing."""
    async with sessionmaker.begin() as session:
        output = await _live_output(session)
        await repo.insert_deliveries(session, _one(output, 4), now=T0)
    async with sessionmaker() as first:
        mine = await repo.claim_due(first, "w1", 2, T0, 60)
        theirs = await asyncio.wait_for(hot.claim_due("w2", 10, T0, 60), timeout=5)
        assert len(mine) == len(theirs) == 2
        assert not {d.id for d in mine} & {d.id for d, _ in theirs}
        await first.commit()


async def test_a_naive_time_is_refused(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    output, connection = await _output_and_connection(sessionmaker)
    rows = repo.delivery_rows(_items(output, connection)[:1], now=T0)
    rows[0]["queued_at"] = datetime(2025, 3, 1, 12, 0)  # naive: the point
    with pytest.raises((ValueError, StatementError)):
        await hot.insert_deliveries(rows)
    assert await _stored(sessionmaker, [rows[0]["id"]]) == []


async def test_a_refused_statement_is_a_dbapi_error_and_stores_nothing(
    sessionmaker: async_sessionmaker[AsyncSession], hot: HotStatements
) -> None:
    output, connection = await _output_and_connection(sessionmaker)
    rows = repo.delivery_rows(_items(output, connection)[:1], now=T0)
    rows[0]["output_id"] = "out_missing"  # the foreign key refuses it
    with pytest.raises(DBAPIError):
        await hot.insert_deliveries(rows)
    assert await _stored(sessionmaker, [rows[0]["id"]]) == []
    # The connection is still good for the next statement.
    assert await hot.connection_with_output(connection.key) is not None


async def _terminate_all(engine: AsyncEngine, database_url: str) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    admin = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with admin.connect() as connection:
            killed = await connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            return int(killed.scalar_one())
    finally:
        await admin.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
async def test_the_driver_recovers_from_connections_the_server_closed(
    engine: AsyncEngine,
    database_url: str,
    sessionmaker: async_sessionmaker[AsyncSession],
    hot: HotStatements,
) -> None:
    """As a restart does: every pooled connection is closed from the server's side. The
    next statements either succeed on a new connection or fail as a DBAPIError (never
    a driver error the API would answer 500), and the pool heals."""
    import asyncio

    _, connection = await _output_and_connection(sessionmaker)
    assert await hot.connection_with_output(connection.key) is not None
    assert await _terminate_all(engine, database_url) >= 1
    outcomes: list[str] = []
    for _ in range(3):
        try:
            found = await hot.connection_with_output(connection.key)
            outcomes.append("ok" if found is not None else "missing")
        except DBAPIError:
            outcomes.append("dbapi_error")
        await asyncio.sleep(0.05)
    assert outcomes[-1] == "ok", outcomes
    assert set(outcomes) <= {"ok", "dbapi_error"}


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])
@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
    ids=["protocol-mid-operation", "closed-mid-operation", "reset"],
)
async def test_a_driver_failure_of_any_kind_is_a_dbapi_error_and_drops_the_connection(
    engine: AsyncEngine, hot: HotStatements, error: Exception
) -> None:
    """What a server closing the connection mid-statement raises, depending on the
    moment (the first was seen once in the test above): each becomes a DBAPIError
    (the API answers 503, never 500) and the connection leaves the pool."""
    assert isinstance(hot, DriverStatements)
    used: list[object] = []

    async def statement_that_fails() -> None:
        async with hot._driver("SELECT 1") as driver:
            used.append(driver)
            raise error

    with pytest.raises(DBAPIError) as raised:
        await statement_that_fails()
    assert raised.value.orig is error
    assert raised.value.connection_invalidated
    async with engine.connect() as connection:  # the pool hands out a different one
        raw = await connection.get_raw_connection()
        assert raw.driver_connection is not used[0]


def _as_mapping(row: Mapping[str, Any]) -> dict[str, Any]:
    return dict(row)


def test_the_hot_statements_cover_every_column() -> None:
    """A column added to a table is read and written by the driver path too: its SQL is
    built from the table definitions, and the rows from ``delivery_rows``."""
    from app.db import hot

    read = hot._CONNECTION_WITH_OUTPUT
    for column in (*Connection.__table__.columns, *Output.__table__.columns):
        assert f".{column.name}" in read
    for column in (*Delivery.__table__.columns, *Output.__table__.columns):
        assert f".{column.name}" in hot._CLAIM
    output = Output(id="out_x")
    rows = repo.delivery_rows(
        [repo.NewDelivery(output_id=output.id, source="mparticle", body=b"", index_map=[0])],
        now=T0,
    )
    assert set(_as_mapping(rows[0])) == {c.name for c in Delivery.__table__.columns}
