"""Who may call what: every route's authentication, isolation between outputs, no SSRF.

Relay and emulator run as servers on loopback (e2e_helpers); every test runs on SQLite
and on PostgreSQL.

- The route table is read from the app at run time (``app.routes``, walked into every
  included router and mount), so a route added later is tested without being listed: a
  new web page under /ui/ must answer to the UI session alone, and any other new route
  fails the test until it is placed in a family of service.md ("HTTP routes") or in
  the public allow-list.
- Each kind of caller talks from its own loopback address (127.0.0.x; Linux routes the
  whole 127/8 to lo): the relay counts failed authentications per client address, and
  a caller's refusals must not spend another caller's budget.
- What the relay sends out is recorded by wrapping the method of its one outbound HTTP
  client (``AiohttpClient.post``): the real request still goes out; the wrapper only
  writes down the URL and headers, so a test can say where every request went.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from e2e_helpers import (
    Conn,
    Stack,
    accepted_event_ids,
    assert_exactly_the_accepted_reached_amazon,
    now_ms,
    query_of,
    relay_stack,
    sdk_batch,
    sdk_custom_event,
    sdk_purchase,
)
from starlette.routing import BaseRoute, Mount, Route

from app.auth import FAILURES_ALLOWED
from app.http import AiohttpClient, HttpAnswer
from app.main import create_app
from app.web.routes import CONTENT_SECURITY_POLICY

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
ABSENT = {
    "output_id": "out_absent000000",
    "connection_id": "con_absent000000",
    "delivery_id": "dlv_absent000000",
}


# --- callers: one loopback address each ------------------------------------------------


@contextmanager
def caller_at(stack: Stack, address: str, **options: Any) -> Iterator[httpx.Client]:
    """An HTTP client of the relay whose connections come from ``address`` (127.0.0.x)."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(
        base_url=stack.relay_url, transport=transport, timeout=30, **options
    ) as client:
        yield client


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found, f"no CSRF field on {page.request.url}: {page.status_code}"
    return found.group(1)


def ui_session(client: httpx.Client, admin_token: str, *, next_page: str = "/ui/") -> str:
    """Sign ``client`` in to the web UI; returns the session's CSRF token."""
    token = csrf_of(client.get("/ui/login"))
    answer = client.post(
        "/ui/login", data={"csrf_token": token, "password": admin_token, "next": next_page}
    )
    assert answer.status_code == 303, answer.text
    return csrf_of(client.get("/ui/outputs/new"))


def basic(key: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}


# --- what the relay sends out ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outbound:
    url: str
    headers: Mapping[str, str]
    form: Mapping[str, str] | None


@contextmanager
def outbound_requests() -> Iterator[list[Outbound]]:
    """Every request the relay's HTTP client sends while active (the relay has one
    client, for the Events API and Login with Amazon alike)."""
    sent: list[Outbound] = []
    original = AiohttpClient.post

    async def post(
        self: AiohttpClient,
        url: str,
        *,
        content: bytes | None = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpAnswer:
        lowered = {name.lower(): value for name, value in (headers or {}).items()}
        sent.append(Outbound(url, lowered, dict(form) if form is not None else None))
        return await original(self, url, content=content, form=form, headers=headers)

    AiohttpClient.post = post  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        AiohttpClient.post = original  # type: ignore[method-assign]


# --- the route table -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class RouteKey:
    method: str
    path: str  # the template, e.g. /v1/outputs/{output_id}

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def every_route(routes: list[BaseRoute], prefix: str = "") -> Iterator[RouteKey]:
    """Every (method, path template) the app answers, through included routers (FastAPI
    keeps them as wrappers with ``original_router``) and mounts. HEAD comes with GET."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            included = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from every_route(inner.routes, prefix + included)
        elif isinstance(route, Mount):
            yield RouteKey("GET", f"{prefix}{route.path}/{{path}}")
        elif isinstance(route, Route):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                yield RouteKey(method, prefix + route.path)
        else:
            raise AssertionError(f"a route of a kind this table does not know: {route!r}")


def static_file(routes: list[BaseRoute]) -> str:
    """A file the static mount serves (its directory read at run time)."""
    (mount,) = [r for r in routes if isinstance(r, Mount)]
    directory = Path(mount.app.directory)  # type: ignore[attr-defined]
    return sorted(p.name for p in directory.iterdir() if p.is_file())[0]


ANONYMOUS = "anonymous"
WRONG_BEARER = "wrong admin token"
WRONG_SECRET = "connection key, wrong secret"
ADMIN_BEARER = "admin bearer token"
UI_SESSION = "web UI session"
MPARTICLE, SEGMENT, RECORDS = "mparticle connection", "segment connection", "records connection"
CALLERS = (
    ANONYMOUS, WRONG_BEARER, WRONG_SECRET, MPARTICLE, SEGMENT, RECORDS, UI_SESSION, ADMIN_BEARER,
)  # fmt: skip

# Reachable without credentials (service.md: "Operations", the OpenAPI docs, the LwA
# callback that Amazon sends the browser to, the UI's login form and its static files),
# with the answer an anonymous caller gets. Every caller must get that same answer:
# credentials make no difference here.
PUBLIC = {
    RouteKey("GET", "/healthz"): 200,
    RouteKey("GET", "/readyz"): 200,
    RouteKey("GET", "/metrics"): 200,
    # GET /docs (OpenAPI), the schema it loads and FastAPI's other views of it.
    RouteKey("GET", "/docs"): 200,
    RouteKey("GET", "/docs/oauth2-redirect"): 200,
    RouteKey("GET", "/openapi.json"): 200,
    RouteKey("GET", "/redoc"): 200,
    # Authenticated by its state instead: without one it is a 400 page.
    RouteKey("GET", "/oauth/amazon/callback"): 400,
    RouteKey("GET", "/ui"): 303,  # → /ui/, which asks for the login
    RouteKey("GET", "/ui/login"): 200,
    # The login form checks the password itself: none sent, none accepted.
    RouteKey("POST", "/ui/login"): 401,
    # Ends the caller's own session (CSRF-checked): nothing to authenticate. → the login
    RouteKey("POST", "/ui/logout"): 303,
    RouteKey("GET", "/ui/static/{path}"): 200,
}
# A signed-in browser asking for the login page is sent on to the UI instead.
SIGNED_IN_ANSWERS = {RouteKey("GET", "/ui/login"): 303}
ADMIN = frozenset({ADMIN_BEARER})
# service.md "HTTP routes": the credentials each named route takes.
FAMILIES = {
    RouteKey("POST", "/v2/events"): frozenset({MPARTICLE}),
    RouteKey("POST", "/v2/bulkevents"): frozenset({MPARTICLE}),
    **{
        RouteKey("POST", f"/v1/{kind}"): frozenset({SEGMENT})
        for kind in ("batch", "track", "page", "screen", "identify", "group", "alias")
    },
    RouteKey("POST", "/v1/records"): frozenset({RECORDS}),
    RouteKey("POST", "/v1/outputs"): ADMIN,
    RouteKey("GET", "/v1/outputs"): ADMIN,
    RouteKey("GET", "/v1/outputs/{output_id}"): ADMIN,
    RouteKey("PATCH", "/v1/outputs/{output_id}"): ADMIN,
    RouteKey("DELETE", "/v1/outputs/{output_id}"): ADMIN,
    RouteKey("POST", "/v1/outputs/{output_id}/connections"): ADMIN,
    RouteKey("GET", "/v1/outputs/{output_id}/connections"): ADMIN,
    RouteKey("PATCH", "/v1/connections/{connection_id}"): ADMIN,
    RouteKey("DELETE", "/v1/connections/{connection_id}"): ADMIN,
    RouteKey("POST", "/v1/preview/{source}"): ADMIN,
    RouteKey("GET", "/v1/deliveries"): ADMIN,
    RouteKey("GET", "/v1/deliveries/{delivery_id}"): ADMIN,
    RouteKey("POST", "/v1/deliveries/{delivery_id}/retry"): ADMIN,
    # "admin-authenticated: the UI's session cookie or the admin bearer token"
    RouteKey("GET", "/oauth/amazon/start"): frozenset({ADMIN_BEARER, UI_SESSION}),
}


def expected_callers(route: RouteKey) -> frozenset[str]:
    """Who gets past authentication on ``route``; every other web page is the UI's."""
    if route in FAMILIES:
        return FAMILIES[route]
    assert route.path.startswith("/ui/"), f"{route} is in no family of service.md"
    return frozenset({UI_SESSION})


def refused(route: RouteKey, answer: httpx.Response) -> bool:
    """Turned away for its credentials: 401/403, or a web page's redirect to the login."""
    assert answer.status_code != 429, f"{route}: the failed-authentication limit interfered"
    if answer.status_code in (401, 403):
        return True
    location = urlsplit(answer.headers.get("location", ""))
    return answer.status_code == 303 and location.path == "/ui/login"


def concrete(route: RouteKey, static_name: str) -> str:
    """The route's path with its parameters filled: ids that do not exist (a request
    that gets past authentication then ends in a 404, and changes nothing)."""
    values = {**ABSENT, "source": "mparticle", "action": "deactivate", "path": static_name}
    names = re.findall(r"{(\w+)}", route.path)
    missing = [name for name in names if name not in values]
    assert not missing, f"{route}: no value for path parameter(s) {missing}"
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], route.path)


@dataclass
class Caller:
    name: str
    client: httpx.Client
    headers: dict[str, str] = field(default_factory=dict)
    csrf: str = ""  # its own (signed-out unless UI_SESSION) session's token
    signed_in: bool = False  # UI_SESSION: the browser holds a signed-in session

    def call(self, route: RouteKey, url: str, stack: Stack) -> httpx.Response:
        ui_form = route.path.startswith("/ui") and route.method == "POST"
        if self.name == UI_SESSION and not self.signed_in:
            self.client.cookies.clear()
            self.csrf = ui_session(self.client, stack.admin_token)
            self.signed_in = True
        elif self.name != UI_SESSION and ui_form:
            # A fresh signed-out session and its token before each form: POST /ui/logout
            # clears the session's token.
            self.client.cookies.clear()
            self.csrf = csrf_of(self.client.get("/ui/login"))
        params = {"output_id": ABSENT["output_id"]}  # /oauth/amazon/start needs one
        if ui_form:
            # The form's CSRF token is sent, so what decides is the sign-in alone.
            answer = self.client.post(
                url, params=params, headers=self.headers, data={"csrf_token": self.csrf}
            )
            # A form that sends the signed-in browser to the login (POST /ui/logout)
            # ended its session: sign in again before the next call.
            self.signed_in = self.signed_in and not (
                answer.status_code == 303
                and urlsplit(answer.headers["location"]).path == "/ui/login"
            )
            return answer
        body: dict[str, Any] | None = {} if route.method in ("POST", "PATCH") else None
        return self.client.request(
            route.method, url, params=params, headers=self.headers, json=body
        )


def test_every_route_answers_only_to_its_own_credentials(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path) as stack, ExitStack() as exits:
        app = create_app(stack.settings)  # the same code, for its route table only
        routes = sorted(set(every_route(app.routes)))
        static_name = static_file(app.routes)
        # The walk sees at least every route of the served OpenAPI schema.
        schema = stack.client.get("/openapi.json").json()
        documented = {
            RouteKey(method.upper(), path)
            for path, operations in schema["paths"].items()
            for method in operations
        }
        assert documented <= set(routes)
        assert set(PUBLIC) | set(FAMILIES) <= set(routes), "a route of the table is gone"

        output = stack.create_output()
        conns = {src: stack.connect(output["id"], src) for src in ("mparticle", "segment")}
        conns["records"] = stack.connect(output["id"], "records")
        headers = {
            ANONYMOUS: {},
            WRONG_BEARER: {"Authorization": "Bearer adm-a-wrong-guess"},
            WRONG_SECRET: basic(conns["mparticle"].key, "not-the-secret"),
            MPARTICLE: basic(*conns["mparticle"].auth),
            SEGMENT: basic(*conns["segment"].auth),
            RECORDS: basic(*conns["records"].auth),
            UI_SESSION: {},
            ADMIN_BEARER: {"Authorization": f"Bearer {stack.admin_token}"},
        }
        callers = []
        for number, name in enumerate(CALLERS, start=2):
            client = exits.enter_context(caller_at(stack, f"127.0.0.{number}"))
            callers.append(Caller(name, client, headers[name]))

        urls = {route: concrete(route, static_name) for route in routes}
        answers: dict[RouteKey, dict[str, httpx.Response]] = {}
        for route in routes:
            answers[route] = {c.name: c.call(route, urls[route], stack) for c in callers}

        passed = {
            route: frozenset(name for name, a in by.items() if not refused(route, a))
            for route, by in answers.items()
            if route not in PUBLIC
        }
        assert passed == {r: expected_callers(r) for r in routes if r not in PUBLIC}
        for route, expected_status in PUBLIC.items():
            statuses = {name: a.status_code for name, a in answers[route].items()}
            expected = dict.fromkeys(CALLERS, expected_status)
            if route in SIGNED_IN_ANSWERS:
                expected[UI_SESSION] = SIGNED_IN_ANSWERS[route]
            assert statuses == expected, route
        # Without credentials: the API says how to authenticate, a page sends to the login.
        for route in routes:
            anonymous = answers[route][ANONYMOUS]
            if route in PUBLIC:
                continue
            if route.path.startswith("/ui/"):
                assert anonymous.status_code == 303, route
                target = urlsplit(anonymous.headers["location"])
                assert target.path == "/ui/login", route
                if route.method == "GET":  # back to the page asked for, after the login
                    next_page = f"{urls[route]}?{urlencode({'output_id': ABSENT['output_id']})}"
                    assert parse_qs(target.query)["next"] == [next_page], route
            else:
                assert anonymous.status_code == 401, route
                scheme = "Basic" if FAMILIES[route] & {MPARTICLE, SEGMENT, RECORDS} else "Bearer"
                if route.path != "/oauth/amazon/start":
                    assert anonymous.headers["www-authenticate"].startswith(scheme), route
        # Every answer, refusals and redirects included, carries the security headers;
        # every answer of a web page (not of its static files) the page policy too.
        for route, by_caller in answers.items():
            for name, answer in by_caller.items():
                for header, value in SECURITY_HEADERS.items():
                    assert answer.headers.get(header) == value, (route, name, header)
                if route.path.startswith("/ui") and not route.path.startswith("/ui/static/"):
                    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
                    assert answer.headers["cache-control"] == "no-store", (route, name)
        # The public pages' redirects lead only to the UI's own pages.
        assert answers[RouteKey("GET", "/ui")][ANONYMOUS].headers["location"] == "/ui/"
        signed_in = answers[RouteKey("GET", "/ui/login")][UI_SESSION]
        assert signed_in.headers["location"] == "/ui/"
        # Nothing was created or changed by all those calls.
        assert stack.admin.get("/v1/outputs").json() == [stack.output(output["id"])]
        listed = stack.admin.get(f"/v1/outputs/{output['id']}/connections").json()
        assert sorted((c["id"], c["active"]) for c in listed) == sorted(
            (c.id, True) for c in conns.values()
        )
        assert stack.deliveries() == []


def test_every_admin_route_shares_one_failed_authentication_budget_per_client(
    database_url: str, tmp_path: Path
) -> None:
    """Every way of presenting the admin token (the API's bearer, /oauth/amazon/start,
    the UI's login form) counts its failures against one budget per client address:
    spreading guesses over the routes buys no more of them, and once the budget is
    spent the right token is refused too, so a guesser cannot learn it was right."""
    with relay_stack(database_url, tmp_path) as stack:
        output = stack.create_output()
        start = ("/oauth/amazon/start", {"output_id": output["id"]})
        with (
            caller_at(stack, "127.0.0.20") as guesser,
            caller_at(stack, "127.0.0.21") as neighbour,
        ):
            login_token = csrf_of(guesser.get("/ui/login"))
            for attempt in range(FAILURES_ALLOWED):
                wrong = {"Authorization": f"Bearer adm-guess-{attempt}"}
                if attempt % 3 == 0:
                    answer = guesser.get(start[0], params=start[1], headers=wrong)
                elif attempt % 3 == 1:
                    answer = guesser.get("/v1/outputs", headers=wrong)
                else:
                    answer = guesser.post(
                        "/ui/login",
                        data={"csrf_token": login_token, "password": wrong["Authorization"]},
                    )
                assert answer.status_code == 401, (attempt, answer.text)
            right = {"Authorization": f"Bearer {stack.admin_token}"}
            spent = {
                "api": guesser.get("/v1/outputs", headers=right).status_code,
                "lwa start": guesser.get(start[0], params=start[1], headers=right).status_code,
                "ui login": guesser.post(
                    "/ui/login", data={"csrf_token": login_token, "password": stack.admin_token}
                ).status_code,
            }
            assert spent == {"api": 429, "lwa start": 429, "ui login": 429}, (
                "every route that takes the admin token must count its failures"
            )
            # Another client address has its own budget.
            assert neighbour.get("/v1/outputs", headers=right).status_code == 200
            assert neighbour.get(start[0], params=start[1], headers=right).status_code == 302
        assert stack.sql("SELECT count(*) FROM oauth_states") == [(1,)]


# --- isolation between outputs ---------------------------------------------------------


def tokens_of(stack: Stack, output_id: str) -> str:
    """The access token the relay holds for ``output_id`` (decrypted with the test's keys)."""
    ((ciphertext,),) = stack.sql(
        "SELECT access_token_ciphertext FROM credentials WHERE output_id = :o", o=output_id
    )
    return stack.keyring.decrypt(ciphertext, output_id, purpose="access_token").reveal()


def delivered_event_ids(stack: Stack, output_id: str) -> dict[str, set[str]]:
    """For each connection: the eventIds of its deliveries to ``output_id``."""
    found: dict[str, set[str]] = {}
    for delivery in stack.deliveries(output_id=output_id):
        body = stack.delivery(delivery["id"])["body"]
        ids = {event["eventId"] for event in body["events"]}
        found.setdefault(delivery["connection_id"], set()).update(ids)
    return found


def test_a_connection_reaches_only_its_own_output(database_url: str, tmp_path: Path) -> None:
    with outbound_requests() as sent, relay_stack(database_url, tmp_path) as stack:
        a, a_mparticle = stack.ready_output(name="Output A", advertiser_id="1111")
        b, b_mparticle = stack.ready_output(name="Output B", advertiser_id="2222")
        a_segment = stack.connect(a["id"], "segment", "A segment")
        a_records = stack.connect(a["id"], "records", "A records")
        b_segment = stack.connect(b["id"], "segment", "B segment")
        b_delivery = stack.post_events(b_mparticle, sdk_batch([200]))["deliveries"][0]
        stack.wait_settled()
        b_before = {
            "output": stack.output(b["id"]),
            "connections": stack.admin.get(f"/v1/outputs/{b['id']}/connections").json(),
            "deliveries": stack.deliveries(output_id=b["id"]),
        }

        # A's connections post while naming B every way a request could: the query, the
        # body, headers, Segment's integrations/context, a records column.
        names_b = {
            "output_id": b["id"],
            "outputId": b["id"],
            "advertiser_id": "2222",
            "connection_id": b_mparticle.id,
        }
        header_b = {
            "X-Output-Id": b["id"],
            "X-Relay-Output": b["id"],
            "Amazon-Ads-AccountId": "2222",
            "X-Connection-Id": b_mparticle.id,
        }
        mparticle_batch = sdk_batch([101]) | names_b
        segment_message = {
            "type": "track",
            "event": "Order Completed",
            "messageId": "a-seg-1",
            "userId": "user-1",
            "properties": {"total": 10, "currency": "USD", **names_b},
            "context": {
                "traits": {"email": "a@example.com"},
                "locale": "en-US",
                "output_id": b["id"],
            },
            "integrations": {"Amazon CAPI": names_b},
            # A write key in the body is read only without Basic credentials.
            "writeKey": f"{b_segment.key}.{b_segment.secret}",
        }
        record = {
            "event_type": "purchase",
            "event_id": "a-rec-1",
            "email": "a@example.com",
            "country_code": "US",
            "output_id": b["id"],
            "connection_id": b_mparticle.id,
        }
        posts: list[tuple[str, Conn, Any]] = [
            ("/v2/events", a_mparticle, mparticle_batch),
            ("/v2/bulkevents", a_mparticle, [sdk_batch([102]) | names_b]),
            ("/v1/batch", a_segment, {"batch": [segment_message], "context": names_b}),
            ("/v1/track", a_segment, segment_message | {"messageId": "a-seg-2"}),
            ("/v1/records", a_records, [record]),
        ]
        with caller_at(stack, "127.0.0.30") as a_client:
            for path, conn, body in posts:
                answer = a_client.post(
                    path, json=body, params=names_b, headers=basic(*conn.auth) | header_b
                )
                assert answer.status_code in (200, 202), (path, answer.text)
            # Keys and secrets do not mix across connections.
            for key, secret in (
                (a_mparticle.key, b_mparticle.secret),
                (b_mparticle.key, a_mparticle.secret),
            ):
                mixed = a_client.post("/v2/events", json=sdk_batch([103]), auth=(key, secret))
                assert mixed.status_code == 401
            # A's credentials cannot read or change anything of B's, in any form.
            reads_and_changes = [
                ("GET", f"/v1/outputs/{b['id']}", None),
                ("PATCH", f"/v1/outputs/{b['id']}", {"advertiser_id": "1111"}),
                ("DELETE", f"/v1/outputs/{b['id']}", None),
                ("GET", f"/v1/outputs/{b['id']}/connections", None),
                (
                    "POST",
                    f"/v1/outputs/{b['id']}/connections",
                    {"source": "mparticle", "name": "x"},
                ),
                ("PATCH", f"/v1/connections/{b_mparticle.id}", {"active": False}),
                ("DELETE", f"/v1/connections/{b_segment.id}", None),
                ("GET", "/v1/deliveries", None),
                ("GET", f"/v1/deliveries/{b_delivery}", None),
                ("POST", f"/v1/deliveries/{b_delivery}/retry", None),
                ("POST", "/v1/preview/mparticle", sdk_batch([104])),
                ("GET", "/oauth/amazon/start", None),
            ]
            for method, path, body in reads_and_changes:
                answer = a_client.request(
                    method,
                    path,
                    json=body,
                    params={"output_id": b["id"]},
                    headers=basic(*a_mparticle.auth),
                )
                assert answer.status_code == 401, (method, path, answer.text)
                assert b["id"] not in answer.text
                assert "2222" not in answer.text
            for page in (f"/ui/outputs/{b['id']}", f"/ui/deliveries/{b_delivery}"):
                answer = a_client.get(page, headers=basic(*a_mparticle.auth))
                assert answer.status_code == 303
                assert urlsplit(answer.headers["location"]).path == "/ui/login"
        stack.wait_settled()

        # Every event of A's connections went to A's deliveries, none to B's.
        a_ids = {"101", "102", "a-seg-1", "a-seg-2", "a-rec-1"}
        assert delivered_event_ids(stack, a["id"]) == {
            a_mparticle.id: {"101", "102"},
            a_segment.id: {"a-seg-1", "a-seg-2"},
            a_records.id: {"a-rec-1"},
        }
        assert delivered_event_ids(stack, b["id"]) == {b_mparticle.id: {"200"}}
        # B is as it was: settings, connections (still active), deliveries.
        assert {
            "output": stack.output(b["id"]),
            "connections": stack.admin.get(f"/v1/outputs/{b['id']}/connections").json(),
            "deliveries": stack.deliveries(output_id=b["id"]),
        } == b_before
        # At Amazon: A's events only under A's advertiser and A's access token.
        token = {a["id"]: tokens_of(stack, a["id"]), b["id"]: tokens_of(stack, b["id"])}
        events_requests = [r for r in sent if r.url.endswith("/adsApi/v1/create/events")]
        used = {
            (r.headers["amazon-ads-accountid"], r.headers["authorization"]) for r in events_requests
        }
        assert used == {("1111", f"Bearer {token[a['id']]}"), ("2222", f"Bearer {token[b['id']]}")}
        by_account: dict[str, set[str]] = {}
        for request in stack.received():
            ids = {event["eventId"] for event in request["body"]["events"]}
            by_account.setdefault(request["account_id"], set()).update(ids)
        assert by_account == {"1111": a_ids, "2222": {"200"}}
        assert_exactly_the_accepted_reached_amazon(stack, a_ids | {"200"})


# --- no request to a URL a user supplied (SSRF) ---------------------------------------


class Canary:
    """An HTTP server on loopback that writes down every connection and request."""

    def __init__(self) -> None:
        self.connections: list[tuple[str, int]] = []
        self.requests: list[str] = []
        canary = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_request(self) -> None:
                canary.requests.append(f"{self.command} {self.path} Host={self.headers['host']}")
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = do_request  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: Any, client_address: Any) -> bool:
                canary.connections.append(client_address)
                return True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def urls(self) -> list[str]:
        """The canary under every spelling that reaches it (and one that needs DNS)."""
        return [
            f"http://127.0.0.1:{self.port}/ssrf",
            f"http://localhost:{self.port}/ssrf?from=relay",
            f"https://127.0.0.1:{self.port}/ssrf",
            f"//127.0.0.1:{self.port}/ssrf",
            f"http://ssrf-canary.invalid:{self.port}/ssrf",
        ]

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Canary:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_no_url_a_user_supplies_is_ever_requested(database_url: str, tmp_path: Path) -> None:
    with (
        Canary() as canary,
        outbound_requests() as sent,
        relay_stack(database_url, tmp_path) as stack,
    ):
        url, *spellings = canary.urls
        lure = {
            "Host": canary.netloc,
            "Referer": url,
            "Origin": f"http://{canary.netloc}",
            "X-Forwarded-Host": canary.netloc,
            "X-Forwarded-Proto": "http",
            "Forwarded": f"host={canary.netloc};proto=http",
            "X-Original-URL": url,
            "X-Rewrite-URL": url,
        }
        # Every free-text setting of an output holds the canary's URL; the one setting
        # with a pattern refuses it.
        output = stack.create_output(
            name=url,
            partner_name=" ".join(canary.urls),
            consent_purpose_user_data=url,
            consent_purpose_ad_storage=spellings[0],
            consent_category_advertising=spellings[1],
            conversion_rules=[
                {"conversion_type": "LEAD", "event_name": url, "name": spellings[0]},
            ],
        )
        bad = stack.admin.post(
            "/v1/outputs", json={"name": "x", "advertiser_id": "1", "data_set_name": url}
        )
        assert bad.status_code == 422
        conns = {
            source: stack.connect(output["id"], source, name=f"{source} {url}")
            for source in ("mparticle", "segment", "records")
        }

        # Login with Amazon, with the canary in the headers a proxy could set: the
        # relay still sends the browser to the configured LwA and back to itself.
        browser = stack.browser()
        start = browser.get(
            f"{stack.relay_url}/oauth/amazon/start",
            params={"output_id": output["id"], "redirect_uri": url, "next": url},
            headers={"Authorization": f"Bearer {stack.admin_token}", "Host": canary.netloc} | lure,
        )
        assert start.status_code == 302
        assert start.headers["location"].startswith(f"{stack.amazon_url}/ap/oa?")
        assert query_of(start.headers["location"])["redirect_uri"] == stack.settings.redirect_uri
        callback = stack.authorize(start, browser)
        # Forged answers carrying the canary: each a 400 page, no exchange attempted.
        real = query_of(callback)
        base = f"{stack.relay_url}/oauth/amazon/callback"
        for forged in (
            {"state": url, "code": url},
            {"state": f"{output['id']}~{url}", "code": real["code"]},
            {"error": url, "error_description": url, "state": url},
        ):
            answer = browser.get(f"{base}?{urlencode(forged)}", headers=lure)
            assert answer.status_code == 400
            assert "location" not in answer.headers
        done = browser.get(
            f"{callback}&{urlencode({'redirect_uri': url, 'next': url})}", headers=lure
        )
        assert done.status_code == 303
        assert done.headers["location"] == f"/ui/outputs/{output['id']}?login=ok"
        # A code that is a URL is only ever sent, as data, to the configured token URL.
        again = stack.browser()
        second = query_of(stack.authorize(stack.start_login(output["id"], again), again))
        failed = again.get(base, params=second | {"code": url, "error_description": url})
        assert failed.status_code == 400
        assert stack.output(output["id"])["status"] == "configured"

        # The web UI: the login's `next` never leaves the UI, forms and preview take URLs.
        with caller_at(stack, "127.0.0.40") as ui:
            for target in canary.urls:
                token = csrf_of(ui.get("/ui/login", params={"next": target}, headers=lure))
                signed_in = ui.post(
                    "/ui/login",
                    data={"csrf_token": token, "password": stack.admin_token, "next": target},
                    headers=lure | {"Origin": stack.relay_url},
                )
                assert signed_in.status_code == 303
                assert signed_in.headers["location"] == "/ui/"
                assert ui.get("/ui/login", params={"next": target}).headers["location"] == "/ui/"
                ui.cookies.clear()
            token = ui_session(ui, stack.admin_token)
            previewed = ui.post(
                f"/ui/outputs/{output['id']}/preview",
                data={
                    "csrf_token": token,
                    "source": "mparticle",
                    "payload": json.dumps(mparticle_with_urls(canary.urls, 9)),
                },
            )
            assert previewed.status_code == 200, previewed.text
            assert url in previewed.text  # mapped as data
            edited = ui.post(
                f"/ui/outputs/{output['id']}/connections",
                data={"csrf_token": token, "source": "segment", "name": spellings[1]},
            )
            assert edited.status_code == 201

        # Events full of the canary's URL, on every ingest route.
        batch = mparticle_with_urls(canary.urls, 1)
        accepted = accepted_event_ids(batch, stack.post_events(conns["mparticle"], batch))
        in_bulk = mparticle_with_urls(canary.urls, 2)
        bulk = stack.client.post(
            "/v2/bulkevents", json=[in_bulk], auth=conns["mparticle"].auth, headers=lure
        )
        assert bulk.status_code == 202
        accepted |= accepted_event_ids(in_bulk, bulk.json()["batches"][0])
        segment = stack.client.post(
            "/v1/batch",
            json={"batch": segment_with_urls(canary.urls), "context": {"page": {"url": url}}},
            auth=conns["segment"].auth,
            headers=lure,
            params={"wait": 5},
        )
        assert segment.status_code == 200, segment.text
        assert segment.json()["accepted"] == 2
        accepted |= {"seg-1", "seg-2"}
        records = stack.client.post(
            "/v1/records",
            json=[
                {
                    "event_type": "purchase",
                    "event_id": "rec-1",
                    "event_name": url,
                    "email": "r@example.com",
                    "country_code": "US",
                    "user_id": url,
                    "page_url": url,
                    "image_url": spellings[0],
                }
            ],
            auth=conns["records"].auth,
            headers=lure,
        )
        assert records.status_code == 202
        assert records.json()["accepted"] == 1
        accepted.add("rec-1")
        # Preview through the admin API, with the canary in the settings too.
        preview = stack.admin.post(
            "/v1/preview/segment",
            params={
                "settings": json.dumps({"partner_name": url, "consent_purpose_user_data": url})
            },
            json={"batch": segment_with_urls(canary.urls)},
            headers=lure,
        )
        assert preview.status_code == 200
        assert len(preview.json()["requests"]) == 1
        assert {d["status"] for d in stack.wait_settled()} == {"delivered"}
        assert_exactly_the_accepted_reached_amazon(stack, accepted)
        received_text = json.dumps(stack.received())
        stats = stack.stats()

    # The canary's URL crossed the relay as data (Amazon received it in events) ...
    assert url in received_text
    # ... and nothing ever connected to the canary.
    assert (canary.connections, canary.requests) == ([], [])
    # Every request the relay sent went to the configured emulator: the code exchanges
    # (one login, one refused code) and one events request per delivery.
    assert sent, "the recorder saw nothing: it is not on the relay's client"
    assert {urlsplit(r.url).netloc for r in sent} == {urlsplit(stack.amazon_url).netloc}
    token_posts = [r for r in sent if r.url == f"{stack.amazon_url}/auth/o2/token"]
    events_posts = [r for r in sent if r.url == f"{stack.amazon_url}/adsApi/v1/create/events"]
    assert len(token_posts) + len(events_posts) == len(sent)
    assert [r.form["grant_type"] for r in token_posts if r.form] == ["authorization_code"] * 2
    assert len(events_posts) == stats["requests"]
    assert stats["token_grants"] == {"authorization_code": 1}


def mparticle_with_urls(urls: list[str], event_id: int) -> dict[str, Any]:
    """An mParticle batch whose free-text fields hold ``urls``."""
    url = urls[0]
    purchase = sdk_purchase(event_id, sku=url)
    page_view = sdk_custom_event(url, when_ms=now_ms() - 30_000)
    page_view.event_id = 1000 + event_id
    batch = sdk_batch([purchase, page_view], email="u@example.com")
    batch["events"][0]["data"]["custom_attributes"] = {
        "page_url": url,
        "referrer": urls[1],
        "image": urls[2],
        "$brand": urls[3],
        "$category": urls[4],
    }
    batch["events"][0]["data"]["product_action"]["products"][0]["brand"] = url
    batch["events"][1]["data"]["custom_attributes"] = {"url": url, "referrer": urls[1]}
    batch["user_attributes"] = {"website": url, "avatar": urls[2]}
    batch["application_info"] = {"application_name": url, "package": urls[1]}
    batch["source_request_id"] = url
    return batch


def segment_with_urls(urls: list[str]) -> list[dict[str, Any]]:
    url = urls[0]
    context = {
        "page": {"url": url, "referrer": urls[1], "path": "/", "search": f"?u={url}"},
        "traits": {"email": "s@example.com", "website": url, "avatar": urls[2]},
        "locale": "en-US",
        "userAgent": f"Mozilla/5.0 (+{url})",
        "campaign": {"source": url},
        "library": {"name": url, "version": "1"},
    }
    return [
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "seg-1",
            "userId": url,
            "properties": {
                "total": 5,
                "currency": "USD",
                "url": url,
                "image_url": urls[3],
                "brand": url,
                "products": [{"product_id": url, "url": url, "image_url": urls[4]}],
            },
            "context": context,
        },
        {
            "type": "page",
            "messageId": "seg-2",
            "anonymousId": "anon-1",
            "name": url,
            "properties": {"url": url, "referrer": urls[1], "title": url},
            "context": context,
        },
    ]
