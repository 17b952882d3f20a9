"""The Node.js FHIR client ``fhir-kit-client`` (pinned in tests/tools/fhir-kit-client) reads the
CapabilityStatement, reads and vreads a report, searches with ``_include`` and follows every ``next`` link,
asks for ``_summary=count`` and calls ``$validate`` — against the gateway served over HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from conftest import make_token, node_executable
from test_fhir_rest import UTF8

TOOL = Path(__file__).parent / "tools" / "fhir-kit-client"


def _node_env() -> tuple[str, dict[str, str]]:
    """Node.js (the test extras' pinned wheel, else ``node`` on PATH) and an environment with it first on PATH;
    the client's pinned node_modules are installed on first use (``npm ci`` from its package-lock.json)."""
    node = node_executable()
    if node is None:
        pytest.fail("Node.js is needed for the fhir-kit-client test: pip install -e '.[test]' installs it")
    env = {**os.environ, "PATH": f"{Path(node).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not (TOOL / "node_modules" / "fhir-kit-client" / "package.json").exists():
        npm_cli = Path(node).parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        npm = [node, str(npm_cli)] if npm_cli.exists() else None  # the Node.js wheel's own npm
        if npm is None:
            from shutil import which

            found = which("npm", path=env["PATH"])
            if found is None:
                pytest.fail(f"npm is needed to install fhir-kit-client (npm ci in {TOOL}) and was not found")
            npm = [found]
        done = subprocess.run([*npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=TOOL, env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"installing fhir-kit-client (npm ci in {TOOL}) failed:\n{done.stdout}\n{done.stderr}")
    return node, env


@pytest.fixture
def served(app, client):
    """The gateway's FHIR base URL on a free port of 127.0.0.1 holding the reports of one message, and a token."""
    assert client.post("/ingest/hl7v2", data=UTF8).status_code == 200
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}/fhir", make_token(app, "engine", ["submitter"])
    finally:
        http.shutdown()
        thread.join(5)


def test_fhir_kit_client_reads_pages_counts_and_validates(served) -> None:
    node, env = _node_env()
    base, token = served
    env["FHIR_BEARER_TOKEN"] = token
    run = subprocess.run([node, str(TOOL / "client.mjs"), base], cwd=TOOL, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, f"fhir-kit-client failed:\n{run.stdout}\n{run.stderr}"
    [line] = run.stdout.strip().splitlines()
    s = json.loads(line)

    assert s["capability"] == {"status": 200, "resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}

    search = s["search"]
    assert search["total"] >= 2
    # one report a page, every page answered 200, and paging reached every report exactly once
    assert len(search["pages"]) == search["total"]
    assert {p["status"] for p in search["pages"]} == {200}
    assert all(sum(1 for mode, _ in p["entries"] if mode == "match") == 1 for p in search["pages"])
    assert len(search["reportIds"]) == len(set(search["reportIds"])) == search["total"]
    # _include=DiagnosticReport:result brought the Observations, marked as includes
    assert search["includedObservations"]
    assert {tuple(e) for p in search["pages"] for e in p["entries"]} == {
        ("match", "DiagnosticReport"), ("include", "Observation")}

    first = search["reportIds"][0]
    assert s["read"]["status"] == 200 and s["read"]["resourceType"] == "DiagnosticReport"
    assert s["read"]["id"] == first
    assert s["vread"] == {"status": 200, "resourceType": "DiagnosticReport", "id": first, "versionId": "1"}

    assert s["count"] == {"status": 200, "resourceType": "Bundle", "type": "searchset", "total": search["total"],
                          "entries": 0}

    assert s["validate"]["status"] == 200
    assert s["validate"]["resourceType"] == "OperationOutcome"
    assert s["validate"]["errors"] >= 1
