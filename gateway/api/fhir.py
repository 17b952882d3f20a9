"""FHIR API: CapabilityStatement, read and search of the results a gateway holds.

``GET /fhir/metadata``, ``GET /fhir/{type}/{id}``, ``GET /fhir/{type}?...``
for DiagnosticReport, Observation, Patient, Organization and Specimen.
Search supports the chained patient identifier (``patient.identifier``,
``subject:Patient.identifier``), ``code``, ``date`` with prefixes and more
(see ``gateway.fhir.search``), ``_count`` with next links. Unknown parameters
are refused with 400 unless the client sends ``Prefer: handling=lenient``.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from werkzeug.exceptions import NotAcceptable

from gateway import __version__, jsonutil
from gateway.api.app import pipeline_of
from gateway.auth import current_principal, principal_party, require_role
from gateway.api.errors import FHIR_JSON
from gateway.errors import InvalidSearch, NotFound, shown
from gateway.fhir.search import PARAM_ALIASES, SEARCH_PARAMS

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

_MAX_COUNT = 200
_MAX_VALUE = 256  # characters of one search value: answers (self links, issues) never echo more
_MAX_NAME = 60  # characters of a search parameter's name (with its modifier and chain); no parameter has more
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_WHOLE = re.compile(r"[+-]?[0-9]{1,12}")  # a whole number as a search parameter takes it
_AUDIT_PARAM_TYPES = {"date": "date", "agent": "reference", "entity": "reference", "patient": "reference"}
_CONTROL = {"_count", "_offset", "_format"}


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(jsonutil.dumps(body), status=status, mimetype="application/fhir+json", headers=headers)


def _check_format() -> None:
    fmt = request.args.get("_format", "")
    if fmt and "json" not in fmt:
        raise NotAcceptable(f"_format {shown(fmt)} is not supported; this server speaks application/fhir+json")


@bp.post("")
@bp.post("/")
@bp.post("/Bundle")
@require_role("submitter", "admin")
def submit() -> Response:
    """A report Bundle in FHIR (transaction or collection): checked against our profiles, then stored.

    Answers a transaction-response Bundle (201), or an OperationOutcome naming every problem (422/400).
    """
    from gateway.errors import InputError

    body = request.get_data(cache=False)
    if not body.strip():
        raise InputError("request body is empty: send a Bundle", "Bundle")
    outcome = pipeline_of(current_app).ingest(body, "fhir", channel="http", origin=request.remote_addr or "")[0]
    status = {"AA": 201, "AE": 422, "AR": 400}.get(outcome.ack_code, 422)
    if outcome.status.value == "duplicate":
        status = 200 if outcome.ack_code == "AA" else status
    return Response(outcome.answer, status=status, mimetype="application/fhir+json")


@bp.get("/metadata")
def metadata() -> Response:
    """The CapabilityStatement of this gateway."""
    from gateway.api.conformance import capability_resources, supported_profiles

    settings = current_app.extensions["gateway.settings"]
    profiles = supported_profiles(current_app)
    resources = []
    for rtype, params in sorted(SEARCH_PARAMS.items()):
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": name, "type": kind if kind != "reference" else "reference"}
                for name, kind in sorted(params.items()) if name != "_id"
            ],
        }
        if rtype in profiles:
            entry["supportedProfile"] = profiles[rtype]
        resources.append(entry)
    from gateway.audit.query import PARAMETERS as AUDIT_PARAMETERS

    resources.append({"type": "AuditEvent", "interaction": [{"code": "read"}, {"code": "search-type"}],
                      "searchParam": [{"name": n, "type": _AUDIT_PARAM_TYPES.get(n, "token")}
                                      for n in sorted(AUDIT_PARAMETERS) if not n.startswith("_") and ":" not in n]})
    served = {r["type"] for r in resources}
    for extra in capability_resources(current_app):
        if extra["type"] in served:  # profiled result types: add $validate to the entry above
            entry = next(r for r in resources if r["type"] == extra["type"])
            entry.setdefault("operation", []).extend(extra.get("operation", []))
        else:
            resources.append(extra)
    cap = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": settings.issuer_name,
        "kind": "instance",
        "software": {"name": "cyhr-gateway", "version": __version__},
        "implementation": {"description": f"川渝 result-recognition gateway of {settings.issuer_name}",
                           "url": request.url_root.rstrip("/") + "/fhir"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{"mode": "server", "resource": resources, "interaction": [{"code": "transaction"}]}],
    }
    return fhir_response(cap)


def _known_type(rtype: str) -> None:
    if rtype not in SEARCH_PARAMS:
        raise NotFound(f"resource type {shown(rtype)} is not served here (served: {', '.join(sorted(SEARCH_PARAMS))})",
                       rtype[:60])


def _audit_reads(resources: list[dict[str, Any]], query: str | None) -> None:
    """Every read of patient results is itself recorded (who, which patient, what, from where)."""
    from gateway.audit.events import patient_reads
    from gateway.store.db import transaction

    settings = current_app.extensions["gateway.settings"]
    pipe = pipeline_of(current_app)
    db = pipe.store.db
    with transaction(db):
        patient_reads(db, at=pipe.clock(), member=settings.issuer_uscc, server_address=request.host,
                      client=principal_party(current_principal(), settings.issuer_uscc),
                      client_address=request.remote_addr or "", on_behalf_of=settings.issuer_uscc,
                      resources=resources, query=query)


@bp.get("/<rtype>/<rid>")
@require_role("submitter", "admin")
def read(rtype: str, rid: str) -> Response:
    """One resource, current version, with ETag.

    :raises NotFound: unknown type or id.
    """
    _check_format()
    _known_type(rtype)
    if not _FHIR_ID.match(rid):
        raise NotFound(f"{rtype}/{shown(rid)} is not known (not a FHIR id)", rtype)
    res = pipeline_of(current_app).store.read(rtype, rid)
    _audit_reads([res], None)
    version = res.get("meta", {}).get("versionId", "1")
    return fhir_response(res, headers={"ETag": f'W/"{version}"',
                                       "Last-Modified": res.get("meta", {}).get("lastUpdated", "")})


def _int_param(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() would also take "١٢" (Arabic-Indic), "１２" (full width) and "1_2"
    value = int(raw) if _WHOLE.fullmatch(raw.strip()) else None
    if value is None:
        raise InvalidSearch(f"{name} must be a whole number, not {shown(raw)}", name)
    if not low <= value <= high:
        raise InvalidSearch(f"{name} must be between {low} and {high}", name)
    return value


@bp.get("/<rtype>")
@require_role("submitter", "admin")
def search(rtype: str) -> Response:
    """A searchset Bundle of matching resources.

    :raises NotFound: unknown type.
    :raises InputError: unknown parameter (strict handling) or bad value.
    """
    _check_format()
    _known_type(rtype)
    count = _int_param("_count", 20, 0, _MAX_COUNT)
    offset = _int_param("_offset", 0, 0, 10_000_000)
    params = [(k, v) for k, vs in request.args.lists() for v in vs if k not in _CONTROL]
    lenient = "handling=lenient" in request.headers.get("Prefer", "")
    for name, value in params:
        if len(name) > _MAX_NAME and not lenient:
            raise InvalidSearch(f"search parameter {shown(name)} is not supported for {rtype}", name[:_MAX_NAME],
                                code="not-supported")
        if len(value) > _MAX_VALUE:
            raise InvalidSearch(f"value has {len(value)} characters, at most {_MAX_VALUE} are taken",
                                name[:_MAX_NAME])
    params = [(k, v) for k, v in params if len(k) <= _MAX_NAME]  # (lenient: a name no parameter has is ignored)
    result = pipeline_of(current_app).store.search(rtype, params, count=count, offset=offset, strict=not lenient)
    _audit_reads(result.resources, request.query_string.decode("utf-8", "replace"))
    base = request.url_root.rstrip("/") + "/fhir"
    known = SEARCH_PARAMS[rtype]
    kept = [(k, v) for k, v in params if PARAM_ALIASES.get(k, k) in known]

    def link(off: int) -> str:
        return f"{base}/{rtype}?" + urlencode(kept + [("_count", str(count)), ("_offset", str(off))])

    links = [{"relation": "self", "url": link(offset)}]
    if offset + count < result.total:
        links.append({"relation": "next", "url": link(offset + count)})
    if offset > 0:
        links.append({"relation": "previous", "url": link(max(0, offset - count))})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": result.total,
        "link": links,
        "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                  for r in result.resources],
    }
    return fhir_response(bundle)


__all__ = ["bp", "fhir_response", "FHIR_JSON"]
