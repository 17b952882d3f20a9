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
from typing import Any

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


def _definitions() -> Path:
    from conftest import validator_path

    return validator_path().parent / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"


def test_r4_required_codes_are_the_ones_hl7_publishes(findings: dict[str, list[str]]) -> None:
    """gateway/fhir/r4-required-codes.json (R4's required bindings on codes) is what its generator makes from the
    HL7 definitions that the outside validators install (by the ``findings`` run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("r4codes", ROOT / "tests" / "tools" / "r4codes" / "generate.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    shipped = json.loads((ROOT / "gateway" / "fhir" / "r4-required-codes.json").read_text(encoding="utf-8"))
    assert generator.generate(_definitions()) == shipped
    assert len(shipped["elements"]) > 300


def test_r4_required_codes_agree_with_the_official_r4_json_schema(findings: dict[str, list[str]]) -> None:
    """A second, independent source: HL7's R4 JSON schema (as the outside schema validator ships it) spells the
    same value sets as enums. Every element both know has the same codes; the schema knows FHIR 4.0.0 only."""
    from conftest import validator_path
    from gateway.fhir.profiles import _CODED, _Model

    schema = json.loads((validator_path().parent / "node_modules" / "@asymmetrik" / "fhir-json-schema-validator"
                         / "fhir.schema.json").read_text(encoding="utf-8"))["definitions"]
    table = json.loads((ROOT / "gateway" / "fhir" / "r4-required-codes.json").read_text(encoding="utf-8"))["elements"]

    def enum_of(path: str) -> list[str] | None:
        first, *names = path.split(".")
        definition = schema.get(first)
        for i, name in enumerate(names):
            prop = (definition or {}).get("properties", {}).get(name)
            if prop is None:
                return None
            if i == len(names) - 1:
                return prop.get("enum") or prop.get("items", {}).get("enum")
            ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
            definition = schema.get(ref.rsplit("/", 1)[-1]) if ref else None
        return None

    compared = 0
    for path, bound in table.items():
        enum = enum_of(path)
        if enum is None:
            continue  # (the schema leaves some value sets open, e.g. hierarchical ones)
        compared += 1
        expected = set(enum) | ({"4.0.1"} if path.endswith("fhirVersion") else set())
        assert set(bound["codes"]) == expected, path
    assert compared > 200
    # and the validator's model finds each of them: every element of the table is checked as a bound code
    model = _Model()
    for path in table:
        owner, _, name = path.rpartition(".")
        slot = model.slots(owner).get(name)
        assert slot is not None and slot.kind == _CODED, path


def test_r4_required_codes_agree_with_fhir_js(findings: dict[str, list[str]]) -> None:
    """A third source, the R4 definitions FHIR.js (one of the outside validators) ships: every element of the table
    is bound there to the same value set, and every code of ours is one of its codes (it lists whole code systems
    where R4 takes part of one, so it may hold more). The package the table is made from carries a few slips of
    later FHIR versions; what rests on them is left out (``DetectedIssue.status``: R4 binds it to
    observation-status, the package to R5's detectedissue-status)."""
    from conftest import validator_path

    fhirjs = validator_path().parent / "node_modules" / "fhir" / "profiles"
    types = json.loads((fhirjs / "types.json").read_text(encoding="utf-8"))
    value_sets = json.loads((fhirjs / "valuesets.json").read_text(encoding="utf-8"))
    table = json.loads((ROOT / "gateway" / "fhir" / "r4-required-codes.json").read_text(encoding="utf-8"))["elements"]
    bound: dict[str, str] = {}

    def walk(properties: list[dict[str, Any]], path: str) -> None:
        for prop in properties:
            here = f"{path}.{prop.get('_name', '')}"
            if prop.get("_type") == "code" and prop.get("_valueSetStrength") == "required" and prop.get("_valueSet"):
                bound[here] = prop["_valueSet"].split("|")[0]
            walk(prop.get("_properties") or [], here)

    for name, definition in types.items():
        if isinstance(definition, dict):
            walk(definition.get("_properties") or [], name)
    for path, entry in table.items():
        assert bound.get(path) == entry["valueSet"], path
        theirs = {c["code"] for system in value_sets.get(entry["valueSet"], {}).get("systems", [])
                  for c in system.get("codes", [])}
        assert not theirs or set(entry["codes"]) <= theirs, path
    assert "DetectedIssue.status" in bound and "DetectedIssue.status" not in table


BINDING_CASES = [
    ("Observation.status", {"resourceType": "Observation", "status": "done", "code": {"text": "x"}}),
    ("Patient.gender", {"resourceType": "Patient", "gender": "M"}),
    ("Bundle.type", {"resourceType": "Bundle", "type": "bag"}),
    ("Patient.identifier[0].use", {"resourceType": "Patient", "identifier": [{"use": "primary", "value": "1"}]}),
    ("Patient.telecom[0].system", {"resourceType": "Patient", "telecom": [{"system": "wechat", "value": "1"}]}),
    ("Observation.valueQuantity.comparator", {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                              "valueQuantity": {"value": 1, "comparator": "~"}}),
    ("Bundle.entry[0].request.method", {"resourceType": "Bundle", "type": "batch",
                                        "entry": [{"request": {"method": "FETCH", "url": "Patient"}}]}),
    ("DiagnosticReport.status", {"resourceType": "DiagnosticReport", "status": "signed", "code": {"text": "x"}}),
]


def test_codes_outside_r4s_required_value_sets_are_refused_as_the_outside_validators_refuse_them(
        tmp_path: Path) -> None:
    """Each resource is refused by the outside validators and by ours, at the same element; with a code of the
    value set in its place, both accept it."""
    from gateway.fhir.profiles import load_guide

    guide = load_guide()
    files = []
    for n, (where, resource) in enumerate(BINDING_CASES):
        path = tmp_path / f"bad-{n}.json"
        path.write_text(json.dumps(resource), encoding="utf-8")
        files.append(path)
        issues = guide.validate(resource)
        assert [(i.location, i.code, i.extra["rule"]) for i in issues] == [(where, "code-invalid", "binding")]
    result = validate_fhir(files)
    assert result.returncode == 1, result.stderr
    for n, (where, _) in enumerate(BINDING_CASES):
        refused = [line for line in result.stdout.splitlines()
                   if line.startswith(f"{files[n]}: [") and "error" in line]
        assert refused and any(where.split(".", 1)[1] in line for line in refused), (where, refused)
    good = [("status", "final"), ("gender", "female"), ("type", "collection")]
    for (where, resource), (name, code) in zip(BINDING_CASES[:3], good):
        fixed = dict(resource, **{name: code})
        assert guide.validate(fixed) == [], where
