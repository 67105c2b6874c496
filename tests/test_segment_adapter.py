"""Segment-spec source (sources.md): Segment, RudderStack, MetaRouter, analytics.js.

Messages are built with Segment's official Python library (``segment.analytics``,
``send=False``: it returns the message it would send) where it can build them, and
from the Segment spec's own examples otherwise.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from mapping_helpers import (
    EMAIL,
    EMAIL_KEY,
    IDFA,
    NOW_TEXT,
    TS_TEXT,
    canonical,
    deterministic_id,
    drops,
    events_of,
    only_drop,
    run,
    sha256,
    single,
    track,
)
from segment.analytics.client import Client

from app.errors import PayloadError

ABSENT = object()
WHEN = datetime(2025, 11, 23, 12, 13, 20, 123000, tzinfo=UTC)


@pytest.fixture(scope="module")
def segment() -> Client:
    """Segment's analytics-python client that builds messages and sends nothing."""
    return Client("test-write-key", send=False, sync_mode=True)


def built(result: tuple[bool, dict[str, Any]]) -> dict[str, Any]:
    ok, message = result
    assert ok
    return message


def seg(payload: Any, raw: dict[str, Any] | None = None, **kw: Any) -> Any:
    return run("segment", payload, raw, **kw)


# Segment ecommerce spec v2 examples (segment.com/docs/connections/spec/ecommerce/v2)
ORDER_COMPLETED = {
    "checkout_id": "fksdjfsdjfisjf9sdfjsd9f",
    "order_id": "50314b8e9bcf000000000000",
    "affiliation": "Google Store",
    "total": 27.50,
    "subtotal": 22.50,
    "revenue": 25.00,
    "shipping": 3,
    "tax": 2,
    "discount": 2.5,
    "coupon": "hasbros",
    "currency": "USD",
    "products": [
        {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "45790-32",
            "name": "Monopoly: 3rd Edition",
            "price": 19,
            "quantity": 1,
            "category": "Games",
            "url": "https://www.example.com/product/path",
            "image_url": "https:///www.example.com/product/path.jpg",
        },
        {
            "product_id": "505bd76785ebb509fc183733",
            "sku": "46493-32",
            "name": "Uno Card Game",
            "price": 3,
            "quantity": 2,
            "category": "Games",
        },
    ],
}
PRODUCT_ADDED = {
    "cart_id": "skdjsidjsdkdj29j",
    "product_id": "507f1f77bcf86cd799439011",
    "sku": "G-32",
    "category": "Games",
    "name": "Monopoly: 3rd Edition",
    "brand": "Hasbro",
    "variant": "200 pieces",
    "price": 18.99,
    "quantity": 1,
    "coupon": "MAYDEALS",
    "position": 3,
    "url": "https://www.example.com/product/path",
    "image_url": "https://www.example.com/product/path.jpg",
}
CHECKOUT_STARTED = {
    "order_id": "50314b8e9bcf000000000000",
    "affiliation": "Google Store",
    "value": 30,
    "revenue": 25.00,
    "shipping": 3,
    "tax": 2,
    "discount": 2.5,
    "coupon": "hasbros",
    "currency": "USD",
    "products": [
        {
            "product_id": "507f1f77bcf86cd799439011",
            "sku": "45790-32",
            "name": "Monopoly: 3rd Edition",
            "price": 19,
            "quantity": 1,
            "category": "Games",
        }
    ],
}
CONTEXT = {
    "ip": "108.0.78.21",
    "locale": "en-US",
    "device": {"type": "ios", "advertisingId": IDFA, "adTrackingEnabled": True},
    "traits": {"email": " Buyer@Example.com ", "phone": "(415) 555-2671"},
}
BUYER_KEYS = [
    {"type": "EMAIL", "values": [sha256("buyer@example.com")]},
    {"type": "PHONE", "values": [sha256("14155552671")]},
    {"type": "MAID", "values": [IDFA.lower()]},
]


def entry(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value, "dataType": "STRING"}


# ---------------------------------------------------------------------------
# the ecommerce spec examples


def test_order_completed(segment: Client) -> None:
    message = built(
        segment.track(
            user_id="u-42",
            event="Order Completed",
            properties=copy.deepcopy(ORDER_COMPLETED),
            context=copy.deepcopy(CONTEXT),
            timestamp=WHEN,
            message_id="ajs-oc-1",
        )
    )
    assert message["timestamp"] == "2025-11-23T12:13:20.123+00:00"  # the library's format
    out = single(seg(message, {"data_set_name": "web_purchases", "partner_name": "acme"}))
    assert canonical(out) == canonical(
        {
            "eventDescription": {
                "conversionType": "OFF_AMAZON_PURCHASES",
                "eventSource": "IOS",
                "name": "Order Completed",
                "eventIngestionMethod": "SERVER_TO_SERVER",
                "dataSetName": "web_purchases",
            },
            "countryCode": "US",
            "matchKeys": BUYER_KEYS,
            "eventTime": "2025-11-23T12:13:20.123Z",
            "eventId": "ajs-oc-1",
            "value": 27.5,
            "currencyCode": "USD",
            "unitsSold": 3,
            "customData": [
                entry("category", "Games"),
                entry("productId", "507f1f77bcf86cd799439011"),
            ],
            "consent": {"geo": {"ipAddress": "108.0.78.21"}},
            "partner": "acme",
        }
    )


def test_product_added(segment: Client) -> None:
    properties = {**PRODUCT_ADDED, "quantity": 2}
    message = built(
        segment.track(
            user_id="u-42",
            event="Product Added",
            properties=properties,
            context={"locale": "en-US", "traits": {"email": EMAIL}},
            timestamp=WHEN,
            message_id="ajs-pa-1",
        )
    )
    out = single(seg(message))
    assert canonical(out) == canonical(
        {
            "eventDescription": {
                "conversionType": "ADD_TO_SHOPPING_CART",
                "eventSource": "WEBSITE",
                "name": "Product Added",
                "eventIngestionMethod": "SERVER_TO_SERVER",
            },
            "countryCode": "US",
            "matchKeys": [EMAIL_KEY],
            "eventTime": "2025-11-23T12:13:20.123Z",
            "eventId": "ajs-pa-1",
            "value": 37.98,  # price x quantity; no currency or units (not a purchase)
            "customData": [
                entry("brand", "Hasbro"),
                entry("category", "Games"),
                entry("productId", "507f1f77bcf86cd799439011"),
            ],
        }
    )


def test_checkout_started(segment: Client) -> None:
    message = built(
        segment.track(
            user_id="u-42",
            event="Checkout Started",
            properties=copy.deepcopy(CHECKOUT_STARTED),
            context={"locale": "en-GB", "traits": {"email": EMAIL}},
            timestamp=WHEN,
            message_id="ajs-cs-1",
        )
    )
    out = single(seg(message))
    assert out["eventDescription"]["conversionType"] == "CHECKOUT"
    assert out["eventDescription"]["name"] == "Checkout Started"
    assert out["countryCode"] == "GB"
    assert out["value"] == 30  # properties.value, not revenue
    assert "currencyCode" not in out
    assert "unitsSold" not in out
    assert out["customData"] == [
        entry("category", "Games"),
        entry("productId", "507f1f77bcf86cd799439011"),
    ]


def test_products_searched(segment: Client) -> None:
    message = built(
        segment.track(
            user_id="u-42",
            event="Products Searched",
            properties={"query": "blue roses"},
            context={"locale": "en-US", "traits": {"email": EMAIL}},
            timestamp=WHEN,
            message_id="ajs-ps-1",
        )
    )
    out = single(seg(message))
    assert out["eventDescription"] == {
        "conversionType": "SEARCH",
        "eventSource": "WEBSITE",
        "name": "Products Searched",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert "value" not in out
    assert "customData" not in out


def test_page(segment: Client) -> None:
    message = built(
        segment.page(
            user_id="u-42",
            category="Docs",
            name="Pricing",
            properties={"url": "https://example.com/pricing", "title": "Pricing"},
            context={"locale": "en-US", "traits": {"email": EMAIL}, "ip": "8.8.8.8"},
            timestamp=WHEN,
            message_id="ajs-page-1",
        )
    )
    out = single(seg(message))
    assert out["eventDescription"] == {
        "conversionType": "PAGE_VIEW",
        "eventSource": "WEBSITE",
        "name": "Page View",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert out["eventId"] == "ajs-page-1"
    assert out["consent"] == {"geo": {"ipAddress": "8.8.8.8"}}


def test_screen(segment: Client) -> None:
    message = built(
        segment.screen(
            user_id="u-42",
            name="Home",
            context={
                "locale": "de-DE",
                "traits": {"email": EMAIL},
                "device": {"type": "android", "advertisingId": "AAID-1"},
            },
            timestamp=WHEN,
            message_id="ajs-screen-1",
        )
    )
    out = single(seg(message))
    assert out["eventDescription"] == {
        "conversionType": "PAGE_VIEW",
        "eventSource": "ANDROID",
        "name": "Screen View",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert out["countryCode"] == "DE"
    assert out["matchKeys"] == [EMAIL_KEY, {"type": "MAID", "values": ["aaid-1"]}]


# ---------------------------------------------------------------------------
# default conversion rules (sources.md table)


DEFAULTS = [
    ("Order Completed", "OFF_AMAZON_PURCHASES"),
    ("Product Added", "ADD_TO_SHOPPING_CART"),
    ("Checkout Started", "CHECKOUT"),
    ("Product Viewed", "PAGE_VIEW"),
    ("Product List Viewed", "PAGE_VIEW"),
    ("Cart Viewed", "PAGE_VIEW"),
    ("Products Searched", "SEARCH"),
    ("Product Removed", "OTHER"),
    ("Product Clicked", "OTHER"),
    ("Signed Up", "SIGN_UP"),
    ("Lead Generated", "LEAD"),
    ("Application Submitted", "APPLICATION"),
    ("Callback Started", "CONTACT"),
    ("Subscription Created", "SUBSCRIBE"),
    ("Application Installed", "MOBILE_APP_FIRST_START"),
    # v1 names
    ("Completed Order", "OFF_AMAZON_PURCHASES"),
    ("Added Product", "ADD_TO_SHOPPING_CART"),
    ("Viewed Product", "PAGE_VIEW"),
    # names match case-insensitively
    ("order completed", "OFF_AMAZON_PURCHASES"),
    ("PRODUCT ADDED", "ADD_TO_SHOPPING_CART"),
    ("  Signed Up ", "SIGN_UP"),
]


@pytest.mark.parametrize(("event", "conversion_type"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_default_track_rules(event: str, conversion_type: str) -> None:
    out = single(seg(track(event)))
    assert out["eventDescription"]["conversionType"] == conversion_type
    assert out["eventDescription"]["name"] == event.strip()  # the event name as sent


@pytest.mark.parametrize(
    "message",
    [
        {
            "type": "identify",
            "userId": "u1",
            "traits": {"email": EMAIL, "address": {"country": "US"}},
        },
        {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"email": EMAIL}},
        {"type": "alias", "userId": "u1", "previousId": "anon-1"},
        track("Song Played"),
        track("Application Opened"),
        track("Order Refunded"),
        {**track("x"), "event": None},
        {**track("x"), "type": "something"},
        {k: v for k, v in track("Order Completed").items() if k != "type"},
    ],
    ids=[
        "identify",
        "group",
        "alias",
        "unknown-track",
        "application-opened",
        "order-refunded",
        "track-without-event",
        "unknown-type",
        "no-type",
    ],
)
def test_unmapped_messages(message: dict[str, Any]) -> None:
    assert only_drop(seg(message)) == "unmapped_event"


def test_identify_group_alias_built_by_the_library(segment: Client) -> None:
    ctx = {"locale": "en-US", "traits": {"email": EMAIL}}
    messages = [
        built(segment.identify(user_id="u1", traits={"email": EMAIL}, context=copy.deepcopy(ctx))),
        built(segment.group(user_id="u1", group_id="g1", context=copy.deepcopy(ctx))),
        built(segment.alias(previous_id="anon", user_id="u1", context=copy.deepcopy(ctx))),
        built(segment.track(user_id="u1", event="Song Played", context=copy.deepcopy(ctx))),
    ]
    result = seg({"batch": messages})
    assert drops(result) == dict.fromkeys(range(4), "unmapped_event")
    assert result.requests == []


# ---------------------------------------------------------------------------
# batches, context merge, bare arrays


def test_batch_context_merge_message_wins() -> None:
    batch = {
        "batch": [
            {
                "type": "track",
                "event": "Order Completed",
                "messageId": "a",
                "timestamp": "2025-11-23T12:13:20.000Z",
                "context": {"locale": "en-US"},
            },
            {
                "type": "track",
                "event": "Product Added",
                "messageId": "b",
                "timestamp": "2025-11-23T12:13:20.000Z",
                "context": {"traits": {"email": "other@example.com"}, "ip": "8.8.4.4"},
            },
        ],
        "context": {
            "ip": "203.0.113.5",
            "locale": "en-GB",
            "device": {"type": "android", "advertisingId": "AAID-9"},
            "traits": {"email": EMAIL},
        },
        "integrations": {"All": True},
        "writeKey": "wk",
    }
    first, second = events_of(seg(batch))
    assert first["countryCode"] == "US"  # message's locale wins
    assert first["eventDescription"]["eventSource"] == "ANDROID"  # batch device
    assert first["matchKeys"] == [EMAIL_KEY, {"type": "MAID", "values": ["aaid-9"]}]
    assert first["consent"] == {"geo": {"ipAddress": "203.0.113.5"}}
    assert second["countryCode"] == "GB"  # batch locale
    assert second["matchKeys"] == [
        {"type": "EMAIL", "values": [sha256("other@example.com")]},
        {"type": "MAID", "values": ["aaid-9"]},
    ]
    assert second["consent"] == {"geo": {"ipAddress": "8.8.4.4"}}


def test_bare_array_of_messages(segment: Client) -> None:
    ctx = {"locale": "en-US", "traits": {"email": EMAIL}}
    messages = [
        built(
            segment.track(
                user_id="u1",
                event="Order Completed",
                properties={"total": 5},
                context=copy.deepcopy(ctx),
                timestamp=WHEN,
                message_id="m0",
            )
        ),
        built(segment.identify(user_id="u1", traits={"email": EMAIL}, context=copy.deepcopy(ctx))),
        built(
            segment.track(
                user_id="u1",
                event="Cart Viewed",
                context=copy.deepcopy(ctx),
                timestamp=WHEN,
                message_id="m2",
            )
        ),
    ]
    result = seg(messages)
    assert result.index_maps == [[0, 2]]
    assert drops(result) == {1: "unmapped_event"}
    assert [e["eventId"] for e in events_of(result)] == ["m0", "m2"]
    assert events_of(result)[0]["value"] == 5


def test_segment_http_api_batch_example() -> None:
    """The /v1/batch example of Segment's HTTP API docs (with its odd timestamps)."""
    batch = {
        "batch": [
            {
                "type": "identify",
                "userId": "019mr8mf4r",
                "traits": {"email": "jake@yahoo.com", "name": "Jake Peterson", "age": 26},
                "timestamp": "2012-12-02T00:30:08.276Z",
            },
            {
                "type": "track",
                "userId": "019mr8mf4r",
                "event": "Song Played",
                "properties": {"name": "Fallin for You", "artist": "Dierks Bentley"},
                "timestamp": "2012-12-02T00:30:12.984Z",
            },
            {
                "type": "identify",
                "userId": "971mj8mk7p",
                "traits": {"email": "cindy@example.com", "name": "Cindy Gonzalez", "age": 23},
                "timestamp": "2015-2-02T00:30:08.276Z",
            },
            {
                "type": "track",
                "userId": "971mj8mk7p",
                "event": "Song Played",
                "properties": {"name": "Get Right", "artist": "Jennifer Lopez"},
                "timestamp": "2015-2-02T00:30:12.984Z",
            },
        ],
        "writeKey": "YOUR_WRITE_KEY",
        "context": {"device": {"type": "phone", "name": "Apple iPhone 6"}},
    }
    result = seg(batch)
    assert drops(result) == dict.fromkeys(range(4), "unmapped_event")


@pytest.mark.parametrize(
    "payload",
    [
        "text",
        5,
        None,
        True,
        {"batch": {"type": "track"}},
        {"batch": "x"},
        {"batch": [], "context": "x"},
    ],
    ids=["string", "number", "null", "bool", "batch-object", "batch-string", "context-string"],
)
def test_unusable_payload_is_a_payload_error(payload: Any) -> None:
    with pytest.raises(PayloadError):
        seg(payload)


def test_malformed_messages_are_invalid_event_and_the_rest_go_on() -> None:
    messages = [
        "not a message",
        {**track("Order Completed"), "properties": "x"},
        {**track("Order Completed"), "context": ["x"]},
        {**track("Order Completed"), "traits": 5},
        {**track("Order Completed"), "timestamp": "not a date"},
        {**track("Order Completed"), "timestamp": "2025-02-30T00:00:00Z"},
        track("Order Completed"),
    ]
    result = seg(messages)
    assert drops(result) == dict.fromkeys(range(6), "invalid_event")
    assert all(d.detail for d in result.dropped)
    assert result.index_maps == [[6]]


# ---------------------------------------------------------------------------
# fields


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"type": "ios"}, "IOS"),
        ({"type": "iOS"}, "IOS"),
        ({"type": "android"}, "ANDROID"),
        ({"type": "fire_tv"}, "FIRE_TV"),
        ({"type": "firetv"}, "FIRE_TV"),
        ({"type": "Amazon Fire TV"}, "FIRE_TV"),
        ({"type": "phone"}, "WEBSITE"),
        ({"type": ""}, "WEBSITE"),
        ({}, "WEBSITE"),
        (ABSENT, "WEBSITE"),
    ],
    ids=[
        "ios",
        "iOS",
        "android",
        "fire_tv",
        "firetv",
        "amazon-fire-tv",
        "phone",
        "empty",
        "no-type",
        "no-device",
    ],
)
def test_event_source(device: Any, expected: str) -> None:
    message = track("Order Completed")
    if device is not ABSENT:
        message["context"]["device"] = device
    assert single(seg(message))["eventDescription"]["eventSource"] == expected


COUNTRY_LEVELS = [
    # context.traits.address.country, traits.address.country, properties.country_code,
    # context.location.country, context.locale
    (("CA", "DE", "FR", "JP", "en-US"), "CA"),
    ((None, "DE", "FR", "JP", "en-US"), "DE"),
    ((None, None, "FR", "JP", "en-US"), "FR"),
    ((None, None, None, "JP", "en-US"), "JP"),
    ((None, None, None, "Japan", "en-US"), "JP"),
    ((None, None, None, None, "en-US"), "US"),
    ((None, None, None, None, "pt_BR"), "BR"),
    ((None, None, None, None, "zh-Hant-TW"), "TW"),
    (("Narnia", "XX", "usa", None, "en-GB"), "US"),
    (("uk", None, None, None, None), "GB"),
    ((None, None, None, None, "en"), None),
    ((None, None, None, None, None), None),
]


@pytest.mark.parametrize(
    ("levels", "expected"), COUNTRY_LEVELS, ids=["/".join(map(str, c[0])) for c in COUNTRY_LEVELS]
)
def test_country_chain(levels: tuple[Any, ...], expected: str | None) -> None:
    context_country, trait_country, property_country, location_country, locale = levels
    context: dict[str, Any] = {"traits": {"email": EMAIL}}
    if context_country is not None:
        context["traits"]["address"] = {"country": context_country}
    if location_country is not None:
        context["location"] = {"country": location_country}
    if locale is not None:
        context["locale"] = locale
    message = track("Order Completed", context=context)
    if trait_country is not None:
        message["traits"] = {"address": {"country": trait_country}}
    if property_country is not None:
        message["properties"]["country_code"] = property_country
    result = seg(message)
    if expected is None:
        assert only_drop(result) == "no_country_code"
    else:
        assert single(result)["countryCode"] == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"timestamp": "2025-11-23T12:13:20.000Z"}, TS_TEXT),
        (
            {"timestamp": "2025-11-23T12:13:20Z", "originalTimestamp": "2025-11-23T10:00:00Z"},
            TS_TEXT,
        ),
        (
            {"originalTimestamp": "2025-11-23T12:13:20.000Z", "receivedAt": "2025-11-23T13:00:00Z"},
            TS_TEXT,
        ),
        ({"receivedAt": "2025-11-23T12:13:20.000Z"}, TS_TEXT),
        ({}, NOW_TEXT),
        ({"timestamp": "2025-11-23T12:13:20"}, TS_TEXT),  # no zone: UTC
        ({"timestamp": "2025-11-23 12:13:20Z"}, TS_TEXT),
        ({"timestamp": "2025-11-23T14:13:20.5+02:00"}, "2025-11-23T12:13:20.500Z"),
        ({"timestamp": "2025-11-23T07:13:20.123-05:00"}, "2025-11-23T12:13:20.123Z"),
        ({"timestamp": "2025-11-23T12:13:20.123456Z"}, "2025-11-23T12:13:20.123Z"),
        ({"timestamp": "2025-11-23T12:13:20.1Z"}, "2025-11-23T12:13:20.100Z"),
        ({"timestamp": "2025-11-23T9:5:3Z"}, "2025-11-23T09:05:03.000Z"),
        ({"timestamp": 1763900000000}, TS_TEXT),
    ],
    ids=[
        "timestamp",
        "timestamp-first",
        "originalTimestamp",
        "receivedAt",
        "none-now",
        "no-zone-utc",
        "space-separator",
        "plus-offset",
        "minus-offset",
        "microseconds",
        "one-digit-fraction",
        "unpadded-clock",
        "epoch-ms",
    ],
)
def test_event_time(fields: dict[str, Any], expected: str) -> None:
    message = {k: v for k, v in track("Order Completed").items() if k != "timestamp"}
    message.update(fields)
    assert single(seg(message))["eventTime"] == expected


def test_lenient_timestamp_from_segments_own_example() -> None:
    now = datetime(2015, 2, 2, 1, 0, tzinfo=UTC)
    message = track("Order Completed", timestamp="2015-2-02T00:30:08.276Z")
    out = single(seg(message, now=now))
    assert out["eventTime"] == "2015-02-02T00:30:08.276Z"
    assert only_drop(seg(message)) == "too_old"  # at the default now, years later


@pytest.mark.parametrize(
    ("message_id", "expected"),
    [("ajs-1", "ajs-1"), ("i" * 300, "i" * 256), (12345, "12345")],
    ids=["messageId", "truncated", "number"],
)
def test_event_id(message_id: Any, expected: str) -> None:
    assert single(seg(track(messageId=message_id)))["eventId"] == expected


@pytest.mark.parametrize(
    "message_id", [ABSENT, "", "   ", None], ids=["absent", "empty", "blank", "null"]
)
def test_deterministic_event_id_is_over_the_message_as_sent(message_id: Any) -> None:
    message = track("Order Completed")
    del message["messageId"]
    if message_id is not ABSENT:
        message["messageId"] = message_id
    batch = {"batch": [message], "context": {"ip": "203.0.113.5"}}
    out = single(seg(batch, {"connection_id": "seg-conn"}))
    assert out["eventId"] == deterministic_id("seg-conn", message)


# match keys


def test_email_and_phone_sources_in_priority_order() -> None:
    message = track(
        "Order Completed",
        context={
            "locale": "en-US",
            "traits": {"email": "ctx@example.com", "phone": "+1 415 555 0001"},
        },
        traits={"email": "traits@example.com", "phone": "+1 415 555 0002"},
        properties={"email": "props@example.com", "phone": "+1 415 555 0003"},
    )
    assert single(seg(message))["matchKeys"] == [
        {"type": "EMAIL", "values": [sha256("ctx@example.com")]},
        {"type": "PHONE", "values": [sha256("14155550001")]},
    ]
    message["context"]["traits"] = {"email": "   "}
    assert single(seg(message))["matchKeys"] == [
        {"type": "EMAIL", "values": [sha256("traits@example.com")]},
        {"type": "PHONE", "values": [sha256("14155550002")]},
    ]
    del message["traits"]
    assert single(seg(message))["matchKeys"] == [
        {"type": "EMAIL", "values": [sha256("props@example.com")]},
        {"type": "PHONE", "values": [sha256("14155550003")]},
    ]


@pytest.mark.parametrize(
    ("device", "maid"),
    [
        ({"advertisingId": IDFA}, IDFA.lower()),
        ({"advertisingId": IDFA, "adTrackingEnabled": True}, IDFA.lower()),
        ({"advertisingId": IDFA, "adTrackingEnabled": False}, None),
        ({"advertisingId": "00000000-0000-0000-0000-000000000000"}, None),
        ({"advertisingId": ""}, None),
    ],
    ids=["advertisingId", "tracking-enabled", "tracking-disabled", "zero-guid", "empty"],
)
def test_maid_and_ad_tracking(device: dict[str, Any], maid: str | None) -> None:
    message = track(
        "Order Completed", context={"locale": "en-US", "device": device, "traits": {"email": EMAIL}}
    )
    expected = [EMAIL_KEY] + ([{"type": "MAID", "values": [maid]}] if maid else [])
    assert single(seg(message))["matchKeys"] == expected
    del message["context"]["traits"]
    result = seg(message)
    if maid:
        assert single(result)["matchKeys"] == [{"type": "MAID", "values": [maid]}]
    else:
        assert only_drop(result) == "no_match_key"


def test_extended_keys_from_traits() -> None:
    message = track(
        "Order Completed",
        userId="user-77",
        context={
            "locale": "en-US",
            "traits": {"email": EMAIL, "firstName": "Jane", "address": {"city": "Seattle"}},
        },
        traits={
            "firstName": "Ignored",
            "last_name": "O'Neil",
            "address": {
                "street": "1 Main Street",
                "city": "Ignored",
                "state": "Washington",
                "postalCode": "98101-1234",
                "country": "US",
            },
        },
    )
    keys = single(seg(message, {"match_keys": "extended"}))["matchKeys"]
    assert keys == [
        EMAIL_KEY,
        {"type": "FIRST_NAME", "values": [sha256("jane")]},
        {"type": "LAST_NAME", "values": [sha256("oneil")]},
        {"type": "ADDRESS", "values": [sha256("1mainst")]},
        {"type": "CITY", "values": [sha256("seattle")]},
        {"type": "STATE", "values": [sha256("wa")]},
        {"type": "POSTAL", "values": [sha256("98101")]},
        {"type": "MATCH_ID", "values": ["user-77"]},
    ]
    assert single(seg(message))["matchKeys"] == [EMAIL_KEY]


# value, currency, units, customData


@pytest.mark.parametrize(
    ("event", "properties", "expected"),
    [
        ("Order Completed", {"total": 27.5, "revenue": 22.5, "value": 1}, 27.5),
        ("Order Completed", {"revenue": "22.50", "value": 1}, 22.5),
        ("Order Completed", {"value": 1.005}, 1.01),
        (
            "Order Completed",
            {
                "products": [
                    {"price": 19, "quantity": 1},
                    {"price": "3", "quantity": 2},
                    {"price": 10},
                    {"quantity": 9},
                ]
            },
            35,
        ),
        ("Order Completed", {"total": "n/a", "revenue": 22.5}, 22.5),
        ("Order Completed", {"total": -5}, ABSENT),
        ("Order Completed", {}, ABSENT),
        ("Product Added", {"value": 7, "price": 18.99, "quantity": 2}, 7),
        ("Product Added", {"price": 18.99, "quantity": 2}, 37.98),
        ("Product Added", {"price": "2.675"}, 2.68),
        ("Product Added", {"quantity": 2}, ABSENT),
        ("Product Viewed", {"total": 99, "revenue": 98}, ABSENT),
        ("Product Removed", {"value": -3}, -3),
        ("Order Completed", {"products": [{"price": "1e999999", "quantity": "1e999999"}]}, ABSENT),
    ],
    ids=[
        "total-first",
        "then-revenue",
        "then-value",
        "products-sum",
        "non-numeric-skipped",
        "negative-purchase",
        "purchase-none",
        "value-first",
        "price-x-quantity",
        "price-alone",
        "no-price",
        "non-purchase-ignores-total",
        "negative-other",
        "overflowing-line",
    ],
)
def test_value(event: str, properties: dict[str, Any], expected: Any) -> None:
    out = single(seg(track(event, properties=properties)))
    assert out.get("value", ABSENT) == expected


@pytest.mark.parametrize(
    ("event", "properties", "currency", "units"),
    [
        (
            "Order Completed",
            {"currency": "usd", "products": [{"quantity": 1}, {"quantity": "2"}]},
            "USD",
            3,
        ),
        ("Order Completed", {"currency": "EUR", "quantity": 4}, "EUR", 4),
        ("Order Completed", {"currency": "ISK", "products": [{"quantity": 0}]}, ABSENT, ABSENT),
        ("Order Completed", {"products": [{"id": "x"}], "quantity": 2}, ABSENT, 2),
        ("Order Completed", {"quantity": 2.5}, ABSENT, 3),
        ("Product Added", {"currency": "USD", "quantity": 2}, ABSENT, ABSENT),
    ],
    ids=[
        "products",
        "properties-quantity",
        "not-in-enum-zero",
        "products-without-quantity",
        "rounded",
        "not-a-purchase",
    ],
)
def test_currency_and_units(
    event: str, properties: dict[str, Any], currency: Any, units: Any
) -> None:
    out = single(seg(track(event, properties=properties)))
    assert out.get("currencyCode", ABSENT) == currency
    assert out.get("unitsSold", ABSENT) == units


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        (
            {"brand": "B", "category": "C", "product_id": "P", "sku": "S"},
            [("brand", "B"), ("category", "C"), ("productId", "P")],
        ),
        ({"sku": "S"}, [("productId", "S")]),
        (
            {
                "category": "Own",
                "products": [
                    {"brand": "FirstBrand", "category": "Prod", "sku": "S1"},
                    {"brand": "Second"},
                ],
            },
            [("brand", "FirstBrand"), ("category", "Own"), ("productId", "S1")],
        ),
        ({"product_id": 507, "brand": True}, [("brand", "true"), ("productId", "507")]),
        ({"brand": "", "products": [{"brand": "FromProduct"}]}, [("brand", "FromProduct")]),
        ({"coupon": "x", "name": "n"}, []),
    ],
    ids=["properties", "sku", "first-product", "non-text", "empty-falls-through", "none"],
)
def test_custom_data(properties: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    out = single(seg(track("Product Viewed", properties=properties)))
    assert out.get("customData", []) == [entry(n, v) for n, v in expected]


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"dataProcessingOptions": ["LIMITED_DATA_USE"]}, True),
        ({"dataProcessingOptions": ["OTHER", "LIMITED_DATA_USE"]}, True),
        ({"dataProcessingOptions": "LIMITED_DATA_USE"}, True),
        ({"data_processing_options": "LIMITED_DATA_USE"}, True),
        ({"data_processing_options": "limited_data_use"}, False),
        ({"dataProcessingOptions": []}, False),
        ({}, False),
    ],
    ids=["list", "list-with-other", "string", "snake-case", "lowercase", "empty-list", "none"],
)
def test_data_processing_options(properties: dict[str, Any], expected: bool) -> None:
    out = single(seg(track("Order Completed", properties=properties)))
    if expected:
        assert out["dataProcessingOptions"] == {"options": "LIMITED_DATA_USE"}
    else:
        assert "dataProcessingOptions" not in out


# consent


ADS = {"consent_category_advertising": "C0004"}


@pytest.mark.parametrize(
    ("context", "properties", "raw", "expected"),
    [
        (
            {"consent": {"categoryPreferences": {"C0004": True, "C0002": False}}},
            {},
            ADS,
            {"amznUserData": "GRANTED", "amznAdStorage": "GRANTED"},
        ),
        (
            {"consent": {"categoryPreferences": {"C0004": False}}},
            {},
            ADS,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        (
            {"consent": {"categoryPreferences": {"C0001": True}}},
            {},
            ADS,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        (
            {"consent": {"categoryPreferences": {}}},
            {},
            ADS,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        ({"consent": {"categoryPreferences": {"C0004": True}}}, {}, {}, None),
        ({}, {}, ADS, None),
        (
            {"consent": {"categoryPreferences": {"C0004": True}}},
            {"amznUserData": "denied"},
            ADS,
            {"amznUserData": "DENIED", "amznAdStorage": "GRANTED"},
        ),
        (
            {},
            {"amznUserData": "yes", "amznAdStorage": "no"},
            {},
            {"amznUserData": "GRANTED", "amznAdStorage": "DENIED"},
        ),
        ({}, {"amznAdStorage": "granted"}, {}, None),
        (
            {
                "consentManagement": {
                    "allowedConsentIds": ["C0001", "C0004"],
                    "deniedConsentIds": [],
                    "provider": "oneTrust",
                }
            },
            {},
            ADS,
            {"amznUserData": "GRANTED", "amznAdStorage": "GRANTED"},
        ),
        (
            {"consentManagement": {"allowedConsentIds": ["C0001"], "deniedConsentIds": ["C0004"]}},
            {},
            ADS,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        (
            {"consentManagement": {"allowedConsentIds": ["C0001"]}},
            {},
            ADS,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
    ],
    ids=[
        "segment-granted",
        "segment-denied",
        "segment-category-missing",
        "segment-empty",
        "category-not-configured",
        "no-preferences",
        "explicit-wins",
        "explicit-only",
        "ad-storage-alone",
        "rudderstack-allowed",
        "rudderstack-denied",
        "rudderstack-missing",
    ],
)
def test_consent(
    context: dict[str, Any], properties: dict[str, Any], raw: dict[str, Any], expected: Any
) -> None:
    message = track("Order Completed", properties=properties)
    message["context"].update(context)
    out = single(seg(message, raw))
    if expected is None:
        assert "consent" not in out
    else:
        assert out["consent"] == {"amazonConsent": expected}


def test_consent_from_batch_context_and_require_granted() -> None:
    batch: dict[str, Any] = {
        "batch": [track("Order Completed", messageId="a"), track("Product Added", messageId="b")],
        "context": {"consent": {"categoryPreferences": {"C0004": True}}},
    }
    batch["batch"][1]["context"]["consent"] = {"categoryPreferences": {"C0004": False}}
    raw = {**ADS, "consent_mode": "require_granted"}
    result = seg(batch, raw)
    assert drops(result) == {1: "consent_denied"}
    assert single(result)["consent"]["amazonConsent"]["amznUserData"] == "GRANTED"


def test_tcf_gpp_and_geo() -> None:
    message = track("Order Completed", properties={"tcf": "TCF-STRING", "gpp": "GPP-STRING"})
    message["context"]["ip"] = "2001:db8::8"
    assert single(seg(message))["consent"] == {
        "geo": {"ipAddress": "2001:db8::8"},
        "tcf": "TCF-STRING",
        "gpp": "GPP-STRING",
    }


def test_eu_output_without_consent_signal() -> None:
    result = seg(
        [
            track(messageId="a"),
            {
                **track(messageId="b"),
                "context": {"locale": "de-DE", "traits": {"email": EMAIL}, "ip": "203.0.113.5"},
            },
        ],
        {"region": "EU"},
    )
    assert drops(result) == {0: "missing_consent"}
    assert single(result)["countryCode"] == "DE"
