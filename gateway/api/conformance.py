"""Conformance API: serve our implementation guide and validate against it over HTTP.

- ``GET /fhir/StructureDefinition/{id}``, ``/fhir/CodeSystem/{id}``, ``/fhir/ValueSet/{id}``:
  the guide's resources as published in ``profiles/``;
- ``GET /fhir/StructureDefinition?url=...`` (and CodeSystem, ValueSet): search by
  ``url`` (``url|version`` too), ``version``, ``_id`` or ``name``; a searchset Bundle;
- ``POST /fhir/{type}/$validate``: the body is the resource, or a ``Parameters``
  with ``resource`` (and optional ``profile``); a ``profile`` query parameter
  works as well. The answer is 200 with an OperationOutcome listing every
  issue, whether or not the resource is valid (FHIR ``$validate`` semantics).

The guide is loaded once, when the blueprint is registered (start-up), from
the settings' ``profiles_dir``; a broken guide stops the app with ConfigError.
:func:`capability_resources` gives the lead's CapabilityStatement its entries.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, request
from flask.blueprints import BlueprintSetupState

from gateway import jsonutil
from gateway.signing.canonical import parse_json
from gateway.api.errors import outcome_response, prefers_lenient
from gateway.auth import require_role
from gateway.errors import InputError, InvalidSearch, Issue, NotFound, ParseError, shown
from gateway.fhir.outcome import operation_outcome
from gateway.fhir.profiles import CONFORMANCE_TYPES, Guide, load_guide

__all__ = ["bp", "guide_of", "capability_resources", "supported_profiles"]

bp = Blueprint("conformance", __name__, url_prefix="/fhir")

_EXTENSION_KEY = "gateway.guide"
_SEARCH_PARAMS = ("url", "version", "_id", "name")
_PARAM_TYPES = {"url": "uri", "version": "token", "_id": "token", "name": "string"}
_VALIDATE_OPERATION = "http://hl7.org/fhir/OperationDefinition/Resource-validate"


@bp.record_once
def _load_guide(state: BlueprintSetupState) -> None:
    """Load (and compile) the guide at registration, so a bad guide fails start-up, not a request."""
    app = state.app
    if _EXTENSION_KEY not in app.extensions:
        settings = app.extensions.get("gateway.settings")
        directory = state.options.get("profiles_dir") or getattr(settings, "profiles_dir", None)
        app.extensions[_EXTENSION_KEY] = load_guide(directory)


def guide_of(app: Flask) -> Guide:
    """The guide an app serves (loaded when this blueprint was registered)."""
    return app.extensions[_EXTENSION_KEY]  # type: ignore[no-any-return]


def _fhir(body: dict[str, Any], status: int = 200) -> Response:
    return Response(jsonutil.dumps(body), status=status, mimetype="application/fhir+json")


def _read(rtype: str, rid: str) -> Response:
    resource = guide_of(current_app).get(rtype, rid)
    if resource is None:
        raise NotFound("is not part of the implementation guide", f"{rtype[:60]}/{rid[:64]}")
    return _fhir(resource)


_MAX_VALUE = 256  # characters of one search value (a canonical URL, a name); no answer echoes more


def _search(rtype: str) -> Response:
    lenient = prefers_lenient(request.headers.get("Prefer", ""))
    unknown = sorted(k for k in request.args if k not in _SEARCH_PARAMS and k not in _PAGING
                     and k not in ("_format", "_pretty"))
    if unknown and not lenient:
        raise InvalidSearch(f"is not a supported search parameter (supported: {', '.join(_SEARCH_PARAMS)})",
                            unknown[0][:60])
    args = {k: request.args[k] for k in _SEARCH_PARAMS if k in request.args}
    for name, value in args.items():
        if len(value) > _MAX_VALUE:  # the self link repeats every value: never an unbounded one
            raise InvalidSearch(f"value has {len(value)} characters, at most {_MAX_VALUE} are taken", name)
    found = guide_of(current_app).find(rtype, args.get("url"), args.get("version"))
    if "_id" in args:
        found = [r for r in found if r["id"] == args["_id"]]
    if "name" in args:
        # FHIR string search: case-insensitive, matches the start of the name
        found = [r for r in found if str(r.get("name", "")).lower().startswith(args["name"].lower())]
    from gateway.api.app import public_root

    base = public_root() + "/fhir"
    # the paging every search of this server takes: _count (with next links), _offset, _summary=count
    summary = request.args.get("_summary")
    if summary not in (None, "count", "false"):
        raise InvalidSearch(f"_summary={summary[:60]!r} is not supported (supported: _summary=count, "
                            "_summary=false)", "_summary", code="not-supported")
    count = 0 if summary == "count" else _whole("_count", len(found) or 1)
    offset = _whole("_offset", 0)
    page = found[offset:offset + count]

    def link(start: int) -> str:
        query = [*args.items(), *([("_summary", "count")] if summary == "count" else
                                  [("_count", str(count)), ("_offset", str(start))]
                                  if "_count" in request.args or start else [])]
        return f"{base}/{rtype}" + (f"?{urlencode(query)}" if query else "")

    links = [{"relation": "self", "url": link(offset)}]
    if count and offset + count < len(found):
        links.append({"relation": "next", "url": link(offset + count)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(found), "link": links}
    if page:
        bundle["entry"] = [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                           for r in page]
    if unknown:  # (lenient) what was ignored is said in the page, as every search of this server says it
        bundle.setdefault("entry", []).append({"resource": operation_outcome([
            Issue("warning", "not-supported", name[:60], f"ignored (Prefer: handling=lenient): search parameter "
                  f"{name[:60]!r} is not supported for {rtype}") for name in unknown]), "search": {"mode": "outcome"}})
    return _fhir(bundle)


_PAGING = ("_count", "_offset", "_summary")


def _whole(name: str, default: int) -> int:
    """A paging parameter: a whole number, 0 or more (``default`` when absent).

    :raises InvalidSearch: anything else.
    """
    text = request.args.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise InvalidSearch(f"{name} must be a whole number, 0 or more", name)
    return int(text)


# One static rule per type: more specific than the results API's /fhir/<type>/<id>, so these win.
def _add_routes(rtype: str) -> None:
    bp.add_url_rule(f"/{rtype}/<rid>", f"read_{rtype}", lambda rid: _read(rtype, rid), methods=["GET"])
    bp.add_url_rule(f"/{rtype}", f"search_{rtype}", lambda: _search(rtype), methods=["GET"])


for _type in CONFORMANCE_TYPES:
    _add_routes(_type)


def _parse_body() -> Any:
    body = request.get_data(cache=False)
    if not body.strip():
        raise ParseError("is empty: send the resource to validate, or a Parameters with a resource", "body",
                         code="required")
    try:
        # strict, as a submission is read: a key twice (FHIR JSON allows a property once), NaN, a lone surrogate
        payload = parse_json(body.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ParseError("is not UTF-8 text", "body") from None
    except ParseError as exc:
        raise ParseError(f"is not strict JSON: {exc.message}", "body") from None
    if jsonutil.nesting_depth(payload) > jsonutil.MAX_DEPTH:
        raise ParseError(f"is nested more than {jsonutil.MAX_DEPTH} levels deep", "body")
    return payload


@bp.post("/<rtype>/$validate")
def validate(rtype: str) -> Response:
    """``$validate``: every issue the posted resource has, as an OperationOutcome (200 even when invalid).

    :raises NotFound: ``rtype`` is not an R4 resource type.
    :raises InputError: no body, not JSON, no resource in the Parameters, or a resource of another type.
    """
    guide = guide_of(current_app)
    if rtype not in guide.resource_types:
        raise NotFound("is not an R4 resource type", rtype)
    return _validate_posted(guide, rtype, None)


@bp.route("/<rtype>/<rid>/$validate", methods=["GET", "POST"])
@require_role("submitter", "admin")
def validate_instance(rtype: str, rid: str) -> Response:
    """``$validate`` of one resource: the stored one (``GET``), or the posted one meant to replace it (``POST``).

    :raises NotFound: a type the gateway does not store, or (``GET``) no such resource.
    :raises InputError: (``POST``) as for the type level, or a resource with another id.
    """
    from gateway.api.app import pipeline_of
    from gateway.fhir.search import SEARCH_PARAMS

    if rtype not in SEARCH_PARAMS:
        raise NotFound(f"is not a resource type stored here (stored: {', '.join(sorted(SEARCH_PARAMS))})",
                       rtype[:60])
    guide = guide_of(current_app)
    if request.method == "POST":
        return _validate_posted(guide, rtype, rid)
    resource = pipeline_of(current_app).store.read(rtype, rid)
    return outcome_response(_issues(guide, resource, request.args.getlist("profile")), 200)


def _issues(guide: Guide, resource: Any, profiles: list[str]) -> list[Issue]:
    """Every issue of a resource: the guide's checks (base shape, R4's required bindings on codes, our profiles)."""
    return guide.validate(resource, profiles)


def _validate_posted(guide: Guide, rtype: str, rid: str | None) -> Response:
    """The issues of the posted resource, or of the ``resource`` parameter of a posted ``Parameters``."""
    payload = _parse_body()
    profiles = request.args.getlist("profile")
    resource = payload
    if isinstance(payload, dict) and payload.get("resourceType") == "Parameters" and rtype != "Parameters":
        resource = None
        for p in payload.get("parameter") or []:
            if not isinstance(p, dict):
                continue
            if p.get("name") == "resource":
                resource = p.get("resource")
            elif p.get("name") == "profile":
                value = p.get("valueUri") or p.get("valueCanonical")
                if isinstance(value, str):
                    profiles.append(value)
        if resource is None:
            raise InputError("has no parameter 'resource' holding the resource to validate", "Parameters.parameter")
    posted = resource.get("resourceType") if isinstance(resource, dict) else None
    if isinstance(posted, str) and posted != rtype:
        raise InputError(f"is {posted!r}, but this is {rtype}/$validate", "resourceType")
    if rid is not None and isinstance(resource, dict) and resource.get("id") not in (None, rid):
        raise InputError(f"is {shown(str(resource.get('id')))}, but this is {rtype}/{rid}/$validate", "id")
    return outcome_response(_issues(guide, resource, profiles), 200)


# ------------------------------------------------------------------ for the CapabilityStatement


def supported_profiles(app: Flask) -> dict[str, list[str]]:
    """Resource type -> canonical URLs of the guide's profiles for it (``supportedProfile``)."""
    return guide_of(app).supported_profiles()


def capability_resources(app: Flask) -> list[dict[str, Any]]:
    """CapabilityStatement ``rest.resource`` entries for what this blueprint serves.

    One entry per conformance resource type (read, search by url/version/_id/name),
    and for every profiled type its ``supportedProfile`` list and the ``$validate``
    operation; merge these into the entries the results API already lists.
    """
    out: list[dict[str, Any]] = []
    for rtype in CONFORMANCE_TYPES:
        out.append({
            "type": rtype,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [{"name": n, "type": _PARAM_TYPES[n]} for n in _SEARCH_PARAMS],
        })
    for rtype, urls in sorted(supported_profiles(app).items()):
        out.append({
            "type": rtype,
            "supportedProfile": urls,
            "operation": [{"name": "validate", "definition": _VALIDATE_OPERATION}],
        })
    return out
