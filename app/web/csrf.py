"""Cross-site request forgery protection for the UI's forms, and reading those forms.

Every state-changing form carries ``csrf_token``, a random value kept in the signed
session (the synchronizer token pattern); a POST whose field is missing or different
is refused with 403. As a second, independent check, a POST whose ``Origin`` header
names another origin, or whose ``Sec-Fetch-Site`` says ``cross-site`` or ``same-site``
(a sibling subdomain), is refused too. Browsers send ``Sec-Fetch-Site`` on every
request; ``Origin`` is ``null`` on our own form posts because the relay answers with
``Referrer-Policy: no-referrer``, so a ``null`` origin proves nothing either way and
only the token decides. Scripts and curl send neither header and still need the token.

Forms are read here rather than by python-multipart: only
``application/x-www-form-urlencoded``, at most ``FORM_LIMIT`` bytes and
``MAX_FIELDS`` fields, UTF-8.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request

from app.api.deps import ApiError, read_body
from app.web.session import session_of

CSRF_FIELD = "csrf_token"
SESSION_KEY = "csrf"
FORM_LIMIT = 2 * 1024 * 1024
MAX_FIELDS = 64


class CsrfError(Exception):
    """The form did not come from one of our pages (answered 403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FormError(Exception):
    """The body is not a form we can read (answered 400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Form(Mapping[str, str]):
    """A decoded form: the first value of each field (``getlist`` for all)."""

    def __init__(self, fields: Mapping[str, list[str]]) -> None:
        self._fields = {name: list(values) for name, values in fields.items()}

    def __getitem__(self, name: str) -> str:
        return self._fields[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def text(self, name: str) -> str:
        """The field's value, stripped; "" when absent."""
        return self.get(name, "").strip()

    def getlist(self, name: str) -> list[str]:
        return list(self._fields.get(name, []))


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_for(session: dict[str, Any] | None) -> str:
    """The session's token, made on first use; "" when there is no session (UI off)."""
    if session is None:
        return ""
    token = session.get(SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = new_token()
        session[SESSION_KEY] = token
    return token


async def read_form(request: Request, limit: int = FORM_LIMIT) -> Form:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise FormError(415, "send the form as application/x-www-form-urlencoded")
    try:
        body = await read_body(request, limit)
    except ApiError as error:
        raise FormError(error.status, error.message) from None
    try:
        fields = parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise FormError(400, "the form is not UTF-8") from None
    except ValueError:
        raise FormError(400, f"the form has more than {MAX_FIELDS} fields") from None
    return Form(fields)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def check(request: Request, form: Form, *, public_url: str) -> None:
    """Raise CsrfError unless the form carries the session's token and came from us."""
    fetch_site = request.headers.get("sec-fetch-site", "").lower()
    if fetch_site in ("cross-site", "same-site"):
        raise CsrfError("the form was sent from another site")
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        allowed = {_origin(public_url), f"{request.url.scheme}://{host}".lower()}
        if origin.lower() not in allowed:
            raise CsrfError("the form was sent from another origin")
    session = session_of(request)
    expected = session.get(SESSION_KEY) if session else None
    given = form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not expected:
        raise CsrfError("your session has expired (or cookies are off); reload the page")
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise CsrfError("the form's security token is missing or wrong; reload the page")
