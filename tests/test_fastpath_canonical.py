"""Canonical JSON fast path: byte-identical to the rfc8785 package (the reference) on every input.

The gateway canonicalises through the standard library's C encoder when it can prove the result is
RFC 8785's, and otherwise through rfc8785. These tests compare the two on the golden Bundles, the
implementation guide's examples and seeded random documents built to hit every difference between
Python's and ECMAScript's JSON: number formats, key order beyond the BMP, escapes, surrogates.
"""
from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import pytest
import rfc8785

from gateway.errors import ParseError
from gateway.signing.canonical import _fast_canonical, _to_jcs_values, canonicalize, parse_json

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "tests" / "data" / "expected").glob("*.json")) + sorted(
    (ROOT / "profiles" / "examples").glob("*.json"))


def reference(obj) -> bytes:
    return rfc8785.dumps(_to_jcs_values(obj, "$"))


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_samples_take_the_fast_path_with_identical_bytes(path: Path) -> None:
    doc = parse_json(path.read_bytes())
    fast = _fast_canonical(doc)
    assert fast is not None, "a report Bundle should not need the slow path"
    assert fast == reference(doc)


_CHARS = ["a", "Z", "0", " ", "\"", "\\", "/", "\b", "\t", "\n", "\f", "\r", "\x00", "\x1f", "\x7f", "é", "检",
          "验", "\u2028", "\u2029", "\ufeff", "\ue000", "\uffff", "😀", "\U0010ffff"]


_BMP = [c for c in _CHARS if c <= "\uffff"]


def _string(rng: random.Random, keys: bool = False, bmp: bool = False) -> str:
    pool = _BMP if bmp else _CHARS
    if keys:
        pool = pool + ["resourceType", "id", "value", "code"]
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 6)))


def _number(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randint(-2**60, 2**60)
    if kind == 1:
        return rng.randint(-1000, 1000)
    if kind == 2:
        return Decimal(f"{rng.randint(-99999, 99999)}.{rng.randint(0, 999):03d}")
    if kind == 3:
        return rng.choice([0.1 + 0.2, 1e21, 1e20, 1e-6, 1e-7, 5e-324, 1.7976931348623157e308, -0.0, 4.5, 2e-3, 1e16])
    if kind == 4:
        return Decimal(rng.choice(["4.50", "1E30", "1e-7", "0.000001", "123456789012345678901234567890", "-0"]))
    if kind == 5:
        return rng.uniform(-1e6, 1e6)
    if kind == 6:
        return float(rng.randint(-2**55, 2**55))
    return rng.random() * 10 ** rng.randint(-30, 30)


def _value(rng: random.Random, depth: int = 0, bmp: bool = False):
    roll = rng.randrange(10 if depth < 4 else 6)
    if roll < 2:
        return _string(rng, bmp=bmp)
    if roll < 4:
        return _number(rng)
    if roll == 4:
        return rng.choice([True, False, None])
    if roll == 5:
        return rng.choice(["", "检验报告", "line\nbreak"])
    if roll < 8:
        return {_string(rng, keys=True, bmp=bmp): _value(rng, depth + 1, bmp) for _ in range(rng.randint(0, 5))}
    return [_value(rng, depth + 1, bmp) for _ in range(rng.randint(0, 5))]


@pytest.mark.parametrize("seed", range(40))
def test_random_documents_are_canonicalised_exactly_as_rfc8785_does(seed: int) -> None:
    rng = random.Random(8785 + seed)
    fast_used = 0
    for n in range(50):
        bmp = n % 2 == 0  # half the documents keep to the BMP, so that the fast path is exercised
        doc = {_string(rng, keys=True, bmp=bmp): _value(rng, bmp=bmp) for _ in range(rng.randint(1, 6))}
        try:
            expected = reference(doc)
        except (ParseError, rfc8785.CanonicalizationError):
            with pytest.raises(ParseError):
                canonicalize(doc)
            continue
        assert canonicalize(doc) == expected
        fast = _fast_canonical(doc)
        assert fast is None or fast == expected
        fast_used += fast is not None
    assert fast_used >= 5, "the fast path should take a good share of these documents"


@pytest.mark.parametrize("doc", [
    {"a": "\ud800"},  # a lone surrogate: not I-JSON
    {"a": float("nan")},
    {"a": Decimal("Infinity")},
])
def test_inputs_that_are_not_i_json_are_refused_by_both_paths(doc) -> None:
    assert _fast_canonical(doc) is None
    with pytest.raises(ParseError):
        canonicalize(doc)


@pytest.mark.parametrize("number, text", [
    (9007199254740992.0, b"9007199254740992"), (9007199254740994.0, b"9007199254740994"),
    (1e20, b"100000000000000000000"), (12345678901234567000.0, b"12345678901234567000"),
    (-0.0, b"0"), (5.0, b"5"), (1e21, b"1e+21"), (1e-7, b"1e-7"), (0.000001, b"0.000001"),
])
def test_numbers_at_the_edges_of_the_fast_path(number: float, text: bytes) -> None:
    assert canonicalize({"v": number}) == b'{"v":' + text + b"}"


def test_keys_beyond_the_bmp_sort_by_utf16_code_units() -> None:
    doc = {"\ue000": 1, "😀": 2}  # code point order puts U+E000 first; UTF-16 puts the surrogate pair first
    assert _fast_canonical(doc) is None
    assert canonicalize(doc) == '{"😀":2,"\ue000":1}'.encode("utf-8")
