"""Serve: one member gateway in production (HTTP on gunicorn, MLLP and background work beside it).

The HTTP API runs on gunicorn (pre-fork workers with threads; each worker
builds its own app and database connections). A second process runs the MLLP
listener and the background work — delivering the outbox to other members,
making signed audit checkpoints, and checkpointing the database's WAL so that
no ingest commit waits for it (with ``mllp_ack = received``, a third runs
the queue reader that works what the listener answered on receipt), so a
slow HTTP client never delays an ACK and gunicorn's forking never copies a
running event loop. Before either starts, messages a crash left half-processed
are marked failed (their raw input is kept); queued ones are worked as usual.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from gateway.config import Settings

__all__ = ["serve", "run_background", "run_listener", "run_queue", "background_pass"]

log = logging.getLogger(__name__)


def background_pass(pipeline: Any) -> dict[str, int]:
    """One round of background work: deliver what is due, make an audit checkpoint when one is due."""
    done: dict[str, int] = {}
    ex = pipeline.exchange
    if ex is None:
        return done
    if ex.identity is not None and ex.holder is not None:
        done.update(ex.deliver())
    if ex.identity is not None:
        from gateway.audit import checkpoint

        signer = checkpoint.Signer(ex.identity.key, list(ex.identity.chain))
        if checkpoint.maybe_make(pipeline.store.db, signer, now=pipeline.clock()) is not None:
            done["checkpoint"] = 1
    return done


def _background_loop(settings: Settings, stop: threading.Event) -> None:
    from gateway.pipeline import Pipeline

    pipeline = Pipeline(settings)  # its own database connection, in this thread
    while not stop.wait(settings.delivery_interval):
        try:
            background_pass(pipeline)
        except Exception:  # keep delivering; the next pass retries
            log.exception("background pass failed")


def run_background(settings: Settings) -> None:
    """Entry point of the second process: the MLLP listener (unless off) and the background loop.

    With ``mllp_workers`` above 1 this process opens the MLLP port itself and
    starts the other listener processes on the same socket; the kernel hands
    each new connection to one of them, and each works its own connections'
    messages, so an HL7 sender's messages keep their order. They stop with it.
    """
    from gateway.mllp import MLLPServer
    from gateway.pipeline import Pipeline
    from gateway.store.db import WalCheckpointer

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stop = threading.Event()
    worker = threading.Thread(target=_background_loop, args=(settings, stop), name="background", daemon=True)
    worker.start()
    checkpointer = WalCheckpointer(settings.database_path)
    checkpointer.start()
    children: list[subprocess.Popen[bytes]] = []  # further listeners and the queue reader
    sock: socket.socket | None = None
    try:
        if settings.mllp_port:
            pipeline = Pipeline(settings)  # loaded before the port opens, so that a connection is served at once
            me = [sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))]
            if settings.mllp_ack == "received":  # accept, then process: the queue reader in a process of its own
                children.append(subprocess.Popen(me + ["--queue"]))
            if settings.mllp_workers > 1:
                sock = socket.create_server((settings.mllp_host, settings.mllp_port), backlog=128)
                children += [subprocess.Popen(me + ["--mllp-fd", str(sock.fileno())], pass_fds=(sock.fileno(),))
                             for _ in range(settings.mllp_workers - 1)]
            MLLPServer(pipeline, settings.mllp_host, settings.mllp_port, sock=sock).serve_forever()
        else:
            while worker.is_alive():
                worker.join(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        checkpointer.stop()


def _watch_parent() -> None:
    """SIGTERM this process when the process that started it is gone (even killed)."""
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()


def run_listener(settings: Settings, fd: int) -> None:
    """Entry point of a further MLLP listener process: accept on the inherited socket ``fd`` until stopped.

    It stops with the process that started it, even when that one could not stop it (killed).
    """
    from gateway.mllp import MLLPServer
    from gateway.pipeline import Pipeline

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _watch_parent()
    sock = socket.socket(fileno=fd)
    MLLPServer(Pipeline(settings), settings.mllp_host, settings.mllp_port, sock=sock).serve_forever()


def run_queue(settings: Settings) -> None:
    """Entry point of the queue reader process (``mllp_ack = received``): work held messages until stopped.

    On SIGTERM it finishes the message it is working and stops; it stops with
    the process that started it.
    """
    from gateway.mllp import QueueReader
    from gateway.pipeline import Pipeline

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reader = QueueReader(Pipeline(settings))
    signal.signal(signal.SIGTERM, lambda *_: reader.stop())
    signal.signal(signal.SIGINT, lambda *_: reader.stop())
    _watch_parent()
    reader.run()
    log.info("processing queue stopped after %d message(s)", reader.processed)


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


if __name__ == "__main__":  # the second process (settings arrive as JSON), a further MLLP listener, the queue reader
    if len(sys.argv) == 4 and sys.argv[2] == "--mllp-fd":
        run_listener(Settings(**json.loads(sys.argv[1])), int(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[2] == "--queue":
        run_queue(Settings(**json.loads(sys.argv[1])))
    else:
        run_background(Settings(**json.loads(sys.argv[1])))
