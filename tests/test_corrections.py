"""Corrected reports supersede the stored earlier version, whenever they arrive, and the decisions on it are withdrawn.

Two member gateways of the demo world (通江 issues, 涪陵 receives), each with its own database, keys and the
signed demo snapshot; requests between them go through the real Flask apps (see tests/test_exchange.py).

The HL7 v2 cases build their messages here: an original blood count (OBR-25 ``F``) and its correction
(OBR-25 ``C``, OBX-11 ``C``, same 检验报告单号 OBR-3, a later OBR-22). The CDA cases use the ready pair
``tests/data/cda/lab-report-full.xml`` and ``lab-report-corrected.xml`` (relatedDocument RPLC).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import Clock
from gateway import jsonutil
from gateway.audit.log import entries
from gateway.audit.stats import compute
from gateway.audit.verify import verify
from gateway.commands.audit import audit
from gateway.demo import MEMBERS
from gateway.recognition.engine import decide_all
from gateway.recognition.facts import facts_from_bundle
from gateway.recognition.store import list_decisions, save_decisions
from gateway.store.reports import versions_of
from gateway.demo.world import build_world
from gateway.pipeline import Status
from test_exchange import URLS, Routed

CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc
PATIENT = "511921196612120011"
NUMBER = "R2611200001"
CDA = Path(__file__).resolve().parent / "data" / "cda"
CDA_NUMBER = "JY202411050123"


def blood_count(control_id: str, *, corrected: bool, issued: str, wbc: str) -> bytes:
    """An ORU^R01 of 通江's LIS: the blood count of 王建国 (OBR-3 R2611200001), original or corrected."""
    status = "C" if corrected else "F"
    segments = [
        f"MSH|^~\\&|LIS|TJXRMYY|GATEWAY|CYHR|{issued}||ORU^R01^ORU_R01|{control_id}|P|2.5.1||||||UNICODE UTF-8",
        f"PID|1||Z0099812^^^TJXRMYY^MR~{PATIENT}^^^^NNCHN||王^建国||19661212|M",
        f"OBR|1|O2611200001|{NUMBER}|BLRT^血常规^L|||20261120073000|||||||||||||||{issued}|||{status}"
        "|||||||2033&陈&明",
        f"OBX|1|NM|WBC^白细胞计数^L||{wbc}|10*9/L|3.5-9.5|N|||{status}",
        f"OBX|2|NM|RBC^红细胞计数^L||4.62|10*12/L|4.3-5.8|N|||{status}",
        f"OBX|3|NM|HGB^血红蛋白^L||139|g/L|130-175|N|||{status}",
        f"OBX|4|NM|PLT^血小板计数^L||188|10*9/L|125-350|N|||{status}",
        "SPM|1|S2611200001||BLD^全血^HL70487|||||||P^Patient^HL70369||||||20261120073000|20261120074500",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


ORIGINAL = blood_count("TJ2611200001", corrected=False, issued="20261120082500", wbc="6.8")
CORRECTION = blood_count("TJ2611200101", corrected=True, issued="20261120102500", wbc="7.1")


@pytest.fixture
def clock() -> Clock:
    return Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))


def routed_world(tmp_path, clock, member_database, members=("tongjiang", "fuling")):
    """Member gateways of the demo world whose requests to each other go through their real Flask apps."""
    w = build_world(tmp_path, clock, URLS, members=members, database=member_database)
    transport = Routed(w)
    for gw in w.gateways.values():
        gw.pipeline.exchange.transport = transport
    return w


@pytest.fixture
def world(tmp_path, clock, member_database):
    return routed_world(tmp_path, clock, member_database)


def ingest(pipeline, data: bytes, fmt: str = "hl7v2"):
    stored = [o for o in pipeline.ingest(data, fmt, channel="test") if o.bundle is not None]
    assert stored, [o.issues for o in pipeline.ingest(data, fmt, channel="test")]
    return stored


def report_of(bundle):
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")


def decisions_for_patient(pipeline):
    return [d.to_dict() for d in list_decisions(pipeline.store.db, patient=PATIENT)]


def report_status_rule(decision):
    return next(r for r in decision["rules"] if r["rule"] == "report-status")


def original_recognised_at_fuling(tj, fl) -> tuple[dict, list[dict]]:
    """通江 stores the original blood count and pushes it to 涪陵, which recognises its four results: (the original
    Bundle, 涪陵's decisions on it)."""
    original = ingest(tj, ORIGINAL)[0].bundle
    tj.exchange.push(original["id"], FL)
    assert tj.exchange.deliver()["delivered"] == 1
    first = decisions_for_patient(fl)
    assert [d["outcome"] for d in first] == ["recognized"] * 4
    return original, first


def test_hl7_correction_after_the_original_reaches_the_receiver_and_withdraws_its_decisions(world) -> None:
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    original, first = original_recognised_at_fuling(tj, fl)

    correction = ingest(tj, CORRECTION)[0].bundle
    assert report_of(correction)["status"] == "corrected"
    # 通江: the original's version is superseded by the correction
    versions = versions_of(tj.store.db, TJ, NUMBER)
    assert [(v.bundle_id, v.superseded_by is not None) for v in versions] == [
        (original["id"], True), (correction["id"], False)]
    # the correction was queued for 涪陵 (where the original went) and goes by the ordinary delivery
    assert tj.exchange.pushed_to(correction["id"]) == [FL]
    assert tj.exchange.deliver()["delivered"] == 1
    sent = [e for e in entries(tj.store.db) if e.kind == "exchange"]
    assert len(sent) == 2  # both deliveries audited at 通江

    # 涪陵: the correction's decisions are in force; the original's are withdrawn, reading not-recognised
    after = decisions_for_patient(fl)
    assert len(after) == 8
    current = [d for d in after if d["result"]["bundle"].endswith(correction["id"])]
    withdrawn = [d for d in after if d.get("withdrawn")]
    assert [d["outcome"] for d in current] == ["recognized"] * 4
    assert {d["decision_id"] for d in withdrawn} == {d["decision_id"] for d in first}
    for d in withdrawn:
        assert d["outcome"] == "not-recognized" and d["decided_outcome"] == "recognized"
        assert d["withdrawn"]["reason"].startswith("superseded by DiagnosticReport/")
        assert "corrected" in d["withdrawn"]["reason"]
    recognised = list_decisions(fl.store.db, patient=PATIENT, outcome="recognized")
    assert {d.decision["decision_id"] for d in recognised} == {d["decision_id"] for d in current}

    # audited once per withdrawn decision, chain intact, and the 互认率 counts the correction only
    withdrawals = [e for e in entries(fl.store.db) if e.kind == "withdrawal"]
    assert sorted(e.facts["decision_id"] for e in withdrawals) == sorted(d["decision_id"] for d in first)
    assert verify(fl.store.db).ok
    figures = compute(fl.store.db)["total"]
    assert (figures["recognized"], figures["not_recognized"], figures["eligible"]) == (4, 0, 4)

    # the earlier version stays readable with the status it was signed with; a search by the number finds the
    # correction only
    assert_superseded_readable(fl.store, report_of(original)["id"], report_of(correction)["id"])


def assert_superseded_readable(store, old_id: str, new_id: str) -> None:
    """The superseded report is read by its id (tagged superseded), or — when the correction kept its resource
    id — found in that id's history; a search by the report number gives the correction alone."""
    assert store.read("DiagnosticReport", new_id)["status"] == "corrected"
    if old_id == new_id:
        history = store.history("DiagnosticReport", new_id)
        assert [r["status"] for r in history.resources] == ["corrected", "final"]
    else:
        old = store.read("DiagnosticReport", old_id)
        assert old["status"] == "final"
        assert [t["code"] for t in old["meta"]["tag"]] == ["superseded"]
    found = store.search("DiagnosticReport", [("identifier", f"urn:oid:2.16.156.10011.1.33|{NUMBER}")])
    assert [r["id"] for r in found.resources] == [new_id]
    # nor does _revinclude find the superseded version (the patient's reports, as Patient?_revinclude adds them)
    subject = store.read("DiagnosticReport", new_id)["subject"]["reference"]
    numbered = [r["id"] for r in store.referencing("DiagnosticReport", "subject", [subject], 100)
                if any(i.get("value") == NUMBER for i in r.get("identifier", []))]
    assert numbered == [new_id]


def test_withdrawal_is_found_by_audit_query(world, tmp_path) -> None:
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    original = ingest(tj, ORIGINAL)[0].bundle
    tj.exchange.push(original["id"], FL)
    tj.exchange.deliver()
    ingest(tj, CORRECTION)
    tj.exchange.deliver()
    runner = CliRunner()
    db = str(world.gateways["fuling"].settings.database_locator)
    res = runner.invoke(audit, ["query", "--db", db, "--json", "type=recognition-withdrawal"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.output)
    assert len(found["entry"]) == 4
    event = found["entry"][0]["resource"]
    assert event["outcomeDesc"].startswith("superseded by DiagnosticReport/")
    details = {d["type"]: d.get("valueString") for e in event["entity"] for d in e.get("detail", [])}
    assert details["decided-outcome"] == "recognized" and details["superseded-by"].startswith("DiagnosticReport/")
    assert runner.invoke(audit, ["verify", "--db", db]).exit_code == 0
    stats = json.loads(runner.invoke(audit, ["stats", "--db", db, "--json"]).output)
    assert stats["total"]["recognized"] == 4
    assert len(list_decisions(fl.store.db, outcome="not-recognized")) == 4  # the withdrawn ones, as they read now
    # and as `decisions list` shows them to a physician (it printed them as recognized, with no word of it)
    from gateway.commands.recognize import decisions as decisions_cli

    listed = runner.invoke(decisions_cli, ["list", "--db", db, "--outcome", "not-recognized"])
    assert listed.exit_code == 0, listed.output
    lines = [line for line in listed.stdout.splitlines() if "withdrawn" in line]
    assert len(lines) == 4 and all(line.split()[1] == "not-recognized" for line in lines), listed.stdout
    assert all("decided recognized" in line and "superseded by DiagnosticReport/" in line for line in lines)


def test_correction_first_then_the_late_original_is_stored_superseded(world) -> None:
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    correction = ingest(tj, CORRECTION)[0].bundle
    original = ingest(tj, ORIGINAL)[0].bundle
    versions = {v.bundle_id: v for v in versions_of(tj.store.db, TJ, NUMBER)}
    assert versions[original["id"]].superseded_by == versions[correction["id"]].seq
    assert versions[correction["id"]].superseded_by is None
    # the late original is stored superseded: what is read and found is still the correction
    assert_superseded_readable(tj.store, report_of(original)["id"], report_of(correction)["id"])
    wbc = [r for r in tj.store.search("Observation", [("patient.identifier", PATIENT)], count=50).resources
           if r["code"]["text"] == "白细胞计数"]
    assert [str(o["valueQuantity"]["value"]) for o in wbc] == ["7.1"]
    # 调阅 at 通江 answers the correction, not the superseded original
    pulled = fl.exchange.pull(TJ, f"urn:oid:2.16.156.10011.1.3|{PATIENT}")
    assert [v.bundle["id"] for v in pulled] == [correction["id"]]

    # 涪陵 receives them out of order too: the late original is decided as superseded, never recognised
    tj.exchange.push(correction["id"], FL)
    tj.exchange.deliver()
    # (the original queued as it was while in flight: `push` refuses a version a stored correction supersedes)
    from gateway.store.exchange import SignedBundles

    in_flight = SignedBundles(tj.store.db).latest_issued(original["id"])
    assert in_flight is not None
    tj.exchange.outbox.enqueue(FL, tj.exchange.endpoint_of(FL), in_flight)
    tj.exchange.deliver()
    decisions = decisions_for_patient(fl)
    late = [d for d in decisions if d["result"]["bundle"].endswith(original["id"])]
    assert len(late) == 4 and all(d["outcome"] == "not-recognized" for d in late)
    assert all(report_status_rule(d)["message"].startswith("the report has been superseded by DiagnosticReport/")
               for d in late)
    assert not any(d.get("withdrawn") for d in decisions)  # nothing recognised was said, nothing to withdraw
    figures = compute(fl.store.db)["total"]
    assert (figures["recognized"], figures["eligible"]) == (4, 4)


def test_original_and_correction_in_one_batch(world) -> None:
    tj = world.gateways["tongjiang"].pipeline
    stored = ingest(tj, ORIGINAL + b"\x1c\r" + CORRECTION)
    assert len(stored) == 2
    versions = versions_of(tj.store.db, TJ, NUMBER)
    assert [v.superseded_by is not None for v in versions] == [True, False]


def test_cda_correction_tags_the_original_and_withdraws_local_decisions(world, clock) -> None:
    tj = world.gateways["tongjiang"].pipeline
    original = ingest(tj, (CDA / "lab-report-full.xml").read_bytes(), "cda")[0].bundle
    # a decision on the original recorded here (as `gateway recognize --store` does)
    snapshot = tj.exchange._snapshot()
    decided = decide_all(facts_from_bundle(original), snapshot, FL, clock())
    save_decisions(tj.store.db, decided, clock())
    correction = ingest(tj, (CDA / "lab-report-corrected.xml").read_bytes(), "cda")[0].bundle
    old_id, new_id = report_of(original)["id"], report_of(correction)["id"]
    assert old_id != new_id  # CDA: each document its own resources

    # the earlier DiagnosticReport stays readable, its status as signed, tagged superseded
    old = tj.store.read("DiagnosticReport", old_id)
    assert old["status"] == "final"
    assert {(t["system"].rsplit("/", 1)[-1], t["code"]) for t in old["meta"]["tag"]} == {
        ("report-version-status", "superseded")}
    assert "tag" not in tj.store.read("DiagnosticReport", new_id)["meta"]
    # a search by the report number finds the current version; the original by its id
    found = tj.store.search("DiagnosticReport", [("identifier", f"urn:oid:2.16.156.10011.1.33|{CDA_NUMBER}")])
    assert [r["id"] for r in found.resources] == [new_id]
    assert tj.store.search("DiagnosticReport", [("_id", old_id)]).total == 1

    stored = [d.to_dict() for d in list_decisions(tj.store.db)]
    assert len(stored) == len(decided) and all(d["withdrawn"]["superseded_by"].startswith(
        f"DiagnosticReport/{new_id}") for d in stored)
    assert all(d["outcome"] == "not-recognized" for d in stored)
    kinds = [e.kind for e in entries(tj.store.db)]
    assert kinds.count("withdrawal") == len(decided)
    assert verify(tj.store.db).ok
    # a decision made now on the superseded report says so (rule report-status)
    from gateway.recognition.facts import with_superseded
    from gateway.store.reports import superseded_in

    again = decide_all(with_superseded(facts_from_bundle(original), superseded_in(tj.store.db, original)),
                       snapshot, FL, clock())
    assert {d.outcome for d in again} == {"not-recognized"}
    assert all(d.rule("report-status").status == "failed" for d in again if d.facts.kind == "observation")


def test_late_original_under_the_same_resource_ids_leaves_the_correction_current(world) -> None:
    """Versions stored under one set of resource ids (a system that keeps its ids across a correction): the
    late original goes into the resources' history, and what is read and found is still the correction."""
    tj = world.gateways["tongjiang"].pipeline
    original = next(o.bundle for o in tj.convert(ORIGINAL, "hl7v2") if o.bundle)
    correction = next(o.bundle for o in tj.convert(CORRECTION, "hl7v2") if o.bundle)
    text = jsonutil.dumps(correction)
    by_code = {r["code"]["text"]: r["id"] for r in (e["resource"] for e in original["entry"])
               if r["resourceType"] == "Observation"}
    for e in correction["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            text = text.replace(r["id"], by_code[r["code"]["text"]])
    text = text.replace(report_of(correction)["id"], report_of(original)["id"])
    report_id = report_of(original)["id"]
    ingest(tj, text.encode("utf-8"), "fhir")
    ingest(tj, jsonutil.dumps(original).encode("utf-8"), "fhir")
    versions = versions_of(tj.store.db, TJ, NUMBER)
    assert [(v.status, v.superseded_by is not None) for v in versions] == [("corrected", False), ("final", True)]
    assert tj.store.read("DiagnosticReport", report_id)["status"] == "corrected"
    assert {r["status"] for r in tj.store.history("DiagnosticReport", report_id).resources} == {"corrected", "final"}
    wbc = tj.store.read("Observation", by_code["白细胞计数"])
    assert str(wbc["valueQuantity"]["value"]) == "7.1"
    found = tj.store.search("DiagnosticReport", [("identifier", f"urn:oid:2.16.156.10011.1.33|{NUMBER}")])
    assert [r["status"] for r in found.resources] == ["corrected"]


def test_the_superseded_tag_is_a_code_of_the_guide() -> None:
    """The meta.tag a superseded version carries is the published code, with its published display."""
    from conftest import ROOT
    from gateway.fhir.profiles import load_guide
    from gateway.store.reports import SUPERSEDED_TAG

    cs = load_guide(ROOT / "profiles").get("CodeSystem", "report-version-status")
    assert cs is not None and cs["url"] == SUPERSEDED_TAG["system"]
    assert {c["code"]: c["display"] for c in cs["concept"]}[SUPERSEDED_TAG["code"]] == SUPERSEDED_TAG["display"]


def test_two_reports_under_one_number_are_not_versions_of_each_other(world) -> None:
    """A LIS that numbers every panel of one specimen alike: correcting the blood count supersedes the
    earlier blood count only, never the other panel stored under the same 检验报告单号."""
    tj = world.gateways["tongjiang"].pipeline
    other_panel = ORIGINAL.replace("BLRT^血常规^L".encode(), "CRP^C反应蛋白^L".encode())
    other_panel = other_panel.replace(b"|TJ2611200001|", b"|TJ2611200002|")
    ingest(tj, ORIGINAL)
    ingest(tj, other_panel)
    ingest(tj, CORRECTION)
    versions = versions_of(tj.store.db, TJ, NUMBER)
    assert len(versions) == 3 and len({v.report_code for v in versions}) == 2
    superseded = [v for v in versions if v.superseded_by is not None]
    current = [v for v in versions if v.superseded_by is None]
    assert [v.report_code.split("|")[1] for v in superseded] == ["BLRT"]
    assert sorted(v.report_code.split("|")[1] for v in current) == ["BLRT", "CRP"]
    assert {v.status for v in current} == {"final", "corrected"}


def cda_correction_under_a_new_number(new_number: str) -> bytes:
    """``lab-report-corrected.xml`` issued under ``new_number``, its relatedDocument RPLC naming the corrected
    report's 检验报告单号 (a parentDocument id @root 2.16.156.10011.1.33) besides its 文档流水号."""
    corrected = (CDA / "lab-report-corrected.xml").read_bytes().replace(
        f'<id root="2.16.156.10011.1.33" extension="{CDA_NUMBER}"/>'.encode(),
        f'<id root="2.16.156.10011.1.33" extension="{new_number}"/>'.encode(), 1)
    parent = b'<setId root="2.16.156.10011.1.1" extension="TJRMYY-JY-20241105-000123"/>\n      <versionNumber'
    assert corrected.count(parent) == 1
    return corrected.replace(parent, parent.replace(
        b"<versionNumber", f'<id root="2.16.156.10011.1.33" extension="{CDA_NUMBER}"/>\n      <versionNumber'.encode()))


@pytest.mark.parametrize("correction_first", [False, True], ids=["original-first", "correction-first"])
def test_cda_correction_under_a_new_number_supersedes_the_report_its_rplc_names(world, correction_first) -> None:
    """A corrected document issued under a 检验报告单号 of its own, its relatedDocument RPLC naming the corrected
    report's number: the report under that number is superseded, whichever of the two arrives first."""
    new_number = "JY202411060031"
    corrected = cda_correction_under_a_new_number(new_number)
    assert corrected.count(new_number.encode()) == 1 and corrected.count(CDA_NUMBER.encode()) == 2
    tj = world.gateways["tongjiang"].pipeline
    documents = [(CDA / "lab-report-full.xml").read_bytes(), corrected]
    bundles = [ingest(tj, data, "cda")[0].bundle for data in (documents[::-1] if correction_first else documents)]
    original, correction = bundles[::-1] if correction_first else bundles
    replaces = report_of(correction)["extension"][0]["valueIdentifier"]
    assert (replaces["system"], replaces["value"]) == ("urn:oid:2.16.156.10011.1.33", CDA_NUMBER)
    [old] = versions_of(tj.store.db, TJ, CDA_NUMBER)
    [new] = versions_of(tj.store.db, TJ, new_number)
    assert (old.bundle_id, old.superseded_by) == (original["id"], new.seq)
    assert (new.bundle_id, new.superseded_by, new.replaces) == (correction["id"], None, CDA_NUMBER)
    old_report = tj.store.read("DiagnosticReport", report_of(original)["id"])
    assert old_report["status"] == "final" and [t["code"] for t in old_report["meta"]["tag"]] == ["superseded"]
    assert tj.store.search("DiagnosticReport", [("identifier", f"urn:oid:2.16.156.10011.1.33|{CDA_NUMBER}")]
                           ).total == 0
    found = tj.store.search("DiagnosticReport", [("identifier", f"urn:oid:2.16.156.10011.1.33|{new_number}")])
    assert [r["id"] for r in found.resources] == [report_of(correction)["id"]]
    from gateway.store.reports import superseded_in

    # a decision on the original says it is superseded (rule report-status)
    assert list(superseded_in(tj.store.db, original).values()) == [new.describe()]


def test_a_versions_table_of_an_earlier_release_gets_the_replaces_column() -> None:
    """SQLite only: a table of an earlier release (PostgreSQL databases start at today's layout)."""
    from gateway.store.db import connect
    from gateway.store.reports import SCHEMA, ensure_schema

    db = connect(":memory:")
    older = SCHEMA[0].replace(" replaces TEXT NOT NULL DEFAULT '',", "")  # the table as an earlier release made it
    assert "replaces" not in older
    db.execute(older)
    db.execute("INSERT INTO report_versions (issuer_uscc, report_number, report_code, report_id, report_ref,"
               " bundle_key, bundle_id, direction, status, recorded_at) VALUES"
               " (?, ?, '', 'x|1', 'DiagnosticReport/a', 'b', 'b', 'issued', 'final', 't')", [TJ, NUMBER])
    ensure_schema(db)
    [version] = versions_of(db, TJ, NUMBER)
    assert (version.report_ref, version.replaces) == ("DiagnosticReport/a", "")
    assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'report_versions_replaces'").fetchone()


def test_a_reports_versions_are_read_through_indexes_not_a_scan_of_its_issuers_reports(tmp_path, database) -> None:
    """Finding the versions next to a report number reads the number's index and the corrections' index, on
    either engine, however many reports the issuer has stored (a scan of them made every stored report slower
    than the one before)."""
    from gateway.store.db import connect, dialect
    from gateway.store.reports import _ADJACENT, _adjacent_args, ensure_schema

    db = connect(database or tmp_path / "gw.db")
    ensure_schema(db)
    args = _adjacent_args(TJ, "http://loinc.org|24323-8", NUMBER)
    if dialect(db) == "sqlite":
        plan = " / ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + _ADJACENT, args))
        assert "report_versions_report" in plan and "report_versions_replaces" in plan, plan
    else:
        db.execute("SET enable_seqscan = off")  # an empty table: the planner would scan it whatever the indexes
        plan = " / ".join(str(r[0]) for r in db.execute("EXPLAIN " + _ADJACENT, args))
        assert "report_versions_report" in plan and "report_versions_replaces" in plan, plan
    assert "SCAN" not in plan.upper().replace("INDEX SCAN", "").replace("BITMAP HEAP SCAN", ""), plan
    db.conn.close()


def test_a_report_taken_back_reaches_the_receiver_and_withdraws_its_decisions(world) -> None:
    """The LIS takes a final report back (OBR-25 ``X``: cancelled): like a correction, it supersedes the original at
    the issuer, follows it to the member it was pushed to, and there withdraws the decisions on it; its own results
    are decided not recognised (the report is cancelled) and counted nowhere: the 互认率 has no result of it left.
    (The receiver kept the original recognised, counted in its figures.)"""
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    original, first = original_recognised_at_fuling(tj, fl)

    cancelled_message = ORIGINAL.replace(b"|TJ2611200001|", b"|TJ2611200201|").replace(
        b"|20261120082500|||F|", b"|20261120112500|||X|").replace(b"|N|||F", b"|N|||X")
    cancelled = ingest(tj, cancelled_message)[0].bundle
    assert report_of(cancelled)["status"] == "cancelled"
    versions = versions_of(tj.store.db, TJ, NUMBER)
    assert [(v.bundle_id, v.superseded_by is not None) for v in versions] == [
        (original["id"], True), (cancelled["id"], False)]
    assert tj.exchange.pushed_to(cancelled["id"]) == [FL]
    assert tj.exchange.deliver()["delivered"] == 1

    after = decisions_for_patient(fl)
    withdrawn = [d for d in after if d.get("withdrawn")]
    assert {d["decision_id"] for d in withdrawn} == {d["decision_id"] for d in first}
    assert all("cancelled" in d["withdrawn"]["reason"] for d in withdrawn)
    on_cancelled = [d for d in after if d["result"]["bundle"].endswith(cancelled["id"])]
    assert on_cancelled and all(d["outcome"] == "not-recognized" for d in on_cancelled)
    assert all("the report is cancelled" in report_status_rule(d)["message"] for d in on_cancelled)
    figures = compute(fl.store.db)["total"]
    assert (figures["decisions"], figures["eligible"]) == (0, 0), figures
    assert verify(fl.store.db).ok


def test_a_final_report_sent_after_its_correction_or_cancellation_is_told_it_is_not_current(world) -> None:
    """A final report sent again after the report was corrected (or taken back) is stored as an earlier version,
    superseded: searches, 调阅 and decisions take the correction. It was answered with a plain AA and no word, and
    the lab believed its report live. Now a warning names OBR-3 and what supersedes it; the first original was
    answered without one."""
    tj = world.gateways["tongjiang"].pipeline
    first = ingest(tj, ORIGINAL)[0]
    assert not [i for i in first.issues if "is superseded by" in i.message]
    ingest(tj, CORRECTION)
    late = ingest(tj, blood_count("TJ2611200501", corrected=False, issued="20261120082500", wbc="6.9"))[0]
    [said] = [i for i in late.issues if "is superseded by" in i.message]
    assert said.severity == "warning" and said.location == "OBR[1]-3" and "corrected" in said.message
    assert b"ERR||OBR^1^3|205" in late.answer and b"MSA|AA|TJ2611200501" in late.answer
    cancelled = blood_count("TJ2611200502", corrected=False, issued="20261120122500", wbc="7.1").replace(
        b"|||F|", b"|||X|").replace(b"|N|||F", b"|N|||X")
    ingest(tj, cancelled)
    again = ingest(tj, blood_count("TJ2611200503", corrected=False, issued="20261120082500", wbc="6.9"))[0]
    assert [i for i in again.issues if "is superseded by" in i.message and "cancelled" in i.message]


def wbc_of(store, bundle) -> float:
    """The white cell count the current version of ``bundle``'s blood count holds in ``store``."""
    report = store.read("DiagnosticReport", report_of(bundle)["id"])
    for ref in report["result"]:
        obs = store.read(*ref["reference"].split("/"))
        if any(c["code"] in ("WBC", "6690-2") for c in obs["code"]["coding"]):
            return float(obs["valueQuantity"]["value"])
    raise AssertionError("no white cell count")


def test_a_final_report_sent_again_with_changed_values_follows_the_first_to_members(world) -> None:
    """A LIS that sends a final report again with changed values and a later OBR-22, not marked as a correction
    (OBR-25 F again): the same resources get a new version (their ids, history and ETags as before), and the
    earlier version is superseded. It was not sent on, and a member that had recognised the first version kept
    those decisions beside decisions on the new values. Now it follows the first to every member that was sent it,
    and there the decisions on the earlier values are withdrawn."""
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    original, first = original_recognised_at_fuling(tj, fl)

    changed = ingest(tj, blood_count("TJ2611200601", corrected=False, issued="20261120102500", wbc="7.1"))[0]
    assert changed.ack_code == "AA" and not changed.issues
    resent = changed.bundle
    assert report_of(resent)["id"] == report_of(original)["id"] and report_of(resent)["status"] == "final"
    assert [r["status"] for r in tj.store.history("DiagnosticReport", report_of(resent)["id"]).resources] == [
        "final", "final"]
    versions = versions_of(tj.store.db, TJ, NUMBER)
    assert [(v.bundle_id, v.superseded_by) for v in versions] == [(original["id"], versions[1].seq),
                                                                  (resent["id"], None)]
    assert tj.exchange.pushed_to(resent["id"]) == [FL]
    assert tj.exchange.deliver()["delivered"] == 1

    after = decisions_for_patient(fl)
    current = [d for d in after if d["result"]["bundle"].endswith(resent["id"])]
    withdrawn = [d for d in after if d.get("withdrawn")]
    assert [d["outcome"] for d in current] == ["recognized"] * 4
    assert {d["decision_id"] for d in withdrawn} == {d["decision_id"] for d in first}
    for d in withdrawn:
        assert d["withdrawn"]["reason"] == (f"superseded by DiagnosticReport/{report_of(resent)['id']} (final, issued "
                                            "2026-11-20T10:25:00+08:00)")
    assert wbc_of(fl.store, resent) == 7.1
    assert verify(fl.store.db).ok
    figures = compute(fl.store.db)["total"]
    assert (figures["recognized"], figures["eligible"]) == (4, 4)

    # the first version sent again late: told it is not current, the resources keep the later values, not sent on
    late = ingest(tj, blood_count("TJ2611200602", corrected=False, issued="20261120082500", wbc="6.8"))[0]
    [said] = [i for i in late.issues if "is superseded by" in i.message]
    assert said.location == "OBR[1]-3" and "issued 2026-11-20T10:25:00+08:00" in said.message
    assert wbc_of(tj.store, resent) == 7.1
    assert not tj.exchange.pushed_to(late.bundle["id"])


def test_a_final_report_sent_again_unchanged_supersedes_nothing_and_is_not_sent_on(world) -> None:
    """The same final report sent again under a new control id (a LIS resending what it sent): nothing is
    superseded, no decision is withdrawn and nothing is sent to the members again."""
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    original, first = original_recognised_at_fuling(tj, fl)
    again = ingest(tj, blood_count("TJ2611200701", corrected=False, issued="20261120082500", wbc="6.8"))[0]
    assert again.ack_code == "AA" and not again.issues
    assert [v.superseded_by for v in versions_of(tj.store.db, TJ, NUMBER)] == [None, None]
    assert not tj.exchange.pushed_to(again.bundle["id"])
    assert decisions_for_patient(fl) == first


def test_a_cda_report_issued_again_under_a_new_document_id_without_rplc_is_said(world) -> None:
    """A LIS issuing a report again under a new 文档流水号 without relatedDocument RPLC: both documents stay current,
    two final versions of one report side by side. It went by without a word; now a warning names the number's
    element and the document holding it. The first document, and a proper correction (RPLC), get no such word."""
    tj = world.gateways["tongjiang"].pipeline
    full = (CDA / "lab-report-full.xml").read_bytes()
    first = ingest(tj, full, "cda")[0]
    assert not [i for i in first.issues if "is held current by another document" in i.message]
    again = ingest(tj, full.replace(b"TJRMYY-JY-20241105-000123", b"TJRMYY-JY-20241105-000777"), "cda")[0]
    [said] = [i for i in again.issues if "is held current by another document" in i.message]
    assert said.location.endswith("recordTarget/patientRole/id[@root='2.16.156.10011.1.33']/@extension")
    assert f"检验报告单号 {CDA_NUMBER}" in said.message and said.severity == "warning"
    corrected = ingest(tj, (CDA / "lab-report-corrected.xml").read_bytes(), "cda")[0]
    assert not [i for i in corrected.issues if "is held current by another document" in i.message]


def test_a_version_a_correction_supersedes_is_not_sent_to_a_member_and_the_current_one_is_named(world) -> None:
    """`gateway send` of the original after its correction sent the original: a member that never had it stored and
    recognised the value the lab corrected, and nothing followed it there. Refused now, naming the correction's
    Bundle; the correction itself is sent."""
    from gateway.errors import InputError

    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    original = ingest(tj, ORIGINAL)[0].bundle
    correction = ingest(tj, CORRECTION)[0].bundle
    with pytest.raises(InputError) as refused:
        tj.exchange.push(original["id"], FL)
    assert f"superseded by DiagnosticReport/{report_of(correction)['id']}" in refused.value.message
    assert f"in Bundle {correction['id']}: send that one" in refused.value.message
    assert not tj.exchange.pushed_to(original["id"])
    tj.exchange.push(correction["id"], FL)
    assert tj.exchange.deliver()["delivered"] == 1
    assert [d["outcome"] for d in decisions_for_patient(fl)] == ["recognized"] * 4


def _other_patient(document: bytes, doc_id: str) -> bytes:
    """``document`` for 王建国 instead of 李演示 (the same 检验报告单号), under the 文档流水号 ``doc_id``."""
    return (document.replace(b"511921197506080022", PATIENT.encode()).replace("李演示".encode(), "王建国".encode())
            .replace(b'code="2" codeSystem="2.16.156.10011.2.3.3.4"', b'code="1" codeSystem="2.16.156.10011.2.3.3.4"')
            .replace(b"19750608", b"19661212").replace(b"TJRMYY-JY-20241105-000123", doc_id.encode()))


def test_a_cda_report_number_of_another_patient_is_refused_and_supersedes_nothing(world) -> None:
    """A 检验报告单号 reused for another patient (numbers restarted): the second document was stored, and the first
    patient's correction then superseded the other patient's report too (out of searches, 调阅 and decisions).
    Now the reused number is refused naming its element, and so is a correction naming another patient's number;
    the first patient's own correction supersedes their own report alone."""
    tj = world.gateways["tongjiang"].pipeline
    full = (CDA / "lab-report-full.xml").read_bytes()
    original = ingest(tj, full, "cda")[0].bundle
    reused = tj.ingest(_other_patient(full, "TJRMYY-JY-20241105-000999"), "cda", channel="test")[0]
    assert reused.status is Status.REFUSED
    [issue] = reused.errors
    assert issue.location.endswith("recordTarget/patientRole/id[@root='2.16.156.10011.1.33']/@extension")
    assert f"检验报告单号 {CDA_NUMBER} was stored for another patient" in issue.message
    assert not tj.store.search("Patient", [("identifier", PATIENT)]).resources
    # a correction (RPLC) of 李演示's report, for 王建国 under a number of his own: refused naming what it replaces
    corrected = (CDA / "lab-report-corrected.xml").read_bytes()
    theirs = (corrected.replace(b"511921197506080022", PATIENT.encode()).replace("李演示".encode(), "王建国".encode())
              .replace(f'<id root="2.16.156.10011.1.33" extension="{CDA_NUMBER}"/>'.encode(),
                       b'<id root="2.16.156.10011.1.33" extension="JY202411059999"/>')
              .replace(b"<parentDocument>", f'<parentDocument>\n      <id root="2.16.156.10011.1.33" '
                       f'extension="{CDA_NUMBER}"/>'.encode()))
    assert theirs.count(b"JY202411059999") == 1 and theirs.count(CDA_NUMBER.encode()) == 2 and b"RPLC" in theirs
    out = tj.ingest(theirs, "cda", channel="test")[0]
    assert out.status is Status.REFUSED, out.issues
    assert [i.location.rsplit("/", 3)[-3:] for i in out.errors] == [["parentDocument", "id", "@extension"]]
    assert f"replaces 检验报告单号 {CDA_NUMBER}, a report stored for another patient" in out.errors[0].message
    # 李演示's own correction: taken, superseding her report
    mine = ingest(tj, corrected, "cda")[0].bundle
    assert report_of(mine)["status"] == "corrected"
    versions = versions_of(tj.store.db, TJ, CDA_NUMBER)
    assert [(v.bundle_id, v.superseded_by is not None) for v in versions] == [
        (original["id"], True), (mine["id"], False)]


def test_a_cdc_exam_exported_again_with_changes_corrects_the_one_sent(tmp_path, clock, member_database) -> None:
    """A CDC exports an exam again after changing a result (the same 体检编号, the same worker): it corrects the
    exam stored before, and follows it to the member that was sent it, where the decisions on the first export
    are withdrawn. (It was stored over the first as one more final report, and the member kept the old one.)"""
    w = routed_world(tmp_path, clock, member_database, members=("sccdc", "fuling"))
    cdc, fl = w.gateways["sccdc"].pipeline, w.gateways["fuling"].pipeline
    export = (Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "csv"
              / "sccdc-occupational-exams.csv").read_bytes()
    [first] = ingest(cdc, export, "cdc-csv")
    cdc.exchange.push(first.bundle["id"], FL)
    assert cdc.exchange.deliver()["delivered"] == 1
    before = decisions_for_patient(fl)
    assert before and not any(d.get("withdrawn") for d in before)

    changed = export.replace(b",XCG-WBC,\xe7\x99\xbd\xe7\xbb\x86\xe8\x83\x9e\xe8\xae\xa1\xe6\x95\xb0,6.6,",
                             b",XCG-WBC,\xe7\x99\xbd\xe7\xbb\x86\xe8\x83\x9e\xe8\xae\xa1\xe6\x95\xb0,7.2,")
    assert changed != export
    [again] = ingest(cdc, changed, "cdc-csv")
    report = report_of(again.bundle)
    assert report["status"] == "corrected" and report["id"] != report_of(first.bundle)["id"]
    assert any("was stored before with other content: this exam corrects it" in i.message for i in again.issues)
    versions = versions_of(cdc.store.db, MEMBERS["sccdc"].uscc, "ZJ2611001")
    assert [(v.bundle_id, v.superseded_by is not None) for v in versions] == [
        (first.bundle["id"], True), (again.bundle["id"], False)]
    assert cdc.exchange.pushed_to(again.bundle["id"]) == [FL]
    assert cdc.exchange.deliver()["delivered"] == 1
    after = decisions_for_patient(fl)
    withdrawn = {d["decision_id"] for d in after if d.get("withdrawn")}
    assert withdrawn == {d["decision_id"] for d in before}
    current = [d for d in after if d["result"]["bundle"].endswith(again.bundle["id"])]
    assert current and not any(d.get("withdrawn") for d in current)
