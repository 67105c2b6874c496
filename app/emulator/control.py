"""``/_emulator/*``: the test harness's handles on the emulator.

Unauthenticated on purpose: the emulator is a local test tool (it binds 127.0.0.1
by default) and must never be exposed as a service. Errors answer 400
``{"error": "..."}``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app import jsonutil
from app.emulator.emulator import Emulator
from app.emulator.faults import FaultError, parse_fault
from app.emulator.responses import json_response
from app.emulator.state import ConfigError

PREFIX = "/_emulator"


class ControlError(Exception):
    """A control request the emulator cannot carry out."""


def routes(emulator: Emulator) -> list[Route]:
    control = ControlEndpoints(emulator)
    return [
        Route(f"{PREFIX}/health", control.health, methods=["GET"]),
        Route(f"{PREFIX}/received", control.received, methods=["GET", "DELETE"]),
        Route(f"{PREFIX}/received/events", control.received_events, methods=["GET"]),
        Route(f"{PREFIX}/stats", control.stats, methods=["GET"]),
        Route(f"{PREFIX}/faults", control.faults, methods=["GET", "POST", "DELETE"]),
        Route(f"{PREFIX}/revoke", control.revoke, methods=["POST"]),
        Route(f"{PREFIX}/config", control.config, methods=["GET", "POST"]),
        Route(f"{PREFIX}/clock", control.clock, methods=["GET", "POST"]),
        Route(f"{PREFIX}/reset", control.reset, methods=["POST"]),
    ]


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = jsonutil.loads(await request.body())
    except jsonutil.InvalidJSONError:
        raise ControlError("the body must be JSON") from None
    if not isinstance(body, dict):
        raise ControlError("the body must be a JSON object")
    return body


def _error(error: Exception) -> Response:
    return json_response(400, {"error": str(error)})


class ControlEndpoints:
    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def received(self, request: Request) -> Response:
        """GET: every retained events request, oldest first. DELETE: forget them all."""
        recorder = self._emulator.recorder
        if request.method == "DELETE":
            recorder.clear()
            return Response(status_code=204)
        requests = recorder.requests()
        return json_response(200, {"count": len(requests), "requests": requests})

    async def received_events(self, request: Request) -> Response:
        """Accepted events, flattened; ``?account_id=`` filters, ``?unique=true`` dedupes."""
        events = self._emulator.recorder.accepted_events(
            account_id=request.query_params.get("account_id"),
            unique=request.query_params.get("unique", "").lower() in ("1", "true"),
        )
        return json_response(200, {"count": len(events), "events": events})

    async def stats(self, request: Request) -> Response:
        stats = self._emulator.recorder.stats()
        stats["token_grants"] = dict(self._emulator.lwa.grants_issued)
        return json_response(200, stats)

    async def faults(self, request: Request) -> Response:
        """POST one fault object or a list of them; they queue after those already set."""
        emulator = self._emulator
        if request.method == "DELETE":
            emulator.faults.clear()
            return Response(status_code=204)
        now = emulator.clock.now()
        if request.method == "POST":
            try:
                specs = jsonutil.loads(await request.body())
                specs = specs if isinstance(specs, list) else [specs]
                faults = [parse_fault(spec, now) for spec in specs]
            except (jsonutil.InvalidJSONError, FaultError) as error:
                return _error(error)
            emulator.faults.add(faults)
        status = 201 if request.method == "POST" else 200
        return json_response(status, {"faults": emulator.faults.pending(now)})

    async def revoke(self, request: Request) -> Response:
        """``{"refresh_token": t}`` revokes that grant (its access tokens die with it),
        ``{"all": true}`` every grant, ``{"access_tokens": true}`` only the access tokens."""
        server = self._emulator.lwa
        try:
            body = await _json_object(request)
        except ControlError as error:
            return _error(error)
        if isinstance(body.get("refresh_token"), str):
            return json_response(
                200, {"revoked": server.revoke_refresh_token(body["refresh_token"])}
            )
        if body.get("all") is True:
            return json_response(200, {"revoked": server.revoke_all()})
        if body.get("access_tokens") is True:
            return json_response(200, {"expired": server.expire_access_tokens()})
        return _error(ControlError('give "refresh_token", "all": true or "access_tokens": true'))

    async def config(self, request: Request) -> Response:
        config = self._emulator.config
        if request.method == "POST":
            try:
                config.update(await _json_object(request))
            except (ControlError, ConfigError) as error:
                return _error(error)
        return json_response(200, config.as_dict())

    async def clock(self, request: Request) -> Response:
        """POST ``{"advance": seconds}`` moves the emulator's clock forward."""
        clock = self._emulator.clock
        if request.method == "POST":
            try:
                seconds = (await _json_object(request)).get("advance")
                if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                    raise ControlError("advance must be a non-negative number of seconds")
            except ControlError as error:
                return _error(error)
            clock.advance(seconds)
        return json_response(200, clock.as_dict())

    async def reset(self, request: Request) -> Response:
        self._emulator.reset()
        return Response(status_code=204)
