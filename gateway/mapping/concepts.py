"""Concept mapping: local codes, units and flags to standard ones.

The mapping stage of the pipeline. It reads the neutral records an adapter
produced and fills their ``std`` side from the concept tables named in the
structure file (``concept_tables:``): LOINC and catalogue codings beside the
issuer's own code (never instead of it), UCUM units, FHIR statuses,
interpretation codes, gender and specimen types. Nothing is dropped: a code
with no mapping is kept as sent and reported as a warning.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.adapters.base import Coded, ReportFacts, ResultFacts, SourceMessage, reversed_range
from gateway.datetimes import DateTimeError, parse_fhir_datetime
from gateway.errors import Issue, UnmappedCode, shown
from gateway.mapping.tables import ConceptTable, MappingSet, loinc_check_digit
from gateway.naming import SYSTEM_LOINC, SYSTEM_UCUM, local_item_system

__all__ = ["Terminology", "map_message"]

_MICRO = str.maketrans({"μ": "u", "µ": "u"})
_FINAL = {"final", "corrected", "amended"}
#: Coding system names (HL7 table 0396) a sender uses for LOINC in a code's triplet, when the structure file
#: names no ``coding_systems``.
_LOINC_NAMES = {"LN", "LOINC"}
_LOINC = re.compile(r"^(\d{1,7})-(\d)$")
_LEADING_ZEROS = re.compile(r"^0+(?=\d+-\d$)")
#: HL7 v2 coding system names of a sender's own codes (CWE-3): "L", "LOCAL", the 99zzz of HL7 table 0396, none.
_LOCAL_NAMES = re.compile(r"^(?:L|LOCAL|99[A-Z0-9]*|)$", re.IGNORECASE)


@dataclass
class Terminology:
    """The concept tables one source format uses, looked up by role."""

    items: ConceptTable
    units: ConceptTable
    flags: ConceptTable
    result_status: ConceptTable
    report_status: ConceptTable
    sex: ConceptTable
    specimen_types: ConceptTable
    #: standard code systems by the names senders give them in a CE/CWE triplet (structure ``coding_systems``)
    coding_systems: dict[str, str] = field(default_factory=lambda: {n: SYSTEM_LOINC for n in _LOINC_NAMES})

    @classmethod
    def for_structure(cls, mappings: MappingSet, structure: dict[str, Any]) -> "Terminology":
        """The tables a structure file names under ``concept_tables``.

        :raises ConfigError: a named table does not exist.
        """
        names = structure.get("concept_tables", {})
        tables: dict[str, Any] = {role: mappings.concept(names.get(role, default))
                                  for role, default in _DEFAULTS.items()}
        terms = cls(**tables)
        if structure.get("coding_systems"):
            terms.coding_systems = {str(k).upper(): str(v) for k, v in structure["coding_systems"].items()}
        return terms

    def standard_system(self, name: str) -> str:
        """The FHIR system of a standard code system a sender names in a triplet (``LN``, ``SCT``); empty if
        the name is not one."""
        return self.coding_systems.get(name.strip().upper(), "")

    def item_codings(self, issuer_uscc: str, code: Coded) -> tuple[list[dict[str, str]], str]:
        """Codings for a local item code (local first) and "mapped" / "unmapped" / "deliberately-unmapped"."""
        system = local_item_system(issuer_uscc)
        local = {"system": system, "code": code.code}
        if code.display:
            local["display"] = code.display
        try:
            targets = self.items.lookup(system, code.code)
        except UnmappedCode:
            return [local], "deliberately-unmapped"
        return [local] + [t.coding() for t in targets], ("mapped" if targets else "unmapped")

    def ucum(self, unit: str) -> dict[str, str] | None:
        """``{"system", "code"}`` for a unit as sent, trying μ/µ as u too; None if unknown."""
        target = self.units.first("*", unit) or self.units.first("*", unit.translate(_MICRO))
        if target is None:
            return None
        return {"system": SYSTEM_UCUM, "code": target.code}


_DEFAULTS = {
    "items": "lab-items",
    "units": "units",
    "flags": "interpretation",
    "result_status": "result-status",
    "report_status": "report-status",
    "sex": "administrative-gender",
    "specimen_types": "specimen-types",
}


def map_message(msg: SourceMessage, terms: Terminology, issuer_uscc: str) -> None:
    """Fill the standard side of every record in ``msg``; append issues to ``msg.issues``."""
    if msg.patient is not None:
        sex = msg.patient.sex
        if sex:
            target = terms.sex.first("*", sex)
            if target is None:
                msg.issues.append(Issue("warning", "code-invalid", f"{msg.patient.location}-8",
                                        f"sex {shown(sex)} is not a known code; gender left out", "103"))
                msg.patient.sex = ""
            else:
                msg.patient.sex = target.code
    for report in msg.reports:
        for result in report.results:
            _map_result(msg, result, terms, issuer_uscc)
        _map_report(msg, report, terms, issuer_uscc)


def _map_result(msg: SourceMessage, res: ResultFacts, terms: Terminology, issuer: str) -> None:
    std: dict[str, Any] = {}
    codings, state = _result_codings(msg, res, terms, issuer)
    std["codings"] = codings
    if state == "unmapped":
        display = res.code.display if len(res.code.display) <= 60 else f"{res.code.display[:60]}…"
        label = f" ({display})" if display else ""
        msg.issues.append(Issue("warning", "code-unknown", f"{res.location}-3",
                                f"local item code {shown(res.code.code)}{label} has no mapping in table "
                                f"{terms.items.id}; kept as the issuer's own code", "103"))
    if res.reference_range and reversed_range(res.reference_range):
        msg.issues.append(Issue("warning", "value", f"{res.location}-7",
                                f"reference range {shown(res.reference_range)} names its low above its high: kept "
                                "as text only", "102"))
    if res.unit:
        std["ucum"] = terms.ucum(res.unit)
        if std["ucum"] is None and res.value_kind in ("quantity", "range", "ratio"):
            msg.issues.append(Issue("warning", "code-unknown", f"{res.location}-6",
                                    f"unit {shown(res.unit)} is not in table {terms.units.id}; kept as text", "103"))
    if res.value_kind == "coded" and msg.format == "hl7v2":
        std["value_codings"] = _value_codings(msg, res, terms, issuer)
    interpretations: list[dict[str, Any]] = []
    for flag in res.flags:
        target = terms.flags.first("*", flag)
        if target is None:
            interpretations.append({"text": flag})
            msg.issues.append(Issue("warning", "code-unknown", f"{res.location}-8",
                                    f"abnormal flag {shown(flag)} is not in table {terms.flags.id}; kept as text",
                                    "103"))
        else:
            interpretations.append({"coding": [target.coding()], "text": flag})
    if len(interpretations) > 1:
        _contradicting_flags(msg, res, interpretations)
    std["interpretation"] = interpretations
    if res.status:
        target = terms.result_status.first("*", res.status)
        if target is None:
            msg.issues.append(Issue("error", "code-invalid", f"{res.location}-11",
                                    f"result status {shown(res.status)} is not in HL7 table 0085", "103"))
        else:
            std["status"] = target.code
    if not res.value_kind:
        if std.get("status") == "cancelled":
            std["absent"] = "not-performed"
        else:
            std["absent"] = res.absent or "unknown"
            said = " (as the sender said why)" if res.absent else ""
            msg.issues.append(Issue("warning", "required", f"{res.location}-5",
                                    f"result has no value; recorded with dataAbsentReason {std['absent']!r}{said}",
                                    "101"))
    res.std = std


def loinc_problem(code: str) -> str:
    """Why ``code`` is not a LOINC code (form NNNNN-N, mod-10 check digit), e.g. "has a wrong check digit
    (expected 4548-4)"; empty when it is one."""
    m = _LOINC.match(code)
    if not m:
        return "is not of the LOINC form NNNNN-N"
    if loinc_check_digit(m.group(1)) != m.group(2):
        return f"has a wrong check digit (expected {m.group(1)}-{loinc_check_digit(m.group(1))})"
    return ""


def _result_codings(msg: SourceMessage, res: ResultFacts, terms: Terminology,
                    issuer: str) -> tuple[list[dict[str, str]], str]:
    """Codings of a result (OBX-3 and its alternate triplet): see :func:`_sent_codings`."""
    alternate: Coded | None = msg.extra.get("alternate_codes", {}).get(res.location)
    return _sent_codings(msg, f"{res.location}-3", res.code, alternate, terms, issuer)


def _sent_codings(msg: SourceMessage, where: str, code: Coded, alternate: Coded | None, terms: Terminology,
                  issuer: str) -> tuple[list[dict[str, str]], str]:
    """Codings of an item code as sent: the sender's own code first, then LOINC (sent by the sender or from
    the table), then any other standard code sent beside it (SNOMED CT).

    A sender may send LOINC itself: as the code (system ``LN``), the sender's own code then
    in the alternate triplet (``alternate``, or the LOINC number stands for it), or beside
    its own code as the alternate. A LOINC written with leading zeros (``0718-7``) is read
    without them; one with a wrong check digit is only the sender's own code; of two
    different LOINC the first is kept; one that disagrees with the table is reported and
    the table's kept.
    """
    triplets = [code] + ([alternate] if alternate is not None else [])
    local = code
    if terms.standard_system(code.system) and alternate is not None and not terms.standard_system(alternate.system):
        local = alternate
    loincs: list[Coded] = []
    for sent_code in (c for c in triplets if terms.standard_system(c.system) == SYSTEM_LOINC):
        number = _LEADING_ZEROS.sub("", sent_code.code)
        if number != sent_code.code:
            msg.issues.append(Issue("warning", "code-invalid", where,
                                    f"sends LOINC {shown(sent_code.code)}: LOINC codes have no leading zeros; "
                                    f"taken as {shown(number)}", "103"))
        if problem := loinc_problem(number):
            msg.issues.append(Issue("warning", "code-invalid", where, f"sends LOINC {shown(sent_code.code)}, which "
                                    f"{problem}; kept as the issuer's own code only", "103"))
        elif number not in [c.code for c in loincs]:
            loincs.append(Coded(number, sent_code.display, sent_code.system))
    if len(loincs) > 1:
        msg.issues.append(Issue("warning", "code-invalid", where,
                                f"sends two LOINC codes, {shown(loincs[0].code)} and {shown(loincs[1].code)} (the "
                                f"alternate); {shown(loincs[0].code)} is kept", "103"))
    sent = loincs[0] if loincs else None
    codings, state = terms.item_codings(issuer, local)
    others = [{"system": terms.standard_system(c.system), "code": c.code} for c in triplets
              if terms.standard_system(c.system) not in ("", SYSTEM_LOINC)]
    if sent is None:
        return codings + others, state
    table_loinc = next((c for c in codings[1:] if c["system"] == SYSTEM_LOINC), None)
    if table_loinc is None:
        codings.insert(1, {"system": SYSTEM_LOINC, "code": sent.code})
    elif table_loinc["code"] != sent.code:
        msg.issues.append(Issue("warning", "code-invalid", where,
                                f"sends LOINC {shown(sent.code)} but table {terms.items.id} maps the local code "
                                f"{shown(local.code)} to LOINC {shown(table_loinc['code'])}; the table's LOINC is "
                                "kept", "103"))
    return codings + others, "mapped"


def _value_codings(msg: SourceMessage, res: ResultFacts, terms: Terminology, issuer: str) -> list[dict[str, str]]:
    """Codings of a coded HL7 v2 value (CE/CWE OBX-5): each triplet sent, a standard one (SNOMED CT, LOINC)
    in its system, the sender's own (``L``, ``99zzz``, none) in the issuer's local system as OBX-3's."""
    value: Coded = res.value
    alternate: Coded | None = msg.extra.get("value_alternates", {}).get(res.location)
    out: list[dict[str, str]] = []
    for c in [value] + ([alternate] if alternate is not None else []):
        if not c.code:
            continue
        local = local_item_system(issuer) if _LOCAL_NAMES.match(c.system) else ""
        system = terms.standard_system(c.system) or local
        coding = {"system": system, "code": c.code} if system else {"code": c.code}
        if c.display:
            coding["display"] = c.display
        # one code once per system: an alternate triplet of the sender's own (``A^A型^L^A^A^99ABO``) repeating the
        # code under another local name is the same coding (it was listed twice, with two displays)
        if not any(o.get("system") == coding.get("system") and o["code"] == coding["code"] for o in out):
            out.append(coding)
    return out


def _map_report(msg: SourceMessage, report: ReportFacts, terms: Terminology, issuer: str) -> None:
    std: dict[str, Any] = {}
    if report.code:
        alternate: Coded | None = msg.extra.get("alternate_codes", {}).get(report.location)
        codings, _ = _sent_codings(msg, f"{report.location}-4", report.code, alternate, terms, issuer)
        std["codings"] = codings if report.code.code else []
    if report.status:
        target = terms.report_status.first("*", report.status)
        if target is None:
            msg.issues.append(Issue("error", "code-invalid", f"{report.location}-25",
                                    f"report status {shown(report.status)} is not in HL7 table 0123", "103"))
        else:
            std["status"] = target.code
    result_statuses = [r.std.get("status") for r in report.results]
    for res, status in zip(report.results, result_statuses):
        if status is None and not res.status:
            # OBX-11 empty: the report's own status stands for its results.
            if "status" in std:
                res.std["status"] = _obs_status_from_report(std["status"])
            else:
                msg.issues.append(Issue("error", "required", f"{res.location}-11",
                                        "result status (OBX-11) is empty and OBR-25 gives none either", "101"))
    if "status" not in std:
        known = [r.std.get("status") for r in report.results]
        if known and all(s in _FINAL for s in known):
            std["status"] = "corrected" if "corrected" in known else "final"
        elif any(s == "preliminary" for s in known):
            std["status"] = "preliminary"
        else:
            std["status"] = "unknown"
    _times_in_order(msg, report)
    if report.specimen is not None and report.specimen.type:
        t = report.specimen.type
        target = terms.specimen_types.first("*", t.code) or terms.specimen_types.first("*", t.display)
        std["specimen_type"] = target.coding() if target else None
    report.std = std


def _obs_status_from_report(status: str) -> str:
    return {"partial": "preliminary", "registered": "registered", "cancelled": "cancelled"}.get(status, status)


#: Interpretation codes of which a result cannot have two (the flags as sent are kept, and the sender told).
_ABNORMAL = frozenset({"H", "L", "A", "HH", "LL", "AA", "HU", "LU"})
_OPPOSED = ((frozenset({"N"}), _ABNORMAL), (frozenset({"H", "HH", "HU"}), frozenset({"L", "LL", "LU"})),
            (frozenset({"POS"}), frozenset({"NEG"})))


def _contradicting_flags(msg: SourceMessage, res: ResultFacts, interpretations: list[dict[str, Any]]) -> None:
    """A warning when a result's flags say opposite things (正常 and H, H and L, 阳性 and 阴性): both are kept as sent,
    and the reader of the result is left to decide, so the sender is told."""
    codes = [(str(i["coding"][0].get("code", "")), str(i.get("text", ""))) for i in interpretations if i.get("coding")]
    for one, other in _OPPOSED:
        first = next((text for code, text in codes if code in one), None)
        second = next((text for code, text in codes if code in other), None)
        if first is not None and second is not None:
            msg.issues.append(Issue("warning", "value", f"{res.location}-8",
                                    f"abnormal flags {shown(first)} and {shown(second)} contradict each other: both "
                                    "are kept as sent; check which one holds", "102"))
            return


#: How far after this gateway's clock a report's issue time may lie before it is said to be in the future (clocks of
#: senders and of this machine differ by minutes, not days).
_FUTURE_SLACK = _dt.timedelta(days=1)


def _moment(value: str) -> tuple[_dt.datetime, bool] | None:
    """(the time, whether it is a date only) of a FHIR date or dateTime; None when it cannot be read."""
    try:
        moment = parse_fhir_datetime(value)
    except DateTimeError:
        return None
    if moment.tzinfo is None:  # (a time without an offset is China time, as the adapters read one)
        moment = moment.replace(tzinfo=_dt.timezone(_dt.timedelta(hours=8)))
    return moment, "T" not in value


def _before(one: tuple[_dt.datetime, bool], other: tuple[_dt.datetime, bool]) -> bool:
    """Whether ``one`` is surely before ``other``: by the day when either is a date only (in China time)."""
    if one[1] or other[1]:
        cst = _dt.timezone(_dt.timedelta(hours=8))
        return one[0].astimezone(cst).date() < other[0].astimezone(cst).date()
    return one[0] < other[0]


def _times_in_order(msg: SourceMessage, report: ReportFacts) -> None:
    """Warnings for a report's times in an impossible order (both kept as sent: which is wrong cannot be told): a
    specimen collected (an exam held) after the report was issued, received before it was collected (CDA, CSV: the
    HL7 v2 adapter says these itself), a report issued or a specimen collected in the future by this gateway's clock
    (a sender's clock, or a typing error: 2099)."""
    specimen = report.specimen
    ordered = msg.format != "hl7v2"  # (the HL7 v2 adapter weighs its times against MSH-7 itself, field by field)
    collected_at = report.collected_at or (specimen.collected_at if specimen is not None else "")
    collected = _moment(collected_at) if collected_at else None
    issued = _moment(report.issued_at) if report.issued_at else None
    if issued is not None and report.issued_day_only:
        issued = (issued[0], True)  # (a day sent without a time, read as its first moment: compared by the day)
    received = _moment(specimen.received_at) if specimen is not None and specimen.received_at else None
    if ordered and collected is not None and issued is not None and _before(issued, collected):
        what = "the exam was held" if report.kind == "occupational-health" else "the specimen was collected"
        msg.issues.append(Issue("warning", "value", report.where.get("collected", f"{report.location}-7"),
                                f"{what} ({collected_at}) after the report was issued ({report.issued_at}): one of "
                                "the two times is wrong; both are kept as sent", "102"))
    if ordered and received is not None and collected is not None and specimen is not None and \
            _before(received, collected):
        msg.issues.append(Issue("warning", "value", report.where.get("received", f"{report.location}-14"),
                                f"the specimen was received ({specimen.received_at}) before it was collected "
                                f"({collected_at}): one of the two times is wrong; both are kept as sent", "102"))
    now = _dt.datetime.now(_dt.timezone.utc)
    if issued is not None and issued[0] > now + _FUTURE_SLACK:
        msg.issues.append(Issue("warning", "value", report.where.get("issued", f"{report.location}-22"),
                                f"the report was issued {report.issued_at}, in the future by this gateway's "
                                "clock: the sender's clock or the time is wrong; kept as sent", "102"))
    if collected is not None and collected[0] > now + _FUTURE_SLACK:
        # (no member recognises it before that time: rule validity-window fails a time after the decision's)
        what = "the exam was held" if report.kind == "occupational-health" else "the specimen was collected"
        msg.issues.append(Issue("warning", "value", report.where.get("collected", f"{report.location}-7"),
                                f"{what} {collected_at}, in the future by this gateway's clock: the sender's clock "
                                "or the time is wrong; kept as sent", "102"))
