"""``relay map`` as users and scripts run it: a subprocess, JSON out, exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mapping_helpers import (
    SPEC_EXAMPLE_INPUT,
    SPEC_EXAMPLE_OUTPUT,
    canonical,
    commerce,
    custom,
    mp_batch,
    sha256,
)

RELAY = Path(sys.executable).with_name("relay")
NOW = "2025-11-23T20:00:00Z"


def relay(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert RELAY.is_file(), f"the relay command is not installed at {RELAY}"
    return subprocess.run(
        [str(RELAY), "map", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, content: bytes | str, name: str = "payload.json") -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_happy_path_prints_requests_and_dropped(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE_INPUT)
    settings = json.dumps({"data_set_name": "web_purchases", "partner_name": "acme_relay"})
    proc = relay("--source", "mparticle", "--settings", settings, "--now", NOW, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    output = json.loads(proc.stdout)
    assert set(output) == {"requests", "dropped"}
    assert output["dropped"] == [{"index": 1, "reason": "not_commerce_event"}]
    [request] = output["requests"]
    [event] = request["events"]
    assert event["matchKeys"][0] == {"type": "EMAIL", "values": [sha256("jane.doe@example.com")]}
    assert event["value"] == 59.99
    assert event["eventDescription"]["dataSetName"] == "web_purchases"
    assert event["partner"] == "acme_relay"
    assert canonical(output) == canonical(
        {
            "requests": [SPEC_EXAMPLE_OUTPUT],
            "dropped": [{"index": 1, "reason": "not_commerce_event"}],
        }
    )
    assert proc.stdout.endswith(b"\n")
    assert proc.stdout.count(b"\n") == 1  # one JSON document on one line


def test_standard_input_and_default_settings() -> None:
    batch = mp_batch(commerce(), custom())
    proc = relay("--source", "mparticle", "--now", NOW, "-", stdin=json.dumps(batch).encode())
    assert proc.returncode == 0, proc.stderr
    output = json.loads(proc.stdout)
    assert len(output["requests"][0]["events"]) == 1
    assert output["dropped"] == [{"index": 1, "reason": "not_commerce_event"}]


def test_deterministic_id_uses_connection_id_default_empty(tmp_path: Path) -> None:
    event = commerce()
    del event["data"]["event_id"]
    path = write(tmp_path, json.dumps(mp_batch(event)))
    proc = relay("--source", "mparticle", "--now", NOW, path)
    text = "\n" + json.dumps(event, sort_keys=True, separators=(",", ":"))
    assert json.loads(proc.stdout)["requests"][0]["events"][0]["eventId"] == sha256(text)[:32]


@pytest.mark.parametrize(
    ("source", "payload"),
    [
        (
            "segment",
            {
                "type": "track",
                "event": "Order Completed",
                "messageId": "m1",
                "timestamp": "2025-11-23T12:13:20Z",
                "context": {"locale": "en-US", "traits": {"email": "a@b.co"}},
            },
        ),
        (
            "records",
            [
                {
                    "event_type": "purchase",
                    "event_time": "2025-11-23T12:13:20Z",
                    "email": "a@b.co",
                    "country_code": "US",
                    "event_id": "m1",
                }
            ],
        ),
    ],
    ids=["segment", "records"],
)
def test_other_sources(tmp_path: Path, source: str, payload: Any) -> None:
    proc = relay("--source", source, "--now", NOW, write(tmp_path, json.dumps(payload)))
    assert proc.returncode == 0, proc.stderr
    [event] = json.loads(proc.stdout)["requests"][0]["events"]
    assert event["eventId"] == "m1"
    assert event["eventDescription"]["conversionType"] == "OFF_AMAZON_PURCHASES"


def test_records_csv_file(tmp_path: Path) -> None:
    csv_path = Path(__file__).parent / "fixtures" / "records.csv"
    proc = relay("--source", "records", "--now", NOW, str(csv_path))
    assert proc.returncode == 0, proc.stderr
    output = json.loads(proc.stdout)
    assert [e["eventId"] for e in output["requests"][0]["events"]] == ["csv-1", "csv-2"]
    assert [(d["index"], d["reason"]) for d in output["dropped"]] == [
        (2, "invalid_event"),
        (3, "no_match_key"),
    ]
    assert "event_value" in output["dropped"][0]["detail"]


def test_all_dropped_prints_no_request(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps(mp_batch(custom(), commerce(""))))
    proc = relay("--source", "mparticle", "--now", NOW, path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {
        "requests": [],
        "dropped": [
            {"index": 0, "reason": "not_commerce_event"},
            {"index": 1, "reason": "missing_action"},
        ],
    }


GOOD = json.dumps(mp_batch()).encode()
BAD_INPUTS = [
    ("not-json", b"{this is not json", [], ("json",)),
    ("empty-file", b"", [], ("json",)),
    ("not-an-object", b"[1, 2, 3]", [], ("object",)),
    ("events-not-a-list", b'{"events": {"a": 1}}', [], ("events", "list")),
    ("settings-not-json", GOOD, ["--settings", "{region: EU}"], ("settings",)),
    ("settings-not-object", GOOD, ["--settings", "[1]"], ("settings",)),
    ("settings-bad-region", GOOD, ["--settings", '{"region": "MARS"}'], ("region",)),
    (
        "settings-bad-age",
        GOOD,
        ["--settings", '{"max_event_age_hours": 9999}'],
        ("max_event_age_hours",),
    ),
    (
        "settings-bad-data-set",
        GOOD,
        ["--settings", '{"data_set_name": "9 lives"}'],
        ("data_set_name",),
    ),
    (
        "settings-bad-rule",
        GOOD,
        ["--settings", '{"conversion_rules": [{"event_name": "x", "conversion_type": "NOPE"}]}'],
        ("conversion_rules[0].conversion_type",),
    ),
    ("bad-now", GOOD, ["--now", "yesterday"], ("--now", "yesterday")),
    ("bad-now-date", GOOD, ["--now", "2025-13-45T00:00:00Z"], ("--now",)),
]


@pytest.mark.parametrize(
    ("content", "extra", "words"),
    [b[1:] for b in BAD_INPUTS],
    ids=[b[0] for b in BAD_INPUTS],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, content: bytes, extra: list[str], words: tuple[str, ...]
) -> None:
    args = ["--source", "mparticle", "--now", NOW, *extra, write(tmp_path, content)]
    proc = relay(*args)
    assert proc.returncode == 2
    assert proc.stdout == b""
    stderr = proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def test_missing_file_exits_2_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    proc = relay("--source", "mparticle", "--now", NOW, str(missing))
    assert proc.returncode == 2
    assert proc.stdout == b""
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert str(missing) in lines[0]
    assert "Traceback" not in proc.stderr.decode()


def test_segment_bad_payload_exits_2(tmp_path: Path) -> None:
    proc = relay("--source", "segment", "--now", NOW, write(tmp_path, b'"just a string"'))
    assert proc.returncode == 2
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    assert b"Traceback" not in proc.stderr
