"""Supervise: ``gateway serve`` keeps every process it starts running, or stops them all.

Each part of a running gateway (HTTP workers, MLLP listeners, the queue reader,
the background loop) is a child process. A child that dies is started again
after a short pause that grows when the same part keeps dying, and the restart
is logged at WARNING with what died and how. More than ``restart_limit``
restarts within :data:`WINDOW_SECONDS` and the supervisor stops every child
and exits non-zero: a gateway runs whole or not at all, never half. A part that
writes a heartbeat and has not beaten for ``hung_after`` seconds (a blocked
event loop, a stopped process, a pass that never ends) is hung: it is killed and
started again like a part that died. A part may be a job that ends (``once``), others
waiting for it to be done (``after``) before they start. SIGTERM,
SIGINT or SIGHUP (the terminal closed: said in the log) stops every child
(gracefully, then by force after ``grace`` seconds) and exits 0. A child that
exits with status 2 has refused its configuration (it says why on stderr):
restarting it cannot help, so the gateway stops with exit status 2. A child that
exits with :data:`DATABASE_AWAY` could not reach the database as it started (a
restart, a failover): it is started again every few seconds until the database answers, and those restarts do not
count against ``restart_limit`` — an outage of the database never stops the gateway (the parts that run answer
503 or no ACK meanwhile, and the log says so).

What runs, what died and how often is kept in the run folder's ``serve.json``
(:mod:`gateway.heartbeat`), where ``/health`` reads it. When the parts count
their metrics in a shared folder (:mod:`gateway.metrics`), a dead part's
live-only figures are cleared there before it is started again.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.heartbeat import beat_stamp, boot_id, process_start, write_manifest

__all__ = ["Part", "Supervisor", "WINDOW_SECONDS", "describe_exit", "DATABASE_AWAY"]

#: Exit status of a part that could not reach the database as it started (EX_TEMPFAIL, sysexits.h).
DATABASE_AWAY = 75

log = logging.getLogger(__name__)

#: Restarts are counted over this many seconds (10 minutes).
WINDOW_SECONDS = 600.0
#: A part that has not beaten yet is starting for at least this long (loading its tables, opening the database).
STARTING_SECONDS = 60.0
#: A part silent for this long is said to be hung (``/health`` and, when hung parts are not restarted, a log line).
SILENT_SECONDS = 15.0
#: A supervisor that has not looked at the heartbeats for this long was itself paused (the whole process group
#: stopped, a suspended machine): every part is given its full time again rather than taken for hung.
PAUSED_SECONDS = 5.0


@dataclass
class Part:
    """One child process of the gateway and how to start it."""

    name: str  # short and stable: http-1, mllp-1, queue, background
    title: str  # for people: "HTTP worker 1", "MLLP listener 1"
    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    beats: bool = False  # writes a heartbeat that /health checks
    once: bool = False  # a job that ends: exit status 0 is done (not restarted), another a death
    after: str = ""  # the name of a job (``once``) that must be done before this part starts
    proc: subprocess.Popen[bytes] | None = None
    state: str = "new"  # running | restarting | stopped | waiting (for ``after``) | done (a job)
    started: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    due: float = 0.0  # when a restart is due
    deaths: collections.deque[float] = field(default_factory=collections.deque)
    hung: float | None = None  # seconds it had not beaten for when it was killed as hung
    beat: float | None = None  # its heartbeat's last time stamp the supervisor saw (None: not beaten yet)
    beat_seen: float = 0.0  # when (monotonic, the supervisor's clock) that stamp was first seen, or it started
    since: int | None = None  # when its process started (clock ticks since boot): who has its process id
    warned: bool = False  # said to be hung (hung parts left running) since its last heartbeat


def describe_exit(code: int) -> str:
    """An exit status in words: ``exit code 1`` or ``exit code -9 (killed by SIGKILL)``."""
    if code < 0:
        try:
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


#: Seconds between attempts to write ``serve.json`` again after it could not be written.
_RESAVE_SECONDS = 2.0


class Supervisor:
    """Starts the parts, restarts the ones that die, and stops them all on a signal or too many restarts."""

    def __init__(self, parts: list[Part], *, restart_limit: int, run_dir: Path | None = None,
                 env: dict[str, str] | None = None, grace: float = 20.0, backoff: float = 0.5,
                 backoff_cap: float = 10.0, window: float = WINDOW_SECONDS, metrics_dir: Path | None = None,
                 hung_after: float = 0.0) -> None:
        self.parts = parts
        self.hung_after = hung_after  # seconds without a heartbeat that make a part hung (0: never)
        self.looked = 0.0  # when the heartbeats were last looked at
        self.metrics_dir = metrics_dir  # the parts' multiprocess metrics (gateway.metrics), when they count there
        self.restart_limit = restart_limit
        self.run_dir = run_dir
        self.env = env
        self.grace = grace
        self.backoff, self.backoff_cap, self.window = backoff, backoff_cap, window
        self.restart_times: collections.deque[float] = collections.deque()
        self.stopping = False
        self.started = time.time()
        self.exit_code = 0
        self.unsaved: float | None = None  # when serve.json last failed to be written (retried until it is)
        self.boot = boot_id()  # (serve.json: a later start tells this run's processes from others by it)

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until a signal (0), until restarts pass the limit (1) or a child refuses its configuration (2).

        Every child is stopped on return.
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for part in self.parts:
                if part.after:
                    part.state = "waiting"
                else:
                    self._start(part)
            self._save()
            while not self.stopping and self._check():
                time.sleep(0.1)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGHUP and not self.stopping:  # (said once: a second Ctrl-C is the same stop)
            log.info("%s: stopping every process", signal.Signals(signum).name)
        if signum == signal.SIGHUP and not self.stopping:  # the terminal or SSH session that started it closed: it
            # stops as on SIGTERM, every part cleanly, and says why (it ended at once, and only its parts said so)
            log.warning("SIGHUP (the terminal that started this gateway closed): stopping every process; run it "
                        "under systemd or another service manager to keep it running")
        self.stopping = True

    def _start(self, part: Part) -> None:
        part.proc = subprocess.Popen(part.argv, pass_fds=part.pass_fds, env=self.env)
        part.state, part.started = "running", time.time()
        part.beat, part.beat_seen = None, time.monotonic()
        part.since = process_start(part.proc.pid)
        log.info("%s started (pid %d)", part.title, part.proc.pid)

    def _check(self) -> bool:
        """Reap dead children and start the ones due; False when the restart limit is passed."""
        now = time.monotonic()
        changed = False
        if self.run_dir is not None and now - self.looked >= 1.0 and not self.stopping:
            paused = self.looked > 0 and now - self.looked > PAUSED_SECONDS
            self.looked = now
            self._watch_heartbeats(paused)
        for part in self.parts:
            if part.state == "running" and part.proc is not None:
                code = part.proc.poll()
                if code is None:
                    continue
                if self.stopping:
                    return True
                changed = True
                if part.once and code == 0 and part.hung is None:
                    part.last_exit, part.state = code, "done"
                    self._forget_beat(part)
                    self._forget_metrics(part.proc.pid)
                    log.info("%s (pid %d) done", part.title, part.proc.pid)
                    for waiting in self.parts:
                        if waiting.state == "waiting" and waiting.after == part.name:
                            self._start(waiting)
                    continue
                part.last_exit, part.state = code, "restarting"
                how = describe_exit(code) + (f", killed as hung ({part.hung:.0f} s without a heartbeat)"
                                             if part.hung is not None else "")
                part.hung = None
                self._forget_beat(part)
                self._forget_metrics(part.proc.pid)
                while self.restart_times and self.restart_times[0] < now - self.window:
                    self.restart_times.popleft()
                while part.deaths and part.deaths[0] < now - self.window:
                    part.deaths.popleft()
                if code == 2:
                    log.error("%s (pid %d) refused to start (%s); stopping the whole gateway", part.title,
                              part.proc.pid, describe_exit(code))
                    self.exit_code = 2
                    return False
                if code == DATABASE_AWAY:  # (the part said why): tried again until the database answers, not counted
                    part.due = now + self.backoff_cap
                    log.info("%s (pid %d) could not reach the database; starting it again in %.1f s", part.title,
                             part.proc.pid, self.backoff_cap)
                    continue
                if len(self.restart_times) >= self.restart_limit:
                    log.error("%s (pid %d) died with %s; %d restarts within %d minutes already (restart_limit "
                              "%d): stopping the whole gateway", part.title, part.proc.pid, how,
                              len(self.restart_times), self.window // 60, self.restart_limit)
                    self.exit_code = 1
                    return False
                pause = min(self.backoff_cap, self.backoff * 2 ** len(part.deaths))
                part.deaths.append(now)
                self.restart_times.append(now)
                part.due = now + pause
                log.warning("%s (pid %d) died with %s; restarting it in %.1f s (restart %d of at most %d within "
                            "%d minutes)", part.title, part.proc.pid, how, pause,
                            len(self.restart_times), self.restart_limit, self.window // 60)
            elif part.state == "restarting" and now >= part.due and not self.stopping:
                part.restarts += 1
                self._start(part)
                changed = True
        if changed or (self.unsaved is not None and now - self.unsaved >= _RESAVE_SECONDS):
            self._save()
        return True

    def _watch_heartbeats(self, paused: bool = False) -> None:
        """Kill every running part that writes a heartbeat and has not beaten for ``hung_after`` seconds (or has
        not beaten at all that long, and :data:`STARTING_SECONDS`, after it started); :meth:`_check` then starts
        it again as a part that died. SIGKILL: a hung process may not answer SIGTERM (a stopped one cannot). With
        ``hung_after`` 0 a part silent for :data:`SILENT_SECONDS` is said once in the log, and left running.

        How long a part has not beaten is counted on this supervisor's own clock, from when it saw the heartbeat
        change: a step of the wall clock changes nothing, and after ``paused`` (this supervisor did not run for a
        while: the whole gateway was stopped, the machine suspended) every part is given its full time again."""
        assert self.run_dir is not None
        now = time.monotonic()
        for part in self.parts:
            if not part.beats or part.state != "running" or part.proc is None or part.hung is not None:
                continue
            stamp = beat_stamp(self.run_dir, part.name, part.proc.pid)
            if stamp is not None and stamp != part.beat:
                part.beat, part.beat_seen, part.warned = stamp, now, False
            if paused:
                part.beat_seen = now
            age = now - part.beat_seen
            if self.hung_after <= 0:  # hung parts are left running: said once, while /health says it too
                if part.beat is not None and age >= SILENT_SECONDS and not part.warned:
                    part.warned = True
                    log.warning("%s (pid %d) has not reported alive for %.0f s (hung?); hung_restart_after is 0: "
                                "left running", part.title, part.proc.pid, age)
                continue
            if part.beat is None:  # not beaten yet: starting, unless that has taken too long
                if age < max(self.hung_after, STARTING_SECONDS):
                    continue
                how = f"has not reported alive in the {age:.0f} s since it started"
            elif age < self.hung_after:
                continue
            else:
                how = f"has not reported alive for {age:.0f} s"
            if part.proc.poll() is not None:
                continue  # died meanwhile: reaped as such
            log.error("%s (pid %d) %s (hung_restart_after %g s): killing it to start it again", part.title,
                      part.proc.pid, how, self.hung_after)
            part.hung = age
            try:
                part.proc.kill()
            except ProcessLookupError:
                pass

    def _stop_all(self) -> None:
        """SIGTERM every child, wait up to ``grace`` seconds, then SIGKILL the ones still running."""
        self.stopping = True
        alive = [p for p in self.parts if p.proc is not None and p.proc.poll() is None]
        for part in alive:
            try:
                part.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                part.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]  # a stopped one acts on it
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace
        for part in alive:
            assert part.proc is not None
            try:
                part.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %g s; killed", part.title, part.proc.pid, self.grace)
                part.proc.kill()
                part.proc.wait(5)
        for part in self.parts:
            part.state = "stopped"
        self._save(final=True)

    # -- the run folder ----------------------------------------------------------------------

    def _forget_metrics(self, pid: int) -> None:
        """A dead part's live-only figures go; its counters stay in the sums that ``/metrics`` shows."""
        if self.metrics_dir is not None:
            from gateway.metrics import mark_dead

            mark_dead(pid, self.metrics_dir)

    def _forget_beat(self, part: Part) -> None:
        if self.run_dir is not None and part.beats:
            try:
                (self.run_dir / f"{part.name}.beat").unlink()
            except OSError:
                pass

    def _save(self, final: bool = False) -> None:
        """Write ``serve.json`` (removed once everything has stopped)."""
        if self.run_dir is None:
            return
        if final:
            try:
                (self.run_dir / "serve.json").unlink()
            except OSError:
                pass
            return
        try:
            write_manifest(self.run_dir, {
                "pid": os.getpid(), "started": self.started, "restarts": len(self.restart_times), "boot": self.boot,
                "restart_limit": self.restart_limit,
                "parts": {p.name: {"title": p.title, "pid": p.proc.pid if p.proc else 0, "state": p.state,
                                   "started": p.started, "restarts": p.restarts, "last_exit": p.last_exit,
                                   "beats": p.beats, "since": p.since, **({"after": p.after} if p.after else {})}
                          for p in self.parts},
            })
        except OSError as exc:  # a full disk, a folder gone: the parts go on; /health reads the last manifest
            if self.unsaved is None:
                log.error("the run folder %s cannot be written (%s): `gateway serve` goes on; what /health says of "
                          "the parts may be out of date until it can (tried again every %g s)", self.run_dir,
                          exc.strerror or type(exc).__name__, _RESAVE_SECONDS)
            self.unsaved = time.monotonic()
            return
        if self.unsaved is not None:
            self.unsaved = None
            log.info("the run folder %s can be written again: what /health says of the parts is current",
                     self.run_dir)
