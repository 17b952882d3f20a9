"""Tamper evidence: alter a COPY of the log in every way and `gateway audit verify` names the first bad entry.

On SQLite the copy is a file copied from the original and the forger drops the guard triggers; on PostgreSQL
(``--backend postgresql``) each test's log is in a schema of its own, which is altered in place, and the forger
disables the triggers (``ALTER TABLE ... DISABLE TRIGGER``). Verification must catch the same on both.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import FULING, TONGJIANG
from test_audit_support import T0, Pki, locator

from gateway.audit import checkpoint as cp
from gateway.audit import records as r
from gateway.audit.log import append, entry_hash, schema_statements
from gateway.audit.verify import GUARD_TRIGGERS, verify
from gateway.commands.audit import audit
from gateway.store.db import connect, dialect

ME = r.Party.member(TONGJIANG, "通江县人民医院")
PEER = r.Party.member(FULING, "涪陵中心医院")


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def _record(i: int) -> r.Record:
    at = T0 + _dt.timedelta(minutes=i)
    patient = r.PatientRef.id_card("510104199001011232")
    if i % 3 == 0:
        return r.exchange("received", at=at, gateway=ME, peer=PEER, bundle_hash=f"sha256:{i:064x}", patient=patient)
    if i % 3 == 1:
        return r.decision(
            at=at,
            gateway=ME,
            receiver=ME,
            issuer=PEER,
            report=f"FL-{i}",
            item=("s", "GLU"),
            catalogue="cy",
            outcome="recognized",
            rules=[r.RuleResult("eqa-pass", True)],
            snapshot_version=3,
            patient=patient,
            decision_id=f"d{i}",
        )
    return r.patient_read(
        at=at,
        gateway=ME,
        server_address="https://tj.example/fhir",
        client=PEER,
        client_address="10.1.2.3",
        member=PEER,
        patient=patient,
        resources=[f"DiagnosticReport/{i}"],
    )


@pytest.fixture
def original(tmp_path: Path, pki: Pki, database: str) -> Path | str:
    """12 entries with signed checkpoints after entries 4, 8 and 12."""
    path = locator(database, tmp_path, "original")
    db = connect(path)
    for i in range(1, 13):
        append(db, _record(i))
        if i % 4 == 0:
            cp.make(db, pki.signer, at=T0 + _dt.timedelta(minutes=i, seconds=30))
    db.conn.close()
    return path


def copy_of(original: Path | str, tmp_path: Path, name: str = "copy.db") -> Path | str:
    """A copy of the SQLite file; on PostgreSQL the test's own schema itself (no other test reads it)."""
    if isinstance(original, str):
        return original
    target = tmp_path / name
    with sqlite3.connect(original) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


_TABLES = ("audit_log", "audit_key", "audit_checkpoint")


def _guards_off(db: Any) -> None:
    """What a forger does first: SQLite: drop the guard triggers; PostgreSQL: disable them."""
    if dialect(db) == "postgresql":
        for table in _TABLES:
            db.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    else:
        for trigger in GUARD_TRIGGERS:
            db.execute(f"DROP TRIGGER IF EXISTS {trigger}")


def _guards_on(db: Any) -> None:
    """And last, a careful one: put the guards back as they were."""
    if dialect(db) == "postgresql":
        for table in _TABLES:
            db.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    else:
        for statement in schema_statements():
            if statement.lstrip().upper().startswith("CREATE TRIGGER"):
                db.execute(statement)


def tamper(path: Path | str, *statements: str, params: list[list[object]] | None = None,
           keep_guards: bool = True) -> None:
    """Run SQL on a copy with the guard triggers dropped (disabled), then (like a careful forger) put them back."""
    db = connect(path)
    _guards_off(db)
    for i, sql in enumerate(statements):
        db.execute(sql, (params or [[]] * len(statements))[i])
    if keep_guards:
        _guards_on(db)
    db.conn.close()


def rehash_from(path: Path | str, start: int) -> None:
    """What a forger does after changing entry ``start``: recompute every hash from there on."""
    db = connect(path)
    _guards_off(db)
    prev = db.execute("SELECT hash FROM audit_log WHERE seq = ?", [start - 1]).fetchone()[0] if start > 1 \
        else bytes(32)
    for seq, content in db.execute(
        "SELECT seq, content FROM audit_log WHERE seq >= ? ORDER BY seq", [start]
    ).fetchall():
        digest = entry_hash(seq, bytes(prev), content.encode("utf-8"))
        db.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", [bytes(prev), digest, seq])
        prev = digest
    _guards_on(db)
    db.conn.close()


def run_verify(path: Path | str, pki: Pki, tmp_path: Path, *extra: str) -> tuple[int, str, dict]:
    trust = pki.pem(tmp_path / "trust.pem")
    runner = CliRunner()
    text = runner.invoke(audit, ["verify", "--db", str(path), "--trust", str(trust), *extra])
    data = runner.invoke(audit, ["verify", "--db", str(path), "--trust", str(trust), "--json", *extra])
    assert text.exit_code == data.exit_code, text.output
    return text.exit_code, text.output, json.loads(data.output)


def test_untouched_log_verifies(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    code, out, report = run_verify(copy_of(original, tmp_path), pki, tmp_path)
    assert code == 0, out
    assert out.startswith("OK: 12 entries") and "3 checkpoints match" in out
    assert report["ok"] and report["first_bad"] is None


def test_changed_field(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "UPDATE audit_log SET content = replace(content, 'FL-7', 'FL-9') WHERE seq = 7")
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1
    assert out.splitlines()[0] == "FAILED: first bad entry: 7 (12 entries present)"
    assert "entry 7 was changed: its content no longer matches its hash" in out
    assert report["first_bad"] == 7


def test_changed_field_and_hash_of_that_entry(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "UPDATE audit_log SET content = replace(content, 'FL-7', 'FL-9') WHERE seq = 7")
    db = connect(copy)
    prev, content = db.execute("SELECT prev_hash, content FROM audit_log WHERE seq = 7").fetchone()
    db.conn.close()
    tamper(copy, "UPDATE audit_log SET hash = ? WHERE seq = 7",
           params=[[entry_hash(7, bytes(prev), content.encode())]])
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] == 7
    assert "entry 7 was changed and re-hashed" in out


def test_rewritten_tail_is_caught_by_the_checkpoints(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "UPDATE audit_log SET content = replace(content, 'recognized', 'not-recognized') WHERE seq = 7")
    rehash_from(copy, 7)
    # The chain alone is consistent again: only the signed heads show what happened.
    db = connect(copy)
    assert not any(f.problem in ("changed", "removed", "reordered") for f in verify(db).findings)
    db.conn.close()
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1
    assert report["first_bad"] == 5  # checkpoint 1 (entry 4) still holds; checkpoint 2 (entry 8) does not
    assert "entries 5 to 8 were rewritten since checkpoint 2" in out


def test_removed_entry(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "DELETE FROM audit_log WHERE seq = 6")
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] == 6
    assert "entry 6 is missing (removed)" in out
    # the count is of the entries there are (it said 12 of 11, the last one's number)
    assert out.splitlines()[0] == "FAILED: first bad entry: 6 (11 entries present, the last numbered 12)"
    assert (report["entries"], report["present"]) == (12, 11)


def test_removed_entry_and_renumbered(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "DELETE FROM audit_log WHERE seq = 6", "DELETE FROM audit_key WHERE seq = 6")
    for seq in range(7, 13):
        tamper(
            copy,
            f"UPDATE audit_log SET seq = {seq - 1} WHERE seq = {seq}",
            f"UPDATE audit_key SET seq = {seq - 1} WHERE seq = {seq}",
        )
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] == 6
    assert "entry 6 follows an entry that no longer exists" in out
    assert "the log ends at entry 11 but checkpoint 3" in out


def test_reordered_entries(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(
        copy,
        "UPDATE audit_log SET seq = 100 WHERE seq = 5",
        "UPDATE audit_log SET seq = 5 WHERE seq = 6",
        "UPDATE audit_log SET seq = 6 WHERE seq = 100",
    )
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] == 5
    assert "entry 5 is out of order: it was written after entry 6" in out


def test_truncated_after_a_checkpoint(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "DELETE FROM audit_log WHERE seq > 9", "DELETE FROM audit_key WHERE seq > 9")
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] == 10
    assert "the log ends at entry 9 but checkpoint 3" in out and "entries 10 to 12 were removed" in out


def test_forged_checkpoint(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    # Rewrite from entry 7, delete the real checkpoints and sign a new one with a key of one's own.
    tamper(
        copy,
        "UPDATE audit_log SET content = replace(content, 'FL-7', 'FL-9') WHERE seq = 7",
        "UPDATE audit_key SET v = 'FL-9' WHERE seq = 7 AND v = 'FL-7'",
        "DELETE FROM audit_checkpoint",
    )
    rehash_from(copy, 7)
    forger = Pki()  # a look-alike authority and certificate for the same member
    db = connect(copy)
    cp.make(db, forger.signer, at=T0 + _dt.timedelta(hours=1))
    db.conn.close()
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1
    assert out.splitlines()[0] == "FAILED: the log's protection is damaged (12 entries present)"
    assert "checkpoint 1 (count 12, made 2026-05-01T09:00:00.000+08:00) is forged: signature verification failed" in out


def test_checkpoint_altered_after_signing(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "DELETE FROM audit_log WHERE seq > 10", "UPDATE audit_checkpoint SET count = 10 WHERE count = 12")
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1
    assert "checkpoint 3 (count 10" in out and "signature verification failed" in out


def test_peer_held_checkpoint_catches_a_rewrite_with_checkpoints_removed(
    original: Path, pki: Pki, tmp_path: Path
) -> None:
    db = connect(original)
    held = tmp_path / "held-by-peer.json"
    held.write_text(json.dumps(cp.latest(db).as_json()), encoding="utf-8")  # type: ignore[union-attr]
    db.conn.close()
    copy = copy_of(original, tmp_path)
    tamper(
        copy,
        "UPDATE audit_log SET content = replace(content, 'FL-10', 'FL-11') WHERE seq = 10",
        "UPDATE audit_key SET v = 'FL-11' WHERE seq = 10 AND v = 'FL-10'",
        "DELETE FROM audit_checkpoint",
    )
    rehash_from(copy, 10)
    code, out, _ = run_verify(copy, pki, tmp_path)
    assert code == 0 and "no checkpoint to verify against" in out  # nothing left in the copy to catch it
    code, out, report = run_verify(copy, pki, tmp_path, "--checkpoint", str(held))
    assert code == 1 and report["first_bad"] == 1
    assert f"entries 1 to 12 were rewritten since peer-held checkpoint of {TONGJIANG} at entry 12" in out


def test_index_rows_removed(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, "DELETE FROM audit_key WHERE seq = 3 AND p = 'patient:identifier'")
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] == 3
    assert "the search index of entry 3 does not hold the keys the entry lists" in out


def test_guards_removed(original: Path | str, pki: Pki, tmp_path: Path) -> None:
    copy = copy_of(original, tmp_path)
    tamper(copy, keep_guards=False)
    code, out, report = run_verify(copy, pki, tmp_path)
    assert code == 1 and report["first_bad"] is None
    assert "the append-only guards were removed" in out


def test_without_certificates_checkpoints_cannot_be_vouched_for(original: Path | str, tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify", "--db", str(copy_of(original, tmp_path))])
    assert result.exit_code == 3
    assert result.output.startswith("NOT VERIFIED: the chain of 12 entries is intact")
    assert "checkpoint 1: signature not checked" in result.output


def test_missing_database_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 2  # (a file that cannot be read: 2; 1 is a log found wrong)
    assert "no such database" in result.output


def test_database_without_a_log(tmp_path: Path, database: str) -> None:
    empty = locator(database, tmp_path, "empty")
    connect(empty).conn.close()
    result = CliRunner().invoke(audit, ["verify", "--db", str(empty)])
    assert result.exit_code == 1
    assert "this database holds no audit log" in result.output


def test_verify_speed_is_linear_and_small(tmp_path: Path, database: str) -> None:
    """Not a benchmark: a few hundred entries verify in well under a second."""
    import time

    db = connect(locator(database, tmp_path, "speed"))
    for i in range(300):
        append(db, _record(i))
    started = time.perf_counter()
    report = verify(db)
    assert report.ok and report.entries == 300
    assert time.perf_counter() - started < 1.0
    db.conn.close()


def test_the_background_walks_the_log_and_health_and_figures_say_when_it_was_changed(
        app: Any, pipeline: Any, settings: Any) -> None:
    """An entry edited in the database (guards dropped and put back) changed the published 互认率 and /health
    stayed ok: only `gateway audit verify`, when someone ran it, said so. The background part of `gateway serve`
    walks the log (at start, then every hour): /health fails naming the first bad entry, /audit/stats and the
    console's recognition page say the figures come from a log that does not verify."""
    import re

    from conftest import make_token
    from gateway.audit import watch
    from gateway.heartbeat import run_dir
    from gateway.serve import background_pass

    pipeline.ingest((Path(__file__).parent / "data" / "hl7v2" / "lis-v251-utf8.hl7").read_bytes(), "hl7v2",
                    channel="http")
    from conftest import wait_until

    assert background_pass(pipeline).get("audit-check") == 1  # the first pass has it walked (beside the passes)
    wait_until(lambda: watch.last(run_dir(settings)) is not None, 60, "the walk of the log")
    assert background_pass(pipeline).get("audit-check") is None  # and not again before the hour is over
    client = app.test_client()
    health = client.get("/health").get_json()
    assert health["checks"]["audit"]["ok"] and "verified at" in health["checks"]["audit"]["detail"]
    auditor = {"Authorization": f"Bearer {make_token(app, 'qc', ['auditor'])}"}
    assert client.get("/audit/stats", headers=auditor).get_json()["log_check"]["ok"] is True

    db = connect(settings.database_locator)
    _guards_off(db)
    db.execute("UPDATE audit_log SET content = replace(content, 'stored', 'refused') WHERE seq = 1")
    _guards_on(db)
    db.conn.close()
    assert background_pass(pipeline).get("audit-check") is None  # (not due yet: the hour)
    assert watch.maybe_check(pipeline.store.db, run_dir(settings), settings.issuer_uscc, pipeline.clock,
                             every=0.0) is not None
    answer = client.get("/health")
    assert answer.status_code == 503 and answer.get_json()["failing"] == ["audit"]
    assert "the audit log does not verify (first bad entry 1" in answer.get_json()["checks"]["audit"]["detail"]
    figures = client.get("/audit/stats", headers=auditor).get_json()
    assert figures["log_check"]["ok"] is False and figures["log_check"]["first_bad"] == 1
    from gateway import auth
    from gateway.audit.records import Party

    auth.add_user(pipeline.store.db, "qc2", ["auditor"], at=pipeline.clock(),
                  gateway=Party.member(settings.issuer_uscc), by=Party("test-setup"))
    auth.set_password(pipeline.store.db, "qc2", "correct horse battery", at=pipeline.clock(),
                      gateway=Party.member(settings.issuer_uscc), by=Party("test-setup"))
    console = app.test_client()
    form = console.get("/console/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    console.post("/console/login", data={"username": "qc2", "password": "correct horse battery",
                                         "csrf_token": token})
    page = console.get("/console/recognition").get_data(as_text=True)
    assert 'data-figure="log-check" data-value="failed"' in page and "第 1 条起" in page


def test_a_log_not_written_yet_is_no_finding_of_the_background_walk(tmp_path: Path) -> None:
    """A gateway that has audited nothing yet has no log to have been changed: the walk says so, /health passes."""
    import datetime as dt

    from gateway.audit import watch

    found = watch.check(connect(tmp_path / "new.db"), tmp_path / "run", None,
                        lambda: dt.datetime(2026, 12, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))))
    assert (found["ok"], found["entries"], found["first_bad"]) == (True, 0, None)
    assert watch.last(tmp_path / "run")["ok"] is True and watch.warning(watch.summary(tmp_path / "run")) == ""


def test_a_kept_walk_that_cannot_be_read_is_walked_again(tmp_path: Path) -> None:
    """What the last walk found, unreadable (cut short by a full disk, edited by hand): no answer from it — /health
    names no audit check from it — and the next pass walks the log again."""
    import datetime as dt

    from gateway.audit import watch

    folder = tmp_path / "run"
    folder.mkdir()
    for text in ('{"ok": tr', '[]', '{"ok": "yes", "at": 1}', '{"ok": true}', "\xff"):
        (folder / watch.FILE).write_text(text, encoding="utf-8")
        assert watch.last(folder) is None and watch.summary(folder) is None and watch.warning(None) == ""
        found = watch.maybe_check(connect(tmp_path / "new.db"), folder, None,
                                  lambda: dt.datetime(2026, 12, 1, tzinfo=dt.timezone(dt.timedelta(hours=8))))
        assert found is not None and watch.last(folder)["ok"] is True
