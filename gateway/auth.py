"""Auth: who may use the gateway's HTTP API, and as what.

Users have one or more roles:

- ``submitter``: a member's own system that posts results;
- ``peer``: another member gateway (its institution in ``member``);
- ``auditor``: reads the audit log and its statistics, changes nothing;
- ``admin``: manages the gateway (checkpoints, users).

A user authenticates with a bearer API token (``Authorization: Bearer
cyhr_...``). A token is shown once, when made, and stored only as its SHA-256
(tokens are 256 random bits, so a fast hash is enough: there is nothing to
guess). Disabling a user revokes its tokens. Adding and disabling users and
issuing tokens are written to the audit log.

People (auditors, admins) may also log in to the console (``/console/``) with
a user name and password (set by ``gateway users add --password-file`` or
``gateway users passwd``), hashed with Argon2id (argon2-cffi). A log-in opens a
server-side console session (its cookie value stored only as SHA-256, with its
own CSRF token) that ends on log-out or after :data:`IDLE_MINUTES` without use;
:data:`LOCKOUT_FAILURES` wrong passwords in a row lock the account for
:data:`LOCKOUT_MINUTES`. Only ``auditor`` and ``admin`` may log in. Every
log-in, refusal, lock-out and log-out is written to the audit log.

Flask views declare who may call them with :func:`require_role`, which answers
401 (no or unknown credentials) or 403 (wrong role) as an OperationOutcome.
How a caller is recognised is pluggable: the app may list authenticators in
``app.extensions["gateway.authenticators"]`` (each ``(request, db) ->
Principal | None``; the first that recognises the request decides), so signed
JWT client assertions for peer gateways can be added beside bearer tokens.

API tokens expire (``gateway users add|token --expires-days``, default
:data:`TOKEN_DAYS`); tokens made before expiry existed keep working and are
listed as having no expiry. Systems may instead authenticate the SMART Backend
Services way (:mod:`gateway.clients`): their short-lived access tokens are
accepted here too, and :func:`require_role` then also checks the token's scopes
against the route (:mod:`gateway.scopes`), answering 403 naming the scope needed.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import current_app, g, request

from gateway.audit import records
from gateway.audit.log import append, instant
from gateway.errors import InputError, NotFound, TrustError
from gateway.identifiers import check_uscc
from gateway.scopes import parse_scopes, required_scope
from gateway.store.accounts import Accounts, UserRow
from gateway.store.db import Database, transaction

__all__ = [
    "ROLES",
    "TOKEN_PREFIX",
    "TOKEN_DAYS",
    "Principal",
    "User",
    "NotAuthenticated",
    "Forbidden",
    "Authenticator",
    "ensure_schema",
    "add_user",
    "issue_token",
    "disable_user",
    "list_users",
    "get_user",
    "authenticate_token",
    "token_hash",
    "bearer_token",
    "require_role",
    "current_principal",
    "principal_party",
    "CONSOLE_ROLES",
    "LOCKOUT_FAILURES",
    "LOCKOUT_MINUTES",
    "IDLE_MINUTES",
    "MIN_PASSWORD",
    "check_password_rules",
    "LoginRefused",
    "ConsoleSession",
    "set_password",
    "change_password",
    "has_password",
    "console_login",
    "console_session",
    "console_logout",
]

log = logging.getLogger(__name__)

ROLES = ("submitter", "peer", "auditor", "admin")
TOKEN_PREFIX = "cyhr_"
#: Days an API token lives unless told otherwise (``--expires-days``).
TOKEN_DAYS = 365
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

#: Roles that may log in to the console (submitter and peer accounts are systems, not people).
CONSOLE_ROLES = ("auditor", "admin")
#: Wrong passwords in a row that lock an account, and for how long.
LOCKOUT_FAILURES = 5
LOCKOUT_MINUTES = 15
#: A console session ends after this long without a request.
IDLE_MINUTES = 30
#: Shortest password accepted.
MIN_PASSWORD = 10
_hasher = PasswordHasher()


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """Checked when the user is unknown, so a wrong name takes as long as a wrong password (made on first use: a
    hash costs a tenth of a second on purpose, which every command would otherwise pay at start)."""
    return str(_hasher.hash("not a password of anyone"))


class NotAuthenticated(TrustError):
    """No credentials, or credentials the gateway does not know (HTTP 401)."""

    code = "login"
    http_status = 401


class LoginRefused(NotAuthenticated):
    """A console log-in refused; ``reason`` (password, locked, role, disabled) is for the audit log,
    ``message`` (in Chinese) for the person at the log-in page."""

    code = "login"
    http_status = 401

    def __init__(self, message: str, reason: str, locked_until: _dt.datetime | None = None) -> None:
        super().__init__(message, "password")
        self.reason = reason
        self.locked_until = locked_until


@dataclass(frozen=True)
class ConsoleSession:
    """A console session in use: who, and the CSRF token its forms carry."""

    principal: Principal
    csrf: str


class Forbidden(TrustError):
    """Authenticated, but the caller's roles do not allow this (HTTP 403). ``scope``: the SMART scope the request
    needs, when an access token lacks it (said in ``WWW-Authenticate``, RFC 6750 3.1 ``insufficient_scope``)."""

    code = "forbidden"
    http_status = 403

    def __init__(self, message: str, location: str = "", *, scope: str | None = None) -> None:
        super().__init__(message, location)
        self.scope = scope


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user account, or a SMART backend client (``via`` "smart", with the ``scopes`` its
    access token was granted; None for every other way in, which scopes do not limit)."""

    name: str
    roles: frozenset[str]
    member: str | None = None
    via: str = "token"
    scopes: frozenset[str] | None = None


@dataclass(frozen=True)
class User:
    """A user account as listed (never with a token)."""

    name: str
    roles: tuple[str, ...]
    member: str | None
    created: str
    disabled: str | None
    tokens: int = 0
    #: When each unrevoked token expires (None: no expiry), oldest token first.
    token_expiries: tuple[str | None, ...] = ()

    @property
    def active(self) -> bool:
        """True until disabled."""
        return self.disabled is None


Authenticator = Callable[[Any, Database], "Principal | None"]


def ensure_schema(db: Database) -> None:
    """Create the account tables if missing, and add the token expiry to a database made before it existed
    (once per connection; joins a caller's transaction)."""
    Accounts(db).ensure_schema()


def token_hash(token: str) -> str:
    """What is stored of a token: SHA-256 hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(sorted(set(roles)))
    if not chosen:
        raise InputError("a user needs at least one role", "roles")
    unknown = [r for r in chosen if r not in ROLES]
    if unknown:
        raise InputError(f"unknown role {unknown[0]!r}: roles are {', '.join(ROLES)}", "roles")
    return chosen


def _check_days(days: int | None) -> int | None:
    if days is not None and not 1 <= days <= 3650:
        raise InputError("a token lives 1 to 3650 days", "expires-days")
    return days


def _new_token(accounts: Accounts, name: str, at: _dt.datetime, days: int | None) -> str:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = instant(at + _dt.timedelta(days=days)) if days is not None else None
    accounts.add_token(token_hash(token), name, token[: len(TOKEN_PREFIX) + 4], instant(at), expires)
    return token


def _audit(
    db: Database,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    by: records.Party,
    name: str,
    action: Literal["added", "disabled", "token-issued", "token-revoked", "password-set"],
    roles: Sequence[str],
) -> None:
    user = records.Party.user(gateway.value, name)
    append(db, records.user_admin(at=at, gateway=gateway, admin=by, user=user, action=action, roles=roles))


def add_user(
    db: Database,
    name: str,
    roles: Iterable[str],
    *,
    at: _dt.datetime,
    gateway: records.Party,
    by: records.Party,
    member: str | None = None,
    expires_days: int | None = TOKEN_DAYS,
) -> tuple[User, str]:
    """Add a user with its first API token; return the user and the token (shown once, never stored).

    ``member`` (a peer's institution) is required for, and only for, the ``peer`` role. The token stops
    working ``expires_days`` after ``at`` (None: never; only for set-ups that cannot renew tokens).

    :raises InputError: bad name, unknown role, name taken, missing or needless member, expiry out of range.
    :raises IdentifierError: ``member`` fails the GB 32100 check.
    """
    if not _NAME.match(name or ""):
        raise InputError(f"user name {name!r} must be 1-64 letters, digits, . _ @ -", "name")
    chosen = _check_roles(roles)
    _check_days(expires_days)
    if member is not None:
        member = check_uscc(member)
    if ("peer" in chosen) != (member is not None):
        raise InputError("a peer account names its member institution (--member), other accounts do not", "member")
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        if not accounts.add_user(name, " ".join(chosen), member, instant(at)):
            raise InputError(f"user {name!r} exists already", "name")
        token = _new_token(accounts, name, at, expires_days)
        _audit(db, at=at, gateway=gateway, by=by, name=name, action="added", roles=chosen)
    log.info("user added with roles %s", ",".join(chosen))
    return get_user(db, name), token


def issue_token(
    db: Database,
    name: str,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    by: records.Party,
    expires_days: int | None = TOKEN_DAYS,
) -> str:
    """A new API token for an active user, expiring ``expires_days`` after ``at`` (None: never); older tokens
    stay valid until they expire or the user is disabled.

    :raises NotFound: no such user.
    :raises InputError: the user is disabled, or the expiry is out of range.
    """
    _check_days(expires_days)
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        user = get_user(db, name)
        if not user.active:
            raise InputError(f"user {name!r} is disabled", "name")
        token = _new_token(accounts, name, at, expires_days)
        _audit(db, at=at, gateway=gateway, by=by, name=name, action="token-issued", roles=user.roles)
    return token


@dataclass(frozen=True)
class Token:
    """One API token of an account as listed: the characters it begins with, when issued, expiring, revoked."""

    hint: str
    created: str
    expires: str | None
    revoked: str | None


def tokens_of(db: Database, name: str) -> list[Token]:
    """The account's API tokens, newest first (revoked ones too): what ``gateway users tokens`` lists.

    :raises NotFound: no such user.
    """
    get_user(db, name)
    accounts = Accounts(db)
    return [Token(r.hint, r.created, r.expires, r.revoked) for r in accounts.tokens_of(name)]


def revoke_token(db: Database, name: str, which: str, *, at: _dt.datetime, gateway: records.Party,
                 by: records.Party) -> Token:
    """Revoke one API token of the account ``name``, the account and its other tokens untouched (a token that leaked:
    ``gateway users disable`` stopped them all). ``which`` is the token itself, or the characters it begins with as
    listed (``gateway users tokens``) when they name one unrevoked token of the account. Audited.

    :raises NotFound: no such user.
    :raises InputError: no unrevoked token of the account is ``which``, or several begin so.
    """
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        user = get_user(db, name)
        live = [r for r in accounts.tokens_of(name) if r.revoked is None]
        chosen = [r for r in live if r.hash == token_hash(which)] or \
            ([r for r in live if r.hint == which or (len(which) >= len(r.hint) and which.startswith(r.hint))]
             if not which.startswith(TOKEN_PREFIX) or len(which) < 20 else [])
        if not chosen:
            raise InputError(f"user {name!r} has no unrevoked API token {_shown_token(which)} (`gateway users tokens "
                             f"{name}` lists them)", "token")
        if len(chosen) > 1:
            raise InputError(f"{len(chosen)} unrevoked API tokens of user {name!r} begin with {_shown_token(which)}: "
                             "give the token itself (--token-file)", "token")
        accounts.revoke_token(chosen[0].hash, name, instant(at))
        _audit(db, at=at, gateway=gateway, by=by, name=name, action="token-revoked", roles=user.roles)
    row = chosen[0]
    return Token(row.hint, row.created, row.expires, instant(at))


def _shown_token(which: str) -> str:
    """A token named in a message by the characters it begins with only (never the whole of it)."""
    return repr(which[: len(TOKEN_PREFIX) + 4] + ("…" if len(which) > len(TOKEN_PREFIX) + 4 else ""))


def disable_user(
    db: Database, name: str, *, at: _dt.datetime, gateway: records.Party, by: records.Party
) -> User:
    """Disable a user and revoke its tokens (the account stays listed: the audit log names it).

    :raises NotFound: no such user.
    """
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        user = get_user(db, name)
        if user.active:
            accounts.disable_user(name, instant(at))
            _audit(db, at=at, gateway=gateway, by=by, name=name, action="disabled", roles=user.roles)
    return get_user(db, name)


def _user(accounts: Accounts, row: UserRow) -> User:
    expiries = tuple(accounts.token_expiries(row.name))
    return User(row.name, tuple(row.roles.split()), row.member, row.created, row.disabled, int(row.tokens),
                expiries)


def get_user(db: Database, name: str) -> User:
    """One user.

    :raises NotFound: no such user.
    """
    accounts = Accounts(db)
    row = accounts.user(name)
    if row is None:
        raise NotFound(f"no user {name!r}", "name")
    return _user(accounts, row)


def list_users(db: Database) -> list[User]:
    """Every user, by name."""
    accounts = Accounts(db)
    return [_user(accounts, r) for r in accounts.users()]


def authenticate_token(db: Database, token: str, at: _dt.datetime | None = None) -> Principal:
    """The active user a bearer token belongs to, if the token has not expired at ``at`` (default: now).

    :raises NotAuthenticated: unknown or revoked token, or a disabled user (one message for all); an
        expired token (said so, with how to get another).
    """
    row = Accounts(db).token_owner(token_hash(token))
    if row is None:
        raise NotAuthenticated(
            "the API token is not valid (unknown, revoked, or its user is disabled)", "Authorization"
        )
    now = at or _dt.datetime.now(_dt.timezone.utc)
    if row.expires and _dt.datetime.fromisoformat(row.expires) <= now:
        raise NotAuthenticated(
            f"the API token expired at {row.expires}: ask the gateway's administrator for another "
            "(gateway users token NAME)", "Authorization")
    return Principal(row.name, frozenset(row.roles.split()), row.member)


def _now() -> _dt.datetime:
    """The app's clock when there is an app (tests set the time), else the system clock."""
    clock = current_app.extensions.get("gateway.clock") if current_app else None
    return clock() if clock is not None else _dt.datetime.now(_dt.timezone.utc)


def bearer_token(req: Any, db: Database) -> Principal | None:
    """Authenticator for ``Authorization: Bearer <token>``; None when the request carries no bearer token.

    :raises NotAuthenticated: a bearer token the gateway does not accept.
    """
    header = req.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    if not value or any(c.isspace() for c in value):  # (RFC 6750 2.1: one token after the scheme, nothing else)
        raise NotAuthenticated("the Authorization header must be 'Bearer <token>': one token, nothing after it",
                               "Authorization")
    from gateway import clients  # SMART access tokens; clients builds on this module

    if value.startswith(clients.ACCESS_TOKEN_PREFIX):
        return clients.authenticate_access_token(db, value, at=_now())
    if not value.startswith(TOKEN_PREFIX):
        raise NotAuthenticated(
            "the API token is not valid (unknown, revoked, or its user is disabled)", "Authorization"
        )
    return authenticate_token(db, value, _now())


F = TypeVar("F", bound=Callable[..., Any])


def _authenticate() -> Principal:
    authenticators: Sequence[Authenticator] = current_app.extensions.get("gateway.authenticators") or (bearer_token,)
    from gateway.api.app import borrow_database

    with borrow_database(current_app) as db:
        for authenticate in authenticators:
            principal = authenticate(request, db)
            if principal is not None:
                return principal
    raise NotAuthenticated("authentication required: send Authorization: Bearer <API token>", "Authorization")


def require_role(*roles: str) -> Callable[[F], F]:
    """Decorator for Flask views: the caller must authenticate and hold one of ``roles``.

    The principal is then available as :func:`current_principal`.

    :raises NotAuthenticated: (401) no or unknown credentials.
    :raises Forbidden: (403) none of the roles.
    """
    unknown = [r for r in roles if r not in ROLES]
    if not roles or unknown:
        raise ValueError(f"require_role needs roles among {ROLES}, got {roles}")
    allowed = frozenset(roles)

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = _authenticate()
            g.principal = principal  # (the access log names who was refused too)
            if not principal.roles & allowed:
                raise Forbidden(
                    f"{principal.name} ({', '.join(sorted(principal.roles))}) may not do this; "
                    f"it needs the role {' or '.join(sorted(allowed))}",
                    request.path,
                )
            if principal.scopes is not None:
                _check_scope(principal)
            return view(*args, **kwargs)

        return cast(F, wrapper)

    return decorate


def _check_scope(principal: Principal) -> None:
    """A SMART access token must carry a scope allowing this route (on top of its client's role).

    :raises Forbidden: (403) the route is closed to access tokens, or the token lacks the scope it needs.
    """
    need = required_scope(request.method, request.path)
    if need is None:
        raise Forbidden("this route does not accept SMART access tokens: use an API token", request.path)
    granted = parse_scopes(principal.scopes or ())
    if not any(s.type in ("*", need.type) and need.letter in s.letters for s in granted):
        raise Forbidden(
            f"the access token of {principal.name} lacks the scope this needs: {need}; granted: "
            f"{' '.join(sorted(principal.scopes or ())) or 'none'}",
            request.path, scope=f"system/{need.type}.{need.letter}",
        )


def current_principal() -> Principal:
    """The principal :func:`require_role` admitted for this request.

    :raises NotAuthenticated: the view is not protected by :func:`require_role`.
    """
    principal = g.get("principal")
    if principal is None:
        raise NotAuthenticated("authentication required", "Authorization")
    return cast(Principal, principal)


def principal_party(principal: Principal, member_uscc: str) -> records.Party:
    """The audit-log party of a principal: a user account of the gateway of ``member_uscc``."""
    return records.Party.user(member_uscc, principal.name)


# --------------------------------------------------------------------------- console passwords and sessions


def check_password_rules(password: str) -> None:
    """Refuse a password too short, or with surrounding spaces or a line break.

    :raises InputError: the password breaks a rule.
    """
    if len(password or "") < MIN_PASSWORD:
        raise InputError(f"a password has at least {MIN_PASSWORD} characters", "password")
    if password != password.strip() or "\n" in password:
        raise InputError("a password neither starts nor ends with a space and holds no line break", "password")


def set_password(
    db: Database,
    name: str,
    password: str,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    by: records.Party,
    keep_session: str = "",
) -> None:
    """Set the console password of an active user (and unlock the account); audited. The user's console sessions
    end (each audited as a log-out): whoever logged in with the old password is out, but for the session whose
    hash is ``keep_session`` (the user's own, changing it).

    :raises NotFound: no such user.
    :raises InputError: the user is disabled, or the password is too short.
    """
    check_password_rules(password)
    hashed = _hasher.hash(password)
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        user = get_user(db, name)
        if not user.active:
            raise InputError(f"user {name!r} is disabled", "name")
        accounts.set_password(name, hashed, instant(at))
        _audit(db, at=at, gateway=gateway, by=by, name=name, action="password-set", roles=user.roles)
        ended = accounts.end_sessions_of(name, instant(at), keep_session)
        for _ in range(ended):
            _login_record(db, at=at, gateway=gateway, name=name, address="unknown", action="logout",
                          reason="password set", roles=user.roles)
    log.info("console password set (%d other session(s) ended)", ended)


def has_password(db: Database, name: str) -> bool:
    """True when the user has a console password."""
    return Accounts(db).password_hash(name) is not None


def _login_record(
    db: Database,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    name: str,
    address: str,
    action: Literal["login", "logout"],
    reason: str | None = None,
    ok: bool = True,
    roles: Sequence[str] = (),
) -> None:
    append(
        db,
        records.user_login(
            at=at,
            gateway=gateway,
            user=records.Party.user(gateway.value, name[:64] or "(none)"),
            client_address=address or "unknown",
            action=action,
            outcome=records.Outcome.SUCCESS if ok else records.Outcome.MINOR_FAILURE,
            reason=reason,
            roles=roles,
        ),
    )


def _verify(hashed: str, password: str) -> bool:
    try:
        return bool(_hasher.verify(hashed, password))
    except (VerificationError, InvalidHashError):
        return False


def _new_session(accounts: Accounts, name: str, at: _dt.datetime) -> tuple[str, str]:
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    accounts.open_session(token_hash(cookie), name, csrf, instant(at))
    return cookie, csrf


def console_login(
    db: Database,
    name: str,
    password: str,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    address: str,
) -> tuple[ConsoleSession, str]:
    """Log in to the console: the session and its cookie value (stored only as a hash). The attempt, and a
    lock-out it causes, are written to the audit log whatever the result.

    :raises LoginRefused: unknown user or wrong password (one message for both), account locked, disabled,
        without a password, or of a role that may not use the console.
    """
    accounts = Accounts(db)
    accounts.ensure_schema()
    wrong = "用户名或密码错误 (wrong user name or password)"
    with transaction(db):
        row = accounts.login_state(name)
        if row is None or row.hash is None:
            _verify(_dummy_hash(), password)
            _login_record(db, at=at, gateway=gateway, name=name, address=address, action="login",
                          reason="unknown user" if row is None else "no password", ok=False)
            refused = LoginRefused(wrong, "password")
        else:
            roles, disabled, hashed, locked_until = row.roles, row.disabled, row.hash, row.locked_until
            failures = int(row.failures or 0)
            role_list = roles.split()
            locked = _dt.datetime.fromisoformat(locked_until) if locked_until else None
            refused = None
            if locked is not None and locked > at:
                _login_record(db, at=at, gateway=gateway, name=name, address=address, action="login",
                              reason="locked", ok=False, roles=role_list)
                refused = LoginRefused(
                    f"账户已锁定，请于 {locked.astimezone(at.tzinfo).strftime('%H:%M')} 后再试 "
                    f"(account locked after {LOCKOUT_FAILURES} failed log-ins, for {LOCKOUT_MINUTES} minutes)",
                    "locked", locked)
            elif not _verify(hashed, password):
                failures = (0 if locked is not None else failures) + 1
                lock = at + _dt.timedelta(minutes=LOCKOUT_MINUTES) if failures >= LOCKOUT_FAILURES else None
                accounts.record_login_failures(name, 0 if lock else failures, instant(lock) if lock else None)
                _login_record(db, at=at, gateway=gateway, name=name, address=address, action="login",
                              reason="locked out" if lock else "password", ok=False, roles=role_list)
                refused = LoginRefused(
                    f"密码错误次数过多，账户已锁定 {LOCKOUT_MINUTES} 分钟 (account locked for {LOCKOUT_MINUTES} minutes)"
                    if lock else wrong, "locked" if lock else "password", lock)
            elif disabled:
                _login_record(db, at=at, gateway=gateway, name=name, address=address, action="login",
                              reason="disabled", ok=False, roles=role_list)
                refused = LoginRefused("此账户已停用 (this account is disabled)", "disabled")
            elif not set(role_list) & set(CONSOLE_ROLES):
                _login_record(db, at=at, gateway=gateway, name=name, address=address, action="login",
                              reason="role", ok=False, roles=role_list)
                refused = LoginRefused(
                    f"此账户的角色（{', '.join(role_list)}）不能登录控制台，仅 auditor（审计）和 admin（管理）可以 "
                    "(only auditor and admin accounts may use the console)", "role")
            else:
                accounts.record_login_failures(name, 0, None)
                cookie, csrf = _new_session(accounts, name, at)
                _login_record(db, at=at, gateway=gateway, name=name, address=address, action="login",
                              roles=role_list)
                principal = Principal(name, frozenset(role_list), None, via="console")
    if refused is not None:
        log.info("console log-in refused (%s)", refused.reason)
        raise refused
    log.info("console log-in")
    return ConsoleSession(principal, csrf), cookie


def console_session(
    db: Database,
    cookie: str,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    address: str,
) -> ConsoleSession | None:
    """The live session of a cookie value (its last use moved to ``at``); None when there is none. A session
    idle for :data:`IDLE_MINUTES` ends here, audited as a log-out on idle time-out; a disabled user's ends too.
    """
    if not cookie:
        return None
    accounts = Accounts(db)
    key = token_hash(cookie)
    row = accounts.live_session(key)
    if row is None:
        return None
    name, csrf, seen, roles, disabled = row
    with transaction(db):
        if disabled or at - _dt.datetime.fromisoformat(seen) > _dt.timedelta(minutes=IDLE_MINUTES):
            accounts.end_session(key, instant(at))
            _login_record(db, at=at, gateway=gateway, name=name, address=address, action="logout",
                          reason="disabled" if disabled else "idle time-out", roles=roles.split())
            return None
        accounts.touch_session(key, instant(at))
    return ConsoleSession(Principal(name, frozenset(roles.split()), None, via="console"), csrf)


def console_logout(
    db: Database, cookie: str, *, at: _dt.datetime, gateway: records.Party, address: str
) -> None:
    """End a console session (audited as a log-out); nothing happens for an unknown or ended one."""
    accounts = Accounts(db)
    accounts.ensure_schema()
    key = token_hash(cookie or "")
    with transaction(db):
        row = accounts.live_session(key)
        if row is None:
            return
        accounts.end_session(key, instant(at))
        _login_record(db, at=at, gateway=gateway, name=row.user, address=address, action="logout", reason="user",
                      roles=row.roles.split())


def change_password(
    db: Database,
    name: str,
    current: str,
    new: str,
    *,
    at: _dt.datetime,
    gateway: records.Party,
    session: str = "",
    address: str = "",
) -> None:
    """A user changes their own console password, proving the current one; audited. ``session``: the hash of the
    session changing it, which stays (the user's other sessions end).

    A wrong current password counts as a failed log-in (audited; :data:`LOCKOUT_FAILURES` in a row lock the
    account and end its sessions, this one too): a session left open is no way to guess the password.

    :raises LoginRefused: the current password is wrong, or the account is locked.
    :raises InputError: the new password is too short.
    """
    accounts = Accounts(db)
    with transaction(db):
        row = accounts.login_state(name)
        locked = _dt.datetime.fromisoformat(row.locked_until) if row is not None and row.locked_until else None
        roles = row.roles.split() if row is not None else []
        if row is None or row.hash is None or (locked is not None and locked > at) or not _verify(row.hash, current):
            failures = 0 if row is None else (0 if locked is not None and locked <= at else int(row.failures or 0)) + 1
            lock = at + _dt.timedelta(minutes=LOCKOUT_MINUTES) if failures >= LOCKOUT_FAILURES else None
            if row is not None and not (locked is not None and locked > at):
                accounts.record_login_failures(name, 0 if lock else failures, instant(lock) if lock else None)
            already = locked is not None and locked > at
            _login_record(db, at=at, gateway=gateway, name=name, address=address or "unknown", action="login",
                          reason="locked" if already else "locked out" if lock else "current password", ok=False,
                          roles=roles)
            if lock is not None or (locked is not None and locked > at):
                for _ in range(accounts.end_sessions_of(name, instant(at))):  # each log-out audited, as ever
                    _login_record(db, at=at, gateway=gateway, name=name, address=address or "unknown",
                                  action="logout", reason="locked out", roles=roles)
                refused = LoginRefused(f"密码错误次数过多，账户已锁定 {LOCKOUT_MINUTES} 分钟 (account locked for "
                                       f"{LOCKOUT_MINUTES} minutes; log in again after)", "locked", lock or locked)
            else:
                refused = LoginRefused("当前密码不正确 (the current password is wrong)", "password")
        else:
            refused = None
    if refused is not None:
        raise refused
    set_password(db, name, new, at=at, gateway=gateway, by=records.Party.user(gateway.value, name),
                 keep_session=session)
