"""Registry holder from settings: the snapshot a member gateway decides with.

Reads the registry authority certificate and the signed snapshot named in the
settings, verifies it, and remembers the highest version ever accepted in the
gateway's database, so that a restarted gateway refuses a snapshot older than
one it already used (a rollback would silently revive revoked members).

A running gateway picks up a newly published snapshot by itself:
:class:`SnapshotFile` notices when the file changes, verifies and applies it,
and records the application in the audit log. A file that does not verify is
refused with a warning and the snapshot in force stays (until it expires).
"""
from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError
from gateway.registry.snapshot import RegistryHolder
from gateway.signing.keys import load_certificates
from gateway.store.db import connect, transaction

__all__ = ["holder_from_settings", "remember_version", "highest_version", "SnapshotFile"]

log = logging.getLogger(__name__)

_SCHEMA = ("CREATE TABLE IF NOT EXISTS registry_applied (version INTEGER NOT NULL, digest TEXT NOT NULL,"
           " applied_at TEXT NOT NULL, PRIMARY KEY (version, digest))")


def highest_version(database: Path | str) -> int:
    """The highest snapshot version this gateway has accepted (0 if none)."""
    db = connect(database)
    try:
        db.conn.execute(_SCHEMA)
        row = db.conn.execute("SELECT max(version) FROM registry_applied").fetchone()
        return int(row[0] or 0)
    finally:
        db.conn.close()


def remember_version(database: Path | str, version: int, digest: str, at: _dt.datetime, *, member: str = "") -> None:
    """Record that a snapshot version was applied, with its audit entry (once per version and digest)."""
    from gateway.audit.events import snapshot_applied

    db = connect(database)
    try:
        db.conn.execute(_SCHEMA)
        with transaction(db):
            previous = db.execute("SELECT max(version) FROM registry_applied").fetchone()[0]
            cur = db.execute("INSERT OR IGNORE INTO registry_applied VALUES (?,?,?)",
                             [version, digest, at.isoformat()])
            if cur.rowcount and member:
                snapshot_applied(db, at=at, member=member, version=version, digest=digest, previous=previous)
    finally:
        db.conn.close()


class SnapshotFile:
    """Watches the configured snapshot file and applies a new version when it appears."""

    def __init__(self, settings: Settings, holder: RegistryHolder, clock: Callable[[], _dt.datetime],
                 *, every: float = 2.0) -> None:
        self.settings, self.holder, self.clock, self.every = settings, holder, clock, every
        self.path = Path(settings.registry_snapshot)
        self._seen = self._stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def _stamp(self) -> tuple[float, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0.0, 0)
        return (st.st_mtime, st.st_size)

    def refresh(self, force: bool = False) -> bool:
        """Apply the file if it changed since last looked at (at most every few seconds); True if applied."""
        now = time.monotonic()
        if not force and now - self._checked < self.every:
            return False
        with self._lock:
            self._checked = now
            stamp = self._stamp()
            if stamp == self._seen and not force:
                return False
            self._seen = stamp
            try:
                before = self.holder.current
                snapshot = self.holder.apply(self.path.read_bytes())
            except (OSError, GatewayError) as exc:
                log.warning("registry snapshot %s refused, keeping the one in force: %s", self.path, exc)
                return False
            if before is not None and snapshot is before:
                return False
            remember_version(self.settings.database_locator, snapshot.version, snapshot.digest(), self.clock(),
                             member=self.settings.issuer_uscc)
            log.info("registry snapshot version %s applied", snapshot.version)
            return True


def holder_from_settings(settings: Settings, clock: Callable[[], _dt.datetime]) -> RegistryHolder | None:
    """The registry holder with the configured snapshot applied, or None when none is configured.

    :raises ConfigError: the authority certificate or the snapshot cannot be read or does not
        verify (signature, expiry, older than one already accepted).
    """
    if not settings.registry_snapshot:
        return None
    try:
        authorities = load_certificates(settings.registry_authority)
    except (OSError, GatewayError, ValueError) as exc:
        raise ConfigError(f"registry authority certificate {settings.registry_authority}: {exc}",
                          "registry_authority") from None
    holder = RegistryHolder(authorities, clock=clock, min_version=highest_version(settings.database_locator))
    try:
        text = Path(settings.registry_snapshot).read_bytes()
    except OSError as exc:
        raise ConfigError(f"registry snapshot {settings.registry_snapshot}: {exc.strerror}",
                          "registry_snapshot") from None
    try:
        snapshot = holder.apply(text)
    except GatewayError as exc:
        raise ConfigError(f"registry snapshot {settings.registry_snapshot} refused: {exc}",
                          "registry_snapshot") from None
    remember_version(settings.database_locator, snapshot.version, snapshot.digest(), clock(),
                     member=settings.issuer_uscc)
    return holder
