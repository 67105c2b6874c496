"""Delivery under faults, end to end: the emulator misbehaves on command, the relay copes.

For every fault the same property holds: every accepted event reaches Amazon, and
repeats happen only as resends of the same eventId, so Amazon's view deduplicated by
eventId equals exactly the accepted set (``assert_exactly_the_accepted_reached_amazon``).
Retries start after 50 ms instead of 1 s (``DispatcherConfig.first_retry_seconds``);
the doubling, the jitter and Retry-After are production's. Every test runs on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from e2e_helpers import (
    Conn,
    EmulatorClient,
    Stack,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    emulator_server,
    relay_stack,
    run_sql,
    sdk_batch,
    wait_for,
)


def post_all(stack: Stack, conn: Conn, batches: list[dict[str, Any]]) -> set[str]:
    """Post every batch; the eventIds the relay accepted."""
    accepted: set[str] = set()
    for batch in batches:
        accepted |= accepted_event_ids(batch, stack.post_events(conn, batch))
    return accepted


def batches_of(count: int, size: int, start: int = 1000) -> list[dict[str, Any]]:
    return [
        sdk_batch([start + b * size + e for e in range(size)], email=f"user{b}@example.com")
        for b in range(count)
    ]


def statuses(stack: Stack) -> list[int | None]:
    return [request["status"] for request in stack.received()]


def received_at(request: dict[str, Any]) -> float:
    return datetime.fromisoformat(request["received_at"].replace("Z", "+00:00")).timestamp()


def test_503s_are_retried_until_delivered(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        _, conn = stack.ready_output()
        stack.fault({"status": 503, "count": 3})
        accepted = post_all(stack, conn, batches_of(4, 3))
        deliveries = stack.wait_settled()
        assert [d["status"] for d in deliveries] == ["delivered"] * 4
        assert sorted(statuses(stack), key=str) == [207] * 4 + [503] * 3
        # Each request is one attempt: the 3 extra ones are the resends.
        assert sum(d["attempts"] for d in deliveries) == 4 + 3
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_429_with_retry_after_waits_as_told(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path, first_retry_seconds=0.05) as stack:
        _, conn = stack.ready_output()
        stack.fault({"status": 429, "retry_after": 1})
        accepted = post_all(stack, conn, batches_of(1, 2))
        (delivery,) = stack.wait_settled()
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2
        throttled, delivered = stack.received()
        assert (throttled["status"], delivered["status"]) == (429, 207)
        # Retry-After (1 s) wins over the 50 ms the backoff would have waited.
        assert received_at(delivered) - received_at(throttled) >= 0.95
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_dropped_connections_are_retried(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        _, conn = stack.ready_output()
        stack.fault({"drop_connection": True, "count": 2})
        accepted = post_all(stack, conn, batches_of(2, 2))
        deliveries = stack.wait_settled()
        assert [d["status"] for d in deliveries] == ["delivered"] * 2
        # A dropped connection has no HTTP status; the emulator records it as None.
        assert sorted(statuses(stack), key=str) == [207, 207, None, None]
        assert sum(d["attempts"] for d in deliveries) == 4
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_slow_answers_past_the_timeout_are_resent_and_deduped(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path, http_timeout=0.5) as stack:
        _, conn = stack.ready_output()
        stack.fault({"delay": 8, "count": 1})
        started = time.monotonic()
        accepted = post_all(stack, conn, batches_of(1, 3))
        (delivery,) = stack.wait_settled()
        # The relay gave up on the slow answer (0.5 s) long before Amazon's 8 s; the
        # margin is wide because a loaded CI machine may be slow at everything else.
        assert time.monotonic() - started < 6
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2
        # Amazon carried out the request whose caller timed out, then got the resend:
        # each event twice, with the same eventId, so its deduplicated view is exact.
        slow, resent = sorted(stack.received(), key=lambda r: r["fault"] is None)
        assert slow["fault"] == {"target": "events", "delay": 8.0}
        assert resent["fault"] is None
        assert (slow["status"], resent["status"]) == (207, 207)
        assert slow["body"] == resent["body"]
        assert len(stack.accepted_events(unique=False)) == 2 * len(accepted)
        assert_exactly_the_accepted_reached_amazon(stack, accepted)

        # An answer that is slow but within the timeout is not sent twice.
        stack.fault({"delay": 0.2, "count": 1})
        more = post_all(stack, conn, [sdk_batch([9001])])
        stack.wait_settled()
        assert len(stack.received()) == 3
        assert_exactly_the_accepted_reached_amazon(stack, accepted | more)


def test_an_attempt_ends_by_half_the_lease_whatever_the_http_timeout(
    database_url: str, tmp_path: Path
) -> None:
    # A 2 s lease and a 30 s HTTP timeout: Amazon's answer after 3 s would come within
    # the timeout but after the lease, when another claim could have sent the batch.
    # The attempt is cut at 1 s and rescheduled while this process still holds it.
    with relay_stack(database_url, tmp_path, http_timeout=30.0, delivery_lease_seconds=2) as stack:
        _, conn = stack.ready_output()
        stack.fault({"delay": 3, "count": 1})
        accepted = post_all(stack, conn, batches_of(1, 2))
        (delivery,) = stack.wait_settled()
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2  # with the whole answer awaited, it would be 1
        slow, resent = sorted(stack.received(), key=lambda r: r["fault"] is None)
        assert slow["fault"] == {"target": "events", "delay": 3.0}
        assert slow["body"] == resent["body"]
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_401_refreshes_the_access_token_and_resends(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        output, conn = stack.ready_output()
        # Amazon rotates refresh tokens here: the old one dies at once, so the relay must
        # have stored the new one for the second refresh to work.
        stack.emulator_config(rotate_refresh_tokens=True)
        accepted: set[str] = set()
        for round_ in range(2):
            assert stack.amazon.post("/_emulator/revoke", json={"access_tokens": True}).json()
            accepted |= post_all(stack, conn, batches_of(1, 2, start=100 * (round_ + 1)))
            stack.wait_settled()
        assert statuses(stack) == [401, 207, 401, 207]
        assert stack.stats()["token_grants"] == {"authorization_code": 1, "refresh_token": 2}
        assert all(d["status"] == "delivered" for d in stack.deliveries())
        assert stack.output(output["id"])["status"] == "configured"
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_401_after_a_fresh_token_is_retried_later(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        _, conn = stack.ready_output()
        stack.fault({"status": 401, "count": 2})
        accepted = post_all(stack, conn, batches_of(1, 2))
        (delivery,) = stack.wait_settled()
        assert delivery["status"] == "delivered"
        # 401 → one refresh and one resend (401 again) → back to the queue → 207.
        assert statuses(stack) == [401, 401, 207]
        assert delivery["attempts"] == 2
        assert stack.stats()["token_grants"]["refresh_token"] == 1
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_invalid_grant_waits_for_a_new_login_then_delivers(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        output, conn = stack.ready_output()
        accepted = post_all(stack, conn, batches_of(1, 2, start=10))
        stack.wait_settled()
        # The user revokes the relay's access at Amazon: every token of the grant dies.
        assert stack.amazon.post("/_emulator/revoke", json={"all": True}).json() == {"revoked": 1}
        accepted |= post_all(stack, conn, batches_of(1, 2, start=20))
        wait_for(lambda: stack.output(output["id"])["status"] == "needs_reauth")
        # Accepted while the output needs a login: queued, not dropped, not sent.
        accepted |= post_all(stack, conn, batches_of(1, 2, start=30))
        time.sleep(0.5)
        waiting = [d for d in stack.deliveries() if d["status"] != "delivered"]
        assert len(waiting) == 2
        assert {d["status"] for d in waiting} == {"pending"}
        assert statuses(stack) == [207, 401]  # one refused attempt, nothing since
        assert stack.stats()["token_grants"] == {"authorization_code": 1}

        assert stack.login(output["id"]).status_code == 303
        assert stack.output(output["id"])["status"] == "configured"
        deliveries = stack.wait_settled()
        assert [d["status"] for d in deliveries] == ["delivered"] * 3
        assert stack.stats()["token_grants"] == {"authorization_code": 2}
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_too_large_requests_are_split_in_halves(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        _, conn = stack.ready_output()
        batch = sdk_batch(list(range(500, 504)))
        (request,) = stack.admin.post("/v1/preview/mparticle", json=batch).json()["requests"]
        size = len(json.dumps(request["events"], separators=(",", ":")))
        assert 1300 < size < 2200  # four events; two of them fit in 1200 bytes
        stack.emulator_config(max_body_bytes=1200)
        accepted = post_all(stack, conn, [batch])
        deliveries = stack.wait_settled()
        assert sorted(d["event_count"] for d in deliveries) == [2, 2]
        assert {d["status"] for d in deliveries} == {"delivered"}
        assert statuses(stack) == [413, 207, 207]
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_dead_after_max_age_then_the_admin_retries(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path, delivery_max_age=1) as stack:
        _, conn = stack.ready_output()
        stack.fault({"status": 500, "count": 1000})
        accepted = post_all(stack, conn, batches_of(1, 2))
        (dead,) = stack.wait_settled()
        assert dead["status"] == "dead"
        assert dead["last_status_code"] == 500
        assert dead["attempts"] >= 3
        assert stack.unique_event_ids() == []
        assert stack.amazon.delete("/_emulator/faults").status_code == 204

        retried = stack.admin.post(f"/v1/deliveries/{dead['id']}/retry")
        assert retried.status_code == 200
        assert retried.json()["status"] == "pending"
        (delivered,) = stack.wait_settled()
        assert delivered["status"] == "delivered"
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_many_batches_through_every_fault_at_once(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path, http_timeout=0.5) as stack:
        _, conn = stack.ready_output()
        stack.fault(
            {"status": 503, "count": 3},
            {"status": 429, "retry_after": 0, "count": 2},
            {"drop_connection": True, "count": 2},
            {"delay": 2, "count": 2},
            {"per_event_error": "TOO_MANY_REQUESTS", "count": 2},
            {"status": 500, "code": "INTERNAL_ERROR", "count": 1},
            {"status": 401, "count": 1},
            {"target": "token", "status": 503, "count": 1},
        )
        accepted = post_all(stack, conn, batches_of(25, 4))
        deliveries = stack.wait_settled(timeout=60)
        assert len(deliveries) == 25
        assert {d["status"] for d in deliveries} == {"delivered"}
        assert stack.amazon.get("/_emulator/faults").json()["faults"] == []
        assert len(accepted) == 100
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_a_stopping_relay_finishes_the_deliveries_in_flight(
    database_url: str, tmp_path: Path
) -> None:
    with emulator_server() as amazon:
        with relay_stack(database_url, tmp_path, amazon=amazon) as stack:
            _, conn = stack.ready_output()
            stack.fault({"delay": 1, "count": 1})
            accepted = post_all(stack, conn, batches_of(1, 2))
            wait_for(lambda: stack.amazon.get("/_emulator/faults").json()["faults"] == [])
            (in_flight,) = stack.deliveries()
            assert in_flight["status"] == "in_flight"
        # The relay has stopped: it stopped claiming but finished the send in flight
        # (within its shutdown grace) rather than abandon it to a lease.
        ((status, attempts, leased_by),) = run_sql(
            database_url, "SELECT status, attempts, leased_by FROM deliveries"
        )
        assert (status, attempts, leased_by) == ("delivered", 1, None)
        view = EmulatorClient(amazon.url)
        try:
            assert [r["status"] for r in view.received()] == [207]
            assert_exactly_the_accepted_reached_amazon(view, accepted)
        finally:
            view.close()
