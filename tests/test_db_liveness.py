"""Pooled PostgreSQL connections the server has closed are replaced before use.

The relay does not pay SQLAlchemy's pre-ping (three round trips per checkout with
asyncpg); app/db/session.py checks the driver's closed flag instead, and pings only
connections idle for a while. These tests close the relay's pooled connection from the
server side, as a restart does, and check that the next transaction still succeeds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from app.db import session as db_session

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("backend", ["postgresql"])]


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def _terminate(database_url: str, pid: int) -> None:
    admin = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with admin.connect() as connection:
            killed = await connection.execute(
                text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
            )
            assert killed.scalar_one() is True
    finally:
        await admin.dispose()


async def test_a_connection_closed_by_the_server_is_replaced(database_url: str) -> None:
    engine = db_session.create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        first = await _backend_pid(engine)
        await _terminate(database_url, first)
        # The server's close reaches asyncpg once the event loop reads the socket.
        for _ in range(50):
            await asyncio.sleep(0.01)
        second = await _backend_pid(engine)  # no error: the pool reconnected
        assert second != first
        assert await _backend_pid(engine) == second  # and keeps the new connection
    finally:
        await engine.dispose()


async def test_an_idle_connection_is_pinged_before_use(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db_session.create_engine(database_url, pool_size=1, max_overflow=0)
    pings: list[object] = []
    dialect = engine.sync_engine.dialect
    real_ping = dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", counting_ping)
    try:
        first = await _backend_pid(engine)
        assert await _backend_pid(engine) == first
        assert pings == []  # used moments ago: no round trip spent on a ping
        monkeypatch.setattr(db_session, "IDLE_PING_SECONDS", 0.0)
        await asyncio.sleep(0.01)
        assert await _backend_pid(engine) == first
        assert len(pings) == 1  # idle past the limit: pinged, found alive, kept
    finally:
        await engine.dispose()
