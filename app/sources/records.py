"""Flat conversion records: offline and CRM uploads as JSON, NDJSON or CSV.

One record is one event. Column names may be camelCase or snake_case. A record
that fails validation is dropped ``invalid_event`` with its row and the reason;
the others go on.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from typing import Any

from app import jsonutil
from app.canonical import (
    CanonicalEvent,
    ConsentSignals,
    Dropped,
    EventKind,
    Identities,
    ParsedBatch,
    Platform,
    UserContext,
)
from app.errors import PayloadError
from app.rules import CONVERSION_TYPES
from app.sources.base import InvalidEventError
from app.values import nonblank, parse_decimal, parse_time_ms, text_of

NAME = "records"

EVENT_TYPE_ALIASES = {
    "purchase": "OFF_AMAZON_PURCHASES",
    "add_to_cart": "ADD_TO_SHOPPING_CART",
    "checkout": "CHECKOUT",
    "page_view": "PAGE_VIEW",
    "search": "SEARCH",
    "sign_up": "SIGN_UP",
    "lead": "LEAD",
    "subscribe": "SUBSCRIBE",
    "application": "APPLICATION",
    "contact": "CONTACT",
    "other": "OTHER",
}
EVENT_SOURCES = {
    "ios": Platform.IOS,
    "android": Platform.ANDROID,
    "fire_tv": Platform.FIRE_TV,
    "firetv": Platform.FIRE_TV,
    "website": Platform.WEB,
    "web": Platform.WEB,
    "offline": Platform.OFFLINE,
}
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def snake(key: str) -> str:
    return _CAMEL.sub(r"_\1", key.strip()).lower().replace(" ", "_").replace("-", "_")


def conversion_type_of(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    key = value.strip()
    if key.upper() in CONVERSION_TYPES:
        return key.upper()
    return EVENT_TYPE_ALIASES.get(snake(key))


def _record(index: int, raw: Any) -> CanonicalEvent:
    if not isinstance(raw, dict):
        raise InvalidEventError("record is not an object")
    if None in raw:  # csv.DictReader keeps a row's surplus values under the key None
        raise InvalidEventError("row has more fields than the header row")
    row = {snake(k): v for k, v in raw.items() if v not in (None, "")}
    event_type = row.get("event_type")
    conversion_type = conversion_type_of(event_type)
    time_ms = None
    if "event_time" in row:
        time_ms = parse_time_ms(row["event_time"])
        if time_ms is None:
            raise InvalidEventError("event_time is not an ISO 8601 date-time or epoch milliseconds")
    value = None
    if "event_value" in row:
        value = parse_decimal(row["event_value"])
        if value is None:
            raise InvalidEventError("event_value is not a number")
    units = None
    if "units_sold" in row:
        units = parse_decimal(row["units_sold"])
        if units is None:
            raise InvalidEventError("units_sold is not a number")
    platform = Platform.OFFLINE
    if "event_source" in row:
        source = text_of(row["event_source"])
        platform_found = EVENT_SOURCES.get(snake(source)) if source else None
        if platform_found is None:
            raise InvalidEventError(
                "event_source is not one of IOS, ANDROID, FIRE_TV, WEBSITE, OFFLINE"
            )
        platform = platform_found
    emails = [row["email"]] if isinstance(row.get("email"), str) else []
    match_id = None
    user_id = nonblank(row.get("user_id"))
    if user_id is not None:
        if _HEX64.fullmatch(user_id.strip()):
            emails.append(user_id)  # a pre-hashed email (MadConnect's schema)
        else:
            match_id = user_id
    phone = text_of(row.get("phone"))
    maid = row.get("maid")
    user = UserContext(
        identities=Identities(
            emails=tuple(emails),
            phones=(phone,) if phone else (),
            maids=(maid,) if isinstance(maid, str) else (),
            match_id=match_id,
        ),
        ip=row.get("ip_address") if isinstance(row.get("ip_address"), str) else None,
    )
    name = nonblank(row.get("event_name"))
    if name is None and conversion_type is None:
        name = text_of(event_type)  # lets an output's rule match an unknown event_type
    return CanonicalEvent(
        index=index,
        kind=EventKind.RECORD,
        user=user,
        source_event=raw,
        name=name,
        time_ms=time_ms,
        event_id=nonblank(row.get("event_id")),
        value=value,
        purchase_value=value,
        currency=row.get("currency") if isinstance(row.get("currency"), str) else None,
        units=units,
        platform=platform,
        countries=(row.get("country_code"),),
        consent=ConsentSignals(),
        limited_data_use=row.get("data_processing_options") == "LIMITED_DATA_USE",
        conversion_type=conversion_type,
        advertiser_id=nonblank(row.get("advertiser_id")),
    )


def _ndjson(lines: Iterable[str]) -> Iterator[Any]:
    for line in lines:
        if not line.strip():
            continue
        try:
            yield jsonutil.loads(line)
        except jsonutil.InvalidJSONError:
            yield _BadLine()


class _BadLine:
    """Stands for an NDJSON line that is not JSON, so its row number is kept."""


def decode_records(body: bytes, content_type: str | None = None) -> list[Any]:
    """A list of records from a JSON array, NDJSON or CSV body (sniffed if untyped)."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PayloadError("body is not UTF-8 text") from None
    kind = (content_type or "").split(";")[0].strip().lower()
    stripped = text.lstrip()
    if kind in ("text/csv", "application/csv") or (not kind and stripped[:1] not in "[{"):
        reader = csv.DictReader(io.StringIO(text))
        try:
            if not reader.fieldnames:
                raise PayloadError("CSV body has no header row")
            return list(reader)
        except csv.Error as error:  # e.g. a NUL byte: the body is not CSV at all
            raise PayloadError(f"CSV body cannot be read: {error}") from None
    if kind in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
        return list(_ndjson(text.splitlines()))
    try:
        payload = jsonutil.loads(text)
    except jsonutil.InvalidJSONError:
        if stripped.startswith("{"):
            return list(_ndjson(text.splitlines()))
        raise PayloadError("body is not valid JSON") from None
    if isinstance(payload, dict):
        records = payload.get("records", payload.get("events"))
        return records if isinstance(records, list) else [payload]
    if isinstance(payload, list):
        return payload
    raise PayloadError("records must be a JSON array or objects")


class RecordsAdapter:
    name = NAME

    def decode(self, body: bytes, content_type: str | None = None) -> Any:
        return decode_records(body, content_type)

    def parse(self, payload: Any) -> ParsedBatch:
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list):
            raise PayloadError("records must be a list")
        parsed = ParsedBatch()
        for index, raw in enumerate(payload):
            try:
                if isinstance(raw, _BadLine):
                    raise InvalidEventError("line is not valid JSON")
                parsed.events.append(_record(index, raw))
            except InvalidEventError as problem:
                parsed.rejects.append(Dropped(index, "invalid_event", str(problem)))
        return parsed


ADAPTER = RecordsAdapter()
