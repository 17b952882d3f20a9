"""One source for every code list: the CodeSystems in profiles/ are what other members read, and the registry
schema, the models, the engine and every FHIR rendering use exactly their codes.

Codes written before the lists agreed (``other`` for a re-test reason, the long qualification type names) are
still read: a stored audit entry renders and verifies, an old registry source or snapshot loads, and a query
by the old name finds the same qualification.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.audit import records as r
from gateway.audit.log import append, append_prepared, get, prepare
from gateway.audit.render import _OUTCOME_DISPLAY, CS_RETEST_REASON, render
from gateway.audit.verify import verify
from gateway.demo.registry import DEMO_SOURCE
from gateway.fhir import occupational
from gateway.mapping import tables
from gateway.naming import cs_url
from gateway.recognition import engine
from gateway.recognition.facts import CS_REPORT_CATEGORY, _report_class
from gateway.recognition.fhir import CS_NON_RECOGNITION_REASON, NON_RECOGNITION_REASONS
from gateway.recognition.overrides import (
    RETEST_REASONS,
    RETIRED_RETEST_REASONS,
    make_override,
    retest_reason_code,
)
from gateway.registry import models
from gateway.registry.fhir import CS_QUALIFICATION_TYPE, registry_resources
from gateway.registry.policy import qualifications_of
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import RegistrySourceError, load_source, parse_source, read_source_data, source_schema
from gateway.store.db import connect

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 11, 20, 10, 0, tzinfo=CST)
SCHEMA = source_schema()
DEFS = SCHEMA["$defs"]


def code_system(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PROFILES / f"CodeSystem-{name}.json").read_text(encoding="utf-8"))
    assert data["url"] == cs_url(name)
    return data


def codes(name: str) -> list[str]:
    return [c["code"] for c in code_system(name)["concept"]]


def displays(name: str) -> dict[str, str]:
    return {c["code"]: c["display"] for c in code_system(name)["concept"]}


@pytest.fixture(scope="module")
def snapshot() -> models.Snapshot:
    return unsigned_snapshot(load_source(DEMO_SOURCE), dt.datetime(2026, 11, 1, tzinfo=CST), dt.timedelta(days=60))


def test_every_code_system_has_its_value_set_and_a_consistent_count() -> None:
    for path in sorted(PROFILES.glob("CodeSystem-*.json")):
        cs = json.loads(path.read_text(encoding="utf-8"))
        name = path.stem.removeprefix("CodeSystem-")
        vs_path = PROFILES / f"ValueSet-{name}.json"
        assert vs_path.exists(), f"{path.name} has no ValueSet"
        vs = json.loads(vs_path.read_text(encoding="utf-8"))
        assert {"system": cs["url"]} in vs["compose"]["include"]
        if cs["content"] == "complete":
            assert cs["count"] == len(cs["concept"]) == len({c["code"] for c in cs["concept"]}), path.name


# -- re-test reasons -------------------------------------------------------------------------------------


def test_retest_reasons_are_the_code_system_in_its_order() -> None:
    assert list(RETEST_REASONS) == codes("retest-reason")
    assert "other" not in list(RETEST_REASONS) and "other" not in codes("retest-reason")


def test_a_retired_reason_code_is_read_as_the_code_it_became() -> None:
    for old, new in RETIRED_RETEST_REASONS.items():
        assert new in codes("retest-reason") and old not in codes("retest-reason")
        assert old in RETEST_REASONS and RETEST_REASONS[old] is RETEST_REASONS[new]
        assert retest_reason_code(old) == new
    assert make_override("d-1", "other", "D1", AT).reason == "other-necessary"
    assert "other-maybe" not in RETEST_REASONS


def test_an_override_audited_with_the_retired_code_still_renders_and_verifies(tmp_path: Path, database: str) -> None:
    db = connect(database or tmp_path / "audit.db")  # the backend chosen with --backend
    me = r.Party.member("12511921MB0001003C", "通江县人民医院（演示）")
    doctor = r.Party.staff("D1", "演示医师")

    def override(reason: str) -> r.Record:
        return r.override(at=AT, gateway=me, physician=doctor, reason=reason, decision_id="d-17")

    # An entry exactly as the gateway wrote it before: facts and search keys both say "other".
    (old,) = prepare([override("other")])
    assert b'"other-necessary"' in old  # today's search keys use the CodeSystem code
    old_layout = old.replace(b'"other-necessary"', b'"other"')
    assert json.loads(old_layout)["facts"]["reason"] == "other"
    append_prepared(db, [old_layout])
    append(db, override("other-necessary"))
    report = verify(db)
    assert report.ok, report.lines()
    for seq in (1, 2):
        event = render("override", get(db, seq).recorded, get(db, seq).facts)
        assert event["subtype"] == [
            {"system": CS_RETEST_REASON, "code": "other-necessary", "display": RETEST_REASONS["other-necessary"].en}
        ]
        assert event["outcomeDesc"] == "其他情形确需复查的"
    db.conn.close()


# -- qualification types ----------------------------------------------------------------------------------


def test_qualification_types_are_the_code_system() -> None:
    assert list(models.QUALIFICATION_TYPES) == codes("qualification-type")
    assert models.QUALIFICATION_TYPES == displays("qualification-type")


def _type_conditions(node: Any) -> Any:
    """Every list of qualification types a conditional schema rule names (``properties.type``)."""
    if isinstance(node, dict):
        named = (node.get("properties") or {}).get("type")
        if isinstance(named, dict) and ("enum" in named or "const" in named):
            yield named.get("enum", [named.get("const")])
        for value in node.values():
            yield from _type_conditions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _type_conditions(value)


def test_the_schema_takes_the_code_system_codes_and_the_retired_ones() -> None:
    enum = DEFS["qualification"]["properties"]["type"]["enum"]
    current = [c for c in codes("qualification-type") if c != "eqa-pass"]  # EQA results are listed under `eqa`
    assert enum == current + list(models.RETIRED_QUALIFICATION_TYPES)
    assert set(models.RETIRED_QUALIFICATION_TYPES.values()) <= set(current)
    # the conditional rules name every spelling of the types they concern
    named = list(_type_conditions(DEFS["qualification"]["allOf"]))
    assert len(named) >= 3
    for values in named:
        assert {models.qualification_type_code(v) for v in values} <= set(current), values
        for old, new in models.RETIRED_QUALIFICATION_TYPES.items():
            assert (old in values) == (new in values), (old, values)


def test_the_engine_asks_for_code_system_codes() -> None:
    text = Path(engine.__file__).read_text(encoding="utf-8")
    for old in models.RETIRED_QUALIFICATION_TYPES:
        assert f'"{old}"' not in text


def test_registry_fhir_renders_only_code_system_qualification_codes(snapshot: models.Snapshot) -> None:
    resources = registry_resources(snapshot, dt.date(2026, 11, 20))
    rendered = []
    for vr in resources["VerificationResult"]:
        for process in vr["validationProcess"]:
            rendered += [(c["code"], c["display"]) for c in process["coding"] if c["system"] == CS_QUALIFICATION_TYPE]
    for org in resources["Organization"]:
        for ext in org.get("extension", []):
            for part in ext.get("extension", []):
                if part["url"] == "code":
                    rendered += [(c["code"], c["display"]) for c in part["valueCodeableConcept"]["coding"]]
    assert ("eqa-pass", "室间质评合格") in rendered and ("eqa", "室间质量评价") not in rendered
    table = displays("qualification-type")
    assert rendered and all(table.get(code) == display for code, display in rendered), rendered


def test_an_old_source_with_the_retired_type_names_loads_and_answers_to_both(tmp_path: Path) -> None:
    data = read_source_data(DEMO_SOURCE)
    old_names = {new: old for old, new in models.RETIRED_QUALIFICATION_TYPES.items()}
    renamed = 0
    for q in data["qualifications"]:
        if q["type"] in old_names:
            q["type"] = old_names[q["type"]]
            renamed += 1
    assert renamed >= 2
    source = parse_source(json.dumps(data), base_dir=Path(DEMO_SOURCE).parent, is_json=True)
    snap = unsigned_snapshot(source, dt.datetime(2026, 11, 1, tzinfo=CST), dt.timedelta(days=60))
    assert {q.type for q in snap.qualifications} <= set(codes("qualification-type"))
    cdc = "12510000MB00030095"
    by_new = qualifications_of(snap, cdc, "occupational-diagnosis-physician", dt.date(2026, 11, 20))
    by_old = qualifications_of(snap, cdc, "occupational-disease-diagnosis-physician", dt.date(2026, 11, 20))
    assert by_new and by_new == by_old


# -- exposure and diagnosis categories ------------------------------------------------------------------


def test_exposure_categories_are_the_code_system() -> None:
    assert models.EXPOSURE_CATEGORIES == displays("exposure-category")
    assert DEFS["exposureCategory"]["enum"] == codes("exposure-category")
    assert tables.CATEGORY_SYSTEM == cs_url("exposure-category")
    assert tables.CATEGORY_DISPLAY == displays("exposure-category")  # what the CodeSystem is generated from
    assert list(occupational.EXPOSURE_CATEGORIES) == codes("exposure-category")


def test_diagnosis_categories_are_the_code_system() -> None:
    assert models.DIAGNOSIS_CATEGORIES == displays("diagnosis-category")
    assert DEFS["diagnosisCategory"]["enum"] == codes("diagnosis-category")


# -- decisions --------------------------------------------------------------------------------------------


def test_outcomes_are_the_code_system() -> None:
    assert [engine.RECOGNIZED, engine.NOT_RECOGNIZED, engine.NEEDS_REVIEW] == codes("recognition-outcome")
    assert list(_OUTCOME_DISPLAY) == codes("recognition-outcome")


def test_every_rule_has_one_non_recognition_reason() -> None:
    cs = code_system("non-recognition-reason")
    assert CS_NON_RECOGNITION_REASON == cs["url"]
    assert set(NON_RECOGNITION_REASONS) == set(engine.RULES), "a rule without a reason code (or the reverse)"
    assert sorted(NON_RECOGNITION_REASONS.values()) == sorted(codes("non-recognition-reason"))
    by_property = {
        c["code"]: next(p["valueCode"] for p in c["property"] if p["code"] == "rule") for c in cs["concept"]
    }
    assert {rule: code for code, rule in by_property.items()} == NON_RECOGNITION_REASONS


def test_every_report_category_is_read() -> None:
    for code in codes("report-category"):
        report = {"category": [{"coding": [{"system": CS_REPORT_CATEGORY, "code": code}]}]}
        assert _report_class(report) is not None, code


# -- recognition marks -------------------------------------------------------------------------------------


def _profile_mark_pattern() -> re.Pattern[str]:
    sd = json.loads((PROFILES / "StructureDefinition-recognition-mark.json").read_text(encoding="utf-8"))
    constraints = [c for e in sd["differential"]["element"] for c in e.get("constraint", [])]
    (constraint,) = [c for c in constraints if c["key"] == "cyhr-mark-1"]
    literal = re.search(r"matches\('(.*)'\)", constraint["expression"])
    assert literal is not None
    return re.compile(literal.group(1).replace("\\\\", "\\"))


MARKS_OK = ["川渝HR", "四川HR", "重庆HR", "全国HR", "京津冀HR", "协作体HR"]
MARKS_REFUSED = ["川渝互认", "HR", "川渝 HR", "川渝HR ", "hr", "川渝HR互认"]


@pytest.mark.parametrize("mark", MARKS_OK + MARKS_REFUSED)
def test_the_registry_takes_only_marks_the_profile_takes(mark: str) -> None:
    in_schema = jsonschema.Draft202012Validator(DEFS["mark"]).is_valid(mark)
    assert in_schema == (mark in MARKS_OK)
    if in_schema:
        assert _profile_mark_pattern().search(mark), f"{mark!r} passes the registry but not cyhr-mark-1"


def test_every_demo_mark_passes_the_profile(snapshot: models.Snapshot) -> None:
    pattern = _profile_mark_pattern()
    marks = {c.mark for c in snapshot.catalogues} | {i.mark for c in snapshot.catalogues for i in c.items}
    assert marks and all(pattern.search(m) for m in marks), marks


@pytest.mark.parametrize("where", ["catalogue", "item"])
@pytest.mark.parametrize("mark", ["川渝互认", "HR"])
def test_a_source_with_a_mark_the_profile_refuses_is_refused(where: str, mark: str) -> None:
    data = read_source_data(DEMO_SOURCE)
    if where == "catalogue":
        data["catalogues"][0]["mark"] = mark
        path = "catalogues[0].mark"
    else:
        data["catalogues"][0]["items"][0]["mark"] = mark
        path = "catalogues[0].items[0].mark"
    with pytest.raises(RegistrySourceError) as info:
        parse_source(json.dumps(data), base_dir=Path(DEMO_SOURCE).parent, is_json=True)
    assert any(issue.location == path for issue in info.value.issues()), info.value.issues()
