"""The compiled twins (gateway.native) give exactly what the plain modules give, and step aside when they cannot.

``setup.py`` compiles copies of the hottest modules with mypyc at install, when a C compiler is there. The
pipeline reads, maps and builds HL7 v2 and CDC CSV units with them first, and the profile check's clean pass
runs compiled. Here, on every HL7 v2 and CSV sample under ``tests/data``, generated ORU messages and CDC
exports, and a few hundred seeded mutations of each (fields deleted, swapped, emptied or filled with
garbage; rows cut, repeated or blanked), each unit is worked once by the twins and once by the plain
modules, and the two outcomes must be the same in every part a sender, the store or an auditor sees:
status, answer bytes, issues (severity, code, location, message, HL7 error code), the Bundle's JSON text
byte for byte. On the unmutated inputs the twins must not have needed the plain modules at all.

A twin failing on a unit (a run-time type check mypyc adds, say) hands the unit to the plain modules,
whose outcome is the unit's; a twin compiled from an older source than the module beside it is not used.
The twins are built when a C compiler and Python's headers are there (CI installs gcc): there, these tests
must find them built.
"""
from __future__ import annotations

import copy
import datetime as _dt
import importlib
import os
import random
import re
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CST, DATA, ROOT, Clock, issuer_for
from gateway import jsonutil, native
from gateway.adapters.base import RawUnit
from gateway.config import load_settings
from gateway.pipeline import Outcome, Pipeline, Status, _units

_TOOLCHAIN = shutil.which("cc") is not None and Path(sysconfig.get_paths()["include"], "Python.h").exists()
_BUILT = native.compiled()

needs_twins = pytest.mark.skipif(not _BUILT and not _TOOLCHAIN,
                                 reason="no C compiler here: the compiled twins are not built (plain Python runs)")

CDC = "12510000MB00030095"
HOSPITAL = "12500102MB0002006J"


def test_the_twins_are_built_where_a_compiler_is() -> None:
    if not _TOOLCHAIN:
        pytest.skip("no C compiler or Python headers: the install runs the plain modules")
    assert native.compiled(), f"pip install -e . should have compiled them: {native.status()}"
    built = native._built()
    assert built is not None
    sources, build = built
    root = Path(native.__file__).resolve().parent.parent  # (the checkout, or site-packages)
    for name in native.NATIVE:
        twin = native.load(name)
        assert twin.__name__ == native.twin_name(name) and twin._BUILD == build
        path = Path(importlib.import_module(name).__file__).resolve()
        assert sources[path.relative_to(root).as_posix()] == native.source_digest(path)
    # what they were type-checked against counts too, at any remove: a change there turns them off until compiled
    # again
    assert {"gateway/adapters/base.py", "gateway/errors.py", "gateway/fhir/profiles.py", "gateway/config.py",
            "gateway/uuids.py", "gateway/__init__.py", "gateway/fhir/__init__.py"} <= set(sources)
    assert native._stale(sources) == []


@needs_twins
def test_the_twins_call_each_other_and_the_guide_uses_the_compiled_clean_check(tmp_path: Path) -> None:
    bundle_twin = native.load("gateway.fhir.bundle")
    assert bundle_twin.observation.__module__ == "gateway._native.report"  # imports pointed at the twins
    assert bundle_twin.SourceMessage.__module__ == "gateway.adapters.base"  # the rest is the plain modules'
    pipeline = _pipeline(tmp_path, HOSPITAL)
    guide = pipeline.checker.__self__  # type: ignore[union-attr]
    assert type(guide._clean).__module__ == "gateway._native.profilecheck"
    assert pipeline.channel("hl7v2").fast is not None and pipeline.channel("cdc-csv").fast is not None
    assert pipeline.channel("cda").fast is None  # only the channels whose modules are compiled


# ------------------------------------------------------------------ inputs


def _pipeline(tmp: Path, uscc: str) -> Pipeline:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp / uscc), "issuer_uscc": uscc,
                                                    "issuer_name": "demo issuer"})
    return Pipeline(settings, clock=Clock(_dt.datetime(2026, 5, 20, 9, 30, tzinfo=CST)))


_GARBAGE = ["", "^^^", "\\F\\", "~", "é中文", "9" * 40, "-1", "0", "20261340", "2026-05-20", "abc", " ",
            "1.5.6", "&", "NaN", "\\X0D\\", "<5", ">=10", "1e5", "+", "Ⅱ", "\u3000", "N", "H~L", "F"]


def _mutate_hl7(rng: random.Random, message: bytes) -> bytes:
    """One to three changes a LIS makes by mistake, or a hostile sender on purpose."""
    segments = message.decode("utf-8", "replace").replace("\n", "\r").split("\r")
    segments = [s for s in segments if s]
    for _ in range(rng.randint(1, 3)):
        n = rng.randrange(len(segments))
        fields = segments[n].split("|")
        kind = rng.randrange(8)
        if kind == 0 and len(fields) > 2:  # a field deleted (the rest shift)
            del fields[rng.randrange(2, len(fields))]
        elif kind == 1 and len(fields) > 1:  # garbage in a field
            fields[rng.randrange(1, len(fields))] = rng.choice(_GARBAGE)
        elif kind == 2 and len(fields) > 3:  # two fields swapped
            i, j = rng.sample(range(1, len(fields)), 2)
            fields[i], fields[j] = fields[j], fields[i]
        elif kind == 3 and n > 0:  # a segment dropped
            del segments[n]
            continue
        elif kind == 4:  # a segment repeated
            segments.insert(n, segments[n])
            continue
        elif kind == 5 and len(fields) > 1:  # a component cut or added
            i = rng.randrange(1, len(fields))
            parts = fields[i].split("^")
            fields[i] = "^".join(parts[:-1] if len(parts) > 1 else parts + [rng.choice(_GARBAGE)])
        elif kind == 6 and len(fields) > 1:  # a field emptied
            fields[rng.randrange(1, len(fields))] = ""
        elif kind == 7:  # the segment cut short
            fields = fields[:max(1, rng.randrange(len(fields)))]
        segments[n] = "|".join(fields)
    return "\r".join(segments).encode("utf-8")


def _mutate_csv(rng: random.Random, data: bytes, codec: str) -> bytes:
    """One to four changes to the rows of an export (the header kept, so that a layout still matches)."""
    lines = data.decode(codec).splitlines()
    head, rows = lines[0], lines[1:]
    for _ in range(rng.randint(1, 4)):
        if not rows:
            break
        n = rng.randrange(len(rows))
        cells = rows[n].split(",")
        kind = rng.randrange(6)
        if kind == 0:  # a cell emptied
            cells[rng.randrange(len(cells))] = ""
        elif kind == 1:  # garbage in a cell
            cells[rng.randrange(len(cells))] = rng.choice(_GARBAGE).replace(",", ";")
        elif kind == 2 and len(cells) > 1:  # two cells swapped
            i, j = rng.sample(range(len(cells)), 2)
            cells[i], cells[j] = cells[j], cells[i]
        elif kind == 3:  # a row dropped
            del rows[n]
            continue
        elif kind == 4:  # a row repeated
            rows.insert(n, rows[n])
            continue
        elif kind == 5:  # a row cut short
            cells = cells[:rng.randrange(1, len(cells) + 1)]
        rows[n] = ",".join(cells)
    return ("\n".join([head, *rows]) + "\n").encode(codec)


def _hl7_inputs() -> Iterator[tuple[str, bytes]]:
    from gateway.bench.inputs import oru_batch

    for path in sorted((DATA / "hl7v2").glob("*.hl7")):
        yield issuer_for(path.stem), path.read_bytes()
    for message in oru_batch(12, seed=11):
        yield "12511921MB0001003C", message


def _csv_inputs(tmp: Path) -> Iterator[tuple[str, bytes, str]]:
    from gateway.bench.inputs import write_cdc_csv

    members = {"cdc": CDC, "hospital": HOSPITAL}
    for path in sorted((DATA / "csv").glob("*.csv")):
        data = path.read_bytes()
        yield members[path.stem.split("-")[0]], data, "gbk" if "gbk" in path.stem else "utf-8-sig"
    generated = tmp / "generated.csv"
    write_cdc_csv(generated, 160, 5)
    yield CDC, generated.read_bytes(), "utf-8-sig"


# ------------------------------------------------------------------ both ways


def _seen(outcome: Outcome) -> tuple[Any, ...]:
    """What a sender, the store or an auditor sees of an outcome."""
    msg = outcome.message
    # (an ACK's own MSH-10 is a new id each time it is made, whatever separators it echoes)
    answer = re.sub(rb"(?<![0-9a-f])[0-9a-f]{20}(?![0-9a-f])", b"<id>", outcome.answer or b"")
    return (outcome.status, outcome.label, outcome.ack_code, answer, outcome.filtered_reason,
            [(i.severity, i.code, i.location, i.message, i.hl7_error) for i in outcome.issues],
            jsonutil.dumps(outcome.bundle) if outcome.bundle is not None else None,
            (msg.message_id, msg.sender, msg.format, len(msg.reports)) if msg is not None else None)


def _both_ways(pipeline: Pipeline, fmt: str, data: bytes) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Each unit of ``data`` worked by the twins, then by the plain modules (nothing stored either way)."""
    ch = pipeline.channel(fmt)
    fast = ch.fast
    assert fast is not None
    units: list[RawUnit] = list(_units(ch, data, "sample"))
    by_twins = [_seen(pipeline._work(ch, unit, None)) for unit in units]
    ch.fast = None
    try:
        by_plain = [_seen(pipeline._work(ch, unit, None)) for unit in units]
    finally:
        ch.fast = fast
    return by_twins, by_plain


@needs_twins
def test_samples_and_generated_inputs_come_out_the_same_without_needing_the_plain_modules(tmp_path: Path) -> None:
    pipelines: dict[str, Pipeline] = {}
    before = sum(native.fallbacks.values())
    statuses: dict[str, int] = {}
    for uscc, data in _hl7_inputs():
        pipeline = pipelines.get(uscc) or pipelines.setdefault(uscc, _pipeline(tmp_path, uscc))
        twins, plain = _both_ways(pipeline, "hl7v2", data)
        assert twins == plain
        for seen in twins:
            statuses[seen[0].value] = statuses.get(seen[0].value, 0) + 1
    for uscc, data, _ in _csv_inputs(tmp_path):
        pipeline = pipelines.get(uscc) or pipelines.setdefault(uscc, _pipeline(tmp_path, uscc))
        twins, plain = _both_ways(pipeline, "cdc-csv", data)
        assert twins == plain
        for seen in twins:
            statuses[seen[0].value] = statuses.get(seen[0].value, 0) + 1
    assert sum(native.fallbacks.values()) == before, f"the twins failed on a sample: {native.fallbacks}"
    # the corpus holds what the gateway stores, refuses and filters (nothing failed)
    assert statuses.get("converted", 0) >= 40 and statuses.get("refused", 0) >= 3, statuses
    assert statuses.get("failed", 0) == 0, statuses


@needs_twins
def test_mutated_hl7_messages_come_out_the_same(tmp_path: Path) -> None:
    rng = random.Random(19)
    inputs = list(_hl7_inputs())
    pipelines: dict[str, Pipeline] = {}
    mutants = 4000 if os.environ.get("GATEWAY_FUZZ_LONG") == "1" else 500
    refused = 0
    for _ in range(mutants):
        uscc, data = rng.choice(inputs)
        pipeline = pipelines.get(uscc) or pipelines.setdefault(uscc, _pipeline(tmp_path, uscc))
        twins, plain = _both_ways(pipeline, "hl7v2", _mutate_hl7(rng, data))
        assert twins == plain
        refused += sum(1 for seen in twins if seen[0] is Status.REFUSED)
    assert refused >= mutants // 4  # the mutations reach the refusals, not only the good path
    print(f"fallbacks to the plain modules: {dict(native.fallbacks)}")


@needs_twins
def test_mutated_csv_exports_come_out_the_same(tmp_path: Path) -> None:
    rng = random.Random(20)
    inputs = list(_csv_inputs(tmp_path))
    pipelines: dict[str, Pipeline] = {}
    mutants = 2000 if os.environ.get("GATEWAY_FUZZ_LONG") == "1" else 250
    refused = 0
    for _ in range(mutants):
        uscc, data, codec = rng.choice(inputs)
        pipeline = pipelines.get(uscc) or pipelines.setdefault(uscc, _pipeline(tmp_path, uscc))
        twins, plain = _both_ways(pipeline, "cdc-csv", _mutate_csv(rng, data, codec))
        assert twins == plain
        refused += sum(1 for seen in twins if seen[0] is Status.REFUSED)
    assert refused >= mutants // 4
    print(f"fallbacks to the plain modules: {dict(native.fallbacks)}")


# ------------------------------------------------------------------ stepping aside


@needs_twins
@pytest.mark.twin_fallbacks
@pytest.mark.parametrize("stage", ["read", "map", "build"])
def test_a_unit_the_twins_fail_on_is_worked_by_the_plain_modules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stage: str) -> None:
    pipeline = _pipeline(tmp_path, "12511921MB0001003C")
    ch = pipeline.channel("hl7v2")
    assert ch.fast is not None
    data = b"\r\n".join(m for _, m in list(_hl7_inputs())[-3:])
    expected = [_seen(o) for o in pipeline.convert(data, "hl7v2", "x")]
    assert len(expected) == 3
    owner = ch.fast.adapter if stage == "read" else ch.fast
    real = getattr(owner, stage)
    calls: list[int] = []

    def broken(subject: Any) -> Any:  # the second unit: what a run-time type check of mypyc raises
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("str object expected; got int")
        return real(subject)

    if stage == "read":  # (an adapter compiled by mypyc takes no new attributes: a stand-in that has them)
        monkeypatch.setattr(ch.fast, "adapter", type("Adapter", (), {"read": staticmethod(broken)})())
    else:
        monkeypatch.setattr(ch.fast, stage, broken)
    where = "parse" if stage == "read" else stage
    before = native.fallbacks[("hl7v2", where)]
    exported = _exported(where)
    got = [_seen(o) for o in pipeline.convert(data, "hl7v2", "x")]
    assert got == expected
    assert native.fallbacks[("hl7v2", where)] == before + 1
    assert _exported(where) == exported + 1  # gateway_native_fallbacks_total in /metrics
    assert "internal error" not in caplog.text


def _exported(where: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("gateway_native_fallbacks_total", {"kind": "hl7v2", "where": where}) or 0.0


@needs_twins
def test_a_stage_after_the_twins_fails_the_unit_as_before(tmp_path: Path) -> None:
    """The check and what follows are not the twins': a failure there is the unit's own (not worked twice)."""
    pipeline = _pipeline(tmp_path, "12511921MB0001003C")
    calls: list[int] = []

    def checker(bundle: Any) -> Any:
        calls.append(1)
        raise RuntimeError("the check broke")

    pipeline.checker = checker
    _, message = list(_hl7_inputs())[-1]
    [outcome] = pipeline.convert(message, "hl7v2", "x")
    assert outcome.status is Status.FAILED and calls == [1]


@pytest.mark.parametrize("changed", ["gateway/fhir/report.py", "gateway/adapters/base.py"])
def test_twins_made_from_other_sources_are_not_used(monkeypatch: pytest.MonkeyPatch, changed: str) -> None:
    """A twinned module, or one the twins were checked against, edited since the install: no twin is used."""
    real = native.source_digest
    monkeypatch.setattr(native, "source_digest", lambda path: "0" * 64 if Path(path) == ROOT / changed else real(path))
    native._twins.cache_clear()
    try:
        if not _BUILT:
            assert not native.compiled()
            return
        assert native._stale(native._built()[0]) == [changed]  # type: ignore[index]
        assert not native.compiled()  # they call each other: one stale turns them all off
        assert native.load("gateway.adapters.hl7v2") is importlib.import_module("gateway.adapters.hl7v2")
        assert all(text.startswith(f"stale ({changed} changed") for text in native.status().values())
    finally:
        monkeypatch.undo()
        native._twins.cache_clear()
    assert native.compiled()


@needs_twins
def test_a_twin_of_another_build_or_that_does_not_load_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "gateway.fhir.report"
    why = "not built from these sources (a later build did not complete)"
    assert native._twin(name, "another build") == (None, why)
    real = importlib.import_module

    def importing(module: str, *args: Any) -> Any:
        if module == native.twin_name(name):
            raise TypeError("str object expected; got gateway.naming._U")  # its module-level code checks types
        return real(module, *args)

    monkeypatch.setattr(native.importlib, "import_module", importing)
    assert native._twin(name, native._built()[1]) == (None, "does not load (TypeError)")  # type: ignore[index]
    native._twins.cache_clear()
    try:
        assert not native.compiled()
        assert native.status()[name] == "does not load (TypeError)"
        assert native.status()["gateway.adapters.hl7v2"] == "not used (another twin is not)"
    finally:
        monkeypatch.undo()
        native._twins.cache_clear()
    assert native.compiled()


@needs_twins
@pytest.mark.twin_fallbacks
def test_stage_timings_count_each_unit_once_when_the_twins_step_aside(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import metrics

    pipeline = _pipeline(tmp_path, "12511921MB0001003C")
    ch = pipeline.channel("hl7v2")
    assert ch.fast is not None
    data = b"\r\n".join(m for _, m in list(_hl7_inputs())[-3:])
    laps: list[str] = []
    real_stage = metrics._stage
    monkeypatch.setattr(metrics, "_stage", lambda stage: (laps.append(stage), real_stage(stage))[1])
    real_build, calls = ch.fast.build, []

    def build(msg: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("dict object expected; got str")
        return real_build(msg)

    monkeypatch.setattr(ch.fast, "build", build)
    assert [o.status for o in pipeline.convert(data, "hl7v2", "x")] == [Status.CONVERTED] * 3
    assert {stage: laps.count(stage) for stage in set(laps)} == {"parse": 3, "map": 3, "build": 3, "check": 3}


def test_gateway_native_0_turns_them_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_NATIVE", "0")
    native._twins.cache_clear()
    try:
        assert not native.compiled()
        assert set(native.status().values()) == {"off (GATEWAY_NATIVE)"}
        pipeline = _pipeline(tmp_path, HOSPITAL)
        assert pipeline.channel("hl7v2").fast is None and pipeline.channel("cdc-csv").fast is None
        from gateway.fhir import profiles

        guide = profiles._load.__wrapped__((ROOT / "profiles").resolve())  # (load_guide keeps the one made first)
        assert type(guide._clean).__module__ == "gateway.fhir.profilecheck"
    finally:
        monkeypatch.undo()
        native._twins.cache_clear()


def _setup_helpers(root: Path = ROOT) -> dict[str, Any]:
    """setup.py's functions and constants (not its setup() call), working on the tree at ``root``."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    namespace: dict[str, Any] = {"__file__": str(root / "setup.py")}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom, ast.Assign)):
            exec(compile(ast.Module([node], type_ignores=[]), "setup.py", "exec"), namespace)
    namespace["ROOT"] = root
    return namespace


def test_setup_reads_the_list_of_modules_it_compiles() -> None:
    """setup.py reads NATIVE from gateway/native.py's text (the build has none of the gateway's dependencies)."""
    namespace = _setup_helpers()
    assert namespace["_native_modules"]() == native.NATIVE
    assert namespace["_twin"]("gateway.fhir.report") == native.twin_name("gateway.fhir.report")
    assert {"gateway.adapters.base", "gateway.fhir.parties", "gateway.naming"} <= namespace["_imported"](
        "gateway.fhir.report")
    assert "gateway.native" in namespace["_imported"]("gateway.fhir.profiles")  # (``from gateway.native import``)


@pytest.mark.parametrize("how", ["mypy refuses", "cannot write", "GATEWAY_NATIVE_BUILD=0", "not a build"])
def test_an_install_that_cannot_compile_goes_on_without_twins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str], how: str) -> None:
    """What setup.py does when the twins cannot or must not be compiled: no extension, a one-line note, no error
    (on a copy of the tree; the compiler itself is never run here)."""
    import sys
    import types

    shutil.copytree(ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("_native", "__pycache__"))
    helpers = _setup_helpers(tmp_path)
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel" if how != "not a build" else "egg_info"])
    refusing = types.ModuleType("mypyc.build")
    refusing.mypycify = lambda *a, **k: (_ for _ in ()).throw(SystemExit(1))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mypyc.build", refusing)
    if how == "GATEWAY_NATIVE_BUILD=0":
        monkeypatch.setenv("GATEWAY_NATIVE_BUILD", "0")
    if how == "cannot write":  # (a read-only tree; as root, a file where the folder goes stands in for it)
        (tmp_path / "gateway" / "_native").write_text("in the way")
    assert helpers["_native_extensions"]() == []
    note = capsys.readouterr().err
    if how == "not a build":
        assert note == "" and not (tmp_path / "gateway" / "_native").exists()
    elif how == "GATEWAY_NATIVE_BUILD=0":
        assert "not built (GATEWAY_NATIVE_BUILD)" in note and not (tmp_path / "gateway" / "_native").exists()
    else:
        assert note.startswith("cyhr-gateway: compiled modules not built (") and note.count("\n") == 1
        if how == "mypy refuses":  # the copies and their stamp are written; no extension, so none is used
            written = {p.name for p in (tmp_path / "gateway" / "_native").iterdir()}
            assert {"__init__.py", "hl7v2.py", "walks.py"} <= written and not any(n.endswith(".so") for n in written)


# ------------------------------------------------------------------ the walks over whole documents


class _Text(str):
    pass


class _Object(dict):  # type: ignore[type-arg]
    pass


_ODD = [_Text("x"), _Object(a=1), (1, "a"), {1: "a"}, {None: 1}, {"a": {2.5: 1}}, {"😀": 1, "\ue000": 2}, 2 ** 60,
        5.0, 1e-7, float("nan"), b"bytes", {1, 2}, True, None, [[[[[]]]]], {"reference": _Text("urn:uuid:1")},
        {"reference": 7}, {"reference": ["urn:uuid:1"]}, [{"reference": "urn:uuid:1"}, _Object(reference="urn:uuid:1")]]


def _walk_documents() -> Iterator[Any]:
    from test_signing_fastpath import _document

    rng = random.Random(21)
    for n in range(3000):
        yield _document(rng, n)
    yield from _ODD
    for _ in range(300):  # odd values tucked inside ordinary ones
        doc = _document(rng, 2)
        yield {"resourceType": "Bundle", "entry": [doc, rng.choice(_ODD)], "x": {"y": rng.choice(_ODD)}}


@needs_twins
def test_the_jcs_walk_twin_answers_as_the_plain_one() -> None:
    from gateway import walks

    twin, guarded = native.load("gateway.walks"), walks.fast("encodes_as_jcs")
    assert twin is not walks
    asked = 0
    for doc in _walk_documents():
        for decimals in (True, False):
            want = walks.encodes_as_jcs(doc, decimals)
            assert guarded(doc, decimals) is want
            assert twin.encodes_as_jcs(doc, decimals) is want, doc  # (odd values included, it never raises)
            asked += 1
    assert asked >= 6600


@needs_twins
def test_the_reference_rewriting_twin_answers_as_the_plain_one(tmp_path: Path) -> None:
    from gateway import walks

    twin, guarded = native.load("gateway.walks"), walks.fast("rewrite_refs")
    pipeline = _pipeline(tmp_path, "12511921MB0001003C")
    bundles = [o.bundle for _, data in _hl7_inputs() for o in pipeline.convert(data, "hl7v2", "x") if o.bundle]
    assert len(bundles) >= 20
    rng = random.Random(22)
    docs: list[tuple[Any, dict[str, str]]] = []
    for bundle in bundles:
        local = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
        docs += [(e["resource"], local) for e in bundle["entry"]]
        docs.append((bundle, local))
    docs += [(doc, {"urn:uuid:1": "Patient/1"}) for doc in _walk_documents()]
    docs += [({"a": rng.choice(_ODD), "reference": "urn:uuid:1"}, {"urn:uuid:1": "Patient/1"}) for _ in range(50)]
    for doc, local in docs:
        before = copy.deepcopy(doc)
        want = walks.rewrite_refs(doc, local)
        got = twin.rewrite_refs(doc, local)
        assert (got is want or got == want) and type(got) is type(want)  # (NaN: the same object, unequal)
        assert got is doc if want is doc else got is not doc  # what is unchanged is shared, not copied
        guarded_got = guarded(doc, local)
        assert guarded_got is want or guarded_got == want
        assert doc is before or doc == before  # copy on write: the input is left as it was
    assert sum(1 for doc, local in docs if walks.rewrite_refs(doc, local) is not doc) >= 300


@pytest.mark.twin_fallbacks
def test_a_walk_whose_twin_raises_is_answered_by_the_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import walks

    class Twin:
        @staticmethod
        def encodes_as_jcs(obj: Any, decimals: bool = True) -> bool:
            raise TypeError("dict object expected; got list")

    monkeypatch.setattr(native, "load", lambda name: Twin)
    guarded = walks.fast("encodes_as_jcs")
    assert guarded({"a": [1, "b"]}, True) is True and guarded({"a": 2 ** 60}, True) is False
    monkeypatch.setattr(native, "load", lambda name: walks)  # no twins in use: the plain function itself
    assert walks.fast("encodes_as_jcs") is walks.encodes_as_jcs
