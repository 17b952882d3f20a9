"""Audit checkpoints: signed statements of how long the log was and how it ended.

A checkpoint says "the log of member M had ``count`` entries, the last with hash
``head``, at ``time``", signed by M's registry-issued key (detached ES256 JWS
over the RFC 8785 form of those four facts, ``gateway.signing.jws``). The
gateway makes one on demand (``gateway audit checkpoint``, ``POST
/audit/checkpoints``) and periodically (:func:`maybe_make`, every N entries or T
minutes). :mod:`gateway.audit.verify` checks the chain against them: a log
rewritten from entry k on, hashes and all, no longer ends in a signed head, and
a log cut short has fewer entries than a checkpoint counted.

Whoever can write the database can also delete its checkpoints, so members
hold each other's: a checkpoint is exported as a small JSON document
(:meth:`Checkpoint.as_json`), imported by a peer after verifying its signature
(:func:`import_peer`), and handed back to an auditor, who verifies the member's
log against it (``gateway audit verify --checkpoint FILE``). A member that signs
two different heads for the same count is caught on import.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as _dt
import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit.log import ensure_schema, head, instant
from gateway.audit.verify import CheckpointClaim, SignerNotTrusted
from gateway.config import Settings
from gateway.errors import BadSignature, ConfigError, GatewayError, InputError, TrustError
from gateway.identifiers import check_uscc
from gateway.signing.canonical import canonicalize
from gateway.signing.jws import sign_detached, unverified_header, verify_detached, x5c_leaf
from gateway.signing.keys import certificates_in, is_authority, load_certificates, uscc_of
from gateway.signing.trust import CombinedTrust, StaticTrust, TrustSource, check_certificate, find_issuer
from gateway.store.audit import CheckpointRow, audit_store
from gateway.store.db import Database, transaction

__all__ = [
    "FORMAT",
    "Checkpoint",
    "Signer",
    "make",
    "due",
    "maybe_make",
    "checkpoints",
    "latest",
    "check_signature",
    "import_peer",
    "claims",
    "configured_trust",
]

log = logging.getLogger(__name__)

#: ``format`` member of an exported checkpoint document.
FORMAT = "cyhr-audit-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """A signed (count, head, time) of one member's audit log."""

    member: str
    count: int
    head: bytes
    time: str
    jws: str
    own: bool = True
    id: int | None = None
    received: str | None = None

    def payload(self) -> bytes:
        """The bytes the JWS signs: RFC 8785 of format, member, count, head (hex) and time."""
        return canonicalize(
            {"format": FORMAT, "member": self.member, "count": self.count, "head": self.head.hex(), "time": self.time}
        )

    def as_json(self) -> dict[str, Any]:
        """The exportable document (what peers hold)."""
        return {
            "format": FORMAT,
            "member": self.member,
            "count": self.count,
            "head": self.head.hex(),
            "time": self.time,
            "jws": self.jws,
        }

    @classmethod
    def from_json(cls, doc: Any, *, own: bool = False) -> Checkpoint:
        """A checkpoint from an exported document (signature not yet checked).

        :raises InputError: not a checkpoint document of this format.
        """
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise InputError(f"not an audit checkpoint document (format {FORMAT!r} expected)", "format")
        try:
            count = doc["count"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise InputError("count must be a whole number", "count")
            digest = bytes.fromhex(str(doc["head"]))
            if len(digest) != 32:
                raise InputError("head must be a SHA-256 hash in hex", "head")
            time = str(doc["time"])
            _dt.datetime.fromisoformat(time.replace("Z", "+00:00"))
            member, jws = check_uscc(str(doc["member"])), str(doc["jws"])
        except KeyError as exc:
            raise InputError(f"checkpoint document lacks {exc.args[0]!r}", str(exc.args[0])) from None
        except (ValueError, binascii.Error):
            raise InputError("checkpoint head or time is malformed", "head") from None
        return cls(member, count, digest, time, jws, own)

    def label(self) -> str:
        """How reports name it."""
        return f"checkpoint {self.id}" if self.id is not None else f"checkpoint of {self.member} at entry {self.count}"


@dataclass(frozen=True)
class Signer:
    """This member's signing key and certificate chain (first: the member certificate)."""

    key: ec.EllipticCurvePrivateKey
    chain: Sequence[x509.Certificate]

    @property
    def member(self) -> str:
        """The member's 统一社会信用代码, from its certificate.

        :raises ConfigError: the certificate names no member.
        """
        if not self.chain:
            raise ConfigError("a signing certificate is needed", "chain")
        uscc = uscc_of(self.chain[0])
        if uscc is None:
            raise ConfigError("the signing certificate names no member 统一社会信用代码", "chain[0]")
        return uscc


def _from_row(row: CheckpointRow) -> Checkpoint:
    cid, own, member, count, digest, time, jws, received = row
    return Checkpoint(member, int(count), bytes(digest), time, jws, bool(own), int(cid), received)


def _store(db: Database, cp: Checkpoint) -> Checkpoint:
    row, added = audit_store(db).add_checkpoint(cp.own, cp.member, cp.count, cp.head, cp.time, cp.jws, cp.received)
    if not added:
        log.info("audit checkpoint at entry %d of %s was held already", cp.count, cp.member)
    return _from_row(row)


def make(db: Database, signer: Signer, *, at: _dt.datetime) -> Checkpoint:
    """Sign and keep a checkpoint of this gateway's log as it is now.

    :raises ConfigError: the key does not fit the certificate, or it names no member.
    :raises InputError: ``at`` has no UTC offset.
    """
    with transaction(db):
        ensure_schema(db)
        count, digest = head(db)
        unsigned = Checkpoint(signer.member, count, digest, instant(at), "")
        jws = sign_detached(unsigned.payload(), signer.key, list(signer.chain), sig_time=at)
        cp = _store(db, Checkpoint(unsigned.member, count, digest, unsigned.time, jws, True))
    log.info("audit checkpoint %s made at entry %d", cp.id, count)
    return cp


def checkpoints(db: Database, *, own: bool | None = True, member: str | None = None) -> list[Checkpoint]:
    """Checkpoints held, oldest first: this gateway's (``own=True``), peers' (False) or all (None)."""
    store = audit_store(db)
    store.ensure_schema()
    return [_from_row(r) for r in store.checkpoints(own, member)]


def latest(db: Database) -> Checkpoint | None:
    """This gateway's newest checkpoint, if any."""
    store = audit_store(db)
    store.ensure_schema()
    row = store.latest_checkpoint()
    return _from_row(row) if row else None


def due(
    db: Database,
    *,
    now: _dt.datetime,
    every_entries: int = 1000,
    every: _dt.timedelta = _dt.timedelta(minutes=5),
) -> bool:
    """True when a periodic checkpoint is due: ``every_entries`` new entries, or ``every`` passed with any new one."""
    count, _ = head(db)
    last = latest(db)
    if last is None:
        return count > 0
    if count <= last.count:
        return False
    if count - last.count >= every_entries:
        return True
    made = _dt.datetime.fromisoformat(last.time.replace("Z", "+00:00"))
    return now - made >= every


def maybe_make(
    db: Database,
    signer: Signer,
    *,
    now: _dt.datetime,
    every_entries: int = 1000,
    every: _dt.timedelta = _dt.timedelta(minutes=5),
) -> Checkpoint | None:
    """Make a checkpoint when one is :func:`due` (call it from a timer or after appending).

    Asked again under the write lock before one is made: of several nodes of one member whose background
    passes find a checkpoint due at the same moment, one makes it and the others see it made.
    """
    if not due(db, now=now, every_entries=every_entries, every=every):
        return None
    with transaction(db):
        if not due(db, now=now, every_entries=every_entries, every=every):
            return None
        return make(db, signer, at=now)


def check_signature(cp: Checkpoint, trust: TrustSource) -> str:
    """Verify a checkpoint's signature and signer; return the member that signed.

    The JWS must verify over the checkpoint's own facts with a certificate
    listed in ``trust`` at the checkpoint time (shell model), and that
    certificate must name the member the checkpoint is about. The certificate
    is looked for in ``trust`` and in the signature's ``x5c`` (when a trusted
    authority issued it); either way it must pass every check of
    :func:`gateway.signing.trust.check_certificate`.

    :raises BadSignature: the signature does not verify (says nothing about why).
    :raises UnknownIssuer: the certificate is not from a trusted authority, or not listed.
    :raises TrustError: the signer is another member than the checkpoint names.
    """

    def candidates(kid: str) -> list[x509.Certificate]:
        # The listed certificates with this kid, and the x5c leaf when a trusted authority issued it: a
        # certificate no list holds is then named as such (check_certificate below). One from anyone else
        # is no candidate: its signature is a bad signature.
        found = list(trust.certificates_for_kid(kid))
        try:
            leaf = x5c_leaf(unverified_header(cp.jws), kid)
        except BadSignature:
            leaf = []
        authorities = trust.authorities()
        return found + [c for c in leaf if c not in found and find_issuer(c, authorities) is not None]

    try:
        header, cert = verify_detached(cp.jws, cp.payload(), candidates)
    except BadSignature:
        _unmatched_anchor(cp, trust)
        raise BadSignature(location="checkpoint") from None
    try:
        at = _dt.datetime.fromisoformat(cp.time.replace("Z", "+00:00"))
    except ValueError:
        raise BadSignature(location="checkpoint") from None
    if header.get("sigT") is None:
        raise BadSignature(location="checkpoint")
    signer = check_certificate(cert, trust, at, location="checkpoint")
    if signer != cp.member:
        raise TrustError(f"checkpoint about {cp.member} was signed by {signer}", "checkpoint")
    return signer


def _unmatched_anchor(cp: Checkpoint, trust: TrustSource) -> None:
    """Say why a checkpoint that did not verify with ``trust`` cannot be vouched for, when ``trust`` does not know its
    signer at all: no trusted certificate has its kid, and the certificate it carries is sound (its key verifies the
    signature) but was issued by an authority ``trust`` does not hold, nor in the name of one it holds (that is a
    look-alike: a forgery). The trust given does not match the signer: that is not proof of forgery.

    :raises SignerNotTrusted: so; returns when the checkpoint is forged as far as ``trust`` can tell.
    """
    try:
        header = unverified_header(cp.jws)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or trust.certificates_for_kid(kid):
            return  # (a trusted certificate has its kid: that one did not verify it)
        leaf = x5c_leaf(header, kid)
    except (BadSignature, ValueError, TypeError):
        return
    if not leaf:
        raise SignerNotTrusted(f"signed with key {kid}, which no trusted certificate holds (and it carries no "
                               "certificate of its own)", "checkpoint")
    try:
        verify_detached(cp.jws, cp.payload(), lambda _kid: leaf)
    except BadSignature:
        return  # (not even the certificate it carries verifies it)
    issuer = leaf[0].issuer
    if find_issuer(leaf[0], trust.authorities()) is not None or any(
            a.subject == issuer for a in trust.authorities()):
        return  # (in the name of a trusted authority, not by its key: a look-alike)
    raise SignerNotTrusted(f"signed with certificate {kid} of {uscc_of(leaf[0]) or 'no member'}, issued by "
                           f"{issuer.rfc4514_string()}, an authority the trust given does not hold", "checkpoint")


def import_peer(
    db: Database, doc: Any, trust: TrustSource, *, now: _dt.datetime, me: str | None = None
) -> Checkpoint:
    """Verify a peer's checkpoint document and keep it as a witness of the peer's log.

    :raises InputError: not a checkpoint document, or one of this gateway's own (``me``).
    :raises BadSignature: its signature does not verify.
    :raises UnknownIssuer: its signer is not trusted.
    :raises TrustError: the peer signed a different head for the same entry before
        (its log was rewritten), or the signer is not the member it names.
    """
    cp = Checkpoint.from_json(doc)
    if me is not None and cp.member == me:
        raise InputError("this is a checkpoint of this gateway's own log, not a peer's", "member")
    try:
        check_signature(cp, trust)
    except SignerNotTrusted:
        # (a peer posting a checkpoint is told its signature does not verify, never why: which signers this
        # gateway trusts is not said to a caller; `gateway audit verify` says it to the auditor)
        raise BadSignature(location="checkpoint") from None
    with transaction(db):
        ensure_schema(db)
        clash = audit_store(db).other_head_since(cp.member, cp.count, cp.head)
        if clash:
            raise TrustError(
                f"{cp.member} signed two different heads for entry {cp.count} (held since {clash}): "
                "its audit log was rewritten",
                "checkpoint",
            )
        stored = _store(db, Checkpoint(cp.member, cp.count, cp.head, cp.time, cp.jws, False, received=instant(now)))
    log.info("peer audit checkpoint of %s at entry %d held", cp.member, cp.count)
    return stored


def _check_member(cp: Checkpoint, trust: TrustSource, member: str) -> str:
    signer = check_signature(cp, trust)
    if cp.member != member:
        raise TrustError(f"it is about {cp.member}, but this is the log of {member}", "checkpoint")
    return signer


def _claim(cp: Checkpoint, label: str, trust: TrustSource | None, member: str | None) -> CheckpointClaim:
    check = None
    if trust is not None:
        check = (
            functools.partial(check_signature, cp, trust)
            if member is None
            else functools.partial(_check_member, cp, trust, member)
        )
    return CheckpointClaim(cp.count, cp.head, cp.time, label, check)


def claims(
    db: Database,
    trust: TrustSource | None,
    *,
    extra: Iterable[Checkpoint] = (),
    member: str | None = None,
) -> tuple[list[CheckpointClaim], list[str]]:
    """What :func:`gateway.audit.verify.verify` checks the log against, and notes on what was skipped.

    This gateway's own checkpoints, plus ``extra`` ones (copies held by peers)
    about the same member. Without ``trust`` signatures are not checked (the
    report then cannot vouch for them). With ``member`` (whose log this is), a
    checkpoint about another member does not verify.
    """
    own = checkpoints(db, own=True)
    members = {cp.member for cp in own} if member is None else {member}
    out = [_claim(cp, cp.label(), trust, member) for cp in own]
    notes: list[str] = []
    for cp in extra:
        if members and cp.member not in members:
            notes.append(f"{cp.label()} is about {cp.member}, not this log: skipped")
            continue
        out.append(_claim(cp, f"peer-held {cp.label()}", trust, member))
    if len(members) > 1:
        notes.append(f"this log's checkpoints name several members: {', '.join(sorted(members))}")
    return out, notes


def configured_trust(
    settings: Settings, files: Iterable[str | os.PathLike[str]] = ()
) -> tuple[TrustSource | None, list[str]]:
    """The trust a gateway checks checkpoint signatures with, and a note saying what it holds.

    Without flags: the registry authority (``registry_authority``), the member
    certificates of the registry snapshot (``registry_snapshot``; verified against
    the authority as of its own issue time, so an expired snapshot still vouches
    for what it listed then) and this member's own certificate (``signing_cert``).
    ``files`` (``--trust``) add authorities and member certificates. A member
    certificate that the authority issued but no list holds is trusted only when
    no snapshot is at hand (revocation cannot be known then, and the note says
    so). None when no registry authority is known: nothing can be vouched for.

    :raises ConfigError: a configured or given file is unreadable, or the snapshot does not verify.
    """
    authorities: list[x509.Certificate] = []
    sources: list[TrustSource] = []
    held: list[str] = []
    path = settings.registry_authority
    default = next(f.default for f in dataclasses.fields(Settings) if f.name == "registry_authority")
    if path and (path != default or Path(path).exists()):
        try:
            authorities += [c for c in load_certificates(path) if is_authority(c)]
        except ConfigError as exc:
            raise ConfigError(f"registry authority certificate {path}: {exc.message}", "registry_authority") from None
        held.append(f"registry authority {path}")
    snapshot = _snapshot(settings.registry_snapshot, authorities) if settings.registry_snapshot else None
    if snapshot is not None:
        sources.append(snapshot)
        listed = sum(len(m.certificates) for m in snapshot.members.values())
        held.append(f"registry snapshot {snapshot.version} ({listed} member certificates)")
    if settings.signing_cert:
        try:
            mine = load_certificates(settings.signing_cert)[0]
        except ConfigError as exc:
            raise ConfigError(f"signing certificate {settings.signing_cert}: {exc.message}", "signing_cert") from None
        if uscc_of(mine) is not None and not is_authority(mine):
            own = StaticTrust()
            own.add_member(mine)
            sources.append(own)
            held.append(f"this member's certificate {settings.signing_cert}")
    given = [str(f) for f in files]
    if given:
        sources.append(StaticTrust.from_certificates(certificates_in(given)))
        held.append(f"--trust {', '.join(given)}")
    trust = CombinedTrust(authorities, sources, issued_is_listed=snapshot is None)
    if not trust.authorities():
        what = f" (only {'; '.join(held)})" if held else ""
        return None, [
            f"no registry authority certificate to check checkpoint signatures with{what}: set registry_authority "
            "(and registry_snapshot) in the gateway's configuration, or give --trust"
        ]
    note = f"trust: {'; '.join(held)}"
    if snapshot is None:
        note += " (no registry snapshot: any member certificate the authority issued is trusted, revoked or not)"
    return trust, [note]


def _snapshot(path: str, authorities: list[x509.Certificate]) -> Any:
    """The configured registry snapshot, verified as of its own issue time.

    :raises ConfigError: unreadable, not a snapshot, or not signed by a trusted authority.
    """
    from gateway.registry.snapshot import read_snapshot_unverified, verify_snapshot

    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"registry snapshot {path}: {exc.strerror}", "registry_snapshot") from None
    try:
        issued = read_snapshot_unverified(text).issued
        return verify_snapshot(text, authorities, issued)
    except (GatewayError, ValueError, KeyError, TypeError) as exc:
        reason = exc.message if isinstance(exc, GatewayError) else "not a registry snapshot"
        raise ConfigError(
            f"registry snapshot {path} does not verify against the registry authority: {reason}", "registry_snapshot"
        ) from None
