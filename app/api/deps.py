"""Shared request plumbing: the runtime, transactions, bodies with limits, auth checks."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
import orjson
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from app.auth import ADMIN_IDENTITY, token_ok
from app.errors import PayloadError, RelayError
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


async def runtime(request: Request) -> Runtime:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a
    # thread hop on every request for one attribute read.
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


@asynccontextmanager
async def transaction(rt: Runtime) -> AsyncIterator[AsyncSession]:
    """One request, one transaction: committed when the block ends without an error."""
    async with rt.sessionmaker() as session, session.begin():
        yield session


@asynccontextmanager
async def reading(rt: Runtime) -> AsyncIterator[AsyncSession]:
    """Reads outside a transaction: each statement sees the latest committed data."""
    async with rt.autocommit() as session:
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


# --- strict JSON at the edge -------------------------------------------------------------
#
# What a caller posts is decoded once, strictly: anything two parsers could read two
# ways (a repeated key: first or last wins?), or that cannot be sent on as JSON (NaN,
# Infinity, 1e999, a lone UTF-16 surrogate), is refused with a 400 naming the problem
# instead of being guessed at. See docs/decisions/0009-bad-input-and-auth-limits.md.

# A \uD800-\uDFFF escape: only then can the decoded text hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        repeated = next(key for key, count in Counter(k for k, _ in pairs).items() if count > 1)
        raise PayloadError(f"body is not valid JSON: key {repeated!r} appears twice in one object")
    return found


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        shown = text if len(text) <= 24 else f"{text[:20]}…"
        raise PayloadError(f"body is not valid JSON: number {shown} is out of range")
    return number


def _no_constant(name: str) -> Any:
    raise PayloadError(f"body is not valid JSON: {name} is not a JSON number")


# msgspec rather than orjson: it reads integers beyond 64 bits exactly, so a body
# need not be scanned for them first (a byte translation that cost a third as much as
# the decoding itself).
_FAST_DECODE = msgspec.json.Decoder().decode
_FAST_ENCODE = msgspec.json.Encoder().encode
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_float=_finite, parse_constant=_no_constant
)


def _fast_strict(body: bytes) -> Any | None:
    """The document via msgspec when that is provably what the exact path would give,
    else None. msgspec refuses invalid UTF-8, NaN/Infinity, 1e999, integers of more
    than 4,300 digits and deep nesting itself, and keeps integers beyond 64 bits exact
    (orjson would read them as floats); what it would still get wrong is excluded:
    repeated keys (the last one silently wins) and \\u escapes (which could hide one).

    A repeated key is found by counting colons: with no \\u escape in the body (which
    could spell a colon), every colon of the body is a key's or a string's, the encoder
    never escapes one, so re-encoding the decoded value keeps exactly as many colons
    unless a repeated member (its key's colon at least) was folded away. About 3x faster
    than the standard library with hooks on a 100-event batch (docs/benchmarks.md).
    """
    # A lone backslash is one memchr; the two-byte search costs 20 times more.
    if b"\\" in body and b"\\u" in body:
        return None
    try:
        value = _FAST_DECODE(body)
        try:
            text = orjson.dumps(value)  # a third faster than msgspec's encoder
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, deep nesting
            text = _FAST_ENCODE(value)
    except (msgspec.DecodeError, RecursionError):
        return None  # the exact path words the error
    if text.count(b":") != body.count(b":"):
        return None  # a repeated key: the exact path names it
    return value


def strict_json(body: bytes) -> Any:
    """One JSON document, or PayloadError (400) saying what is wrong with it.

    The standard library's C scanner with hooks: it keeps integers of any size exact
    (mParticle ids may pass 64 bits) and lets repeated keys be seen, which orjson cannot;
    ``_fast_strict`` answers first whenever orjson's reading is provably the same.
    """
    fast = _fast_strict(body)
    return fast if fast is not None else exact_strict_json(body)


def exact_strict_json(body: bytes) -> Any:
    """strict_json without the fast path: the reference the tests hold it to."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PayloadError(f"body is not valid UTF-8 (byte {error.start})") from None
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise PayloadError(f"body is not valid JSON: {error}") from None
    except RecursionError:
        raise PayloadError("body is not valid JSON: it is nested too deeply") from None
    except ValueError:  # an integer literal of thousands of digits (int() refuses it)
        raise PayloadError("body is not valid JSON: a number is too long") from None
    if _SURROGATE_ESCAPE.search(body):
        try:
            orjson.dumps(value)  # refuses exactly the surrogates left unpaired
        except orjson.JSONEncodeError:
            raise PayloadError(
                "body is not valid JSON: a \\u escape is a lone UTF-16 surrogate"
            ) from None
    return value


class StrictJSONRequest(Request):
    """``await request.json()`` for FastAPI's body models, decoded by ``strict_json``.

    FastAPI turns a ``json.JSONDecodeError`` into its ``json_invalid`` validation error,
    which the app's handler answers 400 with the message.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                value = strict_json(body)
                if b"\\u0000" in body and _holds_nul(value):
                    # Valid JSON, but PostgreSQL's text cannot hold it: refused here
                    # with a reason, not by the database as an outage (503).
                    raise PayloadError("a string holds the NUL character (\\u0000)")
            except PayloadError as error:
                raise json.JSONDecodeError(error.message, "", 0) from None
            self._json = value
        return self._json


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


SESSION_ADMIN_KEY = "admin"


def is_admin(request: Request, rt: Runtime) -> bool:
    """The admin bearer token, or a web UI session that logged in with it."""
    expected = rt.settings.admin_token.get_secret_value() if rt.settings.admin_token else None
    if token_ok(bearer(request), expected):
        return True
    session = request.scope.get("session")
    return bool(expected and isinstance(session, dict) and session.get(SESSION_ADMIN_KEY))


async def require_admin(request: Request, rt: RuntimeDep) -> None:
    client = request.client.host if request.client else "unknown"
    # Blocked even with the right token: the admin token is the one credential whose
    # strength the relay does not choose, so a guesser must not learn a guess was right.
    if rt.limiter.blocked(client, ADMIN_IDENTITY):
        raise ApiError(
            429,
            "too_many_failures",
            "too many failed attempts; try later",
            headers={"Retry-After": "60"},
        )
    if not is_admin(request, rt):
        rt.limiter.failed(client, ADMIN_IDENTITY)
        if rt.settings.admin_token is None:
            message = "the admin API is off: set RELAY_ADMIN_TOKEN"
        else:
            message = "missing or wrong admin bearer token"
        raise ApiError(
            401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="relay"'}
        )


AdminDep = Depends(require_admin)
