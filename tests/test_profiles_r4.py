"""The guide against base R4, checked by validators nobody on the team wrote (tests/tools/validate-fhir).

Every StructureDefinition, CodeSystem and ValueSet in profiles/ is valid R4;
every example is valid R4; and every invalid example whose sidecar says
``base_valid`` is valid R4 too, so that only *our* profiles catch it. One run
of the tool covers all files (node starts once).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, validate_fhir

PROFILES = ROOT / "profiles"
CONFORMANCE = sorted(p for p in PROFILES.glob("*.json") if p.name != "package.json")
EXAMPLES = sorted((PROFILES / "examples").glob("*.json"))
INVALID = sorted(p for p in (PROFILES / "examples" / "invalid").glob("*.json") if not p.name.endswith(".expected.json"))


def base_valid(path: Path) -> bool:
    sidecar = json.loads(path.with_name(path.name[:-5] + ".expected.json").read_text(encoding="utf-8"))
    return bool(sidecar["base_valid"])


@pytest.fixture(scope="module")
def findings() -> dict[str, list[str]]:
    """Error lines of the independent validators, per file (one run for every file)."""
    files = CONFORMANCE + EXAMPLES + INVALID
    result = validate_fhir(files)
    assert result.returncode in (0, 1), result.stderr
    out: dict[str, list[str]] = {str(p): [] for p in files}
    for line in result.stdout.splitlines():
        m = re.match(r"^(.*?\.json): \[(\w+)\] error: (.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(f"[{m.group(2)}] {m.group(3)}")
    return out


@pytest.mark.parametrize("path", CONFORMANCE, ids=lambda p: p.name)
def test_conformance_resources_are_valid_r4(findings: dict[str, list[str]], path: Path) -> None:
    assert findings[str(path)] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_r4(findings: dict[str, list[str]], path: Path) -> None:
    assert findings[str(path)] == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_break_only_what_their_sidecar_says(findings: dict[str, list[str]], path: Path) -> None:
    if base_valid(path):
        assert findings[str(path)] == [], "valid R4: only our profiles should refuse it"
    else:
        assert findings[str(path)], "the sidecar says base R4 refuses this one too"


def test_the_validators_table_of_repeating_elements_matches_r4(findings: dict[str, list[str]]) -> None:
    """gateway.fhir.profiles spells out which elements are arrays; the R4 definitions shipped with the
    independent validator (installed by the ``findings`` run) must agree for every element it knows."""
    from conftest import validator_path
    from gateway.fhir.profiles import _ALWAYS_REPEATING, _REPEATING, _Model

    definitions = validator_path().parent / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
    maxes: dict[str, str] = {}
    for name in ("profiles-types.json", "profiles-resources.json"):
        for entry in json.loads((definitions / name).read_text(encoding="utf-8"))["entry"]:
            sd = entry["resource"]
            if sd["resourceType"] == "StructureDefinition" and sd.get("derivation") == "specialization":
                maxes.update({e["path"]: e.get("max", "1") for e in sd["snapshot"]["element"]})
    model = _Model()
    checked = 0
    for owner, names in _REPEATING.items():
        for name in model.children_of(owner):
            declared = maxes.get(f"{owner}.{name}")
            if declared is None:
                continue  # inherited through a profile (SimpleQuantity) or a choice spelled out
            checked += 1
            assert (declared not in ("0", "1")) == (name in names or name in _ALWAYS_REPEATING), f"{owner}.{name}"
    assert checked > 300
