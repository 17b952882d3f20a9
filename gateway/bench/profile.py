"""Where the time of ``e2e`` goes: cProfile of ``Pipeline.ingest`` on the bench's generated messages, by part.

``python -m gateway.bench.profile [MESSAGES]`` ingests MESSAGES (default 300)
HL7 v2.5.1 ORU^R01 messages of 20 OBX, one per call as the ``e2e`` stage does,
for a member with a signing key and a registry, and prints each part's share of
the profiled time. Profiling slows Python code more than C code, so the shares
are a guide to what to work on, not a measurement of speed (``gateway bench``
measures that).
"""
from __future__ import annotations

import cProfile
import pstats
import sys

from gateway.bench.context import BenchContext, BenchOptions
from gateway.bench.inputs import BENCH_ISSUER_NAME, BENCH_ISSUER_USCC

__all__ = ["profile_e2e", "PARTS"]

#: Parts of the pipeline, by the function whose cumulative time is the part's (file suffix, function name).
PARTS = [
    ("profile validation", "gateway/fhir/profiles.py", "validate"),
    ("signing and canonical JSON", "gateway/exchange/service.py", "sign_with_digest"),
    ("recognition marks", "gateway/exchange/service.py", "stamp_marks"),
    ("parsing (HL7 v2 adapter)", "gateway/adapters/hl7v2.py", "read"),
    ("mapping codes, units, flags", "gateway/mapping/concepts.py", "map_message"),
    ("building the Bundle", "gateway/fhir/bundle.py", "build_bundle"),
    ("audit entry (made; its insert counts as storage)", "gateway/audit/log.py", "prepare"),
]


def profile_e2e(messages: int = 300) -> list[tuple[str, float]]:
    """(part, share of the profiled time of the ingest calls); storage is what the named parts leave."""
    from gateway.pipeline import Pipeline

    ctx = BenchContext.create(BenchOptions(quick=True, count=messages))
    try:
        pipeline = Pipeline(ctx.member_settings("profile", BENCH_ISSUER_USCC, BENCH_ISSUER_NAME), clock=ctx.clock)
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
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    cumulative = {(path.replace("\\", "/"), name): ct for (path, _, name), (_, _, _, ct, _) in stats.items()}

    def part(suffix: str, name: str) -> float:
        # the outermost function of that name in that file (a wrapper of the same name is not counted twice)
        return float(max((ct for (path, fn), ct in cumulative.items() if fn == name and path.endswith(suffix)),
                         default=0.0))

    total = part("gateway/pipeline.py", "ingest")
    shares = [(label, part(suffix, name) / total) for label, suffix, name in PARTS]
    shares.append(("storage: raw input, resources, search index, signed copy, commits",
                   1.0 - sum(share for _, share in shares)))
    return shares


def main(argv: list[str]) -> int:
    messages = int(argv[0]) if argv else 300
    print(f"cProfile of {messages} Pipeline.ingest calls (e2e: one message per call, checks, marks and signing on)")
    for label, share in profile_e2e(messages):
        print(f"  {share * 100:5.1f}%  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
