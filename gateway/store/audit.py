"""Audit log storage: the hash chain, its search index and the signed checkpoints, on SQLite and PostgreSQL.

Every statement :mod:`gateway.audit` needs lives here, behind :class:`AuditPort`
(the operations) and :class:`AuditStore` (its one implementation, which speaks
the SQL both engines share and branches on :func:`~gateway.store.db.dialect`
only where they differ). The tables and their guards are in
``sql/<engine>/audit.sql``:

- ``audit_log``: one row per entry, ``seq`` 1, 2, 3... without gaps; a BEFORE
  INSERT trigger refuses an entry that does not follow the last one (its
  ``seq`` and ``prev_hash``), and triggers refuse every UPDATE and DELETE (and,
  on PostgreSQL, TRUNCATE). The search columns (``kind``, ``t``, ``type_code``...)
  are generated from ``content`` (SQLite: VIRTUAL with ``json_extract``;
  PostgreSQL: STORED from ``content::jsonb``), so they cannot disagree with it.
- ``audit_key``: the many-valued search keys, filled from ``content.k`` by an
  AFTER INSERT trigger, never by the application.
- ``audit_checkpoint``: signed heads, this gateway's and peers', never changed.

**One chain however many gateway nodes append to it** (a design choice):
appends run inside :func:`gateway.store.db.transaction`, which on SQLite is
``BEGIN IMMEDIATE`` and on PostgreSQL takes the per-schema transaction advisory
lock (:data:`gateway.store.postgresql.WRITE_LOCK`). Appends are therefore
serialised: the node that holds the lock reads the log's end and writes the
next entries, and the next node sees them when it gets the lock. The chain
trigger and the primary key refuse anything else, so a writer that bypassed
the lock fails instead of forking the chain.

Verification hashes the stored UTF-8 bytes on both engines (SQLite:
``text_factory = bytes``; PostgreSQL: ``convert_to(content, 'UTF8')``), so the
same entries give the same hashes and the same report; on PostgreSQL the walk
reads one REPEATABLE READ snapshot through server-side cursors (constant memory).
"""

from __future__ import annotations

import re

import contextlib
import itertools
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from gateway.store import schema
from gateway.store.db import Database, describe, dialect, transaction

__all__ = [
    "AuditPort",
    "AuditStore",
    "audit_store",
    "statements",
    "SQLITE_GUARDS",
    "POSTGRESQL_GUARDS",
    "DateFilter",
    "TokenFilter",
    "SearchFilter",
    "CheckpointRow",
    "EntryRow",
]

#: The triggers that make the log append-only, as SQLite holds them.
SQLITE_GUARDS: tuple[str, ...] = (
    "audit_log_chain",
    "audit_log_index",
    "audit_log_no_update",
    "audit_log_no_delete",
    "audit_key_no_update",
    "audit_key_no_delete",
    "audit_checkpoint_no_update",
    "audit_checkpoint_no_delete",
)
#: On PostgreSQL the same, and one refusing TRUNCATE per table (which row triggers do not see).
POSTGRESQL_GUARDS: tuple[str, ...] = SQLITE_GUARDS + (
    "audit_log_no_truncate", "audit_key_no_truncate", "audit_checkpoint_no_truncate")

#: (seq, content, hash, prev_hash) of one entry.
EntryRow = tuple[int, str, bytes, bytes]
#: (id, own, member, count, head, time, jws, received) of one checkpoint.
CheckpointRow = tuple[int, int, str, int, bytes, str, str, "str | None"]

#: The fact, kept on a connection (:func:`gateway.store.schema.learn`), that the audit tables exist.
_FACT = "part:audit"
_CHECKPOINT_COLUMNS = "id, own, member, count, head, time, jws, received"
_LAST = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
_INSERT = "INSERT INTO audit_log (seq, content, prev_hash, hash) VALUES (?, ?, ?, ?)"
_INSERT_MANY = ("INSERT INTO audit_log (seq, content, prev_hash, hash) SELECT * FROM unnest(CAST(? AS bigint[]),"
                " CAST(? AS text[]), CAST(? AS bytea[]), CAST(? AS bytea[])) AS r (seq, content, prev_hash, hash)"
                " ORDER BY seq")
_ENTRY = "SELECT seq, content, hash, prev_hash FROM audit_log"
#: Search parameter -> (system column, code column) of audit_log.
_COLUMNS = {
    "type": ("type_system", "type_code"),
    "subtype": ("subtype_system", "subtype_code"),
    "outcome": (None, "outcome"),
}
#: Rows a PostgreSQL server-side cursor hands over at a time.
_BATCH = 2000


class DateFilter(Protocol):
    """One ``date`` value: a FHIR prefix and the half-open range ``[low, high)`` in ms since 1970 UTC."""

    @property
    def prefix(self) -> str: ...

    @property
    def low(self) -> int: ...

    @property
    def high(self) -> int: ...


class TokenFilter(Protocol):
    """One token value: ``system`` None = any system, ``""`` = no system; ``code`` None = any code."""

    @property
    def system(self) -> str | None: ...

    @property
    def code(self) -> str | None: ...


class SearchFilter(Protocol):
    """What a search selects: AND of OR-lists per parameter (see :class:`gateway.audit.query.Search`)."""

    @property
    def dates(self) -> Sequence[Sequence[DateFilter]]: ...

    @property
    def columns(self) -> Sequence[tuple[str, Sequence[TokenFilter]]]: ...

    @property
    def keys(self) -> Sequence[tuple[str, Sequence[TokenFilter]]]: ...

    @property
    def ids(self) -> Sequence[Sequence[int]]: ...


class AuditPort(Protocol):
    """The audit log's storage operations."""

    guards: tuple[str, ...]

    # -- layout
    def ensure_schema(self) -> None: ...

    def has_log(self) -> bool: ...

    def triggers(self) -> set[str]: ...

    # -- the chain
    def last(self) -> tuple[int, bytes] | None: ...

    def insert(self, rows: Sequence[tuple[int, str, bytes, bytes]]) -> None: ...

    def entry(self, seq: int) -> EntryRow | None: ...

    def entries(self, start: int, stop: int | None) -> Iterator[EntryRow]: ...

    def big_cache(self) -> contextlib.AbstractContextManager[None]: ...

    def address(self) -> str: ...

    # -- verification
    def snapshot(self) -> contextlib.AbstractContextManager[None]: ...

    def chain(self) -> Iterator[tuple[int, bytes, bytes, bytes]]: ...

    def key_groups(self) -> Iterator[tuple[int, bytes]]: ...

    def seq_of_hash(self, digest: bytes) -> int | None: ...

    # -- checkpoints
    def add_checkpoint(self, own: bool, member: str, count: int, head: bytes, time: str, jws: str,
                       received: str | None) -> tuple[CheckpointRow, bool]: ...

    def checkpoints(self, own: bool | None, member: str | None) -> list[CheckpointRow]: ...

    def latest_checkpoint(self) -> CheckpointRow | None: ...

    def other_head_since(self, member: str, count: int, head: bytes) -> str | None: ...

    # -- search and statistics
    def last_seq(self) -> int: ...

    def key_matches(self, param: str, tokens: Sequence[TokenFilter], limit: int) -> int: ...

    def count(self, search: SearchFilter, upto: int | None = None) -> int: ...

    def page(self, search: SearchFilter, *, upto: int, drive: frozenset[int], after: tuple[int, int] | None,
             descending: bool, limit: int) -> list[tuple[int, str, bytes, bytes, int]]: ...

    def facts(self, kind: str, paths: Sequence[str], dates: Sequence[Sequence[DateFilter]]
              ) -> Iterator[tuple[int, list[Any]]]: ...


def statements(db: Database | None = None) -> list[str]:
    """The statements of the SQLite schema file, one by one (``executescript`` would commit the caller's
    transaction). ``db``: only its dialect matters (SQLite)."""
    text = schema.script(db if db is not None else _SQLITE, "audit")
    out: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current.append(line)
        candidate = "\n".join(current)
        if sqlite3.complete_statement(candidate):
            out.append(candidate)
            current = []
    return out


class _Sqlite:
    dialect = "sqlite"


_SQLITE = _Sqlite()


def date_condition(r: DateFilter) -> tuple[str, list[int]]:
    """SQL condition on ``l.t`` for an instant (a point) against a date range, per the FHIR prefix rules."""
    p = r.prefix
    if p == "eq":
        return "(l.t >= ? AND l.t < ?)", [r.low, r.high]
    if p == "ne":
        return "(l.t < ? OR l.t >= ?)", [r.low, r.high]
    if p in ("lt", "eb"):
        return "l.t < ?", [r.low]
    if p == "le":
        return "l.t < ?", [r.high]
    if p in ("gt", "sa"):
        return "l.t >= ?", [r.high]
    return "l.t >= ?", [r.low]  # ge


def _dates(dates: Sequence[Sequence[DateFilter]]) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for ranges in dates:
        parts = [date_condition(r) for r in ranges]
        clauses.append("(" + " OR ".join(p[0] for p in parts) + ")")
        params += [x for p in parts for x in p[1]]
    return clauses, params


def _key_alternatives(param: str, tokens: Sequence[TokenFilter], prefix: str = "") -> tuple[str, list[Any]]:
    alts = []
    params: list[Any] = [param]
    for token in tokens:
        conds = []
        if token.code is not None:
            conds.append(f"{prefix}v = ?")
            params.append(token.code)
        if token.system is not None:
            conds.append(f"{prefix}s = ?")
            params.append(token.system)
        alts.append("(" + (" AND ".join(conds) or "TRUE") + ")")
    return f"{prefix}p = ? AND ({' OR '.join(alts)})", params


def _where(search: SearchFilter, upto: int | None, drive: frozenset[int]) -> tuple[str, list[Any]]:
    """SQL condition on ``audit_log l``; key filters numbered in ``drive`` are written as ``IN`` (selective)."""
    clauses: list[str] = []
    params: list[Any] = []
    if upto is not None:
        clauses.append("l.seq <= ?")
        params.append(upto)
    date_clauses, date_params = _dates(search.dates)
    clauses += date_clauses
    params += date_params
    for name, tokens in search.columns:
        system_col, code_col = _COLUMNS[name]
        alts = []
        for token in tokens:
            conds = []
            if token.code is not None:
                conds.append(f"l.{code_col} = ?")
                params.append(token.code)
            if token.system is not None and system_col is not None:
                conds.append(f"l.{system_col} = ?")
                params.append(token.system)
            alts.append("(" + (" AND ".join(conds) or "TRUE") + ")")
        clauses.append("(" + " OR ".join(alts) + ")")
    for i, (param, tokens) in enumerate(search.keys):
        if i in drive:
            cond, sub = _key_alternatives(param, tokens)
            clauses.append(f"l.seq IN (SELECT seq FROM audit_key WHERE {cond})")
        else:
            cond, sub = _key_alternatives(param, tokens, "k.")
            clauses.append(f"EXISTS (SELECT 1 FROM audit_key k WHERE k.seq = l.seq AND {cond})")
        params += sub
    for ids in search.ids:
        clauses.append(f"l.seq IN ({', '.join('?' * len(ids))})")
        params += list(ids)
    return (" AND ".join(clauses) or "TRUE"), params


def _pg_path(path: str) -> str:
    """A ``$.a.b[0]`` JSON path as a PostgreSQL ``#>`` path literal ``'{a,b,0}'``."""
    parts = path.removeprefix("$").replace("[", ".").replace("]", "").strip(".").split(".")
    if not all(p.replace("_", "").isalnum() for p in parts):
        raise ValueError(f"unsupported JSON path {path!r}")
    return "'{" + ",".join(parts) + "}'"


class AuditStore:
    """:class:`AuditPort` over one gateway database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.pg = dialect(db) == "postgresql"
        self.guards: tuple[str, ...] = POSTGRESQL_GUARDS if self.pg else SQLITE_GUARDS

    # ------------------------------------------------------------------ layout

    def has_log(self) -> bool:
        """True when the database holds an audit log (its table exists)."""
        if self.pg:
            sql = ("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                   " WHERE n.nspname = current_schema() AND c.relname = 'audit_log'")
        else:
            sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log'"
        return self.db.execute(sql).fetchone() is not None

    def ensure_schema(self) -> None:
        """Create the audit tables, indexes and guard triggers in a database that has no audit log yet.

        A database that has one is left as it is: were its guard triggers dropped,
        recreating them here would hide that from verification.
        Safe inside a caller's transaction (it joins it).
        """
        db = self.db
        if schema.known(db, _FACT):
            return
        if self.has_log():
            schema.learn(db, _FACT)
            return
        with transaction(db):
            if self.pg:
                db.executescript(schema.script(db, "audit"))
            else:
                for statement in statements(db):
                    db.execute(statement)
        schema.learn(db, _FACT, made=True)  # inside a caller's transaction: looked at again until it commits

    def triggers(self) -> set[str]:
        """Names of the triggers in force on this database's tables.

        On PostgreSQL a trigger counts only when it fires in every session (enabled ``O`` or ``A``: not
        disabled, not replica-only), its definition is the one the schema file gives, and the function it runs
        has the body the schema file gives: the role that owns the tables could otherwise keep a guard's name
        while making it do nothing.
        """
        if not self.pg:
            sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            return {_text(r[0]) for r in self.db.execute(sql)}
        expected_bodies, expected_triggers = _pg_guard_definitions(schema.script(self.db, "audit"))
        rows = self.db.execute(
            "SELECT t.tgname, pg_get_triggerdef(t.oid), p.proname, p.prosrc FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE n.nspname = current_schema() AND NOT t.tgisinternal AND t.tgenabled IN ('O', 'A')").fetchall()
        present = set()
        for name, definition, function, body in rows:
            wanted = expected_triggers.get(str(name))
            said = re.sub(r"^CREATE TRIGGER \S+ ", "", str(definition))
            said = re.sub(r" ON \S+\.", " ON ", said)
            if wanted is not None and _squeeze(said) != _squeeze(wanted):
                continue
            if str(function) in expected_bodies and _squeeze(str(body)) != _squeeze(expected_bodies[str(function)]):
                continue
            present.add(str(name))
        return present

    # ------------------------------------------------------------------ the chain

    def last(self) -> tuple[int, bytes] | None:
        """(seq, hash) of the last entry; None for an empty log."""
        row = self.db.execute(_LAST).fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def insert(self, rows: Sequence[tuple[int, str, bytes, bytes]]) -> None:
        """Append (seq, content, prev_hash, hash) rows, in order (inside the caller's transaction).

        On PostgreSQL one statement, whatever the number of rows: the rows go in by ``seq`` (the chain
        trigger of each row sees the rows before it).
        """
        if not self.pg:
            self.db.conn.executemany(_INSERT, rows)
        elif len(rows) == 1:
            self.db.execute(_INSERT, list(rows[0]))
        elif rows:
            columns = [[r[0] for r in rows], [r[1] for r in rows], [bytes(r[2]) for r in rows],
                       [bytes(r[3]) for r in rows]]
            self.db.conn.execute_arrays(_INSERT_MANY, columns)

    def entry(self, seq: int) -> EntryRow | None:
        row = self.db.execute(f"{_ENTRY} WHERE seq = ?", [seq]).fetchone()
        return _entry_row(row) if row else None

    def entries(self, start: int, stop: int | None) -> Iterator[EntryRow]:
        """Entries ``start`` to ``stop`` (inclusive; to the end when None), in order."""
        sql = f"{_ENTRY} WHERE seq >= ?"
        params: list[Any] = [start]
        if stop is not None:
            sql += " AND seq <= ?"
            params.append(stop)
        for row in self.db.execute(sql + " ORDER BY seq", params):
            yield _entry_row(row)

    @contextlib.contextmanager
    def big_cache(self) -> Iterator[None]:
        """A large page cache while filling a big log (SQLite; PostgreSQL's is the server's own)."""
        if self.pg:
            yield
            return
        cache = self.db.execute("PRAGMA cache_size").fetchone()[0]
        self.db.execute("PRAGMA cache_size = -262144")  # 256 MiB: the indexes of a big log stay in memory
        try:
            yield
        finally:
            self.db.execute(f"PRAGMA cache_size = {int(cache)}")

    def address(self) -> str:
        """Where the log is, for an audit entry: ``file://`` the database file, or the URL without password."""
        if self.pg:
            return describe(str(getattr(self.db, "url", "postgresql://")))
        row = self.db.conn.execute("PRAGMA database_list").fetchone()
        return f"file://{Path(row[2]).resolve()}" if row and row[2] else "file://:memory:"

    # ------------------------------------------------------------------ verification

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read the log as one consistent state, its text as the stored UTF-8 bytes (for :meth:`chain`)."""
        if self.pg:
            conn = self.db.conn
            if conn.in_transaction:
                yield
                return
            conn.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield
            finally:
                conn.raw.execute("ROLLBACK")
            return
        conn = self.db.conn
        factory = conn.text_factory
        conn.text_factory = bytes  # hash the stored UTF-8 as is, without decoding a million strings
        try:
            yield
        finally:
            conn.text_factory = factory

    def _stream(self, sql: str) -> Iterator[Any]:
        """The rows of ``sql``, streamed: SQLite's cursor itself; on PostgreSQL inside a transaction, a
        server-side cursor (a million entries are not held in memory)."""
        if not self.pg or not self.db.conn.in_transaction:
            return iter(self.db.execute(sql))
        return self._server_side(sql)

    def _server_side(self, sql: str) -> Iterator[Any]:
        cursor = self.db.conn.raw.cursor(name=f"audit_walk_{next(_cursors)}")
        cursor.itersize = _BATCH
        try:
            cursor.execute(sql)
            yield from cursor
        finally:
            cursor.close()

    def chain(self) -> Iterator[tuple[int, bytes, bytes, bytes]]:
        """(seq, content as stored UTF-8, prev_hash, hash) of every entry in order (inside :meth:`snapshot`)."""
        content = "convert_to(content, 'UTF8')" if self.pg else "content"  # SQLite: bytes by the text factory
        return self._stream(f"SELECT seq, {content}, prev_hash, hash FROM audit_log ORDER BY seq")

    def key_groups(self) -> Iterator[tuple[int, bytes]]:
        """Per entry, in order, its index rows as the JSON text the entry's content lists them in (``k``),
        as UTF-8 bytes (inside :meth:`snapshot`)."""
        if self.pg:
            sql = ("SELECT seq, convert_to('[' || string_agg('[' || to_json(p)::text || ',' || to_json(v)::text"
                   " || ',' || to_json(s)::text || ']', ',' ORDER BY p COLLATE \"C\", v COLLATE \"C\","
                   " s COLLATE \"C\") || ']', 'UTF8') FROM audit_key GROUP BY seq ORDER BY seq")
        else:
            sql = ("SELECT seq, '[' || group_concat(json_array(p, v, s), ',') || ']' FROM audit_key"
                   " GROUP BY seq ORDER BY seq")
        return self._stream(sql)

    def seq_of_hash(self, digest: bytes) -> int | None:
        """The entry with this hash (a scan: only asked when the chain is already broken)."""
        row = self.db.execute("SELECT seq FROM audit_log WHERE hash = ? ORDER BY seq LIMIT 1", [digest]).fetchone()
        return int(row[0]) if row else None

    # ------------------------------------------------------------------ checkpoints

    def add_checkpoint(self, own: bool, member: str, count: int, head: bytes, time: str, jws: str,
                       received: str | None) -> tuple[CheckpointRow, bool]:
        """Keep a checkpoint (one already held for the same member, count and head is kept as it is);
        the row held, and whether it was new."""
        if self.pg:  # numbered as SQLite numbers its rows (the largest + 1): no gaps from conflicts or rollbacks
            sql = ("INSERT INTO audit_checkpoint (id, own, member, count, head, time, jws, received)"
                   " SELECT coalesce(max(id), 0) + 1, ?, ?, ?, ?, ?, ?, ? FROM audit_checkpoint"
                   " ON CONFLICT (member, count, head) DO NOTHING")
        else:
            sql = ("INSERT INTO audit_checkpoint (own, member, count, head, time, jws, received)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
        cursor = self.db.execute(sql, [int(own), member, count, head, time, jws, received])
        row = self.db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoint WHERE member = ? AND count = ? AND head = ?",
            [member, count, head],
        ).fetchone()
        return _checkpoint_row(row), cursor.rowcount != 0

    def checkpoints(self, own: bool | None, member: str | None) -> list[CheckpointRow]:
        """Checkpoints held, oldest first: own ones (True), peers' (False) or all (None)."""
        sql, params = f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoint WHERE TRUE", list[Any]()
        if own is not None:
            sql += " AND own = ?"
            params.append(int(own))
        if member is not None:
            sql += " AND member = ?"
            params.append(member)
        return [_checkpoint_row(r) for r in self.db.execute(sql + " ORDER BY count, id", params)]

    def latest_checkpoint(self) -> CheckpointRow | None:
        row = self.db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoint WHERE own = 1 ORDER BY count DESC, id DESC LIMIT 1"
        ).fetchone()
        return _checkpoint_row(row) if row else None

    def other_head_since(self, member: str, count: int, head: bytes) -> str | None:
        """When a checkpoint of ``member`` at ``count`` with another head was made, if one is held."""
        row = self.db.execute(
            "SELECT time FROM audit_checkpoint WHERE member = ? AND count = ? AND head <> ? ORDER BY id LIMIT 1",
            [member, count, head],
        ).fetchone()
        return str(row[0]) if row else None

    # ------------------------------------------------------------------ search and statistics

    def last_seq(self) -> int:
        row = self.db.execute("SELECT max(seq) FROM audit_log").fetchone()
        return int(row[0] or 0)

    def key_matches(self, param: str, tokens: Sequence[TokenFilter], limit: int) -> int:
        """How many index rows a key filter matches, counting no further than ``limit``."""
        cond, params = _key_alternatives(param, tokens)
        row = self.db.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM audit_key WHERE {cond} LIMIT ?) AS m", params + [limit]
        ).fetchone()
        return int(row[0])

    def count(self, search: SearchFilter, upto: int | None = None) -> int:
        """How many entries match (every key filter written as ``IN``), of those up to entry ``upto`` if given."""
        where, params = _where(search, upto, frozenset(range(len(search.keys))))
        return int(self.db.execute(f"SELECT count(*) FROM audit_log l WHERE {where}", params).fetchone()[0])

    def page(self, search: SearchFilter, *, upto: int, drive: frozenset[int], after: tuple[int, int] | None,
             descending: bool, limit: int) -> list[tuple[int, str, bytes, bytes, int]]:
        """(seq, content, hash, prev_hash, t) of up to ``limit`` matching entries up to entry ``upto``, by
        (t, seq), after the position ``after`` (a previous page's last (t, seq))."""
        where, params = _where(search, upto, drive)
        op, order = ("<", "DESC") if descending else (">", "ASC")
        if after is not None:
            where += f" AND (l.t, l.seq) {op} (?, ?)"
            params += [after[0], after[1]]
        sql = (
            f"SELECT l.seq, l.content, l.hash, l.prev_hash, l.t FROM audit_log l WHERE {where} "
            f"ORDER BY l.t {order}, l.seq {order} LIMIT ?"
        )
        return [(int(r[0]), str(r[1]), bytes(r[2]), bytes(r[3]), int(r[4]))
                for r in self.db.execute(sql, params + [limit]).fetchall()]

    def facts(self, kind: str, paths: Sequence[str], dates: Sequence[Sequence[DateFilter]]
              ) -> Iterator[tuple[int, list[Any]]]:
        """(seq, [the value at each JSON path of the content]) of the entries of ``kind`` recorded in ``dates``,
        in order; one extraction per entry in the database (cheaper than parsing whole contents here)."""
        clauses, params = _dates(dates)
        where = "".join(f" AND {c}" for c in clauses)
        if self.pg:
            values = ", ".join(f"j.c #> {_pg_path(p)}" for p in paths)
            sql = (f"SELECT l.seq, jsonb_build_array({values}) FROM audit_log l"
                   f" CROSS JOIN LATERAL (SELECT l.content::jsonb AS c) AS j WHERE l.kind = ?{where} ORDER BY l.seq")
            for seq, found in self.db.execute(sql, [kind, *params]):
                yield int(seq), list(found)
            return
        quoted = ", ".join(f"'{p}'" for p in paths)
        sql = f"SELECT l.seq, json_extract(l.content, {quoted}) FROM audit_log l WHERE l.kind = ?{where} ORDER BY l.seq"
        for seq, text in self.db.execute(sql, [kind, *params]):
            yield int(seq), json.loads(text)


_cursors = itertools.count(1)


def audit_store(db: Database) -> AuditStore:
    """The audit storage of ``db`` (cheap: make one per operation)."""
    return AuditStore(db)


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8") if isinstance(value, (bytes, bytearray, memoryview)) else str(value)


def _entry_row(row: Sequence[Any]) -> EntryRow:
    return int(row[0]), str(row[1]), bytes(row[2]), bytes(row[3])


def _checkpoint_row(row: Sequence[Any]) -> CheckpointRow:
    cid, own, member, count, head, time, jws, received = row
    return int(cid), int(own), str(member), int(count), bytes(head), str(time), str(jws), received


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def _pg_guard_definitions(script: str) -> tuple[dict[str, str], dict[str, str]]:
    """From the PostgreSQL audit schema file: {function: body} and {trigger: definition after its name}."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(
        r"CREATE OR REPLACE FUNCTION (\w+)\(\)[^$]*?AS \$\$(.*?)\$\$", script, flags=re.S)}
    triggers = {m.group(1): m.group(2).replace("''", "'") for m in re.finditer(
        r"\('(\w+)', '\w+',\s*'((?:[^']|'')*)'\)", script)}
    return bodies, triggers
