"""Referral of a violation (移送): a report from an unqualified (or forged) issuer, referred to its authority.

A receiving member that finds a report it cannot accept because its issuer was not qualified (or the report
looks forged) refers it to the authority that approved or filed the issuer, as the registry snapshot names it
(the qualifications' ``authority.uscc``, an entry of ``authorities`` with its gateway ``endpoint``). The
referral is a FHIR R4 Task (profile ``cyhr-referral-task``):

- ``code``: the reason (CodeSystem ``referral-reason``: unqualified, out-of-scope, suspended, forged);
- ``focus``: the report, by its 检验报告单号 with the issuer (USCC and name) as the number's ``assigner`` (a number
  is unique per issuer only); ``requester``: this member; ``owner``: the authority (both by USCC);
- ``input``: the evidence — the kept signed Bundle's hash and id, the decision id, each failing rule, a note.

The Task travels signed, inside a ``collection`` Bundle signed like report Bundles are, through the same
outbox (a lane of its own per destination, retries, leases) to ``<endpoint>/exchange/tasks``, with a client
assertion; the receiver answers with a signed receipt. Its status is tracked on both sides:
``requested`` (made here) → ``received`` (the authority's gateway took it) → ``accepted`` / ``rejected`` /
``completed`` (the authority answers with a Task update over the same exchange, signed and authenticated as
the authority, whose gateway certificates the registry lists under ``authorities``). Every step is audited
(kind ``referral``) on both sides, and so is a delivery that fails (its first failure and its end). An answer for
a step the referral has passed already (``accepted`` arriving after ``completed``) is taken and audited as late.

Only a failed rule that is an institution's violation grounds a referral, and only one that fits its reason
(:data:`GROUNDS`); a withdrawn decision (its report corrected) is not referred; one referral stands per decision,
and per report across its versions (the issuer's 检验报告单号).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import jsonutil
from gateway.audit import records
from gateway.audit.log import append
from gateway.errors import InputError, NotFound, ProfileViolation, TrustError, UnknownIssuer
from gateway.exchange.service import read_receipt
from gateway.naming import IG_BASE, SYSTEM_LAB_REPORT_NO, SYSTEM_USCC, cs_url, sd_url
from gateway.signing.canonical import document_bytes, parse_json
from gateway.signing.jws import verify_bundle
from gateway.signing.keys import kid_of, uscc_of
from gateway.store.db import Database, transaction
from gateway.store.exchange import SignedBundles
from gateway.store.referrals import COLUMNS as _COLUMNS
from gateway.store.referrals import ReferralStore

__all__ = ["REASONS", "STATUSES", "ANSWERS", "GROUNDS", "LANE", "TASK_PATH", "PROFILE", "Referrals", "Referral",
           "issuer_of", "ReferralConflict", "ensure_schema"]

#: Reasons for a referral (CodeSystem referral-reason): code -> display.
REASONS = {
    "unqualified": "出具机构不具备相应资质",
    "out-of-scope": "超出资质或备案范围",
    "suspended": "资质已暂停或注销",
    "forged": "报告疑似伪造或篡改",
}
#: Task statuses a referral goes through.
STATUSES = ("requested", "received", "accepted", "rejected", "completed", "cancelled")
#: What the authority may answer, from each status.
ANSWERS = {"received": ("accepted", "rejected", "completed"), "accepted": ("completed",)}  # (FHIR Task: rejected
#: is an answer before the work begins, never after accepted)
#: Outbox destinations of referrals: ``referral:<USCC>``, a lane apart from report Bundles.
LANE = "referral:"
TASK_PATH = "/exchange/tasks"
PROFILE = sd_url("cyhr-referral-task")
CS_REASON = cs_url("referral-reason")
CS_EVIDENCE = cs_url("referral-evidence")
SYSTEM_REFERRAL = f"{IG_BASE}/sid/referral"
SYSTEM_DECISION = f"{IG_BASE}/sid/decision"
SYSTEM_BUNDLE_SHA256 = f"{IG_BASE}/sid/bundle-sha256"


class ReferralConflict(InputError):
    """The referral changed since it was read: another answer was recorded first (409)."""

    code = "conflict"
    http_status = 409


def ensure_schema(db: Database) -> None:
    """Create the referrals table when missing (once per connection)."""
    ReferralStore(db).ensure_schema()


@dataclass(frozen=True)
class Referral:
    """One referral as kept here."""

    id: str
    side: str
    status: str
    reason: str
    requester: str
    owner: str
    issuer: str | None
    report: str
    decision_id: str | None
    bundle_hash: str | None
    note: str | None
    task: dict[str, Any]
    created_at: str
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what ``gateway referrals show --json`` prints), the Task included."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _row(values: Any) -> Referral:
    data = dict(zip(_COLUMNS, values))
    data["task"] = jsonutil.loads(data["task"])
    return Referral(**data)


#: Rules whose failure shows an issuer lacked (or did not hold in the scope needed) a qualification, a filing or a
#: physician's qualification on the report date: what ``unqualified`` and ``out-of-scope`` rest on.
_QUALIFICATION_RULES = frozenset({"eqa-pass", "occupational-filing", "occupational-physician",
                                  "technical-service-qualification"})
#: For each referral reason, the failed rules that can ground it (CodeSystem referral-reason's definitions):
#:
#: - ``unqualified`` / ``out-of-scope``: a qualification rule (EQA for the item, 职业健康检查 filing, the 主检医师's
#:   qualification, the technical-service qualification);
#: - ``suspended``: the issuer was no active member on the result date (``member-active``), or a qualification rule
#:   (a suspended or revoked qualification fails it);
#: - ``forged``: the Bundle was not signed by the reading institution the report names (``reading-signature``), or
#:   the report claims what its issuer could not issue (``member-active``, a qualification rule). A signature that
#:   does not verify never reaches a decision: the Bundle is refused.
#:
#: Every other failure is no institution's violation: the catalogue does not list the item or its scope does not
#: cover the two members (``catalogue-item``, ``catalogue-scope``), the window passed (``validity-window``), the
#: mark or the level direction does not fit (``mark``, ``direction``: the catalogue's terms, not a qualification),
#: the result has no value (``result-value``), the receiver issued it (``between-institutions``), the report is
#: preliminary or superseded (``report-status``), a diagnostic conclusion (never recognised, by design).
GROUNDS: dict[str, frozenset[str]] = {
    "unqualified": _QUALIFICATION_RULES,
    "out-of-scope": _QUALIFICATION_RULES,
    "suspended": _QUALIFICATION_RULES | {"member-active"},
    "forged": _QUALIFICATION_RULES | {"member-active", "reading-signature"},
}
#: Statuses in which a referral stands (one made again meanwhile is "referred already").
STANDING = ("requested", "received", "accepted", "completed")


def _rule_id(rule: dict[str, Any]) -> str:
    return str(rule.get("rule") or rule.get("id") or "")


class _WithAuthorities:
    """The snapshot as a trust source that also lists the authorities' gateway certificates."""

    def __init__(self, snapshot: Any) -> None:
        self.snapshot = snapshot
        self.supervisors = snapshot.supervising_authorities()

    def certificates_for_kid(self, kid: str) -> list[x509.Certificate]:
        own = [mc.certificate for a in self.supervisors.values() for mc in a.certificates
               if kid_of(mc.certificate) == kid]
        return list(self.snapshot.certificates_for_kid(kid)) + own

    def authorities(self) -> list[x509.Certificate]:
        return list(self.snapshot.authorities())

    def is_listed(self, cert: x509.Certificate, at: _dt.datetime) -> bool:
        if self.snapshot.is_listed(cert, at):
            return True
        fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        body = self.supervisors.get(uscc_of(cert) or "")
        return body is not None and any(mc.fingerprint == fingerprint and mc.valid_at(at) for mc in body.certificates)


def trust_with_authorities(snapshot: Any) -> Any:
    """The snapshot as a trust source that lists the supervising authorities' gateway certificates too (what a
    referral's answer is verified against; an authority's own /health asks it of its signing certificate)."""
    return _WithAuthorities(snapshot)


def _org(uscc: str, name: str | None) -> dict[str, Any]:
    ref: dict[str, Any] = {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": uscc}}
    if name:
        ref["display"] = name
    return ref


def _evidence(code: str, display: str, **value: Any) -> dict[str, Any]:
    return {"type": {"coding": [{"system": CS_EVIDENCE, "code": code, "display": display}]}, **value}


def _uscc_of_ref(ref: Any) -> str:
    ident = ref.get("identifier") if isinstance(ref, dict) else None
    return str(ident.get("value", "")) if isinstance(ident, dict) else ""


def _focus_of(task: dict[str, Any]) -> str:
    """The 检验报告单号 of the report a Task refers: its ``focus.identifier.value``.

    :raises InputError: a focus by reference alone (it names nothing the other gateway keeps), or none.
    """
    focus = task.get("focus")
    ident = focus.get("identifier") if isinstance(focus, dict) else None
    value = ident.get("value") if isinstance(ident, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise InputError("a referral names its report by identifier (the 检验报告单号), not by a reference alone",
                         "Task.focus.identifier.value")
    return value


def _code_in(concept: Any, system: str) -> str | None:
    """The code of ``concept``'s first coding from ``system`` (whatever codings come before it)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    for coding in codings if isinstance(codings, list) else []:
        if isinstance(coding, dict) and coding.get("system") == system and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def _reason_of(task: dict[str, Any]) -> str:
    """:raises InputError: the Task's ``code`` has no coding from the referral-reason CodeSystem."""
    reason = _code_in(task.get("code"), CS_REASON)
    if reason is None:
        raise InputError(f"a referral's reason is a code from {CS_REASON}", "Task.code")
    return reason


def _evidence_reference(task: dict[str, Any], kind: str) -> str | None:
    """``valueReference.identifier.value`` of the Task's first input of evidence type ``kind``, if any."""
    inputs = task.get("input")
    for item in inputs if isinstance(inputs, list) else []:
        if isinstance(item, dict) and _code_in(item.get("type"), CS_EVIDENCE) == kind:
            ident = (item.get("valueReference") or {}).get("identifier")
            value = ident.get("value") if isinstance(ident, dict) else None
            return value if isinstance(value, str) else None
    return None


def issuer_of(task: dict[str, Any]) -> tuple[str | None, str | None]:
    """(USCC, name) of the institution whose report a Task refers: ``focus.identifier.assigner``."""
    focus = task.get("focus")
    ident = focus.get("identifier") if isinstance(focus, dict) else None
    assigner = ident.get("assigner") if isinstance(ident, dict) else None
    uscc = _uscc_of_ref(assigner) or None
    name = assigner.get("display") if isinstance(assigner, dict) else None
    return uscc, name if isinstance(name, str) else None


def _evidence_value(task: dict[str, Any], kind: str) -> str | None:
    """``valueIdentifier.value`` of the Task's first input of evidence type ``kind``, if any."""
    inputs = task.get("input")
    for item in inputs if isinstance(inputs, list) else []:
        if isinstance(item, dict) and _code_in(item.get("type"), CS_EVIDENCE) == kind:
            ident = item.get("valueIdentifier")
            value = ident.get("value") if isinstance(ident, dict) else None
            return value if isinstance(value, str) else None
    return None


class Referrals:
    """This gateway's referrals: made here (requester side) or received as the authority (owner side)."""

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange
        self.settings = exchange.settings
        self.clock = exchange.clock

    @property
    def db(self) -> Database:
        db: Database = self.exchange.db
        ensure_schema(db)
        return db

    @property
    def rows(self) -> ReferralStore:
        """The referrals' storage, on this thread's connection."""
        return ReferralStore(self.db)

    @property
    def me(self) -> str:
        return str(self.settings.issuer_uscc)

    def _trust(self) -> _WithAuthorities:
        return _WithAuthorities(self.exchange._snapshot())

    def _name_of(self, uscc: str) -> str | None:
        snapshot = self.exchange._snapshot()
        member = snapshot.member(uscc)
        if member is not None:
            return str(member.name)
        body = snapshot.supervising_authorities().get(uscc)
        return str(body.name) if body is not None else None

    # -- reading ---------------------------------------------------------------------------

    def get(self, referral_id: str) -> Referral:
        """:raises NotFound: no referral with that id here."""
        row = self.rows.row(referral_id)
        if row is None:
            raise NotFound(f"no referral {referral_id}", "referral")
        return _row(row)

    def list(self, *, status: str | None = None, focus: str | None = None, limit: int = 100) -> list[Referral]:
        """Referrals, newest first, narrowed to a status and/or a focus (report reference or 检验报告单号)."""
        return [_row(r) for r in self.rows.rows(status=status, focus=focus, limit=limit)]

    # -- making a referral -----------------------------------------------------------------

    def authority_for(self, issuer: str, chosen: str | None = None) -> str:
        """The authority a report of ``issuer`` is referred to: ``chosen``, else the one that approved or filed
        the issuer (its qualifications' authority, one in the issuer's province first).

        :raises InputError: the registry names none with an endpoint.
        """
        snapshot = self.exchange._snapshot()
        bodies = snapshot.supervising_authorities()
        if chosen:
            body = bodies.get(chosen)
            if body is None or not body.endpoint:
                raise InputError(f"{chosen} is not an authority with an endpoint in the registry snapshot",
                                 "authority")
            return chosen
        member = snapshot.member(issuer)
        province = member.province if member is not None else issuer[2:4]
        found: list[str] = []
        for q in snapshot.qualifications:
            if q.member != issuer:
                continue
            uscc = q.authority_uscc or next((b.uscc for b in bodies.values() if b.name == q.authority_name), None)
            if uscc and uscc in bodies and bodies[uscc].endpoint and uscc not in found:
                found.append(uscc)
        if not found:
            raise InputError(f"the registry snapshot names no authority with an endpoint for issuer {issuer}: "
                             "give --authority", "authority")
        found.sort(key=lambda u: bodies[u].province != province)
        return found[0]

    def create(self, decision_id: str, reason: str, *, note: str | None = None, by: records.Party,
               authority: str | None = None) -> Referral:
        """Refer the report a decision of this gateway was about; queued for delivery, audited.

        :raises InputError: unknown reason, the decision was not made here, no signed Bundle kept for the
            report, or no authority to refer to. :raises NotFound: no such decision.
        """
        from gateway.recognition.store import get_decision

        if reason not in REASONS:
            raise InputError(f"unknown referral reason {reason!r}: use {', '.join(REASONS)}", "reason")
        decision = get_decision(self.exchange.db, decision_id).to_dict()
        result = decision.get("result") or {}
        if decision.get("receiver") != self.me:
            raise InputError(f"decision {decision_id} was made for {decision.get('receiver')}, not this member",
                             "decision")
        withdrawn = decision.get("withdrawn")
        if isinstance(withdrawn, dict):
            raise InputError(f"decision {decision_id} was withdrawn ({withdrawn.get('reason') or 'superseded'}): "
                             "its report was replaced by a correction; refer the corrected report's decision",
                             "decision")
        issuer, report, bundle_id = result.get("issuer"), str(result.get("report") or ""), result.get("bundle")
        report = report.rsplit("|", 1)[-1]  # system|检验报告单号
        bundle_id = str(bundle_id or "").removeprefix("urn:uuid:")
        if not issuer or not report:
            raise InputError(f"decision {decision_id} names no issuer or report to refer", "decision")
        failing = [r for r in decision.get("rules", []) if r.get("status") == "failed" or r.get("passed") is False]
        if not [r for r in failing if _rule_id(r) != "diagnostic-conclusion"]:
            raise InputError(f"decision {decision_id} failed no rule a referral could name ("
                             f"{decision.get('outcome')}): a referral carries the rules a result failed", "decision")
        grounds = [r for r in failing if _rule_id(r) in GROUNDS[reason]]
        if not grounds:
            named = ", ".join(sorted({_rule_id(r) for r in failing}))
            raise InputError(f"decision {decision_id} failed {named}: no institution's violation a referral for "
                             f"{reason} rests on (it rests on a failure of {', '.join(sorted(GROUNDS[reason]))})",
                             "decision")
        row = SignedBundles(self.db).latest_received(bundle_id or "")
        if row is None:
            raise InputError(f"no signed Bundle is kept for the report of decision {decision_id}: a referral needs "
                             "it as evidence", "decision")
        bundle_hash = str(row[0])
        owner = self.authority_for(str(issuer), authority)
        now = self.clock()
        referral_id = str(uuid.uuid4())
        signed_bundle = f"urn:uuid:{bundle_id}" if bundle_id else bundle_hash
        inputs = [
            _evidence("signed-bundle-hash", "签名报告包摘要",
                      valueIdentifier={"system": SYSTEM_BUNDLE_SHA256, "value": bundle_hash}),
            _evidence("signed-bundle", "签名报告包", valueReference={"type": "Bundle", "identifier": {
                "system": "urn:ietf:rfc:3986", "value": signed_bundle}}),
            _evidence("decision", "互认决定", valueIdentifier={"system": SYSTEM_DECISION, "value": decision_id}),
            *(_evidence("failing-rule", "未通过的规则",
                        valueString=f"{_rule_id(r)}: {r.get('message') or r.get('detail') or ''}".rstrip(": "))
              for r in failing),
        ]
        if note:
            inputs.append(_evidence("note", "说明", valueString=note))
        issuer_name = self._name_of(str(issuer))
        task: dict[str, Any] = {
            "resourceType": "Task",
            "id": referral_id,
            "meta": {"profile": [PROFILE]},
            "identifier": [{"system": SYSTEM_REFERRAL, "value": referral_id}],
            "status": "requested",
            "intent": "proposal",
            "code": {"coding": [{"system": CS_REASON, "code": reason, "display": REASONS[reason]}]},
            # the report by its number as the issuer assigned it: a 检验报告单号 is unique per issuer only
            "focus": {"type": "DiagnosticReport",
                      "identifier": {"system": SYSTEM_LAB_REPORT_NO, "value": report,
                                     "assigner": _org(str(issuer), issuer_name)},
                      "display": f"{issuer_name or issuer} 检验报告 {report}"
                      + (f"（{result['item']}）" if result.get("item") else "")},
            "authoredOn": now.isoformat(),
            "lastModified": now.isoformat(),
            "requester": _org(self.me, self.settings.issuer_name),
            "owner": _org(owner, self._name_of(owner)),
            "input": inputs,
        }
        if note:
            task["description"] = note
        self._check(task)
        text, _ = self._sign(task)
        focus = f"DiagnosticReport/{report}"
        with transaction(self.db):
            # under the write lock (both engines), so that two referrals made at once are checked one after the other
            self._not_referred_already(decision_id, str(issuer), focus, signed_bundle)
            self.rows.add([referral_id, "requester", "requested", reason, self.me, owner, issuer, focus,
                           decision_id, bundle_hash, note, jsonutil.dumps(task), now.isoformat(), now.isoformat()])
            self._audit("created", task, by=by, note=note, decision_id=decision_id, bundle_hash=bundle_hash)
            self.exchange.outbox.enqueue(LANE + owner, self.url_for(LANE + owner), text, kind="referral")
        return self.get(referral_id)

    def _not_referred_already(self, decision_id: str, issuer: str, focus: str, signed_bundle: str) -> None:
        """:raises InputError: a referral made here stands for the same decision, or for another version of the
        same report (the issuer's same 检验报告单号: a correction's decision while the original's referral stands,
        or the other way round)."""
        for values in self.rows.standing(issuer, focus, STANDING):
            earlier = _row(values)
            if earlier.decision_id == decision_id:
                raise InputError(f"decision {decision_id} was referred already (referral {earlier.id}, "
                                 f"{earlier.status})", "decision")
            version = _evidence_reference(earlier.task, "signed-bundle")
            if version and version != signed_bundle:
                raise InputError(f"report {focus.removeprefix('DiagnosticReport/')} of {issuer} was referred already "
                                 f"(referral {earlier.id}, {earlier.status}) from another version of it (decision "
                                 f"{earlier.decision_id}, {version})", "decision")

    def _check(self, task: dict[str, Any]) -> None:
        from gateway.fhir.profiles import load_guide

        errors = [i for i in load_guide().validate(task, [PROFILE]) if i.severity in ("error", "fatal")]
        if errors:
            raise ProfileViolation(errors)

    def _sign(self, task: dict[str, Any]) -> tuple[bytes, str]:
        envelope = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
                    "timestamp": self.clock().isoformat(),
                    "entry": [{"fullUrl": f"urn:uuid:{task['id']}", "resource": task}]}
        text, digest = self.exchange.member.require_signer().sign_with_digest(envelope)
        return text, digest

    def _audit(self, action: str, task: dict[str, Any], *, by: records.Party | None = None, note: str | None = None,
               decision_id: str | None = None, bundle_hash: str | None = None, issuer: str | None = None,
               db: Database | None = None, outcome: records.Outcome = records.Outcome.SUCCESS,
               failure: str | None = None) -> None:
        requester, owner = task["requester"], task["owner"]
        row = ReferralStore(db or self.db).evidence(task["id"])
        report = row[1] if row else f"DiagnosticReport/{_focus_of(task)}"
        append(db or self.db, records.referral(
            action, at=self.clock(), gateway=records.Party.member(self.me), task_id=task["id"],
            status=task["status"], reason=_reason_of(task),
            requester=records.Party.member(_uscc_of_ref(requester), requester.get("display")),
            owner=records.Party.member(_uscc_of_ref(owner), owner.get("display")), report=report,
            issuer=records.Party.member(str(row[0] if row and row[0] else issuer)) if (row and row[0]) or issuer
            else None,
            decision_id=decision_id or (row[2] if row else None), bundle_hash=bundle_hash or (row[3] if row else None),
            by=by, note=note, outcome=outcome, failure=failure))

    # -- the authority's answer ------------------------------------------------------------

    def update(self, referral_id: str, status: str, *, note: str | None = None, by: records.Party) -> Referral:
        """The authority answers a referral it received: accepted, rejected or completed; the Task update is
        signed and queued for the referring member, and audited.

        :raises InputError: this gateway is not the referral's authority, or the status does not follow.
        :raises ReferralConflict: another answer was recorded while this one was made (nothing is written).
        :raises NotFound: no such referral.
        """
        current = self.get(referral_id)
        if current.side != "owner":
            raise InputError(f"referral {referral_id} was made here; only its authority ({current.owner}) answers it",
                             "referral")
        if status not in ANSWERS.get(current.status, ()):
            allowed = ", ".join(ANSWERS.get(current.status, ())) or "nothing (it is closed)"
            raise InputError(f"referral {referral_id} is {current.status}: it can become {allowed}", "status")
        now = self.clock()
        task = dict(current.task, status=status, lastModified=now.isoformat())
        if note:
            task["statusReason"] = {"text": note}
        else:
            task.pop("statusReason", None)
        self._check(task)
        text, _ = self._sign(task)
        with transaction(self.db):
            # only from the status read above: another answer recorded meanwhile makes this one a conflict
            if not self.rows.answer(referral_id, status, jsonutil.dumps(task), note, now.isoformat(), current.status):
                raise ReferralConflict(f"referral {referral_id} is now {self.get(referral_id).status}: it was answered "
                                       f"meanwhile, so {status} was not recorded", "status")
            self._audit("updated", task, by=by, note=note)
            destination = LANE + current.requester
            self.exchange.outbox.enqueue(destination, self.url_for(destination), text, kind="referral")
        return self.get(referral_id)

    # -- delivery (outbox hooks, called by the exchange's delivery lanes) -------------------

    def url_for(self, destination: str) -> str:
        """``<endpoint>/exchange/tasks`` of an authority or member, from the snapshot in force.

        :raises UnknownIssuer: neither lists an endpoint.
        """
        uscc = destination.removeprefix(LANE)
        snapshot = self.exchange._snapshot()
        body = snapshot.supervising_authorities().get(uscc)
        endpoint = body.endpoint if body is not None else None
        if endpoint is None:
            member = snapshot.member(uscc)
            endpoint = member.endpoint if member is not None else None
        if not endpoint:
            raise UnknownIssuer(f"{uscc} has no endpoint in the registry snapshot", "destination")
        return str(endpoint).rstrip("/").removesuffix("/fhir") + TASK_PATH

    def check_receipt(self, destination: str, payload: bytes, text: bytes) -> dict[str, Any]:
        """Verify the receipt of a delivered referral or update.

        :raises TrustError: not a receipt, not signed by the destination, or for another document.
        """
        body, signer = read_receipt(text, self._trust(), self.clock())
        expected = destination.removeprefix(LANE)
        sent = hashlib.sha256(document_bytes(parse_json(payload))).hexdigest()
        if signer != expected or body.get("receiver") != expected or body.get("sha256") != sent:
            raise TrustError(f"receipt signed by {signer} for another document, expected {expected}", "receipt")
        return dict(body)

    def delivered(self, db: Database, payload: bytes, receipt: dict[str, Any] | None) -> None:
        """Inside the outbox's transaction: a referral (or an answer) reached its destination."""
        task = _task_of(parse_json(payload))
        ensure_schema(db)
        rows = ReferralStore(db)
        row = rows.side_and_status(task["id"])
        if row is None:
            return
        if row[0] == "requester" and row[1] == "requested" and receipt and receipt.get("status") == "received":
            task = dict(task, status="received")
            rows.set_status(task["id"], "received", jsonutil.dumps(task), self.clock().isoformat())
        self._audit("sent", task, db=db)

    def failed(self, db: Database, delivery: Any, failure: Any) -> None:
        """Inside the outbox's transaction: a referral (or an answer) did not reach its destination — its first
        failure (to be tried again) or its end (attempts used up, refused, not sent). Audited as a delivery
        (``sent``) with outcome 4 (refused by the destination, or not sent) or 8 (unreachable or failing) and the
        failure's reason (``retrying``, ``gave-up``, ``refused-by-receiver``, ``not-sent``), as a failed Bundle
        push is; the referral's status is unchanged."""
        try:
            task = _task_of(parse_json(delivery.payload))
            _reason_of(task)
            _focus_of(task)
        except Exception:  # noqa: BLE001 - a payload that does not read is the outbox's record alone
            return
        if not isinstance(task.get("requester"), dict) or not isinstance(task.get("owner"), dict):
            return
        ensure_schema(db)
        row = ReferralStore(db).side_and_status(task["id"])
        if row is not None and row[0] == "requester":
            task = dict(task, status=row[1])  # the referral as it stands here
        detail = (f"not delivered to {delivery.destination.removeprefix(LANE)} ({failure.reason}): outbox "
                  f"#{delivery.id}, attempt {failure.attempts} of {failure.max_attempts}: {failure.error}; "
                  f"{failure.then}")
        self._audit("sent", task, db=db, note=detail[:1000], failure=failure.reason,
                    outcome=records.Outcome.MINOR_FAILURE if failure.refused else records.Outcome.SERIOUS_FAILURE)

    # -- receiving (POST /exchange/tasks) --------------------------------------------------

    def authenticate(self, authorization: str) -> str:
        """The caller (member or authority) of ``/exchange/tasks``.

        :raises PeerAuthError: missing or invalid (401). :raises UnknownIssuer: unknown or revoked (403).
        """
        from gateway.exchange.peer_auth import PeerAuthError, verify_assertion

        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise PeerAuthError("a signed client assertion is required (Authorization: Bearer ...)")
        return verify_assertion(token.strip(), self._trust(), audiences=[self.settings.base_url + "/exchange"],
                                now=self.clock(), replay=self.exchange.replay)

    def receive(self, text: bytes, peer: str) -> bytes:
        """Take a signed referral (this gateway is its authority) or an answer to one made here; returns the
        signed receipt (the same one when the same referral arrives again).

        :raises BadSignature, UnknownIssuer, TrustError: the envelope does not verify or was signed by another
            party than the caller. :raises InputError: not a referral for this gateway, or an answer that does
            not follow. :raises ProfileViolation: the Task breaks its profile.
        """
        verified = verify_bundle(text, self._trust(), at=self.clock())
        if verified.signer_uscc != peer:
            raise UnknownIssuer(f"the referral was signed by {verified.signer_uscc}, not the caller {peer}",
                                "Bundle.signature")
        task = _task_of(verified.bundle)
        self._check(task)
        requester, owner = _uscc_of_ref(task["requester"]), _uscc_of_ref(task["owner"])
        ensure_schema(self.db)
        # which side a referral is kept on, and the receipt given for it, never change once written: a row read
        # here may be out of date only by being missing, which keeping it below settles
        existing = self.rows.side_and_receipt(task["id"])
        now = self.clock()
        body = {"receiver": self.me, "task": task["id"], "sha256": verified.document_sha256,
                "received_at": now.isoformat()}
        if existing is None or existing[0] == "owner":
            if owner != self.me or requester != peer:
                raise InputError(f"a referral from {peer} must name it as requester and this gateway ({self.me}) "
                                 "as owner", "Task.owner")
            if existing is not None and existing[1]:
                return str(existing[1]).encode("utf-8")
            return self._take(task, body, peer, requester, owner)
        return self._take_answer(task, body, peer)

    def _take(self, task: dict[str, Any], body: dict[str, Any], peer: str, requester: str, owner: str) -> bytes:
        """A referral this gateway is the authority of, kept once: the same receipt for a delivery that arrives
        again, even at the same moment."""
        focus = f"DiagnosticReport/{_focus_of(task)}"
        reason = _reason_of(task)
        task = dict(task, status="received")
        body = dict(body, status="received")
        receipt: bytes = self.exchange.member.require_signer().receipt(body)
        at = body["received_at"]
        with transaction(self.db):
            kept = self.rows.add_received(
                [task["id"], "owner", "received", reason, requester, owner, issuer_of(task)[0], focus,
                 _evidence_value(task, "decision"), _evidence_value(task, "signed-bundle-hash"),
                 task.get("description"), jsonutil.dumps(task), at, at], receipt.decode("utf-8"))
            if not kept:  # taken meanwhile by another delivery of it
                row = self.rows.side_and_receipt(task["id"])
                if row is not None and row[0] == "owner" and row[1]:
                    return str(row[1]).encode("utf-8")
                raise InputError(f"referral {task['id']} is already known here", "Task.identifier")
            self._audit("received", task, by=records.Party.member(peer), note=task.get("description"))
        return receipt

    def _take_answer(self, task: dict[str, Any], body: dict[str, Any], peer: str) -> bytes:
        """The authority's answer to a referral made here, checked against its status as it is when written."""
        current = self.get(task["id"])  # its parties never change
        if peer != current.owner or _uscc_of_ref(task["owner"]) != current.owner:
            raise UnknownIssuer(f"only {current.owner} answers referral {task['id']}", "Task.owner")
        status = task["status"]
        answer: bytes = self.exchange.member.require_signer().receipt(dict(body, status=status))
        note = (task.get("statusReason") or {}).get("text")
        with transaction(self.db):
            row = self.rows.side_and_status(task["id"])
            now_status = str(row[1]) if row else current.status
            if status == now_status:
                return answer  # the same answer again
            if now_status in _after(status):
                # a step this referral has passed already (the authority's answers crossed on the way: completed
                # delivered before accepted): taken into the history (audited as late), the later status kept
                late = f"late: {status} arrived after {now_status}, which stands"
                self._audit("updated", dict(task, status=status), by=records.Party.member(
                    peer, current.task["owner"].get("display")), note=f"{late}; {note}" if note else late)
                return answer
            follows = ANSWERS.get(now_status, ()) if now_status != "requested" else ANSWERS["received"]
            if status not in follows:
                raise InputError(f"referral {task['id']} is {now_status}: {status} does not follow", "Task.status")
            self.rows.set_status(task["id"], status, jsonutil.dumps(task), body["received_at"])
            self._audit("updated", task, by=records.Party.member(peer, current.task["owner"].get("display")),
                        note=note)
        return answer


def _after(status: str) -> set[str]:
    """Every status a referral may reach from ``status`` by the authority's answers."""
    found: set[str] = set()
    todo = list(ANSWERS.get(status, ()))
    while todo:
        nxt = todo.pop()
        if nxt not in found:
            found.add(nxt)
            todo += ANSWERS.get(nxt, ())
    return found


def _task_of(bundle: Any) -> dict[str, Any]:
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    tasks = [e.get("resource") for e in entries or [] if isinstance(e, dict)
             and isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Task"]
    if len(tasks) != 1 or bundle.get("type") != "collection":
        raise InputError("a referral is a collection Bundle holding exactly one Task", "Bundle.entry")
    task: dict[str, Any] = dict(tasks[0] or {})
    if not isinstance(task.get("id"), str) or not task["id"]:
        raise InputError("the Task has no id", "Task.id")
    return task


def referrals_of(app: Any) -> Referrals:
    """The referrals of a Flask app's gateway.

    :raises ConfigError: the gateway takes no exchange.
    """
    from gateway.api.exchange import exchange_of

    return Referrals(exchange_of(app))
