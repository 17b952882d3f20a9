"""AuditEvent rendering: audit facts to FHIR R4 AuditEvent resources.

Pure and deterministic: the same entry always renders to the same resource, so
the log can store compact facts (hash-chained) and render them on read. A
renderer for a facts version (``facts["v"]``) is never changed once released;
a new layout gets a new version beside it.

Shapes follow IHE Basic Audit Log Patterns (BALP) where one applies and ATNA
(DICOM) event codes elsewhere (ANCHORS §2.4):

========== ======================================== ============================ ======
kind       type                                     subtype                      action
========== ======================================== ============================ ======
exchange   DCM 110106 Export / 110107 Import        audit-event-subtype bundle-* R / C
ingest     DCM 110107 Import                        message-ingested             C
decision   audit-event-type lab-recognition (§2.5)  recognition-outcome <code>   E
override   audit-event-type recognition-override    retest-reason <code>         E
withdrawal audit-event-type recognition-withdrawal  report-superseded            U
referral   audit-event-type violation-referral      referral-<action>            C / U
read       audit-event-type rest (BALP PatientRead  restful-interaction read /   R / E
           / PatientQuery)                          search-type
registry   audit-event-type registry-snapshot       registry-snapshot-applied    U
query      rest (BALP Query / PatientQuery / Read)  search-type / read /         E / R
                                                    operation
security   DCM 110113 Security Alert                DCM 110136 / 110137          C / U
login      DCM 110114 User Authentication           DCM 110122 / 110123          E
token      DCM 110114 User Authentication           DCM 110122 Login (a system)  E
operator   audit-event-type operator-action         audit-event-subtype <action> R / U
========== ======================================== ============================ ======

:func:`index_values` derives what the search index holds (type, subtype,
outcome, agent, entity, patient) from the rendered resource itself, so a search finds an
event exactly when the FHIR search parameter expressions would.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from gateway.recognition.overrides import CS_RETEST_REASON, RETEST_REASONS, retest_reason_code
from gateway.errors import ConfigError
from gateway.naming import cs_url, sd_url

__all__ = [
    "render",
    "index_values",
    "decision_index",
    "patient_key",
    "CS_EVENT_TYPE",
    "CS_EVENT_SUBTYPE",
    "CS_RECOGNITION_OUTCOME",
    "CS_RETEST_REASON",
    "CS_ENTITY_TYPE",
    "DCM",
    "BALP_PROFILE",
    "DECISION_PROFILE",
]

# Our own code systems and profile (new URIs, built with gateway.naming's helpers).
CS_EVENT_TYPE = cs_url("audit-event-type")
CS_EVENT_SUBTYPE = cs_url("audit-event-subtype")
CS_RECOGNITION_OUTCOME = cs_url("recognition-outcome")
CS_ENTITY_TYPE = cs_url("audit-entity-type")
CS_GATEWAY_ROLE = cs_url("gateway-role")  # submitter, peer, auditor, admin (gateway.auth.ROLES)
DECISION_PROFILE = sd_url("recognition-decision-audit")

# Standard code systems.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_HL7_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_REST = "http://hl7.org/fhir/restful-interaction"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
_SECURITY_ROLE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
_BALP_ENTITY = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_BALP_SD = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
BALP_PROFILE = {name: _BALP_SD + name for name in ("PatientRead", "PatientQuery", "Query", "Read")}

_SUBTYPE_DISPLAY = {
    "bundle-sent": "Signed report Bundle sent to a member",
    "bundle-received": "Signed report Bundle received from a member",
    "bundle-refused": "Report Bundle from a member refused",
    "message-ingested": "Message taken in from a member system",
    "registry-snapshot-applied": "Registry snapshot applied",
}
_OUTCOME_DISPLAY = {"recognized": "Recognized", "not-recognized": "Not recognized", "needs-review": "Needs review"}
_RULE_STATUS = {True: "pass", False: "fail", None: "not evaluable"}
_DECISION_OUTCOME = {"recognized": "0", "not-recognized": "8", "needs-review": "4"}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


def _reference(party: Mapping[str, Any], resource_type: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {}
    if party.get("reference"):
        ref["reference"] = party["reference"]
    if resource_type and not party.get("reference"):
        ref["type"] = resource_type
    if party.get("value"):
        ident = {"value": party["value"]}
        if party.get("system"):
            ident = {"system": party["system"], "value": party["value"]}
        ref["identifier"] = ident
    if party.get("display"):
        ref["display"] = party["display"]
    return ref


def _agent(
    type_cc: dict[str, Any],
    party: Mapping[str, Any],
    *,
    requestor: bool,
    address: str | None = None,
    roles: list[str] | None = None,
    purpose: str | None = None,
) -> dict[str, Any]:
    agent: dict[str, Any] = {"type": type_cc}
    if roles:
        agent["role"] = [{"coding": [_coding(CS_GATEWAY_ROLE, r)]} for r in roles]
    agent["who"] = _reference(party)
    if party.get("display"):
        agent["name"] = party["display"]
    agent["requestor"] = requestor
    if address:
        agent["network"] = {"address": address, "type": _network_type(address)}
    if purpose:
        agent["purposeOfUse"] = [_cc(_ACT_REASON, purpose)]
    return agent


def _network_type(address: str) -> str:
    """R4 network-type: 5 URI, 2 IP address, 1 machine name."""
    if "://" in address:
        return "5"
    if address.replace(".", "").isdigit() or ":" in address:
        return "2"
    return "1"


def _gateway_agent(facts: Mapping[str, Any]) -> dict[str, Any]:
    return _agent(_cc(DCM, "110150", "Application"), facts["gateway"], requestor=False)


def _source(facts: Mapping[str, Any]) -> dict[str, Any]:
    gw = facts["gateway"]
    source: dict[str, Any] = {"observer": _reference(gw)}
    if gw.get("value"):
        source = {"site": gw["value"], **source}
    source["type"] = [_coding(_SOURCE_TYPE, "4", "Application Server")]
    return source


def _patient_entity(patient: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "what": _reference(patient, "Patient"),
        "type": _coding(_ENTITY_TYPE, "1", "Person"),
        "role": _coding(_OBJECT_ROLE, "1", "Patient"),
    }


def _detail(kind: str, value: str | None) -> list[dict[str, str]]:
    return [{"type": kind, "valueString": str(value)}] if value not in (None, "") else []


def _transaction_entity(request_id: str | None) -> list[dict[str, Any]]:
    if not request_id:
        return []
    return [{"what": {"identifier": {"value": request_id}}, "type": _coding(_BALP_ENTITY, "XrequestId")}]


def _bundle_entity(facts: Mapping[str, Any]) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "what": {"type": "Bundle", "identifier": {"value": facts["bundle_hash"]}},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
    }
    details = _detail("bundle-id", facts.get("bundle_id")) + _detail("jws-kid", facts.get("kid"))
    if details:
        entity["detail"] = details
    return entity


# --------------------------------------------------------------------------- kinds


def _exchange(facts: Mapping[str, Any]) -> dict[str, Any]:
    direction = facts["direction"]
    peer = facts.get("peer") or {"display": "unidentified sender"}
    address = facts.get("peer_address")
    if direction == "sent":
        event_type, action = _coding(DCM, "110106", "Export"), "R"
        agents = [
            _agent(_cc(DCM, "110153", "Source Role ID"), facts["gateway"], requestor=True),
            _agent(_cc(DCM, "110152", "Destination Role ID"), peer, requestor=False, address=address),
        ]
    else:
        event_type, action = _coding(DCM, "110107", "Import"), "C"
        agents = [
            _agent(_cc(DCM, "110153", "Source Role ID"), peer, requestor=True, address=address),
            _agent(_cc(DCM, "110152", "Destination Role ID"), facts["gateway"], requestor=False),
        ]
    subtype = f"bundle-{direction}"
    event: dict[str, Any] = {
        "type": event_type,
        "subtype": [_coding(CS_EVENT_SUBTYPE, subtype, _SUBTYPE_DISPLAY[subtype])],
        "action": action,
        "outcome": facts["outcome"],
    }
    desc = "; ".join(x for x in (facts.get("reason"), facts.get("detail")) if x)
    if desc:
        event["outcomeDesc"] = desc
    entities = [_bundle_entity(facts)]
    if facts.get("patient"):
        entities.append(_patient_entity(facts["patient"]))
    entities += _transaction_entity(facts.get("request_id"))
    return {**event, "agent": agents, "entity": entities}


def _ingest(facts: Mapping[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": _coding(DCM, "110107", "Import"),
        "subtype": [_coding(CS_EVENT_SUBTYPE, "message-ingested", _SUBTYPE_DISPLAY["message-ingested"])],
        "action": "C",
        "outcome": facts["outcome"],
    }
    desc = "; ".join(x for x in (facts.get("status"), facts.get("reason")) if x)
    if desc:
        event["outcomeDesc"] = desc
    identifier = {"value": facts["message_id"]}
    if facts.get("message_system"):
        identifier = {"system": facts["message_system"], "value": facts["message_id"]}
    message = {
        "what": {"identifier": identifier},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "3", "Report"),
        "detail": _detail("format", facts["format"]) + _detail("channel", facts.get("channel")),
    }
    agents = [
        _agent(
            _cc(DCM, "110153", "Source Role ID"), facts["source"], requestor=True, address=facts.get("source_address")
        ),
        _agent(_cc(DCM, "110152", "Destination Role ID"), facts["gateway"], requestor=False),
    ]
    return {**event, "agent": agents, "entity": [message]}


def _item_detail(item: Mapping[str, Any]) -> list[dict[str, str]]:
    value = f"{item.get('system', '')}|{item['code']}"
    return _detail("item", value) + _detail("item-display", item.get("display"))


def _report_entity(facts: Mapping[str, Any]) -> dict[str, Any]:
    report = facts["report"]
    return {
        "what": _reference(report, "DiagnosticReport"),
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
        "detail": _item_detail(facts["item"]) + _detail("catalogue", facts.get("catalogue")),
    }


def _decision(facts: Mapping[str, Any]) -> dict[str, Any]:
    outcome = facts["outcome"]
    rules = facts["rules"]
    failed = [r["id"] for r in rules if r.get("passed") is False]
    if outcome == "recognized":
        desc = f"recognized: all {len(rules)} rules passed"
    elif failed:
        desc = f"{outcome}: failed {', '.join(failed)}"
    else:
        desc = outcome
    agents = [
        _agent(_cc(_SECURITY_ROLE, "authserver", "authorization server"), facts["gateway"], requestor=False),
        _agent(_cc(_PARTICIPATION, "RCV", "receiver"), facts["receiver"], requestor=False),
        _agent(_cc(_PARTICIPATION, "PRF", "performer"), facts["issuer"], requestor=False),
    ]
    if facts.get("client"):
        agents.append(
            _agent(
                _cc(DCM, "110150", "Application"), facts["client"], requestor=False, address=facts.get("client_address")
            )
        )
    if facts.get("physician"):
        agents.append(_agent(_cc(_PARTICIPATION, "IRCP", "information recipient"), facts["physician"], requestor=True))
    else:
        agents[0]["requestor"] = True  # the gateway decided on its own (push on referral)
    # The decision itself, named by the engine's id when there is one; its details let an auditor replay it.
    decision: dict[str, Any] = (
        {"what": _decision_ref(facts["decision_id"])} if facts.get("decision_id") else {"name": "recognition decision"}
    )
    decision["type"] = _coding(_ENTITY_TYPE, "2", "System Object")
    decision["role"] = _coding(_OBJECT_ROLE, "13", "Security Resource")
    decision["detail"] = (
        _detail("decision-id", facts.get("decision_id"))
        + _detail("snapshot-version", facts["snapshot"])
        + _detail("snapshot-digest", facts.get("snapshot_digest"))
        + _detail("ruleset-version", facts.get("ruleset"))
        + _detail("as-of", facts.get("as_of"))
        + [
            {
                "type": f"rule:{r['id']}",
                "valueString": _RULE_STATUS[r.get("passed")] + (f": {r['detail']}" if r.get("detail") else ""),
            }
            for r in rules
        ]
    )
    entities = [_report_entity(facts)]
    if facts.get("patient"):
        entities.append(_patient_entity(facts["patient"]))
    if facts.get("bundle_hash"):
        entities.append(_bundle_entity(facts))
    for ref in facts.get("verification_results", []):
        entities.append(
            {
                "what": {"reference": ref},
                "type": _coding(_ENTITY_TYPE, "2", "System Object"),
                "role": _coding(_OBJECT_ROLE, "13", "Security Resource"),
            }
        )
    entities.append(decision)
    entities += _transaction_entity(facts.get("request_id"))
    return {
        "meta": {"profile": [DECISION_PROFILE]},
        "type": _coding(CS_EVENT_TYPE, "lab-recognition", "Lab result recognition decision"),
        "subtype": [_coding(CS_RECOGNITION_OUTCOME, outcome, _OUTCOME_DISPLAY[outcome])],
        "action": "E",
        "outcome": _DECISION_OUTCOME[outcome],
        "outcomeDesc": desc,
        "purposeOfEvent": [_cc(_ACT_REASON, facts.get("purpose", "TREAT"))],
        "agent": agents,
        "entity": entities,
    }


def _decision_ref(decision_id: str) -> dict[str, Any]:
    """The decision as an entity ``what``: its id (a UUID from the engine) as an identifier."""
    if re.match(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", decision_id):
        return {"identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{decision_id}"}}
    return {"identifier": {"value": decision_id}}


def _override(facts: Mapping[str, Any]) -> dict[str, Any]:
    reason = facts["reason"]
    info = RETEST_REASONS.get(reason)
    agents = [_agent(_cc(_PARTICIPATION, "IRCP", "information recipient"), facts["physician"], requestor=True)]
    if facts.get("receiver"):
        agents.append(_agent(_cc(_PARTICIPATION, "RCV", "receiver"), facts["receiver"], requestor=False))
    if facts.get("issuer"):
        agents.append(_agent(_cc(_PARTICIPATION, "PRF", "performer"), facts["issuer"], requestor=False))
    agents.append(_gateway_agent(facts))
    entities: list[dict[str, Any]] = []
    if facts.get("report"):
        report: dict[str, Any] = {
            "what": _reference(facts["report"], "DiagnosticReport"),
            "type": _coding(_ENTITY_TYPE, "2", "System Object"),
            "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
        }
        if facts.get("item"):
            report["detail"] = _item_detail(facts["item"])
        entities.append(report)
    if facts.get("patient"):
        entities.append(_patient_entity(facts["patient"]))
    entities.append(_decision_entity(facts["decision_id"]))
    desc = (info.zh if info else reason) + (f"; {facts['note']}" if facts.get("note") else "")
    return {
        "type": _coding(CS_EVENT_TYPE, "recognition-override", "Re-test ordered despite recognition"),
        # an entry written with a retired code renders with the code CodeSystem retest-reason has for it
        "subtype": [_coding(CS_RETEST_REASON, retest_reason_code(reason), info.en if info else None)],
        "action": "E",
        "outcome": "0",
        "outcomeDesc": desc,
        "purposeOfEvent": [_cc(_ACT_REASON, "TREAT")],
        "agent": agents,
        "entity": entities,
    }


def _decision_entity(decision_id: str, more: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recognition decision an override or a withdrawal is about, as an AuditEvent entity."""
    return {
        "what": _decision_ref(decision_id),
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "13", "Security Resource"),
        "detail": _detail("decision-id", decision_id) + (more or []),
    }


def _withdrawal(facts: Mapping[str, Any]) -> dict[str, Any]:
    """A decision withdrawn because its report was superseded by a correction (our event type)."""
    agents = [_gateway_agent(facts)]
    agents[0]["requestor"] = True  # the gateway withdraws on its own when the correction is stored
    if facts.get("receiver"):
        agents.append(_agent(_cc(_PARTICIPATION, "RCV", "receiver"), facts["receiver"], requestor=False))
    if facts.get("issuer"):
        agents.append(_agent(_cc(_PARTICIPATION, "PRF", "performer"), facts["issuer"], requestor=False))
    report: dict[str, Any] = {
        "what": _reference(facts["report"], "DiagnosticReport"),
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
        "detail": _detail("superseded-by", facts["superseded_by"]),
    }
    if facts.get("item"):
        report["detail"] += _item_detail(facts["item"])
    entities = [report]
    if facts.get("patient"):
        entities.append(_patient_entity(facts["patient"]))
    entities.append(_decision_entity(facts["decision_id"], _detail("decided-outcome", facts.get("decided_outcome"))))
    return {
        "type": _coding(CS_EVENT_TYPE, "recognition-withdrawal", "Recognition decision withdrawn"),
        "subtype": [_coding(CS_EVENT_SUBTYPE, "report-superseded", "Report superseded by a correction")],
        "action": "U",
        "outcome": "0",
        "outcomeDesc": facts["reason"],
        "purposeOfEvent": [_cc(_ACT_REASON, "TREAT")],
        "agent": agents,
        "entity": entities,
    }


_REFERRAL_ACTION = {"created": ("C", "Referral made"), "sent": ("C", "Referral delivered to the authority"),
                    "received": ("C", "Referral received"), "updated": ("U", "Referral status changed")}


def _referral(facts: Mapping[str, Any]) -> dict[str, Any]:
    """A referral of a violation (移送, FHIR Task) made, sent, received or answered (our event type)."""
    action, display = _REFERRAL_ACTION[facts["action"]]
    agents = [_gateway_agent(facts)]
    if facts.get("by"):
        agents.append(_agent(_cc(_PARTICIPATION, "AUT", "author (originator)"), facts["by"], requestor=True))
    else:
        agents[0]["requestor"] = True
    agents.append(_agent(_cc(_PARTICIPATION, "ORG", "origin"), facts["requester"], requestor=False))
    agents.append(_agent(_cc(_PARTICIPATION, "RCV", "receiver"), facts["owner"], requestor=False))
    task = {
        "what": {"identifier": {"system": cs_url("referral-id"), "value": facts["task_id"]}, "type": "Task"},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
        "detail": _detail("status", facts["status"]) + _detail("reason", facts["reason"])
        + _detail("decision-id", facts.get("decision_id")) + _detail("bundle-hash", facts.get("bundle_hash")),
    }
    report: dict[str, Any] = {
        "what": {"reference": facts["report"]},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "3", "Report"),
    }
    if facts.get("issuer"):
        report["detail"] = _detail("issuer", facts["issuer"].get("value"))
    out: dict[str, Any] = {
        "type": _coding(CS_EVENT_TYPE, "violation-referral", "Referral of a violation (移送)"),
        "subtype": [_coding(CS_EVENT_SUBTYPE, f"referral-{facts['action']}", display)],
        "action": action,
        "outcome": str(facts.get("outcome") or "0"),  # (a delivery that failed: 4 or 8)
        "agent": agents,
        "entity": [task, report],
    }
    if facts.get("note"):
        out["outcomeDesc"] = facts["note"]
    return out


def _rest_agents(facts: Mapping[str, Any], *, read: bool) -> list[dict[str, Any]]:
    """BALP client/server/user agents. For a read the data flows server to client, hence swapped role codes."""
    client_code, server_code = ("110152", "110153") if read else ("110153", "110152")
    names = {"110152": "Destination Role ID", "110153": "Source Role ID"}
    user = facts.get("user")
    agents = [
        _agent(
            _cc(DCM, client_code, names[client_code]),
            facts["client"],
            requestor=user is None,
            address=facts["client_address"],
        ),
        _agent(
            _cc(DCM, server_code, names[server_code]),
            facts["gateway"],
            requestor=False,
            address=facts["server_address"],
        ),
    ]
    if user:
        agents.append(
            _agent(
                _cc(_PARTICIPATION, "IRCP", "information recipient"),
                user,
                requestor=True,
                roles=facts.get("user_roles") or None,
                purpose=facts.get("purpose"),
            )
        )
    member = facts.get("member")
    if member and (member.get("system"), member.get("value")) != (
        facts["client"].get("system"),
        facts["client"].get("value"),
    ):
        agents.append(_agent(_cc(_ROLE_CLASS, "PROV", "healthcare provider"), member, requestor=False))
    return agents


def _query_entity(query: str) -> dict[str, Any]:
    return {
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "24", "Query"),
        "description": query,
        "query": base64.b64encode(query.encode("utf-8")).decode("ascii"),
    }


def _data_entity(reference: str) -> dict[str, Any]:
    return {
        "what": {"reference": reference},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "4", "Domain Resource"),
    }


def _read(facts: Mapping[str, Any]) -> dict[str, Any]:
    search = facts.get("query") is not None
    resources = facts.get("resources", [])
    entities: list[dict[str, Any]] = [_patient_entity(facts["patient"])]
    if search:
        entities.append(_query_entity(facts["query"]))
    entities += [_data_entity(r) for r in resources]
    entities += _transaction_entity(facts.get("request_id"))
    event: dict[str, Any] = {}
    success = facts["outcome"] == "0"
    # BALP profiles describe successful interactions only; a read of exactly one resource is a PatientRead.
    if success and (search or len(resources) == 1):
        event["meta"] = {"profile": [BALP_PROFILE["PatientQuery" if search else "PatientRead"]]}
    event.update(
        {
            "type": _coding(_HL7_EVENT_TYPE, "rest", "Restful Operation"),
            "subtype": [_coding(_REST, "search-type", "search type") if search else _coding(_REST, "read", "read")],
            "action": "E" if search else "R",
            "outcome": facts["outcome"],
            "agent": _rest_agents(facts, read=not search),
            "entity": entities,
        }
    )
    if facts.get("purpose"):
        event["purposeOfEvent"] = [_cc(_ACT_REASON, facts["purpose"])]
    return event


def _registry(facts: Mapping[str, Any]) -> dict[str, Any]:
    agents = [_gateway_agent(facts)]
    agents[0]["requestor"] = True
    if facts.get("authority"):
        agents.append(_agent(_cc(_PARTICIPATION, "AUT", "author (originator)"), facts["authority"], requestor=False))
    snapshot: dict[str, Any] = {
        "what": {"identifier": {"value": facts["version"]}},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "5", "Master file"),
    }
    details = _detail("previous-version", facts.get("previous_version")) + _detail(
        "snapshot-hash", facts.get("snapshot_hash")
    )
    if details:
        snapshot["detail"] = details
    return {
        "type": _coding(CS_EVENT_TYPE, "registry-snapshot", "Registry snapshot change"),
        "subtype": [
            _coding(CS_EVENT_SUBTYPE, "registry-snapshot-applied", _SUBTYPE_DISPLAY["registry-snapshot-applied"])
        ],
        "action": "U",
        "outcome": "0",
        "agent": agents,
        "entity": [snapshot],
    }


def _query(facts: Mapping[str, Any]) -> dict[str, Any]:
    interaction = facts["interaction"]
    read = interaction == "read"
    entities: list[dict[str, Any]] = []
    if facts.get("patient"):
        entities.append(_patient_entity(facts["patient"]))
    if read:
        entities.append(_data_entity(facts["resource"]))
        profile = "Read"
    else:
        entities.append(_query_entity(facts["query"]))
        profile = "PatientQuery" if facts.get("patient") else "Query"
    event: dict[str, Any] = {
        "meta": {"profile": [BALP_PROFILE[profile]]},
        "type": _coding(_HL7_EVENT_TYPE, "rest", "Restful Operation"),
        "subtype": [
            _coding(
                _REST,
                interaction,
                {"search-type": "search type", "read": "read", "operation": "operation"}[interaction],
            )
        ],
        "action": "R" if read else "E",
        "outcome": "0",
        "agent": _rest_agents(facts, read=read),
        "entity": entities,
    }
    if interaction == "operation":
        del event["meta"]  # statistics and exports are not RESTful searches, BALP has no profile for them
    if facts.get("results") is not None:
        event["outcomeDesc"] = f"{facts['results']} results"
    return event


def _security(facts: Mapping[str, Any]) -> dict[str, Any]:
    action = facts["action"]
    subtype = (
        _coding(DCM, "110137", "User Security Attributes Changed")
        if action in ("token-issued", "token-revoked", "password-set")
        else _coding(DCM, "110136", "Security Roles Changed")
    )
    user = {
        "what": _reference(facts["user"]),
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "role": _coding(_OBJECT_ROLE, "11", "Security User Entity"),
        "detail": _detail("action", action) + [{"type": "role", "valueString": r} for r in facts.get("roles", [])],
    }
    return {
        "type": _coding(DCM, "110113", "Security Alert"),
        "subtype": [subtype],
        "action": "C" if action == "added" else "U",
        "outcome": "0",
        "outcomeDesc": f"user {action}",
        "agent": [
            _agent(_cc(_PARTICIPATION, "AUT", "author (originator)"), facts["admin"], requestor=True),
            _gateway_agent(facts),
        ],
        "entity": [user],
    }


def _login(facts: Mapping[str, Any]) -> dict[str, Any]:
    """DICOM User Authentication (110114), subtype Login (110122) or Logout (110123), as BALP's ATNA base."""
    login = facts["action"] == "login"
    reason = facts.get("reason")
    outcome = facts.get("outcome", "0")
    return {
        "type": _coding(DCM, "110114", "User Authentication"),
        "subtype": [_coding(DCM, "110122", "Login") if login else _coding(DCM, "110123", "Logout")],
        "action": "E",
        "outcome": outcome,
        "outcomeDesc": f"{facts['action']} {'succeeded' if outcome == '0' else 'refused'}"
        + (f": {reason}" if reason else ""),
        "agent": [
            _agent(_cc(_SECURITY_ROLE, "humanuser", "human user"), facts["user"], requestor=True,
                   address=facts["client_address"], roles=list(facts.get("roles", []))),
            _gateway_agent(facts),
        ],
    }


def _token(facts: Mapping[str, Any]) -> dict[str, Any]:
    """A SMART Backend Services token request: DICOM User Authentication / Login by a system (the client)."""
    outcome = facts.get("outcome", "0")
    reason = facts.get("reason")
    scopes = list(facts.get("scopes", []))
    return {
        "type": _coding(DCM, "110114", "User Authentication"),
        "subtype": [_coding(DCM, "110122", "Login")],
        "action": "E",
        "outcome": outcome,
        "outcomeDesc": f"access token {'issued' if outcome == '0' else 'refused'}" + (f": {reason}" if reason else ""),
        "agent": [
            _agent(_cc(DCM, "110150", "Application"), facts["client"], requestor=True,
                   address=facts["client_address"], roles=list(facts.get("roles", []))),
            _gateway_agent(facts),
        ],
        "entity": [{
            "what": {"identifier": {"value": " ".join(scopes) or "(no scope)"}},
            "type": _coding(_ENTITY_TYPE, "2", "System Object"),
            "description": "scopes " + ("granted" if outcome == "0" else "requested"),
        }],
    }


_OPERATOR_DISPLAY = {
    "message-raw-viewed": "Raw bytes of a stored message viewed",
    "message-retried": "Failed message worked again",
    "outbox-retry": "Delivery put back to be sent",
    "outbox-replay": "Delivered payload sent again",
}


def _operator(facts: Mapping[str, Any]) -> dict[str, Any]:
    """An operator's action in the console (our event type ``operator-action``)."""
    action = facts["action"]
    target = {
        "what": {"identifier": {"value": facts["target"]}},
        "type": _coding(_ENTITY_TYPE, "2", "System Object"),
        "detail": _detail("detail", facts.get("detail")),
    }
    if not target["detail"]:
        del target["detail"]
    return {
        "type": _coding(CS_EVENT_TYPE, "operator-action", "Operator action in the console"),
        "subtype": [_coding(CS_EVENT_SUBTYPE, action, _OPERATOR_DISPLAY.get(action))],
        "action": "R" if action == "message-raw-viewed" else "U",
        "outcome": "0",
        "outcomeDesc": f"{action} {facts['target']}",
        "agent": [
            _agent(_cc(_SECURITY_ROLE, "humanuser", "human user"), facts["user"], requestor=True,
                   address=facts["client_address"]),
            _gateway_agent(facts),
        ],
        "entity": [target],
    }


_KINDS = {
    "exchange": _exchange,
    "ingest": _ingest,
    "decision": _decision,
    "override": _override,
    "withdrawal": _withdrawal,
    "referral": _referral,
    "read": _read,
    "registry": _registry,
    "query": _query,
    "security": _security,
    "login": _login,
    "operator": _operator,
    "token": _token,
}


def _body(kind: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    if facts.get("v") != 1:
        raise ConfigError(f"audit facts version {facts.get('v')!r} is unknown to this gateway", "AuditEvent")
    try:
        builder = _KINDS[kind]
    except KeyError:
        raise ConfigError(f"audit entry kind {kind!r} is unknown to this gateway", "AuditEvent") from None
    return builder(facts)


def render(
    kind: str,
    recorded: str,
    facts: Mapping[str, Any],
    *,
    seq: int | None = None,
    entry_hash: bytes | None = None,
    prev_hash: bytes | None = None,
) -> dict[str, Any]:
    """The R4 AuditEvent of one log entry.

    With ``seq`` the resource gets its id, and with the hashes a ``log-entry``
    entity saying where it sits in the hash chain (for auditors; not searchable).

    :raises ConfigError: an entry kind or facts version this gateway does not know.
    """
    body = _body(kind, facts)
    event: dict[str, Any] = {"resourceType": "AuditEvent"}
    if seq is not None:
        event["id"] = str(seq)
    if "meta" in body:
        event["meta"] = body.pop("meta")
    order = (
        "type",
        "subtype",
        "action",
        "recorded",
        "outcome",
        "outcomeDesc",
        "purposeOfEvent",
        "agent",
        "source",
        "entity",
    )
    body["recorded"] = recorded
    body["source"] = _source(facts)
    if seq is not None and entry_hash is not None:
        chain: dict[str, Any] = {
            "what": {"identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:sha256:" + entry_hash.hex()}},
            "type": _coding(CS_ENTITY_TYPE, "log-entry", "Audit log entry"),
            "detail": [{"type": "seq", "valueString": str(seq)}],
        }
        if prev_hash is not None:
            chain["detail"].append(
                {"type": "prev-hash", "valueBase64Binary": base64.b64encode(prev_hash).decode("ascii")}
            )
        body["entity"] = [*body.get("entity", []), chain]
    for key in order:
        if key in body:
            event[key] = body[key]
    return event


# --------------------------------------------------------------------------- search keys


_CONTROL = re.compile(r"[\x00-\x1f]")


def patient_key(value: str) -> str:
    """The searchable stand-in of a patient identifier value: SHA-256 hex, so indexes hold no 身份证号."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _is_patient(ref: Mapping[str, Any]) -> bool:
    return ref.get("type") == "Patient" or str(ref.get("reference", "")).startswith("Patient/")


def _ref_keys(param: str, ref: Mapping[str, Any], out: set[tuple[str, str, str]]) -> None:
    """Keys of one Reference: ``param`` (by reference) and ``param:identifier`` (token)."""
    ident = ref.get("identifier") or {}
    if _is_patient(ref):
        if ref.get("reference"):
            out.add(("patient", "", ref["reference"]))
            out.add((param, "", ref["reference"]))
        if ident.get("value"):
            # Patient identifiers are indexed hashed only, whichever parameter reaches them.
            out.add(("patient:identifier", ident.get("system", ""), patient_key(ident["value"])))
        return
    if ref.get("reference"):
        out.add((param, "", ref["reference"]))
    if ident.get("value"):
        out.add((f"{param}:identifier", ident.get("system", ""), ident["value"]))


def index_values(event: Mapping[str, Any]) -> dict[str, Any]:
    """What the search index holds for a rendered AuditEvent.

    Single-valued parameters as ``type``/``subtype`` (``[system, code]``) and
    ``outcome``; the many-valued reference parameters of the R4 AuditEvent
    search (``agent`` = agent.who, ``entity`` = entity.what, ``patient`` = who
    or what that is a Patient, and their ``:identifier`` forms) as sorted
    ``k`` rows ``[param, value, system]`` (the order of the index table's key).
    Values with control characters are left out: nobody types them into a
    search, and the index check compares JSON texts that escape them
    differently.

    :raises ConfigError: an event without exactly one subtype (the index holds one).
    """
    subtypes = event.get("subtype", [])
    if len(subtypes) != 1:
        raise ConfigError("an audit event must have exactly one subtype to be indexed", "AuditEvent.subtype")
    keys: set[tuple[str, str, str]] = set()
    for agent in event.get("agent", []):
        if agent.get("who"):
            _ref_keys("agent", agent["who"], keys)
    for entity in event.get("entity", []):
        if entity.get("what"):
            _ref_keys("entity", entity["what"], keys)
    return _index([event["type"].get("system", ""), event["type"]["code"]],
                  [subtypes[0].get("system", ""), subtypes[0]["code"]], event["outcome"], keys)


def _index(type_code: list[str], subtype: list[str], outcome: str, keys: set[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "type": type_code,
        "subtype": subtype,
        "outcome": outcome,
        "k": [[p, v, s] for p, v, s in sorted((p, v, s) for p, s, v in keys) if not _CONTROL.search(v + s)],
    }


def decision_index(facts: Mapping[str, Any]) -> dict[str, Any]:
    """``index_values(render("decision", recorded, facts))`` without the rest of the AuditEvent: the parties
    :func:`_decision` names as agents and the entities' ``what``, as it names them. For facts made by
    :func:`gateway.audit.records.decision`, which always render (a received Bundle's 20 results are 20
    decisions: their entries are made without rendering 20 AuditEvents); ``tests/test_audit_log.py`` holds the
    two equal."""
    keys: set[tuple[str, str, str]] = set()
    parties = [facts["gateway"], facts["receiver"], facts["issuer"]]
    if facts.get("client"):
        parties.append(facts["client"])
    if facts.get("physician"):
        parties.append(facts["physician"])
    for party in parties:
        who = _reference(party)
        if who:
            _ref_keys("agent", who, keys)
    whats = [_reference(facts["report"], "DiagnosticReport")]
    if facts.get("patient"):
        whats.append(_reference(facts["patient"], "Patient"))
    if facts.get("bundle_hash"):
        whats.append({"type": "Bundle", "identifier": {"value": facts["bundle_hash"]}})
    whats += [{"reference": ref} for ref in facts.get("verification_results", [])]
    if facts.get("decision_id"):
        whats.append(_decision_ref(facts["decision_id"]))
    if facts.get("request_id"):
        whats.append({"identifier": {"value": facts["request_id"]}})
    for what in whats:
        _ref_keys("entity", what, keys)
    outcome = facts["outcome"]
    return _index([CS_EVENT_TYPE, "lab-recognition"], [CS_RECOGNITION_OUTCOME, outcome], _DECISION_OUTCOME[outcome],
                  keys)
