"""``relay upload``: streaming readers, batching, checkpoint/resume, both sinks.

Pure parts are tested directly; the database mode runs on SQLite and PostgreSQL
(``database_url``), with a few thousand rows, interruptions and re-runs; the HTTP
mode posts to a real relay on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from app import upload
from app.cli import main
from app.config import isolated_settings
from app.db import repository as repo
from app.db.models import Connection, Delivery
from app.db.session import create_engine, create_sessionmaker
from app.localserver import serve_in_thread
from app.main import create_app
from app.upload import (
    BatchOutcome,
    Checkpoint,
    DatabaseSink,
    FileFormat,
    Row,
    Totals,
    UploadError,
    UploadOptions,
    batched,
    csv_rows,
    detect_format,
    json_array_rows,
    json_document_rows,
    ndjson_rows,
    stream_upload,
)

HEADER = "event_type,event_time,event_value,currency,country_code,email,event_id\n"


def now_ms() -> int:
    return int(time.time() * 1000)


def csv_text(rows: int, *, bad_every: int = 0, with_ids: bool = False) -> str:
    """``rows`` purchases of distinct shoppers, recent; every ``bad_every``-th row invalid."""
    moment = now_ms() - 60_000
    lines = [HEADER]
    for i in range(1, rows + 1):
        value = "oops" if bad_every and i % bad_every == 0 else f"{i % 50 + 1}.25"
        event_id = f"ev-{i}" if with_ids else ""
        lines.append(f"purchase,{moment - i},{value},usd,US,user{i}@example.com,{event_id}\n")
    return "".join(lines)


# --- pure: formats and readers -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        ("a.csv", b"[", FileFormat.CSV),
        ("a.ndjson", b"[1]", FileFormat.NDJSON),
        ("a.jsonl", b"", FileFormat.NDJSON),
        ("a.json", b'  [{"a": 1}]', FileFormat.JSON),
        ("a.json", b'{"a": 1}\n{"a": 2}\n', FileFormat.NDJSON),
        ("a.json", b'{\n "records": []\n}', FileFormat.JSON),
        ("a.json", b"event_type\n", FileFormat.JSON),
        ("export.txt", b"\xef\xbb\xbf[{}]", FileFormat.JSON),
        ("export", b'{"event_type": "lead"}\n', FileFormat.NDJSON),
        ("export", b"event_type,email\n", FileFormat.CSV),
    ],
)
def test_detect_format(name: str, head: bytes, expected: FileFormat) -> None:
    assert detect_format(name, head) is expected


def test_csv_rows_numbers_lines_and_shapes() -> None:
    text = (
        "event_type,email,event_name\n"
        "\n"
        'purchase,a@x.com,"two\nlines"\n'
        "lead,b@x.com\n"
        "lead,c@x.com,n,surplus\n"
    )
    rows = list(csv_rows(text.splitlines(keepends=True)))
    assert [(r.number, r.line) for r in rows] == [(1, 3), (2, 5), (3, 6)]
    assert rows[0].record == {
        "event_type": "purchase",
        "email": "a@x.com",
        "event_name": "two\nlines",
    }
    assert rows[1].record == {"event_type": "lead", "email": "b@x.com", "event_name": None}
    assert rows[2].problem == "row has more fields than the header row"  # as /v1/records


def test_csv_rows_empty_and_header_only() -> None:
    assert list(csv_rows([])) == []
    assert list(csv_rows(["a,b\n"])) == []


def test_ndjson_rows_skip_blank_and_report_bad_lines() -> None:
    lines = [b'\xef\xbb\xbf{"a": 1}\n', b"\n", b"{not json\n", b"  \n", b'{"a": 2}']
    rows = list(ndjson_rows(lines))
    assert [(r.number, r.line, r.record, r.problem) for r in rows] == [
        (1, 1, {"a": 1}, None),
        (2, 3, None, "line is not valid JSON"),
        (3, 5, {"a": 2}, None),
    ]


ARRAY = '[\n {"a": 1, "s": "x,]\\"y"},\n 12345678901234567890123,\n [1, [2]],\n "é",\n true\n]\n'


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_json_array_rows_streams_across_chunk_boundaries(chunk: int) -> None:
    pieces = [ARRAY[i : i + chunk] for i in range(0, len(ARRAY), chunk)]
    rows = list(json_array_rows(pieces))
    assert [r.record for r in rows] == [
        {"a": 1, "s": 'x,]"y'},
        12345678901234567890123,
        [1, [2]],
        "é",
        True,
    ]
    assert [r.line for r in rows] == [2, 3, 4, 5, 6]
    assert [r.number for r in rows] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("text", ["[]", " [ ] ", ""])
def test_json_array_rows_empty(text: str) -> None:
    assert list(json_array_rows([text])) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[{"a": 1}', "ends before its closing ]"),
        ('[{"a": 1},]', "line 1"),
        ('[{"a": 1} {"a": 2}]', "expected , or ]"),
        ('[{"a": 1}] x', "more after"),
        ('{"a": 1}', "does not start with ["),
        ("[NaN]", "line 1"),
        ('[{"a": 1},\n{"a": }]', "line 2"),
    ],
)
def test_json_array_rows_errors_name_the_line(text: str, problem: str) -> None:
    with pytest.raises(UploadError, match="not valid") as caught:
        list(json_array_rows([text]))
    assert problem in caught.value.message


def test_json_array_rows_yield_before_the_end() -> None:
    """Streaming: the first element arrives before the rest of the input is read."""

    def chunks() -> Iterator[str]:
        yield '[{"a": 1}, '
        raise AssertionError("read too far")

    assert next(json_array_rows(chunks())).record == {"a": 1}


def test_json_document_rows() -> None:
    assert [r.record for r in json_document_rows('{"records": [{"a": 1}, {"a": 2}]}')] == [
        {"a": 1},
        {"a": 2},
    ]
    assert [r.record for r in json_document_rows('{"a": 1}')] == [{"a": 1}]
    with pytest.raises(UploadError):
        list(json_document_rows("3"))


def test_batched() -> None:
    rows = [Row(i, i) for i in range(1, 8)]
    assert [[r.number for r in b] for b in batched(rows, 3)] == [[1, 2, 3], [4, 5, 6], [7]]


def test_checkpoint_round_trip_and_mismatch() -> None:
    totals = Totals()
    totals.add(3, 2, 1, [upload.Drop(2, 3, "invalid_event", "bad")])
    point = Checkpoint("f.csv", 10, "abc", "csv", "output o", rows_done=3, totals=totals)
    again = Checkpoint.from_dict(orjson.loads(orjson.dumps(point.as_dict())))
    assert again.as_dict() == point.as_dict()
    assert point.mismatch(Checkpoint("f.csv", 10, "abc", "csv", "output o")) is None
    assert "changed" in str(point.mismatch(Checkpoint("f.csv", 11, "abc", "csv", "output o")))
    assert "output p" in str(point.mismatch(Checkpoint("f.csv", 10, "abc", "csv", "output p")))


def test_summary_lists_reasons_and_rejected_rows_with_lines(tmp_path: Path) -> None:
    totals = Totals()
    drops = [upload.Drop(i, i + 1, "invalid_event", "event_value is not a number") for i in (4, 9)]
    totals.add(10, 7, 1, [*drops, upload.Drop(5, 6, "too_old")])
    text = "\n".join(
        upload.summary_lines(
            totals,
            resumed_rows=4,
            complete=True,
            checkpoint=tmp_path / "c.json",
            rejects=tmp_path / "r.ndjson",
        )
    )
    assert "rows read:         10" in text
    assert "events forwarded:  7" in text
    assert "invalid_event: 2" in text
    assert "too_old: 1" in text
    assert "line 5 (row 4): invalid_event: event_value is not a number" in text
    assert "resumed: the first 4 row(s)" in text


def test_options_check(tmp_path: Path) -> None:
    file = tmp_path / "r.csv"
    file.write_text(HEADER)
    with pytest.raises(UploadError, match="--output-id is required"):
        UploadOptions(file).check()
    with pytest.raises(UploadError, match="--batch-size"):
        UploadOptions(file, output_id="o", batch_size=501).check()
    with pytest.raises(UploadError, match=r"--concurrency must be 1\.\.16"):
        UploadOptions(file, output_id="o", concurrency=0).check()
    with pytest.raises(UploadError, match=r"--concurrency must be 1\.\.16"):
        UploadOptions(file, output_id="o", concurrency=17).check()
    with pytest.raises(UploadError, match="--key and --secret"):
        UploadOptions(file, url="http://127.0.0.1:1", key="k").check()
    with pytest.raises(UploadError, match="no such file"):
        UploadOptions(tmp_path / "missing.csv", output_id="o").check()


# --- database mode -------------------------------------------------------------------


@asynccontextmanager
async def database_sink(database_url: str, output_id: str) -> AsyncIterator[DatabaseSink]:
    engine = create_engine(database_url)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session, session.begin():
            connection_id, _ = await upload.upload_connection(session, output_id)
        yield DatabaseSink(sessionmaker, output_id, connection_id)
    finally:
        await engine.dispose()


async def new_output(database_url: str, **fields: Any) -> str:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            output = await repo.create_output(
                session, name="Upload", advertiser_id="1234567890", **fields
            )
            return output.id
    finally:
        await engine.dispose()


async def queued_events(database_url: str) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            deliveries = (await session.scalars(select(Delivery))).all()
    finally:
        await engine.dispose()
    return [event for d in deliveries for event in orjson.loads(d.body)["events"]]


class CrashAfter:
    """A sink that fails (like a lost database) once ``batches`` batches are queued."""

    def __init__(self, sink: DatabaseSink, batches: int) -> None:
        self._sink = sink
        self._left = batches
        self.target = sink.target
        self.connection_id = sink.connection_id

    async def send(self, records: list[Any]) -> BatchOutcome:
        if self._left == 0:
            raise ConnectionError("database went away")
        self._left -= 1
        return await self._sink.send(records)


class OutOfOrder:
    """A sink whose batches overlap and finish out of order: of every three started
    together, the last finishes first. It counts how many were being queued at once and
    can fail (like a lost database) on one batch."""

    def __init__(self, sink: DatabaseSink, *, fail_batch: int | None = None) -> None:
        self._sink = sink
        self._fail_batch = fail_batch
        self.target = sink.target
        self.connection_id = sink.connection_id
        self.started = 0
        self.active = 0
        self.most_at_once = 0
        self.finished: list[int] = []

    async def send(self, records: list[Any]) -> BatchOutcome:
        number = self.started
        self.started += 1
        self.active += 1
        self.most_at_once = max(self.most_at_once, self.active)
        try:
            await asyncio.sleep(0.03 * (3 - number % 3))
            if number == self._fail_batch:
                raise ConnectionError("database went away")
            outcome = await self._sink.send(records)
            self.finished.append(number)
            return outcome
        finally:
            self.active -= 1


async def test_batches_in_flight_are_counted_in_file_order(
    database_url: str, tmp_path: Path
) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "big.csv"
    file.write_text(csv_text(2_000, bad_every=250))
    options = UploadOptions(file, output_id=output_id, batch_size=200, concurrency=3)
    async with database_sink(database_url, output_id) as database:
        sink = OutOfOrder(database)
        report = await stream_upload(options, sink)
    assert report.complete, report.error
    assert sink.most_at_once == 3
    assert sink.finished != sorted(sink.finished)  # queued out of order …
    assert report.totals.rows == 2_000  # … counted in order, each once
    assert report.totals.batches == 10
    assert report.totals.forwarded == 1_992
    assert [drop.row for drop in report.totals.rejected] == [250 * i for i in range(1, 9)]
    rejects = [orjson.loads(line) for line in upload.rejects_path(file).read_bytes().splitlines()]
    assert [reject["row"] for reject in rejects] == [250 * i for i in range(1, 9)]
    point = upload.load_checkpoint(upload.checkpoint_path(file))
    assert point is not None
    assert (point.rows_done, point.lines_done, point.complete) == (2_000, 2_001, True)
    events = await queued_events(database_url)
    assert len(events) == len({e["eventId"] for e in events}) == 1_992


async def test_failure_with_batches_in_flight_resumes_after_the_last_counted_batch(
    database_url: str, tmp_path: Path
) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "big.csv"
    file.write_text(csv_text(2_000, bad_every=250))
    options = UploadOptions(file, output_id=output_id, batch_size=200, concurrency=3)
    async with database_sink(database_url, output_id) as database:
        crashed = await stream_upload(options, OutOfOrder(database, fail_batch=4))
        assert crashed.error == "ConnectionError: database went away"
        assert not crashed.complete
        point = upload.load_checkpoint(upload.checkpoint_path(file))
        assert point is not None
        # Batches 0..3 are counted; 4 failed; 5 (queued or not) is not counted.
        assert (point.rows_done, point.complete) == (800, False)
        assert crashed.totals.rows == 800
        resumed = await stream_upload(options, database)
    assert resumed.complete
    assert resumed.resumed_rows == 800
    assert resumed.totals.rows == 2_000
    assert resumed.totals.dropped == Counter({"invalid_event": 8})
    assert len(upload.rejects_path(file).read_bytes().splitlines()) == 8
    events = await queued_events(database_url)
    ids = Counter(e["eventId"] for e in events)
    assert len(ids) == 1_992  # every row is queued, and a row queued twice (a batch
    # after the failed one that committed before it was stopped) has the same eventId.
    assert set(ids.values()) <= {1, 2}
    assert sum(count - 1 for count in ids.values()) <= 2 * 200


async def test_database_upload_csv(database_url: str, tmp_path: Path) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(1_234, bad_every=100))
    async with database_sink(database_url, output_id) as sink:
        report = await stream_upload(UploadOptions(file, output_id=output_id), sink)
    assert report.complete
    assert report.error is None
    assert report.totals.rows == 1_234
    assert report.totals.forwarded == 1_222
    assert report.totals.deliveries == 3  # 500 rows per Events API request
    assert report.totals.dropped == Counter({"invalid_event": 12})
    assert [(d.row, d.line) for d in report.totals.rejected][:2] == [(100, 101), (200, 201)]
    events = await queued_events(database_url)
    assert len(events) == 1_222
    assert len({e["eventId"] for e in events}) == 1_222
    assert all(len(e["eventId"]) == 32 for e in events)  # deterministic ids (no event_id)
    rejects = [orjson.loads(line) for line in upload.rejects_path(file).read_bytes().splitlines()]
    assert rejects[0] == {
        "row": 100,
        "line": 101,
        "reason": "invalid_event",
        "detail": "event_value is not a number",
    }
    assert len(rejects) == 12


async def test_ndjson_and_json_array_files(database_url: str, tmp_path: Path) -> None:
    output_id = await new_output(database_url)
    moment = now_ms() - 1000
    records = [
        {"eventType": "lead", "eventTime": moment, "countryCode": "US", "email": f"u{i}@x.com"}
        for i in range(700)
    ]
    ndjson = tmp_path / "leads.ndjson"
    ndjson.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records[:350]) + b"{oops\n")
    array = tmp_path / "leads.json"
    array.write_bytes(orjson.dumps(records[350:], option=orjson.OPT_INDENT_2))
    async with database_sink(database_url, output_id) as sink:
        first = await stream_upload(UploadOptions(ndjson, output_id=output_id), sink)
        second = await stream_upload(UploadOptions(array, output_id=output_id), sink)
    assert (first.file_format, second.file_format) == (FileFormat.NDJSON, FileFormat.JSON)
    assert (first.totals.rows, first.totals.forwarded) == (351, 350)
    assert (
        first.totals.rejected[0].text()
        == "line 351 (row 351): invalid_event: line is not valid JSON"
    )
    assert (second.totals.rows, second.totals.forwarded) == (350, 350)
    events = await queued_events(database_url)
    assert len(events) == 700
    assert {e["eventDescription"]["conversionType"] for e in events} == {"LEAD"}


async def test_crash_then_resume_sends_every_row_once(database_url: str, tmp_path: Path) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "big.csv"
    file.write_text(csv_text(2_000, bad_every=250))
    options = UploadOptions(file, output_id=output_id, batch_size=200)
    async with database_sink(database_url, output_id) as sink:
        crashed = await stream_upload(options, CrashAfter(sink, 4))
        assert not crashed.complete
        assert crashed.error == "ConnectionError: database went away"
        assert crashed.totals.rows == 800
        point = upload.load_checkpoint(upload.checkpoint_path(file))
        assert point is not None
        assert (point.rows_done, point.complete) == (800, False)
        resumed = await stream_upload(options, sink)
    assert resumed.complete
    assert resumed.resumed_rows == 800
    assert resumed.totals.rows == 2_000  # the whole file, across both runs
    assert resumed.totals.forwarded == 1_992
    assert resumed.totals.dropped == Counter({"invalid_event": 8})
    assert "resumed: the first 800 row(s)" in "\n".join(resumed.lines())
    events = await queued_events(database_url)
    assert len(events) == len({e["eventId"] for e in events}) == 1_992
    rejects = upload.rejects_path(file).read_bytes().splitlines()
    assert len(rejects) == 8  # the rejects file continues, without repeats


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_crash_between_commit_and_checkpoint_repeats_the_same_event_ids(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(900))
    options = UploadOptions(file, output_id=output_id, batch_size=300, concurrency=concurrency)
    real_save = upload.save_checkpoint
    saves = 0

    def flaky_save(path: Path, point: Checkpoint) -> None:
        nonlocal saves
        saves += 1
        if saves == 2:  # the second batch is committed, its checkpoint is not written
            raise OSError("disk full")
        real_save(path, point)

    monkeypatch.setattr(upload, "save_checkpoint", flaky_save)
    async with database_sink(database_url, output_id) as sink:
        crashed = await stream_upload(options, sink)
        assert crashed.error == "OSError: disk full"
        monkeypatch.setattr(upload, "save_checkpoint", real_save)
        resumed = await stream_upload(options, sink)
    assert resumed.complete
    assert resumed.resumed_rows == 300
    events = await queued_events(database_url)
    ids = Counter(e["eventId"] for e in events)
    assert len(ids) == 900  # every row, and …
    twice = sum(1 for count in ids.values() if count == 2)
    assert set(ids.values()) == {1, 2}  # … the second batch twice, with the same eventIds,
    # so Amazon keeps one of each; with 2 in flight, the third batch may have been
    # committed too before the failure stopped it (it is not counted, so it is re-queued).
    assert twice == 300 if concurrency == 1 else twice in (300, 600)


async def test_rerun_of_a_complete_upload_sends_nothing(database_url: str, tmp_path: Path) -> None:
    output_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(10))
    options = UploadOptions(file, output_id=output_id)
    async with database_sink(database_url, output_id) as sink:
        await stream_upload(options, sink)
        again = await stream_upload(options, sink)
        assert again.complete
        assert "nothing was sent" in "\n".join(again.lines())
        assert len(await queued_events(database_url)) == 10
        restarted = await stream_upload(
            UploadOptions(file, output_id=output_id, restart=True), sink
        )
    assert restarted.complete
    assert restarted.totals.rows == 10
    events = await queued_events(database_url)
    assert len(events) == 20
    assert len({e["eventId"] for e in events}) == 10  # the same ids again


async def test_changed_file_or_other_output_is_refused(database_url: str, tmp_path: Path) -> None:
    output_id = await new_output(database_url)
    other_id = await new_output(database_url)
    file = tmp_path / "crm.csv"
    original = csv_text(20)
    file.write_text(original)
    async with database_sink(database_url, output_id) as sink:
        await stream_upload(UploadOptions(file, output_id=output_id, batch_size=5), sink)
        file.write_text(csv_text(21))
        with pytest.raises(UploadError, match="file changed"):
            await stream_upload(UploadOptions(file, output_id=output_id), sink)
    file.write_text(original)
    async with database_sink(database_url, other_id) as other:
        with pytest.raises(UploadError, match=f"is for output {output_id}"):
            await stream_upload(UploadOptions(file, output_id=other_id), other)


async def test_upload_connection_is_made_once_and_reused(database_url: str) -> None:
    output_id = await new_output(database_url)
    engine = create_engine(database_url)
    try:
        sessionmaker = create_sessionmaker(engine)
        async with sessionmaker() as session, session.begin():
            first, notes = await upload.upload_connection(session, output_id)
            assert any("needs_login" in note for note in notes)
        async with sessionmaker() as session, session.begin():
            second, _ = await upload.upload_connection(session, output_id)
            connection = await session.get(Connection, first)
            assert connection is not None
            assert (connection.source, connection.name) == ("records", "relay upload")
            with pytest.raises(UploadError, match="no output"):
                await upload.upload_connection(session, "out_missing")
    finally:
        await engine.dispose()
    assert first == second


# --- the command --------------------------------------------------------------------


def relay_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> None:
    monkeypatch.chdir(tmp_path)  # no developer .env
    monkeypatch.setenv("RELAY_DATABASE_URL", database_url)
    monkeypatch.setenv("RELAY_KEY_FILE", str(tmp_path / "relay.key"))


def test_cli_upload(
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output_id = asyncio.run(new_output(database_url))
    relay_env(monkeypatch, tmp_path, database_url)
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(30, bad_every=10))
    assert main(["upload", str(file), "--output-id", output_id, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rows read:         30" in out
    assert "events forwarded:  27" in out
    assert "line 11 (row 10): invalid_event: event_value is not a number" in out
    assert "complete." in out
    with pytest.raises(SystemExit) as exited:
        main(["upload", str(file), "--output-id", "out_nope", "--no-progress", "--restart"])
    assert exited.value.code == 2
    assert "no output out_nope" in capsys.readouterr().err


def test_cli_upload_needs_an_output_or_a_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "crm.csv"
    file.write_text(HEADER)
    with pytest.raises(SystemExit) as exited:
        main(["upload", str(file)])
    assert exited.value.code == 2
    assert "--output-id is required" in capsys.readouterr().err


INTERRUPTED_ROWS = 4_000


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_interrupted_command_resumes(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT in the middle: exit 130, a resumable checkpoint; the re-run finishes.

    The child starts with SIGINT at its default, as from a terminal: a process inherits
    an ignored SIGINT (an earlier test in the same run may leave pytest ignoring it),
    and Python then keeps ignoring it, so the upload ran to the end and exited 0."""
    output_id = asyncio.run(new_output(database_url))
    file = tmp_path / "crm.csv"
    file.write_text(csv_text(INTERRUPTED_ROWS, with_ids=True))
    env = {
        **os.environ,
        "RELAY_DATABASE_URL": database_url,
        "RELAY_KEY_FILE": str(tmp_path / "relay.key"),
    }
    command = [sys.executable, "-m", "app.cli", "upload", str(file), "--output-id", output_id]
    command += ["--no-progress"]
    process = subprocess.Popen(
        [*command, "--batch-size", "20"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = upload.checkpoint_path(file)
    deadline = time.monotonic() + 30
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, (out, err)
    assert b"run the same command again to resume" in out
    point = upload.load_checkpoint(checkpoint)
    assert point is not None
    assert 0 < point.rows_done < INTERRUPTED_ROWS
    assert not point.complete
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=60)
    assert finished.returncode == 0, finished
    assert b"resumed: the first" in finished.stdout
    events = asyncio.run(queued_events(database_url))
    ids = Counter(e["eventId"] for e in events)
    assert set(ids) == {f"ev-{i}" for i in range(1, INTERRUPTED_ROWS + 1)}
    # At most the batches in flight are queued twice, with the same eventIds.
    assert len(events) <= INTERRUPTED_ROWS + 20 * upload.DEFAULT_CONCURRENCY


# --- HTTP mode ----------------------------------------------------------------------


def test_http_mode_posts_to_v1_records(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = isolated_settings(
        database_url=database_url,
        key_file=tmp_path / "relay.key",
        admin_token="admin-token-for-tests",
    )
    with (
        serve_in_thread(create_app(settings, dispatcher=False)) as relay,
        httpx.Client(
            base_url=relay, headers={"Authorization": "Bearer admin-token-for-tests"}
        ) as admin,
    ):
        output = admin.post("/v1/outputs", json={"name": "H", "advertiser_id": "42"}).json()
        created = admin.post(
            f"/v1/outputs/{output['id']}/connections", json={"source": "records", "name": "crm"}
        ).json()
        file = tmp_path / "crm.csv"
        file.write_text(csv_text(1_100, bad_every=500))
        key, secret = created["key"], created["secret"]
        argv = ["upload", str(file), "--url", relay, "--key", key, "--secret", secret]
        assert main([*argv, "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "rows read:         1,100" in out
        assert "events forwarded:  1,098 (queued in 3 Events API request(s))" in out
        assert "line 501 (row 500): invalid_event: event_value is not a number" in out
        deliveries = admin.get("/v1/deliveries", params={"output_id": output["id"]}).json()
        assert sum(d["event_count"] for d in deliveries) == 1_098
        # A write key works too; a wrong one stops the upload with the relay's answer.
        assert (
            main(["upload", str(file), "--url", relay, "--key", f"{key}.{secret}", "--restart"])
            == 0
        )
        capsys.readouterr()
        assert main([*argv[:-1], "wrong", "--restart", "--no-progress"]) == 1
        assert "answered 401" in capsys.readouterr().out
