"""Conversion rules (app/rules.py): an output's own rules, tried before the defaults.

Rules come in through the output settings (``conversion_rules`` and
``default_rules``), are validated at the edge with errors naming the field, and
decide conversionType, name and dataSetName per event.
"""

from __future__ import annotations

from typing import Any

import pytest
from mapping_helpers import (
    commerce,
    custom,
    drops,
    events_of,
    mp_batch,
    only_drop,
    run,
    run_mp,
    single,
    track,
)

from app.amazon.settings import OutputSettings
from app.errors import SettingsError
from app.rules import ConversionRule, parse_rules, title_words

# ---------------------------------------------------------------------------
# validation: errors name the field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("not a list", "conversion_rules"),
        ({"conversion_type": "OTHER"}, "conversion_rules"),
        (["not an object"], "conversion_rules[0]"),
        ([{"event_name": "x"}], "conversion_rules[0].conversion_type"),
        (
            [{"event_name": "x", "conversion_type": "PURCHASE"}],
            "conversion_rules[0].conversion_type",
        ),
        ([{"event_name": "x", "conversion_type": "other"}], "conversion_rules[0].conversion_type"),
        (
            [{"event_name": "x", "conversion_type": "OTHER"}, {"conversion_type": "LEAD"}],
            "conversion_rules[1]",
        ),
        (
            [{"event_name": "x", "conversion_type": "OTHER", "colour": "red"}],
            "conversion_rules[0].colour",
        ),
        ([{"event_name": "", "conversion_type": "OTHER"}], "conversion_rules[0].event_name"),
        ([{"event_name": "   ", "conversion_type": "OTHER"}], "conversion_rules[0].event_name"),
        ([{"action": 5, "conversion_type": "OTHER"}], "conversion_rules[0].action"),
        ([{"kind": "purchase", "conversion_type": "OTHER"}], "conversion_rules[0].kind"),
        ([{"source": "x", "name": ["n"], "conversion_type": "OTHER"}], "conversion_rules[0].name"),
        (
            [{"source": "segment", "data_set_name": "1bad", "conversion_type": "OTHER"}],
            "conversion_rules[0].data_set_name",
        ),
        (
            [{"source": "segment", "data_set_name": "abc", "conversion_type": "OTHER"}],
            "conversion_rules[0].data_set_name",
        ),
    ],
    ids=[
        "not-a-list",
        "an-object",
        "entry-not-object",
        "no-conversion_type",
        "unknown-conversion_type",
        "lowercase-conversion_type",
        "no-matcher",
        "unknown-field",
        "empty-event_name",
        "blank-event_name",
        "action-not-text",
        "unknown-kind",
        "name-not-text",
        "bad-data_set_name",
        "short-data_set_name",
    ],
)
def test_rule_errors_name_the_field(raw: Any, field: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_rules(raw)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ":")
    with pytest.raises(SettingsError) as through_settings:
        OutputSettings.from_mapping({"conversion_rules": raw})
    assert through_settings.value.field == field


@pytest.mark.parametrize("value", ["no", 0, None, [], "false"], ids=repr)
def test_default_rules_must_be_a_boolean(value: Any) -> None:
    assert OutputSettings.from_mapping({}).default_rules is True
    with pytest.raises(SettingsError) as caught:
        OutputSettings.from_mapping({"default_rules": value})
    assert caught.value.field == "default_rules"


def test_rules_are_parsed_normalised() -> None:
    rules = parse_rules(
        [
            {"event_name": "  Signed   UP ", "conversion_type": "SIGN_UP", "name": " Sign Up "},
            {"source": "mparticle", "action": " REFUND ", "conversion_type": "OTHER"},
            {"kind": "page", "conversion_type": "PAGE_VIEW", "data_set_name": "pages_ds"},
        ]
    )
    assert rules == (
        ConversionRule(conversion_type="SIGN_UP", event_name="signed up", name="Sign Up"),
        ConversionRule(conversion_type="OTHER", source="mparticle", action="refund"),
        ConversionRule(conversion_type="PAGE_VIEW", kind="page", data_set_name="pages_ds"),
    )
    settings = OutputSettings.from_mapping({"conversion_rules": [], "default_rules": False})
    assert (settings.conversion_rules, settings.default_rules) == ((), False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("add_to_cart", "Add To Cart"),
        ("ADD_TO_CART", "Add To Cart"),
        ("OFF_AMAZON_PURCHASES", "Off Amazon Purchases"),
        ("  purchase ", "Purchase"),
        ("a__b  c", "A B C"),
        ("", ""),
    ],
)
def test_title_words(text: str, expected: str) -> None:
    assert title_words(text) == expected


# ---------------------------------------------------------------------------
# overrides


def rules(*entries: dict[str, Any], defaults: bool = True) -> dict[str, Any]:
    return {"conversion_rules": list(entries), "default_rules": defaults}


def description(result: Any, index: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = events_of(result)[index]["eventDescription"]
    return out


def test_mparticle_custom_event_becomes_a_conversion() -> None:
    raw = rules(
        {
            "source": "mparticle",
            "kind": "custom",
            "event_name": "signed up",
            "conversion_type": "SIGN_UP",
        }
    )
    batch = mp_batch(custom("Signed Up", timestamp_unixtime_ms=1763900000000), custom("Other"))
    result = run_mp(batch, **raw)
    assert description(result) == {
        "conversionType": "SIGN_UP",
        "eventSource": "WEBSITE",
        "name": "Signed Up",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }
    assert drops(result) == {1: "not_commerce_event"}  # the defaults still apply to others


def test_rule_overrides_the_default_action_mapping() -> None:
    raw = rules(
        {"action": "Refund", "conversion_type": "OTHER", "name": "Refund Issued"},
        {"action": "purchase", "conversion_type": "CHECKOUT"},
    )
    result = run_mp(
        mp_batch(commerce("refund"), commerce(" PURCHASE "), commerce("add_to_cart")), **raw
    )
    named = [description(result, i) for i in range(3)]
    assert [(d["conversionType"], d["name"]) for d in named] == [
        ("OTHER", "Refund Issued"),
        ("CHECKOUT", "Purchase"),  # no rule name: the default name stays
        ("ADD_TO_SHOPPING_CART", "Add To Cart"),  # no rule: the default
    ]
    assert "currencyCode" not in events_of(result)[1]  # no longer a purchase


def test_first_matching_rule_wins() -> None:
    raw = rules(
        {"event_name": "order completed", "conversion_type": "LEAD", "name": "First"},
        {"event_name": "Order Completed", "conversion_type": "SIGN_UP", "name": "Second"},
    )
    out = single(run("segment", track("Order Completed"), raw))
    assert (out["eventDescription"]["conversionType"], out["eventDescription"]["name"]) == (
        "LEAD",
        "First",
    )


def test_event_name_matches_case_and_space_insensitively() -> None:
    raw = rules({"event_name": "song played", "conversion_type": "OTHER"})
    for name in ("Song Played", "SONG  PLAYED", " song played "):
        out = single(run("segment", track(name), raw))
        assert out["eventDescription"] == {
            "conversionType": "OTHER",
            "eventSource": "WEBSITE",
            "name": name.strip(),
            "eventIngestionMethod": "SERVER_TO_SERVER",
        }
    assert only_drop(run("segment", track("Song Skipped"), raw)) == "unmapped_event"


def test_source_filter() -> None:
    raw = rules(
        {"source": "segment", "kind": "track", "event_name": "x", "conversion_type": "LEAD"},
        {"source": "segment", "action": "purchase", "conversion_type": "LEAD"},
    )
    result = run_mp(mp_batch(custom("x"), commerce("purchase")), **raw)
    assert drops(result) == {0: "not_commerce_event"}
    assert description(result)["conversionType"] == "OFF_AMAZON_PURCHASES"
    assert description(run("segment", track("x"), raw))["conversionType"] == "LEAD"


def test_kind_rule_for_segment_pages() -> None:
    raw = rules({"kind": "page", "conversion_type": "LEAD", "name": "Landing"})
    page = {
        "type": "page",
        "name": "Home",
        "messageId": "p1",
        "context": {"locale": "en-US", "traits": {"email": "a@b.co"}},
    }
    assert description(run("segment", page, raw)) == {
        "conversionType": "LEAD",
        "eventSource": "WEBSITE",
        "name": "Landing",
        "eventIngestionMethod": "SERVER_TO_SERVER",
    }


def test_rule_name_fallback_is_the_title_of_the_type_when_no_default() -> None:
    raw = rules({"kind": "identify", "conversion_type": "SIGN_UP"})
    identify = {
        "type": "identify",
        "userId": "u1",
        "traits": {"email": "a@b.co", "address": {"country": "US"}},
    }
    out = single(run("segment", identify, raw))
    assert out["eventDescription"]["name"] == "Sign Up"
    assert out["eventDescription"]["conversionType"] == "SIGN_UP"


# ---------------------------------------------------------------------------
# default_rules: false


def test_without_defaults_only_rules_map() -> None:
    raw = rules(
        {"event_name": "order completed", "conversion_type": "OFF_AMAZON_PURCHASES"}, defaults=False
    )
    batch = {
        "batch": [track("Order Completed"), track("Product Added"), {**track("x"), "type": "page"}]
    }
    result = run("segment", batch, raw)
    assert drops(result) == {1: "unmapped_event", 2: "unmapped_event"}
    assert result.index_maps == [[0]]
    assert description(result)["name"] == "Order Completed"


def test_without_defaults_and_rules_everything_is_unmapped() -> None:
    result = run_mp(mp_batch(commerce(), commerce("add_to_cart"), custom()), default_rules=False)
    assert drops(result) == {0: "unmapped_event", 1: "unmapped_event", 2: "unmapped_event"}
    assert result.requests == []


def test_records_rules_match_the_event_name() -> None:
    raw = rules({"source": "records", "event_name": "Store_Visit", "conversion_type": "OTHER"})
    records = [
        {
            "event_type": "store_visit",
            "event_time": "2025-11-23T12:00:00Z",
            "email": "a@b.co",
            "country_code": "US",
        },
        {
            "event_type": "nonsense",
            "event_time": "2025-11-23T12:00:00Z",
            "email": "a@b.co",
            "country_code": "US",
        },
    ]
    result = run("records", records, raw)
    assert drops(result) == {1: "unmapped_event"}
    out = single(result)
    assert out["eventDescription"]["conversionType"] == "OTHER"
    assert out["eventDescription"]["name"] == "store_visit"


# ---------------------------------------------------------------------------
# per-event dataset name


def test_rule_data_set_name_overrides_the_output_setting() -> None:
    raw = {
        **rules(
            {
                "action": "purchase",
                "conversion_type": "OFF_AMAZON_PURCHASES",
                "data_set_name": "purchases_ds",
            }
        ),
        "data_set_name": "web_events",
    }
    result = run_mp(mp_batch(commerce("purchase"), commerce("add_to_cart")), **raw)
    assert description(result, 0)["dataSetName"] == "purchases_ds"
    assert description(result, 1)["dataSetName"] == "web_events"


def test_rule_data_set_name_without_output_setting() -> None:
    raw = rules(
        {"action": "checkout", "conversion_type": "CHECKOUT", "data_set_name": "Checkout-Set_1"}
    )
    result = run_mp(mp_batch(commerce("checkout"), commerce("purchase")), **raw)
    assert description(result, 0)["dataSetName"] == "Checkout-Set_1"
    assert "dataSetName" not in description(result, 1)
