"""Bench smoke test: the quick benchmark on a handful of inputs; the report's shape, not its timings."""
from __future__ import annotations

import json

import pytest

from gateway.adapters.base import RawUnit
from gateway.bench import STAGES, BenchOptions, run_bench
from gateway.bench.inputs import OBX_PER_MESSAGE, oru_batch, oru_r01, write_cdc_csv
from gateway.bench.measure import percentile
from gateway.bench.stages import selected
from gateway.commands.bench import bench

IN_PROCESS = ("parse", "map", "build", "check", "sign", "store", "store-batch", "e2e", "e2e-batch", "ingest",
              "baseline", "csv", "inbound", "audit-search", "audit-verify")


@pytest.fixture(scope="module")
def report():
    options = BenchOptions(quick=True, stages=IN_PROCESS, count=3, memory_sample=1, csv_rows=16, audit_entries=200)
    return run_bench(options, echo=lambda line: None)


def test_every_chosen_stage_is_reported_in_order(report) -> None:
    assert [r.name for r in report.results] == [n for n in STAGES if n in IN_PROCESS]
    failed = {r.name: r.note for r in report.results if r.status == "failed"}
    assert not failed
    assert {r.status for r in report.results} <= {"ok", "not-available"}


def test_stage_figures_are_consistent(report) -> None:
    for r in report.results:
        if r.status != "ok":
            assert r.note, f"{r.name}: a stage that did not run says why"
            continue
        assert r.items > 0 and r.wall_s > 0 and r.cpu_s >= 0, r.name
        assert r.rate_per_core > 0
        assert r.median_ms is not None and r.p99_ms is not None and r.median_ms <= r.p99_ms
    hl7 = [report.get(n) for n in ("parse", "map", "build", "store", "e2e", "ingest", "baseline")]
    for r in hl7:
        assert r is not None and r.unit == "msg"
        assert r.observations == r.items * OBX_PER_MESSAGE
        assert r.peak_kib is not None and r.peak_kib >= 0


def test_ratio_and_targets(report) -> None:
    assert report.ratio_to_baseline is not None and report.ratio_to_baseline > 0
    targets = report.targets()
    assert len(targets) == 9
    assert {t["state"] for t in targets} <= {"met", "NOT met", "not measured", "met, smaller"}
    audit = [t for t in targets if t["stage"].startswith("audit")]
    assert all(t["state"] in ("met, smaller", "NOT met") and "200 entries" in t["scale"] for t in audit)
    e2e = next(t for t in targets if t["stage"] == "e2e" and "10x" in t["target"])
    assert e2e["value"] == pytest.approx(report.ratio_to_baseline, rel=1e-3)
    assert [t["state"] for t in targets if t["stage"] == "mllp-queued"] == ["not measured"] * 2  # not run here
    batch = next(t for t in targets if t["stage"] == "e2e-batch")
    assert batch["value"] == pytest.approx(report.get("e2e-batch").rate_per_core, rel=1e-3)


def test_json_and_table(report) -> None:
    data = json.loads(json.dumps(report.as_json()))
    assert data["format"] == "gateway-bench/1" and data["mode"] == "quick"
    assert data["machine"]["cores"] >= 1 and data["versions"]["python"]
    assert {"hl7", "fhir.resources", "rfc8785", "jwcrypto", "cryptography", "sqlite"} <= set(data["versions"])
    stage = next(s for s in data["stages"] if s["name"] == "e2e")
    assert {"rate_per_core", "observations_per_core", "median_ms", "p99_ms", "peak_kib", "note"} <= set(stage)
    assert "latencies_ms" not in stage
    lines = report.lines()
    assert lines[0].startswith("gateway bench (quick)")
    assert any(line.startswith("machine: ") for line in lines) and any("versions: Python" in line for line in lines)
    assert any(line.startswith("stage ") and "p99 ms" in line for line in lines)
    assert any(line.startswith("e2e vs baseline: ") for line in lines)
    assert sum(1 for line in lines if line.startswith("  [")) == 9


def test_generated_messages_are_deterministic_and_complete() -> None:
    assert oru_r01(5) == oru_r01(5) and oru_r01(5) != oru_r01(6)
    assert oru_r01(5, seed=1) != oru_r01(5, seed=2)
    text = oru_r01(5).decode("utf-8")
    assert text.count("\rOBX|") == OBX_PER_MESSAGE and text.startswith("MSH|^~\\&|")
    assert len({m.split(b"|", 10)[9] for m in oru_batch(50)}) == 50  # distinct MSH-10


def test_generated_message_reads_without_errors(report) -> None:
    from gateway.adapters.hl7v2 import HL7v2Adapter
    from gateway.config import REPO_ROOT
    from gateway.mapping.tables import load_mappings

    adapter = HL7v2Adapter(load_mappings(REPO_ROOT / "mappings").structure("hl7v2-oru-r01"))
    msg = adapter.read(RawUnit(oru_r01(7), 1))
    assert not msg.errors and msg.patient is not None and msg.patient.id_card
    assert sum(len(r.results) for r in msg.reports) == OBX_PER_MESSAGE


def test_generated_csv(tmp_path) -> None:
    path = tmp_path / "x.csv"
    assert write_cdc_csv(path, 20) == 16  # whole exams of 8 rows
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    assert lines[0].startswith("体检编号,姓名,身份证号") and len(lines) == 17


def test_percentile_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown stage"):
        selected(("parse", "nope"), quick=True)
    assert [s.name for s in selected((), quick=True)] == [s.name for s in STAGES.values() if s.quick]


def test_cli_writes_json_and_refuses_bad_input(runner, tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = runner.invoke(bench, ["--quick", "--stages", "parse,map", "--count", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [s["name"] for s in data["stages"]] == ["parse", "map"]
    bad = runner.invoke(bench, ["--stages", "parse,nope"])
    assert bad.exit_code != 0 and "unknown stage(s) nope" in bad.output
    assert runner.invoke(bench, ["--count", "0"]).exit_code != 0
    assert "--quick" in runner.invoke(bench, ["--help"]).output


def test_profile_of_e2e_names_every_part_and_adds_up() -> None:
    from gateway.bench.profile import PARTS, profile_e2e

    shares = dict(profile_e2e(4))
    assert list(shares)[:len(PARTS)] == [label for label, _, _ in PARTS]
    assert all(share > 0 for share in shares.values()), shares  # every part ran, storage included
    assert sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("path, size", [("inbound", 3), ("csv", 24)])
def test_profiles_of_the_other_unmet_targets_name_parts_that_ran(path: str, size: int, capsys) -> None:
    from gateway.bench.profile import main, profile_path

    shares = profile_path(path, size)
    assert len(shares) >= 6 and all(share > 0 for _, share in shares), shares
    assert sum(share for _, share in shares) == pytest.approx(1.0)
    assert main(["nowhere"]) == 2 and "unknown path 'nowhere'" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["e2e", "inbound"])
def test_pages_a_message_writes_are_counted_by_table(path: str, capsys) -> None:
    """The count behind the README's "Where the time goes": every frame one more message writes to the log is
    named by the table or index its page belongs to."""
    from gateway.bench.profile import main, wal_pages

    frames, counted = wal_pages(path, 6)
    names = dict(counted)
    assert frames == sum(names.values()) > 20
    assert {"search_token", "resources", "messages", "audit_log"} <= set(names), names
    if path == "inbound":
        assert "recognition_decisions" in names
    assert main(["pages", "nowhere", "3"]) == 2 and "unknown path 'nowhere'" in capsys.readouterr().err
    assert main(["pages", path, "0"]) == 2 and "at least 1" in capsys.readouterr().err


def test_pages_a_batch_writes_are_counted_per_message(capsys) -> None:
    """A batch of 32 messages (one Pipeline.ingest: two commits) writes its pages once for all of them: fewer a
    message than one message per call, whose pages the next message writes again."""
    from gateway.bench.profile import BATCH, main, wal_pages

    frames, counted = wal_pages("e2e-batch", 40)
    single, _ = wal_pages("e2e", 40)
    names = dict(counted)
    assert frames == sum(names.values()) and {"search_token", "resources", "messages", "audit_log"} <= set(names)
    assert single < frames < single * BATCH  # (the batch's 32 messages share the index pages they touch)
    assert main(["pages", "e2e-batch", "40"]) == 0
    assert "a message" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["e2e", "inbound"])
def test_statements_and_parts_are_timed_per_message(path: str, capsys) -> None:
    """The figures behind the README's "Where the time goes": each statement's time (commits included) and each
    part's, per message, without a profiler; the parts ran, and the database's share is a part of the whole."""
    from gateway.bench.profile import main, phases, sql_time

    wall, spent, rows = sql_time(path, 4)
    statements = {sql for sql, *_ in rows}
    assert "COMMIT" in statements and any(sql.startswith("INSERT INTO resources") for sql in statements)
    assert 0 < spent < wall and spent == pytest.approx(sum(ms for _, ms, _, _ in rows))
    wall, parts = phases(path, 4)
    named = dict(parts)
    assert all(ms > 0 for ms in named.values()), named
    assert named["recording, in the write lock (with its parts below)"] < wall
    assert named["  commits"] < named["the database, every statement (commits included)"] < wall
    assert main(["sql", "nowhere"]) == 2 and "unknown path 'nowhere'" in capsys.readouterr().err
    assert main(["phases", path, "2"]) == 0 and "ms per" in capsys.readouterr().out


def test_deciding_is_timed_against_registries_of_growing_size(capsys) -> None:
    """``decide``: the figures of the README's registry paragraph. The registry grows as asked (times are the
    bench's to report, not a test's to assert)."""
    from gateway.bench.profile import decide_time, main

    small, grown = decide_time([0, 40], rounds=5)
    assert small[0] == 0 and grown[0] == 40
    assert grown[1] == small[1] + 40 and grown[2] == small[2] + 40 * 5 and grown[3] == small[3] + 40 * 60
    assert small[4] > 0 and grown[4] > 0
    assert main(["decide", "2"]) == 0
    out = capsys.readouterr().out
    assert "ms per Bundle" in out and len(out.strip().splitlines()) == 3
    assert main(["decide", "many"]) == 2 and "whole numbers" in capsys.readouterr().err


def test_a_stage_drops_each_result_once_timed_unless_it_keeps_them() -> None:
    """A stored message's objects are dropped once it is answered, in the product and so in the bench: results
    kept for a whole stage would make each later garbage collection go through them all."""
    import weakref

    from gateway.bench.measure import StageResult, time_items

    class Made:
        pass

    alive: list[weakref.ref[Made]] = []

    def work(item: int) -> Made:
        made = Made()
        alive.append(weakref.ref(made))
        return made

    dropped = StageResult("x", "x")
    assert time_items(dropped, work, [1, 2, 3], lambda item, out: 20, keep=False) == []
    assert dropped.items == 3 and dropped.observations == 60 and len(dropped.latencies_ms) == 3
    assert [ref() for ref in alive] == [None, None, None]
    kept = StageResult("y", "y")
    outputs = time_items(kept, work, [1, 2], lambda item, out: 20)
    assert [type(o) for o in outputs] == [Made, Made] and kept.observations == 40
    assert all(ref() is not None for ref in alive[3:])


def test_instructions_are_counted_by_library_from_callgrinds_output(capsys, monkeypatch) -> None:
    """``instructions``: each cost line's count goes to the library its function is in, from callgrind's own output
    file (a real excerpt: names given once and then by number, the inclusive cost of a call not counted where it was
    made); without valgrind, one line saying what to install."""
    import shutil

    from conftest import DATA

    from gateway.bench import profile
    from gateway.bench.profile import by_library, main

    with open(DATA / "bench" / "callgrind-e2e-excerpt.out", encoding="utf-8") as lines:
        found, total = by_library(lines)
    # counted by hand from the file: 5+9+1+3+12+1+1+3+1+1+18+1+3+3+1 (the 72, 5 and 1151 after calls= left out)
    # and 8+2+10+6+2+8 (the 106 left out), the second object named only by its number there
    assert found == {"_json.cpython-311-x86_64-linux-gnu.so": 63, "libpython3.11.so.1.0": 36}
    assert total == 7_703_365_078
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["instructions", "e2e", "5"]) == 1
    assert "apt-get install valgrind" in capsys.readouterr().err
    assert main(["instructions", "nowhere"]) == 2 and "e2e or inbound" in capsys.readouterr().err
    profile._work_units("inbound", 2)  # (what a counted process runs)
