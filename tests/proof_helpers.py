"""What the long proof scenarios share: steady load from a background thread, a
throwaway PostgreSQL cluster that a test may stop and restart, and the final check.

The load (``Pump``) behaves as a sending platform does: it posts batches at a steady
rate, takes a 202 as accepted, a 503 as refused (nothing accepted: the platform keeps
the batch), and resends a batch that got no answer at all (the relay died mid-request)
to the next relay, with the same eventIds, until one answers.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from e2e_helpers import (
    AmazonView,
    Conn,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    posted_event_ids,
    sdk_batch,
)
from test_e2e_processes import RELAY, Deployment, RelayProcess
from test_e2e_processes import _wait_healthy as wait_healthy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- steady load -------------------------------------------------------------------------


@dataclass
class Answer:
    """One batch's fate: when it was first posted and the answer that settled it."""

    posted_at: float
    status: int
    tries: int  # posts it took (more than one: earlier ones got no answer)
    answered_at: float  # when the answer that settled it arrived


@dataclass
class Pump:
    """Posts ``rate`` batches/s of ``batch_size`` purchases to ``targets`` (round robin)
    from a background thread, until ``stop``."""

    targets: list[str]
    conn: Conn
    rate: float
    batch_size: int = 10
    first_id: int = 1_000_000
    timeout: float = 10.0
    accepted: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)  # answered 503: not accepted
    answers: list[Answer] = field(default_factory=list)
    unanswered: int = 0  # posts that got no HTTP answer (each was resent)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Pump:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the load thread did not stop"

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> Counter[int]:
        """The answers to batches first posted in [since, until)."""
        with self._lock:
            return Counter(a.status for a in self.answers if since <= a.posted_at < until)

    def answered(self, since: float, until: float) -> Counter[int]:
        """The answers given in [since, until), whenever their batches were posted."""
        with self._lock:
            return Counter(a.status for a in self.answers if since <= a.answered_at < until)

    def _run(self) -> None:
        ids = itertools.count(self.first_id)
        turn = itertools.count()
        began = time.monotonic()
        with httpx.Client(timeout=self.timeout) as client:
            for number in itertools.count():
                due = began + number / self.rate
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                batch = sdk_batch(
                    [next(ids) for _ in range(self.batch_size)], email=f"s{number}@example.com"
                )
                self._post(client, batch, turn)

    def _post(self, client: httpx.Client, batch: dict[str, Any], turn: Iterator[int]) -> None:
        posted_at = time.monotonic()
        for tries in itertools.count(1):
            target = self.targets[next(turn) % len(self.targets)]
            try:
                answer = client.post(f"{target}/v2/events", json=batch, auth=self.conn.auth)
            except httpx.TransportError:
                # No answer: the relay may or may not have stored it; the resend carries
                # the same eventIds, so Amazon sees each at most once after dedup.
                with self._lock:
                    self.unanswered += 1
                time.sleep(0.2)
                continue
            with self._lock:
                self.answers.append(Answer(posted_at, answer.status_code, tries, time.monotonic()))
                if answer.status_code == 202:
                    self.accepted |= accepted_event_ids(batch, answer.json())
                elif answer.status_code == 503:
                    self.refused |= {i for i in posted_event_ids(batch) if i is not None}
            return


def assert_amazon_got_exactly_the_accepted(view: AmazonView, pump: Pump) -> dict[str, int]:
    """The emulator's view deduplicated by eventId equals the accepted set; nothing that
    was refused (503) reached Amazon. Returns the figures the docs record."""
    assert pump.accepted, "nothing was accepted"
    assert not (pump.accepted & pump.refused), "an eventId both accepted and refused"
    unique = set(view.unique_event_ids())
    assert not (unique & pump.refused), "a refused event reached Amazon: it had been stored"
    assert_exactly_the_accepted_reached_amazon(view, pump.accepted)
    all_copies = sum(
        len(request["body"]["events"])
        for request in view.received()
        if request["status"] == 207 and request["body"] is not None
    )
    return {
        "accepted": len(pump.accepted),
        "refused_503": len(pump.refused),
        "delivered_unique": len(unique),
        "duplicates_by_event_id": all_copies - len(unique),
        "lost": len(pump.accepted - unique),
    }


def wait_until(predicate: Callable[[], Any], limit: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        time.sleep(interval)


# --- a PostgreSQL cluster of the test's own ------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    assert found, "no PostgreSQL server binaries under /usr/lib/postgresql"
    return Path(found[-1]).parent


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a free port (trust auth), which a test may stop,
    restart or crash without touching the machine's shared server. Runs as the
    ``postgres`` user when the tests run as root (initdb refuses root)."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-proof-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}\n{done.stderr}"

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", *extra, action
        )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends every session and shuts down cleanly; ``immediate`` is a crash
        (recovery from the WAL on the next start)."""
        self._pg_ctl("stop", "-m", mode)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# --- ``relay serve`` processes -------------------------------------------------------------


def _copy_output(stream: IO[bytes], log: Path) -> None:
    with stream, log.open("ab") as sink:
        for line in stream:
            sink.write(line)
            sink.flush()


def spawn_relay(
    deployment: Deployment,
    name: str,
    *,
    lease_seconds: int = 60,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> RelayProcess:
    """``relay serve`` for ``deployment``, healthy. Its output goes through a pipe (a test
    copies it to ``<name>.log``) rather than straight into a file: a test that limits
    the process's file sizes must not break its logging as a side effect. ``port``
    lets a restarted relay come back where its clients expect it."""
    port = port or free_port()
    log = deployment.workdir / f"{name}.log"
    process = subprocess.Popen(
        [RELAY, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=deployment.environment(port, lease_seconds) | dict(env or {}),
        cwd=deployment.workdir,  # no stray .env is read
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    threading.Thread(target=_copy_output, args=(process.stdout, log), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    admin = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {deployment.admin_token}"}, timeout=30
    )
    relay = RelayProcess(process, url, log, admin, httpx.Client(base_url=url, timeout=30))
    wait_healthy(relay)
    return relay


def worker_of(relay: RelayProcess) -> str:
    """How the name a relay process leases deliveries under begins
    (``dispatcher.worker_name``: host, pid, then a random part)."""
    return f"{socket.gethostname()[:40]}:{relay.pid}:"


def metric(relay: RelayProcess, name: str) -> float:
    """One sample of ``relay``'s /metrics, by its full name with labels; 0 if absent."""
    for line in relay.client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
