"""PostgreSQL behind the same small surface as the SQLite connection (psycopg 3).

The gateway's storage code talks to one interface: ``db.execute(sql, params)``
returning a cursor, ``db.query`` returning dicts, ``db.conn.in_transaction``
and the :func:`gateway.store.db.transaction` / :func:`~gateway.store.db.savepoint`
context managers. :class:`PgDatabase` gives that interface over a psycopg 3
connection in autocommit mode, so that a statement outside ``transaction()``
commits on its own, as with SQLite's ``isolation_level=None``.

SQL is written once, with ``?`` placeholders, in the subset both engines
speak (``INSERT ... ON CONFLICT``, ``RETURNING``, ``coalesce``...); what differs
is chosen by :func:`gateway.store.db.dialect`. The placeholders are turned into
psycopg's ``%s`` here, once per statement text.

Writers are serialised per gateway, as SQLite's ``BEGIN IMMEDIATE`` does, by a
transaction-scoped advisory lock (:data:`WRITE_LOCK`) taken at ``BEGIN``: the
storage code keeps its reasoning ("nobody else writes between my read and my
write") on both engines, and the audit chain stays one chain however many
nodes append to it. Readers never wait for it.

A node that stops while it holds the lock (frozen, cut off) has its transaction
ended by the server after :data:`IDLE_IN_TRANSACTION_S`: the server starts that
clock only when it says it is ready for the next statement, so a pipeline here
never ends with a flush request after its last sync (:func:`_end_on_sync`), which
would leave the session idle in its transaction without the clock. A writer whose
wait for the lock times out ends a holder that has waited on its client for longer
than that all the same (:meth:`PgConnection.begin`; no server timeout ends one
stopped mid-pipeline), and ``/health`` says when writes wait for a holder
(:func:`write_lock_holder`).
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.errors import ConfigError, DatabaseUnavailable

__all__ = ["PgDatabase", "connect", "is_url", "translate", "WRITE_LOCK", "redact", "write_lock_holder",
           "note_write_failure", "write_failure", "disk_full", "storage_fault"]

log = logging.getLogger(__name__)

#: Key of the advisory lock a writing transaction holds (per database and schema).
WRITE_LOCK = "hashtextextended('cyhr-gateway-write:' || current_schema(), 0)"

_SCHEMES = ("postgresql://", "postgres://")
#: How long a writer waits for the write lock (SQLite's busy timeout is the same).
LOCK_TIMEOUT_S = 30
#: A transaction whose client sends nothing for this long is ended by the server (and its lock freed).
IDLE_IN_TRANSACTION_S = 120
#: The holder of the write lock, and how long it has held it, in the SQL of :func:`write_lock_holder` (an advisory
#: lock on a bigint key is listed in ``pg_locks`` as its high and low 32 bits, ``objsubid`` 1).
_HOLDER = (f"WITH k AS (SELECT {WRITE_LOCK} AS key, (SELECT oid FROM pg_database WHERE datname = current_database())"
           " AS db), lock AS (SELECT l.pid, l.granted FROM k, pg_locks l WHERE l.locktype = 'advisory'"
           " AND l.objsubid = 1 AND l.database = k.db AND l.classid = ((k.key >> 32) & 4294967295)::oid"
           " AND l.objid = (k.key & 4294967295)::oid)"
           " SELECT a.pid, a.application_name, a.state, extract(epoch FROM now() - a.xact_start),"
           " extract(epoch FROM now() - a.state_change), host(a.client_addr), a.client_port, a.wait_event,"
           " (SELECT count(*) FROM lock WHERE NOT lock.granted)"
           " FROM lock JOIN pg_stat_activity a ON a.pid = lock.pid WHERE lock.granted")
#: The last write the database refused for want of space or an I/O error, in this process: (its first line, when,
#: as ``time.time()``); None once a later transaction committed. Read by ``/health``.
_write_failure: tuple[str, float] | None = None
#: What ``?`` and ``%`` mean nothing inside: quoted strings and names, comments, dollar-quoted bodies.
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*[\s\S]*?\*/|\$(\w*)\$[\s\S]*?\$\1\$|\?|%")
_translated: dict[str, str] = {}
_binary_translated: dict[str, str] = {}


def is_url(locator: object) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) connection URL."""
    return isinstance(locator, str) and locator.startswith(_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password (``user:pw@`` or a ``password=`` parameter), for messages, logs and audit."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = parts.query
    if query:
        query = "&".join(f"{k}=***" if k.lower() in _SECRET_PARAMETERS else (f"{k}={v}" if v or "=" in pair else k)
                         for pair in query.split("&") for k, _, v in [pair.partition("=")])
    return parts._replace(netloc=netloc, query=query).geturl()


#: libpq parameters that carry a secret: never shown.
_SECRET_PARAMETERS = frozenset({"password", "sslpassword", "passfile"})
#: Where libpq names the server it could not reach ("connection to server at "10.0.0.5", port 5432 failed: ").
_SERVER_NAMED = re.compile(r'(?:connection failed: )?connection to server (?:at "[^"]*"(?:, port \d+)?|on socket '
                           r'"[^"]*") failed: ')
#: PostgreSQL cannot hold U+0000 in text; it is stored as U+FFFD (the raw input, kept as bytes, keeps it).
_NUL, _NUL_STAND_IN = "\x00", "\ufffd"


def _storable(params: Any) -> Any:
    """``params`` with U+0000 in any text replaced (a copy only when there is one)."""
    if isinstance(params, dict):
        if any(type(v) is str and _NUL in v for v in params.values()):
            return {k: v.replace(_NUL, _NUL_STAND_IN) if type(v) is str else v for k, v in params.items()}
        return params
    if any(type(v) is str and _NUL in v for v in params):
        return [v.replace(_NUL, _NUL_STAND_IN) if type(v) is str else v for v in params]
    if any(type(v) is list for v in params):  # arrays of column values (one statement for many rows)
        return [_storable(v) if type(v) is list else v for v in params]
    return params


def translate(sql: str) -> str:
    """``?`` placeholders outside quotes and comments to psycopg's ``%s``, and every literal ``%`` to ``%%``."""
    done = _translated.get(sql)
    if done is None:
        def swap(m: re.Match[str]) -> str:  # psycopg reads % even inside quotes: every literal % is doubled
            token = m.group(0)
            return "%s" if token == "?" else token.replace("%", "%%")
        done = _TOKEN.sub(swap, sql)
        if len(_translated) < 10_000:
            _translated[sql] = done
    return done


class PgCursor:
    """The part of ``sqlite3.Cursor`` the storage code uses."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def fetchone(self) -> Any:
        return self._cursor.fetchone() if self._cursor.description is not None else None

    def fetchall(self) -> list[Any]:
        return list(self._cursor.fetchall()) if self._cursor.description is not None else []

    def fetchmany(self, size: int = 1) -> list[Any]:
        return list(self._cursor.fetchmany(size)) if self._cursor.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        if self._cursor.description is None:
            return iter(())
        return iter(self._cursor)

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def lastrowid(self) -> Any:
        raise AttributeError("lastrowid is SQLite's: write INSERT ... RETURNING id")

    def close(self) -> None:
        self._cursor.close()


class PgConnection:
    """The part of ``sqlite3.Connection`` the storage code uses, over a psycopg connection."""

    dialect = "postgresql"

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        #: Transactions begun on this connection (:meth:`begin`): tells whether one is still the one a fact
        #: was learnt in (a table created inside a transaction that may yet roll back).
        self.begun = 0

    @property
    def in_transaction(self) -> bool:
        import psycopg

        return bool(self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> PgCursor:
        cursor = self.raw.cursor()
        try:
            if params is None or (not params and not isinstance(params, dict)):
                cursor.execute(sql, None)  # no parameters: psycopg sends the text as it is
            else:
                cursor.execute(translate(sql), _storable(params))
        except Exception as exc:
            self._failed(exc)
            raise
        if _write_failure is not None:  # (only while a refused write is on record: nothing to do otherwise)
            if sql == "COMMIT":
                if getattr(self, "_wrote", False):  # a write went through again (an empty commit proves nothing)
                    write_succeeded()
                self._wrote = False
            elif (cursor.rowcount or 0) > 0 and not sql.lstrip()[:6].upper().startswith("SELECT"):
                self._wrote = True
        return PgCursor(cursor)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> PgCursor:
        cursor = self.raw.cursor()
        try:
            cursor.executemany(translate(sql), [_storable(row) for row in rows])
        except Exception as exc:
            self._failed(exc)
            raise
        return PgCursor(cursor)

    def _failed(self, exc: BaseException) -> None:
        """What a statement's failure tells of the connection: a write refused for want of space is noted for
        ``/health`` (:func:`note_write_failure`); a prepared statement the server does not know (psycopg's list of
        them out of step with the server's) is a connection that would fail every statement of that text: it is
        closed, and an ``OperationalError`` raised instead, answered as while the database is away (503, no ACK)
        and the connection replaced (:func:`gateway.store.db.connection_lost`)."""
        import psycopg

        if isinstance(exc, psycopg.errors.InvalidSqlStatementName):
            log.warning("database connection out of step with the server's prepared statements (%s): closed, "
                        "another is opened", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            try:
                self.raw.close()
            except Exception:  # noqa: BLE001 - closing is all that is left to do
                pass
            raise psycopg.OperationalError(f"the database connection was out of step with the server ({exc}); it "
                                           "was closed") from exc
        note_write_failure(exc)

    def execute_arrays(self, sql: str, params: Sequence[Any]) -> PgCursor:
        """:meth:`execute` with every parameter sent in binary: for arrays of many values (the rows of one
        statement, ``unnest(CAST(? AS text[]), ...)``), which psycopg would otherwise escape one by one as text."""
        binary = _binary_translated.get(sql)
        if binary is None:
            binary = _TOKEN.sub(lambda m: "%b" if m.group(0) == "?" else m.group(0).replace("%", "%%"), sql)
            if len(_binary_translated) < 1_000:
                _binary_translated[sql] = binary
        cursor = self.raw.cursor()
        try:
            cursor.execute(binary, _storable(params))
        except Exception as exc:
            self._failed(exc)
            raise
        return PgCursor(cursor)

    def executescript(self, script: str) -> None:
        """Several statements, no parameters (a schema file)."""
        self.raw.execute(script.encode("utf-8"))

    def begin(self) -> None:
        """``BEGIN`` and the write lock (see the module's description), sent together (one round trip).

        A wait for the lock that times out looks at its holder: one that has waited on its client (idle in its
        transaction, or in the middle of a pipeline) for longer than :data:`IDLE_IN_TRANSACTION_S` is a client
        that stopped, and is ended (a WARNING names it) before the lock is asked for once more."""
        self.begun += 1
        try:
            self._lock()
        except Exception as exc:
            import psycopg

            if not isinstance(exc, psycopg.errors.LockNotAvailable) or not self._end_stopped_holder():
                raise
            self._lock()

    def _lock(self) -> None:
        try:
            self.raw.execute(f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")
        except BaseException:  # the lock not had (lock_timeout, an interrupt): no failed transaction is left open
            if not (self.raw.closed or self.raw.broken) and self.in_transaction:
                self.raw.execute("ROLLBACK")
            raise

    def _end_stopped_holder(self) -> bool:
        """End the write lock's holder when it has waited on its client for longer than :data:`IDLE_IN_TRANSACTION_S`
        (idle in its transaction, or in the middle of a pipeline: ``active`` waiting for the client's next message,
        which no server timeout ends); True when one was ended (or the lock was let go meanwhile)."""
        try:
            holder = self.raw.execute(_HOLDER).fetchone()
        except Exception as exc:  # noqa: BLE001 - the connection failed too: the timeout is the news
            log.debug("the write lock's holder could not be looked up: %s", exc)
            return False
        if holder is None:
            return True  # let go meanwhile: worth asking again
        pid, application, state, held, idle, host, port, event, _ = holder
        if not _stopped(state, event) or float(idle or 0) <= IDLE_IN_TRANSACTION_S:
            return False
        try:
            ended = bool(self.raw.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0])
        except Exception as exc:  # noqa: BLE001 - not permitted (another role): the timeout stands
            log.warning("the database's write lock is held by %s (server pid %s, client %s:%s), waiting on its "
                        "client (%s) for %.0f s; it could not be ended: %s", application, pid, host, port, state,
                        float(idle), exc)
            return False
        log.warning("the database's write lock was held by %s (server pid %s, client %s:%s), waiting on its client "
                    "(%s) for %.0f s, held %.0f s: its session was ended so that writes go on (a client stopped while "
                    "writing)", application, pid, host, port, state, float(idle), float(held or 0))
        return ended

    @contextmanager
    def pipeline(self) -> Iterator[Any]:
        """Statements sent one after the other without waiting for each answer (psycopg's pipeline mode).

        Inside, :meth:`execute` only queues a statement: call ``sync()`` on what
        this yields before reading a result, and read no result from code that
        does not know it runs inside. An error of any queued statement is raised
        at the next ``sync()`` or when the block ends (the transaction is then
        failed, as it would have been by the statement run alone).
        """
        try:
            with self.raw.pipeline() as pipe:
                _end_on_sync(pipe)
                yield pipe
        except Exception as exc:
            import psycopg

            # A statement prepared in the part of the pipeline the server skipped after an error is listed by
            # psycopg as prepared all the same (psycopg 3.3): its list is dropped, the server's with it (DEALLOCATE
            # ALL at the next statement, once the transaction is rolled back), so that no statement is later sent
            # under a name the server never made.
            prepared = getattr(self.raw, "_prepared", None)
            if isinstance(exc, psycopg.Error) and prepared is not None and hasattr(prepared, "clear"):
                prepared.clear()
            self._failed(exc)
            raise

    def close(self) -> None:
        self.raw.close()


def _stopped(state: str | None, wait_event: str | None) -> bool:
    """A session waiting on its client inside a transaction: idle in it, or in the middle of a pipeline."""
    return (state or "").startswith("idle in transaction") or (state == "active" and wait_event == "ClientRead")


def _end_on_sync(pipe: Any) -> None:
    """Make psycopg's pipeline end with its sync and no flush request after it.

    psycopg (3.3) ends a pipeline by sending a sync and then a flush request. The
    server starts ``idle_in_transaction_session_timeout`` when it answers the sync
    (ReadyForQuery) and stops it at the next message, the flush, which it does not
    start again: a client stopped after such a pipeline, inside a transaction,
    holds the write lock for ever. The sync alone sends everything (libpq flushes
    it), so the answers are read without the flush request. Left as psycopg has it
    when its pipeline is not built as this expects."""
    if not all(hasattr(pipe, name) for name in ("_enqueue_sync", "_communicate_gen", "_fetch_gen", "_exit_gen")):
        return

    def exit_gen() -> Any:
        try:
            pipe._enqueue_sync()
            yield from pipe._communicate_gen()
        finally:
            yield from pipe._fetch_gen(flush=False)

    pipe._exit_gen = exit_gen


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing a write for want of space (PostgreSQL's ``disk_full``, "No space
    left on device"; SQLite's ``SQLITE_FULL``)."""
    if getattr(exc, "sqlstate", None) == "53100":
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == 13:  # SQLITE_FULL
        return True
    return "No space left on device" in str(exc)


def storage_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the database's storage refusing a write — a full disk or an I/O error (PostgreSQL's
    classes 53 and 58, SQLite's ``SQLITE_FULL`` and ``SQLITE_IOERR``), on either engine — rather than a fault of
    the statement: no other row of the transaction can be written either."""
    state = getattr(exc, "sqlstate", None) or ""
    code = getattr(exc, "sqlite_errorcode", None)
    return disk_full(exc) or state.startswith(("53", "58")) or (
        isinstance(code, int) and code & 0xFF == 10)  # SQLITE_IOERR


def note_write_failure(exc: BaseException) -> None:
    """Keep ``exc`` as the last write the database refused (for ``/health``) when it is a storage fault
    (:func:`storage_fault`); anything else is not kept."""
    global _write_failure
    if not storage_fault(exc):
        return
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    _write_failure = (line[:297] + "..." if len(line) > 300 else line, time.time())


def write_succeeded() -> None:
    """A transaction committed: the last refused write (:func:`note_write_failure`) is no longer news."""
    global _write_failure
    _write_failure = None


def write_failure() -> tuple[str, float] | None:
    """The last write the database refused in this process for want of space or an I/O error, and when (as
    ``time.time()``); None when none was, or a transaction committed since."""
    return _write_failure


def write_lock_holder(db: Any) -> dict[str, Any] | None:
    """Who holds the write lock now: ``pid`` (the server's process), ``application`` (its ``application_name``),
    ``state`` (``active``, ``idle in transaction``...), ``held`` (seconds since its transaction began), ``idle``
    (seconds in that state), ``waiting`` (how many sessions wait for the lock), ``on_client`` (it waits on its
    client, not on the server's work); None when nobody holds it."""
    row = db.conn.raw.execute(_HOLDER).fetchone()
    if row is None:
        return None
    return {"pid": row[0], "application": row[1], "state": row[2], "held": float(row[3] or 0),
            "idle": float(row[4] or 0), "waiting": int(row[8]), "on_client": _stopped(row[2], row[7])}


class PgDatabase:
    """A gateway database on PostgreSQL: ``execute``, ``executescript``, ``query`` and ``conn``."""

    dialect = "postgresql"

    def __init__(self, conn: PgConnection, url: str) -> None:
        self.conn = conn
        self.url = url

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> PgCursor:
        return self.conn.execute(sql, params)

    def executescript(self, script: str) -> None:
        self.conn.executescript(script)

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        cursor = self.conn.execute(sql, params)
        names = [d.name for d in cursor.description or ()]
        for row in cursor:
            yield dict(zip(names, row))

    def close(self) -> None:
        self.conn.close()


def connect(url: str, *, readonly: bool = False, application: str = "cyhr-gateway") -> PgDatabase:
    """Open a connection to the PostgreSQL database at ``url`` (autocommit, UTC, the write lock's time limits).

    A ``schema`` query parameter (``postgresql://.../db?schema=member_a``) puts
    the gateway's tables in that schema (created when missing), so that several
    gateways can share one database.
    """
    try:
        import psycopg
    except ImportError:  # the embedded default needs nothing; PostgreSQL needs the driver
        raise ConfigError("database is a postgresql:// URL but psycopg is not installed: "
                          "pip install 'cyhr-gateway[postgresql]'", "database") from None
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))  # libpq parameters, decoded once
    schema = params.pop("schema", "")
    if schema and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ConfigError(f"the database URL's schema {schema!r} must be lower-case letters, digits and _ "
                          "(at most 63, not starting with a digit)", "database")
    params.setdefault("application_name", application)
    params.setdefault("connect_timeout", "10")
    try:  # the parameters go as keywords, never pasted back into a string that libpq would read again
        conninfo = psycopg.conninfo.make_conninfo(parts._replace(query="").geturl(), **params)
        raw = psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = "; ".join(lines[-2:]) if lines else "no reason given"
        unavailable = DatabaseUnavailable(f"cannot connect to the PostgreSQL database {redact(url)}: {reason}",
                                          "database")
        # the server's words alone, for what anyone may read (/health): not which host, port or socket it is
        unavailable.reason = _SERVER_NAMED.sub("", reason)
        raise unavailable from None
    except psycopg.ProgrammingError as exc:  # a parameter libpq does not know or cannot read
        raise ConfigError(f"the database URL {redact(url)} is not a valid PostgreSQL address: {exc}",
                          "database") from None
    # A writer waits for the write lock at most as long as SQLite's busy timeout, and a node that stops in the
    # middle of a transaction (frozen, cut off) has it ended by the server, which frees the lock for the others.
    raw.execute(f"SET TIME ZONE 'UTC'; SET lock_timeout = '{LOCK_TIMEOUT_S}s';"
                f" SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'")
    if schema:
        from psycopg import sql as _sql

        name = _sql.Identifier(schema)
        if raw.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None:
            if readonly:
                raw.close()
                raise ConfigError(f"the database {redact(url)} has no schema {schema!r} (gateway db upgrade "
                                  "creates it)", "database")
            try:
                raw.execute(_sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name))
            except psycopg.errors.UniqueViolation:  # another node created it at the same moment
                pass
        raw.execute(_sql.SQL("SET search_path TO {}").format(name))
    if readonly:
        raw.execute("SET default_transaction_read_only = on")
    return PgDatabase(PgConnection(raw), url)
