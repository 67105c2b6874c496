"""Orchestration of the pure steps: decode -> adapter -> mapper.

Shared by ``relay map``, the preview route and ingest, so all three give the same
answer for the same payload.

mParticle batches, the relay's volume, take a fused lane: the adapter's reading of
the batch and the mapper's writing of Amazon events in one pass, without a canonical
event per inbound event. It handles the common shape only (a commerce event whose
fields have their usual JSON types) and gives every other event to the adapter and
mapper proper, which stay the reference: the fused lane's answer is theirs, byte for
byte (the mapping contract tests run through it).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from app.amazon import normalize
from app.amazon.mapping import (
    LIMITED_DATA_USE,
    MAX_CUSTOM_DATA,
    MAX_EXACT_INT,
    MAX_TEXT,
    MAX_UNITS,
    MILLIS,
    MINUTE_SECOND,
    SKIPPED_ENTRY,
    BatchMapper,
    MapResult,
    Plan,
    custom_entry,
    float_amount,
    fresh_custom_entry,
    hour_text,
    map_events,
)
from app.amazon.settings import OutputSettings
from app.canonical import Dropped, Platform, UserContext
from app.sources import adapter, mparticle
from app.sources.base import InvalidEventError


def output_settings(raw: Mapping[str, Any]) -> OutputSettings:
    return OutputSettings.from_mapping(raw)


def map_parsed(payload: Any, source: str, *, settings: OutputSettings, now: datetime) -> MapResult:
    if source == mparticle.NAME:
        return map_mparticle(payload, settings=settings, now=now)
    parsed = adapter(source).parse(payload)
    return map_events(
        parsed.events, source=source, settings=settings, now=now, rejects=parsed.rejects
    )


def map_payload(
    source: str,
    body: bytes,
    *,
    settings: OutputSettings,
    now: datetime,
    content_type: str | None = None,
) -> MapResult:
    payload = adapter(source).decode(body, content_type)
    return map_parsed(payload, source, settings=settings, now=now)


_SCALARS = (str, int, float)  # customData values that are sent (bool is an int)
# The fused lane stops memoising a batch's attributes once this many events have missed
# the memo and misses are more than half the events (see map_mparticle).
MEMO_TRIAL = 8


def map_mparticle(payload: Any, *, settings: OutputSettings, now: datetime) -> MapResult:
    """``map_events(ADAPTER.parse(payload))`` for an mParticle batch, in one pass.

    Per event it reads the fields, looks up the batch's plan for the event's name,
    action and reserved attributes (conversion, country, match keys, consent and
    eventDescription, worked out by the mapper once per distinct plan), then writes the
    fields that vary per event. What an event's attributes come to (customData, the
    skipped count, the plan) is memoised per batch while the batch's attribute sets
    repeat. An event found not to have the common shape goes to ``_map_one``, the
    adapter and mapper proper, before anything of it is recorded.
    """
    events = mparticle.batch_events(payload)
    user, platform = mparticle.batch_user(payload)
    mapper = BatchMapper(source=mparticle.NAME, settings=settings, now=now)
    # Local names: this loop runs once per inbound event.
    plans: dict[tuple[Any, ...], Plan] = {}
    oldest_ms, newest_ms, partner = mapper.oldest_ms, mapper.newest_ms, mapper.partner
    reserved_by_name, reserved_name = mparticle.RESERVED_BY_NAME, mparticle.reserved_name
    forwarded, indexes = mapper.events, mapper.indexes
    drop = mapper.drop
    currency_code = normalize.currency_code
    currencies: dict[Any, str | None] = {}
    memo: dict[tuple[Any, ...], tuple[Plan, list[dict[str, str]], int]] | None = {}
    memo_misses = 0
    custom_data_skipped = 0
    last_hour: int | None = None
    hour_prefix = ""

    for index, raw in enumerate(events):
        # The common shape, checked before anything is recorded for the event.
        if type(raw) is not dict:
            _map_one(mapper, index, raw, user, platform)
            continue
        data = raw.get("data")
        if type(data) is not dict:
            _map_one(mapper, index, raw, user, platform)
            continue
        product_action: Any = data.get("product_action")
        action = product_action.get("action") if type(product_action) is dict else None
        name = data.get("event_name")
        ms = data.get("timestamp_unixtime_ms")
        event_id = data.get("event_id")
        attributes = data.get("custom_attributes")
        total = product_action.get("total_amount") if type(action) is str else None
        if (
            type(action) is not str
            or (name is not None and type(name) is not str)
            or type(ms) is not int
            or type(event_id) is not str
            or not event_id
            or event_id.isspace()
            or (attributes is not None and type(attributes) is not dict)
            or not (
                total is None
                or type(total) is float
                or (type(total) is int and -MAX_EXACT_INT < total < MAX_EXACT_INT)
            )
        ):
            _map_one(mapper, index, raw, user, platform)
            continue

        # A single user's events tend to repeat their attributes: what they come to is
        # memoised per batch under the attributes themselves (names, values and types,
        # in order, as True == 1 == 1.0 in Python but they are sent differently).
        memo_key: tuple[Any, ...] | None = None
        memoised = None
        if memo is not None:
            if attributes:
                values = attributes.values()
                memo_key = (action, name, *attributes, *values, *map(type, values))
            else:
                memo_key = (action, name)
            try:
                memoised = memo.get(memo_key)
            except TypeError:  # an unhashable value (an object or a list): not memoised
                memo_key = None
        if memoised is not None:
            plan, entries, skipped = memoised
        else:
            # customData in payload order; reserved attributes (first of each name)
            # apart, into the plan key: everything else the event's Amazon fields depend
            # on, with their types too.
            entries = []
            room = MAX_CUSTOM_DATA
            skipped = 0
            plan_key: tuple[Any, ...] = (action, name)
            reserved: set[str] | None = None
            if attributes:
                for key, value in attributes.items():
                    try:
                        lowered = reserved_by_name[key]
                    except KeyError:
                        lowered = reserved_name(key)
                    if lowered is None:
                        if room and isinstance(value, _SCALARS):
                            if value or type(value) is not float:
                                entry = custom_entry(key, value)
                            else:  # 0.0 or -0.0, which the cache does not tell apart
                                entry = fresh_custom_entry(key, value)
                            if entry is not SKIPPED_ENTRY:
                                entries.append(entry)
                                room -= 1
                                continue
                        skipped += 1
                    elif reserved is None or lowered not in reserved:
                        reserved = {lowered} if reserved is None else reserved | {lowered}
                        plan_key += (lowered, type(value), value)
            try:
                known = plans.get(plan_key)
            except TypeError:  # an unhashable reserved value (an object as tcf)
                _map_one(mapper, index, raw, user, platform)
                continue
            if known is None:
                try:
                    canonical = mparticle.canonical_event(index, raw, user, platform)
                except InvalidEventError:  # not expected after the checks above
                    _map_one(mapper, index, raw, user, platform)
                    continue
                known = plans[plan_key] = mapper.plan(canonical)
            plan = known
            if memo is not None:
                memo_misses += 1
                # 0.0 == -0.0 but they are sent as "0.0" and "-0.0": not memoised.
                if memo_key is not None and not (
                    attributes and any(type(v) is float and not v for v in attributes.values())
                ):
                    memo[memo_key] = (plan, entries, skipped)
                if memo_misses >= MEMO_TRIAL and memo_misses * 2 > index + 1:
                    memo = None  # mostly distinct attributes: the memo would only cost
        conversion_drop, user_drop, description, country, keys, consent, purchase, ldu = plan

        # mapping.md §9: the first drop reason in order.
        if conversion_drop is not None:
            drop(index, conversion_drop)
            continue
        if ms < oldest_ms:
            drop(index, "too_old")
            continue
        if ms > newest_ms:
            drop(index, "in_future")
            continue
        if user_drop is not None:
            drop(index, user_drop)
            continue

        # Whole quantities summed as ints; no quantity sums to 0, omitted like the
        # reference's None. Anything else (fractions, odd spellings) takes the reference.
        units = 0
        if purchase:
            products = product_action.get("products")
            odd = False
            if isinstance(products, list):
                for product in products:
                    if type(product) is dict:
                        quantity = product.get("quantity")
                        if type(quantity) is int:
                            units += quantity
                        elif type(quantity) is str and quantity.isdigit() and quantity.isascii():
                            units += int(quantity)
                        elif quantity is not None:
                            odd = True
                            break
                    elif isinstance(product, dict):
                        odd = True
                        break
            if odd:
                _map_one(mapper, index, raw, user, platform)
                continue

        second, millis = divmod(ms, 1000)  # event_time_text, inline
        hour, second_of_hour = divmod(second, 3600)
        if hour != last_hour:  # a batch's events mostly share their hour
            last_hour, hour_prefix = hour, hour_text(hour)
        amazon_event: dict[str, Any] = {
            "eventDescription": description,
            "countryCode": country,
            "matchKeys": keys,
            "eventTime": hour_prefix + MINUTE_SECOND[second_of_hour] + MILLIS[millis],
            "eventId": event_id[:MAX_TEXT],
        }
        if total is not None and not (purchase and total < 0):
            value = float_amount(total) if type(total) is float else total
            if value is not None:
                amazon_event["value"] = value
        if purchase:
            raw_currency = data.get("currency_code")
            try:  # a batch's events share a currency or two: normalised once each
                currency = currencies[raw_currency]
            except KeyError:
                currency = currencies[raw_currency] = currency_code(raw_currency)
            except TypeError:  # an unhashable value (an object) is no currency code
                currency = None
            if currency:
                amazon_event["currencyCode"] = currency
            if 1 <= units <= MAX_UNITS:
                amazon_event["unitsSold"] = units
        if entries:
            amazon_event["customData"] = entries
        if ldu:
            amazon_event["dataProcessingOptions"] = LIMITED_DATA_USE
        if consent:
            amazon_event["consent"] = consent
        if partner:
            amazon_event["partner"] = partner
        forwarded.append(amazon_event)
        indexes.append(index)
        custom_data_skipped += skipped
    mapper.custom_data_skipped += custom_data_skipped
    return mapper.result()


def _map_one(
    mapper: BatchMapper, index: int, raw: Any, user: UserContext, platform: Platform
) -> None:
    """One event through the adapter and the mapper proper (the reference path)."""
    try:
        event = mparticle.canonical_event(index, raw, user, platform)
    except InvalidEventError as problem:
        mapper.dropped.append(Dropped(index, "invalid_event", str(problem)))
        return
    mapper.add(event)
