"""Referral commands (移送): refer a report of an unqualified or forged issuer to its authority, and follow it.

- ``gateway referrals create --decision ID --reason unqualified --note …``: the receiver refers the report
  a decision of this gateway was about to the authority that approved or filed the issuer (from the registry);
  queued for delivery (``gateway serve`` delivers; ``--now`` tries at once);
- ``gateway referrals list [--status S] [--focus REPORT]`` and ``gateway referrals show ID [--json]``;
- ``gateway referrals update ID --status accepted|rejected|completed [--note …]``: on the authority's gateway,
  its answer, sent back to the referring member.

Every change is audited with the operating-system user who ran the command.
"""
from __future__ import annotations

import click

from gateway import jsonutil
from gateway.commands.common import one_line_errors, printable
from gateway.referrals import REASONS, STATUSES, Referral, Referrals, issuer_of

__all__ = ["referrals"]


def _referrals(ctx: click.Context) -> Referrals:
    from gateway.commands.exchange import _exchange

    return Referrals(_exchange(ctx))


def _who(ctx: click.Context) -> object:
    from gateway.cli import get_settings
    from gateway.commands.audit import who_acts

    return who_acts(get_settings(ctx))[2]


def _line(r: Referral) -> str:
    side = "to" if r.side == "requester" else "from"
    other = r.owner if r.side == "requester" else r.requester
    return f"{r.id}  {r.status:10} {r.reason:13} {side} {other}  {_report(r.report)}  {r.updated_at}"


def _deliver(ctx: click.Context, refs: Referrals) -> None:
    counts = refs.exchange.deliver(wait=None)
    click.echo(f"delivery: {counts['delivered']} delivered, {counts['retry']} to retry, {counts['dead']} dead")
    if counts["dead"]:
        ctx.exit(1)


@click.group()
def referrals() -> None:
    """Referrals of violations (移送) to the authority that approved or filed an issuer."""


@referrals.command("create")
@click.option("--decision", "decision_id", required=True, help="Id of a recognition decision made here.")
@click.option("--reason", required=True, type=click.Choice(list(REASONS)),
              help="unqualified, out-of-scope, suspended (qualification) or forged (the report).")
@click.option("--note", help="What the authority should know (sent with the evidence).")
@click.option("--authority", help="统一社会信用代码 of the authority (default: the one the registry names).")
@click.option("--now", "deliver_now", is_flag=True, help="Also try to deliver at once.")
@click.pass_context
def create(ctx: click.Context, decision_id: str, reason: str, note: str | None, authority: str | None,
           deliver_now: bool) -> None:
    """Refer the report of decision ID: a signed FHIR Task with the evidence, queued for the authority."""
    with one_line_errors():
        refs = _referrals(ctx)
        made = refs.create(decision_id, reason, note=note, by=_who(ctx), authority=authority)  # type: ignore[arg-type]
        click.echo(f"referral {made.id} {made.status} for {made.owner} ({_report(made.report)})")
        if deliver_now:
            _deliver(ctx, refs)
            click.echo(f"referral {made.id}: {refs.get(made.id).status}")


@referrals.command("list")
@click.option("--status", type=click.Choice(list(STATUSES)), help="Only this status.")
@click.option("--focus", help="Only referrals of this report (检验报告单号 or DiagnosticReport/…).")
@click.option("--json", "as_json", is_flag=True, help="JSON (the Tasks included).")
@click.pass_context
def list_cmd(ctx: click.Context, status: str | None, focus: str | None, as_json: bool) -> None:
    """Referrals made here or received as the authority, newest first."""
    with one_line_errors():
        rows = _referrals(ctx).list(status=status, focus=focus)
    if as_json:
        click.echo(jsonutil.dumps_pretty([r.to_dict() for r in rows]))
        return
    for r in rows:
        click.echo(_line(r))
    if not rows:
        click.echo("no referrals")


@referrals.command("show")
@click.argument("referral_id")
@click.option("--json", "as_json", is_flag=True, help="The whole referral with its Task as JSON.")
@click.pass_context
def show(ctx: click.Context, referral_id: str, as_json: bool) -> None:
    """One referral: status, parties, evidence."""
    with one_line_errors():
        r = _referrals(ctx).get(referral_id)
    if as_json:
        click.echo(jsonutil.dumps_pretty(r.to_dict()))
        return
    click.echo(_line(r))
    click.echo(printable(f"  requester {r.requester}  owner {r.owner}  issuer {_issuer(r)}"))
    click.echo(f"  decision {r.decision_id or '-'}  signed Bundle sha256 {r.bundle_hash or '-'}")
    for item in r.task.get("input", []):
        code = item["type"]["coding"][0]["code"]
        value = item.get("valueString") or (item.get("valueIdentifier") or {}).get("value") or \
            ((item.get("valueReference") or {}).get("identifier") or {}).get("value", "")
        click.echo(f"  {code}: {value}")
    if r.task.get("statusReason"):
        click.echo(printable(f"  answer: {r.task['statusReason'].get('text', '')}"))  # (the authority's words)


@referrals.command("update")
@click.argument("referral_id")
@click.option("--status", required=True, type=click.Choice(["accepted", "rejected", "completed"]),
              help="The authority's answer.")
@click.option("--note", help="Why (sent back as the Task's statusReason).")
@click.option("--now", "deliver_now", is_flag=True, help="Also try to deliver the answer at once.")
@click.pass_context
def update(ctx: click.Context, referral_id: str, status: str, note: str | None, deliver_now: bool) -> None:
    """On the authority's gateway: answer referral ID; the update goes back to the referring member."""
    with one_line_errors():
        refs = _referrals(ctx)
        r = refs.update(referral_id, status, note=note, by=_who(ctx))  # type: ignore[arg-type]
        click.echo(f"referral {r.id} {r.status}; answer queued for {r.requester}")
        if deliver_now:
            _deliver(ctx, refs)


def _issuer(r: Referral) -> str:
    """The institution whose report is referred: USCC and name, as the Task names it (its report's number's
    assigner), else as kept here."""
    uscc, name = issuer_of(r.task)
    uscc = uscc or r.issuer
    return f"{uscc} {name}" if uscc and name else (uscc or "-")


def _report(value: str) -> str:
    """The report a referral is about, as people name it: its 检验报告单号 (kept as ``DiagnosticReport/<number>``,
    which read like a resource's id that GET /fhir/DiagnosticReport/... does not find)."""
    return f"检验报告单号 {value.removeprefix('DiagnosticReport/')}"
