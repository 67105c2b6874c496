"""Reading Amazon's 207: the shortcut for the usual all-accepted answer gives exactly
the reading the general code gives, for any answer body (hypothesis)."""

from __future__ import annotations

from typing import Any

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
