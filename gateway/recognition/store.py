"""Recognition store: decisions and physician overrides in the gateway's database.

Three append-only tables (triggers refuse UPDATE and DELETE): a decision is
never rewritten, an override sits beside the decision it concerns, and so does
a withdrawal: when a corrected report supersedes the report a decision was
about, the decision is withdrawn ("superseded by <report>") and from then on
reads as ``not-recognized``, its recorded outcome kept beside. Each
decision row keeps the full decision JSON (every rule with its facts, the
snapshot version and digest) so it can be replayed, plus the columns it is
listed by: patient identifier, issuer, item and outcome.

Writes go through :func:`gateway.store.db.transaction` and the decisions' store
(:class:`gateway.store.decisions.DecisionStore`, on SQLite or PostgreSQL), so that
a caller can commit a decision together with its audit entry.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway import jsonutil
from gateway.errors import InputError, NotFound
from gateway.identifiers import check_id_card, check_uscc
from gateway.naming import SYSTEM_ID_CARD
from gateway.recognition.engine import NEEDS_REVIEW, NOT_RECOGNIZED, RECOGNIZED, Decision
from gateway.recognition.overrides import RETEST_REASONS, Override
from gateway.signing.canonical import holds_plain_json
from gateway.store.db import Database, transaction
from gateway.store.decisions import DecisionStore

__all__ = [
    "StoredDecision",
    "ensure_schema",
    "save_decisions",
    "add_override",
    "withdraw_superseded",
    "get_decision",
    "list_decisions",
]

_OUTCOMES = (RECOGNIZED, NOT_RECOGNIZED, NEEDS_REVIEW)


@dataclass(frozen=True)
class StoredDecision:
    """A stored decision (its JSON form) with the overrides recorded beside it."""

    decision: dict[str, Any]
    recorded_at: str
    overrides: tuple[dict[str, Any], ...] = ()
    withdrawal: dict[str, Any] | None = None

    @property
    def outcome(self) -> str:
        """The outcome in force: ``not-recognized`` once withdrawn, else the one decided."""
        return NOT_RECOGNIZED if self.withdrawal else str(self.decision.get("outcome"))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the decision plus ``recorded_at`` and ``overrides``; a withdrawn one reads
        ``not-recognized``, with ``decided_outcome`` (what was decided) and ``withdrawn`` (why and when)."""
        out = {**self.decision, "recorded_at": self.recorded_at, "overrides": list(self.overrides)}
        if self.withdrawal:
            out.update(outcome=NOT_RECOGNIZED, decided_outcome=self.decision.get("outcome"),
                       withdrawn=dict(self.withdrawal))
        return out


def ensure_schema(db: Database) -> None:
    """Create the recognition tables, indexes and triggers if they are missing.

    Inside the caller's transaction when there is one (and once per connection after that).
    """
    DecisionStore(db).ensure_schema()


def _aware(moment: _dt.datetime, label: str) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InputError(f"{label} must carry a UTC offset", label)
    return moment.isoformat()


def _decision_text(decision: dict[str, Any]) -> str:
    """The stored JSON of a decision: what ``json.dumps`` writes, as its readers (``json.loads``) read it back.

    msgspec's encoder writes it when the decision holds only what the two agree on; anything else (a number read
    from a Bundle as a Decimal, which ``json.dumps`` refuses, so that nothing is stored) takes ``json.dumps``.
    """
    try:
        text = jsonutil.encode(decision)
    except (TypeError, ValueError, OverflowError, RecursionError, UnicodeEncodeError):
        return json.dumps(decision, ensure_ascii=False)
    return text.decode("utf-8") if holds_plain_json(decision) else json.dumps(decision, ensure_ascii=False)


def save_decisions(db: Database, decisions: Iterable[Decision], recorded_at: _dt.datetime) -> int:
    """Store decisions in one transaction; return how many were new (a replayed decision is kept once).

    :raises InputError: ``recorded_at`` has no UTC offset.
    """
    when = _aware(recorded_at, "recorded_at")
    ensure_schema(db)
    store = DecisionStore(db)
    rows = []
    for d in decisions:
        f = d.facts
        rows.append([
            d.decision_id,
            f.bundle_id,
            f.entry,
            f.report_id,
            f.patient[0] if f.patient else None,
            f.patient[1] if f.patient else None,
            f.issuer_uscc,
            d.receiver,
            d.item.catalogue_id if d.item else None,
            d.item.code if d.item else (f.codings[0].code if f.codings else None),
            d.item.display if d.item else f.item_label(),
            d.outcome,
            d.snapshot_version,
            d.snapshot_digest,
            d.decided_at.astimezone(_dt.timezone.utc).isoformat(),
            when,
            _decision_text(d.to_dict()),
        ])
    with transaction(db):  # one statement for all of them where the engine allows it
        added = store.add_decisions(rows)
    return added


def add_override(db: Database, override: Override) -> int:
    """Record a physician override beside its decision; return the override's id.

    :raises NotFound: no decision with that id.
    """
    ensure_schema(db)
    store = DecisionStore(db)
    with transaction(db):
        about = store.about(override.decision_id)
        if about is None:
            raise NotFound(f"no recognition decision {override.decision_id}", "decision_id")
        receiver = str(about[0])
        # The override and its audit entry commit together; the decision itself is never changed. The entry names
        # what the decision was about (the patient, the report and its issuer), so that an auditor finds it by them.
        from gateway.audit.log import append
        from gateway.audit.records import Party, from_override

        append(db, from_override(override, gateway=Party.member(receiver), about=about))
        return store.add_override(override.decision_id, override.reason, override.physician_system,
                                  override.physician, override.note, _aware(override.recorded_at, "recorded_at"))


def _overrides(db: Database, decision_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    rows = DecisionStore(db).overrides(decision_ids)
    for override_id, decision_id, reason, system, physician, note, recorded_at in rows:
        info = RETEST_REASONS.get(reason)
        out.setdefault(decision_id, []).append(
            {
                "override_id": override_id,
                "reason": reason,
                "reason_zh": info.zh if info else None,
                "reason_en": info.en if info else None,
                "physician": {"system": system, "value": physician},
                "note": note,
                "recorded_at": recorded_at,
            }
        )
    return out


def _withdrawals(db: Database, decision_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = DecisionStore(db).withdrawals(decision_ids)
    return {r[0]: {"reason": r[1], "superseded_by": r[2], "withdrawn_at": r[3]} for r in rows}


def _item_of(decision: dict[str, Any]) -> tuple[str, str, str] | None:
    """The item a stored decision was about, as audit entries name it: the catalogue item, else the first code."""
    item = decision.get("catalogue_item")
    if isinstance(item, dict) and item.get("code"):
        return ("", str(item["code"]), str(item.get("display") or ""))
    codings = (decision.get("result") or {}).get("codings") or []
    if codings and codings[0].get("code"):
        return (str(codings[0].get("system") or ""), str(codings[0]["code"]), "")
    return None


def _says_superseded(decision_json: str) -> bool:
    """Whether a decision already found its report superseded (rule ``report-status``)."""
    for rule in json.loads(decision_json).get("rules") or []:
        if rule.get("rule") == "report-status" and rule.get("status") == "failed" and (
            rule.get("facts") or {}
        ).get("superseded_by"):
            return True
    return False


def withdraw_superseded(
    db: Database,
    *,
    bundle_id: str,
    report_id: str,
    superseded_by: str,
    at: _dt.datetime,
    member: str,
) -> list[str]:
    """Withdraw every decision on one superseded report version; returns the ids withdrawn.

    The version is named as decisions name it: its Bundle (identifier value) and report id
    (``system|value``). Each withdrawal is recorded with the reason "superseded by <report>" and
    audited (kind ``withdrawal``), inside the caller's transaction. A decision withdrawn before,
    or one that found the report superseded already, is left as it is.

    :raises InputError: ``at`` has no UTC offset.
    """
    when = _aware(at, "withdrawn_at")
    ensure_schema(db)
    from gateway.audit.log import append
    from gateway.audit.records import Party, PatientRef, split_report_key, withdrawal

    reason = f"superseded by {superseded_by}"
    report_system, report_value = split_report_key(report_id)
    withdrawn: list[str] = []
    with transaction(db):
        store = DecisionStore(db)
        rows = store.standing_on_report(bundle_id, report_id)
        for decision_id, text, receiver, issuer, p_system, p_value, outcome in rows:
            if _says_superseded(text):
                continue
            item = _item_of(json.loads(text))
            append(
                db,
                withdrawal(
                    at=at,
                    gateway=Party.member(member),
                    decision_id=decision_id,
                    reason=reason,
                    report=report_value,
                    report_system=report_system,
                    superseded_by=superseded_by,
                    decided_outcome=outcome,
                    receiver=Party.member(receiver) if receiver else None,
                    issuer=Party.member(issuer) if issuer else None,
                    item=item,
                    patient=PatientRef(p_value, p_system or None) if p_value else None,
                ),
            )
            store.add_withdrawal(decision_id, reason, superseded_by, when)
            withdrawn.append(decision_id)
    return withdrawn


def get_decision(db: Database, decision_id: str) -> StoredDecision:
    """One stored decision with its overrides.

    :raises NotFound: no decision with that id.
    """
    row = DecisionStore(db).decision(decision_id)
    if row is None:
        raise NotFound(f"no recognition decision {decision_id}", "decision_id")
    return StoredDecision(json.loads(row[0]), row[1], tuple(_overrides(db, [decision_id]).get(decision_id, [])),
                          _withdrawals(db, [decision_id]).get(decision_id))


def list_decisions(
    db: Database,
    *,
    patient: str | None = None,
    patient_system: str = SYSTEM_ID_CARD,
    issuer: str | None = None,
    item: str | None = None,
    outcome: str | None = None,
    limit: int = 100,
) -> list[StoredDecision]:
    """Stored decisions, newest decision time first, filtered by patient identifier, issuer, item and outcome.

    ``outcome`` is the outcome in force: a decision withdrawn because its report was superseded by a
    correction counts as ``not-recognized`` (the correction's own decisions are listed beside it).

    ``item`` is a catalogue item code (``CY-L001``) or, for results no catalogue
    lists, the first code the result carried.

    :raises IdentifierError: ``issuer`` fails GB 32100, or a 身份证号 ``patient`` fails GB 11643.
    :raises InputError: unknown ``outcome`` or a ``limit`` out of range.
    """
    if outcome is not None and outcome not in _OUTCOMES:
        raise InputError(f"outcome must be one of {', '.join(_OUTCOMES)}", "outcome")
    if not 1 <= limit <= 10_000:
        raise InputError("limit must be between 1 and 10000", "limit")
    value = None
    if patient is not None:
        value = (check_id_card(patient) if patient_system == SYSTEM_ID_CARD else patient, patient_system)
    rows = DecisionStore(db).listed(patient=value, issuer=check_uscc(issuer) if issuer is not None else None,
                                    item=item, outcome=outcome, withdrawn_reads_as=NOT_RECOGNIZED, limit=limit)
    overrides = _overrides(db, [r[0] for r in rows])
    withdrawals = _withdrawals(db, [r[0] for r in rows])
    return [StoredDecision(json.loads(r[1]), r[2], tuple(overrides.get(r[0], [])), withdrawals.get(r[0]))
            for r in rows]
