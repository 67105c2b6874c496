"""The Amazon emulator, driven over real HTTP under uvicorn, as the relay will drive it."""

from __future__ import annotations

import base64
import copy
import hashlib
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from servers import run_server

from app.amazon.schema import request_errors
from app.emulator import create_app, serve
from app.emulator.fastcheck import event_check

CLIENT_ID = "relay-demo-client"
CLIENT_SECRET = "relay-demo-secret"
REDIRECT_URI = "https://relay.example/oauth/amazon/callback"
SCOPE = "advertising::campaign_management"
ACCOUNT_ID = "5551234567"
EVENTS = "/adsApi/v1/create/events"
TOKEN = "/auth/o2/token"
DAY = 86_400


# Helpers


@contextmanager
def emulator(**options: Any) -> Iterator[httpx.Client]:
    """A fresh emulator under uvicorn and a client for it."""
    with run_server(create_app(**options)) as base_url, httpx.Client(base_url=base_url) as client:
        yield client


@pytest.fixture(scope="module")
def shared_emulator_url() -> Iterator[str]:
    with run_server(create_app()) as base_url:
        yield base_url


@pytest.fixture
def client(shared_emulator_url: str) -> Iterator[httpx.Client]:
    """A client of the module's emulator, reset first: starting a server per test
    would cost more than the tests themselves."""
    with httpx.Client(base_url=shared_emulator_url) as client:
        assert client.post("/_emulator/reset").status_code == 204
        yield client


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "eventId": secrets.token_hex(8),
        "eventTime": iso(datetime.now(UTC) - timedelta(hours=1)),
        "countryCode": "US",
        "eventDescription": {
            "name": "Purchase",
            "conversionType": "OFF_AMAZON_PURCHASES",
            "eventSource": "WEBSITE",
            "eventIngestionMethod": "SERVER_TO_SERVER",
            "dataSetName": "web_purchases",
        },
        "matchKeys": [{"type": "EMAIL", "values": [sha("jane@example.com")]}],
        "value": 59.99,
        "currencyCode": "USD",
        "unitsSold": 3,
        "customData": [{"name": "coupon", "value": "FALL", "dataType": "STRING"}],
    }
    event.update(fields)
    return event


def new_verifier() -> str:
    return secrets.token_urlsafe(48)


def challenge_of(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def authorize(client: httpx.Client, verifier: str | None = None, **params: str) -> httpx.Response:
    query = {
        "client_id": CLIENT_ID,
        "scope": SCOPE,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "state": "state-123",
    }
    if verifier is not None:
        query |= {"code_challenge": challenge_of(verifier), "code_challenge_method": "S256"}
    return client.get("/ap/oa", params=query | params)


def redirect_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
    return {name: values[0] for name, values in parse_qs(location.query).items()}


def token_request(client: httpx.Client, **form: str) -> httpx.Response:
    return client.post(TOKEN, data={"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET} | form)


def exchange(client: httpx.Client, code: str, verifier: str | None, **form: str) -> httpx.Response:
    fields = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    if verifier is not None:
        fields["code_verifier"] = verifier
    return token_request(client, **(fields | form))


def refresh(client: httpx.Client, refresh_token: str) -> httpx.Response:
    return token_request(client, grant_type="refresh_token", refresh_token=refresh_token)


def login(client: httpx.Client) -> dict[str, Any]:
    verifier = new_verifier()
    code = redirect_params(authorize(client, verifier))["code"]
    response = exchange(client, code, verifier)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def headers_for(access_token: str, **overrides: str) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {access_token}",
        "Amazon-Ads-ClientId": CLIENT_ID,
        "Amazon-Ads-AccountId": ACCOUNT_ID,
        "Content-Type": "application/json",
    }
    return headers | overrides


def send_events(
    client: httpx.Client, access_token: str, events: list[Any], **headers: str
) -> httpx.Response:
    return client.post(
        EVENTS, json={"events": events}, headers=headers_for(access_token, **headers)
    )


def assert_invalid_grant(response: httpx.Response, parameter: str) -> None:
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_grant"
    assert f"invalid grant parameter : {parameter}" in body["error_description"]


# Login with Amazon: authorize

GOOD_CHALLENGE = challenge_of(new_verifier())


def test_authorize_redirects_back_with_code_scope_and_state(client: httpx.Client) -> None:
    params = redirect_params(authorize(client, new_verifier()))

    assert params["state"] == "state-123"
    assert params["scope"] == SCOPE
    assert params["code"].startswith("AN")
    assert len(params["code"]) > 20


def test_authorize_keeps_the_redirect_uris_own_query(client: httpx.Client) -> None:
    response = authorize(client, redirect_uri=f"{REDIRECT_URI}?tenant=7")

    location = urlsplit(response.headers["location"])
    assert parse_qs(location.query)["tenant"] == ["7"]
    assert "code" in parse_qs(location.query)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"client_id": "someone-else"}, "Unknown client_id"),
        ({"response_type": "token"}, "response_type"),
        ({"redirect_uri": "relay.example/callback"}, "redirect_uri"),
        ({"redirect_uri": f"{REDIRECT_URI}#frag"}, "redirect_uri"),
    ],
)
def test_authorize_answers_a_400_page_when_it_cannot_trust_the_redirect(
    client: httpx.Client, params: dict[str, str], problem: str
) -> None:
    response = authorize(client, **params)

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    assert problem in response.text


def test_authorize_refuses_redirect_uris_outside_the_allowed_list() -> None:
    with emulator(allowed_redirect_uris=[REDIRECT_URI]) as client:
        assert authorize(client).status_code == 302
        refused = authorize(client, redirect_uri="https://evil.example/callback")
    assert refused.status_code == 400
    assert "not an allowed return URL" in refused.text


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"scope": "advertising::everything"}, "invalid_scope"),
        ({"scope": ""}, "invalid_scope"),
        ({"code_challenge": GOOD_CHALLENGE, "code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "too-short", "code_challenge_method": "S256"}, "invalid_request"),
        ({"code_challenge_method": "S256"}, "invalid_request"),
    ],
)
def test_authorize_reports_scope_and_pkce_problems_through_the_redirect(
    client: httpx.Client, params: dict[str, str], error: str
) -> None:
    answer = redirect_params(authorize(client, **params))

    assert answer["error"] == error
    assert answer["state"] == "state-123"
    assert "code" not in answer


def test_user_declining_redirects_with_access_denied(client: httpx.Client) -> None:
    answer = redirect_params(authorize(client, emulator_decline="1"))

    assert answer["error"] == "access_denied"
    assert answer["error_description"]
    assert answer["state"] == "state-123"
    assert "code" not in answer


def test_decline_switch_declines_every_authorization(client: httpx.Client) -> None:
    # For flows where the relay builds the URL and the test cannot add a parameter.
    client.post("/_emulator/config", json={"decline_authorizations": True})

    assert redirect_params(authorize(client))["error"] == "access_denied"


def test_consent_page_asks_before_redirecting(client: httpx.Client) -> None:
    client.post("/_emulator/config", json={"consent_page": True})

    page = authorize(client, state="<b>")
    allowed = authorize(client, emulator_decision="allow")
    denied = authorize(client, emulator_decision="deny")

    assert page.status_code == 200
    assert "name='emulator_decision' value='allow'" in page.text
    assert "value='&lt;b&gt;'" in page.text  # the state, escaped
    assert "code" in redirect_params(allowed)
    assert redirect_params(denied)["error"] == "access_denied"


# Login with Amazon: tokens


def test_full_flow_with_pkce_then_events(client: httpx.Client) -> None:
    verifier = new_verifier()
    code = redirect_params(authorize(client, verifier))["code"]
    exchanged = exchange(client, code, verifier)
    tokens = exchanged.json()
    events = [make_event(), make_event()]

    answer = send_events(client, tokens["access_token"], events)

    assert exchanged.status_code == 200
    assert exchanged.headers["cache-control"] == "no-store"
    assert tokens["access_token"].startswith("Atza|")
    assert tokens["refresh_token"].startswith("Atzr|")
    assert tokens["token_type"] == "bearer"
    assert tokens["expires_in"] == 3600
    assert answer.status_code == 207
    assert answer.json() == {
        "success": [{"index": 0, "event": events[0]}, {"index": 1, "event": events[1]}],
        "error": [],
    }


def test_code_is_single_use(client: httpx.Client) -> None:
    verifier = new_verifier()
    code = redirect_params(authorize(client, verifier))["code"]

    first = exchange(client, code, verifier)
    second = exchange(client, code, verifier)

    assert first.status_code == 200
    assert_invalid_grant(second, "code")


def test_a_failed_exchange_spends_the_code(client: httpx.Client) -> None:
    verifier = new_verifier()
    code = redirect_params(authorize(client, verifier))["code"]

    assert_invalid_grant(exchange(client, code, new_verifier()), "code_verifier")
    assert_invalid_grant(exchange(client, code, verifier), "code")


def test_code_expires_in_real_time() -> None:
    with emulator(code_ttl=1) as client:
        verifier = new_verifier()
        code = redirect_params(authorize(client, verifier))["code"]
        time.sleep(1.1)
        assert_invalid_grant(exchange(client, code, verifier), "code")


def test_code_expires_when_the_clock_moves_past_code_ttl(client: httpx.Client) -> None:
    verifier = new_verifier()
    fresh = redirect_params(authorize(client, verifier))["code"]
    stale = redirect_params(authorize(client, verifier))["code"]
    assert exchange(client, fresh, verifier).status_code == 200

    client.post("/_emulator/clock", json={"advance": 301})

    assert_invalid_grant(exchange(client, stale, verifier), "code")


@pytest.mark.parametrize(
    ("challenge_sent", "verifier_sent"),
    [(True, "wrong"), (True, None), (False, "unannounced")],
)
def test_pkce_verifier_must_match_the_challenge(
    client: httpx.Client, challenge_sent: bool, verifier_sent: str | None
) -> None:
    verifier = new_verifier()
    code = redirect_params(authorize(client, verifier if challenge_sent else None))["code"]
    sent = {"wrong": new_verifier(), "unannounced": verifier, None: None}[verifier_sent]

    assert_invalid_grant(exchange(client, code, sent), "code_verifier")


def test_exchange_without_pkce_works_when_none_was_asked(client: httpx.Client) -> None:
    code = redirect_params(authorize(client))["code"]

    assert exchange(client, code, None).status_code == 200


def test_redirect_uri_must_equal_the_authorized_one(client: httpx.Client) -> None:
    verifier = new_verifier()
    code = redirect_params(authorize(client, verifier))["code"]

    answer = exchange(client, code, verifier, redirect_uri="https://relay.example/other")

    assert_invalid_grant(answer, "redirect_uri")


@pytest.mark.parametrize(
    "credentials",
    [{"client_secret": "guess"}, {"client_id": "someone-else"}, {"client_secret": ""}],
)
def test_wrong_client_credentials_are_invalid_client(
    client: httpx.Client, credentials: dict[str, str]
) -> None:
    tokens = login(client)

    answer = token_request(
        client, grant_type="refresh_token", refresh_token=tokens["refresh_token"], **credentials
    )

    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"


def test_token_endpoint_request_errors(client: httpx.Client) -> None:
    unsupported = token_request(client, grant_type="password")
    no_code = token_request(client, grant_type="authorization_code", redirect_uri=REDIRECT_URI)
    no_grant_type = token_request(client)
    as_json = client.post(TOKEN, json={"grant_type": "refresh_token", "client_id": CLIENT_ID})
    repeated = client.post(
        TOKEN,
        content="grant_type=refresh_token&refresh_token=a&refresh_token=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert (unsupported.status_code, unsupported.json()["error"]) == (400, "unsupported_grant_type")
    for answer in (no_code, no_grant_type, as_json, repeated):
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_request")
    assert "code" in no_code.json()["error_description"]


def test_refresh_gives_a_new_working_access_token(client: httpx.Client) -> None:
    tokens = login(client)

    refreshed = refresh(client, tokens["refresh_token"]).json()

    assert refreshed["access_token"] != tokens["access_token"]
    assert refreshed["refresh_token"] == tokens["refresh_token"]  # no rotation by default
    assert send_events(client, refreshed["access_token"], [make_event()]).status_code == 207
    assert send_events(client, tokens["access_token"], [make_event()]).status_code == 207
    assert client.get("/_emulator/stats").json()["token_grants"] == {
        "authorization_code": 1,
        "refresh_token": 1,
    }


def test_rotated_refresh_token_replaces_the_old_one(client: httpx.Client) -> None:
    client.post("/_emulator/config", json={"rotate_refresh_tokens": True})
    tokens = login(client)

    rotated = refresh(client, tokens["refresh_token"]).json()

    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert refresh(client, rotated["refresh_token"]).status_code == 200
    assert_invalid_grant(refresh(client, tokens["refresh_token"]), "refresh_token")


def test_revoked_refresh_token_is_invalid_grant_and_its_access_tokens_stop(
    client: httpx.Client,
) -> None:
    tokens = login(client)
    other = login(client)

    revoked = client.post("/_emulator/revoke", json={"refresh_token": tokens["refresh_token"]})

    assert revoked.json() == {"revoked": 1}
    assert_invalid_grant(refresh(client, tokens["refresh_token"]), "refresh_token")
    assert send_events(client, tokens["access_token"], [make_event()]).status_code == 401
    assert send_events(client, other["access_token"], [make_event()]).status_code == 207


def test_revoke_all_ends_every_grant(client: httpx.Client) -> None:
    sessions = [login(client), login(client)]

    assert client.post("/_emulator/revoke", json={"all": True}).json() == {"revoked": 2}
    for tokens in sessions:
        assert_invalid_grant(refresh(client, tokens["refresh_token"]), "refresh_token")


def test_revoke_needs_a_known_instruction(client: httpx.Client) -> None:
    answer = client.post("/_emulator/revoke", json={"everything": "please"})

    assert answer.status_code == 400
    assert "refresh_token" in answer.json()["error"]


def test_access_token_expires_after_its_ttl(client: httpx.Client) -> None:
    tokens = login(client)
    assert send_events(client, tokens["access_token"], [make_event()]).status_code == 207

    client.post("/_emulator/clock", json={"advance": 3600})
    expired = send_events(client, tokens["access_token"], [make_event()])
    renewed = refresh(client, tokens["refresh_token"]).json()

    assert expired.status_code == 401
    assert expired.json()["code"] == "UNAUTHORIZED"
    assert send_events(client, renewed["access_token"], [make_event()]).status_code == 207


def test_expiring_access_tokens_leaves_refresh_tokens_valid(client: httpx.Client) -> None:
    # The relay's "401 -> refresh once -> retry" path.
    tokens = login(client)

    expired = client.post("/_emulator/revoke", json={"access_tokens": True}).json()

    assert expired == {"expired": 1}
    assert send_events(client, tokens["access_token"], [make_event()]).status_code == 401
    assert refresh(client, tokens["refresh_token"]).status_code == 200


def test_expires_in_can_be_sent_as_a_string(client: httpx.Client) -> None:
    client.post("/_emulator/config", json={"expires_in_as_string": True})

    assert login(client)["expires_in"] == "3600"


# Events API


@pytest.fixture
def access_token(client: httpx.Client) -> str:
    token: str = login(client)["access_token"]
    return token


@pytest.mark.parametrize(
    ("headers", "content", "status", "code"),
    [
        ({"Authorization": ""}, None, 401, "UNAUTHORIZED"),
        ({"Authorization": "Basic abc"}, None, 401, "UNAUTHORIZED"),
        ({"Authorization": "Bearer Atza|never-issued"}, None, 401, "UNAUTHORIZED"),
        ({"Amazon-Ads-ClientId": ""}, None, 400, "BAD_REQUEST"),
        ({"Amazon-Ads-ClientId": "another-client"}, None, 401, "UNAUTHORIZED"),
        ({"Amazon-Ads-AccountId": ""}, None, 400, "BAD_REQUEST"),
        ({"Amazon-Ads-AccountId": "ENTITY123"}, None, 400, "BAD_REQUEST"),
        ({"Content-Type": "text/plain"}, None, 400, "BAD_REQUEST"),
        ({}, b"{not json", 400, "BAD_REQUEST"),
        ({}, b"[]", 400, "BAD_REQUEST"),
        ({}, b"{}", 400, "BAD_REQUEST"),
        ({}, b'{"events": {}}', 400, "BAD_REQUEST"),
        ({}, b'{"events": []}', 400, "BAD_REQUEST"),
    ],
)
def test_whole_request_errors(
    client: httpx.Client,
    access_token: str,
    headers: dict[str, str],
    content: bytes | None,
    status: int,
    code: str,
) -> None:
    body = content if content is not None else b'{"events": [{}]}'

    answer = client.post(EVENTS, content=body, headers=headers_for(access_token, **headers))

    assert answer.status_code == status
    assert answer.json()["code"] == code
    assert answer.json()["message"]


def test_at_most_500_events_per_request(client: httpx.Client, access_token: str) -> None:
    event = make_event()

    full = send_events(client, access_token, [event] * 500)
    over = send_events(client, access_token, [event] * 501)

    assert full.status_code == 207
    assert len(full.json()["success"]) == 500
    assert over.status_code == 400
    assert "501" in over.json()["message"]


def test_oversized_body_is_413(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/config", json={"max_body_bytes": 2000})

    small = send_events(client, access_token, [make_event()])
    large = send_events(client, access_token, [make_event() for _ in range(5)])

    assert small.status_code == 207
    assert large.status_code == 413
    assert large.json()["code"] == "CONTENT_TOO_LARGE"


def test_invalid_events_get_per_event_errors_at_their_index(
    client: httpx.Client, access_token: str
) -> None:
    now = datetime.now(UTC)
    no_match_keys = make_event()
    del no_match_keys["matchKeys"]
    events = [
        make_event(),
        make_event(countryCode="XX"),
        make_event(),
        no_match_keys,
        make_event(eventTime=iso(now - timedelta(days=22))),
        make_event(eventTime=iso(now + timedelta(hours=2))),
        make_event(matchKeys=[{"type": "EMAIL", "values": ["jane@example.com"]}]),
        make_event(eventDescription={**make_event()["eventDescription"], "dataSetName": "9x"}),
        make_event(eventTime="2025-02-30T10:00:00Z"),
        "not an event",
    ]

    answer = send_events(client, access_token, events)
    body = answer.json()
    errors = {entry["index"]: entry["errors"] for entry in body["error"]}

    assert answer.status_code == 207
    assert [entry["index"] for entry in body["success"]] == [0, 2]
    assert body["success"][1]["event"] == events[2]
    assert sorted(errors) == [1, 3, 4, 5, 6, 7, 8, 9]
    assert all(e["code"] == "BAD_REQUEST" for entry in errors.values() for e in entry)
    expected_locations = {
        1: "events[1].countryCode",
        3: "events[3]",
        4: "events[4].eventTime",
        5: "events[5].eventTime",
        6: "events[6].matchKeys[0].values",
        7: "events[7].eventDescription.dataSetName",
        8: "events[8].eventTime",
        9: "events[9]",
    }
    for index, location in expected_locations.items():
        assert errors[index][0]["fieldLocation"] == location, errors[index]
    assert "matchKeys" in errors[3][0]["message"]
    assert "21 days" in errors[4][0]["message"]


def test_event_age_follows_the_emulators_clock(client: httpx.Client, access_token: str) -> None:
    event = make_event(eventTime=iso(datetime.now(UTC) - timedelta(days=20)))
    assert send_events(client, access_token, [event]).json()["error"] == []

    client.post("/_emulator/clock", json={"advance": 2 * DAY})
    fresh_token = login(client)["access_token"]
    later = send_events(client, access_token=fresh_token, events=[event]).json()

    assert later["success"] == []
    assert later["error"][0]["errors"][0]["fieldLocation"] == "events[0].eventTime"


def test_empty_outcome_arrays_can_be_left_out(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/config", json={"omit_empty_outcome_arrays": True})

    body = send_events(client, access_token, [make_event()]).json()

    assert list(body) == ["success"]


def _mutations(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, replacement) for every node of ``value``: wrong types, edge values."""
    replacements: list[Any] = [None, True, 1, 1.0, 2**40, 1.5, "", "x" * 300, "US", [], {}, [{}]]
    replacements += ["9x", "2025-01-01T00:00:00", "2025-01-01T00:00:00.1234Z"]
    yield from ((path, replacement) for replacement in replacements)
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*path, key), _DELETE
            yield from _mutations(child, (*path, key))
    elif isinstance(value, list):
        yield path, value * 20
        for position, child in enumerate(value):
            yield from _mutations(child, (*path, position))


_DELETE = object()


def _mutated(event: dict[str, Any], path: tuple[Any, ...], replacement: Any) -> Any:
    if not path:
        return replacement
    copied = copy.deepcopy(event)
    parent: Any = copied
    for step in path[:-1]:
        parent = parent[step]
    if replacement is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return copied


def test_fast_check_agrees_with_the_schema_validator() -> None:
    # The emulator trusts the fast check's "valid" without asking jsonschema, so it
    # must never accept an event request_errors refuses.
    base = make_event(
        consent={"amazonConsent": {"amznUserData": "GRANTED"}, "geo": {"ipAddress": "1.2.3.4"}},
        deviceInfo={"userAgent": "Mozilla"},
        dataProcessingOptions={"options": "LIMITED_DATA_USE"},
        partner="acme",
    )
    check = event_check()
    checked = 0
    for path, replacement in _mutations(base):
        event = _mutated(base, path, replacement)
        expected = request_errors({"events": [event]}) == []
        assert check(event) == expected, (path, replacement)
        checked += 1
    assert checked > 300


# Faults


def test_status_fault_lasts_count_requests(client: httpx.Client, access_token: str) -> None:
    registered = client.post("/_emulator/faults", json={"status": 503, "count": 3})

    statuses = [send_events(client, access_token, [make_event()]).status_code for _ in range(4)]

    assert registered.status_code == 201
    assert statuses == [503, 503, 503, 207]


def test_429_fault_carries_retry_after(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json={"status": 429, "retry_after": 2, "count": 1})

    answer = send_events(client, access_token, [make_event()])

    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "2"
    assert answer.json()["code"] == "TOO_MANY_REQUESTS"


def test_faults_apply_in_order_of_registration(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json=[{"status": 500, "count": 2}, {"status": 502}])
    client.post("/_emulator/faults", json={"status": 413})

    answers = [send_events(client, access_token, [make_event()]) for _ in range(5)]

    assert [a.status_code for a in answers] == [500, 500, 502, 413, 207]
    assert answers[0].json()["code"] == "INTERNAL_ERROR"
    assert answers[3].json()["code"] == "CONTENT_TOO_LARGE"


def test_time_window_fault_lasts_until_the_window_ends(
    client: httpx.Client, access_token: str
) -> None:
    client.post("/_emulator/faults", json={"seconds": 10, "status": 500})

    during = [send_events(client, access_token, [make_event()]).status_code for _ in range(3)]
    client.post("/_emulator/clock", json={"advance": 10})
    after = send_events(client, access_token, [make_event()]).status_code

    assert during == [500, 500, 500]
    assert after == 207


def test_token_endpoint_can_fail_too(client: httpx.Client, access_token: str) -> None:
    tokens = login(client)
    client.post("/_emulator/faults", json={"target": "token", "status": 500})

    failed = refresh(client, tokens["refresh_token"])
    events = send_events(client, access_token, [make_event()])

    assert failed.status_code == 500
    assert failed.json()["error"] == "server_error"
    assert events.status_code == 207  # the events endpoint is untouched
    assert refresh(client, tokens["refresh_token"]).status_code == 200


def test_token_fault_can_imitate_invalid_grant(client: httpx.Client) -> None:
    tokens = login(client)
    client.post(
        "/_emulator/faults", json={"target": "token", "status": 400, "code": "invalid_grant"}
    )

    assert refresh(client, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_per_event_error_fault_fails_every_event(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json={"per_event_error": "TOO_MANY_REQUESTS", "count": 1})

    faulted = send_events(client, access_token, [make_event(), make_event()])
    normal = send_events(client, access_token, [make_event()])

    assert faulted.status_code == 207
    assert faulted.json()["success"] == []
    assert [entry["index"] for entry in faulted.json()["error"]] == [0, 1]
    assert {e["errors"][0]["code"] for e in faulted.json()["error"]} == {"TOO_MANY_REQUESTS"}
    assert normal.json()["error"] == []


def test_dropped_connection_is_a_transport_error(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json={"drop_connection": True, "count": 1})
    event = make_event()

    with pytest.raises(httpx.TransportError):
        send_events(client, access_token, [event])
    retried = send_events(client, access_token, [event])
    received = client.get("/_emulator/received").json()["requests"]

    assert retried.status_code == 207
    assert received[0]["status"] is None
    assert received[0]["fault"] == {"target": "events", "drop_connection": True}
    assert received[0]["body"] == received[1]["body"]  # the retry resent the same events


def test_token_connection_can_be_dropped(client: httpx.Client) -> None:
    tokens = login(client)
    client.post("/_emulator/faults", json={"target": "token", "drop_connection": True})

    with pytest.raises(httpx.TransportError):
        refresh(client, tokens["refresh_token"])


def test_delay_makes_a_short_timeout_expire_but_amazon_still_processes(
    client: httpx.Client, access_token: str
) -> None:
    client.post("/_emulator/faults", json={"delay": 5.0, "count": 1})
    event = make_event()

    with pytest.raises(httpx.TimeoutException):
        client.post(
            EVENTS, json={"events": [event]}, headers=headers_for(access_token), timeout=0.3
        )
    # The emulator stops waiting once the client is gone and carries the request out.
    accepted = _wait_for_accepted(client, expected=1)

    assert accepted == [event]
    assert client.get("/_emulator/received").json()["requests"][0]["fault"] == {
        "target": "events",
        "delay": 5.0,
    }


def _wait_for_accepted(client: httpx.Client, expected: int) -> list[Any]:
    deadline = time.monotonic() + 5
    while True:
        events: list[Any] = client.get("/_emulator/received/events").json()["events"]
        if len(events) >= expected or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def test_delay_with_status_answers_late(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json={"delay": 0.3, "status": 504})

    answer = send_events(client, access_token, [make_event()])

    assert answer.status_code == 504
    assert answer.elapsed.total_seconds() >= 0.25


def test_faults_can_be_listed_and_cleared(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json={"status": 503, "count": 5})

    listed = client.get("/_emulator/faults").json()
    cleared = client.delete("/_emulator/faults")

    assert listed == {"faults": [{"target": "events", "status": 503, "remaining": 5}]}
    assert cleared.status_code == 204
    assert client.get("/_emulator/faults").json() == {"faults": []}
    assert send_events(client, access_token, [make_event()]).status_code == 207


@pytest.mark.parametrize(
    "spec",
    [
        {"status": 200},
        {"status": 503, "drop_connection": True},
        {"count": 2},
        {"status": 503, "count": 0},
        {"status": 503, "target": "profiles"},
        {"per_event_error": "NOT_A_CODE"},
        {"per_event_error": "INTERNAL_ERROR", "target": "token"},
        {"retry_after": 3},
        {"delay": -1},
        {"status": 503, "colour": "red"},
        "503",
    ],
)
def test_bad_fault_specs_are_refused(client: httpx.Client, spec: Any) -> None:
    answer = client.post("/_emulator/faults", json=spec)

    assert answer.status_code == 400
    assert answer.json()["error"]
    assert client.get("/_emulator/faults").json() == {"faults": []}


# Recording


def test_recording_keeps_request_and_outcome_but_not_the_token(
    client: httpx.Client, access_token: str
) -> None:
    events = [make_event(), make_event(countryCode="XX")]
    send_events(client, access_token, events)

    received = client.get("/_emulator/received").json()
    (call,) = received["requests"]

    assert received["count"] == 1
    assert call["account_id"] == ACCOUNT_ID
    assert call["headers"]["authorization"] == "Bearer <redacted>"
    assert access_token not in str(received)
    assert call["headers"]["amazon-ads-clientid"] == CLIENT_ID
    assert call["body"] == {"events": events}
    assert call["status"] == 207
    assert [entry["index"] for entry in call["response"]["success"]] == [0]
    assert [entry["index"] for entry in call["response"]["error"]] == [1]
    assert call["received_at"].endswith("Z")


def test_refused_requests_are_recorded_too(client: httpx.Client) -> None:
    event = make_event()
    send_events(client, "Atza|bogus", [event])

    (call,) = client.get("/_emulator/received").json()["requests"]

    assert call["status"] == 401
    assert call["body"] == {"events": [event]}


def test_accepted_events_flattened_with_filters(client: httpx.Client, access_token: str) -> None:
    first, second = make_event(eventId="a"), make_event(eventId="b")
    resent = make_event(eventId="a", value=1.0)
    send_events(client, access_token, [first, make_event(countryCode="XX")])
    send_events(client, access_token, [second], **{"Amazon-Ads-AccountId": "999"})
    send_events(client, access_token, [resent])

    everything = client.get("/_emulator/received/events").json()
    unique = client.get("/_emulator/received/events", params={"unique": "true"}).json()
    one_account = client.get("/_emulator/received/events", params={"account_id": "999"}).json()

    assert everything == {"count": 3, "events": [first, second, resent]}
    assert unique == {"count": 2, "events": [second, resent]}  # the latest per eventId
    assert one_account == {"count": 1, "events": [second]}


def test_stats_count_and_delete_clears(client: httpx.Client, access_token: str) -> None:
    client.post("/_emulator/faults", json={"status": 503})
    send_events(client, access_token, [make_event()])
    send_events(client, access_token, [make_event(), make_event(countryCode="XX")])

    stats = client.get("/_emulator/stats").json()
    cleared = client.delete("/_emulator/received")
    after = client.get("/_emulator/stats").json()

    assert stats["requests"] == 2
    assert stats["statuses"] == {"503": 1, "207": 1}
    assert (stats["accepted_events"], stats["rejected_events"]) == (1, 1)
    assert cleared.status_code == 204
    assert client.get("/_emulator/received").json() == {"count": 0, "requests": []}
    assert (after["requests"], after["accepted_events"]) == (0, 0)


def test_retention_is_bounded_but_counters_are_exact(
    client: httpx.Client, access_token: str
) -> None:
    client.post("/_emulator/config", json={"max_recorded_requests": 2})
    sent = [make_event() for _ in range(3)]
    for event in sent:
        send_events(client, access_token, [event])

    kept = client.get("/_emulator/received/events").json()["events"]
    stats = client.get("/_emulator/stats").json()

    assert kept == sent[1:]
    assert (stats["requests"], stats["accepted_events"], stats["evicted_requests"]) == (3, 3, 1)


# The app as a whole


def test_config_changes_are_checked(client: httpx.Client) -> None:
    unknown = client.post("/_emulator/config", json={"colour": "red"})
    wrong_type = client.post("/_emulator/config", json={"rotate_refresh_tokens": "yes"})
    fine = client.post("/_emulator/config", json={"max_future_seconds": 60})

    assert unknown.status_code == 400
    assert wrong_type.status_code == 400
    assert fine.json()["max_future_seconds"] == 60
    assert fine.json()["rotate_refresh_tokens"] is False


def test_reset_forgets_tokens_faults_records_and_clock(
    client: httpx.Client, access_token: str
) -> None:
    send_events(client, access_token, [make_event()])
    client.post("/_emulator/faults", json={"status": 503})
    client.post("/_emulator/clock", json={"advance": 100})

    assert client.post("/_emulator/reset").status_code == 204
    assert send_events(client, access_token, [make_event()]).status_code == 401
    assert client.get("/_emulator/received").json()["count"] == 1  # only the 401 above
    assert client.get("/_emulator/clock").json()["offset_seconds"] == 0


def test_two_emulators_do_not_share_state() -> None:
    with emulator() as first, emulator(client_id="second-client") as second:
        tokens = login(first)
        first.post("/_emulator/faults", json={"status": 503})

        assert second.get("/_emulator/faults").json() == {"faults": []}
        assert send_events(second, tokens["access_token"], [make_event()]).status_code == 401
        assert authorize(second).status_code == 400  # first's client id is unknown there


def test_serve_runs_the_emulator_under_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))

    serve(port=9200, client_id="cli-client")

    ((app, kwargs),) = calls
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 9200)
    assert app.emulator.client_id == "cli-client"
