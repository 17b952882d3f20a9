"""Exchange API: what other member gateways call.

``POST /exchange/bundles``
    a signed report Bundle pushed by an authenticated member; answered with a
    signed receipt (the same receipt when the Bundle arrives again).
``POST /exchange/tasks``
    a referral (移送, a signed Task) for this gateway's authority, or an authority's answer to one made here.
``GET /exchange/DiagnosticReport?patient.identifier=...``
    调阅: this member's own signed report Bundles for a patient (or several, separated by commas: at most
    20), as a searchset whose entries are the signed Bundles. A bare value is a 身份证号 (the national
    identifier's system only); ``system|value`` matches that system only, so a hospital's own patient numbers
    are asked for with their system and cannot be walked through by value
    (:meth:`~gateway.exchange.service.Exchange.signed_reports_for`).

Callers authenticate with a signed client assertion (``gateway.exchange.peer_auth``);
unknown or revoked members get 403, anything else wrong 401, always as an
OperationOutcome. A Bundle pushed by a member the registry authority certified but
no longer lists (revoked) is kept as refused, with an ``exchange`` audit entry
(``refused``, ``unknown-issuer``) naming that member, as every refused Bundle is. A
push with nothing to read (an empty body: 400) or sent as something else than FHIR
JSON (text, a form, XML: 415) holds no Bundle: it is answered, logged with the
calling member, and not kept.
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request

from gateway import jsonutil
from gateway.api.app import pipeline_of
from gateway.api.fhir import require_fhir_json
from gateway.errors import ConfigError, InputError, ParseError, UnknownIssuer
from gateway.exchange.service import Exchange

bp = Blueprint("exchange", __name__, url_prefix="/exchange")

__all__ = ["bp", "exchange_of"]


def exchange_of(app: object) -> Exchange:
    ex = app.extensions.get("gateway.exchange")  # type: ignore[attr-defined]
    if ex is None:
        raise ConfigError("this gateway takes no exchange: no registry snapshot is configured", "registry_snapshot")
    return ex  # type: ignore[no-any-return]


@bp.post("/bundles")
def receive() -> Response:
    """Verify, store and recognise a pushed signed Bundle; answer with a signed receipt."""
    ex = exchange_of(current_app)
    try:
        peer = ex.authenticate(request.headers.get("Authorization", ""))
    except UnknownIssuer as exc:
        if exc.member is not None:
            # a member the registry authority certified, no longer listed (revoked): what it pushed is kept as
            # refused, with its audit entry, as a Bundle it signed after its removal would be
            text = request.get_data(cache=False)
            if text.strip():
                pipeline_of(current_app).refuse_unlisted(text, exc.member, exc)
        raise
    g.peer = peer  # (the access log names the calling member)
    require_fhir_json("the signed Bundle")
    text = request.get_data(cache=False)
    if not text.strip():
        raise ParseError("is empty: send the signed Bundle as the body", "body", code="required")
    result = pipeline_of(current_app).receive_signed(text, peer)  # the exchange's channel of the pipeline
    return Response(result.receipt, status=result.status, mimetype="application/json",
                    headers={"X-Duplicate": "true" if result.duplicate else "false"})


@bp.post("/tasks")
def receive_task() -> Response:
    """A referral (移送, a signed Task) from a member to this gateway's authority, or the authority's answer to a
    referral made here; answered with a signed receipt."""
    from gateway.referrals import Referrals

    referrals = Referrals(exchange_of(current_app))
    peer = g.peer = referrals.authenticate(request.headers.get("Authorization", ""))
    require_fhir_json("the signed referral Bundle")
    text = request.get_data(cache=False)
    if not text.strip():
        raise ParseError("is empty: send the signed referral Bundle as the body", "body",
                         code="required")
    return Response(referrals.receive(text, peer), status=200, mimetype="application/json")


#: Patients one 调阅 may list (``patient.identifier=a,b``), as many as a FHIR search names in its audit entries.
_MOST_PATIENTS = 20


@bp.get("/DiagnosticReport")
def pull() -> Response:
    """调阅: this member's signed report Bundles for one patient, or for each of several (``a,b``)."""
    ex = exchange_of(current_app)
    peer = g.peer = ex.authenticate(request.headers.get("Authorization", ""))
    identifier = request.args.get("patient.identifier") or request.args.get("subject:Patient.identifier")
    if not identifier:
        raise InputError("patient.identifier is required for 调阅", "patient.identifier")
    # a comma lists several patients (either of them, as in a FHIR search): each is looked up, and audited, alone
    asked = list(dict.fromkeys(part.strip() for part in identifier.split(",")))
    if not all(asked):
        raise InputError("patient.identifier has an empty identifier in its list: give system|value or value, "
                         "several separated by commas", "patient.identifier")
    if len(asked) > _MOST_PATIENTS:
        raise InputError(f"patient.identifier lists {len(asked)} patients: at most {_MOST_PATIENTS} in one 调阅",
                         "patient.identifier")
    texts: list[bytes] = []
    for one in asked:
        found = ex.signed_reports_for(one)
        ex.record_lookup(peer, one, found, server=request.host, client_address=request.remote_addr or "",
                         query=request.query_string.decode("utf-8", "replace"))
        texts += [text for text in found if text not in texts]  # (a Bundle found by two of them is given once)
    body = {"resourceType": "Bundle", "type": "searchset", "total": len(texts),
            "entry": [{"resource": jsonutil.loads(t), "search": {"mode": "match"}} for t in texts]}
    return Response(jsonutil.dumps(body), mimetype="application/fhir+json")
