"""Recognition defects an outside domain tester reproduced (/tmp/tester-domain/w1.py–w8.py), each against DOMAIN.md.

The cases are the tester's, rebuilt on the hand-built samples in tests/data/registry/. One file is theirs:
tests/data/registry/bundle-technical-service-yuan.json is a copy of /tmp/tester-domain/ts.json (a 放射卫生防护检测报告 of
渝安, service from 2026-10-28, report date 2026-11-05), made by the domain tester's scripts.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

from gateway.demo.registry import DEMO_SOURCE
from test_registry_physicians import snapshot  # (the demo registry, changed as a test needs)
from gateway.recognition.engine import RULES, Decision, decide, decide_all
from gateway.recognition.facts import facts_from_bundle
from gateway.recognition.fhir import NON_RECOGNITION_REASONS, decision_parameters
from gateway.recognition.marks import EXT_MARK, MarkStamper
from gateway.registry.models import Snapshot
from gateway.registry.source import parse_source, read_source_data

DATA = Path(__file__).parent / "data" / "registry"
CST = dt.timezone(dt.timedelta(hours=8))
UTC = dt.timezone.utc
TONGJIANG, FULING, CDC = "12511921MB0001003C", "12500102MB0002006J", "12510000MB00030095"
QINGXI, YUAN = "12500102MB00090052", "91500105MA5U0A1B2R"
SOURCE = read_source_data(DEMO_SOURCE)


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


BASE = snapshot()


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def wbc(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == "WBC")


def decided(bundle: dict[str, Any], receiver: str, at: dt.datetime, snap: Snapshot = BASE,
            text: str = "白细胞计数") -> Decision:
    return next(d for d in decide_all(facts_from_bundle(bundle), snap, receiver, at) if d.facts.text == text)


def statuses(d: Decision) -> dict[str, str]:
    return {r.rule: r.status for r in d.rules}


def qualification(data: dict[str, Any], qid: str) -> dict[str, Any]:
    return next(q for q in data["qualifications"] if q["id"] == qid)


# -- 1. a result without a value (w2.py; an empty OBX-5 stored with dataAbsentReason) ---------------------------


def no_value(bundle: dict[str, Any], code: str = "unknown") -> dict[str, Any]:
    o = wbc(bundle)
    o.pop("valueQuantity")
    o["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                         "code": code}]}
    return bundle


def test_a_result_without_a_value_is_not_recognised_and_says_so() -> None:
    d = decided(no_value(load("bundle-lab-tongjiang.json")), FULING, dt.datetime(2026, 11, 22, 10, tzinfo=CST))
    assert d.outcome == "not-recognized" and d.item is None  # no catalogue item: out of 互认率 and savings
    assert [(r.rule, r.status) for r in d.rules] == [("result-value", "failed")]
    assert "no value (dataAbsentReason unknown)" in d.rules[0].message and "result-value" in RULES
    params = decision_parameters([d])
    rule = next(p for p in params["parameter"][-1]["part"] if p["name"] == "rule")
    assert rule["part"][-1]["valueCoding"]["code"] == NON_RECOGNITION_REASONS["result-value"] == "no-result-value"


def test_a_result_without_a_value_gets_no_mark() -> None:
    bundle = no_value(load("bundle-lab-tongjiang.json"), "error")
    for o in resources(bundle, "Observation"):
        o.pop("extension", None)
    MarkStamper(TONGJIANG, lambda: BASE).stamp(bundle)
    assert "extension" not in wbc(bundle)
    plt = next(o for o in resources(bundle, "Observation") if o["code"]["coding"][0]["code"] == "PLT")
    assert {"url": EXT_MARK, "valueString": "川渝HR"} in plt["extension"]  # a result with a value still is


# -- 2. codes naming two different catalogue items (w3.py) -----------------------------------------------------


def cholesterol_loinc(bundle: dict[str, Any]) -> dict[str, Any]:
    wbc(bundle)["code"]["coding"][1] = {"system": "http://loinc.org", "code": "14647-2",
                                        "display": "Cholesterol [Moles/volume] in Serum or Plasma"}
    return bundle


def test_codes_naming_different_items_need_review_naming_both() -> None:
    # On 2026-11-29 the WBC window (7 days) is over and the cholesterol one (30 days) is not: the old engine took
    # the cholesterol item, the most favourable, and recognised a white cell count as cholesterol.
    d = decided(cholesterol_loinc(load("bundle-lab-tongjiang.json")), FULING, dt.datetime(2026, 11, 29, 10, tzinfo=CST))
    assert d.outcome == "needs-review" and d.item is None
    item = d.rule("catalogue-item")
    assert item is not None and item.status == "not-evaluable"
    assert "CY-L001 白细胞计数" in item.message and "CY-L011 总胆固醇" in item.message
    assert {a["code"] for a in d.alternatives} == {"CY-L001", "CY-L011"}


def test_codes_naming_different_items_get_no_mark() -> None:
    bundle = cholesterol_loinc(load("bundle-lab-tongjiang.json"))
    wbc(bundle).pop("extension", None)
    MarkStamper(TONGJIANG, lambda: BASE).stamp(bundle)
    assert "extension" not in wbc(bundle)


def test_codes_for_the_same_item_in_several_catalogues_still_agree() -> None:
    d = decided(load("bundle-lab-tongjiang.json"), FULING, dt.datetime(2026, 11, 22, 10, tzinfo=CST))
    assert d.outcome == "recognized" and d.item is not None and d.item.code == "CY-L001"


# -- 3. the window by calendar day in China time, whatever the precision (w1.py) -------------------------------


def collected(value: str) -> dict[str, Any]:
    bundle = load("bundle-lab-tongjiang.json")
    for s in resources(bundle, "Specimen"):
        s["collection"]["collectedDateTime"] = value
    for o in resources(bundle, "Observation"):
        o["effectiveDateTime"] = value
    return bundle


def window(collection: str, at: dt.datetime) -> tuple[str, str]:
    rule = decided(collected(collection), FULING, at).rule("validity-window")
    assert rule is not None
    return rule.status, rule.message


def test_the_window_is_one_rule_by_calendar_day_whatever_the_precision() -> None:
    for collection in ("2026-11-20T08:30:00+08:00", "2026-11-20", "2026-11-20T00:30:00Z"):
        for at, expected in ((dt.datetime(2026, 11, 27, 10, tzinfo=CST), "passed"),
                             (dt.datetime(2026, 11, 27, 23, 59, tzinfo=CST), "passed"),
                             (dt.datetime(2026, 11, 27, 15, 59, tzinfo=UTC), "passed"),
                             (dt.datetime(2026, 11, 28, 0, 1, tzinfo=CST), "failed"),
                             (dt.datetime(2026, 11, 27, 16, 1, tzinfo=UTC), "failed")):
            status, message = window(collection, at)
            assert status == expected, (collection, at, message)
            assert "valid through 2026-11-27" in message and "+00:00" not in message, message


# -- 8. a receiver's own results are no recognition (w7.py) ---------------------------------------------------


def test_a_receiver_does_not_recognise_its_own_results() -> None:
    found = decide_all(facts_from_bundle(load("bundle-lab-tongjiang.json")), BASE, TONGJIANG,
                       dt.datetime(2026, 11, 22, 10, tzinfo=CST))
    results = [d for d in found if d.facts.kind == "observation"]
    assert results and all(d.outcome == "not-recognized" and d.item is None for d in results)
    assert all([(r.rule, r.status) for r in d.rules] == [("between-institutions", "failed")] for d in results)
    assert NON_RECOGNITION_REASONS["between-institutions"] == "own-result"
    # another member decides the same results as before
    assert decided(load("bundle-lab-tongjiang.json"), FULING, dt.datetime(2026, 11, 22, 10, tzinfo=CST)).outcome \
        == "recognized"


# -- 5. a lab or imaging report names its 审核医师 (DOMAIN C6) ----------------------------------------------------


def test_a_report_without_a_reviewing_physician_is_not_recognised() -> None:
    bundle = load("bundle-lab-tongjiang.json")
    for report in resources(bundle, "DiagnosticReport"):
        report.pop("resultsInterpreter", None)
    d = decided(bundle, FULING, dt.datetime(2026, 11, 22, 10, tzinfo=CST))
    status = d.rule("report-status")
    assert d.outcome == "needs-review" and status is not None and status.status == "not-evaluable"
    assert "审核医师" in status.message


def test_an_institution_alone_is_no_reviewing_physician() -> None:
    bundle = load("bundle-lab-tongjiang.json")
    for report in resources(bundle, "DiagnosticReport"):
        report["resultsInterpreter"] = [{"type": "Organization", "identifier": {
            "system": "https://fhir.cyhr.org.cn/sid/uscc", "value": TONGJIANG}}]
    assert decided(bundle, FULING, dt.datetime(2026, 11, 22, 10, tzinfo=CST)).outcome == "needs-review"


# -- 6. 基层检查、上级诊断: the performing institution must be a member too (w8.py) ----------------------------------


def test_a_remote_reading_performed_by_a_suspended_member_is_not_recognised() -> None:
    def suspend(data: dict[str, Any]) -> None:
        member = next(m for m in data["members"] if m["uscc"] == QINGXI)
        member.update(status="suspended", status_date="2026-01-01")

    bundle = load("bundle-remote-reading-qingxi.json")
    bundle["signature"] = {"who": {"type": "Organization", "identifier": {
        "system": "https://fhir.cyhr.org.cn/sid/uscc", "value": FULING}}}
    d = decided(bundle, TONGJIANG, dt.datetime(2026, 11, 22, 10, tzinfo=CST), snapshot(suspend), text="胸部CT平扫")
    member = d.rule("member-active")
    assert member is not None and member.status == "failed" and d.outcome == "not-recognized"
    assert "not an active member on 2026-11-16" in member.message and QINGXI in member.message
    assert member.facts["performer_membership"]["status"] == "failed"


# -- 4. 未定级 is a recorded level below 一级 (w4.py) -----------------------------------------------------------


def test_an_ungraded_issuer_fails_the_direction_rule_like_a_lower_one() -> None:
    for grade in ("未定级", "一级甲等"):
        snap = snapshot(lambda data, g=grade: qualification(data, "tj-grade").update(grade=g))
        d = decided(load("bundle-lab-tongjiang.json"), FULING, dt.datetime(2026, 11, 22, 10, tzinfo=CST), snap)
        direction = d.rule("direction")
        assert direction is not None and direction.status == "failed", (grade, direction)
        assert d.outcome == "not-recognized"


# -- 7. a technical-service qualification covers the service period (w5.py) -----------------------------------


def service(valid_from: str, valid_to: str) -> Decision:
    snap = snapshot(lambda data: qualification(data, "ya-rhs").update(valid_from=valid_from, valid_to=valid_to))
    facts = next(f for f in facts_from_bundle(load("bundle-technical-service-yuan.json")) if f.kind == "document")
    return decide(facts, snap, TONGJIANG, dt.datetime(2026, 11, 22, 10, tzinfo=CST))


def test_a_service_qualification_must_cover_the_service_period() -> None:
    later = service("2026-11-01", "2028-02-29")  # the work began 2026-10-28, before the qualification
    rule = later.rule("technical-service-qualification")
    assert rule is not None and rule.status == "failed" and later.outcome == "not-recognized"
    assert "2026-10-28" in rule.message and "service period" in rule.message
    covered = service("2024-03-01", "2028-02-29")
    assert covered.outcome == "recognized", [r.to_dict() for r in covered.rules if r.status != "passed"]


def test_a_provincial_jia_ji_qualification_is_a_warning_not_a_refusal() -> None:
    data = copy.deepcopy(SOURCE)
    qualification(data, "ya-rhs").update(grade="甲")
    source = parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
    assert [w.location for w in source.warnings] == [
        f"qualifications[{data['qualifications'].index(qualification(data, 'ya-rhs'))}].authority"]
    assert "national health commission" in source.warnings[0].message
    assert parse_source(json.dumps(SOURCE, ensure_ascii=False), is_json=True).warnings == ()
