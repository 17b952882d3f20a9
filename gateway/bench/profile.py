"""Where the time goes: cProfile of the bench's paths, by part.

``python -m gateway.bench.profile [PATH] [N]`` runs one path on the bench's
generated inputs and prints each part's share of the profiled time:

- ``e2e`` (the default): N (default 300) HL7 v2.5.1 ORU^R01 messages of 20 OBX,
  ``Pipeline.ingest`` one per call, for a member with a signing key and a registry;
- ``inbound``: N (default 100) signed Bundles from another member, ``Exchange.receive``;
- ``csv``: a CDC occupational-health export of N rows (default 8,000), ``Pipeline.convert``.

Profiling slows Python code more than C code, so the shares are a guide to what
to work on, not a measurement of speed (``gateway bench`` measures that). cProfile
sees no function inside compiled code, so these profiles read, map and build with
the plain modules, not their compiled twins (:mod:`gateway.native`); ``phases``
times the twins when they are built.

``python -m gateway.bench.profile pages [e2e|inbound|e2e-batch] [N]`` counts instead
the database pages one more message (or received Bundle; ``e2e-batch``: one more
batch of 32 messages, one ``Pipeline.ingest``, and the pages per message) writes
to SQLite's log after N (default 300) stored before it, by the table or index
each page belongs to: what a commit costs is the pages it writes, and which
indexes they belong to says why (read from the log's frames and SQLite's
``dbstat``).

``python -m gateway.bench.profile sql [e2e|inbound] [N]`` times instead, without a
profiler, each SQL statement the path runs on SQLite, per message (or received
Bundle), a commit included: how much of the path is the database's, and which
statements. ``python -m gateway.bench.profile phases [e2e|inbound] [N]`` times the
path's parts the same way (each part's function wrapped with a clock).

``python -m gateway.bench.profile instructions [e2e|inbound] [N]`` counts instead the
machine instructions one more message (or received Bundle) takes, by the library
that ran them (the Python interpreter, SQLite, the C library, OpenSSL, zlib, msgspec,
the compiled twins...), with valgrind's callgrind: the path run twice in processes
of their own, with 30 units and with 30 + N (default 50), and the difference divided
by N. Unlike a clock, the count barely moves with what else the machine does, so it
tells a small change from the noise: the collector is settled as in ``gateway serve``'s parts, and the
checkpoint thread is held in those processes
(the WAL is copied back by the writer's safety net and at the close, at moments the
pages written decide: left to the thread, SQLite's share moved by a fifth between two
runs of the same code); what it does not count is the kernel's time (writing pages)
and waiting. Needs ``valgrind``
(Debian's ``valgrind`` package); a few minutes. The count is read from callgrind's own
output file (:func:`by_library`).

``python -m gateway.bench.profile decide [N ...]`` times deciding one received
report Bundle of 20 results (the engine's rules, nothing stored) against the
bench's registry grown by N further members (default 0, 100 and 500), each
listed with 5 qualifications and 60 EQA results: what a regional registry's
size costs a decision.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.bench.context import BenchContext, BenchOptions
from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC
from gateway.store.timing import TimedConnection

__all__ = ["profile_e2e", "profile_path", "wal_pages", "sql_time", "phases", "decide_time", "instructions",
           "by_library", "PARTS", "PATHS"]

Part = tuple[str, str, str]  # label, file suffix, function name (its outermost cumulative time is the part's)

#: Parts of the HL7 v2 path.
PARTS: list[Part] = [
    ("profile validation", "gateway/fhir/profiles.py", "validate"),
    ("signing and canonical JSON", "gateway/signing/issuing.py", "sign_with_digest"),
    ("recognition marks", "gateway/recognition/marks.py", "stamp"),
    ("parsing (HL7 v2 adapter)", "gateway/adapters/hl7v2.py", "read"),
    ("mapping codes, units, flags", "gateway/mapping/concepts.py", "map_message"),
    ("building the Bundle", "gateway/fhir/bundle.py", "build_bundle"),
    ("audit entry (made; its insert counts as storage)", "gateway/audit/log.py", "prepare"),
]
_INBOUND_PARTS: list[Part] = [
    ("signature: strict parse, canonical JSON, ECDSA, certificate chain", "gateway/signing/jws.py", "verify_bundle"),
    ("profile validation", "gateway/fhir/profiles.py", "validate"),
    ("facts for recognition", "gateway/recognition/facts.py", "facts_from_bundle"),
    ("recognition decisions (11 rules per result)", "gateway/recognition/engine.py", "decide_all"),
    ("audit entries made (one per decision)", "gateway/audit/log.py", "prepare"),
    ("signed receipt", "gateway/signing/issuing.py", "receipt"),
]
_CSV_PARTS: list[Part] = [
    ("reading CSV rows (streamed)", "gateway/adapters/labcsv.py", "split_stream"),
    ("reading an exam's rows", "gateway/adapters/labcsv.py", "read"),
    ("mapping codes, units, flags", "gateway/mapping/concepts.py", "map_message"),
    ("mapping exam facts", "gateway/fhir/occupational.py", "map_exam"),
    ("building the Bundle", "gateway/fhir/occupational.py", "build_exam_bundle"),
    ("profile validation", "gateway/fhir/profiles.py", "validate"),
]
_REST = {
    "e2e": "storage: raw input, resources, search index, signed copy, commits",
    "inbound": "storage: raw input, resources, search index, decisions, signed copy, audit inserts, commits",
    "csv": "the rest: the pipeline's own steps and answers",
}


def _shares(profiler: cProfile.Profile, parts: list[Part], outer: tuple[str, str],
            rest: str) -> list[tuple[str, float]]:
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    cumulative = {(path.replace("\\", "/"), name): ct for (path, _, name), (_, _, _, ct, _) in stats.items()}

    def part(suffix: str, name: str) -> float:
        # the outermost function of that name in that file (a wrapper of the same name is not counted twice)
        return float(max((ct for (path, fn), ct in cumulative.items() if fn == name and path.endswith(suffix)),
                         default=0.0))

    total = part(*outer)
    shares = [(label, part(suffix, name) / total) for label, suffix, name in parts]
    shares.append((rest, 1.0 - sum(share for _, share in shares)))
    return shares


def _plain(pipeline: Any) -> Any:
    """``pipeline`` reading, mapping and building with the plain modules, not their compiled twins (gateway.native):
    cProfile sees no function inside compiled code."""
    for channel in pipeline.channels.values():
        channel.fast = None
    return pipeline


def profile_e2e(messages: int = 300) -> list[tuple[str, float]]:
    """(part, share of the profiled time of the ingest calls); storage is what the named parts leave."""
    from gateway.pipeline import Pipeline

    ctx = BenchContext.create(BenchOptions(quick=True, count=messages))
    try:
        pipeline = _plain(Pipeline(ctx.member_settings("profile", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME),
                                   clock=ctx.clock))
        inputs = ctx.fresh_messages(messages + 1)
        pipeline.ingest(inputs.pop(), "hl7v2", channel="bench")  # the schema is created on first use
        profiler = cProfile.Profile()
        profiler.enable()
        for message in inputs:
            pipeline.ingest(message, "hl7v2", channel="bench")
        profiler.disable()
        pipeline.close()
    finally:
        ctx.close()
    return _shares(profiler, PARTS, ("gateway/pipeline.py", "ingest"), _REST["e2e"])


def _receiver(ctx: BenchContext, name: str, bundles: int) -> tuple[Any, list[bytes]]:
    """A member named ``name`` that receives, and ``bundles`` signed report Bundles of the bench's issuer for it."""
    from gateway.bench.stages import _bundles
    from gateway.pipeline import Pipeline

    sender = Pipeline(ctx.member_settings("sender", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
    receiver = Pipeline(ctx.member_settings(name, "12500102MB0002006J", "重庆市涪陵中心医院（演示）"), clock=ctx.clock)
    signer, marks = sender.member.require_signer(), sender.member.marks
    assert marks is not None
    texts = []
    for bundle in _bundles(ctx, ctx.fresh_messages(bundles)):
        marks.stamp(bundle)
        texts.append(signer.sign(bundle))
    sender.close()
    return receiver, texts


def profile_inbound(bundles: int = 100) -> list[tuple[str, float]]:
    """(part, share of the profiled time of ``Pipeline.receive_signed``) for Bundles signed by another member."""
    ctx = BenchContext.create(BenchOptions(quick=True, count=bundles))
    try:
        receiver, texts = _receiver(ctx, "inbound", bundles + 1)
        receiver.receive_signed(texts.pop(), BENCH_ISSUER_USCC)  # the schema is created on first use
        profiler = cProfile.Profile()
        profiler.enable()
        for text in texts:
            receiver.receive_signed(text, BENCH_ISSUER_USCC)
        profiler.disable()
        receiver.close()
    finally:
        ctx.close()
    return _shares(profiler, _INBOUND_PARTS, ("gateway/pipeline.py", "receive_signed"), _REST["inbound"])


def profile_csv(rows: int = 8000) -> list[tuple[str, float]]:
    """(part, share of the profiled time of converting a CDC export of ``rows`` rows)."""
    from gateway.bench.inputs import CDC_NAME, CDC_USCC, write_cdc_csv

    ctx = BenchContext.create(BenchOptions(quick=True, csv_rows=rows))
    try:
        pipeline = _plain(ctx.pipeline("csv", issuer_uscc=CDC_USCC, issuer_name=CDC_NAME))
        path = ctx.workdir / "cdc-export.csv"
        write_cdc_csv(path, rows, ctx.options.seed)

        def convert() -> None:
            with open(path, "rb") as stream:
                for _ in pipeline.convert(stream, "cdc-csv", path.name):
                    pass

        profiler = cProfile.Profile()
        profiler.runcall(convert)
        pipeline.close()
    finally:
        ctx.close()
    return _shares(profiler, _CSV_PARTS, ("gateway/pipeline.py", "convert"), _REST["csv"])


#: Messages per call of the ``e2e-batch`` path (as ``gateway bench``'s stage of that name).
BATCH = 32


def wal_pages(path: str = "e2e", before: int = 300) -> tuple[int, list[tuple[str, int]]]:
    """(frames one more message of ``path`` writes to the WAL, [(table or index, frames), ...] most first), after
    ``before`` stored first (``e2e-batch``: one more batch of :data:`BATCH` messages, after the whole batches of
    ``before``). Checkpoints beside the writer are held off meanwhile, so that the log holds exactly that message's
    (or batch's) frames (its two commits).

    :raises KeyError: an unknown path; :raises RuntimeError: this SQLite has no ``dbstat``.
    """
    import collections

    from gateway.pipeline import Pipeline
    from gateway.store.db import checkpoints_held, empty_wal, wal_page_owners

    if path not in ("e2e", "inbound", "e2e-batch"):
        raise KeyError(path)
    ctx = BenchContext.create(BenchOptions(quick=True, count=before))
    try:
        with checkpoints_held():
            if path in ("e2e", "e2e-batch"):
                member = Pipeline(ctx.member_settings("pages", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
                units: list[Any] = ctx.fresh_messages(before + 1)
                if path == "e2e-batch":  # (stored 32 per call, as the last: one call's two commits)
                    messages = ctx.fresh_messages(before + BATCH)
                    units = [b"\r\n".join(messages[n:n + BATCH]) for n in range(0, before, BATCH)]
                    units.append(b"\r\n".join(messages[before:]))

                def store(unit: Any) -> None:
                    member.ingest(unit, "hl7v2", channel="bench")
            else:
                member, units = _receiver(ctx, "pages", before + 1)

                def store(unit: Any) -> None:
                    member.receive_signed(unit, BENCH_ISSUER_USCC)
            for unit in units[:-1]:
                store(unit)
            file = ctx.workdir / "pages" / "gateway.db"
            empty_wal(file)  # what the log holds next is that message's
            store(units[-1])
            owners = wal_page_owners(file)
            member.close()
    finally:
        ctx.close()
    return len(owners), collections.Counter(owners).most_common()


def _path_member(ctx: BenchContext, path: str, name: str, size: int) -> tuple[Any, list[Any], Callable[[Any], Any]]:
    """A member of ``path`` (``e2e``: one that stores and signs HL7 v2 messages; ``inbound``: one that receives
    signed Bundles), its ``size`` units and how one is worked; one unit is worked already (the schema is created
    on first use)."""
    from gateway.pipeline import Pipeline

    if path == "e2e":
        member: Any = Pipeline(ctx.member_settings(name, BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
        units: list[Any] = ctx.fresh_messages(size + 1)

        def work(unit: Any) -> Any:
            return member.ingest(unit, "hl7v2", channel="bench")
    else:
        member, units = _receiver(ctx, name, size + 1)

        def work(unit: Any) -> Any:
            return member.receive_signed(unit, BENCH_ISSUER_USCC)
    work(units.pop())
    return member, units, work


def sql_time(path: str = "e2e", size: int = 300) -> tuple[float, float, list[tuple[str, float, float, float]]]:
    """(wall ms per unit, database ms per unit, [(statement, ms per unit, calls per unit, rows per unit), ...] most
    first) of ``size`` units of ``path`` (e2e or inbound) on SQLite, timed without a profiler: what each statement
    costs the calling thread, a commit included (``COMMIT``: writing its pages to the log).

    :raises KeyError: an unknown path.
    """
    if path not in ("e2e", "inbound"):
        raise KeyError(path)
    ctx = BenchContext.create(BenchOptions(quick=True, count=size))
    try:
        member, units, work = _path_member(ctx, path, "sql", size)
        timed = TimedConnection(member.store.db.conn)
        member.store.db.conn = timed
        try:
            began = time.perf_counter()
            for unit in units:
                work(unit)
            wall = time.perf_counter() - began
        finally:
            member.store.db.conn = timed._conn
        member.close()
    finally:
        ctx.close()
    rows = sorted(((sql, spent * 1000 / size, calls / size, many / size)
                   for sql, (calls, spent, many) in timed.spent.items()), key=lambda r: -r[1])
    return wall * 1000 / size, sum(r[1] for r in rows), rows


class _Clock:
    """Wall time spent in chosen functions, each wrapped where it is looked up (see :func:`phases`)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)
        self.spent.setdefault(label, 0.0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - began

        self._undo.append((owner, name, owner.__dict__.get(name, _ABSENT) if hasattr(owner, "__dict__") else real))
        setattr(owner, name, timed)

    def keep(self, owner: Any, name: str) -> None:
        """Put ``owner.name`` back as it is now when :meth:`undo` runs (for a change made by hand)."""
        self._undo.append((owner, name, owner.__dict__.get(name, _ABSENT)))

    def undo(self) -> None:
        """Every function wrapped as it was (once; later calls do nothing)."""
        for owner, name, before in reversed(self._undo):
            if before is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
        self._undo.clear()


_ABSENT = object()


class _Reader:
    """An adapter as it is, with a ``read`` of its own that :meth:`_Clock.wrap` can time."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.read = adapter.read

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)


def phases(path: str = "e2e", size: int = 300) -> tuple[float, list[tuple[str, float]]]:
    """(wall ms per unit, [(part, ms per unit), ...]) of ``size`` units of ``path`` (e2e or inbound), timed without
    a profiler: each part is a function wrapped with a clock, so parts may hold others (the list says which).

    :raises KeyError: an unknown path.
    """
    import gateway.audit.events as audit_events
    import gateway.audit.log as audit_log
    import gateway.recognition.facts as facts
    import gateway.recognition.record as record
    import gateway.signing.jws as jws
    from gateway.store.exchange import SignedBundles

    if path not in ("e2e", "inbound"):
        raise KeyError(path)
    ctx = BenchContext.create(BenchOptions(quick=True, count=size))
    clock = _Clock()
    try:
        member, units, work = _path_member(ctx, path, "phases", size)
        store = member.store
        if path == "e2e":
            ch = member.channel("hl7v2")
            ch = ch.fast or ch  # (the compiled twins, when built: they do the work; gateway.native)
            clock.keep(ch, "adapter")  # (a compiled adapter takes no new attribute: one that does, around it)
            ch.adapter = _Reader(ch.adapter)
            clock.wrap(ch.adapter, "read", "reading (the HL7 v2 adapter)")
            clock.wrap(ch, "map", "mapping codes, units, flags")
            clock.wrap(ch, "build", "building the Bundle")
            clock.wrap(member, "checker", "checking against the profiles")
            clock.wrap(member.member.marks, "stamp", "recognition marks")
            clock.wrap(member.member.signer, "sign_with_digest", "signing (canonical JSON, ECDSA)")
        else:
            clock.wrap(jws, "verify_bundle", "verifying (strict JSON, canonical JSON, ECDSA, certificates)")
            clock.wrap(member, "checker", "checking against the profiles")
            clock.wrap(facts, "facts_from_bundle", "facts for recognition")
            clock.wrap(record, "decide_all", "deciding (11 rules per result)")
            clock.wrap(audit_events, "decision_records", "audit records of the decisions")
            clock.wrap(audit_log, "prepare", "audit entries made (canonical JSON, hashes)")
        clock.wrap(store, "prepare", "rows made: references, JSON, index values")
        clock.wrap(member, "_commit", "recording, in the write lock (with its parts below)")
        clock.wrap(store, "finish", "  resources, index, outcome written")
        clock.wrap(member, "_supersede", "  report versions")
        clock.wrap(SignedBundles, "keep_bundle", "  signed copy kept (deflated)")
        if path == "inbound":
            clock.wrap(record.Decided, "record", "  decisions and their audit entries written")
        timed = TimedConnection(store.db.conn)
        store.db.conn = timed
        try:
            began = time.perf_counter()
            for unit in units:
                work(unit)
            wall = time.perf_counter() - began
        finally:  # the functions wrapped are the process's own: never left wrapped
            store.db.conn = timed._conn
            clock.undo()
        member.close()
    finally:
        clock.undo()  # (also when wrapping or the work failed before the loop's own undo)
        ctx.close()
    commits = timed.commit_seconds()
    parts = [(label, spent * 1000 / size) for label, spent in clock.spent.items()]
    parts += [("the database, every statement (commits included)", sum(v[1] for v in timed.spent.values())
               * 1000 / size), ("  commits", commits * 1000 / size)]
    return wall * 1000 / size, parts


#: Units every process of :func:`instructions` works before the ones it counts (its start-up is the same in both).
_BASE_UNITS = 30


def _work_units(path: str, size: int) -> None:
    """Work ``size`` units of ``path`` (e2e or inbound) after one that creates the schema: a process that
    :func:`instructions` counts the instructions of. The checkpoint thread is held meanwhile: the WAL is copied back
    by the writer's own safety net and at the close, at moments the pages written decide, so that SQLite's count
    does not move with when a thread ran. The units are worked with the collector settled as ``gateway serve``'s
    parts settle it (:func:`gateway.bench.measure.settled`)."""
    from gateway.bench.measure import settled
    from gateway.store.db import checkpoints_held

    ctx = BenchContext.create(BenchOptions(quick=True, count=size))
    try:
        with checkpoints_held():
            member, units, work = _path_member(ctx, path, "instructions", size)
            with settled():  # (the collector as a part of gateway serve has it once started)
                for unit in units:
                    work(unit)
            member.close()
    finally:
        ctx.close()


def _instructions_by_library(path: str, size: int, out: str) -> dict[str, int]:
    """{library: instructions} of a process working ``size`` units of ``path`` under callgrind (its output in
    ``out``)."""
    import shutil
    import subprocess

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("instructions: valgrind is not on PATH (Debian: apt-get install valgrind)")
    python = os.path.realpath(sys.executable)  # (valgrind follows no launcher script)
    subprocess.run([valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", python, "-m",
                    "gateway.bench.profile", "_work", path, str(size)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "0"})
    with open(out, encoding="utf-8", errors="replace") as counted:
        return by_library(counted)[0]


def by_library(lines: Iterable[str]) -> tuple[dict[str, int], int | None]:
    """({library file name: instructions}, the run's total as callgrind states it) from the lines of a callgrind
    output file (format version 1, the one event Ir): each cost line's count goes to the object (``ob=``) its
    function is in; the line after a ``calls=`` line is the inclusive cost of that call, counted where the callee
    is, not here. Names may be given once and then by number (``ob=(6) /path``, later ``ob=(6)``; a ``cob=`` names
    too)."""
    names: dict[str, str] = {}

    def named(spec: str) -> str:
        spec = spec.strip()
        if not spec.startswith("("):
            return spec
        key, _, name = spec.partition(")")
        if name.strip():
            names[key] = name.strip()
        return names.get(key, "???")

    found: dict[str, int] = {}
    current, after_call, total = "???", False, None
    for line in lines:
        first = line[:1]
        if first.isdigit() or first in ("+", "-", "*"):
            if after_call:
                after_call = False
                continue
            fields = line.split()
            if len(fields) >= 2:
                found[current] = found.get(current, 0) + int(fields[1])
        elif line.startswith("ob="):
            current = os.path.basename(named(line[3:]))
        elif line.startswith("cob="):
            named(line[4:])
        elif line.startswith("calls="):
            after_call = True
        elif line.startswith(("totals:", "summary:")):
            total = int(line.split()[1])
    return found, total


def instructions(path: str = "e2e", size: int = 50) -> tuple[float, list[tuple[str, float]]]:
    """(instructions per unit, [(library, instructions per unit), ...] most first) of ``path`` (e2e or inbound):
    callgrind's count of a process working :data:`_BASE_UNITS` + ``size`` units less one working
    :data:`_BASE_UNITS`, divided by ``size``.

    :raises KeyError: an unknown path. :raises RuntimeError: no valgrind here.
    """
    import tempfile

    if path not in ("e2e", "inbound"):
        raise KeyError(path)
    with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmp:
        first = _instructions_by_library(path, _BASE_UNITS, os.path.join(tmp, "first.out"))
        more = _instructions_by_library(path, _BASE_UNITS + size, os.path.join(tmp, "more.out"))
    per = {lib: (more.get(lib, 0) - first.get(lib, 0)) / size for lib in set(first) | set(more)}
    ranked = sorted(((lib, n) for lib, n in per.items() if abs(n) >= 1000), key=lambda item: -item[1])
    return sum(per.values()), ranked


#: path -> (function, default size, what a unit is)
PATHS: dict[str, tuple[Callable[[int], list[tuple[str, float]]], int, str]] = {
    "e2e": (profile_e2e, 300, "Pipeline.ingest calls (one HL7 v2 message each; checks, marks and signing on)"),
    "inbound": (profile_inbound, 100, "Exchange.receive calls (one signed Bundle of 20 results each)"),
    "csv": (profile_csv, 8000, "CSV rows converted by Pipeline.convert (8 rows per exam; checks on)"),
}


def profile_path(path: str, size: int | None = None) -> list[tuple[str, float]]:
    """:raises KeyError: unknown path."""
    fn, default, _ = PATHS[path]
    return fn(size or default)


def _grown_snapshot(snapshot: Any, members: int) -> Any:
    """``snapshot`` with ``members`` further members, each listed with copies of the first 5 qualifications and
    60 EQA results of the snapshot (under its own USCC), for sizing."""
    import dataclasses

    from gateway.registry.models import Snapshot

    listed = list(snapshot.members.values())
    quals, eqa = list(snapshot.qualifications), list(snapshot.eqa)
    for n in range(members):
        uscc = f"9{n:017d}"
        listed.append(dataclasses.replace(listed[0], uscc=uscc, certificates=()))
        quals += [dataclasses.replace(q, member=uscc, id=f"{q.id}-{n}") for q in snapshot.qualifications[:5]]
        eqa += [dataclasses.replace(e, member=uscc) for e in snapshot.eqa[:60]]
    return Snapshot(version=snapshot.version, issued=snapshot.issued, valid_until=snapshot.valid_until,
                    authority_uscc=snapshot.authority_uscc, authority_name=snapshot.authority_name,
                    members=listed, qualifications=quals, eqa=eqa, catalogues=snapshot.catalogues,
                    diagnosis_by_exposure=snapshot.diagnosis_by_exposure,
                    diagnosis_by_factor=snapshot.diagnosis_by_factor, document=snapshot.document,
                    physicians=snapshot.physicians.values())


def decide_time(sizes: list[int], rounds: int = 50) -> list[tuple[int, int, int, int, float]]:
    """[(further members, members, qualifications, EQA results, ms to decide one received Bundle)] per size."""
    import dataclasses

    from gateway import jsonutil
    from gateway.recognition.engine import decide_all
    from gateway.recognition.facts import facts_from_bundle

    ctx = BenchContext.create(BenchOptions(quick=True, count=2))
    try:
        receiver, texts = _receiver(ctx, "decide", 1)
        snapshot = receiver.member.snapshot()
        at = receiver.clock()
        facts = [dataclasses.replace(f, signer_uscc=BENCH_ISSUER_USCC)
                 for f in facts_from_bundle(jsonutil.loads(texts[0]))]
        me = receiver.settings.issuer_uscc
        receiver.close()
    finally:
        ctx.close()
    out = []
    for size in sizes:
        grown = _grown_snapshot(snapshot, size)
        decide_all(facts, grown, me, at)  # the snapshot's lookups are built on first use
        start = time.perf_counter()
        for _ in range(rounds):
            decide_all(facts, grown, me, at)
        ms = (time.perf_counter() - start) * 1000 / rounds
        out.append((size, len(grown.members), len(grown.qualifications), len(grown.eqa), ms))
    return out


def main(argv: list[str]) -> int:
    args: list[Any] = list(argv)
    if args[:1] == ["decide"]:
        try:
            sizes = [int(a) for a in args[1:]] or [0, 100, 500]
        except ValueError:
            sizes = [-1]
        if min(sizes) < 0:
            print("decide: N, further members, must be whole numbers", file=sys.stderr)
            return 2
        print("deciding one received report Bundle of 20 results (no storage), by the registry's size")
        print("  further members  members  qualifications  EQA results  ms per Bundle")
        for size, members, quals, eqa, ms in decide_time(sizes):
            print(f"  {size:15d}  {members:7d}  {quals:14d}  {eqa:11d}  {ms:13.2f}")
        return 0
    if args[:1] == ["pages"]:
        which = args[1] if len(args) > 1 and not args[1].isdigit() else "e2e"
        before = int(args[-1]) if len(args) > 1 and args[-1].isdigit() else 300
        if before < 1:
            print("pages: N, the messages stored first, must be at least 1", file=sys.stderr)
            return 2
        try:
            frames, counted = wal_pages(which, before)
        except KeyError:
            print(f"unknown path {which!r} (known: e2e, inbound, e2e-batch)", file=sys.stderr)
            return 2
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        if which == "e2e-batch":
            print(f"pages one more batch of {BATCH} messages writes to the WAL after {before // BATCH * BATCH} stored: "
                  f"{frames}, {frames / BATCH:.1f} a message")
        else:
            print(f"pages one more {'message' if which == 'e2e' else 'received Bundle'} writes to the WAL after "
                  f"{before} stored: {frames}")
        for name, count in counted:
            print(f"  {count:5d}  {name}")
        return 0
    if args[:1] == ["_work"] and len(args) == 3:  # (a process instructions counts)
        _work_units(args[1], int(args[2]))
        return 0
    if args[:1] == ["instructions"]:
        which = args[1] if len(args) > 1 and not args[1].isdigit() else "e2e"
        size = int(args[-1]) if len(args) > 1 and args[-1].isdigit() else 50
        if which not in ("e2e", "inbound") or size < 1:
            print("instructions: a path (e2e or inbound) and N, the units counted (at least 1)", file=sys.stderr)
            return 2
        unit = "message" if which == "e2e" else "received Bundle"
        print(f"counting the instructions of {_BASE_UNITS} and {_BASE_UNITS + size} units of {which} under "
              "callgrind (a few minutes)...", file=sys.stderr)
        try:
            total, libraries = instructions(which, size)
        except (RuntimeError, OSError) as exc:
            print(str(exc), file=sys.stderr)
            return 1
        except Exception as exc:  # noqa: BLE001 - a run under valgrind that failed: say which, in one line
            print(f"instructions: a counted run failed ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 1
        print(f"{total / 1e6:.2f} million instructions per {unit} ({which}), by library:")
        for library, spent in libraries:
            print(f"  {spent / 1e6:7.2f} M  {spent / total * 100:5.1f}%  {library}")
        return 0
    if args[:1] in (["phases"], ["sql"]):
        which = args[1] if len(args) > 1 and not args[1].isdigit() else "e2e"
        size = max(int(args[-1]) if len(args) > 1 and args[-1].isdigit() else 300, 1)
        if which not in ("e2e", "inbound"):
            print(f"unknown path {which!r} (known: e2e, inbound)", file=sys.stderr)
            return 2
        unit = "message" if which == "e2e" else "received Bundle"
        if args[0] == "phases":
            wall, parts = phases(which, size)
            print(f"{size} units of {which}: {wall:.2f} ms per {unit}, wall time (parts indented are inside the one "
                  "above them; the database's time is inside the parts that ran it)")
            for label, ms in parts:
                print(f"  {ms:7.3f} ms  {label}")
            return 0
        wall, spent, rows = sql_time(which, size)
        print(f"{size} units of {which}: {wall:.2f} ms per {unit}, of which {spent:.2f} ms in the database")
        print("   ms/unit  calls   rows  statement")
        for sql, ms, calls, many in rows[:25]:
            print(f"  {ms:8.3f} {calls:6.1f} {many:6.1f}  {sql[:110]}")
        return 0
    path = args.pop(0) if args and not args[0].isdigit() else "e2e"
    if path not in PATHS:
        print(f"unknown path {path!r} (known: {', '.join(PATHS)})", file=sys.stderr)
        return 2
    size = int(args[0]) if args else PATHS[path][1]
    print(f"cProfile of {size} {PATHS[path][2]}")
    for label, share in profile_path(path, size):
        print(f"  {share * 100:5.1f}%  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
