"""Signing: keys, canonical JSON, detached JWS on report Bundles, and trust checks.

Pure: no network, no database, no clock (times are parameters). The pieces:

- :mod:`~gateway.signing.canonical`: RFC 8785 bytes of what a signature covers;
- :mod:`~gateway.signing.keys`: P-256 keys, CSRs, authority and member certificates, ``kid``;
- :mod:`~gateway.signing.jws`: ``sign_bundle`` / ``verify_bundle`` and the detached JWS under them;
- :mod:`~gateway.signing.trust`: the ``TrustSource`` protocol, ``StaticTrust``, shell-model checks.
"""
from __future__ import annotations

from gateway.signing.canonical import canonicalize, document_bytes, dumps, parse_json
from gateway.signing.jws import (
    VerifiedBundle,
    check_signer_is_issuer,
    sign_bundle,
    sign_detached,
    signer_reference,
    unverified_header,
    verify_bundle,
    verify_detached,
)
from gateway.signing.keys import (
    cert_pem,
    generate_private_key,
    issue_certificate,
    kid_of,
    load_certificate,
    load_certificates,
    load_private_key,
    make_authority,
    make_csr,
    private_key_pem,
    uscc_of,
)
from gateway.signing.trust import Listing, StaticTrust, TrustSource, check_certificate

__all__ = [
    "canonicalize",
    "parse_json",
    "document_bytes",
    "dumps",
    "generate_private_key",
    "private_key_pem",
    "load_private_key",
    "load_certificate",
    "load_certificates",
    "cert_pem",
    "kid_of",
    "uscc_of",
    "make_csr",
    "make_authority",
    "issue_certificate",
    "sign_detached",
    "verify_detached",
    "unverified_header",
    "sign_bundle",
    "verify_bundle",
    "signer_reference",
    "check_signer_is_issuer",
    "VerifiedBundle",
    "TrustSource",
    "StaticTrust",
    "Listing",
    "check_certificate",
]
