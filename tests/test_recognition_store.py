"""Stored decisions and physician overrides: listing by patient, issuer, item and outcome; overrides beside
decisions, never replacing them; append-only tables; writes join the caller's transaction."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from gateway.demo.registry import DEMO_SOURCE
from gateway.errors import IdentifierError, InputError, NotFound
from gateway.recognition.engine import Decision, decide_all
from gateway.recognition.facts import facts_from_bundle
from gateway.recognition.overrides import RETEST_REASONS, make_override
from gateway.recognition.store import (
    add_override,
    get_decision,
    list_decisions,
    save_decisions,
    withdraw_superseded,
)
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import load_source
from gateway.store.db import connect, transaction

DATA = Path(__file__).parent / "data" / "registry"
CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
TONGJIANG, FULING, CDC = "12511921MB0001003C", "12500102MB0002006J", "12510000MB00030095"
PATIENT = "11010519491231002X"
SNAPSHOT = unsigned_snapshot(load_source(DEMO_SOURCE), dt.datetime(2026, 11, 1, tzinfo=CST), dt.timedelta(days=60))


def decisions_for(name: str, receiver: str, at: dt.datetime = AT) -> list[Decision]:
    bundle = json.loads((DATA / name).read_text(encoding="utf-8"))
    return decide_all(facts_from_bundle(bundle), SNAPSHOT, receiver, at)


try:
    import psycopg
except ImportError:  # PostgreSQL is optional
    DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)
else:
    DATABASE_ERRORS = (sqlite3.DatabaseError, psycopg.DatabaseError)


@pytest.fixture
def db(tmp_path: Path, database: str) -> sqlite_utils.Database:
    """The gateway's database on the backend chosen with ``--backend``."""
    opened = connect(database or tmp_path / "gw.db")
    yield opened
    opened.conn.close()


@pytest.fixture
def stored(db: sqlite_utils.Database) -> sqlite_utils.Database:
    save_decisions(db, decisions_for("bundle-lab-tongjiang.json", FULING), AT)
    save_decisions(db, decisions_for("bundle-occupational-cdc.json", FULING, AT + dt.timedelta(hours=1)), AT)
    return db


def test_replayed_decisions_are_kept_once(db: sqlite_utils.Database) -> None:
    decisions = decisions_for("bundle-lab-tongjiang.json", FULING)
    assert save_decisions(db, decisions, AT) == 5
    assert save_decisions(db, decisions_for("bundle-lab-tongjiang.json", FULING), AT + dt.timedelta(minutes=5)) == 0
    assert save_decisions(db, decisions_for("bundle-lab-tongjiang.json", FULING, AT + dt.timedelta(days=1)), AT) == 5


def test_listing_filters(stored: sqlite_utils.Database) -> None:
    everything = list_decisions(stored)
    assert len(everything) == 8
    assert everything[0].decision["decided_at"] == "2026-11-22T11:00:00+08:00"  # newest first
    assert len(list_decisions(stored, patient=PATIENT)) == 8
    assert len(list_decisions(stored, patient=PATIENT.lower())) == 8  # normalised like everywhere else
    assert list_decisions(stored, patient="511921198001011237") == []  # another patient
    assert {r.decision["result"]["issuer"] for r in list_decisions(stored, issuer=CDC)} == {CDC}
    assert [r.decision["catalogue_item"]["code"] for r in list_decisions(stored, item="CY-L005")] == ["CY-L005"]
    assert [r.decision["result"]["item"] for r in list_decisions(stored, item="REMARK")] == ["备注"]
    refused = list_decisions(stored, outcome="not-recognized")
    assert refused and all(r.decision["outcome"] == "not-recognized" for r in refused)
    assert len(list_decisions(stored, issuer=TONGJIANG, outcome="recognized")) == 3
    assert len(list_decisions(stored, limit=2)) == 2
    other = list_decisions(stored, patient="TJ000123", patient_system="https://fhir.cyhr.org.cn/sid/mrn/x")
    assert other == []


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"outcome": "accepted"}, InputError),
        ({"limit": 0}, InputError),
        ({"issuer": "12511921MB0001003D"}, IdentifierError),
        ({"patient": "110105194912310021"}, IdentifierError),
    ],
)
def test_bad_filters_are_refused(
    stored: sqlite_utils.Database, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        list_decisions(stored, **kwargs)  # type: ignore[arg-type]


def test_empty_database_lists_nothing(db: sqlite_utils.Database) -> None:
    assert list_decisions(db) == []
    with pytest.raises(NotFound):
        get_decision(db, "no-such-decision")


def test_override_is_stored_beside_the_decision(stored: sqlite_utils.Database) -> None:
    decision = list_decisions(stored, item="CY-L001")[0]
    decision_id = decision.decision["decision_id"]
    override = make_override(decision_id, "critical-item", "DEMO-500102-D077", AT + dt.timedelta(minutes=3), "术前复查")
    first = add_override(stored, override)
    second = add_override(
        stored, make_override(decision_id, "emergency", "DEMO-500102-D078", AT + dt.timedelta(hours=2))
    )
    assert second > first
    kept = get_decision(stored, decision_id)
    assert kept.decision == decision.decision  # the decision itself is unchanged
    assert [o["reason"] for o in kept.overrides] == ["critical-item", "emergency"]
    assert kept.overrides[0]["reason_zh"] == RETEST_REASONS["critical-item"].zh
    assert kept.overrides[0]["physician"] == {"system": "urn:oid:2.16.156.10011.1.4", "value": "DEMO-500102-D077"}
    assert kept.overrides[0]["note"] == "术前复查" and kept.to_dict()["overrides"][1]["note"] is None
    listed = next(r for r in list_decisions(stored) if r.decision["decision_id"] == decision_id)
    assert len(listed.overrides) == 2


def test_override_input_is_checked(stored: sqlite_utils.Database) -> None:
    with pytest.raises(InputError, match="re-test reason"):
        make_override("x", "patient-asked", "D1", AT)
    with pytest.raises(InputError, match="physician"):
        make_override("x", "other", "  ", AT)
    with pytest.raises(InputError, match="UTC offset"):
        make_override("x", "other", "D1", AT.replace(tzinfo=None))
    with pytest.raises(NotFound):
        add_override(stored, make_override("no-such-decision", "other", "D1", AT))


def test_six_national_reasons() -> None:
    assert list(RETEST_REASONS) == [
        "condition-changed",
        "rapid-change",
        "critical-item",
        "emergency",
        "appraisal",
        "other-necessary",
    ]
    assert all(r.zh and r.en for r in RETEST_REASONS.values())


def test_tables_are_append_only(stored: sqlite_utils.Database) -> None:
    decision_id = list_decisions(stored)[0].decision["decision_id"]
    add_override(stored, make_override(decision_id, "other", "D1", AT))
    for sql in (
        "UPDATE recognition_decisions SET outcome = 'recognized'",
        "DELETE FROM recognition_decisions",
        "UPDATE recognition_overrides SET reason = 'emergency'",
        "DELETE FROM recognition_overrides",
    ):
        with pytest.raises(DATABASE_ERRORS, match="append-only"):
            stored.execute(sql)


def test_saving_joins_the_callers_transaction(db: sqlite_utils.Database) -> None:
    decisions = decisions_for("bundle-lab-tongjiang.json", FULING)
    with pytest.raises(RuntimeError):
        with transaction(db):
            save_decisions(db, decisions, AT)
            raise RuntimeError("the audit entry could not be written")
    assert list_decisions(db) == []
    with transaction(db):
        assert save_decisions(db, decisions, AT) == 5
    assert len(list_decisions(db)) == 5


def test_naive_recorded_time_is_refused(db: sqlite_utils.Database) -> None:
    with pytest.raises(InputError):
        save_decisions(db, decisions_for("bundle-lab-tongjiang.json", FULING), AT.replace(tzinfo=None))


def test_a_superseded_report_withdraws_its_decisions_once(stored: sqlite_utils.Database) -> None:
    on_report = [r.decision for r in list_decisions(stored, issuer=TONGJIANG)]
    bundle, report = on_report[0]["result"]["bundle"], on_report[0]["result"]["report"]
    same = [d["decision_id"] for d in on_report if (d["result"]["bundle"], d["result"]["report"]) == (bundle, report)]
    recognized = [d for d in same if get_decision(stored, d).outcome == "recognized"]
    assert recognized
    later = AT + dt.timedelta(days=1)
    withdrawn = withdraw_superseded(stored, bundle_id=bundle, report_id=report, superseded_by="TJ-20261120-0001-R1",
                                    at=later, member=FULING)
    assert sorted(withdrawn) == sorted(same)
    assert withdraw_superseded(stored, bundle_id=bundle, report_id=report, superseded_by="TJ-20261120-0001-R1",
                               at=later, member=FULING) == []  # withdrawn once
    kept = get_decision(stored, recognized[0])
    assert kept.outcome == "not-recognized" and kept.decision["outcome"] == "recognized"
    assert kept.to_dict()["withdrawn"]["reason"] == "superseded by TJ-20261120-0001-R1"
    assert recognized[0] in {r.decision["decision_id"] for r in list_decisions(stored, outcome="not-recognized")}
    assert recognized[0] not in {r.decision["decision_id"] for r in list_decisions(stored, outcome="recognized")}
    with pytest.raises(DATABASE_ERRORS, match="append-only"):
        stored.execute("DELETE FROM recognition_withdrawals")


def test_a_database_without_withdrawals_gains_them_when_first_written(tmp_path: Path) -> None:
    """A database written before withdrawals existed: its decisions are listed, and it gains the table.

    SQLite only: a file of an earlier release (PostgreSQL databases start at today's layout)."""
    path = tmp_path / "older.db"
    older = connect(path)
    save_decisions(older, decisions_for("bundle-lab-tongjiang.json", FULING), AT)
    older.execute("DROP TABLE recognition_withdrawals")
    older.conn.close()
    db = connect(path)
    try:
        assert len(list_decisions(db, outcome="recognized")) == 3
        with transaction(db):  # created inside the caller's transaction, which commits it
            assert save_decisions(db, decisions_for("bundle-occupational-cdc.json", FULING), AT) == 3
        assert db.execute("SELECT count(*) FROM recognition_withdrawals").fetchone()[0] == 0
        assert len(list_decisions(db)) == 8
    finally:
        db.conn.close()


@pytest.mark.parametrize("name", ["bundle-lab-tongjiang.json", "bundle-lab-imaging-fuling.json",
                                  "bundle-occupational-cdc.json"])
def test_stored_decisions_read_back_as_json_dumps_wrote_them(db: sqlite_utils.Database, name: str) -> None:
    """The stored text is written by msgspec when it can vouch for the decision; read back, it is what the standard
    library's text (the reference, as before) reads back as."""
    made = decisions_for(name, FULING)
    save_decisions(db, made, AT)
    for d in made:
        text, _ = db.execute("SELECT decision_json, recorded_at FROM recognition_decisions WHERE decision_id = ?",
                             [d.decision_id]).fetchone()
        assert json.loads(text) == json.loads(json.dumps(d.to_dict(), ensure_ascii=False))
        assert get_decision(db, d.decision_id).decision == json.loads(text)


def test_a_decision_holding_a_number_read_as_a_decimal_is_refused_and_stores_nothing(
        db: sqlite_utils.Database) -> None:
    """A Bundle read for ``$recognize`` keeps a fraction (or an integer of thousands of digits) as a Decimal; in a
    field the decision quotes, the standard library's writer refuses it and nothing of the call is stored, so that
    no unreadable decision is kept (the table keeps every row for good)."""
    import dataclasses
    from decimal import Decimal

    from gateway.recognition.store import _decision_text

    made = decisions_for("bundle-lab-tongjiang.json", FULING)
    odd = [dataclasses.replace(d, facts=dataclasses.replace(d.facts, report_id=Decimal("7.10"))) for d in made[:1]]
    with pytest.raises(TypeError):
        _decision_text(odd[0].to_dict())
    with pytest.raises(TypeError):
        save_decisions(db, made[1:] + odd, AT)
    assert list_decisions(db) == []
    # what both writers agree on is written the fast way and reads back the same
    plain = made[0].to_dict()
    assert json.loads(_decision_text(plain)) == plain
    assert _decision_text({"n": 2**60}) == json.dumps({"n": 2**60}, ensure_ascii=False)  # beyond 2**53: as before
