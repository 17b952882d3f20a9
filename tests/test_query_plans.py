"""Every statement a day's work runs finds its rows through an index: none reads a growing table whole to filter it.

A full scan is invisible on a test database and a stall on a member's: a 互认 decision table a year old holds
millions of rows, and a scan on the write path holds SQLite's write lock (and every LIS's ACK) for seconds. So
this test runs what member gateways do every day — an HL7 v2 report stored and signed, pushed and delivered,
received, verified, decided and audited; its correction, which supersedes the stored version on both sides and
withdraws the receiver's decisions; a CDA document sent twice; a message answered on receipt and worked by the
queue reader; the searches of hospital IT over the FHIR API; the console's pages and an auditor's queries —
records every statement SQLite runs (its trace, with the values bound), and asks SQLite's planner (``EXPLAIN
QUERY PLAN``) how it would run each one. On PostgreSQL (``--backend postgresql``) every parameterised statement
is planned as a prepared statement is once it runs often (a generic plan, which knows no value), with
sequential scans priced out.

A plan may read a growing table whole only to count or group every row (``/health``'s counts), or along an
index until a ``LIMIT`` (the newest messages); a table that stays small (accounts, checkpoints) may be scanned;
:data:`SCANS_ALLOWED` names the rest, with the reason. Inputs: the correction pair of
``tests/test_corrections.py`` (通江's LIS, built there), ``tests/data/cda/lab-report-full.xml`` and
``lab-report-corrected.xml``, and the demo world.
"""
from __future__ import annotations

import datetime as _dt
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Clock
from gateway.adapters.base import RawUnit
from gateway.audit.log import entries
from gateway.audit.query import parse_search, run
from gateway.audit.stats import compute
from gateway.demo.world import build_world
from gateway.recognition.overrides import RETEST_REASONS, Override
from gateway.recognition.store import add_override, list_decisions
from gateway.store.store import Store
from gateway.store.views import ReadModels
from test_corrections import CDA, CORRECTION, FL, NUMBER, ORIGINAL, PATIENT, ingest
from test_exchange import URLS, Routed

CST = _dt.timezone(_dt.timedelta(hours=8))

#: Tables that stay small whatever the traffic: a scan of them is a few pages.
SMALL = frozenset({
    "schema_versions", "registry_applied", "audit_checkpoint",
    "gateway_user", "gateway_token",  # accounts and the API tokens an operator issues them
})

#: Statements (by their start) that scan a growing table because that is what they mean, with why.
SCANS_ALLOWED: dict[str, str] = {
    "SELECT rid, type, json FROM resources ORDER BY rid": "a layout step rebuilding the search index reads every "
                                                          "resource, once (here on an empty database)",
    "SELECT l.seq, json_extract(l.content, ": "the 互认率 figures (gateway audit stats, the console, /audit/stats) "
                                              "count every entry of the kinds they report: what they mean",
}


_ALIASED = re.compile(r"(?:FROM|JOIN)\s+(\w+)\s+(?:AS\s+)?(?!WHERE\b|ON\b|LEFT\b|JOIN\b|ORDER\b|GROUP\b|LIMIT\b"
                      r"|USING\b|INNER\b|CROSS\b|NATURAL\b|UNION\b)(\w+)", re.IGNORECASE)
#: Columns whose values split a growing table into a few large parts: an index search on them alone reads most of
#: the table (SQLite, which keeps no statistics, may still choose one over a better index). ``status`` is not
#: one: the statuses the queue and the recovery read (queued, received) mark the few messages in flight.
_FEW_VALUES = frozenset({"direction", "kind", "channel", "outcome", "format"})
_WEAK_SEARCH = re.compile(r"SEARCH (\w+) USING (?:COVERING )?INDEX \w+ \((.*)\)")
_VALUES = re.compile(r"\)\s*VALUES\s*\(", re.IGNORECASE)
_NEWEST = re.compile(r"ORDER BY (?:seq|id|rid|rowid)(?: DESC)? LIMIT \d+\b(?! OFFSET [1-9])", re.IGNORECASE)


def _plan_problems(conn: sqlite3.Connection, statements: list[str]) -> list[str]:
    """Each distinct statement that SQLite would run with a full scan of a table that grows, with its plan, asked
    on ``conn`` (the gateway's own connection, which knows its SQL functions); and each it cannot plan."""
    problems: list[str] = []
    tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for sql in dict.fromkeys(statements):
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH", "REPLACE"):
            continue
        if head == "INSERT" and _VALUES.search(sql) and " SELECT " not in sql.upper():
            continue  # rows given: what a plan shows is the foreign keys' look for orphans, which SQLite runs
            # only while a deferred violation is outstanding (never, with the immediate keys of this layout)
        try:
            plan = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
        except sqlite3.Error as exc:
            problems.append(f"cannot plan ({exc})\n    in: {sql[:400]}")
            continue
        for row in plan:
            detail = str(row[3])
            weak = _WEAK_SEARCH.match(detail)
            if weak is not None and " LIMIT " not in sql.upper():
                aliases = {alias: name for name, alias in _ALIASED.findall(sql) if name in tables}
                table = aliases.get(weak.group(1), weak.group(1))
                columns = set(re.findall(r"(\w+)[=<>]", weak.group(2)))
                if (table in tables and table not in SMALL and columns and columns <= _FEW_VALUES
                        and not any(map(sql.startswith, SCANS_ALLOWED))):
                    problems.append(f"{detail} (an index on columns of few values: most of the table)\n"
                                    f"    in: {sql[:400]}")
                continue
            found = re.match(r"SCAN (?:TABLE )?(\w+)", detail)
            if found is None or "VIRTUAL TABLE" in detail:
                continue
            if " USING " in detail and (" WHERE " not in sql.upper() or " LIMIT " in sql.upper()):
                continue  # an index walked whole for what the statement asks of every row (a count), or in
                # its order until a LIMIT; one walked whole to filter is what an index should have served
            aliases = {alias: name for name, alias in _ALIASED.findall(sql) if name in tables}
            table = aliases.get(found.group(1), found.group(1))
            if table not in tables:
                continue  # a subquery, a VALUES list or json_each: rows the statement made itself
            newest = _NEWEST.search(sql.strip()) and " WHERE " not in sql.upper()
            if newest and found.group(1) == detail.split()[-1]:
                continue  # the first or last rows by their rowid (ORDER BY the key LIMIT n): n rows read
            if table in SMALL or table.startswith("sqlite_") or any(map(sql.startswith, SCANS_ALLOWED)):
                continue
            problems.append(f"{detail}\n    in: {sql[:400]}")
    return problems


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every statement run on a SQLite connection opened from here on, by database file."""
    seen: dict[str, list[str]] = {}
    real = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real(database, *args, **kwargs)
        path = str(database).removeprefix("file:").split("?", 1)[0]
        statements = seen.setdefault(str(Path(path).resolve()) if path != ":memory:" else path, [])
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    return seen


def _world(tmp_path: Path, database: Any = None) -> Any:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    world = build_world(tmp_path, clock, URLS, members=("tongjiang", "fuling"), database=database)
    transport = Routed(world)
    for gw in world.gateways.values():
        assert gw.pipeline.exchange is not None
        gw.pipeline.exchange.transport = transport
    return world


def _daily_work(world: Any) -> None:
    """What a member gateway does every day, on 通江 (issuing) and 涪陵 (receiving)."""
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    # a report, delivered and decided; then its correction: superseded on both sides, decisions withdrawn
    original = ingest(tj, ORIGINAL)[0].bundle
    tj.exchange.push(original["id"], FL)
    assert tj.exchange.deliver()["delivered"] == 1
    ingest(tj, CORRECTION)
    assert tj.exchange.deliver()["delivered"] == 1
    assert len([e for e in entries(fl.store.db) if e.kind == "withdrawal"]) == 4, "the withdrawals ran"
    assert tj.ingest(ORIGINAL, "hl7v2", channel="test")[0].record_id, "a resend is answered from the first copy"

    # a CDA document, sent twice (the repeat is told by its 文档流水号) and once corrected; HL7 v2 answered on
    # receipt (MLLP mllp_ack = received) and worked by the queue reader; a start's recovery
    for name in ("lab-report-full.xml", "lab-report-full.xml", "lab-report-corrected.xml"):
        tj.ingest((CDA / name).read_bytes(), "cda", channel="test")
    assert len(tj.store.messages_keyed("cda", *_cda_key(tj))) == 2, "the repeat was stored under key#2"
    ch = tj.channel("hl7v2")
    queued = ORIGINAL.replace(b"TJ2611200001", b"TJ2611200777").replace(b"R2611200001", b"R2611200777")
    assert [o.status.value for o in tj.receive_batch(ch, [RawUnit(queued, 1, "mllp:test")], channel="mllp")] == [
        "queued"]
    assert [o.status.value for o in tj.process_queued()] == ["stored"]
    tj.recover()
    tj.rework_abandoned()

    # 调阅: 涪陵 pulls the patient's reports from 通江, by a full identifier and by its value alone
    assert fl.exchange.pull(tj.settings.issuer_uscc, f"urn:oid:2.16.156.10011.1.3|{PATIENT}")
    assert fl.exchange.pull(tj.settings.issuer_uscc, PATIENT)

    # what hospital IT and auditors read most
    for pipeline in (tj, fl):
        store = pipeline.store
        found = store.search("DiagnosticReport", [("identifier", f"urn:oid:2.16.156.10011.1.33|{NUMBER}")])
        assert found.resources
        report = found.resources[0]
        store.read("DiagnosticReport", report["id"])
        store.history("DiagnosticReport", report["id"])
        store.search("Observation", [("patient.identifier", PATIENT)], count=50)
        store.search("Observation", [("subject", f"Patient/{report['subject']['reference'].split('/')[-1]}")])
        store.search("Observation", [("code", "http://loinc.org|6690-2"), ("date", "ge2026-11-01")])
        for query in ([("patient:identifier", f"urn:oid:2.16.156.10011.1.3|{PATIENT}")],
                      [("type", "recognition-withdrawal")], [("agent:identifier", f"|{FL}")],
                      [("entity", f"DiagnosticReport/{report['id']}")], [("date", "ge2026-11-01")]):
            run(store.db, parse_search(query, tz=CST))
        compute(store.db)
        decided = list_decisions(store.db, patient=PATIENT)
        for decision in decided[:2]:  # the console's page of one decision, and a physician's override
            decision_id = decision.decision["decision_id"]
            views = ReadModels(store.db)
            assert views.decision_entries("decision", decision_id)
            add_override(store.db, Override(decision_id, next(iter(RETEST_REASONS)), "D0001",
                                            _dt.datetime(2026, 11, 22, 11, 0, tzinfo=CST)))
            assert views.decision_entries("override", decision_id)
    assert list_decisions(fl.store.db, patient=PATIENT)
    for gw in world.gateways.values():
        _over_http(gw)


def _over_http(gw: Any) -> None:
    """What the API's clients and the console's users ask of one gateway, over its HTTP app."""
    from gateway import auth
    from gateway.audit import records

    app = gw.app
    app.config["TESTING"] = True
    api = app.test_client()
    headers = {"Authorization": f"Bearer {gw.token}"}
    patient = f"urn:oid:2.16.156.10011.1.3|{PATIENT}"
    for url in (f"/fhir/Observation?patient.identifier={PATIENT}&_count=5",
                f"/fhir/Observation?subject:identifier={patient}&_sort=-date",
                "/fhir/Observation?code=http://loinc.org|6690-2&date=ge2026-01-01&_summary=count",
                f"/fhir/DiagnosticReport?identifier=urn:oid:2.16.156.10011.1.33|{NUMBER}"
                "&_include=DiagnosticReport:result",
                f"/fhir/Patient?identifier={patient}", "/fhir/Patient?name=王", "/fhir/Patient?birthdate=1966-12-12",
                "/fhir/DiagnosticReport?status=final&_count=2", "/fhir/DiagnosticReport/_history?_count=3",
                f"/fhir/AuditEvent?patient:identifier={patient}", "/fhir/AuditEvent?type=recognition-decision&_count=3",
                "/fhir/AuditEvent?date=ge2026-11-01&_count=3", "/audit/stats", "/metrics", "/health"):
        answer = api.get(url, headers=headers)
        assert answer.status_code in (200, 503), (url, answer.status_code, answer.get_data(as_text=True)[:300])
    db = gw.pipeline.store.db
    now = gw.pipeline.clock()
    auth.add_user(db, "plans-auditor", ["auditor", "admin"], at=now, gateway=records.Party.member(
        gw.settings.issuer_uscc), by=records.Party("test"))
    auth.set_password(db, "plans-auditor", "correct horse battery", at=now,
                      gateway=records.Party.member(gw.settings.issuer_uscc), by=records.Party("test"))
    console = app.test_client()
    page = console.get("/console/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    console.post("/console/login", data={"username": "plans-auditor", "password": "correct horse battery",
                                         "csrf_token": csrf.group(1)})
    decided = list_decisions(db, patient=PATIENT)
    for url in ("/console/", "/console/messages", "/console/messages?status=stored", "/console/exchange",
                "/console/audit", "/console/recognition", "/console/recognition/decisions",
                *(f"/console/decisions/{d.decision['decision_id']}" for d in decided[:1]),
                "/console/registry"):
        answer = console.get(url)
        assert answer.status_code == 200, (url, answer.status_code)


def test_the_daily_paths_never_scan_a_growing_table(tmp_path: Path, traced: dict[str, list[str]]) -> None:
    world = _world(tmp_path)
    _daily_work(world)
    problems: list[str] = []
    for name, gw in world.gateways.items():
        database = Path(gw.settings.database_locator).resolve()
        statements = traced.get(str(database), [])
        assert len(statements) > 100, f"{name}: the trace saw the gateway's statements"
        problems += [f"{name}: {p}" for p in _plan_problems(gw.pipeline.store.db.conn, statements)]
    assert not problems, "full scans of growing tables:\n" + "\n".join(problems)


def test_the_daily_paths_can_use_an_index_for_every_lookup_on_postgresql(
        tmp_path: Path, backend: str, member_database: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: every parameterised statement, planned as a prepared statement is after its first runs (a
    generic plan, which knows no value) and with sequential scans priced out, reads no growing table whole.
    A partial index (``messages_dedup``, for ids that are not empty) serves only a statement that says so."""
    if backend != "postgresql":
        pytest.skip("the PostgreSQL planner's view (run with --backend postgresql)")
    import psycopg

    from gateway.store import postgresql as pg

    seen: list[tuple[Any, str, list[Any]]] = []
    real = pg.PgConnection.execute

    def execute(self: Any, sql: str, params: Any = None) -> Any:
        verb = sql.lstrip()[:6].upper()
        if params and isinstance(params, (list, tuple)) and verb in ("SELECT", "UPDATE", "DELETE"):
            seen.append((self.raw, sql, list(params)))
        return real(self, sql, params)

    monkeypatch.setattr(pg.PgConnection, "execute", execute)
    world = _world(tmp_path, member_database)
    _daily_work(world)
    monkeypatch.setattr(pg.PgConnection, "execute", real)
    assert len(seen) > 50, "the gateway's statements were seen"

    problems: list[str] = []
    done: set[tuple[int, str]] = set()
    for raw, sql, params in seen:
        if (id(raw), sql) in done or raw.closed:
            continue
        done.add((id(raw), sql))
        numbered = iter(range(1, len(params) + 1))
        text = pg._TOKEN.sub(lambda m: f"${next(numbered)}" if m.group(0) == "?" else m.group(0), sql)
        types = ", ".join(_PG_TYPES.get(type(v), "unknown") for v in params)
        prepared = False
        raw.rollback()
        try:
            raw.execute("SET plan_cache_mode = force_generic_plan")
            raw.execute("SET enable_seqscan = off")
            cursor = psycopg.ClientCursor(raw)  # the values as literals: no parameter of the outer statement
            cursor.execute(f"PREPARE plan_check ({types}) AS {text.replace('%', '%%')}", [])
            prepared = True
            marks = ", ".join(["%s"] * len(params))
            plan = cursor.execute(f"EXPLAIN (FORMAT JSON) EXECUTE plan_check({marks})", params).fetchone()[0]
        except Exception as exc:  # noqa: BLE001 - said in the failure
            problems.append(f"cannot plan: {exc}\n    in: {sql[:300]}")
            continue
        finally:
            raw.rollback()
            if prepared:
                raw.execute("DEALLOCATE plan_check")
            raw.execute("RESET plan_cache_mode")
            raw.execute("RESET enable_seqscan")
            raw.commit()
        for what, table in _pg_whole_reads(plan[0]["Plan"], limited=False):
            if table not in SMALL and not any(map(sql.startswith, SCANS_ALLOWED)):
                problems.append(f"{what} on {table}\n    in: {sql[:400]}")
    assert not problems, "statements PostgreSQL can only answer by reading a growing table whole:\n" + "\n".join(
        problems)


def _pg_whole_reads(node: dict[str, Any], *, limited: bool) -> list[tuple[str, str]]:
    """(how, table) for each node of a PostgreSQL plan that reads a table whole: a sequential scan, or an index
    walked end to end without a condition (what ``enable_seqscan = off`` picks instead) unless a Limit above it
    stops the walk (the newest row by its key)."""
    kind = node.get("Node Type", "")
    limited = limited or kind == "Limit"
    found: list[tuple[str, str]] = []
    if kind == "Seq Scan":
        found.append((kind, str(node.get("Relation Name"))))
    elif kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node and not limited:
        found.append((f"{kind} without a condition", str(node.get("Relation Name"))))
    elif kind == "Bitmap Index Scan" and "Index Cond" not in node:
        found.append((f"{kind} without a condition", str(node.get("Index Name"))))
    for child in node.get("Plans", []):
        found += _pg_whole_reads(child, limited=limited)
    return found


#: The parameter types of a prepared statement, from the Python values bound (PostgreSQL casts to the columns').
_PG_TYPES = {str: "text", int: "bigint", float: "double precision", bytes: "bytea", bool: "boolean"}


def _cda_key(pipeline: Any) -> tuple[str, str]:
    """(sender, 文档流水号) of the CDA sample, as the gateway keys its requests."""
    key = pipeline.channel("cda").adapter.document_key(RawUnit((CDA / "lab-report-full.xml").read_bytes(), 1))
    return key.sender, key.document_id


def test_the_check_finds_a_scan(tmp_path: Path) -> None:
    """The check itself: a lookup by a column without an index is reported, one with an index is not."""
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE recognition_decisions (decision_id TEXT PRIMARY KEY, bundle_id TEXT);"
                       "CREATE TABLE audit_checkpoint (id INTEGER PRIMARY KEY, member TEXT);")
    conn.close()
    conn = sqlite3.connect(path)
    found: Callable[[str], list[str]] = lambda sql: _plan_problems(conn, [sql])  # noqa: E731
    assert found("SELECT * FROM recognition_decisions WHERE bundle_id = 'b'")
    assert not found("SELECT * FROM recognition_decisions WHERE decision_id = 'd'")
    assert not found("SELECT * FROM audit_checkpoint WHERE member = 'm'"), "a small table may be scanned"
    assert found("SELECT no_such_function(bundle_id) FROM recognition_decisions"), "what cannot be planned is said"
    conn.executescript("CREATE TABLE signed_bundles (doc_sha256 TEXT PRIMARY KEY, bundle_id TEXT, direction TEXT);"
                       "CREATE INDEX weak ON signed_bundles (direction);")
    assert found("SELECT * FROM signed_bundles WHERE direction = 'issued'"), "an index on few values"
    conn.close()


def test_the_requests_of_one_document_are_found_by_their_keys_past_one_lookup(pipeline: Any) -> None:
    """``messages_keyed`` reads a document's requests (``key``, ``key#2`` ... ``key#n``) by value, 16 at a time:
    all 40 of them, oldest first; not another document whose key merely starts the same way."""
    store = pipeline.store

    def stored(message_id: str) -> int:
        return store.insert_raw(channel="http", fmt="cda", sender="12511921MB0001003C", message_id=message_id,
                                origin="test", raw=message_id.encode(), status="stored")[0]

    ids = [stored("DOC-1")]
    stored("DOC-1X")
    stored("DOC-1#note")
    ids += [stored(f"DOC-1#{n}") for n in range(2, 41)]
    stored("DOC-10")
    found = store.messages_keyed("cda", "12511921MB0001003C", "DOC-1")
    assert [r.id for r in found] == ids
    assert [r.message_id for r in found][:3] == ["DOC-1", "DOC-1#2", "DOC-1#3"]
    assert store.messages_keyed("cda", "12511921MB0001003C", "DOC-2") == []
    assert store.messages_keyed("cda", "another sender", "DOC-1") == []
    assert store.find_message("cda", "12511921MB0001003C", "DOC-1#16").id == ids[15]  # type: ignore[union-attr]
    assert store.find_message("cda", "12511921MB0001003C", "") is None


def test_a_decisions_audit_entries_are_those_a_reading_of_the_whole_log_finds(tmp_path: Path,
                                                                              member_database: Any) -> None:
    """The console's page of one decision finds its entries through the key index: the same entries, in the
    same order, as reading every entry of the log, for each decision, withdrawn or overridden or neither."""
    world = _world(tmp_path, member_database)
    _daily_work(world)
    for name, gw in world.gateways.items():
        db = gw.pipeline.store.db
        log = list(entries(db))
        views = ReadModels(db)
        ids = {e.facts["decision_id"] for e in log if e.kind == "decision"}
        assert len(ids) >= 8 or name == "tongjiang"
        if name == "fuling" and not str(gw.settings.database_locator).startswith("postgresql"):
            seen: list[str] = []
            db.conn.set_trace_callback(seen.append)
            views.decision_entries("decision", next(iter(ids)))
            db.conn.set_trace_callback(None)
            plan = [str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + seen[-1]).fetchall()]
            assert plan[0].startswith("SEARCH k USING COVERING INDEX audit_key_lookup"), plan  # not every entry
        for decision_id in ids | {"no-such-decision"}:
            for kind in ("decision", "override", "withdrawal"):
                expected = [e.seq for e in log if e.kind == kind and e.facts.get("decision_id") == decision_id]
                assert [seq for seq, _ in views.decision_entries(kind, decision_id)] == expected, (kind, decision_id)


@pytest.mark.parametrize("count", [0, 1, 2, 37, 200])
def test_the_overviews_window_is_read_through_the_time_index(pipeline: Any, clock: Clock, count: int) -> None:
    """``message_times(since)`` gives every message received from a day before ``since`` on, in the order they
    were received (the overview then counts those in its window), whatever the message numbers say: a message
    stamped by a clock that was wrong is where its time puts it, and costs no other message its place."""
    store = pipeline.store
    times = []
    for n in range(count):
        clock.advance(hours=3 + (n % 5))  # a message every few hours, over weeks
        when = clock() - _dt.timedelta(days=60) if n == count // 2 and count > 2 else clock()  # a clock gone back
        times.append(when)
        stamped = Clock(when)
        Store(store.db, stamped).insert_raw(channel=("mllp", "http")[n % 2], fmt="hl7v2", sender="LIS",
                                            message_id=f"W{n}", origin="test", raw=b"x", status="stored")
    views = ReadModels(store.db)
    everything = list(views.message_times())
    assert len(everything) == count
    if isinstance(store.db.conn, sqlite3.Connection):  # through the index, not by reading every message
        seen: list[str] = []
        store.db.conn.set_trace_callback(seen.append)
        list(views.message_times(since=clock()))
        store.db.conn.set_trace_callback(None)
        plan = [str(r[3]) for r in store.db.execute("EXPLAIN QUERY PLAN " + seen[-1]).fetchall()]
        assert plan[0].startswith("SEARCH messages USING INDEX messages_received (received_at>?)"), plan
    for since in [clock() - _dt.timedelta(days=d) for d in (0, 1, 3, 14, 40, 400)] + [clock() + _dt.timedelta(days=2)]:
        got = list(views.message_times(since=since))
        wanted = [row for row, at in zip(everything, times) if at >= since - _dt.timedelta(days=1)]
        assert sorted(got) == sorted(wanted), since
    assert views.message_channels() == sorted({"mllp", "http"} if count > 1 else {"mllp"} if count else set())
    assert views.message_channels(also="file") == sorted({"file", *(["mllp", "http"][:count])})


def test_a_database_made_before_these_indexes_gains_them(settings: Any) -> None:
    """The indexes this release added to existing tables: on SQLite made when a database an earlier release made is
    next opened; on PostgreSQL built beside the running work by ``gateway db upgrade`` (and ``gateway serve`` at
    start), while a node's opening only reads — it neither builds nor waits for the write lock."""
    from gateway.store import layout
    from gateway.store.db import connect, transaction
    from gateway.store.accounts import Accounts
    from gateway.store.decisions import DecisionStore

    added = [name for names in layout.added_indexes().values() for name in names]
    store = Store.open(settings.database_locator)
    DecisionStore(store.db).ensure_schema()
    Accounts(store.db).ensure_schema()
    postgresql = str(settings.database_locator).startswith("postgresql")
    listing = ("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()" if postgresql
               else "SELECT name FROM sqlite_master WHERE type = 'index'")

    def present(db: Any) -> set[str]:
        return {str(r[0]) for r in db.execute(listing).fetchall()} & set(added)

    assert present(store.db) == set(added)
    with transaction(store.db):
        for name in added:  # as an earlier release left the database
            store.db.execute(f"DROP INDEX {name}")
    store.close()

    holder = connect(settings.database_locator)
    try:
        if postgresql:  # another node writing: its write lock is held while this one opens
            from gateway.store.postgresql import WRITE_LOCK

            holder.conn.begin()
            assert holder.execute(f"SELECT pg_try_advisory_xact_lock({WRITE_LOCK})").fetchone()[0] is True
        started = time.monotonic()
        again = Store.open(settings.database_locator)
        DecisionStore(again.db).ensure_schema()
        if not postgresql:  # (on PostgreSQL the accounts' tables are there: their index is built by the upgrade)
            Accounts(again.db).ensure_schema()
        assert time.monotonic() - started < 5, "the opening waited for another node's writes"
        assert present(again.db) == (set() if postgresql else set(added))
    finally:
        if postgresql and holder.conn.in_transaction:
            holder.execute("ROLLBACK")
        holder.conn.close()
    layout.upgrade(again.db)
    assert present(again.db) == set(added)
    if postgresql:
        valid = {str(r[0]) for r in again.db.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON"
            " n.oid = c.relnamespace WHERE i.indisvalid AND n.nspname = current_schema()").fetchall()}
        assert set(added) <= valid
    again.close()


def test_a_documents_next_request_takes_the_key_after_the_highest_one_taken(pipeline: Any) -> None:
    """A request repeating a document is stored under the key one past the highest its requests hold, so that a
    key an earlier release gave out of turn (it counted another document's ``key#note`` as a request) never makes
    a new request collide with a stored one (it would have been answered as that one's resend, and not kept)."""
    sender, key = _cda_key(pipeline)
    pipeline.store.insert_raw(channel="http", fmt="cda", sender=sender, message_id=f"{key}#2", origin="older release",
                              raw=b"<ClinicalDocument/>", status="stored")
    [out] = pipeline.ingest((CDA / "lab-report-full.xml").read_bytes(), "cda", channel="test")
    mine = pipeline.store.get_message(out.record_id)
    assert mine.message_id == f"{key}#3" and mine.origin != "older release", "stored as a request of its own"
    assert [r.message_id for r in pipeline.store.messages_keyed("cda", sender, key)] == [f"{key}#2", f"{key}#3"]


def test_a_pull_finds_the_patients_bundles_by_key_also_those_issued_before_the_key_table(
        tmp_path: Path, member_database: Any) -> None:
    """调阅 finds the Bundles issued for a patient through ``signed_bundle_patients`` (by value, or value and
    system), not by reading every Bundle issued; a database whose Bundles were issued before that table existed
    gains it, filled from their keys, at its next opening (SQLite) or upgrade (PostgreSQL, as a start does)."""
    from gateway.store import layout
    from gateway.store.db import connect, transaction
    from gateway.pipeline import Pipeline
    from gateway.store.exchange import SignedBundles, keys_pattern

    world = _world(tmp_path, member_database)
    tj = world.gateways["tongjiang"].pipeline
    ingest(tj, ORIGINAL)
    ingest(tj, CORRECTION)
    db = tj.store.db
    full, bare = f"urn:oid:2.16.156.10011.1.3|{PATIENT}", PATIENT
    before = {which: SignedBundles(db).issued_for_identifier(which) for which in (full, bare)}
    assert len(before[full]) == 1 and before[full] == before[bare], "the correction alone: the original is superseded"
    assert SignedBundles(db).issued_for_identifier("urn:oid:2.16.156.10011.1.3|000") == []
    assert SignedBundles(db).issued_for_identifier(f"other-system|{PATIENT}") == []
    if not str(world.gateways["tongjiang"].settings.database_locator).startswith("postgresql"):
        seen: list[str] = []
        db.conn.set_trace_callback(seen.append)
        SignedBundles(db).issued_for_identifier(full)
        db.conn.set_trace_callback(None)
        statement = next(s for s in seen if s.startswith("SELECT") and "signed_bundle_patients" in s)
        plan = [str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + statement).fetchall()]
        assert plan[0].startswith("SEARCH p USING PRIMARY KEY (value=? AND system=?)"), plan

    fallback = {which: SignedBundles(db).issued_for_patient(keys_pattern(which)) for which in (full, bare)}
    assert fallback == before, "the reading of every issued Bundle's keys answers the same, superseded left out"

    with transaction(db):  # as an earlier release left it
        db.execute("DROP TABLE signed_bundle_patients")
    tj.close()
    settings = world.gateways["tongjiang"].settings
    if str(settings.database_locator).startswith("postgresql"):
        # a node of this release before `gateway db upgrade` (its opening only reads): it answers a pull by reading
        # every issued Bundle's keys, and keeps a new Bundle without its rows, failing nothing
        node = Pipeline(settings, clock=tj.clock)
        assert SignedBundles(node.store.db).issued_for_identifier(full) == before[full]
        late = node.ingest(ORIGINAL.replace(b"TJ2611200001", b"TJ2611200999").replace(b"R2611200001", b"R2611200999"),
                           "hl7v2", channel="test")
        assert [o.status.value for o in late] == ["stored"]
        before = {which: SignedBundles(node.store.db).issued_for_identifier(which) for which in (full, bare)}
        assert len(before[full]) == 2
        node.close()
    again = connect(settings.database_locator)
    try:
        layout.upgrade(again)
        assert {which: SignedBundles(again).issued_for_identifier(which) for which in (full, bare)} == before
        rows = again.execute("SELECT count(*) FROM signed_bundle_patients").fetchone()[0]
        assert rows == 2 * len(before[full]) + 2 * 1, "every Bundle issued, two identifiers of the patient each"
        if str(settings.database_locator).startswith("postgresql"):  # a Bundle kept without its rows, filled in
            with transaction(again):
                again.execute("DELETE FROM signed_bundle_patients WHERE doc_sha256 = (SELECT min(doc_sha256) FROM"
                              " signed_bundle_patients)")
            assert again.execute("SELECT count(*) FROM signed_bundle_patients").fetchone()[0] == rows - 2
            layout.upgrade(again)
            assert again.execute("SELECT count(*) FROM signed_bundle_patients").fetchone()[0] == rows
    finally:
        again.conn.close()
