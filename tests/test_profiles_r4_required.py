"""R4's required elements (``min`` 1 or more) and array shapes are checked by the gateway's validator, for every
resource type and datatype, profiled or not: an Observation without ``status`` is not "all OK", nor an Encounter
whose ``participant`` is an object.

The table (``gateway/fhir/r4-elements.json``) is made from HL7's definitions by
``tests/tools/r4codes/elements.py``; these tests hold it equal to what the generator makes, and hold the validator's
verdicts equal to the outside validators' (tests/tools/validate-fhir) on resources of our guide's examples with one
required element taken out at a time, and on the outside validators' own sample.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, validate_fhir, validator_path

EXAMPLES = sorted((ROOT / "profiles" / "examples").glob("*.json"))
CUT = "resourceType", "id", "meta"


@pytest.fixture(scope="module")
def guide() -> Any:
    from gateway.fhir.profiles import load_guide

    return load_guide()


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("r4elements", ROOT / "tests" / "tools" / "r4codes" / "elements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_is_what_its_generator_makes_from_the_hl7_definitions(tmp_path: Path) -> None:
    sample = tmp_path / "o.json"
    sample.write_text(json.dumps({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}))
    assert validate_fhir([sample]).returncode == 0  # (installs the outside validators' packages, once)
    generator = _generator()
    modules = validator_path().parent / "node_modules"
    made = generator.generate(modules / "@medplum" / "definitions" / "dist" / "fhir" / "r4",
                              modules / "@asymmetrik" / "fhir-json-schema-validator" / "fhir.schema.json")
    shipped = json.loads((ROOT / "gateway" / "fhir" / "r4-elements.json").read_text(encoding="utf-8"))
    assert made == shipped
    table = shipped["required"]
    assert table["Observation"] == ["code", "status"]
    assert table["Patient.link"] == ["other", "type"]
    assert table["Bundle.entry.request"] == ["method", "url"]
    assert table["UsageContext"] == ["code", "value[x]"]
    assert table["MeasureReport"] == ["measure", "period", "status", "type"]  # (the package's slip, mended)
    assert sum(len(v) for v in table.values()) > 700
    repeating = shipped["repeating"]
    assert repeating["Encounter.participant"] == ["extension", "modifierExtension", "type"]
    assert repeating["Narrative"] == ["extension"] and "ResearchStudy" not in repeating


def test_the_repeating_table_agrees_with_the_official_r4_json_schema() -> None:
    """A second source: HL7's R4 JSON schema spells every repeating element as an array. Every element of every
    owner both know has the same shape."""
    generator = _generator()
    schema = json.loads(generator.SCHEMA.read_text(encoding="utf-8"))["definitions"]
    from gateway.fhir.profiles import _ALWAYS_REPEATING, _Model

    model = _Model()
    shipped = json.loads((ROOT / "gateway" / "fhir" / "r4-elements.json").read_text(encoding="utf-8"))["repeating"]
    compared = 0
    for owner, names in shipped.items():
        first, *steps = owner.split(".")
        definition = schema.get(first)
        for step in steps:
            prop = (definition or {}).get("properties", {}).get(step) or {}
            ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
            definition = schema.get(ref.rsplit("/", 1)[-1]) if ref else None
        if definition is None:
            continue
        for name in model.children_of(owner):
            prop = definition.get("properties", {}).get(name)
            if prop is None:
                continue
            compared += 1
            assert (prop.get("type") == "array") == (name in names or name in _ALWAYS_REPEATING), f"{owner}.{name}"
    assert compared > 5000


def _cuts(guide: Any, resource: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Copies of ``resource`` each without one element R4 requires (the first place each (owner, element) is met):
    ``(its location, the copy)``."""
    model = guide._model
    out: list[tuple[str, dict[str, Any]]] = []
    met: set[tuple[str, str]] = set()

    def visit(obj: dict[str, Any], owner: str, loc: str, path: list[Any]) -> None:
        for name, keys in model.required(owner):
            present = [k for k in keys if k in obj]
            if present and len(present) < len(obj) and (owner, name) not in met:  # (an emptied object: ele-1)
                met.add((owner, name))
                cut = copy.deepcopy(resource)
                target = cut
                for step in path:
                    target = target[step]
                for k in present:
                    del target[k]
                out.append((f"{loc}.{name}", cut))
        slots = model.slots(owner)
        for key, val in obj.items():
            slot = slots.get(key)
            if slot is None or key in CUT or slot.type_code == "Resource":
                continue
            items = val if isinstance(val, list) else [val]
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    step = [key, i] if isinstance(val, list) else [key]
                    visit(item, slot.child_key, f"{loc}.{key}" + (f"[{i}]" if isinstance(val, list) else ""),
                          path + step)

    visit(resource, resource["resourceType"], resource["resourceType"], [])
    return out


#: Resources of kinds the gateway answers with or keeps (an audit entry, a provenance, a transaction's request, an
#: outcome), whole: their required elements are taken out one at a time too.
MORE: list[dict[str, Any]] = [
    {"resourceType": "AuditEvent",
     "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
     "recorded": "2026-11-20T09:30:00+08:00",
     "agent": [{"who": {"display": "lis"}, "requestor": True}],
     "source": {"observer": {"display": "gateway"}},
     "entity": [{"what": {"reference": "DiagnosticReport/1"}, "detail": [{"type": "note", "valueString": "x"}]}]},
    {"resourceType": "Provenance", "target": [{"reference": "DiagnosticReport/1"}],
     "recorded": "2026-11-20T09:30:00+08:00", "agent": [{"who": {"display": "gateway"}}],
     "signature": [{"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5"}],
                    "when": "2026-11-20T09:30:00+08:00", "who": {"display": "gateway"}}]},
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "required"}]},
    {"resourceType": "Bundle", "type": "transaction",
     "entry": [{"fullUrl": "urn:uuid:1c2a1f0e-6f6a-4b53-9d0b-7f7f7f7f7f7f",
                "resource": {"resourceType": "Patient",
                             "text": {"status": "generated",
                                      "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">王</div>"},
                             "link": [{"other": {"reference": "Patient/2"}, "type": "seealso"}]},
                "request": {"method": "POST", "url": "Patient"}}]},
    {"resourceType": "Observation", "status": "final", "code": {"text": "血压"},
     "component": [{"code": {"text": "收缩压"}, "valueQuantity": {"value": 120}}],
     "referenceRange": [{"low": {"value": 1}}],
     "note": [{"text": "复查"}]},
    {"resourceType": "Specimen", "collection": {"collectedDateTime": "2026-11-20"},
     "container": [{"identifier": [{"value": "1"}]}]},
    {"resourceType": "Encounter", "status": "finished",
     "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
     "participant": [{"individual": {"display": "陈明"}}],
     "location": [{"location": {"display": "检验科"}}]},
]


def test_each_required_element_taken_out_is_refused_by_ours_and_by_the_outside_validators(
        guide: Any, tmp_path: Path) -> None:
    """Our guide's examples (their resources on their own, without our profiles' claims, so that base R4 alone
    decides), each with one required element taken out: the outside validators refuse each, and ours names the
    element; the untouched ones pass both."""
    resources: list[dict[str, Any]] = []
    for path in EXAMPLES:
        doc = json.loads(path.read_text(encoding="utf-8"))
        found = [e["resource"] for e in doc.get("entry", []) if "resource" in e] if doc["resourceType"] == "Bundle" \
            else [doc]
        if doc["resourceType"] == "Bundle":
            found.append({k: v for k, v in doc.items() if k not in ("entry", "signature")})
        for res in found:
            res = {k: v for k, v in res.items() if k not in ("meta", "contained")}
            resources.append(res)
    resources += copy.deepcopy(MORE)
    cases: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for res in resources:
        for where, cut in _cuts(guide, res):
            shape = where.split("[")[0] + "|" + "".join(c for c in where if not c.isdigit())
            if shape not in seen:
                seen.add(shape)
                cases.append((where, cut))
    assert len(cases) >= 25, [w for w, _ in cases]
    assert {"Observation.status", "Observation.code", "DiagnosticReport.status", "Task.intent"} <= \
        {w for w, _ in cases}

    files = []
    for n, (where, cut) in enumerate(cases):
        assert guide.validate(copy.deepcopy(cut)) == guide.validate_reference(copy.deepcopy(cut)), where
        issues = guide.validate(cut)
        assert any(i.location == where and i.code == "required" for i in issues), (where, issues)
        assert not guide.is_clean(cut)
        path = tmp_path / f"cut-{n}.json"
        path.write_text(json.dumps(cut, ensure_ascii=False, default=str), encoding="utf-8")
        files.append(path)
    whole = []
    for n, res in enumerate(resources):
        path = tmp_path / f"whole-{n}.json"
        path.write_text(json.dumps(res, ensure_ascii=False, default=str), encoding="utf-8")
        whole.append(path)
    result = validate_fhir(files + whole)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stdout.splitlines() if "] error:" in line]
    for (where, _), path in zip(cases, files):
        said = [line for line in errors if line.startswith(f"{path}: [")]
        assert said, f"the outside validators accept a resource without {where}"
    for path in whole:
        assert not [line for line in errors if line.startswith(f"{path}: [")]


def test_the_outside_validators_samples_without_status_or_code(guide: Any) -> None:
    """The outside validators' own samples of an Observation without ``status`` and one without ``code`` (less
    their claim of a US Core profile, which this guide does not have)."""
    samples = validator_path().parent / "samples"
    for name, where in (("invalid-missing-status.json", "Observation.status"),
                        ("invalid-missing-code.json", "Observation.code")):
        resource = json.loads((samples / name).read_text(encoding="utf-8"))
        del resource["meta"]
        issues = guide.validate(resource)
        assert [(i.location, i.code, i.extra["rule"]) for i in issues] == [(where, "required", "base-cardinality")]
        assert issues[0].message == f"is missing: FHIR R4 requires {where}"


CASES = [
    # (resource, where R4 finds a required element missing, or None)
    ({"resourceType": "Observation", "code": {"text": "x"}}, "Observation.status"),
    ({"resourceType": "Observation", "_status": {"extension": [{"url": "http://example.org/x", "valueString": "a"}]},
      "code": {"text": "x"}}, None),  # a primitive is there with its extensions alone
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "component": [{"code": {"text": "a"}, "valueString": "1"}, {"valueString": "2"}]},
     "Observation.component[1].code"),
    ({"resourceType": "Patient", "link": [{"type": "seealso"}]}, "Patient.link[0].other"),
    ({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET"}}]},
     "Bundle.entry[0].request.url"),
    ({"resourceType": "Bundle", "entry": [{"fullUrl": "urn:uuid:1c2a1f0e-6f6a-4b53-9d0b-7f7f7f7f7f7f"}]},
     "Bundle.type"),
    ({"resourceType": "Bundle", "type": "collection",
      "entry": [{"resource": {"resourceType": "Observation", "status": "final"}}]},
     "Bundle.entry[0].resource.code"),
    ({"resourceType": "Patient", "text": {"status": "generated"}}, "Patient.text.div"),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "subject": {"reference": "Patient/1", "extension": [{"url": "https://example.org/u",
                                                           "valueUsageContext": {"code": {"code": "focus"}}}]}},
     "Observation.subject.extension[0].valueUsageContext.value[x]"),  # a choice element: any of its types
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "subject": {"reference": "Patient/1", "extension": [{"url": "https://example.org/u", "valueUsageContext": {
          "code": {"code": "focus"}, "valueCodeableConcept": {"text": "y"}}}]}}, None),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "extension": [{"valueString": "no url"}]}, "Observation.extension[0].url"),  # said once, as before
]

SHAPES = [
    # (resource, where an array is where one value belongs, or the reverse): types outside our guide's Bundles
    ({"resourceType": "Encounter", "status": "finished",
      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
      "participant": {"individual": {"display": "陈明"}}}, "Encounter.participant"),
    ({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "subject": {"display": "王建国"},
      "code": [{"text": "血常规"}]}, "ServiceRequest.code"),
    ({"resourceType": "Task", "status": "requested", "intent": "order",
      "input": [{"type": {"text": "a"}, "valueString": "b"}], "note": {"text": "c"}}, "Task.note"),
]


def test_array_shapes_of_every_type_as_the_outside_validators_see_them(guide: Any, tmp_path: Path) -> None:
    files = []
    for n, (resource, where) in enumerate(SHAPES):
        issues = guide.validate(copy.deepcopy(resource))
        assert issues == guide.validate_reference(copy.deepcopy(resource))
        assert [(i.location, i.extra["rule"]) for i in issues] == [(where, "array")], issues
        path = tmp_path / f"shape-{n}.json"
        path.write_text(json.dumps(resource, ensure_ascii=False), encoding="utf-8")
        files.append(path)
        name = where.split(".")[-1]
        fixed = copy.deepcopy(resource)
        fixed[name] = [fixed[name]] if not isinstance(fixed[name], list) else fixed[name][0]
        assert guide.validate(fixed) == [] and guide.is_clean(fixed), where
        path = tmp_path / f"fixed-{n}.json"
        path.write_text(json.dumps(fixed, ensure_ascii=False), encoding="utf-8")
        files.append(path)
    result = validate_fhir(files)
    errors = [line for line in result.stdout.splitlines() if "] error:" in line]
    for n in range(len(SHAPES)):
        assert [line for line in errors if line.startswith(f"{files[2 * n]}: [")], SHAPES[n][1]
        assert not [line for line in errors if line.startswith(f"{files[2 * n + 1]}: [")], SHAPES[n][1]


@pytest.mark.parametrize("resource,where", CASES, ids=[str(w) for _, w in CASES])
def test_required_elements(guide: Any, resource: dict[str, Any], where: str | None) -> None:
    issues = guide.validate(copy.deepcopy(resource))
    assert issues == guide.validate_reference(copy.deepcopy(resource))
    assert guide.is_clean(copy.deepcopy(resource)) == (not issues)
    if where is None:
        assert issues == []
    else:
        assert [i.location for i in issues if i.code == "required"] == [where], issues
        assert [i for i in issues if i.severity == "error"], issues


def test_an_element_our_profile_requires_too_is_reported_once(guide: Any) -> None:
    """A lab Observation of our guide without ``status``: the profile names it (its slice and label); R4's own
    requirement of the same element adds nothing."""
    doc = json.loads((ROOT / "profiles" / "examples" / "Observation-glucose.json").read_text(encoding="utf-8"))
    assert guide.validate(doc) == []
    del doc["status"]
    issues = guide.validate(doc)
    at = [i for i in issues if i.location == "Observation.status"]
    assert len(at) == 1 and "profile" in at[0].extra and at[0].code == "required", issues
