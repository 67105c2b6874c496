"""Ingest end to end over real HTTP: batches in, exact Amazon requests out, outcomes stored.

The relay and the Amazon emulator run as uvicorn servers on loopback (e2e_helpers);
every test runs on SQLite and on PostgreSQL. Batches are built by mParticle's own
Python SDK. The expected Amazon requests are written out here from mapping.md, not
computed by the relay's mapper.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ADVERTISER_ID,
    CLIENT_ID,
    Stack,
    accepted_event_ids,
    now_ms,
    relay_stack,
    sdk_batch,
    sdk_batch_object,
    sdk_custom_event,
    sdk_purchase,
)
from mparticle import Configuration, EventsApi
from mparticle.rest import ApiException

DAY_MS = 86_400_000


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(database_url, tmp_path) as running:
        yield running


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def iso_ms(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def purchase_request(
    event_id: int,
    when_ms: int,
    email: str,
    *,
    data_set_name: str,
    partner: str,
    ip: str | None = None,
) -> dict[str, Any]:
    """One SDK purchase (total 20.0 USD, 2 units, web, US) as mapping.md says it goes out."""
    event: dict[str, Any] = {
        "eventId": str(event_id),
        "eventDescription": {
            "name": "Purchase",
            "conversionType": "OFF_AMAZON_PURCHASES",
            "eventSource": "WEBSITE",
            "eventIngestionMethod": "SERVER_TO_SERVER",
            "dataSetName": data_set_name,
        },
        "countryCode": "US",
        "eventTime": iso_ms(when_ms),
        "matchKeys": [{"type": "EMAIL", "values": [sha256(email.strip().lower())]}],
        "value": 20,
        "currencyCode": "USD",
        "unitsSold": 2,
        "partner": partner,
    }
    if ip is not None:
        event["consent"] = {"geo": {"ipAddress": ip}}
    return event


def by_first_event_id(requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {request["body"]["events"][0]["eventId"]: request for request in requests}


def test_sdk_batches_in_exact_amazon_requests_out_one_per_batch(stack: Stack) -> None:
    output, conn = stack.ready_output(data_set_name="web_purchases", partner_name="acme_relay")
    when = now_ms() - 5 * 60_000
    expect = {"data_set_name": "web_purchases", "partner": "acme_relay"}
    first = sdk_batch(
        [sdk_purchase(e, when_ms=when) for e in (1001, 1002, 1003)],
        email=" Jane.Doe@Example.com ",
        ip="203.0.113.7",
    )
    second = sdk_batch(
        [
            sdk_purchase(2001, when_ms=when),
            sdk_custom_event("Viewed Home", when_ms=when),  # not a commerce event
            sdk_purchase(2003, when_ms=now_ms() - 3 * DAY_MS),  # older than 24 h
            sdk_purchase(2004, when_ms=when),
        ],
        email="buyer@example.com",
    )
    third = sdk_batch([sdk_purchase(3001, when_ms=when)], email="third@example.com")

    answers = [stack.post_events(conn, batch) for batch in (first, second, third)]

    assert answers[0] == {"accepted": 3, "dropped": [], "deliveries": answers[0]["deliveries"]}
    assert answers[1]["accepted"] == 2
    assert answers[1]["dropped"] == [
        {"index": 1, "reason": "not_commerce_event"},
        {"index": 2, "reason": "too_old"},
    ]
    assert answers[2]["accepted"] == 1
    assert all(len(answer["deliveries"]) == 1 for answer in answers)

    deliveries = {d["id"]: d for d in stack.wait_settled()}
    received = stack.received()
    assert len(received) == 3  # one Events API request per inbound batch
    requests = by_first_event_id(received)
    assert set(requests) == {"1001", "2001", "3001"}
    expected_bodies = {
        "1001": [
            purchase_request(e, when, "jane.doe@example.com", ip="203.0.113.7", **expect)
            for e in (1001, 1002, 1003)
        ],
        "2001": [purchase_request(e, when, "buyer@example.com", **expect) for e in (2001, 2004)],
        "3001": [purchase_request(3001, when, "third@example.com", **expect)],
    }
    for first_id, events in expected_bodies.items():
        request = requests[first_id]
        assert request["body"] == {"events": events}
        assert request["status"] == 207
        assert request["fault"] is None
        headers = request["headers"]
        assert headers["authorization"] == "Bearer <redacted>"
        assert headers["amazon-ads-clientid"] == CLIENT_ID
        assert headers["amazon-ads-accountid"] == ADVERTISER_ID
        assert headers["content-type"] == "application/json"
        assert request["response"]["error"] == []
        assert [s["index"] for s in request["response"]["success"]] == list(range(len(events)))

    # The stored outcome of each delivery: per inbound index, with the batch's drops.
    results = {answer["deliveries"][0]: deliveries[answer["deliveries"][0]] for answer in answers}
    first_delivery, second_delivery, third_delivery = results.values()
    assert first_delivery["status"] == "delivered"
    assert first_delivery["results"] == [{"index": i, "status": "ok"} for i in (0, 1, 2)]
    assert second_delivery["results"] == [{"index": i, "status": "ok"} for i in (0, 3)]
    assert second_delivery["dropped"] == answers[1]["dropped"]
    assert third_delivery["attempts"] == 1
    assert {d["output_id"] for d in results.values()} == {output["id"]}
    assert {d["connection_id"] for d in results.values()} == {conn.id}

    # The admin view of one delivery keeps the exact body that was sent.
    detail = stack.delivery(answers[1]["deliveries"][0])
    assert detail["body"] == requests["2001"]["body"]
    assert detail["last_status_code"] == 207

    # What the relay previews for the same batch is what it sent.
    preview = stack.admin.post(
        "/v1/preview/mparticle", params={"output_id": output["id"]}, json=second
    )
    assert preview.status_code == 200
    assert preview.json() == {
        "requests": [requests["2001"]["body"]],
        "dropped": answers[1]["dropped"],
    }

    sent = {e for answer, batch in zip(answers, (first, second, third), strict=True)
            for e in accepted_event_ids(batch, answer)}  # fmt: skip
    assert sorted(stack.unique_event_ids()) == sorted(sent)


def test_per_event_207_outcomes_are_stored_per_inbound_index(stack: Stack) -> None:
    _, conn = stack.ready_output()
    # Amazon keeps 21 days of events; this emulator only one hour, so a two-hour-old
    # event passes the relay (24 h) and is refused by Amazon alone.
    stack.emulator_config(max_event_age_seconds=3600)
    batch = sdk_batch(
        [
            sdk_purchase(1, when_ms=now_ms() - 60_000),
            sdk_custom_event(),
            sdk_purchase(3, when_ms=now_ms() - 2 * 3_600_000),
            sdk_purchase(4, when_ms=now_ms() - 60_000),
        ]
    )
    # First attempt: Amazon answers INTERNAL_ERROR for every event (retryable per event).
    stack.fault({"per_event_error": "INTERNAL_ERROR"})

    answer = stack.post_events(conn, batch, wait=10)

    (delivery_id,) = answer["deliveries"]
    stored = stack.wait_settled()
    assert [d["id"] for d in stored] == [delivery_id]
    delivery = stored[0]
    assert delivery["status"] == "partial"
    assert delivery["attempts"] == 2
    ok = [r for r in delivery["results"] if r["status"] == "ok"]
    rejected = [r for r in delivery["results"] if r["status"] == "rejected"]
    assert sorted(r["index"] for r in ok) == [0, 3]
    assert len(rejected) == 1
    assert rejected[0]["index"] == 2  # the inbound index, not the request's position 1
    assert rejected[0]["code"] == "BAD_REQUEST"
    assert rejected[0]["message"]
    # Both attempts sent the same three events; Amazon kept the two it accepted.
    received = stack.received()
    assert [r["status"] for r in received] == [207, 207]
    assert received[0]["body"] == received[1]["body"]
    assert received[0]["response"]["success"] == []
    assert {e["errors"][0]["code"] for e in received[0]["response"]["error"]} == {"INTERNAL_ERROR"}
    assert sorted(stack.unique_event_ids()) == ["1", "4"]
    # ?wait= answered with the outcome of the first attempt.
    outcome = answer["outcome"][delivery_id]
    assert outcome["attempts"] == 1
    assert outcome["status"] == "pending"
    assert outcome["http_status"] == 207


def test_wait_answers_with_the_first_attempts_outcome(stack: Stack) -> None:
    _, conn = stack.ready_output()
    answer = stack.post_events(conn, sdk_batch([7, 8]), wait=10)
    (delivery_id,) = answer["deliveries"]
    assert answer["outcome"][delivery_id] == {
        "id": delivery_id,
        "status": "delivered",
        "attempts": 1,
        "http_status": 207,
        "error": None,
        "results": [{"index": 0, "status": "ok"}, {"index": 1, "status": "ok"}],
    }


def test_mparticles_own_client_posts_to_the_relay(stack: Stack) -> None:
    # The SDK's EventsApi, pointed at the relay instead of s2s.mparticle.com/v2: its own
    # HTTP Basic header, paths (/events, /bulkevents), body and content type.
    _, conn = stack.ready_output()

    def events_api(secret: str) -> EventsApi:
        config = Configuration()
        config.host = f"{stack.relay_url}/v2"
        config.api_key, config.api_secret = conn.key, secret
        return EventsApi(config)

    sdk = events_api(conn.secret)
    sdk.upload_events(sdk_batch_object([31, 32]))
    sdk.bulk_upload_events([sdk_batch_object([41]), sdk_batch_object([51, 52, 53])])
    with pytest.raises(ApiException) as refused:
        events_api(conn.secret + "x").upload_events(sdk_batch_object([61]))
    assert refused.value.status == 401

    stack.wait_settled()
    bodies = sorted(
        [e["eventId"] for e in request["body"]["events"]] for request in stack.received()
    )
    assert bodies == [["31", "32"], ["41"], ["51", "52", "53"]]  # one request per batch


def test_bulk_batches_each_become_one_request(stack: Stack) -> None:
    _, conn = stack.ready_output()
    batches = [sdk_batch([11, 12]), sdk_batch([21]), sdk_batch([sdk_custom_event()])]
    answer = stack.client.post("/v2/bulkevents", json=batches, auth=conn.auth)
    assert answer.status_code == 202
    summaries = answer.json()["batches"]
    assert [s["accepted"] for s in summaries] == [2, 1, 0]
    assert [len(s["deliveries"]) for s in summaries] == [1, 1, 0]
    assert summaries[2]["dropped"] == [{"index": 0, "reason": "not_commerce_event"}]
    stack.wait_settled()
    bodies = sorted(
        [e["eventId"] for e in request["body"]["events"]] for request in stack.received()
    )
    assert bodies == [["11", "12"], ["21"]]


def test_segment_and_records_sources_reach_amazon(stack: Stack) -> None:
    output, _ = stack.ready_output()
    segment = stack.connect(output["id"], "segment")
    records = stack.connect(output["id"], "records")
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    answer = stack.client.post(
        "/v1/batch",
        auth=segment.auth,
        json={
            "batch": [
                {
                    "type": "track",
                    "event": "Order Completed",
                    "messageId": "seg-1",
                    "timestamp": stamp,
                    "properties": {"total": 12.5, "currency": "usd"},
                    "context": {"traits": {"email": "seg@example.com"}, "locale": "en-US"},
                }
            ]
        },
    )
    assert answer.status_code == 200
    assert answer.json()["success"] is True
    assert answer.json()["accepted"] == 1
    csv = (
        "event_type,event_id,event_time,email,country_code,event_value,currency\n"
        f"purchase,rec-1,{stamp},rec@example.com,US,9.5,USD\n"
        f"purchase,rec-2,{stamp},,US,1,USD\n"  # no match key: dropped
    )
    answer = stack.client.post(
        "/v1/records", auth=records.auth, content=csv, headers={"Content-Type": "text/csv"}
    )
    assert answer.status_code == 202
    assert answer.json()["accepted"] == 1
    assert [d["index"] for d in answer.json()["dropped"]] == [1]
    stack.wait_settled()
    events = {e["eventId"]: e for e in stack.accepted_events(unique=True)}
    assert set(events) == {"seg-1", "rec-1"}
    assert events["seg-1"]["matchKeys"] == [
        {"type": "EMAIL", "values": [sha256("seg@example.com")]}
    ]
    assert events["rec-1"]["eventDescription"]["eventSource"] == "OFFLINE"


def test_an_event_posted_twice_is_sent_twice_with_one_event_id(stack: Stack) -> None:
    """mParticle retries a batch it got no answer for: Amazon dedupes it by eventId."""
    _, conn = stack.ready_output()
    batch = sdk_batch([42])
    stack.post_events(conn, batch)
    stack.post_events(conn, batch)
    stack.wait_settled()
    assert [e["eventId"] for e in stack.accepted_events(unique=False)] == ["42", "42"]
    assert stack.unique_event_ids() == ["42"]


def test_events_wait_while_the_output_is_not_logged_in(stack: Stack) -> None:
    output = stack.create_output()
    conn = stack.connect(output["id"])
    answer = stack.post_events(conn, sdk_batch([5]))
    assert answer["accepted"] == 1
    time.sleep(0.5)
    (waiting,) = stack.deliveries()
    assert waiting["status"] == "pending"
    assert waiting["attempts"] == 0
    assert stack.received() == []
    assert stack.login(output["id"]).status_code == 303
    (delivered,) = stack.wait_settled()
    assert delivered["status"] == "delivered"
    assert stack.unique_event_ids() == ["5"]
