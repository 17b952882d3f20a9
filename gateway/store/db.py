"""Database: opening the gateway's SQLite file the one right way.

WAL journal (readers never block the writer), a busy timeout instead of
``database is locked`` errors under concurrent HTTP and MLLP writers, foreign
keys on, and ``synchronous=NORMAL`` which in WAL mode is durable across
application crashes (a power cut can lose the last transactions, never corrupt).
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

__all__ = ["connect", "transaction"]


def connect(path: str | Path, *, readonly: bool = False) -> sqlite_utils.Database:
    """Open (creating if needed) the SQLite database at ``path``.

    ``path`` may be ``":memory:"`` for tests. The connection may be used from
    the thread that opened it only; open one per thread or request.
    """
    if str(path) == ":memory:":
        conn = sqlite3.connect(":memory:", isolation_level=None)
    else:
        p = Path(path)
        if not readonly:
            p.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{p}?mode=ro" if readonly else str(p)
        conn = sqlite3.connect(uri, uri=readonly, timeout=30.0, isolation_level=None)
    # isolation_level=None: we open transactions explicitly (BEGIN IMMEDIATE in
    # the store) so that an audit entry and the action it records commit together.
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if not readonly and str(path) != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    return sqlite_utils.Database(conn)


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception).

    Everything written inside commits together: a stored message, its stage
    status and its audit entry. Use ``db.execute`` inside; sqlite-utils' own
    insert helpers commit on their own (``with conn:``) and must not be used
    within a transaction. Nested use joins the outer transaction.
    """
    conn = db.conn
    if conn.in_transaction:
        yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
