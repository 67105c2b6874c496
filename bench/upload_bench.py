"""``relay upload`` end to end: a big CSV file → relay database → dispatcher → Amazon emulator.

Three processes, as in production: the Amazon emulator (``relay emulator``), the relay
(``relay serve``: API + dispatcher) and the upload (``relay upload FILE --output-id``),
all on loopback, with a fresh SQLite file or a fresh PostgreSQL database. The output is
created over the admin API and logged in with Login with Amazon against the emulator,
as ``relay demo`` does.

Measured: wall time of the upload command (rows durably queued), end-to-end time until
the emulator has accepted every forwarded event, rows/s end to end, and the peak RSS
of each process (the upload's from ``wait4``, the others' from /proc VmHWM).

    .venv/bin/python bench/upload_bench.py [--rows 1000000] [--backend sqlite|postgresql|both]
        [--phased] [--via database|http] [--profile DIR]

``--phased`` disables the output while the file is uploaded (deliveries wait in the
queue), then enables it: the upload and the delivery of the queue are timed apart.
``--via http`` runs the upload in HTTP mode (``--url``: the relay's ``POST /v1/records``
maps the rows) instead of database mode. ``--profile DIR`` runs the three processes
under cProfile and leaves their stats in DIR (the figures are then not comparable).

PostgreSQL: ``RELAY_TEST_POSTGRES_URL`` (default postgresql+asyncpg://postgres@127.0.0.1:5432/test)
names a server where the role may CREATE DATABASE; the benchmark makes its own database
and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

RELAY = str(Path(sys.executable).with_name("relay"))
CLIENT_ID, CLIENT_SECRET = "relay-demo-client", "relay-demo-secret"
POSTGRES_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
INVALID_EVERY = 10_000  # one row in this many has an event_value that is not a number


def generate(path: Path, rows: int) -> None:
    """A CRM export: purchases of distinct shoppers in the last 20 hours, no event_id."""
    now_ms = int(time.time() * 1000)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(
            "event_type,event_time,event_value,currency,units_sold,country_code,email,phone\n"
        )
        lines = []
        for i in range(rows):
            value = "n/a" if i % INVALID_EVERY == INVALID_EVERY - 1 else f"{i % 997 / 10 + 1:.2f}"
            lines.append(
                f"purchase,{now_ms - (i % 72_000) * 1000},{value},usd,{i % 5 + 1},US,"
                f"shopper{i}@example.com,+1415555{i % 10_000:04d}\n"
            )
            if len(lines) == 10_000:
                out.writelines(lines)
                lines.clear()
        out.writelines(lines)


def relay_command(name: str, args: list[str], profile_dir: Path | None) -> list[str]:
    """``relay ARGS``, or the same under cProfile (its stats in PROFILE_DIR/NAME.prof).

    uvicorn re-raises the SIGTERM it shut down on once it is done, which would kill the
    process before cProfile writes its stats: a SIGTERM handler that exits normally
    lets the stats be written.
    """
    if profile_dir is None:
        return [RELAY, *args]
    script = (
        "import cProfile, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        f"sys.argv = ['relay', *{args!r}]\n"
        "from app.cli import main\n"
        f"cProfile.run('main()', {str(profile_dir / f'{name}.prof')!r})\n"
    )
    return [sys.executable, "-c", script]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.05)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TreePeaks:
    """Peak RSS (VmHWM) of a process and its children, sampled until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreePeaks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            try:
                children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            except OSError:
                continue
            for pid in [self.pid, *map(int, children)]:
                # It may end between the listing and the reading.
                with contextlib.suppress(OSError):
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak_rss_mb(pid))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _admin(sql: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'relay.db'}"
        return
    from sqlalchemy import make_url

    name = f"relay_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def login(client: httpx.Client, output_id: str) -> None:
    """Login with Amazon as a browser does it: relay → emulator → relay callback."""
    start = client.get("/oauth/amazon/start", params={"output_id": output_id})
    amazon = client.get(start.headers["location"])
    callback = client.get(amazon.headers["location"])
    if callback.status_code != 303:
        raise RuntimeError(f"Login with Amazon failed: {callback.status_code}")


def run_one(
    backend: str,
    csv_path: Path,
    rows: int,
    batch_size: int,
    workdir: Path,
    phased: bool,
    profile_dir: Path | None = None,
    via: str = "database",
) -> dict[str, Any]:
    amazon_port, relay_port = free_port(), free_port()
    amazon, relay = f"http://127.0.0.1:{amazon_port}", f"http://127.0.0.1:{relay_port}"
    admin_token = secrets.token_urlsafe(24)
    with database(backend, workdir) as database_url:
        env = {
            **os.environ,
            "RELAY_DATABASE_URL": database_url,
            "RELAY_KEY_FILE": str(workdir / "relay.key"),
            "RELAY_ADMIN_TOKEN": admin_token,
            "RELAY_LWA_CLIENT_ID": CLIENT_ID,
            "RELAY_LWA_CLIENT_SECRET": CLIENT_SECRET,
            "RELAY_AMAZON_API_URL": amazon,
            "RELAY_LWA_AUTHORIZE_URL": f"{amazon}/ap/oa",
            "RELAY_LWA_TOKEN_URL": f"{amazon}/auth/o2/token",
            "RELAY_PUBLIC_URL": relay,
            "RELAY_LOG_FORMAT": "json",
        }
        with (
            process(
                relay_command(
                    f"emulator-{backend}", ["emulator", "--port", str(amazon_port)], profile_dir
                ),
                env,
                workdir / "emulator.log",
            ) as emulator_proc,
            process(
                relay_command(
                    f"relay-{backend}", ["serve", "--port", str(relay_port)], profile_dir
                ),
                env,
                workdir / f"relay-{backend}.log",
            ) as relay_proc,
        ):
            wait_http(f"{amazon}/_emulator/stats")
            wait_http(f"{relay}/healthz")
            with httpx.Client(
                base_url=relay, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
            ) as client:
                output = client.post(
                    "/v1/outputs", json={"name": "Bench", "advertiser_id": "1234567890"}
                ).json()
                login(client, output["id"])
                if phased:  # the queue fills first: deliveries wait for a disabled output
                    client.patch(f"/v1/outputs/{output['id']}", json={"enabled": False})
                if via == "http":  # the relay maps: the upload only reads and posts
                    connection = client.post(
                        f"/v1/outputs/{output['id']}/connections",
                        json={"source": "records", "name": "bench upload"},
                    ).json()
                    target = ["--url", relay, "--key", connection["key"]]
                    env = {**env, "RELAY_UPLOAD_SECRET": connection["secret"]}
                else:
                    target = ["--output-id", output["id"]]
            checkpoint = csv_path.with_name(csv_path.name + ".relay-upload.json")
            checkpoint.unlink(missing_ok=True)
            began = time.monotonic()
            upload = subprocess.Popen(
                relay_command(
                    f"upload-{backend}",
                    [
                        *("upload", str(csv_path), *target),
                        *("--no-progress", "--batch-size", str(batch_size)),
                    ],
                    profile_dir,
                ),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert upload.stdout is not None
            with TreePeaks(upload.pid) as upload_peaks:
                summary = upload.stdout.read().decode()
                _, status, usage = os.wait4(upload.pid, 0)
            queued_at = time.monotonic()
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"relay upload failed:\n{summary}")
            forwarded = json.loads(checkpoint.read_text())["totals"]["forwarded"]
            if phased:
                httpx.patch(
                    f"{relay}/v1/outputs/{output['id']}",
                    json={"enabled": True},
                    headers={"Authorization": f"Bearer {admin_token}"},
                )
            stats: dict[str, Any] = {}
            while True:
                stats = httpx.get(f"{amazon}/_emulator/stats").json()
                if stats["accepted_events"] + stats["rejected_events"] >= forwarded:
                    break
                if time.monotonic() - queued_at > 1800:
                    raise RuntimeError(f"deliveries did not finish: {stats}")
                time.sleep(0.1)
            done_at = time.monotonic()
            relay_rss, emulator_rss = peak_rss_mb(relay_proc.pid), peak_rss_mb(emulator_proc.pid)
            relay_cpu, emulator_cpu = cpu_seconds(relay_proc.pid), cpu_seconds(emulator_proc.pid)
    took = done_at - began
    return {
        "backend": backend,
        "mode": "phased" if phased else "concurrent",
        "via": via,
        "rows": rows,
        "forwarded": forwarded,
        "accepted": stats["accepted_events"],
        "rejected_by_amazon": stats["rejected_events"],
        "requests": stats["requests"],
        "upload_seconds": round(queued_at - began, 1),
        "end_to_end_seconds": round(took, 1),
        "rows_per_second": round(rows / took),
        "upload_rows_per_second": round(rows / (queued_at - began)),
        # Phased: the dispatcher alone; concurrent: what was left when the upload ended.
        "drain_seconds": round(done_at - queued_at, 1),
        **(
            {"drain_events_per_second": round(forwarded / max(done_at - queued_at, 1e-9))}
            if phased
            else {}
        ),
        # The upload's processes together (the command and its mapper process); wait4's
        # ru_maxrss is only the largest of them, and its CPU times include the mapper's.
        "upload_peak_rss_mb": round(sum(upload_peaks.peaks.values()), 1),
        "upload_peak_rss_by_process_mb": [round(mb, 1) for mb in upload_peaks.peaks.values()],
        "relay_peak_rss_mb": round(relay_rss, 1),
        "emulator_peak_rss_mb": round(emulator_rss, 1),
        "upload_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "relay_cpu_seconds": round(relay_cpu, 1),
        "emulator_cpu_seconds": round(emulator_cpu, 1),
        "summary": summary.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--phased",
        action="store_true",
        help="upload first (output disabled), then measure the dispatcher draining the queue",
    )
    parser.add_argument(
        "--via",
        choices=["database", "http"],
        default="database",
        help="the upload's mode: queue in the database (default) or post to /v1/records",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run every process under cProfile; the stats go to DIR/{upload,relay,emulator}-*.prof",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="relay-upload-bench-"))
    try:
        csv_path = workdir / "records.csv"
        began = time.monotonic()
        generate(csv_path, args.rows)
        print(
            f"generated {args.rows:,} rows ({csv_path.stat().st_size / 1e6:.0f} MB) "
            f"in {time.monotonic() - began:.1f} s; {platform.python_version()}, "
            f"{os.cpu_count()} CPUs",
            file=sys.stderr,
        )
        backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
        results = []
        for backend in backends:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            result = run_one(
                backend,
                csv_path,
                args.rows,
                args.batch_size,
                workdir,
                args.phased,
                args.profile.resolve() if args.profile else None,
                args.via,
            )
            results.append(result)
            if args.json:
                continue
            print(f"\n== {backend} ==")
            for key, value in result.items():
                if key != "summary":
                    print(f"{key:>24}: {value}")
            print(result["summary"])
        if args.json:
            print(json.dumps(results, indent=1))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
