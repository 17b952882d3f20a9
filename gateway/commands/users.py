"""User commands: ``gateway users add|list|disable|token``.

Accounts of the HTTP API (``gateway.auth``): an API token is printed once, when
an account is added (or another token issued), and stored only as a hash.
Every change is written to the audit log as done by the operating-system user
running the command.
"""

from __future__ import annotations

import datetime as _dt
import json

import click

from gateway import auth
from gateway.audit import query, records
from gateway.commands.audit import cli_party, database_named, open_db, settings_for
from gateway.commands.common import one_line_errors
from gateway.config import Settings

__all__ = ["users"]

_DB_HELP = "SQLite database of this gateway (GATEWAY_DATABASE); default: the configured one."


def _who(settings: Settings) -> tuple[_dt.datetime, records.Party, records.Party]:
    """Now, this gateway, and the person running the command: what every change is audited with."""
    now = _dt.datetime.now(query.parse_offset(settings.timezone))
    return now, records.Party.member(settings.issuer_uscc, settings.issuer_name), cli_party()


def _show_token(token: str) -> None:
    click.echo(f"API token (shown only now; give it to the user, it cannot be recovered):\n{token}")


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
@click.option("--db", "db_path", type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE", help=_DB_HELP)
@click.pass_context
def add(ctx: click.Context, name: str, roles: tuple[str, ...], member: str | None, db_path: str | None) -> None:
    """Add the account NAME and print its first API token (once).

    The account goes into the database of the gateway named by --config (or GATEWAY_CONFIG), as `gateway serve`
    uses it; a new database is created only where one was named that way (or by --db), never by default in the
    current directory."""
    with one_line_errors():
        settings = settings_for(ctx)
        if not db_path and not settings.database_path.exists() and not database_named(ctx):
            raise click.ClickException(
                f"no gateway database at {settings.database_path}: name the gateway's configuration "
                "(gateway --config FILE users add ..., or GATEWAY_CONFIG) or give --db"
            )
        with open_db(ctx, db_path, must_exist=False) as db:
            at, gateway, by = _who(settings)
            user, token = auth.add_user(db, name, roles, member=member, at=at, gateway=gateway, by=by)
    click.echo(f"user {user.name} added with role(s) {', '.join(user.roles)}")
    _show_token(token)


@users.command("token")
@click.argument("name")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE", help=_DB_HELP)
@click.pass_context
def token(ctx: click.Context, name: str, db_path: str | None) -> None:
    """Issue another API token for the active account NAME (the older ones keep working)."""
    with one_line_errors():
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            at, gateway, by = _who(settings)
            value = auth.issue_token(db, name, at=at, gateway=gateway, by=by)
    _show_token(value)


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE", help=_DB_HELP)
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool, db_path: str | None) -> None:
    """List the accounts: roles, member, when added, whether disabled, how many live tokens."""
    with one_line_errors():
        with open_db(ctx, db_path) as db:
            found = auth.list_users(db)
    if as_json:
        click.echo(json.dumps([u.__dict__ for u in found], ensure_ascii=False, indent=2))
        return
    for u in found:
        state = f"disabled {u.disabled}" if u.disabled else "active"
        click.echo(
            f"{u.name:<24} {','.join(u.roles):<22} {u.member or '-':<18} added {u.created}  {state}  "
            f"tokens {u.tokens}"
        )


@users.command("disable")
@click.argument("name")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE", help=_DB_HELP)
@click.pass_context
def disable(ctx: click.Context, name: str, db_path: str | None) -> None:
    """Disable the account NAME and revoke its tokens (it stays listed: the audit log names it)."""
    with one_line_errors():
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            at, gateway, by = _who(settings)
            user = auth.disable_user(db, name, at=at, gateway=gateway, by=by)
    click.echo(f"user {user.name} disabled at {user.disabled}; its tokens no longer work")
