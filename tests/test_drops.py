"""Batches whose every event was dropped (docs/decisions/0011-drop-records.md).

Such a batch has no delivery: before ``dropped_batches`` it vanished from the web UI.
These tests show that it is now counted (totals, reasons, hourly chart) and listed; that
each batch's drops are counted once, whether they sit on its first delivery or in a
``dropped_batches`` row; that the row is part of the ingest transaction; that
concurrent ingests do not wait on each other to write it; and that drops stored before
the migration are still counted. Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from e2e_helpers import (
    Stack,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    now_ms,
    relay_stack,
    sdk_batch,
    sdk_custom_event,
    sdk_purchase,
)
from sqlalchemy import Connection as SyncConnection
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import repository as repo
from app.db import stats
from app.db.migrate import alembic_config, migrate
from app.db.models import Connection, Delivery, DroppedBatch, Output
from app.db.session import create_engine, create_sessionmaker
from app.ingest import accept_batch

DAY_MS = 86_400_000
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def all_dropped_batch(first_id: int) -> dict[str, Any]:
    """Two events, neither forwarded: one not a commerce event, one older than 24 h."""
    return sdk_batch(
        [sdk_custom_event("Viewed Home"), sdk_purchase(first_id, when_ms=now_ms() - 3 * DAY_MS)]
    )


def mixed_batch(first_id: int) -> dict[str, Any]:
    """One purchase forwarded, one custom event dropped."""
    return sdk_batch([sdk_purchase(first_id), sdk_custom_event("Viewed Cart")])


ALL_DROPPED = [
    {"index": 0, "reason": "not_commerce_event"},
    {"index": 1, "reason": "too_old"},
]


# --- end to end: real relay and emulator on loopback -------------------------------------


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(database_url, tmp_path) as running:
        yield running


def ui_client(stack: Stack) -> httpx.Client:
    """A browser signed in to the web UI with the admin token."""
    browser = httpx.Client(base_url=stack.relay_url, timeout=30)
    form = browser.get("/ui/login")
    token = CSRF.search(form.text)
    assert token, form.text
    answer = browser.post(
        "/ui/login",
        data={"csrf_token": token.group(1), "password": stack.admin_token, "next": "/ui/"},
    )
    assert answer.status_code == 303, answer.text
    return browser


def stat(page: str, label: str) -> int:
    found = re.search(rf'<span class="stat-value">(\d+)</span> {label}', page)
    assert found, f"no {label!r} on the page"
    return int(found.group(1))


def reasons_table(page: str) -> dict[str, int]:
    table = page.split('id="reasons-caption"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<code>([a-z_]+)</code></th><td class=\"num\">(\d+)</td>", table)
    return {reason: int(count) for reason, count in rows}


def test_all_dropped_batch_reaches_nothing_and_is_counted_in_the_ui(stack: Stack) -> None:
    output, conn = stack.ready_output()
    dropped_answer = stack.post_events(conn, all_dropped_batch(7001))
    assert dropped_answer == {"accepted": 0, "dropped": ALL_DROPPED, "deliveries": []}
    mixed = mixed_batch(7101)
    mixed_answer = stack.post_events(conn, mixed)
    assert mixed_answer["accepted"] == 1
    assert mixed_answer["dropped"] == [{"index": 1, "reason": "not_commerce_event"}]

    stack.wait_settled()
    assert_exactly_the_accepted_reached_amazon(stack, accepted_event_ids(mixed, mixed_answer))
    assert len(stack.received()) == 1  # the all-dropped batch sent nothing

    # Each batch's drops are in one place: the all-dropped batch's row, the mixed
    # batch's first (and only) delivery.
    assert stack.sql("SELECT connection_id, source, dropped_count FROM dropped_batches") == [
        (conn.id, "mparticle", 2)
    ]
    (delivery,) = stack.deliveries(output_id=output["id"])
    assert delivery["dropped"] == mixed_answer["dropped"]

    browser = ui_client(stack)
    page = browser.get(f"/ui/outputs/{output['id']}").text
    flat = re.sub(r"\s+", " ", page)
    assert stat(flat, "events forwarded") == 1
    assert stat(flat, "events dropped") == 3  # 2 + 1: the mixed batch's drop counted once
    assert stat(flat, "Amazon requests") == 1
    assert reasons_table(page) == {"not_commerce_event": 2, "too_old": 1}
    assert "1 event(s) forwarded and 3 dropped in 24 hour(s)" in page
    # The all-dropped batch, which has no delivery to show, is listed on its own.
    listed = flat.split('id="dropped-batches-caption"', 1)[1].split("</table>", 1)[0]
    assert listed.count("<tr>") == 2  # the header and the batch
    assert "<code>not_commerce_event</code>: 1" in listed
    assert "<code>too_old</code>: 1" in listed
    deliveries = flat.split('id="deliveries-caption"', 1)[1].split("</table>", 1)[0]
    assert deliveries.count("<tr>") == 2  # the header and the mixed batch's delivery
    listing = browser.get("/ui/").text
    assert re.findall(r'<td class="num">(\d+)</td>', listing) == ["1", "3"]
    browser.close()


def test_bulk_counts_each_batch_once(stack: Stack) -> None:
    output, conn = stack.ready_output()
    clean = sdk_batch([7201, 7202])
    batches = [all_dropped_batch(7301), mixed_batch(7401), clean]
    answer = stack.client.post("/v2/bulkevents", json=batches, auth=conn.auth)
    assert answer.status_code == 202, answer.text
    answers = answer.json()["batches"]
    assert [a["accepted"] for a in answers] == [0, 1, 2]
    assert [len(a["dropped"]) for a in answers] == [2, 1, 0]
    stack.wait_settled()
    accepted = set().union(
        *(accepted_event_ids(b, a) for b, a in zip(batches, answers, strict=True))
    )
    assert_exactly_the_accepted_reached_amazon(stack, accepted)

    # Only the batch that queued no delivery has a row: the others write what they did.
    assert stack.sql("SELECT dropped_count FROM dropped_batches") == [(2,)]

    async def counts() -> tuple[stats.Totals, list[tuple[str, int]], list[stats.HourCount]]:
        engine = create_engine(stack.database_url)
        try:
            async with create_sessionmaker(engine)() as session:
                now = datetime.now(UTC)
                since = now - timedelta(hours=24)
                totals = (await stats.totals_by_output(session, [output["id"]], since=since))[
                    output["id"]
                ]
                reasons = await stats.drop_reasons(session, [output["id"]], since=since)
                hours = await stats.hourly(session, [output["id"]], now=now)
                return totals, reasons, hours
        finally:
            await engine.dispose()

    totals, reasons, hours = asyncio.run(counts())
    assert totals == stats.Totals(forwarded=3, dropped=3, deliveries=2)
    assert reasons == [("not_commerce_event", 2), ("too_old", 1)]
    busy = [h for h in hours if h.forwarded or h.dropped]
    # One hour, or two if the clock crossed an hour between ingest and this read.
    assert 1 <= len(busy) <= 2
    assert sum(h.forwarded for h in busy) == 3
    assert sum(h.dropped for h in busy) == 3


# --- the ingest transaction ---------------------------------------------------------------


async def _output_and_connection(session: AsyncSession) -> tuple[Output, Connection]:
    output = await repo.create_output(session, name="Shop", advertiser_id="1234567890")
    created = await repo.create_connection(
        session, output_id=output.id, source="mparticle", name="web"
    )
    await session.commit()
    return output, created.connection


async def test_dropped_batch_is_part_of_the_ingest_transaction(session: AsyncSession) -> None:
    output, connection = await _output_and_connection(session)
    output_id, connection_id = output.id, connection.id
    now = datetime.now(UTC)
    summary = await accept_batch(
        session, output=output, connection=connection, payload=all_dropped_batch(1), now=now
    )
    await session.rollback()  # e.g. the commit failed: the client was not answered 2xx
    assert (summary.accepted, summary.deliveries) == (0, [])
    assert (await session.scalars(select(DroppedBatch))).all() == []

    reloaded_output = await repo.get_output(session, output_id)
    reloaded_connection = await repo.get_connection(session, connection_id)
    assert reloaded_output is not None
    assert reloaded_connection is not None
    output, connection = reloaded_output, reloaded_connection
    summary = await accept_batch(
        session, output=output, connection=connection, payload=all_dropped_batch(2), now=now
    )
    mixed = await accept_batch(
        session, output=output, connection=connection, payload=mixed_batch(3), now=now
    )
    await session.commit()
    (record,) = (await session.scalars(select(DroppedBatch))).all()
    assert (record.output_id, record.connection_id, record.source) == (
        output.id,
        connection.id,
        "mparticle",
    )
    assert record.dropped_count == 2
    assert record.dropped == summary.dropped == ALL_DROPPED
    assert record.created_at == now
    assert record.batch_id.startswith("bat_")
    # The mixed batch keeps its drops on its delivery, as before, and has no row.
    (delivery,) = (await session.scalars(select(Delivery))).all()
    assert delivery.dropped == mixed.dropped == [{"index": 1, "reason": "not_commerce_event"}]
    assert delivery.batch_id != record.batch_id
    totals = await stats.totals_by_output(session, [output.id], since=now - timedelta(hours=1))
    assert totals[output.id] == stats.Totals(forwarded=1, dropped=3, deliveries=1)


async def test_concurrent_ingests_never_wait_on_a_shared_row(
    sessionmaker: async_sessionmaker[AsyncSession], backend: str
) -> None:
    async with sessionmaker() as session:
        output, connection = await _output_and_connection(session)
    now = datetime.now(UTC)

    async def ingest(number: int) -> None:
        async with sessionmaker() as session, session.begin():
            await accept_batch(
                session,
                output=output,
                connection=connection,
                payload=all_dropped_batch(number),
                now=now,
            )

    await asyncio.gather(*(ingest(n) for n in range(20)))

    if backend == "postgresql":
        # Two ingests into one output, both uncommitted: the second writes its record at
        # once. A counter row per output would make it wait for the first to commit (and
        # fail here: lock_timeout turns that wait into an error).
        async with (
            sessionmaker() as first,
            sessionmaker() as second,
            first.begin(),
            second.begin(),
        ):
            await accept_batch(
                first,
                output=output,
                connection=connection,
                payload=all_dropped_batch(100),
                now=now,
            )
            await second.execute(text("SET LOCAL lock_timeout = '500ms'"))
            await accept_batch(
                second,
                output=output,
                connection=connection,
                payload=all_dropped_batch(101),
                now=now,
            )
        expected_batches = 22
    else:
        expected_batches = 20  # SQLite has a single writer: the gather above serialised

    async with sessionmaker() as session:
        totals = await stats.totals_by_output(session, [output.id], since=now - timedelta(hours=1))
        reasons = await stats.drop_reasons(session, [output.id], since=now - timedelta(hours=1))
        ids = set((await session.scalars(select(DroppedBatch.batch_id))).all())
    assert totals[output.id] == stats.Totals(dropped=2 * expected_batches)
    assert reasons == [("not_commerce_event", expected_batches), ("too_old", expected_batches)]
    assert len(ids) == expected_batches


async def test_records_follow_their_output_and_connection(session: AsyncSession) -> None:
    output, connection = await _output_and_connection(session)
    now = datetime.now(UTC)
    await accept_batch(
        session, output=output, connection=connection, payload=all_dropped_batch(1), now=now
    )
    await session.commit()
    # A deleted connection keeps its batches' history, unattributed.
    assert await repo.delete_connection(session, connection.id)
    await session.commit()
    session.expunge_all()
    (record,) = await repo.recent_dropped_batches(session, output.id)
    assert record.connection_id is None
    since = now - timedelta(hours=1)
    assert (await stats.totals_by_output(session, [output.id], since=since))[output.id].dropped == 2
    # A deleted output takes its records with it.
    assert await repo.delete_output(session, output.id)
    await session.commit()
    assert (await session.scalars(select(DroppedBatch))).all() == []


# --- the migration ---------------------------------------------------------------------


async def test_drops_stored_before_the_migration_are_still_counted(
    empty_database_url: str,
) -> None:
    engine = create_engine(empty_database_url)

    def upgrade_to(revision: str) -> Any:
        def run(connection: SyncConnection) -> None:
            config = alembic_config(empty_database_url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

        return run

    try:
        async with engine.begin() as connection:
            await connection.run_sync(upgrade_to("0002"))
        moment = datetime(2025, 6, 1, 9, 30, tzinfo=UTC)
        drops = [{"index": 3, "reason": "too_old"}, {"index": 4, "reason": "no_match_key"}]
        async with create_sessionmaker(engine)() as session:
            output = await repo.create_output(session, name="Old", advertiser_id="1")

            def request(events: int, dropped: list[Any] | None) -> repo.NewDelivery:
                return repo.NewDelivery(
                    output_id=output.id,
                    source="segment",
                    body=b"{}",
                    index_map=list(range(events)),
                    dropped=dropped,
                )

            # As 0002-era ingest wrote a batch: its drops on its first request only.
            await repo.insert_deliveries(session, [request(2, drops), request(1, None)], now=moment)
            await session.commit()
        await migrate(empty_database_url)
        async with create_sessionmaker(engine)() as session:
            assert (await session.scalars(select(DroppedBatch))).all() == []
            since = moment - timedelta(hours=1)
            totals = await stats.totals_by_output(session, [output.id], since=since)
            assert totals[output.id] == stats.Totals(forwarded=3, dropped=2, deliveries=2)
            assert await stats.drop_reasons(session, [output.id], since=since) == [
                ("no_match_key", 1),
                ("too_old", 1),
            ]
    finally:
        await engine.dispose()
