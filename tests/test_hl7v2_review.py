"""HL7 v2 shapes senders send that once lost a report or went by without a word: two OBR groups with one
OBR-3, an OBR group without OBX, LOINC and SNOMED CT written in the ways LIS systems write them, and times
no report can have (a patient born after the collection, a collection after the message was sent)."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from conftest import TONGJIANG
from gateway.fhir.bundle import entries_of
from gateway.fhir.parties import stable_id
from gateway.fhir.profiles import load_guide
from gateway.identifiers import id_card_check_char
from gateway.naming import SYSTEM_LAB_REPORT_NO, SYSTEM_LOINC
from gateway.pipeline import Pipeline, Status

LOCAL = f"https://fhir.cyhr.org.cn/sid/local-item/{TONGJIANG}"
SCT = "http://snomed.info/sct"
ID_CARD = "511921196612120011"


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


def er7(*segments: str, version: str = "2.5.1", control: str = "R17-0001", msh7: str = "20261204090000+0800",
        pid: str = f"PID|1||{ID_CARD}^^^^NNCHN||王^建国||19661212|M") -> bytes:
    msh = (f"MSH|^~\\&|LIS|TJXRMYY|GATEWAY|CYHR|{msh7}||ORU^R01^ORU_R01|{control}|P|{version}|||AL|NE||"
           "UNICODE UTF-8")
    return ("\r".join([msh, pid, *segments]) + "\r").encode("utf-8")


def obr(n: int = 1, number: str = "R17-01", service: str = "LIVER^肝功能^L", collected: str = "20261204073000+0800",
        issued: str = "20261204082500+0800") -> str:
    return f"OBR|{n}|O{number}|{number}|{service}|||{collected}|||||||||||||||{issued}|||F"


def obx(n: int = 1, code: str = "ALT^丙氨酸氨基转移酶^L", value: str = "36", vtype: str = "NM", unit: str = "U/L",
        observed: str = "") -> str:
    return f"OBX|{n}|{vtype}|{code}||{value}|{unit}|9-50|N|||F|||{observed}"


def convert(pipeline: Pipeline, data: bytes) -> Any:
    outcomes = list(pipeline.convert(data, "hl7v2", "test"))
    assert len(outcomes) == 1
    return outcomes[0]


def segments(outcome: Any, name: str) -> list[str]:
    return [s for s in outcome.answer.decode("utf-8").split("\r") if s.startswith(name)]


def msa3(outcome: Any) -> str:
    return segments(outcome, "MSA")[0].split("|")[3]


def codings(concept: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c.get("system", ""), c["code"]) for c in concept["coding"]]


# -- two OBR groups with one OBR-3 ---------------------------------------------------------------

# A LIS that uses the specimen barcode as filler number: 肝功能 and 血脂 from one tube, one OBR-3.
SAME_NUMBER = er7(
    obr(1, "RSAME01", "LIVER^肝功能^L"), obx(1, "ALT^丙氨酸氨基转移酶^L", "36"),
    obr(2, "RSAME01", "LIPID^血脂^L"), obx(1, "TC^总胆固醇^L", "5.62", unit="mmol/L"),
    control="SAMEOBR3-01")


def test_two_obr_groups_with_one_obr_3_keep_both_reports(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, SAME_NUMBER)
    assert outcome.status is Status.CONVERTED and outcome.ack_code == "AA", outcome.issues
    urls = [e["fullUrl"] for e in outcome.bundle["entry"]]
    assert len(urls) == len(set(urls))
    reports = entries_of(outcome.bundle, "DiagnosticReport")
    assert [r["code"]["coding"][0]["code"] for r in reports] == ["LIVER", "LIPID"]
    # the 检验报告单号 stays as sent on both
    assert [[(i["system"], i["value"]) for i in r["identifier"]] for r in reports] == \
        [[(SYSTEM_LAB_REPORT_NO, "RSAME01")]] * 2
    # each report points at its own result, and each result is in one report
    by_id = {f"urn:uuid:{o['id']}": o for o in entries_of(outcome.bundle, "Observation")}
    assert [[by_id[ref["reference"]]["code"]["coding"][0]["code"] for ref in r["result"]] for r in reports] == \
        [["ALT"], ["TC"]]


def test_a_number_used_once_keeps_the_resource_ids_it_always_had(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, "RSAME01"), obx()))
    assert entries_of(outcome.bundle, "DiagnosticReport")[0]["id"] == \
        stable_id("DiagnosticReport", TONGJIANG, "RSAME01")
    shared = convert(pipeline, SAME_NUMBER)
    assert all(r["id"] != stable_id("DiagnosticReport", TONGJIANG, "RSAME01")
               for r in entries_of(shared.bundle, "DiagnosticReport"))


def test_a_correction_of_two_groups_with_one_obr_3_gives_each_its_own_new_version(pipeline: Pipeline) -> None:
    corrected = SAME_NUMBER.replace(b"|||F\r", b"|||C\r").replace(b"SAMEOBR3-01", b"SAMEOBR3-02")
    original = convert(pipeline, SAME_NUMBER)
    correction = convert(pipeline, corrected)
    assert correction.status is Status.CONVERTED, correction.issues
    old = {r["id"] for r in entries_of(original.bundle, "DiagnosticReport")}
    new = entries_of(correction.bundle, "DiagnosticReport")
    assert len({r["id"] for r in new}) == 2 and not old & {r["id"] for r in new}
    assert [r["status"] for r in new] == ["corrected", "corrected"]
    assert [r["extension"][0]["valueIdentifier"]["value"] for r in new] == ["RSAME01", "RSAME01"]


def test_two_obr_groups_with_one_obr_3_and_one_obr_4_are_refused_naming_the_second(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, "RSAME01"), obx(), obr(2, "RSAME01"), obx(1, "AST^天门冬氨酸氨基转移酶^L")))
    assert outcome.status is Status.REFUSED and outcome.ack_code == "AE"
    assert msa3(outcome).startswith("OBR[2]-3 检验报告单号 'RSAME01' is the one of OBR[1]")
    assert segments(outcome, "ERR")[0].startswith("ERR||OBR^2^3|205^")


def test_a_bundle_with_two_entries_of_one_full_url_is_refused_not_signed(settings: Any, clock: Any) -> None:
    guide = load_guide(settings.profiles_dir)
    pipe = Pipeline(settings, clock=clock)
    try:
        good = convert(pipe, er7(obr(), obx())).bundle
    finally:
        pipe.close()
    twice = copy.deepcopy(good)
    twice["entry"].append(copy.deepcopy(twice["entry"][-1]))
    found = [i for i in guide.validate(twice) if i.severity == "error"]
    assert [(i.location, i.extra.get("rule")) for i in found] == [(f"Bundle.entry[{len(good['entry'])}].fullUrl",
                                                                   "bdl-7")]
    assert "is also the one of entry" in found[0].message
    assert not [i for i in guide.validate(good) if i.severity == "error"]

    def checker(bundle: dict[str, Any]) -> list[Any]:  # a build that gave two reports one identity
        broken = copy.deepcopy(bundle)
        broken["entry"][-1]["fullUrl"] = broken["entry"][-2]["fullUrl"]
        return guide.validate(broken)

    pipe = Pipeline(settings, clock=clock, checker=checker)
    try:
        two_reports = er7(obr(1, "R17-01"), obx(), obr(2, "R17-02", "LIPID^血脂^L"), obx(1, "TC^总胆固醇^L", "5.62"))
        outcome = list(pipe.ingest(two_reports, "hl7v2", channel="test"))[0]
        assert outcome.status is Status.REFUSED and outcome.ack_code == "AE" and outcome.signed is None
        assert outcome.errors[0].line().startswith(
            "OBR[2]-3 and OBR[2]-4 do not give an identity of its own to each report (检验报告单号, then OBR-4): "
            "fails bdl-7: its fullUrl")
        assert "Bundle.entry" not in outcome.answer.decode("utf-8")
        assert pipe.store.counts() == {"refused": 1}
    finally:
        pipe.close()


# -- an OBR group without OBX --------------------------------------------------------------------


@pytest.mark.parametrize("version,err", [
    ("2.5.1", "ERR||OBX^^3|101^Required field missing^HL70357|E||||OBR[1] has no OBX: at least one result is required"),
    ("2.3.1", "ERR|OBX^^3^101&Required field missing&HL70357"),
])
def test_an_obr_without_obx_is_refused_naming_the_obr_and_obx_3(pipeline: Pipeline, version: str, err: str) -> None:
    outcome = convert(pipeline, er7(obr(), version=version))
    assert outcome.ack_code == "AE"
    assert msa3(outcome) == "OBR[1] has no OBX: at least one result is required"
    assert segments(outcome, "ERR") == [err]


def test_the_second_obr_group_without_obx_is_the_one_named(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, "R17-01"), obx(), obr(2, "R17-02", "LIPID^血脂^L"),
                                    "NTE|1||标本溶血，未检测"))
    assert outcome.ack_code == "AE"
    assert [i.line() for i in outcome.errors] == ["OBR[2] has no OBX: at least one result is required"]


def test_a_comment_on_the_report_before_its_results_is_a_note_of_each_result(pipeline: Pipeline) -> None:
    """NTE after the OBR, before any OBX: a comment on the whole report (specimen haemolysed). It was left out
    without a word; now each result of the group carries it, before its own comments. A comment after one OBX
    stays that result's; NTE-3 repetitions are lines of one comment, not text with a '~' in it."""
    outcome = convert(pipeline, er7(obr(1, "R17-01"), "NTE|1|L|标本溶血，\\.br\\结果仅供参考",
                                    obx(1), obx(2, "AST^天门冬氨酸氨基转移酶^L", "28"), "NTE|1|L|复查~已核对",
                                    obr(2, "R17-02", "LIPID^血脂^L"), obx(1, "TC^总胆固醇^L", "5.1", unit="mmol/L")))
    assert outcome.ack_code == "AA", outcome.issues
    notes = {o["code"]["coding"][0]["code"]: [n["text"] for n in o.get("note", [])] for o in observations(outcome)}
    assert notes == {"ALT": ["标本溶血，\n结果仅供参考"], "AST": ["标本溶血，\n结果仅供参考", "复查\n已核对"], "TC": []}


def test_an_escape_of_bytes_that_are_no_text_in_the_message_charset_is_said(pipeline) -> None:
    """``\\XD6D0\\`` (中 in GBK) in a message declared UTF-8: read byte by byte it was stored as ``ÖÐ`` with an AA
    and no word. It is read so still (``\\XFC\\`` is how some senders write ü), with a warning naming the field
    and what it was read as; an escape of UTF-8 text reads as that text, without one."""
    outcome = convert(pipeline, er7(obr(1, "R17-01"), obx(1), obx(2, "NOTE^备注^L", "结果\\XD6D0\\文本", "ST", ""),
                                    obx(3, "NOTE2^备注二^L", "\\XE5BBBAE59BBD\\", "ST", "")))
    assert outcome.ack_code == "AA", outcome.issues
    values = {o["code"]["coding"][0]["code"]: o.get("valueString") for o in observations(outcome)}
    assert values["NOTE"] == "结果ÖÐ文本" and values["NOTE2"] == "建国"
    [said] = [i for i in outcome.issues if "XD6D0" in i.message]
    assert said.severity == "warning" and said.location == "OBX[2]-5" and "UTF-8" in said.message
    assert "'ÖÐ'" in said.message
    assert not [i for i in outcome.issues if "XE5BBBA" in i.message]


def test_a_value_that_is_no_structured_numeric_is_quoted_as_sent(pipeline: Pipeline) -> None:
    """OBX-2 SN with OBX-5 'abc': the error quoted '' (the empty second component), not what was sent."""
    outcome = convert(pipeline, er7(obr(1, "R17-01"), obx(1, value="abc", vtype="SN")))
    assert outcome.ack_code == "AE"
    assert [i.line() for i in outcome.errors] == [
        "OBX[1]-5 'abc' is not a value of type SN (written comparator^number, e.g. <^0.05 or ^6.8)"]


def test_a_coded_value_sent_twice_in_the_senders_own_systems_is_one_coding(pipeline: Pipeline) -> None:
    """OBX-5 ``A^A型^L^A^A^99ABO``: both triplets are the sender's own code A (two local system names): one coding,
    not the same code twice in one system with two displays. A standard alternate (SNOMED CT) is still kept."""
    outcome = convert(pipeline, er7(obr(1, "R17-01"), obx(1, "ABO^血型^L", "A^A型^L^A^A^99ABO", "CE", ""),
                                    obx(2, "RH^Rh血型^L", "POS^阳性^L^10828004^Positive^SCT", "CE", "")))
    assert outcome.ack_code == "AA", outcome.issues
    codings = {o["code"]["coding"][0]["code"]: o["valueCodeableConcept"]["coding"] for o in observations(outcome)}
    assert codings["ABO"] == [{"system": LOCAL, "code": "A", "display": "A型"}]
    assert codings["RH"] == [{"system": LOCAL, "code": "POS", "display": "阳性"},
                             {"system": SCT, "code": "10828004", "display": "Positive"}]


# -- LOINC and SNOMED CT as senders write them ---------------------------------------------------


def observations(outcome: Any) -> list[dict[str, Any]]:
    assert outcome.status is Status.CONVERTED, outcome.issues
    return entries_of(outcome.bundle, "Observation")


def warnings(outcome: Any) -> list[str]:
    return [i.line() for i in outcome.issues if i.severity == "warning"]


def test_a_loinc_with_a_leading_zero_is_read_without_it(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, service="BLRT^血常规^L"),
                                    obx(1, "0718-7^Hb leading zero^LN", "139", unit="g/L")))
    assert codings(observations(outcome)[0]["code"]) == [(LOCAL, "0718-7"), (SYSTEM_LOINC, "718-7")]
    assert "OBX[1]-3 sends LOINC '0718-7': LOINC codes have no leading zeros; taken as '718-7'" in warnings(outcome)


def test_two_different_loinc_keep_the_first_and_say_so(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, service="BLRT^血常规^L"),
                                    obx(1, "6690-2^WBC^LN^26464-8^WBC alt^LN", "6.9", unit="10*9/L"),
                                    obx(2, "6690-2^WBC^LN^6690-2^Leukocytes^LN", "6.9", unit="10*9/L")))
    first, same = observations(outcome)
    assert codings(first["code"]) == [(LOCAL, "6690-2"), (SYSTEM_LOINC, "6690-2")]
    assert codings(same["code"]) == [(LOCAL, "6690-2"), (SYSTEM_LOINC, "6690-2")]
    assert [w for w in warnings(outcome) if "two LOINC" in w] == [
        "OBX[1]-3 sends two LOINC codes, '6690-2' and '26464-8' (the alternate); '6690-2' is kept"]


def test_a_loinc_only_in_the_alternate_triplet_is_taken_as_a_loinc_only_first_triplet(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, service="BLRT^血常规^L"), obx(1, "^^^4544-3^Hct^LN", "43", unit="%"),
                                    obx(2, "4544-3^Hct^LN", "43", unit="%")))
    alternate_only, first_only = observations(outcome)
    assert codings(alternate_only["code"]) == codings(first_only["code"]) == \
        [(LOCAL, "4544-3"), (SYSTEM_LOINC, "4544-3")]


@pytest.mark.parametrize("name", ["SCT", "SNM", "SNOMEDCT"])
def test_snomed_ct_beside_a_local_code_is_kept_and_the_local_code_has_its_system(pipeline: Pipeline,
                                                                                 name: str) -> None:
    outcome = convert(pipeline, er7(
        obr(1, service="BLRT^血常规^L^57021-8^CBC W Auto Differential panel - Blood^LN"),
        obx(1, f"ALT^丙氨酸氨基转移酶^L^250637003^Alanine aminotransferase measurement^{name}", "36"),
        obx(2, "HBSAG^乙肝表面抗原^L", f"NEG^阴性^L^260385009^Negative^{name}", vtype="CWE", unit="")))
    alt, hbsag = observations(outcome)
    assert codings(alt["code"])[0] == (LOCAL, "ALT") and (SCT, "250637003") in codings(alt["code"])
    assert hbsag["valueCodeableConcept"] == {"coding": [{"system": LOCAL, "code": "NEG", "display": "阴性"},
                                                        {"system": SCT, "code": "260385009", "display": "Negative"}],
                                             "text": "阴性"}
    # OBR-4's alternate LOINC goes into the report's code as OBX-3's does
    report = entries_of(outcome.bundle, "DiagnosticReport")[0]
    assert codings(report["code"]) == [(LOCAL, "BLRT"), (SYSTEM_LOINC, "57021-8")]


# -- times no report can have --------------------------------------------------------------------


def newborn_pid(birth: str) -> str:
    base = f"511921{birth}001"
    return f"PID|1||{base}{id_card_check_char(base)}^^^^NNCHN||王^宝宝||{birth}|M"


def test_a_patient_born_after_the_collection_is_refused_naming_pid_7_and_obr_7(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, collected="20261119073000+0800", issued="20261120082500+0800"),
                                    obx(1, "WBC^白细胞计数^L", "6.8", unit="10*9/L"),
                                    msh7="20261120083000+0800", pid=newborn_pid("20261120")))
    assert outcome.ack_code == "AE"
    assert msa3(outcome).startswith("PID[1]-7 and OBR[1]-7 birth date 2026-11-20 is after the collection time")
    assert segments(outcome, "ERR")[0].startswith("ERR||PID^1^7|102^")
    born_that_day = convert(pipeline, er7(obr(1, collected="20261120073000+0800"), obx(), control="R17-0002",
                                          msh7="20261120083000+0800", pid=newborn_pid("20261120")))
    assert born_that_day.ack_code == "AA", born_that_day.issues


@pytest.mark.parametrize("where,data", [
    ("OBR[1]-7", er7(obr(1, collected="20361204073000+0800"), obx())),
    ("SPM[1]-17", er7(obr(1), obx(), "SPM|1|S17-01||SER^血清^HL70487|||||||P^Patient^HL70369||||||"
                                     "20261206093000+0800|20261206093500+0800")),
    ("OBX[1]-14", er7(obr(1), obx(observed="20261206073000+0800"))),
])
def test_a_collection_after_the_message_time_is_refused_naming_its_field(pipeline: Pipeline, where: str,
                                                                         data: bytes) -> None:
    outcome = convert(pipeline, data)
    assert outcome.ack_code == "AE"
    assert msa3(outcome).startswith(f"{where} collection time ")
    assert "is later than the message time 2026-12-04T09:00:00+08:00 (MSH-7)" in outcome.errors[0].message


def test_a_clock_hours_off_is_a_warning_not_a_refusal(pipeline: Pipeline) -> None:
    """An analyser whose clock is set wrong by hours still measured a real sample: kept, and the sender told."""
    outcome = convert(pipeline, er7(obr(1, collected="20261204123000+0800", issued="20261204124500+0800"), obx()))
    assert outcome.ack_code == "AA", outcome.issues
    assert any(w.startswith("OBR[1]-7 collection time 2026-12-04T12:30:00+08:00 is later than the message time")
               and "check the clocks" in w for w in warnings(outcome))


def test_a_few_minutes_of_clock_difference_are_taken(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, collected="20261204090500+0800", issued="20261204090600+0800"), obx()))
    assert outcome.ack_code == "AA", outcome.issues


def test_an_issue_time_before_the_collection_is_a_warning(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, er7(obr(1, collected="20261204073000+0800", issued="20261203082500+0800"), obx()))
    assert outcome.status is Status.CONVERTED and outcome.ack_code == "AA"
    assert warnings(outcome) == ["OBR[1]-22 report issue time 2026-12-03T08:25:00+08:00 is before the collection "
                                 "time 2026-12-04T07:30:00+08:00 (OBR[1]-7); kept as sent"]
    assert any(s.startswith("ERR||OBR^1^22|102^") and s.split("|")[4] == "W" for s in segments(outcome, "ERR"))


def spm(collected: str, received: str) -> str:
    return f"SPM|1|S17-01||SER^血清^HL70487|||||||P^Patient^HL70369||||||{collected}|{received}"


@pytest.mark.parametrize("collected, received, where, said", [
    # SPM-18 before SPM-17, to the minute
    ("20261204073000+0800", "20261204072000+0800", "SPM[1]-17",
     "at 2026-12-04T07:20:00+08:00, before it was collected at 2026-12-04T07:30:00+08:00 (SPM[1]-17):"),
    # a received day before the collected day, one of them without a time
    ("20261204073000+0800", "20261203", "SPM[1]-17", "at 2026-12-03, before it was collected at 2026-12-04T07:30"),
    # the same instant in another offset is not before
    ("20261204073000+0800", "20261203233500+0000", "", ""),
    # a received date without a time on the collected day is not before
    ("20261204073000+0800", "20261204", "", ""),
    # a month only may be any day of it: all of November is before; December may not be
    ("20261204073000+0800", "202611", "SPM[1]-17", "at 2026-11, before it was collected at 2026-12-04T07:30"),
    ("20261204073000+0800", "202612", "", ""),
    # the last year a date holds (its end cannot be counted past): after, and read without a fault
    ("20261204073000+0800", "9999", "", ""),
    # a time sent to the minute or the hour is all of it: 08:00 may be 08:00:45
    ("20261204080030+0800", "202612040800+0800", "", ""),
    ("20261204083000+0800", "2026120408+0800", "", ""),
    ("20261204080030+0800", "202612040759+0800", "SPM[1]-17", "at 2026-12-04T07:59:00+08:00, before it was "
                                                              "collected at 2026-12-04T08:00:30+08:00"),
    # a time in another offset against a day: 23:35 UTC on the 3rd is 07:35 on the 4th in Beijing time
    ("20261204", "20261203233500+0000", "", ""),
    ("20261204", "20261203153000+0000", "SPM[1]-17", "at 2026-12-03T15:30:00+00:00, before it was collected at "
                                                     "2026-12-04 (SPM[1]-17)"),
])
def test_a_specimen_received_before_it_was_collected_is_a_warning(pipeline: Pipeline, collected: str, received: str,
                                                                  where: str, said: str) -> None:
    """SPM-18 before SPM-17: kept as sent (which is wrong cannot be told), the sender told at SPM-18."""
    outcome = convert(pipeline, er7(obr(1), obx(), spm(collected, received)))
    assert outcome.ack_code == "AA", outcome.issues
    if not said:
        assert not [w for w in warnings(outcome) if "received in the laboratory" in w], warnings(outcome)
        return
    [warning] = [w for w in warnings(outcome) if "received in the laboratory" in w]
    assert warning.startswith("SPM[1]-18 the specimen was received in the laboratory at ") and said in warning, warning
    assert warning.endswith(f"({where}): one of the two times is wrong; both are kept as sent")
    assert any(s.startswith("ERR||SPM^1^18|102^") and s.split("|")[4] == "W" for s in segments(outcome, "ERR"))


def test_a_specimen_collected_in_the_future_is_said(pipeline: Pipeline) -> None:
    """OBR-7 months ahead of this gateway's clock (the LIS clock, or a typing error): said, as a report issued in
    the future is (the whole message dated ahead, so the times are in order among themselves); no member
    recognises it before that time (rule validity-window)."""
    ahead = er7(obr(collected="20990601073000+0800", issued="20990601083000+0800"), obx(),
                msh7="20990601090000+0800", control="FUTURE-01")
    outcome = convert(pipeline, ahead)
    said = {i.location: i.message for i in outcome.issues if i.severity == "warning"}
    assert "in the future by this gateway's clock" in said.get("OBR[1]-7", ""), said
    assert "in the future by this gateway's clock" in said.get("OBR[1]-22", ""), said
    now = convert(pipeline, er7(obr(), obx(), control="FUTURE-02"))
    assert not [i for i in now.issues if "in the future" in i.message]
