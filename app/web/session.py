"""The web UI's session: a signed cookie (Starlette's SessionMiddleware, itsdangerous).

The signing secret is derived from RELAY_ADMIN_TOKEN with HKDF-SHA256, so every relay
process (and every replica) accepts the same cookies, and changing the admin token
signs everyone out. Without an admin token there is no session at all: the UI is off.

Only the UI's own paths and ``/oauth/amazon/start`` see the session. The admin JSON
API (``/v1/...``) never does: a browser's cookie cannot act on it, so its routes need
no CSRF protection of their own.

The cookie is HttpOnly and SameSite=Lax; with an https RELAY_PUBLIC_URL it is also
Secure and named with the ``__Host-`` prefix (no Domain, path ``/``). A login lasts
at most ``SESSION_SECONDS``, counted from the login (an expiry kept in the signed
session), whatever the cookie's own Max-Age says.
"""

from __future__ import annotations

import time
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings

SESSION_COOKIE = "relay_ui"
SESSION_SECONDS = 8 * 3600
STATIC_PATH = "/ui/static"
ADMIN_KEY = "admin"  # the key app.api.deps.is_admin reads
EXPIRES_KEY = "expires"
_HKDF_SALT = b"amazon-capi-relay web ui"
_HKDF_INFO = b"session cookie signing key v1"


def session_secret(admin_token: str) -> str:
    """The cookie signing key: HKDF-SHA256 of the admin token (stable, never stored)."""
    key = HKDF(algorithm=SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO).derive(
        admin_token.encode("utf-8")
    )
    return key.hex()


def cookie_name(settings: Settings) -> str:
    return f"__Host-{SESSION_COOKIE}" if _https(settings) else SESSION_COOKIE


def _https(settings: Settings) -> bool:
    return settings.public_url.startswith("https://")


def uses_session(path: str) -> bool:
    """The paths that read or write the UI session (the static files do not)."""
    if path == STATIC_PATH or path.startswith(STATIC_PATH + "/"):
        return False
    return path in ("/ui", "/oauth/amazon/start") or path.startswith("/ui/")


class UISessionMiddleware:
    """Starlette's SessionMiddleware, for the UI's paths only, keyed by the admin token."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.sessions: ASGIApp | None = None
        token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        if token.strip():
            self.sessions = SessionMiddleware(
                app,
                secret_key=session_secret(token),
                session_cookie=cookie_name(settings),
                max_age=SESSION_SECONDS,
                path="/",
                same_site="lax",
                https_only=_https(settings),
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.sessions is not None and scope["type"] == "http" and uses_session(scope["path"]):
            await self.sessions(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def session_of(connection: HTTPConnection) -> dict[str, Any] | None:
    """The request's session, or None when the UI is off (no admin token)."""
    session = connection.scope.get("session")
    return session if isinstance(session, dict) else None


def logged_in(connection: HTTPConnection, *, now: float | None = None) -> bool:
    session = session_of(connection)
    if not session or session.get(ADMIN_KEY) is not True:
        return False
    expires = session.get(EXPIRES_KEY)
    return isinstance(expires, int | float) and (now or time.time()) < expires


def log_in(session: dict[str, Any], csrf_token: str, *, now: float | None = None) -> None:
    """A fresh session (nothing kept from before the login: no fixation)."""
    session.clear()
    session[ADMIN_KEY] = True
    session[EXPIRES_KEY] = int((now or time.time()) + SESSION_SECONDS)
    session["csrf"] = csrf_token


def log_out(session: dict[str, Any]) -> None:
    session.clear()


def flash(session: dict[str, Any] | None, message: str, kind: str = "success") -> None:
    """A message for the next page shown (after a redirect)."""
    if session is not None:
        session["flash"] = [*session.get("flash", []), [kind, message]][-5:]


def take_flashes(session: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not session or "flash" not in session:
        return []
    messages = session.pop("flash")
    return [(str(kind), str(text)) for kind, text in messages]
