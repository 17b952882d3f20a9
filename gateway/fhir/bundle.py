"""Bundle: one report Bundle per source message.

Entries in a fixed order (Organization, Patient, Specimens, Observations,
DiagnosticReports), each with a ``urn:uuid:`` fullUrl that references inside
the Bundle point to. The Bundle id derives from the issuer and the message id,
so the same message always gives the same Bundle.
"""
from __future__ import annotations

from typing import Any

from gateway.adapters.base import SourceMessage
from gateway.fhir.parties import Issuer, organization, patient, stable_id
from gateway.fhir.report import diagnostic_report, observation, specimen
from gateway.naming import sd_url

__all__ = ["build_bundle", "entries_of", "parties", "assemble"]


def parties(msg: SourceMessage, issuer: Issuer) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The issuing Organization and the Patient (None when the source names none) of a message."""
    org = organization(issuer)
    pat = patient(msg.patient, issuer, f"{msg.sender}|{msg.message_id}") if msg.patient else None
    return org, pat


def assemble(msg: SourceMessage, issuer: Issuer, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The report Bundle holding ``resources`` in order, identified by issuer and source message."""
    bundle_id = stable_id("Bundle", issuer.uscc, msg.format, msg.sender, msg.message_id)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [sd_url("cyhr-report-bundle")]},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle_id}"},
        "type": "collection",
    }
    if msg.sent_at and "T" in msg.sent_at:
        bundle["timestamp"] = msg.sent_at
    bundle["entry"] = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]
    return bundle


def build_bundle(msg: SourceMessage, issuer: Issuer) -> dict[str, Any]:
    """The lab report Bundle for a read and mapped message (one without errors)."""
    org, pat = parties(msg, issuer)
    subject = pat if pat is not None else org
    specimens: list[dict[str, Any]] = []
    observations: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    for rep in msg.reports:
        spec = specimen(rep.specimen, rep, issuer=issuer, subject=subject) if rep.specimen else None
        if spec is not None:
            specimens.append(spec)
        obs = [observation(r, rep, issuer=issuer, subject=subject, performer=org, specimen_res=spec)
               for r in rep.results]
        observations.extend(obs)
        reports.append(diagnostic_report(rep, issuer=issuer, subject=subject, performer=org, specimen_res=spec,
                                         results=obs))
    head = [org] + ([pat] if pat is not None else [])
    return assemble(msg, issuer, head + specimens + observations + reports)


def entries_of(bundle: dict[str, Any], resource_type: str | None = None) -> list[dict[str, Any]]:
    """The resources of a Bundle, optionally only one type."""
    out = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
    return [r for r in out if resource_type is None or r.get("resourceType") == resource_type]
