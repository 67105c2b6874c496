"""The statements every relayed batch runs, each atomic on its own.

A batch costs the relay three statements: the ingest reads its connection and output,
inserts its delivery, and the dispatcher writes Amazon's answer. Through an
``AsyncSession`` each cost 0.7–0.9 ms of the relay's CPU. On PostgreSQL they go to
asyncpg directly, on a connection of the engine's own pool, for 0.3–0.4 ms each
(docs/decisions/0016-hot-statements-through-the-driver.md). On an SQLite file they run
on a connection and thread of their own, where the statements waiting for SQLite's one
writer share a transaction and its commit (docs/decisions/0017-sqlite-grouped-commits.md).
An in-memory SQLite database keeps the repository's functions, each in its own
autocommit session. All write the same rows; tests/test_hot_statements.py holds each
to the session's.

Only single statements live here: none depends on another's effect in a transaction.
Work that must be all-or-nothing with other statements uses a session
(``SessionWriter`` for a batch written inside a transaction).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Final, Protocol, cast

import asyncpg
from sqlalchemy import JSON, Dialect, Table, select
from sqlalchemy import Connection as SyncConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.util import greenlet_spawn

from app.db import repository as repo
from app.db.grouped import GroupedTransactions
from app.db.models import Connection, Delivery, DeliveryStatus, DroppedBatch, Output, OutputStatus
from app.db.session import create_sqlite_thread_engine, dumps_json, is_sqlite

# A claimed delivery and the output it goes to (one Output object per output).
Claimed = tuple[Delivery, Output]


class BatchWriter(Protocol):
    """Where an accepted batch's rows go: one statement each."""

    async def insert_deliveries(self, rows: Sequence[Mapping[str, Any]]) -> None: ...

    async def record_dropped_batch(self, row: Mapping[str, Any]) -> None: ...


class HotStatements(BatchWriter, Protocol):
    """The per-batch statements, each atomic on its own (committed alone, or on SQLite
    in a transaction shared with others that cannot undo it)."""

    async def connection_with_output(self, key: str) -> tuple[Connection, Output] | None: ...

    async def update_held(
        self, delivery_id: str, worker_id: str, values: Mapping[str, Any]
    ) -> bool: ...

    async def claim_due(
        self, worker_id: str, limit: int, now: datetime, lease_seconds: float
    ) -> list[Claimed]: ...

    async def aclose(self) -> None: ...


def hot_statements(
    engine: AsyncEngine, autocommit: async_sessionmaker[AsyncSession]
) -> HotStatements:
    """asyncpg's own calls on PostgreSQL; a thread with grouped commits on an SQLite
    file; the repository in autocommit sessions on an in-memory SQLite database."""
    if is_sqlite(engine.url.drivername):
        if engine.url.database in (None, "", ":memory:"):
            return SessionStatements(autocommit)  # a second connection would be another database
        return ThreadStatements(engine)
    return DriverStatements(engine)


class SessionWriter:
    """A batch's rows written on a session the caller holds (inside its transaction)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def insert_deliveries(self, rows: Sequence[Mapping[str, Any]]) -> None:
        await repo.insert_rows(self._session, rows)

    async def record_dropped_batch(self, row: Mapping[str, Any]) -> None:
        await repo.insert_dropped_batch_row(self._session, row)


class SessionStatements:
    """Each statement in its own autocommit session, through the repository (any backend)."""

    def __init__(self, autocommit: async_sessionmaker[AsyncSession]) -> None:
        self._autocommit = autocommit

    async def connection_with_output(self, key: str) -> tuple[Connection, Output] | None:
        async with self._autocommit() as session:
            return await repo.get_connection_with_output(session, key)

    async def insert_deliveries(self, rows: Sequence[Mapping[str, Any]]) -> None:
        async with self._autocommit() as session, session.begin():
            await repo.insert_rows(session, rows)

    async def record_dropped_batch(self, row: Mapping[str, Any]) -> None:
        async with self._autocommit() as session, session.begin():
            await repo.insert_dropped_batch_row(session, row)

    async def update_held(
        self, delivery_id: str, worker_id: str, values: Mapping[str, Any]
    ) -> bool:
        async with self._autocommit() as session, session.begin():
            return await repo.update_held(session, delivery_id, worker_id, values)

    async def claim_due(
        self, worker_id: str, limit: int, now: datetime, lease_seconds: float
    ) -> list[Claimed]:
        async with self._autocommit() as session, session.begin():
            deliveries = await repo.claim_due(session, worker_id, limit, now, lease_seconds)
            outputs: dict[str, Output] = {}
            for output_id in {d.output_id for d in deliveries}:
                output = await repo.get_output(session, output_id)
                if output is not None:
                    outputs[output_id] = output
        return _paired(deliveries, outputs)

    async def aclose(self) -> None:
        """The sessions' engine is the caller's to dispose of."""


# --- Built from the table definitions, so they cannot drift from them ---------------------

_CONNECTIONS: Final = cast(Table, Connection.__table__)
_OUTPUTS: Final = cast(Table, Output.__table__)
_DROPPED: Final = cast(Table, DroppedBatch.__table__)
# Attribute names in table order (they equal the column names; models.py).
_CONNECTION_FIELDS: Final = tuple(column.key for column in _CONNECTIONS.columns)
_OUTPUT_FIELDS: Final = tuple(column.key for column in _OUTPUTS.columns)
_DELIVERY_FIELDS: Final = tuple(column.key for column in repo.DELIVERIES.columns)
_JSON_COLUMNS: Final = {
    table.name: frozenset(c.name for c in table.columns if isinstance(c.type, JSON))
    for table in (repo.DELIVERIES, _DROPPED)
}
# asyncpg numbers its parameters ($1, $2, ...); sqlite3 takes them in order (?).
_NUMBERED: Final = "$"
_IN_ORDER: Final = "?"


def _placeholder(style: str, number: int) -> str:
    return f"${number}" if style == _NUMBERED else "?"


@functools.lru_cache(maxsize=2)
def _connection_with_output_sql(style: str) -> str:
    columns = [f"c.{name}" for name in _CONNECTION_FIELDS] + [
        f"o.{name}" for name in _OUTPUT_FIELDS
    ]
    return (
        f"SELECT {', '.join(columns)} "  # noqa: S608 - every name is the tables' own
        "FROM connections AS c JOIN outputs AS o ON o.id = c.output_id "
        f"WHERE c.key = {_placeholder(style, 1)}"
    )


_CONNECTION_WITH_OUTPUT: Final = _connection_with_output_sql(_NUMBERED)


def _connection_and_output(values: Sequence[Any]) -> tuple[Connection, Output]:
    """The two objects from one row of ``_connection_with_output_sql``, values converted."""
    split = len(_CONNECTION_FIELDS)
    connection = Connection(**dict(zip(_CONNECTION_FIELDS, values[:split], strict=True)))
    output = Output(**dict(zip(_OUTPUT_FIELDS, values[split:], strict=True)))
    return connection, output


# Built once per shape (a handful: the column sets are the repository's), not per batch.
@functools.lru_cache(maxsize=64)
def _insert_sql(table: Table, columns: tuple[str, ...], rows: int, style: str) -> str:
    width = len(columns)
    placeholders = (
        ", ".join(_placeholder(style, row * width + i + 1) for i in range(width))
        for row in range(rows)
    )
    values = ", ".join(f"({group})" for group in placeholders)
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {values}"  # noqa: S608


@functools.lru_cache(maxsize=64)
def _update_held_sql(columns: tuple[str, ...], style: str) -> str:
    """repository.HELD_UPDATE: the values, guarded by the lease."""
    sets = ", ".join(f"{name} = {_placeholder(style, i + 1)}" for i, name in enumerate(columns))
    n = len(columns)
    guard = [_placeholder(style, n + i) for i in (1, 2, 3)]
    return (
        f"UPDATE deliveries SET {sets} "  # noqa: S608 - names are the table's own columns
        f"WHERE id = {guard[0]} AND status = {guard[1]} AND leased_by = {guard[2]}"
    )


def _claim_sql() -> str:
    """repository.claim_statement on PostgreSQL, returning each claimed delivery with its
    output's row: the claim and the outputs it needs in one round trip, no transaction.
    $1 pending, $2 in_flight, $3 configured, $4 now, $5 limit, $6 worker, $7 lease end."""

    def due(condition: str) -> str:
        return (
            "SELECT d.id, d.next_attempt_at "  # noqa: S608 - every name is the tables' own
            "FROM deliveries AS d JOIN outputs AS o ON o.id = d.output_id "
            f"WHERE {condition} AND o.enabled IS true AND o.status = $3 "
            "ORDER BY d.next_attempt_at, d.id LIMIT $5 FOR UPDATE OF d SKIP LOCKED"
        )

    returned = [f"d.{name}" for name in _DELIVERY_FIELDS] + [f"o.{name}" for name in _OUTPUT_FIELDS]
    return (
        f"WITH waiting AS ({due('d.status = $1 AND d.next_attempt_at <= $4')}), "  # noqa: S608
        f"orphaned AS ({due('d.status = $2 AND d.lease_expires_at <= $4')}), "
        "picked AS (SELECT id FROM (SELECT id, next_attempt_at FROM waiting "
        "UNION ALL SELECT id, next_attempt_at FROM orphaned) AS due "
        "ORDER BY next_attempt_at, id LIMIT $5) "
        "UPDATE deliveries AS d SET status = $2, leased_by = $6, lease_expires_at = $7, "
        "attempts = d.attempts + 1, updated_at = $4 "
        "FROM picked, outputs AS o WHERE d.id = picked.id AND o.id = d.output_id "
        f"RETURNING {', '.join(returned)}"
    )


_CLAIM: Final = _claim_sql()


def _paired(deliveries: Sequence[Delivery], outputs: Mapping[str, Output]) -> list[Claimed]:
    """Each claimed delivery with its output (one Output object per output), oldest due
    first, as every backend's claim_due returns them."""
    pairs = [(d, outputs[d.output_id]) for d in deliveries if d.output_id in outputs]
    return sorted(pairs, key=lambda pair: repo.by_due(pair[0]))


def _claimed(rows: Sequence[Sequence[Any]]) -> list[Claimed]:
    """Deliveries and their outputs from rows of ``_CLAIM``."""
    split = len(_DELIVERY_FIELDS)
    deliveries: list[Delivery] = []
    outputs: dict[str, Output] = {}
    for values in rows:
        delivery = Delivery(**dict(zip(_DELIVERY_FIELDS, values[:split], strict=True)))
        deliveries.append(delivery)
        if delivery.output_id not in outputs:
            outputs[delivery.output_id] = Output(
                **dict(zip(_OUTPUT_FIELDS, values[split:], strict=True))
            )
    return _paired(deliveries, outputs)


# --- SQLite on a thread of its own ---------------------------------------------------------


class ThreadStatements:
    """SQLite: the statements on a connection of their own, in grouped transactions.

    Through aiosqlite and an ``AsyncSession``, one statement is five or six trips between
    the event loop and aiosqlite's threads (isolation level, cursor, execute, commit,
    reset), each waiting for the other side to give up the interpreter lock, and every
    statement is a commit that waits for the disk. Here each is SQL built once from the
    table definitions, its values converted by SQLAlchemy's own processors for each
    column (the same types and JSON writer), run on a synchronous connection held by one
    thread; what is waiting when the thread comes free shares one transaction
    (``GroupedTransactions``; docs/decisions/0017-sqlite-grouped-commits.md). The
    credential read has a second connection and thread, so that it never waits for a
    write lock it does not need.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._grouped = GroupedTransactions(create_sqlite_thread_engine(engine))
        # Reads on a connection and thread of their own. In WAL mode a reader never
        # waits for a writer; queued behind this process's writer, a read would wait
        # whenever the writer waits for another process's write lock.
        self._reads = GroupedTransactions(
            create_sqlite_thread_engine(engine), name="relay-sqlite-reads"
        )

    async def connection_with_output(self, key: str) -> tuple[Connection, Output] | None:
        return await self._reads.run(functools.partial(_read_connection_with_output, key))

    async def insert_deliveries(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            await self._grouped.run(functools.partial(_insert, repo.DELIVERIES, list(rows)))

    async def record_dropped_batch(self, row: Mapping[str, Any]) -> None:
        await self._grouped.run(functools.partial(_insert, _DROPPED, [dict(row)]))

    async def update_held(
        self, delivery_id: str, worker_id: str, values: Mapping[str, Any]
    ) -> bool:
        update = functools.partial(_update_held, delivery_id, worker_id, dict(values))
        return await self._grouped.run(update)

    async def claim_due(
        self, worker_id: str, limit: int, now: datetime, lease_seconds: float
    ) -> list[Claimed]:
        if limit <= 0:
            return []
        claim = functools.partial(_claim_due, worker_id, limit, now, lease_seconds)
        return await self._grouped.run(claim)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._grouped.close)
        await asyncio.to_thread(self._reads.close)


Processor = Callable[[Any], Any]


@functools.lru_cache(maxsize=64)
def _bind_processors(
    table: Table, columns: tuple[str, ...], dialect: Dialect
) -> tuple[Processor | None, ...]:
    """Each column's bind processor, as SQLAlchemy applies it to every value (None
    included): UTC times as SQLite stores them, enum members, JSON through the
    engine's writer."""
    return tuple(
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns
    )


@functools.lru_cache(maxsize=4)
def _read_processors(dialect: Dialect) -> tuple[Processor | None, ...]:
    columns = (*_CONNECTIONS.columns, *_OUTPUTS.columns)
    return tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)


def _bound(processors: Sequence[Processor | None], values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        value if process is None else process(value)
        for process, value in zip(processors, values, strict=True)
    )


def _read_connection_with_output(
    key: str, connection: SyncConnection
) -> tuple[Connection, Output] | None:
    sql = _connection_with_output_sql(_IN_ORDER)
    row = connection.exec_driver_sql(sql, (key,)).first()
    if row is None:
        return None
    return _connection_and_output(_bound(_read_processors(connection.dialect), tuple(row)))


def _insert(table: Table, rows: list[Mapping[str, Any]], connection: SyncConnection) -> None:
    columns = tuple(rows[0])
    processors = _bind_processors(table, columns, connection.dialect)
    parameters = [_bound(processors, [row[name] for name in columns]) for row in rows]
    connection.exec_driver_sql(_insert_sql(table, columns, 1, _IN_ORDER), parameters)


_LEASE_GUARD: Final = ("id", "status", "leased_by")


def _update_held(
    delivery_id: str, worker_id: str, values: Mapping[str, Any], connection: SyncConnection
) -> bool:
    columns = tuple(values)
    processors = _bind_processors(repo.DELIVERIES, columns + _LEASE_GUARD, connection.dialect)
    lease = (delivery_id, DeliveryStatus.IN_FLIGHT, worker_id)
    parameters = _bound(processors, [*(values[name] for name in columns), *lease])
    result = connection.exec_driver_sql(_update_held_sql(columns, _IN_ORDER), parameters)
    return bool(result.rowcount == 1)


def _claim_due(
    worker_id: str, limit: int, now: datetime, lease_seconds: float, connection: SyncConnection
) -> list[Claimed]:
    """The claim and then its outputs, in the group's transaction (SQLite's RETURNING
    cannot name another table's columns)."""
    statement = repo.claim_statement(worker_id, limit, now, lease_seconds, skip_locked=False)
    rows = connection.execute(statement.returning(*repo.DELIVERIES.columns)).all()
    if not rows:
        return []
    output_ids = {row.output_id for row in rows}
    found = connection.execute(select(_OUTPUTS).where(_OUTPUTS.c.id.in_(output_ids))).all()
    outputs = {row.id: Output(**row._asdict()) for row in found}
    return _paired([Delivery(**row._asdict()) for row in rows], outputs)


# --- PostgreSQL through asyncpg -----------------------------------------------------------


def _parameter(json_columns: frozenset[str], name: str, value: Any) -> Any:
    """A value as the pool's asyncpg connections take it: JSON as text (the dialect's
    codec; serialised as the engine does), enum members as their value, and only aware
    datetimes (as ``UTCDateTime`` insists)."""
    if value is None:
        return None
    if name in json_columns:
        return dumps_json(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError("naive datetime: pass an aware (UTC) datetime")
    return value


# What asyncpg raises for a failed statement or a lost connection. InternalClientError
# too: a connection the server closed while a statement was being sent can leave the
# protocol mid-operation ("cannot switch to state …; another operation is in progress").
_DRIVER_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class DriverStatements:
    """The per-batch statements as asyncpg calls on the engine's pooled connections.

    A connection is checked out of the engine's pool with the pool's liveness checks
    (``session._check_before_use``) and given back after the one statement. Outside a
    transaction block, PostgreSQL commits the statement by itself. A driver error
    becomes a ``DBAPIError``, as SQLAlchemy raises it, so callers see one kind of storage
    failure (the API answers 503, the dispatcher retries); a connection the error left
    unusable is dropped from the pool.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connect_errors = (*_DRIVER_ERRORS, engine.dialect.loaded_dbapi.Error)

    @asynccontextmanager
    async def _driver(self, statement: str) -> AsyncIterator[asyncpg.Connection]:
        try:
            pooled = await self._engine.raw_connection()
        except self._connect_errors as error:
            raise DBAPIError(statement, None, error, connection_invalidated=True) from error
        driver = cast(asyncpg.Connection, pooled.driver_connection)
        try:
            yield driver
        except (*_DRIVER_ERRORS, OSError) as error:
            # An SQL error leaves the connection as it was; anything else may not have,
            # nor may the connection errors of class 08 that the server sends.
            broken = (
                not isinstance(error, asyncpg.PostgresError)
                or isinstance(error, asyncpg.PostgresConnectionError)
                or driver.is_closed()
            )
            if broken:
                pooled.invalidate(error)
            raise DBAPIError(statement, None, error, connection_invalidated=broken) from error
        except BaseException:
            pooled.invalidate()  # cut off mid-statement (cancelled): not fit to reuse
            raise
        finally:
            await greenlet_spawn(pooled.close)

    async def connection_with_output(self, key: str) -> tuple[Connection, Output] | None:
        async with self._driver(_CONNECTION_WITH_OUTPUT) as driver:
            record = await driver.fetchrow(_CONNECTION_WITH_OUTPUT, key)
        if record is None:
            return None
        return _connection_and_output(list(record.values()))

    async def insert_deliveries(self, rows: Sequence[Mapping[str, Any]]) -> None:
        await self._insert(repo.DELIVERIES, rows)

    async def record_dropped_batch(self, row: Mapping[str, Any]) -> None:
        await self._insert(_DROPPED, [row])

    async def _insert(self, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        columns = tuple(rows[0])
        json_columns = _JSON_COLUMNS[table.name]
        sql = _insert_sql(table, columns, len(rows), _NUMBERED)
        arguments = [_parameter(json_columns, name, row[name]) for row in rows for name in columns]
        async with self._driver(sql) as driver:
            await driver.execute(sql, *arguments)

    async def update_held(
        self, delivery_id: str, worker_id: str, values: Mapping[str, Any]
    ) -> bool:
        columns = tuple(values)
        sql = _update_held_sql(columns, _NUMBERED)
        json_columns = _JSON_COLUMNS["deliveries"]
        arguments = [_parameter(json_columns, name, values[name]) for name in columns]
        held = DeliveryStatus.IN_FLIGHT.value
        async with self._driver(sql) as driver:
            status = await driver.execute(sql, *arguments, delivery_id, held, worker_id)
        return bool(status == "UPDATE 1")

    async def claim_due(
        self, worker_id: str, limit: int, now: datetime, lease_seconds: float
    ) -> list[Claimed]:
        if limit <= 0:
            return []
        if now.tzinfo is None:  # as UTCDateTime insists
            raise ValueError("naive datetime: pass an aware (UTC) datetime")
        lease_end = now + timedelta(seconds=lease_seconds)
        async with self._driver(_CLAIM) as driver:
            rows = await driver.fetch(
                _CLAIM,
                DeliveryStatus.PENDING.value,
                DeliveryStatus.IN_FLIGHT.value,
                OutputStatus.CONFIGURED.value,
                now,
                limit,
                worker_id,
                lease_end,
            )
        return _claimed([list(row.values()) for row in rows])

    async def aclose(self) -> None:
        """The pool is the engine's, disposed of with it."""
