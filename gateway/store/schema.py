"""The database's layout: one SQL file per part and engine, and the version each part is at.

Each part of the gateway's storage (core messages and resources, audit log,
accounts, decisions...) keeps its tables in ``gateway/store/sql/<engine>/<part>.sql``,
written so that running it again changes nothing (``CREATE ... IF NOT EXISTS``).
:func:`apply` runs a part's file; :func:`columns` tells which columns a table has,
for the steps that bring a database written by an earlier release up to date;
``schema_versions`` records, per part, the layout version a database is at, so
that ``gateway db upgrade`` and every start-up know which steps remain.
"""
from __future__ import annotations

import datetime as _dt
import importlib.resources as _resources
import logging

from gateway.store.db import Database, dialect, transaction

__all__ = ["apply", "columns", "version", "recorded_version", "set_version", "script", "once", "remember"]

log = logging.getLogger(__name__)

_VERSIONS = ("CREATE TABLE IF NOT EXISTS schema_versions (part TEXT PRIMARY KEY, version INTEGER NOT NULL,"
             " applied_at TEXT NOT NULL)")


def script(db: Database, part: str) -> str:
    """The text of ``sql/<engine>/<part>.sql`` for the engine ``db`` speaks."""
    return _resources.files("gateway.store").joinpath("sql", dialect(db), f"{part}.sql").read_text(encoding="utf-8")


def apply(db: Database, part: str) -> None:
    """Run a part's schema file (idempotent). Not inside a transaction: it commits.

    On PostgreSQL the file runs as one transaction holding the write lock, so
    that nodes starting together do not race to create the same table.
    """
    text = script(db, part)
    if dialect(db) == "postgresql":
        with transaction(db):
            db.executescript(text)
    else:
        db.executescript(text)


def columns(db: Database, table: str) -> set[str]:
    """The names of ``table``'s columns (empty when the table does not exist)."""
    if dialect(db) == "postgresql":
        rows = db.execute("SELECT column_name FROM information_schema.columns"
                          " WHERE table_schema = current_schema() AND table_name = ?", [table]).fetchall()
        return {str(r[0]) for r in rows}
    return {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})").fetchall()}


def recorded_version(db: Database, part: str) -> int:
    """The layout version recorded for ``part``, by reading only (0 when none is, or there is no record at all):
    what a process starting while another holds the write lock can ask without waiting for it."""
    if not columns(db, "schema_versions"):
        return 0
    row = db.execute("SELECT version FROM schema_versions WHERE part = ?", [part]).fetchone()
    return int(row[0]) if row else 0


def version(db: Database, part: str) -> int:
    """The layout version ``part`` is at in this database (0: never recorded)."""
    db.execute(_VERSIONS)
    row = db.execute("SELECT version FROM schema_versions WHERE part = ?", [part]).fetchone()
    return int(row[0]) if row else 0


def set_version(db: Database, part: str, number: int) -> None:
    """Record that ``part`` is at layout ``number`` (inside the caller's transaction, if any)."""
    db.execute(_VERSIONS)
    db.execute("INSERT INTO schema_versions (part, version, applied_at) VALUES (?, ?, ?)"
               " ON CONFLICT (part) DO UPDATE SET version = excluded.version, applied_at = excluded.applied_at",
               [part, number, _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")])
    log.debug("database layout: %s at version %d", part, number)


def once(db: Database, part: str) -> bool:
    """True the first time it is asked for ``part`` on this connection object, False after.

    For the ``ensure_schema`` functions that run before each operation: the
    schema file runs once per connection, not once per call (on PostgreSQL
    every DDL statement is a round trip and takes the write lock).
    """
    done: set[str] | None = getattr(db, "_cyhr_schema_parts", None)
    if done is None:
        done = set()
        try:
            setattr(db, "_cyhr_schema_parts", done)
        except AttributeError:  # an object that takes no attributes: ask every time
            return True
    if part in done:
        return False
    done.add(part)
    return True


def remember(db: Database, name: str, value: object) -> None:
    """Keep a fact learnt about the database on the connection object (a table known to exist, the transaction
    that created it), so that it is not asked again on this connection; lost with the connection."""
    try:
        setattr(db, name, value)
    except AttributeError:  # an object that takes no attributes: looked at every time
        pass
