"""Flat conversion records (sources.md `records`): JSON, NDJSON and CSV uploads."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from mapping_helpers import (
    EMAIL,
    EMAIL_HASH,
    EMAIL_KEY,
    IDFA,
    TS,
    TS_TEXT,
    canonical,
    deterministic_id,
    drops,
    events_of,
    only_drop,
    run,
    sha256,
    single,
)

from app.errors import PayloadError
from app.sources.records import ADAPTER

FIXTURES = Path(__file__).parent / "fixtures"

PURCHASE_ROW = {
    "event_type": "purchase",
    "event_name": "Store Purchase",
    "event_time": "2025-11-23T12:13:20Z",
    "event_value": "59.985",
    "currency": "usd",
    "units_sold": "3",
    "event_id": "order-1",
    "country_code": "US",
    "email": " Jane.Doe@Example.com ",
    "phone": "+1 415 555 2671",
    "maid": IDFA,
    "ip_address": "203.0.113.7",
    "data_processing_options": "LIMITED_DATA_USE",
}
PURCHASE_EVENT = {
    "eventDescription": {
        "conversionType": "OFF_AMAZON_PURCHASES",
        "eventSource": "OFFLINE",
        "name": "Store Purchase",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    },
    "countryCode": "US",
    "matchKeys": [
        {"type": "EMAIL", "values": [sha256("jane.doe@example.com")]},
        {"type": "PHONE", "values": [sha256("14155552671")]},
        {"type": "MAID", "values": [IDFA.lower()]},
    ],
    "eventTime": TS_TEXT,
    "eventId": "order-1",
    "value": 59.99,
    "currencyCode": "USD",
    "unitsSold": 3,
    "dataProcessingOptions": {"options": "LIMITED_DATA_USE"},
    "consent": {"geo": {"ipAddress": "203.0.113.7"}},
}


def rec(
    records: Any,
    raw: dict[str, Any] | None = None,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
) -> Any:
    return run("records", records, raw, body=body, content_type=content_type)


def row(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_type": "purchase",
        "event_time": "2025-11-23T12:13:20Z",
        "email": EMAIL,
        "country_code": "US",
        "event_id": "r1",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word.title() for word in rest)


# ---------------------------------------------------------------------------
# formats


def test_json_array() -> None:
    assert canonical(single(rec([PURCHASE_ROW]))) == canonical(PURCHASE_EVENT)


def test_json_object_with_records_key_and_single_object() -> None:
    assert canonical(single(rec({"records": [PURCHASE_ROW]}))) == canonical(PURCHASE_EVENT)
    assert canonical(single(rec(PURCHASE_ROW))) == canonical(PURCHASE_EVENT)


@pytest.mark.parametrize("content_type", [None, "application/x-ndjson"], ids=["sniffed", "typed"])
def test_ndjson(content_type: str | None) -> None:
    other = row(event_id="r2", event_type="lead")
    body = (json.dumps(PURCHASE_ROW) + "\n\n" + json.dumps(other) + "\n").encode()
    result = rec(None, body=body, content_type=content_type)
    first, second = events_of(result)
    assert canonical(first) == canonical(PURCHASE_EVENT)
    assert second["eventDescription"]["conversionType"] == "LEAD"
    assert result.index_maps == [[0, 1]]


@pytest.mark.parametrize(
    "content_type",
    [None, "text/csv", "text/csv; charset=utf-8"],
    ids=["sniffed", "typed", "charset"],
)
def test_csv(content_type: str | None) -> None:
    body = csv_text([PURCHASE_ROW, row(event_id="r2", event_type="checkout")]).encode()
    result = rec(None, body=body, content_type=content_type)
    first, second = events_of(result)
    assert canonical(first) == canonical(PURCHASE_EVENT)
    assert second["eventDescription"]["conversionType"] == "CHECKOUT"


def test_csv_with_byte_order_mark_and_empty_cells() -> None:
    text = "\ufeffevent_type,event_time,email,country_code,event_value,currency\n"
    text += "purchase,1763900000000,shopper@example.com,US,,\n"
    out = single(rec(None, body=text.encode("utf-8")))
    assert out["eventTime"] == TS_TEXT
    assert out["matchKeys"] == [EMAIL_KEY]
    assert "value" not in out  # empty cells count as absent
    assert "currencyCode" not in out


def test_csv_row_with_surplus_fields_is_invalid_and_the_rest_go_on() -> None:
    text = "event_type,event_time,email,country_code\n"
    text += "purchase,2025-11-23T12:13:20Z,shopper@example.com,US,EXTRA\n"
    text += "lead,2025-11-23T12:13:20Z,shopper@example.com,US\n"
    text += "checkout,2025-11-23T12:13:20Z\n"  # short rows leave cells empty
    result = rec(None, body=text.encode())
    assert drops(result) == {0: "invalid_event", 2: "no_country_code"}
    assert result.dropped[0].detail
    assert single(result)["eventDescription"]["conversionType"] == "LEAD"


def test_fixture_csv_file() -> None:
    result = rec(None, body=(FIXTURES / "records.csv").read_bytes())
    assert drops(result) == {2: "invalid_event", 3: "no_match_key"}
    assert result.dropped[0].detail is not None
    assert "event_value" in result.dropped[0].detail
    first, second = events_of(result)
    assert (first["eventId"], first["value"], first["unitsSold"]) == ("csv-1", 120.5, 2)
    assert second["eventDescription"] == {
        "conversionType": "ADD_TO_SHOPPING_CART",
        "eventSource": "WEBSITE",
        "name": "Add To Shopping Cart",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert result.index_maps == [[0, 1]]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", None),
        (b"\xff\xfe\x00bad", None),
        (b"[1, 2", "application/json"),
        (b"42", "application/json"),
        (b"event_type,email\r\x00purchase", "text/csv"),
    ],
    ids=["empty", "not-utf8", "broken-json", "json-scalar", "csv-with-nul"],
)
def test_unusable_body_is_a_payload_error(body: bytes, content_type: str | None) -> None:
    with pytest.raises(PayloadError):
        rec(None, body=body, content_type=content_type)


# ---------------------------------------------------------------------------
# columns


def test_camel_case_columns_equal_snake_case() -> None:
    camel_row = {camel(k): v for k, v in PURCHASE_ROW.items()}
    assert "eventType" in camel_row
    assert "ipAddress" in camel_row
    assert canonical(single(rec([camel_row]))) == canonical(PURCHASE_EVENT)
    upper = {k.upper(): v for k, v in PURCHASE_ROW.items()}
    assert canonical(single(rec([upper]))) == canonical(PURCHASE_EVENT)


def test_duplicate_columns_the_last_non_empty_value_wins() -> None:
    # eventTime and event_time name one column: the later non-empty one is read.
    later = {**row(event_id="dup"), "eventTime": "2025-11-23T12:13:21Z"}
    assert single(rec([later]))["eventTime"] == "2025-11-23T12:13:21.000Z"
    empty_later = {**row(event_id="dup"), "eventTime": ""}
    assert single(rec([empty_later]))["eventTime"] == TS_TEXT


def test_many_column_sets_in_one_batch() -> None:
    """Column names are worked out once per set of columns, from a bounded cache: a
    batch whose records all have different columns (more sets than the cache holds)
    reads each record by its own columns."""
    records = [
        {**row(event_id=f"r{i}"), f"Extra Column {i}": "x", "eventName": f"Sale {i % 7}"}
        for i in range(600)
    ]
    result = rec(records)
    events = events_of(result)
    assert [e["eventId"] for e in events] == [f"r{i}" for i in range(600)]
    assert [e["eventDescription"]["name"] for e in events[:8]] == [
        *(f"Sale {i}" for i in range(7)),
        "Sale 0",
    ]
    camel_then_snake = [{camel(k): v for k, v in row(event_id="c").items()}, row(event_id="s")]
    assert [e["eventId"] for e in events_of(rec(camel_then_snake))] == ["c", "s"]
    # Records too wide, or with keys too long, to be kept in the caches read the same.
    wide = {**{f"column{i}": "x" for i in range(100)}, **row(event_id="w"), "eventName": "W"}
    long_key = {**row(event_id="l"), "x" * 5_000: "y", "EventName": "L"}
    events = events_of(rec([wide, long_key]))
    assert [(e["eventId"], e["eventDescription"]["name"]) for e in events] == [
        ("w", "W"),
        ("l", "L"),
    ]


def test_a_key_that_is_not_text_is_an_invalid_record() -> None:
    # Not from JSON or CSV (their keys are text), but from Python callers of the adapter
    # (a JSON body would turn the key into text, so the adapter is called directly).
    parsed = ADAPTER.parse([{**row(event_id="a"), 7: "x"}, row(event_id="b")])
    assert [(d.index, d.reason, d.detail) for d in parsed.rejects] == [
        (0, "invalid_event", "record has a key that is not text")
    ]
    assert [event.event_id for event in parsed.events] == ["b"]


ALIASES = [
    ("purchase", "OFF_AMAZON_PURCHASES", "Off Amazon Purchases"),
    ("add_to_cart", "ADD_TO_SHOPPING_CART", "Add To Shopping Cart"),
    ("checkout", "CHECKOUT", "Checkout"),
    ("page_view", "PAGE_VIEW", "Page View"),
    ("search", "SEARCH", "Search"),
    ("sign_up", "SIGN_UP", "Sign Up"),
    ("lead", "LEAD", "Lead"),
    ("subscribe", "SUBSCRIBE", "Subscribe"),
    ("application", "APPLICATION", "Application"),
    ("contact", "CONTACT", "Contact"),
    ("other", "OTHER", "Other"),
    ("OFF_AMAZON_PURCHASES", "OFF_AMAZON_PURCHASES", "Off Amazon Purchases"),
    ("mobile_app_first_start", "MOBILE_APP_FIRST_START", "Mobile App First Start"),
    ("Add To Cart", "ADD_TO_SHOPPING_CART", "Add To Shopping Cart"),
    ("AddToCart", "ADD_TO_SHOPPING_CART", "Add To Shopping Cart"),
    (" Purchase ", "OFF_AMAZON_PURCHASES", "Off Amazon Purchases"),
]


@pytest.mark.parametrize(
    ("event_type", "conversion_type", "name"), ALIASES, ids=[a[0] for a in ALIASES]
)
def test_event_type_aliases_and_default_name(
    event_type: str, conversion_type: str, name: str
) -> None:
    out = single(rec([row(event_type=event_type)]))
    assert out["eventDescription"]["conversionType"] == conversion_type
    assert out["eventDescription"]["name"] == name


def test_event_name_wins_over_the_default() -> None:
    assert (
        single(rec([row(event_name="  In-Store Sale ")]))["eventDescription"]["name"]
        == "In-Store Sale"
    )


@pytest.mark.parametrize(
    "event_type", [None, "nonsense", "refund"], ids=["missing", "unknown", "refund"]
)
def test_unknown_event_type_is_unmapped(event_type: str | None) -> None:
    assert only_drop(rec([row(event_type=event_type)])) == "unmapped_event"


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [
        ("2025-11-23T12:13:20Z", TS_TEXT),
        ("2025-11-23T12:13:20.123Z", "2025-11-23T12:13:20.123Z"),
        ("2025-11-23T13:13:20+01:00", TS_TEXT),
        ("2025-11-23 12:13:20", TS_TEXT),
        (TS, TS_TEXT),
        (str(TS), TS_TEXT),
        (TS + 7, "2025-11-23T12:13:20.007Z"),
    ],
    ids=["iso", "iso-ms", "offset", "space-no-zone", "epoch-ms", "epoch-ms-text", "epoch-ms-7"],
)
def test_event_time(event_time: Any, expected: str) -> None:
    assert single(rec([row(event_time=event_time)]))["eventTime"] == expected


@pytest.mark.parametrize(
    ("event_source", "expected"),
    [
        (None, "OFFLINE"),
        ("IOS", "IOS"),
        ("android", "ANDROID"),
        ("FIRE_TV", "FIRE_TV"),
        ("website", "WEBSITE"),
        ("Offline", "OFFLINE"),
    ],
    ids=["default", "IOS", "android", "FIRE_TV", "website", "Offline"],
)
def test_event_source(event_source: str | None, expected: str) -> None:
    out = single(rec([row(event_source=event_source)]))
    assert out["eventDescription"]["eventSource"] == expected


@pytest.mark.parametrize(
    ("fields", "keys", "extended_keys"),
    [
        ({"user_id": "A" * 64, "email": None}, [{"type": "EMAIL", "values": ["a" * 64]}], None),
        ({"user_id": EMAIL_HASH, "email": None}, [EMAIL_KEY], None),
        ({"user_id": "crm-42", "email": None}, None, [{"type": "MATCH_ID", "values": ["crm-42"]}]),
        (
            {"user_id": "crm-42"},
            [EMAIL_KEY],
            [EMAIL_KEY, {"type": "MATCH_ID", "values": ["crm-42"]}],
        ),
        ({"email": None, "maid": "F" * 64}, [{"type": "MAID", "values": ["f" * 64]}], None),
        (
            {"email": None, "phone": 4155552671},
            [{"type": "PHONE", "values": [sha256("14155552671")]}],
            None,
        ),
        ({"email": None}, None, None),
    ],
    ids=[
        "prehashed-user_id",
        "prehashed-lowercase",
        "user_id-match-id",
        "user_id-with-email",
        "prehashed-maid",
        "numeric-phone",
        "no-identity",
    ],
)
def test_identities(
    fields: dict[str, Any], keys: list[dict[str, Any]] | None, extended_keys: Any
) -> None:
    record = row(**fields)
    for raw, expected in (({}, keys), ({"match_keys": "extended"}, extended_keys or keys)):
        result = rec([record], raw)
        if expected is None:
            assert only_drop(result) == "no_match_key"
        else:
            assert single(result)["matchKeys"] == expected


def test_country_code_column() -> None:
    assert single(rec([row(country_code="United Kingdom")]))["countryCode"] == "GB"
    assert single(rec([row(countryCode="de", country_code=None)]))["countryCode"] == "DE"
    assert only_drop(rec([row(country_code=None)])) == "no_country_code"
    assert only_drop(rec([row(country_code="XX")])) == "no_country_code"


def test_value_currency_units_for_non_purchases() -> None:
    out = single(rec([row(event_type="lead", event_value="-4.5", currency="USD", units_sold=2)]))
    assert out["value"] == -4.5
    assert "currencyCode" not in out
    assert "unitsSold" not in out


def test_deterministic_event_id_without_event_id() -> None:
    record = row(event_id=None)
    out = single(rec([record], {"connection_id": "upload-1"}))
    assert out["eventId"] == deterministic_id("upload-1", record)


# ---------------------------------------------------------------------------
# validation: bad rows are dropped with a reason, the rest go on


@pytest.mark.parametrize(
    ("fields", "detail_word"),
    [
        ({"event_value": "abc"}, "event_value"),
        ({"event_value": True}, "event_value"),
        ({"event_time": "tomorrow"}, "event_time"),
        ({"event_time": "2025-13-45T00:00:00Z"}, "event_time"),
        ({"units_sold": "three"}, "units_sold"),
        ({"event_source": "smart fridge"}, "event_source"),
    ],
    ids=["value-text", "value-bool", "time-text", "time-impossible", "units", "event_source"],
)
def test_invalid_rows_are_dropped_with_a_detail(fields: dict[str, Any], detail_word: str) -> None:
    records = [row(event_id="ok-0"), row(event_id="bad", **fields), row(event_id="ok-2")]
    result = rec(records)
    assert drops(result) == {1: "invalid_event"}
    detail = result.dropped[0].detail
    assert detail is not None
    assert detail_word in detail
    assert [e["eventId"] for e in events_of(result)] == ["ok-0", "ok-2"]
    assert result.index_maps == [[0, 2]]


def test_non_object_records_and_bad_ndjson_lines() -> None:
    assert drops(rec([5, row(), "x", None])) == {
        0: "invalid_event",
        2: "invalid_event",
        3: "invalid_event",
    }
    body = (
        json.dumps(row(event_id="a")) + "\n{not json\n" + json.dumps(row(event_id="c"))
    ).encode()
    result = rec(None, body=body)
    assert drops(result) == {1: "invalid_event"}
    assert result.dropped[0].detail == "line is not valid JSON"
    assert [e["eventId"] for e in events_of(result)] == ["a", "c"]


@pytest.mark.parametrize(
    ("row_advertiser", "output_advertiser", "forwarded"),
    [
        ("123", "123", True),
        ("999", "123", False),
        ("999", None, True),
        (None, "123", True),
        (123, "123", True),
    ],
    ids=["same", "other", "output-without-id", "row-without-id", "numeric-same"],
)
def test_advertiser_id_must_be_the_outputs(
    row_advertiser: Any, output_advertiser: str | None, forwarded: bool
) -> None:
    raw = {} if output_advertiser is None else {"advertiser_id": output_advertiser}
    result = rec([row(advertiser_id=row_advertiser)], raw)
    if forwarded:
        assert len(events_of(result)) == 1
    else:
        assert only_drop(result) == "invalid_event"
        assert result.dropped[0].detail is not None
        assert "advertiser_id" in result.dropped[0].detail
