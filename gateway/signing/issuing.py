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
        self._chain = list(identity.chain)

    def sign(self, bundle: dict[str, Any]) -> bytes:
        """The Bundle signed by this member, as the JSON text that will travel."""
        return self.sign_with_digest(bundle)[0]

    def sign_with_digest(self, bundle: dict[str, Any]) -> tuple[bytes, str]:
        """(signed JSON text, SHA-256 hex of the signed document bytes): canonicalised once.

        The text is ``jsonutil.dumps`` of the signed Bundle, written as the Bundle's own
        text with the ``signature`` member added at the end, which is what the signed copy
        is (:func:`~gateway.signing.jws.sign_bundle` drops any previous signature and appends the new one).
        """
        document = document_bytes(bundle)
        signed = sign_bundle(bundle, self.identity.key, self._chain, who=self._who, when=self.clock(),
                             document=document)
        return _signed_text(bundle, signed), hashlib.sha256(document).hexdigest()

    def receipt(self, body: dict[str, Any]) -> bytes:
        """A receipt signed by this member: ``{"receipt": {...}, "signature": "<detached JWS>"}``."""
        jws = sign_detached(canonicalize(body), self.identity.key, self._chain, sig_time=self.clock())
        return jsonutil.dumps_bytes({"receipt": body, "signature": jws})


def _signed_text(bundle: dict[str, Any], signed: dict[str, Any]) -> bytes:
    """``jsonutil.dumps(signed)`` as UTF-8, where ``signed`` is ``bundle`` without ``signature`` plus a new one.

    A JSON object's text is its members' texts in order, so the signed text is the
    unsigned Bundle's text with ``,"signature":...`` before its closing brace. Whatever
    the splice cannot be sure of (an empty object, a value only the fallback writer
    takes) is written whole.
    """
    unsigned = bundle if "signature" not in bundle else {k: v for k, v in bundle.items() if k != "signature"}
    try:
        head = jsonutil.encode(unsigned)
        tail = jsonutil.encode(signed["signature"])
    except (UnicodeEncodeError, TypeError):
        return jsonutil.dumps_bytes(signed)
    if len(head) < 3 or head[-1:] != b"}":
        return jsonutil.dumps_bytes(signed)
    return b"".join((head[:-1], b',"signature":', tail, b"}"))
