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


def _has_huge_integer(data: bytes) -> bool:
    return any(
        not _INT_RANGE[0] <= int(match.group(1)) <= _INT_RANGE[1]
        for match in _LONG_NUMBER.finditer(data)
    )


def loads(data: bytes | str) -> Any:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _has_huge_integer(raw):
        try:
            return json.loads(raw, parse_constant=_refuse_constant)
        except InvalidJSONError:
            raise
        except (ValueError, RecursionError, UnicodeDecodeError) as error:
            raise InvalidJSONError(str(error)) from error
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as fast_error:
        try:
            return json.loads(data, parse_constant=_refuse_constant)
        except InvalidJSONError:
            raise
        except (ValueError, RecursionError, UnicodeDecodeError) as error:
            raise InvalidJSONError(str(fast_error)) from error


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def canonical_text(value: Any) -> str:
    """Sorted keys, no spaces: the text hashed for deterministic event ids."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
