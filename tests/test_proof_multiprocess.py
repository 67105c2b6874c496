"""Four ``relay serve`` processes on one PostgreSQL database under load; one is
SIGKILLed mid-run and restarted (``make proof``: ``pytest -m slow``).

The four share a metrics directory (``PROMETHEUS_MULTIPROC_DIR``), as the workers of
one ``relay serve --workers N`` do: every process's /metrics then answers for all of
them, the dead one included, which is what makes the counters checkable against the
database after a kill.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import EmulatorClient, emulator_server, new_admin_token, run_sql
from proof_helpers import (
    Pump,
    assert_amazon_got_exactly_the_accepted,
    free_port,
    metric,
    spawn_relay,
    wait_until,
    worker_of,
)
from test_e2e_processes import Deployment, RelayProcess, settled

from app.crypto import new_key_entry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
]

RELAYS = 4
LEASE_SECONDS = 3
DELIVERED = 'relay_deliveries_total{outcome="delivered"}'
FORWARDED = 'relay_events_forwarded_total{source="mparticle"}'
AMAZON_2XX = 'relay_amazon_requests_total{status_class="2xx"}'


@pytest.fixture
def deployment(database_url: str, tmp_path: Path) -> Iterator[Deployment]:
    with emulator_server() as amazon, closing(EmulatorClient(amazon.url)) as control:
        yield Deployment(
            database_url, amazon, new_key_entry("p1"), new_admin_token(), tmp_path, control
        )


def test_four_relays_one_killed_and_restarted_send_each_delivery_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    control = deployment.control
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ports = [free_port() for _ in range(RELAYS)]
    relays: list[RelayProcess] = []
    try:
        for number, port in enumerate(ports):
            relays.append(
                spawn_relay(
                    deployment, f"r{number}", lease_seconds=LEASE_SECONDS, port=port, env=shared
                )
            )
        _, conn = deployment.ready_output(relays[0])
        # Amazon answers in 0.5 s: every process has deliveries in flight at any moment.
        control.post("faults", {"delay": 0.5, "seconds": 600})
        pump = Pump([relay.url for relay in relays], conn, rate=8.0, batch_size=5).start()
        time.sleep(10)

        victim = relays[1]

        def held_by_victim() -> list[tuple[Any, ...]]:
            return run_sql(
                deployment.database_url,
                "SELECT id, event_count FROM deliveries"
                " WHERE status = 'in_flight' AND leased_by LIKE :worker",
                worker=worker_of(victim) + "%",
            )

        # Killed while it holds deliveries in flight: the case that could send twice.
        wait_until(held_by_victim, limit=20, interval=0.02)
        victim.kill()
        held = held_by_victim()
        assert held, "the victim died holding deliveries"
        victim.stop()  # its clients; the process is gone already
        time.sleep(3)
        relays[1] = spawn_relay(
            deployment, "r1-restarted", lease_seconds=LEASE_SECONDS, port=ports[1], env=shared
        )
        time.sleep(10)
        pump.stop()
        control.http.delete("/_emulator/faults")

        found = settled(relays[0], timeout=120)
        assert {d["status"] for d in found} == {"delivered"}
        assert set(pump.statuses()) == {202}
        figures = assert_amazon_got_exactly_the_accepted(control, pump)

        # No delivery sent twice, except those the dead process held when it died: it
        # may have sent them (Amazon answered a caller that was gone), so after their
        # leases ran out another process sent them again, with the same eventIds.
        held_ids = {delivery_id for delivery_id, _ in held}
        resent = {d["id"] for d in found if d["attempts"] > 1}
        assert resent <= held_ids
        answered = [r for r in control.received() if r["status"] == 207]
        assert len(found) <= len(answered) <= len(found) + len(held)
        # Every repeated eventId is from a held delivery, or from a batch the sender
        # posted again because the dying process never answered it.
        copies = Counter(control.all_accepted_ids())
        repeats = sum(count - 1 for count in copies.values())
        reposted_events = sum(a.tries > 1 for a in pump.answers) * pump.batch_size
        assert repeats <= sum(count for _, count in held) + reposted_events

        # The metrics still add up, whichever process is asked, the dead one counted.
        for relay in relays:
            assert metric(relay, DELIVERED) == len(found)
            assert metric(relay, FORWARDED) == sum(d["event_count"] for d in found)
            assert len(found) <= metric(relay, AMAZON_2XX) <= len(answered)
            assert metric(relay, "relay_queue_depth") == 0
        print(
            "PROOF four_processes_kill_restart "
            + json.dumps(
                figures
                | {
                    "deliveries": len(found),
                    "amazon_207_requests": len(answered),
                    "in_flight_at_kill": len(held),
                    "resent_deliveries": len(resent),
                    "posts_without_answer": pump.unanswered,
                    "metrics_delivered": metric(relays[0], DELIVERED),
                },
                sort_keys=True,
            )
        )
    finally:
        for relay in relays:
            relay.stop()
