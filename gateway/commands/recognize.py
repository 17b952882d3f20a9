"""Recognition commands: decide on a Bundle, list stored decisions, record physician overrides.

- ``gateway recognize --registry SNAPSHOT --authority CERT --receiver USCC [--at T] [--db PATH] BUNDLE``
  prints every decision with every rule checked (a table, or ``--json``); ``--at``
  defaults to now and is printed and stored with the decision;
- ``gateway decisions list|show|override|reasons``: decisions stored with ``--db`` (default: the configured
  database),
  listed by patient, issuer, item or outcome; a physician's re-test override
  (one of the six national reasons) recorded beside a decision.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

import click

from gateway.commands.common import (USCC, AwareDateTime, EnvOption, note_database, now_cst, one_line_errors,
                                     printable)
from gateway.commands.registry import authority_certificates
from gateway.naming import SYSTEM_ID_CARD
from gateway.recognition.engine import (
    FAILED,
    NEEDS_REVIEW,
    NOT_EVALUABLE,
    NOT_RECOGNIZED,
    PASSED,
    RECOGNIZED,
    Decision,
)
from gateway.recognition.signed import facts_to_decide
from gateway.recognition.overrides import RETEST_REASONS, RETIRED_RETEST_REASONS, make_override
from gateway.recognition.record import decide, decide_and_record
from gateway.recognition.store import StoredDecision, add_override, get_decision, list_decisions
from gateway.errors import TrustError
from gateway.registry.holder import highest_version, known_version, remember_version
from gateway.registry.models import Snapshot
from gateway.registry.snapshot import verify_snapshot
from gateway.signing.canonical import dumps, parse_json
from gateway.store.db import Database, connect, describe, is_postgresql

__all__ = ["recognize", "decisions", "format_decisions"]

_AWARE = AwareDateTime()
_STATUS_MARK = {PASSED: "✓", FAILED: "✗", NOT_EVALUABLE: "?"}
_OUTCOME_LABEL = {RECOGNIZED: "RECOGNIZED", NOT_RECOGNIZED: "NOT RECOGNIZED", NEEDS_REVIEW: "NEEDS REVIEW"}
_DB_HELP = ("Database of this gateway, a SQLite file or a postgresql:// URL (GATEWAY_DATABASE); default: the "
            "configured one.")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read: {exc.strerror}") from None


def format_decisions(decisions: list[Decision], snapshot: Snapshot) -> str:
    """The human-readable table of a Bundle's decisions, every rule on its own line."""
    first = decisions[0]
    receiver = snapshot.member(first.receiver)
    counts = {o: sum(1 for d in decisions if d.outcome == o) for o in _OUTCOME_LABEL}
    lines = [
        f"Receiver {first.receiver} {receiver.name if receiver else '(not a member)'}, decided at "
        f"{first.decided_at.isoformat()}, registry snapshot {snapshot.version}{' [DEMO]' if snapshot.demo else ''}",
        f"Bundle {first.facts.bundle_id or '?'}: {len(decisions)} result(s): {counts[RECOGNIZED]} recognized, "
        f"{counts[NEEDS_REVIEW]} need review, {counts[NOT_RECOGNIZED]} not recognized",
    ]
    for n, d in enumerate(decisions, start=1):
        item = f"{d.item.catalogue_id}:{d.item.code} {d.item.mark}" if d.item else "-"
        lines.append("")
        lines.append(f"[{n}] {d.facts.item_label()}  {_OUTCOME_LABEL[d.outcome]}  ({item})  decision {d.decision_id}")
        width = max(len(r.rule) for r in d.rules)
        for r in d.rules:
            lines.append(f"    {_STATUS_MARK[r.status]} {r.rule:<{width}}  {r.message}")
        for alt in d.alternatives:
            lines.append(f"    also considered {alt['catalogue']}:{alt['code']}: {alt['outcome']}")
    lines.append("")
    lines.append("✓ passed  ✗ failed  ? not evaluable (a fact is missing: a person decides)")
    return "\n".join(lines)


@click.command("recognize")
@click.argument("bundle", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--registry",
    "registry_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    envvar="GATEWAY_REGISTRY_SNAPSHOT",
    help="Signed registry snapshot (GATEWAY_REGISTRY_SNAPSHOT).",
)
@click.option(
    "--authority",
    "--authority-cert",  # (the spelling of template, issue-cert and registry build)
    "authority",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    envvar="GATEWAY_REGISTRY_AUTHORITY",
    help="Trusted registry authority certificate(s), PEM (repeatable; GATEWAY_REGISTRY_AUTHORITY); "
    "default certs/registry-authority.pem.",
)
@click.option("--receiver", required=True, help="统一社会信用代码 of the receiving member (GB 32100 checked).")
@click.option("--at", "at", type=_AWARE, help="Decision time (ISO 8601 with offset); default now. Printed and stored.")
@click.option(
    "--db",
    "db_path",
    cls=EnvOption,
    type=click.Path(dir_okay=False),
    envvar="GATEWAY_DATABASE",
    help="Store the decisions in this SQLite database (GATEWAY_DATABASE); not stored if absent.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON (one document) instead of a table.")
def recognize(
    bundle: str,
    registry_path: str,
    authority: tuple[str, ...],
    receiver: str,
    at: _dt.datetime | None,
    db_path: str | None,
    as_json: bool,
) -> None:
    """Decide, for every result in BUNDLE (a report Bundle file, or - for stdin), whether the receiver may
    recognise it: recognized, not-recognized or needs-review, with every rule checked."""
    now = now_cst()
    moment = at or now  # (without --at the decision is made as of the moment it is recorded: no as-of of its own)
    data = _read(bundle)
    with one_line_errors():
        registry_text = _read(registry_path)
        snapshot = verify_snapshot(registry_text, authority_certificates(authority), moment)
        document = parse_json(data)
        facts = facts_to_decide(data, document, snapshot, moment)
        stored = None
        if not db_path:
            decisions = decide(facts, document, snapshot, receiver, moment).decisions
        else:
            note_database(click.get_current_context(), db_path)
            _accepted_by(db_path, snapshot)
            db = connect(db_path)
            try:  # the decisions and their audit entries commit together: `gateway audit stats` counts them
                decisions, stored = decide_and_record(db, facts, document, snapshot, receiver, moment,
                                                      recorded_at=now)
            finally:
                db.conn.close()
            # the snapshot the stored decisions cite is kept with them, as a gateway keeps the snapshots it applies
            remember_version(db_path, snapshot.version, snapshot.digest(), now, member=receiver, text=registry_text)
    if as_json:
        click.echo(dumps({"decisions": [d.to_dict() for d in decisions]}, indent=2))
    else:
        click.echo("\n".join(printable(line) for line in format_decisions(decisions, snapshot).split("\n")))
    if stored is not None:
        click.echo(f"{stored} new decision(s) stored in {describe(db_path or '')}", err=True)


def _accepted_by(db_path: str, snapshot: Snapshot) -> None:
    """Refuse, as the gateway of that database would, a snapshot older than one it applied, or another snapshot
    under the version of one it applied (decisions stored by it would change the figures with facts the gateway
    refused).

    :raises TrustError: older, or the same version with other content.
    """
    highest = highest_version(db_path)
    if snapshot.version < highest:
        raise TrustError(f"registry snapshot version {snapshot.version} is older than version {highest}, which this "
                         "database's gateway applied: decisions are made by that one or a newer one",
                         "--registry")
    if snapshot.version == highest and highest and not known_version(db_path, snapshot.version, snapshot.digest()):
        raise TrustError(f"registry snapshot version {snapshot.version} differs from the one this database's "
                         "gateway applied under that version", "--registry")


@click.group("decisions")
def decisions() -> None:
    """Stored recognition decisions and physicians' re-test overrides."""


def _configured(db_path: str | None) -> str:
    """``--db``, else the database of the configured gateway (``--config``, ``GATEWAY_CONFIG``)."""
    if db_path:
        return db_path
    from gateway.commands.audit import settings_for

    return str(settings_for(click.get_current_context()).database_locator)


def _existing(db_path: str | None) -> str:
    """The database named (see :func:`_configured`), which must exist already (a file) or be a server's URL."""
    db_path = _configured(db_path)
    note_database(click.get_current_context(), db_path)  # (a database error names it)
    if not is_postgresql(db_path) and not Path(db_path).exists():
        raise click.ClickException(f"{db_path}: no such database")
    return db_path


def _open(db_path: str | None) -> Database:
    db: Database = connect(_existing(db_path), readonly=True)
    return db


@decisions.command("list")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.option("--patient", help="Patient identifier value (a 身份证号 unless --patient-system says otherwise).")
@click.option("--patient-system", default=SYSTEM_ID_CARD, show_default=True, help="Identifier system of --patient.")
@click.option("--issuer", type=USCC, help="Issuing member's 统一社会信用代码.")
@click.option("--item", help="Catalogue item code (e.g. CY-L001), or the result's own code when no catalogue lists it.")
@click.option("--outcome", type=click.Choice([RECOGNIZED, NOT_RECOGNIZED, NEEDS_REVIEW]), help="Only this outcome.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(
    db_path: str | None,
    patient: str | None,
    patient_system: str,
    issuer: str | None,
    item: str | None,
    outcome: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List stored decisions, newest first.

    A search by --patient shows one patient's results: it is written to the audit log (the patient identifier
    searched, the operating-system user who ran it, "command line") before anything is shown. A database this
    user cannot write to (read-only file, folder or mount) cannot hold that entry: such a search is refused, one
    line, exit 2, and nothing is shown (a list without --patient only reads).
    """
    with one_line_errors():
        if patient is None:
            db = _open(db_path)
            rows = list_decisions(db, patient=None, issuer=issuer, item=item, outcome=outcome, limit=limit)
        else:
            rows = _patient_decisions(db_path, patient, patient_system, issuer=issuer, item=item,
                                      outcome=outcome, limit=limit)
    if as_json:
        click.echo(dumps({"decisions": [r.to_dict() for r in rows]}, indent=2))
        return
    for r in rows:
        d = r.decision
        item_ref = d["catalogue_item"]["code"] if d.get("catalogue_item") else "-"
        flag = f"  overridden ({', '.join(o['reason'] for o in r.overrides)})" if r.overrides else ""
        if r.withdrawal:  # the outcome in force: a superseded report's decision reads not-recognized (it showed the
            # outcome once decided, recognized, and a physician took a superseded result for one to use)
            flag += f"  withdrawn ({r.withdrawal.get('reason', 'superseded')}; decided {d['outcome']})"
        click.echo(printable(  # (the item and issuer as the Bundle's sender wrote them)
            f"{d['decided_at']}  {r.outcome:<15}{item_ref:<10} {d['result']['issuer'] or '-':<20}"
            f"{d['result']['item']}  {d['decision_id']}{flag}"
        ))
    click.echo(f"{len(rows)} decision(s)", err=True)


def _patient_decisions(db_path: str | None, patient: str, patient_system: str, *, issuer: str | None,
                       item: str | None, outcome: str | None, limit: int) -> list[StoredDecision]:
    """One patient's stored decisions, the search written to the audit log first (who, when, which patient), as
    ``messages show --raw`` writes its read: patient data the gateway cannot account for is not shown.

    :raises click.ClickException: (exit 2) the audit entry cannot be written: a read-only database.
    """
    from gateway.audit import records
    from gateway.audit.log import append
    from gateway.cli import database_error, unusable_database
    from gateway.commands.audit import settings_for, who_acts
    from gateway.identifiers import check_id_card
    from gateway.store.audit import audit_store
    from gateway.store.db import transaction

    locator = _existing(db_path)
    value = check_id_card(patient) if patient_system == SYSTEM_ID_CARD else patient  # (as the search reads it)
    ctx = click.get_current_context()
    try:
        db = connect(locator)
        try:
            rows = list_decisions(db, patient=value, patient_system=patient_system, issuer=issuer, item=item,
                                  outcome=outcome, limit=limit)
            at, gateway, by = who_acts(settings_for(ctx))
            searched = " ".join(["gateway decisions list", "--patient", value, "--patient-system", patient_system,
                                 *(["--issuer", issuer] if issuer else []), *(["--item", item] if item else []),
                                 *(["--outcome", outcome] if outcome else [])])
            with transaction(db):
                append(db, records.patient_read(
                    at=at, gateway=gateway, server_address=audit_store(db).address(),
                    client=records.Party("gateway-cli", display="gateway command line"),
                    client_address="command line", member=gateway, patient=records.PatientRef(value, patient_system),
                    resources=[], query=searched, user=by, purpose=None))
        finally:
            db.conn.close()
    except Exception as exc:
        if not unusable_database(exc):
            raise
        from gateway.store.db import unwritable

        blocked = unwritable(locator)
        if blocked:  # (read-only media, a restored copy: the most likely reason, said plainly)
            refused = click.ClickException(
                f"patient data not shown: its search cannot be written to the audit log of {describe(locator)}, "
                f"as this user cannot write {', '.join(blocked)}; search by patient on a database this user can "
                "write (decisions list without --patient only reads)")
            refused.exit_code = 2
        else:
            refused = database_error(exc, locator, exit_code=2)
            refused.message = f"patient data not shown, as its search cannot be written to the audit log: " \
                              f"{refused.message}"
        raise refused from None
    return rows


@decisions.command("show")
@click.argument("decision_id")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
def show_cmd(decision_id: str, db_path: str | None) -> None:
    """Print one stored decision with its rules and overrides (JSON)."""
    with one_line_errors():
        stored = get_decision(_open(db_path), decision_id)
    click.echo(json.dumps(stored.to_dict(), ensure_ascii=False, indent=2))


@decisions.command("override")
@click.argument("decision_id")
@click.option("--db", "db_path", cls=EnvOption, type=click.Path(dir_okay=False), envvar="GATEWAY_DATABASE",
              help=_DB_HELP)
@click.option(
    "--reason",
    required=True,
    type=click.Choice([*RETEST_REASONS, *RETIRED_RETEST_REASONS]),
    help="National re-test reason (see `gateway decisions reasons`); `other` is still taken for other-necessary.",
)
@click.option("--physician", required=True, help="The receiving physician's identifier (医务人员 ID).")
@click.option("--note", help="Free text for the medical record.")
def override_cmd(decision_id: str, db_path: str | None, reason: str, physician: str, note: str | None) -> None:
    """Record a physician's re-test decision beside DECISION_ID (the decision itself is kept unchanged)."""
    from gateway.commands.audit import require_existing

    db_path = _existing(db_path)
    with one_line_errors():
        require_existing(db_path)  # a PostgreSQL schema that is not there is refused, never created
        db = connect(db_path)
        try:
            override = make_override(decision_id, reason, physician, now_cst(), note)
            override_id = add_override(db, override)
        finally:
            db.conn.close()
    # the stored code: a retired one (other) is recorded as the code it now is (other-necessary)
    click.echo(f"override {override_id} recorded for decision {decision_id}: {override.reason} "
               f"({RETEST_REASONS[override.reason].zh})")


@decisions.command("reasons")
def reasons_cmd() -> None:
    """List the six national re-test reasons a physician may give."""
    for r in RETEST_REASONS.values():
        click.echo(f"{r.code:<18}{r.zh}\n{'':<18}{r.en}")
