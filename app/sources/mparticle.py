"""mParticle batches, inbound (Events API v2) and outbound (Webhook/S3) dialects.

Lenient as mParticle's own senders are (sources.md): numbers as strings, int64 ids,
identities as a map or a list, unknown keys, case drift in enum-like values.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from app.canonical import (
    NO_SIGNALS,
    CanonicalEvent,
    ConsentSignals,
    ConsentState,
    Dropped,
    EventKind,
    Identities,
    ParsedBatch,
    Platform,
    UserContext,
)
from app.errors import PayloadError
from app.sources.base import InvalidEventError, decode_json
from app.values import (
    decimal_sum,
    first_key,
    nonblank,
    parse_decimal,
    parse_epoch_ms,
    text_of,
)

NAME = "mparticle"

# mapping.md §4, compared after lowercasing and removing '_', '-' and spaces.
PLATFORMS = {
    "ios": Platform.IOS,
    "tvos": Platform.IOS,
    "unityios": Platform.IOS,
    "android": Platform.ANDROID,
    "unityandroid": Platform.ANDROID,
    "firetv": Platform.FIRE_TV,
    "web": Platform.WEB,
    "mobileweb": Platform.WEB,
}

# Identity keys (lowercased) -> which canonical list they feed, in priority order.
_PHONE_KEYS = ("mobile_number", "phone_number_2", "phone_number_3")
_MATCH_ID_KEYS = ("customer_id", "customerid")
_MAID_KEYS = ("ios_advertising_id", "android_advertising_id", "fire_advertising_id")
_EXTENDED_ATTRIBUTES = (
    ("first_name", "$firstname"),
    ("last_name", "$lastname"),
    ("address", "$address"),
    ("city", "$city"),
    ("state", "$state"),
    ("postal", "$zip"),
)
# mapping.md §3: never forwarded as customData (matched case-insensitively).
RESERVED_ATTRIBUTES = frozenset(
    {
        "country_code",
        "data_processing_options",
        "conversion_definition_id",
        "tcf",
        "gpp",
        "amzn_user_data",
        "amzn_ad_storage",
    }
)


def _platform(value: Any) -> Platform:
    if not isinstance(value, str):
        return Platform.OFFLINE
    key = value.lower().replace("_", "").replace("-", "").replace(" ", "")
    return PLATFORMS.get(key, Platform.OFFLINE)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _identity_pairs(raw: Any) -> list[tuple[str, Any]]:
    """(identity type lowercased, value) in payload order, from either dialect."""
    if isinstance(raw, dict):
        return [(key.lower(), value) for key, value in raw.items()]
    pairs = []
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict) and isinstance(item.get("identity_type"), str):
                pairs.append((item["identity_type"].lower(), item.get("identity")))
    return pairs


def _identities(batch: dict[str, Any], device: dict[str, Any]) -> Identities:
    emails: list[str] = []
    phones: dict[str, list[str]] = {key: [] for key in _PHONE_KEYS}
    match_id: str | None = None
    for kind, value in _identity_pairs(batch.get("user_identities")):
        if kind == "email" and isinstance(value, str):
            emails.append(value)
        elif kind in phones:
            text = text_of(value)
            if text:
                phones[kind].append(text)
        elif kind in _MATCH_ID_KEYS and match_id is None:
            match_id = nonblank(value)
    attributes = _dict(batch.get("user_attributes"))
    # first_key for each attribute, with the keys case-folded once instead of per field.
    folded: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(key, str):
            folded.setdefault(key.lower(), value)
    extended = {
        field: nonblank(attributes[key] if key in attributes else folded.get(key))
        for field, key in _EXTENDED_ATTRIBUTES
    }
    return Identities(
        emails=tuple(emails),
        phones=tuple(phone for key in _PHONE_KEYS for phone in phones[key]),
        maids=tuple(v for key in _MAID_KEYS if isinstance(v := device.get(key), str)),
        match_id=match_id,
        **extended,
    )


def _consent_state(raw: Any) -> ConsentState:
    state = _dict(raw)
    ccpa = _dict(first_key(_dict(state.get("ccpa")), "data_sale_opt_out"))
    gdpr = {
        purpose.lower(): consented
        for purpose, detail in _dict(state.get("gdpr")).items()
        if isinstance(consented := _dict(detail).get("consented"), bool)
    }
    return ConsentState(ccpa_opted_out=ccpa.get("consented") is True, gdpr=gdpr)


def batch_user(batch: dict[str, Any]) -> tuple[UserContext, Platform]:
    """The user every event of the batch shares, and the platform of its device."""
    device = _dict(batch.get("device_info"))
    platform = _platform(device.get("platform"))
    if platform is Platform.OFFLINE:
        platform = _platform(_dict(batch.get("application_info")).get("os"))
    user = UserContext(
        identities=_identities(batch, device),
        ip=batch.get("ip") if isinstance(batch.get("ip"), str) else None,
        consent=_consent_state(batch.get("consent_state")),
        countries=(
            device.get("device_country"),
            device.get("locale_country"),
            first_key(_dict(batch.get("user_attributes")), "$country"),
        ),
    )
    return user, platform


def _units(products: Any) -> Decimal | None:
    if not isinstance(products, list):
        return None
    # Whole-number quantities (the usual case) are summed as ints, the rest exactly.
    whole, found = 0, False
    others: list[Decimal] = []
    for product in products:
        if isinstance(product, dict):
            quantity = product.get("quantity")
            if type(quantity) is int:
                whole += quantity
                found = True
            elif type(quantity) is str and quantity.isdigit() and quantity.isascii():
                whole += int(quantity)  # "2": the other common spelling
                found = True
            elif quantity is not None and (number := parse_decimal(quantity)) is not None:
                others.append(number)
    if not others:
        return Decimal(whole) if found else None
    return decimal_sum([Decimal(whole), *others] if found else others)


# Keys already seen -> the reserved attribute they name, or None (read directly by the
# fused lane in app.pipeline; reserved_name fills it).
RESERVED_BY_NAME: dict[str, str | None] = {}


def reserved_name(key: str) -> str | None:
    """The reserved attribute a key names (any case), or None; memoised per key."""
    found = RESERVED_BY_NAME.get(key, "")
    if found == "":
        lowered = key.lower()
        found = lowered if lowered in RESERVED_ATTRIBUTES else None
        if len(RESERVED_BY_NAME) < 65536:
            RESERVED_BY_NAME[key] = found
    return found


def canonical_event(index: int, raw: Any, user: UserContext, platform: Platform) -> CanonicalEvent:
    """One inbound event; raises InvalidEventError when a field has the wrong type."""
    if not isinstance(raw, dict):
        raise InvalidEventError("event is not an object")
    data = raw.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidEventError("data is not an object")
    action: str | None = None
    value = units = None
    product_action = data.get("product_action")
    if product_action is not None:
        if not isinstance(product_action, dict):
            raise InvalidEventError("product_action is not an object")
        action = text_of(product_action.get("action")) or ""
        value = parse_decimal(product_action.get("total_amount"))
        units = _units(product_action.get("products"))
    time_ms = None
    if data.get("timestamp_unixtime_ms") is not None:
        time_ms = parse_epoch_ms(data["timestamp_unixtime_ms"])
        if time_ms is None:
            raise InvalidEventError("timestamp_unixtime_ms is not a number")
    attributes = data.get("custom_attributes")
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise InvalidEventError("custom_attributes is not an object")
    regular: list[tuple[str, Any]] = []
    reserved: dict[str, Any] = {}
    for key, attribute in attributes.items():
        lowered = reserved_name(key)
        if lowered is None:
            regular.append((key, attribute))
        elif lowered not in reserved:
            reserved[lowered] = attribute
    event_id = data.get("event_id")
    if type(event_id) is not str or not event_id or event_id.isspace():
        event_id = nonblank(event_id) or nonblank(data.get("source_message_id"))
    name = data.get("event_name")
    currency = data.get("currency_code")
    return CanonicalEvent(
        index=index,
        kind=EventKind.COMMERCE if product_action is not None else EventKind.CUSTOM,
        user=user,
        source_event=raw,
        name=name if type(name) is str else text_of(name),
        action=action,
        time_ms=time_ms,
        event_id=event_id,
        value=value,
        purchase_value=value,
        currency=currency if type(currency) is str else None,
        units=units,
        platform=platform,
        countries=(reserved["country_code"],) if "country_code" in reserved else (),
        attributes=tuple(regular),
        consent=ConsentSignals(
            user_data=reserved.get("amzn_user_data"),
            ad_storage=reserved.get("amzn_ad_storage"),
            tcf=reserved.get("tcf"),
            gpp=reserved.get("gpp"),
        )
        if reserved
        else NO_SIGNALS,
        limited_data_use=reserved.get("data_processing_options") == "LIMITED_DATA_USE",
    )


def batch_events(payload: Any) -> list[Any]:
    """The inbound events of a batch; raises PayloadError when it is not a batch."""
    if not isinstance(payload, dict):
        raise PayloadError("batch must be a JSON object")
    events = payload.get("events")
    if events is None:
        return []  # a batch with only user data carries no conversions
    if not isinstance(events, list):
        raise PayloadError("events must be a list")
    return events


class MParticleAdapter:
    name = NAME

    def decode(self, body: bytes, content_type: str | None = None) -> Any:
        return decode_json(body)  # orjson unless the body may hold a >64-bit integer

    def parse(self, payload: Any) -> ParsedBatch:
        events = batch_events(payload)
        user, platform = batch_user(payload)
        parsed = ParsedBatch()
        for index, raw in enumerate(events):
            try:
                parsed.events.append(canonical_event(index, raw, user, platform))
            except InvalidEventError as problem:
                parsed.rejects.append(Dropped(index, "invalid_event", str(problem)))
        return parsed


ADAPTER = MParticleAdapter()
