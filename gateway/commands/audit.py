"""Audit commands: ``gateway audit verify|query|export|stats|checkpoint|tail``.

The auditor's workflow on the command line (the HTTP API offers the same reads):

- ``gateway audit verify [--db PATH] [--trust PEM] [--checkpoint FILE]``: walk the
  hash chain and the signed checkpoints, whose signatures are checked with the
  configured trust (registry authority, snapshot, this member's certificate);
  name the first entry changed, removed or reordered and any forged checkpoint;
  exit 1 if anything is wrong, 3 if checkpoints cannot be vouched for;
- ``gateway audit query date=ge2026-01 type=lab-recognition``: FHIR search
  parameters exactly as ``GET /fhir/AuditEvent`` takes them;
- ``gateway audit export --format csv|ndjson [--out FILE] [PARAMS]``: streamed;
- ``gateway audit stats [--json] [--date ge2026-01] [--by month,issuer] [--issuer USCC]``: 互认率 and the rest;
- ``gateway audit checkpoint``: sign one now with the configured key (or
  ``--key K --cert C``); ``--list``, ``--export FILE``, ``--import FILE`` to hold
  a peer's (checked with the configured trust and ``--trust PEM``);
- ``gateway audit tail [-n 20] [--follow]``: the newest entries.

Reads of the log (query, export, stats, tail) are written to the log too, as
the operating-system user on this host; ``verify`` only reads.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import click

from gateway.audit import checkpoint as checkpoints
from gateway.audit import export as exporting
from gateway.audit import query, records, stats
from gateway.audit.log import append, entries, has_log, head
from gateway.audit.verify import verify as verify_log
from gateway.commands.common import (USCC, AwareDateTime, EnvOption, database_in_use, note_database, one_line_errors,
                                     printable)
from gateway.config import Settings, check_database_url, load_settings
from gateway.errors import GatewayError, InputError
from gateway.signing.keys import load_certificates, load_signing_identity, signing_identity
from gateway.store.audit import audit_store
from gateway.store.db import Database, connect, is_postgresql, transaction

__all__ = ["audit", "settings_for", "open_db", "database_named", "cli_party", "registry_names"]

_DB_HELP = ("Database of this gateway: a SQLite file or a postgresql:// URL (GATEWAY_DATABASE); default: the "
            "configured one.")
_PARAMS_HELP = (
    "PARAMS are FHIR search parameters as name=value, exactly as GET /fhir/AuditEvent takes them: date (prefixes "
    "eq ne lt le gt ge sa eb; partial dates 2026, 2026-05, 2026-05-01), type, subtype, outcome (0 4 8 12), agent, "
    "agent:identifier, entity, entity:identifier, patient, patient:identifier, _id, _count, _sort (date or -date)."
)
#: Seconds between polls of ``tail --follow``; tests replace the sleeping function.
_sleep = time.sleep


def settings_for(ctx: click.Context) -> Settings:
    """The settings of the ``gateway`` command (its global flags), or the configured defaults."""
    root = ctx.find_root()
    if isinstance(root.obj, dict):
        from gateway.cli import get_settings  # imported late: gateway.cli imports this module

        return get_settings(ctx)
    return load_settings()


def database_named(ctx: click.Context) -> bool:
    """True when the user said which gateway's database to use: ``--config``/``GATEWAY_CONFIG``,
    ``--data-dir``/``--database`` or ``GATEWAY_DATA_DIR``/``GATEWAY_DATABASE`` (``--db`` is the command's own)."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if obj.get("config") or os.environ.get("GATEWAY_CONFIG"):
        return True
    if {"data_dir", "database"} & set(obj.get("overrides", {})):
        return True
    return any(os.environ.get(name) for name in ("GATEWAY_DATA_DIR", "GATEWAY_DATABASE"))


def require_existing(locator: str | Path) -> None:
    """Refuse a database that is not there: a missing SQLite file, or a PostgreSQL schema that does not exist
    (a mistyped URL), which opening it for writing would create empty."""
    if is_postgresql(locator):
        connect(locator, readonly=True).conn.close()  # refused, naming the missing schema, when it is not there
    elif not Path(locator).exists():
        raise click.ClickException(f"{locator}: no such database")


@contextmanager
def open_db(ctx: click.Context, db_path: str | None, *, must_exist: bool = True,
            readonly: bool = False) -> Iterator[Database]:
    """The database named by ``--db``, else the configured one; closed afterwards. ``readonly``: opened for reading
    only, so that a database on read-only media (a restored backup on a DVD, a mounted snapshot) can be read."""
    path: Path | str = db_path if db_path and is_postgresql(db_path) else Path(db_path) if db_path \
        else settings_for(ctx).database_locator
    if isinstance(path, str) and is_postgresql(path):
        check_database_url(path)
    note_database(ctx, path)  # (a database error names it)
    if must_exist:
        require_existing(path)
    db = connect(path, readonly=readonly)
    with closing(db.conn):
        yield db


def cli_party() -> records.Party:
    """Who runs this command: the operating-system user on this host."""
    user, host = getpass.getuser(), socket.gethostname()
    return records.Party(user, display=f"{user}@{host} (command line)")


def who_acts(settings: Settings) -> tuple[_dt.datetime, records.Party, records.Party]:
    """Now, this gateway, and the person running the command: what every change is audited with."""
    now = _dt.datetime.now(query.parse_offset(settings.timezone))
    return now, records.Party.member(settings.issuer_uscc, settings.issuer_name), cli_party()


def _gateway(settings: Settings) -> records.Party:
    return records.Party.member(settings.issuer_uscc, settings.issuer_name)


#: A 公民身份号码 as a message's bytes may hold it (its check digit is checked before it names anyone).
_ID_CARD_IN_TEXT = re.compile(rb"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")


def message_patients(db: Database, record_id: int, raw: bytes | None = None) -> list[records.PatientRef]:
    """The patients a stored message is about, named as the entries of their results name them (so that
    ``gateway audit query patient:identifier=<身份证号>`` finds a view of the message's raw bytes): the Patient
    resources stored from it (any version, by reference and the identifier it is known by); else the patients of
    the signed Bundle it carried; else (a message refused before it was read) every 身份证号 its bytes hold that
    passes its check digit."""
    from gateway import jsonutil
    from gateway.audit.events import patient_identifier
    from gateway.identifiers import id_card_or_none
    from gateway.naming import SYSTEM_ID_CARD

    from gateway.store.store import message_patients_stored

    found: dict[tuple[str | None, str | None], records.PatientRef] = {}
    patients, bundle_keys = message_patients_stored(db, record_id)
    for patient_id, text in patients:
        ident = patient_identifier(dict(jsonutil.loads(text)))
        ref = records.PatientRef(ident[1], ident[0] or None, f"Patient/{patient_id}") if ident else \
            records.PatientRef(reference=f"Patient/{patient_id}")
        found.setdefault((ref.value, ref.system) if ref.value else (ref.reference, None), ref)
    if not found:
        for listed in bundle_keys:
            keys = [str(k).split("|", 1) for k in jsonutil.loads(listed) if "|" in str(k)]
            keys.sort(key=lambda k: k[0] != SYSTEM_ID_CARD)  # (by the 身份证号 first, as decisions name them)
            if keys:
                system, value = keys[0]
                found.setdefault((value, system), records.PatientRef(value, system or None))
    if not found and raw:
        for match in _ID_CARD_IN_TEXT.finditer(bytes(raw)):
            number = id_card_or_none(match.group().decode("ascii"))
            if number:
                found.setdefault((number, SYSTEM_ID_CARD), records.PatientRef.id_card(number))
    return list(found.values())


def raw_viewed_records(db: Database, record_id: int, raw: bytes, *, at: _dt.datetime, gateway: records.Party,
                       user: records.Party, client: records.Party, client_address: str, server_address: str,
                       user_roles: list[str] | None = None) -> list[records.Record]:
    """What a view of a stored message's raw bytes writes to the audit log (console and command line alike): the
    operator's ``message-raw-viewed`` entry, and a read of patient data (BALP PatientRead of ``messages/<id>``)
    naming each patient of the message (:func:`message_patients`), so a per-patient access report lists it."""
    target = f"messages/{record_id}"
    made = [records.operator_action(at=at, gateway=gateway, user=user, client_address=client_address,
                                    action="message-raw-viewed", target=target)]
    made += [records.patient_read(at=at, gateway=gateway, server_address=server_address or "unknown", client=client,
                                  client_address=client_address, member=gateway, patient=patient, resources=[target],
                                  user=user, user_roles=user_roles or [], purpose=None)
             for patient in message_patients(db, record_id, raw)]
    return made


def _now(settings: Settings) -> _dt.datetime:
    return _dt.datetime.now(query.parse_offset(settings.timezone))


def _record_read(
    db: Database,
    settings: Settings,
    command: str,
    *,
    interaction: Literal["search-type", "read", "operation"] = "search-type",
    results: int | None = None,
    patient: records.PatientRef | None = None,
) -> None:
    """Write this command's look into the log to the log."""
    record = records.audit_query(
        at=_now(settings),
        gateway=_gateway(settings),
        server_address=audit_store(db).address(),
        client=records.Party("gateway-cli", display="gateway command line"),
        client_address=socket.gethostname(),
        user=cli_party(),
        query=command,
        interaction=interaction,
        patient=patient,
        results=results,
    )
    with transaction(db):
        append(db, record)


def _command_line(ctx: click.Context, *args: str) -> str:
    """The command as the audit entry records it: its path and the arguments that choose what was read."""
    return " ".join([ctx.command_path, *args])


def _params(items: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"{item!r}: search parameters are written name=value", item)
        out.append((name, value))
    return out


def _line(event: dict[str, Any]) -> str:
    """One AuditEvent as one terminal line (no patient identifiers)."""
    subtype = event.get("subtype", [{}])[0].get("code", "")
    desc = event.get("outcomeDesc", "")
    kind = event["type"]["code"]
    # (the description may quote what a sender sent: its control characters are shown escaped, never obeyed)
    return printable(f"{event['id']:>8}  {event['recorded']}  {kind:<22} {subtype:<26} {event['outcome']:>2}  {desc}")


@click.group()
def audit() -> None:
    """The audit log: verify it, query and export it, statistics, checkpoints."""


@audit.command("verify", short_help="Check the hash chain and checkpoints; name the first bad entry.")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.option(
    "--trust",
    "trust_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="PEM file of more trusted certificates (registry authorities, member certificates) to check the "
    "checkpoint signatures with, besides the configured ones (registry_authority, the member certificates of "
    "registry_snapshot, signing_cert). Repeatable.",
)
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A checkpoint document of this log held by a peer (JSON, from `audit checkpoint --export`); "
    "the log must still match it. Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    db_path: str | None,
    trust_files: tuple[str, ...],
    checkpoint_files: tuple[str, ...],
    as_json: bool,
) -> None:
    """Walk the hash chain and the signed checkpoints; name the first entry changed, removed or reordered,
    a tail cut off after a checkpoint, and a checkpoint that is forged. Checkpoint signatures are checked
    with the gateway's configured trust (registry authority, registry snapshot, this member's certificate)
    plus --trust. Exit 1 if anything is wrong; exit 3 if nothing was found wrong but checkpoints could not
    be vouched for (no trusted certificates, or none that knows their signer: a trust anchor that does not match
    is no proof of forgery); exit 2 if a file cannot be read (no such database, a file that is
    not one or is damaged, a checkpoint file that is not JSON): then nothing was found wrong with the log, it could
    not be looked at. Reads only: a database on read-only media (a mounted snapshot, a backup on a DVD) is read as
    it is."""
    from gateway.cli import database_error, unusable_database

    try:
        with one_line_errors():
            settings = settings_for(ctx)
            trust, trust_notes = checkpoints.configured_trust(settings, trust_files)
            extra = [checkpoints.Checkpoint.from_json(_read_json(path)) for path in checkpoint_files]
            # The configured database is this member's log: its checkpoints must be about this member.
            member = None if db_path else settings.issuer_uscc
            with open_db(ctx, db_path, readonly=True) as db:  # (it only reads: read-only media are fine)
                claims, notes = checkpoints.claims(db, trust, extra=extra, member=member) if has_log(db) else ([], [])
                report = verify_log(db, claims)
            report.notes[:0] = (trust_notes if claims else []) + notes
    except click.ClickException as exc:  # exit 1 says the log is wrong: what could not be read is 2
        exc.exit_code = 2
        raise
    except Exception as exc:
        if not unusable_database(exc):
            raise  # (a fault of the gateway: said as one, by the gateway command)
        raise database_error(exc, database_in_use(ctx), exit_code=2) from None
    if as_json:
        click.echo(json.dumps(report.as_json(), ensure_ascii=False, indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    if report.findings:
        ctx.exit(1)
    if not report.ok:
        ctx.exit(3)


def _read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: not a readable JSON file ({exc})") from None


@audit.command("query", epilog=_PARAMS_HELP)
@click.argument("params", nargs=-1)
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the searchset Bundle (FHIR JSON) instead of one line per event."
)
@click.pass_context
def query_cmd(ctx: click.Context, params: tuple[str, ...], db_path: str | None, as_json: bool) -> None:
    """Search the audit log with FHIR search PARAMS (name=value); newest first unless _sort=date."""
    with one_line_errors():
        settings = settings_for(ctx)
        search = query.parse_search(_params(params), tz=query.parse_offset(settings.timezone))
        with open_db(ctx, db_path) as db:
            page = query.run(db, search)
            events = [e.event() for e in page.entries]
            _record_read(db, settings, _command_line(ctx, *params), results=len(events), patient=search.patient())
    if as_json:
        bundle = query.searchset(page, search, base_url="urn:gateway:audit", path="AuditEvent", events=events)
        click.echo(json.dumps(bundle, ensure_ascii=False, indent=2))
        return
    if page.total is not None:
        click.echo(f"{page.total} entries match")
    for event in events:
        click.echo(_line(event))
    if page.next is not None:
        click.echo(f"more: add _cursor={search.query_string(cursor=page.next).rsplit('_cursor=', 1)[1]}", err=True)


@audit.command("export", epilog=_PARAMS_HELP)
@click.argument("params", nargs=-1)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(exporting.FORMATS),
    default="ndjson",
    show_default=True,
    help="ndjson: one FHIR AuditEvent per line; csv: one row per event with the hash chain columns.",
)
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Write here instead of standard output.")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def export_cmd(ctx: click.Context, params: tuple[str, ...], fmt: str, out: str | None, db_path: str | None) -> None:
    """Export every entry matching PARAMS (all when none), oldest first, streamed page by page."""
    with one_line_errors():
        settings = settings_for(ctx)
        pairs = _params(params)
        if not any(name == "_sort" for name, _ in pairs):
            pairs.append(("_sort", "date"))
        search = query.parse_search(pairs, tz=query.parse_offset(settings.timezone))
        with open_db(ctx, db_path) as db:
            counter = _Counter(query.iter_matches(db, search))
            try:
                with _private_file(out) if out else _stdout() as sink:
                    for text in exporting.lines(counter, fmt):
                        sink.write(text)
            except BrokenPipeError:  # (| head: its reader has what it wanted; what was read out is audited below)
                _quiet_stdout()
            finally:
                # audited however the export ended: entries written to a pipe whose reader closed early, or before a
                # Ctrl-C, were read out all the same (the log holds patient data)
                _record_read(
                    db,
                    settings,
                    _command_line(ctx, f"--format={fmt}", *params),
                    interaction="operation",
                    results=counter.n,
                    patient=search.patient(),
                )
    if out:
        click.echo(f"{counter.n} entries written to {out}", err=True)


def _private_file(path: str) -> IO[str]:
    """``path`` opened for writing, readable by this user alone (0600, an existing file's mode too): an export of the
    audit log holds patient data."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "w", encoding="utf-8", newline="")
    except BaseException:
        os.close(fd)
        raise


def _quiet_stdout() -> None:
    """Standard output's reader has gone (``| head``): what is left to flush goes nowhere, without a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # (not a real file descriptor: a test's captured output)
        pass
    finally:
        os.close(devnull)


class _Counter:
    """Passes entries through and counts them (the export streams; nothing is held)."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items = items
        self.n = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.n += 1
            yield item


@contextmanager
def _stdout() -> Iterator[IO[str]]:
    yield sys.stdout


def registry_names(settings: Settings) -> dict[str, str]:
    """Names of members (by USCC) and catalogues (by id) from the configured registry snapshot, to show beside
    their keys; empty when there is none. Read without checking its signature: names are shown, never trusted."""
    from gateway.registry.snapshot import read_snapshot_unverified

    path = settings.registry_snapshot
    if not path:
        return {}
    try:
        snap = read_snapshot_unverified(Path(path).read_bytes())
    except (OSError, ValueError, GatewayError):
        return {}
    names = {uscc: m.name for uscc, m in snap.members.items()}
    names.update({c.id: c.name for c in snap.catalogues})
    return names


def registry_scopes(settings: Settings) -> dict[str, str]:
    """Catalogue id -> scope (川渝, 四川省, an alliance's name) from the configured registry snapshot, for the
    alliance dimension; empty when there is none (read without checking its signature, like the names)."""
    from gateway.registry.snapshot import read_snapshot_unverified

    try:
        snap = read_snapshot_unverified(Path(settings.registry_snapshot).read_bytes())
    except (OSError, ValueError, TypeError, GatewayError):
        return {}
    return stats.catalogue_scopes(snap)


def registry_provinces(settings: Settings) -> dict[str, str]:
    """Member USCC -> province (``51``, ``50``) from the configured registry snapshot, for pricing the savings at the
    receiver's province; empty when there is none (read without checking its signature, like the names)."""
    from gateway.registry.snapshot import read_snapshot_unverified

    try:
        snap = read_snapshot_unverified(Path(settings.registry_snapshot).read_bytes())
    except (OSError, ValueError, TypeError, GatewayError):
        return {}
    return stats.member_provinces(snap)


def fee_table(settings: Settings, path: str | None) -> dict[tuple[str, str], stats.Fee]:
    """The fee table named by ``--fees``, else ``<mappings_dir>/fees`` when there is one.

    :raises InputError: a bad row (named by file, row and column).
    """
    if path:
        return stats.load_fees(path)
    default = Path(settings.mappings_dir) / "fees"
    return stats.load_fees(default) if default.is_dir() else {}


@audit.command("stats")
@click.option(
    "--date",
    "dates",
    multiple=True,
    help="Period, as FHIR date search values: ge2026-01 (from January 2026), lt2026-07, 2026-05. Repeatable.",
)
@click.option(
    "--by",
    "by",
    multiple=True,
    help="A cross view of two or more dimensions (issuer, receiver, item, catalogue, alliance, month), "
    "comma-separated: "
    "--by month,issuer gives 互认率 per month and issuer. Repeatable.",
)
@click.option("--issuer", type=USCC, help="Only results of this issuer (统一社会信用代码).")
@click.option("--receiver", type=USCC, help="Only results decided for this receiver (统一社会信用代码).")
@click.option("--item", help="Only this catalogue item (system|code, or the code).")
@click.option("--catalogue", help="Only items of this recognition catalogue (its id).")
@click.option("--alliance", help="Only items of catalogues of this scope (川渝, 四川省, 重庆市 or an alliance's name).")
@click.option("--fees", "fees_path", type=click.Path(exists=True),
              help="Fee table (CSV, or a folder of them) for 节约费用; default <mappings_dir>/fees.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def stats_cmd(
    ctx: click.Context,
    dates: tuple[str, ...],
    by: tuple[str, ...],
    issuer: str | None,
    receiver: str | None,
    item: str | None,
    catalogue: str | None,
    alliance: str | None,
    fees_path: str | None,
    as_json: bool,
    db_path: str | None,
) -> None:
    """互认率 by issuer, receiver, item, catalogue and month (and cross views such as month × issuer); refusals
    by failing rule; overrides by re-test reason; lookups (调阅) by member. Issuer and receiver names come from
    the decisions, else from the configured registry snapshot.

    互认率 = accepted / eligible. Eligible: results (one item of one report of one issuer for one receiver,
    its latest decision only) decided recognized or not-recognized; needs-review is left out (not decided yet).
    Accepted: eligible results decided recognized whose decision no physician overrode with a re-test.

    Also: 节约费用 (savings) = accepted results × the item's fee in the receiver's province (from the fee
    table); HR items per institution (results carrying a recognition mark, by mark); 互认率 by alliance (the
    scope of the catalogue, from the registry snapshot).
    """
    with one_line_errors():
        settings = settings_for(ctx)
        tz = query.parse_offset(settings.timezone)
        ranges = [tuple(query.parse_date(v, tz) for v in value.split(",")) for value in dates]
        views = [tuple(d.strip() for d in value.split(",") if d.strip()) for value in by]
        selection = {"issuer": issuer, "receiver": receiver, "item": item, "catalogue": catalogue,
                     "alliance": alliance}
        chosen = {k: v for k, v in selection.items() if v}
        with open_db(ctx, db_path) as db:
            figures = stats.compute(db, ranges, selection=chosen, by=views, names=registry_names(settings),
                                    fees=fee_table(settings, fees_path), alliances=registry_scopes(settings),
                                    provinces=registry_provinces(settings))
            args = [*(f"--date={d}" for d in dates), *(f"--by={b}" for b in by),
                    *(f"--{k}={v}" for k, v in sorted(chosen.items()))]
            _record_read(db, settings, _command_line(ctx, *args), interaction="operation")
    from gateway.audit.watch import summary, warning  # the background's last walk of the log
    from gateway.heartbeat import run_dir

    figures["log_check"] = summary(run_dir(settings)) if db_path is None else None
    if as_json:
        click.echo(json.dumps(figures, ensure_ascii=False, indent=2))
    else:
        click.echo(warning(figures["log_check"]) + stats.format_tables(figures), nl=False)


@audit.command("checkpoint")
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False),
    help="A private key (PEM, mode 0600) to sign with instead of the configured signing_key.",
)
@click.option(
    "--cert",
    "cert_path",
    type=click.Path(exists=True, dir_okay=False),
    help="The signing certificate (PEM) of --key, instead of the configured signing_cert.",
)
@click.option(
    "--key-password-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the password of an encrypted --key (mode 0600); the configured key uses "
    "signing_key_password_file.",
)
@click.option(
    "--chain",
    "chain_path",
    type=click.Path(exists=True, dir_okay=False),
    help="More certificates for the signature's x5c (PEM), e.g. the authority's.",
)
@click.option("--at", "at", type=AwareDateTime(), help="Checkpoint time (ISO 8601 with offset); default now.")
@click.option("--list", "list_only", is_flag=True, help="List the checkpoints held (this log's, then peers') and stop.")
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False),
    help="Write the newest checkpoint of this log to this file, for a peer to hold (with --key: after making "
    "one).",
)
@click.option(
    "--import",
    "import_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Hold a peer's checkpoint document (JSON) after verifying its signature against the configured trust "
    "(registry authority and snapshot) and --trust.",
)
@click.option(
    "--trust",
    "trust_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="PEM file of more trusted certificates to verify an imported checkpoint with. Repeatable.",
)
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def checkpoint_cmd(
    ctx: click.Context,
    key_path: str | None,
    cert_path: str | None,
    key_password_file: str | None,
    chain_path: str | None,
    at: _dt.datetime | None,
    list_only: bool,
    export_path: str | None,
    import_path: str | None,
    trust_files: tuple[str, ...],
    db_path: str | None,
) -> None:
    """Sign a checkpoint (entry count, head hash, time) of this gateway's audit log with the member's key
    (the configured one, or --key and --cert); or list, export, or import (hold) a peer's."""
    with one_line_errors():
        settings = settings_for(ctx)
        signing = bool(key_path or cert_path) or not (list_only or import_path or export_path)
        with open_db(ctx, db_path, must_exist=bool(list_only or (export_path and not signing))) as db:
            if list_only:
                for cp in checkpoints.checkpoints(db, own=None):
                    whose = "this log" if cp.own else f"peer {cp.member}"
                    click.echo(
                        f"{cp.id:>5}  {whose:<28} entries {cp.count:>9}  head {cp.head.hex()[:16]}...  {cp.time}"
                    )
                return
            if import_path:
                trust, notes = checkpoints.configured_trust(settings, trust_files)
                if trust is None:
                    raise click.ClickException(f"cannot verify the checkpoint's signature: {notes[0]}")
                held = checkpoints.import_peer(
                    db, _read_json(import_path), trust, now=_now(settings), me=settings.issuer_uscc
                )
                click.echo(f"holding checkpoint of {held.member}: {held.count} entries, head {held.head.hex()}")
                return
            if signing:
                signer = _signer(settings, key_path, cert_path, key_password_file, chain_path, mine=db_path is None)
                made = checkpoints.make(db, signer, at=at or _now(settings))
                click.echo(
                    f"checkpoint {made.id}: {made.count} entries, head {made.head.hex()}, signed by "
                    f"{made.member} at {made.time}"
                )
            if export_path:
                newest = checkpoints.latest(db)
                if newest is None:
                    raise click.ClickException("this log has no checkpoint yet: sign one first (gateway audit "
                                               "checkpoint, with the configured key or --key and --cert)")
                Path(export_path).write_text(json.dumps(newest.as_json(), indent=2) + "\n", encoding="utf-8")
                click.echo(f"wrote checkpoint {newest.id} ({newest.count} entries) to {export_path}")


def _signer(
    settings: Settings,
    key_path: str | None,
    cert_path: str | None,
    password_file: str | None,
    chain_path: str | None,
    *,
    mine: bool,
) -> checkpoints.Signer:
    """Who signs a checkpoint: --key and --cert, else the configured identity; checked as `gateway serve` checks it.

    ``mine``: the log is this gateway's own, so the certificate must name ``issuer_uscc``.
    """
    if key_path or cert_path:
        if not (key_path and cert_path):
            raise click.ClickException("signing with --key needs --cert too (or neither: the configured key)")
        if password_file is None and settings.signing_key and Path(key_path).resolve() == Path(
            settings.signing_key
        ).resolve():
            password_file = settings.signing_key_password_file or None
        _, key, chain = load_signing_identity(
            key_path, cert_path, password_file=password_file, issuer_uscc=settings.issuer_uscc if mine else None
        )
    else:
        found = signing_identity(settings)
        if found is None:
            raise click.ClickException(
                "no signing key is configured (signing_key, signing_cert): set them, or give --key and --cert "
                "(or --list, --export, --import)"
            )
        _, key, chain = found
    more = [c for c in (load_certificates(chain_path) if chain_path else []) if c not in chain]
    return checkpoints.Signer(key, [*chain, *more])


@audit.command("tail")
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(1, 10000),
    default=20,
    show_default=True,
    help="How many of the newest entries to show.",
)
@click.option("--follow", is_flag=True,
              help="Keep printing new entries as they are appended (Ctrl-C stops, quietly: exit 0).")
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 3600),
    default=2.0,
    show_default=True,
    help="Seconds between looks for new entries with --follow.",
)
@click.option(
    "--polls", type=click.IntRange(0), default=0, help="With --follow: stop after this many looks (0: never)."
)
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.pass_context
def tail_cmd(ctx: click.Context, count: int, follow: bool, interval: float, polls: int, db_path: str | None) -> None:
    """Show the newest entries, one line each (entry, time, type, subtype, outcome, description)."""
    with one_line_errors():
        settings = settings_for(ctx)
        with open_db(ctx, db_path) as db:
            last, _ = head(db)
            start = max(1, last - count + 1)
            for entry in entries(db, start, last):
                click.echo(_line(entry.event()))
            _record_read(db, settings, _command_line(ctx, f"-n {count}"), results=last - start + 1 if last else 0)
            shown = last + 1  # our own audit entry is the next one: show it too when following
            looks = 0
            try:
                while follow and (polls == 0 or looks < polls):
                    _sleep(interval)
                    looks += 1
                    for entry in entries(db, shown):
                        click.echo(_line(entry.event()))
                        shown = entry.seq + 1
            except KeyboardInterrupt:  # Ctrl-C is how a follow ends: quietly, exit 0 (as `gateway serve` stops)
                pass
