"""HL7 v2 ORU^R01 from 2.3 to 2.8.2: versions, LOINC in OBX-3, sender identity policy, corrections, and
every refusal an HL7 sender gets naming HL7 fields (never a FHIR path), also over a real MLLP listener."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, TONGJIANG
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import HL7v2Adapter
from gateway.fhir.bundle import entries_of
from gateway.fhir.profiles import load_guide
from gateway.mapping.tables import load_mappings
from gateway.mllp import MLLPServer
from gateway.naming import SYSTEM_LOINC
from gateway.pipeline import Pipeline, Status

MAPPINGS = load_mappings(Path(__file__).resolve().parent.parent / "mappings")
STRUCTURE = MAPPINGS.structure("hl7v2-oru-r01")
LOCAL = f"https://fhir.cyhr.org.cn/sid/local-item/{TONGJIANG}"


@pytest.fixture
def pipeline(convert_pipeline):
    """These tests convert only (nothing is stored): they run once, not once per storage engine."""
    return convert_pipeline


def message(version: str = "2.5.1", *, msh3: str = "LIS", msh4: str = "TJXRMYY", control: str = "M0001",
            obr2: str = "O0001", obr3: str = "R0001", obr7: str = "20240520073000", obr25: str = "F",
            obx3: str = "ALT^丙氨酸氨基转移酶^L", obx5: str = "36", obx11: str = "F", obx14: str = "",
            spm: str | None = None, extra: tuple[str, ...] = ()) -> bytes:
    segments = [
        f"MSH|^~\\&|{msh3}|{msh4}|GATEWAY|CYHR|20240520161245||ORU^R01^ORU_R01|{control}|P|{version}"
        "||||||UNICODE UTF-8",
        "PID|1||511921198001011237^^^^NNCHN||张^三||19800101|M",
        f"OBR|1|{obr2}|{obr3}|LIVER^肝功能^L|||{obr7}|||||||||||||||20240520161000|||{obr25}",
        *extra,
        f"OBX|1|NM|{obx3}||{obx5}|U/L|9-50|N|||{obx11}|||{obx14}",
    ]
    if spm is not None:
        segments.append(spm)
    return ("\r".join(segments) + "\r").encode("utf-8")


def convert(pipeline: Pipeline, data: bytes) -> Any:
    outcomes = list(pipeline.convert(data, "hl7v2", "test"))
    assert len(outcomes) == 1
    return outcomes[0]


def msa(answer: bytes) -> list[str]:
    seg = next(s for s in answer.decode("utf-8").split("\r") if s.startswith("MSA"))
    return seg.split("|")


def observation(bundle: dict[str, Any]) -> dict[str, Any]:
    return entries_of(bundle, "Observation")[0]


def report(bundle: dict[str, Any]) -> dict[str, Any]:
    return entries_of(bundle, "DiagnosticReport")[0]


# -- versions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1",
                                     "2.8.2"])
def test_every_version_from_2_3_to_2_8_2_converts(pipeline: Pipeline, version: str) -> None:
    outcome = convert(pipeline, message(version))
    assert outcome.status is Status.CONVERTED, outcome.issues
    assert outcome.ack_code == "AA"
    assert msa(outcome.answer)[1] == "AA"
    # the ACK answers in the message's own version
    assert outcome.answer.decode().split("\r")[0].split("|")[11] == version


@pytest.mark.parametrize("version", ["2.2", "2.1"])
def test_versions_before_2_3_are_rejected_naming_msh_12(pipeline: Pipeline, version: str) -> None:
    outcome = convert(pipeline, message(version))
    assert outcome.status is Status.REFUSED
    assert outcome.ack_code == "AR"
    text = msa(outcome.answer)[3]
    assert text.startswith("MSH[1]-12 HL7 version") and "older than 2.3" in text


def test_unknown_version_is_rejected_listing_the_versions_taken(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.9"))
    assert outcome.ack_code == "AR"
    assert "2.3, 2.3.1, 2.4" in outcome.issues[0].message and "2.8.2" in outcome.issues[0].message


# -- LOINC in OBX-3 ------------------------------------------------------------------------------


def test_loinc_as_the_code_is_kept_as_loinc_and_as_the_senders_own_code(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.6", obx3="4548-4^糖化血红蛋白^LN"))
    assert outcome.status is Status.CONVERTED, outcome.issues
    codings = observation(outcome.bundle)["code"]["coding"]
    assert codings == [{"system": LOCAL, "code": "4548-4", "display": "糖化血红蛋白"},
                       {"system": SYSTEM_LOINC, "code": "4548-4"}]
    assert not [i for i in outcome.issues if "has no mapping" in i.message]


def test_loinc_spelled_loinc_and_the_local_code_in_the_alternate_triplet(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5.1", obx3="1742-6^Alanine aminotransferase^LOINC^ALT^丙氨酸氨基转移酶^L"))
    codings = observation(outcome.bundle)["code"]["coding"]
    assert codings[0] == {"system": LOCAL, "code": "ALT", "display": "丙氨酸氨基转移酶"}
    assert [c["code"] for c in codings[1:]] == ["1742-6"]
    assert not outcome.issues


def test_loinc_in_the_alternate_triplet_beside_an_unmapped_local_code(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.7", obx3="HBA1C^糖化血红蛋白^L^4548-4^HbA1c^LN"))
    codings = observation(outcome.bundle)["code"]["coding"]
    assert codings == [{"system": LOCAL, "code": "HBA1C", "display": "糖化血红蛋白"},
                       {"system": SYSTEM_LOINC, "code": "4548-4"}]
    assert not outcome.issues  # a sent LOINC is a mapping: no "unmapped" warning


def test_loinc_with_a_wrong_check_digit_is_a_warning_and_stays_local(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.6", obx3="4548-5^糖化血红蛋白^LN"))
    assert outcome.status is Status.CONVERTED
    codings = observation(outcome.bundle)["code"]["coding"]
    assert codings == [{"system": LOCAL, "code": "4548-5", "display": "糖化血红蛋白"}]
    warning = next(i for i in outcome.issues if "check digit" in i.message)
    assert warning.severity == "warning" and warning.location == "OBX[1]-3"
    assert "expected 4548-4" in warning.message
    alt = convert(pipeline, message("2.6", control="M0002", obx3="ALT^丙氨酸氨基转移酶^L^1742-7^ALT^LN"))
    assert [c["code"] for c in observation(alt.bundle)["code"]["coding"]] == ["ALT", "1742-6"]  # the table's
    assert any("check digit" in i.message for i in alt.issues)


def test_a_sent_loinc_disagreeing_with_the_table_is_reported_and_the_tables_kept(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.8", obx3="ALT^丙氨酸氨基转移酶^L^1920-8^AST^LN"))
    codings = observation(outcome.bundle)["code"]["coding"]
    assert [c["code"] for c in codings] == ["ALT", "1742-6"]
    warning = next(i for i in outcome.issues if i.location == "OBX[1]-3")
    assert warning.severity == "warning"
    assert "'1920-8'" in warning.message and "'1742-6'" in warning.message and "lab-items" in warning.message


def test_a_sent_loinc_agreeing_with_the_table_is_said_once(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5", obx3="ALT^丙氨酸氨基转移酶^L^1742-6^ALT^LN"))
    assert [c["code"] for c in observation(outcome.bundle)["code"]["coding"]] == ["ALT", "1742-6"]
    assert not outcome.issues


# -- sender identity policy ----------------------------------------------------------------------


def adapter(senders: dict[str, Any] | None) -> HL7v2Adapter:
    return HL7v2Adapter(STRUCTURE, senders={"senders": senders} if senders is not None else None)


SPM = "SPM|1|2408090417||SER^血清^HL70487|||||||P^Patient^HL70369||||||20240520074500|20240520083010"


def test_configured_analyser_without_obr_2_and_3_takes_the_specimen_id(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5.1", msh3="cobas", msh4="TJXRMYY-SH", obr2="", obr3="", spm=SPM))
    assert outcome.status is Status.CONVERTED, outcome.issues
    assert report(outcome.bundle)["identifier"][0]["value"] == "2408090417"
    info = next(i for i in outcome.issues if i.severity == "information")
    assert info.location == "OBR[1]-3" and "SPM[1]-2" in info.message


def test_policy_steps_are_tried_in_the_order_the_table_gives() -> None:
    policy = {"LIS|X": {"report_number": ["SPM-2", "PID-3+OBR-7", "MSH-10"]}}
    read = adapter(policy).read(RawUnit(message(msh4="X", obr2="", obr3=""), 1))
    assert not read.errors and read.reports[0].number == "511921198001011237-20240520073000"
    only_msh10 = adapter({"LIS|X": {"report_number": ["SPM-2", "MSH-10"]}})
    read = only_msh10.read(RawUnit(message(msh4="X", obr2="", obr3="", control="C42"), 1))
    assert read.reports[0].number == "C42"
    with_obr2 = adapter(policy).read(RawUnit(message(msh4="X", obr2="P9", obr3=""), 1))
    assert with_obr2.reports[0].number == "P9"  # OBR-3/OBR-2 first, the policy only when both are empty
    assert not [i for i in with_obr2.issues if i.severity == "information"]


def test_without_a_policy_the_report_is_refused_naming_obr_2_and_obr_3(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5.1", msh3="cobas", msh4="UNKNOWN", obr2="", obr3="", spm=SPM))
    assert outcome.ack_code == "AE"
    text = msa(outcome.answer)[3]
    assert text.startswith("OBR[1]-3 ") and "OBR-3" in text and "OBR-2" in text
    assert "ERR||OBR^1^3|101^Required field missing^HL70357|E" in outcome.answer.decode()
    read = adapter({"LIS|X": {"report_number": ["SPM-2"]}}).read(RawUnit(message(msh4="X", obr2="", obr3=""), 1))
    assert read.errors and read.errors[0].location == "OBR[1]-3"  # a policy whose steps find nothing


# -- collection time -----------------------------------------------------------------------------


def test_without_obr_7_the_collection_time_comes_from_obx_14(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.3", obr7="", obx14="20240520071500"))
    assert outcome.status is Status.CONVERTED, outcome.issues
    assert report(outcome.bundle)["effectiveDateTime"] == "2024-05-20T07:15:00+08:00"


def test_without_obr_7_the_collection_time_comes_from_spm_17(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5.1", obr7="", spm=SPM))
    assert outcome.status is Status.CONVERTED, outcome.issues
    assert report(outcome.bundle)["effectiveDateTime"] == "2024-05-20T07:45:00+08:00"


def test_without_any_collection_time_the_ack_names_obr_7_and_obx_14(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5.1", obr7=""))
    assert outcome.ack_code == "AE"
    assert msa(outcome.answer)[3].startswith("OBR[1]-7 and OBX[1]-14 are empty: the collection time is required")


# -- interpreter and corrections ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5.1"])
def test_an_accepted_message_with_warnings_says_so_in_every_version(pipeline: Pipeline, version: str) -> None:
    """Warnings (an item code the tables do not map) reach a v2.5+ sender as ERR segments of severity W; v2.3/2.4 have
    no ERR severity (an ERR reads as an error there), so an older sender's AA says in MSA-3 how many there were and
    the first of them: a laboratory on v2.4 learns of them too, from its interface engine's log."""
    one = convert(pipeline, message(version, obx3="ZZZ^未知项目^L"))
    two = convert(pipeline, message(version, control="M0002", obx3="ZZZ^未知项目^L",
                                    extra=("OBX|1|NM|YYY^另一未知项目^L||5|U/L|||||F",)))
    for outcome, count in ((one, "1 warning"), (two, "2 warnings")):
        assert outcome.ack_code == "AA"
        segments = outcome.answer.decode("utf-8").split("\r")
        errs = [s for s in segments if s.startswith("ERR")]
        text = msa(outcome.answer)[3]
        if version.startswith(("2.3", "2.4")):
            assert errs == [] and text.startswith(f"accepted, {count}: OBX[") and "no mapping" in text, text
            assert len(text) <= 80 and text.endswith("...") and not text.endswith(" ...")  # (the warning goes on)
        else:
            assert text == "accepted" and len(errs) == len(outcome.issues) and all(e.split("|")[4] == "W"
                                                                                   for e in errs), errs
    clean = convert(pipeline, message(version, control="M0003"))
    assert clean.issues == [] and msa(clean.answer)[3] == "accepted"


def test_v2_7_prt_names_the_principal_result_interpreter(pipeline: Pipeline) -> None:
    prt = "PRT||AD||PI^Primary Interpreter^HL70912|2033^陈^明"
    outcome = convert(pipeline, message("2.7", extra=(prt,)))
    assert report(outcome.bundle)["resultsInterpreter"][0]["display"] == "陈明"
    other = "PRT||AD||RCT^Result Copies To^HL70912|9001^王^五"
    outcome = convert(pipeline, message("2.7", control="M0002", extra=(other,)))
    assert "resultsInterpreter" not in report(outcome.bundle)


def test_a_corrected_report_names_the_report_it_corrects(pipeline: Pipeline) -> None:
    original = convert(pipeline, message("2.8"))
    corrected = convert(pipeline, message("2.8", control="M0002", obr25="C", obx11="C", obx5="46"))
    assert corrected.status is Status.CONVERTED, corrected.issues
    dr = report(corrected.bundle)
    assert dr["status"] == "corrected" and observation(corrected.bundle)["status"] == "corrected"
    replaced = dr["extension"][0]["valueIdentifier"]
    assert (replaced["system"], replaced["value"]) == (dr["identifier"][0]["system"], "R0001")
    # a new version of the report: its resources are not the original's
    assert dr["id"] != report(original.bundle)["id"]
    assert observation(corrected.bundle)["id"] != observation(original.bundle)["id"]
    assert "extension" not in report(original.bundle)


def test_a_corrected_result_in_a_final_report_makes_a_corrected_report(pipeline: Pipeline) -> None:
    outcome = convert(pipeline, message("2.5.1", obr25="F", obx11="C"))
    dr = report(outcome.bundle)
    assert dr["status"] == "corrected" and dr["extension"][0]["valueIdentifier"]["value"] == "R0001"


# -- every refusal names HL7 fields --------------------------------------------------------------


def _drop(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def run(bundle: dict[str, Any]) -> None:
        node: Any = bundle
        for step in path[:-1]:
            node = node[step]
        node.pop(path[-1], None)
    return run


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def run(bundle: dict[str, Any]) -> None:
        node: Any = bundle
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    return run


def _obs(bundle: dict[str, Any]) -> int:
    return next(n for n, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == "Observation")


def _each(kind: str, change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def run(bundle: dict[str, Any]) -> None:
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] == kind:
                change(entry["resource"])
    return run


# (what is broken on the built report, the HL7 field the ACK must start with)
PROBLEMS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("report without collection time", _each("DiagnosticReport", lambda r: r.pop("effectiveDateTime")), "OBR[1]-7"),
    ("report without status", _each("DiagnosticReport", lambda r: r.pop("status")), "OBR[1]-25"),
    ("report without code", _each("DiagnosticReport", lambda r: r.pop("code")), "OBR[1]-4"),
    ("report without identifier", _each("DiagnosticReport", lambda r: r.pop("identifier")), "OBR[1]-3"),
    ("result without value", _each("Observation", lambda r: r.pop("valueQuantity")), "OBX[1]-5"),
    ("result with a bad value", _each("Observation", lambda r: r["valueQuantity"].update(value="x")), "OBX[1]-5"),
    ("result without code", _each("Observation", lambda r: r.pop("code")), "OBX[1]-3"),
    ("result with the local code not first",
     _each("Observation", lambda r: r["code"]["coding"].reverse()), "OBX[1]-3"),
    ("result with a bad time", _each("Observation", lambda r: r.update(effectiveDateTime="2024-13")), "OBX[1]-14"),
    ("result without status", _each("Observation", lambda r: r.pop("status")), "OBX[1]-11"),
    ("patient without identifier", _each("Patient", lambda r: r.pop("identifier")), "PID[1]-3"),
    ("patient with a blank name", _each("Patient", lambda r: r.update(name=[{"text": " "}])), "PID[1]-5"),
    # warnings: the message is accepted (AA) and the ERR segment (severity W) names the field
    ("patient birth date against the 身份证号", _each("Patient", lambda r: r.update(birthDate="1980-01-02")),
     "PID[1]-7"),
    ("patient sex against the 身份证号", _each("Patient", lambda r: r.update(gender="female")), "PID[1]-8"),
    ("specimen with a bad time",
     _each("Specimen", lambda r: r.update(collection={"collectedDateTime": "x"})), "SPM[1]-17"),
]


def _pipeline_breaking(settings: Any, clock: Any, change: Callable[[dict[str, Any]], None]) -> Pipeline:
    real = load_guide(settings.profiles_dir).validate

    def checker(bundle: dict[str, Any]) -> list[Any]:
        broken = copy.deepcopy(bundle)
        change(broken)
        return real(broken)

    return Pipeline(settings, clock=clock, checker=checker)


@pytest.mark.parametrize("what,change,field", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_profile_problems_reach_the_sender_as_hl7_fields(settings: Any, clock: Any, what: str,
                                                         change: Callable[[dict[str, Any]], None],
                                                         field: str) -> None:
    pipe = _pipeline_breaking(settings, clock, change)
    try:
        outcome = convert(pipe, message("2.5.1", obx14="20240520071500", spm=SPM))
    finally:
        pipe.close()
    assert outcome.issues, what
    severity = "E" if outcome.errors else "W"
    assert outcome.ack_code == ("AE" if severity == "E" else "AA")
    answer = outcome.answer.decode("utf-8")
    assert "Bundle.entry" not in answer and "resource." not in answer, answer
    if severity == "E":
        assert msa(outcome.answer)[3].startswith(field), answer
    seg, _, rest = field.partition("[")
    err = next(s for s in answer.split("\r") if s.startswith(f"ERR||{seg}^{rest.split(']')[0]}^{field.split('-')[1]}|"))
    assert err.split("|")[4] == severity and err.split("|")[8].startswith(field), err
    # the FHIR path is kept for the gateway's own record, beside the HL7 wording
    assert all(i.extra.get("fhir_path", "").startswith("Bundle.entry") for i in outcome.issues)


def test_a_problem_with_no_mapped_field_is_worded_for_hl7_without_a_fhir_path(settings: Any, clock: Any) -> None:
    def break_org(bundle: dict[str, Any]) -> None:
        org = bundle["entry"][0]["resource"]
        org["identifier"][0]["value"] = "not a code"

    pipe = _pipeline_breaking(settings, clock, break_org)
    try:
        outcome = convert(pipe, message("2.5.1"))
    finally:
        pipe.close()
    assert outcome.ack_code == "AE"
    answer = outcome.answer.decode("utf-8")
    assert "Bundle.entry" not in answer and "resource." not in answer and "Organization." not in answer
    assert "fails a profile rule no HL7 field is mapped to" in msa(outcome.answer)[3]


def _refusals(version: str) -> dict[str, bytes]:
    """Messages senders send that are refused, one per kind of problem, as ``message`` writes them."""
    obr = "OBR|1|O0001|R0001|LIVER^肝功能^L|||20240520073000|||||||||||||||20240520161000|||F"
    obx = "OBX|1|NM|ALT^丙氨酸氨基转移酶^L||36|U/L|9-50|N|||F|||"
    plain = message(version)

    def swap(old: str, new: str) -> bytes:
        assert old.encode() in plain, old
        return plain.replace(old.encode(), new.encode())

    return {
        "no OBX": swap(f"\r{obx}", ""),
        "second OBR group without OBX": swap(f"\r{obx}", f"\r{obx}\r" + obr.replace(
            "OBR|1|O0001|R0001|LIVER^肝功能", "OBR|2|O0002|R0002|LIPID^血脂")),
        "empty OBX-3": swap("ALT^丙氨酸氨基转移酶^L", ""),
        "OBX-14 month 13": message(version, obx14="20241320073000"),
        "NM with a comma": swap("||36|", "||6,8|"),
        "value type ED": swap("|NM|", "|ED|"),
        "OBX-5 repeated for NM": swap("||36|", "||36~37|"),
        "OBR-25 not in table 0123": message(version, obr25="Z"),
        "OBX-11 not in table 0085": message(version, obx11="Z"),
        "no name": swap("||张^三||", "||||"),
        "no OBR-3 and OBR-2": message(version, obr2="", obr3=""),
        "collection after the message": message(version, obr7="20250520073000"),
        "born after the collection": swap("||19800101|", "||20250101|"),
        "one OBR-3 and OBR-4 twice": message(version, extra=(obx, obr.replace("OBR|1", "OBR|2"))),
        "two patients": swap("\rOBR|", "\rPID|2||MR2^^^^MR||李^四\rOBR|"),
        "OBX before any OBR": swap("\rOBR|", f"\r{obx}\rOBR|"),
    }


def _error_names_a_field(err: str) -> bool:
    """An ERR segment of an error names segment, sequence and field (v2.5+ ERR-2, v2.3.1/2.4 ERR-1); a segment
    that is where no segment of its kind may be (code 100, segment sequence error) names the segment only."""
    fields = err.split("|")
    if fields[1]:  # the answer to a v2.3.1/2.4 message: ERR-1 (ELD)
        location, code = fields[1].split("^")[:3], fields[1].split("^")[3].split("&")[0]
    else:
        location, code = fields[2].split("^"), fields[3].split("^")[0]
        if fields[4] != "E":
            return True
    if code == "100":
        return bool(location[0]) and len(location) > 1 and location[1].isdigit()
    return bool(location[0]) and len(location) > 2 and location[2].isdigit()


@pytest.mark.parametrize("version", ["2.5.1", "2.3.1"])
def test_every_answer_is_free_of_fhir_paths_and_each_error_names_a_field(pipeline: Pipeline, version: str) -> None:
    answers = [(path.name, o) for path in sorted((DATA / "hl7v2").glob("*.hl7"))
               for o in pipeline.convert(path.read_bytes(), "hl7v2", path.name)]
    refusals = _refusals(version)
    answers += [(what, convert(pipeline, data)) for what, data in refusals.items()]
    assert all(o.ack_code in ("AE", "AR") for what, o in answers if what in refusals), \
        [what for what, o in answers if what in refusals and o.ack_code == "AA"]
    for what, outcome in answers:
        text = outcome.answer.decode("utf-8", "replace")
        assert "Bundle.entry" not in text and "resource." not in text and "no HL7 field" not in text, (what, text)
        if outcome.ack_code in ("AE", "AR"):
            errs = [s for s in text.split("\r") if s.startswith("ERR")]
            assert errs and all(_error_names_a_field(e) for e in errs), (what, errs)


# -- over MLLP -----------------------------------------------------------------------------------


def test_versions_policy_and_field_named_refusal_over_mllp_send(stored_pipeline: Pipeline, tmp_path: Path) -> None:
    """python-hl7's own mllp_send client against the gateway's MLLP listener."""
    mllp_send = shutil.which("mllp_send") or str(Path(sys.executable).with_name("mllp_send"))
    messages = [
        (DATA / "hl7v2" / "lis-v28-corrected.hl7").read_bytes(),
        (DATA / "hl7v2" / "analyser-cobas-v251-spm.hl7").read_bytes(),
        message("2.7", control="NOTIME1", obr7=""),
        message("2.2", control="OLD1"),
    ]
    batch = tmp_path / "batch.hl7"
    # mllp_send --file: one message per MLLP frame (start block, message, end block)
    batch.write_bytes(b"".join(b"\x0b" + m.rstrip(b"\r").replace(b"\rMSH", b"\r\x1c\r\x0bMSH") + b"\r\x1c\r"
                               for m in messages))
    server = MLLPServer(stored_pipeline, "127.0.0.1", 0)
    server.start_in_thread()
    try:
        sent = subprocess.run([mllp_send, "--port", str(server.port), "--file", str(batch), "127.0.0.1"],
                              capture_output=True, timeout=60)
    finally:
        server.stop()
    assert sent.returncode == 0, sent.stderr
    acks = [a.strip(b"\x0b\x1c\r") for a in sent.stdout.split(b"\n") if a.strip()]
    got = [msa(a)[1:3] for a in acks]
    assert got == [["AA", "TJ2411200007C"], ["AA", "c8001-000412"], ["AE", "c8002-000088"], ["AE", "NOTIME1"],
                   ["AR", "OLD1"]]
    assert msa(acks[2])[3].startswith("OBR[1]-3 filler order number")
    assert msa(acks[3])[3].startswith("OBR[1]-7 and OBX[1]-14 are empty")
    assert msa(acks[4])[3].startswith("MSH[1]-12")
    for ack in acks:
        assert b"Bundle.entry" not in ack and b"resource." not in ack
    assert stored_pipeline.store.counts() == {"stored": 2, "refused": 3}
