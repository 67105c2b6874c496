"""A fixed share of one core for each of a few processes, through the kernel's CPU
controller (cgroup v1, as on this project's machines).

Why: on a 2-core machine the relay's workers share the cores with the emulator, the
load generator and PostgreSQL, so "throughput linear in the number of workers up to the
core count" cannot be seen by adding a worker: one worker and the rest already use
most of both cores. Giving each worker the same fixed share of a core (a smaller
"core" of its own) and checking that the rest of the machine stays idle enough makes
the question answerable: if N workers, each held to the same share, deliver N times
what one does, nothing between the workers (the database queue, locks, the listening
socket) serialises them.

Needs root and the cgroup v1 ``cpu`` controller mounted at /sys/fs/cgroup/cpu.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")
# A short period spreads a worker's share evenly over time (a quota of 7 ms in every
# 20 ms rather than 35 ms in every 100 ms), so that its answers are not held back in
# long stretches while it waits for the next period.
PERIOD_US = 20_000


class CpuShareUnavailableError(RuntimeError):
    pass


def available() -> str | None:
    """Why shares cannot be set here, or None when they can."""
    if not (CPU_CONTROLLER / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CPU_CONTROLLER}"
    if not os.access(CPU_CONTROLLER, os.W_OK):
        return f"{CPU_CONTROLLER} is not writable (run as root)"
    return None


@dataclass(frozen=True, slots=True)
class Throttling:
    periods: int  # scheduler periods in which the group ran
    throttled: int  # of those, the ones in which it used its whole quota and had to wait

    @property
    def share_throttled(self) -> float:
        return self.throttled / self.periods if self.periods else 0.0

    def since(self, earlier: Throttling) -> Throttling:
        return Throttling(self.periods - earlier.periods, self.throttled - earlier.throttled)


class CpuShares:
    """One cgroup per process, each limited to ``share`` of one core. Use as a context
    manager: leaving it moves the processes still alive back to the root group and
    removes the groups."""

    def __init__(self, share: float, prefix: str) -> None:
        reason = available()
        if reason:
            raise CpuShareUnavailableError(reason)
        if not 0 < share <= 1:
            raise ValueError("a share of one core is in (0, 1]")
        self.share = share
        self._prefix = f"{prefix}-{os.getpid()}"
        self._groups: dict[int, Path] = {}

    def add(self, pid: int) -> None:
        group = CPU_CONTROLLER / f"{self._prefix}-{len(self._groups)}"
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(round(self.share * PERIOD_US)))
        # cgroup.procs moves the whole thread group: threads the process starts later
        # (SQLite's statement thread, the event loop's executors) are born inside it.
        (group / "cgroup.procs").write_text(str(pid))
        self._groups[pid] = group

    def throttling(self) -> dict[int, Throttling]:
        found = {}
        for pid, group in self._groups.items():
            stat = dict(
                line.split() for line in (group / "cpu.stat").read_text().splitlines() if line
            )
            found[pid] = Throttling(int(stat["nr_periods"]), int(stat["nr_throttled"]))
        return found

    def __enter__(self) -> CpuShares:
        return self

    def __exit__(self, *exc: object) -> None:
        for group in self._groups.values():
            # A group can be removed only once empty: every thread still in it goes back
            # to the root group (one that ends in between is gone anyway).
            for thread in (group / "tasks").read_text().split():
                with contextlib.suppress(OSError):
                    (CPU_CONTROLLER / "tasks").write_text(thread)
            group.rmdir()
        self._groups.clear()


def workers_of(pid: int, count: int) -> list[int]:
    """The pids that serve requests for ``relay serve --workers count`` started as pid:
    the process itself for one worker, else its spawned children (not multiprocessing's
    resource tracker)."""
    if count == 1:
        return [pid]
    children = psutil.Process(pid).children()
    return [
        child.pid for child in children if any("spawn_main" in part for part in child.cmdline())
    ]
