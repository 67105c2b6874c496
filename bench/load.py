"""Load and soak: ``relay serve --workers N`` on PostgreSQL (or SQLite), driven at increasing rates.

Three kinds of process, as in production: the Amazon emulator (``relay emulator``), the
relay (``relay serve --workers N``: API + one dispatcher per worker) on a fresh
PostgreSQL database, and this script, which posts mParticle batches of 100 purchases
(``/v2/events``) at a fixed rate per step (open loop: a send is due every 1/rate s,
whether or not earlier answers came back, at most ``--max-in-flight`` outstanding).

Per step it reports sustained batches/s and events/s (202 answers in the step), the
p50/p95/p99 ingest latency, the delivery lag (queued → delivered: the delivery row's
``queued_at`` → its ``updated_at``, written right after Amazon's 207), the CPU (% of one
core) and RSS of every relay worker and of the emulator, and the queue depth at the end
of the step. The relay is saturated at the first step where it sustains less than 90 %
of the offered rate, its p99 ingest latency or its p99 delivery lag passes 2 s, or the
queue it leaves behind takes more than ``--drain-timeout`` s to empty.

    .venv/bin/python bench/load.py [--workers 2] [--rates 5,10,20,40,80] [--step-seconds 20]
    .venv/bin/python bench/load.py --soak-minutes 30 --soak-rate 14 [--workers 2]

``--soak-minutes`` without ``--soak-rate`` first runs the ramp and soaks at
``--soak-fraction`` (70 %) of the saturation it found. The soak samples every
``--sample-seconds``: RSS of each worker, queue depth, the rate sustained and the p99
ingest latency since the previous sample; it passes when no worker's RSS grew more than
10 % from its first sample after the warm-up minute and the queue did not grow.

PostgreSQL: ``RELAY_TEST_POSTGRES_URL`` (as bench/upload_bench.py: a fresh database is
created and dropped at the end). ``--backend sqlite``: a fresh file in the work directory;
its samples also give the size of SQLite's write-ahead log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

# The sibling benchmark's process, database and login helpers (this directory is on
# sys.path when the script runs).
from upload_bench import CLIENT_ID, CLIENT_SECRET, RELAY, database, free_port, login, process

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from e2e_helpers import sdk_batch

BATCH_EVENTS = 100
SATURATED_FRACTION = 0.9
SATURATED_P99_SECONDS = 2.0
UNFINISHED = "('pending', 'in_flight')"
AUTOVACUUM_NAPTIME_SECONDS = 60.0  # PostgreSQL's default


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class BatchMaker:
    """100-purchase batches built once by mParticle's SDK; each copy gets fresh eventIds
    and a fresh shopper, so that every event of the run is distinct (Amazon would
    deduplicate repeats).

    The template is serialised once and cut at its event ids and email; a copy is the
    pieces joined around new values (tens of microseconds). Serialising a deep copy per
    batch cost the generator about 5 ms of CPU per batch, a third of the machine at the
    soak's rate, taken from the relay it measures.
    """

    _ID_MARK = 7_770_000_000_000
    _EMAIL_MARK = "shopper-mark@example.com"

    def __init__(self) -> None:
        template = sdk_batch(list(range(BATCH_EVENTS)), email=self._EMAIL_MARK)
        for position, event in enumerate(template["events"]):
            event["data"]["event_id"] = self._ID_MARK + position
        text = json.dumps(template).encode()
        marks = rb"(%d\d{%d}|%s)" % (
            self._ID_MARK // 10 ** len(str(BATCH_EVENTS)),
            len(str(BATCH_EVENTS)),
            re.escape(self._EMAIL_MARK.encode()),
        )
        self.pieces = re.split(marks, text)
        self.email_slots = [
            i for i in range(1, len(self.pieces), 2) if self.pieces[i] == self._EMAIL_MARK.encode()
        ]
        self.id_slots = [i for i in range(1, len(self.pieces), 2) if i not in self.email_slots]
        assert len(self.id_slots) == BATCH_EVENTS
        assert len(self.email_slots) == 1
        self.next_id = 1

    def make(self) -> bytes:
        pieces = list(self.pieces)
        for slot in self.id_slots:
            pieces[slot] = b"%d" % self.next_id
            self.next_id += 1
        for slot in self.email_slots:
            pieces[slot] = b"shopper%d@example.com" % self.next_id
        return b"".join(pieces)


@dataclass
class Window:
    """What the load generator saw between two readings."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    accepted_batches: int = 0
    skipped: int = 0  # sends not made: max_in_flight was reached (the relay fell behind)

    def record(self, status: str, latency: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == "202":
            self.accepted_batches += 1
            self.latencies.append(latency)


class Load:
    """Posts batches at a given rate until told to stop; readings by window."""

    def __init__(self, relay_url: str, auth: tuple[str, str], max_in_flight: int) -> None:
        # aiohttp, as bench/e2e_bench.py's generator: httpx cost about 2 ms of CPU per
        # 50 KB post, which the relay would lose to its own load generator.
        self.relay_url = relay_url
        basic = base64.b64encode(":".join(auth).encode()).decode()
        self.client = aiohttp.ClientSession(
            headers={"authorization": f"Basic {basic}"},
            timeout=aiohttp.ClientTimeout(total=30),
            connector=aiohttp.TCPConnector(limit=max_in_flight),
        )
        self.maker = BatchMaker()
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.window = Window()

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window

    async def _send(self, body: bytes) -> None:
        self.in_flight += 1
        began = time.monotonic()
        try:
            async with self.client.post(
                f"{self.relay_url}/v2/events",
                data=body,
                headers={"content-type": "application/json"},
            ) as answer:
                await answer.read()
                status = str(answer.status)
        except (aiohttp.ClientError, TimeoutError) as error:
            status = type(error).__name__
        finally:
            self.in_flight -= 1
        self.window.record(status, time.monotonic() - began)

    async def run(self, rate: float, seconds: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        began = time.monotonic()
        sent = 0
        while True:
            due = began + sent / rate
            if due - began >= seconds:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent += 1
            if self.in_flight >= self.max_in_flight:
                self.window.skipped += 1
                continue
            task = asyncio.create_task(self._send(self.maker.make()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)


class Processes:
    """CPU and RSS of the relay's workers and of the emulator, between readings."""

    def __init__(self, relay_pid: int, emulator_pid: int) -> None:
        supervisor = psutil.Process(relay_pid)
        # The uvicorn workers, not multiprocessing's resource tracker (also a child).
        workers = [
            child
            for child in supervisor.children(recursive=True)
            if "resource_tracker" not in " ".join(child.cmdline())
        ] or [supervisor]
        self.named = {f"worker{i + 1}": p for i, p in enumerate(workers)}
        self.named["emulator"] = psutil.Process(emulator_pid)
        # This load generator shares the machine's two cores with the relay: its own
        # share shows how much of the machine was left for the relay.
        self.named["load_generator"] = psutil.Process()
        self._cpu = self._cpu_now()
        psutil.cpu_percent()  # starts the machine-wide reading
        self._at = time.monotonic()

    def _cpu_now(self) -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in self.named.items()}

    def reading(self) -> dict[str, dict[str, float]]:
        cpu, at = self._cpu_now(), time.monotonic()
        elapsed = at - self._at
        found = {
            name: {
                "cpu_percent": round(100 * (cpu[name] - self._cpu[name]) / elapsed, 1),
                "rss_mb": round(p.memory_info().rss / 2**20, 1),
            }
            for name, p in self.named.items()
        }
        self._cpu, self._at = cpu, at
        # The whole machine (other processes included: PostgreSQL, other test runs).
        found["machine"] = {"cpu_percent": psutil.cpu_percent(), "rss_mb": float("nan")}
        return found


class Database:
    """Queries on the relay's database, through a psycopg-free asyncpg engine."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import make_url
        from sqlalchemy.ext.asyncio import create_async_engine

        self.sqlite = url.startswith("sqlite")
        self.file = Path(make_url(url).database or "") if self.sqlite else None
        self.engine = create_async_engine(url, **({} if self.sqlite else {"pool_size": 2}))

    def wal_mb(self) -> float | None:
        """SQLite's write-ahead log: it must not grow without bound under load."""
        if self.file is None:
            return None
        wal = self.file.with_name(self.file.name + "-wal")
        return round(wal.stat().st_size / 2**20, 1) if wal.exists() else 0.0

    async def scalar(self, sql: str) -> Any:
        from sqlalchemy import text

        async with self.engine.connect() as connection:
            return (await connection.execute(text(sql))).scalar()

    async def autovacuum_off(self) -> bool:
        return not self.sqlite and await self.scalar("SHOW autovacuum") == "off"

    async def vacuum_forever(self, interval: float) -> None:
        """What autovacuum would do for the queue table, for servers that run without it.

        The deliveries table is a queue: every row is updated once or twice, and its
        dead index entries slow the dispatcher's claim until a vacuum clears them.
        PostgreSQL vacuums it by itself (autovacuum is on by default, with a one-minute
        naptime); a server with it off (this machine's, for CI) let 215,000 dead rows
        pile up in the seventh soak, and the claim query took 0.3 s by minute 22."""
        from sqlalchemy import text

        while True:
            await asyncio.sleep(interval)
            async with self.engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(text("VACUUM (ANALYZE) deliveries"))

    async def queue_depth(self) -> int:
        sql = f"SELECT count(*) FROM deliveries WHERE status IN {UNFINISHED}"
        return int(await self.scalar(sql))

    async def lags(self, since_epoch: float, until_epoch: float) -> list[float]:
        from sqlalchemy import text

        if self.sqlite:  # times are stored as UTC text
            sql = text(
                "SELECT (julianday(updated_at) - julianday(queued_at)) * 86400 FROM deliveries"
                " WHERE status = 'delivered'"
                " AND queued_at >= strftime('%Y-%m-%d %H:%M:%f', :since, 'unixepoch')"
                " AND queued_at < strftime('%Y-%m-%d %H:%M:%f', :until, 'unixepoch')"
            )
        else:
            sql = text(
                "SELECT EXTRACT(EPOCH FROM updated_at - queued_at) FROM deliveries"
                " WHERE status = 'delivered' AND queued_at >= to_timestamp(:since)"
                " AND queued_at < to_timestamp(:until)"
            )
        async with self.engine.connect() as connection:
            rows = await connection.execute(sql, {"since": since_epoch, "until": until_epoch})
            return [float(lag) for (lag,) in rows]

    async def wait_drained(self, limit: float) -> float | None:
        """Seconds until no delivery is pending or in flight; None if it took longer."""
        began = time.monotonic()
        while await self.queue_depth():
            if time.monotonic() - began > limit:
                return None
            await asyncio.sleep(0.25)
        return time.monotonic() - began


async def step(
    load: Load, db: Database, procs: Processes, rate: float, seconds: float, drain_timeout: float
) -> dict[str, Any]:
    load.take_window()
    procs.reading()
    since = time.time()
    await load.run(rate, seconds)
    took = time.time() - since
    window = load.take_window()
    usage = procs.reading()
    depth = await db.queue_depth()
    drained = await db.wait_drained(drain_timeout)
    lags = await db.lags(since, time.time())
    batches_per_second = window.accepted_batches / took
    p99 = percentile(window.latencies, 0.99)
    reasons = []
    if batches_per_second < SATURATED_FRACTION * rate:
        reasons.append(f"sustained {batches_per_second:.1f} of {rate:g} batches/s offered")
    if p99 > SATURATED_P99_SECONDS:
        reasons.append(f"p99 ingest latency {p99:.2f} s")
    if drained is None:
        reasons.append(f"queue of {depth} not drained within {drain_timeout:g} s")
    # Accepting is not sustaining: a relay that answers 202 at this rate but delivers
    # seconds behind is building a backlog that a longer run would not survive.
    lag_p99 = percentile(lags, 0.99)
    if lag_p99 > SATURATED_P99_SECONDS:
        reasons.append(f"p99 delivery lag {lag_p99:.2f} s")
    return {
        "offered_batches_per_second": rate,
        "batches_per_second": round(batches_per_second, 1),
        "events_per_second": round(batches_per_second * BATCH_EVENTS),
        "answers": window.statuses,
        "not_sent_max_in_flight": window.skipped,
        "ingest_p50_ms": round(1000 * percentile(window.latencies, 0.5), 1),
        "ingest_p95_ms": round(1000 * percentile(window.latencies, 0.95), 1),
        "ingest_p99_ms": round(1000 * p99, 1),
        "lag_p50_ms": round(1000 * percentile(lags, 0.5), 1),
        "lag_p95_ms": round(1000 * percentile(lags, 0.95), 1),
        "lag_p99_ms": round(1000 * percentile(lags, 0.99), 1),
        "queue_depth_at_step_end": depth,
        "drain_seconds": None if drained is None else round(drained, 1),
        "processes": usage,
        "saturated": reasons,
    }


async def ramp(
    load: Load, db: Database, procs: Processes, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], float | None]:
    """Steps at each rate until one saturates; the results and the highest rate sustained."""
    results: list[dict[str, Any]] = []
    best: float | None = None
    for rate in args.rates:
        result = await step(load, db, procs, rate, args.step_seconds, args.drain_timeout)
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
        if result["saturated"]:
            break
        best = rate
    return results, best


async def soak(
    load: Load, db: Database, procs: Processes, rate: float, minutes: float, sample: float
) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    began = time.monotonic()
    runner = asyncio.create_task(load.run(rate, minutes * 60))
    load.take_window()
    procs.reading()
    last = time.monotonic()
    while not runner.done():
        await asyncio.wait({runner}, timeout=sample)
        now = time.monotonic()
        window = load.take_window()
        usage = procs.reading()
        entry = {
            "minute": round((now - began) / 60, 2),
            "batches_per_second": round(window.accepted_batches / (now - last), 1),
            "answers": window.statuses,
            "ingest_p99_ms": round(1000 * percentile(window.latencies, 0.99), 1),
            "queue_depth": await db.queue_depth(),
            **({} if db.file is None else {"wal_mb": db.wal_mb()}),
            "rss_mb": {name: u["rss_mb"] for name, u in usage.items()},
            "cpu_percent": {name: u["cpu_percent"] for name, u in usage.items()},
        }
        last = now
        samples.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    drained = await db.wait_drained(120)
    # Memory is compared from the first sample after a minute of warm-up (caches, pools
    # and the allocator's arenas fill during the first minute) to the last sample.
    warm = next((s for s in samples if s["minute"] >= 1.0), samples[0])
    last_sample = samples[-1]
    growth = {
        name: round(100 * (last_sample["rss_mb"][name] / warm["rss_mb"][name] - 1), 1)
        for name in warm["rss_mb"]
        if name.startswith("worker")
    }
    depths = [s["queue_depth"] for s in samples]
    half = len(depths) // 2
    return {
        "rate_batches_per_second": rate,
        "minutes": minutes,
        "rss_first_mb": samples[0]["rss_mb"],
        "rss_warm_mb": warm["rss_mb"],
        "rss_last_mb": last_sample["rss_mb"],
        "rss_growth_percent_since_warm": growth,
        "queue_depth_max": max(depths),
        "queue_depth_mean_first_half": round(statistics.fmean(depths[:half] or depths), 1),
        "queue_depth_mean_second_half": round(statistics.fmean(depths[half:]), 1),
        "drained_after_seconds": None if drained is None else round(drained, 1),
        "samples": samples,
        "memory_flat": all(g <= 10.0 for g in growth.values()),
    }


@contextmanager
def stack(
    workers: int, workdir: Path, backend: str = "postgresql"
) -> Iterator[tuple[str, str, str, int, int]]:
    """Emulator and ``relay serve --workers N`` on a fresh database."""
    amazon_port, relay_port = free_port(), free_port()
    amazon, relay = f"http://127.0.0.1:{amazon_port}", f"http://127.0.0.1:{relay_port}"
    admin_token = secrets.token_urlsafe(24)
    with ExitStack() as exits:
        database_url = exits.enter_context(database(backend, workdir))
        env = {
            **os.environ,
            "RELAY_DATABASE_URL": database_url,
            "RELAY_KEY_FILE": str(workdir / "relay.key"),
            "RELAY_ADMIN_TOKEN": admin_token,
            "RELAY_LWA_CLIENT_ID": CLIENT_ID,
            "RELAY_LWA_CLIENT_SECRET": CLIENT_SECRET,
            "RELAY_AMAZON_API_URL": amazon,
            "RELAY_LWA_AUTHORIZE_URL": f"{amazon}/ap/oa",
            "RELAY_LWA_TOKEN_URL": f"{amazon}/auth/o2/token",
            "RELAY_PUBLIC_URL": relay,
            "RELAY_LOG_FORMAT": "json",
        }
        emulator_proc = exits.enter_context(
            process([RELAY, "emulator", "--port", str(amazon_port)], env, workdir / "emu.log")
        )
        relay_proc = exits.enter_context(
            process(
                [RELAY, "serve", "--port", str(relay_port), "--workers", str(workers)],
                env,
                workdir / "relay.log",
            )
        )
        from upload_bench import wait_http

        wait_http(f"{amazon}/_emulator/stats")
        wait_http(f"{relay}/healthz")
        # Every worker must be up before the first reading of their CPU and RSS; with
        # more than one, uvicorn's supervisor also starts multiprocessing's tracker.
        expected_children = workers + 1 if workers > 1 else 0
        deadline = time.monotonic() + 30
        while len(psutil.Process(relay_proc.pid).children(recursive=True)) < expected_children:
            if time.monotonic() > deadline:
                raise RuntimeError("the relay's workers did not start")
            time.sleep(0.1)
        yield relay, admin_token, database_url, relay_proc.pid, emulator_proc.pid


def connection(relay: str, admin_token: str) -> tuple[str, str]:
    """An output logged in with Login with Amazon, and an mParticle connection's key and
    secret."""
    with httpx.Client(
        base_url=relay, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
    ) as client:
        output = client.post("/v1/outputs", json={"name": "Load", "advertiser_id": "1234567890"})
        output_id = output.json()["id"]
        login(client, output_id)
        created = client.post(
            f"/v1/outputs/{output_id}/connections", json={"source": "mparticle", "name": "load"}
        ).json()
    return created["key"], created["secret"]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "python": platform.python_version(),
        "workers": args.workers,
        "backend": args.backend,
        "batch_events": BATCH_EVENTS,
    }
    # The processes and the database are set up outside the event loop: the database
    # helper runs its own.
    with stack(args.workers, workdir, args.backend) as (
        relay,
        admin_token,
        database_url,
        relay_pid,
        emu_pid,
    ):
        auth = connection(relay, admin_token)
        procs = Processes(relay_pid, emu_pid)
        report |= asyncio.run(measure(args, relay, auth, database_url, procs))
    return report


async def measure(
    args: argparse.Namespace,
    relay: str,
    auth: tuple[str, str],
    database_url: str,
    procs: Processes,
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    load = Load(relay, auth, args.max_in_flight)
    db = Database(database_url)
    vacuuming = None
    if await db.autovacuum_off():
        report["vacuum_stand_in_seconds"] = AUTOVACUUM_NAPTIME_SECONDS
        vacuuming = asyncio.create_task(db.vacuum_forever(AUTOVACUUM_NAPTIME_SECONDS))
    try:
        soak_rate = args.soak_rate
        if args.soak_minutes is None or soak_rate is None:
            steps, best = await ramp(load, db, procs, args)
            report["ramp"] = steps
            report["highest_sustained_batches_per_second"] = best
            saturated = next((s for s in steps if s["saturated"]), None)
            report["saturated_at"] = (
                None
                if saturated is None
                else {
                    "offered_batches_per_second": saturated["offered_batches_per_second"],
                    "why": saturated["saturated"],
                }
            )
            if soak_rate is None and best is not None:
                soak_rate = round(args.soak_fraction * best, 1)
        if args.soak_minutes is not None and soak_rate is not None:
            report["soak"] = await soak(
                load, db, procs, soak_rate, args.soak_minutes, args.sample_seconds
            )
    finally:
        if vacuuming is not None:
            vacuuming.cancel()
            with suppress(asyncio.CancelledError):
                await vacuuming
        await load.client.close()
        await db.engine.dispose()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",")],
        default=[5.0, 10.0, 20.0, 40.0, 80.0, 160.0],
        help="batches/s per step, comma-separated",
    )
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--soak-minutes", type=float)
    parser.add_argument(
        "--soak-rate", type=float, help="batches/s (default: a fraction of the ramp's)"
    )
    parser.add_argument("--soak-fraction", type=float, default=0.7)
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relay-load-"))
    try:
        report = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
