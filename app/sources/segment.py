"""Segment-spec messages: Segment, RudderStack, MetaRouter, analytics.js (sources.md).

Accepts one message, a ``{"batch": [...], "context": {...}}`` batch whose top-level
context and integrations are merged into each message (the message's own keys win),
or a bare array of messages (Segment's webhook batching).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from app.canonical import (
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
    decimal_product,
    decimal_sum,
    nonblank,
    parse_decimal,
    parse_time_ms,
    text_of,
)

NAME = "segment"

KINDS = {
    "track": EventKind.TRACK,
    "page": EventKind.PAGE,
    "screen": EventKind.SCREEN,
    "identify": EventKind.IDENTIFY,
    "group": EventKind.GROUP,
    "alias": EventKind.ALIAS,
}
DEVICE_TYPES = {
    "ios": Platform.IOS,
    "android": Platform.ANDROID,
    "fire_tv": Platform.FIRE_TV,
    "firetv": Platform.FIRE_TV,
    "amazon fire tv": Platform.FIRE_TV,
}
TIME_FIELDS = ("timestamp", "originalTimestamp", "receivedAt")
PURCHASE_VALUE_FIELDS = ("total", "revenue", "value")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _first_text(*values: Any) -> str | None:
    for value in values:
        text = nonblank(value)
        if text is not None:
            return text
    return None


def _first_number(source: dict[str, Any], keys: tuple[str, ...]) -> Decimal | None:
    for key in keys:
        number = parse_decimal(source.get(key))
        if number is not None:
            return number
    return None


def _products(properties: dict[str, Any]) -> list[dict[str, Any]]:
    products = properties.get("products")
    return [p for p in products if isinstance(p, dict)] if isinstance(products, list) else []


def _line_total(item: dict[str, Any]) -> Decimal | None:
    price = parse_decimal(item.get("price"))
    if price is None:
        return None
    quantity = parse_decimal(item.get("quantity"))
    return price if quantity is None else decimal_product(price, quantity)


def _purchase_value(properties: dict[str, Any], products: list[dict[str, Any]]) -> Decimal | None:
    value = _first_number(properties, PURCHASE_VALUE_FIELDS)
    if value is not None:
        return value
    return decimal_sum(line for line in map(_line_total, products) if line is not None)


def _units(properties: dict[str, Any], products: list[dict[str, Any]]) -> Decimal | None:
    quantities = [q for q in (parse_decimal(p.get("quantity")) for p in products) if q is not None]
    if quantities:
        return decimal_sum(quantities)
    return parse_decimal(properties.get("quantity"))


def _custom_attributes(
    properties: dict[str, Any], products: list[dict[str, Any]]
) -> tuple[tuple[str, Any], ...]:
    first = products[0] if products else {}

    def pick(*keys: str) -> Any:
        for source in (properties, first):
            for key in keys:
                if source.get(key) not in (None, ""):
                    return source[key]
        return None

    pairs = (
        ("brand", pick("brand")),
        ("category", pick("category")),
        ("productId", pick("product_id", "sku")),
    )
    return tuple((name, value) for name, value in pairs if value is not None)


def _locale_region(locale: Any) -> str | None:
    if not isinstance(locale, str):
        return None
    parts = locale.replace("_", "-").split("-")
    return parts[-1] if len(parts) > 1 and len(parts[-1]) == 2 else None


def _categories(context: dict[str, Any]) -> dict[str, bool] | None:
    preferences = _dict(context.get("consent")).get("categoryPreferences")
    if isinstance(preferences, dict):
        return {str(k): v is True for k, v in preferences.items()}
    management = context.get("consentManagement")
    if isinstance(management, dict):
        categories: dict[str, bool] = {}
        for key, granted in (("deniedConsentIds", False), ("allowedConsentIds", True)):
            ids = management.get(key)
            for category in ids if isinstance(ids, list) else []:
                categories[str(category)] = granted
        return categories
    return None


def _limited_data_use(properties: dict[str, Any]) -> bool:
    options = properties.get("dataProcessingOptions")
    if options == "LIMITED_DATA_USE" or (
        isinstance(options, list) and "LIMITED_DATA_USE" in options
    ):
        return True
    return properties.get("data_processing_options") == "LIMITED_DATA_USE"


def _event(index: int, message: Any, batch_context: dict[str, Any]) -> CanonicalEvent:
    if not isinstance(message, dict):
        raise InvalidEventError("message is not an object")
    for key in ("properties", "traits", "context"):
        if message.get(key) is not None and not isinstance(message[key], dict):
            raise InvalidEventError(f"{key} is not an object")
    context = {**batch_context, **_dict(message.get("context"))}
    properties = _dict(message.get("properties"))
    traits = _dict(message.get("traits"))
    context_traits = _dict(context.get("traits"))
    device = _dict(context.get("device"))
    message_type = message.get("type")
    kind = (
        KINDS.get(message_type.strip().lower(), EventKind.CUSTOM)
        if isinstance(message_type, str)
        else EventKind.CUSTOM
    )

    time_ms = None
    for key in TIME_FIELDS:
        if message.get(key) is not None:
            time_ms = parse_time_ms(message[key])
            if time_ms is None:
                raise InvalidEventError(f"{key} is not a date-time")
            break

    device_type = device.get("type")
    platform = Platform.WEB
    if isinstance(device_type, str):
        platform = DEVICE_TYPES.get(device_type.strip().lower(), Platform.WEB)

    maids: tuple[str, ...] = ()
    advertising_id = device.get("advertisingId")
    if isinstance(advertising_id, str) and device.get("adTrackingEnabled") is not False:
        maids = (advertising_id,)
    context_address = _dict(context_traits.get("address"))
    address = _dict(traits.get("address"))

    def trait(*keys: str, nested: bool = False) -> str | None:
        sources = (context_address, address) if nested else (context_traits, traits)
        return _first_text(*(s.get(k) for s in sources for k in keys))

    identities = Identities(
        emails=tuple(
            e
            for e in (context_traits.get("email"), traits.get("email"), properties.get("email"))
            if isinstance(e, str)
        ),
        phones=tuple(
            t
            for t in map(
                text_of, (context_traits.get("phone"), traits.get("phone"), properties.get("phone"))
            )
            if t
        ),
        maids=maids,
        match_id=nonblank(message.get("userId")),
        first_name=trait("firstName", "first_name"),
        last_name=trait("lastName", "last_name"),
        address=trait("street", nested=True),
        city=trait("city", nested=True),
        state=trait("state", nested=True),
        postal=trait("postalCode", "postal_code", "zip", nested=True),
    )
    user = UserContext(
        identities=identities,
        ip=context.get("ip") if isinstance(context.get("ip"), str) else None,
        consent=ConsentState(categories=_categories(context)),
    )
    products = _products(properties)
    single_line = _line_total(properties)
    if parse_decimal(properties.get("value")) is None:
        properties_value = single_line
    else:
        properties_value = parse_decimal(properties.get("value"))
    name = message.get("event") if kind is EventKind.TRACK else message.get("name")
    return CanonicalEvent(
        index=index,
        kind=kind,
        user=user,
        source_event=message,
        name=text_of(name) if kind is EventKind.TRACK else None,
        time_ms=time_ms,
        event_id=nonblank(message.get("messageId")),
        value=properties_value,
        purchase_value=_purchase_value(properties, products),
        currency=properties.get("currency")
        if isinstance(properties.get("currency"), str)
        else None,
        units=_units(properties, products),
        platform=platform,
        countries=(
            context_address.get("country"),
            address.get("country"),
            properties.get("country_code"),
            _dict(context.get("location")).get("country"),
            _locale_region(context.get("locale")),
        ),
        attributes=_custom_attributes(properties, products),
        consent=ConsentSignals(
            user_data=properties.get("amznUserData"),
            ad_storage=properties.get("amznAdStorage"),
            tcf=properties.get("tcf"),
            gpp=properties.get("gpp"),
        ),
        limited_data_use=_limited_data_use(properties),
    )


def messages_of(payload: Any) -> tuple[list[Any], dict[str, Any]]:
    """The messages of a payload and the batch-level context to merge into each."""
    if isinstance(payload, list):
        return payload, {}
    if not isinstance(payload, dict):
        raise PayloadError("payload must be a JSON object or an array of messages")
    if "batch" in payload:
        batch = payload["batch"]
        if not isinstance(batch, list):
            raise PayloadError("batch must be a list of messages")
        context = payload.get("context")
        if context is not None and not isinstance(context, dict):
            raise PayloadError("context must be an object")
        return batch, context or {}
    return [payload], {}


class SegmentAdapter:
    name = NAME

    def decode(self, body: bytes, content_type: str | None = None) -> Any:
        return decode_json(body)

    def parse(self, payload: Any) -> ParsedBatch:
        messages, context = messages_of(payload)
        parsed = ParsedBatch()
        for index, message in enumerate(messages):
            try:
                parsed.events.append(_event(index, message, context))
            except InvalidEventError as problem:
                parsed.rejects.append(Dropped(index, "invalid_event", str(problem)))
        return parsed


ADAPTER = SegmentAdapter()
