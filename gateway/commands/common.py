"""Command helpers shared by every product area: time options and one-line errors."""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from gateway.errors import ConfigError, GatewayError

__all__ = ["CST", "AwareDateTime", "AWARE", "Uscc", "USCC", "one_line_errors", "now_cst"]

#: China Standard Time, given to "now" when a command is not told a time.
CST = _dt.timezone(_dt.timedelta(hours=8), "CST")


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
