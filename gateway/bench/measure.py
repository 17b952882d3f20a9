"""Bench measurement: timing, latency percentiles, memory, and what a stage reports.

A stage is timed item by item (one message, one Bundle) with
:func:`time.perf_counter_ns`, so that latency percentiles come from the same
run as the throughput. CPU time (:func:`time.process_time`) is taken beside
wall time: "per core" figures are items per second of one busy core, and the
ratio of CPU to wall time shows how much of a stage waited on I/O.

Every timed loop runs :func:`settled`: what the stage made before it (its pipeline, mapping
tables, profiles, registry, inputs) is collected and frozen first, as each process of
``gateway serve`` freezes what it made at start (:func:`gateway.serve.settle_collector`), so
the collector's full passes go through the objects the work makes, not the stage's setup nor
what earlier stages of the run left. The baseline is timed the same way.

Memory is measured in a separate, short pass with :mod:`tracemalloc` (which
slows Python code down several times, so it never runs while timing): the
peak of memory allocated by the stage above what was held before it. The
process's peak resident set size is reported once for the whole run.
"""
from __future__ import annotations

import gc
import math
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StageResult", "NotAvailable", "percentile", "settled", "time_items", "traced_peak", "peak_rss_kib"]


class NotAvailable(Exception):
    """A stage whose product code is not there yet (or cannot run here); the message says why."""


@dataclass
class StageResult:
    """What one stage measured. Rates are per second of wall time on one core unless ``cores`` says otherwise."""

    name: str
    title: str
    status: str = "ok"  # ok | not-available | failed
    note: str = ""
    items: int = 0  # messages, Bundles, rows or requests processed
    unit: str = "msg"
    observations: int = 0  # Observations carried by those items
    wall_s: float = 0.0
    cpu_s: float = 0.0
    cores: float = 1.0  # cores the measured code could use (1 for an in-process stage)
    # an in-process stage whose code has helper threads (the database's checkpoint thread): per core is then per
    # core it kept busy on average, its threads' CPU time included (never less than one)
    threads: bool = False
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    peak_kib: float | None = None  # tracemalloc peak above the starting point
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Items per second (wall time)."""
        return self.items / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cores_used(self) -> float:
        """:attr:`cores`, or for a stage with :attr:`threads` the cores its process kept busy if more."""
        if self.threads and self.wall_s > 0:
            return max(self.cores, self.cpu_s / self.wall_s)
        return self.cores

    @property
    def rate_per_core(self) -> float:
        """Items per second per core."""
        cores = self.cores_used
        return self.rate / cores if cores else 0.0

    @property
    def obs_rate_per_core(self) -> float:
        """Observations per second per core."""
        cores = self.cores_used
        return self.observations / self.wall_s / cores if self.wall_s > 0 and cores else 0.0

    @property
    def median_ms(self) -> float | None:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float | None:
        return percentile(self.latencies_ms, 99)

    def as_json(self) -> dict[str, Any]:
        """The result as JSON-ready data (latencies summarised, not listed)."""
        out = asdict(self)
        out.pop("latencies_ms")
        out.update({
            "rate": round(self.rate, 2),
            "rate_per_core": round(self.rate_per_core, 2),
            "cores_used": round(self.cores_used, 3),
            "observations_per_core": round(self.obs_rate_per_core, 1),
            "median_ms": _round(self.median_ms),
            "p95_ms": _round(percentile(self.latencies_ms, 95)),
            "p99_ms": _round(self.p99_ms),
            "max_ms": _round(max(self.latencies_ms) if self.latencies_ms else None),
            "wall_s": round(self.wall_s, 4),
            "cpu_s": round(self.cpu_s, 4),
        })
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The ``pct``-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@contextmanager
def settled() -> Iterator[None]:
    """Inside: what this process holds now is left out of garbage collection (collected, then frozen); after,
    it is collected again as before (unfrozen). ``gateway serve``'s parts do the same once they have started
    (:func:`gateway.serve.settle_collector`); a timed loop inside measures the work as they run it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def time_items(result: StageResult, fn: Callable[[Any], Any], items: Sequence[Any],
               observations: Callable[[Any, Any], int] | None = None, *, keep: bool = True) -> list[Any]:
    """Run ``fn`` on every item, timing each; fill ``result`` and return ``fn``'s results (none unless ``keep``).

    Garbage collection is left on (the product runs with it) but collected
    before starting, so that one stage does not pay for the previous one's garbage.
    Without ``keep`` each result is dropped once counted, as the product drops a
    message's objects once it is answered: results kept for the whole stage (a
    stored message's Bundle, thousands of objects) would make every later
    collection go through all of them, a cost the product does not have.
    """
    gc.collect()
    outputs: list[Any] = []
    lat: list[float] = []
    obs = 0
    clock = time.perf_counter_ns
    cpu0, t0 = time.process_time(), clock()
    for item in items:
        s = clock()
        out = fn(item)
        if keep:
            outputs.append(out)
        elif observations is not None:
            obs += observations(item, out)
        del out  # (dropping it is part of an item's time, as in the product)
        lat.append((clock() - s) / 1e6)
    wall = (clock() - t0) / 1e9
    cpu = time.process_time() - cpu0
    if observations is not None and keep:
        obs = sum(observations(i, o) for i, o in zip(items, outputs))
    result.items += len(items)
    result.observations += obs
    result.wall_s += wall
    result.cpu_s += cpu
    result.threads = True
    result.latencies_ms.extend(lat)
    return outputs


def traced_peak(fn: Callable[[Any], Any], items: Sequence[Any]) -> float:
    """Peak KiB allocated (above the start) while ``fn`` runs over ``items``, traced by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        for item in items:
            fn(item)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(0.0, (peak - start) / 1024)


def peak_rss_kib() -> int:
    """This process's peak resident set size so far, in KiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss / 1024) if sys.platform == "darwin" else int(rss)
