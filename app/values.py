"""Source-neutral parsing of loosely typed JSON values (pure functions).

CDPs send numbers as strings, ids as int64 numbers, booleans as strings. These
helpers decide once, for every source, what counts as a number or a text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation
from typing import Any

# mapping.md §11: after trimming, a decimal number such as -12, 3.50 or 1e3
# (ASCII digits only: ``\d`` alone would also accept other scripts' digits).
_NUMERIC = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
# Sums and products of parsed numbers: exact for any realistic input (2000 digits),
# and an overflow gives Infinity (reported as None) instead of raising
# decimal.Overflow out of the mapper.
_EXACT = Context(prec=2000, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[])


def parse_decimal(value: Any) -> Decimal | None:
    """A finite number from a JSON number or numeric string, else None.

    Floats go through their shortest text (``repr``) so that ``2.675`` is the
    decimal 2.675 a person reads, not the binary value below it.
    """
    kind = type(value)
    if kind is float:  # the common case first
        return Decimal(repr(value)) if math.isfinite(value) else None
    if kind is int:
        return Decimal(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 400 or not _NUMERIC.fullmatch(text):
            return None
        try:
            number = Decimal(text)
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


def _finite(number: Decimal) -> Decimal | None:
    return number if number.is_finite() else None


def decimal_sum(numbers: Iterable[Decimal]) -> Decimal | None:
    """The exact sum, or None when it is not a finite number (or nothing to add)."""
    total: Decimal | None = None
    for number in numbers:
        total = number if total is None else _EXACT.add(total, number)
    return None if total is None else _finite(total)


def decimal_product(a: Decimal, b: Decimal) -> Decimal | None:
    """The exact product, or None when it is not a finite number."""
    return _finite(_EXACT.multiply(a, b))


def parse_epoch_ms(value: Any) -> int | None:
    """Milliseconds since the epoch from an int, float or numeric string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = parse_decimal(value)
    if number is None or abs(number.adjusted()) > 30:
        return None
    return int(number)


def text_of(value: Any) -> str | None:
    """A text for id-like fields: strings as they are, numbers as their JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    return None


def nonblank(value: Any) -> str | None:
    """The text of a value when it has any non-space character, else None."""
    text = text_of(value)
    if text is None or not text.strip():
        return None
    return text


def first_key(mapping: dict[str, Any], wanted: str) -> Any:
    """Value of the first key equal to ``wanted`` ignoring case (payload order)."""
    if wanted in mapping:
        return mapping[wanted]
    for key, value in mapping.items():
        if isinstance(key, str) and key.lower() == wanted:
            return value
    return None


# Lenient ISO 8601: Segment's own examples contain dates like 2015-2-02T00:30:08.276Z.
_ISO = re.compile(
    r"\s*(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:[Tt ](\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?\s*"
)


def parse_time_ms(value: Any) -> int | None:
    """Epoch milliseconds from a lenient ISO 8601 text or an epoch-ms number."""
    if not isinstance(value, str):
        return parse_epoch_ms(value)
    match = _ISO.fullmatch(value)
    if match is None:
        return parse_epoch_ms(value)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    import calendar

    try:
        moment = calendar.timegm(
            (int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
        )
        datetime_check(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0)
        )
    except ValueError:
        return None
    millis = int((fraction or "0")[:3].ljust(3, "0"))
    offset = 0
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * (int(digits[:2]) * 3600 + int(digits[2:4] or 0) * 60)
    return (moment - offset) * 1000 + millis


def datetime_check(year: int, month: int, day: int, hour: int, minute: int, second: int) -> None:
    """Raise ValueError for a calendar date or clock time that does not exist."""
    from datetime import datetime

    datetime(year, month, day, hour, minute, second)
