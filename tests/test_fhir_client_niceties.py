"""What FHIR clients send that is standard but easy to miss: ``_pretty``, ``_summary=false``, ``_elements`` by a
choice element's name, a reference as this server's absolute URL, the legacy ``application/json+fhir``, and a 405
that says which methods a resource takes. Inputs: ``tests/data/hl7v2/lis-v251-utf8.hl7`` (通江's LIS)."""
from __future__ import annotations

from typing import Any

import pytest

from conftest import DATA, make_token


@pytest.fixture
def stored(client: Any) -> Any:
    res = client.post("/ingest/hl7v2", data=(DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes())
    assert res.status_code in (200, 422), res.get_data(as_text=True)
    return client


def _ids(res: Any) -> list[str]:
    assert res.status_code == 200, res.get_data(as_text=True)
    return [e["resource"]["id"] for e in res.get_json().get("entry", [])]


def test_pretty_and_summary_false_are_taken(stored: Any, app: Any) -> None:
    plain = _ids(stored.get("/fhir/Observation"))
    assert plain
    assert _ids(stored.get("/fhir/Observation?_pretty=true")) == plain
    assert _ids(stored.get("/fhir/Observation?_summary=false")) == plain
    assert stored.get("/fhir/Observation/_history?_pretty=true").status_code == 200
    assert stored.get("/fhir/StructureDefinition?_pretty=false").status_code == 200
    auditor = {"Authorization": f"Bearer {make_token(app, 'auditor', ['auditor'])}"}
    assert app.test_client().get("/fhir/AuditEvent?_pretty=true", headers=auditor).status_code == 200
    assert stored.get("/fhir/Observation?_summary=brief").status_code == 400


def test_elements_by_a_choice_elements_name(stored: Any) -> None:
    res = stored.get("/fhir/Observation?_elements=effective,value")
    entries = [e["resource"] for e in res.get_json()["entry"]]
    assert entries and all("effectiveDateTime" in r for r in entries)
    assert any("valueQuantity" in r for r in entries) and not any("referenceRange" in r for r in entries)
    same = stored.get("/fhir/Observation?_elements=effective[x],value[x]").get_json()["entry"]
    assert [e["resource"] for e in same] == entries
    # only a choice element's typed names: "reference" is not referenceRange
    other = stored.get("/fhir/Observation?_elements=reference").get_json()["entry"]
    assert not any("referenceRange" in e["resource"] for e in other)


def test_a_reference_as_this_servers_absolute_url(stored: Any) -> None:
    subject = stored.get("/fhir/Observation").get_json()["entry"][0]["resource"]["subject"]["reference"]
    relative = _ids(stored.get(f"/fhir/Observation?patient={subject}"))
    assert relative
    assert _ids(stored.get(f"/fhir/Observation?patient=http://localhost/fhir/{subject}")) == relative
    assert _ids(stored.get(f"/fhir/Observation?subject=http://localhost/fhir/{subject}")) == relative
    # another server's resource is not this one's
    assert _ids(stored.get(f"/fhir/Observation?patient=http://elsewhere.example/fhir/{subject}")) == []


def test_the_legacy_fhir_json_type_is_served(stored: Any) -> None:
    res = stored.get("/fhir/Observation", headers={"Accept": "application/json+fhir"})
    assert res.status_code == 200 and res.get_json()["resourceType"] == "Bundle"
    assert stored.get("/fhir/Observation?_format=application/json%2Bfhir").status_code == 200


def test_a_method_a_resource_does_not_take_says_which_it_does(stored: Any) -> None:
    res = stored.delete("/fhir/Patient/anything")
    assert res.status_code == 405
    assert res.get_json()["resourceType"] == "OperationOutcome"
    allowed = {m.strip() for m in res.headers.get("Allow", "").split(",")}
    assert "GET" in allowed and "DELETE" not in allowed


def test_a_code_elements_token_with_its_implied_system(stored: Any) -> None:
    """status and gender are code elements: a client may write the system their binding implies."""
    final = _ids(stored.get("/fhir/Observation?status=final"))
    assert final
    assert _ids(stored.get("/fhir/Observation?status=http://hl7.org/fhir/observation-status|final")) == final
    assert _ids(stored.get("/fhir/Observation?status=http://example.org/other|final")) == []
    reports = _ids(stored.get("/fhir/DiagnosticReport?status=final"))
    assert reports and _ids(stored.get(
        "/fhir/DiagnosticReport?status=http://hl7.org/fhir/diagnostic-report-status|final")) == reports
    gender = stored.get("/fhir/Patient").get_json()["entry"][0]["resource"]["gender"]
    patients = _ids(stored.get(f"/fhir/Patient?gender={gender}"))
    assert patients and _ids(stored.get(
        f"/fhir/Patient?gender=http://hl7.org/fhir/administrative-gender|{gender}")) == patients
