"""Command helpers shared by every product area: time options, one-line errors, options read from the environment,
and text from senders made safe for a terminal."""
from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from gateway.errors import ConfigError, GatewayError

__all__ = ["RECORD_NUMBER", "CST", "AwareDateTime", "AWARE", "Uscc", "USCC", "one_line_errors", "now_cst", "EnvOption",
           "printable", "note_database", "database_in_use"]

#: China Standard Time, given to "now" when a command is not told a time.
CST = _dt.timezone(_dt.timedelta(hours=8), "CST")

#: A record or row number as the database keeps them (a signed 64-bit integer): a larger one names nothing (it was an
#: "internal error": OverflowError), a usage error instead
RECORD_NUMBER = click.IntRange(1, 2**63 - 1)


class AwareDateTime(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click stubs
    """An ISO 8601 date-time that carries its UTC offset (``2026-11-22T10:00:00+08:00``)."""

    name = "datetime"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> _dt.datetime:
        if isinstance(value, _dt.datetime):
            return value
        try:
            parsed = _dt.datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date-time", param, ctx)
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            self.fail(f"{value!r} has no UTC offset (write e.g. 2026-11-22T10:00:00+08:00)", param, ctx)
        return parsed


AWARE = AwareDateTime()


class Uscc(click.ParamType):  # type: ignore[type-arg]
    """A 统一社会信用代码 (GB 32100 checked, upper-cased): a filter naming a code that cannot exist is a mistake to
    say, not a query that finds nothing."""

    name = "uscc"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from gateway.errors import IdentifierError
        from gateway.identifiers import check_uscc

        try:
            return check_uscc(str(value))
        except IdentifierError as exc:
            self.fail(str(exc), param, ctx)


USCC = Uscc()


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Gateway errors as one readable line: exit 2 for configuration problems (said so, as the ``gateway``
    command says it), 1 otherwise."""
    try:
        yield
    except ConfigError as exc:
        err = click.ClickException(f"configuration: {exc}")
        err.exit_code = 2
        raise err from None
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from None


def now_cst() -> _dt.datetime:
    """The current time in China Standard Time, to the second."""
    return _dt.datetime.now(CST).replace(microsecond=0)


class EnvOption(click.Option):
    """An option that may come from an environment variable (``envvar``): a bad value is said to be the variable's
    (``Invalid value for 'GATEWAY_DATABASE' (environment variable)``) when the variable gave it, not the flag's, which
    the user never typed."""

    def consume_value(self, ctx: click.Context, opts: Any) -> Any:
        value, source = super().consume_value(ctx, opts)
        ctx.meta[f"gateway.source.{self.name}"] = source  # (kept for this invocation only)
        return value, source

    def get_error_hint(self, ctx: click.Context | None) -> str:
        if (ctx is not None and isinstance(self.envvar, str)
                and ctx.meta.get(f"gateway.source.{self.name}") is ParameterSource.ENVIRONMENT):
            return f"'{self.envvar}' (environment variable)"
        return super().get_error_hint(ctx)


#: Characters a terminal acts on rather than shows: C0 and C1 controls and DEL (ESC [ ... m colours, ESC ] 0;...
#: BEL retitles the window, a carriage return overwrites the line), and the bidirectional overrides that show
#: text in another order than it is.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` safe to print on an operator's terminal: what a sender put in a field (a control id, a sender name, a
    reason quoting its values) is shown, never obeyed; each control character is written escaped (``\\x1b``)."""
    return _UNPRINTABLE.sub(_escaped, str(text))


#: Where a command notes the database it opens (``ctx.meta``, shared by every context of one invocation), so that a
#: database error names that file.
_DATABASE_KEY = "gateway.database"


def note_database(ctx: click.Context, locator: str | Path, *, chosen: bool = True) -> None:
    """Note the database this command uses: ``chosen`` (its ``--db``) wins over the configured one."""
    if chosen:
        ctx.meta[_DATABASE_KEY] = locator
    else:
        ctx.meta.setdefault(_DATABASE_KEY, locator)


def database_in_use(ctx: click.Context) -> str | Path | None:
    """The database this command used (:func:`note_database`), if it said."""
    found: str | Path | None = ctx.meta.get(_DATABASE_KEY)
    return found
