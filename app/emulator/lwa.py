"""Login with Amazon as the emulator plays it: codes, token grants and revocation.

Pure logic without HTTP: the endpoints in ``endpoints.py`` translate. Errors follow
LwA's token endpoint (RFC 6749 §5.2 codes, JSON ``error`` + ``error_description``);
the invalid_grant descriptions copy the wording Amazon is seen to use.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
import secrets
from collections import Counter
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

from app.amazon import schema
from app.emulator.state import Clock, Config

# Amazon's token prefixes, not secrets.
ACCESS_TOKEN_PREFIX = "Atza|"  # noqa: S105
REFRESH_TOKEN_PREFIX = "Atzr|"  # noqa: S105
# RFC 7636 §4.1: 43..128 characters from the unreserved set.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
# An S256 challenge is the unpadded base64url of a SHA-256 digest: 43 characters.
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")


def known_scopes() -> frozenset[str]:
    """The scopes Amazon's OpenAPI document lists for the Ads API."""
    flows = schema.openapi()["components"]["securitySchemes"]["OAuth2"]["flows"]
    return frozenset(flows["authorizationCode"]["scopes"])


class OAuthError(Exception):
    """An answer of the token endpoint other than tokens."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


def _invalid_grant(parameter: str, detail: str = "") -> OAuthError:
    return OAuthError(
        "invalid_grant", f"The request has an invalid grant parameter : {parameter}{detail}"
    )


def _missing(parameter: str) -> OAuthError:
    return OAuthError(
        "invalid_request", f"The request is missing a required parameter : {parameter}"
    )


class AuthorizePageError(Exception):
    """A problem shown on a 400 page: the redirect target cannot be trusted with it."""


class AuthorizeRedirectError(Exception):
    """A problem reported back to the client through its (valid) redirect URI."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """A checked ``/ap/oa`` request."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    code_challenge: str | None

    def redirect(self, params: Mapping[str, str]) -> str:
        """``redirect_uri`` with ``params`` (and the state) added to its query."""
        if self.state is not None:
            params = {**params, "state": self.state}
        parts = urlsplit(self.redirect_uri)
        query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
        return urlunsplit(parts._replace(query=query))


@dataclasses.dataclass(slots=True)
class Grant:
    """One user's consent: every token made from it dies when it is revoked."""

    client_id: str
    scope: str
    revoked: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class PendingCode:
    request: AuthorizeRequest
    expires_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class AccessToken:
    grant: Grant
    expires_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int

    def body(self, *, expires_in_as_string: bool) -> dict[str, str | int]:
        # Amazon has been seen to send expires_in as a string; a switch lets the
        # relay's parsing of that form be tested.
        expires_in = str(self.expires_in) if expires_in_as_string else self.expires_in
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_type": "bearer",
            "expires_in": expires_in,
        }


class LoginWithAmazon:
    """The authorization server of one LwA security profile (one client)."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        access_token_ttl: int,
        code_ttl: int,
        clock: Clock,
        config: Config,
    ) -> None:
        self.client_id = client_id
        self._client_secret = client_secret
        self._access_token_ttl = access_token_ttl
        self._code_ttl = code_ttl
        self._clock = clock
        self._config = config
        self._codes: dict[str, PendingCode] = {}
        self._refresh_tokens: dict[str, Grant] = {}
        self._access_tokens: dict[str, AccessToken] = {}
        self.grants_issued: Counter[str] = Counter()

    # Authorization endpoint

    def check_authorize(self, params: Mapping[str, str]) -> AuthorizeRequest:
        """Check the client and the redirect target of an ``/ap/oa`` query.

        Until both are known good nothing may be sent to the redirect URI, so these
        problems raise AuthorizePageError; ``check_authorize_details`` comes next.
        """
        if params.get("client_id") != self.client_id:
            raise AuthorizePageError("Unknown client_id: no security profile has it.")
        redirect_uri = params.get("redirect_uri", "")
        self._check_redirect_uri(redirect_uri)
        if params.get("response_type") != "code":
            raise AuthorizePageError("response_type must be 'code'.")
        return AuthorizeRequest(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            scope=params.get("scope", ""),
            state=params.get("state"),
            code_challenge=params.get("code_challenge"),
        )

    def _check_redirect_uri(self, redirect_uri: str) -> None:
        parts = urlsplit(redirect_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise AuthorizePageError(
                "redirect_uri must be an absolute http(s) URL without fragment."
            )
        allowed = self._config.allowed_redirect_uris
        if allowed is not None and redirect_uri not in allowed:
            raise AuthorizePageError("redirect_uri is not an allowed return URL of this client.")

    def issue_code(self, request: AuthorizeRequest) -> str:
        code = "AN" + secrets.token_urlsafe(18)
        self._codes[code] = PendingCode(request, self._clock.now() + self._code_ttl)
        return code

    # Token endpoint

    def token(self, form: Mapping[str, str]) -> Tokens:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _missing("grant_type")
        if grant_type not in ("authorization_code", "refresh_token"):
            raise OAuthError(
                "unsupported_grant_type",
                "The authorization grant type is not supported by the authorization server",
            )
        self._authenticate_client(form)
        if grant_type == "authorization_code":
            tokens = self._exchange_code(form)
        else:
            tokens = self._refresh(form)
        self.grants_issued[grant_type] += 1
        return tokens

    def _authenticate_client(self, form: Mapping[str, str]) -> None:
        client_ok = hmac.compare_digest(form.get("client_id", ""), self.client_id)
        secret_ok = hmac.compare_digest(form.get("client_secret", ""), self._client_secret)
        if not (client_ok and secret_ok):
            raise OAuthError("invalid_client", "Client authentication failed", status=401)

    def _exchange_code(self, form: Mapping[str, str]) -> Tokens:
        code = form.get("code")
        if not code:
            raise _missing("code")
        if not form.get("redirect_uri"):
            raise _missing("redirect_uri")
        # Popped before any other check: a code is spent by its first use, good or bad.
        pending = self._codes.pop(code, None)
        if pending is None or pending.expires_at <= self._clock.now():
            raise _invalid_grant("code")
        if form["redirect_uri"] != pending.request.redirect_uri:
            raise _invalid_grant("redirect_uri")
        _check_verifier(pending.request.code_challenge, form.get("code_verifier"))
        grant = Grant(client_id=pending.request.client_id, scope=pending.request.scope)
        refresh_token = self._new_refresh_token(grant)
        return Tokens(self._new_access_token(grant), refresh_token, self._access_token_ttl)

    def _refresh(self, form: Mapping[str, str]) -> Tokens:
        refresh_token = form.get("refresh_token")
        if not refresh_token:
            raise _missing("refresh_token")
        grant = self._refresh_tokens.get(refresh_token)
        if grant is None or grant.revoked:
            raise _invalid_grant(
                "refresh_token", ". User may have revoked or didn't grant the permission."
            )
        if self._config.rotate_refresh_tokens:
            # The old token dies at once, so a relay that forgets to store the new
            # one finds out on its next refresh.
            del self._refresh_tokens[refresh_token]
            refresh_token = self._new_refresh_token(grant)
        return Tokens(self._new_access_token(grant), refresh_token, self._access_token_ttl)

    def _new_refresh_token(self, grant: Grant) -> str:
        token = REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(48)
        self._refresh_tokens[token] = grant
        return token

    def _new_access_token(self, grant: Grant) -> str:
        self._forget_expired_access_tokens()
        token = ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(48)
        self._access_tokens[token] = AccessToken(grant, self._clock.now() + self._access_token_ttl)
        return token

    def _forget_expired_access_tokens(self) -> None:
        # Run only when a token is issued (rare), so lookups stay O(1).
        now = self._clock.now()
        expired = [t for t, access in self._access_tokens.items() if access.expires_at <= now]
        for token in expired:
            del self._access_tokens[token]

    # Resource servers and revocation

    def grant_for_access_token(self, token: str) -> Grant | None:
        """The live grant behind ``token``, or None if it is unknown, expired or revoked."""
        access = self._access_tokens.get(token)
        if access is None or access.grant.revoked or access.expires_at <= self._clock.now():
            return None
        return access.grant

    def revoke_refresh_token(self, token: str) -> int:
        grant = self._refresh_tokens.get(token)
        if grant is None or grant.revoked:
            return 0
        grant.revoked = True
        return 1

    def revoke_all(self) -> int:
        grants = {id(g): g for g in self._refresh_tokens.values() if not g.revoked}
        for grant in grants.values():
            grant.revoked = True
        return len(grants)

    def expire_access_tokens(self) -> int:
        """End every access token now; refresh tokens stay valid (the 401 path)."""
        count = len(self._access_tokens)
        self._access_tokens.clear()
        return count


def check_authorize_details(request: AuthorizeRequest, challenge_method: str | None) -> None:
    """Scope and PKCE problems, reported through the redirect (AuthorizeRedirectError)."""
    _check_scope(request.scope)
    _check_challenge(request.code_challenge, challenge_method)


def _check_scope(scope: str) -> None:
    requested = scope.split()
    if not requested:
        raise AuthorizeRedirectError("invalid_scope", "The request is missing the scope parameter")
    unknown = set(requested) - known_scopes()
    if unknown:
        raise AuthorizeRedirectError("invalid_scope", f"Unknown scope: {' '.join(sorted(unknown))}")


def _check_challenge(challenge: str | None, method: str | None) -> None:
    # The emulator accepts S256 only: 'plain' protects nothing and the relay must not use it.
    if challenge is None and method is None:
        return
    if challenge is None:
        raise AuthorizeRedirectError(
            "invalid_request", "code_challenge_method without code_challenge"
        )
    if method != "S256":
        raise AuthorizeRedirectError("invalid_request", "code_challenge_method must be S256")
    if not _S256_CHALLENGE.fullmatch(challenge):
        raise AuthorizeRedirectError("invalid_request", "code_challenge is not an S256 challenge")


def s256_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def _check_verifier(challenge: str | None, verifier: str | None) -> None:
    if challenge is None:
        if verifier is not None:
            # Strict on purpose: a relay sending a verifier it never announced has a bug.
            raise _invalid_grant("code_verifier", " (no code_challenge was sent to /ap/oa)")
        return
    if verifier is None:
        raise _invalid_grant("code_verifier", " (missing)")
    if not _CODE_VERIFIER.fullmatch(verifier):
        raise OAuthError("invalid_request", "code_verifier must be 43..128 unreserved characters")
    if not hmac.compare_digest(s256_challenge(verifier), challenge):
        raise _invalid_grant("code_verifier")
