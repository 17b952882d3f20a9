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
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.errors import DatabaseUnavailable

__all__ = ["PgDatabase", "connect", "is_url", "translate", "WRITE_LOCK", "redact"]

#: Key of the advisory lock a writing transaction holds (per database and schema).
WRITE_LOCK = "hashtextextended('cyhr-gateway-write:' || current_schema(), 0)"

_SCHEMES = ("postgresql://", "postgres://")
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?|%")
_translated: dict[str, str] = {}


def is_url(locator: object) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) connection URL."""
    return isinstance(locator, str) and locator.startswith(_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


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

    @property
    def in_transaction(self) -> bool:
        import psycopg

        return bool(self.raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> PgCursor:
        cursor = self.raw.cursor()
        if params is None or (not params and not isinstance(params, dict)):
            cursor.execute(sql, None)  # no parameters: psycopg sends the text as it is
        else:
            cursor.execute(translate(sql), params)
        return PgCursor(cursor)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> PgCursor:
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), list(rows))
        return PgCursor(cursor)

    def executescript(self, script: str) -> None:
        """Several statements, no parameters (a schema file)."""
        self.raw.execute(script.encode("utf-8"))

    def begin(self) -> None:
        """``BEGIN`` and the write lock (see the module's description)."""
        self.raw.execute("BEGIN")
        self.raw.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")

    def close(self) -> None:
        self.raw.close()


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
    """Open a connection to the PostgreSQL database at ``url`` (autocommit; UTC; no prepared-statement surprises).

    A ``schema`` query parameter (``postgresql://.../db?schema=member_a``) puts
    the gateway's tables in that schema (created when missing), so that several
    gateways can share one database.
    """
    try:
        import psycopg
    except ImportError as exc:  # the embedded default needs nothing; PostgreSQL needs the driver
        raise RuntimeError("database is a postgresql:// URL but psycopg is not installed: "
                           "pip install 'cyhr-gateway[postgresql]'") from exc
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", "")
    if schema and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise ValueError(f"database URL: schema {schema!r} must be lower-case letters, digits and _")
    plain = parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()
    try:
        raw = psycopg.connect(plain, autocommit=True, application_name=application, connect_timeout=10)
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip().splitlines() or ["no reason given"])[-1]
        raise DatabaseUnavailable(f"cannot connect to the PostgreSQL database {redact(url)}: {reason}",
                                  "database") from None
    raw.execute("SET TIME ZONE 'UTC'")
    if schema:
        if raw.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None:
            try:
                raw.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            except psycopg.errors.UniqueViolation:  # another node created it at the same moment
                pass
        raw.execute(f"SET search_path TO {schema}")
    if readonly:
        raw.execute("SET default_transaction_read_only = on")
    return PgDatabase(PgConnection(raw), url)
