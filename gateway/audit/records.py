"""Audit records: the typed facts of every event the gateway must log.

Each helper below turns what one part of the gateway knows about an action
into a :class:`Record` (kind, time, JSON facts). The caller appends it with
:func:`gateway.audit.log.append` inside the transaction of the action itself,
so the action and its audit entry commit together or not at all::

    with transaction(db):
        store_bundle(db, ...)
        append(db, records.exchange("received", at=now, gateway=me, peer=sender, bundle_hash=h))

Facts are plain JSON (strings, integers, booleans, lists, objects) and carry a
``v`` (facts version): :mod:`gateway.audit.render` turns them into an R4
AuditEvent the same way for ever, so an entry written today renders the same
in ten years. Patient identifiers are kept as FHIR requires (the audit log is
protected by access rules); they never go to application logs.

Times are parameters (``at``), never read here: the caller's clock decides.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from gateway import __version__
from gateway.errors import InputError
from gateway.naming import IG_BASE, SYSTEM_ID_CARD, SYSTEM_LAB_REPORT_NO, SYSTEM_STAFF, SYSTEM_USCC
from gateway.recognition.overrides import RETEST_REASONS

__all__ = [
    "FACTS_VERSION",
    "KINDS",
    "Outcome",
    "Party",
    "PatientRef",
    "RuleResult",
    "Record",
    "DECISION_OUTCOMES",
    "RETEST_REASONS",
    "user_system",
    "application_system",
    "exchange",
    "ingest",
    "decision",
    "override",
    "withdrawal",
    "from_decision",
    "from_override",
    "patient_read",
    "registry_applied",
    "audit_query",
    "user_admin",
    "user_login",
    "operator_action",
    "token_request",
]

#: Version of the facts layout written by this module; the renderer keeps every version it has seen.
FACTS_VERSION = 1

KINDS = ("exchange", "ingest", "decision", "override", "read", "registry", "query", "security", "login", "operator",
         "token", "withdrawal", "referral")

#: Outcome of a recognition decision (ANCHORS §2.5). ``needs-review``: the engine could not decide alone.
DECISION_OUTCOMES = ("recognized", "not-recognized", "needs-review")


def user_system(member_uscc: str) -> str:
    """Identifier system of one member gateway's user accounts (new URI, defined here)."""
    return f"{IG_BASE}/sid/gateway-user/{member_uscc}"


def application_system(member_uscc: str) -> str:
    """Identifier system of one member's own applications (HIS, LIS) by name (new URI, defined here)."""
    return f"{IG_BASE}/sid/application/{member_uscc}"


class Outcome(str, Enum):
    """AuditEvent.outcome (R4 audit-event-outcome)."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # refused input, a 4xx
    SERIOUS_FAILURE = "8"  # not done, e.g. not recognised
    MAJOR_FAILURE = "12"  # the gateway itself failed


@dataclass(frozen=True)
class Party:
    """Someone or something taking part: a member institution, a user, a physician, a system.

    Rendered as an R4 Reference: ``reference`` when a resource exists, the
    ``identifier`` (``system`` + ``value``) otherwise or as well, and ``display``.
    """

    value: str
    system: str | None = None
    display: str | None = None
    reference: str | None = None

    @classmethod
    def member(cls, uscc: str, name: str | None = None) -> Party:
        """A member institution (or its gateway) by 统一社会信用代码."""
        return cls(uscc, SYSTEM_USCC, name)

    @classmethod
    def user(cls, member_uscc: str, username: str, display: str | None = None) -> Party:
        """A user account of a member gateway."""
        return cls(username, user_system(member_uscc), display)

    @classmethod
    def staff(cls, staff_id: str, name: str | None = None) -> Party:
        """A physician or technician by 医务人员 ID (urn:oid:2.16.156.10011.1.4)."""
        return cls(staff_id, SYSTEM_STAFF, name)

    @classmethod
    def application(cls, member_uscc: str, name: str, display: str | None = None) -> Party:
        """One of a member's own systems (HIS, LIS), by the name it sends (MSH-3)."""
        return cls(name, application_system(member_uscc), display)

    def facts(self) -> dict[str, str]:
        """The party as JSON facts."""
        return _drop_none(
            {"value": self.value, "system": self.system, "display": self.display, "reference": self.reference}
        )


@dataclass(frozen=True)
class PatientRef:
    """The patient an event concerns: an identifier (身份证号 or a hospital number) and/or a reference."""

    value: str | None = None
    system: str | None = None
    reference: str | None = None

    @classmethod
    def id_card(cls, number: str, reference: str | None = None) -> PatientRef:
        """A patient by 公民身份号码 (urn:oid:2.16.156.10011.1.3)."""
        return cls(number, SYSTEM_ID_CARD, reference)

    def facts(self) -> dict[str, str]:
        """The patient reference as JSON facts.

        :raises InputError: neither an identifier value nor a reference.
        """
        if not self.value and not self.reference:
            raise InputError("a patient needs an identifier or a reference", "patient")
        return _drop_none({"value": self.value, "system": self.system, "reference": self.reference})


@dataclass(frozen=True)
class RuleResult:
    """One recognition rule checked: its id (e.g. ``eqa-pass``), passed (True), failed (False)
    or not evaluable (None, a fact was missing), and why."""

    rule: str
    passed: bool | None
    detail: str = ""


@dataclass(frozen=True)
class Record:
    """One event to append: its kind, when it happened (with offset), and its facts."""

    kind: str
    recorded: _dt.datetime
    facts: Mapping[str, Any] = field(default_factory=dict)
    # made by a builder here whose facts always render (:func:`decision`): the log indexes them without rendering
    # (gateway.audit.render.decision_index)
    well_formed: bool = field(default=False, compare=False, repr=False)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != ""}


def _aware(at: _dt.datetime) -> _dt.datetime:
    if not isinstance(at, _dt.datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise InputError("an audit time must be a datetime with a UTC offset", "recorded")
    return at


def _record(kind: str, at: _dt.datetime, facts: dict[str, Any], *, well_formed: bool = False) -> Record:
    return Record(kind, _aware(at), {"v": FACTS_VERSION, **_drop_none(facts)}, well_formed)


def _required(value: str | None, location: str) -> str:
    if not value or not str(value).strip():
        raise InputError(f"{location} must not be empty", location)
    return str(value)


def exchange(
    direction: Literal["sent", "received", "refused"],
    *,
    at: _dt.datetime,
    gateway: Party,
    peer: Party | None,
    bundle_hash: str,
    bundle_id: str | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    reason: str | None = None,
    detail: str | None = None,
    kid: str | None = None,
    peer_address: str | None = None,
    patient: PatientRef | None = None,
    request_id: str | None = None,
) -> Record:
    """A signed Bundle sent to a peer, received from one, or refused on receipt.

    ``bundle_hash`` names the Bundle (``sha256:<hex>`` of its signed bytes);
    ``reason`` is a short code for a refusal or failure (``bad-signature``,
    ``unknown-issuer``, ``invalid``, ``peer-unavailable``...), ``detail`` a
    sentence. ``peer`` may be None when a refused sender cannot be identified.
    A refusal defaults to outcome 4 (minor failure: bad input).

    :raises InputError: unknown direction, missing hash, refusal without reason, naive time.
    """
    if direction not in ("sent", "received", "refused"):
        raise InputError(f"exchange direction {direction!r} is not sent, received or refused", "direction")
    if direction == "refused":
        _required(reason, "reason")
        if outcome == Outcome.SUCCESS:
            outcome = Outcome.MINOR_FAILURE
    return _record(
        "exchange",
        at,
        {
            "direction": direction,
            "gateway": gateway.facts(),
            "peer": peer.facts() if peer else None,
            "peer_address": peer_address,
            "bundle_hash": _required(bundle_hash, "bundle_hash"),
            "bundle_id": bundle_id,
            "outcome": Outcome(outcome).value,
            "reason": reason,
            "detail": detail,
            "kid": kid,
            "patient": patient.facts() if patient else None,
            "request_id": request_id,
        },
    )


def ingest(
    *,
    at: _dt.datetime,
    gateway: Party,
    source: Party,
    message_id: str,
    fmt: str,
    outcome: Outcome = Outcome.SUCCESS,
    status: str | None = None,
    reason: str | None = None,
    channel: str | None = None,
    source_address: str | None = None,
    message_system: str | None = None,
) -> Record:
    """A message taken in from one of the member's own systems (never its payload).

    ``message_id`` is the id the source gave it (MSH-10, document id, file
    name), within ``message_system`` when given (``naming.message_system``);
    ``fmt`` is ``hl7v2``, ``cda``, ``csv`` or ``fhir``; ``status`` the pipeline
    status reached (``stored``, ``filtered``, ``invalid``...); ``reason`` why it
    was refused, if it was.

    :raises InputError: empty message id or format, naive time.
    """
    return _record(
        "ingest",
        at,
        {
            "gateway": gateway.facts(),
            "source": source.facts(),
            "source_address": source_address,
            "message_id": _required(message_id, "message_id"),
            "message_system": message_system,
            "format": _required(fmt, "format"),
            "outcome": Outcome(outcome).value,
            "status": status,
            "reason": reason,
            "channel": channel,
        },
    )


def decision(
    *,
    at: _dt.datetime,
    gateway: Party,
    receiver: Party,
    issuer: Party,
    report: str,
    item: tuple[str, str] | tuple[str, str, str],
    catalogue: str,
    outcome: Literal["recognized", "not-recognized", "needs-review"],
    rules: Sequence[RuleResult],
    snapshot_version: str | int,
    snapshot_digest: str | None = None,
    ruleset_version: str | None = None,
    decision_id: str | None = None,
    report_system: str = SYSTEM_LAB_REPORT_NO,
    report_reference: str | None = None,
    patient: PatientRef | None = None,
    physician: Party | None = None,
    client: Party | None = None,
    client_address: str | None = None,
    bundle_hash: str | None = None,
    kid: str | None = None,
    verification_results: Sequence[str] = (),
    purpose: str = "TREAT",
    request_id: str | None = None,
    marks: Sequence[str] = (),
    as_of: _dt.datetime | None = None,
) -> Record:
    """A recognition (互认) decision for one item of one received report (ANCHORS §2.5).

    ``report`` is the issuer's 检验报告单号 (``report_system``); ``item`` is the
    catalogue item as ``(system, code[, display])``; ``catalogue`` the catalogue
    id/version the item belongs to; ``rules`` every rule checked, so an auditor
    can replay the decision against registry snapshot ``snapshot_version``; ``as_of``: the time it decided for,
    when not ``at`` (when the entry was written).

    :raises InputError: unknown outcome, no rules, a failed rule on a recognised
        decision, empty report or snapshot version, naive time.
    """
    if outcome not in DECISION_OUTCOMES:
        raise InputError(f"decision outcome {outcome!r} is not one of {', '.join(DECISION_OUTCOMES)}", "outcome")
    if not rules:
        raise InputError("a decision lists the rules it checked", "rules")
    if outcome == "recognized" and not all(r.passed is True for r in rules):
        raise InputError("a recognised decision cannot have a failed or unevaluated rule", "rules")
    return _record(
        "decision",
        at,
        {
            "gateway": gateway.facts(),
            "receiver": receiver.facts(),
            "issuer": issuer.facts(),
            "report": {"system": report_system, "value": _required(report, "report"), "reference": report_reference},
            "item": _item(item),
            "catalogue": _required(catalogue, "catalogue"),
            "outcome": outcome,
            "decision_id": decision_id,
            "rules": [
                _drop_none({"id": _required(r.rule, "rules.rule"), "passed": r.passed, "detail": r.detail})
                for r in rules
            ],
            "snapshot": _required(str(snapshot_version), "snapshot_version"),
            "snapshot_digest": snapshot_digest,
            "ruleset": ruleset_version,
            "patient": patient.facts() if patient else None,
            "physician": physician.facts() if physician else None,
            "client": client.facts() if client else None,
            "client_address": client_address,
            "bundle_hash": bundle_hash,
            "kid": kid,
            "verification_results": list(verification_results),
            "purpose": purpose,
            "request_id": request_id,
            "marks": list(marks) or None,  # the recognition marks (川渝HR…) the issuer printed on the result
            "as_of": _aware(as_of).isoformat(timespec="milliseconds") if as_of is not None else None,
        },
        well_formed=True,
    )


def _item(item: Sequence[str]) -> dict[str, str]:
    if len(item) not in (2, 3) or not item[1]:
        raise InputError("item is (system, code) or (system, code, display)", "item")
    return _drop_none({"system": item[0], "code": item[1], "display": item[2] if len(item) == 3 else None})


def override(
    *,
    at: _dt.datetime,
    gateway: Party,
    physician: Party,
    reason: str,
    decision_id: str,
    receiver: Party | None = None,
    issuer: Party | None = None,
    report: str | None = None,
    item: tuple[str, str] | tuple[str, str, str] | None = None,
    report_system: str = SYSTEM_LAB_REPORT_NO,
    patient: PatientRef | None = None,
    note: str | None = None,
) -> Record:
    """A receiving physician orders a re-test although the result was recognised.

    ``reason`` is one of the six national re-test reasons
    (:data:`gateway.recognition.overrides.RETEST_REASONS`); ``decision_id`` the
    decision overridden (as in :func:`decision`); report, item, issuer and
    receiver repeat what the decision was about, when the caller has them.

    :raises InputError: unknown reason, no decision id, naive time.
    """
    if reason not in RETEST_REASONS:
        raise InputError(f"re-test reason {reason!r} is not one of {', '.join(RETEST_REASONS)}", "reason")
    return _record(
        "override",
        at,
        {
            "gateway": gateway.facts(),
            "physician": physician.facts(),
            "reason": reason,
            "decision_id": _required(decision_id, "decision_id"),
            "receiver": receiver.facts() if receiver else None,
            "issuer": issuer.facts() if issuer else None,
            "report": {"system": report_system, "value": report} if report else None,
            "item": _item(item) if item else None,
            "patient": patient.facts() if patient else None,
            "note": note,
        },
    )


def patient_read(
    *,
    at: _dt.datetime,
    gateway: Party,
    server_address: str,
    client: Party,
    client_address: str,
    member: Party,
    patient: PatientRef,
    resources: Sequence[str],
    query: str | None = None,
    user: Party | None = None,
    user_roles: Sequence[str] = (),
    outcome: Outcome = Outcome.SUCCESS,
    purpose: str | None = "TREAT",
    request_id: str | None = None,
    asked_elsewhere: bool = False,
) -> Record:
    """A read (调阅) of one patient's results by a peer gateway or a user (IHE BALP PatientRead/PatientQuery).

    ``asked_elsewhere``: the entry of the member that asked another (``gateway``) for them (a 调阅 made here, not
    served here: the lookup figures count the ones served).

    ``client`` is the calling system and ``client_address`` its network address;
    ``member`` the institution on whose behalf it read (counted in the lookup
    statistics); ``resources`` the references returned (``DiagnosticReport/...``);
    ``query`` the raw query string for a search (PatientQuery), None for a read.

    :raises InputError: no resources on a read, empty addresses, naive time.
    """
    if query is None and not resources:
        raise InputError("a read names the resources it returned", "resources")
    return _record(
        "read",
        at,
        {
            "gateway": gateway.facts(),
            "server_address": _required(server_address, "server_address"),
            "client": client.facts(),
            "client_address": _required(client_address, "client_address"),
            "member": member.facts(),
            "patient": patient.facts(),
            "resources": [_required(r, "resources") for r in resources],
            "query": query,
            "user": user.facts() if user else None,
            "user_roles": list(user_roles),
            "outcome": Outcome(outcome).value,
            "purpose": purpose,
            "request_id": request_id,
            "asked_elsewhere": True if asked_elsewhere else None,
        },
    )


def registry_applied(
    *,
    at: _dt.datetime,
    gateway: Party,
    version: str,
    snapshot_hash: str | None = None,
    previous_version: str | None = None,
    authority: Party | None = None,
) -> Record:
    """A registry snapshot (members, keys, qualifications, catalogue) this gateway now decides with.

    :raises InputError: empty version, naive time.
    """
    return _record(
        "registry",
        at,
        {
            "gateway": gateway.facts(),
            "version": _required(version, "version"),
            "snapshot_hash": snapshot_hash,
            "previous_version": previous_version,
            "authority": authority.facts() if authority else None,
        },
    )


def audit_query(
    *,
    at: _dt.datetime,
    gateway: Party,
    server_address: str,
    client: Party,
    client_address: str,
    user: Party | None,
    query: str,
    interaction: Literal["search-type", "read", "operation"] = "search-type",
    user_roles: Sequence[str] = (),
    patient: PatientRef | None = None,
    results: int | None = None,
    resource: str | None = None,
) -> Record:
    """A look into the audit log itself (search, read of one event, statistics, export).

    Every auditor query is audited (BALP Query, PatientQuery when the query
    names a patient). ``query`` is the raw request (``GET /fhir/AuditEvent?...``
    or the command line); ``resource`` the event read, for a read.

    :raises InputError: unknown interaction, empty query, naive time.
    """
    if interaction not in ("search-type", "read", "operation"):
        raise InputError(f"interaction {interaction!r} is not search-type, read or operation", "interaction")
    return _record(
        "query",
        at,
        {
            "gateway": gateway.facts(),
            "server_address": _required(server_address, "server_address"),
            "client": client.facts(),
            "client_address": _required(client_address, "client_address"),
            "user": user.facts() if user else None,
            "user_roles": list(user_roles),
            "query": _required(query, "query"),
            "interaction": interaction,
            "patient": patient.facts() if patient else None,
            "results": results,
            "resource": resource,
        },
    )


def user_admin(
    *,
    at: _dt.datetime,
    gateway: Party,
    admin: Party,
    user: Party,
    action: Literal["added", "disabled", "token-issued", "token-revoked", "password-set"],
    roles: Sequence[str] = (),
) -> Record:
    """A change to who may use the gateway: a user added or disabled, a token issued or revoked, a console password
    set.

    :raises InputError: unknown action, naive time.
    """
    if action not in ("added", "disabled", "token-issued", "token-revoked", "password-set"):
        raise InputError(f"user action {action!r} is not added, disabled, token-issued, token-revoked or "
                         "password-set", "action")
    return _record(
        "security",
        at,
        {
            "gateway": gateway.facts(),
            "admin": admin.facts(),
            "user": user.facts(),
            "action": action,
            "roles": list(roles),
        },
    )


LOGIN_ACTIONS = ("login", "logout")
OPERATOR_ACTIONS = ("message-raw-viewed", "message-retried", "outbox-retry", "outbox-replay")


def user_login(
    *,
    at: _dt.datetime,
    gateway: Party,
    user: Party,
    client_address: str,
    action: Literal["login", "logout"],
    outcome: Outcome = Outcome.SUCCESS,
    reason: str | None = None,
    roles: Sequence[str] = (),
) -> Record:
    """A console log-in (succeeded or refused, ``reason`` saying why: password, locked, role, ...) or log-out
    (``reason``: user, idle time-out) (IHE BALP / DICOM User Authentication).

    :raises InputError: unknown action, naive time.
    """
    if action not in LOGIN_ACTIONS:
        raise InputError(f"authentication action {action!r} is not login or logout", "action")
    return _record(
        "login",
        at,
        {
            "gateway": gateway.facts(),
            "user": user.facts(),
            "client_address": _required(client_address, "client_address"),
            "action": action,
            "outcome": outcome.value,
            "reason": reason,
            "roles": list(roles),
        },
    )


def operator_action(
    *,
    at: _dt.datetime,
    gateway: Party,
    user: Party,
    client_address: str,
    action: Literal["message-raw-viewed", "message-retried", "outbox-retry", "outbox-replay"],
    target: str,
    detail: str | None = None,
) -> Record:
    """An operator's action in the console on a stored message or a delivery: its raw bytes viewed, a retry
    or a replay; ``target`` names the record (``messages/12``, ``outbox/3``).

    :raises InputError: unknown action, empty target, naive time.
    """
    if action not in OPERATOR_ACTIONS:
        raise InputError(f"operator action {action!r} is not one of {', '.join(OPERATOR_ACTIONS)}", "action")
    return _record(
        "operator",
        at,
        {
            "gateway": gateway.facts(),
            "user": user.facts(),
            "client_address": _required(client_address, "client_address"),
            "action": action,
            "target": _required(target, "target"),
            "detail": detail,
        },
    )


def token_request(
    *,
    at: _dt.datetime,
    gateway: Party,
    client: Party,
    client_address: str,
    outcome: Outcome = Outcome.SUCCESS,
    reason: str | None = None,
    scopes: Sequence[str] = (),
    roles: Sequence[str] = (),
) -> Record:
    """A SMART Backend Services token request of a system (``client``): an access token issued with the
    granted ``scopes``, or refused (``reason``: the OAuth error and the check that failed; ``scopes``: those
    asked for).

    :raises InputError: naive time, no client address.
    """
    return _record(
        "token",
        at,
        {
            "gateway": gateway.facts(),
            "client": client.facts(),
            "client_address": _required(client_address, "client_address"),
            "outcome": outcome.value,
            "reason": reason,
            "scopes": list(scopes),
            "roles": list(roles),
        },
    )


_STATUS = {"passed": True, "failed": False}


def withdrawal(
    *,
    at: _dt.datetime,
    gateway: Party,
    decision_id: str,
    reason: str,
    report: str,
    superseded_by: str,
    decided_outcome: str | None = None,
    receiver: Party | None = None,
    issuer: Party | None = None,
    item: tuple[str, str] | tuple[str, str, str] | None = None,
    report_system: str = SYSTEM_LAB_REPORT_NO,
    patient: PatientRef | None = None,
) -> Record:
    """A recognition decision withdrawn: the report it was about was superseded by a correction.

    ``decision_id`` names the decision withdrawn (as in :func:`decision`); ``report`` the 检验报告单号 of the
    superseded report; ``superseded_by`` the report that superseded it; ``reason`` says so in words. From
    then on the decision reads as not recognised and the statistics leave it out.

    :raises InputError: no decision id, reason or report; naive time.
    """
    return _record(
        "withdrawal",
        at,
        {
            "gateway": gateway.facts(),
            "decision_id": _required(decision_id, "decision_id"),
            "reason": _required(reason, "reason"),
            "report": {"system": report_system, "value": _required(report, "report")},
            "superseded_by": _required(superseded_by, "superseded_by"),
            "decided_outcome": decided_outcome,
            "receiver": receiver.facts() if receiver else None,
            "issuer": issuer.facts() if issuer else None,
            "item": _item(item) if item else None,
            "patient": patient.facts() if patient else None,
        },
    )


#: What happened to a referral (移送): made here, sent, received, or its status changed by the authority.
REFERRAL_ACTIONS = ("created", "sent", "received", "updated")


def referral(
    action: str,
    *,
    at: _dt.datetime,
    gateway: Party,
    task_id: str,
    status: str,
    reason: str,
    requester: Party,
    owner: Party,
    report: str,
    issuer: Party | None = None,
    decision_id: str | None = None,
    bundle_hash: str | None = None,
    by: Party | None = None,
    note: str | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    failure: str | None = None,
) -> Record:
    """A referral of a violation (移送, a FHIR Task) made, sent, received or answered.

    ``task_id`` is the Task's business identifier (the same on both sides); ``status`` the Task status after the
    event; ``reason`` the referral reason code; ``report`` the DiagnosticReport referred; ``by`` the user who did
    it (none when the gateway did, e.g. on delivery).

    A delivery (action ``sent``) that did not succeed has ``outcome`` 4 (refused by the destination, or not sent)
    or 8 (the destination could not be reached or failed) and ``failure``, as a failed Bundle push has: ``retrying``
    (its first failure, to be tried again), ``gave-up`` (its attempts used up), ``refused-by-receiver`` or
    ``not-sent`` (dead at once); ``note`` then says why (outbox record, attempt, error).

    :raises InputError: unknown action, missing task id, status, reason or report; naive time; a failure without
        its reason, or on another action than ``sent``.
    """
    if action not in REFERRAL_ACTIONS:
        raise InputError(f"referral action {action!r} is not one of {', '.join(REFERRAL_ACTIONS)}", "action")
    if (outcome != Outcome.SUCCESS) != bool(failure) or (failure and action != "sent"):
        raise InputError("a referral's failed delivery is action sent with an outcome other than 0 and its reason",
                         "failure")
    return _record(
        "referral",
        at,
        {
            "gateway": gateway.facts(),
            "action": action,
            "task_id": _required(task_id, "task_id"),
            "status": _required(status, "status"),
            "reason": _required(reason, "reason"),
            "requester": requester.facts(),
            "owner": owner.facts(),
            "report": _required(report, "report"),
            "issuer": issuer.facts() if issuer else None,
            "decision_id": decision_id,
            "bundle_hash": bundle_hash,
            "by": by.facts() if by else None,
            "note": note,
            **({"outcome": outcome.value, "failure": failure} if failure else {}),
        },
    )


def split_report_key(key: str) -> tuple[str, str]:
    """(system, value) of a report's identifier as recognition facts key it (``system|value``, the system never
    holding a ``|``): an AuditEvent names the report by both, so that ``entity:identifier`` finds it. A key
    without a system is a 检验报告单号."""
    system, known, value = key.partition("|")
    return (system, value) if known else (SYSTEM_LAB_REPORT_NO, key)


def from_decision(
    decided: Any,
    *,
    gateway: Party,
    recorded: _dt.datetime | None = None,
    physician: Party | None = None,
    client: Party | None = None,
    client_address: str | None = None,
    bundle_hash: str | None = None,
    kid: str | None = None,
    request_id: str | None = None,
) -> Record:
    """The audit record of a :class:`gateway.recognition.engine.Decision`.

    ``recorded`` (when the entry is written) defaults to the decision time; a decision made as of another time
    (``$recognize`` or ``gateway recognize`` with ``at``) is dated when it is written and keeps the time it decided
    for as ``as_of``, so that a search by date finds every entry written in a period. The rule set is the gateway
    version that decided (replay with the same code). The report is named by the
    issuer's report id; the item by the catalogue item decided against (or the
    result's first coding when no catalogue has it).

    :raises InputError: a decision without issuer or report id, naive time.
    """
    facts = decided.facts
    item = decided.item
    if item is not None:
        item_code: tuple[str, str, str] = (item.system, item.code, item.display)
        catalogue = item.catalogue_id
    elif facts.codings:
        first = facts.codings[0]
        item_code, catalogue = (first.system, first.code, first.display or ""), "-"
    else:
        item_code, catalogue = ("", facts.item_label(), ""), "-"
    patient = PatientRef(facts.patient[1], facts.patient[0]) if facts.patient else None
    report_system, report = split_report_key(facts.report_id) if facts.report_id else (
        SYSTEM_LAB_REPORT_NO, facts.bundle_id)
    as_of = decided.decided_at if recorded is not None and recorded != decided.decided_at else None
    return decision(
        at=recorded or decided.decided_at,
        as_of=as_of,
        gateway=gateway,
        receiver=Party.member(decided.receiver),
        issuer=Party.member(_required(facts.issuer_uscc, "issuer")),
        report=_required(report, "report"),
        report_system=report_system,
        item=item_code,
        catalogue=catalogue,
        outcome=decided.outcome,
        rules=[RuleResult(r.rule, _STATUS.get(r.status), r.message) for r in decided.rules],
        snapshot_version=decided.snapshot_version,
        snapshot_digest=decided.snapshot_digest,
        ruleset_version=f"gateway {__version__}",
        decision_id=decided.decision_id,
        patient=patient,
        physician=physician,
        client=client,
        client_address=client_address,
        bundle_hash=bundle_hash,
        kid=kid,
        request_id=request_id,
        marks=tuple(getattr(facts, "marks", ()) or ()),
    )


def from_override(ordered: Any, *, gateway: Party, about: Sequence[str | None] | None = None) -> Record:
    """The audit record of a :class:`gateway.recognition.overrides.Override`; ``about``: what the decision was
    about, as stored beside it (receiver, issuer, report id, patient system, patient value).

    :raises InputError: unknown reason, naive time.
    """
    receiver, issuer, report_id, patient_system, patient_value = about or (None,) * 5
    report_system, report = split_report_key(report_id) if report_id else (SYSTEM_LAB_REPORT_NO, None)
    return override(
        at=ordered.recorded_at,
        gateway=gateway,
        physician=Party(ordered.physician, ordered.physician_system),
        reason=ordered.reason,
        decision_id=ordered.decision_id,
        receiver=Party.member(receiver) if receiver else None,
        issuer=Party.member(issuer) if issuer else None,
        report=report,
        report_system=report_system,
        patient=PatientRef(patient_value, patient_system) if patient_value else None,
        note=ordered.note,
    )
