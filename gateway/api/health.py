"""Health: liveness and readiness for load balancers and operators."""
from __future__ import annotations

from flask import Blueprint, Response, current_app

from gateway import __version__, jsonutil
from gateway.api.app import pipeline_of

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """200 with message counts when the database answers."""
    counts = pipeline_of(current_app).store.counts()
    body = {"status": "ok", "version": __version__, "messages": counts}
    return Response(jsonutil.dumps(body), mimetype="application/json")
