"""Login with Amazon: the authorize URL, the code exchange and the refresh grant.

Authlib provides the OAuth pieces (PKCE S256 challenge, random tokens, URL
building). The token POSTs go through the relay's one shared HTTP client (app/http.py) rather
than Authlib's own client class, so there is one connection pool and one set of
timeouts for everything the relay sends (docs/decisions/0004-login-with-amazon.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from authlib.common.security import generate_token
from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from app.amazon.endpoints import SCOPE
from app.errors import RelayError
from app.http import HttpClient, TransportError


class LwaError(RelayError):
    """Login with Amazon did not give tokens (network, 5xx, or a refusal)."""

    code = "lwa_error"
    status = 502
    retryable = True


class InvalidGrantError(LwaError):
    """The code or refresh token is no longer valid: a new login is needed."""

    code = "invalid_grant"
    retryable = False


@dataclass(frozen=True, slots=True, repr=False)
class Tokens:
    access_token: str
    refresh_token: str | None
    expires_in: int

    def __repr__(self) -> str:  # tokens never appear in logs or tracebacks
        return f"Tokens(access_token=***, refresh_token=***, expires_in={self.expires_in})"


def new_verifier() -> str:
    """A PKCE code verifier (RFC 7636: 43..128 unreserved characters)."""
    return str(generate_token(64))


def authorize_url(
    base: str, *, client_id: str, redirect_uri: str, state: str, code_verifier: str
) -> str:
    return str(
        add_params_to_uri(
            base,
            [
                ("client_id", client_id),
                ("scope", SCOPE),
                ("response_type", "code"),
                ("redirect_uri", redirect_uri),
                ("state", state),
                ("code_challenge", create_s256_code_challenge(code_verifier)),
                ("code_challenge_method", "S256"),
            ],
        )
    )


def _tokens(answer: dict[str, Any]) -> Tokens:
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise LwaError("token answer has no access_token")
    refresh = answer.get("refresh_token")
    try:
        expires_in = int(answer.get("expires_in", 3600))  # may come as a string
    except (TypeError, ValueError):
        expires_in = 3600
    return Tokens(access, refresh if isinstance(refresh, str) and refresh else None, expires_in)


async def _post(http: HttpClient, url: str, form: dict[str, str]) -> Tokens:
    try:
        response = await http.post(url, form=form, headers={"Accept": "application/json"})
    except TransportError as failure:
        raise LwaError(f"token endpoint unreachable: {failure}") from None
    answer = response.json()
    if not isinstance(answer, dict):
        answer = {}
    if response.status == 200:
        return _tokens(answer)
    error = str(answer.get("error") or f"HTTP {response.status}")
    if error == "invalid_grant":
        raise InvalidGrantError(str(answer.get("error_description") or "invalid_grant"))
    raise LwaError(f"token endpoint answered {response.status} {error}")


async def exchange_code(
    http: HttpClient,
    token_url: str,
    *,
    code: str,
    redirect_uri: str,
    client_id: str,
    client_secret: str,
    code_verifier: str,
) -> Tokens:
    return await _post(
        http,
        token_url,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
            "client_secret": client_secret,
            "code_verifier": code_verifier,
        },
    )


async def refresh(
    http: HttpClient,
    token_url: str,
    *,
    refresh_token: str,
    client_id: str,
    client_secret: str,
) -> Tokens:
    return await _post(
        http,
        token_url,
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
            "client_secret": client_secret,
        },
    )
