"""Checkpoints of an SQLite file's write-ahead log, off the path of the commits.

In WAL mode a commit appends to the log, and SQLite copies the log back into the
database file (a checkpoint) once it holds 1,000 pages, inside whichever commit crossed
that line. With the relay's 86 KB request bodies that is one commit in about 45, and
that commit then copies 4 MB and waits for the database file's fsync: 7–11 ms instead
of 0.3 ms on an idle machine, while every statement queued behind it waits too
(docs/decisions/0021-sqlite-checkpoints-off-the-commit-path.md).

Here a thread of its own runs passive checkpoints on its own connection, at most every
``CHECKPOINT_EVERY_SECONDS`` and only after something was written. A passive checkpoint
never blocks a writer or a reader; the commits only append. The writer's own automatic
checkpoint stays as a backstop (``BACKSTOP_PAGES``) in case this thread falls behind.
Durability does not change: every commit still waits for the log's fsync.
"""

from __future__ import annotations

import threading
from typing import Final

from sqlalchemy import Engine

from app.logs import get_logger

log = get_logger(__name__)

CHECKPOINT_EVERY_SECONDS: Final = 0.2
# The writer checkpoints by itself only past this many pages in the log (40 MB at 4 KB
# a page): never while this thread keeps up, and a bound on the log if it does not.
BACKSTOP_PAGES: Final = 10_000


class Checkpointer:
    """Passive checkpoints of ``engine``'s SQLite file on a daemon thread."""

    def __init__(self, engine: Engine, *, every_seconds: float = CHECKPOINT_EVERY_SECONDS) -> None:
        self._engine = engine
        self._every = every_seconds
        self._written = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.checkpoints = 0  # passes run (tests read it)

    def written(self) -> None:
        """Something was committed: checkpoint within the interval. Any thread."""
        self._written.set()
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopping.is_set():
                # A daemon, like the writer's thread: ``close`` is what stops it in order.
                thread = threading.Thread(
                    target=self._serve, name="relay-sqlite-checkpoint", daemon=True
                )
                thread.start()
                self._thread = thread

    def close(self) -> None:
        """Stop the thread (after a pass in progress) and close its connection."""
        with self._lock:
            self._stopping.set()
            self._written.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._engine.dispose()

    def _serve(self) -> None:
        try:
            self._checkpoint_when_written()
        except Exception:  # no connection: the writer's backstop still bounds the log
            log.exception("sqlite_checkpointer_stopped")

    def _checkpoint_when_written(self) -> None:
        # Autocommit: a checkpoint cannot run inside a transaction of its own connection.
        with self._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            while True:
                self._written.wait()
                if self._stopping.is_set():
                    return
                self._written.clear()
                try:
                    # Returns (busy, log pages, pages checkpointed); busy only while
                    # another process checkpoints the same file, which is as good.
                    connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").all()
                except Exception:  # the writer's backstop still bounds the log
                    log.exception("sqlite_checkpoint_failed")
                self.checkpoints += 1
                if self._stopping.wait(self._every):
                    return
