"""The relay's one outbound HTTP client, behind a small interface.

aiohttp does the work: forwarding a 100-event body it sustained about 7× the
throughput of httpx 0.28 and 2× that of httpx2 on this project's machines
(docs/benchmarks.md, docs/decisions/0008-http-client.md). The interface is the two
calls the relay makes (a JSON POST to the Events API, a form POST to Login with
Amazon), so the client can change again without touching its callers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from app import jsonutil


class TransportError(Exception):
    """No HTTP answer: connection refused or reset, timeout, protocol error."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)  # names lowercased

    def json(self) -> Any:
        """The body as JSON, or None when it is empty or not JSON."""
        return jsonutil.loads_or_none(self.body)


class HttpClient(Protocol):
    async def post(
        self,
        url: str,
        *,
        content: bytes | None = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpAnswer: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 30.0  # between bytes of the answer
    total: float = 60.0  # the whole exchange


class AiohttpClient:
    """One connection pool for everything the relay sends; built inside the event loop."""

    def __init__(self, *, timeouts: Timeouts = Timeouts(), max_connections: int = 40) -> None:
        self._timeouts = timeouts
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, keepalive_timeout=30, ttl_dns_cache=300
                ),
                timeout=aiohttp.ClientTimeout(
                    total=self._timeouts.total,
                    sock_connect=self._timeouts.connect,
                    sock_read=self._timeouts.read,
                ),
                headers={"User-Agent": "amazon-capi-relay"},
                # Amazon does not redirect; a redirect is not followed blindly.
                auto_decompress=True,
            )
        return self._session

    async def post(
        self,
        url: str,
        *,
        content: bytes | None = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpAnswer:
        session = self._open()
        data: Any = content if content is not None else (dict(form) if form is not None else None)
        try:
            async with session.post(
                url, data=data, headers=dict(headers or {}), allow_redirects=False
            ) as response:
                body = await response.read()
                return HttpAnswer(
                    response.status, body, {k.lower(): v for k, v in response.headers.items()}
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as failure:
            raise TransportError(type(failure).__name__) from None

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
