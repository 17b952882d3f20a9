"""Registry API: the registry snapshot served as FHIR, the signed snapshot itself, and ``$recognize``.

- ``GET /registry/fhir/Organization[?identifier=[system|]value]``, ``/registry/fhir/Organization/<USCC>``;
- ``GET /registry/fhir/VerificationResult[?target=Organization/<USCC>]``, ``.../VerificationResult/<id>``;
- ``GET /registry/fhir/Endpoint[?organization=Organization/<USCC>]``, ``.../Endpoint/<id>``;
- ``GET /registry/snapshot``: the signed snapshot document as received, for passing on to peers;
- ``POST /fhir/$recognize``: Parameters in, Parameters out (see :mod:`gateway.recognition.fhir`).

The registry view has its own FHIR base (``/registry/fhir``) so that it never
shadows the results the gateway holds under ``/fhir``. Everything is read from
the snapshot in force (:class:`~gateway.registry.snapshot.RegistryHolder`); an
expired snapshot is refused, not served. :func:`install` attaches the holder,
the clock and (optionally) the database that stores decisions.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, request

from gateway import jsonutil
from gateway.errors import ConfigError, InputError, NotFound
from gateway.recognition.record import decide, decide_and_record
from gateway.recognition.signed import facts_to_decide
from gateway.recognition.fhir import decision_parameters, parse_recognize_parameters
from gateway.auth import current_principal, principal_party, require_role
from gateway.registry.fhir import registry_resources
from gateway.registry.models import Snapshot, china_date
from gateway.registry.snapshot import RegistryHolder
from gateway.signing.canonical import parse_json
from gateway.store.db import borrowed

__all__ = ["bp", "install", "RegistryState", "EXTENSION_KEY"]

log = logging.getLogger(__name__)

bp = Blueprint("registry", __name__)

#: Where :func:`install` keeps the registry state in ``app.extensions``.
EXTENSION_KEY = "gateway.registry"
_TYPES = ("Organization", "VerificationResult", "Endpoint", "Practitioner", "PractitionerRole")
_SEARCH = {
    "Organization": {"identifier", "_id"},
    "VerificationResult": {"target", "_id"},
    "Endpoint": {"organization", "_id"},
    "Practitioner": {"identifier", "_id"},
    "PractitionerRole": {"practitioner", "organization", "_id"},
}


#: How far ahead of this gateway's clock a ``$recognize`` ``at`` may be (the caller's clock running ahead).
_AT_AHEAD = _dt.timedelta(minutes=5)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


@dataclass
class RegistryState:
    """What the registry endpoints need: the snapshot holder, a clock and where decisions are stored."""

    holder: RegistryHolder
    clock: Callable[[], _dt.datetime] = _utcnow
    database: str | Path | None = None


def install(
    app: Flask,
    holder: RegistryHolder,
    *,
    clock: Callable[[], _dt.datetime] | None = None,
    database: str | Path | None = None,
) -> None:
    """Attach the registry state to ``app`` (register :data:`bp` separately).

    With ``database``, every ``$recognize`` decision is stored there.
    """
    app.extensions[EXTENSION_KEY] = RegistryState(holder, clock or _utcnow, database)


def _state() -> RegistryState:
    state = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, RegistryState):
        raise ConfigError("this gateway has no registry snapshot configured", "registry")
    return state


def _fhir(body: dict[str, Any], status: int = 200) -> Response:
    return Response(jsonutil.dumps(body), status=status, mimetype="application/fhir+json")


def _refreshed() -> RegistryState:
    """The registry state, a newly installed snapshot taken up first (another process of this gateway may have
    applied it: each process looks for itself, at most every few seconds)."""
    ex = current_app.extensions.get("gateway.exchange")
    if ex is not None:
        ex.refresh_registry()
    return _state()


def _snapshot_now() -> tuple[Snapshot, _dt.datetime]:
    state = _refreshed()  # the registry view shows a newly installed snapshot at once
    now = state.clock()
    return state.holder.snapshot_at(now), now


def _resources(rtype: str) -> list[dict[str, Any]]:
    if rtype not in _TYPES:
        raise NotFound(f"the registry serves {', '.join(_TYPES)}, not {rtype}", "type")
    snapshot, now = _snapshot_now()
    return registry_resources(snapshot, china_date(now))[rtype]


def _matches(rtype: str, resource: dict[str, Any], name: str, value: str) -> bool:
    if name == "_id":
        return bool(resource["id"] == value)
    if name == "identifier":
        system, _, code = value.rpartition("|")
        return any(
            i.get("value") == code and (not system or i.get("system") == system) for i in resource.get("identifier", [])
        )
    if name == "target":
        return any(t.get("reference") == value for t in resource.get("target", []))
    if name == "organization":
        org = resource.get("managingOrganization") or resource.get("organization") or {}
        return bool(org.get("reference") == value)
    if name == "practitioner":
        return bool(resource.get("practitioner", {}).get("reference") == value)
    return False


@bp.get("/registry/fhir/<rtype>")
def search(rtype: str) -> Response:
    """Search one resource type of the registry view (a searchset Bundle, all matches)."""
    resources = _resources(rtype)
    for name, value in request.args.items(multi=True):
        if name not in _SEARCH[rtype]:
            raise InputError(f"search parameter {name!r} is not supported on {rtype}", name, code="not-supported")
        resources = [r for r in resources if _matches(rtype, r, name, value)]
    from gateway.api.app import public_root

    # public_url builds every link (without it, the URL the request reached, as the FHIR API does): the Host
    # header is the caller's to write, and a self link naming its server was the request's own
    base = public_root() + "/registry/fhir"
    asked = urlencode(list(request.args.items(multi=True)))
    return _fhir(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "link": [{"relation": "self", "url": f"{base}/{rtype}" + (f"?{asked}" if asked else "")}],
            "entry": [
                {"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in resources
            ],
        }
    )


@bp.get("/registry/fhir/<rtype>/<rid>")
def read(rtype: str, rid: str) -> Response:
    """Read one resource of the registry view.

    :raises NotFound: no such type or id in the current snapshot.
    """
    for resource in _resources(rtype):
        if resource["id"] == rid:
            return _fhir(resource)
    raise NotFound(f"{rtype}/{rid} is not in the registry snapshot in force", f"{rtype}/{rid}")


@bp.get("/registry/snapshot")
@require_role("submitter", "peer", "auditor", "admin")
def snapshot_document() -> Response:
    """The signed registry snapshot in force, byte for byte as it was received: for this gateway's accounts only,
    as it carries the 身份证号 of the physicians it lists (signed, so it cannot be given without them; the registry
    as FHIR, open, leaves them out)."""
    _snapshot_now()  # refuses an expired one
    return Response(_state().holder.current_text, mimetype="application/json")


@bp.post("/fhir/$recognize")
@require_role("submitter", "admin")
def recognize() -> Response:
    """Decide recognition for every result of a Bundle: Parameters in, Parameters out."""
    state = _refreshed()  # decided by the registry in force, never by one a newer snapshot replaced
    bundle, receiver, asked = parse_recognize_parameters(parse_json(request.get_data()))
    now = state.clock()
    if asked is not None and asked > now + _AT_AHEAD:
        # a decision as of a moment to come would be stored, audited and counted in the figures as if it had been
        # made: a what-if, not a decision
        raise InputError(f"({asked.isoformat()}) is later than now "
                         f"({now.astimezone(asked.tzinfo).isoformat(timespec='seconds')}): a decision is made as of "
                         "now or an earlier moment", "Parameters.parameter:at")
    at = asked or now  # (without `at` the decision is made as of the moment it is recorded: no as-of of its own)
    snapshot = state.holder.snapshot_at(at)
    # the Bundle is a part of Parameters: its signature is checked over its own canonical text
    facts = facts_to_decide(jsonutil.dumps(bundle).encode("utf-8"), bundle, snapshot, at)
    if state.database is None:
        decisions = decide(facts, bundle, snapshot, receiver, at).decisions
    else:
        settings = current_app.extensions.get("gateway.settings")
        client = principal_party(current_principal(), settings.issuer_uscc if settings is not None else receiver)
        with borrowed(state.database) as db:  # decisions and their audit entries commit together
            decisions, _ = decide_and_record(db, facts, bundle, snapshot, receiver, at, recorded_at=now,
                                             client=client, client_address=request.remote_addr or "")
    log.info(
        "recognize: snapshot=%s results=%d recognized=%d",
        snapshot.version,
        len(decisions),
        sum(1 for d in decisions if d.outcome == "recognized"),
    )
    return _fhir(decision_parameters(decisions))
