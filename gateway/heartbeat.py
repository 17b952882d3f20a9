"""Heartbeats: how ``/health`` knows that every process of ``gateway serve`` is alive and working.

``gateway serve`` keeps a run folder beside the database (``<database>.run/``):

- ``serve.json``, written by the supervisor whenever a process starts, dies or
  is restarted: the supervisor's process id and, for each part (``mllp-1``,
  ``queue``, ``background``, ``http-1``...), its process id, state, start time,
  restart count and last exit code;
- ``<part>.beat``, one small file per long-running part, holding its process id;
  the part touches it every :data:`BEAT_SECONDS` while it really works (the
  MLLP listener from inside its event loop, the background loop between passes),
  so a hung part goes stale even though its process lives.

Files, not database rows: a heartbeat every two seconds from several processes
would compete with ingest for SQLite's single write lock, and a part must still
be seen alive while the database is busy. Nothing in these files is patient data.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Settings

__all__ = ["BEAT_SECONDS", "Beat", "run_dir", "read_manifest", "write_manifest", "beat_age", "beat_stamp",
           "pid_alive", "leftover_parts", "boot_id", "process_start"]

#: How often a part touches its heartbeat file.
BEAT_SECONDS = 2.0
MANIFEST = "serve.json"


def run_dir(settings: Settings) -> Path:
    """The run folder of a gateway: beside its SQLite file, so that two gateways never share one. On
    PostgreSQL, where several nodes share the database, in ``data_dir`` and named by the node's HTTP port: two
    nodes started on one host from the same configuration (only the ports told apart) keep apart too."""
    db = settings.database_file
    if db is None:
        return Path(settings.data_dir) / f"node-{settings.http_port}.run"
    return db.with_name(db.name + ".run")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Replace ``serve.json`` atomically (a reader never sees half of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(manifest, sort_keys=True), encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)
    except OSError:  # (a full disk): no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The supervisor's ``serve.json``, or None when no ``gateway serve`` runs on this database."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not pid_alive(int(data.get("pid", 0))):
        return None  # left behind by a gateway that is gone
    return data


def boot_id() -> str:
    """This machine's boot id ('' when it cannot be read): process ids of another boot name other processes."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of process ``pid`` from /proc, or None when there is
    none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace").rpartition(")")[2].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc), or None when there is none: with the boot id, it
    tells the process that had this id from another that has it now."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def leftover_parts(folder: Path) -> list[tuple[str, int, str]]:
    """The parts of an earlier ``gateway serve`` on this database whose supervisor is gone but which still run:
    (title, process id, state: ``stopped`` or ``running``). A part stops by itself within a second of its
    supervisor's death, unless it is stopped (SIGSTOP) or hung — and then may hold the database's write lock. A
    process is taken for the part only when it is the very process ``serve.json`` names (this boot, the same start
    time), never another that has its id now."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or pid_alive(int(data.get("pid", 0))):
            return []  # none left, or its supervisor runs
        if not data.get("boot") or data.get("boot") != boot_id():
            return []  # written before this boot (or by a release that kept no boot id)
        parts = data.get("parts") or {}
    except (OSError, ValueError, TypeError):
        return []
    found = []
    for name, part in sorted(parts.items()) if isinstance(parts, dict) else []:
        try:
            pid = int(part.get("pid") or 0)
        except (ValueError, TypeError, AttributeError):
            continue
        stat = _stat(pid) if pid > 0 and pid != os.getpid() else None
        if stat is None or stat[0] == "Z" or str(stat[1]) != str(part.get("since")):
            continue  # gone, ended (not yet reaped), or another process has this id now
        found.append((str(part.get("title") or name), pid, "stopped" if stat[0] in ("T", "t") else "running"))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def beat_age(folder: Path, part: str, pid: int | None = None) -> float | None:
    """Seconds since ``part`` last beat, or None when it has not beaten (or the beat is another process's)."""
    stamp = beat_stamp(folder, part, pid)
    return None if stamp is None else max(0.0, time.time() - stamp)


def beat_stamp(folder: Path, part: str, pid: int | None = None) -> float | None:
    """When ``part`` last beat (its file's modification time), or None when it has not beaten (or the beat is
    another process's)."""
    path = folder / f"{part}.beat"
    try:
        stamp = path.stat().st_mtime
        if pid is not None and int(path.read_text(encoding="ascii") or 0) != pid:
            return None
    except (OSError, ValueError):
        return None
    return stamp


class Beat:
    """The heartbeat of one part: a thread that touches ``<part>.beat`` while ``working()`` says so.

    ``schedule``: how a touch is run. The MLLP listener passes a function that
    runs it on its event loop, so that a blocked loop stops the heartbeat.
    """

    def __init__(self, folder: Path, part: str, working: Callable[[], bool] = lambda: True,
                 schedule: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.path = folder / f"{part}.beat"
        self.working = working
        self.schedule = schedule
        self._stop = threading.Event()
        self._written = False
        folder.mkdir(parents=True, exist_ok=True)

    def touch(self) -> None:
        """Record that the part is alive now."""
        try:
            if not self._written:  # the first beat of this process claims the file
                self.path.write_text(str(os.getpid()), encoding="ascii")
                self._written = True
            else:
                os.utime(self.path)
        except OSError:  # the run folder is gone (serve is stopping): nothing to report to
            pass

    def start(self) -> "Beat":
        """Beat now and then every :data:`BEAT_SECONDS` from a daemon thread, until :meth:`stop`."""
        threading.Thread(target=self._run, name=f"heartbeat-{self.path.stem}", daemon=True).start()
        return self

    def _run(self) -> None:
        while True:
            if self.working():
                if self.schedule is None:
                    self.touch()
                else:
                    try:
                        self.schedule(self.touch)
                    except RuntimeError:  # the loop is closed: the part is stopping
                        pass
            if self._stop.wait(BEAT_SECONDS):
                return

    def stop(self) -> None:
        self._stop.set()
