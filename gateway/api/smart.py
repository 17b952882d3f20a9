"""SMART API: discovery and the token endpoint of SMART Backend Services.

``GET /.well-known/smart-configuration`` (also under the FHIR base,
``/fhir/.well-known/smart-configuration``, where SMART clients look) and
``POST /auth/token`` (form-encoded client credentials with a signed JWT
assertion; see :mod:`gateway.clients`). Errors are OAuth 2.0 JSON
(``{"error", "error_description"}``, RFC 6749 §5.2), not OperationOutcomes:
OAuth client libraries read that shape.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from gateway import clients
from gateway.audit import records
from gateway.api.app import borrow_database

__all__ = ["bp"]

bp = Blueprint("smart", __name__)

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _endpoint_here() -> str:
    """The token endpoint as this request reached the gateway (a client may use that form in ``aud``)."""
    return request.host_url.rstrip("/") + "/auth/token"


@bp.get("/.well-known/smart-configuration")
@bp.get("/fhir/.well-known/smart-configuration")
def smart_configuration() -> Response:
    """How a backend client gets an access token here."""
    settings = current_app.extensions["gateway.settings"]
    configured = settings.public_url.strip()
    body = clients.smart_configuration(settings, None if configured else _endpoint_here())
    response = jsonify(body)
    response.headers["Cache-Control"] = "max-age=300"
    return response


def _oauth_error(error: str, description: str, status: int) -> Response:
    response = jsonify({"error": error, "error_description": description})
    response.status_code = status
    response.headers.update(_NO_STORE)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_client"'
    return response


@bp.post("/auth/token")
def token() -> Response:
    """Client credentials grant with a ``private_key_jwt`` client assertion: an access token, or an OAuth
    error (400 invalid_request / unsupported_grant_type / invalid_scope, 401 invalid_client)."""
    if request.mimetype != "application/x-www-form-urlencoded":
        return _oauth_error("invalid_request", "send the request form-encoded "
                            "(Content-Type: application/x-www-form-urlencoded)", 400)
    names = ("grant_type", "client_assertion_type", "client_assertion", "scope", "client_id")
    twice = [k for k in names if len(request.form.getlist(k)) > 1]
    if twice:  # RFC 6749 3.2: request parameters MUST NOT be included more than once
        return _oauth_error("invalid_request", f"{twice[0]} is sent more than once (RFC 6749 3.2: each parameter "
                            "at most once)", 400)
    form: dict[str, Any] = {k: request.form.get(k, "") for k in names}
    settings = current_app.extensions["gateway.settings"]
    clock = current_app.extensions["gateway.clock"]
    gateway = records.Party.member(settings.issuer_uscc, settings.issuer_name)
    # the URL this gateway is known by; as the request reached it only where no public_url says which (the Host
    # header is the caller's to write: with it, an assertion made for another member's gateway was taken here)
    audiences = {clients.token_endpoint(settings)} | (set() if settings.public_url else {_endpoint_here()})
    try:
        with borrow_database(current_app) as db:
            issued = clients.request_token(db, form, audiences=audiences, at=clock(), gateway=gateway,
                                           address=request.remote_addr or "")
    except clients.TokenRefused as refused:
        return _oauth_error(refused.error, refused.description, refused.http_status)
    response = jsonify(issued.response())
    response.headers.update(_NO_STORE)
    return response
