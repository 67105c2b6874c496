"""Conversion rules: which canonical events become which Amazon conversion.

Rules are data. Each source has default rules (mapping.md §2, sources.md); an
output may add its own, which are tried first, and may turn the defaults off.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.canonical import CanonicalEvent, EventKind
from app.errors import SettingsError

# Amazon's conversion types (schema.CONVERSION_TYPES); listed here because rules are
# validated without loading the OpenAPI document.
CONVERSION_TYPES = (
    "ADD_TO_SHOPPING_CART", "APPLICATION", "CHECKOUT", "CONTACT", "LEAD",
    "MOBILE_APP_FIRST_START", "OFF_AMAZON_PURCHASES", "OTHER", "PAGE_VIEW", "SEARCH",
    "SIGN_UP", "SUBSCRIBE",
)  # fmt: skip

# mapping.md §2: product_action.action -> conversionType; anything else -> OTHER.
MPARTICLE_ACTIONS: Mapping[str, str] = {
    "purchase": "OFF_AMAZON_PURCHASES",
    "add_to_cart": "ADD_TO_SHOPPING_CART",
    "checkout": "CHECKOUT",
    "view_detail": "PAGE_VIEW",
}

# sources.md: Segment ecommerce and lifecycle event names (casefolded), v1 names too.
SEGMENT_TRACK: Mapping[str, str] = {
    "order completed": "OFF_AMAZON_PURCHASES",
    "completed order": "OFF_AMAZON_PURCHASES",
    "product added": "ADD_TO_SHOPPING_CART",
    "added product": "ADD_TO_SHOPPING_CART",
    "checkout started": "CHECKOUT",
    "started checkout": "CHECKOUT",
    "product viewed": "PAGE_VIEW",
    "viewed product": "PAGE_VIEW",
    "product list viewed": "PAGE_VIEW",
    "viewed product category": "PAGE_VIEW",
    "cart viewed": "PAGE_VIEW",
    "products searched": "SEARCH",
    "searched products": "SEARCH",
    "product removed": "OTHER",
    "removed product": "OTHER",
    "product clicked": "OTHER",
    "clicked product": "OTHER",
    "signed up": "SIGN_UP",
    "lead generated": "LEAD",
    "application submitted": "APPLICATION",
    "callback started": "CONTACT",
    "subscription created": "SUBSCRIBE",
    "application installed": "MOBILE_APP_FIRST_START",
}
SEGMENT_KIND_NAMES: Mapping[EventKind, str] = {
    EventKind.PAGE: "Page View",
    EventKind.SCREEN: "Screen View",
}

MAX_NAME = 256


@dataclass(frozen=True, slots=True)
class ConversionRule:
    """Match on any of source, kind, event name and action; unset fields match all."""

    conversion_type: str
    source: str | None = None
    kind: str | None = None
    event_name: str | None = None  # compared casefolded
    action: str | None = None  # compared casefolded
    name: str | None = None  # eventDescription.name to send; None keeps the default
    data_set_name: str | None = None

    def matches(self, event: CanonicalEvent, source: str) -> bool:
        if self.source is not None and self.source != source:
            return False
        if self.kind is not None and self.kind != event.kind.value:
            return False
        if self.event_name is not None and (
            event.name is None or " ".join(event.name.casefold().split()) != self.event_name
        ):
            return False
        return self.action is None or (
            event.action is not None and event.action.strip().casefold() == self.action
        )


@dataclass(frozen=True, slots=True)
class Conversion:
    conversion_type: str
    name: str
    data_set_name: str | None = None


@functools.lru_cache(maxsize=1024)
def title_words(text: str) -> str:
    """``add_to_cart`` and ``ADD_TO_CART`` -> ``Add To Cart`` (mapping.md §3)."""
    words = text.strip().lower().replace("_", " ").split()
    return " ".join(word[0].upper() + word[1:] for word in words)


def _name(event: CanonicalEvent, fallback: str) -> str:
    name = event.name.strip() if event.name else ""
    return (name or fallback)[:MAX_NAME]


def _default(event: CanonicalEvent, source: str) -> Conversion | str:
    if source == "mparticle":
        if event.action is None:
            return "not_commerce_event"
        action = event.action.strip().lower()
        if not action:
            return "missing_action"
        return Conversion(MPARTICLE_ACTIONS.get(action, "OTHER"), _name(event, title_words(action)))
    if event.kind is EventKind.RECORD and event.conversion_type:
        return Conversion(event.conversion_type, _name(event, title_words(event.conversion_type)))
    if event.kind is EventKind.TRACK and event.name:
        conversion_type = SEGMENT_TRACK.get(" ".join(event.name.casefold().split()))
        if conversion_type:
            return Conversion(conversion_type, _name(event, event.name))
    kind_name = SEGMENT_KIND_NAMES.get(event.kind)
    if kind_name:
        return Conversion("PAGE_VIEW", kind_name)
    return "unmapped_event"


def resolve(
    event: CanonicalEvent,
    source: str,
    rules: tuple[ConversionRule, ...],
    use_defaults: bool,
) -> Conversion | str:
    """The conversion an event becomes, or the drop reason when it becomes none."""
    for rule in rules:
        if rule.matches(event, source):
            default = _default(event, source) if use_defaults else None
            fallback = (
                default.name
                if isinstance(default, Conversion)
                else title_words(rule.conversion_type)
            )
            name = (rule.name or (event.name.strip() if event.name else "") or fallback)[:MAX_NAME]
            return Conversion(rule.conversion_type, name, rule.data_set_name)
    if use_defaults:
        return _default(event, source)
    return "unmapped_event"


_RULE_TEXT_FIELDS = ("source", "kind", "event_name", "action", "name", "data_set_name")
# Amazon's dataSetName pattern and the output model's 5..100 characters (service.md),
# as for the output's own data_set_name (schema.DATA_SET_NAME).
_DATA_SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{4,99}")
_KINDS = frozenset(kind.value for kind in EventKind)


def parse_rules(raw: Any) -> tuple[ConversionRule, ...]:
    """Validate an output's rules (a JSON list of objects); errors name the entry."""
    if not isinstance(raw, list):
        raise SettingsError("conversion_rules", "must be a list of rule objects")
    rules = []
    for i, entry in enumerate(raw):
        where = f"conversion_rules[{i}]"
        if not isinstance(entry, dict):
            raise SettingsError(where, "must be an object")
        conversion_type = entry.get("conversion_type")
        if conversion_type not in CONVERSION_TYPES:
            raise SettingsError(
                f"{where}.conversion_type", f"must be one of {', '.join(CONVERSION_TYPES)}"
            )
        unknown = set(entry) - {"conversion_type", *_RULE_TEXT_FIELDS}
        if unknown:
            raise SettingsError(f"{where}.{sorted(unknown)[0]}", "is not a rule field")
        texts: dict[str, str | None] = {}
        for key in _RULE_TEXT_FIELDS:
            value = entry.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SettingsError(f"{where}.{key}", "must be a non-empty string")
            texts[key] = value.strip() if isinstance(value, str) else None
        data_set_name = texts["data_set_name"]
        if data_set_name is not None and not _DATA_SET_NAME.fullmatch(data_set_name):
            raise SettingsError(
                f"{where}.data_set_name",
                "must be 5..100 characters: a letter, then letters, digits, _ or -",
            )
        if texts["kind"] is not None and texts["kind"] not in _KINDS:
            raise SettingsError(f"{where}.kind", f"must be one of {', '.join(sorted(_KINDS))}")
        for key in ("event_name", "action"):
            if texts[key] is not None:
                texts[key] = " ".join(str(texts[key]).casefold().split())
        if all(texts[key] is None for key in ("source", "kind", "event_name", "action")):
            raise SettingsError(
                where, "must match on at least one of source, kind, event_name, action"
            )
        rules.append(ConversionRule(conversion_type=str(conversion_type), **texts))
    return tuple(rules)
