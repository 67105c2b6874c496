"""The web UI: server-rendered admin pages under /ui/ (see docs/decisions/0006-web-ui.md).

``create_app`` wires it with three calls: ``include_router(router)``, the static files
``mount`` and the session middleware.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

from app.web.routes import router
from app.web.session import STATIC_PATH, UISessionMiddleware

STATIC_DIRECTORY = Path(__file__).parent / "static"


def static_files() -> StaticFiles:
    """The CSS and the copy-button script, served under ``STATIC_PATH``."""
    return StaticFiles(directory=STATIC_DIRECTORY)


__all__ = ["STATIC_PATH", "UISessionMiddleware", "router", "static_files"]
