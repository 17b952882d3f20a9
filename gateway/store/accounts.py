"""Accounts as stored: users, API tokens, console passwords and sessions, backend clients, replayed assertions.

The rules (who may have which role, how long a token lives, when an account
locks) live in :mod:`gateway.auth`, :mod:`gateway.clients` and
:mod:`gateway.exchange.peer_auth`; this module only reads and writes their
rows, the same way on SQLite and PostgreSQL (:class:`AccountsPort`,
implemented by :class:`Accounts`). The tables are in
``sql/<engine>/accounts.sql``; the replay cache of signed assertions
(``peer_jti``) is the core part's table, used here.

The schema is made sure of once per connection before a write
(:meth:`Accounts.ensure_schema`). The look-ups made on every request (an API
token, an access token, a console session) send no schema statement at all:
they run their one query, and only a database that lacks the tables (or a
column added since) gets them made, after which the query runs again.

``user`` is a reserved word in PostgreSQL: the column of that name is always
written ``"user"`` here, which SQLite reads the same.
"""
from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from gateway.store import schema
from gateway.store.db import Database, dialect, transaction

__all__ = ["AccountsPort", "Accounts", "UserRow", "TokenOwner", "LoginState", "SessionRow", "ClientRow",
           "AccessTokenRow", "PART", "LAYOUT"]

#: The part's name in ``sql/<engine>/`` and ``schema_versions``.
PART = "accounts"
#: Layout version: 1 before API tokens expired (no ``gateway_token.expires``), 2 with it.
LAYOUT = 2
#: Indexes of ``accounts.sql`` added after its layout 2 was first released (built on PostgreSQL by
#: :func:`gateway.store.schema.build_indexes` at ``gateway db upgrade`` and ``gateway serve``'s start).
ADDED_INDEXES = ("console_session_user",)

T = TypeVar("T")


class UserRow(NamedTuple):
    """A user with the number of its unrevoked tokens."""

    name: str
    roles: str
    member: str | None
    created: str
    disabled: str | None
    tokens: int


class TokenOwner(NamedTuple):
    """The active user an unrevoked API token belongs to, and when the token expires (None: never)."""

    name: str
    roles: str
    member: str | None
    expires: str | None


class TokenRow(NamedTuple):
    """One API token of a user, as listed: its hash (how it is told), the first characters it began with."""

    hash: str
    hint: str
    created: str
    expires: str | None
    revoked: str | None


class LoginState(NamedTuple):
    """What a console log-in checks: the user's roles and state, and its password row (None: no password)."""

    roles: str
    disabled: str | None
    hash: str | None
    failures: int | None
    locked_until: str | None


class SessionRow(NamedTuple):
    """A console session not ended, with its user."""

    user: str
    csrf: str
    seen: str
    roles: str
    disabled: str | None


class ClientRow(NamedTuple):
    """A registered backend client."""

    client_id: str
    role: str
    scopes: str
    jwks: str | None
    jwks_url: str | None
    created: str
    disabled: str | None


class AccessTokenRow(NamedTuple):
    """A stored access token of an active client."""

    client_id: str
    scopes: str
    expires: float
    role: str


class AccountsPort(Protocol):
    """The operations on stored accounts the gateway uses."""

    def ensure_schema(self) -> None:
        """Create the tables when missing and bring an older database's up to date (once per connection)."""

    # users and their API tokens
    def add_user(self, name: str, roles: str, member: str | None, created: str) -> bool:
        """Add a user; False (nothing written) when the name is taken."""

    def add_token(self, token_hash: str, user: str, hint: str, created: str, expires: str | None) -> None:
        """Store a new API token (its hash)."""

    def disable_user(self, name: str, when: str) -> None:
        """Mark a user disabled and revoke its unrevoked tokens."""

    def tokens_of(self, name: str) -> list[TokenRow]:
        """A user's API tokens, newest first, revoked ones too."""

    def revoke_token(self, token_hash: str, name: str, when: str) -> bool:
        """Revoke one unrevoked token of ``name``; whether there was one."""

    def user(self, name: str) -> UserRow | None:
        """One user."""

    def users(self) -> list[UserRow]:
        """Every user, by name."""

    def token_expiries(self, name: str) -> list[str | None]:
        """When each unrevoked token of a user expires, oldest token first."""

    def token_owner(self, token_hash: str) -> TokenOwner | None:
        """The active user of an unrevoked token (one query: this runs for every API request)."""

    # console passwords and sessions
    def set_password(self, name: str, hashed: str, changed: str) -> None:
        """Set (or replace) a user's password hash and clear its failures and lock-out."""

    def password_hash(self, name: str) -> str | None:
        """A user's password hash; None without a password."""

    def login_state(self, name: str) -> LoginState | None:
        """What a log-in of ``name`` checks; None for an unknown user."""

    def record_login_failures(self, name: str, failures: int, locked_until: str | None) -> None:
        """Wrong passwords in a row so far, and the end of a lock-out (None: not locked)."""

    def open_session(self, key: str, user: str, csrf: str, at: str) -> None:
        """Store a new console session (the hash of its cookie value)."""

    def live_session(self, key: str) -> SessionRow | None:
        """A session not ended, by the hash of its cookie value."""

    def touch_session(self, key: str, at: str) -> None:
        """Move a session's last use."""

    def end_session(self, key: str, at: str) -> None:
        """End a session."""

    def end_sessions_of(self, user: str, at: str, keep: str = "") -> int:
        """End every live session of ``user`` but the one whose hash is ``keep``; how many were ended."""

    # backend clients (SMART Backend Services) and their access tokens
    def add_client(self, client_id: str, role: str, scopes: str, jwks: str | None, jwks_url: str | None,
                   created: str) -> bool:
        """Register a client; False (nothing written) when the id is taken."""

    def disable_client(self, client_id: str, when: str) -> None:
        """Mark a client disabled and delete its access tokens."""

    def client(self, client_id: str) -> ClientRow | None:
        """One client."""

    def clients(self) -> list[ClientRow]:
        """Every client, by id."""

    def add_access_token(self, token_hash: str, client_id: str, scopes: str, issued: str, expires: float,
                         forget_before: float) -> None:
        """Store an access token, deleting those that expired before ``forget_before``."""

    def access_token(self, token_hash: str) -> AccessTokenRow | None:
        """A stored access token of an active client (one query: this runs for every request made with one)."""

    # the replay cache of signed assertions
    def replay_cache_ready(self) -> bool:
        """True when the replay cache's table exists."""

    def remember_assertion(self, iss: str, jti: str, exp: float, forget_before: float) -> bool:
        """Record an assertion's ``jti`` for its issuer; False when it was recorded before (a replay).
        Entries that expired before ``forget_before`` are forgotten first.

        :raises ValueError: ``exp`` is NaN or an infinity (the callers refuse such an assertion first).
        """


_USER_SQL = (
    "SELECT u.name, u.roles, u.member, u.created, u.disabled,"
    ' (SELECT count(*) FROM gateway_token t WHERE t."user" = u.name AND t.revoked IS NULL) FROM gateway_user u'
)
_CLIENT_SQL = "SELECT client_id, role, scopes, jwks, jwks_url, created, disabled FROM smart_client"


def _missing_schema(exc: BaseException) -> bool:
    """True for the error of a table or column that does not exist (yet)."""
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).startswith(("no such table", "no such column"))
    return type(exc).__name__ in ("UndefinedTable", "UndefinedColumn")


#: The fact, kept on a connection (:func:`gateway.store.schema.learn`), that the accounts tables are made sure of
#: (the schema runs once per connection).
_FACT = "part:accounts"


class Accounts:
    """:class:`AccountsPort` over a gateway database, SQLite or PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.postgresql = dialect(db) == "postgresql"
        # Text sorts byte by byte, as SQLite does, whatever the PostgreSQL database's collation.
        self._bytewise = ' COLLATE "C"' if self.postgresql else ""

    # -- schema ------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        if schema.known(self.db, _FACT):
            return
        self._create()
        schema.learn(self.db, _FACT, made=True)  # inside a caller's transaction: made sure of again until it commits

    def _create(self) -> None:
        db = self.db
        with transaction(db):
            if self.postgresql:
                schema.apply(db, PART)  # joins this transaction
            else:
                for statement in _statements(schema.script(db, PART)):
                    db.execute(statement)
            if "expires" not in schema.columns(db, "gateway_token"):  # a database made before tokens expired
                db.execute("ALTER TABLE gateway_token ADD COLUMN expires TEXT")
            if schema.version(db, PART) < LAYOUT:
                schema.set_version(db, PART, LAYOUT)

    def _read(self, query: Callable[[], T]) -> T:
        """Run a read; when the tables (or a column added since) are missing, make them and run it again."""
        if schema.known(self.db, _FACT):
            return query()
        if self.db.conn.in_transaction:  # on PostgreSQL a failed statement would abort the caller's transaction
            self.ensure_schema()
            return query()
        try:
            return query()
        except Exception as exc:  # noqa: BLE001 - only a missing table or column is caught; the rest is raised
            if not _missing_schema(exc):
                raise
        self.ensure_schema()
        return query()

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        return self._read(lambda: self.db.execute(sql, params).fetchone())

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._read(lambda: self.db.execute(sql, params).fetchall())

    # -- users and API tokens ----------------------------------------------------------------

    def add_user(self, name: str, roles: str, member: str | None, created: str) -> bool:
        cur = self.db.execute("INSERT INTO gateway_user (name, roles, member, created) VALUES (?, ?, ?, ?)"
                              " ON CONFLICT (name) DO NOTHING", [name, roles, member, created])
        return bool(cur.rowcount == 1)

    def add_token(self, token_hash: str, user: str, hint: str, created: str, expires: str | None) -> None:
        self.db.execute('INSERT INTO gateway_token (hash, "user", hint, created, expires) VALUES (?, ?, ?, ?, ?)',
                        [token_hash, user, hint, created, expires])

    def disable_user(self, name: str, when: str) -> None:
        self.db.execute("UPDATE gateway_user SET disabled = ? WHERE name = ?", [when, name])
        self.db.execute('UPDATE gateway_token SET revoked = ? WHERE "user" = ? AND revoked IS NULL', [when, name])

    def tokens_of(self, name: str) -> list[TokenRow]:
        order = "created DESC, seq DESC" if self.postgresql else "created DESC, rowid DESC"
        return [TokenRow(*r) for r in self._all(
            f'SELECT hash, hint, created, expires, revoked FROM gateway_token WHERE "user" = ? ORDER BY {order}',
            [name])]

    def revoke_token(self, token_hash: str, name: str, when: str) -> bool:
        found = self._one('SELECT hash FROM gateway_token WHERE hash = ? AND "user" = ? AND revoked IS NULL',
                          [token_hash, name])
        if found is None:
            return False
        self.db.execute('UPDATE gateway_token SET revoked = ? WHERE hash = ?', [when, token_hash])
        return True

    def user(self, name: str) -> UserRow | None:
        row = self._one(f"{_USER_SQL} WHERE u.name = ?", [name])
        return UserRow(*row) if row is not None else None

    def users(self) -> list[UserRow]:
        return [UserRow(*r) for r in self._all(f"{_USER_SQL} ORDER BY u.name{self._bytewise}")]

    def token_expiries(self, name: str) -> list[str | None]:
        order = "created COLLATE \"C\", seq" if self.postgresql else "created, rowid"
        rows = self._all(f'SELECT expires FROM gateway_token WHERE "user" = ? AND revoked IS NULL ORDER BY {order}',
                         [name])
        return [r[0] for r in rows]

    def token_owner(self, token_hash: str) -> TokenOwner | None:
        row = self._one(
            'SELECT u.name, u.roles, u.member, t.expires FROM gateway_token t JOIN gateway_user u ON u.name = t."user"'
            " WHERE t.hash = ? AND t.revoked IS NULL AND u.disabled IS NULL", [token_hash])
        return TokenOwner(*row) if row is not None else None

    # -- console passwords and sessions -----------------------------------------------------

    def set_password(self, name: str, hashed: str, changed: str) -> None:
        self.db.execute(
            'INSERT INTO gateway_password ("user", hash, changed, failures, locked_until) VALUES (?, ?, ?, 0, NULL)'
            ' ON CONFLICT ("user") DO UPDATE SET hash = excluded.hash, changed = excluded.changed, failures = 0,'
            " locked_until = NULL",
            [name, hashed, changed])

    def password_hash(self, name: str) -> str | None:
        row = self._one('SELECT hash FROM gateway_password WHERE "user" = ?', [name])
        return str(row[0]) if row is not None else None

    def login_state(self, name: str) -> LoginState | None:
        row = self._one(
            "SELECT u.roles, u.disabled, p.hash, p.failures, p.locked_until FROM gateway_user u"
            ' LEFT JOIN gateway_password p ON p."user" = u.name WHERE u.name = ?', [name])
        return LoginState(*row) if row is not None else None

    def record_login_failures(self, name: str, failures: int, locked_until: str | None) -> None:
        self.db.execute('UPDATE gateway_password SET failures = ?, locked_until = ? WHERE "user" = ?',
                        [failures, locked_until, name])

    def open_session(self, key: str, user: str, csrf: str, at: str) -> None:
        self.db.execute('INSERT INTO console_session (hash, "user", csrf, created, seen) VALUES (?, ?, ?, ?, ?)',
                        [key, user, csrf, at, at])

    def live_session(self, key: str) -> SessionRow | None:
        row = self._one(
            'SELECT s."user", s.csrf, s.seen, u.roles, u.disabled FROM console_session s'
            ' JOIN gateway_user u ON u.name = s."user" WHERE s.hash = ? AND s.ended IS NULL', [key])
        return SessionRow(*row) if row is not None else None

    def touch_session(self, key: str, at: str) -> None:
        self.db.execute("UPDATE console_session SET seen = ? WHERE hash = ?", [at, key])

    def end_session(self, key: str, at: str) -> None:
        self.db.execute("UPDATE console_session SET ended = ? WHERE hash = ?", [at, key])

    def end_sessions_of(self, user: str, at: str, keep: str = "") -> int:
        return int(self.db.execute('UPDATE console_session SET ended = ? WHERE "user" = ? AND ended IS NULL'
                                   " AND hash <> ?", [at, user, keep]).rowcount or 0)

    # -- backend clients and access tokens ---------------------------------------------------

    def add_client(self, client_id: str, role: str, scopes: str, jwks: str | None, jwks_url: str | None,
                   created: str) -> bool:
        cur = self.db.execute(
            "INSERT INTO smart_client (client_id, role, scopes, jwks, jwks_url, created) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (client_id) DO NOTHING", [client_id, role, scopes, jwks, jwks_url, created])
        return bool(cur.rowcount == 1)

    def disable_client(self, client_id: str, when: str) -> None:
        self.db.execute("UPDATE smart_client SET disabled = ? WHERE client_id = ?", [when, client_id])
        self.db.execute("DELETE FROM smart_token WHERE client_id = ?", [client_id])

    def client(self, client_id: str) -> ClientRow | None:
        row = self._one(f"{_CLIENT_SQL} WHERE client_id = ?", [client_id])
        return ClientRow(*row) if row is not None else None

    def clients(self) -> list[ClientRow]:
        return [ClientRow(*r) for r in self._all(f"{_CLIENT_SQL} ORDER BY client_id{self._bytewise}")]

    def add_access_token(self, token_hash: str, client_id: str, scopes: str, issued: str, expires: float,
                         forget_before: float) -> None:
        self.db.execute("DELETE FROM smart_token WHERE expires < ?", [forget_before])
        self.db.execute("INSERT INTO smart_token (hash, client_id, scopes, issued, expires) VALUES (?, ?, ?, ?, ?)",
                        [token_hash, client_id, scopes, issued, expires])

    def access_token(self, token_hash: str) -> AccessTokenRow | None:
        row = self._one(
            "SELECT t.client_id, t.scopes, t.expires, c.role FROM smart_token t JOIN smart_client c"
            " ON c.client_id = t.client_id WHERE t.hash = ? AND c.disabled IS NULL", [token_hash])
        return AccessTokenRow(*row) if row is not None else None

    # -- replay cache ------------------------------------------------------------------------

    def replay_cache_ready(self) -> bool:
        if self.postgresql:
            return bool(schema.columns(self.db, "peer_jti"))
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'peer_jti'").fetchone() is not None

    def remember_assertion(self, iss: str, jti: str, exp: float, forget_before: float) -> bool:
        if not math.isfinite(exp):  # (NaN is stored as NULL, which the column refuses: say so before the SQL)
            raise ValueError("an assertion's exp must be a finite number to be remembered")
        with transaction(self.db):
            self.db.execute("DELETE FROM peer_jti WHERE exp < ?", [forget_before])
            cur = self.db.execute("INSERT INTO peer_jti (iss, jti, exp) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                                  [iss, jti, exp])
            return bool(cur.rowcount == 1)


def _statements(script: str) -> list[str]:
    """A schema file's statements, one by one (so that they join a transaction, which ``executescript``
    would commit first)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()):
        out.append(pending.strip())
    return out
