"""FHIR-native submission: a report Bundle is checked against our profiles before anything is stored."""
from __future__ import annotations

import copy
import os
import json

import pytest

from conftest import DATA

GOLDEN = json.loads((DATA / "expected" / "lis-v24-gbk.1.json").read_text(encoding="utf-8"))


def as_transaction(bundle: dict) -> dict:
    b = copy.deepcopy(bundle)
    b["type"] = "transaction"
    for e in b["entry"]:
        e["request"] = {"method": "PUT", "url": f"{e['resource']['resourceType']}/{e['resource']['id']}"}
    return b


@pytest.mark.parametrize("path", ["/fhir", "/fhir/Bundle"])
def test_valid_bundle_is_stored_and_answered_with_a_transaction_response(client, path) -> None:
    resp = client.post(path, data=json.dumps(as_transaction(GOLDEN)), content_type="application/fhir+json")
    assert resp.status_code == (201 if path.endswith("/Bundle") else 200), resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["type"] == "transaction-response"
    assert len(body["entry"]) == len(GOLDEN["entry"])
    found = client.get("/fhir/DiagnosticReport?patient.identifier=500102197506152342").get_json()
    assert found["total"] == 1


def test_a_bundle_breaking_our_profiles_stores_nothing(client, app) -> None:
    bad = as_transaction(GOLDEN)
    obs = next(e["resource"] for e in bad["entry"] if e["resource"]["resourceType"] == "Observation")
    del obs["status"]
    patient = next(e["resource"] for e in bad["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["identifier"][0]["value"] = "500102197506152341"  # wrong GB 11643 check digit
    resp = client.post("/fhir", data=json.dumps(bad), content_type="application/fhir+json")
    assert resp.status_code == 422
    issues = resp.get_json()["issue"]
    where = {e for i in issues if i["severity"] == "error" for e in i.get("expression", [])}
    # every problem at once, each at its FHIRPath: the Patient is entry 1, the first Observation entry 3
    assert where == {"Bundle.entry[1].resource.identifier[0]", "Bundle.entry[3].resource.status"}
    assert client.get("/fhir/Observation").get_json()["total"] == 0
    pipe = app.extensions["gateway.pipeline"]
    assert pipe.store.counts() == {"refused": 1}  # the raw submission is kept, nothing else


@pytest.mark.parametrize("body, status, text", [
    (b"{not json", 400, "not strict JSON"),
    (b'{"resourceType":"Bundle","type":"collection","entry":[],"entry":[]}', 400, "duplicate"),
    (b'{"resourceType":"Patient","id":"x"}', 400, "submit a report Bundle"),
    (b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"resourceType":"Patient","id":"p"}}]}', 400,
     "Bundle.type 'searchset' is not accepted"),
    (b'{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient"}}]}', 422,
     "needs an id"),
])
def test_malformed_submissions_are_operation_outcomes(client, body, status, text) -> None:
    resp = client.post("/fhir", data=body, content_type="application/fhir+json")
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert text in json.dumps(resp.get_json(), ensure_ascii=False)


def test_submission_needs_a_submitter_token(anon) -> None:
    assert anon.post("/fhir", data=json.dumps(GOLDEN)).status_code == 401


def test_a_bundle_resent_under_its_identifier_is_told_apart_by_its_content(client) -> None:
    """The same Bundle.identifier: the same content (pretty-printed, a new meta) is a duplicate answered with the
    first outcome; other content is refused as a conflict (409) saying how a correction is sent — it was answered
    with the first copy's 201 while it was dropped; a Bundle refused before may be fixed and sent again (it was
    refused again for what it no longer held)."""
    first = as_transaction(GOLDEN)
    stored = client.post("/fhir", data=json.dumps(first), content_type="application/fhir+json")
    assert stored.status_code == 200
    again = dict(first, meta={**first.get("meta", {}), "lastUpdated": "2026-12-01T10:00:00+08:00"})
    same = client.post("/fhir", data=json.dumps(again, indent=2), content_type="application/fhir+json")
    assert same.status_code == 200 and same.get_json() == stored.get_json()  # the first outcome
    changed = copy.deepcopy(first)
    obs = next(e["resource"] for e in changed["entry"] if e["resource"]["resourceType"] == "Observation")
    obs["status"], obs["valueQuantity"]["value"] = "corrected", 9.9
    refused = client.post("/fhir", data=json.dumps(changed), content_type="application/fhir+json")
    assert refused.status_code == 409, refused.get_data(as_text=True)
    text = refused.get_json()["issue"][0]["diagnostics"]
    assert "was accepted on" in text and "with other content" in text and "a new Bundle with an identifier" in text
    assert client.get(f"/fhir/Observation/{obs['id']}/_history").get_json()["total"] == 1  # nothing stored

    other = copy.deepcopy(GOLDEN)
    other["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0d7c8b22-8a1e-4d7e-9a55-1c8f0d1f2e3a"}
    bad = copy.deepcopy(other)
    next(e["resource"] for e in bad["entry"] if e["resource"]["resourceType"] == "Observation")["status"] = "bogus"
    assert client.post("/fhir", data=json.dumps(bad), content_type="application/fhir+json").status_code == 422
    fixed = client.post("/fhir", data=json.dumps(other), content_type="application/fhir+json")
    assert fixed.status_code == 200, fixed.get_data(as_text=True)


def test_the_transaction_response_says_what_each_entry_became(client, tmp_path) -> None:
    """R4 transaction-response: each entry's status (201 Created for a resource new here, 200 OK for a new version
    or for the same content again), the version's location, ETag and time; as the server then serves them."""
    from conftest import validate_fhir

    first = as_transaction(GOLDEN)
    resp = client.post("/fhir", data=json.dumps(first), content_type="application/fhir+json")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    answered = resp.get_json()["entry"]
    assert [e["response"]["status"] for e in answered] == ["201 Created"] * len(first["entry"])
    for sent, got in zip(first["entry"], answered):
        rtype, rid = sent["resource"]["resourceType"], sent["resource"]["id"]
        assert got["response"]["location"] == f"{rtype}/{rid}/_history/1" and got["response"]["etag"] == 'W/"1"'
        served = client.get(f"/fhir/{rtype}/{rid}")
        assert served.headers["ETag"] == 'W/"1"'
        assert served.get_json()["meta"]["lastUpdated"] == got["response"]["lastModified"]
    path = tmp_path / "response.json"
    path.write_text(resp.get_data(as_text=True), encoding="utf-8")
    result = validate_fhir([path])
    assert result.returncode == 0, result.stdout + result.stderr

    # the same report corrected, in a new Bundle: the changed result is a new version, the rest stay as they were
    changed = copy.deepcopy(first)
    changed["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:3f1c6a52-2b1e-4f0e-8a77-5c2d9e4b7a10"}
    n, obs = next((n, e["resource"]) for n, e in enumerate(changed["entry"])
                  if e["resource"]["resourceType"] == "Observation")
    obs["status"], obs["valueQuantity"]["value"] = "corrected", 9.9
    again = client.post("/fhir", data=json.dumps(changed), content_type="application/fhir+json")
    assert again.status_code == 200, again.get_data(as_text=True)
    entries = again.get_json()["entry"]
    assert entries[n]["response"]["status"] == "200 OK"
    assert entries[n]["response"]["location"] == f"Observation/{obs['id']}/_history/2"
    assert client.get(f"/fhir/Observation/{obs['id']}").headers["ETag"] == 'W/"2"'
    unchanged = [e["response"] for m, e in enumerate(entries) if m != n]
    assert {(r["status"], r["etag"]) for r in unchanged} == {("200 OK", 'W/"1"')}
    assert [r["lastModified"] for r in unchanged] == [e["response"]["lastModified"]
                                                      for m, e in enumerate(answered) if m != n]
    # a resend of that Bundle is answered with the answer kept
    resent = client.post("/fhir", data=json.dumps(changed), content_type="application/fhir+json")
    assert resent.status_code == 200 and resent.get_json() == again.get_json()


def test_a_transaction_response_that_cannot_be_made_leaves_the_plain_one(client, app, monkeypatch, caplog) -> None:
    """Storing does not hang on the answer: when the answer cannot be made from what was stored, the one made before
    (every entry 201 Created at its resource) is given and kept, and the log says so without patient data."""
    pipe = app.extensions["gateway.pipeline"]

    def broken(msg, written):
        raise KeyError("500102197506152342")

    monkeypatch.setattr(pipe.channel("fhir"), "answer_stored", broken)
    resp = client.post("/fhir", data=json.dumps(as_transaction(GOLDEN)), content_type="application/fhir+json")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert {e["response"]["status"] for e in resp.get_json()["entry"]} == {"201 Created"}
    assert client.get("/fhir/DiagnosticReport?patient.identifier=500102197506152342").get_json()["total"] == 1
    said = [r for r in caplog.records if "could not be made from what was stored" in r.getMessage()]
    assert len(said) == 1 and "500102197506152342" not in said[0].getMessage()


@pytest.mark.parametrize("change, where, text", [
    (lambda r: r.update(url="Patient/someone-else"), "request.url", "names another resource than the entry's"),
    (lambda r: r.update(ifMatch='W/"99"'), "request.ifMatch", "conditional ifMatch is not evaluated"),
    (lambda r: r.update(ifNoneExist="identifier=x|1"), "request.ifNoneExist", "conditional ifNoneExist"),
])
def test_a_transaction_entry_asking_what_is_not_done_is_refused_not_ignored(client, change, where, text) -> None:
    """R4: a PUT's URL names the resource it stores; conditions are evaluated or refused. They were ignored."""
    bundle = as_transaction(GOLDEN)
    change(bundle["entry"][1]["request"])
    answer = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json")
    assert answer.status_code in (400, 422), answer.get_data(as_text=True)
    [issue] = [i for i in answer.get_json()["issue"] if i["severity"] == "error"]
    assert issue["expression"] == [f"Bundle.entry[1].{where}"] and text in issue["diagnostics"]
    assert client.get("/fhir/Observation").get_json()["total"] == 0
    fine = as_transaction(GOLDEN)
    fine["entry"][1]["request"]["url"] = "http://localhost/fhir/" + fine["entry"][1]["request"]["url"]
    assert client.post("/fhir", data=json.dumps(fine), content_type="application/fhir+json").status_code == 200


@pytest.mark.parametrize("content_type", ["application/fhir+xml", "application/xml", "text/plain",
                                          "application/x-www-form-urlencoded"])
def test_a_submission_in_another_media_type_is_refused_as_such(client, content_type: str) -> None:
    """415 naming the type (FHIR JSON sent as XML was stored; XML was 'not strict JSON'; a form 'empty')."""
    answer = client.post("/fhir", data=json.dumps(as_transaction(GOLDEN)), content_type=content_type)
    assert answer.status_code == 415
    assert f"Content-Type {content_type} is not taken here" in answer.get_json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Observation").get_json()["total"] == 0
    for fine in ("application/json", "application/fhir+json; charset=utf-8", "application/json+fhir"):
        assert client.post("/fhir", data=json.dumps(as_transaction(GOLDEN)),
                           content_type=fine).status_code in (200, 201)


def test_an_empty_submission_is_a_bad_request_naming_the_body(client) -> None:
    answer = client.post("/fhir", data=b" \n", content_type="application/fhir+json")
    assert answer.status_code == 400
    issue = answer.get_json()["issue"][0]
    assert issue["code"] == "required" and issue["expression"] == ["body"]
    assert issue["diagnostics"] == "body is empty: send the Bundle as the body"


def test_a_submission_of_another_fhir_version_is_refused_as_such(client) -> None:
    """A Bundle sent as ``application/fhir+json; fhirVersion=3.0`` (STU3) is not read as R4: 415 saying so."""
    answer = client.post("/fhir", data=json.dumps(as_transaction(GOLDEN)),
                         content_type="application/fhir+json; fhirVersion=3.0")
    assert answer.status_code == 415
    assert "names another FHIR version" in answer.get_json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Observation").get_json()["total"] == 0
    assert client.post("/fhir", data=json.dumps(as_transaction(GOLDEN)),
                       content_type="application/fhir+json; fhirVersion=4.0").status_code == 200


def test_an_identifier_holding_a_hash_is_its_own_and_a_resend_being_worked_is_answered_503(client, app) -> None:
    """A '#' in Bundle.identifier no longer reads as the n-th request of another identifier (resends are kept as
    key, key#2 ...); a resend while the first copy is being worked is a passing state: 503 with Retry-After."""
    from gateway.store import store as store_module

    base = "urn:uuid:0d7c8b22-8a1e-4d7e-9a55-1c8f0d1f2e3a"
    first = as_transaction(GOLDEN)
    first["identifier"] = {"system": "urn:ietf:rfc:3986", "value": base + "#2"}
    assert client.post("/fhir", data=json.dumps(first), content_type="application/fhir+json").status_code == 200
    second = copy.deepcopy(first)
    second["identifier"]["value"] = base
    next(e["resource"] for e in second["entry"] if e["resource"]["resourceType"] == "Observation")["status"] = \
        "corrected"
    assert client.post("/fhir", data=json.dumps(second), content_type="application/fhir+json").status_code == 200
    pipe = app.extensions["gateway.pipeline"]
    record = pipe.store.list_messages(None, 1)[0].id
    pipe.store.db.execute("UPDATE messages SET status = 'received', ack = NULL, lease_owner = ?, lease_until = ?"
                          " WHERE id = ?", [f"{store_module._HOST}:{os.getpid()}:1", pipe.store._epoch() + 300,
                                            record])
    busy = client.post("/fhir", data=json.dumps(second, indent=1), content_type="application/fhir+json")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5", busy.get_data(as_text=True)


def _another_patients(bundle: dict, value: str = "urn:uuid:8e0b7d4c-1f7a-4c55-9d3e-2b6f0a9c1e77") -> dict:
    """``bundle`` as another patient's report Bundle: new Bundle identifier, a Patient of its own (id and 身份证号)
    and its entries' own ids, as a member system makes the next report."""
    import uuid

    from gateway.identifiers import id_card_check_char

    other = copy.deepcopy(bundle)
    other["identifier"] = {"system": "urn:ietf:rfc:3986", "value": value}
    renamed = {e["resource"]["id"]: str(uuid.uuid4()) for e in other["entry"]}
    text = json.dumps(other)
    for old, new in renamed.items():
        text = text.replace(old, new)
    other = json.loads(text)
    patient = next(e["resource"] for e in other["entry"] if e["resource"]["resourceType"] == "Patient")
    body = "51010719900101019"
    patient["identifier"][0]["value"] = body + id_card_check_char(body)
    return other


def _entry(bundle: dict, rtype: str, nth: int = 0) -> tuple[int, dict]:
    return [(n, e) for n, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == rtype][nth]


@pytest.mark.parametrize("rtype", ["Observation", "Patient", "DiagnosticReport"])
def test_a_bundle_naming_another_patients_stored_resource_by_its_id_is_refused(client, rtype) -> None:
    """A member system that reuses an id (R4 lets a client put any id in a POST entry: ``obs-1`` in every Bundle)
    must not write over another patient's result, Patient or report: 409 naming the entry, nothing stored."""
    first = as_transaction(GOLDEN)
    assert client.post("/fhir", data=json.dumps(first), content_type="application/fhir+json").status_code == 200
    n, taken = _entry(first, rtype)
    other = _another_patients(first)
    m, mine = _entry(other, rtype)
    old_id = mine["resource"]["id"]
    text = json.dumps(other).replace(old_id, taken["resource"]["id"])  # the entry and every reference to it
    answer = client.post("/fhir", data=text, content_type="application/fhir+json")
    assert answer.status_code == 409, answer.get_data(as_text=True)
    issues = [i for i in answer.get_json()["issue"] if i["severity"] == "error"]
    assert issues and all(i["code"] == "conflict" for i in issues)
    assert f"Bundle.entry[{m}].resource.id" in {e for i in issues for e in i["expression"]}
    kept = client.get(f"/fhir/{rtype}/{taken['resource']['id']}")
    assert kept.headers["ETag"] == 'W/"1"' and kept.get_json()["id"] == taken["resource"]["id"]
    assert client.get("/fhir/Patient").get_json()["total"] == 1  # nothing of the refused Bundle stored
    # the same Bundle with ids of its own is stored
    fine = client.post("/fhir", content_type="application/fhir+json",
                       data=json.dumps(_another_patients(first, "urn:uuid:5a8d1e2f-3b4c-4d5e-8f60-718293a4b5c6")))
    assert fine.status_code == 200 and client.get("/fhir/Patient").get_json()["total"] == 2


def test_an_observation_id_reused_for_another_test_of_the_same_patient_is_refused(client) -> None:
    first = as_transaction(GOLDEN)
    assert client.post("/fhir", data=json.dumps(first), content_type="application/fhir+json").status_code == 200
    again = copy.deepcopy(first)
    again["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:c0a8e3b2-9d4f-4e1a-8b7c-6d5e4f3a2b1c"}
    (_, a), (_, b) = _entry(again, "Observation", 0), _entry(again, "Observation", 1)
    a["resource"]["code"] = copy.deepcopy(b["resource"]["code"])
    answer = client.post("/fhir", data=json.dumps(again), content_type="application/fhir+json")
    assert answer.status_code == 409, answer.get_data(as_text=True)
    assert "another test" in answer.get_data(as_text=True)


def test_two_entries_with_one_id_are_refused(client) -> None:
    """R4 transaction: entries whose resources overlap fail the Bundle (the second was stored over the first)."""
    bundle = as_transaction(GOLDEN)
    (n, a), (m, b) = _entry(bundle, "Observation", 0), _entry(bundle, "Observation", 1)
    b["resource"]["id"] = a["resource"]["id"]
    b["request"]["url"] = a["request"]["url"]
    answer = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json")
    assert answer.status_code in (400, 422), answer.get_data(as_text=True)
    [issue] = [i for i in answer.get_json()["issue"] if i["severity"] == "error"]
    assert issue["expression"] == [f"Bundle.entry[{m}].resource.id"]
    assert f"entry[{n}]" in issue["diagnostics"]
    assert client.get("/fhir/Observation").get_json()["total"] == 0


def _without_request(bundle: dict) -> dict:
    del bundle["entry"][1]["request"]
    return bundle


def _as_collection_with_request(bundle: dict) -> dict:
    bundle["type"] = "collection"
    for e in bundle["entry"][:1] + bundle["entry"][2:]:
        del e["request"]
    return bundle


def _with_response(bundle: dict) -> dict:
    bundle["entry"][1]["response"] = {"status": "201 Created"}
    return bundle


def _post_to_another_type(bundle: dict) -> dict:
    bundle["entry"][1]["request"] = {"method": "POST", "url": "Observation"}  # (entry 1 is the Patient)
    return bundle


def _get_entry(bundle: dict) -> dict:
    bundle["entry"][1] = {"request": {"method": "GET", "url": "Patient?identifier=x|1"}}
    return bundle


@pytest.mark.parametrize("change, where, text", [
    (_without_request, "request", "carries its request (R4 bdl-3)"),
    (_as_collection_with_request, "request", "the entries of a collection carry no request"),
    (_with_response, "response", "carries no response (R4 bdl-4"),
    (_post_to_another_type, "request.url", "names another type than the entry's"),
    (_get_entry, "request.method", "request method 'GET' is not taken"),
])
def test_an_entry_whose_request_or_response_r4_forbids_is_refused_naming_it(client, change, where, text) -> None:
    """R4 bdl-3 and bdl-4, and a POST naming another type: these were stored as if the entry were right."""
    bundle = change(as_transaction(GOLDEN))
    answer = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json")
    assert answer.status_code in (400, 422), answer.get_data(as_text=True)
    [issue] = [i for i in answer.get_json()["issue"] if i["severity"] == "error"]
    assert issue["expression"] == [f"Bundle.entry[1].{where}"] and text in issue["diagnostics"], issue
    assert client.get("/fhir/Observation").get_json()["total"] == 0
