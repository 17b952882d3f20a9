"""Registry API: the snapshot browsed as FHIR (Organization, VerificationResult, Endpoint), the signed snapshot
passed on byte for byte, and POST /fhir/$recognize (Parameters in, Parameters out); errors as OperationOutcome.
Everything served is checked by the independent FHIR validators."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from gateway.api.errors import register_error_handlers
from gateway.api.registry import bp, install
from gateway.demo.registry import DemoRegistry, build_demo_registry
from gateway.recognition.store import list_decisions
from gateway.registry.snapshot import RegistryHolder
from gateway.store.db import connect

DATA = Path(__file__).parent / "data" / "registry"
CST = dt.timezone(dt.timedelta(hours=8))
NOW = dt.datetime(2026, 11, 22, 9, 0, tzinfo=CST)
TONGJIANG, FULING, CDC = "12511921MB0001003C", "12500102MB0002006J", "12510000MB00030095"


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture(scope="module")
def demo() -> DemoRegistry:
    return build_demo_registry(NOW)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW + dt.timedelta(hours=1))


@pytest.fixture
def app(demo: DemoRegistry, clock: Clock, tmp_path: Path, database: str) -> Flask:
    locator = database or str(tmp_path / "gw.db")  # the backend chosen with --backend
    holder = RegistryHolder([demo.authority_cert], clock=clock)
    holder.apply(demo.text())
    application = Flask("test")
    register_error_handlers(application)
    application.register_blueprint(bp)
    install(application, holder, clock=clock, database=locator)
    application.config["TESTING"] = True
    # $recognize needs an authenticated member system (role submitter).
    from gateway import auth
    from gateway.audit.records import Party
    from gateway.config import load_settings
    from gateway.store.db import connect

    application.extensions["gateway.settings"] = load_settings(
        environ={}, overrides={"data_dir": str(tmp_path), "database": locator, "issuer_uscc": FULING})
    _, token = auth.add_user(connect(locator), "his", ["submitter"], at=clock(),
                             gateway=Party.member(FULING), by=Party.user(FULING, "setup"))
    application.config["TEST_TOKEN"] = token
    return application


def authed(app: Flask) -> Any:
    """A test client of the hospital's HIS, holding an API token."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {app.config['TEST_TOKEN']}"
    return client


def recognize_body(
    bundle: dict[str, Any], receiver: Any = FULING, at: str | None = "2026-11-22T10:00:00+08:00"
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "bundle", "resource": bundle}]
    if receiver is not None:
        params.append({"name": "receiver", **({"valueString": receiver} if isinstance(receiver, str) else receiver)})
    if at is not None:
        params.append({"name": "at", "valueDateTime": at})
    return {"resourceType": "Parameters", "parameter": params}


def bundle(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def parts(param: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in param["part"] if p["name"] == name]


def test_recognize_returns_parameters_and_stores(app: Flask, tmp_path: Path) -> None:
    client = authed(app)
    response = client.post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json")))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/fhir+json"
    out = response.get_json()
    assert out["resourceType"] == "Parameters"
    head = {p["name"]: p for p in out["parameter"] if p["name"] != "decision"}
    assert head["snapshotVersion"]["valueInteger"] == 1
    assert head["decidedAt"]["valueDateTime"] == "2026-11-22T10:00:00+08:00"
    assert head["receiver"]["valueIdentifier"]["value"] == FULING
    decisions = [p for p in out["parameter"] if p["name"] == "decision"]
    outcomes = [parts(d, "outcome")[0]["valueCode"] for d in decisions]
    assert outcomes == ["recognized", "recognized", "not-recognized", "recognized", "not-recognized"]
    wbc_rules = {
        parts(r, "id")[0]["valueCode"]: parts(r, "status")[0]["valueCode"] for r in parts(decisions[0], "rule")
    }
    assert wbc_rules == {
        rule: "passed"
        for rule in (
            "member-active",
            "catalogue-item",
            "catalogue-scope",
            "eqa-pass",
            "validity-window",
            "report-status",
            "mark",
            "direction",
        )
    }
    facts = json.loads(parts(parts(decisions[0], "rule")[4], "facts")[0]["valueString"])
    assert facts["valid_until"] == "2026-11-27"  # the last day, China time (calendar days)
    assert parts(decisions[0], "item")[0]["valueCoding"]["code"] == "CY-L001"
    (tmp_path / "recognize-out.json").write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    db = connect(app.extensions["gateway.settings"].database_locator, readonly=True)
    assert len(list_decisions(db)) == 5


def test_a_decision_as_of_another_time_is_audited_when_it_is_made(app: Flask, clock: Clock) -> None:
    """``at`` earlier than now: the audit entries are dated when they are written (a search by date finds them
    among the entries of today) and say the time they decided for."""
    from gateway.audit.log import entries
    from gateway.audit.render import render

    response = authed(app).post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json"),
                                                                        at="2026-11-20T09:00:00+08:00"))
    assert response.status_code == 200, response.get_data(as_text=True)
    db = connect(app.extensions["gateway.settings"].database_locator, readonly=True)
    decided = [e for e in entries(db) if e.content["kind"] == "decision"]
    assert len(decided) == 5
    written = clock().isoformat(timespec="milliseconds")
    assert {e.content["recorded"] for e in decided} == {written}
    assert {e.content["facts"]["as_of"] for e in decided} == {"2026-11-20T09:00:00.000+08:00"}
    event = render("decision", decided[0].recorded, decided[0].facts)
    details = {d["type"]: d["valueString"] for ent in event["entity"] for d in ent.get("detail", [])}
    assert details["as-of"] == "2026-11-20T09:00:00.000+08:00" and event["recorded"] == written


def test_a_decision_made_now_has_no_as_of_even_on_a_ticking_clock(
        app: Flask, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``at`` the decision is made as of the moment it is recorded: read from the clock once (read twice, a
    clock that moves made every such entry carry an as-of microseconds off its own time)."""
    from gateway.audit.log import entries

    def ticking(self: Clock) -> dt.datetime:
        self.now += dt.timedelta(milliseconds=1)
        return self.now

    monkeypatch.setattr(Clock, "__call__", ticking)
    response = authed(app).post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json"),
                                                                        at=None))
    assert response.status_code == 200, response.get_data(as_text=True)
    db = connect(app.extensions["gateway.settings"].database_locator, readonly=True)
    decided = [e for e in entries(db) if e.content["kind"] == "decision"]
    assert len(decided) == 5 and not any("as_of" in e.content["facts"] for e in decided)


def test_recognize_uses_the_clock_without_at(app: Flask, clock: Clock) -> None:
    response = authed(app).post(
        "/fhir/$recognize",
        json=recognize_body(
            bundle("bundle-occupational-cdc.json"), receiver={"valueIdentifier": {"value": FULING}}, at=None
        ),
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    head = {p["name"]: p for p in response.get_json()["parameter"]}
    assert head["decidedAt"]["valueDateTime"] == clock.now.isoformat()


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"resourceType": "Bundle"}, 422, "Parameters"),
        (recognize_body(bundle("bundle-lab-tongjiang.json"), receiver=None), 422, "receiver"),
        (recognize_body(bundle("bundle-lab-tongjiang.json"), receiver="12500102MB0002006K"), 422, "check character"),
        (recognize_body(bundle("bundle-lab-tongjiang.json"), at="2026-11-22T10:00:00"), 422, "UTC offset"),
        (recognize_body(bundle("bundle-lab-tongjiang.json"), at="2026-11-22"), 422, "time of day"),
        (recognize_body({"resourceType": "Patient"}), 422, "Bundle"),
        (recognize_body(bundle("bundle-lab-tongjiang.json"), at="2026-12-22T10:00:00+08:00"), 422, "later than now"),
        (
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "receiver", "valueString": FULING}, {"name": "receiver", "valueString": FULING}],
            },
            422,
            "twice",
        ),
        (
            {"resourceType": "Parameters", "parameter": [{"name": "patient", "valueString": "x"}]},
            422,
            "unknown parameter",
        ),
    ],
)
def test_recognize_errors_are_operation_outcomes(app: Flask, body: dict[str, Any], status: int, fragment: str) -> None:
    response = authed(app).post("/fhir/$recognize", json=body)
    assert response.status_code == status, response.get_data(as_text=True)
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert fragment in outcome["issue"][0]["diagnostics"]


def test_recognize_refuses_malformed_json_and_bad_identifiers(app: Flask) -> None:
    client = authed(app)
    response = client.post(
        "/fhir/$recognize", data=b'{"resourceType": "Parameters",', content_type="application/fhir+json"
    )
    assert response.status_code == 400 and response.get_json()["resourceType"] == "OperationOutcome"
    bad = bundle("bundle-lab-tongjiang.json")
    bad["entry"][1]["resource"]["identifier"][0]["value"] = "110105194912310021"
    response = client.post("/fhir/$recognize", json=recognize_body(bad))
    assert response.status_code == 422
    issue = response.get_json()["issue"][0]
    assert "身份证号" in issue["diagnostics"] and "110105194912310021" not in issue["diagnostics"]


@pytest.mark.parametrize("status, kind", [(7.10, "a number"), ({"code": "final"}, "an object"),
                                          (True, "true or false")])
def test_recognize_refuses_a_number_or_object_where_text_belongs(app: Flask, status: Any, kind: str) -> None:
    """``$recognize`` runs no profile check: a result's status (a fact the decision quotes) that is not text is
    refused (422) with the element named, before anything is decided; a huge integer (read as a Decimal) too."""
    client = authed(app)
    bad = bundle("bundle-lab-tongjiang.json")
    observation = next(i for i, e in enumerate(bad["entry"]) if e["resource"]["resourceType"] == "Observation")
    bad["entry"][observation]["resource"]["status"] = status
    response = client.post("/fhir/$recognize", json=recognize_body(bad))
    assert response.status_code == 422, response.get_data(as_text=True)
    issue = response.get_json()["issue"][0]
    assert issue["diagnostics"] == f"Bundle.entry[{observation}] status must be text, not {kind}"
    assert issue["expression"] == [f"Bundle.entry[{observation}]"]
    text = json.dumps(recognize_body(bad)).replace(json.dumps(status), "9" * 4400)
    response = client.post("/fhir/$recognize", data=text, content_type="application/fhir+json")
    assert response.status_code == 422 and "status must be text, not a number" in response.get_data(as_text=True)
    good = client.post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json")))
    assert good.status_code == 200


def _set(path: str, value: Any) -> Any:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = body
        for step in parents:
            target = target[int(step)] if step.isdigit() else target[step]
        target[int(last) if last.isdigit() else last] = value
    return change


@pytest.mark.parametrize("name, change, expected", [
    ("bundle-lab-tongjiang.json", _set("entry.4.resource.code.text", 12), "Bundle.entry[4] code.text"),
    ("bundle-lab-tongjiang.json", _set("entry.4.resource.code.coding.0.display", {"zh": "白细胞"}),
     "Bundle.entry[4] code.coding.display"),
    ("bundle-lab-tongjiang.json", _set("entry.4.resource.effectiveDateTime", 2026),
     "Bundle.entry[4] effectiveDateTime"),
    ("bundle-lab-imaging-fuling.json", _set("entry.7.resource.conclusion", ["双肺", "未见异常"]),
     "Bundle.entry[7].resource.conclusion code.text (or a report's conclusion) must be text, not a list"),
    ("bundle-occupational-cdc.json", _set("entry.5.resource.extension.1.extension.0.valueCoding.code", 3),
     "factor.code, of its DiagnosticReport must be text, not a number"),
    ("bundle-occupational-cdc.json", _set("entry.5.resource.extension.1.extension.0.valueCoding", "粉尘"),
     "Bundle.entry[3] holds, or a resource read with it holds, an element of another kind than FHIR's"),
    ("bundle-lab-tongjiang.json", _set("entry.4.resource.code", "WBC"),
     "Bundle.entry[4] holds, or a resource read with it holds, an element of another kind"),
    ("bundle-lab-tongjiang.json", _set("entry", 5), "Bundle holds, or a resource read with it holds, an element"),
    # identifiers a decision keeps (the patient's, the report's): a number or an object is not stored as text
    ("bundle-lab-tongjiang.json", _set("entry.1.resource.identifier.0.value", {"x": [1, 2]}),
     "Bundle.entry[4] holds, or a resource read with it holds, an element of another kind"),
    ("bundle-lab-tongjiang.json", _set("entry.9.resource.identifier.0.value", 4.5),
     "Bundle.entry[4] holds, or a resource read with it holds, an element of another kind"),
])
def test_recognize_names_an_element_of_the_wrong_kind(app: Flask, name: str, change: Any, expected: str) -> None:
    """Text facts holding something else, and elements of another kind than FHIR's where the facts are read: an
    OperationOutcome (422) naming the entry, never a 500."""
    body = bundle(name)
    change(body)
    response = authed(app).post("/fhir/$recognize", json=recognize_body(body))
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.get_json()["resourceType"] == "OperationOutcome"
    assert expected in response.get_json()["issue"][0]["diagnostics"]


def test_expired_snapshot_is_not_served(app: Flask, clock: Clock) -> None:
    clock.now = NOW + dt.timedelta(days=8)
    response = authed(app).get("/registry/fhir/Organization")
    assert response.status_code == 403 and "expired" in response.get_json()["issue"][0]["diagnostics"]


def test_browse_registry_as_fhir(app: Flask, demo: DemoRegistry, tmp_path: Path) -> None:
    client = authed(app)
    orgs = client.get("/registry/fhir/Organization").get_json()
    assert orgs["type"] == "searchset" and orgs["total"] == len(demo.document["members"])
    assert orgs["entry"][0]["fullUrl"] == f"http://localhost/registry/fhir/Organization/{TONGJIANG}"
    tj = client.get(f"/registry/fhir/Organization/{TONGJIANG}").get_json()
    assert tj["name"] == "通江县人民医院（演示）" and tj["active"] is True
    assert tj["meta"]["tag"][0]["code"] == "HTEST"  # demo data is marked as test data
    assert any(e["url"].endswith("/hospital-level") and e["valueString"] == "二级甲等" for e in tj["extension"])
    qualifications = [e for e in tj["extension"] if e["url"].endswith("extension-Organization.qualification")]
    assert len(qualifications) == 2
    by_id = client.get(f"/registry/fhir/Organization?identifier=https://fhir.cyhr.org.cn/sid/uscc|{FULING}").get_json()
    assert [e["resource"]["id"] for e in by_id["entry"]] == [FULING]
    results = client.get(f"/registry/fhir/VerificationResult?target=Organization/{CDC}").get_json()
    assert results["total"] == 7 + 3  # 7 qualifications (2 of them physicians') and 3 EQA results
    statuses = {e["resource"]["id"]: e["resource"]["status"] for e in results["entry"]}
    assert statuses["q-cdc-rhs"] == "val-fail" and statuses["q-cdc-filing"] == "validated"
    eqa = client.get("/registry/fhir/VerificationResult/eqa-16").get_json()
    assert eqa["status"] == "val-fail"  # 通江 ALT 2026
    endpoints = client.get(f"/registry/fhir/Endpoint?organization=Organization/{CDC}").get_json()
    assert endpoints["entry"][0]["resource"]["address"] == "https://sccdc.demo.example/fhir"
    for name, body in (("orgs", orgs), ("results", results), ("endpoints", endpoints)):
        (tmp_path / f"{name}.json").write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")

    # physicians who practise at several members: one Practitioner, a PractitionerRole per registration
    practitioners = client.get("/registry/fhir/Practitioner").get_json()["entry"]
    assert practitioners
    first = practitioners[0]["resource"]
    roles = client.get(f"/registry/fhir/PractitionerRole?practitioner=Practitioner/{first['id']}").get_json()
    assert roles["total"] >= 1
    for role in roles["entry"]:
        org = role["resource"]["organization"]["reference"]
        at = client.get(f"/registry/fhir/PractitionerRole?organization={org}").get_json()
        assert role["resource"]["id"] in {e["resource"]["id"] for e in at["entry"]}
    assert client.get("/registry/fhir/Organization/12330000470051726F").status_code == 404
    assert client.get("/registry/fhir/Patient").status_code == 404
    response = client.get("/registry/fhir/Organization?name=x")
    assert response.status_code in (400, 422) and response.get_json()["resourceType"] == "OperationOutcome"
    raw = client.get("/registry/snapshot")
    assert raw.status_code == 200 and raw.get_data() == demo.text().encode()


def test_served_fhir_is_valid_r4(app: Flask, tmp_path: Path) -> None:
    from conftest import validate_fhir

    client = authed(app)
    files = []
    for name, response in (
        ("organizations", client.get("/registry/fhir/Organization")),
        ("verification-results", client.get("/registry/fhir/VerificationResult")),
        ("endpoints", client.get("/registry/fhir/Endpoint")),
        ("practitioners", client.get("/registry/fhir/Practitioner")),
        ("practitioner-roles", client.get("/registry/fhir/PractitionerRole")),
        (
            "recognize-lab",
            client.post(
                "/fhir/$recognize", json=recognize_body(bundle("bundle-lab-imaging-fuling.json"), receiver=TONGJIANG)
            ),
        ),
        (
            "recognize-occupational",
            client.post("/fhir/$recognize", json=recognize_body(bundle("bundle-occupational-cdc.json"))),
        ),
    ):
        assert response.status_code == 200, response.get_data(as_text=True)
        path = tmp_path / f"{name}.json"
        path.write_bytes(response.get_data())
        files.append(path)
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_a_registry_the_endpoints_say_so() -> None:
    application = Flask("bare")
    register_error_handlers(application)
    application.register_blueprint(bp)
    response = application.test_client().get("/registry/fhir/Organization")
    assert response.status_code == 500
    assert "no registry snapshot configured" in response.get_json()["issue"][0]["diagnostics"]


def test_a_decision_as_of_a_moment_to_come_is_refused_and_nothing_is_stored(app: Flask, clock: Clock) -> None:
    """``at`` later than the gateway's clock (more than a few minutes: a caller's clock running ahead) would be
    stored, audited and counted in the published figures as if made: a what-if. Refused, naming the parameter."""
    from gateway.audit.log import entries

    ahead = (clock() + dt.timedelta(days=4)).astimezone(dt.timezone(dt.timedelta(hours=8))).isoformat()
    response = authed(app).post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json"),
                                                                        at=ahead))
    assert response.status_code == 422, response.get_data(as_text=True)
    issue = response.get_json()["issue"][0]
    assert issue["expression"] == ["Parameters.parameter:at"] and "later than now" in issue["diagnostics"]
    db = connect(app.extensions["gateway.settings"].database_locator, readonly=True)
    assert list_decisions(db) == [] and not [e for e in entries(db) if e.content["kind"] == "decision"]
    soon = (clock() + dt.timedelta(minutes=2)).isoformat()  # a clock a little ahead: decided
    response = authed(app).post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json"),
                                                                        at=soon))
    assert response.status_code == 200, response.get_data(as_text=True)


def test_the_account_that_asked_is_named_in_the_decision_entries(app: Flask) -> None:
    from gateway.audit.log import entries
    from gateway.audit.render import render

    response = authed(app).post("/fhir/$recognize", json=recognize_body(bundle("bundle-lab-tongjiang.json")))
    assert response.status_code == 200, response.get_data(as_text=True)
    db = connect(app.extensions["gateway.settings"].database_locator, readonly=True)
    decided = [e for e in entries(db) if e.content["kind"] == "decision"]
    assert len(decided) == 5
    event = render("decision", decided[0].recorded, decided[0].facts)
    names = [a.get("who", {}).get("display", "") + " " + json.dumps(a.get("who", {}), ensure_ascii=False)
             for a in event["agent"]]
    assert any("his" in n for n in names), event["agent"]
