"""CDA channel, as an outside review drove it: resent and corrected documents (each request recorded and
answered for itself), a 计量单位 entry contradicting its result's unit, an IVL_PQ 检验定量结果 ("<0.05"), and
profile problems named by XPath."""
from __future__ import annotations

import html
import re

import pytest
from lxml import etree

from conftest import DATA
from gateway.adapters.cda import CDAAdapter
from gateway.fhir.bundle import entries_of
from gateway.pipeline import Pipeline, Status

CDA = DATA / "cda"
SIBLING = (CDA / "lab-report-sibling.xml").read_bytes()
DOC_ID = "TJRMYY-JY-20261119-000452"
V3 = {"v3": "urn:hl7-org:v3"}
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
LAB = "/ClinicalDocument/component/structuredBody/component[2]/section"
# UREA's 检验定量结果 in the sibling sample, and an entry of the same kind (a second result for UREA)
UREA_VALUE = b'<value xsi:type="REAL" value="5.4"/>'


def _document(data: bytes) -> str:
    return re.sub(r"^\s*<\?xml[^>]*\?>\s*", "", data.decode("utf-8"))


def polb(document: bytes, message_id: str, interaction: str = "POLB_IN224000UV01") -> str:
    """A POLB_IN224000UV01 message carrying ``document`` as an element, as 互联互通 platforms send it."""
    return (
        '<POLB_IN224000UV01 xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'ITSVersion="XML_1.0">'
        f'<id root="2.16.156.10011.2.5.1.1" extension="{message_id}"/><creationTime value="20261121101620"/>'
        f'<interactionId root="2.16.156.10011.2.5.1.2" extension="{interaction}"/>'
        '<processingCode code="P"/><processingModeCode/><acceptAckCode code="AL"/>'
        '<receiver typeCode="RCV"><device classCode="DEV" determinerCode="INSTANCE"><id>'
        '<item root="2.16.156.10011.2.5.1.3" extension="HIP"/></id></device></receiver>'
        '<sender typeCode="SND"><device classCode="DEV" determinerCode="INSTANCE"><id>'
        '<item root="2.16.156.10011.2.5.1.3" extension="LIS-TJRMYY"/></id></device></sender>'
        '<controlActProcess classCode="CACT" moodCode="EVN"><subject typeCode="SUBJ">'
        '<observationReport classCode="GROUPER" moodCode="EVN"><statusCode code="9"/><component typeCode="COMP">'
        f'{_document(document)}</component></observationReport></subject></controlActProcess></POLB_IN224000UV01>')


def bare(message: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>' + message).encode("utf-8")


def soap11_hip(message: str) -> bytes:
    """The message as the escaped text of a HIPMessageServer parameter in SOAP 1.1."""
    return ('<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="' + SOAP11 + '">'
            '<soapenv:Body><hip:HIPMessageServer xmlns:hip="urn:hl7-org:v3"><hip:action>POLB_IN224000UV01'
            f'</hip:action><hip:message>{html.escape(message)}</hip:message></hip:HIPMessageServer>'
            '</soapenv:Body></soapenv:Envelope>').encode("utf-8")


def soap12(message: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="' + SOAP12 + '"><soap:Body>'
            f'{message}</soap:Body></soap:Envelope>').encode("utf-8")


def ack(data: bytes) -> tuple[str, str, list[str]]:
    """(acknowledgement typeCode, targetMessage id, the details' texts) of an MCCI_IN000002UV01."""
    root = etree.fromstring(data)
    [mcci] = root.xpath("//v3:MCCI_IN000002UV01", namespaces=V3)
    return (mcci.xpath("string(v3:acknowledgement/@typeCode)", namespaces=V3),
            mcci.xpath("string(v3:acknowledgement/v3:targetMessage/v3:id/@extension)", namespaces=V3),
            [str(t) for t in mcci.xpath("v3:acknowledgement/v3:acknowledgementDetail/v3:text/@value",
                                        namespaces=V3)])


def records(pipeline: Pipeline) -> list[tuple[str, str, str]]:
    """(message key, status, ack code) of every stored message, oldest first (what `messages list` shows)."""
    return [(r[0], r[1], r[2]) for r in pipeline.store.db.execute(
        "SELECT message_id, status, ack_code FROM messages ORDER BY id").fetchall()]


def reports(pipeline: Pipeline) -> int:
    return int(pipeline.store.db.execute(
        "SELECT count(*) FROM resources WHERE type = 'DiagnosticReport'").fetchone()[0])


# the same sample with two 检验定量结果 for UREA: refused as ambiguous
AMBIGUOUS = SIBLING.replace(UREA_VALUE, UREA_VALUE + b"</observation></entry><entry><observation classCode=\"OBS\" "
                            b"moodCode=\"EVN\"><code code=\"DE04.30.015.00\"/><value xsi:type=\"REAL\" "
                            b"value=\"5.5\"/>", 1)
CHANGED = SIBLING.replace(UREA_VALUE, b'<value xsi:type="REAL" value="6.4"/>', 1)


# -- resent and corrected documents ------------------------------------------------------------------------


def test_a_refused_document_fixed_and_sent_again_is_processed(client, pipeline: Pipeline) -> None:
    first = client.post("/ingest/cda", data=AMBIGUOUS, content_type="application/xml")
    assert first.status_code == 422 or first.status_code == 400
    assert first.headers["X-Ack-Code"] in ("AE", "AR")
    fixed = client.post("/ingest/cda", data=SIBLING, content_type="application/xml")
    assert fixed.status_code == 200 and fixed.headers["X-Ack-Code"] == "AA", fixed.get_json()
    assert "stored (Bundle/" in fixed.get_json()["issue"][0]["diagnostics"]
    # the refused record stays, the new one is recorded under a key of its own
    assert [(k, s) for k, s, _ in records(pipeline)] == [(DOC_ID, "refused"), (f"{DOC_ID}#2", "stored")]
    assert reports(pipeline) == 1


def test_a_refused_document_sent_again_unchanged_is_worked_again_and_recorded(client, pipeline: Pipeline) -> None:
    for _ in range(2):
        resp = client.post("/ingest/cda", data=AMBIGUOUS, content_type="application/xml")
        assert "has 2 检验定量结果 entries" in str(resp.get_json())
    assert [s for _, s, _ in records(pipeline)] == ["refused", "refused"]


def test_a_resend_in_another_wrapper_is_a_duplicate_answered_for_itself(client, pipeline: Pipeline) -> None:
    first = client.post("/ingest/cda", data=soap11_hip(polb(SIBLING, "m-dedup-1")), content_type="text/xml")
    assert first.status_code == 200 and first.mimetype == "text/xml"
    assert ack(first.data)[:2] == ("AA", "m-dedup-1")
    # the same document, bare POLB, another message id: the stored outcome, in this request's own terms
    again = client.post("/ingest/cda", data=bare(polb(SIBLING, "m-dedup-2")), content_type="application/xml")
    assert again.status_code == 200 and again.mimetype == "application/hl7-v3+xml"
    assert again.headers["X-Ack-Code"] == "AA"
    code, target, texts = ack(again.data)
    assert (code, target) == ("AA", "m-dedup-2")
    assert SOAP11.encode() not in again.data
    assert any("with the same content was received on" in t and "not processed again" in t for t in texts)
    # a byte-identical resend of the first request: a duplicate too, acknowledged in SOAP 1.1 again
    third = client.post("/ingest/cda", data=soap11_hip(polb(SIBLING, "m-dedup-1")), content_type="text/xml")
    assert third.mimetype == "text/xml" and ack(third.data)[:2] == ("AA", "m-dedup-1")
    # a bare document: a duplicate, answered with an OperationOutcome
    fourth = client.post("/ingest/cda", data=SIBLING, content_type="application/xml")
    assert fourth.status_code == 200 and fourth.mimetype == "application/fhir+json"
    assert "duplicate" in fourth.get_json()["issue"][0]["diagnostics"]
    assert records(pipeline) == [(DOC_ID, "stored", "AA"), (f"{DOC_ID}#2", "duplicate", "AA"),
                                 (f"{DOC_ID}#3", "duplicate", "AA"), (f"{DOC_ID}#4", "duplicate", "AA")]
    assert reports(pipeline) == 1


def test_other_content_under_an_accepted_document_id_is_refused_and_recorded(client, pipeline: Pipeline) -> None:
    client.post("/ingest/cda", data=soap11_hip(polb(SIBLING, "m-dedup-1")), content_type="text/xml")
    changed = client.post("/ingest/cda", data=bare(polb(CHANGED, "m-dedup-3")), content_type="application/xml")
    assert changed.status_code == 200 and changed.mimetype == "application/hl7-v3+xml"
    assert changed.headers["X-Ack-Code"] == "AE"
    code, target, texts = ack(changed.data)
    assert (code, target) == ("AE", "m-dedup-3")
    [text] = [t for t in texts if "was accepted on" in t]
    assert f"文档流水号 '{DOC_ID}' was accepted on 2026-11-22 09:30:00" in text
    assert "a correction is a new document with relatedDocument RPLC" in text
    location = etree.fromstring(changed.data).xpath(
        "string(//v3:acknowledgementDetail/v3:location/@value)", namespaces=V3)
    carried = "/POLB_IN224000UV01/controlActProcess/subject/observationReport/component/ClinicalDocument"
    assert location == f"{carried}/id/@extension"
    bare_doc = client.post("/ingest/cda", data=CHANGED, content_type="application/xml")
    assert bare_doc.status_code == 422
    [issue] = bare_doc.get_json()["issue"]
    assert issue["expression"] == ["/ClinicalDocument/id/@extension"] and issue["code"] == "conflict"
    assert records(pipeline) == [(DOC_ID, "stored", "AA"), (f"{DOC_ID}#2", "refused", "AE"),
                                 (f"{DOC_ID}#3", "refused", "AE")]
    # the stored value is the first one, untouched
    [urea] = [o for o in entries_of(_stored_bundle(pipeline), "Observation")
              if o["code"]["coding"][0]["code"] == "UREA"]
    assert str(urea["valueQuantity"]["value"]) == "5.4"


def _stored_bundle(pipeline: Pipeline) -> dict:
    from gateway import jsonutil

    row = pipeline.store.db.execute(
        "SELECT json FROM resources WHERE type = 'DiagnosticReport'").fetchone()
    report = jsonutil.loads(row[0])
    observations = [jsonutil.loads(r[0]) for r in pipeline.store.db.execute(
        "SELECT json FROM resources WHERE type = 'Observation'").fetchall()]
    return {"entry": [{"resource": report}] + [{"resource": o} for o in observations]}


def test_wrappers_of_a_refused_document_each_get_their_own_answer(client, pipeline: Pipeline) -> None:
    answers = [
        client.post("/ingest/cda", data=soap12(polb(AMBIGUOUS, "m-amb")), content_type="application/soap+xml"),
        client.post("/ingest/cda", data=soap11_hip(polb(AMBIGUOUS, "m-amb-11")), content_type="text/xml"),
        client.post("/ingest/cda", data=bare(polb(AMBIGUOUS, "m-amb-bare")), content_type="application/xml"),
    ]
    assert [a.mimetype for a in answers] == ["application/soap+xml", "text/xml", "application/hl7-v3+xml"]
    assert [ack(a.data)[1] for a in answers] == ["m-amb", "m-amb-11", "m-amb-bare"]
    assert all("has 2 检验定量结果 entries" in " ".join(ack(a.data)[2]) for a in answers)
    assert [s for _, s, _ in records(pipeline)] == ["refused"] * 3


def test_a_wrong_interaction_id_gets_its_own_refusal(client, pipeline: Pipeline) -> None:
    client.post("/ingest/cda", data=bare(polb(SIBLING, "m-ok")), content_type="application/xml")
    wrong = client.post("/ingest/cda", data=soap11_hip(polb(SIBLING, "m-wrongint", "POOR_IN200901UV")),
                        content_type="text/xml")
    code, target, texts = ack(wrong.data)
    assert (code, target) == ("AR", "m-wrongint")
    assert any("interactionId 'POOR_IN200901UV' is not the message's type POLB_IN224000UV01" in t for t in texts)
    assert [s for _, s, _ in records(pipeline)] == ["stored", "refused"]


def test_the_same_content_in_any_wrapper_has_one_digest(pipeline: Pipeline) -> None:
    adapter: CDAAdapter = pipeline.channel("cda").adapter
    from gateway.adapters.base import RawUnit

    keys = {adapter.document_key(RawUnit(data, 1)) for data in (
        SIBLING, bare(polb(SIBLING, "a")), soap11_hip(polb(SIBLING, "b")), soap12(polb(SIBLING, "c")))}
    assert len(keys) == 1
    [key] = keys
    assert key is not None and key.document_id == DOC_ID
    assert adapter.document_key(RawUnit(CHANGED, 1)).digest != key.digest  # type: ignore[union-attr]


def test_hl7v2_resends_are_still_answered_with_the_first_answer(pipeline: Pipeline) -> None:
    message = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
    first = pipeline.ingest(message, "hl7v2", channel="http")
    again = pipeline.ingest(message, "hl7v2", channel="http")
    assert [o.status for o in again] == [Status.DUPLICATE] * len(first)
    assert [o.answer for o in again] == [o.answer for o in first]
    assert len(records(pipeline)) == len(first)


# -- a 计量单位 entry contradicting its result's unit ---------------------------------------------------------

UREA_ENTRY = "/entry[6]/observation"  # UREA's 检验定量结果 in the sibling sample
UNIT_ENTRY = ('<observation classCode="OBS" moodCode="EVN"><code code="DE04.30.016.00" displayName="检查定量结果计量单位" '
              'codeSystem="2.16.156.10011.2.2.1"/><value xsi:type="ST">mg/dL</value></observation>').encode()
UREA_PQ = b'<value xsi:type="PQ" value="5.4" unit="mmol/L"/>'


def convert_one(pipeline: Pipeline, data: bytes):
    [out] = list(pipeline.convert(data, "cda", "test.xml"))
    return out


def _urea_with(after_value: bytes) -> bytes:
    """The sibling sample with UREA's result as a PQ in mmol/L (its nested unit entry dropped) and
    ``after_value`` right after it."""
    start = SIBLING.index(UREA_VALUE)
    end = SIBLING.index(b"</observation>", SIBLING.index(b"DE04.30.016.00", start))
    end = SIBLING.index(b"</entryRelationship>", end) + len(b"</entryRelationship>")
    return SIBLING[:start] + UREA_PQ + after_value + SIBLING[end:]


@pytest.mark.parametrize("shape, after_value, unit_at", [
    ("sibling entry", b"</observation></entry><entry>" + UNIT_ENTRY[:-len(b"</observation>")],
     f"{LAB}/entry[7]/observation/value"),
    ("nested in the quantity", b'<entryRelationship typeCode="COMP">' + UNIT_ENTRY + b"</entryRelationship>",
     f"{LAB}{UREA_ENTRY}/entryRelationship/observation/value"),
])
def test_a_unit_entry_contradicting_the_pq_unit_is_refused_naming_both(
        pipeline: Pipeline, shape: str, after_value: bytes, unit_at: str) -> None:
    out = convert_one(pipeline, _urea_with(after_value))
    assert out.status is Status.REFUSED and out.bundle is None, shape
    [error] = out.errors
    assert error.location == unit_at
    assert f"计量单位 'mg/dL' contradicts the unit 'mmol/L' of the 检验定量结果 value at {LAB}{UREA_ENTRY}/value/@unit" \
        in error.message


def test_a_unit_entry_agreeing_with_the_pq_unit_is_taken(pipeline: Pipeline) -> None:
    agreeing = UNIT_ENTRY.replace(b"mg/dL", b"mmol/L")
    out = convert_one(pipeline, _urea_with(b"</observation></entry><entry>" + agreeing[:-len(b"</observation>")]))
    assert out.status is Status.CONVERTED, out.issues
    [urea] = [o for o in entries_of(out.bundle, "Observation") if o["code"]["coding"][0]["code"] == "UREA"]
    assert urea["valueQuantity"]["unit"] == "mmol/L" and str(urea["valueQuantity"]["value"]) == "5.4"


def test_a_unit_in_an_organizer_contradicting_the_pq_unit_is_refused(pipeline: Pipeline) -> None:
    organizer = (b'<entry><organizer classCode="CLUSTER" moodCode="EVN"><statusCode code="completed"/><component>'
                 b'<observation classCode="OBS" moodCode="EVN"><code code="DE04.30.019.00"/><value xsi:type="ST">GLU'
                 b'</value></observation></component><component><observation classCode="OBS" moodCode="EVN">'
                 b'<code code="DE04.30.015.00"/><value xsi:type="PQ" value="5.1" unit="mmol/L"/></observation>'
                 b'</component><component>' + UNIT_ENTRY + b'</component></organizer></entry></section>')
    end = SIBLING.index(b"</section>", SIBLING.index(b'code="30954-2"'))
    out = convert_one(pipeline, SIBLING[:end] + organizer + SIBLING[end + len(b"</section>"):])
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location.endswith("/organizer/component[3]/observation/value")
    assert "/organizer/component[2]/observation/value/@unit" in error.message


@pytest.mark.parametrize("value", [b'<value xsi:type="ST">5.40</value>', b"<value>5.40</value>"])
def test_a_number_written_as_text_beside_its_unit_is_read_as_a_quantity_and_said(
        pipeline: Pipeline, value: bytes) -> None:
    """8.20 typed ST (or untyped) with a 计量单位: a quantity in that unit, with a warning; it was a string and its
    unit went without a word, while its reference range kept the unit."""
    out = convert_one(pipeline, SIBLING.replace(UREA_VALUE, value, 1))
    assert out.status is Status.CONVERTED, out.issues
    [urea] = [o for o in entries_of(out.bundle, "Observation") if o["code"]["coding"][0]["code"] == "UREA"]
    assert urea["valueQuantity"]["unit"] == "mmol/L" and str(urea["valueQuantity"]["value"]) == "5.40"
    [said] = [i for i in out.issues if "read as a quantity" in i.message]
    assert said.severity == "warning" and said.location == f"{LAB}{UREA_ENTRY}/value"


def test_a_text_result_beside_a_unit_says_the_unit_is_left_out(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, SIBLING.replace(UREA_VALUE, '<value xsi:type="ST">见附页</value>'.encode(), 1))
    assert out.status is Status.CONVERTED, out.issues
    [urea] = [o for o in entries_of(out.bundle, "Observation") if o["code"]["coding"][0]["code"] == "UREA"]
    assert urea["valueString"] == "见附页"
    [said] = [i for i in out.issues if "is left out" in i.message]
    assert said.severity == "warning" and "'mmol/L'" in said.message


def test_two_values_of_one_result_are_refused_naming_both(pipeline: Pipeline) -> None:
    """The first of two values was taken and the second dropped without a word."""
    out = convert_one(pipeline, SIBLING.replace(UREA_VALUE, UREA_VALUE + UREA_VALUE.replace(b"5.4", b"6.1"), 1))
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location == f"{LAB}{UREA_ENTRY}/value[2]" and "nothing tells which is the result" in error.message


def test_times_in_an_impossible_order_are_said_where_they_are(pipeline: Pipeline) -> None:
    """A specimen collected after the report was issued, or a report issued in 2099: kept as sent, said with the
    XPath of the time (they were accepted without a word)."""
    text = SIBLING.decode("utf-8")
    issued = re.search(r'<author[^>]*>\s*<time value="(\d+)"', text)
    assert issued
    later = issued.group(0).replace(issued.group(1), "20991105160000")
    future = convert_one(pipeline, text.replace(issued.group(0), later).encode())
    [said] = [i for i in future.issues if "in the future" in i.message]
    assert said.severity == "warning" and said.location == "/ClinicalDocument/author/time/@value"
    low = re.search(r'<low value="(\d+)"', text)
    assert low
    late = convert_one(pipeline, text.replace(low.group(0), '<low value="20991231080000"', 1).encode())
    [said] = [i for i in late.issues if "after the report was issued" in i.message]
    assert said.severity == "warning" and said.location.endswith("/effectiveTime/low/@value")
    assert late.status is Status.CONVERTED


def test_a_report_time_without_a_time_of_day_is_the_days_first_moment(pipeline: Pipeline) -> None:
    """A date-only 检验报告日期 is read as the day's first moment and said (as a CSV export's date-only 报告日期 is);
    it was left out, and the report then refused as having no issue time, the time called empty."""
    text = SIBLING.decode("utf-8")
    issued = re.search(r'(<author[^>]*>\s*<time value=")(\d{8})\d+"', text)
    assert issued
    head, body = text.split("<component>", 1)  # the header's times (author, legalAuthenticator, the document's)
    head = re.sub(r'(<(?:time|effectiveTime) value="\d{8})\d+"', r'\1"', head)
    out = convert_one(pipeline, (head + "<component>" + body).encode())
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    day = f"{issued.group(2)[:4]}-{issued.group(2)[4:6]}-{issued.group(2)[6:]}"
    assert entries_of(out.bundle, "DiagnosticReport")[0]["issued"] == f"{day}T00:00:00+08:00"
    [said] = [i for i in out.issues if "no time of day" in i.message]
    assert said.severity == "warning" and said.location == "/ClinicalDocument/author/time/@value"
    assert not [i for i in out.issues if "after the report was issued" in i.message]  # (compared by the day)
    # the author's time a date only, the legal authenticator's with a time: that one is taken, and it is said
    author_only = re.sub(r'(<author[^>]*>\s*<time value="\d{8})\d+"', r'\1"', text, count=1)
    taken = convert_one(pipeline, author_only.encode())
    [said] = [i for i in taken.issues if "no time of day" in i.message]
    assert said.location == "/ClinicalDocument/author/time/@value" and "legalAuthenticator" in said.message


@pytest.mark.parametrize("body, code, words", [
    (b"just some text", "structure", "does not begin with '<'"),
    (b'{"resourceType": "Bundle"}', "structure", "does not begin with '<'"),
    ('<?xml version="1.0" encoding="UTF-16"?><ClinicalDocument xmlns="urn:hl7-org:v3"/>'.encode(), "structure",
     "its bytes are not UTF-16"),
])
def test_a_body_that_is_not_cda_is_refused_saying_what_it_is(
        pipeline: Pipeline, body: bytes, code: str, words: str) -> None:
    out = convert_one(pipeline, body)
    assert out.ack_code == "AR" and [i.code for i in out.issues] == [code] and words in out.issues[0].message


@pytest.mark.parametrize("value, kind", [(b'<value xsi:type="BL" value="true"/>', "BL"),
                                         (b'<value xsi:type="ED" mediaType="image/png">iVBORw0KGgo=</value>', "ED")])
def test_a_result_of_a_type_no_lab_value_has_is_refused_naming_it(pipeline: Pipeline, value: bytes, kind: str) -> None:
    """An ED's base64 was stored as the result's text, a BL's value left out as "no value"."""
    out = convert_one(pipeline, SIBLING.replace(UREA_VALUE, value, 1))
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location == f"{LAB}{UREA_ENTRY}/value" and f"of type {kind}" in error.message


def test_a_unit_entry_before_the_first_item_belongs_to_no_item(pipeline: Pipeline) -> None:
    # a one-item section whose 计量单位 entry comes before the 检验项目代码
    start = SIBLING.index(b"<entry>", SIBLING.index(b'code="30954-2"'))
    item = SIBLING.index(b"<entry>\n            <observation classCode=\"OBS\" moodCode=\"EVN\">\n              "
                         b"<code code=\"DE04.30.019.00\"")
    second = SIBLING.index(b'<code code="DE04.30.019.00"', item + 100)
    second = SIBLING.rindex(b"<entry>", 0, second)
    end = SIBLING.index(b"</section>")
    one_item = SIBLING[item:second].replace(UREA_VALUE, b'<value xsi:type="REAL" value="5.4"/></observation>'
                                            b'</entry><entry><observation classCode="OBS" moodCode="EVN">'
                                            b'<code code="DE04.30.021.00"/><value xsi:type="ST">x</value>', 1)
    lead = b"<entry>" + UNIT_ENTRY + b"</entry>"
    out = convert_one(pipeline, SIBLING[:item] + lead + one_item + SIBLING[end:])
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location == f"{LAB}/entry[{SIBLING[start:item].count(b'<entry>') + 1}]/observation"
    assert "计量单位 entry belongs to no 检验项目" in error.message


# -- IVL_PQ results ----------------------------------------------------------------------------------------------


def _urea_value(value: bytes) -> bytes:
    return _urea_with(b"").replace(UREA_PQ, value, 1)


@pytest.mark.parametrize("bounds, comparator, number", [
    (b'<high value="0.05" unit="IU/mL" inclusive="false"/>', "<", "0.05"),
    (b'<high value="0.05" unit="IU/mL"/>', "<=", "0.05"),
    (b'<low value="1000" unit="IU/mL" inclusive="false"/>', ">", "1000"),
    (b'<low nullFlavor="NINF"/><low value="1000" unit="IU/mL"/>', ">=", "1000"),
])
def test_an_open_interval_result_is_a_quantity_with_a_comparator(
        pipeline: Pipeline, bounds: bytes, comparator: str, number: str) -> None:
    out = convert_one(pipeline, _urea_value(b'<value xsi:type="IVL_PQ">' + bounds + b"</value>"))
    assert out.status is Status.CONVERTED, out.issues
    [urea] = [o for o in entries_of(out.bundle, "Observation") if o["code"]["coding"][0]["code"] == "UREA"]
    assert urea["valueQuantity"]["comparator"] == comparator
    assert str(urea["valueQuantity"]["value"]) == number and urea["valueQuantity"]["unit"] == "IU/mL"
    assert "dataAbsentReason" not in urea


def test_a_closed_interval_result_is_a_range(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, _urea_value(b'<value xsi:type="IVL_PQ"><low value="1" unit="mmol/L"/>'
                                            b'<high value="3" unit="mmol/L"/></value>'))
    assert out.status is Status.CONVERTED, out.issues
    [urea] = [o for o in entries_of(out.bundle, "Observation") if o["code"]["coding"][0]["code"] == "UREA"]
    assert str(urea["valueRange"]["low"]["value"]) == "1" and str(urea["valueRange"]["high"]["value"]) == "3"
    assert urea["valueRange"]["high"]["unit"] == "mmol/L"


@pytest.mark.parametrize("value, where, words", [
    (b'<value xsi:type="IVL_PQ"><low value="1" unit="mmol/L" inclusive="false"/><high value="3" unit="mmol/L"/>'
     b'</value>', "/value/low/@inclusive", "excluded one cannot be carried"),
    (b'<value xsi:type="IVL_PQ"><low value="3" unit="mmol/L"/><high value="1" unit="mmol/L"/></value>',
     "/value", "low 3 is above high 1"),
    (b'<value xsi:type="IVL_PQ"><high value="&lt;0.05" unit="mmol/L"/></value>', "/value/high/@value",
     "is not a plain number"),
    (b'<value xsi:type="IVL_PQ"><center value="2" unit="mmol/L"/></value>', "/value/center", "low and/or high"),
    (b'<value xsi:type="IVL_PQ"><low value="1" unit="mmol/L"/><high value="3" unit="mg/dL"/></value>',
     "/value/high/@unit", "contradicts the unit 'mmol/L'"),
])
def test_an_interval_that_cannot_be_carried_is_refused_naming_the_entry(
        pipeline: Pipeline, value: bytes, where: str, words: str) -> None:
    out = convert_one(pipeline, _urea_value(value))
    assert out.status is Status.REFUSED
    [error] = out.errors
    assert error.location == f"{LAB}{UREA_ENTRY}{where}" and words in error.message


# -- profile problems reach the sender as XPaths ------------------------------------------------------------------


def test_profile_problems_are_named_by_xpath(pipeline: Pipeline) -> None:
    female = SIBLING.replace(b'administrativeGenderCode code="1"', b'administrativeGenderCode code="2"')
    out = convert_one(pipeline, female)
    [warning] = [i for i in out.issues if "cyhr-pat-4" in i.message]
    patient = "/ClinicalDocument/recordTarget/patientRole/patient"
    assert warning.location == (f"{patient}/administrativeGenderCode/@code and "
                                f"/ClinicalDocument/recordTarget/patientRole/{patient.rsplit('/', 1)[1]}"
                                "/id[@root='2.16.156.10011.1.3']/@extension")
    assert "do not give a sex agreeing with digit 17 of the 身份证号" in warning.message
    assert warning.extra["fhir_path"] == "Bundle.entry[1].resource"
    nameless = convert_one(pipeline, SIBLING.replace("<name>陈演示</name>".encode(), b"<name> </name>"))
    [error] = nameless.errors
    assert error.location == f"{patient}/name" and error.message == "is empty: the patient's name is required"
    assert "Bundle" not in error.location + error.message


def test_profile_problems_in_a_v3_acknowledgement_name_xpaths(client) -> None:
    nameless = SIBLING.replace("<name>陈演示</name>".encode(), b"<name> </name>")
    resp = client.post("/ingest/cda", data=bare(polb(nameless, "m-noname")), content_type="application/xml")
    code, target, texts = ack(resp.data)
    assert (code, target) == ("AE", "m-noname")
    locations = etree.fromstring(resp.data).xpath("//v3:acknowledgementDetail/v3:location/@value", namespaces=V3)
    assert locations == ["/POLB_IN224000UV01/controlActProcess/subject/observationReport/component/"
                         "ClinicalDocument/recordTarget/patientRole/patient/name"]
    assert not any("Bundle" in t for t in texts)


def test_a_resend_while_the_first_copy_is_worked_is_asked_to_retry(pipeline: Pipeline) -> None:
    from gateway.adapters.base import RawUnit
    from gateway.store.db import transaction

    ch = pipeline.channel("cda")
    with transaction(pipeline.store.db):  # a first copy being worked by a live process (this one)
        first_id, _ = pipeline._insert_raw(ch, RawUnit(SIBLING, 1, "lis"), "http")
    [out] = pipeline.ingest(SIBLING, "cda", channel="http")
    assert out.status is Status.DUPLICATE and out.ack_code == "AE"
    assert f"is being processed now (message {first_id}); retry later" in out.errors[0].message
    assert records(pipeline)[1] == (f"{DOC_ID}#2", "duplicate", "AE")


def test_a_repeat_left_unfinished_is_never_worked_as_a_new_document(pipeline: Pipeline) -> None:
    from gateway.adapters.base import RawUnit
    from gateway.store.db import transaction

    pipeline.ingest(SIBLING, "cda", channel="http")
    ch = pipeline.channel("cda")
    with transaction(pipeline.store.db):  # other content stored, then its process died before recording it
        record_id, _ = pipeline._insert_raw(ch, RawUnit(CHANGED, 1, "lis"), "http")
    pipeline.store.release(record_id)
    assert pipeline.recover() == 0
    assert records(pipeline) == [(DOC_ID, "stored", "AA"), (f"{DOC_ID}#2", "duplicate", None)]
    [urea] = [o for o in entries_of(_stored_bundle(pipeline), "Observation")
              if o["code"]["coding"][0]["code"] == "UREA"]
    assert str(urea["valueQuantity"]["value"]) == "5.4"


# -- documents are read before the write lock is taken -----------------------------------------------------


def _watch_reading(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bool]]:
    """Every document the CDA channel reads to tell it apart: (its bytes, whether a transaction was open)."""
    adapter = pipeline.channel("cda").adapter
    read = adapter.document_key
    seen: list[tuple[bytes, bool]] = []

    def watched(unit):  # type: ignore[no-untyped-def]
        seen.append((unit.data, pipeline.store.db.conn.in_transaction))
        return read(unit)

    monkeypatch.setattr(adapter, "document_key", watched)
    return seen


def test_documents_are_read_outside_the_transaction_and_earlier_copies_never_again(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _watch_reading(pipeline, monkeypatch)
    first = soap11_hip(polb(SIBLING, "m-lock-1"))
    assert pipeline.ingest(first, "cda", channel="http")[0].status is Status.STORED
    # the same document in another wrapper, then other content: each told from the digest kept with the first
    again = bare(polb(SIBLING, "m-lock-2"))
    assert pipeline.ingest(again, "cda", channel="http")[0].status is Status.DUPLICATE
    changed = bare(polb(CHANGED, "m-lock-3"))
    assert pipeline.ingest(changed, "cda", channel="http")[0].status is Status.REFUSED
    assert [data for data, _ in seen] == [first, again, changed]  # the stored copy is never read again
    assert not any(locked for _, locked in seen)
    digests = [r[0] for r in pipeline.store.db.execute("SELECT content_digest FROM messages ORDER BY id")]
    assert digests == [_digest(pipeline, first), _digest(pipeline, again), _digest(pipeline, changed)]
    assert digests[0] == digests[1] != digests[2]


def _digest(pipeline: Pipeline, data: bytes) -> str:
    from gateway.adapters.base import RawUnit

    adapter = pipeline.channel("cda").adapter
    key = CDAAdapter.document_key(adapter, RawUnit(data, 1))
    assert key is not None
    return key.digest


def test_a_copy_stored_without_a_digest_is_read_before_the_transaction(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy stored by an earlier release (no digest kept with it) is read from its raw input, once, before
    the write lock is taken."""
    first = soap11_hip(polb(SIBLING, "m-old-1"))
    pipeline.ingest(first, "cda", channel="http")
    pipeline.store.db.execute("UPDATE messages SET content_digest = NULL")
    seen = _watch_reading(pipeline, monkeypatch)
    again = bare(polb(SIBLING, "m-old-2"))
    [out] = pipeline.ingest(again, "cda", channel="http")
    assert out.status is Status.DUPLICATE and out.ack_code == "AA"
    assert seen == [(again, False), (first, False)]
    assert records(pipeline) == [(DOC_ID, "stored", "AA"), (f"{DOC_ID}#2", "duplicate", "AA")]


def test_an_older_database_gets_the_digest_column(tmp_path) -> None:
    """SQLite only: a file of an earlier release (PostgreSQL databases start at today's layout)."""
    from importlib import resources

    from gateway.store.db import connect
    from gateway.store.store import Store

    path = tmp_path / "older.db"
    db = connect(path)  # the layout core.sql describes, as a database of an earlier release has it
    core = resources.files("gateway.store").joinpath("sql", "sqlite", "core.sql")
    db.conn.executescript(core.read_text(encoding="utf-8"))
    db.conn.execute("INSERT INTO messages (channel, format, received_at, size, sha256, raw, status, updated_at)"
                    " VALUES ('http', 'cda', '2026-11-21T10:00:00', 1, 'x', x'00', 'stored', '2026-11-21T10:00:00')")
    db.conn.close()
    store = Store.open(path)
    try:
        [rec] = store.list_messages()
        assert rec.content_digest is None
        assert "content_digest" in {r[1] for r in store.db.execute("PRAGMA table_info(messages)")}
    finally:
        store.close()
