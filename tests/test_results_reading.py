"""Reading Amazon's 207: the shortcuts for the usual all-accepted answer (on the parsed
body, and on the raw bytes) give exactly the reading the general code gives, for any
answer body (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.amazon import results

INDEXES = st.one_of(st.integers(min_value=-2, max_value=8), st.booleans(), st.floats(0, 8))
ITEMS = st.one_of(
    st.fixed_dictionaries({"index": INDEXES}),
    st.fixed_dictionaries(
        {
            "index": INDEXES,
            "errors": st.lists(
                st.fixed_dictionaries(
                    {"code": st.sampled_from(["INVALID", "TOO_MANY_REQUESTS", "INTERNAL_ERROR"])}
                ),
                min_size=1,
                max_size=2,
            ),
        }
    ),
    st.integers(),
)


@st.composite
def answers(draw: st.DrawFn) -> tuple[dict[str, Any], list[int]]:
    count = draw(st.integers(min_value=1, max_value=6))
    index_map = sorted(draw(st.sets(st.integers(0, 50), min_size=count, max_size=count)))
    if draw(st.booleans()):  # the usual answer, in order: the shortcut's case
        success: Any = [{"index": i} for i in range(count)]
    else:
        success = draw(st.one_of(st.lists(ITEMS, max_size=8), st.none(), st.just({})))
    body: dict[str, Any] = {"success": success}
    error = draw(st.one_of(st.none(), st.just([]), st.lists(ITEMS, max_size=4), st.just("")))
    if error is not None:
        body["error"] = error
    return body, index_map


@settings(max_examples=1500, deadline=None)
@given(answer=answers())
def test_the_all_accepted_shortcut_reads_as_the_general_code(
    answer: tuple[dict[str, Any], list[int]],
) -> None:
    body, index_map = answer
    fast = results.read_response(207, body, None, index_map)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(results, "_all_accepted", lambda _body, _count: False)
        general = results.read_response(207, body, None, index_map)
    assert fast.verdict == general.verdict
    assert [r.as_dict() for r in fast.results] == [r.as_dict() for r in general.results]
    assert fast.pending_positions == general.pending_positions


# --- the raw-bytes reading (read_answer) ---------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def echoed_answers(draw: st.DrawFn) -> tuple[dict[str, Any], list[int]]:
    """``answers()`` with Amazon's echo of each event (any JSON) and other keys added."""
    body, index_map = draw(answers())
    for key in ("success", "error"):
        items = body.get(key)
        if isinstance(items, list):
            body[key] = [
                {**item, "event": draw(JSON_VALUES)} if isinstance(item, dict) else item
                for item in items
            ]
    if draw(st.booleans()):
        body["requestId"] = draw(JSON_VALUES)
    return body, index_map


def _general(body: Any, index_map: list[int]) -> results.Reading:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(results, "_all_accepted", lambda _body, _count: False)
        return results.read_response(207, body, None, index_map)


def _same(a: results.Reading, b: results.Reading) -> None:
    assert a.verdict == b.verdict
    assert [r.as_dict() for r in a.results] == [r.as_dict() for r in b.results]
    assert a.pending_positions == b.pending_positions
    assert a.error == b.error


@settings(max_examples=1500, deadline=None)
@given(answer=echoed_answers(), pretty=st.booleans())
def test_reading_the_raw_answer_equals_the_general_reading_of_the_parsed_body(
    answer: tuple[dict[str, Any], list[int]], pretty: bool
) -> None:
    body, index_map = answer
    # Amazon's own spacing is not ours to know: compact and indented text both.
    raw = json.dumps(body, indent=2 if pretty else None).encode()
    # The reference is the general reading of what the relay would parse of those bytes
    # (an integer beyond 64 bits makes orjson refuse the body: no per-event results).
    _same(
        results.read_answer(207, raw, None, index_map), _general(results.parse_body(raw), index_map)
    )


def test_the_usual_answer_is_read_without_building_the_echoed_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = [
        {"name": f"e{i}", "matchKeys": [{"type": "EMAIL", "values": ["ab" * 32]}]} for i in range(3)
    ]
    raw = orjson.dumps({"success": [{"index": i, "event": e} for i, e in enumerate(events)]})

    def no_parse(_raw: bytes) -> Any:
        raise AssertionError("the all-accepted answer was parsed in full")

    monkeypatch.setattr(results, "parse_body", no_parse)
    reading = results.read_answer(207, raw, None, [4, 7, 9])
    assert reading.verdict is results.Verdict.DONE
    assert [r.as_dict() for r in reading.results] == [
        {"index": 4, "status": "ok"},
        {"index": 7, "status": "ok"},
        {"index": 9, "status": "ok"},
    ]


@pytest.mark.parametrize(
    ("raw", "verdict"),
    [
        # Not UTF-8 inside an echoed event: orjson refuses the whole body, so it reads as
        # an answer without per-event results (sent again), the shortcut must agree.
        (b'{"success":[{"index":0,"event":{"name":"\xff"}}]}', results.Verdict.RETRY),
        (b'{"success":[{"index":0,"event":{"\xc3":1}}]}', results.Verdict.RETRY),
        # UTF-8 beyond ASCII is fine.
        ('{"success":[{"index":0,"event":{"name":"café"}}]}'.encode(), results.Verdict.DONE),
        # Repeated keys: the last one counts, in both readings.
        (b'{"success":[{"index":5}],"success":[{"index":0}]}', results.Verdict.DONE),
        (b'{"success":[{"index":0,"index":3}]}', results.Verdict.RETRY),
        # The documented exception: a number orjson cannot hold, inside an echoed event.
        (b'{"success":[{"index":0,"event":{"value":1e999}}]}', results.Verdict.DONE),
        (
            b'{"success":[{"index":0,"event":{"value":123456789012345678901}}]}',
            results.Verdict.DONE,
        ),
        # Not JSON, or trailing bytes: no per-event results.
        (b'{"success":[{"index":0}]} x', results.Verdict.RETRY),
        (b"", results.Verdict.RETRY),
        # error present but empty in another type: the general reading, same verdict.
        (b'{"success":[{"index":0}],"error":null}', results.Verdict.DONE),
        (b'{"success":[{"index":0.0}]}', results.Verdict.RETRY),
        (b'{"success":[{"index":true}]}', results.Verdict.RETRY),
    ],
)
def test_raw_answers_at_the_edges(raw: bytes, verdict: results.Verdict) -> None:
    assert results.read_answer(207, raw, None, [0]).verdict is verdict


def test_accepted_outcomes_are_the_same_values_wherever_the_index_lies() -> None:
    """Shared instances below the cache's end, fresh ones past it: equal to new ones."""
    index_map = [0, 1, 9_999, 10_000, 123_456, 5]
    reading = results.read_answer(
        207, orjson.dumps({"success": [{"index": i} for i in range(6)]}), None, index_map
    )
    assert reading.verdict is results.Verdict.DONE
    assert reading.results == [results.EventResult(i, ok=True) for i in index_map]
    assert [r.as_dict() for r in reading.results] == [
        {"index": i, "status": "ok"} for i in index_map
    ]
