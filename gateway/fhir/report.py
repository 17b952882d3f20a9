"""Report resources: Observation, Specimen and DiagnosticReport from mapped records.

Pure functions over the neutral records (after the mapping stage filled their
``std`` side). The shape is documented in ``docs/bundle-shapes.md``.
"""
from __future__ import annotations

import re
from typing import Any

from gateway.adapters.base import Coded, Quantity, ReportFacts, ResultFacts, SpecimenFacts, parse_reference_range
from gateway.fhir.parties import Issuer, stable_id, uscc_identifier
from gateway.naming import (
    SYSTEM_DATA_ABSENT,
    SYSTEM_LAB_REPORT_NO,
    SYSTEM_LOINC,
    SYSTEM_OBS_CATEGORY,
    SYSTEM_SPECIMEN_NO,
    SYSTEM_STAFF,
    SYSTEM_V2_0074,
    ext_url,
    sd_url,
)

__all__ = ["observation", "specimen", "diagnostic_report", "parse_reference_range", "ref", "report_key"]

_CODED_SYSTEMS = {"LN": SYSTEM_LOINC, "SCT": "http://snomed.info/sct", "UCUM": "http://unitsofmeasure.org"}
#: Code systems a coded value names by their HL7 OID (a CDA value's codeSystem), as FHIR names them; any other OID
#: is ``urn:oid:``.
_OID_SYSTEMS = {"2.16.840.1.113883.6.1": SYSTEM_LOINC, "2.16.840.1.113883.6.96": "http://snomed.info/sct",
                "2.16.840.1.113883.6.8": "http://unitsofmeasure.org"}
_OID = re.compile(r"[0-2](\.\d+)+")


def ref(resource: dict[str, Any]) -> dict[str, str]:
    """A reference to a resource inside the same Bundle (by its ``urn:uuid:`` fullUrl)."""
    return {"reference": f"urn:uuid:{resource['id']}"}


def _quantity(q: Quantity, unit: str, ucum: dict[str, str] | None, simple: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"value": q.value}
    if q.comparator and not simple:
        out["comparator"] = q.comparator
    if unit:
        out["unit"] = unit
        if ucum:
            out.update(ucum)
    return out


def _reference_range(res: ResultFacts) -> list[dict[str, Any]]:
    text = res.reference_range
    if not text:
        return []
    low, high = parse_reference_range(text)
    rr: dict[str, Any] = {}
    ucum = res.std.get("ucum")
    if low is not None:
        rr["low"] = _quantity(Quantity(low), res.unit, ucum, simple=True)
    if high is not None:
        rr["high"] = _quantity(Quantity(high), res.unit, ucum, simple=True)
    rr["text"] = text
    return [rr]


def _value(res: ResultFacts) -> dict[str, Any]:
    ucum = res.std.get("ucum")
    kind, value = res.value_kind, res.value
    if kind == "quantity":
        return {"valueQuantity": _quantity(value, res.unit, ucum)}
    if kind == "string":
        return {"valueString": value}
    if kind == "coded":
        cc: dict[str, Any] = {}
        # a coded value may carry the same meaning in other code systems (a CDA value's translations): further codings
        codings = [_value_coding(c) for c in [value, *getattr(value, "translations", ())] if c.code]
        if codings:
            cc["coding"] = [c for n, c in enumerate(codings) if c not in codings[:n]]
        if res.std.get("value_codings"):  # the mapping stage's reading: every triplet sent, each in its system
            cc["coding"] = res.std["value_codings"]
        cc["text"] = value.display or value.code
        return {"valueCodeableConcept": cc}
    if kind == "range":
        low, high = value
        return {"valueRange": {"low": _quantity(low, res.unit, ucum, True),
                               "high": _quantity(high, res.unit, ucum, True)}}
    if kind == "ratio":
        num, den = value
        return {"valueRatio": {"numerator": {"value": num.value}, "denominator": {"value": den.value}}}
    if kind == "datetime":
        return {"valueDateTime": value}
    reason = res.std.get("absent", "unknown")
    return {"dataAbsentReason": {"coding": [{"system": SYSTEM_DATA_ABSENT, "code": reason}]}}


def _value_coding(code: Coded) -> dict[str, str]:
    """A coding of a coded value: its system a name HL7 v2 uses (LN, SCT, UCUM) or an OID (a known one as its FHIR
    URI, another as ``urn:oid:``); none when the source named another."""
    system = _CODED_SYSTEMS.get(code.system.upper()) or _OID_SYSTEMS.get(code.system) or (
        f"urn:oid:{code.system}" if _OID.fullmatch(code.system) else "")
    coding = {"system": system, "code": code.code} if system else {"code": code.code}
    if code.display:
        coding["display"] = code.display
    return coding


def observation(res: ResultFacts, report: ReportFacts, *, issuer: Issuer, subject: dict[str, Any],
                performer: dict[str, Any], specimen_res: dict[str, Any] | None) -> dict[str, Any]:
    """One result as an Observation of our lab-result profile."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": stable_id("Observation", issuer.uscc, report_key(report), res.code.code, str(res.occurrence)),
        "meta": {"profile": [sd_url("cyhr-lab-observation")]},
        "status": res.std.get("status", "unknown"),
        "category": [{"coding": [{"system": SYSTEM_OBS_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}],
        "code": {"coding": res.std["codings"], "text": res.code.display or res.code.code},
        "subject": ref(subject),
    }
    effective = res.observed_at or report.collected_at
    if effective:
        obs["effectiveDateTime"] = effective
    if report.issued_at:
        obs["issued"] = report.issued_at
    obs["performer"] = [ref(performer)]
    obs.update(_value(res))
    if res.std.get("interpretation"):
        obs["interpretation"] = res.std["interpretation"]
    if res.notes:
        obs["note"] = [{"text": n} for n in res.notes]
    if specimen_res is not None:
        obs["specimen"] = ref(specimen_res)
    ranges = _reference_range(res)
    if ranges:
        obs["referenceRange"] = ranges
    return obs


def specimen(facts: SpecimenFacts, report: ReportFacts, *, issuer: Issuer, subject: dict[str, Any]) -> dict[str, Any]:
    """The sample a report's results were measured on."""
    res: dict[str, Any] = {
        "resourceType": "Specimen",
        "id": stable_id("Specimen", issuer.uscc, report_key(report)),
    }
    if facts.number:
        res["identifier"] = [{"system": SYSTEM_SPECIMEN_NO, "value": facts.number}]
    if facts.type:
        cc: dict[str, Any] = {}
        coding = report.std.get("specimen_type")
        if coding:
            cc["coding"] = [coding]
        cc["text"] = facts.type.display or facts.type.code
        res["type"] = cc
    res["subject"] = ref(subject)
    if facts.received_at:
        res["receivedTime"] = facts.received_at
    if facts.collected_at:
        res["collection"] = {"collectedDateTime": facts.collected_at}
    return res


def diagnostic_report(report: ReportFacts, *, issuer: Issuer, subject: dict[str, Any], performer: dict[str, Any],
                      specimen_res: dict[str, Any] | None, results: list[dict[str, Any]]) -> dict[str, Any]:
    """A lab report of our lab-report profile, pointing at its Observations."""
    codings = report.std.get("codings") or []
    code: dict[str, Any] = {"coding": codings} if codings else {
        "coding": [{"system": SYSTEM_LOINC, "code": "11502-2", "display": "Laboratory report"}]}
    code["text"] = report.code.display or report.code.code or "检验报告"
    dr: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": stable_id("DiagnosticReport", issuer.uscc, report_key(report)),
        "meta": {"profile": [sd_url("cyhr-lab-report")]},
        "identifier": [{
            "system": SYSTEM_LAB_REPORT_NO,
            "value": report.number,
            "assigner": {"identifier": {"system": uscc_identifier(issuer.uscc)["system"], "value": issuer.uscc}},
        }] + [{"system": _system_of(oid), "value": value} for oid, value in report.other_ids],
        "status": report.std.get("status", "unknown"),
        "category": [{"coding": [{"system": SYSTEM_V2_0074, "code": "LAB", "display": "Laboratory"}]}],
        "code": code,
        "subject": ref(subject),
    }
    if report.collected_at:
        dr["effectiveDateTime"] = report.collected_at
    if report.issued_at:
        dr["issued"] = report.issued_at
    dr["performer"] = [ref(performer)] + _author(report)
    if report.interpreter_id or report.interpreter_name:
        who: dict[str, Any] = {}
        if report.interpreter_id:
            who["identifier"] = {"system": SYSTEM_STAFF, "value": report.interpreter_id}
        if report.interpreter_name:
            who["display"] = report.interpreter_name
        dr["resultsInterpreter"] = [who]
    if report.reading_org and report.reading_org != issuer.uscc:  # 基层检查、上级诊断: the reading institution
        dr.setdefault("resultsInterpreter", []).append(
            {"type": "Organization", "identifier": uscc_identifier(report.reading_org)})
    if specimen_res is not None:
        dr["specimen"] = [ref(specimen_res)]
    if results:
        dr["result"] = [ref(o) for o in results]
    # A diagnostic conclusion is never part of a recognised result: it stays on the report, apart from result[].
    if report.conclusion:
        dr["conclusion"] = report.conclusion
    if report.conclusion_codes:
        dr["conclusionCode"] = [_concept(c) for c in report.conclusion_codes]
    if report.replaces:
        system = _system_of(report.replaces_system) if report.replaces_system else SYSTEM_LAB_REPORT_NO
        replaced: dict[str, Any] = {"system": system, "value": report.replaces}
        if system == SYSTEM_LAB_REPORT_NO:  # a 检验报告单号 is unique only with its issuer
            replaced["assigner"] = {"identifier": {"system": uscc_identifier(issuer.uscc)["system"],
                                                   "value": issuer.uscc}}
        replaces = {"url": ext_url("replaces"), "valueIdentifier": replaced}
        dr = {"resourceType": dr.pop("resourceType"), "id": dr.pop("id"), "meta": dr.pop("meta"),
              "extension": [replaces], **dr}
    return dr


def _author(report: ReportFacts) -> list[dict[str, Any]]:
    """The practitioner who issued the report (CDA author, 检验报告医师) as a logical reference, when known."""
    author = report.extra.get("author")
    if not isinstance(author, dict) or not (author.get("id") or author.get("name")):
        return []
    who: dict[str, Any] = {"type": "Practitioner"}
    if author.get("id"):
        who["identifier"] = {"system": _system_of(author.get("system") or SYSTEM_STAFF), "value": author["id"]}
    if author.get("name"):
        who["display"] = author["name"]
    return [who]


def report_key(report: ReportFacts) -> str:
    """The business key of a report version in resource ids: its ``key``, else its number."""
    return report.key or report.number


def _system_of(source_system: str) -> str:
    """A FHIR system URI for a source-side system: an OID becomes ``urn:oid:``, a URI stays."""
    if re.fullmatch(r"[0-2](\.\d+)+", source_system):
        return f"urn:oid:{source_system}"
    return source_system


def _concept(code: Coded) -> dict[str, Any]:
    coding: dict[str, Any] = {"code": code.code}
    if code.system:
        coding = {"system": _system_of(code.system), **coding}
    if code.display:
        coding["display"] = code.display
    return {"coding": [coding], "text": code.display or code.code}
