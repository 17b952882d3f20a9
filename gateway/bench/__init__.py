"""Bench: how fast the gateway turns results into validated, signed, stored FHIR, stage by stage.

``gateway bench`` (:func:`run_bench`) generates realistic inputs
(:mod:`gateway.bench.inputs`), measures every stage of the HL7 v2 path in
process (:mod:`gateway.bench.stages`), the same work done the straightforward
way as a baseline (:mod:`gateway.bench.baseline`), and the MLLP listener and
``gateway serve`` under load on loopback (:mod:`gateway.bench.servers`), then
prints a table with the machine and versions (:mod:`gateway.bench.report`).
Stages of areas still being built say "not available yet" and what is missing.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.bench.context import BenchContext, BenchOptions
from gateway.bench.measure import NotAvailable, StageResult
from gateway.bench.report import BenchReport, machine_info, now_text, versions
from gateway.bench.stages import STAGES, selected

__all__ = ["BenchOptions", "BenchReport", "StageResult", "STAGES", "run_bench"]

log = logging.getLogger(__name__)


def run_bench(options: BenchOptions, echo: Callable[[str], Any] = print) -> BenchReport:
    """Run the chosen stages and return the report (``echo`` gets one progress line per stage).

    A stage that fails is reported as failed with its error, and the run goes on.

    :raises KeyError: an unknown stage name.
    """
    stages = selected(options.stages, options.quick)
    report = BenchReport("quick" if options.quick else "full", now_text(), machine_info(), versions())
    ctx = BenchContext.create(options, echo)
    began = time.perf_counter()
    # The product logs one INFO line per message; the bench measures the work, not a console.
    gateway_log = logging.getLogger("gateway")
    level = gateway_log.level
    gateway_log.setLevel(logging.WARNING)
    try:
        for st in stages:
            t0 = time.perf_counter()
            try:
                result = st.run(ctx)
            except NotAvailable as exc:
                result = StageResult(st.name, st.title, status="not-available", note=str(exc))
            except Exception as exc:  # one broken stage must not hide the others' figures
                log.debug("bench stage %s failed", st.name, exc_info=True)
                result = StageResult(st.name, st.title, status="failed", note=f"{type(exc).__name__}: {exc}")
            report.results.append(result)
            echo(f"  {st.name:<13} {result.status:<14} {time.perf_counter() - t0:6.1f} s")
    finally:
        gateway_log.setLevel(level)
        ctx.close()
    report.seconds = time.perf_counter() - began
    return report
