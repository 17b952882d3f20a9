"""Metrics API: ``GET /metrics`` for Prometheus, and a request id on every HTTP answer.

``GET /metrics`` answers the text exposition format (``prometheus_client``):
what every process of the gateway counted (:mod:`gateway.metrics`) and what
the database says now. Access is a setting: open (the default; serve the HTTP
port on an internal interface) or, with ``metrics_token_file``, only to a
scraper that sends ``Authorization: Bearer <the token in that file>``
(compared in constant time; anything else is a 401 OperationOutcome).

Every request gets an id: the caller's ``X-Request-Id`` when it is a short
token (a load balancer's), otherwise a new one. It is sent back in the
``X-Request-Id`` header and carried by every log line written while the
request is answered (:mod:`gateway.logs`), so an operator can find a caller's
request in the log. The request is counted by route template, never by path.
"""
from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from gateway import metrics
from gateway.api.app import pipeline_of
from gateway.api.errors import outcome_response
from gateway.config import Settings
from gateway.auth import NotAuthenticated
from gateway.errors import ConfigError, Issue
from gateway.logs import request_context, request_id

__all__ = ["bp", "REQUEST_ID_HEADER", "ENVIRON_ID", "ENVIRON_USER"]

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
#: WSGI environ keys shared with the access log (gateway.httpserver).
ENVIRON_ID = "gateway.request_id"
ENVIRON_USER = "gateway.user"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _NoToken(NotAuthenticated):
    """A scrape of /metrics without the configured token (HTTP 401)."""

    code = "login"
    http_status = 401


def _allowed(settings: Settings) -> None:
    """Let the scrape through, or raise.

    :raises _NoToken: a token is configured and the request does not carry it.
    :raises ConfigError: the token file cannot be read now (refused: never open by accident).
    """
    if not settings.metrics_token_file:
        return
    expected = metrics.read_token(settings).encode("utf-8")  # read each time: a changed token counts at once
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode("utf-8"), expected):
        raise _NoToken("GET /metrics needs Authorization: Bearer <the token in metrics_token_file>",
                       "Authorization")


@bp.get("/metrics")
def scrape() -> Response:
    """Every figure in Prometheus' text format."""
    settings: Settings = current_app.extensions["gateway.settings"]
    try:
        _allowed(settings)
    except ConfigError as exc:  # refused, and said where the operator looks: not to the caller
        log.error("GET /metrics refused: %s", exc.message)
        issue = Issue("error", "exception", "", "metrics are not available: the token file cannot be read "
                      "(see the gateway log)")
        return outcome_response([issue], 503)
    pipeline = pipeline_of(current_app)
    body = metrics.render(metrics.DatabaseFacts(pipeline), metrics.PartFacts(settings))
    return Response(body, status=200, headers={"Content-Type": metrics.CONTENT_TYPE, "Cache-Control": "no-store"})


# -- every request: its id, its user for the access log, its figures ---------------------------------


def _request_id() -> str:
    """This request's id: the one the access log gave it, a caller's well-formed one, or a new one."""
    environ = request.environ
    known = environ.get(ENVIRON_ID)
    if known:
        return str(known)
    rid = environ[ENVIRON_ID] = request_id(request.headers.get(REQUEST_ID_HEADER))
    return rid


def _user() -> str | None:
    """Whoever the request authenticated as, if anyone: an account's name (API token or console session), or
    ``member:USCC`` for another member's gateway calling the exchange with its signed client assertion."""
    principal = g.get("principal")
    if principal is None:
        principal = getattr(g.get("console"), "principal", None)
    name = getattr(principal, "name", None)
    if name:
        return str(name)
    peer = g.get("peer")
    return f"member:{peer}" if peer else None


@bp.before_app_request
def _begin() -> None:
    g.metrics_started = time.perf_counter()
    g.metrics_context = request_context.set({"request_id": _request_id()})


@bp.after_app_request
def _end(response: Response) -> Response:
    rid = _request_id()
    response.headers[REQUEST_ID_HEADER] = rid
    user = _user()
    if user:
        request.environ[ENVIRON_USER] = user
        context = request_context.get()
        if context is not None:
            context["user"] = user
    started = g.get("metrics_started")
    seconds = time.perf_counter() - started if started is not None else 0.0
    rule = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
    method = request.method if request.method in _METHODS else "OTHER"
    metrics.http_request(method, rule, response.status_code, seconds)
    return response


@bp.teardown_app_request
def _done(exc: Any) -> None:
    token = g.pop("metrics_context", None)
    if token is not None:
        try:
            request_context.reset(token)
        except ValueError:  # set in another context (cannot happen in a WSGI thread): leave it
            pass
