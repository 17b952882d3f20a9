"""CDA channel, as an outside tester's second round drove it: GBK text under a Latin-1 declaration, a document kept
by another member, result values of other types (ratios, times, integer intervals, unknown types), the code systems
of coded values and of item codes, two relatedDocuments, and reference ranges (one-sided, text beside bounds)."""
from __future__ import annotations

import re
from decimal import Decimal

import pytest

from conftest import DATA, FULING, TONGJIANG
from gateway.fhir import profiles
from gateway.fhir.bundle import entries_of
from gateway.pipeline import Pipeline, Status
from test_cda import convert_one

CDA = DATA / "cda"
FULL = (CDA / "lab-report-full.xml").read_bytes()
CORRECTED = (CDA / "lab-report-corrected.xml").read_bytes()
# K's 检验定量结果 in the full sample, with its IVL_PQ reference range
K_VALUE = b'<value xsi:type="PQ" value="4.12" unit="mmol/L"/>'
K_RANGE = (b'<value xsi:type="IVL_PQ">\n                        <low value="3.5" unit="mmol/L"/>\n'
           b'                        <high value="5.3" unit="mmol/L"/>\n                      </value>')
K_XPATH = ("/ClinicalDocument/component/structuredBody/component[2]/section/entry[7]/organizer/component[4]/"
           "observation")


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


def observation(bundle: dict, code: str) -> dict:
    [found] = [o for o in entries_of(bundle, "Observation") if o["code"]["coding"][0]["code"] == code]
    return found


def with_k_value(value: str) -> bytes:
    doc = FULL.replace(K_VALUE, value.encode("utf-8"), 1)
    assert doc != FULL
    return doc


def test_the_k_value_is_where_these_tests_say() -> None:
    assert FULL.count(K_VALUE) == 1 and FULL.count(K_RANGE) == 1
    assert FULL.index(K_RANGE) > FULL.index(K_VALUE)


# -- A: GBK bytes under a Latin-1 declaration ------------------------------------------------------


@pytest.mark.parametrize("declared", ["ISO-8859-1", "windows-1252", "latin1"])
def test_gbk_text_declared_latin_is_refused_naming_the_declaration(pipeline: Pipeline, declared: str) -> None:
    """Read as declared, 李演示 in GBK became ÀîÑÝÊ¾, stored (over the shared Patient) and signed."""
    data = FULL.decode("utf-8").replace('encoding="UTF-8"', f'encoding="{declared}"').encode("gbk")
    out = convert_one(pipeline, data)
    assert out.bundle is None and out.ack_code == "AR"
    [error] = out.errors
    assert error.code == "structure" and error.location == "/"
    assert declared.lower() in error.message and "XML declaration" in error.message
    assert "GB 18030" in error.message and 'encoding="GB18030"' in error.message
    assert "李演示" not in error.message  # (a patient's name is never echoed)


def test_latin_text_declared_latin_is_still_read(pipeline: Pipeline) -> None:
    """A Latin-1 document whose letters past ASCII stand alone (Hélène Müller) is what it says it is."""
    text = re.sub(r"[^\x00-\x7f]", "x", FULL.decode("utf-8").replace('encoding="UTF-8"', 'encoding="ISO-8859-1"'))
    text = text.replace("<name>xxx</name>", "<name>Hélène Müller</name>", 1)
    out = convert_one(pipeline, text.encode("latin-1"))
    assert out.bundle is not None, [i.line() for i in out.issues]
    assert entries_of(out.bundle, "Patient")[0]["name"] == [{"text": "Hélène Müller"}]


# -- D: a document kept by another member ------------------------------------------------------------


def test_a_document_kept_by_another_member_is_refused_naming_both(pipeline: Pipeline) -> None:
    """This gateway signs what it stores as its own member's reports: another member's document was stored as issued
    by that member and signed by this one, which `gateway verify` then refused."""
    doc = FULL.replace(TONGJIANG.encode(), FULING.encode())
    out = convert_one(pipeline, doc)
    assert out.status is Status.REFUSED and out.bundle is None
    [error] = out.errors
    assert error.location == ("/ClinicalDocument/custodian/assignedCustodian/representedCustodianOrganization/id"
                              "/@extension")
    assert FULING in error.message and TONGJIANG in error.message


def test_a_document_kept_by_another_member_is_taken_at_that_members_gateway(tmp_path, clock) -> None:
    from gateway.config import load_settings

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": FULING,
                                                    "issuer_name": "重庆市涪陵中心医院（演示）"})
    fuling = Pipeline(settings, clock=clock)
    try:
        out = convert_one(fuling, FULL.replace(TONGJIANG.encode(), FULING.encode()))
    finally:
        fuling.close()
    assert out.status is Status.CONVERTED
    assert entries_of(out.bundle, "Organization")[0]["identifier"][0]["value"] == FULING


# -- B: result values of other types -----------------------------------------------------------------


@pytest.mark.parametrize("value, ratio", [
    ('<value xsi:type="RTO_INT_INT"><numerator value="1"/><denominator value="320"/></value>', (1, 320)),
    ('<value xsi:type="RTO_PQ_PQ"><numerator value="1" unit="1"/><denominator value="80"/></value>', (1, 80)),
    ('<value xsi:type="RTO"><numerator xsi:type="INT" value="1"/><denominator xsi:type="INT" value="40"/></value>',
     (1, 40)),
])
def test_a_ratio_result_is_a_value_ratio(pipeline: Pipeline, value: str, ratio: tuple[int, int]) -> None:
    """A titre (1:320) was stored as "no value", with the false warning "result has no value"."""
    out = convert_one(pipeline, with_k_value(value))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    k = observation(out.bundle, "K")
    assert k["valueRatio"] == {"numerator": {"value": Decimal(ratio[0])}, "denominator": {"value": Decimal(ratio[1])}}
    assert "dataAbsentReason" not in k and "valueQuantity" not in k
    assert not any("no value" in i.message for i in out.issues)
    assert profiles.validate(out.bundle) == []


def test_a_unit_beside_a_ratio_is_said_to_be_left_out(pipeline: Pipeline) -> None:
    """A 计量单位 nested in a titre's 检验定量结果: a ratio of numbers carries no unit, so the sender is told."""
    nested = ('<entryRelationship typeCode="COMP"><observation classCode="OBS" moodCode="EVN">'
              '<code code="DE04.30.016.00" codeSystem="2.16.156.10011.2.2.1"/><value xsi:type="ST">mmol/L</value>'
              '</observation></entryRelationship>')
    doc = with_k_value('<value xsi:type="RTO_INT_INT"><numerator value="1"/><denominator value="320"/></value>'
                       + nested)
    out = convert_one(pipeline, doc)
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    assert "valueRatio" in observation(out.bundle, "K")
    [warning] = [i for i in out.issues if "left out" in i.message and "mmol/L" in i.message]
    assert warning.severity == "warning" and "ratio" in warning.message


@pytest.mark.parametrize("value, where, words", [
    ('<value xsi:type="RTO_INT_INT"><numerator value="1"/></value>', "/value", "denominator"),
    ('<value xsi:type="RTO_INT_INT"><numerator value="1"/><denominator value="0"/></value>',
     "/value/denominator/@value", "zero"),
    ('<value xsi:type="RTO_INT_INT"><numerator value="1:"/><denominator value="320"/></value>',
     "/value/numerator/@value", "not a number"),
    ('<value xsi:type="RTO_PQ_PQ"><numerator value="1" unit="mg"/><denominator value="2" unit="dL"/></value>',
     "/value/numerator/@unit", "unit"),
])
def test_a_ratio_that_cannot_be_carried_is_refused_naming_it(pipeline: Pipeline, value: str, where: str,
                                                             words: str) -> None:
    out = convert_one(pipeline, with_k_value(value))
    assert out.status is Status.REFUSED
    assert [(i.location, words in i.message) for i in out.errors] == [(K_XPATH + where, True)]


def test_a_time_result_is_a_value_date_time(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, with_k_value('<value xsi:type="TS" value="20241105"/>'))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    assert observation(out.bundle, "K")["valueDateTime"] == "2024-11-05"
    assert not any("no value" in i.message for i in out.issues)
    out = convert_one(pipeline, with_k_value('<value xsi:type="TS" value="202411051230"/>'))
    assert observation(out.bundle, "K")["valueDateTime"] == "2024-11-05T12:30:00+08:00"
    assert profiles.validate(out.bundle) == []
    bad = convert_one(pipeline, with_k_value('<value xsi:type="TS" value="20241305"/>'))
    assert bad.status is Status.REFUSED and [i.location for i in bad.errors] == [K_XPATH + "/value/@value"]


@pytest.mark.parametrize("value, expected", [
    ('<value xsi:type="IVL_INT"><low value="2"/><high value="5"/></value>',
     {"valueRange": {"low": {"value": Decimal(2)}, "high": {"value": Decimal(5)}}}),
    ('<value xsi:type="IVL_INT"><high value="10" inclusive="false"/></value>',
     {"valueQuantity": {"value": Decimal(10), "comparator": "<"}}),
])
def test_an_integer_interval_result_is_read_as_an_ivl_pq_without_unit(
        pipeline: Pipeline, value: str, expected: dict) -> None:
    out = convert_one(pipeline, with_k_value(value))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    k = observation(out.bundle, "K")
    assert {key: v for key, v in k.items() if key.startswith("value")} == expected
    assert profiles.validate(out.bundle) == []


@pytest.mark.parametrize("value", ['<value xsi:type="FOO" value="7"/>', '<value xsi:type="FOO">7</value>',
                                   '<value xsi:type="IVL_TS"><low value="20241105"/></value>'])
def test_a_result_of_a_type_not_known_is_refused_naming_the_value(pipeline: Pipeline, value: str) -> None:
    out = convert_one(pipeline, with_k_value(value))
    assert out.status is Status.REFUSED
    assert [i.location for i in out.errors] == [K_XPATH + "/value"]
    assert value.split('"')[1] in out.errors[0].message


def test_a_null_flavored_value_of_any_type_has_no_value_as_said(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, with_k_value('<value xsi:type="RTO_INT_INT" nullFlavor="NAV"/>'))
    assert out.status is Status.CONVERTED
    assert observation(out.bundle, "K")["dataAbsentReason"]["coding"][0]["code"] == "temp-unknown"


# -- C: code systems of coded values and item codes --------------------------------------------------


def test_a_coded_value_keeps_its_code_system_and_translations(pipeline: Pipeline) -> None:
    value = ('<value xsi:type="CD" code="260385009" codeSystem="2.16.840.1.113883.6.96" displayName="Negative">'
             '<translation code="NEG" codeSystem="2.16.156.10011.2.3.2.38" displayName="阴性"/>'
             '<translation code="LA6577-6" codeSystem="2.16.840.1.113883.6.1"/></value>')
    out = convert_one(pipeline, with_k_value(value))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    assert observation(out.bundle, "K")["valueCodeableConcept"] == {
        "coding": [{"system": "http://snomed.info/sct", "code": "260385009", "display": "Negative"},
                   {"system": "urn:oid:2.16.156.10011.2.3.2.38", "code": "NEG", "display": "阴性"},
                   {"system": "http://loinc.org", "code": "LA6577-6"}],
        "text": "Negative"}
    assert profiles.validate(out.bundle) == []
    ucum = with_k_value('<value xsi:type="CE" code="mmol/L" codeSystem="2.16.840.1.113883.6.8"/>')
    assert observation(convert_one(pipeline, ucum).bundle, "K")["valueCodeableConcept"]["coding"] == [
        {"system": "http://unitsofmeasure.org", "code": "mmol/L"}]


def test_a_coded_value_given_only_by_its_translation_is_read(pipeline: Pipeline) -> None:
    value = ('<value xsi:type="CD" nullFlavor="OTH"><translation code="NEG" codeSystem="2.16.156.10011.2.3.2.38" '
             'displayName="阴性"/></value>')
    out = convert_one(pipeline, with_k_value(value))
    assert out.status is Status.CONVERTED
    assert observation(out.bundle, "K")["valueCodeableConcept"] == {
        "coding": [{"system": "urn:oid:2.16.156.10011.2.3.2.38", "code": "NEG", "display": "阴性"}], "text": "阴性"}


def _item_code(code: str, system: str, display: str = "", translation: str = "") -> bytes:
    old = b'<value xsi:type="ST">GLU</value>'
    new = f'<value xsi:type="CD" code="{code}" codeSystem="{system}" displayName="{display}">{translation}</value>'
    doc = FULL.replace(old, new.encode("utf-8"), 1)
    assert doc != FULL
    return doc


def test_an_item_code_in_loinc_is_kept_as_the_senders_code_and_as_loinc(pipeline: Pipeline) -> None:
    """A 检验项目代码 in the LOINC code system, as HL7 v2 reads LN in OBX-3: the sender's own code first (our profile
    wants it), then the http://loinc.org coding; it was warned of as an unmapped local code."""
    out = convert_one(pipeline, _item_code("2345-7", "2.16.840.1.113883.6.1", "Glucose"))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    glucose = observation(out.bundle, "2345-7")
    assert glucose["code"]["coding"] == [
        {"system": f"https://fhir.cyhr.org.cn/sid/local-item/{TONGJIANG}", "code": "2345-7", "display": "Glucose"},
        {"system": "http://loinc.org", "code": "2345-7"}]
    assert not any("2345-7" in i.message for i in out.issues)
    assert profiles.validate(out.bundle) == []


def test_an_item_code_in_loinc_with_a_wrong_check_digit_stays_local(pipeline: Pipeline) -> None:
    out = convert_one(pipeline, _item_code("2345-6", "2.16.840.1.113883.6.1", "Glucose"))
    assert out.status is Status.CONVERTED
    assert [c["system"] for c in observation(out.bundle, "2345-6")["code"]["coding"]] == [
        f"https://fhir.cyhr.org.cn/sid/local-item/{TONGJIANG}"]
    [warning] = [i for i in out.issues if "2345-6" in i.message and "check digit" in i.message]
    assert warning.severity == "warning" and warning.location.startswith("/ClinicalDocument/")
    assert warning.location.endswith("/observation/value")


def test_an_item_codes_loinc_translation_is_its_loinc(pipeline: Pipeline) -> None:
    translation = '<translation code="2345-7" codeSystem="2.16.840.1.113883.6.1"/>'
    out = convert_one(pipeline, _item_code("GLU", "2.16.156.10011.99", "葡萄糖", translation))
    assert out.status is Status.CONVERTED
    codings = observation(out.bundle, "GLU")["code"]["coding"]
    assert codings[0]["code"] == "GLU" and codings[1]["system"] == "http://loinc.org"
    # the table's LOINC for GLU (14749-6) is kept over the sender's, and the sender told
    assert codings[1]["code"] == "14749-6"
    assert any("2345-7" in i.message and "14749-6" in i.message for i in out.issues)


# -- E: two relatedDocuments ---------------------------------------------------------------------------


def test_two_related_documents_are_refused_naming_the_second(pipeline: Pipeline) -> None:
    """The replaced 检验报告单号 was taken from the second relatedDocument, the 文档流水号 from the first."""
    start = CORRECTED.index(b"<relatedDocument")
    end = CORRECTED.index(b"</relatedDocument>") + len(b"</relatedDocument>")
    second = CORRECTED[start:end].replace(b"TJRMYY-JY-20241105-000123", b"TJRMYY-JY-20241105-000999").replace(
        b"<versionNumber", b'<id root="2.16.156.10011.1.33" extension="JY999"/><versionNumber')
    out = convert_one(pipeline, CORRECTED[:end] + b"\n  " + second + CORRECTED[end:])
    assert out.status is Status.REFUSED
    assert [i.location for i in out.errors] == ["/ClinicalDocument/relatedDocument[2]"]
    assert "/ClinicalDocument/relatedDocument[1]" in out.errors[0].message


# -- F: reference ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize("bounds, text, low, high", [
    ('<low value="3.9" unit="mmol/L"/>', "≥3.9", Decimal("3.9"), None),
    ('<low value="3.9" unit="mmol/L" inclusive="false"/>', ">3.9", Decimal("3.9"), None),
    ('<high value="5.3" unit="mmol/L"/>', "≤5.3", None, Decimal("5.3")),
    ('<high value="5.3" unit="mmol/L" inclusive="true"/>', "≤5.3", None, Decimal("5.3")),
    ('<high value="5.3" unit="mmol/L" inclusive="false"/>', "<5.3", None, Decimal("5.3")),
    ('<low value="3.5" unit="mmol/L"/><high value="5.3" unit="mmol/L"/>', "3.5-5.3", Decimal("3.5"), Decimal("5.3")),
    # (an excluded bound of two: a FHIR range includes its bounds, so it is said in the text alone)
    ('<low value="3.5" unit="mmol/L" inclusive="false"/><high value="5.3" unit="mmol/L"/>', ">3.5, ≤5.3", None, None),
])
def test_a_one_sided_range_says_whether_its_bound_is_included(pipeline: Pipeline, bounds: str, text: str,
                                                              low: Decimal | None, high: Decimal | None) -> None:
    """HL7 v3 bounds are inclusive unless said otherwise: <low value="3.9"/> is ≥3.9 (it was ">3.9")."""
    doc = FULL.replace(K_RANGE, f'<value xsi:type="IVL_PQ">{bounds}</value>'.encode(), 1)
    out = convert_one(pipeline, doc)
    assert out.status is Status.CONVERTED
    [rng] = observation(out.bundle, "K")["referenceRange"]
    assert rng["text"] == text
    assert (rng.get("low", {}).get("value"), rng.get("high", {}).get("value")) == (low, high)


def test_a_range_text_disagreeing_with_its_bounds_keeps_the_bounds_and_says_so(pipeline: Pipeline) -> None:
    """Text 3.9-6.1 beside bounds 4.0-7.0: the bounds were dropped without a word."""
    both = ('<text>3.9-6.1</text><value xsi:type="IVL_PQ"><low value="4.0" unit="mmol/L"/>'
            '<high value="7.0" unit="mmol/L"/></value>')
    out = convert_one(pipeline, FULL.replace(K_RANGE, both.encode(), 1))
    assert out.status is Status.CONVERTED
    [rng] = observation(out.bundle, "K")["referenceRange"]
    assert (rng["low"]["value"], rng["high"]["value"]) == (Decimal("4.0"), Decimal("7.0"))
    [warning] = [i for i in out.issues if "3.9-6.1" in i.message]
    assert warning.severity == "warning" and warning.location == K_XPATH + "/referenceRange/observationRange"
    assert "'3.9-6.1' (its text)" in warning.message and "'4.0-7.0' (its IVL_PQ value)" in warning.message
    assert "'4.0-7.0' is kept" in warning.message
    agreeing = both.replace("4.0", "3.9").replace("7.0", "6.1")
    out = convert_one(pipeline, FULL.replace(K_RANGE, agreeing.encode(), 1))
    assert observation(out.bundle, "K")["referenceRange"][0]["text"] == "3.9-6.1"
    assert not any("3.9-6.1" in i.message for i in out.issues)
