"""Shortcuts the mapper takes for speed answer exactly as the slow path they skip.

- ``normalize.phone_digits`` formats "+1" and a 10-digit North American number itself
  instead of asking the phonenumbers library: the same digits, for every separator
  layout and default region, so a library update cannot silently diverge.
- The fused mParticle lane memoises customData per batch by the attributes' names,
  values *and* types: 1, True and 1.0 are equal in Python but not on the wire, nor
  are 0.0 and -0.0. Batches that repeat attribute sets differing only so must map
  exactly as the adapter + mapper map them.
"""

from __future__ import annotations

import json
from typing import Any

import phonenumbers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mapping_helpers import NOW, NOW_MS

from app.amazon.mapping import map_events
from app.amazon.normalize import phone_digits
from app.pipeline import map_mparticle, output_settings
from app.sources import adapter

SEPARATORS = st.text(alphabet=" ().-", max_size=3)


@st.composite
def nanp_numbers(draw: st.DrawFn) -> str:
    area = draw(st.from_regex(r"[2-9][0-9]{2}", fullmatch=True))
    exchange = draw(st.from_regex(r"[0-9]{3}", fullmatch=True))
    line = draw(st.from_regex(r"[0-9]{4}", fullmatch=True))
    gaps = [draw(SEPARATORS) for _ in range(3)]
    return f"+1{gaps[0]}{area}{gaps[1]}{exchange}{gaps[2]}{line}"


def library_digits(raw: str, region: str | None) -> str:
    number = phonenumbers.parse(raw, region)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


@settings(max_examples=2000, deadline=None)
@given(raw=nanp_numbers(), region=st.sampled_from([None, "US", "CA", "GB", "DE", "JP", "IN"]))
def test_the_north_american_shortcut_is_the_librarys_answer(raw: str, region: str | None) -> None:
    assert phone_digits(raw, region) == library_digits(raw, region)


ATTRIBUTE_VALUES = st.sampled_from([0, 1, True, False, 1.0, 0.0, -0.0, "1", "true", None, 2.5])


@st.composite
def batches_repeating_attribute_sets(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(["a", "b", "Color", "size"]), min_size=1, max_size=3))
    sets = draw(
        st.lists(
            st.fixed_dictionaries(dict.fromkeys(names, ATTRIBUTE_VALUES)),
            min_size=1,
            max_size=3,
        )
    )
    events = []
    for position in range(draw(st.integers(min_value=1, max_value=12))):
        attributes = sets[draw(st.integers(min_value=0, max_value=len(sets) - 1))]
        events.append(
            {
                "event_type": "commerce_event",
                "data": {
                    "event_id": 1000 + position,
                    "timestamp_unixtime_ms": NOW_MS - 60_000,
                    "custom_attributes": dict(attributes),
                    "product_action": {
                        "action": "purchase",
                        "total_amount": 10.5,
                        "products": [{"id": "p", "price": 10.5, "quantity": 1}],
                    },
                },
            }
        )
    return {
        "events": events,
        "user_identities": {"email": "shopper@example.com"},
        "device_info": {"platform": "web", "locale_country": "US"},
    }


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches_repeating_attribute_sets())
def test_memoised_custom_data_keeps_types_apart(batch: dict[str, Any]) -> None:
    output = output_settings({})
    parsed = adapter("mparticle").parse(batch)
    reference = map_events(
        parsed.events, source="mparticle", settings=output, now=NOW, rejects=parsed.rejects
    )
    fused = map_mparticle(batch, settings=output, now=NOW)
    assert fused.forwarded == len(batch["events"])  # the memo's path, not drops
    assert json.dumps(fused.requests) == json.dumps(reference.requests)
    assert fused.dropped == reference.dropped
    assert fused.custom_data_skipped == reference.custom_data_skipped
