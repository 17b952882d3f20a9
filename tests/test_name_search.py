"""Patient name search on SQLite through ``search_string``, held equal to reading every Patient's names.

The reference is the query SQLite ran before the names had a table of their own: every Patient's JSON read with
``json_tree``, each name part folded in the query (kept here, :data:`REFERENCE`). The corpus is made up here:
seeded random names mixing Latin letters with accents and ligatures, 汉字, GLOB's and LIKE's wildcards, ``ß`` and
``İ`` (which fold to more than one character), over ``family``, ``given``, ``prefix``, ``suffix`` and ``text``.
"""
from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from gateway.store.store import Store, fold_string

#: Where each string parameter looked in a HumanName (``json_tree`` rows of one ``name``: path, key).
_PARTS = {
    "family": "(t.path = '$' AND t.key = 'family')",
    "given": "t.path = '$.given'",
    "name": "((t.path = '$' AND t.key IN ('family', 'text')) OR t.path IN ('$.given', '$.prefix', '$.suffix'))",
}
_TESTS = {"exact": "t.atom = ?", "contains": "instr(fhir_fold(t.atom), ?) > 0",
          "": "fhir_starts(fhir_fold(t.atom), ?)"}
REFERENCE = ("SELECT id FROM resources WHERE type = 'Patient' AND EXISTS (SELECT 1 FROM json_each(resources.json,"
             " '$.name') n, json_tree(CASE WHEN n.type = 'object' THEN n.value ELSE '{{}}' END) t"
             " WHERE t.type = 'text' AND {part} AND {test})")

PIECES = ["王", "建", "国", "李", "Müller", "Zoë", "José", "ﬁsh", "Straße", "İlker", "o'Brien", "Ann-Marie", "*",
          "?", "[", "]", "%", "_", "A", "a", "Ä", "e\u0301", "Ǆ", "ss", " ", "van", "de"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3)))


def _name(rng: random.Random) -> dict[str, Any]:
    name: dict[str, Any] = {}
    if rng.random() < 0.9:
        name["family"] = _word(rng)
    if rng.random() < 0.8:
        name["given"] = [_word(rng) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.2:
        name["prefix"] = [_word(rng)]
    if rng.random() < 0.2:
        name["suffix"] = [_word(rng)]
    if rng.random() < 0.3:
        name["text"] = _word(rng)
    return name


def _store_patients(store: Store, rng: random.Random, count: int) -> None:
    for n in range(count):
        patient = {"resourceType": "Patient", "id": str(uuid.UUID(int=rng.getrandbits(128))),
                   "name": [_name(rng) for _ in range(rng.randint(1, 2))]}
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": f"urn:uuid:{patient['id']}", "resource": patient}]}
        record_id, _ = store.insert_raw(channel="file", fmt="fhir", sender="test", message_id=f"N{n}", origin="t",
                                        raw=b"{}")
        assert store.finish(record_id, status="stored", ack_code="200", ack=None, issues=[], bundle=bundle)


def _queries(store: Store, rng: random.Random) -> list[tuple[str, str, str]]:
    """(param, modifier, value): parts of stored strings (as stored and folded) and values of their own."""
    stored = [t for (text,) in store.db.execute("SELECT json FROM resources WHERE type = 'Patient'")
              for t in _strings(text)]
    values = ["", "*", "?", "[", "%", "_", "ss", "ß", "i̇", "MÜL", "muller", "王", "国", "e\u0301", "é"]
    for atom in rng.sample(stored, 40):
        cut = rng.randint(0, len(atom))
        values += [atom[:cut], fold_string(atom)[:cut], atom[cut // 2:cut], atom]
    return [(param, modifier, value) for value in values for param in _PARTS for modifier in _TESTS]


def _strings(text: str) -> list[str]:
    import json

    out: list[str] = []
    for name in json.loads(text)["name"]:
        out += [v for k, v in name.items() if isinstance(v, str)]
        out += [v for k, v in name.items() if isinstance(v, list) for v in v]
    return out


def _reference(store: Store, param: str, modifier: str, value: str) -> set[str]:
    store.db.conn.create_function("fhir_fold", 1, fold_string, deterministic=True)
    store.db.conn.create_function("fhir_starts", 2, str.startswith, deterministic=True)
    sql = REFERENCE.format(part=_PARTS[param], test=_TESTS[modifier])
    return {str(r[0]) for r in store.db.execute(sql, [value if modifier == "exact" else fold_string(value)])}


def _found(store: Store, param: str, modifier: str, value: str) -> set[str]:
    name = f"{param}:{modifier}" if modifier else param
    return {r["id"] for r in store.search("Patient", [(name, value)], count=10_000).resources}


@pytest.fixture
def store(tmp_path) -> Store:
    opened = Store.open(tmp_path / "g.db")
    yield opened
    opened.close()


def test_name_search_finds_what_reading_every_patient_finds(store: Store) -> None:
    rng = random.Random(20261205)
    _store_patients(store, rng, 300)
    checked = 0
    for param, modifier, value in _queries(store, rng):
        if "," in value:  # (a comma ORs values in a search; no stored string holds one)
            continue
        assert _found(store, param, modifier, value) == _reference(store, param, modifier, value), (
            param, modifier, value)
        checked += 1
    assert checked > 1000


def test_a_database_of_an_earlier_release_gains_the_name_table_filled(tmp_path) -> None:
    path = tmp_path / "g.db"
    first = Store.open(path)
    rng = random.Random(7)
    _store_patients(first, rng, 60)
    expected = {v: _found(first, "name", "", v) for v in ("", "wang", "王", "mü", "a", "zz")}
    rows = first.db.execute("SELECT count(*) FROM search_string").fetchone()[0]
    first.db.execute("DROP TABLE search_string")  # what an earlier release's database lacks
    first.close()
    again = Store.open(path)
    try:
        assert again.db.execute("SELECT count(*) FROM search_string").fetchone()[0] == rows > 0
        assert {v: _found(again, "name", "", v) for v in expected} == expected
    finally:
        again.close()


@pytest.mark.parametrize(("modifier", "plan"), [
    ("", "SEARCH search_string USING PRIMARY KEY (type=? AND param=? AND folded>? AND folded<?)"),
    ("exact", "SEARCH search_string USING PRIMARY KEY (type=? AND param=? AND folded=? AND exact=?)"),
])
def test_a_name_search_reads_one_range_of_the_names(store: Store, modifier: str, plan: str) -> None:
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    store.search("Patient", [(f"family:{modifier}" if modifier else "family", "Wang")])
    store.db.conn.set_trace_callback(None)
    statements = [s for s in seen if "search_string" in s]
    assert statements
    for sql in statements:  # (the page, and the count of all)
        details = [r[3] for r in store.db.execute("EXPLAIN QUERY PLAN " + sql)]
        assert plan in details, details
        assert not any(d.startswith("SCAN resources") for d in details), details


def test_names_an_earlier_release_stored_without_rows_are_filled_in_at_start(tmp_path) -> None:
    """A process of an earlier release beside (or before, after a step back) stores Patients without their name
    rows; ``gateway db upgrade`` and ``gateway serve``'s start fill them in."""
    from gateway.store import layout

    store = Store.open(tmp_path / "g.db")
    try:
        _store_patients(store, random.Random(11), 40)
        expected = {v: _found(store, "name", "", v) for v in ("", "wang", "王", "mü", "a")}
        rows = store.db.execute("SELECT count(*) FROM search_string").fetchone()[0]
        some = [r[0] for r in store.db.execute("SELECT DISTINCT res FROM search_string ORDER BY res LIMIT 10")]
        store.db.execute(f"DELETE FROM search_string WHERE res IN ({','.join('?' * len(some))})", some)
        assert {v: _found(store, "name", "", v) for v in expected} != expected
        layout.upgrade(store.db)
        assert store.db.execute("SELECT count(*) FROM search_string").fetchone()[0] == rows
        assert {v: _found(store, "name", "", v) for v in expected} == expected
    finally:
        store.close()
