"""Occupational health: exam facts to the occupational-health exam report Bundle.

An exam read from a CDC or hospital export (``gateway.adapters.labcsv``)
becomes one Bundle: the issuing Organization (this member), the worker
(Patient), the employer (Organization identified by its 统一社会信用代码), one
Observation per exam item and a DiagnosticReport of our
``cyhr-occupational-exam-report`` profile, shaped as ``docs/bundle-shapes.md``
says: exam type, hazard factors each with its exposure category, exposure
years, occupation and employer as extensions (each factor keeps the sender's
own code and name beside the catalogue's; a factor the catalogue lacks is kept
as sent, without a category, and its exam goes to review), and the GBZ 188 or
GBZ 98 conclusion as
``conclusionCode`` with the text kept in ``conclusion``. The conclusion is a
diagnostic statement: it stays on the report and is never itself recognised.

:func:`map_exam` is the exam's part of the mapping stage (exam type,
conclusion, hazard factors through the concept tables named by the layout);
the shared stage (``gateway.mapping.concepts``) maps items, units and flags.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.adapters.base import ReportFacts, SourceMessage
from gateway.errors import ConfigError, Issue, UnmappedCode, shown
from gateway.fhir.bundle import assemble, parties
from gateway.fhir.parties import Issuer, stable_id, uscc_identifier
from gateway.fhir.report import diagnostic_report, observation, ref
from gateway.mapping.tables import ConceptTable, MappingSet, Target
from gateway.naming import IG_BASE, cs_url, ext_url, sd_url

__all__ = ["ExamTerminology", "map_exam", "occupational_report", "employer_organization", "build_exam_bundle",
           "EXPOSURE_CATEGORIES", "sender_hazard_system", "sender_hazard_coding"]

#: The six exposure categories (职业健康检查 备案 categories), codes of CodeSystem exposure-category.
EXPOSURE_CATEGORIES = ("dust", "chemical", "physical", "biological", "radiation", "other")
_CS_EXAM_TYPE = cs_url("exam-type")
_CS_CONCLUSION = cs_url("exam-conclusion")
_CS_HAZARD = cs_url("hazard-factor")
_CS_CATEGORY = cs_url("exposure-category")
_CONCLUSION_HEAD = re.compile(r"[：:（(，,；;。]")  # (目前未见异常。 ends a sentence: the conclusion is before it)
# GBZ 188: 复查 asks for a recheck; it is not a conclusion of the exam. (GBZ 98's 暂时脱离放射工作 is final.)
_NOT_FINAL = {"recheck"}


@dataclass
class ExamTerminology:
    """The concept tables of an exam layout, by role."""

    exam_types: ConceptTable
    conclusions: ConceptTable
    hazard_factors: ConceptTable

    @classmethod
    def for_structure(cls, mappings: MappingSet, structure: dict[str, Any]) -> "ExamTerminology":
        """The tables a layout names under ``concept_tables`` (checked).

        :raises ConfigError: a table is missing, maps to the wrong code system, or a hazard factor
            lacks exactly one exposure category of the six.
        """
        names = structure.get("concept_tables", {})
        terms = cls(mappings.concept(names.get("exam_types", "exam-types")),
                    mappings.concept(names.get("conclusions", "exam-conclusions")),
                    mappings.concept(names.get("hazard_factors", "hazard-factors")))
        problems: list[str] = []
        for table, system in ((terms.exam_types, _CS_EXAM_TYPE), (terms.conclusions, _CS_CONCLUSION)):
            for key, targets in table.rows.items():
                if any(t.system != system or not t.code for t in targets):
                    problems.append(f"{table.path}: {key[1]!r} must map to one code of {system}")
        for key, targets in terms.hazard_factors.rows.items():
            factors = [t for t in targets if t.system == _CS_HAZARD and t.code]
            categories = [t for t in targets if t.system == _CS_CATEGORY and t.code in EXPOSURE_CATEGORIES]
            if len(factors) != 1 or len(categories) != 1 or len(targets) != 2:
                problems.append(f"{terms.hazard_factors.path}: {key[1]!r} needs one {_CS_HAZARD} row and one "
                                f"{_CS_CATEGORY} row ({', '.join(EXPOSURE_CATEGORIES)})")
        if problems:
            raise ConfigError("exam concept tables have problems:\n  " + "\n  ".join(problems),
                              str(structure.get("id")))
        return terms


def _first(table: ConceptTable, *keys: tuple[str, str]) -> list[Target]:
    for system, code in keys:
        if not code:
            continue
        try:
            found = table.lookup(system, code)
        except UnmappedCode:
            return []
        if found:
            return found
    return []


def map_exam(msg: SourceMessage, terms: ExamTerminology) -> None:
    """Fill each exam report's ``std`` with exam type, conclusion and hazard factors; append issues."""
    for report in msg.reports:
        if report.kind != "occupational-health":
            continue
        extra, std = report.extra, report.std
        exam_type, where = extra.get("exam_type", ("", report.location))
        hits = _first(terms.exam_types, ("*", exam_type))
        if not exam_type:
            msg.issues.append(Issue("error", "required", where, "exam type is empty", "101"))
        elif not hits:
            known = list(dict.fromkeys(t.display for ts in terms.exam_types.rows.values() for t in ts))
            msg.issues.append(Issue("error", "code-invalid", where,
                                    f"unknown exam type {shown(exam_type)} (known: {', '.join(known)})", "103"))
        else:
            std["exam_type"] = hits[0].coding()

        text, where = extra.get("conclusion", ("", report.location))
        head = _CONCLUSION_HEAD.split(text, maxsplit=1)[0].strip()
        hits = _first(terms.conclusions, ("*", text), ("*", head))
        if not text:
            msg.issues.append(Issue("error", "required", where, "conclusion (主检结论) is empty", "101"))
        elif not hits:
            msg.issues.append(Issue("error", "code-invalid", where,
                                    f"unknown conclusion {shown(head)}: GBZ 188 knows 目前未见异常, 复查, 疑似职业病, "
                                    "职业禁忌证, 其他疾病或异常; GBZ 98 knows 可从事放射工作, 不应(不宜)从事放射工作, "
                                    "可继续原放射工作, 暂时脱离放射工作, 不宜再做放射工作而调整做其他非放射工作", "103"))
        elif hits[0].code in _NOT_FINAL:
            msg.issues.append(Issue("error", "business-rule", where,
                                    "复查 is not a final conclusion (GBZ 188): send the exam when the recheck has "
                                    "given its final conclusion", "207"))
        else:
            std["conclusion"] = hits[0].coding()
            std["conclusion_text"] = text

        factors: list[list[dict[str, Any]]] = []
        system = str(extra.get("hazard_code_system", ""))
        for hazard in extra.get("hazards", []):
            sent = sender_hazard_coding(system, hazard["code"], hazard["name"])
            hits = _first(terms.hazard_factors, (system, hazard["code"]), ("*", hazard["code"]), ("*", hazard["name"]))
            if not hits:
                label = " ".join(x for x in (hazard["code"], hazard["name"]) if x)
                msg.issues.append(Issue("warning", "code-unknown", hazard["where"],
                                        f"hazard factor {shown(label)} is not in 《职业病危害因素分类目录》 nor in table "
                                        f"{terms.hazard_factors.id}: kept as sent, without an exposure category, and "
                                        "the exam needs review", "103"))
                parts = [{"url": "factor", "valueCoding": sent}]
            else:
                factor = next(t for t in hits if t.system == _CS_HAZARD).coding()
                category = next(t for t in hits if t.system == _CS_CATEGORY).coding()
                named = _first(terms.hazard_factors, ("*", hazard["name"])) if hazard["code"] and hazard["name"] \
                    else []
                other = next((t for t in named if t.system == _CS_HAZARD and t.code != factor["code"]), None)
                if other is not None:  # the name is another factor of the catalogue: one of the two is mistyped
                    msg.issues.append(Issue("warning", "value", hazard["where"],
                                            f"hazard factor code {shown(hazard['code'])} is "
                                            f"{shown(factor.get('display', factor['code']))}, but the name sent "
                                            f"with it, {shown(hazard['name'])}, is {shown(other.display or other.code)}"
                                            ": the code is taken; check which one is meant", "103"))
                parts = [{"url": "factor", "valueCoding": factor}, {"url": "category", "valueCoding": category},
                         {"url": "source", "valueCoding": sent}]
            if parts not in factors:
                factors.append(parts)
        if not extra.get("hazards"):
            msg.issues.append(Issue("error", "required", str(extra.get("hazard_where", report.location)),
                                    "no hazard factor (接害因素): the exam cannot be matched to the issuer's filing",
                                    "101"))
        std["hazards"] = factors


def sender_hazard_system(code_system: str) -> str:
    """Code system of a sender's own hazard-factor codes (the layout's ``hazard_code_system``)."""
    return f"{IG_BASE}/sid/hazard-code/{code_system or 'unnamed'}"


def sender_hazard_coding(code_system: str, code: str, name: str) -> dict[str, str]:
    """The factor as the sender wrote it: its code in its own system (when sent) and its name."""
    out: dict[str, str] = {}
    if code:
        out = {"system": sender_hazard_system(code_system), "code": code}
    if name:
        out["display"] = name
    return out


def employer_organization(employer: dict[str, str]) -> dict[str, Any]:
    """The employer as an Organization identified by its 统一社会信用代码 (not a member: no member profile).

    Without a name (an export that left 用人单位名称 empty) it has none: its 统一社会信用代码 is no name, and written as
    one it renamed the employer every other exam names (R4 org-1 asks for a name or an identifier)."""
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": stable_id("Organization", "employer", employer["uscc"]),
        "identifier": [uscc_identifier(employer["uscc"])],
        "active": True,
    }
    if employer.get("name"):
        org["name"] = employer["name"]
    return org


def occupational_report(report: ReportFacts, *, issuer: Issuer, subject: dict[str, Any], performer: dict[str, Any],
                        employer: dict[str, Any] | None, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The exam's DiagnosticReport (profile ``cyhr-occupational-exam-report``); as a lab report otherwise."""
    base = diagnostic_report(report, issuer=issuer, subject=subject, performer=performer, specimen_res=None,
                             results=results)
    std, extra = report.std, report.extra
    extensions: list[dict[str, Any]] = []
    if std.get("exam_type"):
        extensions.append({"url": ext_url("exam-type"), "valueCoding": std["exam_type"]})
    for parts in std.get("hazards", []):
        extensions.append({"url": ext_url("hazard-factor"), "extension": [dict(p) for p in parts]})
    if extra.get("exposure_years") is not None:
        extensions.append({"url": ext_url("exposure-years"), "valueDecimal": extra["exposure_years"]})
    if extra.get("occupation"):
        extensions.append({"url": ext_url("occupation"), "valueString": extra["occupation"]})
    if extra.get("employer"):
        emp = extra["employer"]
        reference = dict(ref(employer)) if employer is not None else {}
        if emp.get("name"):
            reference["display"] = emp["name"]
        extensions.append({"url": ext_url("employer"), "valueReference": reference})
    dr: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": base["id"],
                          "meta": {"profile": [sd_url("cyhr-occupational-exam-report")]}}
    if extensions or base.get("extension"):
        dr["extension"] = extensions + base.get("extension", [])
    for key, value in base.items():
        if key in ("resourceType", "id", "meta", "extension", "category", "conclusion", "conclusionCode"):
            continue
        dr[key] = value
        if key == "status":
            dr["category"] = [{"coding": [{"system": cs_url("report-category"), "code": "occupational-health",
                                           "display": "职业健康检查"}]}]
    # The conclusion is a diagnostic statement about the worker, kept on the report and never recognised.
    if std.get("conclusion"):
        dr["conclusion"] = std["conclusion_text"]
        dr["conclusionCode"] = [{"coding": [std["conclusion"]], "text": std["conclusion"].get("display", "")}]
    return dr


def build_exam_bundle(msg: SourceMessage, issuer: Issuer) -> dict[str, Any]:
    """The report Bundle of one exam (a read and mapped message without errors)."""
    org, pat = parties(msg, issuer)
    subject = pat if pat is not None else org
    employers: list[dict[str, Any]] = []
    observations: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    for rep in msg.reports:
        emp = rep.extra.get("employer") or {}
        employer = employer_organization(emp) if emp.get("uscc") else None
        if employer is not None and all(e["id"] != employer["id"] for e in employers):
            employers.append(employer)
        obs = [observation(r, rep, issuer=issuer, subject=subject, performer=org, specimen_res=None)
               for r in rep.results]
        observations.extend(obs)
        reports.append(occupational_report(rep, issuer=issuer, subject=subject, performer=org, employer=employer,
                                           results=obs))
    head = [org] + ([pat] if pat is not None else [])
    return assemble(msg, issuer, head + employers + observations + reports)
