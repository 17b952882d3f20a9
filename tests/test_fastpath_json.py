"""JSON writer fast path: msgspec writes what simplejson wrote, on samples and random documents.

``gateway.jsonutil.dumps`` (every stored resource, every signed Bundle, every
answer) moved from simplejson to msgspec for speed. simplejson with
``use_decimal`` stays the reference here: for every document without floats
written with an exponent the text must be identical byte for byte, and for
every document it must parse back to the same value.
"""
from __future__ import annotations

import json
import random
from decimal import Decimal
from typing import Any

import simplejson

from conftest import DATA
from gateway import jsonutil


def reference(obj: Any) -> str:
    return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")))


def sample_documents() -> list[Any]:
    from gateway.bench.context import BenchContext, BenchOptions
    from gateway.bench.stages import _bundles

    ctx = BenchContext.create(BenchOptions(quick=True))
    try:
        docs: list[Any] = _bundles(ctx, ctx.fresh_messages(5))
    finally:
        ctx.close()
    for path in sorted(DATA.rglob("*.json")):
        try:
            docs.append(jsonutil.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError):
            continue  # samples of broken input
    return docs


def test_samples_are_written_exactly_as_simplejson_wrote_them() -> None:
    docs = sample_documents()
    assert len(docs) > 20
    for doc in docs:
        assert jsonutil.dumps(doc) == reference(doc)


_CHARS = ["a", "中", "文", "\"", "\\", "/", "\n", "\t", "\r", "\b", "\f", "\x00", "\x01", "\x1f", "\x7f", "\u2028",
          "\u2029", "é", "𠮷", "😀", "\ufeff", " "]


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(10 if depth < 4 else 6)
    if kind == 0:
        return "".join(rng.choice(_CHARS) for _ in range(rng.randrange(8)))
    if kind == 1:
        return rng.choice([True, False, None])
    if kind == 2:
        return rng.randrange(-(2**70), 2**70) if rng.random() < 0.2 else rng.randrange(-1000, 1000)
    if kind == 3:
        digits = str(rng.randrange(10**rng.randrange(1, 20)))
        places = rng.randrange(len(digits) + 1)
        text = (digits[:len(digits) - places] or "0") + ("." + digits[len(digits) - places:] if places else "")
        exponent = f"E{rng.randrange(-30, 30)}" if rng.random() < 0.1 else ""
        return Decimal(("-" if rng.random() < 0.3 else "") + text + exponent)
    if kind == 4:  # floats without an exponent in their shortest form
        return round(rng.uniform(-1e6, 1e6), rng.randrange(0, 6))
    if kind == 5:
        return ""
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {"".join(rng.choice(_CHARS) for _ in range(rng.randrange(1, 5))): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_random_documents_are_written_as_simplejson_writes_them() -> None:
    rng = random.Random(20261122)
    for _ in range(5000):
        doc = _random_value(rng, 0)
        assert jsonutil.dumps(doc) == reference(doc), repr(doc)


def test_floats_with_an_exponent_differ_in_spelling_only() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        value = rng.choice([1e16, 1e-7, 1e300, -2.5e-300]) * rng.uniform(1, 9)
        doc = {"valueQuantity": {"value": value}}
        ours = jsonutil.dumps(doc)
        assert json.loads(ours) == json.loads(reference(doc)) == doc


def test_what_msgspec_cannot_write_is_written_as_before() -> None:
    lone = {"text": "\ud800"}  # an unpaired surrogate: not UTF-8
    assert jsonutil.dumps(lone) == reference(lone)
    tuples = {"a": (1, Decimal("2.50"))}
    assert jsonutil.dumps(tuples) == reference(tuples) == '{"a":[1,2.50]}'
