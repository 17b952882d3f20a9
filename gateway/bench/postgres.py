"""Bench stages on PostgreSQL, beside the SQLite ones in the same run.

- ``pg-e2e``: what ``e2e`` measures (HL7 v2 ORU^R01 → validated, signed, stored), the member's database on
  PostgreSQL, one node;
- ``pg-e2e-2``: two nodes (two processes, as two ``gateway serve`` hosts would be) ingesting at once into one
  database; the rate is both together, per core used;
- ``pg-inbound``: what ``inbound`` measures (a received signed Bundle → verified, checked, stored, decided,
  audited, receipt), the receiver on PostgreSQL;
- ``pg-inbound-2``: two receiving nodes on one database.

The PostgreSQL is the machine's own (Debian's ``postgresql``), a throwaway cluster started for the run on a
loopback port (:mod:`gateway.store.pgcluster`) with ``synchronous_commit = off``: the durability of SQLite's
``synchronous = NORMAL`` in WAL mode that the SQLite stages use (a crash of the database host may lose the last
transactions, never corrupt). The stages say "not available" when PostgreSQL or psycopg is not installed.
Every writing transaction takes the member's write lock, so two nodes share the writes; what they gain is the
work outside the lock (parsing, mapping, validation, signing).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.bench.context import BenchContext
from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC, OBX_PER_MESSAGE, oru_batch
from gateway.bench.measure import NotAvailable, StageResult
from gateway.bench.stages import STAGES, _timed, stage

__all__ = ["pg_e2e_stage", "pg_e2e_nodes_stage", "pg_inbound_stage", "pg_inbound_nodes_stage"]

RECEIVER_USCC = "12500102MB0002006J"
RECEIVER_NAME = "重庆市涪陵中心医院（演示）"


def _cluster(ctx: BenchContext) -> Any:
    def make() -> Any:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise NotAvailable("psycopg is not installed (pip install 'cyhr-gateway[postgresql]')") from None
        from gateway.store.pgcluster import Cluster, ClusterError

        try:
            cluster = Cluster(fast=False, settings={"synchronous_commit": "off"}).start()
        except ClusterError as exc:
            raise NotAvailable(str(exc)) from None
        ctx.on_close(cluster.stop)
        return cluster
    return ctx.cached("pg-cluster", make)


def _database(ctx: BenchContext, name: str) -> str:
    return str(_cluster(ctx).create_database(name.replace("-", "_")))


def _compare(result: StageResult, sqlite_stage: str) -> None:
    result.extra["sqlite_stage"] = sqlite_stage


@stage("pg-e2e", "end to end on PostgreSQL, 1 node: validated, signed, stored")
def pg_e2e_stage(ctx: BenchContext) -> StageResult:
    from gateway.pipeline import Pipeline, Status

    settings = ctx.member_settings("pg-e2e", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME)
    pipeline = Pipeline(settings.replace(database=_database(ctx, "pg-e2e")), clock=ctx.clock)
    failures: list[str] = []

    def ingest(raw: bytes) -> Any:
        outcome = pipeline.ingest(raw, "hl7v2", channel="bench")[0]
        if outcome.status is not Status.STORED or outcome.signed is None:
            failures.append(outcome.status.value)
        return outcome

    ingest(ctx.fresh_messages(1)[0])  # the schema is created on first use
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    messages = ctx.fresh_messages(n + k)
    result = StageResult("pg-e2e", STAGES["pg-e2e"].title, note="profile check on; signed with marks; 1 node")
    before = _size(pipeline)
    _timed(ctx, result, ingest, messages[:n], messages[n:])
    stored = result.items + len(messages[n:])
    if stored:  # what the database grew by (tables, indexes, TOAST; dead row versions not yet vacuumed included)
        result.extra["bytes_per_message"] = round((_size(pipeline) - before) / stored)
        result.note += f"; database +{result.extra['bytes_per_message'] / 1024:.0f} KiB per message"
    pipeline.close()
    _compare(result, "e2e")
    if failures:
        result.status = "failed"
        result.note += f"; {len(failures)} message(s) not stored and signed, e.g. {failures[0]}"
    return result


@stage("pg-e2e-2", "end to end on PostgreSQL, 2 nodes on one database", quick=False)
def pg_e2e_nodes_stage(ctx: BenchContext) -> StageResult:
    settings = ctx.member_settings("pg-e2e-2", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME)
    url = _database(ctx, "pg-e2e-2")
    per_node = max(20, ctx.options.per_stage)
    jobs = [{"kind": "e2e", "settings": _settings_dict(settings.replace(database=url, data_dir=str(
        ctx.workdir / f"pg-e2e-2-node{i}"))), "seed": ctx.options.seed, "start": 1_000_000 * (i + 1),
        "count": per_node, "cap_s": ctx.options.cap_s} for i in range(2)]
    result = _run_nodes(ctx, "pg-e2e-2", jobs, unit="msg")
    result.note = "profile check on; signed with marks; 2 processes on one database, rate of both per core"
    _compare(result, "e2e")
    return result


@stage("pg-inbound", "inbound signed Bundle on PostgreSQL, 1 node (Pipeline.receive_signed)")
def pg_inbound_stage(ctx: BenchContext) -> StageResult:
    from gateway.pipeline import Pipeline

    n = max(1, ctx.options.per_stage // (4 if ctx.options.quick else 2))
    texts = _signed_texts(ctx, n + 1)
    settings = ctx.member_settings("pg-inbound", RECEIVER_USCC, RECEIVER_NAME)
    receiver = Pipeline(settings.replace(database=_database(ctx, "pg-inbound")), clock=ctx.clock)
    if receiver.member.holder is None:
        raise NotAvailable("the receiving member has no registry snapshot")
    statuses: dict[int, int] = {}

    def receive(text: bytes) -> Any:
        answer = receiver.receive_signed(text, BENCH_ISSUER_USCC)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        return answer

    receive(texts.pop())
    result = StageResult("pg-inbound", STAGES["pg-inbound"].title, unit="Bundle")
    _timed(ctx, result, receive, texts)
    receiver.close()
    result.note = f"answers {statuses}; verified, checked, stored, decided, audited, receipt signed; 1 node"
    if set(statuses) - {200, 201}:
        result.status = "failed"
    _compare(result, "inbound")
    return result


@stage("pg-inbound-2", "inbound signed Bundles on PostgreSQL, 2 nodes on one database", quick=False)
def pg_inbound_nodes_stage(ctx: BenchContext) -> StageResult:
    n = max(10, ctx.options.per_stage // 2)
    texts = _signed_texts(ctx, 2 * n)
    url = _database(ctx, "pg-inbound-2")
    settings = ctx.member_settings("pg-inbound-2", RECEIVER_USCC, RECEIVER_NAME)
    jobs = []
    for i in range(2):
        folder = ctx.workdir / f"pg-inbound-2-node{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bundles.json").write_text(json.dumps([t.decode("utf-8") for t in texts[i::2]]), encoding="utf-8")
        jobs.append({"kind": "inbound", "settings": _settings_dict(settings.replace(database=url, data_dir=str(
            folder))), "bundles": str(folder / "bundles.json"), "sender": BENCH_ISSUER_USCC,
            "cap_s": ctx.options.cap_s})
    result = _run_nodes(ctx, "pg-inbound-2", jobs, unit="Bundle")
    result.note = "verified, checked, stored, decided, audited, receipt signed; 2 processes, rate of both per core"
    _compare(result, "inbound")
    return result


# ---------------------------------------------------------------------- shared pieces


def _signed_texts(ctx: BenchContext, count: int) -> list[bytes]:
    """Bundles signed by the bench issuer's own pipeline (its sign stage and marks), as a peer would send them."""
    from gateway.bench.stages import _bundles
    from gateway.pipeline import Pipeline

    sender = Pipeline(ctx.member_settings("pg-sender", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
    signer, marks = sender.member.signer, sender.member.marks
    if signer is None or marks is None:
        raise NotAvailable("the sending member has no signing key or registry snapshot")
    texts = []
    for bundle in _bundles(ctx, ctx.fresh_messages(count)):
        marks.stamp(bundle)
        texts.append(signer.sign(bundle))
    sender.close()
    return texts


def _size(pipeline: Any) -> int:
    from gateway.store.views import ReadModels

    return ReadModels(pipeline.store.db).database_bytes()


def _settings_dict(settings: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def _run_nodes(ctx: BenchContext, name: str, jobs: list[dict[str, Any]], *, unit: str) -> StageResult:
    """Start one process per job, let each get ready, start them together, and add up what they did."""
    procs = []
    for job in jobs:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.bench.postgres"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        procs.append(proc)
    for proc in procs:  # each says "ready" once its pipeline is open and its first item is done
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            _, err = proc.communicate(timeout=60)
            raise RuntimeError(f"a node did not start: {(line or err.strip().splitlines()[-1:] or ['?'])[-1]}")
    t0 = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=max(600.0, 4 * ctx.options.cap_s))
        if proc.returncode != 0:
            raise RuntimeError(f"a node failed: {(err.strip().splitlines() or ['?'])[-1]}")
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    result = StageResult(name, STAGES[name].title, unit=unit, cores=float(min(len(jobs), os.cpu_count() or 1)))
    result.items = sum(o["items"] for o in outputs)
    result.observations = result.items * OBX_PER_MESSAGE if unit == "msg" else 0
    result.wall_s = wall
    result.cpu_s = sum(o["cpu_s"] for o in outputs)
    result.latencies_ms = [ms for o in outputs for ms in o["latencies_ms"]]
    failures = [f for o in outputs for f in o["failures"]]
    result.extra["nodes"] = len(jobs)
    if failures:
        result.status = "failed"
        result.note = f"{len(failures)} item(s) failed, e.g. {failures[0]}"
    return result


def _node_main() -> int:
    """One node of a multi-node stage: read the job, get ready, wait for "go", work, print what it did."""
    import datetime as _dt
    import logging

    from gateway.bench.context import BENCH_NOW
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline, Status

    logging.getLogger("gateway").setLevel(logging.WARNING)
    job = json.loads(sys.stdin.readline())
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in job["settings"].items()}
    settings = load_settings(environ={}, overrides=values)
    pipeline = Pipeline(settings, clock=lambda: BENCH_NOW)
    failures: list[str] = []
    latencies: list[float] = []
    if job["kind"] == "e2e":
        items: list[Any] = oru_batch(job["count"] + 1, job["seed"], start=job["start"])

        def work(raw: Any) -> None:
            outcome = pipeline.ingest(raw, "hl7v2", channel="bench")[0]
            if outcome.status is not Status.STORED or outcome.signed is None:
                failures.append(outcome.status.value)
    else:
        items = [t.encode("utf-8") for t in json.loads(Path(job["bundles"]).read_text(encoding="utf-8"))]

        def work(raw: Any) -> None:
            answer = pipeline.receive_signed(raw, job["sender"])
            if answer.status not in (200, 201):
                failures.append(str(answer.status))
    work(items.pop())
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    deadline = time.monotonic() + float(job["cap_s"])
    cpu0 = time.process_time()
    done = 0
    for item in items:
        t0 = time.perf_counter()
        work(item)
        latencies.append((time.perf_counter() - t0) * 1000)
        done += 1
        if time.monotonic() > deadline:
            break
    pipeline.close()
    print(json.dumps({"items": done, "cpu_s": time.process_time() - cpu0, "latencies_ms": latencies,
                      "failures": failures[:5], "at": _dt.datetime.now().isoformat()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_node_main())
