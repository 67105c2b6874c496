"""CPU per call of the three per-batch statements, and of the dispatcher's claim of one
due delivery with its output: through an AsyncSession (the repository,
``SessionStatements``) and through asyncpg directly (``DriverStatements``), on a fresh
PostgreSQL database (docs/decisions/0016-hot-statements-through-the-driver.md). The
claim's session side is how the dispatcher claimed before it went through the driver
(decision 0021): the repository's claim and the output's read in one session
transaction (the claim itself is one statement now; it was two).

    .venv/bin/python bench/statements_bench.py [--calls 2000] [--rounds 3]

Both sides run in one process against the same database, in alternating order, and the
figure is the process's CPU time per call (the server's work is not counted: it is the
same SQL on both sides). PostgreSQL: ``RELAY_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

# The sibling benchmark's PostgreSQL helpers (this directory is on sys.path when the
# script runs).
from upload_bench import POSTGRES_URL, _admin

from app.db import repository as repo
from app.db.hot import DriverStatements, HotStatements, SessionStatements
from app.db.migrate import migrate
from app.db.models import DeliveryStatus, OutputStatus
from app.db.session import create_autocommit_sessionmaker, create_engine, create_sessionmaker

BODY = b'{"events":[' + b'{"name":"purchase","eventId":"x"},' * 2600 + b"{}]}"  # ~87 KB
RESULTS = [{"index": i, "status": "ok"} for i in range(100)]


async def _cpu_per_call(calls: int, call: Callable[[], Awaitable[object]]) -> float:
    for _ in range(50):  # warm: statement caches, pool
        await call()
    start = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - start) / calls * 1e6


async def _measure(
    side: str,
    hot: HotStatements,
    sessionmaker: async_sessionmaker[AsyncSession],
    calls: int,
    output_id: str,
    connection_id: str,
    key: str,
) -> dict[str, float]:
    """CPU µs per call of each statement on one side: read, insert, outcome, claim."""
    now = datetime.now(UTC)
    lease = repo.Lease("bench", now + timedelta(minutes=5), 1)
    inserted: list[str] = []

    async def read() -> object:
        return await hot.connection_with_output(key)

    async def insert() -> None:
        item = repo.NewDelivery(
            output_id=output_id,
            source="mparticle",
            body=BODY,
            index_map=list(range(100)),
            connection_id=connection_id,
        )
        rows = repo.delivery_rows([item], now=now, lease=lease)
        inserted.append(rows[0]["id"])
        await hot.insert_deliveries(rows)

    async def outcome() -> bool:
        values = repo.completion(
            now=now, status=DeliveryStatus.DELIVERED, status_code=207, results=RESULTS
        )
        return await hot.update_held(inserted.pop(), "bench", values)

    async def claim() -> object:
        if side == "driver":
            return await hot.claim_due("bench", 1, datetime.now(UTC), 300)
        async with sessionmaker() as session, session.begin():
            (delivery,) = await repo.claim_due(session, "bench", 1, datetime.now(UTC), 300)
            return await repo.get_output(session, delivery.output_id)

    measured = {
        "read": await _cpu_per_call(calls, read),
        "insert": await _cpu_per_call(calls, insert),
        "outcome": await _cpu_per_call(calls, outcome),
    }
    # Due deliveries for every claim (warm-up included), queued unleased, each by a
    # request of its own (a moment apart), as a queue that builds up under load.
    due = [
        repo.NewDelivery(output_id=output_id, source="mparticle", body=BODY, index_map=[0])
        for _ in range(calls + 50)
    ]
    queued = repo.delivery_rows(due, now=now - timedelta(minutes=1))
    for position, row in enumerate(queued):
        row["next_attempt_at"] = row["queued_at"] = now - timedelta(
            minutes=1, seconds=-position / 100
        )
    await hot.insert_deliveries(queued)
    measured["claim"] = await _cpu_per_call(calls, claim)
    return measured


async def run(calls: int, rounds: int) -> None:
    name = f"relay_bench_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url, pool_size=5, max_overflow=0)
    try:
        await migrate(url)
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session, session.begin():
            output = await repo.create_output(session, name="Bench", advertiser_id="1")
            # Logged in: only a configured output's deliveries are claimed.
            await repo.set_status(session, output.id, OutputStatus.CONFIGURED)
            created = await repo.create_connection(
                session, output_id=output.id, source="mparticle", name="bench"
            )
        key, connection_id = created.connection.key, created.connection.id
        sides: dict[str, HotStatements] = {
            "session": SessionStatements(create_autocommit_sessionmaker(engine)),
            "driver": DriverStatements(engine),
        }
        figures: dict[tuple[str, str], list[float]] = {}
        for round_number in range(rounds):
            order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
            for side in order:
                measured = await _measure(
                    side, sides[side], sessionmaker, calls, output.id, connection_id, key
                )
                for label, per_call in measured.items():
                    figures.setdefault((label, side), []).append(per_call)
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; {calls} calls x {rounds} rounds; "
            "median CPU µs per call"
        )
        print(f"{'statement':10s} {'session':>9s} {'driver':>9s} {'driver/session':>15s}")
        total = {"session": 0.0, "driver": 0.0}
        for label in ("read", "insert", "outcome", "claim"):
            session_us = statistics.median(figures[(label, "session")])
            driver_us = statistics.median(figures[(label, "driver")])
            if label != "claim":  # a batch handed to a free slot is never claimed
                total["session"] += session_us
                total["driver"] += driver_us
            print(f"{label:10s} {session_us:9.0f} {driver_us:9.0f} {driver_us / session_us:15.2f}")
            if label == "outcome":
                print(
                    f"{'per batch':10s} {total['session']:9.0f} {total['driver']:9.0f} "
                    f"{total['driver'] / total['session']:15.2f}"
                )
    finally:
        await engine.dispose()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
