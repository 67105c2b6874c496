"""The web UI in a real browser: headless Chromium driven by Playwright.

The relay and the Amazon emulator run as uvicorn servers on loopback, wired as
``relay demo`` wires them (app/demo.py): the relay's socket is bound first so that
RELAY_PUBLIC_URL is its own URL. The browser signs in, creates an output, completes
Login with Amazon against the emulator (through its consent page), creates a
connection, and, after the test posts a batch with the credentials the page showed,
finds the delivery with Amazon's per-event results. Then the grant is revoked at the
emulator, the output turns ``needs_reauth`` and the browser re-authorizes it.

Every page is checked for basic accessibility (``lang``, a ``main`` landmark, a label
on every control, keyboard focus that shows, no horizontal scrolling at 200 % zoom,
no CSP violation, no script error) and photographed. Screenshots go to
docs/screenshots/ when one is missing there or RELAY_UPDATE_SCREENSHOTS=1 (so that a
normal run leaves the work tree clean), otherwise to the test's temporary directory.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or RELAY_TEST_CHROMIUM);
Playwright never downloads one. Missing Playwright or Chromium fails the test, it
does not skip it.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from app.db.migrate import upgrade_to_head
from app.demo import CLIENT_ID, CLIENT_SECRET, emulator_settings
from app.emulator import create_app as create_emulator
from app.localserver import bind_loopback, serve_in_thread, url_of
from app.main import create_app

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page, ViewportSize

CHROMIUM = Path(os.environ.get("RELAY_TEST_CHROMIUM", "/usr/bin/chromium"))
# No network on CI machines: without these Chromium keeps trying to reach Google.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
VIEWPORT: ViewportSize = {"width": 1200, "height": 900}
# 200 % zoom in a 1280 x 900 window: 640 x 450 CSS pixels, each two device pixels wide.
ZOOMED: ViewportSize = {"width": 640, "height": 450}
ZOOM_SHOTS = ("02-output-form", "05-output-configured", "07-deliveries")
TIMEOUT_MS = 15_000


def _sample(name: str) -> str:
    text = resources.files("app.samples").joinpath(name).read_text(encoding="utf-8")
    now_ms = int(time.time() * 1000)
    return (
        text.replace("{{now_ms}}", str(now_ms))
        .replace("{{old_ms}}", str(now_ms - 3 * 86_400_000))
        .replace("{{now_iso}}", time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
    )


@dataclass
class Stack:
    relay: str
    amazon: str
    admin_token: str


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    admin_token = secrets.token_urlsafe(24)
    with serve_in_thread(
        create_emulator(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    ) as amazon:
        sock = bind_loopback()
        relay_url = url_of(sock)
        settings = emulator_settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/relay.db",
            key_file=tmp_path / "relay.key",
            admin_token=admin_token,
            amazon=amazon,
            relay_url=relay_url,
        )
        upgrade_to_head(settings.database_url)
        with serve_in_thread(create_app(settings), sock):
            yield Stack(relay=relay_url, amazon=amazon, admin_token=admin_token)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "Playwright's Python client is missing: pip install playwright==1.65.2 "
            "(the browser comes from Debian: apt-get install chromium; do not run "
            "`playwright install`)",
            pytrace=False,
        )
    if not CHROMIUM.is_file():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: apt-get install chromium "
            "(or set RELAY_TEST_CHROMIUM to the browser's path)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh user-data-dir every run
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
            locale="en-US",
            timezone_id="UTC",
            reduced_motion="reduce",
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            context.grant_permissions(["clipboard-read", "clipboard-write"])
            yield context
        finally:
            context.close()


@dataclass
class Pages:
    """Watches one tab: console CSP reports and script errors fail the test."""

    page: Page
    shots: Path
    problems: list[str] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        if message.type == "error" and ("Content Security Policy" in text or "Refused to" in text):
            self.problems.append(f"CSP: {text}")

    def check(self, name: str) -> None:
        """Accessibility basics, the 200 % zoom reflow, then a screenshot."""
        page = self.page
        page.wait_for_load_state("load")
        assert page.evaluate("document.documentElement.lang") == "en", name
        assert page.locator("main").count() == 1, name
        assert page.locator("h1").count() == 1, name
        unlabelled = page.evaluate(
            """() => Array.from(document.querySelectorAll('input, select, textarea'))
                .filter(e => e.type !== 'hidden')
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                             && !e.getAttribute('aria-labelledby'))
                .map(e => e.outerHTML)"""
        )
        assert unlabelled == [], f"{name}: controls without a label: {unlabelled}"
        # Keyboard: the first Tab reaches the skip link, and focus is visible on it.
        page.evaluate(
            """() => { const t = document.createElement('span'); t.tabIndex = -1;
                document.body.prepend(t); t.focus(); t.remove(); }"""
        )
        page.keyboard.press("Tab")
        focused = page.evaluate(
            """() => { const e = document.activeElement; const s = getComputedStyle(e);
                return {cls: e.className, outline: s.outlineStyle, width: s.outlineWidth,
                        top: e.getBoundingClientRect().top}; }"""
        )
        assert focused["cls"] == "skip-link", f"{name}: first Tab went to {focused}"
        assert focused["outline"] != "none", f"{name}: no visible focus: {focused}"
        assert focused["top"] >= 0, f"{name}: the skip link stays off screen when focused"
        page.keyboard.press("Shift+Tab")
        # 200 % zoom: what Chromium does when zoomed in a 1280-pixel window, half the CSS
        # pixels across at twice the device pixels. Nothing may scroll the page sideways
        # (a wide table scrolls inside its own box).
        cdp = page.context.new_cdp_session(page)
        cdp.send(
            "Emulation.setDeviceMetricsOverride",
            {**ZOOMED, "deviceScaleFactor": 2, "mobile": False},
        )
        try:
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            if overflow > 0:
                wide = page.evaluate(
                    """() => Array.from(document.querySelectorAll('body *'))
                        .filter(e => e.getBoundingClientRect().right
                                     > document.documentElement.clientWidth + 1)
                        .slice(0, 5).map(e => e.tagName + '.' + e.className + ' '
                                     + Math.round(e.getBoundingClientRect().right))"""
                )
                pytest.fail(f"{name}: {overflow}px of sideways scrolling at 200 % zoom: {wide}")
            if name in ZOOM_SHOTS:
                # Playwright's own screenshot would undo the override: ask Chromium directly.
                height = page.evaluate("document.documentElement.scrollHeight")
                clip = {"x": 0, "y": 0, "width": ZOOMED["width"], "height": height, "scale": 1}
                shot = cdp.send(
                    "Page.captureScreenshot",
                    {"format": "png", "captureBeyondViewport": True, "clip": clip},
                )
                self._save(f"{name}-zoom200", base64.b64decode(shot["data"]))
        finally:
            cdp.send("Emulation.clearDeviceMetricsOverride")
            cdp.detach()
            page.set_viewport_size(VIEWPORT)
        assert self.problems == [], f"{name}: {self.problems}"
        self._shoot(name)

    def _shoot(self, name: str) -> None:
        self._save(name, self.page.screenshot(full_page=True))

    def _save(self, name: str, png: bytes) -> None:
        target = SCREENSHOTS / f"{name}.png"
        if os.environ.get("RELAY_UPDATE_SCREENSHOTS") != "1" and target.exists():
            target = self.shots / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        self.taken.append(name)


def _poll(page: Page, url: str, done: Callable[[], bool], seconds: float = 10.0) -> None:
    """Reload ``url`` until ``done()`` (the dispatcher works in the background)."""
    deadline = time.monotonic() + seconds
    while True:
        page.goto(url)
        if done():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not reach the expected state in {seconds} s")
        time.sleep(0.1)


def test_admin_journey_in_a_real_browser(
    stack: Stack, browser: BrowserContext, tmp_path: Path
) -> None:
    started = time.monotonic()
    ui = Pages(browser.new_page(), tmp_path / "screenshots")
    page = ui.page
    httpx.post(f"{stack.amazon}/_emulator/config", json={"consent_page": True}).raise_for_status()

    # Sign in: any page sends an anonymous visitor to the login form first.
    page.goto(f"{stack.relay}/ui/")
    assert "/ui/login" in page.url
    ui.check("01-login")
    page.get_by_label("Admin token").fill("not the token")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text().startswith("That is not the admin token")
    page.get_by_label("Admin token").fill(stack.admin_token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{stack.relay}/ui/")
    assert "No outputs yet" in page.inner_text("main")

    # Create an output; a wrong value first, to see the message next to its field.
    page.get_by_role("link", name="New output").first.click()
    page.wait_for_url("**/ui/outputs/new")
    ui.check("02-output-form")
    page.get_by_label("Configuration Name").fill("Web shop")
    page.get_by_label("Advertiser ID").fill("12ab")
    page.get_by_label("Data Set Name").fill("web_purchases")
    page.get_by_label("Partner Name").fill("acme_relay")
    page.get_by_role("button", name="Create output").click()
    error = page.locator("#advertiser_id-error")
    assert "digits only" in error.inner_text()
    assert page.get_by_label("Advertiser ID").get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Configuration Name").input_value() == "Web shop"
    ui.check("03-output-form-errors")
    page.get_by_label("Advertiser ID").fill("1234567890")
    page.get_by_role("button", name="Create output").click()
    page.wait_for_url(re.compile(r".*/ui/outputs/out_[a-z0-9]+$"))
    output_url = page.url
    assert "Needs Login with Amazon" in page.inner_text("main")
    ui.check("04-output-needs-login")

    # Login with Amazon: relay → emulator's consent page → Allow → back to the output.
    page.get_by_role("link", name="Login with Amazon").click()
    page.get_by_role("button", name="Allow").wait_for()
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(f"{output_url}?login=ok")
    main = page.inner_text("main")
    assert "Login with Amazon completed" in main
    assert "Configured" in main
    ui.check("05-output-configured")

    # A connection: the key and the secret are shown once, with working copy buttons.
    page.get_by_label("Source").select_option("mparticle")
    page.get_by_label("Connection name").fill("Web site")
    page.get_by_role("button", name="Create connection").click()
    page.get_by_role("heading", name="Connection “Web site” created").wait_for()
    key = page.locator("#connection-key").inner_text()
    secret = page.locator("#connection-secret").inner_text()
    assert f"{stack.relay}/v2/events" in page.inner_text("main")
    copy = page.get_by_role("button", name="Copy Secret")
    assert copy.is_visible()  # the script un-hid it
    copy.click()
    page.wait_for_function(
        "() => document.getElementById('live-region').textContent.includes('Copied')"
    )
    assert page.evaluate("navigator.clipboard.readText()") == secret
    ui.check("06-connection-created")

    # The source posts a batch with those credentials; Amazon (the emulator) answers.
    answer = httpx.post(
        f"{stack.relay}/v2/events",
        params={"wait": 10},
        content=_sample("mparticle_batch.json"),
        auth=(key, secret),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    (outcome,) = answer.json()["outcome"].values()
    assert outcome["status"] == "delivered", outcome

    page.goto(output_url)
    page.get_by_role("link", name="All deliveries").click()
    page.wait_for_url("**/deliveries")
    table = page.inner_text("table")
    assert "delivered" in table
    assert "2 accepted" in table
    assert "not_commerce_event" in table
    assert "too_old" in table
    ui.check("07-deliveries")
    page.get_by_role("link", name=re.compile(r"^Details")).first.click()
    page.get_by_role("heading", name="Amazon's per-event results").wait_for()
    results = page.inner_text("#results-title + .table-wrap")
    assert "2 accepted, 0 rejected" in results
    assert '"events"' in page.inner_text("pre.code")
    ui.check("08-delivery")

    # Preview: a sample batch, mapped with the output's settings; nothing is sent.
    page.goto(f"{output_url}/preview?sample=mparticle")
    page.get_by_role("button", name="Preview").click()
    page.get_by_role("heading", name=re.compile(r"^Result: 2 events in 1 request")).wait_for()
    ui.check("09-preview")

    # Amazon revokes the grant: the next delivery turns the output needs_reauth …
    httpx.post(f"{stack.amazon}/_emulator/revoke", json={"all": True}).raise_for_status()
    held = httpx.post(
        f"{stack.relay}/v2/events",
        content=_sample("mparticle_batch.json"),
        auth=(key, secret),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert held.status_code == 202, held.text
    _poll(page, output_url, lambda: "Needs re-authorization" in page.inner_text("main"))
    ui.check("10-output-needs-reauth")
    # … and Re-authorize sends what waited.
    page.get_by_role("link", name="Re-authorize").click()
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(f"{output_url}?login=ok")
    _poll(
        page,
        f"{output_url}/deliveries?status=delivered",
        lambda: page.locator("tbody tr").count() == 2,
    )

    page.goto(f"{stack.relay}/ui/")
    listing = page.inner_text("table")
    assert "Web shop" in listing
    assert "Configured" in listing
    assert page.locator("svg.chart[role=img]").count() == 1
    ui.check("11-outputs")

    # Sign out: the pages need a login again.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/ui/login")
    page.goto(f"{stack.relay}/ui/")
    assert "/ui/login" in page.url

    assert len(ui.taken) == 11 + len(ZOOM_SHOTS)
    assert time.monotonic() - started < 60
