"""The contract every source adapter keeps (sources.md): one suite for all of SOURCES.

For every adapter and every shape of input (a good batch, an empty one, unknown
events, missing ids, unicode, wrong types, huge numbers, deep nesting, a payload that
is not a batch at all), under plain and strict output settings:

- mapping never raises, except ``PayloadError`` for a payload unusable as a whole;
- every inbound event is forwarded or dropped, exactly once, with one known reason;
- every request is valid for Amazon's schema (``app.amazon.schema.request_errors``),
  with 1..500 events;
- the same input, settings and ``now`` give the same output, byte for byte, and the
  adapter does not change its input;
- the wire path (``decode`` then ``parse``) agrees with the decoded path.

A new adapter added to SOURCES must add its shapes to ``SHAPES`` (a test checks it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app.amazon.mapping import DROP_REASONS, MAX_EVENTS_PER_REQUEST, MapResult
from app.amazon.schema import request_errors
from app.amazon.settings import OutputSettings
from app.errors import PayloadError
from app.pipeline import map_parsed, map_payload
from app.sources import SOURCES

NOW = datetime(2025, 11, 23, 20, 0, tzinfo=UTC)
MS = int((NOW - timedelta(minutes=5)).timestamp() * 1000)
ISO = (NOW - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
DEEP = 3000
HUGE = 10**40

RULES = [
    {"conversion_type": "OFF_AMAZON_PURCHASES", "action": "purchase", "data_set_name": "mp_set"},
    {"conversion_type": "SIGN_UP", "event_name": "order completed", "name": "Renamed"},
    {"conversion_type": "PAGE_VIEW", "source": "segment", "kind": "page"},
    {"conversion_type": "LEAD", "kind": "record", "data_set_name": "records_set"},
]
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {"advertiser_id": "1234567890", "connection_id": "con_contract"},
    "rules": {
        "advertiser_id": "1234567890",
        "connection_id": "con_contract",
        "region": "FE",
        "match_keys": "extended",
        "data_set_name": "contract_set",
        "partner_name": "contract_partner",
        "max_event_age_hours": 504,
        "default_rules": False,
        "conversion_rules": RULES,
    },
    "eu_consent": {
        "advertiser_id": "1234567890",
        "connection_id": "con_contract",
        "region": "EU",
        "consent_mode": "require_granted",
        "consent_purpose_user_data": "marketing",
        "consent_purpose_ad_storage": "marketing",
        "consent_category_advertising": "C0004",
        "conversion_rules": RULES,
    },
}
UNICODE = [
    "Zoë Ångström",
    "李小龍",
    "عربى",
    "🛒🎉",
    "e\u0301",
    "\u0000nul",
    "\ufeffbom",
    "\u202eRTL",
]


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


@dataclass(frozen=True)
class Shape:
    """A payload builder (fresh objects each call) and what the contract expects of it."""

    build: Callable[[], Any]
    unusable: bool = False  # the payload as a whole: PayloadError is required
    may_be_unusable: bool = False  # PayloadError allowed (batch-level fields of wrong type)


def count_events(source: str, payload: Any) -> int:
    if source == "mparticle":
        return len(payload.get("events") or [])
    if source == "segment":
        if isinstance(payload, list):
            return len(payload)
        return len(payload["batch"]) if "batch" in payload else 1
    return len(payload) if isinstance(payload, list) else 1


# --- mParticle ------------------------------------------------------------------------------


def mp_commerce(action: Any = "purchase", **data: Any) -> dict[str, Any]:
    return {
        "event_type": "commerce_event",
        "data": {
            "timestamp_unixtime_ms": MS,
            "currency_code": "USD",
            "product_action": {
                "action": action,
                "total_amount": 59.99,
                "products": [{"id": "sku1", "price": 19.99, "quantity": 3, "brand": "Acme"}],
            },
            **data,
        },
    }


def mp_batch(*events: Any, **fields: Any) -> dict[str, Any]:
    return {
        "environment": "production",
        "user_identities": {"email": "shopper@example.com", "customer_id": "c-1"},
        "device_info": {"platform": "iOS", "locale_country": "US", "ios_advertising_id": "A" * 8},
        "consent_state": {"gdpr": {"marketing": {"consented": True}}},
        "events": list(events),
        **fields,
    }


MPARTICLE = {
    "good_batch": Shape(
        lambda: mp_batch(
            mp_commerce(),
            mp_commerce("add_to_cart"),
            mp_commerce("view_detail", custom_attributes={"amzn_user_data": "granted"}),
            {
                "event_type": "custom_event",
                "data": {"event_name": "Viewed", "timestamp_unixtime_ms": MS},
            },
            {"event_type": "screen_view", "data": {"screen_name": "Home"}},
        )
    ),
    "empty": Shape(lambda: mp_batch()),
    "no_events_key": Shape(lambda: {"environment": "production"}),
    "unknown_event": Shape(
        lambda: mp_batch(
            {"event_type": "teleport", "data": {"timestamp_unixtime_ms": MS}},
            mp_commerce("levitate"),
            mp_commerce(""),
            {"event_type": "commerce_event", "data": {}},
        )
    ),
    "missing_ids": Shape(
        lambda: {"events": [mp_commerce(), mp_commerce("checkout")], "device_info": {}}
    ),
    "unicode": Shape(
        lambda: mp_batch(
            *(
                mp_commerce(
                    "purchase",
                    event_name=text,
                    custom_attributes={text: text, "brand": text},
                    currency_code=text,
                )
                for text in UNICODE
            ),
            user_identities={"email": "zoë@exämple.com", "other": "李"},
            device_info={"platform": "Android", "locale_country": "DE"},
        )
    ),
    "wrong_types": Shape(
        lambda: mp_batch(
            5,
            "x",
            None,
            [],
            {"event_type": 3},
            {"data": "x"},
            {"event_type": "commerce_event", "data": {"product_action": "purchase"}},
            mp_commerce(["purchase"]),
            mp_commerce({"a": 1}),
            {
                "event_type": "commerce_event",
                "data": {
                    "timestamp_unixtime_ms": "soon",
                    "currency_code": 5,
                    "custom_attributes": [1, 2],
                    "product_action": {
                        "action": "purchase",
                        "products": "x",
                        "total_amount": {"a": 1},
                    },
                },
            },
            mp_commerce(event_id={"x": 1}, source_message_id=[1]),
            mp_commerce(custom_attributes={"amzn_user_data": ["granted"], "tcf": {"a": 1}}),
        )
    ),
    "wrong_batch_types": Shape(
        lambda: mp_batch(
            mp_commerce(),
            user_identities="x",
            device_info=[],
            consent_state=5,
            user_attributes="y",
            ip=7,
        ),
        may_be_unusable=True,
    ),
    "huge_numbers": Shape(
        lambda: mp_batch(
            mp_commerce(timestamp_unixtime_ms=HUGE),
            mp_commerce(timestamp_unixtime_ms=-HUGE),
            mp_commerce(event_id=2**64 + 1, timestamp_unixtime_ms=str(MS)),
            {
                "event_type": "commerce_event",
                "data": {
                    "timestamp_unixtime_ms": MS,
                    "product_action": {
                        "action": "purchase",
                        "total_amount": 1e308,
                        "products": [
                            {"id": "a", "price": HUGE, "quantity": 2**70},
                            {"id": "b", "price": "1e999999", "quantity": "-1e400"},
                        ],
                    },
                },
            },
            mp_commerce(custom_attributes={"n": -(2**63), "f": 1e-320, "s": "9" * 500}),
            mpid=-(2**63),
        )
    ),
    "deep": Shape(
        lambda: mp_batch(
            mp_commerce(custom_attributes={"deep": nested(DEEP)}),
            mp_commerce("purchase", product_action_extra=nested(DEEP)),
        )
    ),
    "not_a_batch_string": Shape(lambda: "events", unusable=True),
    "not_a_batch_list": Shape(lambda: [mp_batch(mp_commerce())], unusable=True),
    "not_a_batch_null": Shape(lambda: None, unusable=True),
    "events_not_a_list": Shape(lambda: {"events": {"0": mp_commerce()}}, unusable=True),
}

# --- Segment spec -----------------------------------------------------------------------------

CONTEXT = {"traits": {"email": "shopper@example.com", "address": {"country": "US"}}}


def seg_track(event: Any = "Order Completed", **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event,
        "messageId": f"m-{event}",
        "timestamp": ISO,
        "properties": {"total": 42.5, "currency": "usd", "products": [{"price": 1, "quantity": 2}]},
        "context": CONTEXT,
        **fields,
    }


def seg(*messages: Any, **fields: Any) -> dict[str, Any]:
    return {"batch": list(messages), **fields}


SEGMENT = {
    "good_batch": Shape(
        lambda: seg(
            seg_track(),
            seg_track("Product Added", properties={"price": 3, "quantity": 2}),
            {"type": "page", "name": "Home", "timestamp": ISO, "context": CONTEXT},
            {"type": "screen", "name": "Cart", "context": {**CONTEXT, "device": {"type": "ios"}}},
            {"type": "identify", "userId": "u1", "traits": {"email": "a@b.co"}},
            seg_track(
                "Product Viewed",
                properties={"price": 5, "amznUserData": "GRANTED", "amznAdStorage": "GRANTED"},
            ),
            {
                "type": "page",
                "timestamp": ISO,
                "context": {
                    **CONTEXT,
                    "ip": "203.0.113.9",
                    "consent": {"categoryPreferences": {"C0004": True}},
                },
            },
        )
    ),
    "bare_array": Shape(lambda: [seg_track(), seg_track("Signed Up")]),
    "single_message": Shape(lambda: seg_track()),
    "empty": Shape(lambda: seg()),
    "empty_array": Shape(lambda: []),
    "unknown_event": Shape(
        lambda: seg(
            seg_track("Teleported"),
            {"type": "bogus", "context": CONTEXT},
            {"type": "group", "groupId": "g"},
            {"type": "alias", "previousId": "a", "userId": "b"},
            {"context": CONTEXT},
        )
    ),
    "missing_ids": Shape(
        lambda: seg(seg_track(context={}), seg_track("Product Added", context={"locale": "en-US"}))
    ),
    "unicode": Shape(
        lambda: seg(
            *(
                seg_track(
                    text,
                    messageId=text,
                    properties={"brand": text, "category": text, "currency": text},
                    context={"traits": {"email": f"{text}@exämple.com"}, "locale": text},
                )
                for text in UNICODE
            ),
            seg_track(context={"traits": {"email": "zoë@exämple.com"}, "locale": "de-DE"}),
        )
    ),
    "wrong_types": Shape(
        lambda: seg(
            5,
            "x",
            None,
            [],
            {"type": 5},
            seg_track(["a"]),
            seg_track(properties="x"),
            seg_track(properties={"products": "x", "total": {"a": 1}, "currency": 5}),
            seg_track(context="x"),
            seg_track(context={"traits": [], "device": "x", "locale": 5, "consent": "y"}),
            seg_track(timestamp=5, messageId={"a": 1}),
            seg_track(properties={"products": [5, None, {"price": "x", "quantity": []}]}),
            seg_track(properties={"amznUserData": ["GRANTED"], "tcf": {"a": 1}, "gpp": 7}),
        )
    ),
    "wrong_batch_types": Shape(
        lambda: seg(seg_track(), context={"traits": "x", "device": 5}, integrations=[]),
        may_be_unusable=True,
    ),
    "huge_numbers": Shape(
        lambda: seg(
            seg_track(properties={"total": HUGE, "currency": "usd"}),
            seg_track(
                properties={"total": 1e308, "products": [{"price": 1e308, "quantity": 1e308}]}
            ),
            seg_track(properties={"revenue": "1e999999", "quantity": 2**70}),
            seg_track("Product Added", properties={"price": -HUGE, "quantity": -(2**63)}),
            seg_track(timestamp=HUGE, messageId=2**64),
            seg_track(originalTimestamp="99999-01-01T00:00:00Z", timestamp=None),
        )
    ),
    "deep": Shape(
        lambda: seg(
            seg_track(properties={"total": 1, "deep": nested(DEEP)}),
            seg_track(context={**CONTEXT, "deep": nested(DEEP)}),
        )
    ),
    "not_a_batch_string": Shape(lambda: "batch", unusable=True),
    "not_a_batch_null": Shape(lambda: None, unusable=True),
    "batch_not_a_list": Shape(lambda: {"batch": {"0": seg_track()}}, unusable=True),
    "context_not_an_object": Shape(lambda: seg(seg_track(), context="x"), unusable=True),
}

# --- flat records ------------------------------------------------------------------------------


def record(**fields: Any) -> dict[str, Any]:
    return {
        "event_type": "purchase",
        "event_time": ISO,
        "event_value": "12.50",
        "currency": "usd",
        "country_code": "US",
        "email": "shopper@example.com",
        **fields,
    }


RECORDS = {
    "good_batch": Shape(
        lambda: [
            record(),
            record(event_type="lead", event_id="lead-1"),
            {
                "eventType": "ADD_TO_SHOPPING_CART",
                "eventTime": MS,
                "countryCode": "US",
                "phone": "+1 415 555 2671",
            },
            record(event_type="sign_up", user_id="a" * 64, email=None),
            record(event_source="ios", maid="38400000-8cf0-11bd-b23e-10b96e40000d"),
            record(ip_address="203.0.113.9", data_processing_options="LIMITED_DATA_USE"),
        ]
    ),
    "single_object": Shape(lambda: record()),
    "empty": Shape(lambda: []),
    "unknown_event": Shape(
        lambda: [record(event_type="teleport"), record(event_type=None), {"email": "a@b.co"}]
    ),
    "missing_ids": Shape(lambda: [record(email=None), record(email="", phone=" ")]),
    "unicode": Shape(
        lambda: (
            [
                record(event_name=text, email=f"{text}@exämple.com", currency=text, event_id=text)
                for text in UNICODE
            ]
            + [{text: text for text in UNICODE}, record(country_code="Deutschland")]
        )
    ),
    "wrong_types": Shape(
        lambda: [
            5,
            "x",
            None,
            [],
            record(event_type=5),
            record(event_value={"a": 1}),
            record(event_time=[1]),
            record(email=5, country_code=5, phone=["1"]),
            record(units_sold="many"),
            record(event_source="moon"),
            record(advertiser_id="999"),
            record(data_processing_options=["LIMITED_DATA_USE"], ip_address=7),
        ]
    ),
    "huge_numbers": Shape(
        lambda: [
            record(event_value=HUGE),
            record(event_value="1e999999"),
            record(event_value=1e308, units_sold=2**70),
            record(event_time=HUGE),
            record(event_time=-HUGE),
            record(event_id=2**64 + 1, units_sold=-(2**63)),
            record(event_value="-" + "9" * 399),
        ]
    ),
    "deep": Shape(lambda: [record(extra=nested(DEEP)), record(event_name=nested(DEEP))]),
    "not_a_batch_string": Shape(lambda: "records", unusable=True),
    "not_a_batch_number": Shape(lambda: 42, unusable=True),
    "not_a_batch_null": Shape(lambda: None, unusable=True),
}

SHAPES: dict[str, dict[str, Shape]] = {
    "mparticle": MPARTICLE,
    "segment": SEGMENT,
    "records": RECORDS,
}
COMMON: tuple[str, ...] = (
    "good_batch",
    "empty",
    "unknown_event",
    "missing_ids",
    "unicode",
    "wrong_types",
)
COMMON += ("huge_numbers", "deep")


def cases() -> list[Any]:
    return [
        pytest.param(source, shape, settings, id=f"{source}-{shape}-{settings}")
        for source in sorted(SOURCES)
        for shape in sorted(SHAPES.get(source, {}))
        for settings in SETTINGS
    ]


def test_every_adapter_has_every_shape() -> None:
    assert set(SHAPES) == set(SOURCES)
    for source, shapes in SHAPES.items():
        assert set(COMMON) <= set(shapes), source
        assert any(shape.unusable for shape in shapes.values()), source


def run(source: str, payload: Any, settings: str) -> MapResult:
    return map_parsed(
        payload, source, settings=OutputSettings.from_mapping(SETTINGS[settings]), now=NOW
    )


def fingerprint(value: Any) -> list[Any]:
    """The structure of a JSON-like value as a flat list, without recursion (deep inputs)."""
    out: list[Any] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            out.append(("dict", len(item)))
            for key in reversed(list(item)):
                out.append(("key", key))
                stack.append(item[key])
        elif isinstance(item, list | tuple):
            out.append(("list", len(item)))
            stack.extend(reversed(item))
        else:
            out.append((type(item).__name__, item))
    return out


def snapshot(result: MapResult) -> bytes:
    return orjson.dumps(
        {
            "requests": result.requests,
            "index_maps": result.index_maps,
            "dropped": [d.as_dict() for d in result.dropped],
        }
    )


@pytest.mark.parametrize(("source", "shape", "settings"), cases())
def test_contract(source: str, shape: str, settings: str) -> None:
    spec = SHAPES[source][shape]
    payload = spec.build()
    before = fingerprint(payload)
    if spec.unusable:
        with pytest.raises(PayloadError, match=r"\w"):
            run(source, payload, settings)
        return
    try:
        result = run(source, payload, settings)
    except PayloadError:
        if spec.may_be_unusable:  # batch-level fields of the wrong type: a 400 is fine
            return
        raise
    assert fingerprint(payload) == before, "the adapter changed its input"

    # Every inbound event: forwarded or dropped, exactly once, with one known reason.
    total = count_events(source, payload)
    forwarded = [i for index_map in result.index_maps for i in index_map]
    dropped = [d.index for d in result.dropped]
    assert sorted(forwarded + dropped) == list(range(total))
    assert all(d.reason in DROP_REASONS for d in result.dropped)
    assert all(d.detail for d in result.dropped if d.reason == "invalid_event")

    # Amazon's schema, request by request.
    assert len(result.requests) == len(result.index_maps)
    for request, index_map in zip(result.requests, result.index_maps, strict=True):
        assert 1 <= len(request["events"]) <= MAX_EVENTS_PER_REQUEST
        assert len(request["events"]) == len(index_map)
        assert request_errors(request) == []
        orjson.dumps(request)  # the exact bytes a delivery stores

    # Deterministic: the same input (fresh objects), settings and now, the same bytes.
    assert snapshot(run(source, spec.build(), settings)) == snapshot(result)

    # The wire path agrees (when the payload can be JSON text at all).
    try:
        body = json.dumps(payload).encode()
    except (RecursionError, ValueError):
        return
    decoded = SOURCES[source].decode(body, "application/json")
    from_wire = map_payload(
        source,
        body,
        settings=OutputSettings.from_mapping(SETTINGS[settings]),
        now=NOW,
        content_type="application/json",
    )
    assert snapshot(from_wire) == snapshot(run(source, decoded, settings))


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_good_batches_forward_something(source: str) -> None:
    """The good shapes are good: the suite is not passing on drops alone."""
    result = run(source, SHAPES[source]["good_batch"].build(), "plain")
    assert result.forwarded >= 2
    events = [e for r in result.requests for e in r["events"]]
    assert len({e["eventId"] for e in events}) == len(events)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_big_batches_split_at_500(source: str) -> None:
    builders: dict[str, Callable[[int], Any]] = {
        "mparticle": lambda n: mp_batch(*(mp_commerce(event_id=str(i)) for i in range(n))),
        "segment": lambda n: seg(*(seg_track(messageId=f"m{i}") for i in range(n))),
        "records": lambda n: [record(event_id=f"r{i}") for i in range(n)],
    }
    result = run(source, builders[source](1_201), "plain")
    assert [len(m) for m in result.index_maps] == [500, 500, 201]
    assert [i for m in result.index_maps for i in m] == list(range(1_201))
