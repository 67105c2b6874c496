"""Long fault scenarios under steady load (``make proof``: ``pytest -m slow``).

Each one keeps a sender posting batches (``proof_helpers.Pump``) while something goes
wrong for a while, lets the relay recover by itself, and ends with the same check:
Amazon's view deduplicated by eventId is exactly the accepted set, and nothing the
relay refused (503) reached Amazon. The short versions of these faults (a few 503s,
429 with Retry-After, resets, timeouts, 401, invalid_grant) are in test_e2e_faults.py.

Each test prints a ``PROOF`` line with its figures (run with ``-s`` to see them);
docs/reliability.md records them.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    EmulatorClient,
    Stack,
    emulator_server,
    new_admin_token,
    relay_stack,
    run_sql,
)
from proof_helpers import (
    Pump,
    assert_amazon_got_exactly_the_accepted,
    postgres_cluster,
    spawn_relay,
    wait_until,
    worker_of,
)
from test_e2e_processes import Deployment, settled

from app.crypto import new_key_entry

pytestmark = pytest.mark.slow


def report(scenario: str, **figures: Any) -> None:
    print(f"PROOF {scenario} {json.dumps(figures, sort_keys=True)}")


def received_at(request: dict[str, Any]) -> float:
    return datetime.fromisoformat(request["received_at"].replace("Z", "+00:00")).timestamp()


def all_delivered(stack: Stack, limit: float) -> list[dict[str, Any]]:
    found = stack.wait_settled(timeout=limit)
    assert {d["status"] for d in found} == {"delivered"}, [d for d in found if d["status"]]
    return found


@pytest.fixture
def deployment_parts() -> Iterator[tuple[Any, EmulatorClient]]:
    with emulator_server() as amazon, closing(EmulatorClient(amazon.url)) as control:
        yield amazon, control


# --- Amazon misbehaves ---------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_two_minute_5xx_storm_loses_nothing(database_url: str, tmp_path: Path) -> None:
    storm_seconds = 120.0
    # The production retry policy: first retry after 1 s, doubling, capped at 5 min.
    with relay_stack(database_url, tmp_path, first_retry_seconds=1.0) as stack:
        _, conn = stack.ready_output()
        # 30 s each of 500, 502, 503 and 504: a request meets the first live fault.
        stack.fault(
            *(
                {"status": status, "seconds": 30.0 * (n + 1)}
                for n, status in enumerate((500, 502, 503, 504))
            )
        )
        storm_ends = time.time() + storm_seconds
        pump = Pump([stack.relay_url], conn, rate=2.0).start()
        time.sleep(storm_seconds + 15)
        pump.stop()
        deliveries = all_delivered(stack, limit=240)
        settled_after = time.time() - storm_ends
        requests = stack.received()
        # Amazon's storm never reached ingest: every batch was accepted at once.
        assert set(pump.statuses()) == {202}
        during = [r for r in requests if received_at(r) < storm_ends - 0.5]
        assert {r["status"] for r in during} == {500, 502, 503, 504}
        assert {r["status"] for r in requests if r["fault"] is None} == {207}
        figures = assert_amazon_got_exactly_the_accepted(stack, pump)
        report(
            "5xx_storm",
            **figures,
            batches=len(deliveries),
            amazon_requests=len(requests),
            faulted_requests=sum(r["fault"] is not None for r in requests),
            max_attempts=max(d["attempts"] for d in deliveries),
            settled_seconds_after_storm=round(settled_after, 1),
        )


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_the_token_endpoint_down_for_a_minute_loses_nothing(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        output, conn = stack.ready_output()
        # Login with Amazon is down: 30 s of 503, then 30 s of dropped connections; and
        # Amazon has ended the access token, so no delivery goes through without it.
        stack.fault(
            {"target": "token", "status": 503, "seconds": 30},
            {"target": "token", "drop_connection": True, "seconds": 60},
        )
        assert stack.amazon.post("/_emulator/revoke", json={"access_tokens": True}).json()
        outage_ends = time.time() + 60
        pump = Pump([stack.relay_url], conn, rate=2.0).start()
        time.sleep(40)
        # A token endpoint that is down is not a revoked grant: no new login is asked for.
        assert stack.output(output["id"])["status"] == "configured"
        waiting = [d for d in stack.deliveries() if d["status"] != "delivered"]
        assert len(waiting) >= 70, "deliveries should be waiting for a token"
        time.sleep(30)
        pump.stop()
        deliveries = all_delivered(stack, limit=240)
        settled_after = time.time() - outage_ends
        requests = stack.received()
        assert set(pump.statuses()) == {202}
        assert {r["status"] for r in requests} <= {401, 207}
        assert all(received_at(r) > outage_ends - 1 for r in requests if r["status"] == 207)
        assert stack.output(output["id"])["status"] == "configured"
        grants = stack.stats()["token_grants"]
        assert grants["authorization_code"] == 1  # no new login was needed
        assert grants["refresh_token"] >= 1
        figures = assert_amazon_got_exactly_the_accepted(stack, pump)
        report(
            "token_endpoint_down",
            **figures,
            batches=len(deliveries),
            token_grants=grants,
            settled_seconds_after_outage=round(settled_after, 1),
        )


# --- the database misbehaves ---------------------------------------------------------------


def test_postgresql_restarted_under_load(tmp_path: Path, deployment_parts: Any) -> None:
    amazon, control = deployment_parts
    with postgres_cluster() as cluster:
        deployment = Deployment(
            cluster.url(), amazon, new_key_entry("p1"), new_admin_token(), tmp_path, control
        )
        relay = spawn_relay(deployment, "relay", lease_seconds=5)
        try:
            _, conn = deployment.ready_output(relay)
            pump = Pump([relay.url], conn, rate=5.0).start()
            time.sleep(8)
            outages = []
            # A clean shutdown (sessions ended), then a crash (recovery from the WAL).
            for mode in ("fast", "immediate"):
                cluster.stop(mode)
                down_at = time.monotonic()
                time.sleep(2)
                # Gone: the relay says so (503), it does not fail (500).
                assert relay.client.get("/readyz").status_code == 503
                time.sleep(10)
                # pg_ctl returns a moment after the server accepts connections, so a batch
                # posted just before it returns may rightly be stored: what must be 503 is
                # every answer given before the restart began.
                restarting_at = time.monotonic()
                cluster.start()
                up_at = time.monotonic()
                refused = pump.answered(since=down_at + 0.5, until=restarting_at)
                assert set(refused) == {503}, refused

                # It recovers by itself: accepted again soon after the database is back.
                def accepting(at: float = up_at) -> int | None:
                    return pump.statuses(since=at).get(202)

                wait_until(accepting, limit=30)
                outages.append(
                    {
                        "mode": mode,
                        "answers_while_down": dict(refused),
                        "accepting_again_after_s": round(wait_first_accept(pump, up_at) - up_at, 2),
                    }
                )
                time.sleep(8)
            pump.stop()
            found = settled(relay, timeout=120)
            assert {d["status"] for d in found} == {"delivered"}
            assert relay.process.poll() is None, "the relay died"
            statuses = pump.statuses()
            assert set(statuses) == {202, 503}, statuses  # never a 500
            figures = assert_amazon_got_exactly_the_accepted(control, pump)
            # Nothing stored but unanswered: every stored event was accepted.
            ((stored,),) = run_sql(cluster.url(), "SELECT sum(event_count) FROM deliveries")
            assert stored == figures["accepted"]
            report(
                "postgresql_restart",
                **figures,
                answers=dict(statuses),
                outages=outages,
                deliveries=len(found),
                resent_deliveries=sum(d["attempts"] > 1 for d in found),
            )
        finally:
            relay.stop()


def wait_first_accept(pump: Pump, since: float) -> float:
    """When the first batch posted at or after ``since`` that was accepted was posted."""
    return min(a.posted_at for a in pump.answers if a.posted_at >= since and a.status == 202)


def test_disk_full_writes_answer_503_and_store_nothing(
    tmp_path: Path, deployment_parts: Any
) -> None:
    """SQLite on a "full disk": the relay's file-size limit (RLIMIT_FSIZE, set from
    outside with prlimit) drops to one byte mid-run, so every write the relay makes
    fails with EFBIG, as on a full filesystem (SQLite reports SQLITE_FULL, "database
    or disk is full"); then it is lifted again."""
    amazon, control = deployment_parts
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    deployment = Deployment(
        database_url, amazon, new_key_entry("p1"), new_admin_token(), tmp_path, control
    )
    relay = spawn_relay(deployment, "relay", lease_seconds=3)
    try:
        _, conn = deployment.ready_output(relay)
        pump = Pump([relay.url], conn, rate=5.0).start()
        time.sleep(6)
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        full_at = time.monotonic()
        try:
            time.sleep(12)
        finally:
            resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, unlimited)
        freed_at = time.monotonic()
        while_full = pump.statuses(since=full_at + 0.5, until=freed_at)
        assert set(while_full) == {503}, while_full
        wait_until(lambda: pump.statuses(since=freed_at).get(202), limit=30)
        time.sleep(6)
        pump.stop()
        found = settled(relay, timeout=120)
        assert {d["status"] for d in found} == {"delivered"}
        assert relay.process.poll() is None, "the relay died"
        statuses = pump.statuses()
        assert set(statuses) == {202, 503}, statuses
        figures = assert_amazon_got_exactly_the_accepted(control, pump)
        report(
            "disk_full",
            **figures,
            answers=dict(statuses),
            answers_while_full=dict(while_full),
            accepting_again_after_s=round(wait_first_accept(pump, freed_at) - freed_at, 2),
            deliveries=len(found),
            resent_deliveries=sum(d["attempts"] > 1 for d in found),
        )
    finally:
        relay.stop()
    assert "database or disk is full" in relay.log_text() or "storage_unavailable" in (
        relay.log_text()
    )


# --- the relay dies ---------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_relay_sigkilled_under_load_loses_nothing(
    database_url: str, tmp_path: Path, deployment_parts: Any
) -> None:
    amazon, control = deployment_parts
    deployment = Deployment(
        database_url, amazon, new_key_entry("p1"), new_admin_token(), tmp_path, control
    )
    relay = spawn_relay(deployment, "first", lease_seconds=3)
    port = int(relay.url.rsplit(":", 1)[1])
    try:
        _, conn = deployment.ready_output(relay)
        # Amazon answers in 0.3 s: at any moment several deliveries are in flight.
        control.post("faults", {"delay": 0.3, "seconds": 600})
        pump = Pump([relay.url], conn, rate=5.0).start()
        time.sleep(8)
        relay.kill()
        in_flight = run_sql(
            database_url,
            "SELECT id FROM deliveries WHERE status = 'in_flight' AND leased_by LIKE :worker",
            worker=worker_of(relay) + "%",
        )
        relay.stop()  # its clients; the process is gone already
        time.sleep(2)
        # Back on the same port, as a supervisor (systemd, Kubernetes) restarts it.
        relay = spawn_relay(deployment, "second", lease_seconds=3, port=port)
        time.sleep(8)
        pump.stop()
        control.http.delete("/_emulator/faults")
        found = settled(relay, timeout=120)
        assert {d["status"] for d in found} == {"delivered"}
        assert set(pump.statuses()) == {202}
        assert pump.unanswered > 0, "the kill happened under load"
        # Only what the dead process held was tried again.
        resent = {d["id"] for d in found if d["attempts"] > 1}
        assert resent <= {row[0] for row in in_flight}
        figures = assert_amazon_got_exactly_the_accepted(control, pump)
        report(
            "sigkill",
            **figures,
            deliveries=len(found),
            in_flight_at_kill=len(in_flight),
            resent_deliveries=len(resent),
            posts_without_answer=pump.unanswered,
        )
    finally:
        relay.stop()
