"""Store fast path: a Bundle saved with one statement of each kind gives the rows saving each resource alone gives.

The reference saves one resource at a time (each with its own statements, the
way every Bundle was saved before, each resource's rows made inside the
transaction); the fast path is :meth:`Store._put_all` with the whole Bundle and
the rows prepared before the transaction. Both store
the same generated and sample Bundles, then corrections of them (new versions,
history rows, re-indexing) and identical resends (no new version), and every
table must hold exactly the same rows. The copy-on-write reference rewriting
is compared with a plain deep rewrite and must leave its input untouched.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
from typing import Any

import pytest

from conftest import CST
from gateway import jsonutil
from gateway.bench.context import BenchContext, BenchOptions
from gateway.bench.stages import _bundles
from gateway.store.db import dialect, savepoint, transaction
from gateway.store.store import Store, _rewrite_refs

TABLES = {
    "resources": "SELECT rid, type, id, version, last_updated, message_ref, json FROM resources ORDER BY type, id",
    "resource_history": "SELECT * FROM resource_history ORDER BY type, id, version",
    "search_token": ("SELECT r.type, r.id, k.param, k.system, k.code FROM search_token t JOIN search_key k"
                     " ON k.key = t.key JOIN resources r ON r.rid = t.res ORDER BY 1, 2, 3, 4, 5"),
    "search_date": "SELECT r.type, r.id, param, lo, hi FROM search_date JOIN resources r ON r.rid = res"
                   " ORDER BY 1, 2, 3, 4, 5",
}


class SequentialStore(Store):
    """The reference: every resource saved on its own, in Bundle order."""

    def _put_all(self, resources: list[dict[str, Any]], record_id: int | None, now: str, resolve: Any,
                 first: Any = None, *, looked: Any = None, first_at: str = "") -> list[Any]:
        written = []
        for res in resources:  # rows made here, inside the transaction, not the ones prepared before it
            written += super()._put_all([res], record_id, now, resolve)
        return written


def deep_rewrite(obj: Any, local: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: (local[v] if k == "reference" and isinstance(v, str) and v in local else deep_rewrite(v, local))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [deep_rewrite(v, local) for v in obj]
    return obj


@pytest.fixture(scope="module")
def bundles() -> list[dict[str, Any]]:
    ctx = BenchContext.create(BenchOptions(quick=True))
    try:
        made = _bundles(ctx, ctx.fresh_messages(6))
    finally:
        ctx.close()
    from conftest import DATA

    made += [json.loads(p.read_text(encoding="utf-8"), parse_float=__import__("decimal").Decimal)
             for p in sorted((DATA / "expected").glob("*.json"))]
    return made


def corrected(bundle: dict[str, Any]) -> dict[str, Any]:
    """The same Bundle with every Observation value changed and one report corrected."""
    out = copy.deepcopy(bundle)
    for entry in out["entry"]:
        res = entry["resource"]
        if res["resourceType"] == "Observation" and "valueQuantity" in res:
            res["valueQuantity"]["value"] += 1
        if res["resourceType"] == "DiagnosticReport":
            res["status"] = "corrected"
    return out


#: PostgreSQL's index of the strings in names (SQLite reads them from the JSON).
STRINGS = ("SELECT r.type, r.id, param, folded, exact FROM search_string JOIN resources r ON r.rid = res"
           " ORDER BY 1, 2, 3, 4, 5")


def rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    tables = {**TABLES, "search_string": STRINGS} if dialect(store.db) == "postgresql" else TABLES
    return {name: [tuple(r) for r in store.db.conn.execute(sql)] for name, sql in tables.items()}


@pytest.fixture
def pair(database: str) -> tuple[Store, Store]:
    """A store saving whole Bundles and the reference, each in a database of its own (on the backend tested)."""
    if not database:
        return Store.open(":memory:"), SequentialStore.open(":memory:")
    return Store.open(database), SequentialStore.open(database + "ref")  # schema tN and tNref


def save_all(store: Store, items: list[dict[str, Any]], clock_minutes: int) -> None:
    for n, bundle in enumerate(items):
        store.clock = lambda n=n: _dt.datetime(2026, 5, 21, 9, clock_minutes, n % 60, tzinfo=CST)
        record_id, _ = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"{clock_minutes}-{n}",
                                        origin="", raw=b"x")
        store.finish(record_id, status="stored", ack_code="AA", ack=b"", issues=[], bundle=bundle)


def test_fast_and_sequential_saving_store_the_same_rows(bundles, pair) -> None:
    fast, ref = pair
    for store in (fast, ref):
        save_all(store, bundles, 0)  # first versions
        save_all(store, bundles, 1)  # identical resends: no new version
        save_all(store, [corrected(b) for b in bundles], 2)  # corrections: versions 2, history, re-index
    got, expected = rows(fast), rows(ref)
    assert expected["resource_history"] and expected["search_token"] and expected["search_date"]
    assert max(r[3] for r in expected["resources"]) >= 2  # version
    for name in TABLES:
        assert got[name] == expected[name], name


def test_same_resource_twice_in_one_bundle_is_saved_in_order(bundles, pair) -> None:
    bundle = copy.deepcopy(bundles[0])
    twin = copy.deepcopy(bundle["entry"][5])
    twin["fullUrl"] = "urn:uuid:00000000-0000-4000-8000-000000000001"
    twin["resource"]["status"] = "amended"
    bundle["entry"].append(twin)
    fast, ref = pair
    for store in (fast, ref):
        save_all(store, [bundle], 0)
    assert rows(fast) == rows(ref)
    rid = twin["resource"]["id"]
    assert fast.read("Observation", rid)["status"] == "amended"
    assert fast.read("Observation", rid)["meta"]["versionId"] == "2"


def test_reference_rewrite_is_a_copy_on_write(bundles) -> None:
    for bundle in bundles:
        local = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
        before = jsonutil.dumps(bundle)
        for entry in bundle["entry"]:
            assert _rewrite_refs(entry["resource"], local) == deep_rewrite(entry["resource"], local)
        assert jsonutil.dumps(bundle) == before  # the Bundle that goes out keeps its urn:uuid references
    assert _rewrite_refs({"a": [{"reference": "x"}]}, {}) == {"a": [{"reference": "x"}]}


class RowByRowStore(Store):
    """PostgreSQL's rows written one statement per row, as SQLite writes them: the reference of the batched
    statements (one per table, ``unnest`` of arrays, sent in pipeline mode)."""

    batched = False


def every_row(db: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the gateway's schema, in the order of all its columns (``schema_versions``
    aside: it records when each part was made)."""
    from gateway.store import schema

    tables = [r[0] for r in db.execute("SELECT table_name FROM information_schema.tables WHERE table_schema ="
                                       " current_schema() AND table_type = 'BASE TABLE' ORDER BY 1")]
    out = {}
    for table in tables:
        if table != "schema_versions":
            order = ", ".join(str(n + 1) for n in range(len(schema.columns(db, table))))
            out[table] = [tuple(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY {order}")]
    # a token value's number is the engine's to give (one statement may skip numbers): compared by the value
    out["search_key"] = [tuple(r) for r in db.execute("SELECT type, param, code, system FROM search_key"
                                                      " ORDER BY 1, 2, 3, 4")]
    out["search_token"] = [tuple(r) for r in db.execute(
        "SELECT k.type, k.param, k.code, k.system, t.res FROM search_token t JOIN search_key k ON k.key = t.key"
        " ORDER BY 1, 2, 3, 4, 5")]
    return out


def decision_rows() -> list[list[Any]]:
    """Decisions as :meth:`DecisionStore.add_decision` takes them; the last one is the first again (kept once)."""
    rows = [[f"d-{n}", "b-1", f"urn:uuid:{n}", "urn:oid:2.16.156.10011.1.33|R1", "sys", "p\x00tient" if n else None,
             "ISSUER", "RECEIVER", "cat", f"item-{n}", "项目 \"引号\" {a,b} \\", "recognized", 7, "sha256:ab",
             f"2026-05-21T01:0{n}:00+00:00", "2026-05-21T01:10:00+00:00", json.dumps({"n": n})] for n in range(3)]
    return rows + [list(rows[0])]


def store_everything(store: Store, bundles: list[dict[str, Any]], batched: bool) -> None:
    """Bundles stored, resent and corrected (under leases for some), a report tagged and versions put back,
    audit entries appended and decisions kept: the batched way or row by row."""
    from gateway.audit.log import append, append_many
    from gateway.store.db import transaction
    from gateway.store.decisions import DecisionStore
    from gateway.store.reports import SUPERSEDED_TAG, register
    from gateway.store.store import lease_owner
    from test_audit_log import every_kind

    records = every_kind()
    firsts: list[int] = []
    for minute, items in enumerate((bundles, bundles, [corrected(b) for b in bundles])):
        for n, bundle in enumerate(items):
            store.clock = lambda n=n, m=minute: _dt.datetime(2026, 5, 21, 9, m, n % 60, tzinfo=CST)
            leased = n % 2 == 0
            record_id, _ = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"{minute}-{n}",
                                            origin="", raw=b"x\x00y", lease=60.0 if leased else None)
            firsts += [record_id] if minute == 0 else []

            with store.unit_of_work() as db:
                assert store.finish(record_id, status="stored", ack_code="AA", ack=b"ack", issues=[], bundle=bundle,
                                    owner=lease_owner() if leased else None)
                register(db, bundle, direction="issued", message_ref=record_id, recorded_at="2026-05-21T09:00:00")
    taken = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id="taken", origin="", raw=b"x",
                             lease=60.0)[0]
    assert not store.finish(taken, status="stored", ack_code="AA", ack=None, issues=[], bundle=bundles[0],
                            owner="another-host:1")  # taken over: nothing written
    report = next(e["resource"] for e in bundles[0]["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    with transaction(store.db):
        holder = store.db.execute("SELECT message_ref FROM resources WHERE type = 'DiagnosticReport' AND id = ?",
                                  [report["id"]]).fetchone()[0]
        assert store.tag_superseded(f"DiagnosticReport/{report['id']}", holder, SUPERSEDED_TAG) >= 1
        assert store.restore_over(holder, firsts[0]) >= 1
    if batched:
        append_many(store.db, records)
    else:
        for record in records:
            append(store.db, record)
    decisions = DecisionStore(store.db)
    decisions.ensure_schema()
    with transaction(store.db):
        added = (decisions.add_decisions(decision_rows()) if batched
                 else sum(decisions.add_decision(row) for row in decision_rows()))
    assert added == 3


def test_batched_statements_store_what_row_by_row_statements_store(bundles, database) -> None:
    if not database:
        pytest.skip("the batched statements are PostgreSQL's; SQLite writes row by row")
    batched, reference = Store.open(database), RowByRowStore.open(database + "rows")  # schemas tN and tNrows
    try:
        assert batched._batched() and not reference._batched()
        store_everything(batched, bundles, True)
        store_everything(reference, bundles, False)
        got, expected = every_row(batched.db), every_row(reference.db)
    finally:
        batched.close()
        reference.close()
    for table in ("messages", "message_stages", "resources", "resource_history", "search_token", "search_date",
                  "search_string", "report_versions", "audit_log", "audit_key", "recognition_decisions"):
        assert expected[table], table
    assert any("superseded" in r[5] for r in expected["resource_history"])  # a tagged report, then put back
    assert set(got) == set(expected)
    for table in expected:
        assert got[table] == expected[table], table


def test_signed_texts_are_kept_deflated_and_read_back_byte_for_byte(tmp_path, database) -> None:
    """``signed_bundles.text`` holds the signed text deflated (a sixth of its size for a report Bundle); every
    reader gets the exact bytes that were signed, and a text an earlier release kept as is reads as is."""
    from gateway.store.db import transaction
    from gateway.store.exchange import SignedBundles
    from gateway.store.views import ReadModels

    store = Store.open(database or tmp_path / "gw.db")
    signed = json.dumps({"resourceType": "Bundle", "id": "b-1", "entry": [{"x": "结果 " * 2000}]},
                        ensure_ascii=False).encode("utf-8")
    kept = SignedBundles(store.db)
    with transaction(store.db):
        assert kept.keep("b-1", "d1", "ISSUER", '["sys|1"]', "issued", signed, "2026-05-21T09:00:00+08:00", None)
        store.db.execute("INSERT INTO signed_bundles (bundle_id, doc_sha256, issuer_uscc, patient_keys, direction,"
                         " text, signed_at) VALUES ('b-0', 'd0', 'ISSUER', '[\"sys|1\"]', 'issued', ?,"
                         " '2026-05-20T09:00:00+08:00')", [b' {"resourceType": "Bundle", "id": "b-0"}'])
    stored = bytes(store.db.execute("SELECT text FROM signed_bundles WHERE bundle_id = 'b-1'").fetchone()[0])
    assert len(stored) * 5 < len(signed)
    assert kept.latest_issued("b-1") == signed and kept.issued_texts("b-1") == [signed]
    assert kept.latest_issued("b-0") == b' {"resourceType": "Bundle", "id": "b-0"}'
    assert [text for text, _ in kept.issued_for_patient("%sys|1%")] == [
        b' {"resourceType": "Bundle", "id": "b-0"}', signed]
    assert dict(ReadModels(store.db).issued_bundles())["b-1"] == signed
    store.close()


def test_a_stored_version_has_one_time_in_its_json_its_row_and_what_storing_says(bundles, pair) -> None:
    """The rows of a first version are made before the write lock (Store.prepare), the outcome written after: with a
    clock that moves between the two, the resource's meta.lastUpdated, its row's last_updated (what _lastUpdated
    searches and _history read) and the time a transaction-response gives are one and the same."""
    import itertools

    store, _ = pair
    ticks = itertools.count()
    store.clock = lambda: _dt.datetime(2026, 5, 21, 9, 0, 0, tzinfo=CST) + _dt.timedelta(milliseconds=next(ticks))
    record_id, _ = store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id="clock", origin="", raw=b"x")
    prepared = store.prepare(bundles[0])
    said: list[Any] = []
    store.finish(record_id, status="stored", ack_code="AA", ack=b"", issues=[], bundle=bundles[0], prepared=prepared,
                 ack_for=lambda written: said.extend(written) or b"")
    assert said and {w.change for w in said} == {"created"}
    for w in said:
        assert store.read(w.type, w.id)["meta"]["lastUpdated"] == w.last_updated
        [(column,)] = store.db.conn.execute("SELECT last_updated FROM resources WHERE type = ? AND id = ?",
                                            [w.type, w.id]).fetchall()
        assert column == w.last_updated


def _with_report_identifier(bundle: dict[str, Any], value: str) -> dict[str, Any]:
    """``bundle`` with ``value`` the identifier of each of its reports."""
    out = copy.deepcopy(bundle)
    for entry in out["entry"]:
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            entry["resource"]["identifier"] = [{"system": "urn:oid:2.16.156.10011.1.99", "value": value}]
    return out


def _index_rebuilt(path: str) -> list[tuple[Any, ...]]:
    """The token rows of the database at ``path``, as values, once its whole index is rebuilt from its resources."""
    import sqlite3

    from gateway.store.db import connect
    from gateway.store.store import _reindex

    with contextlib.closing(sqlite3.connect(path)) as source, contextlib.closing(
            sqlite3.connect(path + ".rebuilt")) as copy_:
        source.backup(copy_)
    db = connect(path + ".rebuilt")
    try:
        with transaction(db):
            _reindex(db)
        return [tuple(r) for r in db.execute(TABLES["search_token"]).fetchall()]
    finally:
        db.conn.close()


def test_token_numbers_a_connection_remembers_are_those_committed(bundles, tmp_path) -> None:
    """SQLite: a value's number in ``search_key`` is remembered by the storing connection only once found committed.
    A transaction that added a value and used it twice (two reports) rolls back; the number it had taken is given to
    another value after; the first value, stored again, gets a number of its own, and every token row names the
    values its resource holds (as a whole index rebuilt from the resources says)."""
    from gateway.store.store import _KnownKeys

    path = str(tmp_path / "gateway.db")
    store = Store.open(path)
    try:
        save_all(store, bundles[:3], 0)  # the values every report shares are met, and remembered
        assert len(store.db.known_keys.known) > 10

        ids = [store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"r-{n}", origin="", raw=b"x")[0]
               for n in range(4)]
        with pytest.raises(RuntimeError), transaction(store.db):
            for n in (0, 1):  # the second report finds the value the first one added, in the same transaction
                store.finish(ids[n], status="stored", ack_code="AA", ack=b"", issues=[],
                             bundle=_with_report_identifier(bundles[n], "ROLLED-BACK"))
            raise RuntimeError("the outcome could not be recorded")
        assert not any(key[2] == "ROLLED-BACK" for key in store.db.known_keys.known)
        store.finish(ids[2], status="stored", ack_code="AA", ack=b"", issues=[],
                     bundle=_with_report_identifier(bundles[2], "TAKES-ITS-NUMBER"))
        store.finish(ids[3], status="stored", ack_code="AA", ack=b"", issues=[],
                     bundle=_with_report_identifier(bundles[3], "ROLLED-BACK"))
        for value, bundle in (("ROLLED-BACK", bundles[3]), ("TAKES-ITS-NUMBER", bundles[2])):
            found = store.search("DiagnosticReport", [("identifier", value)])
            reports = sorted(e["resource"]["id"] for e in bundle["entry"]
                             if e["resource"]["resourceType"] == "DiagnosticReport")
            assert sorted(r["id"] for r in found.resources) == reports, value
        assert [tuple(r) for r in store.db.execute(TABLES["search_token"]).fetchall()] == _index_rebuilt(path)
    finally:
        store.close()
    known = _KnownKeys()
    known.limit = 10
    known.remember({("t", "p", str(n), ""): n for n in range(8)})
    known.remember({("t", "p", str(n), ""): n for n in range(8, 12)})  # full: the oldest half is forgotten
    assert sorted(known.known.values()) == [4, 5, 6, 7, 8, 9, 10, 11]


def test_a_value_added_in_a_part_of_a_batch_rolled_back_gets_a_number_of_its_own(bundles, tmp_path) -> None:
    """SQLite: a batch records each message in a savepoint. One message adds a value and fails alone (its savepoint
    rolled back), the next takes the number it had, the value comes again later in the same transaction and after
    it: each value keeps the number it was stored with."""
    path = str(tmp_path / "gateway.db")
    store = Store.open(path)
    try:
        save_all(store, bundles[:1], 0)
        ids = [store.insert_raw(channel="t", fmt="hl7v2", sender="S", message_id=f"s-{n}", origin="", raw=b"x")[0]
               for n in range(4)]
        with transaction(store.db):
            with pytest.raises(RuntimeError), savepoint(store.db, "outcome"):
                store.finish(ids[0], status="stored", ack_code="AA", ack=b"", issues=[],
                             bundle=_with_report_identifier(bundles[1], "FAILED-ALONE"))
                raise RuntimeError("this message could not be recorded")
            for n, value in ((1, "TAKES-ITS-NUMBER"), (2, "FAILED-ALONE")):
                with savepoint(store.db, "outcome"):
                    store.finish(ids[n], status="stored", ack_code="AA", ack=b"", issues=[],
                                 bundle=_with_report_identifier(bundles[n + 1], value))
        store.finish(ids[3], status="stored", ack_code="AA", ack=b"", issues=[],
                     bundle=_with_report_identifier(bundles[4], "FAILED-ALONE"))
        for value, held in (("FAILED-ALONE", bundles[3:5]), ("TAKES-ITS-NUMBER", bundles[2:3])):
            reports = sorted(e["resource"]["id"] for b in held for e in b["entry"]
                             if e["resource"]["resourceType"] == "DiagnosticReport")
            found = store.search("DiagnosticReport", [("identifier", value)], count=100)
            assert sorted(r["id"] for r in found.resources) == reports, value
        assert [tuple(r) for r in store.db.execute(TABLES["search_token"]).fetchall()] == _index_rebuilt(path)
    finally:
        store.close()
