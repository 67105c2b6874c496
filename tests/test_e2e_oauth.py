"""Login with Amazon end to end: a browser drives relay → emulator → relay over real HTTP.

The emulator accepts only the relay's own callback as redirect URI (as an LwA security
profile does). Each failure (declined consent, replayed / tampered / expired state,
another browser, an expired code, a failing token endpoint) must answer a 400 page
saying what went wrong and store or change nothing. Every test runs on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from e2e_helpers import CLIENT_ID, Stack, query_of, relay_stack

from app.crypto import DecryptError


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(database_url, tmp_path) as running:
        yield running


def credential_rows(stack: Stack) -> list[tuple[str, str, str]]:
    return [
        (str(o), str(c), str(k))
        for o, c, k in stack.sql(
            "SELECT output_id, refresh_token_ciphertext, key_id FROM credentials"
        )
    ]


def assert_nothing_stored(stack: Stack, output_id: str) -> None:
    assert credential_rows(stack) == []
    assert stack.output(output_id)["status"] == "needs_login"


def assert_problem_page(answer: httpx.Response, *phrases: str) -> None:
    assert answer.status_code == 400
    assert answer.headers["content-type"].startswith("text/html")
    assert "location" not in answer.headers
    for phrase in phrases:
        assert phrase in answer.text


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def test_login_stores_an_encrypted_refresh_token_and_configures_the_output(
    stack: Stack,
) -> None:
    output = stack.create_output()
    assert output["status"] == "needs_login"
    browser = stack.browser()

    start = stack.start_login(output["id"], browser)
    assert start.status_code == 302
    authorize = start.headers["location"]
    assert authorize.startswith(f"{stack.amazon_url}/ap/oa?")
    query = query_of(authorize)
    assert query["client_id"] == CLIENT_ID
    assert query["scope"] == "advertising::campaign_management"
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == f"{stack.relay_url}/oauth/amazon/callback"
    assert query["code_challenge_method"] == "S256"
    assert "code_verifier" not in query
    # The state names the output and carries a ciphertext sealed to it.
    assert query["state"].startswith(f"{output['id']}~v1.e2e1.")
    # The browser-binding cookie: HttpOnly, SameSite=Lax, scoped, not Secure over http.
    cookie = start.headers["set-cookie"]
    assert cookie.startswith("relay_lwa_flow=")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=lax", "path=/oauth/amazon", "max-age=600"} <= attributes
    assert "secure" not in attributes
    # The PKCE verifier stays on the server, encrypted; the challenge is its S256.
    ((verifier_ciphertext,),) = stack.sql(
        "SELECT verifier_ciphertext FROM oauth_states WHERE output_id = :o", o=output["id"]
    )
    verifier = stack.keyring.decrypt(verifier_ciphertext, output["id"], purpose="pkce_verifier")
    assert query["code_challenge"] == s256(verifier.reveal())
    assert verifier.reveal() not in authorize

    callback_url = stack.authorize(start, browser)
    assert set(query_of(callback_url)) == {"code", "scope", "state"}
    callback = browser.get(callback_url)
    assert callback.status_code == 303
    assert callback.headers["location"] == f"/ui/outputs/{output['id']}?login=ok"
    assert 'relay_lwa_flow=""' in callback.headers["set-cookie"]  # the flow cookie ends

    assert stack.output(output["id"])["status"] == "configured"
    ((owner, ciphertext, key_id),) = credential_rows(stack)
    assert (owner, key_id) == (output["id"], "e2e1")
    assert ciphertext.startswith("v1.e2e1.")
    refresh_token = stack.keyring.decrypt(ciphertext, output["id"]).reveal()
    assert refresh_token.startswith("Atzr|")
    assert refresh_token not in ciphertext
    # It is the token Amazon issued: the emulator knows it (and revokes it).
    assert stack.amazon.post("/_emulator/revoke", json={"refresh_token": refresh_token}).json() == {
        "revoked": 1
    }
    assert stack.stats()["token_grants"] == {"authorization_code": 1}


def test_start_needs_the_admin_and_an_existing_output(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    url = f"{stack.relay_url}/oauth/amazon/start"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        answer = browser.get(url, params={"output_id": output["id"]}, headers=headers)
        assert answer.status_code == 401
        assert "location" not in answer.headers
        assert "set-cookie" not in answer.headers
    missing = stack.start_login("out_doesnotexist", browser)
    assert missing.status_code == 404
    assert stack.sql("SELECT count(*) FROM oauth_states") == [(0,)]


def test_declined_consent_stores_nothing(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    callback_url = stack.authorize(
        stack.start_login(output["id"], browser), browser, emulator_decline="1"
    )
    assert query_of(callback_url)["error"] == "access_denied"
    answer = browser.get(callback_url)
    assert_problem_page(answer, "declined", "access_denied")
    assert_nothing_stored(stack, output["id"])
    assert stack.stats()["token_grants"] == {}


def test_a_replayed_state_is_refused_and_changes_nothing(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    callback_url = stack.authorize(stack.start_login(output["id"], browser), browser)
    assert browser.get(callback_url).status_code == 303
    stored = credential_rows(stack)

    replay = browser.get(callback_url)
    assert_problem_page(replay, "expired or was already used")
    assert credential_rows(stack) == stored
    # The relay refused before spending anything at Amazon: one code exchange only.
    assert stack.stats()["token_grants"] == {"authorization_code": 1}


def test_a_tampered_or_foreign_state_is_refused(stack: Stack) -> None:
    output = stack.create_output()
    other = stack.create_output(name="Other shop")
    browser = stack.browser()
    callback_url = stack.authorize(stack.start_login(output["id"], browser), browser)
    query = query_of(callback_url)
    owner, _, sealed = query["state"].partition("~")
    base = f"{stack.relay_url}/oauth/amazon/callback"
    flipped = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    forgeries = {
        "tampered": f"{owner}~{flipped}",
        "moved to another output": f"{other['id']}~{sealed}",
        "unsealed": f"{owner}~not-a-ciphertext",
    }
    for state in forgeries.values():
        answer = browser.get(f"{base}?{urlencode(query | {'state': state})}")
        assert_problem_page(answer, "not one this relay issued")
    for state in ("", "no-separator"):
        answer = browser.get(f"{base}?{urlencode(query | {'state': state})}")
        assert_problem_page(answer, "no valid state")
    assert credential_rows(stack) == []
    assert stack.stats()["token_grants"] == {}

    # The forgeries spent nothing: the genuine answer still completes the login.
    assert browser.get(callback_url).status_code == 303
    assert stack.output(output["id"])["status"] == "configured"
    assert stack.output(other["id"])["status"] == "needs_login"


def test_a_callback_in_another_browser_is_refused(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    callback_url = stack.authorize(stack.start_login(output["id"], browser), browser)
    stranger = stack.browser()
    assert_problem_page(stranger.get(callback_url), "another browser")
    assert_nothing_stored(stack, output["id"])
    # The flow is single-use: once presented, even its own browser cannot finish it.
    assert_problem_page(browser.get(callback_url), "expired or was already used")
    assert_nothing_stored(stack, output["id"])


def test_an_expired_code_is_refused_and_stores_nothing(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    callback_url = stack.authorize(stack.start_login(output["id"], browser), browser)
    # LwA codes live 5 minutes; the emulator's clock moves past that.
    assert stack.amazon.post("/_emulator/clock", json={"advance": 301}).status_code == 200
    answer = browser.get(callback_url)
    assert_problem_page(answer, "Amazon did not accept the sign-in", "invalid grant")
    assert_nothing_stored(stack, output["id"])
    assert stack.stats()["token_grants"] == {}


def test_an_expired_state_is_refused_before_any_exchange(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    start = stack.start_login(output["id"], browser)
    # Ten minutes pass (the state's lifetime) between start and callback.
    stack.sql("UPDATE oauth_states SET expires_at = created_at")
    callback_url = stack.authorize(start, browser)
    assert_problem_page(browser.get(callback_url), "expired or was already used")
    assert_nothing_stored(stack, output["id"])
    assert stack.stats()["token_grants"] == {}


def test_a_failing_token_endpoint_stores_nothing(stack: Stack) -> None:
    output = stack.create_output()
    browser = stack.browser()
    callback_url = stack.authorize(stack.start_login(output["id"], browser), browser)
    stack.fault({"target": "token", "status": 503})
    assert_problem_page(browser.get(callback_url), "Amazon did not accept the sign-in")
    assert_nothing_stored(stack, output["id"])


def test_a_new_login_replaces_the_refresh_token(stack: Stack) -> None:
    output, _ = stack.ready_output()
    ((_, first, _),) = credential_rows(stack)
    assert stack.login(output["id"]).status_code == 303
    ((_, second, _),) = credential_rows(stack)  # still one credential per output
    assert second != first
    old = stack.keyring.decrypt(first, output["id"]).reveal()
    new = stack.keyring.decrypt(second, output["id"]).reveal()
    assert old != new
    assert stack.stats()["token_grants"] == {"authorization_code": 2}
    # A ciphertext is bound to its output: the same row under another id is refused.
    with pytest.raises(DecryptError):
        stack.keyring.decrypt(second, "out_someoneelse")


def test_the_flow_cookie_is_secure_behind_an_https_public_url(
    database_url: str, tmp_path: Path
) -> None:
    with relay_stack(database_url, tmp_path, public_url="https://relay.example") as stack:
        output = stack.create_output()
        start = stack.start_login(output["id"], stack.browser())
        assert start.status_code == 302
        query = query_of(start.headers["location"])
        assert query["redirect_uri"] == "https://relay.example/oauth/amazon/callback"
        attributes = {p.strip().lower() for p in start.headers["set-cookie"].split(";")}
        assert {"secure", "httponly", "samesite=lax"} <= attributes
        assert start.headers["strict-transport-security"] == "max-age=31536000"
        assert urlsplit(start.headers["location"]).path == "/ap/oa"
