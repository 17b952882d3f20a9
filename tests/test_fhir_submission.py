"""FHIR-native submission: a report Bundle is checked against our profiles before anything is stored."""
from __future__ import annotations

import copy
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
    assert resp.status_code == 201, resp.get_data(as_text=True)
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
