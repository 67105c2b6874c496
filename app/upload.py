"""``relay upload``: a records file of any size, in batches, through the relay.

The file (CSV with a header row, NDJSON, or a JSON array) is read as a stream: a few
batches of rows are in memory at a time, whatever the file's size. Each batch becomes
one Events API request, queued durably; up to ``concurrency`` batches (default 8) are
being queued at once, so the next batches are read and mapped while earlier ones commit:

- database mode (default, ``--output-id``): like the other operator commands, the
  command works on the relay's database (``RELAY_DATABASE_URL``). Batches are mapped
  in a worker process (``app.pipeline.prepare_batch``) and queued with
  ``app.ingest.store_batch``, as ``app.ingest.accept_batch`` does, for a dedicated
  ``records`` connection named ``relay upload`` of that output (created on first use),
  so any running ``relay serve`` dispatcher sends them;
- HTTP mode (``--url`` with ``--key`` and ``--secret``): batches are posted to a
  running relay's ``POST /v1/records`` with a records connection's credentials.

Re-running after an interruption sends nothing twice: a checkpoint file next to the
input (``FILE.relay-upload.json``) records how many rows are durably queued (batches
are counted in file order, whatever order they commit in), and a re-run skips them.
Rows without ``event_id`` get the deterministic eventId (from the connection id and
the row), so even a batch queued twice (a crash between the commit and the
checkpoint, or a batch in flight behind one that failed) carries the same eventIds,
which Amazon deduplicates.
See docs/decisions/0007-relay-upload.md.

The first half of this module is pure (format detection, streaming row readers,
batching, the checkpoint and summary models); the second half does the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import orjson

from app import jsonutil
from app.errors import RelayError

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from app.amazon.settings import OutputSettings
    from app.db.models import Connection, Output
    from app.pipeline import PreparedBatch

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 500  # Amazon's events per request: one batch is one Events API request
# Batches queued at once. In database mode a batch goes through three stages that run
# side by side: read here, mapped in the mapper process, written here (the database's
# thread or socket); each has its latency (pickling, a commit, SQLite's lock shared with
# the relay), and eight in flight keep both processes busy through them (the end-to-end
# benchmark: 2 in flight left a third of the two cores idle, 4 most of the gain, 8 a
# little more). In HTTP mode they overlap with the relay's work on them. A failure
# re-queues at most these batches, with the same eventIds.
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 16
CONNECTION_NAME = "relay upload"
CHECKPOINT_SUFFIX = ".relay-upload.json"
REJECTS_SUFFIX = ".relay-upload.rejects.ndjson"
CHECKPOINT_VERSION = 1
HEAD_BYTES = 64 * 1024  # fingerprint of the file: its size and the SHA-256 of its head
SHOWN_REJECTS = 20
CHUNK_CHARS = 1 << 20
MAX_RECORD_CHARS = 32 * 1024 * 1024  # one JSON array element; the /v1/records body limit
NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".ldjson", ".ndj")
CSV_SUFFIXES = (".csv",)
UTF8_BOM = b"\xef\xbb\xbf"


class UploadError(RelayError):
    """The upload cannot start or go on; the message says why and what to do."""

    code = "upload_error"


# --- formats and rows (pure) ---------------------------------------------------------


class FileFormat(StrEnum):
    CSV = "csv"
    NDJSON = "ndjson"
    JSON = "json"  # a JSON array, streamed; or one object, read whole


def detect_format(name: str, head: bytes) -> FileFormat:
    """By extension (.csv, .ndjson/.jsonl, .json), else by the first characters."""
    suffix = Path(name).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return FileFormat.CSV
    if suffix in NDJSON_SUFFIXES:
        return FileFormat.NDJSON
    text = head.removeprefix(UTF8_BOM).lstrip()
    if text[:1] == b"[":
        return FileFormat.JSON
    if text[:1] == b"{":
        # One object per line is NDJSON; an object spread over lines is one document.
        first_line = text.split(b"\n", 1)[0]
        try:
            jsonutil.loads(first_line)
        except jsonutil.InvalidJSONError:
            return FileFormat.JSON
        return FileFormat.NDJSON
    if suffix == ".json":
        return FileFormat.JSON
    return FileFormat.CSV


@dataclass(frozen=True, slots=True)
class Row:
    """One record of the file. ``problem`` is set when the row cannot even be read."""

    number: int  # 1-based position among the file's records
    line: int  # 1-based line of the file where the record starts
    record: Any = None
    problem: str | None = None


def csv_rows(lines: Iterable[str]) -> Iterator[Row]:
    """Rows of a CSV text (header row first), as ``csv.DictReader`` builds them.

    Blank lines are skipped, as DictReader does; a value may span lines (quoted), so
    each row carries the line it starts on.
    """
    reader = csv.reader(lines)
    try:
        header = next(reader)
        while not header:  # DictReader skips blank lines before the header too
            header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        raise UploadError(f"the CSV header row cannot be read: {error}") from None
    width = len(header)
    number = 0
    next_line = reader.line_num + 1
    while True:
        start = next_line
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if reader.line_num < start:  # no progress: the reader cannot go on
                raise UploadError(f"line {start}: CSV cannot be read: {error}") from None
            next_line = reader.line_num + 1
            number += 1
            yield Row(number, start, problem=f"CSV row cannot be read: {error}")
            continue
        next_line = reader.line_num + 1
        if not values:
            continue
        number += 1
        if len(values) != width:
            if len(values) > width:  # as the records adapter says of DictReader's surplus
                yield Row(number, start, problem="row has more fields than the header row")
                continue
            record: dict[str, Any] = dict(zip(header, values, strict=False))
            for key in header[len(values) :]:
                record[key] = None  # DictReader's restval
            yield Row(number, start, record)
            continue
        yield Row(number, start, dict(zip(header, values, strict=True)))


def ndjson_rows(lines: Iterable[bytes]) -> Iterator[Row]:
    """One JSON value per line; blank lines are skipped, a bad line is a bad row."""
    number = 0
    for line_number, line in enumerate(lines, start=1):
        if line_number == 1:
            line = line.removeprefix(UTF8_BOM)
        if not line.strip():
            continue
        number += 1
        try:
            yield Row(number, line_number, jsonutil.loads(line))
        except jsonutil.InvalidJSONError:
            yield Row(number, line_number, problem="line is not valid JSON")


def _refuse_constant(name: str) -> Any:
    raise jsonutil.InvalidJSONError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SPACE = " \t\n\r"


def json_array_rows(chunks: Iterable[str]) -> Iterator[Row]:
    """Elements of one JSON array, decoded one at a time from text chunks.

    Memory holds one chunk plus the element being read, never the whole array. A
    syntax error stops the stream (the rest of an array cannot be trusted).
    """
    source = iter(chunks)
    buffer = ""
    pos = 0
    line = 1  # line of the character at ``pos``
    eof = False

    def more() -> bool:
        nonlocal buffer, pos, eof
        if eof:
            return False
        chunk = next(source, None)
        if chunk is None:
            eof = True
            return False
        buffer = buffer[pos:] + chunk
        pos = 0
        return True

    def skip_space() -> bool:
        """Move past whitespace; False at the end of the input."""
        nonlocal pos, line
        while True:
            end = len(buffer)
            while pos < end and buffer[pos] in _SPACE:
                if buffer[pos] == "\n":
                    line += 1
                pos += 1
            if pos < end:
                return True
            if not more():
                return False

    def fail(problem: str) -> UploadError:
        return UploadError(f"line {line}: the JSON array is not valid: {problem}")

    if not skip_space():
        return
    if buffer[pos] != "[":
        raise fail("it does not start with [")
    pos += 1
    number = 0
    while True:
        if not skip_space():
            raise fail("it ends before its closing ]")
        if buffer[pos] == "]" and number == 0:
            pos += 1
            break
        if number:
            if buffer[pos] == "]":
                pos += 1
                break
            if buffer[pos] != ",":
                raise fail("expected , or ] between elements")
            pos += 1
            if not skip_space():
                raise fail("it ends before its closing ]")
        while True:
            try:
                value, end = _DECODER.raw_decode(buffer, pos)
            except (ValueError, RecursionError) as error:
                # Maybe the element goes on in the next chunk; at the end it is an error.
                if len(buffer) - pos > MAX_RECORD_CHARS or not more():
                    raise fail(str(error)) from None
                continue
            if end == len(buffer) and not eof and more():
                # A number may go on in the next chunk ("12" + "34"): read it whole.
                continue
            break
        number += 1
        yield Row(number, line, value)
        line += buffer.count("\n", pos, end)
        pos = end
    if skip_space():
        raise fail("there is more after its closing ]")


def json_document_rows(text: str) -> Iterator[Row]:
    """A JSON document read whole: ``{"records": [...]}``, ``{"events": [...]}`` or one record."""
    try:
        payload = jsonutil.loads(text)
    except jsonutil.InvalidJSONError as error:
        raise UploadError(f"the file is not valid JSON: {error}") from None
    if isinstance(payload, dict):
        inner = payload.get("records", payload.get("events"))
        payload = inner if isinstance(inner, list) else [payload]
    if not isinstance(payload, list):
        raise UploadError("a JSON file must hold an array of records or an object")
    for number, record in enumerate(payload, start=1):
        yield Row(number, 1, record)


def batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    iterator = iter(rows)
    while batch := list(islice(iterator, size)):
        yield batch


# --- outcomes, checkpoint and summary (pure) -------------------------------------------


@dataclass(frozen=True, slots=True)
class Drop:
    """A row not forwarded, traced back to the file."""

    row: int
    line: int
    reason: str
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"row": self.row, "line": self.line, "reason": self.reason}
        if self.detail is not None:
            out["detail"] = self.detail
        return out

    def text(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"line {self.line} (row {self.row}): {self.reason}{detail}"


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What the relay made of one batch of records (indexes are positions in it)."""

    forwarded: int
    dropped: list[dict[str, Any]]
    deliveries: int


@dataclass(slots=True)
class Totals:
    """Counts over the whole file (a resumed run continues those of the earlier runs)."""

    rows: int = 0
    forwarded: int = 0
    deliveries: int = 0
    batches: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    # The first rejected rows (invalid_event), for the summary; all are in the rejects file.
    rejected: list[Drop] = field(default_factory=list)

    def add(self, rows: int, forwarded: int, deliveries: int, drops: Iterable[Drop]) -> None:
        self.rows += rows
        self.forwarded += forwarded
        self.deliveries += deliveries
        self.batches += 1
        for drop in drops:
            self.dropped[drop.reason] += 1
            if drop.reason == "invalid_event" and len(self.rejected) < SHOWN_REJECTS:
                self.rejected.append(drop)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "forwarded": self.forwarded,
            "deliveries": self.deliveries,
            "batches": self.batches,
            "dropped": dict(sorted(self.dropped.items())),
            "rejected": [drop.as_dict() for drop in self.rejected],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Totals:
        if not isinstance(raw, dict):
            return cls()
        return cls(
            rows=int(raw.get("rows", 0)),
            forwarded=int(raw.get("forwarded", 0)),
            deliveries=int(raw.get("deliveries", 0)),
            batches=int(raw.get("batches", 0)),
            dropped=Counter({str(k): int(v) for k, v in dict(raw.get("dropped", {})).items()}),
            rejected=[
                Drop(int(d["row"]), int(d["line"]), str(d["reason"]), d.get("detail"))
                for d in raw.get("rejected", [])
            ],
        )


def drops_of(rows: list[Row], outcome: BatchOutcome) -> list[Drop]:
    """The outcome's drops (indexes into ``rows``) as rows and lines of the file."""
    found = []
    for entry in outcome.dropped:
        row = rows[int(entry["index"])]
        found.append(Drop(row.number, row.line, str(entry["reason"]), entry.get("detail")))
    return found


@dataclass(slots=True)
class Checkpoint:
    """How far an upload of one file to one target got: rows durably queued."""

    file: str
    size: int
    head_sha256: str
    format: str
    target: str  # "output <id>" or the relay URL and connection key
    rows_done: int = 0
    lines_done: int = 0
    rejects_bytes: int = 0
    connection_id: str | None = None
    complete: bool = False
    totals: Totals = field(default_factory=Totals)
    started_at: str = ""
    updated_at: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "file": self.file,
            "size": self.size,
            "head_sha256": self.head_sha256,
            "format": self.format,
            "target": self.target,
            "connection_id": self.connection_id,
            "rows_done": self.rows_done,
            "lines_done": self.lines_done,
            "rejects_bytes": self.rejects_bytes,
            "complete": self.complete,
            "totals": self.totals.as_dict(),
            "started_at": self.started_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> Checkpoint:
        if not isinstance(raw, dict) or raw.get("version") != CHECKPOINT_VERSION:
            raise ValueError("not a relay upload checkpoint of this version")
        return cls(
            file=str(raw["file"]),
            size=int(raw["size"]),
            head_sha256=str(raw["head_sha256"]),
            format=str(raw["format"]),
            target=str(raw["target"]),
            connection_id=raw.get("connection_id"),
            rows_done=int(raw["rows_done"]),
            lines_done=int(raw.get("lines_done", 0)),
            rejects_bytes=int(raw.get("rejects_bytes", 0)),
            complete=bool(raw.get("complete", False)),
            totals=Totals.from_dict(raw.get("totals")),
            started_at=str(raw.get("started_at", "")),
            updated_at=str(raw.get("updated_at", "")),
        )

    def mismatch(self, other: Checkpoint) -> str | None:
        """Why this checkpoint cannot resume an upload described by ``other``."""
        if (self.size, self.head_sha256) != (other.size, other.head_sha256):
            return "the file changed since the checkpoint was written"
        if self.target != other.target:
            return f"the checkpoint is for {self.target}, not {other.target}"
        if self.format != other.format:
            return f"the checkpoint read the file as {self.format}, not {other.format}"
        return None


def summary_lines(
    totals: Totals,
    *,
    resumed_rows: int = 0,
    complete: bool,
    checkpoint: Path,
    rejects: Path | None,
    took: float | None = None,
    notes: Iterable[str] = (),
) -> list[str]:
    """The human summary printed at the end (plain text, one fact a line)."""
    lines = [
        f"rows read:         {totals.rows:,}",
        f"events forwarded:  {totals.forwarded:,} (queued in {totals.deliveries:,} "
        f"Events API request(s))",
    ]
    dropped = sum(totals.dropped.values())
    lines.append(f"events dropped:    {dropped:,}")
    for reason, count in sorted(totals.dropped.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  {reason}: {count:,}")
    invalid = totals.dropped.get("invalid_event", 0)
    if invalid:
        lines.append(f"rejected rows:     {invalid:,}")
        lines.extend(f"  {drop.text()}" for drop in totals.rejected)
        if invalid > len(totals.rejected):
            lines.append(f"  … and {invalid - len(totals.rejected):,} more")
    if rejects is not None and dropped:
        lines.append(f"every dropped row, with its line and reason: {rejects}")
    if resumed_rows:
        lines.append(
            f"resumed: the first {resumed_rows:,} row(s) were queued by an earlier run "
            f"and were skipped (checkpoint {checkpoint})"
        )
    if took is not None and took > 0:
        lines.append(f"took {took:.1f} s ({totals.rows / took:,.0f} rows/s)")
    lines.extend(notes)
    if complete:
        lines.append(
            f"complete. The checkpoint {checkpoint} stays so that running the command "
            "again sends nothing twice; --restart sends the file again (same eventIds, "
            "so Amazon deduplicates them)."
        )
    else:
        lines.append(
            "stopped before the end of the file: run the same command again to resume "
            f"(checkpoint {checkpoint})."
        )
    return lines


# --- I/O: files -----------------------------------------------------------------------


def checkpoint_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKPOINT_SUFFIX)


def rejects_path(path: Path) -> Path:
    return path.with_name(path.name + REJECTS_SUFFIX)


def fingerprint(path: Path) -> tuple[int, str, bytes]:
    """Size, SHA-256 of the head, and the head itself (for format detection)."""
    with path.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
        size = os.fstat(handle.fileno()).st_size
    return size, hashlib.sha256(head).hexdigest(), head


def load_checkpoint(path: Path) -> Checkpoint | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Checkpoint.from_dict(jsonutil.loads(raw))
    except (jsonutil.InvalidJSONError, ValueError, KeyError, TypeError):
        raise UploadError(
            f"{path} is not a checkpoint this version can read; delete it or use --restart"
        ) from None


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Atomic replace: a crash leaves the old checkpoint or the new one, never half."""
    checkpoint.updated_at = _now_text()
    temporary = path.with_name(path.name + ".tmp")
    # orjson: the standard library's encoder is the pure-Python one when indenting, a
    # measurable share of the command's own time at one save per batch.
    text = orjson.dumps(checkpoint.as_dict(), option=orjson.OPT_INDENT_2)
    temporary.write_bytes(text + b"\n")
    os.replace(temporary, path)


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def open_rows(path: Path, file_format: FileFormat, handle: IO[bytes]) -> Iterator[Row]:
    """The rows of ``handle`` (an open binary file), streamed."""
    if file_format is FileFormat.NDJSON:
        return ndjson_rows(handle)
    if file_format is FileFormat.CSV:
        text = _utf8(handle)
        return csv_rows(text)
    head = handle.read(HEAD_BYTES)
    handle.seek(0)
    if head.removeprefix(UTF8_BOM).lstrip()[:1] == b"[":
        return json_array_rows(_text_chunks(handle))
    # One JSON object (e.g. {"records": [...]}) is read whole; use NDJSON or CSV for
    # big files (docs/decisions/0007-relay-upload.md).
    return json_document_rows("".join(_text_chunks(handle)))


def _utf8(handle: IO[bytes]) -> Iterator[str]:
    """Lines of a UTF-8 file (BOM dropped), as csv wants them (newlines kept)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    for chunk in iter(lambda: handle.read(CHUNK_CHARS), b""):
        try:
            text = pending + decoder.decode(chunk)
        except UnicodeDecodeError as error:
            raise UploadError(f"the file is not UTF-8 text ({error.reason})") from None
        lines = text.splitlines(keepends=True)
        # The last piece may be the first half of a line (or of a \r\n pair).
        pending = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        yield from lines
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise UploadError(f"the file is not UTF-8 text ({error.reason})") from None
    if pending:
        yield pending


def _text_chunks(handle: IO[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        for chunk in iter(lambda: handle.read(CHUNK_CHARS), b""):
            yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        raise UploadError(f"the file is not UTF-8 text ({error.reason})") from None


# --- I/O: where batches go --------------------------------------------------------------


class Sink(Protocol):
    """Queues one batch of records durably, or raises; ``target`` names where to."""

    target: str
    connection_id: str | None

    async def send(self, records: list[Any]) -> BatchOutcome: ...


class DatabaseSink:
    """Queues batches in the relay's database for a ``relay upload`` records connection.

    With ``mapper`` (a process pool; see ``_database_sink``), batches are mapped there
    while this process reads the file and writes the batches before them: the mapping
    is most of the work, and both sides then keep a core busy. The mapping uses the
    output's settings as of the previous batch; each batch's own transaction reads the
    output again, and a batch mapped with settings that changed meanwhile is mapped
    again (here) with the current ones, so an edited output is seen at once.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        output_id: str,
        connection_id: str,
        *,
        mapper: Executor | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self.output_id = output_id
        self.connection_id: str | None = connection_id
        self.target = f"output {output_id}"
        self._mapper = mapper
        self._settings: OutputSettings | None = None
        self._key: str | None = None

    async def send(self, records: list[Any]) -> BatchOutcome:
        from app.db import repository as repo
        from app.db.base import utcnow
        from app.db.hot import SessionWriter
        from app.ingest import settings_for, store_batch
        from app.pipeline import prepare_batch

        now = utcnow()
        settings = self._settings
        prepared = None
        if self._mapper is not None and settings is not None:
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._mapper, _prepare_records, records, settings, now
            )
        async with self._sessionmaker() as session, session.begin():
            # Read per batch: an output edited (or deleted) meanwhile is seen at once. The
            # connection and its output in one query once the connection's key is known.
            found = None
            output: Output | None
            connection: Connection | None
            if self._key is not None:
                found = await repo.get_connection_with_output(session, self._key)
            if found is not None:
                connection, output = found
            else:  # the first batch, or either is gone: read both to say which
                output = await repo.get_output(session, self.output_id)
                connection = await repo.get_connection(session, str(self.connection_id))
            if output is None or output.id != self.output_id:
                raise UploadError(f"output {self.output_id} no longer exists")
            if connection is None or not connection.active:
                raise UploadError(f"the {CONNECTION_NAME!r} connection is gone or inactive")
            self._key = connection.key
            current = self._settings = settings_for(output, connection.id)
            if prepared is None or current != settings:
                prepared = prepare_batch(records, connection.source, settings=current, now=now)
            summary = await store_batch(
                SessionWriter(session), prepared, output=output, connection=connection, now=now
            )
        return BatchOutcome(summary.accepted, summary.dropped, len(summary.deliveries))


def _prepare_records(records: list[Any], settings: OutputSettings, now: datetime) -> PreparedBatch:
    """A batch of the file, mapped in the mapper process (a module-level function, so
    that the pool can name it)."""
    from app.pipeline import prepare_batch
    from app.sources.records import NAME

    return prepare_batch(records, NAME, settings=settings, now=now)


def _start_mapper() -> None:
    """The mapper process: imports the mapper, then moves what is alive (modules and
    their objects) out of the garbage collector's sight, as ``relay serve`` does: each
    batch allocates thousands of objects, and every full collection would walk them
    all again. Ctrl-C is left to the command, which stops it in order."""
    import gc
    import signal

    import app.pipeline  # noqa: F401 - imported now, so that it is frozen with the rest

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.collect()
    gc.freeze()


async def upload_connection(session: AsyncSession, output_id: str) -> tuple[str, list[str]]:
    """The id of the output's ``relay upload`` records connection (made if missing)."""
    from app.db import repository as repo

    output = await repo.get_output(session, output_id)
    if output is None:
        raise UploadError(f"no output {output_id} (see: relay outputs list)")
    notes = []
    if output.status != "configured":
        notes.append(
            f"note: output {output_id} is {output.status}: its deliveries wait in the queue "
            "until Login with Amazon is completed for it"
        )
    if not output.enabled:
        notes.append(f"note: output {output_id} is disabled: its deliveries wait in the queue")
    for connection in await repo.list_connections(session, output_id):
        if connection.source == "records" and connection.name == CONNECTION_NAME:
            if not connection.active:
                raise UploadError(
                    f"the {CONNECTION_NAME!r} connection {connection.id} of output "
                    f"{output_id} is inactive: relay connections activate {connection.id}"
                )
            return connection.id, notes
    created = await repo.create_connection(
        session, output_id=output_id, source="records", name=CONNECTION_NAME
    )
    return created.connection.id, notes


RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
HTTP_ATTEMPTS = 8


class HttpSink:
    """Posts batches to a running relay's ``/v1/records`` (JSON array bodies)."""

    def __init__(self, client: httpx.AsyncClient, url: str, key: str, secret: str) -> None:
        self._client = client
        self._url = url.rstrip("/") + "/v1/records"
        self._auth = (key, secret)
        self.target = f"{url.rstrip('/')} key {key}"
        self.connection_id: str | None = None

    async def send(self, records: list[Any]) -> BatchOutcome:
        import httpx

        try:
            body = jsonutil.dumps(records)
        except TypeError:  # an integer beyond 64 bits: orjson refuses it, json does not
            body = json.dumps(records, separators=(",", ":")).encode()
        delay = 0.5
        for attempt in range(1, HTTP_ATTEMPTS + 1):
            try:
                answer = await self._client.post(
                    self._url,
                    content=body,
                    auth=self._auth,
                    headers={"Content-Type": "application/json"},
                )
            except httpx.TransportError as error:
                if attempt == HTTP_ATTEMPTS:
                    raise UploadError(f"cannot reach {self._url}: {error}") from None
            else:
                if answer.status_code in (200, 202):
                    data = answer.json()
                    return BatchOutcome(
                        int(data.get("accepted", 0)),
                        list(data.get("dropped", [])),
                        len(data.get("deliveries", [])),
                    )
                if answer.status_code not in RETRY_STATUSES or attempt == HTTP_ATTEMPTS:
                    raise UploadError(
                        f"{self._url} answered {answer.status_code}: {answer.text[:300]}"
                    )
                retry_after = answer.headers.get("retry-after", "")
                if retry_after.isdigit():
                    delay = max(delay, min(float(retry_after), 300.0))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")  # pragma: no cover


# --- the run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadOptions:
    file: Path
    output_id: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    file_format: FileFormat | None = None
    restart: bool = False
    url: str | None = None
    key: str | None = None
    secret: str | None = None
    progress: bool = True
    concurrency: int = DEFAULT_CONCURRENCY

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UploadOptions:
        key, secret = args.key, args.secret or os.environ.get("RELAY_UPLOAD_SECRET")
        if key and not secret and "." in key:  # a Segment-style write key: key.secret
            key, _, secret = key.partition(".")
        options = cls(
            file=Path(args.file),
            output_id=args.output_id,
            batch_size=args.batch_size,
            file_format=FileFormat(args.format) if args.format else None,
            restart=args.restart,
            url=args.url,
            key=key,
            secret=secret,
            progress=not args.no_progress,
            # The command line may not offer --concurrency (app/cli.py): the default then.
            concurrency=getattr(args, "concurrency", None) or DEFAULT_CONCURRENCY,
        )
        options.check()
        return options

    def check(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise UploadError(f"--batch-size must be 1..{MAX_BATCH_SIZE}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise UploadError(f"--concurrency must be 1..{MAX_CONCURRENCY}")
        if self.url is None:
            if not self.output_id:
                raise UploadError("--output-id is required (or --url with --key and --secret)")
            if self.key or self.secret:
                raise UploadError("--key and --secret go with --url")
        elif not (self.key and self.secret):
            raise UploadError(
                "--url needs the records connection's --key and --secret "
                "(or RELAY_UPLOAD_SECRET in the environment)"
            )
        if not self.file.is_file():
            raise UploadError(f"cannot read {self.file}: no such file")


@dataclass(slots=True)
class Report:
    """What a run did, for the summary and for callers (tests, the benchmark)."""

    totals: Totals
    complete: bool
    resumed_rows: int
    checkpoint: Path
    rejects: Path
    took: float
    file_format: FileFormat
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None

    def lines(self) -> list[str]:
        return summary_lines(
            self.totals,
            resumed_rows=self.resumed_rows,
            complete=self.complete,
            checkpoint=self.checkpoint,
            rejects=self.rejects if self.rejects.exists() else None,
            took=self.took,
            notes=self.notes,
        )


ProgressHook = Callable[[int, Totals], None]


async def stream_upload(
    options: UploadOptions,
    sink: Sink,
    *,
    on_progress: ProgressHook | None = None,
    notes: Iterable[str] = (),
) -> Report:
    """Upload ``options.file`` to ``sink``, resuming from its checkpoint when it fits.

    The checkpoint is saved after every batch the sink queued durably; the report
    reflects the state at the end (complete, or stopped by an error or a signal).
    """
    path = options.file
    size, head_hash, head = fingerprint(path)
    file_format = options.file_format or detect_format(path.name, head)
    check_path, reject_path = checkpoint_path(path), rejects_path(path)
    fresh = Checkpoint(
        file=path.name,
        size=size,
        head_sha256=head_hash,
        format=file_format.value,
        target=sink.target,
        connection_id=sink.connection_id,
        started_at=_now_text(),
    )
    state = None if options.restart else load_checkpoint(check_path)
    if state is not None:
        problem = state.mismatch(fresh)
        if problem is None and state.connection_id != sink.connection_id:
            problem = (
                f"the checkpoint's connection {state.connection_id} is not the current "
                f"{CONNECTION_NAME!r} connection {sink.connection_id}, so rows without "
                "event_id would get new eventIds"
            )
        if problem is not None:
            raise UploadError(
                f"{check_path}: {problem}. Use --restart to upload the file from its first "
                "row again (rows with an event_id keep their eventIds), or delete the file."
            )
    else:
        state = fresh
    report = Report(
        totals=state.totals,
        complete=state.complete,
        resumed_rows=state.rows_done,
        checkpoint=check_path,
        rejects=reject_path,
        took=0.0,
        file_format=file_format,
        notes=list(notes),
    )
    if state.complete:
        report.resumed_rows = 0
        report.notes.append("this file was uploaded completely before: nothing was sent")
        return report
    began = time.monotonic()
    with path.open("rb") as handle, _rejects_file(reject_path, state.rejects_bytes) as rejects:
        rows = open_rows(path, file_format, handle)
        if state.rows_done and sum(1 for _ in islice(rows, state.rows_done)) < state.rows_done:
            raise UploadError(f"{check_path}: the file has fewer rows than were queued")

        def record(batch: list[Row], readable: list[Row], outcome: BatchOutcome) -> None:
            """The batch is queued: count it, note its drops, move the checkpoint."""
            drops = sorted(
                [
                    *(
                        Drop(row.number, row.line, "invalid_event", row.problem)
                        for row in batch
                        if row.problem is not None
                    ),
                    *drops_of(readable, outcome),
                ],
                key=lambda drop: drop.row,
            )
            for drop in drops:
                rejects.write(jsonutil.dumps(drop.as_dict()) + b"\n")
            rejects.flush()
            state.totals.add(len(batch), outcome.forwarded, outcome.deliveries, drops)
            state.rows_done = batch[-1].number
            state.lines_done = batch[-1].line
            state.rejects_bytes = rejects.tell()
            save_checkpoint(check_path, state)
            if on_progress is not None:
                on_progress(handle.tell(), state.totals)

        # Up to ``concurrency`` batches are being queued at once; they are counted (and
        # the checkpoint moved) strictly in file order, so ``rows_done`` stays one
        # number: every row before it is queued. A batch queued after an earlier one
        # failed is queued again by the re-run, with the same eventIds.
        in_flight: collections.deque[tuple[list[Row], list[Row], asyncio.Future[BatchOutcome]]]
        in_flight = collections.deque()

        async def record_oldest() -> None:
            batch, readable, sending = in_flight.popleft()
            record(batch, readable, await sending)

        try:
            for batch in batched(rows, options.batch_size):
                readable = [row for row in batch if row.problem is None]
                records = [row.record for row in readable]
                in_flight.append((batch, readable, _start(sink, records)))
                if len(in_flight) >= options.concurrency:
                    await record_oldest()
            while in_flight:
                await record_oldest()
        except asyncio.CancelledError:
            report.interrupted = True
        except UploadError as error:
            report.error = error.message
        except Exception as error:  # the database or the relay went away: resumable
            report.error = f"{type(error).__name__}: {error}"
        else:
            state.complete = True
            save_checkpoint(check_path, state)
        finally:
            await _abandon(sending for _, _, sending in in_flight)
    if not state.totals.dropped and reject_path.exists() and reject_path.stat().st_size == 0:
        reject_path.unlink()
    report.complete = state.complete
    report.took = time.monotonic() - began
    return report


def _start(sink: Sink, records: list[Any]) -> asyncio.Future[BatchOutcome]:
    """Queue one batch in the background (an empty batch has nothing to queue)."""
    if not records:
        done: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        done.set_result(BatchOutcome(0, [], 0))
        return done
    return asyncio.ensure_future(sink.send(records))


async def _abandon(sendings: Iterable[asyncio.Future[BatchOutcome]]) -> None:
    """Stop the batches still being queued after a failure or an interruption.

    Each one either committed or not; the checkpoint counts none of them, so a re-run
    queues them (again) with the same eventIds.
    """
    pending = list(sendings)
    for sending in pending:
        sending.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@contextlib.contextmanager
def _rejects_file(path: Path, keep_bytes: int) -> Iterator[IO[bytes]]:
    """The rejects file, cut back to what the checkpoint counted, open for appending."""
    handle: IO[bytes]
    if keep_bytes and path.exists():
        handle = path.open("r+b")
        handle.truncate(min(keep_bytes, os.fstat(handle.fileno()).st_size))
        handle.seek(0, os.SEEK_END)
    else:
        handle = path.open("wb")
    try:
        yield handle
    finally:
        handle.close()


@contextlib.asynccontextmanager
async def _database_sink(output_id: str) -> AsyncIterator[tuple[Sink, list[str]]]:
    from app.config import load_settings
    from app.db.migrate import migrate
    from app.db.session import create_engine, create_sessionmaker

    settings = load_settings()
    # One mapper process, started (spawned: this process has threads) before the rest;
    # it imports only the mapper. One, because the two cores this is sized for also
    # run the relay: this process and the mapper each keep about one busy.
    mapper = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_mapper,
    )
    try:
        await migrate(settings.database_url)
        engine = create_engine(settings.database_url)
        try:
            sessionmaker = create_sessionmaker(engine)
            async with sessionmaker() as session, session.begin():
                connection_id, notes = await upload_connection(session, output_id)
            yield DatabaseSink(sessionmaker, output_id, connection_id, mapper=mapper), notes
        finally:
            await engine.dispose()
    finally:
        mapper.shutdown(wait=True, cancel_futures=True)


@contextlib.asynccontextmanager
async def _http_sink(url: str, key: str, secret: str) -> AsyncIterator[tuple[Sink, list[str]]]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        yield HttpSink(client, url, key, secret), []


async def _run(options: UploadOptions, on_progress: ProgressHook | None) -> Report:
    sink_context = (
        _http_sink(options.url, str(options.key), str(options.secret))
        if options.url
        else _database_sink(str(options.output_id))
    )
    async with sink_context as (sink, notes):
        return await stream_upload(options, sink, on_progress=on_progress, notes=notes)


def run_upload(options: UploadOptions) -> int:
    """The command: upload with a progress bar (on stderr), then print the summary.

    Exit status: 0 the whole file is queued; 1 stopped by an error (resumable);
    130 interrupted (resumable).
    """
    import signal

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    size = options.file.stat().st_size
    progress = Progress(
        TextColumn("[bold]upload[/]"),
        BarColumn(bar_width=30),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:>10,} rows {task.fields[forwarded]:>10,} forwarded"),
        TimeElapsedColumn(),
        console=console,
        disable=not options.progress,
    )
    task = progress.add_task("upload", total=size, rows=0, forwarded=0)

    def on_progress(position: int, totals: Totals) -> None:
        progress.update(task, completed=position, rows=totals.rows, forwarded=totals.forwarded)

    async def main() -> Report:
        current = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if current is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, current.cancel)
        return await _run(options, on_progress)

    interrupted = False
    report: Report | None = None
    with progress:
        try:
            report = asyncio.run(main())
        except KeyboardInterrupt:
            interrupted = True
    if report is None:  # interrupted before the report existed: the checkpoint tells
        state = load_checkpoint(checkpoint_path(options.file))
        totals = state.totals if state else Totals()
        print("\n".join(_interrupted_summary(options.file, totals)))
        return 130
    for line in report.lines():
        print(line)
    if report.error:
        print(f"relay: upload stopped: {report.error}")
        return 1
    if report.interrupted or interrupted:
        return 130
    return 0


def _interrupted_summary(path: Path, totals: Totals) -> list[str]:
    return summary_lines(
        totals,
        complete=False,
        checkpoint=checkpoint_path(path),
        rejects=rejects_path(path) if rejects_path(path).exists() else None,
    )
