"""Audit API: what auditors read (AuditEvent search, statistics) and checkpoint exchange.

====================================  ===========================  =============================================
``GET  /fhir/AuditEvent``             auditor, admin               FHIR search (``gateway.audit.query``), searchset
``GET  /fhir/AuditEvent/<id>``        auditor, admin               one AuditEvent (``/_history``: its history,
                                                                   one version; ``/_history/1``: that version)
``GET  /audit/stats``                 auditor, admin               互认率 and other figures as JSON (``date`` filter)
``GET  /audit/checkpoints``           auditor, admin, peer         this gateway's signed checkpoints (``?latest=1``;
                                                                   ``?member=USCC``: a peer's we hold)
``POST /audit/checkpoints``           admin (no body): make one    a peer's checkpoint document: verify and hold it
                                      peer, admin (with body)
====================================  ===========================  =============================================

Every read of the log is itself written to the log (BALP Query / Read), after
the read and before the answer: an answer the log does not record is not
given. The app provides ``extensions["gateway.settings"]`` and may provide
``"gateway.clock"`` (else the pipeline's clock), ``"gateway.audit.signer"`` (a
:class:`gateway.audit.checkpoint.Signer`) and ``"gateway.trust"`` (a
:class:`gateway.signing.trust.TrustSource` for peers' checkpoints).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import urlencode

from flask import Blueprint, Response, current_app, request

from gateway import jsonutil
from gateway.api.app import borrow_database, public_root
from gateway.api.errors import check_total_hint, prefers_lenient
from gateway.audit import checkpoint, query, records, stats
from gateway.audit.log import append, get
from gateway.auth import current_principal, principal_party, require_role
from gateway.config import Settings
from gateway.errors import ConfigError, InputError, InvalidSearch, Issue, NotFound, shown
from gateway.store.db import Database, transaction

__all__ = ["bp"]

bp = Blueprint("audit", __name__)

_MAX_NAME = 60  # characters of a search parameter's name: no parameter has more
_MAX_VALUE = 256  # characters of one search value: answers (self links, issues) never echo more


@bp.after_request
def _challenge(response: Response) -> Response:
    """RFC 6750: a 401 says which scheme to use."""
    if response.status_code == 401:
        response.headers.setdefault("WWW-Authenticate", 'Bearer realm="gateway"')
    return response


def _settings() -> Settings:
    return current_app.extensions["gateway.settings"]  # type: ignore[no-any-return]


def _clock() -> Callable[[], _dt.datetime]:
    clock = current_app.extensions.get("gateway.clock")
    if clock is None:
        clock = getattr(current_app.extensions.get("gateway.pipeline"), "clock", None)
    if clock is None:
        tz = query.parse_offset(_settings().timezone)
        return lambda: _dt.datetime.now(tz)
    return clock  # type: ignore[no-any-return]


@contextmanager
def _db() -> Iterator[Database]:
    """The request's connection to the gateway database, given back after it (:meth:`gateway.member.Member.borrow`)."""
    with borrow_database(current_app) as db:
        yield db


def _json(body: Any, status: int = 200, mimetype: str = "application/fhir+json") -> Response:
    return Response(jsonutil.dumps(body), status=status, mimetype=mimetype)


def _gateway() -> records.Party:
    s = _settings()
    return records.Party.member(s.issuer_uscc, s.issuer_name)


def _record_read(
    db: Database,
    *,
    interaction: Literal["search-type", "read", "operation"],
    results: int | None = None,
    patient: records.PatientRef | None = None,
    resource: str | None = None,
) -> None:
    """Write the audit entry of this request's look into the log (its own transaction)."""
    principal = current_principal()
    gateway = _gateway()
    agent = request.user_agent.string[:200] or "unknown client"
    record = records.audit_query(
        at=_clock()(),
        gateway=gateway,
        server_address=public_root(),
        client=records.Party.member(principal.member) if principal.member else records.Party("", display=agent),
        client_address=request.remote_addr or "unknown",
        user=principal_party(principal, gateway.value),
        user_roles=sorted(principal.roles),
        query=f"{request.method} {request.full_path.rstrip('?')}",
        interaction=interaction,
        patient=patient,
        results=results,
        resource=resource,
    )
    with transaction(db):
        append(db, record)


@bp.get("/fhir/AuditEvent")
@require_role("auditor", "admin")
def search_events() -> Response:
    """Search the audit log (FHIR search on AuditEvent); 400 names an unknown or malformed parameter."""
    tz = query.parse_offset(_settings().timezone)
    params = list(request.args.items(multi=True))
    ignored: list[str] = []
    if prefers_lenient(request.headers.get("Prefer", "")):  # (R4 search.html#errors: the client's choice)
        kept = {*query.PARAMETERS, "_format", "_pretty"}
        ignored = sorted({name for name, _ in params if name not in kept})
        params = [(name, value) for name, value in params if name in query.PARAMETERS]
    check_total_hint([value for name, value in params if name == "_total"])
    params = [(name, value) for name, value in params if name != "_total"]
    for name, value in params:
        if len(name) > _MAX_NAME:
            raise InvalidSearch(f"unknown search parameter {shown(name)} for AuditEvent", name[:_MAX_NAME],
                                code="not-supported")
        if len(value) > _MAX_VALUE:  # the self link repeats every value: never an unbounded one
            raise InvalidSearch(f"value has {len(value)} characters, at most {_MAX_VALUE} are taken", name)
    search = query.parse_search(params, tz=tz)
    base = public_root() + "/fhir"
    with _db() as db:
        page = query.run(db, search)
        if page.total is None:  # every searchset says how many match, not only _count=0
            page = query.Page(page.entries, page.next, query.count(db, search, page.upto), page.upto)
        events = [e.event() for e in page.entries]
        _record_read(
            db,
            interaction="search-type",
            results=len(events) if page.total is None else page.total,
            patient=search.patient(),
        )
    bundle = query.searchset(page, search, base_url=base, path=f"{base}/AuditEvent", events=events)
    if ignored:  # said in the page, as every search of this server says what it ignored (never silently)
        from gateway.fhir.outcome import operation_outcome

        bundle.setdefault("entry", []).append({"resource": operation_outcome([
            Issue("warning", "not-supported", name[:_MAX_NAME], f"ignored (Prefer: handling=lenient): search "
                  f"parameter {shown(name[:_MAX_NAME])} is not supported for AuditEvent") for name in ignored]),
            "search": {"mode": "outcome"}})
    return _json(bundle)


@bp.get("/fhir/AuditEvent/<event_id>")
@require_role("auditor", "admin")
def read_event(event_id: str) -> Response:
    """One AuditEvent by id; 404 when there is none."""
    with _db() as db:
        event = get(db, event_id).event()
        _record_read(db, interaction="read", resource=f"AuditEvent/{event['id']}")
    return _json(event)


@bp.get("/fhir/AuditEvent/<event_id>/_history/<vid>")
@require_role("auditor", "admin")
def vread_event(event_id: str, vid: str) -> Response:
    """An AuditEvent's one version (an entry of the log is never changed: version 1); 404 for any other."""
    if vid != "1":
        raise NotFound(f"AuditEvent/{event_id[:40]} has no version {vid[:20]!r}: an audit entry is never changed, "
                       "its one version is 1", f"AuditEvent/{event_id[:40]}")
    return read_event(event_id)


@bp.get("/fhir/AuditEvent/<event_id>/_history")
@require_role("auditor", "admin")
def history_event(event_id: str) -> Response:
    """An AuditEvent's history (R4 history-instance), for whoever may read it (auditors, admins): a history Bundle
    of its one version.

    An entry of the audit log is never changed (the log is append-only, each entry chained to the one before), so
    AuditEvents are served as versioned resources whose history is version 1 alone: what ``GET
    /fhir/AuditEvent/{id}`` and ``/_history/1`` read, created when it was ``recorded``. Rather than answer that the
    type keeps no history, its history is served consistently with those reads: the same roles, the same 404 for
    an entry there is none of, and the look written to the log as a read is. (It was answered 403 naming the roles
    of the results' history, which auditors do not have.) ``_since`` later than the entry leaves it out; ``_count=0``
    gives the total alone.

    :raises NotFound: no such entry.
    :raises InvalidSearch: a parameter a history does not take (strict handling), or a malformed one.
    """
    lenient = prefers_lenient(request.headers.get("Prefer", ""))
    for name in request.args:
        if name not in ("_count", "_since", "_format", "_pretty", "_total") and not lenient:
            raise InvalidSearch(f"parameter {shown(name[:_MAX_NAME])} is not supported for _history (supported: "
                                "_count, _since)", name[:_MAX_NAME], code="not-supported")
    check_total_hint(request.args.getlist("_total"))
    count = request.args.get("_count", "1").strip()
    if not count.isascii() or not count.isdigit() or len(count) > 12:
        raise InvalidSearch(f"_count must be a whole number, 0 or more, not {shown(count[:20])}", "_count")
    with _db() as db:
        event = get(db, event_id).event()
        _record_read(db, interaction="read", resource=f"AuditEvent/{event['id']}")
    since = request.args.get("_since")
    listed = since is None or _not_before(str(event.get("recorded", "")), since)
    base = public_root() + "/fhir"
    asked = [(k, v) for k, v in request.args.items(multi=True) if k in ("_count", "_since")]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": 1 if listed else 0, "link": [
        {"relation": "self", "url": f"{base}/AuditEvent/{event['id']}/_history"
         + (f"?{urlencode(asked)}" if asked else "")}]}
    if listed and int(count) > 0:
        response = {"status": "201 Created", "etag": 'W/"1"'}
        if event.get("recorded"):
            response["lastModified"] = event["recorded"]
        bundle["entry"] = [{"fullUrl": f"{base}/AuditEvent/{event['id']}", "resource": event,
                            "request": {"method": "POST", "url": "AuditEvent"}, "response": response}]
    return _json(bundle)


def _not_before(recorded: str, since: str) -> bool:
    """Whether an entry was ``recorded`` at or after the instant ``_since`` names (R4 history ``_since``).

    :raises InvalidSearch: ``_since`` is not an instant with a time zone, or a date.
    """
    from gateway.datetimes import DateTimeError, parse_fhir_datetime

    problem = InvalidSearch(f"_since must be an instant such as 2026-12-01T08:00:00+08:00 or a date such as "
                            f"2026-12-01, not {shown(since[:64])}", "_since")
    if len(since) > 40 or not since[:4].isdigit():
        raise problem
    try:
        when = parse_fhir_datetime(since)
        made = parse_fhir_datetime(recorded)
    except DateTimeError:
        raise problem from None
    if when.tzinfo is None:  # (a date is its first moment, China time; an entry is recorded with its offset)
        raise InvalidSearch(f"_since {shown(since)} has a time without a time zone: add one (+08:00, Z)", "_since")
    return bool(made >= when)


@bp.get("/fhir/AuditEvent/_history")
@require_role("auditor", "admin")
def history_events() -> Response:
    """The history of every AuditEvent (R4 history-type) is not served: each entry's history is its one version
    (``GET /fhir/AuditEvent/{id}/_history``), and a search of the log by ``date`` lists them all (404, said so;
    it was read as the entry with the id ``_history``)."""
    raise NotFound("is not served (the history of every AuditEvent): an audit entry is never changed, so its "
                   "history is its one version (GET /fhir/AuditEvent/{id}/_history); search the log by date "
                   "(GET /fhir/AuditEvent?date=ge2026-11-01&_count=50) to list the entries", "AuditEvent/_history",
                   code="not-supported")


@bp.get("/audit/stats")
@require_role("auditor", "admin")
def statistics() -> Response:
    """互认率 by issuer, receiver, item, catalogue and month; refusals, overrides, lookups (JSON): the figures
    ``gateway audit stats --json`` gives for the same selection (names, fees and alliances from this gateway's
    registry snapshot and fee table).

    ``date`` (repeatable, FHIR date prefixes and partial dates) limits the period; ``by`` (repeatable,
    comma-separated dimensions) adds cross views; ``issuer``, ``receiver``, ``item``, ``catalogue``, ``alliance``
    narrow the selection, once each.
    """
    from gateway.commands.audit import (fee_table, registry_names, registry_provinces,  # what the command uses
                                        registry_scopes)

    settings = _settings()
    tz = query.parse_offset(settings.timezone)
    dates: list[tuple[Any, ...]] = []
    views: list[tuple[str, ...]] = []
    chosen: dict[str, str] = {}
    for name, value in request.args.items(multi=True):
        if name == "date":
            dates.append(tuple(query.parse_date(v, tz) for v in value.split(",")))
        elif name == "by":
            views.append(tuple(d.strip() for d in value.split(",") if d.strip()))
        elif name in stats.SELECTABLE:
            if name in chosen:
                raise InvalidSearch(f"{name} is given twice (one value each)", name)
            chosen[name] = _selected(name, value)
        else:
            raise InvalidSearch(f"unknown parameter {shown(name)} for statistics (date, by, "
                                f"{', '.join(stats.SELECTABLE)})", name[:_MAX_NAME], code="not-supported")
    fees = fee_table(settings, None)
    with _db() as db:
        figures = stats.compute(db, dates, selection={k: v for k, v in chosen.items() if v}, by=views,
                                names=registry_names(settings), fees=fees, alliances=registry_scopes(settings),
                                provinces=registry_provinces(settings))
        _record_read(db, interaction="operation")
    from gateway.audit.watch import summary  # the background's last walk of the log: is it still as written?
    from gateway.heartbeat import run_dir

    figures["log_check"] = summary(run_dir(settings))
    return _json(figures, mimetype="application/json")


def _selected(name: str, value: str) -> str:
    """A selection value as the command takes it: an issuer or receiver is a 统一社会信用代码 (checked)."""
    from gateway.errors import IdentifierError
    from gateway.identifiers import check_uscc

    if name not in ("issuer", "receiver") or not value.strip():
        return value.strip()
    try:
        return check_uscc(value)
    except IdentifierError as exc:
        raise InvalidSearch(str(exc), name) from None


@bp.get("/audit/checkpoints")
@require_role("auditor", "admin", "peer")
def list_checkpoints() -> Response:
    """This gateway's signed checkpoints, oldest first (``latest=1``: the newest only; ``member``: a peer's we hold)."""
    member = request.args.get("member")
    latest = request.args.get("latest") in ("1", "true")
    for name in request.args:
        if name not in ("member", "latest"):
            raise InvalidSearch(f"unknown parameter {shown(name)} (member, latest)", name[:_MAX_NAME],
                                code="not-supported")
    with _db() as db:
        if member:
            held = checkpoint.checkpoints(db, own=False, member=member)
        else:
            held = checkpoint.checkpoints(db, own=True)
    docs = [cp.as_json() for cp in held]
    if latest:
        docs = docs[-1:]
    return _json(docs, mimetype="application/json")


@bp.post("/audit/checkpoints")
@require_role("admin", "peer")
def post_checkpoint() -> Response:
    """Without a body (admin): sign a checkpoint of this log now.

    With a peer's checkpoint document (peer, admin): verify it and hold it.
    """
    principal = current_principal()
    body = request.get_data()
    now = _clock()()
    with _db() as db:
        if not body.strip():
            if "admin" not in principal.roles:
                raise InputError("send the checkpoint document to hold; only an admin makes this gateway's own", "body")
            signer = current_app.extensions.get("gateway.audit.signer")
            if signer is None:
                raise ConfigError("no signing key is configured for audit checkpoints", "gateway.audit.signer")
            made = checkpoint.make(db, signer, at=now)
            return _json(made.as_json(), 201, "application/json")
        try:
            doc = json.loads(body)
        except ValueError:
            raise InputError("the body is not a JSON checkpoint document", "body") from None
        trust = current_app.extensions.get("gateway.trust")
        if trust is None:
            raise ConfigError("no trust list is configured to verify peers' checkpoints", "gateway.trust")
        held = checkpoint.import_peer(db, doc, trust, now=now, me=_settings().issuer_uscc)
    return _json(held.as_json(), 201, "application/json")
