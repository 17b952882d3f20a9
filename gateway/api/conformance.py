"""Conformance API: serve our implementation guide and validate against it over HTTP.

- ``GET /fhir/StructureDefinition/{id}``, ``/fhir/CodeSystem/{id}``, ``/fhir/ValueSet/{id}``:
  the guide's resources as published in ``profiles/``;
- ``GET /fhir/StructureDefinition?url=...`` (and CodeSystem, ValueSet): search by
  ``url`` (``url|version`` too), ``version``, ``_id`` or ``name``; a searchset Bundle;
- ``GET /fhir/OperationDefinition/{id}`` (and its search, as above): the operations this gateway
  defines (``$recognize``), kept beside the guide in ``profiles/operations/``;
- ``POST /fhir/{type}/$validate``: the body is the resource, or a ``Parameters``
  with ``resource`` (and optional ``profile``); a ``profile`` query parameter
  works as well. The answer is 200 with an OperationOutcome listing every
  issue, whether or not the resource is valid (FHIR ``$validate`` semantics);
  a body sent as something else than FHIR JSON (a form, XML) is a 415 naming
  its Content-Type and what is taken.

The guide is loaded once, when the blueprint is registered (start-up), from
the settings' ``profiles_dir``; a broken guide stops the app with ConfigError,
and so does a broken OperationDefinition. :func:`capability_resources` gives the
lead's CapabilityStatement its entries, :func:`capability_operations` its
system-level operations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, request
from flask.blueprints import BlueprintSetupState

from gateway import jsonutil
from gateway.signing.canonical import parse_json
from gateway.api.errors import outcome_response, prefers_lenient
from gateway.auth import require_role
from gateway.errors import ConfigError, InputError, InvalidSearch, Issue, NotFound, ParseError, shown
from gateway.fhir.outcome import operation_outcome
from gateway.fhir.profiles import CONFORMANCE_TYPES, Guide, default_profiles_dir, has_errors, load_guide

__all__ = ["bp", "guide_of", "capability_resources", "capability_operations", "supported_profiles"]

bp = Blueprint("conformance", __name__, url_prefix="/fhir")

_EXTENSION_KEY = "gateway.guide"
_OPERATIONS_KEY = "gateway.operations"
#: Where, in the guide's directory, the OperationDefinitions of this gateway's operations are kept (a folder of
#: their own: the guide's loader takes StructureDefinitions, CodeSystems and ValueSets only).
OPERATIONS_DIR = "operations"
#: The conformance resources served here that are not the guide's.
_OPERATION_TYPE = "OperationDefinition"
_SEARCH_PARAMS = ("url", "version", "_id", "name")
_PARAM_TYPES = {"url": "uri", "version": "token", "_id": "token", "name": "string"}
_VALIDATE_OPERATION = "http://hl7.org/fhir/OperationDefinition/Resource-validate"


@bp.record_once
def _load_guide(state: BlueprintSetupState) -> None:
    """Load (and compile) the guide, and the gateway's OperationDefinitions, at registration, so a bad guide fails
    start-up, not a request."""
    app = state.app
    settings = app.extensions.get("gateway.settings")
    directory = state.options.get("profiles_dir") or getattr(settings, "profiles_dir", None)
    if _EXTENSION_KEY not in app.extensions:
        app.extensions[_EXTENSION_KEY] = load_guide(directory)
    if _OPERATIONS_KEY not in app.extensions:
        app.extensions[_OPERATIONS_KEY] = _load_operations(directory, app.extensions[_EXTENSION_KEY])


def _load_operations(directory: str | Path | None, guide: Guide) -> dict[str, dict[str, Any]]:
    """id -> OperationDefinition of the operations this gateway defines, from ``operations/`` in the guide's
    directory; from the shipped guide's when that directory has none (a hospital's copy of the guide made before
    there was one: the operations are the gateway's, whichever guide it serves).

    :raises ConfigError: a file that is not an OperationDefinition named ``OperationDefinition-<id>.json`` with the
        guide's canonical URL and version, or one with an error in R4's terms.
    """
    from gateway.naming import IG_BASE, IG_VERSION

    folder = Path(directory or default_profiles_dir()) / OPERATIONS_DIR
    if not folder.is_dir():
        folder = default_profiles_dir() / OPERATIONS_DIR
    held: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            res = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot be read: {exc}", str(path)) from None
        except ParseError as exc:
            raise ConfigError(f"is not valid JSON: {exc.message}", str(path)) from None
        rid = res.get("id") if isinstance(res, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != _OPERATION_TYPE or not isinstance(rid, str) \
                or path.name != f"{_OPERATION_TYPE}-{rid}.json":
            raise ConfigError(f"must hold one {_OPERATION_TYPE}, the file named {_OPERATION_TYPE}-<id>.json after "
                              "its id", str(path))
        if res.get("url") != f"{IG_BASE}/{_OPERATION_TYPE}/{rid}" or res.get("version") != IG_VERSION:
            raise ConfigError(f"url and version must be {IG_BASE}/{_OPERATION_TYPE}/{rid} and {IG_VERSION}",
                              str(path))
        problems = guide.validate(res)
        if has_errors(problems):
            first = next(i for i in problems if i.severity in ("error", "fatal"))
            raise ConfigError(f"is not a valid {_OPERATION_TYPE}: {first.location} {first.message}", str(path))
        held[rid] = res
    return held


def guide_of(app: Flask) -> Guide:
    """The guide an app serves (loaded when this blueprint was registered)."""
    return app.extensions[_EXTENSION_KEY]  # type: ignore[no-any-return]


def _operations(app: Flask) -> dict[str, dict[str, Any]]:
    """The OperationDefinitions an app serves, by id (loaded when this blueprint was registered)."""
    return app.extensions.get(_OPERATIONS_KEY) or {}


def _held(rtype: str, rid: str) -> dict[str, Any] | None:
    """One conformance resource served here: the guide's, or an OperationDefinition of this gateway."""
    if rtype == _OPERATION_TYPE:
        return _operations(current_app).get(rid)
    return guide_of(current_app).get(rtype, rid)


def _found(rtype: str, url: str | None, version: str | None) -> list[dict[str, Any]]:
    """The conformance resources of one type served here, optionally those with a canonical ``url`` (``url|version``
    too) and ``version``."""
    if rtype != _OPERATION_TYPE:
        return guide_of(current_app).find(rtype, url, version)
    if url and "|" in url and version is None:
        url, version = url.split("|", 1)
    return [r for r in _operations(current_app).values()
            if (url is None or r["url"] == url) and (version is None or r.get("version") == version)]


def _fhir(body: dict[str, Any], status: int = 200) -> Response:
    return Response(jsonutil.dumps(body), status=status, mimetype="application/fhir+json")


def _read(rtype: str, rid: str) -> Response:
    resource = _held(rtype, rid)
    if resource is None:
        raise NotFound("is not part of the implementation guide" if rtype != _OPERATION_TYPE else
                       "is not an operation this gateway defines", f"{rtype[:60]}/{rid[:64]}")
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
    found = _found(rtype, args.get("url"), args.get("version"))
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


for _type in (*CONFORMANCE_TYPES, _OPERATION_TYPE):
    _add_routes(_type)


def _parse_body() -> Any:
    """The posted resource (or Parameters) of ``$validate``, read as FHIR JSON.

    :raises UnsupportedMediaType: (415) sent as a form, XML, text or another FHIR version: said, naming the
        Content-Type and what is taken, not read as an empty or broken JSON body.
    :raises ParseError: empty, not UTF-8, not strict JSON, or nested too deep.
    """
    from gateway.api.fhir import require_fhir_json

    require_fhir_json("the resource to validate (or a Parameters holding it)")
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
    :raises UnsupportedMediaType: (415) a body sent as a form, XML, text or another FHIR version.
    :raises InputError: no body, not JSON, no resource in the Parameters, or a resource of another type.
    """
    guide = guide_of(current_app)
    if rtype not in guide.resource_types:
        raise NotFound("is not an R4 resource type", rtype)
    return _validate_posted(guide, rtype, None)


@bp.route("/<rtype>/<rid>/$validate", methods=["GET", "POST"])
@require_role("submitter", "admin")
def validate_instance(rtype: str, rid: str) -> Response:
    """``$validate`` of one resource: the stored one (``GET``, audited as a read of it is), or the posted one meant
    to replace it (``POST``).

    :raises NotFound: a type the gateway does not store, or (``GET``) no such resource.
    :raises UnsupportedMediaType: (``POST``) a body sent as a form, XML, text or another FHIR version (415).
    :raises InputError: (``POST``) as for the type level, or a resource with another id.
    """
    from gateway.api.fhir import stored_read
    from gateway.fhir.search import SEARCH_PARAMS

    if rtype not in SEARCH_PARAMS:
        raise NotFound(f"is not a resource type stored here (stored: {', '.join(sorted(SEARCH_PARAMS))})",
                       rtype[:60])
    guide = guide_of(current_app)
    if request.method == "POST":
        return _validate_posted(guide, rtype, rid)
    # the stored resource is read as GET /fhir/{type}/{id} reads it, and audited so: its 200 or 404 answers
    # whether a patient is held here
    resource = stored_read(rtype, rid)
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

    One entry per conformance resource type (read, search by url/version/_id/name; OperationDefinition too),
    and for every profiled type its ``supportedProfile`` list and the ``$validate``
    operation; merge these into the entries the results API already lists.
    """
    out: list[dict[str, Any]] = []
    for rtype in (*CONFORMANCE_TYPES, _OPERATION_TYPE):
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


def capability_operations(app: Flask) -> list[dict[str, Any]]:
    """CapabilityStatement ``rest.operation`` entries: the system-level operations this gateway defines
    (``$recognize``), each by its code and its OperationDefinition's canonical URL."""
    return [{"name": res["code"], "definition": res["url"]}
            for _, res in sorted(_operations(app).items()) if res.get("system") is True]
