"""Trust: which certificates a gateway accepts signatures from, and when.

A :class:`TrustSource` answers three questions, all offline: which member
certificates carry a given ``kid``, which registry authorities are trusted, and
whether a certificate was listed for its member at a given time. The signed
registry snapshot implements it for production; :class:`StaticTrust` is the
in-memory version for tests, the command line and the demo.

Revocation is removal (as in the EU DCC trust list): a certificate no longer
listed invalidates every signature it made, whatever ``sigT`` claims.

:func:`check_certificate` applies the shell model at the signature time: the
member certificate chains to a trusted authority, both were valid at ``sigT``,
the certificate names its member, and it was listed at ``sigT``. Its errors give
a reason an operator can act on; they never concern the cryptography itself
(that is :class:`~gateway.errors.BadSignature`, which gives none).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from gateway.errors import InputError, TrustError, UnknownIssuer
from gateway.identifiers import check_uscc
from gateway.signing.keys import is_authority, kid_of, uscc_of

__all__ = ["TrustSource", "Listing", "StaticTrust", "CombinedTrust", "find_issuer", "check_certificate"]

log = logging.getLogger(__name__)


@runtime_checkable
class TrustSource(Protocol):
    """What signature verification needs to know about the registry."""

    def certificates_for_kid(self, kid: str) -> list[x509.Certificate]:
        """Every member certificate with this kid (kids are short, so there may be several)."""
        ...

    def authorities(self) -> list[x509.Certificate]:
        """The registry authorities member certificates must chain to."""
        ...

    def is_listed(self, cert: x509.Certificate, at: _dt.datetime) -> bool:
        """True when ``cert`` was registered for the member it names at ``at``."""
        ...


def _fingerprint(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _aware(at: _dt.datetime, label: str = "at") -> _dt.datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise InputError(f"{label} must carry a UTC offset", label)
    return at


@dataclass(frozen=True)
class Listing:
    """One member certificate in the trust list, with the period it is listed for.

    The period is half-open, ``listed_from <= at < listed_until``; ``None`` leaves
    that end open. It is independent of the certificate's own validity, which is
    checked as well.
    """

    uscc: str
    certificate: x509.Certificate
    listed_from: _dt.datetime | None = None
    listed_until: _dt.datetime | None = None

    def covers(self, at: _dt.datetime) -> bool:
        """True when the listing period includes ``at``."""
        if self.listed_from is not None and at < self.listed_from:
            return False
        if self.listed_until is not None and at >= self.listed_until:
            return False
        return True


class StaticTrust:
    """An in-memory trust list: authorities plus listed member certificates."""

    def __init__(self, authorities: Iterable[x509.Certificate] = (), members: Iterable[Listing] = ()) -> None:
        self._authorities: dict[bytes, x509.Certificate] = {}
        self._listings: dict[bytes, list[Listing]] = {}
        for authority in authorities:
            self.add_authority(authority)
        for listing in members:
            self._add(listing)

    @classmethod
    def from_certificates(cls, certs: Iterable[x509.Certificate]) -> StaticTrust:
        """Authorities are the CA certificates among ``certs``; every other one is listed, open-ended.

        Member certificates that name no valid USCC are skipped (they could never
        pass verification).
        """
        trust = cls()
        for cert in certs:
            if is_authority(cert):
                trust.add_authority(cert)
            elif uscc_of(cert) is not None:
                trust.add_member(cert)
            else:
                log.warning("trust list: skipped a certificate (kid %s) that names no member USCC", kid_of(cert))
        return trust

    def add_authority(self, cert: x509.Certificate) -> None:
        """Trust ``cert`` as a registry authority.

        :raises InputError: it is not a CA certificate.
        """
        if not is_authority(cert):
            raise InputError("not a CA certificate: cannot be a registry authority", "authority")
        self._authorities[_fingerprint(cert)] = cert

    def add_member(
        self,
        cert: x509.Certificate,
        *,
        uscc: str | None = None,
        listed_from: _dt.datetime | None = None,
        listed_until: _dt.datetime | None = None,
    ) -> Listing:
        """List a member certificate, for the USCC it names unless ``uscc`` is given.

        :raises InputError: no USCC known for it, or a naive datetime.
        :raises IdentifierError: ``uscc`` fails the GB 32100 check.
        """
        member = check_uscc(uscc) if uscc is not None else uscc_of(cert)
        if member is None:
            raise InputError("the certificate names no member 统一社会信用代码; give uscc", "uscc")
        listing = Listing(
            member,
            cert,
            _aware(listed_from, "listed_from") if listed_from else None,
            _aware(listed_until, "listed_until") if listed_until else None,
        )
        self._add(listing)
        return listing

    def _add(self, listing: Listing) -> None:
        self._listings.setdefault(_fingerprint(listing.certificate), []).append(listing)

    def remove(self, cert: x509.Certificate) -> bool:
        """Remove a member certificate (revocation). True when it was listed."""
        return self._listings.pop(_fingerprint(cert), None) is not None

    def listings(self) -> list[Listing]:
        """Every listing, in the order added."""
        return [listing for group in self._listings.values() for listing in group]

    # TrustSource

    def certificates_for_kid(self, kid: str) -> list[x509.Certificate]:
        """Every listed member certificate whose kid is ``kid``."""
        return [group[0].certificate for group in self._listings.values() if kid_of(group[0].certificate) == kid]

    def authorities(self) -> list[x509.Certificate]:
        """The trusted registry authorities."""
        return list(self._authorities.values())

    def is_listed(self, cert: x509.Certificate, at: _dt.datetime) -> bool:
        """True when ``cert`` is listed, for the USCC it names, over a period that includes ``at``.

        :raises InputError: ``at`` has no UTC offset.
        """
        _aware(at)
        named = uscc_of(cert)
        return any(
            listing.uscc == named and listing.covers(at) for listing in self._listings.get(_fingerprint(cert), [])
        )


class CombinedTrust:
    """Several trust sources read as one: what an auditor holds when checking signatures after the fact.

    The authorities are those given plus those of every source; a member
    certificate is listed at a time when any source lists it then. With
    ``issued_is_listed`` a certificate that a trusted authority issued counts as
    listed even when no source lists it: for when no trust list is at hand
    (only the authority's certificate), where removal (revocation) cannot be
    known. The other checks of :func:`check_certificate` (the authority's
    signature, validity at the time, a member named) still apply.
    """

    def __init__(
        self,
        authorities: Iterable[x509.Certificate] = (),
        sources: Iterable[TrustSource] = (),
        *,
        issued_is_listed: bool = False,
    ) -> None:
        self.sources = list(sources)
        self.issued_is_listed = issued_is_listed
        found: dict[bytes, x509.Certificate] = {}
        for cert in [*authorities, *(a for source in self.sources for a in source.authorities())]:
            if is_authority(cert):
                found.setdefault(_fingerprint(cert), cert)
        self._authorities = list(found.values())

    def certificates_for_kid(self, kid: str) -> list[x509.Certificate]:
        """Every certificate with this kid that some source lists (each once)."""
        found: dict[bytes, x509.Certificate] = {}
        for source in self.sources:
            for cert in source.certificates_for_kid(kid):
                found.setdefault(_fingerprint(cert), cert)
        return list(found.values())

    def authorities(self) -> list[x509.Certificate]:
        """The trusted registry authorities of every source, and those given."""
        return list(self._authorities)

    def is_listed(self, cert: x509.Certificate, at: _dt.datetime) -> bool:
        """True when a source lists ``cert`` at ``at``, or (``issued_is_listed``) a trusted authority issued it.

        :raises InputError: ``at`` has no UTC offset.
        """
        _aware(at)
        if any(source.is_listed(cert, at) for source in self.sources):
            return True
        return self.issued_is_listed and uscc_of(cert) is not None and find_issuer(cert, self._authorities) is not None


def find_issuer(cert: x509.Certificate, authorities: Iterable[x509.Certificate]) -> x509.Certificate | None:
    """The authority among ``authorities`` whose key signed ``cert``, or None."""
    for authority in authorities:
        if _issued_by(cert, authority):
            return authority
    return None


#: Whether an authority issued a certificate, by the two certificates' SHA-256 fingerprints (:func:`_issued_by`).
_ISSUED: dict[tuple[bytes, bytes], bool] = {}
_ISSUED_SIZE = 1024


def _issued_by(cert: x509.Certificate, authority: x509.Certificate) -> bool:
    """Whether ``authority`` is an authority certificate whose key signed ``cert``. A function of the two
    certificates' bytes alone, so it is worked out once per pair, kept by their fingerprints (never the
    certificates: one a client sends may be large): every received Bundle and checkpoint of a peer names the same
    few certificates, and checking the authority's signature on one took an eighth of verifying a Bundle. When
    each is valid, and whether it is listed, is checked by the caller every time."""
    key = (cert.fingerprint(hashes.SHA256()), authority.fingerprint(hashes.SHA256()))
    known = _ISSUED.get(key)
    if known is not None:
        return known
    issued = authority.subject == cert.issuer and is_authority(authority)
    if issued:
        try:
            cert.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            issued = False
    if len(_ISSUED) >= _ISSUED_SIZE:
        _ISSUED.clear()
    _ISSUED[key] = issued
    return issued


def _valid_at(cert: x509.Certificate, at: _dt.datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def check_certificate(
    cert: x509.Certificate, trust: TrustSource, at: _dt.datetime, *, location: str = "Bundle.signature"
) -> str:
    """Check a member signing certificate against ``trust`` at time ``at``; return its member's USCC.

    Shell model: the certificate and the authority that issued it must both be
    valid at ``at``; the certificate must be listed for its member at ``at``.

    :raises UnknownIssuer: not issued by a trusted authority, names no member, or
        not listed at ``at`` (removed = revoked, or never registered).
    :raises TrustError: a CA certificate used to sign, no digitalSignature usage,
        or a certificate in the path not valid at ``at``.
    :raises InputError: ``at`` has no UTC offset.
    """
    _aware(at)
    kid = kid_of(cert)
    authority = find_issuer(cert, trust.authorities())
    if authority is None:
        raise UnknownIssuer(f"signing certificate {kid} was not issued by a trusted registry authority", location)
    if is_authority(cert):
        raise TrustError(f"signing certificate {kid} is an authority certificate, not a member's", location)
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            raise TrustError(f"signing certificate {kid} is not for digital signatures", location)
    except x509.ExtensionNotFound:
        pass
    for role, item in (("signing", cert), ("authority", authority)):
        if not _valid_at(item, at):
            raise TrustError(
                f"{role} certificate {kid_of(item)} was not valid at {at.isoformat()} "
                # Same offset as ``at``, so the operator compares like with like.
                f"(valid {item.not_valid_before_utc.astimezone(at.tzinfo).isoformat()} "
                f"to {item.not_valid_after_utc.astimezone(at.tzinfo).isoformat()})",
                location,
            )
    uscc = uscc_of(cert)
    if uscc is None:
        raise UnknownIssuer(f"signing certificate {kid} names no member 统一社会信用代码", location)
    if not trust.is_listed(cert, at):
        raise UnknownIssuer(
            f"signing certificate {kid} of {uscc} was not listed in the trust list at {at.isoformat()} "
            "(removed, i.e. revoked, or never registered)",
            location,
            member=uscc,
        )
    return uscc
