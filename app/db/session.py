"""Engine and session factories; the caller's transaction decides when to commit."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, event, exc, make_url
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import normalize_database_url

# A pooled PostgreSQL connection idle for longer than this is pinged before it is used.
# One used more recently is only checked for a close the driver has already seen.
IDLE_PING_SECONDS = 10.0
_CHECKED_IN_AT = "relay_checked_in_at"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def dumps_json(value: Any) -> str:
    """JSON columns (index maps, per-event results, drops) through orjson: the per-event
    results of every delivery are written once, and the standard library's encoder was a
    visible part of that. orjson refuses what json writes differently or not at all
    (integers beyond 64 bits, non-string keys): those go through json, as before."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def create_engine(
    url: str,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout: float = 30.0,
    busy_timeout_ms: int = 10_000,
    echo: bool = False,
) -> AsyncEngine:
    """An async engine for SQLite (aiosqlite) or PostgreSQL (asyncpg).

    SQLite: WAL (readers do not block the writer), ``busy_timeout`` (a second writer
    waits instead of failing), foreign keys on (off by default in SQLite). PostgreSQL:
    a pool of ``pool_size`` + ``max_overflow`` connections, checked before use
    (``_check_before_use``).
    """
    url = normalize_database_url(url)
    # Reading stays with json: orjson reads an integer beyond 64 bits as a float.
    codec: dict[str, Any] = {"json_serializer": dumps_json}
    if is_sqlite(url):
        _make_parent_directory(url)
        engine = create_async_engine(url, echo=echo, **codec)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        return engine
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
    }
    engine = create_async_engine(url, echo=echo, **options, **codec)
    _check_before_use(engine)
    return engine


def create_sqlite_thread_engine(engine: AsyncEngine, busy_timeout_ms: int = 10_000) -> Engine:
    """A synchronous engine on ``engine``'s SQLite file, for work done on a thread of its
    own (``app.db.hot.ThreadStatements``): same pragmas, same JSON writer, one
    connection (the thread's)."""
    url = engine.url.set(drivername="sqlite")
    sync = create_sync_engine(url, json_serializer=dumps_json, pool_size=1, max_overflow=0)
    event.listen(sync, "connect", _sqlite_pragmas(busy_timeout_ms))
    return sync


def _check_before_use(engine: AsyncEngine) -> None:
    """Stale pooled connections are replaced before use, more cheaply than pre-ping.

    SQLAlchemy's ``pool_pre_ping`` costs asyncpg three round trips (begin, SELECT 1,
    rollback) on every checkout: three per ingested batch, about a tenth of the relay's
    time under load (docs/benchmarks.md). A server that stops or restarts closes its
    sessions, and asyncpg sees that close as soon as the event loop reads it, so a
    connection used moments ago only needs that flag looked at; one idle for a while
    (a close may not have reached us: a silent network) is pinged as before. A
    connection found closed is replaced (``DisconnectionError`` makes the pool retry).
    """
    dialect: Dialect = engine.sync_engine.dialect

    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN_AT] = time.monotonic()

    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if driver is not None and driver.is_closed():
            raise exc.DisconnectionError("the server closed this connection")
        checked_in_at = record.info.get(_CHECKED_IN_AT)
        if checked_in_at is not None and time.monotonic() - checked_in_at > IDLE_PING_SECONDS:
            try:
                dialect.do_ping(dbapi_connection)
            except Exception as error:
                raise exc.DisconnectionError(f"ping failed: {error}") from error

    event.listen(engine.sync_engine, "checkin", on_checkin)
    event.listen(engine.sync_engine, "checkout", on_checkout)


def _make_parent_directory(url: str) -> None:
    # SQLite creates the file but not its directory ("unable to open database file").
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # synchronous stays FULL (SQLite's default): an accepted batch must survive a
            # power loss, not only a process crash.
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    return on_connect


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (``expire_on_commit=False``)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def create_autocommit_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions in which every statement commits on its own, for work that is one
    statement (a read, or one UPDATE): a statement is atomic by itself, and without
    BEGIN and COMMIT it costs one round trip instead of three (with asyncpg) and about
    200 µs less CPU. Same pool as ``engine``."""
    return async_sessionmaker(
        engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )
