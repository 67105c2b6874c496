"""The Amazon mapper: canonical events + output settings + now -> Events API requests.

A pure function (mapping.md): no I/O and no clock; ``now`` and the settings are
arguments. Work that depends only on the user (normalising and hashing identities)
is done once per user and country per batch and shared by that user's events.
"""

from __future__ import annotations

import functools
import hashlib
import math
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
from app.values import parse_decimal

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
def hour_text(hour: int) -> str:
    """``YYYY-MM-DDTHH:`` of an hour since the epoch (cached: a batch spans few hours)."""
    t = time.gmtime(hour * 3600)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:"


# "MM:SS." for every second of an hour and "mmmZ" for every millisecond: with the
# hour cached (events of a batch share a few hours, not seconds), an event time is
# two table lookups and two concatenations.
MINUTE_SECOND = tuple(f"{m:02d}:{s:02d}." for m in range(60) for s in range(60))
MILLIS = tuple(f"{i:03d}Z" for i in range(1000))


def event_time_text(ms: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ``, always three fraction digits, UTC."""
    second, millis = divmod(ms, 1000)
    hour, second_of_hour = divmod(second, 3600)
    return hour_text(hour) + MINUTE_SECOND[second_of_hour] + MILLIS[millis]


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


def float_amount(number: float) -> int | float | None:
    """``amount(parse_decimal(number))`` for a float, without building a Decimal.

    The rules round the float's shortest text (``repr``) half-up to cents. Below 1e7
    that is arithmetic on ``number * 100``, whose error (under 1e-7 cents) is far
    smaller than the distance to the nearest half cent unless the text itself ends in
    a half cent: away from half cents the nearest cent is the answer; near one, the
    half cent's own float decides. If ``number`` is that float, its shortest text is
    the half cent (no shorter text is that close) and rounds away from zero;
    otherwise the text lies on the same side of the half cent as ``number``. The
    cents give the float as the reference does: ``cents / 100`` is correctly rounded.
    """
    if -1e7 < number < 1e7:
        scaled = number * 100
        cents = round(scaled)
        if not -0.49 < scaled - cents < 0.49:  # near a half cent
            low = math.floor(scaled)
            half_cent = (2 * low + 1) / 200
            rounds_up = number > half_cent or (number == half_cent and number > 0)
            cents = low + 1 if rounds_up else low
        return cents / 100 if cents % 100 else cents // 100
    return _float_amount_from_text(number)


def _float_amount_from_text(number: float) -> int | float | None:
    """``float_amount`` for any float: half-up on the digits of its shortest text."""
    text = repr(number)
    dot = text.find(".")
    if dot < 0 or "e" in text:  # an exponent, inf or nan: the general path decides
        exact = parse_decimal(number)
        return None if exact is None else amount(exact)
    if len(text) - dot <= 3:  # at most two decimals: already in cents
        rounded = number
    else:
        negative = text[0] == "-"
        cents = int(text[negative:dot] + text[dot + 1 : dot + 3])
        if text[dot + 3] >= "5":  # half-up: a third decimal of 5 or more rounds away from 0
            cents += 1
        rounded = -cents / 100 if negative else cents / 100
    if rounded.is_integer() and abs(rounded) < MAX_EXACT_INT:
        return int(rounded)
    return rounded


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


SKIPPED_ENTRY: dict[str, str] = {}  # custom_entry's answer for an attribute not sent


def fresh_custom_entry(name: str, raw: str | int | float | bool) -> dict[str, str]:
    """One customData entry, or SKIPPED_ENTRY."""
    value = custom_value(raw)
    if value is None or not custom_name_ok(name):
        return SKIPPED_ENTRY
    return {"name": name, "value": value, "dataType": "STRING"}


# Cached: the same attribute recurs across events, and the entries are never mutated
# (Amazon requests are treated as immutable). typed: 1, 1.0 and True stay apart; but
# 0.0 == -0.0 whatever the types, and they are sent as "0.0" and "-0.0", so callers
# give float zeros to fresh_custom_entry instead.
custom_entry = functools.lru_cache(maxsize=16384, typed=True)(fresh_custom_entry)


_CUSTOM_SCALARS = (str, int, float)  # bool is an int: "true" / "false"


def custom_data(attributes: Sequence[tuple[str, Any]]) -> tuple[list[dict[str, str]], int]:
    """The customData entries (≤ 13, payload order) and how many were skipped."""
    entries: list[dict[str, str]] = []
    skipped = 0
    for name, raw in attributes:
        if isinstance(raw, _CUSTOM_SCALARS) and len(entries) < MAX_CUSTOM_DATA:
            if raw or type(raw) is not float:
                entry = custom_entry(name, raw)
            else:  # 0.0 or -0.0, which the cache does not tell apart
                entry = fresh_custom_entry(name, raw)
            if entry is not SKIPPED_ENTRY:
                entries.append(entry)
                continue
        skipped += 1
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


def consent_object(event: CanonicalEvent, settings: OutputSettings) -> dict[str, Any]:
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


# What an event's Amazon fields that do not vary per event come to, worked out once per
# batch for each distinct combination (see BatchMapper.plan):
# (conversion drop reason or None, user drop reason or None, eventDescription,
#  countryCode, matchKeys, consent, is a purchase, limited data use)
Plan = tuple[
    str | None,
    str | None,
    dict[str, str],
    str,
    list[dict[str, Any]],
    dict[str, Any],
    bool,
    bool,
]


class BatchMapper:
    """Maps the events of one inbound batch, in order.

    Everything that depends on the user, the settings or a value repeated across the
    batch (conversion rules, country, match keys, consent, eventDescription) is worked
    out once per distinct input and shared by the events that have it; the Amazon
    objects it yields are therefore shared between events and must not be mutated.
    ``add`` maps one canonical event; a source's fused lane (``app.pipeline``) uses
    ``plan``, ``forward`` and ``drop`` to map its common events without building them.
    """

    def __init__(
        self,
        *,
        source: str,
        settings: OutputSettings,
        now: datetime,
        rejects: Sequence[Dropped] = (),
    ) -> None:
        self.source = source
        self.settings = settings
        self.dropped: list[Dropped] = list(rejects)
        self.events: list[dict[str, Any]] = []
        self.indexes: list[int] = []
        self.custom_data_skipped = 0
        now_ms = int(now.timestamp() * 1000)
        self.oldest_ms = now_ms - settings.max_event_age_hours * 3_600_000
        self.newest_ms = now_ms + FUTURE_TOLERANCE_MS
        self.now_text = event_time_text(now_ms)
        self.partner = settings.partner_name
        self._extended = settings.match_keys == "extended"
        self._eu = settings.region == "EU"
        self._require_granted = settings.consent_mode == "require_granted"
        self._conversions: dict[tuple[Any, ...], Conversion | str] = {}
        self._users: dict[
            tuple[Any, ...], tuple[str, list[dict[str, Any]], dict[str, Any]] | str
        ] = {}
        self._keys: dict[tuple[int, str], list[dict[str, Any]]] = {}
        self._descriptions: dict[tuple[Any, ...], dict[str, str]] = {}

    def drop(self, index: int, reason: str) -> None:
        self.dropped.append(Dropped(index, reason))

    def forward(self, index: int, amazon_event: dict[str, Any]) -> None:
        self.events.append(amazon_event)
        self.indexes.append(index)

    def conversion(self, event: CanonicalEvent) -> Conversion | str:
        key = (event.kind, event.name, event.action, event.conversion_type)
        conversion = self._conversions.get(key)
        if conversion is None:
            conversion = self._conversions[key] = resolve(
                event, self.source, self.settings.conversion_rules, self.settings.default_rules
            )
        return conversion

    def user_fields(
        self, event: CanonicalEvent
    ) -> tuple[str, list[dict[str, Any]], dict[str, Any]] | str:
        """(countryCode, matchKeys, consent) for the event's user, or the drop reason."""
        signals = event.consent
        # The UserContext is compared by identity: the adapter shares one per user.
        key: tuple[Any, ...] = (id(event.user), event.countries)
        if signals is not NO_SIGNALS:
            # Types are part of the key: True == 1 == 1.0 in Python, but they normalise
            # differently (1.0 is no consent spelling).
            key += tuple(
                (type(raw), raw)
                for raw in (signals.user_data, signals.ad_storage, signals.tcf, signals.gpp)
            )
        try:
            fields = self._users.get(key)
        except TypeError:  # an unhashable value (an object sent as tcf): not memoised
            return self._user_fields(event)
        if fields is None:
            fields = self._users[key] = self._user_fields(event)
        return fields

    def _user_fields(
        self, event: CanonicalEvent
    ) -> tuple[str, list[dict[str, Any]], dict[str, Any]] | str:
        country = _country(event)
        if country is None:
            return "no_country_code"
        keys_key = (id(event.user), country)
        keys = self._keys.get(keys_key)
        if keys is None:
            keys = self._keys[keys_key] = match_keys(event.user, country, self._extended)
        if not keys:
            return "no_match_key"
        consent = consent_object(event, self.settings)
        if self._eu and not consent:
            return "missing_consent"
        if (
            self._require_granted
            and consent.get("amazonConsent", {}).get("amznUserData") != "GRANTED"
        ):
            return "consent_denied"
        return country, keys, consent

    def description(self, conversion: Conversion, event: CanonicalEvent) -> dict[str, str]:
        set_name = conversion.data_set_name or event.data_set_name or self.settings.data_set_name
        key = (conversion, event.platform, set_name)
        description = self._descriptions.get(key)
        if description is None:
            description = self._descriptions[key] = {
                "conversionType": conversion.conversion_type,
                "eventSource": EVENT_SOURCE[event.platform],
                "name": conversion.name,
                "eventIngestionMethod": "SERVER_TO_SERVER",
            }
            if set_name:
                description["dataSetName"] = set_name
        return description

    def plan(self, event: CanonicalEvent) -> Plan:
        """The fields ``event`` shares with every event of the batch that has the same
        user, platform, name, action and reserved attributes (a fused lane's memo)."""
        conversion = self.conversion(event)
        if not isinstance(conversion, Conversion):
            return (conversion, None, {}, "", [], {}, False, False)
        fields = self.user_fields(event)
        if isinstance(fields, str):
            return (None, fields, {}, "", [], {}, False, False)
        country, keys, consent = fields
        return (
            None,
            None,
            self.description(conversion, event),
            country,
            keys,
            consent,
            conversion.conversion_type == PURCHASE,
            event.limited_data_use,
        )

    def add(self, event: CanonicalEvent) -> None:
        """Map one canonical event: forward it or drop it with the first reason (§9)."""
        index = event.index
        advertiser_id = self.settings.advertiser_id
        if event.advertiser_id and advertiser_id and event.advertiser_id != advertiser_id:
            self.dropped.append(
                Dropped(index, "invalid_event", "advertiser_id is not this output's")
            )
            return
        conversion = self.conversion(event)
        if not isinstance(conversion, Conversion):
            self.drop(index, conversion)
            return
        ms = event.time_ms
        if ms is not None:
            if ms < self.oldest_ms:
                self.drop(index, "too_old")
                return
            if ms > self.newest_ms:
                self.drop(index, "in_future")
                return
        fields = self.user_fields(event)
        if isinstance(fields, str):
            self.drop(index, fields)
            return
        country, keys, consent = fields
        conversion_type = conversion.conversion_type
        amazon_event: dict[str, Any] = {
            "eventDescription": self.description(conversion, event),
            "countryCode": country,
            "matchKeys": keys,
            "eventTime": event_time_text(ms) if ms is not None else self.now_text,
            "eventId": (
                event.event_id[:MAX_TEXT]
                if event.event_id
                else deterministic_event_id(self.settings.connection_id, event.source_event)
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
            self.custom_data_skipped += skipped
            if entries:
                amazon_event["customData"] = entries
        if event.limited_data_use:
            amazon_event["dataProcessingOptions"] = LIMITED_DATA_USE
        if consent:
            amazon_event["consent"] = consent
        if self.partner:
            amazon_event["partner"] = self.partner
        self.forward(index, amazon_event)

    def result(self) -> MapResult:
        result = MapResult(dropped=self.dropped, custom_data_skipped=self.custom_data_skipped)
        for start in range(0, len(self.events), MAX_EVENTS_PER_REQUEST):
            end = start + MAX_EVENTS_PER_REQUEST
            result.requests.append({"events": self.events[start:end]})
            result.index_maps.append(self.indexes[start:end])
        result.dropped.sort(key=lambda d: d.index)
        return result


LIMITED_DATA_USE: dict[str, str] = {"options": "LIMITED_DATA_USE"}  # shared, never mutated


def map_events(
    events: Sequence[CanonicalEvent],
    *,
    source: str,
    settings: OutputSettings,
    now: datetime,
    rejects: Sequence[Dropped] = (),
) -> MapResult:
    """Map one inbound batch. ``rejects`` are the adapter's invalid_event drops."""
    mapper = BatchMapper(source=source, settings=settings, now=now, rejects=rejects)
    for event in events:
        mapper.add(event)
    return mapper.result()
