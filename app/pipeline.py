"""Orchestration of the pure steps: decode -> adapter -> mapper.

Shared by ``relay map``, the preview route and ingest, so all three give the same
answer for the same payload.

mParticle batches, the relay's volume, and flat records (``relay upload``'s files)
each take a fused lane: the adapter's reading of
the batch and the mapper's writing of Amazon events in one pass, without a canonical
event per inbound event. It handles the common shape only (a commerce event whose
fields have their usual JSON types) and gives every other event to the adapter and
mapper proper, which stay the reference: the fused lane's answer is theirs, byte for
byte (the mapping contract tests run through it).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from app.amazon import normalize
from app.amazon.mapping import (
    LIMITED_DATA_USE,
    MAX_CUSTOM_DATA,
    MAX_EXACT_INT,
    MAX_TEXT,
    MAX_UNITS,
    MILLIS,
    MINUTE_SECOND,
    PURCHASE,
    SKIPPED_ENTRY,
    BatchMapper,
    MapResult,
    Plan,
    amount,
    consent_object,
    custom_entry,
    deterministic_event_id,
    event_time_text,
    float_amount,
    fresh_custom_entry,
    hour_text,
    map_events,
    units_sold,
)
from app.amazon.settings import OutputSettings
from app.canonical import CanonicalEvent, Dropped, Platform, UserContext
from app.rules import Conversion
from app.sources import adapter, mparticle, records
from app.sources.base import InvalidEventError
from app.values import parse_decimal, parse_time_ms


def output_settings(raw: Mapping[str, Any]) -> OutputSettings:
    return OutputSettings.from_mapping(raw)


def map_parsed(payload: Any, source: str, *, settings: OutputSettings, now: datetime) -> MapResult:
    if source == mparticle.NAME:
        return map_mparticle(payload, settings=settings, now=now)
    if source == records.NAME:
        return map_records(payload, settings=settings, now=now)
    parsed = adapter(source).parse(payload)
    return map_events(
        parsed.events, source=source, settings=settings, now=now, rejects=parsed.rejects
    )


@dataclass(slots=True)
class PreparedBatch:
    """An inbound batch mapped and ready to queue (``app.ingest.store_batch``): the JSON
    body of each Events API request with the inbound index of each of its events, and
    the drops. Plain data, so that it can be made in another process."""

    bodies: list[bytes]
    index_maps: list[list[int]]
    dropped: list[dict[str, Any]]
    forwarded: int
    custom_data_skipped: int
    drop_reasons: Counter[str]


def prepare_batch(
    payload: Any, source: str, *, settings: OutputSettings, now: datetime
) -> PreparedBatch:
    """``map_parsed`` with each request serialised (pure: ``relay upload`` runs it in a
    worker process while its own process reads the file and writes to the database)."""
    result = map_parsed(payload, source, settings=settings, now=now)
    return PreparedBatch(
        bodies=[orjson.dumps(request) for request in result.requests],
        index_maps=result.index_maps,
        dropped=[d.as_dict() for d in result.dropped],
        forwarded=result.forwarded,
        custom_data_skipped=result.custom_data_skipped,
        drop_reasons=Counter(d.reason for d in result.dropped),
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


# --- the records lane -----------------------------------------------------------------

# The columns the records adapter reads (app/sources/records.py), in this order in a
# column layout; any other column only counts towards the deterministic eventId.
RECORD_FIELDS = (
    "event_type",
    "event_name",
    "event_source",
    "event_time",
    "event_value",
    "units_sold",
    "currency",
    "country_code",
    "email",
    "user_id",
    "phone",
    "maid",
    "ip_address",
    "event_id",
    "advertiser_id",
    "data_processing_options",
)
_TEXT_TYPES = frozenset({str, type(None)})
# Plain numbers whose reading by the reference path is known without a Decimal: a
# non-negative amount with at most two decimals is already in cents (float() of its
# text is the reference's float of the same exact number); a whole count or epoch ms.
_PLAIN_AMOUNT = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,2})?")
_PLAIN_COUNT = re.compile(r"[0-9]{1,9}")
_PLAIN_MS = re.compile(r"[0-9]{1,18}")
_NO_PLAN: Any = object()  # a plan key whose event_source the adapter refuses


def _record_layout(keys: tuple[Any, ...]) -> tuple[int, ...] | None:
    """Where each of RECORD_FIELDS is among a record's values (-1: absent), or None
    when the lane cannot read records with these keys (a key that is not text, a
    column named twice, which the adapter resolves value by value)."""
    if None in keys:
        return None
    try:
        names = records.column_names(keys)
    except InvalidEventError:
        return None
    positions = {}
    for position, name in enumerate(names):
        if name in positions:
            if name in RECORD_FIELDS:
                return None
            continue
        positions[name] = position
    return tuple(positions.get(name, -1) for name in RECORD_FIELDS)


def map_records(payload: Any, *, settings: OutputSettings, now: datetime) -> MapResult:
    """``map_events(records.ADAPTER.parse(payload))``, in one pass per record.

    The common record (a dict whose values are all text or null, as CSV rows are) is
    read straight from its columns: what depends only on its event_type, event_name
    and event_source (the conversion or its drop reason, eventDescription) is planned
    once per batch through the adapter and the mapper, and consent once per distinct
    ip_address; the rest (time, value, units, currency, country, match keys, eventId)
    goes through the mapper's own normalisation functions. Any other record, and any
    record the adapter would refuse or the mapper drop as invalid_event, goes through
    the adapter and mapper proper, which stay the reference.
    """
    rows = records.batch_records(payload)
    mapper = BatchMapper(source=records.NAME, settings=settings, now=now)
    # The reference path's events stay referenced until the batch is mapped: the mapper
    # memoises users by id() and a freed event's id could be reused by the next one.
    kept: list[CanonicalEvent] = []
    plans: dict[tuple[str | None, str | None, str | None], Any] = {}
    consents: dict[str | None, dict[str, Any]] = {}
    countries: dict[str | None, str | None] = {}
    currencies: dict[str | None, str | None] = {}
    oldest_ms, newest_ms, now_text = mapper.oldest_ms, mapper.newest_ms, mapper.now_text
    partner, extended = settings.partner_name, settings.match_keys == "extended"
    eu, require_granted = settings.region == "EU", settings.consent_mode == "require_granted"
    advertiser = settings.advertiser_id
    try:
        id_prefix: bytes | None = (settings.connection_id + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the reference's text, and its error
        id_prefix = None
    forwarded, indexes, drop = mapper.events, mapper.indexes, mapper.drop
    # A file's emails are mostly distinct: the normalisation's cache would only cost here
    # (an insertion per row, and memory); phone numbers and countries do repeat.
    email_key = normalize.email_key.__wrapped__
    phone_key, maid_key = normalize.phone_key, normalize.maid_key
    plain_amount, plain_count, plain_ms = (
        _PLAIN_AMOUNT.fullmatch,
        _PLAIN_COUNT.fullmatch,
        _PLAIN_MS.fullmatch,
    )
    hex64 = records.HEX64.fullmatch
    text_types = _TEXT_TYPES
    sha256, dumps, sort_keys = hashlib.sha256, orjson.dumps, orjson.OPT_SORT_KEYS
    last_keys: tuple[Any, ...] | None = None
    layout: tuple[int, ...] | None = None

    for index, raw in enumerate(rows):
        if type(raw) is not dict:
            _map_record(mapper, index, raw, kept)
            continue
        keys = tuple(raw)
        if keys != last_keys:  # a file's records mostly share their columns
            last_keys, layout = keys, _record_layout(keys)
        values = (*raw.values(), None)  # position -1: an absent column reads None
        if layout is None or not set(map(type, values)) <= text_types:
            _map_record(mapper, index, raw, kept)
            continue
        (
            at_type,
            at_name,
            at_source,
            at_time,
            at_value,
            at_units,
            at_currency,
            at_country,
            at_email,
            at_user_id,
            at_phone,
            at_maid,
            at_ip,
            at_event_id,
            at_advertiser,
            at_ldu,
        ) = layout
        # The adapter reads "" as an absent column.
        event_type = values[at_type] or None
        event_name = values[at_name] or None
        event_source = values[at_source] or None
        plan_key = (event_type, event_name, event_source)
        plan = plans.get(plan_key)
        if plan is None:
            plan = plans[plan_key] = _record_plan(mapper, plan_key)
        if plan is _NO_PLAN:
            _map_record(mapper, index, raw, kept)
            continue
        raw_advertiser = values[at_advertiser]
        if raw_advertiser and advertiser and raw_advertiser != advertiser:
            _map_record(mapper, index, raw, kept)  # the reference drops it, with a detail
            continue

        # The columns the adapter parses; a value it refuses takes the reference path.
        raw_time = values[at_time]
        ms: int | None = None
        if raw_time:
            if plain_ms(raw_time):
                ms = int(raw_time)
            else:
                ms = parse_time_ms(raw_time)
                if ms is None:
                    _map_record(mapper, index, raw, kept)
                    continue
        raw_value = values[at_value]
        value: Any = None  # the value to send, None when there is none
        negative = False
        if raw_value:
            if plain_amount(raw_value):
                number = float(raw_value)
                value = int(number) if number.is_integer() else number
            else:
                exact = parse_decimal(raw_value)
                if exact is None:
                    _map_record(mapper, index, raw, kept)
                    continue
                negative = exact < 0
                value = amount(exact)
        raw_units = values[at_units]
        units: int | None = None
        if raw_units:
            if plain_count(raw_units):
                units = int(raw_units)
                if not 1 <= units <= MAX_UNITS:
                    units = None
            else:
                exact_units = parse_decimal(raw_units)
                if exact_units is None:
                    _map_record(mapper, index, raw, kept)
                    continue
                units = units_sold(exact_units)

        # mapping.md §9: the first drop reason in order.
        conversion_drop, description, purchase = plan
        if conversion_drop is not None:
            drop(index, conversion_drop)
            continue
        if ms is not None:
            if ms < oldest_ms:
                drop(index, "too_old")
                continue
            if ms > newest_ms:
                drop(index, "in_future")
                continue
        raw_country = values[at_country] or None
        try:
            country = countries[raw_country]
        except KeyError:
            country = countries[raw_country] = normalize.country_code(raw_country)
        if country is None:
            drop(index, "no_country_code")
            continue
        # match_keys() for a record's identities: EMAIL from email, else from a user_id
        # that is a pre-hashed email; PHONE; MAID; with extended keys, MATCH_ID from a
        # user_id that is not.
        match_keys: list[dict[str, Any]] = []
        email = values[at_email]
        user_id = values[at_user_id]
        hashed_email = None
        match_id = None
        if user_id and not user_id.isspace():
            if hex64(user_id.strip()):
                hashed_email = user_id
            else:
                match_id = user_id
        key = email_key(email) if email else None
        if not key and hashed_email is not None:
            key = email_key(hashed_email)
        if key:
            match_keys.append({"type": "EMAIL", "values": [key]})
        phone = values[at_phone]
        key = phone_key(phone, country) if phone else None
        if key:
            match_keys.append({"type": "PHONE", "values": [key]})
        maid = values[at_maid]
        key = maid_key(maid) if maid else None
        if key:
            match_keys.append({"type": "MAID", "values": [key]})
        if extended and match_id is not None:
            key = normalize.match_id_key(match_id)
            if key:
                match_keys.append({"type": "MATCH_ID", "values": [key]})
        if not match_keys:
            drop(index, "no_match_key")
            continue
        ip = values[at_ip] or None
        consent = consents.get(ip)
        if consent is None:
            consent = consents[ip] = _record_consent(mapper, ip)
        if eu and not consent:
            drop(index, "missing_consent")
            continue
        if require_granted and consent.get("amazonConsent", {}).get("amznUserData") != "GRANTED":
            drop(index, "consent_denied")
            continue

        event_id = values[at_event_id]
        if event_id and not event_id.isspace():
            event_id = event_id[:MAX_TEXT]
        else:
            # deterministic_event_id: orjson writes the standard library's sorted text
            # for text values and keys when the text is printable ASCII.
            try:
                text = dumps(raw, option=sort_keys)
            except orjson.JSONEncodeError:  # a lone surrogate: the standard library's text
                text = b"\x80"
            if id_prefix is not None and text.isascii() and b"\x7f" not in text:
                event_id = sha256(id_prefix + text).hexdigest()[:32]
            else:
                event_id = deterministic_event_id(settings.connection_id, raw)
        amazon_event: dict[str, Any] = {
            "eventDescription": description,
            "countryCode": country,
            "matchKeys": match_keys,
            "eventTime": event_time_text(ms) if ms is not None else now_text,
            "eventId": event_id,
        }
        if value is not None and not (purchase and negative):
            amazon_event["value"] = value
        if purchase:
            raw_currency = values[at_currency] or None
            try:
                currency = currencies[raw_currency]
            except KeyError:
                currency = currencies[raw_currency] = normalize.currency_code(raw_currency)
            if currency:
                amazon_event["currencyCode"] = currency
            if units is not None:
                amazon_event["unitsSold"] = units
        if values[at_ldu] == "LIMITED_DATA_USE":
            amazon_event["dataProcessingOptions"] = LIMITED_DATA_USE
        if consent:
            amazon_event["consent"] = consent
        if partner:
            amazon_event["partner"] = partner
        forwarded.append(amazon_event)
        indexes.append(index)
    return mapper.result()


def _record_plan(
    mapper: BatchMapper, key: tuple[str | None, str | None, str | None]
) -> tuple[str | None, dict[str, str], bool] | Any:
    """(conversion drop reason, eventDescription, is a purchase) for records with
    these event_type, event_name and event_source, through the adapter and the mapper."""
    columns = dict(zip(("event_type", "event_name", "event_source"), key, strict=True))
    try:
        event = records.record_event(0, {k: v for k, v in columns.items() if v is not None})
    except InvalidEventError:
        return _NO_PLAN
    conversion = mapper.conversion(event)
    if not isinstance(conversion, Conversion):
        return (conversion, {}, False)
    purchase = conversion.conversion_type == PURCHASE
    return (None, mapper.description(conversion, event), purchase)


def _record_consent(mapper: BatchMapper, ip: str | None) -> dict[str, Any]:
    """The consent object of a record with this ip_address (records carry no consent
    values of their own), from the mapper's reading of such a record."""
    event = records.record_event(0, {} if ip is None else {"ip_address": ip})
    return consent_object(event, mapper.settings)


def _map_record(mapper: BatchMapper, index: int, raw: Any, kept: list[CanonicalEvent]) -> None:
    """One record through the adapter and the mapper proper (the reference path)."""
    try:
        event = records.record_event(index, raw)
    except InvalidEventError as problem:
        mapper.dropped.append(Dropped(index, "invalid_event", str(problem)))
        return
    kept.append(event)
    mapper.add(event)
