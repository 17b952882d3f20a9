"""Audit log: append-only hash chain, one entry per action in the action's transaction, R4 AuditEvents."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import pytest
from conftest import CST, FULING, TONGJIANG, validate_fhir
from fhir.resources.R4B.auditevent import AuditEvent
from test_audit_support import locator

from gateway.audit import records as r
from gateway.audit.log import GENESIS, append, entries, entry_hash, get, head
from gateway.audit.render import BALP_PROFILE, DECISION_PROFILE, index_values, patient_key, render
from gateway.errors import InputError, NotFound
from gateway.naming import SYSTEM_ID_CARD
from gateway.store import db as store_db
from gateway.store.db import connect, dialect, transaction

AT = _dt.datetime(2026, 3, 5, 9, 30, 15, 250000, tzinfo=CST)
ME = r.Party.member(TONGJIANG, "通江县人民医院")
PEER = r.Party.member(FULING, "涪陵中心医院")
PATIENT = r.PatientRef.id_card("510104199001011232")
DECISION_ID = "6f1c7a52-3f0e-5b8e-9d61-1a2b3c4d5e6f"


def every_kind() -> list[r.Record]:
    """One record of every kind and variant the rest of the gateway writes."""
    lis = r.Party.application(TONGJIANG, "LIS")
    doctor = r.Party.staff("D0042", "张医生")
    auditor = r.Party.user(TONGJIANG, "auditor1")
    return [
        r.exchange(
            "sent",
            at=AT,
            gateway=ME,
            peer=PEER,
            bundle_hash="sha256:" + "ab" * 32,
            bundle_id="b-1",
            kid="AbCdEfGh",
            peer_address="https://fl.example/exchange/bundles",
            patient=PATIENT,
        ),
        r.exchange(
            "received",
            at=AT,
            gateway=ME,
            peer=PEER,
            bundle_hash="sha256:" + "cd" * 32,
            peer_address="10.1.2.3",
            request_id="req-7",
        ),
        r.exchange(
            "refused",
            at=AT,
            gateway=ME,
            peer=None,
            bundle_hash="sha256:" + "ef" * 32,
            reason="bad-signature",
            detail="signature verification failed",
            peer_address="10.9.9.9",
        ),
        r.ingest(
            at=AT,
            gateway=ME,
            source=lis,
            message_id="MSG00017",
            fmt="hl7v2",
            status="stored",
            channel="mllp",
            source_address="10.0.0.8",
        ),
        r.ingest(
            at=AT,
            gateway=ME,
            source=lis,
            message_id="MSG00018",
            fmt="hl7v2",
            status="invalid",
            outcome=r.Outcome.MINOR_FAILURE,
            reason="OBX[2]-5: not a number",
        ),
        r.decision(
            at=AT,
            gateway=ME,
            receiver=ME,
            issuer=PEER,
            report="FL-2026-0001",
            item=("https://fhir.cyhr.org.cn/CodeSystem/catalogue-cy-2026", "GLU", "葡萄糖"),
            catalogue="cy-2026",
            outcome="not-recognized",
            rules=[
                r.RuleResult("member-active", True),
                r.RuleResult("eqa-pass", False, "no EQA pass for 2025"),
                r.RuleResult("mark", None, "no mark on the result"),
            ],
            snapshot_version=7,
            snapshot_digest="sha256:77",
            decision_id=DECISION_ID,
            patient=PATIENT,
            physician=doctor,
            client=r.Party.application(TONGJIANG, "HIS"),
            client_address="10.0.0.5",
            bundle_hash="sha256:" + "cd" * 32,
            kid="AbCdEfGh",
            verification_results=["VerificationResult/eqa-1"],
            request_id="req-8",
        ),
        r.decision(
            at=AT,
            gateway=ME,
            receiver=ME,
            issuer=PEER,
            report="FL-2026-0002",
            item=("s", "ALT"),
            catalogue="cy-2026",
            outcome="recognized",
            rules=[r.RuleResult("eqa-pass", True)],
            snapshot_version="7",
        ),
        r.override(
            at=AT,
            gateway=ME,
            physician=doctor,
            reason="critical-item",
            decision_id=DECISION_ID,
            receiver=ME,
            issuer=PEER,
            report="FL-2026-0001",
            item=("s", "GLU"),
            patient=PATIENT,
            note="术前",
        ),
        r.override(at=AT, gateway=ME, physician=doctor, reason="other", decision_id="local-17"),
        r.patient_read(
            at=AT,
            gateway=ME,
            server_address="https://tj.example/fhir",
            client=PEER,
            client_address="10.1.2.3",
            member=PEER,
            patient=PATIENT,
            resources=["DiagnosticReport/9"],
        ),
        r.patient_read(
            at=AT,
            gateway=ME,
            server_address="https://tj.example/fhir",
            client=r.Party("", display="portal"),
            client_address="10.1.2.4",
            member=ME,
            patient=PATIENT,
            resources=["DiagnosticReport/9", "DiagnosticReport/10"],
            query="GET /fhir/DiagnosticReport?patient.identifier=x",
            user=auditor,
            user_roles=["auditor"],
        ),
        r.registry_applied(
            at=AT,
            gateway=ME,
            version="8",
            previous_version="7",
            snapshot_hash="sha256:88",
            authority=r.Party.member("12500000MB0009009C", "川渝联合办公室"),
        ),
        r.audit_query(
            at=AT,
            gateway=ME,
            server_address="https://tj.example",
            client=r.Party("", display="curl"),
            client_address="127.0.0.1",
            user=auditor,
            user_roles=["auditor"],
            query="GET /fhir/AuditEvent?date=ge2026",
            results=3,
        ),
        r.audit_query(
            at=AT,
            gateway=ME,
            server_address="https://tj.example",
            client=r.Party("", display="curl"),
            client_address="127.0.0.1",
            user=auditor,
            query="GET /fhir/AuditEvent/3",
            interaction="read",
            resource="AuditEvent/3",
        ),
        r.audit_query(
            at=AT,
            gateway=ME,
            server_address="https://tj.example",
            client=r.Party("", display="curl"),
            client_address="127.0.0.1",
            user=auditor,
            query="GET /fhir/AuditEvent?patient:identifier=x",
            patient=PATIENT,
        ),
        r.audit_query(
            at=AT,
            gateway=ME,
            server_address="file:///gw.db",
            client=r.Party("gateway-cli"),
            client_address="host",
            user=r.Party("ops"),
            query="gateway audit stats",
            interaction="operation",
        ),
        r.user_admin(at=AT, gateway=ME, admin=r.Party("root"), user=auditor, action="added", roles=["auditor"]),
        r.user_admin(at=AT, gateway=ME, admin=r.Party("root"), user=auditor, action="token-issued"),
    ]


@pytest.fixture
def db(tmp_path: Path, database: str):
    handle = connect(locator(database, tmp_path))
    yield handle
    handle.conn.close()


def test_every_kind_renders_valid_r4(db, tmp_path: Path) -> None:
    for record in every_kind():
        append(db, record)
    out = tmp_path / "events"
    out.mkdir()
    files = []
    for entry in entries(db):
        event = entry.event()
        AuditEvent.model_validate(event)  # round trip through the R4(B) model: no unknown or mistyped element
        files.append(out / f"{entry.seq}.json")
        files[-1].write_text(json.dumps(event, ensure_ascii=False), encoding="utf-8")
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_balp_and_decision_shapes() -> None:
    events = {i: render(rec.kind, "2026-03-05T09:30:15.250+08:00", rec.facts) for i, rec in enumerate(every_kind())}
    read, query = events[9], events[10]
    assert read["meta"]["profile"] == [BALP_PROFILE["PatientRead"]]
    assert (read["action"], read["subtype"][0]["code"], read["outcome"]) == ("R", "read", "0")
    # BALP Read: the client is the destination of the data (DCM 110152), the server its source (110153).
    codes = [a["type"]["coding"][0]["code"] for a in read["agent"]]
    assert codes[:2] == ["110152", "110153"] and all("network" in a for a in read["agent"][:2])
    patient = next(e for e in read["entity"] if e["role"]["code"] == "1")
    assert patient["what"]["identifier"] == {"system": SYSTEM_ID_CARD, "value": "510104199001011232"}
    assert query["meta"]["profile"] == [BALP_PROFILE["PatientQuery"]] and query["action"] == "E"
    q = next(e for e in query["entity"] if e["role"]["code"] == "24")
    assert q["query"] == "R0VUIC9maGlyL0RpYWdub3N0aWNSZXBvcnQ/cGF0aWVudC5pZGVudGlmaWVyPXg="  # base64 of the raw query
    decision = events[5]
    assert decision["meta"]["profile"] == [DECISION_PROFILE]
    assert (decision["outcome"], decision["outcomeDesc"]) == ("8", "not-recognized: failed eqa-pass")
    details = {d["type"]: d["valueString"] for e in decision["entity"] for d in e.get("detail", [])}
    assert details["snapshot-version"] == "7"
    assert details["rule:eqa-pass"] == "fail: no EQA pass for 2025"
    assert details["rule:mark"] == "not evaluable: no mark on the result"
    assert events[3]["type"]["code"] == "110107" and events[0]["type"]["code"] == "110106"  # Import / Export
    assert events[2]["outcome"] == "4" and "bad-signature" in events[2]["outcomeDesc"]


def test_chain_links_every_entry(db) -> None:
    first = append(db, every_kind()[0])
    second = append(db, every_kind()[1])
    assert (first.seq, first.prev_hash) == (1, GENESIS)
    assert second.prev_hash == first.hash
    row = db.execute("SELECT content FROM audit_log WHERE seq = 2").fetchone()
    assert second.hash == entry_hash(2, first.hash, row[0].encode("utf-8"))
    assert second.hash == hashlib.sha256(first.hash + b"2\n" + row[0].encode("utf-8")).digest()
    assert head(db) == (2, second.hash)
    assert get(db, "2").event()["id"] == "2"
    with pytest.raises(NotFound):
        get(db, 3)
    with pytest.raises(NotFound):
        get(db, "x")


def test_content_is_rfc8785(db) -> None:
    import rfc8785

    append(db, every_kind()[5])
    content = db.execute("SELECT content FROM audit_log").fetchone()[0]
    assert rfc8785.dumps(json.loads(content)).decode("utf-8") == content
    parsed = json.loads(content)
    assert parsed["recorded"] == "2026-03-05T09:30:15.250+08:00"
    assert parsed["t"] == 1772674215250


def test_entries_are_never_updated_or_deleted(db) -> None:
    append(db, every_kind()[0])
    append(db, every_kind()[1])
    for sql in (
        "UPDATE audit_log SET content = '{}' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 2",
        "DELETE FROM audit_key",
        "UPDATE audit_key SET v = 'x'",
    ):
        with pytest.raises(store_db.IntegrityError, match="audit log"):
            db.execute(sql)
    # Nor can an entry be slipped in out of turn.
    with pytest.raises(store_db.IntegrityError, match="must follow"):
        db.execute("INSERT INTO audit_log (seq, content, prev_hash, hash) VALUES (5, '{}', ?, ?)", [GENESIS, b"x" * 32])
    if dialect(db) == "postgresql":  # TRUNCATE, which row triggers do not see, is refused too
        for table in ("audit_log", "audit_key", "audit_checkpoint"):
            with pytest.raises(store_db.IntegrityError, match="audit log"):
                db.execute(f"TRUNCATE {table}")
    assert head(db)[0] == 2 and len(db.execute("SELECT seq FROM audit_key").fetchall()) > 0


def test_entry_commits_with_its_action_or_not_at_all(db) -> None:
    db.execute("CREATE TABLE action (n INTEGER)")
    with pytest.raises(RuntimeError):
        with transaction(db):
            db.execute("INSERT INTO action VALUES (1)")
            append(db, every_kind()[0])
            raise RuntimeError("the action failed after its audit entry was written")
    assert head(db) == (0, GENESIS)
    assert db.execute("SELECT count(*) FROM action").fetchone()[0] == 0
    with transaction(db):
        db.execute("INSERT INTO action VALUES (2)")
        append(db, every_kind()[0])
    assert head(db)[0] == 1


def test_index_holds_no_patient_identifier(db) -> None:
    append(db, every_kind()[0])
    keys = db.execute("SELECT p, v, s FROM audit_key").fetchall()
    assert ("patient:identifier", patient_key("510104199001011232"), SYSTEM_ID_CARD) in keys
    assert all("510104199001011232" not in v for _, v, _ in keys)


def test_index_values_follow_the_rendered_event() -> None:
    event = render("exchange", "2026-03-05T09:30:15.250+08:00", every_kind()[0].facts)
    idx = index_values(event)
    assert idx["type"] == ["http://dicom.nema.org/resources/ontology/DCM", "110106"]
    assert idx["outcome"] == "0"
    assert ["entity:identifier", "sha256:" + "ab" * 32, ""] in idx["k"]
    assert ["agent:identifier", FULING, "https://fhir.cyhr.org.cn/sid/uscc"] in idx["k"]
    assert idx["k"] == sorted(idx["k"])


@pytest.mark.parametrize(
    "make, location",
    [
        (
            lambda: r.exchange("lost", at=AT, gateway=ME, peer=PEER, bundle_hash="h"),  # type: ignore[arg-type]
            "direction",
        ),
        (lambda: r.exchange("refused", at=AT, gateway=ME, peer=PEER, bundle_hash="h"), "reason"),
        (lambda: r.exchange("sent", at=AT.replace(tzinfo=None), gateway=ME, peer=PEER, bundle_hash="h"), "recorded"),
        (lambda: r.exchange("sent", at=AT, gateway=ME, peer=PEER, bundle_hash=""), "bundle_hash"),
        (
            lambda: r.decision(
                at=AT,
                gateway=ME,
                receiver=ME,
                issuer=PEER,
                report="R",
                item=("s", "GLU"),
                catalogue="c",
                outcome="maybe",
                rules=[r.RuleResult("x", True)],
                snapshot_version=1,
            ),
            "outcome",
        ),  # type: ignore
        (
            lambda: r.decision(
                at=AT,
                gateway=ME,
                receiver=ME,
                issuer=PEER,
                report="R",
                item=("s", "GLU"),
                catalogue="c",
                outcome="recognized",
                rules=[r.RuleResult("x", False)],
                snapshot_version=1,
            ),
            "rules",
        ),
        (
            lambda: r.decision(
                at=AT,
                gateway=ME,
                receiver=ME,
                issuer=PEER,
                report="R",
                item=("s", "GLU"),
                catalogue="c",
                outcome="recognized",
                rules=[],
                snapshot_version=1,
            ),
            "rules",
        ),
        (lambda: r.override(at=AT, gateway=ME, physician=ME, reason="whim", decision_id="d"), "reason"),
        (lambda: r.override(at=AT, gateway=ME, physician=ME, reason="other", decision_id=""), "decision_id"),
        (
            lambda: r.patient_read(
                at=AT,
                gateway=ME,
                server_address="s",
                client=PEER,
                client_address="a",
                member=PEER,
                patient=PATIENT,
                resources=[],
            ),
            "resources",
        ),
        (
            lambda: r.patient_read(
                at=AT,
                gateway=ME,
                server_address="s",
                client=PEER,
                client_address="a",
                member=PEER,
                patient=r.PatientRef(),
                resources=["X/1"],
            ),
            "patient",
        ),
        (
            lambda: r.audit_query(
                at=AT,
                gateway=ME,
                server_address="s",
                client=PEER,
                client_address="a",
                user=None,
                query="q",
                interaction="delete",
            ),
            "interaction",
        ),  # type: ignore[arg-type]
    ],
)
def test_bad_records_are_refused(make, location) -> None:
    with pytest.raises(InputError) as err:
        make()
    assert err.value.location == location


def test_unknown_kind_or_incomplete_facts_are_refused(db) -> None:
    with pytest.raises(InputError, match="kind"):
        append(db, r.Record("gossip", AT, {"v": 1}))
    with pytest.raises(InputError, match="incomplete"):
        append(db, r.Record("exchange", AT, {"v": 1, "direction": "sent"}))
    assert head(db) == (0, GENESIS)


def test_records_from_the_recognition_engine(db) -> None:
    from gateway.recognition.engine import Decision, RuleResult
    from gateway.recognition.facts import ResultFacts
    from gateway.recognition.overrides import make_override

    facts = ResultFacts(
        kind="observation",
        entry="urn:uuid:1",
        location="Bundle.entry[3]",
        bundle_id="b-1",
        issuer_uscc=FULING,
        patient=(SYSTEM_ID_CARD, "510104199001011232"),
        report_id="FL-1",
        text="葡萄糖",
    )
    decided = Decision(
        DECISION_ID,
        "needs-review",
        (RuleResult("member-active", "passed", "member"), RuleResult("eqa-pass", "not-evaluable", "no EQA data")),
        facts,
        TONGJIANG,
        AT,
        12,
        "sha256:abc",
    )
    entry = append(db, r.from_decision(decided, gateway=ME))
    assert entry.facts["decision_id"] == DECISION_ID and entry.facts["snapshot"] == "12"
    assert [x["id"] for x in entry.facts["rules"]] == ["member-active", "eqa-pass"]
    assert "passed" not in entry.facts["rules"][1]  # not evaluable
    overridden = append(db, r.from_override(make_override(DECISION_ID, "emergency", "D0042", AT), gateway=ME))
    event = overridden.event()
    assert event["subtype"][0]["code"] == "emergency"
    assert any(
        e["what"]["identifier"].get("value") == f"urn:uuid:{DECISION_ID}" for e in event["entity"] if "what" in e
    )


def test_bulk_fill_writes_a_real_log(db) -> None:
    import rfc8785

    from gateway.audit.bulk import fill
    from gateway.audit.query import parse_search, run
    from gateway.audit.verify import verify

    append(db, every_kind()[0])
    assert fill(db, 120, start=AT, batch=50) == 120
    assert head(db)[0] == 121
    report = verify(db)
    assert report.ok and report.entries == 121
    for (content,) in db.execute("SELECT content FROM audit_log"):
        assert rfc8785.dumps(json.loads(content)).decode("utf-8") == content
    kinds = {e.kind for e in entries(db)}
    assert kinds == {"exchange", "decision", "read", "ingest", "query"}
    page = run(db, parse_search([("type", "lab-recognition"), ("_count", "5")], tz=CST))
    assert len(page.entries) == 5 and page.next is not None


def test_same_entries_same_hashes_on_every_engine(db, tmp_path: Path) -> None:
    """The chain hashes the stored UTF-8 text: a log on PostgreSQL and one on SQLite with the same entries
    have the same hashes, and verification reads them alike (non-ASCII names, escapes and all)."""
    from gateway.audit.verify import verify

    embedded = connect(tmp_path / "embedded.db")
    for record in every_kind():
        assert append(db, record).hash == append(embedded, record).hash
    assert head(db) == head(embedded)
    ours, theirs = verify(db), verify(embedded)
    assert ours.ok and theirs.ok and ours.entries == theirs.entries == len(every_kind())
    assert ours.head == theirs.head == head(db)[1]
    assert [e.content for e in entries(db)] == [e.content for e in entries(embedded)]
    embedded.conn.close()


def test_nodes_appending_together_write_one_chain(db, tmp_path: Path, database: str) -> None:
    """Several gateway nodes (connections) append at once: their appends are serialised by the write lock,
    so the log stays one chain, 1..N without gaps, each entry following the one before."""
    import threading

    from gateway.audit.verify import verify

    where = locator(database, tmp_path)
    errors: list[BaseException] = []

    def node(n: int) -> None:
        own = connect(where)
        try:
            for i in range(15):
                append(own, r.ingest(at=AT + _dt.timedelta(seconds=i), gateway=ME, source=ME,
                                     message_id=f"N{n}-{i}", fmt="csv"))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            own.conn.close()

    append(db, every_kind()[0])  # the tables exist before the nodes start
    threads = [threading.Thread(target=node, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    report = verify(db)
    assert report.ok and report.entries == 1 + 4 * 15
    assert [e.seq for e in entries(db)] == list(range(1, 62))


def test_decision_index_equals_the_rendered_events() -> None:
    """A decision's entry is indexed without rendering its AuditEvent (gateway.audit.render.decision_index): the
    same index as rendering gives, for every combination of the parties and entities a decision may name."""
    import itertools
    import random

    from gateway.audit.log import prepare
    from gateway.audit.render import decision_index

    rng = random.Random(19)
    parties = [ME, PEER, r.Party("", reference="Organization/o1"), r.Party("x\u0001y", "urn:s"),
               r.Party("", display="只有名字"), r.Party("D9", None, "某医生", "Practitioner/p9"),
               r.Party("Patient-like", None, None, "Patient/p1")]
    patients = [None, PATIENT, r.PatientRef(reference="Patient/p2"), r.PatientRef("MRN-7", "urn:mrn", "Patient/p3"),
                r.PatientRef("V\u0002", None)]
    ids = [None, DECISION_ID, "decision-not-a-uuid", DECISION_ID.upper()]
    rules = [r.RuleResult("member-active", True, "ok"), r.RuleResult("eqa-pass", False, "no EQA"),
             r.RuleResult("validity-window", None)]
    made = 0
    for outcome, patient, decision_id, physician, client in itertools.product(
            ("recognized", "not-recognized", "needs-review"), patients, ids, (None, *parties[3:]),
            (None, *parties[:3])):
        record = r.decision(
            at=AT, gateway=rng.choice(parties), receiver=rng.choice(parties), issuer=rng.choice(parties),
            report=rng.choice(["R-1", "报告\u00030001"]), report_reference=rng.choice([None, "DiagnosticReport/d1"]),
            item=("http://loinc.org", "2345-7", "Glucose"), catalogue="cat-2026",
            outcome=outcome, rules=rules[:1] if outcome == "recognized" else rules, snapshot_version=3,
            decision_id=decision_id, patient=patient, physician=physician, client=client,
            client_address=rng.choice([None, "10.0.0.9"]), bundle_hash=rng.choice([None, "sha256:" + "ab" * 32]),
            verification_results=rng.choice([(), ("Provenance/v1", "")]), request_id=rng.choice([None, "req-1"]),
            as_of=rng.choice([None, AT]))
        assert record.well_formed
        rendered = index_values(render("decision", AT.isoformat(timespec="milliseconds"), record.facts))
        assert decision_index(record.facts) == rendered
        made += 1
    assert made == 3 * 5 * 4 * 5 * 4
    # and the entry made for the log holds that index (an entry another builder made is rendered to be indexed)
    content = json.loads(prepare([record])[0])
    assert {k: content[k] for k in ("type", "subtype", "outcome", "k")} == rendered
    assert not every_kind()[0].well_formed


def test_a_refusal_is_audited_without_what_it_quotes_of_the_message(pipeline) -> None:
    """A refused message's audit entry names the message, the field and the rule, never its payload: a result
    text quoted in the refusal ('HIV抗体阳性' in a numeric field) or a 身份证号 named in a check-digit error stays
    in the message's own record (and the sender's answer), not in the audit log every auditor reads."""
    message = ("MSH|^~\\&|LIS|TJXRMYY|GATEWAY|CYHR|20261120082500||ORU^R01^ORU_R01|AUD0001|P|2.5.1||||||UNICODE UTF-8\r"
               "PID|1||Z0099812^^^TJXRMYY^MR~511921196612120011^^^^NNCHN||王^建国||19661212|M\r"
               "OBR|1|O1|R2611209901|BLRT^血常规^L|||20261120073000|||||||||||||||20261120082500|||F\r"
               "OBX|1|NM|WBC^白细胞计数^L||HIV抗体阳性|10*9/L|3.5-9.5|N|||F\r").encode("utf-8")
    [refused] = pipeline.ingest(message, "hl7v2", channel="test")
    assert refused.ack_code == "AE" and any("HIV抗体阳性" in i.message for i in refused.issues)
    [entry] = [e for e in entries(pipeline.store.db) if e.kind == "ingest"]
    reason = entry.facts["reason"]
    assert "OBX[1]-5" in reason and "not a number" in reason
    assert "HIV抗体阳性" not in str(entry.content) and "HIV抗体阳性" not in reason
