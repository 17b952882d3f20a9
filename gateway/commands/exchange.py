"""Exchange commands: sending signed reports to other members, and the outbox operators watch.

- ``gateway send BUNDLE_ID --to USCC``: queue a report this member issued for a
  destination member (push on referral); ``--now`` also tries delivery at once
  (Ctrl-C gives the delivery back: due at once, its attempts unchanged);
- ``gateway outbox list|show|retry|replay|deliver``: what waits, what was
  delivered (with the receiver's signed receipt), what is dead and why; put a
  dead delivery back, send a delivered one again, run one delivery pass.

``gateway serve`` delivers in the background; these commands work on the same
database while it runs (SQLite WAL).
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, NoReturn

import click

from gateway import jsonutil
from gateway.commands.common import RECORD_NUMBER, printable

__all__ = ["send", "outbox", "lookup"]


def _pipeline(ctx: click.Context) -> Any:
    from gateway.cli import get_settings
    from gateway.errors import ConfigError
    from gateway.pipeline import Pipeline

    pipeline = Pipeline(get_settings(ctx))
    if pipeline.exchange is None:
        raise ConfigError("this gateway has no signing key and registry snapshot configured "
                          "(signing_key, signing_cert, registry_snapshot)", "signing_key")
    return pipeline


def _exchange(ctx: click.Context) -> Any:
    return _pipeline(ctx).exchange


@click.command()
@click.argument("patient")
@click.option("--at", "destination", required=True,
              help="统一社会信用代码 of the member to ask (from the registry snapshot).")
@click.option("--user", "by", default="", help="Who asks (a user of this gateway), named in the audit entry.")
@click.option("--receive", is_flag=True,
              help="Also take each report as if the member had pushed it: stored, checked against our profiles, "
                   "decided for this member (互认), audited.")
@click.option("--out", type=click.Path(file_okay=False, writable=True),
              help="Write each signed Bundle that verified to this folder, as <Bundle id>.json.")
@click.pass_context
def lookup(ctx: click.Context, patient: str, destination: str, by: str, receive: bool, out: str | None) -> None:
    """调阅: ask another member for its signed reports of PATIENT (身份证号, or system|value; several separated by
    commas), verify each against the registry snapshot, and list them. Audited here (who asked, which member,
    which patient, what came back) and at the member asked. A report whose signature does not verify is listed as
    refused and not used (the others are); exit 1 then, and when the member cannot be reached or refuses."""
    from pathlib import Path

    from gateway.errors import GatewayError

    pipeline = _pipeline(ctx)
    refused: list[tuple[str, str]] = []
    try:
        found = pipeline.exchange.pull(destination, patient, by=by, refused=refused)
    except GatewayError as exc:
        raise click.ClickException(f"调阅 at {destination}: {exc.message}") from None
    click.echo(f"{destination}: {len(found)} signed report Bundle(s), each verified"
               + (f"; {len(refused)} refused, not to be used" if refused else ""))
    folder = Path(out) if out else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for one in found:
        reports = [e["resource"] for e in one.bundle.get("entry", [])
                   if isinstance(e, dict) and isinstance(e.get("resource"), dict)
                   and e["resource"].get("resourceType") == "DiagnosticReport"]
        named = ", ".join(f"{(r.get('code') or {}).get('text') or _first_code(r)} issued {r.get('issued', '?')}"
                          for r in reports)
        line = (f"  Bundle {one.bundle.get('id')}: signed by {one.signer_uscc} (kid {one.kid}) "
                f"{one.signed_at.isoformat(timespec='seconds')}, sha256 {one.document_sha256[:16]}…; {named}")
        text = jsonutil.dumps(one.bundle).encode("utf-8")
        if folder is not None:
            (folder / f"{one.bundle.get('id') or one.document_sha256}.json").write_bytes(text)
        if receive:
            answer = pipeline.receive_signed(text, destination)
            tally: dict[str, int] = {}
            for decision in answer.decisions or []:
                tally[str(decision.get("outcome"))] = tally.get(str(decision.get("outcome")), 0) + 1
            line += (f"; received: HTTP {answer.status}" + (" (had it already)" if answer.duplicate else "")
                     + (", decided " + ", ".join(f"{n} {k}" for k, n in sorted(tally.items())) if tally else ""))
        click.echo(printable(line))
    for bundle_id, why in refused:
        click.echo(printable(f"  Bundle {bundle_id}: refused, not to be used: {why}"))
    if refused:
        ctx.exit(1)


def _first_code(report: dict[str, Any]) -> str:
    codings = (report.get("code") or {}).get("coding") or [{}]
    first = codings[0] if isinstance(codings[0], dict) else {}
    return str(first.get("display") or first.get("code") or "report")


@click.command()
@click.argument("bundle_id")
@click.option("--to", "destination", required=True, help="统一社会信用代码 of the receiving member (from the registry).")
@click.option("--now", "deliver_now", is_flag=True,
              help="Also try to deliver at once (otherwise `gateway serve` does).")
@click.pass_context
def send(ctx: click.Context, bundle_id: str, destination: str, deliver_now: bool) -> None:
    """Queue the signed report Bundle BUNDLE_ID for another member (push on referral)."""
    ex = _exchange(ctx)
    row = ex.push(bundle_id, destination)
    entry = ex.outbox.get(row)
    if entry.status == "delivered":
        click.echo(f"already delivered as outbox #{row} to {destination} ({entry.url}); "
                   f"`gateway outbox replay {row}` sends it again")
        return
    click.echo(f"queued as outbox #{row} for {destination} ({entry.url})")
    if deliver_now:
        try:
            ex.deliver(wait=None)
        except KeyboardInterrupt:
            _interrupted(ctx, ex)
        entry = ex.outbox.get(row)
        click.echo(printable(f"outbox #{row}: {entry.status}" + (f" ({entry.last_error})" if entry.last_error else "")))
        if entry.status == "dead":
            ctx.exit(1)


def _interrupted(ctx: click.Context, ex: Any) -> NoReturn:
    """Ctrl-C while delivering: the deliveries this process holds are given back (due now, their attempts
    unchanged) rather than left leased until their leases end; said in one line; exit 130."""
    given = ex.give_back_own()
    said = (f"outbox {', '.join(f'#{i}' for i in given)} given back: pending, due now, attempts unchanged" if given
            else "nothing was on its way")
    click.echo(f"interrupted: {said} (`gateway serve` or `gateway outbox deliver` sends what is due)", err=True)
    ctx.exit(130)


@click.group()
def outbox() -> None:
    """Deliveries to other member gateways: list, show, retry, replay, deliver."""


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone(_dt.timedelta(hours=8))).isoformat(timespec="seconds")


@outbox.command("list")
@click.option("--status", type=click.Choice(["pending", "delivering", "delivered", "dead"]), help="Only this status.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="How many, newest first.")
@click.pass_context
def outbox_list(ctx: click.Context, status: str | None, limit: int) -> None:
    """List deliveries, newest first."""
    ex = _exchange(ctx)
    now = ex.clock().timestamp()
    for row in ex.outbox.list(status, limit):
        nxt = f" next {_when(row.next_attempt_at)}" if row.status == "pending" else ""
        held = f" {_holder(row, now, short=True)}" if row.status == "delivering" and row.lease_owner else ""
        click.echo(printable(f"#{row.id:<5} {row.status:10} to {row.destination} attempts {_attempts(row)}{nxt}"
                             f"{held} {row.last_error}"))  # (the error quotes what the other member answered)


def _attempts(row: Any) -> str:
    """The attempts of a delivery: of its current budget, and in all when an operator put it back before."""
    if not row.earlier_attempts:
        return str(row.attempts)
    return f"{row.attempts} ({row.total_attempts} in all: {row.earlier_attempts} before it was put back)"


def _holder(row: Any, now: float, *, short: bool = False) -> str:
    """Why a delivery on its way waits: the process holding its lease, since when, and whether it is alive."""
    from gateway.store.store import holder_state

    state = holder_state(row.lease_owner, row.lease_until, now)
    since = _when_iso(row.leased_since)
    said = f"leased by process {row.lease_owner} since {since}"
    if state == "gone":
        return said + (" (gone: tried again at the next delivery pass)" if short else
                       ", which is gone (killed or crashed): the next delivery pass tries it again at once")
    if state == "expired":
        return said + (" (lease ended: tried again at the next delivery pass)" if short else
                       ", whose lease has ended: the next delivery pass tries it again")
    if short:
        return said
    return (said + ", waiting for the receiver's answer; should that process die first, it is tried again at once "
            f"(at the latest when its lease ends, {_when(row.lease_until)})")


def _when_iso(stamp: str | None) -> str:
    try:
        return _when(_dt.datetime.fromisoformat(stamp or "").timestamp())
    except ValueError:
        return str(stamp)


@outbox.command("show")
@click.argument("row_id", type=RECORD_NUMBER)
@click.pass_context
def outbox_show(ctx: click.Context, row_id: int) -> None:
    """One delivery, with the receiver's signed receipt."""
    ex = _exchange(ctx)
    row = ex.outbox.get(row_id)
    click.echo(f"#{row.id} {row.status} to {row.destination} at {row.url}")
    click.echo(f"payload sha256 {row.payload_sha256}, attempts {_attempts(row)}, created {row.created_at}, "
               f"updated {row.updated_at}")
    if row.status == "delivering" and row.lease_until and row.lease_owner:
        click.echo(printable(f"on its way: {_holder(row, ex.clock().timestamp())}"))
    elif row.status == "delivering" and row.lease_until:
        click.echo(f"on its way: the sender holds it until {_when(row.lease_until)}, then it is tried again "
                   "(a gateway that stops cleanly gives it back at once)")
    if row.last_error:
        click.echo(printable(f"last error: {row.last_error}"))
    if row.receipt:  # (its signature: the receiver's detached JWS over the rest, canonical JSON)
        click.echo("receipt, signed by the receiver: " + jsonutil.dumps(row.receipt))


@outbox.command("retry")
@click.argument("row_ids", type=RECORD_NUMBER, nargs=-1)
@click.option("--dead", "all_dead", is_flag=True, help="Every dead delivery (oldest first).")
@click.option("--to", "destination", metavar="USCC", help="With --dead: only those to this member.")
@click.pass_context
def outbox_retry(ctx: click.Context, row_ids: tuple[int, ...], all_dead: bool, destination: str | None) -> None:
    """Put dead (or waiting) deliveries back to be tried now, each with a fresh attempt budget (sent to the endpoint
    the registry names now); the attempts made before are kept and shown beside the new ones.

    One line per delivery. Exit status 1 if any could not be put back (an unknown id, one delivered or being
    delivered now).
    """
    from gateway.errors import GatewayError

    if not row_ids and not all_dead:
        raise click.UsageError("name the deliveries to try again (IDs), or give --dead")
    if destination is not None and not all_dead:
        raise click.UsageError("--to chooses among the dead deliveries: give it with --dead")
    if destination is not None:
        from gateway.errors import IdentifierError
        from gateway.identifiers import check_uscc

        try:
            destination = check_uscc(destination.strip().upper())
        except IdentifierError as exc:
            raise click.BadParameter(exc.message, param_hint="--to") from None
    ex = _exchange(ctx)
    ids = list(row_ids)
    if all_dead:
        ids += sorted(row.id for row in ex.outbox.list("dead", 1_000_000)
                      if row.id not in ids and destination in (None, row.destination))
        if not ids:
            click.echo("no dead deliveries" + (f" to {destination}" if destination else ""))
    problems = 0
    for row_id in ids:
        try:
            ex.outbox.retry(row_id)
        except GatewayError as exc:
            click.echo(f"outbox #{row_id}: {exc.message}", err=True)
            problems += 1
            continue
        click.echo(f"outbox #{row_id} is pending again{_current_endpoint(ex, row_id)}")
    if problems:
        ctx.exit(1)


@outbox.command("replay")
@click.argument("row_id", type=RECORD_NUMBER)
@click.pass_context
def outbox_replay(ctx: click.Context, row_id: int) -> None:
    """Send a delivered payload again (the receiver answers with its first receipt); the attempts made before are
    kept."""
    ex = _exchange(ctx)
    ex.outbox.replay(row_id)
    click.echo(f"outbox #{row_id} will be sent again{_current_endpoint(ex, row_id)}")


def _current_endpoint(ex: Any, row_id: int) -> str:
    """Where a delivery will go: the endpoint the registry snapshot in force names for its destination."""
    from gateway.errors import GatewayError

    destination = ex.outbox.get(row_id).destination
    try:
        return f" (to {ex.endpoint_of(destination)})"
    except GatewayError as exc:
        return f" (not deliverable now: {exc.message})"


@outbox.command("deliver")
@click.pass_context
def outbox_deliver(ctx: click.Context) -> None:
    """Try every due delivery once now (waits for each destination's answer or its delivery_timeout; Ctrl-C gives
    back the deliveries on their way: due at once, their attempts unchanged)."""
    ex = _exchange(ctx)
    try:
        counts = ex.deliver(wait=None)
    except KeyboardInterrupt:
        _interrupted(ctx, ex)
    click.echo(", ".join(f"{n} {k}" for k, n in counts.items()))
