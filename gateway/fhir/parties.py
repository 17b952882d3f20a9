"""Parties: the issuing Organization and the Patient as FHIR R4 resources.

Builders return plain dicts (JSON-ready; decimals as :class:`~decimal.Decimal`).
Resource ids are UUIDs derived from stable business keys (issuer USCC,
身份证号, report number), so converting the same message twice yields the same
resources and a resent correction updates rather than duplicates.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from gateway.adapters.base import PatientFacts
from gateway.naming import (
    SYSTEM_ID_CARD,
    SYSTEM_MIPLRN,
    SYSTEM_USCC,
    SYSTEM_V2_0203,
    cs_url,
    local_mrn_system,
    sd_url,
)
from gateway.uuids import uuid5

__all__ = ["Issuer", "stable_id", "organization", "patient", "uscc_identifier"]

_NAMESPACE = uuid.UUID("5b1f2a0e-6c1d-4f4e-9a57-3c2d0f1e8a11")  # the gateway's uuid5 namespace


def stable_id(*parts: str) -> str:
    """A UUID (string) determined by the given business-key parts."""
    return uuid5(_NAMESPACE, "|".join(parts))


@dataclass(frozen=True)
class Issuer:
    """The member institution that produced the results (from configuration)."""

    uscc: str
    name: str
    miplrn: str = ""


def uscc_identifier(uscc: str) -> dict[str, Any]:
    """The Identifier of an organisation by its 统一社会信用代码."""
    return {
        "type": {"coding": [{"system": cs_url("member-identifier-type"), "code": "USCC"}]},
        "system": SYSTEM_USCC,
        "value": uscc,
    }


def organization(issuer: Issuer) -> dict[str, Any]:
    """The issuing Organization."""
    identifiers = [uscc_identifier(issuer.uscc)]
    if issuer.miplrn:
        identifiers.append({
            "type": {"coding": [{"system": cs_url("member-identifier-type"), "code": "MIPLRN"}]},
            "system": SYSTEM_MIPLRN,
            "value": issuer.miplrn,
        })
    return {
        "resourceType": "Organization",
        "id": stable_id("Organization", issuer.uscc),
        "meta": {"profile": [sd_url("cyhr-organization")]},
        "identifier": identifiers,
        "active": True,
        "name": issuer.name,
    }


def patient(facts: PatientFacts, issuer: Issuer, fallback_key: str) -> dict[str, Any]:
    """The Patient; identified by 身份证号 when the source gave one."""
    identifiers: list[dict[str, Any]] = []
    if facts.id_card:
        identifiers.append({
            "use": "official",
            "type": {"coding": [{"system": SYSTEM_V2_0203, "code": "NNCHN"}]},
            "system": SYSTEM_ID_CARD,
            "value": facts.id_card,
        })
    for id_type, value in facts.other_ids:
        identifiers.append({
            "type": {"coding": [{"system": SYSTEM_V2_0203, "code": id_type}]},
            "system": local_mrn_system(issuer.uscc),
            "value": value,
        })
    key = ("Patient", "id-card", facts.id_card) if facts.id_card else ("Patient", issuer.uscc, fallback_key)
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "id": stable_id(*key),
        "meta": {"profile": [sd_url("cyhr-patient")]},
    }
    if identifiers:
        res["identifier"] = identifiers
    if facts.name:
        name: dict[str, Any] = {"text": facts.name}
        if facts.family and facts.given:
            name["family"] = facts.family
            name["given"] = [facts.given]
        res["name"] = [name]
    if facts.sex:
        res["gender"] = facts.sex
    if facts.birth_date:
        res["birthDate"] = facts.birth_date
    return res
