"""Bench report: the machine and versions, the table, the ratio to the baseline, the targets, JSON.

The JSON form (``gateway bench --json FILE``) holds everything the table
shows plus the raw figures, so that two runs (two commits) can be compared
with any JSON tool; its ``format`` names the layout.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gateway.bench.measure import StageResult, peak_rss_kib

__all__ = ["BenchReport", "machine_info", "versions", "TARGETS", "REPORT_FORMAT"]

REPORT_FORMAT = "gateway-bench/1"
_SHOWN = ("hl7", "fhir.resources", "pydantic", "rfc8785", "jwcrypto", "cryptography", "waitress")
_LIBRARIES = ("hl7", "fhir.resources", "fhir_core", "pydantic", "pydantic_core", "rfc8785", "jwcrypto",
              "cryptography", "sqlite-utils", "simplejson", "fhirpathpy", "flask", "waitress", "click", "PyYAML")

#: The performance issue's targets: (stage, what is compared, threshold, description). Per core unless stated;
#: every check on (validation, signing, durable storage).
TARGETS: list[tuple[str, str, float, str]] = [
    ("e2e", "rate_per_core", 600.0, "HL7 v2 ORU (20 OBX) -> validated, signed, stored, one message per call: "
                                    ">= 600 msg/s per core"),
    ("e2e", "ratio_to_baseline", 10.0, "... and >= 10x the baseline"),
    ("e2e-batch", "rate_per_core", 900.0, "the same, 32 messages per call: >= 900 msg/s per core"),
    ("inbound", "rate_per_core", 300.0, "inbound signed Bundle -> verified, validated, decided, audited, receipt: "
                                        ">= 300 /s per core"),
    ("csv", "rate_per_core", 20000.0, "CDC CSV -> validated Bundles: >= 20,000 rows/s, memory flat"),
    ("mllp-queued", "backlog_s_max", 1.0, "MLLP, mllp_ack = received, 200 msg/s offered: the queue reader keeps "
                                          "up (backlog when the load stops <= 1 s)"),
    ("mllp-queued", "p99_ms_max", 20.0, "... and ACK latency, ACK once the raw message is durable: p99 <= 20 ms"),
    ("audit-search", "p95_ms_max", 100.0, "audit search over 1 M entries: p95 <= 100 ms"),
    ("audit-verify", "wall_s_max", 20.0, "audit chain verification of 1 M entries: <= 20 s"),
]


def versions() -> dict[str, str]:
    """Python, SQLite and the key libraries' versions."""
    out = {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
           "sqlite": sqlite3.sqlite_version}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    from gateway import __version__

    out["gateway"] = __version__
    out["gateway_commit"] = _commit()
    out["compiled"] = _compiled()
    return out


def _compiled() -> str:
    """Whether the compiled twins of the hottest modules run (gateway.native), and if not, why."""
    from gateway import native

    status = native.status()
    if native.compiled():
        return f"compiled twins of {len(status)} modules (mypyc)"
    reasons = sorted(set(status.values()) - {"compiled", "not used (another twin is not)"})
    return "plain Python (" + "; ".join(reasons or ["not built"]) + ")"


def _commit() -> str:
    """The checkout's commit (read-only git), with ``+dirty`` when files differ from it."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"
    return (head or "-") + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """CPU model, cores (total and usable), memory, operating system."""
    model = platform.processor() or "-"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gib": round(mem_kib / 1024 / 1024, 1) if mem_kib else None,
            "os": f"{platform.system()} {platform.release()}", "machine": platform.machine()}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclass
class BenchReport:
    """A finished run: what was measured, on what, and how it compares."""

    mode: str
    started: str
    machine: dict[str, Any]
    versions: dict[str, str]
    results: list[StageResult] = field(default_factory=list)
    seconds: float = 0.0

    def get(self, name: str) -> StageResult | None:
        return next((r for r in self.results if r.name == name and r.status == "ok"), None)

    @property
    def ratio_to_baseline(self) -> float | None:
        """End-to-end speed (validated, signed, stored) as a multiple of the baseline's."""
        ours, base = self.get("e2e"), self.get("baseline")
        if ours is None or base is None or not base.rate_per_core:
            return None
        return ours.rate_per_core / base.rate_per_core

    def engine_ratios(self) -> dict[str, float]:
        """Each PostgreSQL stage's rate per core as a multiple of its SQLite stage's in the same run."""
        out: dict[str, float] = {}
        for r in self.results:
            other = self.get(str(r.extra.get("sqlite_stage", ""))) if r.status == "ok" else None
            if other is not None and other.rate_per_core:
                out[r.name] = r.rate_per_core / other.rate_per_core
        return out

    def targets(self) -> list[dict[str, Any]]:
        """Each target of the issue: measured value and met / not met / not measured."""
        out = []
        for name, what, threshold, text in TARGETS:
            res = self.get(name)
            value: float | None = None
            scale = ""
            if res is not None:
                if what == "rate_per_core":
                    value = res.rate_per_core
                elif what == "observations_per_core":
                    value = res.obs_rate_per_core
                elif what == "ratio_to_baseline":
                    value = self.ratio_to_baseline
                elif what == "p99_ms_max":
                    value = res.p99_ms
                elif what == "backlog_s_max":
                    # what was still queued when the offered load stopped, in seconds of the reader's work
                    backlog = res.extra.get("backlog_s")
                    value = float(backlog) if isinstance(backlog, (int, float)) else None
                elif what == "p95_ms_max":
                    from gateway.bench.measure import percentile

                    value = percentile(res.latencies_ms, 95)
                elif what == "wall_s_max":
                    # verification is linear in the entries: scale to the target's million when fewer were filled
                    value = res.extra.get("seconds_per_million_linear") or res.wall_s
                entries = res.extra.get("entries")
                if isinstance(entries, int) and entries < 1_000_000:
                    scale = f"at {entries:,} entries" + (", extrapolated to 1 M" if what == "wall_s_max" else "")
                if name == "csv" and isinstance(res.extra.get("rss_growth_kib"), int):
                    scale = f"RSS growth {res.extra['rss_growth_kib']} KiB over {res.items:,} rows"
            if value is None:
                state = "not measured"
            elif what.endswith("_max"):
                state = "met" if value <= threshold else "NOT met"
            else:
                state = "met" if value >= threshold else "NOT met"
            if state == "met" and "entries" in scale:
                state = "met, smaller"  # measured on a smaller log than the target names: not a claim for 1 M
            out.append({"stage": name, "target": text, "threshold": threshold,
                        "value": None if value is None else round(value, 3), "state": state, "scale": scale})
        return out

    def as_json(self) -> dict[str, Any]:
        ratio = self.ratio_to_baseline
        return {
            "format": REPORT_FORMAT, "mode": self.mode, "started": self.started,
            "seconds": round(self.seconds, 2), "machine": self.machine, "versions": self.versions,
            "peak_rss_kib": peak_rss_kib(),
            "ratio_to_baseline": None if ratio is None else round(ratio, 2),
            "postgresql_to_sqlite": {k: round(v, 2) for k, v in self.engine_ratios().items()},
            "stages": [r.as_json() for r in self.results], "targets": self.targets(),
        }

    def lines(self) -> list[str]:
        """The report as terminal lines: header, table, ratio, targets."""
        m, v = self.machine, self.versions
        out = [
            f"gateway bench ({self.mode}) {self.started}, {self.seconds:.1f} s",
            f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB, {m['os']}",
            f"versions: Python {v['python']}, SQLite {v['sqlite']}, gateway {v['gateway']} ({v['gateway_commit']}), "
            + ", ".join(f"{k} {v[k]}" for k in _SHOWN),
            f"hot modules: {v.get('compiled', '-')}",
            "",
        ]
        header = (f"{'stage':<13}{'items':>8} {'unit':<7}{'per s/core':>11}{'obs/s/core':>11}{'median ms':>10}"
                  f"{'p99 ms':>9}{'peak KiB':>9}  note")
        out += [header, "-" * len(header)]
        for r in self.results:
            if r.status != "ok":
                state = "NOT AVAILABLE YET" if r.status == "not-available" else "FAILED"
                out.append(f"{r.name:<13}{'':>8} {'':<7}{'':>11}{'':>11}{'':>10}{'':>9}{'':>9}  {state}: {r.note}")
                continue
            obs = _fmt(r.obs_rate_per_core) if r.observations else "-"
            out.append(f"{r.name:<13}{r.items:>8} {r.unit:<7}{_fmt(r.rate_per_core):>11}{obs:>11}"
                       f"{_fmt(r.median_ms, 2):>10}{_fmt(r.p99_ms, 2):>9}{_fmt(r.peak_kib, 0):>9}  {r.note}")
        ratio = self.ratio_to_baseline
        out.append("")
        out.append("e2e vs baseline: " + (f"{ratio:.1f}x" if ratio is not None else "not measured"))
        for name, times in self.engine_ratios().items():
            res = self.get(name)
            against = res.extra.get("sqlite_stage", "?") if res is not None else "?"
            out.append(f"{name} on PostgreSQL vs {against} on SQLite, per core: {times:.2f}x")
        out.append(f"peak RSS of the bench process: {peak_rss_kib() / 1024:.0f} MiB")
        out.append("")
        out.append("targets:")
        for t in self.targets():
            value = "-" if t["value"] is None else _fmt(t["value"], 2)
            scale = f", {t['scale']}" if t["scale"] else ""
            out.append(f"  [{t['state']:^12}] {t['target']} (measured {value}{scale})")
        return out


def now_text() -> str:
    return _dt.datetime.now(_dt.timezone(_dt.timedelta(hours=8))).isoformat(timespec="seconds")
