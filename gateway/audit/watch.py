"""The audit log checked in the background.

``gateway audit verify`` finds a changed, removed or reordered entry — when someone runs it. Meanwhile the
figures built from the log (互认率 in ``/audit/stats`` and the console) would quietly count an edited entry. So
``gateway serve``'s background part walks the whole chain the same way, against this gateway's own checkpoints,
every :data:`EVERY` seconds (and once soon after it starts), and keeps what it found beside the database
(:data:`FILE` in the run folder). While the last walk found the log changed, ``/health`` fails with an ``audit``
check naming the first bad entry, and the figures say they come from a log that does not verify.

Signatures of the checkpoints are not checked here (that needs the trusted certificates ``gateway audit verify``
is given): only what the log itself holds — hashes, links, index rows, guards, checkpoint heads.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.store.db import Database

__all__ = ["EVERY", "FILE", "check", "last", "maybe_check", "maybe_check_beside", "summary", "warning"]

log = logging.getLogger(__name__)

#: Seconds between two walks of the whole log (a million entries take some seconds).
EVERY = 3600.0
#: What the last walk found, in the run folder.
FILE = "audit-check.json"


def last(folder: Path) -> dict[str, Any] | None:
    """What the last walk found (``checked``: when, ``ok``, ``entries``, ``first_bad``, ``problems``), or None when
    none was kept (no ``gateway serve`` ran here yet, or the file is unreadable)."""
    try:
        found = json.loads((folder / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or not isinstance(found.get("ok"), bool) or \
            not isinstance(found.get("at"), (int, float)):
        return None
    return found


def check(db: Database, folder: Path, member: str | None, clock: Callable[[], _dt.datetime]) -> dict[str, Any]:
    """Walk the whole log now, keep what was found in ``folder`` and return it."""
    from gateway.audit.checkpoint import claims
    from gateway.audit.log import has_log
    from gateway.audit.verify import verify

    began = time.monotonic()
    if has_log(db):
        report = verify(db, claims(db, None, member=member)[0], max_findings=5)
        ok, entries, first_bad, problems = (not report.findings, report.entries, report.first_bad,
                                            [f.message for f in report.findings[:3]])
    else:  # nothing audited yet (a gateway that has not received anything): nothing that can have been changed
        ok, entries, first_bad, problems = True, 0, None, []
    found: dict[str, Any] = {
        "checked": clock().isoformat(timespec="seconds"), "at": time.time(), "ok": ok, "entries": entries,
        "first_bad": first_bad, "problems": problems, "seconds": round(time.monotonic() - began, 3),
    }
    if not ok:
        where = f"first bad entry {first_bad}" if first_bad is not None else "its protection damaged"
        log.error("the audit log does not verify (%s; %d problem(s) listed): its figures cannot be trusted; run "
                  "`gateway audit verify` for the whole report", where, len(problems))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / (FILE + ".new")
        part.write_text(json.dumps(found, ensure_ascii=False), encoding="utf-8")
        os.replace(part, folder / FILE)
    except OSError as exc:  # a full disk, a folder gone: said; the next pass tries again
        log.warning("what the audit log check found cannot be kept in %s: %s", folder,
                    exc.strerror or type(exc).__name__)
    return found


def maybe_check(db: Database, folder: Path, member: str | None, clock: Callable[[], _dt.datetime],
                every: float = EVERY) -> dict[str, Any] | None:
    """:func:`check` when the last walk kept in ``folder`` is older than ``every`` seconds (or there is none);
    None when it is not due."""
    return check(db, folder, member, clock) if _due(folder, every) else None


def _due(folder: Path, every: float) -> bool:
    """Whether the last walk kept in ``folder`` is older than ``every`` seconds (or there is none, or it cannot be
    read: walked again)."""
    before = last(folder)
    return before is None or not 0 <= time.time() - float(before["at"]) < every


def summary(folder: Path) -> dict[str, Any] | None:
    """What the figures carry of the last walk (``log_check`` of ``/audit/stats`` and ``gateway audit stats``):
    when, whether the log verified, how many entries, the first bad one; None before any walk."""
    found = last(folder)
    return None if found is None else {k: found.get(k) for k in ("checked", "ok", "entries", "first_bad")}


def warning(found: dict[str, Any] | None) -> str:
    """A line to print above the figures when the last walk found the log changed ("" otherwise)."""
    if found is None or found.get("ok"):
        return ""
    first = found.get("first_bad")
    where = f" from entry {first}" if first is not None else ""
    return (f"WARNING: the audit log does not verify{where} (checked at {found.get('checked')}): these figures come "
            "from a changed log and cannot be trusted; run `gateway audit verify`\n")


_walking: threading.Thread | None = None  # the walk under way beside the background passes, if any
_walking_lock = threading.Lock()


def maybe_check_beside(locator: Path | str, folder: Path, member: str | None, clock: Callable[[], _dt.datetime],
                       every: float = EVERY) -> threading.Thread | None:
    """:func:`maybe_check` in a thread of its own, with a connection of its own to the database at ``locator``,
    when due and no walk of this process is under way: the thread, or None. A walk of a large log takes as long
    as it takes without holding up the pass that asked for it (deliveries, messages to work again), nor making
    that pass look hung."""
    global _walking
    if not _due(folder, every):
        return None
    with _walking_lock:
        if _walking is not None and _walking.is_alive():
            return None

        def walk() -> None:
            from gateway.store.db import connect, fault_reason

            try:
                db = connect(locator)
            except Exception as exc:  # noqa: BLE001 - the next pass asks again
                log.warning("the audit log could not be checked: its database cannot be opened (%s)",
                            fault_reason(exc) or type(exc).__name__)
                return
            try:
                check(db, folder, member, clock)
            except Exception as exc:  # noqa: BLE001 - said; the next pass asks again
                log.warning("the audit log could not be checked: %s", fault_reason(exc) or type(exc).__name__)
            finally:
                try:
                    db.conn.close()
                except Exception:  # noqa: BLE001 - gone already
                    pass

        _walking = threading.Thread(target=walk, name="audit-log-check", daemon=True)
        _walking.start()
        return _walking
