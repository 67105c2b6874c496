"""The fused records lane (pipeline.map_records) against the adapter and mapper.

``relay upload`` and ``POST /v1/records`` map records through the lane; the records
adapter + mapper are the reference, so both must give the same answer byte for byte:
requests (their JSON text), index maps, drops with their details and the skipped count.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from mapping_helpers import NOW, NOW_MS, assert_fused_lane_equals_reference
from test_mapping_properties import (
    EMAILS,
    IPS,
    MAIDS,
    PROPERTY_SETTINGS,
    RECORD_COLUMNS,
    camel,
    record_rows,
    settings_strategy,
)

from app.amazon.settings import OutputSettings
from app.pipeline import map_parsed, map_records
from app.sources.records import ADAPTER, decode_records


def assert_lane_equals_reference(payload: Any, output: OutputSettings) -> None:
    assert_fused_lane_equals_reference(map_records, ADAPTER, payload, output)


def as_text(value: Any) -> str | None:
    """A value as a CSV file holds it (None stays: DictReader's value for a short row)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, bool) else str(value)


# Values the lane reads itself (plain numbers, blanks) next to everything else.
PLAIN = st.sampled_from(
    ["", " ", "0", "1", "12.5", "12.50", "007.25", "999999999.99", "1000000000", "-3", "\t1"]
)
TEXT_COLUMNS = {
    name: st.one_of(strategy.map(as_text), PLAIN, st.text(max_size=6))
    for name, strategy in RECORD_COLUMNS.items()
}
TEXT_COLUMNS["event_time"] = TEXT_COLUMNS["event_time"] | st.integers(
    NOW_MS - 40 * 24 * 3_600_000, NOW_MS + 2 * 3_600_000
).map(str)
TEXT_COLUMNS["event_value"] = TEXT_COLUMNS["event_value"] | st.sampled_from(["n/a", "1e3"])
HOUR_MS = 3_600_000
# Values a real file holds, so that whole rows are forwarded often, not only dropped.
LIKELY = {
    "event_type": st.sampled_from(["purchase", "OFF_AMAZON_PURCHASES", "add_to_cart", "lead"]),
    "event_name": st.sampled_from(["", "Store Sale", " "]),
    "event_source": st.sampled_from(["", "website", "IOS", "offline"]),
    "event_time": st.integers(NOW_MS - 20 * HOUR_MS, NOW_MS).map(str)
    | st.sampled_from(["", (NOW - timedelta(hours=2)).isoformat()]),
    "event_value": PLAIN | st.decimals(0, 10**6, places=2).map(str),
    "units_sold": st.sampled_from(["", "1", "2", "0", "3.5", "2147483648"]),
    "currency": st.sampled_from(["", "usd", "EUR", "xx"]),
    "country_code": st.sampled_from(["US", "us", " de ", "GBR", "United States", "FR"]),
    "email": st.sampled_from(EMAILS) | st.integers(0, 10**6).map("u{}@example.com".format),
    "user_id": st.sampled_from(["", "crm-1", "A" * 64, "  "]),
    "phone": st.sampled_from(["", "+1 (415) 555-2671", "+14155550100", "0555 1234567"])
    | st.integers(0, 9999).map("+1415555{:04d}".format),
    "maid": st.sampled_from(MAIDS),
    "ip_address": st.sampled_from(IPS),
    "event_id": st.sampled_from(["", "", "r-1", "i" * 300, " "]),
    "advertiser_id": st.sampled_from(["", "", "123", "999"]),
    "data_processing_options": st.sampled_from(["", "LIMITED_DATA_USE", "limited_data_use"]),
}


@st.composite
def column_value(draw: st.DrawFn, name: str) -> str | None:
    """Mostly a likely value, sometimes anything the column's strategy draws."""
    likely = draw(st.integers(0, 5)) > 0
    value: str | None = draw(LIKELY[name] if likely else TEXT_COLUMNS[name])
    return value


EXTRA_COLUMNS = ["note", "Event Type", "EVENT-VALUE", "emailAddress", "é", "x\u007f"]


@st.composite
def text_rows(draw: st.DrawFn) -> dict[Any, Any]:
    """A CSV row: text values (or None) under snake_case, camelCase or other spellings,
    sometimes a column twice, sometimes an extra column or a key that is not text."""
    row: dict[Any, Any] = draw(st.fixed_dictionaries({}, optional=TEXT_COLUMNS))
    if draw(st.booleans()):
        row = {name: draw(column_value(name)) for name in RECORD_COLUMNS}
    if draw(st.booleans()):
        row = {camel(k): v for k, v in row.items()}
    for extra in draw(st.lists(st.sampled_from(EXTRA_COLUMNS), max_size=2)):
        row[extra] = draw(st.none() | st.text(max_size=8))
    if draw(st.integers(0, 15)) == 0 and row:
        name = draw(st.sampled_from(sorted(RECORD_COLUMNS)))
        row[camel(name) if name in row else name] = draw(TEXT_COLUMNS[name])
    if draw(st.integers(0, 30)) == 0:
        row[draw(st.sampled_from([None, 1]))] = "surplus"
    return row


@st.composite
def files(draw: st.DrawFn) -> list[Any]:
    """A batch of one file: rows sharing their columns, as a CSV file's rows do."""
    columns = sorted(RECORD_COLUMNS)
    if draw(st.integers(0, 3)):
        header = draw(st.permutations(columns))
    else:
        header = draw(st.lists(st.sampled_from(columns), unique=True, max_size=len(columns)))
    spelled = [camel(name) if draw(st.booleans()) else name for name in header]
    extra = draw(st.lists(st.sampled_from(EXTRA_COLUMNS), unique=True, max_size=2))
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        row = {key: draw(column_value(name)) for key, name in zip(spelled, header, strict=True)}
        rows.append({**row, **{key: draw(st.text(max_size=8)) for key in extra}})
    return rows


OUTPUTS = settings_strategy() | st.sampled_from(
    [
        OutputSettings.from_mapping({"advertiser_id": "123"}),
        OutputSettings.from_mapping({"advertiser_id": "123", "region": "EU"}),
        OutputSettings.from_mapping({"connection_id": "c\u00e9", "match_keys": "extended"}),
    ]
)


@PROPERTY_SETTINGS
@given(
    batch=st.lists(st.one_of(text_rows(), record_rows()), max_size=10)
    | files()
    | st.one_of(text_rows(), st.integers(), st.text(max_size=3)),
    output=OUTPUTS,
)
def test_the_fused_records_lane_equals_the_adapter_and_mapper(
    batch: Any, output: OutputSettings
) -> None:
    assert_lane_equals_reference(batch, output)


@PROPERTY_SETTINGS
@given(batch=files(), output=OUTPUTS)
def test_the_records_lane_equals_the_reference_on_a_csv_body(
    batch: list[dict[str, Any]], output: OutputSettings
) -> None:
    """Through csv.DictReader as POST /v1/records decodes a CSV body."""
    if not batch or not batch[0]:
        return
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(batch[0])
    writer.writerows([value or "" for value in row.values()] for row in batch)
    records = decode_records(out.getvalue().encode(), "text/csv")
    assert_lane_equals_reference(records, output)


def test_records_go_through_the_lane() -> None:
    row = {
        "event_type": "purchase",
        "event_time": str(NOW_MS - 60_000),
        "event_value": "12.50",
        "currency": "usd",
        "units_sold": "2",
        "country_code": "US",
        "email": "a@example.com",
        "phone": "+14155550100",
    }
    output = OutputSettings.from_mapping({"connection_id": "c1"})
    result = map_parsed([row, {**row, "event_value": "n/a"}], "records", settings=output, now=NOW)
    (event,) = result.requests[0]["events"]
    assert event["value"] == 12.5
    assert event["unitsSold"] == 2
    assert event["currencyCode"] == "USD"
    assert [d.as_dict() for d in result.dropped] == [
        {"index": 1, "reason": "invalid_event", "detail": "event_value is not a number"}
    ]
    assert_lane_equals_reference([row, {**row, "event_value": "n/a"}], output)
