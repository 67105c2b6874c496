"""Admin API (bearer RELAY_ADMIN_TOKEN): outputs, connections, deliveries, preview."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from app import jsonutil
from app.amazon.settings import OutputSettings
from app.api.deps import (
    AdminDep,
    ApiError,
    RuntimeDep,
    StrictJSONRoute,
    read_body,
    strict_json,
    transaction,
)
from app.api.ingest import decode_records
from app.api.schemas import (
    ConnectionCreate,
    ConnectionCreated,
    ConnectionOut,
    ConnectionUpdate,
    DeliveryOut,
    OutputCreate,
    OutputOut,
    OutputUpdate,
    PreviewOut,
)
from app.auth import write_key
from app.cli_time import parse_instant
from app.db import repository as repo
from app.db.base import utcnow
from app.db.models import Connection, Delivery, DeliveryStatus, Output
from app.ingest import settings_for
from app.pipeline import map_parsed
from app.sources import SOURCES

router = APIRouter(dependencies=[AdminDep], tags=["admin"], route_class=StrictJSONRoute)
PREVIEW_LIMIT = 32 * 1024 * 1024
# The output settings a PATCH may set to null (nullable columns).
CLEARABLE_SETTINGS = frozenset(
    {
        "data_set_name",
        "partner_name",
        "consent_purpose_user_data",
        "consent_purpose_ad_storage",
        "consent_category_advertising",
    }
)


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def output_out(output: Output) -> OutputOut:
    return OutputOut.model_validate(output, from_attributes=True)


def connection_out(connection: Connection) -> ConnectionOut:
    return ConnectionOut(
        id=connection.id,
        output_id=connection.output_id,
        source=connection.source,
        name=connection.name,
        key=connection.key,
        active=connection.active,
        signed=connection.shared_secret_ciphertext is not None,
        created_at=connection.created_at,
    )


def delivery_out(delivery: Delivery, *, with_body: bool = False) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id,
        output_id=delivery.output_id,
        connection_id=delivery.connection_id,
        source=delivery.source,
        status=delivery.status,
        event_count=delivery.event_count,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        created_at=delivery.created_at,
        updated_at=delivery.updated_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        results=delivery.results,
        dropped=delivery.dropped,
        body=jsonutil.loads(delivery.body) if with_body else None,
    )


# --- outputs ---------------------------------------------------------------------------


@router.post("/v1/outputs", status_code=201, response_model=OutputOut)
async def create_output(body: OutputCreate, rt: RuntimeDep) -> OutputOut:
    fields = body.model_dump(exclude_none=True)
    async with transaction(rt) as session:
        output = await repo.create_output(session, **fields)
    return output_out(output)


@router.get("/v1/outputs", response_model=list[OutputOut])
async def list_outputs(rt: RuntimeDep) -> list[OutputOut]:
    async with transaction(rt) as session:
        return [output_out(o) for o in await repo.list_outputs(session)]


@router.get("/v1/outputs/{output_id}", response_model=OutputOut)
async def get_output(output_id: str, rt: RuntimeDep) -> OutputOut:
    async with transaction(rt) as session:
        output = await repo.get_output(session, output_id)
    if output is None:
        raise _not_found("output")
    return output_out(output)


@router.patch("/v1/outputs/{output_id}", response_model=OutputOut)
async def update_output(output_id: str, body: OutputUpdate, rt: RuntimeDep) -> OutputOut:
    changes = body.model_dump(exclude_unset=True)
    # null clears only the optional settings. Every other field is a NOT NULL column:
    # a null used to reach the database (IntegrityError, answered 503) or, for the JSON
    # column conversion_rules, was stored and made every later read of the output 500.
    for name, value in changes.items():
        if value is None and name not in CLEARABLE_SETTINGS:
            raise ApiError(422, "invalid_setting", f"{name}: may not be null")
    async with transaction(rt) as session:
        output = await repo.update_output(session, output_id, changes)
    if output is None:
        raise _not_found("output")
    rt.tokens.forget(output_id)
    return output_out(output)


@router.delete("/v1/outputs/{output_id}", status_code=204, response_class=Response)
async def delete_output(output_id: str, rt: RuntimeDep) -> Response:
    async with transaction(rt) as session:
        deleted = await repo.delete_output(session, output_id)
    if not deleted:
        raise _not_found("output")
    rt.tokens.forget(output_id)
    return Response(status_code=204)


# --- connections -----------------------------------------------------------------------


@router.post(
    "/v1/outputs/{output_id}/connections", status_code=201, response_model=ConnectionCreated
)
async def create_connection(output_id: str, body: ConnectionCreate, rt: RuntimeDep) -> JSONResponse:
    async with transaction(rt) as session:
        if await repo.get_output(session, output_id) is None:
            raise _not_found("output")
        created = await repo.create_connection(
            session,
            output_id=output_id,
            source=body.source,
            name=body.name,
            shared_secret=body.shared_secret,
            keyring=rt.keyring,
        )
    connection, secret = created.connection, created.secret.reveal()
    answer = ConnectionCreated(
        id=connection.id,
        source=connection.source,
        name=connection.name,
        key=connection.key,
        secret=secret,
    ).model_dump()
    answer["write_key"] = write_key(connection.key, secret)  # Segment-style clients
    return JSONResponse(answer, status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/v1/outputs/{output_id}/connections", response_model=list[ConnectionOut])
async def list_connections(output_id: str, rt: RuntimeDep) -> list[ConnectionOut]:
    async with transaction(rt) as session:
        if await repo.get_output(session, output_id) is None:
            raise _not_found("output")
        return [connection_out(c) for c in await repo.list_connections(session, output_id)]


@router.patch("/v1/connections/{connection_id}", response_model=ConnectionOut)
async def update_connection(
    connection_id: str, body: ConnectionUpdate, rt: RuntimeDep
) -> ConnectionOut:
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    async with transaction(rt) as session:
        connection = await repo.update_connection(session, connection_id, changes)
    if connection is None:
        raise _not_found("connection")
    return connection_out(connection)


@router.delete("/v1/connections/{connection_id}", status_code=204, response_class=Response)
async def delete_connection(connection_id: str, rt: RuntimeDep) -> Response:
    async with transaction(rt) as session:
        deleted = await repo.delete_connection(session, connection_id)
    if not deleted:
        raise _not_found("connection")
    return Response(status_code=204)


# --- deliveries ------------------------------------------------------------------------


@router.get("/v1/deliveries", response_model=list[DeliveryOut])
async def list_deliveries(
    rt: RuntimeDep,
    output_id: str | None = None,
    status: DeliveryStatus | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=repo.MAX_OFFSET),
) -> list[DeliveryOut]:
    async with transaction(rt) as session:
        found = await repo.list_deliveries(
            session, output_id=output_id, status=status, limit=limit, offset=offset
        )
        return [delivery_out(d) for d in found]


@router.get("/v1/deliveries/{delivery_id}", response_model=DeliveryOut)
async def get_delivery(delivery_id: str, rt: RuntimeDep) -> DeliveryOut:
    async with transaction(rt) as session:
        delivery = await repo.get_delivery(session, delivery_id)
    if delivery is None:
        raise _not_found("delivery")
    return delivery_out(delivery, with_body=True)


@router.post("/v1/deliveries/{delivery_id}/retry", response_model=DeliveryOut)
async def retry_delivery(delivery_id: str, rt: RuntimeDep) -> DeliveryOut:
    async with transaction(rt) as session:
        existing = await repo.get_delivery(session, delivery_id)
        if existing is None:
            raise _not_found("delivery")
        delivery = await repo.retry(session, delivery_id)
        if delivery is None:
            raise ApiError(
                409,
                "not_retryable",
                f"delivery is {existing.status}; only failed or dead ones are retried",
            )
    rt.dispatcher.wake()
    return delivery_out(delivery)


# --- preview ---------------------------------------------------------------------------


@router.post("/v1/preview/{source}", response_model=PreviewOut)
async def preview(
    source: str,
    request: Request,
    rt: RuntimeDep,
    output_id: str | None = None,
    settings: str | None = Query(default=None, description="output settings as JSON"),
    now: str | None = Query(default=None, description="ISO 8601; default: the clock"),
) -> dict[str, Any]:
    """Map a payload as ingest would, without storing or sending anything."""
    if source not in SOURCES:
        raise ApiError(
            404, "unknown_source", f"unknown source {source!r}; known: {', '.join(SOURCES)}"
        )
    if output_id is not None:
        async with transaction(rt) as session:
            output = await repo.get_output(session, output_id)
        if output is None:
            raise _not_found("output")
        mapping_settings = settings_for(output, "")
    else:
        raw: Any = {}
        if settings:
            try:
                raw = jsonutil.loads(settings)
            except jsonutil.InvalidJSONError:
                raise ApiError(422, "invalid_setting", "settings: not valid JSON") from None
        mapping_settings = OutputSettings.from_mapping(raw)
    moment: datetime = utcnow() if now is None else parse_instant(now, "now")
    body = await read_body(request, PREVIEW_LIMIT)
    # Decoded as ingest decodes it, so a body preview maps is one ingest would accept.
    if source == "records":
        payload = decode_records(body, request.headers.get("content-type"))
    else:
        payload = strict_json(body)
    result = map_parsed(payload, source, settings=mapping_settings, now=moment)
    return result.as_dict()
