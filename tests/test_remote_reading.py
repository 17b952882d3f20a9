"""基层检查 + 上级诊断 (远程影像, 远程心电): an exam performed at a township centre and read by the lead hospital.

The sample (tests/data/registry/bundle-remote-reading-qingxi.json) is a chest CT and an ECG performed at
重庆市涪陵区清溪镇中心卫生院（演示） (DiagnosticReport.performer) and read by 重庆市涪陵中心医院（演示）: the CT
through a ``resultsInterpreter`` PractitionerRole of its radiologist, the ECG through a ``resultsInterpreter``
Organization. The demo catalogue judges imaging and ECG by the reading institution: its membership, scope, EQA
and level count, and its signature on the Bundle.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.errors import IdentifierError
from gateway.naming import SYSTEM_USCC
from gateway.recognition.engine import Decision, decide_all
from gateway.recognition.facts import facts_from_bundle
from gateway.recognition.fhir import CS_NON_RECOGNITION_REASON, decision_parameters
from gateway.registry.models import Snapshot
from gateway.registry.source import RegistrySourceError, parse_source, read_source_data
from gateway.registry.snapshot import unsigned_snapshot

DATA = Path(__file__).resolve().parent / "data" / "registry"
CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 11, 20, 9, 0, tzinfo=CST)
QINGXI = "12500102MB00090052"  # township centre: performs
FULING = "12500102MB0002006J"  # lead hospital (三级): reads
TONGJIANG = "12511921MB0001003C"  # 二级, in Sichuan: receives


def snapshot_of(change: Any = None) -> Snapshot:
    data = read_source_data(DEMO_SOURCE)
    if change is not None:
        change(data)
    source = parse_source(json.dumps(data), base_dir=Path(DEMO_SOURCE).parent, is_json=True)
    return unsigned_snapshot(source, dt.datetime(2026, 11, 1, tzinfo=CST), dt.timedelta(days=60))


@pytest.fixture(scope="module")
def demo() -> Snapshot:
    return snapshot_of()


def sample(signer: str | None = FULING) -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads((DATA / "bundle-remote-reading-qingxi.json").read_text(encoding="utf-8"))
    # The ECG report names its reading institution only; DOMAIN C6 needs its 审核医师 too: named here by staff id.
    ecg = resource(bundle, "DiagnosticReport", 1)
    ecg["resultsInterpreter"] = [*ecg["resultsInterpreter"], {"identifier": {
        "system": "urn:oid:2.16.156.10011.1.4", "value": "DEMO-500102-E001"}, "display": "演示心电医师"}]
    if signer:
        # Bundle.signature.who as gateway.signing.jws.signer_reference writes it (the signature is checked on receipt)
        bundle["signature"] = {"who": {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": signer}}}
    return bundle


def decisions(bundle: dict[str, Any], snapshot: Snapshot, receiver: str = TONGJIANG) -> dict[str, Decision]:
    out = decide_all(facts_from_bundle(bundle), snapshot, receiver, AT)
    return {d.facts.text or "": d for d in out if d.facts.kind == "observation"}


def statuses(d: Decision) -> dict[str, str]:
    return {r.rule: r.status for r in d.rules}


def resource(bundle: dict[str, Any], resource_type: str, index: int = 0) -> dict[str, Any]:
    found = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]
    return found[index]


# -- facts ------------------------------------------------------------------------------------------------


def test_performer_and_reader_are_distinct_facts() -> None:
    facts = [f for f in facts_from_bundle(sample()) if f.kind == "observation"]
    assert [(f.text, f.issuer_uscc, f.interpreter_uscc, f.report_class, f.signer_uscc) for f in facts] == [
        ("胸部CT平扫", QINGXI, FULING, "imaging", FULING),  # resultsInterpreter PractitionerRole.organization
        ("常规十二导联心电图", QINGXI, FULING, "ecg", FULING),  # resultsInterpreter Organization
    ]


def test_a_reader_by_logical_reference_and_a_bad_reader_uscc() -> None:
    bundle = sample()
    report = resource(bundle, "DiagnosticReport", 1)
    report["resultsInterpreter"] = [
        {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": TONGJIANG}, "display": "通江"}
    ]
    assert [f.interpreter_uscc for f in facts_from_bundle(bundle) if f.kind == "observation"] == [FULING, TONGJIANG]
    resource(bundle, "Organization", 1)["identifier"][0]["value"] = "12500102MB0002006X"
    with pytest.raises(IdentifierError) as info:
        facts_from_bundle(bundle)
    assert info.value.location == "Bundle.entry[1].resource.identifier[0].value"


def test_the_physician_reading_is_not_taken_for_an_institution() -> None:
    bundle = sample()
    resource(bundle, "DiagnosticReport", 0)["resultsInterpreter"] = [
        {"identifier": {"system": "urn:oid:2.16.156.10011.1.4", "value": "DEMO-500102-R003"}}
    ]
    ct = facts_from_bundle(bundle)[0]
    assert ct.interpreter_uscc is None and ct.chief_physician == "DEMO-500102-R003"


# -- the rules use the reading institution ---------------------------------------------------------------


def test_read_and_signed_by_the_lead_hospital_is_recognised(demo: Snapshot) -> None:
    found = decisions(sample(), demo)
    for name, code in (("胸部CT平扫", "CY-I001"), ("常规十二导联心电图", "CY-E001")):
        d = found[name]
        assert d.outcome == "recognized", [r.to_dict() for r in d.rules if r.status != "passed"]
        assert d.item is not None and d.item.code == code and d.responsible == "interpreter"
        member = d.rule("member-active")
        assert member is not None
        assert member.facts["issuer"] == FULING and member.facts["performer"] == QINGXI
        assert member.facts["judged_by"] == "interpreter" and "performed by 12500102MB00090052" in member.message
        signature = d.rule("reading-signature")
        assert signature is not None and signature.status == "passed"
        assert signature.facts == {"performer": QINGXI, "interpreter": FULING, "signer": FULING,
                                   "item_class": d.item.item_class}
        eqa = d.rule("eqa-pass")
        assert eqa is not None and eqa.status == "passed" and eqa.facts["issuer"] == FULING
    assert found["胸部CT平扫"].to_dict()["result"]["interpreter"] == FULING


def test_signed_by_the_township_centre_is_not_recognised_with_the_reason(demo: Snapshot) -> None:
    found = decisions(sample(signer=QINGXI), demo)
    for d in found.values():
        assert d.outcome == "not-recognized"
        assert [r.rule for r in d.rules if r.status == "failed"] == ["reading-signature"]
        signature = d.rule("reading-signature")
        assert signature is not None
        assert signature.message.startswith(f"signed by {QINGXI}, but for a ")
        assert f"the signature of the reading institution {FULING} (the exam was performed by {QINGXI})" in (
            signature.message
        )
    params = decision_parameters(list(found.values()))
    first = next(p for p in params["parameter"] if p["name"] == "decision")
    rule = next(
        p for p in first["part"]
        if p["name"] == "rule" and p["part"][0]["valueCode"] == "reading-signature"
    )
    assert rule["part"][-1] == {
        "name": "reason",
        "valueCoding": {"system": CS_NON_RECOGNITION_REASON, "code": "not-signed-by-reader"},
    }
    assert {"name": "interpreter", "valueIdentifier": {"system": SYSTEM_USCC, "value": FULING}} in first["part"]


def test_an_unsigned_bundle_needs_review(demo: Snapshot) -> None:
    for d in decisions(sample(signer=None), demo).values():
        assert d.outcome == "needs-review"
        assert [r.rule for r in d.rules if r.status != "passed"] == ["reading-signature"]
        assert "not signed" in d.rules[-1].message


def test_the_reader_level_decides_the_direction(demo: Snapshot) -> None:
    """Read by 通江 (二级) and received by 涪陵中心医院 (三级): a lower-level reading, whoever performed it."""
    bundle = sample(signer=TONGJIANG)
    for report in (resource(bundle, "DiagnosticReport", 0), resource(bundle, "DiagnosticReport", 1)):
        report["resultsInterpreter"] = [
            {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": TONGJIANG}}
        ]
    ct = decisions(bundle, demo, receiver=FULING)["胸部CT平扫"]
    assert statuses(ct)["direction"] == "failed" and statuses(ct)["reading-signature"] == "passed"
    direction = ct.rule("direction")
    assert direction is not None and direction.facts["issuer_level"].startswith("二级")


def test_the_reader_eqa_counts(demo: Snapshot) -> None:
    """涪陵中心医院 has no ECG quality-control pass in this registry: the township's ECG read there is refused."""

    def no_ecg_eqa(data: dict[str, Any]) -> None:
        data["eqa"] = [e for e in data["eqa"] if e["item"].get("code") != "CY-E001"]

    ecg = decisions(sample(), snapshot_of(no_ecg_eqa))["常规十二导联心电图"]
    assert ecg.outcome == "not-recognized" and [r.rule for r in ecg.rules if r.status == "failed"] == ["eqa-pass"]
    eqa = ecg.rule("eqa-pass")
    assert eqa is not None and eqa.facts["issuer"] == FULING


def test_a_catalogue_judging_imaging_by_its_performer(demo: Snapshot) -> None:
    """With ``responsible: {imaging: performer}`` the township centre's own EQA and level count, and only its own
    signature would: the lead hospital's fails the signature rule; the ECG (still by its reader) is unaffected."""

    def by_performer(data: dict[str, Any]) -> None:
        data["catalogues"][0]["responsible"]["imaging"] = "performer"

    found = decisions(sample(), snapshot_of(by_performer))
    ct = found["胸部CT平扫"]
    signature = ct.rule("reading-signature")
    assert ct.responsible == "performer" and signature is not None and signature.status == "failed"
    assert signature.message.startswith(f"signed by {FULING}, not by {QINGXI} who performed it")
    assert statuses(ct)["eqa-pass"] == "failed" and ct.outcome == "not-recognized"
    eqa = ct.rule("eqa-pass")
    assert eqa is not None and eqa.facts["issuer"] == QINGXI
    assert found["常规十二导联心电图"].outcome == "recognized"


def test_an_item_can_override_its_class(demo: Snapshot) -> None:
    def ecg_by_performer(data: dict[str, Any]) -> None:
        item = next(it for it in data["catalogues"][0]["items"] if it["code"] == "CY-E001")
        item["responsible"] = "performer"

    snap = snapshot_of(ecg_by_performer)
    assert {i.code: i.responsible for i in snap.catalogues[0].items if i.code in ("CY-I001", "CY-E001", "CY-L001")} == {
        "CY-I001": "interpreter", "CY-E001": "performer", "CY-L001": "performer"
    }
    ecg = decisions(sample(), snap)["常规十二导联心电图"]
    signature = ecg.rule("reading-signature")
    assert signature is not None and signature.status == "failed" and ecg.outcome == "not-recognized"
    # signed by the performer itself, the item judged by its performer has no signature to question
    assert decisions(sample(signer=QINGXI), snap)["常规十二导联心电图"].rule("reading-signature") is None


def test_without_a_separate_reader_the_performer_is_judged(demo: Snapshot) -> None:
    """The township centre read its own CT: its missing EQA refuses it, and its own signature is the reader's."""
    bundle = sample(signer=QINGXI)
    resource(bundle, "DiagnosticReport", 0)["resultsInterpreter"] = [
        {"identifier": {"system": "urn:oid:2.16.156.10011.1.4", "value": "DEMO-QX-R001"}}
    ]
    ct = decisions(bundle, demo)["胸部CT平扫"]
    assert ct.rule("reading-signature") is None and "interpreter" not in ct.to_dict()["result"]
    eqa = ct.rule("eqa-pass")
    assert eqa is not None and eqa.status == "failed" and eqa.facts["issuer"] == QINGXI


def test_a_lab_result_read_elsewhere_is_still_judged_by_its_lab(demo: Snapshot) -> None:
    bundle = json.loads((DATA / "bundle-lab-imaging-fuling.json").read_text(encoding="utf-8"))
    bundle = copy.deepcopy(bundle)
    lab = resource(bundle, "DiagnosticReport", 0)
    lab["resultsInterpreter"] = [{"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": TONGJIANG}}]
    wbc = decide_all(facts_from_bundle(bundle), demo, TONGJIANG, AT)[0]
    assert wbc.facts.interpreter_uscc == TONGJIANG and wbc.responsible == "performer"
    member = wbc.rule("member-active")
    assert member is not None and member.facts["issuer"] == FULING and "judged_by" not in member.facts
    assert wbc.rule("reading-signature") is None


# -- registry ---------------------------------------------------------------------------------------------


def test_the_demo_registry_tells_the_story(demo: Snapshot) -> None:
    township = demo.member(QINGXI)
    assert township is not None and township.kind == "primary-care" and "（演示）" in township.name
    catalogue = demo.catalogue("chuanyu")
    assert catalogue is not None
    classes = {i.item_class: i.responsible for i in catalogue.items}
    assert classes == {"lab": "performer", "imaging": "interpreter", "ecg": "interpreter"}


@pytest.mark.parametrize(
    ("change", "location"),
    [
        (lambda d: d["catalogues"][0]["responsible"].__setitem__("imaging", "reader"), "catalogues[0].responsible"),
        (lambda d: d["catalogues"][0]["responsible"].__setitem__("ct", "interpreter"), "catalogues[0].responsible"),
        (lambda d: d["catalogues"][0]["items"][0].__setitem__("responsible", "hospital"), "catalogues[0].items[0]"),
    ],
)
def test_a_bad_responsible_is_refused_naming_the_field(change: Any, location: str) -> None:
    with pytest.raises(RegistrySourceError) as info:
        snapshot_of(change)
    assert any(issue.location.startswith(location) for issue in info.value.issues()), info.value.issues()


def test_a_snapshot_from_before_takes_the_class_default(demo: Snapshot) -> None:
    document = copy.deepcopy(demo.document)
    for catalogue in document["catalogues"]:
        for item in catalogue["items"]:
            item.pop("responsible", None)
    old = Snapshot.from_document(document)
    by_class = {i.item_class: i.responsible for c in old.catalogues for i in c.items}
    assert by_class["lab"] == "performer" and by_class["imaging"] == "interpreter" and by_class["ecg"] == "interpreter"


# -- adapters: the reading institution from HL7 v2 and CDA ------------------------------------------------

FULING_XON = f"重庆市涪陵中心医院（演示）^^^^^^^^^{FULING}"


def v2(*, obr32: str = "", prt: str | None = None, version: str = "2.7", control: str = "RR0001") -> bytes:
    """A 通江 ORU^R01 whose report was read elsewhere: OBR-32 with an NDL-7 facility, or a v2.7+ PRT."""
    obr = "OBR|1|O0001|R0001|LIVER^肝功能^L|||20261119073000|||||||||||||||20261119161000|||F"
    if obr32:
        obr += "|" * 7 + obr32
    segments = [
        f"MSH|^~\\&|LIS|TJXRMYY|GATEWAY|CYHR|20261119161245||ORU^R01^ORU_R01|{control}|P|{version}"
        "||||||UNICODE UTF-8",
        "PID|1||511921198001011237^^^^NNCHN||张^三||19800101|M",
        obr,
        *([prt] if prt else []),
        "OBX|1|NM|ALT^丙氨酸氨基转移酶^L||36|U/L|9-50|N|||F",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


def convert(pipeline: Any, data: bytes, fmt: str) -> Any:
    (outcome,) = list(pipeline.convert(data, fmt, "test"))
    return outcome


def reader_of(bundle: dict[str, Any]) -> list[str | None]:
    return [f.interpreter_uscc for f in facts_from_bundle(bundle) if f.kind == "observation"]


def test_hl7v2_obr_32_facility_names_the_reading_institution(pipeline: Any) -> None:
    outcome = convert(pipeline, v2(obr32=f"2033&陈&明^^^^^^FLZXYY&{FULING}&USCC"), "hl7v2")
    assert outcome.ack_code == "AA", outcome.issues
    dr = resource(outcome.bundle, "DiagnosticReport")
    person, institution = dr["resultsInterpreter"]
    assert person == {"identifier": {"system": "urn:oid:2.16.156.10011.1.4", "value": "2033"}, "display": "陈明"}
    assert institution["type"] == "Organization"
    assert (institution["identifier"]["system"], institution["identifier"]["value"]) == (SYSTEM_USCC, FULING)
    assert reader_of(outcome.bundle) == [FULING]
    # the interpreter alone, as before: no reading institution
    plain = convert(pipeline, v2(obr32="2033&陈&明", control="RR0002"), "hl7v2")
    assert reader_of(plain.bundle) == [None]
    assert len(resource(plain.bundle, "DiagnosticReport")["resultsInterpreter"]) == 1


def test_hl7v2_prt_8_names_the_reading_institution(pipeline: Any) -> None:
    prt = f"PRT||AD||PI^Primary Interpreter^HL70912|2033^陈^明|||{FULING_XON}"
    outcome = convert(pipeline, v2(prt=prt), "hl7v2")
    assert outcome.ack_code == "AA", outcome.issues
    assert reader_of(outcome.bundle) == [FULING]
    assert resource(outcome.bundle, "DiagnosticReport")["resultsInterpreter"][0]["display"] == "陈明"


def test_hl7v2_a_bad_reading_institution_is_refused_naming_the_field(pipeline: Any) -> None:
    outcome = convert(pipeline, v2(obr32=f"2033&陈&明^^^^^^FLZXYY&{FULING[:-1]}X&USCC"), "hl7v2")
    assert outcome.ack_code != "AA"
    assert any(i.location == "OBR[1]-32.7.2" and "reading institution" in i.message for i in outcome.issues)
    bad_prt = f"PRT||AD||PI^Primary Interpreter^HL70912|2033^陈^明|||涪陵^^^^^^^^^{FULING[:-1]}X"
    outcome = convert(pipeline, v2(prt=bad_prt, control="RR0003"), "hl7v2")
    assert any(i.location == "PRT[1]-8.10" for i in outcome.issues), outcome.issues


def _cda(represented: str) -> bytes:
    text = (DATA.parent / "cda" / "lab-report-full.xml").read_text(encoding="utf-8")
    marker = "      </assignedPerson>\n    </assignedEntity>\n  </legalAuthenticator>"
    assert text.count(marker) == 1
    organization = (
        "      </assignedPerson>\n"
        "      <representedOrganization classCode=\"ORG\" determinerCode=\"INSTANCE\">\n"
        f"        <id root=\"2.16.156.10011.1.5\" extension=\"{represented}\"/>\n"
        "        <name>重庆市涪陵中心医院（演示）</name>\n"
        "      </representedOrganization>\n"
        "    </assignedEntity>\n  </legalAuthenticator>"
    )
    return text.replace(marker, organization).encode("utf-8")


def test_cda_legal_authenticator_organization_names_the_reading_institution(pipeline: Any) -> None:
    outcome = convert(pipeline, _cda(FULING), "cda")
    assert outcome.bundle is not None, outcome.issues
    assert set(reader_of(outcome.bundle)) == {FULING}
    # the custodian itself as the 审核医师's organisation: the report was read where it was made
    same = convert(pipeline, _cda(TONGJIANG).replace(b"JY202411050123", b"JY202411050124"), "cda")
    assert same.bundle is not None, same.issues
    assert set(reader_of(same.bundle)) == {None}


def test_cda_a_bad_reading_institution_is_refused_naming_the_xpath(pipeline: Any) -> None:
    outcome = convert(pipeline, _cda(FULING[:-1] + "X"), "cda")
    problems = [i for i in outcome.issues if "reading institution" in i.message]
    assert problems and "legalAuthenticator" in problems[0].location and "representedOrganization" in (
        problems[0].location
    )


def test_a_member_cannot_sign_a_report_it_did_not_perform_by_naming_itself_the_reader(demo: Snapshot) -> None:
    """涪陵 signs a lab report 通江 performed and names itself as reader: the lab item is judged by its performer,
    so only 通江's signature counts, whatever the report claims; the same for a result outside every catalogue."""
    bundle = copy.deepcopy(json.loads((DATA / "bundle-lab-tongjiang.json").read_text(encoding="utf-8")))
    for r in bundle["entry"]:
        if r["resource"]["resourceType"] == "DiagnosticReport":
            r["resource"]["resultsInterpreter"] = [
                {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": FULING}}]
    bundle["signature"] = {"who": {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": FULING}}}
    # received by a third member: 通江 does not recognise its own results (互认 is between institutions)
    found = decide_all(facts_from_bundle(bundle), demo, "12510000MB00030095", AT)  # 四川省疾控中心
    results = [d for d in found if d.facts.kind != "conclusion"]
    assert results and all(d.outcome == "not-recognized" for d in results)
    for d in results:
        signature = d.rule("reading-signature")
        assert signature is not None and signature.status == "failed", d.to_dict()
