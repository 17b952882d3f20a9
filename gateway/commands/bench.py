"""Bench command: ``gateway bench [--quick] [--json FILE] [--stages ...]``.

Runs the benchmark of :mod:`gateway.bench` on this machine: every stage of the
HL7 v2 path, the baseline, CDC CSV, inbound Bundles, MLLP and HTTP under load on
loopback, and the audit log; prints the machine, versions and a table, and
writes JSON for comparing commits. Servers it starts listen on 127.0.0.1 only
and are stopped when it ends.
"""
from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from gateway.bench import STAGES, BenchOptions, run_bench

__all__ = ["bench"]


def _stage_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    names: list[str] = []
    for item in value:
        names += [n.strip() for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise click.BadParameter(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    return tuple(names)


#: Exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process SIGTERM ended).
TERMINATED = 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is: every ``finally`` of the run stops what it started (the servers)."""


@contextmanager
def _sigterm_stops_cleanly() -> Iterator[None]:
    """SIGTERM (a service manager, ``kill``, a CI job's timeout) stops the run as Ctrl-C does, stopping the servers
    it started (they run in sessions of their own, which neither signal reaches), instead of ending this process
    at once and leaving them running. A later SIGTERM while it stops is the same stop."""
    def stop(signum: int, frame: Any) -> None:
        from gateway.signals import ignore_later_signals

        ignore_later_signals(signal.SIGTERM)  # (one stop at a time: the servers are being stopped)
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding program): its own handling stays
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("bench")
@click.option("--quick", is_flag=True,
              help="Smoke check: few messages per stage, under 30 s; no audit or mllp-queued stages.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the results as JSON to this file (for comparing commits).")
@click.option("--stages", "stages", multiple=True, callback=_stage_names, metavar="NAME[,NAME...]",
              help=f"Run only these stages (repeatable or comma-separated): {', '.join(STAGES)}.")
@click.option("--count", type=click.IntRange(min=1),
              help="Messages per in-process stage (default 40 quick, 1000 full).")
@click.option("--seconds", type=click.FloatRange(min=0.1),
              help="Time cap per in-process stage (default 0.6 quick, 15 full).")
@click.option("--mllp-rate", type=click.FloatRange(min=1), default=200.0, show_default=True,
              help="MLLP messages per second offered, all clients together.")
@click.option("--mllp-clients", type=click.IntRange(min=1, max=32), default=3, show_default=True,
              help="MLLP client connections.")
@click.option("--mllp-workers", type=click.IntRange(min=1, max=16), default=2, show_default=True,
              help="MLLP listener processes of the server (its mllp_workers setting).")
@click.option("--queue-readers", type=click.IntRange(min=1, max=16), default=1, show_default=True,
              help="Queue reader processes of the server in mllp-queued (its queue_readers setting).")
@click.option("--queue-record-group", type=click.IntRange(min=1, max=64), default=None,
              help="Messages the queue reader records per transaction in mllp-queued (its queue_record_group "
                   "setting; default: the setting's default).")
@click.option("--mllp-seconds", type=click.FloatRange(min=0.5), help="MLLP load duration (default 1.5 quick, 20 full).")
@click.option("--http-clients", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Concurrent HTTP clients.")
@click.option("--http-requests", type=click.IntRange(min=1), help="HTTP requests in all (default 30 quick, 1000 full).")
@click.option("--csv-rows", type=click.IntRange(min=8),
              help="Rows of the generated CDC export (default 800 quick, 20,000 full).")
@click.option("--audit-entries", type=click.IntRange(min=1), help="Audit log size for search/verify (default 100,000).")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep databases, generated files and server logs here (default: a temporary directory, removed).")
@click.option("--seed", type=int, default=8, show_default=True, help="Seed of the generated inputs.")
@click.pass_context
def bench(ctx: click.Context, quick: bool, json_path: str | None, stages: tuple[str, ...], count: int | None,
          seconds: float | None,
          mllp_rate: float, mllp_clients: int, mllp_workers: int, queue_readers: int,
          queue_record_group: int | None, mllp_seconds: float | None,
          http_clients: int, http_requests: int | None, csv_rows: int | None, audit_entries: int | None,
          workdir: str | None, seed: int) -> None:
    """Measure every stage and end to end on this machine, against a straightforward baseline.

    Prints messages/s and Observations/s per core, median and p99 latency and
    peak memory per stage, the ratio to the baseline, and the issue's targets
    as met or not. Stages whose area is not built yet say so.

    Ctrl-C or SIGTERM stops it, and the servers it started, before the end (SIGTERM: one line, exit 143).
    """
    options = BenchOptions(quick=quick, stages=stages, count=count, seconds=seconds, seed=seed, workdir=workdir,
                           mllp_rate=mllp_rate, mllp_clients=mllp_clients, mllp_workers=mllp_workers,
                           queue_readers=queue_readers, queue_record_group=queue_record_group,
                           mllp_seconds=mllp_seconds,
                           http_clients=http_clients, http_requests=http_requests, csv_rows=csv_rows,
                           audit_entries=audit_entries)
    click.echo(f"gateway bench ({'quick' if quick else 'full'}): running...", err=True)
    try:
        with _sigterm_stops_cleanly():
            report = run_bench(options, echo=lambda line: click.echo(line, err=True))
    except _Terminated:
        click.echo("gateway bench: stopped by SIGTERM before the end; the servers it started are stopped", err=True)
        ctx.exit(TERMINATED)
    for line in report.lines():
        click.echo(line)
    if json_path:
        try:
            Path(json_path).write_text(json.dumps(report.as_json(), ensure_ascii=False, indent=2) + "\n",
                                       encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"{json_path}: cannot write: {exc.strerror}") from None
        click.echo(f"results written to {json_path}", err=True)
