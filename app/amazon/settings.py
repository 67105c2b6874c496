"""The mapping settings of one output (mapping.md §10), validated once at the edge."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.amazon.schema import DATA_SET_NAME
from app.errors import SettingsError
from app.rules import ConversionRule, parse_rules

REGIONS = ("NA", "EU", "FE")
MATCH_KEY_MODES = ("standard", "extended")
CONSENT_MODES = ("forward", "require_granted")
MIN_AGE_HOURS, MAX_AGE_HOURS = 1, 504


@dataclass(frozen=True, slots=True)
class OutputSettings:
    data_set_name: str = ""
    partner_name: str = ""
    region: str = "NA"
    max_event_age_hours: int = 24
    match_keys: str = "standard"
    consent_mode: str = "forward"
    consent_purpose_user_data: str = ""
    consent_purpose_ad_storage: str = ""
    consent_category_advertising: str = ""
    connection_id: str = ""
    advertiser_id: str = ""
    conversion_rules: tuple[ConversionRule, ...] = ()
    default_rules: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> OutputSettings:
        """Validate user-supplied settings; a bad one raises SettingsError naming it."""
        if not isinstance(raw, Mapping):
            raise SettingsError("settings", "must be a JSON object")
        known = {name for name in cls.__slots__ if name != "extra"}
        values: dict[str, Any] = {}
        for key in (
            "data_set_name",
            "partner_name",
            "consent_purpose_user_data",
            "consent_purpose_ad_storage",
            "consent_category_advertising",
            "connection_id",
            "advertiser_id",
        ):
            value = raw.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise SettingsError(key, "must be a string")
            values[key] = value.strip()
        name = values.get("data_set_name", "")
        if name and not (5 <= len(name) <= 100 and DATA_SET_NAME.fullmatch(name)):
            raise SettingsError(
                "data_set_name", "must be 5..100 characters: a letter, then letters, digits, _ or -"
            )
        for key, allowed, default in (
            ("region", REGIONS, "NA"),
            ("match_keys", MATCH_KEY_MODES, "standard"),
            ("consent_mode", CONSENT_MODES, "forward"),
        ):
            value = raw.get(key, default)
            if value is None:
                value = default
            if key == "region" and isinstance(value, str):
                value = value.strip().upper()
            if value not in allowed:
                raise SettingsError(key, f"must be one of {', '.join(allowed)}")
            values[key] = value
        age = raw.get("max_event_age_hours", 24)
        if age is None:
            age = 24
        if (
            isinstance(age, bool)
            or not isinstance(age, int)
            or not (MIN_AGE_HOURS <= age <= MAX_AGE_HOURS)
        ):
            raise SettingsError(
                "max_event_age_hours",
                f"must be a whole number from {MIN_AGE_HOURS} to {MAX_AGE_HOURS}",
            )
        values["max_event_age_hours"] = age
        if "conversion_rules" in raw and raw["conversion_rules"] is not None:
            values["conversion_rules"] = parse_rules(raw["conversion_rules"])
        default_rules = raw.get("default_rules", True)
        if not isinstance(default_rules, bool):
            raise SettingsError("default_rules", "must be true or false")
        values["default_rules"] = default_rules
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(**values, extra=extra)
