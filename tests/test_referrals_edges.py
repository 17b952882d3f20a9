"""Referrals (移送) at their edges: what grounds one, referring twice at once, naming the issuer, answers that
cross on the way, a corrected report, and deliveries that fail.

The world of tests/test_referrals.py: 通江 pushes its liver panel to 涪陵 (ALT not recognised: 通江 failed EQA for
it), 涪陵 refers it to 四川省卫生健康委员会（演示）, whose gateway answers.
"""
from __future__ import annotations

import json
import threading

import pytest

from conftest import validate_fhir
import test_referrals
from test_referrals import AUTHORITY_USCC, FL, TJ, kinds, referred

from gateway.audit.log import entries
from gateway.audit.records import Party
from gateway.demo import MEMBERS
from gateway.errors import InputError
from gateway.fhir.profiles import load_guide
from gateway.recognition.store import list_decisions
from gateway.referrals import LANE, PROFILE, Referrals
from gateway.store.db import transaction
from gateway.store.decisions import DECISION_COLUMNS

clock, world = test_referrals.clock, test_referrals.world  # the fixtures: two members and the authority
CLERK = Party.user(FL, "qc-officer")
OFFICER = Party.user(AUTHORITY_USCC, "inspector")


def _decision_like(fl_refs: Referrals, decision_id: str, new_id: str, rules: list[dict]) -> str:
    """A copy of a stored decision of 涪陵 under another id, failing ``rules`` instead (its other rules passed)."""
    db = fl_refs.exchange.db
    values = list(db.execute(f"SELECT {', '.join(DECISION_COLUMNS)} FROM recognition_decisions WHERE decision_id = ?",
                             [decision_id]).fetchone())
    decision = json.loads(values[-1])
    decision["decision_id"] = new_id
    decision["rules"] = [dict(r, status="passed") for r in decision["rules"]] + rules
    values[0], values[-1] = new_id, json.dumps(decision, ensure_ascii=False)
    with transaction(db):
        db.execute(f"INSERT INTO recognition_decisions ({', '.join(DECISION_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(DECISION_COLUMNS))})", values)
    return new_id


def _failed(rule: str, message: str) -> dict:
    return {"rule": rule, "status": "failed", "message": message, "facts": {}}


# -- 3. only a violation grounds a referral -------------------------------------------------------------------------


def test_a_failure_that_is_no_violation_is_not_referred_naming_the_rule(world) -> None:
    fl_refs, _, decision_id = referred(world)
    empty = _decision_like(fl_refs, decision_id, "d-empty", [_failed("result-value", "the result has no value")])
    unmapped = _decision_like(fl_refs, decision_id, "d-unmapped",
                              [_failed("catalogue-item", "no recognition catalogue lists this item")])
    for reason in ("unqualified", "forged", "out-of-scope", "suspended"):
        with pytest.raises(InputError, match=rf"decision d-empty failed result-value: no institution's violation "
                                             rf"a referral for {reason} rests on"):
            fl_refs.create(empty, reason, by=CLERK)
        with pytest.raises(InputError, match="failed catalogue-item: no institution's violation"):
            fl_refs.create(unmapped, reason, by=CLERK)
    for n, rule in enumerate(("catalogue-scope", "validity-window", "mark", "direction", "between-institutions",
                              "report-status")):
        other = _decision_like(fl_refs, decision_id, f"d-{n}", [_failed(rule, "x")])
        with pytest.raises(InputError, match=f"failed {rule}: no institution's violation"):
            fl_refs.create(other, "unqualified", by=CLERK)
    # the reason must fit the rule: a membership that lapsed is "suspended", not "out-of-scope"
    lapsed = _decision_like(fl_refs, decision_id, "d-lapsed", [_failed("member-active", "not an active member")])
    with pytest.raises(InputError, match="failed member-active: no institution's violation a referral for "
                                         "out-of-scope"):
        fl_refs.create(lapsed, "out-of-scope", by=CLERK)
    assert fl_refs.create(lapsed, "suspended", by=CLERK).status == "requested"
    signed_by_other = _decision_like(fl_refs, decision_id, "d-signature",
                                     [_failed("reading-signature", "signed by another institution")])
    with pytest.raises(InputError, match="failed reading-signature"):
        fl_refs.create(signed_by_other, "unqualified", by=CLERK)
    # EQA failed: what the real decision found, referred as unqualified
    assert fl_refs.create(decision_id, "unqualified", by=CLERK).status == "requested"
    assert sorted(r.decision_id for r in fl_refs.list()) == sorted([decision_id, "d-lapsed"])


# -- 2. referring twice at once -------------------------------------------------------------------------------------


def test_referring_one_decision_three_times_at_once_makes_one_referral(world, monkeypatch) -> None:
    fl_refs, _, decision_id = referred(world)
    fl = world.gateways["fuling"].pipeline
    signer = fl.member.require_signer()
    gate, real = threading.Barrier(3, timeout=10), signer.sign_with_digest

    def held(*args, **kwargs):  # all three have made their Task before any writes it
        try:
            gate.wait()
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(signer, "sign_with_digest", held)
    out: list = [None] * 3

    def run(n: int) -> None:
        try:
            out[n] = Referrals(fl.exchange).create(decision_id, "unqualified", by=CLERK)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each one raised
            out[n] = exc
        finally:
            fl.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    made = [o for o in out if not isinstance(o, Exception)]
    refused = [o for o in out if isinstance(o, Exception)]
    assert len(made) == 1 and len(refused) == 2, out
    for exc in refused:
        assert isinstance(exc, InputError) and f"referred already (referral {made[0].id}" in exc.message
    assert [r.id for r in fl_refs.list()] == [made[0].id]
    assert kinds(fl_refs.db) == [("created", "requested")]
    assert len(fl.exchange.outbox.list()) == 1


# -- 1. the Task names the issuer -----------------------------------------------------------------------------------


def test_the_task_names_the_issuer_and_the_authoritys_copy_shows_it(world, tmp_path) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=CLERK)
    ident = made.task["focus"]["identifier"]
    assert ident["assigner"]["identifier"]["value"] == TJ
    assert ident["assigner"]["display"] == MEMBERS["tongjiang"].name
    assert load_guide().validate(made.task, [PROFILE]) == []
    path = tmp_path / "Task-made.json"
    path.write_text(json.dumps(made.task, ensure_ascii=False), encoding="utf-8")
    checked = validate_fhir([path])  # base R4, by the outside validators
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert world.gateways["fuling"].pipeline.exchange.deliver()["delivered"] == 1
    from gateway.commands.referrals import _issuer

    got = auth_refs.get(made.id)
    assert got.issuer == TJ  # was None: the authority did not know whose report it was
    assert _issuer(got) == f"{TJ} {MEMBERS['tongjiang'].name}"  # what `referrals show` prints after "issuer"
    received = next(e for e in entries(auth_refs.db) if e.kind == "referral")
    assert received.content["facts"]["issuer"]["value"] == TJ


# -- 5. answers that cross on the way -------------------------------------------------------------------------------


def test_an_answer_for_a_step_passed_already_is_taken_late_not_refused(world, clock) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=CLERK)
    fl = world.gateways["fuling"].pipeline.exchange
    assert fl.deliver()["delivered"] == 1
    auth = world.gateways["schealth"].pipeline.exchange
    transport = auth.transport
    transport.down.add("fuling")  # the referrer is down while the authority answers twice
    auth_refs.update(made.id, "accepted", note="受理", by=OFFICER)
    auth_refs.update(made.id, "completed", note="已处理", by=OFFICER)
    assert auth.deliver() == {"delivered": 0, "retry": 2, "dead": 0}
    accepted_row, completed_row = sorted(r.id for r in auth.outbox.list())
    with transaction(auth.db):  # the completed answer comes back first
        auth.db.execute("UPDATE outbox SET next_attempt_at = ? WHERE id = ?", [4e9, accepted_row])
    transport.down.discard("fuling")
    clock.advance(hours=2)
    assert auth.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    assert fl_refs.get(made.id).status == "completed"
    with transaction(auth.db):
        auth.db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE id = ?", [accepted_row])
    assert auth.deliver() == {"delivered": 1, "retry": 0, "dead": 0}  # was: 422, dead at the authority
    assert {r.status for r in auth.outbox.list()} == {"delivered"}
    back = fl_refs.get(made.id)
    assert back.status == "completed" and back.task["statusReason"]["text"] == "已处理"  # the later one stands
    late = [e.content["facts"] for e in entries(fl_refs.db) if e.kind == "referral"
            and e.content["facts"]["action"] == "updated"]
    assert [(f["status"], f.get("note")) for f in late] == [
        ("completed", "已处理"), ("accepted", "late: accepted arrived after completed, which stands; 受理")]
    # the same late answer again: the same receipt, nothing more recorded
    text, _ = auth_refs._sign(dict(auth_refs.get(made.id).task, status="accepted", statusReason={"text": "受理"}))
    assert isinstance(fl_refs.receive(text, AUTHORITY_USCC), bytes)
    assert fl_refs.get(made.id).status == "completed"
    # an answer that never follows is still refused
    rejected, _ = auth_refs._sign(dict(auth_refs.get(made.id).task, status="rejected"))
    with pytest.raises(InputError, match="completed: rejected does not follow"):
        fl_refs.receive(rejected, AUTHORITY_USCC)


# -- 4. a corrected report ------------------------------------------------------------------------------------------


def _liver_panel(control_id: str, *, corrected: bool, alt: str) -> bytes:
    """通江's liver panel of 王建国 (OBR-3 R2611200002), original or corrected (as the demo LIS sends it)."""
    status = "C" if corrected else "F"
    segments = [
        f"MSH|^~\\&|LIS|TJXRMYY|GATEWAY|CYHR|20261120090000||ORU^R01^ORU_R01|{control_id}|P|2.5.1||||||UNICODE UTF-8",
        "PID|1||511921196612120011^^^^NNCHN||王^建国||19661212|M",
        "OBR|1|O2611200002|R2611200002|LIVER^肝功能^L|||20261120073000|||||||||||||||20261120"
        f"{'1055' if corrected else '0855'}00|||{status}|||||||2033&陈&明",
        f"OBX|1|NM|ALT^丙氨酸氨基转移酶^L||{alt}|U/L|9-50|N|||{status}",
        f"OBX|2|NM|AST^天门冬氨酸氨基转移酶^L||28|U/L|15-40|N|||{status}",
    ]
    return ("\r".join(segments) + "\r").encode("utf-8")


def test_a_withdrawn_decision_is_not_referred_and_a_corrections_is_referred_already(world) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=CLERK)
    tj = world.gateways["tongjiang"].pipeline
    stored = [o for o in tj.ingest(_liver_panel("TJ2611200102", corrected=True, alt="37"), "hl7v2", channel="test")
              if o.bundle is not None]
    assert stored, "the correction was not stored"
    assert tj.exchange.deliver()["delivered"] >= 1  # the correction follows the original to 涪陵
    fl = world.gateways["fuling"].pipeline.exchange
    alts = [d.to_dict() for d in list_decisions(fl.db) if d.decision["result"]["item"] == "丙氨酸氨基转移酶"]
    withdrawn = next(d for d in alts if d["decision_id"] == decision_id)
    assert withdrawn.get("withdrawn"), withdrawn
    current = next(d for d in alts if not d.get("withdrawn"))
    assert current["outcome"] == "not-recognized"  # EQA failed for ALT still
    # the standing referral's decision was withdrawn: referring it again is refused naming the correction
    with pytest.raises(InputError, match=rf"decision {decision_id} was withdrawn \(superseded by "):
        fl_refs.create(decision_id, "forged", by=CLERK)
    # the corrected report's decision: the same report (通江, R2611200002) stands referred
    with pytest.raises(InputError, match=rf"report R2611200002 of {TJ} was referred already \(referral {made.id}, "
                                         r"requested\) from another version"):
        fl_refs.create(current["decision_id"], "unqualified", by=CLERK)
    assert [r.id for r in fl_refs.list()] == [made.id]
    # once the authority rejects the first, the corrected report may be referred
    assert fl.deliver()["delivered"] == 1
    auth_refs.update(made.id, "rejected", note="报告已更正", by=OFFICER)
    world.gateways["schealth"].pipeline.exchange.deliver()
    assert fl_refs.get(made.id).status == "rejected"
    again = fl_refs.create(current["decision_id"], "unqualified", by=CLERK)
    assert again.status == "requested"


# -- 6. deliveries that fail are audited ----------------------------------------------------------------------------


def _failures(db) -> list[dict]:
    return [e.content["facts"] for e in entries(db) if e.kind == "referral" and e.content["facts"].get("failure")]


def test_a_referral_and_an_answer_that_cannot_be_delivered_are_audited_first_failure_and_end(world, clock) -> None:
    fl_refs, auth_refs, decision_id = referred(world)
    made = fl_refs.create(decision_id, "unqualified", by=CLERK)
    fl = world.gateways["fuling"].pipeline.exchange
    transport = fl.transport
    transport.down.add("schealth")
    fl.outbox.max_attempts = 3
    for _ in range(3):
        fl.deliver()
        clock.advance(hours=2)
    (row,) = fl.outbox.list()
    assert row.status == "dead" and row.destination == LANE + AUTHORITY_USCC
    failed = _failures(fl_refs.db)
    assert [(f["action"], f["failure"], f["outcome"], f["status"]) for f in failed] == [
        ("sent", "retrying", "8", "requested"), ("sent", "gave-up", "8", "requested")]
    assert all(f["task_id"] == made.id and f"outbox #{row.id}" in f["note"] for f in failed)
    assert "attempt 1 of 3" in failed[0]["note"] and "attempt 3 of 3" in failed[1]["note"]
    assert fl_refs.get(made.id).status == "requested"  # not delivered: unchanged

    transport.down.discard("schealth")
    fl.outbox.retry(row.id)
    assert fl.deliver()["delivered"] == 1
    # the authority's answer cannot reach the referrer
    transport.down.add("fuling")
    auth = world.gateways["schealth"].pipeline.exchange
    auth_refs.update(made.id, "accepted", note="受理", by=OFFICER)
    assert auth.deliver() == {"delivered": 0, "retry": 1, "dead": 0}
    answered = _failures(auth_refs.db)
    assert [(f["failure"], f["outcome"], f["status"], f["requester"]["value"]) for f in answered] == [
        ("retrying", "8", "accepted", FL)]
    assert "not delivered to " + FL in answered[0]["note"]
    # the audit chain renders them as AuditEvents still, with the failure's outcome (it read 0, success)
    from gateway.audit.log import entries
    from gateway.audit.verify import verify

    rendered = [e.event() for e in entries(auth_refs.db) if e.kind == "referral" and e.facts.get("failure")]
    assert [ev["outcome"] for ev in rendered] == ["8"]

    assert verify(auth_refs.db).ok and verify(fl_refs.db).ok
