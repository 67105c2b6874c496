"""Bad input over real HTTP: each kind answered with a clear 4xx, and nothing stored.

Huge numbers, deep nesting, 10 MB bodies (declared and streamed), gzip bombs and broken
gzip, invalid UTF-8, lone surrogates, repeated keys, NaN and Infinity, on every route
that reads a body. Relay and emulator run as servers on loopback (e2e_helpers); every
test runs on SQLite and on PostgreSQL. After the refusals, one good batch is stored, so
"nothing stored" is known to be measured on the table that would have held them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import Conn, Stack, relay_stack, sdk_batch

MIB = 1024 * 1024
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Stack]:
    with relay_stack(database_url, tmp_path) as running:
        yield running


def stored(stack: Stack) -> tuple[int, int]:
    """(deliveries, outputs) in the database."""
    ((deliveries,),) = stack.sql("SELECT count(*) FROM deliveries")
    ((outputs,),) = stack.sql("SELECT count(*) FROM outputs")
    return int(deliveries), int(outputs)


def good_batch_text() -> str:
    return json.dumps(sdk_batch([1]))


# Each: a name, the body, and a phrase the 400's message must contain.
MALFORMED: list[tuple[str, bytes, str]] = [
    ("truncated", b'{"events": [', "not valid JSON"),
    ("NaN", b'{"events": [], "x": NaN}', "NaN is not a JSON number"),
    ("Infinity", b'{"events": [], "x": Infinity}', "Infinity is not a JSON number"),
    ("-Infinity", b'{"events": [], "x": -Infinity}', "-Infinity is not a JSON number"),
    ("1e999", b'{"events": [], "x": 1e999}', "out of range"),
    ("-1e400", b'{"events": [], "x": -1e400}', "out of range"),
    ("5000 digits", b'{"events": [], "x": ' + b"9" * 5000 + b"}", "too long"),
    ("deep arrays", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("deep objects", b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "nested too deeply"),
    ("invalid UTF-8", b'{"events": [], "x": "\xff\xfe"}', "not valid UTF-8"),
    ("overlong UTF-8", b'{"events": [], "x": "\xc0\xaf"}', "not valid UTF-8"),
    ("UTF-16", '{"events": []}'.encode("utf-16"), "not valid UTF-8"),
    ("lone surrogate", b'{"events": [], "x": "\\ud800"}', "lone UTF-16 surrogate"),
    ("lone low surrogate", b'{"events": [], "x": ["\\udfff"]}', "lone UTF-16 surrogate"),
    ("repeated key", b'{"events": [], "events": []}', "'events' appears twice"),
    (
        "repeated nested key",
        good_batch_text().replace('"event_id": 1', '"event_id": 1, "event_id": 2').encode(),
        "'event_id' appears twice",
    ),
    ("empty", b"", "not valid JSON"),
]


def ingest_targets(stack: Stack) -> list[tuple[str, Conn, bytes | None]]:
    """(path, connection, wrapper) for every ingest route; the wrapper turns the bad
    document into a body for that route (None: the document as it is)."""
    output = stack.create_output()
    mparticle = stack.connect(output["id"])
    segment = stack.connect(output["id"], "segment")
    records = stack.connect(output["id"], "records")
    return [
        ("/v2/events", mparticle, None),
        ("/v2/bulkevents", mparticle, b"[%s]"),
        ("/v1/batch", segment, None),
        ("/v1/track", segment, None),
        ("/v1/records", records, b"[%s]"),
    ]


def test_malformed_json_is_a_400_naming_the_problem_everywhere(stack: Stack) -> None:
    targets = ingest_targets(stack)
    before = stored(stack)
    for name, document, phrase in MALFORMED:
        for path, conn, wrapper in targets:
            body = document if wrapper is None or not document else wrapper % document
            answer = stack.client.post(path, content=body, auth=conn.auth, headers=JSON)
            assert answer.status_code == 400, (name, path, answer.text)
            assert answer.headers["content-type"] == "application/json"
            assert answer.json()["error"] == "invalid_payload", (name, path)
            assert phrase in answer.json()["message"], (name, path, answer.text)
        # The admin API decodes its bodies the same way ...
        admin = stack.admin.post("/v1/outputs", content=document, headers=JSON)
        if document:  # (an empty body is a missing body there: 422, field "body")
            assert admin.status_code == 400, (name, admin.text)
            assert phrase in admin.json()["message"], (name, admin.text)
        else:
            assert admin.status_code == 422, admin.text
        # ... and so does preview, which must refuse what ingest refuses.
        preview = stack.admin.post("/v1/preview/mparticle", content=document, headers=JSON)
        assert preview.status_code == 400, (name, preview.text)
        assert phrase in preview.json()["message"], (name, preview.text)
    assert stored(stack) == before
    # The same routes take a good batch: the counts above were of the right table.
    mparticle = targets[0][1]
    assert (
        stack.client.post(
            "/v2/events", content=good_batch_text(), auth=mparticle.auth, headers=JSON
        ).status_code
        == 202
    )
    assert stored(stack) == (before[0] + 1, before[1])


def test_a_nul_character_in_an_admin_body_is_a_400_not_an_outage(stack: Stack) -> None:
    """Found by schemathesis on PostgreSQL: text columns cannot hold U+0000, and the
    database's refusal was answered as an outage (503). It is the caller's input."""
    for path, body in [
        ("/v1/outputs", {"name": "Shop\u0000", "advertiser_id": "123"}),
        ("/v1/outputs", {"name": "Shop", "advertiser_id": "1", "extra": ["a", {"k\u0000": 1}]}),
    ]:
        answer = stack.admin.post(path, json=body)
        assert answer.status_code == 400, answer.text
        assert "NUL character" in answer.json()["message"]
    assert stack.admin.get("/v1/outputs").json() == []
    # An escaped backslash followed by "u0000" is no NUL: a name may say so.
    fine = stack.admin.post("/v1/outputs", json={"name": "a\\u0000b", "advertiser_id": "1"})
    assert fine.status_code == 201, fine.text
    assert fine.json()["name"] == "a\\u0000b"


def test_a_nul_character_in_a_url_or_credentials_is_refused_not_an_outage(
    stack: Stack,
) -> None:
    """Found by schemathesis on PostgreSQL: a NUL in an id reached a query, and the
    database's refusal was answered as an outage (503)."""
    output, conn = stack.ready_output()
    for path in [
        "/oauth/amazon/start?output_id=%00x",
        f"/v1/outputs/{output['id']}%00",
        "/v1/deliveries?output_id=a%00b",
    ]:
        answer = stack.admin.get(path)
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json() == {
            "error": "invalid_request",
            "message": "the URL holds a NUL character (%00)",
        }
        assert answer.headers["x-content-type-options"] == "nosniff"
    batch = good_batch_text()
    for auth in [(conn.key + "\x00", conn.secret), (conn.key, conn.secret + "\x00")]:
        answer = stack.client.post("/v2/events", content=batch, auth=auth, headers=JSON)
        assert answer.status_code == 401, answer.text
    segment = stack.client.post(
        "/v1/track", json={"writeKey": "k\x00.s", "event": "Order Completed", "userId": "u"}
    )
    assert segment.status_code == 401, segment.text
    assert (
        stack.client.post("/v2/events", content=batch, auth=conn.auth, headers=JSON).status_code
        == 202
    )


def test_valid_json_in_unusual_forms_is_accepted(stack: Stack) -> None:
    """The strict decoder refuses only what is ambiguous or unsendable."""
    output = stack.create_output()
    conn = stack.connect(output["id"])
    batch = good_batch_text()
    variants = {
        # A proper surrogate pair (how json.dumps writes an emoji) is one character.
        "escaped pair": batch.replace('"Product sku-1"', '"Product \\ud83d\\ude00"'),
        "raw emoji": batch.replace('"Product sku-1"', '"Product 😀"'),
        # mParticle int64 ids above 2^53, and ids beyond 64 bits, stay exact.
        "big id": batch.replace('"event_id": 1', '"event_id": 18446744073709551617'),
        "whitespace": "\n\t " + batch + " \r\n",
    }
    for name, text in variants.items():
        answer = stack.client.post(
            "/v2/events", content=text.encode(), auth=conn.auth, headers=JSON
        )
        assert answer.status_code == 202, (name, answer.text)
        assert answer.json()["accepted"] == 1, (name, answer.text)
    ids = {
        event["eventId"]
        for delivery in stack.deliveries()
        for event in stack.delivery(delivery["id"])["body"]["events"]
    }
    assert "18446744073709551617" in ids


def ten_mb_of(document: bytes) -> bytes:
    """``document`` padded with spaces to 10 MiB: valid JSON, just too big."""
    return document + b" " * (10 * MIB - len(document))


def test_ten_megabyte_bodies_are_413_declared_or_streamed(stack: Stack) -> None:
    output = stack.create_output()
    mparticle = stack.connect(output["id"])
    segment = stack.connect(output["id"], "segment")
    records = stack.connect(output["id"], "records")
    batch = good_batch_text().encode()
    cases = [
        ("/v2/events", mparticle, ten_mb_of(batch)),
        ("/v2/bulkevents", mparticle, ten_mb_of(b"[" + batch + b"]")),
        ("/v1/batch", segment, ten_mb_of(b'{"batch": []}')),
        ("/v1/track", segment, ten_mb_of(b'{"event": "Order Completed"}')),
        # Records take up to 32 MiB: 33 MiB of valid JSON is refused.
        ("/v1/records", records, b"[]" + b" " * (33 * MIB)),
    ]
    for path, conn, body in cases:
        declared = stack.client.post(path, content=body, auth=conn.auth, headers=JSON)
        assert declared.status_code == 413, (path, declared.text)
        assert declared.json()["error"] == "body_too_large"
        # Without a Content-Length (chunked), the relay stops reading at the limit.
        chunks = (body[i : i + MIB] for i in range(0, len(body), MIB))
        streamed = stack.client.post(path, content=chunks, auth=conn.auth, headers=JSON)
        assert streamed.status_code == 413, (path, streamed.text)
    # 10 MiB that fits the records limit but is not JSON, CSV or NDJSON: a 400.
    garbage = stack.client.post(
        "/v1/records", content=b"[" + b"x" * (10 * MIB), auth=records.auth, headers=JSON
    )
    assert garbage.status_code == 400
    assert "not valid JSON" in garbage.json()["message"]
    # A 10 MiB admin body: the name is far over its 200 characters.
    huge_name = {"name": "n" * (10 * MIB), "advertiser_id": "1"}
    admin = stack.admin.post("/v1/outputs", json=huge_name)
    assert admin.status_code == 422
    assert stored(stack) == (0, 1)


def test_gzip_bombs_and_broken_gzip_are_refused(stack: Stack) -> None:
    output = stack.create_output()
    mparticle = stack.connect(output["id"])
    segment = stack.connect(output["id"], "segment")
    records = stack.connect(output["id"], "records")
    gzipped = {"Content-Encoding": "gzip", **JSON}
    # 64 MiB of spaces after a valid document: ~64 KiB on the wire, over every limit.
    bomb = gzip.compress(b"[]" + b" " * (64 * MIB), compresslevel=9)
    assert len(bomb) < 100 * 1024
    targets = [
        ("/v2/events", mparticle),
        ("/v2/bulkevents", mparticle),
        ("/v1/batch", segment),
        ("/v1/records", records),
    ]
    good = gzip.compress(good_batch_text().encode())
    for path, conn in targets:
        exploded = stack.client.post(path, content=bomb, auth=conn.auth, headers=gzipped)
        assert exploded.status_code == 413, (path, exploded.text)
        assert "inflated body" in exploded.json()["message"]
        cut = stack.client.post(
            path, content=good[: len(good) // 2], auth=conn.auth, headers=gzipped
        )
        assert cut.status_code == 400, (path, cut.text)
        assert "truncated" in cut.json()["message"]
        noise = stack.client.post(path, content=b"not gzip", auth=conn.auth, headers=gzipped)
        assert noise.status_code == 400, (path, noise.text)
        assert noise.json()["message"] == "body is not valid gzip"
        # gzip inside gzip is inflated once: the inner stream is not UTF-8 JSON.
        twice = stack.client.post(
            path, content=gzip.compress(good), auth=conn.auth, headers=gzipped
        )
        assert twice.status_code == 400, (path, twice.text)
        other = stack.client.post(
            path, content=good, auth=conn.auth, headers={"Content-Encoding": "br", **JSON}
        )
        assert other.status_code == 415, (path, other.text)
        assert other.json()["error"] == "unsupported_encoding"
    assert stored(stack) == (0, 1)
    # A well-formed gzip body is inflated and accepted.
    fine = stack.client.post("/v2/events", content=good, auth=mparticle.auth, headers=gzipped)
    assert fine.status_code == 202, fine.text
    assert stored(stack) == (1, 1)


def test_segment_errors_carry_segments_code_and_message(stack: Stack) -> None:
    """Segment's libraries read ``code`` and ``message`` from an error answer."""
    output = stack.create_output()
    segment = stack.connect(output["id"], "segment")
    answers: dict[str, httpx.Response] = {
        "bad json": stack.client.post("/v1/batch", content=b"{", auth=segment.auth, headers=JSON),
        "bad key": stack.client.post("/v1/track", json={"event": "x"}, auth=("k", "s")),
        "write key not a string": stack.client.post(
            "/v1/track", json={"event": "Order Completed", "writeKey": 5}
        ),
        "too large": stack.client.post(
            "/v1/batch", content=ten_mb_of(b"{}"), auth=segment.auth, headers=JSON
        ),
    }
    expected = {"bad json": 400, "bad key": 401, "write key not a string": 401, "too large": 413}
    assert {name: answer.status_code for name, answer in answers.items()} == expected
    for name, answer in answers.items():
        body: dict[str, Any] = answer.json()
        assert body["code"] == body["error"], name
        assert body["message"], name
    # The mParticle routes keep their own error shape.
    mparticle = stack.client.post("/v2/events", content=b"{", headers=JSON)
    assert "code" not in mparticle.json()
    assert stored(stack) == (0, 1)
