"""End-to-end throughput of the relay on one worker, next to its two ceilings (issue 4).

Real processes on loopback, as in production: the Amazon emulator (``relay emulator``)
as upstream; the relay (``relay serve``: ingest API + dispatcher) on a fresh SQLite file
or a fresh PostgreSQL database, its output logged in with Login with Amazon against the
emulator and an mParticle connection created over the admin API; and a load generator
in its own process posting realistic 100-event mParticle batches (``POST /v2/events``,
HTTP Basic with the connection's key and secret, distinct event ids in every batch).

Phases, each ``--seconds`` long, on the same bodies:

- read ceiling: a one-worker FastAPI endpoint that reads the body and answers 202;
- pass-through ceiling: one that reads the body and forwards the batch once to the
  emulator, measured with each of httpx, httpx2 and aiohttp (``http_clients.CLIENTS``);
  the fastest is the ceiling. It forwards the batch's Events API request, mapped before
  the run, so that the emulator does the same work for the ceiling as for the relay
  (validate and echo 100 valid events). The fastest client is measured again after the
  relay, and the faster of its two runs counts;
- relay, one worker, closed loop at ``--concurrency``: accepted batches/s, the sustained
  rate (batches accepted in the window, per second from the window's start until the
  last of them was delivered: delivery must keep up), batches delivered inside the
  window, p50/p99 ingest latency and delivery lag (the load generator's 202 → the
  relay's record of Amazon's 207 for that batch, ``deliveries.updated_at``);
- relay, one worker, open loop at half the sustained rate: p99 ingest latency there
  (timed from each request's scheduled send time, so a late generator counts against
  the relay rather than hiding its stalls);
- relay, two workers (``--workers 2``), closed loop, unconstrained: what two workers add
  on cores that the emulator, the load generator and the database also need;
- relay, one worker and two workers, each worker held by the kernel to ``--worker-cpu``
  of a core (bench/cpu_share.py), alternated ``HELD_ROUNDS`` times: linearity in the
  number of workers, with the rest of the machine left room (decision 0018). Each
  worker is offered ``--concurrency`` requests in flight, so two workers get twice the
  closed loop of one (decision 0023); ``--held-load shared`` offers the two of them one
  ``--concurrency`` between them instead.

Every phase also reports the CPU each process spent per batch. Their sum does not move
with other load on a shared machine as the rates do, so the bench prints the ratio of
the pass-through's sum to the relay's as well (the PostgreSQL server is not counted).

    .venv/bin/python bench/e2e_bench.py [--seconds 10] [--backend sqlite|postgresql|both]
        [--concurrency 16] [--worker-cpu 0.35] [--held-load per-worker|shared]
        [--profile DIR] [--json]

``--profile DIR`` runs the one-worker relay under cProfile (slower: its figures are not
the benchmark's) and prints where its time goes.

PostgreSQL: ``RELAY_TEST_POSTGRES_URL`` (default postgresql+asyncpg://postgres@127.0.0.1:5432/test)
names a server where the role may CREATE DATABASE; the benchmark makes its own database
and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import math
import multiprocessing
import os
import platform
import pstats
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import psutil
from fastapi import FastAPI, Request, Response

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# bench/ is not a package: its scripts import each other from this directory.
from cpu_share import CpuShares, available, workers_of
from http_clients import CLIENTS, Forwarder
from upload_bench import (
    CLIENT_ID,
    CLIENT_SECRET,
    RELAY,
    database,
    free_port,
    login,
    wait_http,
)

ADVERTISER_ID = "1234567890"
EVENTS_PER_BATCH = 100
USERS = 50  # distinct shoppers the batches cycle through
# Every event id holds this marker; each batch replaces it with its own 10-digit
# number, in the inbound body and in its pre-mapped Events API request alike.
MARKER = b"BATCHMARKR"
WARMUP_SECONDS = 2.0
DRAIN_TIMEOUT_SECONDS = 180.0
LINEAR_SHARE = 0.9  # "linear": N workers give at least 90 % of N times one worker
HELD_ROUNDS = 3  # one and two workers held to a share of a core, alternated this often


# --- the data ----------------------------------------------------------------------------


def corpus(now_ms: int) -> tuple[list[bytes], list[bytes]]:
    """Inbound mParticle batches (one per shopper) and the Events API request of each.

    The batches are bench/mapper_bench.py's realistic ones (3 products per purchase,
    email + phone + MAID, consent state, custom attributes, about 50 KB), with event
    times in the last minute and event ids carrying MARKER.
    """
    from mapper_bench import make_batch

    from app.amazon.settings import OutputSettings
    from app.pipeline import map_payload

    inbound, outbound = [], []
    for user in range(USERS):
        batch = orjson.loads(make_batch(user, EVENTS_PER_BATCH))
        for position, event in enumerate(batch["events"]):
            event["data"]["event_id"] = f"{MARKER.decode()}-{position:03d}"
            event["data"]["timestamp_unixtime_ms"] = now_ms - 60_000 + position * 100
        body = orjson.dumps(batch)
        result = map_payload("mparticle", body, settings=OutputSettings(), now=datetime.now(UTC))
        if result.forwarded != EVENTS_PER_BATCH or len(result.requests) != 1:
            raise RuntimeError(f"the corpus batch maps to {result.as_dict()}")
        request = orjson.dumps(result.requests[0])
        if request.count(MARKER) != EVENTS_PER_BATCH:
            raise RuntimeError("the mapped request does not carry the inbound event ids")
        inbound.append(body)
        outbound.append(request)
    return inbound, outbound


def body_of(templates: list[bytes], number: int) -> bytes:
    return templates[number % len(templates)].replace(MARKER, b"%010d" % number)


# --- the load generator (its own process) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str
    headers: dict[str, str]
    templates: list[bytes]
    first_batch: int
    seconds: float
    concurrency: int = 16  # closed loop: requests in flight
    rate: float | None = None  # open loop: batches/s, sent on schedule
    relay: bool = False  # read the relay's answer: accepted events and delivery ids


@dataclass(slots=True)
class Sent:
    batch: int
    latency: float  # seconds, from the send (closed loop) or the scheduled send (open loop)
    status: int
    done_wall: float  # time.time() when the answer was read
    in_window: bool  # answered before the window closed
    accepted: int = 0
    deliveries: tuple[str, ...] = ()


@dataclass(slots=True)
class LoadResult:
    window_start: float  # wall clock
    window_end: float
    sent: list[Sent]
    cpu_seconds: float
    max_lateness: float = 0.0  # open loop: how far behind schedule a send started


def load_process(spec: LoadSpec, pipe: Connection) -> None:
    pipe.send(asyncio.run(_load(spec)))
    pipe.close()


async def _load(spec: LoadSpec) -> LoadResult:
    import aiohttp

    limit = spec.concurrency if spec.rate is None else 1024
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=60)
    sent: list[Sent] = []
    numbers = itertools.count(spec.first_batch)
    headers = {**spec.headers, "Content-Type": "application/json"}
    cpu_before = _own_cpu()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(number: int, started: float, stop: float) -> None:
            body = body_of(spec.templates, number)
            async with session.post(
                spec.url, data=body, headers={**headers, "X-Bench-Batch": str(number)}
            ) as answer:
                payload = await answer.read()
                status = answer.status
            done = time.perf_counter()
            record = Sent(number, done - started, status, time.time(), done <= stop)
            if spec.relay and status == 202:
                parsed = orjson.loads(payload)
                record.accepted = parsed["accepted"]
                record.deliveries = tuple(parsed["deliveries"])
            sent.append(record)

        start_wall, start = time.time(), time.perf_counter()
        stop = start + spec.seconds
        max_lateness = 0.0
        if spec.rate is None:

            async def closed_loop() -> None:
                while (now := time.perf_counter()) < stop:
                    await post(next(numbers), now, stop)

            await asyncio.gather(*(closed_loop() for _ in range(spec.concurrency)))
        else:
            tasks = []
            for k in itertools.count():
                scheduled = start + k / spec.rate
                if scheduled >= stop:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                max_lateness = max(max_lateness, time.perf_counter() - scheduled)
                # Every request scheduled inside the window counts, even one answered
                # after it closed: the rate offered is the rate measured.
                tasks.append(asyncio.create_task(post(next(numbers), scheduled, math.inf)))
            await asyncio.gather(*tasks)
    return LoadResult(
        window_start=start_wall,
        window_end=start_wall + spec.seconds,
        sent=sent,
        cpu_seconds=_own_cpu() - cpu_before,
        max_lateness=max_lateness,
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(spec: LoadSpec) -> LoadResult:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=load_process, args=(spec, sender), daemon=True)
    child.start()
    sender.close()
    try:
        result: LoadResult = receiver.recv()
    finally:
        child.join(timeout=30)
    return result


# --- the two ceilings (a one-worker uvicorn process each) --------------------------------


def ceiling_app(kind: str, upstream: str, token: str, outbound: list[bytes]) -> Any:
    state: dict[str, Forwarder] = {}
    forward_headers = {
        "Authorization": f"Bearer {token}",
        "Amazon-Ads-ClientId": CLIENT_ID,
        "Amazon-Ads-AccountId": ADVERTISER_ID,
        "Content-Type": "application/json",
        "Accept": "application/json",
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if kind != "read":
            # The pool sized as the relay's is for its dispatcher (64 in flight, plus 8).
            state["client"] = Forwarder(kind, 72)
        yield
        if kind != "read":
            await state["client"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v2/events")
    async def events(request: Request) -> Response:
        await request.body()
        if kind == "read":
            return Response(status_code=202)
        body = body_of(outbound, int(request.headers["x-bench-batch"]))
        status = await state["client"].post(upstream, body, forward_headers)
        return Response(status_code=202 if status == 207 else 502)

    return app


def serve_ceiling(kind: str, port: int, upstream: str, token: str, outbound: list[bytes]) -> None:
    import uvicorn

    app = ceiling_app(kind, upstream, token, outbound)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False)


@contextmanager
def ceiling_server(
    kind: str, upstream: str, token: str, outbound: list[bytes]
) -> Iterator[tuple[str, int]]:
    port = free_port()
    context = multiprocessing.get_context("spawn")
    server = context.Process(
        target=serve_ceiling, args=(kind, port, upstream, token, outbound), daemon=True
    )
    server.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/docs")
        assert server.pid is not None
        yield f"http://127.0.0.1:{port}/v2/events", server.pid
    finally:
        server.terminate()
        server.join()


def emulator_token(amazon: str) -> str:
    """An access token for the pass-through ceiling: the code flow, as the relay does it."""
    from app.amazon.endpoints import SCOPE

    redirect_uri = "http://127.0.0.1:9/ceiling-callback"  # never visited: the code is read
    authorize = httpx.get(
        f"{amazon}/ap/oa",
        params={
            "client_id": CLIENT_ID,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": SCOPE,
        },
    )
    code = parse_qs(urlsplit(authorize.headers["location"]).query)["code"][0]
    tokens = httpx.post(
        f"{amazon}/auth/o2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )
    tokens.raise_for_status()
    token: str = tokens.json()["access_token"]
    return token


# --- measuring ---------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (``relay serve --workers N``)."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return float("nan")


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of each PostgreSQL server process on this machine, by pid. The only
    database work during a phase is the relay's (the ceilings use none), so the growth
    between two readings is the database's share of the relay's batches."""
    found: dict[int, float] = {}
    for proc in psutil.process_iter(["username", "cpu_times"]):
        times = proc.info["cpu_times"]
        if proc.info["username"] == "postgres" and times is not None:
            found[proc.pid] = times.user + times.system
    return found


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@dataclass(slots=True)
class Phase:
    name: str
    seconds: float
    answered: int  # 202s answered inside the window
    errors: int  # answers other than 202, anywhere
    latencies_ms: list[float]
    cpu_seconds: dict[str, float]
    max_lateness_ms: float = 0.0
    offered_rate: float | None = None
    delivered_in_window: int | None = None
    lags_ms: list[float] = field(default_factory=list)
    drain_seconds: float | None = None
    last_delivered: float | None = None  # seconds from the window's start
    idle_share: float | None = None  # of the machine's CPU time in the window, unused
    quota_cores: float | None = None  # the relay's workers' CPU shares added up
    throttled: list[float] = field(default_factory=list)  # per worker: periods held back

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    @property
    def sustained(self) -> float:
        """Batches accepted in the window and delivered, per second from the window's start
        until the last of them was delivered (for a ceiling: answered per second).

        The delivery must keep up: a relay that accepts fast and delivers later pays
        for the backlog it leaves, and one that accepts nothing while it delivers
        pays for that pause.
        """
        if self.last_delivered is None:
            return self.rate
        return self.answered / max(self.seconds, self.last_delivered)

    @property
    def delivered_in_window_rate(self) -> float | None:
        if self.delivered_in_window is None:
            return None
        return self.delivered_in_window / self.seconds

    def summary(self) -> dict[str, Any]:
        batches = max(self.answered, 1)
        return {
            "phase": self.name,
            "offered_batches_per_s": self.offered_rate,
            "answered_batches_per_s": round(self.rate, 1),
            "sustained_batches_per_s": round(self.sustained, 1),
            "delivered_in_window_per_s": (
                None
                if self.delivered_in_window_rate is None
                else round(self.delivered_in_window_rate, 1)
            ),
            "errors": self.errors,
            "ingest_p50_ms": round(percentile(self.latencies_ms, 0.50), 1),
            "ingest_p99_ms": round(percentile(self.latencies_ms, 0.99), 1),
            "lag_p50_ms": round(percentile(self.lags_ms, 0.50), 1) if self.lags_ms else None,
            "lag_p99_ms": round(percentile(self.lags_ms, 0.99), 1) if self.lags_ms else None,
            "drain_seconds": self.drain_seconds,
            "machine_idle_share": self.idle_share,
            "relay_quota_cores": self.quota_cores,
            "worker_periods_throttled": [round(t, 3) for t in self.throttled],
            "generator_max_lateness_ms": round(self.max_lateness_ms, 1),
            "cpu_ms_per_batch": {
                name: round(seconds * 1000 / batches, 2)
                for name, seconds in self.cpu_seconds.items()
            },
        }


class Numbers:
    """Batch numbers, never reused in a run: every batch has its own event ids."""

    def __init__(self) -> None:
        self._next = 1

    def take(self, count: int = 10_000_000) -> int:
        first, self._next = self._next, self._next + count
        return first


def measure(
    name: str,
    spec: LoadSpec,
    pids: dict[str, int],
) -> tuple[Phase, LoadResult]:
    before = {label: tree_cpu(pid) for label, pid in pids.items()}
    database_before = postgres_cpu()
    machine_before = psutil.cpu_times()
    result = run_load(spec)
    machine_after = psutil.cpu_times()
    cpu = {label: tree_cpu(pid) - before[label] for label, pid in pids.items()}
    cpu["load generator"] = result.cpu_seconds
    # Backends started during the phase count from zero; those that ended are not seen.
    database = sum(
        seconds - database_before.get(pid, 0.0) for pid, seconds in postgres_cpu().items()
    )
    if database > 0.01:
        cpu["postgres"] = database
    phase = Phase(
        name=name,
        seconds=spec.seconds,
        answered=sum(1 for s in result.sent if s.status == 202 and s.in_window),
        errors=sum(1 for s in result.sent if s.status != 202),
        latencies_ms=[s.latency * 1000 for s in result.sent if s.status == 202],
        cpu_seconds=cpu,
        max_lateness_ms=result.max_lateness * 1000,
        offered_rate=spec.rate,
        idle_share=round(
            (machine_after.idle - machine_before.idle) / (sum(machine_after) - sum(machine_before)),
            3,
        ),
    )
    return phase, result


# --- the relay ---------------------------------------------------------------------------


@contextmanager
def process(
    args: list[str], env: dict[str, str], log: Path, stop: signal.Signals = signal.SIGTERM
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(stop)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Deliveries:
    """The relay's deliveries table, read by the bench: one connection, kept for the run
    (the PostgreSQL server is shared: a connection per poll could find it full)."""

    def __init__(self, database_url: str) -> None:
        from app.db.session import create_engine

        self._loop = asyncio.new_event_loop()
        self._engine = create_engine(database_url, pool_size=1, max_overflow=0)

    def unfinished(self) -> int:
        from sqlalchemy import func, select

        from app.db.models import Delivery

        query = select(func.count()).where(Delivery.status.in_(("pending", "in_flight")))
        return int(self._rows(query)[0][0])

    def outcomes(self) -> dict[str, tuple[str, float]]:
        """Every delivery's status and the time its outcome was recorded."""
        from sqlalchemy import select

        from app.db.models import Delivery

        rows = self._rows(select(Delivery.id, Delivery.status, Delivery.updated_at))
        # Through the ORM column type: aware UTC datetimes on both databases.
        return {row.id: (row.status, row.updated_at.timestamp()) for row in rows}

    def _rows(self, query: Any) -> list[Any]:
        async def execute() -> list[Any]:
            async with self._engine.connect() as connection:
                return list((await connection.execute(query)).all())

        return self._loop.run_until_complete(execute())

    def drain(self) -> float:
        """Wait until no delivery is pending or in flight; the seconds it took."""
        began = time.monotonic()
        while self.unfinished():
            if time.monotonic() - began > DRAIN_TIMEOUT_SECONDS:
                raise RuntimeError("the relay did not deliver its queue in time")
            time.sleep(0.05)
        return time.monotonic() - began

    def close(self) -> None:
        self._loop.run_until_complete(self._engine.dispose())
        self._loop.close()


def relay_phase(name: str, spec: LoadSpec, pids: dict[str, int], deliveries: Deliveries) -> Phase:
    """One measured load on the relay, drained, with the delivery time of every batch."""
    phase, result = measure(name, spec, pids)
    phase.drain_seconds = round(deliveries.drain(), 2)
    outcomes = deliveries.outcomes()
    delivered_in_window, lags, last_delivered = 0, [], 0.0
    for sent in result.sent:
        if sent.status != 202:
            continue
        if sent.accepted != EVENTS_PER_BATCH or len(sent.deliveries) != 1:
            raise RuntimeError(f"batch {sent.batch}: {sent.accepted} events accepted")
        status, delivered_at = outcomes[sent.deliveries[0]]
        if status != "delivered":
            raise RuntimeError(f"batch {sent.batch}: delivery {status}")
        lags.append((delivered_at - sent.done_wall) * 1000)
        if not sent.in_window:
            continue
        last_delivered = max(last_delivered, delivered_at - result.window_start)
        if delivered_at <= result.window_end:
            delivered_in_window += 1
    phase.delivered_in_window = delivered_in_window
    phase.last_delivered = last_delivered
    phase.lags_ms = lags
    return phase


def wait_workers(pid: int, count: int, timeout: float = 30.0) -> list[int]:
    """The worker processes of ``relay serve --workers count``, once all have started."""
    deadline = time.monotonic() + timeout
    while len(found := workers_of(pid, count)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"relay serve started {len(found)} of {count} workers")
        time.sleep(0.1)
    return found


def share_label(workers: int, share: float) -> str:
    if workers == 1:
        return f"relay, 1 worker, {share:g} core"
    return f"relay, {workers} workers, {share:g} core each"


def relay_env(
    database_url: str, workdir: Path, amazon: str, relay: str, admin: str
) -> dict[str, str]:
    return {
        **os.environ,
        "RELAY_DATABASE_URL": database_url,
        "RELAY_KEY_FILE": str(workdir / "relay.key"),
        "RELAY_ADMIN_TOKEN": admin,
        "RELAY_LWA_CLIENT_ID": CLIENT_ID,
        "RELAY_LWA_CLIENT_SECRET": CLIENT_SECRET,
        "RELAY_AMAZON_API_URL": amazon,
        "RELAY_LWA_AUTHORIZE_URL": f"{amazon}/ap/oa",
        "RELAY_LWA_TOKEN_URL": f"{amazon}/auth/o2/token",
        "RELAY_PUBLIC_URL": relay,
        "RELAY_LOG_FORMAT": "json",
    }


def connect(relay: str, admin: str) -> dict[str, str]:
    """An output logged in with Login with Amazon and an mParticle connection to it."""
    with httpx.Client(
        base_url=relay, headers={"Authorization": f"Bearer {admin}"}, timeout=30
    ) as client:
        output = client.post(
            "/v1/outputs", json={"name": "Bench", "advertiser_id": ADVERTISER_ID}
        ).json()
        login(client, output["id"])
        created = client.post(
            f"/v1/outputs/{output['id']}/connections",
            json={"source": "mparticle", "name": "bench"},
        ).json()
    basic = base64.b64encode(f"{created['key']}:{created['secret']}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


# --- one backend -------------------------------------------------------------------------


@dataclass(slots=True)
class BackendRun:
    backend: str
    phases: dict[str, Phase] = field(default_factory=dict)
    profile: Path | None = None


def run_backend(
    backend: str,
    args: argparse.Namespace,
    amazon: str,
    emulator_pid: int,
    inbound: list[bytes],
    outbound: list[bytes],
    numbers: Numbers,
    workdir: Path,
) -> BackendRun:
    run = BackendRun(backend)
    seconds, concurrency = args.seconds, args.concurrency
    upstream = f"{amazon}/adsApi/v1/create/events"
    token = emulator_token(amazon)

    def spec(url: str, headers: dict[str, str], **options: Any) -> LoadSpec:
        options.setdefault("seconds", seconds)
        options.setdefault("concurrency", concurrency)
        return LoadSpec(url, headers, inbound, numbers.take(), **options)

    def ceiling(kind: str, label: str) -> None:
        with ceiling_server(kind, upstream, token, outbound) as (url, pid):
            run_load(spec(url, {}, seconds=WARMUP_SECONDS))
            phase, _ = measure(label, spec(url, {}), {"server": pid, "emulator": emulator_pid})
            run.phases[label] = phase
        print(f"  {label}: {phase.rate:.0f} batches/s", file=sys.stderr)

    # The ceilings: the same bodies, the same generator, the same emulator. The fastest
    # pass-through client is measured again after the relay, and the faster of its two
    # runs is the ceiling: other load on a shared machine must not lower the bar.
    ceiling("read", "read ceiling")
    for client in CLIENTS:
        ceiling(client, f"pass-through ceiling ({client})")
    fastest = max(CLIENTS, key=lambda client: run.phases[f"pass-through ceiling ({client})"].rate)

    admin = secrets.token_urlsafe(24)
    with database(backend, workdir) as database_url:
        deliveries = Deliveries(database_url)
        headers: dict[str, str] = {}

        @contextmanager
        def relay_server(workers: int, profile: bool = False) -> Iterator[tuple[str, int]]:
            """``relay serve --workers N`` on this run's database, once it answers: its
            ingest URL and pid."""
            relay_port = free_port()
            relay = f"http://127.0.0.1:{relay_port}"
            env = relay_env(database_url, workdir, amazon, relay, admin)
            command = [RELAY, "serve", "--port", str(relay_port), "--workers", str(workers)]
            if profile:
                run.profile = args.profile / f"relay-{backend}.prof"
                command = [sys.executable, "-m", "cProfile", "-o", str(run.profile), *command]
            log = workdir / f"relay-{backend}-{workers}w-{relay_port}.log"
            # uvicorn re-raises SIGTERM after its shutdown, which kills the process before
            # cProfile writes its file; SIGINT ends in KeyboardInterrupt, which relay's
            # main() turns into an ordinary exit.
            stop = signal.SIGINT if profile else signal.SIGTERM
            with process(command, env, log, stop) as relay_proc:
                wait_http(f"{relay}/healthz")
                if not headers:
                    headers.update(connect(relay, admin))
                yield f"{relay}/v2/events", relay_proc.pid

        def warm_up(url: str) -> None:
            run_load(spec(url, headers, seconds=WARMUP_SECONDS, relay=True))
            deliveries.drain()

        try:
            for workers in (1, 2):
                with relay_server(workers, profile=bool(args.profile) and workers == 1) as (
                    url,
                    pid,
                ):
                    pids = {"relay": pid, "emulator": emulator_pid}
                    warm_up(url)
                    label = f"relay, {workers} worker{'s' if workers > 1 else ''}"
                    phase = relay_phase(label, spec(url, headers, relay=True), pids, deliveries)
                    run.phases[label] = phase
                    print(
                        f"  {label}: {phase.rate:.0f} accepted/s, "
                        f"{phase.sustained:.0f} sustained/s",
                        file=sys.stderr,
                    )
                    if workers == 1:
                        half = max(phase.sustained / 2, 1.0)
                        label = "relay, 1 worker, half rate"
                        phase = relay_phase(
                            label, spec(url, headers, rate=half, relay=True), pids, deliveries
                        )
                        run.phases[label] = phase
                        print(
                            f"  {label}: p99 {percentile(phase.latencies_ms, 0.99):.1f} ms",
                            file=sys.stderr,
                        )
            # Alternated, twice each: the machine's speed drifts from minute to minute,
            # and the ratio compares the mean of each.
            held_runs = list(enumerate((1, 2) * HELD_ROUNDS)) if args.worker_cpu else []
            for turn, workers in held_runs:
                share = args.worker_cpu
                with relay_server(workers) as (url, pid), CpuShares(share, "relay-bench") as held:
                    for worker in wait_workers(pid, workers):
                        held.add(worker)
                    pids = {"relay": pid, "emulator": emulator_pid}
                    warm_up(url)
                    label = f"{share_label(workers, share)}, round {turn // 2 + 1}"
                    before = held.throttling()
                    per_worker = args.held_load == "per-worker"
                    offered = concurrency * workers if per_worker else concurrency
                    phase = relay_phase(
                        label,
                        spec(url, headers, relay=True, concurrency=offered),
                        pids,
                        deliveries,
                    )
                    phase.throttled = [
                        now.since(before[worker]).share_throttled
                        for worker, now in held.throttling().items()
                    ]
                    phase.quota_cores = workers * share
                    run.phases[label] = phase
                    print(
                        f"  {label}: {phase.rate:.0f} accepted/s, "
                        f"{phase.sustained:.0f} sustained/s, throttled in "
                        + ", ".join(f"{t:.0%}" for t in phase.throttled)
                        + " of periods",
                        file=sys.stderr,
                    )
        finally:
            deliveries.close()
    ceiling(fastest, f"pass-through ceiling ({fastest}), again")
    return run


def mean_sustained(phases: list[Phase]) -> float:
    return sum(phase.sustained for phase in phases) / len(phases)


def total_cpu_ms(phase: Phase) -> float:
    """CPU milliseconds per batch of every process of the phase together."""
    cpu: dict[str, float] = phase.summary()["cpu_ms_per_batch"]
    return sum(cpu.values())


# --- the report --------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(run: BackendRun, held_load: str, concurrency: int) -> list[str]:
    phases = run.phases
    read = phases["read ceiling"]
    passes = [phase for name, phase in phases.items() if name.startswith("pass-through")]
    forward = max(passes, key=lambda p: p.rate)
    one, half, two = (
        phases["relay, 1 worker"],
        phases["relay, 1 worker, half rate"],
        phases["relay, 2 workers"],
    )
    lines = [
        f"== {run.backend} ==",
        f"{'phase':38s} {'offered/s':>9s} {'202/s':>7s} {'in-window':>9s} {'sustained':>9s} "
        f"{'p50 ms':>7s} {'p99 ms':>7s} {'lag p50':>8s} {'lag p99':>8s} {'vs pass':>7s}",
    ]
    held = [phase for phase in phases.values() if phase.quota_cores]
    shown = [phases[name] for name in phases if "ceiling" in name] + [one, half, two, *held]
    for phase in shown:
        s = phase.summary()
        offered = f"{phase.offered_rate:.0f}" if phase.offered_rate else "closed"
        lag50 = f"{s['lag_p50_ms']:.0f}" if s["lag_p50_ms"] is not None else "-"
        lag99 = f"{s['lag_p99_ms']:.0f}" if s["lag_p99_ms"] is not None else "-"
        delivered = phase.delivered_in_window_rate
        in_window = "-" if delivered is None else f"{delivered:.1f}"
        lines.append(
            f"{phase.name:38s} {offered:>9s} {phase.rate:7.1f} {in_window:>9s} "
            f"{phase.sustained:9.1f} "
            f"{s['ingest_p50_ms']:7.1f} {s['ingest_p99_ms']:7.1f} {lag50:>8s} {lag99:>8s} "
            f"{phase.sustained / forward.rate:7.2f}"
        )
    ratio = one.sustained / forward.rate
    p99_half = percentile(half.latencies_ms, 0.99)
    scaling = two.sustained / one.sustained
    cores = os.cpu_count() or 1
    linear_target = LINEAR_SHARE * min(2, cores)
    lines += [
        f"pass-through ceiling: {forward.name}, {forward.rate:.1f} batches/s",
        f"sustained / pass-through ceiling: {ratio:.2f} (target >= 0.50: {verdict(ratio >= 0.5)})",
        f"p99 ingest at half the sustained rate: {p99_half:.1f} ms over "
        f"{len(half.latencies_ms)} batches (target < 50 ms: {verdict(p99_half < 50)})",
    ]
    if held:
        share = held[0].quota_cores or 0.0  # the first held phase has one worker
        held_one = [phase for phase in held if phase.quota_cores == share]
        held_two = [phase for phase in held if phase.quota_cores != share]
        held_scaling = mean_sustained(held_two) / mean_sustained(held_one)
        lines.append(
            f"2 workers / 1 worker, each held to {share:g} core"
            + (
                f" and offered {concurrency} requests in flight: "
                if held_load == "per-worker"
                else f", offered {concurrency} requests in flight between them: "
            )
            + f"{held_scaling:.2f}x "
            f"(target >= {linear_target:.1f}x: {verdict(held_scaling >= linear_target)}); "
            f"sustained 1 worker {' / '.join(f'{p.sustained:.1f}' for p in held_one)}, "
            f"2 workers {' / '.join(f'{p.sustained:.1f}' for p in held_two)}; workers "
            "throttled in "
            + " / ".join(", ".join(f"{t:.0%}" for t in phase.throttled) for phase in held)
            + " of periods, machine idle "
            + " / ".join(f"{phase.idle_share:.0%}" for phase in held)
        )
    lines += [
        f"2 workers / 1 worker, unconstrained: {scaling:.2f}x on {cores} cores shared with the "
        f"emulator, the load generator and the database (machine idle "
        f"{one.idle_share:.0%} with one worker)",
        f"read ceiling / pass-through ceiling: {read.rate / forward.rate:.2f}",
        # Load-independent: what the ratio would be if throughput were bound by the CPU
        # that all processes on these cores need per batch.
        f"CPU per batch, all processes: pass-through {total_cpu_ms(forward):.1f} ms, relay "
        f"{total_cpu_ms(one):.1f} ms; ratio {total_cpu_ms(forward) / total_cpu_ms(one):.2f}",
    ]
    lines.append("CPU ms per accepted batch (each process's own, load generator included):")
    for phase in shown:
        cpu = phase.summary()["cpu_ms_per_batch"]
        lines.append(f"  {phase.name:38s} " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    if any(phase.errors for phase in phases.values()):
        lines.append(
            "errors (non-202 answers): "
            + ", ".join(f"{p.name} {p.errors}" for p in phases.values() if p.errors)
        )
    return lines


def print_profile(path: Path, top: int = 40) -> None:
    # Own time only: cProfile counts every resumption of a coroutine as a call and its
    # cumulative time spans the awaits, so cumulative figures mislead for async code.
    stats = pstats.Stats(str(path), stream=sys.stdout)
    print(f"\n-- cProfile of the one-worker relay's main thread: {path} (own time) --")
    stats.sort_stats("tottime").print_stats(top)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, load {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each measured phase")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="closed-loop requests in flight"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--profile", type=Path, help="run the one-worker relay under cProfile")
    parser.add_argument(
        "--worker-cpu",
        type=float,
        default=0.35,
        metavar="SHARE",
        help="also run one and two workers each held to SHARE of one core (cgroup v1, root): "
        "linearity in workers on a machine whose cores the emulator and load generator "
        "share; 0 skips (default 0.35)",
    )
    parser.add_argument(
        "--held-load",
        choices=["per-worker", "shared"],
        default="per-worker",
        help="held phases: offer --concurrency requests in flight to each worker (the "
        "default: N workers get N times the closed loop) or to all of them together",
    )
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    if args.worker_cpu and (reason := available()):
        parser.error(f"--worker-cpu: {reason}; --worker-cpu 0 skips the held-share phases")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="relay-e2e-bench-"))
    inbound, outbound = corpus(int(time.time() * 1000))
    numbers = Numbers()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    print(
        f"{len(inbound[0]) / 1024:.0f} KB inbound / {len(outbound[0]) / 1024:.0f} KB outbound "
        f"per {EVENTS_PER_BATCH}-event batch; {args.seconds:.0f} s per phase, concurrency "
        f"{args.concurrency}; at start: {machine()}"
    )
    runs = []
    try:
        amazon_port = free_port()
        amazon = f"http://127.0.0.1:{amazon_port}"
        env = relay_env("", workdir, amazon, "", "")
        with process(
            [RELAY, "emulator", "--port", str(amazon_port)], env, workdir / "emulator.log"
        ) as emulator_proc:
            wait_http(f"{amazon}/_emulator/health")
            for backend in backends:
                print(f"{backend}:", file=sys.stderr)
                runs.append(
                    run_backend(
                        backend,
                        args,
                        amazon,
                        emulator_proc.pid,
                        inbound,
                        outbound,
                        numbers,
                        workdir,
                    )
                )
            stats = httpx.get(f"{amazon}/_emulator/stats").json()
        print(
            f"emulator: {stats['requests']} requests, {stats['accepted_events']} events "
            f"accepted, {stats['rejected_events']} rejected; at end: {machine()}"
        )
        for run in runs:
            print()
            print("\n".join(report(run, args.held_load, args.concurrency)))
        for run in runs:
            if run.profile:
                print_profile(run.profile)
        if args.json:
            print(
                json.dumps(
                    [
                        {
                            "backend": run.backend,
                            "phases": [p.summary() for p in run.phases.values()],
                        }
                        for run in runs
                    ],
                    indent=1,
                )
            )
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
