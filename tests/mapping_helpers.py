"""Shared builders for the mapping tests: inbound payloads, settings, result readers.

Expected values in the tests are computed here independently of the app (hashes,
deterministic ids, time texts), never by calling the code under test.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from app.amazon.mapping import MapResult, map_events
from app.amazon.schema import request_errors
from app.amazon.settings import OutputSettings
from app.errors import PayloadError
from app.pipeline import map_payload, output_settings
from app.sources.base import SourceAdapter

# mapping.md §9, in precedence order.
DROP_REASONS = (
    "invalid_event",
    "not_commerce_event",
    "unmapped_event",
    "missing_action",
    "too_old",
    "in_future",
    "no_country_code",
    "no_match_key",
    "missing_consent",
    "consent_denied",
)

NOW = datetime(2025, 11, 23, 20, 0, 0, tzinfo=UTC)
TS = 1763900000000  # 2025-11-23T12:13:20.000Z, 6 h 46 min 40 s before NOW
TS_TEXT = "2025-11-23T12:13:20.000Z"
NOW_TEXT = "2025-11-23T20:00:00.000Z"
HOUR_MS = 3_600_000
NOW_MS = int(NOW.timestamp() * 1000)

EMAIL = "shopper@example.com"
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
IDFA = "AEBE52E7-03EE-455A-B3C4-E57283966239"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


EMAIL_HASH = sha256(EMAIL)
EMAIL_KEY = {"type": "EMAIL", "values": [EMAIL_HASH]}


def deterministic_id(connection_id: str, event: Any) -> str:
    """mapping.md §11, computed here independently of the app."""
    text = connection_id + "\n" + json.dumps(event, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


# mapping.md §13, verbatim: the worked example.
SPEC_EXAMPLE_INPUT = """
{"environment": "production", "ip": "203.0.113.7",
 "device_info": {"platform": "iOS", "ios_advertising_id": "AEBE52E7-03EE-455A-B3C4-E57283966239", "locale_country": "US"},
 "user_identities": {"email": " Jane.Doe@Example.com "},
 "events": [
  {"event_type": "commerce_event", "data": {
     "event_id": "6004677780660780000", "timestamp_unixtime_ms": 1763900000000,
     "currency_code": "usd",
     "custom_attributes": {"coupon": "FALL", "country_code": "us"},
     "product_action": {"action": "purchase", "total_amount": 59.985,
        "products": [{"id": "sku1", "quantity": 2}, {"id": "sku2", "quantity": "1"}]}}},
  {"event_type": "custom_event", "data": {"event_name": "Viewed Home", "custom_event_type": "navigation"}}
 ]}
"""  # noqa: E501

SPEC_EXAMPLE_OUTPUT = {
    "events": [
        {
            "eventDescription": {
                "conversionType": "OFF_AMAZON_PURCHASES",
                "eventSource": "IOS",
                "name": "Purchase",
                "eventIngestionMethod": "SERVER_TO_SERVER",
                "dataSetName": "web_purchases",
            },
            "countryCode": "US",
            "matchKeys": [
                {"type": "EMAIL", "values": [sha256("jane.doe@example.com")]},
                {"type": "MAID", "values": ["aebe52e7-03ee-455a-b3c4-e57283966239"]},
            ],
            "eventTime": "2025-11-23T12:13:20.000Z",
            "eventId": "6004677780660780000",
            "value": 59.99,
            "currencyCode": "USD",
            "unitsSold": 3,
            "customData": [{"name": "coupon", "value": "FALL", "dataType": "STRING"}],
            "consent": {"geo": {"ipAddress": "203.0.113.7"}},
            "partner": "acme_relay",
        }
    ]
}


# --- mParticle builders -------------------------------------------------------


def commerce(
    action: Any = "purchase",
    *,
    product_action: dict[str, Any] | None = None,
    **data: Any,
) -> dict[str, Any]:
    """A commerce_event; ``product_action`` extras merge into {"action": action}."""
    pa: dict[str, Any] = {"action": action}
    pa.update(product_action or {})
    body: dict[str, Any] = {"event_id": "e1", "timestamp_unixtime_ms": TS}
    body.update(data)
    body["product_action"] = pa
    return {"event_type": "commerce_event", "data": body}


def custom(name: str = "Viewed Home", **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"event_name": name, "custom_event_type": "navigation"}
    body.update(data)
    return {"event_type": "custom_event", "data": body}


def mp_batch(
    *events: dict[str, Any],
    identities: Any = None,
    device: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An inbound mParticle batch: web, US, one email, unless told otherwise."""
    batch: dict[str, Any] = {
        "environment": "production",
        "device_info": {"platform": "web", "locale_country": "US"} if device is None else device,
        "user_identities": {"email": EMAIL} if identities is None else identities,
        "events": list(events) if events else [commerce()],
    }
    batch.update(extra)
    return batch


def with_data(event: dict[str, Any], **data: Any) -> dict[str, Any]:
    """A copy of an mParticle event with more ``data`` keys."""
    out = copy.deepcopy(event)
    out["data"].update(data)
    return out


# --- Segment builders ---------------------------------------------------------


def track(event: str = "Order Completed", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "track",
        "event": event,
        "messageId": "m1",
        "userId": "u1",
        "timestamp": "2025-11-23T12:13:20.000Z",
        "properties": {},
        "context": {"locale": "en-US", "traits": {"email": EMAIL}},
    }
    message.update(fields)
    return message


# --- running -----------------------------------------------------------------


def settings(**raw: Any) -> OutputSettings:
    return output_settings(raw)


def run(
    source: str,
    payload: Any,
    settings_raw: dict[str, Any] | None = None,
    *,
    now: datetime = NOW,
    body: bytes | None = None,
    content_type: str | None = None,
) -> MapResult:
    """Map a payload through the same path as ``relay map`` (bytes in)."""
    data = body if body is not None else json.dumps(payload).encode("utf-8")
    result = map_payload(
        source,
        data,
        settings=output_settings(settings_raw or {}),
        now=now,
        content_type=content_type,
    )
    assert_consistent(result)
    return result


def run_mp(batch: dict[str, Any], now: datetime = NOW, **settings_raw: Any) -> MapResult:
    return run("mparticle", batch, settings_raw, now=now)


def events_of(result: MapResult) -> list[dict[str, Any]]:
    return [event for request in result.requests for event in request["events"]]


def single(result: MapResult) -> dict[str, Any]:
    """The one forwarded event of a result (fails loudly otherwise)."""
    events = events_of(result)
    assert len(events) == 1, (events, result.dropped)
    return events[0]


def drops(result: MapResult) -> dict[int, str]:
    return {d.index: d.reason for d in result.dropped}


def only_drop(result: MapResult) -> str:
    """The reason of the one dropped event of a result with nothing forwarded."""
    assert result.requests == [], result.requests
    assert len(result.dropped) == 1, result.dropped
    return result.dropped[0].reason


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def assert_consistent(result: MapResult) -> None:
    """Invariants every mapping result keeps (mapping.md §9, §12, amazon-api.md)."""
    assert len(result.requests) == len(result.index_maps)
    forwarded: list[int] = []
    for request, index_map in zip(result.requests, result.index_maps, strict=True):
        assert 1 <= len(request["events"]) <= 500
        assert len(request["events"]) == len(index_map)
        assert request_errors(request) == [], request_errors(request)
        forwarded.extend(index_map)
    assert forwarded == sorted(forwarded), "batch order is kept"
    assert len(set(forwarded)) == len(forwarded), "an event is forwarded at most once"
    dropped = [d.index for d in result.dropped]
    assert len(set(dropped)) == len(dropped), "an event has at most one drop reason"
    assert not set(dropped) & set(forwarded), "never both forwarded and dropped"
    for d in result.dropped:
        assert d.reason in DROP_REASONS, d


def assert_fused_lane_equals_reference(
    lane: Callable[..., MapResult],
    source_adapter: SourceAdapter,
    payload: Any,
    output: OutputSettings,
) -> None:
    """A fused lane (``pipeline.map_mparticle``, ``map_records``) against its reference,
    the source's adapter + the mapper: the same answer byte for byte, including the index
    maps and the count of skipped customData entries, and the same refusals."""
    try:
        parsed = source_adapter.parse(payload)
    except PayloadError:
        with pytest.raises(PayloadError):
            lane(payload, settings=output, now=NOW)
        return
    reference = map_events(
        parsed.events,
        source=source_adapter.name,
        settings=output,
        now=NOW,
        rejects=parsed.rejects,
    )
    fused = lane(payload, settings=output, now=NOW)
    assert json.dumps(fused.requests) == json.dumps(reference.requests)
    assert fused.index_maps == reference.index_maps
    assert fused.dropped == reference.dropped
    assert fused.custom_data_skipped == reference.custom_data_skipped
