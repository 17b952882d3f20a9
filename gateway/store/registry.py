"""Registry snapshots applied by this gateway: the SQL of :mod:`gateway.registry.holder`, on SQLite and PostgreSQL.

Each application is a row (version, digest, when) with the signed snapshot's
bytes, so that the nodes of a gateway that share one database all take up a
snapshot any one of them applied, and none goes back below the highest
version ever accepted. A database of an earlier release gains the ``snapshot``
column when first opened; its rows keep none.
"""
from __future__ import annotations

from typing import Any, Protocol

from gateway.store import parts, schema
from gateway.store.db import Database, dialect, transaction

__all__ = ["RegistryPort", "RegistryStore", "PART"]

PART = "registry"


class RegistryPort(Protocol):
    """What the registry holder asks of its storage."""

    def ensure_schema(self) -> None:
        """Create the table, or add the snapshot column to one of an earlier release."""

    def highest_version(self) -> int:
        """The highest snapshot version ever applied here (0 if none)."""

    def remember(self, version: int, digest: str, applied_at: str, snapshot: bytes | None) -> tuple[bool, int | None]:
        """Record an application once per version and digest (inside the caller's transaction, if any):
        (True when new, the highest version before it)."""

    def known(self, version: int, digest: str, *, with_text: bool) -> bool:
        """Whether that version and digest is recorded (with its signed text, when ``with_text``): reads only."""

    def newest_version(self) -> int:
        """The highest version whose signed snapshot is kept here (0 if none)."""

    def snapshot(self, version: int) -> bytes | None:
        """The signed snapshot of ``version`` as applied, or None when none is kept."""

    def applied(self) -> list[dict[str, Any]]:
        """Every application (version, digest, applied_at), newest first."""


class RegistryStore:
    """:class:`RegistryPort` on SQLite and PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        if parts.ready(self.db, PART):
            return
        have = schema.columns(self.db, "registry_applied")
        if have and "snapshot" not in have:  # an earlier release's table
            kind = "BYTEA" if dialect(self.db) == "postgresql" else "BLOB"
            with transaction(self.db):
                if "snapshot" not in schema.columns(self.db, "registry_applied"):
                    self.db.execute(f"ALTER TABLE registry_applied ADD COLUMN snapshot {kind}")
        parts.ensure(self.db, PART, "registry_applied")

    def highest_version(self) -> int:
        row = self.db.execute("SELECT max(version) FROM registry_applied").fetchone()
        return int(row[0] or 0)

    def remember(self, version: int, digest: str, applied_at: str, snapshot: bytes | None) -> tuple[bool, int | None]:
        with transaction(self.db):
            previous = self.db.execute("SELECT max(version) FROM registry_applied").fetchone()[0]
            added = self.db.execute(
                "INSERT INTO registry_applied (version, digest, applied_at, snapshot) VALUES (?,?,?,?)"
                " ON CONFLICT DO NOTHING", [version, digest, applied_at, snapshot]).rowcount
            if not added and snapshot is not None:  # applied by an earlier release, which kept no text
                self.db.execute("UPDATE registry_applied SET snapshot = ? WHERE version = ? AND digest = ?"
                                " AND snapshot IS NULL", [snapshot, version, digest])
        return bool(added), None if previous is None else int(previous)

    def known(self, version: int, digest: str, *, with_text: bool) -> bool:
        row = self.db.execute("SELECT snapshot IS NOT NULL FROM registry_applied WHERE version = ? AND digest = ?",
                              [version, digest]).fetchone()
        return row is not None and (bool(row[0]) or not with_text)

    def newest_version(self) -> int:
        row = self.db.execute("SELECT max(version) FROM registry_applied WHERE snapshot IS NOT NULL").fetchone()
        return int(row[0] or 0)

    def snapshot(self, version: int) -> bytes | None:
        row = self.db.execute("SELECT snapshot FROM registry_applied WHERE version = ? AND snapshot IS NOT NULL"
                              " ORDER BY applied_at DESC, digest LIMIT 1", [version]).fetchone()
        return None if row is None else bytes(row[0])

    def applied(self) -> list[dict[str, Any]]:
        return [{"version": int(r[0]), "digest": str(r[1]), "applied_at": str(r[2])} for r in self.db.execute(
            "SELECT version, digest, applied_at FROM registry_applied ORDER BY version DESC, applied_at DESC"
        ).fetchall()]


def ensure_schema(db: Database) -> None:
    """The registry part's tables (for ``gateway db upgrade``)."""
    RegistryStore(db).ensure_schema()
