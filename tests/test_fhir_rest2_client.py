"""The SMART on FHIR Python client ``fhirclient`` reads, searches with includes and pages against the gateway
over HTTP (a real server on 127.0.0.1), parsing every answer with its own R4 models."""
from __future__ import annotations

import threading

import pytest
from werkzeug.serving import make_server

from conftest import make_token
from test_fhir_rest import UTF8


@pytest.fixture
def served(app, client):
    """The gateway's API on a free port of 127.0.0.1, holding one report, and a fhirclient server for it."""
    from fhirclient.server import FHIRServer

    assert client.post("/ingest/hl7v2", data=UTF8).status_code == 200
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    server = FHIRServer(None, base_uri=f"http://127.0.0.1:{http.server_port}/fhir/")
    server.session.headers["Authorization"] = f"Bearer {make_token(app, 'engine', ['submitter'])}"
    try:
        yield server
    finally:
        http.shutdown()
        thread.join(5)
        server.session.close()


def test_fhirclient_reads_searches_with_includes_and_pages(served) -> None:
    from fhirclient.models.diagnosticreport import DiagnosticReport
    from fhirclient.models.observation import Observation
    from fhirclient.models.patient import Patient

    search = DiagnosticReport.where({"_count": "1"})
    search.include("result")
    search.include("subject")
    bundle = next(search.perform_iter(served))  # the first page
    assert bundle.total == 2
    kinds = {e.search.mode: set() for e in bundle.entry}
    for e in bundle.entry:
        kinds[e.search.mode].add(type(e.resource).__name__)
    assert kinds == {"match": {"DiagnosticReport"}, "include": {"Observation", "Patient"}}
    report = next(e.resource for e in bundle.entry if e.search.mode == "match")
    assert DiagnosticReport.read(report.id, served).id == report.id
    # every page, following next links
    seen = [o.id for o in Observation.where({"_count": "3", "_sort": "-date"}).perform_resources_iter(served)]
    total = next(Observation.where({"_summary": "count"}).perform_iter(served)).total
    assert len(seen) == len(set(seen)) == total > 3
    [patient] = list(Patient.where({"family": "王"}).perform_resources_iter(served))
    back = Patient.where({"_id": patient.id})
    back.include("subject", Observation, reverse=True)
    entries = next(back.perform_iter(served)).entry
    assert sum(1 for e in entries if e.search.mode == "include") == total
