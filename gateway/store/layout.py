"""The whole database layout: every part's tables, created or brought up to date in one go.

``gateway db upgrade`` and ``gateway serve`` at start call :func:`upgrade`; each
part keeps its own idempotent ``ensure`` function (and its SQL files under
``gateway/store/sql/``), listed here in the order they depend on each other.
:func:`status` says which layout version each part is at (``schema_versions``).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from gateway.errors import ConfigError
from gateway.store import schema, tallies
from gateway.store.db import Database, dialect, spilling, transaction

__all__ = ["PARTS", "upgrade", "status", "check_layouts", "written_layouts"]

#: (part, "module:function") — the function creates the part's tables when missing and upgrades older layouts.
PARTS: tuple[tuple[str, str], ...] = (
    ("core", "gateway.store.store:ensure_core_schema"),
    ("reports", "gateway.store.reports:ensure_schema"),
    ("audit", "gateway.audit.log:ensure_schema"),
    ("accounts", "gateway.auth:ensure_schema"),
    ("clients", "gateway.clients:ensure_schema"),
    ("decisions", "gateway.recognition.store:ensure_schema"),
    ("referrals", "gateway.referrals:ensure_schema"),
    ("registry", "gateway.store.registry:ensure_schema"),
)


def _function(target: str) -> Callable[[Database], Any]:
    module, _, name = target.partition(":")
    fn: Callable[[Database], Any] = getattr(importlib.import_module(module), name)
    return fn


def added_indexes() -> dict[str, tuple[str, ...]]:
    """Indexes each part's file gained after its tables were first released, by part."""
    from gateway.store.accounts import ADDED_INDEXES as accounts
    from gateway.store.decisions import ADDED_INDEXES as decisions
    from gateway.store.store import ADDED_CORE_INDEXES as core

    return {"core": core, "decisions": decisions, "accounts": accounts}


#: The layout of the ``reports`` part this release writes. 2: a final report's versions under one DiagnosticReport id
#: supersede by their issue time, and CDC CSV exams are told apart by what they say (their stored ids differ from
#: layout 1's); a node of a release writing layout 1 would take such an exam sent again as a correction of itself,
#: so it refuses a database at layout 2. Its tables are those of layout 1.
REPORTS_LAYOUT = 2


def written_layouts() -> dict[str, int]:
    """The layout version of each part this release writes."""
    from gateway.store.accounts import LAYOUT as ACCOUNTS_LAYOUT
    from gateway.store.accounts import PART as ACCOUNTS
    from gateway.store.store import SCHEMA_VERSION

    return {**{part: 1 for part, _ in PARTS}, "core": SCHEMA_VERSION, ACCOUNTS: ACCOUNTS_LAYOUT,
            "reports": REPORTS_LAYOUT}


def check_layouts(db: Database) -> None:
    """Refuse a database this release cannot work on: one whose layout record is another program's table, or one
    a later release brought to a layout this one does not know (it would write rows that layout does not expect).

    (Another program's database is refused as it is opened: :func:`gateway.store.db.connect`.)

    :raises ConfigError: naming what was found and what to do.
    """
    written = written_layouts()
    newer = [(part, number) for part, number in status(db) if number > written.get(part, number)]
    if newer:
        found = ", ".join(f"{part} at layout {number} (this release writes {written[part]})" for part, number in newer)
        raise ConfigError(f"this database was brought up to date by a later release of the gateway: {found}; run "
                          "that release, or a database restored from before it", "database")


def upgrade(db: Database, progress: Callable[[str], Any] | None = None) -> list[tuple[str, int]]:
    """Create or upgrade every part (idempotent); returns each part's recorded layout version after it. On
    PostgreSQL the indexes added to existing tables are then built beside the running work
    (:func:`gateway.store.schema.build_indexes`).

    :raises ConfigError: a database this release cannot work on (:func:`check_layouts`, run by the core part's
        first open on a connection, the first step here), before anything is written.
    """
    with spilling(db):  # bulk work: SQLite's temporary storage on disk, not in memory
        for part, target in PARTS:
            if progress is not None:
                progress(part)
            _function(target)(db)
            # a part with one layout so far is at its first; reports at REPORTS_LAYOUT (its tables unchanged); the
            # core and accounts parts record their own steps
            wanted = REPORTS_LAYOUT if part == "reports" else 1
            if schema.version(db, part) < wanted:
                with transaction(db):
                    if schema.version(db, part) < wanted:
                        schema.set_version(db, part, wanted)
        from gateway.store.store import ensure_name_strings, ensure_patient_keys

        from gateway.store.outbox import OutboxStore

        OutboxStore(db).ensure_table()  # (the outbox's columns added since its table was made: lease holder, attempts)
        ensure_patient_keys(db, missing=True)  # (on SQLite made when the core part was opened)
        ensure_name_strings(db, missing=True)  # SQLite: names a process of an earlier release stored without them
        tallies.ensure(db)  # the counts /health and /metrics read, started for the tables that have none
        for part, names in added_indexes().items():
            schema.build_indexes(db, part, names)
    return status(db)


def status(db: Database) -> list[tuple[str, int]]:
    """(part, layout version) for every part recorded in ``schema_versions``, in name order.

    :raises ConfigError: the table is not the gateway's (another program's, or versions that are not numbers).
    """
    present = schema.columns(db, "schema_versions")
    if not present:  # nothing recorded yet (and nothing written by asking)
        return []
    if not {"part", "version"} <= present:
        raise ConfigError("this database (or schema) holds a table schema_versions that is not the gateway's (its "
                          f"columns: {', '.join(sorted(present))}): point the database setting at the gateway's own "
                          "schema or an empty one", "database")
    rows = db.execute("SELECT part, version FROM schema_versions ORDER BY part").fetchall()
    try:
        return [(str(r[0]), int(r[1])) for r in rows]
    except (TypeError, ValueError):
        raise ConfigError("this database's schema_versions holds a layout version that is not a number: it is not "
                          "the gateway's record, or it was changed by hand", "database") from None


def damage(db: Database, *, full: bool = False) -> list[str]:
    """What SQLite finds wrong with the database's pages and indexes (``PRAGMA quick_check``, or with ``full``
    ``integrity_check``, which also compares every index with its table): an empty list when nothing. On
    PostgreSQL, which checks its pages as it reads them (and ``amcheck`` for more), nothing is looked at here: None
    of its problems shows as a list of lines.

    :raises sqlite3.DatabaseError: the file is not a database at all (what the caller words).
    """
    if dialect(db) == "postgresql":
        return []
    rows = db.execute(f"PRAGMA {'integrity_check' if full else 'quick_check'}(100)").fetchall()
    said = [str(r[0]) for r in rows]
    return [] if said == ["ok"] else said


def engine(db: Database) -> str:
    """The engine and its version, for people (``SQLite 3.40.1``, ``PostgreSQL 15.18``)."""
    if dialect(db) == "postgresql":
        return "PostgreSQL " + str(db.execute("SHOW server_version").fetchone()[0]).split()[0]
    return "SQLite " + str(db.execute("SELECT sqlite_version()").fetchone()[0])
