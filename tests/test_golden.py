"""The shared golden cases, mapped in-process and compared like check_golden.py does.

The cases and the comparison live outside the repository, in ``../shared`` (beside
the project root). If that directory is missing the tests fail: a silent skip would
hide that the contract examples were not checked at all.
"""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from mapping_helpers import NOW, SPEC_EXAMPLE_INPUT, SPEC_EXAMPLE_OUTPUT, canonical, sha256

from app import jsonutil
from app.pipeline import map_payload, output_settings

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden"
CHECKER = SHARED / "tools" / "check_golden.py"
CASES = sorted(GOLDEN.glob("*.json")) or [GOLDEN / "NO-GOLDEN-CASES-FOUND.json"]
MAPPING_SPEC = SHARED / "spec" / "mapping.md"


def load_checker() -> ModuleType:
    assert CHECKER.is_file(), f"the golden checker is missing: {CHECKER}"
    spec = importlib.util.spec_from_file_location("check_golden", CHECKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_now(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def map_case(case: dict[str, Any]) -> Any:
    result = map_payload(
        case["source"],
        json.dumps(case["input"]).encode("utf-8"),
        settings=output_settings(case["settings"]),
        now=parse_now(case["now"]),
    )
    # through the same JSON encoder as `relay map` prints with
    return json.loads(jsonutil.dumps(result.as_dict()))


def test_golden_cases_are_present() -> None:
    assert SHARED.is_dir(), f"the shared contract directory is missing: {SHARED}"
    assert GOLDEN.is_dir(), f"the golden cases are missing: {GOLDEN}"
    assert len(list(GOLDEN.glob("*.json"))) >= 10
    assert callable(load_checker().compare)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_golden_case(path: Path) -> None:
    assert path.is_file(), f"no golden case at {path}"
    case = json.loads(path.read_text(encoding="utf-8"))
    got = map_case(case)
    mismatch = load_checker().compare(case["expected"], got)
    assert mismatch is None, (
        f"{case['name']} {mismatch.path}: expected {mismatch.expected} got {mismatch.got}"
    )


def test_compare_detects_a_wrong_answer() -> None:
    """The comparison used above is not vacuous: a changed output is a mismatch."""
    case = json.loads(CASES[0].read_text(encoding="utf-8"))
    got = map_case(case)
    checker = load_checker()
    assert checker.compare(case["expected"], got) is None
    if got["requests"]:
        got["requests"][0]["events"][0]["countryCode"] = "ZZ"
    else:
        got["dropped"] = []
    assert checker.compare(case["expected"], got) is not None


def test_worked_example_is_the_spec_text() -> None:
    """mapping.md §13 as written in the spec file, hash placeholder filled in."""
    text = MAPPING_SPEC.read_text(encoding="utf-8")
    section = text[text.index("## 13. Example") :]
    blocks = re.findall(r"```json\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2
    spec_input = json.loads(blocks[0])
    spec_output = json.loads(
        blocks[1].replace("<sha256 of 'jane.doe@example.com'>", sha256("jane.doe@example.com"))
    )
    assert spec_input == json.loads(SPEC_EXAMPLE_INPUT)
    assert spec_output == SPEC_EXAMPLE_OUTPUT
    settings = {"data_set_name": "web_purchases", "partner_name": "acme_relay"}
    result = map_payload(
        "mparticle", blocks[0].encode(), settings=output_settings(settings), now=NOW
    )
    assert canonical(result.requests) == canonical([spec_output])
    assert [d.as_dict() for d in result.dropped] == [{"index": 1, "reason": "not_commerce_event"}]
