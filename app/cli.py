"""The ``relay`` command line.

Sub-commands import what they need when they run, so that quick commands such as
``relay map`` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn


class UsageError(Exception):
    """Bad input to a command: one clear line on stderr and exit code 2."""


def _fail(message: str) -> NoReturn:
    print(f"relay: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--now: {text!r} is not an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_map(args: argparse.Namespace) -> int:
    from app import jsonutil
    from app.errors import RelayError
    from app.pipeline import map_payload, output_settings

    try:
        settings_raw: Any = {}
        if args.settings:
            try:
                settings_raw = jsonutil.loads(args.settings)
            except jsonutil.InvalidJSONError as error:
                raise UsageError(f"--settings is not valid JSON: {error}") from None
        settings = output_settings(settings_raw)
        now = parse_now(args.now)
        if args.file in (None, "-"):
            body = sys.stdin.buffer.read()
        else:
            try:
                with open(args.file, "rb") as handle:
                    body = handle.read()
            except OSError as error:
                raise UsageError(f"cannot read {args.file}: {error.strerror}") from None
        result = map_payload(args.source, body, settings=settings, now=now)
    except (UsageError, RelayError) as error:
        _fail(str(error))
    sys.stdout.buffer.write(jsonutil.dumps(result.as_dict()) + b"\n")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    import base64
    import secrets

    key_id = args.key_id or f"k{datetime.now(UTC):%Y%m%d%H%M%S}"
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    print(f"{key_id}:{secret}")
    return 0


def _settings() -> Any:
    from app.config import load_settings
    from app.logs import configure

    settings = load_settings()
    configure(settings.log_format)  # before anything logs: the migration does
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    import uvicorn

    from app.db.migrate import upgrade_to_head

    settings = _settings()
    upgrade_to_head(settings.database_url)
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here; any worker's /metrics merges them all.
        metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    options: dict[str, Any] = {
        "factory": True,
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 15,
        # Longer than the idle timeout of clients' and load balancers' connection pools
        # (httpx 5 s, aiohttp 15 s, AWS ALB 60 s): otherwise the relay may close an idle
        # connection just as a request is sent on it, and the sender sees no answer.
        "timeout_keep_alive": 75,
        "proxy_headers": args.proxy_headers,
    }
    if args.workers > 1:
        from app.workers import run_workers

        try:
            run_workers(uvicorn.Config("app.main:app_factory", **options))
        except OSError as error:
            where = f"{args.host}:{args.port}"
            raise UsageError(f"cannot listen on {where}: {error.strerror}") from None
        finally:
            if metrics_dir is not None:  # the counts died with the workers
                shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        uvicorn.run("app.main:app_factory", **options)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade_to_head

    upgrade_to_head(_settings().database_url)
    print("relay: database is at the latest revision")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from app.emulator import serve

    print(
        f"relay: Amazon emulator on http://{args.host}:{args.port} "
        f"(client id relay-demo-client, secret relay-demo-secret)"
    )
    serve(host=args.host, port=args.port)
    return 0


def cmd_rotate_keys(args: argparse.Namespace) -> int:
    import asyncio

    from app.operator import rotate_keys

    changed = asyncio.run(rotate_keys(_settings()))
    print(f"relay: re-encrypted {changed} secret(s) under the newest key")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    return run_demo(keep=args.keep)


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio

    from app.operator import run

    return asyncio.run(run(_settings(), args))


def cmd_upload(args: argparse.Namespace) -> int:
    from app.errors import RelayError
    from app.upload import UploadOptions, run_upload

    try:
        return run_upload(UploadOptions.from_args(args))
    except RelayError as error:
        _fail(str(error))


def build_parser() -> argparse.ArgumentParser:
    from app.sources import SOURCES

    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay conversion events from CDPs to the Amazon Ads Events API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    mapper = command(
        "map", cmd_map, "Map one inbound payload and print the Amazon requests and drops."
    )
    mapper.add_argument("--source", required=True, choices=sorted(SOURCES))
    mapper.add_argument("--settings", help="output settings as a JSON object")
    mapper.add_argument("--now", help="the current time, ISO 8601 (default: the clock)")
    mapper.add_argument("file", nargs="?", help="payload file, or - for standard input")

    upload = command(
        "upload",
        cmd_upload,
        "Send a records file (CSV, NDJSON or JSON) through the relay in batches, "
        "resumably, with a progress bar and a summary.",
    )
    upload.add_argument("file", help="the records file (.csv, .ndjson/.jsonl or .json)")
    upload.add_argument(
        "--output-id", help="queue for this output in the relay's database (RELAY_DATABASE_URL)"
    )
    upload.add_argument(
        "--batch-size", type=int, default=500, help="rows per Events API request (1..500)"
    )
    upload.add_argument(
        "--format", choices=["csv", "ndjson", "json"], help="default: from the name and content"
    )
    upload.add_argument(
        "--restart", action="store_true", help="ignore the checkpoint: upload from the first row"
    )
    upload.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="batches being queued at once, counted in file order (1..16, default 8)",
    )
    upload.add_argument("--url", help="post to a running relay's /v1/records instead")
    upload.add_argument("--key", help="with --url: a records connection's key (or key.secret)")
    upload.add_argument("--secret", help="with --url: its secret (or RELAY_UPLOAD_SECRET)")
    upload.add_argument("--no-progress", action="store_true", help="no progress bar")

    keygen = command("keygen", cmd_keygen, "Print a new entry for RELAY_ENCRYPTION_KEYS.")
    keygen.add_argument("--key-id", help="the key id (default: k<timestamp>)")

    serve = command("serve", cmd_serve, "Migrate the database, then serve the API and deliver.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each listening on a socket of its own (default 1)",
    )
    serve.add_argument(
        "--proxy-headers", action="store_true", help="trust X-Forwarded-* from a reverse proxy"
    )

    command("migrate", cmd_migrate, "Upgrade the database to the latest revision.")
    command(
        "rotate-keys",
        cmd_rotate_keys,
        "Re-encrypt every stored secret under the newest RELAY_ENCRYPTION_KEYS entry.",
    )

    emulator = command(
        "emulator", cmd_emulator, "Run the bundled Amazon emulator (LwA + Events API)."
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=9100)

    demo = command(
        "demo",
        cmd_demo,
        "Run the whole path on this machine: emulator, relay, Login with Amazon, batches.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's database directory")

    outputs = command("outputs", cmd_operator, "List, show, create or delete outputs.")
    outputs_sub = outputs.add_subparsers(dest="action", required=True, metavar="ACTION")
    outputs_sub.add_parser("list", help="list outputs")
    show = outputs_sub.add_parser("show", help="show one output")
    show.add_argument("id")
    create = outputs_sub.add_parser("create", help="create an output")
    create.add_argument("--name", required=True)
    create.add_argument("--advertiser-id", required=True)
    create.add_argument("--region", default="NA", choices=["NA", "EU", "FE"])
    create.add_argument("--data-set-name")
    create.add_argument("--partner-name")
    delete = outputs_sub.add_parser("delete", help="delete an output and everything of it")
    delete.add_argument("id")

    connections = command(
        "connections", cmd_operator, "List, create, deactivate or delete connections."
    )
    connections_sub = connections.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = connections_sub.add_parser("list", help="list an output's connections")
    listing.add_argument("--output-id", required=True)
    create = connections_sub.add_parser("create", help="create a connection (secret shown once)")
    create.add_argument("--output-id", required=True)
    create.add_argument("--source", required=True, choices=sorted(SOURCES))
    create.add_argument("--name", required=True)
    for action in ("deactivate", "activate", "delete"):
        sub = connections_sub.add_parser(action, help=f"{action} a connection")
        sub.add_argument("id")

    deliveries = command(
        "deliveries", cmd_operator, "List deliveries or retry failed and dead ones."
    )
    deliveries_sub = deliveries.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = deliveries_sub.add_parser("list", help="list recent deliveries")
    listing.add_argument("--output-id")
    listing.add_argument("--status")
    listing.add_argument("--limit", type=int, default=20)
    retry = deliveries_sub.add_parser("retry", help="queue failed/dead deliveries again")
    retry.add_argument("ids", nargs="*", help="delivery ids")
    retry.add_argument("--all-dead", action="store_true", help="every dead delivery")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from app.logs import configure

    parser = build_parser()
    args = parser.parse_args(argv)
    configure()  # on stderr, whatever the command; _settings() applies RELAY_LOG_FORMAT
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UsageError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
