"""Exchange service: signed report Bundles between member gateways.

Sending (push on referral):
    a stored report Bundle, signed when it was stored, is put in the outbox for
    a destination member; the delivery worker POSTs it to the destination's
    ``/exchange/bundles`` with a client assertion, and keeps the receiver's
    signed receipt after checking it.

Receiving:
    ``receive(text, peer)`` stores the raw text first, verifies the signature
    on the received text against the registry snapshot (the signer must be the
    report's issuer), checks the Bundle against our profiles, stores its
    resources, runs the recognition decision for this member, and answers with
    a signed receipt. A Bundle received again is answered with the same receipt.

Pulling (调阅):
    ``signed_reports_for(patient identifier)`` answers a peer with this member's
    own signed Bundles for that patient; ``pull`` asks a peer and verifies each.

No Flask here (``gateway.api.exchange`` is the HTTP face) and no signing code
of its own (``gateway.signing``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import threading
from urllib.parse import quote
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import jsonutil
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
from gateway.audit import log as audit_log
from gateway.exchange.outbox import Outbox, SendResult, Transport
from gateway.exchange.peer_auth import ReplayCache, make_assertion, verify_assertion
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
from gateway.signing.keys import load_certificates, load_private_key
from gateway.signing.trust import check_certificate
from gateway.store.db import transaction
from gateway.store.store import Store

__all__ = ["MemberIdentity", "Exchange", "ReceiveResult", "EXCHANGE_PATH"]

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
        if not settings.signing_key and not settings.signing_cert:
            return None
        if not (settings.signing_key and settings.signing_cert):
            raise ConfigError("signing_key and signing_cert go together", "signing_key")
        try:
            key = load_private_key(settings.signing_key)
            chain = load_certificates(settings.signing_cert)
        except (OSError, ValueError, GatewayError) as exc:
            raise ConfigError(f"cannot load this member's signing key or certificate: {exc}", "signing_key") from None
        if not chain or chain[0].public_key() != key.public_key():
            raise ConfigError("signing_key does not belong to signing_cert", "signing_cert")
        return cls(settings.issuer_uscc, key, tuple(chain))


@dataclass
class ReceiveResult:
    """The answer to a pushed Bundle."""

    status: int
    receipt: bytes
    duplicate: bool = False
    decisions: list[dict[str, Any]] | None = None


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
        self._local = threading.local()
        self._marks: dict[tuple[str, str, str, _dt.date], list[str]] = {}
        self.snapshot_file: Any = None
        if holder is not None and settings.registry_snapshot:
            from gateway.registry.holder import SnapshotFile

            self.snapshot_file = SnapshotFile(settings, holder, clock)

    @property
    def store(self) -> Store:
        return self._store()

    @property
    def db(self) -> sqlite_utils.Database:
        return self.store.db

    def _tables(self) -> tuple[Outbox, ReplayCache]:
        tables = getattr(self._local, "tables", None)
        if tables is None or tables[0].db is not self.db:
            tables = (Outbox(self.db, clock=self.clock), ReplayCache(self.db))
            self._local.tables = tables
        return tables

    @property
    def outbox(self) -> Outbox:
        return self._tables()[0]

    @property
    def replay(self) -> ReplayCache:
        return self._tables()[1]

    # -- shared --------------------------------------------------------------------------

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

    def keep_signed(self, db: sqlite_utils.Database, text: bytes, direction: str, message_ref: int | None, *,
                    bundle: dict[str, Any] | None = None, digest: str | None = None) -> str:
        """Record a signed Bundle (inside the caller's transaction); returns its document hash.

        ``bundle`` and ``digest`` spare parsing and canonicalising ``text`` again when the caller has them.
        """
        if bundle is None:
            bundle = parse_json(text)
        if digest is None:
            digest = hashlib.sha256(document_bytes(bundle)).hexdigest()
        issuer = self._issuer_of(bundle)
        db.execute("INSERT OR IGNORE INTO signed_bundles VALUES (?,?,?,?,?,?,?,?)",
                   [bundle.get("id", ""), digest, issuer, jsonutil.dumps(_patient_keys(bundle)), direction, text,
                    self.clock().isoformat(timespec="milliseconds"), message_ref])
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
        """
        if self.holder is None:
            return 0
        from gateway.recognition.engine import marks_for
        from gateway.registry.models import Coding

        snapshot = self._snapshot()
        added = 0
        for entry in bundle.get("entry", []):
            obs = entry.get("resource", {})
            if obs.get("resourceType") != "Observation":
                continue
            when = obs.get("effectiveDateTime") or obs.get("issued")
            if not when:
                continue
            day = _dt.date.fromisoformat(str(when)[:10])
            marks: list[str] = []
            for coding in obs.get("code", {}).get("coding", []):
                key = (snapshot.digest(), coding.get("system", ""), coding.get("code", ""), day)
                grants = self._marks.get(key)
                if grants is None:  # the same item on the same day under the same snapshot: same marks
                    if len(self._marks) > 10_000:
                        self._marks.clear()
                    grants = self._marks[key] = [g.mark for g in marks_for(
                        self.settings.issuer_uscc, Coding(key[1], key[2]), day, snapshot)]
                marks += [m for m in grants if m not in marks]
            if marks:
                obs.setdefault("extension", []).extend({"url": EXT_MARK, "valueString": m} for m in marks)
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
        return str(member.endpoint).rstrip("/") + EXCHANGE_PATH

    def push(self, bundle_id: str, destination: str) -> int:
        """Queue this member's signed Bundle ``bundle_id`` for ``destination``; returns the outbox id.

        :raises InputError: no signed Bundle with that id was issued here.
        :raises UnknownIssuer: the destination is not a member with an endpoint.
        """
        row = self.db.execute("SELECT text FROM signed_bundles WHERE bundle_id = ? AND direction = 'issued'"
                              " ORDER BY signed_at DESC LIMIT 1", [bundle_id]).fetchone()
        if row is None:
            raise InputError(f"no signed Bundle {bundle_id} was issued by this gateway", "bundle")
        return self.outbox.enqueue(destination, self.endpoint_of(destination), bytes(row[0]))

    def assertion_for(self, url: str) -> dict[str, str]:
        """The Authorization header for one request to ``url``."""
        ident = self._identity()
        audience = url.split("/exchange/")[0] + "/exchange"
        token = make_assertion(ident.key, list(ident.chain), issuer_uscc=ident.uscc, audience=audience,
                               now=self.clock())
        return {"Authorization": f"Bearer {token}"}

    def deliver(self, transport: Transport | None = None, limit: int = 50) -> dict[str, int]:
        """Try every due delivery once; receipts are verified before a delivery counts."""
        used = transport or self.transport
        if used is None:
            raise ConfigError("no transport to deliver with", "transport")

        def check(row_id: int, result: SendResult) -> dict[str, Any]:
            sent = self.outbox.get(row_id)
            payload = bytes(self.db.execute("SELECT payload FROM outbox WHERE id = ?", [row_id]).fetchone()[0])
            bundle = parse_json(payload)
            doc_sha = hashlib.sha256(document_bytes(bundle)).hexdigest()
            receipt = self.check_receipt(result.body, sent.destination, sent_sha256=doc_sha)
            with transaction(self.db):
                audit_events.exchanged(self.db, "sent", at=self.clock(), member=self.settings.issuer_uscc,
                                       peer=sent.destination, bundle_hash=doc_sha, bundle_id=bundle.get("id"))
            return receipt

        return self.outbox.deliver_due(used, limit=limit, headers=self.assertion_for, on_receipt=check)

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
        try:
            doc = parse_json(text)
            body, jws = doc["receipt"], doc["signature"]
        except (ParseError, KeyError, TypeError):
            raise TrustError("the receiver's answer is not a receipt", "receipt") from None
        snapshot = self._snapshot()
        _, cert = verify_detached(jws, canonicalize(body), snapshot.certificates_for_kid)
        signer = check_certificate(cert, snapshot, self.clock(), location="receipt")
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

        :raises BadSignature: (401) the signature does not verify.
        :raises TrustError: (403) signer not listed, not the issuer, or snapshot problems.
        :raises ProfileViolation: (422) the Bundle breaks our profiles.
        :raises ParseError: (400) not strict JSON.
        """
        digest_raw = hashlib.sha256(text).hexdigest()
        record_id, existing = self.store.insert_raw(channel="exchange", fmt="fhir-signed", sender=peer,
                                                    message_id=digest_raw, origin=f"peer:{peer}", raw=text)
        if existing is not None and existing.ack is not None:
            return ReceiveResult(200, existing.ack, duplicate=True)
        try:
            return self._receive(text, peer, record_id)
        except GatewayError as exc:
            reason = {401: "bad-signature", 403: "unknown-issuer", 400: "invalid", 422: "invalid"}.get(
                exc.http_status, "invalid")
            detail = exc.message[:200]

            def audit(db: sqlite_utils.Database) -> None:
                audit_events.exchanged(db, "refused", at=self.clock(), member=self.settings.issuer_uscc, peer=peer,
                                       bundle_hash=digest_raw, reason=reason, detail=detail)

            self.store.finish(record_id, status="refused", ack_code=str(exc.http_status), ack=None,
                              issues=exc.issues(), after=audit)
            raise

    def _receive(self, text: bytes, peer: str, record_id: int) -> ReceiveResult:
        snapshot = self._snapshot()
        now = self.clock()
        verified = verify_bundle(text, snapshot, at=now)
        issuer = check_signer_is_issuer(verified)
        bundle = verified.bundle
        if self.checker is not None:
            problems = [i for i in self.checker(bundle) if i.severity == "error"]
            if problems:
                raise ProfileViolation(problems, "the received Bundle does not conform to our profiles")
        from gateway.recognition.engine import decide_all
        from gateway.recognition.facts import facts_from_bundle
        from gateway.recognition.store import save_decisions

        decisions = decide_all(facts_from_bundle(bundle), snapshot, self.settings.issuer_uscc, now)
        doc_sha = verified.document_sha256
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

        # the decisions' audit entries are made before the write lock is taken; only their chaining is inside
        decision_entries = audit_log.prepare(audit_events.decision_records(
            decisions, member=self.settings.issuer_uscc, bundle_hash=doc_sha, kid=verified.kid))

        def inside(db: sqlite_utils.Database) -> None:
            self.keep_signed(db, text, "received", record_id, bundle=bundle, digest=doc_sha)
            save_decisions(db, decisions, now)
            audit_events.exchanged(db, "received", at=now, member=self.settings.issuer_uscc, peer=peer,
                                   bundle_hash=doc_sha, bundle_id=bundle.get("id"), kid=verified.kid)
            audit_log.append_prepared(db, decision_entries)

        unsigned = {k: v for k, v in bundle.items() if k != "signature"}
        self.store.finish(record_id, status="stored", ack_code="200", ack=receipt, issues=[], bundle=unsigned,
                          after=inside)
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
            one = verify_bundle(jsonutil.dumps(entry["resource"]), snapshot, at=self.clock())
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
        rows = self.db.execute("SELECT text, patient_keys FROM signed_bundles WHERE direction = 'issued'"
                               " AND patient_keys LIKE ? ESCAPE '\\' ORDER BY signed_at", [pattern]).fetchall()
        out = []
        for text, keys in rows:
            keys_list = jsonutil.loads(keys)
            if identifier in keys_list or any(k.split("|", 1)[1] == identifier for k in keys_list):
                out.append(bytes(text))
        return out
