"""Hospital levels are dated: the hospital-grade qualifications say which level a member held when.

邻水县人民医院（演示） went from 二级甲等 to 三级乙等 on 2025-07-01 (DEMO registry). The direction rule and
``min_issuer_level`` read the issuer's level on the result date and the receiver's on the decision date; a
result whose issuer's level is not on record that day needs review.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.recognition.engine import decide, marks_for
from gateway.recognition.facts import ResultFacts
from gateway.registry.fhir import EXT_HOSPITAL_LEVEL, EXT_QUALIFICATION, organization
from gateway.registry.models import Coding, Snapshot, catalogue_system
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import RegistrySourceError, parse_source, read_source_data

CST = dt.timezone(dt.timedelta(hours=8))
LINSHUI, TONGJIANG, FULING = "12511623MB0009005R", "12511921MB0001003C", "12500102MB0002006J"
SOURCE = read_source_data(DEMO_SOURCE)
CT = Coding(catalogue_system("chuanyu"), "CY-I001")  # 胸部CT平扫: direction not-lower, min level 2
WBC = Coding(catalogue_system("chuanyu"), "CY-L001")  # 白细胞计数: any direction, min level 2


def snapshot(mutate: Callable[[dict[str, Any]], None] | None = None) -> Snapshot:
    data = copy.deepcopy(SOURCE)
    # 邻水 passed the imaging quality control of 2024-2026 (so only the level decides).
    for year in (2024, 2025, 2026):
        data["eqa"].append({"member": LINSHUI, "item": {"catalogue": "chuanyu", "code": "CY-I001"}, "year": year,
                            "provider": "四川省医学影像质量控制中心（演示）", "result": "pass"})
    if mutate:
        mutate(data)
    source = parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
    return unsigned_snapshot(source, dt.datetime(2024, 1, 1, tzinfo=CST), dt.timedelta(days=2000))


def qual(data: dict[str, Any], qid: str) -> dict[str, Any]:
    return next(q for q in data["qualifications"] if q["id"] == qid)


def ct(issuer: str, study: str, coding: Coding = CT) -> ResultFacts:
    return ResultFacts(
        kind="observation",
        entry="urn:uuid:5a1c0c52-8d2e-4a53-9a51-0e7d1c7e0001",
        location="Bundle.entry[3]",
        bundle_id="levels-test",
        issuer_uscc=issuer,
        codings=(coding,),
        text="胸部CT平扫",
        observation_status="final",
        report_entry="urn:uuid:5a1c0c52-8d2e-4a53-9a51-0e7d1c7e0002",
        report_id="LS-CT-0001",
        report_status="final",
        report_class="imaging",
        effective=study,
        collected=study,
        marks=("川渝HR",),
        reviewer_named=True,  # the report names its 审核医师 (DOMAIN C6)
    )


BASE = snapshot()


def test_levels_come_from_the_dated_hospital_grade_qualifications() -> None:
    levels = BASE.levels_of(LINSHUI)
    assert [(f.level, f.source) for f in levels] == [("二级甲等", "ls-grade-2"), ("三级乙等", "ls-grade-3")]
    on_last_day = BASE.level_on(LINSHUI, dt.date(2025, 6, 30))
    on_first_day = BASE.level_on(LINSHUI, dt.date(2025, 7, 1))
    assert on_last_day is not None and on_last_day.level == "二级甲等" and on_last_day.rank == 2
    assert on_first_day is not None and on_first_day.level == "三级乙等" and on_first_day.rank == 3
    assert BASE.level_on(LINSHUI, dt.date(2021, 6, 30)) is None  # before the first grading
    # The source drops an undated level that agrees with the qualifications: one source of the level.
    assert all("level" not in m for m in BASE.document["members"] if m["uscc"] in (LINSHUI, TONGJIANG))


def test_same_ct_is_decided_by_the_level_held_on_the_study_date() -> None:
    # 涪陵 (三级甲等) receives 邻水's chest CT, 5 days after the study: direction not-lower.
    before = decide(ct(LINSHUI, "2025-06-20T10:00:00+08:00"), BASE, FULING, dt.datetime(2025, 6, 25, 9, tzinfo=CST))
    after = decide(ct(LINSHUI, "2025-07-20T10:00:00+08:00"), BASE, FULING, dt.datetime(2025, 7, 25, 9, tzinfo=CST))
    rb, ra = before.rule("direction"), after.rule("direction")
    assert rb is not None and ra is not None
    assert rb.status == "failed" and rb.facts["issuer_level"] == "二级甲等"
    assert rb.facts["issuer_level_fact"]["source"] == "ls-grade-2"
    assert "二级甲等" in rb.message and "2025-06-20" in rb.message
    assert before.outcome == "not-recognized"
    assert ra.status == "passed" and ra.facts["issuer_level"] == "三级乙等"
    assert after.outcome == "recognized", [r.to_dict() for r in after.rules if r.status != "passed"]


def test_a_ct_made_while_二级_is_still_judged_as_二级_after_the_promotion() -> None:
    # Decided in 2025-08, after the promotion, about a study of 2025-06-28: the study date counts.
    late = decide(ct(LINSHUI, "2025-06-28T10:00:00+08:00"), BASE, FULING, dt.datetime(2025, 8, 1, 9, tzinfo=CST))
    rule = late.rule("direction")
    assert rule is not None and rule.status == "failed" and rule.facts["issuer_level"] == "二级甲等"


def test_the_receiver_level_is_the_one_held_on_the_decision_date() -> None:
    # 邻水 receives 通江's CT (二级甲等): fine while 邻水 is 二级, refused once it is 三级 (not-lower).
    snap = snapshot(lambda d: d["eqa"].append({"member": TONGJIANG, "item": {"catalogue": "chuanyu", "code": "CY-I001"},
                                               "year": 2025, "provider": "四川省医学影像质量控制中心（演示）",
                                               "result": "pass"}))
    facts = ct(TONGJIANG, "2025-06-10T10:00:00+08:00")
    while_二级 = decide(facts, snap, LINSHUI, dt.datetime(2025, 6, 30, 23, tzinfo=CST)).rule("direction")
    once_三级 = decide(facts, snap, LINSHUI, dt.datetime(2025, 7, 1, 8, tzinfo=CST)).rule("direction")
    assert while_二级 is not None and while_二级.status == "passed" and while_二级.facts["receiver_level"] == "二级甲等"
    assert once_三级 is not None and once_三级.status == "failed" and once_三级.facts["receiver_level"] == "三级乙等"


def test_a_gap_in_the_issuer_level_needs_review() -> None:
    # The 二级 grading ended a month before the 三级 one started: a CT in the gap has no level on record.
    snap = snapshot(lambda d: qual(d, "ls-grade-2").update(valid_to="2025-05-31"))
    decision = decide(ct(LINSHUI, "2025-06-15T10:00:00+08:00"), snap, FULING, dt.datetime(2025, 6, 20, tzinfo=CST))
    rule = decision.rule("direction")
    assert rule is not None and rule.status == "not-evaluable" and "2025-06-15" in rule.message
    assert decision.outcome == "needs-review"


def test_a_suspended_grade_ends_the_level_on_its_status_date() -> None:
    snap = snapshot(lambda d: qual(d, "ls-grade-3").update(status="suspended", status_date="2026-03-01"))
    held = snap.level_on(LINSHUI, dt.date(2026, 2, 28))
    assert held is not None and held.level == "三级乙等"
    assert snap.level_on(LINSHUI, dt.date(2026, 3, 1)) is None


def test_a_grade_revoked_without_a_date_was_never_held() -> None:
    """A revoked (or suspended) grade whose status_date is not given is taken as revoked from the start, as a
    member or certificate suspended without a date is: it gave the member its level on every day."""
    snap = snapshot(lambda d: qual(d, "ls-grade-3").update(status="revoked"))
    assert [f.source for f in snap.levels_of(LINSHUI)] == ["ls-grade-2"]
    assert snap.level_on(LINSHUI, dt.date(2026, 2, 28)) is None
    held = snap.level_on(LINSHUI, dt.date(2025, 6, 30))
    assert held is not None and held.level == "二级甲等"


def test_min_issuer_level_reads_the_level_on_the_result_date() -> None:
    # An item that needs a 三级 issuer: 邻水's result qualifies only once it is 三级.
    def needs_三级(d: dict[str, Any]) -> None:
        cat = next(c for c in d["catalogues"] if c["id"] == "chuanyu")
        next(it for it in cat["items"] if it["code"] == "CY-I001")["min_issuer_level"] = 3

    snap = snapshot(needs_三级)
    before = decide(ct(LINSHUI, "2025-06-20T10:00:00+08:00"), snap, FULING, dt.datetime(2025, 6, 21, tzinfo=CST))
    after = decide(ct(LINSHUI, "2025-07-02T10:00:00+08:00"), snap, FULING, dt.datetime(2025, 7, 3, tzinfo=CST))
    rb, ra = before.rule("direction"), after.rule("direction")
    assert rb is not None and rb.status == "failed" and "level 3 or above" in rb.message
    assert ra is not None and ra.status == "passed"
    assert marks_for(LINSHUI, CT, dt.date(2025, 6, 20), snap) == []
    assert [g.mark for g in marks_for(LINSHUI, CT, dt.date(2025, 7, 2), snap)] == ["川渝HR"]


def test_an_undated_level_is_still_read_from_an_older_source() -> None:
    def older(d: dict[str, Any]) -> None:
        d["qualifications"] = [q for q in d["qualifications"] if q["id"] not in ("ls-grade-2", "ls-grade-3")]
        next(m for m in d["members"] if m["uscc"] == LINSHUI)["level"] = "二级乙等"

    snap = snapshot(older)
    held = snap.level_on(LINSHUI, dt.date(2025, 8, 1))
    assert held is not None and held.level == "二级乙等" and held.source == "members[].level"
    assert snap.level_on(LINSHUI, dt.date(2022, 12, 31)) is None  # before the member's listing


def test_an_undated_level_that_disagrees_with_the_qualifications_is_refused() -> None:
    data = copy.deepcopy(SOURCE)
    next(m for m in data["members"] if m["uscc"] == LINSHUI)["level"] = "二级甲等"  # the old level, not the latest
    with pytest.raises(RegistrySourceError) as info:
        parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
    where = {i.location: i.message for i in info.value.issues()}
    location = f"members[{[m['uscc'] for m in data['members']].index(LINSHUI)}].level"
    assert "邻水县人民医院（演示）" in where[location] and "ls-grade-3" in where[location]
    assert "remove members[].level" in where[location]


def test_a_hospital_grade_needs_a_level_as_its_grade() -> None:
    for grade in (None, "甲"):
        data = copy.deepcopy(SOURCE)
        q = qual(data, "ls-grade-3")
        if grade is None:
            q.pop("grade")
        else:
            q["grade"] = grade
        with pytest.raises(RegistrySourceError) as info:
            parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
        index = data["qualifications"].index(q)
        assert any(i.location.startswith(f"qualifications[{index}]") for i in info.value.issues())


def test_fhir_organization_carries_the_level_of_the_day_and_the_dated_gradings() -> None:
    member = BASE.member(LINSHUI)
    assert member is not None
    before = organization(BASE, member, dt.date(2025, 6, 30))
    after = organization(BASE, member, dt.date(2025, 7, 1))

    def level(org: dict[str, Any]) -> list[str]:
        return [e["valueString"] for e in org["extension"] if e["url"] == EXT_HOSPITAL_LEVEL]

    assert level(before) == ["二级甲等"] and level(after) == ["三级乙等"]
    gradings = []
    for ext in after["extension"]:
        if ext["url"] != EXT_QUALIFICATION:
            continue
        parts = {p["url"]: p for p in ext["extension"]}
        code = parts["code"]["valueCodeableConcept"]
        if code["coding"][0]["code"] == "hospital-grade":
            gradings.append((code["text"], parts["period"]["valuePeriod"]))
    assert gradings == [
        ("二级甲等", {"start": "2021-07-01", "end": "2025-06-30"}),
        ("三级乙等", {"start": "2025-07-01", "end": "2029-06-30"}),
    ]
    # No level on record that day: no hospital-level extension (not today's level).
    assert level(organization(BASE, member, dt.date(2021, 1, 1))) == []
