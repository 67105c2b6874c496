"""The admin API and the ingest edge over real HTTP: validation, authentication, limits.

Relay and emulator run as servers on loopback (e2e_helpers); every test runs on SQLite
and on PostgreSQL. Wherever a request is refused, the test also checks that nothing
of it was stored.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import Stack, now_ms, relay_stack, sdk_batch, sdk_purchase

KIB = 1024


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(database_url, tmp_path) as running:
        yield running


def stored_deliveries(stack: Stack) -> int:
    ((count,),) = stack.sql("SELECT count(*) FROM deliveries")
    return int(count)


def error_locations(answer: httpx.Response) -> list[str]:
    """The fields a 422 names: FastAPI's ``detail[].loc`` without the ``body`` prefix,
    or the relay's own ``field``."""
    body = answer.json()
    if "detail" in body:
        return [".".join(str(p) for p in item["loc"][1:]) for item in body["detail"]]
    return [body["field"]]


def padded(batch: dict[str, Any], size: int) -> bytes:
    """``batch`` as JSON, padded with trailing spaces to exactly ``size`` bytes."""
    text = json.dumps(batch).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


# --- outputs ---------------------------------------------------------------------------


def test_outputs_are_created_listed_read_and_deleted(stack: Stack) -> None:
    body = {
        "name": "Shop",
        "advertiser_id": "123456789",
        "region": "EU",
        "data_set_name": "eu_purchases",
        "partner_name": "acme",
        "max_event_age_hours": 72,
        "match_keys": "extended",
        "consent_mode": "require_granted",
        "consent_purpose_user_data": "amzn_user_data",
        "conversion_rules": [{"conversion_type": "SIGN_UP", "event_name": "Signed Up"}],
        "default_rules": False,
    }
    created = stack.admin.post("/v1/outputs", json=body)
    assert created.status_code == 201
    output = created.json()
    assert output["id"].startswith("out_")
    assert output["status"] == "needs_login"
    assert output["enabled"] is True
    assert {key: output[key] for key in body} == body
    assert stack.admin.get("/v1/outputs").json() == [stack.output(output["id"])]
    assert stack.admin.delete(f"/v1/outputs/{output['id']}").status_code == 204
    assert stack.admin.get(f"/v1/outputs/{output['id']}").status_code == 404
    assert stack.admin.delete(f"/v1/outputs/{output['id']}").status_code == 404
    assert stack.admin.get("/v1/outputs").json() == []


INVALID_OUTPUTS: list[tuple[dict[str, Any], str]] = [
    ({"advertiser_id": "12ab"}, "advertiser_id"),
    ({"advertiser_id": "-123"}, "advertiser_id"),
    ({"advertiser_id": ""}, "advertiser_id"),
    ({"advertiser_id": 12345}, "advertiser_id"),
    ({"region": "US"}, "region"),
    ({"region": "na"}, "region"),
    ({"data_set_name": "1purchases"}, "data_set_name"),
    ({"data_set_name": "abcd"}, "data_set_name"),
    ({"data_set_name": "has space"}, "data_set_name"),
    ({"data_set_name": "a" * 101}, "data_set_name"),
    ({"name": ""}, "name"),
    ({"max_event_age_hours": 0}, "max_event_age_hours"),
    ({"max_event_age_hours": 505}, "max_event_age_hours"),
    ({"match_keys": "everything"}, "match_keys"),
    ({"consent_mode": "ignore"}, "consent_mode"),
    ({"consent_purpose_user_data": "x" * 101}, "consent_purpose_user_data"),
    ({"partner_name": "p" * 257}, "partner_name"),
    ({"conversion_rules": [{"conversion_type": "BUY"}]}, "conversion_rules"),
    ({"conversion_rules": [{"conversion_type": "LEAD"}]}, "conversion_rules"),
    ({"conversion_rules": [{"conversion_type": "LEAD", "colour": "red"}]}, "conversion_rules"),
    ({"conversion_rules": "LEAD"}, "conversion_rules"),
    ({"enabled": "sometimes"}, "enabled"),
]


def test_invalid_output_fields_are_422_naming_the_field(stack: Stack) -> None:
    for change, field in INVALID_OUTPUTS:
        body = {"name": "Shop", "advertiser_id": "123"} | change
        answer = stack.admin.post("/v1/outputs", json=body)
        assert answer.status_code == 422, (change, answer.text)
        assert field in error_locations(answer), (change, answer.text)
    missing = stack.admin.post("/v1/outputs", json={"name": "Shop"})
    assert missing.status_code == 422
    assert error_locations(missing) == ["advertiser_id"]
    # The message of a rule error says which rule and which field is wrong.
    rule = stack.admin.post(
        "/v1/outputs",
        json={"name": "S", "advertiser_id": "1", "conversion_rules": [{"conversion_type": "X"}]},
    )
    assert "conversion_rules[0].conversion_type" in rule.text
    assert stack.admin.get("/v1/outputs").json() == []


def test_patch_changes_settings_but_never_status_id_or_credentials(stack: Stack) -> None:
    output = stack.create_output()
    url = f"/v1/outputs/{output['id']}"
    changed = stack.admin.patch(
        url, json={"name": "Renamed", "max_event_age_hours": 48, "data_set_name": "web_buys"}
    )
    assert changed.status_code == 200
    assert {k: changed.json()[k] for k in ("name", "max_event_age_hours", "data_set_name")} == {
        "name": "Renamed",
        "max_event_age_hours": 48,
        "data_set_name": "web_buys",
    }
    read_only: list[dict[str, Any]] = [
        {"status": "configured"},
        {"id": "out_mine"},
        {"refresh_token": "Atzr|stolen"},
        {"access_token": "Atza|stolen"},
        {"credentials": {"refresh_token": "Atzr|stolen"}},
        {"created_at": "2020-01-01T00:00:00Z"},
        {"name": "Sneaky", "status": "configured"},
    ]
    for body in read_only:
        answer = stack.admin.patch(url, json=body)
        assert answer.status_code == 422, body
        forbidden = [key for key in body if key != "name"]
        assert error_locations(answer) == forbidden, answer.text
        assert answer.json()["detail"][0]["type"] == "extra_forbidden"
    for required in ("name", "advertiser_id", "region"):
        answer = stack.admin.patch(url, json={required: None})
        assert answer.status_code == 422
        assert required in answer.text
    bad = stack.admin.patch(url, json={"advertiser_id": "12-34"})
    assert error_locations(bad) == ["advertiser_id"]
    after = stack.output(output["id"])
    assert after["status"] == "needs_login"
    assert after["id"] == output["id"]
    assert after["name"] == "Renamed"  # the refused mixed PATCH changed nothing
    assert stack.sql("SELECT count(*) FROM credentials") == [(0,)]
    created = stack.admin.post(
        "/v1/outputs", json={"name": "S", "advertiser_id": "1", "status": "configured"}
    )
    assert created.status_code == 422
    assert error_locations(created) == ["status"]
    assert stack.admin.patch("/v1/outputs/out_missing", json={"name": "x"}).status_code == 404


def test_patch_null_clears_only_the_optional_settings(stack: Stack) -> None:
    output = stack.create_output(
        data_set_name="web_buys",
        partner_name="acme",
        conversion_rules=[{"conversion_type": "LEAD", "event_name": "Lead"}],
        default_rules=False,
    )
    url = f"/v1/outputs/{output['id']}"
    not_nullable = (
        "name", "advertiser_id", "region", "max_event_age_hours", "match_keys",
        "consent_mode", "conversion_rules", "default_rules", "enabled",
    )  # fmt: skip
    for field in not_nullable:
        answer = stack.admin.patch(url, json={field: None})
        assert answer.status_code == 422, (field, answer.text)
        assert answer.json()["message"] == f"{field}: may not be null"
    # Nothing was stored: the output reads back as it was, alone and in the list.
    assert stack.output(output["id"]) == output
    assert stack.admin.get("/v1/outputs").json() == [output]
    cleared = stack.admin.patch(url, json={"data_set_name": None, "partner_name": None})
    assert cleared.status_code == 200
    assert (cleared.json()["data_set_name"], cleared.json()["partner_name"]) == (None, None)


# --- connections -----------------------------------------------------------------------


def test_a_connection_secret_is_shown_once_and_stored_hashed(stack: Stack) -> None:
    output = stack.create_output()
    created = stack.admin.post(
        f"/v1/outputs/{output['id']}/connections", json={"source": "mparticle", "name": "mp"}
    )
    assert created.status_code == 201
    assert created.headers["cache-control"] == "no-store"
    body = created.json()
    assert {"id", "source", "name", "key", "secret"} <= set(body)
    assert len(body["secret"]) >= 32
    listed = stack.admin.get(f"/v1/outputs/{output['id']}/connections")
    assert listed.status_code == 200
    (entry,) = listed.json()
    assert entry["id"] == body["id"]
    assert entry["key"] == body["key"]
    assert entry["active"] is True
    assert "secret" not in entry
    assert body["secret"] not in listed.text
    ((stored,),) = stack.sql("SELECT secret_hash FROM connections")
    assert body["secret"] not in stored
    assert stored.startswith("scrypt")
    # The secret works exactly as shown.
    ok = stack.client.post("/v2/events", json=sdk_batch([1]), auth=(body["key"], body["secret"]))
    assert ok.status_code == 202
    invalid = stack.admin.post(
        f"/v1/outputs/{output['id']}/connections", json={"source": "kafka", "name": "k"}
    )
    assert invalid.status_code == 422
    assert error_locations(invalid) == ["source"]
    nowhere = stack.admin.post(
        "/v1/outputs/out_missing/connections", json={"source": "segment", "name": "s"}
    )
    assert nowhere.status_code == 404


def test_admin_routes_need_the_admin_bearer_token(stack: Stack) -> None:
    output = stack.create_output()
    conn = stack.connect(output["id"])
    basic = base64.b64encode(f"{conn.key}:{conn.secret}".encode()).decode()
    admin_basic = base64.b64encode(f"admin:{stack.admin_token}".encode()).decode()
    refused_credentials = [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Bearer {conn.secret}"},  # a connection's credentials ...
        {"Authorization": f"Basic {basic}"},  # ... in either form
        {"Authorization": f"Basic {admin_basic}"},  # the admin token, but not as bearer
        {"Authorization": stack.admin_token},
    ]
    routes = [
        ("GET", "/v1/outputs"),
        ("POST", "/v1/outputs"),
        ("PATCH", f"/v1/outputs/{output['id']}"),
        ("GET", "/v1/deliveries"),
        ("POST", "/v1/preview/mparticle"),
        ("DELETE", f"/v1/connections/{conn.id}"),
    ]
    failures = 0
    for number, headers in enumerate(refused_credentials):
        # 18 failures in all: under the failed-authentication limit (20 a minute).
        for method, path in routes[number % 2 :: 2]:
            answer = stack.client.request(
                method, path, headers=headers, json={"name": "x", "advertiser_id": "1"}
            )
            failures += 1
            assert answer.status_code == 401, (headers, method, path)
            assert answer.json()["error"] == "unauthorized"
            assert answer.headers["www-authenticate"] == 'Bearer realm="relay"'
    assert failures < 20
    # Nothing was changed by the refused calls.
    assert [o["name"] for o in stack.admin.get("/v1/outputs").json()] == ["E2E shop"]
    assert len(stack.admin.get(f"/v1/outputs/{output['id']}/connections").json()) == 1


def test_the_admin_api_is_off_without_an_admin_token(database_url: str, tmp_path: Path) -> None:
    with relay_stack(database_url, tmp_path, admin_token=None) as stack:
        answer = stack.admin.get("/v1/outputs")
        assert answer.status_code == 401
        assert "RELAY_ADMIN_TOKEN" in answer.json()["message"]
        guess = stack.client.get("/v1/outputs", headers={"Authorization": "Bearer anything"})
        assert guess.status_code == 401


def test_the_credentials_decide_the_output(stack: Stack) -> None:
    first, first_conn = stack.ready_output(name="A", advertiser_id="1111")
    second, second_conn = stack.ready_output(name="B", advertiser_id="2222")
    batch = sdk_batch([1]) | {"output_id": second["id"], "advertiser_id": "2222"}
    answer = stack.client.post(
        "/v2/events",
        json=batch,
        auth=first_conn.auth,
        params={"output_id": second["id"], "advertiser_id": "2222"},
        headers={"Amazon-Ads-AccountId": "2222", "X-Output-Id": second["id"]},
    )
    assert answer.status_code == 202
    stack.post_events(second_conn, sdk_batch([2]))
    # A records row naming another advertiser is refused, not re-routed.
    records = stack.connect(first["id"], "records")
    rows = [
        {"event_type": "purchase", "event_id": "r1", "email": "a@example.com",
         "country_code": "US", "advertiser_id": "2222"},
        {"event_type": "purchase", "event_id": "r2", "email": "a@example.com",
         "country_code": "US", "advertiser_id": "1111"},
    ]  # fmt: skip
    recorded = stack.client.post("/v1/records", json=rows, auth=records.auth)
    assert recorded.status_code == 202
    assert recorded.json()["accepted"] == 1
    assert recorded.json()["dropped"] == [
        {"index": 0, "reason": "invalid_event", "detail": "advertiser_id is not this output's"}
    ]
    stack.wait_settled()
    by_output = {
        output["id"]: sorted(d["connection_id"] for d in stack.deliveries(output_id=output["id"]))
        for output in (first, second)
    }
    assert by_output == {
        first["id"]: sorted([first_conn.id, records.id]),
        second["id"]: [second_conn.id],
    }
    accounts = {
        event_id: request["account_id"]
        for request in stack.received()
        for event_id in (e["eventId"] for e in request["body"]["events"])
    }
    assert accounts == {"1": "1111", "2": "2222", "r2": "1111"}


def test_an_inactive_connection_is_403_and_a_wrong_source_too(stack: Stack) -> None:
    output = stack.create_output()
    conn = stack.connect(output["id"])
    url = f"/v1/connections/{conn.id}"
    off = stack.admin.patch(url, json={"active": False})
    assert off.status_code == 200
    assert off.json()["active"] is False
    refused = stack.client.post("/v2/events", json=sdk_batch([1]), auth=conn.auth)
    assert refused.status_code == 403
    assert refused.json()["error"] == "connection_inactive"
    assert stored_deliveries(stack) == 0
    # An mParticle connection cannot post Segment data.
    stack.admin.patch(url, json={"active": True})
    wrong = stack.client.post("/v1/batch", json={"batch": []}, auth=conn.auth)
    assert wrong.status_code == 403
    assert wrong.json()["error"] == "wrong_source"
    assert stack.client.post("/v2/events", json=sdk_batch([1]), auth=conn.auth).status_code == 202
    assert stored_deliveries(stack) == 1
    # Connections take no other changes.
    assert stack.admin.patch(url, json={"output_id": "out_other"}).status_code == 422
    assert stack.admin.patch(url, json={"secret": "mine"}).status_code == 422
    assert stack.admin.patch("/v1/connections/con_missing", json={"active": True}).status_code == (
        404
    )
    # Deleted: its credentials stop working.
    assert stack.admin.delete(url).status_code == 204
    gone = stack.client.post("/v2/events", json=sdk_batch([1]), auth=conn.auth)
    assert gone.status_code == 401


def test_deleting_an_output_stops_its_connections(stack: Stack) -> None:
    output, conn = stack.ready_output()
    stack.post_events(conn, sdk_batch([1]))
    stack.wait_settled()
    assert stack.admin.delete(f"/v1/outputs/{output['id']}").status_code == 204
    assert stack.client.post("/v2/events", json=sdk_batch([2]), auth=conn.auth).status_code == 401
    assert stack.sql("SELECT count(*) FROM credentials") == [(0,)]
    assert stored_deliveries(stack) == 0


# --- ingest edge -----------------------------------------------------------------------


def test_bodies_over_the_limits_are_413_and_store_nothing(stack: Stack) -> None:
    output = stack.create_output()
    mparticle = stack.connect(output["id"])
    segment = stack.connect(output["id"], "segment")
    batch = sdk_batch([1])
    segment_batch = {"batch": [{"type": "track", "event": "Order Completed", "messageId": "m"}]}
    cases = [
        ("/v2/events", mparticle, padded(batch, 256 * KIB + 1)),
        ("/v2/bulkevents", mparticle, padded([batch], 1024 * KIB + 1)),  # type: ignore[arg-type]
        ("/v1/batch", segment, padded(segment_batch, 512 * KIB + 1)),
    ]
    for path, conn, body in cases:
        answer = stack.client.post(
            path, content=body, auth=conn.auth, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 413, path
        assert answer.json()["error"] == "body_too_large"
    assert stored_deliveries(stack) == 0
    # Exactly at the limit is accepted.
    fits = stack.client.post(
        "/v2/events",
        content=padded(batch, 256 * KIB),
        auth=mparticle.auth,
        headers={"Content-Type": "application/json"},
    )
    assert fits.status_code == 202
    assert stored_deliveries(stack) == 1


def test_bad_json_and_wrong_shapes_are_400_with_clear_errors(stack: Stack) -> None:
    output = stack.create_output()
    conn = stack.connect(output["id"])
    segment = stack.connect(output["id"], "segment")
    cases: list[tuple[str, Any, Any, str]] = [
        ("/v2/events", conn, b'{"events": [', "not valid JSON"),
        ("/v2/events", conn, {"events": {"event_type": "commerce_event"}}, "events"),
        ("/v2/events", conn, [sdk_batch([1])], "object"),
        ("/v2/bulkevents", conn, sdk_batch([1]), "array"),
        ("/v2/bulkevents", conn, [sdk_batch([1]), {"events": 3}], "batch 1"),
        ("/v2/bulkevents", conn, [sdk_batch([1])] * 101, "101"),
        ("/v1/batch", segment, b"not json", "not valid JSON"),
    ]
    for path, credentials, body, phrase in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        answer = stack.client.post(
            path,
            content=content,
            auth=credentials.auth,
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 400, (path, answer.text)
        assert answer.headers["content-type"] == "application/json"
        problem = answer.json()
        assert problem["error"] == "invalid_payload"
        assert phrase in problem["message"], problem
    # Nothing half-accepted: the valid first batch of the refused bulk is not queued.
    assert stored_deliveries(stack) == 0
    # The admin API answers unreadable JSON with a JSON error naming the body, too.
    admin = stack.admin.post(
        "/v1/outputs", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert admin.status_code == 400
    assert admin.json()["detail"][0]["type"] == "json_invalid"
    assert admin.json()["detail"][0]["loc"][0] == "body"


def test_preview_maps_without_storing_or_sending(stack: Stack) -> None:
    output, _ = stack.ready_output(data_set_name="preview_set")
    when = now_ms() - 60_000
    batch = sdk_batch(
        [sdk_purchase(1, when_ms=when), sdk_purchase(2, when_ms=when - 3 * 86_400_000)]
    )
    by_output = stack.admin.post(
        "/v1/preview/mparticle", params={"output_id": output["id"]}, json=batch
    )
    assert by_output.status_code == 200
    result = by_output.json()
    (request,) = result["requests"]
    assert [e["eventId"] for e in request["events"]] == ["1"]
    assert request["events"][0]["eventDescription"]["dataSetName"] == "preview_set"
    assert result["dropped"] == [{"index": 1, "reason": "too_old"}]
    # Settings in the query instead of an output; a fixed "now" makes event 2 young.
    by_settings = stack.admin.post(
        "/v1/preview/mparticle",
        params={
            "settings": json.dumps({"data_set_name": "other_set", "max_event_age_hours": 100}),
        },
        json=batch,
    )
    assert by_settings.status_code == 200
    assert [e["eventId"] for e in by_settings.json()["requests"][0]["events"]] == ["1", "2"]
    assert {
        e["eventDescription"]["dataSetName"] for e in by_settings.json()["requests"][0]["events"]
    } == {"other_set"}
    unknown_source = stack.admin.post("/v1/preview/kafka", json=batch)
    assert unknown_source.status_code == 404
    assert "mparticle" in unknown_source.json()["message"]
    missing = stack.admin.post("/v1/preview/mparticle", params={"output_id": "out_x"}, json=batch)
    assert missing.status_code == 404
    unreadable = stack.admin.post("/v1/preview/mparticle", params={"settings": "{"}, json=batch)
    assert unreadable.status_code == 422
    assert unreadable.json()["message"].startswith("settings")
    invalid = stack.admin.post(
        "/v1/preview/mparticle", params={"settings": '{"match_keys": "all"}'}, json=batch
    )
    assert invalid.status_code == 422
    assert invalid.json()["field"] == "match_keys"
    assert stored_deliveries(stack) == 0
    assert stack.received() == []


def test_deliveries_are_listed_read_and_retried(stack: Stack) -> None:
    output, conn = stack.ready_output()
    other, other_conn = stack.ready_output(advertiser_id="999")
    stack.fault({"status": 400, "count": 1})  # final: failed, not retried
    failed_id = stack.post_events(conn, sdk_batch([1]))["deliveries"][0]
    stack.wait_settled()
    delivered_id = stack.post_events(other_conn, sdk_batch([2]))["deliveries"][0]
    stack.wait_settled()

    assert {d["id"] for d in stack.deliveries()} == {failed_id, delivered_id}
    assert [d["id"] for d in stack.deliveries(status="failed")] == [failed_id]
    assert [d["id"] for d in stack.deliveries(output_id=other["id"])] == [delivered_id]
    assert stack.deliveries(output_id=output["id"], status="delivered") == []
    assert stack.admin.get("/v1/deliveries", params={"status": "lost"}).status_code == 422
    assert stack.admin.get("/v1/deliveries", params={"limit": 0}).status_code == 422
    # Found by schemathesis: an offset beyond 64 bits was a 500 (the driver's overflow).
    huge = stack.admin.get("/v1/deliveries", params={"offset": 8735300171794886785773191823360})
    assert huge.status_code == 422
    assert stack.admin.get("/v1/deliveries", params={"offset": 10**9}).json() == []

    failed = stack.delivery(failed_id)
    assert failed["status"] == "failed"
    assert failed["last_status_code"] == 400
    assert "BAD_REQUEST" in failed["last_error"]
    assert [e["eventId"] for e in failed["body"]["events"]] == ["1"]
    assert stack.admin.get("/v1/deliveries/dlv_missing").status_code == 404

    not_retryable = stack.admin.post(f"/v1/deliveries/{delivered_id}/retry")
    assert not_retryable.status_code == 409
    assert not_retryable.json()["error"] == "not_retryable"
    assert stack.admin.post("/v1/deliveries/dlv_missing/retry").status_code == 404
    retried = stack.admin.post(f"/v1/deliveries/{failed_id}/retry")
    assert retried.status_code == 200
    assert retried.json()["status"] == "pending"
    assert retried.json()["attempts"] == 0
    stack.wait_settled()
    assert stack.delivery(failed_id)["status"] == "delivered"
    assert sorted(stack.unique_event_ids()) == ["1", "2"]
