"""Amazon's CreateEvent schema: enums and limits, and strict request validation.

The enums and limits are read from Amazon's own OpenAPI extract (shipped as
``openapi.json`` beside this module) so they cannot drift from what Amazon accepts.
Validation is for tests and the emulator, never for the mapper's hot path.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

_SCHEMA_REF = "#/components/schemas/"


@functools.cache
def openapi() -> dict[str, Any]:
    text = resources.files("app.amazon").joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def _enum(name: str) -> frozenset[str]:
    return frozenset(openapi()["components"]["schemas"][name]["enum"])


CONVERSION_TYPES = _enum("ConversionType")
EVENT_SOURCES = _enum("EventSource")
COUNTRY_CODES = _enum("CountryCode")
CURRENCY_CODES = _enum("CurrencyCode")
MATCH_KEY_TYPES = _enum("MatchKeyType")
ERROR_CODES = _enum("ErrorCode")

MAX_EVENTS_PER_REQUEST = 500
MAX_MATCH_KEYS = 15
MAX_CUSTOM_DATA = 13
MAX_TEXT = 256
DATA_SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
EVENT_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})")


@functools.cache
def _validator() -> Any:
    # jsonschema is imported lazily: `relay map` should not pay for it.
    import jsonschema
    from referencing import Registry
    from referencing.jsonschema import DRAFT4

    document = openapi()
    registry: Registry[Any] = Registry().with_resource(
        "urn:amazon-events", DRAFT4.create_resource(document)
    )
    request_schema = {"$ref": "urn:amazon-events" + _SCHEMA_REF + "CreateEventRequest"}
    return jsonschema.Draft4Validator(request_schema, registry=registry)


def request_errors(body: Any) -> list[str]:
    """Every way ``body`` breaks Amazon's CreateEvent request schema ([] when valid).

    Adds the checks the schema states only in prose: one value per match key,
    the dataSetName pattern as a whole-string match, and the eventTime format.
    """
    errors = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '<body>'}: {error.message[:200]}"
        for error in _validator().iter_errors(body)
    ]
    events = body.get("events") if isinstance(body, dict) else None
    for i, event in enumerate(events if isinstance(events, list) else []):
        if not isinstance(event, dict):
            continue
        description = event.get("eventDescription")
        if isinstance(description, dict):
            name = description.get("dataSetName")
            if isinstance(name, str) and not DATA_SET_NAME.fullmatch(name):
                errors.append(f"events/{i}/eventDescription/dataSetName: bad pattern")
        event_time = event.get("eventTime")
        if isinstance(event_time, str) and not EVENT_TIME.fullmatch(event_time):
            errors.append(f"events/{i}/eventTime: not an ISO 8601 date-time")
    return errors
