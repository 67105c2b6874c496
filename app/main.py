"""The relay's ASGI application: ``create_app(settings)``. No logic lives here.

The lifespan builds the process's runtime (database pool, one HTTP client, key
ring, token service) and starts the dispatcher; shutdown stops claiming work and
finishes or hands back what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, memory, metrics, web
from app.api import admin, ingest, oauth, ops
from app.api.deps import ApiError
from app.config import Settings, load_settings
from app.delivery.retention import prune_forever
from app.errors import PayloadError, RelayError, SettingsError
from app.logs import configure, get_logger
from app.runtime import Runtime

log = get_logger(__name__)

INGEST_PATHS = frozenset(
    {"/v2/events", "/v2/bulkevents", "/v1/batch", "/v1/records"}
    | {f"/v1/{t}" for t in ingest.SEGMENT_TYPES}
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class RequestContext:
    """Pure ASGI: a request id in every log line, security headers, ingest latency, and
    URLs holding a NUL character refused (400)."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.headers = list(SECURITY_HEADERS)
        if https:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        structlog.contextvars.bind_contextvars(request_id=request_id)
        # No id, key or name holds U+0000, and PostgreSQL refuses it in a query (which
        # would be answered as an outage): such a URL is refused as it stands.
        nul_in_url = "\x00" in scope["path"] or b"%00" in scope["query_string"]
        timed = scope["path"] in INGEST_PATHS
        start = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *self.headers,
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            if nul_in_url:
                refused = JSONResponse(
                    {"error": "invalid_request", "message": "the URL holds a NUL character (%00)"},
                    status_code=400,
                )
                await refused(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            if timed:
                metrics.INGEST_SECONDS.observe(time.perf_counter() - start)
            structlog.contextvars.unbind_contextvars("request_id")


SEGMENT_PATHS = frozenset({"/v1/batch"} | {f"/v1/{t}" for t in ingest.SEGMENT_TYPES})


def _problem(
    status: int, code: str, message: str, request: Request | None = None, **extra: Any
) -> JSONResponse:
    body = {"error": code, "message": message, **extra}
    if request is not None and request.url.path in SEGMENT_PATHS:
        # Segment's libraries read {"code", "message"} from an error; without "code"
        # they log the failure as "unknown".
        body["code"] = code
    return JSONResponse(body, status_code=status)


def _validation_problem(error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 ``detail`` list, without echoing the input back (it may be NaN or a
    lone surrogate, which no JSON encoder writes, and it need not be reflected at all).
    Unreadable JSON is the client's syntax error, answered 400 like the ingest routes."""
    detail = [
        {"type": item["type"], "loc": list(item["loc"]), "msg": item["msg"]}
        for item in error.errors()
    ]
    unreadable = [item for item in error.errors() if item["type"] == "json_invalid"]
    if unreadable:
        reason = (unreadable[0].get("ctx") or {}).get("error", "JSON decode error")
        return JSONResponse(
            {"error": "invalid_payload", "message": str(reason), "detail": detail},
            status_code=400,
        )
    return JSONResponse({"detail": detail}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_problem(error)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        response = _problem(error.status, error.code, error.message, request)
        response.headers.update(error.headers)
        return response

    @app.exception_handler(SettingsError)
    async def settings_error(request: Request, error: SettingsError) -> JSONResponse:
        return _problem(422, error.code, error.message, request, field=error.field)

    @app.exception_handler(PayloadError)
    async def payload_error(request: Request, error: PayloadError) -> JSONResponse:
        return _problem(400, error.code, error.message, request)

    @app.exception_handler(RelayError)
    async def relay_error(request: Request, error: RelayError) -> JSONResponse:
        return _problem(error.status, error.code, error.message, request)

    # The database is away or overloaded: a retryable 503, never a 500, and nothing
    # was accepted (the transaction did not commit).
    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    @app.exception_handler(OSError)
    async def storage_unavailable(request: Request, error: Exception) -> JSONResponse:
        log.warning("storage_unavailable", error=type(error).__name__)
        response = _problem(
            503, "unavailable", "storage is unavailable; nothing was accepted, retry later", request
        )
        response.headers["Retry-After"] = "5"
        return response


# CPython collects its youngest generation after 700 net allocations of containers. A
# served process under load keeps some 40,000 young objects alive at any moment (the
# batches being decoded, mapped, stored and sent), so at 700 its collections ran
# several times per request, promoted those batches to the older generations and
# walked them there again: 7.4 % of a worker's CPU at the bench's closed loop
# (docs/decisions/0019-collector-threshold.md). At 50,000 a young collection is rare,
# and what it finds has mostly been freed by reference counting already.
GEN0_THRESHOLD = 50_000


def _tune_collector() -> None:
    """Move everything alive after start-up (modules, classes, SQLAlchemy's and FastAPI's
    compiled structures: ~175,000 objects) out of the collector's sight, and collect the
    young generation far less often (``GEN0_THRESHOLD``).

    The start-up objects live as long as the process; without the freeze, every full
    collection walks them all again, a pause of 120-230 ms that lands on whatever request
    is running then (the ingest p99). Collected once first so that start-up garbage is not
    frozen with them (docs/decisions/0012-hot-path.md).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)


def create_app(settings: Settings | None = None, *, dispatcher: bool = True) -> FastAPI:
    settings = settings or load_settings()
    configure(settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        memory.limit_heaps()
        runtime = Runtime.build(settings)
        app.state.runtime = runtime
        if settings.admin_token is None:
            log.warning("admin_api_off", hint="set RELAY_ADMIN_TOKEN to use the admin API and /ui/")
        pruning = None
        _tune_collector()
        trimming = asyncio.create_task(memory.trim_forever())
        if dispatcher:
            runtime.dispatcher.start()
            if settings.retention_days > 0:
                pruning = asyncio.create_task(
                    prune_forever(runtime.sessionmaker, settings.retention_days)
                )
        try:
            yield
        finally:
            for task in (pruning, trimming):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if dispatcher:
                await runtime.dispatcher.stop()
            await runtime.close()

    app = FastAPI(
        title="Amazon CAPI relay",
        version=__version__,
        summary="Conversion events from mParticle, Segment-spec sources and flat records "
        "to the Amazon Ads Events API.",
        lifespan=lifespan,
    )
    add_error_handlers(app)
    for router in (ops.router, ingest.router, admin.router, oauth.router, web.router):
        app.include_router(router)
    app.mount(web.STATIC_PATH, web.static_files(), name="ui-static")
    app.add_middleware(web.UISessionMiddleware, settings=settings)
    app.add_middleware(RequestContext, https=settings.public_url.startswith("https://"))
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory app.main:app_factory`` and ``relay serve --workers N``."""
    return create_app()
