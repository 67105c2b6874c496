"""Giving freed memory back to the operating system (glibc only; elsewhere a no-op).

A burst of concurrent ingest requests (each holds its body, the parsed batch and the
mapped request, a few hundred KB) raises the C heap to a high-water mark. glibc keeps
what was freed inside its heaps for reuse and returns it to the system only from the
top of a heap, so a long-running relay's RSS stays at the highest burst it ever saw
(docs/reliability.md, the soaks). ``malloc_trim(0)`` releases every free page of every
heap. It costs a walk over the heaps (about a millisecond for a few hundred MB), so it
runs every ten seconds, not per request: often enough that RSS stays within a narrow
band of the live heap under steady load (a minute let it swing by a third between trims),
rare enough to cost a ten-thousandth of the time.

Worker threads (aiosqlite's, the thread pool's) would each get a heap of their own
(up to 8 per core); two are enough for a process that works in one event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from typing import Any

from app.logs import get_logger

log = get_logger(__name__)

TRIM_INTERVAL_SECONDS = 10.0
MAX_HEAPS = 2
_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


@functools.cache
def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - musl and other C libraries lack it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_heaps() -> bool:
    """At start-up, before threads allocate: at most MAX_HEAPS heaps. True if applied."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, MAX_HEAPS) == 1


def trim() -> bool:
    """Return the free pages of the C heaps to the system; True if any were released."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


async def trim_forever(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """``trim`` every ``interval`` seconds, until cancelled."""
    if _glibc() is None:
        log.info("memory_trim_unavailable")
        return
    while True:
        await asyncio.sleep(interval)
        trim()
