"""Everything one relay process shares: built once at start, closed at shutdown.

One engine (one connection pool), one HTTP client (one connection pool, explicit
timeouts), one key ring, one token service and the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.amazon.endpoints import Endpoints
from app.auth import ConnectionAuthCache, FailedAuthLimiter
from app.config import Settings
from app.crypto import KeyRing, keyring_from_settings
from app.db.session import create_engine, create_sessionmaker
from app.delivery.dispatcher import Dispatcher, DispatcherConfig
from app.delivery.policy import FIRST_DELAY
from app.tokens import TokenService

# Sized for the dispatcher: each in-flight delivery holds one connection to Amazon.
DISPATCH_CONCURRENCY = 32
HTTP_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=10.0)


def http_client(
    concurrency: int = DISPATCH_CONCURRENCY, *, timeout: httpx.Timeout | None = None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=timeout or HTTP_TIMEOUT,
        limits=httpx.Limits(
            max_connections=concurrency + 8,
            max_keepalive_connections=concurrency + 8,
            keepalive_expiry=30.0,
        ),
        follow_redirects=False,  # Amazon does not redirect; a redirect is not followed blindly
        headers={"User-Agent": "amazon-capi-relay"},
    )


@dataclass(slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    keyring: KeyRing
    endpoints: Endpoints
    tokens: TokenService
    dispatcher: Dispatcher
    auth_cache: ConnectionAuthCache
    limiter: FailedAuthLimiter

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        concurrency: int = DISPATCH_CONCURRENCY,
        http_timeout: httpx.Timeout | None = None,
        first_retry_seconds: float = FIRST_DELAY,
    ) -> Runtime:
        """``http_timeout`` (default HTTP_TIMEOUT) and ``first_retry_seconds`` (default
        the policy's 1 s) exist for tests that need timeouts and retries to be quick."""
        engine = create_engine(settings.database_url, pool_size=10, max_overflow=20)
        sessionmaker = create_sessionmaker(engine)
        http = http_client(concurrency, timeout=http_timeout)
        keyring = keyring_from_settings(settings)
        endpoints = Endpoints(
            api_url=settings.amazon_api_url,
            authorize_url=settings.lwa_authorize_url,
            token_url=settings.lwa_token_url,
        )
        client_secret = settings.lwa_client_secret
        tokens = TokenService(
            sessionmaker,
            keyring,
            http,
            token_url=endpoints.token,
            client_id=settings.lwa_client_id,
            client_secret=client_secret.get_secret_value() if client_secret else "",
        )
        dispatcher = Dispatcher(
            sessionmaker,
            http,
            tokens,
            endpoints,
            DispatcherConfig(
                client_id=settings.lwa_client_id,
                max_age_seconds=settings.delivery_max_age,
                lease_seconds=settings.delivery_lease_seconds,
                concurrency=concurrency,
                first_retry_seconds=first_retry_seconds,
            ),
        )
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            http=http,
            keyring=keyring,
            endpoints=endpoints,
            tokens=tokens,
            dispatcher=dispatcher,
            auth_cache=ConnectionAuthCache(),
            limiter=FailedAuthLimiter(),
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.engine.dispose()
