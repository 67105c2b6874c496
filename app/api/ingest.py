"""Ingest routes, wire-compatible with mParticle's Events API and Segment's Tracking API.

The connection's credentials decide the output; nothing in the request chooses it.
A batch is answered only after its deliveries are committed; on any error nothing of
it is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import zlib
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from app import jsonutil, metrics
from app.api.deps import (
    ApiError,
    RuntimeDep,
    read_body,
    reading,
    strict_json,
    transaction,
)
from app.api.schemas import BulkSummary, IngestSummary, Problem, SegmentSummary
from app.auth import Credentials, from_write_key, parse_basic
from app.crypto import verify_secret
from app.db import repository as repo
from app.db.base import utcnow
from app.db.hot import SessionWriter
from app.db.models import Connection, Delivery, DeliveryStatus, Output
from app.errors import PayloadError
from app.ingest import BatchSummary, settings_for, store_batch
from app.pipeline import prepare_batch
from app.runtime import Runtime
from app.sources import adapter, mparticle

router = APIRouter(tags=["ingest"])

KIB = 1024
LIMITS = {"events": 256 * KIB, "bulk": 1024 * KIB, "segment": 512 * KIB, "records": 32 * 1024 * KIB}
MAX_BULK_BATCHES = 100
MAX_WAIT_SECONDS = 30.0
SEGMENT_TYPES = ("track", "page", "screen", "identify", "group", "alias")
OVERLOAD_RETRY_AFTER_SECONDS = 5


def _json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """The request body as the OpenAPI schema shows it (the routes read the raw body
    themselves, to enforce size limits and strict JSON before parsing)."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": schema}},
        }
    }


_MPARTICLE_BATCH = {
    "type": "object",
    "properties": {"events": {"type": "array", "items": {"type": "object"}}},
    "required": ["events"],
}
_SEGMENT_MESSAGE = {"type": "object", "properties": {"type": {"type": "string"}}}
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description}
    for status, description in {
        400: "Bad JSON or wrong shape; nothing stored",
        401: "Missing or wrong credentials",
        403: "Inactive connection, or one of another source",
        413: "Body over the route's limit",
        415: "Unsupported Content-Encoding",
        429: "Too many failed authentications from this client",
    }.items()
}


async def _connection(
    request: Request, rt: Runtime, source: str, credentials: Credentials | None
) -> tuple[Connection, Output]:
    client = request.client.host if request.client else "unknown"
    identity = credentials.key if credentials else ""
    too_many = ApiError(
        429,
        "too_many_failures",
        "too many failed attempts; try later",
        headers={"Retry-After": "60"},
    )
    unauthorized = ApiError(
        401,
        "unauthorized",
        "missing or wrong connection key and secret",
        headers={"WWW-Authenticate": 'Basic realm="relay"'},
    )
    if credentials is None:
        if rt.limiter.blocked(client, identity):
            raise too_many
        rt.limiter.failed(client, identity)
        raise unauthorized
    # One statement when the credentials are in the cache (the runtime's hot statements:
    # asyncpg directly on PostgreSQL), and no transaction open while a secret is hashed.
    found = await rt.hot.connection_with_output(credentials.key)
    connection = found[0] if found is not None else None
    # Credentials proven within the cache's minute pass even while this address or key
    # is refused: checking them costs no scrypt, and the cache is keyed by key and
    # secret, so only a caller who holds the secret gets past. Everything else waits out
    # the block without its secret being checked at all.
    if connection is None or not rt.auth_cache.verified(credentials, connection.secret_hash):
        if rt.limiter.blocked(client, identity):
            raise too_many
        if connection is None:
            # Unknown key: it costs the same hash as a wrong secret (no timing hint).
            async with reading(rt) as session:
                connection = await repo.authenticate_connection(
                    session, credentials.key, credentials.secret
                )
            if connection is not None:  # created since the read above
                rt.auth_cache.remember(credentials, connection.secret_hash)
        elif not await rt.auth_cache.check(credentials, connection.secret_hash, verify_secret):
            connection = None
        if connection is None:
            rt.limiter.failed(client, identity)
            raise unauthorized
    if not connection.active:
        raise ApiError(403, "connection_inactive", "this connection is not active")
    if connection.source != source:
        raise ApiError(
            403, "wrong_source", f"this connection takes {connection.source} data, not {source}"
        )
    # The output came with the connection, unless the key was only found by the
    # authentication just above (then it is the same connection, read again).
    if found is not None and found[0] is connection:
        return connection, found[1]
    async with reading(rt) as session:
        output = await repo.get_output(session, connection.output_id)
    if output is None:  # pragma: no cover - deleting an output deletes its connections
        raise unauthorized
    return connection, output


def _count(source: str, summary: BatchSummary) -> None:
    metrics.EVENTS_RECEIVED.labels(source=source).inc(summary.received)
    metrics.EVENTS_FORWARDED.labels(source=source).inc(summary.accepted)
    for reason, count in summary.drop_reasons.items():
        metrics.EVENTS_DROPPED.labels(source=source, reason=reason).inc(count)
    if summary.custom_data_skipped:
        metrics.CUSTOM_DATA_SKIPPED.labels(source=source).inc(summary.custom_data_skipped)
    metrics.BATCH_EVENTS.observe(summary.received)


async def _accept(
    rt: Runtime, connection: Connection, output: Output, payloads: list[Any]
) -> list[BatchSummary]:
    if rt.dispatcher.overloaded:
        raise ApiError(
            503,
            "overloaded",
            "deliveries are queued faster than they are sent; nothing was accepted, retry later",
            headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_SECONDS)},
        )
    now = utcnow()
    # Mapped before a database connection is taken: the pool is not held for CPU work.
    settings = settings_for(output, connection.id)
    prepared = [prepare_batch(p, connection.source, settings=settings, now=now) for p in payloads]
    # A batch of one request (the usual case), or whose events were all dropped, is
    # stored by one INSERT: atomic by itself, it needs no BEGIN and COMMIT (the
    # runtime's hot statements). Anything more shares one transaction, all or nothing.
    single = len(prepared) == 1 and len(prepared[0].bodies) <= 1
    handoff = rt.dispatcher.handoff(output)
    try:
        if single:
            summaries = [
                await store_batch(
                    rt.hot,
                    prepared[0],
                    output=output,
                    connection=connection,
                    now=now,
                    handoff=handoff,
                )
            ]
        else:
            async with transaction(rt) as session:
                writer = SessionWriter(session)
                summaries = [
                    await store_batch(
                        writer,
                        batch,
                        output=output,
                        connection=connection,
                        now=now,
                        handoff=handoff,
                    )
                    for batch in prepared
                ]
    except BaseException:
        handoff.cancel()
        raise
    # Committed: what was leased to this process's dispatcher is sent now, no claim.
    handoff.start()
    for summary in summaries:
        _count(connection.source, summary)
    waiting = sum(len(summary.deliveries) for summary in summaries) - handoff.count
    if waiting > 0:
        rt.dispatcher.queued(waiting)
        rt.dispatcher.wake()  # the rest waits in the queue for the claim loop
    return summaries


def _outcome(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "http_status": delivery.last_status_code,
        "error": delivery.last_error,
        "results": delivery.results,
    }


async def _wait_for_first_attempt(rt: Runtime, ids: list[str], seconds: float) -> dict[str, Any]:
    """Each delivery's state once it was tried once (or when ``seconds`` run out)."""
    deadline = time.monotonic() + min(seconds, MAX_WAIT_SECONDS)
    while True:
        async with transaction(rt) as session:
            deliveries = await repo.get_deliveries(session, ids)
        tried = all(
            d.status != DeliveryStatus.IN_FLIGHT
            and (d.attempts > 0 or d.status != DeliveryStatus.PENDING)
            for d in deliveries
        )
        if tried or time.monotonic() >= deadline:
            return {d.id: _outcome(d) for d in deliveries}
        await asyncio.sleep(0.02)


async def _answer(
    rt: Runtime,
    summaries: list[BatchSummary],
    wait: float | None,
    *,
    bulk: bool = False,
    extra: dict[str, Any] | None = None,
    status: int = 202,
) -> JSONResponse:
    bodies = [summary.as_dict() for summary in summaries]
    if wait:
        ids = [i for summary in summaries for i in summary.deliveries]
        outcome = await _wait_for_first_attempt(rt, ids, wait)
        for body, summary in zip(bodies, summaries, strict=True):
            body["outcome"] = {i: outcome[i] for i in summary.deliveries if i in outcome}
    content: dict[str, Any] = {"batches": bodies} if bulk else bodies[0]
    return JSONResponse({**(extra or {}), **content}, status_code=status)


def _decode_json(body: bytes) -> Any:
    return strict_json(body)


# --- mParticle -------------------------------------------------------------------------

WaitQuery = Query(
    default=None,
    ge=0,
    le=MAX_WAIT_SECONDS,
    description="answer after the first delivery attempt, waiting at most this long",
)


@router.post(
    "/v2/events",
    status_code=202,
    summary="One mParticle batch (Events API v2)",
    response_model=IngestSummary,
    responses=_PROBLEMS,
    openapi_extra=_json_body(_MPARTICLE_BATCH, "One mParticle batch"),
)
async def mparticle_events(
    request: Request, rt: RuntimeDep, wait: float | None = WaitQuery
) -> JSONResponse:
    credentials = parse_basic(request.headers.get("authorization"))
    connection, output = await _connection(request, rt, "mparticle", credentials)
    payload = _decode_json(await _body(request, LIMITS["events"]))
    # Shape errors → 400 before anything is stored. Only the batch's shape is checked
    # here (what parse() refuses as a whole); the events are read once, when mapped.
    mparticle.batch_events(payload)
    summaries = await _accept(rt, connection, output, [payload])
    return await _answer(rt, summaries, wait)


@router.post(
    "/v2/bulkevents",
    status_code=202,
    summary="Up to 100 mParticle batches",
    response_model=BulkSummary,
    responses=_PROBLEMS,
    openapi_extra=_json_body(
        {"type": "array", "items": _MPARTICLE_BATCH, "maxItems": MAX_BULK_BATCHES},
        "Up to 100 mParticle batches",
    ),
)
async def mparticle_bulk(
    request: Request, rt: RuntimeDep, wait: float | None = WaitQuery
) -> JSONResponse:
    credentials = parse_basic(request.headers.get("authorization"))
    connection, output = await _connection(request, rt, "mparticle", credentials)
    payload = _decode_json(await _body(request, LIMITS["bulk"]))
    if not isinstance(payload, list):
        raise PayloadError("bulk body must be a JSON array of batches")
    if len(payload) > MAX_BULK_BATCHES:
        raise PayloadError(f"bulk body has {len(payload)} batches; at most {MAX_BULK_BATCHES}")
    for position, batch in enumerate(payload):
        try:
            mparticle.batch_events(batch)
        except PayloadError as error:
            raise PayloadError(f"batch {position}: {error.message}") from None
    summaries = await _accept(rt, connection, output, payload)
    return await _answer(rt, summaries, wait, bulk=True)


# --- Segment spec ----------------------------------------------------------------------


def _check_signature(
    rt: Runtime, connection: Connection, body: bytes, payload: Any, signature: str | None
) -> None:
    secret = repo.shared_secret_of(rt.keyring, connection)
    if secret is None:
        return
    if not signature:
        raise ApiError(401, "signature_required", "X-Signature header is required")
    candidates = [body]
    if isinstance(payload, list) and payload:
        # Segment's batched webhooks sign the first message of the array.
        candidates += [jsonutil.dumps(payload[0]), jsonutil.canonical_text(payload[0]).encode()]
    key = secret.reveal().encode()
    given = signature.strip().lower()
    if not any(
        hmac.compare_digest(hmac.new(key, data, hashlib.sha1).hexdigest(), given)
        for data in candidates
    ):
        raise ApiError(401, "bad_signature", "X-Signature does not match the body")


def _inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip body (Segment's and RudderStack's libraries may send one), inflated.

    The limit applies to the inflated body too, so a small bomb cannot grow past it.
    """
    coding = (encoding or "").strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {coding!r} is not supported")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise PayloadError("body is not valid gzip") from None
    if len(data) > limit:
        raise ApiError(413, "body_too_large", f"inflated body is larger than {limit} bytes")
    if not inflater.eof:  # cut short: what came out is only a prefix of the body
        raise PayloadError("body is not valid gzip: the gzip stream is truncated")
    return data


async def _body(request: Request, limit: int) -> bytes:
    """The request body within ``limit`` bytes, sent and inflated (every ingest route
    takes gzip, as Segment's and RudderStack's libraries may send it)."""
    raw = await read_body(request, limit)
    return _inflate(raw, request.headers.get("content-encoding"), limit)


async def _segment(
    request: Request, rt: Runtime, wait: float | None, message_type: str | None
) -> JSONResponse:
    body = await _body(request, LIMITS["segment"])
    payload = _decode_json(body)
    credentials = parse_basic(request.headers.get("authorization"))
    if credentials is None and isinstance(payload, dict):
        in_body = payload.get("writeKey")
        credentials = from_write_key(in_body) if isinstance(in_body, str) else None
    connection, output = await _connection(request, rt, "segment", credentials)
    _check_signature(rt, connection, body, payload, request.headers.get("x-signature"))
    if message_type is not None:
        if not isinstance(payload, dict):
            raise PayloadError(f"/v1/{message_type} takes one message object")
        payload = {**payload, "type": payload.get("type") or message_type}
    adapter("segment").parse(payload)
    summaries = await _accept(rt, connection, output, [payload])
    return await _answer(rt, summaries, wait, extra={"success": True}, status=200)


@router.post(
    "/v1/batch",
    summary="Segment batch: {batch, context} or a bare array",
    response_model=SegmentSummary,
    responses=_PROBLEMS,
    openapi_extra=_json_body(
        {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"batch": {"type": "array", "items": _SEGMENT_MESSAGE}},
                    "required": ["batch"],
                },
                {"type": "array", "items": _SEGMENT_MESSAGE},
            ]
        },
        "Segment messages",
    ),
)
async def segment_batch(
    request: Request, rt: RuntimeDep, wait: float | None = WaitQuery
) -> JSONResponse:
    return await _segment(request, rt, wait, None)


def _segment_route(message_type: str) -> None:
    async def handler(
        request: Request, rt: RuntimeDep, wait: float | None = WaitQuery
    ) -> JSONResponse:
        return await _segment(request, rt, wait, message_type)

    handler.__name__ = f"segment_{message_type}"
    router.add_api_route(
        f"/v1/{message_type}",
        handler,
        methods=["POST"],
        summary=f"One Segment {message_type} message",
        response_model=SegmentSummary,
        responses=_PROBLEMS,
        openapi_extra=_json_body(_SEGMENT_MESSAGE, f"One Segment {message_type} message"),
    )


for _type in SEGMENT_TYPES:
    _segment_route(_type)


# --- flat records ----------------------------------------------------------------------


def _one_json_document(body: bytes, content_type: str | None) -> bool:
    """Is this records body one JSON document (not CSV, not NDJSON), as the adapter
    sniffs it? JSON-typed or untyped, starting with ``[``; or starting with ``{`` and
    not going on to a second line of JSON (then the adapter reads it as NDJSON)."""
    kind = (content_type or "").split(";")[0].strip().lower()
    start = body.lstrip()[:1]
    if kind not in ("", "application/json") or start not in (b"[", b"{"):
        return False
    if start == b"[":
        return True
    try:
        jsonutil.loads(body)
    except ValueError:  # InvalidJSONError included
        return False
    return True


def decode_records(body: bytes, content_type: str | None) -> Any:
    """The records adapter's decode, with the other routes' strictness for a body that
    is one JSON document; CSV and NDJSON rows are checked one by one by the adapter (a
    bad row is dropped with its number)."""
    if _one_json_document(body, content_type):
        strict_json(body)
    try:
        return adapter("records").decode(body, content_type)
    except ValueError:  # an NDJSON line with an integer of thousands of digits
        raise PayloadError("body is not valid: a number is too long") from None


@router.post(
    "/v1/records",
    status_code=202,
    summary="Flat conversion records (JSON, NDJSON, CSV)",
    response_model=IngestSummary,
    responses=_PROBLEMS,
    openapi_extra=_json_body(
        {"type": "array", "items": {"type": "object"}}, "Records (JSON array, NDJSON or CSV)"
    ),
)
async def records(request: Request, rt: RuntimeDep, wait: float | None = WaitQuery) -> JSONResponse:
    credentials = parse_basic(request.headers.get("authorization"))
    connection, output = await _connection(request, rt, "records", credentials)
    body = await _body(request, LIMITS["records"])
    payload = decode_records(body, request.headers.get("content-type"))
    summaries = await _accept(rt, connection, output, [payload])
    return await _answer(rt, summaries, wait)
