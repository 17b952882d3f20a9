"""API application: the Flask app factory of a member gateway.

``create_app(settings=None, pipeline=None)``: settings default to the layered
configuration (``gateway.config.load_settings``); tests inject their own
settings, clock and pipeline. Flask is used only under ``gateway/api``.
"""
from __future__ import annotations

from typing import Any

from flask import Flask

from gateway.api.errors import register_error_handlers
from gateway.config import Settings, load_settings
from gateway.pipeline import Pipeline

__all__ = ["create_app", "pipeline_of"]


def create_app(settings: Settings | None = None, pipeline: Pipeline | None = None) -> Flask:
    """A WSGI app serving ingest, the FHIR read/search API and health.

    :raises ConfigError: settings, mapping tables or profiles are invalid.
    """
    settings = settings or load_settings()
    app = Flask("gateway")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_AS_ASCII"] = False
    app.extensions["gateway.settings"] = settings
    app.extensions["gateway.pipeline"] = pipeline or Pipeline(settings)
    register_error_handlers(app)

    from gateway.api import conformance, fhir, health, ingest
    from gateway.api import registry as registry_api
    from gateway.registry.holder import holder_from_settings

    pipe = app.extensions["gateway.pipeline"]
    app.register_blueprint(health.bp)
    app.register_blueprint(ingest.bp)
    # Registry routes (/registry/..., /fhir/$recognize) before the generic /fhir/<type> routes.
    app.register_blueprint(registry_api.bp)
    app.register_blueprint(conformance.bp)
    app.register_blueprint(fhir.bp)
    holder = holder_from_settings(settings, pipe.clock)
    if holder is not None:
        registry_api.install(app, holder, clock=pipe.clock, database=settings.database_path)
        app.extensions["gateway.registry"] = holder
    return app


def pipeline_of(app: Any) -> Pipeline:
    """The pipeline an app was created with."""
    return app.extensions["gateway.pipeline"]  # type: ignore[no-any-return]
