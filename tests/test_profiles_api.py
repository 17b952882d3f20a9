"""Conformance API: the guide served over HTTP, searches by url, and $validate answering OperationOutcomes."""
from __future__ import annotations

import json

import pytest
from flask import Flask

from conftest import ROOT
from gateway.api import conformance
from gateway.api.errors import register_error_handlers
from gateway.errors import ConfigError
from gateway.naming import IG_VERSION, sd_url

GUIDE = ROOT / "profiles"
EXAMPLES = GUIDE / "examples"


@pytest.fixture
def served() -> Flask:
    """An app with the gateway's error rendering and this blueprint only (no pipeline, no store)."""
    app = Flask("conformance-test")
    register_error_handlers(app)
    app.register_blueprint(conformance.bp, profiles_dir=str(ROOT / "profiles"))
    return app


@pytest.fixture
def http(served: Flask):
    return served.test_client()


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def outcome(resp, status: int = 200) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/fhir+json"
    body = resp.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome" and body["issue"]
    return body


@pytest.mark.parametrize("path", ["StructureDefinition/cyhr-patient", "StructureDefinition/hazard-factor",
                                  "CodeSystem/exam-conclusion", "ValueSet/exposure-category"])
def test_read_serves_the_published_file(http, path: str) -> None:
    resp = http.get(f"/fhir/{path}")
    assert resp.status_code == 200 and resp.mimetype == "application/fhir+json"
    rtype, rid = path.split("/")
    assert resp.get_json() == json.loads((ROOT / "profiles" / f"{rtype}-{rid}.json").read_text(encoding="utf-8"))


def test_read_of_something_else_is_404(http) -> None:
    body = outcome(http.get("/fhir/StructureDefinition/us-core-patient"), 404)
    assert body["issue"][0]["expression"] == ["StructureDefinition/us-core-patient"]


def test_search_by_url_and_version(http) -> None:
    url = sd_url("cyhr-lab-observation")
    for query in (f"url={url}", f"url={url}|{IG_VERSION}", f"url={url}&version={IG_VERSION}"):
        bundle = http.get(f"/fhir/StructureDefinition?{query}").get_json()
        assert bundle["type"] == "searchset" and bundle["total"] == 1
        assert bundle["entry"][0]["resource"]["url"] == url
        assert bundle["entry"][0]["fullUrl"].endswith("/fhir/StructureDefinition/cyhr-lab-observation")
    assert http.get(f"/fhir/StructureDefinition?url={url}|9.9.9").get_json()["total"] == 0
    everything = http.get("/fhir/CodeSystem").get_json()
    assert everything["total"] == len(list(GUIDE.glob("CodeSystem-*.json")))
    assert http.get("/fhir/ValueSet?name=exam").get_json()["total"] == 2
    assert http.get("/fhir/ValueSet?_id=exam-type").get_json()["entry"][0]["resource"]["id"] == "exam-type"


def test_unknown_search_parameters_are_refused_unless_lenient(http) -> None:
    body = outcome(http.get("/fhir/StructureDefinition?title=x"), 400)
    assert body["issue"][0]["expression"] == ["title"]
    lenient = http.get("/fhir/StructureDefinition?title=x", headers={"Prefer": "handling=lenient"})
    assert lenient.status_code == 200
    assert lenient.get_json()["total"] == len(list(GUIDE.glob("StructureDefinition-*.json")))


def test_beside_the_results_api_neither_shadows_the_other(app: Flask, client) -> None:
    """In the full gateway app (/fhir/<type>/<id> is the results API) both sets of routes answer."""
    if "conformance" not in app.blueprints:
        app.register_blueprint(conformance.bp)
    http = client  # authenticated: the results API needs a token, conformance does not
    assert http.get("/fhir/StructureDefinition/cyhr-patient").get_json()["id"] == "cyhr-patient"
    assert http.get("/fhir/ValueSet").get_json()["total"] == len(list(GUIDE.glob("ValueSet-*.json")))
    assert http.get("/fhir/Observation").get_json()["type"] == "searchset"
    outcome(http.get("/fhir/Observation/does-not-exist"), 404)
    assert http.post("/fhir/Patient/$validate", json={"resourceType": "Patient"}).status_code == 200


def test_validate_a_valid_resource(http) -> None:
    body = outcome(http.post("/fhir/Bundle/$validate", json=example("Bundle-lab-report.json")))
    assert body["issue"] == [{"severity": "information", "code": "informational", "diagnostics": "all OK"}]


def test_validate_an_invalid_resource_lists_every_issue_with_status_200(http) -> None:
    report = example("DiagnosticReport-occupational.json")
    report["conclusionCode"][0]["coding"][0]["code"] = "normal"
    del report["subject"]
    body = outcome(http.post("/fhir/DiagnosticReport/$validate", data=json.dumps(report, ensure_ascii=False),
                             content_type="application/fhir+json"))
    assert [(i["severity"], i["expression"]) for i in body["issue"]] == [
        ("error", ["DiagnosticReport.subject"]), ("error", ["DiagnosticReport.conclusionCode[0]"])]
    assert "exam-conclusion" in body["issue"][1]["diagnostics"]


def test_validate_takes_parameters_with_a_profile(http) -> None:
    obs = example("Observation-glucose.json")
    del obs["meta"], obs["performer"]
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": obs}, {"name": "profile", "valueUri": sd_url("cyhr-lab-observation")}]}
    body = outcome(http.post("/fhir/Observation/$validate", json=params))
    assert body["issue"][0]["expression"] == ["Observation.performer"]
    query = outcome(http.post(f"/fhir/Observation/$validate?profile={sd_url('cyhr-lab-observation')}", json=obs))
    assert query["issue"][0]["expression"] == ["Observation.performer"]
    plain = outcome(http.post("/fhir/Observation/$validate", json=obs))
    assert plain["issue"][0]["severity"] == "information"


@pytest.mark.parametrize("path, data, status, text", [
    ("/fhir/Observation/$validate", b"", 400, "body is empty"),
    ("/fhir/Observation/$validate", b"{\"resourceType\": ", 400, "is not strict JSON: not valid JSON"),
    ("/fhir/Observation/$validate", b'{"resourceType": "Observation", "status": "final", "status": "x"}', 400,
     "duplicate key 'status'"),  # FHIR JSON has each property once: read as a submission is
    ("/fhir/Observation/$validate", "{}".encode("utf-16"), 400, "is not UTF-8"),
    ("/fhir/Observation/$validate", json.dumps({"resourceType": "Patient"}).encode(), 422, "is 'Patient'"),
    ("/fhir/Observation/$validate", json.dumps({"resourceType": "Parameters", "parameter": []}).encode(), 422,
     "has no parameter 'resource'"),
    ("/fhir/Observatoin/$validate", b"{}", 404, "is not an R4 resource type"),
])
def test_validate_refuses_what_it_cannot_read(http, path: str, data: bytes, status: int, text: str) -> None:
    body = outcome(http.post(path, data=data, content_type="application/fhir+json"), status)
    assert text in body["issue"][0]["diagnostics"]


def test_validate_reports_a_body_that_is_not_a_resource(http) -> None:
    body = outcome(http.post("/fhir/Observation/$validate", json=["not", "a", "resource"]))
    assert body["issue"][0]["severity"] == "error" and "JSON object" in body["issue"][0]["diagnostics"]


def test_capability_statement_helpers(served: Flask) -> None:
    profiles = conformance.supported_profiles(served)
    assert profiles["Observation"] == [sd_url("cyhr-lab-observation")]
    assert profiles["Bundle"] == [sd_url("cyhr-report-bundle"), sd_url("cyhr-service-report-bundle")]
    entries = conformance.capability_resources(served)
    by_type: dict[str, list[dict]] = {}
    for entry in entries:
        by_type.setdefault(entry["type"], []).append(entry)
    assert {e["name"] for e in by_type["StructureDefinition"][0]["searchParam"]} == {"url", "version", "_id", "name"}
    assert by_type["Patient"][0]["supportedProfile"] == [sd_url("cyhr-patient")]
    assert by_type["Patient"][0]["operation"][0]["name"] == "validate"


def test_a_broken_guide_stops_the_app_at_registration(settings, tmp_path) -> None:
    fresh = Flask("fresh")
    fresh.extensions["gateway.settings"] = settings.replace(profiles_dir=str(tmp_path / "none"))
    with pytest.raises(ConfigError):
        fresh.register_blueprint(conformance.bp)
    other = Flask("other")
    other.register_blueprint(conformance.bp, profiles_dir=str(ROOT / "profiles"))
    assert conformance.guide_of(other).version == IG_VERSION


def test_the_guides_searches_take_the_paging_every_search_takes(http) -> None:
    """``StructureDefinition?_count=1`` (and ``_summary=count``) was refused as an unknown parameter, though the
    CapabilityStatement offers search-type: a FHIR client pages every search the same way."""
    everything = http.get("/fhir/StructureDefinition").get_json()
    total = everything["total"]
    assert total > 2 and len(everything["entry"]) == total
    seen: list[str] = []
    url = "/fhir/StructureDefinition?_count=2"
    while url:
        page = http.get(url.replace("http://localhost", ""))
        assert page.status_code == 200, page.get_data(as_text=True)
        body = page.get_json()
        assert body["total"] == total and len(body.get("entry", [])) <= 2
        seen += [e["resource"]["id"] for e in body.get("entry", [])]
        url = next((link["url"] for link in body["link"] if link["relation"] == "next"), "")
    assert seen == [e["resource"]["id"] for e in everything["entry"]]
    counted = http.get("/fhir/CodeSystem?_summary=count").get_json()
    assert "entry" not in counted and counted["total"] == http.get("/fhir/CodeSystem").get_json()["total"]
    assert http.get("/fhir/ValueSet?_count=x").status_code == 400
