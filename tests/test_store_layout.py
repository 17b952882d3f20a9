"""Store layout: a database written by the earlier release is brought up to date without losing anything.

Layout 1 keyed the search index by resource id; layout 2 gives every resource
a stable ``rid`` and keys the index by it; layout 3 (``SCHEMA_VERSION``) numbers
every token value once (``search_key``) and keeps narrow token rows (key, res).
The tests turn a database written by this release back into an earlier layout
by hand (the old DDL is spelled out below, as those releases had it), open it,
and expect exactly the rows and search answers of a database that never left
today's layout.
"""
from __future__ import annotations

import copy
import datetime as _dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import CST, DATA
from gateway import jsonutil
from gateway.store.store import SCHEMA_VERSION, Store

LAYOUT_1 = """
ALTER TABLE resources RENAME TO resources_now;
CREATE TABLE resources (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, last_updated TEXT NOT NULL,
    message_ref INTEGER REFERENCES messages(id), json TEXT NOT NULL, PRIMARY KEY (type, id));
INSERT INTO resources SELECT type, id, version, last_updated, message_ref, json FROM resources_now ORDER BY rid;
DROP TABLE resources_now;
DROP TABLE search_token;
DROP TABLE search_date;
CREATE TABLE search_token (type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL,
                           system TEXT NOT NULL DEFAULT '', code TEXT NOT NULL);
CREATE INDEX search_token_lookup ON search_token(type, param, code, system);
CREATE INDEX search_token_owner ON search_token(type, id);
CREATE TABLE search_date (type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, lo REAL NOT NULL,
                          hi REAL NOT NULL);
CREATE INDEX search_date_lookup ON search_date(type, param, lo);
CREATE INDEX search_date_owner ON search_date(type, id);
INSERT INTO search_token VALUES ('Observation', 'stale', 'code', '', 'left-over');
PRAGMA user_version = 0;
"""

QUERIES = {
    "resources": "SELECT rid, type, id, version, last_updated, message_ref, json FROM resources ORDER BY rid",
    "resource_history": "SELECT * FROM resource_history ORDER BY type, id, version",
    "search_token": ("SELECT k.type, k.param, k.code, k.system, t.res FROM search_token t JOIN search_key k"
                     " ON k.key = t.key ORDER BY 1, 2, 3, 4, 5"),
    "search_date": "SELECT type, param, lo, hi, res FROM search_date ORDER BY 1, 2, 3, 4, 5",
}

SEARCHES = [
    ("Observation", [("patient.identifier", "urn:oid:2.16.156.10011.1.3|500102198808080131")]),
    ("Observation", [("code", "http://loinc.org|1742-6")]),
    ("Observation", [("date", "ge2024-01-01")]),
    ("DiagnosticReport", [("status", "corrected")]),
    ("Patient", [("gender", "male")]),
]


def _bundles() -> list[dict[str, Any]]:
    """The golden Bundles, one per patient: a later Bundle about the same patient (same Patient id, another
    hospital's record number) would leave chained ``patient.identifier`` rows of the earlier one that a rebuilt
    index, made from the current Patient only, does not have."""
    out, patients = [], set()
    for path in sorted((DATA / "expected").glob("*.json")):
        text = path.read_text(encoding="utf-8")
        if '"DiagnosticReport"' not in text:
            continue
        bundle = jsonutil.loads(text)
        ids = {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"}
        if ids & patients:
            continue
        patients |= ids
        out.append(bundle)
    return out


def _fill(path: Path) -> Store:
    store = Store.open(path, lambda: _dt.datetime(2026, 5, 21, 9, 0, tzinfo=CST))
    for n, bundle in enumerate(_bundles()):
        for round_ in range(2):  # a first version, then a correction: history rows and a replaced index
            record_id, _ = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"{n}-{round_}",
                                            origin="", raw=b"x")
            changed = copy.deepcopy(bundle)
            if round_:
                for entry in changed["entry"]:
                    if entry["resource"]["resourceType"] == "DiagnosticReport":
                        entry["resource"]["status"] = "corrected"
            store.finish(record_id, status="stored", ack_code="AA", ack=b"", issues=[], bundle=changed)
    return store


def _rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r) for r in store.db.conn.execute(sql)] for name, sql in QUERIES.items()}


def _answers(store: Store) -> list[list[str]]:
    return [sorted(r["id"] for r in store.search(rtype, params, count=1000).resources) for rtype, params in SEARCHES]


def test_layout_1_database_is_moved_and_reindexed_losing_nothing(tmp_path: Path) -> None:
    """SQLite only: a file of the first layout (PostgreSQL databases start at today's layout)."""
    reference = _fill(tmp_path / "now.db")
    expected, expected_answers = _rows(reference), _answers(reference)
    assert expected["resource_history"] and expected["search_token"] and expected["search_date"]
    assert all(expected_answers), "every search finds something in the samples"
    reference.close()

    _fill(tmp_path / "old.db").close()
    legacy = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    legacy.executescript(LAYOUT_1)
    legacy.close()

    upgraded = Store.open(tmp_path / "old.db")
    assert upgraded.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert _rows(upgraded) == expected  # same rids, versions, history; the stale index row is gone
    assert _answers(upgraded) == expected_answers
    assert not upgraded.db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%layout1%'").fetchall()
    upgraded.close()

    again = Store.open(tmp_path / "old.db")  # opening an up-to-date database changes nothing
    assert _rows(again) == expected
    again.close()


def _layout_2(store: Store, tokens: list[tuple[Any, ...]]) -> None:
    """Turn a database of today's layout back into layout 2: one wide row per token value and resource (the DDL
    as that release had it) holding ``tokens``, and one more row no resource of today would give, which the
    conversion keeps as it is."""
    from gateway.store.db import dialect, transaction

    sqlite = dialect(store.db) == "sqlite"
    with transaction(store.db):
        store.db.execute("DROP TABLE search_token")
        store.db.execute("DROP TABLE search_key")
        store.db.execute("CREATE TABLE search_token (type TEXT NOT NULL, param TEXT NOT NULL, code TEXT NOT NULL,"
                         " system TEXT NOT NULL DEFAULT '', res BIGINT NOT NULL,"
                         " PRIMARY KEY (type, param, code, system, res))" + (" WITHOUT ROWID" if sqlite else ""))
        store.db.execute("CREATE INDEX search_token_owner ON search_token(res)")
        for row in [*tokens, ("Observation", "stale", "code", "", 1)]:
            store.db.execute("INSERT INTO search_token (type, param, code, system, res) VALUES (?,?,?,?,?)",
                             list(row))
        store.db.execute("UPDATE schema_versions SET version = 2 WHERE part = 'core'")
        if sqlite:
            store.db.execute("PRAGMA user_version = 2")


def _every_report_bundle() -> list[dict[str, Any]]:
    """Every golden report Bundle, patients who come back with another hospital's record number included."""
    texts = [p.read_text(encoding="utf-8") for p in sorted((DATA / "expected").glob("*.json"))]
    return [jsonutil.loads(text) for text in texts if '"DiagnosticReport"' in text]


def test_layout_2_database_gets_the_narrow_token_index_losing_nothing(tmp_path: Path, database: str) -> None:
    """Both engines: a database of layout 2 (wide token rows) is converted to numbered values and narrow rows when
    it is opened, keeping every row as it was (a row no rebuild from today's resources would make among them:
    databases of earlier releases hold such rows, the chained ``patient.identifier`` values they copied) and every
    search answer."""
    from gateway.store import schema
    from gateway.store.db import dialect
    from gateway.store.store import _reindex

    locator: Any = database or tmp_path / "gw.db"
    store = Store.open(locator, lambda: _dt.datetime(2026, 5, 21, 9, 0, tzinfo=CST))
    bundles = _every_report_bundle()
    for n, bundle in enumerate(bundles):
        record_id, _ = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"all-{n}", origin="",
                                        raw=b"x")
        store.finish(record_id, status="stored", ack_code="AA", ack=b"", issues=[], bundle=bundle)
    expected = _rows(store)
    searches = [(rtype, [(param, f"{system}|{code}")]) for rtype, param, code, system in
                sorted({row[:4] for row in expected["search_token"]})
                if param != "patient"]  # every token value indexed, as a search (references are searched as such)
    answers = [sorted(r["id"] for r in store.search(t, p, count=1000).resources) for t, p in searches]
    assert sum(1 for found in answers if found) > len(answers) * 3 // 4  # (superseded reports are not searched)
    if dialect(store.db) == "sqlite":  # a rebuild of the index from the resources makes the same rows
        store.db.execute("BEGIN IMMEDIATE")
        _reindex(store.db)
        rebuilt = _rows(store)["search_token"]
        store.db.execute("ROLLBACK")
        assert rebuilt == expected["search_token"] and _rows(store) == expected
    _layout_2(store, expected["search_token"])
    store.close()

    upgraded = Store.open(locator)
    assert schema.version(upgraded.db, "core") == SCHEMA_VERSION
    assert schema.columns(upgraded.db, "search_token") == {"key", "res"}
    assert not schema.columns(upgraded.db, "search_token_layout2")
    got = _rows(upgraded)
    stale = ("Observation", "stale", "code", "", 1)
    assert got["search_token"] == sorted([*expected["search_token"], stale])  # every row kept, as it was
    assert {k: v for k, v in got.items() if k != "search_token"} == {
        k: v for k, v in expected.items() if k != "search_token"}
    assert [sorted(r["id"] for r in upgraded.search(t, p, count=1000).resources) for t, p in searches] == answers
    upgraded.close()
    again = Store.open(locator)  # opening an up-to-date database changes nothing
    assert _rows(again) == got
    again.close()


def test_a_new_database_starts_at_the_current_layout(tmp_path: Path) -> None:
    """SQLite only: the file's own user_version (both engines: the test after this one)."""
    store = Store.open(tmp_path / "new.db")
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {r[1] for r in store.db.execute("PRAGMA table_info(search_token)")} == {"key", "res"}
    assert {r[1] for r in store.db.execute("PRAGMA table_info(search_key)")} == {
        "key", "type", "param", "code", "system"}


def test_the_core_layout_is_recorded_once_per_connection_on_either_engine(tmp_path: Path, database: str) -> None:
    from gateway.store import schema

    locator = database or tmp_path / "gw.db"
    store = Store.open(locator)
    assert schema.version(store.db, "core") == SCHEMA_VERSION
    assert schema.columns(store.db, "search_token") == {"key", "res"}
    assert {"type", "param", "code", "system"} <= schema.columns(store.db, "search_key")
    assert not schema.once(store.db, "core"), "the schema was checked when the store was opened"
    record_id, _ = store.insert_raw(channel="mllp", fmt="hl7v2", sender="LIS|X", message_id="M1", origin="",
                                    raw=b"MSH|x")
    store.close()
    again = Store.open(locator)  # opening an up-to-date database changes nothing
    assert schema.version(again.db, "core") == SCHEMA_VERSION
    assert again.get_message(record_id).message_id == "M1" and again.counts() == {"received": 1}
    again.close()


def test_tables_made_in_a_transaction_that_rolls_back_are_made_again(tmp_path: Path, database: str) -> None:
    """A part's tables created inside a caller's transaction are not taken for existing once it rolls back, even
    when they were looked for twice in it (the connection keeps what it learnt only once it is committed)."""
    from gateway.store import audit, parts, schema
    from gateway.store.accounts import Accounts
    from gateway.store.db import transaction
    from gateway.store.decisions import DecisionStore as Decisions

    store = Store.open(database or tmp_path / "gw.db")
    db = store.db

    class Undo(Exception):
        pass

    try:
        with transaction(db):
            Decisions(db).ensure_schema()
            Decisions(db).ensure_schema()  # found, in the transaction that made it
            audit.AuditStore(db).ensure_schema()
            audit.AuditStore(db).ensure_schema()
            Accounts(db).ensure_schema()
            assert Decisions(db).exists()
            raise Undo
    except Undo:
        pass
    assert not schema.columns(db, "recognition_decisions") and not schema.columns(db, "audit_log")
    assert not parts.ready(db, "decisions")
    Decisions(db).ensure_schema()  # outside any transaction: made, and known from now on
    audit.AuditStore(db).ensure_schema()
    Accounts(db).ensure_schema()
    assert schema.columns(db, "recognition_decisions") and schema.columns(db, "audit_log")
    assert schema.columns(db, "gateway_user") and parts.ready(db, "decisions")
    with transaction(db):  # found inside a later transaction: settled, not looked for again
        Decisions(db).ensure_schema()
    assert parts.ready(db, "decisions")
    store.close()


def test_the_background_checkpointer_empties_the_wal_while_writers_go_on(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite only: its write-ahead log (PostgreSQL checkpoints by itself)."""
    import time

    from gateway.store import db as dbmod
    from gateway.store.db import WAL_AUTOCHECKPOINT_PAGES, WalCheckpointer

    monkeypatch.setattr(dbmod._CHECKPOINTS, "request", lambda path: None)  # (this one alone, for the test)
    store = _fill(tmp_path / "busy.db")  # writes far fewer pages than the writers' own checkpoint threshold
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_AUTOCHECKPOINT_PAGES
    main_file = tmp_path / "busy.db"
    before = main_file.stat().st_size
    checkpointer = WalCheckpointer(main_file, interval=0.05)
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while main_file.stat().st_size == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert main_file.stat().st_size > before, "the checkpointer copied the WAL into the database file"
        _fill(tmp_path / "busy.db").close()  # writers go on meanwhile (a PASSIVE checkpoint never blocks them)
    finally:
        checkpointer.stop()
    assert not checkpointer.is_alive()
    store.close()


def test_a_layout_upgrade_keeps_its_temporary_storage_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's write transactions keep temporary storage (statement journals above all) in memory, which an
    upgrade rewriting whole tables could outgrow: the layout work runs with it on disk (``temp_store`` 1), its
    transactions included, and the connection is back at SQLite's default (0) afterwards."""
    from gateway.store import layout, tallies
    from gateway.store import store as store_module

    seen: dict[str, list[int]] = {"narrow": [], "tallies": []}
    narrow, ensure_tallies = store_module._narrow_tokens, tallies.ensure

    def watched_narrow(db: Any) -> None:
        seen["narrow"].append(db.conn.execute("PRAGMA temp_store").fetchone()[0])
        narrow(db)

    def watched_tallies(db: Any, *args: Any, **kwargs: Any) -> Any:
        seen["tallies"].append(db.conn.execute("PRAGMA temp_store").fetchone()[0])
        return ensure_tallies(db, *args, **kwargs)

    monkeypatch.setattr(store_module, "_narrow_tokens", watched_narrow)
    store = Store.open(tmp_path / "gw.db")
    assert store.db.conn.execute("PRAGMA temp_store").fetchone()[0] == 0
    _layout_2(store, [])
    store.close()
    upgraded = Store.open(tmp_path / "gw.db")  # the conversion to the narrow token index runs as it opens
    assert seen["narrow"] == [1]
    assert upgraded.db.conn.execute("PRAGMA temp_store").fetchone()[0] == 0
    monkeypatch.setattr(tallies, "ensure", watched_tallies)
    layout.upgrade(upgraded.db)
    assert seen["tallies"] and set(seen["tallies"]) == {1}
    assert upgraded.db.conn.execute("PRAGMA temp_store").fetchone()[0] == 0
    upgraded.close()


def _effective(bundle: dict[str, Any], kind: str, value: Any) -> dict[str, Any]:
    """``bundle`` with its report's effective time (and, for an instant, its first result's) as ``kind``."""
    changed = copy.deepcopy(bundle)
    for entry in changed["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] in ("DiagnosticReport", "Observation") and "effectiveDateTime" in resource:
            del resource["effectiveDateTime"]
            resource[kind] = value
    return changed


def _ids(store: Store, rtype: str, date: str) -> set[str]:
    return {r["id"] for r in store.search(rtype, [("date", date)], count=1000).resources}


def test_a_period_or_an_instant_is_searched_as_date_and_indexed_when_a_layout_3_database_opens(
        tmp_path: Path, database: str) -> None:
    """Both engines: ``date`` finds a report whose effective time is a Period (a 职业卫生 technical-service
    report's 检测 dates) or a result's instant, as FHIR reads them (a Period without an end goes on; one without a
    start began at an unknown time); a database of layout 3, which indexed effectiveDateTime alone, gains those
    rows when it is opened, once."""
    from gateway.store import schema
    from gateway.store.db import dialect, transaction

    locator: Any = database or tmp_path / "gw.db"
    store = Store.open(locator, lambda: _dt.datetime(2026, 5, 21, 9, 0, tzinfo=CST))
    bundles = _every_report_bundle()
    kinds = [("effectivePeriod", {"start": "2025-03-03", "end": "2025-03-07"}),
             ("effectivePeriod", {"start": "2025-06-01T08:00:00+08:00"}),
             ("effectivePeriod", {"end": "2023-12-31"}),
             ("effectiveInstant", "2025-09-09T10:11:12.345+08:00")]
    stored: list[set[str]] = []
    for n, (kind, value) in enumerate(kinds):
        bundle = _effective(bundles[n], kind, value)
        record_id, _ = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"p-{n}", origin="",
                                        raw=b"x")
        store.finish(record_id, status="stored", ack_code="AA", ack=b"", issues=[], bundle=bundle)
        stored.append({e["resource"]["id"] for e in bundle["entry"]
                       if e["resource"]["resourceType"] == "DiagnosticReport"})
    closed, open_end, open_start, instant = stored
    reports = set().union(*stored)

    def answers(store: Store) -> dict[str, set[str]]:
        return {q: _ids(store, "DiagnosticReport", q) & reports for q in (
            "2025-03", "2025-03-05", "ge2025-03-01", "lt2024-01-01", "ge2030-01-01", "sa2025-01-01", "2025-09-09",
            "eb2024-06-01", "ap2025-03-04")}

    expected = {
        "2025-03": closed,  # eq: the period lies within March
        "2025-03-05": set(),  # the period is longer than the day
        "ge2025-03-01": closed | open_end | instant,
        "lt2024-01-01": open_start,
        "ge2030-01-01": open_end,  # a period without an end goes on
        "sa2025-01-01": closed | open_end | instant,
        "2025-09-09": instant,
        "eb2024-06-01": open_start,
        "ap2025-03-04": closed,
    }
    assert answers(store) == expected
    assert _ids(store, "Observation", "2025-09-09"), "the results' instants are searched too"
    rows = _rows(store)["search_date"]

    with transaction(store.db):  # back to layout 3: its date rows were of effectiveDateTime alone
        store.db.execute("DELETE FROM search_date WHERE param = 'date' AND res IN (SELECT rid FROM resources WHERE"
                         " json LIKE '%effectivePeriod%' OR json LIKE '%effectiveInstant%')")
        store.db.execute("UPDATE schema_versions SET version = 3 WHERE part = 'core'")
        if dialect(store.db) == "sqlite":
            store.db.execute("PRAGMA user_version = 3")
    assert answers(store)["2025-03"] == set()
    store.close()

    upgraded = Store.open(locator)
    assert schema.version(upgraded.db, "core") == SCHEMA_VERSION == 4
    assert _rows(upgraded)["search_date"] == rows
    assert answers(upgraded) == expected
    upgraded.close()


def test_a_database_a_later_release_upgraded_or_another_programs_table_is_refused_in_one_line(
        tmp_path: Path, backend: str, database: str) -> None:
    """`gateway db upgrade` (and so `gateway serve`'s start) refuses, before writing anything, a database whose
    layout a later release brought further than this one writes (it said "up to date" and went on), and a schema
    whose ``schema_versions`` table is another program's (it stopped on "internal error")."""
    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.errors import ConfigError
    from gateway.store.db import connect, transaction

    locator = database or str(tmp_path / "gateway.db")
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade", "--db", locator]).exit_code == 0
    db = connect(locator)

    def run(*statements: tuple[str, list[Any]]) -> None:
        with transaction(db):
            for sql, params in statements:
                db.execute(sql, params)

    run(("UPDATE schema_versions SET version = ? WHERE part = 'core'", [SCHEMA_VERSION + 1]))
    result = runner.invoke(cli, ["db", "upgrade", "--db", locator])
    assert result.exit_code == 2, result.output
    assert (f"core at layout {SCHEMA_VERSION + 1} (this release writes {SCHEMA_VERSION})" in result.output
            and "later release" in result.output and "Traceback" not in result.output), result.output
    with pytest.raises(ConfigError, match="later release"):  # (every start: the store refuses it, writing nothing)
        Store.open(locator)
    run(("UPDATE schema_versions SET version = ? WHERE part = 'core'", [SCHEMA_VERSION]))
    assert runner.invoke(cli, ["db", "upgrade", "--db", locator]).exit_code == 0  # (that release's own again)
    if backend == "sqlite":  # (SQLite keeps text in an INTEGER column; PostgreSQL refuses it)
        run(("UPDATE schema_versions SET version = 'four' WHERE part = 'accounts'", []))
        for command in ("upgrade", "status"):
            result = runner.invoke(cli, ["db", command, "--db", locator])
            assert result.exit_code == 2 and "not a number" in result.output, result.output
        run(("UPDATE schema_versions SET version = 2 WHERE part = 'accounts'", []))
    run(("DROP TABLE schema_versions", []),
        ("CREATE TABLE schema_versions (component TEXT, installed_on TEXT)", []))  # another program's
    db.close()
    for command in ("upgrade", "status"):
        result = runner.invoke(cli, ["db", command, "--db", locator])
        assert result.exit_code == 2 and "schema_versions that is not the gateway's" in result.output, result.output
        assert "component, installed_on" in result.output and "internal error" not in result.output
    with pytest.raises(ConfigError, match="not the gateway's"):
        Store.open(locator)


@pytest.mark.parametrize("kind", ["another program's tables", "a look-alike messages table"])
def test_another_programs_database_is_refused_before_anything_is_written(
        tmp_path: Path, backend: str, database: str, kind: str) -> None:
    """The database setting pointed at another program's database — a HIS's SQLite file, a PostgreSQL schema holding
    its tables — or at one whose ``messages`` table is not the gateway's: ``gateway db upgrade``, ``db status``,
    ``serve``'s start and the store's first open refuse it in one line naming what they found, and write nothing
    into it (no table of the gateway's; on SQLite the file keeps its bytes and its journal mode: switching it to WAL
    would change it for its own program)."""
    import sqlite3

    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.errors import ConfigError
    from gateway.store.db import connect, transaction

    if kind == "another program's tables":
        statements = ["CREATE TABLE his_patient (patient_no TEXT PRIMARY KEY, name TEXT)",
                      "CREATE TABLE his_order (order_no TEXT PRIMARY KEY, patient_no TEXT, item TEXT)",
                      "INSERT INTO his_patient VALUES ('P001', '张三')",
                      "INSERT INTO his_order VALUES ('O001', 'P001', 'GLU')"]
        said = ["another program's tables", "his_order, his_patient"]
    else:
        statements = ["CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT, sent_at TEXT)",
                      "INSERT INTO messages (id, body, sent_at) VALUES (1, 'hello', '2026-12-01')"]
        said = ["messages", "not the gateway's", "body, id, sent_at"]
    if backend == "sqlite":
        path = tmp_path / "his.db"
        raw = sqlite3.connect(path)
        for sql in statements:
            raw.execute(sql)
        raw.commit()
        raw.close()
        locator = str(path)
        before = path.read_bytes()
    else:
        locator = database
        db = connect(locator)
        with transaction(db):
            for sql in statements:
                db.execute(sql)
        db.close()
    runner = CliRunner()
    for command in (["db", "upgrade", "--db", locator], ["db", "status", "--db", locator]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 2, result.output
        assert all(s in result.output for s in said), result.output
        assert "Traceback" not in result.output and "internal error" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    with pytest.raises(ConfigError, match="not the gateway's|another program's"):
        Store.open(locator)
    if backend == "sqlite":
        assert path.read_bytes() == before  # not a byte changed
        assert not Path(f"{path}-wal").exists()
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        raw.close()
    else:
        from gateway.store import postgresql

        db = postgresql.connect(locator)  # (the engine's own connection: the gateway's refuses this schema)
        tables = {r[0] for r in db.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relkind = 'r' AND c.relnamespace ="
            " (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = current_schema())").fetchall()}
        db.close()
    assert tables == ({"his_patient", "his_order"} if kind == "another program's tables" else {"messages"})


def test_another_programs_wal_database_is_refused_and_keeps_its_tables(tmp_path: Path) -> None:
    """Another program's SQLite file in WAL mode already (nothing to switch): the store's first open and `gateway db
    upgrade` refuse it all the same, before writing a table of the gateway's into it."""
    import sqlite3

    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.errors import ConfigError

    path = tmp_path / "lis.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("CREATE TABLE lis_result (sample_no TEXT, item TEXT, value TEXT)")
    raw.execute("INSERT INTO lis_result VALUES ('S1', 'GLU', '5.6')")
    raw.commit()
    raw.close()
    with pytest.raises(ConfigError, match=r"another program's tables \(lis_result\)"):
        Store.open(str(path))
    result = CliRunner().invoke(cli, ["db", "upgrade", "--db", str(path)])
    assert result.exit_code == 2 and "another program's tables (lis_result)" in result.output, result.output
    raw = sqlite3.connect(path)
    assert {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {"lis_result"}
    assert raw.execute("SELECT * FROM lis_result").fetchall() == [("S1", "GLU", "5.6")]
    raw.close()


@pytest.mark.parametrize("tables, said", [
    (["CREATE TABLE his_patient (patient_no TEXT)"], "another program's tables (his_patient)"),
    (["CREATE TABLE his_patient (patient_no TEXT)", "CREATE TABLE referrals (ref_id TEXT, pid TEXT, to_hosp TEXT)"],
     "a table referrals that is not the gateway's (its columns: pid, ref_id, to_hosp)"),
    (["CREATE TABLE outbox (id INTEGER PRIMARY KEY, payload BLOB)"], "a table outbox that is not the gateway's"),
    (["CREATE TABLE Messages (id INTEGER PRIMARY KEY, body TEXT)"], "a table Messages that is not the gateway's"),
    (["CREATE VIEW messages AS SELECT 1 AS one"], "a table messages that is not the gateway's"),
    (["CREATE TABLE search_token (tok TEXT, n INTEGER)"], "a table search_token that is not the gateway's"),
    (["CREATE TABLE Tallies (k TEXT, v INTEGER)"], "a table Tallies that is not the gateway's"),
    (["CREATE TABLE schema_versions (app TEXT, v TEXT)"], "a table schema_versions that is not the gateway's"),
])
@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_every_command_refuses_another_programs_file_before_making_its_tables(
        tmp_path: Path, tables: list[str], said: str, journal: str) -> None:
    """Whichever command opens the database first — one that makes its own part's tables (users, API clients, the
    audit log) as much as `gateway db upgrade` — another program's SQLite file is refused in one line, in either
    journal mode, before any table of the gateway's is made in it; a table named as one of the gateway's (in any
    case) that lacks its columns is no disguise."""
    import sqlite3

    from click.testing import CliRunner

    from gateway.cli import cli

    path = tmp_path / "his.db"
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA journal_mode = {journal}")
    for sql in tables:
        raw.execute(sql)
    raw.commit()
    before = {r[0] for r in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    env = {"GATEWAY_DATABASE": str(path), "GATEWAY_DATA_DIR": str(tmp_path / "gw")}
    for command in (["users", "list"], ["clients", "list"], ["audit", "tail"], ["messages", "list"],
                    ["decisions", "list"], ["db", "status"]):
        result = CliRunner().invoke(cli, command, env=env)
        assert result.exit_code == 2, (command, result.output)
        assert said in result.output and str(path) in result.output, (command, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    raw = sqlite3.connect(path)
    assert {r[0] for r in raw.execute("SELECT name FROM sqlite_master")} == before
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == journal
    raw.close()


def test_a_file_that_is_no_database_or_a_directory_is_said_to_be_so_and_an_added_table_is_welcome(
        tmp_path: Path) -> None:
    import sqlite3

    from click.testing import CliRunner

    from gateway.cli import cli

    text = tmp_path / "notes.db"
    text.write_text("not a database, a note\n", encoding="utf-8")
    for target, said, code in ((text, "file is not a database", 1), (tmp_path, f"{tmp_path} is a directory", 2)):
        for command in ("status", "upgrade"):
            result = CliRunner().invoke(cli, ["db", command, "--db", str(target)])
            assert result.exit_code == code and said in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
    assert text.read_text(encoding="utf-8") == "not a database, a note\n"
    own = tmp_path / "gateway.db"
    assert CliRunner().invoke(cli, ["db", "upgrade", "--db", str(own)]).exit_code == 0
    raw = sqlite3.connect(own)
    raw.execute("CREATE TABLE notes (n TEXT)")  # the hospital's own table beside the gateway's
    raw.execute("INSERT INTO notes VALUES ('kept')")
    raw.commit()
    raw.close()
    for command in ("status", "upgrade"):
        assert CliRunner().invoke(cli, ["db", command, "--db", str(own)]).exit_code == 0
    store = Store.open(str(own))
    assert store.db.execute("SELECT n FROM notes").fetchall() == [("kept",)]
    store.close()
    swapped = tmp_path / "swapped.db"  # the gateway's database, one of whose tables another program replaced
    assert CliRunner().invoke(cli, ["db", "upgrade", "--db", str(swapped)]).exit_code == 0
    raw = sqlite3.connect(swapped)
    raw.executescript("DROP TABLE tallies; CREATE TABLE tallies (k TEXT, v INTEGER);")
    raw.close()
    result = CliRunner().invoke(cli, ["db", "status", "--db", str(swapped)])
    assert result.exit_code == 2 and "a table tallies that is not the gateway's (its columns: k, v)" in result.output


def test_db_check_says_a_sound_file_is_ok_and_names_the_damage_of_one_that_is_not(tmp_path: Path) -> None:
    """`gateway db check`: after a restore done wrong (a backup copied over a file whose old -wal stayed beside it)
    or a disk error, serve started and /health said 200 on a damaged file; nothing said so before a query failed."""
    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.pipeline import Pipeline
    from gateway.config import load_settings

    data = tmp_path / "gw"
    pipeline = Pipeline(load_settings(overrides={"data_dir": str(data)}))
    try:
        pipeline.ingest((DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes(), "hl7v2", channel="file")
    finally:
        pipeline.close()
    path = data / "gateway.db"
    runner = CliRunner()
    for extra in ([], ["--full"]):
        sound = runner.invoke(cli, ["db", "check", "--db", str(path), *extra])
        ended = "ok (" + ("integrity" if extra else "quick") + "_check)"
        assert sound.exit_code == 0 and sound.output.rstrip().endswith(ended), sound.output
    with sqlite3.connect(path) as conn:  # an index's leaf page written over, as a disk error leaves it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("SELECT pageno FROM dbstat WHERE name = 'search_token_owner' AND pagetype = 'leaf'"
                            " ORDER BY pageno LIMIT 1").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\xff" * size)
    damaged = runner.invoke(cli, ["db", "check", "--db", str(path)])
    assert damaged.exit_code == 1 and "damaged" in damaged.output and "restore it from a backup" in damaged.output
    assert "Traceback" not in damaged.output
    missing = runner.invoke(cli, ["db", "check", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no such database" in missing.output
    # an empty file (a restore cut short by a full disk) was "ok (quick_check)": SQLite takes it for a new database
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    said = runner.invoke(cli, ["db", "check", "--db", str(empty)])
    assert said.exit_code == 1 and "empty (0 bytes)" in said.output and "restore it from a backup" in said.output
    assert empty.stat().st_size == 0  # (read only: nothing made in it)


def test_a_database_others_can_read_is_made_private_when_opened(tmp_path: Path, caplog) -> None:
    """A backup restored with cp (umask 022) left the database, its -wal and -shm readable by every user of the
    machine, and nothing said so. Opened for writing, they are made 0600, said once in the log."""
    import logging
    import stat

    from gateway.store.db import connect
    from gateway.store.store import Store

    path = tmp_path / "gateway.db"
    Store.open(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for file in tmp_path.iterdir():
        file.chmod(0o644)
    with caplog.at_level(logging.INFO, logger="gateway.store.db"):
        again = connect(path)
    try:
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in tmp_path.iterdir()), \
            {f.name: oct(f.stat().st_mode) for f in tmp_path.iterdir()}
        assert any("could be read by other users (mode 644): made 0600" in r.getMessage() for r in caplog.records)
    finally:
        again.conn.close()


def test_a_device_or_fifo_named_as_the_database_is_never_made_private(tmp_path: Path) -> None:
    """Only a file of data is chmodded as a database: a FIFO (or /dev/null, a device every program writes to) named
    where the database's -wal would be keeps its mode; making it 0600 would take it from every other user."""
    import os
    import stat

    from gateway.store.db import _keep_private

    path = tmp_path / "gateway.db"
    path.write_bytes(b"")
    path.chmod(0o600)
    wal = tmp_path / "gateway.db-wal"
    os.mkfifo(wal, 0o644)
    wal.chmod(0o644)
    _keep_private(path)
    assert stat.S_IMODE(wal.stat().st_mode) == 0o644


def test_the_documented_sqlite_backup_and_restore_work_as_written(tmp_path: Path) -> None:
    """docs/operations.md § 6: its lines, run as written (its folders made ours, systemctl left out): the backup taken
    while a writer holds the file, the damaged file and its -wal moved aside, the copy put back, db check and audit
    verify saying ok — and the report stored before the backup is there."""
    import os
    import re
    import shutil
    import subprocess

    from gateway.config import load_settings
    from gateway.pipeline import Pipeline

    if shutil.which("sqlite3") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's sqlite3 shell is missing (.ci/run installs it)")
        pytest.skip("no sqlite3 shell here (apt-get install sqlite3)")
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text[text.index("### Backing up and restoring a SQLite member"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    lib, backup, etc = tmp_path / "lib", tmp_path / "backup", tmp_path / "etc"
    data = lib / "node1"
    for folder in (data, backup, etc):
        folder.mkdir(parents=True)
    (etc / "node1.toml").write_text(f'data_dir = "{data}"\nissuer_uscc = "12511921MB0001003C"\n', encoding="utf-8")
    settings = load_settings(environ={"GATEWAY_CONFIG": str(etc / "node1.toml")}, overrides={})
    pipeline = Pipeline(settings)  # a writer holding the database (its WAL not checkpointed) as the backup is taken
    stored = pipeline.ingest((DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes(), "hl7v2", channel="file")
    script = (block.replace("/var/lib/cyhr-gateway", str(lib)).replace("/backup", str(backup))
              .replace("/etc/cyhr-gateway", str(etc)))
    lines = script.splitlines()
    stop = next(n for n, line in enumerate(lines) if line.startswith("systemctl stop"))
    first, rest = "\n".join(lines[:stop]), [line for line in lines[stop:] if not line.startswith("systemctl")]
    env = {**os.environ, "GATEWAY_CONFIG": ""}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", first], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    pipeline.close()  # (the gateway stopped: `systemctl stop`)
    (data / "gateway.db").write_bytes(b"\0" * 4096)  # what is restored over: damaged
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(rest)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": ok (quick_check)" in done.stdout and "Traceback" not in done.stderr
    assert (data / "replaced" / "gateway.db").read_bytes() == b"\0" * 4096  # kept aside, not lost
    import stat

    for made in (backup / "gateway-2026-12-01.db", data / "gateway.db"):  # patient data: the owner's alone
        assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
    # a job written with a wrong path stops at the first line, not with an empty backup
    wrong = subprocess.run(["bash", "-euo", "pipefail", "-c", first.replace(str(data), str(lib / "node9"))],
                           capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode != 0 and not (backup / "x").exists() and not (lib / "node9").exists()
    back = Pipeline(settings)
    try:
        assert back.store.get_message(stored[0].record_id).status == stored[0].status.value
    finally:
        back.close()


def test_a_database_of_the_release_before_is_brought_to_reports_layout_2_which_that_release_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This release tells CDC CSV exams apart by what they say and lets a later-issued final supersede the version
    before it: a node of the release before, on a database this one used, took an exam sent again byte for byte as
    a correction of itself, and nothing refused it (the layout numbers were the same). `gateway db upgrade` now
    records the reports part at layout 2, which a release writing layout 1 refuses; it also adds the outbox's newer
    columns (it said "up to date" while the first start added them)."""
    from click.testing import CliRunner

    import gateway.store.layout as layout
    from gateway.cli import cli
    from gateway.errors import ConfigError
    from gateway.store.db import connect, transaction

    locator = str(tmp_path / "gateway.db")
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade", "--db", locator]).exit_code == 0
    db = connect(locator)
    with transaction(db):  # as the release before left it
        db.execute("UPDATE schema_versions SET version = 1 WHERE part = 'reports'")
        db.execute("ALTER TABLE outbox DROP COLUMN lease_owner")
        db.execute("ALTER TABLE outbox DROP COLUMN earlier_attempts")
    db.conn.close()
    done = runner.invoke(cli, ["db", "upgrade", "--db", locator])
    assert done.exit_code == 0, done.output
    db = connect(locator)
    assert ("reports", 2) in layout.status(db)
    columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)").fetchall()}
    assert {"lease_owner", "earlier_attempts"} <= columns
    monkeypatch.setattr(layout, "REPORTS_LAYOUT", 1)  # the release before
    with pytest.raises(ConfigError, match=r"reports at layout 2 \(this release writes 1\)"):
        layout.check_layouts(db)
    db.conn.close()
