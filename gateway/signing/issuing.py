"""Signing what this member issues: report Bundles and receipts, with the member's own key.

A pure service: no database, no network. The pipeline signs every report Bundle
it stores with it, and answers a received Bundle with a receipt made here; the
exchange (``gateway.exchange``) only carries what was signed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import jsonutil
from gateway.config import Settings
from gateway.signing.canonical import canonicalize, document_bytes
from gateway.signing.jws import sign_bundle, sign_detached, signer_reference
from gateway.signing.keys import signing_identity

__all__ = ["MemberIdentity", "Signer"]


@dataclass(frozen=True)
class MemberIdentity:
    """This member's signing key and certificate chain (leaf first)."""

    uscc: str
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> "MemberIdentity | None":
        """The identity named by ``signing_key``/``signing_cert``, or None when not configured.

        :raises ConfigError: unreadable files, or a key that does not fit the certificate.
        """
        found = signing_identity(settings)  # key mode, password, key fits certificate, certificate names issuer_uscc
        return None if found is None else cls(*found)


class Signer:
    """Signs with one member's identity, at the time its clock gives."""

    def __init__(self, identity: MemberIdentity, clock: Callable[[], _dt.datetime]) -> None:
        self.identity = identity
        self.clock = clock
        self._who = signer_reference(identity.chain[0])  # made once per key, not once per Bundle

    def sign(self, bundle: dict[str, Any]) -> bytes:
        """The Bundle signed by this member, as the JSON text that will travel."""
        return self.sign_with_digest(bundle)[0]

    def sign_with_digest(self, bundle: dict[str, Any]) -> tuple[bytes, str]:
        """(signed JSON text, SHA-256 hex of the signed document bytes): canonicalised once."""
        document = document_bytes(bundle)
        signed = sign_bundle(bundle, self.identity.key, list(self.identity.chain), who=self._who, when=self.clock(),
                             document=document)
        return jsonutil.dumps(signed).encode("utf-8"), hashlib.sha256(document).hexdigest()

    def receipt(self, body: dict[str, Any]) -> bytes:
        """A receipt signed by this member: ``{"receipt": {...}, "signature": "<detached JWS>"}``."""
        jws = sign_detached(canonicalize(body), self.identity.key, list(self.identity.chain), sig_time=self.clock())
        return jsonutil.dumps({"receipt": body, "signature": jws}).encode("utf-8")
