"""Validate command: check FHIR JSON files against our implementation guide.

``gateway validate FILE...`` validates each file (one resource, or a Bundle and
each of its entries) against the base R4 shape and the profiles it names in
``meta.profile`` (plus any ``--profile``), and prints one OperationOutcome
holding every issue on stdout. With several files each issue names its file.
A one-line summary per file goes to stderr. Exit status: 0 no errors (warnings
allowed), 1 at least one error, 2 the guide itself cannot be loaded.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from gateway import jsonutil
from gateway.errors import ConfigError, Issue

__all__ = ["validate"]


def _profiles_dir(ctx: click.Context, given: str | None) -> str | None:
    """The guide to use: ``--profiles-dir``, else the settings of the ``gateway`` group (if mounted on it)."""
    if given:
        return given
    root = ctx.find_root()
    if isinstance(root.obj, dict) and "overrides" in root.obj:
        from gateway.cli import get_settings  # deferred: gateway.cli imports the commands

        return get_settings(ctx).profiles_dir
    return None


def _read(path: str) -> tuple[Any, list[Issue]]:
    """The parsed JSON of ``path`` (``-``: stdin), or the issue that stopped it being read."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        return None, [Issue("error", "exception", "", f"cannot be read: {exc.strerror}", extra={"rule": "input"})]
    try:
        # decimals stay Decimal: FHIR keeps their precision, and so does what we print back
        value = jsonutil.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, [Issue("error", "structure", "", "is not UTF-8 text (FHIR JSON is UTF-8)",
                            extra={"rule": "input"})]
    except ValueError as exc:
        return None, [Issue("error", "structure", "", f"is not JSON: {exc}", extra={"rule": "input"})]
    if jsonutil.nesting_depth(value) > jsonutil.MAX_DEPTH:
        return None, [Issue("error", "structure", "", f"is nested more than {jsonutil.MAX_DEPTH} levels deep",
                            extra={"rule": "input"})]
    return value, []


@click.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--profile", "profiles", multiple=True, metavar="URL",
              help="Also check against this profile (canonical URL or URL|version), whatever the files declare. "
                   "Repeatable.")
@click.option("--profiles-dir", type=click.Path(file_okay=False),
              help="Directory of the implementation guide (default: the profiles_dir setting, i.e. profiles/).")
@click.option("--compact", is_flag=True, help="Print the OperationOutcome on one line instead of indented.")
@click.pass_context
def validate(ctx: click.Context, files: tuple[str, ...], profiles: tuple[str, ...], profiles_dir: str | None,
             compact: bool) -> None:
    """Validate FHIR JSON FILES (or - for stdin) against the implementation guide.

    Prints one OperationOutcome with every issue (FHIRPath location, severity,
    message) and one summary line per file on stderr. Exit status 1 if any
    file has an error; warnings alone do not fail.
    """
    from gateway.fhir.outcome import operation_outcome  # the one OperationOutcome shape of the gateway
    from gateway.fhir.profiles import has_errors, load_guide

    try:
        guide = load_guide(_profiles_dir(ctx, profiles_dir))
    except ConfigError as exc:
        err = click.ClickException(f"implementation guide: {exc}")
        err.exit_code = 2
        raise err from None
    unknown = [p for p in profiles if not guide.is_profile(p)]
    if unknown:
        raise click.BadParameter(f"not a profile of this guide: {', '.join(unknown)}", param_hint="--profile")

    everything: list[Issue] = []
    failed = False
    for path in files:
        resource, issues = _read(path)
        if not issues:
            issues = guide.validate(resource, profiles)
        if len(files) > 1:  # the shared renderer puts the label in front of each issue's text
            issues = [Issue(i.severity, i.code, i.location, i.message, i.hl7_error, {**i.extra, "label": path})
                      for i in issues]
        errors = sum(1 for i in issues if i.severity in ("error", "fatal"))
        warnings = sum(1 for i in issues if i.severity == "warning")
        failed = failed or has_errors(issues)
        name = "<stdin>" if path == "-" else path
        if errors or warnings:
            click.echo(f"{name}: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}",
                       err=True)
        else:
            click.echo(f"{name}: OK", err=True)
        everything.extend(issues)
    outcome = operation_outcome(everything)
    click.echo(jsonutil.dumps(outcome) if compact else jsonutil.dumps_pretty(outcome))
    if failed:
        ctx.exit(1)
