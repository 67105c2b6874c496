"""Work on an SQLite file, grouped into shared transactions on a thread of its own.

SQLite has one writer at a time, and with ``synchronous = FULL`` every commit waits for
the disk. Under load the relay's per-batch statements (docs/decisions/0017) queue up for
that one writer anyway; here they queue in memory instead, and the thread runs whatever
is waiting when it comes free in one transaction with one commit. A caller's future is
settled only after the commit that holds its work, so an answer still means stored.

If anything in a group fails, the whole group is rolled back and each piece of work is
run again in a transaction of its own: one bad statement costs the others nothing but
time, and each caller gets its own result or its own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

T = TypeVar("T")

# Enough to take a burst in one commit; small enough that one group's transaction (and
# the wait of whoever is first in it) stays short.
MAX_GROUP: Final = 64


def _not_run(cause: BaseException | None = None) -> DBAPIError:
    # A storage failure like any other (the API answers 503, the dispatcher retries).
    reason = f"the work was not run: {cause!r}" if cause else "the database thread stopped"
    return DBAPIError(None, None, RuntimeError(reason))


@dataclass(slots=True)
class _Work:
    run: Callable[[Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    # (result, error) once the work has run; None means it never did.
    outcome: tuple[Any, BaseException | None] | None = None


_STOP: Final = object()


class GroupedTransactions:
    """Runs ``work(connection)`` calls in shared transactions on one thread."""

    def __init__(self, engine: Engine, *, name: str = "relay-sqlite") -> None:
        self._engine = engine
        self._name = name
        self._queue: queue.SimpleQueue[_Work | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.groups = 0  # transactions committed or tried (tests read these)
        self.works = 0

    async def run(self, work: Callable[[Connection], T]) -> T:
        """``work``'s result once the transaction that ran it has committed."""
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Work(work, loop, future))
        return await future

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                # A daemon: a process that never closes this (a test, a one-off command)
                # must still be able to exit; ``close`` is what waits for queued work.
                thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                thread.start()
                self._thread = thread

    def close(self) -> None:
        """Finish the queued work, stop the thread, close the connection (blocking)."""
        thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()
            self._thread = None
        self._engine.dispose()

    def _serve(self) -> None:
        while True:
            group: list[_Work] = []
            stop = False
            item = self._queue.get()
            while True:
                if isinstance(item, _Work):
                    group.append(item)
                else:  # _STOP
                    stop = True
                if len(group) >= MAX_GROUP:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if group:
                try:
                    self._run_group(group)
                finally:  # whatever happened, nobody may wait forever
                    _settle(group)
            if stop:
                return

    def _run_group(self, group: list[_Work]) -> None:
        self.works += len(group)
        if len(group) == 1:
            self._run_alone(group[0])
            return
        self.groups += 1
        try:
            with self._engine.begin() as connection:
                results = [work.run(connection) for work in group]
        except Exception:  # rolled back: each again, alone, for its own outcome
            for work in group:
                self._run_alone(work)
            return
        except BaseException as error:  # the thread must outlive it
            # Not a database error (SystemExit, say): the group was rolled back and its
            # callers get a storage failure; the thread goes on serving the queue.
            for work in group:
                work.outcome = (None, _not_run(error))
            return
        for work, result in zip(group, results, strict=True):
            work.outcome = (result, None)

    def _run_alone(self, work: _Work) -> None:
        self.groups += 1
        try:
            with self._engine.begin() as connection:
                work.outcome = (work.run(connection), None)
        except Exception as error:  # handed to its caller
            work.outcome = (None, error)
        except BaseException as error:  # as in _run_group: the thread goes on
            work.outcome = (None, _not_run(error))


def _settle(group: list[_Work]) -> None:
    """Hand each outcome to its caller's loop: one wake-up per loop, not per caller."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Work]] = {}
    for work in group:
        by_loop.setdefault(work.loop, []).append(work)
    for loop, works in by_loop.items():
        # A closed loop raises RuntimeError: nobody there is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_outcomes, works)


def _set_outcomes(works: list[_Work]) -> None:
    for work in works:
        if work.future.done():  # the caller was cancelled
            continue
        result, error = work.outcome if work.outcome is not None else (None, _not_run())
        if error is None:
            work.future.set_result(result)
        else:
            work.future.set_exception(error)
