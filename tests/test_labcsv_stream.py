"""Large CDC exports stream: ~200k rows are read in bounded memory, and the pipeline pulls rows only as it needs them.

The rows are generated on the fly (nothing is written to disk). Memory is measured
as the peak resident size of a child process (``resource.getrusage``): read once
after the first tenth of the file and once at its end, the peak must not grow with
the rows read. tracemalloc would slow the reading six-fold.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT
from gateway.config import load_settings
from gateway.pipeline import Pipeline, Status

HEADER = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,接害工龄,"
          "体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标志,主检结论,主检医师,报告日期\n")
ROW = ("TJ{exam:07d},王演示,51132219800707331X,男,1980-07-07,通江演示建材有限公司,91511921MA62Q0A1XC,破碎工,1001、3001,"
       "矽尘、噪声,6.5,在岗期间,2024-03-15,XCG-WBC,白细胞计数,6.{digit},10^9/L,3.5-9.5,,目前未见异常,吴主检,"
       "2024-03-22 16:30:00\n")


class GeneratedExport(io.RawIOBase):
    """An export of ``rows`` rows, ``per_exam`` rows per exam, produced as it is read."""

    def __init__(self, rows: int, per_exam: int) -> None:
        super().__init__()
        self.rows, self.per_exam = rows, per_exam
        self.next_row = -1
        self.pending = b""
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        while len(self.pending) < len(buffer) and self.next_row < self.rows:
            if self.next_row < 0:
                self.pending += HEADER.encode("utf-8")
            else:
                self.pending += ROW.format(exam=self.next_row // self.per_exam,
                                           digit=self.next_row % 10).encode("utf-8")
            self.next_row += 1
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.produced += n
        return n


CHILD = textwrap.dedent("""
    import io, json, resource, sys
    sys.path.insert(0, "tests")
    from test_labcsv_stream import GeneratedExport
    from gateway.adapters.labcsv import LabCSVAdapter
    from gateway.config import load_settings
    from gateway.mapping.tables import load_mappings

    rows, per_exam = int(sys.argv[1]), int(sys.argv[2])
    structures = load_mappings(load_settings(environ={}).mappings_dir).structures.values()
    adapter = LabCSVAdapter([s for s in structures if s.get("format") == "cdc-csv"])
    source = GeneratedExport(rows, per_exam)
    exams = results = errors = 0
    early = None
    for unit in adapter.split_stream(io.BufferedReader(source, buffer_size=1 << 16), "generated.csv"):
        msg = adapter.read(unit)
        exams += 1
        results += len(msg.reports[0].results) if msg.reports else 0
        errors += len(msg.errors)
        if early is None and results >= rows // 10:
            early = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    late = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"exams": exams, "results": results, "errors": errors, "bytes": source.produced,
                      "early_kib": early, "late_kib": late}))
""")


def test_200k_rows_are_read_in_bounded_memory() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", CHILD, "200000", "50"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["results"] == 200_000 and stats["exams"] == 4_000 and stats["errors"] == 0
    assert stats["bytes"] > 40_000_000  # ~40 MB of CSV went through
    growth_mib = (stats["late_kib"] - stats["early_kib"]) / 1024
    # Nine tenths of the file (~36 MB) were read after the first measurement; the peak barely moved.
    assert growth_mib < 6, stats


def test_the_pipeline_pulls_rows_only_as_it_converts(tmp_path, clock) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": "12510000MB00030095",
                                                    "issuer_name": "四川省疾病预防控制中心（演示）"})
    source = GeneratedExport(200_000, 10)
    stream = io.BufferedReader(source, buffer_size=1 << 16)
    converted = Pipeline(settings, clock=clock).convert(stream, "cdc-csv", "generated.csv")
    first = list(itertools.islice(converted, 3))
    assert [o.status for o in first] == [Status.CONVERTED] * 3
    assert [len(o.bundle["entry"]) for o in first] == [14, 14, 14]  # 10 items, issuer, worker, employer, report
    assert source.produced < 200_000  # a few buffers of a ~40 MB export: nothing is read ahead
