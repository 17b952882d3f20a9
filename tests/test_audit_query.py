"""Audit search: the AuditEvent search parameters behave as FHIR R4 says (dates, tokens, references, paging, sort)."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from conftest import CST, FULING, TONGJIANG, validate_fhir
from test_audit_support import ROLES, locator, serving

from gateway.audit import query as q
from gateway.audit import records as r
from gateway.audit.log import append
from gateway.errors import InvalidSearch
from gateway.naming import SYSTEM_ID_CARD, SYSTEM_USCC
from gateway.store.db import connect

UTC = _dt.timezone.utc
ME = r.Party.member(TONGJIANG, "通江县人民医院")
PEER = r.Party.member(FULING, "涪陵中心医院")
P1 = r.PatientRef.id_card("510104199001011232", reference="Patient/p1")
P2 = r.PatientRef.id_card("510104198505050021")
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@pytest.fixture
def audit_client(settings, clock):
    with serving(settings, clock) as served:
        yield served


def _decision(outcome: str, report: str) -> dict:
    rule = r.RuleResult("eqa-pass", outcome == "recognized")
    return dict(
        gateway=ME,
        receiver=ME,
        issuer=PEER,
        report=report,
        item=("s", "GLU"),
        catalogue="cy",
        outcome=outcome,
        rules=[rule],
        snapshot_version=3,
    )


#: (entry number, time recorded, record); the times straddle month and year ends in +08:00 and UTC.
TIMES = {
    1: _dt.datetime(2025, 12, 31, 23, 59, 59, 999000, tzinfo=CST),
    2: _dt.datetime(2026, 1, 1, 0, 0, tzinfo=CST),
    3: _dt.datetime(2026, 1, 15, 12, 0, tzinfo=CST),
    4: _dt.datetime(2026, 1, 31, 16, 0, tzinfo=UTC),  # = 2026-02-01T00:00+08:00
    5: _dt.datetime(2026, 2, 1, 8, 30, 0, 500000, tzinfo=CST),
    6: _dt.datetime(2026, 3, 1, 0, 0, tzinfo=CST),
}


def _records() -> list[r.Record]:
    t = TIMES
    return [
        r.exchange("received", at=t[1], gateway=ME, peer=PEER, bundle_hash="sha256:" + "1" * 64, patient=P1),
        r.decision(at=t[2], patient=P1, **_decision("recognized", "FL-1")),
        r.decision(at=t[3], patient=P2, **_decision("not-recognized", "FL-2")),
        r.patient_read(
            at=t[4],
            gateway=ME,
            server_address="https://tj.example/fhir",
            client=PEER,
            client_address="10.1.2.3",
            member=PEER,
            patient=P2,
            resources=["DiagnosticReport/9"],
        ),
        r.exchange("refused", at=t[5], gateway=ME, peer=None, bundle_hash="sha256:" + "2" * 64, reason="bad-signature"),
        r.ingest(at=t[6], gateway=ME, source=r.Party.application(TONGJIANG, "LIS"), message_id="M-6", fmt="hl7v2"),
    ]


@pytest.fixture
def db(tmp_path: Path, database: str):
    handle = connect(locator(database, tmp_path))
    for record in _records():
        append(handle, record)
    yield handle
    handle.conn.close()


def ids(db, *params: tuple[str, str]) -> list[int]:
    search = q.parse_search([*params, ("_sort", "date")], tz=CST)
    return [e.seq for e in q.run(db, search).entries]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2026", [2, 3, 4, 5, 6]),  # a year is a range; entry 1 is still 2025 in +08:00
        ("2025", [1]),
        ("2026-01", [2, 3]),  # entry 4 is 2026-02-01T00:00 in +08:00, the gateway's zone
        ("eq2026-01", [2, 3]),
        ("ne2026-01", [1, 4, 5, 6]),
        ("lt2026-01", [1]),
        ("le2026-01", [1, 2, 3]),
        ("gt2026-01", [4, 5, 6]),
        ("ge2026-01", [2, 3, 4, 5, 6]),
        ("sa2026-01", [4, 5, 6]),
        ("eb2026-01", [1]),
        ("2026-02-01", [4, 5]),
        ("2026-01-31", []),
        ("2026-01-31T16:00:00Z", [4]),  # the same instant written in UTC
        ("ge2026-01-31T16:00:00+00:00", [4, 5, 6]),
        ("ge2026-01-31T16:00:00 00:00", [4, 5, 6]),  # '+' sent unencoded arrives as a space
        ("2026-02-01T08:30", [5]),  # minute precision
        ("2026-02-01T08:30:00", [5]),  # second precision: [08:30:00, 08:30:01)
        ("2026-02-01T08:30:00.5", [5]),  # [.5, .6)
        ("2026-02-01T08:30:00.6", []),
        ("lt2026-02-01T08:30:00.5", [1, 2, 3, 4]),
        ("le2026-02-01T08:30:00.5", [1, 2, 3, 4, 5]),
        ("2025-12-31T23:59:59.999+08:00", [1]),
        ("gt2025-12-31T23:59:59.999+08:00", [2, 3, 4, 5, 6]),
        ("2025,2026-03", [1, 6]),  # comma: OR
    ],
)
def test_date(db, value: str, expected: list[int]) -> None:
    assert ids(db, ("date", value)) == expected


def test_repeated_date_is_and(db) -> None:
    assert ids(db, ("date", "ge2026-01-15"), ("date", "lt2026-02-02")) == [3, 4, 5]


@pytest.mark.parametrize(
    "param, value, expected",
    [
        ("type", "110107", [1, 5, 6]),  # Import: received, refused, ingested
        ("type", f"{DCM}|110107", [1, 5, 6]),
        ("type", "|110107", []),  # |code: the code without a system; ours have one
        ("type", f"{DCM}|", [1, 5, 6]),
        ("type", "rest,lab-recognition", [2, 3, 4]),
        ("subtype", "recognized", [2]),
        ("subtype", "bundle-refused,not-recognized", [3, 5]),
        ("outcome", "8", [3]),
        ("outcome", "http://terminology.hl7.org/CodeSystem/audit-event-outcome|4", [5]),
        ("outcome", "0,4", [1, 2, 4, 5, 6]),
        ("agent:identifier", FULING, [1, 2, 3, 4]),
        ("agent:identifier", f"{SYSTEM_USCC}|{FULING}", [1, 2, 3, 4]),
        ("agent:identifier", f"{SYSTEM_USCC}|", [1, 2, 3, 4, 5, 6]),
        ("agent:identifier", "LIS", [6]),
        ("entity", "DiagnosticReport/9", [4]),
        ("entity", "https://tj.example/fhir/DiagnosticReport/9", [4]),  # absolute URL: same resource
        ("entity:identifier", "sha256:" + "2" * 64, [5]),
        ("entity-id", "sha256:" + "2" * 64, [5]),
        ("patient", "Patient/p1", [1, 2]),
        ("patient", "p1", [1, 2]),
        ("patient:identifier", "510104199001011232", [1, 2]),
        ("patient:identifier", f"{SYSTEM_ID_CARD}|510104198505050021", [3, 4]),
        ("patient:identifier", "urn:oid:1.2.3|510104198505050021", []),
        ("_id", "2,5", [2, 5]),
    ],
)
def test_tokens_and_references(db, param: str, value: str, expected: list[int]) -> None:
    assert ids(db, (param, value)) == expected


def test_parameters_combine_with_and(db) -> None:
    assert ids(db, ("patient:identifier", "510104198505050021"), ("type", "rest")) == [4]
    assert ids(db, ("agent:identifier", FULING), ("date", "ge2026-01-15"), ("outcome", "8")) == [3]


def test_sort(db) -> None:
    newest_first = q.run(db, q.parse_search([], tz=CST)).entries
    assert [e.seq for e in newest_first] == [6, 5, 4, 3, 2, 1]
    assert [e.seq for e in q.run(db, q.parse_search([("_sort", "-date")], tz=CST)).entries] == [6, 5, 4, 3, 2, 1]
    assert ids(db) == [1, 2, 3, 4, 5, 6]


def test_sort_is_by_time_recorded_not_by_entry(tmp_path: Path, database: str) -> None:
    db = connect(locator(database, tmp_path, "late"))
    late = _dt.datetime(2026, 1, 2, tzinfo=CST)
    early = _dt.datetime(2026, 1, 1, tzinfo=CST)
    for at in (late, early, late):  # a member system reporting late: entries are not in time order
        append(db, r.ingest(at=at, gateway=ME, source=ME, message_id="m", fmt="csv"))
    assert [e.seq for e in q.run(db, q.parse_search([("_sort", "date")], tz=CST)).entries] == [2, 1, 3]
    assert [e.seq for e in q.run(db, q.parse_search([("_sort", "-date")], tz=CST)).entries] == [3, 1, 2]
    db.conn.close()


def test_paging_follows_next_until_done_and_ignores_later_entries(db) -> None:
    search = q.parse_search([("_count", "2"), ("_sort", "date")], tz=CST)
    seen: list[int] = []
    page = q.run(db, search)
    seen += [e.seq for e in page.entries]
    # Entries appended while paging are not in this search: later pages neither skip nor repeat.
    append(db, r.ingest(at=TIMES[1] - _dt.timedelta(days=1), gateway=ME, source=ME, message_id="late", fmt="csv"))
    while page.next is not None:
        bundle = q.searchset(page, search, base_url="https://gw/fhir", path="https://gw/fhir/AuditEvent")
        nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
        search = q.parse_search(parse_qsl(urlsplit(nxt).query), tz=CST)
        page = q.run(db, search)
        seen += [e.seq for e in page.entries]
    assert seen == [1, 2, 3, 4, 5, 6]
    assert search.count == 2
    last = q.searchset(page, search, base_url="https://gw/fhir", path="https://gw/fhir/AuditEvent")
    assert [link["relation"] for link in last["link"]] == ["self"]
    # R4: self is the link that gave this page: followed, it gives the same entries (it gave the first page's)
    again = q.parse_search(parse_qsl(urlsplit(last["link"][0]["url"]).query), tz=CST)
    assert [e.seq for e in q.run(db, again).entries] == [e.seq for e in page.entries] == [5, 6]


def test_count_zero_gives_the_total_only(db) -> None:
    page = q.run(db, q.parse_search([("_count", "0"), ("type", "110107")], tz=CST))
    assert (page.entries, page.total) == ([], 3)
    assert q.searchset(page, q.parse_search([("_count", "0")], tz=CST), base_url="b", path="p")["total"] == 3


def test_count_is_capped() -> None:
    assert q.parse_search([("_count", "100000")], tz=CST).count == q.MAX_COUNT


@pytest.mark.parametrize(
    "param, value, words",
    [
        ("foo", "1", "unknown search parameter 'foo'"),
        ("type:not", "rest", "modifier of 'type:not' is not supported"),
        ("patient:Patient", "p1", "modifier"),
        ("date", "ap2026", "'ap'"),
        ("date", "xx2026", "unknown prefix"),
        ("date", "2026-13", "not a calendar date"),
        ("date", "2026-02-30", "not a calendar date"),
        ("date", "26-01-01", "is not a FHIR date"),
        ("date", "", "empty value"),
        ("outcome", "3", "not 0, 4, 8 or 12"),
        ("agent", "cli", "not a reference"),
        ("patient", "Organization/1", "not a Patient reference"),
        ("type", "a|b|c", "more than one '|'"),
        ("_count", "-1", "not a whole number"),
        ("_sort", "_lastUpdated", "not supported"),
        ("_cursor", "not-a-cursor!", "not a paging cursor"),
        ("_id", "x", "not an AuditEvent id"),
        ("_format", "xml", "JSON only"),
    ],
)
def test_bad_search_names_the_parameter(param: str, value: str, words: str) -> None:
    with pytest.raises(InvalidSearch) as err:
        q.parse_search([(param, value)], tz=CST)
    assert err.value.http_status == 400
    assert err.value.location == param
    assert words in err.value.message


def test_escaped_comma_is_not_an_or(db) -> None:
    search = q.parse_search([("entity:identifier", r"a\,b")], tz=CST)
    assert search.keys == (("entity:identifier", (q.Token(None, "a,b"),)),)


# --------------------------------------------------------------------------- over HTTP


def test_http_search_is_a_searchset_with_next_links(audit_client, tmp_path: Path) -> None:
    client, tokens, db = audit_client
    base = len(ROLES)  # adding the users wrote the first entries
    for record in _records():
        append(db, record)
    auth = {"Authorization": f"Bearer {tokens['auditor']}"}
    res = client.get("/fhir/AuditEvent?type=110107&_count=2&_sort=date", headers=auth)
    assert res.status_code == 200 and res.mimetype == "application/fhir+json"
    bundle = res.get_json()
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "searchset")
    got = [e["resource"]["id"] for e in bundle["entry"]]
    assert got == [str(base + 1), str(base + 5)]
    assert bundle["entry"][0]["fullUrl"] == f"http://localhost/fhir/AuditEvent/{base + 1}"
    assert bundle["entry"][0]["search"] == {"mode": "match"}
    nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    assert nxt.startswith("http://localhost/fhir/AuditEvent?type=110107&_count=2&_sort=date&_cursor=")
    page2 = client.get(nxt[len("http://localhost"):], headers=auth).get_json()
    assert [e["resource"]["id"] for e in page2["entry"]] == [str(base + 6)]
    assert [link["relation"] for link in page2["link"]] == ["self"]
    path = tmp_path / "searchset.json"
    path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")
    result = validate_fhir([path])
    assert result.returncode == 0, result.stdout + result.stderr


def test_http_paging_total_stays_the_first_pages_while_entries_are_appended(audit_client) -> None:
    """Every page an auditor reads appends an entry of its own (the read is audited): following the next links,
    the total stays the one the first page gave, and the pages hold exactly that many entries."""
    client, tokens, db = audit_client
    for record in _records():
        append(db, record)
    auth = {"Authorization": f"Bearer {tokens['auditor']}"}
    url = "/fhir/AuditEvent?_count=3"
    totals, ids = [], []
    while url:
        bundle = client.get(url, headers=auth).get_json()
        totals.append(bundle["total"])
        ids += [e["resource"]["id"] for e in bundle.get("entry", [])]
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = nxt[0][len("http://localhost"):] if nxt else ""
        append(db, _records()[0])  # and something else is recorded meanwhile
    assert len(totals) > 2 and set(totals) == {totals[0]}
    assert len(ids) == len(set(ids)) == totals[0]


def test_http_unknown_parameter_is_a_400_outcome(audit_client) -> None:
    client, tokens, _ = audit_client
    res = client.get("/fhir/AuditEvent?colour=red", headers={"Authorization": f"Bearer {tokens['auditor']}"})
    assert res.status_code == 400
    body = res.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["expression"] == ["colour"]
    assert "colour" in body["issue"][0]["diagnostics"]
    # unless the client asks for lenient handling (R4 search.html#errors), as every search of this server
    auth = {"Authorization": f"Bearer {tokens['auditor']}", "Prefer": "handling=lenient"}
    lenient = client.get("/fhir/AuditEvent?colour=red&_count=1", headers=auth)
    assert lenient.status_code == 200, lenient.get_data(as_text=True)
    assert lenient.get_json()["type"] == "searchset"
    assert not any("colour" in link["url"] for link in lenient.get_json()["link"])
    strict = {"Authorization": f"Bearer {tokens['auditor']}"}
    assert client.get("/fhir/AuditEvent?_total=accurate&_count=1", headers=strict).status_code == 200  # a hint
    assert client.get("/fhir/AuditEvent?_total=always", headers=strict).status_code == 400


def test_http_read(audit_client) -> None:
    client, tokens, db = audit_client
    entry = append(db, _records()[1])
    auth = {"Authorization": f"Bearer {tokens['admin']}"}
    event = client.get(f"/fhir/AuditEvent/{entry.seq}", headers=auth).get_json()
    assert (event["resourceType"], event["id"], event["type"]["code"]) == ("AuditEvent", entry.id, "lab-recognition")
    missing = client.get("/fhir/AuditEvent/999", headers=auth)
    assert missing.status_code == 404 and missing.get_json()["resourceType"] == "OperationOutcome"
    # vread: an entry's one version (an auditor was refused with 403 naming the submitter's role, a submitter 404)
    auditor = {"Authorization": f"Bearer {tokens['auditor']}"}
    same = client.get(f"/fhir/AuditEvent/{entry.seq}/_history/1", headers=auditor)
    assert same.status_code == 200 and same.get_json()["id"] == event["id"]
    assert client.get(f"/fhir/AuditEvent/{entry.seq}/_history/2", headers=auditor).status_code == 404
