"""The strict JSON decoder's fast path answers exactly as its reference path.

``strict_json`` takes orjson's reading when it can prove it equal to the standard
library's with hooks (no integer beyond 64 bits, no repeated key). These properties
generate JSON texts built to defeat that proof: repeated keys at any depth, colons in
keys and strings, escapes, whitespace around colons, long integers, and compare both
paths: the same value (types included) or the same refusal. The same holds for the
canonical text that deterministic eventIds hash (jsonutil.canonical_text).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.deps import exact_strict_json, strict_json
from app.errors import PayloadError
from app.jsonutil import canonical_text

TRICKY_TEXT = st.text(alphabet=st.sampled_from(["a", ":", '"', "\\", "é", " ", "\u2028", "0"]))
KEYS = st.sampled_from(["a", "b", "a:b", ":", '"', "é"]) | TRICKY_TEXT
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT
)


def render(value: Any, draw: st.DrawFn) -> str:
    """JSON text of ``value`` with random spacing and, for objects, maybe a repeated
    key (the generator's dicts cannot hold one, so repeats are written in)."""
    space = draw(st.sampled_from(["", " ", "\n\t"]))
    if isinstance(value, dict):
        members: list[tuple[Any, Any]] = list(value.items())
        if members and bool(draw(st.booleans())):
            members.append(draw(st.sampled_from(members)))  # a repeated key
        inner = f",{space}".join(
            f"{json.dumps(k, ensure_ascii=draw(st.booleans()))}{space}:{space}{render(v, draw)}"
            for k, v in members
        )
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(render(v, draw) for v in value) + "]"
    return json.dumps(value, ensure_ascii=draw(st.booleans()))


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    value = draw(
        st.recursive(
            SCALARS,
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4)
            ),
            max_leaves=12,
        )
    )
    return render(value, draw).encode()


def outcome(decode: Any, body: bytes) -> tuple[str, Any]:
    try:
        value = decode(body)
    except PayloadError as error:
        return ("refused", error.message)
    return ("value", json.dumps(value, sort_keys=False))  # exact types: 1 vs 1.0 differ


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=documents())
def test_the_fast_path_answers_as_the_exact_path(body: bytes) -> None:
    assert outcome(strict_json, body) == outcome(exact_strict_json, body)


def test_a_repeated_key_is_refused_however_it_is_written() -> None:
    for body in (
        b'{"a":1,"a":2}',
        b'{"a":1, "a" :2}',
        b'{"x":{"k":"v:w","k":"z"}}',
        b'[{"a":"\\"","a":1}]',
        b'{"a":1,"\\u0061":2}',
        b'{"a":1,"a":2,"s":"\\u003a"}',
    ):
        refused = outcome(strict_json, body)
        assert refused[0] == "refused", body
        assert "appears twice" in refused[1]


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # any code point: controls, DEL, non-ASCII, lone surrogates
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=15,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSONISH)
def test_canonical_text_is_the_standard_librarys_text(value: Any) -> None:
    """Deterministic eventIds hash this text: its fast path must never change it."""
    assert canonical_text(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))
