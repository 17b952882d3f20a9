"""CLI: the ``gateway`` command.

Global options set the layered settings (defaults < ``--config``/``GATEWAY_CONFIG``
TOML < ``GATEWAY_*`` env < flags). Any :class:`~gateway.errors.GatewayError`
reaches the user as one readable line and a non-zero exit (2 for
configuration errors); never as a stack trace. Neither does anything
unexpected: it is one line naming what went wrong, and ``GATEWAY_DEBUG=1``
shows the traceback for a bug report.
"""
from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any

import click

from gateway import __version__, jsonutil
from gateway.commands.common import RECORD_NUMBER, EnvOption, database_in_use, note_database, printable
from gateway.config import Settings, load_settings, settings_help
from gateway.errors import ConfigError, GatewayError
from gateway.store import db as _db

__all__ = ["cli", "main"]


def _database_refusals() -> tuple[type[BaseException], ...]:
    """What a database answers when it cannot be used as configured, not for a fault of the gateway: a SQLite file
    that is not a database (or is damaged), a PostgreSQL role without rights, a schema or database that does not
    exist. (Evaluated only once an exception is being handled: nothing is imported for it otherwise.)"""
    import sqlite3

    kinds: list[type[BaseException]] = [sqlite3.DatabaseError]
    pg = sys.modules.get("psycopg")
    if pg is not None:
        errors = pg.errors
        kinds += [errors.InsufficientPrivilege, errors.InvalidSchemaName, errors.InvalidCatalogName,
                  errors.UndefinedTable]
    return tuple(kinds)


def _a_fault(exc: BaseException) -> bool:
    """A SQLite error that means a fault of the gateway (a constraint, a misuse), not a database it cannot use."""
    import sqlite3

    return isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError))


#: SQLite's primary result codes (``sqlite_errorcode & 0xFF``) that :func:`database_error` words: a passing state
#: (another process holds the database), and what stays until someone acts (permissions, a read-only file or mount,
#: a full disk, a file it cannot open, a damaged file, another program's file).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = (
    3, 8, 10, 11, 13, 14, 26)


def database_error(exc: BaseException, locator: str | Path | None, *,
                   exit_code: int | None = None) -> click.ClickException:
    """A database that cannot be used, as one line naming it and the real cause: "try again" only for what passes
    by itself (a SQLite file locked by another writer, a PostgreSQL server away); permissions, a read-only file or
    file system, a full disk, a damaged file or another program's are said as such.

    ``locator`` is the database the command opened (None: not known; the line says "the database"). Exit status 2
    when the database is where this user cannot open or write it (configuration, as `gateway serve` says it), else
    1; ``exit_code`` says otherwise.
    """
    import sqlite3

    from gateway.store.db import describe, unwritable

    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    named = f"the database {describe(locator)}" if locator is not None else "the database"
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        text = f"{named} is in use by another process ({reason}); try again"
    elif primary in (_SQLITE_READONLY, _SQLITE_PERM):
        blocked = unwritable(locator) if locator is not None else []
        which = f": this user cannot write {', '.join(blocked)}" if blocked else ""
        text = (f"{named} cannot be written ({reason}){which}; give this user write permission on the file and its "
                "folder, or mount its file system read-write")
    elif primary == _SQLITE_FULL:
        text = f"{named} cannot be written ({reason}): free space on the disk where it lives"
    elif primary == _SQLITE_CANTOPEN:
        text = (f"{named} cannot be opened ({reason}): check that the file and its folder exist and that this user "
                "may read and write them")
    elif primary == _SQLITE_IOERR:
        text = f"{named} cannot be read or written ({reason}): the disk or file system it lives on failed"
    elif primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        text = f"{named} cannot be used: {reason}"
    elif isinstance(exc, sqlite3.Error):  # another program's tables, a missing table: not something that passes
        text = f"{named} cannot be used ({reason})"
    elif isinstance(exc, _db.OperationalError):  # a PostgreSQL server gone, restarting or refusing connections
        text = f"{named} cannot be used right now ({reason}); try again"
    else:  # a PostgreSQL role without rights, a schema or database that does not exist
        text = f"{named} cannot be used: {reason}"
    err = click.ClickException(text)
    err.exit_code = exit_code if exit_code is not None else (
        2 if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN) else 1)
    return err


def unusable_database(exc: BaseException) -> bool:
    """Whether ``exc`` says that a database cannot be used (:func:`database_error` words it), not a fault of the
    gateway."""
    return isinstance(exc, _db.OperationalError + _database_refusals()) and not _a_fault(exc)


def _internal(ctx: click.Context, exc: BaseException) -> click.ClickException:
    """A fault of the gateway, as one line with a hint and no detail."""
    return click.ClickException(f"internal error ({type(exc).__name__}) in `gateway {ctx.invoked_subcommand}`; "
                                "rerun with GATEWAY_DEBUG=1 to see where, and report it")


def _debug() -> bool:
    """Whether ``GATEWAY_DEBUG`` asks for tracebacks (:func:`gateway.logs.debug_wanted`)."""
    from gateway.logs import debug_wanted

    return debug_wanted()


class _Group(click.Group):
    """Turns gateway errors, and anything unexpected, into one-line CLI errors; loads a product area's commands
    when they are used (:data:`AREAS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *AREAS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in AREAS:
            found = _area_command(cmd_name)
            self.add_command(found, cmd_name)
        return found

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            err = click.ClickException(f"configuration: {exc}")
            err.exit_code = 2
            raise err from None
        except GatewayError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except _db.OperationalError as exc:  # locked by another writer for too long, read-only, full, gone
            if _debug():
                raise
            raise database_error(exc, database_in_use(ctx)) from None
        except _database_refusals() as exc:  # a file that is not a database; a role without rights on the tables
            if _debug():
                raise
            if _a_fault(exc):
                raise _internal(ctx, exc) from None
            raise database_error(exc, database_in_use(ctx)) from None
        except BrokenPipeError:  # the reader went away (`gateway messages list | head`): what it read is all it
            # wanted; click stops quietly (its own handling of EPIPE: exit 1, nothing more written)
            raise
        except UnicodeDecodeError as exc:  # a file given that is not text in the encoding it must be in (the files
            # the gateway reads name themselves when they are not: this is the last resort)
            if _debug():
                raise
            err = click.ClickException(f"a file given is not {exc.encoding.upper()} text ({exc.reason} at byte "
                                       f"{exc.start}): save it as {exc.encoding.upper()}")
            err.exit_code = 2
            raise err from None
        except OSError as exc:
            if _debug():
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or type(exc).__name__}") from None
        except Exception as exc:  # a bug: one line, not a traceback (GATEWAY_DEBUG=1 shows it)
            if _debug():
                raise
            logging.getLogger(__name__).debug("unexpected error", exc_info=True)
            raise _internal(ctx, exc) from None


_SETTING_FLAGS = ("data_dir", "database", "issuer_uscc", "issuer_name", "mappings_dir", "log_level")


def get_settings(ctx: click.Context, *, service: bool = False, **flags: Any) -> Settings:
    """Settings for a command: the group's flags plus the command's own.

    Logging follows ``log_level`` for the long-running service; one-shot
    commands log warnings only unless ``--log-level`` is given, so that their
    stderr stays one line per problem.
    """
    root = ctx.find_root()
    overrides = dict(root.obj.get("overrides", {}))
    overrides.update({k: v for k, v in flags.items() if v is not None})
    settings = load_settings(root.obj.get("config"), overrides)
    note_database(ctx, settings.database_locator, chosen=False)  # (a command's --db, noted by it, wins)
    level = settings.log_level if service or "log_level" in overrides else "WARNING"
    from gateway.logs import TextFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    return settings


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="gateway")
@click.option("--config", "config", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_CONFIG",
              help="TOML settings file (also GATEWAY_CONFIG).")
@click.option("--data-dir", help="Directory of the gateway's files and its SQLite database (GATEWAY_DATA_DIR).")
@click.option("--database", help="SQLite database file or postgresql:// URL (GATEWAY_DATABASE).")
@click.option("--issuer-uscc", help="统一社会信用代码 of this member (GATEWAY_ISSUER_USCC).")
@click.option("--issuer-name", help="Name of this member institution (GATEWAY_ISSUER_NAME).")
@click.option("--mappings-dir", type=click.Path(file_okay=False), help="Mapping tables directory.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging level (GATEWAY_LOG_LEVEL).")
@click.pass_context
def cli(ctx: click.Context, /, config: str | None, **flags: Any) -> None:
    """川渝 result-recognition gateway: lab and exam results from hospital and CDC
    systems into signed FHIR R4, recognised (互认) across member institutions.

    Start with `gateway demo`. Settings come from defaults, a TOML file
    (--config), GATEWAY_* environment variables and these flags, in that order.
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["overrides"] = {k: (v.upper() if k == "log_level" and v else v) for k, v in flags.items()
                            if v is not None}


@cli.command()
@click.option("--http-host", help="Address of the HTTP API.")
@click.option("--http-port", type=int, help="Port of the HTTP API.")
@click.option("--mllp-host", help="Address of the MLLP listener.")
@click.option("--mllp-port", type=int, help="Port of the MLLP listener (0: no MLLP).")
@click.option("--workers", type=int, help="HTTP worker processes.")
@click.option("--threads", type=int, help="Threads per HTTP worker.")
@click.option("--mllp-ack", type=click.Choice(["processed", "received"]),
              help="Answer MLLP messages once processed (the outcome in the ACK) or once stored (accept, then "
                   "process; see `gateway settings`).")
@click.pass_context
def serve(ctx: click.Context, /, **flags: Any) -> None:
    """Run this member gateway: HTTP API, MLLP listener, queue reader and background work, supervised.

    A process that dies is restarted (logged at WARNING); more than
    restart_limit restarts within 10 minutes and the whole gateway stops with
    a non-zero exit. A port in use is one line on stderr and exit 2. SIGTERM
    or Ctrl-C stops everything.
    """
    from gateway.serve import AlreadyServing, LeftOver, PortInUse
    from gateway.serve import serve as run
    from gateway.store.db import describe

    settings = get_settings(ctx, service=True, **flags)
    _check_listen_host(settings.http_host, "http_host")
    if settings.mllp_port:
        _check_listen_host(settings.mllp_host, "mllp_host")
    banner = (f"gateway {__version__} for {settings.issuer_name} ({settings.issuer_uscc}): "
              f"HTTP {settings.http_host}:{settings.http_port}, "
              + (f"MLLP {settings.mllp_host}:{settings.mllp_port} (ACK when {settings.mllp_ack})"
                 if settings.mllp_port else "MLLP off")
              + f", database {describe(settings.database_locator)}")
    try:
        code = run(settings, announce=lambda: _announce(settings, banner))
    except (PortInUse, AlreadyServing) as exc:
        click.echo(f"gateway: {exc}", err=True)
        ctx.exit(2)
    except LeftOver as exc:
        click.echo(f"gateway: {exc}", err=True)
        ctx.exit(1)
    if code:
        ctx.exit(code)


def _check_listen_host(host: str, setting: str) -> None:
    """Refuse, as what it is, an address to listen on that is no address of this machine: a name that does not
    resolve, or an address another machine has (said before the ports are bound, where it read as a port in use).

    :raises ConfigError: so (exit 2).
    """
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))  # (any free port: only the address is asked about)
    except socket.gaierror as exc:
        raise ConfigError(f"{host!r} is not a name this machine can resolve ({exc.strerror}): listen on one of this "
                          "machine's addresses (127.0.0.1, 0.0.0.0 for all of them) or a name that resolves to one",
                          setting) from None
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"{host} is not an address of this machine: listen on one of its own addresses "
                              "(127.0.0.1, 0.0.0.0 for all of them)", setting) from None
        # (anything else is said when the port itself is bound, naming the port)


def _announce(settings: Settings, banner: str) -> None:
    """Say that the gateway is up: the banner as a line of the log's own format (with ``log_format = "json"`` every
    line on stderr is a JSON object a log collector can read), whatever ``log_level``."""
    if settings.log_format == "json":
        from gateway.logs import JsonFormatter

        record = logging.LogRecord("gateway.serve", logging.INFO, __file__, 0, banner, None, None)
        click.echo(JsonFormatter("serve").format(record), err=True)
    else:
        click.echo(banner, err=True)


def _open_input(path: str) -> tuple[IO[bytes], str, int]:
    """A binary stream of the input, its name and its size in bytes (0 when unknown)."""
    if path == "-":
        return sys.stdin.buffer, "<stdin>", 0
    try:
        return open(path, "rb"), path, Path(path).stat().st_size
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read: {exc.strerror}") from None


class _Progress(io.RawIOBase):
    """Counts the bytes read from a stream so that progress can be shown while a large file streams."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw, self.done = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[:len(data)] = data
        self.done += len(data)
        return len(data)

    def seekable(self) -> bool:  # (a file is looked through once before it is read: HL7 v2's framing)
        return bool(self.raw.seekable())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.done = self.raw.seek(offset, whence)
        return self.done

    def tell(self) -> int:
        return int(self.raw.tell())


#: Input formats of ``convert`` (one channel each in gateway.pipeline); an unknown one is refused by the pipeline
#: with the list it supports, as one error line.
FORMATS = ("hl7v2", "cda", "cdc-csv", "service-report")
#: How many times ``convert`` prints a warning said the same way before it only counts it.
WARNINGS_SHOWN = 3


@cli.command()
@click.option("--format", "fmt", metavar="[" + "|".join(FORMATS) + "]", default="hl7v2", show_default=True,
              help="Input format: hl7v2 (ORU^R01), cda (WS/T 500.7 检验报告), cdc-csv (职业健康检查 export), "
                   "service-report (职业卫生/放射卫生 technical-service report: a JSON metadata file whose pdf_file "
                   "names the PDF beside it).")
@click.option("--pretty", is_flag=True, help="Indent the JSON (one Bundle then spans several lines).")
@click.option("--every-warning", is_flag=True,
              help=f"Print every warning; by default a warning said the same way (an unmapped local code on every "
                   f"row) is printed {WARNINGS_SHOWN} times, then counted in one line at the end.")
@click.argument("files", nargs=-1, required=True)
@click.pass_context
def convert(ctx: click.Context, fmt: str, pretty: bool, every_warning: bool, files: tuple[str, ...]) -> None:
    """Convert FILES (or - for stdin) to FHIR R4 Bundles, one JSON line each. Stores nothing.

    Problems go to stderr, one line each, naming the message, document or
    exam and the field, XPath or row and column; exit status 1 if any was
    refused. Good units of the same file are still converted. QC/calibration
    messages are reported as filtered. A file that cannot be read (missing, a
    folder, no permission, not text) is named on one line and the others are
    still converted; a last line says how many could not be read (exit 1).
    Files are read as streams (a large CSV export or HL7 v2 file converts in
    constant memory; HL7 v2 from a pipe is read whole); on a terminal,
    progress is shown by the bytes read. Every error is printed; a warning
    said the same way many times is printed a few times, then counted
    (--every-warning prints them all).
    """
    from gateway.commands import hl7stream
    from gateway.pipeline import Pipeline, Status

    settings = get_settings(ctx)
    pipeline = Pipeline(settings)
    try:
        adapter = pipeline.channel(fmt).adapter  # an unknown format is an error before any file is read
    except GatewayError as exc:  # (bad input: exit 2, as click says any other bad option)
        raise click.BadParameter(exc.message, ctx, param_hint="'--format'") from None
    if fmt == "hl7v2" and getattr(adapter, "split_stream", None) is None:
        # HL7 v2 cut into messages as the file is read, as the pipeline cuts a CSV export: memory does not grow
        # with the file, and progress is the bytes read (the messages are those the adapter's split gives)
        setattr(adapter, "split_stream", hl7stream.units)  # (HL7v2Adapter.split_stream, once it has one)
    failed = converted = filtered = 0
    tty = sys.stderr.isatty()
    # HL7 v2 locations read "OBX[3]-5 msg"; XPaths and CSV columns read better with a colon before the message.
    sep = " " if fmt == "hl7v2" else ": "
    repeated = _RepeatedWarnings(None if every_warning else WARNINGS_SHOWN)
    unreadable = 0
    for path in files:
        try:
            raw, origin, size = _open_input(path)
            if fmt == "service-report" and path != "-":  # the metadata file names its PDF beside it
                raw.close()
                from gateway.adapters.servicereport import pack_metadata_file

                packed = pack_metadata_file(Path(path))
                raw, size = io.BytesIO(packed), len(packed)
        except (click.ClickException, OSError, UnicodeDecodeError, GatewayError) as exc:
            click.echo(f"Error: {_unreadable(path, exc)}", err=True)
            unreadable += 1
            continue
        counter = _Progress(raw)
        stream = io.BufferedReader(counter, buffer_size=1 << 16)
        shown = 0.0
        units = 0
        try:
            for outcome in pipeline.convert(stream, fmt, origin):
                units += 1
                prefix = f"{origin}: {outcome.label}" if len(files) > 1 else outcome.label
                lines = []
                for issue in outcome.issues:
                    level = "" if issue.severity == "error" else f"{issue.severity}: "
                    where = f"{issue.location}{sep}" if issue.location else ""
                    if issue.severity == "error" or repeated.shown(issue.severity, issue.message):
                        lines.append(f"{level}{prefix}: {where}{issue.message}")
                if outcome.status is Status.FILTERED:
                    lines.append(f"filtered: {prefix}: {outcome.filtered_reason}")
                if tty and lines:
                    click.echo("\r\x1b[K", nl=False, err=True)  # clear the progress line first
                for line in lines:
                    click.echo(line, err=True)
                if outcome.status is Status.FILTERED:
                    filtered += 1
                elif outcome.bundle is not None:
                    converted += 1
                    text = jsonutil.dumps_pretty(outcome.bundle) if pretty else jsonutil.dumps(outcome.bundle)
                    click.echo(text)
                else:
                    failed += 1
                now = time.monotonic()
                if tty and now - shown >= 0.2:
                    shown = now
                    pct = f"{100 * counter.done // size}% " if size else ""
                    click.echo(f"\r{origin}: {pct}{converted} converted, {failed} refused", nl=False, err=True)
        except UnicodeDecodeError as exc:  # (a file that is not text: named by the adapters, this is the last resort)
            if tty:
                click.echo("\r\x1b[K", nl=False, err=True)
            click.echo(f"Error: {_unreadable(path, exc)}", err=True)
            unreadable += 1
            continue
        finally:
            if raw is not sys.stdin.buffer:
                raw.close()
        if tty:
            click.echo("\r\x1b[K", nl=False, err=True)
        if not units:  # an empty file, blank lines, a byte order mark or a header alone: nothing was converted
            click.echo(f"{origin}: no {fmt} message or exam in it (empty, or a header alone)", err=True)
            failed += 1
    for line in repeated.summary():
        click.echo(line, err=True)
    counts = f"{converted} converted, {failed} refused, {filtered} filtered"
    if unreadable and len(files) > 1:  # (one file given: its own line says it)
        click.echo(f"{unreadable} of {len(files)} files could not be read; {counts}", err=True)
    elif tty:
        click.echo(counts, err=True)
    if failed or unreadable:
        ctx.exit(1)


def _unreadable(path: str, exc: BaseException) -> str:
    """Why a file given to ``convert`` could not be read, as one line naming it."""
    if isinstance(exc, click.ClickException):
        return exc.message
    if isinstance(exc, UnicodeDecodeError):
        return (f"{path}: not {exc.encoding.upper()} text ({exc.reason} at byte {exc.start}): save it as "
                f"{exc.encoding.upper()}")
    if isinstance(exc, OSError):
        return f"{path}: cannot read: {exc.strerror or type(exc).__name__}"
    return f"{path}: {exc}"


class _RepeatedWarnings:
    """Counts the warnings said the same way (severity and text, wherever they were): the first ``limit`` are
    printed, the others counted and summed up at the end. Bounded: past 10,000 different texts every warning is
    printed (nothing is lost, only not summed)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.counts: dict[tuple[str, str], int] = {}

    def shown(self, severity: str, message: str) -> bool:
        if self.limit is None:
            return True
        key = (severity, message)
        seen = self.counts.get(key, 0) + 1
        if seen == 1 and len(self.counts) >= 10_000:
            return True
        self.counts[key] = seen
        return seen <= self.limit

    def summary(self) -> list[str]:
        limit = self.limit or 0
        return [f"{severity}: {n - limit} more of: {message}" for (severity, message), n in self.counts.items()
                if n > limit]


@cli.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False),
              help="Keep the demo's databases here (default: a temporary directory, removed afterwards).")
@click.pass_context
def demo(ctx: click.Context, workdir: str | None) -> None:
    """Run the whole story on this machine, no services needed.

    Member gateways of a Sichuan county hospital and a Chongqing tertiary
    hospital take real-shaped HL7 v2 results over MLLP and HTTP on loopback,
    store them as FHIR, refuse bad ones with reasons, and answer searches.
    """
    from gateway.demo import run_demo

    settings = get_settings(ctx)
    run_demo(workdir, mappings_dir=settings.mappings_dir)


@cli.group()
def mappings() -> None:
    """Mapping tables (mappings/): check them."""


@mappings.command("check")
@click.pass_context
def mappings_check(ctx: click.Context) -> None:
    """Load and check every mapping table; list them. Exit 2 on any problem."""
    from gateway.mapping.tables import load_mappings

    settings = get_settings(ctx)
    loaded = load_mappings(settings.mappings_dir)
    if not loaded.summary():  # (the adapters would refuse to start: say so now)
        raise ConfigError(f"{settings.mappings_dir} holds no mapping tables (*.yaml structures, concepts/*.csv)",
                          "mappings_dir")
    for table_id, version, path, entries in loaded.summary():
        click.echo(f"{table_id:24} {version:8} {entries:5} entries  {path}")
    click.echo(f"{len(loaded.summary())} tables OK")


@cli.group()
def messages() -> None:
    """Messages received: what was stored, filtered or refused, and why."""


@messages.command("list")
@click.option("--status", type=click.Choice(["received", "queued", "stored", "filtered", "refused", "failed"]),
              help="Only messages with this status (queued: answered on receipt, waiting to be worked).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True, help="How many, newest first.")
@click.pass_context
def messages_list(ctx: click.Context, status: str | None, limit: int) -> None:
    """List received messages, newest first. What senders wrote (control ids, reasons quoting their values) is
    shown with control characters escaped (\\x1b), never sent to the terminal as they are."""
    store = _existing_store(ctx)
    for rec in store.list_messages(status, limit):
        # the reason a message was not stored: its first error (a warning listed before it is not why)
        errors = [i for i in rec.issues if i.get("severity") in ("error", "fatal")] or rec.issues
        first = errors[0] if errors and rec.status != "stored" else {}
        reason = " ".join(p for p in (str(first.get("location") or ""), str(first.get("message") or "")) if p)
        click.echo(printable(f"{rec.id:6} {rec.received_at[:19]} {rec.channel:5} {rec.format:7} "
                             f"{rec.message_id:20} {rec.status:9} {rec.ack_code or '':3} {reason}"))


def _existing_store(ctx: click.Context) -> Any:
    """The configured database's store, refused when it is not there (a mistyped --data-dir is said, not answered
    from a new empty database), as every reading command refuses it."""
    from gateway.commands.audit import require_existing
    from gateway.store.store import Store

    locator = get_settings(ctx).database_locator
    require_existing(locator)
    return Store.open(locator)


@messages.command("show")
@click.argument("record_id", type=RECORD_NUMBER)
@click.option("--raw", is_flag=True, help="Print the message exactly as received (may contain patient data).")
@click.pass_context
def messages_show(ctx: click.Context, record_id: int, raw: bool) -> None:
    """Show one message: stages, issues and answer. What the sender wrote is shown with control characters
    escaped (\\x1b); --raw prints the bytes exactly as received."""
    store = _existing_store(ctx)
    if raw:
        data = store.raw_of(record_id)
        _raw_viewed(ctx, store, record_id, data)
        sys.stdout.buffer.write(data)
        return
    rec = store.get_message(record_id)
    lines = [f"message {rec.id}: {rec.format} {rec.message_id} from {rec.sender} via {rec.channel} "
             f"({rec.size} bytes, sha256 {rec.sha256[:16]}...)",
             f"status {rec.status}, answer {rec.ack_code}, bundle {rec.bundle_id or '-'}"]
    if rec.lease_owner or rec.status == "received":
        lines.append(_holder_line(rec, store.epoch()))
    lines += [f"  {stage['at'][:23]} {stage['stage']:8} {stage['status']} {stage['detail']}"
              for stage in store.stages_of(record_id)]
    for issue in rec.issues:  # (a message that names its place itself says it once)
        place, said = str(issue["location"] or ""), str(issue["message"])
        lines.append(f"  {issue['severity']}: {said if not place or said.startswith(place) else place + ' ' + said}")
    for line in lines:
        click.echo(printable(line))


def _raw_viewed(ctx: click.Context, store: Any, record_id: int, data: bytes) -> None:
    """A message's raw bytes (patient data) read on the command line are written to the audit log, as the
    console's view of them is: who (the operating-system user on this host), when, which message, and a read
    naming each patient of the message (``gateway audit query patient:identifier=…`` lists it)."""
    from gateway.audit import records
    from gateway.audit.log import append_many
    from gateway.commands.audit import raw_viewed_records, who_acts
    from gateway.store.audit import audit_store
    from gateway.store.db import transaction

    at, gateway, by = who_acts(get_settings(ctx))
    with transaction(store.db):
        append_many(store.db, raw_viewed_records(
            store.db, record_id, data, at=at, gateway=gateway, user=by, client_address="command line",
            client=records.Party("gateway-cli", display="gateway command line"),
            server_address=audit_store(store.db).address()))


def _left_by(rec: Any, now: float) -> str:
    """Who a message not finished yet is with: ``being worked by process X`` while X is alive, else who left it."""
    from gateway.store.store import holder_state

    state = holder_state(rec.lease_owner, rec.lease_until, now)
    if state == "alive":
        return f"being worked by process {rec.lease_owner}"
    if not rec.lease_owner:
        return "left unfinished by a process that gave it up"
    return f"left by process {rec.lease_owner}, " + ("which is gone" if state == "gone" else "whose lease expired")


def _holder_line(rec: Any, now: float) -> str:
    """Who works a message not finished yet: its process while alive, else who left it and what becomes of it."""
    who = _left_by(rec, now)
    if who.startswith("being worked"):
        return f"{who} (attempt {rec.attempts})"
    return (f"{who} (attempt {rec.attempts}); it is worked again by the background loop of `gateway serve`, "
            f"or now by `gateway messages retry {rec.id}`")


@messages.command("retry")
@click.argument("record_ids", type=RECORD_NUMBER, nargs=-1)
@click.option("--failed", "all_failed", is_flag=True, help="Every failed message (oldest first).")
@click.pass_context
def messages_retry(ctx: click.Context, record_ids: tuple[int, ...], all_failed: bool) -> None:
    """Work failed messages again from the raw input kept for them; record and audit each new outcome.

    A message left unfinished (``received``) by a process that is gone, or
    whose lease expired, is worked again too. One line per message: its id,
    its status before and after. Exit status 1 if any could not be worked
    again (an unknown id, a message that is neither failed nor left
    unfinished, or one being worked right now).
    """
    import getpass

    from gateway.pipeline import Pipeline

    from gateway.commands.audit import require_existing

    if not record_ids and not all_failed:
        raise click.UsageError("name the messages to work again (IDs), or give --failed")
    settings = get_settings(ctx)
    require_existing(settings.database_locator)  # (no new empty database for a mistyped --data-dir)
    pipeline = Pipeline(settings)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this OS user (a container's bare uid)
        user = "cli"
    ids = list(record_ids)
    if all_failed:
        ids += sorted(rec.id for rec in pipeline.store.list_messages("failed", limit=1_000_000)
                      if rec.id not in ids)
    if not ids:
        click.echo("no failed messages")
    problems = 0
    try:
        for record_id in ids:
            try:
                before = pipeline.store.get_message(record_id)
                left = _left_by(before, pipeline.store.epoch()) if before.status == "received" else ""
                outcome = pipeline.retry(record_id, user)
            except GatewayError as exc:
                click.echo(printable(f"message {record_id}: {exc.message}"), err=True)
                problems += 1
                continue
            left = f" ({left})" if left else ""
            click.echo(f"message {record_id}: {before.status} -> {outcome.status.value} {outcome.ack_code}".rstrip()
                       + left)
    finally:
        pipeline.close()
    if problems:
        ctx.exit(1)


@cli.command("settings")
@click.pass_context
def settings_cmd(ctx: click.Context) -> None:
    """List every setting with its default and meaning."""
    get_settings(ctx)  # a configuration given (--config, GATEWAY_*) that cannot be used is refused, as elsewhere
    for name, default, text in settings_help():
        click.echo(f"{name:20} GATEWAY_{name.upper():22} default {default}\n{'':20} {text}")


#: Commands of the product areas, each in gateway/commands/: name -> (module, attribute). A module is imported
#: only when its command runs (or ``--help`` lists them all), so that every command starts without loading the
#: others' dependencies (the web framework, the registry's schema checks, the benchmark).
AREAS: dict[str, tuple[str, str]] = {
    "keys": ("gateway.commands.signing", "keys"),
    "sign": ("gateway.commands.signing", "sign"),
    "verify": ("gateway.commands.signing", "verify"),
    "registry": ("gateway.commands.registry", "registry"),
    "recognize": ("gateway.commands.recognize", "recognize"),
    "decisions": ("gateway.commands.recognize", "decisions"),
    "validate": ("gateway.commands.validate", "validate"),
    "audit": ("gateway.commands.audit", "audit"),
    "users": ("gateway.commands.users", "users"),
    "clients": ("gateway.commands.clients", "clients"),  # SMART backend clients
    "send": ("gateway.commands.exchange", "send"),
    "lookup": ("gateway.commands.exchange", "lookup"),  # 调阅 at another member
    "outbox": ("gateway.commands.exchange", "outbox"),
    "referrals": ("gateway.commands.referrals", "referrals"),  # 移送 of violations to authorities
    "bench": ("gateway.commands.bench", "bench"),
    "db": ("gateway.commands.db", "db"),  # the database's layout
}


def _area_command(name: str) -> click.Command:
    """The command ``name`` of :data:`AREAS`, its module imported now."""
    import importlib

    module, attribute = AREAS[name]
    command: click.Command = getattr(importlib.import_module(module), attribute)
    if name == "registry" and isinstance(command, click.Group):  # the authority's key and certificate commands
        from gateway.commands import signing

        for extra in (signing.issue_cert, signing.init_authority):
            if extra.name not in command.commands:
                command.add_command(extra)
    return command


def main() -> None:  # pragma: no cover - console entry
    cli()
