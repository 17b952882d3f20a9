"""API errors: every error on the wire is one FHIR OperationOutcome.

One function builds the body for any list of issues and one shape is used
everywhere (checked by a test): ``issue[].severity``, ``code``,
``diagnostics`` (the readable line) and ``expression`` (the FHIRPath, HL7
field or parameter the issue is about). Unexpected exceptions become a 500
with a generic text; the stack trace goes to the server log, never to the client.
"""
from __future__ import annotations

import logging
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from gateway import jsonutil
from gateway.errors import DatabaseUnavailable, GatewayError, Issue
from gateway.logs import database_fault
from gateway.store import db as _db
from gateway.store.postgresql import disk_full
from gateway.fhir.outcome import operation_outcome

__all__ = ["operation_outcome", "outcome_response", "register_error_handlers", "FHIR_JSON", "check_total_hint",
           "prefers_lenient", "preferred_return"]

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json; charset=utf-8"


def outcome_response(issues: list[Issue], status: int, headers: dict[str, str] | None = None) -> Response:
    """An HTTP response carrying an OperationOutcome."""
    return Response(jsonutil.dumps(operation_outcome(issues)), status=status, mimetype="application/fhir+json",
                    headers=headers)


_HTTP_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               406: "not-supported", 413: "too-long", 415: "not-supported", 429: "throttled"}


def check_total_hint(values: list[str]) -> None:
    """``_total`` (R4 search.html#total) is a hint a server may ignore; every searchset here counts exactly, so
    only its value is checked.

    :raises InvalidSearch: a value R4 does not name.
    """
    from gateway.errors import InvalidSearch, shown

    for value in values:
        if value not in ("none", "estimate", "accurate"):
            raise InvalidSearch(f"_total must be none, estimate or accurate, not {shown(value[:40])}", "_total")


def prefers_lenient(prefer: str) -> bool:
    """Whether a ``Prefer`` header asks ``handling=lenient`` (RFC 7240: preferences are comma-separated tokens,
    case-insensitive, a value possibly quoted; ``handling=lenientx`` is not it)."""
    for preference in prefer.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "lenient":
            return True
    return False


#: The ``Prefer: return=`` values R4 names (http.html#ops), lower-cased, as R4 spells them.
_RETURNS = {"minimal": "minimal", "representation": "representation", "operationoutcome": "OperationOutcome"}


def preferred_return(prefer: str) -> str | None:
    """What a ``Prefer`` header asks a create or a transaction to answer with (R4 http.html#ops): ``minimal``,
    ``representation`` or ``OperationOutcome``; None when it asks for none of them (RFC 7240: a preference the
    server does not know is ignored; tokens are case-insensitive, a value possibly quoted)."""
    for preference in prefer.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() == "return":
            chosen = _RETURNS.get(value.strip().strip('"').lower())
            if chosen is not None:
                return chosen
    return None


def _database_away(reason: str, *, full: bool = False) -> Response:
    """503 (Retry-After 5) for a request the database could not serve now; the log says so once per ten seconds
    (:func:`gateway.logs.database_fault`), not once per request. ``full``: it answered, and refused a write for want
    of space."""
    database_fault(log, "request", "database unavailable for requests: %s", reason)
    text = ("the database refused the write: its disk is full (No space left on device); send the request again "
            "later" if full else "the database cannot be reached right now; send the request again later")
    if request.method not in ("GET", "HEAD"):
        text += " (what was already stored is recognised as a resend)"
    return outcome_response([Issue("error", "transient", "", text)], 503, {"Retry-After": "5"})


def _bearer_challenge(exc: GatewayError) -> str:
    """The ``WWW-Authenticate`` of a refusal (RFC 6750 3.1): plain ``Bearer`` when the request sent no credentials,
    ``error="invalid_request"`` for an Authorization header that is not one bearer token, ``error="invalid_token"``
    for a token unknown, revoked or expired, ``error="insufficient_scope"`` (403) with the scope the request needs.
    Empty for a 403 that is not about a token's scope (a role, a signature: nothing to say in the header)."""
    from gateway.auth import Forbidden, NotAuthenticated

    def quoted(text: str) -> str:  # a quoted-string holds no quote or backslash; kept to printable ASCII
        return "".join(c for c in text if " " <= c <= "~" and c not in '"\\')[:200]

    if isinstance(exc, Forbidden):
        return f'Bearer error="insufficient_scope", scope="{quoted(exc.scope)}"' if exc.scope else ""
    if exc.http_status != 401:
        return ""
    sent = request.headers.get("Authorization", "")
    if not isinstance(exc, NotAuthenticated) or not sent.lower().startswith("bearer"):
        return "Bearer"
    error = "invalid_request" if exc.location == "Authorization" and "one token" in exc.message else "invalid_token"
    return f'Bearer error="{error}", error_description="{quoted(exc.message)}"'


def register_error_handlers(app: Flask) -> None:
    """Make every error of ``app`` an OperationOutcome."""

    @app.errorhandler(GatewayError)
    def _gateway_error(exc: GatewayError) -> Response:
        if isinstance(exc, DatabaseUnavailable):  # its text names the database's role, host and port: the log's
            return _database_away(exc.message)
        # RFC 6750: a 401 says how to authenticate; a passing state (503) when to try again
        challenge = _bearer_challenge(exc) if exc.http_status in (401, 403) else ""
        headers = ({"WWW-Authenticate": challenge} if challenge
                   else {"Retry-After": "5"} if exc.http_status == 503
                   else {"Retry-After": str(getattr(exc, "retry_after", 60))} if exc.http_status == 425 else None)
        return outcome_response(exc.issues(), exc.http_status, headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if request.path == "/console" or request.path.startswith("/console/"):  # a page a person opened
            from gateway.console.views import error_page
            return error_page(exc)
        code = exc.code or 500
        text = exc.description or exc.name
        if code == 405:  # said for this request: which method, and what the resource takes
            allowed = ", ".join(sorted(m for m in getattr(exc, "valid_methods", None) or () if m != "OPTIONS"))
            text = (f"{request.method} is not supported on {request.path[:200]}"
                    + (f"; it takes {allowed}" if allowed else "")
                    + (" (results change only by the messages and corrections their senders send)"
                       if request.path.startswith("/fhir") and request.method in ("PUT", "PATCH", "DELETE") else ""))
        # the exception's own headers, Allow on a 405 first (RFC 9110: a 405 says which methods the resource takes)
        kept = {k: v for k, v in exc.get_headers() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return outcome_response([Issue("error", _HTTP_CODES.get(code, "exception"), "", text)], code, kept or None)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, _db.OperationalError):  # the database is gone, restarting, locked or full: a passing state
            return _database_away(_db.fault_reason(exc) or type(exc).__name__, full=disk_full(exc))
        log.exception("unexpected error handling a request")
        text = "internal error; the administrator can find details in the gateway log"
        return outcome_response([Issue("fatal", "exception", "", text)], 500)
