"""Recognition over FHIR: the ``$recognize`` operation's Parameters in and out.

In (``Parameters``):

- ``bundle`` (resource, 1..1): a report Bundle as in ``docs/bundle-shapes.md``;
- ``receiver`` (valueString or valueIdentifier, 1..1): the receiving member's 统一社会信用代码;
- ``at`` (valueDateTime or valueInstant, 0..1): the decision time; the server's clock when absent.

Out (``Parameters``): ``snapshotVersion``, ``snapshotDigest``, ``receiver``, ``decidedAt``,
then one ``decision`` per result with parts ``decisionId``, ``outcome``, ``entry`` (the
result's ``fullUrl`` in the Bundle), ``issuer``, ``item`` (the catalogue item decided
against), ``alternative`` (other catalogue items considered) and one ``rule`` per rule
checked (parts ``id``, ``status``, ``message``, ``facts`` as JSON text, and for a failed rule
``reason``: its code in CodeSystem non-recognition-reason). A decision whose catalogue item is
judged by the reading institution (基层检查、上级诊断) names it in ``interpreter``.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import InputError
from gateway.naming import SYSTEM_USCC, cs_url
from gateway.recognition.engine import FAILED, Decision

__all__ = ["parse_recognize_parameters", "decision_parameters", "CS_NON_RECOGNITION_REASON", "NON_RECOGNITION_REASONS"]

CS_NON_RECOGNITION_REASON = cs_url("non-recognition-reason")

#: Rule id -> the code CodeSystem non-recognition-reason records when the rule fails (its property
#: ``rule`` says the same; tests/test_code_lists.py keeps the two and the engine's RULES equal).
NON_RECOGNITION_REASONS: dict[str, str] = {
    "member-active": "member-inactive",
    "catalogue-item": "not-in-catalogue",
    "catalogue-scope": "scope-excluded",
    "eqa-pass": "eqa-missing",
    "validity-window": "outside-window",
    "report-status": "report-not-final",
    "mark": "mark-missing",
    "direction": "direction-rule",
    "occupational-filing": "category-not-filed",
    "occupational-physician": "diagnosis-qualification-missing",
    "diagnostic-conclusion": "conclusion-not-recognisable",
    "technical-service-qualification": "service-qualification-missing",
    "reading-signature": "not-signed-by-reader",
    "between-institutions": "own-result",
    "result-value": "no-result-value",
}


def _param(name: str, **value: Any) -> dict[str, Any]:
    return {"name": name, **value}


def parse_recognize_parameters(parameters: Any) -> tuple[dict[str, Any], str, _dt.datetime | None]:
    """The Bundle, receiver USCC and decision time (None: use the clock) of a ``$recognize`` request.

    The receiver is returned as sent; the engine checks it (GB 32100).

    :raises InputError: not a Parameters resource, a parameter missing, repeated or of the wrong type,
        or a decision time without a UTC offset.
    """
    if not isinstance(parameters, Mapping) or parameters.get("resourceType") != "Parameters":
        raise InputError("the request body must be a FHIR Parameters resource", "Parameters")
    found: dict[str, Mapping[str, Any]] = {}
    for i, p in enumerate(parameters.get("parameter") or []):
        if not isinstance(p, Mapping) or not isinstance(p.get("name"), str):
            raise InputError("every parameter needs a name", f"Parameters.parameter[{i}]")
        if p["name"] in found:
            raise InputError(f"parameter {p['name']!r} is given twice", f"Parameters.parameter[{i}]")
        found[p["name"]] = p
    unknown = sorted(set(found) - {"bundle", "receiver", "at"})
    if unknown:
        raise InputError(f"unknown parameter(s): {', '.join(unknown)}", "Parameters.parameter", code="not-supported")

    bundle = (found.get("bundle") or {}).get("resource")
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InputError(
            "parameter 'bundle' must carry a Bundle resource", "Parameters.parameter:bundle", code="required"
        )

    receiver_param = found.get("receiver") or {}
    receiver = receiver_param.get("valueString")
    if receiver is None and isinstance(receiver_param.get("valueIdentifier"), Mapping):
        receiver = receiver_param["valueIdentifier"].get("value")
    if not isinstance(receiver, str) or not receiver:
        raise InputError(
            "parameter 'receiver' (valueString or valueIdentifier: the receiving member's 统一社会信用代码) is required",
            "Parameters.parameter:receiver",
            code="required",
        )

    at: _dt.datetime | None = None
    at_param = found.get("at")
    if at_param is not None:
        text = at_param.get("valueDateTime") or at_param.get("valueInstant")
        try:
            at = _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            raise InputError(f"parameter 'at' {text!r} is not a date-time", "Parameters.parameter:at") from None
        if "T" not in str(text) or at.tzinfo is None:
            raise InputError("parameter 'at' needs a time of day and a UTC offset", "Parameters.parameter:at")
    return bundle, receiver, at


def _decision_part(d: Decision) -> dict[str, Any]:
    f = d.facts
    parts: list[dict[str, Any]] = [
        _param("decisionId", valueId=d.decision_id),
        _param("outcome", valueCode=d.outcome),
        _param("entry", valueUri=f.entry),
    ]
    if f.issuer_uscc:
        parts.append(_param("issuer", valueIdentifier={"system": SYSTEM_USCC, "value": f.issuer_uscc}))
    if d.responsible == "interpreter" and f.interpreter_uscc:
        parts.append(_param("interpreter", valueIdentifier={"system": SYSTEM_USCC, "value": f.interpreter_uscc}))
    if d.item is not None:
        parts.append(
            _param("item", valueCoding={"system": d.item.system, "code": d.item.code, "display": d.item.display})
        )
    elif f.kind == "conclusion":
        parts.append(_param("item", valueString="diagnostic conclusion"))
    for alt in d.alternatives:
        parts.append(_param("alternative", valueString=f"{alt['catalogue']}:{alt['code']} {alt['outcome']}"))
    for r in d.rules:
        rule_parts = [
            _param("id", valueCode=r.rule),
            _param("status", valueCode=r.status),
            _param("message", valueString=r.message),
            _param("facts", valueString=json.dumps(r.facts, ensure_ascii=False, sort_keys=True)),
        ]
        if r.status == FAILED and r.rule in NON_RECOGNITION_REASONS:
            code = NON_RECOGNITION_REASONS[r.rule]
            rule_parts.append(_param("reason", valueCoding={"system": CS_NON_RECOGNITION_REASON, "code": code}))
        parts.append(_param("rule", part=rule_parts))
    return _param("decision", part=parts)


def decision_parameters(decisions: Sequence[Decision]) -> dict[str, Any]:
    """The ``$recognize`` answer for the decisions of one Bundle (all made at one time against one snapshot).

    :raises InputError: no decisions.
    """
    if not decisions:
        raise InputError("nothing was decided", "Bundle.entry")
    first = decisions[0]
    return {
        "resourceType": "Parameters",
        "parameter": [
            _param("snapshotVersion", valueInteger=first.snapshot_version),
            _param("snapshotDigest", valueString=first.snapshot_digest),
            _param("receiver", valueIdentifier={"system": SYSTEM_USCC, "value": first.receiver}),
            _param("decidedAt", valueDateTime=first.decided_at.isoformat()),
            *(_decision_part(d) for d in decisions),
        ],
    }
