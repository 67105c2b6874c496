"""Flat conversion records: offline and CRM uploads as JSON, NDJSON or CSV.

One record is one event. Column names may be camelCase or snake_case. A record
that fails validation is dropped ``invalid_event`` with its row and the reason;
the others go on.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from app import jsonutil
from app.canonical import (
    NO_SIGNALS,
    CanonicalEvent,
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

_T = TypeVar("_T")

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
HEX64 = re.compile(r"[0-9a-fA-F]{64}")


# The caches are bounded in entries and in the size of what they keep: keys and
# event_type values come from untrusted input, but in practice a file or a sender
# repeats a handful of them on every record (the regex substitution was half of the
# adapter's time when it ran for every key of every record).
_CACHED_TEXT_CHARS = 64
_CACHED_COLUMNS = 64
_CACHED_COLUMN_CHARS = 2048


def snake(key: str) -> str:
    return _snake(key) if len(key) > _CACHED_TEXT_CHARS else _cached_snake(key)


def _snake(key: str) -> str:
    return _CAMEL.sub(r"_\1", key.strip()).lower().replace(" ", "_").replace("-", "_")


_cached_snake = functools.lru_cache(maxsize=4096)(_snake)


@functools.lru_cache(maxsize=256)
def _column_names(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The snake_case names of a record's keys, worked out once per set of columns."""
    return tuple(snake(key) for key in keys)


def column_names(keys: tuple[Any, ...]) -> tuple[str, ...]:
    """The snake_case names of a record's keys; InvalidEventError for a key not text."""
    try:
        if len(keys) <= _CACHED_COLUMNS and sum(map(len, keys)) <= _CACHED_COLUMN_CHARS:
            return _column_names(keys)
        # a very wide record (or a hostile one) is not kept in the cache
        return tuple(snake(key) for key in keys)
    except (TypeError, AttributeError):  # a key that is not text: not a record's column
        raise InvalidEventError("record has a key that is not text") from None


def _fields(raw: dict[Any, Any]) -> dict[str, Any]:
    """The record's non-empty values by snake_case name (a later duplicate wins)."""
    names = column_names(tuple(raw))
    return {name: v for name, v in zip(names, raw.values(), strict=True) if v not in _EMPTY}


_EMPTY = (None, "")


def conversion_type_of(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    key = value.strip()
    if key.upper() in CONVERSION_TYPES:
        return key.upper()
    return EVENT_TYPE_ALIASES.get(snake(key))


_NOT_A_TIME = "is not an ISO 8601 date-time or epoch milliseconds"


def _optional(raw: Any, parse: Callable[[Any], _T | None], column: str, problem: str) -> _T | None:
    """A column's parsed value; None when the column is absent; a present value that
    does not parse makes the record invalid (it is not silently sent without it)."""
    if raw is None:
        return None
    parsed = parse(raw)
    if parsed is None:
        raise InvalidEventError(f"{column} {problem}")
    return parsed


def _record(index: int, raw: Any) -> CanonicalEvent:
    if not isinstance(raw, dict):
        raise InvalidEventError("record is not an object")
    if None in raw:  # csv.DictReader keeps a row's surplus values under the key None
        raise InvalidEventError("row has more fields than the header row")
    row = _fields(raw)
    get = row.get  # every value in ``row`` is non-empty: None means "no such column"
    event_type = get("event_type")
    conversion_type = conversion_type_of(event_type)
    time_ms = _optional(get("event_time"), parse_time_ms, "event_time", _NOT_A_TIME)
    value = _optional(get("event_value"), parse_decimal, "event_value", "is not a number")
    units = _optional(get("units_sold"), parse_decimal, "units_sold", "is not a number")
    platform = Platform.OFFLINE
    raw_source = get("event_source")
    if raw_source is not None:
        source = text_of(raw_source)
        platform_found = EVENT_SOURCES.get(snake(source)) if source else None
        if platform_found is None:
            raise InvalidEventError(
                "event_source is not one of IOS, ANDROID, FIRE_TV, WEBSITE, OFFLINE"
            )
        platform = platform_found
    email = get("email")
    emails = [email] if isinstance(email, str) else []
    match_id = None
    user_id = nonblank(get("user_id"))
    if user_id is not None:
        if HEX64.fullmatch(user_id.strip()):
            emails.append(user_id)  # a pre-hashed email (MadConnect's schema)
        else:
            match_id = user_id
    phone = text_of(get("phone"))
    maid = get("maid")
    ip = get("ip_address")
    user = UserContext(
        identities=Identities(
            emails=tuple(emails),
            phones=(phone,) if phone else (),
            maids=(maid,) if isinstance(maid, str) else (),
            match_id=match_id,
        ),
        ip=ip if isinstance(ip, str) else None,
    )
    name = nonblank(get("event_name"))
    if name is None and conversion_type is None:
        name = text_of(event_type)  # lets an output's rule match an unknown event_type
    currency = get("currency")
    return CanonicalEvent(
        index=index,
        kind=EventKind.RECORD,
        user=user,
        source_event=raw,
        name=name,
        time_ms=time_ms,
        event_id=nonblank(get("event_id")),
        value=value,
        purchase_value=value,
        currency=currency if isinstance(currency, str) else None,
        units=units,
        platform=platform,
        countries=(get("country_code"),),
        # Records carry no consent values; the shared empty signals let the mapper
        # recognise that at once (``is NO_SIGNALS``) instead of comparing four Nones.
        consent=NO_SIGNALS,
        limited_data_use=get("data_processing_options") == "LIMITED_DATA_USE",
        conversion_type=conversion_type,
        advertiser_id=nonblank(get("advertiser_id")),
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
        payload = batch_records(payload)
        parsed = ParsedBatch()
        for index, raw in enumerate(payload):
            try:
                parsed.events.append(record_event(index, raw))
            except InvalidEventError as problem:
                parsed.rejects.append(Dropped(index, "invalid_event", str(problem)))
        return parsed


def batch_records(payload: Any) -> list[Any]:
    """The records of a payload as ``parse`` reads them (one object is one record)."""
    if isinstance(payload, dict):
        return [payload]
    if not isinstance(payload, list):
        raise PayloadError("records must be a list")
    return payload


def record_event(index: int, raw: Any) -> CanonicalEvent:
    """One record as a canonical event; InvalidEventError says why it cannot be one."""
    if isinstance(raw, _BadLine):
        raise InvalidEventError("line is not valid JSON")
    return _record(index, raw)


ADAPTER = RecordsAdapter()
