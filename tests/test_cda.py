"""CDA channel: WS/T 500.7 检验报告 documents to report Bundles, corrections, hostile XML, located errors."""
from __future__ import annotations

import codecs
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from lxml import etree

from conftest import DATA, TONGJIANG, validate_fhir
from gateway import jsonutil
from gateway.adapters.base import RawUnit
from gateway.adapters.cda import CDAAdapter, declares_dtd, safe_parser
from gateway.config import load_settings
from gateway.fhir import profiles
from gateway.fhir.bundle import entries_of
from gateway.mapping.tables import load_mappings
from gateway.naming import SYSTEM_INSTITUTION
from gateway.pipeline import Pipeline, Status
from gateway.recognition.facts import facts_from_bundle

CDA = DATA / "cda"
FULL = (CDA / "lab-report-full.xml").read_bytes()
CORRECTED = (CDA / "lab-report-corrected.xml").read_bytes()
ID_CARD = "511921197506080022"
REPORT_NO = "JY202411050123"


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


def convert_one(pipeline: Pipeline, data: bytes):
    outcomes = list(pipeline.convert(data, "cda", "test.xml"))
    assert len(outcomes) == 1
    return outcomes[0]


def resources(bundle: dict, rtype: str) -> list[dict]:
    return entries_of(bundle, rtype)


def _record_target() -> bytes:
    text = FULL.decode("utf-8")
    return text[text.index("<recordTarget"):text.index("</recordTarget>") + len("</recordTarget>")].encode("utf-8")


def test_a_document_naming_two_patients_is_refused_naming_the_second(pipeline: Pipeline) -> None:
    """Results given to the first of two patients may be the other's: refused, naming where the second is (a
    document with two recordTargets was stored under the first, without a word)."""
    other = _record_target().replace(ID_CARD.encode(), b"11010519491231002X")
    two = FULL.replace(_record_target(), _record_target() + other, 1)
    out = convert_one(pipeline, two)
    assert out.status is Status.REFUSED
    [issue] = [i for i in out.issues if i.severity == "error"]
    assert issue.location == "/ClinicalDocument/recordTarget[2]/patientRole/patient"
    assert "one patient" in issue.message and "11010519491231002X" not in issue.message


def test_a_patient_with_two_different_id_card_numbers_is_refused(pipeline: Pipeline) -> None:
    card = f'<id root="2.16.156.10011.1.3" extension="{ID_CARD}"/>'.encode()
    again = FULL.replace(card, card + card.replace(ID_CARD.encode(), ID_CARD.encode().lower()), 1)
    assert convert_one(pipeline, again).status is Status.CONVERTED  # the same number twice: one patient
    wide = card.replace(ID_CARD.encode(), ID_CARD.translate(str.maketrans("0123456789", "０１２３４５６７８９")).encode())
    assert convert_one(pipeline, FULL.replace(card, card + wide, 1)).status is Status.CONVERTED  # (in full width)
    two = FULL.replace(card, card + card.replace(ID_CARD.encode(), b"11010519491231002X"), 1)
    out = convert_one(pipeline, two)
    assert out.status is Status.REFUSED
    [issue] = [i for i in out.issues if i.severity == "error"]
    assert issue.location == "/ClinicalDocument/recordTarget/patientRole/patient/id[2]/@extension"
    assert "2 different 身份证号" in issue.message and ID_CARD not in issue.message


def test_gbk_text_that_declares_no_encoding_is_refused_with_a_hint(pipeline: Pipeline) -> None:
    """Without a declaration XML is UTF-8: GBK bytes are then libxml2's "Invalid bytes in character encoding" alone."""
    text = re.sub(r"^<\?xml[^>]*\?>\s*", "", FULL.decode("utf-8"))
    out = convert_one(pipeline, text.encode("gbk"))
    assert out.status is Status.REFUSED
    assert "declare the encoding" in out.issues[0].message and "GB18030" in out.issues[0].message
    assert convert_one(pipeline, ('<?xml version="1.0" encoding="GBK"?>' + text).encode("gbk")).status \
        is Status.CONVERTED


# -- a complete report --------------------------------------------------------------------


def test_full_report_becomes_the_lab_report_bundle(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, FULL)
    assert out.status is Status.CONVERTED and out.ack_code == "AA"
    bundle = out.bundle
    assert profiles.validate(bundle) == []
    assert [r["resourceType"] for r in (e["resource"] for e in bundle["entry"])] == \
        ["Organization", "Patient", "Specimen"] + ["Observation"] * 6 + ["DiagnosticReport"]
    assert bundle["timestamp"] == "2024-11-05T16:30:05+08:00"

    org = resources(bundle, "Organization")[0]
    assert org["identifier"][0]["value"] == TONGJIANG and org["name"] == "通江县人民医院（演示）"
    patient = resources(bundle, "Patient")[0]
    assert patient["identifier"][0] == {
        "use": "official", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                "code": "NNCHN"}]},
        "system": "urn:oid:2.16.156.10011.1.3", "value": ID_CARD}
    assert patient["gender"] == "female" and patient["birthDate"] == "1975-06-08"  # GB/T 2261.1 code 2

    report = resources(bundle, "DiagnosticReport")[0]
    assert report["identifier"][0] == {"system": "urn:oid:2.16.156.10011.1.33", "value": REPORT_NO,
                                       "assigner": {"identifier": {"system": "https://fhir.cyhr.org.cn/sid/uscc",
                                                                   "value": TONGJIANG}}}
    assert report["identifier"][1] == {"system": "urn:oid:2.16.156.10011.1.1", "value": "TJRMYY-JY-20241105-000123"}
    assert report["status"] == "final" and report["code"]["text"] == "生化检验"
    assert report["issued"] == "2024-11-05T16:00:00+08:00"  # author time = 检验报告日期
    assert report["effectiveDateTime"] == "2024-11-05T08:30:00+08:00"  # specimen collection
    assert report["resultsInterpreter"] == [{"identifier": {"system": "urn:oid:2.16.156.10011.1.4", "value": "S0031"},
                                             "display": "钱审核"}]
    specimen = resources(bundle, "Specimen")[0]
    assert specimen["identifier"] == [{"system": "urn:oid:2.16.156.10011.1.14", "value": "BB2411050123"}]
    assert specimen["type"]["coding"][0]["code"] == "SER" and specimen["type"]["text"] == "血清"
    assert specimen["collection"] == {"collectedDateTime": "2024-11-05T08:30:00+08:00"}
    assert specimen["receivedTime"] == "2024-11-05T09:05:00+08:00"


def test_items_keep_the_issuers_code_value_unit_and_flags(pipeline: Pipeline) -> None:
    bundle = convert_one(pipeline, FULL).bundle
    obs = {o["code"]["coding"][0]["code"]: o for o in resources(bundle, "Observation")}
    glu = obs["GLU"]
    assert glu["code"]["coding"][0] == {"system": f"https://fhir.cyhr.org.cn/sid/local-item/{TONGJIANG}",
                                        "code": "GLU", "display": "葡萄糖"}
    assert glu["code"]["coding"][1]["code"] == "14749-6"  # mapped through lab-items like HL7 v2
    assert glu["valueQuantity"] == {"value": Decimal("8.20"), "unit": "mmol/L",
                                    "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    assert '"value":8.20' in jsonutil.dumps(glu)  # the precision measured is kept
    assert [i["coding"][0]["code"] for i in glu["interpretation"]] == ["A", "H"]  # 检验结果代码 异常 + interpretationCode
    assert glu["referenceRange"][0]["text"] == "3.9-6.1"
    assert obs["CREA"]["valueQuantity"]["code"] == "umol/L" and obs["CREA"]["valueQuantity"]["unit"] == "μmol/L"
    assert obs["K"]["valueQuantity"]["value"] == Decimal("4.12")  # PQ value and unit
    assert obs["K"]["referenceRange"][0]["text"] == "3.5-5.3"  # IVL_PQ range
    assert obs["HBSAG"]["valueString"] == "阴性(-)" and len(obs["HBSAG"]["code"]["coding"]) == 1
    assert obs["ALT"]["note"] == [{"text": "标本状态：合格"}]
    assert all(o["effectiveDateTime"] == "2024-11-05T08:30:00+08:00" for o in obs.values())


def test_diagnosis_stays_apart_from_the_results(pipeline: Pipeline) -> None:
    bundle = convert_one(pipeline, FULL).bundle
    report = resources(bundle, "DiagnosticReport")[0]
    assert report["conclusion"] == "空腹血糖升高，余项未见异常。备注：空腹采血"  # (the 检验报告备注 after the result)
    assert report["conclusionCode"] == [{"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.11.3", "code": "E11.900",
                                                     "display": "2型糖尿病"}], "text": "2型糖尿病"}]
    text = jsonutil.dumps(resources(bundle, "Observation"))
    assert "E11.900" not in text and "2型糖尿病" not in text
    facts = facts_from_bundle(bundle)
    assert [f.kind for f in facts].count("conclusion") == 1
    assert {f.text for f in facts if f.kind == "observation"} >= {"葡萄糖", "丙氨酸氨基转移酶"}


def test_bundle_passes_the_independent_validators(pipeline: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(jsonutil.dumps(convert_one(pipeline, CORRECTED).bundle), encoding="utf-8")
    result = validate_fhir([path])
    assert result.returncode == 0, result.stdout + result.stderr


# -- corrections ----------------------------------------------------------------------------


def test_a_correction_is_stored_beside_the_report_it_replaces(stored_pipeline: Pipeline) -> None:
    first = stored_pipeline.ingest(FULL, "cda", channel="file")[0]
    second = stored_pipeline.ingest(CORRECTED, "cda", channel="file")[0]
    assert first.status is Status.STORED and second.status is Status.STORED
    # Both versions are stored (which one a search shows as current is the store's business).
    original = stored_pipeline.store.read("DiagnosticReport", entries_of(first.bundle, "DiagnosticReport")[0]["id"])
    corrected = stored_pipeline.store.read("DiagnosticReport", entries_of(second.bundle, "DiagnosticReport")[0]["id"])
    assert (original["status"], corrected["status"]) == ("final", "corrected")
    assert original["id"] != corrected["id"]
    assert REPORT_NO in [i["value"] for i in original["identifier"]] and \
        REPORT_NO in [i["value"] for i in corrected["identifier"]]
    # The correction names the report it corrects by its 检验报告单号 and issuer (not by the document id).
    assert corrected["extension"] == [{"url": "https://fhir.cyhr.org.cn/StructureDefinition/replaces",
                                       "valueIdentifier": {"system": "urn:oid:2.16.156.10011.1.33",
                                                           "value": REPORT_NO, "assigner": {"identifier": {
                                                               "system": "https://fhir.cyhr.org.cn/sid/uscc",
                                                               "value": TONGJIANG}}}}]
    assert {"system": "urn:oid:2.16.156.10011.1.1", "value": "TJRMYY-JY-20241105-000123"} in original["identifier"]
    # The earlier values are still there, untouched; the corrected ones are new resources.
    old_glu = [stored_pipeline.store.read(*ref["reference"].split("/")) for ref in original["result"]]
    new_glu = [stored_pipeline.store.read(*ref["reference"].split("/")) for ref in corrected["result"]]
    assert {str(o["valueQuantity"]["value"]) for o in old_glu if o["code"]["coding"][0]["code"] == "GLU"} == {"8.20"}
    assert {str(o["valueQuantity"]["value"]) for o in new_glu if o["code"]["coding"][0]["code"] == "GLU"} == {"6.80"}
    assert {o["status"] for o in new_glu} == {"corrected"} and {o["status"] for o in old_glu} == {"final"}
    assert not set(r["reference"] for r in original["result"]) & set(r["reference"] for r in corrected["result"])


def test_rplc_without_a_parent_id_and_addenda_are_refused(pipeline: Pipeline) -> None:
    parent = b'<id root="2.16.156.10011.1.1" extension="TJRMYY-JY-20241105-000123"/>\n      <setId'
    no_parent = CORRECTED.replace(parent, b'<id root="2.16.156.10011.1.1"/>\n      <setId')
    out = convert_one(pipeline, no_parent)
    assert out.status is Status.REFUSED
    assert [(i.location, i.code) for i in out.errors] == [
        ("/ClinicalDocument/relatedDocument/parentDocument/id/@extension", "required")]
    addendum = CORRECTED.replace(b'typeCode="RPLC"', b'typeCode="APND"')
    out = convert_one(pipeline, addendum)
    assert out.ack_code == "AR" and out.errors[0].location == "/ClinicalDocument/relatedDocument/@typeCode"
    assert "APND" in out.errors[0].message


# -- hostile documents ----------------------------------------------------------------------


class LoopbackTrap:
    """A TCP listener on loopback that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def trap():
    t = LoopbackTrap()
    yield t
    t.close()


def xxe_document(system_id: str) -> bytes:
    return FULL.replace(b"<ClinicalDocument ", (
        f'<!DOCTYPE ClinicalDocument [\n  <!ENTITY xxe SYSTEM "{system_id}">\n]>\n<ClinicalDocument ').encode(), 1
    ).replace("<name>李演示</name>".encode(), b"<name>&xxe;</name>")


def test_xxe_pointing_at_a_local_file_leaks_nothing_and_stores_nothing(app, client, stored_pipeline: Pipeline,
                                                                       tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-7f3a9c", encoding="utf-8")
    doc = xxe_document(secret.as_uri())
    out = convert_one(stored_pipeline, doc)
    assert out.status is Status.REFUSED and out.ack_code == "AR" and out.bundle is None
    assert [(i.code, i.location) for i in out.issues] == [("security", "/")]
    resp = client.post("/ingest/cda", data=doc, content_type="application/xml")
    assert resp.status_code == 400 and resp.mimetype == "application/fhir+json"
    assert "TOP-SECRET" not in resp.get_data(as_text=True)
    assert "DTD" in resp.get_json()["issue"][0]["diagnostics"]
    rows = list(stored_pipeline.store.db.query("SELECT status, issues, ack FROM messages"))
    assert [r["status"] for r in rows] == ["refused"]
    assert "TOP-SECRET" not in rows[0]["issues"] and b"TOP-SECRET" not in rows[0]["ack"]
    assert stored_pipeline.store.db.execute("SELECT count(*) FROM resources").fetchone()[0] == 0
    # The sample file (an entity on /etc/passwd) is refused the same way, without reading it.
    sample = convert_one(stored_pipeline, (CDA / "xxe-local-file.xml").read_bytes())
    assert sample.ack_code == "AR" and "root:" not in json.dumps([i.message for i in sample.issues])


def test_external_entities_and_dtds_are_never_fetched(pipeline: Pipeline, trap: LoopbackTrap) -> None:
    url = f"http://127.0.0.1:{trap.port}/evil"
    external_dtd = f'<!DOCTYPE ClinicalDocument SYSTEM "{url}.dtd">\n<ClinicalDocument '.encode()
    for doc in (xxe_document(url + ".txt"), FULL.replace(b"<ClinicalDocument ", external_dtd, 1)):
        out = convert_one(pipeline, doc)
        assert out.ack_code == "AR" and out.issues[0].code == "security"
    time.sleep(0.2)  # give a (wrongly) started fetch time to arrive
    assert trap.connections == 0


def test_the_parser_itself_resolves_nothing(tmp_path: Path, trap: LoopbackTrap) -> None:
    """Second line of defence: even a document that got past the DTD check expands and fetches nothing."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-7f3a9c", encoding="utf-8")
    for system_id in (secret.as_uri(), f"http://127.0.0.1:{trap.port}/x"):
        doc = (f'<!DOCTYPE r [<!ENTITY xxe SYSTEM "{system_id}">]><r>&xxe;</r>').encode()
        root = etree.fromstring(doc, safe_parser())
        assert "TOP-SECRET" not in etree.tostring(root, encoding="unicode")
    laughs = (CDA / "billion-laughs.xml").read_bytes()
    started = time.monotonic()
    try:
        root = etree.fromstring(laughs, safe_parser())
    except etree.XMLSyntaxError as exc:  # libxml2's amplification guard may refuse it outright: also fine
        assert "amplification" in str(exc)
    else:
        assert len(etree.tostring(root)) < 10_000  # not expanded
    assert time.monotonic() - started < 1.0
    time.sleep(0.2)
    assert trap.connections == 0


def test_billion_laughs_is_refused_unread(pipeline: Pipeline) -> None:
    started = time.monotonic()
    out = convert_one(pipeline, (CDA / "billion-laughs.xml").read_bytes())
    assert time.monotonic() - started < 1.0
    assert out.ack_code == "AR" and out.issues[0].code == "security" and out.bundle is None


def test_dtd_detection_covers_utf16() -> None:
    assert declares_dtd('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x []><x/>'.encode("utf-16-le"))
    assert declares_dtd('<!DOCTYPE x []><x/>'.encode("utf-16-be"))
    assert not declares_dtd(FULL)


def test_size_limit_and_unreadable_documents(tmp_path: Path, clock, database: str) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": TONGJIANG,
                                                    "issuer_name": "x", "max_message_bytes": 2000,
                                                    "database": database})
    small = Pipeline(settings, clock=clock)
    out = convert_one(small, FULL)
    assert out.ack_code == "AR" and out.issues[0].code == "too-long"
    assert "2000" in out.issues[0].message
    broken = convert_one(small, b"<ClinicalDocument xmlns='urn:hl7-org:v3'><id></ClinicalDocument>")
    assert broken.ack_code == "AR" and broken.issues[0].code == "structure" and "line 1" in broken.issues[0].message
    not_cda = convert_one(small, b"<Bundle xmlns='http://hl7.org/fhir'/>")
    assert not_cda.ack_code == "AR" and "expected a CDA ClinicalDocument" in not_cda.issues[0].message


# -- located errors -----------------------------------------------------------------------


def test_wrong_document_type_is_named(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, (CDA / "wrong-template.xml").read_bytes())
    assert out.ack_code == "AR" and out.label == "文档流水号 TJRMYY-JC-20241105-000019"
    issue = out.errors[0]
    assert issue.location == "/ClinicalDocument/templateId" and "检查报告 (C0006)" in issue.message
    code_mismatch = FULL.replace(b'code="C0007"', b'code="C0006"')
    assert convert_one(pipeline, code_mismatch).errors[0].location == "/ClinicalDocument/code/@code"


def test_bad_values_are_located_by_xpath(stored_pipeline: Pipeline) -> None:
    out = convert_one(stored_pipeline, (CDA / "bad-values.xml").read_bytes())
    assert out.status is Status.REFUSED and out.ack_code == "AE"
    located = {i.location: i.message for i in out.errors}
    assert located == {
        "/ClinicalDocument/recordTarget/patientRole/id[@root='2.16.156.10011.1.33']/@extension":
            "检验报告单号 (patientRole/id @root 2.16.156.10011.1.33) is missing",
        "/ClinicalDocument/recordTarget/patientRole/patient/id/@extension": "身份证号 check digit is '3', expected '2'",
        "/ClinicalDocument/component/structuredBody/component[2]/section/entry[5]/organizer/component[4]/observation"
        "/value/@value": "'8.2O' is not a number for 检验定量结果 (REAL)",
        "/ClinicalDocument/component/structuredBody/component[2]/section/entry[6]/organizer/component[1]/observation"
        "/entryRelationship/observation/effectiveTime/low/@value": "'20241135083000' is not a calendar date",
    }
    assert "511921197506080023" not in json.dumps([i.message for i in out.issues], ensure_ascii=False)
    # Every location is an XPath into the document: no HL7 field numbers reach a CDA sender.
    assert all(i.location.startswith("/ClinicalDocument") for i in out.issues)


@pytest.mark.parametrize("cut, location, words", [
    (b"<legalAuthenticator>", "/ClinicalDocument/legalAuthenticator/assignedEntity", "审核医师"),
    (b"<custodian ", "/ClinicalDocument/custodian/assignedCustodian/representedCustodianOrganization"
                     "/id[@root='2.16.156.10011.1.5']/@extension", "保管机构标识"),
])
def test_missing_header_parts_are_located(pipeline: Pipeline, cut: bytes, location: str, words: str) -> None:
    start = FULL.index(cut)
    tag = cut.strip(b"<> ").decode()
    end = FULL.index(f"</{tag}>".encode(), start) + len(tag) + 3
    out = convert_one(pipeline, FULL[:start] + FULL[end:])
    assert out.status is Status.REFUSED
    assert any(i.location == location and words in i.message for i in out.errors), out.issues


def test_mapping_warnings_name_the_xpath_of_the_fact(pipeline: Pipeline) -> None:
    doc = FULL.replace(b'<value xsi:type="ST">U/L</value>', b'<value xsi:type="ST">IU/dL</value>', 1)
    out = convert_one(pipeline, doc)
    assert out.status is Status.CONVERTED
    unit = [i for i in out.issues if "IU/dL" in i.message][0]
    assert unit.severity == "warning" and unit.location.endswith(
        "entry[3]/organizer/component[4]/observation/entryRelationship/observation/value")


# -- the issuer -----------------------------------------------------------------------------


def test_custodian_named_by_organisation_code_is_this_member(pipeline: Pipeline) -> None:
    org_code = TONGJIANG[8:17]  # the 组织机构代码 inside the 统一社会信用代码
    doc = FULL.replace(f'extension="{TONGJIANG}"/>\n        <name>通江县人民医院（演示）</name>\n      </represented'.encode(),
                       f'extension="{org_code}"/>\n        <name>通江县人民医院（演示）</name>\n      </represented'.encode())
    out = convert_one(pipeline, doc)
    assert out.status is Status.CONVERTED
    assert [i.severity for i in out.issues].count("information") == 1
    org = resources(out.bundle, "Organization")[0]
    assert org["identifier"][0]["value"] == TONGJIANG
    assert {"system": SYSTEM_INSTITUTION, "value": org_code} in org["identifier"]
    assert profiles.validate(out.bundle) == []


def test_unknown_or_bad_custodians_are_refused(pipeline: Pipeline) -> None:
    marker = f'extension="{TONGJIANG}"/>\n        <name>通江县人民医院（演示）</name>\n      </represented'
    for replacement, words in (("12511921MB0001003X", "check character"), ("H51192100", "cannot be identified")):
        doc = FULL.replace(marker.encode(), marker.replace(TONGJIANG, replacement).encode())
        out = convert_one(pipeline, doc)
        assert out.status is Status.REFUSED and words in out.errors[0].message
        assert out.errors[0].location.startswith("/ClinicalDocument/custodian/")


def test_another_members_document_is_issued_by_that_member(tmp_path: Path, clock) -> None:
    """At that member's own gateway (another member's gateway refuses it: it would sign it as its own)."""
    fuling = "12500102MB0002006J"
    doc = FULL.replace(TONGJIANG.encode(), fuling.encode())
    at_fuling = Pipeline(load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": fuling,
                                                              "issuer_name": "x"}), clock=clock)
    try:
        bundle = convert_one(at_fuling, doc).bundle
    finally:
        at_fuling.close()
    assert resources(bundle, "Organization")[0]["identifier"][0]["value"] == fuling
    codes = [o["code"]["coding"][0]["system"] for o in resources(bundle, "Observation")]
    assert set(codes) == {f"https://fhir.cyhr.org.cn/sid/local-item/{fuling}"}


# -- layout variants ------------------------------------------------------------------------


def flat_document(items: int) -> bytes:
    """The lab section written like the bare template: entries without an organizer per item."""
    start = FULL.index(b"<entry>\n            <organizer")
    end = FULL.index(b"</section>", start)
    section = FULL[start:end]
    organizers = section.split(b"<entry>\n            <organizer")[1:items + 1]
    flat = b"".join(b"<entry>" + o.split(b"<statusCode/>", 1)[1].replace(b"</organizer>", b"")
                    .replace(b"<component>", b"").replace(b"</component>", b"") for o in organizers)
    return FULL[:start] + flat + FULL[end:]


def test_a_section_without_organizers_holds_one_item_per_item_code(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, flat_document(1))
    assert out.status is Status.CONVERTED
    [obs] = resources(out.bundle, "Observation")
    assert obs["code"]["coding"][0]["code"] == "ALT" and obs["valueQuantity"]["value"] == 28
    out = convert_one(pipeline, flat_document(2))
    assert out.status is Status.CONVERTED, out.issues
    alt, ast = resources(out.bundle, "Observation")
    assert (alt["code"]["coding"][0]["code"], alt["valueQuantity"]["value"]) == ("ALT", 28)
    assert (ast["code"]["coding"][0]["code"], ast["valueQuantity"]["value"]) == ("AST", 31)


def test_adapter_never_raises_on_garbage() -> None:
    structure = load_mappings(load_settings(environ={}).mappings_dir).structure("cda-wst500-7-lab-report")
    adapter = CDAAdapter(structure, member_uscc=TONGJIANG)
    for data in (b"", b"\x00\xff\xfe", b"<", b"<?xml version='1.0' encoding='nope'?><a/>", FULL[:500]):
        msg = adapter.read(RawUnit(data, 1))
        assert msg.errors
        assert adapter.identify(RawUnit(data, 1)) == ("", "")


# -- HTTP and search ------------------------------------------------------------------------


def test_post_ingest_cda_answers_with_an_operation_outcome_and_the_report_is_searchable(client) -> None:
    resp = client.post("/ingest/cda", data=FULL, content_type="application/xml")
    assert resp.status_code == 200 and resp.mimetype == "application/fhir+json"
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["diagnostics"].startswith("文档流水号 TJRMYY-JY-20241105-000123: stored (Bundle/")
    found = client.get("/fhir/DiagnosticReport", query_string={
        "patient.identifier": f"urn:oid:2.16.156.10011.1.3|{ID_CARD}"}).get_json()
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["identifier"][0]["value"] == REPORT_NO
    again = client.post("/ingest/cda", data=FULL, content_type="application/xml")
    assert again.status_code == 200 and "duplicate" in again.get_json()["issue"][0]["diagnostics"]
    bad = client.post("/ingest/cda", data=(CDA / "bad-values.xml").read_bytes(), content_type="application/xml")
    assert bad.status_code == 422
    exprs = {e for i in bad.get_json()["issue"] for e in i.get("expression", [])}
    assert "/ClinicalDocument/recordTarget/patientRole/patient/id/@extension" in exprs


def test_cli_convert_cda_prints_the_bundle_and_located_errors(runner) -> None:
    from gateway.cli import cli

    files = [str(CDA / "lab-report-full.xml"), str(CDA / "bad-values.xml")]
    result = runner.invoke(cli, ["--issuer-uscc", TONGJIANG, "convert", "--format", "cda", *files])
    assert result.exit_code == 1
    assert [json.loads(line)["resourceType"] for line in result.stdout.splitlines()] == ["Bundle"]
    assert (f"{files[1]}: 文档流水号 TJRMYY-JY-20241107-000077: /ClinicalDocument/recordTarget/patientRole/patient/id"
            "/@extension: 身份证号 check digit is '3', expected '2'") in result.stderr.splitlines()


def test_a_gb2312_document_is_read_by_its_declaration(pipeline: Pipeline) -> None:
    text = FULL.decode("utf-8").replace('encoding="UTF-8"', 'encoding="GB2312"')
    out = convert_one(pipeline, text.encode("gb2312"))
    assert out.status is Status.CONVERTED
    assert resources(out.bundle, "Patient")[0]["name"] == [{"text": "李演示"}]
    assert resources(out.bundle, "Organization")[0]["name"] == "通江县人民医院（演示）"


def _in_utf32(text: str, bom: bool) -> bytes:
    return (codecs.BOM_UTF32_LE if bom else b"") + text.encode("utf-32-le")


@pytest.mark.parametrize("make, fragment", [
    (lambda doc: _in_utf32(doc.replace('encoding="UTF-8"', 'encoding="UTF-32"'), True), "UTF-32"),
    (lambda doc: _in_utf32(doc.replace('encoding="UTF-8"', 'encoding="UTF-32"'), False), "UTF-32"),
    (lambda doc: doc.replace('encoding="UTF-8"', 'encoding="UTF-32"').encode("utf-32-be"), "UTF-32"),
    (lambda doc: doc.replace('encoding="UTF-8"', 'encoding="UTF-7"').replace("<!DOCTYPE", "+ADw-!DOCTYPE").encode(),
     "'utf-7'"),
    (lambda doc: doc.encode("cp500", "replace"), "does not begin with '<'"),  # EBCDIC
    (lambda doc: doc.replace('encoding="UTF-8"', 'encoding="UTF-16"').encode(), "'utf-16'"),
])
def test_a_document_in_an_encoding_the_dtd_check_cannot_read_is_refused_unread(
        pipeline: Pipeline, tmp_path: Path, make: Callable[[str], bytes], fragment: str) -> None:
    """UTF-32, UTF-7, EBCDIC: their markup is other bytes than ASCII's, so a DTD in them would reach libxml2, which
    opens what an external subset names (a local file, a FIFO that blocks the request) before any check after
    parsing. Only UTF-8, UTF-16 and the GB family are read."""
    secret = tmp_path / "secret.dtd"
    secret.write_text('<!ENTITY x "TOP-SECRET-7f3a9c">', encoding="utf-8")
    dtd = f'<!DOCTYPE ClinicalDocument SYSTEM "{secret.as_uri()}">\n'
    text = FULL.decode("utf-8").replace("<ClinicalDocument ", dtd + "<ClinicalDocument ", 1)
    out = convert_one(pipeline, make(text))
    assert out.ack_code == "AR" and [i.code for i in out.issues] == ["security"]
    assert fragment in out.issues[0].message and "refused unread" in out.issues[0].message
    wrapped = (DATA / "cda" / "v3-soap-b64-utf32-dtd.xml").read_bytes()  # the same inside a SOAP base64 payload
    inner = convert_one(pipeline, wrapped)
    assert inner.ack_code == "AR" and "UTF-32" in inner.issues[0].message


def test_documents_in_the_gb_family_and_utf16_are_still_read(pipeline: Pipeline) -> None:
    for declared, codec in (("GB18030", "gb18030"), ("GBK", "gbk"), ("gb2312", "gb18030"), ("UTF-16", "utf-16")):
        doc = FULL.decode("utf-8").replace('encoding="UTF-8"', f'encoding="{declared}"')
        if codec == "gb18030" and declared == "gb2312":
            doc = doc.replace("镕", "")
        out = convert_one(pipeline, doc.encode(codec))
        assert out.bundle is not None, (declared, [i.line() for i in out.issues])


def test_every_results_section_every_conclusion_and_the_remark_are_read(pipeline: Pipeline) -> None:
    """A document that splits its 检验项目 over two 实验室检查 sections, and writes two 检验报告结果 and a 检验报告备注:
    nothing of it is dropped (the second section's results were, without a word)."""
    text = FULL.decode("utf-8")
    at = text.index("<entry>", text.index("30954-2"))
    items = [m.start() for m in re.finditer(r"<entry>\s*<organizer", text)]
    assert len(items) >= 4, "the full sample has an organizer per item"
    split = items[2]  # the first two items in one section, the rest in a second one
    section_head = text[text.rfind("<component>", 0, at):at]
    two = text[:split] + "</section></component>" + section_head + text[split:]
    two = two.replace("<value xsi:type=\"ST\">空腹采血</value>",
                      "<value xsi:type=\"ST\">空腹采血</value></observation></entry><entry><observation classCode=\"OBS\" "
                      "moodCode=\"EVN\"><code code=\"DE04.50.130.00\" codeSystem=\"2.16.156.10011.2.2.1\"/>"
                      "<value xsi:type=\"ST\">建议复查肾功能</value>", 1)
    one = convert_one(pipeline, FULL).bundle
    out = convert_one(pipeline, two.encode("utf-8"))
    assert out.bundle is not None, [i.line() for i in out.issues]
    codes = [o["code"]["coding"][0]["code"] for o in resources(out.bundle, "Observation")]
    assert codes == [o["code"]["coding"][0]["code"] for o in resources(one, "Observation")]
    report = resources(out.bundle, "DiagnosticReport")[0]
    assert report["conclusion"] == "空腹血糖升高，余项未见异常；建议复查肾功能。备注：空腹采血"


def test_a_reference_range_in_another_unit_or_upside_down_is_kept_as_text(pipeline: Pipeline) -> None:
    """Bounds in mg/dL beside a result in mmol/L were given the result's unit (70-110 mmol/L); a range written
    high before low (6.1-3.9) became a FHIR Range with low above high (rng-2). Both stay text; the second is
    warned of where it was read."""
    text = FULL.decode("utf-8")
    glucose = text.index("GLU")
    at = text.index("<referenceRange>", glucose)
    end = text.index("</referenceRange>", at) + len("</referenceRange>")
    other_unit = ('<referenceRange><observationRange><value xsi:type="IVL_PQ"><low value="70" unit="mg/dL"/>'
                  '<high value="110" unit="mg/dL"/></value></observationRange></referenceRange>')
    upside_down = "<referenceRange><observationRange><text>6.1-3.9</text></observationRange></referenceRange>"
    for replaced, want, warned in ((other_unit, "70-110 mg/dL", False), (upside_down, "6.1-3.9", True)):
        out = convert_one(pipeline, (text[:at] + replaced + text[end:]).encode("utf-8"))
        assert out.bundle is not None
        ranges = [o["referenceRange"] for o in resources(out.bundle, "Observation")
                  if any(r.get("text") == want for r in o.get("referenceRange", []))]
        assert ranges == [[{"text": want}]]  # no low or high
        warnings = [i for i in out.issues if "low above its high" in i.message]
        assert bool(warnings) is warned
        if warned:
            assert warnings[0].location.endswith("/referenceRange/observationRange")


@pytest.mark.parametrize("flavor, reason", [("MSK", "masked"), ("NA", "not-applicable"), ("ASKU", "asked-unknown"),
                                            ("NAV", "temp-unknown"), ("UNK", "unknown"), ("NI", "unknown")])
def test_a_result_without_a_value_keeps_why_its_null_flavor_says(
        pipeline: Pipeline, flavor: str, reason: str) -> None:
    """A 检验定量结果 masked, not applicable or asked but unknown was recorded as 'unknown' alike."""
    doc = FULL.replace(b'<value xsi:type="PQ" value="4.12" unit="mmol/L"/>',
                       f'<value xsi:type="PQ" nullFlavor="{flavor}"/>'.encode(), 1)
    assert doc != FULL
    out = convert_one(pipeline, doc)
    assert out.bundle is not None
    absent = [o["dataAbsentReason"]["coding"][0]["code"] for o in resources(out.bundle, "Observation")
              if "dataAbsentReason" in o]
    assert absent == [reason]


def test_a_real_written_as_element_text_is_read_and_warned_of(pipeline: Pipeline) -> None:
    doc = FULL.replace(b'<value xsi:type="PQ" value="4.12" unit="mmol/L"/>',
                       b'<value xsi:type="PQ" unit="mmol/L">4.12</value>', 1)
    out = convert_one(pipeline, doc)
    assert out.bundle is not None
    assert [o["valueQuantity"]["value"] for o in resources(out.bundle, "Observation")
            if o.get("valueQuantity", {}).get("value") == Decimal("4.12")] == [Decimal("4.12")]
    assert any("written as the element's text" in i.message for i in out.issues)


@pytest.mark.parametrize("declared", ["GB2312", "gb2312", "GBK", "CP936", "EUC-CN"])
def test_a_document_labelled_gb2312_whose_text_is_gbk_is_read(pipeline: Pipeline, declared: str) -> None:
    """HIS systems write encoding="GB2312" over GBK text (browsers read that label so): a name with a character
    GB 2312 lacks (喆, 堃, 珺, 镕: common in names) refused the whole document as not well-formed, at line 1.
    The GB family is read as GB 18030, which encodes each of their characters with the same bytes."""
    text = FULL.decode("utf-8").replace('encoding="UTF-8"', f'encoding="{declared}"').replace("李演示", "李喆堃")
    data = text.encode("gbk")
    with pytest.raises(UnicodeEncodeError):
        "喆".encode("gb2312")  # (the bytes are GBK's, not GB 2312's)
    out = convert_one(pipeline, data)
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    assert resources(out.bundle, "Patient")[0]["name"] == [{"text": "李喆堃"}]


@pytest.mark.parametrize("declared", ["ISO-8859-1", "windows-1252", "latin1"])
def test_a_document_labelled_latin_whose_text_is_utf8_is_refused_naming_the_label(
        pipeline: Pipeline, declared: str) -> None:
    """Read as declared, 李演示 became Latin letters and C1 control characters, stored and signed as the patient's
    name; refused instead, saying what to declare."""
    data = FULL.decode("utf-8").replace('encoding="UTF-8"', f'encoding="{declared}"').encode("utf-8")
    out = convert_one(pipeline, data)
    assert out.bundle is None and out.ack_code == "AR"
    assert [i.code for i in out.errors] == ["structure"]
    assert declared.lower() in out.errors[0].message and 'encoding="UTF-8"' in out.errors[0].message
    with_bom = b"\xef\xbb\xbf" + data  # (a byte order mark: libxml2 reads UTF-8 whatever the declaration says)
    assert not any("declares the encoding" in i.message for i in convert_one(pipeline, with_bom).issues)
    ascii_only = FULL.decode("utf-8").replace('encoding="UTF-8"', f'encoding="{declared}"')
    ascii_only = "".join(c if ord(c) < 128 else "x" for c in ascii_only).encode("ascii")
    assert not any("declares the encoding" in i.message for i in convert_one(pipeline, ascii_only).issues)


def _observation_values(pipeline: Pipeline, data: bytes) -> list[tuple[object, ...]]:
    outcome = convert_one(pipeline, data)
    assert outcome.bundle is not None, outcome.issues
    return [(r.get("code", {}).get("text"), r.get("valueQuantity"), r.get("valueCodeableConcept"),
             r.get("valueString"), r.get("dataAbsentReason")) for r in
            (e["resource"] for e in outcome.bundle["entry"]) if r["resourceType"] == "Observation"]


@pytest.mark.parametrize("how", ["types left out", "xsi bound to another namespace"])
def test_a_value_whose_type_is_not_found_keeps_its_unit(pipeline: Pipeline, how: str) -> None:
    """<value value="4.12" unit="mmol/L"/> with no xsi:type (or the xsi prefix bound to the XML Schema namespace, so
    that no type is found) was stored as 4.12 with no unit, and accepted without a word: read as its type would
    have said."""
    original = FULL
    changed = (re.sub(rb' xsi:type="[^"]*"', b"", original) if how == "types left out" else
               original.replace(b'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"',
                                b'xmlns:xsi="http://www.w3.org/2001/XMLSchema"'))
    assert changed != original
    before = _observation_values(pipeline, original)
    assert any(q and q.get("unit") == "mmol/L" for _, q, *_ in before)
    assert _observation_values(pipeline, changed) == before


def test_a_coded_value_whose_type_is_not_found_is_read_as_the_code_with_a_warning(pipeline: Pipeline) -> None:
    """<value code="NEG" displayName="阴性" .../> with no xsi:type: a negative result was stored as "unknown"."""
    pq = b'<value xsi:type="PQ" value="4.12" unit="mmol/L"/>'
    cd = '<value xsi:type="CD" code="NEG" displayName="阴性" codeSystem="2.16.156.10011.2.3.2.38"/>'.encode()
    typed, untyped = FULL.replace(pq, cd), FULL.replace(pq, cd.replace(b' xsi:type="CD"', b""))
    assert typed != FULL
    assert _observation_values(pipeline, untyped) == _observation_values(pipeline, typed)
    assert any(v[2] == {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.2.38", "code": "NEG", "display": "阴性"}],
                        "text": "阴性"}
               for v in _observation_values(pipeline, untyped))
    warned = [i for i in convert_one(pipeline, untyped).issues
              if i.severity == "warning" and "no xsi:type" in i.message]
    assert len(warned) == 1 and warned[0].location.endswith("/observation/value")
