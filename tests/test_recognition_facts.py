"""Result facts from report Bundles: what is read, identifiers checked where they enter, bad input refused;
and the HL7 v2 golden Bundles (tests/data/expected/) read the same way as the hand-built ones."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import IdentifierError, InputError, ParseError
from gateway.naming import SYSTEM_ID_CARD
from gateway.recognition.engine import decide_all
from gateway.recognition.facts import HazardFactor, facts_from_bundle
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import load_source
from gateway.demo.registry import DEMO_SOURCE

DATA = Path(__file__).parent / "data"
CST = dt.timezone(dt.timedelta(hours=8))
TONGJIANG, FULING, CDC = "12511921MB0001003C", "12500102MB0002006J", "12510000MB00030095"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / "registry" / name).read_text(encoding="utf-8"))


def test_lab_bundle_facts() -> None:
    facts = facts_from_bundle(load("bundle-lab-tongjiang.json"))
    assert [f.kind for f in facts] == ["observation"] * 5
    wbc = facts[0]
    assert wbc.issuer_uscc == TONGJIANG
    assert wbc.patient == (SYSTEM_ID_CARD, "11010519491231002X")
    assert [c.code for c in wbc.codings] == ["WBC", "6690-2"]
    assert (wbc.collected, wbc.effective) == ("2026-11-20T08:30:00+08:00", "2026-11-20T08:30:00+08:00")
    assert (wbc.observation_status, wbc.report_status, wbc.report_class) == ("final", "final", "lab")
    assert wbc.report_id == "urn:oid:2.16.156.10011.1.33|TJ-20261120-0001"
    assert wbc.marks == ("川渝HR",) and wbc.superseded_by is None
    assert wbc.chief_physician == "DEMO-511921-S001" and wbc.hazard_factors == ()
    assert wbc.location == "Bundle.entry[4]" and wbc.bundle_id.startswith("urn:uuid:")
    assert facts[3].marks == ("四川HR", "协作体HR")
    assert facts[4].marks == () and facts[4].item_label() == "备注"


def test_imaging_and_conclusion_facts() -> None:
    facts = facts_from_bundle(load("bundle-lab-imaging-fuling.json"))
    assert [f.kind for f in facts] == ["observation", "observation", "observation", "conclusion"]
    ct = facts[2]
    assert ct.report_class == "imaging" and ct.collected is None
    assert (ct.effective, ct.report_effective) == ("2026-11-17T15:20:00+08:00", "2026-11-17T15:20:00+08:00")
    conclusion = facts[3]
    assert conclusion.issuer_uscc == FULING and conclusion.text == "双肺未见明显异常。"
    assert conclusion.location.endswith(".conclusion")


def test_occupational_facts() -> None:
    facts = facts_from_bundle(load("bundle-occupational-cdc.json"))
    xp = facts[0]
    assert xp.report_class == "occupational" and xp.exam_type == "periodic"
    assert xp.hazard_factors == (
        HazardFactor("DEMO-HF-SILICA", "矽尘", "dust"),
        HazardFactor("DEMO-HF-NOISE", "噪声", "physical"),
    )
    assert xp.report_effective == "2026-11-10" and xp.chief_physician == "DEMO-510000-D001"
    # The employer Organization is not mistaken for the issuer.
    assert all(f.issuer_uscc == CDC for f in facts)
    assert facts[-1].kind == "conclusion" and [c.code for c in facts[-1].codings] == ["no-abnormality"]


def _patient_ident(bundle: dict[str, Any]) -> dict[str, Any]:
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    return patient["identifier"][0]


@pytest.mark.parametrize(
    "value,expected", [("11010519491231002X", "11010519491231002X"), ("11010519491231002x", "11010519491231002X")]
)
def test_valid_id_card_vectors(value: str, expected: str) -> None:
    bundle = load("bundle-lab-tongjiang.json")
    _patient_ident(bundle)["value"] = value
    assert facts_from_bundle(bundle)[0].patient == (SYSTEM_ID_CARD, expected)


@pytest.mark.parametrize(
    "value,why",
    [
        ("110105194912310021", "check digit"),
        ("11010519491331002X", "birth date"),
        ("1101051949123100", "characters"),
        ("11010519491231002Y", "17 digits"),
    ],
)
def test_bad_id_card_refuses_the_bundle(value: str, why: str) -> None:
    bundle = load("bundle-lab-tongjiang.json")
    _patient_ident(bundle)["value"] = value
    with pytest.raises(IdentifierError) as info:
        facts_from_bundle(bundle)
    assert why in info.value.message
    assert info.value.location == "Bundle.entry[1].resource.identifier[0].value"


@pytest.mark.parametrize("uscc", ["12511921MB0001003D", "12511921MB0001003", "12511921MB0001003I"])
def test_bad_issuer_uscc_refuses_the_bundle(uscc: str) -> None:
    bundle = load("bundle-lab-tongjiang.json")
    bundle["entry"][0]["resource"]["identifier"][0]["value"] = uscc
    with pytest.raises(IdentifierError) as info:
        facts_from_bundle(bundle)
    assert info.value.location == "Bundle.entry[0].resource.identifier[0].value"


def test_patient_without_id_card_is_known_by_another_identifier() -> None:
    bundle = load("bundle-lab-tongjiang.json")
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["identifier"].pop(0)
    assert facts_from_bundle(bundle)[0].patient == (f"https://fhir.cyhr.org.cn/sid/mrn/{TONGJIANG}", "TJ000123")


@pytest.mark.parametrize(
    "body,error",
    [
        ({"resourceType": "Parameters"}, ParseError),
        ([], ParseError),
        ({"resourceType": "Bundle", "type": "collection", "entry": [{"fullUrl": "urn:uuid:x"}]}, ParseError),
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, InputError),
    ],
)
def test_bad_bundles(body: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        facts_from_bundle(body)


def test_relative_references_resolve_too() -> None:
    bundle = load("bundle-lab-tongjiang.json")
    text = json.dumps(bundle, ensure_ascii=False)
    for entry in bundle["entry"]:
        r = entry["resource"]
        text = text.replace(f'"urn:uuid:{r["id"]}"', f'"{r["resourceType"]}/{r["id"]}"')
    facts = facts_from_bundle(json.loads(text))
    assert facts[0].issuer_uscc == TONGJIANG and facts[0].report_status == "final"
    assert facts[0].collected == "2026-11-20T08:30:00+08:00"


# the HL7 v2 lab goldens (CDA and CSV goldens are covered by their own tests)
GOLDEN = sorted(p for p in (DATA / "expected").glob("*.json")
                if (DATA / "hl7v2" / f"{p.name.split('.')[0]}.hl7").exists())


@pytest.mark.skipif(not GOLDEN, reason="no golden Bundles in tests/data/expected yet")
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_hl7v2_bundles_are_read_like_the_hand_built_ones(path: Path) -> None:
    bundle = json.loads(path.read_text(encoding="utf-8"))
    facts = facts_from_bundle(bundle)
    observations = [f for f in facts if f.kind == "observation"]
    assert observations
    for f in observations:
        assert f.issuer_uscc in (TONGJIANG, FULING)
        assert f.patient is not None and f.patient[0] == SYSTEM_ID_CARD
        assert f.codings and f.codings[0].system.endswith(f"/local-item/{f.issuer_uscc}")
        assert f.collected or f.effective
        assert f.report_status and f.observation_status and f.report_class == "lab"
    snapshot = unsigned_snapshot(load_source(DEMO_SOURCE), dt.datetime(2024, 1, 1, tzinfo=CST), dt.timedelta(days=1500))
    receiver = FULING if observations[0].issuer_uscc == TONGJIANG else TONGJIANG
    decisions = decide_all(facts, snapshot, receiver, dt.datetime(2026, 11, 22, 10, tzinfo=CST))
    # Every rule could be evaluated from the Bundle except the mark, which the issuing side adds, and the report
    # status of a report whose message names no 审核医师 (DOMAIN C6: final and signed, 审核医师 present).
    for d in decisions:
        if d.item is not None:
            missing = {r.rule for r in d.rules if r.status == "not-evaluable"}
            allowed = {"mark"} if d.facts.reviewer_named else {"mark", "report-status"}
            assert missing <= allowed, (d.facts.item_label(), missing)
