"""A received Bundle is known by what its signature covers, not by its bytes.

Re-serialised copies (pretty-printed, keys re-ordered, another Bundle.id or meta,
which the signature leaves out) and concurrent pushes of one Bundle are stored,
decided and audited once and answered with the same signed receipt; a copy with a
broken signature is refused without touching the Bundle received; a push left
unfinished by a dead process is worked again when it is sent again. Results whose
date is not precise to the day (OBR-7 ``202406``) are stored, signed and pushed,
without a recognition mark.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from conftest import Clock
from gateway.audit.log import entries
from gateway.demo import MEMBERS
from gateway.demo.world import build_world
from gateway.recognition.engine import result_day
from gateway.signing.canonical import parse_json
from gateway.store.store import lease_owner

CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc
URLS = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
LIS = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"


@pytest.fixture
def world(tmp_path, member_database):
    return build_world(tmp_path, Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)), URLS,
                       members=("tongjiang", "fuling"), database=member_database)


def first_message(when: str | None = None) -> bytes:
    """通江's blood count (4 results), its collection time (OBR-7, SPM-17) replaced by ``when``."""
    framed = LIS.read_bytes()  # MLLP frames: VT message FS CR
    message = framed[framed.index(b"\x0b") + 1:framed.index(b"\x1c")]
    if when is not None:
        message = message.replace(b"20261120073000", when.encode()).replace(b"TJ2611200001", b"TJP" + when.encode())
    return message


def signed_report(world, when: str | None = None) -> bytes:
    outcomes = world.gateways["tongjiang"].pipeline.ingest(first_message(when), "hl7v2", channel="mllp")
    signed = [o.signed for o in outcomes if o.signed is not None]
    assert len(signed) == 1, [getattr(o, "issues", None) for o in outcomes]
    return signed[0]


def push(world, payload: bytes, url: str | None = None):
    ex = world.gateways["tongjiang"].pipeline.exchange
    headers = ex.assertion_for(world.gateways["fuling"].url + "/exchange/bundles")
    if url is not None:
        return requests.post(url, data=payload, headers=headers, timeout=60)
    return world.gateways["fuling"].app.test_client().post("/exchange/bundles", data=payload, headers=headers)


def body_of(resp) -> bytes:
    return resp.content if isinstance(resp, requests.Response) else resp.data


def counts(world) -> dict[str, int]:
    db = world.gateways["fuling"].pipeline.store.db
    kinds = [e.kind for e in entries(db)]
    one = db.execute
    return {
        "messages": one("SELECT count(*) FROM messages WHERE format = 'fhir-signed'").fetchone()[0],
        "received": one("SELECT count(*) FROM signed_bundles WHERE direction = 'received'").fetchone()[0],
        "decisions": one("SELECT count(*) FROM recognition_decisions").fetchone()[0],
        "reports": world.gateways["fuling"].pipeline.store.search("DiagnosticReport", []).total,
        "exchange_audit": kinds.count("exchange"),
        "decision_audit": kinds.count("decision"),
    }


def copies(signed: bytes) -> dict[str, bytes]:
    """Other serialisations of the same signed Bundle, and ones with another id or meta."""
    doc = json.loads(signed)
    reordered = {k: doc[k] for k in reversed(list(doc))}
    reordered["entry"] = [{k: e[k] for k in reversed(list(e))} for e in doc["entry"]]
    return {
        "pretty": json.dumps(doc, ensure_ascii=False, indent=2).encode(),
        "ascii-escaped": json.dumps(doc, ensure_ascii=True).encode(),
        "reordered": json.dumps(reordered, ensure_ascii=False).encode(),
        "other-id": json.dumps({**doc, "id": "another-id"}, ensure_ascii=False).encode(),
        "other-meta": json.dumps({**doc, "meta": {"versionId": "7", "tag": [{"code": "x"}]}}).encode(),
        "no-meta": json.dumps({k: v for k, v in doc.items() if k != "meta"}).encode(),
    }


def test_re_serialised_copies_are_the_same_bundle(world) -> None:
    signed = signed_report(world)
    first = push(world, signed)
    assert first.status_code == 200 and first.headers["X-Duplicate"] == "false"
    once = counts(world)
    assert once["messages"] == once["received"] == once["reports"] == once["exchange_audit"] == 1
    assert once["decisions"] == once["decision_audit"] == 4
    for name, copy in copies(signed).items():
        assert copy != signed
        again = push(world, copy)
        assert again.status_code == 200, (name, again.data)
        assert again.data == first.data, name  # the same signed receipt, byte for byte
        assert again.headers["X-Duplicate"] == "true", name
    assert counts(world) == once


def test_a_copy_with_a_broken_signature_is_refused_and_changes_nothing(world) -> None:
    signed = signed_report(world)
    first = push(world, signed)
    once = counts(world)
    doc = json.loads(signed)
    doc["signature"]["data"] = doc["signature"]["data"][:-8] + "AAAAAAA="
    forged = push(world, json.dumps(doc).encode())
    assert forged.status_code == 401 and forged.data != first.data
    fl = world.gateways["fuling"].pipeline.store
    stored = fl.find_message("fhir-signed", TJ, json.loads(first.data)["receipt"]["sha256"])
    assert stored is not None and stored.status == "stored" and stored.ack == first.data
    after = counts(world)
    assert after["exchange_audit"] == once["exchange_audit"] + 1  # the refusal is audited
    assert after["messages"] == once["messages"] + 1  # and its bytes kept apart, as refused
    assert {k: v for k, v in after.items() if k not in ("exchange_audit", "messages")} == \
        {k: v for k, v in once.items() if k not in ("exchange_audit", "messages")}
    assert push(world, signed).data == first.data  # the genuine Bundle is still answered as before


def test_a_refused_copy_is_kept_apart_when_the_genuine_bundle_is_accepted_after_it(world) -> None:
    """A copy refused after its signature verified (``signature.who``, which the signature does not cover, names
    another member) is the same document: when the genuine copy is accepted after it, the stored message carries
    the accepted bytes, and the refused bytes are kept apart, as refused."""
    signed = signed_report(world)
    doc = json.loads(signed)
    doc["signature"]["who"]["identifier"]["value"] = FL
    forged = json.dumps(doc, ensure_ascii=False).encode()
    assert push(world, forged).status_code == 403
    first = push(world, signed)
    assert first.status_code == 200 and first.headers["X-Duplicate"] == "false"
    fl = world.gateways["fuling"].pipeline.store
    stored = fl.find_message("fhir-signed", TJ, json.loads(first.data)["receipt"]["sha256"])
    assert stored is not None and stored.status == "stored" and fl.raw_of(stored.id) == signed
    apart = fl.find_message("fhir-signed", TJ, hashlib.sha256(forged).hexdigest())
    assert apart is not None and apart.status == "refused" and fl.raw_of(apart.id) == forged
    assert "Bundle.signature.who" in json.dumps(apart.issues)
    c = counts(world)
    assert c["received"] == c["reports"] == 1 and c["decisions"] == c["decision_audit"] == 4
    assert push(world, signed).data == first.data


def test_a_received_bundle_is_known_by_its_signed_identifier_not_its_id(world) -> None:
    """Bundle.id is outside the signature: a member's signed Bundle sent with the id of another Bundle verifies all
    the same. Stored under that id, one id named two documents about different reports (the receipt, a referral's
    evidence, the report's versions named the wrong one); refusing such a copy let one sent first under a Bundle's
    id not received yet block the genuine Bundle for good. A received Bundle is known by its signed identifier."""
    r1 = signed_report(world)
    framed = first_message("20261120081500").replace(b"R2611200001", b"R2611200002")  # another report
    [r2] = [o.signed for o in world.gateways["tongjiang"].pipeline.ingest(framed, "hl7v2", channel="mllp")]
    one, two = json.loads(r1), json.loads(r2)
    db = world.gateways["fuling"].pipeline.store.db

    def held(bundle_id: str) -> int:
        return db.execute("SELECT count(*) FROM signed_bundles WHERE bundle_id = ?", [bundle_id]).fetchone()[0]

    # report 2 sent first under report 1's id (not received yet): known by its own identifier
    early = push(world, json.dumps({**two, "id": one["id"]}, ensure_ascii=False).encode())
    assert early.status_code == 200, body_of(early)
    assert json.loads(body_of(early))["receipt"]["bundle"] == two["id"]
    genuine = push(world, r1)  # the genuine report 1, under its own id: taken as usual
    assert genuine.status_code == 200 and genuine.headers["X-Duplicate"] == "false", body_of(genuine)
    assert json.loads(body_of(genuine))["receipt"]["bundle"] == one["id"]
    again = push(world, r2)  # report 2 under its own id: the same document, answered as before
    assert again.status_code == 200 and again.headers["X-Duplicate"] == "true" and again.data == early.data
    later = push(world, json.dumps({**one, "id": two["id"]}, ensure_ascii=False).encode())  # report 1 under 2's id
    assert later.status_code == 200 and later.data == genuine.data
    assert held(one["id"]) == held(two["id"]) == 1
    assert {r[0] for r in db.execute("SELECT bundle_id FROM report_versions WHERE direction = 'received'")} == \
        {one["id"], two["id"]}


def test_a_bundle_whose_identifier_names_another_report_received_before_is_refused(world) -> None:
    """An issuer that signs another report's Bundle under an identifier it gave a Bundle before: one name would stand
    for two reports here, so the second is refused (409, naming Bundle.identifier), kept apart and audited."""
    r1 = signed_report(world)
    framed = first_message("20261120081500").replace(b"R2611200001", b"R2611200002")  # another report
    tj = world.gateways["tongjiang"].pipeline
    [outcome] = tj.ingest(framed, "hl7v2", channel="mllp")
    reused = {k: v for k, v in json.loads(outcome.signed).items() if k != "signature"}
    reused["identifier"] = json.loads(r1)["identifier"]
    assert push(world, r1).status_code == 200
    once = counts(world)
    refused = push(world, tj.member.require_signer().sign(reused))
    assert refused.status_code == 409, body_of(refused)
    [issue] = json.loads(body_of(refused))["issue"]
    assert issue["code"] == "conflict" and issue["expression"] == ["Bundle.identifier"]
    after = counts(world)
    assert after["exchange_audit"] == once["exchange_audit"] + 1 and after["messages"] == once["messages"] + 1
    assert {k: after[k] for k in ("received", "reports", "decisions")} == \
        {k: once[k] for k in ("received", "reports", "decisions")}


def test_a_receiver_whose_public_url_is_not_its_registry_address_takes_calls_at_both(world, monkeypatch) -> None:
    """Other members address a gateway as the registry lists it; one whose public_url says another address (a proxy
    in front of it, a name written otherwise) refused every delivery as being for another audience, and said only
    that. It takes calls at either address, says the difference when it starts, and a call for a third address is
    refused naming what it takes."""
    import dataclasses
    from types import SimpleNamespace

    import gateway.serve as serve_module
    from gateway.exchange.peer_auth import make_assertion
    from gateway.serve import _warn_of_the_address

    receiver = world.gateways["fuling"].pipeline
    ex = receiver.exchange
    ex.settings = dataclasses.replace(ex.settings, public_url="http://fuling-proxy.test:8443")
    signed = signed_report(world)
    assert push(world, signed).status_code == 200  # addressed as the registry lists it
    warned: list[str] = []
    monkeypatch.setattr(serve_module, "log", SimpleNamespace(warning=lambda fmt, *args: warned.append(fmt % args)))
    _warn_of_the_address(receiver)  # (said at the start of gateway serve)
    [said] = warned
    assert "registry lists this member at http://fuling.test" in said and "http://fuling-proxy.test:8443" in said
    ident = world.gateways["tongjiang"].pipeline.member.require_signer().identity
    token = make_assertion(ident.key, list(ident.chain), issuer_uscc=ident.uscc, audience="http://elsewhere/exchange",
                           now=receiver.clock())
    refused = world.gateways["fuling"].app.test_client().post(
        "/exchange/bundles", data=signed, headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    text = json.loads(refused.data)["issue"][0]["diagnostics"]
    assert "http://elsewhere/exchange" in text and "http://fuling.test/exchange" in text
    assert "http://fuling-proxy.test:8443/exchange" in text


def test_unreadable_push_is_refused_with_a_field_and_kept(world) -> None:
    for text in (b"[" * 100_000, b'{"resourceType": "Bundle", "n": 1' + b"0" * 5000 + b"}", b"\xff\xfe"):
        resp = push(world, text)
        assert 400 <= resp.status_code < 500, resp.data
        assert resp.get_json()["resourceType"] == "OperationOutcome"
    db = world.gateways["fuling"].pipeline.store.db
    assert db.execute("SELECT count(*) FROM messages WHERE status = 'refused'").fetchone()[0] == 3


@pytest.fixture
def served(world):
    """涪陵's gateway app on a threaded loopback server."""
    server = make_server("127.0.0.1", 0, world.gateways["fuling"].app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/exchange/bundles"
    server.shutdown()
    thread.join(timeout=10)


def test_concurrent_pushes_of_one_bundle_are_worked_once(world, served) -> None:
    signed = signed_report(world)
    variants = [signed, *copies(signed).values()]
    answers: list[requests.Response] = []
    gate = threading.Barrier(8)

    def one(i: int) -> None:
        payload = variants[i % len(variants)] if i % 2 else signed
        ex = world.gateways["tongjiang"].pipeline.exchange
        headers = ex.assertion_for(world.gateways["fuling"].url + "/exchange/bundles")
        gate.wait()
        answers.append(requests.post(served, data=payload, headers=headers, timeout=60))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:200] for a in answers]
    assert len({a.content for a in answers}) == 1  # one receipt for all
    assert sorted(a.headers["X-Duplicate"] for a in answers) == ["false"] + ["true"] * 7
    c = counts(world)
    assert c["messages"] == c["received"] == c["reports"] == c["exchange_audit"] == 1
    assert c["decisions"] == c["decision_audit"] == 4


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_a_push_left_unfinished_by_a_dead_process_is_worked_when_sent_again(world) -> None:
    signed = signed_report(world)
    fl = world.gateways["fuling"].pipeline
    digest = world.gateways["tongjiang"].pipeline.member.require_signer().sign_with_digest(parse_json(signed))[1]
    host = lease_owner().rpartition(":")[0]
    record_id, _ = fl.store.insert_raw(channel="exchange", fmt="fhir-signed", sender=TJ, message_id=digest,
                                       origin=f"peer:{TJ}", raw=signed, lease=300)
    fl.store.db.execute("UPDATE messages SET lease_owner = ? WHERE id = ?", [f"{host}:{dead_pid()}", record_id])
    resp = push(world, signed)
    assert resp.status_code == 200 and resp.headers["X-Duplicate"] == "false"
    assert fl.store.get_message(record_id).status == "stored"
    assert counts(world)["decisions"] == 4


def test_a_push_held_by_a_live_worker_is_answered_retry_later(world) -> None:
    signed = signed_report(world)
    fl = world.gateways["fuling"].pipeline
    digest = world.gateways["tongjiang"].pipeline.member.require_signer().sign_with_digest(parse_json(signed))[1]
    record_id, _ = fl.store.insert_raw(channel="exchange", fmt="fhir-signed", sender=TJ, message_id=digest,
                                       origin=f"peer:{TJ}", raw=signed, lease=300)  # held by this live process
    fl.busy_wait = 0.3
    busy = push(world, signed)
    assert busy.status_code == 503 and busy.get_json()["resourceType"] == "OperationOutcome"
    fl.store.release(record_id)
    assert push(world, signed).status_code == 200
    assert counts(world)["decisions"] == 4


@pytest.mark.parametrize("when", ["202406", "2024", "20240605"])
def test_partial_result_dates_are_stored_signed_and_pushed_without_marks(world, when: str) -> None:
    signed = signed_report(world, when)
    doc = parse_json(signed)
    observations = [e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(observations) == 4
    for obs in observations:
        assert not any(x.get("url", "").endswith("recognition-mark") for x in obs.get("extension", []))
    resp = push(world, signed)
    assert resp.status_code == 200
    decisions = json.loads(resp.data)["receipt"]["decisions"]
    assert sum(decisions.values()) == 4 and "recognized" not in decisions


def test_result_day_reads_dates_as_the_rules_do() -> None:
    assert result_day("2024-06-05") == (_dt.date(2024, 6, 5), None)
    assert result_day("2024-06-05T23:30:00-05:00")[0] == _dt.date(2024, 6, 6)  # the day in China
    for partial in ("2024-06", "2024"):
        day, why = result_day(partial)
        assert day is None and "not precise to the day" in str(why)
    for bad in ("2024-06-05T10:00:00", "9999-12-31T23:00:00-05:00", "2024-13-01", None):
        assert result_day(bad)[0] is None and result_day(bad)[1]


def test_outbox_retry_puts_back_several_deliveries_or_every_dead_one(tmp_path) -> None:
    """An operator with several dead deliveries (a receiver refused them all while misconfigured) puts them back
    at once: by their ids, or every dead one (to one member); one line each, exit 1 if any could not be."""
    import sqlite3
    from contextlib import closing

    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.demo.world import leave_configs

    now = _dt.datetime.now(CST)
    world = build_world(tmp_path, Clock(now), URLS, members=("tongjiang", "fuling"))
    configs = leave_configs(world, now)
    ex = world.gateways["tongjiang"].pipeline.exchange
    rows = [ex.outbox.enqueue(FL, "http://127.0.0.1:1/exchange/bundles", f"payload {n}".encode()) for n in range(3)]
    world.gateways["tongjiang"].pipeline.close()
    with closing(sqlite3.connect(tmp_path / "tongjiang" / "gateway.db")) as conn, conn:
        conn.executemany("UPDATE outbox SET status = 'dead' WHERE id = ?", [(r,) for r in rows])

    def run(*args: str):
        return CliRunner().invoke(cli, ["--config", str(configs["tongjiang"]), "outbox", "retry", *args])

    both = run(str(rows[0]), str(rows[1]))
    assert both.exit_code == 0, both.output
    assert [line.split(" is pending again")[0] for line in both.output.splitlines()] == \
        [f"outbox #{rows[0]}", f"outbox #{rows[1]}"]
    rest = run("--dead", "--to", FL)
    assert rest.exit_code == 0 and rest.output.startswith(f"outbox #{rows[2]} is pending again"), rest.output
    assert run("--dead").output.strip() == "no dead deliveries"
    unknown = run(str(rows[0]), "999")
    assert unknown.exit_code == 1 and f"outbox #{rows[0]} is pending again" in unknown.output
    assert "outbox #999" in unknown.output
    assert run().exit_code == 2 and run("--to", FL).exit_code == 2
    assert run("--dead", "--to", "NOTAUSCC").exit_code == 2


def test_a_received_bundles_audit_entries_carry_the_time_it_was_received(world) -> None:
    """The receipt's time, the ``received`` entry's and its decisions' are one: an auditor reading the log in order
    never meets a decision dated before the Bundle it decided was received, however long the work took."""
    signed = signed_report(world)
    fuling = world.gateways["fuling"].pipeline
    start = fuling.clock()
    ticks = iter(range(1, 10_000))
    fuling.clock = lambda: start + _dt.timedelta(milliseconds=next(ticks))  # each reading a millisecond later
    resp = push(world, signed)
    assert resp.status_code == 200, resp.data
    receipt = parse_json(body_of(resp))["receipt"]
    got = [(e.kind, e.content["recorded"]) for e in entries(fuling.store.db) if e.kind in ("exchange", "decision")]
    assert [k for k, _ in got] == ["exchange"] + ["decision"] * (len(got) - 1) and len(got) > 1, got
    times = {t for _, t in got}
    assert len(times) == 1, got
    assert _dt.datetime.fromisoformat(times.pop()) == _dt.datetime.fromisoformat(receipt["received"])


def test_the_access_log_names_the_member_that_called(world, caplog) -> None:
    """A push, a referral and a 调阅 are logged with the calling member (``user=member:USCC``), as a user's request
    is with the account's name; a caller refused is logged without one."""
    from werkzeug.test import Client

    from gateway.httpserver import access_log

    signed = signed_report(world)
    ex = world.gateways["tongjiang"].pipeline.exchange
    client = Client(access_log(world.gateways["fuling"].app))
    caplog.set_level("INFO", logger="gateway.access")
    url = world.gateways["fuling"].url + "/exchange"
    assert client.post("/exchange/bundles", data=signed,
                       headers=ex.assertion_for(url + "/bundles")).status_code == 200
    assert client.get("/exchange/DiagnosticReport", query_string={"patient.identifier": "x|1"},
                      headers=ex.assertion_for(url + "/DiagnosticReport")).status_code == 200
    assert client.post("/exchange/bundles", data=signed, headers={"Authorization": "Bearer nonsense"}
                       ).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 3, lines
    assert f"user=member:{TJ} " in lines[0] and f"user=member:{TJ} " in lines[1], lines
    assert "user=- " in lines[2], lines
    assert [getattr(r, "user", None) for r in caplog.records if r.name == "gateway.access"] == [
        f"member:{TJ}", f"member:{TJ}", None]


@pytest.mark.parametrize("path", ["/exchange/bundles", "/exchange/tasks"])
def test_an_empty_push_or_one_sent_as_another_media_type_is_refused_as_such(world, path: str) -> None:
    """An empty body is a 400 (nothing to read, code ``required``); a body sent as text, a form (what ``curl -d``
    sends unless told) or FHIR XML is a 415 naming the type to send; FHIR JSON under any of its names, or no
    Content-Type at all, is read. Nothing refused this way is kept: there was nothing, or nothing readable as sent."""
    signed = signed_report(world)
    ex = world.gateways["tongjiang"].pipeline.exchange
    client = world.gateways["fuling"].app.test_client()
    url = world.gateways["fuling"].url + path

    def post(data: bytes, content_type: str | None):
        headers = ex.assertion_for(url)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return client.post(path, data=data, headers=headers)

    db = world.gateways["fuling"].pipeline.store.db
    before = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    empty = post(b"  \r\n", "application/fhir+json")
    assert empty.status_code == 400, empty.data
    issue = empty.get_json()["issue"][0]
    assert issue["code"] == "required" and issue["expression"] == ["body"]
    assert issue["diagnostics"].startswith("body is empty: send the signed "), issue
    for sent in ("text/plain", "application/x-www-form-urlencoded", "application/fhir+xml",
                 "application/fhir+json; fhirVersion=3.0"):
        resp = post(signed, sent)
        assert resp.status_code == 415, (sent, resp.data)
        assert resp.get_json()["issue"][0]["code"] == "not-supported"
        assert "application/fhir+json" in resp.get_json()["issue"][0]["diagnostics"] or "R4" in resp.get_json()[
            "issue"][0]["diagnostics"]
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == before
    if path == "/exchange/bundles":
        for sent in (None, "application/json", "application/fhir+json; charset=utf-8; fhirVersion=4.0"):
            assert post(signed, sent).status_code == 200, sent
