"""The endpoints Amazon serves: LwA's ``/ap/oa`` and ``/auth/o2/token``, and CreateEvent."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from app import jsonutil
from app.amazon.schema import MAX_EVENTS_PER_REQUEST
from app.emulator import lwa
from app.emulator.emulator import Emulator
from app.emulator.recorder import RecordedCall, event_count
from app.emulator.responses import dumps, html_page, json_response, media_type
from app.emulator.validation import injected_outcomes, outcomes

AUTHORIZE_PATH = "/ap/oa"
TOKEN_PATH = "/auth/o2/token"  # noqa: S105 - a URL path, not a secret
EVENTS_PATH = "/adsApi/v1/create/events"
# Set in the ASGI scope by the fault layer (app.py) for faults the endpoint carries out.
FAULT_KEY = "emulator.fault"
PER_EVENT_ERROR_KEY = "emulator.per_event_error"

_MAX_TOKEN_BODY = 64 * 1024
_NOT_JSON = object()
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def routes(emulator: Emulator) -> list[Route]:
    login = LoginEndpoints(emulator)
    return [
        Route(AUTHORIZE_PATH, login.authorize, methods=["GET"]),
        Route(TOKEN_PATH, login.token, methods=["POST"]),
        Route(EVENTS_PATH, EventsEndpoint(emulator).create_events, methods=["POST"]),
    ]


class LoginEndpoints:
    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    async def authorize(self, request: Request) -> Response:
        params = request.query_params
        server = self._emulator.lwa
        try:
            auth = server.check_authorize(params)
        except lwa.AuthorizePageError as error:
            return html_page(
                400, "Login with Amazon: bad request", f"<p>{html.escape(str(error))}</p>"
            )
        try:
            lwa.check_authorize_details(auth, params.get("code_challenge_method"))
        except lwa.AuthorizeRedirectError as error:
            return _redirect(auth, {"error": error.error, "error_description": error.description})
        config = self._emulator.config
        decision = params.get("emulator_decision")
        if (
            params.get("emulator_decline") == "1"
            or config.decline_authorizations
            or decision == "deny"
        ):
            description = "The user denied the request for authorization."
            return _redirect(auth, {"error": "access_denied", "error_description": description})
        if config.consent_page and decision != "allow":
            return _consent_page(params)
        return _redirect(auth, {"code": server.issue_code(auth), "scope": auth.scope})

    async def token(self, request: Request) -> Response:
        try:
            form = await _token_form(request)
            tokens = self._emulator.lwa.token(form)
        except lwa.OAuthError as error:
            return json_response(error.status, error.body(), headers=_NO_STORE)
        as_string = self._emulator.config.expires_in_as_string
        return json_response(200, tokens.body(expires_in_as_string=as_string), headers=_NO_STORE)


def _redirect(auth: lwa.AuthorizeRequest, params: Mapping[str, str]) -> Response:
    return RedirectResponse(auth.redirect(params), status_code=302)


def _consent_page(params: Mapping[str, str]) -> Response:
    hidden = "".join(
        f"<input type='hidden' name='{html.escape(name)}' value='{html.escape(value)}'>"
        for name, value in params.items()
        if name != "emulator_decision"
    )
    form = (
        f"<p>Allow this application to access your Amazon Ads data?</p>"
        f"<form method='get' action='{AUTHORIZE_PATH}'>{hidden}"
        "<button name='emulator_decision' value='allow'>Allow</button> "
        "<button name='emulator_decision' value='deny'>Cancel</button></form>"
    )
    return html_page(200, "Login with Amazon (emulator)", form)


async def _token_form(request: Request) -> dict[str, str]:
    if media_type(request.headers.get("content-type")) != "application/x-www-form-urlencoded":
        raise lwa.OAuthError(
            "invalid_request", "Content-Type must be application/x-www-form-urlencoded"
        )
    body = await request.body()
    if len(body) > _MAX_TOKEN_BODY:
        raise lwa.OAuthError("invalid_request", "The request body is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise lwa.OAuthError("invalid_request", "The request body is not a valid form") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        # RFC 6749 §3.2: request parameters must not be repeated.
        raise lwa.OAuthError("invalid_request", "A parameter is repeated")
    return form


class ApiError(Exception):
    """A whole-request error of the Events API: ``{"code", "message"}`` with a status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BAD_REQUEST", message)


class EventsEndpoint:
    def __init__(self, emulator: Emulator) -> None:
        self._emulator = emulator

    async def create_events(self, request: Request) -> Response:
        emulator = self._emulator
        now = emulator.clock.now()
        call = RecordedCall(
            received_at=now, headers=request.scope["headers"], fault=request.scope.get(FAULT_KEY)
        )
        try:
            answer = await self._answer(request, call, now)
            call.status = 207
        except ApiError as error:
            call.status, answer = error.status, error.body()
        call.response = dumps(answer)
        emulator.recorder.add(call)
        return Response(call.response, status_code=call.status, media_type="application/json")

    async def _answer(self, request: Request, call: RecordedCall, now: float) -> dict[str, Any]:
        """The 207 body, after the whole-request checks: size, credentials, headers, body.

        The body is read and parsed first so that even refused requests are
        recorded with what they carried.
        """
        call.body = raw = await _read_body(request, self._emulator.config.max_body_bytes, call)
        call.body_bytes = len(raw)
        try:
            body = jsonutil.loads(raw)
        except jsonutil.InvalidJSONError:
            body = _NOT_JSON
        call.events = event_count(body)
        self._check_headers(request.headers)
        if body is _NOT_JSON:
            raise _bad_request("The request body is not valid JSON")
        events = _events_of(body)
        injected = request.scope.get(PER_EVENT_ERROR_KEY)
        success: list[dict[str, Any]]
        if injected:
            success, error = [], injected_outcomes(events, injected)
        else:
            success, error = outcomes(events, now=now, config=self._emulator.config)
        call.accepted, call.rejected = len(success), len(error)
        return self._multi_status(success, error)

    def _check_headers(self, headers: Headers) -> None:
        grant = self._authenticate(headers.get("authorization"))
        client_id = headers.get("amazon-ads-clientid")
        if not client_id:
            raise _bad_request("Missing required header Amazon-Ads-ClientId")
        if client_id != grant.client_id:
            # The token authenticates a client; a header naming another one is an
            # authentication failure, not a malformed request.
            raise ApiError(401, "UNAUTHORIZED", "Amazon-Ads-ClientId does not match the token")
        account_id = headers.get("amazon-ads-accountid")
        if not account_id:
            raise _bad_request("Missing required header Amazon-Ads-AccountId")
        if not (account_id.isascii() and account_id.isdigit()):
            raise _bad_request("Amazon-Ads-AccountId must be a numeric advertiser account id")
        if media_type(headers.get("content-type")) != "application/json":
            raise _bad_request("Content-Type must be application/json")

    def _authenticate(self, authorization: str | None) -> lwa.Grant:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "UNAUTHORIZED", "Missing or malformed Authorization bearer token")
        grant = self._emulator.lwa.grant_for_access_token(token.strip())
        if grant is None:
            raise ApiError(
                401, "UNAUTHORIZED", "The access token is expired, revoked, or was never issued"
            )
        return grant

    def _multi_status(
        self, success: list[dict[str, Any]], error: list[dict[str, Any]]
    ) -> dict[str, Any]:
        if not self._emulator.config.omit_empty_outcome_arrays:
            return {"success": success, "error": error}
        # Amazon may leave an empty array out; a switch lets the relay be tested on it.
        return {name: items for name, items in (("success", success), ("error", error)) if items}


async def _read_body(request: Request, limit: int, call: RecordedCall) -> bytes:
    too_large = ApiError(413, "CONTENT_TOO_LARGE", f"The request body exceeds {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        call.body_bytes = int(declared)
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            call.body_bytes = size  # at least; the rest is never read
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _events_of(body: Any) -> list[Any]:
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object")
    events = body.get("events")
    if not isinstance(events, list):
        raise _bad_request("events is required and must be an array")
    if not 1 <= len(events) <= MAX_EVENTS_PER_REQUEST:
        raise _bad_request(
            f"events must hold 1 to {MAX_EVENTS_PER_REQUEST} events, not {len(events)}"
        )
    return events
