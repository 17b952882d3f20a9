"""JWS: detached ES256 signatures on report Bundles, and their verification.

Signing (ARCHITECTURE.md "Decisions already taken", ANCHORS §2.1):

1. the signed bytes are :func:`~gateway.signing.canonical.document_bytes`, the
   RFC 8785 form of the Bundle without ``signature``, ``id`` and ``meta``;
2. a compact JWS is made over them with ES256 and a protected header holding
   ``alg``, ``kid``, ``x5c``, ``sigT`` and ``srCms`` (no ``b64: false``), and
   the payload is left out: ``header..signature`` (RFC 7515 appendix F);
3. ``Bundle.signature`` carries it base64-encoded in ``data`` (a compact JWS has
   dots, which base64Binary does not allow), with ``type`` = the commitment in
   ``srCms``, ``when`` = ``sigT``, ``who``, ``targetFormat`` and ``sigFormat``.

Verification (:func:`verify_bundle`) reads the received text, never a
re-serialised model: parse strictly -> take out ``signature`` -> canonicalise ->
verify the JWS against every candidate certificate with its ``kid`` -> check the
certificate against the trust source at ``sigT`` (:mod:`gateway.signing.trust`).
A cryptographic failure is one :class:`~gateway.errors.BadSignature` that says
nothing about why; a trust failure says why in words an operator can act on.

ECDSA signatures are deterministic (RFC 6979) where the cryptography backend
supports it, so the shipped test vectors can be reproduced byte for byte.
"""
from __future__ import annotations

import base64
import binascii
import copy
import datetime as _dt
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from gateway.errors import BadSignature, ConfigError, GatewayError, InputError, TrustError
from gateway.naming import SYSTEM_USCC
from gateway.signing.canonical import canonicalize, document_bytes, parse_json, parse_received
from gateway.signing.keys import kid_of, name_of, uscc_of
from gateway.signing.trust import TrustSource, check_certificate

__all__ = [
    "ALG",
    "time_claim_problem",
    "SIGNATURE_TYPE_SYSTEM",
    "VERIFICATION_SIGNATURE",
    "TARGET_FORMAT",
    "SIG_FORMAT",
    "CLOCK_SKEW",
    "VerifiedBundle",
    "sign_detached",
    "verify_detached",
    "unverified_header",
    "x5c_leaf",
    "sign_bundle",
    "verify_bundle",
    "signer_reference",
    "check_signer_is_issuer",
    "format_instant",
]

log = logging.getLogger(__name__)

ALG = "ES256"
# URIs and codes fixed by FHIR R4 Signature and ASTM E1762 (ANCHORS §2.1); they are
# standard identifiers, not ours, so they live here rather than in gateway.naming.
SIGNATURE_TYPE_SYSTEM = "urn:iso-astm:E1762-95:2013"
VERIFICATION_SIGNATURE = "1.2.840.10065.1.12.1.5"
_VERIFICATION_DISPLAY = "Verification Signature"
TARGET_FORMAT = "application/fhir+json;canonicalization=http://hl7.org/fhir/canonicalization/json#document"
SIG_FORMAT = "application/jose"
#: How far a signature time may lie ahead of the verifier's clock (clocks drift).
CLOCK_SKEW = _dt.timedelta(minutes=5)

# Header members the signer sets itself; callers may add others but not these.
_RESERVED = frozenset({"alg", "kid", "x5c", "sigT", "b64", "crit"})
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_P256_ORDER_BYTES = 32


class SignedLater(TrustError):
    """A signature made later than the verification time allows (the signer's clock ahead of the verifier's): a
    passing state, not a bad signature. HTTP 425 (Too Early), with when to try again: a sender tries again (it was
    refused for good, 403, and its report never delivered, even once the clocks agreed)."""

    http_status = 425

    def __init__(self, message: str, location: str = "", *, retry_after: float = 60.0) -> None:
        super().__init__(message, location)
        self.retry_after = max(1, int(retry_after) + 1)


class _Invalid(Exception):
    """Internal: any reason a JWS is refused; becomes a reason-less BadSignature."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A Bundle whose signature verified and whose signer is trusted at ``signed_at``."""

    bundle: dict[str, Any]
    header: dict[str, Any]
    certificate: x509.Certificate
    kid: str
    signer_uscc: str
    signed_at: _dt.datetime
    document_sha256: str  # hex SHA-256 of the signed document bytes (what receipts and the audit name)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Strict base64url: no padding, no stray characters, canonical trailing bits."""
    if not _B64URL.match(text) or len(text) % 4 == 1:
        raise _Invalid("base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:
        raise _Invalid("non-canonical base64url")
    return data


def format_instant(when: _dt.datetime) -> str:
    """A FHIR ``instant``/JAdES ``sigT``: ISO 8601 with its UTC offset, milliseconds when present.

    :raises InputError: ``when`` has no UTC offset.
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise InputError("signature time must carry a UTC offset", "sigT")
    return when.isoformat(timespec="milliseconds" if when.microsecond else "seconds")


def _parse_instant(text: Any) -> _dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        return None
    return value if value.tzinfo is not None and value.utcoffset() is not None else None


def _srcms() -> list[dict[str, Any]]:
    return [{"commId": {"id": f"urn:oid:{VERIFICATION_SIGNATURE}", "desc": _VERIFICATION_DISPLAY}}]


def _ecdsa() -> ec.ECDSA:
    try:
        return ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    except (TypeError, UnsupportedAlgorithm):  # older cryptography or backend: random nonces
        return ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class _KeyMaterial:
    """What a signature's protected header takes from the key and its chain, made once per key."""

    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]
    kid: str
    x5c: tuple[str, ...]
    header_head: bytes  # canonical header up to the value of sigT: {"alg":..,"kid":..,"sigT":
    header_tail: bytes  # and after it: ,"srCms":[..],"x5c":[..]}


# The few keys a gateway signs with (its own, a registry's, a test's), newest last; entries hold their key and
# chain, so an identity check is all a lookup needs.
_MATERIAL: list[_KeyMaterial] = []
_MATERIAL_SIZE = 8


def _material(key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> _KeyMaterial:
    """The header members of ``key`` and ``chain``, checked and made once and then reused.

    :raises ConfigError: key not P-256, empty chain, or key not matching ``chain[0]``.
    """
    for found in reversed(_MATERIAL):
        if found.key is key and len(found.chain) == len(chain) and all(a is b for a, b in zip(found.chain, chain)):
            return found
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("the signing key must be an EC P-256 key (ES256)", "key")
    if not chain:
        raise ConfigError("a signing certificate is needed", "chain")
    if chain[0].public_key() != key.public_key():
        raise ConfigError("the private key does not belong to the signing certificate", "chain[0]")
    kid = kid_of(chain[0])
    x5c = tuple(base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in chain)
    # RFC 8785 orders the members alg, kid, sigT, srCms, x5c: sigT's value goes between the two halves
    head = canonicalize({"alg": ALG, "kid": kid})[:-1] + b',"sigT":'
    tail = b"," + canonicalize({"srCms": _srcms(), "x5c": list(x5c)})[1:]
    made = _KeyMaterial(key, tuple(chain), kid, x5c, head, tail)
    _MATERIAL.append(made)
    del _MATERIAL[:-_MATERIAL_SIZE]
    return made


def sign_detached(
    payload: bytes,
    key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate],
    *,
    sig_time: _dt.datetime,
    extra_header: dict[str, Any] | None = None,
) -> str:
    """A compact detached JWS ``header..signature`` over ``payload`` (ES256, raw r||s).

    The protected header holds ``alg``, ``kid`` (of ``chain[0]``), ``x5c`` (every
    certificate of ``chain``, base64 DER), ``sigT`` and ``srCms`` (verification
    signature), plus ``extra_header`` members, which may replace ``srCms`` but
    none of the others.

    :raises ConfigError: key not P-256, empty chain, or key not matching ``chain[0]``.
    :raises InputError: ``sig_time`` without UTC offset, or a reserved header member.
    """
    material = _material(key, chain)
    sig_t = format_instant(sig_time)
    if extra_header:
        header: dict[str, Any] = {"alg": ALG, "kid": material.kid, "x5c": list(material.x5c), "sigT": sig_t,
                                  "srCms": _srcms()}
        for name, value in extra_header.items():
            if name in _RESERVED:
                raise InputError(f"header member {name!r} is set by the signer", "extra_header")
            header[name] = value
        # Canonical header bytes: the same inputs always give the same JWS.
        header_bytes = canonicalize(header)
    else:
        # the same canonical bytes, from the members fixed per key around the signature time
        header_bytes = material.header_head + canonicalize(sig_t) + material.header_tail
    header_b64 = _b64url(header_bytes)
    signing_input = f"{header_b64}.{_b64url(payload)}".encode("ascii")
    r, s = decode_dss_signature(key.sign(signing_input, _ecdsa()))
    raw = r.to_bytes(_P256_ORDER_BYTES, "big") + s.to_bytes(_P256_ORDER_BYTES, "big")
    return f"{header_b64}..{_b64url(raw)}"


def _split(jws: str) -> tuple[str, dict[str, Any], bytes]:
    """Header text, header, raw signature of a detached compact JWS (or _Invalid)."""
    if not isinstance(jws, str):
        raise _Invalid("not text")
    parts = jws.split(".")
    if len(parts) != 3 or parts[1] != "" or not parts[0] or not parts[2]:
        raise _Invalid("not a detached compact JWS")
    try:
        header = parse_json(_b64url_decode(parts[0]))
    except GatewayError:
        raise _Invalid("header is not strict JSON") from None
    if not isinstance(header, dict):
        raise _Invalid("header is not an object")
    return parts[0], header, _b64url_decode(parts[2])


def unverified_header(jws: str) -> dict[str, Any]:
    """The protected header of a detached compact JWS, NOT verified: for routing only.

    :raises BadSignature: not a well-formed detached compact JWS.
    """
    try:
        return _split(jws)[1]
    except (_Invalid, ValueError, binascii.Error):
        raise BadSignature() from None


def verify_detached(
    jws: str,
    payload: bytes,
    candidates: Callable[[str], Iterable[x509.Certificate]],
) -> tuple[dict[str, Any], x509.Certificate]:
    """Verify a detached ES256 JWS over ``payload``; return its header and the certificate that verified.

    ``candidates(kid)`` yields the certificates that may have signed; each is
    tried, since kids are not unique. Only ``alg`` ES256 is accepted, ``crit`` and
    ``b64`` are refused. Exceptions raised by ``candidates`` itself pass through.

    :raises BadSignature: on any failure: malformed, another alg, no candidate,
        or no candidate's key verifies. It never says which.
    """
    try:
        header_b64, header, raw = _split(jws)
        if header.get("alg") != ALG or "crit" in header or "b64" in header:
            raise _Invalid("alg or header members not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _Invalid("no kid")
        if len(raw) != 2 * _P256_ORDER_BYTES:
            raise _Invalid("signature length")
        der = encode_dss_signature(
            int.from_bytes(raw[:_P256_ORDER_BYTES], "big"), int.from_bytes(raw[_P256_ORDER_BYTES:], "big")
        )
        signing_input = f"{header_b64}.{_b64url(payload)}".encode("ascii")
    except (_Invalid, ValueError, binascii.Error) as exc:
        log.debug("JWS refused before key lookup: %s", exc)
        raise BadSignature() from None
    tried = 0
    for cert in candidates(kid):
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            continue
        tried += 1
        try:
            public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return header, cert
    log.debug("JWS refused: %d candidate key(s) for kid %s, none verified", tried, kid)
    raise BadSignature()


def signer_reference(cert: x509.Certificate) -> dict[str, Any]:
    """``Signature.who``: a Reference to the member named in ``cert``, by its USCC.

    :raises ConfigError: the certificate names no member USCC.
    """
    uscc = uscc_of(cert)
    if uscc is None:
        raise ConfigError("the signing certificate names no member 统一社会信用代码", "cert")
    reference: dict[str, Any] = {"type": "Organization", "identifier": {"system": SYSTEM_USCC, "value": uscc}}
    name = name_of(cert)
    if name:
        reference["display"] = name
    return reference


def sign_bundle(
    bundle: Mapping[str, Any],
    key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate],
    *,
    who: dict[str, Any],
    when: _dt.datetime,
    document: bytes | None = None,
) -> dict[str, Any]:
    """A copy of ``bundle`` with ``Bundle.signature`` (any previous one replaced).

    ``who`` is a FHIR Reference to the signer (see :func:`signer_reference`);
    ``when`` becomes both ``Signature.when`` and the JWS ``sigT``. ``document``
    may pass :func:`document_bytes` of ``bundle`` when the caller computed it
    already. The copy is shallow: it shares its entries with ``bundle``.

    :raises InputError: not a Bundle, ``who`` not an object, ``when`` without offset.
    :raises ParseError: the Bundle holds values I-JSON cannot represent.
    :raises ConfigError: key and certificate do not fit (see :func:`sign_detached`), or
        the signing certificate is not valid at ``when``.
    """
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise InputError("only a Bundle can be signed", "Bundle.resourceType")
    if not isinstance(who, dict) or not who:
        raise InputError("Signature.who must be a Reference", "Bundle.signature.who")
    when_text = format_instant(when)
    if chain and not chain[0].not_valid_before_utc <= when <= chain[0].not_valid_after_utc:
        # Peers would refuse it (shell model at sigT); say so here, where it can be fixed.
        raise ConfigError(
            f"the signing certificate is not valid at {when_text} (valid "
            f"{chain[0].not_valid_before_utc.astimezone(when.tzinfo).isoformat()} "
            f"to {chain[0].not_valid_after_utc.astimezone(when.tzinfo).isoformat()})",
            "cert",
        )
    signed = {k: v for k, v in bundle.items() if k != "signature"}
    jws = sign_detached(document if document is not None else document_bytes(signed), key, chain, sig_time=when)
    signed["signature"] = {
        "type": [{"system": SIGNATURE_TYPE_SYSTEM, "code": VERIFICATION_SIGNATURE, "display": _VERIFICATION_DISPLAY}],
        "when": when_text,
        "who": _json_copy(who),
        "targetFormat": TARGET_FORMAT,
        "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(jws.encode("ascii")).decode("ascii"),
    }
    return signed


def _json_copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists and immutable scalars); anything else by :func:`copy.deepcopy`."""
    kind = type(value)
    if kind is dict:
        return {k: _json_copy(v) for k, v in value.items()}
    if kind is list:
        return [_json_copy(v) for v in value]
    if kind is str or kind is int or kind is bool or value is None:
        return value
    return copy.deepcopy(value)


def x5c_leaf(header: Mapping[str, Any], kid: str) -> list[x509.Certificate]:
    """The first ``x5c`` certificate when its kid matches; unauthenticated until the checks after."""
    x5c = header.get("x5c")
    if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
        return []
    found = _X5C_LEAVES.get(x5c[0])
    if found is None:
        found = _load_x5c_leaf(x5c[0])
        if len(x5c[0]) <= _X5C_CACHED_CHARS:
            if len(_X5C_LEAVES) >= _X5C_CACHE_SIZE:
                _X5C_LEAVES.clear()
            _X5C_LEAVES[x5c[0]] = found
    cert, cert_kid = found
    return [cert] if cert is not None and cert_kid == kid else []


# Received x5c leaves by their base64 text: the few peers' certificates, read and hashed once (certificates are
# immutable, so the same text is the same certificate).
_X5C_LEAVES: dict[str, tuple[x509.Certificate | None, str]] = {}
_X5C_CACHE_SIZE = 256
_X5C_CACHED_CHARS = 8192  # a member certificate takes about 1,000; anything longer is read each time


def _load_x5c_leaf(text: str) -> tuple[x509.Certificate | None, str]:
    if not _B64.match(text):
        return None, ""
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        return None, ""
    return cert, kid_of(cert)


def verify_bundle(text: bytes | str, trust: TrustSource, *, at: _dt.datetime | None = None) -> VerifiedBundle:
    """Verify a received signed Bundle from its text, and its signer against ``trust``.

    Candidate keys are the trust source's certificates with the JWS ``kid`` plus
    the ``x5c`` leaf (so that a removed or unlisted certificate is reported as
    such rather than as a bad signature; it still has to pass every trust check).
    ``at`` is the verifier's clock: a ``sigT`` more than :data:`CLOCK_SKEW` after
    it is refused. The caller still compares the signer with the report issuer
    (:func:`check_signer_is_issuer`).

    :raises ParseError: the text is not strict JSON (duplicate keys, NaN, ...).
    :raises BadSignature: no or malformed signature, or it does not verify (no reason given).
    :raises TrustError: ``sigT`` missing, in the future, or not matching
        ``Signature.when``; a certificate in the path not valid at ``sigT``.
    :raises UnknownIssuer: the certificate does not chain to a trusted authority,
        names no member, or was not listed at ``sigT``.
    """
    bundle, plain = parse_received(text)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":  # (what is missing, said: no secret)
        raise BadSignature("not a Bundle: there is no signature to verify", "Bundle.resourceType")
    if bundle.get("signature") is None:
        raise BadSignature("the Bundle carries no signature")
    try:
        signature = bundle.get("signature")
        if not isinstance(signature, dict) or signature.get("sigFormat") != SIG_FORMAT:
            raise _Invalid("no JOSE signature")
        if signature.get("targetFormat") not in (None, TARGET_FORMAT):
            raise _Invalid("unknown canonicalization")
        data = signature.get("data")
        if not isinstance(data, str) or not _B64.match(data):
            raise _Invalid("data is not base64")
        jws = base64.b64decode(data, validate=True).decode("ascii")
        payload = document_bytes(bundle, plain=plain)
    except (_Invalid, ValueError, binascii.Error, GatewayError) as exc:
        log.debug("signed Bundle refused before verification: %s", exc)
        raise BadSignature() from None

    def candidates(kid: str) -> list[x509.Certificate]:
        found = list(trust.certificates_for_kid(kid))
        known = {c.fingerprint(hashes.SHA256()) for c in found}
        try:
            leaf = x5c_leaf(unverified_header(jws), kid)
        except BadSignature:
            leaf = []
        return found + [c for c in leaf if c.fingerprint(hashes.SHA256()) not in known]

    header, cert = verify_detached(jws, payload, candidates)
    kid = header["kid"]
    signed_at = _parse_instant(header.get("sigT"))
    if signed_at is None:
        raise TrustError("the signature carries no sigT with a UTC offset", "Bundle.signature")
    when = _parse_instant(signature.get("when"))
    if when != signed_at:
        raise TrustError("Signature.when differs from the signed sigT", "Bundle.signature.when")
    if at is not None:
        if at.tzinfo is None or at.utcoffset() is None:
            raise InputError("the verification time must carry a UTC offset", "at")
        if signed_at > at + CLOCK_SKEW:
            raise SignedLater(
                f"signed at {format_instant(signed_at)}, later than the verification time {format_instant(at)}: "
                "the signer's clock is ahead of this one; it verifies once this clock reaches that time",
                "Bundle.signature", retry_after=(signed_at - at - CLOCK_SKEW).total_seconds())
    signer_uscc = check_certificate(cert, trust, signed_at)
    log.info("Bundle signature verified: kid %s, signer %s", kid, signer_uscc)
    return VerifiedBundle(bundle, header, cert, kid, signer_uscc, signed_at, hashlib.sha256(payload).hexdigest())


def _uscc_values(identifiers: Any) -> list[str]:
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    if not isinstance(identifiers, list):
        return []
    return [
        i["value"].strip().upper()
        for i in identifiers
        if isinstance(i, dict) and i.get("system") == SYSTEM_USCC and isinstance(i.get("value"), str)
    ]


def _readers(report: dict[str, Any], by_url: dict[Any, Any]) -> set[str]:
    """USCCs of the institutions ``resultsInterpreter`` names: an Organization, or a PractitionerRole's organization
    (in the Bundle, or by identifier)."""
    out: set[str] = set()
    for who in report.get("resultsInterpreter") or []:
        if not isinstance(who, dict):
            continue
        target = by_url.get(who.get("reference"))
        if isinstance(target, dict) and target.get("resourceType") == "PractitionerRole":
            org = target.get("organization")
            if isinstance(org, dict):
                linked = by_url.get(org.get("reference"))
                out.update(_uscc_values((linked if isinstance(linked, dict) else org).get("identifier")))
        elif isinstance(target, dict) and target.get("resourceType") == "Organization":
            out.update(_uscc_values(target.get("identifier")))
        elif target is None and who.get("type") == "Organization":
            out.update(_uscc_values(who.get("identifier")))
    return out


def check_signer_is_issuer(verified: VerifiedBundle) -> str:
    """Check that every DiagnosticReport in the Bundle was issued by the signer; return the USCC.

    The issuer is the report's ``performer`` Organization, found through its
    ``urn:uuid:`` reference in the Bundle (or a logical reference by identifier),
    with its USCC identifier (docs/bundle-shapes.md). A 检验报告单号 assigner, when
    present, must name the same member. An exam one member performed and another
    read (基层检查、上级诊断) may be signed by the reading institution its
    ``resultsInterpreter`` names; the engine's ``reading-signature`` rule judges it.

    :raises TrustError: no DiagnosticReport, a report naming no issuer USCC, or an
        issuer other than the signer.
    """
    bundle = verified.bundle
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)] if isinstance(bundle, dict) else []
    by_url = {e.get("fullUrl"): e.get("resource") for e in entries if isinstance(e.get("fullUrl"), str)}
    reports = 0
    for index, entry in enumerate(entries):
        report = entry.get("resource")
        if not isinstance(report, dict) or report.get("resourceType") != "DiagnosticReport":
            continue
        reports += 1
        location = f"Bundle.entry[{index}].resource.performer"
        issuers: list[str] = []
        for performer in report.get("performer") or []:
            if not isinstance(performer, dict):
                continue
            target = by_url.get(performer.get("reference"))
            if isinstance(target, dict):
                if target.get("resourceType") == "Organization":
                    issuers += _uscc_values(target.get("identifier"))
            elif performer.get("type", "Organization") == "Organization":
                issuers += _uscc_values(performer.get("identifier"))
        for ident in report.get("identifier") or []:
            if isinstance(ident, dict) and isinstance(ident.get("assigner"), dict):
                issuers += _uscc_values(ident["assigner"].get("identifier"))
        if not issuers:
            raise TrustError("the report names no issuing Organization with a 统一社会信用代码", location)
        if verified.signer_uscc in _readers(report, by_url):
            continue  # 基层检查、上级诊断: the reading institution signs the exam another member performed
        for issuer in issuers:
            if issuer != verified.signer_uscc:
                raise TrustError(f"signed by {verified.signer_uscc} but the report was issued by {issuer}", location)
    if not reports:
        raise TrustError("the Bundle holds no DiagnosticReport to compare the signer with", "Bundle.entry")
    return verified.signer_uscc


#: A time claim larger than this (seconds since 1970) is no time, and a float would round it.
_MOST_SECONDS = 2 ** 53


def time_claim_problem(claims: Mapping[str, Any], name: str) -> tuple[str, str] | None:
    """What is wrong with a JWT's time claim (``exp``, ``iat``, ``nbf``) when present: (the words, after the claim's
    name; a short reason for the log) — not a number (a string, a boolean, null...), not finite (NaN, an infinity:
    JSON as Python reads it takes them, and a NaN ``exp`` passed every comparison), or too large to be a time —
    else None. Client assertions and peer assertions are held to it alike."""
    if name not in claims:
        return None
    value = claims[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "is not a number (seconds since 1970)", f"{name} not a number"
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number (seconds since 1970)", f"{name} not finite"
    if abs(value) > _MOST_SECONDS:
        return "is not a time (seconds since 1970)", f"{name} not a time"
    return None
