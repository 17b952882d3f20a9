"""FHIR REST as R4 gives it (http.html), the defects outside testers found: a create's Location, ETag and
Last-Modified; ``Prefer: return=`` on creates and transactions; a transaction answered 200 OK; ``$validate`` of a
form; an auditor's AuditEvent history; ``$recognize`` declared with its OperationDefinition; ``OPTIONS``."""
from __future__ import annotations

import copy
import datetime as dt
import email.utils
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conftest import CST, DATA, FULING, ROOT, make_token, validate_fhir
from test_api import assert_outcome
from test_fhir_submission import GOLDEN, as_transaction

FHIR_JSON = "application/fhir+json"
BASE = "http://localhost/fhir"
RECOGNIZE = ROOT / "profiles" / "operations" / "OperationDefinition-recognize.json"


def post(client: Any, path: str, bundle: dict[str, Any], prefer: str | None = None) -> Any:
    return client.post(path, data=json.dumps(bundle), content_type=FHIR_JSON,
                       headers={"Prefer": prefer} if prefer else {})


def corrected(bundle: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The same report in a new Bundle, one Observation corrected: (the Bundle, that entry's index)."""
    changed = copy.deepcopy(bundle)
    changed["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:3f1c6a52-2b1e-4f0e-8a77-5c2d9e4b7a10"}
    changed["id"] = "3f1c6a52-2b1e-4f0e-8a77-5c2d9e4b7a10"
    n, obs = next((n, e["resource"]) for n, e in enumerate(changed["entry"])
                  if e["resource"]["resourceType"] == "Observation")
    obs["status"], obs["valueQuantity"]["value"] = "corrected", 9.9
    return changed, n


@pytest.fixture
def auditor(app: Any) -> Any:
    """A test client of the gateway's auditor (role auditor only)."""
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, 'auditor', ['auditor'])}"
    return c


def outside_validators_accept(tmp_path: Path, answers: dict[str, Any]) -> None:
    """Every answer (name -> FHIR JSON) valid R4 for the outside validators (one run)."""
    files = []
    for name, body in answers.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
        files.append(path)
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ 1. create: Location, ETag, Last-Modified


def test_a_bundle_created_is_answered_with_its_location_etag_and_last_modified(client, anon, clock) -> None:
    """R4 create (POST [base]/Bundle): 201 Created with Location [base]/Bundle/[id]/_history/[vid], ETag and
    Last-Modified (they were missing). Sent again with the same content: 200, the same Location. A Bundle sent
    without an id is named by one made from its identifier, the same for its resend."""
    created = post(client, "/fhir/Bundle", as_transaction(GOLDEN))
    assert created.status_code == 201, created.get_data(as_text=True)
    assert created.headers["Location"] == f"{BASE}/Bundle/{GOLDEN['id']}/_history/1"
    assert created.headers["ETag"] == 'W/"1"'
    assert email.utils.parsedate_to_datetime(created.headers["Last-Modified"]) == clock().replace(microsecond=0)
    assert created.get_json()["type"] == "transaction-response"  # (what it was answered with, without Prefer)
    again = post(client, "/fhir/Bundle", as_transaction(GOLDEN))
    assert again.status_code == 200 and again.headers["Location"] == created.headers["Location"]

    nameless = as_transaction(GOLDEN)
    del nameless["id"]
    nameless["identifier"] = {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0d7c8b22-8a1e-4d7e-9a55-1c8f0d1f2e3a"}
    first, resent = post(client, "/fhir/Bundle", nameless), post(client, "/fhir/Bundle", nameless)
    assert (first.status_code, resent.status_code) == (201, 200), first.get_data(as_text=True)
    location = first.headers["Location"]
    assert location.startswith(f"{BASE}/Bundle/") and location.endswith("/_history/1")
    assert resent.headers["Location"] == location and location != created.headers["Location"]
    # and the CapabilityStatement says a Bundle is created so
    resources = anon.get("/fhir/metadata").get_json()["rest"][0]["resource"]
    bundle = next(r for r in resources if r["type"] == "Bundle")
    assert [i["code"] for i in bundle["interaction"]] == ["create"]


# ------------------------------------------------------------------ 3. a transaction: 200 OK


def test_a_transaction_is_answered_200_ok_its_entries_carrying_their_own_status(client) -> None:
    """R4 transaction (POST [base]): the transaction-response comes with 200 OK (it came with 201), no Location;
    each entry says 201 Created or 200 OK with the version's location."""
    first = post(client, "/fhir", as_transaction(GOLDEN))
    assert first.status_code == 200, first.get_data(as_text=True)
    assert "Location" not in first.headers
    assert {e["response"]["status"] for e in first.get_json()["entry"]} == {"201 Created"}
    changed, n = corrected(as_transaction(GOLDEN))
    again = post(client, "/fhir", changed)
    assert again.status_code == 200, again.get_data(as_text=True)
    response = again.get_json()["entry"][n]["response"]
    assert response["status"] == "200 OK" and response["location"].endswith("/_history/2")
    collection = copy.deepcopy(GOLDEN)  # a collection posted to the base: the same answer
    collection["identifier"]["value"] = "urn:uuid:7b4b4b8e-2f7c-4a51-9d0e-7a3e1f5c2b90"
    assert post(client, "/fhir/", collection).status_code == 200


# ------------------------------------------------------------------ 2. Prefer: return=


def test_prefer_return_is_honoured_by_transactions_and_creates(client, tmp_path) -> None:
    """R4 http.html#ops: ``minimal`` (the entries' response only; a create: no body), ``representation`` (each
    entry with the version it became; a create: the Bundle as stored), ``OperationOutcome`` (each entry's
    response.outcome; a create: an OperationOutcome). Said back in Preference-Applied. They were ignored."""
    said = post(client, "/fhir", as_transaction(GOLDEN), 'return="OperationOutcome"')  # (quoted: RFC 7240)
    assert said.status_code == 200 and said.headers["Preference-Applied"] == "return=OperationOutcome"
    outcomes = [e["response"]["outcome"] for e in said.get_json()["entry"]]
    assert all(o["resourceType"] == "OperationOutcome" for o in outcomes)
    assert all("is created" in o["issue"][0]["diagnostics"] for o in outcomes)
    assert [o["issue"][0]["expression"] for o in outcomes] == [[f"Bundle.entry[{n}]"] for n in range(len(outcomes))]
    minimal = post(client, "/fhir", as_transaction(GOLDEN), "return=minimal")  # (sent again: its first answer)
    assert minimal.status_code == 200 and minimal.headers["Preference-Applied"] == "return=minimal"
    assert all(set(e) == {"response"} for e in minimal.get_json()["entry"])

    changed, n = corrected(as_transaction(GOLDEN))
    shown = post(client, "/fhir", changed, "return=representation")
    assert shown.status_code == 200 and shown.headers["Preference-Applied"] == "return=representation"
    entries = shown.get_json()["entry"]
    for entry in entries:
        rtype, rid, vid = entry["response"]["location"].replace("/_history/", "/").split("/")
        assert entry["fullUrl"] == f"{BASE}/{rtype}/{rid}"
        assert entry["resource"] == client.get(f"/fhir/{rtype}/{rid}/_history/{vid}").get_json()
    assert entries[n]["resource"]["valueQuantity"]["value"] == 9.9
    assert entries[n]["resource"]["meta"]["versionId"] == "2"
    again = post(client, "/fhir", changed, "return=OperationOutcome").get_json()["entry"]
    assert "was stored before" in again[n]["response"]["outcome"]["issue"][0]["diagnostics"]

    fresh = as_transaction(GOLDEN)
    fresh["id"] = "b2d4c0de-1c9a-4c55-8b1e-2f7a9d3e6c41"
    fresh["identifier"]["value"] = f"urn:uuid:{fresh['id']}"
    nothing = post(client, "/fhir/Bundle", fresh, "return=minimal")
    assert nothing.status_code == 201 and nothing.data == b"" and "Content-Type" not in nothing.headers
    assert nothing.headers["Location"] == f"{BASE}/Bundle/{fresh['id']}/_history/1"
    stored = post(client, "/fhir/Bundle", fresh, "return=representation")
    assert stored.status_code == 200  # (the same content again: its first outcome)
    held = stored.get_json()
    assert (held["resourceType"], held["id"], held["type"]) == ("Bundle", fresh["id"], "collection")
    assert [e["resource"]["id"] for e in held["entry"]] == [e["resource"]["id"] for e in fresh["entry"]]
    outcome = post(client, "/fhir/Bundle", fresh, "return=OperationOutcome")
    assert outcome.get_json()["resourceType"] == "OperationOutcome"
    assert f"Bundle/{fresh['id']}" in outcome.get_json()["issue"][0]["diagnostics"]
    unknown = post(client, "/fhir/Bundle", fresh, "return=everything")  # not R4's: ignored (RFC 7240)
    assert "Preference-Applied" not in unknown.headers and unknown.get_json()["type"] == "transaction-response"
    outside_validators_accept(tmp_path, {"minimal": minimal.get_json(), "representation": shown.get_json(),
                                         "outcome": said.get_json(), "created": held,
                                         "create-outcome": outcome.get_json()})


# ------------------------------------------------------------------ 4. $validate of a form


@pytest.mark.parametrize("path", ["/fhir/Patient/$validate", "/fhir/Patient/p1/$validate"])
def test_validate_refuses_a_body_sent_as_a_form_naming_its_content_type(client, path) -> None:
    """``curl -d`` sends a form: it was read as JSON ("body is empty", "not strict JSON"); it is a 415 naming the
    Content-Type sent and the one taken. FHIR JSON, or a body without a Content-Type, is validated as before."""
    for sent in ("application/x-www-form-urlencoded", "application/fhir+xml", "text/plain"):
        refused = client.post(path, data="resourceType=Patient", content_type=sent)
        text = assert_outcome(refused, 415)["issue"][0]["diagnostics"]
        assert sent in text and "application/fhir+json" in text, text
    patient = json.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"})
    assert client.post(path, data=patient, content_type=FHIR_JSON).status_code == 200
    assert client.post(path, data=patient).status_code == 200


# ------------------------------------------------------------------ 5. an auditor's AuditEvent history


def test_an_auditor_reads_an_audit_events_history_its_one_version(client, auditor, tmp_path) -> None:
    """An auditor may read AuditEvents, so their history too (it was a 403 naming roles auditors do not have): an
    entry of the log is never changed, so its history is its one version, as read and vread give it; the same 404
    for an entry there is none of; the look is written to the log. The type's history is not served, said so."""
    found = auditor.get("/fhir/AuditEvent?_count=1").get_json()
    event = found["entry"][0]["resource"]
    before = auditor.get("/fhir/AuditEvent?_summary=count").get_json()["total"]
    history = auditor.get(f"/fhir/AuditEvent/{event['id']}/_history")
    assert history.status_code == 200, history.get_data(as_text=True)
    bundle = history.get_json()
    assert (bundle["type"], bundle["total"], len(bundle["entry"])) == ("history", 1, 1)
    entry = bundle["entry"][0]
    assert entry["resource"] == auditor.get(f"/fhir/AuditEvent/{event['id']}/_history/1").get_json() == event
    assert entry["response"] == {"status": "201 Created", "etag": 'W/"1"', "lastModified": event["recorded"]}
    assert entry["fullUrl"] == f"{BASE}/AuditEvent/{event['id']}"
    # recorded as a read (the history, the vread, the counting search: one entry each)
    assert auditor.get("/fhir/AuditEvent?_summary=count").get_json()["total"] == before + 3
    later = auditor.get(f"/fhir/AuditEvent/{event['id']}/_history?_since=2030-01-01T00:00:00%2B08:00").get_json()
    assert later["total"] == 0 and "entry" not in later
    assert auditor.get(f"/fhir/AuditEvent/{event['id']}/_history?_count=0").get_json()["total"] == 1
    assert_outcome(auditor.get("/fhir/AuditEvent/999999/_history"), 404)
    assert_outcome(auditor.get(f"/fhir/AuditEvent/{event['id']}/_history?_since=soon"), 400)
    assert_outcome(auditor.get(f"/fhir/AuditEvent/{event['id']}/_history?patient=x"), 400)
    assert_outcome(client.get(f"/fhir/AuditEvent/{event['id']}/_history"), 403)  # a submitter reads no audit log
    whole = assert_outcome(auditor.get("/fhir/AuditEvent/_history"), 404)
    assert whole["issue"][0]["code"] == "not-supported" and "/_history" in whole["issue"][0]["diagnostics"]
    outside_validators_accept(tmp_path, {"history": bundle})


def test_the_capability_statement_says_audit_events_have_their_history(anon) -> None:
    resources = anon.get("/fhir/metadata").get_json()["rest"][0]["resource"]
    audit = next(r for r in resources if r["type"] == "AuditEvent")
    assert {i["code"] for i in audit["interaction"]} == {"read", "vread", "history-instance", "search-type"}


# ------------------------------------------------------------------ 6. $recognize declared


@pytest.fixture
def recognizing(app: Any, clock: Any) -> Any:
    """The gateway under test with the demo registry snapshot in force (what $recognize decides by)."""
    from gateway.api import registry as registry_api
    from gateway.demo.registry import build_demo_registry
    from gateway.registry.snapshot import RegistryHolder

    demo = build_demo_registry(dt.datetime(2026, 11, 22, 9, 0, tzinfo=CST))
    holder = RegistryHolder([demo.authority_cert], clock=clock)
    holder.apply(demo.text())
    registry_api.install(app, holder, clock=clock, database=app.extensions["gateway.settings"].database_locator)
    return app


#: The FHIR primitive types a ``value[x]`` of the answer may have (the others are complex: Coding, Identifier).
_PRIMITIVES = {"string", "integer", "dateTime", "code", "id", "uri", "boolean", "decimal", "instant"}


def _declared(params: list[dict[str, Any]], got: list[dict[str, Any]], where: str) -> None:
    """Every parameter of an answer is declared (use out) with its type, and every one declared 1.. is there."""
    out = {p["name"]: p for p in params if p["use"] == "out"}
    for param in got:
        name = param["name"]
        assert name in out, f"{where}{name} is not declared"
        definition = out[name]
        value = [k for k in param if k.startswith("value")]
        if "part" in definition:
            assert not value and "part" in param, f"{where}{name}"
            _declared(definition["part"], param["part"], f"{where}{name}.")
            continue
        allowed = {e["valueUri"] for e in definition.get("extension", [])} or {definition["type"]}
        kind = value[0][5:]
        kind = kind[0].lower() + kind[1:] if kind[0].lower() + kind[1:] in _PRIMITIVES else kind
        assert kind in allowed, f"{where}{name}: {kind} is not one of {allowed}"
    for name, definition in out.items():
        assert definition["min"] == 0 or any(p["name"] == name for p in got), f"{where}{name} is missing"


def test_recognize_is_declared_with_an_operation_definition_that_says_what_it_takes_and_gives(
        recognizing, client, anon, tmp_path) -> None:
    """``$recognize`` is listed at system level in the CapabilityStatement (rest.operation), by the canonical URL of
    an OperationDefinition served at GET /fhir/OperationDefinition/recognize (and found by url) which the outside
    validators accept; what a real $recognize answers is what it declares."""
    cap = anon.get("/fhir/metadata").get_json()
    url = "https://fhir.cyhr.org.cn/OperationDefinition/recognize"
    assert {"name": "recognize", "definition": url} in cap["rest"][0]["operation"]
    served = anon.get("/fhir/OperationDefinition/recognize")
    assert served.status_code == 200 and served.mimetype == FHIR_JSON
    definition = served.get_json()
    assert definition == json.loads(RECOGNIZE.read_text(encoding="utf-8"))
    assert (definition["url"], definition["code"], definition["system"], definition["kind"]) == (
        url, "recognize", True, "operation")
    found = anon.get("/fhir/OperationDefinition", query_string={"url": url}).get_json()
    assert found["total"] == 1 and found["entry"][0]["resource"] == definition
    assert anon.get("/fhir/OperationDefinition", query_string={"url": url + "x"}).get_json()["total"] == 0
    assert_outcome(anon.get("/fhir/OperationDefinition/nothing"), 404)
    entry = next(r for r in cap["rest"][0]["resource"] if r["type"] == "OperationDefinition")
    assert {i["code"] for i in entry["interaction"]} == {"read", "search-type"}
    assert {p["name"] for p in definition["parameter"] if p["use"] == "in"} == {"bundle", "receiver", "at"}

    bundle = json.loads((DATA / "registry" / "bundle-lab-tongjiang.json").read_text(encoding="utf-8"))
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": bundle}, {"name": "receiver", "valueIdentifier": {"value": FULING}},
        {"name": "at", "valueInstant": "2026-11-22T09:15:00+08:00"}]}
    answered = client.post("/fhir/$recognize", data=json.dumps(body), content_type=FHIR_JSON)
    assert answered.status_code == 200, answered.get_data(as_text=True)
    _declared(definition["parameter"], answered.get_json()["parameter"], "")
    outside_validators_accept(tmp_path, {"OperationDefinition-recognize": definition})


def test_the_operation_definitions_are_loaded_with_the_guide_and_a_broken_one_stops_the_start(
        settings, stored_pipeline, tmp_path) -> None:
    """Kept beside the guide (profiles/operations/: the guide's loader takes its three types only); a copy of the
    guide without them serves the shipped ones; a broken one is a ConfigError naming the file, at start-up."""
    import shutil

    from gateway.api.app import create_app
    from gateway.errors import ConfigError

    copied = tmp_path / "guide"
    shutil.copytree(ROOT / "profiles", copied, ignore=shutil.ignore_patterns("examples", "operations"))
    app = create_app(replace(settings, profiles_dir=str(copied)), stored_pipeline)
    assert app.test_client().get("/fhir/OperationDefinition/recognize").status_code == 200
    (copied / "operations").mkdir()
    broken = json.loads(RECOGNIZE.read_text(encoding="utf-8"))
    broken["parameter"][0]["use"] = "sideways"
    (copied / "operations" / RECOGNIZE.name).write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        create_app(replace(settings, profiles_dir=str(copied)), stored_pipeline)
    assert RECOGNIZE.name in str(raised.value.location)


# ------------------------------------------------------------------ 7. OPTIONS


def test_options_is_answered_as_a_fhir_server_answers_it(anon) -> None:
    """OPTIONS was an empty text/html page: on the base it is the CapabilityStatement, elsewhere 200 without a
    body; both say in Allow what the URL takes."""
    base = anon.options("/fhir")
    assert base.status_code == 200 and base.mimetype == FHIR_JSON
    assert base.get_json()["resourceType"] == "CapabilityStatement" and "POST" in base.headers["Allow"]
    for path, method in (("/fhir/Patient", "GET"), ("/fhir/Observation/x/_history", "GET"),
                         ("/fhir/StructureDefinition/cyhr-patient", "GET"), ("/fhir/$recognize", "POST"),
                         ("/fhir/AuditEvent", "GET")):
        answered = anon.options(path)
        assert answered.status_code == 200 and answered.data == b"", path
        assert "Content-Type" not in answered.headers and method in answered.headers["Allow"].split(", "), path
    assert_outcome(anon.options("/fhir/Patient/x/y/z"), 404)  # no such URL


@pytest.fixture
def browsers(settings, pipeline) -> Any:
    """A client of the gateway under test letting in the browsers of https://app.example.org (CORS)."""
    from gateway.api.app import create_app

    return create_app(replace(settings, cors_origins="https://app.example.org"), pipeline).test_client()


def test_cors_preflights_are_answered_as_before(browsers) -> None:
    """A browser's preflight (Origin, Access-Control-Request-Method) is the CORS answer it was: allowed origin,
    methods and headers, no body (a guard: this passed before the change to OPTIONS, and passes after it)."""
    client = browsers
    for path in ("/fhir", "/fhir/Observation", "/fhir/metadata"):
        pre = client.options(path, headers={"Origin": "https://app.example.org",
                                            "Access-Control-Request-Method": "POST" if path == "/fhir" else "GET",
                                            "Access-Control-Request-Headers": "Authorization"})
        assert pre.status_code == 200 and pre.data == b"", path
        assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
        assert "GET" in pre.headers["Access-Control-Allow-Methods"] and "PUT" not in pre.headers[
            "Access-Control-Allow-Methods"]
        assert pre.headers["Access-Control-Allow-Headers"].lower() == "authorization"


def test_a_plain_options_from_an_allowed_origin_is_answered_as_a_fhir_server_with_cors(browsers) -> None:
    plain = browsers.options("/fhir", headers={"Origin": "https://app.example.org"})
    assert plain.get_json()["resourceType"] == "CapabilityStatement"
    assert plain.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
