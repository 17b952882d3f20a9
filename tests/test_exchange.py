"""Signed Bundles between member gateways: push, receipts, recognition, failure modes, 调阅.

Three member gateways (通江 county hospital, 涪陵 tertiary hospital, 四川 CDC) each with
its own database, keys and the signed demo registry snapshot. Requests between them go
through the real Flask apps (a transport that routes by URL to each app's test client);
tests/test_demo.py runs the same story over real HTTP on loopback.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import Clock
from gateway.audit.log import entries
from gateway.demo import MEMBERS
from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.exchange.outbox import SendResult
from gateway.exchange.transports import classify
from gateway.naming import SYSTEM_ID_CARD
from gateway.pipeline import SIGNED_FORMAT
from gateway.signing.canonical import parse_json

CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc
ID_CARD = "511921196612120011"  # the demo LIS's patient
URLS = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
LIS = (Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7")


class Routed:
    """A transport that hands each request to the member app its URL names (or fails like a down host)."""

    def __init__(self, world) -> None:
        self.world = world
        self.down: set[str] = set()

    def _client(self, url: str):
        host = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
        for key, gw in self.world.gateways.items():
            if gw.url == host:
                return key, gw.app.test_client()
        raise AssertionError(url)

    def send(self, url, payload, headers) -> SendResult:
        key, client = self._client(url)
        if key in self.down:
            return SendResult(False, retryable=True, error="cannot reach the receiver: ConnectionError")
        resp = client.post(urlsplit(url).path, data=payload, headers=headers)
        return classify(resp.status_code, resp.data)

    def get(self, url, headers) -> SendResult:
        key, client = self._client(url)
        if key in self.down:
            return SendResult(False, retryable=True, error="cannot reach the receiver: ConnectionError")
        parts = urlsplit(url)
        resp = client.get(f"{parts.path}?{parts.query}", headers=headers)
        return classify(resp.status_code, resp.data)


@pytest.fixture
def clock() -> Clock:
    return Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))


@pytest.fixture
def world(tmp_path, clock, member_database):
    w = build_world(tmp_path, clock, URLS, database=member_database)
    transport = Routed(w)
    for gw in w.gateways.values():
        gw.pipeline.exchange.transport = transport
    w.transport = transport  # type: ignore[attr-defined]
    return w


def ingest_lis(world):
    """通江's LIS sends its messages; returns the stored outcomes."""
    tj = world.gateways["tongjiang"].pipeline
    return [o for o in tj.ingest(LIS.read_bytes(), "hl7v2", channel="mllp") if o.bundle is not None]


def observations(bundle):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


def test_issued_bundles_are_signed_with_recognition_marks(world) -> None:
    stored = ingest_lis(world)
    assert len(stored) == 2 and all(o.signed is not None for o in stored)  # the blood count and the liver panel
    signed = parse_json(stored[0].signed)
    assert signed["signature"]["sigFormat"] == "application/jose"
    marks = {o["code"]["text"]: [x["valueString"] for x in o.get("extension", [])] for o in observations(signed)}
    # EQA passed in 2026 for the blood count: the 川渝 catalogue grants 川渝HR, and the Sichuan
    # provincial catalogue (which lists WBC) adds 四川HR for this Sichuan issuer
    assert marks == {"白细胞计数": ["川渝HR", "四川HR"], "红细胞计数": ["川渝HR"], "血红蛋白": ["川渝HR"],
                     "血小板计数": ["川渝HR"]}


def test_push_across_the_border_is_verified_recognised_and_receipted(world) -> None:
    bundle = ingest_lis(world)[0].bundle
    tj = world.gateways["tongjiang"].pipeline.exchange
    fl = world.gateways["fuling"].pipeline
    row = tj.push(bundle["id"], FL)
    assert tj.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    receipt = tj.outbox.get(row).receipt
    assert receipt["receiver"] == FL and receipt["issuer"] == TJ and receipt["outcome"] == "accepted"
    # the blood count: WBC/RBC/HGB within 7 days, PLT has a 3-day window (collected 2026-11-20 07:30)
    assert receipt["decisions"] == {"recognized": 4}
    # kept with the receiver's signature, so 通江 can show later that 涪陵 took it (only the body was kept): the
    # receipt as 涪陵 signed it verifies against the registry snapshot
    from gateway.exchange.service import read_receipt

    kept = {k: v for k, v in receipt.items() if k != "signature"}
    body, signer = read_receipt(json.dumps({"receipt": kept, "signature": receipt["signature"]}).encode(),
                                tj._snapshot(), tj.clock())
    assert signer == FL and body == kept
    found = fl.store.search("DiagnosticReport", [("patient.identifier", "511921196612120011")])
    assert found.total == 1
    kinds = [e.kind for e in entries(fl.store.db)]
    assert kinds.count("exchange") == 1 and kinds.count("decision") == 4


def test_recognition_reasons_when_a_window_has_passed(world, clock) -> None:
    bundle = ingest_lis(world)[0].bundle
    tj = world.gateways["tongjiang"].pipeline.exchange
    clock.advance(days=2)  # 2026-11-24 10:00: PLT (3 days from 11-20 07:30) is now out of its window
    tj.push(bundle["id"], FL)
    tj.deliver()
    from gateway.recognition.store import list_decisions

    decisions = list_decisions(world.gateways["fuling"].pipeline.store.db)
    outcomes = {d["result"]["item"]: d["outcome"] for d in (x.to_dict() if hasattr(x, "to_dict") else x
                                                            for x in decisions)}
    assert sorted(outcomes.values()).count("not-recognized") == 1
    plt = next(x for x in (d.to_dict() if hasattr(d, "to_dict") else d for d in decisions)
               if x["outcome"] == "not-recognized")
    failed = [r for r in plt["rules"] if r["status"] == "failed"]
    assert [r["rule"] for r in failed] == ["validity-window"]


def test_same_bundle_twice_is_stored_once_with_the_same_receipt(world) -> None:
    bundle = ingest_lis(world)[0].bundle
    tj = world.gateways["tongjiang"].pipeline.exchange
    row = tj.push(bundle["id"], FL)
    tj.deliver()
    first = tj.outbox.get(row).receipt
    tj.outbox.replay(row)
    assert tj.deliver()["delivered"] == 1
    assert tj.outbox.get(row).receipt == first
    fl = world.gateways["fuling"].pipeline
    assert fl.store.db.execute("SELECT count(*) FROM messages WHERE format = 'fhir-signed'").fetchone()[0] == 1


def post_as(world, sender: str, receiver: str, payload: bytes, token: str | None = None):
    ex = world.gateways[sender].pipeline.exchange
    url = world.gateways[receiver].url + "/exchange/bundles"
    headers = {"Authorization": f"Bearer {token}"} if token else ex.assertion_for(url)
    return world.gateways[receiver].app.test_client().post("/exchange/bundles", data=payload, headers=headers)


def test_tampered_bundle_is_refused_and_audited(world) -> None:
    signed = ingest_lis(world)[0].signed
    tampered = signed.replace(b'"value":6.8', b'"value":5.8')
    assert tampered != signed
    resp = post_as(world, "tongjiang", "fuling", tampered)
    assert resp.status_code == 401
    assert resp.get_json()["issue"][0]["diagnostics"].endswith("signature verification failed")
    fl = world.gateways["fuling"].pipeline
    assert fl.store.search("Observation", []).total == 0
    refused = [e for e in entries(fl.store.db) if e.kind == "exchange"]
    assert len(refused) == 1 and "bad-signature" in json.dumps(refused[0].__dict__, default=str)


def test_wrong_kid_is_a_bad_signature(world) -> None:
    signed = parse_json(ingest_lis(world)[0].signed)
    jws = base64.b64decode(signed["signature"]["data"]).decode()
    header, _, sig = jws.split(".")
    h = json.loads(base64.urlsafe_b64decode(header + "=="))
    h["kid"] = "AAAAAAAAAAA"
    new_header = base64.urlsafe_b64encode(json.dumps(h).encode()).rstrip(b"=").decode()
    signed["signature"]["data"] = base64.b64encode(f"{new_header}..{sig}".encode()).decode()
    from gateway import jsonutil

    assert post_as(world, "tongjiang", "fuling", jsonutil.dumps(signed).encode()).status_code == 401


def test_revoked_signer_is_refused(world, clock) -> None:
    signed = ingest_lis(world)[0].signed
    newer = build_demo_registry(clock(), version=2, endpoints={MEMBERS[k].uscc: u for k, u in URLS.items()},
                                drop_members=(TJ,), reuse=world.registry)
    world.publish(newer)  # the authority removed 通江's certificate: revocation
    # 通江 cannot even authenticate any more
    resp = post_as(world, "tongjiang", "fuling", signed)
    assert resp.status_code == 403
    # what it pushed is kept, refused, and the auditor sees who tried (the authority's certificate says who)
    fl = world.gateways["fuling"].pipeline
    digest = hashlib.sha256(signed).hexdigest()
    kept = fl.store.find_message(SIGNED_FORMAT, TJ, digest)
    assert kept is not None and kept.status == "refused" and fl.store.raw_of(kept.id) == signed
    refused = [e.facts for e in entries(fl.store.db) if e.kind == "exchange"]
    assert len(refused) == 1
    assert refused[0]["direction"] == "refused" and refused[0]["reason"] == "unknown-issuer"
    assert refused[0]["peer"]["value"] == TJ and refused[0]["bundle_hash"] == f"sha256:{digest}"
    assert "not listed" in refused[0]["detail"]
    assert fl.store.search("Observation", []).total == 0
    # the same bytes pushed again (a fresh assertion) add nothing: kept and audited once
    assert post_as(world, "tongjiang", "fuling", signed).status_code == 403
    assert len([e for e in entries(fl.store.db) if e.kind == "exchange"]) == 1
    # and a Bundle it signed is refused even when another member forwards it
    resp = post_as(world, "sccdc", "fuling", signed)
    assert resp.status_code == 403
    assert "not listed" in resp.get_json()["issue"][0]["diagnostics"]


def test_a_receiver_whose_snapshot_does_not_list_the_senders_certificate_yet_is_tried_again(world, clock) -> None:
    """The receiver runs an older snapshot than the sender's (a renewed certificate it does not list yet): it refuses
    with 403 "not listed", and the delivery went dead at its first attempt, though installing the newer snapshot
    there sets it right (the README lists it among the retryable cases). While the sender's own snapshot lists its
    certificate, the delivery waits, saying why; once the receiver lists it, it is delivered."""
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    for gw in world.gateways.values():
        gw.pipeline.exchange.transport = Routed(world)
    endpoints = {MEMBERS[k].uscc: u for k, u in URLS.items()}
    behind = build_demo_registry(clock(), version=2, endpoints=endpoints, drop_members=(TJ,), reuse=world.registry)
    fl.exchange.holder.apply(behind.text())  # (涪陵 alone: 通江's own snapshot still lists it)
    bundle = ingest_lis(world)[0].bundle
    row = tj.exchange.push(bundle["id"], FL)
    tj.exchange.deliver()
    entry = tj.exchange.outbox.get(row)
    assert entry.status == "pending", (entry.status, entry.last_error)
    assert "not listed" in entry.last_error and "the receiver's is older" in entry.last_error
    caught_up = build_demo_registry(clock(), version=3, endpoints=endpoints, reuse=world.registry)
    fl.exchange.holder.apply(caught_up.text())
    tj.exchange.outbox.retry(row)
    tj.exchange.deliver()
    assert tj.exchange.outbox.get(row).status == "delivered"
    # a sender its own snapshot no longer lists (revoked) is refused for good, as before
    world.publish(build_demo_registry(clock(), version=4, endpoints=endpoints, drop_members=(TJ,),
                                      reuse=world.registry))
    row = tj.exchange.push(bundle["id"], MEMBERS["sccdc"].uscc)  # (a member it was not delivered to)
    tj.exchange.deliver()
    entry = tj.exchange.outbox.get(row)
    assert entry.status == "dead" and "not listed" in entry.last_error and "older" not in entry.last_error


def test_a_member_with_no_certificate_in_force_is_not_sent_to(world, clock) -> None:
    """The authority removed the CDC's certificate (revoked) and kept it listed: reports were sent to it again and
    again (it took them), each delivery failing on its receipt with "signature verification failed". Now nothing is
    queued for it, and a delivery queued before goes dead, both saying why."""
    from gateway.errors import UnknownIssuer

    tj = world.gateways["tongjiang"].pipeline
    for gw in world.gateways.values():
        gw.pipeline.exchange.transport = Routed(world)
    cdc = MEMBERS["sccdc"].uscc
    bundle = ingest_lis(world)[0].bundle
    queued = tj.exchange.push(bundle["id"], cdc)
    endpoints = {MEMBERS[k].uscc: u for k, u in URLS.items()}
    revoked = build_demo_registry(clock(), version=2, endpoints=endpoints, drop_members=(cdc,),
                                  reuse=world.registry)  # (listed still, its certificates left out)
    tj.exchange.holder.apply(revoked.text())
    with pytest.raises(UnknownIssuer) as refused:
        tj.exchange.push(bundle["id"], MEMBERS["sccdc"].uscc)
    assert "no certificate in force" in refused.value.message
    tj.exchange.deliver()
    entry = tj.exchange.outbox.get(queued)
    assert entry.status == "dead" and "no certificate in force" in entry.last_error


def test_a_push_from_a_certificate_no_trusted_authority_issued_is_not_kept(world, tmp_path) -> None:
    """A caller whose certificate no registry authority of the snapshot issued cannot be told from anyone: its
    push is refused (403 or 401) and neither kept nor audited, so that no stranger can fill the audit log."""
    from gateway.exchange.peer_auth import make_assertion
    from gateway.signing.keys import generate_private_key, issue_certificate, make_authority

    signed = ingest_lis(world)[0].signed
    now = world.gateways["fuling"].pipeline.clock()
    rogue_key = generate_private_key()
    rogue = make_authority(rogue_key, "11500000MB00050043", "not the registry authority", now - _dt.timedelta(days=1),
                           now + _dt.timedelta(days=30))
    key = generate_private_key()
    cert = issue_certificate(key.public_key(), TJ, "通江 (not certified by the registry authority)", rogue_key,
                             rogue, now - _dt.timedelta(days=1), now + _dt.timedelta(days=30))
    url = world.gateways["fuling"].url + "/exchange/bundles"
    token = make_assertion(key, [cert], issuer_uscc=TJ, audience=url, now=now)
    resp = post_as(world, "tongjiang", "fuling", signed, token=token)
    assert resp.status_code in (401, 403), resp.get_data(as_text=True)
    fl = world.gateways["fuling"].pipeline
    assert [e for e in entries(fl.store.db) if e.kind == "exchange"] == []
    assert fl.store.find_message(SIGNED_FORMAT, TJ, hashlib.sha256(signed).hexdigest()) is None


def test_signer_must_be_the_issuer(world) -> None:
    bundle = ingest_lis(world)[0].bundle
    cdc = world.gateways["sccdc"].pipeline.member.require_signer()
    forged = cdc.sign(bundle)  # the CDC signs a report whose issuer is 通江
    resp = post_as(world, "sccdc", "fuling", forged)
    assert resp.status_code == 403


def test_a_signer_named_in_who_must_be_the_signer(world) -> None:
    """Bundle.signature.who is not covered by the signature: rewritten to name another member, it is refused, so
    no rule can take the other member for the signer."""
    signed = parse_json(ingest_lis(world)[0].signed)
    signed["signature"]["who"]["identifier"]["value"] = MEMBERS["fuling"].uscc
    from gateway import jsonutil

    resp = post_as(world, "tongjiang", "fuling", jsonutil.dumps(signed).encode())
    assert resp.status_code in (401, 403), resp.get_data(as_text=True)
    assert "Bundle.signature.who names" in resp.get_json()["issue"][0]["diagnostics"]
    assert world.gateways["fuling"].pipeline.store.search("Observation", []).total == 0


def test_peer_authentication_failures(world) -> None:
    signed = ingest_lis(world)[0].signed
    assert post_as(world, "tongjiang", "fuling", signed, token="nonsense").status_code == 401
    fl_app = world.gateways["fuling"].app
    assert fl_app.test_client().post("/exchange/bundles", data=signed).status_code == 401
    ex = world.gateways["tongjiang"].pipeline.exchange
    headers = ex.assertion_for(world.gateways["fuling"].url + "/exchange/bundles")
    assert fl_app.test_client().post("/exchange/bundles", data=signed, headers=headers).status_code == 200
    replayed = fl_app.test_client().post("/exchange/bundles", data=signed, headers=headers)
    assert replayed.status_code == 401 and "replayed" in replayed.get_json()["issue"][0]["diagnostics"]
    # an assertion made for another gateway is not accepted here
    other = ex.assertion_for(world.gateways["sccdc"].url + "/exchange/bundles")
    assert fl_app.test_client().post("/exchange/bundles", data=signed, headers=other).status_code == 401


def test_receiver_down_for_an_hour_loses_nothing(world, clock) -> None:
    bundle = ingest_lis(world)[0].bundle
    tj = world.gateways["tongjiang"].pipeline.exchange
    world.transport.down.add("fuling")
    row = tj.push(bundle["id"], FL)
    for _ in range(6):
        assert tj.deliver()["delivered"] == 0
        clock.advance(minutes=10)
    assert tj.outbox.get(row).status == "pending" and tj.outbox.get(row).attempts >= 2
    world.transport.down.clear()
    clock.advance(minutes=60)
    assert tj.deliver()["delivered"] == 1
    assert world.gateways["fuling"].pipeline.store.search("DiagnosticReport", []).total == 1


def test_a_receiver_whose_clock_is_off_is_tried_again_until_it_is_set_right(world, clock) -> None:
    """A 401 for the call's own assertion (the receiver's clock 20 minutes behind the sender's) is not the
    Bundle's fault and can be set right by an operator: retried with the back-off, naming why, not dead-lettered;
    delivered once the clock is right. A Bundle whose own signature the receiver refuses stays dead at once."""
    bundle = ingest_lis(world)[0].bundle
    tj = world.gateways["tongjiang"].pipeline.exchange
    fl = world.gateways["fuling"].pipeline.exchange
    fl.clock = lambda: clock() - _dt.timedelta(minutes=20)
    row = tj.push(bundle["id"], FL)
    assert tj.deliver() == {"delivered": 0, "retry": 1, "dead": 0}
    got = tj.outbox.get(row)
    assert got.status == "pending" and "HTTP 401" in got.last_error and "clock may be ahead" in got.last_error, got
    fl.clock = clock
    clock.advance(minutes=10)
    assert tj.deliver()["delivered"] == 1
    assert world.gateways["fuling"].pipeline.store.search("DiagnosticReport", []).total == 1
    from gateway import jsonutil

    bad = classify(401, jsonutil.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "security", "diagnostics": "signature does not verify",
         "expression": ["Bundle.signature"]}]}).encode())
    assert not bad.retryable and bad.error == "HTTP 401: signature does not verify"


def test_lookup_returns_verified_signed_reports(world) -> None:
    ingest_lis(world)
    fl = world.gateways["fuling"].pipeline.exchange
    got = fl.pull(TJ, "urn:oid:2.16.156.10011.1.3|511921196612120011")
    assert len(got) == 2 and {v.signer_uscc for v in got} == {TJ}
    tj_db = world.gateways["tongjiang"].pipeline.store.db
    reads = [e for e in entries(tj_db) if e.kind == "read"]
    assert len(reads) == 1  # 通江 records that 涪陵 looked up this patient
    assert fl.pull(TJ, "urn:oid:2.16.156.10011.1.3|110105194912310021") == []
    assert len(fl.pull(TJ, "511921196612120011")) == 2  # the value alone, any system
    assert fl.pull(TJ, "5119211966121200%") == []  # LIKE wildcards are taken literally


def test_a_number_no_decimal_can_hold_is_a_clear_refusal(world) -> None:
    """An exponent too large for a Decimal (``1E+99999999999999999999``) is refused as JSON that cannot be read,
    naming why, and nothing of it is stored (the reader used to let decimal.InvalidOperation through)."""
    signed = ingest_lis(world)[0].signed
    broken = signed.replace(b'"value":6.8', b'"value":1E+99999999999999999999')
    assert broken != signed
    resp = post_as(world, "tongjiang", "fuling", broken)
    assert 400 <= resp.status_code < 500
    diagnostics = resp.get_json()["issue"][0]["diagnostics"]
    assert "exponent" in diagnostics and "Traceback" not in diagnostics
    assert world.gateways["fuling"].pipeline.store.search("Observation", []).total == 0


def test_a_report_is_not_queued_for_the_member_that_issued_it(world) -> None:
    """Sending to one's own USCC would queue a delivery to one's own endpoint, retried until it dies: refused at
    once, naming --to."""
    from gateway.errors import InputError

    outcome = ingest_lis(world)[0]
    tj = world.gateways["tongjiang"].pipeline
    with pytest.raises(InputError) as caught:
        tj.exchange.push(outcome.bundle["id"], TJ)
    assert caught.value.location == "--to" and "this member itself" in caught.value.message
    assert tj.exchange.outbox.list(None, 10) == []


def test_an_auditor_finds_by_the_id_card_who_read_a_patients_results_and_who_overrode_a_decision(world) -> None:
    """Reads (a FHIR search of the patient's results, another member's 调阅), a physician's override and the Bundle
    sent and received name the patient by the 身份证号 as well: ``AuditEvent?patient:identifier=<身份证号>`` finds
    them, with or without the system (reads were found only by the ``Patient/<id>`` no auditor knows, the others
    not at all)."""
    from gateway.recognition.overrides import make_override
    from gateway.recognition.store import add_override, list_decisions

    stored = ingest_lis(world)
    tj, fl = world.gateways["tongjiang"], world.gateways["fuling"]
    tj_http, fl_http = tj.app.test_client(), fl.app.test_client()
    as_tj, as_fl = {"Authorization": f"Bearer {tj.token}"}, {"Authorization": f"Bearer {fl.token}"}
    code = observations(stored[0].bundle)[0]["code"]["coding"][0]
    got = tj_http.get("/fhir/Observation", query_string={"code": f"{code['system']}|{code['code']}"}, headers=as_tj)
    assert got.status_code == 200 and got.get_json()["total"] >= 1  # results of the patient, found by their code
    assert len(fl.pipeline.exchange.pull(TJ, f"{SYSTEM_ID_CARD}|{ID_CARD}")) == 2  # 调阅 by 涪陵
    tj.pipeline.exchange.push(stored[0].bundle["id"], FL)
    assert tj.pipeline.exchange.deliver()["delivered"] == 1
    decision = list_decisions(fl.pipeline.store.db)[0]
    ordered = make_override(decision.decision["decision_id"], "critical-item", "FL-DR-0231", fl.pipeline.clock(),
                            "术前复查")
    add_override(fl.pipeline.store.db, ordered)

    def kinds(http, headers, value: str) -> list[str]:
        found = http.get("/fhir/AuditEvent", query_string={"patient:identifier": value, "_count": "200"},
                         headers=headers).get_json()
        assert found.get("resourceType") == "Bundle", found
        return [e["resource"]["type"]["code"] + "/" + e["resource"].get("subtype", [{}])[0].get("code", "")
                for e in found.get("entry", []) if e.get("search", {}).get("mode") == "match"]

    for value in (ID_CARD, f"{SYSTEM_ID_CARD}|{ID_CARD}"):
        at_tj = kinds(tj_http, as_tj, value)
        assert sum(k.startswith("rest/") for k in at_tj) >= 2, at_tj  # the search here, 涪陵's 调阅
        assert "110106/bundle-sent" in at_tj, at_tj  # 通江 sent this patient's Bundle to 涪陵
        at_fl = kinds(fl_http, as_fl, value)
        assert any("override" in k for k in at_fl), at_fl
        assert "110107/bundle-received" in at_fl, at_fl
    other = kinds(tj_http, as_tj, "110105194912310021")
    assert not [k for k in other if k.startswith("rest/")], other
    # a 调阅 that finds nothing is a trail too (a member probing which patients are held here)
    assert fl.pipeline.exchange.pull(TJ, f"{SYSTEM_ID_CARD}|110105194912310021") == []
    probed = [e.content["facts"] for e in entries(tj.pipeline.store.db) if e.kind == "read"
              and (e.content["facts"].get("patient") or {}).get("value") == "110105194912310021"
              and e.content["facts"].get("client", {}).get("value") == FL]
    assert len(probed) == 1 and not probed[0].get("resources"), probed
    assert "110105194912310021" in str(probed[0].get("query")), probed
    assert fl.pipeline.exchange.pull(TJ, f"{SYSTEM_ID_CARD}|") == []  # (nothing after the system: named as asked)


def test_a_lookup_may_list_several_patients_each_audited_alone(world) -> None:
    """调阅 by ``patient.identifier=a,b`` finds the Bundles of either patient, as a FHIR search does (it was taken as
    one identifier with a comma in it, found nothing, and a member that had the results repeated the exam); each
    patient asked is audited as a lookup of its own; an empty item or more than 20 patients is refused, naming the
    parameter."""
    from gateway.errors import PeerRejected

    ingest_lis(world)
    fl = world.gateways["fuling"].pipeline.exchange
    tj_db = world.gateways["tongjiang"].pipeline.store.db
    held, other = "urn:oid:2.16.156.10011.1.3|511921196612120011", "urn:oid:2.16.156.10011.1.3|110105194912310021"
    got = fl.pull(TJ, f"{other},{held}")
    assert len(got) == 2 and {v.signer_uscc for v in got} == {TJ}
    reads = [e for e in entries(tj_db) if e.kind == "read"]
    assert len(reads) == 2  # one per patient asked: the one held, and the one probed for
    assert len(fl.pull(TJ, f"{held},511921196612120011")) == 2  # the same patient twice: each Bundle once
    too_many = ",".join(f"5119211966121200{n:02d}" for n in range(21))
    for asked, said in ((f"{held},", "empty identifier"), (too_many, "21 patients")):
        with pytest.raises(PeerRejected) as refused:
            fl.pull(TJ, asked)
        assert said in str(refused.value) and "patient.identifier" in str(refused.value), refused.value


def test_a_lookup_is_audited_at_the_member_that_asks_as_well(world) -> None:
    """调阅 was audited only where it was answered: the asking member's log (and its console's "lookups made") held
    nothing of who there read another member's results of a patient. Now both sides record it: here who asked, which
    member was asked, the patient and the reports that came back; a lookup that failed, with why."""
    from gateway.errors import PeerUnavailable

    ingest_lis(world)
    fl = world.gateways["fuling"].pipeline
    got = fl.exchange.pull(TJ, f"{SYSTEM_ID_CARD}|{ID_CARD}", by="dr-wang")
    assert len(got) == 2
    made = [e.content["facts"] for e in entries(fl.store.db) if e.kind == "read"]
    assert len(made) == 1, made
    facts = made[0]
    assert facts["gateway"]["value"] == TJ and facts["member"]["value"] == FL  # read at 通江, for 涪陵
    assert facts["client"]["value"] == "dr-wang" and facts["patient"]["value"] == ID_CARD
    assert sorted(r.split("/")[0] for r in facts["resources"]) == ["DiagnosticReport"] * 2
    # what `gateway lookup --receive` does with each: taken as a pushed report, decided for 涪陵
    from gateway import jsonutil

    taken = fl.receive_signed(jsonutil.dumps(got[0].bundle).encode("utf-8"), TJ)
    assert taken.status == 200 and taken.decisions, taken
    # the same entry found by the auditor's usual search at 涪陵
    http = world.gateways["fuling"].app.test_client()
    found = http.get("/fhir/AuditEvent", query_string={"patient:identifier": ID_CARD},
                     headers={"Authorization": f"Bearer {world.gateways['fuling'].token}"}).get_json()
    assert any(e["resource"]["type"]["code"] == "rest" for e in found.get("entry", [])), found
    world.transport.down.add("tongjiang")
    with pytest.raises(PeerUnavailable):
        fl.exchange.pull(TJ, ID_CARD)
    failed = [e.content["facts"] for e in entries(fl.store.db) if e.kind == "read"][-1]
    assert "failed: PeerUnavailable" in failed["query"] and not failed.get("resources")
    assert failed["patient"]["value"] == ID_CARD and failed["client"]["value"] == FL  # (no user: the gateway)
    assert failed["outcome"] == "8" and facts["outcome"] == "0"  # BALP: the other member away, a serious failure
    assert failed["asked_elsewhere"] is True and facts["asked_elsewhere"] is True
    # the lookup figures count the lookups served, here none: the ones made here are counted where they were served
    from gateway.audit import stats

    assert stats.compute(fl.store.db)["lookups"]["total"] == 0
    assert stats.compute(world.gateways["tongjiang"].pipeline.store.db)["lookups"]["by_member"][0]["key"] == FL


def test_a_lookup_uses_the_reports_that_verify_and_names_the_ones_that_do_not(world, monkeypatch) -> None:
    """One report whose signature does not verify (changed on the way, or signed with a certificate the authority
    withdrew) made the whole 调阅 fail and the asking physician got nothing: asked for them, the others are given
    and it is named apart, never used; without asking, it still raises."""
    from gateway.errors import BadSignature

    ingest_lis(world)
    fl = world.gateways["fuling"].pipeline
    real = world.transport.get

    def changed_on_the_way(url, headers) -> SendResult:
        answer = real(url, headers)
        body = json.loads(answer.body)
        first = body["entry"][0]["resource"]
        obs = next(e["resource"] for e in first["entry"] if e["resource"]["resourceType"] == "Observation")
        obs["valueQuantity"]["value"] += 1
        return SendResult(True, status=answer.status, body=json.dumps(body).encode())

    monkeypatch.setattr(world.transport, "get", changed_on_the_way)
    refused: list[tuple[str, str]] = []
    got = fl.exchange.pull(TJ, ID_CARD, refused=refused)
    assert len(got) == 1 and len(refused) == 1
    assert refused[0][0] != got[0].bundle["id"] and "signature" in refused[0][1]
    made = [e.content["facts"] for e in entries(fl.store.db) if e.kind == "read"][-1]
    assert "1 report(s) refused" in made["query"] and len(made["resources"]) == 1
    assert made["outcome"] == "4"  # (a report given was not usable: a minor failure)
    with pytest.raises(BadSignature):
        fl.exchange.pull(TJ, ID_CARD)


def test_a_bundle_signed_by_a_clock_ahead_is_tried_again_until_it_verifies(world, clock) -> None:
    """通江's clock 10 minutes ahead as it signed: 涪陵 refused the Bundle for good (403), audited the refusal as an
    unknown issuer, and the delivery went dead at its first attempt, staying refused once the clocks agreed. Now: 425
    (Too Early) with when to try again, audited as signed-later, and delivered once 涪陵's clock reaches it."""
    tj, fl = world.gateways["tongjiang"].pipeline, world.gateways["fuling"].pipeline
    clock.advance(minutes=10)
    stored = ingest_lis(world)  # signed at 通江's time, 10 minutes ahead
    clock.advance(minutes=-10)
    tj.exchange.push(stored[0].bundle["id"], FL)
    tj.exchange.deliver()
    [row] = tj.exchange.outbox.list(None, 10)
    assert row.status == "pending" and "HTTP 425" in row.last_error and row.attempts == 1, row
    refused = [e.content["facts"] for e in entries(fl.store.db) if e.kind == "exchange"
               and e.content["facts"].get("direction") == "refused"]
    assert [f["reason"] for f in refused] == ["signed-later"]
    clock.advance(minutes=6)  # 涪陵's clock within its allowance of the signature time: the next attempt verifies
    tj.exchange.deliver(wait=None)
    assert [r.status for r in tj.exchange.outbox.list(None, 10)] == ["delivered"]


def test_a_signature_made_later_than_now_is_answered_425_with_when_to_try_again() -> None:
    from flask import Flask

    from gateway.api.errors import register_error_handlers
    from gateway.signing.jws import SignedLater

    app = Flask("t")
    register_error_handlers(app)

    @app.post("/x")
    def x() -> None:
        raise SignedLater("signed at …, later than the verification time …", "Bundle.signature", retry_after=299.2)

    answer = app.test_client().post("/x")
    assert answer.status_code == 425 and answer.headers["Retry-After"] == "300"
    assert answer.get_json()["issue"][0]["expression"] == ["Bundle.signature"]


def test_a_receivers_reason_keeps_member_codes_and_masks_patient_numbers() -> None:
    """The reason a receiver gives is kept in the outbox and logged: identity card and record numbers are masked,
    a member's 统一社会信用代码 is not (it read "…MB…C")."""
    from gateway.exchange.transports import receiver_reason

    def said(text: str) -> str:
        return receiver_reason(json.dumps({"resourceType": "OperationOutcome",
                                           "issue": [{"severity": "error", "diagnostics": text}]}).encode())

    assert said("signing certificate of 12511921MB0001003C was not listed") == \
        "signing certificate of 12511921MB0001003C was not listed"
    assert said("patient 51010419900101123X, 510104199001011232 and record 12345678 at 91500105MA5U0A1B2R") == \
        "patient …, … and record … at 91500105MA5U0A1B2R"
    assert said("not a member: 12511921MB0001003D") == "not a member: …MB…D"  # (a wrong check character)


def test_a_demo_gateway_makes_one_app_when_two_lanes_ask_at_once(tmp_path, clock) -> None:
    """Two deliveries to one member in two lanes ask for its app at once: one app is made over its pipeline (each
    thread made its own, setting the pipeline's app state up again: the likely cause of a delivery of the referral
    tests answered for retry now and then under a loaded suite)."""
    import threading

    w = build_world(tmp_path, clock, URLS, members=("tongjiang", "fuling"))
    gw = w.gateways["fuling"]
    got: list[object] = []
    start = threading.Barrier(4)

    def ask() -> None:
        start.wait()
        got.append(gw.app)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 4 and len({id(a) for a in got}) == 1
