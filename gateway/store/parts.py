"""Creating a part's tables from the operation that first needs them, inside or outside the caller's transaction.

The decisions, referrals and registry parts create their tables when first
used (a database written before they existed gains them on the way). Their
writers often run inside a caller's transaction (a received Bundle's decisions
commit with its audit entries), where SQLite's ``executescript`` must not run:
it would commit the caller's work half done. :func:`ensure` runs the part's
schema file statement by statement there, and the whole file at once
elsewhere; on PostgreSQL always inside a transaction holding the write lock,
so that nodes starting together do not race to create the same table.

The check is made once per connection; a part created inside a caller's
transaction is checked again until that transaction is known to have committed
(:func:`gateway.store.schema.learn`).
"""
from __future__ import annotations

import sqlite3

from gateway.store import schema
from gateway.store.db import Database, dialect, transaction

__all__ = ["ensure", "ready", "statements"]


def ready(db: Database, part: str) -> bool:
    """Whether ``part``'s tables are known to exist on this connection (no query)."""
    return schema.known(db, f"part:{part}")


def statements(text: str) -> list[str]:
    """A SQLite schema file as single statements (a trigger's body keeps its own ``;``)."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines(keepends=True):
        if not pending and (not line.strip() or line.lstrip().startswith("--")):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        out.append(pending.strip())
    return out


def ensure(db: Database, part: str, last_table: str, added_indexes: tuple[str, ...] = ()) -> bool:
    """Create ``part``'s tables when ``last_table`` (the one its file creates last) is missing, and the indexes
    of ``added_indexes`` (added to the file after its tables first existed) when they are.

    Returns True when the file was run. Inside a caller's transaction the
    tables are created within it (and roll back with it).
    """
    if ready(db, part):
        return False
    if schema.columns(db, last_table):
        schema.ensure_indexes(db, part, added_indexes)
        schema.learn(db, f"part:{part}")
        return False
    joined = bool(db.conn.in_transaction)
    if dialect(db) == "postgresql":
        with transaction(db):
            db.executescript(schema.script(db, part))
    elif joined:
        for statement in statements(schema.script(db, part)):
            db.execute(statement)
    else:
        with transaction(db):
            for statement in statements(schema.script(db, part)):
                db.execute(statement)
    schema.learn(db, f"part:{part}", made=True)
    return True
