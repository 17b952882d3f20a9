"""Registry holder from settings: the snapshot a member gateway decides with.

Reads the registry authority certificate and the signed snapshot named in the
settings, verifies it, and remembers the highest version ever accepted in the
gateway's database, so that a restarted gateway refuses a snapshot older than
one it already used (a rollback would silently revive revoked members).

A running gateway picks up a newly published snapshot by itself:
:class:`SnapshotFile` notices when the file changes, verifies and applies it,
and records the application in the audit log. A file that does not verify is
refused with a warning and the snapshot in force stays (until it expires).

A snapshot applied by one node is applied by all: the signed text of every
snapshot applied is kept in the database (:mod:`gateway.store.registry`), and
the nodes of a gateway that share one database take up a newer one there in
their background pass (and at start-up), verified as a file is, whatever
their own file still holds.
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
from gateway.store.db import Database, connect, transaction
from gateway.store.registry import RegistryStore

__all__ = ["holder_from_settings", "remember_version", "highest_version", "stored_snapshot", "SnapshotFile"]

log = logging.getLogger(__name__)


def _opened(database: Path | str) -> RegistryStore:
    from gateway.store.layout import check_layouts

    store = RegistryStore(connect(database))
    try:
        check_layouts(store.db)  # (a database this release cannot work on: refused before a snapshot is recorded)
        store.ensure_schema()
    except BaseException:
        store.db.conn.close()
        raise
    return store


def highest_version(database: Path | str) -> int:
    """The highest snapshot version this gateway has accepted (0 if none)."""
    store = _opened(database)
    try:
        return store.highest_version()
    finally:
        store.db.conn.close()


def known_version(database: Path | str, version: int, digest: str) -> bool:
    """Whether this gateway applied snapshot ``version`` with that ``digest``."""
    store = _opened(database)
    try:
        return store.known(version, digest, with_text=False)
    finally:
        store.db.conn.close()


def stored_snapshot(database: Path | str | Database, newer_than: int = 0) -> tuple[int, bytes] | None:
    """(version, signed text) of the newest snapshot kept in the database, when newer than ``newer_than``.

    ``database``: a locator, or an open database (which is left open).
    """
    if isinstance(database, (str, Path)):
        store = _opened(database)
        try:
            return stored_snapshot(store.db, newer_than)
        finally:
            store.db.conn.close()
    found = RegistryStore(database)
    found.ensure_schema()
    version = found.newest_version()
    if version <= newer_than:
        return None
    text = found.snapshot(version)
    return None if text is None else (version, text)


def remember_version(database: Path | str, version: int, digest: str, at: _dt.datetime, *, member: str = "",
                     text: bytes | None = None) -> None:
    """Record that a snapshot version was applied, with its audit entry (once per version and digest).

    ``text``: the signed snapshot as applied, kept for the other nodes sharing the database.
    """
    from gateway.audit.events import snapshot_applied

    store = _opened(database)
    db = store.db
    try:
        if store.known(version, digest, with_text=text is not None):
            return  # recorded already (every process of every node applies the snapshot at its start)
        with transaction(db):
            added, previous = store.remember(version, digest, at.isoformat(), text)
            if added and member:
                snapshot_applied(db, at=at, member=member, version=version, digest=digest, previous=previous)
    finally:
        db.conn.close()


class SnapshotFile:
    """Watches the configured snapshot file and applies a new version when it appears."""

    def __init__(self, settings: Settings, holder: RegistryHolder, clock: Callable[[], _dt.datetime],
                 *, every: float = 2.0, retry: float = 60.0) -> None:
        self.settings, self.holder, self.clock, self.every, self.retry = settings, holder, clock, every, retry
        self.path = Path(settings.registry_snapshot)
        self._seen = self._stamp()
        self._checked = time.monotonic()
        self._db_checked = 0.0
        self._lock = threading.Lock()
        #: why the file as it is now was refused (the one in force stays), None when it is the one in force or
        #: was applied: /health says so, as the gateway would not start with it
        self.refused: str | None = holder.file_refused
        #: when the file was last refused (monotonic): a refused file is tried again every ``retry`` seconds
        #: though it did not change (a snapshot issued ahead of this clock becomes valid as time passes)
        self._refused_at = time.monotonic()
        self._refused_stamp = self._seen if self.refused is not None else (-1.0, -1)

    def _stamp(self) -> tuple[float, int]:
        try:
            st = self.path.stat()
        except OSError:
            return (0.0, 0)
        return (st.st_mtime, st.st_size)

    def refresh(self, force: bool = False, *, db: Database | None = None) -> bool:
        """Apply the file if it changed since last looked at (at most every few seconds); True if applied.

        ``db``: also take up a newer snapshot another node sharing this database applied (the background
        pass's check, at most every few seconds; one query when there is none).
        """
        applied = self._refresh_file(force)
        if db is not None and not applied:
            applied = self._refresh_from_database(db, force)
        return applied

    def _refresh_file(self, force: bool) -> bool:
        now = time.monotonic()
        if not force and now - self._checked < self.every:
            return False
        with self._lock:
            self._checked = now
            stamp = self._stamp()
            again = self.refused is not None and now - self._refused_at >= self.retry
            if stamp == self._seen and not force and not again:
                return False
            self._seen = stamp
            try:
                before = self.holder.current
                snapshot = self.holder.apply(self.path.read_bytes())
            except (OSError, GatewayError) as exc:
                reason = str(getattr(exc, "message", None) or getattr(exc, "strerror", None) or exc)
                if reason != self.refused or stamp != self._refused_stamp:  # (said once, not at every retry)
                    log.warning("registry snapshot %s refused, keeping the one in force: %s", self.path, exc)
                self.refused, self._refused_at, self._refused_stamp = reason, now, stamp
                return False
            self.refused = None
            if before is not None and snapshot is before:
                return False
            remember_version(self.settings.database_locator, snapshot.version, snapshot.digest(), self.clock(),
                             member=self.settings.issuer_uscc, text=self.holder.current_text)
            log.info("registry snapshot version %s applied", snapshot.version)
            return True

    def _refresh_from_database(self, db: Database, force: bool) -> bool:
        now = time.monotonic()
        if not force and now - self._db_checked < self.every:
            return False
        with self._lock:
            self._db_checked = now
            current = self.holder.current
            try:
                stored = stored_snapshot(db, current.version if current is not None else 0)
            except Exception as exc:  # noqa: BLE001 - the database is busy or gone: the next pass looks again
                log.warning("registry snapshots kept in the database could not be read: %s", exc)
                return False
            if stored is None:
                return False
            try:
                snapshot = self.holder.apply(stored[1])
            except GatewayError as exc:
                log.warning("registry snapshot version %s kept in the database refused, keeping the one in force: "
                            "%s", stored[0], exc)
                return False
            if snapshot is current:
                return False
            remember_version(self.settings.database_locator, snapshot.version, snapshot.digest(), self.clock(),
                             member=self.settings.issuer_uscc, text=self.holder.current_text)
            log.info("registry snapshot version %s applied, as another node of this gateway applied it",
                     snapshot.version)
            return True


def holder_from_settings(settings: Settings, clock: Callable[[], _dt.datetime]) -> RegistryHolder | None:
    """The registry holder with the configured snapshot applied, or None when none is configured.

    A file that cannot be read or does not verify (tampered, cut short, issued in the future, older than one
    accepted) leaves the newest snapshot kept in the database in force, with a warning, and ``file_refused`` of the
    holder saying why (``/health`` says so): every process of the gateway starts as the running one goes on.

    :raises ConfigError: the authority certificate cannot be read, or the snapshot file is refused and the
        database keeps no snapshot that verifies.
    """
    if not settings.registry_snapshot:
        return None
    try:
        authorities = load_certificates(settings.registry_authority)
    except (OSError, GatewayError, ValueError) as exc:
        raise ConfigError(f"registry authority certificate {settings.registry_authority}: {exc}",
                          "registry_authority") from None
    holder = RegistryHolder(authorities, clock=clock, min_version=highest_version(settings.database_locator))
    text = b""
    refused: str | None = None  # why the file was refused (as the refusal to start says it)
    reason = ""  # (as /health says it)
    try:
        text = Path(settings.registry_snapshot).read_bytes()
    except OSError as exc:
        refused = reason = f"cannot read it: {exc.strerror or exc}"
    else:
        if not text.strip():
            refused = reason = "the file is empty"
        else:
            try:
                holder.apply(text)
            except GatewayError as exc:
                refused, reason = str(exc), exc.message
    # a newer snapshot applied by another node sharing this database is taken up too, whatever the file holds; and
    # the stored snapshot in force stays in force when the file does not verify (tampered, cut short, unreadable,
    # issued in the future): a restarted process (an MLLP child, `gateway send`) goes on as the running one does
    stored = stored_snapshot(settings.database_locator, holder.current.version if holder.current else 0)
    if stored is not None:
        try:
            holder.apply(stored[1])
        except GatewayError as exc:
            log.warning("registry snapshot version %s kept in the database refused: %s", stored[0], exc)
        else:
            if refused is not None and text.strip() and _only_older(text, holder, clock):
                log.warning("registry snapshot %s is older than version %s, which another node of this gateway "
                            "applied: version %s is in force", settings.registry_snapshot, stored[0], stored[0])
            elif refused is not None:
                log.warning("registry snapshot %s refused (%s); version %s kept in the database stays in force",
                            settings.registry_snapshot, reason, stored[0])
                holder.file_refused = reason
    snapshot = holder.current
    if snapshot is None:
        raise ConfigError(f"registry snapshot {settings.registry_snapshot} refused: {refused}",
                          "registry_snapshot") from None
    remember_version(settings.database_locator, snapshot.version, snapshot.digest(), clock(),
                     member=settings.issuer_uscc, text=holder.current_text)
    return holder


def _only_older(text: bytes, holder: RegistryHolder, clock: Callable[[], _dt.datetime]) -> bool:
    """Whether a refused snapshot file verifies by itself (refused only for being older than one accepted)."""
    from gateway.registry.snapshot import verify_snapshot

    try:
        verify_snapshot(text, holder.authorities, clock())
    except GatewayError:
        return False
    return True
