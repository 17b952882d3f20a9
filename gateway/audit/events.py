"""Audit events of the gateway's own actions, written where the action commits.

The pipeline, the FHIR API, the exchange and the registry call these with the
database connection of the transaction that performs the action, so the entry
and the action commit together (or neither does). Payloads and patient data
never go to application logs; the entries carry what FHIR AuditEvents require.
"""
from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gateway.audit import records
from gateway.audit.log import append, append_many
from gateway.audit.records import Outcome, Party, PatientRef
from gateway.jsonutil import OBJECT
from gateway.naming import SYSTEM_ID_CARD
from gateway.store.db import Database


__all__ = ["ingested", "ingest_record", "retried_record", "patient_identifier", "asked_patient", "patient_reads",
           "exchanged", "decided", "decision_records", "snapshot_applied"]


def _me(uscc: str, name: str | None = None) -> Party:
    return Party.member(uscc, name)


def ingested(db: Database, *, at: _dt.datetime, member: str, member_name: str, sender: str,
             message_id: str, fmt: str, status: str, channel: str, reason: str | None) -> None:
    """A unit of input from one of the member's own systems reached its final status."""
    append(db, ingest_record(at=at, member=member, member_name=member_name, sender=sender, message_id=message_id,
                             fmt=fmt, status=status, channel=channel, reason=reason))


#: What a refusal's words quote of the message ('HIV抗体阳性', "王建国") and runs of digits as long as an identifier's
#: (a 身份证号 named in a check-digit error): left out of the audit entry, which names a message, never its payload.
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"|“[^”\n]*”|‘[^’\n]*’|「[^」\n]*」")
_LONG_NUMBER = re.compile(r"(?<![0-9A-Za-z])[0-9]{6,}[0-9Xx]*(?![0-9A-Za-z])")


def payload_free(reason: str | None) -> str | None:
    """A refusal's reason as the audit log keeps it: what it quotes of the message, and numbers as long as an
    identifier, written ``…`` (the field named, the rule broken kept). The message's own record keeps the words
    whole, for those who may read the message."""
    if not reason:
        return reason
    return _LONG_NUMBER.sub("…", _QUOTED.sub("'…'", reason))


def ingest_record(*, at: _dt.datetime, member: str, member_name: str, sender: str, message_id: str, fmt: str,
                  status: str, channel: str, reason: str | None) -> records.Record:
    """The record :func:`ingested` appends (to prepare it before the write lock: ``gateway.audit.log.prepare``).
    A refusal's reason is kept without what it quotes of the message (:func:`payload_free`)."""
    refused = status in ("refused", "failed")
    return records.ingest(
        at=at, gateway=_me(member, member_name), source=Party.application(member, sender or "unknown"),
        message_id=message_id or "(none)", fmt=fmt, status=status, channel=channel,
        outcome=Outcome.MINOR_FAILURE if refused else Outcome.SUCCESS,
        reason=payload_free(reason) if refused else None)


def retried_record(*, at: _dt.datetime, member: str, member_name: str, user: str, record_id: int,
                   message_id: str, fmt: str, old_status: str, new_status: str) -> records.Record:
    """An operator had a stored message worked again (``gateway messages retry``): who, which record, its
    status before and after. The message's content is not part of it."""
    return records.ingest(
        at=at, gateway=_me(member, member_name), source=Party.user(member, user or "cli"),
        message_id=message_id or f"record {record_id}", fmt=fmt, status=new_status, channel="retry",
        outcome=Outcome.MINOR_FAILURE if new_status in ("refused", "failed") else Outcome.SUCCESS,
        reason=f"record {record_id} worked again by {user or 'cli'}: {old_status} -> {new_status}")


def _patients(resources: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Patient reference -> references of the returned resources about that patient."""
    out: dict[str, list[str]] = {}
    for res in resources:
        rtype, rid = res.get("resourceType", ""), res.get("id", "")
        if rtype == "Patient":
            out.setdefault(f"Patient/{rid}", []).append(f"Patient/{rid}")
            continue
        subject = (res.get("subject") or {}).get("reference", "")
        if subject.startswith("Patient/"):
            out.setdefault(subject, []).append(f"{rtype}/{rid}")
    return out


def patient_identifier(patient: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(system, value) a Patient resource is known by across members, as its recognition decisions name it
    (:func:`gateway.recognition.facts.known_identifier`; a 身份证号 normalised as they hold it, or as stored when
    it does not pass its check); None when it has none."""
    from gateway.identifiers import id_card_or_none
    from gateway.recognition.facts import known_identifier

    try:
        known = known_identifier(patient) if patient else None
    except TypeError:  # (a value that is not text: no identifier to name it by)
        return None
    if known is None:
        return None
    _, system, value = known
    if system == SYSTEM_ID_CARD:
        value = id_card_or_none(value) or value
    return system, value


def asked_patient(identifier: str) -> PatientRef | None:
    """The patient a search or a 调阅 asks for by ``system|value`` or ``value``, named as the entries of that
    patient's results name it: a 身份证号, with its system or without one, normalised (``x`` as ``X``) and with its
    system; another identifier as asked. None for a system without a value (every patient of that system)."""
    from gateway.identifiers import id_card_or_none

    system, sep, value = identifier.partition("|")
    if not sep:
        system, value = "", identifier
    if not value:
        return None
    number = id_card_or_none(value) if system in ("", SYSTEM_ID_CARD) else None
    return PatientRef(number, SYSTEM_ID_CARD) if number else PatientRef(value, system or None)


def patient_reads(db: Database, *, at: _dt.datetime, member: str, server_address: str,
                  client: Party, client_address: str, on_behalf_of: str, resources: list[dict[str, Any]],
                  query: str | None, identified: Callable[[str], tuple[str, str] | None] | None = None,
                  asked: Sequence[PatientRef] = (), outcome: records.Outcome = records.Outcome.SUCCESS,
                  asked_elsewhere: bool = False) -> int:
    """One BALP read/query entry per patient whose results were returned; returns how many.

    Each entry names the patient by reference and by the identifier it is known by (:func:`patient_identifier`:
    a Patient among ``resources`` gives its own, ``identified`` the one of a patient reference), so that an
    auditor asking who read a patient's results finds the reads by the 身份证号 (``patient:identifier``). A query
    that returned nothing names each patient it ``asked`` for in an entry of its own, without resources (someone
    probing which patients are held here leaves a trail): one asked by reference by the identifier ``identified``
    gives it too, and one patient asked twice (by reference and by that identifier) once.
    """
    def named(reference: str, ident: tuple[str, str] | None) -> PatientRef:
        return PatientRef(ident[1], ident[0] or None, reference) if ident else PatientRef(reference=reference)

    own = {f"Patient/{r.get('id')}": patient_identifier(r) for r in resources if r.get("resourceType") == "Patient"}
    found: list[tuple[PatientRef, list[str]]] = []
    for patient, refs in _patients(resources).items():
        found.append((named(patient, own.get(patient) or (identified(patient) if identified is not None else None)),
                      refs))
    if not found and asked:
        resolved = [named(a.reference, identified(a.reference)) if a.reference and not a.value and identified
                    is not None else a for a in asked]
        by_reference = {(a.value, a.system) for a in resolved if a.reference and a.value}
        for a in resolved:
            if (a.reference or (a.value, a.system) not in by_reference) and all(a != b for b, _ in found):
                found.append((a, []))
    made = [records.patient_read(
        at=at, gateway=_me(member), server_address=server_address or "unknown", client=client,
        client_address=client_address or "unknown", member=_me(on_behalf_of), patient=patient, resources=refs,
        query=query, outcome=outcome, asked_elsewhere=asked_elsewhere) for patient, refs in found]
    return len(append_many(db, made))


def exchanged(db: Database, direction: str, *, at: _dt.datetime, member: str, peer: str | None,
              bundle_hash: str, bundle_id: str | None = None, reason: str | None = None,
              detail: str | None = None, kid: str | None = None, bundle: Mapping[str, Any] | None = None) -> None:
    """A signed Bundle sent, received or refused."""
    append(db, exchange_record(direction, at=at, member=member, peer=peer, bundle_hash=bundle_hash,
                               bundle_id=bundle_id, reason=reason, detail=detail, kid=kid, bundle=bundle))


def bundle_patient(bundle: Mapping[str, Any] | None) -> PatientRef | None:
    """The patient a report Bundle is about, by the identifier its Patient has (:func:`patient_identifier`), when it
    holds exactly one Patient with one."""
    found = {patient_identifier(e.get("resource")) for e in (bundle or {}).get("entry") or []
             if isinstance(e, OBJECT) and isinstance(e.get("resource"), OBJECT)
             and e["resource"].get("resourceType") == "Patient"}
    found.discard(None)
    if len(found) != 1:
        return None
    system, value = found.pop()  # type: ignore[misc]
    return PatientRef(value, system or None)


def exchange_record(direction: str, *, at: _dt.datetime, member: str, peer: str | None, bundle_hash: str,
                    bundle_id: str | None = None, reason: str | None = None, detail: str | None = None,
                    kid: str | None = None, bundle: Mapping[str, Any] | None = None) -> records.Record:
    """The record :func:`exchanged` appends (to prepare it before the write lock); ``bundle``: the report Bundle
    sent or received, whose patient the entry names (an auditor finds it by the 身份证号)."""
    return records.exchange(
        direction, at=at, gateway=_me(member), peer=_me(peer) if peer else None,  # type: ignore[arg-type]
        bundle_hash=f"sha256:{bundle_hash}", bundle_id=bundle_id, reason=reason, detail=detail, kid=kid,
        patient=bundle_patient(bundle))


def decided(db: Database, decisions: Iterable[Any], *, member: str, bundle_hash: str | None = None,
            kid: str | None = None) -> int:
    """Every recognition decision, with its rules and the snapshot version; returns how many."""
    return len(append_many(db, decision_records(decisions, member=member, bundle_hash=bundle_hash, kid=kid)))


def decision_records(decisions: Iterable[Any], *, member: str, bundle_hash: str | None = None,
                     kid: str | None = None, recorded: _dt.datetime | None = None,
                     client: records.Party | None = None, client_address: str | None = None) -> list[records.Record]:
    """The records :func:`decided` appends (to prepare them before the write lock); ``recorded``, ``client`` (who
    asked for the decisions): see :func:`gateway.audit.records.from_decision`."""
    return [records.from_decision(d, gateway=_me(member), bundle_hash=f"sha256:{bundle_hash}" if bundle_hash else None,
                                  kid=kid, recorded=recorded, client=client, client_address=client_address)
            for d in decisions]


def snapshot_applied(db: Database, *, at: _dt.datetime, member: str, version: int, digest: str,
                     previous: int | None) -> None:
    """A registry snapshot version was applied by this gateway."""
    append(db, records.registry_applied(at=at, gateway=_me(member), version=str(version), snapshot_hash=digest,
                                        previous_version=str(previous) if previous else None))
