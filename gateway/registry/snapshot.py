"""Registry snapshots: building, signing, verifying, and holding the current one.

A snapshot is one JSON document: the normalised registry body (see
:mod:`gateway.registry.source`) plus ``issued`` and ``valid_until``, and a
``signature`` member holding a detached compact JWS (ES256) by the registry
authority over the RFC 8785 canonical form of everything else::

    {"format": "cyhr-registry-snapshot/1", "version": 7, "issued": "...", "valid_until": "...",
     "authority": {...}, "members": [...], ..., "signature": {"jws": "eyJ...."}}

Like the EU DCC trust list, the snapshot is what lets every gateway decide
offline. A gateway refuses a snapshot that is unsigned, tampered with, signed
by anyone but a trusted registry authority, expired, or older than the one it
holds (a version regress would let an attacker replay a revoked member back
in). :class:`RegistryHolder` keeps the current snapshot and applies a new one
only when all of that holds.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import BadSignature, ConfigError, GatewayError, InputError, TrustError, shown
from gateway.registry.models import SNAPSHOT_FORMAT, Snapshot
from gateway.registry.source import MAX_VERSION, RegistrySource
from gateway.signing.canonical import canonicalize, parse_json
from gateway.signing.jws import CLOCK_SKEW, format_instant, sign_detached, verify_detached
from gateway.signing.keys import is_authority, kid_of, uscc_of

__all__ = [
    "DEFAULT_VALIDITY",
    "MAX_VERSION",
    "check_version",
    "build_snapshot",
    "unsigned_snapshot",
    "verify_snapshot",
    "read_snapshot_unverified",
    "RegistryHolder",
    "check_no_bom",
]

log = logging.getLogger(__name__)


def check_version(version: Any, location: str = "version") -> int:
    """``version`` when it is a snapshot version a gateway can keep: a whole number from 1 to :data:`MAX_VERSION`.

    :raises ConfigError: naming ``location`` and the range.
    """
    if isinstance(version, float) and version.is_integer():
        version = int(version)  # (12.0 in YAML: a whole number, as the schema's integer takes it)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"registry snapshot version {shown(version)} is not a whole number from 1 to {MAX_VERSION}",
                          location)
    if not 1 <= version <= MAX_VERSION:
        raise ConfigError(f"registry snapshot version {shown(version).replace(chr(39), '')} is out of range: a "
                          f"version is a whole number from 1 to {MAX_VERSION}", location)
    return version


#: How long a snapshot stays valid unless the build says otherwise: long enough to ride out an
#: outage of the distribution, short enough that a gateway cut off from it stops deciding.
DEFAULT_VALIDITY = _dt.timedelta(days=7)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _aware(moment: _dt.datetime, label: str) -> _dt.datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InputError(f"{label} must carry a UTC offset", label)
    return moment


def _dated_body(source: RegistrySource, issued: _dt.datetime, valid_until: _dt.datetime) -> dict[str, Any]:
    body = dict(source.body)
    body["issued"] = format_instant(issued)
    body["valid_until"] = format_instant(valid_until)
    return body


def unsigned_snapshot(
    source: RegistrySource, issued: _dt.datetime, valid_for: _dt.timedelta = DEFAULT_VALIDITY
) -> Snapshot:
    """A snapshot straight from a source, not signed: for previews and tests, never for deciding in production.

    :raises InputError: ``issued`` has no UTC offset.
    """
    _aware(issued, "issued")
    return Snapshot.from_document(_dated_body(source, issued, issued + valid_for))


def build_snapshot(
    source: RegistrySource,
    *,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    issued: _dt.datetime,
    valid_for: _dt.timedelta = DEFAULT_VALIDITY,
) -> dict[str, Any]:
    """The signed snapshot document for ``source``, issued at ``issued``.

    :raises ConfigError: ``cert`` is not a CA certificate of the authority the source
        names, does not cover the snapshot's validity, or does not fit ``key``.
    :raises InputError: ``issued`` has no UTC offset, or ``valid_for`` is not positive.
    """
    _aware(issued, "issued")
    if valid_for <= _dt.timedelta(0):
        raise InputError("a snapshot must be valid for a positive time", "valid_for")
    check_version(source.body.get("version"))
    authority = source.body["authority"]["uscc"]
    if not is_authority(cert):
        raise ConfigError("the registry snapshot must be signed with the registry authority's CA certificate", "cert")
    if uscc_of(cert) != authority:
        raise ConfigError(f"the certificate names {uscc_of(cert)}, the source's authority is {authority}", "cert")
    valid_until = issued + valid_for
    if not (cert.not_valid_before_utc <= issued and valid_until <= cert.not_valid_after_utc):
        # Shell model: a snapshot must not outlive the certificate that vouches for it.
        raise ConfigError(
            f"the authority certificate (valid {cert.not_valid_before_utc.isoformat()} to "
            f"{cert.not_valid_after_utc.isoformat()}) does not cover the snapshot's validity "
            f"{issued.isoformat()} to {valid_until.isoformat()}",
            "cert",
        )
    _issued_by(source, cert)
    body = _dated_body(source, issued, valid_until)
    jws = sign_detached(canonicalize(body), key, [cert], sig_time=issued)
    log.info("registry snapshot built: version=%s kid=%s", body["version"], kid_of(cert))
    return {**body, "signature": {"jws": jws}}


def _issued_by(source: RegistrySource, authority: x509.Certificate) -> None:
    """Every member's (and supervising authority's) certificate the source lists was issued by the authority that
    signs the snapshot: one another authority issued would be listed and refused by every gateway (as "not issued
    by a trusted registry authority") once it signs with it.

    :raises ConfigError: naming the first such certificate.
    """
    listed = [(f"members[{i}]", m) for i, m in enumerate(source.body.get("members", []))]
    listed += [(f"authorities[{i}]", a) for i, a in enumerate(source.body.get("authorities", []))]
    for where, holder in listed:
        for j, entry in enumerate(holder.get("certificates", [])):
            cert = x509.load_pem_x509_certificate(str(entry["pem"]).encode("ascii"))
            try:
                cert.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                raise ConfigError(f"{where}.certificates[{j}] ({holder.get('uscc', '')}) was not issued by the "
                                  f"registry authority certificate {kid_of(authority)} that signs this snapshot "
                                  f"(its issuer: {cert.issuer.rfc4514_string()}); issue it again with "
                                  "`gateway registry issue-cert`", f"{where}.certificates[{j}]") from None


def read_snapshot_unverified(text: str | bytes) -> Snapshot:
    """Parse a snapshot without checking its signature: for ``registry show`` only.

    :raises ParseError: not strict JSON.
    :raises ConfigError: not a snapshot document.
    """
    doc = parse_json(text)
    if not isinstance(doc, dict):
        raise ConfigError("a registry snapshot must be a JSON object", "snapshot")
    return Snapshot.from_document(doc)


def verify_snapshot(text: str | bytes, authorities: Iterable[x509.Certificate], at: _dt.datetime) -> Snapshot:
    """Verify the received snapshot text against trusted authority certificates at time ``at``.

    :raises BadSignature: unsigned, tampered with, or signed by no trusted authority (no reason given).
    :raises TrustError: signer is not the authority the snapshot names, a certificate is not
        valid, the snapshot is issued in the future, or it has expired.
    :raises ParseError: not strict JSON.
    :raises ConfigError: signed, but not a well-formed snapshot.
    :raises InputError: ``at`` has no UTC offset.
    """
    _aware(at, "at")
    trusted = [c for c in authorities if is_authority(c)]
    doc = parse_json(text)
    if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
        raise ConfigError("not a registry snapshot document", "snapshot")
    signature = doc.get("signature")
    jws = signature.get("jws") if isinstance(signature, Mapping) else None
    if not isinstance(jws, str):
        raise BadSignature("the registry snapshot is not signed", "snapshot.signature")
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        payload = canonicalize(body)
    except GatewayError:
        raise BadSignature(location="snapshot.signature") from None
    try:
        header, cert = verify_detached(jws, payload, lambda kid: [c for c in trusted if kid_of(c) == kid])
    except BadSignature:
        raise BadSignature(location="snapshot.signature") from None
    snapshot = Snapshot.from_document(body)
    check_version(doc.get("version"), "snapshot.version")  # (signed so, still no version a gateway can keep)
    if uscc_of(cert) != snapshot.authority_uscc:
        raise TrustError(
            f"the snapshot names authority {snapshot.authority_uscc} but was signed by {uscc_of(cert)}",
            "snapshot.authority",
        )
    for moment, label in ((snapshot.issued, "issued"), (at, "now")):
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise TrustError(
                f"the registry authority certificate {kid_of(cert)} is not valid {label} ({moment.isoformat()})",
                "snapshot.signature",
            )
    if snapshot.issued > at + CLOCK_SKEW:
        raise TrustError(
            f"registry snapshot {snapshot.version} is issued in the future ({snapshot.issued.isoformat()})",
            "snapshot.issued",
        )
    if at > snapshot.valid_until:
        raise TrustError(
            f"registry snapshot {snapshot.version} expired at {snapshot.valid_until.isoformat()}",
            "snapshot.valid_until",
        )
    snapshot.authority_certificates = (cert,)
    log.info("registry snapshot verified: version=%s kid=%s", snapshot.version, header.get("kid"))
    return snapshot


class RegistryHolder:
    """Keeps the current registry snapshot of a gateway; applies a new one only if it is valid and newer.

    Thread-safe: readers take :attr:`current` (or :meth:`snapshot_at`) while an
    update swaps the reference. ``min_version`` lets a restarted gateway refuse
    snapshots older than the last one it accepted before.
    """

    def __init__(
        self,
        authorities: Iterable[x509.Certificate],
        *,
        clock: Callable[[], _dt.datetime] = _utcnow,
        min_version: int = 0,
    ) -> None:
        self.authorities = tuple(authorities)
        if not any(is_authority(c) for c in self.authorities):
            raise ConfigError("no registry authority (CA) certificate to verify snapshots with", "authority")
        self._clock = clock
        self._min_version = min_version
        self._current: Snapshot | None = None
        self._current_text = b""
        self._lock = threading.Lock()
        #: why the configured snapshot file was refused when the gateway started, when a snapshot kept in its
        #: database is in force instead (None: the file is the one in force, or no such fallback happened)
        self.file_refused: str | None = None

    @property
    def current(self) -> Snapshot | None:
        """The snapshot in force, or None before the first one is applied."""
        return self._current

    @property
    def current_text(self) -> bytes:
        """The signed text of the current snapshot, exactly as received (for passing it on to others)."""
        return self._current_text

    def snapshot_at(self, at: _dt.datetime | None = None) -> Snapshot:
        """The current snapshot, refusing it once it has expired (an expired snapshot decides nothing).

        :raises ConfigError: no snapshot applied yet.
        :raises TrustError: the current snapshot has expired at ``at`` (default: now).
        """
        snapshot = self._current
        if snapshot is None:
            raise ConfigError("no registry snapshot has been loaded", "registry")
        moment = at or self._clock()
        if moment > snapshot.valid_until:
            raise TrustError(
                f"registry snapshot {snapshot.version} expired at {snapshot.valid_until.isoformat()}; load a newer one",
                "registry",
            )
        return snapshot

    def apply(self, text: str | bytes, at: _dt.datetime | None = None) -> Snapshot:
        """Verify snapshot text and make it current if it is newer; return the snapshot in force.

        Applying the same snapshot again is a no-op.

        :raises BadSignature: unsigned or tampered with.
        :raises TrustError: expired, untrusted signer, older than the one held, or the same
            version with different content.
        :raises ParseError: not strict JSON.
        :raises ConfigError: not a well-formed snapshot.
        """
        snapshot = verify_snapshot(text, self.authorities, at or self._clock())
        with self._lock:
            held = self._current
            floor = max(self._min_version, held.version if held else 0)
            if snapshot.version < floor:
                raise TrustError(
                    f"registry snapshot version {snapshot.version} is older than version {floor} already accepted",
                    "snapshot.version",
                )
            if held is not None and snapshot.version == held.version:
                if snapshot.digest() != held.digest():
                    raise TrustError(
                        f"registry snapshot version {snapshot.version} differs from the one held under that version",
                        "snapshot.version",
                    )
                return held
            self._current = snapshot
            self._current_text = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        log.info("registry snapshot applied: version=%s", snapshot.version)
        return snapshot

    def load_file(self, path: str | Path, at: _dt.datetime | None = None) -> Snapshot:
        """:meth:`apply` the snapshot in a file.

        :raises ConfigError: the file cannot be read, or see :meth:`apply`.
        """
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read registry snapshot {p}: {exc.strerror or exc}", str(p)) from None
        return self.apply(check_no_bom(data, p), at)


def check_no_bom(data: bytes, path: str | Path) -> bytes:
    """``data`` of snapshot file ``path`` when it does not start with a byte order mark (an editor's, or a copy
    tool's: the authority writes none; the JSON parser's own message named no file).

    :raises ConfigError: naming the file.
    """
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"registry snapshot {path} starts with a byte order mark (BOM), which the registry "
                          "authority never writes: install the file exactly as `gateway registry build` wrote it "
                          "(or save it as UTF-8 without BOM)", str(path))
    return data
