"""Shared request plumbing: the runtime, transactions, bodies with limits, auth checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import admin_token_ok
from app.errors import RelayError
from app.runtime import Runtime


class ApiError(RelayError):
    """An answer with a status, a stable error code and a message naming the problem."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


@asynccontextmanager
async def transaction(rt: Runtime) -> AsyncIterator[AsyncSession]:
    """One request, one transaction: committed when the block ends without an error."""
    async with rt.sessionmaker() as session, session.begin():
        yield session


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


SESSION_ADMIN_KEY = "admin"


def is_admin(request: Request, rt: Runtime) -> bool:
    """The admin bearer token, or a web UI session that logged in with it."""
    expected = rt.settings.admin_token.get_secret_value() if rt.settings.admin_token else None
    if admin_token_ok(bearer(request), expected):
        return True
    session = request.scope.get("session")
    return bool(expected and isinstance(session, dict) and session.get(SESSION_ADMIN_KEY))


async def require_admin(request: Request, rt: RuntimeDep) -> None:
    client = request.client.host if request.client else "unknown"
    if rt.limiter.blocked(client):
        raise ApiError(
            429,
            "too_many_failures",
            "too many failed attempts; try later",
            headers={"Retry-After": "60"},
        )
    if not is_admin(request, rt):
        rt.limiter.failed(client)
        if rt.settings.admin_token is None:
            message = "the admin API is off: set RELAY_ADMIN_TOKEN"
        else:
            message = "missing or wrong admin bearer token"
        raise ApiError(
            401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="relay"'}
        )


AdminDep = Depends(require_admin)
