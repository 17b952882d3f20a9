"""Bench areas: the baseline, the servers under load, CDC CSV, inbound Bundles and the audit log.

- ``baseline``: the straightforward pipeline (:mod:`gateway.bench.baseline`) on the same messages;
- ``mllp``: ACK latency under a steady load of real TCP clients against the MLLP
  listener process that ``gateway serve`` starts (``python -m gateway.serve``);
- ``http``: ``POST /ingest/hl7v2`` from concurrent clients against ``gateway serve``
  (waitress worker processes) on loopback, as an authenticated ``submitter``;
- ``csv``: a generated CDC export through ``Pipeline.convert`` as a stream;
- ``inbound``: the receiving member's ``Pipeline.receive_signed`` on Bundles signed by the sender's pipeline;
- ``audit-search``, ``audit-verify``: a log filled by the audit area's own bulk loader.

Each raises :class:`~gateway.bench.measure.NotAvailable`, saying what is missing,
when its product code is not there.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
from pathlib import Path
from typing import Any

from gateway.bench.context import BenchContext
from gateway.bench.measure import NotAvailable, StageResult, settled
from gateway.bench.stages import STAGES, _timed, stage

__all__ = ["baseline_stage", "mllp_stage", "mllp_queued_stage", "http_stage", "csv_stage", "inbound_stage",
           "audit_search_stage", "audit_verify_stage"]


def _require(module: str, *names: str) -> Any:
    """Import ``module`` and check it has ``names``; NotAvailable naming what is missing otherwise."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise NotAvailable(f"{module} not there yet ({exc})") from None
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise NotAvailable(f"{module} has no {', '.join(missing)} yet")
    return mod


@stage("baseline", "baseline: python-hl7 > R4B models > rfc8785 > jwcrypto > 1 row/tx")
def baseline_stage(ctx: BenchContext) -> StageResult:
    from gateway.bench.baseline import Baseline
    from gateway.signing.keys import kid_of, private_key_pem

    signer = ctx.signer()
    settings = ctx.settings("baseline")
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    base = Baseline(settings.database_file or Path(settings.data_dir) / "gateway.db",
                    settings.mappings_dir, settings.issuer_uscc, settings.issuer_name,
                    private_key_pem(signer.key), kid_of(signer.chain[0]))
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    messages = ctx.fresh_messages(n + k + 1)
    base.process(messages.pop())  # imports and model building happen once, outside the timing
    result = StageResult("baseline", STAGES["baseline"].title)
    _timed(ctx, result, base.process, messages[:n], messages[n:])
    base.close()
    return result


@stage("mllp", "MLLP round trip: ACK latency at a fixed rate")
def mllp_stage(ctx: BenchContext) -> StageResult:
    from gateway.bench.servers import run_mllp_load

    return run_mllp_load(ctx, STAGES["mllp"].title)


@stage("mllp-queued", "MLLP accept, then process (mllp_ack = received): ACK latency at a fixed rate", quick=False)
def mllp_queued_stage(ctx: BenchContext) -> StageResult:
    """Not in ``--quick``: it waits for the queue reader to store what it took, which a smoke check cannot afford."""
    from gateway.bench.servers import run_mllp_load

    return run_mllp_load(ctx, STAGES["mllp-queued"].title, ack="received")


@stage("http", "HTTP ingest, concurrent clients, gateway serve (waitress)")
def http_stage(ctx: BenchContext) -> StageResult:
    from gateway.bench.servers import run_http_load

    return run_http_load(ctx, STAGES["http"].title)


def _rss_kib() -> int:
    """This process's resident set size now, in KiB (Linux); 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * (os.sysconf("SC_PAGE_SIZE") // 1024)


@stage("csv", "CDC CSV > Bundles (Pipeline.convert, streamed)")
def csv_stage(ctx: BenchContext) -> StageResult:
    import time

    from gateway.bench.inputs import CDC_NAME, CDC_USCC, write_cdc_csv

    _require("gateway.adapters.labcsv", "LabCSVAdapter")
    pipeline = ctx.pipeline("csv", issuer_uscc=CDC_USCC, issuer_name=CDC_NAME)
    if "cdc-csv" not in pipeline.channels:
        raise NotAvailable("the pipeline has no cdc-csv channel yet")
    path = ctx.workdir / "cdc-export.csv"
    rows = write_cdc_csv(path, ctx.options.csv_row_count, ctx.options.seed)
    result = StageResult("csv", STAGES["csv"].title, unit="row")
    statuses: dict[str, int] = {}
    rss: list[int] = []
    done_rows = 0
    deadline = time.monotonic() + ctx.options.cap_s * 3
    clock = time.perf_counter_ns
    with settled(), open(path, "rb") as stream:
        outcomes = pipeline.convert(stream, "cdc-csv", path.name)
        cpu0, t0 = time.process_time(), clock()
        while True:
            s = clock()
            outcome = next(outcomes, None)
            if outcome is None:
                break
            result.latencies_ms.append((clock() - s) / 1e6)
            statuses[outcome.status.value] = statuses.get(outcome.status.value, 0) + 1
            if outcome.bundle is not None:
                observations = sum(1 for e in outcome.bundle["entry"]
                                   if e["resource"]["resourceType"] == "Observation")
                result.observations += observations
            done_rows += len(outcome.message.reports[0].results) if outcome.message and outcome.message.reports else 0
            if len(result.latencies_ms) % 50 == 1:
                rss.append(_rss_kib())
            if time.monotonic() > deadline:
                result.note = f"time cap reached after {done_rows} of {rows} rows; "
                break
        result.wall_s = (clock() - t0) / 1e9
        result.cpu_s = time.process_time() - cpu0
        result.threads = True
    rss.append(_rss_kib())
    result.items = done_rows
    growth = (rss[-1] - rss[min(1, len(rss) - 1)]) if rss else 0
    result.extra = {"rows_in_file": rows, "exams": sum(statuses.values()), "statuses": statuses,
                    "rss_kib_first": rss[0] if rss else None, "rss_kib_last": rss[-1] if rss else None,
                    "rss_growth_kib": growth}
    result.note += (f"{sum(statuses.values())} exams {statuses}; latency per exam (8 rows); "
                    f"RSS growth after the first exams {growth} KiB")
    pipeline.close()
    if statuses.get("converted", 0) != sum(statuses.values()):
        result.status = "failed"
    return result


@stage("inbound", "inbound signed Bundle > verify > check > recognise > audit (Pipeline.receive_signed)")
def inbound_stage(ctx: BenchContext) -> StageResult:
    """The receiving member's ``Pipeline.receive_signed``: raw text stored, signature verified against the
    registry snapshot, profiles checked, resources stored, recognition decided, audited, receipt
    signed. The sending member signs with its own pipeline's sign stage. Both are demo members
    with keys and the snapshot generated at run time."""
    from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC
    from gateway.bench.stages import _bundles

    try:
        from gateway.pipeline import Pipeline
    except ImportError as exc:
        raise NotAvailable(f"the pipeline does not load: {exc}") from None
    receiver_uscc = "12500102MB0002006J"  # the demo Chongqing hospital receives the county hospital's reports
    sender = Pipeline(ctx.member_settings("sender", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
    receiver = Pipeline(ctx.member_settings("inbound", receiver_uscc, "重庆市涪陵中心医院（演示）"), clock=ctx.clock)
    signer, marks = sender.member.signer, sender.member.marks
    if receiver.member.holder is None or signer is None or marks is None:
        raise NotAvailable("the bench members have no signing key or registry snapshot")
    n = max(1, ctx.options.per_stage // (4 if ctx.options.quick else 2))
    k = ctx.options.memory_sample
    texts = []
    for bundle in _bundles(ctx, ctx.fresh_messages(n + k + 1)):
        marks.stamp(bundle)
        texts.append(signer.sign(bundle))
    statuses: dict[int, int] = {}
    decisions = [0]

    def receive(text: bytes) -> Any:
        answer = receiver.receive_signed(text, BENCH_ISSUER_USCC)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        decisions[0] += len(answer.decisions or [])
        return answer

    receive(texts.pop())  # schemas are created on first use
    result = StageResult("inbound", STAGES["inbound"].title, unit="Bundle")
    _timed(ctx, result, receive, texts[:n], texts[n:])
    receiver.close()
    sender.close()
    result.extra = {"statuses": statuses, "decisions": decisions[0], "receiver": receiver_uscc}
    result.note = (f"answers {statuses}; {decisions[0]} recognition decisions; "
                   "raw stored, verified, profile-checked, stored, decided, audited, receipt signed")
    if set(statuses) - {200, 201}:
        result.status = "failed"
    return result


def _audit_log(ctx: BenchContext) -> tuple[Any, int, float]:
    """The bench's audit log, filled once per run by the audit area's own bulk loader: (db, entries, seconds)."""
    def make() -> tuple[Any, int, float]:
        import time

        bulk = _require("gateway.audit.bulk", "fill")
        from gateway.bench.context import BENCH_NOW
        from gateway.store.db import connect

        path = ctx.workdir / "audit" / "audit.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        db = connect(path)
        t0 = time.perf_counter()
        count = bulk.fill(db, ctx.options.audit_entry_count, start=BENCH_NOW - _dt.timedelta(days=30),
                          step=_dt.timedelta(seconds=2), seed=ctx.options.seed)
        return db, count, time.perf_counter() - t0
    return ctx.cached("audit-log", make)  # type: ignore[no-any-return]


# Typical auditor searches over the filled log (it starts 30 days before the bench's "now", one entry every 2 s).
_AUDIT_QUERIES: list[list[tuple[str, str]]] = [
    [],
    [("date", "ge2026-04-22"), ("date", "lt2026-04-22T06:00")],
    [("type", "https://fhir.cyhr.org.cn/CodeSystem/audit-event-type|lab-recognition")],
    [("subtype", "not-recognized"), ("_sort", "date")],
    [("agent:identifier", "https://fhir.cyhr.org.cn/sid/uscc|12500003MB0000003")],
    [("entity:identifier", "urn:oid:2.16.156.10011.1.33|R1001")],
    [("outcome", "4")],
    [("date", "ge2026-04-22"), ("agent:identifier", "https://fhir.cyhr.org.cn/sid/uscc|12500007MB0000007"),
     ("_count", "20")],
]


@stage("audit-search", "audit search (AuditEvent) over a filled log", quick=False)
def audit_search_stage(ctx: BenchContext) -> StageResult:
    query = _require("gateway.audit.query", "parse_search", "run")
    from gateway.bench.context import CST

    db, entries, fill_s = _audit_log(ctx)
    searches = [query.parse_search(params, tz=CST) for params in _AUDIT_QUERIES]
    rounds = max(3, min(30, ctx.options.per_stage // 50))
    result = StageResult("audit-search", STAGES["audit-search"].title, unit="query")
    _timed(ctx, result, lambda search: query.run(db, search), searches * rounds)
    result.observations = 0
    result.extra = {"entries": entries, "fill_s": round(fill_s, 1), "queries": len(_AUDIT_QUERIES)}
    scale = "" if entries >= 1_000_000 else "; NOT 1 M entries (--audit-entries 1000000 for the target's size)"
    result.note = (f"{entries:,} entries (filled by gateway.audit.bulk in {fill_s:.0f} s); {len(_AUDIT_QUERIES)} "
                   f"query shapes, pages of 50{scale}")
    return result


@stage("audit-verify", "audit chain verification (gateway.audit.verify)", quick=False)
def audit_verify_stage(ctx: BenchContext) -> StageResult:
    import time

    verify = _require("gateway.audit.verify", "verify")
    db, entries, fill_s = _audit_log(ctx)
    result = StageResult("audit-verify", STAGES["audit-verify"].title, unit="entry")
    cpu0, t0 = time.process_time(), time.perf_counter()
    report = verify.verify(db)
    result.wall_s = time.perf_counter() - t0
    result.cpu_s = time.process_time() - cpu0
    result.threads = True
    result.items = entries
    result.latencies_ms = [result.wall_s * 1000]
    per_million = result.wall_s / entries * 1_000_000 if entries else None
    result.extra = {"entries": entries, "ok": report.ok, "seconds_per_million_linear": per_million}
    result.note = (f"{entries:,} entries in {result.wall_s:.2f} s, chain {'OK' if report.ok else 'BROKEN'}"
                   + ("" if entries >= 1_000_000 else f"; 1 M entries extrapolated (linear): {per_million:.1f} s"))
    if not report.ok:
        result.status = "failed"
    return result


# The same paths on PostgreSQL, beside these, in the same run.
from gateway.bench import postgres as _postgres  # noqa: E402,F401
