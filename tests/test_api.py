"""HTTP API: ingest answers, FHIR read/search, and one OperationOutcome shape for every error."""
from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from conftest import DATA

UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
MALFORMED = (DATA / "hl7v2" / "malformed.hl7").read_bytes()
GBK = (DATA / "hl7v2" / "lis-v24-gbk.hl7").read_bytes()


def assert_outcome(resp, status: int) -> dict:
    """Every error answers with the same OperationOutcome shape."""
    assert resp.status_code == status
    assert resp.mimetype == "application/fhir+json"
    body = resp.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"], "an OperationOutcome always has an issue"
    for issue in body["issue"]:
        assert set(issue) <= {"severity", "code", "diagnostics", "expression"}
        assert issue["severity"] in {"fatal", "error", "warning", "information"}
        assert isinstance(issue["diagnostics"], str) and "Traceback" not in issue["diagnostics"]
    return body


def test_ingest_answers_with_an_ack(client) -> None:
    resp = client.post("/ingest/hl7v2", data=UTF8)
    assert resp.status_code == 200 and resp.headers["X-Ack-Code"] == "AA"
    assert resp.mimetype == "x-application/hl7-v2+er7"
    assert b"MSA|AA|TJ2405200099" in resp.data
    assert b"ERR||OBX^3^3|103^Table value not found^HL70357|W" in resp.data  # unmapped code: warning only


def test_ingest_refusals_map_to_http_status(client) -> None:
    bad = client.post("/ingest/hl7v2", data=b"MSH" + MALFORMED.split(b"MSH")[1])
    assert bad.status_code == 422 and bad.headers["X-Ack-Code"] == "AE"
    adt = b"MSH" + MALFORMED.split(b"MSH")[4]
    rejected = client.post("/ingest/hl7v2", data=adt)
    assert rejected.status_code == 400 and b"MSA|AR|ADT0045" in rejected.data


def test_ingest_can_answer_with_an_operation_outcome(client) -> None:
    resp = client.post("/ingest/hl7v2", data=MALFORMED, headers={"Accept": "application/fhir+json"})
    body = assert_outcome(resp, 400)  # the worst answer (AR) sets the status
    texts = [i["diagnostics"] for i in body["issue"]]
    assert "MSH-10 ORU0042: OBX[3]-5 'abc' is not a number for value type NM" in texts
    assert any(t.startswith("MSH-10 ORU0043: stored (Bundle/") for t in texts)
    assert {"OBX[3]-5"} <= {e for i in body["issue"] for e in i.get("expression", [])}


def test_ingest_gbk_answers_in_gbk(client) -> None:
    resp = client.post("/ingest/hl7v2", data=GBK)
    assert resp.status_code == 200
    assert b"MSA|AA|LIS20240402000731" in resp.data


def test_an_ack_to_a_sender_declaring_ascii_or_latin1_is_written_in_that_character_set(client) -> None:
    """An analyser declaring ASCII (or 8859/1) whose message draws a reason in Chinese (no 身份证号): the ACK said
    ASCII in MSH-18 and carried UTF-8 bytes (a strict parser refuses it; a Latin-1 LIS shows nonsense). Now every
    byte is one of the named set; what it cannot write is '?'."""
    for charset, codec in (("ASCII", "ascii"), ("8859/1", "latin-1")):
        message = ("MSH|^~\\&|ANALYSER|TJXRMYY|GATEWAY|CYHR|20240520161245+0800||ORU^R01^ORU_R01|ASC" + codec[:3]
                   + f"|P|2.5.1||||||{charset}\r"
                   "PID|1||Z0099812^^^TJXRMYY^MR||WANG^JIANGUO||19661212|M\r"
                   "OBR|1|O1|RASC1|BLRT^BLOOD^L|||20240520073000+0800|||||||||||||||20240520161000+0800|||F\r"
                   "OBX|1|NM|WBC^WBC^L||6.8|10*9/L|3.5-9.5|N|||F\r").encode(codec)
        resp = client.post("/ingest/hl7v2", data=message)
        assert resp.status_code == 200, resp.data
        ack = resp.data
        ack.decode(codec)  # (every byte of the set it names)
        assert f"||||||{charset}\r".encode() in ack and b"MSA|AA|ASC" in ack
        assert any(b >= 0x80 for b in "身份证号".encode("utf-8")) and "身份证号".encode("utf-8") not in ack
        assert b"ERR|" in ack and b"?" in ack  # (the reason naming the missing 身份证号, its Chinese as '?')


def test_a_copy_sent_while_its_first_copy_is_worked_is_asked_to_come_again_not_refused(app, client) -> None:
    """Two requests with one CDA document at once: the second was answered 422 (AE, 'being processed now; retry
    later') — a status a client takes as final. Now 503 with Retry-After, as for a pushed Bundle."""
    from gateway.adapters.base import RawUnit
    from gateway.store.db import transaction

    document = (DATA / "cda" / "lab-report-full.xml").read_bytes()
    pipeline = app.extensions["gateway.pipeline"]
    with transaction(pipeline.store.db):  # a first copy being worked by a live process (this one)
        pipeline._insert_raw(pipeline.channel("cda"), RawUnit(document, 1, "lis"), "http")
    resp = client.post("/ingest/cda", data=document, content_type="application/xml")
    assert resp.status_code == 503 and resp.headers.get("Retry-After") == "5", resp.data
    assert resp.headers["X-Ack-Code"] == "AE" and "is being processed now" in resp.get_data(as_text=True)
    # a document refused for good is still a 422
    bad = client.post("/ingest/cda", data=document.replace(b"<name>", b"<name> </name><x>", 1),
                      content_type="application/xml")
    assert bad.status_code in (400, 422) and "Retry-After" not in bad.headers


def test_ingest_errors_are_operation_outcomes(client) -> None:
    empty = assert_outcome(client.post("/ingest/hl7v2", data=b"   "), 400)  # nothing to read: not a 422
    assert empty["issue"][0]["code"] == "required" and empty["issue"][0]["expression"] == ["body"]
    assert empty["issue"][0]["diagnostics"].startswith("body is empty: send the message")
    body = assert_outcome(client.post("/ingest/nonsense", data=b"x"), 415)
    assert "format 'nonsense' is not supported" in body["issue"][0]["diagnostics"]
    assert_outcome(client.get("/ingest/hl7v2"), 405)


def test_request_size_limit(app, client) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 1000
    assert_outcome(client.post("/ingest/hl7v2", data=b"M" * 5000), 413)


def test_capability_statement(client) -> None:
    cap = client.get("/fhir/metadata").get_json()
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    types = {r["type"]: r for r in cap["rest"][0]["resource"]}
    assert {"DiagnosticReport", "Observation", "Patient"} <= set(types)
    assert "patient.identifier" in {p["name"] for p in types["DiagnosticReport"]["searchParam"]}


def test_read_and_search_over_http(client) -> None:
    client.post("/ingest/hl7v2", data=UTF8)
    found = client.get("/fhir/DiagnosticReport", query_string={
        "subject:Patient.identifier": "urn:oid:2.16.156.10011.1.3|511921196612120011"}).get_json()
    assert found["type"] == "searchset" and found["total"] == 2
    report = found["entry"][0]["resource"]
    assert found["entry"][0]["fullUrl"].endswith(f"/fhir/DiagnosticReport/{report['id']}")
    resp = client.get(f"/fhir/DiagnosticReport/{report['id']}")
    assert resp.status_code == 200 and resp.headers["ETag"] == 'W/"1"'
    assert resp.get_json() == report
    obs = client.get(f"/fhir/{report['result'][0]['reference']}").get_json()
    assert obs["resourceType"] == "Observation"


def test_search_paging_with_next_links(client) -> None:
    client.post("/ingest/hl7v2", data=UTF8)
    first = client.get("/fhir/Observation?code=http://loinc.org|&_count=3").get_json()
    assert first["total"] == 4 and len(first["entry"]) == 3
    nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
    second = client.get(nxt.replace("http://localhost", "")).get_json()
    assert len(second["entry"]) == 1
    assert {e["resource"]["id"] for e in first["entry"]}.isdisjoint({e["resource"]["id"] for e in second["entry"]})
    assert not any(link["relation"] == "next" for link in second["link"])


@pytest.mark.parametrize("query, location", [
    ("Patient?name:missing=true", "name:missing"), ("Observation?_summary=brief", "_summary"),
    ("Observation?_summary=true&_elements=code", "_elements"), ("Observation?_sort=code", "_sort"),
    ("DiagnosticReport?_include=Patient:foo", "_include"), ("Observation?colour=red", "colour"),
    ("Observation?code:text=x", "code:text")])
def test_lenient_handling_ignores_what_is_not_supported_and_says_so(client, query: str, location: str) -> None:
    """R4 search.html: with Prefer: handling=lenient what the server does not support is ignored. Some of it was
    still refused (400) and the rest ignored silently: now each is ignored, and named in an OperationOutcome entry
    of the page; without lenient handling each is refused naming it."""
    refused = client.get(f"/fhir/{query}")
    assert refused.status_code == 400 and refused.get_json()["issue"][0]["expression"] == [location]
    page = client.get(f"/fhir/{query}", headers={"Prefer": "handling=lenient"})
    assert page.status_code == 200, page.get_data(as_text=True)
    body = page.get_json()
    assert body["type"] == "searchset"
    [said] = [e["resource"] for e in body.get("entry", []) if e.get("search", {}).get("mode") == "outcome"]
    assert [(i["severity"], i["expression"]) for i in said["issue"]] == [("warning", [location])]
    assert "ignored (Prefer: handling=lenient)" in said["issue"][0]["diagnostics"]


def test_search_and_read_errors_are_operation_outcomes(client) -> None:
    body = assert_outcome(client.get("/fhir/Observation?colour=red"), 400)
    assert body["issue"][0]["expression"] == ["colour"]
    ok = client.get("/fhir/Observation?colour=red", headers={"Prefer": "handling=lenient"})
    assert ok.status_code == 200
    assert_outcome(client.get("/fhir/Observation?date=2024-13-01"), 400)
    assert_outcome(client.get("/fhir/Observation?_count=x"), 400)
    assert_outcome(client.get("/fhir/Observation/does-not-exist"), 404)
    assert_outcome(client.get("/fhir/Medication/1"), 404)
    assert_outcome(client.get("/fhir/Observation?_format=xml"), 406)
    assert_outcome(client.get("/nowhere"), 404)


def test_unexpected_errors_never_show_a_stack_trace(app, client, monkeypatch) -> None:
    from gateway.store.store import Store

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail 511921198001011237")

    monkeypatch.setattr(Store, "read", broken)
    body = assert_outcome(client.get("/fhir/Observation/x"), 500)
    assert "511921" not in json.dumps(body) and "secret" not in json.dumps(body)


def test_health(client) -> None:
    client.post("/ingest/hl7v2", data=UTF8)
    body = client.get("/health").get_json()
    assert body["status"] == "ok" and body["messages"] == {"stored": 1}


@pytest.mark.parametrize("path", ["/fhir/metadata", "/health"])
def test_json_endpoints_answer_utf8(client, path: str) -> None:
    assert client.get(path).status_code == 200


def test_results_and_ingest_need_an_api_token(anon, client, app) -> None:
    body = assert_outcome(anon.post("/ingest/hl7v2", data=UTF8), 401)
    assert "authentication required" in body["issue"][0]["diagnostics"]
    assert_outcome(anon.get("/fhir/Observation"), 401)
    assert_outcome(anon.get("/fhir/Observation", headers={"Authorization": "Bearer gw_nonsense"}), 401)
    from conftest import make_token

    auditor = make_token(app, "inspector", ["auditor"])
    body = assert_outcome(anon.get("/fhir/Observation", headers={"Authorization": f"Bearer {auditor}"}), 403)
    assert "needs the role" in body["issue"][0]["diagnostics"]
    # conformance and health stay open
    assert anon.get("/fhir/metadata").status_code == 200
    assert anon.get("/health").status_code == 200


def test_every_read_of_patient_results_is_audited(client, app) -> None:
    from gateway.audit.log import entries
    from gateway.audit.render import patient_key

    client.post("/ingest/hl7v2", data=UTF8)
    pipe = app.extensions["gateway.pipeline"]
    before = len(list(entries(pipe.store.db)))
    found = client.get("/fhir/Observation?code=http://loinc.org|").get_json()
    client.get(f"/fhir/Observation/{found['entry'][0]['resource']['id']}")
    reads = [e for e in entries(pipe.store.db)][before:]
    kinds = [e.kind for e in reads]
    assert kinds == ["read", "read"]  # one patient in the search, then one read
    # the entry names the patient by the 身份证号 (an auditor searching by it finds the read); the index keeps it
    # hashed only
    assert reads[0].content["facts"]["patient"]["value"] == "511921196612120011"
    index = {k: v for k, v in reads[0].content.items() if k != "facts"}
    assert "511921196612120011" not in json.dumps(index, ensure_ascii=False)
    assert patient_key("511921196612120011") in json.dumps(index)


def _reads_after_a_message(client, app) -> Callable[[], list[dict]]:
    """A message stored, then a function giving the facts of the read entries the audit log gained since its last
    call."""
    from gateway.audit.log import entries

    client.post("/ingest/hl7v2", data=UTF8)
    pipe = app.extensions["gateway.pipeline"]
    before = len(list(entries(pipe.store.db)))

    def new_reads() -> list[dict]:
        nonlocal before
        made = list(entries(pipe.store.db))[before:]
        before += len(made)
        return [e.content["facts"] for e in made if e.kind == "read"]
    return new_reads


def test_a_search_that_finds_nothing_leaves_a_trail_naming_the_patient_asked_for(client, app) -> None:
    """Someone probing whether a patient's results are held here (a search by 身份证号, by Patient reference, or of
    Patient by identifier) is recorded even when nothing is found: one read entry per patient asked about, without
    resources, found by ``patient:identifier``; a search that names no patient, or names one only to exclude it,
    leaves none."""
    new_reads = _reads_after_a_message(client, app)

    absent = "110105194912310021"
    for path, query in (("Observation", {"patient.identifier": f"urn:oid:2.16.156.10011.1.3|{absent}"}),
                        ("DiagnosticReport", {"subject:identifier": absent}),
                        ("Patient", {"identifier": f"urn:oid:2.16.156.10011.1.3|{absent.lower()}"})):
        got = client.get(f"/fhir/{path}", query_string=query)
        assert got.status_code == 200 and got.get_json()["total"] == 0
        reads = new_reads()
        assert len(reads) == 1 and not reads[0].get("resources"), reads
        assert reads[0]["patient"]["value"] == absent, reads
        assert absent in reads[0]["query"]
    got = client.get("/fhir/Observation", query_string={"subject": "Patient/no-such-patient,Patient/nor-this"})
    assert got.get_json()["total"] == 0
    assert sorted(r["patient"]["reference"] for r in new_reads()) == ["Patient/no-such-patient",
                                                                      "Patient/nor-this"]
    # a 身份证号 asked without its system, with a lowercase x, twice in one search: one entry, named as the
    # entries of its results would name it (found by the auditor with or without the system, x or X)
    lower = "51010419900202106x"
    got = client.get("/fhir/Observation", query_string={"patient.identifier": f"{lower},{lower.upper()}"})
    assert got.get_json()["total"] == 0
    reads = new_reads()
    assert [(r["patient"]["system"], r["patient"]["value"]) for r in reads] == [
        ("urn:oid:2.16.156.10011.1.3", lower.upper())], reads
    # a patient held here, named by reference in a search that finds nothing, is named by the 身份证号 too
    patient_id = client.get("/fhir/Patient").get_json()["entry"][0]["resource"]["id"]
    new_reads()  # (that search's own entry)
    got = client.get("/fhir/Observation", query_string={"patient": f"Patient/{patient_id}",
                                                        "code": "http://loinc.org|0000-0"})
    assert got.get_json()["total"] == 0
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"] == {"reference": f"Patient/{patient_id}",
                                                       "system": "urn:oid:2.16.156.10011.1.3",
                                                       "value": "511921196612120011"}, reads
    from conftest import make_token

    auditor = {"Authorization": f"Bearer {make_token(app, 'inspector', ['auditor'])}"}
    found = client.get("/fhir/AuditEvent", query_string={"patient:identifier": absent}, headers=auditor).get_json()
    assert found.get("total") == 3, found  # the auditor's question, answered
    for value in (lower, f"urn:oid:2.16.156.10011.1.3|{lower.upper()}"):
        found = client.get("/fhir/AuditEvent", query_string={"patient:identifier": value},
                           headers=auditor).get_json()
        assert found.get("total") == 1, (value, found)
    new_reads()  # (the auditor's searches are audited in turn: set aside)
    for query in ({"code": "http://loinc.org|no-such-code"}, {"patient.identifier": "urn:x-no-such-system|"},
                  {"patient.identifier": f"urn:oid:2.16.156.10011.1.3|{absent}", "_summary": "count"}):
        assert client.get("/fhir/Observation", query_string=query).get_json()["total"] == 0
        reads = new_reads()
        assert len(reads) == ("_summary" in query), (query, reads)  # a count by patient says whether it is held


def test_capability_statement_passes_outside_validators(client, tmp_path) -> None:
    import subprocess

    from conftest import validator_path

    path = tmp_path / "cap.json"
    path.write_text(json.dumps(client.get("/fhir/metadata").get_json()), encoding="utf-8")
    # The schema engine carries the R4 4.0.0 JSON schema and refuses fhirVersion "4.0.1" (R4's technical
    # correction, which we declare as ARCHITECTURE.md requires); the two other engines check everything else.
    result = subprocess.run([str(validator_path()), "--quiet", "--engine", "medplum,fhirjs", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_read_of_a_patient_not_held_here_leaves_a_trail(client, app) -> None:
    """GET of a Patient this gateway does not hold (404, and its vread) is recorded as an empty search by ``_id``
    is: a read entry naming the patient asked about, without resources, that the auditor finds by that patient; a
    404 of a result names no patient and leaves none; a held Patient's read names it as before."""
    from conftest import make_token

    new_reads = _reads_after_a_message(client, app)

    assert client.get("/fhir/Patient/no-such-patient").status_code == 404
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"] == {"reference": "Patient/no-such-patient"}, reads
    assert not reads[0].get("resources"), reads
    assert client.get("/fhir/Patient/nor-this/_history/1").status_code == 404
    assert [r["patient"] for r in new_reads()] == [{"reference": "Patient/nor-this"}]
    assert client.get("/fhir/Observation/no-such-result").status_code == 404
    assert new_reads() == []
    assert client.get("/fhir/Patient/bad$id").status_code == 404  # (not a FHIR id: names nobody)
    assert new_reads() == []
    patient_id = client.get("/fhir/Patient").get_json()["entry"][0]["resource"]["id"]
    new_reads()
    assert client.get(f"/fhir/Patient/{patient_id}").status_code == 200
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"]["value"] == "511921196612120011", reads
    auditor = {"Authorization": f"Bearer {make_token(app, 'inspector', ['auditor'])}"}
    found = client.get("/fhir/AuditEvent", query_string={"patient": "Patient/no-such-patient"},
                       headers=auditor).get_json()
    assert found.get("total") == 1, found


def test_tasks_of_a_gateway_that_takes_no_exchange_are_none_not_an_error(client) -> None:
    """A gateway without a registry snapshot has made and received no referral: GET /fhir/Task answered 500 ("this
    gateway takes no exchange"); it finds none, and a Task read is not found."""
    assert client.application.extensions.get("gateway.exchange") is None
    found = client.get("/fhir/Task?status=requested")
    assert found.status_code == 200 and found.get_json()["total"] == 0 and "entry" not in found.get_json()
    assert_outcome(client.get("/fhir/Task/some-referral"), 404)
