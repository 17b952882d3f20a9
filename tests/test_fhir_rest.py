"""FHIR REST conventions: CapabilityStatement, _count=0 and _summary=count, conditional reads, vread and _history,
Accept/_format negotiation, gzip, CORS and POST _search."""
from __future__ import annotations

import email.utils
import gzip
import json
from dataclasses import replace

import pytest

from conftest import DATA, make_token, validate_fhir
from test_api import assert_outcome

UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
#: The same report corrected: a new message whose ALT value changed (a second version of that Observation).
CORRECTED = UTF8.replace(b"TJ2405200099", b"TJ2405200199").replace(b"||36|U/L|", b"||38|U/L|")


@pytest.fixture
def loaded(client):
    """A client of a gateway holding one report, and the report's ALT Observation corrected once."""
    assert client.post("/ingest/hl7v2", data=UTF8).status_code == 200
    assert client.post("/ingest/hl7v2", data=CORRECTED).status_code == 200
    return client


def _alt(client) -> dict:
    found = client.get("/fhir/Observation", query_string={"code": "ALT", "_count": "50"}).get_json()
    if not found.get("entry"):
        found = client.get("/fhir/Observation?_count=50").get_json()
    return next(e["resource"] for e in found["entry"] if e["resource"].get("valueQuantity", {}).get("value") == 38)


# ------------------------------------------------------------------ CapabilityStatement


def test_capability_statement_declares_security_and_only_what_answers(loaded, anon) -> None:
    cap = anon.get("/fhir/metadata").get_json()
    rest = cap["rest"][0]
    service = rest["security"]["service"][0]["coding"][0]
    assert service["code"] == "SMART-on-FHIR"
    token = rest["security"]["extension"][0]["extension"][0]["valueUri"]
    assert token.endswith("/auth/token")
    report = loaded.get("/fhir/DiagnosticReport").get_json()["entry"][0]["resource"]
    ids = {"DiagnosticReport": report["id"], "Patient": report["subject"]["reference"].split("/")[1],
           "Observation": report["result"][0]["reference"].split("/")[1],
           "Organization": report["performer"][0]["reference"].split("/")[1]}
    specimens = loaded.get("/fhir/Specimen").get_json()
    ids["Specimen"] = specimens["entry"][0]["resource"]["id"]
    checked = 0
    for resource in rest["resource"]:
        rtype = resource["type"]
        codes = {i["code"] for i in resource.get("interaction", [])}
        for param in resource.get("searchParam", []):
            value = "2024" if param["type"] == "date" else "x"
            resp = loaded.get(f"/fhir/{rtype}", query_string={param["name"]: value})
            # an auditor's search answers 403 to a submitter: the route exists
            assert resp.status_code in (200, 403), (rtype, param, resp.status_code)
            checked += 1
        rid = ids.get(rtype)
        if rid is None:
            continue
        paths = {"read": f"/fhir/{rtype}/{rid}", "vread": f"/fhir/{rtype}/{rid}/_history/1",
                 "history-instance": f"/fhir/{rtype}/{rid}/_history", "history-type": f"/fhir/{rtype}/_history",
                 "search-type": f"/fhir/{rtype}"}
        for code, path in paths.items():
            status = loaded.get(path).status_code
            assert (status == 200) == (code in codes), (rtype, code, status)
            checked += 1
    assert checked > 40
    # declared nothing the server does not answer: no XML format, no system-level history
    assert cap["format"] == ["application/fhir+json", "json"]
    assert {i["code"] for i in rest["interaction"]} == {"transaction"}
    # and says what its transaction takes: a report Bundle, not any batch of operations
    assert "GET, DELETE, PATCH and conditional entries are refused" in rest["interaction"][0]["documentation"]


# ------------------------------------------------------------------ _count=0, _summary=count, total


@pytest.mark.parametrize("query", ["_count=0", "_summary=count"])
def test_count_only_searchset_has_total_and_no_next_link(loaded, query, tmp_path) -> None:
    resp = loaded.get(f"/fhir/Observation?code=http://loinc.org|&{query}")
    body = resp.get_json()
    assert resp.status_code == 200 and body["type"] == "searchset"
    assert body["total"] == 4 and "entry" not in body
    assert [link["relation"] for link in body["link"]] == ["self"]
    path = tmp_path / "count.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    result = validate_fhir([path])
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_count_above_the_page_size_gives_full_pages_said_in_the_page(loaded, monkeypatch, tmp_path) -> None:
    """R4 search: a server returns no more than _count, and may return fewer; a client asking for large pages gets
    this server's page size, the next link carrying on, instead of a 400."""
    import gateway.api.fhir as fhir_api

    everything = {e["resource"]["id"] for e in loaded.get("/fhir/Observation?_count=200").get_json()["entry"]}
    assert len(everything) > 3
    monkeypatch.setattr(fhir_api, "_MAX_COUNT", 3)
    resp = loaded.get("/fhir/Observation?_count=500")
    body = resp.get_json()
    assert resp.status_code == 200 and body["total"] == len(everything)
    matches = [e for e in body["entry"] if e["search"]["mode"] == "match"]
    said = [e for e in body["entry"] if e["search"]["mode"] == "outcome"]
    assert len(matches) == 3 and len(said) == 1
    issue = said[0]["resource"]["issue"][0]
    assert issue["severity"] == "information" and issue["expression"] == ["_count"]
    assert "500" in issue["diagnostics"] and "3 per page" in issue["diagnostics"]
    links = {link["relation"]: link["url"] for link in body["link"]}
    assert "_count=3" in links["self"] and "_count=3" in links["next"]
    path = tmp_path / "page.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    result = validate_fhir([path])
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {e["resource"]["id"] for e in matches}
    url = links["next"]
    while url:  # the next links hold the rest, each match once; asked as the server wrote them, nothing more is said
        page = loaded.get(url.replace("http://localhost", "")).get_json()
        assert all(e["search"]["mode"] == "match" for e in page.get("entry", []))
        ids = {e["resource"]["id"] for e in page.get("entry", [])}
        assert ids.isdisjoint(seen)
        seen |= ids
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), "")
    assert seen == everything
    history = loaded.get("/fhir/Observation/_history?_count=500").get_json()
    following = next(link["url"] for link in history["link"] if link["relation"] == "next")
    assert len(history["entry"]) == 3 and "_count=3" in following
    huge = loaded.get("/fhir/Observation?_count=99999999999999999999").get_json()
    assert len([e for e in huge["entry"] if e["search"]["mode"] == "match"]) == 3
    for wrong in ("-1", "x", "１２"):
        assert_outcome(loaded.get(f"/fhir/Observation?_count={wrong}"), 400)
        assert_outcome(loaded.get(f"/fhir/Observation/_history?_count={wrong}"), 400)


def test_summary_other_than_r4s_values_is_refused_naming_it(loaded) -> None:
    body = assert_outcome(loaded.get("/fhir/Observation?_summary=brief"), 400)
    assert body["issue"][0]["expression"] == ["_summary"]
    both = assert_outcome(loaded.get("/fhir/Observation?_summary=true&_elements=code"), 400)
    assert both["issue"][0]["expression"] == ["_elements"]


def test_summary_true_text_and_data_cut_the_resources_as_r4_says(loaded) -> None:
    """R4 search.html: _summary=true keeps the elements the base definition marks as summary, text the narrative,
    identity and required elements, data all but the narrative; each resource so cut is tagged SUBSETTED, and the
    page's links keep asking for it."""
    whole = {e["resource"]["id"]: e["resource"] for e in loaded.get("/fhir/Observation?_count=50").get_json()["entry"]}
    for shape in ("true", "text", "data"):
        page = loaded.get(f"/fhir/Observation?_count=50&_summary={shape}").get_json()
        assert page["total"] == len(whole) and all(f"_summary={shape}" in link["url"] for link in page["link"])
        for entry in page["entry"]:
            cut, full = entry["resource"], whole[entry["resource"]["id"]]
            assert "SUBSETTED" in [t["code"] for t in cut["meta"]["tag"]]
            assert cut["status"] == full["status"] and cut["code"] == full["code"]
            if shape == "true":
                assert "valueQuantity" in cut or "valueQuantity" not in full  # value[x] is a summary element
                assert "referenceRange" not in cut and "interpretation" not in cut and "category" not in cut
                assert cut["subject"] == full["subject"] and cut.get("issued") == full.get("issued")
            elif shape == "text":
                assert set(cut) <= {"resourceType", "id", "meta", "implicitRules", "text", "status", "code"}
            else:
                assert "text" not in cut and set(full) - set(cut) <= {"text"}
                assert cut.get("referenceRange") == full.get("referenceRange")


def test_summary_and_elements_cut_a_read_and_a_vread_too(loaded) -> None:
    """R4: _summary and _elements apply to read. They were ignored there: a client asking for less of a patient's
    data got the whole resource. Cut as a search cuts it, tagged SUBSETTED; what a read cannot be asked is 400."""
    obs = _alt(loaded)
    base = f"/fhir/Observation/{obs['id']}"
    for path in (base, f"{base}/_history/{obs['meta']['versionId']}"):
        whole = loaded.get(path).get_json()
        assert "SUBSETTED" not in [t["code"] for t in whole["meta"].get("tag", [])]
        cut = loaded.get(f"{path}?_elements=code").get_json()
        assert set(cut) == {"resourceType", "id", "meta", "code", "status"}  # (status: R4 requires it)
        assert "SUBSETTED" in [t["code"] for t in cut["meta"]["tag"]] and cut["code"] == whole["code"]
        summary = loaded.get(f"{path}?_summary=true").get_json()
        assert "referenceRange" not in summary and summary["valueQuantity"] == whole["valueQuantity"]
        assert "SUBSETTED" in [t["code"] for t in summary["meta"]["tag"]]
        assert loaded.get(f"{path}?_summary=false").get_json() == whole
        for bad, where in (("_summary=count", "_summary"), ("_summary=brief", "_summary"),
                           ("_summary=true&_elements=code", "_elements"), ("_elements=co-de", "_elements")):
            body = assert_outcome(loaded.get(f"{path}?{bad}"), 400)
            assert body["issue"][0]["expression"] == [where], bad


def test_a_doubled_slash_is_no_redirect_to_the_host_the_request_named(loaded) -> None:
    """``/fhir//Patient`` was answered 308 with an HTML body, redirected to the request's Host header
    (``evil.example``). Now a FHIR 404, and no Location."""
    answer = loaded.get("/fhir//Patient?name=x", headers={"Host": "evil.example"})
    body = assert_outcome(answer, 404)
    assert "Location" not in answer.headers and body["resourceType"] == "OperationOutcome"
    assert loaded.get("/fhir/Patient?name=x").status_code == 200


def test_lenient_handling_says_what_it_ignored_on_the_guide_and_the_audit_log_too(app, loaded, anon) -> None:
    """Prefer: handling=lenient on StructureDefinition and AuditEvent ignored an unknown parameter silently (the
    patient-data searches say it in an OperationOutcome entry, as the README promises of every search)."""
    from conftest import make_token

    lenient = {"Prefer": "handling=lenient"}
    auditor = {"Authorization": f"Bearer {make_token(app, 'inspector', ['auditor'])}", **lenient}
    for client, path, headers in ((loaded, "/fhir/StructureDefinition?bogus=1", lenient),
                                  (anon, "/fhir/AuditEvent?bogus=1&_count=1", auditor)):
        body = client.get(path, headers=headers).get_json()
        assert body["resourceType"] == "Bundle", body
        [said] = [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "outcome"]
        assert said["issue"][0]["expression"] == ["bogus"] and "ignored" in said["issue"][0]["diagnostics"], path
        strict = client.get(path, headers={k: v for k, v in headers.items() if k != "Prefer"})
        assert strict.status_code == 400, path


def test_audit_event_searchset_has_total(app, loaded, anon) -> None:
    from conftest import make_token

    auditor = make_token(app, "inspector", ["auditor"])
    body = anon.get("/fhir/AuditEvent?_count=2", headers={"Authorization": f"Bearer {auditor}"}).get_json()
    assert body["type"] == "searchset" and len(body["entry"]) == 2
    assert isinstance(body["total"], int) and body["total"] > 2


# ------------------------------------------------------------------ conditional read


def test_read_has_http_date_and_etag_and_answers_304(loaded) -> None:
    obs = _alt(loaded)
    resp = loaded.get(f"/fhir/Observation/{obs['id']}")
    assert resp.headers["ETag"] == 'W/"2"'
    modified = email.utils.parsedate_to_datetime(resp.headers["Last-Modified"])
    assert resp.headers["Last-Modified"].endswith(" GMT") and modified.tzinfo is not None
    path = f"/fhir/Observation/{obs['id']}"
    same = loaded.get(path, headers={"If-None-Match": 'W/"2"'})
    assert same.status_code == 304 and same.data == b"" and same.headers["ETag"] == 'W/"2"'
    assert loaded.get(path, headers={"If-None-Match": 'W/"1"'}).status_code == 200
    assert loaded.get(path, headers={"If-Modified-Since": resp.headers["Last-Modified"]}).status_code == 304
    earlier = email.utils.format_datetime(modified.replace(year=modified.year - 1), usegmt=True)
    assert loaded.get(path, headers={"If-Modified-Since": earlier}).status_code == 200
    assert loaded.get(path, headers={"If-Modified-Since": "yesterday"}).status_code == 200  # not a date: ignored
    # If-None-Match wins over If-Modified-Since (RFC 7232)
    assert loaded.get(path, headers={"If-None-Match": 'W/"1"',
                                     "If-Modified-Since": resp.headers["Last-Modified"]}).status_code == 200


# ------------------------------------------------------------------ vread and _history


def test_vread_serves_every_version(loaded) -> None:
    obs = _alt(loaded)
    first = loaded.get(f"/fhir/Observation/{obs['id']}/_history/1")
    assert first.status_code == 200 and first.headers["ETag"] == 'W/"1"'
    assert first.get_json()["valueQuantity"]["value"] == 36 and first.get_json()["meta"]["versionId"] == "1"
    second = loaded.get(f"/fhir/Observation/{obs['id']}/_history/2").get_json()
    assert second == obs
    assert_outcome(loaded.get(f"/fhir/Observation/{obs['id']}/_history/3"), 404)
    assert_outcome(loaded.get(f"/fhir/Observation/{obs['id']}/_history/x1"), 404)
    assert_outcome(loaded.get("/fhir/Observation/nope/_history/1"), 404)
    assert_outcome(loaded.get("/fhir/Medication/x/_history/1"), 404)


def test_instance_and_type_history_bundles(loaded, tmp_path) -> None:
    obs = _alt(loaded)
    inst = loaded.get(f"/fhir/Observation/{obs['id']}/_history").get_json()
    assert inst["type"] == "history" and inst["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in inst["entry"]] == ["2", "1"]
    assert inst["entry"][0]["request"] == {"method": "PUT", "url": f"Observation/{obs['id']}"}
    assert inst["entry"][1]["request"] == {"method": "POST", "url": "Observation"}
    assert inst["entry"][1]["response"]["status"] == "201 Created"
    assert inst["entry"][0]["response"]["etag"] == 'W/"2"'
    whole = loaded.get("/fhir/Observation/_history").get_json()
    current = loaded.get("/fhir/Observation?_count=0").get_json()["total"]
    assert whole["type"] == "history" and whole["total"] == current + 1
    paged = loaded.get("/fhir/Observation/_history?_count=2").get_json()
    assert len(paged["entry"]) == 2 and any(link["relation"] == "next" for link in paged["link"])
    # _since (R4 http.html#history): the versions made at or after an instant; a malformed one is refused by name
    assert loaded.get("/fhir/Observation/_history?_since=2024").get_json()["total"] == whole["total"]
    second = inst["entry"][0]["resource"]["meta"]["lastUpdated"]
    since = loaded.get("/fhir/Observation/_history", query_string={"_since": second}).get_json()
    assert 1 <= since["total"] <= whole["total"]  # (the fixture stores every version at one instant)
    assert all(e["resource"]["meta"]["lastUpdated"] >= second for e in since["entry"])
    assert obs["id"] in {e["resource"]["id"] for e in since["entry"]}
    assert "_since=" in since["link"][0]["url"]
    assert loaded.get("/fhir/Observation/_history?_since=2999-01-01T00:00:00Z").get_json()["total"] == 0
    for bad in ("tomorrow", "2024-05-20T10:00:00", "2024-13-01"):
        outcome = assert_outcome(loaded.get("/fhir/Observation/_history", query_string={"_since": bad}), 400)
        assert "_since" in json.dumps(outcome, ensure_ascii=False), outcome
    assert_outcome(loaded.get("/fhir/Observation/_history?_at=2024"), 400)
    for bad in ("<script>", "2026" * 20):  # a history link's cut-off edited: named, not run
        outcome = assert_outcome(loaded.get("/fhir/Observation/_history", query_string={"_page_until": bad}), 400)
        assert outcome["issue"][0]["expression"] == ["_page_until"]
    assert_outcome(loaded.get("/fhir/Observation/nope/_history"), 404)
    paths = []
    for name, bundle in (("instance", inst), ("type", whole)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(bundle), encoding="utf-8")
    result = validate_fhir(paths)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ Accept and _format


@pytest.mark.parametrize("accept", [None, "*/*", "application/fhir+json", "application/json",
                                    "application/fhir+json; fhirVersion=4.0", "text/html,application/*;q=0.8",
                                    "application/fhir+json; fhirVersion=3.0, application/fhir+json; fhirVersion=4.0",
                                    'application/fhir+json; fhirVersion="4.0.1"',
                                    "application/json; fhirVersion=4.0.0"])
def test_json_is_served_for_json_and_anything(loaded, accept) -> None:
    headers = {"Accept": accept} if accept else {}
    resp = loaded.get("/fhir/Patient", headers=headers)
    assert resp.status_code == 200 and resp.mimetype == "application/fhir+json"


@pytest.mark.parametrize("fmt", ["json", "application/json", "application/fhir+json"])
def test_format_json_is_served(loaded, fmt) -> None:
    assert loaded.get("/fhir/Patient", query_string={"_format": fmt}).status_code == 200


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/metadata", "/fhir/Observation/_history"])
@pytest.mark.parametrize("accept", ["application/fhir+xml", "application/xml", "text/html"])
def test_xml_and_html_are_not_acceptable(loaded, path, accept) -> None:
    body = assert_outcome(loaded.get(path, headers={"Accept": accept}), 406)
    assert "application/fhir+json" in body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir/metadata"])
@pytest.mark.parametrize("accept", ["application/fhir+json; fhirVersion=3.0", "application/json;fhirVersion=1.0",
                                    "application/fhir+json; fhirVersion=4.3",
                                    "application/fhir+json; fhirVersion=5.0, application/json; fhirVersion=3.0"])
def test_another_fhir_version_is_not_acceptable(loaded, path, accept) -> None:
    """FHIR R4 §3.1.0.6 (the version parameter): a client asking for STU3 or R5 content is told it is not served
    (406), not sent R4 it would misread."""
    body = assert_outcome(loaded.get(path, headers={"Accept": accept}), 406)
    assert "FHIR R4" in body["issue"][0]["diagnostics"]
    assert_outcome(loaded.get(path, query_string={"_format": "application/fhir+json;fhirVersion=3.0"}), 406)


@pytest.mark.parametrize("fmt", ["xml", "application/fhir+xml", "html", "text/html", "turtle"])
def test_format_other_than_json_is_not_acceptable(loaded, fmt) -> None:
    assert_outcome(loaded.get("/fhir/Patient", query_string={"_format": fmt}), 406)
    # _format wins over Accept
    ok = loaded.get("/fhir/Patient?_format=json", headers={"Accept": "application/fhir+xml"})
    assert ok.status_code == 200


# ------------------------------------------------------------------ gzip and CORS


def test_large_answers_are_gzipped_for_clients_that_accept_it(loaded) -> None:
    plain = loaded.get("/fhir/Observation")
    assert "Content-Encoding" not in plain.headers
    zipped = loaded.get("/fhir/Observation", headers={"Accept-Encoding": "gzip, deflate"})
    assert zipped.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in zipped.headers["Vary"]
    assert json.loads(gzip.decompress(zipped.data)) == plain.get_json()
    small = loaded.get("/fhir/Observation?_count=0", headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers  # under 1 KB: sent as it is
    for refused in ("gzip;q=0", "gzip; q=0.0, deflate", "identity, gzip;q=0, *;q=1"):  # RFC 9110 §12.5.3
        assert "Content-Encoding" not in loaded.get("/fhir/Observation", headers={"Accept-Encoding": refused}).headers
    for anything in ("*", "GZIP;q=0.5", "deflate;q=1, gzip;q=0.1"):
        assert loaded.get("/fhir/Observation", headers={"Accept-Encoding": anything}).headers["Content-Encoding"] \
            == "gzip"


def test_cors_is_off_by_default(loaded) -> None:
    resp = loaded.get("/fhir/metadata", headers={"Origin": "https://app.example.org"})
    assert "Access-Control-Allow-Origin" not in resp.headers


def test_cors_answers_the_configured_origins(settings, pipeline) -> None:
    from gateway.api.app import create_app

    app = create_app(replace(settings, cors_origins="https://app.example.org"), pipeline)
    client = app.test_client()
    ok = client.get("/fhir/metadata", headers={"Origin": "https://app.example.org"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    other = client.get("/fhir/metadata", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers
    pre = client.options("/fhir/Observation", headers={"Origin": "https://app.example.org",
                                                       "Access-Control-Request-Method": "GET",
                                                       "Access-Control-Request-Headers": "Authorization"})
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    assert client.get("/health", headers={"Origin": "https://app.example.org"}).headers.get(
        "Access-Control-Allow-Origin") is None  # the FHIR API only
    # the answer differs by Origin: a cache on the way must tell them apart (one origin configured: no Vary was sent)
    token = make_token(app, "web", ["submitter"])
    search = client.get("/fhir/Observation", headers={"Origin": "https://app.example.org",
                                                      "Authorization": f"Bearer {token}"})
    assert "Origin" in search.headers.get("Vary", ""), search.headers
    assert "PUT" not in pre.headers.get("Access-Control-Allow-Methods", "")  # (PUT, PATCH, DELETE answer 405)


def test_answers_about_patients_are_kept_by_no_cache(loaded) -> None:
    """Results, searches and histories carry patient data: no cache on the way nor the client keeps them."""
    for path in ("/fhir/Observation", "/fhir/DiagnosticReport?_count=1", "/fhir/Observation/_history"):
        assert loaded.get(path).headers.get("Cache-Control") == "no-store", path


# ------------------------------------------------------------------ POST _search


def test_post_search_gives_the_same_results_as_get(loaded) -> None:
    query = {"subject:Patient.identifier": "urn:oid:2.16.156.10011.1.3|511921196612120011", "_count": "1"}
    got = loaded.get("/fhir/DiagnosticReport", query_string=query).get_json()
    posted = loaded.post("/fhir/DiagnosticReport/_search", data=query)
    assert posted.status_code == 200
    assert posted.get_json() == got and got["total"] == 2
    assert loaded.post("/fhir/Observation/_search", data={"_summary": "count"}).get_json()["total"] == \
        loaded.get("/fhir/Observation?_summary=count").get_json()["total"]
    body = assert_outcome(loaded.post("/fhir/Observation/_search", data={"colour": "red"}), 400)
    assert body["issue"][0]["expression"] == ["colour"]
    body = assert_outcome(loaded.post("/fhir/Observation/_search", data=b'{"code": "x"}',
                                      content_type="application/json"), 415)
    assert body["issue"][0]["expression"] == ["Content-Type"]
    assert_outcome(loaded.post("/fhir/Medication/_search", data={"code": "x"}), 404)
    assert_outcome(loaded.post("/fhir/Observation/_search", data={"_format": "xml"}), 406)


def test_post_search_body_not_in_utf8_is_refused_not_read_as_no_criteria(loaded) -> None:
    """A GBK client's form body (a raw byte or a percent-encoded one that is not UTF-8): its parameters were dropped
    and the search answered every patient's reports. Now refused naming the body; a charset other than UTF-8
    declared is 415. A UTF-8 body with Chinese in it, raw or percent-encoded, is the same search as the URL's."""
    form = "application/x-www-form-urlencoded"
    everyone = loaded.get("/fhir/DiagnosticReport?_summary=count").get_json()["total"]
    assert everyone >= 2
    for body in ("patient.identifier=511921196612120011&code=血常规&_count=1".encode("gbk"), b"identifier=%CD%F5",
                 b"identifier=\xff"):
        answer = assert_outcome(loaded.post("/fhir/DiagnosticReport/_search", data=body, content_type=form), 400)
        assert answer["issue"][0]["expression"] == ["body"] and "UTF-8" in answer["issue"][0]["diagnostics"]
    answer = assert_outcome(loaded.post("/fhir/DiagnosticReport/_search", data=b"identifier=x",
                                        content_type=f"{form}; charset=gbk"), 415)
    assert answer["issue"][0]["expression"] == ["Content-Type"]
    query = "identifier=R2405200099&_count=1"
    got = loaded.get(f"/fhir/DiagnosticReport?{query}").get_json()
    for body in (query.encode(), f"{query}&".encode()):
        posted = loaded.post("/fhir/DiagnosticReport/_search", data=body, content_type=f"{form}; charset=UTF-8")
        assert posted.status_code == 200 and posted.get_json()["total"] == got["total"] < everyone
    named = loaded.get("/fhir/Patient", query_string={"name": "王建国"}).get_json()["total"]
    for body in ("name=王建国".encode(), b"name=%E7%8E%8B%E5%BB%BA%E5%9B%BD"):
        assert loaded.post("/fhir/Patient/_search", data=body, content_type=form).get_json()["total"] == named >= 1


def test_audit_event_summary_count_gives_the_total_only(app, loaded, anon) -> None:
    from conftest import make_token

    auth = {"Authorization": f"Bearer {make_token(app, 'inspector', ['auditor'])}"}
    full = anon.get("/fhir/AuditEvent?_count=200", headers=auth).get_json()
    assert full["total"] >= 1
    only = anon.get("/fhir/AuditEvent?_summary=count", headers=auth)
    assert only.status_code == 200
    body = only.get_json()
    assert body["type"] == "searchset" and "entry" not in body
    assert body["total"] >= full["total"]  # the first search was itself audited
    assert not [link for link in body.get("link", []) if link["relation"] == "next"]
    refused = anon.get("/fhir/AuditEvent?_summary=data", headers=auth)
    assert refused.status_code == 400 and "_summary" in refused.get_data(as_text=True)


def test_every_fhir_answer_says_it_is_utf_8(loaded, anon) -> None:
    """FHIR R4 http.html#mime-type: requests and responses SHALL set the character encoding to UTF-8 with the
    charset parameter (HTTP's default is ISO-8859-1: a client left to guess mangles 王 and 白细胞)."""
    answers = {
        "metadata": anon.get("/fhir/metadata"),
        "search": loaded.get("/fhir/Patient?_count=5"),
        "read": loaded.get(f"/fhir/Observation/{_alt(loaded)['id']}"),
        "history": loaded.get("/fhir/Observation/_history?_count=2"),
        "not found": loaded.get("/fhir/Observation/not-there"),
        "bad search": loaded.get("/fhir/Observation?date=tomorrow"),
        "no token": anon.get("/fhir/Observation"),
        "ingest outcome": loaded.post("/fhir", data=b"{}", content_type="application/fhir+json"),
    }
    for what, answer in answers.items():
        assert answer.headers["Content-Type"] == "application/fhir+json; charset=utf-8", (what, answer.headers)
        assert answer.mimetype == "application/fhir+json"


def test_total_is_taken_as_the_hint_r4_makes_it(loaded) -> None:
    """R4 search.html#total: ``_total`` is a hint a server may ignore; this one counts every searchset exactly."""
    exact = loaded.get("/fhir/Observation?_count=1").get_json()["total"]
    for wanted in ("accurate", "estimate", "none"):
        page = loaded.get(f"/fhir/Observation?_count=1&_total={wanted}")
        assert page.status_code == 200 and page.get_json()["total"] == exact
    outcome = assert_outcome(loaded.get("/fhir/Observation?_total=always"), 400)
    assert outcome["issue"][0]["expression"] == ["_total"]
    history = loaded.get("/fhir/Observation/_history?_count=1&_total=accurate")  # (histories take it alike)
    assert history.status_code == 200 and history.get_json()["type"] == "history"
    assert assert_outcome(loaded.get("/fhir/Observation/_history?_total=always"), 400)["issue"][0]["expression"] == [
        "_total"]


def test_a_method_a_resource_does_not_take_is_named_with_what_it_takes(loaded) -> None:
    """405 said 'The method is not allowed for the requested URL.' whatever was asked: now which method, on what,
    and the methods the resource takes (with Allow, RFC 9110)."""
    obs = _alt(loaded)
    for method in ("delete", "put", "patch"):
        answer = getattr(loaded, method)(f"/fhir/Observation/{obs['id']}")
        outcome = assert_outcome(answer, 405)
        text = outcome["issue"][0]["diagnostics"]
        assert text.startswith(f"{method.upper()} is not supported on /fhir/Observation/{obs['id']}; it takes GET")
        assert "GET" in answer.headers["Allow"]


def test_a_bearer_header_with_more_than_one_token_is_refused(app, anon) -> None:
    """RFC 6750 2.1: 'Bearer' and one token; a valid token followed by other text was taken."""
    from conftest import make_token

    token = make_token(app, "lis2", ["submitter"])
    assert anon.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    for header in (f"Bearer {token} extra", f"Bearer {token}\textra", "Bearer ", "Bearer"):
        answer = anon.get("/fhir/Patient", headers={"Authorization": header})
        assert answer.status_code == 401, header
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
