"""Serve: one member gateway in production (HTTP on gunicorn, MLLP beside it).

The HTTP API runs on gunicorn (pre-fork workers with threads; each worker
builds its own app and database connections). The MLLP listener runs in a
separate process, so a slow HTTP client never delays an ACK and gunicorn's
forking never copies a running event loop. Before either starts, messages a
crash left half-processed are marked failed (their raw input is kept).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from gateway.config import Settings

__all__ = ["serve", "run_mllp"]

log = logging.getLogger(__name__)


def run_mllp(settings: Settings) -> None:
    """Entry point of the MLLP listener process."""
    from gateway.mllp import MLLPServer
    from gateway.pipeline import Pipeline

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    MLLPServer(Pipeline(settings), settings.mllp_host, settings.mllp_port).serve_forever()


def serve(settings: Settings) -> None:
    """Run HTTP (and MLLP unless ``mllp_port`` is 0) until stopped.

    :raises ConfigError: invalid settings, mapping tables or profiles.
    """
    from gunicorn.app.base import BaseApplication

    from gateway.api.app import create_app
    from gateway.pipeline import Pipeline

    pipeline = Pipeline(settings)  # fails fast on bad mapping tables, before anything listens
    recovered = pipeline.recover()
    if recovered:
        log.warning("%d message(s) interrupted by the last stop are marked failed", recovered)
    pipeline.close()

    # A plain child process (not multiprocessing): gunicorn forks its workers from this process,
    # and they must not inherit multiprocessing's bookkeeping of the MLLP child.
    parent = os.getpid()
    child: subprocess.Popen[bytes] | None = None
    if settings.mllp_port:
        child = subprocess.Popen([sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))])

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{settings.http_host}:{settings.http_port}",
                "workers": settings.workers,
                "threads": settings.threads,
                "worker_class": "gthread",
                "loglevel": settings.log_level.lower(),
                "accesslog": "-",
                # the path only: a query string may carry a patient identifier
                "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss',
                "limit_request_line": 8190,
                "timeout": 60,
                "graceful_timeout": 20,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(settings)

    try:
        _Gunicorn().run()
    finally:
        if child is not None and os.getpid() == parent:  # not in a forked worker
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":  # the MLLP child: settings arrive as JSON
    run_mllp(Settings(**json.loads(sys.argv[1])))
