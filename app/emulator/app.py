"""The Amazon emulator's ASGI app and the function that serves it.

Run one process (its state is in memory): ``serve()`` or ``relay emulator``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from app.emulator import control, endpoints
from app.emulator.emulator import Emulator
from app.emulator.injection import inject
from app.emulator.state import DEFAULT_MAX_BODY_BYTES

# The requests faults can hit, by the target name used in POST /_emulator/faults.
_FAULT_TARGETS = {
    ("POST", endpoints.EVENTS_PATH): "events",
    ("POST", endpoints.TOKEN_PATH): "token",
}


class EmulatorApp(Starlette):
    """Starlette with a fault layer in front: it must see the server's own ``send``
    (Starlette's middleware wraps it), to be able to drop a connection."""

    def __init__(self, emulator: Emulator) -> None:
        super().__init__(routes=[*endpoints.routes(emulator), *control.routes(emulator)])
        self.emulator = emulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fault = None
        if scope["type"] == "http":
            target = _FAULT_TARGETS.get((scope["method"], scope["path"]))
            if target is not None:
                fault = self.emulator.faults.take(target, self.emulator.clock.now())
        if fault is None:
            await super().__call__(scope, receive, send)
        else:
            await inject(self.emulator, fault, scope, receive, send, super().__call__)


def create_app(
    *,
    client_id: str = "relay-demo-client",
    client_secret: str = "relay-demo-secret",  # noqa: S107 - the demo's well-known value
    access_token_ttl: int = 3600,
    code_ttl: int = 300,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_redirect_uris: Collection[str] | None = None,
) -> EmulatorApp:
    """A new emulator with its own state; ``allowed_redirect_uris=None`` accepts any
    http(s) redirect URI, a collection only those exact URIs (as LwA's security profile)."""
    emulator = Emulator(
        client_id=client_id,
        client_secret=client_secret,
        access_token_ttl=access_token_ttl,
        code_ttl=code_ttl,
        max_body_bytes=max_body_bytes,
        allowed_redirect_uris=allowed_redirect_uris,
    )
    return EmulatorApp(emulator)


def serve(host: str = "127.0.0.1", port: int = 9100, **create_app_kwargs: Any) -> None:
    """Serve a new emulator with uvicorn until interrupted (one process: state is in memory)."""
    import uvicorn

    uvicorn.run(create_app(**create_app_kwargs), host=host, port=port, workers=1)
