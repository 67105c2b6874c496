"""Real ``relay serve`` processes: killed mid-delivery, and two sharing one database.

The relay runs as the operator runs it (``relay serve``, configured by RELAY_*
environment variables, migrating on start); the Amazon emulator runs in this process.
A SIGKILL gives the relay no chance to hand anything back: only its leases bring the
work back to the next process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    Amazon,
    Conn,
    EmulatorClient,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    emulator_server,
    new_admin_token,
    query_of,
    run_sql,
    sdk_batch,
    wait_for,
)

from app.crypto import KeyRing, new_key_entry

RELAY = str(Path(sys.executable).with_name("relay"))
TOKEN_LIKE = re.compile(r"Atz[ar]\|[A-Za-z0-9_-]")
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RelayProcess:
    """One ``relay serve`` process, and clients for its admin and ingest APIs."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    admin: httpx.Client
    client: httpx.Client

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (a graceful stop), unless it is gone already; close the clients."""
        self.admin.close()
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def deliveries_counted(self, outcome: str) -> float:
        """``relay_deliveries_total{outcome=...}`` of this process's /metrics."""
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(f'relay_deliveries_total{{outcome="{outcome}"}}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@dataclass
class Deployment:
    """What every process of one deployment shares: database, keys, Amazon."""

    database_url: str
    amazon: Amazon
    keys: str
    admin_token: str
    workdir: Path
    control: EmulatorClient  # the emulator's control routes

    def environment(self, port: int, lease_seconds: int) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        base.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return base | {
            "RELAY_DATABASE_URL": self.database_url,
            "RELAY_ENCRYPTION_KEYS": self.keys,
            "RELAY_ADMIN_TOKEN": self.admin_token,
            "RELAY_LWA_CLIENT_ID": CLIENT_ID,
            "RELAY_LWA_CLIENT_SECRET": CLIENT_SECRET,
            "RELAY_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "RELAY_AMAZON_API_URL": self.amazon.url,
            "RELAY_LWA_AUTHORIZE_URL": f"{self.amazon.url}/ap/oa",
            "RELAY_LWA_TOKEN_URL": f"{self.amazon.url}/auth/o2/token",
            "RELAY_DELIVERY_LEASE_SECONDS": str(lease_seconds),
            "RELAY_LOG_FORMAT": "json",
        }

    @contextmanager
    def serve(
        self, *names: str, lease_seconds: int = 60, env: Mapping[str, str] | None = None
    ) -> Iterator[list[RelayProcess]]:
        """One ``relay serve`` per name, started together, each on a free port, until
        the block ends (then SIGTERM). ``env`` adds settings to every process's."""
        relays: list[RelayProcess] = []
        try:
            for name in names:
                relays.append(self._spawn(name, lease_seconds, env or {}))
            for relay in relays:
                _wait_healthy(relay)
            yield relays
        finally:
            for relay in relays:
                relay.stop()

    def _spawn(self, name: str, lease_seconds: int, env: Mapping[str, str]) -> RelayProcess:
        port = free_port()
        log = self.workdir / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [RELAY, "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=self.environment(port, lease_seconds) | dict(env),
                cwd=self.workdir,  # no stray .env is read
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        admin = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30
        )
        return RelayProcess(process, url, log, admin, httpx.Client(base_url=url, timeout=30))

    def ready_output(self, relay: RelayProcess) -> tuple[dict[str, Any], Conn]:
        """Through ``relay``'s own API: an output, its Login with Amazon, a connection."""
        redirect_uri = f"{relay.url}/oauth/amazon/callback"
        self.amazon.app.emulator.config.update({"allowed_redirect_uris": [redirect_uri]})
        output = relay.admin.post("/v1/outputs", json={"name": "Proc", "advertiser_id": "4242"})
        assert output.status_code == 201, output.text
        output_id = output.json()["id"]
        with httpx.Client(timeout=30) as browser:
            start = browser.get(
                f"{relay.url}/oauth/amazon/start",
                params={"output_id": output_id},
                headers={"Authorization": f"Bearer {self.admin_token}"},
            )
            assert start.status_code == 302, start.text
            assert query_of(start.headers["location"])["redirect_uri"] == redirect_uri
            amazon = browser.get(start.headers["location"])
            assert amazon.status_code == 302, amazon.text
            callback = browser.get(amazon.headers["location"])
            assert callback.status_code == 303, callback.text
        created = relay.admin.post(
            f"/v1/outputs/{output_id}/connections", json={"source": "mparticle", "name": "p"}
        )
        assert created.status_code == 201
        body = created.json()
        conn = Conn(body["id"], output_id, "mparticle", body["key"], body["secret"])
        return relay.admin.get(f"/v1/outputs/{output_id}").json(), conn


def _wait_healthy(relay: RelayProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if relay.process.poll() is not None:
            raise AssertionError(f"relay serve exited:\n{relay.log_text()[-3000:]}")
        try:
            if relay.client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"relay serve did not start:\n{relay.log_text()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def deployment(database_url: str, tmp_path: Path) -> Iterator[Deployment]:
    with emulator_server() as amazon, closing(EmulatorClient(amazon.url)) as control:
        yield Deployment(
            database_url, amazon, new_key_entry("p1"), new_admin_token(), tmp_path, control
        )


def post(relay: RelayProcess, conn: Conn, batch: dict[str, Any]) -> set[str]:
    answer = relay.client.post("/v2/events", json=batch, auth=conn.auth)
    assert answer.status_code == 202, answer.text
    return accepted_event_ids(batch, answer.json())


def deliveries(relay: RelayProcess) -> list[dict[str, Any]]:
    answer = relay.admin.get("/v1/deliveries", params={"limit": 1000})
    assert answer.status_code == 200
    found: list[dict[str, Any]] = answer.json()
    return found


def settled(relay: RelayProcess, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Every delivery, once none is pending or in flight."""
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(relay)
        if found and all(d["status"] not in ("pending", "in_flight") for d in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"still unfinished after {timeout} s: {found}")
        time.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_relay_that_took_nothing_in_claims_from_the_queue_the_other_filled(
    deployment: Deployment,
) -> None:
    # Two slots each and Amazon answering after 0.2 s: a burst that relay A takes in
    # queues far beyond A's slots. B takes no batch in, so everything B sends it claimed
    # from the queue A filled, under A's competing claims.
    amazon = deployment.control
    with deployment.serve("a", "b", env={"RELAY_DISPATCH_CONCURRENCY": "2"}) as relays:
        relay_a, relay_b = relays
        _, conn = deployment.ready_output(relay_a)
        amazon.post("faults", [{"delay": 0.2, "seconds": 120}])
        bulk = [sdk_batch([70_000 + 2 * b + e for e in range(2)]) for b in range(60)]
        answer = relay_a.client.post("/v2/bulkevents", json=bulk, auth=conn.auth)
        assert answer.status_code == 202
        accepted: set[str] = set()
        for batch, summary in zip(bulk, answer.json()["batches"], strict=True):
            accepted |= accepted_event_ids(batch, summary)

        found = settled(relay_b, timeout=60)
        assert len(found) == 60
        assert {d["status"] for d in found} == {"delivered"}
        assert {d["attempts"] for d in found} == {1}
        assert len(amazon.received()) == 60  # none sent twice
        assert_exactly_the_accepted_reached_amazon(amazon, accepted)
        done = [relay.deliveries_counted("delivered") for relay in relays]
        assert sum(done) == 60
        assert min(done) > 0, done  # B sent deliveries that A had queued


def test_log_lines_name_the_request_and_the_delivery(deployment: Deployment) -> None:
    with deployment.serve("one") as (relay,):
        _, conn = deployment.ready_output(relay)
        answer = relay.client.post("/v2/events", json=sdk_batch([1, 2]), auth=conn.auth)
        assert answer.status_code == 202
        request_id = answer.headers["x-request-id"]
        (delivery_id,) = answer.json()["deliveries"]
        settled(relay)
    lines = [json.loads(line) for line in relay.log_text().splitlines() if line.strip()]
    assert all({"event", "level", "timestamp"} <= line.keys() for line in lines)
    # The outcome's line names the delivery, and the request that took its batch in
    # (the answer's X-Request-Id), so one grep finds both ends of a batch.
    (done,) = [line for line in lines if line.get("delivery_id") == delivery_id]
    assert done["event"] == "delivery_done"
    assert done["request_id"] == request_id
    assert (done["status"], done["events"], done["http_status"]) == ("delivered", 2, 207)


def test_a_killed_relay_loses_nothing_its_successor_delivers(deployment: Deployment) -> None:
    amazon = deployment.control
    batches = [sdk_batch([100 * b + e for e in range(3)]) for b in range(1, 7)]
    with deployment.serve("first", lease_seconds=4) as (first,):
        _, conn = deployment.ready_output(first)
        # Amazon answers slowly: every request stays in flight until its caller leaves.
        amazon.post("faults", {"delay": 60, "count": len(batches)})
        accepted: set[str] = set()
        for batch in batches:
            accepted |= post(first, conn, batch)
        # Every delivery has reached Amazon (each took one of the delayed answers).
        wait_for(lambda: amazon.get("faults")["faults"] == [])
        in_flight = deliveries(first)
        assert len(in_flight) == len(batches)
        assert {d["status"] for d in in_flight} == {"in_flight"}
        first.kill()
        assert first.process.returncode == -signal.SIGKILL
    # Nothing was handed back: the rows are still leased by the dead process.
    leased = run_sql(deployment.database_url, "SELECT status, leased_by FROM deliveries")
    assert {status for status, _ in leased} == {"in_flight"}
    (worker,) = {worker for _, worker in leased}  # host, pid, a random part
    host = re.escape(socket.gethostname()[:40])
    assert re.fullmatch(rf"{host}:{first.pid}:[0-9a-f]{{8}}", worker), worker

    # The successor's own lease is long: on a loaded machine a 2 s lease could run out
    # before it records an answer, and a third claim would blur what is checked here.
    with deployment.serve("second", lease_seconds=30) as (second,):
        # Claimed again once the dead process's leases ran out, and delivered.
        found = settled(second)
        assert len(found) == len(batches)
        assert {d["status"] for d in found} == {"delivered"}
        # attempts counts claims: the killed one and the successful one.
        assert {d["attempts"] for d in found} == {2}
        # Amazon carried out the requests whose caller died, then got them again: the
        # same eventIds, so its deduplicated view is exactly what was accepted.
        assert Counter(amazon.all_accepted_ids()) == Counter(dict.fromkeys(accepted, 2))
        assert_exactly_the_accepted_reached_amazon(amazon, accepted)
        # The successor goes on as normal.
        more = post(second, conn, sdk_batch([9999]))
        settled(second)
        assert_exactly_the_accepted_reached_amazon(amazon, accepted | more)
        assert second.deliveries_counted("delivered") == len(batches) + 1
    # SIGTERM stops it gracefully (uvicorn re-raises the signal once it has shut down).
    assert second.process.returncode in (0, -signal.SIGTERM)
    logs = first.log_text() + second.log_text()
    assert "delivery_done" in logs
    assert '"level": "error"' not in logs
    assert "Traceback" not in logs
    assert not TOKEN_LIKE.search(logs)


@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_two_relays_on_one_postgresql_database_send_each_delivery_once(
    deployment: Deployment,
) -> None:
    assert deployment.database_url.startswith("postgresql")
    amazon = deployment.control
    with deployment.serve("a", "b") as (relay_a, relay_b):
        output, conn = deployment.ready_output(relay_a)
        relays = (relay_a, relay_b)
        lock = threading.Lock()
        accepted: set[str] = set()

        def post_batch(number: int) -> None:
            batch = sdk_batch([10_000 + 5 * number + e for e in range(5)])
            ids = post(relays[number % 2], conn, batch)
            with lock:
                accepted.update(ids)

        # Many batches, both relays taking them and both dispatching, concurrently.
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(post_batch, range(80)))
        # And a burst queued in one transaction on each, for their claims to contend.
        for relay, start in ((relay_a, 50_000), (relay_b, 60_000)):
            bulk = [sdk_batch([start + 3 * b + e for e in range(3)]) for b in range(40)]
            answer = relay.client.post("/v2/bulkevents", json=bulk, auth=conn.auth)
            assert answer.status_code == 202
            for batch, summary in zip(bulk, answer.json()["batches"], strict=True):
                accepted |= accepted_event_ids(batch, summary)

        found = settled(relay_b)
        assert len(found) == 160
        assert {d["status"] for d in found} == {"delivered"}
        assert {d["attempts"] for d in found} == {1}
        requests = amazon.received()
        assert len(requests) == 160  # one request per delivery: none sent twice
        assert {r["status"] for r in requests} == {207}
        ids = amazon.all_accepted_ids()
        assert len(ids) == len(set(ids)) == len(accepted) == 80 * 5 + 2 * 40 * 3
        assert_exactly_the_accepted_reached_amazon(amazon, accepted)
        done = [relay.deliveries_counted("delivered") for relay in relays]
        assert sum(done) == 160
        assert min(done) > 0, done  # both processes delivered

        # Amazon ends the access token and rotates refresh tokens from now on: both
        # processes meet 401s, and one refresh (under the credential's row lock) serves
        # both; a second refresh with the old token would be invalid_grant.
        amazon.post("config", {"rotate_refresh_tokens": True})
        amazon.post("revoke", {"access_tokens": True})
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(post_batch, range(80, 120)))
        found = settled(relay_a)
        assert len(found) == 200
        assert {d["status"] for d in found} == {"delivered"}
        assert amazon.get("stats")["token_grants"] == {
            "authorization_code": 1,
            "refresh_token": 1,
        }
        assert relay_a.admin.get(f"/v1/outputs/{output['id']}").json()["status"] == "configured"
        assert {r["status"] for r in amazon.received()} <= {207, 401}
        ids = amazon.all_accepted_ids()
        assert len(ids) == len(set(ids)) == len(accepted)
        assert_exactly_the_accepted_reached_amazon(amazon, accepted)
        # The rotated refresh token was stored (encrypted) and is the live one.
        ((ciphertext,),) = run_sql(
            deployment.database_url, "SELECT refresh_token_ciphertext FROM credentials"
        )
        stored = KeyRing.parse(deployment.keys).decrypt(ciphertext, output["id"]).reveal()
        assert amazon.post("revoke", {"refresh_token": stored}) == {"revoked": 1}
