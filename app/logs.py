"""Structured logs (structlog): JSON in production, readable in a terminal.

Log lines carry ids (request, delivery, output) and counts, never secrets or raw
identities; ``redact`` is the last processor so a mistake elsewhere cannot leak a
token that looks like one of Amazon's.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Amazon's LwA tokens start with Atza| (access) and Atzr| (refresh).
_TOKEN = re.compile(r"Atz[ar]\|[A-Za-z0-9_\-|.=+/]+")
_SECRET_KEYS = frozenset(
    {"authorization", "refresh_token", "access_token", "client_secret", "secret", "password",
     "code", "code_verifier", "admin_token"}
)  # fmt: skip


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif isinstance(value, str) and "Atz" in value:
            event[key] = _TOKEN.sub("Atz*|***", value)
    return event


def _stderr_logger(*_: Any) -> structlog.PrintLogger:
    # Standard error as it is when the line is written, not as it was at configure():
    # a test harness swaps it, and stdout is for what commands print (`relay map`'s JSON,
    # the operator commands' lines).
    return structlog.PrintLogger(sys.stderr)


def configure(log_format: str = "console", level: int = logging.INFO) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
