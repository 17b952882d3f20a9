"""Bench stages: one measurement per pipeline stage and per area, in a registry.

Each stage is a function ``(BenchContext) -> StageResult`` registered with
:func:`stage`; ``gateway bench --stages`` picks them by name. A stage calls the
product's own code for what it measures (adapter, mapping, builders, profile
check, signing, store, pipeline, servers) and raises
:class:`~gateway.bench.measure.NotAvailable` when that code is not there yet;
it never stands in for missing code. To cover a new area, add a function here
(or in a module imported at the end of this one) with ``@stage(...)``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.adapters.base import RawUnit
from gateway.bench.context import BenchContext
from gateway.bench.inputs import OBX_PER_MESSAGE
from gateway.bench.measure import NotAvailable, StageResult, settled, time_items, traced_peak

__all__ = ["Stage", "STAGES", "stage", "selected"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A registered measurement."""

    name: str
    title: str
    run: Callable[[BenchContext], StageResult]
    quick: bool = True  # part of --quick


STAGES: dict[str, Stage] = {}


StageFn = Callable[[BenchContext], StageResult]


def stage(name: str, title: str, *, quick: bool = True) -> Callable[[StageFn], StageFn]:
    """Register a stage under ``name`` (the order of registration is the order of the table)."""
    def register(fn: StageFn) -> StageFn:
        STAGES[name] = Stage(name, title, fn, quick)
        return fn
    return register


def selected(names: tuple[str, ...], quick: bool) -> list[Stage]:
    """The stages to run: those named (any mode), or every stage of the mode.

    :raises KeyError: an unknown stage name (the message lists the known ones).
    """
    if names:
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            raise KeyError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
        return [STAGES[n] for n in STAGES if n in names]
    return [s for s in STAGES.values() if s.quick or not quick]


# ---------------------------------------------------------------------- helpers


def _hl7v2_parts(ctx: BenchContext) -> tuple[Any, Any, Any]:
    """(adapter, terminology, issuer), set up as the pipeline's HL7 v2 channel sets them up: of the compiled twins
    when they are in use (gateway.native), as the pipeline's are."""
    def make() -> tuple[Any, Any, Any]:
        from gateway import native
        from gateway.fhir.parties import Issuer
        from gateway.mapping.tables import load_mappings

        settings = ctx.settings("parts")
        mappings = load_mappings(settings.mappings_dir)
        structure = mappings.structure("hl7v2-oru-r01")
        adapter = native.load("gateway.adapters.hl7v2").HL7v2Adapter(
            structure, default_offset=settings.timezone, max_message_bytes=settings.max_message_bytes)
        terms = native.load("gateway.mapping.concepts").Terminology.for_structure(mappings, structure)
        return adapter, terms, Issuer(settings.issuer_uscc, settings.issuer_name, settings.issuer_miplrn)
    return ctx.cached("hl7v2-parts", make)  # type: ignore[no-any-return]


def _read(ctx: BenchContext, messages: list[bytes]) -> list[Any]:
    adapter, _, _ = _hl7v2_parts(ctx)
    out = [adapter.read(RawUnit(m, 1)) for m in messages]
    for msg in out:
        if msg.errors:
            raise RuntimeError(f"generated message refused: {msg.errors[0].line()}")
    return out


def _mapped(ctx: BenchContext, messages: list[bytes]) -> list[Any]:
    from gateway import native

    map_message = native.load("gateway.mapping.concepts").map_message
    _, terms, issuer = _hl7v2_parts(ctx)
    out = _read(ctx, messages)
    for msg in out:
        map_message(msg, terms, issuer.uscc)
    return out


def _bundles(ctx: BenchContext, messages: list[bytes]) -> list[dict[str, Any]]:
    from gateway import native

    build_bundle = native.load("gateway.fhir.bundle").build_bundle
    _, _, issuer = _hl7v2_parts(ctx)
    return [build_bundle(msg, issuer) for msg in _mapped(ctx, messages)]


def _obs(item: Any, out: Any) -> int:
    return OBX_PER_MESSAGE


def _timed(ctx: BenchContext, result: StageResult, fn: Callable[[Any], Any], items: list[Any],
           memory_items: list[Any] | None = None, *, keep: bool = False) -> list[Any]:
    """Time ``fn`` over ``items`` in slices until done or the per-stage time cap is reached; then trace memory.
    ``keep``: return ``fn``'s results (otherwise each is dropped once timed, as the product drops its own)."""
    import time

    outputs: list[Any] = []
    deadline = time.monotonic() + ctx.options.cap_s
    step = max(1, min(50, len(items) // 4 or 1))
    with settled():
        for start in range(0, len(items), step):
            outputs += time_items(result, fn, items[start:start + step], _obs, keep=keep)
            if time.monotonic() > deadline:
                result.note = ((result.note + "; " if result.note else "")
                               + f"time cap {ctx.options.cap_s:g} s reached")
                break
    if memory_items:
        result.peak_kib = traced_peak(fn, memory_items)
    return outputs


# ---------------------------------------------------------------------- HL7 v2 stages


@stage("parse", "HL7 v2 parse (adapter.read)")
def parse_stage(ctx: BenchContext) -> StageResult:
    adapter, _, _ = _hl7v2_parts(ctx)
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    units = [RawUnit(m, 1) for m in ctx.fresh_messages(n + k)]
    result = StageResult("parse", STAGES["parse"].title)
    out = _timed(ctx, result, adapter.read, units[:n], units[n:], keep=True)
    if any(m.errors for m in out):
        raise RuntimeError("generated messages were refused by the adapter")
    return result


@stage("map", "map codes/units/flags (map_message)")
def map_stage(ctx: BenchContext) -> StageResult:
    from gateway import native

    map_message = native.load("gateway.mapping.concepts").map_message
    _, terms, issuer = _hl7v2_parts(ctx)
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    msgs = _read(ctx, ctx.fresh_messages(n + k))
    result = StageResult("map", STAGES["map"].title)
    _timed(ctx, result, lambda m: map_message(m, terms, issuer.uscc), msgs[:n], msgs[n:])
    return result


@stage("build", "build FHIR Bundle (build_bundle)")
def build_stage(ctx: BenchContext) -> StageResult:
    from gateway import native

    build_bundle = native.load("gateway.fhir.bundle").build_bundle
    _, _, issuer = _hl7v2_parts(ctx)
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    msgs = _mapped(ctx, ctx.fresh_messages(n + k))
    result = StageResult("build", STAGES["build"].title)
    _timed(ctx, result, lambda m: build_bundle(m, issuer), msgs[:n], msgs[n:])
    return result


@stage("check", "profile validation (Guide.validate)")
def check_stage(ctx: BenchContext) -> StageResult:
    validate = ctx.checker()
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    bundles = _bundles(ctx, ctx.fresh_messages(n + k))
    result = StageResult("check", STAGES["check"].title)
    issues = _timed(ctx, result, validate, bundles[:n], bundles[n:], keep=True)
    errors = sum(1 for found in issues for i in found if i.severity in ("error", "fatal"))
    if errors:
        first = next(i for found in issues for i in found if i.severity in ("error", "fatal"))
        result.note = f"{errors} error(s) on generated Bundles, e.g. {first.line()}"
    return result


@stage("sign", "sign Bundle ES256/JCS (sign_bundle)")
def sign_stage(ctx: BenchContext) -> StageResult:
    n, k = ctx.options.per_stage, ctx.options.memory_sample
    bundles = _bundles(ctx, ctx.fresh_messages(n + k))
    ctx.signer()  # key generation is not part of signing
    result = StageResult("sign", STAGES["sign"].title)
    _timed(ctx, result, ctx.sign, bundles[:n], bundles[n:])
    return result


@stage("store", "store raw + Bundle, SQLite WAL (Store)")
def store_stage(ctx: BenchContext) -> StageResult:
    from gateway.store.store import Store

    n, k = ctx.options.per_stage, ctx.options.memory_sample
    messages = ctx.fresh_messages(n + k)
    bundles = _bundles(ctx, messages)
    settings = ctx.settings("store")
    store = Store.open(settings.database_locator, ctx.clock)

    def save(pair: tuple[bytes, dict[str, Any]]) -> None:
        raw, bundle = pair
        record_id, _ = store.insert_raw(channel="bench", fmt="hl7v2", sender="LIS|TJXRMYY",
                                        message_id=bundle["id"], origin="", raw=raw)
        store.finish(record_id, status="stored", ack_code="AA", ack=b"MSA|AA", issues=[], bundle=bundle)

    pairs = list(zip(messages, bundles))
    result = StageResult("store", STAGES["store"].title)
    _timed(ctx, result, save, pairs[:n], pairs[n:])
    result.note = "raw insert and outcome: 2 transactions per message, WAL, synchronous=NORMAL"
    store.close()
    return result


@stage("store-batch", "store, 20 messages per transaction pair (Store API)")
def store_batch_stage(ctx: BenchContext) -> StageResult:
    """What an ``ingest_many`` would get from the same Store: raw inputs of a batch committed together
    (before processing, as now), then their outcomes and Bundles committed together; every answer of
    the batch waits for the second commit (latency = the batch's time)."""
    import time

    from gateway.store.db import transaction
    from gateway.store.store import Store

    batch = 20
    n = max(batch, ctx.options.per_stage // batch * batch)
    messages = ctx.fresh_messages(n)
    bundles = _bundles(ctx, messages)
    store = Store.open(ctx.settings("store-batch").database_locator, ctx.clock)
    result = StageResult("store-batch", STAGES["store-batch"].title, note=f"{batch} messages per commit pair")
    deadline = time.monotonic() + ctx.options.cap_s
    with settled():
        for start in range(0, n, batch):
            pairs = list(zip(messages[start:start + batch], bundles[start:start + batch]))
            t0 = time.perf_counter()
            c0 = time.process_time()
            with transaction(store.db):
                ids = [store.insert_raw(channel="bench", fmt="hl7v2", sender="LIS|TJXRMYY", message_id=b["id"],
                                        origin="", raw=raw)[0] for raw, b in pairs]
            with transaction(store.db):
                for record_id, (_, b) in zip(ids, pairs):
                    store.finish(record_id, status="stored", ack_code="AA", ack=b"MSA|AA", issues=[], bundle=b)
            took = time.perf_counter() - t0
            result.cpu_s += time.process_time() - c0  # (the timed part only, as wall_s)
            result.wall_s += took
            result.items += len(pairs)
            result.observations += len(pairs) * OBX_PER_MESSAGE
            result.latencies_ms += [took * 1000] * len(pairs)
            if time.monotonic() > deadline:
                result.note += f"; time cap {ctx.options.cap_s:g} s reached"
                break
    result.threads = True
    store.close()
    return result


def _e2e(ctx: BenchContext, name: str, *, sign: bool) -> StageResult:
    from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC
    from gateway.pipeline import Pipeline, Status

    notes: list[str] = []
    signs_itself = False
    if sign:
        try:  # the member signs in the pipeline's own sign stage when it has a key and certificate
            pipeline = Pipeline(ctx.member_settings(name, BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
            exchange = getattr(pipeline, "exchange", None)
            signs_itself = exchange is not None and getattr(exchange, "identity", None) is not None
        except NotAvailable:
            pipeline = ctx.pipeline(name)
        if signs_itself:
            notes.append("signed in the pipeline's sign stage (with registry marks), signed copy stored")
        else:
            ctx.signer()
            notes.append("signed after ingest by sign_bundle (the pipeline has no sign stage)")
    else:
        pipeline = ctx.pipeline(name)
    checked = pipeline.checker is not None
    if not checked:
        try:  # an older pipeline without its own profile check: give it the guide's, as the issue requires
            pipeline.checker = ctx.checker()
            checked = True
        except NotAvailable:
            pass
    failures: list[str] = []

    def ingest(raw: bytes) -> Any:
        outcome = pipeline.ingest(raw, "hl7v2", channel="bench")[0]
        if outcome.status is not Status.STORED:
            failures.append(f"{outcome.status.value}: {outcome.errors[0].line() if outcome.errors else ''}")
            return outcome
        if sign and not signs_itself and outcome.bundle is not None:
            ctx.sign(outcome.bundle)
        elif sign and getattr(outcome, "signed", None) is None:
            failures.append("stored but not signed")
        return outcome

    n, k = ctx.options.per_stage, ctx.options.memory_sample
    messages = ctx.fresh_messages(n + k)
    ingest(ctx.fresh_messages(1)[0])  # first use opens the database and creates the schema
    result = StageResult(name, STAGES[name].title)
    _timed(ctx, result, ingest, messages[:n], messages[n:])
    pipeline.close()
    notes.insert(0, "profile check " + ("on" if checked else "NOT available"))
    if failures:
        result.status = "failed"
        notes.append(f"{len(failures)} message(s) not stored, e.g. {failures[0]}")
    result.note = "; ".join(notes + ([result.note] if result.note else []))
    return result


@stage("e2e", "end to end: Pipeline.ingest, validated, signed, stored")
def e2e_stage(ctx: BenchContext) -> StageResult:
    return _e2e(ctx, "e2e", sign=True)


@stage("e2e-batch", "end to end, 32 messages per Pipeline.ingest (a file; MLLP messages waiting together)")
def e2e_batch_stage(ctx: BenchContext) -> StageResult:
    """What ``e2e`` does, for a file of messages: the pipeline stores the raw messages of each 32 in one
    commit and their outcomes in a second, as it does for a file and for MLLP messages that arrive
    together. Every message of a batch is answered after the second commit (its latency is the batch's)."""
    import time

    from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC
    from gateway.pipeline import Pipeline, Status

    batch = 32
    pipeline = Pipeline(ctx.member_settings("e2e-batch", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
    if pipeline.exchange is None or pipeline.exchange.identity is None:
        raise NotAvailable("the bench member has no signing identity")
    pipeline.ingest(ctx.fresh_messages(1)[0], "hl7v2", channel="bench")  # opens the database, creates the schema
    n = max(batch, ctx.options.per_stage // batch * batch)
    messages = ctx.fresh_messages(n)
    result = StageResult("e2e-batch", STAGES["e2e-batch"].title,
                         note=f"{batch} messages per call; profile check on; signed with marks; signed copy stored")
    failures: list[str] = []
    deadline = time.monotonic() + ctx.options.cap_s
    with settled():
        for start in range(0, n, batch):
            data = b"\r\n".join(messages[start:start + batch])
            t0 = time.perf_counter()
            c0 = time.process_time()
            outcomes = pipeline.ingest(data, "hl7v2", channel="bench")
            took = time.perf_counter() - t0
            result.cpu_s += time.process_time() - c0  # (the timed part only, as wall_s)
            failures += [o.status.value for o in outcomes if o.status is not Status.STORED or o.signed is None]
            result.wall_s += took
            result.items += len(outcomes)
            result.observations += len(outcomes) * OBX_PER_MESSAGE
            result.latencies_ms += [took * 1000] * len(outcomes)
            del outcomes  # answered: the product drops a batch's outcomes before it works the next
            if time.monotonic() > deadline:
                result.note += f"; time cap {ctx.options.cap_s:g} s reached"
                break
    result.threads = True
    pipeline.close()
    if failures:
        result.status = "failed"
        result.note += f"; {len(failures)} message(s) not stored and signed, e.g. {failures[0]}"
    return result


@stage("ingest", "Pipeline.ingest of a member without signing key")
def ingest_stage(ctx: BenchContext) -> StageResult:
    return _e2e(ctx, "ingest", sign=False)


# Stages of other areas and the network ones register themselves on import.
from gateway.bench import areas as _areas  # noqa: E402,F401
