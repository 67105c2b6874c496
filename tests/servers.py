"""Run an ASGI app under a real uvicorn server for the length of a test.

    from servers import run_server

    with run_server(app) as base_url:  # "http://127.0.0.1:<free port>"
        httpx.get(f"{base_url}/healthz")

The server runs in a background thread with its own event loop, so both sync
tests and async tests (whose loop must stay free) can talk to it over real HTTP.
The socket is bound before the server starts: no race for the free port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.types import ASGIApp

STARTUP_TIMEOUT = 10.0


@contextmanager
def run_server(app: ASGIApp, **config: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 and a free port; yield its base URL.

    ``config`` goes to ``uvicorn.Config`` (e.g. ``lifespan="on"``). On exit the
    server shuts down gracefully, giving in-flight requests 2 s to finish.
    """
    settings: dict[str, Any] = {"log_level": "warning", "timeout_graceful_shutdown": 2} | config
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{port}", daemon=True
    )
    thread.start()
    try:
        _wait_started(server, thread)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT)
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped during startup (see its log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {STARTUP_TIMEOUT} s")
        time.sleep(0.01)
