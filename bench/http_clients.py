"""Which HTTP client should the relay forward with? (httpx, httpx2, aiohttp)

One run, same machine, same data: a sink server answers every POST with a 207 (a raw
ASGI app under uvicorn, in its own process); for each client a one-worker forwarder
(FastAPI under uvicorn, its own process) reads a 146 KB, 100-event body and forwards
it once with that client; a load generator posts at concurrency 32. Reported:
batches/s per client, and the read ceiling (an endpoint that reads the body and
answers 202 without forwarding).

    .venv/bin/python bench/http_clients.py [--seconds 8] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

SINK_ANSWER = json.dumps({"success": [{"index": i} for i in range(100)]}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def sink(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 207,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": SINK_ANSWER})


def run_sink(port: int) -> None:
    import uvicorn

    uvicorn.run(sink, host="127.0.0.1", port=port, log_level="error", access_log=False)


CLIENTS = ("httpx", "httpx2", "aiohttp")


class Forwarder:
    """One of ``CLIENTS`` with a pool of ``connections``, opened inside the event loop,
    posting a body once and reading the whole answer: what each bench compares."""

    def __init__(self, kind: str, connections: int) -> None:
        self.kind = kind
        if kind == "httpx":
            import httpx

            self.client: Any = httpx.AsyncClient(limits=httpx.Limits(max_connections=connections))
        elif kind == "httpx2":
            import httpx2

            self.client = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=connections))
        elif kind == "aiohttp":
            import aiohttp

            self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))
        else:
            raise ValueError(f"unknown client {kind!r}")

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """The answer's status."""
        if self.kind == "aiohttp":
            async with self.client.post(url, data=body, headers=headers) as answer:
                await answer.read()
                return int(answer.status)
        answer = await self.client.post(url, content=body, headers=headers)
        return int(answer.status_code)

    async def aclose(self) -> None:
        await (self.client.close() if self.kind == "aiohttp" else self.client.aclose())


def forwarder(kind: str, upstream: str) -> Any:
    state: dict[str, Forwarder] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if kind != "read":
            state["client"] = Forwarder(kind, 64)
        yield
        if kind != "read":
            await state["client"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/forward")
    async def forward(request: Request) -> Response:
        body = await request.body()
        if kind == "read":
            return Response(status_code=202)
        headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}
        status = await state["client"].post(upstream, body, headers)
        return Response(status_code=202 if status == 207 else 502)

    return app


def run_forwarder(kind: str, port: int, upstream: str) -> None:
    import uvicorn

    uvicorn.run(
        forwarder(kind, upstream), host="127.0.0.1", port=port, log_level="error", access_log=False
    )


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def load(url: str, body: bytes, seconds: float, concurrency: int) -> float:
    import aiohttp

    done = 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as answer:
                    await answer.read()
                    if answer.status == 202:
                        done += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - start)


def batch_body() -> bytes:
    sys.path.insert(0, os.path.dirname(__file__))
    from mapper_bench import NOW, make_batch

    from app.amazon.settings import OutputSettings
    from app.pipeline import map_payload

    result = map_payload("mparticle", make_batch(1), settings=OutputSettings(), now=NOW)
    request = json.dumps(result.requests[0]).encode()
    # Pad to the 146 KB of the measurement with a larger custom attribute set.
    events = json.loads(request)["events"]
    for event in events:
        event["customData"] = [
            {"name": f"k{i}", "value": "v" * 40, "dataType": "STRING"} for i in range(13)
        ]
    return json.dumps({"events": events}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    body = batch_body()
    sink_port = free_port()
    context = multiprocessing.get_context("spawn")
    sink_process = context.Process(target=run_sink, args=(sink_port,), daemon=True)
    sink_process.start()
    wait_port(sink_port)
    upstream = f"http://127.0.0.1:{sink_port}/adsApi/v1/create/events"
    results = {}
    try:
        for kind in ("read", *CLIENTS):
            port = free_port()
            process = context.Process(
                target=run_forwarder, args=(kind, port, upstream), daemon=True
            )
            process.start()
            try:
                wait_port(port)
                url = f"http://127.0.0.1:{port}/forward"
                asyncio.run(load(url, body, 1.0, args.concurrency))  # warm up
                results[kind] = asyncio.run(load(url, body, args.seconds, args.concurrency))
            finally:
                process.terminate()
                process.join()
    finally:
        sink_process.terminate()
        sink_process.join()
    print(
        f"body {len(body) / 1024:.0f} KB, concurrency {args.concurrency}, "
        f"{args.seconds:.0f} s each, {os.cpu_count()} cores"
    )
    best = max(CLIENTS, key=lambda k: results[k])
    for kind, rate in results.items():
        label = "read ceiling (no forward)" if kind == "read" else f"forward with {kind}"
        print(f"{label:28s} {rate:8.1f} batches/s  ({rate / results[best]:.2f} of {best})")


if __name__ == "__main__":
    main()
