"""JSON in and out: fast by default, exact for every valid JSON document.

orjson is the fast path. It refuses integers beyond 64 bits, which mParticle ids may
be, so a document it rejects is parsed again by the standard library before we call
it invalid. NaN and Infinity are not JSON and are refused by both paths.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


class InvalidJSONError(ValueError):
    """The bytes are not one valid JSON document."""


def _refuse_constant(name: str) -> Any:
    raise InvalidJSONError(f"{name} is not valid JSON")


# A JSON number of 19 or more digits (after ':', '[' or ','): orjson reads integers
# outside the 64-bit ranges as floats, silently, so such documents go to the stdlib.
_LONG_NUMBER = re.compile(rb"[:\[,]\s*(-?\d{19,})(?![\d.eE])")
_INT_RANGE = (-(2**63), 2**64 - 1)


# Longer literals are out of range whatever their digits; int() is not even tried on
# them, since Python refuses to convert strings of more than 4,300 digits.
_MAX_INT_DIGITS = 20


def _out_of_range(literal: bytes) -> bool:
    digits = literal.lstrip(b"-")
    return len(digits) > _MAX_INT_DIGITS or not _INT_RANGE[0] <= int(literal) <= _INT_RANGE[1]


def _has_huge_integer(data: bytes) -> bool:
    return any(_out_of_range(match.group(1)) for match in _LONG_NUMBER.finditer(data))


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidJSONError(f"number {text[:40]} is too large")
    return value


def _stdlib_loads(data: bytes | str) -> Any:
    """The exact path: integers of any size; no NaN, no Infinity (also not as 1e999),
    no lone surrogates (\\ud800 escapes), which orjson would refuse too."""
    value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    try:
        orjson.dumps(value, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    except orjson.JSONEncodeError as error:
        if "Integer exceeds 64-bit range" not in str(error):
            raise InvalidJSONError(f"not valid JSON text: {error}") from None
        _check_strings(value)
    return value


def _check_strings(value: Any) -> None:
    """Walks what orjson could not encode because of a huge integer: every string
    must still be valid Unicode (no lone surrogates)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidJSONError("a string holds a lone surrogate escape") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# A JSON number of 19 or more digits is what loads() must read with the standard
# library (orjson turns integers beyond 64 bits into floats). Its exact check
# is a regex over the whole body, which costs more than orjson.loads itself; this
# translation finds every candidate (digits after ':', '[' or ',' and whitespace) at
# memory speed, so the exact check runs only for bodies that may hold one.
def _digit_run_table() -> bytes:
    """Digits -> '0', the bytes a number may follow -> ':', '-' kept, the rest -> 'x'."""
    table = bytearray(b"x" * 256)
    for byte in b"0123456789":
        table[byte] = ord("0")
    for byte in b":[,":
        table[byte] = ord(":")
    table[ord("-")] = ord("-")
    return bytes(table)


_DIGIT_RUN_TABLE = _digit_run_table()
_REGEX_WHITESPACE = b" \t\n\r\x0b\x0c"  # what the check's \s matches: deleted first
_LONG_RUN, _LONG_NEGATIVE_RUN = b":" + b"0" * 19, b":-" + b"0" * 19


def may_hold_long_number(body: bytes) -> bool:
    """False when ``body`` has no JSON number of 19 or more digits (true may be wrong)."""
    runs = body.translate(_DIGIT_RUN_TABLE, _REGEX_WHITESPACE)
    # A document that is one bare number has nothing before its digits.
    return _LONG_RUN in runs or _LONG_NEGATIVE_RUN in runs or runs[:1] in (b"0", b"-")


def loads(data: bytes | str) -> Any:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if may_hold_long_number(raw) and _has_huge_integer(raw):
        try:
            return _stdlib_loads(raw)
        except InvalidJSONError:
            raise
        except (ValueError, RecursionError, UnicodeDecodeError) as error:
            raise InvalidJSONError(str(error)) from error
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as fast_error:
        try:
            return _stdlib_loads(data)
        except InvalidJSONError:
            raise
        except (ValueError, RecursionError, UnicodeDecodeError) as error:
            raise InvalidJSONError(str(fast_error)) from error


def loads_or_none(data: bytes) -> Any:
    """A peer's answer as JSON, or None when it is empty or not JSON (orjson: an answer
    is read, not validated the way the relay's own inbound bodies are)."""
    if not data:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def canonical_text(value: Any) -> str:
    """Sorted keys, no spaces: the text hashed for deterministic event ids.

    The definition is the standard library's ``json.dumps(sort_keys=True)`` text, which
    ids already sent were made from. orjson writes the same text 4x faster when the
    value holds no float (the two spell some floats differently, 1e16 vs 1e+16) and its
    output is printable ASCII (the stdlib escapes every other character as \\uXXXX,
    orjson only control characters); otherwise the stdlib writes it.
    """
    if _orjson_safe(value):
        try:
            fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate: the stdlib escapes it
            fast = b"\x80"
        if fast.isascii() and b"\x7f" not in fast:
            return fast.decode("ascii")
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


_MAX_SAFE_DEPTH = 32


def _orjson_safe(value: Any, depth: int = 0) -> bool:
    """No float, only str keys, ints within 64 bits, not too deep."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-(2**63) <= value < 2**64)
    if depth >= _MAX_SAFE_DEPTH:
        return False
    if kind is dict:
        return all(type(k) is str and _orjson_safe(v, depth + 1) for k, v in value.items())
    if kind is list:
        return all(_orjson_safe(v, depth + 1) for v in value)
    return False
