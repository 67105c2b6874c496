"""Ingest hands fresh deliveries straight to its own dispatcher, and pushes back when
the dispatcher is far behind (docs/decisions/0012-hot-path.md).

Over real HTTP, on SQLite and PostgreSQL: batches posted while the dispatcher has free
slots are leased in the ingest's own transaction and sent without any claim; with
Amazon slow and every slot busy, the backlog grows to its limit and the next batch is
answered 503 with Retry-After (nothing stored), and every accepted event still
reaches Amazon exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    relay_stack,
    sdk_batch,
)

from app.config import DISPATCH_CONCURRENCY
from app.db import hot
from app.delivery import dispatcher as dispatcher_module


def test_fresh_deliveries_are_sent_without_a_claim(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claimed: list[int] = []

    def counted(real: Any) -> Any:
        async def counted_claim_due(*args: Any, **kwargs: Any) -> Any:
            rows = await real(*args, **kwargs)
            claimed.append(len(rows))
            return rows

        return counted_claim_due

    # The dispatcher claims through the backend's hot statements (app/db/hot.py).
    for statements in (hot.DriverStatements, hot.SessionStatements, hot.ThreadStatements):
        monkeypatch.setattr(statements, "claim_due", counted(statements.claim_due))
    with relay_stack(database_url, tmp_path) as stack:
        _, conn = stack.ready_output()
        accepted: set[str] = set()
        for n in range(20):
            batch = sdk_batch([n + 1])
            accepted |= accepted_event_ids(batch, stack.post_events(conn, batch))
        found = stack.wait_settled()
        assert len(found) == 20
        assert {d["status"] for d in found} == {"delivered"}
        assert {d["attempts"] for d in found} == {1}
        assert claimed, "the claim loop never ran"
        assert sum(claimed) == 0  # it ran, and found nothing left to take
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


@pytest.mark.parametrize("slots", [DISPATCH_CONCURRENCY, 8])  # the default; a setting
def test_a_dispatcher_far_behind_makes_ingest_answer_503(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slots: int
) -> None:
    """``slots`` deliveries go out at once (RELAY_DISPATCH_CONCURRENCY), the next
    ``BACKLOG_LIMIT`` wait in the queue, and the one after is refused."""
    backlog_limit = 40
    monkeypatch.setattr(dispatcher_module, "BACKLOG_LIMIT", backlog_limit)
    with relay_stack(database_url, tmp_path, http_timeout=30, dispatch_concurrency=slots) as stack:
        _, conn = stack.ready_output()
        stack.fault({"delay": 5, "count": 1000})  # every slot stays busy for a while
        accepted: set[str] = set()
        codes: list[int] = []
        for n in range(slots + backlog_limit + 20):
            batch = sdk_batch([n + 1])
            answer = stack.client.post("/v2/events", json=batch, auth=conn.auth)
            codes.append(answer.status_code)
            if answer.status_code != 202:
                assert answer.status_code == 503, answer.text
                assert answer.headers["retry-after"] == "5"
                break
            accepted |= accepted_event_ids(batch, answer.json())
        assert codes[-1] == 503
        assert codes.count(202) == slots + backlog_limit
        refused_at = len(codes)
        stored = stack.sql("SELECT COUNT(*) FROM deliveries")[0][0]
        assert stored == refused_at - 1  # the refused batch left nothing behind

        stack.amazon.delete("/_emulator/faults")
        stack.wait_settled(timeout=90)
        assert_exactly_the_accepted_reached_amazon(stack, accepted)


def test_an_outcome_write_that_fails_once_is_written_again_not_resent(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Amazon answered, and the database refused the first write of that answer (a
    restart, say): the dispatcher writes it again rather than leave the delivery to its
    lease, which would send it to Amazon a second time."""
    failures = [OSError("connection reset while writing the outcome")]
    # The outcome is written by the backend's hot statements (app/db/hot.py).
    for statements in (hot.DriverStatements, hot.SessionStatements, hot.ThreadStatements):
        real_update = statements.update_held

        async def update_failing_once(*args: Any, _real: Any = real_update) -> Any:
            if failures:
                raise failures.pop()
            return await _real(*args)

        monkeypatch.setattr(statements, "update_held", update_failing_once)
    with relay_stack(database_url, tmp_path) as stack:
        _, conn = stack.ready_output()
        batch = sdk_batch([1, 2, 3])
        accepted = accepted_event_ids(batch, stack.post_events(conn, batch))
        (found,) = stack.wait_settled()
        assert failures == []  # the failure happened
        assert found["status"] == "delivered"
        assert found["attempts"] == 1
        assert len(stack.received()) == 1  # one request to Amazon: no resend
        assert_exactly_the_accepted_reached_amazon(stack, accepted)
