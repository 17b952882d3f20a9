"""API application: the Flask app factory of a member gateway.

``create_app(settings=None, pipeline=None)``: settings default to the layered
configuration (``gateway.config.load_settings``); tests inject their own
settings, clock and pipeline. Flask is used only under ``gateway/api``.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from flask import Flask

from gateway.api.errors import FHIR_JSON, register_error_handlers
from gateway.config import Settings, load_settings
from gateway.member import Member
from gateway.pipeline import Pipeline
from gateway.store.db import Database, borrowed

__all__ = ["create_app", "pipeline_of", "member_of", "borrow_database"]


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None) -> Flask:
    """A WSGI app serving ingest, the FHIR API, the registry, the exchange and the audit log.

    :raises ConfigError: settings, mapping tables, profiles, keys or the registry snapshot are invalid.
    """
    settings = settings or load_settings()
    app = Flask("gateway")
    # a path with a doubled slash is not this server's (404, in the answer's own form): merged, it was redirected
    # (308, an HTML body) to a URL made from the request's Host header, not from public_url
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_AS_ASCII"] = False
    pipe = pipeline or Pipeline(settings)
    app.extensions["gateway.settings"] = settings
    app.extensions["gateway.pipeline"] = pipe
    app.extensions["gateway.member"] = pipe.member  # the composition root: every request's parts come from it
    app.extensions["gateway.clock"] = pipe.clock
    register_error_handlers(app)

    @app.after_request
    def _utf8(response: Any) -> Any:
        # FHIR R4 (http.html#mime-type): a FHIR answer SHALL say its character encoding, UTF-8; HTTP's own default
        # is ISO-8859-1, and a client left to guess mangles the Chinese in it
        if response.mimetype == "application/fhir+json" and "charset" not in response.headers.get("Content-Type", ""):
            response.headers["Content-Type"] = FHIR_JSON
        return response

    from gateway import auth
    from gateway.api import audit as audit_api
    from gateway.api import conformance, exchange, fhir, health, ingest
    from gateway.api import metrics as metrics_api
    from gateway.api import registry as registry_api
    from gateway.api import smart as smart_api
    from gateway.audit import checkpoint
    from gateway.audit.log import ensure_schema as ensure_audit_schema
    from gateway import console

    # Tables the API needs exist before the first request (audit log, users).
    ensure_audit_schema(pipe.store.db)
    auth.ensure_schema(pipe.store.db)

    app.register_blueprint(health.bp)
    app.register_blueprint(ingest.bp)
    app.register_blueprint(exchange.bp)
    app.register_blueprint(audit_api.bp)
    app.register_blueprint(console.bp)  # /console/: the web pages of auditors and IT
    app.register_blueprint(metrics_api.bp)  # /metrics (Prometheus) and every request's X-Request-Id
    # Registry and conformance routes (/fhir/$recognize, /fhir/StructureDefinition/...) before /fhir/<type>.
    app.register_blueprint(registry_api.bp)
    app.register_blueprint(conformance.bp)
    app.register_blueprint(smart_api.bp)  # SMART Backend Services: discovery and /auth/token
    app.register_blueprint(fhir.bp)

    ex = pipe.exchange
    if ex is not None:
        app.extensions["gateway.exchange"] = ex
        if ex.identity is not None:
            app.extensions["gateway.audit.signer"] = checkpoint.Signer(ex.identity.key, list(ex.identity.chain))
        if ex.holder is not None:
            # registry_api.install keeps its state under "gateway.registry"; nothing may overwrite that key
            registry_api.install(app, ex.holder, clock=pipe.clock, database=settings.database_locator)
            app.extensions["gateway.trust"] = _CurrentSnapshot(ex.holder, ex.refresh_registry)
    return app


class _CurrentSnapshot:
    """The registry snapshot in force, as a trust source (it can change while the app runs)."""

    def __init__(self, holder: Any, refresh: Callable[[], Any]) -> None:
        self.holder = holder
        self.refresh = refresh  # a newly installed snapshot taken up first (it removes revoked certificates)

    def _now(self) -> Any:
        self.refresh()
        return self.holder.snapshot_at()

    def certificates_for_kid(self, kid: str) -> Any:
        return self._now().certificates_for_kid(kid)

    def authorities(self) -> Any:
        return self._now().authorities()

    def is_listed(self, cert: Any, at: Any) -> Any:
        return self._now().is_listed(cert, at)


def member_of(app: Any) -> Member:
    """The member gateway an app serves (:func:`gateway.member.build_member`)."""
    return app.extensions["gateway.member"]  # type: ignore[no-any-return]


def borrow_database(app: Any) -> AbstractContextManager[Database]:
    """A database connection for one request of ``app`` (:meth:`gateway.member.Member.borrow`); an app made
    without a member (a part mounted on its own) borrows from its settings' database."""
    member = app.extensions.get("gateway.member")
    if member is not None:
        return member.borrow()  # type: ignore[no-any-return]
    return borrowed(app.extensions["gateway.settings"].database_locator)


def public_root() -> str:
    """This gateway's base URL for the links and full URLs of the current request's answer: ``public_url`` when it
    is configured (a client's ``Host`` header, which anyone sets, never names the server in them), else the URL the
    request reached."""
    from flask import current_app, request

    settings: Settings | None = current_app.extensions.get("gateway.settings")
    if settings is not None and settings.public_url:
        return settings.base_url
    return str(request.url_root).rstrip("/")


def pipeline_of(app: Any) -> Pipeline:
    """The pipeline an app was created with."""
    return app.extensions["gateway.pipeline"]  # type: ignore[no-any-return]
