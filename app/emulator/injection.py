"""Carrying out a fault at the ASGI level, in front of the emulator's routes.

It runs outside Starlette because two faults need the raw server: dropping the
connection (no HTTP answer at all) and answering before any route sees the request.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import jsonutil
from app.emulator.emulator import Emulator
from app.emulator.endpoints import FAULT_KEY, PER_EVENT_ERROR_KEY
from app.emulator.faults import Fault
from app.emulator.recorder import RecordedCall, event_count
from app.emulator.responses import dumps, json_response


async def inject(
    emulator: Emulator, fault: Fault, scope: Scope, receive: Receive, send: Send, app: ASGIApp
) -> None:
    received_at = emulator.clock.now()
    body = await _read_all(receive)
    if fault.delay:
        await _sleep_unless_disconnected(receive, fault.delay)
    if fault.drop_connection or fault.status is not None:
        if fault.target == "events":
            emulator.recorder.add(_faulted_call(fault, scope, body, received_at))
        if fault.drop_connection:
            await _drop_connection(receive, send)
        else:
            await _respond(fault, scope, receive, send)
        return
    # Delay alone, or per-event errors: the endpoint answers, knowing about the fault.
    scope[FAULT_KEY] = fault.action()
    if fault.per_event_error:
        scope[PER_EVENT_ERROR_KEY] = fault.per_event_error
    await app(scope, _replay(body, receive), send)


async def _read_all(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the already-read body out again, then defers to the server."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _sleep_unless_disconnected(receive: Receive, seconds: float) -> None:
    # A client that gives up ends the wait early (tests and shutdown need not sit
    # it out), but the request is still carried out, as Amazon may well do with a
    # request whose caller timed out.
    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), timeout=seconds)


def _faulted_call(fault: Fault, scope: Scope, body: bytes, received_at: float) -> RecordedCall:
    return RecordedCall(
        received_at=received_at,
        headers=scope["headers"],
        body=body,
        body_bytes=len(body),
        status=fault.status,
        response=b"" if fault.status is None else dumps(fault.body()),
        fault=fault.action(),
        events=_event_count(body),
    )


def _event_count(body: bytes) -> int:
    try:
        return event_count(jsonutil.loads(body))
    except jsonutil.InvalidJSONError:
        return 0


async def _respond(fault: Fault, scope: Scope, receive: Receive, send: Send) -> None:
    assert fault.status is not None
    headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
    await json_response(fault.status, fault.body(), headers)(scope, receive, send)


async def _drop_connection(receive: Receive, send: Send) -> None:
    """Close the socket without a byte of answer, so the client sees a transport error.

    ASGI has no message for this; under uvicorn ``send`` is a method of the request
    cycle, which holds the asyncio transport. Anywhere else, fall back to promising
    a body and never sending it: servers end that by closing the connection too.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    close = getattr(transport, "close", None)
    if not callable(close):
        start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"1")],
        }
        await send(start)
        return
    close()
    # Wait for the server to notice, so it does not answer a 500 on our behalf.
    while (await receive())["type"] != "http.disconnect":
        pass
