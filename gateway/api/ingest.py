"""Ingest: member systems submit results over HTTP.

``POST /ingest/hl7v2`` takes one or more ER7 messages (plain or MLLP-framed)
and answers with the HL7 ACK of each (``AA`` 200, ``AE`` 422, ``AR`` 400); a
client that sends ``Accept: application/fhir+json`` gets an OperationOutcome
with one issue per problem instead. ``POST /ingest/cda`` (one WS/T 500.7
document, ``application/xml``) and ``POST /ingest/cdc-csv`` (an occupational-
health exam export, ``text/csv``) are always answered with an OperationOutcome
(``application/fhir+json``), with the same status codes. Other formats
register the same way.
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from gateway.api.app import pipeline_of
from gateway.api.errors import outcome_response
from gateway.auth import require_role
from gateway.errors import InputError, Issue

bp = Blueprint("ingest", __name__)

_HTTP_FOR_ACK = {"AA": 200, "AE": 422, "AR": 400}
_RANK = {"AA": 0, "AE": 1, "AR": 2}


@bp.post("/ingest/<fmt>")
@require_role("submitter", "admin")
def ingest(fmt: str) -> Response:
    """Store and process the submitted messages; answer each.

    :raises InputError: empty body.
    :raises UnsupportedFormat: no such input format.
    """
    pipeline = pipeline_of(current_app)
    channel = pipeline.channel(fmt)
    data = request.get_data(cache=False)
    if not data.strip():
        raise InputError("request body is empty: send the message(s) as the body", "body")
    outcomes = pipeline.ingest(data, channel.format, channel="http", origin=request.remote_addr or "")
    if not outcomes:
        raise InputError("no message found in the request body", "body")
    worst = max((o.ack_code or "AA" for o in outcomes), key=lambda c: _RANK.get(c, 1))
    status = _HTTP_FOR_ACK.get(worst, 422)
    if channel.answer_type == "application/fhir+json" or "application/fhir+json" in request.headers.get("Accept", ""):
        issues: list[Issue] = []
        for o in outcomes:
            if o.bundle is not None or o.status.value in ("filtered", "duplicate"):
                detail = f"Bundle/{o.bundle['id']}" if o.bundle else o.status.value
                issues.append(Issue("information", "informational", "", f"{o.label}: {o.status.value} ({detail})"))
            issues += [Issue(i.severity, i.code, i.location, i.message, extra={"label": o.label}) for i in o.issues]
        return outcome_response(issues, status, headers={"X-Ack-Code": worst})
    body = b"".join(o.answer for o in outcomes)
    return Response(body, status=status, mimetype="x-application/hl7-v2+er7", headers={"X-Ack-Code": worst})
