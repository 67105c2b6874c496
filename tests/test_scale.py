"""Horizontal scale: several ``relay serve`` processes sharing one PostgreSQL database.

The relay keeps no state outside the database, so scaling out is starting more
processes on the same database. This file shows that it is safe and useful:

- three processes started together on a fresh database migrate it once (advisory
  lock) and all become ready;
- a backlog in the shared queue is drained by all three (SKIP LOCKED claims), each
  delivery sent exactly once, and the work spread across the processes;
- live traffic posted to all three at once, while Amazon rotates tokens, is
  delivered exactly once with a single token refresh for the whole fleet
  (coordinated through the credential's row lock);
- retention pruning from several processes at once deletes each row once;
- the deployment files (.env.example, compose, Prometheus rules, Grafana dashboard)
  name only settings and metrics that really exist.

Which process sent a delivery is read from each process's own ``/metrics``
(``relay_deliveries_total{outcome="delivered"}``): one worker per process, so each
counts only what it delivered. The lease owner (``leased_by``) is cleared when the
outcome is recorded, so the database cannot tell afterwards.

The slow test at the end measures dispatch and ingest throughput with 1, 2 and 3
processes (``pytest -m slow tests/test_scale.py -s``); docs/operations.md §Sizing
quotes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from e2e_helpers import (
    Conn,
    EmulatorClient,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    emulator_server,
    new_admin_token,
    run_sql,
    sdk_batch,
)
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from test_e2e_processes import TOKEN_LIKE, Deployment, RelayProcess, post, settled

from app import metrics
from app.config import Settings
from app.crypto import new_key_entry
from app.db import repository as repo
from app.db.base import utcnow
from app.db.models import Delivery, DeliveryStatus
from app.delivery.retention import prune_once

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 3
EVENTS_PER_BATCH = 3
# Each process's dispatch concurrency, set for this test (the default is 64): a backlog
# of three times that is more than the first two processes to poll can claim, so the
# third finds work however late it polls within Amazon's delay below, and all of it
# goes out in one round of answers. 32 keeps the backlog, and the outcomes recorded at
# once, small (see DELAY_GROUP).
DISPATCH_SLOTS = 32
BACKLOG_BATCHES = 3 * DISPATCH_SLOTS
# Amazon's answers to the backlog take at least this long: more than the idle poll
# (1 s), so every process polls while the first claims are still in flight and the
# spread does not depend on how the pollers' phases fall.
AMAZON_DELAY_SECONDS = 2.0
# ... and each group of this many requests 50 ms longer than the one before, so that a
# process's 32 answers do not all come back in the same instant: recording 32 outcomes
# at once would open 30 database connections per process, and the test's PostgreSQL
# server is shared (max_connections 100) with other suites.
DELAY_GROUP = 4
LIVE_BATCHES = 60


@pytest.fixture
def fleet_deployment(empty_database_url: str, tmp_path: Path) -> Iterator[Deployment]:
    """A never-migrated PostgreSQL database of this test's own (created and dropped by
    conftest's ``empty_database_url``), the emulator in this process, shared keys."""
    with emulator_server() as amazon, closing(EmulatorClient(amazon.url)) as control:
        yield Deployment(
            empty_database_url, amazon, new_key_entry("s1"), new_admin_token(), tmp_path, control
        )


def metric_value(relay: RelayProcess, sample: str) -> float:
    """One sample (name and labels exactly as exposed) of ``relay``'s own /metrics."""
    for line in relay.client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def delivered_by_each(relays: Sequence[RelayProcess]) -> list[float]:
    return [relay.deliveries_counted("delivered") for relay in relays]


def bulk_post(relay: RelayProcess, conn: Conn, batches: list[dict[str, Any]]) -> list[set[str]]:
    """Post ``batches`` in one /v2/bulkevents request; the accepted eventIds of each."""
    answer = relay.client.post("/v2/bulkevents", json=batches, auth=conn.auth)
    assert answer.status_code == 202, answer.text
    summaries = answer.json()["batches"]
    return [accepted_event_ids(b, s) for b, s in zip(batches, summaries, strict=True)]


def batches_from(first_event_id: int, count: int) -> list[dict[str, Any]]:
    return [
        sdk_batch([first_event_id + EVENTS_PER_BATCH * b + e for e in range(EVENTS_PER_BATCH)])
        for b in range(count)
    ]


def all_settled(relays: Sequence[RelayProcess], timeout: float = 45.0) -> list[dict[str, Any]]:
    """``settled`` (every delivery finished), failing with the relays' own error lines,
    which say why a delivery is stuck (e.g. the database refusing connections)."""
    try:
        return settled(relays[0], timeout=timeout)
    except AssertionError as error:
        errors = [
            line[:1200]
            for relay in relays
            for line in relay.log_text().splitlines()
            if '"level": "error"' in line
        ]
        unfinished = str(error)[:200]
        raise AssertionError(f"{unfinished}\nrelay errors: {errors[:3]}") from None


def assert_each_batch_sent_once(amazon: EmulatorClient, batches: list[set[str]]) -> None:
    """Every batch became exactly one Events API request carrying exactly its events."""
    requests = amazon.received()
    sent = Counter(frozenset(e["eventId"] for e in r["body"]["events"]) for r in requests)
    expected = Counter(frozenset(ids) for ids in batches)
    twice = {ids for ids, n in sent.items() if n > 1}
    assert not twice, f"sent more than once: {sorted(map(sorted, twice))[:5]}"
    assert sent == expected
    assert {r["status"] for r in requests} == {207}


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_three_relays_share_one_postgresql_queue_exactly_once_and_evenly(
    fleet_deployment: Deployment,
) -> None:
    deployment = fleet_deployment
    amazon = deployment.control
    names = [f"relay-{n}" for n in range(1, PROCESSES + 1)]
    # Started together on a database that was never migrated: all three run the
    # migrations at once, and the advisory lock lets exactly one of them do it.
    with deployment.serve(
        *names, env={"RELAY_DISPATCH_CONCURRENCY": str(DISPATCH_SLOTS)}
    ) as relays:
        for relay in relays:
            assert relay.client.get("/readyz").status_code == 200, relay.log_text()[-2000:]
        assert len(run_sql(deployment.database_url, "SELECT version_num FROM alembic_version")) == 1
        migrated = [
            n for n, r in zip(names, relays, strict=True) if "database_migrated" in r.log_text()
        ]
        assert len(migrated) == 1, migrated

        output, conn = deployment.ready_output(relays[0])
        output_path = f"/v1/outputs/{output['id']}"

        # --- a backlog in the shared queue, drained by every process -------------------
        # Disabled, the output's deliveries wait in the queue (nothing claims them); each
        # process takes an equal part of the posts, as behind a load balancer.
        assert relays[0].admin.patch(output_path, json={"enabled": False}).status_code == 200
        backlog: list[set[str]] = []
        share = BACKLOG_BATCHES // PROCESSES  # as many posted to each as it has slots
        for number, relay in enumerate(relays):
            backlog += bulk_post(relay, conn, batches_from(100_000 + 10_000 * number, share))
        queued = run_sql(deployment.database_url, "SELECT count(*) FROM deliveries")
        assert queued == [(BACKLOG_BATCHES,)]
        # Amazon answers slowly, so whoever polls first cannot finish the backlog alone.
        amazon.post(
            "faults",
            [
                {"delay": AMAZON_DELAY_SECONDS + 0.05 * group, "count": DELAY_GROUP}
                for group in range(BACKLOG_BATCHES // DELAY_GROUP)
            ],
        )
        assert relays[1].admin.patch(output_path, json={"enabled": True}).status_code == 200

        found = all_settled(relays)
        assert len(found) == BACKLOG_BATCHES
        assert {d["status"] for d in found} == {"delivered"}
        assert {d["attempts"] for d in found} == {1}  # claimed once each
        assert_each_batch_sent_once(amazon, backlog)
        accepted = set().union(*backlog)
        assert len(accepted) == BACKLOG_BATCHES * EVENTS_PER_BATCH
        assert_exactly_the_accepted_reached_amazon(amazon, accepted)
        spread = delivered_by_each(relays)
        assert sum(spread) == BACKLOG_BATCHES, spread
        # Even enough: each process sent at least half of an equal share.
        assert min(spread) >= BACKLOG_BATCHES / (2 * PROCESSES), spread
        sent = [metric_value(r, 'relay_amazon_requests_total{status_class="2xx"}') for r in relays]
        assert sent == spread  # one Events API request per delivery, from its claimer

        # --- live traffic to all three while Amazon rotates tokens ----------------------
        # Amazon ends the access token and rotates refresh tokens: every process meets a
        # 401, and one refresh (under the credential's row lock) must serve all of them,
        # since a second refresh with the old refresh token would be invalid_grant.
        amazon.post("config", {"rotate_refresh_tokens": True})
        amazon.post("revoke", {"access_tokens": True})

        def post_live(number: int) -> set[str]:
            (batch,) = batches_from(500_000 + EVENTS_PER_BATCH * number, 1)
            return post(relays[number % PROCESSES], conn, batch)

        with ThreadPoolExecutor(max_workers=6) as pool:
            live = list(pool.map(post_live, range(LIVE_BATCHES)))
        found = all_settled(relays)
        assert len(found) == BACKLOG_BATCHES + LIVE_BATCHES
        assert {d["status"] for d in found} == {"delivered"}
        assert amazon.get("stats")["token_grants"] == {"authorization_code": 1, "refresh_token": 1}
        assert relays[0].admin.get(output_path).json()["status"] == "configured"
        # Requests answered 401 carried no accepted events; the rest, one per batch.
        accepted_requests = [r for r in amazon.received() if r["status"] == 207]
        sent_batches = Counter(
            frozenset(e["eventId"] for e in r["body"]["events"]) for r in accepted_requests
        )
        assert sent_batches == Counter(frozenset(ids) for ids in backlog + live)
        accepted |= set().union(*live)
        ids = amazon.all_accepted_ids()
        assert len(ids) == len(set(ids)) == len(accepted)
        assert_exactly_the_accepted_reached_amazon(amazon, accepted)
        assert sum(delivered_by_each(relays)) == BACKLOG_BATCHES + LIVE_BATCHES
        # SIGTERM to all at once, as an orchestrator stopping the fleet does (and a third
        # of the wait of stopping them one by one); once each has exited, leaving the
        # block only closes the clients.
        for relay in relays:
            relay.process.terminate()
        for relay in relays:
            relay.process.wait(timeout=30)
    # Each stopped claiming, finished, and exited cleanly.
    for relay in relays:
        assert relay.process.returncode in (0, -signal.SIGTERM), relay.log_text()[-2000:]
        logs = relay.log_text()
        assert '"level": "error"' not in logs
        assert "Traceback" not in logs
        assert not TOKEN_LIKE.search(logs)


# --- retention from several processes at once ------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_concurrent_pruning_deletes_each_old_row_once_and_keeps_the_rest(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    now = utcnow()
    async with sessionmaker() as session, session.begin():
        output = await repo.create_output(session, name="o", advertiser_id="1")
        items = [
            repo.NewDelivery(
                output_id=output.id, source="mparticle", body=b'{"events":[]}', index_map=[0]
            )
            for _ in range(260)
        ]
        ids = await repo.insert_deliveries(session, items)
        old, recent = ids[:230], ids[230:]
        await session.execute(
            update(Delivery)
            .where(Delivery.id.in_(old))
            .values(status=DeliveryStatus.DELIVERED, updated_at=now - timedelta(days=8))
        )
        await session.execute(
            update(Delivery)
            .where(Delivery.id.in_(recent))
            .values(status=DeliveryStatus.DELIVERED, updated_at=now - timedelta(days=6))
        )

    # Three processes' pruning loops waking at the same moment.
    counts = await asyncio.gather(
        *(prune_once(sessionmaker, 7, now=now, batch_size=20) for _ in range(PROCESSES))
    )

    assert sum(counts) == len(old), counts
    async with sessionmaker() as session:
        left = {d.id for d in await repo.list_deliveries(session, limit=1000)}
    assert left == set(recent)


# --- the deployment files name only what exists -----------------------------------------


def _exposed_sample_names() -> set[str]:
    """Every sample name the relay's /metrics can carry (counters, histograms, gauges)."""
    names: set[str] = set()
    # Importing app.metrics registered every metric in the default registry.
    families = [*REGISTRY.collect(), *metrics.QueueGauges(0, 0).collect()]
    for family in families:
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return {name for name in names if name.startswith("relay_")}


def _metric_names_in(text: str) -> set[str]:
    return set(re.findall(r"\brelay_[a-z_]+\b", text))


def test_alert_rules_and_dashboard_use_metrics_the_relay_exposes() -> None:
    exposed = _exposed_sample_names()
    rules = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((ROOT / "deploy/grafana/relay-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for expr in exprs + queries:
        used = _metric_names_in(expr)
        # Prometheus's own ``up`` of the relay job is the one other series allowed.
        assert used or 'up{job="relay"}' in expr, expr
        assert used <= exposed, f"not exposed by the relay: {sorted(used - exposed)} in {expr}"
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    # The four: queue age, dead deliveries, needs_reauth outputs, Amazon errors.
    assert {"RelayQueueOld", "RelayDeadDeliveries", "RelayNeedsReauth"} <= alerts
    assert "RelayAmazonErrors" in alerts
    # Every metric the spec names is on the dashboard.
    on_dashboard = set().union(*map(_metric_names_in, queries))
    for name in ("relay_queue_depth", "relay_queue_oldest_seconds", "relay_batch_events_bucket"):
        assert name in on_dashboard


def test_env_example_lists_every_setting_with_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented: dict[str, int] = {}
    for number, line in enumerate(lines):
        match = re.match(r"#?\s?(RELAY_[A-Z_]+)=", line)
        if match:
            documented.setdefault(match.group(1), number)
    settings = {f"RELAY_{name.upper()}" for name in Settings.model_fields}
    assert sorted(settings - documented.keys()) == []
    assert sorted(documented.keys() - settings) == []
    for name, number in documented.items():
        # Its paragraph (the lines above it up to a blank one) has an explaining comment.
        paragraph: list[str] = []
        for line in reversed(lines[:number]):
            if not line.strip():
                break
            paragraph.append(line)
        prose = [line for line in paragraph if line.startswith("#") and "RELAY_" not in line[:8]]
        assert prose, f"{name} has no comment"


def test_compose_runs_two_relays_on_one_database_scraped_by_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    relays = {name: service for name, service in services.items() if name.startswith("relay")}
    assert len(relays) == 2
    urls = {s["environment"]["RELAY_DATABASE_URL"] for s in relays.values()}
    assert len(urls) == 1
    assert next(iter(urls)).startswith("postgresql+asyncpg://")
    for service in relays.values():
        assert service["depends_on"]["db"]["condition"] == "service_healthy"
        # At least the relay's own graceful shutdown (open requests 15 s, then in-flight
        # deliveries 10 s), so Docker's SIGKILL never cuts a delivery short.
        grace = service["stop_grace_period"]
        assert int(grace.rstrip("s")) >= 15 + 10
    assert "pgdata:/var/lib/postgresql/data" in services["db"]["volumes"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {f"{name}:8000" for name in relays}
    assert services["emulator"]["profiles"] == ["emulator"]


# --- measurements for docs/operations.md §Sizing (make proof) --------------------------


def cpu_seconds(processes: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds these processes have used so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def backend_cpu(database_url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to this test's database
    (other sessions' backends on the same server are not counted)."""
    rows = run_sql(
        database_url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()",
    )
    found: dict[int, float] = {}
    for (pid,) in rows:
        with contextlib.suppress(psutil.NoSuchProcess):
            found[pid] = sum(psutil.Process(pid).cpu_times()[:2])
    return found


def backend_cpu_since(database_url: str, before: dict[int, float]) -> float:
    # A backend opened during the phase counts from zero; one closed during it is lost
    # (the relays' pools keep theirs open, so that is rare and small).
    now = backend_cpu(database_url)
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_throughput_by_number_of_processes(
    fleet_deployment: Deployment, processes: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ingest and dispatch with 1, 2 and 3 ``relay serve`` processes on one database:
    rates, and CPU per batch of the relays and of PostgreSQL (which, unlike wall time,
    other load on the machine barely changes). Printed for docs/operations.md §Sizing.
    Each batch: 10 purchases of one shopper, one Events API request."""
    deployment = fleet_deployment
    amazon = deployment.control
    batches, per_request = 1200, 20
    with deployment.serve(*[f"p{n}" for n in range(processes)]) as relays:
        relay_procs = [psutil.Process(relay.pid) for relay in relays]
        output, conn = deployment.ready_output(relays[0])
        output_path = f"/v1/outputs/{output['id']}"
        assert relays[0].admin.patch(output_path, json={"enabled": False}).status_code == 200
        chunks = [
            [
                sdk_batch([1_000_000 + 10 * (c * per_request + b) + e for e in range(10)])
                for b in range(per_request)
            ]
            for c in range(batches // per_request)
        ]
        relay_cpu, database_cpu = cpu_seconds(relay_procs), backend_cpu(deployment.database_url)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4 * processes) as pool:
            list(
                pool.map(
                    lambda n: bulk_post(relays[n % processes], conn, chunks[n]),
                    range(len(chunks)),
                )
            )
        ingest_seconds = time.perf_counter() - started
        ingest_relay_cpu = cpu_seconds(relay_procs) - relay_cpu
        ingest_database_cpu = backend_cpu_since(deployment.database_url, database_cpu)

        relay_cpu, database_cpu = cpu_seconds(relay_procs), backend_cpu(deployment.database_url)
        started = time.perf_counter()
        assert relays[0].admin.patch(output_path, json={"enabled": True}).status_code == 200
        deadline = time.monotonic() + 300
        while sum(delivered_by_each(relays)) < batches:
            assert time.monotonic() < deadline
            time.sleep(0.25)
        dispatch_seconds = time.perf_counter() - started
        dispatch_relay_cpu = cpu_seconds(relay_procs) - relay_cpu
        dispatch_database_cpu = backend_cpu_since(deployment.database_url, database_cpu)
        spread = delivered_by_each(relays)
        assert sum(spread) == batches
        assert len(amazon.all_accepted_ids()) == batches * 10
        load = psutil.getloadavg()[0]
    with capsys.disabled():
        print(
            f"\nprocesses={processes} load1={load:.1f}"
            f" | ingest {batches / ingest_seconds:.0f} batches/s,"
            f" CPU ms/batch relay {1000 * ingest_relay_cpu / batches:.2f}"
            f" postgres {1000 * ingest_database_cpu / batches:.2f}"
            f" | dispatch {batches / dispatch_seconds:.0f} deliveries/s,"
            f" CPU ms/delivery relay {1000 * dispatch_relay_cpu / batches:.2f}"
            f" postgres {1000 * dispatch_database_cpu / batches:.2f}"
            f" | spread {[int(n) for n in spread]}"
        )
