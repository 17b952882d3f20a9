"""Database: opening the gateway's SQLite file the one right way.

WAL journal (readers never block the writer), a busy timeout instead of
``database is locked`` errors under concurrent HTTP and MLLP writers, foreign
keys on, and ``synchronous=NORMAL`` which in WAL mode is durable across
application crashes (a power cut can lose the last transactions, never corrupt).
Write transactions keep SQLite's temporary storage in memory (``temp_store =
MEMORY`` from just before ``BEGIN`` to the end, :func:`transaction`): an upsert or
an insert that fires a trigger keeps a statement journal (to undo that one
statement), which SQLite otherwise moves to a temporary file once it outgrows a
small buffer — storing one report did so every time, with a write call per page.
Everything else keeps SQLite's default, on disk: in memory, SQLite's sorter never
spills, and a read that sorts many rows (a search with a large offset) would
hold them all. Bulk work that rewrites whole tables (a layout upgrade, an index
added to a large table) runs :func:`spilling`: its transactions keep temporary
storage on disk too.

Checkpoints (copying the WAL back into the database file, with an fsync) are
the costly part of writing, and most of their cost is waiting for the disk: left
to SQLite's default, every thousandth page written makes one commit wait for it
(a message of 20 results writes some 170 pages, so every sixth message; each wait
is tens of milliseconds, an ACK held up that long). So the writer never does it
itself in the ordinary course: after a commit, :func:`transaction` asks this
process's checkpoint thread (:class:`_BackgroundCheckpoints`) to copy the WAL
back, at most a few times a second, with a connection of its own, while the
writer goes on; ``gateway serve``'s background part also runs a
:class:`WalCheckpointer` every second. A connection still checkpoints itself
once the WAL has grown past :data:`WAL_AUTOCHECKPOINT_PAGES` (the safety net, for a
disk slower than the writers). A page many commits rewrite — the end of a search
index run — is copied once per checkpoint, not once per commit.

The HTTP paths that need the database for a moment (the bearer-token check,
the console, the audit API...) :func:`borrowed` a connection instead of
opening one: on PostgreSQL each thread of each process keeps its connection
between requests (a TCP connection, authentication and a server process saved
per request) and gives it back clean; on SQLite every borrow opens and closes
the file as before.
"""
from __future__ import annotations

import atexit
import fcntl
import gc
import logging
import os
import select
import sqlite3
import stat
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
import contextlib
import functools
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError, DatabaseUnavailable
from gateway.store import postgresql as _pg


def _sqlite_utils() -> Any:
    """sqlite-utils, imported without the pandas and numpy it loads when they are installed (only to convert their
    values, which the gateway never hands it): a fifth of a second at every command's and every process's start."""
    hidden = [name for name in ("numpy", "pandas") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # an import of it fails (ImportError) meanwhile
    try:
        import sqlite_utils
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]  # importable again, for whoever wants it
    return sqlite_utils


if TYPE_CHECKING:
    import sqlite_utils
else:
    sqlite_utils = _sqlite_utils()

__all__ = ["connect", "spilling", "transaction", "savepoint", "WalCheckpointer", "WAL_AUTOCHECKPOINT_PAGES",
           "checkpoints_held",
           "empty_wal", "wal_page_owners", "Database",
           "dialect", "is_postgresql", "fault_reason", "IntegrityError", "OperationalError", "describe",
           "connection_lost", "borrowed",
           "unwritable",
           "close_borrowed", "IDLE_CHECK_SECONDS", "KEPT_PER_THREAD", "gateway_tables", "not_the_gateways"]

log = logging.getLogger(__name__)

#: WAL size (pages) at which a committing connection checkpoints by itself (SQLite's default: 1000).
WAL_AUTOCHECKPOINT_PAGES = 10_000


#: A gateway database: SQLite through sqlite-utils (the embedded default) or PostgreSQL (:mod:`.postgresql`).
Database = Any

#: Raised for a broken constraint (a unique key, a foreign key, a CHECK), on either engine. Read it where it is
#: caught (``except db.IntegrityError``): PostgreSQL's class joins it when the first PostgreSQL connection is
#: opened, so that a process on SQLite never loads the PostgreSQL driver (a fifth of a second at every start).
IntegrityError: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
#: Raised when the database cannot do what was asked now (locked, gone, out of space), on either engine (read it
#: where it is caught, as :data:`IntegrityError`).
OperationalError: tuple[type[Exception], ...] = (sqlite3.OperationalError,)


def _know_postgresql_errors() -> None:
    """Add PostgreSQL's error classes to :data:`IntegrityError` and :data:`OperationalError` (once)."""
    global IntegrityError, OperationalError
    try:
        import psycopg
    except ImportError:  # not installed: connect() says what to install
        return
    if psycopg.IntegrityError not in IntegrityError:
        IntegrityError = IntegrityError + (psycopg.IntegrityError,)
    if psycopg.OperationalError not in OperationalError:
        OperationalError = OperationalError + (psycopg.OperationalError,)


if "psycopg" in sys.modules:  # loaded already (by the caller): its errors count from now on
    _know_postgresql_errors()


def fault_reason(exc: BaseException, *, named: bool = True) -> str | None:
    """A database fault in its own words (the server gone or restarting, the file locked or out of space): the
    first line of the driver's or server's message, for /health and log lines; None when ``exc`` is not one (a bug
    is logged as the gateway's own error). Only the first line, and only of these classes: never a query's values.
    ``named`` False leaves out which database could not be reached (its host, port, user and name), for what
    anyone may read."""
    if isinstance(exc, DatabaseUnavailable):
        reason = getattr(exc, "reason", None)
        text = exc.message if named or not reason else f"cannot connect to the database: {reason}"
    elif isinstance(exc, OperationalError):
        text = str(exc)
    else:
        return None
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return (line if len(line) <= 300 else line[:297] + "...") or type(exc).__name__


def is_postgresql(locator: object) -> bool:
    """True when ``locator`` (the ``database`` setting) names a PostgreSQL database rather than a file."""
    return _pg.is_url(locator)


def dialect(db: Database) -> str:
    """``sqlite`` or ``postgresql``: the SQL a database speaks, for the statements that differ."""
    return str(getattr(db, "dialect", "sqlite"))


def connection_lost(db: Database) -> bool:
    """True when ``db`` is a PostgreSQL connection that the server ended or that failed beyond use (a restart,
    a failover, a session ended for idling in a transaction), or an idle SQLite connection opened read-only: open
    another.

    SQLite opens a file it cannot open for writing (its permissions, an immutable flag, a read-only mount at the
    time) read-only without saying so, and such a connection stays read-only after the file can be written again:
    only a new connection writes (:func:`connect` marks one opened so)."""
    if dialect(db) != "postgresql":
        # replaced once the files can be written (not before: a new connection would be read-only again)
        return (bool(getattr(db, "opened_read_only", False)) and not db.conn.in_transaction
                and not unwritable(getattr(db, "sqlite_path", ":memory:")))
    raw = db.conn.raw
    if raw.closed or raw.broken:
        return True
    # A connection kept by a thread (a member's store) is looked at as a borrowed one is before it is lent again:
    # after a server restart every such connection is gone, and each would otherwise fail one request to say so.
    now = time.monotonic()
    idle_for = now - getattr(db, "looked_at", now)
    setattr(db, "looked_at", now)
    import psycopg

    if raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False  # in the middle of the caller's work: that work says what became of it
    return not _usable(db, idle_for)


_SQLITE_READONLY = 8  # SQLITE_READONLY: the primary code of every "attempt to write a readonly database"


def _note_read_only(db: Database, exc: BaseException) -> None:
    """Mark ``db`` for :func:`connection_lost` when a write found it read-only (the file, or its shared-memory
    file, could not be opened for writing when the connection, or another one of this process, opened it)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.Error) and isinstance(code, int) and code & 0xFF == _SQLITE_READONLY:
        db.opened_read_only = True


def unwritable(locator: str | Path) -> list[str]:
    """The files of a SQLite database (the database, its ``-wal`` and ``-shm``, the folder they are made in) this
    process cannot write now (permissions, an immutable flag, a read-only mount); ``[]`` for PostgreSQL, which
    says so itself."""
    if is_postgresql(locator) or str(locator) == ":memory:":
        return []
    path = Path(os.path.realpath(locator))  # (a symbolic link: the folder SQLite writes in is the file's own)
    found = []
    for item in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), path.parent):
        if item.exists() and not os.access(item, os.W_OK):
            found.append(item.name if item != path.parent else f"{item}/")
    if not path.parent.exists():  # a folder to be made: the nearest one there is must take it
        made_in = next((p for p in path.parent.parents if p.exists()), None)
        if made_in is not None and not os.access(made_in, os.W_OK | os.X_OK):
            found.append(f"{made_in}/ (to make {path.parent} in)")
    return found


#: Below this many bytes free where a SQLite database lives, its writes are about to fail (a page, its log).
LOW_DISK_BYTES = 8 * 1024 * 1024


def disk_free(locator: str | Path) -> int | None:
    """Bytes free (to this user) on the file system of a SQLite database's folder; None for PostgreSQL (its server
    says so itself), an in-memory database or a folder that cannot be looked at."""
    if is_postgresql(locator) or str(locator) == ":memory:":
        return None
    try:
        stats = os.statvfs(Path(os.path.realpath(locator)).parent)
    except OSError:
        return None
    return int(stats.f_bavail) * int(stats.f_frsize)


def describe(locator: str | Path) -> str:
    """The database named for a person: a file path, or a URL without its password."""
    return _pg.redact(str(locator)) if is_postgresql(locator) else str(locator)


def connect(path: str | Path, *, readonly: bool = False) -> Database:
    """Open (creating if needed) the gateway database: a SQLite file, or a ``postgresql://`` URL.

    ``path`` may be ``":memory:"`` for tests. The connection may be used from
    the thread that opened it only; open one per thread or request.

    :raises ConfigError: the database is another program's (:func:`not_the_gateways`), asked before anything reads
        or changes it, once per file (or PostgreSQL locator) per process; ``path`` is a directory.
    """
    if is_postgresql(path):
        _know_postgresql_errors()
        pg = _pg.connect(str(path), readonly=readonly)
        try:
            _check_own_schema(pg, str(path))
        except BaseException:
            pg.close()
            raise
        return pg
    if str(path) == ":memory:":
        conn = sqlite3.connect(":memory:", isolation_level=None)
    else:
        p = Path(path)
        new = False
        if p.is_dir():
            raise ConfigError(f"{p} is a directory: the database setting names the gateway's database file (a new "
                              "one is made where none is)", "database")
        if not readonly:
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                # patient data: a new database is for this user only (SQLite gives its -wal and -shm files the
                # database file's mode)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    new = True
        conn = _open_read_only(p) if readonly else sqlite3.connect(str(p), timeout=30.0, isolation_level=None)
        if new:
            log.debug("database %s created, mode 0600", p)
    # isolation_level=None: we open transactions explicitly (BEGIN IMMEDIATE in
    # the store) so that an audit entry and the action it records commit together.
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if str(path) != ":memory:" and not new:
        # another program's file is refused before anything reads or changes it (switching it to WAL would, for its
        # program; a command that makes its own tables would make them in it), once per file per process
        try:
            _check_own_file(conn, Path(path))
        except BaseException:
            conn.close()
            raise
        if not readonly:
            _keep_private(Path(path))  # (the gateway's own database: another program's file is left as it is)
    db = sqlite_utils.Database(conn)
    if not readonly and str(path) != ":memory:":
        db.sqlite_path = str(path)  # type: ignore[attr-defined]
        if not os.access(path, os.W_OK):
            # SQLite has opened the file read-only (see connection_lost): this connection is replaced once the
            # file can be written again
            db.opened_read_only = True  # type: ignore[attr-defined]
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        # (see transaction: its commits are checkpointed beside it)
        db.checkpoint_path = str(Path(path).absolute())  # type: ignore[attr-defined]
    return db


_SQLITE_CANTOPEN = 14  # SQLITE_CANTOPEN: a file (the database, or its -shm beside it) that cannot be opened


def _open_read_only(path: Path) -> sqlite3.Connection:
    """``path`` opened read-only (``mode=ro``), or, when it lives where nothing can be written (a read-only mount, a
    folder without write permission: a restored backup on a DVD, a mounted snapshot) and SQLite cannot make the
    ``-shm`` file a WAL database is read with, as an unchanging file (``immutable=1``): no other process can change
    it there. A non-empty ``-wal`` file beside it holds committed changes an unchanging file would not see: refused.

    :raises ConfigError: a ``-wal`` file that cannot be read without writing beside it.
    """
    from urllib.parse import quote

    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # (where a missing -shm is found)
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        code = getattr(exc, "sqlite_errorcode", None)
        if not (isinstance(code, int) and code & 0xFF in (_SQLITE_CANTOPEN, _SQLITE_READONLY)
                and unwritable(path)):
            raise
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise ConfigError(f"{path}: its {wal.name} holds changes that cannot be read where this user may write "
                          f"nothing (no {path.name}-shm can be made): copy the database with its -wal file to a "
                          "folder this user can write, and open the copy", "database")
    log.debug("database %s opened as an unchanging file (immutable): nothing can be written where it is", path)
    return sqlite3.connect(f"{uri}&immutable=1", uri=True, timeout=30.0, isolation_level=None)


def _keep_private(path: Path) -> None:
    """An existing database file (and its -wal, -shm and -receipts) that other users may read — a backup copied back
    with ``cp`` under a umask of 022 — is made this user's alone (0600), said in the log (INFO: nothing is left to
    do): it holds patient data, and a new one is made so. One of another owner is said as a warning (this process
    cannot change its mode)."""
    for file in (path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-receipts"))):
        try:
            st = file.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077:
            continue  # (a device or FIFO named as the database, /dev/null, is never chmodded: only a file of data)
        mode = oct(st.st_mode & 0o777)[2:]
        try:
            os.chmod(file, 0o600)
            log.info("database file %s could be read by other users (mode %s): made 0600 (patient data; a backup "
                     "restored with cp keeps the umask's mode)", file, mode)
        except OSError as exc:
            log.warning("database file %s can be read by other users (mode %s) and its mode could not be changed "
                        "(%s): chmod 600 it, as its owner", file, mode, exc.strerror)


#: (device, inode) of the SQLite files this process found to be the gateway's (a file replaced, as by a restore,
#: is a new inode: asked again)
_OWN_FILES: set[tuple[int, int]] = set()


def _check_own_file(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse the SQLite file ``path`` (just opened as ``conn``) when it is another program's database
    (:func:`not_the_gateways`).

    :raises ConfigError: naming the file and what was found. :raises sqlite3.DatabaseError: not a database at all.
    """
    try:
        st = os.stat(path)
    except OSError:
        return  # (gone meanwhile: SQLite says so at the first statement)
    key = (st.st_dev, st.st_ino)
    if key in _OWN_FILES:
        return
    # (a file that is not a database at all raises here what SQLite says of it, as its first use would)
    tables = [str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    refused = not_the_gateways(tables, lambda table: {
        str(r[1]) for r in conn.execute(f"PRAGMA table_info(\"{table.replace(chr(34), chr(34) * 2)}\")")})
    if refused is not None:
        raise ConfigError(f"{path}: {refused.message}", refused.location)
    _remember_own(_OWN_FILES, key, tables)


#: The PostgreSQL locators (URL and schema) this process found to be the gateway's.
_OWN_SCHEMAS: set[str] = set()


def _check_own_schema(db: Database, locator: str) -> None:
    """:func:`_check_own_file` for the schema a PostgreSQL connection works in: its tables and their columns read
    from the catalog in one question, once per locator per process.

    :raises ConfigError: another program's schema (:func:`not_the_gateways`).
    """
    if locator in _OWN_SCHEMAS:
        return
    rows = db.execute("SELECT c.relname, a.attname FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_attribute a"
                      " ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
                      " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relnamespace = ("
                      "SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = current_schema())").fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(str(table), set()).update([str(column)] if column is not None else [])
    refused = not_the_gateways(list(columns), lambda table: columns.get(table, set()))
    if refused is not None:
        raise refused
    _remember_own(_OWN_SCHEMAS, locator, columns)


def _remember_own(own: set[Any], key: Any, tables: Iterable[str]) -> None:
    """Add ``key`` to ``own`` (:data:`_OWN_FILES`, :data:`_OWN_SCHEMAS`: not asked again), at most 256 of them, when
    its database, found not another program's, holds a table of the gateway's (an empty one is asked again)."""
    if len(own) < 256 and any(t.lower() in gateway_tables() for t in tables):
        own.add(key)


@functools.cache
def gateway_tables() -> frozenset[str]:
    """The names of the tables the gateway's layout holds, on either engine (read from its SQL files, with the few
    made in code and those of earlier layouts)."""
    from importlib.resources import files

    names = {"schema_versions", "tallies", "search_token_layout2"}
    for engine in ("sqlite", "postgresql"):
        for item in files("gateway.store").joinpath("sql", engine).iterdir():
            if item.name.endswith(".sql"):
                names.update(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", item.read_text(encoding="utf-8")))
    return frozenset(names)


#: Columns a later layout added to a table (by ALTER TABLE when an older database is opened): not asked of it.
_ADDED_LATER = {
    "messages": {"lease_owner", "lease_until", "attempts", "content_digest"},
    "gateway_token": {"expires"},
    "registry_applied": {"snapshot"},
    "report_versions": {"report_code", "replaces"},
    "outbox": {"lease_owner", "earlier_attempts"},
}
#: Tables made in code, and tables whose shape changed from one layout to the next: the columns of each shape
#: (a table of that name is the gateway's when it has all the columns of one of them).
_SHAPES: dict[str, tuple[frozenset[str], ...]] = {
    "resources": (frozenset({"type", "id", "json"}),),  # (layout 1 had no rid)
    "search_token": (frozenset({"type", "param", "code"}),  # layouts 1 (with id) and 2 (with res)
                     frozenset({"key", "res"})),  # layout 3 on
    "search_token_layout2": (frozenset({"type", "param", "code", "res"}),),  # (layout 2's, while it is converted)
    "search_date": (frozenset({"type", "param", "lo", "hi"}),),  # (layout 1 with id, then with res)
    "tallies": (frozenset({"what", "key", "n"}),),
    "schema_versions": (frozenset({"part", "version"}),),
}


@functools.cache
def _signatures() -> dict[str, tuple[frozenset[str], ...]]:
    """{table: the shapes (sets of columns) the gateway's table of that name has had}: for a table the SQLite files
    declare, the columns they declare (read back from a database made of them in memory), less those later layouts
    added; for the others, :data:`_SHAPES`."""
    from importlib.resources import files

    made = sqlite3.connect(":memory:")
    try:
        for item in sorted(files("gateway.store").joinpath("sql", "sqlite").iterdir(), key=lambda i: i.name):
            if item.name.endswith(".sql"):
                made.executescript(item.read_text(encoding="utf-8"))
        tables = [str(r[0]) for r in made.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        declared = {t: {str(r[1]) for r in made.execute(f'PRAGMA table_info("{t}")')} for t in tables}
    finally:
        made.close()
    signatures: dict[str, tuple[frozenset[str], ...]] = {
        t: (frozenset(columns - _ADDED_LATER.get(t, set())),) for t, columns in declared.items()}
    signatures.update(_SHAPES)
    return signatures


def not_the_gateways(tables: Iterable[str], columns: Callable[[str], set[str]]) -> ConfigError | None:
    """The error that refuses a database that is not the gateway's, or None. One holding ``tables`` (and views),
    none of them named as one of the gateway's (as the engine compares names: without regard to case; SQLite's own
    ``sqlite_`` tables left out), is another program's; so is one holding a table named as one of the gateway's that
    lacks the columns the gateway's has had in every layout (``columns(table)``: the columns it has). A database
    holding nothing is the gateway's to make."""
    found = sorted({t for t in tables if not t.lower().startswith("sqlite_")})
    if not found:
        return None
    ours = [t for t in found if t.lower() in gateway_tables()]
    if not ours:
        named = ", ".join(found[:6]) + (f"... ({len(found)} in all)" if len(found) > 6 else "")
        return ConfigError(f"this database holds another program's tables ({named}) and none of the gateway's: "
                           "point the database setting at the gateway's own database, or at a new one; nothing was "
                           "written to this one", "database")
    signatures = _signatures()
    for table in ours:
        shapes = signatures.get(table.lower(), ())
        present = {c.lower() for c in columns(table)} if shapes else set()
        if shapes and not any(shape <= present for shape in shapes):
            return ConfigError(f"this database (or schema) holds a table {table} that is not the gateway's (its "
                               f"columns: {', '.join(sorted(present))}): point the database "
                               "setting at the gateway's own database, or at a new one; nothing was written to this "
                               "one", "database")
    return None


@contextmanager
def spilling(db: Database) -> Iterator[Database]:
    """SQLite's temporary storage on disk (``temp_store = FILE``) while bulk work runs — a layout upgrade that
    rewrites whole tables, an index added to a large one — whose statement journals and sorts grow with the
    database: the transactions begun inside keep it on disk too (:func:`transaction` otherwise puts it in
    memory). Entered inside a transaction already open, it moves sorts to disk, not that transaction's statement
    journals (SQLite decides those when the transaction begins). SQLite's default again afterwards; nested use
    joins the outer one. Nothing changes on PostgreSQL."""
    if dialect(db) != "sqlite":
        yield db
        return
    depth = getattr(db, "spill_depth", 0)
    db.spill_depth = depth + 1
    if depth == 0:
        db.conn.execute("PRAGMA temp_store = FILE")
    try:
        yield db
    finally:
        db.spill_depth = depth
        if depth == 0:
            _temp_store(db.conn, "DEFAULT")


def _temp_store(conn: Any, mode: str) -> None:
    """``PRAGMA temp_store = mode``, after the work it served: a connection that has broken meanwhile says so at its
    next use, not here, in place of what went wrong first."""
    try:
        conn.execute(f"PRAGMA temp_store = {mode}")
    except sqlite3.Error as exc:
        log.debug("temp_store could not be set back: %s", exc)


@contextmanager
def transaction(db: Database, *, poll: bool = False) -> Iterator[Database]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception).

    Everything written inside commits together: a stored message, its stage
    status and its audit entry. Use ``db.execute`` inside; sqlite-utils' own
    insert helpers commit on their own (``with conn:``) and must not be used
    within a transaction. Nested use joins the outer transaction.

    ``poll``: wait for another writer by trying again every half millisecond
    (for as long as the busy timeout) instead of SQLite's own waiting, which
    sleeps 1, 2, 5, 10, 15 ms and more between tries. For short transactions
    whose caller is waiting, such as an MLLP receipt beside the queue reader.

    No garbage collection starts while the transaction is open (the write lock, on
    either engine, is held): a full collection in a busy process took 30 to 80 ms,
    and every other writer — an MLLP listener storing a message before its ACK —
    waited for it. See :class:`_CollectorHold`; what the collector would have
    collected meanwhile is collected once no transaction of the process is open.
    """
    conn = db.conn
    if conn.in_transaction:
        yield db
        return
    in_memory = False
    path, announced = None, False  # (SQLite: the file short transactions go first on, and whether this is one)
    if dialect(db) == "postgresql":
        conn.begin()
    else:
        if not getattr(db, "spill_depth", 0):  # (statement journals in memory: see the module's notes)
            conn.execute("PRAGMA temp_store = MEMORY")
            in_memory = True
        path = getattr(db, "sqlite_path", None)
        try:
            if poll:
                announced = _SHORT_FIRST.announce(path)
                _begin_polling(conn)
            else:
                _SHORT_FIRST.give_way(path)
                conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            if announced:
                _SHORT_FIRST.done(path)
            if in_memory:
                _temp_store(conn, "DEFAULT")
            _note_read_only(db, exc)
            raise
        # SQLite's transactions numbered on the connection object, as PostgreSQL's are (``begun``): a fact
        # about the database that one of them made is settled once a later one finds it
        # (:func:`gateway.store.schema.learn`)
        db.sqlite_begun = getattr(db, "sqlite_begun", 0) + 1
    changes_before = conn.total_changes if dialect(db) == "sqlite" else 0
    _COLLECTOR.enter()
    try:
        try:
            yield db
        except BaseException as failed:
            _note_read_only(db, failed)
            _pg.note_write_failure(failed)  # (a full disk or an I/O error: /health says so until a write goes through)
            if conn.in_transaction:  # SQLite may have rolled back already (a full disk, an I/O error)
                try:
                    conn.execute("ROLLBACK")
                except Exception as exc:  # noqa: BLE001 - the connection is gone: what went wrong first is the news
                    log.warning("rolling back failed too: %s", exc)
            raise
        try:
            conn.execute("COMMIT")
        except BaseException as failed:
            _pg.note_write_failure(failed)
            raise
        if _pg.write_failure() is not None and dialect(db) == "sqlite" and conn.total_changes > changes_before:
            _pg.write_succeeded()  # (a write went through: a transaction that wrote nothing proves no disk has room)
    finally:
        if announced:
            _SHORT_FIRST.done(path)
        _COLLECTOR.leave()
        if in_memory:
            _temp_store(conn, "DEFAULT")
    wal = getattr(db, "checkpoint_path", None)
    if wal is not None:
        _CHECKPOINTS.request(wal)


class _CollectorHold:
    """Automatic garbage collection off while any thread of this process has a write transaction open.

    Counted: the first transaction to begin turns the collector off, the last to end turns it back on, and only if
    it was on when the first began (a caller that turned it off keeps it off). Turning it off and on by hand while
    another thread's transaction is open is not told apart: the last transaction to end restores what it found
    when the first began. A process forked while a transaction was open starts with none open and the collector as
    it was before the first began (the forking thread's own transaction, ending there, is not counted again). An
    interrupt (KeyboardInterrupt) landing inside :meth:`enter` or :meth:`leave` may leave the collector off: it
    ends the process.
    """

    def __init__(self) -> None:
        self._forked()

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._was_on = False

    def enter(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._was_on = gc.isenabled()
                if self._was_on:
                    gc.disable()
            self._holders += 1

    def leave(self) -> None:
        with self._lock:
            if self._holders == 0:  # a transaction open when this process was forked from its parent
                return
            self._holders -= 1
            if self._holders == 0 and self._was_on:
                gc.enable()

    def after_fork_in_child(self) -> None:
        """In a child: no transaction of the parent's threads is open here."""
        if self._holders and self._was_on:
            gc.enable()
        self._forked()


_COLLECTOR = _CollectorHold()


class _BackgroundCheckpoints:
    """This process's checkpoint thread: the WAL of a database file this process has committed to is copied
    back into the file soon after (``PASSIVE``: never blocking a writer or a reader), at most every
    :attr:`gap` seconds per file, each time with a connection opened for it (a file replaced by a restore, or
    deleted, is never written through an old one). The thread is started on first use, in the process that uses
    it, and waits for work without a timer while nothing is committed.

    While it is inside SQLite (opening, checkpointing, closing) it holds :attr:`_busy`, and two moments wait for
    that: a fork (SQLite's own locks must not be copied into the child half-taken; the child starts afresh, with
    a thread of its own on first use), and the end of the process (the thread's connection, when it is the
    last one open, is what copies the WAL back and removes it: the process must not end in the middle of it, or
    the file alone would lack the last commits until the next opening).
    """

    gap = 0.25  # seconds between two checkpoints of one file (at 1 s a writer fast enough meets the safety net)

    def __init__(self) -> None:
        self._forked()

    def _forked(self) -> None:
        """A fresh start: in a new process (a forked child inherits no thread, and maybe a lock held)."""
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while the thread is inside SQLite
        self._wake = threading.Event()
        self._pending: set[str] = set()  # files asked for since their last checkpoint
        self._last: dict[str, float] = {}  # path -> when it was last checkpointed
        self._started = False
        self._ended = False
        self.held = False  # True: no checkpoint asked for (see checkpoints_held)

    def before_fork(self) -> None:
        self._busy.acquire()

    def after_fork_in_parent(self) -> None:
        self._busy.release()

    def end(self) -> None:
        """At the end of the process: let a checkpoint under way finish, and start no other."""
        if self._busy.acquire(timeout=10.0):
            self._ended = True
            self._busy.release()

    def request(self, path: str) -> None:
        if self.held:
            return
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._run, name="wal-checkpoint-beside", daemon=True).start()
            if path not in self._pending:
                self._pending.add(path)
                self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                now = time.monotonic()
                due = [p for p in self._pending if now - self._last.get(p, 0.0) >= self.gap]
                for p in due:
                    self._pending.discard(p)
                    self._last[p] = now
                later = [self._last.get(p, 0.0) + self.gap - now for p in self._pending]
            for p in due:
                with self._busy:
                    if self._ended:
                        return
                    _checkpoint_once(p)
            if later:  # asked again before its gap was over: checkpointed once the gap is
                time.sleep(max(0.0, min(later)))
                self._wake.set()
            with self._lock:
                if len(self._last) > 64:  # files not asked for lately are forgotten
                    cutoff = time.monotonic() - 10 * self.gap
                    self._last = {p: t for p, t in self._last.items() if t >= cutoff or p in self._pending}


def _checkpoint_once(path: str) -> None:
    """One ``PASSIVE`` checkpoint of the database file at ``path``; a file gone or busy is left for the next time.
    Never raises: the thread goes on for the other files (and a writer past the safety net checkpoints itself)."""
    try:
        conn = sqlite3.connect(f"{Path(path).as_uri()}?mode=rw", uri=True, timeout=0.0, isolation_level=None)
    except sqlite3.Error:
        return  # deleted or moved away since the commit: nothing of it to copy
    except Exception as exc:  # noqa: BLE001 - e.g. a path the URI form cannot name
        log.warning("WAL checkpoint beside the writer not possible for this database: %s", type(exc).__name__)
        return
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error as exc:  # another checkpoint running, a lock: the next commit asks again
        log.debug("WAL checkpoint beside the writer not done: %s", exc)
    finally:
        conn.close()


_CHECKPOINTS = _BackgroundCheckpoints()


def empty_wal(path: str | Path) -> None:
    """Copy the WAL of the SQLite file at ``path`` back into it and empty it (a ``TRUNCATE`` checkpoint), so that
    the log holds only what is written next (``python -m gateway.bench.profile pages``)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def wal_page_owners(path: str | Path) -> list[str]:
    """The table or index each frame of the WAL of the SQLite file at ``path`` writes a page of, frame by frame
    (``(freed since)`` for a page no longer in use), read from the frames' headers and SQLite's ``dbstat``.

    :raises RuntimeError: this SQLite has no ``dbstat``.
    """
    log = Path(f"{path}-wal").read_bytes()
    if len(log) < 32:
        return []
    size = int.from_bytes(log[8:12], "big")
    pages = [int.from_bytes(log[at:at + 4], "big") for at in range(32, len(log) - 23, 24 + size)]
    conn = sqlite3.connect(path)
    try:
        owner = {page: name for name, page in conn.execute("SELECT name, pageno FROM dbstat")}
    except sqlite3.OperationalError as exc:
        raise RuntimeError(f"this SQLite cannot count pages by table ({exc})") from None
    finally:
        conn.close()
    return [owner.get(page, "(freed since)") for page in pages]


@contextmanager
def checkpoints_held() -> Iterator[None]:
    """No checkpoint beside the writers of this process meanwhile: the WAL keeps what they wrote, for a tool that
    reads it (``python -m gateway.bench.profile pages``). The writers' own safety net still applies."""
    _CHECKPOINTS.held = True
    try:
        yield
    finally:
        _CHECKPOINTS.held = False


os.register_at_fork(before=_CHECKPOINTS.before_fork, after_in_parent=_CHECKPOINTS.after_fork_in_parent,
                    after_in_child=_CHECKPOINTS._forked)
os.register_at_fork(after_in_child=_COLLECTOR.after_fork_in_child)
atexit.register(_CHECKPOINTS.end)


@contextmanager
def savepoint(db: Database, name: str = "unit") -> Iterator[Database]:
    """A part of the caller's transaction that can fail alone: ``SAVEPOINT`` ... ``RELEASE``.

    On any exception only what was written inside is rolled back, and the
    exception goes on to the caller, whose transaction is still open: one
    message of a batch that cannot be recorded leaves the others recorded.
    Outside a transaction it is one (:func:`transaction`).
    """
    conn = db.conn
    if not conn.in_transaction:
        with transaction(db):
            yield db
        return
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield db
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back the whole transaction already
            conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
            conn.execute(f"RELEASE SAVEPOINT {name}")
        raise
    conn.execute(f"RELEASE SAVEPOINT {name}")


class _ShortFirst:
    """Short write transactions whose caller waits (``transaction(poll=True)``: an MLLP receipt, a queue reader's
    claim) go before long ones (a queue reader recording a message) on one SQLite file, across processes.

    SQLite's write lock goes to whichever connection asks first once it is free, so with two queue readers an
    MLLP listener's receipt often waited for both readers' recordings, one after the other (2.5 to 4 ms each on a
    2-core machine), and the ACK p99 of ``mllp_ack = received`` rose from some 16 to some 24 ms. Now a short
    transaction says so while it waits and until it commits (a shared ``flock`` on ``<database>-receipts``, a file
    beside the database), and a long one, before it asks for the write lock, waits while any is said (trying an
    exclusive lock every 0.2 ms), for at most :attr:`patience` (a quarter of it after a wait that ran out), so that
    a stream of receipts never holds the recordings back for long. Only an order: SQLite's own lock still keeps
    writers apart, and where the file cannot be made (a folder this user cannot write: tried again a minute later;
    a database in memory; PostgreSQL) nothing waits for anything. The file holds no data (its mode is the
    database's, 0600: :func:`_keep_private`).

    One pair of descriptors per database file and process (opened again in a forked child): ``said`` holds the
    shared lock while any thread of the process has a short transaction under way (counted), ``probe`` tries the
    exclusive one (on a description of its own, so that it also meets this process's own short transactions).
    """

    patience = 0.02  # seconds a long transaction gives way at most
    kept = 8  # database files whose descriptors a process keeps (the least lately used one unused is closed)

    def __init__(self) -> None:
        self._forked()

    def _forked(self) -> None:
        """A fresh start (also in a forked child: a lock another thread held is not copied half-taken, and the
        descriptors inherited, which share the parent's locks, are closed without touching those)."""
        for entry in getattr(self, "_files", {}).values():  # (inherited: this process's pid is not theirs)
            for fd in entry[1:] if entry is not None else ():
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock = threading.Lock()
        # path -> (pid, said, probe), None where the file cannot be made; most lately used last
        self._files: OrderedDict[str, tuple[int, int, int] | None] = OrderedDict()
        self._counts: dict[str, int] = {}  # path -> short transactions of this process under way (said)
        self._using: dict[str, int] = {}  # path -> long transactions of this process giving way (probing)
        self._retry: dict[str, float] = {}  # path -> when a file that could not be used is tried again (monotonic)
        self._outwaited: dict[str, bool] = {}  # path -> the last long transaction gave way for all its patience
        self._checked: dict[str, float] = {}  # path -> when the file is next looked at again (monotonic)
        self._stuck_until: dict[str, float] = {}  # path -> no short transaction is said before then (see announce)
        self._warned: set[str] = set()  # paths whose trouble was said as a warning once
        self._stuck_said: dict[str, float] = {}  # path -> when its file held by another process was last said

    def _fds(self, path: str) -> tuple[int, int] | None:
        """(said, probe) of ``path`` in this process, opened on first use; None: the file cannot be used. Under
        :attr:`_lock`. Once a second, while nothing of this process holds it, the file is looked at again: one
        deleted or replaced meanwhile (a clean-up of the folder) is made and opened again, so that every process,
        a part restarted since included, keeps locking the same file."""
        entry = self._files.get(path, ())
        now = time.monotonic()
        if entry is None:
            if now < self._retry.get(path, 0.0):
                self._files.move_to_end(path)
                return None
            entry = ()  # (tried again a minute later: the folder may be writable again)
        if entry and entry[0] == os.getpid() and now >= self._checked.get(path, 0.0) \
                and not self._counts.get(path) and not self._using.get(path):
            self._checked[path] = now + 1.0
            if not _same_file(entry[1], _receipts_name(path)):
                self._close(entry)
                entry = ()
        if not entry or entry[0] != os.getpid():  # (a forked child shares its parent's descriptions: its own)
            said = probe = -1
            name = _receipts_name(path)
            try:
                said = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                probe = os.open(name, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if said >= 0:
                    os.close(said)
                (log.debug if path in self._warned else log.warning)(
                    "%s cannot be used (%s): MLLP receipts are not put before the queue readers' recordings "
                    "(tried again each minute)", name, exc.strerror or exc)
                self._warned.add(path)
                self._files[path] = None
                self._retry[path] = now + 60.0
                self._forget()
                return None
            self._files[path] = entry = (os.getpid(), said, probe)
            self._counts[path] = self._using[path] = 0
            self._checked[path] = now + 1.0
            self._forget()
        self._files.move_to_end(path)
        return entry[1], entry[2]

    @staticmethod
    def _close(entry: tuple[int, int, int]) -> None:
        if entry[0] == os.getpid():
            for fd in entry[1:]:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _forget(self) -> None:
        """Close the descriptors of the least lately used files past :attr:`kept` that nothing uses now."""
        for path in list(self._files)[:-self.kept]:
            if self._counts.get(path, 0) or self._using.get(path, 0):
                continue
            entry = self._files.pop(path)
            self._counts.pop(path, None)
            self._using.pop(path, None)
            for kept in (self._retry, self._outwaited, self._checked, self._stuck_until, self._stuck_said):
                kept.pop(path, None)
            self._warned.discard(path)
            if entry is not None:
                self._close(entry)

    def announce(self, path: str | None) -> bool:
        """A short transaction on ``path`` begins to wait for the write lock; True: :meth:`done` must follow."""
        if path is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now < self._stuck_until.get(path, 0.0):
                return False
            fds = self._fds(path)
            if fds is None:
                return False
            if self._counts[path] == 0 and not _flock_soon(fds[0], fcntl.LOCK_SH):
                # a process holds the file exclusively for longer than a long transaction's try takes (stopped
                # there, or another program): for a second no short one is said, only not first
                self._stuck_until[path] = now + 1.0
                if now - self._stuck_said.get(path, -60.0) >= 60.0:
                    self._stuck_said[path] = now
                    log.warning("%s-receipts is held by another process (stopped, or not the gateway's): MLLP "
                                "receipts are not put before the queue readers' recordings meanwhile", path)
                return False
            self._counts[path] += 1
            return True

    def done(self, path: str | None) -> None:
        """The short transaction :meth:`announce` said has ended (committed or not)."""
        with self._lock:
            entry = self._files.get(path or "")
            if not entry or entry[0] != os.getpid() or path is None or self._counts.get(path, 0) <= 0:
                return
            self._counts[path] -= 1
            if self._counts[path] == 0:
                with contextlib.suppress(OSError):
                    fcntl.flock(entry[1], fcntl.LOCK_UN)

    def give_way(self, path: str | None) -> None:
        """Before a long transaction on ``path`` asks for the write lock: wait while a short one is said, for at
        most :attr:`patience`."""
        if path is None:
            return
        with self._lock:
            fds = self._fds(path)
            if fds is None:
                return
            self._using[path] += 1
        # after a wait that ran out of patience (receipts one after the other), a quarter of it: the recordings
        # still go on at a pace, and the receipts keep most of their start
        patience = self.patience / 4 if self._outwaited.get(path) else self.patience
        outwaited = False
        try:
            deadline = time.monotonic() + patience
            while True:
                try:
                    fcntl.flock(fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        outwaited = True
                        return
                    time.sleep(0.0002)
                    continue
                except OSError:
                    return
                with contextlib.suppress(OSError):
                    fcntl.flock(fds[1], fcntl.LOCK_UN)
                return
        finally:
            with self._lock:
                self._using[path] -= 1
                self._outwaited[path] = outwaited


def _receipts_name(path: str) -> str:
    """The lock file of the database at ``path``: beside the file itself, however it is named (a link), so that
    every process orders its writes on one file. Worked out only when the file is opened or looked at again (a
    path's every component is looked up: not on each transaction)."""
    return f"{os.path.realpath(path)}-receipts"


def _same_file(fd: int, name: str) -> bool:
    """Whether the open file ``fd`` is still the one named ``name``."""
    try:
        held, there = os.fstat(fd), os.stat(name)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _flock_soon(fd: int, kind: int) -> bool:
    """``flock(fd, kind)`` if it can be had within a few milliseconds (another process holding the file this instant
    may be stopped there: never waited for longer)."""
    for _ in range(20):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.0001)
        except OSError:
            return False
    return False


_SHORT_FIRST = _ShortFirst()
os.register_at_fork(after_in_child=_SHORT_FIRST._forked)


def _begin_polling(conn: sqlite3.Connection) -> None:
    timeout_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    deadline = time.monotonic() + timeout_ms / 1000
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.0005)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")


class WalCheckpointer(threading.Thread):
    """Copies the WAL back into the database every ``interval`` seconds, beside the writers.

    A ``PASSIVE`` checkpoint never blocks a writer or a reader: it copies what
    no reader still needs and leaves the rest for the next round. Each round is
    :func:`_checkpoint_once` (a connection opened for it, as the writers'
    checkpoint threads do), in a thread of its own; it also copies back what a
    writer that died left in the WAL while nothing else commits. :meth:`stop`
    ends it after a last checkpoint.
    """

    def __init__(self, path: str | Path | None, interval: float = 1.0) -> None:
        """``path`` None (a PostgreSQL database, which checkpoints by itself): the thread does nothing."""
        super().__init__(name="wal-checkpoint", daemon=True)
        self.path, self.interval = (str(Path(path).absolute()) if path is not None else None), interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        if self.path is None:
            return
        while not self._stop_event.wait(self.interval):
            _checkpoint_once(self.path)  # (a database not created yet is left for the next round)
        _checkpoint_once(self.path)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


# --------------------------------------------------------------------------- borrowed connections

#: A kept PostgreSQL connection idle for longer than this (seconds) answers ``SELECT 1`` before it is lent again
#: (a firewall may have dropped it without a word); a younger one only has its socket looked at.
IDLE_CHECK_SECONDS = 30.0
#: Databases a thread keeps a connection to (the one used least recently beyond this is closed).
KEPT_PER_THREAD = 4
#: Pause before the one retry of a connect that failed (a server restarting, a fail-over).
_RETRY_PAUSE = 0.2


class _Shelf:
    """One thread's kept PostgreSQL connections, per database (the thread-local part of :func:`borrowed`).

    Made in the process that uses it: after a fork the child makes its own and
    never touches (nor closes: that would end the parent's session) what it inherited.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.idle: OrderedDict[str, tuple[Database, float]] = OrderedDict()
        self.lent: set[str] = set()
        self.lock = threading.Lock()  # against close_borrowed() from another thread

    def take(self, key: str) -> Database | None:
        with self.lock:
            kept = self.idle.pop(key, None)
        if kept is None:
            return None
        db, since = kept
        if _usable(db, time.monotonic() - since):
            return db
        log.info("database connection to %s was closed or broken while idle: opening another", describe(key))
        _close_quietly(db)
        return None

    def put(self, key: str, db: Database) -> None:
        with self.lock:
            self.idle[key] = (db, time.monotonic())
            self.idle.move_to_end(key)
            evicted = [self.idle.popitem(last=False)[1][0] for _ in range(len(self.idle) - KEPT_PER_THREAD)]
        for old in evicted:
            _close_quietly(old)

    def close(self) -> None:
        """Close the idle connections (in the process that opened them only)."""
        if self.pid != os.getpid():
            return
        with self.lock:
            idle = [db for db, _ in self.idle.values()]
            self.idle.clear()
        for db in idle:
            _close_quietly(db)

    def __del__(self) -> None:  # the thread ended: its connections end with it
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


_local = threading.local()
_shelves: "weakref.WeakSet[_Shelf]" = weakref.WeakSet()
_shelves_lock = threading.Lock()


def _shelf() -> _Shelf:
    shelf: _Shelf | None = getattr(_local, "shelf", None)
    if shelf is None or shelf.pid != os.getpid():
        shelf = _Shelf()  # a new thread, or the first borrow in a forked child
        _local.shelf = shelf
        with _shelves_lock:
            _shelves.add(shelf)
    return shelf


def _close_quietly(db: Database) -> None:
    try:
        db.close() if hasattr(db, "close") else db.conn.close()
    except Exception as exc:  # a connection already gone: nothing to close
        log.debug("closing a database connection: %s", exc)


def _readable(fd: int) -> bool:
    """Whether the socket has something to read now (an idle connection must not: the server said goodbye)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


def _usable(db: Database, idle_for: float) -> bool:
    """A kept PostgreSQL connection may be lent again: open, idle, and the server still on the other end."""
    import psycopg

    raw = db.conn.raw
    if raw.closed or raw.broken or raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False
    try:
        suspect = idle_for > IDLE_CHECK_SECONDS or _readable(raw.pgconn.socket)
        if suspect:
            raw.execute("SELECT 1").fetchone()
    except Exception as exc:  # terminated, restarted, timed out: replaced, never reported to the caller
        log.debug("kept database connection is gone: %s", exc)
        return False
    return True


def _open(locator: str) -> Database:
    """A new connection for :func:`borrowed`: one retry when the server cannot be reached."""
    try:
        return connect(locator)
    except DatabaseUnavailable as exc:
        from gateway.logs import database_fault

        database_fault(log, "connect", "%s; trying once more", exc)
        time.sleep(_RETRY_PAUSE)
        return connect(locator)


def _clean(db: Database) -> bool:
    """Leave ``db`` with no transaction open; False when it cannot be lent again (closed, broken, unknown state)."""
    if dialect(db) != "postgresql":
        try:
            if db.conn.in_transaction:
                log.warning("a database transaction was left open by a request: rolled back")
                db.conn.execute("ROLLBACK")
        except sqlite3.Error as exc:  # closing the connection rolls back all the same
            log.info("rolling back a left-open transaction failed (%s)", exc)
            return False
        return True
    import psycopg

    status = psycopg.pq.TransactionStatus
    raw = db.conn.raw
    if raw.closed or raw.broken:
        return False
    state = raw.info.transaction_status
    if state in (status.INTRANS, status.INERROR):
        log.warning("a database transaction was left open by a request (%s): rolled back", state.name)
        try:
            raw.execute("ROLLBACK")
        except Exception as exc:
            log.info("rolling back a left-open transaction failed (%s): connection dropped", exc)
            return False
        state = raw.info.transaction_status
    return bool(state == status.IDLE)


@contextmanager
def borrowed(locator: str | Path) -> Iterator[Database]:
    """A connection to the gateway database for one request of this thread: ``with borrowed(locator) as db:``.

    PostgreSQL: the thread's kept connection to that database (opened on first
    use, and again when the server closed it while idle: one retry of the
    connect, never of the caller's work), given back with any transaction the
    caller left open rolled back and logged; one in a failed or unknown state
    is closed instead and the next borrow opens another. The schema checks
    made once per connection (:func:`gateway.store.schema.once`) are kept with
    it, and are lost with it. A borrow inside another of the same thread and
    database gets a connection of its own, closed after, as before.

    SQLite: a connection opened for the borrow and closed after it, exactly as
    before (cheap, and a file replaced by a restore is never read through a
    connection to the old one).
    """
    if not is_postgresql(locator):
        db = connect(locator)
        try:
            yield db
        finally:
            try:
                _clean(db)
            finally:
                db.conn.close()
        return
    key = str(locator)
    shelf = _shelf()
    if key in shelf.lent:  # nested: a connection of its own, as a separate connect() would have given
        db = _open(key)
        try:
            yield db
        finally:
            _clean(db)
            _close_quietly(db)
        return
    db = shelf.take(key) or _open(key)
    shelf.lent.add(key)
    try:
        yield db
    finally:
        shelf.lent.discard(key)
        if _clean(db):
            shelf.put(key, db)
        else:
            log.info("database connection to %s dropped after a request: the next one opens another",
                     describe(key))
            _close_quietly(db)


def close_borrowed() -> None:
    """Close the idle kept connections of every thread of this process (at shut-down, or between tests)."""
    with _shelves_lock:
        shelves = list(_shelves)
    for shelf in shelves:
        shelf.close()
