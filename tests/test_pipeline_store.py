"""Pipeline and store: raw first, one status per message, duplicates by key, search, history."""
from __future__ import annotations

import pytest

from conftest import DATA
from gateway.errors import InputError
from gateway import jsonutil
from gateway.pipeline import Pipeline, Status
from gateway.store import db as store_db

MALFORMED = (DATA / "hl7v2" / "malformed.hl7").read_bytes()
UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
ANALYSER = (DATA / "hl7v2" / "analyser-v231-chemistry.hl7").read_bytes()


def test_every_message_is_stored_raw_with_one_final_status(pipeline: Pipeline) -> None:
    outcomes = pipeline.ingest(MALFORMED, "hl7v2", channel="file", origin="malformed.hl7")
    assert [o.status for o in outcomes] == [Status.REFUSED, Status.STORED, Status.REFUSED, Status.REFUSED,
                                            Status.REFUSED, Status.REFUSED]
    assert [o.ack_code for o in outcomes] == ["AE", "AA", "AE", "AR", "AR", "AE"]
    rows = list(pipeline.store.db.query("SELECT message_id, status, raw FROM messages ORDER BY id"))
    assert [r["message_id"] for r in rows] == ["ORU0042", "ORU0043", "ORU0044", "ADT0045", "ORU0046", "ORU0047"]
    # nothing lost: the raw bytes of each message, exactly as received
    from gateway.adapters.hl7v2 import split_messages

    assert [bytes(r["raw"]) for r in rows] == split_messages(MALFORMED)
    stages = pipeline.store.stages_of(outcomes[0].record_id)
    assert [(s["stage"], s["status"]) for s in stages] == [("receive", "received"), ("finish", "refused")]


def test_refused_message_keeps_its_issues_and_ack(pipeline: Pipeline) -> None:
    outcome = pipeline.ingest(MALFORMED, "hl7v2", channel="file")[0]
    rec = pipeline.store.get_message(outcome.record_id)
    assert rec.status == "refused" and rec.ack_code == "AE"
    assert rec.issues == [{"severity": "error", "code": "value", "location": "OBX[3]-5",
                           "message": "'abc' is not a number for value type NM"}]
    assert rec.ack == outcome.answer and b"MSA|AE|ORU0042" in rec.ack


def test_duplicate_is_answered_again_and_never_stored_twice(pipeline: Pipeline) -> None:
    first = pipeline.ingest(UTF8, "hl7v2", channel="mllp")[0]
    again = pipeline.ingest(UTF8, "hl7v2", channel="http")[0]
    assert first.status is Status.STORED and again.status is Status.DUPLICATE
    assert again.answer == first.answer and again.record_id == first.record_id
    assert pipeline.store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_other_content_under_a_control_id_stored_before_is_a_message_of_its_own(pipeline: Pipeline) -> None:
    """Same sender and MSH-10, other content: a refused message fixed and sent again, or a LIS whose counter started
    again after a restart. It was answered with the first message's answer (a stale AE naming a value no longer
    there, or an AA for a message never stored). Now it is stored under ``MSH-10#2`` and worked. The same content
    sent again — with a new time of sending (MSH-7), other line ends — is still the duplicate it is."""
    bad = UTF8.replace(b"||36|U/L|9-50|N|||F|", "||三十六|U/L|9-50|N|||F|".encode())
    refused = pipeline.ingest(bad, "hl7v2", channel="http")[0]
    assert refused.status is Status.REFUSED and refused.ack_code == "AE"
    resent = bad.replace(b"\r", b"\r\n").replace(b"|20240520161245+0800|", b"|20240521090000+0800|")
    assert resent != bad and b"|20240521090000+0800|" in resent
    again = pipeline.ingest(resent, "hl7v2", channel="http")[0]
    assert again.status is Status.DUPLICATE and again.answer == refused.answer
    fixed = pipeline.ingest(UTF8, "hl7v2", channel="http")[0]
    assert fixed.status is Status.STORED and fixed.ack_code == "AA" and fixed.record_id != refused.record_id
    assert pipeline.store.get_message(fixed.record_id).message_id == "TJ2405200099#2"
    assert b"MSA|AA|TJ2405200099" in fixed.answer
    # a third content under the same id (a counter that started again): #3; each copy resent is its duplicate
    other = UTF8.replace(b"R2405200099", b"R2405200777").replace(b"R2405200100", b"R2405200778")
    third = pipeline.ingest(other, "hl7v2", channel="http")[0]
    assert third.status is Status.STORED and pipeline.store.get_message(third.record_id).message_id == \
        "TJ2405200099#3"
    assert [o.status for o in pipeline.ingest(UTF8 + other, "hl7v2", channel="http")] == [Status.DUPLICATE] * 2
    assert pipeline.store.counts() == {"refused": 1, "stored": 2}


def test_any_number_of_messages_under_one_control_id_are_all_stored(pipeline: Pipeline) -> None:
    """A LIS whose counter wraps often: past 51 messages under one MSH-10 the next ones were answered AA as the
    first and never stored. Every one is stored now, and each one resent is the duplicate of its own copy."""
    reports = [UTF8.replace(b"R2405200099", f"R24052{n:05d}".encode()) for n in range(60)]
    outcomes = [pipeline.ingest(r, "hl7v2", channel="http")[0] for r in reports]
    assert [o.status for o in outcomes] == [Status.STORED] * 60
    ids = [pipeline.store.get_message(o.record_id).message_id for o in outcomes]
    assert ids == ["TJ2405200099"] + [f"TJ2405200099#{n}" for n in range(2, 61)]
    again = pipeline.ingest(reports[57].replace(b"\r", b"\n"), "hl7v2", channel="http")[0]
    assert again.status is Status.DUPLICATE and again.record_id == outcomes[57].record_id
    assert pipeline.store.counts() == {"stored": 60}


def test_a_lease_the_database_would_not_let_go_is_given_up_once_it_answers(pipeline: Pipeline, monkeypatch) -> None:
    """The database went away while a message was recorded (a PostgreSQL crash): its lease could not be given up,
    and every resend, to any node, was answered AE "already being processed; retry" until the lease expired
    (processing_lease, 5 minutes). The lease is given up as soon as the database answers again: the resend is
    worked and stored."""
    from gateway.errors import DatabaseUnavailable

    def away(*_: object, **__: object) -> None:
        raise DatabaseUnavailable("the database cannot be reached right now")

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "_commit", away)
        m.setattr(type(pipeline.store), "release", away)
        with pytest.raises(DatabaseUnavailable):  # answered as while the database is away: no ACK, 503
            pipeline.ingest(UTF8, "hl7v2", channel="mllp")
    [held] = pipeline.store.list_messages()
    assert held.status == "received" and held.lease_owner  # still held by this (live) process
    again = pipeline.ingest(UTF8, "hl7v2", channel="mllp")[0]
    assert again.status is Status.STORED and again.ack_code == "AA" and again.record_id == held.id
    assert pipeline.store.counts() == {"stored": 1}


def test_duplicate_key_is_enforced_by_the_database(pipeline: Pipeline) -> None:
    pipeline.ingest(UTF8, "hl7v2", channel="mllp")
    with pytest.raises(store_db.IntegrityError):
        pipeline.store.db.execute(
            "INSERT INTO messages (channel, format, sender, message_id, received_at, size, sha256, raw, status,"
            " updated_at) SELECT channel, format, sender, message_id, received_at, size, sha256, raw, status,"
            " updated_at FROM messages")


def test_qc_message_is_filtered_not_failed(pipeline: Pipeline) -> None:
    outcomes = pipeline.ingest(ANALYSER, "hl7v2", channel="mllp")
    assert [o.status for o in outcomes] == [Status.STORED, Status.FILTERED]
    assert outcomes[1].ack_code == "AA" and b"filtered" in outcomes[1].answer
    assert pipeline.store.counts() == {"stored": 1, "filtered": 1}
    assert pipeline.store.search("Observation", []).total == 5  # the QC result was not turned into FHIR


def test_convert_stores_nothing(pipeline: Pipeline) -> None:
    outcomes = list(pipeline.convert(UTF8, "hl7v2"))
    assert outcomes[0].status is Status.CONVERTED and outcomes[0].bundle is not None
    assert pipeline.store.counts() == {}


def test_interrupted_messages_are_worked_again_at_start_up(pipeline: Pipeline) -> None:
    record_id, _ = pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender="LIS|X", message_id="M9",
                                             origin="", raw=b"MSH|...")
    assert pipeline.recover() == 1
    rec = pipeline.store.get_message(record_id)
    assert rec.status == "refused" and rec.ack is not None and rec.lease_owner is None
    assert pipeline.store.raw_of(record_id) == b"MSH|..."


def test_a_bug_in_a_stage_fails_the_message_without_losing_it(pipeline: Pipeline, monkeypatch) -> None:
    channel = pipeline.channel("hl7v2")

    def broken(msg):
        raise RuntimeError("boom")

    monkeypatch.setattr(channel, "build", broken)
    monkeypatch.setattr(channel, "fast", None)  # (the compiled twins come back to the channel's own: test_native)
    outcome = pipeline.ingest(UTF8, "hl7v2", channel="http")[0]
    assert outcome.status is Status.FAILED and outcome.ack_code == "AE"
    assert b"boom" not in outcome.answer and b"internal error" in outcome.answer
    assert pipeline.store.raw_of(outcome.record_id) == UTF8.rstrip(b"\r")


def test_resent_correction_keeps_the_earlier_version(pipeline: Pipeline) -> None:
    pipeline.ingest(UTF8, "hl7v2", channel="http")
    corrected = UTF8.replace(b"|TJ2405200099|", b"|TJ2405200199|")
    corrected = corrected.replace(b"||36|U/L|9-50|N|||F|", b"||38|U/L|9-50|N|||C|")
    out = pipeline.ingest(corrected, "hl7v2", channel="http")[0]
    assert out.status is Status.STORED
    # a search answers the current version only: the correction's ALT
    found = pipeline.store.search("Observation", [("code", "http://loinc.org|1742-6")]).resources
    assert len(found) == 1
    alt = found[0]
    assert alt["status"] == "corrected" and str(alt["valueQuantity"]["value"]) == "38"
    # the earlier version is a resource of its own, still read by id, tagged superseded, its value as first sent
    rows = pipeline.store.db.execute("SELECT id, json FROM resources WHERE type = 'Observation'").fetchall()
    earlier = [jsonutil.loads(j) for rid, j in rows if rid != alt["id"] and '"1742-6"' in j]
    assert len(earlier) == 1 and str(earlier[0]["valueQuantity"]["value"]) == "36"
    assert earlier[0]["status"] == "final"
    assert [t["code"] for t in earlier[0]["meta"].get("tag", [])] == ["superseded"]


def _left_out(outcome) -> list[str]:
    return [i.line() for i in outcome.issues if "leaves out" in i.message]


def test_a_report_sent_again_with_fewer_results_names_the_ones_left_out(pipeline: Pipeline) -> None:
    """The same report (OBR-3) sent again, not as a correction, without two of its results: stored with the results
    of this copy, and the sender is told which results it left out (they stay stored, listed by no report)."""
    first = pipeline.ingest(UTF8, "hl7v2", channel="http")[0]
    assert first.status is Status.STORED and not _left_out(first)
    again = UTF8.replace(b"|TJ2405200099|", b"|TJ2405200098|")
    lines = again.split(b"\r")
    again = b"\r".join(line for line in lines if not line.startswith((b"OBX|3|SN|HBSAG", b"OBX|4|CWE|HBEAG")))
    out = pipeline.ingest(again, "hl7v2", channel="http")[0]
    assert out.status is Status.STORED and out.ack_code == "AA"
    [warning] = _left_out(out)
    # (its place is the report's OBR-3, ERR-2 of the ACK: it named no field)
    assert warning.startswith("OBR[1]-3 (report R2405200099) was stored before with 5 results; this copy leaves out 2 "
                              "of them: ")
    assert "乙肝表面抗原定量 (HBSAG)" in warning and "乙肝e抗原 (HBEAG)" in warning
    assert "丙氨酸" not in warning and "R2405200100" not in warning  # the other report of the message lost nothing
    assert "/_history/1)" in warning
    ack = out.answer.decode("utf-8")
    assert "ERR||OBR^1^3|205^Duplicate key identifier^HL70357|W||||OBR[1]-3 (report R2405200099) was stored before " \
        "with 5 results" in ack and "MSA|AA|TJ2405200098" in ack
    # what the warning says: stored again with three results, the two others kept as they were
    report = [r for r in pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources]
    assert len(report) == 1 and len(report[0]["result"]) == 3 and report[0]["meta"]["versionId"] == "2"
    kept = pipeline.store.search("Observation", [("code", "HBSAG")]).resources
    assert len(kept) == 1 and kept[0]["meta"]["versionId"] == "1"
    # the same three results once more: nothing more is left out; the whole report again: nothing either
    assert not _left_out(pipeline.ingest(again.replace(b"|TJ2405200098|", b"|TJ2405200097|"), "hl7v2",
                                         channel="http")[0])
    assert not _left_out(pipeline.ingest(UTF8.replace(b"|TJ2405200099|", b"|TJ2405200096|"), "hl7v2",
                                         channel="http")[0])


def _panel(group: int, control_id: bytes) -> bytes:
    """OBR group ``group`` (1: 肝功能 LIVER, 2: 血脂 LIPID) of ``UTF8`` alone in a message, numbered R2405200099 as
    the first is (a LIS using the specimen barcode as OBR-3 and sending each panel of it in a message of its own)."""
    lines = UTF8.split(b"\r")
    starts = [n for n, line in enumerate(lines) if line.startswith(b"OBR|")]
    group_lines = lines[starts[0]:starts[1]] if group == 1 else [
        line.replace(b"|R2405200100|", b"|R2405200099|").replace(b"OBR|2|", b"OBR|1|")
        for line in lines[starts[1]:] if line]
    head = [line.replace(b"|TJ2405200099|", b"|" + control_id + b"|") for line in lines[:starts[0]]]
    return b"\r".join(head + group_lines) + b"\r"


def test_panels_of_one_number_sent_in_messages_of_their_own_are_reports_of_their_own(pipeline: Pipeline) -> None:
    """Two panels under one OBR-3, each in a message of its own: two reports, both current with their own results.
    Keyed on the number alone, the second's DiagnosticReport was the first's, stored over it (the 肝功能 report
    was no longer current, its five results listed by no report, and the sender told it 'left them out')."""
    liver, lipid = _panel(1, b"TJ1"), _panel(2, b"TJ2")
    assert liver.count(b"OBR|") == lipid.count(b"OBR|") == 1 and b"R2405200100" not in lipid
    first = pipeline.ingest(liver, "hl7v2", channel="http")[0]
    second = pipeline.ingest(lipid, "hl7v2", channel="http")[0]
    assert first.status is second.status is Status.STORED and second.ack_code == "AA"
    assert not _left_out(second)

    def current() -> dict[str, tuple[str, int]]:
        found = pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources
        return {r["code"]["coding"][0]["code"]: (r["meta"]["versionId"], len(r["result"])) for r in found}

    assert current() == {"LIVER": ("1", 5), "LIPID": ("1", 2)}
    # each panel sent again (a new MSH-10) is the same report again (the same content: no new version), not a
    # third report
    for again in (_panel(2, b"TJ3"), _panel(1, b"TJ4")):
        out = pipeline.ingest(again, "hl7v2", channel="http")[0]
        assert out.status is Status.STORED and not _left_out(out)
    assert current() == {"LIVER": ("1", 5), "LIPID": ("1", 2)}
    # a changed value in a panel sent again: a new version of that result, listed by its panel's report
    changed = _panel(2, b"TJ6").replace(b"||5.62|mmol/L|", b"||5.71|mmol/L|")
    assert pipeline.ingest(changed, "hl7v2", channel="http")[0].status is Status.STORED
    assert current() == {"LIVER": ("1", 5), "LIPID": ("1", 2)}
    [cholesterol] = pipeline.store.search("Observation", [("code", "TC")]).resources
    assert str(cholesterol["valueQuantity"]["value"]) == "5.71" and cholesterol["meta"]["versionId"] == "2"
    [lipid] = [r for r in pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources
               if r["code"]["coding"][0]["code"] == "LIPID"]
    assert f"Observation/{cholesterol['id']}" in {ref["reference"] for ref in lipid["result"]}
    # the results of both are each listed by their report
    reports = pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources
    listed = {ref["reference"] for r in reports for ref in r["result"]}
    assert len(listed) == 7


def test_panels_stored_together_then_sent_apart_keep_their_reports(pipeline: Pipeline) -> None:
    """Two panels under one OBR-3 in one message (each keyed on the number and OBR-4), then one of them alone in
    a message of its own: the same report as before, not a third one."""
    both = UTF8.replace(b"|R2405200100|", b"|R2405200099|")
    assert pipeline.ingest(both, "hl7v2", channel="http")[0].status is Status.STORED
    changed = _panel(2, b"TJ5").replace(b"||5.62|mmol/L|", b"||5.71|mmol/L|")
    out = pipeline.ingest(changed, "hl7v2", channel="http")[0]
    assert out.status is Status.STORED and not _left_out(out)
    found = pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources
    assert sorted((r["code"]["coding"][0]["code"], len(r["result"])) for r in found) == [("LIPID", 2), ("LIVER", 5)]
    [cholesterol] = pipeline.store.search("Observation", [("code", "TC")]).resources
    assert str(cholesterol["valueQuantity"]["value"]) == "5.71" and cholesterol["meta"]["versionId"] == "2"


#: the PID of another patient (李秀英) of the same hospital
OTHER_PID = "PID|1||Z0100456^^^TJXRMYY^MR||李^秀英||19700301|F|||四川省巴中市通江县诺江镇||||||||511921197003010022".encode()


def test_a_report_number_reused_for_another_patient_is_refused_naming_obr3(pipeline: Pipeline) -> None:
    """The LIS's numbers restarted: a report of another patient under a 检验报告单号 stored before, for the same
    test. Its ids derive from the number: it was stored over the first patient's report, results and all (both
    answered AA). Now refused with AE naming OBR-3, the first patient's report untouched; the same patient sent
    again with a 身份证号 added is the same person; a correction (OBR-25 C) for another patient is taken."""
    first = pipeline.ingest(UTF8, "hl7v2", channel="http")[0]
    assert first.status is Status.STORED
    lines = UTF8.split(b"\r")
    other = b"\r".join(OTHER_PID if line.startswith(b"PID|") else line for line in lines)
    other = other.replace(b"|TJ2405200099|", b"|TJ2405209999|").replace(b"||36|U/L|", b"||71|U/L|")
    out = pipeline.ingest(other, "hl7v2", channel="http")[0]
    assert out.status is Status.REFUSED and out.ack_code == "AE"
    errors = [i for i in out.issues if i.severity == "error"]
    assert [i.location for i in errors] == ["OBR[1]-3", "OBR[2]-3"]  # (both numbers of the message were stored)
    assert "检验报告单号 R2405200099 was stored for another patient" in errors[0].message
    assert b"ERR||OBR^1^3|205" in out.answer and b"ERR||OBR^2^3|205" in out.answer
    found = pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources
    assert [r["meta"]["versionId"] for r in found] == ["1"]
    [alt] = pipeline.store.search("Observation", [("code", "ALT")]).resources
    assert str(alt["valueQuantity"]["value"]) == "36" and alt["meta"]["versionId"] == "1"
    assert not pipeline.store.search("Patient", [("identifier", "511921197003010022")]).resources
    # the first patient's report sent again, its 身份证号 left out (the MRN alone): the same person
    no_card = UTF8.replace(b"|TJ2405200099|", b"|TJ2405200098|").replace(b"||||||||511921196612120011", b"")
    assert b"511921196612120011" not in no_card
    assert pipeline.ingest(no_card, "hl7v2", channel="http")[0].status is Status.STORED
    # nor as a correction of the first: it would supersede the first patient's report
    corrected = other.replace(b"|TJ2405209999|", b"|TJ2405209998|").replace(b"|||F|||||||2033", b"|||C|||||||2033")
    assert corrected.count(b"|||C|||||||2033") == 2
    out = pipeline.ingest(corrected, "hl7v2", channel="http")[0]
    assert out.status is Status.REFUSED and [i.location for i in out.errors] == ["OBR[1]-3", "OBR[2]-3"]
    assert [r["status"] for r in pipeline.store.search("DiagnosticReport", [("identifier", "R2405200099")]
                                                       ).resources] == ["final"]
    # the first patient's reports taken back (sent for the wrong patient): the numbers stay hers (under them, the
    # other's report was stored in her report's history, superseded by the cancellation and found by no search);
    # the right patient's report goes under numbers of its own
    taken_back = UTF8.replace(b"|TJ2405200099|", b"|TJ2405200097|").replace(b"|||F|||||||2033", b"|||X|||||||2033")
    assert pipeline.ingest(taken_back, "hl7v2", channel="http")[0].status is Status.STORED
    right = other.replace(b"|TJ2405209999|", b"|TJ2405209997|")
    out = pipeline.ingest(right, "hl7v2", channel="http")[0]
    assert out.status is Status.REFUSED and "taken back" in out.errors[0].message
    own = right.replace(b"|TJ2405209997|", b"|TJ2405209996|").replace(b"R2405200099", b"R2405300099").replace(
        b"R2405200100", b"R2405300100")
    assert pipeline.ingest(own, "hl7v2", channel="http")[0].status is Status.STORED
    assert pipeline.store.search("Patient", [("identifier", "511921197003010022")]).resources


def test_a_correction_with_fewer_results_is_not_told_it_left_any_out(pipeline: Pipeline) -> None:
    """A correction (OBR-25 C) supersedes the earlier version, its results included: nothing is left listed by no
    report, so no such warning."""
    pipeline.ingest(UTF8, "hl7v2", channel="http")
    corrected = UTF8.replace(b"|TJ2405200099|", b"|TJ2405200199|")
    corrected = corrected.replace(b"||36|U/L|9-50|N|||F|", b"||38|U/L|9-50|N|||C|")
    lines = corrected.split(b"\r")
    corrected = b"\r".join(line for line in lines if not line.startswith(b"OBX|3|SN|HBSAG"))
    out = pipeline.ingest(corrected, "hl7v2", channel="http")[0]
    assert out.status is Status.STORED and not _left_out(out)


def test_convert_does_not_look_for_results_left_out(pipeline: Pipeline) -> None:
    pipeline.ingest(UTF8, "hl7v2", channel="http")
    fewer = b"\r".join(line for line in UTF8.split(b"\r") if not line.startswith(b"OBX|3|SN|HBSAG"))
    assert not _left_out(list(pipeline.convert(fewer, "hl7v2"))[0])


# -- search -----------------------------------------------------------------------------


@pytest.fixture
def loaded(pipeline: Pipeline) -> Pipeline:
    for name in ("lis-v251-utf8.hl7", "analyser-v231-chemistry.hl7", "mllp-framed.hl7", "lis-v24-crlf.hl7"):
        pipeline.ingest((DATA / "hl7v2" / name).read_bytes(), "hl7v2", channel="file")
    return pipeline


ID_ZHANG = "urn:oid:2.16.156.10011.1.3|511921198001011237"


@pytest.mark.parametrize("param", ["patient.identifier", "subject:Patient.identifier", "subject.identifier",
                                   "patient:Patient.identifier"])
def test_search_reports_by_patient_id_card(loaded: Pipeline, param: str) -> None:
    found = loaded.store.search("DiagnosticReport", [(param, ID_ZHANG)])
    # 张三: analyser chemistry (2024-03-15), MLLP file blood count (2024-06-10), CRLF chemistry (2024-06-11)
    assert sorted(r["identifier"][0]["value"] for r in found.resources) == [
        "240315001", "R2406100001", "R2406110005"]


def test_search_by_identifier_value_without_system(loaded: Pipeline) -> None:
    assert loaded.store.search("DiagnosticReport", [("patient.identifier", "511921196612120011")]).total == 2


@pytest.mark.parametrize("value, total", [
    ("http://loinc.org|1742-6", 2),  # ALT in the v2.5.1 and analyser samples
    ("1742-6", 2),
    ("|1742-6", 0),  # only codes without a system
    ("http://loinc.org|", 13),  # every LOINC-coded result: 4 + 5 + 2 + 2 (HBSAG, HBEAG, REMARK have none)
    ("http://loinc.org|6690-2,http://loinc.org|718-7", 2),  # OR within one parameter
])
def test_search_observations_by_code(loaded: Pipeline, value: str, total: int) -> None:
    assert loaded.store.search("Observation", [("code", value)]).total == total


@pytest.mark.parametrize("value, total", [
    ("2024-06", 4),  # WBC, HGB (06-10), UREA, NA (06-11)
    ("2024-06-10", 2),
    ("ge2024-06-11", 2),
    ("lt2024-05-20", 5),  # the analyser's five results of 2024-03-15
    ("gt2024-06-10", 2),
    ("le2024-05-20", 12),  # 5 analyser + 7 of 2024-05-20
    ("sa2024-05-20", 4),
    ("eb2024-06-10", 12),
    ("ne2024", 0),
    ("2024-05-20T11:00:00+08:00", 4),
    ("2024-05-20T03:00:00Z", 4),  # the same instant in UTC
])
def test_search_observations_by_date_prefixes(loaded: Pipeline, value: str, total: int) -> None:
    assert loaded.store.search("Observation", [("date", value)]).total == total


def test_search_combines_parameters_with_and(loaded: Pipeline) -> None:
    found = loaded.store.search("Observation", [("patient.identifier", ID_ZHANG), ("code", "6690-2"),
                                                ("date", "2024-06")])
    assert found.total == 1 and str(found.resources[0]["valueQuantity"]["value"]) == "6.3"


def test_search_refuses_unknown_parameters_and_bad_dates(loaded: Pipeline) -> None:
    with pytest.raises(InputError) as exc:
        loaded.store.search("Observation", [("colour", "red")])
    assert exc.value.location == "colour"
    assert loaded.store.search("Observation", [("colour", "red")], strict=False).total == 16  # 7 + 5 + 2 + 2
    with pytest.raises(InputError) as exc:
        loaded.store.search("Observation", [("date", "2024-13")])
    assert exc.value.location == "date"


def test_stored_references_point_to_stored_resources(loaded: Pipeline) -> None:
    report = loaded.store.search("DiagnosticReport", [("identifier", "R2405200099")]).resources[0]
    patient_ref = report["subject"]["reference"]
    assert patient_ref.startswith("Patient/")
    rtype, rid = patient_ref.split("/")
    assert loaded.store.read(rtype, rid)["identifier"][0]["value"] == "511921196612120011"
    for result in report["result"]:
        assert loaded.store.read(*result["reference"].split("/"))["resourceType"] == "Observation"


def test_search_by_id_and_by_subject(loaded: Pipeline) -> None:
    reports = loaded.store.search("DiagnosticReport", [("identifier", "R2405200099,R2405200100")]).resources
    assert len(reports) == 2
    ids = ",".join(r["id"] for r in reports)
    assert loaded.store.search("DiagnosticReport", [("_id", ids)]).total == 2
    assert loaded.store.search("DiagnosticReport", [("_id", reports[0]["id"])]).total == 1
    patient = reports[0]["subject"]["reference"]
    by_subject = loaded.store.search("Observation", [("subject", patient)])
    by_patient = loaded.store.search("Observation", [("patient", patient.split("/")[1])])
    assert by_subject.total == by_patient.total == 7  # the v2.5.1 sample's seven results


def test_messages_are_worked_without_holding_the_database_write_lock(pipeline: Pipeline) -> None:
    """Checking and signing a batch happen between its two commits, so other writers are not held up."""
    seen: list[bool] = []
    check = pipeline.checker

    def watching(bundle):  # type: ignore[no-untyped-def]
        seen.append(pipeline.store.db.conn.in_transaction)
        return check(bundle)

    pipeline.checker = watching
    outcomes = pipeline.ingest(UTF8 + b"\r\n" + ANALYSER, "hl7v2", channel="file")
    assert [o.status for o in outcomes] == [Status.STORED, Status.STORED, Status.FILTERED]
    assert seen == [False, False]
    assert pipeline.store.db.execute("SELECT count(*) FROM messages WHERE status = 'received'").fetchone()[0] == 0


def test_attempts_the_database_could_not_record_do_not_count(pipeline: Pipeline, monkeypatch) -> None:
    """A message whose recording the database refused again and again (a full disk, the server away), resent by
    its LIS each time no ACK came: once the database takes writes again it is stored (after three resends it was set
    aside as failed, "taken on 3 times without finishing (the gateway stopped each time)", and answered AE)."""
    from gateway.errors import DatabaseUnavailable

    def full(*_: object, **__: object) -> None:
        raise DatabaseUnavailable("database or disk is full")

    with monkeypatch.context() as m:
        m.setattr(Pipeline, "_commit", full)
        for _ in range(5):
            with pytest.raises(DatabaseUnavailable):
                pipeline.ingest(UTF8, "hl7v2", channel="mllp")
    [held] = pipeline.store.list_messages()
    assert held.status == "received" and held.attempts <= 1 and not held.lease_owner
    again = pipeline.ingest(UTF8, "hl7v2", channel="mllp")[0]
    assert again.status is Status.STORED and again.ack_code == "AA", again.issues
    assert pipeline.store.counts() == {"stored": 1}
