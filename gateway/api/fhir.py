"""FHIR API: CapabilityStatement, read, vread, history and search of the results a gateway holds.

``GET /fhir/metadata``, ``GET /fhir/{type}/{id}``, ``GET /fhir/{type}/{id}/_history[/{vid}]``,
``GET /fhir/{type}/_history``, ``GET /fhir/{type}?...`` and ``POST /fhir/{type}/_search``
for DiagnosticReport, Observation, Patient, Organization and Specimen.
Search supports the chained patient identifier (``patient.identifier``,
``subject:Patient.identifier``), ``code``, ``date`` with prefixes and more
(see ``gateway.fhir.search``), ``_count`` with next links, ``_count=0`` and
``_summary=count`` for the total alone, ``_include``/``_revinclude`` of the
references our Bundles carry, ``_sort`` by date parameters, ``_lastUpdated``,
``Patient?name/family/given`` and ``_elements``. Unknown parameters are refused
with 400 unless the client sends ``Prefer: handling=lenient``.

Report Bundles are submitted as R4 gives it: ``POST /fhir`` is a transaction (200 OK, a transaction-response),
``POST /fhir/Bundle`` a create (201 Created with ``Location``, ``ETag`` and ``Last-Modified``); both honour
``Prefer: return=minimal | representation | OperationOutcome``.

Every answer under ``/fhir`` is JSON: ``Accept`` and ``_format`` asking for
anything else (XML, HTML) get 406; ``OPTIONS`` (not a CORS preflight) gets ``Allow``
without a body, and the CapabilityStatement on the base. Reads carry ``ETag`` and ``Last-Modified``
(an HTTP date) and answer 304 to ``If-None-Match`` / ``If-Modified-Since``.
Answers over 1 KB are gzipped for clients that accept it; CORS is answered
for the origins of the ``cors_origins`` setting (none by default).
"""
from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import email.utils
import functools
import gzip
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import UnsupportedMediaType
from flask.blueprints import BlueprintSetupState

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import NotAcceptable

from gateway import __version__, jsonutil
from gateway.api.app import pipeline_of, public_root
from gateway.auth import current_principal, principal_party, require_role
from gateway.api.errors import FHIR_JSON, check_total_hint, preferred_return, prefers_lenient
from gateway.errors import InvalidSearch, Issue, NotFound, shown
from gateway.fhir.outcome import operation_outcome
from gateway.fhir.profiles import r4_required_of, r4_summary_elements
from gateway.fhir.search import INCLUDES, PARAM_ALIASES, SEARCH_PARAMS, check_sort
from gateway.scopes import covers, parse_scopes

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

_MAX_COUNT = 200
_MAX_VALUE = 256  # characters of one search value: answers (self links, issues) never echo more
_MAX_PARAMS = 50  # search parameters of one search (each is a condition all matches meet)
_MAX_NAME = 60  # characters of a search parameter's name (with its modifier and chain); no parameter has more
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_WHOLE = re.compile(r"[+-]?[0-9]{1,12}")  # a whole number as a search parameter takes it
_WHOLE_ANY = re.compile(r"[+-]?[0-9]{1,40}")  # _count: any page size a client asks for (it is cut to a page's)
_AUDIT_PARAM_TYPES = {"date": "date", "agent": "reference", "entity": "reference", "patient": "reference"}
#: Interactions every result type answers (CapabilityStatement ``rest.resource.interaction``).
_INTERACTIONS = ("read", "vread", "history-instance", "history-type", "search-type")
_CONTROL = {"_count", "_offset", "_format", "_summary", "_include", "_revinclude", "_sort", "_elements", "_pretty",
            "_page_until", "_page_after", "_total"}
_HISTORY_UNTIL = re.compile(r"[0-9T:.+\-Z]*")  # a version's last_updated, as a history's next link carries it
_MAX_PAGE_AFTER = 1024  # characters of a next link's _page_after (the sort keys of a page's last resource)
_MAX_INCLUDED = 1000  # resources one searchset page adds by _include and _revinclude
#: Elements a resource keeps whatever ``_elements`` asks: its identity and the elements R4 requires of it.
_MANDATORY = {"DiagnosticReport": ("status", "code"), "Observation": ("status", "code")}
_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
              "display": "subsetted"}
_ELEMENT = re.compile(r"[a-z][A-Za-z0-9]{0,63}")
#: Media types a FHIR JSON body is sent and asked for as: FHIR JSON, and what clients write for it.
_JSON_TYPES = frozenset({"application/fhir+json", "application/json", "application/json+fhir"})
#: What ``_format`` may name for the JSON this server speaks (parameters such as ``fhirVersion=4.0`` aside).
_JSON_FORMATS = _JSON_TYPES | {"json"}
#: What an ``Accept`` may name to be answered FHIR JSON.
_SERVED = _JSON_TYPES | {"application/*", "*/*", "*"}
#: The ``fhirVersion`` a media type may name for what this server speaks, FHIR R4 (4.0, or a patch of it such as
#: 4.0.1): another version is not served.
_FHIR_VERSION = ("4", "0")
_GZIP_MIN = 1024  # bytes: smaller answers are sent as they are


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(jsonutil.dumps(body), status=status, mimetype="application/fhir+json", headers=headers)


def _check_format() -> None:
    """Refuse (406) a ``_format`` or an ``Accept`` this server cannot answer: it speaks FHIR JSON only.

    ``_format`` wins over ``Accept``; no ``Accept``, ``*/*`` and ``application/*`` take JSON.
    """
    fmt = request.args.get("_format")
    if not fmt and _form_posted():
        try:
            fmt = next((v for k, v in _posted_form() if k == "_format"), None)
        except InvalidSearch:  # (said by the search itself: the body is not UTF-8 form data)
            fmt = None
    if fmt:
        if fmt.split(";")[0].strip().lower() not in _JSON_FORMATS or not _our_version(fmt):
            raise NotAcceptable(f"_format {shown(fmt)} is not supported; this server speaks application/fhir+json "
                                "(_format=json), FHIR R4")
        return
    accept = request.headers.get("Accept", "").strip()
    if accept and not any(value.split(";")[0].strip().lower() in _SERVED and quality > 0 and _our_version(value)
                          for value, quality in request.accept_mimetypes):
        raise NotAcceptable(f"Accept {shown(accept[:80])} is not served; this server speaks application/fhir+json, "
                            "FHIR R4 (fhirVersion=4.0)")


def _our_version(media_type: str) -> bool:
    """False when ``media_type`` names a ``fhirVersion`` other than R4's (``application/fhir+json;
    fhirVersion=3.0``): a client asking for another FHIR version is not served R4 content it would misread."""
    for parameter in media_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "fhirversion" and tuple(value.strip().strip('"').split(".")[:2]) != _FHIR_VERSION:
            return False
    return True


def require_fhir_json(what: str) -> None:
    """Refuse a body sent as something else than FHIR JSON of R4 (a request without a Content-Type is read as it).

    :raises UnsupportedMediaType: (415) FHIR XML, a form, text, or another FHIR version: said, not read as JSON or
        as an empty body (``curl -d`` sends a form unless told otherwise).
    """
    sent = (request.mimetype or "").lower()
    if sent and sent not in _JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type {sent[:80]} is not taken here: send {what} as FHIR JSON "
                                   "(Content-Type: application/fhir+json)")
    if not _our_version(request.headers.get("Content-Type", "")):  # (an STU3 Bundle read as R4 is misread)
        raise UnsupportedMediaType(f"Content-Type {shown(request.headers.get('Content-Type', '')[:80])} names another "
                                   "FHIR version: this server takes FHIR R4 (fhirVersion=4.0)")


def _form_posted() -> bool:
    return request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded"


def _fhir_path() -> bool:
    return request.path == "/fhir" or request.path.startswith("/fhir/")


@bp.before_app_request
def _negotiate() -> None:
    """Every FHIR answer is JSON: a client asking only for XML or HTML is told so (406) before anything runs."""
    if _fhir_path():
        _check_format()


@bp.before_app_request
def _options() -> Response | None:
    """``OPTIONS`` on the FHIR API answered as a FHIR server answers it, not with an empty HTML page: on the base
    (``OPTIONS /fhir``, how DSTU2 clients asked for it) the CapabilityStatement, elsewhere 200 without a body; both
    with ``Allow`` naming the methods the URL takes. A browser's CORS preflight (``Access-Control-Request-Method``)
    is left to the CORS answer as before, and a URL no route serves to its 404."""
    if (request.method != "OPTIONS" or not _fhir_path() or request.url_rule is None
            or "Access-Control-Request-Method" in request.headers):
        return None
    allowed = current_app.make_default_options_response().headers.get("Allow", "")
    response = metadata() if request.path in ("/fhir", "/fhir/") else _no_body(200, {})
    response.headers["Allow"] = allowed
    return response


@bp.after_request
def _not_kept(response: Response) -> Response:
    """Answers about patients are kept by no cache on the way or on the client (``no-store``; a client revalidates
    what it holds with If-None-Match all the same), and, where browsers of other origins are let in, a cache tells
    them apart by their Origin."""
    response.headers.setdefault("Cache-Control", "no-store")
    settings = current_app.extensions.get("gateway.settings")
    if getattr(settings, "cors_origins", ""):
        response.vary.add("Origin")
    return response


@bp.after_app_request
def _compress(response: Response) -> Response:
    """gzip a FHIR answer over 1 KB for a client that accepts it."""
    if (not _fhir_path() or response.status_code != 200 or response.direct_passthrough or response.is_streamed
            or "Content-Encoding" in response.headers
            or request.accept_encodings.quality("gzip") <= 0):  # (``gzip;q=0``: anything but gzip)
        return response
    data = response.get_data()
    if len(data) < _GZIP_MIN:
        return response
    response.set_data(gzip.compress(data, compresslevel=5))
    response.headers["Content-Encoding"] = "gzip"
    response.vary.add("Accept-Encoding")
    return response


@bp.record_once
def _cors(state: BlueprintSetupState) -> None:
    """Answer browsers' cross-origin requests from the origins the settings name (none by default)."""
    settings = state.app.extensions.get("gateway.settings")
    origins = [o.strip() for o in (getattr(settings, "cors_origins", "") or "").split(",") if o.strip()]
    if origins:
        from flask_cors import CORS

        CORS(state.app, resources={r"/fhir/*": {"origins": origins}, r"/fhir": {"origins": origins}},
             methods=["GET", "HEAD", "POST", "OPTIONS"],  # (what the API answers: PUT, PATCH, DELETE are 405)
             expose_headers=["ETag", "Last-Modified", "Location", "Content-Location"],
             allow_headers=["Authorization", "Content-Type", "Accept", "Prefer", "If-None-Match",
                            "If-Modified-Since"])


@bp.post("")
@bp.post("/")
@bp.post("/Bundle")
@require_role("submitter", "admin")
def submit() -> Response:
    """A report Bundle in FHIR (transaction or collection): checked against our profiles, then stored.

    ``POST /fhir`` is R4's transaction (http.html#transaction): accepted, it is answered 200 OK with a
    transaction-response Bundle whose entries say what each resource became (``201 Created``, ``200 OK``, with the
    version's location, ETag and time). ``POST /fhir/Bundle`` is R4's create of a Bundle: accepted, it is answered
    201 Created with ``Location`` (``[base]/Bundle/[id]/_history/1``: the Bundle's id, or one made from its
    identifier when it has none), ``ETag`` and ``Last-Modified``, and the same transaction-response. A Bundle sent
    again with the same content is answered 200 with its first outcome. ``Prefer: return=`` is honoured
    (:func:`_accepted`). Refused, it is an OperationOutcome naming every problem (422/400, 409 for a conflict).
    """
    from gateway.errors import ParseError

    require_fhir_json("the Bundle")
    body = request.get_data(cache=False)
    if not body.strip():
        raise ParseError("is empty: send the Bundle as the body", "body", code="required")
    outcome = pipeline_of(current_app).ingest(body, "fhir", channel="http", origin=request.remote_addr or "")[0]
    status = {"AA": 200, "AE": 422, "AR": 400}.get(outcome.ack_code, 422)
    headers: dict[str, str] = {}
    if outcome.status.value == "duplicate":
        if outcome.ack_code != "AA" and outcome.retry_later:
            status, headers = 503, {"Retry-After": "5"}  # its first copy is being worked: a passing state
    elif any(i.code == "conflict" for i in outcome.issues):  # other content under an identifier already stored
        status = 409
    if status == 200 and outcome.ack_code == "AA":
        rule = request.url_rule.rule if request.url_rule is not None else ""
        return _accepted(outcome, body, create=rule.endswith("/Bundle"))
    return Response(outcome.answer, status=status, mimetype="application/fhir+json", headers=headers)


def _accepted(outcome: Any, body: bytes, *, create: bool) -> Response:
    """The answer to an accepted submission, as the client's ``Prefer: return=`` asks (R4 http.html#ops; said back
    in ``Preference-Applied``).

    A transaction (``POST /fhir``) is answered with its transaction-response, whose entries carry, for
    ``return=minimal`` (and without the header), their ``response`` alone; for ``return=representation`` also the
    resource each became (the version stored) with its ``fullUrl``; for ``return=OperationOutcome`` an
    OperationOutcome in each ``response.outcome`` saying what became of the entry, with the warnings found in it.
    A create (``POST /fhir/Bundle``) is answered with no body for ``minimal``, the Bundle as stored (a collection of
    the versions its entries became) for ``representation``, an OperationOutcome for ``OperationOutcome``, and the
    transaction-response without the header.
    """
    prefer = preferred_return(request.headers.get("Prefer", ""))
    first = outcome.status.value != "duplicate"
    status = 201 if create and first else 200
    headers: dict[str, str] = {}
    if prefer is not None:
        headers["Preference-Applied"] = f"return={prefer}"
    sent = outcome.message.extra.get("bundle") if outcome.message is not None else None
    if not isinstance(sent, dict):
        sent = jsonutil.loads(body)
    now = pipeline_of(current_app).clock()
    if create:  # R4 create: where the Bundle is now, its version, and when it was stored
        bundle_id = _submitted_id(sent, body)
        headers["Location"] = f"{public_root()}/fhir/Bundle/{bundle_id}/_history/1"
        headers["ETag"] = 'W/"1"'
        if first:
            headers["Last-Modified"] = email.utils.format_datetime(now.astimezone(_dt.timezone.utc), usegmt=True)
    if prefer is None or (prefer == "minimal" and not create):
        return Response(outcome.answer, status=status, mimetype="application/fhir+json", headers=headers)
    if prefer == "minimal":
        return _no_body(status, headers)
    answer = jsonutil.loads(outcome.answer)
    entries = [e for e in answer.get("entry", []) if isinstance(e, dict)]
    warnings = [i for i in outcome.issues if i.severity in ("warning", "information")]
    if prefer == "OperationOutcome":
        if create:  # the Bundle, then each entry, as the transaction-response would say it
            said = [Issue("information", "informational", "Bundle",
                          f"is {'created' if first else 'the same content as one created before'}: Bundle/{bundle_id}, "
                          f"its {len(entries)} resources stored")]
            said += [_entry_said(n, entry.get("response") or {}) for n, entry in enumerate(entries)]
            return fhir_response(operation_outcome(said + warnings), status, headers)
        for n, entry in enumerate(entries):
            entry.setdefault("response", {})["outcome"] = operation_outcome(
                [_entry_said(n, entry["response"])] + [i for i in warnings
                                                       if i.location.startswith(f"Bundle.entry[{n}]")])
        return fhir_response(answer, status, headers)
    resources = _versions_of(entries)  # return=representation
    given = [r for r in resources if r is not None]
    if given:
        _audit_reads(given, None)  # patient data leaves the gateway: recorded as a read is
    base = public_root() + "/fhir"
    if create:
        meta = {"versionId": "1", **({"lastUpdated": now.isoformat(timespec="milliseconds")} if first else {})}
        stored = {"resourceType": "Bundle", "id": bundle_id, "meta": meta,
                  **{k: sent[k] for k in ("identifier", "timestamp") if k in sent}, "type": "collection"}
        if given:  # (FHIR JSON has no empty arrays)
            stored["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r} for r in given]
        return fhir_response(stored, status, headers)
    answer["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, **entry}
                       if r is not None else entry for entry, r in zip(entries, resources)]
    return fhir_response(answer, status, headers)


def _submitted_id(sent: dict[str, Any], body: bytes) -> str:
    """The logical id of a Bundle created by ``POST /fhir/Bundle``: its own ``id``; for a Bundle sent without one,
    a name-based UUID of its identifier (of its bytes when it has none), so a resend of it is named alike."""
    import hashlib
    import uuid

    from gateway.uuids import uuid5

    rid = sent.get("id")
    if isinstance(rid, str) and _FHIR_ID.match(rid):
        return rid
    ident = sent.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        return uuid5(uuid.NAMESPACE_URL, f"{ident.get('system', '')}|{ident['value']}")
    return uuid5(uuid.NAMESPACE_URL, "sha256:" + hashlib.sha256(body).hexdigest())


def _entry_said(n: int, response: dict[str, Any]) -> Issue:
    """What became of entry ``n`` of a transaction, from its ``response`` (``return=OperationOutcome``)."""
    where = str(response.get("location") or "its resource")
    if str(response.get("status", "")).startswith("201"):
        text = f"is created: {where}"
    else:
        text = f"was stored before: {where} holds its content (a new version, or the same content again)"
    return Issue("information", "informational", f"Bundle.entry[{n}]", text)


def _versions_of(entries: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The version each transaction-response entry names (``Observation/1/_history/2``), as stored; the current
    one for a location without a version; None where nothing is stored (yet)."""
    store = pipeline_of(current_app).store
    found: list[dict[str, Any] | None] = []
    for entry in entries:
        location = str((entry.get("response") or {}).get("location") or "")
        rtype, _, rest = location.partition("/")
        rid, _, vid = rest.partition("/_history/")
        try:
            found.append(store.version(rtype, rid, vid) if vid else store.read(rtype, rid))
        except NotFound:
            found.append(None)
    return found


def _no_body(status: int, headers: dict[str, str]) -> Response:
    """An answer without a body (``Prefer: return=minimal``, a plain ``OPTIONS``): no Content-Type either."""
    response = Response(status=status, headers=headers)
    del response.headers["Content-Type"]
    return response


@bp.get("/metadata")
def metadata() -> Response:
    """The CapabilityStatement of this gateway."""
    from gateway.api.conformance import capability_resources, supported_profiles
    from gateway.clients import smart_security

    settings = current_app.extensions["gateway.settings"]
    profiles = supported_profiles(current_app)
    resources = []
    for rtype, params in sorted(SEARCH_PARAMS.items()):
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": code} for code in _INTERACTIONS],
            "versioning": "versioned",
            "readHistory": True,
            "conditionalRead": "full-support",
            "searchParam": _search_params_said(params),
        }
        if INCLUDES.get(rtype):
            entry["searchInclude"] = [f"{rtype}:{name}" for name in INCLUDES[rtype]]
        revinclude = [f"{source}:{name}" for source, names in INCLUDES.items()
                      for name, target in names.items() if target == rtype]
        if revinclude:
            entry["searchRevInclude"] = revinclude
        if rtype in profiles:
            entry["supportedProfile"] = profiles[rtype]
        resources.append(entry)
    from gateway.audit.query import PARAMETERS as AUDIT_PARAMETERS

    resources.append({"type": "AuditEvent", "interaction": [{"code": c} for c in ("read", "vread", "history-instance",
                                                                                  "search-type")],
                      "searchParam": [{"name": n, "type": _AUDIT_PARAM_TYPES.get(n, "token")}
                                      for n in sorted(AUDIT_PARAMETERS) if not n.startswith("_") and ":" not in n]})
    served = {r["type"] for r in resources}
    for extra in capability_resources(current_app):
        if extra["type"] in served:  # profiled result types: add $validate to the entry above
            entry = next(r for r in resources if r["type"] == extra["type"])
            entry.setdefault("operation", []).extend(extra.get("operation", []))
        else:
            resources.append(extra)
    for entry in resources:  # referrals (移送), served as Tasks: what GET /fhir/Task and /fhir/Task/{id} take
        if entry["type"] == "Task":
            entry["interaction"] = [{"code": "read"}, {"code": "search-type"}]
            entry["searchParam"] = [{"name": "focus", "type": "reference", "documentation": "the report's 检验报告单号,"
                                     " or DiagnosticReport/{id}"}, {"name": "status", "type": "token"}]
    if not any(r["type"] == "Bundle" for r in resources):
        resources.append({"type": "Bundle"})
    for entry in resources:  # POST /fhir/Bundle: R4's create of a Bundle (its resources stored as a transaction's)
        if entry["type"] == "Bundle":
            entry["interaction"] = [{"code": "create", "documentation": _BUNDLE_CREATED}]
    from gateway.api.conformance import _VALIDATE_OPERATION, capability_operations

    for entry in resources:  # $validate, type and instance level, for every type stored here
        if entry["type"] in SEARCH_PARAMS and not any(o["name"] == "validate" for o in entry.get("operation", [])):
            entry.setdefault("operation", []).append({"name": "validate", "definition": _VALIDATE_OPERATION})
    cap: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": settings.issuer_name,
        "kind": "instance",
        "software": {"name": "cyhr-gateway", "version": __version__},
        "implementation": {"description": f"川渝 result-recognition gateway of {settings.issuer_name}",
                           "url": public_root() + "/fhir"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{"mode": "server", "security": smart_security(settings), "resource": resources,
                  "interaction": [{"code": "transaction", "documentation": _TRANSACTION_TAKEN}]}],
    }
    operations = capability_operations(current_app)  # system level: POST /fhir/$recognize
    if operations:  # (FHIR JSON has no empty arrays)
        cap["rest"][0]["operation"] = operations
    return fhir_response(cap)


def _search_params_said(params: dict[str, str]) -> list[dict[str, str]]:
    """A type's search parameters as its CapabilityStatement entry lists them: each name a client may send, with
    the other spellings the server takes (``subject`` for ``patient``; a chain's ``subject:Patient.identifier``)
    said in its documentation. ``_id`` is listed too (it was taken and not said)."""
    spellings: dict[str, list[str]] = {}
    for alias, name in PARAM_ALIASES.items():
        spellings.setdefault(name, []).append(alias)
    said: list[dict[str, str]] = []
    for name, kind in sorted(params.items()):
        entry = {"name": name, "type": kind}
        others = sorted(spellings.get(name, []))
        if "." in name:
            entry["documentation"] = (f"a chained search: {name.partition('.')[0]}'s {name.partition('.')[2]} (a "
                                      "token)" + (f"; also sent as {', '.join(others)}" if others else ""))
            entry["type"] = "token"
        elif others:
            entry["documentation"] = f"also sent as {', '.join(others)}"
        said.append(entry)
        if name == "patient" and "subject" in spellings.get(name, []):
            said.append({"name": "subject", "type": "reference", "documentation": "the same as patient (every "
                         "subject stored here is a Patient)"})
    return said


#: What the system-level transaction takes (the CapabilityStatement's documentation of it).
_TRANSACTION_TAKEN = ("A report Bundle (transaction or collection): a report with its results and the resources they "
                      "name, every entry POST or PUT, checked against this gateway's profiles and stored as a whole. "
                      "GET, DELETE, PATCH and conditional entries are refused, each named in the OperationOutcome.")


#: What a create of a Bundle does here (the CapabilityStatement's documentation of it).
_BUNDLE_CREATED = ("A report Bundle, taken as POST /fhir takes it (its resources stored, each a version of its own); "
                   "answered 201 Created with Location, ETag and Last-Modified, and a transaction-response saying "
                   "what each entry became.")


def _known_type(rtype: str) -> None:
    if rtype not in SEARCH_PARAMS:
        raise NotFound(f"resource type {shown(rtype)} is not served here (served: {', '.join(sorted(SEARCH_PARAMS))})",
                       rtype[:60])


#: Most patients one search that found nothing is recorded as asking for (values of one parameter OR'd by commas).
_ASKED_MAX = 20


def _patients_asked(rtype: str, params: list[tuple[str, str]]) -> list[Any]:
    """The patients a search names, by reference or by identifier (``PatientRef``s, at most :data:`_ASKED_MAX`):
    whom a search that found nothing asked about. ``Patient``: ``_id`` and ``identifier``; the others: ``patient``
    and ``patient.identifier`` (under any of their spellings). A modifier that is not a spelling of these (``:not``,
    ``:missing``) names nobody, nor does an identifier without a value (``system|``: every patient of a system)."""
    from gateway.audit.events import asked_patient
    from gateway.audit.records import PatientRef

    asked: list[Any] = []
    for name, value in params:
        param = PARAM_ALIASES.get(name, name)
        if rtype == "Patient" and param == "_id" or rtype != "Patient" and param == "patient":
            refs = [PatientRef(reference=v if v.startswith("Patient/") else f"Patient/{v}")
                    for v in value.split(",") if v and "/" not in v.removeprefix("Patient/")]
        elif rtype == "Patient" and param == "identifier" or rtype != "Patient" and param == "patient.identifier":
            refs = [ref for ref in map(asked_patient, value.split(",")) if ref is not None]
        else:
            continue
        for ref in refs:
            if ref not in asked:
                asked.append(ref)
    return asked[:_ASKED_MAX]


def _criteria_reference(rtype: str, params: list[tuple[str, str]]) -> str:
    """The patients a search asked about by criteria that name none of them (a name, a birth date, none at all),
    as a conditional reference: ``Patient?name=李秀英&birthdate=1975-06-15``; what the audit entry of a search that
    returned no Patient names as its patient, holding no more than the query did."""
    return f"{rtype}?{urlencode(params)}"


def _audit_reads(resources: list[dict[str, Any]], query: str | None, asked: list[Any] | None = None) -> None:
    """Every read of patient results is itself recorded (who, which patient, what, from where); a search that
    found nothing, once for each patient it ``asked`` about (someone probing which patients are held here leaves a
    trail)."""
    from gateway.audit.events import patient_identifier, patient_reads
    from gateway.errors import GatewayError
    from gateway.store.db import transaction

    settings = current_app.extensions["gateway.settings"]
    pipe = pipeline_of(current_app)
    db = pipe.store.db

    # the identifiers of the patients the returned results are about (their 身份证号), and of those a search that
    # found nothing named by reference, read before the write lock
    asked = asked if asked and not resources else []
    about = sorted(({str((r.get("subject") or {}).get("reference", "")) for r in resources}
                    | {str(a.reference) for a in asked if a.reference}) - {""})
    try:
        known = {f"Patient/{p.get('id')}": patient_identifier(p)
                 for p in pipe.store.read_many([ref for ref in about if ref.startswith("Patient/")])}
    except GatewayError:  # (the entries name the references alone)
        known = {}
    with transaction(db):
        patient_reads(db, at=pipe.clock(), member=settings.issuer_uscc, server_address=request.host,
                      client=principal_party(current_principal(), settings.issuer_uscc),
                      client_address=request.remote_addr or "", on_behalf_of=settings.issuer_uscc,
                      resources=resources, query=query, identified=known.get, asked=asked)


def _http_date(instant: str) -> str:
    """A FHIR instant as an HTTP date (RFC 7231 IMF-fixdate, GMT)."""
    moment = _dt.datetime.fromisoformat(instant.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return email.utils.format_datetime(moment.astimezone(_dt.timezone.utc), usegmt=True)


def _not_modified(version: str, instant: str) -> bool:
    """True when the client's copy (``If-None-Match``, else ``If-Modified-Since``) is still current."""
    match = request.headers.get("If-None-Match")
    if match is not None:  # weak comparison (RFC 7232 3.2): W/"2" matches "2"
        tags = {t.strip().removeprefix("W/").strip('"') for t in match.split(",")}
        return "*" in tags or version in tags
    since = request.headers.get("If-Modified-Since")
    if since and instant:
        try:
            when = email.utils.parsedate_to_datetime(since)
            changed = _dt.datetime.fromisoformat(instant.replace("Z", "+00:00"))
        except (TypeError, ValueError):
            return False  # not an HTTP date: ignored, as RFC 7232 says
        if when.tzinfo is None or changed.tzinfo is None:
            return False
        return changed.replace(microsecond=0) <= when
    return False


def _versioned_response(res: dict[str, Any]) -> Response:
    """One resource with its ETag and Last-Modified; 304 without a body when the client's copy is current. Cut
    down as ``_summary`` or ``_elements`` asks (:func:`_read_shape`)."""
    shape = _read_shape(res["resourceType"])
    meta = res.get("meta", {})
    version, instant = str(meta.get("versionId", "1")), str(meta.get("lastUpdated", ""))
    headers = {"ETag": f'W/"{version}"'}
    if instant:
        headers["Last-Modified"] = _http_date(instant)
    if _not_modified(version, instant):
        return Response(status=304, headers=headers)
    return fhir_response(shape(res) if shape is not None else res, headers=headers)


def _read_shape(rtype: str) -> Any:
    """What a read or vread's ``_summary`` (true, text, data; false: whole) or ``_elements`` asks of the resource
    (R4 search.html: they apply to read too): a function cutting it down, marked SUBSETTED; None for all of it.
    They were ignored: a client asking for less of a patient's data got all of it.

    :raises InvalidSearch: another ``_summary`` (``count`` is a search's), both asked, or not an element name.
    """
    summary = request.args.get("_summary")
    elements = _elements_of(rtype, request.args)
    if summary is not None and summary not in (*_SUMMARY_SHAPES, "false"):
        raise InvalidSearch(f"_summary={shown(summary)} is not supported on a read (supported: _summary=true, text, "
                            "data, false)", "_summary", code="not-supported")
    if summary in _SUMMARY_SHAPES:
        if elements is not None:
            raise InvalidSearch(f"_summary={summary} and _elements ask for two different cuts of the resource: give "
                                "one of them", "_elements")
        return functools.partial(_summarised, shape=summary)
    if elements is not None:
        return functools.partial(_subset, elements=elements)
    return None


def _check_id(rtype: str, rid: str) -> None:
    _known_type(rtype)
    if not _FHIR_ID.match(rid):
        raise NotFound(f"{rtype}/{shown(rid)} is not known (not a FHIR id)", rtype)


@bp.get("/Task")
@require_role("submitter", "admin")
def task_search() -> Response:
    """Referrals (移送) made here or received as the authority, as Tasks: search by ``status`` and ``focus``
    (the report's 检验报告单号 or ``DiagnosticReport/…``).

    :raises InvalidSearch: another parameter (strict handling).
    """
    from gateway.referrals import referrals_of

    known = ("status", "focus", "_count")
    unknown = [k for k in request.args if k not in known]
    if unknown and not prefers_lenient(request.headers.get("Prefer", "")):
        raise InvalidSearch(f"search parameter {shown(unknown[0])} is not supported for Task (supported: status, "
                            "focus)", unknown[0][:_MAX_NAME], code="not-supported")
    count = _int_param("_count", 100, 0, 1000)  # (no next link here: a larger page is refused, not cut short)
    # a gateway that takes no exchange (no registry snapshot) has made and received no referral: none found (it
    # answered 500, "this gateway takes no exchange")
    rows = [] if current_app.extensions.get("gateway.exchange") is None else referrals_of(current_app).list(
        status=request.args.get("status"), focus=request.args.get("focus"),
        limit=count + 1 if count else 1_000_000)  # (_count=0: the total only)
    base = public_root()
    asked = [(k, v) for k in known for v in request.args.getlist(k)]
    found: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": [
        {"relation": "self", "url": f"{base}/fhir/Task" + (f"?{urlencode(asked)}" if asked else "")}]}
    if len(rows) <= count or not count:  # every match counted: its total is known (more: not counted, not guessed)
        found["total"] = len(rows)
    if rows[:count]:  # (FHIR JSON has no empty arrays)
        found["entry"] = [{"fullUrl": f"{base}/fhir/Task/{r.id}", "resource": r.task, "search": {"mode": "match"}}
                          for r in rows[:count]]
    return fhir_response(found)


@bp.get("/Task/<rid>")
@require_role("submitter", "admin")
def task_read(rid: str) -> Response:
    """One referral (移送) as its latest Task.

    :raises NotFound: no such referral here.
    """
    from gateway.referrals import referrals_of

    if current_app.extensions.get("gateway.exchange") is None:  # no exchange, no referral (not a 500)
        raise NotFound("no such referral here (this gateway takes no exchange)", f"Task/{rid[:64]}")
    return fhir_response(referrals_of(current_app).get(rid).task)


@bp.get("/<rtype>/<rid>")
@require_role("submitter", "admin")
def read(rtype: str, rid: str) -> Response:
    """One resource, current version, with ETag and Last-Modified (304 when the client's copy is current).

    :raises NotFound: unknown type or id.
    """
    return _versioned_response(stored_read(rtype, rid))


def stored_read(rtype: str, rid: str) -> dict[str, Any]:
    """The current version of one stored resource, its read written to the audit log as ``GET /fhir/{type}/{id}``
    writes it: what answers whether a resource is held here (a read, ``$validate`` of the stored resource) is
    audited, a Patient not held here too (:func:`_asked_of_a_patient`), before the 404 goes on.

    :raises NotFound: unknown type or id.
    """
    _check_id(rtype, rid)
    with _asked_of_a_patient(rtype, rid):
        res = pipeline_of(current_app).store.read(rtype, rid)
    _audit_reads([res], None)
    return res


@bp.get("/<rtype>/<rid>/_history/<vid>")
@require_role("submitter", "admin")
def vread(rtype: str, rid: str, vid: str) -> Response:
    """One version of a resource, current or earlier (vread).

    :raises NotFound: unknown type, id or version.
    """
    _check_id(rtype, rid)
    with _asked_of_a_patient(rtype, rid):
        res = pipeline_of(current_app).store.version(rtype, rid, vid)
    _audit_reads([res], None)
    return _versioned_response(res)


@contextlib.contextmanager
def _asked_of_a_patient(rtype: str, rid: str) -> Iterator[None]:
    """A read of a Patient not held here (404) leaves the trail an empty search by ``_id`` leaves (and is recorded
    as that search, ``_id=<id>``): an entry naming the patient asked about, without resources (someone probing
    which patients are held here is recorded); then the 404 goes on. A read of another type names no patient (its
    subject is unknown)."""
    from gateway.audit.records import PatientRef

    try:
        yield
    except NotFound:
        if rtype == "Patient":
            _audit_reads([], urlencode({"_id": rid}), asked=[PatientRef(reference=f"Patient/{rid}")])
        raise


def _history_bundle(rtype: str, rid: str | None) -> Response:
    """A history Bundle, newest version first, each entry with the request that made it and its response.

    ``_since`` (R4 http.html#history): the versions made at or after that instant. The pages after the first
    hold the versions there were when the first was made, each page starting after the last version of the one
    before (``_page_until``, ``_page_after`` in the ``next`` link): versions made meanwhile neither repeat nor
    shift them.
    """
    count, _ = _page_size(20, _MAX_COUNT)  # (a history Bundle has no outcome entry: its links say the page size)
    offset = _int_param("_offset", 0, 0, 10_000_000)
    lenient = prefers_lenient(request.headers.get("Prefer", ""))
    taken = ("_count", "_offset", "_format", "_pretty", "_since", "_page_until", "_page_after", "_total")
    for name in request.args:
        if name not in taken and not lenient:
            raise InvalidSearch(f"parameter {shown(name)} is not supported for _history (supported: _count, "
                                "_since)", name[:_MAX_NAME], code="not-supported")
    check_total_hint(request.args.getlist("_total"))
    since_text = request.args.get("_since")
    since = None
    if since_text is not None:
        since = _instant_param("_since", since_text)
    until = request.args.get("_page_until") or None  # (empty: a history that was empty at its first page)
    if until is not None and (len(until) > 40 or not _HISTORY_UNTIL.fullmatch(until)):
        raise InvalidSearch("_page_until is not one this server's next links carry: follow the link as given, or "
                            "start again", "_page_until")
    after_text = request.args.get("_page_after")
    after = _page_after(after_text) if after_text is not None else None
    store = pipeline_of(current_app).store
    with _asked_of_a_patient(rtype, rid) if rid is not None else contextlib.nullcontext():
        result = store.history(rtype, rid, count=count + 1 if count else 0,
                               offset=0 if after is not None else offset, since=since, up_to=until, after=after)
    until = result.until  # (the first page's: the newest version now)
    more = len(result.resources) > count
    del result.resources[count:]
    last_keys = result.keys[count - 1] if count and len(result.keys) >= count else None
    query = request.query_string.decode("utf-8", "replace")
    if result.resources:
        _audit_reads(result.resources, query)
    elif rtype == "Patient":
        # a history that returns no version (``_count=0``, a ``_since`` after them) still answers that the patient
        # is held here, or how many versions of patients there are: recorded, naming the patient asked about
        from gateway.audit.records import PatientRef

        asked = PatientRef(reference=f"Patient/{rid}" if rid is not None else _criteria_reference(rtype, []))
        _audit_reads([], query, asked=[asked])
    base = public_root() + "/fhir"
    path = f"{base}/{rtype}" + (f"/{rid}" if rid is not None else "") + "/_history"

    def link(off: int, page_after: str | None = None) -> str:
        paging = [("_count", str(count)), ("_offset", str(off)), ("_page_until", until or "")]
        if page_after is not None:
            paging.append(("_page_after", page_after))
        return f"{path}?" + urlencode(([("_since", since_text)] if since_text is not None else []) + paging)

    links = [{"relation": "self", "url": link(offset, after_text)}]
    if count and more and last_keys is not None:
        links.append({"relation": "next", "url": link(offset + count, _keys_text(last_keys))})
    if count and offset > 0:
        links.append({"relation": "previous", "url": link(max(0, offset - count))})
    entries = []
    for res in result.resources:
        meta = res.get("meta", {})
        version = str(meta.get("versionId", "1"))
        first = version == "1"
        response: dict[str, Any] = {"status": "201 Created" if first else "200 OK",
                                    "etag": f'W/"{version}"'}
        if meta.get("lastUpdated"):
            response["lastModified"] = meta["lastUpdated"]
        entries.append({
            "fullUrl": f"{base}/{res['resourceType']}/{res['id']}",
            "resource": res,
            "request": {"method": "POST", "url": res["resourceType"]} if first
            else {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"},
            "response": response,
        })
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": result.total, "link": links}
    if entries:
        bundle["entry"] = entries
    return fhir_response(bundle)


@bp.get("/<rtype>/<rid>/_history")
@require_role("submitter", "admin")
def history_instance(rtype: str, rid: str) -> Response:
    """Every version of one resource, newest first (a history Bundle).

    :raises NotFound: unknown type or id.
    """
    _check_id(rtype, rid)
    return _history_bundle(rtype, rid)


@bp.get("/<rtype>/_history")
@require_role("submitter", "admin")
def history_type(rtype: str) -> Response:
    """Every version of every resource of a type, newest first (a history Bundle).

    :raises NotFound: unknown type.
    """
    _known_type(rtype)
    return _history_bundle(rtype, None)


def _int_param(name: str, default: int, low: int, high: int, args: MultiDict[str, str] | None = None) -> int:
    raw = (request.args if args is None else args).get(name)
    if raw is None:
        return default
    # ASCII digits only: int() would also take "١٢" (Arabic-Indic), "１２" (full width) and "1_2"
    value = int(raw) if _WHOLE.fullmatch(raw.strip()) else None
    if value is None:
        raise InvalidSearch(f"{name} must be a whole number, not {shown(raw)}", name)
    if not low <= value <= high:
        raise InvalidSearch(f"{name} must be between {low} and {high}", name)
    return value


def _page_size(default: int, most: int, args: MultiDict[str, str] | None = None) -> tuple[int, Issue | None]:
    """``_count``: how many matches a page holds (``default`` without it), and what the page says when it was asked
    for more than ``most``: then it holds ``most`` (R4 search: a server returns no more than asked, and may return
    fewer; the ``next`` link carries on from there), rather than refusing a client that asks for large pages.

    :raises InvalidSearch: not a whole number, or a negative one.
    """
    raw = (request.args if args is None else args).get("_count")
    if raw is None:
        return default, None
    value = int(raw) if _WHOLE_ANY.fullmatch(raw.strip()) else None  # (a large one is as many as a page holds)
    if value is None or value < 0:
        raise InvalidSearch(f"_count must be a whole number, 0 or more, not {shown(raw)}", "_count")
    if value <= most:
        return value, None
    return most, Issue("information", "informational", "_count",
                       f"_count {shown(raw.strip()[:20])} is more than this server puts in one page: {most} per page, "
                       "the next link gives the rest")


@bp.get("/<rtype>")
@require_role("submitter", "admin")
def search(rtype: str) -> Response:
    """A searchset Bundle of matching resources.

    :raises NotFound: unknown type.
    :raises InputError: unknown parameter (strict handling) or bad value.
    """
    return _search(rtype, request.args)


@bp.post("/<rtype>/_search")
@require_role("submitter", "admin")
def search_posted(rtype: str) -> Response:
    """Search with the parameters in a form-encoded body (and the URL): the same searchset as ``GET``.

    :raises NotFound: unknown type.
    :raises InputError: not a form-encoded body (415), unknown parameter (strict handling) or bad value.
    """
    from gateway.errors import UnsupportedFormat

    if request.content_length and not _form_posted():
        raise UnsupportedFormat("the parameters of POST _search are sent as application/x-www-form-urlencoded, "
                                f"not {shown(request.mimetype or 'no content type')}", "Content-Type")
    args: MultiDict[str, str] = MultiDict(request.args)
    if _form_posted():
        for name, value in _posted_form():
            args.setlist(name, [*args.getlist(name), value])
    return _search(rtype, args)


def _posted_form() -> list[tuple[str, str]]:
    """The parameters of a form-encoded POST _search body, read as UTF-8 (R4: the same meaning as in the URL).

    A body in another character set, or with bytes that are not UTF-8 (raw or percent-encoded: a GBK client's
    ``王``), is refused: read leniently, its parameters were dropped, and the search answered every patient's
    reports.

    :raises UnsupportedFormat: a ``charset`` other than UTF-8 declared (415).
    :raises InvalidSearch: the body is not UTF-8 form data (400).
    """
    from urllib.parse import parse_qsl

    from gateway.errors import UnsupportedFormat

    charset = (request.mimetype_params.get("charset") or "utf-8").strip().lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedFormat(f"the parameters of POST _search are read as UTF-8, not {shown(charset)}: send them "
                                "in UTF-8 (percent-encoded)", "Content-Type")
    body = request.get_data(cache=True)
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidSearch("the body of POST _search is not UTF-8 form data (a value in another character set, "
                            "such as GBK?): send the parameters in UTF-8, percent-encoded", "body") from None


def _search(rtype: str, args: MultiDict[str, str]) -> Response:
    _known_type(rtype)
    count, fewer = _page_size(20, _MAX_COUNT, args)
    lenient = prefers_lenient(request.headers.get("Prefer", ""))
    # R4 (search.html, handling=lenient): what is not supported is ignored rather than refused — and said in the
    # page (an OperationOutcome entry), never silently
    ignored: list[Issue] = []

    def ignore_if_lenient(exc: InvalidSearch) -> None:
        if not lenient:
            raise exc
        ignored.append(Issue("warning", "not-supported", exc.location,
                             f"ignored (Prefer: handling=lenient): {exc.message}"))

    summary = args.get("_summary")
    if summary == "false":  # (R4: the whole resources, as without it)
        summary = None
    shape: str | None = None  # _summary=true, text or data: the resources cut down (SUBSETTED)
    if summary in _SUMMARY_SHAPES:
        shape, summary = summary, None
        if args.getlist("_elements"):
            ignore_if_lenient(InvalidSearch(f"_summary={shape} and _elements ask for two different cuts of the "
                                            "resources: give one of them", "_elements"))
            args = MultiDict([(k, v) for k, v in args.items(multi=True) if k != "_elements"])
    if summary is not None and summary != "count":
        ignore_if_lenient(InvalidSearch(f"_summary={shown(summary)} is not supported (supported: _summary=true, "
                                        "text, data, count, false)", "_summary", code="not-supported"))
        summary = None
    if summary is not None:
        count = 0
    offset = _int_param("_offset", 0, 0, 10_000_000, args)
    check_total_hint(args.getlist("_total"))
    params = [(k, v) for k, vs in args.lists() for v in vs if k not in _CONTROL]
    if len(params) > _MAX_PARAMS:
        raise InvalidSearch(f"the search has {len(params)} parameters, at most {_MAX_PARAMS} are taken (values of "
                            "one parameter separated by commas match any of them)", params[_MAX_PARAMS][0][:_MAX_NAME])
    for name, value in params:
        if len(name) > _MAX_NAME and not lenient:
            raise InvalidSearch(f"search parameter {shown(name)} is not supported for {rtype}", name[:_MAX_NAME],
                                code="not-supported")
        if len(value) > _MAX_VALUE:
            raise InvalidSearch(f"value has {len(value)} characters, at most {_MAX_VALUE} are taken",
                                name[:_MAX_NAME])
    params = [(k, v) for k, v in params if len(k) <= _MAX_NAME]  # (lenient: a name no parameter has is ignored)
    if lenient:  # the parameters this search does not take, and modifiers it does not know: ignored, and said
        known_here = SEARCH_PARAMS.get(rtype, {})
        kept_params = []
        for name, value in params:
            base, _, modifier = name.partition(":")
            if known_here.get(PARAM_ALIASES.get(name, name)) is not None:  # a name, or a spelling of one
                supported = True
            else:  # a modifier: :exact and :contains of a string parameter (as Store.search reads them)
                supported = bool(modifier) and known_here.get(PARAM_ALIASES.get(base, base)) == "string" \
                    and modifier in ("exact", "contains")
            if supported:
                kept_params.append((name, value))
            else:
                ignored.append(Issue("warning", "not-supported", name[:_MAX_NAME],
                                     f"ignored (Prefer: handling=lenient): search parameter {shown(name)} is not "
                                     f"supported for {rtype}"))
        params = kept_params
    # a reference written as this server's absolute URL is the resource here (Patient/123)
    heres = {public_root() + "/fhir/", request.url_root.rstrip("/") + "/fhir/"}
    kinds = SEARCH_PARAMS.get(rtype, {})
    for here in heres:
        params = [(k, ",".join(part.removeprefix(here) for part in v.split(","))
                   if kinds.get(PARAM_ALIASES.get(k, k)) == "reference" and here in v else v) for k, v in params]
    try:
        sort = _sort_of(args)
        check_sort(rtype, sort)  # (here, before the search: lenient handling searches without it)
    except InvalidSearch as exc:
        ignore_if_lenient(exc)
        sort = []
    store = pipeline_of(current_app).store
    # the pages after the first read the resources stored when the first was made: results stored meanwhile do
    # not shift them (each resource once, page after page); a new search sees them
    up_to = (_int_param("_page_until", 0, 0, 2 ** 62, args) if args.get("_page_until") is not None
             else store.last_row())
    # and each starts after the last resource of the one before (its sort keys, in the next link), not at a count
    # of resources: a resource before it that left the search meanwhile (a report superseded by a correction)
    # makes none skipped (one updated meanwhile moves with its _lastUpdated: see Store.search). One resource more
    # is read to know whether a page follows.
    after_text = args.get("_page_after")
    after = _page_after(after_text) if after_text is not None else None
    result = store.search(rtype, params, count=count + 1 if count else 0, offset=0 if after is not None else offset,
                          strict=not lenient, sort=sort, up_to=up_to, after=after)
    more = len(result.resources) > count
    del result.resources[count:]
    last_keys = result.keys[count - 1] if count and len(result.keys) >= count else None
    try:
        included, cut = _included(rtype, args, result.resources)
    except InvalidSearch as exc:
        ignore_if_lenient(exc)
        included, cut = [], False
    elements = _elements_of(rtype, args)
    asked = [] if result.resources else _patients_asked(rtype, params)
    if not result.resources and not asked and rtype == "Patient":
        # a search of Patient is recorded whatever its criteria (a name and a birth date, a count): one that
        # returns no Patient (none found, _count=0, _summary=count) names whom it asked about by its criteria
        from gateway.audit.records import PatientRef

        asked = [PatientRef(reference=_criteria_reference(rtype, params))]
    if result.resources or asked:
        _audit_reads(result.resources + included, request.query_string.decode("utf-8", "replace")
                     if request.method == "GET" else urlencode(list(args.items(multi=True))), asked)
    base = public_root() + "/fhir"
    known = SEARCH_PARAMS[rtype]
    kept = [(k, v) for k, v in params if PARAM_ALIASES.get(k, k) in known
            or known.get(k.partition(":")[0]) == "string"]  # (with a modifier: :exact, :contains)
    kept += [(k, v) for k in ("_include", "_revinclude", "_sort", "_elements") for v in args.getlist(k)]

    if shape is not None:
        kept.append(("_summary", shape))

    def link(off: int, page_after: str | None = None) -> str:
        paging = ([("_summary", "count")] if summary else
                  [("_count", str(count)), ("_offset", str(off)), ("_page_until", str(up_to))])
        if page_after is not None:
            paging.append(("_page_after", page_after))
        return f"{base}/{rtype}?" + urlencode(kept + paging)

    links = [{"relation": "self", "url": link(offset, after_text)}]
    if count and more and last_keys is not None:
        links.append({"relation": "next", "url": link(offset + count, _keys_text(last_keys))})
    if count and offset > 0:
        links.append({"relation": "previous", "url": link(max(0, offset - count))})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": result.total, "link": links}
    if result.resources:
        bundle["entry"] = [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
                            "resource": _summarised(r, shape) if shape is not None else
                            r if elements is None else _subset(r, elements),
                            "search": {"mode": "match"}} for r in result.resources]
        bundle["entry"] += [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
                             "resource": _summarised(r, shape) if shape is not None else r,
                             "search": {"mode": "include"}} for r in included]
    said = ([fewer] if fewer is not None and not summary else []) + ignored
    if cut:
        said.append(Issue(
            "warning", "too-costly", "_include", f"_include and _revinclude would add more than {_MAX_INCLUDED} "
            f"resources to this page: the first {_MAX_INCLUDED} are included; ask for fewer matches per page "
            "(_count) to have all of them"))
    if said:  # said in the page itself (R4: an OperationOutcome entry of search mode "outcome"), never silently
        bundle.setdefault("entry", []).append({"resource": operation_outcome(said), "search": {"mode": "outcome"}})
    return fhir_response(bundle)


def _instant_param(name: str, text: str) -> float:
    """Seconds since 1970 (UTC) of an instant a client sends (``_since``): a FHIR instant, a dateTime with a time
    zone, or a date (its first moment, China time).

    :raises InvalidSearch: not such a time.
    """
    from gateway.datetimes import DateTimeError, parse_fhir_datetime

    problem = InvalidSearch(f"{name} must be an instant such as 2026-12-01T08:00:00+08:00 or a date such as "
                            f"2026-12-01, not {shown(text[:64])}", name)
    if len(text) > 40 or not _HISTORY_UNTIL.fullmatch(text) or not text[:4].isdigit():
        raise problem
    try:
        when = parse_fhir_datetime(text)
    except DateTimeError:
        raise problem from None
    if when.tzinfo is None:
        raise InvalidSearch(f"{name} {shown(text)} has a time without a time zone: add one (+08:00, Z)", name)
    return when.timestamp()


def _keys_text(keys: list[Any]) -> str:
    """A page's last sort keys as its next link carries them (``_page_after``): JSON, base64url without padding."""
    return base64.urlsafe_b64encode(jsonutil.dumps(keys).encode("utf-8")).decode("ascii").rstrip("=")


def _page_after(text: str) -> list[Any]:
    """The sort keys a next link carries (:func:`_keys_text`).

    :raises InvalidSearch: not such keys (a link edited or cut).
    """
    problem = InvalidSearch("_page_after is not one this server's next links carry (cut or changed?): follow the "
                            "link as given, or start the search again", "_page_after")
    if len(text) > _MAX_PAGE_AFTER:
        raise problem
    try:
        keys = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))  # (numbers as floats, as sent)
    except Exception:  # noqa: BLE001 - whatever the text is, it is not ours
        raise problem from None
    if not isinstance(keys, list) or not keys or not all(k is None or type(k) in (str, int, float) for k in keys):
        raise problem
    try:  # (a lone surrogate, \ud800, is no text a database holds)
        for key in keys:
            if type(key) is str:
                key.encode("utf-8")
    except UnicodeEncodeError:
        raise problem from None
    return keys  # (each key's type and range are checked against the search's order by the store)


def _elements_of(rtype: str, args: MultiDict[str, str]) -> set[str] | None:
    """The elements ``_elements=code,valueQuantity`` asks for (``Observation.code`` also taken); None: all.

    :raises InvalidSearch: not an element name.
    """
    values = args.getlist("_elements")
    if not values:
        return None
    names: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = part.strip().removeprefix(f"{rtype}.").removesuffix("[x]")
            if not _ELEMENT.fullmatch(name):
                raise InvalidSearch(f"_elements: {shown(part)} is not an element name of {rtype} "
                                    "(e.g. _elements=code,valueQuantity)", "_elements")
            names.add(name)
    return names


def _asked(key: str, elements: set[str]) -> bool:
    """Whether the JSON member ``key`` is among the elements asked for: by its name, or by the name of the choice
    element it is a type of (``value`` asks for ``valueQuantity``, ``effective`` for ``effectiveDateTime``)."""
    if key in elements:
        return True
    return any(name in _CHOICE_ROOTS and key.startswith(name) and key[len(name):] in _CHOICE_TYPES
               for name in elements)


#: The choice elements (``[x]``) of the resources this server holds: Observation's value and effective,
#: DiagnosticReport's effective, Patient's deceased and multipleBirth.
_CHOICE_ROOTS = frozenset({"value", "effective", "deceased", "multipleBirth"})


#: The data types a choice element (``value[x]``, ``effective[x]``, ...) is named with after its own name.
_CHOICE_TYPES = frozenset({
    "Quantity", "CodeableConcept", "String", "Boolean", "Integer", "Range", "Ratio", "SampledData", "Time",
    "DateTime", "Period", "Attachment", "Reference", "Instant", "Date", "Decimal", "Coding", "Identifier", "Uri",
    "Url", "Canonical", "Code", "Age", "Duration", "Money", "Annotation", "Timing", "Markdown", "Base64Binary",
    "PositiveInt", "UnsignedInt", "HumanName", "Address", "ContactPoint", "Signature", "Oid", "Id", "Uuid",
})


def _subset(res: dict[str, Any], elements: set[str]) -> dict[str, Any]:
    """The resource with only the elements asked for and the mandatory ones, marked SUBSETTED (R4 ``_elements``)."""
    keep = elements | {"resourceType", "id", "meta", *_MANDATORY.get(res["resourceType"], ())}
    subset = {k: v for k, v in res.items() if _asked(k, keep)}
    meta = dict(subset.get("meta", {}))
    meta["tag"] = [*meta.get("tag", []), _SUBSETTED]
    subset["meta"] = meta
    return subset


#: The ``_summary`` values that cut the resources down (``count`` gives the total alone, ``false`` them whole).
_SUMMARY_SHAPES = ("true", "text", "data")


def _summarised(res: dict[str, Any], shape: str) -> dict[str, Any]:
    """A resource as ``_summary=true`` (the elements R4 marks as summary), ``text`` (its narrative, identity and
    the elements R4 requires) or ``data`` (all but the narrative) has it, marked SUBSETTED."""
    rtype = res["resourceType"]
    if shape == "data":
        kept = {k: v for k, v in res.items() if k != "text"}
    else:
        chosen = r4_summary_elements().get(rtype, frozenset()) if shape == "true" else \
            {"id", "meta", "implicitRules", "text"} | r4_required_of(rtype)
        names = {n.removesuffix("[x]") for n in chosen}
        roots = {n for n in names if n not in res}  # (choice elements: value for valueQuantity)

        def wanted(key: str) -> bool:
            bare = key[1:] if key.startswith("_") else key  # (a primitive's extensions go with it)
            return bare in names or any(bare.startswith(r) and bare[len(r):len(r) + 1].isupper() for r in roots)

        kept = {k: v for k, v in res.items() if k == "resourceType" or wanted(k)}
    meta = dict(kept.get("meta", {}))
    meta["tag"] = [*meta.get("tag", []), _SUBSETTED]
    kept["meta"] = meta
    return kept


def _sort_of(args: MultiDict[str, str]) -> list[tuple[str, bool]]:
    """``_sort=-date,issued`` -> [("date", True), ("issued", False)] (``-`` for newest first)."""
    keys: list[tuple[str, bool]] = []
    for value in args.getlist("_sort"):
        for part in value.split(","):
            name = part.strip()
            if not name or name == "-":
                raise InvalidSearch(f"_sort={shown(value)} names no parameter (e.g. _sort=-date)", "_sort")
            keys.append((name.lstrip("-"), name.startswith("-")))
    return keys


def _include_spec(param: str, value: str) -> tuple[str, str, str | None]:
    """``Source:element[:Target]`` of an ``_include`` or ``_revinclude`` value, checked against what we follow.

    :raises InvalidSearch: not of that form, or a reference the gateway does not follow.
    """
    parts = value.split(":")
    followed = ", ".join(f"{source}:{name}" for source, names in INCLUDES.items() for name in names)
    if len(parts) not in (2, 3) or parts[1] not in INCLUDES.get(parts[0], {}):
        raise InvalidSearch(f"{param}={shown(value)} is not supported (supported: {followed})", param,
                            code="not-supported")
    target = parts[2] if len(parts) == 3 else None
    if target is not None and target != INCLUDES[parts[0]][parts[1]]:
        raise InvalidSearch(f"{param}={shown(value)}: {parts[0]}.{parts[1]} names a "
                            f"{INCLUDES[parts[0]][parts[1]]}, not {shown(target)}", param, code="not-supported")
    return parts[0], parts[1], target


def _included(rtype: str, args: MultiDict[str, str],
              matches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The resources ``_include`` and ``_revinclude`` add to a page of matches, each once, matches left out; for a
    SMART access token, only those of the types its scopes let it read (``system/{type}.r``). And whether some were
    left out, past :data:`_MAX_INCLUDED`.

    :raises InvalidSearch: an ``_include`` of another type's reference, or a reference the gateway does not follow.
    """
    store = pipeline_of(current_app).store
    seen = {(r["resourceType"], r["id"]) for r in matches}
    found: list[dict[str, Any]] = []
    scopes = current_principal().scopes
    granted = parse_scopes(scopes) if scopes is not None else None
    cut = False

    def add(resources: list[dict[str, Any]], maybe_more: bool = False) -> None:
        nonlocal cut
        cut = cut or maybe_more
        for res in resources:
            key = (res["resourceType"], res["id"])
            if granted is not None and not covers(granted, key[0], "r"):
                continue  # a SMART access token sees only the types it may read, included or not
            if key not in seen:
                if len(found) >= _MAX_INCLUDED:
                    cut = True
                    return
                seen.add(key)
                found.append(res)

    for value in args.getlist("_include"):
        source, element, _ = _include_spec("_include", value)
        if source != rtype:
            raise InvalidSearch(f"_include={shown(value)} follows a reference of {source}, but this search finds "
                                f"{rtype}", "_include", code="not-supported")
        refs: list[str] = []
        for res in matches:
            held = res.get(element)
            for ref in held if isinstance(held, list) else [held]:
                if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"] not in refs:
                    refs.append(ref["reference"])
        add(store.read_many(refs))
    for value in args.getlist("_revinclude"):
        source, element, _ = _include_spec("_revinclude", value)
        if INCLUDES[source][element] != rtype or not matches:
            continue  # it names no resource of this type: nothing to add
        referring = store.referencing(source, element, [f"{rtype}/{r['id']}" for r in matches], _MAX_INCLUDED + 1)
        add(referring[:_MAX_INCLUDED], maybe_more=len(referring) > _MAX_INCLUDED)
    return found, cut


__all__ = ["bp", "fhir_response", "FHIR_JSON", "stored_read"]
