"""Independent signing checks: other implementations agree with the gateway's signatures.

- RFC 8785 canonicalisation, checked for both the gateway's canonicaliser (``rfc8785``
  package, through :func:`gateway.signing.canonicalize`) and a second one, the ``jcs``
  package, against
  - Node.js, the ECMAScript ``JSON.stringify`` that RFC 8785 defers to for numbers:
    10,000 IEEE 754 doubles made here (edge cases, their neighbours, powers of two
    and ten, subnormals, integers, short decimals and seeded random bit patterns)
    are written by one ``node`` process and both canonicalisers must write exactly
    the same text (``node`` is required: the tests fail, not skip, without it);
  - RFC 8785 Appendix B (re-typed from the RFC), which also checks the Node.js oracle;
  - hand-made structure vectors (member order by UTF-16 code units, nesting, string
    escaping, literals), written for this file from the rules of RFC 8785 §3.2 and
    cross-checked with a small canonicaliser in JavaScript run by Node.js;
- signed Bundles verified by jwcrypto, another JOSE library, over canonical bytes
  made by ``jcs`` from plainly parsed JSON; and the reverse: a JWS made by jwcrypto
  verified by the gateway.
"""
from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import node_executable
from cryptography.hazmat.primitives import serialization

from gateway.errors import BadSignature, ParseError
from gateway.naming import SYSTEM_USCC
from gateway.signing import (
    StaticTrust,
    canonicalize,
    document_bytes,
    dumps,
    kid_of,
    load_certificate,
    load_private_key,
    parse_json,
    sign_bundle,
    signer_reference,
    verify_bundle,
)
from gateway.signing.jws import SIG_FORMAT, SIGNATURE_TYPE_SYSTEM, TARGET_FORMAT, VERIFICATION_SIGNATURE

jcs = pytest.importorskip("jcs", reason="the independent RFC 8785 implementation (PyPI jcs) is not installed")
jwk = pytest.importorskip("jwcrypto.jwk")
jws = pytest.importorskip("jwcrypto.jws")

DATA = Path(__file__).parent / "data" / "signing"
RFC = DATA / "rfc8785"
KEYS = Path(__file__).parent / "data" / "keys"
CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2025, 6, 2, 8, 0, tzinfo=CST)
SICHUAN = "12510121MB00000193"


def ours(value: Any) -> bytes:
    return canonicalize(value)


def theirs(value: Any) -> bytes:
    out = jcs.canonicalize(value)
    assert isinstance(out, bytes)
    return out


IMPLEMENTATIONS = [pytest.param(ours, id="gateway-rfc8785"), pytest.param(theirs, id="jcs")]


# ---------------------------------------------------------------- Node.js, the ECMAScript oracle


def run_node(script: str, stdin: bytes) -> bytes:
    """Run ``node -e script`` once with ``stdin``; fail (never skip) when Node.js is missing."""
    node = node_executable()
    if node is None:
        pytest.fail(
            "Node.js is required for the independent RFC 8785 checks: `node` is not on PATH. "
            "pip install -e '.[test]' installs a pinned Node.js; its JSON.stringify is the reference "
            "number serialisation RFC 8785 defers to.",
            pytrace=False,
        )
    try:
        proc = subprocess.run([node, "-e", script], input=stdin, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"running Node.js ({node}) failed: {exc}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"Node.js ({node}) exited with {proc.returncode}: {proc.stderr.decode(errors='replace')}",
                    pytrace=False)
    return proc.stdout


# Reads IEEE 754 bit patterns (16 hex digits, big-endian) one per line and prints
# "hex,JSON.stringify(double)" for each.
NODE_NUMBERS = r"""
const lines = require('fs').readFileSync(0, 'latin1').split('\n').filter((l) => l.length > 0);
const view = new DataView(new ArrayBuffer(8));
const out = lines.map((hex) => {
  view.setUint32(0, parseInt(hex.slice(0, 8), 16));
  view.setUint32(4, parseInt(hex.slice(8, 16), 16));
  return hex + ',' + JSON.stringify(view.getFloat64(0));
});
process.stdout.write(out.join('\n') + '\n');
"""

# Reads a JSON array of JSON texts; prints each as RFC 8785 text, one per line (canonical
# text never holds a raw line feed). Members are sorted with JavaScript's string `<`,
# which compares UTF-16 code units; the output is assembled by hand because JS objects
# enumerate integer-like keys ("1", "10") first, whatever their insertion order.
NODE_CANONICAL = r"""
const texts = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const byCodeUnits = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
function canon(v) {
  if (Array.isArray(v)) return '[' + v.map(canon).join(',') + ']';
  if (v !== null && typeof v === 'object') {
    return '{' + Object.keys(v).sort(byCodeUnits).map((k) => JSON.stringify(k) + ':' + canon(v[k])).join(',') + '}';
  }
  return JSON.stringify(v);
}
process.stdout.write(texts.map((t) => canon(JSON.parse(t))).join('\n') + '\n');
"""


# ---------------------------------------------------------------- numbers


def _double(hex_bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(hex_bits))[0]
    return value


def _hex(value: float) -> str:
    return struct.pack(">d", value).hex()


def _appendix_b() -> list[tuple[str, str]]:
    rows = []
    for line in (RFC / "appendix-b.csv").read_text().splitlines():
        if line and not line.startswith("#"):
            hex_bits, expected = line.split(",")
            rows.append((hex_bits, expected))
    return rows


NUMBER_COUNT = 10_000
TINY = 5e-324  # smallest subnormal
MIN_NORMAL = sys.float_info.min  # 2.2250738585072014e-308
EDGES = [
    0.0, TINY, 2 * TINY, 1e-323, math.nextafter(MIN_NORMAL, 0.0), MIN_NORMAL, sys.float_info.max,
    2.0**53 - 1, 2.0**53, 2.0**53 + 2, float(2**53 + 1), 2.0**63, 2.0**64, 1e15, 1e16, 1e17,
    1e20, 1e21, 1e22, 1e23, 1e-6, 1e-7, 1e-8, 5e-7, 1.5e-7, 9.5e-7, 123e-20, 1.0, 4.5, 4.55,
    0.1, 0.2, 0.1 + 0.2, 0.3, 1 / 3, 2 / 3, 100.0, 1e30, 2e-3, math.pi, math.e, 333333333.3333333,
    1424953923781206.2, 295147905179352830000.0, 1.7976931348623157e308, 9.999999999999997e22,
]


@functools.lru_cache(maxsize=None)
def number_sample() -> tuple[str, ...]:
    """NUMBER_COUNT distinct finite doubles (hex bit patterns), the same on every run."""
    rng = random.Random(8785)
    out: dict[str, None] = {}

    def add(value: float) -> None:
        if math.isfinite(value):
            out.setdefault(_hex(value))

    def add_bits(bits: int) -> None:
        add(_double(f"{bits:016x}"))

    for hex_bits, _ in _appendix_b():
        add(_double(hex_bits))
    for edge in EDGES:  # the edge, -edge and their five nearest neighbours each side
        for start in (edge, -edge):
            add(start)
            for direction in (math.inf, -math.inf):
                value = start
                for _ in range(5):
                    value = math.nextafter(value, direction)
                    add(value)
    add(-0.0)
    for k in range(-330, 312):  # powers of ten, including the ones that underflow or overflow
        add(float(f"1e{k}"))
        add(float(f"-5e{k}"))
    for k in range(-1074, 1024):  # powers of two, every exponent
        add(math.ldexp(1.0, k))
    for _ in range(300):  # subnormals
        add_bits(rng.getrandbits(1) << 63 | rng.getrandbits(52))
    for _ in range(600):  # integers around and beyond 2**53
        add(float(rng.choice((1, -1)) * rng.getrandbits(rng.randint(1, 80))))
    for _ in range(1500):  # short decimals, the numbers people write
        digits = rng.randint(1, 17)
        add(float(f"{rng.choice('-+')}{rng.randrange(1, 10**digits)}e{rng.randint(-30, 30)}"))
    for _ in range(1500):  # any mantissa, magnitudes where the notation switches (1e-7 .. 1e21)
        exponent = rng.randint(1023 - 30, 1023 + 77)
        add_bits(rng.getrandbits(1) << 63 | exponent << 52 | rng.getrandbits(52))
    while len(out) < NUMBER_COUNT:  # uniformly random bit patterns
        add_bits(rng.getrandbits(64))
    return tuple(out)[:NUMBER_COUNT]


@functools.lru_cache(maxsize=None)
def node_numbers() -> dict[str, str]:
    """hex bit pattern -> Node.js JSON.stringify text, from a single node process."""
    sample = number_sample()
    lines = run_node(NODE_NUMBERS, "".join(f"{h}\n" for h in sample).encode("ascii")).decode("ascii").splitlines()
    written = dict(line.split(",", 1) for line in lines)
    assert list(written) == list(sample), "Node.js did not answer every number, in order"
    return written


def test_number_sample_covers_the_edges() -> None:
    sample = set(number_sample())
    assert len(sample) == NUMBER_COUNT
    for value in (0.0, -0.0, TINY, -TINY, MIN_NORMAL, sys.float_info.max, -sys.float_info.max, 2.0**53 - 1,
                  2.0**53 + 2, 1e21, math.nextafter(1e21, 0), 1e-7, math.nextafter(1e-7, 1), 4.5, 0.1 + 0.2,
                  1e30, 2e-3):
        assert _hex(value) in sample, value
    assert all(math.isfinite(_double(h)) for h in sample)


@pytest.mark.slow
def test_node_oracle_agrees_with_rfc8785_appendix_b() -> None:
    written = node_numbers()
    rows = [(h, e) for h, e in _appendix_b() if e != "error"]
    assert len(rows) == 24
    assert [(h, written[h]) for h, _ in rows] == rows


@pytest.mark.slow
@pytest.mark.parametrize("canon", IMPLEMENTATIONS)
def test_numbers_are_written_as_node_writes_them(canon: Any) -> None:
    wrong = []
    for hex_bits, expected in node_numbers().items():
        got = canon(_double(hex_bits))
        if got != expected.encode("ascii"):
            wrong.append(f"{hex_bits}: node {expected}, got {got.decode(errors='replace')}")
    assert not wrong, f"{len(wrong)} of {NUMBER_COUNT} differ from Node.js, e.g.\n" + "\n".join(wrong[:20])


@pytest.mark.slow
def test_received_number_text_canonicalises_as_node_writes_it() -> None:
    # The gateway's real path: number text -> parse_json (Decimal) -> canonicalize. Feed it
    # Python's spelling (e.g. "1e-07", "4.5", "1e+16") and node's own spelling, with "E".
    wrong = []
    for hex_bits, expected in node_numbers().items():
        for text in (repr(_double(hex_bits)), expected.upper()):
            got = canonicalize(parse_json(text))
            if got != expected.encode("ascii"):
                wrong.append(f"{text}: node {expected}, got {got.decode(errors='replace')}")
    assert not wrong, f"{len(wrong)} differ from Node.js, e.g.\n" + "\n".join(wrong[:20])


@pytest.mark.parametrize("canon", IMPLEMENTATIONS)
def test_rfc8785_appendix_b_numbers(canon: Any) -> None:
    rows = _appendix_b()
    assert len(rows) == 26
    for hex_bits, expected in rows:
        value = _double(hex_bits)
        if expected == "error":
            with pytest.raises((ParseError, ValueError)):
                canon(value)
        else:
            assert canon(value) == expected.encode(), hex_bits


# ---------------------------------------------------------------- structure (hand-made vectors)

# Each vector: JSON text as received (any order, any spacing, escapes as a sender may
# write them) and the RFC 8785 bytes, written out by hand from RFC 8785 §3.2:
# no whitespace; members sorted by their names as arrays of UTF-16 code units (§3.2.3);
# array order kept; strings as ECMAScript JSON.stringify writes them (§3.2.2.2): only
# '"', '\\' and U+0000..U+001F escaped, as \b \t \n \f \r or else \u00xx in lowercase
# hex; everything else, including '/', DEL, U+0080, U+2028/U+2029 and non-BMP
# characters, written as UTF-8; numbers as in the tests above.

SORTING_INPUT = r"""{
  "（检验）": "fullwidth parentheses U+FF08",
  "\uD83D\uDE00": "U+1F600 as a surrogate pair",
  "检验": "U+68C0 U+9A8C",
  "a": 1, "10": 2, "\u20ac": "euro", "B": 3, "": 4,
  "\u00f6": "o umlaut", "2": 5, "\r": 6, "检": "prefix of 检验", "1": 7, "aa": 8,
  "\u0080": "C1 control U+0080"
}"""
# Expected order, comparing UTF-16 code units (hex) from the first one on:
#   ""        (empty: a prefix of every name)
#   "\r"      000D
#   "1"       0031          "1" < "10" < "2": string order, not numeric order
#   "10"      0031 0030
#   "2"       0032
#   "B"       0042          upper case before lower case: code units, no collation
#   "a"       0061
#   "aa"      0061 0061
#   "\u0080"  0080          (not escaped: only U+0000..U+001F are)
#   "ö"       00F6
#   "€"       20AC
#   "检"      68C0          a prefix sorts before its extensions
#   "检验"    68C0 9A8C
#   "😀"      D83D DE00     high surrogate D83D ...
#   "（检验）" FF08 ...      ... is below FF08.
# A code-point sort (Python's sorted()) and a UTF-8 byte sort (F0 9F 98 80 > EF BC 88)
# both put "😀" (U+1F600) after "（检验）" (U+FF08) instead; test_sorting_vector_is_utf16
# checks this reasoning mechanically.
SORTING_EXPECTED = (
    '{"":4,"\\r":6,"1":7,"10":2,"2":5,"B":3,"a":1,"aa":8,'
    '"\u0080":"C1 control U+0080","ö":"o umlaut","€":"euro","检":"prefix of 检验",'
    '"检验":"U+68C0 U+9A8C","😀":"U+1F600 as a surrogate pair","（检验）":"fullwidth parentheses U+FF08"}'
)

ESCAPING_INPUT = (
    r'{ "t": "\"quote\" \\backslash\\ \/slash <>&' "'" r' \u00e9\u20ac\uD83D\uDE00 \u2028\u2029 \u007F",'
    r'  "s": "\u0000\u0001\u0002\u0003\u0004\u0005\u0006\u0007\u0008\u0009\u000A\u000B\u000C\u000D\u000E\u000F'
    r'\u0010\u0011\u0012\u0013\u0014\u0015\u0016\u0017\u0018\u0019\u001A\u001B\u001C\u001D\u001E\u001F",'
    r'  "\u0007key\n": "escapes apply to names too",'
    '  "plain": "检验结果 ok" }'
)
ESCAPING_EXPECTED = (
    r'{"\u0007key\n":"escapes apply to names too","plain":"检验结果 ok",'
    r'"s":"\u0000\u0001\u0002\u0003\u0004\u0005\u0006\u0007\b\t\n\u000b\f\r\u000e\u000f'
    r'\u0010\u0011\u0012\u0013\u0014\u0015\u0016\u0017\u0018\u0019\u001a\u001b\u001c\u001d\u001e\u001f",'
    r'"t":"\"quote\" \\backslash\\ /slash <>&' "' é€😀 \u2028\u2029 \x7f\"}"
)

NESTED_INPUT = """
{ "z": [3, {"b": [], "a": {}}, [{"y": null, "x": true}]],
  "m": [[], {}, [[]], [{}], [{"b": 2, "a": 1}]],
  "a": {"c": {"e": false, "d": [1, [2, [3, []]]]}, "b": "x"} }
"""
NESTED_EXPECTED = (
    '{"a":{"b":"x","c":{"d":[1,[2,[3,[]]]],"e":false}},'
    '"m":[[],{},[[]],[{}],[{"a":1,"b":2}]],'
    '"z":[3,{"a":{},"b":[]},[{"x":true,"y":null}]]}'
)

NUMBERS_INPUT = """{"sum": 0.30000000000000004, "decimal": 4.50, "exp": 1E30, "neg0": -0.0, "small": 2e-3,
 "int": 100, "frac": 1.0E-7, "big": 12345678901234567890, "int53": 9007199254740993, "e21": 1e21,
 "below": 999999999999999999999e-21, "list": [-1, 0.5, -1.5e-7, 1e+300]}"""
NUMBERS_EXPECTED = (
    '{"below":1,"big":12345678901234567000,"decimal":4.5,"e21":1e+21,"exp":1e+30,"frac":1e-7,'
    '"int":100,"int53":9007199254740992,"list":[-1,0.5,-1.5e-7,1e+300],"neg0":0,"small":0.002,'
    '"sum":0.30000000000000004}'
)

LAB_INPUT = """{
  "resourceType": "Observation",
  "status": "final",
  "code": {"text": "血红蛋白", "coding": [{"system": "http://loinc.org", "code": "718-7"}]},
  "valueQuantity": {"value": 135.0, "unit": "g/L", "system": "http://unitsofmeasure.org", "code": "g/L"},
  "referenceRange": [{"text": "（130–175）g/L"}],
  "performer": [{"display": "四川省某县人民医院检验科"}],
  "note": [{"text": "复查\\t请空腹"}]
}"""
LAB_EXPECTED = (
    '{"code":{"coding":[{"code":"718-7","system":"http://loinc.org"}],"text":"血红蛋白"},'
    '"note":[{"text":"复查\\t请空腹"}],'
    '"performer":[{"display":"四川省某县人民医院检验科"}],'
    '"referenceRange":[{"text":"（130–175）g/L"}],'
    '"resourceType":"Observation","status":"final",'
    '"valueQuantity":{"code":"g/L","system":"http://unitsofmeasure.org","unit":"g/L","value":135}}'
)

STRUCTURE_VECTORS = {
    "sorting-utf16": (SORTING_INPUT, SORTING_EXPECTED),
    "escaping": (ESCAPING_INPUT, ESCAPING_EXPECTED),
    "nested": (NESTED_INPUT, NESTED_EXPECTED),
    "numbers-in-structure": (NUMBERS_INPUT, NUMBERS_EXPECTED),
    "lab-observation": (LAB_INPUT, LAB_EXPECTED),
    "literals-and-empties": (' [ true , false , null , {} , [] , "" , 0 , {"": {}} , [[]] ] ',
                             '[true,false,null,{},[],"",0,{"":{}},[[]]]'),
    "empty-object": (" { } ", "{}"),
    "empty-array": ("[\n]", "[]"),
    "top-level-true": (" true", "true"),
    "top-level-false": ("false ", "false"),
    "top-level-null": ("\tnull\n", "null"),
    "top-level-string": (r'"\u00e9\/\u001F"', '"é/\\u001f"'),
}


@functools.lru_cache(maxsize=None)
def node_structures() -> dict[str, bytes]:
    """Each structure vector canonicalised by the JavaScript canonicaliser, one node process."""
    names = list(STRUCTURE_VECTORS)
    texts = [STRUCTURE_VECTORS[n][0] for n in names]
    out = run_node(NODE_CANONICAL, json.dumps(texts, ensure_ascii=True).encode("ascii"))
    lines = out.split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(names) + 1, out
    return dict(zip(names, lines))


def test_sorting_vector_is_utf16() -> None:
    names = [k for k, _ in json.loads(SORTING_EXPECTED, object_pairs_hook=lambda pairs: pairs)]
    assert len(names) == 15 and set(names) == set(json.loads(SORTING_INPUT))
    assert names == sorted(names, key=lambda k: k.encode("utf-16-be"))
    assert names != sorted(names)  # code points
    assert names != sorted(names, key=lambda k: k.encode("utf-8"))
    assert names[-2:] == ["\U0001f600", "（检验）"]


@pytest.mark.parametrize("canon", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(STRUCTURE_VECTORS))
def test_structure_vectors(canon: Any, name: str) -> None:
    text, expected = STRUCTURE_VECTORS[name]
    value = parse_json(text) if canon is ours else json.loads(text)
    assert canon(value) == expected.encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRUCTURE_VECTORS))
def test_structure_vectors_agree_with_node(name: str) -> None:
    assert node_structures()[name] == STRUCTURE_VECTORS[name][1].encode("utf-8")


def test_received_text_does_not_matter() -> None:
    # The same document sent compact with ASCII escapes, or pretty with UTF-8 and other
    # number spellings: one set of signed bytes.
    pretty = parse_json(LAB_INPUT)
    compact = parse_json(json.dumps(json.loads(LAB_INPUT.replace("135.0", "1.35E2")), ensure_ascii=True))
    assert canonicalize(pretty) == canonicalize(compact) == LAB_EXPECTED.encode("utf-8")


# ---------------------------------------------------------------- signatures, checked by others


@pytest.fixture(scope="module")
def member() -> tuple[Any, Any]:
    return load_private_key(KEYS / "TEST-member-sichuan.key.pem"), load_certificate(DATA / "member-sichuan.cert.pem")


@pytest.fixture(scope="module")
def trust(member: tuple[Any, Any]) -> StaticTrust:
    trust = StaticTrust([load_certificate(DATA / "authority.cert.pem")])
    trust.add_member(member[1])
    return trust


def jwcrypto_verifies(text: str | bytes, cert: Any) -> dict[str, Any]:
    """Verify like an outside party: plain json, jcs, jwcrypto. Returns the protected header."""
    doc = json.loads(text)
    compact = base64.b64decode(doc["signature"]["data"]).decode("ascii")
    payload = jcs.canonicalize({k: v for k, v in doc.items() if k not in ("signature", "id", "meta")})
    key = jwk.JWK.from_pem(cert.public_bytes(serialization.Encoding.PEM))
    token = jws.JWS()
    token.deserialize(compact)
    token.verify(key, alg="ES256", detached_payload=payload)
    header: dict[str, Any] = json.loads(token.objects["protected"])
    return header


def test_shipped_vector_verifies_with_jwcrypto_over_jcs_bytes(member: tuple[Any, Any]) -> None:
    text = (DATA / "report-bundle.signed.json").read_bytes()
    header = jwcrypto_verifies(text, member[1])
    assert header["alg"] == "ES256" and header["kid"] == kid_of(member[1])
    # and both canonicalisers agree on the shipped document bytes
    doc = json.loads(text)
    outside = jcs.canonicalize({k: v for k, v in doc.items() if k not in ("signature", "id", "meta")})
    assert outside == (DATA / "report-bundle.document.jcs").read_bytes()


def test_fresh_signature_verifies_with_jwcrypto(member: tuple[Any, Any]) -> None:
    bundle = parse_json((DATA / "report-bundle.json").read_bytes())
    bundle["entry"][3]["resource"]["valueQuantity"]["value"] = parse_json("1.0E-7")  # exponent spelling
    when = dt.datetime(2025, 6, 1, 11, 0, 0, 250000, tzinfo=CST)
    signed = sign_bundle(bundle, member[0], [member[1]], who=signer_reference(member[1]), when=when)
    header = jwcrypto_verifies(dumps(signed, indent=1), member[1])
    assert header["sigT"] == "2025-06-01T11:00:00.250+08:00"


def test_jwcrypto_refuses_a_tampered_vector(member: tuple[Any, Any]) -> None:
    text = (DATA / "report-bundle.signed.json").read_text(encoding="utf-8").replace("4.50", "4.60")
    with pytest.raises(jws.InvalidJWSSignature):
        jwcrypto_verifies(text, member[1])


def test_gateway_verifies_a_jws_made_by_jwcrypto_over_jcs_bytes(member: tuple[Any, Any], trust: StaticTrust) -> None:
    key, cert = member
    doc = json.loads((DATA / "report-bundle.json").read_bytes())
    payload = jcs.canonicalize({k: v for k, v in doc.items() if k not in ("signature", "id", "meta")})
    assert payload == document_bytes(parse_json((DATA / "report-bundle.json").read_bytes()))
    private = jwk.JWK.from_pem(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
    protected = {"alg": "ES256", "kid": kid_of(cert), "x5c": [x5c], "sigT": "2025-06-01T12:00:00+08:00",
                 "srCms": [{"commId": {"id": f"urn:oid:{VERIFICATION_SIGNATURE}"}}]}
    token = jws.JWS(payload)
    token.add_signature(private, None, json.dumps(protected))
    header_b64, _, signature_b64 = token.serialize(compact=True).split(".")
    doc["signature"] = {
        "type": [{"system": SIGNATURE_TYPE_SYSTEM, "code": VERIFICATION_SIGNATURE}],
        "when": "2025-06-01T12:00:00+08:00",
        "who": {"identifier": {"system": SYSTEM_USCC, "value": SICHUAN}},
        "targetFormat": TARGET_FORMAT,
        "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(f"{header_b64}..{signature_b64}".encode()).decode(),
    }
    verified = verify_bundle(json.dumps(doc, ensure_ascii=True), trust, at=AT)
    assert verified.signer_uscc == SICHUAN and verified.kid == kid_of(cert)
    doc["entry"][1]["resource"]["birthDate"] = "1990-03-08"
    with pytest.raises(BadSignature):
        verify_bundle(json.dumps(doc), trust, at=AT)
