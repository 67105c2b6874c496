"""The Amazon mapper: canonical events + output settings + now -> Events API requests.

A pure function (mapping.md): no I/O and no clock; ``now`` and the settings are
arguments. Work that depends only on the user (normalising and hashing identities)
is done once per user and country per batch and shared by that user's events.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any

from app.amazon import normalize
from app.amazon.settings import OutputSettings
from app.canonical import NO_SIGNALS, CanonicalEvent, Dropped, Platform, UserContext
from app.jsonutil import canonical_text
from app.rules import Conversion, resolve

# mapping.md §9: when several reasons apply, the first of this order wins.
DROP_REASONS = (
    "invalid_event",
    "not_commerce_event",
    "unmapped_event",
    "missing_action",
    "too_old",
    "in_future",
    "no_country_code",
    "no_match_key",
    "missing_consent",
    "consent_denied",
)

EVENT_SOURCE = {
    Platform.IOS: "IOS",
    Platform.ANDROID: "ANDROID",
    Platform.FIRE_TV: "FIRE_TV",
    Platform.WEB: "WEBSITE",
    Platform.OFFLINE: "OFFLINE",
}

MAX_EVENTS_PER_REQUEST = 500
MAX_TEXT = 256
MAX_CUSTOM_DATA = 13
MAX_MATCH_KEYS = 15
MAX_UNITS = 2**31 - 1  # Amazon's unitsSold is an int32
MAX_EXACT_INT = 2**53
FUTURE_TOLERANCE_MS = 3_600_000
PURCHASE = "OFF_AMAZON_PURCHASES"

_CUSTOM_NAME = re.compile(r"[A-Za-z0-9_]{1,256}")
_CENT = Decimal("0.01")
_ONE = Decimal(1)
_WIDE = Context(prec=1000)  # rounding never fails for lack of digits


@dataclass(slots=True)
class MapResult:
    """Requests to send, each with the inbound index of every event it holds."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    index_maps: list[list[int]] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    custom_data_skipped: int = 0

    @property
    def forwarded(self) -> int:
        return sum(len(indexes) for indexes in self.index_maps)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "dropped": [d.as_dict() for d in self.dropped]}


@functools.lru_cache(maxsize=8192)
def _second_text(second: int) -> str:
    t = time.gmtime(second)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
    )


_MILLIS = tuple(f"{i:03d}Z" for i in range(1000))


def event_time_text(ms: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ``, always three fraction digits, UTC."""
    second, millis = divmod(ms, 1000)
    return _second_text(second) + _MILLIS[millis]


def deterministic_event_id(connection_id: str, source_event: Any) -> str:
    """mapping.md §11: first 32 hex chars of SHA-256(connection id, newline, JSON)."""
    try:
        event_text = canonical_text(source_event)
    except RecursionError:  # nested deeper than json.dumps recurses (orjson parses 1024)
        event_text = _deep_canonical_text(source_event)
    text = connection_id + "\n" + event_text
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _deep_canonical_text(value: Any) -> str:
    """``canonical_text`` without recursion: the same text for JSON values of any depth."""
    parts: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Literal):
            parts.append(item.text)
        elif isinstance(item, dict):
            pending: list[Any] = [_Literal("{")]
            for i, key in enumerate(sorted(item)):
                prefix = "," if i else ""
                pending += [_Literal(prefix + canonical_text(key) + ":"), item[key]]
            stack.extend(reversed([*pending, _Literal("}")]))
        elif isinstance(item, list | tuple):
            pending = [_Literal("[")]
            for i, element in enumerate(item):
                pending += [_Literal(",")] if i else []
                pending.append(element)
            stack.extend(reversed([*pending, _Literal("]")]))
        else:
            parts.append(canonical_text(item))
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class _Literal:
    text: str


def amount(value: Decimal) -> int | float | None:
    """Round half-up to cents and give a JSON number, or None if it cannot be one."""
    try:
        rounded = value.quantize(_CENT, rounding=ROUND_HALF_UP, context=_WIDE)
    except InvalidOperation:
        return None
    number = float(rounded)
    if number.is_integer() and abs(number) < MAX_EXACT_INT:
        return int(number)
    return number if abs(number) != float("inf") else None


def units_sold(units: Decimal) -> int | None:
    try:
        count = int(units.quantize(_ONE, rounding=ROUND_HALF_UP, context=_WIDE))
    except InvalidOperation:
        return None
    return count if 1 <= count <= MAX_UNITS else None


def custom_value(value: Any) -> str | None:
    """customData value text, or None for null/object/array (skipped)."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)[:MAX_TEXT]
    if isinstance(value, float):
        return repr(value)
    return None


@functools.lru_cache(maxsize=4096)
def custom_name_ok(name: str) -> bool:
    return _CUSTOM_NAME.fullmatch(name) is not None


_SKIP: dict[str, str] = {}


@functools.lru_cache(maxsize=16384, typed=True)  # typed: 1, 1.0 and True stay apart
def _entry(name: str, raw: str | int | float | bool) -> dict[str, str]:
    """One customData entry, or _SKIP. Cached: the same attribute recurs across events,
    and the entries are never mutated (Amazon requests are treated as immutable)."""
    value = custom_value(raw)
    if value is None or not custom_name_ok(name):
        return _SKIP
    return {"name": name, "value": value, "dataType": "STRING"}


def custom_data(attributes: Sequence[tuple[str, Any]]) -> tuple[list[dict[str, str]], int]:
    """The customData entries (≤ 13, payload order) and how many were skipped."""
    entries: list[dict[str, str]] = []
    skipped = 0
    for name, raw in attributes:
        if isinstance(raw, str | int | float) and len(entries) < MAX_CUSTOM_DATA:
            entry = _entry(name, raw)
        else:
            entry = _SKIP
        if entry is _SKIP:
            skipped += 1
        else:
            entries.append(entry)
    return entries, skipped


def _first(values: Sequence[str], key: Any) -> str | None:
    for raw in values:
        value: str | None = key(raw)
        if value:
            return value
    return None


_EXTENDED_FIELDS = (
    ("FIRST_NAME", "first_name"),
    ("LAST_NAME", "last_name"),
    ("ADDRESS", "address"),
    ("CITY", "city"),
    ("STATE", "state"),
    ("POSTAL", "postal"),
)


def match_keys(user: UserContext, country: str, extended: bool) -> list[dict[str, Any]]:
    """EMAIL, PHONE, MAID (then the extended keys), one value each, first usable."""
    ids = user.identities
    keys: list[dict[str, Any]] = []
    email = _first(ids.emails, normalize.email_key)
    if email:
        keys.append({"type": "EMAIL", "values": [email]})
    phone = _first(ids.phones, lambda raw: normalize.phone_key(raw, country))
    if phone:
        keys.append({"type": "PHONE", "values": [phone]})
    maid = _first(ids.maids, normalize.maid_key)
    if maid:
        keys.append({"type": "MAID", "values": [maid]})
    if extended:
        for key_type, attribute in _EXTENDED_FIELDS:
            raw = getattr(ids, attribute)
            value = normalize.extended_key(key_type, raw) if raw else None
            if value:
                keys.append({"type": key_type, "values": [value]})
        match_id = normalize.match_id_key(ids.match_id) if ids.match_id else None
        if match_id:
            keys.append({"type": "MATCH_ID", "values": [match_id]})
    return keys[:MAX_MATCH_KEYS]


def _country(event: CanonicalEvent) -> str | None:
    for raw in event.countries:
        code = normalize.country_code(raw)
        if code:
            return code
    for raw in event.user.countries:
        code = normalize.country_code(raw)
        if code:
            return code
    return None


def _consent(event: CanonicalEvent, settings: OutputSettings) -> dict[str, Any]:
    signals = event.consent
    state = event.user.consent
    user_data = normalize.consent_status(signals.user_data)
    ad_storage = normalize.consent_status(signals.ad_storage)
    derived: str | None = None
    derived_ads: str | None = None
    if state.ccpa_opted_out:
        derived = derived_ads = "DENIED"
    else:
        purpose = settings.consent_purpose_user_data.lower()
        if purpose and purpose in state.gdpr:
            derived = "GRANTED" if state.gdpr[purpose] else "DENIED"
        purpose = settings.consent_purpose_ad_storage.lower()
        if purpose and purpose in state.gdpr:
            derived_ads = "GRANTED" if state.gdpr[purpose] else "DENIED"
        category = settings.consent_category_advertising
        if category and state.categories is not None:
            # Segment's rule: a category missing from the preferences is not granted.
            granted = "GRANTED" if state.categories.get(category, False) else "DENIED"
            derived = derived or granted
            derived_ads = derived_ads or granted
    user_data = user_data or derived
    ad_storage = ad_storage or derived_ads
    consent: dict[str, Any] = {}
    ip = normalize.ip_address(event.user.ip)
    if ip:
        consent["geo"] = {"ipAddress": ip}
    if user_data:
        amazon = {"amznUserData": user_data}
        if ad_storage:
            amazon["amznAdStorage"] = ad_storage
        consent["amazonConsent"] = amazon
    for key, raw in (("tcf", signals.tcf), ("gpp", signals.gpp)):
        if isinstance(raw, str) and raw.strip():
            consent[key] = raw
    return consent


def map_events(
    events: Sequence[CanonicalEvent],
    *,
    source: str,
    settings: OutputSettings,
    now: datetime,
    rejects: Sequence[Dropped] = (),
) -> MapResult:
    """Map one inbound batch. ``rejects`` are the adapter's invalid_event drops."""
    result = MapResult(dropped=list(rejects))
    now_ms = int(now.timestamp() * 1000)
    oldest_ms = now_ms - settings.max_event_age_hours * 3_600_000
    newest_ms = now_ms + FUTURE_TOLERANCE_MS
    now_text = event_time_text(now_ms)
    extended = settings.match_keys == "extended"
    eu = settings.region == "EU"
    require_granted = settings.consent_mode == "require_granted"
    rules = settings.conversion_rules
    defaults = settings.default_rules
    data_set_name = settings.data_set_name
    partner = settings.partner_name
    advertiser_id = settings.advertiser_id
    # Per-user work is shared by that user's events in this batch (identity of the
    # UserContext object, which the adapter shares between them).
    keys_by_user: dict[tuple[int, str], list[dict[str, Any]]] = {}
    consent_by_user: dict[Any, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    out_index: list[int] = []
    drop = result.dropped.append

    # Per-batch memo tables: values that recur across the events of a batch are worked
    # out once. Keys hold everything the memoised result depends on.
    conversions: dict[tuple[Any, ...], Conversion | str] = {}
    countries: dict[tuple[Any, ...], str | None] = {}
    descriptions: dict[tuple[Any, ...], dict[str, str]] = {}

    for event in events:
        if event.advertiser_id and advertiser_id and event.advertiser_id != advertiser_id:
            drop(Dropped(event.index, "invalid_event", "advertiser_id is not this output's"))
            continue
        rule_key = (event.kind, event.name, event.action, event.conversion_type)
        conversion = conversions.get(rule_key)
        if conversion is None:
            conversion = conversions[rule_key] = resolve(event, source, rules, defaults)
        if not isinstance(conversion, Conversion):
            drop(Dropped(event.index, conversion))
            continue
        ms = event.time_ms
        if ms is not None:
            if ms < oldest_ms:
                drop(Dropped(event.index, "too_old"))
                continue
            if ms > newest_ms:
                drop(Dropped(event.index, "in_future"))
                continue
        user = event.user
        try:
            country_key: tuple[Any, ...] = (id(user), *event.countries)
            country = (
                countries[country_key]
                if country_key in countries
                else countries.setdefault(country_key, _country(event))
            )
        except TypeError:  # an unhashable country value (an object): computed uncached
            country = _country(event)
        if country is None:
            drop(Dropped(event.index, "no_country_code"))
            continue
        cache_key = (id(user), country)
        keys = keys_by_user.get(cache_key)
        if keys is None:
            keys = keys_by_user[cache_key] = match_keys(user, country, extended)
        if not keys:
            drop(Dropped(event.index, "no_match_key"))
            continue
        signals = event.consent
        consent_key: tuple[Any, ...] | None
        if signals is NO_SIGNALS:
            consent_key = (id(user),)
        else:
            # Types are part of the key: True == 1 == 1.0 in Python, but they normalise
            # differently (1.0 is no consent spelling).
            consent_key = (
                id(user),
                *(
                    (type(raw), raw)
                    for raw in (signals.user_data, signals.ad_storage, signals.tcf, signals.gpp)
                ),
            )
        try:
            consent = consent_by_user.get(consent_key)
        except TypeError:  # an unhashable signal (an object sent as tcf): no caching
            consent_key, consent = None, None
        if consent is None:
            consent = _consent(event, settings)
            if consent_key is not None:
                consent_by_user[consent_key] = consent
        if eu and not consent:
            drop(Dropped(event.index, "missing_consent"))
            continue
        if require_granted and consent.get("amazonConsent", {}).get("amznUserData") != "GRANTED":
            drop(Dropped(event.index, "consent_denied"))
            continue

        conversion_type = conversion.conversion_type
        set_name = conversion.data_set_name or event.data_set_name or data_set_name
        description_key = (conversion, event.platform, set_name)
        description = descriptions.get(description_key)
        if description is None:
            description = descriptions[description_key] = {
                "conversionType": conversion_type,
                "eventSource": EVENT_SOURCE[event.platform],
                "name": conversion.name,
                "eventIngestionMethod": "SERVER_TO_SERVER",
            }
            if set_name:
                description["dataSetName"] = set_name
        amazon_event: dict[str, Any] = {
            "eventDescription": description,
            "countryCode": country,
            "matchKeys": keys,
            "eventTime": event_time_text(ms) if ms is not None else now_text,
            "eventId": (
                event.event_id[:MAX_TEXT]
                if event.event_id
                else deterministic_event_id(settings.connection_id, event.source_event)
            ),
        }
        is_purchase = conversion_type == PURCHASE
        raw_value = event.purchase_value if is_purchase else event.value
        if raw_value is not None and not (is_purchase and raw_value < 0):
            value = amount(raw_value)
            if value is not None:
                amazon_event["value"] = value
        if is_purchase:
            currency = normalize.currency_code(event.currency)
            if currency:
                amazon_event["currencyCode"] = currency
            if event.units is not None:
                units = units_sold(event.units)
                if units is not None:
                    amazon_event["unitsSold"] = units
        if event.attributes:
            entries, skipped = custom_data(event.attributes)
            result.custom_data_skipped += skipped
            if entries:
                amazon_event["customData"] = entries
        if event.limited_data_use:
            amazon_event["dataProcessingOptions"] = {"options": "LIMITED_DATA_USE"}
        if consent:
            amazon_event["consent"] = consent
        if partner:
            amazon_event["partner"] = partner
        out.append(amazon_event)
        out_index.append(event.index)

    for start in range(0, len(out), MAX_EVENTS_PER_REQUEST):
        result.requests.append({"events": out[start : start + MAX_EVENTS_PER_REQUEST]})
        result.index_maps.append(out_index[start : start + MAX_EVENTS_PER_REQUEST])
    result.dropped.sort(key=lambda d: d.index)
    return result
