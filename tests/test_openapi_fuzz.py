"""schemathesis against the relay's own OpenAPI schema: every route, with its auth.

The relay and the emulator run as servers on loopback (e2e_helpers), on SQLite and on
PostgreSQL. For every operation of ``/openapi.json``, schemathesis generates requests
(valid and invalid parameters and bodies) and each answer is checked: never a 5xx, and
an answer the schema documents conforms to it. Admin routes get the admin bearer token,
ingest routes the Basic credentials of a connection of their source, so the generated
requests reach the handlers instead of stopping at a 401.

The default run tries a few dozen requests per operation; ``-m slow`` tries hundreds.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from e2e_helpers import Stack, relay_stack
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.result import Ok

from app.api.ingest import SEGMENT_TYPES

CHECKS = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.content_type_conformance,
]
SOURCE_OF_PATH = {
    "/v2/events": "mparticle",
    "/v2/bulkevents": "mparticle",
    "/v1/records": "records",
    "/v1/batch": "segment",
    **{f"/v1/{t}": "segment" for t in SEGMENT_TYPES},
}


def auth_headers(stack: Stack) -> Callable[[str, list[str]], dict[str, str]]:
    """A function: (path, tags) → the headers that authenticate a request to it."""
    output, mparticle = stack.ready_output()
    basic = {"mparticle": mparticle.auth}
    for source in ("segment", "records"):
        basic[source] = stack.connect(output["id"], source).auth
    admin = {"Authorization": f"Bearer {stack.admin_token}"}

    def headers(path: str, tags: list[str]) -> dict[str, str]:
        source = SOURCE_OF_PATH.get(path)
        if source is not None:
            key, secret = basic[source]
            token = base64.b64encode(f"{key}:{secret}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        if "admin" in tags or path.startswith("/oauth/amazon/start"):
            return admin
        return {}

    return headers


def fuzz_operation(
    stack: Stack, operation: Any, headers: dict[str, str], examples: int
) -> set[int]:
    """Run ``examples`` generated requests against one operation; the statuses seen."""
    seen: set[int] = set()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        if case.query and "wait" in case.query:
            case.query["wait"] = 0  # a long wait tests the clock, not the input
        response = case.call(base_url=stack.relay_url, headers=headers, timeout=30)
        seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    run()
    return seen


def fuzz_every_operation(stack: Stack, examples: int) -> dict[str, int]:
    schema = schemathesis.openapi.from_url(f"{stack.relay_url}/openapi.json")
    headers_for = auth_headers(stack)
    statuses: dict[str, int] = {}
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation in the schema parses
        operations.append(result.ok())
    assert len(operations) >= 20  # every route is in the schema
    for operation in operations:
        headers = headers_for(operation.path, list(operation.tags or []))
        statuses[operation.label] = len(fuzz_operation(stack, operation, headers, examples))
    return statuses


def test_every_operation_survives_generated_requests(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        statuses = fuzz_every_operation(stack, examples=15)
        assert stack.admin.get("/healthz").status_code == 200
    # The generated requests were not all refused the same way at the door.
    assert sum(statuses.values()) > len(statuses)


@pytest.mark.slow
def test_every_operation_survives_many_generated_requests(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path) as stack:
        fuzz_every_operation(stack, examples=300)
