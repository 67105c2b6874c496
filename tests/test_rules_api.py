"""Per-output conversion rules through the admin API: validated, and in effect at once.

The relay runs for real (lifespan included) on loopback, on SQLite and PostgreSQL;
the dispatcher is off, so queued deliveries stay readable in the database.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import isolated_settings
from app.localserver import serve_in_thread
from app.main import create_app
from app.rules import CONVERSION_TYPES

ADMIN = "admin-token-for-rules-tests"
EMAIL = "shopper@example.com"


@pytest.fixture
def admin(database_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    settings = isolated_settings(
        database_url=database_url, key_file=tmp_path / "relay.key", admin_token=ADMIN
    )
    with (
        serve_in_thread(create_app(settings, dispatcher=False)) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as client,
    ):
        yield client


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def track(event: str, message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": event,
        "messageId": message_id,
        "timestamp": iso_now(),
        "properties": properties,
        "context": {"traits": {"email": EMAIL}, "locale": "en-US"},
    }


def segment_batch() -> dict[str, Any]:
    return {
        "batch": [
            track("Newsletter Joined", "m-0"),
            track("Order Completed", "m-1", total=20, currency="usd"),
            {
                "type": "page",
                "name": "Home",
                "messageId": "m-2",
                "timestamp": iso_now(),
                "context": {"traits": {"email": EMAIL}, "locale": "en-US"},
            },
        ]
    }


RULES = [
    {
        "conversion_type": "SIGN_UP",
        "source": "segment",
        "kind": "track",
        "event_name": "newsletter  JOINED",
        "name": "Newsletter",
        "data_set_name": "newsletter_signups",
    },
    {"conversion_type": "LEAD", "source": "records", "event_name": "Demo Booked"},
    {"conversion_type": "CHECKOUT", "source": "mparticle", "action": "Click"},
]


def new_output(admin: httpx.Client, **fields: Any) -> dict[str, Any]:
    answer = admin.post(
        "/v1/outputs",
        json={
            "name": "Rules",
            "advertiser_id": "1234567890",
            "data_set_name": "store_all",
            **fields,
        },
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def preview(admin: httpx.Client, source: str, output_id: str, payload: Any) -> dict[str, Any]:
    answer = admin.post(f"/v1/preview/{source}", params={"output_id": output_id}, json=payload)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def descriptions(result: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [
        (
            e["eventDescription"]["conversionType"],
            e["eventDescription"]["name"],
            e["eventDescription"].get("dataSetName"),
        )
        for request in result["requests"]
        for e in request["events"]
    ]


def reasons(result: dict[str, Any]) -> list[tuple[int, str]]:
    return [(d["index"], d["reason"]) for d in result["dropped"]]


def problem_text(answer: httpx.Response) -> str:
    """The 422's words: FastAPI's ``detail`` list or the relay's ``message`` and ``field``."""
    body = answer.json()
    if isinstance(body.get("detail"), list):
        return " ".join(
            f"{'.'.join(str(p) for p in item['loc'])} {item['msg']}" for item in body["detail"]
        )
    return f"{body.get('field', '')} {body.get('message', '')}"


# --- validation ---------------------------------------------------------------------------


def test_rules_are_stored_and_returned(admin: httpx.Client) -> None:
    output = new_output(admin, conversion_rules=RULES, default_rules=False)
    assert output["default_rules"] is False
    assert [r["conversion_type"] for r in output["conversion_rules"]] == [
        "SIGN_UP",
        "LEAD",
        "CHECKOUT",
    ]
    again = admin.get(f"/v1/outputs/{output['id']}").json()
    assert again["conversion_rules"] == output["conversion_rules"]
    assert again["default_rules"] is False
    plain = new_output(admin)
    assert (plain["conversion_rules"], plain["default_rules"]) == ([], True)


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        (
            [{"conversion_type": "PURCHASE", "event_name": "x"}],
            "conversion_rules[0].conversion_type",
        ),
        (
            [{"conversion_type": "sign_up", "event_name": "x"}],
            "conversion_rules[0].conversion_type",
        ),
        ([{"event_name": "x"}], "conversion_rules[0].conversion_type"),
        (
            [
                {"conversion_type": "LEAD", "event_name": "a"},
                {"conversion_type": "BUY", "kind": "track"},
            ],
            "conversion_rules[1].conversion_type",
        ),
        ([{"conversion_type": "LEAD", "kind": "tracking"}], "conversion_rules[0].kind"),
        ([{"conversion_type": "LEAD", "event_name": ""}], "conversion_rules[0].event_name"),
        ([{"conversion_type": "LEAD", "event_name": 3}], "conversion_rules[0].event_name"),
        ([{"conversion_type": "LEAD", "colour": "red"}], "conversion_rules[0].colour"),
        ([{"conversion_type": "LEAD"}], "conversion_rules[0]"),
        (
            [{"conversion_type": "LEAD", "event_name": "a", "data_set_name": "1bad"}],
            "conversion_rules[0].data_set_name",
        ),
        ([{"conversion_type": "LEAD", "event_name": "a", "data_set_name": "abc"}], "data_set_name"),
        (["LEAD"], "conversion_rules"),
        ({"conversion_type": "LEAD"}, "conversion_rules"),
    ],
)
def test_bad_rules_are_422_naming_the_field(admin: httpx.Client, rules: Any, field: str) -> None:
    created = admin.post(
        "/v1/outputs", json={"name": "X", "advertiser_id": "1", "conversion_rules": rules}
    )
    assert created.status_code == 422, created.text
    assert field in problem_text(created)
    output = new_output(admin, conversion_rules=RULES)
    patched = admin.patch(f"/v1/outputs/{output['id']}", json={"conversion_rules": rules})
    assert patched.status_code == 422, patched.text
    assert field in problem_text(patched)
    assert (
        admin.get(f"/v1/outputs/{output['id']}").json()["conversion_rules"]
        == output["conversion_rules"]
    )  # nothing changed


def test_every_amazon_conversion_type_is_accepted(admin: httpx.Client) -> None:
    rules = [{"conversion_type": t, "event_name": f"event {t}"} for t in CONVERSION_TYPES]
    assert len(new_output(admin, conversion_rules=rules)["conversion_rules"]) == 12


# pydantic's lax mode also takes "no", 0, "false" for false (the API's choice).
@pytest.mark.parametrize("value", ["maybe", 2, [], {"on": True}])
def test_default_rules_must_be_a_boolean(admin: httpx.Client, value: Any) -> None:
    output = new_output(admin)
    answer = admin.patch(f"/v1/outputs/{output['id']}", json={"default_rules": value})
    assert answer.status_code == 422, answer.text
    assert "default_rules" in problem_text(answer)
    assert admin.get(f"/v1/outputs/{output['id']}").json()["default_rules"] is True


@pytest.mark.parametrize("field", ["default_rules", "conversion_rules"])
def test_null_rules_settings_are_refused_or_ignored(admin: httpx.Client, field: str) -> None:
    output = new_output(admin, conversion_rules=RULES, default_rules=False)
    answer = admin.patch(f"/v1/outputs/{output['id']}", json={field: None})
    assert answer.status_code in (200, 422), answer.text
    if answer.status_code == 422:
        assert field in problem_text(answer)
    assert admin.get(f"/v1/outputs/{output['id']}").json()[field] == output[field]


# --- in effect on preview and ingest --------------------------------------------------------


def test_rules_take_effect_on_preview(admin: httpx.Client) -> None:
    output = new_output(admin, conversion_rules=RULES)
    result = preview(admin, "segment", output["id"], segment_batch())
    # The output's rule first (with its own data set), then Segment's default rules.
    assert descriptions(result) == [
        ("SIGN_UP", "Newsletter", "newsletter_signups"),
        ("OFF_AMAZON_PURCHASES", "Order Completed", "store_all"),
        ("PAGE_VIEW", "Page View", "store_all"),
    ]
    assert reasons(result) == []

    patched = admin.patch(f"/v1/outputs/{output['id']}", json={"default_rules": False})
    assert patched.status_code == 200
    assert patched.json()["default_rules"] is False
    result = preview(admin, "segment", output["id"], segment_batch())
    assert descriptions(result) == [("SIGN_UP", "Newsletter", "newsletter_signups")]
    assert reasons(result) == [(1, "unmapped_event"), (2, "unmapped_event")]

    # A rule may claim an event the defaults map otherwise, with a name of its own.
    rule = {"conversion_type": "OTHER", "source": "segment", "kind": "page", "name": "Browse"}
    admin.patch(f"/v1/outputs/{output['id']}", json={"conversion_rules": [rule]})
    result = preview(admin, "segment", output["id"], segment_batch())
    assert descriptions(result) == [("OTHER", "Browse", "store_all")]
    assert reasons(result) == [(0, "unmapped_event"), (1, "unmapped_event")]

    admin.patch(f"/v1/outputs/{output['id']}", json={"conversion_rules": [], "default_rules": True})
    result = preview(admin, "segment", output["id"], segment_batch())
    assert [d[0] for d in descriptions(result)] == ["OFF_AMAZON_PURCHASES", "PAGE_VIEW"]
    assert reasons(result) == [(0, "unmapped_event")]


def test_rules_for_records_and_mparticle_on_preview(admin: httpx.Client) -> None:
    output = new_output(admin, conversion_rules=RULES, default_rules=False)
    moment = int(time.time() * 1000)
    records = [
        {"event_name": "Demo Booked", "event_time": moment, "country_code": "US", "email": EMAIL},
        {"event_type": "purchase", "event_time": moment, "country_code": "US", "email": EMAIL},
    ]
    result = preview(admin, "records", output["id"], records)
    assert descriptions(result) == [("LEAD", "Demo Booked", "store_all")]
    assert reasons(result) == [(1, "unmapped_event")]

    batch = {
        "environment": "production",
        "user_identities": {"email": EMAIL},
        "device_info": {"platform": "iOS", "locale_country": "US"},
        "events": [
            {
                "event_type": "commerce_event",
                "data": {"timestamp_unixtime_ms": moment, "product_action": {"action": "click"}},
            },
            {
                "event_type": "commerce_event",
                "data": {"timestamp_unixtime_ms": moment, "product_action": {"action": "purchase"}},
            },
        ],
    }
    result = preview(admin, "mparticle", output["id"], batch)
    assert [d[0] for d in descriptions(result)] == ["CHECKOUT"]
    assert reasons(result) == [(1, "unmapped_event")]


def test_rules_take_effect_on_ingest(admin: httpx.Client) -> None:
    output = new_output(admin, conversion_rules=RULES, default_rules=False)
    created = admin.post(
        f"/v1/outputs/{output['id']}/connections", json={"source": "segment", "name": "web"}
    ).json()
    auth = (f"{created['key']}.{created['secret']}", "")

    def ingest() -> dict[str, Any]:
        answer = httpx.post(f"{admin.base_url}/v1/batch", json=segment_batch(), auth=auth)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    answer = ingest()
    assert answer["accepted"] == 1
    assert reasons(answer) == [(1, "unmapped_event"), (2, "unmapped_event")]
    queued = admin.get(f"/v1/deliveries/{answer['deliveries'][0]}").json()
    assert descriptions({"requests": [queued["body"]]}) == [
        ("SIGN_UP", "Newsletter", "newsletter_signups")
    ]
    assert queued["body"]["events"][0]["eventId"] == "m-0"

    # Edited rules apply to the very next batch.
    admin.patch(f"/v1/outputs/{output['id']}", json={"default_rules": True})
    answer = ingest()
    assert answer["accepted"] == 3
    assert answer["dropped"] == []
    queued = admin.get(f"/v1/deliveries/{answer['deliveries'][0]}").json()
    assert [d[0] for d in descriptions({"requests": [queued["body"]]})] == [
        "SIGN_UP",
        "OFF_AMAZON_PURCHASES",
        "PAGE_VIEW",
    ]
