"""The FHIR shape of a 职业卫生 / 放射卫生 technical-service report.

One Bundle (profile ``cyhr-service-report-bundle``) per report: the issuing
Organization, the employer (用人单位, by 统一社会信用代码) and a DiagnosticReport
(profile ``cyhr-technical-service-report``) whose ``presentedForm`` is the PDF
itself (``application/pdf``, base64 ``data``, SHA-1 ``hash`` as FHIR defines it,
``size``, ``title``, ``creation`` = the report date). Category
``technical-service``; code = the service type (CodeSystem
``technical-service-type``); ``effectivePeriod`` = the 检测/评价 dates;
extensions name the project, the employer, the issuer's qualification number
(谁报告、谁负责), the report date, and the PDF's SHA-256 and whether it carries a
PDF signature dictionary (recorded, not verified). There is no Patient: the
report is about a workplace, not a person.

A DiagnosticReport rather than a DocumentReference: the recognition engine,
corrections (``replaces``, superseding by issuer + report number), report
status and the exchange already work on DiagnosticReports, and R4 gives it
``presentedForm`` for exactly this (the report as issued).
"""
from __future__ import annotations

from typing import Any

from gateway.adapters.base import SourceMessage
from gateway.errors import Issue, shown
from gateway.fhir.parties import Issuer, organization, stable_id
from gateway.naming import IG_BASE, SYSTEM_USCC, cs_url, ext_url, sd_url

__all__ = ["build_service_report_bundle", "service_report_system", "SYSTEM_QUALIFICATION_NUMBER"]

#: Identifier system of a technical-service qualification's certificate number.
SYSTEM_QUALIFICATION_NUMBER = f"{IG_BASE}/sid/technical-service-qualification"


def service_report_system(issuer_uscc: str) -> str:
    """Identifier system of one issuer's report numbers (a report number is unique per issuer only)."""
    return f"{IG_BASE}/sid/service-report/{issuer_uscc}"


def build_service_report_bundle(msg: SourceMessage, issuer: Issuer) -> dict[str, Any]:
    """The Bundle of one read technical-service report (a message without errors)."""
    rep = msg.reports[0]
    x = rep.extra
    sent_name = str(x["issuer_name"] or "")
    if x["issuer_uscc"] == issuer.uscc and issuer.name:
        # The issuer is this member (the adapter refuses another): its Organization is named as configured, as the
        # HL7 v2 and CSV paths name it. A sent name was stored over the member's own Organization, renaming it in
        # every report it performed.
        if sent_name and sent_name != issuer.name:
            msg.issues.append(Issue("warning", "business-rule", "metadata.issuer.name",
                                    f"issuer.name {shown(sent_name)} is not this member's configured name "
                                    f"{shown(issuer.name)}: the configured name is used (issuer_name in the "
                                    "gateway's settings)"))
    elif x["issuer_uscc"] != issuer.uscc:
        issuer = Issuer(x["issuer_uscc"], sent_name or issuer.name, "")
    else:  # (this member with no configured name: the sent one, the member's licence number kept)
        issuer = Issuer(issuer.uscc, sent_name, issuer.miplrn)
    org = organization(issuer)
    employer = organization(Issuer(x["employer_uscc"], x["employer_name"]))
    system = service_report_system(issuer.uscc)
    # a correction sent with the PDF of the version it corrects (its metadata fixed) is a version of its own too
    version = (rep.status,) if rep.status in ("corrected", "amended") else ()
    report_id = stable_id("DiagnosticReport", system, rep.number, x["pdf_sha256"], *version)
    extensions: list[dict[str, Any]] = []
    if rep.replaces:
        extensions.append({"url": ext_url("replaces"), "valueIdentifier": {"system": system, "value": rep.replaces}})
    extensions += [
        {"url": ext_url("service-project"), "valueString": x["project"]},
        {"url": ext_url("employer"), "valueReference": {"reference": f"urn:uuid:{employer['id']}",
                                                        "display": x["employer_name"]}},
        {"url": ext_url("service-qualification"), "valueIdentifier": {
            "system": SYSTEM_QUALIFICATION_NUMBER, "value": x["qualification_number"],
            "assigner": {"identifier": {"system": SYSTEM_USCC, "value": issuer.uscc}}}},
        {"url": ext_url("report-date"), "valueDate": x["report_date"]},
    ]
    period = {"start": x["service_start"]}
    if x["service_end"]:
        period["end"] = x["service_end"]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "meta": {"profile": [sd_url("cyhr-technical-service-report")]},
        "extension": extensions,
        "identifier": [{"system": system, "value": rep.number,
                        "assigner": {"identifier": {"system": SYSTEM_USCC, "value": issuer.uscc}}}],
        "status": rep.status,
        "category": [{"coding": [{"system": cs_url("report-category"), "code": "technical-service",
                                  "display": "职业卫生/放射卫生技术服务"}]}],
        "code": {"coding": [{"system": cs_url("technical-service-type"), "code": x["service_type"],
                             "display": rep.code.display}], "text": rep.code.display},
        "effectivePeriod": period,
        "performer": [{"reference": f"urn:uuid:{org['id']}", "display": issuer.name}],
        "presentedForm": [{
            "extension": [{"url": ext_url("pdf-facts"), "extension": [
                {"url": "sha256", "valueString": x["pdf_sha256"]},
                {"url": "signatureDictionary", "valueBoolean": x["pdf_signature_dictionary"]}]}],
            "contentType": "application/pdf",
            "language": "zh-CN",
            "data": _b64(x["pdf"]),
            "size": x["pdf_size"],
            "hash": x["pdf_sha1"],
            "title": x["title"],
            "creation": x["report_date"],
        }],
    }
    bundle_id = stable_id("Bundle", issuer.uscc, msg.format, system, rep.number, x["pdf_sha256"], *version)
    resources = [org, employer, report]
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"profile": [sd_url("cyhr-service-report-bundle")]},
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle_id}"},
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")
