"""Everything one relay process shares: built once at start, closed at shutdown.

One engine (one connection pool), one HTTP client (one connection pool, explicit
timeouts), one key ring, one token service and the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.amazon.endpoints import Endpoints
from app.auth import ConnectionAuthCache, FailedAuthLimiter
from app.config import DISPATCH_CONCURRENCY, Settings
from app.crypto import KeyRing, keyring_from_settings
from app.db.hot import HotStatements, hot_statements
from app.db.session import create_autocommit_sessionmaker, create_engine, create_sessionmaker
from app.delivery.dispatcher import Dispatcher, DispatcherConfig
from app.delivery.policy import FIRST_DELAY
from app.http import AiohttpClient, HttpClient, Timeouts
from app.tokens import TokenService

HTTP_TIMEOUTS = Timeouts(connect=5.0, read=30.0, total=60.0)


def http_client(
    concurrency: int = DISPATCH_CONCURRENCY, *, timeouts: Timeouts | None = None
) -> HttpClient:
    # Sized for the dispatcher: each in-flight delivery holds one connection to Amazon.
    # A few connections beyond the dispatcher's for token refreshes and OAuth exchanges,
    # so a burst of deliveries never makes a Login with Amazon callback wait for a slot.
    return AiohttpClient(timeouts=timeouts or HTTP_TIMEOUTS, max_connections=concurrency + 8)


@dataclass(slots=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    # One statement, committed on its own: reads outside a transaction.
    autocommit: async_sessionmaker[AsyncSession]
    # The statements every batch runs: credential read, insert, outcome (app/db/hot.py).
    hot: HotStatements
    http: HttpClient
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
        http_timeouts: Timeouts | None = None,
        first_retry_seconds: float = FIRST_DELAY,
    ) -> Runtime:
        """``http_timeouts`` (default HTTP_TIMEOUTS) and ``first_retry_seconds`` (default
        the policy's 1 s) exist for tests that need timeouts and retries to be quick."""
        engine = create_engine(
            settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
        )
        sessionmaker = create_sessionmaker(engine)
        autocommit = create_autocommit_sessionmaker(engine)
        hot = hot_statements(engine, autocommit)
        concurrency = settings.dispatch_concurrency
        http = http_client(concurrency, timeouts=http_timeouts)
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
            autocommit=autocommit,
            statements=hot,
        )
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            autocommit=autocommit,
            hot=hot,
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
        await self.hot.aclose()
        await self.engine.dispose()
