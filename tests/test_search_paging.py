"""Paging through a FHIR search or a history, as a client does: following each page's ``next`` link.

Hospital IT pulls a member's stored results page by page (``_count``, then the ``next`` link's ``_offset``): every
page must hold the resources in the order the first page promised, each resource exactly once over all the
pages, and the total must match. A page deep into a large result costs the sort of that many *keys*, not of that
many resources' JSON (SQLite's sorter and PostgreSQL's keep whole rows): on SQLite a search far into resources of
several kilobytes each writes no temporary copy of them.

The resources are Observations of one Patient, written by the store as a Bundle would be (``Store.finish``),
in batches an hour apart so that ``_lastUpdated`` orders them, with effective dates in an order of their own
(some without any) so that ``_sort=date`` orders them differently; some are stored twice, changed, to have a
history of more than one version.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import Clock

_CODE = {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}


def _observation(n: int, note: str, value: int) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": f"obs-{n:04d}", "status": "final", "code": _CODE,
        "subject": {"reference": "Patient/paging-patient"},
        "valueQuantity": {"value": value, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
        "note": [{"text": note}],
    }
    if n % 7:  # every seventh has no effective date: it sorts last by date
        day = (n * 37) % 90  # dates in an order unlike the ids'
        obs["effectiveDateTime"] = (_dt.date(2026, 6, 1) + _dt.timedelta(days=day)).isoformat() + "T08:00:00+08:00"
    return obs


def _store(pipeline: Any, clock: Clock, observations: list[dict[str, Any]], tag: str) -> None:
    store = pipeline.store
    record_id, _ = store.insert_raw(channel="test", fmt="fhir", sender="paging", message_id=tag, origin="test",
                                    raw=tag.encode())
    bundle = {"resourceType": "Bundle", "id": f"bundle-{tag}", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{hashlib.md5((tag + o['id']).encode()).hexdigest()}", "resource": o}
                        for o in observations]}
    assert store.finish(record_id, status="stored", ack_code=None, ack=None, issues=[], bundle=bundle)


def _fill(pipeline: Any, clock: Clock, count: int, note_size: int) -> dict[str, dict[str, Any]]:
    """``count`` Observations stored in batches of 40, an hour apart; every fifth stored again, changed, later.
    Returns what is current, by id."""
    current: dict[str, dict[str, Any]] = {}
    for start in range(0, count, 40):
        batch = [_observation(n, f"{n:04d} " + "x" * note_size, n) for n in range(start, min(count, start + 40))]
        _store(pipeline, clock, batch, f"batch-{start}")
        current.update((o["id"], o) for o in batch)
        clock.advance(hours=1)
    again = [_observation(n, f"{n:04d} changed " + "y" * note_size, n + 1000) for n in range(0, count, 5)]
    _store(pipeline, clock, again, "again")
    current.update((o["id"], o) for o in again)
    return current


def _walk(client: Any, url: str) -> tuple[list[dict[str, Any]], int, int]:
    """Every resource of every page from ``url`` on, following ``next`` links; the total the first page gave,
    and how many pages."""
    found: list[dict[str, Any]] = []
    total = -1
    pages = 0
    while url:
        answer = client.get(url)
        assert answer.status_code == 200, answer.get_data(as_text=True)
        page = answer.get_json()
        pages += 1
        if total < 0:
            total = page["total"]
        assert page["total"] == total
        found += [e["resource"] for e in page.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]
        nxt = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
        url = ""
        if nxt:
            parts = urlsplit(nxt[0])
            url = f"{parts.path}?{parts.query}"
        assert pages < 1000
    return found, total, pages


def _next_of(page: dict[str, Any]) -> str:
    """The path and query of a page's next link ("" on the last page)."""
    nxt = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
    if not nxt:
        return ""
    parts = urlsplit(nxt[0])
    return f"{parts.path}?{parts.query}"


def _date_key(obs: dict[str, Any]) -> tuple[bool, str]:
    return ("effectiveDateTime" not in obs, obs.get("effectiveDateTime", ""))


def test_paging_through_a_search_and_a_history_gives_every_resource_once_in_order(
        client: Any, pipeline: Any, clock: Clock) -> None:
    current = _fill(pipeline, clock, 130, 40)
    # newest updated first, then by id (the store's order): the changed ones, then the batches from the last back
    expected = sorted(current.values(), key=lambda o: o["id"])
    changed = {o["id"] for o in expected if o["note"][0]["text"].split()[1] == "changed"}
    batches = sorted({int(i[4:]) // 40 for i in current}, reverse=True)
    newest_first = [o for o in expected if o["id"] in changed]
    for b in batches:
        newest_first += [o for o in expected if int(o["id"][4:]) // 40 == b and o["id"] not in changed]

    found, total, pages = _walk(client, "/fhir/Observation?subject=Patient/paging-patient&_count=17")
    assert total == 130 and pages == 8
    assert [o["id"] for o in found] == [o["id"] for o in newest_first]
    assert [o["note"][0]["text"] for o in found] == [o["note"][0]["text"] for o in newest_first]  # current versions

    found, total, pages = _walk(client, "/fhir/Observation?subject=Patient/paging-patient&_sort=date&_count=30")
    assert total == 130 and pages == 5
    by_date = sorted(current.values(), key=lambda o: (_date_key(o), o["id"]))
    assert [o["id"] for o in found] == [o["id"] for o in by_date]
    found, _, _ = _walk(client, "/fhir/Observation?subject=Patient/paging-patient&_sort=-date&_count=30")
    dated = sorted((o for o in current.values() if "effectiveDateTime" in o), key=lambda o: o["id"])
    dated.sort(key=lambda o: o["effectiveDateTime"], reverse=True)
    assert [o["id"] for o in found] == [o["id"] for o in dated] + sorted(
        o["id"] for o in current.values() if "effectiveDateTime" not in o)

    # the type's history: 130 first versions and 26 second ones, newest first, the second before the first
    found, total, pages = _walk(client, "/fhir/Observation/_history?_count=25")
    assert total == 156 and pages == 7
    seen = [(o["id"], o["meta"]["versionId"]) for o in found]
    assert len(set(seen)) == 156
    assert seen[:26] == [(i, "2") for i in sorted(changed)]
    assert sorted(seen[26:]) == sorted([(i, "1") for i in current])
    assert {o["note"][0]["text"].split()[1] for o in found[26:]} == {"x" * 40}  # first versions as they were

    # one resource's history, one version per page
    found, total, pages = _walk(client, "/fhir/Observation/obs-0005/_history?_count=1")
    assert total == 2 and pages == 2
    assert [(o["meta"]["versionId"], o["valueQuantity"]["value"]) for o in found] == [("2", 1005), ("1", 5)]

    # a page past the end is empty, and says how many there are
    answer = client.get("/fhir/Observation?subject=Patient/paging-patient&_count=10&_offset=500").get_json()
    assert answer["total"] == 130 and not answer.get("entry")


def _temporary_files() -> set[str]:
    """SQLite's temporary files this process holds open (as ``tests/test_wal_checkpoints.py`` finds them)."""
    from test_wal_checkpoints import _temporary_files as held

    return set(held())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc to see open files")
def test_a_page_deep_into_large_resources_sorts_keys_not_resources(tmp_path: Path, clock: Clock) -> None:
    """1,200 Observations of some 6 KB each (7 MB, more than SQLite's 2 MB for a sort in memory): a page at offset
    1,150 is sorted from keys alone, so no temporary file is written; the same sort over the resources' JSON writes
    one, which shows the check can tell."""
    from conftest import TONGJIANG

    from gateway.config import load_settings
    from gateway.pipeline import Pipeline

    pipeline = Pipeline(load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG, "issuer_name": "通江县人民医院（演示）"}),
        clock=clock)
    try:
        _fill(pipeline, clock, 1200, 6000)
        db = pipeline.store.db
        before = _temporary_files()
        seen: set[str] = set()

        def look() -> int:
            seen.update(_temporary_files() - before)
            return 0

        db.conn.set_progress_handler(look, 5_000)
        try:
            for sort in (None, [("date", False)]):
                page = pipeline.store.search("Observation", [("subject", "Patient/paging-patient")], count=20,
                                             offset=1150, sort=sort)
                assert page.total == 1200 and len(page.resources) == 20
            history = pipeline.store.history("Observation", count=20, offset=1300)
            assert history.total == 1440 and len(history.resources) == 20
            assert not seen, "a deep page was sorted from the resources' JSON"
            # the reference: the same order over whole rows goes to a temporary file
            rows = db.conn.execute("SELECT json FROM resources WHERE type = 'Observation'"
                                   " ORDER BY last_updated DESC, id LIMIT 20 OFFSET 1150").fetchall()
            assert len(rows) == 20
            assert seen, "sorting whole rows at this size spills to a temporary file"
        finally:
            db.conn.set_progress_handler(None, 0)
    finally:
        pipeline.close()


def test_patient_identifier_finds_results_by_the_patients_identifiers_as_they_are_now(
        client: Any, pipeline: Any, clock: Clock) -> None:
    """A chained ``patient.identifier`` search asks for the results of the Patient that has that identifier now.
    Senders disagree: one LIS sends the hospital number (MR) and the 身份证号, another the 身份证号 alone, and a
    correction replaces a mistyped 身份证号. Results stored under any of those versions are found by the
    identifiers the Patient has now, and no longer by one it has lost."""
    mr = {"system": "urn:oid:2.16.156.10011.1.12.511921", "value": "Z0099812"}
    wrong = {"system": "urn:oid:2.16.156.10011.1.3", "value": "511921196612120038"}
    right = {"system": "urn:oid:2.16.156.10011.1.3", "value": "511921196612120011"}

    def patient(*identifiers: dict[str, str]) -> dict[str, Any]:
        return {"resourceType": "Patient", "id": "chained-patient", "identifier": list(identifiers),
                "name": [{"text": "王建国"}]}

    def results(start: int) -> list[dict[str, Any]]:
        obs = [_observation(n, f"{n:04d}", n) for n in range(start, start + 2)]
        for o in obs:
            o["subject"] = {"reference": "Patient/chained-patient"}
        return obs

    def found(query: str) -> set[str]:
        got, total, _ = _walk(client, f"/fhir/Observation?patient.identifier={query}&_count=50")
        assert total == len(got)
        return {o["id"] for o in got}

    _store(pipeline, clock, [patient(mr, wrong), *results(0)], "lis-a")
    assert found(f"{mr['system']}|{mr['value']}") == found(wrong["value"]) == {"obs-0000", "obs-0001"}
    clock.advance(minutes=5)
    _store(pipeline, clock, [patient(right), *results(2)], "lis-b")  # the 身份证号 corrected, no MR
    assert found(right["value"]) == {"obs-0000", "obs-0001", "obs-0002", "obs-0003"}
    assert found(wrong["value"]) == set() and found(mr["value"]) == set()
    clock.advance(minutes=5)
    _store(pipeline, clock, [patient(mr, right), *results(4)], "lis-a-again")
    every = {f"obs-{n:04d}" for n in range(6)}
    assert found(mr["value"]) == found(f"{right['system']}|{right['value']}") == every
    assert found(f"http://other.example/sid|{right['value']}") == set()
    # the other spelling of the chain, and a DiagnosticReport-free type, read the same index
    got, _, _ = _walk(client, f"/fhir/Observation?subject:Patient.identifier={mr['value']}&_count=50")
    assert {o["id"] for o in got} == every


def test_results_stored_while_a_client_pages_do_not_shift_its_pages(client: Any, pipeline: Any, clock: Clock) -> None:
    """A hospital system pulls results page by page while the LIS keeps sending: newest first, each new result would
    push the ones not read yet a place further, and a client following the next links would read some twice. The
    pages after the first read what was stored when the first was made; a new search sees the rest."""
    first = _fill(pipeline, clock, 60, 10)
    url = "/fhir/Observation?subject=Patient/paging-patient&_count=7"
    seen: list[str] = []
    totals: set[int] = set()
    n = 1000
    while url:
        page = client.get(url).get_json()
        totals.add(page["total"])
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        url = _next_of(page)
        clock.advance(minutes=1)
        _store(pipeline, clock, [_observation(n, "arrived meanwhile", n), _observation(n + 1, "too", n)], f"new-{n}")
        n += 2
    assert totals == {60} and len(seen) == len(set(seen)) == 60 and set(seen) == set(first)
    fresh = client.get("/fhir/Observation?subject=Patient/paging-patient&_summary=count").get_json()
    assert fresh["total"] == 60 + (n - 1000)


@pytest.mark.parametrize("order", ["", "&_sort=_lastUpdated", "&_sort=date", "&_sort=-date"])
def test_a_result_superseded_while_a_client_pages_makes_no_other_skipped(
        client: Any, pipeline: Any, clock: Clock, order: str) -> None:
    """A correction arriving while a hospital system pages through results supersedes a result it has read (the
    report's results leave the search): counted by position, every page after it started a place further on, and
    a result nobody touched was never delivered. Each page starts after the last resource of the one before."""
    from gateway.store.reports import SUPERSEDED_TAG

    first = _fill(pipeline, clock, 60, 10)

    def supersede(obs_id: str) -> None:
        clock.advance(minutes=1)
        obs = dict(first[obs_id], meta={"tag": [dict(SUPERSEDED_TAG)]})
        _store(pipeline, clock, [obs], f"superseded-{obs_id}")

    url = f"/fhir/Observation?subject=Patient/paging-patient&_count=7{order}"
    seen: list[str] = []
    gone: set[str] = set()
    pages = 0
    while url:
        page = client.get(url).get_json()
        pages += 1
        ids = [e["resource"]["id"] for e in page.get("entry", [])]
        seen += ids
        if ids:
            supersede(ids[0])  # read already: it leaves the search
            gone.add(ids[0])
        if pages == 2:
            later = next(i for i in sorted(first) if i not in seen)
            supersede(later)  # not read yet: it is not delivered, and no other is kept from the client
            gone.add(later)
        url = _next_of(page)
        assert pages < 100
    assert len(seen) == len(set(seen)), "a result delivered twice"
    never = set(first) - set(seen) - gone
    assert not never, f"results nobody touched were never delivered: {sorted(never)}"
    assert len(seen) == 60 - 1


def _keys(value: Any) -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", ["/fhir/Observation?subject=Patient/paging-patient&_count=5",
                                  "/fhir/Observation?subject=Patient/paging-patient&_count=5&_sort=date",
                                  "/fhir/Observation?subject=Patient/paging-patient&_count=5&_sort=-_lastUpdated",
                                  "/fhir/Observation/_history?_count=5"])
def test_a_next_link_cut_or_changed_is_refused_naming_page_after(client: Any, pipeline: Any, clock: Clock,
                                                                 path: str) -> None:
    """Whatever a client puts in _page_after — another order's keys, a number where a text goes and the other way
    round, numbers beyond any column, NaN, NUL — is a 400 naming it, on either engine (never a database error)."""
    _fill(pipeline, clock, 12, 10)
    page = client.get(path).get_json()
    nxt = urlsplit(next(link["url"] for link in page["link"] if link["relation"] == "next"))
    assert "_page_after=" in nxt.query
    assert client.get(f"{nxt.path}?{nxt.query}").status_code == 200
    other = urlsplit(next(link["url"] for link in client.get(
        "/fhir/Observation?subject=Patient/paging-patient&_count=5&_sort=_lastUpdated").get_json()["link"]
        if link["relation"] == "next"))
    foreign = next(p for p in other.query.split("&") if p.startswith("_page_after="))[len("_page_after="):]
    for bad in ("x", "e30", "WzFd", "W3RydWUsImEiXQ", "%00", "A" * 2000, foreign,  # not ours, {}, [1], [true,"a"]
                _keys(["-_lastUpdated,_id", 1, 1]), _keys(["-_lastUpdated,_id", 1.5e308, "a"]),
                _keys(["date", "a", "a"]), _keys(["date", 10 ** 400, "a"]), _keys(["date", 2e300, "a"]),
                _keys(["-_lastUpdated", "\u0000", "\u0000"]), _keys(["_history", 1, 1, 1]),
                _keys(["_history", "2026", "a", 10 ** 30]), _keys(["_history", "\u0000", "a", 1]),
                _keys(["-_lastUpdated,_id", "2026", "a\u0000"]), _keys(["-_lastUpdated,_id", "2026", "\ud800"]),
                _keys(["_history", "2026", "\udfff", 1])) + ("WyJkYXRlIiwgTmFOLCAiYSJd",):  # ["date", NaN, "a"]
        query = "&".join(p for p in nxt.query.split("&") if not p.startswith("_page_after=")) + f"&_page_after={bad}"
        answer = client.get(f"{nxt.path}?{query}")
        assert answer.status_code == 400, (bad, answer.get_data(as_text=True))
        outcome = answer.get_json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert "_page_after" in str(outcome), outcome


@pytest.mark.parametrize("order", ["date", "-date"])
def test_results_of_a_period_open_at_its_start_page_in_their_place(
        client: Any, pipeline: Any, clock: Clock, order: str) -> None:
    """A result whose effective Period has no start sorts first by date (its start is open: before every date): its
    sort key is not a number JSON has, and a next link carried it as null — the next page jumped to the results
    without a date, and those between were never delivered."""
    observations = []
    for n in range(20):
        obs = _observation(n, f"{n:04d}", n)
        obs.pop("effectiveDateTime", None)
        if n < 6:
            obs["effectivePeriod"] = {"end": f"2026-06-{10 + n:02d}T08:00:00+08:00"}
        elif n < 16:
            obs["effectiveDateTime"] = f"2026-07-{n:02d}T08:00:00+08:00"
        observations.append(obs)
    _store(pipeline, clock, observations, "periods")
    found, total, pages = _walk(client, f"/fhir/Observation?subject=Patient/paging-patient&_count=4&_sort={order}")
    ids = [o["id"] for o in found]
    assert total == 20 and len(ids) == len(set(ids)) == 20, ids
    assert ids[-4:] == [f"obs-{n:04d}" for n in range(16, 20)]  # no date: last, whichever direction


def test_versions_made_while_a_client_pages_a_history_neither_repeat_nor_shift_it(
        client: Any, pipeline: Any, clock: Clock) -> None:
    """A system polling a type's history (newest first) while results keep arriving: each new version would push
    the ones not read yet a place further and some came twice. The pages after the first hold the versions there
    were when it was made, each starting after the last one of the page before; a new history shows the rest."""
    first = _fill(pipeline, clock, 60, 10)
    url = "/fhir/Observation/_history?_count=7"
    seen: list[tuple[str, str]] = []
    totals: set[int] = set()
    n = 1000
    while url:
        page = client.get(url).get_json()
        totals.add(page["total"])
        seen += [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in page.get("entry", [])]
        url = _next_of(page)
        clock.advance(minutes=1)
        changed = sorted(first)[len(seen) % 60]
        _store(pipeline, clock, [_observation(n, "arrived meanwhile", n),
                                 _observation(int(changed[4:]), "changed meanwhile", n)], f"new-{n}")
        n += 1
    assert totals == {60 + 12}, totals  # 60 first versions and 12 second ones (_fill changes every fifth)
    assert len(seen) == len(set(seen)) == 72, "a version delivered twice or missed"
    again = client.get("/fhir/Observation/_history?_count=0").get_json()
    assert again["total"] == 72 + 2 * (n - 1000)
