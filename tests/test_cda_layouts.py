"""CDA channel: the three layouts of the 实验室检查 section, ambiguity refusals, 申请单编号 and author, RPLC by
检验报告单号, and HL7 v3 互联互通 messages (POLB_IN224000UV01, bare or in SOAP) answered with MCCI_IN000002UV01."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from lxml import etree

from conftest import DATA, TONGJIANG, validate_fhir
from gateway import jsonutil
from gateway.fhir import profiles
from gateway.fhir.bundle import entries_of
from gateway.pipeline import Pipeline, Status

CDA = DATA / "cda"
NESTED = (CDA / "lab-report-nested.xml").read_bytes()
SIBLING = (CDA / "lab-report-sibling.xml").read_bytes()
MIXED = (CDA / "lab-report-mixed.xml").read_bytes()
FULL = (CDA / "lab-report-full.xml").read_bytes()
CORRECTED = (CDA / "lab-report-corrected.xml").read_bytes()
V3_BARE = (CDA / "v3-polb-bare.xml").read_bytes()
V3_SOAP12 = (CDA / "v3-polb-soap-base64.xml").read_bytes()
V3_SOAP11 = (CDA / "v3-hip-soap11-cdata.xml").read_bytes()
FULING = "12500102MB0002006J"
V3 = {"v3": "urn:hl7-org:v3"}
LAB = "/ClinicalDocument/component/structuredBody/component[2]/section"


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


@pytest.fixture
def at_fuling(tmp_path: Path, clock):
    """The gateway of 涪陵中心医院, the custodian of the mixed-layout sample (another member's gateway refuses it)."""
    from gateway.config import load_settings

    p = Pipeline(load_settings(environ={}, overrides={"data_dir": str(tmp_path / "fuling"), "issuer_uscc": FULING,
                                                      "issuer_name": "重庆市涪陵中心医院（演示）"}), clock=clock)
    yield p
    p.close()


def convert_one(pipeline: Pipeline, data: bytes):
    outcomes = list(pipeline.convert(data, "cda", "test.xml"))
    assert len(outcomes) == 1
    return outcomes[0]


def results(bundle: dict) -> dict[str, dict]:
    """Observations by local item code: (value, unit, interpretation codes, reference range text)."""
    out = {}
    for o in entries_of(bundle, "Observation"):
        q = o.get("valueQuantity", {})
        out[o["code"]["coding"][0]["code"]] = {
            "value": str(q.get("value")), "unit": q.get("unit"), "text": o["code"]["text"],
            "flags": [c["code"] for i in o.get("interpretation", []) for c in i["coding"]],
            "range": (o.get("referenceRange") or [{}])[0].get("text")}
    return out


def report_of(bundle: dict) -> dict:
    [report] = entries_of(bundle, "DiagnosticReport")
    return report


# -- the three layouts ------------------------------------------------------------------------


def test_items_with_nested_parts_are_read(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, NESTED)
    assert out.status is Status.CONVERTED, out.issues
    assert profiles.validate(out.bundle) == []
    found = results(out.bundle)
    assert list(found) == ["WBC", "RBC", "HGB", "PLT"]
    assert found["WBC"] == {"value": "6.85", "unit": "10^9/L", "text": "白细胞计数", "flags": ["N"], "range": "3.5-9.5"}
    # HGB's result code and quantity sit in an organizer nested in the item observation.
    assert found["HGB"] == {"value": "118", "unit": "g/L", "text": "血红蛋白", "flags": ["A", "L"], "range": "130-175"}
    [specimen] = entries_of(out.bundle, "Specimen")
    assert specimen["type"]["coding"][0]["code"] == "BLD"
    assert specimen["collection"] == {"collectedDateTime": "2026-11-18T07:45:00+08:00"}
    assert specimen["receivedTime"] == "2026-11-18T08:10:00+08:00"
    assert {n["text"] for o in entries_of(out.bundle, "Observation") for n in o["note"]} == {"标本状态：合格"}


def test_the_standards_sibling_entries_are_read_item_by_item(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, SIBLING)
    assert out.status is Status.CONVERTED, out.issues
    assert profiles.validate(out.bundle) == []
    found = results(out.bundle)
    assert list(found) == ["UREA", "CREA", "K", "NA"]
    assert found["UREA"]["value"] == "5.4" and found["UREA"]["text"] == "尿素"
    # CREA's unit is an entry of its own after its 检验定量结果.
    assert found["CREA"] == {"value": "112", "unit": "μmol/L", "text": "肌酐", "flags": ["A", "H"], "range": "57-111"}
    crea = [o for o in entries_of(out.bundle, "Observation") if o["code"]["coding"][0]["code"] == "CREA"][0]
    assert crea["valueQuantity"]["code"] == "umol/L"
    assert found["NA"] == {"value": "139", "unit": "mmol/L", "text": "钠", "flags": ["N"], "range": "137-147"}


def test_one_document_may_mix_layouts_item_by_item(at_fuling: Pipeline) -> None:
    out = convert_one(at_fuling, MIXED)
    assert out.status is Status.CONVERTED, out.issues
    assert profiles.validate(out.bundle) == []
    found = results(out.bundle)
    assert {k: (v["value"], v["unit"], v["flags"]) for k, v in found.items()} == {
        "2001": ("22", "U/L", ["N"]),  # organizer per item
        "2002": ("25", "U/L", ["N"]),  # nested
        "2030": ("6.12", "mmol/L", ["A", "H"]),  # two items in one BATTERY organizer, as a sibling sequence
        "2031": ("1.45", "mmol/L", ["N"]),
    }
    assert entries_of(out.bundle, "Organization")[0]["identifier"][0]["value"] == FULING


def test_the_organizer_per_item_layout_is_unchanged(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, FULL)
    assert out.status is Status.CONVERTED
    assert list(results(out.bundle)) == ["ALT", "AST", "GLU", "CREA", "K", "HBSAG"]


def test_new_samples_pass_the_outside_validators(pipeline: Pipeline, at_fuling: Pipeline, tmp_path: Path) -> None:
    files = []
    for n, data in enumerate((NESTED, SIBLING, MIXED, V3_BARE, V3_SOAP12, V3_SOAP11)):
        out = convert_one(at_fuling if data in (MIXED, V3_SOAP11) else pipeline, data)
        assert out.bundle is not None, out.issues
        path = tmp_path / f"b{n}.json"
        path.write_text(jsonutil.dumps(out.bundle), encoding="utf-8")
        files.append(path)
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr


# -- ambiguity is refused, naming the entries --------------------------------------------------


def _sibling_entries(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """The sibling sample cut into (before the items, the item entries, after them)."""
    start = data.index(b"<entry>\n            <observation classCode=\"OBS\" moodCode=\"EVN\">\n              "
                       b"<code code=\"DE04.30.019.00\"")
    end = data.index(b"</section>", start)
    body = data[start:end]
    parts = [b"<entry>" + p for p in body.split(b"<entry>")[1:]]
    return data[:start], parts, data[end:]


def test_a_result_entry_before_any_item_is_refused_by_xpath(pipeline: Pipeline) -> None:
    head, entries, tail = _sibling_entries(SIBLING)
    # move UREA's 检验定量结果 (the 4th entry) in front of the first item
    moved = [entries[3]] + entries[:3] + entries[4:]
    out = convert_one(pipeline, head + b"".join(moved) + tail)
    assert out.status is Status.REFUSED and out.ack_code == "AR"
    [error] = out.errors
    assert error.location == f"{LAB}/entry[3]/observation"
    assert "检验定量结果 entry belongs to no 检验项目" in error.message


def test_two_quantities_for_one_item_are_refused_naming_both(pipeline: Pipeline) -> None:
    head, entries, tail = _sibling_entries(SIBLING)
    # UREA followed by its own 检验定量结果 and K's (the 4th entry of the K item): two for one item
    doubled = entries[:4] + [entries[12]] + entries[4:12] + entries[13:]
    out = convert_one(pipeline, head + b"".join(doubled) + tail)
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location == f"{LAB}/entry[3]/observation"  # the item
    assert "检验项目 'UREA' has 2 检验定量结果 entries" in error.message
    assert f"{LAB}/entry[6]/observation, {LAB}/entry[7]/observation" in error.message


def test_a_unit_entry_contradicting_the_nested_unit_is_refused(pipeline: Pipeline) -> None:
    nested_too = SIBLING.replace(b'<value xsi:type="REAL" value="112"/>', (
        b'<value xsi:type="REAL" value="112"/><entryRelationship typeCode="COMP"><observation classCode="OBS" '
        b'moodCode="EVN"><code code="DE04.30.016.00"/><value xsi:type="ST">mg/dL</value></observation>'
        b'</entryRelationship>'))
    out = convert_one(pipeline, nested_too)
    assert out.status is Status.REFUSED
    assert "contradicts the unit 'mg/dL'" in out.errors[0].message
    assert out.errors[0].location.endswith("/observation/value")


def test_no_item_at_all_is_refused(pipeline: Pipeline) -> None:
    doc = re.sub(rb'code="DE04\.30\.019\.00"', b'code="DE04.30.021.00"', SIBLING)
    out = convert_one(pipeline, doc)
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location == f"{LAB}/entry" and "no 检验项目" in error.message


# -- 电子申请单编号 and the author --------------------------------------------------------------


@pytest.mark.parametrize("data, order, author", [
    (NESTED, "SQ202611180102", ("J0015", "吴检验")),  # in inFulfillmentOf/order
    (FULL, "SQ202411050045", ("J0012", "赵检验")),  # beside the patient's numbers
])
def test_order_number_and_author_are_kept(pipeline: Pipeline, data: bytes, order: str, author: tuple) -> None:
    out = convert_one(pipeline, data)
    report = report_of(out.bundle)
    assert {"system": "urn:oid:2.16.156.10011.1.24", "value": order} in report["identifier"]
    assert report["identifier"][0]["system"] == "urn:oid:2.16.156.10011.1.33"  # the report number stays first
    assert report["performer"][1] == {"type": "Practitioner",
                                      "identifier": {"system": "urn:oid:2.16.156.10011.1.7", "value": author[0]},
                                      "display": author[1]}
    assert report["performer"][0]["reference"].startswith("urn:uuid:")  # the issuing member stays first
    assert profiles.validate(out.bundle) == []


def test_a_report_without_an_author_has_only_the_member_as_performer(pipeline: Pipeline) -> None:
    start = FULL.index(b"<author ")
    end = FULL.index(b"</author>") + len(b"</author>")
    out = convert_one(pipeline, FULL[:start] + FULL[end:])
    assert out.status is Status.CONVERTED
    assert len(report_of(out.bundle)["performer"]) == 1


def test_the_issuer_is_still_the_member_with_an_author_present(pipeline: Pipeline) -> None:
    from gateway.recognition.facts import facts_from_bundle

    out = convert_one(pipeline, NESTED)
    facts = facts_from_bundle(out.bundle)
    assert {f.issuer_uscc for f in facts} == {TONGJIANG}


# -- corrections name the report they correct --------------------------------------------------


def test_a_correction_names_the_report_number_it_corrects(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, CORRECTED)
    report = report_of(out.bundle)
    assert report["status"] == "corrected"
    assert report["extension"] == [{"url": "https://fhir.cyhr.org.cn/StructureDefinition/replaces",
                                    "valueIdentifier": {
                                        "system": "urn:oid:2.16.156.10011.1.33", "value": "JY202411050123",
                                        "assigner": {"identifier": {"system": "https://fhir.cyhr.org.cn/sid/uscc",
                                                                    "value": TONGJIANG}}}}]
    # The replaced document's 文档流水号 is said in the answer (the extension holds one identifier).
    [note] = [i for i in out.issues if i.severity == "information"]
    assert note.location == "/ClinicalDocument/relatedDocument/parentDocument/id/@extension"
    assert "JY202411050123" in note.message and "TJRMYY-JY-20241105-000123" in note.message
    assert profiles.validate(out.bundle) == []


def test_a_parent_document_naming_its_report_number_is_followed(pipeline: Pipeline) -> None:
    doc = CORRECTED.replace(b'<setId root="2.16.156.10011.1.1" extension="TJRMYY-JY-20241105-000123"/>',
                            b'<id root="2.16.156.10011.1.33" extension="JY202411040999"/>\n      '
                            b'<setId root="2.16.156.10011.1.1" extension="TJRMYY-JY-20241105-000123"/>')
    out = convert_one(pipeline, doc)
    assert out.status is Status.CONVERTED, out.issues
    ext = report_of(out.bundle)["extension"][0]["valueIdentifier"]
    assert (ext["system"], ext["value"]) == ("urn:oid:2.16.156.10011.1.33", "JY202411040999")


# -- HL7 v3 messages ----------------------------------------------------------------------------


@pytest.mark.parametrize("data, codes", [
    (V3_BARE, ["ALT", "AST"]),
    (V3_SOAP12, ["GLU"]),
    (V3_SOAP11, ["1001", "1005"]),
])
def test_v3_messages_are_unwrapped(pipeline: Pipeline, at_fuling: Pipeline, data: bytes, codes: list[str]) -> None:
    out = convert_one(at_fuling if data is V3_SOAP11 else pipeline, data)  # (涪陵's message at 涪陵's gateway)
    assert out.status is Status.CONVERTED, out.issues
    assert list(results(out.bundle)) == codes
    assert profiles.validate(out.bundle) == []


def _ack(body: bytes) -> etree._Element:
    root = etree.fromstring(body)
    found = root.xpath("//v3:MCCI_IN000002UV01", namespaces=V3)
    assert found, body[:300]
    return found[0]


def test_post_v3_message_is_acknowledged_with_mcci(client) -> None:
    resp = client.post("/ingest/cda", data=V3_BARE, content_type="application/xml")
    assert resp.status_code == 200 and resp.headers["X-Ack-Code"] == "AA"
    assert resp.mimetype == "application/hl7-v3+xml"
    ack = _ack(resp.data)
    assert ack.xpath("v3:acknowledgement/@typeCode", namespaces=V3) == ["AA"]
    assert ack.xpath("v3:acknowledgement/v3:targetMessage/v3:id/@extension", namespaces=V3) == [
        "8c5b2f0e-3d41-4e0a-9b7c-2a61d4f0c101"]
    assert ack.xpath("v3:interactionId/@extension", namespaces=V3) == ["MCCI_IN000002UV01"]
    assert ack.xpath("v3:receiver/v3:device/v3:id/v3:item/@extension", namespaces=V3) == ["LIS-TJRMYY"]
    assert ack.xpath("v3:sender/v3:device/v3:id/v3:item/@extension", namespaces=V3) == ["HIP-GATEWAY"]
    found = client.get("/fhir/DiagnosticReport", query_string={
        "identifier": "urn:oid:2.16.156.10011.1.33|JY202611210088"}).get_json()
    assert found["total"] == 1


@pytest.mark.parametrize("data, media_type, soap", [
    (V3_SOAP12, "application/soap+xml", "http://www.w3.org/2003/05/soap-envelope"),
    # (the 涪陵 sample kept by this gateway's member: another member's document is refused here)
    (V3_SOAP11.replace(FULING.encode(), TONGJIANG.encode()), "text/xml", "http://schemas.xmlsoap.org/soap/envelope/"),
])
def test_soap_messages_are_acknowledged_in_their_envelope(client, data: bytes, media_type: str, soap: str) -> None:
    resp = client.post("/ingest/cda", data=data, content_type=media_type)
    assert resp.status_code == 200 and resp.mimetype == media_type
    root = etree.fromstring(resp.data)
    assert etree.QName(root).localname == "Envelope" and etree.QName(root).namespace == soap
    assert _ack(resp.data).xpath("v3:acknowledgement/@typeCode", namespaces=V3) == ["AA"]


def test_a_refused_v3_message_names_each_problem_by_xpath(client) -> None:
    bad = V3_BARE.replace(b'extension="511921200109050422"', b'extension="511921200109050423"')
    resp = client.post("/ingest/cda", data=bad, content_type="application/xml")
    assert resp.status_code == 200 and resp.headers["X-Ack-Code"] == "AE"
    ack = _ack(resp.data)
    assert ack.xpath("v3:acknowledgement/@typeCode", namespaces=V3) == ["AE"]
    details = [(d.get("typeCode"), d.xpath("v3:location/@value", namespaces=V3),
                d.xpath("v3:text/@value", namespaces=V3)[0]) for d in
               ack.xpath("v3:acknowledgement/v3:acknowledgementDetail", namespaces=V3)]
    errors = [d for d in details if d[0] == "E"]
    assert errors == [("E", ["/POLB_IN224000UV01/controlActProcess/subject/observationReport/component/"
                             "ClinicalDocument/recordTarget/patientRole/patient/id/@extension"],
                       "文档流水号 TJRMYY-JY-20261121-000088: 身份证号 check digit is '3', expected '2'")]
    # the client may still ask for an OperationOutcome
    resp = client.post("/ingest/cda", data=bad, content_type="application/xml",
                       headers={"Accept": "application/fhir+json"})
    assert resp.status_code == 422 and resp.get_json()["resourceType"] == "OperationOutcome"


def test_a_resent_v3_message_gets_its_acknowledgement_again(client) -> None:
    first = client.post("/ingest/cda", data=V3_BARE, content_type="application/xml")
    again = client.post("/ingest/cda", data=V3_BARE, content_type="application/xml")
    assert again.status_code == 200 and again.mimetype == "application/hl7-v3+xml"
    assert _ack(again.data).xpath("v3:acknowledgement/v3:targetMessage/v3:id/@extension", namespaces=V3) == \
        _ack(first.data).xpath("v3:acknowledgement/v3:targetMessage/v3:id/@extension", namespaces=V3)


def test_bare_documents_are_still_answered_with_an_operation_outcome(client) -> None:
    resp = client.post("/ingest/cda", data=NESTED, content_type="application/xml")
    assert resp.status_code == 200 and resp.mimetype == "application/fhir+json"


CARRIED_END = b"</component>\n      </observationReport>"


@pytest.mark.parametrize("change, location, words", [
    (lambda d: d.replace(b"POLB_IN224000UV01", b"POOR_IN200901UV"), "/POOR_IN200901UV", "not taken here"),
    (lambda d: d.replace(b'extension="8c5b2f0e-3d41-4e0a-9b7c-2a61d4f0c101"', b""),
     "/POLB_IN224000UV01/id/@extension", "no id"),
    (lambda d: d[:d.index(b"<component typeCode")] + d[d.index(CARRIED_END) + len(b"</component>"):],
     "/POLB_IN224000UV01/controlActProcess/subject", "carries no ClinicalDocument"),
])
def test_v3_messages_without_a_report_are_refused(pipeline: Pipeline, change, location: str, words: str) -> None:
    out = convert_one(pipeline, change(V3_BARE))
    assert out.status is Status.REFUSED and out.ack_code in ("AR", "AE")
    assert out.errors[0].location == location and words in out.errors[0].message
    ack = _ack(out.answer)
    assert ack.xpath("v3:acknowledgement/@typeCode", namespaces=V3) == [out.ack_code]


# -- one report per message: nothing carried beside it is dropped -------------------------------


B64_START = b'<text mediaType="text/xml" representation="B64">'
B64_TEXT = V3_SOAP12[V3_SOAP12.index(B64_START):V3_SOAP12.index(b"</text>", V3_SOAP12.index(B64_START)) + 7]
ESCAPED_TEXT = (b'<text mediaType="text/xml">'
                + NESTED.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;") + b"</text>")
SOAP12_POLB = V3_SOAP12[V3_SOAP12.index(b"<POLB_IN224000UV01"):V3_SOAP12.index(b"</POLB_IN224000UV01>") + 20]
SOAP11_MESSAGE = V3_SOAP11[V3_SOAP11.index(b"<hip:message>"):V3_SOAP11.index(b"</hip:message>") + 14]
BARE_POLB = V3_BARE[V3_BARE.index(b"<POLB_IN224000UV01"):]
REPORT = "/POLB_IN224000UV01/controlActProcess/subject/observationReport"


def _hip(*parameters: bytes) -> bytes:
    return (b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:hip="urn:hl7-org:v3">'
            b"<soapenv:Body><hip:HIPMessageServer><hip:action>POLB_IN224000UV01</hip:action>"
            + b"".join(b"<hip:message>" + p + b"</hip:message>" for p in parameters)
            + b"</hip:HIPMessageServer></soapenv:Body></soapenv:Envelope>")


@pytest.mark.parametrize("data, location, words", [
    (V3_SOAP12.replace(B64_TEXT, B64_TEXT + B64_TEXT), f"/Envelope/Body{REPORT}/text[2]",
     f"carries 2 ClinicalDocuments (the first at /Envelope/Body{REPORT}/text[1])"),
    (V3_SOAP12.replace(B64_TEXT, B64_TEXT + ESCAPED_TEXT), f"/Envelope/Body{REPORT}/text[2]",
     "carries 2 ClinicalDocuments"),
    (V3_BARE.replace(b'<component typeCode="COMP">', B64_TEXT + b'<component typeCode="COMP">', 1),
     f"{REPORT}/component/ClinicalDocument", f"carries 2 ClinicalDocuments (the first at {REPORT}/text)"),
    (V3_SOAP12.replace(SOAP12_POLB, SOAP12_POLB + SOAP12_POLB), "/Envelope/Body/POLB_IN224000UV01[2]",
     "the SOAP Body holds 2 elements ('POLB_IN224000UV01', 'POLB_IN224000UV01')"),
    (V3_SOAP11.replace(SOAP11_MESSAGE, SOAP11_MESSAGE + SOAP11_MESSAGE), "/Envelope/Body/HIPMessageServer/message[2]",
     "SOAP operation 'HIPMessageServer' carries 2 parameters holding XML text"),
    (_hip(BARE_POLB, BARE_POLB), "/Envelope/Body/HIPMessageServer/message[2]/POLB_IN224000UV01",
     "SOAP operation 'HIPMessageServer' carries 2 HL7 v3 messages or ClinicalDocuments"),
], ids=["two-base64", "base64-and-escaped", "element-and-base64", "two-messages-in-body", "two-text-parameters",
        "two-message-parameters"])
def test_a_second_report_in_one_message_is_refused_not_dropped(pipeline: Pipeline, data: bytes, location: str,
                                                               words: str) -> None:
    out = convert_one(pipeline, data)
    assert out.status is Status.REFUSED and out.bundle is None
    assert [e.location for e in out.errors] == [location], out.issues
    assert words in out.errors[0].message
    ack = _ack(out.answer)
    assert ack.xpath("v3:acknowledgement/@typeCode", namespaces=V3) == [out.ack_code]
    assert out.ack_code in ("AE", "AR")
    assert ack.xpath("v3:acknowledgement/v3:acknowledgementDetail/v3:location/@value", namespaces=V3) == [location]


def test_an_attachment_declared_as_a_pdf_beside_the_report_is_not_a_second_report(pipeline: Pipeline) -> None:
    """A base64 PDF (mediaType application/pdf) next to the report is an attachment: the report is taken."""
    pdf = b'<text mediaType="application/pdf" representation="B64">' + base64.b64encode(b"%PDF-1.7 demo") + b"</text>"
    out = convert_one(pipeline, V3_SOAP12.replace(B64_TEXT, B64_TEXT + pdf))
    assert out.bundle is not None and not out.errors, out.issues


def test_two_operations_in_one_soap_body_are_answered_in_the_envelope(client) -> None:
    body = V3_SOAP11.replace(b"</soapenv:Body>", _hip(BARE_POLB).split(b"<soapenv:Body>")[1].split(
        b"</soapenv:Body>")[0] + b"</soapenv:Body>")
    resp = client.post("/ingest/cda", data=body, content_type="text/xml")
    assert resp.status_code == 200 and resp.mimetype == "text/xml" and resp.headers["X-Ack-Code"] in ("AE", "AR")
    ack = _ack(resp.data)
    assert ack.xpath("v3:acknowledgement/v3:acknowledgementDetail/v3:location/@value", namespaces=V3) == [
        "/Envelope/Body/HIPMessageServer[2]"]
    found = client.get("/fhir/DiagnosticReport", query_string={
        "identifier": "urn:oid:2.16.156.10011.1.33|JY202611210088"}).get_json()
    assert found["total"] == 0


def test_base64_inside_a_document_carried_as_an_element_is_the_documents_own(pipeline: Pipeline) -> None:
    # an ED of the report itself (here a section's text as a base64 image) is not a second document
    data = V3_BARE.replace(b"<text/>", b'<text mediaType="image/png" representation="B64">iVBORw0KGgo=</text>', 1)
    out = convert_one(pipeline, data)
    assert out.status is Status.CONVERTED, out.issues
    assert list(results(out.bundle)) == ["ALT", "AST"]


# -- hostile XML inside a wrapper -----------------------------------------------------------------


def _b64_of(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_a_dtd_inside_a_base64_payload_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT", encoding="utf-8")
    hostile = (b'<?xml version="1.0"?>\n<!DOCTYPE ClinicalDocument [<!ENTITY x SYSTEM "file://'
               + str(secret).encode() + b'">]>\n' + NESTED.split(b"\n", 1)[1].replace(b"<name>", b"<name>&x;", 1))
    start = V3_SOAP12.index(b'representation="B64">') + len(b'representation="B64">')
    end = V3_SOAP12.index(b"</text>", start)
    doc = V3_SOAP12[:start] + _b64_of(hostile) + V3_SOAP12[end:]
    out = convert_one(pipeline, doc)
    assert out.status is Status.REFUSED and out.ack_code == "AR"
    assert out.errors[0].code == "security"
    assert out.errors[0].location.endswith("/observationReport/text")
    assert b"TOP-SECRET" not in out.answer
    assert _ack(out.answer).xpath("v3:acknowledgement/@typeCode", namespaces=V3) == ["AR"]


def test_an_escaped_payload_declaring_entities_is_refused(pipeline: Pipeline) -> None:
    laughs = (b'<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
              b'<POLB_IN224000UV01 xmlns="urn:hl7-org:v3"><id extension="x"/><controlActProcess>&lol2;'
              b'</controlActProcess></POLB_IN224000UV01>')
    escaped = laughs.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")
    start = V3_SOAP11.index(b"<![CDATA[")
    end = V3_SOAP11.index(b"]]>") + 3
    out = convert_one(pipeline, V3_SOAP11[:start] + escaped + V3_SOAP11[end:])
    assert out.status is Status.REFUSED and out.errors[0].code == "security"
    assert out.errors[0].location == "/Envelope/Body/HIPMessageServer/message"


def test_a_dtd_in_the_envelope_itself_is_refused_unread_and_answered_in_kind(client) -> None:
    dtd = b'<!DOCTYPE POLB_IN224000UV01 [<!ENTITY a "b">]>\n'
    hostile = V3_BARE.replace(b"<POLB_IN224000UV01 ", dtd + b"<POLB_IN224000UV01 ", 1)
    resp = client.post("/ingest/cda", data=hostile, content_type="application/xml")
    assert resp.status_code == 200 and resp.headers["X-Ack-Code"] == "AR"
    ack = _ack(resp.data)
    assert ack.xpath("v3:acknowledgement/@typeCode", namespaces=V3) == ["AR"]
    assert ack.xpath("v3:acknowledgement/v3:targetMessage/v3:id/@nullFlavor", namespaces=V3) == ["UNK"]


def test_a_payload_over_the_size_limit_is_refused(tmp_path: Path, clock, database: str) -> None:
    from gateway.config import load_settings

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": TONGJIANG,
                                                    "max_message_bytes": len(V3_SOAP12) + 10, "database": database})
    pipeline = Pipeline(settings, clock=clock)
    try:
        assert convert_one(pipeline, V3_SOAP12).status is Status.CONVERTED
        big = V3_SOAP12.replace(b"<soap:Header/>", b"<soap:Header>" + b" " * 20 + b"</soap:Header>")
        out = convert_one(pipeline, big)
        assert out.status is Status.REFUSED and out.errors[0].code == "too-long"
    finally:
        pipeline.close()


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_convert_unwraps_v3_messages(runner) -> None:
    from gateway.cli import cli

    bundles = []
    for member, name in ((TONGJIANG, "v3-polb-soap-base64.xml"), (FULING, "v3-hip-soap11-cdata.xml")):
        result = runner.invoke(cli, ["--issuer-uscc", member, "convert", "--format", "cda", str(CDA / name)])
        assert result.exit_code == 0, result.stderr
        bundles += [json.loads(line) for line in result.stdout.splitlines()]
    assert [report_of(b)["identifier"][0]["value"] for b in bundles] == ["JY202611210093", "L2026112101377"]
    bad = V3_BARE.replace(b'extension="511921200109050422"', b'extension="511921200109050423"')
    result = runner.invoke(cli, ["--issuer-uscc", TONGJIANG, "convert", "--format", "cda", "-"], input=bad)
    assert result.exit_code == 1
    assert ("文档流水号 TJRMYY-JY-20261121-000088: /POLB_IN224000UV01/controlActProcess/subject/"
            "observationReport/component/ClinicalDocument/recordTarget/patientRole/patient/id/@extension: "
            "身份证号 check digit is '3', expected '2'") in result.stderr
