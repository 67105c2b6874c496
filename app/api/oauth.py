"""Login with Amazon for one output: /oauth/amazon/start and /oauth/amazon/callback.

The ``state`` sent to Amazon names a flow row (single use, 10 minutes) and is
sealed with the relay's key ring, bound to the output: a tampered or foreign state
does not decrypt. The flow is also bound to the browser that started it by an
HttpOnly cookie, and uses PKCE S256 with the verifier kept server-side, encrypted.
Any failure answers a 400 page saying what went wrong and stores nothing.
"""

from __future__ import annotations

import hashlib
import html
import secrets
from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app import lwa
from app.api.deps import ApiError, RuntimeDep, require_admin, transaction
from app.crypto import DecryptError
from app.db import repository as repo
from app.db.base import utcnow
from app.db.models import OutputStatus
from app.logs import get_logger

router = APIRouter(tags=["login with amazon"])
log = get_logger(__name__)

STATE_SECONDS = 600
COOKIE = "relay_lwa_flow"
COOKIE_PATH = "/oauth/amazon"
PURPOSE_STATE = "oauth_state"
PURPOSE_VERIFIER = "pkce_verifier"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def problem_page(
    title: str, detail: str, *, status: int = 400, output_id: str | None = None
) -> HTMLResponse:
    back = (
        f'<p><a href="/ui/outputs/{html.escape(output_id)}">Back to the output</a></p>'
        if output_id
        else '<p><a href="/ui/">Back to the relay</a></p>'
    )
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title></head><body><main>"
        f"<h1>{html.escape(title)}</h1><p role=alert>{html.escape(detail)}</p>{back}"
        "</main></body></html>"
    )
    return HTMLResponse(page, status_code=status)


@router.get("/oauth/amazon/start", summary="Start Login with Amazon for an output")
async def start(request: Request, rt: RuntimeDep, output_id: str) -> Response:
    # The same check as the admin API: failures count against the client's budget, and
    # a blocked client is refused even with the right token.
    await require_admin(request, rt)
    settings = rt.settings
    if not settings.lwa_client_id:
        return problem_page(
            "Login with Amazon is not set up",
            "Set RELAY_LWA_CLIENT_ID and RELAY_LWA_CLIENT_SECRET first.",
            output_id=output_id,
        )
    browser = secrets.token_urlsafe(32)
    flow_id = secrets.token_urlsafe(32)
    verifier = lwa.new_verifier()
    now = utcnow()
    async with transaction(rt) as session:
        output = await repo.get_output(session, output_id)
        if output is None:
            raise ApiError(404, "not_found", "no such output")
        await repo.create_oauth_state(
            session,
            state_id=flow_id,
            output_id=output_id,
            browser_hash=_digest(browser),
            verifier_ciphertext=rt.keyring.encrypt(verifier, output_id, purpose=PURPOSE_VERIFIER),
            expires_at=now + timedelta(seconds=STATE_SECONDS),
            now=now,
        )
        region = output.region
    state = f"{output_id}~{rt.keyring.encrypt(flow_id, output_id, purpose=PURPOSE_STATE)}"
    target = lwa.authorize_url(
        rt.endpoints.authorize(region),
        client_id=settings.lwa_client_id,
        redirect_uri=settings.redirect_uri,
        state=state,
        code_verifier=verifier,
    )
    response = RedirectResponse(target, status_code=302)
    response.set_cookie(
        COOKIE,
        browser,
        max_age=STATE_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=settings.public_url.startswith("https://"),
    )
    log.info("lwa_flow_started", output_id=output_id, region=region)
    return response


def _flow_id(state: str) -> tuple[str, str] | None:
    output_id, _, sealed = state.partition("~")
    return (output_id, sealed) if output_id and sealed else None


@router.get("/oauth/amazon/callback", summary="Amazon sends the browser back here")
async def callback(
    request: Request,
    rt: RuntimeDep,
    state: str | None = None,
    code: str | None = None,
    error: str | None = None,
    error_description: str | None = None,
) -> Response:
    parts = _flow_id(state or "")
    if parts is None:
        return problem_page(
            "Login with Amazon failed", "The answer from Amazon has no valid state parameter."
        )
    output_id, sealed = parts
    try:
        flow_id = rt.keyring.decrypt(sealed, output_id, purpose=PURPOSE_STATE).reveal()
    except (DecryptError, ValueError):
        return problem_page(
            "Login with Amazon failed",
            "The state parameter is not one this relay issued (tampered or from elsewhere).",
        )
    now = utcnow()
    async with transaction(rt) as session:
        flow = await repo.use_oauth_state(session, flow_id, now=now)
    if flow is None:
        return problem_page(
            "Login with Amazon failed",
            "This sign-in link has expired or was already used. Start again from the output.",
            output_id=output_id,
        )
    browser = request.cookies.get(COOKIE)
    if not browser or not secrets.compare_digest(_digest(browser), flow.browser_hash):
        return problem_page(
            "Login with Amazon failed",
            "This sign-in was started in another browser. Start again from the output.",
            output_id=output_id,
        )
    if error:
        detail = f"Amazon answered {error}" + (
            f": {error_description}" if error_description else ""
        )
        if error == "access_denied":
            detail = "The Amazon account declined to give the relay access. " + detail
        return problem_page("Login with Amazon was not completed", detail, output_id=output_id)
    if not code:
        return problem_page(
            "Login with Amazon failed", "Amazon sent no authorization code.", output_id=output_id
        )
    verifier = rt.keyring.decrypt(flow.verifier_ciphertext, output_id, purpose=PURPOSE_VERIFIER)
    async with transaction(rt) as session:
        output = await repo.get_output(session, output_id)
    if output is None:
        return problem_page("Login with Amazon failed", "The output no longer exists.")
    secret = rt.settings.lwa_client_secret
    try:
        tokens = await lwa.exchange_code(
            rt.http,
            rt.endpoints.token(output.region),
            code=code,
            redirect_uri=rt.settings.redirect_uri,
            client_id=rt.settings.lwa_client_id,
            client_secret=secret.get_secret_value() if secret else "",
            code_verifier=verifier.reveal(),
        )
    except lwa.LwaError as failure:
        log.warning("lwa_exchange_failed", output_id=output_id, error=failure.code)
        return problem_page(
            "Login with Amazon failed",
            f"Amazon did not accept the sign-in ({failure.message}). Start again from the output.",
            output_id=output_id,
        )
    if not tokens.refresh_token:
        return problem_page(
            "Login with Amazon failed", "Amazon gave no refresh token.", output_id=output_id
        )
    async with transaction(rt) as session:
        await repo.upsert_credential(
            session, rt.keyring, output_id, refresh_token=tokens.refresh_token, now=now
        )
        await repo.store_access_token(
            session,
            rt.keyring,
            output_id,
            access_token=tokens.access_token,
            expires_at=utcnow() + timedelta(seconds=tokens.expires_in),
        )
        await repo.set_status(session, output_id, OutputStatus.CONFIGURED)
    rt.tokens.forget(output_id)
    rt.dispatcher.wake()  # deliveries that waited for this login flow again
    log.info("lwa_flow_completed", output_id=output_id)
    response = RedirectResponse(f"/ui/outputs/{output_id}?login=ok", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response
