"""End-to-end harness: the Amazon emulator and the relay as real servers on loopback.

    with relay_stack(database_url, tmp_path) as stack:
        output, conn = stack.ready_output()  # an output, its Login with Amazon, a connection
        answer = stack.post_events(conn, sdk_batch([1, 2], email="a@example.com"))
        stack.wait_settled()
        assert sorted(stack.unique_event_ids()) == ["1", "2"]

Both servers run under uvicorn in background threads (``Served``), so sync tests
drive them with sync httpx clients over real HTTP, and an async test's own loop would
stay free (it would use ``httpx.AsyncClient``). The relay's socket is bound first, so
its settings can name its own URL as ``public_url``: the Login with Amazon redirect URI
then points back at it, and the emulator is told to accept only that redirect URI, as
LwA's security profile does. Batches are built by mParticle's own Python SDK.

The relay is the production app (``create_app``) with the production lifespan; the only
difference is two ``Runtime.build`` keyword arguments (a short HTTP timeout, a fast
first retry), passed by ``runtime_options`` while the relay starts, since
``create_app`` builds its runtime inside its lifespan and takes no such options.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import httpx
import structlog
import uvicorn
from mparticle import (
    ApiClient,
    AppEvent,
    Batch,
    CommerceEvent,
    DeviceInformation,
    Product,
    ProductAction,
    UserIdentities,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import Settings, isolated_settings
from app.crypto import KeyRing, new_key_entry
from app.db.session import create_engine
from app.emulator import create_app as create_emulator
from app.emulator.app import EmulatorApp
from app.http import Timeouts
from app.localserver import bind_loopback, url_of
from app.main import create_app
from app.runtime import Runtime

CLIENT_ID = "e2e-relay-client"
CLIENT_SECRET = "e2e-relay-client-secret-0123456789"
ADVERTISER_ID = "5551234567"
UNFINISHED = frozenset({"pending", "in_flight"})


def new_admin_token() -> str:
    return "adm-" + secrets.token_urlsafe(24)


# --- logs ------------------------------------------------------------------------------


class LogTap:
    """Every log line the process writes while tapped: the relay's structlog lines as
    rendered (after every processor, redaction included) and stdlib records (uvicorn,
    SQLAlchemy), formatted with their exception text."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    # The file protocol structlog's PrintLogger writes to.
    def write(self, text: str) -> int:
        with self._lock:
            self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        """The JSON-rendered structlog lines, parsed."""
        parsed = []
        for line in self.text.splitlines():
            if line.startswith("{"):
                parsed.append(json.loads(line))
        return parsed


class _TapHandler(logging.Handler):
    def __init__(self, tap: LogTap) -> None:
        super().__init__(level=logging.DEBUG)
        self.tap = tap
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.tap.write(self.format(record) + "\n")


@contextmanager
def tap_logs() -> Iterator[LogTap]:
    """Send the relay's logs to a LogTap (call after ``create_app``, which configures
    structlog). The processors stay the relay's own; only the output file changes."""
    tap = LogTap()
    previous = structlog.get_config()["logger_factory"]
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=tap))  # type: ignore[arg-type]
    handler = _TapHandler(tap)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield tap
    finally:
        root.removeHandler(handler)
        structlog.configure(logger_factory=previous)


# --- the relay's runtime options -------------------------------------------------------


@contextmanager
def runtime_options(**options: Any) -> Iterator[None]:
    """While active, ``Runtime.build`` gets ``options`` (e.g. ``http_timeouts``,
    ``first_retry_seconds``) as if ``create_app``'s lifespan had passed them."""
    if not options:
        yield
        return
    original = Runtime.build

    def build(settings: Settings, **kwargs: Any) -> Runtime:
        return original(settings, **(options | kwargs))

    Runtime.build = build  # type: ignore[method-assign]
    try:
        yield
    finally:
        Runtime.build = original  # type: ignore[method-assign]


# --- mParticle batches built by mParticle's own SDK -------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def sdk_wire(batch: Batch) -> dict[str, Any]:
    """The JSON mParticle's Python SDK puts on the wire for ``batch``."""
    body: dict[str, Any] = json.loads(json.dumps(ApiClient.sanitize_for_serialization(batch)))
    return body


def sdk_purchase(
    event_id: int | str, *, when_ms: int | None = None, total: float = 20.0, sku: str = "sku-1"
) -> CommerceEvent:
    product = Product(id=sku, name=f"Product {sku}", price=total / 2, quantity=2)
    action = ProductAction("purchase")
    action.products = [product]
    action.total_amount = total
    event = CommerceEvent(action)
    event.timestamp_unixtime_ms = when_ms if when_ms is not None else now_ms() - 60_000
    event.event_id = int(event_id)
    event.currency_code = "USD"
    return event


def sdk_custom_event(name: str = "Viewed Home", *, when_ms: int | None = None) -> AppEvent:
    event = AppEvent(event_name=name, custom_event_type="navigation")
    event.timestamp_unixtime_ms = when_ms if when_ms is not None else now_ms() - 60_000
    return event


def sdk_batch(
    events: Sequence[Any] | Sequence[int],
    *,
    email: str = "shopper@example.com",
    platform: str = "web",
    ip: str | None = None,
) -> dict[str, Any]:
    """An mParticle batch as the SDK sends it; ints in ``events`` become purchases with
    that event id."""
    return sdk_wire(sdk_batch_object(events, email=email, platform=platform, ip=ip))


def sdk_batch_object(
    events: Sequence[Any] | Sequence[int],
    *,
    email: str = "shopper@example.com",
    platform: str = "web",
    ip: str | None = None,
) -> Batch:
    """The SDK's own ``Batch`` of ``sdk_batch``, for the SDK's client to send."""
    device = DeviceInformation()
    device.platform = platform
    device.locale_country = "US"
    identities = UserIdentities()
    identities.email = email
    batch = Batch()
    batch.environment = "production"
    batch.device_info = device
    batch.user_identities = identities
    if ip is not None:
        batch.ip = ip
    batch.events = [sdk_purchase(e) if isinstance(e, int) else e for e in events]
    return batch


def posted_event_ids(batch: Mapping[str, Any]) -> list[str | None]:
    """The event id of each inbound event of an mParticle batch (None if it has none)."""
    ids: list[str | None] = []
    for event in batch["events"]:
        value = (event.get("data") or {}).get("event_id")
        ids.append(None if value is None else str(value))
    return ids


def accepted_event_ids(batch: Mapping[str, Any], answer: Mapping[str, Any]) -> set[str]:
    """The eventIds the relay took on when it answered ``answer`` (202) to ``batch``:
    every posted event except those it reported as dropped."""
    dropped = {d["index"] for d in answer["dropped"]}
    ids = {
        event_id
        for index, event_id in enumerate(posted_event_ids(batch))
        if index not in dropped and event_id is not None
    }
    assert len(ids) == answer["accepted"], (ids, answer)
    return ids


# --- the stack -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conn:
    """A connection as its creator sees it once: the secret is not shown again."""

    id: str
    output_id: str
    source: str
    key: str
    secret: str

    @property
    def auth(self) -> tuple[str, str]:
        return (self.key, self.secret)


@dataclass
class Stack:
    amazon_url: str
    relay_url: str
    emulator_app: EmulatorApp
    settings: Settings
    keyring: KeyRing
    admin_token: str
    admin: httpx.Client
    amazon: httpx.Client
    client: httpx.Client  # no credentials: ingest calls pass their own
    logs: LogTap | None = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    # --- admin -----------------------------------------------------------------------

    def create_output(self, **fields: Any) -> dict[str, Any]:
        body = {"name": "E2E shop", "advertiser_id": ADVERTISER_ID} | fields
        answer = self.admin.post("/v1/outputs", json=body)
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    def output(self, output_id: str) -> dict[str, Any]:
        answer = self.admin.get(f"/v1/outputs/{output_id}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def connect(self, output_id: str, source: str = "mparticle", name: str = "e2e") -> Conn:
        answer = self.admin.post(
            f"/v1/outputs/{output_id}/connections", json={"source": source, "name": name}
        )
        assert answer.status_code == 201, answer.text
        body = answer.json()
        return Conn(body["id"], output_id, body["source"], body["key"], body["secret"])

    def ready_output(self, **fields: Any) -> tuple[dict[str, Any], Conn]:
        """An output with a completed Login with Amazon and an mParticle connection."""
        output = self.create_output(**fields)
        assert self.login(output["id"]).status_code == 303
        return self.output(output["id"]), self.connect(output["id"])

    # --- Login with Amazon, as a browser does it ------------------------------------

    def browser(self) -> httpx.Client:
        """A new browser: its own cookie jar, following no redirect by itself."""
        client = httpx.Client(timeout=30)
        self._closers.append(client.close)
        return client

    def start_login(self, output_id: str, browser: httpx.Client) -> httpx.Response:
        """/oauth/amazon/start as the signed-in admin (bearer); answers 302 to LwA."""
        return browser.get(
            f"{self.relay_url}/oauth/amazon/start",
            params={"output_id": output_id},
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )

    def authorize(self, start: httpx.Response, browser: httpx.Client, **extra: str) -> str:
        """Follow the relay's redirect to the emulator's /ap/oa; returns the callback URL
        the emulator redirects the browser to (with ``code`` or ``error``)."""
        assert start.status_code == 302, start.text
        target = start.headers["location"]
        if extra:
            target = f"{target}&{httpx.QueryParams(extra)}"
        amazon = browser.get(target)
        assert amazon.status_code == 302, amazon.text
        callback = amazon.headers["location"]
        assert callback.startswith(f"{self.relay_url}/oauth/amazon/callback?"), callback
        return str(callback)

    def login(self, output_id: str, browser: httpx.Client | None = None) -> httpx.Response:
        """The whole flow: start → Amazon signs in → callback. Returns the callback's answer."""
        browser = browser or self.browser()
        callback = self.authorize(self.start_login(output_id, browser), browser)
        return browser.get(callback)

    # --- ingest ----------------------------------------------------------------------

    def post_events(
        self, conn: Conn, batch: Any, *, wait: float | None = None, expect: int = 202
    ) -> dict[str, Any]:
        params = {} if wait is None else {"wait": wait}
        answer = self.client.post("/v2/events", json=batch, auth=conn.auth, params=params)
        assert answer.status_code == expect, answer.text
        body: dict[str, Any] = answer.json()
        return body

    # --- deliveries ------------------------------------------------------------------

    def deliveries(self, **query: Any) -> list[dict[str, Any]]:
        answer = self.admin.get("/v1/deliveries", params={"limit": 1000, **query})
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()
        return found

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        answer = self.admin.get(f"/v1/deliveries/{delivery_id}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def wait_settled(self, timeout: float = 30.0, **query: Any) -> list[dict[str, Any]]:
        """Wait until no delivery is pending or in flight; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.deliveries(**query)
            unfinished = [d for d in found if d["status"] in UNFINISHED]
            if not unfinished:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"deliveries still unfinished after {timeout} s: {unfinished}")
            time.sleep(0.05)

    # --- the emulator ----------------------------------------------------------------

    def fault(self, *specs: dict[str, Any]) -> None:
        answer = self.amazon.post("/_emulator/faults", json=list(specs))
        assert answer.status_code == 201, answer.text

    def emulator_config(self, **changes: Any) -> None:
        answer = self.amazon.post("/_emulator/config", json=changes)
        assert answer.status_code == 200, answer.text

    def received(self) -> list[dict[str, Any]]:
        """Every events request the emulator received, faulted ones included."""
        requests: list[dict[str, Any]] = self.amazon.get("/_emulator/received").json()["requests"]
        return requests

    def accepted_events(self, *, unique: bool) -> list[dict[str, Any]]:
        answer = self.amazon.get(
            "/_emulator/received/events", params={"unique": "true" if unique else "false"}
        )
        events: list[dict[str, Any]] = answer.json()["events"]
        return events

    def unique_event_ids(self) -> list[str]:
        """eventIds Amazon accepted, each once (its view deduplicated by eventId)."""
        return [event["eventId"] for event in self.accepted_events(unique=True)]

    def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = self.amazon.get("/_emulator/stats").json()
        return found

    # --- the database ----------------------------------------------------------------

    def stored_tokens(self) -> set[str]:
        """Every LwA token the relay holds right now, decrypted with the test's key ring
        (refresh tokens and cached access tokens of every output)."""
        tokens: set[str] = set()
        rows = self.sql(
            "SELECT output_id, refresh_token_ciphertext, access_token_ciphertext FROM credentials"
        )
        for output_id, refresh, access in rows:
            tokens.add(self.keyring.decrypt(refresh, output_id).reveal())
            if access is not None:
                tokens.add(self.keyring.decrypt(access, output_id, purpose="access_token").reveal())
        return tokens

    def database_text(self) -> bytes:
        """Everything the database holds, as bytes: the SQLite files (main, WAL and shared
        memory) as they are on disk, or every row of every PostgreSQL table as JSON."""
        if self.database_url.startswith("sqlite"):
            path = Path(self.database_url.split(":///", 1)[1])
            files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
            return b"".join(f.read_bytes() for f in files if f.exists())
        tables = [
            str(name)
            for (name,) in self.sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        ]
        assert "credentials" in tables
        rows = [
            str(row)
            for table in tables
            for (row,) in self.sql(f'SELECT row_to_json(t)::text FROM "{table}" t')
        ]
        return "\n".join(rows).encode()

    def sql(self, statement: str, **params: Any) -> list[tuple[Any, ...]]:
        """Run one SQL statement on the relay's database (committed); rows, if any."""
        return run_sql(self.database_url, statement, **params)


def run_sql(database_url: str, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    """One SQL statement on a database, from a sync test (no loop of its own running)."""

    async def run() -> list[tuple[Any, ...]]:
        engine = create_engine(database_url)
        try:
            async with engine.begin() as connection:
                return await _execute(connection, statement, params)
        finally:
            await engine.dispose()

    return asyncio.run(run())


async def _execute(
    connection: AsyncConnection, statement: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    result = await connection.execute(text(statement), dict(params))
    return [tuple(row) for row in result] if result.returns_rows else []


def relay_settings(
    database_url: str,
    tmp_path: Path,
    *,
    amazon_url: str,
    relay_url: str,
    admin_token: str | None,
    encryption_keys: str,
    **overrides: Any,
) -> Settings:
    return isolated_settings(
        **{
            "database_url": database_url,
            "encryption_keys": encryption_keys,
            "key_file": tmp_path / "relay.key",
            "admin_token": admin_token,
            "lwa_client_id": CLIENT_ID,
            "lwa_client_secret": CLIENT_SECRET,
            "amazon_api_url": amazon_url,
            "lwa_authorize_url": f"{amazon_url}/ap/oa",
            "lwa_token_url": f"{amazon_url}/auth/o2/token",
            "public_url": relay_url,
            "log_format": "json",
            **overrides,
        }
    )


class Served:
    """An ASGI app under uvicorn in a background thread, on a loopback socket.

    ``app.localserver.serve_in_thread`` does the same as one context manager; this one
    splits stopping into ``signal_stop`` and ``join`` so that a test stops the relay and
    the emulator together: uvicorn notices ``should_exit`` only every 0.1 s and then
    waits another 0.1 s, which, one server after the other, doubled every test's teardown.
    """

    def __init__(self, app: Any, sock: socket.socket | None = None) -> None:
        self.sock = sock or bind_loopback()
        self.url = url_of(self.sock)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.005)
        return self.url

    def signal_stop(self) -> None:
        self.server.should_exit = True

    def join(self) -> None:
        self.signal_stop()
        self.thread.join(timeout=30)
        self.sock.close()


@dataclass(frozen=True, slots=True)
class Amazon:
    """A running emulator: its app (state), base URL and server."""

    app: EmulatorApp
    url: str
    served: Served


@contextmanager
def emulator_server(**options: Any) -> Iterator[Amazon]:
    """The Amazon emulator (LwA client CLIENT_ID / CLIENT_SECRET) on loopback."""
    app = create_emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **options)
    served = Served(app)
    try:
        yield Amazon(app, served.start(), served)
    finally:
        served.join()


@contextmanager
def relay_stack(
    database_url: str,
    tmp_path: Path,
    *,
    amazon: Amazon | None = None,
    encryption_keys: str | None = None,
    http_timeout: float | None = None,
    first_retry_seconds: float = 0.05,
    capture_logs: bool = False,
    **settings_overrides: Any,
) -> Iterator[Stack]:
    """The emulator (a new one unless ``amazon`` is given) and the relay, dispatcher
    running, as servers on loopback.

    Retries start after ``first_retry_seconds`` (the policy's 1 s would make fault
    tests slow; doubling, jitter and Retry-After stay as in production);
    ``http_timeout`` shortens the relay's HTTP timeouts for "slow answer" tests.
    ``capture_logs`` taps the relay's log output into ``stack.logs``.
    """
    # admin_token=None in the overrides runs the relay with the admin API off.
    admin_token: str | None = settings_overrides.pop("admin_token", new_admin_token())
    keys = encryption_keys or new_key_entry("e2e1")
    with ExitStack() as exits:
        own_emulator = amazon is None
        if amazon is None:
            amazon = exits.enter_context(emulator_server())
        # The relay's socket first: its URL goes into its own settings (public_url).
        sock = bind_loopback()
        exits.callback(sock.close)
        relay_url = url_of(sock)
        settings = relay_settings(
            database_url,
            tmp_path,
            amazon_url=amazon.url,
            relay_url=relay_url,
            admin_token=admin_token,
            encryption_keys=keys,
            **settings_overrides,
        )
        # LwA accepts only the registered return URL: the relay's own callback.
        amazon.app.emulator.config.update({"allowed_redirect_uris": [settings.redirect_uri]})
        app = create_app(settings)
        logs = exits.enter_context(tap_logs()) if capture_logs else None
        options: dict[str, Any] = {"first_retry_seconds": first_retry_seconds}
        if http_timeout is not None:
            options["http_timeouts"] = Timeouts(connect=5.0, read=http_timeout, total=http_timeout)
        relay = Served(app, sock)
        with runtime_options(**options):
            relay.start()
        exits.callback(relay.join)
        if own_emulator:
            # Both servers are told to stop at once (the emulator's join comes later).
            exits.callback(amazon.served.signal_stop)
        admin = exits.enter_context(
            httpx.Client(
                base_url=relay_url,
                headers={"Authorization": f"Bearer {admin_token}"} if admin_token else {},
                timeout=30,
            )
        )
        amazon_client = exits.enter_context(httpx.Client(base_url=amazon.url, timeout=30))
        client = exits.enter_context(httpx.Client(base_url=relay_url, timeout=30))
        stack = Stack(
            amazon_url=amazon.url,
            relay_url=relay_url,
            emulator_app=amazon.app,
            settings=settings,
            keyring=KeyRing.parse(keys),
            admin_token=admin_token or "",
            admin=admin,
            amazon=amazon_client,
            client=client,
            logs=logs,
        )
        # Faults left over must not hold up the relay's shutdown (LIFO: runs first).
        exits.callback(lambda: [close() for close in stack._closers])
        exits.callback(lambda: amazon_client.delete("/_emulator/faults"))
        yield stack


class AmazonView(Protocol):
    """What the assertion below reads from the emulator (a Stack, or a bare view)."""

    def unique_event_ids(self) -> list[str]: ...

    def received(self) -> list[dict[str, Any]]: ...


class EmulatorClient:
    """An emulator's control routes, for tests that have no Stack (subprocess relays)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def unique_event_ids(self) -> list[str]:
        answer = self.http.get("/_emulator/received/events", params={"unique": "true"})
        return [event["eventId"] for event in answer.json()["events"]]

    def all_accepted_ids(self) -> list[str]:
        answer = self.http.get("/_emulator/received/events", params={"unique": "false"})
        return [event["eventId"] for event in answer.json()["events"]]

    def received(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self.http.get("/_emulator/received").json()["requests"]
        return requests

    def post(self, path: str, body: Any) -> dict[str, Any]:
        answer = self.http.post(f"/_emulator/{path}", json=body)
        assert answer.status_code in (200, 201), answer.text
        result: dict[str, Any] = answer.json()
        return result

    def get(self, path: str) -> Any:
        return self.http.get(f"/_emulator/{path}").json()


def assert_exactly_the_accepted_reached_amazon(stack: AmazonView, accepted: set[str]) -> None:
    """Nothing lost, nothing extra: Amazon's view deduplicated by eventId is exactly the
    set of events the relay accepted, and every repeat is a resend of the same event."""
    unique = stack.unique_event_ids()
    assert len(unique) == len(set(unique))
    missing, extra = accepted - set(unique), set(unique) - accepted
    assert (sorted(missing), sorted(extra)) == ([], []), "(lost, extra) eventIds"
    # Every event that crossed the wire, faulted requests included, was an accepted
    # one, and each copy of an eventId is byte-for-byte the same event.
    copies: dict[str, dict[str, Any]] = {}
    for request in stack.received():
        if request["body"] is None:  # refused unread: over the emulator's size limit
            assert request["status"] == 413, request
            continue
        for event in request["body"]["events"]:
            event_id = event["eventId"]
            assert event_id in accepted, f"sent an event never accepted: {event_id}"
            assert copies.setdefault(event_id, event) == event, f"{event_id} changed on resend"


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
