"""Canonical JSON fast path: byte-identical to the rfc8785 package (the reference) on every input.

The gateway canonicalises through the standard library's C encoder when it can prove the result is
RFC 8785's: straight on the document when a walk over it finds nothing the encoder writes differently,
else on a copy with every number converted, and otherwise through rfc8785. These tests compare the
ways on the golden Bundles, the implementation guide's examples and seeded random documents built to
hit every difference between Python's and ECMAScript's JSON: number formats, key order beyond the BMP,
keys that are not strings, escapes, surrogates, types the encoder reads its own way.
"""
from __future__ import annotations

import random
import struct
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from decimal import Decimal
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType

import pytest
import rfc8785

from gateway.errors import ParseError
from gateway.signing.canonical import (
    _converted_canonical,
    _fast_canonical,
    _to_jcs_values,
    canonicalize,
    canonicalize_plain,
    parse_json,
)

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


# --- the direct fast path: the C encoder straight on the document, then a walk that vouches for it ---


def outcome(canonicaliser, doc):
    """Bytes, or the ParseError's text, so that refusals compare too."""
    try:
        return canonicaliser(doc)
    except ParseError as exc:
        return ("ParseError", str(exc))


def expected(doc):
    """What RFC 8785 says: rfc8785's bytes, or a ParseError where the document is not I-JSON."""
    try:
        return reference(doc)
    except ParseError as exc:  # a non-string key, NaN or infinity, an unsupported type
        return ("ParseError", str(exc))
    except rfc8785.CanonicalizationError as exc:  # an unpaired surrogate in a string
        return ("ParseError", f"$: cannot canonicalise JSON: {exc}")
    except UnicodeEncodeError:  # an unpaired surrogate in a key, met by rfc8785's sort
        return ("ParseError", "$: cannot canonicalise JSON: a key holds an unpaired UTF-16 surrogate")
    except RecursionError:
        return ("ParseError", "$: JSON nested too deeply to canonicalise")


class _Code(IntEnum):
    FINAL = 3


class _Frozen(Mapping):
    """A read-only mapping that is not a dict."""

    def __init__(self, items: dict) -> None:
        self._items = items

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _Text(str):
    pass


@pytest.mark.parametrize("doc", [
    pytest.param({"value": Decimal("4.50"), "unit": "mmol/L"}, id="decimal"),
    pytest.param({"v": [Decimal("-0"), Decimal("0.0"), Decimal("1E+2"), Decimal("120.000")]}, id="integral-decimals"),
    pytest.param({"v": [Decimal("9007199254740991"), Decimal("-9007199254740991")]}, id="decimals-at-2**53-1"),
    pytest.param({"v": [Decimal("0.1"), Decimal("-123456.789"), Decimal("0.0001"), Decimal("99999999999999.99")]},
                 id="fraction-decimals"),
    pytest.param({"v": [0, 7, -7, 9007199254740991, -9007199254740991]}, id="ints"),
    pytest.param({"v": [0.1 + 0.2, 4.5, -1.25, 0.0001, 123456789012345.67, 2.5e-4]}, id="floats"),
    pytest.param({"s": "\x00\x01\x1f\x7f\b\t\n\f\r\"\\/<>&'"}, id="escapes"),
    pytest.param({"s": "\u2028\u2029\ufeff\ue000\uffff 检验报告 é"}, id="bmp-text"),
    pytest.param({"s": "😀 \U0010ffff 𠮷", "list": ["𠀀"]}, id="astral-values"),
    pytest.param({"\ue000": 1, "\uffff": 2, "é": 3, "检": 4, "z": 5, "": 6, "A": 7}, id="bmp-keys"),
    pytest.param({"t": ("a", 1, (Decimal("2.5"), [True, None]))}, id="tuples"),
    pytest.param(("a", (), {}), id="root-tuple"),
    pytest.param({"a": {}, "b": [], "c": (), "d": {"": ""}}, id="empty"),
    pytest.param({"b": {"d": [{"f": 1, "e": 2}], "c": False}, "a": [[[]]]}, id="nested"),
    pytest.param("text", id="root-str"),
    pytest.param(5, id="root-int"),
    pytest.param(Decimal("2.50"), id="root-decimal"),
    pytest.param(None, id="root-null"),
    pytest.param(True, id="root-true"),
    pytest.param({_Text("key"): 1, "a": 2}, id="str-subclass-key"),  # written as its text, as rfc8785 does
])
def test_plain_documents_take_the_direct_fast_path(doc) -> None:
    fast = _fast_canonical(doc)
    assert fast is not None, "this document should not need a slower path"
    assert fast == reference(doc) == canonicalize(doc)
    assert _converted_canonical(doc) == fast  # the direct path takes nothing the copying path turns down


def _cycle() -> dict:
    doc: dict = {"resourceType": "Bundle"}
    doc["self"] = doc
    return doc


def _deep() -> list:
    doc: list = []
    for _ in range(5000):
        doc = [doc]
    return doc


@pytest.mark.parametrize("doc", [
    pytest.param({"v": 1e-7}, id="float-exponent-small"),
    pytest.param({"v": 1.5e-5}, id="float-exponent-1.5e-5"),
    pytest.param({"v": 1e21}, id="float-exponent-1e21"),
    pytest.param({"v": [1.5e300, -2.5e-300, 5e-324]}, id="float-exponent-extremes"),
    pytest.param({"v": 5.0}, id="integral-float"),
    pytest.param({"v": -0.0}, id="negative-zero"),
    pytest.param({"v": [0.0, 1e15, 2.0 ** 53, 1e16, 1e20]}, id="integral-floats"),
    pytest.param({"v": 2 ** 53}, id="int-2**53"),
    pytest.param({"v": -(2 ** 53)}, id="int--2**53"),
    pytest.param({"v": 12345678901234567890}, id="big-int"),
    pytest.param({"v": Decimal("1E-7")}, id="decimal-exponent"),
    pytest.param({"v": Decimal("0.000001")}, id="decimal-1e-06"),
    pytest.param({"v": Decimal("0.00001")}, id="decimal-1e-05"),
    pytest.param({"v": Decimal("1E+30")}, id="decimal-1e30"),
    pytest.param({"v": Decimal("9007199254740993")}, id="decimal-beyond-2**53"),
    pytest.param({"v": Decimal("123456789012345678901234567890")}, id="decimal-huge"),
    pytest.param({"v": Decimal("NaN")}, id="decimal-nan"),
    pytest.param({"v": Decimal("sNaN")}, id="decimal-snan"),
    pytest.param({"v": Decimal("Infinity")}, id="decimal-infinity"),
    pytest.param({"v": Decimal("-Infinity")}, id="decimal-minus-infinity"),
    pytest.param({"v": Decimal("1E+400")}, id="decimal-beyond-double"),
    pytest.param({"v": float("nan")}, id="float-nan"),
    pytest.param({"v": float("-inf")}, id="float-infinity"),
    pytest.param({1: "a"}, id="int-key"),
    pytest.param({10: "a", 9: "b"}, id="int-keys-only"),
    pytest.param({"a": {"b": [{0: "x"}]}}, id="nested-int-key"),
    pytest.param({"a": 1, 2: 3}, id="mixed-keys"),
    pytest.param({1.5: "x"}, id="float-key"),
    pytest.param({True: "x"}, id="bool-key"),
    pytest.param({None: "x"}, id="none-key"),
    pytest.param({(1, 2): "x"}, id="tuple-key"),
    pytest.param({"a": {"😀": 1, "\ue000": 2}}, id="astral-key"),
    pytest.param({"\U0010ffff": 1}, id="astral-key-max"),
    pytest.param({"a": "x\ud800y"}, id="surrogate-value"),
    pytest.param({"\udc00": 1}, id="surrogate-key"),
    pytest.param({"a": MappingProxyType({"b": 1, "a": Decimal("2.50")})}, id="mappingproxy"),
    pytest.param(_Frozen({"b": [1, 2], "a": "x"}), id="root-mapping"),
    pytest.param({"a": OrderedDict([("b", 1), ("a", 2)])}, id="dict-subclass"),
    pytest.param({"a": _Code.FINAL}, id="int-subclass"),
    pytest.param({"a": _Text("text")}, id="str-subclass"),
    pytest.param({"a": object()}, id="unknown-type"),
    pytest.param({"a": {1, 2}}, id="set"),
    pytest.param(_cycle(), id="cycle"),
    pytest.param(_deep(), id="deep"),
])
def test_what_the_direct_path_cannot_vouch_for_ends_as_rfc8785_says(doc) -> None:
    assert _fast_canonical(doc) is None
    assert outcome(canonicalize, doc) == expected(doc)


def test_int_keys_are_refused_not_written_as_strings() -> None:
    # the C encoder would silently write {"9":"b","10":"a"}; RFC 8785 has no such document
    with pytest.raises(ParseError, match="key 10 is not a string"):
        canonicalize({10: "a", 9: "b"})
    with pytest.raises(ParseError, match="key 0 is not a string"):
        canonicalize({"entry": [{"resource": {0: "x"}}]})


def test_integral_floats_and_mappings_still_avoid_rfc8785() -> None:
    # the direct path turns these down; the copying path still writes them without the reference
    for doc in ({"v": 5.0, "w": -0.0}, MappingProxyType({"a": Decimal("2.50")}), {"a": OrderedDict(b=1)}):
        assert _fast_canonical(doc) is None
        assert _converted_canonical(doc) == reference(doc)


_WILD_CHARS = ["a", "Z", "9", " ", "\"", "\\", "/", "\b", "\t", "\n", "\f", "\r", "\x00", "\x01", "\x1f", "\x7f",
               "é", "检", "\u2028", "\ue000", "\uffff", "😀", "𠮷", "\U0010ffff"]
_WILD_DECIMALS = ["4.50", "0.1", "-0", "0E-7", "1E+2", "1E-7", "0.000001", "0.00001", "1E21", "1E+30", "-2.5E-3",
                  "9007199254740991", "9007199254740992", "9007199254740993", "123456789012345678901234567890",
                  "1E+400", "1E-400", "NaN", "Infinity", "-Infinity"]


def _wild_string(rng: random.Random, astral: bool, risky: bool) -> str:
    pool = _WILD_CHARS if astral else [c for c in _WILD_CHARS if c <= "\uffff"]
    text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))
    if risky and rng.random() < 0.02:
        text += "\ud83d"  # half a surrogate pair
    return text


def _wild_number(rng: random.Random, risky: bool):
    kind = rng.randrange(10 if risky else 5)
    if kind == 0:
        return Decimal(f"{rng.randint(-10 ** 8, 10 ** 8)}E{rng.randint(-6, 2)}")
    if kind == 1:
        return rng.randint(-2 ** 53 + 1, 2 ** 53 - 1)
    if kind == 2:
        return rng.randint(-1000, 1000)
    if kind == 3:
        return round(rng.uniform(-1e6, 1e6), rng.randint(1, 6)) + 0.001  # seldom integral
    if kind == 4:
        return Decimal(f"{rng.randint(-99999, 99999)}.{rng.randint(0, 999):03d}")
    if kind == 5:
        return Decimal(rng.choice(_WILD_DECIMALS))
    if kind == 6:
        return rng.choice([2 ** 53, -2 ** 53, 2 ** 64 + 1, -(10 ** 20)]) * rng.choice([1, 3])
    if kind == 7:
        return float(rng.randint(-2 ** 60, 2 ** 60)) / rng.choice([1, 2, 1024])
    if kind == 8:
        return rng.random() * 10 ** rng.randint(-30, 30)
    return struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]  # any double, NaN included


def _wild_key(rng: random.Random, risky: bool):
    if risky and rng.random() < 0.03:
        return rng.choice([0, 7, -1, 1.5, True, None])
    return _wild_string(rng, astral=risky and rng.random() < 0.1, risky=risky)


def _wild_value(rng: random.Random, risky: bool, depth: int = 0):
    roll = rng.randrange(12 if depth < 5 else 7)
    if roll < 3:
        return _wild_string(rng, astral=risky or rng.random() < 0.5, risky=risky)  # astral text is fine in values
    if roll < 6:
        return _wild_number(rng, risky)
    if roll == 6:
        return rng.choice([True, False, None])
    if roll < 10:
        return {_wild_key(rng, risky): _wild_value(rng, risky, depth + 1) for _ in range(rng.randint(0, 6))}
    items = [_wild_value(rng, risky, depth + 1) for _ in range(rng.randint(0, 5))]
    return tuple(items) if roll == 10 and rng.random() < 0.3 else items


@pytest.mark.parametrize("seed", range(10))
def test_thousands_of_wild_documents_end_exactly_as_rfc8785_says(seed: int) -> None:
    rng = random.Random(20250 + seed)
    direct = 0
    for n in range(500):
        risky = n % 3 == 0  # a third may hold anything; the rest mostly what the direct path takes
        doc = {_wild_key(rng, risky): _wild_value(rng, risky) for _ in range(rng.randint(1, 6))}
        want = expected(doc)
        assert outcome(canonicalize, doc) == want
        fast = _fast_canonical(doc)
        converted = _converted_canonical(doc)
        assert fast is None or fast == want
        assert converted is None or converted == want
        if fast is not None:
            assert converted is not None, "the direct path must take nothing the copying path turns down"
            direct += 1
    assert direct >= 250, f"the direct path took only {direct} of 500 documents"


def _rfc8785_or_error(doc) -> bytes | type:
    try:
        return rfc8785.dumps(doc)
    except Exception as exc:  # noqa: BLE001 - the reference's refusal is the expected answer
        return type(exc)


@pytest.mark.parametrize("seed", range(10))
def test_plain_documents_give_what_rfc8785_gives_including_its_refusals(seed: int) -> None:
    """Audit records go through canonicalize_plain: rfc8785's bytes, and its errors for decimals and the like."""
    rng = random.Random(1700 + seed)
    for n in range(300):
        bmp = n % 2 == 0
        doc = {_string(rng, keys=True, bmp=bmp): _value(rng, bmp=bmp) for _ in range(rng.randint(1, 6))}
        expected = _rfc8785_or_error(doc)
        if isinstance(expected, bytes):
            assert canonicalize_plain(doc) == expected
        else:
            with pytest.raises(expected):
                canonicalize_plain(doc)


@pytest.mark.parametrize("seed", range(6))
def test_plain_wild_documents_give_what_rfc8785_gives(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wild corpus (subclasses, sets, tuples, NaN, astral keys, big integers) through canonicalize_plain."""
    rng = random.Random(4200 + seed)
    reference = rfc8785.dumps
    used: list[int] = []
    monkeypatch.setattr(rfc8785, "dumps", lambda obj: used.append(1) or reference(obj))
    direct = 0
    for n in range(500):
        risky = n % 3 == 0
        doc = {_wild_key(rng, risky): _wild_value(rng, risky) for _ in range(rng.randint(1, 6))}
        try:
            expected: bytes | type = reference(doc)
        except Exception as exc:  # noqa: BLE001 - the reference's refusal is the expected answer
            expected = type(exc)
        before = len(used)
        if isinstance(expected, bytes):
            assert canonicalize_plain(doc) == expected
        else:
            with pytest.raises(expected):
                canonicalize_plain(doc)
        direct += len(used) == before
    assert direct >= 80, f"msgspec wrote only {direct} of 500 documents"


@pytest.mark.parametrize("doc", [
    {"facts": {"value": Decimal("4.50")}},  # a decimal has no place in an audit record
    {"a": 2**60},
    {"a": "\ud800"},
    {1: "int key"},
    {"a": float("nan")},
    {"a": [float("-inf")]},  # msgspec writes NaN and infinities as null: the walk must send these to rfc8785
    {"a": {1, 2}},  # msgspec writes a set as an array
])
def test_plain_refuses_what_rfc8785_refuses(doc) -> None:
    expected = _rfc8785_or_error(doc)
    assert not isinstance(expected, bytes)
    with pytest.raises(expected):
        canonicalize_plain(doc)


def test_an_audit_record_takes_the_plain_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    record = {"facts": {"member": "12500102MB0002006J", "name": "重庆市涪陵中心医院", "items": [1, 2, 3],
                        "ok": True, "none": None, "nested": {"b": 1, "a": "\u2028"}}, "kind": "decision", "t": 1}
    assert canonicalize_plain(record) == rfc8785.dumps(record)
    calls: list[object] = []
    original = rfc8785.dumps
    monkeypatch.setattr(rfc8785, "dumps", lambda obj: calls.append(obj) or original(obj))
    canonicalize_plain(record)
    assert calls == [], "a plain record is written by msgspec, not by the reference"
