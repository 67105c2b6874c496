"""Response helpers shared by the emulator's endpoints."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import HTMLResponse, Response


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        # orjson refuses integers beyond 64 bits, which a client may legally send
        # and the emulator echoes back.
        return json.dumps(value, separators=(",", ":")).encode()


def json_response(status: int, value: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        dumps(value), status_code=status, media_type="application/json", headers=headers
    )


def html_page(status: int, title: str, body_html: str) -> HTMLResponse:
    """A minimal page; ``body_html`` must already be escaped."""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body_html}</body></html>"
    )
    return HTMLResponse(page, status_code=status)


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` → ``application/json``."""
    return (content_type or "").partition(";")[0].strip().lower()
