"""Health: liveness and readiness for load balancers, monitoring and operators.

``GET /health`` (open: no token) answers 200 when every check passes and 503
when one fails, with ``status`` (``ok`` or ``failing``), the names of the
failing checks, and each check with ``ok`` and a ``detail`` for people:

- ``database``: it answers (with the message counts beside), a SQLite database's files can be written, no write
  was refused since the last that went through (a full disk, an I/O error: :func:`gateway.store.postgresql.
  write_failure`, in this process), and on PostgreSQL no transaction has held the write lock for longer than
  :data:`WRITE_STALL_SECONDS` (writes on every node wait for it: a node stopped while writing);
- ``http``, ``mllp-1``..., ``queue``, ``background``: under ``gateway serve``,
  every process runs and the ones that beat (:mod:`gateway.heartbeat`) beat
  recently — a dead, restarting or hung listener, queue reader or background
  loop fails its check;
- ``backlog``: no more than ``health_max_backlog`` messages wait in
  the processing queue, and none for longer than ``health_max_backlog_age``;
- ``abandoned``: no message was left unfinished by a process that is gone
  (or whose lease expired) for longer than two background passes
  (2 × ``delivery_interval``): the background loop works such messages again,
  so one that stays is a loop that does not keep up or does not run;
- ``dead_letters``: no delivery to another member has been given up;
- ``deliveries``: no delivery has waited longer than ``health_max_delivery_wait``;
- ``registry``: the registry snapshot does not expire within ``snapshot_warn_days``, and the snapshot file
  installed is the one in force (one refused — another key's, older, other content under a version applied — fails
  the check).

Nothing here names a patient or a message: only counts, ages and states.
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Any

from flask import Blueprint, Response, current_app

from gateway import __version__, jsonutil
from gateway.api.app import pipeline_of
from gateway.config import Settings
from gateway.datetimes import seconds_since
from gateway.store.db import LOW_DISK_BYTES, dialect, disk_free, fault_reason, unwritable
from gateway.store.postgresql import IDLE_IN_TRANSACTION_S, write_failure, write_lock_holder
from gateway.store.views import ReadModels
# a part silent this long is taken for hung (it beats every two seconds; sooner when it is restarted sooner); one
# that has not beaten yet is starting for STARTING_SECONDS
from gateway.supervise import SILENT_SECONDS, STARTING_SECONDS

bp = Blueprint("health", __name__)

#: A transaction holding the database's write lock longer than this (seconds) fails the ``database`` check: writes
#: of every node wait for it (the gateway's own transactions take milliseconds).
WRITE_STALL_SECONDS = 10.0


def _check(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


def _age(stamp: str | None, now: _dt.datetime) -> float | None:
    """Seconds from an ISO time the gateway wrote to ``now`` (never negative)."""
    age = seconds_since(stamp, now)
    return None if age is None else max(0.0, age)


def _parts(settings: Settings) -> dict[str, dict[str, Any]]:
    """Checks of the processes of ``gateway serve`` (none when the API runs on its own)."""
    from gateway.heartbeat import beat_age, pid_alive, read_manifest, run_dir
    from gateway.supervise import DATABASE_AWAY, describe_exit

    folder = run_dir(settings)
    manifest = read_manifest(folder)
    if manifest is None:
        return {}
    checks: dict[str, dict[str, Any]] = {}
    http_total = http_up = 0
    now = time.time()
    parts = manifest.get("parts", {})
    for name, part in sorted(parts.items()):
        title = part.get("title", name)
        if part.get("state") == "done":
            continue  # a job that ended (the catch-up of queued messages)
        if part.get("state") == "waiting":
            first = parts.get(part.get("after"), {}).get("title", part.get("after"))
            checks[name] = _check(False, f"{title} waits for the {first} to end before it starts")
            continue
        running = part.get("state") == "running" and pid_alive(int(part.get("pid") or 0))
        restarts = int(part.get("restarts") or 0)
        again = f"; restarted {restarts} time(s)" if restarts else ""
        if name.startswith("http-"):
            http_total += 1
            http_up += running
            continue
        if not running:
            last = part.get("last_exit")
            if last is not None and int(last) == DATABASE_AWAY:
                checks[name] = _check(False, f"{title} could not reach the database as it started; it is started "
                                             f"again until the database answers{again}")
                continue
            how = f"died with {describe_exit(int(last))}" if last is not None else "is not running"
            checks[name] = _check(False, f"{title} {how}; it is being restarted{again}")
            continue
        age = beat_age(folder, name, int(part.get("pid") or 0)) if part.get("beats") else 0.0
        if age is None:
            since = now - float(part.get("started") or now)
            if since < STARTING_SECONDS:
                checks[name] = _check(True, f"{title} is starting{again}")
            else:
                checks[name] = _check(False, f"{title} has not reported alive in the {since:.0f} s since it "
                                             f"started (hung?){again}")
        elif age > (min(SILENT_SECONDS, settings.hung_restart_after) if settings.hung_restart_after
                    else SILENT_SECONDS):
            checks[name] = _check(False, f"{title} last reported alive {age:.0f} s ago (hung?){again}")
        else:
            checks[name] = _check(True, f"{title} alive{again}")
    if http_total:
        checks["http"] = _check(http_up == http_total, f"{http_up} of {http_total} HTTP worker(s) running")
    return checks


def _writes(db: Any) -> dict[str, Any]:
    """The ``database`` check of a database that answers: failing while writes wait for a holder of the write lock
    (PostgreSQL), or when the last write of this process was refused (a full disk, an I/O error)."""
    if dialect(db) == "postgresql":
        holder = write_lock_holder(db)
        if holder is not None and holder["held"] > WRITE_STALL_SECONDS:
            how = (f"{holder['state']} for {holder['idle']:.0f} s (ended after {IDLE_IN_TRANSACTION_S} s: a client "
                   "stopped while writing)" if holder["on_client"] else f"{holder['state'] or 'state unknown'}")
            return _check(False, f"answers, but writes are stalled: the write lock is held by "
                                 f"{holder['application'] or '?'} (server pid {holder['pid']}) for "
                                 f"{holder['held']:.0f} s, {how}; {holder['waiting']} session(s) wait for it")
    failure = write_failure()
    if failure is not None:
        text, when = failure
        return _check(False, f"answers, but refused a write {max(0.0, time.time() - when):.0f} s ago: {text} "
                             "(the next write that goes through clears this)")
    return _check(True, "answers")


def _work(pipeline: Any, settings: Settings) -> dict[str, dict[str, Any]]:
    """Checks of the processing queue and of deliveries to other members (read-only queries of its own)."""
    views = ReadModels(pipeline.store.db)
    now = pipeline.clock()
    checks: dict[str, dict[str, Any]] = {}
    limit = settings.health_max_backlog
    waiting = views.queued_up_to(limit + 1)
    age = _age(views.oldest_queued_at(), now)
    if waiting > limit:
        checks["backlog"] = _check(False, f"more than {limit} messages wait in the processing queue "
                                          "(health_max_backlog)")
    elif age is not None and age > settings.health_max_backlog_age:
        checks["backlog"] = _check(False, f"the oldest message in the processing queue has waited {age:.0f} s "
                                          f"(health_max_backlog_age {settings.health_max_backlog_age} s)")
    else:
        checks["backlog"] = _check(True, f"{waiting} message(s) in the processing queue")
    grace = 2 * settings.delivery_interval
    left = len(pipeline.store.abandoned(tuple(pipeline.channels), limit=limit + 1, idle=grace))
    if left:
        many = f"more than {limit}" if left > limit else str(left)
        checks["abandoned"] = _check(False, f"{many} message(s) left unfinished by a process that is gone, for "
                                            f"more than {grace} s: see `gateway messages list --status received`, "
                                            "then `gateway messages retry ID`")
    else:
        checks["abandoned"] = _check(True, "no message left unfinished by a process that is gone")
    if "outbox" in views.tables():
        dead = views.deliveries_in("dead")
        checks["dead_letters"] = _check(
            not dead, f"{dead} delivery(ies) to other members given up: see `gateway outbox list --status dead`, "
                      "then `gateway outbox retry ID...` (or --dead for every one)" if dead else "no delivery given up")
        wait = _age(views.oldest_waiting_delivery_at(), now)
        if wait is not None and wait > settings.health_max_delivery_wait:
            checks["deliveries"] = _check(False, f"the oldest delivery to another member has waited {wait:.0f} s "
                                                 f"(health_max_delivery_wait {settings.health_max_delivery_wait} s)")
        else:
            checks["deliveries"] = _check(True, "deliveries on time")
    return checks


def _registry(pipeline: Any, settings: Settings) -> dict[str, dict[str, Any]]:
    """The registry snapshot in force and how long it stays valid."""
    ex = pipeline.exchange
    holder = getattr(ex, "holder", None)
    if holder is None:
        return {}
    # (a newer snapshot another node applied counts too: it is read from the shared database)
    refresh = getattr(ex, "refresh_registry", None) if getattr(ex, "snapshot_file", None) is not None else None
    if refresh is not None:
        try:
            refresh()  # a newly installed snapshot counts at once
        except Exception:  # a bad new file: the one in force is still judged below
            pass
    snapshot = holder.current
    if snapshot is None:
        return {"registry": _check(False, "no registry snapshot is loaded")}
    refused = getattr(getattr(ex, "snapshot_file", None), "refused", None)
    if refused:
        return {"registry": _check(False, f"the registry snapshot file {settings.registry_snapshot} was refused "
                                          f"({refused}); version {snapshot.version} stays in force: install a "
                                          "snapshot the registry authority signed, newer than the one in force")}
    return _validity("registry", f"registry snapshot {snapshot.version}", snapshot.valid_until, pipeline.clock(),
                     snapshot.valid_until.isoformat(timespec="seconds"), settings.snapshot_warn_days,
                     "snapshot_warn_days", "install a newer one")


def _validity(check: str, what: str, end: _dt.datetime, now: _dt.datetime, until: str, warn_days: int,
              setting: str, remedy: str) -> dict[str, dict[str, Any]]:
    """Check ``check`` of something valid until ``end`` (written ``until``): failing once it has ended, or within
    ``warn_days`` days (the setting named) of its end, saying the ``remedy``."""
    left = (end - now).total_seconds()
    if left <= 0:
        return {check: _check(False, f"{what} expired at {until}; {remedy}")}
    if left <= warn_days * 86400:
        return {check: _check(False, f"{what} expires at {until}, within {warn_days} day(s) ({setting}); {remedy}")}
    return {check: _check(True, f"{what} valid until {until}")}


def _signing(pipeline: Any, settings: Settings) -> dict[str, dict[str, Any]]:
    """This member's signing certificate: every report it issues is signed with it, and peers refuse a signature
    made outside its validity."""
    signer = getattr(getattr(pipeline, "member", None), "signer", None)
    if signer is None:
        return {}
    cert = signer.identity.chain[0]
    now = pipeline.clock()
    if now < cert.not_valid_before_utc:
        starts = cert.not_valid_before_utc.astimezone(now.tzinfo).isoformat(timespec="seconds")
        return {"signing": _check(False, f"the signing certificate is valid only from {starts}: reports "
                                         "cannot be signed (check this machine's clock)")}
    listed = _listed(pipeline.member, cert, now)
    if listed is not None:
        return {"signing": listed}
    return _validity("signing", "the signing certificate", cert.not_valid_after_utc, now,
                     cert.not_valid_after_utc.astimezone(now.tzinfo).isoformat(timespec="seconds"),
                     settings.certificate_warn_days,
                     "certificate_warn_days", "reports cannot be signed after it: ask the registry authority for a "
                     "new one")


def _listed(member: Any, cert: Any, now: Any) -> dict[str, Any] | None:
    """A failing check when the registry snapshot in force does not vouch for this gateway's own signing
    certificate (revoked, the member's listing ended): every member refuses what it signs, while its LIS still gets
    AA and its deliveries go dead. None when it does, or when there is no snapshot to ask (said by its own check)."""
    from gateway.errors import GatewayError, TrustError
    from gateway.signing.trust import check_certificate

    if getattr(member, "holder", None) is None:
        return None
    try:
        snapshot = member.snapshot()
    except GatewayError:  # (an expired snapshot: the registry check says so)
        return None
    from gateway.referrals import trust_with_authorities

    try:  # (a supervising authority's gateway is listed under authorities, not members)
        check_certificate(cert, trust_with_authorities(snapshot), now, location="signing_cert")
    except TrustError as exc:
        return _check(False, f"the registry snapshot in force (version {snapshot.version}) does not vouch for this "
                             f"gateway's signing certificate ({exc.message}): other members refuse every report it "
                             "signs; ask the registry authority")
    return None


def _audit_log(settings: Settings) -> dict[str, dict[str, Any]]:
    """What the background's last walk of the audit log found (:mod:`gateway.audit.watch`); none before one."""
    from gateway.audit.watch import last
    from gateway.heartbeat import run_dir

    found = last(run_dir(settings))
    if found is None:
        return {}
    if found["ok"]:
        return {"audit": _check(True, f"the log's {found.get('entries')} entries verified at {found.get('checked')}")}
    first = found.get("first_bad")
    where = f"first bad entry {first}" if first is not None else "its protection is damaged"
    return {"audit": _check(False, f"the audit log does not verify ({where}, checked at {found.get('checked')}): "
                                   "its figures cannot be trusted; run `gateway audit verify`")}


@bp.get("/health")
def health() -> Response:
    """200 when every check passes, 503 naming the failing ones."""
    pipeline = pipeline_of(current_app)
    settings: Settings = current_app.extensions.get("gateway.settings") or pipeline.settings
    checks: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    try:
        counts = pipeline.store.counts()
        blocked = unwritable(settings.database_locator)
        free = disk_free(settings.database_locator)
        # (a SQLite file this node cannot write answers reads, but every message sent here would fail)
        if blocked:
            checks["database"] = _check(False, f"answers, but cannot be written: {', '.join(blocked)}")
        elif free is not None and free < LOW_DISK_BYTES:
            checks["database"] = _check(False, f"answers, but its disk is full: {free // 1024} KiB free where it "
                                               f"lives (writes fail below {LOW_DISK_BYTES // 1048576} MiB)")
        else:
            checks["database"] = _writes(pipeline.store.db)
        checks.update(_work(pipeline, settings))
    except Exception as exc:  # a broken database is what this check is for
        checks["database"] = _check(False, f"cannot be read: {fault_reason(exc, named=False) or type(exc).__name__}")
    try:
        checks.update(_parts(settings))
    except Exception as exc:
        checks["processes"] = _check(False, f"could not be checked ({type(exc).__name__})")
    try:
        checks.update(_registry(pipeline, settings))
    except Exception as exc:
        checks["registry"] = _check(False, f"could not be checked ({type(exc).__name__})")
    try:
        checks.update(_signing(pipeline, settings))
    except Exception as exc:
        checks["signing"] = _check(False, f"could not be checked ({type(exc).__name__})")
    try:
        checks.update(_audit_log(settings))
    except Exception as exc:
        checks["audit"] = _check(False, f"could not be checked ({type(exc).__name__})")
    failing = sorted(name for name, c in checks.items() if not c["ok"])
    body = {"status": "failing" if failing else "ok", "version": __version__, "failing": failing,
            "checks": checks, "messages": counts}
    return Response(jsonutil.dumps(body), status=503 if failing else 200, mimetype="application/json")
