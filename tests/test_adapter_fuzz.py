"""Fuzzing each source adapter and the mapper over arbitrary bytes and arbitrary JSON.

tests/test_mapping_properties.py checks the mapping's meaning on shaped payloads; this
file only asks that nothing crashes: whatever the bytes, the edge decoder answers a
value or a PayloadError (400), each adapter answers events or a PayloadError, and the
mapper's Amazon requests serialise as JSON (what the relay stores and sends). Strings
include lone surrogates, NUL and other control characters; numbers include the extremes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.amazon.settings import OutputSettings
from app.api.deps import strict_json
from app.db.session import dumps_json
from app.errors import PayloadError
from app.pipeline import map_parsed
from app.sources import SOURCES, adapter

NOW = datetime(2026, 1, 15, 12, tzinfo=UTC)
SETTINGS = [
    OutputSettings.from_mapping({}),
    OutputSettings.from_mapping({"match_keys": "extended", "consent_mode": "require_granted"}),
]
FAST = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
DEEP = settings(
    max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# Keys the adapters read, so arbitrary values land where they are used.
KEYS = [
    "events", "event_type", "data", "batch", "type", "event", "properties", "context",
    "traits", "user_identities", "identity_type", "identity", "product_action",
    "action", "products", "price", "quantity", "total_amount", "total", "revenue",
    "currency", "currency_code", "timestamp", "timestamp_unixtime_ms", "event_time",
    "event_id", "messageId", "email", "phone", "user_id", "userId", "country_code",
    "device_info", "platform", "ip", "consent_state", "event_name", "custom_attributes",
    "event_value", "units_sold", "records", "advertisingId", "locale", "address",
]  # fmt: skip
WORDS = [
    "commerce_event", "custom_event", "purchase", "track", "page", "Order Completed",
    "email", "USD", "US", "ios", "2026-01-15T11:00:00Z", "1768474800000", "-1", "NaN",
    "1e999", "", " ", "\x00", "\ud800", "\udfff", "1" * 400,
]  # fmt: skip
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
NUMBERS = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
)


def json_like(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Python values a JSON decoder could give, and some it never would (NaN,
    Infinity, lone surrogates): an adapter must survive both."""
    leaves = st.none() | st.booleans() | NUMBERS | ANY_TEXT | st.sampled_from(WORDS)
    keys = st.sampled_from(KEYS) | ANY_TEXT
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6)
        ),
        max_leaves=max_leaves,
    )


def batch_like() -> st.SearchStrategy[Any]:
    """Payloads shaped like each source's outer layer, with arbitrary insides."""
    event = st.dictionaries(st.sampled_from(KEYS), json_like(12), max_size=8)
    events = st.lists(event, max_size=4)
    return (
        st.fixed_dictionaries({"events": events}, optional={"user_identities": json_like(6)})
        | st.fixed_dictionaries({"batch": events}, optional={"context": json_like(6)})
        | events
        | json_like()
    )


def assert_maps_or_refuses(source: str, payload: Any, output: OutputSettings) -> None:
    try:
        result = map_parsed(payload, source, settings=output, now=NOW)
    except PayloadError as refused:
        refusal = refused.message
        assert refusal  # a 400 with a message, never an unexplained one
        return
    for request in result.requests:
        orjson.dumps(request)  # stored and sent as JSON: must serialise
    assert result.forwarded + len(result.dropped) >= 0
    orjson.dumps(result.as_dict())


@pytest.mark.parametrize("source", sorted(SOURCES))
@FAST
@given(payload=batch_like(), which=st.sampled_from(SETTINGS))
def test_each_adapter_and_the_mapper_survive_any_payload(
    source: str, payload: Any, which: OutputSettings
) -> None:
    assert_maps_or_refuses(source, payload, which)


def json_text() -> st.SearchStrategy[bytes]:
    """Bytes near JSON: serialised values, then mutated (cut, doubled keys, junk)."""
    documents = json_like().map(lambda v: json.dumps(v, allow_nan=True).encode())
    mutations = st.sampled_from(
        [
            lambda b: b,
            lambda b: b[: len(b) // 2],
            lambda b: b.replace(b"{", b'{"k": 1, "k": 2, ', 1) if b"{}" not in b else b,
            lambda b: b + b"\xff",
            lambda b: b"[" * 2000 + b + b"]" * 2000,
            lambda b: b.replace(b'"', b"'"),
        ]
    )
    return st.builds(lambda doc, mutate: mutate(doc), documents, mutations) | st.binary(
        max_size=300
    )


@FAST
@given(body=json_text())
def test_the_edge_decoder_answers_a_value_or_a_400(body: bytes) -> None:
    try:
        value = strict_json(body)
    except PayloadError as refused:
        refusal = refused.message
        assert refusal.startswith("body is not valid")
        return
    # What it lets through can be stored and sent on as JSON, and reads back the same:
    # written as the JSON columns write it (integers beyond 64 bits through json).
    assert json.loads(dumps_json(value)) == value


@pytest.mark.parametrize("source", sorted(SOURCES))
@FAST
@given(
    body=json_text(),
    content_type=st.sampled_from([None, "application/json", "text/csv", "application/x-ndjson"]),
)
def test_each_adapter_survives_any_bytes(
    source: str, body: bytes, content_type: str | None
) -> None:
    try:
        payload = adapter(source).decode(body, content_type)
    except (PayloadError, ValueError):  # ValueError: the ingest route turns it into a 400
        return
    assert_maps_or_refuses(source, payload, SETTINGS[0])


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(SOURCES))
@DEEP
@given(payload=batch_like(), which=st.sampled_from(SETTINGS))
def test_each_adapter_survives_many_payloads(
    source: str, payload: Any, which: OutputSettings
) -> None:
    assert_maps_or_refuses(source, payload, which)
