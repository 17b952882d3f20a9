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

from gateway.store.db import Database, dialect, spilling, transaction

__all__ = ["apply", "columns", "version", "recorded_version", "set_version", "script", "once", "known", "learn",
           "ensure_indexes", "build_indexes", "statement"]

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
        # (the catalog itself: information_schema.columns answers the same but slows with every schema the database
        # holds, 13 ms a question with 200 schemas where this takes 0.3 ms; every start-up asks of several tables)
        rows = db.execute("SELECT a.attname FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c"
                          " ON c.oid = a.attrelid WHERE c.relname = ? AND c.relnamespace = ("
                          "SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = current_schema())"
                          " AND c.relkind IN ('r', 'v', 'f', 'p') AND a.attnum > 0 AND NOT a.attisdropped",
                          [table]).fetchall()
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


#: Facts learnt about a database, kept on its connection object: fact -> _SETTLED, or the transaction that made it
#: true while that transaction may still roll back (PostgreSQL: :attr:`~.postgresql.PgConnection.begun`; SQLite:
#: the number :func:`gateway.store.db.transaction` gave it, ``sqlite_begun``, or _UNCOUNTED on a connection that
#: never began one there).
_FACTS = "_cyhr_facts"
_SETTLED = "settled"
_UNCOUNTED = "uncounted"


def _facts(db: Database) -> dict[str, object] | None:
    facts: dict[str, object] | None = getattr(db, _FACTS, None)
    if facts is None:
        facts = {}
        try:
            setattr(db, _FACTS, facts)
        except AttributeError:  # an object that takes no attributes: nothing is kept, everything is asked again
            return None
    return facts


def known(db: Database, fact: str) -> bool:
    """Whether ``fact`` (a part's tables exist, ...) is settled on this connection, so need not be asked again
    (no query). Lost with the connection."""
    facts: dict[str, object] | None = getattr(db, _FACTS, None)
    return facts is not None and facts.get(fact) == _SETTLED


def learn(db: Database, fact: str, *, made: bool = False) -> None:
    """Record that ``fact`` holds on this connection: found by a query, or ``made`` true by this connection now
    (a part's tables created).

    A fact made inside a transaction is not settled while that transaction may
    still roll it back: it is settled when it is found again outside any
    transaction or, on PostgreSQL, inside a later one (the one that made it has
    then committed). A fact found inside a transaction that did not make it was
    committed by someone (another connection's uncommitted tables are not seen).
    """
    facts = _facts(db)
    if facts is None:
        return
    conn = db.conn
    inside = bool(conn.in_transaction)
    begun = getattr(conn, "begun", None)
    if begun is None:  # SQLite: the number :func:`gateway.store.db.transaction` gives each transaction it begins
        begun = getattr(db, "sqlite_begun", None)
    if not inside:
        facts[fact] = _SETTLED
    elif made:
        facts[fact] = _UNCOUNTED if begun is None else begun
    else:
        pending = facts.get(fact)
        if pending is None or (pending not in (_SETTLED, _UNCOUNTED) and pending != begun):
            facts[fact] = _SETTLED


def once(db: Database, part: str) -> bool:
    """True the first time it is asked for ``part`` on this connection object, False after.

    For the ``ensure_schema`` functions that run before each operation: the
    schema file runs once per connection, not once per call (on PostgreSQL
    every DDL statement is a round trip and takes the write lock).
    """
    fact = f"checked:{part}"
    if known(db, fact):
        return False
    facts = _facts(db)
    if facts is not None:
        facts[fact] = _SETTLED
    return True


def statement(db: Database, part: str, start: str) -> str:
    """The statement of ``part``'s file that begins with ``start`` (``CREATE INDEX IF NOT EXISTS name ``): what a
    step that makes one table or index of the file alone runs, so that the file stays its one definition.

    :raises ValueError: the file has no such statement (a mistake of this release, found by its tests).
    """
    from gateway.store.parts import statements

    for found in statements(script(db, part)):
        if found.startswith(start):
            return found
    raise ValueError(f"{part}.sql has no statement {start.strip()!r}")


def _index_statements(db: Database, part: str, names: list[str]) -> dict[str, str]:
    """The ``CREATE INDEX`` statement of each of ``names`` in ``part``'s file.

    :raises ValueError: a name the file does not define.
    """
    return {name: statement(db, part, f"CREATE INDEX IF NOT EXISTS {name} ") for name in names}


def ensure_indexes(db: Database, part: str, names: tuple[str, ...]) -> list[str]:
    """SQLite: create those of ``names`` (indexes a release added to ``part``'s file after its tables existed)
    that the database lacks, as the part's file defines them, so that a database made by an earlier release gains
    them at its next opening without a layout step. Asked by reading; only a missing index takes the write lock
    (in the caller's transaction when there is one), once per connection. Returns the names created.

    On PostgreSQL nothing is asked or made here: a node's start reads only, and an index is built beside the
    nodes' work by :func:`build_indexes` (``gateway db upgrade``, and ``gateway serve`` at start).
    """
    fact = f"indexes:{part}"
    if dialect(db) == "postgresql" or known(db, fact) or not names:
        return []
    present = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
    wanted = sorted(set(names) - present)
    if not wanted:
        learn(db, fact)
        return []
    found = _index_statements(db, part, wanted)
    with spilling(db), transaction(db):  # (an index over a table of any size: its sort on disk)
        for name in wanted:
            log.warning("database layout: adding index %s (added by this release; once, on a large table it takes "
                        "a while)", name)
            db.execute(found[name])
    learn(db, fact, made=True)
    return wanted


#: The session lock of PostgreSQL's index builds in one member's schema: one node builds, the others go on without
#: waiting (members sharing a cluster in schemas of their own do not hold each other up).
_INDEX_LOCK = "hashtextextended('cyhr-gateway-indexes:' || current_schema(), 0)"


def build_indexes(db: Database, part: str, names: tuple[str, ...]) -> list[str]:
    """PostgreSQL: build those of ``names`` that the database lacks, or holds invalid (left by a build that
    failed), with ``CREATE INDEX CONCURRENTLY``: writers go on meanwhile, and no transaction is held (call it
    outside one). One node builds at a time; a node that finds another building goes on without it. A build that
    fails (a lock wait past ``lock_timeout``, an interrupt) is logged and tried again at the next upgrade or start:
    these indexes make lookups fast, and nothing is wrong without them. Returns the names built (none on SQLite,
    where :func:`ensure_indexes` makes them)."""
    if dialect(db) != "postgresql" or not names:
        return []
    if db.conn.in_transaction:
        log.warning("database layout: indexes are not built inside a transaction (%s)", ", ".join(names))
        return []

    def missing() -> tuple[dict[str, bool], list[str]]:
        state = {str(r[0]): bool(r[1]) for r in db.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()").fetchall()}
        return state, [name for name in names if not state.get(name, False)]

    state, wanted = missing()
    if not wanted:
        return []
    if not db.execute(f"SELECT pg_try_advisory_lock({_INDEX_LOCK})").fetchone()[0]:
        log.info("database layout: another node is building indexes; this one goes on without waiting")
        return []
    built: list[str] = []
    try:
        state, wanted = missing()  # again, under the lock: another node may have built them meanwhile
        found = _index_statements(db, part, wanted)
        for name in wanted:
            log.warning("database layout: building index %s beside the running work (added by this release)", name)
            try:
                if name in state:  # invalid: a build that failed left it
                    db.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                db.execute(found[name].replace("INDEX IF NOT EXISTS", "INDEX CONCURRENTLY IF NOT EXISTS", 1))
                built.append(name)
            except Exception as exc:  # noqa: BLE001 - the gateway works without it; said, and tried again later
                log.warning("database layout: index %s could not be built now (%s: %s); lookups by it read the "
                            "whole table until the next `gateway db upgrade` or start builds it", name,
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    finally:
        db.execute(f"SELECT pg_advisory_unlock({_INDEX_LOCK})")
    return built
