"""The web UI's pages under /ui/: server-rendered (Jinja2), usable without JavaScript.

Every page needs the admin session (app/web/session.py) except the login page; every
POST form is checked by app/web/csrf.py first. Pages answer with a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script)
and ``Cache-Control: no-store`` (a connection's secret is shown on one of them).
Inputs are validated with the admin API's pydantic models and written with the same
repository functions, so the UI and the JSON API cannot disagree.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from markupsafe import Markup
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from app import jsonutil
from app.amazon.settings import MAX_AGE_HOURS, MIN_AGE_HOURS
from app.api.deps import RuntimeDep, transaction
from app.api.schemas import ConnectionCreate, OutputCreate, OutputUpdate
from app.auth import ADMIN_IDENTITY, token_ok, write_key
from app.db import repository as repo
from app.db import stats
from app.db.base import utcnow
from app.db.models import (
    Connection,
    Delivery,
    DeliveryStatus,
    DroppedBatch,
    Output,
    OutputStatus,
)
from app.errors import RelayError
from app.ingest import settings_for
from app.pipeline import map_payload
from app.runtime import Runtime
from app.sources import SOURCES
from app.web import csrf
from app.web.chart import Bar, render_chart
from app.web.session import flash, log_in, log_out, logged_in, session_of, take_flashes

PREFIX: Final = "/ui"
TEMPLATES = Path(__file__).parent / "templates"
DAY = timedelta(hours=24)
RECENT_DELIVERIES = 10
RECENT_DROPPED_BATCHES = 10
DELIVERIES_PAGE = 50
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
}
RETRYABLE = frozenset({DeliveryStatus.FAILED.value, DeliveryStatus.DEAD.value})
SAMPLES: Final = {"mparticle": "mparticle_batch.json", "segment": "segment_batch.json"}

# The output form's text fields, in the order the form shows them.
OUTPUT_TEXT_FIELDS: Final = (
    "name",
    "advertiser_id",
    "data_set_name",
    "partner_name",
    "region",
    "max_event_age_hours",
    "match_keys",
    "consent_mode",
    "consent_purpose_user_data",
    "consent_purpose_ad_storage",
    "consent_category_advertising",
)
OUTPUT_CHECKBOXES: Final = ("enabled", "default_rules")
REQUIRED: Final = frozenset({"name", "advertiser_id"})
# Fields a select always sends, or whose empty value means the default: never NULL.
DEFAULTED: Final = {
    "region": "NA",
    "match_keys": "standard",
    "consent_mode": "forward",
    "max_event_age_hours": 24,
}
FIELD_HINTS: Final = {
    "advertiser_id": "Enter digits only (the Amazon Ads advertiser id).",
    "data_set_name": "Use 5 to 100 characters: a letter first, then letters, digits, _ or -.",
}
STATUS_TEXT: Final = {
    OutputStatus.NEEDS_LOGIN.value: "Needs Login with Amazon",
    OutputStatus.CONFIGURED.value: "Configured",
    OutputStatus.NEEDS_REAUTH.value: "Needs re-authorization",
}


# --- plumbing ----------------------------------------------------------------------------


class LoginRequiredError(Exception):
    """No (or an expired) admin session: answered by a redirect to the login page."""


class NotFoundError(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _date(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters["date"] = _date
environment.filters["pretty"] = _pretty
environment.globals.update(
    prefix=PREFIX,
    static=f"{PREFIX}/static",
    status_text=STATUS_TEXT,
    csrf_field=csrf.CSRF_FIELD,
    sources=tuple(SOURCES),
)


def render(
    request: Request,
    template: str,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    session = session_of(request)
    page = environment.get_template(template).render(
        request=request,
        path=request.url.path,
        signed_in=logged_in(request),
        csrf_token=csrf.token_for(session),
        flashes=take_flashes(session),
        **context,
    )
    return HTMLResponse(page, status_code=status_code, headers=dict(headers or {}))


def _error_page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
    return render(request, "error.html", status_code=status, title=title, detail=detail)


class UIRoute(APIRoute):
    """Turns the UI's exceptions into pages and adds the pages' security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequiredError:
                target = request.url.path
                if request.method == "GET" and request.url.query:
                    target += f"?{request.url.query}"
                response = RedirectResponse(
                    f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303
                )
            except csrf.CsrfError as error:
                response = _error_page(request, 403, "Request refused", error.reason)
            except csrf.FormError as error:
                response = _error_page(request, error.status, "Bad form", error.message)
            except RequestValidationError:
                response = _error_page(
                    request, 400, "Bad request", "The address has a parameter this page cannot use."
                )
            except NotFoundError as missing:
                response = _error_page(
                    request, 404, "Not found", f"There is no such {missing.what}."
                )
            for name, value in PAGE_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return route


router = APIRouter(prefix=PREFIX, route_class=UIRoute, include_in_schema=False)


async def require_login(request: Request) -> None:
    if not logged_in(request):
        raise LoginRequiredError


Login = Annotated[None, Depends(require_login)]


async def checked_form(request: Request, rt: Runtime) -> csrf.Form:
    form = await csrf.read_form(request)
    csrf.check(request, form, public_url=rt.settings.public_url)
    return form


def _redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def _safe_next(target: str | None) -> str:
    """Only our own pages: a path under /ui/, never another host."""
    if (
        target
        and target.startswith(f"{PREFIX}/")
        and not target.startswith("//")
        and "\\" not in target
        and "://" not in target
    ):
        return target
    return f"{PREFIX}/"


async def _output(rt: Runtime, output_id: str) -> Output:
    async with transaction(rt) as session:
        output = await repo.get_output(session, output_id)
    if output is None:
        raise NotFoundError("output")
    return output


# --- login -------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
async def ui_root() -> Response:
    return _redirect(f"{PREFIX}/")


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, rt: RuntimeDep, next: str | None = None) -> Response:
    if logged_in(request):
        return _redirect(_safe_next(next))
    return render(
        request,
        "login.html",
        next=_safe_next(next),
        error=None,
        ui_off=rt.settings.admin_token is None,
    )


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, rt: RuntimeDep) -> Response:
    if rt.settings.admin_token is None:
        return render(
            request, "login.html", status_code=503, next=f"{PREFIX}/", error=None, ui_off=True
        )
    form = await checked_form(request, rt)
    target = _safe_next(form.get("next"))
    client = request.client.host if request.client else "unknown"
    # One budget with the admin bearer token: both guess the same secret.
    if rt.limiter.blocked(client, ADMIN_IDENTITY):
        return render(
            request,
            "login.html",
            status_code=429,
            headers={"Retry-After": "60"},
            next=target,
            error="Too many failed attempts. Wait a minute, then try again.",
            ui_off=False,
        )
    if not token_ok(form.get("password", ""), rt.settings.admin_token.get_secret_value()):
        rt.limiter.failed(client, ADMIN_IDENTITY)
        return render(
            request,
            "login.html",
            status_code=401,
            next=target,
            error="That is not the admin token (RELAY_ADMIN_TOKEN).",
            ui_off=False,
        )
    session = session_of(request)
    assert session is not None  # an admin token means the session middleware runs
    log_in(session, csrf.new_token())
    return _redirect(target)


@router.post("/logout", response_class=HTMLResponse)
async def logout(request: Request, rt: RuntimeDep) -> Response:
    await checked_form(request, rt)
    session = session_of(request)
    if session is not None:
        log_out(session)
        flash(session, "You are signed out.", "info")
    return _redirect(f"{PREFIX}/login")


# --- outputs -----------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def outputs_page(request: Request, rt: RuntimeDep, _: Login) -> Response:
    now = utcnow()
    async with transaction(rt) as session:
        outputs = await repo.list_outputs(session)
        totals = await stats.totals_by_output(session, [o.id for o in outputs], since=now - DAY)
        hours = await stats.hourly(session, [o.id for o in outputs], now=now)
    return render(
        request,
        "outputs.html",
        outputs=outputs,
        totals=totals,
        chart=_chart(hours, "Events per hour, all outputs, last 24 hours (UTC)", "chart-all"),
    )


def _chart(hours: list[stats.HourCount], title: str, chart_id: str) -> Markup:
    bars = [Bar(h.start, h.forwarded, h.dropped) for h in hours]
    return Markup(render_chart(bars, title=title, chart_id=chart_id))  # noqa: S704 - escaped inside


def _form_values(output: Output | None) -> dict[str, str]:
    """The form's initial values: the output's settings, or the defaults for a new one."""
    if output is None:
        values = dict.fromkeys(OUTPUT_TEXT_FIELDS, "")
        values.update({k: str(v) for k, v in DEFAULTED.items()})
        values.update(enabled="on", default_rules="on")
        return values
    values = {
        name: "" if getattr(output, name) is None else str(getattr(output, name))
        for name in OUTPUT_TEXT_FIELDS
    }
    values.update(
        enabled="on" if output.enabled else "", default_rules="on" if output.default_rules else ""
    )
    return values


def _submitted(form: csrf.Form) -> dict[str, str]:
    values = {name: form.text(name) for name in OUTPUT_TEXT_FIELDS}
    values.update({name: "on" if name in form else "" for name in OUTPUT_CHECKBOXES})
    return values


def _message(field: str, error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "missing" or (kind == "string_too_short" and field in REQUIRED):
        return "Required."
    if field in FIELD_HINTS and kind.startswith("string_"):
        return FIELD_HINTS[field]
    if field == "max_event_age_hours" and kind in (
        "int_parsing",
        "int_from_float",
        "greater_than_equal",
        "less_than_equal",
    ):
        return f"Enter a whole number of hours from {MIN_AGE_HOURS} to {MAX_AGE_HOURS}."
    if kind == "string_too_long":
        return f"Use at most {error.get('ctx', {}).get('max_length', '')} characters."
    return f"{error['msg']}."


def _errors(error: ValidationError) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else "form"
        found.setdefault(field, _message(field, item))
    return found


def _validate(
    model: type[BaseModel], values: Mapping[str, Any]
) -> tuple[BaseModel | None, dict[str, str]]:
    try:
        return model.model_validate(values), {}
    except ValidationError as error:
        return None, _errors(error)


def _output_input(values: Mapping[str, str], *, creating: bool) -> dict[str, Any]:
    """Form text to API input: empty optional fields are left out (create) or cleared
    (edit); empty defaulted fields take their default."""
    data: dict[str, Any] = {}
    for name in OUTPUT_TEXT_FIELDS:
        text = values[name]
        if text:
            data[name] = text
        elif name in DEFAULTED:
            data[name] = DEFAULTED[name]
        elif name in REQUIRED:
            data[name] = "" if not creating else None
        elif not creating:
            data[name] = None  # cleared
    for name in OUTPUT_CHECKBOXES:
        data[name] = values[name] == "on"
    return {k: v for k, v in data.items() if not (creating and v is None)}


def _output_form(
    request: Request,
    *,
    output: Output | None,
    values: Mapping[str, str],
    errors: Mapping[str, str],
    status: int = 200,
) -> HTMLResponse:
    return render(
        request,
        "output_form.html",
        status_code=status,
        output=output,
        values=values,
        errors=errors,
        min_age=MIN_AGE_HOURS,
        max_age=MAX_AGE_HOURS,
    )


@router.get("/outputs/new", response_class=HTMLResponse)
async def new_output_page(request: Request, _: Login) -> Response:
    return _output_form(request, output=None, values=_form_values(None), errors={})


@router.post("/outputs", response_class=HTMLResponse)
async def create_output(request: Request, rt: RuntimeDep, _: Login) -> Response:
    form = await checked_form(request, rt)
    values = _submitted(form)
    body, errors = _validate(OutputCreate, _output_input(values, creating=True))
    if body is None:
        return _output_form(request, output=None, values=values, errors=errors, status=422)
    async with transaction(rt) as session:
        output = await repo.create_output(session, **body.model_dump(exclude_none=True))
    flash(session_of(request), f"Output “{output.name}” created. Next: Login with Amazon.")
    return _redirect(f"{PREFIX}/outputs/{quote(output.id)}")


@router.get("/outputs/{output_id}/edit", response_class=HTMLResponse)
async def edit_output_page(request: Request, output_id: str, rt: RuntimeDep, _: Login) -> Response:
    output = await _output(rt, output_id)
    return _output_form(request, output=output, values=_form_values(output), errors={})


@router.post("/outputs/{output_id}/edit", response_class=HTMLResponse)
async def update_output(request: Request, output_id: str, rt: RuntimeDep, _: Login) -> Response:
    form = await checked_form(request, rt)
    output = await _output(rt, output_id)
    values = _submitted(form)
    body, errors = _validate(OutputUpdate, _output_input(values, creating=False))
    if body is None:
        return _output_form(request, output=output, values=values, errors=errors, status=422)
    async with transaction(rt) as session:
        updated = await repo.update_output(session, output_id, body.model_dump(exclude_unset=True))
    if updated is None:
        raise NotFoundError("output")
    rt.tokens.forget(output_id)
    flash(session_of(request), "Settings saved.")
    return _redirect(f"{PREFIX}/outputs/{quote(output_id)}")


@router.get("/outputs/{output_id}", response_class=HTMLResponse)
async def output_page(
    request: Request, output_id: str, rt: RuntimeDep, _: Login, login: str | None = None
) -> Response:
    return await _output_page(request, rt, output_id, login_ok=login == "ok")


async def _output_page(
    request: Request,
    rt: Runtime,
    output_id: str,
    *,
    login_ok: bool = False,
    connection_values: Mapping[str, str] | None = None,
    connection_errors: Mapping[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    now = utcnow()
    async with transaction(rt) as session:
        output = await repo.get_output(session, output_id)
        if output is None:
            raise NotFoundError("output")
        connections = await repo.list_connections(session, output_id)
        deliveries = await repo.list_deliveries(
            session, output_id=output_id, limit=RECENT_DELIVERIES
        )
        dropped_batches = await repo.recent_dropped_batches(
            session, output_id, limit=RECENT_DROPPED_BATCHES
        )
        totals = (await stats.totals_by_output(session, [output_id], since=now - DAY))[output_id]
        reasons = await stats.drop_reasons(session, [output_id], since=now - DAY)
        hours = await stats.hourly(session, [output_id], now=now)
        waiting = await repo.count_waiting(session, output_id=output_id)
    return render(
        request,
        "output.html",
        status_code=status,
        output=output,
        connections=connections,
        deliveries=[_delivery_view(d) for d in deliveries],
        dropped_batches=[_dropped_batch_view(b, connections) for b in dropped_batches],
        totals=totals,
        reasons=reasons,
        waiting=waiting,
        login_ok=login_ok,
        lwa_ready=bool(rt.settings.lwa_client_id),
        chart=_chart(hours, f"Events per hour for {output.name}, last 24 hours (UTC)", "chart"),
        start_url=f"/oauth/amazon/start?{urlencode({'output_id': output.id})}",
        rules=_pretty(output.conversion_rules) if output.conversion_rules else "",
        connection_values=connection_values or {"source": "mparticle", "name": ""},
        connection_errors=connection_errors or {},
    )


def _dropped_batch_view(batch: DroppedBatch, connections: list[Connection]) -> dict[str, Any]:
    """A batch whose every event was dropped: it has no delivery, so the output page is
    where an operator finds it."""
    names = {c.id: c.name for c in connections}
    reasons = Counter(
        str(d.get("reason") or "unknown") for d in batch.dropped if isinstance(d, dict)
    )
    return {
        "b": batch,
        "connection": names.get(batch.connection_id or "", "deleted connection"),
        "reasons": sorted(reasons.items(), key=lambda item: (-item[1], item[0])),
    }


# --- connections -------------------------------------------------------------------------


@router.post("/outputs/{output_id}/connections", response_class=HTMLResponse)
async def create_connection(request: Request, output_id: str, rt: RuntimeDep, _: Login) -> Response:
    form = await checked_form(request, rt)
    output = await _output(rt, output_id)
    values = {
        "source": form.text("source"),
        "name": form.text("name"),
        "shared_secret": form.get("shared_secret", "") or None,
    }
    body, errors = _validate(ConnectionCreate, values)
    if not isinstance(body, ConnectionCreate):
        shown = {"source": values["source"] or "", "name": values["name"] or ""}
        return await _output_page(
            request,
            rt,
            output_id,
            connection_values=shown,
            connection_errors=errors,
            status=422,
        )
    async with transaction(rt) as session:
        created = await repo.create_connection(
            session,
            output_id=output_id,
            source=body.source,
            name=body.name,
            shared_secret=body.shared_secret,
            keyring=rt.keyring,
        )
    connection, secret = created.connection, created.secret.reveal()
    public_url = rt.settings.public_url
    return render(
        request,
        "connection_created.html",
        status_code=201,
        output=output,
        connection=connection,
        secret=secret,
        write_key=write_key(connection.key, secret),
        basic=_basic(connection.key, secret),
        basic_write_key=_basic(write_key(connection.key, secret), ""),
        public_url=public_url,
    )


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def _connection_output(rt: Runtime, connection_id: str) -> tuple[str, str]:
    async with transaction(rt) as session:
        connection = await repo.get_connection(session, connection_id)
    if connection is None:
        raise NotFoundError("connection")
    return connection.output_id, connection.name


@router.post("/connections/{connection_id}/{action}", response_class=HTMLResponse)
async def change_connection(
    request: Request, connection_id: str, action: str, rt: RuntimeDep, _: Login
) -> Response:
    if action not in ("activate", "deactivate", "delete"):
        raise NotFoundError("page")
    await checked_form(request, rt)
    output_id, name = await _connection_output(rt, connection_id)
    async with transaction(rt) as session:
        if action == "delete":
            await repo.delete_connection(session, connection_id)
        else:
            await repo.update_connection(session, connection_id, {"active": action == "activate"})
    done = {"activate": "activated", "deactivate": "deactivated", "delete": "deleted"}[action]
    flash(session_of(request), f"Connection “{name}” {done}.")
    return _redirect(f"{PREFIX}/outputs/{quote(output_id)}#connections")


@router.get("/connections/{connection_id}/delete", response_class=HTMLResponse)
async def delete_connection_page(
    request: Request, connection_id: str, rt: RuntimeDep, _: Login
) -> Response:
    async with transaction(rt) as session:
        connection = await repo.get_connection(session, connection_id)
        output = (
            None if connection is None else await repo.get_output(session, connection.output_id)
        )
    if connection is None or output is None:
        raise NotFoundError("connection")
    return render(request, "connection_delete.html", connection=connection, output=output)


# --- deliveries --------------------------------------------------------------------------


def _delivery_view(delivery: Delivery) -> dict[str, Any]:
    results = [r for r in (delivery.results or []) if isinstance(r, dict)]
    dropped = [d for d in (delivery.dropped or []) if isinstance(d, dict)]
    return {
        "d": delivery,
        "accepted": sum(1 for r in results if r.get("status") == "ok"),
        "rejected": [r for r in results if r.get("status") != "ok"],
        "results": results,
        "dropped": dropped,
        "retryable": delivery.status in RETRYABLE,
    }


@router.get("/outputs/{output_id}/deliveries", response_class=HTMLResponse)
async def deliveries_page(
    request: Request,
    output_id: str,
    rt: RuntimeDep,
    _: Login,
    status: str | None = None,
    page: int = 1,
) -> Response:
    chosen = status if status in {s.value for s in DeliveryStatus} else None
    # Past the last page is an empty page, however far past (the OFFSET stays in range).
    page = min(max(page, 1), repo.MAX_OFFSET // DELIVERIES_PAGE)
    async with transaction(rt) as session:
        output = await repo.get_output(session, output_id)
        if output is None:
            raise NotFoundError("output")
        found = await repo.list_deliveries(
            session,
            output_id=output_id,
            status=chosen,
            limit=DELIVERIES_PAGE + 1,
            offset=(page - 1) * DELIVERIES_PAGE,
        )
        counts = await repo.count_by_status(session, output_id=output_id)
    return render(
        request,
        "deliveries.html",
        output=output,
        deliveries=[_delivery_view(d) for d in found[:DELIVERIES_PAGE]],
        counts=counts,
        status=chosen,
        page=page,
        more=len(found) > DELIVERIES_PAGE,
        statuses=[s.value for s in DeliveryStatus],
    )


@router.get("/deliveries/{delivery_id}", response_class=HTMLResponse)
async def delivery_page(request: Request, delivery_id: str, rt: RuntimeDep, _: Login) -> Response:
    async with transaction(rt) as session:
        delivery = await repo.get_delivery(session, delivery_id)
        output = None if delivery is None else await repo.get_output(session, delivery.output_id)
    if delivery is None or output is None:
        raise NotFoundError("delivery")
    try:
        body = _pretty(jsonutil.loads(delivery.body))
    except jsonutil.InvalidJSONError:
        body = delivery.body.decode("utf-8", "replace")
    return render(
        request,
        "delivery.html",
        output=output,
        view=_delivery_view(delivery),
        body=body,
        index_map=delivery.index_map,
    )


@router.post("/deliveries/{delivery_id}/retry", response_class=HTMLResponse)
async def retry_delivery(request: Request, delivery_id: str, rt: RuntimeDep, _: Login) -> Response:
    form = await checked_form(request, rt)
    async with transaction(rt) as session:
        existing = await repo.get_delivery(session, delivery_id)
        if existing is None:
            raise NotFoundError("delivery")
        retried = await repo.retry(session, delivery_id)
    if retried is None:
        flash(
            session_of(request),
            f"Delivery is {existing.status}: only failed or dead deliveries can be retried.",
            "error",
        )
    else:
        rt.dispatcher.wake()
        flash(session_of(request), "Delivery queued again; it is sent shortly.")
    back = _safe_next(form.get("back") or f"{PREFIX}/deliveries/{delivery_id}")
    return _redirect(back)


# --- preview -----------------------------------------------------------------------------


def _sample(source: str) -> str:
    name = SAMPLES.get(source)
    if name is None:
        return ""
    text = resources.files("app.samples").joinpath(name).read_text(encoding="utf-8")
    now = utcnow()
    now_ms = int(now.timestamp() * 1000)
    return (
        text.replace("{{now_ms}}", str(now_ms))
        .replace("{{old_ms}}", str(now_ms - 3 * 86_400_000))
        .replace("{{now_iso}}", now.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    )


@router.get("/outputs/{output_id}/preview", response_class=HTMLResponse)
async def preview_page(
    request: Request, output_id: str, rt: RuntimeDep, _: Login, sample: str | None = None
) -> Response:
    output = await _output(rt, output_id)
    source = sample if sample in SOURCES else "mparticle"
    return render(
        request,
        "preview.html",
        output=output,
        source=source,
        payload=_sample(sample) if sample else "",
        result=None,
        error=None,
        samples=tuple(SAMPLES),
    )


@router.post("/outputs/{output_id}/preview", response_class=HTMLResponse)
async def preview(request: Request, output_id: str, rt: RuntimeDep, _: Login) -> Response:
    form = await checked_form(request, rt)
    output = await _output(rt, output_id)
    source = form.text("source")
    payload = form.get("payload", "")
    result: dict[str, Any] | None = None
    error: str | None = None
    if source not in SOURCES:
        error = f"Choose a source: {', '.join(SOURCES)}."
        source = "mparticle"
    elif not payload.strip():
        error = "Paste a batch to preview."
    else:
        try:
            mapped = map_payload(
                source, payload.encode("utf-8"), settings=settings_for(output, ""), now=utcnow()
            )
        except RelayError as failure:
            error = failure.message
        else:
            result = {
                "requests": [_pretty(r) for r in mapped.requests],
                "dropped": [d.as_dict() for d in mapped.dropped],
                "forwarded": mapped.forwarded,
            }
    return render(
        request,
        "preview.html",
        status_code=200 if error is None else 422,
        output=output,
        source=source,
        payload=payload,
        result=result,
        error=error,
        samples=tuple(SAMPLES),
    )
