"""Metrics: the figures a monitoring system (Prometheus) scrapes from ``GET /metrics``.

Two kinds of figures, kept apart on purpose:

- **what a process did** — messages by channel, format and outcome, stage
  latencies, HTTP requests, delivery attempts, signature verification
  failures — counted by the process that did it, through ``prometheus_client``.
  Under ``gateway serve`` every part (HTTP workers, MLLP listeners, the queue
  reader, the background loop) is a process of its own; the supervisor gives
  them one multiprocess folder (in memory, ``/dev/shm/cyhr-gateway-…/metrics``, else
  ``<database>.run/metrics/``: :func:`metrics_folder`; emptied at start,
  named by ``PROMETHEUS_MULTIPROC_DIR`` before any of them imports
  ``prometheus_client``), and ``/metrics`` adds up every process's files, the
  dead ones' included, so a counter never goes back when a part is restarted.
  Anywhere else (the CLI, tests with Flask's test client) the figures live in
  the process itself.
- **facts of the database** — messages waiting in the processing queue,
  deliveries by state and destination, recognition decisions, the registry
  snapshot's age and time to expiry, the age of the last audit checkpoint —
  read at scrape time by :class:`DatabaseFacts` with short, read-only, indexed
  queries (:mod:`gateway.store.views`), so they are right whichever process changed them.

Nothing here carries patient data: labels are channels, formats, outcomes,
stages, route templates and member USCCs.

The hot path pays a dictionary look-up and an addition per message and per
stage (:func:`count_outcomes`, :class:`Stopwatch`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client import exposition

from gateway.datetimes import seconds_since
from gateway.store.views import OPEN_DELIVERY_STATES, ReadModels, ReadModelsPort

__all__ = ["MULTIPROC_ENV", "CONTENT_TYPE", "MESSAGES", "STAGE_SECONDS", "HTTP_REQUESTS", "HTTP_SECONDS",
           "DELIVERY_ATTEMPTS", "SIGNATURE_FAILURES", "Stopwatch", "count_outcomes", "delivery_attempt",
           "signature_failed", "http_request", "DatabaseFacts", "PartFacts", "render", "multiprocess_dir",
           "prepare_dir", "mark_dead", "read_token"]

log = logging.getLogger(__name__)

#: The environment variable ``prometheus_client`` reads, at import, to count in files shared by processes.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Media type of the text exposition format (0.0.4: what every Prometheus version since 2.0 reads).
CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

# ``*_created`` series double the output and tell a scraper nothing it needs here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: Seconds: from a fraction of a millisecond (parsing one message) to seconds (a large batch, a slow peer).
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MESSAGES = Counter(
    "gateway_messages", "Messages (units of input) by the channel they came in on (mllp, http, file...), their "
    "format and how they ended: stored, filtered, refused, failed, duplicate; queued when answered on receipt "
    "(counted again with their outcome once the queue reader has worked them); unstored when the database could "
    "not take them (no answer: the sender sends them again, and each attempt counts).",
    ["channel", "format", "outcome"])
STAGE_SECONDS = Histogram(
    "gateway_stage_seconds", "Time one message spends in each pipeline stage (parse, map, build, check, sign, "
    "store).", ["stage"], buckets=_BUCKETS)
HTTP_REQUESTS = Counter(
    "gateway_http_requests", "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "gateway_http_request_seconds", "Time to answer an HTTP request, by route template.", ["route"],
    buckets=_BUCKETS)
DELIVERY_ATTEMPTS = Counter(
    "gateway_delivery_attempts", "Attempts to deliver to another member, by destination (USCC) and result: "
    "delivered, retry (to be tried again), dead (given up).", ["destination", "result"])
SIGNATURE_FAILURES = Counter(
    "gateway_signature_failures", "Signed documents from other members that failed verification, by where "
    "(receive: pushed Bundles; pull: 调阅 answers) and reason (bad-signature, untrusted: signer not listed or not "
    "the issuer).", ["where", "reason"])

NATIVE_FALLBACKS = Counter(
    "gateway_native_fallbacks", "Work the compiled twins of the hottest modules handed back to the plain modules "
    "(gateway.native), by kind (a format: hl7v2, cdc-csv; walk; guide) and where (a stage, a walk, the clean "
    "check). Zero in normal running: anything else means a twin disagrees with a declared type.", ["kind", "where"])

#: Children of :data:`MESSAGES`, kept here: ``labels()`` takes a lock and checks its arguments every time.
_message_children: dict[tuple[str, str, str], Any] = {}
_stage_children: dict[str, Any] = {}


def count_outcomes(channel: str, fmt: str, outcomes: Iterable[Any]) -> None:
    """Count messages that ended (each with a ``status``: :class:`gateway.pipeline.Status`)."""
    for outcome in outcomes:
        status = getattr(outcome.status, "value", outcome.status)
        key = (channel or "file", fmt, status)
        child = _message_children.get(key)
        if child is None:
            child = _message_children[key] = MESSAGES.labels(*key)
        child.inc()


def count_unstored(channel: str, fmt: str) -> None:
    """Count a message the database could not take (it was away): no answer went back; its sender sends it again."""
    key = (channel, fmt, "unstored")
    child = _message_children.get(key)
    if child is None:
        child = _message_children[key] = MESSAGES.labels(*key)
    child.inc()


def _stage(name: str) -> Any:
    child = _stage_children.get(name)
    if child is None:
        child = _stage_children[name] = STAGE_SECONDS.labels(name)
    return child


class Stopwatch:
    """Times the stages of one message: each :meth:`lap` records the time since the previous one.

    ``held``: the laps are kept until :meth:`record` (an attempt that may be given up, and then never counts)."""

    __slots__ = ("last", "held")

    def __init__(self, held: bool = False) -> None:
        self.last = time.perf_counter()
        self.held: list[tuple[str, float]] | None = [] if held else None

    def lap(self, stage: Any) -> None:
        """Record the stage just finished (a :class:`gateway.pipeline.Stage` or its name)."""
        now = time.perf_counter()
        if self.held is None:
            _stage(getattr(stage, "value", stage)).observe(now - self.last)
        else:
            self.held.append((getattr(stage, "value", stage), now - self.last))
        self.last = now

    def record(self) -> None:
        """Record the laps held so far (from now on, each as it is made)."""
        for stage, seconds in self.held or ():
            _stage(stage).observe(seconds)
        self.held = None


def native_fallback(kind: str, where: str) -> None:
    """Count one unit or call a compiled twin handed back to its plain module."""
    NATIVE_FALLBACKS.labels(kind, where).inc()


def delivery_attempt(destination: str, result: str) -> None:
    """Count one attempt to deliver to ``destination`` (delivered, retry or dead)."""
    DELIVERY_ATTEMPTS.labels(destination, result).inc()


def signature_failed(where: str, exc: BaseException) -> None:
    """Count a document from another member that did not verify (only trust errors count: a document that
    cannot be read at all is not a signature failure)."""
    from gateway.errors import BadSignature, TrustError

    if isinstance(exc, BadSignature):
        SIGNATURE_FAILURES.labels(where, "bad-signature").inc()
    elif isinstance(exc, TrustError):
        SIGNATURE_FAILURES.labels(where, "untrusted").inc()


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one HTTP request answered (``route``: the route's template, never the path with its values)."""
    HTTP_REQUESTS.labels(method, route, str(status)).inc()
    HTTP_SECONDS.labels(route).observe(seconds)


# -- facts of the database ------------------------------------------------------------------


#: Help of ``gateway_database_up``.
_DATABASE_UP = "Whether the database answered this scrape (1) or not (0: the figures read from it are left out)."


class DatabaseFacts:
    """A ``prometheus_client`` collector of what the database says now (read-only queries of
    :class:`gateway.store.views.ReadModels`, each indexed).

    ``pipeline``: gives the thread's database connection (``pipeline.store.db``),
    the clock and the registry holder (``pipeline.exchange.holder``).
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        """The families, read now; a part that cannot be read is left out (and logged), never a failed scrape.
        ``gateway_database_up`` says whether the database answered (0: every figure read from it is left out, and
        what the processes counted is still there)."""
        now = self.pipeline.clock()
        try:
            views = ReadModels(self.pipeline.store.db)
            parts = [self._queue(views, now)]  # (the first query: whether the database answers at all)
            first = list(parts[0])
        except Exception as exc:  # the database is away (a restart, a failover): said by the gauge, not a 503
            from gateway.logs import database_fault
            from gateway.store.db import fault_reason

            database_fault(log, "metrics", "metrics: the database cannot be read (%s)",
                           fault_reason(exc) or type(exc).__name__)
            yield GaugeMetricFamily("gateway_database_up", _DATABASE_UP, value=0)
            return
        yield GaugeMetricFamily("gateway_database_up", _DATABASE_UP, value=1)
        yield from first
        for part in (self._outbox, self._recognition, self._checkpoint, self._registry):
            try:
                yield from part(views, now)
            except Exception as exc:  # a figure missing beats a scrape failing: monitoring alerts on absence
                log.warning("metrics: %s could not be read (%s)", part.__name__.strip("_"), type(exc).__name__)

    def _queue(self, views: ReadModelsPort, now: _dt.datetime) -> Iterator[Metric]:
        yield GaugeMetricFamily("gateway_queue_depth", "Messages answered on receipt and waiting for the queue "
                                "reader (mllp_ack = received).", value=views.queue_depth())
        age = seconds_since(views.oldest_queued_at(), now)
        yield GaugeMetricFamily("gateway_queue_oldest_seconds", "How long the oldest message in the processing "
                                "queue has waited (0 when none waits).", value=max(0.0, age or 0.0))

    def _outbox(self, views: ReadModelsPort, now: _dt.datetime) -> Iterator[Metric]:
        if "outbox" not in views.tables():
            return
        family = GaugeMetricFamily("gateway_deliveries", "Deliveries to other members in the outbox that are not "
                                   "delivered, by destination (USCC) and state: pending (waiting for its next "
                                   "attempt), delivering, dead (given up).", labels=["destination", "state"])
        for destination, state, n in views.deliveries_by_state(OPEN_DELIVERY_STATES):
            family.add_metric([destination, state], n)
        yield family
        yield GaugeMetricFamily("gateway_deliveries_delivered", "Deliveries in the outbox that were delivered (all "
                                "destinations; per destination see gateway_delivery_attempts_total).",
                                value=views.deliveries_in("delivered"))
        wait = max(0.0, seconds_since(views.oldest_waiting_delivery_at(), now) or 0.0)
        yield GaugeMetricFamily("gateway_delivery_oldest_wait_seconds", "How long the oldest delivery not yet "
                                "delivered (nor given up) has waited (0 when none waits).", value=wait)

    def _recognition(self, views: ReadModelsPort, now: _dt.datetime) -> Iterator[Metric]:
        family = CounterMetricFamily("gateway_recognition_decisions", "互认 decisions recorded by this member, by "
                                     "outcome (recognized, not-recognized, needs-review).", labels=["outcome"])
        counts = {"recognized": 0, "not-recognized": 0, "needs-review": 0}
        counts.update(views.decision_outcomes())  # empty until the first decision made the table
        for outcome, n in counts.items():
            family.add_metric([outcome], n)
        yield family

    def _checkpoint(self, views: ReadModelsPort, now: _dt.datetime) -> Iterator[Metric]:
        age = seconds_since(views.last_own_checkpoint_at(), now)
        if age is not None:  # none made yet: no figure, rather than a misleading one
            yield GaugeMetricFamily("gateway_audit_checkpoint_age_seconds", "Seconds since this member last "
                                    "signed a checkpoint of its audit log.", value=max(0.0, age))

    def _registry(self, views: ReadModelsPort, now: _dt.datetime) -> Iterator[Metric]:
        ex = self.pipeline.exchange
        holder = getattr(ex, "holder", None)
        if holder is None:
            return
        # (a newer snapshot another node applied counts too: it is read from the shared database)
        refresh = getattr(ex, "refresh_registry", None) if getattr(ex, "snapshot_file", None) is not None else None
        if refresh is not None:
            try:
                refresh()  # a snapshot installed a moment ago counts at once (as on /health)
            except Exception:  # a bad new file: the one in force is reported
                pass
        snapshot = holder.current
        if snapshot is None:
            return
        yield GaugeMetricFamily("gateway_registry_snapshot_version", "Version of the registry snapshot in force.",
                                value=snapshot.version)
        yield GaugeMetricFamily("gateway_registry_snapshot_age_seconds", "Seconds since the registry snapshot in "
                                "force was issued by the registry authority.",
                                value=(now - snapshot.issued).total_seconds())
        yield GaugeMetricFamily("gateway_registry_snapshot_expiry_seconds", "Seconds until the registry snapshot "
                                "in force expires (negative: expired; install a newer one).",
                                value=(snapshot.valid_until - now).total_seconds())


class PartFacts:
    """A collector of the processes of ``gateway serve`` as its run folder says (none outside ``serve``):
    whether each part runs, its restarts, and how old its heartbeat is."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        from gateway.heartbeat import beat_age, pid_alive, read_manifest, run_dir

        folder = run_dir(self.settings)
        manifest = read_manifest(folder)
        if manifest is None:
            return
        up = GaugeMetricFamily("gateway_part_up", "1 when the part of `gateway serve` (http-1, mllp-1, queue, "
                               "background...) runs, else 0 (dead or being restarted); a part waiting for another "
                               "to end first has none (see gateway_part_waiting).", labels=["part"])
        waiting = GaugeMetricFamily("gateway_part_waiting", "1 while the part of `gateway serve` waits, by design, "
                                    "for another to end before it starts (an MLLP listener for the catch-up of "
                                    "messages queued by an earlier run).", labels=["part"])
        restarts = CounterMetricFamily("gateway_part_restarts", "Times `gateway serve` restarted the part since "
                                       "it started.", labels=["part"])
        beats = GaugeMetricFamily("gateway_part_heartbeat_age_seconds", "Seconds since the part last reported "
                                  "that it works (listeners, queue reader, background loop; stale means hung).",
                                  labels=["part"])
        for name, part in sorted(manifest.get("parts", {}).items()):
            restarts.add_metric([name], int(part.get("restarts") or 0))
            if part.get("state") == "done":
                continue  # a job that ended (the catch-up of queued messages): not a part that is down
            if part.get("state") == "waiting":
                waiting.add_metric([name], 1)  # not down: an alert on gateway_part_up == 0 stays quiet meanwhile
                continue
            pid = int(part.get("pid") or 0)
            running = part.get("state") == "running" and pid_alive(pid)
            up.add_metric([name], 1 if running else 0)
            if part.get("beats") and running:
                age = beat_age(folder, name, pid)
                if age is not None:
                    beats.add_metric([name], age)
        yield up
        yield waiting
        yield restarts
        yield beats


def read_token(settings: Any) -> str:
    """The token that ``/metrics`` requires, read from ``metrics_token_file``.

    :raises ConfigError: the file cannot be read, is open to group or others, or holds no token.
    """
    from gateway.errors import ConfigError

    from gateway.signing.keys import check_private_file

    path = Path(settings.metrics_token_file).expanduser()
    check_private_file(path, "metrics_token_file")  # a secret: as a key's password file, the gateway's user's only
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"metrics_token_file {path}: cannot be read ({reason})", "metrics_token_file") from None
    if not token:
        raise ConfigError(f"metrics_token_file {path} holds no token", "metrics_token_file")
    return token


# -- exposition ------------------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    """The multiprocess folder this process counts in (under ``gateway serve``), or None."""
    folder = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return Path(folder) if folder else None


class _ThisProcess:
    """The figures of this process (single-process mode): the default registry's, read at each collect."""

    def collect(self) -> Iterator[Metric]:
        yield from prometheus_client.REGISTRY.collect()


def render(*collectors: Any) -> bytes:
    """The text exposition of every figure: what the processes counted (all of them under ``gateway serve``)
    and what ``collectors`` (:class:`DatabaseFacts`, :class:`PartFacts`) read now."""
    registry = CollectorRegistry(auto_describe=False)
    folder = multiprocess_dir()
    if folder is not None and folder.is_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry)


def metrics_folder(run: Path) -> Path:
    """Where ``gateway serve``'s parts count: in memory (``/dev/shm``, a folder named after ``run``) when the machine
    has it, else ``run/metrics``. Each process counts in files of its own that it maps into memory; one made on a
    full disk kills its process (SIGBUS) at its first count: an HTTP worker started while the data disk was full
    died at its first request, and its restarts stopped the whole gateway."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        key = hashlib.sha256(str(run.absolute()).encode("utf-8")).hexdigest()[:16]
        return shm / f"cyhr-gateway-{os.getuid()}-{key}" / "metrics"
    return run / "metrics"


def remove_dir(folder: Path) -> None:
    """The multiprocess folder removed once ``gateway serve`` has stopped (in memory, it would stay till reboot)."""
    if folder.parent.name.startswith("cyhr-gateway-"):
        shutil.rmtree(folder.parent, ignore_errors=True)


def prepare_dir(folder: Path) -> Path:
    """An empty multiprocess folder (what an earlier run counted is gone: counters start again at 0)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in folder.glob("*.db"):
        old.unlink(missing_ok=True)
    return folder


def mark_dead(pid: int, folder: Path | None) -> None:
    """Forget the live-only figures of a dead process (its counters are kept: they still add up)."""
    if folder is None:
        return
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]
    except OSError as exc:
        log.warning("metrics of dead process %d not cleared (%s)", pid, type(exc).__name__)
