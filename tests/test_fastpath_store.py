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

import copy
import datetime as _dt
import json
from typing import Any

import pytest

from conftest import CST
from gateway import jsonutil
from gateway.bench.context import BenchContext, BenchOptions
from gateway.bench.stages import _bundles
from gateway.store.db import dialect
from gateway.store.store import Store, _rewrite_refs

TABLES = {
    "resources": "SELECT rid, type, id, version, last_updated, message_ref, json FROM resources ORDER BY type, id",
    "resource_history": "SELECT * FROM resource_history ORDER BY type, id, version",
    "search_token": "SELECT r.type, r.id, param, system, code FROM search_token JOIN resources r ON r.rid = res"
                    " ORDER BY 1, 2, 3, 4, 5",
    "search_date": "SELECT r.type, r.id, param, lo, hi FROM search_date JOIN resources r ON r.rid = res"
                   " ORDER BY 1, 2, 3, 4, 5",
}


class SequentialStore(Store):
    """The reference: every resource saved on its own, in Bundle order."""

    def _put_all(self, resources: list[dict[str, Any]], record_id: int | None, now: str, resolve: Any,
                 first: Any = None) -> None:
        for res in resources:  # rows made here, inside the transaction, not the ones prepared before it
            super()._put_all([res], record_id, now, resolve)


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
