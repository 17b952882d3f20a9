"""User commands: ``gateway users add|list|disable|token|passwd``.

Accounts of the HTTP API (``gateway.auth``): an API token is printed once, when
an account is added (or another token issued), and stored only as a hash.
A console password (for people: auditor, admin) is read from a file
(``--password-file FILE``, ``-`` for stdin) or asked for twice at a terminal,
and stored only as an Argon2id hash. Every change is written to the audit log
as done by the operating-system user running the command.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from typing import Any

import click

from gateway import auth
from gateway.commands.audit import database_named, open_db, settings_for, who_acts
from gateway.commands.common import EnvOption, one_line_errors

__all__ = ["users"]

_DB_HELP = ("Database of this gateway, a SQLite file or a postgresql:// URL (GATEWAY_DATABASE); "
            "default: the configured one.")
#: The --db option every users command takes.
_DB = click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
                   help=_DB_HELP)


def read_password(password_file: str | None, *, prompt: bool) -> str | None:
    """The password in ``password_file`` (its first line; ``-``: stdin), else asked twice at a terminal when
    ``prompt``; None when neither applies."""
    if password_file == "-":
        return sys.stdin.readline().rstrip("\r\n")
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as fh:
                return fh.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = ("not UTF-8 text: save it as UTF-8" if isinstance(exc, UnicodeDecodeError)
                   else exc.strerror or type(exc).__name__)
            err = click.ClickException(f"--password-file {password_file}: cannot read the password ({why})")
            err.exit_code = 2
            raise err from None
    if prompt and sys.stdin.isatty():
        return str(click.prompt("Console password", hide_input=True, confirmation_prompt=True))
    return None


def _show_token(token: str, at: _dt.datetime | None = None, days: int | None = None) -> None:
    if at is not None and days is not None:
        click.echo(f"the token expires {(at + _dt.timedelta(days=days)).isoformat(timespec='minutes')} "
                   f"({days} days); issue another before then with `gateway users token NAME`")
    click.echo(f"API token (shown only now; give it to the user, it cannot be recovered):\n{token}")


_EXPIRES = click.option(
    "--expires-days", type=click.IntRange(1, 3650), default=auth.TOKEN_DAYS, show_default=True,
    help="Days the API token works; then the account needs another (`gateway users token`).")


def _expiries(user: auth.User, now: _dt.datetime) -> str:
    """How each unrevoked token of ``user`` stands: until when, expired, or no expiry (made before tokens
    expired)."""
    shown = []
    for expires in user.token_expiries:
        if expires is None:
            shown.append("no expiry")
        else:
            when = _dt.datetime.fromisoformat(expires)
            shown.append(f"{'expired' if when <= now else 'until'} {when.date().isoformat()}")
    return ", ".join(shown)


@click.group()
def users() -> None:
    """Accounts of the HTTP API and their roles: submitter, peer, auditor (read-only), admin."""


@users.command("add")
@click.argument("name")
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(auth.ROLES),
    help="Role of the account; repeat for several. auditor: reads the audit log only.",
)
@click.option("--member", help="For a peer account: the 统一社会信用代码 of the member gateway it speaks for.")
@click.option(
    "--password-file",
    help="File whose first line is the console password (auditor, admin); - reads stdin. Without it an "
    "auditor or admin is asked for one at a terminal.",
)
@_EXPIRES
@_DB
@click.pass_context
def add(
    ctx: click.Context,
    name: str,
    roles: tuple[str, ...],
    member: str | None,
    password_file: str | None,
    expires_days: int,
    db_path: str | None,
) -> None:
    """Add the account NAME and print its first API token (once); auditors and admins also get a console
    password (--password-file, or asked at a terminal).

    The account goes into the database of the gateway named by --config (or GATEWAY_CONFIG), as `gateway serve`
    uses it; a new database is created only where one was named that way (or by --db), never by default in the
    current directory."""
    with one_line_errors():
        settings = settings_for(ctx)
        file = settings.database_file
        if not db_path and file is not None and not file.exists() and not database_named(ctx):
            raise click.ClickException(
                f"no gateway database at {settings.database_locator}: name the gateway's configuration "
                "(gateway --config FILE users add ..., or GATEWAY_CONFIG) or give --db"
            )
        people = bool(set(roles) & set(auth.CONSOLE_ROLES))
        if password_file and not people:
            raise click.ClickException("only auditor and admin accounts log in to the console with a password")
        password = read_password(password_file, prompt=people)
        if password is not None:
            auth.check_password_rules(password)
        with open_db(ctx, db_path, must_exist=False) as db:
            at, gateway, by = who_acts(settings)
            user, token = auth.add_user(db, name, roles, member=member, at=at, gateway=gateway, by=by,
                                        expires_days=expires_days)
            if password is not None:
                auth.set_password(db, name, password, at=at, gateway=gateway, by=by)
    click.echo(f"user {user.name} added with role(s) {', '.join(user.roles)}")
    if password is not None:
        click.echo("console password set: log in at /console/")
    _show_token(token, at, expires_days)


@users.command("token")
@click.argument("name")
@_EXPIRES
@_DB
@click.pass_context
def token(ctx: click.Context, name: str, expires_days: int, db_path: str | None) -> None:
    """Issue another API token for the active account NAME (the older ones keep working until they expire, or until
    `gateway users revoke` revokes one)."""
    with one_line_errors():
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            at, gateway, by = who_acts(settings)
            value = auth.issue_token(db, name, at=at, gateway=gateway, by=by, expires_days=expires_days)
    _show_token(value, at, expires_days)


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_DB
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool, db_path: str | None) -> None:
    """List the accounts: roles, member, when added, whether disabled, how many live tokens and when each
    expires ("no expiry": made before tokens expired)."""
    with one_line_errors():
        with open_db(ctx, db_path) as db:
            found = auth.list_users(db)
    if as_json:
        click.echo(json.dumps([u.__dict__ for u in found], ensure_ascii=False, indent=2))
        return
    now = _dt.datetime.now(_dt.timezone.utc)
    for u in found:
        state = f"disabled {u.disabled}" if u.disabled else "active"
        expiries = f" ({_expiries(u, now)})" if u.token_expiries else ""
        click.echo(
            f"{u.name:<24} {','.join(u.roles):<22} {u.member or '-':<18} added {u.created}  {state}  "
            f"tokens {u.tokens}{expiries}"
        )


@users.command("tokens")
@click.argument("name")
@_DB
@click.pass_context
def tokens(ctx: click.Context, name: str, db_path: str | None) -> None:
    """List the API tokens of the account NAME, newest first: the characters each begins with (what `gateway users
    revoke` takes), when it was issued, when it expires, and whether it is revoked."""
    with one_line_errors():
        with open_db(ctx, db_path) as db:
            found = auth.tokens_of(db, name)
    if not found:
        click.echo(f"user {name} has no API token")
    for t in found:
        state = f"revoked {t.revoked}" if t.revoked else "live"
        click.echo(f"{t.hint}…  issued {t.created}  expires {t.expires or 'never'}  {state}")


@users.command("revoke")
@click.argument("name")
@click.argument("token_start", metavar="TOKEN_START", required=False)
@click.option("--token-file", type=click.File("r", encoding="utf-8"),
              help="File whose first line is the token itself (- reads stdin): the one to revoke, whatever its "
              "first characters share with another's.")
@_DB
@click.pass_context
def revoke(ctx: click.Context, name: str, token_start: str | None, token_file: Any, db_path: str | None) -> None:
    """Revoke one API token of the account NAME (one that leaked), its other tokens and the account untouched:
    TOKEN_START is the characters it begins with as `gateway users tokens NAME` lists them, or give the token
    itself with --token-file. Audited. `gateway users disable` stops every token of the account."""
    with one_line_errors():
        if (token_start is None) == (token_file is None):
            raise click.UsageError("give the token's first characters (TOKEN_START) or --token-file, one of them")
        which = token_start if token_start is not None else (token_file.readline().strip())
        if not which:
            raise click.UsageError("the token file's first line is empty")
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            at, gateway, by = who_acts(settings)
            done = auth.revoke_token(db, name, which, at=at, gateway=gateway, by=by)
    click.echo(f"API token {done.hint}… of user {name} (issued {done.created}) revoked at {done.revoked}; the "
               "account's other tokens still work")


@users.command("disable")
@click.argument("name")
@_DB
@click.pass_context
def disable(ctx: click.Context, name: str, db_path: str | None) -> None:
    """Disable the account NAME and revoke its tokens (it stays listed: the audit log names it)."""
    with one_line_errors():
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            at, gateway, by = who_acts(settings)
            user = auth.disable_user(db, name, at=at, gateway=gateway, by=by)
    click.echo(f"user {user.name} disabled at {user.disabled}; its tokens no longer work")


@users.command("passwd")
@click.argument("name")
@click.option("--password-file", help="File whose first line is the new password; - reads stdin. Without it the "
              "password is asked for twice at a terminal.")
@_DB
@click.pass_context
def passwd(ctx: click.Context, name: str, password_file: str | None, db_path: str | None) -> None:
    """Set the console password of the auditor or admin account NAME (and lift a lock-out)."""
    with one_line_errors():
        settings = settings_for(ctx)
        password = read_password(password_file, prompt=True)
        if password is None:
            raise click.ClickException("give the password with --password-file FILE (or -), or run at a terminal")
        with open_db(ctx, db_path) as db:
            user = auth.get_user(db, name)
            if not set(user.roles) & set(auth.CONSOLE_ROLES):
                raise click.ClickException(f"{name} ({', '.join(user.roles)}) cannot log in to the console: "
                                           "only auditor and admin accounts have a password")
            at, gateway, by = who_acts(settings)
            auth.set_password(db, name, password, at=at, gateway=gateway, by=by)
    click.echo(f"console password of {name} set")
