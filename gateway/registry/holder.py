"""Registry holder from settings: the snapshot a member gateway decides with.

Reads the registry authority certificate and the signed snapshot named in the
settings, verifies it, and remembers the highest version ever accepted in the
gateway's database, so that a restarted gateway refuses a snapshot older than
one it already used (a rollback would silently revive revoked members).
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path

from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError
from gateway.registry.snapshot import RegistryHolder
from gateway.signing.keys import load_certificates
from gateway.store.db import connect, transaction

__all__ = ["holder_from_settings", "remember_version", "highest_version"]

_SCHEMA = ("CREATE TABLE IF NOT EXISTS registry_applied (version INTEGER NOT NULL, digest TEXT NOT NULL,"
           " applied_at TEXT NOT NULL, PRIMARY KEY (version, digest))")


def highest_version(database: Path) -> int:
    """The highest snapshot version this gateway has accepted (0 if none)."""
    db = connect(database)
    try:
        db.conn.execute(_SCHEMA)
        row = db.conn.execute("SELECT max(version) FROM registry_applied").fetchone()
        return int(row[0] or 0)
    finally:
        db.conn.close()


def remember_version(database: Path, version: int, digest: str, at: _dt.datetime) -> None:
    """Record that a snapshot version was applied."""
    db = connect(database)
    try:
        db.conn.execute(_SCHEMA)
        with transaction(db):
            db.execute("INSERT OR IGNORE INTO registry_applied VALUES (?,?,?)", [version, digest, at.isoformat()])
    finally:
        db.conn.close()


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
    holder = RegistryHolder(authorities, clock=clock, min_version=highest_version(settings.database_path))
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
    remember_version(settings.database_path, snapshot.version, snapshot.digest(), clock())
    return holder
