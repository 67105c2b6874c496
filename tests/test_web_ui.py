"""The web UI over HTTP (httpx against the ASGI app): login, CSRF, forms, pages, chart, stats.

Every test that touches storage runs on SQLite and PostgreSQL (the ``database_url``
fixture). The real-browser path is tests/test_browser.py.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request

from app import jsonutil
from app.config import Settings, isolated_settings
from app.db import repository as repo
from app.db import stats
from app.db.models import DeliveryStatus, OutputStatus
from app.main import create_app
from app.runtime import Runtime
from app.web.chart import Bar, nice_ceiling, render_chart
from app.web.routes import CONTENT_SECURITY_POLICY
from app.web.session import (
    SESSION_SECONDS,
    log_in,
    logged_in,
    session_secret,
    uses_session,
)

TOKEN = "admin-token-for-tests-0123456789"
BASE = "http://relay.test"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


# --- fixtures and helpers ------------------------------------------------------------------


def relay_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "key_file": tmp_path / "relay.key",
        "admin_token": TOKEN,
        "public_url": BASE,
        "lwa_client_id": "client-id",
        "lwa_client_secret": "client-secret",
        "amazon_api_url": "http://amazon.invalid",
        "lwa_authorize_url": "http://amazon.invalid/ap/oa",
        "lwa_token_url": "http://amazon.invalid/auth/o2/token",
    }
    return isolated_settings(**(values | overrides))


@dataclass
class UI:
    client: httpx.AsyncClient
    runtime: Runtime

    async def csrf(self, path: str = "/ui/outputs/new") -> str:
        page = await self.client.get(path)
        found = CSRF.search(page.text)
        assert found, f"no CSRF field on {path}: {page.status_code}"
        return found.group(1)

    async def login(self) -> None:
        token = await self.csrf("/ui/login")
        answer = await self.client.post(
            "/ui/login", data={"csrf_token": token, "password": TOKEN, "next": "/ui/"}
        )
        assert answer.status_code == 303, answer.text
        assert answer.headers["location"] == "/ui/"

    async def post(self, path: str, data: dict[str, str]) -> httpx.Response:
        return await self.client.post(path, data={"csrf_token": await self.csrf(), **data})

    async def create_output(self, **fields: str) -> str:
        data = {
            "name": "Web shop",
            "advertiser_id": "1234567890",
            "region": "NA",
            "match_keys": "standard",
            "consent_mode": "forward",
            "enabled": "on",
            "default_rules": "on",
        } | fields
        answer = await self.post("/ui/outputs", data)
        assert answer.status_code == 303, answer.text
        location = answer.headers["location"]
        assert location.startswith("/ui/outputs/out_")
        return location.rsplit("/", 1)[1]

    async def create_connection(self, output_id: str, **fields: str) -> dict[str, str]:
        answer = await self.post(
            f"/ui/outputs/{output_id}/connections",
            {"source": "mparticle", "name": "web site"} | fields,
        )
        assert answer.status_code == 201, answer.text
        return {
            "html": answer.text,
            "key": _code(answer.text, "connection-key"),
            "secret": _code(answer.text, "connection-secret"),
        }

    async def db(self) -> AsyncSession:
        return self.runtime.sessionmaker()


def _code(page: str, element_id: str) -> str:
    found = re.search(rf'<code id="{element_id}"[^>]*>([^<]+)</code>', page)
    assert found, f"no #{element_id}"
    return found.group(1)


async def _serve(settings: Settings) -> AsyncIterator[UI]:
    app = create_app(settings, dispatcher=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=settings.public_url
        ) as client,
    ):
        yield UI(client=client, runtime=app.state.runtime)


@pytest.fixture
async def ui(database_url: str, tmp_path: Path) -> AsyncIterator[UI]:
    async for served in _serve(relay_settings(database_url, tmp_path)):
        yield served


@pytest.fixture
async def admin(ui: UI) -> UI:
    await ui.login()
    return ui


def sample_batch() -> str:
    text = resources.files("app.samples").joinpath("mparticle_batch.json").read_text("utf-8")
    now_ms = int(time.time() * 1000)
    return (
        text.replace("{{now_ms}}", str(now_ms))
        .replace("{{old_ms}}", str(now_ms - 3 * 86_400_000))
        .replace("{{now_iso}}", time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
    )


class _Controls(HTMLParser):
    """Form controls and labels of a page, for the label check."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.labelled: set[str] = set()
        self.inline_scripts = 0
        self.style_attributes = 0
        self.html_lang: str | None = None
        self.landmarks: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if "style" in attributes:
            self.style_attributes += 1
        if tag == "html":
            self.html_lang = attributes.get("lang")
        if tag in ("main", "header", "nav", "footer"):
            self.landmarks.add(tag)
        if tag == "script" and not attributes.get("src"):
            self.inline_scripts += 1
        if tag == "label" and attributes.get("for"):
            self.labelled.add(str(attributes["for"]))
        if tag in ("input", "select", "textarea") and attributes.get("type") not in (
            "hidden",
            "submit",
        ):
            self.controls.append(attributes)


def check_page(html: str) -> _Controls:
    """Accessibility and CSP basics every page must meet."""
    page = _Controls()
    page.feed(html)
    assert page.html_lang == "en"
    assert {"main", "header", "footer"} <= page.landmarks
    assert page.inline_scripts == 0
    assert page.style_attributes == 0  # style-src 'self' would block them
    for control in page.controls:
        assert control.get("id") in page.labelled, f"control without a label: {control}"
    return page


# --- login, session, headers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/ui/",
        "/ui/outputs/new",
        "/ui/outputs/out_x",
        "/ui/outputs/out_x/deliveries",
        "/ui/deliveries/dlv_x",
    ],
)
async def test_pages_need_login(ui: UI, path: str) -> None:
    answer = await ui.client.get(path)
    assert answer.status_code == 303
    target = urlsplit(answer.headers["location"])
    assert target.path == "/ui/login"
    assert parse_qs(target.query)["next"] == [path]


async def test_posts_need_login_and_change_nothing(ui: UI) -> None:
    token = await ui.csrf("/ui/login")  # a session, but not logged in
    answer = await ui.client.post("/ui/outputs", data={"csrf_token": token, "name": "x"})
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/ui/login")
    async with await ui.db() as session:
        assert await repo.list_outputs(session) == []


async def test_login_page_and_cookie_flags(ui: UI) -> None:
    page = await ui.client.get("/ui/login")
    assert page.status_code == 200
    check_page(page.text)
    cookie = page.headers["set-cookie"].lower()
    assert cookie.startswith("relay_ui=")
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "secure" not in cookie  # RELAY_PUBLIC_URL is http here
    assert "path=/" in cookie


async def test_wrong_password_is_refused(ui: UI) -> None:
    token = await ui.csrf("/ui/login")
    answer = await ui.client.post("/ui/login", data={"csrf_token": token, "password": "nope"})
    assert answer.status_code == 401
    assert "not the admin token" in answer.text
    assert 'aria-invalid="true"' in answer.text
    assert (await ui.client.get("/ui/")).status_code == 303


async def test_login_then_logout(ui: UI) -> None:
    await ui.login()
    home = await ui.client.get("/ui/")
    assert home.status_code == 200
    assert "Outputs" in home.text
    token = CSRF.search(home.text)
    assert token
    answer = await ui.client.post("/ui/logout", data={"csrf_token": token.group(1)})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login"
    assert (await ui.client.get("/ui/")).status_code == 303


async def test_login_redirects_only_to_ui_pages(ui: UI) -> None:
    for target, expected in (
        ("/ui/outputs/new", "/ui/outputs/new"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/", "/ui/"),
        ("/v1/outputs", "/ui/"),
    ):
        ui.client.cookies.clear()
        token = await ui.csrf("/ui/login")
        answer = await ui.client.post(
            "/ui/login", data={"csrf_token": token, "password": TOKEN, "next": target}
        )
        assert answer.headers["location"] == expected


async def test_login_is_rate_limited(ui: UI) -> None:
    token = await ui.csrf("/ui/login")
    statuses = [
        (await ui.client.post("/ui/login", data={"csrf_token": token, "password": "x"})).status_code
        for _ in range(21)
    ]
    assert statuses[:20] == [401] * 20
    assert statuses[20] == 429


async def test_security_headers_on_pages(admin: UI) -> None:
    page = await admin.client.get("/ui/")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    css = await admin.client.get("/ui/static/app.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "set-cookie" not in css.headers
    script = await admin.client.get("/ui/static/copy.js")
    assert script.status_code == 200


async def test_admin_api_ignores_the_ui_cookie(admin: UI) -> None:
    assert (await admin.client.get("/ui/")).status_code == 200
    assert (await admin.client.get("/v1/outputs")).status_code == 401
    bearer = await admin.client.get("/v1/outputs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200


async def test_https_cookie_is_secure_and_host_prefixed(database_url: str, tmp_path: Path) -> None:
    settings = relay_settings(database_url, tmp_path, public_url="https://relay.test")
    async for served in _serve(settings):
        page = await served.client.get("/ui/login")
        cookie = page.headers["set-cookie"].lower()
        assert cookie.startswith("__host-relay_ui=")
        assert "; secure" in cookie
        assert "httponly" in cookie
        assert "samesite=lax" in cookie
        assert "domain=" not in cookie
        await served.login()
        assert (await served.client.get("/ui/")).status_code == 200


async def test_session_is_accepted_by_another_process(database_url: str, tmp_path: Path) -> None:
    """The signing key comes from the admin token: replicas share sessions, a new token
    signs everyone out."""
    assert session_secret(TOKEN) == session_secret(TOKEN)
    assert session_secret(TOKEN) != session_secret(TOKEN + "x")
    cookies = httpx.Cookies()
    async for first in _serve(relay_settings(database_url, tmp_path)):
        await first.login()
        cookies = httpx.Cookies(first.client.cookies)
    assert cookies
    async for second in _serve(relay_settings(database_url, tmp_path)):
        second.client.cookies = cookies
        assert (await second.client.get("/ui/")).status_code == 200
    other = relay_settings(database_url, tmp_path, admin_token=TOKEN + "-rotated")
    async for third in _serve(other):
        third.client.cookies = cookies
        assert (await third.client.get("/ui/")).status_code == 303


async def test_ui_is_off_without_admin_token(database_url: str, tmp_path: Path) -> None:
    settings = relay_settings(database_url, tmp_path, admin_token=None)
    async for served in _serve(settings):
        page = await served.client.get("/ui/login")
        assert page.status_code == 200
        assert "RELAY_ADMIN_TOKEN" in page.text
        assert "set-cookie" not in page.headers
        answer = await served.client.post("/ui/login", data={"password": "", "csrf_token": ""})
        assert answer.status_code == 503
        assert (await served.client.get("/ui/")).status_code == 303


def test_session_expires_after_its_lifetime() -> None:
    session: dict[str, Any] = {}
    log_in(session, "token", now=1000.0)
    request = Request({"type": "http", "session": session})
    assert logged_in(request, now=1000.0 + SESSION_SECONDS - 1)
    assert not logged_in(request, now=1000.0 + SESSION_SECONDS)
    assert not logged_in(Request({"type": "http", "session": {"admin": "yes"}}), now=0)
    assert not logged_in(Request({"type": "http"}))


def test_session_paths() -> None:
    assert uses_session("/ui")
    assert uses_session("/ui/outputs/x")
    assert uses_session("/oauth/amazon/start")
    assert not uses_session("/ui/static/app.css")
    assert not uses_session("/v1/outputs")
    assert not uses_session("/v2/events")
    assert not uses_session("/uix")


# --- CSRF ----------------------------------------------------------------------------------


async def test_csrf_token_missing_or_wrong_is_403(admin: UI) -> None:
    fields = {"name": "Forged", "advertiser_id": "1", "region": "NA"}
    missing = await admin.client.post("/ui/outputs", data=fields)
    assert missing.status_code == 403
    assert "security token" in missing.text
    wrong = await admin.client.post("/ui/outputs", data={**fields, "csrf_token": "x" * 43})
    assert wrong.status_code == 403
    async with await admin.db() as session:
        assert await repo.list_outputs(session) == []


async def test_csrf_cross_origin_is_403_even_with_the_token(admin: UI) -> None:
    token = await admin.csrf()
    fields = {"csrf_token": token, "name": "Forged", "advertiser_id": "1"}
    foreign = await admin.client.post(
        "/ui/outputs", data=fields, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    cross = await admin.client.post(
        "/ui/outputs", data=fields, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert cross.status_code == 403
    sibling = await admin.client.post(
        "/ui/outputs", data=fields, headers={"Sec-Fetch-Site": "same-site"}
    )
    assert sibling.status_code == 403
    async with await admin.db() as session:
        assert await repo.list_outputs(session) == []
    same = await admin.client.post(
        "/ui/outputs", data=fields, headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"}
    )
    assert same.status_code == 303
    # Referrer-Policy: no-referrer makes browsers send "Origin: null" on our own forms.
    blank = await admin.client.post("/ui/outputs", data=fields, headers={"Origin": "null"})
    assert blank.status_code == 303


async def test_every_state_changing_form_checks_csrf(admin: UI) -> None:
    output_id = await admin.create_output()
    await admin.create_connection(output_id)
    page = await admin.client.get(f"/ui/outputs/{output_id}")
    connection_id = re.search(r"/ui/connections/(con_[a-z0-9]+)/deactivate", page.text)
    assert connection_id
    for path in (
        "/ui/login",
        "/ui/logout",
        "/ui/outputs",
        f"/ui/outputs/{output_id}/edit",
        f"/ui/outputs/{output_id}/connections",
        f"/ui/outputs/{output_id}/preview",
        f"/ui/connections/{connection_id.group(1)}/deactivate",
        f"/ui/connections/{connection_id.group(1)}/delete",
        "/ui/deliveries/dlv_none/retry",
    ):
        answer = await admin.client.post(path, data={"csrf_token": "wrong"})
        assert answer.status_code == 403, path
    assert (await admin.client.get("/ui/")).status_code == 200  # still logged in


async def test_login_form_checks_csrf(ui: UI) -> None:
    answer = await ui.client.post("/ui/login", data={"password": TOKEN})
    assert answer.status_code == 403
    assert (await ui.client.get("/ui/")).status_code == 303


async def test_forms_must_be_urlencoded(admin: UI) -> None:
    answer = await admin.client.post("/ui/outputs", json={"name": "x"})
    assert answer.status_code == 415


# --- outputs -------------------------------------------------------------------------------


async def test_output_form_shows_validation_messages_next_to_fields(admin: UI) -> None:
    answer = await admin.post(
        "/ui/outputs",
        {
            "name": "",
            "advertiser_id": "12ab",
            "data_set_name": "1bad",
            "max_event_age_hours": "999",
            "region": "NA",
            "match_keys": "standard",
            "consent_mode": "forward",
        },
    )
    assert answer.status_code == 422
    page = check_page(answer.text)
    assert any(c.get("id") == "name" for c in page.controls)
    errors = dict(
        re.findall(
            r'<p class="error-message" id="([a-z_]+)-error">'
            r'<span class="visually-hidden">Error:</span> ([^<]+)</p>',
            answer.text,
        )
    )
    assert errors == {
        "name": "Required.",
        "advertiser_id": "Enter digits only (the Amazon Ads advertiser id).",
        "data_set_name": "Use 5 to 100 characters: a letter first, then letters, digits, _ or -.",
        "max_event_age_hours": "Enter a whole number of hours from 1 to 504.",
    }
    assert 'aria-describedby="advertiser_id-hint advertiser_id-error"' in answer.text
    assert 'value="12ab"' in answer.text  # what was typed is kept
    assert 'href="#advertiser_id"' in answer.text  # the error summary links to the field
    async with await admin.db() as session:
        assert await repo.list_outputs(session) == []


async def test_create_output_and_see_it(admin: UI) -> None:
    form = await admin.client.get("/ui/outputs/new")
    assert form.status_code == 200
    check_page(form.text)
    for label in ("Configuration Name", "Advertiser ID", "Data Set Name", "Partner Name", "Region"):
        assert f">{label}" in form.text
    output_id = await admin.create_output(
        data_set_name="web_purchases", partner_name="acme", region="EU", max_event_age_hours="48"
    )
    page = await admin.client.get(f"/ui/outputs/{output_id}")
    assert page.status_code == 200
    check_page(page.text)
    assert "created. Next: Login with Amazon." in page.text  # the flash message
    assert "Needs Login with Amazon" in page.text
    assert f'href="/oauth/amazon/start?output_id={output_id}"' in page.text
    assert ">Login with Amazon</a>" in page.text
    assert "Re-authorize" not in page.text
    async with await admin.db() as session:
        output = await repo.get_output(session, output_id)
    assert output is not None
    assert (output.name, output.region, output.data_set_name) == ("Web shop", "EU", "web_purchases")
    assert (output.max_event_age_hours, output.partner_name, output.status) == (
        48,
        "acme",
        "needs_login",
    )
    listing = await admin.client.get("/ui/")
    check_page(listing.text)
    assert "Web shop" in listing.text
    assert "1234567890" in listing.text
    assert "Needs Login with Amazon" in listing.text


async def test_edit_output(admin: UI) -> None:
    output_id = await admin.create_output(data_set_name="web_purchases")
    form = await admin.client.get(f"/ui/outputs/{output_id}/edit")
    check_page(form.text)
    assert 'value="web_purchases"' in form.text
    answer = await admin.post(
        f"/ui/outputs/{output_id}/edit",
        {
            "name": "Renamed",
            "advertiser_id": "42",
            "data_set_name": "",
            "region": "FE",
            "max_event_age_hours": "",
            "match_keys": "extended",
            "consent_mode": "require_granted",
            "consent_purpose_user_data": "ads",
            "default_rules": "on",
        },
    )
    assert answer.status_code == 303
    async with await admin.db() as session:
        output = await repo.get_output(session, output_id)
    assert output is not None
    assert output.name == "Renamed"
    assert output.advertiser_id == "42"
    assert output.data_set_name is None  # cleared
    assert output.region == "FE"
    assert output.max_event_age_hours == 24
    assert output.match_keys == "extended"
    assert output.consent_mode == "require_granted"
    assert output.consent_purpose_user_data == "ads"
    assert output.enabled is False  # the checkbox was not sent
    bad = await admin.post(f"/ui/outputs/{output_id}/edit", {"name": "", "advertiser_id": "42"})
    assert bad.status_code == 422
    assert "Required." in bad.text
    missing = await admin.client.get("/ui/outputs/out_missing/edit")
    assert missing.status_code == 404


async def test_status_drives_the_login_buttons(admin: UI) -> None:
    output_id = await admin.create_output()
    async with await admin.db() as session, session.begin():
        await repo.set_status(session, output_id, OutputStatus.NEEDS_REAUTH)
    page = await admin.client.get(f"/ui/outputs/{output_id}")
    assert ">Re-authorize</a>" in page.text
    assert "Needs re-authorization" in page.text
    assert f'href="/oauth/amazon/start?output_id={output_id}"' in page.text
    async with await admin.db() as session, session.begin():
        await repo.set_status(session, output_id, OutputStatus.CONFIGURED)
    page = await admin.client.get(f"/ui/outputs/{output_id}?login=ok")
    assert "Login with Amazon completed" in page.text
    assert ">Configured<" in page.text
    assert "Re-authorize" not in page.text


async def test_login_with_amazon_start_takes_the_ui_session(admin: UI) -> None:
    output_id = await admin.create_output(region="EU")
    start = await admin.client.get("/oauth/amazon/start", params={"output_id": output_id})
    assert start.status_code == 302
    target = urlsplit(start.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == "http://amazon.invalid/ap/oa"
    assert parse_qs(target.query)["redirect_uri"] == [f"{BASE}/oauth/amazon/callback"]
    admin.client.cookies.clear()
    refused = await admin.client.get("/oauth/amazon/start", params={"output_id": output_id})
    assert refused.status_code == 401


async def test_unknown_pages_are_404(admin: UI) -> None:
    for path in ("/ui/outputs/out_none", "/ui/deliveries/dlv_none", "/ui/connections/x/delete"):
        answer = await admin.client.get(path)
        assert answer.status_code == 404, path
        check_page(answer.text)
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    output_id = await admin.create_output()
    bad = await admin.client.get(f"/ui/outputs/{output_id}/deliveries?page=two")
    assert bad.status_code == 400
    assert bad.headers["content-type"].startswith("text/html")


# --- connections ---------------------------------------------------------------------------


async def test_connection_secret_is_shown_once_and_works(admin: UI) -> None:
    output_id = await admin.create_output()
    created = await admin.create_connection(output_id)
    page, key, secret = created["html"], created["key"], created["secret"]
    check_page(page)
    assert key.startswith("rk_")
    assert len(secret) >= 20
    assert f"{BASE}/v2/events" in page
    basic = base64.b64encode(f"{key}:{secret}".encode()).decode()
    assert f"Authorization: Basic {basic}" in page
    assert 'data-copy="connection-secret"' in page
    assert "shown only on this page" in page
    output_page = await admin.client.get(f"/ui/outputs/{output_id}")
    assert key in output_page.text
    assert secret not in output_page.text
    async with await admin.db() as session:
        connections = await repo.list_connections(session, output_id)
    assert [c.key for c in connections] == [key]
    assert secret not in connections[0].secret_hash
    answer = await admin.client.post(
        "/v2/events",
        content=sample_batch(),
        auth=(key, secret),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 2


async def test_segment_connection_shows_the_write_key(admin: UI) -> None:
    output_id = await admin.create_output()
    created = await admin.create_connection(
        output_id, source="segment", name="rudder", shared_secret="signing-secret"
    )
    page, key, secret = created["html"], created["key"], created["secret"]
    assert _code(page, "connection-write-key") == f"{key}.{secret}"
    assert f"{BASE}/v1/batch" in page
    basic = base64.b64encode(f"{key}.{secret}:".encode()).decode()
    assert f"Authorization: Basic {basic}" in page
    assert "X-Signature" in page


async def test_a_nul_character_in_a_form_is_a_validation_message(admin: UI) -> None:
    """PostgreSQL's text cannot hold U+0000: the form says so instead of a 503 page."""
    answer = await admin.post(
        "/ui/outputs",
        {
            "name": "Web\x00shop",
            "advertiser_id": "123",
            "region": "NA",
            "match_keys": "standard",
            "consent_mode": "forward",
        },
    )
    assert answer.status_code == 422
    assert "NUL character" in answer.text
    async with await admin.db() as session:
        assert await repo.list_outputs(session) == []


async def test_connection_form_validation(admin: UI) -> None:
    output_id = await admin.create_output()
    answer = await admin.post(
        f"/ui/outputs/{output_id}/connections",
        {"source": "kafka", "name": "", "shared_secret": "short"},
    )
    assert answer.status_code == 422
    check_page(answer.text)
    assert 'id="source-error"' in answer.text
    assert 'id="name-error"' in answer.text
    assert 'id="shared_secret-error"' in answer.text
    assert "short" not in re.sub(r"<p class=\"error-message\".*?</p>", "", answer.text)
    async with await admin.db() as session:
        assert await repo.list_connections(session, output_id) == []


async def test_connection_deactivate_activate_delete(admin: UI) -> None:
    output_id = await admin.create_output()
    created = await admin.create_connection(output_id, name="ios app")
    auth = (created["key"], created["secret"])
    page = await admin.client.get(f"/ui/outputs/{output_id}")
    found = re.search(r"/ui/connections/(con_[a-z0-9]+)/deactivate", page.text)
    assert found
    connection_id = found.group(1)

    answer = await admin.post(f"/ui/connections/{connection_id}/deactivate", {})
    assert answer.status_code == 303
    page = await admin.client.get(answer.headers["location"])
    assert "Connection “ios app” deactivated." in page.text
    assert ">inactive<" in page.text
    refused = await admin.client.post("/v2/events", content=sample_batch(), auth=auth)
    assert refused.status_code == 403

    assert (await admin.post(f"/ui/connections/{connection_id}/activate", {})).status_code == 303
    accepted = await admin.client.post("/v2/events", content=sample_batch(), auth=auth)
    assert accepted.status_code == 202

    confirm = await admin.client.get(f"/ui/connections/{connection_id}/delete")
    assert confirm.status_code == 200
    assert "Delete connection “ios app”?" in confirm.text
    assert (await admin.post(f"/ui/connections/{connection_id}/delete", {})).status_code == 303
    async with await admin.db() as session:
        assert await repo.get_connection(session, connection_id) is None
    assert (await admin.post(f"/ui/connections/{connection_id}/delete", {})).status_code == 404
    assert (await admin.post(f"/ui/connections/{connection_id}/rename", {})).status_code == 404


# --- deliveries and preview ----------------------------------------------------------------


async def _queue_batch(ui: UI, output_id: str) -> str:
    created = await ui.create_connection(output_id)
    answer = await ui.client.post(
        "/v2/events",
        content=sample_batch(),
        auth=(created["key"], created["secret"]),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 202, answer.text
    (delivery_id,) = answer.json()["deliveries"]
    return str(delivery_id)


async def test_deliveries_show_results_drops_and_retry(admin: UI) -> None:
    output_id = await admin.create_output()
    first = await _queue_batch(admin, output_id)
    second = await _queue_batch(admin, output_id)
    now = datetime.now(UTC)
    async with await admin.db() as session, session.begin():
        await repo.set_status(session, output_id, OutputStatus.CONFIGURED)
        claimed = await repo.claim_due(session, "worker", 10, now, 60)
        assert {d.id for d in claimed} == {first, second}
        await repo.complete(
            session,
            first,
            worker_id="worker",
            now=now,
            status=DeliveryStatus.PARTIAL,
            status_code=207,
            results=[
                {"index": 0, "status": "ok"},
                {
                    "index": 1,
                    "status": "rejected",
                    "code": "INVALID_MATCH_KEY",
                    "message": "hashed email is malformed",
                },
            ],
        )
        await repo.mark_dead(
            session, second, now=now, worker_id="worker", status_code=503, error="gave up"
        )
    page = await admin.client.get(f"/ui/outputs/{output_id}/deliveries")
    assert page.status_code == 200
    check_page(page.text)
    assert "1 accepted" in page.text
    assert "1 rejected" in page.text
    assert "INVALID_MATCH_KEY" in page.text
    assert "hashed email is malformed" in page.text
    assert "not_commerce_event" in page.text
    assert "too_old" in page.text
    assert page.text.count('/retry" class="inline"') == 1  # only the dead one
    assert f"/ui/deliveries/{second}/retry" in page.text

    far = await admin.client.get(f"/ui/outputs/{output_id}/deliveries?page={10**30}")
    assert far.status_code == 200  # past the last page: an empty page, not a 500
    assert first not in far.text

    only_dead = await admin.client.get(f"/ui/outputs/{output_id}/deliveries?status=dead")
    assert second in only_dead.text
    assert first not in only_dead.text

    detail = await admin.client.get(f"/ui/deliveries/{first}")
    assert detail.status_code == 200
    check_page(detail.text)
    assert "Request body sent to Amazon" in detail.text
    assert "&#34;events&#34;" in detail.text or "&quot;events&quot;" in detail.text
    assert "INVALID_MATCH_KEY" in detail.text
    assert "/retry" not in detail.text  # partial is final, not retryable

    retried = await admin.post(
        f"/ui/deliveries/{second}/retry", {"back": f"/ui/outputs/{output_id}/deliveries"}
    )
    assert retried.status_code == 303
    assert retried.headers["location"] == f"/ui/outputs/{output_id}/deliveries"
    after = await admin.client.get(retried.headers["location"])
    assert "Delivery queued again" in after.text
    async with await admin.db() as session:
        delivery = await repo.get_delivery(session, second)
    assert delivery is not None
    assert delivery.status == "pending"
    again = await admin.post(f"/ui/deliveries/{second}/retry", {})
    assert again.status_code == 303
    assert "only failed or dead" in (await admin.client.get(again.headers["location"])).text


async def test_output_page_counts_and_chart(admin: UI) -> None:
    output_id = await admin.create_output()
    await _queue_batch(admin, output_id)
    page = await admin.client.get(f"/ui/outputs/{output_id}")
    check_page(page.text)
    stats_text = re.sub(r"\s+", " ", page.text)
    assert '<span class="stat-value">2</span> events forwarded' in stats_text
    assert '<span class="stat-value">2</span> events dropped' in stats_text
    assert "<svg" in page.text
    assert 'role="img"' in page.text
    assert "Drop reasons, last 24 hours" in page.text
    listing = await admin.client.get("/ui/")
    cells = re.findall(r'<td class="num">(\d+)</td>', listing.text)
    assert cells == ["2", "2"]


def all_dropped_batch() -> str:
    """The sample batch with only its two events that are never forwarded."""
    batch = jsonutil.loads(sample_batch())
    batch["events"] = batch["events"][2:]  # a custom event and a purchase 3 days old
    return jsonutil.dumps(batch).decode()


async def test_output_page_counts_and_lists_a_batch_whose_every_event_was_dropped(
    admin: UI,
) -> None:
    output_id = await admin.create_output()
    created = await admin.create_connection(output_id)
    answer = await admin.client.post(
        "/v2/events",
        content=all_dropped_batch(),
        auth=(created["key"], created["secret"]),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json() == {
        "accepted": 0,
        "dropped": [
            {"index": 0, "reason": "not_commerce_event"},
            {"index": 1, "reason": "too_old"},
        ],
        "deliveries": [],
    }
    page = await admin.client.get(f"/ui/outputs/{output_id}")
    check_page(page.text)
    flat = re.sub(r"\s+", " ", page.text)
    assert '<span class="stat-value">0</span> events forwarded' in flat
    assert '<span class="stat-value">2</span> events dropped' in flat
    assert '<span class="stat-value">0</span> Amazon requests' in flat
    assert "0 event(s) forwarded and 2 dropped in 24 hour(s)" in page.text
    reasons = flat.split('id="reasons-caption"', 1)[1].split("</table>", 1)[0]
    assert '<code>not_commerce_event</code></th><td class="num">1</td>' in reasons
    assert '<code>too_old</code></th><td class="num">1</td>' in reasons
    # No delivery to show, but the batch is listed with its connection and reasons.
    assert "No deliveries yet." in flat
    listed = flat.split('id="dropped-batches-caption"', 1)[1].split("</table>", 1)[0]
    assert listed.count("<tr>") == 2  # the header and the batch
    assert "web site" in listed
    assert '<td class="num">2</td>' in listed
    assert "<code>not_commerce_event</code>: 1" in listed
    assert "<code>too_old</code>: 1" in listed
    listing = await admin.client.get("/ui/")
    assert re.findall(r'<td class="num">(\d+)</td>', listing.text) == ["0", "2"]


async def test_preview_maps_a_pasted_batch(admin: UI) -> None:
    output_id = await admin.create_output()
    form = await admin.client.get(f"/ui/outputs/{output_id}/preview?sample=mparticle")
    assert form.status_code == 200
    check_page(form.text)
    assert "&#34;events&#34;" in form.text  # the sample is in the textarea
    answer = await admin.post(
        f"/ui/outputs/{output_id}/preview", {"source": "mparticle", "payload": sample_batch()}
    )
    assert answer.status_code == 200
    check_page(answer.text)
    assert "Result: 2 events in 1 request, 2 dropped" in answer.text
    assert "Amazon request 1" in answer.text
    assert "OFF_AMAZON_PURCHASES" in answer.text
    bad = await admin.post(
        f"/ui/outputs/{output_id}/preview", {"source": "mparticle", "payload": "{not json"}
    )
    assert bad.status_code == 422
    assert 'id="payload-error"' in bad.text
    empty = await admin.post(f"/ui/outputs/{output_id}/preview", {"source": "segment"})
    assert "Paste a batch" in empty.text
    async with await admin.db() as session:
        assert await repo.list_deliveries(session, output_id=output_id) == []


# --- chart (pure) --------------------------------------------------------------------------


def _bars(counts: list[tuple[int, int]]) -> list[Bar]:
    start = datetime(2025, 6, 1, tzinfo=UTC)
    return [Bar(start + timedelta(hours=i), f, d) for i, (f, d) in enumerate(counts)]


def test_chart_is_an_accessible_svg() -> None:
    svg = render_chart(_bars([(10, 1), (0, 0), (4, 0)]), title="Events <per> hour", chart_id="c")
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert svg.endswith("</svg>")
    assert 'role="img"' in svg
    assert 'aria-labelledby="c-title c-desc"' in svg
    assert '<title id="c-title">Events &lt;per&gt; hour</title>' in svg
    assert "14 event(s) forwarded and 1 dropped in 3 hour(s), UTC 00:00 to 02:00" in svg
    assert svg.count('class="chart-forwarded" x=') == 3  # 2 bars + the legend swatch
    assert svg.count('class="chart-dropped" x=') == 2  # 1 bar + the legend swatch
    assert "<title>00:00 UTC: 10 forwarded</title>" in svg
    assert "style=" not in svg
    assert "<script" not in svg


def test_chart_scales_bars_to_a_nice_maximum() -> None:
    svg = render_chart(_bars([(50, 0), (100, 0)]), title="t")
    heights = [float(h) for h in re.findall(r'class="chart-forwarded"[^>]*height="([\d.]+)"', svg)]
    assert heights[:2] == [92.0, 184.0]  # the plot is 184 high and the top is 100
    assert ">100</text>" in svg
    assert ">50</text>" in svg


def test_chart_without_events() -> None:
    svg = render_chart(_bars([(0, 0)] * 24), title="t")
    assert svg.count("<rect") == 2  # the legend only
    assert "0 event(s) forwarded and 0 dropped in 24 hour(s)" in svg
    assert render_chart([], title="empty").endswith("</svg>")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 1), (1, 1), (2, 2), (3, 5), (7, 10), (10, 10), (11, 20), (250, 500), (999, 1000)],
)
def test_nice_ceiling(value: int, expected: int) -> None:
    assert nice_ceiling(value) == expected


# --- stats (app/db/stats.py) ---------------------------------------------------------------


async def _batch(
    session: AsyncSession, output_id: str, at: datetime, events: int, dropped: list[Any] | None
) -> None:
    """One inbound batch as ingest stores it: a delivery keeping the drops if any event
    was forwarded, else a dropped-batch row."""
    if events:
        item = repo.NewDelivery(
            output_id=output_id,
            source="mparticle",
            body=b'{"events": []}',
            index_map=list(range(events)),
            dropped=dropped,
        )
        await repo.insert_deliveries(session, [item], now=at)
    elif dropped:
        await repo.record_dropped_batch(
            session, output_id=output_id, source="mparticle", dropped=dropped, now=at
        )


async def test_stats_totals_hours_and_reasons(session: AsyncSession) -> None:
    now = datetime(2025, 6, 2, 12, 30, tzinfo=UTC)
    one = await repo.create_output(session, name="one", advertiser_id="1")
    two = await repo.create_output(session, name="two", advertiser_id="2")
    quiet = await repo.create_output(session, name="quiet", advertiser_id="3")
    too_old = [{"index": 3, "reason": "too_old"}]
    await _batch(session, one.id, now - timedelta(minutes=5), 3, too_old)
    await _batch(
        session,
        one.id,
        now - timedelta(hours=2, minutes=10),
        2,
        [{"index": 0, "reason": "no_match_key"}, {"index": 1, "reason": "too_old"}],
    )
    await _batch(session, one.id, now - timedelta(hours=2), 4, None)  # nothing dropped
    await _batch(session, one.id, now - timedelta(hours=30), 7, too_old)  # out of window
    await _batch(session, two.id, now - timedelta(hours=23), 1, [])
    await _batch(session, two.id, now - timedelta(hours=1), 0, [{"reason_missing": 1}])
    # Every event dropped, no delivery: counted from its dropped-batch row.
    await _batch(
        session,
        one.id,
        now - timedelta(hours=2, minutes=5),
        0,
        [{"index": 0, "reason": "not_commerce_event"}, {"index": 1, "reason": "too_old"}],
    )
    await session.commit()

    since = now - timedelta(hours=24)
    totals = await stats.totals_by_output(session, [one.id, two.id, quiet.id], since=since)
    assert totals[one.id] == stats.Totals(forwarded=9, dropped=5, deliveries=3)
    assert totals[two.id] == stats.Totals(forwarded=1, dropped=1, deliveries=1)
    assert totals[quiet.id] == stats.Totals()
    assert await stats.totals_by_output(session, [], since=since) == {}

    hours = await stats.hourly(session, [one.id], now=now)
    assert len(hours) == 24
    assert hours[0].start == datetime(2025, 6, 1, 13, tzinfo=UTC)
    assert hours[-1].start == datetime(2025, 6, 2, 12, tzinfo=UTC)
    assert [(h.start.hour, h.forwarded, h.dropped) for h in hours if h.forwarded or h.dropped] == [
        (10, 6, 4),
        (12, 3, 1),
    ]
    everything = await stats.hourly(session, [one.id, two.id, quiet.id], now=now)
    assert sum(h.forwarded for h in everything) == 10
    assert sum(h.dropped for h in everything) == 6
    assert (everything[-2].forwarded, everything[-2].dropped) == (0, 1)  # 11:00, output two
    with pytest.raises(ValueError, match="hours"):
        await stats.hourly(session, [one.id], now=now, hours=0)
    nothing = await stats.hourly(session, [], now=now)
    assert len(nothing) == 24
    assert not any(h.forwarded or h.dropped for h in nothing)

    # Reasons from deliveries and dropped-batch rows together, most first.
    assert await stats.drop_reasons(session, [one.id], since=since) == [
        ("too_old", 3),
        ("no_match_key", 1),
        ("not_commerce_event", 1),
    ]
    assert await stats.drop_reasons(session, [one.id, two.id], since=since) == [
        ("too_old", 3),
        ("no_match_key", 1),
        ("not_commerce_event", 1),
        ("unknown", 1),
    ]
    assert await stats.drop_reasons(session, [quiet.id], since=since) == []
    assert await stats.drop_reasons(session, [], since=since) == []
