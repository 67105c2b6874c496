"""Real senders, unchanged, pointed at the relay: Segment's Python library and records.

The Amazon emulator and the relay run on loopback (dispatcher on), an output is
logged in with Login with Amazon as ``relay demo`` does it, and what reaches the
emulator is checked against sources.md.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from segment.analytics import Client

from app.demo import CLIENT_ID, CLIENT_SECRET, _login, emulator_settings
from app.emulator import create_app as create_emulator
from app.localserver import bind_loopback, serve_in_thread, url_of
from app.main import create_app

ADMIN = "admin-token-for-library-tests"
EMAIL = "Jane.Doe@Example.com"


@dataclass
class Stack:
    relay: str
    amazon: str
    admin: httpx.Client
    output_id: str

    def connection(self, source: str) -> dict[str, Any]:
        answer = self.admin.post(
            f"/v1/outputs/{self.output_id}/connections", json={"source": source, "name": source}
        )
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    def received(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The events Amazon accepted, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            events: list[dict[str, Any]] = httpx.get(
                f"{self.amazon}/_emulator/received/events"
            ).json()["events"]
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in httpx.get(f"{self.relay}/metrics").text.splitlines():
            metric, _, value = line.rpartition(" ")
            if metric.startswith(name + "{") and all(part in metric for part in wanted.split(",")):
                return float(value)
        return 0.0


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    with serve_in_thread(
        create_emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    ) as amazon:
        sock = bind_loopback()
        relay_url = url_of(sock)
        settings = emulator_settings(
            database_url=database_url,
            key_file=tmp_path / "relay.key",
            admin_token=ADMIN,
            amazon=amazon,
            relay_url=relay_url,
        )
        with (
            serve_in_thread(create_app(settings), sock),
            httpx.Client(
                base_url=relay_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
            ) as admin,
        ):
            output = admin.post(
                "/v1/outputs",
                json={
                    "name": "Library",
                    "advertiser_id": "1234567890",
                    "data_set_name": "web_orders",
                },
            ).json()
            _login(admin, output["id"])
            assert admin.get(f"/v1/outputs/{output['id']}").json()["status"] == "configured"
            yield Stack(relay_url, amazon, admin, output["id"])


def sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


CONTEXT = {"traits": {"email": EMAIL}, "locale": "en-US", "ip": "203.0.113.7"}


def send_with_library(client: Client) -> None:
    client.track(
        "user-1",
        "Order Completed",
        {
            "order_id": "o-1",
            "total": 59.985,
            "currency": "usd",
            "products": [{"product_id": "sku-1", "brand": "Acme", "price": 19.995, "quantity": 3}],
        },
        context=CONTEXT,
        message_id="msg-order-1",
    )
    client.page("user-1", "Shop", "Home", {"url": "https://shop.example/"}, context=CONTEXT)
    client.identify("user-1", {"email": EMAIL}, context=CONTEXT)


def check_mapped(events: list[dict[str, Any]]) -> None:
    by_type = {e["eventDescription"]["conversionType"]: e for e in events}
    assert set(by_type) == {"OFF_AMAZON_PURCHASES", "PAGE_VIEW"}
    order = by_type["OFF_AMAZON_PURCHASES"]
    assert order["eventDescription"] == {
        "conversionType": "OFF_AMAZON_PURCHASES",
        "eventSource": "WEBSITE",
        "name": "Order Completed",
        "eventIngestionMethod": "SERVER_TO_SERVER",
        "dataSetName": "web_orders",
    }
    assert order["eventId"] == "msg-order-1"
    assert order["countryCode"] == "US"
    assert order["value"] == 59.99
    assert order["currencyCode"] == "USD"
    assert order["unitsSold"] == 3
    assert order["matchKeys"] == [{"type": "EMAIL", "values": [sha256("jane.doe@example.com")]}]
    assert order["consent"]["geo"] == {"ipAddress": "203.0.113.7"}
    assert {c["name"]: c["value"] for c in order["customData"]} == {
        "brand": "Acme",
        "productId": "sku-1",
    }
    page = by_type["PAGE_VIEW"]
    assert page["eventDescription"]["name"] == "Page View"
    assert len(page["eventId"]) == 36  # the library's messageId (a UUID)


@pytest.mark.parametrize("gzipped", [False, True])
def test_segment_library_sync_mode(stack: Stack, gzipped: bool) -> None:
    created = stack.connection("segment")
    client = Client(
        write_key=f"{created['key']}.{created['secret']}",
        host=stack.relay,
        sync_mode=True,
        gzip=gzipped,
        max_retries=0,
    )
    send_with_library(client)  # raises APIError on any non-2xx answer
    events = stack.received(2)
    check_mapped(events)
    time.sleep(0.2)
    assert len(stack.received(2)) == 2
    assert (
        stack.metric("relay_events_dropped_total", source="segment", reason="unmapped_event") >= 1
    )
    assert stack.metric("relay_events_forwarded_total", source="segment") >= 2


def test_segment_library_batched_with_flush(stack: Stack) -> None:
    created = stack.connection("segment")
    errors: list[Any] = []
    client = Client(
        write_key=f"{created['key']}.{created['secret']}",
        host=stack.relay,
        on_error=lambda error, batch: errors.append(error),
        upload_size=50,
        max_retries=0,
    )
    try:
        send_with_library(client)
        for i in range(20):
            client.track(
                f"user-{i}", "Product Added", {"price": 2, "quantity": i + 1}, context=CONTEXT
            )
        client.flush()
    finally:
        client.shutdown()
    assert errors == []
    events = stack.received(22)
    assert len(events) == 22
    check_mapped([e for e in events if e["eventDescription"]["name"] != "Product Added"])
    carts = [e for e in events if e["eventDescription"]["conversionType"] == "ADD_TO_SHOPPING_CART"]
    assert sorted(e["value"] for e in carts) == [2 * q for q in range(1, 21)]


def test_segment_wrong_write_key_is_401(stack: Stack) -> None:
    created = stack.connection("segment")
    client = Client(
        write_key=f"{created['key']}.not-the-secret",
        host=stack.relay,
        sync_mode=True,
        max_retries=0,
    )
    from segment.analytics.request import APIError

    with pytest.raises(APIError) as caught:
        client.track("u", "Order Completed", {"total": 1}, context=CONTEXT)
    assert caught.value.status == 401


# --- /v1/records: CSV, NDJSON, JSON ------------------------------------------------------------


def post_records(
    stack: Stack, auth: tuple[str, str], body: bytes, content_type: str
) -> dict[str, Any]:
    answer = httpx.post(
        f"{stack.relay}/v1/records",
        content=body,
        auth=auth,
        headers={"Content-Type": content_type},
        params={"wait": 10},
    )
    assert answer.status_code == 202, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_records_route_csv_ndjson_json(stack: Stack) -> None:
    created = stack.connection("records")
    auth = (created["key"], created["secret"])
    moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    csv_body = (
        "event_type,event_time,event_value,currency,country_code,email,event_id\n"
        f"purchase,{moment},10.5,usd,US,a@example.com,csv-1\n"
        f"purchase,{moment},ten,usd,US,b@example.com,csv-2\n"
        f"lead,{moment},,,US,c@example.com,csv-3\n"
        f"teleport,{moment},,,US,d@example.com,csv-4\n"
        f"purchase,{moment},1,usd,US,e@example.com,csv-5,surplus\n"
        f"purchase,{moment},1,usd,US,,csv-6\n"
    ).encode()
    answer = post_records(stack, auth, csv_body, "text/csv")
    assert answer["accepted"] == 2
    assert [(d["index"], d["reason"]) for d in answer["dropped"]] == [
        (1, "invalid_event"),
        (3, "unmapped_event"),
        (4, "invalid_event"),
        (5, "no_match_key"),
    ]
    assert answer["dropped"][0]["detail"] == "event_value is not a number"
    assert answer["dropped"][2]["detail"] == "row has more fields than the header row"
    assert [o["status"] for o in answer["outcome"].values()] == ["delivered"]

    ndjson = b"\n".join(
        [
            orjson.dumps(
                {
                    "eventType": "sign_up",
                    "eventTime": moment,
                    "countryCode": "US",
                    "email": "f@x.com",
                    "eventId": "nd-1",
                }
            ),
            b"{not json",
            orjson.dumps(
                {
                    "eventType": "purchase",
                    "eventTime": "yesterday",
                    "countryCode": "US",
                    "email": "g@x.com",
                }
            ),
            orjson.dumps(
                {
                    "eventType": "PAGE_VIEW",
                    "eventTime": moment,
                    "countryCode": "US",
                    "email": "h@x.com",
                    "eventId": "nd-4",
                }
            ),
        ]
    )
    answer = post_records(stack, auth, ndjson, "application/x-ndjson")
    assert answer["accepted"] == 2
    assert [(d["index"], d["reason"], d["detail"]) for d in answer["dropped"]] == [
        (1, "invalid_event", "line is not valid JSON"),
        (2, "invalid_event", "event_time is not an ISO 8601 date-time or epoch milliseconds"),
    ]

    array = orjson.dumps(
        [
            {
                "event_type": "checkout",
                "event_time": moment,
                "country_code": "US",
                "phone": "+1 415 555 2671",
                "event_id": "js-1",
            },
            "not a record",
            {
                "event_type": "purchase",
                "event_time": moment,
                "country_code": "US",
                "email": "i@x.com",
                "advertiser_id": "999",
                "event_id": "js-3",
            },
        ]
    )
    answer = post_records(stack, auth, array, "application/json")
    assert answer["accepted"] == 1
    assert [(d["index"], d["reason"]) for d in answer["dropped"]] == [
        (1, "invalid_event"),
        (2, "invalid_event"),
    ]

    events = stack.received(5)
    assert sorted(e["eventId"] for e in events) == ["csv-1", "csv-3", "js-1", "nd-1", "nd-4"]
    types = {e["eventId"]: e["eventDescription"]["conversionType"] for e in events}
    assert types == {
        "csv-1": "OFF_AMAZON_PURCHASES",
        "csv-3": "LEAD",
        "js-1": "CHECKOUT",
        "nd-1": "SIGN_UP",
        "nd-4": "PAGE_VIEW",
    }
    assert {e["eventDescription"]["eventSource"] for e in events} == {"OFFLINE"}


def test_records_route_refuses_what_is_not_records(stack: Stack) -> None:
    created = stack.connection("records")
    auth = (created["key"], created["secret"])
    for body, content_type in (
        (b"\xff\xfe not utf-8", "text/csv"),
        (b'"just a string"', "application/json"),
        (gzip.compress(b"[]"), "application/json"),
    ):
        answer = httpx.post(
            f"{stack.relay}/v1/records",
            content=body,
            auth=auth,
            headers={"Content-Type": content_type},
        )
        assert answer.status_code == 400, (body, answer.text)
    wrong = httpx.post(f"{stack.relay}/v1/records", content=b"[]", auth=(created["key"], "nope"))
    assert wrong.status_code == 401


def test_segment_gzip_bodies_are_bounded(stack: Stack) -> None:
    created = stack.connection("segment")
    auth = (f"{created['key']}.{created['secret']}", "")
    bomb = gzip.compress(b'{"batch": [' + b" " * 600_000 + b"]}")
    cases = (
        (bomb, "gzip", 413),
        (b"not gzip at all", "gzip", 400),
        (b'{"batch": []}', "br", 415),
        (gzip.compress(b'{"batch": []}'), "GZIP", 200),
    )
    for body, encoding, status in cases:
        answer = httpx.post(
            f"{stack.relay}/v1/batch",
            content=body,
            auth=auth,
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert answer.status_code == status, (encoding, answer.text)
