"""Serve: one member gateway in production, every part in a process of its own under one supervisor.

``gateway serve`` checks the settings (mapping tables, profiles, keys, the
registry snapshot), works again what a crash left unfinished, binds the HTTP
and MLLP ports itself — a port in use is one clear line and exit 2 before
anything starts — and then supervises (:mod:`gateway.supervise`) these
processes, each handed the listening socket it serves:

- ``http-1``...: HTTP workers (:mod:`gateway.httpserver`, waitress: whole
  requests are read in an event loop, then worked by a thread), ``workers`` of
  them on the same socket;
- ``mllp-1``...: MLLP listeners, ``mllp_workers`` of them on the same socket
  (the kernel hands each connection to one of them, so a sender's messages
  keep their order);
- ``queue`` (``queue-1``... with ``queue_readers`` above 1): with
  ``mllp_ack = received``, the queue readers that work what the listeners
  answered on receipt (several work the queue side by side, each message
  recorded after the earlier ones of its sender);
- ``background``: working again messages left unfinished by a part that
  died (a killed MLLP listener or HTTP worker), a bounded number each pass;
  delivering the outbox to other members, signed audit checkpoints, and
  checkpointing the database's WAL so that no ingest commit waits for it.

A slow HTTP client therefore never delays an ACK, and a part that dies is
restarted without the others noticing. The MLLP listeners, the queue reader
and the background loop write heartbeats (:mod:`gateway.heartbeat`) that
``/health`` checks. Every child stops with the supervisor, even when the
supervisor was killed. Every part counts its metrics in one multiprocess
folder, ``<database>.run/metrics/`` (emptied at start), which ``GET /metrics``
adds up (:mod:`gateway.metrics`), and writes its log lines as ``log_format``
says, naming itself (:mod:`gateway.logs`).

``python -m gateway.serve SETTINGS_JSON`` alone runs an MLLP listener and the
background loop in one process (the benchmark and tests start it that way).
"""
from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Settings
from gateway.logs import database_fault
from gateway.signals import ignore_later_signals
from gateway.store import db as _db

__all__ = ["serve", "PortInUse", "LeftOver", "AlreadyServing", "run_background", "run_listener", "run_queue",
           "run_http", "run_part", "background_pass", "settle_collector"]

log = logging.getLogger("gateway.serve")  # (also when run as python -m gateway.serve: not "__main__")


def _logging(settings: Settings, process: str) -> None:
    """Log lines of this process, as the settings say (``log_format``: text or JSON naming ``process``)."""
    from gateway.logs import configure

    configure(settings.log_level, settings.log_format, process)


def settle_collector(process: str) -> int:
    """Leave what a part made while it started out of every later garbage collection; how many objects that is.

    A part keeps what it loads at start (modules, mapping tables, profiles, the registry) for its whole life, some
    hundred thousand objects that Python's collector went through again at each full collection: in a queue
    reader one came every half second or so and took 30 to 80 ms, a tenth of its time, and in a listener one
    delayed the ACKs waiting behind it. Frozen (:func:`gc.freeze`), they are left alone; what the part makes
    afterwards is collected as before (and never inside a write transaction: :func:`gateway.store.db.transaction`).
    The price: a frozen object that later becomes garbage caught in a reference cycle stays in memory (a registry
    snapshot replaced by a newer one, say): a bounded amount, once per such event.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("%s: %d objects made at start left out of garbage collection", process, frozen)
    return frozen


#: The part of ``gateway serve`` that works, before the MLLP listeners start, what an earlier run queued.
CATCHUP = "catchup"


class PortInUse(Exception):
    """A port the gateway must listen on cannot be bound (in use, or not allowed)."""


class LeftOver(Exception):
    """A process of the last run of this gateway still runs (stopped or hung) and may hold its database."""


#: Seconds a start waits for the processes of a run whose supervisor died to stop by themselves.
LEFTOVER_WAIT = 5.0


class AlreadyServing(Exception):
    """Another ``gateway serve`` runs on this database (a SQLite file; on PostgreSQL, this node's run folder)."""


def _one_serve(settings: Settings) -> int:
    """Hold this gateway's run folder for as long as this ``gateway serve`` runs (an exclusive ``flock`` on
    ``serve.lock`` in it, which the system lets go of when the process ends, however it ends); returns the
    descriptor to close at the end.

    :raises AlreadyServing: another ``gateway serve`` holds it. Two supervisors on one run folder each took the
        other's parts for hung and killed them, until both stopped for too many restarts.
    """
    import fcntl

    from gateway.heartbeat import run_dir
    from gateway.store.db import describe

    folder = run_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise AlreadyServing(
            f"another gateway serve{f' (pid {holder})' if holder.isdigit() else ''} runs on the database "
            f"{describe(settings.database_locator)}: one gateway serve per database"
            + (" file" if settings.database_file is not None else f" node (run folder {folder})")
            + "; stop it first, or give this one its own database") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    return fd


def _no_leftover_parts(settings: Settings) -> None:
    """Wait a moment for the parts of an earlier run whose supervisor died to stop; :class:`LeftOver` naming those
    that do not (a stopped or hung process holding the database's write lock had the start wait 30 s for the lock
    and fail with 'database is locked', naming nothing)."""
    from gateway.heartbeat import leftover_parts, run_dir

    folder = run_dir(settings)
    deadline = time.monotonic() + LEFTOVER_WAIT
    left = leftover_parts(folder)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = leftover_parts(folder)
    if left:
        named = ", ".join(f"{title} (pid {pid}, {state})" for title, pid, state in left)
        pids = " ".join(str(pid) for _, pid, _ in left)
        raise LeftOver(f"a process of the last run of this gateway is still there and may hold its database: "
                       f"{named}; stop it (kill -CONT {pids}; kill {pids}) and start again")


#: Messages left unfinished by a dead process that one background pass works again (and seconds it spends on
#: them at most), so that deliveries and checkpoints are never starved; the rest wait for the next pass.
ABANDONED_PER_PASS, ABANDONED_SECONDS = 50, 5.0


def _type_and_place(exc: BaseException) -> str:
    """An exception as the log tells it: its type and where in the code, never its text (it may quote patient data);
    with ``GATEWAY_DEBUG=1`` the whole traceback goes to the log as well."""
    from gateway.logs import code_place

    return f"{type(exc).__name__} at {code_place(exc.__traceback__, 4)}"


def _debug() -> bool:
    from gateway.logs import debug_wanted

    return debug_wanted()


def background_pass(pipeline: Any) -> dict[str, int]:
    """One round of background work: work again what a dead process left unfinished, deliver what is due, make
    an audit checkpoint when one is due. The database away ends the round (raised: the loop says so)."""
    done: dict[str, int] = {}
    try:
        reworked = pipeline.rework_abandoned(ABANDONED_PER_PASS, ABANDONED_SECONDS)
    except Exception as exc:  # deliveries still get their turn; the next pass retries
        if _db.fault_reason(exc) is not None:  # the database is busy, restarting or gone: nothing else of the pass
            raise  # can be done either; the loop says so (once per ten seconds)
        log.error("messages left unfinished could not be worked again in this pass: %s", _type_and_place(exc),
                  exc_info=_debug())
        reworked = 0
    if reworked:
        done["reworked"] = reworked
    try:  # the whole audit log walked now and then, beside the passes: /health and the figures say when it changed
        from gateway.audit.watch import maybe_check_beside
        from gateway.heartbeat import run_dir

        settings = pipeline.settings
        if maybe_check_beside(settings.database_locator, run_dir(settings), settings.issuer_uscc,
                              pipeline.clock) is not None:
            done["audit-check"] = 1
    except Exception as exc:  # the next pass tries again
        log.error("the audit log check could not be started in this pass: %s", _type_and_place(exc),
                  exc_info=_debug())
    ex = pipeline.exchange
    if ex is None:
        return done
    if ex.refresh_registry():  # a snapshot installed while the gateway is idle is applied within a pass
        done["registry"] = 1
    if ex.identity is not None and ex.holder is not None:
        done.update(ex.deliver())
    if ex.identity is not None:
        from gateway.audit import checkpoint

        signer = checkpoint.Signer(ex.identity.key, list(ex.identity.chain))
        if checkpoint.maybe_make(pipeline.store.db, signer, now=pipeline.clock()) is not None:
            done["checkpoint"] = 1
    return done


#: Seconds one batch of queued messages may take before the process working it (a queue reader, the catch-up) is
#: taken for hung: a batch takes seconds.
QUEUE_BATCH_HUNG = 45.0


class _Passes:
    """When the background pass in progress began (None between passes): a pass that runs too long is hung."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.began: float | None = None

    def working(self) -> bool:
        began = self.began
        return began is None or time.monotonic() - began < self.limit


def _background_loop(settings: Settings, stop: threading.Event, passes: _Passes | None = None,
                     pipeline: Any = None, built: threading.Event | None = None) -> None:
    """Background passes every ``delivery_interval`` until ``stop``, with ``pipeline`` (made in the thread that
    runs the loop, which holds its database connection) or one made here; ``built`` is set once it is made."""
    from gateway.pipeline import Pipeline

    try:
        if pipeline is None:
            pipeline = Pipeline(settings)  # its own database connection, in this thread
    finally:
        if built is not None:
            built.set()
    while not stop.wait(settings.delivery_interval):
        if passes is not None:
            passes.began = time.monotonic()
        try:
            background_pass(pipeline)
        except Exception as exc:  # keep delivering; the next pass retries
            reason = _db.fault_reason(exc)
            if reason is not None:  # the database is busy, restarting or gone: said once per ten seconds
                database_fault(log, "background", "background pass failed: %s", reason)
            else:
                log.error("background pass failed: %s", _type_and_place(exc), exc_info=_debug())
        finally:
            if passes is not None:
                passes.began = None
    exchange = getattr(pipeline, "exchange", None)
    if exchange is not None:
        try:  # (a clean stop: a delivery on its way is tried again by the next start at once, not after its lease)
            exchange.give_back_in_flight()
        except Exception as exc:  # noqa: BLE001 - the leases end by themselves all the same
            log.warning("deliveries on their way could not be given back as the gateway stops (%s): they are tried "
                        "again once their leases end", _db.fault_reason(exc) or type(exc).__name__)


def work_left_queued(pipeline: Any, progress_every: float = 5.0, stop: threading.Event | None = None,
                     on_batch: Callable[[], None] | None = None) -> int:
    """Work the messages an earlier run queued (``mllp_ack = received``) when this one runs no queue reader
    (``mllp_ack = processed``): the senders had their receipt, so none may be left waiting. ``gateway serve`` runs
    it in a part of its own (``catchup``) before any MLLP listener starts, so that a sender's queued messages are
    recorded before the new ones it sends. Works the queue, and the messages a process that is gone left
    unfinished, until none that came before it started is left (another node's listeners may queue more
    meanwhile: its readers work them, and what a live process of another node holds is left to it), saying how far
    it is every ``progress_every`` seconds; once ``stop`` is set (SIGTERM), stops after the messages in hand,
    leaving the others for the next start. ``on_batch``: called after each batch (the part's heartbeat). Returns
    how many were worked."""
    from gateway.store.views import ReadModels

    views = ReadModels(pipeline.store.db)
    waiting, last = views.queued_up_to(10_000_000), views.newest_queued_id()
    if last is None:
        return 0
    log.warning("%d message(s) wait in the processing queue, queued while mllp_ack was 'received'; with mllp_ack "
                "'processed' no queue reader runs: working them now, before the MLLP listeners start", waiting)
    done, said = 0, time.monotonic()
    while True:
        if stop is not None and stop.is_set():
            log.warning("stopped before the MLLP listeners started: worked %d of the %d queued message(s); the "
                        "others are worked at the next start", done, waiting)
            return done
        worked = pipeline.process_queued(32)
        if on_batch is not None:
            on_batch()
        done += len(worked)
        if not worked or all(o.record_id is not None and o.record_id > last for o in worked):
            break  # none left (but what another node's live process holds), or only what came after the start
        if time.monotonic() - said >= progress_every:
            log.warning("worked %d of the %d queued message(s)", done, waiting)
            said = time.monotonic()
    log.warning("worked %d message(s): %d waited in the queue%s%s", done, waiting,
                ", the others were left unfinished by a process that is gone" if done > waiting else "",
                "; the MLLP listeners start now" if getattr(pipeline.settings, "mllp_port", 0) else "")
    return done


def run_catchup(settings: Settings, part: str = CATCHUP) -> None:
    """The ``catchup`` part of ``gateway serve`` (``mllp_ack = processed`` with messages an earlier run queued): work
    them (:func:`work_left_queued`) and end; the supervisor starts the MLLP listeners once it has. SIGTERM stops it
    after the messages in hand. Its heartbeat goes on while batches keep coming."""
    from gateway.heartbeat import Beat, run_dir
    from gateway.pipeline import Pipeline

    _logging(settings, part)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _watch_parent()
    batch = _Passes(QUEUE_BATCH_HUNG)  # each batch as one pass of a queue reader: one that never ends is hung
    batch.began = time.monotonic()

    def batch_done() -> None:
        batch.began = time.monotonic()

    beat = Beat(run_dir(settings), part, working=batch.working).start()
    try:
        pipeline = Pipeline(settings)
        try:
            work_left_queued(pipeline, stop=stop, on_batch=batch_done)
        finally:
            pipeline.close()
    finally:
        beat.stop()


def run_background(settings: Settings) -> None:
    """One process with the MLLP listener (unless off) and the background loop (benchmark and tests).

    With ``mllp_workers`` above 1 this process opens the MLLP port itself and
    starts the other listener processes on the same socket; the kernel hands
    each new connection to one of them, and each works its own connections'
    messages, so an HL7 sender's messages keep their order. They stop with it.
    """
    from gateway.mllp import MLLPServer
    from gateway.pipeline import Pipeline
    from gateway.store.db import WalCheckpointer

    _logging(settings, "mllp")
    _stop_on_signals()
    stop, built = threading.Event(), threading.Event()
    worker = threading.Thread(target=_background_loop, args=(settings, stop), kwargs={"built": built},
                              name="background", daemon=True)
    worker.start()
    checkpointer = WalCheckpointer(settings.database_file)
    checkpointer.start()
    children: list[subprocess.Popen[bytes]] = []  # further listeners and the queue reader
    sock: socket.socket | None = None
    try:
        if settings.mllp_port:
            pipeline = Pipeline(settings)  # loaded before the port opens, so that a connection is served at once
            me, env = part_command(settings)
            if settings.mllp_ack == "received":  # accept, then process: each queue reader in a process of its own
                children += [subprocess.Popen(me + ["--queue", str(k)], env=env)
                             for k in range(1, settings.queue_readers + 1)]
            if settings.mllp_workers > 1:
                sock = socket.create_server((settings.mllp_host, settings.mllp_port), backlog=128)
                children += [subprocess.Popen(me + ["--mllp-fd", str(sock.fileno())], pass_fds=(sock.fileno(),),
                                              env=env)
                             for _ in range(settings.mllp_workers - 1)]
            server = MLLPServer(pipeline, settings.mllp_host, settings.mllp_port, sock=sock)
            built.wait(60)  # the background thread's pipeline is part of what this process made at start
            settle_collector("mllp")
            server.serve_forever()
        else:
            built.wait(60)
            settle_collector("background")
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


#: The process that started this part, as :data:`PARENT_ENV` named it (taken out of the environment by
#: :func:`_main`, so that no process this part starts reads it as its own starter); None: not named.
_starter: int | None = None


def _parent() -> int:
    """The process that started this part: named by it in :data:`PARENT_ENV` (:func:`part_command`), else this
    process's parent now. A part started by a process that died while the part was still starting (importing, say)
    has another parent by the time it looks (init, or a subreaper): only the pid its starter wrote tells so."""
    if _starter is not None:
        return _starter
    named = os.environ.get(PARENT_ENV, "")
    return int(named) if named.isdigit() else os.getppid()


def _watch_parent() -> None:
    """SIGTERM this process when the process that started it is gone (even killed), also when that happened before
    this part got here."""
    parent = _parent()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        log.warning("the process that started this part (pid %d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()


def _interrupt_once(signum: int, frame: Any) -> None:
    """Stop this part: the first SIGTERM or SIGINT raises KeyboardInterrupt where the part waits; the ones after it
    are taken quietly while it stops (:mod:`gateway.signals`: a second interrupt landing in the interpreter's own
    shutdown would print a traceback instead of stopping cleanly)."""
    ignore_later_signals(signal.SIGTERM, signal.SIGINT)
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT stop this part once (:func:`_interrupt_once`)."""
    signal.signal(signal.SIGTERM, _interrupt_once)
    signal.signal(signal.SIGINT, _interrupt_once)


def run_listener(settings: Settings, fd: int, part: str | None = None) -> None:
    """An MLLP listener process: accept on the inherited socket ``fd`` until stopped.

    ``part``: its name under ``gateway serve`` (it then writes a heartbeat from
    its event loop). It stops with the process that started it, even when that
    one could not stop it (killed).
    """
    from gateway.mllp import MLLPServer
    from gateway.pipeline import Pipeline

    _logging(settings, part or "mllp")
    _stop_on_signals()
    _watch_parent()
    sock = socket.socket(fileno=fd)
    server = MLLPServer(Pipeline(settings), settings.mllp_host, settings.mllp_port, sock=sock)
    if part is not None:
        from gateway.heartbeat import Beat, run_dir

        def on_loop(touch: Any) -> None:
            loop = server.loop
            if loop is not None:
                loop.call_soon_threadsafe(touch)  # a blocked loop runs no touch: the heartbeat goes stale

        Beat(run_dir(settings), part, working=server.ready.is_set, schedule=on_loop).start()
    settle_collector(part or "mllp")
    server.serve_forever()


def queue_parts(settings: Settings) -> list[str]:
    """The names of the queue reader parts: ``queue`` alone, or ``queue-1`` ... ``queue-n`` (``queue_readers``)."""
    if settings.queue_readers == 1:
        return ["queue"]
    return [f"queue-{k}" for k in range(1, settings.queue_readers + 1)]


def _reader(settings: Settings, part: str) -> tuple[int, int]:
    """(k, n): queue reader ``part`` (one of :func:`queue_parts`) is reader k + 1 of n: ``queue`` (0, 1),
    ``queue-2`` of 3 (1, 3)."""
    return (0, 1) if part == "queue" else (int(part.rpartition("-")[2]) - 1, settings.queue_readers)


def run_queue(settings: Settings, part: str | None = None, reader: tuple[int, int] | None = None) -> None:
    """A queue reader process (``mllp_ack = received``): work held messages until stopped.

    On SIGTERM it finishes the message it is working and stops; it stops with
    the process that started it. Under ``gateway serve`` (``part``) it writes a
    heartbeat while its work keeps moving. ``part`` ``queue-k`` (or ``reader``
    (k - 1, n)): reader k of ``queue_readers``, working the queue beside the others.
    """
    from gateway.mllp import QueueReader
    from gateway.pipeline import Pipeline

    _logging(settings, part or "queue")
    _lower_priority(settings.queue_reader_nice, part or "queue")
    pipeline = Pipeline(settings)
    queue = QueueReader(pipeline, reader=reader or _reader(settings, part or "queue"))
    signal.signal(signal.SIGTERM, lambda *_: queue.stop())
    signal.signal(signal.SIGINT, lambda *_: queue.stop())
    _watch_parent()
    if part is not None:
        from gateway.heartbeat import Beat, run_dir

        passes = _Passes(QUEUE_BATCH_HUNG)
        work = pipeline.process_queued

        def timed(*args: Any, **kwargs: Any) -> Any:
            passes.began = time.monotonic()
            try:
                return work(*args, **kwargs)
            finally:
                passes.began = None

        pipeline.process_queued = timed  # type: ignore[method-assign]
        Beat(run_dir(settings), part, working=passes.working).start()
    settle_collector(part or "queue")
    queue.run()
    log.info("processing queue stopped after %d message(s)", queue.processed)


def _lower_priority(step: int, process: str) -> None:
    """This process's CPU priority ``step`` below what it was (``os.nice``; 0: unchanged): a queue reader's work
    gives way to the listeners' receipts when they want a core at once, and has every core nothing else wants.
    A system that refuses it leaves the priority as it was (said once)."""
    if step <= 0:
        return
    try:
        os.nice(step)
    except OSError as exc:
        log.warning("%s: its CPU priority could not be lowered (queue_reader_nice %d): %s", process, step, exc)


def run_background_part(settings: Settings, part: str) -> None:
    """The background process of ``gateway serve``: outbox delivery, audit and WAL checkpoints, a heartbeat."""
    from gateway.heartbeat import Beat, run_dir
    from gateway.store.db import WalCheckpointer

    _logging(settings, part)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _watch_parent()
    checkpointer = WalCheckpointer(settings.database_file)
    checkpointer.start()
    # a pass delivers in lanes bounded by delivery_timeout; one far longer than that is hung
    passes = _Passes(max(120.0, 4.0 * settings.delivery_timeout))
    beat = Beat(run_dir(settings), part, working=passes.working).start()
    try:
        from gateway.pipeline import Pipeline

        pipeline = Pipeline(settings)  # made before settling: it is what this part keeps
        settle_collector(part)
        _background_loop(settings, stop, passes, pipeline)
    finally:
        beat.stop()
        checkpointer.stop()


def run_http(settings: Settings, fd: int, part: str = "http") -> None:
    """An HTTP worker process: serve the API on the inherited listening socket ``fd`` until stopped."""
    from gateway.api.app import create_app
    from gateway.httpserver import serve_http

    _logging(settings, part)
    _stop_on_signals()
    _watch_parent()
    app = create_app(settings)
    settle_collector(part)
    serve_http(app, socket.socket(fileno=fd), settings)


def run_part(settings: Settings, part: str, fd: int | None) -> int:
    """Run one part of ``gateway serve`` in this process; the exit status tells the supervisor how it ended.

    A configuration error is one line on stderr and exit 2: the supervisor then
    stops the gateway instead of restarting a part that cannot work. A database that cannot be reached (a restart,
    a failover) is one line and exit :data:`gateway.supervise.DATABASE_AWAY`: the supervisor starts the part again
    until it answers, without counting those restarts against ``restart_limit``.
    """
    from gateway.errors import ConfigError

    try:
        if part.startswith("http-") and fd is not None:
            run_http(settings, fd, part)
        elif part.startswith("mllp-") and fd is not None:
            run_listener(settings, fd, part)
        elif part in queue_parts(settings):
            run_queue(settings, part)
        elif part == "background":
            run_background_part(settings, part)
        elif part == CATCHUP:
            run_catchup(settings, part)
        else:
            print(f"gateway: unknown part {part!r}", file=sys.stderr)
            return 2
    except ConfigError as exc:
        print(f"gateway: configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # (a disk that fills while the part starts): one line, and the supervisor restarts it
        from gateway.logs import debug_wanted
        from gateway.store.db import fault_reason
        from gateway.supervise import DATABASE_AWAY

        if debug_wanted():
            raise
        reason = fault_reason(exc)
        if reason is not None:  # the supervisor starts it again, not counting it against restart_limit
            print(f"gateway: {part} could not reach the database ({reason}); `gateway serve` starts it again every "
                  "few seconds until it answers", file=sys.stderr)
            return DATABASE_AWAY
        if isinstance(exc, OSError):
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            print(f"gateway: {part} stopped: the database or its folder cannot be used right now ({reason})",
                  file=sys.stderr)
        else:
            print(f"gateway: {part} stopped by an internal error: {_type_and_place(exc)}", file=sys.stderr)
        return 1
    return 0


def _bind(what: str, host: str, port: int, setting: str) -> socket.socket:
    """A listening socket, or :class:`PortInUse` with a sentence saying what to do."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = "is already in use (another gateway or program listens there)"
        elif exc.errno == errno.EACCES:
            reason = "may not be opened by this user"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = "cannot be opened: the address is not one of this machine's"
        else:
            reason = f"cannot be opened: {exc.strerror or exc}"
        raise PortInUse(f"{what} port {port} on {host} {reason}; stop the other program or choose another "
                        f"port ({setting})") from None


def _warn_of_the_signing_certificate(pipeline: Any) -> None:
    """Say at the start when this member's signing certificate cannot sign now (expired, or not valid yet by this
    machine's clock): the gateway still starts (its results can be read and audited), but every report it takes
    in will fail its sign stage, and /health says so (``signing``)."""
    signer = getattr(pipeline.member, "signer", None)
    if signer is None:
        return
    cert, now = signer.identity.chain[0], pipeline.clock()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        log.error("the signing certificate is valid from %s to %s, not now (%s): every report taken in will fail its "
                  "sign stage until a valid one is configured (signing_cert)", cert.not_valid_before_utc.isoformat(),
                  cert.not_valid_after_utc.isoformat(), now.isoformat())


def _warn_of_the_address(pipeline: Any) -> None:
    """Say at the start when the registry lists this member at another address than its ``public_url``: other
    members address it (their assertions' audience) by the registry's."""
    exchange = pipeline.exchange
    if exchange is None or getattr(exchange, "holder", None) is None or exchange.holder.current is None:
        return
    said = exchange.address_mismatch()
    if said:
        log.warning("%s", said)


def serve(settings: Settings, announce: Callable[[], None] | None = None) -> int:
    """Run the whole gateway until SIGTERM or SIGINT (exit status 0), or until it cannot run whole (non-zero).

    The ports are bound first, so that a port in use is the only thing said;
    ``announce`` is called once they are and the settings are found sound.

    :raises ConfigError: invalid settings, mapping tables, profiles, keys or registry snapshot.
    :raises PortInUse: the HTTP or MLLP port cannot be bound.
    :raises AlreadyServing: another ``gateway serve`` runs on this database.
    """
    from gateway.errors import ConfigError
    from gateway.store.db import describe, unwritable

    blocked = unwritable(settings.database_locator)
    if blocked:  # (a read-only data directory: said as such, not as the first file some part fails to write)
        raise ConfigError(f"this user cannot write {', '.join(blocked)} where the database "
                          f"{describe(settings.database_locator)} lives (permissions or a read-only file system)",
                          "data_dir")
    held = _one_serve(settings)
    try:
        return _serve(settings, announce)
    finally:
        os.close(held)


def _serve(settings: Settings, announce: Callable[[], None] | None) -> int:
    """:func:`serve`, with the run folder held."""
    from gateway.heartbeat import run_dir
    from gateway.logs import check_format
    from gateway.pipeline import Pipeline
    from gateway.supervise import Part, Supervisor

    _no_leftover_parts(settings)
    sockets = [_bind("HTTP", settings.http_host, settings.http_port, "--http-port / http_port")]
    try:
        if settings.mllp_port:
            sockets.append(_bind("MLLP", settings.mllp_host, settings.mllp_port, "--mllp-port / mllp_port"))
        check_format(settings.log_format)
        if settings.metrics_token_file:
            from gateway.metrics import read_token

            read_token(settings)  # an unreadable or empty token file stops the start, not the first scrape
        if settings.log_format == "json":
            _logging(settings, "serve")
        pipeline = Pipeline(settings)  # fails fast on bad mapping tables, keys or snapshot, before any child starts
        _warn_of_the_signing_certificate(pipeline)
        _warn_of_the_address(pipeline)
        from gateway.store import layout

        layout.upgrade(pipeline.store.db)  # every part's tables, before any process uses them (once per start)
        recovered = pipeline.recover()
        if recovered:
            log.warning("%d message(s) left unfinished by the last stop were worked again", recovered)
        left = 0
        if settings.mllp_ack != "received":  # no queue reader runs: what an earlier run queued is worked first
            from gateway.store.views import ReadModels

            left = ReadModels(pipeline.store.db).queued_up_to(10_000_000)
        pipeline.close()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if announce is not None:
        announce()
    http_fd = sockets[0].fileno()
    command, settings_env = part_command(settings)
    me = command + ["--part"]
    parts = [Part(f"http-{i}", f"HTTP worker {i}", me + [f"http-{i}", "--fd", str(http_fd)], (http_fd,))
             for i in range(1, settings.workers + 1)]
    if left:
        log.warning("%d message(s) queued while mllp_ack was 'received' wait in the processing queue: the part "
                    "'%s' works them%s", left, CATCHUP,
                    ", and the MLLP listeners start once it has" if settings.mllp_port else "")
        parts.append(Part(CATCHUP, "catch-up of queued messages", me + [CATCHUP], beats=True, once=True))
    if settings.mllp_port:
        mllp_fd = sockets[1].fileno()
        parts += [Part(f"mllp-{i}", f"MLLP listener {i}", me + [f"mllp-{i}", "--fd", str(mllp_fd)], (mllp_fd,),
                       beats=True, after=CATCHUP if left else "") for i in range(1, settings.mllp_workers + 1)]
    if settings.mllp_ack == "received":
        readers = queue_parts(settings)
        parts += [Part(name, "queue reader" + (f" {name[6:]} of {len(readers)}" if len(readers) > 1 else ""),
                       me + [name], beats=True) for name in readers]
    parts.append(Part("background", "background loop", me + ["background"], beats=True))

    folder = run_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.beat"):  # left by an earlier run: never taken for a live part
        old.unlink(missing_ok=True)
    # one multiprocess metrics folder for every part, named before any of them imports prometheus_client
    from gateway.metrics import MULTIPROC_ENV, metrics_folder, prepare_dir, remove_dir

    metrics = prepare_dir(metrics_folder(folder))
    env = {**settings_env, MULTIPROC_ENV: str(metrics)}
    supervisor = Supervisor(parts, restart_limit=settings.restart_limit, run_dir=folder, env=env, metrics_dir=metrics,
                            hung_after=float(settings.hung_restart_after))
    try:
        return supervisor.run()
    finally:
        for sock in sockets:
            sock.close()
        remove_dir(metrics)


#: The environment variable a part of ``gateway serve`` reads its settings from (:func:`part_command`).
SETTINGS_ENV = "GATEWAY_PART_SETTINGS"
#: The environment variable naming the process that starts a part (:func:`_watch_parent`).
PARENT_ENV = "GATEWAY_PART_PARENT"


def part_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The command that runs a part of ``gateway serve`` with ``settings``, and the environment to run it in.

    The settings go in the environment, not on the command line: a process's command line is readable by every
    user of the machine (``ps``), and the settings may hold a database password (``database`` =
    ``postgresql://user:password@...``); its environment only by the same user.
    """
    return ([sys.executable, "-m", "gateway.serve", "-"],
            {**os.environ, SETTINGS_ENV: json.dumps(dataclasses.asdict(settings)), PARENT_ENV: str(os.getpid())})


def _main(argv: list[str]) -> int:
    if not argv:
        print("gateway.serve runs a part of `gateway serve`: run `gateway serve` instead", file=sys.stderr)
        return 2
    global _starter
    _starter = _parent()
    os.environ.pop(PARENT_ENV, None)
    if os.getppid() != _starter:  # the process that started it died while it started: nothing to be a part of
        print("gateway: the process that started this part is gone: not starting", file=sys.stderr)
        return 0
    text = os.environ.pop(SETTINGS_ENV, "") if argv[0] == "-" else argv[0]  # (JSON on the command line: tests)
    if not text:
        print(f"gateway.serve: no settings ({SETTINGS_ENV} is not set): run `gateway serve` instead", file=sys.stderr)
        return 2
    settings = Settings(**json.loads(text))
    rest = argv[1:]
    if rest[:1] == ["--part"] and len(rest) in (2, 4):
        fd = int(rest[3]) if len(rest) == 4 and rest[2] == "--fd" else None
        return run_part(settings, rest[1], fd)
    try:
        if len(rest) == 2 and rest[0] == "--mllp-fd":
            run_listener(settings, int(rest[1]))
        elif rest[:1] == ["--queue"] and len(rest) <= 2:
            k = int(rest[1]) if len(rest) == 2 and rest[1].isdigit() else 0
            if not 1 <= k <= settings.queue_readers and not (len(rest) == 1 and settings.queue_readers == 1):
                print(f"gateway: --queue takes the reader's number, 1 to {settings.queue_readers} (queue_readers)",
                      file=sys.stderr)
                return 2
            run_queue(settings, reader=(max(k, 1) - 1, settings.queue_readers))
        else:
            run_background(settings)
    except KeyboardInterrupt:  # stopped while it started (an interrupt from the process that started it, a
        pass  # Ctrl-C): quietly, as run_part's parts stop
    return 0


if __name__ == "__main__":  # a part of `gateway serve` (settings arrive as JSON), or the listener of the benchmark
    sys.exit(_main(sys.argv[1:]))
