"""Operations: liveness, readiness, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app import metrics
from app.api.deps import ApiError, RuntimeDep, bearer, transaction
from app.auth import token_ok
from app.db import repository as repo
from app.db import stats
from app.db.base import utcnow
from app.db.migrate import at_head

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database is reachable and migrated")
async def readyz(rt: RuntimeDep, response: Response) -> dict[str, str]:
    try:
        ready = await at_head(rt.engine)
    except Exception:  # any database error means "not ready", never a 500
        ready = False
    if not ready:
        response.status_code = 503
        return {"status": "unavailable"}
    return {"status": "ok"}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description="Open unless RELAY_METRICS_TOKEN is set; then that token as a bearer token.",
    response_class=Response,
)
async def prometheus(request: Request, rt: RuntimeDep) -> Response:
    expected = rt.settings.metrics_token
    if expected is not None and not token_ok(bearer(request), expected.get_secret_value()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong metrics bearer token (RELAY_METRICS_TOKEN)",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    queue = None
    try:
        async with transaction(rt) as session:
            depth = await repo.queue_depth(session)
            oldest = await repo.oldest_pending_age(session, now=utcnow())
            dead = await stats.dead_deliveries(session)
            outputs = await stats.outputs_by_status(session)
        queue = metrics.QueueGauges(depth, oldest, dead, outputs)
    except Exception:  # the database being away must not hide the other metrics
        queue = None
    return Response(metrics.render(queue), media_type="text/plain; version=0.0.4; charset=utf-8")
