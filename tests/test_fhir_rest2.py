"""FHIR REST conventions: _include and _revinclude, _sort and _lastUpdated."""
from __future__ import annotations

import json

import pytest

from conftest import validate_fhir
from test_api import assert_outcome
from test_fhir_rest import CORRECTED, UTF8


@pytest.fixture
def loaded(client, clock):
    """A client of a gateway holding one report, and the report's ALT Observation corrected a minute later."""
    assert client.post("/ingest/hl7v2", data=UTF8).status_code == 200
    clock.advance(minutes=1)
    assert client.post("/ingest/hl7v2", data=CORRECTED).status_code == 200
    return client


def assert_valid_r4(resource: dict, tmp_path) -> None:
    """The outside validators find no error in ``resource``."""
    path = tmp_path / f"{resource['resourceType']}-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(resource, ensure_ascii=False), encoding="utf-8")
    result = validate_fhir([path])
    assert result.returncode == 0, result.stdout + result.stderr


def _entries(bundle: dict, mode: str) -> list[dict]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


# ------------------------------------------------------------------ _include, _revinclude


def test_report_with_its_observations_patient_and_specimen_in_one_call(loaded, tmp_path) -> None:
    resp = loaded.get("/fhir/DiagnosticReport?_include=DiagnosticReport:subject&_include=DiagnosticReport:result"
                      "&_include=DiagnosticReport:specimen:Specimen&_include=DiagnosticReport:performer")
    assert resp.status_code == 200
    bundle = resp.get_json()
    assert_valid_r4(bundle, tmp_path)
    reports = _entries(bundle, "match")
    assert bundle["total"] == len(reports)  # included resources are not counted
    included = {f"{r['resourceType']}/{r['id']}" for r in _entries(bundle, "include")}
    wanted = {ref["reference"] for report in reports
              for ref in [report["subject"], *report["result"], *report.get("specimen", []),
                          *report.get("performer", [])]}
    assert included == wanted
    assert any(k.startswith("Observation/") for k in included) and any(k.startswith("Patient/") for k in included)
    assert len(bundle["entry"]) == len(reports) + len(included)  # each resource once
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    assert "_include=DiagnosticReport%3Asubject" in self_link


def test_revinclude_finds_what_refers_to_the_matches(loaded, tmp_path) -> None:
    patient = loaded.get("/fhir/Patient").get_json()["entry"][0]["resource"]
    bundle = loaded.get(f"/fhir/Patient?_id={patient['id']}&_revinclude=Observation:subject"
                        "&_revinclude=DiagnosticReport:subject").get_json()
    assert_valid_r4(bundle, tmp_path)
    assert [r["id"] for r in _entries(bundle, "match")] == [patient["id"]]
    included = _entries(bundle, "include")
    observations = loaded.get("/fhir/Observation?_count=50").get_json()
    assert {r["id"] for r in included if r["resourceType"] == "Observation"} == {
        e["resource"]["id"] for e in observations["entry"]}
    assert [r["resourceType"] for r in included].count("DiagnosticReport") == 2  # and its correction
    assert all(r["subject"]["reference"] == f"Patient/{patient['id']}" for r in included)
    # a report whose result is one Observation, from that Observation
    alt = included[0]
    back = loaded.get(f"/fhir/Observation?_id={alt['id']}&_revinclude=DiagnosticReport:result").get_json()
    [report] = _entries(back, "include")
    assert f"Observation/{alt['id']}" in {r["reference"] for r in report["result"]}
    # nothing refers to an unknown patient, and a revinclude of another target adds nothing
    none = loaded.get("/fhir/Patient?_id=nobody&_revinclude=Observation:subject").get_json()
    assert none["total"] == 0 and "entry" not in none
    other = loaded.get("/fhir/Patient?_revinclude=DiagnosticReport:result").get_json()
    assert _entries(other, "include") == []


@pytest.mark.parametrize("query", ["_include=DiagnosticReport:subject",  # another type's reference
                                   "_include=Observation:code", "_include=*", "_include=Observation",
                                   "_include=Observation:subject:Organization", "_revinclude=Patient:link",
                                   "_include:iterate=Observation:subject"])
def test_include_of_what_is_not_followed_is_refused(loaded, query) -> None:
    resp = loaded.get(f"/fhir/Observation?{query}")
    assert_outcome(resp, 400)
    assert query.split("=")[0].split(":")[0] in resp.get_data(as_text=True)


def test_capability_statement_declares_includes(loaded, anon) -> None:
    cap = anon.get("/fhir/metadata").get_json()
    by_type = {r["type"]: r for r in cap["rest"][0]["resource"]}
    assert "DiagnosticReport:result" in by_type["DiagnosticReport"]["searchInclude"]
    assert "Observation:subject" in by_type["Patient"]["searchRevInclude"]
    assert "DiagnosticReport:result" in by_type["Observation"]["searchRevInclude"]
    for rtype, entry in by_type.items():
        for value in entry.get("searchInclude", []):
            assert loaded.get(f"/fhir/{rtype}", query_string={"_include": value}).status_code == 200
        for value in entry.get("searchRevInclude", []):
            assert loaded.get(f"/fhir/{rtype}", query_string={"_revinclude": value}).status_code == 200
    assert {"name": "_lastUpdated", "type": "date"} in by_type["Observation"]["searchParam"]
    assert {"name": "family", "type": "string"} in by_type["Patient"]["searchParam"]
    assert [o["name"] for o in by_type["Patient"]["operation"]] == ["validate"]


# ------------------------------------------------------------------ _sort, _lastUpdated


def test_sort_by_last_updated_both_ways(loaded) -> None:
    up = loaded.get("/fhir/Observation?_count=50&_sort=_lastUpdated").get_json()
    stamps = [e["resource"]["meta"]["lastUpdated"] for e in up["entry"]]
    assert stamps == sorted(stamps) and stamps[0] != stamps[-1]  # the corrected ALT is the latest
    down = loaded.get("/fhir/Observation?_count=50&_sort=-_lastUpdated").get_json()
    assert [e["resource"]["meta"]["lastUpdated"] for e in down["entry"]] == sorted(stamps, reverse=True)
    assert down["entry"][0]["resource"]["valueQuantity"]["value"] == 38


def test_sort_by_date_orders_and_pages(loaded, client, clock) -> None:
    clock.advance(minutes=1)
    later = (UTF8.replace(b"TJ2405200099", b"TJ2406210099").replace(b"O240520", b"O240621")
             .replace(b"R240520", b"R240621").replace(b"S240520", b"S240621").replace(b"20240520", b"20240621"))
    assert client.post("/ingest/hl7v2", data=later).status_code == 200
    for key in ("date", "issued"):
        down = loaded.get(f"/fhir/DiagnosticReport?_sort=-{key}").get_json()
        field = "effectiveDateTime" if key == "date" else "issued"
        values = [e["resource"][field] for e in down["entry"]]
        assert len(values) == 4 and values[0] > values[-1] and values == sorted(values, reverse=True), values
        up = loaded.get(f"/fhir/DiagnosticReport?_sort={key}&_count=2").get_json()
        assert [e["resource"][field] for e in up["entry"]] == values[:1:-1]
        following = next(link["url"] for link in up["link"] if link["relation"] == "next")
        assert f"_sort={key}" in following
        page2 = loaded.get("/fhir" + following.split("/fhir", 1)[1]).get_json()
        assert [e["resource"][field] for e in page2["entry"]] == values[1::-1]
    # by the report date, then the latest stored first
    both = loaded.get("/fhir/DiagnosticReport?_sort=-date,-_lastUpdated").get_json()
    assert both["entry"][0]["resource"]["effectiveDateTime"].startswith("2024-06-21")


@pytest.mark.parametrize("query", ["_sort=code", "_sort=bogus", "_sort=", "_sort=-"])
def test_sort_by_what_is_not_indexed_as_a_date_is_refused(loaded, query) -> None:
    resp = loaded.get(f"/fhir/Observation?{query}")
    assert_outcome(resp, 400)
    assert "_sort" in resp.get_data(as_text=True)


def test_last_updated_searches_as_a_date(loaded) -> None:
    stamps = sorted({e["resource"]["meta"]["lastUpdated"]
                     for e in loaded.get("/fhir/Observation?_count=50").get_json()["entry"]})
    assert len(stamps) == 2
    first, last = stamps
    total = loaded.get("/fhir/Observation?_summary=count").get_json()["total"]
    newer = loaded.get("/fhir/Observation", query_string={"_lastUpdated": f"gt{first}"}).get_json()
    assert newer["total"] == 1 and newer["entry"][0]["resource"]["meta"]["lastUpdated"] == last
    older = loaded.get("/fhir/Observation", query_string={"_lastUpdated": f"le{first}"}).get_json()
    assert older["total"] == total - 1
    exact = loaded.get("/fhir/Observation", query_string={"_lastUpdated": last}).get_json()
    assert exact["total"] == 1
    assert loaded.get("/fhir/Observation?_lastUpdated=gt2999").get_json()["total"] == 0
    year = last[:4]
    assert loaded.get(f"/fhir/Observation?_lastUpdated={year}").get_json()["total"] == total
    bad = loaded.get("/fhir/Observation?_lastUpdated=yesterday")
    assert bad.status_code == 400 and "_lastUpdated" in bad.get_data(as_text=True)


# ------------------------------------------------------------------ Patient name, family, given; :identifier


def _patients(client, query: str) -> list[str]:
    resp = client.get(f"/fhir/Patient?{query}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [e["resource"]["name"][0].get("family", "") for e in resp.get_json().get("entry", [])]


def test_patient_name_search_is_a_fhir_string_search(loaded, client) -> None:
    other = (UTF8.replace(b"TJ2405200099", b"TJ2405200555").replace(b"Z0099812", b"Z0099999")
             .replace("王^建国".encode(), "Müller^Zoë".encode()).replace(b"O240520", b"O240599")
             .replace(b"R240520", b"R240599").replace(b"S240520", b"S240599")
             .replace(b"511921196612120011", b"511921196612120097"))
    assert client.post("/ingest/hl7v2", data=other).status_code == 200
    assert _patients(loaded, "family=王") == ["王"]
    assert _patients(loaded, "given=建") == ["王"]  # starts with
    assert _patients(loaded, "name=建国") == ["王"]  # any part of the name
    assert _patients(loaded, "given=国") == []  # not a prefix
    assert _patients(loaded, "family=muller") == ["Müller"]  # case and accents ignored
    assert _patients(loaded, "family=MÜL") == ["Müller"]
    assert _patients(loaded, "given=zoe") == ["Müller"]  # accents of the given name too
    assert _patients(loaded, "name:exact=Müller") == ["Müller"]
    assert _patients(loaded, "name:exact=muller") == []
    assert _patients(loaded, "family:contains=ll") == ["Müller"]
    assert sorted(_patients(loaded, "family=王,müller")) == ["Müller", "王"]  # values ORed
    assert _patients(loaded, "family=王&given=zoe") == []  # parameters ANDed
    assert _patients(loaded, "name=%25") == []  # no wildcard
    assert _patients(loaded, "birthdate=1966-12-12&family=王") == ["王"]
    found = loaded.get("/fhir/Patient?name:exact=Müller").get_json()
    assert "name%3Aexact=M%C3%BCller" in found["link"][0]["url"]
    bad = loaded.get("/fhir/Patient?name:missing=true")
    assert_outcome(bad, 400)
    assert "name" in bad.get_data(as_text=True)


def test_an_escaped_comma_is_part_of_the_value_not_a_second_one(loaded, client) -> None:
    """R4 search.html, "Escaping search parameters": ``\\,`` is a comma inside a value. It was split there and the
    halves ORed: ``name=王\\,李`` found every 王 and every 李, ``identifier=<one>\\,<other>`` the other person."""
    other = (UTF8.replace(b"TJ2405200099", b"TJ2405200556").replace(b"Z0099812", b"Z0099998")
             .replace("王^建国".encode(), "Smith,Jr^John".encode()).replace(b"O240520", b"O240598")
             .replace(b"R240520", b"R240598").replace(b"S240520", b"S240598")
             .replace(b"511921196612120011", b"511921196612120054"))
    assert client.post("/ingest/hl7v2", data=other).status_code == 200
    assert sorted(_patients(loaded, "family=王,smith")) == ["Smith,Jr", "王"]
    assert _patients(loaded, "family=smith%5C,jr") == ["Smith,Jr"]
    assert _patients(loaded, "family:exact=Smith%5C,Jr") == ["Smith,Jr"]
    assert _patients(loaded, "family:exact=Smith,Jr") == []  # (two values: "Smith" and "Jr", neither exact)
    assert _patients(loaded, "name=王%5C,smith") == []
    assert _patients(loaded, "identifier=511921196612120011%5C,511921196612120054") == []
    assert _patients(loaded, "identifier=511921196612120011,511921196612120054") != []
    assert _patients(loaded, "identifier=urn:oid:2.16.156.10011.1.3|511921196612120054") == ["Smith,Jr"]


def test_identifier_modifier_on_references(loaded) -> None:
    patient = loaded.get("/fhir/Patient").get_json()["entry"][0]["resource"]
    ident = next(i for i in patient["identifier"] if i["value"] == "Z0099812")
    for param in ("subject:identifier", "patient:identifier"):
        wanted = {param: f"{ident['system']}|Z0099812", "_summary": "count"}
        found = loaded.get("/fhir/Observation", query_string=wanted).get_json()
        assert found["total"] == loaded.get("/fhir/Observation?_summary=count").get_json()["total"] > 0
        none = loaded.get("/fhir/Observation", query_string={param: f"{ident['system']}|Z0000000"}).get_json()
        assert none["total"] == 0
    reports = loaded.get("/fhir/DiagnosticReport", query_string={"subject:identifier": "Z0099812"}).get_json()
    assert reports["total"] == 2


def test_an_id_card_number_typed_full_width_or_in_its_old_form_finds_the_patient(loaded) -> None:
    """A 身份证号 is stored in one form (ASCII, upper-case X, 18 digits); a search typed with a Chinese input
    method's full-width digits, or in the old 15-digit form, is the same number."""
    from gateway.naming import SYSTEM_ID_CARD

    patient = loaded.get("/fhir/Patient").get_json()["entry"][0]["resource"]
    number = next(i["value"] for i in patient["identifier"] if i["system"] == SYSTEM_ID_CARD)
    assert number[6:8] == "19"  # born in the 1900s: it has an old 15-digit form
    full_width = number.translate(str.maketrans("0123456789X", "０１２３４５６７８９Ｘ"))
    old_form = number[:6] + number[8:17]
    for typed in (number, full_width, f"{SYSTEM_ID_CARD}|{full_width}", f"{SYSTEM_ID_CARD}|{old_form}"):
        found = loaded.get("/fhir/Patient", query_string={"identifier": typed}).get_json()
        assert [e["resource"]["id"] for e in found["entry"]] == [patient["id"]], typed
        reports = loaded.get("/fhir/DiagnosticReport",
                             query_string={"patient.identifier": typed, "_summary": "count"}).get_json()
        assert reports["total"] == 2, typed
    # an ASCII value with no system may be another identifier's: searched as typed
    assert loaded.get("/fhir/Patient", query_string={"identifier": old_form}).get_json()["total"] == 0
    wrong = "１" if number[-1] != "1" else "２"
    other = loaded.get("/fhir/Patient", query_string={"identifier": f"{SYSTEM_ID_CARD}|{full_width[:-1]}{wrong}"})
    assert other.status_code == 200 and other.get_json()["total"] == 0  # a wrong check digit is no one's number


# ------------------------------------------------------------------ _elements


def test_elements_keeps_what_is_asked_and_what_is_mandatory(loaded, tmp_path) -> None:
    bundle = loaded.get("/fhir/Observation?_elements=valueQuantity,Observation.subject&_count=50"
                        "&_include=Observation:subject").get_json()
    assert_valid_r4(bundle, tmp_path)
    for obs in _entries(bundle, "match"):
        assert set(obs) <= {"resourceType", "id", "meta", "status", "code", "valueQuantity", "subject"}
        assert {"status", "code", "subject"} <= set(obs)
        assert {"code": "SUBSETTED", "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "display": "subsetted"} in obs["meta"]["tag"]
        assert obs["meta"]["versionId"]
    assert "effectiveDateTime" not in _entries(bundle, "match")[0]
    [patient] = _entries(bundle, "include")
    assert "SUBSETTED" not in str(patient.get("meta"))  # included resources are whole
    assert "_elements=valueQuantity%2CObservation.subject" in bundle["link"][0]["url"]
    whole = loaded.get("/fhir/Observation").get_json()["entry"][0]["resource"]
    assert "effectiveDateTime" in whole and "tag" not in whole["meta"]


@pytest.mark.parametrize("value", ["", "code;drop", "Observation.code.coding", "a,"])
def test_elements_that_are_not_element_names_are_refused(loaded, value) -> None:
    resp = loaded.get("/fhir/Observation", query_string={"_elements": value})
    assert_outcome(resp, 400)
    assert "_elements" in resp.get_data(as_text=True)


# ------------------------------------------------------------------ $validate at instance level


def _codes(resp) -> list[tuple[str, str]]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    return [(i["severity"], " ".join(i.get("expression", []))) for i in body["issue"]]


@pytest.mark.parametrize("wrapped", [False, True])
def test_validate_refuses_a_code_outside_a_required_base_binding(loaded, wrapped) -> None:
    patient = loaded.get("/fhir/Patient").get_json()["entry"][0]["resource"]
    bad = {"resourceType": "Patient", "id": patient["id"], "gender": "bogus",
           "contact": [{"gender": "nobody"}]}
    body = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": bad}]} if wrapped else bad
    for path in ("/fhir/Patient/$validate", f"/fhir/Patient/{patient['id']}/$validate"):
        issues = _codes(loaded.post(path, json=body))
        assert issues.count(("error", "Patient.gender")) == 1  # said once, by the guide's R4 bindings
        assert issues.count(("error", "Patient.contact[0].gender")) == 1
    good = {**bad, "gender": "male", "contact": [{"gender": "female"}]}
    assert not [i for i in _codes(loaded.post(f"/fhir/Patient/{patient['id']}/$validate", json=good))
                if i[0] == "error"]


def test_validate_the_stored_resource_and_refuse_what_is_not_it(loaded, anon) -> None:
    report = loaded.get("/fhir/DiagnosticReport").get_json()["entry"][0]["resource"]
    assert not [i for i in _codes(loaded.get(f"/fhir/DiagnosticReport/{report['id']}/$validate")) if i[0] == "error"]
    assert loaded.get("/fhir/DiagnosticReport/nobody/$validate").status_code == 404
    assert anon.get(f"/fhir/DiagnosticReport/{report['id']}/$validate").status_code == 401
    other = loaded.post(f"/fhir/DiagnosticReport/{report['id']}/$validate", json={**report, "id": "another"})
    assert_outcome(other, 422)
    assert "id" in other.get_data(as_text=True)
    posted = {"resourceType": "Observation", "status": "bogus", "code": {"text": "ALT"}}
    observation = loaded.post("/fhir/Observation/x1/$validate", json=posted)
    assert ("error", "Observation.status") in _codes(observation)


@pytest.mark.parametrize("prefer, lenient", [
    ("handling=lenient", True), ('handling="lenient"', True), ("HANDLING=LENIENT", True),
    ("return=minimal, handling=lenient", True), ("handling=lenientx", False), ("handling=strict", False),
    ("x-handling=lenient", False)])
def test_prefer_handling_is_read_as_rfc_7240_says(prefer: str, lenient: bool) -> None:
    from gateway.api.errors import prefers_lenient

    assert prefers_lenient(prefer) is lenient


@pytest.mark.parametrize("query", [
    "/fhir/DiagnosticReport?_include=DiagnosticReport:result&_include=DiagnosticReport:subject",
    "/fhir/Patient?_revinclude=Observation:subject"])
def test_includes_past_the_limit_are_said_in_the_page(loaded, tmp_path, monkeypatch, query: str) -> None:
    """A page whose includes go past the limit says so in an OperationOutcome entry (search mode outcome): they
    stopped at the limit without a word."""
    import gateway.api.fhir as fhir_api

    monkeypatch.setattr(fhir_api, "_MAX_INCLUDED", 3)
    bundle = loaded.get(query).get_json()
    assert len(_entries(bundle, "include")) == 3
    [outcome] = _entries(bundle, "outcome")
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "warning"
    assert "would add more than 3 resources to this page" in outcome["issue"][0]["diagnostics"]
    assert_valid_r4(bundle, tmp_path)
    monkeypatch.setattr(fhir_api, "_MAX_INCLUDED", 1000)
    assert not _entries(loaded.get(query).get_json(), "outcome")


def test_links_name_the_configured_public_url_not_the_clients_host_header(loaded) -> None:
    """With public_url configured, full URLs and links name it: a client's Host header (anyone sets it) wrote
    them, the CapabilityStatement's implementation URL and the audit log's server address included."""
    app = loaded.application
    settings = app.extensions["gateway.settings"]
    before = settings.public_url
    object.__setattr__(settings, "public_url", "https://gw.tongjiang.example/fhir")
    try:
        page = loaded.get("/fhir/Patient?_count=1", headers={"Host": "evil.example"}).get_json()
        urls = [link["url"] for link in page["link"]] + [e["fullUrl"] for e in page.get("entry", [])]
        assert urls and all(u.startswith("https://gw.tongjiang.example/fhir/") for u in urls), urls
        meta = loaded.get("/fhir/metadata", headers={"Host": "evil.example"}).get_json()
        assert meta["implementation"]["url"] == "https://gw.tongjiang.example/fhir"
    finally:
        object.__setattr__(settings, "public_url", before)
    plain = loaded.get("/fhir/Patient?_count=1").get_json()  # not configured: the URL the request reached
    assert plain["link"][0]["url"].startswith("http://localhost/fhir/Patient?")
