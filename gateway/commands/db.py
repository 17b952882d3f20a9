"""``gateway db``: the gateway's database — its layout and where it is."""
from __future__ import annotations

from contextlib import closing

import click

from gateway.commands.common import one_line_errors

__all__ = ["db"]


@click.group()
def db() -> None:
    """The gateway's database (SQLite file or PostgreSQL): create or upgrade its tables, show its layout, check that
    the file is sound."""


def _open(ctx: click.Context, locator: str | None, *, readonly: bool = False) -> object:
    from gateway.cli import get_settings
    from gateway.store.db import connect

    return connect(locator or get_settings(ctx).database_locator, readonly=readonly)


@db.command()
@click.option("--db", "locator", metavar="PATH|URL", help="A database other than the configured one.")
@click.pass_context
def upgrade(ctx: click.Context, locator: str | None) -> None:
    """Create the tables that are missing and bring older layouts up to date (idempotent).

    `gateway serve` does the same at start; run it before starting several nodes of a new release,
    or to create a PostgreSQL database's tables ahead of the first start."""
    from gateway.cli import get_settings
    from gateway.store import layout
    from gateway.store.db import describe

    with one_line_errors():
        database = _open(ctx, locator)
        with closing(database.conn):  # type: ignore[attr-defined]
            layout.check_layouts(database)  # (a database this release cannot work on: said before anything else)
            where = describe(locator or get_settings(ctx).database_locator)
            click.echo(f"database: {where} ({layout.engine(database)})")
            versions = layout.upgrade(database, progress=lambda part: click.echo(f"  {part} ...", err=True))
        for part, number in versions:
            click.echo(f"  {part:<12} layout {number}")
        click.echo("up to date")


@db.command()
@click.option("--db", "locator", metavar="PATH|URL", help="A database other than the configured one.")
@click.pass_context
def status(ctx: click.Context, locator: str | None) -> None:
    """Which database the gateway uses, its engine, and the layout version of each part."""
    from pathlib import Path

    from gateway.cli import get_settings
    from gateway.store import layout
    from gateway.store.db import describe, is_postgresql

    with one_line_errors():
        target = locator or get_settings(ctx).database_locator
        if not is_postgresql(target) and not Path(target).exists():
            raise click.ClickException(f"{target}: no such database (gateway db upgrade creates it)")
        database = _open(ctx, locator, readonly=True)  # asking changes nothing
        with closing(database.conn):  # type: ignore[attr-defined]
            click.echo(f"database: {describe(target)} ({layout.engine(database)})")
            versions = layout.status(database)
        if not versions:
            click.echo("  no layout recorded (gateway db upgrade creates the tables)")
        for part, number in versions:
            click.echo(f"  {part:<12} layout {number}")


@db.command()
@click.option("--db", "locator", metavar="PATH|URL", help="A database other than the configured one.")
@click.option("--full", is_flag=True, help="Also compare every index with its table (slower: minutes on a large "
                                           "database).")
@click.pass_context
def check(ctx: click.Context, locator: str | None, full: bool) -> None:
    """Whether the SQLite file is sound (SQLite's quick_check; --full its integrity_check): after a restore, a disk
    error or a crash. Exit 0: ok; 1: damaged (the problems SQLite names, at most 100). Reads only; run it with the
    gateway stopped or running. On PostgreSQL, which checks its pages as it reads them, it says so and exits 0."""
    from pathlib import Path

    from gateway.cli import get_settings
    from gateway.store import layout
    from gateway.store.db import describe, is_postgresql

    with one_line_errors():
        target = locator or get_settings(ctx).database_locator
        if not is_postgresql(target) and not Path(target).exists():
            raise click.ClickException(f"{target}: no such database")
        if not is_postgresql(target) and Path(target).is_file() and Path(target).stat().st_size == 0:
            # (what a restore interrupted by a full disk leaves: SQLite takes it for a sound, new database)
            click.echo(f"database: {describe(target)}: empty (0 bytes), no database in it: restore it from a backup "
                       "(docs/operations.md, 'Backing up and restoring a SQLite member')")
            ctx.exit(1)
        database = _open(ctx, locator, readonly=True)
        with closing(database.conn):  # type: ignore[attr-defined]
            if layout.engine(database).startswith("PostgreSQL"):
                click.echo(f"database: {describe(target)}: PostgreSQL checks its own pages as it reads them (use "
                           "its amcheck extension for more); nothing to check here")
                return
            problems = layout.damage(database, full=full)
    if not problems:
        click.echo(f"database: {describe(target)}: ok ({'integrity_check' if full else 'quick_check'})")
        return
    click.echo(f"database: {describe(target)}: damaged, {len(problems)} problem(s) found:")
    for line in problems:
        click.echo(f"  {line}")
    click.echo("restore it from a backup (docs/operations.md, 'Backing up and restoring a SQLite member')")
    ctx.exit(1)
