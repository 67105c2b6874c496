"""Freed memory goes back to the operating system (app/memory.py), and the collector
leaves a served process's long-lived and young objects alone (app/main.py).

Without ``malloc_trim`` a relay's RSS stays at the highest burst it ever saw: glibc keeps
freed chunks inside its heap. The test makes such a burst in this process and checks
that ``trim`` hands the pages back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from pathlib import Path

import psutil
import pytest

from app import memory
from app.config import isolated_settings
from app.main import GEN0_THRESHOLD, create_app

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or memory._glibc() is None,
    reason="malloc_trim is glibc's (the relay's image and CI are glibc Linux)",
)

CHUNK = 64 * 1024  # under glibc's mmap threshold: from the heap, like request bodies
CHUNKS = 3_000  # about 190 MB


def _rss_mb() -> float:
    rss: int = psutil.Process().memory_info().rss
    return rss / 2**20


def test_trim_gives_a_bursts_memory_back() -> None:
    # Inside a long test run the heap already holds freed pages that the burst would
    # reuse without growing RSS: hand those back first.
    memory.trim()
    before = _rss_mb()
    burst = [bytearray(CHUNK) for _ in range(CHUNKS)]  # zero-filled: every page touched
    keep = bytearray(CHUNK)  # allocated last: the heap's top stays in use
    high = _rss_mb()
    assert high - before > 150
    del burst
    freed = _rss_mb()
    assert freed - before > 150, "glibc returned the memory without a trim"
    assert memory.trim() is True
    trimmed = _rss_mb()
    assert trimmed - before < 30, (before, high, freed, trimmed)
    assert len(keep) == CHUNK


def test_heaps_are_limited() -> None:
    assert memory.limit_heaps() is True


async def test_the_relay_trims_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def trim() -> bool:
        calls.append(1.0)
        return True

    monkeypatch.setattr(memory, "trim", trim)
    task = asyncio.create_task(memory.trim_forever(interval=0.01))
    await asyncio.sleep(0.1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert 3 <= len(calls) <= 11


async def test_a_served_process_freezes_its_start_up_and_collects_young_objects_rarely(
    tmp_path: Path,
) -> None:
    """The lifespan hides start-up objects from the collector and raises the young
    generation's threshold (app/main.py, decision 0019)."""
    settings = isolated_settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
        key_file=tmp_path / "relay.key",
    )
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    gc.unfreeze()
    try:
        app = create_app(settings, dispatcher=False)
        async with app.router.lifespan_context(app):
            assert gc.get_threshold() == (GEN0_THRESHOLD, *before[1:])
            assert gc.get_freeze_count() > 10_000  # modules, classes, compiled routes
    finally:
        gc.set_threshold(*before)
