"""备案 by factor and physicians who practise at several members (多点执业).

The occupational exam is the hand-built sample tests/data/registry/bundle-occupational-cdc.json (矽尘 and
噪声, exam 2026-11-10, 主检医师 DEMO-510000-D001 of the CDC); cases change its hazard factors, its
主检医师 or its issuer (as if 邻水县人民医院（演示） had made it) and the DEMO registry.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.recognition.engine import Decision, RuleResult, decide
from gateway.recognition.facts import facts_from_bundle
from gateway.registry.fhir import registry_resources
from gateway.registry.models import Snapshot
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import RegistrySourceError, parse_source, read_source_data

DATA = Path(__file__).parent / "data" / "registry"
IG = "https://fhir.cyhr.org.cn"
STAFF = "urn:oid:2.16.156.10011.1.4"
ID_CARD = "urn:oid:2.16.156.10011.1.3"
CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
CDC, FULING, LINSHUI = "12510000MB00030095", "12500102MB0002006J", "12511623MB0009005R"
SOURCE = read_source_data(DEMO_SOURCE)
BUNDLE = json.loads((DATA / "bundle-occupational-cdc.json").read_text(encoding="utf-8"))


def snapshot(mutate: Callable[[dict[str, Any]], None] | None = None) -> Snapshot:
    data = copy.deepcopy(SOURCE)
    if mutate:
        mutate(data)
    source = parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
    return unsigned_snapshot(source, dt.datetime(2025, 1, 1, tzinfo=CST), dt.timedelta(days=1000))


def problems(mutate: Callable[[dict[str, Any]], None]) -> dict[str, str]:
    with pytest.raises(RegistrySourceError) as info:
        snapshot(mutate)
    return {i.location: i.message for i in info.value.issues()}


def qual(data: dict[str, Any], qid: str) -> dict[str, Any]:
    return next(q for q in data["qualifications"] if q["id"] == qid)


def index_of(data: dict[str, Any], qid: str) -> int:
    return [q["id"] for q in data["qualifications"]].index(qid)


def physician(data: dict[str, Any], pid: str = "phy-bing") -> dict[str, Any]:
    return next(p for p in data["physicians"] if p["id"] == pid)


def factor(code: str, name: str, category: str) -> dict[str, Any]:
    coding = {"system": f"{IG}/CodeSystem/hazard-factor", "code": code, "display": name}
    return {
        "url": f"{IG}/StructureDefinition/hazard-factor",
        "extension": [
            {"url": "factor", "valueCoding": coding},
            {"url": "category", "valueCoding": {"system": f"{IG}/CodeSystem/exposure-category", "code": category}},
        ],
    }


def exam(
    *factors: dict[str, Any], issuer: str = CDC, interpreter: str | None = None, day: str | None = None,
    interpreter_system: str = STAFF,
) -> dict[str, Any]:
    """The sample exam with these factors, made by ``issuer`` (and read by ``interpreter``) on ``day``."""
    bundle = json.loads(json.dumps(BUNDLE).replace(CDC, issuer))
    if day:
        bundle = json.loads(json.dumps(bundle).replace('"2026-11-10"', f'"{day}"'))
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    if factors:
        report["extension"] = [e for e in report["extension"] if not e["url"].endswith("/hazard-factor")]
        report["extension"] += list(factors)
    if interpreter:
        report["resultsInterpreter"] = [{"identifier": {"system": interpreter_system, "value": interpreter}}]
    return bundle


def decision(bundle: dict[str, Any], snap: Snapshot, at: dt.datetime = AT) -> Decision:
    facts = facts_from_bundle(bundle)
    first = next(f for f in facts if f.kind == "observation")
    # a member does not recognise its own results (互认 is between institutions): another member receives
    return decide(first, snap, CDC if first.issuer_uscc == FULING else FULING, at)


def rule(bundle: dict[str, Any], snap: Snapshot, rid: str, at: dt.datetime = AT) -> RuleResult:
    found = decision(bundle, snap, at).rule(rid)
    assert found is not None
    return found


SILICA = factor("silica-dust", "矽尘", "dust")
BENZENE_BY_NUMBER = factor("chemical-028", "苯", "chemical")  # <class>-<seq>, the 目录's own numbering
TOLUENE = factor("toluene", "甲苯", "chemical")
XYLENE = factor("chemical-030", "二甲苯", "chemical")
TRICHLOROETHYLENE = factor("chemical-100", "第100号化学因素", "chemical")
SENDER_CODE = factor("DEMO-HF-CHEM-77", "某化学因素", "chemical")


# -- 备案 by factor ---------------------------------------------------------------------------------------


def fifty_six(data: dict[str, Any]) -> None:
    """邻水 filed 56 of the 375 化学因素 (the 目录's numbers 1-56) and 粉尘 as a whole class."""
    qual(data, "ls-filing")["factors"] = [f"chemical-{n:03d}" for n in range(1, 57)]


def test_a_county_hospital_that_filed_56_chemical_factors_is_not_filed_for_the_others() -> None:
    snap = snapshot(fifty_six)
    filed = rule(exam(XYLENE, issuer=LINSHUI), snap, "occupational-filing")
    assert filed.status == "passed", filed.message
    assert filed.facts["factors"][0]["covered_by"] == "factor" and filed.facts["factors"][0]["filing"] == "ls-filing"
    other = rule(exam(TRICHLOROETHYLENE, issuer=LINSHUI), snap, "occupational-filing")
    assert other.status == "failed"
    assert "56" in other.message and "第100号化学因素" in other.message and "备案" in other.message
    # One unfiled factor among filed ones is enough to fail.
    mixed = rule(exam(XYLENE, TRICHLOROETHYLENE, issuer=LINSHUI), snap, "occupational-filing")
    assert mixed.status == "failed"


def test_factor_codes_match_in_either_spelling() -> None:
    # The DEMO filing lists benzene by its code and 二甲苯 as chemical-030; results may say either.
    snap = snapshot()
    assert qual(snap.document, "ls-filing")["factors"][4] == "benzene"
    assert rule(exam(BENZENE_BY_NUMBER, issuer=LINSHUI), snap, "occupational-filing").status == "passed"
    assert rule(exam(XYLENE, issuer=LINSHUI), snap, "occupational-filing").status == "passed"
    assert rule(exam(TOLUENE, issuer=LINSHUI), snap, "occupational-filing").status == "passed"


def test_a_class_without_factors_listed_is_filed_as_a_whole() -> None:
    snap = snapshot(fifty_six)
    dust = rule(exam(SILICA, issuer=LINSHUI), snap, "occupational-filing")
    assert dust.status == "passed" and dust.facts["factors"][0]["covered_by"] == "class"
    # The CDC's filing lists no factors: every chemical factor is filed.
    cdc = rule(exam(TRICHLOROETHYLENE), snap, "occupational-filing")
    assert cdc.status == "passed" and cdc.facts["factors"][0]["covered_by"] == "class"
    # A class outside the scope is not filed, factors or not.
    noise = rule(exam(factor("noise", "噪声", "physical"), issuer=LINSHUI), snap, "occupational-filing")
    assert noise.status == "failed"


def test_a_code_outside_the_catalogue_cannot_be_checked_against_a_factor_list() -> None:
    snap = snapshot(fifty_six)
    unknown = rule(exam(SENDER_CODE, issuer=LINSHUI), snap, "occupational-filing")
    assert unknown.status == "not-evaluable" and "DEMO-HF-CHEM-77" not in unknown.message
    assert "某化学因素" in unknown.message
    assert decision(exam(SENDER_CODE, issuer=LINSHUI), snap).outcome in ("needs-review", "not-recognized")
    # Against a whole-class filing the same code is fine.
    assert rule(exam(SENDER_CODE), snap, "occupational-filing").status == "passed"


def test_filing_factors_are_checked_when_the_source_is_loaded() -> None:
    at = index_of(SOURCE, "ls-filing")
    found = problems(lambda d: qual(d, "ls-filing").update(factors=["benzene", "no-such-factor"]))
    assert "not a factor of 《职业病危害因素分类目录》" in found[f"qualifications[{at}].factors[1]"]
    found = problems(lambda d: qual(d, "ls-filing").update(factors=["benzene", "noise"]))
    assert "physical factor" in found[f"qualifications[{at}].factors[1]"]
    found = problems(lambda d: qual(d, "ls-filing").update(factors=["benzene", "chemical-028"]))
    assert "listed twice" in found[f"qualifications[{at}].factors[1]"]
    found = problems(lambda d: qual(d, "fl-grade").update(factors=["benzene"]))
    assert any(loc.startswith(f"qualifications[{index_of(SOURCE, 'fl-grade')}]") for loc in found)


def test_fhir_filing_lists_its_factors() -> None:
    resources = registry_resources(snapshot(), dt.date(2026, 11, 22))
    filing = next(r for r in resources["VerificationResult"] if r["id"] == "q-ls-filing")
    codes = [e["valueCodeableConcept"]["coding"][0]["code"] for e in filing["extension"]
             if e["url"].endswith("/qualification-scope") and "coding" in e["valueCodeableConcept"]]
    assert codes == ["lead", "mercury", "manganese", "carbon-monoxide", "benzene", "toluene", "chemical-030",
                     "n-hexane"]


# -- physicians at several members -----------------------------------------------------------------------


def test_a_registered_physician_is_qualified_by_their_own_qualification() -> None:
    snap = snapshot()
    at_cdc = rule(exam(SILICA, interpreter="DEMO-510000-D003"), snap, "occupational-physician")
    assert at_cdc.status == "passed", at_cdc.message
    assert at_cdc.facts["registered_physician"]["certificate"] == "DEMO-ZYBZD-2020-0031"
    assert at_cdc.facts["factors"][0]["qualification"] == "phy-bing-diagnosis"
    # The same physician at 邻水, under the staff id 邻水 writes: the same qualification counts.
    at_linshui = rule(exam(SILICA, issuer=LINSHUI, interpreter="DEMO-511623-D001"), snap, "occupational-physician")
    assert at_linshui.status == "passed", at_linshui.message
    assert at_linshui.facts["registration"]["member"] == LINSHUI


def test_the_registration_at_the_exam_member_must_cover_the_exam_date() -> None:
    snap = snapshot()
    # 邻水 registered the physician from 2025-01-01: an exam there in 2024 is not theirs to sign.
    early = rule(exam(SILICA, issuer=LINSHUI, interpreter="DEMO-511623-D001", day="2024-12-20"), snap,
                 "occupational-physician", at=dt.datetime(2024, 12, 28, tzinfo=CST))
    assert early.status == "failed" and "not registered to practise" in early.message and "2025-01-01" in early.message
    # Registration at the CDC ended the day before the exam.
    ended = snapshot(lambda d: physician(d)["practice"][0].update(valid_to="2026-11-09"))
    assert rule(exam(SILICA, interpreter="DEMO-510000-D003"), ended, "occupational-physician").status == "failed"
    # ... or on the exam day: still registered.
    last_day = snapshot(lambda d: physician(d)["practice"][0].update(valid_to="2026-11-10"))
    assert rule(exam(SILICA, interpreter="DEMO-510000-D003"), last_day, "occupational-physician").status == "passed"


def test_a_staff_id_of_another_member_names_nobody_here() -> None:
    # 邻水's report signed with the CDC's staff id: not a registration at 邻水, and no 邻水 qualification.
    found = rule(exam(SILICA, issuer=LINSHUI, interpreter="DEMO-510000-D003"), snapshot(), "occupational-physician")
    assert found.status == "failed" and "registered_physician" not in found.facts


def test_the_physicians_own_qualification_must_hold_on_the_exam_date_and_cover_the_factor() -> None:
    expired = snapshot(lambda d: qual(d, "phy-bing-diagnosis").update(valid_to="2026-11-09"))
    lapsed = rule(exam(SILICA, interpreter="DEMO-510000-D003"), expired, "occupational-physician")
    assert lapsed.status == "failed" and "holds no diagnosis qualification" in lapsed.message
    noise = rule(exam(factor("noise", "噪声", "physical"), interpreter="DEMO-510000-D003"), snapshot(),
                 "occupational-physician")
    assert noise.status == "failed"  # phy-bing holds 尘肺 and 化学中毒 only


def test_a_physician_named_by_身份证号_is_found_through_the_registry() -> None:
    snap = snapshot()
    by_card = exam(SILICA, issuer=LINSHUI, interpreter="511902198003154021", interpreter_system=ID_CARD)
    found = rule(by_card, snap, "occupational-physician")
    assert found.status == "passed" and found.facts["physician"] == "DEMO-511623-D001"
    stranger = exam(SILICA, interpreter="511921198001011237", interpreter_system=ID_CARD)
    missing = rule(stranger, snap, "occupational-physician")
    assert missing.status == "failed" and "not a physician listed" in missing.message
    elsewhere = rule(exam(SILICA, issuer=FULING, interpreter="511902198003154021", interpreter_system=ID_CARD),
                     snap, "occupational-physician")
    assert elsewhere.status == "failed" and "never here" in elsewhere.message


def test_per_member_physician_qualifications_of_older_sources_still_count() -> None:
    found = rule(exam(SILICA), snapshot(), "occupational-physician")  # DEMO-510000-D001: cdc-physician-1
    assert found.status == "passed" and found.facts["factors"][0]["qualification"] == "cdc-physician-1"


def test_physicians_are_checked_when_the_source_is_loaded() -> None:
    found = problems(lambda d: physician(d).update(id_card="511902198003154020"))
    assert "check digit" in found["physicians[0].id_card"]
    at = index_of(SOURCE, "phy-bing-diagnosis")
    found = problems(lambda d: qual(d, "phy-bing-diagnosis").update(physician={"ref": "phy-nobody"}))
    assert "not listed in physicians" in found[f"qualifications[{at}].physician.ref"]
    found = problems(lambda d: qual(d, "phy-bing-diagnosis").update(member=CDC))
    assert any(loc.startswith(f"qualifications[{at}]") for loc in found)
    stranger = {"member": "12330000470051726F", "staff_id": "X1", "valid_from": "2025-01-01"}
    found = problems(lambda d: physician(d)["practice"].append(stranger))
    assert "not a member" in found["physicians[0].practice[2].member"]

    def twin(d: dict[str, Any]) -> None:
        other = copy.deepcopy(physician(d))
        other.update(id="phy-ding", id_card="511902198507080027", certificate="DEMO-ZYBZD-2021-0007")
        d["physicians"].append(other)

    found = problems(twin)
    assert "already names physician 'phy-bing'" in found["physicians[1].practice[0].staff_id"]


def test_fhir_practitioner_and_roles() -> None:
    resources = registry_resources(snapshot(), dt.date(2026, 11, 22))
    [doctor] = resources["Practitioner"]
    assert doctor["id"] == "phy-phy-bing"
    # the open registry view names a physician by the qualification certificate, never by the 身份证号
    assert doctor["identifier"] == [{"type": {"text": "资格证书编号"}, "value": "DEMO-ZYBZD-2020-0031"}]
    assert "511902198003154021" not in json.dumps(resources, ensure_ascii=False)
    [held] = doctor["qualification"]
    assert held["period"] == {"start": "2020-09-01", "end": "2028-08-31"}
    roles = {r["organization"]["reference"]: r for r in resources["PractitionerRole"]}
    assert roles[f"Organization/{LINSHUI}"]["identifier"] == [{"system": STAFF, "value": "DEMO-511623-D001"}]
    assert roles[f"Organization/{LINSHUI}"]["period"] == {"start": "2025-01-01", "end": "2026-12-31"}
    assert roles[f"Organization/{LINSHUI}"]["active"] is True
    result = next(r for r in resources["VerificationResult"] if r["id"] == "q-phy-bing-diagnosis")
    assert result["target"] == [{"reference": "Practitioner/phy-phy-bing", "display": "演示诊断医师丙"}]
    # A physician's qualification is not the institution's: no Organization lists it.
    for org in resources["Organization"]:
        assert "DEMO-ZYBZD-2020-0031" not in json.dumps(org, ensure_ascii=False)


def test_a_physician_named_by_name_alone_is_said_so() -> None:
    """A CDC export's 主检医师 column gives a name, no number: the rule said "the report names no 主检医师"."""
    bundle = exam(SILICA)
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    report["resultsInterpreter"] = [{"display": "吴主检"}]
    found = rule(bundle, snapshot(), "occupational-physician")
    assert found.status == "not-evaluable" and "by name alone (吴主检)" in found.message, found.message
    del report["resultsInterpreter"]
    assert rule(bundle, snapshot(), "occupational-physician").message == "the report names no 主检医师"
