"""Client commands: ``gateway clients add|list|disable``.

Backend systems that authenticate the SMART Backend Services way
(:mod:`gateway.clients`): each is registered with a role, the scopes it may ask
for and its public keys. Nothing secret is stored or printed: the client keeps
its private key. Every change is written to the audit log as done by the
operating-system user running the command.
"""

from __future__ import annotations

import json

import click

from gateway import clients as smart
from gateway.commands.audit import database_named, open_db, settings_for, who_acts
from gateway.commands.common import EnvOption, one_line_errors

__all__ = ["clients"]

_DB_HELP = ("Database of this gateway, a SQLite file or a postgresql:// URL (GATEWAY_DATABASE); "
            "default: the configured one.")


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(1_000_000)
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: cannot read the {what} ({exc.__class__.__name__})")


@click.group()
def clients() -> None:
    """Backend systems that get short-lived access tokens with a signed JWT (SMART Backend Services)."""


@clients.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(smart.CLIENT_ROLES),
              help="What the system is: submitter (sends results, reads them), auditor (reads the audit log), admin.")
@click.option("--scopes", required=True,
              help='Space-separated scopes it may ask for, e.g. "system/DiagnosticReport.rs system/Observation.rs" '
              "(v2 letters cruds, or v1 .read/.write/.*; system/Bundle.c submits results).")
@click.option("--jwks-file", type=click.Path(dir_okay=False), help="File with the client's public keys (JWKS).")
@click.option("--jwks-url", help="URL where the client publishes its JWKS (fetched when it asks for a token).")
@click.option("--public-key", "public_key", type=click.Path(dir_okay=False),
              help="PEM file with the client's public key.")
@click.option("--kid", help="With --public-key: the kid the client puts in its JWT header (default: the key's "
              "RFC 7638 thumbprint, printed).")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def add(ctx: click.Context, name: str, role: str, scopes: str, jwks_file: str | None, jwks_url: str | None,
        public_key: str | None, kid: str | None, db_path: str | None) -> None:
    """Register the backend client NAME (its client_id) with its role, scopes and public keys (one of
    --jwks-file, --jwks-url, --public-key)."""
    with one_line_errors():
        if sum(x is not None for x in (jwks_file, jwks_url, public_key)) != 1:
            raise click.ClickException("give the client's keys one way: --jwks-file, --jwks-url or --public-key")
        if kid and not public_key:
            raise click.ClickException("--kid goes with --public-key (a JWKS names its keys itself)")
        settings = settings_for(ctx)
        jwks = _read(jwks_file, "JWKS") if jwks_file else None
        pem = _read(public_key, "public key") if public_key else None
        # Like `users add`: a new database only where one was named (--db, --config), never by default.
        with open_db(ctx, db_path, must_exist=not (db_path or database_named(ctx))) as db:
            now, gateway, by = who_acts(settings)
            client = smart.add_client(db, name, role, scopes, at=now, gateway=gateway, by=by, jwks=jwks,
                                      jwks_url=jwks_url, public_key_pem=pem, kid=kid)
    click.echo(f"client {client.client_id} added with role {client.role}; scopes: {' '.join(client.scopes)}")
    click.echo(f"keys: {client.keys}")
    click.echo(f"token endpoint: {smart.token_endpoint(settings)} (aud of its client assertions)")


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool, db_path: str | None) -> None:
    """List the backend clients: role, scopes, keys, when added, whether disabled."""
    with one_line_errors():
        with open_db(ctx, db_path) as db:
            found = smart.list_clients(db)
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in found], ensure_ascii=False, indent=2))
        return
    for c in found:
        state = f"disabled {c.disabled}" if c.disabled else "active"
        click.echo(f"{c.client_id:<24} {c.role:<10} added {c.created}  {state}\n    scopes: {' '.join(c.scopes)}\n"
                   f"    keys: {c.keys}")


@clients.command("disable")
@click.argument("name")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def disable(ctx: click.Context, name: str, db_path: str | None) -> None:
    """Disable the backend client NAME: it gets no more tokens and its live ones stop working."""
    with one_line_errors():
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            now, gateway, by = who_acts(settings)
            client = smart.disable_client(db, name, at=now, gateway=gateway, by=by)
    click.echo(f"client {client.client_id} disabled at {client.disabled}; its access tokens no longer work")
