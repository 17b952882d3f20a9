"""Registry as FHIR R4: Organization, VerificationResult and Endpoint resources of a snapshot.

For members that want to browse the registry with FHIR tools. The snapshot
stays the authority; these resources are a read-only view of one version:

- ``Organization`` per member (id = its USCC): identifiers, name, active on the
  given date, level, and every qualification in the R5 ``Organization.qualification``
  cross-version extension (R4 has no such element);
- ``VerificationResult`` per qualification (id ``q-<id>``) and per EQA result
  (id ``eqa-<n>``): what was verified (extension ``qualification-scope``), by whom
  (``validator.organization``), for which period (``qualification-period``), and
  whether it holds (``validated``) or not (``val-fail``);
- ``Endpoint`` per member with a gateway URL (id ``ep-<USCC>``);
- ``Practitioner`` per physician with qualifications of their own (id ``phy-<id>``: 身份证号, 资格证书编号 and
  the qualifications with their periods) and a ``PractitionerRole`` per registration to practise at a member
  (多点执业, with the staff id the member writes and the period).

A member's hospital level is dated: ``hospital-level`` gives the level held on the date asked, and each
hospital-grade qualification carries its level and grade (``code.text``) and its period.

Demo snapshots carry the HL7 ``HTEST`` (test health data) tag on every resource.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from gateway.naming import SYSTEM_LOINC, SYSTEM_MIPLRN, SYSTEM_STAFF, SYSTEM_USCC, cs_url, ext_url
from gateway.registry.models import (
    QUALIFICATION_TYPES,
    EqaResult,
    Member,
    Period,
    Physician,
    Qualification,
    Snapshot,
    qualification_type_code,
)

__all__ = [
    "EXT_QUALIFICATION",
    "EXT_QUALIFICATION_SCOPE",
    "EXT_QUALIFICATION_PERIOD",
    "EXT_HOSPITAL_LEVEL",
    "EXT_DIVISION",
    "CS_QUALIFICATION_TYPE",
    "organization",
    "endpoint",
    "qualification_result",
    "eqa_result",
    "practitioner",
    "practitioner_roles",
    "registry_resources",
]

# The R5 element Organization.qualification, carried in R4 by its standard cross-version extension.
EXT_QUALIFICATION = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Organization.qualification"
# Ours (new; built through gateway.naming): what a verification covers, for which period, a
# member's hospital level, its GB/T 2260 division code, and the qualification types.
EXT_QUALIFICATION_SCOPE = ext_url("qualification-scope")
EXT_QUALIFICATION_PERIOD = ext_url("qualification-period")
EXT_HOSPITAL_LEVEL = ext_url("hospital-level")
EXT_DIVISION = ext_url("administrative-division")
CS_QUALIFICATION_TYPE = cs_url("qualification-type")

_MEMBER_ID_TYPE = cs_url("member-identifier-type")  # as in docs/bundle-shapes.md
_ENDPOINT_CONNECTION = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
_ENDPOINT_PAYLOAD = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_PROVINCES = {"51": "四川省", "50": "重庆市"}
_KINDS = {
    "hospital": "医院",
    "cdc": "疾病预防控制中心",
    "independent-lab": "独立医学实验室",
    "exam-centre": "体检中心",
    "primary-care": "基层医疗卫生机构",
}


def _meta(snapshot: Snapshot) -> dict[str, Any]:
    meta: dict[str, Any] = {"versionId": str(snapshot.version)}
    if snapshot.demo:
        meta["tag"] = [{"system": _ACT_REASON, "code": "HTEST", "display": "test health data"}]
    return meta


def _period(period: Period) -> dict[str, str]:
    out = {}
    if period.start:
        out["start"] = period.start.isoformat()
    if period.end:
        out["end"] = period.end.isoformat()
    return out


def _org_ref(uscc: str, name: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"reference": f"Organization/{uscc}"}
    if name:
        ref["display"] = name
    return ref


def _qualification_type(q_type: str) -> dict[str, Any]:
    q_type = qualification_type_code(q_type)
    return {
        "coding": [
            {"system": CS_QUALIFICATION_TYPE, "code": q_type, "display": QUALIFICATION_TYPES[q_type]}
        ]
    }


def organization(snapshot: Snapshot, member: Member, on: _dt.date) -> dict[str, Any]:
    """The Organization resource of one member, ``active`` as of ``on``."""
    extensions: list[dict[str, Any]] = [{"url": EXT_DIVISION, "valueCode": member.division}]
    level = snapshot.level_on(member.uscc, on)  # the level held on ``on``; its history is in the qualifications
    if level:
        extensions.append({"url": EXT_HOSPITAL_LEVEL, "valueString": level.level})
    for q in snapshot.qualifications:
        if q.member != member.uscc or q.physician_id:
            continue  # physicians' qualifications are theirs, not the institution's
        code = _qualification_type(q.type)
        if q.type == "hospital-grade" and q.grade:
            code["text"] = q.grade  # the level and grade held over the period below
        parts: list[dict[str, Any]] = [{"url": "code", "valueCodeableConcept": code}]
        if q.number:
            parts.insert(0, {"url": "identifier", "valueIdentifier": {"value": q.number}})
        if q.period.start or q.period.end:
            parts.append({"url": "period", "valuePeriod": _period(q.period)})
        parts.append({"url": "issuer", "valueReference": {"display": q.authority_name}})
        extensions.append({"url": EXT_QUALIFICATION, "extension": parts})
    identifiers = [
        {"type": {"coding": [{"system": _MEMBER_ID_TYPE, "code": "USCC"}]}, "system": SYSTEM_USCC, "value": member.uscc}
    ]
    if member.miplrn:
        identifiers.append(
            {
                "type": {"coding": [{"system": _MEMBER_ID_TYPE, "code": "MIPLRN"}]},
                "system": SYSTEM_MIPLRN,
                "value": member.miplrn,
            }
        )
    resource: dict[str, Any] = {
        "resourceType": "Organization",
        "id": member.uscc,
        "meta": _meta(snapshot),
        "extension": extensions,
        "identifier": identifiers,
        "active": member.active_on(on),
        "type": [{"text": _KINDS.get(member.kind, member.kind)}],
        "name": member.name,
        "address": [{"state": _PROVINCES.get(member.province, member.province)}],
    }
    if member.endpoint:
        resource["endpoint"] = [{"reference": f"Endpoint/ep-{member.uscc}"}]
    return resource


def endpoint(snapshot: Snapshot, member: Member, on: _dt.date) -> dict[str, Any] | None:
    """The Endpoint resource of a member's gateway, or None when it lists no URL."""
    if not member.endpoint:
        return None
    return {
        "resourceType": "Endpoint",
        "id": f"ep-{member.uscc}",
        "meta": _meta(snapshot),
        "status": "active" if member.active_on(on) else "off",
        "connectionType": {"system": _ENDPOINT_CONNECTION, "code": "hl7-fhir-rest"},
        "name": f"{member.name} gateway",
        "managingOrganization": _org_ref(member.uscc, member.name),
        "payloadType": [{"coding": [{"system": _ENDPOINT_PAYLOAD, "code": "any"}]}],
        "payloadMimeType": ["application/fhir+json"],
        "address": member.endpoint,
    }


def _verification(
    snapshot: Snapshot,
    resource_id: str,
    target: list[dict[str, Any]],
    holds: bool,
    process: dict[str, Any],
    validator: str,
    period: Period,
    scope: list[dict[str, Any]],
) -> dict[str, Any]:
    extensions = [{"url": EXT_QUALIFICATION_SCOPE, "valueCodeableConcept": s} for s in scope]
    if period.start or period.end:
        extensions.append({"url": EXT_QUALIFICATION_PERIOD, "valuePeriod": _period(period)})
    resource: dict[str, Any] = {
        "resourceType": "VerificationResult",
        "id": resource_id,
        "meta": _meta(snapshot),
        "target": target,
        "status": "validated" if holds else "val-fail",
        "statusDate": snapshot.issued.isoformat(),
        "validationProcess": [process],
        "validator": [{"organization": {"display": validator}}],
    }
    if extensions:
        resource["extension"] = extensions
    return resource


def qualification_result(snapshot: Snapshot, q: Qualification, on: _dt.date) -> dict[str, Any]:
    """The VerificationResult of one qualification; ``validated`` when it holds on ``on``."""
    member = snapshot.member(q.member)
    target = [_org_ref(q.member, member.name if member else None)] if q.member else []
    physician = snapshot.physicians.get(q.physician_ref or "")
    if q.physician_ref:
        target.append({"reference": f"Practitioner/phy-{q.physician_ref}",
                       "display": (physician.name if physician else None) or q.physician_ref})
    if q.physician_id:
        target.insert(
            0,
            {
                "identifier": {"system": SYSTEM_STAFF, "value": q.physician_id},
                "display": q.physician_name or q.physician_id,
            },
        )
    scope: list[dict[str, Any]] = [{"text": value} for value in q.scope]
    # 备案 by factor: the factors a filing lists (CodeSystem hazard-factor), beside the classes above.
    scope += [{"coding": [{"system": cs_url("hazard-factor"), "code": code}]} for code in q.factors]
    if q.grade:
        scope.append({"text": f"grade {q.grade}"})
    return _verification(
        snapshot, f"q-{q.id}", target, q.valid_on(on), _qualification_type(q.type), q.authority_name, q.period, scope
    )


def eqa_result(snapshot: Snapshot, index: int, e: EqaResult) -> dict[str, Any]:
    """The VerificationResult of one EQA result (``eqa-<index>`` in snapshot order)."""
    member = snapshot.member(e.member)
    if e.catalogue:
        catalogue = snapshot.catalogue(e.catalogue)
        item = next((it for it in catalogue.items if it.code == e.code), None) if catalogue else None
        coding = {"system": catalogue.system if catalogue else cs_url(f"catalogue-{e.catalogue}"), "code": str(e.code)}
        if item:
            coding["display"] = item.display
    else:
        coding = {"system": SYSTEM_LOINC, "code": str(e.loinc)}
    process = {
        "coding": [{"system": CS_QUALIFICATION_TYPE, "code": "eqa-pass", "display": QUALIFICATION_TYPES["eqa-pass"]}],
        "text": f"{e.provider} {e.year}",
    }
    return _verification(
        snapshot,
        f"eqa-{index}",
        [_org_ref(e.member, member.name if member else None)],
        e.passed,
        process,
        e.provider,
        e.period,
        [{"coding": [coding]}],
    )


def practitioner(snapshot: Snapshot, physician: Physician) -> dict[str, Any]:
    """The Practitioner of a physician with qualifications of their own (id ``phy-<id>``): 身份证号 and
    资格证书编号 as identifiers, each qualification with its period in ``Practitioner.qualification``."""
    qualifications = []
    for q in snapshot.qualifications:
        if q.physician_ref != physician.id:
            continue
        entry: dict[str, Any] = {"code": _qualification_type(q.type)}
        if q.scope:
            entry["code"]["text"] = ", ".join(q.scope)
        if q.number:
            entry["identifier"] = [{"value": q.number}]
        if q.period.start or q.period.end:
            entry["period"] = _period(q.period)
        entry["issuer"] = {"display": q.authority_name}
        qualifications.append(entry)
    resource: dict[str, Any] = {
        "resourceType": "Practitioner",
        "id": f"phy-{physician.id}",
        "meta": _meta(snapshot),
        # (the 身份证号 the registry matches reports by is not shown: this view is open to anyone; the signed
        # snapshot carries it for the gateways that decide)
        "identifier": [
            {"type": {"text": "资格证书编号"}, "value": physician.certificate},
        ],
    }
    if physician.name:
        resource["name"] = [{"text": physician.name}]
    if qualifications:
        resource["qualification"] = qualifications
    return resource


def practitioner_roles(snapshot: Snapshot, physician: Physician, on: _dt.date) -> list[dict[str, Any]]:
    """One PractitionerRole per registration to practise at a member (多点执业), ``active`` on ``on``, with the
    staff id that member writes in ``resultsInterpreter``."""
    out = []
    for n, r in enumerate(physician.practice, start=1):
        member = snapshot.member(r.member)
        role: dict[str, Any] = {
            "resourceType": "PractitionerRole",
            "id": f"phy-{physician.id}-{n}",
            "meta": _meta(snapshot),
            "identifier": [{"system": SYSTEM_STAFF, "value": r.staff_id}],
            "active": r.period.covers(on),
            "practitioner": {
                "reference": f"Practitioner/phy-{physician.id}",
                "display": physician.name or physician.id,
            },
            "organization": _org_ref(r.member, member.name if member else None),
        }
        if r.period.start or r.period.end:
            role["period"] = _period(r.period)
        out.append(role)
    return out


def registry_resources(snapshot: Snapshot, on: _dt.date) -> dict[str, list[dict[str, Any]]]:
    """Every resource of the snapshot by type: ``Organization``, ``VerificationResult``, ``Endpoint``,
    ``Practitioner`` and ``PractitionerRole``."""
    members = list(snapshot.members.values())
    endpoints = [ep for ep in (endpoint(snapshot, m, on) for m in members) if ep is not None]
    results = [qualification_result(snapshot, q, on) for q in snapshot.qualifications]
    results += [eqa_result(snapshot, i, e) for i, e in enumerate(snapshot.eqa)]
    physicians = list(snapshot.physicians.values())
    return {
        "Organization": [organization(snapshot, m, on) for m in members],
        "VerificationResult": results,
        "Endpoint": endpoints,
        "Practitioner": [practitioner(snapshot, p) for p in physicians],
        "PractitionerRole": [role for p in physicians for role in practitioner_roles(snapshot, p, on)],
    }
