"""Exchange service: signed report Bundles between member gateways (member-to-member I/O only).

Sending (push on referral):
    a stored report Bundle, signed when it was stored, is put in the outbox for
    a destination member; the delivery worker POSTs it to the destination's
    ``/exchange/bundles`` with a client assertion, and keeps the receiver's
    signed receipt after checking it.

Receiving:
    the caller's signed client assertion is checked here (:meth:`Exchange.authenticate`);
    the pushed Bundle itself is a channel of the pipeline
    (:meth:`gateway.pipeline.Pipeline.receive_signed`): verified, stored raw under
    the hash of the signed document, checked, decided, answered with a signed
    receipt and recorded.

Sending runs in lanes, one per destination (``delivery_concurrency``,
``delivery_timeout``), to the endpoint the registry snapshot names at the time
of sending (``gateway.exchange.outbox``).

Pulling (调阅):
    ``signed_reports_for(patient identifier)`` answers a peer with this member's
    own signed Bundles for that patient; ``pull`` asks a peer and verifies each.

No Flask here (``gateway.api.exchange`` is the HTTP face), no signing of its own
(``gateway.signing.issuing`` signs) and no SQL (``gateway.store``).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from gateway import jsonutil, metrics
from gateway.audit import events as audit_events
from gateway.errors import ConfigError, GatewayError, InputError, ParseError, TrustError, UnknownIssuer
from gateway.exchange.outbox import Delivery, Failure, Lanes, Outbox, SendResult, Transport
from gateway.exchange.peer_auth import ReplayCache, make_assertion, verify_assertion
from gateway.signing.canonical import canonicalize, document_bytes, parse_json
from gateway.signing.jws import check_signer_is_issuer, verify_bundle, verify_detached
from gateway.signing.trust import check_certificate
from gateway.store.db import Database, transaction
from gateway.store.exchange import SignedBundles
from gateway.store.outbox import OutboxStore
from gateway.store.store import Store

if TYPE_CHECKING:
    from gateway.member import Member

__all__ = ["Exchange", "EXCHANGE_PATH", "read_receipt"]

log = logging.getLogger(__name__)

EXCHANGE_PATH = "/exchange/bundles"


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


class Exchange:
    """One member gateway's side of the exchange: pushes, deliveries, receipts, peer authentication, 调阅."""

    def __init__(self, member: Member) -> None:
        """``member``: the parts :func:`gateway.member.build_member` made (its ``store`` is this thread's)."""
        self.member = member
        self.settings = member.settings
        self.holder = member.holder
        self.identity = member.identity
        self.clock = member.clock
        self.transport = member.transport
        self.snapshot_file = member.snapshot_file
        self._local = threading.local()
        self._lanes: Lanes | None = None
        self._lanes_lock = threading.Lock()

    @property
    def store(self) -> Store:
        return self.member.store

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
        return self.member.snapshot()

    # -- push ----------------------------------------------------------------------------

    def endpoint_of(self, uscc: str) -> str:
        """The exchange URL of a member, from the registry snapshot.

        :raises UnknownIssuer: not an active member with an endpoint.
        """
        member = self._snapshot().member(uscc)
        if member is None or not member.endpoint:
            raise UnknownIssuer(f"member {uscc} is not in the registry snapshot or has no endpoint", "destination")
        now = self.clock()
        if not any(mc.valid_at(now) for mc in member.certificates):
            # (its receipts could not be verified here: the report would be taken there and the delivery never
            # counted, tried again and again with a signature error that names no cause)
            raise UnknownIssuer(f"member {uscc} has no certificate in force in the registry snapshot (all ended or "
                                "removed): nothing is sent to it until the authority lists one", "destination")
        # The registry lists a gateway's base URL; its FHIR base (…/fhir) names the same gateway.
        return str(member.endpoint).rstrip("/").removesuffix("/fhir") + EXCHANGE_PATH

    def push(self, bundle_id: str, destination: str) -> int:
        """Queue this member's signed Bundle ``bundle_id`` for ``destination``; returns the outbox id.

        :raises InputError: no signed Bundle with that id was issued here, or the destination is this member.
        :raises UnknownIssuer: the destination is not a member with an endpoint.
        """
        if destination == self.settings.issuer_uscc:
            raise InputError(f"{destination} is this member itself: a report is sent to another member", "--to")
        text = SignedBundles(self.db).latest_issued(bundle_id)
        if text is None:
            raise InputError(f"no signed Bundle {bundle_id} was issued by this gateway", "bundle")
        self._not_superseded(bundle_id, text)
        return self.outbox.enqueue(destination, self.endpoint_of(destination), text)

    def _not_superseded(self, bundle_id: str, text: bytes) -> None:
        """Refuse to send a report version a correction (or the report's taking back) issued here supersedes: a
        member sent it — one the original never went to — would store and recognise what the lab corrected, and
        nothing would follow it there. The current version is named, to be sent instead.

        :raises InputError: naming the report and the Bundle of its current version.
        """
        from gateway.signing.canonical import parse_json
        from gateway.store.reports import version_of, versions_in, versions_of

        try:
            bundle = parse_json(text)
        except Exception:  # noqa: BLE001 - a text this gateway signed and stored: sent as it is
            return
        for v in versions_in(bundle):
            for stored in versions_of(self.db, v["issuer_uscc"], v["report_number"], v["report_code"]):
                if stored.bundle_id != v["bundle_id"] or stored.direction != "issued" or stored.superseded_by is None:
                    continue
                current = version_of(self.db, stored.superseded_by)
                if current is None:
                    continue
                raise InputError(f"Bundle {bundle_id} holds report {v['report_number']}, superseded by "
                                 f"{current.describe()} in Bundle {current.bundle_id}: send that one (a member sent "
                                 "this version would recognise what the lab corrected or took back)", "bundle")

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
        ident = self.member.require_signer().identity
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
                                   peer=delivery.destination, bundle_hash=doc_sha, bundle_id=bundle.get("id"),
                                   bundle=bundle)

        def failed(db: Database, delivery: Delivery, failure: Failure) -> None:
            if delivery.destination.startswith(LANE):  # audited in the referral's own terms
                Referrals(self).failed(db, delivery, failure)
                return
            self._audit_failure(db, delivery, failure)

        return self.outbox.deliver_due(_Behind(used, self._own_certificate_listed), limit=limit,
                                       headers=self.assertion_for, on_receipt=check, on_delivered=delivered,
                                       url_for=url_for, lanes=self.lanes, wait=wait, on_failed=failed)

    def _audit_failure(self, db: Database, delivery: Delivery, failure: Failure) -> None:
        """The sender's audit entry of a push that did not succeed (inside the transaction that records it): the
        Bundle's export to ``delivery.destination`` (DCM 110106, subtype ``bundle-sent``, as a delivered one) with
        its outcome — 4 when the receiver refused it (a 4xx) or it could not be sent, 8 when the receiver could
        not be reached or failed — the reason (``retrying``: its first failure, to be tried again; ``gave-up``:
        its attempts used up; ``refused-by-receiver``, ``not-sent``: dead at once) and a sentence naming the
        outbox record, the attempt and the error, and the patient the Bundle is about."""
        from gateway.audit import records
        from gateway.audit.log import append

        bundle: dict[str, Any] | None = None
        try:
            bundle = parse_json(delivery.payload)
            doc_sha = hashlib.sha256(document_bytes(bundle)).hexdigest()
        except Exception:  # noqa: BLE001 - a payload that does not read still gets its entry, by what was queued
            bundle, doc_sha = None, delivery.payload_sha256
        bundle_id = str(bundle.get("id") or "") if isinstance(bundle, dict) else ""
        outcome = records.Outcome.MINOR_FAILURE if failure.refused else records.Outcome.SERIOUS_FAILURE
        detail = (f"outbox #{delivery.id}, attempt {failure.attempts} of {failure.max_attempts}: {failure.error};"
                  f" {failure.then}")
        append(db, records.exchange(
            "sent", at=self.clock(), gateway=records.Party.member(self.settings.issuer_uscc),
            peer=records.Party.member(delivery.destination), peer_address=urlsplit(delivery.url).netloc or None,
            bundle_hash=f"sha256:{doc_sha}", bundle_id=bundle_id or None,
            outcome=outcome, reason=failure.reason, detail=detail[:1000],
            patient=audit_events.bundle_patient(bundle)))

    def give_back_own(self) -> list[int]:
        """As this process stops (interrupted): every delivery it holds is due again now, its attempts unchanged
        (its lease would hold it until it ends). The ids."""
        given = list(self.outbox.give_back_own())
        if given:
            log.info("%d delivery(ies) on their way as this process stops are due again now", len(given))
        return given

    def _own_certificate_listed(self) -> bool:
        """Whether the registry snapshot in force here vouches for this member's signing certificate now."""
        from gateway.referrals import trust_with_authorities

        if self.identity is None or self.holder is None:
            return False
        try:
            check_certificate(self.identity.chain[0], trust_with_authorities(self.member.snapshot()), self.clock(),
                              location="signing_cert")
        except GatewayError:
            return False
        return True

    def give_back_in_flight(self) -> int:
        """As this sender stops: the deliveries its lanes started and have no answer for are due again now (their
        leases would hold them until they end). How many."""
        lanes = self._lanes
        ids = lanes.in_flight_ids() if lanes is not None else []
        given = self.outbox.give_back(ids) if ids else 0
        if given:
            log.info("%d delivery(ies) on their way as this sender stops are due again now", given)
        return given

    # -- receipts ------------------------------------------------------------------------

    def check_receipt(self, text: bytes, expected_signer: str, *, sent_sha256: str | None) -> dict[str, Any]:
        """Verify a receipt from ``expected_signer``; returns its body with the receiver's ``signature`` (the
        detached JWS over the body's canonical form, without that key): what the outbox keeps, so that this member
        can show an auditor, later, that the receiver took the Bundle (the body alone proved nothing).

        :raises TrustError: not signed by the expected member, or not a receipt.
        """
        body, signer = read_receipt(text, self._snapshot(), self.clock())
        if signer != expected_signer or body.get("receiver") != expected_signer:
            raise TrustError(f"receipt signed by {signer}, expected {expected_signer}", "receipt")
        if sent_sha256 is not None and body.get("sha256") != sent_sha256:
            raise TrustError("receipt is for another Bundle", "receipt")
        return {**body, "signature": parse_json(text)["signature"]}

    # -- receive -------------------------------------------------------------------------

    def authenticate(self, authorization: str) -> str:
        """The calling member's USCC from an ``Authorization: Bearer`` header.

        :raises PeerAuthError: missing or invalid (401). :raises UnknownIssuer: revoked/unknown (403).
        """
        from gateway.exchange.peer_auth import PeerAuthError

        scheme, _, token = authorization.partition(" ")
        try:
            if scheme.lower() != "bearer" or not token:
                raise PeerAuthError("a signed client assertion is required (Authorization: Bearer ...)")
            return verify_assertion(token.strip(), self._snapshot(), audiences=self.audiences(),
                                    now=self.clock(), replay=self.replay)
        except TrustError as exc:  # the operators of both members need the reason: the sender sees it in its outbox
            log.warning("exchange caller refused: %s", exc.message)
            raise

    def audiences(self) -> list[str]:
        """What a peer's assertion may name as its audience: this gateway's exchange at its ``public_url``, and at
        the address the registry lists for it (the one other members address it by), when the two differ (a proxy
        in front of it, a name the registry authority wrote otherwise): either is this member, and no other."""
        own = self.settings.base_url.rstrip("/") + "/exchange"
        try:
            listed = self.endpoint_of(self.settings.issuer_uscc).split("/exchange/")[0] + "/exchange"
        except TrustError:  # not listed (yet): its own address only
            return [own]
        return [own] if listed == own else [own, listed]

    def address_mismatch(self) -> str | None:
        """When the registry lists this member at another address than its ``public_url``: a sentence saying both
        (other members reach it by the registry's, and it takes their calls at either), else None."""
        found = self.audiences()
        if len(found) < 2:
            return None
        return (f"the registry lists this member at {found[1].removesuffix('/exchange')}, while its public_url is "
                f"{found[0].removesuffix('/exchange')}: other members reach it at the registry's address and their "
                "calls are taken at either; if the registry's address is not this gateway, ask the registry authority "
                "to correct it")

    # -- pull (调阅) ----------------------------------------------------------------------

    def record_lookup(self, peer: str, identifier: str, texts: list[bytes], *, server: str, client_address: str,
                      query: str) -> None:
        """Record that ``peer`` looked up (调阅) a patient's results here: one audit entry per patient found, or one
        naming the identifier asked for when nothing was (a member probing which patients are held here leaves a
        trail too)."""
        from gateway.audit.events import patient_identifier
        from gateway.audit.records import Party, PatientRef

        resources = []
        known: dict[str, tuple[str, str] | None] = {}  # patient reference -> the identifier its Bundle gives
        for text in texts:
            for entry in parse_json(text).get("entry", []):
                res = entry.get("resource", {})
                if res.get("resourceType") == "Patient":
                    known[f"Patient/{str(entry.get('fullUrl', '')).rsplit(':', 1)[-1]}"] = patient_identifier(res)
                if res.get("resourceType") == "DiagnosticReport":
                    # stored references are Type/id; the signed copy references urn:uuid
                    subject = res.get("subject", {}).get("reference", "")
                    pid = subject.rsplit(":", 1)[-1]
                    resources.append({"resourceType": "DiagnosticReport", "id": res.get("id"),
                                      "subject": {"reference": f"Patient/{pid}"}})
        asked = audit_events.asked_patient(identifier) or PatientRef(identifier)  # (a system alone: as asked)
        with transaction(self.db):
            audit_events.patient_reads(self.db, at=self.clock(), member=self.settings.issuer_uscc,
                                       server_address=server, client=Party.member(peer),
                                       client_address=client_address, on_behalf_of=peer, resources=resources,
                                       query=query or f"patient.identifier={identifier}", identified=known.get,
                                       asked=[asked])
        log.info("exchange lookup by peer=%s found=%d", peer, len(texts))

    def pull(self, destination: str, identifier: str, transport: Any = None, *, by: str = "",
             refused: list[tuple[str, str]] | None = None) -> list[Any]:
        """调阅: ask ``destination`` for its signed reports of a patient and verify every one.

        ``refused``: where the reports that do not verify go, as (Bundle id, why), the others being returned;
        without it, one that does not verify raises and none is returned.

        The lookup is audited here too, as the member that asked (BALP: the querying side records the query as
        the side that answers does): who asked (``by``, a user; else this gateway), which member, which patient,
        and the reports that came back verified — or that none did, and why (the other member away or refusing,
        a report that does not verify).

        :raises PeerUnavailable: the peer cannot be reached (retry later).
        :raises PeerRejected: the peer refused the request.
        :raises BadSignature / TrustError: a returned Bundle does not verify (nothing is returned then).
        """
        verified: list[Any] = []
        failure: Exception | None = None
        try:
            verified = self._pull(destination, identifier, transport, refused)
            return verified
        except Exception as exc:
            failure = exc
            raise
        finally:
            try:
                self._record_pull(destination, identifier, verified, failure, by, refused or [])
            except Exception as exc:  # noqa: BLE001 - the answer stands; the log says the entry is missing
                log.error("exchange lookup at %s not audited here: %s", destination, type(exc).__name__)
                if failure is None:
                    raise

    def _pull(self, destination: str, identifier: str, transport: Any = None,
              refused: list[tuple[str, str]] | None = None) -> list[Any]:
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
                if check_signer_is_issuer(one) != destination:
                    raise TrustError(f"{destination} returned a report issued by another member", "exchange")
            except TrustError as exc:
                metrics.signature_failed("pull", exc)
                if refused is None:
                    raise
                resource = entry.get("resource") if isinstance(entry, dict) else None
                refused.append((str(resource.get("id") if isinstance(resource, dict) else "?"), exc.message))
                continue
            verified.append(one)
        return verified

    def _record_pull(self, destination: str, identifier: str, verified: list[Any], failure: Exception | None,
                     by: str, refused: list[tuple[str, str]]) -> None:
        """The audit entry of a 调阅 this member made: read at ``destination`` (its gateway), on this member's
        behalf, by ``by`` (or this gateway); one per patient whose reports came back, else one naming each patient
        asked (with the reason it failed, when it did)."""
        from gateway.audit.events import patient_identifier
        from gateway.audit.records import Party, PatientRef

        resources, known = [], {}
        for one in verified:
            for entry in one.bundle.get("entry", []):
                res = entry.get("resource", {})
                if res.get("resourceType") == "Patient":
                    known[f"Patient/{str(entry.get('fullUrl', '')).rsplit(':', 1)[-1]}"] = patient_identifier(res)
                if res.get("resourceType") == "DiagnosticReport":
                    pid = str(res.get("subject", {}).get("reference", "")).rsplit(":", 1)[-1]
                    resources.append({"resourceType": "DiagnosticReport", "id": res.get("id"),
                                      "subject": {"reference": f"Patient/{pid}"}})
        asked = [audit_events.asked_patient(one) or PatientRef(one) for one in identifier.split(",") if one]
        me = self.settings.issuer_uscc
        client = Party.user(me, by) if by else Party.member(me, self.settings.issuer_name)
        query = (f"patient.identifier={identifier}" + (f" (failed: {type(failure).__name__})" if failure else "")
                 + (f" ({len(refused)} report(s) refused: their signature does not verify)" if refused else ""))
        try:
            server = urlsplit(self.endpoint_of(destination)).netloc or destination
        except Exception:  # noqa: BLE001 - a member the snapshot does not list: named by its code
            server = destination
        # BALP outcome: the other member away, a serious failure (8); a refusal or a report that does not verify,
        # a minor one (4): an auditor's outcome= search and the figures see a lookup that gave nothing usable
        from gateway.audit.records import Outcome
        from gateway.errors import PeerUnavailable

        outcome = (Outcome.SERIOUS_FAILURE if isinstance(failure, PeerUnavailable) else
                   Outcome.MINOR_FAILURE if failure is not None or refused else Outcome.SUCCESS)
        with transaction(self.db):
            audit_events.patient_reads(self.db, at=self.clock(), member=destination, server_address=server,
                                       client=client, client_address="", on_behalf_of=me, resources=resources,
                                       query=query, identified=known.get, asked=asked, outcome=outcome,
                                       asked_elsewhere=True)
        log.info("exchange lookup at peer=%s found=%d%s", destination, len(verified),
                 f" failed ({type(failure).__name__})" if failure else "")

    def signed_reports_for(self, identifier: str) -> list[bytes]:
        """This member's own signed Bundles for a patient identifier (``system|value`` or ``value``).

        A bare ``value`` is a national identifier, the 身份证号 (system ``urn:oid:2.16.156.10011.1.3``), and
        matches that system only: never a hospital's own patient numbers (病案号, 门诊号), which a peer could
        otherwise walk through in sequence (``Z1``, ``Z2`` …) to learn which patients are held here.
        ``system|value`` matches an identifier of that system only (``|value``: one without a system); a
        hospital number is asked for with its system. A 身份证号 matches as typed and as the gateway writes it
        (``x`` as ``X``, full-width digits, a 15-digit number widened). ``system|`` (no value) matches nothing.
        """
        from gateway.identifiers import id_card_or_none
        from gateway.naming import SYSTEM_ID_CARD

        system, sep, value = identifier.partition("|")
        if not sep:
            system, value = SYSTEM_ID_CARD, identifier
        if not value:
            return []
        values = [value]
        if system == SYSTEM_ID_CARD:
            number = id_card_or_none(value)
            if number is not None and number != value:
                values.insert(0, number)
        out: list[bytes] = []
        bundles = SignedBundles(self.db)
        for one in values:
            key = f"{system}|{one}"
            # found through the table of issued Bundles' patient identifiers, then checked exactly
            for text, keys in bundles.issued_for_identifier(key):
                if key in jsonutil.loads(keys) and text not in out:
                    out.append(text)
        return out


class _Behind:
    """A transport whose refusals of this member's certificate as "not listed" are tried again while this member's
    own registry snapshot lists it: the receiver's snapshot is older (a renewed certificate, listed in a version it
    has not installed yet), which installing it sets right — the README's retryable case. The delivery went dead at
    its first attempt. A certificate this member's snapshot does not list either (revoked) stays refused for good."""

    def __init__(self, transport: Transport, listed_here: Callable[[], bool]) -> None:
        self.transport, self.listed_here = transport, listed_here

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        result = self.transport.send(url, payload, headers)
        if not result.ok and not result.retryable and result.status in (401, 403) \
                and "not listed in the trust list" in result.error and self.listed_here():
            return SendResult(False, retryable=True, status=result.status, body=result.body,
                              error=f"{result.error} — this member's own registry snapshot lists its certificate: the "
                                    "receiver's is older; tried again until it installs the newer one")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
