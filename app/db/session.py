"""Engine and session factories; the caller's transaction decides when to commit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import normalize_database_url


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _dumps_json(value: Any) -> str:
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
    a pool of ``pool_size`` + ``max_overflow`` connections, checked before use.
    """
    url = normalize_database_url(url)
    # Reading stays with json: orjson reads an integer beyond 64 bits as a float.
    codec: dict[str, Any] = {"json_serializer": _dumps_json}
    if is_sqlite(url):
        _make_parent_directory(url)
        engine = create_async_engine(url, echo=echo, **codec)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        return engine
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
        "pool_pre_ping": True,
    }
    return create_async_engine(url, echo=echo, **options, **codec)


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
