"""Problems our profile finds on a converted report, answered in the sender's own terms.

The profile check locates a problem by FHIR path (``Bundle.entry[3].resource.effective[x]``), which an HL7 or
CDA sender cannot act on. Each problem is traced here to the source record the resource was built from (an OBX,
an OBR group, the patient, a CDA item) and, through a per-format table (``mappings/hl7v2/fhir-fields.yaml``,
``mappings/cda/fhir-xpaths.yaml``), to the places its element was read from. The adapter says what a place is
(an HL7 field, an XPath); the wording is the same for every format. The FHIR path is kept in
``extra["fhir_path"]`` for the record, never in an answer.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gateway.adapters.base import ReportFacts, SourceMessage
from gateway.errors import Issue

__all__ = ["ENTRY_PATH", "INDEX", "FHIR_PATH", "INVARIANT", "sources", "joined", "trace"]

ENTRY_PATH = re.compile(r"^Bundle\.entry\[(\d+)\]\.(?:resource|fullUrl)(?:\.(.*))?$")
INDEX = re.compile(r"\[[^\]]*\]")
#: What no answer to a sender carries: a FHIR path (in a problem's text it is cut out).
FHIR_PATH = re.compile(r"\s*\((?:Bundle|DiagnosticReport|Observation|Patient|Specimen|Organization)\.[^)]*\)"
                       r"|\bBundle\.entry\S*|\b[A-Za-z]+\.(?:resource|entry)\S*")
INVARIANT = re.compile(r"^fails ([a-z]+(?:-[a-z]+)?-\d+)")

#: (rule of the table, resource type, record, report) -> the sender's places for it
Places = Callable[[dict[str, Any], str, Any, "ReportFacts | None"], list[str]]


def sources(msg: SourceMessage) -> list[tuple[str, Any, ReportFacts | None]]:
    """(resource type, record, report) of each Bundle entry, in the order the report Bundle is built."""
    out: list[tuple[str, Any, ReportFacts | None]] = [("Organization", None, None)]
    if msg.patient is not None:
        out.append(("Patient", msg.patient, None))
    out += [("Specimen", r.specimen, r) for r in msg.reports if r.specimen is not None]
    out += [("Observation", res, r) for r in msg.reports for res in r.results]
    out += [("DiagnosticReport", r, r) for r in msg.reports]
    return out


def joined(places: list[str]) -> str:
    return places[0] if len(places) == 1 else ", ".join(places[:-1]) + f" and {places[-1]}"


def trace(msg: SourceMessage, bundle: dict[str, Any], issues: list[Issue], table: dict[str, Any],
          places_of: Places, *, untraced: str, default_where: str = "") -> list[Issue]:
    """``issues`` located at the sender's places.

    ``table``: ``elements`` (per resource type, element path prefixes with the places they come from and
    ``what`` they are) and ``invariants`` (profile rules of a whole resource). ``places_of`` turns a table rule
    into the sender's places for the record. A problem no place is mapped to is located at its record (else
    ``default_where``) and says it fails a profile rule ``untraced`` (e.g. "no HL7 field is mapped to").
    """
    found = sources(msg)
    entries = bundle.get("entry") or []
    elements: dict[str, list[dict[str, Any]]] = table.get("elements", {})
    invariants: dict[str, dict[str, Any]] = table.get("invariants", {})
    out: list[Issue] = []
    for issue in issues:
        text = FHIR_PATH.sub("", issue.message).strip()
        m = ENTRY_PATH.match(issue.location or "")
        kind, record, report, rule = "", None, None, None
        if m and int(m.group(1)) < min(len(found), len(entries)):
            kind, record, report = found[int(m.group(1))]
            if entries[int(m.group(1))].get("resource", {}).get("resourceType") != kind:
                kind, record, report = "", None, None
        if kind:
            path = INDEX.sub("", m.group(2) or "") if m else ""
            inv = INVARIANT.match(issue.message)
            if not path and inv:
                rule = invariants.get(inv.group(1))
            elif path:
                rule = next((r for r in elements.get(kind, []) if path.startswith(str(r["path"]))), None)
        places = places_of(rule, kind, record, report) if rule else []
        extra = {**issue.extra, "fhir_path": issue.location}
        if places:
            what = rule["what"] if rule else ""
            if issue.code == "required" and not INVARIANT.match(issue.message):
                message = f"{'is' if len(places) == 1 else 'are'} empty: {what} is required"
            else:
                message = f"{'does' if len(places) == 1 else 'do'} not give {what}: {text}"
            out.append(Issue(issue.severity, issue.code, joined(places), message, issue.hl7_error, extra))
            continue
        where = (getattr(record, "location", "") if record is not None else "") or default_where
        out.append(Issue(issue.severity, issue.code, where,
                         f"the converted report fails a profile rule {untraced}: {text}", issue.hl7_error, extra))
    return out
