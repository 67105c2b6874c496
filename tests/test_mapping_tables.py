"""mapping.md, table by table: every row of §2-§13 as a parametrized case.

Each test builds an mParticle batch (the primary source of mapping.md), maps it the
way ``relay map`` does, and checks the Amazon event or the drop reason. Expected
hashes, ids and texts are computed here, never by the code under test.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mapping_helpers import (
    DROP_REASONS,
    EMAIL,
    EMAIL_HASH,
    EMAIL_KEY,
    HOUR_MS,
    IDFA,
    NOW,
    NOW_MS,
    NOW_TEXT,
    SPEC_EXAMPLE_INPUT,
    SPEC_EXAMPLE_OUTPUT,
    TS,
    TS_TEXT,
    ZERO_GUID,
    canonical,
    commerce,
    custom,
    deterministic_id,
    drops,
    events_of,
    mp_batch,
    only_drop,
    run,
    run_mp,
    settings,
    sha256,
    single,
    with_data,
)

from app.errors import PayloadError, SettingsError

ABSENT = object()  # an expected key that must not be in the output


def ids(value: Any) -> str:
    """Readable pytest ids for odd values (blank strings, long strings, objects)."""
    if value is ABSENT:
        return "absent"
    if isinstance(value, str):
        if not value.strip():
            return f"blank{len(value)}"
        return value if len(value) <= 24 else f"{value[:12]}..{len(value)}chars"
    return json.dumps(value)[:24]


def get(event: dict[str, Any], key: str) -> Any:
    return event.get(key, ABSENT)


def no_event_id(event: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(event)
    out["data"].pop("event_id", None)
    return out


# ---------------------------------------------------------------------------
# §2 Which events are forwarded


ACTIONS = [
    ("purchase", "OFF_AMAZON_PURCHASES", "Purchase"),
    ("add_to_cart", "ADD_TO_SHOPPING_CART", "Add To Cart"),
    ("checkout", "CHECKOUT", "Checkout"),
    ("view_detail", "PAGE_VIEW", "View Detail"),
    ("remove_from_cart", "OTHER", "Remove From Cart"),
    ("checkout_option", "OTHER", "Checkout Option"),
    ("click", "OTHER", "Click"),
    ("refund", "OTHER", "Refund"),
    ("add_to_wishlist", "OTHER", "Add To Wishlist"),
    ("remove_from_wish_list", "OTHER", "Remove From Wish List"),
    ("remove_from_wishlist", "OTHER", "Remove From Wishlist"),
    ("unknown", "OTHER", "Unknown"),
    # case and whitespace drift
    ("PURCHASE", "OFF_AMAZON_PURCHASES", "Purchase"),
    ("  Add_To_Cart  ", "ADD_TO_SHOPPING_CART", "Add To Cart"),
    ("\tCheckout\n", "CHECKOUT", "Checkout"),
    ("View_Detail", "PAGE_VIEW", "View Detail"),
    ("REMOVE_FROM_WISHLIST", "OTHER", "Remove From Wishlist"),
    ("Unknown", "OTHER", "Unknown"),
    # any other non-empty value
    ("gift_wrap", "OTHER", "Gift Wrap"),
    ("Store Pickup", "OTHER", "Store Pickup"),
    ("add to cart", "OTHER", "Add To Cart"),  # spaces are not underscores: no match
    ("purchased", "OTHER", "Purchased"),
    ("x", "OTHER", "X"),
]


@pytest.mark.parametrize(
    ("action", "conversion_type", "name"), ACTIONS, ids=[repr(a[0]) for a in ACTIONS]
)
def test_action_to_conversion_type(action: str, conversion_type: str, name: str) -> None:
    event = commerce(
        action,
        currency_code="usd",
        product_action={"total_amount": 10, "products": [{"id": "a", "quantity": 2}]},
    )
    out = single(run_mp(mp_batch(event)))
    assert out["eventDescription"] == {
        "conversionType": conversion_type,
        "eventSource": "WEBSITE",
        "name": name,
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert out["value"] == 10
    if conversion_type == "OFF_AMAZON_PURCHASES":
        assert (out["currencyCode"], out["unitsSold"]) == ("USD", 2)
    else:  # §3: currencyCode and unitsSold only for OFF_AMAZON_PURCHASES
        assert "currencyCode" not in out
        assert "unitsSold" not in out


@pytest.mark.parametrize(
    "product_action",
    [{}, {"action": ""}, {"action": "   "}, {"action": None}, {"action": "\t\n"}],
    ids=["no-action-key", "empty", "spaces", "null", "tab-newline"],
)
def test_missing_or_blank_action_is_missing_action(product_action: dict[str, Any]) -> None:
    event = {"event_type": "commerce_event", "data": {"product_action": product_action}}
    assert only_drop(run_mp(mp_batch(event))) == "missing_action"


@pytest.mark.parametrize(
    "event",
    [
        custom("Viewed Home"),
        {"event_type": "commerce_event", "data": {"product_impressions": [{"products": []}]}},
        {"event_type": "commerce_event", "data": {"product_action": None}},
        {"event_type": "screen_view", "data": {"screen_name": "Home"}},
        {"event_type": "session_start", "data": {}},
        {"event_type": "commerce_event"},
    ],
    ids=[
        "custom_event",
        "impressions-only",
        "null-product_action",
        "screen_view",
        "session",
        "no-data",
    ],
)
def test_events_without_product_action_are_not_commerce(event: dict[str, Any]) -> None:
    assert only_drop(run_mp(mp_batch(event))) == "not_commerce_event"


# ---------------------------------------------------------------------------
# §3 eventDescription.name


LONG_NAME = "N" * 100 + "x" * 200


@pytest.mark.parametrize(
    ("event_name", "action", "expected"),
    [
        ("Big Sale Purchase", "purchase", "Big Sale Purchase"),
        ("  Trimmed Name \t", "purchase", "Trimmed Name"),
        (ABSENT, "purchase", "Purchase"),
        ("", "purchase", "Purchase"),
        ("   ", "add_to_cart", "Add To Cart"),
        (None, "ADD_TO_CART", "Add To Cart"),
        (ABSENT, "add__to  cart", "Add To Cart"),
        (ABSENT, " remove_from_WISH_list ", "Remove From Wish List"),
        (ABSENT, "view_detail", "View Detail"),
        (LONG_NAME, "purchase", LONG_NAME[:256]),
        ("  " + "y" * 300, "purchase", "y" * 256),
        (ABSENT, "a" * 300, "A" + "a" * 255),
    ],
    ids=[
        "event_name",
        "event_name-trimmed",
        "absent",
        "empty",
        "blank",
        "null-uppercase-action",
        "repeated-separators",
        "mixed-case-action",
        "view_detail",
        "truncated-256",
        "trimmed-then-truncated",
        "fallback-truncated",
    ],
)
def test_name(event_name: Any, action: str, expected: str) -> None:
    data = {} if event_name is ABSENT else {"event_name": event_name}
    out = single(run_mp(mp_batch(commerce(action, **data))))
    assert out["eventDescription"]["name"] == expected


# ---------------------------------------------------------------------------
# §3 dataSetName and partner (output settings)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data_set_name": "web_purchases"}, "web_purchases"),
        ({"data_set_name": "  Web-Events_2 "}, "Web-Events_2"),
        ({"data_set_name": ""}, ABSENT),
        ({"data_set_name": "   "}, ABSENT),
        ({"data_set_name": None}, ABSENT),
        ({}, ABSENT),
    ],
    ids=["set", "trimmed", "empty", "blank", "null", "not-set"],
)
def test_data_set_name(raw: dict[str, Any], expected: Any) -> None:
    out = single(run_mp(mp_batch(), **raw))
    assert out["eventDescription"].get("dataSetName", ABSENT) == expected


@pytest.mark.parametrize(
    "name", ["1abc5", "ab", "web purchases", "web.purchases", "x" * 101, 12345]
)
def test_invalid_data_set_name_is_a_settings_error(name: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(data_set_name=name)
    assert caught.value.field == "data_set_name"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"partner_name": "acme_relay"}, "acme_relay"),
        ({"partner_name": " acme "}, "acme"),
        ({"partner_name": ""}, ABSENT),
        ({"partner_name": "  "}, ABSENT),
        ({}, ABSENT),
    ],
    ids=["set", "trimmed", "empty", "blank", "not-set"],
)
def test_partner(raw: dict[str, Any], expected: Any) -> None:
    assert get(single(run_mp(mp_batch(), **raw)), "partner") == expected


# ---------------------------------------------------------------------------
# §3 eventTime


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (TS, TS_TEXT),
        (str(TS), TS_TEXT),
        (f"  {TS} ", TS_TEXT),
        (float(TS), TS_TEXT),
        ("1.7639e12", TS_TEXT),
        (TS + 5, "2025-11-23T12:13:20.005Z"),
        (TS + 123, "2025-11-23T12:13:20.123Z"),
        (str(TS + 999), "2025-11-23T12:13:20.999Z"),
        (1763856000000, "2025-11-23T00:00:00.000Z"),
        (ABSENT, NOW_TEXT),
        (None, NOW_TEXT),
    ],
    ids=[
        "int",
        "numeric-string",
        "padded-string",
        "float",
        "exponent-string",
        "5ms",
        "123ms",
        "999ms-string",
        "midnight",
        "absent-now",
        "null-now",
    ],
)
def test_event_time(timestamp: Any, expected: str) -> None:
    event = commerce()
    if timestamp is ABSENT:
        del event["data"]["timestamp_unixtime_ms"]
    else:
        event["data"]["timestamp_unixtime_ms"] = timestamp
    assert single(run_mp(mp_batch(event)))["eventTime"] == expected


def test_event_time_absent_uses_now_with_milliseconds() -> None:
    now = datetime(2025, 11, 23, 20, 0, 0, 456789, tzinfo=UTC)
    event = commerce()
    del event["data"]["timestamp_unixtime_ms"]
    assert single(run_mp(mp_batch(event), now=now))["eventTime"] == "2025-11-23T20:00:00.456Z"


@pytest.mark.parametrize("timestamp", ["yesterday", True, {"ms": TS}, [TS], "12:13"])
def test_event_time_of_wrong_type_is_invalid_event(timestamp: Any) -> None:
    result = run_mp(mp_batch(commerce(timestamp_unixtime_ms=timestamp), commerce()))
    assert drops(result) == {0: "invalid_event"}
    assert result.dropped[0].detail  # says what was wrong
    assert result.index_maps == [[1]]  # the rest goes on


# ---------------------------------------------------------------------------
# §3 eventId


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"event_id": "6004677780660780000"}, "6004677780660780000"),
        ({"event_id": -7636538281262557000}, "-7636538281262557000"),
        ({"event_id": -9223372036854775808}, "-9223372036854775808"),
        ({"event_id": 9223372036854775807}, "9223372036854775807"),
        ({"event_id": "ev-1", "source_message_id": "smid-1"}, "ev-1"),
        ({"source_message_id": "smid-1"}, "smid-1"),
        ({"event_id": "", "source_message_id": "smid-1"}, "smid-1"),
        ({"event_id": "   ", "source_message_id": "smid-1"}, "smid-1"),
        ({"event_id": None, "source_message_id": 42}, "42"),
        ({"event_id": "e" * 300}, "e" * 256),
        ({"source_message_id": "s" * 257}, "s" * 256),
        ({"event_id": "x" * 256}, "x" * 256),
    ],
    ids=[
        "event_id",
        "int64-negative",
        "int64-min",
        "int64-max",
        "event_id-wins",
        "source_message_id",
        "empty-event_id",
        "blank-event_id",
        "numeric-source_message_id",
        "truncated",
        "source_message_id-truncated",
        "exactly-256",
    ],
)
def test_event_id(data: dict[str, Any], expected: str) -> None:
    event = no_event_id(commerce())
    event["data"].update(data)
    assert single(run_mp(mp_batch(event)))["eventId"] == expected


@pytest.mark.parametrize("connection_id", ["", "conn-42", "ünï\ncode"], ids=ids)
def test_deterministic_event_id(connection_id: str) -> None:
    event = no_event_id(commerce(custom_attributes={"city": "Zürich", "n": 1.5}))
    out = single(run_mp(mp_batch(event), connection_id=connection_id))
    assert out["eventId"] == deterministic_id(connection_id.strip(), event)
    assert len(out["eventId"]) == 32
    assert int(out["eventId"], 16) >= 0


def test_deterministic_event_id_depends_on_event_and_connection_only() -> None:
    event = no_event_id(commerce())
    first = single(run_mp(mp_batch(event), connection_id="c1"))["eventId"]
    other_user = mp_batch(event, identities={"email": "someone@else.com"}, ip="203.0.113.9")
    assert single(run_mp(other_user, connection_id="c1"))["eventId"] == first
    assert single(run_mp(mp_batch(event), connection_id="c2"))["eventId"] != first
    changed = with_data(event, timestamp_unixtime_ms=TS + 1)
    assert single(run_mp(mp_batch(changed), connection_id="c1"))["eventId"] != first


def test_identical_events_share_their_deterministic_id() -> None:
    event = no_event_id(commerce())
    result = run_mp(mp_batch(event, copy.deepcopy(event)))
    first, second = events_of(result)
    assert first["eventId"] == second["eventId"] == deterministic_id("", event)


def test_deterministic_event_id_of_a_deeply_nested_event() -> None:
    """An event nested deeper than json.dumps recurses still gets the §11 id."""
    deep = "[" * 1000 + '{"leaf":true}' + "]" * 1000
    event = no_event_id(commerce(custom_attributes={"deep": "PLACEHOLDER"}))
    body = json.dumps(mp_batch(event)).replace('"PLACEHOLDER"', deep).encode()
    event_text = json.dumps(event, sort_keys=True, separators=(",", ":"))
    event_text = event_text.replace('"PLACEHOLDER"', deep)
    result = run("mparticle", None, body=body)
    assert single(result)["eventId"] == sha256("\n" + event_text)[:32]


# ---------------------------------------------------------------------------
# §3 value


VALUES = [
    (2.675, "add_to_cart", 2.68),
    (1.005, "add_to_cart", 1.01),
    ("0.125", "add_to_cart", 0.13),
    (59.985, "purchase", 59.99),
    ("59.985", "purchase", 59.99),
    (19.999, "add_to_cart", 20),
    (0.004, "add_to_cart", 0),
    (0.005, "add_to_cart", 0.01),
    (1234567.895, "add_to_cart", 1234567.9),
    (10, "purchase", 10),
    (0, "purchase", 0),
    ("123", "purchase", 123),
    (" 3.50 ", "purchase", 3.5),
    ("1e3", "purchase", 1000),
    ("-12", "add_to_cart", -12),
    (-2.675, "refund", -2.68),  # half-up = half away from zero
    (-5, "checkout", -5),
    (-5, "purchase", ABSENT),  # Amazon's minimum for purchases is 0
    ("-0.01", "purchase", ABSENT),
    ("abc", "purchase", ABSENT),
    ("", "purchase", ABSENT),
    ("1,000", "purchase", ABSENT),
    ("12abc", "purchase", ABSENT),
    ("0x10", "purchase", ABSENT),
    ("NaN", "purchase", ABSENT),
    ("Infinity", "purchase", ABSENT),
    ("1e999999", "purchase", ABSENT),  # numeric, but no finite JSON number
    ("٣", "purchase", ABSENT),  # not an ASCII decimal number
    (True, "purchase", ABSENT),
    (None, "purchase", ABSENT),
    ({"amount": 1}, "purchase", ABSENT),
    ([1], "purchase", ABSENT),
    (ABSENT, "purchase", ABSENT),
]


@pytest.mark.parametrize(
    ("total_amount", "action", "expected"),
    VALUES,
    ids=[f"{ids(v[0])}-{v[1]}" for v in VALUES],
)
def test_value(total_amount: Any, action: str, expected: Any) -> None:
    extra = {} if total_amount is ABSENT else {"total_amount": total_amount}
    out = single(run_mp(mp_batch(commerce(action, product_action=extra))))
    value = get(out, "value")
    assert value == expected
    if expected is not ABSENT:
        assert isinstance(value, int | float)
        assert not isinstance(value, bool)
        assert repr(value) == repr(expected)  # 2.68, not 2.6799999


# ---------------------------------------------------------------------------
# §3 currencyCode


@pytest.mark.parametrize(
    ("currency", "action", "expected"),
    [
        ("usd", "purchase", "USD"),
        ("EUR", "purchase", "EUR"),
        ("Gbp", "purchase", "GBP"),
        (" jpy ", "purchase", "JPY"),
        ("ISK", "purchase", ABSENT),  # ISO 4217, but not in Amazon's enum
        ("XYZ", "purchase", ABSENT),
        ("US Dollar", "purchase", ABSENT),
        ("", "purchase", ABSENT),
        (840, "purchase", ABSENT),
        (None, "purchase", ABSENT),
        ("USD", "add_to_cart", ABSENT),
        ("USD", "checkout", ABSENT),
        ("USD", "refund", ABSENT),
    ],
    ids=ids,
)
def test_currency_code(currency: Any, action: str, expected: Any) -> None:
    out = single(run_mp(mp_batch(commerce(action, currency_code=currency))))
    assert get(out, "currencyCode") == expected


# ---------------------------------------------------------------------------
# §3 unitsSold


UNITS = [
    ([{"quantity": 2}, {"quantity": "1"}], "purchase", 3),
    ([{"quantity": 1}], "purchase", 1),
    ([{"quantity": 1.5}], "purchase", 2),
    ([{"quantity": 0.5}], "purchase", 1),
    ([{"quantity": "2.5"}, {"quantity": "0.5"}], "purchase", 3),  # sum first, then round
    ([{"quantity": 1.4}, {"quantity": 1.4}], "purchase", 3),
    ([{"quantity": "abc"}, {"quantity": 2}], "purchase", 2),
    ([{"quantity": " 4 "}, {"id": "no-quantity"}], "purchase", 4),
    ([{"quantity": 0.4}], "purchase", ABSENT),
    ([{"quantity": 0}], "purchase", ABSENT),
    ([{"quantity": -3}, {"quantity": 1}], "purchase", ABSENT),
    ([{"id": "a"}, {"id": "b"}], "purchase", ABSENT),
    ([{"quantity": None}], "purchase", ABSENT),
    ([], "purchase", ABSENT),
    ("not-a-list", "purchase", ABSENT),
    ([{"quantity": "1e999999999"}, {"quantity": "1e999999999"}], "purchase", ABSENT),
    ([{"quantity": 2**40}], "purchase", ABSENT),  # beyond Amazon's int32
    (ABSENT, "purchase", ABSENT),
    ([{"quantity": 2}], "add_to_cart", ABSENT),
    ([{"quantity": 2}], "checkout", ABSENT),
]


@pytest.mark.parametrize(
    ("products", "action", "expected"),
    UNITS,
    ids=[f"{i}-{ids(u[0])}-{u[1]}" for i, u in enumerate(UNITS)],
)
def test_units_sold(products: Any, action: str, expected: Any) -> None:
    extra = {} if products is ABSENT else {"products": products}
    out = single(run_mp(mp_batch(commerce(action, product_action=extra))))
    assert get(out, "unitsSold") == expected
    if expected is not ABSENT:
        assert type(out["unitsSold"]) is int


# ---------------------------------------------------------------------------
# §3 customData


def custom_data_of(attributes: dict[str, Any]) -> tuple[Any, int]:
    result = run_mp(mp_batch(commerce(custom_attributes=attributes)))
    return get(single(result), "customData"), result.custom_data_skipped


def entry(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value, "dataType": "STRING"}


@pytest.mark.parametrize(
    "key",
    [
        "country_code",
        "data_processing_options",
        "conversion_definition_id",
        "tcf",
        "gpp",
        "amzn_user_data",
        "amzn_ad_storage",
        "Country_Code",
        "TCF",
        "Amzn_User_Data",
        "DATA_PROCESSING_OPTIONS",
    ],
)
def test_reserved_attributes_never_in_custom_data(key: str) -> None:
    value = "US" if key.lower() == "country_code" else "x"
    data, skipped = custom_data_of({key: value, "coupon": "FALL"})
    assert data == [entry("coupon", "FALL")]
    assert skipped == 0


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("FALL", "FALL"),
        ("", ""),
        (True, "true"),
        (False, "false"),
        (1, "1"),
        (1.0, "1.0"),
        (29.99, "29.99"),
        (-3, "-3"),
        (1e16, "1e+16"),
        (0.1, "0.1"),
        (9223372036854775807, "9223372036854775807"),
        (-9223372036854775808, "-9223372036854775808"),
        ("v" * 300, "v" * 256),
        ("é" * 257, "é" * 256),
    ],
    ids=ids,
)
def test_custom_data_values(value: Any, text: str) -> None:
    assert custom_data_of({"attr": value}) == ([entry("attr", text)], 0)


@pytest.mark.parametrize("value", [None, {"a": 1}, [1, 2], []], ids=ids)
def test_custom_data_skips_null_object_array(value: Any) -> None:
    data, skipped = custom_data_of({"bad": value, "good": "1"})
    assert data == [entry("good", "1")]
    assert skipped == 1


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("coupon", True),
        ("_x9", True),
        ("ABC_def_123", True),
        ("n" * 256, True),
        ("n" * 257, False),
        ("coupon code", False),
        ("a-b", False),
        ("ñame", False),
        ("a.b", False),
        ("", False),
        ("x\n", False),
    ],
    ids=ids,
)
def test_custom_data_names(name: str, kept: bool) -> None:
    data, skipped = custom_data_of({name: "v"})
    if kept:
        assert (data, skipped) == ([entry(name, "v")], 0)
    else:
        assert (data, skipped) == (ABSENT, 1)


def test_custom_data_keeps_payload_order_and_first_13() -> None:
    attributes: dict[str, Any] = {}
    for i in range(16):
        attributes[f"k{15 - i}"] = i
        if i == 3:
            attributes["bad name"] = "skipped, does not use a slot"
            attributes["tcf"] = "reserved, does not use a slot"
    data, skipped = custom_data_of(attributes)
    assert data == [entry(f"k{15 - i}", str(i)) for i in range(13)]
    assert skipped == 1 + 3  # the bad name and the three past the 13th


def test_custom_data_omitted_when_empty() -> None:
    data, skipped = custom_data_of({"country_code": "US", "nothing": None, "x y": 1})
    assert data is ABSENT
    assert skipped == 2
    assert custom_data_of({}) == (ABSENT, 0)


# ---------------------------------------------------------------------------
# §3 dataProcessingOptions


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"data_processing_options": "LIMITED_DATA_USE"}, {"options": "LIMITED_DATA_USE"}),
        ({"Data_Processing_Options": "LIMITED_DATA_USE"}, {"options": "LIMITED_DATA_USE"}),
        ({"data_processing_options": "limited_data_use"}, ABSENT),
        ({"data_processing_options": " LIMITED_DATA_USE"}, ABSENT),
        ({"data_processing_options": ["LIMITED_DATA_USE"]}, ABSENT),
        ({"data_processing_options": "none"}, ABSENT),
        ({"data_processing_options": True}, ABSENT),
        ({}, ABSENT),
    ],
    ids=["exact", "key-case", "lowercase", "padded", "list", "none", "bool", "absent"],
)
def test_data_processing_options(attributes: dict[str, Any], expected: Any) -> None:
    out = single(run_mp(mp_batch(commerce(custom_attributes=attributes))))
    assert get(out, "dataProcessingOptions") == expected
    assert "customData" not in out


# ---------------------------------------------------------------------------
# §4 eventSource


PLATFORMS = [
    ("ios", "IOS"),
    ("iOS", "IOS"),
    ("tvos", "IOS"),
    ("tvOS", "IOS"),
    ("unityios", "IOS"),
    ("Unity_iOS", "IOS"),
    ("unity-ios", "IOS"),
    ("android", "ANDROID"),
    ("Android", "ANDROID"),
    ("unityandroid", "ANDROID"),
    ("Unity Android", "ANDROID"),
    ("firetv", "FIRE_TV"),
    ("fire_tv", "FIRE_TV"),
    ("Fire TV", "FIRE_TV"),
    ("FIRE-TV", "FIRE_TV"),
    ("web", "WEBSITE"),
    ("WEB", "WEBSITE"),
    ("mobileweb", "WEBSITE"),
    ("mobile_web", "WEBSITE"),
    ("roku", "OFFLINE"),
    ("alexa", "OFFLINE"),
    ("smarttv", "OFFLINE"),
    ("smart_tv", "OFFLINE"),
    ("xbox", "OFFLINE"),
    ("unknown", "OFFLINE"),
    ("Unknown", "OFFLINE"),
    ("desktop", "OFFLINE"),
    ("outofband", "OFFLINE"),
    ("out_of_band", "OFFLINE"),
    ("", "OFFLINE"),
    (ABSENT, "OFFLINE"),
    (None, "OFFLINE"),
    (7, "OFFLINE"),
]


@pytest.mark.parametrize(("platform", "expected"), PLATFORMS, ids=[ids(p[0]) for p in PLATFORMS])
def test_event_source_from_platform(platform: Any, expected: str) -> None:
    device: dict[str, Any] = {"locale_country": "US"}
    if platform is not ABSENT:
        device["platform"] = platform
    out = single(run_mp(mp_batch(device=device)))
    assert out["eventDescription"]["eventSource"] == expected


@pytest.mark.parametrize(
    ("platform", "os", "expected"),
    [
        (ABSENT, "Android", "ANDROID"),
        (ABSENT, "IOS", "IOS"),
        (ABSENT, "FireTV", "FIRE_TV"),
        ("roku", "iOS", "IOS"),  # platform maps to OFFLINE: the os is tried
        ("Unknown", "unity_android", "ANDROID"),
        ("web", "Android", "WEBSITE"),  # the platform wins when it maps
        ("iOS", "Android", "IOS"),
        (ABSENT, "Alexa", "OFFLINE"),
        ("xbox", "roku", "OFFLINE"),
        (ABSENT, ABSENT, "OFFLINE"),
    ],
    ids=ids,
)
def test_event_source_falls_back_to_application_os(platform: Any, os: Any, expected: str) -> None:
    device: dict[str, Any] = {"locale_country": "US"}
    if platform is not ABSENT:
        device["platform"] = platform
    app = {} if os is ABSENT else {"os": os}
    out = single(run_mp(mp_batch(device=device, application_info=app)))
    assert out["eventDescription"]["eventSource"] == expected


# ---------------------------------------------------------------------------
# §5 countryCode


COUNTRIES = [
    # (custom_attributes.country_code, device_country, locale_country, $country) -> code
    (("CA", "USA", "US", "FR"), "CA"),
    ((None, "USA", "DE", "FR"), "US"),
    ((None, None, "DE", "FR"), "DE"),
    ((None, None, None, "FR"), "FR"),
    (("XX", None, "US", None), "US"),
    (("Narnia", "ZZ", "ABC", "fr"), "FR"),
    (("  ca ", "US", None, None), "CA"),
    (("fra", "US", None, None), "FR"),
    (("UK", "US", None, None), "GB"),
    (("uk", None, None, None), "GB"),
    (("GBR", None, None, None), "GB"),
    (("United States", "DE", None, None), "US"),
    (("germany", None, None, None), "DE"),
    (("United Kingdom", None, None, None), "GB"),
    (("", "  ", "\t", "jp"), "JP"),
    ((124, ["US"], {"c": "US"}, "BR"), "BR"),
    (("EU", None, None, "IT"), "IT"),  # reserved, not an assigned code
    ((None, None, None, None), None),
    (("XX", "Narnia", "123", "ZZZ"), None),
]


@pytest.mark.parametrize(
    ("chain", "expected"), COUNTRIES, ids=["/".join(map(str, c[0])) for c in COUNTRIES]
)
def test_country_chain(chain: tuple[Any, Any, Any, Any], expected: str | None) -> None:
    attribute, device_country, locale_country, user_country = chain
    device: dict[str, Any] = {"platform": "web"}
    if device_country is not None:
        device["device_country"] = device_country
    if locale_country is not None:
        device["locale_country"] = locale_country
    data = {} if attribute is None else {"custom_attributes": {"country_code": attribute}}
    extra = {} if user_country is None else {"user_attributes": {"$country": user_country}}
    result = run_mp(mp_batch(commerce(**data), device=device, **extra))
    if expected is None:
        assert only_drop(result) == "no_country_code"
    else:
        out = single(result)
        assert out["countryCode"] == expected
        assert "customData" not in out  # country_code is reserved


@pytest.mark.parametrize("key", ["$country", "$Country", "$COUNTRY"])
def test_user_country_key_is_case_insensitive(key: str) -> None:
    batch = mp_batch(device={"platform": "web"}, user_attributes={key: "NZ"})
    assert single(run_mp(batch))["countryCode"] == "NZ"


@pytest.mark.parametrize("key", ["country_code", "Country_Code", "COUNTRY_CODE"])
def test_country_attribute_key_is_case_insensitive(key: str) -> None:
    out = single(run_mp(mp_batch(commerce(custom_attributes={key: "MX"}))))
    assert out["countryCode"] == "MX"
    assert "customData" not in out


def test_country_attribute_is_per_event() -> None:
    result = run_mp(
        mp_batch(commerce(custom_attributes={"country_code": "CA"}), commerce(), device={})
    )
    assert drops(result) == {1: "no_country_code"}
    assert single(result)["countryCode"] == "CA"


# ---------------------------------------------------------------------------
# §6 match keys


def keys_of(batch: dict[str, Any], **settings_raw: Any) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = single(run_mp(batch, **settings_raw))["matchKeys"]
    return keys


@pytest.mark.parametrize(
    ("email", "normalised"),
    [
        (" Jane.Doe@Example.com ", "jane.doe@example.com"),
        (" John_Doe+News@Example.COM ", "john_doenews@example.com"),
        ("a b@c.d", "ab@c.d"),
        ("Ünïcode@Example.com", "ncode@example.com"),
        ("first-last@sub.example.org", "first-last@sub.example.org"),
        ("<x@y.z>;", "x@y.z"),
    ],
    ids=ids,
)
def test_email_normalisation(email: str, normalised: str) -> None:
    keys = keys_of(mp_batch(identities={"email": email}))
    assert keys == [{"type": "EMAIL", "values": [sha256(normalised)]}]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A" * 64, "a" * 64),
        ("  " + "0123456789ABCDEF" * 4 + " ", ("0123456789abcdef" * 4)),
        (EMAIL_HASH, EMAIL_HASH),
    ],
    ids=["upper-hex", "padded-mixed", "lower-hex"],
)
def test_prehashed_email_passes_through(raw: str, expected: str) -> None:
    assert keys_of(mp_batch(identities={"email": raw})) == [{"type": "EMAIL", "values": [expected]}]


def test_almost_prehashed_email_is_hashed() -> None:
    raw = "a" * 63
    assert keys_of(mp_batch(identities={"email": raw})) == [
        {"type": "EMAIL", "values": [sha256(raw)]}
    ]


@pytest.mark.parametrize(
    ("phone", "country", "digits"),
    [
        ("+1 (555) 123-4567", "US", "15551234567"),
        ("0555 1234567", "DE", "495551234567"),
        ("(415) 555-2671", "US", "14155552671"),
        ("+44 20 7946 0958", "US", "442079460958"),  # '+' wins over the region
        ("020 7946 0958", "GB", "442079460958"),
        ("06 12 34 56 78", "FR", "33612345678"),
        (4155552671, "US", "14155552671"),
        ("0555 1234567", "AQ", "5551234567"),  # no metadata: digits, leading zeros removed
        ("+999 0012345", "US", "9990012345"),  # unparseable: digits only
    ],
    ids=ids,
)
def test_phone_normalisation(phone: Any, country: str, digits: str) -> None:
    batch = mp_batch(
        identities={"mobile_number": phone}, device={"platform": "web", "locale_country": country}
    )
    assert keys_of(batch) == [{"type": "PHONE", "values": [sha256(digits)]}]


def test_phone_region_is_the_events_country() -> None:
    event = commerce(custom_attributes={"country_code": "DE"})
    batch = mp_batch(event, identities={"mobile_number": "0555 1234567"})
    assert keys_of(batch) == [{"type": "PHONE", "values": [sha256("495551234567")]}]


def test_prehashed_phone_passes_through() -> None:
    assert keys_of(mp_batch(identities={"mobile_number": "F" * 64})) == [
        {"type": "PHONE", "values": ["f" * 64]}
    ]


@pytest.mark.parametrize(
    ("identities", "digits"),
    [
        ({"mobile_number": "+14155550001", "phone_number_2": "+14155550002"}, "14155550001"),
        ({"phone_number_3": "+14155550003", "phone_number_2": "+14155550002"}, "14155550002"),
        ({"phone_number_3": "+14155550003"}, "14155550003"),
        ({"mobile_number": "n/a", "phone_number_2": "+14155550002"}, "14155550002"),
        ({"mobile_number": "", "phone_number_3": "+14155550003"}, "14155550003"),
        ({"Mobile_Number": "+14155550001"}, "14155550001"),
    ],
    ids=["mobile-first", "then-2", "then-3", "unusable-skipped", "empty-skipped", "key-case"],
)
def test_phone_priority(identities: dict[str, Any], digits: str) -> None:
    assert keys_of(mp_batch(identities=identities)) == [
        {"type": "PHONE", "values": [sha256(digits)]}
    ]


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"ios_advertising_id": IDFA}, IDFA.lower()),
        ({"ios_advertising_id": f"  {IDFA}  "}, IDFA.lower()),
        (
            {"android_advertising_id": "38400000-8CF0-11BD-B23E-10B96E40000D"},
            "38400000-8cf0-11bd-b23e-10b96e40000d",
        ),
        ({"fire_advertising_id": "Fire-Ad-Id"}, "fire-ad-id"),
        (
            {"fire_advertising_id": "f", "android_advertising_id": "a", "ios_advertising_id": "i"},
            "i",
        ),
        ({"fire_advertising_id": "f", "android_advertising_id": "a"}, "a"),
        ({"ios_advertising_id": ZERO_GUID, "android_advertising_id": "a"}, "a"),
        (
            {"ios_advertising_id": "", "android_advertising_id": "  ", "fire_advertising_id": "f"},
            "f",
        ),
    ],
    ids=[
        "ios",
        "trimmed",
        "android",
        "fire",
        "ios-first",
        "android-then-fire",
        "zero-guid",
        "empty-skipped",
    ],
)
def test_maid(device: dict[str, Any], expected: str) -> None:
    batch = mp_batch(identities={}, device={"platform": "web", "locale_country": "US", **device})
    assert keys_of(batch) == [{"type": "MAID", "values": [expected]}]


@pytest.mark.parametrize(
    ("identities", "device"),
    [
        ({}, {}),
        ({"email": "   "}, {}),
        ({"email": "+++"}, {}),
        ({"mobile_number": "n/a", "phone_number_2": "", "phone_number_3": "--"}, {}),
        ({}, {"ios_advertising_id": ZERO_GUID}),
        ({}, {"android_advertising_id": "", "fire_advertising_id": "   "}),
        ({"customer_id": "C-1", "other": "x"}, {}),  # MATCH_ID only with match_keys extended
        ({"email": 12345}, {}),
        ("not-a-map", {}),
    ],
    ids=[
        "nothing",
        "blank-email",
        "email-normalises-empty",
        "phones-without-digits",
        "zero-guid",
        "blank-maids",
        "customer_id-standard",
        "email-not-text",
        "bad-shape",
    ],
)
def test_no_usable_key_is_no_match_key(identities: Any, device: dict[str, Any]) -> None:
    batch = mp_batch(
        identities=identities, device={"platform": "web", "locale_country": "US", **device}
    )
    assert only_drop(run_mp(batch)) == "no_match_key"


def test_key_type_order_is_email_phone_maid() -> None:
    batch = mp_batch(
        identities={"mobile_number": "+14155552671", "email": EMAIL},
        device={"ios_advertising_id": IDFA, "platform": "iOS", "locale_country": "US"},
    )
    assert keys_of(batch) == [
        EMAIL_KEY,
        {"type": "PHONE", "values": [sha256("14155552671")]},
        {"type": "MAID", "values": [IDFA.lower()]},
    ]


def test_outbound_list_dialect() -> None:
    identities = [
        {"identity_type": "customer_id", "identity": "C-1"},
        {"identity_type": "other", "identity": "o"},
        {"identity_type": "Email", "identity": "  ", "created_this_batch": False},
        {"identity_type": "email", "identity": "Outbound.User@Example.com"},
        {"identity_type": "phone_number_2", "identity": "+1 415 555 0002"},
        {"identity_type": "MOBILE_NUMBER", "identity": "+1 415 555 0199"},
        {"identity": "no type"},
        "not an object",
    ]
    batch = mp_batch(identities=identities, batch_id=1, message_id="m", system_notifications=[])
    assert keys_of(batch) == [
        {"type": "EMAIL", "values": [sha256("outbound.user@example.com")]},
        {"type": "PHONE", "values": [sha256("14155550199")]},
    ]
    extended = keys_of(batch, match_keys="extended")
    assert extended[-1] == {"type": "MATCH_ID", "values": ["C-1"]}


# §6 extended match keys (amazon-api.md §Normalisation)

EXTENDED = [
    ("$firstname", " Jane ", "FIRST_NAME", "jane"),
    ("$FirstName", "Mary-Ann", "FIRST_NAME", "maryann"),
    ("$firstname", "José", "FIRST_NAME", "jos"),
    ("$lastname", "O'Brien-Smith", "LAST_NAME", "obriensmith"),
    ("$LASTNAME", "van der Berg 2", "LAST_NAME", "vanderberg"),
    ("$city", "San Francisco", "CITY", "sanfrancisco"),
    ("$City", "St. Louis 2", "CITY", "stlouis2"),
    ("$state", "California", "STATE", "ca"),
    ("$state", " NY ", "STATE", "ny"),
    ("$state", "new york", "STATE", "ny"),
    ("$state", "British Columbia", "STATE", "bc"),
    ("$state", "Baden-Württemberg", "STATE", "ba"),
    ("$state", "Île-de-France", "STATE", "il"),
    ("$zip", "98101-1234", "POSTAL", "98101"),
    ("$Zip", "SW1A 1AA", "POSTAL", "sw1a1aa"),
    ("$zip", 2139, "POSTAL", "2139"),
    ("$address", "123 North Main Street #5", "ADDRESS", "123nmainstnumber5"),
    ("$address", "1600 Pennsylvania Avenue NW", "ADDRESS", "1600pennsylvaniaavenw"),
    ("$address", "42 West Road, Apt. 7", "ADDRESS", "42wrdapt7"),
    ("$address", "Königstraße 5", "ADDRESS", "koenigstrasse5"),
    ("$address", "9 Northeast Parkway", "ADDRESS", "9nepkwy"),
]


@pytest.mark.parametrize(
    ("attribute", "raw", "key_type", "normalised"),
    EXTENDED,
    ids=[f"{e[2]}-{e[1]}" for e in EXTENDED],
)
def test_extended_key_normalisation(
    attribute: str, raw: Any, key_type: str, normalised: str
) -> None:
    batch = mp_batch(user_attributes={attribute: raw})
    assert keys_of(batch, match_keys="extended") == [
        EMAIL_KEY,
        {"type": key_type, "values": [sha256(normalised)]},
    ]
    assert keys_of(batch) == [EMAIL_KEY]  # standard mode: never sent


@pytest.mark.parametrize(
    "attribute", ["$firstname", "$lastname", "$address", "$city", "$state", "$zip"]
)
def test_prehashed_extended_keys_pass_through(attribute: str) -> None:
    batch = mp_batch(user_attributes={attribute: " " + "AB" * 32 + " "})
    keys = keys_of(batch, match_keys="extended")
    assert keys[1]["values"] == ["ab" * 32]
    assert len(keys) == 2


def test_extended_keys_all_together() -> None:
    batch = mp_batch(
        identities={"email": EMAIL, "mobile_number": "+14155552671", "customerid": "C-77"},
        device={"platform": "iOS", "locale_country": "US", "ios_advertising_id": IDFA},
        user_attributes={
            "$FirstName": "Jane",
            "$LastName": "Doe",
            "$Address": "1 Main Street",
            "$City": "Seattle",
            "$State": "Washington",
            "$Zip": "98101",
        },
    )
    keys = keys_of(batch, match_keys="extended")
    assert keys == [
        EMAIL_KEY,
        {"type": "PHONE", "values": [sha256("14155552671")]},
        {"type": "MAID", "values": [IDFA.lower()]},
        {"type": "FIRST_NAME", "values": [sha256("jane")]},
        {"type": "LAST_NAME", "values": [sha256("doe")]},
        {"type": "ADDRESS", "values": [sha256("1mainst")]},
        {"type": "CITY", "values": [sha256("seattle")]},
        {"type": "STATE", "values": [sha256("wa")]},
        {"type": "POSTAL", "values": [sha256("98101")]},
        {"type": "MATCH_ID", "values": ["C-77"]},
    ]
    assert len(keys) <= 15
    assert all(len(k["values"]) == 1 for k in keys)


@pytest.mark.parametrize(
    ("identities", "expected"),
    [
        ({"customer_id": "C-1"}, "C-1"),
        ({"customerid": "C-2"}, "C-2"),
        ({"Customer_ID": " C-3 "}, "C-3"),
        ({"customer_id": 123456789}, "123456789"),
        ({"customer_id": "m" * 100}, "m" * 100),
        ({"customer_id": "m" * 101}, None),  # over Amazon's limit: not sent
        ({"customer_id": "   "}, None),
    ],
    ids=[
        "customer_id",
        "customerid",
        "key-case-trimmed",
        "number",
        "100-chars",
        "101-chars",
        "blank",
    ],
)
def test_match_id(identities: dict[str, Any], expected: str | None) -> None:
    result = run_mp(mp_batch(identities=identities), match_keys="extended")
    if expected is None:
        assert only_drop(result) == "no_match_key"
    else:
        assert single(result)["matchKeys"] == [{"type": "MATCH_ID", "values": [expected]}]


# ---------------------------------------------------------------------------
# §7 consent


def consent_of(attributes: dict[str, Any] | None = None, **batch_and_settings: Any) -> Any:
    batch_keys = {"ip", "consent_state"}
    extra = {k: v for k, v in batch_and_settings.items() if k in batch_keys}
    raw = {k: v for k, v in batch_and_settings.items() if k not in batch_keys}
    event = commerce(custom_attributes=attributes or {})
    return get(single(run_mp(mp_batch(event, **extra), **raw)), "consent")


GRANTED = [
    True,
    "true",
    "TRUE",
    "yes",
    "Yes",
    "1",
    1,
    "on",
    "ON",
    "granted",
    "GRANTED",
    "opted_in",
    "optin",
    "OptIn",
    " yes ",
]
DENIED = [
    False,
    "false",
    "no",
    "NO",
    "0",
    0,
    "off",
    "denied",
    "Denied",
    "opted_out",
    "optout",
    "OPTED_OUT",
]
NEITHER = ["maybe", "", "2", 2, None, {"a": 1}, ["yes"], "opted in", "y"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, "GRANTED") for v in GRANTED]
    + [(v, "DENIED") for v in DENIED]
    + [(v, None) for v in NEITHER],
    ids=[f"granted-{ids(v)}" for v in GRANTED]
    + [f"denied-{ids(v)}" for v in DENIED]
    + [f"absent-{ids(v)}" for v in NEITHER],
)
def test_consent_value_spellings(value: Any, expected: str | None) -> None:
    consent = consent_of({"amzn_user_data": value})
    if expected is None:
        assert consent is ABSENT
    else:
        assert consent == {"amazonConsent": {"amznUserData": expected}}


def test_consent_is_judged_per_event_in_a_batch() -> None:
    """True, 1 and 1.0 are equal in Python but not the same spelling (no caching mix-up)."""
    spellings: list[Any] = [True, 1, 1.0, "1", 0.0, False]
    events = [commerce(custom_attributes={"amzn_user_data": v}) for v in spellings]
    result = run_mp(mp_batch(*events))
    assert [e.get("consent", {}).get("amazonConsent") for e in events_of(result)] == [
        {"amznUserData": "GRANTED"},
        {"amznUserData": "GRANTED"},
        None,
        {"amznUserData": "GRANTED"},
        None,
        {"amznUserData": "DENIED"},
    ]


def test_consent_both_amazon_values() -> None:
    consent = consent_of({"amzn_user_data": "yes", "AMZN_AD_STORAGE": "off"})
    assert consent == {"amazonConsent": {"amznUserData": "GRANTED", "amznAdStorage": "DENIED"}}


@pytest.mark.parametrize("value", ["granted", "DENIED", True])
def test_ad_storage_alone_is_not_sent(value: Any) -> None:
    assert consent_of({"amzn_ad_storage": value}) is ABSENT


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("203.0.113.7", {"geo": {"ipAddress": "203.0.113.7"}}),
        ("2001:db8::1", {"geo": {"ipAddress": "2001:db8::1"}}),
        (" 198.51.100.23 ", {"geo": {"ipAddress": "198.51.100.23"}}),
        ("999.1.1.1", ABSENT),
        ("not-an-ip", ABSENT),
        ("", ABSENT),
        ("203.0.113", ABSENT),
        (2130706433, ABSENT),
        (None, ABSENT),
    ],
    ids=ids,
)
def test_geo_ip(ip: Any, expected: Any) -> None:
    assert consent_of(ip=ip) == expected


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        (
            {"tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"},
            {"tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"},
        ),
        ({"GPP": "DBABMA~CPXxRfAPXxRfAAfKABENB"}, {"gpp": "DBABMA~CPXxRfAPXxRfAAfKABENB"}),
        ({"tcf": "T", "gpp": "G"}, {"tcf": "T", "gpp": "G"}),
        ({"tcf": ""}, ABSENT),
        ({"tcf": "   "}, ABSENT),
        ({"tcf": 123}, ABSENT),
        ({"gpp": {"s": 1}}, ABSENT),
    ],
    ids=["tcf", "gpp-key-case", "both", "empty", "blank", "number", "object"],
)
def test_tcf_gpp(attributes: dict[str, Any], expected: Any) -> None:
    assert consent_of(attributes) == expected


def record(consented: bool) -> dict[str, Any]:
    return {"consented": consented, "document": "doc_v1", "timestamp_unixtime_ms": TS}


CCPA_OUT = {"ccpa": {"data_sale_opt_out": record(True)}}
CCPA_IN = {"ccpa": {"data_sale_opt_out": record(False)}}
PURPOSES = {"consent_purpose_user_data": "marketing", "consent_purpose_ad_storage": "ads"}


@pytest.mark.parametrize(
    ("state", "attributes", "raw", "expected"),
    [
        (CCPA_OUT, {}, {}, {"amznUserData": "DENIED", "amznAdStorage": "DENIED"}),
        (CCPA_IN, {}, {}, None),
        (
            {"gdpr": {"marketing": record(True), "ads": record(False)}},
            {},
            PURPOSES,
            {"amznUserData": "GRANTED", "amznAdStorage": "DENIED"},
        ),
        ({"gdpr": {"marketing": record(False)}}, {}, PURPOSES, {"amznUserData": "DENIED"}),
        (
            {"gdpr": {"Marketing": record(True)}},
            {},
            {"consent_purpose_user_data": "MARKETING"},
            {"amznUserData": "GRANTED"},
        ),
        ({"gdpr": {"marketing": record(True)}}, {}, {}, None),  # no purpose configured
        ({"gdpr": {"other": record(True)}}, {}, PURPOSES, None),  # purpose not in the state
        ({"gdpr": {"ads": record(True)}}, {}, PURPOSES, None),  # ad storage alone: not sent
        # explicit attributes win over derived values
        (
            {"gdpr": {"marketing": record(True)}},
            {"amzn_user_data": "denied"},
            PURPOSES,
            {"amznUserData": "DENIED"},
        ),
        (
            CCPA_OUT,
            {"amzn_user_data": "granted"},
            {},
            {"amznUserData": "GRANTED", "amznAdStorage": "DENIED"},
        ),
        (
            CCPA_OUT,
            {"amzn_ad_storage": "granted"},
            {},
            {"amznUserData": "DENIED", "amznAdStorage": "GRANTED"},
        ),
        # a value that is no spelling counts as absent: the derived value applies
        (
            CCPA_OUT,
            {"amzn_user_data": "maybe"},
            {},
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        # among derived values a CCPA opt-out wins over a granted GDPR purpose
        (
            {**CCPA_OUT, "gdpr": {"marketing": record(True), "ads": record(True)}},
            {},
            PURPOSES,
            {"amznUserData": "DENIED", "amznAdStorage": "DENIED"},
        ),
        (
            {**CCPA_IN, "gdpr": {"marketing": record(True), "ads": record(True)}},
            {},
            PURPOSES,
            {"amznUserData": "GRANTED", "amznAdStorage": "GRANTED"},
        ),
    ],
    ids=[
        "ccpa-opt-out",
        "ccpa-not-opted-out",
        "gdpr-purposes",
        "gdpr-denied",
        "purpose-case",
        "no-purpose-configured",
        "purpose-missing",
        "ad-storage-alone",
        "explicit-user-data-wins",
        "explicit-wins-over-ccpa",
        "explicit-ad-storage-wins",
        "unknown-spelling-derived",
        "ccpa-beats-gdpr",
        "gdpr-when-ccpa-in",
    ],
)
def test_derived_consent(
    state: dict[str, Any], attributes: dict[str, Any], raw: dict[str, Any], expected: Any
) -> None:
    consent = consent_of(attributes, consent_state=state, **raw)
    if expected is None:
        assert consent is ABSENT
    else:
        assert consent == {"amazonConsent": expected}


@pytest.mark.parametrize(
    ("attributes", "state", "raw", "forwarded"),
    [
        ({"amzn_user_data": "granted"}, {}, {}, True),
        ({"amzn_user_data": "granted", "amzn_ad_storage": "denied"}, {}, {}, True),
        ({"amzn_user_data": "denied"}, {}, {}, False),
        ({}, {}, {}, False),
        ({"amzn_ad_storage": "granted"}, {}, {}, False),
        ({"amzn_user_data": "maybe"}, {}, {}, False),
        ({"tcf": "T"}, {}, {}, False),
        ({}, {"gdpr": {"marketing": record(True)}}, PURPOSES, True),
        ({}, CCPA_OUT, {}, False),
    ],
    ids=[
        "granted",
        "granted-ad-denied",
        "denied",
        "no-signal",
        "ad-storage-only",
        "unknown",
        "tcf-only",
        "derived-granted",
        "ccpa-opt-out",
    ],
)
def test_require_granted(
    attributes: dict[str, Any], state: dict[str, Any], raw: dict[str, Any], forwarded: bool
) -> None:
    batch = mp_batch(commerce(custom_attributes=attributes), consent_state=state, ip="203.0.113.7")
    result = run_mp(batch, consent_mode="require_granted", **raw)
    if forwarded:
        assert single(result)["consent"]["amazonConsent"]["amznUserData"] == "GRANTED"
    else:
        assert only_drop(result) == "consent_denied"
    assert len(events_of(run_mp(batch))) == 1  # forward mode (default) keeps it


@pytest.mark.parametrize(
    ("attributes", "ip", "region", "forwarded"),
    [
        ({}, None, "EU", False),
        ({}, "bad-ip", "EU", False),
        ({"amzn_ad_storage": "granted"}, None, "EU", False),
        ({"amzn_user_data": "maybe"}, None, "EU", False),
        ({}, "203.0.113.7", "EU", True),
        ({"tcf": "T"}, None, "EU", True),
        ({"gpp": "G"}, None, "EU", True),
        ({"amzn_user_data": "denied"}, None, "EU", True),
        ({}, None, "eu", False),
        ({}, None, "NA", True),
        ({}, None, "FE", True),
    ],
    ids=[
        "nothing",
        "invalid-ip",
        "ad-storage-only",
        "unknown-spelling",
        "geo",
        "tcf",
        "gpp",
        "amazon-consent",
        "region-lowercase",
        "NA",
        "FE",
    ],
)
def test_eu_missing_consent(
    attributes: dict[str, Any], ip: str | None, region: str, forwarded: bool
) -> None:
    extra: dict[str, Any] = {} if ip is None else {"ip": ip}
    result = run_mp(mp_batch(commerce(custom_attributes=attributes), **extra), region=region)
    if forwarded:
        assert len(events_of(result)) == 1
    else:
        assert only_drop(result) == "missing_consent"


# ---------------------------------------------------------------------------
# §8 age


@pytest.mark.parametrize(
    ("offset_ms", "max_age", "expected"),
    [
        (-24 * HOUR_MS, None, None),
        (-24 * HOUR_MS - 1, None, "too_old"),
        (-1 * HOUR_MS, 1, None),
        (-1 * HOUR_MS - 1, 1, "too_old"),
        (-504 * HOUR_MS, 504, None),
        (-504 * HOUR_MS - 1, 504, "too_old"),
        (-48 * HOUR_MS, 72, None),
        (-30 * 24 * HOUR_MS, 504, "too_old"),
        (HOUR_MS, None, None),
        (HOUR_MS + 1, None, "in_future"),
        (HOUR_MS + 1, 504, "in_future"),
        (10 * 365 * 24 * HOUR_MS, None, "in_future"),
        (0, 1, None),
    ],
    ids=[
        "24h-edge-kept",
        "24h+1ms-too_old",
        "1h-edge-kept",
        "1h+1ms-too_old",
        "504h-edge-kept",
        "504h+1ms-too_old",
        "48h-with-72",
        "30d-too_old",
        "future-1h-kept",
        "future-1h+1ms",
        "future-any-age",
        "future-10y",
        "now",
    ],
)
def test_age_window(offset_ms: int, max_age: int | None, expected: str | None) -> None:
    raw: dict[str, Any] = {} if max_age is None else {"max_event_age_hours": max_age}
    result = run_mp(mp_batch(commerce(timestamp_unixtime_ms=NOW_MS + offset_ms)), **raw)
    if expected is None:
        assert len(events_of(result)) == 1
    else:
        assert only_drop(result) == expected


def test_age_without_timestamp_is_now() -> None:
    event = commerce()
    del event["data"]["timestamp_unixtime_ms"]
    result = run_mp(mp_batch(event), now=NOW + timedelta(days=3650), max_event_age_hours=1)
    assert len(events_of(result)) == 1


@pytest.mark.parametrize("value", [0, 505, -1, "24", 1.5, True, [24]], ids=ids)
def test_max_event_age_hours_is_validated(value: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(max_event_age_hours=value)
    assert caught.value.field == "max_event_age_hours"


@pytest.mark.parametrize(
    ("key", "value"),
    [("region", "US"), ("match_keys", "all"), ("consent_mode", "strict"), ("partner_name", 5)],
)
def test_other_settings_are_validated(key: str, value: Any) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(**{key: value})
    assert caught.value.field == key


# ---------------------------------------------------------------------------
# §9 drop reasons, each alone


@pytest.mark.parametrize(
    ("event", "batch_extra", "raw", "reason"),
    [
        ("not an object", {}, {}, "invalid_event"),
        ({"event_type": "commerce_event", "data": "x"}, {}, {}, "invalid_event"),
        (
            {"event_type": "commerce_event", "data": {"product_action": "purchase"}},
            {},
            {},
            "invalid_event",
        ),
        (commerce(custom_attributes=["not", "a", "map"]), {}, {}, "invalid_event"),
        (commerce(timestamp_unixtime_ms="soon"), {}, {}, "invalid_event"),
        (custom(), {}, {}, "not_commerce_event"),
        (commerce(), {}, {"default_rules": False}, "unmapped_event"),
        (commerce(""), {}, {}, "missing_action"),
        (commerce(timestamp_unixtime_ms=NOW_MS - 25 * HOUR_MS), {}, {}, "too_old"),
        (commerce(timestamp_unixtime_ms=NOW_MS + 2 * HOUR_MS), {}, {}, "in_future"),
        (commerce(), {"device_info": {"platform": "web"}}, {}, "no_country_code"),
        (commerce(), {"user_identities": {}}, {}, "no_match_key"),
        (commerce(), {}, {"region": "EU"}, "missing_consent"),
        (commerce(), {}, {"consent_mode": "require_granted"}, "consent_denied"),
    ],
    ids=[
        "event-not-object",
        "data-not-object",
        "product_action-not-object",
        "custom_attributes-not-object",
        "bad-timestamp",
        "not_commerce_event",
        "unmapped_event",
        "missing_action",
        "too_old",
        "in_future",
        "no_country_code",
        "no_match_key",
        "missing_consent",
        "consent_denied",
    ],
)
def test_each_drop_reason(
    event: Any, batch_extra: dict[str, Any], raw: dict[str, Any], reason: str
) -> None:
    batch = mp_batch(event, commerce(custom_attributes={"country_code": "US"}), **batch_extra)
    batch["events"][1]["data"]["custom_attributes"]["amzn_user_data"] = "granted"
    result = run_mp(batch, **raw)
    assert drops(result)[0] == reason
    if reason == "invalid_event":
        assert result.dropped[0].detail
    if reason not in ("unmapped_event", "no_match_key"):
        assert result.index_maps == [[1]]  # the other event goes on


# §9 precedence: every combination of conditions gives the first reason of the order.

ORDER = list(DROP_REASONS)  # mapping.md §9's order, written once in mapping_helpers
EXCLUSIVE = [
    {"not_commerce_event", "missing_action", "unmapped_event"},
    {"too_old", "in_future"},
]


def build_case(conditions: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An mParticle batch of one event meeting exactly ``conditions``, and settings."""
    data: dict[str, Any] = {"event_id": "e1", "timestamp_unixtime_ms": TS}
    if "not_commerce_event" not in conditions:
        data["product_action"] = {"action": "" if "missing_action" in conditions else "purchase"}
    if "too_old" in conditions:
        data["timestamp_unixtime_ms"] = NOW_MS - 30 * HOUR_MS
    if "in_future" in conditions:
        data["timestamp_unixtime_ms"] = NOW_MS + 3 * HOUR_MS
    if "invalid_event" in conditions:
        data["custom_attributes"] = "not an object"
    batch: dict[str, Any] = {
        "device_info": {"platform": "web"},
        "user_identities": {},
        "events": [{"event_type": "commerce_event", "data": data}],
    }
    if "no_country_code" not in conditions:
        batch["device_info"]["locale_country"] = "DE"
    if "no_match_key" not in conditions:
        batch["user_identities"] = {"email": EMAIL}
    if "missing_consent" not in conditions:
        batch["ip"] = "203.0.113.7"  # a consent signal, but not amznUserData
    raw: dict[str, Any] = {"region": "EU"}
    if "consent_denied" in conditions:
        raw["consent_mode"] = "require_granted"
    if "unmapped_event" in conditions:
        raw["default_rules"] = False
    return batch, raw


def compatible(conditions: set[str]) -> bool:
    return all(len(conditions & group) <= 1 for group in EXCLUSIVE)


PAIRS = [(a, b) for i, a in enumerate(ORDER) for b in ORDER[i + 1 :] if compatible({a, b})]


def test_precedence_builder_is_exact() -> None:
    """Each single condition alone gives its own reason (the builder is sound)."""
    for reason in ORDER:
        batch, raw = build_case({reason})
        assert only_drop(run_mp(batch, **raw)) == reason, reason
    batch, raw = build_case(set())
    assert len(events_of(run_mp(batch, **raw))) == 1


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}>{b}" for a, b in PAIRS])
def test_precedence_pairs(first: str, second: str) -> None:
    batch, raw = build_case({first, second})
    assert only_drop(run_mp(batch, **raw)) == first


def test_precedence_every_combination() -> None:
    import itertools

    checked = 0
    for size in range(1, len(ORDER) + 1):
        for combo in itertools.combinations(ORDER, size):
            conditions = set(combo)
            if not compatible(conditions):
                continue
            batch, raw = build_case(conditions)
            expected = min(conditions, key=ORDER.index)
            assert only_drop(run_mp(batch, **raw)) == expected, sorted(conditions)
            checked += 1
    assert checked > 300


# ---------------------------------------------------------------------------
# §11 small rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-12", -12),
        ("3.50", 3.5),
        ("1e3", 1000),
        ("1E3", 1000),
        ("  7 ", 7),
        ("2.5e-1", 0.25),
        ("1,5", ABSENT),
        ("12 13", ABSENT),
        ("1e", ABSENT),
        ("e3", ABSENT),
        ("--1", ABSENT),
        ("١٢", ABSENT),
    ],
    ids=ids,
)
def test_numeric_strings(text: str, expected: Any) -> None:
    out = single(run_mp(mp_batch(commerce("add_to_cart", product_action={"total_amount": text}))))
    assert get(out, "value") == expected


# ---------------------------------------------------------------------------
# §12 the Amazon request


def many(count: int, *, dropped_every: int = 0) -> tuple[dict[str, Any], list[int]]:
    """A batch with ``count`` forwardable purchases (and custom events in between)."""
    events: list[dict[str, Any]] = []
    forwarded: list[int] = []
    for i in range(count):
        if dropped_every and i % dropped_every == 0:
            events.append(custom(f"noise {i}"))
        forwarded.append(len(events))
        events.append(commerce(event_id=f"ev-{len(events)}"))
    return mp_batch(*events), forwarded


@pytest.mark.parametrize(
    ("count", "sizes"),
    [
        (1, [1]),
        (499, [499]),
        (500, [500]),
        (501, [500, 1]),
        (1000, [500, 500]),
        (1203, [500, 500, 203]),
    ],
    ids=["1", "499", "500", "501", "1000", "1203"],
)
def test_split_only_past_500(count: int, sizes: list[int]) -> None:
    batch, _ = many(count)
    result = run_mp(batch)
    assert [len(r["events"]) for r in result.requests] == sizes
    assert [len(m) for m in result.index_maps] == sizes
    assert result.forwarded == count


def test_split_1203_traces_back_to_inbound_indexes() -> None:
    batch, forwarded = many(1203, dropped_every=97)
    result = run_mp(batch)
    assert [len(r["events"]) for r in result.requests] == [500, 500, 203]
    assert [i for m in result.index_maps for i in m] == forwarded
    noise = {i for i, e in enumerate(batch["events"]) if e["event_type"] == "custom_event"}
    assert drops(result) == dict.fromkeys(sorted(noise), "not_commerce_event")
    for request, index_map in zip(result.requests, result.index_maps, strict=True):
        for event, inbound in zip(request["events"], index_map, strict=True):
            assert event["eventId"] == f"ev-{inbound}"
            assert event["eventId"] == batch["events"][inbound]["data"]["event_id"]


def test_one_request_per_batch_in_batch_order() -> None:
    batch = mp_batch(
        commerce(event_id="a"),
        custom(),
        commerce("add_to_cart", event_id="b"),
        commerce(event_id="c", timestamp_unixtime_ms=1),
        commerce("checkout", event_id="d"),
    )
    result = run_mp(batch)
    assert len(result.requests) == 1
    assert [e["eventId"] for e in result.requests[0]["events"]] == ["a", "b", "d"]
    assert result.index_maps == [[0, 2, 4]]
    assert drops(result) == {1: "not_commerce_event", 3: "too_old"}
    assert [d.index for d in result.dropped] == [1, 3]


@pytest.mark.parametrize(
    "batch",
    [
        mp_batch(custom(), commerce(""), commerce(timestamp_unixtime_ms=1)),
        {"events": []},
        {"environment": "production"},
        {"events": None},
    ],
    ids=["all-dropped", "empty-events", "no-events-key", "null-events"],
)
def test_nothing_forwarded_sends_nothing(batch: dict[str, Any]) -> None:
    result = run_mp(batch)
    assert result.requests == []
    assert result.index_maps == []
    assert len(result.dropped) == len(batch.get("events") or [])


@pytest.mark.parametrize(
    "payload",
    [[{"events": []}], "batch", 5, None, {"events": {"0": commerce()}}, {"events": "x"}],
    ids=["array", "string", "number", "null", "events-object", "events-string"],
)
def test_unusable_batch_is_a_payload_error(payload: Any) -> None:
    with pytest.raises(PayloadError):
        run_mp(payload)


def test_invalid_json_is_a_payload_error() -> None:
    with pytest.raises(PayloadError):
        run("mparticle", None, body=b'{"events": [')


# ---------------------------------------------------------------------------
# §13 the worked example, byte for byte


@pytest.mark.parametrize(
    "now",
    [
        NOW,
        datetime(2025, 11, 24, 12, 13, 20, tzinfo=UTC),
        datetime(2025, 11, 23, 12, 13, 20, tzinfo=UTC),
    ],
    ids=["same-day", "24h-later", "at-event-time"],
)
def test_worked_example_byte_for_byte(now: datetime) -> None:
    result = run(
        "mparticle",
        None,
        {"data_set_name": "web_purchases", "partner_name": "acme_relay"},
        body=SPEC_EXAMPLE_INPUT.encode(),
        now=now,
    )
    assert len(result.requests) == 1
    assert canonical(result.requests[0]) == canonical(SPEC_EXAMPLE_OUTPUT)
    assert [d.as_dict() for d in result.dropped] == [{"index": 1, "reason": "not_commerce_event"}]
    assert canonical(result.as_dict()) == canonical(
        {
            "requests": [SPEC_EXAMPLE_OUTPUT],
            "dropped": [{"index": 1, "reason": "not_commerce_event"}],
        }
    )
    assert sha256("jane.doe@example.com").startswith("86e0b9e5")  # as in golden m01
