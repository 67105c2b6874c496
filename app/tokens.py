"""Access tokens for the Events API: cached, refreshed one at a time per output.

The access token of an output is cached in memory and, encrypted, in the database
until 5 minutes before it expires. A refresh takes the output's credential row
lock (``SELECT … FOR UPDATE`` on PostgreSQL, the write lock on SQLite), so any
number of relay processes refresh an output once, not once each; the others find
the new token when the lock is theirs. A refresh token rotated by Amazon is
stored. ``invalid_grant`` sets the output to ``needs_reauth``: only a new Login
with Amazon helps, and its deliveries wait until then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app import lwa, metrics
from app.crypto import DecryptError, KeyRing, SecretText
from app.db import repository as repo
from app.db.base import utcnow
from app.db.models import OutputStatus
from app.errors import RelayError
from app.http import HttpClient
from app.logs import get_logger

log = get_logger(__name__)


class NotLoggedInError(RelayError):
    """The output has no refresh token (Login with Amazon never completed)."""

    code = "needs_login"
    status = 409


class TokenService:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        keyring: KeyRing,
        http: HttpClient,
        *,
        token_url: Callable[[str], str],
        client_id: str,
        client_secret: str,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._keyring = keyring
        self._http = http
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._clock = clock
        self._cache: dict[str, tuple[SecretText, datetime]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def forget(self, output_id: str) -> None:
        self._cache.pop(output_id, None)

    def _cached(self, output_id: str, stale: SecretText | None) -> SecretText | None:
        entry = self._cache.get(output_id)
        if entry is None:
            return None
        token, expires_at = entry
        if expires_at - repo.ACCESS_TOKEN_MARGIN <= self._clock() or (stale and token == stale):
            return None
        return token

    async def access_token(
        self, output_id: str, region: str, *, stale: SecretText | None = None
    ) -> SecretText:
        """A usable access token; ``stale`` is one Amazon just refused (401)."""
        token = self._cached(output_id, stale)
        if token is not None:
            return token
        lock = self._locks.setdefault(output_id, asyncio.Lock())
        async with lock:
            token = self._cached(output_id, stale)
            if token is not None:
                return token
            token, expires_at = await self._from_database_or_refresh(output_id, region, stale)
            self._cache[output_id] = (token, expires_at)
            return token

    async def _from_database_or_refresh(
        self, output_id: str, region: str, stale: SecretText | None
    ) -> tuple[SecretText, datetime]:
        refused: lwa.InvalidGrantError | None = None
        async with self._sessionmaker() as session, session.begin():
            credential = await repo.lock_for_refresh(session, output_id)
            if credential is None:
                raise NotLoggedInError("the output has no Login with Amazon credential")
            now = self._clock()
            try:
                cached = repo.cached_access_token(self._keyring, credential, now=now)
            except DecryptError:
                cached = None  # an unreadable cached token: a refresh replaces it
            if cached is not None and not (stale and cached == stale):
                assert credential.access_token_expires_at is not None
                return cached, credential.access_token_expires_at
            try:
                refresh_token = repo.refresh_token_of(self._keyring, credential)
            except DecryptError:
                # A row this key ring cannot open (copied from another output, tampered
                # with, or under a key since removed): as with invalid_grant, only a new
                # Login with Amazon helps. Before, the error escaped every delivery attempt
                # of the output, which crashed and came back after each lease, forever.
                await repo.set_status(session, output_id, OutputStatus.NEEDS_REAUTH)
                log.warning("lwa_credential_undecryptable", output_id=output_id)
                refused = lwa.InvalidGrantError("the stored credential cannot be decrypted")
            else:
                try:
                    tokens = await lwa.refresh(
                        self._http,
                        self._token_url(region),
                        refresh_token=refresh_token.reveal(),
                        client_id=self._client_id,
                        client_secret=self._client_secret,
                    )
                except lwa.InvalidGrantError as error:
                    # Committed, not rolled back: the output must show needs_reauth.
                    metrics.TOKEN_REFRESHES.labels(outcome="invalid_grant").inc()
                    await repo.set_status(session, output_id, OutputStatus.NEEDS_REAUTH)
                    log.warning("lwa_invalid_grant", output_id=output_id)
                    refused = error
                except lwa.LwaError:
                    metrics.TOKEN_REFRESHES.labels(outcome="error").inc()
                    raise
                else:
                    # Stored under the same row lock, so no other process refreshes meanwhile.
                    metrics.TOKEN_REFRESHES.labels(outcome="ok").inc()
                    expires_at = now + timedelta(seconds=tokens.expires_in)
                    rotated = tokens.refresh_token
                    await repo.store_access_token(
                        session,
                        self._keyring,
                        output_id,
                        access_token=tokens.access_token,
                        expires_at=expires_at,
                        refresh_token=rotated
                        if rotated and rotated != refresh_token.reveal()
                        else None,
                        now=now,
                    )
                    log.info("lwa_token_refreshed", output_id=output_id, rotated=bool(rotated))
                    return SecretText(tokens.access_token), expires_at
        assert refused is not None  # the only way out of the block without a return
        self.forget(output_id)
        raise refused
