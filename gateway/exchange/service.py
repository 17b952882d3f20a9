"""Exchange service: signed report Bundles between member gateways.

Sending (push on referral):
    a stored report Bundle, signed when it was stored, is put in the outbox for
    a destination member; the delivery worker POSTs it to the destination's
    ``/exchange/bundles`` with a client assertion, and keeps the receiver's
    signed receipt after checking it.

Receiving:
    ``receive(text, peer)`` verifies the signature on the received text against
    the registry snapshot (the signer must be the report's issuer), stores the
    raw text keyed by the hash of the signed document (what the signature
    covers: no ``signature``, ``id`` or ``meta``), checks the Bundle against our
    profiles, stores its resources, runs the recognition decision for this
    member, and answers with a signed receipt. The same document received again
    — resent, re-serialised, or pushed by several requests at once — is stored
    and decided once and answered with the same receipt. A push that does not
    verify is kept under the hash of its bytes, as refused.

Sending runs in lanes, one per destination (``delivery_concurrency``,
``delivery_timeout``), to the endpoint the registry snapshot names at the time
of sending (``gateway.exchange.outbox``).

Pulling (调阅):
    ``signed_reports_for(patient identifier)`` answers a peer with this member's
    own signed Bundles for that patient; ``pull`` asks a peer and verifies each.

No Flask here (``gateway.api.exchange`` is the HTTP face) and no signing code
of its own (``gateway.signing``).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import threading
import time
from urllib.parse import quote
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import jsonutil, metrics
from gateway.config import Settings
from gateway.errors import (
    ConfigError,
    GatewayError,
    InputError,
    Issue,
    ParseError,
    ProfileViolation,
    TrustError,
    UnknownIssuer,
)
from gateway.naming import ext_url
from gateway.audit import events as audit_events
from gateway.exchange.outbox import Delivery, Lanes, Outbox, SendResult, Transport
from gateway.exchange.peer_auth import ReplayCache, make_assertion, verify_assertion
from gateway.exchange.transports import HTTPTransport
from gateway.registry.snapshot import RegistryHolder
from gateway.signing.canonical import canonicalize, document_bytes, parse_json
from gateway.signing.jws import (
    check_signer_is_issuer,
    sign_bundle,
    sign_detached,
    signer_reference,
    verify_bundle,
    verify_detached,
)
from gateway.signing.keys import signing_identity
from gateway.signing.trust import check_certificate
from gateway.store.db import Database, transaction
from gateway.store.exchange import SignedBundles
from gateway.store.outbox import OutboxStore
from gateway.store.store import Store, holder_alive, lease_owner

__all__ = ["MemberIdentity", "Exchange", "ReceiveResult", "ReceiveLater", "EXCHANGE_PATH"]

log = logging.getLogger(__name__)

EXCHANGE_PATH = "/exchange/bundles"
EXT_MARK = ext_url("recognition-mark")


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


class ReceiveLater(GatewayError):
    """A pushed Bundle that cannot be answered now (another request is working it); the sender sends it again."""

    code = "transient"
    http_status = 503


class _AlreadyReceived(Exception):
    """Internal: the document was stored by another request first (its message record is ``record_id``)."""

    def __init__(self, record_id: int) -> None:
        super().__init__(record_id)
        self.record_id = record_id


@dataclass
class ReceiveResult:
    """The answer to a pushed Bundle."""

    status: int
    receipt: bytes
    duplicate: bool = False
    decisions: list[dict[str, Any]] | None = None


def read_receipt(text: bytes, trust: Any, at: _dt.datetime) -> tuple[dict[str, Any], str]:
    """(body, signer USCC) of a signed receipt, its signature verified against ``trust`` (a registry snapshot, or
    any source of certificates by kid that :func:`gateway.signing.trust.check_certificate` takes) at ``at``.

    :raises TrustError: not a receipt, or its signature does not verify.
    """
    try:
        doc = parse_json(text)
        body, jws = doc["receipt"], doc["signature"]
    except (ParseError, KeyError, TypeError, ValueError):
        raise TrustError("the receiver's answer is not a receipt", "receipt") from None
    if not isinstance(body, dict):
        raise TrustError("the receiver's answer is not a receipt", "receipt")
    _, cert = verify_detached(jws, canonicalize(body), trust.certificates_for_kid)
    return body, check_certificate(cert, trust, at, location="receipt")


def _patient_keys(bundle: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Patient":
            keys += [f"{i.get('system', '')}|{i['value']}" for i in res.get("identifier", []) if i.get("value")]
    return keys


class Exchange:
    """One member gateway's side of the exchange."""

    def __init__(self, settings: Settings, store: Callable[[], Store], *, holder: RegistryHolder | None,
                 identity: MemberIdentity | None, clock: Callable[[], _dt.datetime],
                 checker: Callable[[dict[str, Any]], list[Issue]] | None = None,
                 transport: Transport | None = None) -> None:
        """``store`` gives this thread's Store (SQLite connections are per thread)."""
        self.settings = settings
        self._store = store
        self.holder = holder
        self.identity = identity
        self.clock = clock
        self.checker = checker
        self.transport = transport
        if isinstance(transport, HTTPTransport):
            transport.timeout = float(settings.delivery_timeout)
        self._local = threading.local()
        self._marks: dict[tuple[str, str, str, _dt.date], list[str]] = {}
        self.busy_wait = 20.0  # seconds a push waits for another request working the same Bundle
        self._lanes: Lanes | None = None
        self._lanes_lock = threading.Lock()
        self.snapshot_file: Any = None
        if holder is not None and settings.registry_snapshot:
            from gateway.registry.holder import SnapshotFile

            self.snapshot_file = SnapshotFile(settings, holder, clock)

    @property
    def store(self) -> Store:
        return self._store()

    @property
    def db(self) -> Database:
        return self.store.db

    def _tables(self) -> tuple[Outbox, ReplayCache]:
        tables = getattr(self._local, "tables", None)
        if tables is None or tables[0].db is not self.db:
            # a lease outlasts the longest a delivery can take, plus the pass that records it; no longer, since a
            # node that dies mid-delivery leaves its deliveries to the others only when their lease ends
            lease = max(30.0, 2.0 * self.settings.delivery_timeout + self.settings.delivery_interval + 30.0)
            tables = (Outbox(self.db, clock=self.clock, lease_seconds=lease), ReplayCache(self.db))
            self._local.tables = tables
        return tables

    @property
    def outbox(self) -> Outbox:
        return self._tables()[0]

    @property
    def replay(self) -> ReplayCache:
        return self._tables()[1]

    # -- shared --------------------------------------------------------------------------

    def refresh_registry(self) -> bool:
        """Apply a newly installed snapshot file now (it is also looked at before every use), or a newer snapshot
        another node sharing this database applied; True if applied."""
        if self.snapshot_file is None:
            return False
        return bool(self.snapshot_file.refresh(db=self.db))

    def _snapshot(self) -> Any:
        if self.holder is None:
            raise ConfigError("this gateway has no registry snapshot configured (registry_snapshot)", "registry")
        if self.snapshot_file is not None:
            self.snapshot_file.refresh()  # a newly published snapshot takes effect without a restart
        return self.holder.snapshot_at(self.clock())

    def _identity(self) -> MemberIdentity:
        if self.identity is None:
            raise ConfigError("this gateway has no signing key configured (signing_key, signing_cert)", "signing_key")
        return self.identity

    # -- signing what this member issues -------------------------------------------------

    def sign(self, bundle: dict[str, Any]) -> bytes:
        """The Bundle signed by this member, as the JSON text that will travel.

        :raises ConfigError: no signing identity.
        """
        return self.sign_with_digest(bundle)[0]

    def sign_with_digest(self, bundle: dict[str, Any]) -> tuple[bytes, str]:
        """(signed JSON text, SHA-256 hex of the signed document bytes): canonicalised once.

        :raises ConfigError: no signing identity.
        """
        ident = self._identity()
        document = document_bytes(bundle)
        signed = sign_bundle(bundle, ident.key, list(ident.chain), who=signer_reference(ident.chain[0]),
                             when=self.clock(), document=document)
        return jsonutil.dumps(signed).encode("utf-8"), hashlib.sha256(document).hexdigest()

    def keep_signed(self, db: Database, text: bytes, direction: str, message_ref: int | None, *,
                    bundle: dict[str, Any] | None = None, digest: str | None = None) -> str:
        """Record a signed Bundle (inside the caller's transaction); returns its document hash.

        ``bundle`` and ``digest`` spare parsing and canonicalising ``text`` again when the caller has them.
        """
        if bundle is None:
            bundle = parse_json(text)
        if digest is None:
            digest = hashlib.sha256(document_bytes(bundle)).hexdigest()
        issuer = self._issuer_of(bundle)
        SignedBundles(db).keep(bundle.get("id", ""), digest, issuer, jsonutil.dumps(_patient_keys(bundle)), direction,
                               text, self.clock().isoformat(timespec="milliseconds"), message_ref)
        return digest

    @staticmethod
    def _issuer_of(bundle: dict[str, Any]) -> str:
        for entry in bundle.get("entry", []):
            res = entry.get("resource", {})
            if res.get("resourceType") == "Organization":
                for ident in res.get("identifier", []):
                    if ident.get("system", "").endswith("/sid/uscc"):
                        return str(ident.get("value", ""))
        return ""

    def stamp_marks(self, bundle: dict[str, Any]) -> int:
        """Add the recognition marks (e.g. 川渝HR) this member may print on each result; returns how many.

        Decided by the registry snapshot (catalogue item, issuer scope and level, EQA
        for the cycle of the collection date); results without a mark stay unmarked.
        The day is read as the recognition rules read it: a result whose date is not
        precise to the day (``2024-06``, ``2024``) or has a time without an offset
        gets no mark, as its recognition would be "not evaluable".
        """
        if self.holder is None:
            return 0
        from gateway.recognition.engine import marks_for, result_day
        from gateway.registry.models import Coding

        snapshot = self._snapshot()
        added = 0
        for entry in bundle.get("entry", []):
            obs = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(obs, dict) or obs.get("resourceType") != "Observation":
                continue
            when = obs.get("effectiveDateTime") or obs.get("issued")
            day, why_not = result_day(when if isinstance(when, str) else None)
            if day is None:
                log.debug("no recognition mark for an Observation: %s", why_not)
                continue
            marks: list[str] = []
            code = obs.get("code")
            codings = code.get("coding") if isinstance(code, dict) else None
            for coding in codings if isinstance(codings, list) else []:
                if not isinstance(coding, dict):
                    continue
                key = (snapshot.digest(), str(coding.get("system", "")), str(coding.get("code", "")), day)
                grants = self._marks.get(key)
                if grants is None:  # the same item on the same day under the same snapshot: same marks
                    if len(self._marks) > 10_000:
                        self._marks.clear()
                    grants = self._marks[key] = [g.mark for g in marks_for(
                        self.settings.issuer_uscc, Coding(key[1], key[2]), day, snapshot)]
                marks += [m for m in grants if m not in marks]
            if marks:
                extensions = obs.setdefault("extension", [])
                if not isinstance(extensions, list):
                    continue
                extensions.extend({"url": EXT_MARK, "valueString": m} for m in marks)
                added += len(marks)
        return added

    # -- push ----------------------------------------------------------------------------

    def endpoint_of(self, uscc: str) -> str:
        """The exchange URL of a member, from the registry snapshot.

        :raises UnknownIssuer: not an active member with an endpoint.
        """
        member = self._snapshot().member(uscc)
        if member is None or not member.endpoint:
            raise UnknownIssuer(f"member {uscc} is not in the registry snapshot or has no endpoint", "destination")
        # The registry lists a gateway's base URL; its FHIR base (…/fhir) names the same gateway.
        return str(member.endpoint).rstrip("/").removesuffix("/fhir") + EXCHANGE_PATH

    def push(self, bundle_id: str, destination: str) -> int:
        """Queue this member's signed Bundle ``bundle_id`` for ``destination``; returns the outbox id.

        :raises InputError: no signed Bundle with that id was issued here.
        :raises UnknownIssuer: the destination is not a member with an endpoint.
        """
        text = SignedBundles(self.db).latest_issued(bundle_id)
        if text is None:
            raise InputError(f"no signed Bundle {bundle_id} was issued by this gateway", "bundle")
        return self.outbox.enqueue(destination, self.endpoint_of(destination), text)

    def pushed_to(self, bundle_id: str) -> list[str]:
        """The members this member's signed Bundle ``bundle_id`` was queued for (any outbox state)."""
        digests = [hashlib.sha256(t).hexdigest() for t in SignedBundles(self.db).issued_texts(bundle_id)]
        return OutboxStore(self.db).destinations(digests)

    def forward_corrections(self, changes: list[Any], bundle_id: str) -> list[int]:
        """Queue the correction ``bundle_id`` (issued here, just stored) for every member a version it
        supersedes was pushed to; inside the caller's transaction. Returns the outbox ids.

        ``changes`` are :class:`gateway.store.reports.Change` rows. Delivered, receipted and audited like
        every push, by the delivery lanes; a destination no longer in the registry is left out (logged).
        """
        if self.identity is None or self.holder is None:
            return []
        queued: list[int] = []
        done: set[str] = set()
        for change in changes:
            current, old = change.current, change.old
            if current.bundle_id != bundle_id or current.direction != "issued" or old.direction != "issued":
                continue
            for destination in self.pushed_to(old.bundle_id):
                if destination in done:
                    continue
                done.add(destination)
                try:
                    queued.append(self.push(bundle_id, destination))
                except (UnknownIssuer, InputError, ConfigError) as exc:
                    log.warning("correction bundle=%s not queued for %s: %s", bundle_id, destination, exc.message)
                    continue
                log.info("correction bundle=%s queued for %s (it supersedes bundle=%s)", bundle_id, destination,
                         old.bundle_id)
        return queued

    def assertion_for(self, url: str) -> dict[str, str]:
        """The Authorization header for one request to ``url``."""
        ident = self._identity()
        audience = url.split("/exchange/")[0] + "/exchange"
        token = make_assertion(ident.key, list(ident.chain), issuer_uscc=ident.uscc, audience=audience,
                               now=self.clock())
        return {"Authorization": f"Bearer {token}"}

    @property
    def lanes(self) -> Lanes:
        """This gateway's delivery lanes, one per destination (``delivery_concurrency`` deliveries each)."""
        with self._lanes_lock:
            if self._lanes is None:
                self._lanes = Lanes(self.settings.delivery_concurrency)
            return self._lanes

    def deliver(self, transport: Transport | None = None, limit: int = 50, *,
                wait: float | None = 5.0) -> dict[str, int]:
        """Try every due delivery once; receipts are verified before a delivery counts. Returns counts.

        Each destination has its own lane (``delivery_concurrency`` deliveries at
        once, each given ``delivery_timeout`` seconds), so a slow or hung member
        never holds up deliveries to the others. Every delivery goes to the
        endpoint the registry snapshot in force names for its destination now.
        The call returns when its deliveries are done or after ``wait`` seconds
        (None: when all are done); one still waiting on a slow member goes on in
        its lane and is counted by a later call.
        """
        used = transport or self.transport
        if used is None:
            raise ConfigError("no transport to deliver with", "transport")

        from gateway.referrals import LANE, Referrals  # referrals (移送) travel in lanes of their own

        def check(delivery: Delivery, result: SendResult) -> dict[str, Any]:
            if delivery.destination.startswith(LANE):
                return Referrals(self).check_receipt(delivery.destination, delivery.payload, result.body)
            doc_sha = hashlib.sha256(document_bytes(parse_json(delivery.payload))).hexdigest()
            return self.check_receipt(result.body, delivery.destination, sent_sha256=doc_sha)

        def url_for(destination: str) -> str:
            return Referrals(self).url_for(destination) if destination.startswith(LANE) else \
                self.endpoint_of(destination)

        def delivered(db: Database, delivery: Delivery, receipt: dict[str, Any] | None) -> None:
            if delivery.destination.startswith(LANE):
                Referrals(self).delivered(db, delivery.payload, receipt)
                return
            bundle = parse_json(delivery.payload)
            doc_sha = hashlib.sha256(document_bytes(bundle)).hexdigest()
            audit_events.exchanged(db, "sent", at=self.clock(), member=self.settings.issuer_uscc,
                                   peer=delivery.destination, bundle_hash=doc_sha, bundle_id=bundle.get("id"))

        return self.outbox.deliver_due(used, limit=limit, headers=self.assertion_for, on_receipt=check,
                                       on_delivered=delivered, url_for=url_for, lanes=self.lanes,
                                       wait=wait)

    # -- receipts ------------------------------------------------------------------------

    def make_receipt(self, body: dict[str, Any]) -> bytes:
        """A receipt signed by this member: ``{"receipt": {...}, "signature": "<detached JWS>"}``."""
        ident = self._identity()
        jws = sign_detached(canonicalize(body), ident.key, list(ident.chain), sig_time=self.clock())
        return jsonutil.dumps({"receipt": body, "signature": jws}).encode("utf-8")

    def check_receipt(self, text: bytes, expected_signer: str, *, sent_sha256: str | None) -> dict[str, Any]:
        """Verify a receipt from ``expected_signer``; returns its body.

        :raises TrustError: not signed by the expected member, or not a receipt.
        """
        body, signer = read_receipt(text, self._snapshot(), self.clock())
        if signer != expected_signer or body.get("receiver") != expected_signer:
            raise TrustError(f"receipt signed by {signer}, expected {expected_signer}", "receipt")
        if sent_sha256 is not None and body.get("sha256") != sent_sha256:
            raise TrustError("receipt is for another Bundle", "receipt")
        return dict(body)

    # -- receive -------------------------------------------------------------------------

    def authenticate(self, authorization: str) -> str:
        """The calling member's USCC from an ``Authorization: Bearer`` header.

        :raises PeerAuthError: missing or invalid (401). :raises UnknownIssuer: revoked/unknown (403).
        """
        from gateway.exchange.peer_auth import PeerAuthError

        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise PeerAuthError("a signed client assertion is required (Authorization: Bearer ...)")
        return verify_assertion(token.strip(), self._snapshot(), audiences=[self.settings.base_url + "/exchange"],
                                now=self.clock(), replay=self.replay)

    def receive(self, text: bytes, peer: str) -> ReceiveResult:
        """Take a pushed signed Bundle from authenticated member ``peer``.

        A received Bundle is known by the hash of what its signature covers (the
        canonical document without ``signature``, ``id`` and ``meta``), not by its
        bytes: a pretty-printed or re-ordered copy, one with another ``id`` or
        ``meta``, and the same Bundle pushed by several requests at once are
        stored, decided and audited once, and every copy is answered with the
        first one's signed receipt. A copy that does not verify is refused and
        kept apart; it never touches the Bundle already received.

        :raises BadSignature: (401) the signature does not verify.
        :raises TrustError: (403) signer not listed, not the issuer, or snapshot problems.
        :raises ProfileViolation: (422) the Bundle breaks our profiles.
        :raises ParseError: (400) not strict JSON.
        :raises ReceiveLater: (503) the same Bundle is still being worked by another request; send it again.
        """
        try:
            verified = verify_bundle(text, self._snapshot(), at=self.clock())
            issuer = check_signer_is_issuer(verified)
        except GatewayError as exc:
            metrics.signature_failed("receive", exc)
            self._refuse_unverified(text, peer, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the text does to the parser, it is refused, not a 500
            log.warning("exchange push from peer=%s cannot be read: %s", peer, type(exc).__name__)
            error = ParseError("the pushed Bundle cannot be read as a signed FHIR Bundle", "Bundle")
            self._refuse_unverified(text, peer, error)
            raise error from None
        doc_sha = verified.document_sha256
        lease = float(self.settings.processing_lease)
        record_id, existing = self.store.insert_raw(channel="exchange", fmt="fhir-signed", sender=issuer,
                                                    message_id=doc_sha, origin=f"peer:{peer}", raw=text, lease=lease)
        deadline = time.monotonic() + self.busy_wait
        while existing is not None:  # the same document was pushed before, or is being worked right now
            if existing.ack is not None:
                return ReceiveResult(200, existing.ack, duplicate=True)
            if self._take(record_id, lease):
                break
            if time.monotonic() >= deadline:
                raise ReceiveLater("this Bundle is being received by another request; send it again later",
                                   "Bundle")
            time.sleep(0.05)
            existing = self.store.get_message(record_id)
        return self._work(verified, issuer, text, peer, record_id)

    def _take(self, record_id: int, lease: float) -> bool:
        """Hold a received Bundle that has no answer and no live holder (an earlier attempt died or was refused)."""
        now = self.clock().timestamp()
        return SignedBundles(self.db).take_message(record_id, lease_owner(), now + lease,
                                                   lambda owner, until: holder_alive(owner, until, now))

    def _refuse_unverified(self, text: bytes, peer: str, exc: GatewayError) -> None:
        """Keep a push that did not verify, under the hash of its bytes, as refused, with its audit entry."""
        digest_raw = hashlib.sha256(text).hexdigest()
        reason = {401: "bad-signature", 403: "unknown-issuer", 400: "invalid", 422: "invalid"}.get(
            exc.http_status, "invalid")
        detail = exc.message[:200]

        def audit(db: Database) -> None:
            audit_events.exchanged(db, "refused", at=self.clock(), member=self.settings.issuer_uscc, peer=peer,
                                   bundle_hash=digest_raw, reason=reason, detail=detail)

        record_id, existing = self.store.insert_raw(channel="exchange", fmt="fhir-signed", sender=peer,
                                                    message_id=digest_raw, origin=f"peer:{peer}", raw=text)
        if existing is not None and existing.ack is not None:  # accepted once (before a revocation): keep that
            with transaction(self.db):
                audit(self.db)
            return
        self.store.finish(record_id, status="refused", ack_code=str(exc.http_status), ack=None,
                          issues=exc.issues(), after=audit)

    def _work(self, verified: Any, issuer: str, text: bytes, peer: str, record_id: int) -> ReceiveResult:
        """Check, decide, store and receipt a verified Bundle held by this request."""
        owner = lease_owner()
        doc_sha = verified.document_sha256
        try:
            return self._receive(verified, issuer, text, peer, record_id, owner)
        except _AlreadyReceived as dup:  # another request stored the same document first: its receipt answers
            first = self.store.get_message(dup.record_id)
            if dup.record_id != record_id:
                self.store.finish(record_id, status="stored", ack_code="200", ack=first.ack, issues=[], owner=owner)
            return ReceiveResult(200, first.ack or b"", duplicate=True)
        except GatewayError as exc:
            reason = {401: "bad-signature", 403: "unknown-issuer", 400: "invalid", 422: "invalid"}.get(
                exc.http_status, "invalid")
            detail = exc.message[:200]

            def audit(db: Database) -> None:
                audit_events.exchanged(db, "refused", at=self.clock(), member=self.settings.issuer_uscc, peer=peer,
                                       bundle_hash=doc_sha, reason=reason, detail=detail)

            self.store.finish(record_id, status="refused", ack_code=str(exc.http_status), ack=None,
                              issues=exc.issues(), after=audit, owner=owner)
            raise
        except Exception as exc:  # noqa: BLE001 - kept as failed; the sender's next attempt works it again
            log.exception("exchange record=%s could not be worked (%s); raw input kept", record_id,
                          type(exc).__name__)
            issue = Issue("error", "exception", "", "internal error in the gateway; the Bundle is kept and is "
                          "worked again when it is sent again")
            self.store.finish(record_id, status="failed", ack_code="503", ack=None, issues=[issue], owner=owner)
            raise ReceiveLater("the Bundle could not be worked now; it is kept, send it again later",
                               "Bundle") from None

    def _receive(self, verified: Any, issuer: str, text: bytes, peer: str, record_id: int,
                 owner: str) -> ReceiveResult:
        snapshot = self._snapshot()
        now = self.clock()
        bundle = verified.bundle
        if self.checker is not None:
            problems = [i for i in self.checker(bundle) if i.severity == "error"]
            if problems:
                raise ProfileViolation(problems, "the received Bundle does not conform to our profiles")
        from gateway.recognition.facts import facts_from_bundle
        from gateway.recognition.record import decide
        from gateway.store.reports import supersede

        # the signer is the verified one: Bundle.signature.who is not signed, so it must name the same member
        read = facts_from_bundle(bundle)
        claimed = {f.signer_uscc for f in read if f.signer_uscc}
        if claimed and claimed != {verified.signer_uscc}:
            raise TrustError(f"Bundle.signature.who names {', '.join(sorted(claimed))} but the signature is "
                             f"{verified.signer_uscc}'s", "Bundle.signature.who")
        read = [dataclasses.replace(f, signer_uscc=verified.signer_uscc) for f in read]
        doc_sha = verified.document_sha256
        # decided, and the decisions' audit entries made, before the write lock is taken; only their storing
        # and chaining are inside (a report a stored correction supersedes is decided as superseded)
        made = decide(read, bundle, snapshot, self.settings.issuer_uscc, now, db=self.db, bundle_hash=doc_sha,
                      kid=verified.kid)
        decisions = made.decisions
        counts: dict[str, int] = {}
        for d in decisions:
            counts[d.outcome] = counts.get(d.outcome, 0) + 1
        receipt = self.make_receipt({
            "receiver": self.settings.issuer_uscc,
            "sender": peer,
            "issuer": issuer,
            "bundle": bundle.get("id", ""),
            "sha256": doc_sha,
            "received": now.isoformat(timespec="milliseconds"),
            "outcome": "accepted",
            "snapshot": snapshot.version,
            "decisions": counts,
        })

        def inside(db: Database) -> None:
            # the write lock makes this the one place where "received already?" has a single answer
            first = SignedBundles(db).received_message(doc_sha)
            if first is not None:
                raise _AlreadyReceived(first)
            self.keep_signed(db, text, "received", record_id, bundle=bundle, digest=doc_sha)
            audit_events.exchanged(db, "received", at=now, member=self.settings.issuer_uscc, peer=peer,
                                   bundle_hash=doc_sha, bundle_id=bundle.get("id"), kid=verified.kid)
            made.record(db, now)
            # a correction supersedes the version received before: its decisions are withdrawn here too
            supersede(self.store, bundle, direction="received", message_ref=record_id, at=now,
                      member=self.settings.issuer_uscc)

        unsigned = {k: v for k, v in bundle.items() if k != "signature"}
        if not self.store.finish(record_id, status="stored", ack_code="200", ack=receipt, issues=[], bundle=unsigned,
                                 after=inside, owner=owner):
            raise ReceiveLater("this Bundle was taken over by another process; send it again later", "Bundle")
        log.info("exchange received record=%s issuer=%s decisions=%s", record_id, issuer, counts)
        return ReceiveResult(200, receipt, decisions=[d.to_dict() for d in decisions])

    # -- pull (调阅) ----------------------------------------------------------------------

    def record_lookup(self, peer: str, identifier: str, texts: list[bytes], *, server: str, client_address: str,
                      query: str) -> None:
        """Record that ``peer`` looked up (调阅) a patient's results here: one audit entry per patient."""
        from gateway.audit.records import Party

        resources = []
        for text in texts:
            for entry in parse_json(text).get("entry", []):
                res = entry.get("resource", {})
                if res.get("resourceType") == "DiagnosticReport":
                    # stored references are Type/id; the signed copy references urn:uuid
                    subject = res.get("subject", {}).get("reference", "")
                    pid = subject.rsplit(":", 1)[-1]
                    resources.append({"resourceType": "DiagnosticReport", "id": res.get("id"),
                                      "subject": {"reference": f"Patient/{pid}"}})
        with transaction(self.db):
            if resources:
                audit_events.patient_reads(self.db, at=self.clock(), member=self.settings.issuer_uscc,
                                           server_address=server, client=Party.member(peer),
                                           client_address=client_address, on_behalf_of=peer,
                                           resources=resources, query=query)
        log.info("exchange lookup by peer=%s found=%d", peer, len(texts))

    def pull(self, destination: str, identifier: str, transport: Any = None) -> list[Any]:
        """调阅: ask ``destination`` for its signed reports of a patient and verify every one.

        :raises PeerUnavailable: the peer cannot be reached (retry later).
        :raises PeerRejected: the peer refused the request.
        :raises BadSignature / TrustError: a returned Bundle does not verify (nothing is returned then).
        """
        from gateway.errors import PeerRejected, PeerUnavailable

        used = transport or self.transport
        if used is None:
            raise ConfigError("no transport to query peers with", "transport")
        base = self.endpoint_of(destination).rsplit("/bundles", 1)[0]
        url = f"{base}/DiagnosticReport?patient.identifier={quote(identifier, safe='|:')}"
        result = used.get(url, self.assertion_for(url))
        if not result.ok:
            cls = PeerUnavailable if result.retryable else PeerRejected
            raise cls(f"{destination} answered {result.error or result.status}", "exchange")
        snapshot = self._snapshot()
        verified = []
        for entry in parse_json(result.body).get("entry", []):
            try:
                one = verify_bundle(jsonutil.dumps(entry["resource"]), snapshot, at=self.clock())
            except TrustError as exc:
                metrics.signature_failed("pull", exc)
                raise
            if check_signer_is_issuer(one) != destination:
                raise TrustError(f"{destination} returned a report issued by another member", "exchange")
            verified.append(one)
        return verified

    def signed_reports_for(self, identifier: str) -> list[bytes]:
        """This member's own signed Bundles for a patient identifier (``system|value`` or ``value``)."""
        # narrow in SQL (the keys are stored as JSON text "system|value"), then check exactly
        needle = identifier if "|" in identifier else f"|{identifier}"
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f'%"{escaped}"%' if "|" in identifier else f'%{escaped}"%'
        rows = SignedBundles(self.db).issued_for_patient(pattern)
        out = []
        for text, keys in rows:
            keys_list = jsonutil.loads(keys)
            if identifier in keys_list or any(k.split("|", 1)[1] == identifier for k in keys_list):
                out.append(text)
        return out
