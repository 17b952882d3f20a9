"""职业卫生 / 放射卫生 technical-service reports: metadata + signed PDF in, a signed Bundle out, decided across 川渝.

Samples: tests/data/service-report/<stem>.json (metadata naming <stem>.pdf beside it), issued by the demo
registry's 重庆渝安职业卫生技术服务有限公司（演示）, which holds 乙级 职业卫生 (DEMO-ZWJ-500000-0012) and 放射卫生
(DEMO-FWJ-500000-0007, 业务范围 放射卫生防护检测 and 个人剂量监测) qualifications from 重庆市卫健委.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path

import pytest

from conftest import DATA, Clock, make_token, validate_fhir
from gateway.cli import cli
from gateway.config import load_settings
from gateway.demo.registry import build_demo_registry
from gateway.pipeline import Pipeline, Status
from gateway.recognition.engine import decide
from gateway.recognition.facts import facts_from_bundle
from gateway.registry.models import Snapshot

CST = _dt.timezone(_dt.timedelta(hours=8))
SAMPLES = DATA / "service-report"
YUAN, YUAN_NAME = "91500105MA5U0A1B2R", "重庆渝安职业卫生技术服务有限公司（演示）"
FL = "12500102MB0002006J"
CDC, CDC_NAME = "12510000MB00030095", "四川省疾病预防控制中心（演示）"
NOW = _dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
STEMS = ("yuan-occupational-hazard-testing", "yuan-radiation-protection-testing", "yuan-personal-dose-monitoring")


def meta(stem: str) -> dict:
    return json.loads((SAMPLES / f"{stem}.json").read_text(encoding="utf-8"))


def pdf(stem: str) -> bytes:
    return (SAMPLES / f"{stem}.pdf").read_bytes()


def json_body(stem: str, **changes: object) -> bytes:
    m = meta(stem)
    m.pop("pdf_file")
    m["pdf"] = base64.b64encode(pdf(stem)).decode("ascii")
    m.update(changes)
    return json.dumps(m, ensure_ascii=False).encode("utf-8")


def multipart_body(stem: str, boundary: str = "----cyhrFormBoundary7MA4YWxkTrZu0gW") -> bytes:
    m = meta(stem)
    m.pop("pdf_file")
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n"
            "Content-Type: application/json\r\n\r\n").encode() + json.dumps(m, ensure_ascii=False).encode() + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"pdf\"; filename=\"{stem}.pdf\"\r\n"
         "Content-Type: application/pdf\r\n\r\n").encode() + pdf(stem) + f"\r\n--{boundary}--\r\n".encode()


@pytest.fixture
def yuan(tmp_path: Path, database: str) -> Pipeline:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "yuan"), "issuer_uscc": YUAN,
                                                    "issuer_name": YUAN_NAME, "database": database})
    p = Pipeline(settings, clock=Clock(NOW))
    yield p
    p.close()


@pytest.fixture(scope="module")
def snapshot() -> Snapshot:
    return Snapshot.from_document(build_demo_registry(NOW).document)


def converted(pipeline: Pipeline, body: bytes):
    return list(pipeline.convert(body, "service-report", "test"))[0]


def report_of(bundle: dict) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")


# -- reading and building --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_samples_convert_from_json_and_multipart_to_the_same_bundle(yuan: Pipeline, stem: str) -> None:
    a, b = converted(yuan, json_body(stem)), converted(yuan, multipart_body(stem))
    assert a.status is Status.CONVERTED and not a.errors, a.issues
    assert a.bundle == b.bundle
    report = report_of(a.bundle)
    form = report["presentedForm"][0]
    data = pdf(stem)
    assert base64.b64decode(form["data"]) == data and form["size"] == len(data)
    assert form["contentType"] == "application/pdf"
    assert form["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
    parts = form["extension"][0]["extension"]
    facts = {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in parts}
    assert facts == {"sha256": hashlib.sha256(data).hexdigest(),
                     "signatureDictionary": stem == "yuan-radiation-protection-testing"}
    m = meta(stem)
    assert report["identifier"][0]["value"] == m["report_number"]
    assert {e["url"].rsplit("/", 1)[1]: e for e in report["extension"]}["service-qualification"][
        "valueIdentifier"]["value"] == m["qualification_number"]
    employer = next(e["resource"] for e in a.bundle["entry"]
                    if e["resource"].get("name") == m["employer"]["name"])
    assert employer["identifier"][0]["value"] == m["employer"]["uscc"]
    assert report["effectivePeriod"]["start"] == m["service_start"]


def test_bundles_pass_the_outside_validators(yuan: Pipeline, tmp_path: Path) -> None:
    paths = []
    for stem in STEMS:
        path = tmp_path / f"{stem}.bundle.json"
        path.write_text(json.dumps(converted(yuan, json_body(stem)).bundle, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    result = validate_fhir(paths)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("changes, location", [
    ({"service_type": "职业健康检查"}, "metadata.service_type"),
    ({"employer": {"name": "某公司", "uscc": "91500112MA5U7F8G9A"}}, "metadata.employer.uscc"),
    ({"employer": None}, "metadata.employer"),
    ({"report_date": "2026-02-30"}, "metadata.report_date"),
    ({"report_date": "2026-09-01"}, "metadata.report_date"),  # before the service started
    ({"qualification_number": ""}, "metadata.qualification_number"),
    ({"project": 12}, "metadata.project"),
    ({"issuer": {"name": "重庆市涪陵中心医院（演示）", "uscc": FL}}, "metadata.issuer.uscc"),
    ({"status": "preliminary"}, "metadata.status"),
    ({"replaces": "YA-JC-2026-0001"}, "metadata.replaces"),
    ({"pdf": base64.b64encode(b"<html>not a pdf</html>").decode()}, "pdf"),
    ({"pdf": base64.b64encode(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n").decode()}, "pdf"),  # cut short
    ({"pdf": "not base64!"}, "pdf"),
    ({"pdf": None}, "pdf"),
])
def test_metadata_and_pdf_errors_are_refused_naming_the_field(yuan: Pipeline, changes: dict, location: str) -> None:
    outcome = converted(yuan, json_body("yuan-occupational-hazard-testing", **changes))
    assert outcome.bundle is None and outcome.ack_code in ("AE", "AR")
    assert location in [i.location for i in outcome.errors], outcome.issues


def test_a_pdf_over_max_message_bytes_is_refused(tmp_path: Path, database: str) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": YUAN,
                                                    "issuer_name": YUAN_NAME, "max_message_bytes": 1024,
                                                    "database": database})
    outcome = converted(Pipeline(settings, clock=Clock(NOW)), json_body("yuan-radiation-protection-testing"))
    assert [i.location for i in outcome.errors] == ["pdf"] and "1024" in outcome.errors[0].message


def test_neither_json_nor_multipart_is_refused() -> None:
    from gateway.adapters.base import RawUnit
    from gateway.adapters.servicereport import ServiceReportAdapter

    msg = ServiceReportAdapter(member_uscc=YUAN, max_pdf_bytes=10_000).read(RawUnit(b"%PDF-1.7 ...", 1))
    assert [(i.code, i.location) for i in msg.errors] == [("structure", "body")]


def form_body(parts: list[tuple[str, bytes]], boundary: str = "----cyhrFormBoundary7MA4YWxkTrZu0gW") -> bytes:
    """A multipart/form-data body of (name, content) parts, in order."""
    out = b""
    for name, content in parts:
        kind = "application/pdf" if name == "pdf" else "text/plain; charset=utf-8"
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n"
                f"Content-Type: {kind}\r\n\r\n").encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def form_fields(stem: str) -> list[tuple[str, bytes]]:
    """The sample's metadata as one form field per key (objects as object.key)."""
    fields = []
    for key, value in meta(stem).items():
        if key == "pdf_file":
            continue
        if isinstance(value, dict):
            fields += [(f"{key}.{k}", str(v).encode()) for k, v in value.items()]
        else:
            fields.append((key, str(value).encode()))
    return fields


def test_metadata_as_form_fields_converts_like_the_json_body(yuan: Pipeline) -> None:
    stem = "yuan-occupational-hazard-testing"
    a = converted(yuan, json_body(stem))
    b = converted(yuan, form_body(form_fields(stem) + [("pdf", pdf(stem))]))
    assert b.status is Status.CONVERTED and not b.errors, b.issues
    assert a.bundle == b.bundle


STEM = "yuan-occupational-hazard-testing"
METADATA = json.dumps({k: v for k, v in meta(STEM).items() if k != "pdf_file"}, ensure_ascii=False).encode()


@pytest.mark.parametrize("parts, location, says", [
    ([("metadata", METADATA), ("pdf", pdf(STEM)), ("pdf", b"%PDF-1.4\n%%EOF\n")], "pdf",
     "parts 2 and 3 of the multipart body are both named pdf"),
    ([("metadata", METADATA), ("metadata", METADATA), ("pdf", pdf(STEM))], "metadata",
     "parts 1 and 2 of the multipart body are both named metadata"),
    ([("metadata", METADATA), ("report_number", b"YA-JC-2099-0001"), ("pdf", pdf(STEM))],
     "metadata.report_number", "metadata.report_number is given twice: by the metadata part (part 1) and by form "
     "field report_number (part 2)"),
    ([("metadata", METADATA), ("employer.name", b"another name"), ("pdf", pdf(STEM))],
     "metadata.employer.name", "metadata.employer is given twice"),
    (form_fields(STEM) + [("report_number", b"YA-JC-2099-0001"), ("pdf", pdf(STEM))],
     "metadata.report_number", "by form field report_number (part 1) and by form field report_number"),
    (form_fields(STEM) + [("employer.uscc", b"91500112MA5U7F8G9A"), ("pdf", pdf(STEM))],
     "metadata.employer.uscc", "metadata.employer.uscc is given twice"),
    ([("employer", b"some text")] + form_fields(STEM) + [("pdf", pdf(STEM))],
     "metadata.employer.name", "metadata.employer is given twice"),
    (form_fields(STEM) + [("employer.address.city", b"Chongqing"), ("pdf", pdf(STEM))],
     "metadata.employer.address.city", "one dot"),
    (form_fields(STEM) + [("employer.", b"x"), ("pdf", pdf(STEM))], "metadata.employer.", "one dot"),
    ([("metadata", METADATA.replace(b"{", b'{"pdf": "JVBERi0=", ', 1)), ("pdf", pdf(STEM))], "metadata.pdf",
     "the part named pdf"),
    ([("metadata", METADATA.replace(b"{", b'{"report_number": "YA-JC-2099-0001", ', 1)), ("pdf", pdf(STEM))],
     "metadata", "gives the key report_number twice"),
], ids=["two-pdf-parts", "two-metadata-parts", "json-and-field", "json-object-and-its-field", "field-twice",
        "object-field-twice", "text-and-object-field", "two-dots", "empty-key", "pdf-in-metadata-part",
        "json-key-twice"])
def test_a_part_or_metadata_key_given_twice_is_refused_naming_it(yuan: Pipeline, parts: list, location: str,
                                                                 says: str) -> None:
    outcome = converted(yuan, form_body(parts))
    assert outcome.bundle is None and outcome.ack_code in ("AE", "AR")
    assert [i.location for i in outcome.errors] == [location], outcome.issues
    assert says in outcome.errors[0].message


def test_a_key_given_twice_in_the_json_body_is_refused(yuan: Pipeline) -> None:
    body = json_body(STEM).replace(b"{", b'{"qualification_number": "DEMO-ZWJ-500000-9999", ', 1)
    outcome = converted(yuan, body)
    assert outcome.bundle is None
    assert [(i.location, i.message) for i in outcome.errors] == [
        ("metadata", "the metadata gives the key qualification_number twice in one object")]


def test_metadata_nested_too_deeply_is_refused(yuan: Pipeline) -> None:
    outcome = converted(yuan, b'{"project": ' + b"[" * 100_000)
    assert [(i.location, i.message) for i in outcome.errors] == [("metadata", "the metadata nests too deeply")]


# -- decisions ---------------------------------------------------------------------------------------------------


def decision(yuan: Pipeline, snapshot: Snapshot, stem: str, at: _dt.datetime = NOW, **changes: object):
    facts = facts_from_bundle(converted(yuan, json_body(stem, **changes)).bundle)
    assert [f.kind for f in facts] == ["document"]
    return decide(facts[0], snapshot, FL, at)


@pytest.mark.parametrize("stem", STEMS)
def test_reports_of_a_qualified_chongqing_institution_are_recognised(yuan, snapshot, stem) -> None:
    d = decision(yuan, snapshot, stem)
    assert d.outcome == "recognized", [r.to_dict() for r in d.rules]
    rule = d.rule("technical-service-qualification")
    # 谁报告、谁负责: the decision names the responsible issuer and its qualification number
    assert rule.facts["issuer"] == YUAN and rule.facts["issuer_name"] == YUAN_NAME
    assert rule.facts["qualification_number"] == meta(stem)["qualification_number"]
    assert d.item is not None and d.item.catalogue_id == "chuanyu-technical-service"
    assert d.rule("mark") is None and d.rule("eqa-pass") is None


def test_a_radiation_report_under_the_occupational_qualification_is_not_recognised(yuan, snapshot) -> None:
    d = decision(yuan, snapshot, "yuan-radiation-protection-testing", qualification_number="DEMO-ZWJ-500000-0012")
    rule = d.rule("technical-service-qualification")
    assert d.outcome == "not-recognized" and rule.status == "failed"
    assert "放射卫生技术服务机构资质" in rule.message


def test_a_service_outside_the_qualification_scope_is_not_recognised(yuan, snapshot) -> None:
    d = decision(yuan, snapshot, "yuan-radiation-protection-testing", service_type="radiation-project-evaluation")
    assert d.rule("technical-service-qualification").status == "failed" and "业务范围" in \
        d.rule("technical-service-qualification").message


def test_an_expired_qualification_and_an_unknown_number_are_not_recognised(yuan, snapshot) -> None:
    # ya-rhs runs to 2028-02-29; a report dated after it (decided within its window) fails
    later = _dt.datetime(2028, 3, 20, 10, 0, tzinfo=CST)
    d = decision(yuan, snapshot, "yuan-personal-dose-monitoring", at=later, service_start="2027-12-01",
                 service_end="2028-02-29", report_date="2028-03-10")
    rule = d.rule("technical-service-qualification")
    assert rule.status == "failed" and "not valid on 2028-03-10" in rule.message
    d = decision(yuan, snapshot, "yuan-personal-dose-monitoring", qualification_number="DEMO-FWJ-999")
    assert d.rule("technical-service-qualification").status == "failed"


def test_a_qualification_not_approved_by_a_chuanyu_authority_is_not_recognised(yuan, snapshot) -> None:
    quals = tuple(dataclasses.replace(q, authority_name="国家卫生健康委员会（演示）", authority_province=None)
                  if q.id == "ya-ohs" else q for q in snapshot.qualifications)
    other = copy.copy(snapshot)
    other.qualifications = quals
    d = decision(yuan, other, "yuan-occupational-hazard-testing")
    rule = d.rule("technical-service-qualification")
    assert d.outcome == "not-recognized" and rule.status == "failed" and "川渝" in rule.message


def test_a_nationally_approved_jia_qualification_counts_across_chuanyu(
        snapshot, tmp_path: Path, database: str) -> None:
    """甲级 qualifications are approved by the national commission and valid nationwide: the DEMO CDC's 甲级 职业卫生
    qualification (no province, level national) covers its report; a 乙级 one needs a 川渝 authority."""
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "cdc"), "issuer_uscc": CDC,
                                                    "issuer_name": CDC_NAME, "database": database})
    cdc = Pipeline(settings, clock=Clock(NOW))
    try:
        body = json_body("yuan-occupational-hazard-testing", issuer={"name": CDC_NAME, "uscc": CDC},
                         report_number="CDC-JC-2026-0007", qualification_number="DEMO-ZWJ-NAT-0001")
        facts = facts_from_bundle(converted(cdc, body).bundle)
    finally:
        cdc.close()
    d = decide(facts[0], snapshot, FL, NOW)
    rule = d.rule("technical-service-qualification")
    assert d.outcome == "recognized" and rule.status == "passed", (rule.message, [r.to_dict() for r in d.rules])
    assert "national approval, valid nationwide" in rule.message and rule.facts["qualification"]["id"] == "cdc-ohs"
    assert rule.facts["qualification"]["national_approval"] is True

    # the same qualification graded 乙 (a provincial grade) with no 川渝 province is not enough
    quals = tuple(dataclasses.replace(q, grade="乙") if q.id == "cdc-ohs" else q for q in snapshot.qualifications)
    other = copy.copy(snapshot)
    other.qualifications = quals
    rule = decide(facts[0], other, FL, NOW).rule("technical-service-qualification")
    assert rule.status == "failed" and "乙级 qualifications are approved by a province" in rule.message
    # a 甲级 marked as approved by a province outside 川渝 is not national either
    quals = tuple(dataclasses.replace(q, authority_name="广东省卫生健康委员会（演示）", authority_province="44",
                                      authority_level="provincial") if q.id == "cdc-ohs" else q
                  for q in snapshot.qualifications)
    other.qualifications = quals
    rule = decide(facts[0], other, FL, NOW).rule("technical-service-qualification")
    assert rule.status == "failed" and "not by the national health commission" in rule.message


def test_a_report_that_names_no_qualification_needs_review(yuan, snapshot) -> None:
    """A Bundle from elsewhere (another member's gateway, a FHIR client) whose report lacks the qualification
    number cannot be checked: needs-review, never a guess."""
    bundle = copy.deepcopy(converted(yuan, json_body("yuan-occupational-hazard-testing")).bundle)
    report = report_of(bundle)
    report["extension"] = [e for e in report["extension"] if not e["url"].endswith("/service-qualification")]
    facts = facts_from_bundle(bundle)
    d = decide(facts[0], snapshot, FL, NOW)
    rule = d.rule("technical-service-qualification")
    assert rule.status == "not-evaluable" and d.outcome == "needs-review", rule


def test_the_window_runs_from_the_report_date(yuan, snapshot) -> None:
    # 个人剂量监测: 90 days from 2026-10-15, valid through 2027-01-13
    assert decision(yuan, snapshot, "yuan-personal-dose-monitoring",
                    at=_dt.datetime(2027, 1, 13, 23, 0, tzinfo=CST)).outcome == "recognized"
    late = decision(yuan, snapshot, "yuan-personal-dose-monitoring", at=_dt.datetime(2027, 1, 14, 9, 0, tzinfo=CST))
    assert late.rule("validity-window").status == "failed"
    assert late.rule("validity-window").facts["anchor_from"] == "DiagnosticReport.extension:reportDate"


# -- HTTP and CLI --------------------------------------------------------------------------------------------------


@pytest.fixture
def yuan_client(yuan: Pipeline):
    from gateway.api.app import create_app

    app = create_app(yuan.settings, yuan)
    app.config["TESTING"] = True
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, 'ohs-system', ['submitter'])}"
    return c


def test_http_ingest_takes_multipart_and_json_and_stores_the_raw_body(yuan, yuan_client) -> None:
    body = multipart_body("yuan-radiation-protection-testing")
    resp = yuan_client.post("/ingest/service-report", data=body,
                            content_type="multipart/form-data; boundary=----cyhrFormBoundary7MA4YWxkTrZu0gW")
    assert resp.status_code == 200, resp.data
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome" and "stored" in outcome["issue"][0]["diagnostics"]
    [rec] = yuan.store.list_messages()
    assert rec.format == "service-report" and yuan.store.raw_of(rec.id) == body  # stored as received
    resp = yuan_client.post("/ingest/service-report", data=json_body("yuan-personal-dose-monitoring"),
                            content_type="application/json")
    assert resp.status_code == 200
    resp = yuan_client.post("/ingest/service-report", content_type="application/json",
                            data=json_body("yuan-personal-dose-monitoring", report_number="YA-2",
                                           employer={"name": "x", "uscc": "123"}))
    assert resp.status_code == 422
    assert any(i.get("expression") == ["metadata.employer.uscc"] or "metadata.employer.uscc" in json.dumps(i)
               for i in resp.get_json()["issue"])


def test_cli_converts_a_metadata_file_naming_its_pdf(runner, tmp_path: Path) -> None:
    env = {"GATEWAY_DATA_DIR": str(tmp_path), "GATEWAY_ISSUER_USCC": YUAN, "GATEWAY_ISSUER_NAME": YUAN_NAME}
    result = runner.invoke(cli, ["convert", "--format", "service-report",
                                 str(SAMPLES / "yuan-occupational-hazard-testing.json")], env=env)
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout.splitlines()[0])
    assert base64.b64decode(report_of(bundle)["presentedForm"][0]["data"]) == pdf("yuan-occupational-hazard-testing")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**meta("yuan-occupational-hazard-testing"), "pdf_file": "missing.pdf"}))
    result = runner.invoke(cli, ["convert", "--format", "service-report", str(bad)], env=env)
    assert result.exit_code != 0 and "metadata.pdf_file" in result.output + (result.stderr or "")


# -- exchange ------------------------------------------------------------------------------------------------------


def signing_yuan(tmp_path: Path, database: str):
    """(the demo world with 涪陵, 渝安's signing gateway pushing to it through the real Flask apps).

    On PostgreSQL (``database`` a URL) each gateway has a schema of its own."""
    from test_exchange import URLS, Routed

    from gateway.api.app import create_app
    from gateway.demo.world import build_world
    from gateway.signing.keys import cert_pem, private_key_pem

    clock = Clock(NOW)
    per_member = (lambda key: f"{database}_{key}") if database else None
    world = build_world(tmp_path, clock, URLS, members=("fuling",), database=per_member)
    home = tmp_path / "yuan"
    (home / "keys").mkdir(parents=True)
    key = home / "keys" / "k.pem"
    key.write_bytes(private_key_pem(world.registry.member_keys[YUAN]))
    key.chmod(0o600)
    (home / "keys" / "c.pem").write_bytes(cert_pem(world.registry.member_certs[YUAN]))
    settings = load_settings(environ={}, overrides={
        "data_dir": str(home), "issuer_uscc": YUAN, "issuer_name": YUAN_NAME,
        "registry_snapshot": str(tmp_path / "registry" / "snapshot.json"),
        "registry_authority": str(tmp_path / "registry" / "authority.pem"),
        "signing_key": str(key), "signing_cert": str(home / "keys" / "c.pem"),
        "public_url": "https://yuan-ohs.demo.example", "database": f"{database}_yuan" if database else ""})
    pipeline = Pipeline(settings, clock=clock)
    transport = Routed(world)
    pipeline.exchange.transport = transport
    create_app(settings, pipeline)
    return world, pipeline


def test_a_signed_report_is_pushed_verified_decided_and_audited(tmp_path: Path, database: str) -> None:
    from gateway.audit.log import entries

    world, pipeline = signing_yuan(tmp_path, database)
    [outcome] = pipeline.ingest(json_body("yuan-radiation-protection-testing"), "service-report", channel="http")
    assert outcome.status is Status.STORED and outcome.signed is not None
    row = pipeline.exchange.push(outcome.bundle["id"], FL)
    assert pipeline.exchange.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    receipt = pipeline.exchange.outbox.get(row).receipt
    assert receipt["issuer"] == YUAN and receipt["decisions"] == {"recognized": 1}
    fl = world.gateways["fuling"].pipeline
    decisions = [e for e in entries(fl.store.db) if e.kind == "decision"]
    assert len(decisions) == 1
    text = json.dumps(decisions[0].content, ensure_ascii=False)
    assert YUAN in text and "DEMO-FWJ-500000-0007" in text


def test_a_corrected_report_supersedes_the_original_here_and_where_it_was_pushed(
        tmp_path: Path, database: str) -> None:
    """A 更正报告 (status corrected, under a number of its own, replaces naming the original's number)
    supersedes the original: tagged, no longer found by its number, its decisions withdrawn, and the correction
    follows the original to the member it was pushed to."""
    from gateway.recognition.store import list_decisions
    from gateway.store.reports import versions_of

    stem = "yuan-occupational-hazard-testing"
    world, yuan = signing_yuan(tmp_path, database)
    fl = world.gateways["fuling"].pipeline
    [original] = yuan.ingest(json_body(stem), "service-report", channel="http")
    assert original.status is Status.STORED
    yuan.exchange.push(original.bundle["id"], FL)
    assert yuan.exchange.deliver()["delivered"] == 1
    assert [d.decision["outcome"] for d in list_decisions(fl.store.db)] == ["recognized"]

    corrected_pdf = pdf(stem) + b"% corrected: sampling point 3 re-measured\n%%EOF\n"
    [correction] = yuan.ingest(json_body(stem, report_number="YA-JC-2026-0312-GZ1", status="corrected",
                                         replaces="YA-JC-2026-0312",
                                         pdf=base64.b64encode(corrected_pdf).decode("ascii")),
                               "service-report", channel="http")
    assert correction.status is Status.STORED, correction.issues
    old_id, new_id = report_of(original.bundle)["id"], report_of(correction.bundle)["id"]
    assert old_id != new_id
    versions = [*versions_of(yuan.store.db, YUAN, "YA-JC-2026-0312"),
                *versions_of(yuan.store.db, YUAN, "YA-JC-2026-0312-GZ1")]
    assert [(v.report_ref, v.superseded_by is not None) for v in versions] == [
        (f"DiagnosticReport/{old_id}", True), (f"DiagnosticReport/{new_id}", False)]
    old = yuan.store.read("DiagnosticReport", old_id)
    assert old["status"] == "final" and [t["code"] for t in old["meta"]["tag"]] == ["superseded"]
    system = report_of(original.bundle)["identifier"][0]["system"]
    assert yuan.store.search("DiagnosticReport", [("identifier", f"{system}|YA-JC-2026-0312")]).total == 0
    found = yuan.store.search("DiagnosticReport", [("identifier", f"{system}|YA-JC-2026-0312-GZ1")])
    assert [r["id"] for r in found.resources] == [new_id]

    # the correction follows the original to 涪陵, where the decision on the original is withdrawn
    assert yuan.exchange.pushed_to(correction.bundle["id"]) == [FL]
    assert yuan.exchange.deliver()["delivered"] == 1
    decisions = [d.to_dict() for d in list_decisions(fl.store.db)]
    withdrawn = [d for d in decisions if d.get("withdrawn")]
    current = [d for d in decisions if not d.get("withdrawn")]
    assert len(withdrawn) == 1 and withdrawn[0]["decided_outcome"] == "recognized"
    assert withdrawn[0]["withdrawn"]["superseded_by"].startswith(f"DiagnosticReport/{new_id}")
    assert [d["outcome"] for d in current] == ["recognized"]


def test_a_correction_keeping_the_number_is_a_version_of_the_same_report(yuan: Pipeline) -> None:
    """Versions are told by issuer and the service-report number (system …/sid/service-report/<USCC>), as a
    检验报告单号 is: a correction under the original's own number supersedes it."""
    from gateway.store.db import transaction
    from gateway.store.reports import register, versions_in

    stem = "yuan-personal-dose-monitoring"
    original = converted(yuan, json_body(stem)).bundle
    corrected_pdf = pdf(stem) + b"% corrected: dosimeter 12 re-read\n%%EOF\n"
    correction = converted(yuan, json_body(stem, status="corrected", replaces=meta(stem)["report_number"],
                                           pdf=base64.b64encode(corrected_pdf).decode("ascii"))).bundle
    [found] = versions_in(original)
    assert (found["issuer_uscc"], found["report_number"]) == (YUAN, meta(stem)["report_number"])
    assert found["replaces"] == ""  # its own number: no other report joined to it
    with transaction(yuan.store.db):
        assert register(yuan.store.db, original, direction="issued", message_ref=None, recorded_at="t1") == []
        [change] = register(yuan.store.db, correction, direction="issued", message_ref=None, recorded_at="t2")
    assert change.old.report_ref == f"DiagnosticReport/{report_of(original)['id']}"
    assert change.current.report_ref == f"DiagnosticReport/{report_of(correction)['id']}"


def test_a_correction_keeping_the_number_is_taken_at_intake_and_supersedes(yuan: Pipeline) -> None:
    """Through real ingest: the correction under the original's own number is not a resend of the original (its
    PDF tells it apart), is stored, and supersedes the original; sent again, it is a resend."""
    from gateway.store.reports import versions_of

    stem = "yuan-personal-dose-monitoring"
    [original] = yuan.ingest(json_body(stem), "service-report", channel="http")
    assert original.status is Status.STORED
    corrected_pdf = pdf(stem) + b"% corrected: dosimeter 12 re-read\n%%EOF\n"
    body = json_body(stem, status="corrected", replaces=meta(stem)["report_number"],
                     pdf=base64.b64encode(corrected_pdf).decode("ascii"))
    [correction] = yuan.ingest(body, "service-report", channel="http")
    assert correction.status is Status.STORED, correction.issues
    versions = versions_of(yuan.store.db, YUAN, meta(stem)["report_number"])
    assert [v.superseded_by is not None for v in versions] == [True, False]
    [again] = yuan.ingest(body, "service-report", channel="http")
    assert again.status is Status.DUPLICATE


def test_a_correction_with_the_same_pdf_and_no_replaces_is_a_version_of_its_own(yuan: Pipeline) -> None:
    """A correction sent with the PDF of the report it corrects (its metadata fixed) and no ``replaces``: it was
    stored over the original as the same Bundle, no version of its own, so nothing superseded and nothing sent on
    to the members the original went to (and warned cyhr-dr-2). It names its own number as the report it replaces
    and is a version of its own, superseding the original."""
    from gateway.store.reports import versions_of

    stem = "yuan-personal-dose-monitoring"
    [original] = yuan.ingest(json_body(stem), "service-report", channel="http")
    assert original.status is Status.STORED
    [correction] = yuan.ingest(json_body(stem, status="corrected"), "service-report", channel="http")
    assert correction.status is Status.STORED, correction.issues
    assert correction.bundle["id"] != original.bundle["id"]
    assert not [i for i in correction.issues if "cyhr-dr-2" in i.message], correction.issues
    versions = versions_of(yuan.store.db, YUAN, meta(stem)["report_number"])
    assert [v.superseded_by is not None for v in versions] == [True, False]


def test_a_report_dated_in_the_future_is_said(yuan: Pipeline) -> None:
    """A report date months ahead was taken without a word (a CDC export's is warned about)."""
    ahead = converted(yuan, json_body("yuan-personal-dose-monitoring", report_date="2099-03-01"))
    said = [i for i in ahead.issues if i.location == "metadata.report_date"]
    assert said and said[0].severity == "warning" and "in the future by this gateway's clock" in said[0].message
