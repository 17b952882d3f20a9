"""Signing tests: canonical JSON, keys, Bundle signatures and every way verification must fail.

The shipped vectors (tests/data/signing/, keys in tests/data/keys/TEST-*) must keep
verifying: a change here that breaks them would break every Bundle already signed.
Other certificates are made at run time; times are fixed, never read from a clock.
"""
from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import hmac
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

import gateway.signing as signing
from gateway.errors import (
    BadSignature,
    ConfigError,
    IdentifierError,
    InputError,
    ParseError,
    TrustError,
    UnknownIssuer,
)
from gateway.naming import SYSTEM_USCC
from gateway.signing import (
    StaticTrust,
    TrustSource,
    canonicalize,
    check_signer_is_issuer,
    document_bytes,
    dumps,
    generate_private_key,
    issue_certificate,
    kid_of,
    load_certificate,
    load_certificates,
    load_private_key,
    make_authority,
    make_csr,
    parse_json,
    private_key_pem,
    sign_bundle,
    sign_detached,
    signer_reference,
    unverified_header,
    uscc_of,
    verify_bundle,
    verify_detached,
)
from gateway.signing.jws import SIG_FORMAT, SIGNATURE_TYPE_SYSTEM, TARGET_FORMAT, VERIFICATION_SIGNATURE

DATA = Path(__file__).parent / "data" / "signing"
KEYS = Path(__file__).parent / "data" / "keys"
CST = dt.timezone(dt.timedelta(hours=8))
SIG_TIME = dt.datetime(2025, 6, 1, 10, 30, tzinfo=CST)  # sigT of the shipped signed Bundle
AT = dt.datetime(2025, 6, 2, 8, 0, tzinfo=CST)  # the verifier's "now" in these tests
SICHUAN = "12510121MB00000193"  # issuer of report-bundle.json
CHONGQING = "12500000MB00000277"
AUTHORITY = "11510000MB00000434"
BAD_SIGNATURE = "Bundle.signature: signature verification failed"


# ---------------------------------------------------------------- fixtures


class Pki:
    """The shipped authority and Sichuan member, plus a Chongqing member made at run time."""

    def __init__(self) -> None:
        self.authority_key = load_private_key(KEYS / "TEST-authority.key.pem")
        self.authority = load_certificate(DATA / "authority.cert.pem")
        self.key = load_private_key(KEYS / "TEST-member-sichuan.key.pem")
        self.cert = load_certificate(DATA / "member-sichuan.cert.pem")
        self.cq_key = generate_private_key()
        self.cq_cert = self.issue(self.cq_key, CHONGQING, "测试市第一医院（测试数据）")

    def issue(
        self,
        key: ec.EllipticCurvePrivateKey,
        uscc: str,
        name: str,
        start: dt.datetime = dt.datetime(2025, 1, 1, tzinfo=CST),
        end: dt.datetime = dt.datetime(2027, 1, 1, tzinfo=CST),
    ) -> x509.Certificate:
        return issue_certificate(make_csr(key, uscc, name), uscc, name, self.authority_key, self.authority, start, end)

    def trust(self, *members: x509.Certificate) -> StaticTrust:
        trust = StaticTrust([self.authority])
        for cert in members or (self.cert, self.cq_cert):
            trust.add_member(cert)
        return trust


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture()
def bundle() -> dict[str, Any]:
    value = parse_json((DATA / "report-bundle.json").read_bytes())
    assert isinstance(value, dict)
    return value


def signed_text(pki: Pki, bundle: dict[str, Any], *, indent: int | None = 2) -> str:
    signed = sign_bundle(bundle, pki.key, [pki.cert], who=signer_reference(pki.cert), when=SIG_TIME)
    return dumps(signed, indent=indent)


def forge(
    bundle: dict[str, Any],
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    when: dt.datetime,
    *,
    header: dict[str, Any] | None = None,
) -> str:
    """A signed Bundle made without sign_bundle's own checks (expired certificates, odd headers)."""
    payload = document_bytes(bundle)
    if header is None:
        jws = sign_detached(payload, key, [cert], sig_time=when)
    else:
        jws = raw_es256(header, payload, key)
    out = dict(bundle)
    out["signature"] = {
        "type": [{"system": SIGNATURE_TYPE_SYSTEM, "code": VERIFICATION_SIGNATURE}],
        "when": when.isoformat(),
        "who": {"identifier": {"system": SYSTEM_USCC, "value": uscc_of(cert)}},
        "targetFormat": TARGET_FORMAT,
        "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(jws.encode()).decode(),
    }
    return dumps(out)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_es256(header: dict[str, Any], payload: bytes, key: ec.EllipticCurvePrivateKey) -> str:
    """A detached JWS with an arbitrary protected header, signed with ES256 by hand."""
    h = b64u(json.dumps(header).encode())
    r, s = decode_dss_signature(key.sign(f"{h}.{b64u(payload)}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{h}..{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def with_jws(text: str, jws: str) -> str:
    doc = json.loads(text)
    doc["signature"]["data"] = base64.b64encode(jws.encode()).decode()
    return json.dumps(doc, ensure_ascii=False)


def jws_of(text: str) -> str:
    return base64.b64decode(json.loads(text)["signature"]["data"]).decode()


# ---------------------------------------------------------------- canonical JSON


def test_document_bytes_match_the_shipped_vector(bundle: dict[str, Any]) -> None:
    assert document_bytes(bundle) == (DATA / "report-bundle.document.jcs").read_bytes()


def test_received_numbers_canonicalise_as_a_javascript_verifier_would() -> None:
    text = '{"f":9007199254740993,"e":-0.0,"d":12345678901234567890,"c":2e-3,"b":1E30,"a":4.50,"g":1e-400}'
    assert canonicalize(parse_json(text)) == (
        b'{"a":4.5,"b":1e+30,"c":0.002,"d":12345678901234567000,"e":0,"f":9007199254740992,"g":0}'
    )


def test_parse_json_keeps_decimals_and_dumps_writes_them_back() -> None:
    value = parse_json('{"value": 4.50, "n": 140, "big": 12345678901234567890}')
    assert value == {"value": Decimal("4.50"), "n": 140, "big": 12345678901234567890}
    assert dumps(value) == '{"value":4.50,"n":140,"big":12345678901234567890}'
    assert canonicalize(parse_json(dumps(value, indent=2))) == canonicalize(value)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2}',
        '{"entry": [{"resource": {"id": "x", "id": "y"}}]}',
        '{"a": NaN}',
        '{"a": -Infinity}',
        '{"a": "\\ud800"}',
        '{"a": 1,}',
        "",
        '{"a": 1E+99999999999999999999}',  # an exponent too large for a Decimal (was decimal.InvalidOperation)
        '[0.5e-99999999999999999999]',
    ],
)
def test_parse_json_refuses_what_parsers_disagree_on(text: str) -> None:
    with pytest.raises(ParseError):
        parse_json(text)


def test_parse_json_refuses_bytes_that_are_not_utf8_and_says_where_json_breaks() -> None:
    with pytest.raises(ParseError):
        parse_json(b'{"a": "\xff"}')
    with pytest.raises(ParseError) as err:
        parse_json('{\n  "a": tru\n}')
    assert err.value.location == "line 2, column 8"


def test_paired_surrogate_escapes_are_fine() -> None:
    assert canonicalize(parse_json('{"s": "\\ud83d\\ude02"}')) == '{"s":"😂"}'.encode()


@pytest.mark.parametrize("value", [{1: "a"}, {"a": float("nan")}, {"a": Decimal("Infinity")}, {"a": object()}])
def test_canonicalize_refuses_non_json(value: Any) -> None:
    with pytest.raises(ParseError):
        canonicalize(value)


def test_document_bytes_leave_out_only_root_signature_id_and_meta(bundle: dict[str, Any]) -> None:
    base = document_bytes(bundle)
    changed = dict(bundle, id="another", meta={"versionId": "9"}, signature={"data": "x"})
    assert document_bytes(changed) == base
    nested = copy.deepcopy(bundle)
    nested["entry"][0]["resource"]["meta"] = {"versionId": "2"}
    assert document_bytes(nested) != base
    with pytest.raises(ParseError):
        document_bytes(["not", "a", "bundle"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- keys and certificates


def test_kid_is_base64url_of_the_first_8_bytes_of_the_certificate_hash(pki: Pki) -> None:
    der = pki.cert.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()[:8]).rstrip(b"=").decode()
    assert kid_of(pki.cert) == expected
    assert len(expected) == 11 and "=" not in expected


def test_member_certificate_names_its_member_and_is_for_signing_only(pki: Pki) -> None:
    cert = pki.cert
    assert uscc_of(cert) == SICHUAN
    assert cert.issuer == pki.authority.subject
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not usage.value.content_commitment and not usage.value.crl_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.authority.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.verify_directly_issued_by(pki.authority)


def test_authority_certificate_is_a_self_signed_ca_with_path_length_0(pki: Pki) -> None:
    ca = pki.authority
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert uscc_of(ca) == AUTHORITY
    ca.verify_directly_issued_by(ca)


def test_uscc_of_reads_etsi_spelling_and_ignores_absent_or_invalid() -> None:
    key = generate_private_key()

    def cert_with(*attrs: x509.NameAttribute[str]) -> x509.Certificate:
        name = x509.Name(list(attrs))
        start = dt.datetime(2025, 1, 1, tzinfo=CST)
        return (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )

    assert uscc_of(cert_with(x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, f"NTRCN-{SICHUAN}"))) == SICHUAN
    assert uscc_of(cert_with(x509.NameAttribute(NameOID.COMMON_NAME, "x"))) is None
    assert uscc_of(cert_with(x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, "12510121MB00000190"))) is None


def test_make_csr_checks_the_uscc() -> None:
    with pytest.raises(IdentifierError):
        make_csr(generate_private_key(), "12510121MB00000190", "测试医院")
    csr = make_csr(generate_private_key(), SICHUAN.lower(), "测试医院")
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_IDENTIFIER)[0].value == SICHUAN


def test_issue_certificate_refuses_bad_requests(pki: Pki) -> None:
    key = generate_private_key()
    start, end = dt.datetime(2025, 1, 1, tzinfo=CST), dt.datetime(2026, 1, 1, tzinfo=CST)
    csr = make_csr(key, SICHUAN, "Test Hospital")
    der = csr.public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"Test Hospital", b"Evil Hospital", 1))
    with pytest.raises(InputError, match="signature"):
        issue_certificate(tampered, SICHUAN, "x", pki.authority_key, pki.authority, start, end)
    with pytest.raises(InputError, match="is for"):
        issue_certificate(csr, CHONGQING, "x", pki.authority_key, pki.authority, start, end)
    with pytest.raises(InputError, match="within the authority"):
        too_late = dt.datetime(2036, 1, 1, tzinfo=CST)
        issue_certificate(csr, SICHUAN, "x", pki.authority_key, pki.authority, start, too_late)
    with pytest.raises(InputError, match="UTC offset"):
        issue_certificate(csr, SICHUAN, "x", pki.authority_key, pki.authority, dt.datetime(2025, 1, 1), end)
    with pytest.raises(InputError, match="earlier"):
        issue_certificate(csr, SICHUAN, "x", pki.authority_key, pki.authority, end, start)
    with pytest.raises(ConfigError, match="does not belong"):
        issue_certificate(csr, SICHUAN, "x", key, pki.authority, start, end)
    with pytest.raises(ConfigError, match="not a CA"):
        issue_certificate(csr, SICHUAN, "x", pki.key, pki.cert, start, end)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(InputError, match="P-256"):
        issue_certificate(p384.public_key(), SICHUAN, "x", pki.authority_key, pki.authority, start, end)
    # A bare public key works too, and the authority decides the subject.
    cert = issue_certificate(key.public_key(), SICHUAN, "测试医院", pki.authority_key, pki.authority, start, end)
    assert uscc_of(cert) == SICHUAN


def test_private_key_pem_round_trips_with_and_without_password(tmp_path: Path) -> None:
    key = generate_private_key()
    plain = private_key_pem(key)
    assert load_private_key(plain).private_numbers() == key.private_numbers()
    locked = private_key_pem(key, b"s3cret")
    assert b"ENCRYPTED" in locked
    path = tmp_path / "k.pem"
    path.write_bytes(locked)
    assert load_private_key(path, b"s3cret").private_numbers() == key.private_numbers()
    for password in (b"wrong", None):
        with pytest.raises(ConfigError):
            load_private_key(path, password)
    with pytest.raises(ConfigError):
        load_private_key(plain, b"not needed")
    with pytest.raises(ConfigError):
        private_key_pem(key, b"")


def test_load_private_key_refuses_other_curves_and_garbage(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="P-256"):
        load_private_key(p384)
    with pytest.raises(ConfigError):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as err:
        load_private_key(tmp_path / "missing.pem")
    assert err.value.location.endswith("missing.pem")


def test_certificates_load_from_pem_der_path_and_text(pki: Pki, tmp_path: Path) -> None:
    der = pki.cert.public_bytes(serialization.Encoding.DER)
    pem = signing.cert_pem(pki.cert)
    assert load_certificate(der) == pki.cert
    assert load_certificate(pem.decode()) == pki.cert
    assert load_certificate(str(DATA / "member-sichuan.cert.pem")) == pki.cert
    both = tmp_path / "both.pem"
    both.write_bytes(pem + signing.cert_pem(pki.authority))
    assert load_certificates(both) == [pki.cert, pki.authority]
    with pytest.raises(ConfigError):
        load_certificate(b"not a certificate")


# ---------------------------------------------------------------- signing and verifying


def test_round_trip(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    verified = verify_bundle(text, pki.trust(), at=AT)
    assert verified.signer_uscc == SICHUAN
    assert verified.kid == kid_of(pki.cert)
    assert verified.certificate == pki.cert
    assert verified.signed_at == SIG_TIME
    assert verified.document_sha256 == hashlib.sha256(document_bytes(bundle)).hexdigest()
    assert verified.bundle["entry"][3]["resource"]["valueQuantity"]["value"] == Decimal("4.50")
    assert check_signer_is_issuer(verified) == SICHUAN
    header = verified.header
    assert header["alg"] == "ES256" and header["kid"] == kid_of(pki.cert)
    assert header["sigT"] == "2025-06-01T10:30:00+08:00"
    assert header["x5c"] == [base64.b64encode(pki.cert.public_bytes(serialization.Encoding.DER)).decode()]
    assert header["srCms"][0]["commId"]["id"] == "urn:oid:1.2.840.10065.1.12.1.5"
    assert "b64" not in header and "crit" not in header


def test_signature_element_is_the_r4_shape(pki: Pki, bundle: dict[str, Any]) -> None:
    signed = sign_bundle(bundle, pki.key, [pki.cert], who=signer_reference(pki.cert), when=SIG_TIME)
    sig = signed["signature"]
    assert sig["type"] == [
        {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5", "display": "Verification Signature"}
    ]
    assert sig["when"] == "2025-06-01T10:30:00+08:00"
    assert sig["who"]["identifier"] == {"system": SYSTEM_USCC, "value": SICHUAN}
    assert sig["targetFormat"] == (
        "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#document"
    )
    assert sig["sigFormat"] == "application/jose"
    header_b64, payload_b64, sig_b64 = base64.b64decode(sig["data"]).decode().split(".")
    assert payload_b64 == "" and len(base64.urlsafe_b64decode(sig_b64 + "==")) == 64
    assert "signature" not in bundle  # the input is left alone


def test_signed_bundle_is_valid_r4_for_an_independent_model(pki: Pki, bundle: dict[str, Any]) -> None:
    from fhir.resources.R4B.bundle import Bundle

    model = Bundle.model_validate_json(signed_text(pki, bundle))
    assert model.signature is not None and model.signature.sigFormat == "application/jose"


def test_shipped_signed_bundle_keeps_verifying(pki: Pki) -> None:
    text = (DATA / "report-bundle.signed.json").read_bytes()
    for at in (AT, None, dt.datetime(2040, 1, 1, tzinfo=CST)):
        verified = verify_bundle(text, pki.trust(pki.cert), at=at)
        assert verified.signer_uscc == SICHUAN and verified.signed_at == SIG_TIME
    assert check_signer_is_issuer(verified) == SICHUAN


def test_signing_reproduces_the_shipped_jws_and_bundle(pki: Pki, bundle: dict[str, Any]) -> None:
    payload = (DATA / "report-bundle.document.jcs").read_bytes()
    expected_jws = (DATA / "report-bundle.jws").read_text().strip()
    jws = sign_detached(payload, pki.key, [pki.cert], sig_time=SIG_TIME)
    assert verify_detached(expected_jws, payload, lambda kid: [pki.cert])[1] == pki.cert
    if jws != expected_jws:  # only when the backend cannot sign deterministically (RFC 6979)
        pytest.skip("ECDSA backend signs with random nonces; vector checked by verification only")
    assert jws == expected_jws
    assert signed_text(pki, bundle) + "\n" == (DATA / "report-bundle.signed.json").read_text(encoding="utf-8")


def test_re_signing_replaces_the_signature(pki: Pki, bundle: dict[str, Any]) -> None:
    first = sign_bundle(bundle, pki.cq_key, [pki.cq_cert], who=signer_reference(pki.cq_cert), when=SIG_TIME)
    again = sign_bundle(first, pki.key, [pki.cert], who=signer_reference(pki.cert), when=SIG_TIME)
    verified = verify_bundle(dumps(again), pki.trust(), at=AT)
    assert verified.signer_uscc == SICHUAN


def test_layout_key_order_and_number_spelling_do_not_matter(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)

    def reverse(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: reverse(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reverse(v) for v in value]
        return value

    doc = json.loads(text)  # plain floats: 4.5 instead of 4.50
    variants = [
        json.dumps(doc, separators=(",", ":"), ensure_ascii=True),
        json.dumps(reverse(doc), indent=7, ensure_ascii=False),
        text.replace('"value": 140', '"value": 1.40e2').replace('"value": 4.50', '"value": 45E-1'),
        "\n\t " + text + "\r\n",
    ]
    for variant in variants:
        assert verify_bundle(variant.encode("utf-8"), pki.trust(), at=AT).signer_uscc == SICHUAN


def test_decimal_precision_is_not_protected_by_jcs(pki: Pki, bundle: dict[str, Any]) -> None:
    # RFC 8785 numbers are IEEE doubles: 4.50 and 4.5 sign alike (ANCHORS §2.1). Known, accepted limit.
    text = signed_text(pki, bundle).replace('"value": 4.50', '"value": 4.5')
    assert verify_bundle(text, pki.trust(), at=AT).signer_uscc == SICHUAN


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.replace('"value": 4.50', '"value": 4.60'),  # a result value
        lambda t: t.replace('"value": 140', '"value": 141'),
        lambda t: t.replace("测试患者甲", "测试患者乙"),  # the patient's name, one character
        lambda t: t.replace('"gender": "female"', '"gender": "male"'),
        lambda t: t.replace('"status": "final"', '"status": "preliminary"', 1),
        lambda t: t.replace('"active": true', '"active": false'),
        lambda t: t.replace('"text": "137-147 mmol/L"', '"text": "137-147 mmol/L", "extra": 1'),  # an added member
    ],
)
def test_one_change_of_meaning_breaks_the_signature(pki: Pki, bundle: dict[str, Any], change: Any) -> None:
    text = signed_text(pki, bundle)
    tampered = change(text)
    assert tampered != text
    with pytest.raises(BadSignature) as err:
        verify_bundle(tampered, pki.trust(), at=AT)
    assert str(err.value) == BAD_SIGNATURE


def test_added_or_removed_entries_break_the_signature(pki: Pki, bundle: dict[str, Any]) -> None:
    doc = json.loads(signed_text(pki, bundle))
    added = copy.deepcopy(doc)
    added["entry"].append(copy.deepcopy(added["entry"][3]))
    removed = copy.deepcopy(doc)
    del removed["entry"][4]
    for variant in (added, removed):
        with pytest.raises(BadSignature):
            verify_bundle(json.dumps(variant), pki.trust(), at=AT)


def test_root_id_and_meta_are_outside_the_signature(pki: Pki, bundle: dict[str, Any]) -> None:
    # FHIR #document canonicalization: a receiver may assign its own id and meta.
    doc = json.loads(signed_text(pki, bundle))
    doc["id"] = "stored-here"
    doc["meta"] = {"versionId": "3", "lastUpdated": "2025-06-02T08:00:00+08:00"}
    assert verify_bundle(json.dumps(doc), pki.trust(), at=AT).signer_uscc == SICHUAN


def test_duplicate_keys_in_the_bundle_are_refused(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    duplicated = text.replace('"gender": "female"', '"gender": "female", "gender": "male"')
    with pytest.raises(ParseError, match="duplicate"):
        verify_bundle(duplicated, pki.trust(), at=AT)


def test_duplicate_keys_in_the_jws_header_are_refused(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    header = json.dumps({"alg": "ES256", "kid": kid_of(pki.cert)})[:-1] + ', "alg": "none"}'
    payload = document_bytes(bundle)
    h = b64u(header.encode())
    r, s = decode_dss_signature(pki.key.sign(f"{h}.{b64u(payload)}".encode(), ec.ECDSA(hashes.SHA256())))
    jws = f"{h}..{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    with pytest.raises(BadSignature):
        verify_bundle(with_jws(text, jws), pki.trust(), at=AT)


def test_wrong_kid_fails(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    payload = document_bytes(bundle)
    for kid in (kid_of(pki.cq_cert), "AAAAAAAAAAA"):  # another member's kid; a kid nobody has
        jws = raw_es256({"alg": "ES256", "kid": kid, "sigT": SIG_TIME.isoformat()}, payload, pki.key)
        with pytest.raises(BadSignature) as err:
            verify_bundle(with_jws(text, jws), pki.trust(), at=AT)
        assert str(err.value) == BAD_SIGNATURE


def test_every_candidate_with_the_kid_is_tried(pki: Pki) -> None:
    payload = b'{"resourceType":"Bundle"}'
    jws = sign_detached(payload, pki.key, [pki.cert], sig_time=SIG_TIME)
    asked: list[str] = []

    def candidates(kid: str) -> list[x509.Certificate]:
        asked.append(kid)
        return [pki.cq_cert, pki.authority, pki.cert]  # e.g. a kid collision: the right one comes last

    header, cert = verify_detached(jws, payload, candidates)
    assert cert == pki.cert and asked == [kid_of(pki.cert)] and header["kid"] == asked[0]
    with pytest.raises(BadSignature):
        verify_detached(jws, payload, lambda kid: [pki.cq_cert])
    with pytest.raises(BadSignature):
        verify_detached(jws, payload, lambda kid: [])


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256", "ES384", "es256", None])
def test_only_es256_is_accepted(pki: Pki, bundle: dict[str, Any], alg: str | None) -> None:
    text = signed_text(pki, bundle)
    payload = document_bytes(bundle)
    header = {"alg": alg, "kid": kid_of(pki.cert), "sigT": SIG_TIME.isoformat()}
    h = b64u(json.dumps(header).encode())
    signing_input = f"{h}.{b64u(payload)}".encode()
    if alg == "HS256":  # the classic confusion: HMAC keyed with the public certificate
        sig = b64u(hmac.new(signing.cert_pem(pki.cert), signing_input, hashlib.sha256).digest())
    elif alg == "none":
        sig = ""
    else:
        r, s = decode_dss_signature(pki.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = b64u(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    with pytest.raises(BadSignature) as err:
        verify_bundle(with_jws(text, f"{h}..{sig}"), pki.trust(), at=AT)
    assert str(err.value) == BAD_SIGNATURE


@pytest.mark.parametrize("extra", [{"crit": ["sigT"]}, {"b64": False}, {"b64": True}])
def test_crit_and_b64_headers_are_refused(pki: Pki, bundle: dict[str, Any], extra: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    header = {"alg": "ES256", "kid": kid_of(pki.cert), "sigT": SIG_TIME.isoformat(), **extra}
    with pytest.raises(BadSignature):
        verify_bundle(with_jws(text, raw_es256(header, document_bytes(bundle), pki.key)), pki.trust(), at=AT)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda j: j[:-4],  # truncated signature
        lambda j: j[:-1],
        lambda j: j[:j.index(".") - 3] + j[j.index("."):],  # truncated header
        lambda j: j.split(".")[0] + "..",  # no signature
        lambda j: j.replace("..", ".e30."),  # an attached payload that is not the document
        lambda j: j + ".",
        lambda j: j.replace("..", "."),
        lambda j: j.split(".")[0],
        lambda j: j + "=",  # padding is not base64url
        lambda j: "",
    ],
)
def test_malformed_jws_fails_without_a_reason(pki: Pki, bundle: dict[str, Any], mangle: Any) -> None:
    text = signed_text(pki, bundle)
    with pytest.raises(BadSignature) as err:
        verify_bundle(with_jws(text, mangle(jws_of(text))), pki.trust(), at=AT)
    assert str(err.value) == BAD_SIGNATURE


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pop("data"),
        lambda s: s.update(data=s["data"][:-7]),  # truncated base64
        lambda s: s.update(data="not base64!"),
        lambda s: s.update(sigFormat="application/signature+xml"),
        lambda s: s.update(targetFormat=TARGET_FORMAT.replace("#document", "#static")),
        lambda s: s.clear(),
    ],
)
def test_broken_signature_element_fails(pki: Pki, bundle: dict[str, Any], change: Any) -> None:
    doc = json.loads(signed_text(pki, bundle))
    change(doc["signature"])
    with pytest.raises(BadSignature):
        verify_bundle(json.dumps(doc), pki.trust(), at=AT)


def test_unsigned_bundle_and_other_json_fail(pki: Pki, bundle: dict[str, Any]) -> None:
    for text in (json.dumps(bundle, default=str), '{"resourceType": "Patient"}', "[1, 2]"):
        with pytest.raises(BadSignature):
            verify_bundle(text, pki.trust(), at=AT)
    with pytest.raises(ParseError):
        verify_bundle(b"\x00not json", pki.trust(), at=AT)


def test_certificate_not_yet_valid_at_sigt(pki: Pki, bundle: dict[str, Any]) -> None:
    key = generate_private_key()
    later = pki.issue(key, SICHUAN, "测试县人民医院（测试数据）", start=dt.datetime(2025, 7, 1, tzinfo=CST))
    with pytest.raises(ConfigError, match="not valid at"):  # the signer is told first
        sign_bundle(bundle, key, [later], who=signer_reference(later), when=SIG_TIME)
    text = forge(bundle, key, later, SIG_TIME)
    with pytest.raises(TrustError, match="not valid at 2025-06-01T10:30:00") as err:
        verify_bundle(text, pki.trust(later), at=AT)
    assert not isinstance(err.value, (BadSignature, UnknownIssuer))


def test_certificate_expired_at_sigt(pki: Pki, bundle: dict[str, Any]) -> None:
    key = generate_private_key()
    short = pki.issue(
        key, SICHUAN, "测试县人民医院（测试数据）", start=dt.datetime(2025, 1, 1, tzinfo=CST),
        end=dt.datetime(2025, 3, 1, tzinfo=CST),
    )
    text = forge(bundle, key, short, SIG_TIME)
    with pytest.raises(TrustError, match="was not valid at") as err:
        verify_bundle(text, pki.trust(short), at=AT)
    assert "2025-03-01" in str(err.value)
    # Signed while it was valid: still verifies after expiry (validity is judged at sigT).
    early = forge(bundle, key, short, dt.datetime(2025, 2, 1, tzinfo=CST))
    assert verify_bundle(early, pki.trust(short), at=AT).signer_uscc == SICHUAN


def test_removed_certificate_fails_with_a_reason(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    trust = pki.trust()
    assert verify_bundle(text, trust, at=AT)
    assert trust.remove(pki.cert)
    with pytest.raises(UnknownIssuer, match="not listed") as err:
        verify_bundle(text, trust, at=AT)
    assert kid_of(pki.cert) in str(err.value)
    assert not trust.remove(pki.cert)


def test_listing_period_is_judged_at_sigt(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    ended = StaticTrust([pki.authority])
    ended.add_member(pki.cert, listed_until=dt.datetime(2025, 5, 1, tzinfo=CST))
    with pytest.raises(UnknownIssuer, match="not listed"):
        verify_bundle(text, ended, at=AT)
    later = StaticTrust([pki.authority])
    later.add_member(pki.cert, listed_from=SIG_TIME + dt.timedelta(seconds=1))
    with pytest.raises(UnknownIssuer):
        verify_bundle(text, later, at=AT)
    window = StaticTrust([pki.authority])
    window.add_member(pki.cert, listed_from=SIG_TIME, listed_until=SIG_TIME + dt.timedelta(days=1))
    assert verify_bundle(text, window, at=AT).signer_uscc == SICHUAN


def test_certificate_listed_for_another_member_fails(pki: Pki, bundle: dict[str, Any]) -> None:
    trust = StaticTrust([pki.authority])
    trust.add_member(pki.cert, uscc=CHONGQING)
    with pytest.raises(UnknownIssuer, match="not listed"):
        verify_bundle(signed_text(pki, bundle), trust, at=AT)


def test_certificate_from_an_untrusted_authority_fails(pki: Pki, bundle: dict[str, Any]) -> None:
    # A look-alike authority with the very same subject, and a certificate for the same member.
    rogue_key = generate_private_key()
    rogue = make_authority(
        rogue_key, AUTHORITY, "川渝互认登记机构（测试）", dt.datetime(2025, 1, 1, tzinfo=CST), dt.datetime(2030, 1, 1, tzinfo=CST)
    )
    assert rogue.subject == pki.authority.subject
    key = generate_private_key()
    cert = issue_certificate(
        make_csr(key, SICHUAN, "x"), SICHUAN, "x", rogue_key, rogue,
        dt.datetime(2025, 1, 1, tzinfo=CST), dt.datetime(2026, 1, 1, tzinfo=CST),
    )
    text = dumps(sign_bundle(bundle, key, [cert, rogue], who=signer_reference(cert), when=SIG_TIME))
    trust = pki.trust(pki.cert, cert)  # even listed, it does not chain to the trusted authority
    with pytest.raises(UnknownIssuer, match="not issued by a trusted registry authority"):
        verify_bundle(text, trust, at=AT)


def test_authority_key_cannot_sign_reports(pki: Pki, bundle: dict[str, Any]) -> None:
    text = forge(bundle, pki.authority_key, pki.authority, SIG_TIME)
    trust = pki.trust()
    trust.add_member(pki.authority)  # even if someone lists it
    with pytest.raises(TrustError, match="authority certificate"):
        verify_bundle(text, trust, at=AT)


def test_signer_must_be_the_issuer(pki: Pki, bundle: dict[str, Any]) -> None:
    # Chongqing's gateway signs a report that Sichuan's hospital issued.
    signed = sign_bundle(bundle, pki.cq_key, [pki.cq_cert], who=signer_reference(pki.cq_cert), when=SIG_TIME)
    verified = verify_bundle(dumps(signed), pki.trust(), at=AT)
    assert verified.signer_uscc == CHONGQING
    with pytest.raises(TrustError, match=f"signed by {CHONGQING} but the report was issued by {SICHUAN}") as err:
        check_signer_is_issuer(verified)
    assert err.value.location == "Bundle.entry[5].resource.performer"


def test_issuer_check_needs_a_report_and_an_issuer(pki: Pki, bundle: dict[str, Any]) -> None:
    no_report = dict(bundle, entry=bundle["entry"][:5])
    verified = verify_bundle(signed_text(pki, no_report), pki.trust(), at=AT)
    with pytest.raises(TrustError, match="no DiagnosticReport"):
        check_signer_is_issuer(verified)
    anonymous = copy.deepcopy(bundle)
    anonymous["entry"][5]["resource"]["performer"] = [{"display": "某医院"}]
    del anonymous["entry"][5]["resource"]["identifier"][0]["assigner"]
    with pytest.raises(TrustError, match="names no issuing Organization"):
        check_signer_is_issuer(verify_bundle(signed_text(pki, anonymous), pki.trust(), at=AT))
    reassigned = copy.deepcopy(bundle)
    reassigned["entry"][5]["resource"]["identifier"][0]["assigner"]["identifier"]["value"] = CHONGQING
    with pytest.raises(TrustError, match=f"issued by {CHONGQING}"):
        check_signer_is_issuer(verify_bundle(signed_text(pki, reassigned), pki.trust(), at=AT))
    logical = copy.deepcopy(bundle)
    logical["entry"][5]["resource"]["performer"] = [{"identifier": {"system": SYSTEM_USCC, "value": SICHUAN}}]
    assert check_signer_is_issuer(verify_bundle(signed_text(pki, logical), pki.trust(), at=AT)) == SICHUAN


def test_signature_time_in_the_future_is_refused(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    with pytest.raises(TrustError, match="later than the verification time"):
        verify_bundle(text, pki.trust(), at=SIG_TIME - dt.timedelta(hours=1))
    # A few minutes of clock drift are tolerated.
    assert verify_bundle(text, pki.trust(), at=SIG_TIME - dt.timedelta(minutes=3))
    with pytest.raises(InputError):
        verify_bundle(text, pki.trust(), at=dt.datetime(2025, 6, 2))


def test_signature_when_must_match_the_signed_time(pki: Pki, bundle: dict[str, Any]) -> None:
    doc = json.loads(signed_text(pki, bundle))
    doc["signature"]["when"] = "2025-06-01T02:30:00Z"  # the same instant, written in UTC: fine
    assert verify_bundle(json.dumps(doc), pki.trust(), at=AT)
    doc["signature"]["when"] = "2025-05-01T10:30:00+08:00"
    with pytest.raises(TrustError, match="Signature.when"):
        verify_bundle(json.dumps(doc), pki.trust(), at=AT)


def test_signed_header_without_sigt_is_refused(pki: Pki, bundle: dict[str, Any]) -> None:
    text = signed_text(pki, bundle)
    jws = raw_es256({"alg": "ES256", "kid": kid_of(pki.cert)}, document_bytes(bundle), pki.key)
    with pytest.raises(TrustError, match="sigT"):
        verify_bundle(with_jws(text, jws), pki.trust(), at=AT)


def test_sign_detached_guards_its_inputs(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="does not belong"):
        sign_detached(b"{}", pki.key, [pki.cq_cert], sig_time=SIG_TIME)
    with pytest.raises(ConfigError):
        sign_detached(b"{}", pki.key, [], sig_time=SIG_TIME)
    with pytest.raises(InputError, match="UTC offset"):
        sign_detached(b"{}", pki.key, [pki.cert], sig_time=dt.datetime(2025, 6, 1))
    for reserved in ("alg", "kid", "x5c", "sigT", "b64", "crit"):
        with pytest.raises(InputError):
            sign_detached(b"{}", pki.key, [pki.cert], sig_time=SIG_TIME, extra_header={reserved: "x"})
    author = [{"commId": {"id": "urn:oid:1.2.840.10065.1.12.1.1", "desc": "Author's Signature"}}]
    jws = sign_detached(b"{}", pki.key, [pki.cert], sig_time=SIG_TIME, extra_header={"srCms": author, "typ": "JOSE"})
    header, _ = verify_detached(jws, b"{}", lambda kid: [pki.cert])
    assert header["srCms"] == author and header["typ"] == "JOSE"
    assert unverified_header(jws) == header
    with pytest.raises(BadSignature):
        unverified_header("x.y")


def test_sign_bundle_guards_its_inputs(pki: Pki, bundle: dict[str, Any]) -> None:
    who = signer_reference(pki.cert)
    with pytest.raises(InputError):
        sign_bundle({"resourceType": "Patient"}, pki.key, [pki.cert], who=who, when=SIG_TIME)
    with pytest.raises(InputError):
        sign_bundle(bundle, pki.key, [pki.cert], who={}, when=SIG_TIME)
    with pytest.raises(InputError):
        sign_bundle(bundle, pki.key, [pki.cert], who=who, when=dt.datetime(2025, 6, 1))
    with pytest.raises(ParseError):
        sign_bundle(dict(bundle, bad=float("nan")), pki.key, [pki.cert], who=who, when=SIG_TIME)


def test_milliseconds_in_the_signature_time_survive(pki: Pki, bundle: dict[str, Any]) -> None:
    when = SIG_TIME.replace(microsecond=123456)
    signed = sign_bundle(bundle, pki.key, [pki.cert], who=signer_reference(pki.cert), when=when)
    assert signed["signature"]["when"] == "2025-06-01T10:30:00.123+08:00"
    verified = verify_bundle(dumps(signed), pki.trust(), at=AT)
    assert verified.signed_at == when.replace(microsecond=123000)


def test_static_trust_is_a_trust_source(pki: Pki) -> None:
    trust = StaticTrust.from_certificates([pki.authority, pki.cert, pki.cq_cert])
    assert isinstance(trust, TrustSource)
    assert trust.authorities() == [pki.authority]
    assert trust.certificates_for_kid(kid_of(pki.cq_cert)) == [pki.cq_cert]
    assert trust.certificates_for_kid("nobody") == []
    assert trust.is_listed(pki.cert, AT)
    with pytest.raises(InputError):
        trust.is_listed(pki.cert, dt.datetime(2025, 6, 1))
    with pytest.raises(InputError):
        trust.add_authority(pki.cert)
    assert [listing.uscc for listing in trust.listings()] == [SICHUAN, CHONGQING]


def test_public_api_other_parts_build_on_stays_in_place() -> None:
    # Other parts of the gateway (registry snapshot, exchange, audit) code against these names.
    import inspect

    import gateway.signing.canonical as canonical
    import gateway.signing.jws as jws
    import gateway.signing.keys as keys
    import gateway.signing.trust as trust

    promised = {
        canonical: ["canonicalize", "parse_json", "document_bytes", "dumps"],
        keys: ["generate_private_key", "private_key_pem", "load_private_key", "load_certificate",
               "load_certificates", "cert_pem", "kid_of", "uscc_of", "make_csr", "make_authority",
               "issue_certificate", "is_authority"],
        jws: ["sign_detached", "verify_detached", "sign_bundle", "verify_bundle", "VerifiedBundle",
              "check_signer_is_issuer", "format_instant", "CLOCK_SKEW"],
        trust: ["TrustSource", "StaticTrust", "check_certificate"],
    }
    for module, names in promised.items():
        assert set(names) <= set(module.__all__), module.__name__
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
    assert set(signing.__all__) <= set(dir(signing))
    assert list(inspect.signature(verify_bundle).parameters) == ["text", "trust", "at"]
    assert list(inspect.signature(sign_bundle).parameters) == ["bundle", "key", "chain", "who", "when", "document"]
    assert list(inspect.signature(sign_detached).parameters) == ["payload", "key", "chain", "sig_time", "extra_header"]
    assert [f for f in jws.VerifiedBundle.__dataclass_fields__] == [
        "bundle", "header", "certificate", "kid", "signer_uscc", "signed_at", "document_sha256"
    ]


def test_the_reading_institution_may_sign_an_exam_another_member_performed(pki: Pki, bundle: dict[str, Any]) -> None:
    """基层检查、上级诊断: Sichuan's hospital performed the exam, Chongqing's read it and signs the report; a member
    named nowhere in the report still may not sign it."""
    read = copy.deepcopy(bundle)
    report = read["entry"][5]["resource"]
    reader = {"resourceType": "Organization", "id": "reader",
              "identifier": [{"system": "https://fhir.cyhr.org.cn/sid/uscc", "value": CHONGQING}]}
    read["entry"].append({"fullUrl": "urn:uuid:9d1c5a3e-0000-4000-8000-00000000a001", "resource": reader})
    report["resultsInterpreter"] = [{"reference": "urn:uuid:9d1c5a3e-0000-4000-8000-00000000a001"}]
    signed = sign_bundle(read, pki.cq_key, [pki.cq_cert], who=signer_reference(pki.cq_cert), when=SIG_TIME)
    assert check_signer_is_issuer(verify_bundle(dumps(signed), pki.trust(), at=AT)) == CHONGQING

    by_identifier = copy.deepcopy(bundle)
    by_identifier["entry"][5]["resource"]["resultsInterpreter"] = [
        {"type": "Organization", "identifier": {"system": "https://fhir.cyhr.org.cn/sid/uscc", "value": CHONGQING}}]
    signed = sign_bundle(by_identifier, pki.cq_key, [pki.cq_cert], who=signer_reference(pki.cq_cert), when=SIG_TIME)
    assert check_signer_is_issuer(verify_bundle(dumps(signed), pki.trust(), at=AT)) == CHONGQING

    other_reader = copy.deepcopy(read)
    other_reader["entry"][-1]["resource"]["identifier"][0]["value"] = SICHUAN
    signed = sign_bundle(other_reader, pki.cq_key, [pki.cq_cert], who=signer_reference(pki.cq_cert), when=SIG_TIME)
    with pytest.raises(TrustError, match=f"signed by {CHONGQING} but the report was issued by {SICHUAN}"):
        check_signer_is_issuer(verify_bundle(dumps(signed), pki.trust(), at=AT))


def test_an_unsigned_bundle_or_another_document_is_refused_saying_what_is_missing(
        pki: Pki, bundle: dict[str, Any]) -> None:
    """What is missing is said (nothing secret about it); a signature that is there and fails still says nothing
    more than that it failed."""
    unsigned = json.loads(signed_text(pki, bundle))
    del unsigned["signature"]
    with pytest.raises(BadSignature) as err:
        verify_bundle(json.dumps(unsigned), pki.trust(), at=AT)
    assert str(err.value) == "Bundle.signature: the Bundle carries no signature"
    for other in ({"resourceType": "Patient"}, [1], "text"):
        with pytest.raises(BadSignature) as err:
            verify_bundle(json.dumps(other), pki.trust(), at=AT)
        assert str(err.value) == "Bundle.resourceType: not a Bundle: there is no signature to verify"
    unsigned["signature"] = {"type": [], "when": SIG_TIME.isoformat()}  # a signature that is not a JWS
    with pytest.raises(BadSignature) as err:
        verify_bundle(json.dumps(unsigned), pki.trust(), at=AT)
    assert str(err.value) == BAD_SIGNATURE
