"""Amazon's normalisation of match keys and codes (pure, cached where values repeat).

Every function here takes a raw value and returns what Amazon should receive, or
None when the value is unusable. Caches are safe because the functions are pure;
they make the same identity in every event of a batch cost one computation.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import unicodedata
from typing import Any

from app.amazon.schema import COUNTRY_CODES, CURRENCY_CODES

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_NOT_EMAIL = re.compile(r"[^a-z0-9.@_-]")
_NOT_DIGIT = re.compile(r"\D")
_NOT_AZ = re.compile(r"[^a-z]")
_NOT_AZ09 = re.compile(r"[^a-z0-9]")
# "+1" and a 10-digit North American number (area code not starting with 0 or 1) in
# the usual punctuation: the phone library parses it as country code 1 and these ten
# digits (nothing to strip, no extension, no validation at parse time), so its E.164
# is "1" + the digits (checked against the library on random numbers of this shape).
_NANP_E164 = re.compile(r"\+1[ ().-]*([2-9][0-9]{2})[ ().-]*([0-9]{3})[ ().-]*([0-9]{4})")
_ZERO_MAID = "00000000-0000-0000-0000-000000000000"
# Per-identity caches (email, phone, extended keys) hold about 270 bytes an entry. A hit
# across batches saves a hash of a few microseconds (a batch's own repeats are already
# handled once per user by the mapper), or a phone parse of ~20 µs for numbers outside
# North America. At 65,536 entries the email cache alone grew a worker by ~18 MB over the
# first 20 minutes of a soak with a new shopper per batch (docs/reliability.md, fifth
# soak); 4,096 bounds each at ~1.1 MB, full within the first minute under that load.
_CACHE = 4096


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _prehashed(text: str) -> str | None:
    return text.lower() if len(text) == 64 and _HEX64.fullmatch(text) else None


@functools.lru_cache(maxsize=_CACHE)
def email_key(raw: str) -> str | None:
    """SHA-256 of the normalised email: trim, lowercase, keep [a-z0-9.@_-]."""
    text = raw.strip()
    hashed = _prehashed(text)
    if hashed:
        return hashed
    normalised = _NOT_EMAIL.sub("", text.lower())
    return sha256_hex(normalised) if normalised else None


@functools.lru_cache(maxsize=_CACHE)
def phone_digits(raw: str, region: str | None) -> str:
    """E.164 digits without '+', parsed with ``region`` as the default region.

    Numbers the phone library cannot parse keep their digits, leading zeros removed.
    """
    nanp = _NANP_E164.fullmatch(raw)
    if nanp:  # the library's answer for this shape, without its ~20 µs parse
        return "1" + "".join(nanp.groups())
    import phonenumbers  # imported on first use: it is large and not always needed

    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return _NOT_DIGIT.sub("", raw).lstrip("0")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")


@functools.lru_cache(maxsize=_CACHE)
def phone_key(raw: str, region: str | None) -> str | None:
    text = raw.strip()
    hashed = _prehashed(text)
    if hashed:
        return hashed
    if not any(ch.isdigit() for ch in text):
        return None
    digits = phone_digits(text, region)
    return sha256_hex(digits) if digits else None


def maid_key(raw: str) -> str | None:
    """Mobile ad ids go raw: trimmed, lowercased; empty and all-zero ids are unusable."""
    text = raw.strip().lower()
    return text if text and text != _ZERO_MAID else None


def match_id_key(raw: str) -> str | None:
    text = raw.strip()
    return text if text and len(text) <= 100 else None


# --- extended match keys (amazon-api.md §Normalisation) ---------------------------

_FOLD = str.maketrans({"ß": "ss", "ä": "ae", "ö": "oe", "ü": "ue", "ø": "o", "æ": "ae"})


def _fold_accents(text: str) -> str:
    text = text.translate(_FOLD)
    return "".join(
        ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)
    )


_US_CA_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "newhampshire": "nh", "newjersey": "nj",
    "newmexico": "nm", "newyork": "ny", "northcarolina": "nc", "northdakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa",
    "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd", "tennessee": "tn",
    "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy", "puertorico": "pr",
    "alberta": "ab", "britishcolumbia": "bc", "manitoba": "mb", "newbrunswick": "nb",
    "newfoundlandandlabrador": "nl", "novascotia": "ns", "ontario": "on",
    "princeedwardisland": "pe", "quebec": "qc", "saskatchewan": "sk",
    "northwestterritories": "nt", "nunavut": "nu", "yukon": "yt",
}  # fmt: skip

_STREET_WORDS = {
    "street": "st", "avenue": "ave", "road": "rd", "drive": "dr", "lane": "ln",
    "boulevard": "blvd", "court": "ct", "place": "pl", "square": "sq", "highway": "hwy",
    "parkway": "pkwy", "north": "n", "south": "s", "east": "e", "west": "w",
    "northeast": "ne", "northwest": "nw", "southeast": "se", "southwest": "sw",
}  # fmt: skip
_PUNCTUATION = re.compile(r"[^a-z0-9\s]")


def _name_text(raw: str) -> str:
    return _NOT_AZ.sub("", raw.strip().lower())


def _city_text(raw: str) -> str:
    return _NOT_AZ09.sub("", raw.strip().lower())


def _state_text(raw: str) -> str:
    folded = _NOT_AZ09.sub("", _fold_accents(raw.strip().lower()))
    return _US_CA_STATES.get(folded, folded)[:2]


def _postal_text(raw: str) -> str:
    return _NOT_AZ09.sub("", raw.strip().lower().split("-", 1)[0])


def _address_text(raw: str) -> str:
    text = _fold_accents(raw.strip().lower()).replace("#", " number ")
    words = _PUNCTUATION.sub(" ", text).split()
    return "".join(_STREET_WORDS.get(word, word) for word in words)


_EXTENDED_TEXT = {
    "FIRST_NAME": _name_text,
    "LAST_NAME": _name_text,
    "CITY": _city_text,
    "STATE": _state_text,
    "POSTAL": _postal_text,
    "ADDRESS": _address_text,
}


@functools.lru_cache(maxsize=_CACHE)
def extended_key(key_type: str, raw: str) -> str | None:
    """SHA-256 of an extended match key after Amazon's normalisation for its type."""
    hashed = _prehashed(raw.strip())
    if hashed:
        return hashed
    text = _EXTENDED_TEXT[key_type](raw)
    return sha256_hex(text) if text else None


# --- codes -----------------------------------------------------------------------

_COUNTRY_EXCEPTIONS = {"UK": "GB"}


@functools.lru_cache(maxsize=4096)
def _country_text(text: str) -> str | None:
    import pycountry  # loads its database on first use

    code = text.strip().upper()
    if not code:
        return None
    code = _COUNTRY_EXCEPTIONS.get(code, code)
    country: Any = None
    if len(code) == 2:
        country = pycountry.countries.get(alpha_2=code)
    elif len(code) == 3:
        country = pycountry.countries.get(alpha_3=code)
    elif code.replace(" ", "").replace(",", "").replace(".", "").replace("-", "").isalpha():
        try:
            country = pycountry.countries.lookup(text.strip())
        except LookupError:
            country = None
    alpha_2 = getattr(country, "alpha_2", None)
    return alpha_2 if alpha_2 in COUNTRY_CODES else None


def country_code(raw: Any) -> str | None:
    """An assigned ISO 3166-1 alpha-2 code from alpha-2, alpha-3 or an English name."""
    if not isinstance(raw, str) or len(raw) > 100:
        return None
    return _country_text(raw)


def currency_code(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    code = raw.strip().upper()
    return code if code in CURRENCY_CODES else None


def _ipv4_octet(text: str) -> bool:
    # ipaddress's rule: 1-3 ASCII digits, no leading zero, at most 255.
    return (
        text.isascii()
        and text.isdigit()
        and len(text) <= 3
        and (text[0] != "0" or text == "0")
        and int(text) <= 255
    )


@functools.lru_cache(maxsize=4096)
def _ip_text(text: str) -> str | None:
    text = text.strip()
    octets = text.split(".")
    # Dotted IPv4, the usual case, checked as ipaddress would without building an
    # address object (once per user and batch, so a measurable share of a batch).
    if len(octets) == 4 and all(_ipv4_octet(octet) for octet in octets):
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def ip_address(raw: Any) -> str | None:
    """A valid IPv4 or IPv6 address, as sent (trimmed), else None."""
    if not isinstance(raw, str) or len(raw) > 64:
        return None
    return raw.strip() if _ip_text(raw) else None


_GRANTED = frozenset({"true", "yes", "1", "on", "granted", "opted_in", "optin"})
_DENIED = frozenset({"false", "no", "0", "off", "denied", "opted_out", "optout"})


def consent_status(raw: Any) -> str | None:
    """GRANTED / DENIED from the many spellings CDPs use; anything else is None."""
    if isinstance(raw, bool):
        return "GRANTED" if raw else "DENIED"
    if isinstance(raw, int | float):
        text = repr(raw) if isinstance(raw, float) else str(raw)
    elif isinstance(raw, str):
        text = raw.strip().lower()
    else:
        return None
    if text in _GRANTED:
        return "GRANTED"
    if text in _DENIED:
        return "DENIED"
    return None
