"""Result facts: what a decision needs to know about each result in a report Bundle.

:func:`facts_from_bundle` reads the Bundle shape every adapter produces
(``docs/bundle-shapes.md``): one :class:`ResultFacts` per Observation, plus one
per report conclusion (a diagnostic statement, which is never recognised).
Facts are taken as sent; a fact the Bundle does not carry stays ``None`` so
that the rule needing it says "not evaluable" instead of guessing.

Identifiers are checked where they enter: the issuer's 统一社会信用代码 (GB 32100)
and the patient's 身份证号 (GB 11643). A bad one refuses the Bundle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import IdentifierError, InputError, ParseError
from gateway.identifiers import check_id_card, check_uscc
from gateway.jsonutil import OBJECT
from gateway.naming import (
    SYSTEM_ID_CARD,
    SYSTEM_STAFF,
    SYSTEM_USCC,
    SYSTEM_V2_0074,
    cs_url,
    ext_url,
)
from gateway.registry.models import Coding


__all__ = [
    "ResultFacts",
    "HazardFactor",
    "facts_from_bundle",
    "observation_value",
    "with_superseded",
    "EXT_RECOGNITION_MARK",
    "EXT_REPLACES",
    "EXT_HAZARD_FACTOR",
    "EXT_EXAM_TYPE",
    "CS_REPORT_CATEGORY",
]

# URIs of docs/bundle-shapes.md, built through gateway.naming.
EXT_RECOGNITION_MARK = ext_url("recognition-mark")
EXT_REPLACES = ext_url("replaces")
EXT_HAZARD_FACTOR = ext_url("hazard-factor")
EXT_EXAM_TYPE = ext_url("exam-type")
CS_REPORT_CATEGORY = cs_url("report-category")
EXT_SERVICE_QUALIFICATION = ext_url("service-qualification")
EXT_REPORT_DATE = ext_url("report-date")

# v2-0074 diagnostic service sections that are imaging (the rest of a report with a v2-0074 code is lab).
_IMAGING_SECTIONS = {"RAD", "CT", "MR", "US", "NMR", "NMS", "RX", "VUS", "XRC", "CUS", "OUS", "IMG"}
# v2-0074 EC: electrocardiac (ECG, Holter).
_ECG_SECTIONS = {"EC"}


@dataclass(frozen=True)
class HazardFactor:
    """One 职业病危害因素 of an occupational exam, with its exposure category."""

    code: str | None
    name: str | None
    category: str | None


@dataclass(frozen=True)
class ResultFacts:
    """Everything the rules read about one result (or one report conclusion).

    ``kind`` is ``observation`` or ``conclusion``. Date-times are kept as the
    FHIR strings sent; the rules parse them.
    """

    kind: str
    entry: str
    location: str
    bundle_id: str | None = None
    issuer_uscc: str | None = None
    patient: tuple[str, str] | None = None
    codings: tuple[Coding, ...] = ()
    text: str | None = None
    observation_status: str | None = None
    report_entry: str | None = None
    report_id: str | None = None
    report_status: str | None = None
    report_class: str | None = None
    superseded_by: str | None = None
    collected: str | None = None
    effective: str | None = None
    report_effective: str | None = None
    marks: tuple[str, ...] = ()
    exam_type: str | None = None
    hazard_factors: tuple[HazardFactor, ...] = ()
    chief_physician: str | None = None
    #: The 主检医师's 身份证号 when resultsInterpreter names them by it (a physician listed in the registry).
    chief_physician_id_card: str | None = None
    #: The 主检医师 as the report names them when by name alone (no staff number, no 身份证号: not matchable).
    chief_physician_name: str | None = None
    report_date: str | None = None  # a technical-service report's 报告日期 (extension report-date)
    qualification_number: str | None = None  # the technical-service qualification the report names
    interpreter_uscc: str | None = None  # the reading institution (resultsInterpreter), 基层检查、上级诊断
    signer_uscc: str | None = None  # the member named by Bundle.signature.who
    #: The Observation carries a result: a value[x], or a component with one. False for an Observation sent with
    #: dataAbsentReason and no value (an empty HL7 v2 OBX-5): there is nothing to recognise.
    has_value: bool = True
    #: Why the value is absent, as sent (dataAbsentReason's code, else its text), when ``has_value`` is False.
    value_absent_reason: str | None = None
    #: The report names its 审核医师 (resultsInterpreter: a physician by identifier, name, Practitioner or
    #: PractitionerRole with a practitioner); False when it names none, or only an institution.
    reviewer_named: bool = False
    #: A technical-service report's service period end (effectivePeriod.end), when given.
    service_end: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def item_label(self) -> str:
        """A short name of the item for tables: text, else the first code."""
        if self.text:
            return self.text
        if self.codings:
            first = self.codings[0]
            return first.display or first.code
        return "?"


def _text(value: Any) -> str:
    """``value``, which FHIR has as text; anything else is refused by :func:`facts_from_bundle` (naming the entry).

    :raises TypeError: not text.
    """
    if not isinstance(value, str):
        raise TypeError(f"text expected, not {type(value).__name__}")
    return value


def _codings(concept: Any) -> tuple[Coding, ...]:
    if not isinstance(concept, OBJECT):
        return ()
    out = []
    for c in concept.get("coding") or []:
        if isinstance(c, OBJECT) and c.get("system") and c.get("code"):
            out.append(Coding(_text(c["system"]), _text(c["code"]), c.get("display")))
    return tuple(out)


def _ext(resource: Mapping[str, Any], url: str) -> list[Mapping[str, Any]]:
    return [e for e in resource.get("extension") or [] if isinstance(e, OBJECT) and e.get("url") == url]


def _ident_key(identifier: Any) -> str | None:
    if not isinstance(identifier, OBJECT) or not identifier.get("value"):
        return None
    return f"{_text(identifier.get('system', ''))}|{_text(identifier['value'])}"


class _Index:
    """Resolves references inside one Bundle (``urn:uuid:`` full URLs or ``Type/id``)."""

    def __init__(self, bundle: Mapping[str, Any]) -> None:
        self.by_ref: dict[str, tuple[int, Mapping[str, Any]]] = {}
        self.entries: list[tuple[int, str, Mapping[str, Any]]] = []
        for i, entry in enumerate(bundle.get("entry") or []):
            if not isinstance(entry, OBJECT) or not isinstance(entry.get("resource"), OBJECT):
                raise ParseError("every Bundle entry needs a resource", f"Bundle.entry[{i}]")
            resource = entry["resource"]
            full_url = _text(entry.get("fullUrl") or f"{resource.get('resourceType')}/{resource.get('id')}")
            self.entries.append((i, full_url, resource))
            self.by_ref[full_url] = (i, resource)
            if resource.get("id"):
                self.by_ref[f"{resource.get('resourceType')}/{resource['id']}"] = (i, resource)

    def resolve(self, reference: Any) -> tuple[int, Mapping[str, Any]] | None:
        if isinstance(reference, OBJECT):
            reference = reference.get("reference")
        if not isinstance(reference, str):
            return None
        return self.by_ref.get(reference)

    def of_type(self, resource_type: str) -> list[tuple[int, str, Mapping[str, Any]]]:
        return [e for e in self.entries if e[2].get("resourceType") == resource_type]


def _issuer(index: _Index, *holders: Mapping[str, Any]) -> str | None:
    """The USCC of the first performer Organization named by the holders, checked by GB 32100.

    :raises IdentifierError: the Organization's USCC fails its check.
    """
    for holder in holders:
        for performer in holder.get("performer") or []:
            found = index.resolve(performer)
            if found is None or found[1].get("resourceType") != "Organization":
                continue
            i, org = found
            for k, ident in enumerate(org.get("identifier") or []):
                if isinstance(ident, OBJECT) and ident.get("system") == SYSTEM_USCC and ident.get("value"):
                    try:
                        return check_uscc(_text(ident["value"]))
                    except IdentifierError as exc:
                        raise IdentifierError(
                            exc.message, f"Bundle.entry[{i}].resource.identifier[{k}].value"
                        ) from None
    return None


def _org_uscc(index: _Index, reference: Any, location: str) -> str | None:
    """The USCC (checked) of an Organization named by a reference: in the Bundle, or logical by identifier.

    :raises IdentifierError: the USCC fails its check.
    """
    found = index.resolve(reference)
    if found is not None:
        if found[1].get("resourceType") != "Organization":
            return None
        idents = found[1].get("identifier") or []
        location = f"Bundle.entry[{found[0]}].resource.identifier"
    elif isinstance(reference, OBJECT) and reference.get("type", "Organization") == "Organization":
        idents = [reference.get("identifier")]
        location = f"{location}.identifier"
    else:
        return None
    for k, ident in enumerate(idents if isinstance(idents, list) else []):
        if isinstance(ident, OBJECT) and ident.get("system") == SYSTEM_USCC and ident.get("value"):
            try:
                return check_uscc(_text(ident["value"]))
            except IdentifierError as exc:
                where = f"{location}[{k}].value" if found is not None else f"{location}.value"
                raise IdentifierError(exc.message, where) from None
    return None


def _reader(index: _Index, report: Mapping[str, Any], location: str) -> str | None:
    """The reading institution of a report: a ``resultsInterpreter`` Organization, or the ``organization`` of a
    ``resultsInterpreter`` PractitionerRole (基层检查、上级诊断: the report's performer did the exam).

    :raises IdentifierError: its USCC fails its check.
    """
    for k, ref in enumerate(report.get("resultsInterpreter") or []):
        where = f"{location}.resultsInterpreter[{k}]"
        found = index.resolve(ref)
        if found is not None and found[1].get("resourceType") == "PractitionerRole":
            uscc = _org_uscc(index, found[1].get("organization"), f"Bundle.entry[{found[0]}].resource.organization")
        elif found is not None or (isinstance(ref, OBJECT) and ref.get("type") == "Organization"):
            uscc = _org_uscc(index, ref, where)
        else:
            uscc = None
        if uscc:
            return uscc
    return None


def _signer(bundle: Mapping[str, Any], index: _Index) -> str | None:
    """The member named by ``Bundle.signature.who`` (its USCC), as sent: the signature itself is checked on receipt.

    :raises IdentifierError: the USCC fails its check.
    """
    signature = bundle.get("signature")
    if not isinstance(signature, OBJECT):
        return None
    return _org_uscc(index, signature.get("who"), "Bundle.signature.who")


def known_identifier(patient: Mapping[str, Any]) -> tuple[int, str, str] | None:
    """(position, system, value) of the identifier a Patient is known by across members: its 身份证号 as sent (the
    caller checks it), else its first identifier with a value; None when it has none.

    :raises TypeError: a system or value that is not text.
    """
    first: tuple[int, str, str] | None = None
    for k, ident in enumerate(patient.get("identifier") or []):
        if not isinstance(ident, OBJECT) or not ident.get("value"):
            continue
        if ident.get("system") == SYSTEM_ID_CARD:
            return k, SYSTEM_ID_CARD, _text(ident["value"])
        if first is None:
            first = (k, _text(ident.get("system", "")), _text(ident["value"]))
    return first


def _patient(index: _Index, resource: Mapping[str, Any]) -> tuple[str, str] | None:
    """The patient's 身份证号 (checked), else the first identifier with a value (:func:`known_identifier`).

    :raises IdentifierError: a 身份证号 fails its check.
    """
    found = index.resolve(resource.get("subject"))
    if found is None:
        return None
    i, patient = found
    known = known_identifier(patient)
    if known is None:
        return None
    k, system, value = known
    if system == SYSTEM_ID_CARD:
        try:
            return SYSTEM_ID_CARD, check_id_card(value)
        except IdentifierError as exc:
            raise IdentifierError(exc.message, f"Bundle.entry[{i}].resource.identifier[{k}].value") from None
    return system, value


def _report_class(report: Mapping[str, Any]) -> str | None:
    for concept in report.get("category") or []:
        for coding in _codings(concept):
            if coding.system == CS_REPORT_CATEGORY and coding.code == "occupational-health":
                return "occupational"
            if coding.system == CS_REPORT_CATEGORY and coding.code == "technical-service":
                return "technical-service"
            if coding.system == SYSTEM_V2_0074 and coding.code in _ECG_SECTIONS:
                return "ecg"
            if coding.system == SYSTEM_V2_0074:
                return "imaging" if coding.code in _IMAGING_SECTIONS else "lab"
    return None


def _hazard_factors(report: Mapping[str, Any]) -> tuple[HazardFactor, ...]:
    factors = []
    for ext in _ext(report, EXT_HAZARD_FACTOR):
        factor: Mapping[str, Any] = {}
        category: Mapping[str, Any] = {}
        for part in ext.get("extension") or []:
            if isinstance(part, OBJECT) and part.get("url") == "factor":
                factor = part.get("valueCoding") or {}
            elif isinstance(part, OBJECT) and part.get("url") == "category":
                category = part.get("valueCoding") or {}
        factors.append(
            HazardFactor(
                code=factor.get("code"),
                name=factor.get("display"),
                category=category.get("code"),
            )
        )
    return tuple(factors)


def observation_value(obs: Mapping[str, Any]) -> tuple[bool, str | None]:
    """Whether an Observation carries a result (a ``value[x]``, or a component with one), and when it does not,
    why (its ``dataAbsentReason``'s code, else text, else None)."""

    def valued(resource: Any) -> bool:
        return isinstance(resource, OBJECT) and any(
            k.startswith("value") and resource[k] not in (None, "", {}, []) for k in resource)

    components = obs.get("component")
    if valued(obs) or (isinstance(components, list) and any(valued(c) for c in components)):
        return True, None
    absent = obs.get("dataAbsentReason")
    why = None
    if isinstance(absent, OBJECT):
        codes = [c.get("code") for c in absent.get("coding") or [] if isinstance(c, OBJECT) and c.get("code")]
        why = str(codes[0]) if codes else (str(absent["text"]) if absent.get("text") else None)
    return False, why


def _reviewer_named(index: _Index, report: Mapping[str, Any]) -> bool:
    """Whether the report names its 审核医师 (C6): a ``resultsInterpreter`` that is a physician (a Practitioner, a
    PractitionerRole with a practitioner, or a logical reference with an identifier or name that is not an
    Organization). An interpreter that is an institution only names no physician."""
    for ref in report.get("resultsInterpreter") or []:
        if not isinstance(ref, OBJECT):
            continue
        found = index.resolve(ref)
        if found is not None:
            kind = found[1].get("resourceType")
            if kind == "Practitioner" or (kind == "PractitionerRole" and found[1].get("practitioner")):
                return True
            continue
        if ref.get("type") == "Organization" or str(ref.get("reference", "")).startswith("Organization/"):
            continue
        ident = ref.get("identifier")
        if (isinstance(ident, OBJECT) and ident.get("value")) or (
                isinstance(ref.get("display"), str) and ref["display"].strip()):
            return True
    return False


def _interpreter(report: Mapping[str, Any]) -> str | None:
    for ref in report.get("resultsInterpreter") or []:
        ident = ref.get("identifier") if isinstance(ref, OBJECT) else None
        if isinstance(ident, OBJECT) and ident.get("value") and ident.get("system", SYSTEM_STAFF) == SYSTEM_STAFF:
            return _text(ident["value"])
    return None


def _interpreter_name(report: Mapping[str, Any]) -> str | None:
    for ref in report.get("resultsInterpreter") or []:
        if isinstance(ref, OBJECT) and isinstance(ref.get("display"), str) and ref["display"].strip():
            return _text(ref["display"]).strip()
    return None


def _interpreter_id_card(report: Mapping[str, Any]) -> str | None:
    for ref in report.get("resultsInterpreter") or []:
        ident = ref.get("identifier") if isinstance(ref, OBJECT) else None
        if isinstance(ident, OBJECT) and ident.get("value") and ident.get("system") == SYSTEM_ID_CARD:
            return _text(ident["value"]).strip().upper()
    return None


def facts_from_bundle(bundle: Mapping[str, Any]) -> list[ResultFacts]:
    """One :class:`ResultFacts` per Observation (Bundle order), then one per report conclusion.

    A Bundle that no profile check has seen (``$recognize``, ``gateway recognize``) may hold any JSON anywhere: an
    element whose value is of another kind than FHIR's (an object where text belongs, a number where a list
    belongs) is refused, naming the entry being read.

    :raises ParseError: not a Bundle, or an entry without a resource.
    :raises IdentifierError: an issuer USCC or a patient 身份证号 fails its check.
    :raises InputError: an element of the wrong kind.
    """
    if not isinstance(bundle, OBJECT) or bundle.get("resourceType") != "Bundle":
        raise ParseError("expected a FHIR Bundle", "Bundle")
    reading = ["Bundle"]  # the entry being read, for the error
    try:
        return _facts(bundle, reading)
    except (TypeError, AttributeError, KeyError, IndexError) as exc:
        raise InputError("holds, or a resource read with it holds, an element of another kind than FHIR's (an "
                         f"object, a list, a number or text where another belongs; {type(exc).__name__}): check the "
                         "Bundle against the profiles with $validate", reading[0]) from None


def _facts(bundle: Mapping[str, Any], reading: list[str]) -> list[ResultFacts]:
    index = _Index(bundle)
    bundle_id = bundle.get("id")
    signer = _signer(bundle, index)
    ident = bundle.get("identifier")
    if isinstance(ident, OBJECT) and ident.get("value"):
        bundle_id = ident["value"]

    reports = index.of_type("DiagnosticReport")
    # Which report each Observation belongs to, and which reports a later one replaces.
    report_of: dict[int, tuple[int, str, Mapping[str, Any]]] = {}
    replaced_by: dict[str, str] = {}
    for i, url, report in reports:
        reading[0] = f"Bundle.entry[{i}]"
        for ref in report.get("result") or []:
            found = index.resolve(ref)
            if found is not None:
                report_of.setdefault(found[0], (i, url, report))
        for ext in _ext(report, EXT_REPLACES):
            key = _ident_key(ext.get("valueIdentifier"))
            if key:
                replaced_by[key] = url

    out: list[ResultFacts] = []
    for i, url, obs in index.of_type("Observation"):
        reading[0] = f"Bundle.entry[{i}]"
        rep = report_of.get(i)
        report = rep[2] if rep else {}
        report_key = _ident_key((report.get("identifier") or [None])[0]) if report else None
        specimen = index.resolve(obs.get("specimen"))
        if specimen is None and report.get("specimen"):
            specimen = index.resolve(report["specimen"][0])
        collection = (specimen[1].get("collection") or {}) if specimen else {}
        has_value, absent = observation_value(obs)
        out.append(
            ResultFacts(
                kind="observation",
                entry=url,
                location=f"Bundle.entry[{i}]",
                bundle_id=bundle_id,
                issuer_uscc=_issuer(index, obs, report),
                patient=_patient(index, obs) or (_patient(index, report) if report else None),
                codings=_codings(obs.get("code")),
                text=(obs.get("code") or {}).get("text"),
                observation_status=obs.get("status"),
                report_entry=rep[1] if rep else None,
                report_id=report_key,
                report_status=report.get("status") if report else None,
                report_class=_report_class(report) if report else None,
                # a correction keeping the number of the report it replaces names its own number: not itself
                superseded_by=(
                    replaced_by.get(report_key)
                    if report_key and rep and replaced_by.get(report_key) != rep[1]
                    else None
                ),
                collected=collection.get("collectedDateTime"),
                effective=obs.get("effectiveDateTime"),
                report_effective=report.get("effectiveDateTime") if report else None,
                marks=tuple(_text(e["valueString"]) for e in _ext(obs, EXT_RECOGNITION_MARK) if e.get("valueString")),
                exam_type=(
                    next((e.get("valueCoding", {}).get("code") for e in _ext(report, EXT_EXAM_TYPE)), None)
                    if report
                    else None
                ),
                hazard_factors=_hazard_factors(report) if report else (),
                chief_physician=_interpreter(report) if report else None,
                chief_physician_id_card=_interpreter_id_card(report) if report else None,
                chief_physician_name=_interpreter_name(report) if report else None,
                interpreter_uscc=_reader(index, report, f"Bundle.entry[{rep[0]}].resource") if rep else None,
                signer_uscc=signer,
                has_value=has_value,
                value_absent_reason=absent,
                reviewer_named=_reviewer_named(index, report) if report else False,
            )
        )

    reading[0] = "Bundle"
    out += _service_report_facts(index, reports, bundle_id)
    for i, url, report in reports:
        reading[0] = f"Bundle.entry[{i}]"
        if not (report.get("conclusion") or report.get("conclusionCode")):
            continue
        codings = tuple(c for concept in report.get("conclusionCode") or [] for c in _codings(concept))
        report_key = _ident_key((report.get("identifier") or [None])[0])
        out.append(
            ResultFacts(
                kind="conclusion",
                entry=url,
                location=f"Bundle.entry[{i}].resource.conclusion",
                bundle_id=bundle_id,
                issuer_uscc=_issuer(index, report),
                patient=_patient(index, report),
                codings=codings,
                text=report.get("conclusion"),
                report_entry=url,
                report_id=report_key,
                report_status=report.get("status"),
                report_class=_report_class(report),
                report_effective=report.get("effectiveDateTime"),
            )
        )
    if not out:
        raise InputError("the Bundle holds no Observation and no report conclusion to decide on", "Bundle.entry")
    for facts in out:
        _text_where_text_belongs(facts)
    return out


# Where the facts read as text come from, after the result's own location (the rest are made by this module).
_TEXT_FACTS = {
    "bundle_id": "Bundle.identifier.value (or Bundle.id)",
    "text": "code.text (or a report's conclusion)",
    "observation_status": "status",
    "report_status": "status of its DiagnosticReport",
    "collected": "collection.collectedDateTime of its Specimen",
    "effective": "effectiveDateTime",
    "report_effective": "effectiveDateTime of its DiagnosticReport",
    "service_end": "effectivePeriod.end of its DiagnosticReport",
    "exam_type": "the exam-type extension of its DiagnosticReport",
    "report_date": "the report-date extension of its DiagnosticReport",
    "qualification_number": "the service-qualification extension of its DiagnosticReport",
}


def _text_where_text_belongs(facts: ResultFacts) -> None:
    """Refuse a result whose facts read as text hold something else (a number, an object): a Bundle that no
    profile check has seen (``$recognize``) may hold anything there, and a decision quoting it could not be kept.

    :raises InputError: naming the element.
    """
    found: list[tuple[str, Any]] = [(_TEXT_FACTS[name], getattr(facts, name)) for name in _TEXT_FACTS]
    found += [("code.coding.display (conclusionCode's, for a conclusion)", c.display) for c in facts.codings]
    for factor in facts.hazard_factors:
        found += [("the hazard-factor extension's factor.code, of its DiagnosticReport", factor.code),
                  ("the hazard-factor extension's factor.display, of its DiagnosticReport", factor.name),
                  ("the hazard-factor extension's category.code, of its DiagnosticReport", factor.category)]
    for where, value in found:
        if value is not None and not isinstance(value, str):
            kind = ("an object" if isinstance(value, OBJECT) else "a list" if isinstance(value, list)
                    else "true or false" if isinstance(value, bool) else "a number")
            raise InputError(f"{where} must be text, not {kind}", facts.location)


def _service_report_facts(
    index: _Index, reports: list[tuple[int, str, Mapping[str, Any]]], bundle_id: Any
) -> list[ResultFacts]:
    """One ``document`` fact per technical-service report: the report itself is what is recognised."""
    out = []
    for i, url, report in reports:
        if _report_class(report) != "technical-service":
            continue
        qualification = next((e.get("valueIdentifier") for e in _ext(report, EXT_SERVICE_QUALIFICATION)), None)
        period = report.get("effectivePeriod")
        out.append(
            ResultFacts(
                kind="document",
                entry=url,
                location=f"Bundle.entry[{i}]",
                bundle_id=bundle_id,
                issuer_uscc=_issuer(index, report),
                codings=_codings(report.get("code")),
                text=(report.get("code") or {}).get("text"),
                observation_status=report.get("status"),  # the document is the result
                report_entry=url,
                report_id=_ident_key((report.get("identifier") or [None])[0]),
                report_status=report.get("status"),
                report_class="technical-service",
                report_effective=period.get("start") if isinstance(period, OBJECT) else None,
                service_end=period.get("end") if isinstance(period, OBJECT) else None,
                report_date=next((_text(e["valueDate"]) for e in _ext(report, EXT_REPORT_DATE) if e.get("valueDate")),
                                 None),
                qualification_number=(
                    _text(qualification["value"])
                    if isinstance(qualification, OBJECT) and qualification.get("value")
                    else None
                ),
            )
        )
    return out


def with_superseded(facts: Iterable[ResultFacts], superseded: Mapping[str, str]) -> list[ResultFacts]:
    """The facts, each result of a report that a stored correction supersedes marked so.

    ``superseded``: report id (``system|value``) -> the report that supersedes it, as
    :func:`gateway.store.reports.superseded_in` gives. A result already superseded within its own
    Bundle keeps that.
    """
    return [
        dataclasses.replace(f, superseded_by=superseded[f.report_id])
        if f.report_id is not None and f.report_id in superseded and not f.superseded_by
        else f
        for f in facts
    ]
