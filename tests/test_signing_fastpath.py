"""Signing fast path: the same bytes as the reference path, on fuzzed documents and on every Bundle the gateway builds.

Canonical bytes are compared with the rfc8785 package (the reference) on seeded random documents built to
hit every difference between Python's, msgspec's and ECMAScript's JSON: astral and control characters,
keys ordered by UTF-16 code units, large, small and negative numbers, decimals with trailing zeros and
exponents, deep nesting. A few thousand run by default; ``GATEWAY_FUZZ_LONG=1`` runs 30,000 and more.

A signature made by :class:`~gateway.signing.issuing.Signer` (header made once per key, signed text
spliced from the Bundle's own text) is compared with one made the reference way (rfc8785 bytes, the
header written out, the signed Bundle serialised whole) on every Bundle the pipeline builds from the
test and demo inputs: the same text apart from the signature value, which must verify, the same
header, the same document digest.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import rfc8785
import simplejson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway import jsonutil
from gateway.config import load_settings
from gateway.errors import ParseError
from gateway.pipeline import Pipeline
from gateway.signing.canonical import (
    DOCUMENT_EXCLUDED,
    _msgspec_canonical,
    _to_jcs_values,
    canonicalize,
    document_bytes,
    parse_json,
    parse_received,
)
from gateway.signing.issuing import MemberIdentity, Signer
from gateway.signing.jws import format_instant, sign_detached, signer_reference
from gateway.signing.keys import generate_private_key, issue_certificate, kid_of, make_authority

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
DEMO = ROOT / "gateway" / "demo" / "data"
LONG = os.environ.get("GATEWAY_FUZZ_LONG") == "1"
ROUNDS = 15 if LONG else 1  # 15 x 2,000 = 30,000 documents in the long run, 2,000 by default
PER_SEED = 2_000


# --- the reference -------------------------------------------------------------------------------------------


def reference(doc: Any) -> bytes | tuple[str, str]:
    """rfc8785's bytes for ``doc`` (numbers as the doubles they denote), or the refusal canonicalize must give."""
    try:
        return rfc8785.dumps(_to_jcs_values(doc, "$"))
    except ParseError as exc:
        return ("ParseError", str(exc))
    except (rfc8785.CanonicalizationError, UnicodeEncodeError, RecursionError):
        return ("ParseError", "")


def outcome(doc: Any) -> bytes | tuple[str, str]:
    try:
        return canonicalize(doc)
    except ParseError as exc:
        return ("ParseError", str(exc))


def same(got: bytes | tuple[str, str], want: bytes | tuple[str, str]) -> bool:
    if isinstance(want, tuple) and want[1] == "":  # a refusal found by rfc8785 itself: any ParseError text
        return isinstance(got, tuple)
    return got == want


# --- fuzzed documents ----------------------------------------------------------------------------------------

_ASCII = [chr(c) for c in range(0x20, 0x7f)]
_CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f", "\x80", "\x9f"]
_BMP = ["é", "ß", "检", "验", "报", "告", "\u2028", "\u2029", "\ufeff", "\ud7ff", "\ue000", "\uf8ff", "\uff01",
        "\ufffd", "\uffff", "\u0300"]
_ASTRAL = ["😀", "𠮷", "\U00010000", "\U0001f9ea", "\U000e0001", "\U0010ffff"]
_DECIMALS = ["4.50", "4.5", "0.10", "-0", "-0.0", "0E-7", "1E+2", "1E2", "1.50E+3", "1E-7", "1e-6", "0.000001",
             "0.00001", "0.0001", "1E21", "1E+20", "-2.5E-3", "120.000", "9007199254740991", "9007199254740992",
             "-9007199254740993", "123456789012345678901234567890", "0.1234567890123456789", "1E+400", "1E-400",
             "99999999999999.99", "1000000000000000.5"]


def _text(rng: random.Random, *, key: bool = False, tame: bool = False, bmp: bool = False) -> str:
    pools = (_ASCII, _ASCII, _CONTROLS, _BMP) if bmp or (tame and key) else (_ASCII, _ASCII, _CONTROLS, _BMP, _ASTRAL)
    size = rng.choice((0, 1, 2, 3, 5, 8)) if key else rng.choice((0, 1, 4, 9, 20))
    text = "".join(rng.choice(rng.choice(pools)) for _ in range(size))
    if key and rng.random() < 0.3:
        text = rng.choice(["resourceType", "id", "value", "valueQuantity", "code", "系统"]) + text
    return text


def _number(rng: random.Random, tame: bool = False) -> Any:
    kind = rng.choice((0, 1, 3, 3, 10)) if tame else rng.randrange(11)
    if kind == 0:
        return rng.randint(-1000, 1000)
    if kind == 1:
        return rng.randint(-2 ** 53 + 1, 2 ** 53 - 1)
    if kind == 2:
        return rng.choice([2 ** 53, -(2 ** 53), 2 ** 64 + 1, -(10 ** 20), 10 ** 30]) + rng.randint(0, 3)
    if kind == 3:
        return Decimal(f"{rng.randint(-99999, 99999)}.{rng.randint(0, 999):0{rng.randint(1, 3)}d}")
    if kind == 4:
        return Decimal(rng.choice(_DECIMALS))
    if kind == 5:
        return Decimal(f"{rng.randint(-10 ** 9, 10 ** 9)}E{rng.randint(-12, 25)}")
    if kind == 6:
        return round(rng.uniform(-1e6, 1e6), rng.randint(0, 6))
    if kind == 7:
        return float(rng.randint(-2 ** 60, 2 ** 60)) / rng.choice([1, 2, 1024])
    if kind == 8:
        return rng.random() * 10 ** rng.randint(-30, 30) * rng.choice([1, -1])
    if kind == 9:
        return rng.choice([0.1 + 0.2, 1e21, 1e20, 1e-6, 1e-7, 5e-324, 1.7976931348623157e308, -0.0, 0.0, 4.5, 1e16])
    return Decimal(rng.randint(-10 ** 6, 10 ** 6)).scaleb(rng.randint(-8, 3))


def _value(rng: random.Random, depth: int, deep: bool, tame: bool, bmp: bool) -> Any:
    if deep and depth < 60 and rng.random() < 0.8:  # a thin chain, so that nesting goes deep
        child = _value(rng, depth + 1, deep, tame, bmp)
        return [child] if rng.random() < 0.5 else {_text(rng, key=True, tame=tame, bmp=bmp): child}
    roll = rng.randrange(12 if depth < 5 else 7)
    if roll < 3:
        return _text(rng, bmp=bmp)
    if roll < 6:
        return _number(rng, tame)
    if roll == 6:
        return rng.choice([True, False, None])
    if roll < 10:
        return {_text(rng, key=True, tame=tame, bmp=bmp): _value(rng, depth + 1, deep, tame, bmp)
                for _ in range(rng.randint(0, 6))}
    return [_value(rng, depth + 1, deep, tame, bmp) for _ in range(rng.randint(0, 5))]


def _keys_by_utf16(rng: random.Random) -> dict[str, Any]:
    """Keys whose code point order differs from their UTF-16 order (astral against U+E000..U+FFFF)."""
    keys = {rng.choice(_ASTRAL) + _text(rng, key=True) for _ in range(2)}
    keys |= {rng.choice(["\ue000", "\uffff", "\uff01", "z"]) + _text(rng, key=True) for _ in range(2)}
    return {key: _number(rng) for key in keys}


def _document(rng: random.Random, n: int) -> Any:
    if n % 25 == 0:
        return _keys_by_utf16(rng)
    deep = n % 40 == 1
    tame = n % 2 == 0  # half keep to what a report Bundle holds (keys in the BMP, no floats), the rest to anything
    bmp = n % 4 == 0  # and a quarter keep their text in the BMP too
    return {_text(rng, key=True, tame=tame, bmp=bmp): _value(rng, 0, deep, tame, bmp) for _ in range(rng.randint(1, 6))}


def _is_plain(value: Any) -> bool:
    """No Decimal and no integer beyond 2**53: a document rfc8785.dumps takes as it is."""
    if isinstance(value, dict):
        return all(_is_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= 2 ** 53 - 1
    return not isinstance(value, Decimal)


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_fuzzed_documents_canonicalise_exactly_as_rfc8785_does(seed: int) -> None:
    rng = random.Random(8785_000 + seed)
    fast = plain = received_plain = 0
    for n in range(PER_SEED):
        doc = _document(rng, n)
        want = reference(doc)
        got = outcome(doc)
        assert same(got, want), f"document {n} of seed {seed}: {doc!r}"
        quick = _msgspec_canonical(doc)
        assert quick is None or quick == want, f"document {n} of seed {seed}: {doc!r}"
        fast += quick is not None
        if isinstance(want, bytes) and _is_plain(doc):
            assert got == rfc8785.dumps(doc)
            plain += 1
        if isinstance(want, bytes):
            # a receiver canonicalises the parsed text: the same bytes, whatever spelling the numbers have, and
            # parse_received's plain documents skip the walk for the same bytes
            text = jsonutil.dumps(doc) if n % 3 else simplejson.dumps(doc, use_decimal=True)  # or escaped as ASCII
            assert canonicalize(parse_json(text)) == want
            received, is_plain = parse_received(text.encode("utf-8"))
            assert received == parse_json(text)
            document = reference({k: v for k, v in doc.items() if k not in DOCUMENT_EXCLUDED})
            assert document_bytes(received, plain=is_plain) == document, f"document {n} of seed {seed}: {text}"
            received_plain += is_plain
    assert received_plain >= PER_SEED // 10
    assert fast >= PER_SEED // 4, f"the msgspec path took only {fast} of {PER_SEED} documents"
    assert plain >= PER_SEED // 10


@pytest.mark.parametrize("doc", [
    {"v": [Decimal("4.50"), Decimal("1.50E+3"), Decimal("-0.000"), Decimal("120.000"), Decimal("1E+2")]},
    {"s": "".join(_CONTROLS) + '"\\/', "t": "检验 😀 \U0010ffff \u2028"},
    {"😀": 1, "\ue000": 2, "\uffff": 3, "a": 4},
    {"v": [1e-7, 1e21, 5.0, -0.0, 2 ** 53, Decimal("1E-7"), Decimal("9007199254740993")]},
])
def test_edge_documents_equal_the_reference(doc: Any) -> None:
    assert outcome(doc) == reference(doc)


# --- the sign path -------------------------------------------------------------------------------------------

WHEN = dt.datetime(2025, 6, 1, 8, 30, 15, 250000, tzinfo=dt.timezone(dt.timedelta(hours=8)))
ISSUER = "12511921MB0001003C"
SAMPLE_FORMATS = {"hl7v2": "hl7v2", "cda": "cda", "csv": "cdc-csv"}
CSV_MEMBERS = {"cdc": "12510000MB00030095", "hospital": "12500102MB0002006J"}


@pytest.fixture(scope="module")
def identity() -> MemberIdentity:
    start = WHEN - dt.timedelta(days=1)
    authority_key = generate_private_key()
    authority = make_authority(authority_key, "11500000MB00050043", "TEST registry authority", start,
                               start + dt.timedelta(days=365))
    key = generate_private_key()
    cert = issue_certificate(key.public_key(), ISSUER, "通江县人民医院 TEST", authority_key, authority, start,
                             start + dt.timedelta(days=90))
    return MemberIdentity(ISSUER, key, (cert, authority))


@pytest.fixture(scope="module")
def built_bundles(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every Bundle the pipeline builds from the test and demo inputs, plus the received demo Bundles."""
    inputs = [(p, SAMPLE_FORMATS[p.parent.name]) for p in sorted(
        [*(DATA / "hl7v2").glob("*.hl7"), *(DATA / "cda").glob("*.xml"), *(DATA / "csv").glob("*.csv")])]
    inputs += [(p, "hl7v2") for p in sorted((DEMO / "hl7v2").glob("*.hl7"))]
    inputs += [(p, "cdc-csv") for p in sorted((DEMO / "csv").glob("*.csv"))]
    bundles: list[dict[str, Any]] = []
    pipelines: dict[str, Pipeline] = {}
    for path, fmt in inputs:
        uscc = CSV_MEMBERS.get(path.stem.split("-")[0], ISSUER) if fmt == "cdc-csv" else ISSUER
        if uscc not in pipelines:
            pipelines[uscc] = Pipeline(load_settings(environ={}, overrides={
                "data_dir": str(tmp_path_factory.mktemp("gw")), "issuer_uscc": uscc, "issuer_name": "TEST"}))
        bundles += [o.bundle for o in pipelines[uscc].convert(path.read_bytes(), fmt, path.name)
                    if o.bundle is not None]
    for pipeline in pipelines.values():
        pipeline.close()
    for path in sorted((DEMO / "fhir").glob("*.json")):  # received Bundles, as a receiver parses them
        bundles.append(parse_json(path.read_bytes()))
    return bundles


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def reference_header(identity: MemberIdentity, when: dt.datetime) -> bytes:
    return rfc8785.dumps({
        "alg": "ES256",
        "kid": kid_of(identity.chain[0]),
        "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in identity.chain],
        "sigT": format_instant(when),
        "srCms": [{"commId": {"id": "urn:oid:1.2.840.10065.1.12.1.5", "desc": "Verification Signature"}}],
    })


PLACEHOLDER = "SIGNATURE-VALUE"


def reference_signed(bundle: dict[str, Any], identity: MemberIdentity, when: dt.datetime) -> tuple[bytes, bytes]:
    """(signed text with the signature value replaced by PLACEHOLDER, document bytes), the reference way."""
    document = rfc8785.dumps(_to_jcs_values({k: v for k, v in bundle.items() if k not in DOCUMENT_EXCLUDED}, "$"))
    signed = {k: v for k, v in bundle.items() if k != "signature"}
    signed["signature"] = {
        "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                  "display": "Verification Signature"}],
        "when": format_instant(when),
        "who": signer_reference(identity.chain[0]),
        "targetFormat": "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#document",
        "sigFormat": "application/jose",
        "data": PLACEHOLDER,
    }
    return jsonutil.dumps(signed).encode("utf-8"), document


def check_jws(jws: str, header: bytes, payload: bytes, identity: MemberIdentity) -> None:
    """The JWS carries ``header`` and verifies over ``payload`` with the member's certificate."""
    header_b64, empty, signature = jws.split(".")
    assert empty == ""
    assert _unb64url(header_b64) == header
    raw = _unb64url(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public_key = identity.chain[0].public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    try:
        public_key.verify(der, f"{header_b64}.{_b64url(payload)}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        pytest.fail("the signature does not verify")


def test_the_fast_sign_path_equals_the_reference_on_every_built_bundle(
        built_bundles: list[dict[str, Any]], identity: MemberIdentity) -> None:
    assert len(built_bundles) >= 40
    signer = Signer(identity, lambda: WHEN)
    header = reference_header(identity, WHEN)
    for n, bundle in enumerate(built_bundles):
        want_text, document = reference_signed(bundle, identity, WHEN)
        assert document_bytes(bundle) == document, f"Bundle {n}"
        text, digest = signer.sign_with_digest(bundle)
        assert digest == hashlib.sha256(document).hexdigest(), f"Bundle {n}"
        data = json.loads(text)["signature"]["data"]
        marker = f'"data":"{data}"'.encode("ascii")
        assert text.count(marker) == 1
        assert text.replace(marker, f'"data":"{PLACEHOLDER}"'.encode("ascii")) == want_text, f"Bundle {n}"
        check_jws(base64.b64decode(data).decode("ascii"), header, document, identity)


def test_a_bundle_signed_again_drops_its_old_signature(
        built_bundles: list[dict[str, Any]], identity: MemberIdentity) -> None:
    signer = Signer(identity, lambda: WHEN)
    first = parse_json(signer.sign(built_bundles[0]))
    first["meta"] = {"versionId": "2"}  # a member after the signature, so that the old one sits mid-object
    text, _ = signer.sign_with_digest(first)
    want_text, document = reference_signed(first, identity, WHEN)
    data = json.loads(text)["signature"]["data"]
    assert text.replace(f'"data":"{data}"'.encode("ascii"), f'"data":"{PLACEHOLDER}"'.encode("ascii")) == want_text
    check_jws(base64.b64decode(data).decode("ascii"), reference_header(identity, WHEN), document, identity)


def test_receipts_and_extra_headers_equal_the_reference(identity: MemberIdentity) -> None:
    body = {"status": "accepted", "document": "ab" * 32, "n": 3, "value": Decimal("4.50"), "名": "检验"}
    receipt = json.loads(Signer(identity, lambda: WHEN).receipt(body))
    assert receipt["receipt"] == json.loads(jsonutil.dumps(body))
    check_jws(receipt["signature"], reference_header(identity, WHEN), rfc8785.dumps(_to_jcs_values(body, "$")),
              identity)
    # with members of its own, the header is written whole, still canonical
    jws = sign_detached(b"payload", identity.key, list(identity.chain), sig_time=WHEN, extra_header={"typ": "JWT"})
    header = json.loads(reference_header(identity, WHEN))
    header["typ"] = "JWT"
    check_jws(jws, rfc8785.dumps(header), b"payload", identity)


def test_headers_made_once_per_key_follow_the_key(identity: MemberIdentity) -> None:
    start = WHEN - dt.timedelta(days=1)
    authority_key = generate_private_key()
    authority = make_authority(authority_key, "11500000MB00050043", "TEST registry authority", start,
                               start + dt.timedelta(days=365))
    other_key = generate_private_key()
    other_cert = issue_certificate(other_key.public_key(), "12500102MB0002006J", "涪陵 TEST", authority_key,
                                   authority, start, start + dt.timedelta(days=30))
    other = MemberIdentity("12500102MB0002006J", other_key, (other_cert,))
    for _ in range(2):  # alternating keys: each signature carries its own key's header
        for member in (identity, other):
            jws = sign_detached(b"{}", member.key, list(member.chain), sig_time=WHEN)
            check_jws(jws, reference_header(member, WHEN), b"{}", member)
