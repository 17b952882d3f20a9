"""Referral of a violation (移送): a receiver refers a report to the authority that filed its issuer.

Two real gateways and the authority's: 通江 issues and pushes a blood count to 涪陵; 涪陵 refers the report to
四川省卫生健康委员会（演示） (which graded 通江, per the registry), whose gateway receives the signed Task over the
exchange, and answers with a status that travels back, signed and authenticated as the authority.
"""
from __future__ import annotations

import datetime as _dt
import json
import threading
import uuid

import pytest

from conftest import Clock
from test_exchange import URLS, Routed, ingest_lis

from gateway.audit.log import entries
from gateway.audit.records import Party
from gateway.demo import MEMBERS
from gateway.demo.world import AUTHORITY_USCC, add_authority, build_world
from gateway.errors import InputError, NotFound, UnknownIssuer
from gateway.fhir.profiles import load_guide
from gateway.recognition.store import list_decisions
from gateway.referrals import CS_REASON, LANE, PROFILE, REASONS, ReferralConflict, Referrals

CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc
AUTHORITY_URL = "http://schealth.test"


@pytest.fixture
def clock() -> Clock:
    return Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))


@pytest.fixture
def world(tmp_path, clock, member_database):
    w = build_world(tmp_path, clock, {k: v for k, v in URLS.items() if k != "sccdc"}, members=("tongjiang", "fuling"),
                    database=member_database)
    add_authority(w, clock, AUTHORITY_URL)
    transport = Routed(w)
    for gw in w.gateways.values():
        gw.pipeline.exchange.transport = transport
    return w


def referred(world) -> tuple[Referrals, Referrals, str]:
    """通江's report received and decided at 涪陵; returns (涪陵's referrals, the authority's, a decision id)."""
    tj = world.gateways["tongjiang"].pipeline.exchange
    for stored in ingest_lis(world):  # the blood count and the liver panel
        tj.push(stored.bundle["id"], FL)
    got = tj.deliver()
    assert got == {"delivered": 2, "retry": 0, "dead": 0}, [(r.status, r.last_error) for r in tj.outbox.list()]
    fl = world.gateways["fuling"].pipeline.exchange
    # ALT: 通江 failed EQA for it in 2026 (DEMO registry), so 涪陵 did not recognise it
    alt = next(d.decision for d in list_decisions(fl.db) if d.decision["result"]["item"] == "丙氨酸氨基转移酶")
    assert alt["outcome"] == "not-recognized"
    decision_id = alt["decision_id"]
    return Referrals(fl), Referrals(world.gateways["schealth"].pipeline.exchange), decision_id


def kinds(db, kind="referral"):
    return [(e.content["facts"]["action"], e.content["facts"]["status"]) for e in entries(db)
            if e.kind == kind]


def test_a_referral_reaches_the_authority_and_its_answer_comes_back(world) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    clerk = Party.user(FL, "qc-officer")
    made = fl_refs.create(decision_id, "unqualified", note="出具时未见相应等级证明", by=clerk)
    assert made.status == "requested" and made.owner == AUTHORITY_USCC and made.requester == FL
    assert made.issuer == TJ
    task = made.task
    assert load_guide().validate(task, [PROFILE]) == []
    evidence = [(i["type"]["coding"][0]["code"], i.get("valueString")) for i in task["input"]]
    # one failing rule (the mark rule was not evaluable, so it is no evidence of a failure)
    assert [code for code, _ in evidence] == ["signed-bundle-hash", "signed-bundle", "decision", "failing-rule",
                                              "note"]
    assert evidence[3][1].startswith("eqa-pass: EQA failed for 丙氨酸氨基转移酶")
    assert evidence[4][1] == "出具时未见相应等级证明"
    hash_input = next(i for i in task["input"] if i["type"]["coding"][0]["code"] == "signed-bundle-hash")
    bundle_id = fl_refs.get(made.id).task["input"][1]["valueReference"]["identifier"]["value"].removeprefix("urn:uuid:")
    kept = fl_refs.db.execute("SELECT doc_sha256 FROM signed_bundles WHERE direction = 'received' AND bundle_id = ?",
                              [bundle_id]).fetchone()[0]  # the liver panel as 涪陵 received and verified it
    assert hash_input["valueIdentifier"]["value"] == kept == made.bundle_hash
    assert task["requester"]["identifier"]["value"] == FL and task["owner"]["identifier"]["value"] == AUTHORITY_USCC

    fl = world.gateways["fuling"].pipeline.exchange
    assert fl.outbox.list()[0].destination == LANE + AUTHORITY_USCC
    assert fl.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    assert fl_refs.get(made.id).status == "received"
    assert fl.outbox.list()[0].url == AUTHORITY_URL + "/exchange/tasks"

    got = auth_refs.list()
    assert [(r.id, r.side, r.status, r.requester) for r in got] == [(made.id, "owner", "received", FL)]
    assert got[0].decision_id == decision_id and got[0].bundle_hash == made.bundle_hash
    assert kinds(auth_refs.db) == [("received", "received")]

    officer = Party.user(AUTHORITY_USCC, "inspector")
    auth_refs.update(made.id, "accepted", note="已立案", by=officer)
    auth = world.gateways["schealth"].pipeline.exchange
    assert auth.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    back = fl_refs.get(made.id)
    assert back.status == "accepted" and back.task["statusReason"]["text"] == "已立案"
    auth_refs.update(made.id, "completed", by=officer)
    auth.deliver()
    assert fl_refs.get(made.id).status == "completed"
    assert kinds(fl_refs.db) == [("created", "requested"), ("sent", "received"), ("updated", "accepted"),
                                 ("updated", "completed")]
    assert kinds(auth_refs.db) == [("received", "received"), ("updated", "accepted"), ("sent", "accepted"),
                                   ("updated", "completed"), ("sent", "completed")]
    created = next(e for e in entries(fl_refs.db) if e.kind == "referral")
    assert created.content["facts"]["by"]["value"] == "qc-officer"
    with pytest.raises(InputError, match="completed: it can become nothing"):
        auth_refs.update(made.id, "rejected", by=officer)


def test_only_the_authority_answers_and_bad_requests_are_refused(world) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    with pytest.raises(InputError, match="unknown referral reason 'bogus'"):
        fl_refs.create(decision_id, "bogus", by=Party.user(FL, "x"))
    with pytest.raises(NotFound):
        fl_refs.create("no-such-decision", "forged", by=Party.user(FL, "x"))
    made = fl_refs.create(decision_id, "forged", by=Party.user(FL, "x"))
    with pytest.raises(InputError, match="only its authority"):
        fl_refs.update(made.id, "accepted", by=Party.user(FL, "x"))
    world.gateways["fuling"].pipeline.exchange.deliver()
    # 通江 (a member, not the authority) signs an "answer" and pushes it to 涪陵: refused
    tj_refs = Referrals(world.gateways["tongjiang"].pipeline.exchange)
    forged = dict(fl_refs.get(made.id).task, status="rejected")
    text, _ = tj_refs._sign(forged)
    with pytest.raises(UnknownIssuer, match="only 11510000MB00060015 answers"):
        fl_refs.receive(text, TJ)
    assert fl_refs.get(made.id).status == "received"


def test_reasons_agree_with_the_published_code_system() -> None:
    cs = load_guide().get("CodeSystem", "referral-reason")
    assert {c["code"]: c["display"] for c in cs["concept"]} == REASONS


def test_fhir_task_search(world) -> None:
    fl_refs, _, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=Party.user(FL, "x"))
    gw = world.gateways["fuling"]
    client = gw.app.test_client()
    headers = {"Authorization": f"Bearer {gw.token}"}
    found = client.get("/fhir/Task?status=requested", headers=headers).get_json()
    assert found["link"] == [{"relation": "self", "url": f"{gw.url}/fhir/Task?status=requested"}]  # (R4)
    assert found["resourceType"] == "Bundle" and [e["resource"]["id"] for e in found["entry"]] == [made.id]
    none = client.get("/fhir/Task?status=completed", headers=headers).get_json()
    assert none["total"] == 0 and "entry" not in none  # (FHIR JSON has no empty arrays)
    counted = client.get("/fhir/Task?_count=0", headers=headers).get_json()  # the total only
    assert counted["total"] == 1 and "entry" not in counted
    report = made.report.split("/")[-1]
    by_focus = client.get(f"/fhir/Task?focus={report}", headers=headers).get_json()
    assert len(by_focus["entry"]) == 1
    one = client.get(f"/fhir/Task/{made.id}", headers=headers)
    assert one.status_code == 200 and json.loads(one.data)["status"] == "requested"
    assert client.get("/fhir/Task/nope", headers=headers).status_code == 404


def _config(tmp_path, gw) -> str:
    s = gw.settings
    keys = ("data_dir", "issuer_uscc", "issuer_name", "registry_snapshot", "registry_authority", "signing_key",
            "signing_cert", "public_url")
    lines = [f'{k} = "{getattr(s, k)}"' for k in keys]
    path = tmp_path / f"{s.issuer_uscc}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_cli_create_list_show_update(tmp_path) -> None:
    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.commands.common import now_cst

    # the commands run on the real clock: a world built now, so its snapshot and certificates are current
    clock = Clock(now_cst())
    world = build_world(tmp_path, clock, {k: v for k, v in URLS.items() if k != "sccdc"},
                        members=("tongjiang", "fuling"))
    add_authority(world, clock, AUTHORITY_URL)
    transport = Routed(world)
    for gw in world.gateways.values():
        gw.pipeline.exchange.transport = transport
    _, _, decision_id = referred(world)
    fl_cfg, auth_cfg = _config(tmp_path, world.gateways["fuling"]), \
        _config(tmp_path, world.gateways["schealth"])
    run = CliRunner().invoke
    bad = run(cli, ["--config", fl_cfg, "referrals", "create", "--decision", "nope", "--reason", "forged"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == ["Error: decision_id: no recognition decision nope"]
    made = run(cli, ["--config", fl_cfg, "referrals", "create", "--decision", decision_id, "--reason", "unqualified",
                     "--note", "未见资质"])
    assert made.exit_code == 0, made.output
    referral_id = made.output.split()[1]
    assert f"referral {referral_id} requested for {AUTHORITY_USCC}" in made.output
    listed = run(cli, ["--config", fl_cfg, "referrals", "list", "--status", "requested"])
    assert listed.exit_code == 0 and referral_id in listed.output and "unqualified" in listed.output
    assert "检验报告单号 " in made.output and "检验报告单号 " in listed.output  # (as people name it)
    assert "DiagnosticReport/" not in made.output + listed.output
    shown = run(cli, ["--config", fl_cfg, "referrals", "show", referral_id])
    assert "note: 未见资质" in shown.output and "signed-bundle-hash: " in shown.output
    as_json = json.loads(run(cli, ["--config", fl_cfg, "referrals", "show", referral_id, "--json"]).output)
    assert as_json["task"]["status"] == "requested" and as_json["decision_id"] == decision_id
    refused = run(cli, ["--config", fl_cfg, "referrals", "update", referral_id, "--status", "accepted"])
    assert refused.exit_code == 1 and "only its authority" in refused.output
    missing = run(cli, ["--config", auth_cfg, "referrals", "show", "nope"])
    assert missing.exit_code == 1 and "no referral nope" in missing.output
    who = [e.content["facts"].get("by") for e in entries(world.gateways["fuling"].pipeline.store.db)
           if e.kind == "referral"]
    assert who and who[0]["value"]  # the operating-system user who ran the command


def test_referral_audit_entries_render_as_valid_audit_events(world) -> None:
    from gateway.audit.render import render

    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", note="说明", by=Party.user(FL, "qc-officer"))
    world.gateways["fuling"].pipeline.exchange.deliver()
    guide = load_guide()
    for db in (fl_refs.db, auth_refs.db):
        for entry in (e for e in entries(db) if e.kind == "referral"):
            event = render(entry.kind, entry.recorded, entry.facts, seq=entry.seq)
            assert [i for i in guide.validate(event) if i.severity == "error"] == []
            assert event["type"]["code"] == "violation-referral"
            task = event["entity"][0]
            assert task["what"]["identifier"]["value"] == made.id
            details = {d["type"]: d["valueString"] for d in task["detail"]}
            assert details["reason"] == "unqualified" and details["decision-id"] == decision_id
    created = render("referral", *next((e.recorded, e.facts) for e in entries(fl_refs.db) if e.kind == "referral"))
    assert created["subtype"][0]["code"] == "referral-created" and created["outcomeDesc"] == "说明"
    assert any(a.get("requestor") and a["who"]["identifier"]["value"] == "qc-officer" for a in created["agent"])


def test_registry_authorities_are_checked_and_parsed() -> None:
    from gateway.demo.registry import DEMO_SOURCE
    from gateway.registry.models import Snapshot
    from gateway.registry.source import RegistrySourceError, parse_source, read_source_data

    data = read_source_data(DEMO_SOURCE)
    data["qualifications"][1]["authority"]["uscc"] = AUTHORITY_USCC
    data["authorities"][0]["endpoint"] = "https://wjw.example.cn"
    body = parse_source(json.dumps(data, ensure_ascii=False), origin="t", is_json=True).body
    snap = Snapshot.from_document({**body, "issued": "2026-11-22T10:00:00+08:00",
                                   "valid_until": "2026-12-22T10:00:00+08:00"})
    sc = snap.supervising_authorities()[AUTHORITY_USCC]
    assert (sc.name, sc.province, sc.endpoint) == ("四川省卫生健康委员会（演示）", "51", "https://wjw.example.cn")
    assert next(q for q in snap.qualifications if q.id == data["qualifications"][1]["id"]).authority_uscc == \
        AUTHORITY_USCC

    bad = read_source_data(DEMO_SOURCE)
    bad["qualifications"][0]["authority"]["uscc"] = "11500000MB00070018"[:-1] + "X"  # a wrong check character
    bad["qualifications"][1]["authority"]["uscc"] = "91510100MA6123456W"  # valid, but no authority listed
    bad["authorities"].append(dict(bad["authorities"][0]))
    bad["authorities"][1]["endpoint"] = "https://wjw.example.cn/exchange/tasks"
    with pytest.raises(RegistrySourceError) as err:
        parse_source(json.dumps(bad, ensure_ascii=False), origin="t", is_json=True)
    where = {i.location for i in err.value.issues()}
    assert {"qualifications[0].authority.uscc", "qualifications[1].authority.uscc", "authorities[3].uscc",
            "authorities[1].endpoint"} <= where
    assert "91510100MA6123456W is not listed in authorities" in str(err.value)


def _gated(monkeypatch, obj, name: str) -> None:
    """Hold the first caller of ``obj.name`` until a second one arrives (or 10 s pass): two requests racing."""
    gate, real = threading.Barrier(2, timeout=10), getattr(obj, name)

    def held(*args, **kwargs):
        try:
            gate.wait()
        except threading.BrokenBarrierError:  # the other caller waits on the database: go on alone
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, held)


def _race(pipeline, *calls) -> list:
    """Run each call in a thread of its own (its own SQLite connection); their results or exceptions, in order."""
    out: list = [None] * len(calls)

    def run(n: int) -> None:
        try:
            out[n] = calls[n]()
        except Exception as exc:  # noqa: BLE001 - the test looks at what each one raised
            out[n] = exc
        finally:
            pipeline.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_task_whose_focus_is_a_bare_reference_is_refused_for_good(world) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    fl = world.gateways["fuling"].pipeline.exchange
    made = fl_refs.create(decision_id, "unqualified", by=Party.user(FL, "qc-officer"))
    assert fl.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    other = str(uuid.uuid4())
    bare = dict(made.task, id=other, identifier=[{"system": made.task["identifier"][0]["system"], "value": other}],
                focus={"reference": "DiagnosticReport/R2611200002"})
    text, _ = fl_refs._sign(bare)
    url = fl_refs.url_for(LANE + AUTHORITY_USCC)

    authority = world.gateways["schealth"].app.test_client()
    answer = authority.post("/exchange/tasks", data=text, headers=fl.assertion_for(url))
    assert answer.status_code == 422
    issues = answer.get_json()["issue"]
    assert issues and {i["expression"][0] for i in issues} == {"Task.focus.identifier"}

    # through the outbox: refused by the receiver, so dead at once, never retried
    fl.outbox.enqueue(LANE + AUTHORITY_USCC, url, text, kind="referral")
    assert fl.deliver() == {"delivered": 0, "retry": 0, "dead": 1}
    dead = next(r for r in fl.outbox.list() if r.status == "dead")
    assert dead.attempts == 1 and dead.last_error.startswith("HTTP 422: ")  # with the receiver's reason
    assert "Task.focus.identifier" in dead.last_error and dead.last_error.endswith("(refused by the receiver)")
    assert [r.id for r in auth_refs.list()] == [made.id]


def test_codes_are_read_by_their_system_not_by_position(world) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "forged", by=Party.user(FL, "qc-officer"))
    task = dict(made.task)
    local = {"system": "urn:oid:2.16.156.99999.1", "code": "W01", "display": "院内违规代码"}
    task["code"] = {"coding": [local, *task["code"]["coding"]]}
    task["input"] = [dict(i, type={"coding": [local, *i["type"]["coding"]]}) for i in task["input"]]
    assert load_guide().validate(task, [PROFILE]) == []
    text, _ = fl_refs._sign(task)
    auth_refs.receive(text, FL)
    got = auth_refs.get(made.id)
    assert (got.reason, got.decision_id, got.bundle_hash) == ("forged", decision_id, made.bundle_hash)
    assert next(c for c in got.task["code"]["coding"] if c["system"] == CS_REASON)["code"] == "forged"


def test_the_same_referral_arriving_twice_at_once_is_taken_once(world, monkeypatch) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=Party.user(FL, "qc-officer"))
    text, _ = fl_refs._sign(made.task)
    authority = world.gateways["schealth"].pipeline
    # both have looked for the referral before either keeps it
    _gated(monkeypatch, authority.member.require_signer(), "receipt")
    first, second = _race(authority, lambda: auth_refs.receive(text, FL), lambda: auth_refs.receive(text, FL))
    assert isinstance(first, bytes) and first == second  # the one receipt, twice
    assert [(r.id, r.status) for r in auth_refs.list()] == [(made.id, "received")]
    assert kinds(auth_refs.db) == [("received", "received")]


def test_two_answers_at_once_one_is_kept_the_other_is_a_conflict(world, monkeypatch) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=Party.user(FL, "qc-officer"))
    world.gateways["fuling"].pipeline.exchange.deliver()
    authority = world.gateways["schealth"].pipeline
    officer = Party.user(AUTHORITY_USCC, "inspector")
    # both have read "received" before either writes
    _gated(monkeypatch, authority.member.require_signer(), "sign_with_digest")
    outcomes = _race(authority, lambda: auth_refs.update(made.id, "accepted", by=officer).status,
                     lambda: auth_refs.update(made.id, "rejected", by=officer).status)
    kept = [o for o in outcomes if isinstance(o, str)]
    refused = [o for o in outcomes if not isinstance(o, str)]
    assert len(kept) == 1 and len(refused) == 1, outcomes
    assert isinstance(refused[0], ReferralConflict) and refused[0].http_status == 409
    assert f"is now {kept[0]}" in refused[0].message
    assert auth_refs.get(made.id).status == kept[0]
    assert kinds(auth_refs.db) == [("received", "received"), ("updated", kept[0])]
    assert [r.destination for r in authority.exchange.outbox.list()] == [LANE + FL]  # one answer goes back


def test_the_authoritys_gateway_is_healthy_with_its_certificate_listed_under_authorities(world) -> None:
    """The supervising authority's gateway signs referral answers with a certificate the registry lists under
    ``authorities`` (members verify the answers by it): its /health said "signing: not listed in the trust list",
    503, while it worked."""
    body = world.gateways["schealth"].app.test_client().get("/health").get_json()
    assert body["checks"]["signing"]["ok"], body["checks"]["signing"]


def test_a_decision_is_referred_once_a_recognised_one_never_and_accepted_is_not_taken_back(world) -> None:
    """A second referral of one decision while the first stands (three cases reached the authority for one
    report), a decision that failed no rule (sent with no evidence), and accepted → rejected (FHIR Task: rejected
    comes before the work) were all taken."""
    from gateway.errors import InputError
    from gateway.recognition.store import list_decisions

    fl_refs, auth_refs, decision_id = referred(world)
    clerk = Party.user(FL, "qc-officer")
    made = fl_refs.create(decision_id, "unqualified", by=clerk)
    with pytest.raises(InputError, match=rf"was referred already \(referral {made.id}, requested\)"):
        fl_refs.create(decision_id, "forged", by=clerk)
    fl = world.gateways["fuling"].pipeline.exchange
    recognised = next(d.decision for d in list_decisions(fl.db) if d.decision["outcome"] == "recognized")
    with pytest.raises(InputError, match="failed no rule a referral could name"):
        fl_refs.create(recognised["decision_id"], "unqualified", by=clerk)
    assert fl.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    officer = Party.user(AUTHORITY_USCC, "inspector")
    auth_refs.update(made.id, "accepted", by=officer)
    with pytest.raises(InputError):
        auth_refs.update(made.id, "rejected", note="改判", by=officer)
    auth_refs.update(made.id, "completed", by=officer)
