"""``relay serve --workers N``: a listening socket per worker (app/workers.py).

Real processes on loopback. The point of a socket per worker is that connections
opened together are spread over the workers instead of all landing on whichever woke
first, and that a worker's death takes its socket with it, so nothing waits on a
socket nobody accepts from.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path

import httpx
import psutil
from e2e_helpers import new_admin_token
from test_e2e_processes import RELAY, free_port

from app.crypto import new_key_entry
from app.workers import OwnSocket, reuse_port_socket

CONNECTIONS = 16
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"


def test_an_own_socket_becomes_a_new_socket_on_the_same_port_wherever_it_is_unpickled() -> None:
    port = free_port()
    with reuse_port_socket("127.0.0.1", port) as held:
        placeholder = pickle.dumps(OwnSocket("127.0.0.1", port))
        with closing(pickle.loads(placeholder)) as one, closing(pickle.loads(placeholder)) as two:
            assert isinstance(one, socket.socket)
            assert isinstance(two, socket.socket)
            assert one.fileno() != two.fileno() != held.fileno()
            assert one.getsockname() == two.getsockname() == ("127.0.0.1", port)
            one.listen()
            two.listen()  # both listen at once: the kernel shares the port between them


def health_over_new_connection(port: int) -> socket.socket:
    """A connection that has been answered 200 on /healthz, left open (keep-alive)."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=5)
    connection.sendall(HEALTH)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = connection.recv(4096)
        assert chunk, "the relay closed the connection without answering"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return connection


def workers_of(parent: int) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(parent).children()
        if any("spawn_main" in part for part in child.cmdline())
    ]


def connections_per_worker(workers: list[psutil.Process], port: int) -> list[int]:
    return [
        sum(
            1
            for c in worker.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
        )
        for worker in workers
    ]


def wait_for_workers(parent: int, count: int, port: int, exclude: set[int]) -> list[int]:
    """The pids of ``count`` workers that answer, none of them in ``exclude``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = {worker.pid for worker in workers_of(parent)}
        if len(pids) == count and not pids & exclude:
            # Every worker must be serving: open connections until each has had one.
            with ExitStack() as open_connections:
                for _ in range(20 * count):
                    try:
                        open_connections.enter_context(health_over_new_connection(port))
                    except OSError:
                        break  # refused: no worker is listening yet
                    workers = workers_of(parent)
                    counts = connections_per_worker(workers, port)
                    serving = {worker.pid for worker, n in zip(workers, counts, strict=True) if n}
                    if serving == pids:
                        return sorted(pids)
        time.sleep(0.2)
    raise AssertionError(f"relay serve did not bring up {count} new workers")


@contextmanager
def relay_serve(database_url: str, workdir: Path, workers: int) -> Iterator[tuple[int, int]]:
    """``relay serve --workers N``: its pid and port, once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env |= {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_ENCRYPTION_KEYS": new_key_entry("w1"),
        "RELAY_ADMIN_TOKEN": new_admin_token(),
        "RELAY_LOG_FORMAT": "json",
        "TMPDIR": str(workdir),  # where the supervisor makes the workers' metrics directory
    }
    log = workdir / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [RELAY, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            env=env,
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_workers(process.pid, workers, port, exclude=set())
        yield process.pid, port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(
                    f"relay serve ignored SIGTERM:\n{log.read_text()[-3000:]}"
                ) from None
        assert process.returncode == 0, log.read_text()[-3000:]


def test_two_workers_share_connections_opened_together_and_a_killed_one_is_replaced(
    database_url: str, tmp_path: Path
) -> None:
    with relay_serve(database_url, tmp_path, workers=2) as (parent, port):
        workers = workers_of(parent)
        with ExitStack() as open_connections:
            for _ in range(CONNECTIONS):
                open_connections.enter_context(health_over_new_connection(port))
            spread = connections_per_worker(workers, port)
        # The kernel hashes each connection to one of the two sockets: both get some
        # (all 16 on one would happen once in 30,000 runs; with one shared socket it
        # happened in one run of six).
        assert sum(spread) == CONNECTIONS
        assert min(spread) > 0, spread

        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        # Until its replacement is up, every new connection goes to the survivor: none
        # is left in a dead socket's queue (each would time out after 5 s).
        for _ in range(CONNECTIONS):
            health_over_new_connection(port).close()
        replaced = wait_for_workers(parent, 2, port, exclude={victim.pid})
        assert workers[1].pid in replaced
    assert not psutil.pid_exists(parent) or psutil.Process(parent).status() == "zombie"
    for pid in replaced:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def ingest_count(port: int) -> float:
    """``relay_ingest_seconds_count`` as one /metrics answer, over a new connection, has it."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    (line,) = [line for line in text.splitlines() if line.startswith("relay_ingest_seconds_count")]
    return float(line.rsplit(" ", 1)[1])


def test_every_worker_answers_metrics_for_all_workers(database_url: str, tmp_path: Path) -> None:
    with relay_serve(database_url, tmp_path, workers=2) as (_, port):
        # The supervisor made a directory for the workers' metrics files by itself.
        (shared,) = tmp_path.glob("relay-metrics-*")
        # Ingest requests over new connections, which the kernel spreads over the two
        # workers (all on one would happen once in 30,000 runs). Each is timed in
        # relay_ingest_seconds, unauthenticated (401) as they are.
        for _ in range(CONNECTIONS):
            assert httpx.post(f"http://127.0.0.1:{port}/v2/events", json={}).status_code == 401
        # Whichever worker answers a scrape counts the requests of both.
        assert [ingest_count(port) for _ in range(CONNECTIONS)] == [CONNECTIONS] * CONNECTIONS
        assert len(list(shared.glob("*.db"))) >= 2  # a file per worker
    assert not shared.exists()  # removed when relay serve stops


def test_serve_with_workers_on_a_port_in_use_exits_2_and_names_the_address(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env |= {
            "RELAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
            "RELAY_ENCRYPTION_KEYS": new_key_entry("w1"),
            "RELAY_ADMIN_TOKEN": new_admin_token(),
        }
        result = subprocess.run(
            [RELAY, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert f"relay: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_the_supervisor_never_listens_itself(tmp_path: Path) -> None:
    """Only workers accept: the supervisor's socket holds the port but is not in LISTEN,
    so the kernel never hands it a connection that nobody would answer."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    with relay_serve(database_url, tmp_path, workers=2) as (parent, port):
        listening = [
            c
            for c in psutil.Process(parent).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening == []
        assert len(connections_per_worker(workers_of(parent), port)) == 2
