"""Running counts the monitoring endpoints read, instead of counting a growing table at every probe.

``/health`` shows the messages by status and ``/metrics`` the recognition decisions by outcome and the deliveries
by state. Counted at each probe, they cost a walk of a whole index: some 90 ms per million messages on SQLite,
for a probe a load balancer makes every few seconds and a scrape Prometheus makes every fifteen. Here each count
is a row of ``tallies`` (what, key, n), kept by triggers in the transaction that inserts, deletes or changes the
rows it counts, so the figures are exact and reading them is a few rows.

A counted table gets its triggers together with its first count (and a row saying it was started), in one
transaction that holds the write lock (and, on PostgreSQL, the trigger's own lock on the table: writers in
flight are waited for, and later ones fire the trigger): nothing is counted twice or missed. That happens when
the table is made, and for a database written by an earlier release at the next opening (SQLite) or at
``gateway db upgrade`` and ``gateway serve``'s start (PostgreSQL, whose openings only read). Until then, and
wherever the triggers are missing, the figures are counted as before (:func:`counts` answers None).
"""
from __future__ import annotations

import logging

from gateway.store import schema
from gateway.store.db import Database, dialect, transaction

__all__ = ["COUNTED", "ensure", "counts", "figures"]

log = logging.getLogger(__name__)

#: What is counted: name -> (table, column counted by its values).
COUNTED = {
    "messages": ("messages", "status"),
    "deliveries": ("outbox", "status"),
    "decisions": ("recognition_decisions", "outcome"),
}

_TABLE = {
    "sqlite": ("CREATE TABLE IF NOT EXISTS tallies (what TEXT NOT NULL, key TEXT NOT NULL, n INTEGER NOT NULL,"
               " PRIMARY KEY (what, key)) WITHOUT ROWID"),
    "postgresql": ("CREATE TABLE IF NOT EXISTS tallies (what TEXT NOT NULL, key TEXT NOT NULL, n BIGINT NOT NULL,"
                   " PRIMARY KEY (what, key))"),
}


def _names(what: str) -> tuple[str, str, str]:
    """The triggers that keep ``what``: on insert, on a change of the counted column, on delete."""
    return f"tally_{what}_insert", f"tally_{what}_change", f"tally_{what}_delete"


def _sqlite_triggers(what: str, table: str, column: str) -> list[str]:
    add = (f"INSERT INTO tallies (what, key, n) VALUES ('{what}', NEW.{column}, 1)"
           " ON CONFLICT (what, key) DO UPDATE SET n = n + 1;")
    take = f"UPDATE tallies SET n = n - 1 WHERE what = '{what}' AND key = OLD.{column};"
    on_insert, on_change, on_delete = _names(what)
    return [
        f"CREATE TRIGGER IF NOT EXISTS {on_insert} AFTER INSERT ON {table} BEGIN {add} END",
        f"CREATE TRIGGER IF NOT EXISTS {on_change} AFTER UPDATE OF {column} ON {table}"
        f" WHEN OLD.{column} IS NOT NEW.{column} BEGIN {take} {add} END",
        f"CREATE TRIGGER IF NOT EXISTS {on_delete} AFTER DELETE ON {table} BEGIN {take} END",
    ]


def _postgresql_triggers(what: str, table: str, column: str) -> list[str]:
    # the two rows of a change are taken in the order of their keys, so that two changes never wait for each other
    function = f"tally_{what}"
    body = (
        # (the schema it is made in, whatever the search_path of the session whose write fires it)
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT"
        f" AS $$ BEGIN"
        f" IF TG_OP = 'INSERT' THEN"
        f"  INSERT INTO tallies (what, key, n) VALUES ('{what}', NEW.{column}, 1)"
        f"   ON CONFLICT (what, key) DO UPDATE SET n = tallies.n + 1;"
        f" ELSIF TG_OP = 'DELETE' THEN"
        f"  UPDATE tallies SET n = n - 1 WHERE what = '{what}' AND key = OLD.{column};"
        f" ELSIF OLD.{column} < NEW.{column} THEN"
        f"  UPDATE tallies SET n = n - 1 WHERE what = '{what}' AND key = OLD.{column};"
        f"  INSERT INTO tallies (what, key, n) VALUES ('{what}', NEW.{column}, 1)"
        f"   ON CONFLICT (what, key) DO UPDATE SET n = tallies.n + 1;"
        f" ELSE"
        f"  INSERT INTO tallies (what, key, n) VALUES ('{what}', NEW.{column}, 1)"
        f"   ON CONFLICT (what, key) DO UPDATE SET n = tallies.n + 1;"
        f"  UPDATE tallies SET n = n - 1 WHERE what = '{what}' AND key = OLD.{column};"
        f" END IF; RETURN NULL; END $$")
    on_insert, on_change, on_delete = _names(what)
    return [
        body,
        f"CREATE TRIGGER {on_insert} AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER {on_change} AFTER UPDATE OF {column} ON {table} FOR EACH ROW"
        f" WHEN (OLD.{column} IS DISTINCT FROM NEW.{column}) EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER {on_delete} AFTER DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()",
    ]


def _present(db: Database, what: str) -> bool:
    """Whether ``what`` is counted: its triggers all there, and the row its first count left (read, not learnt;
    the table may have been made again empty, for another count, since)."""
    table = COUNTED[what][0]
    if dialect(db) == "postgresql":
        if db.execute("SELECT to_regclass('tallies') IS NULL").fetchone()[0]:
            return False
        rows = db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(CAST(? AS text))"
                          " AND NOT tgisinternal", [table]).fetchall()
    else:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tallies'").fetchone() is None:
            return False
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?",
                          [table]).fetchall()
    if not set(_names(what)) <= {str(r[0]) for r in rows}:
        return False
    return db.execute("SELECT 1 FROM tallies WHERE what = ? AND key = ''", [_started(what)]).fetchone() is not None


def _started(what: str) -> str:
    """The row (``what`` of its own, so that no counted value can be it) a count's start leaves."""
    return f"{what}:started"


def ensure(db: Database, which: tuple[str, ...] | None = None) -> list[str]:
    """Give every counted table that exists (of ``which``, default all) its triggers and first count where it has
    none; inside the caller's transaction when there is one. Returns what was started now."""
    started: list[str] = []
    for what in which or tuple(COUNTED):
        table, column = COUNTED[what]
        if not schema.columns(db, table):
            continue  # the part is made later, and starts its count then
        if _present(db, what):  # asked, not learnt: a connection kept between uses may outlive a dropped table
            continue
        engine = dialect(db)
        with transaction(db):
            if _present(db, what):  # another process started it meanwhile
                continue
            db.execute(_TABLE[engine])
            # the triggers first: on PostgreSQL making one locks the table against writers until the commit.
            # Any of them left alone (dropped by hand) goes first, so that the count starts again whole.
            for name in _names(what):
                db.execute(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if engine == "postgresql" else ""))
            make = _postgresql_triggers if engine == "postgresql" else _sqlite_triggers
            for statement in make(what, table, column):
                db.execute(statement)
            db.execute("DELETE FROM tallies WHERE what IN (?, ?)", [what, _started(what)])
            db.execute(f"INSERT INTO tallies (what, key, n) SELECT ?, {column}, count(*) FROM {table}"
                       f" GROUP BY {column}", [what])
            db.execute("INSERT INTO tallies (what, key, n) VALUES (?, '', 0)", [_started(what)])  # see _present
        started.append(what)
        log.info("database layout: %s counted as they change (tallies)", what)
    return started


def counts(db: Database, what: str) -> dict[str, int] | None:
    """The running count of ``what`` by key (only keys with rows), or None where it is not kept (count instead).

    Whether it is kept is asked each time (a look at the catalogue), not learnt: a probe's connection lives long,
    and a trigger dropped meanwhile must send it back to counting."""
    if not _present(db, what):
        return None
    return {str(k): int(n) for k, n in db.execute(
        "SELECT key, n FROM tallies WHERE what = ? AND n > 0 ORDER BY key", [what]).fetchall()}


def figures(db: Database, what: str) -> dict[str, int]:
    """``what`` by key (only keys with rows): the running count where it is kept, counted otherwise. The table
    counted must exist."""
    kept = counts(db, what)
    if kept is not None:
        return kept
    table, column = COUNTED[what]
    return {str(k): int(n) for k, n in db.execute(
        f"SELECT {column}, count(*) FROM {table} GROUP BY {column} ORDER BY {column}").fetchall()}
