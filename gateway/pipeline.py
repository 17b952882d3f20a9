"""Pipeline: the named stages every input goes through, whoever delivers it.

::

    receive -> store raw -> parse -> filter -> map -> build -> check -> store
                              \\-> refused (AE/AR)    \\-> filtered (QC: not an error)

The HTTP API, the MLLP listener and the CLI all call :meth:`Pipeline.ingest`
(or :meth:`Pipeline.convert`, the dry run that stores nothing), so there is
exactly one flow. Raw input is stored before parsing; a duplicate (same
format, sender and message id) is answered with the answer it got the first
time and is not processed again. A CDA document is told apart by its content
as well (:meth:`Pipeline._insert_document`): each request is recorded, a
resend of the same content is answered with the earlier outcome in an answer
built for the resend, a refused document may be sent again, and other content
under a 文档流水号 already stored is refused. Each message ends in one status —
``stored``, ``filtered``, ``refused`` or ``failed`` — recorded with every
issue found, and gets an answer (an HL7 ACK for HL7 v2).

Every message ends alone: whatever goes wrong with one (in any stage, in
building its answer, in recording it) is its own outcome — ``failed``, its
raw input kept and an answer stored saying it can be worked again — and the
other messages of its batch or request get their own answers. A message is
worked under a lease (``processing_lease``); one whose process died before it
finished is worked again at start (:meth:`Pipeline.recover`), by the
background loop of ``gateway serve`` (:meth:`Pipeline.rework_abandoned`), by
the queue reader, or when its sender resends it. An operator works a failed
message — or one whose process died — again with :meth:`Pipeline.retry`
(``gateway messages retry``).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import io
import logging
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import gateway.adapters.hl7v2 as hl7v2_module
import gateway.adapters.labcsv as labcsv_module
import gateway.fhir.bundle as bundle_module
import gateway.fhir.occupational as occupational_module
import gateway.mapping.concepts as concepts_module
from gateway import jsonutil, metrics, native
from gateway.adapters.base import RawUnit, SourceMessage
from gateway.adapters.cda import CDAAdapter, answer_code
from gateway.adapters.cda import explain_issues as explain_cda
from gateway.adapters.hl7v2 import ack_code_for, build_ack, explain_issues
from gateway.config import Settings
from gateway.errors import (
    ConfigError,
    Conflict,
    DatabaseUnavailable,
    GatewayError,
    InputError,
    Issue,
    NotFound,
    ParseError,
    ProfileViolation,
    TrustError,
    UnsupportedFormat,
    shown,
)
from gateway.fhir.bundle import build_bundle, entries_of
from gateway.fhir.outcome import operation_outcome
from gateway.fhir.parties import Issuer
from gateway.logs import code_place, database_fault
from gateway.mapping.concepts import Terminology, map_message
from gateway.mapping.tables import MappingSet
from gateway.member import Member, build_member
from gateway.naming import SYSTEM_ID_CARD, SYSTEM_INSTITUTION, SYSTEM_LOINC
from gateway.store.db import Database, dialect, fault_reason
from gateway.store.postgresql import storage_fault
from gateway.store.reports import versions_in
from gateway.store.store import UNSTORABLE, Store, holder_alive, lease_owner

__all__ = ["Stage", "Status", "Outcome", "Channel", "Pipeline", "ReceiveResult", "ReceiveLater", "SIGNED_FORMAT"]

log = logging.getLogger(__name__)


class Stage(str, enum.Enum):
    """The named stages, in order."""

    RECEIVE = "receive"
    PARSE = "parse"
    FILTER = "filter"
    MAP = "map"
    BUILD = "build"
    CHECK = "check"
    SIGN = "sign"
    DECIDE = "decide"  # a received signed Bundle: recognition for this member
    ANSWER = "answer"
    STORE = "store"


class Status(str, enum.Enum):
    """Where a message ended. Filtered is not failed."""

    STORED = "stored"
    CONVERTED = "converted"  # dry run: good, not stored
    FILTERED = "filtered"
    REFUSED = "refused"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    QUEUED = "queued"  # answered on receipt, stored raw; processed later in arrival order


@dataclass
class Outcome:
    """What became of one unit of input, and the answer to send back."""

    status: Status
    label: str
    ack_code: str = ""
    issues: list[Issue] = field(default_factory=list)
    bundle: dict[str, Any] | None = None
    record_id: int | None = None
    answer: bytes = b""
    message: SourceMessage | None = None
    filtered_reason: str = ""
    signed: bytes | None = None  # the Bundle as signed by this member (when it has a signing key)
    signed_digest: str = ""  # SHA-256 of the signed document bytes
    direction: str = "issued"  # issued here (every source channel), or received from another member (signed)
    signed_bundle: dict[str, Any] | None = None  # received: the Bundle as signed (``bundle`` is without signature)
    decided: Any = None  # received: the recognition decisions, ready to record (gateway.recognition.record.Decided)
    prepared: Any = None  # ``bundle``'s rows as Store.prepare made them before the write lock was taken, or None
    packed: bytes | None = None  # ``signed`` deflated as it is kept (gateway.store.exchange.packed), made beforehand
    #: the answer made again from what storing made of each resource (Channel.answer_stored), replacing ``answer``
    answer_after: Callable[[list[Any]], bytes] | None = None
    #: received: when it was received and decided here (its receipt's ``received``, its audit entries' time)
    received_at: _dt.datetime | None = None

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def retry_later(self) -> bool:
        """A copy sent while its first copy is being worked (two requests at once): not taken now, to be sent again
        shortly (an HTTP 503 with Retry-After, not a refusal). A duplicate of a finished copy says so as
        information, with that copy's answer."""
        return self.status is Status.DUPLICATE and any(i.code == "duplicate" and i.severity == "error"
                                                       for i in self.issues)


#: The stages a channel's compiled twins do (gateway.native): a unit they fail in is worked again by the plain
#: modules; a failure in any later stage (check, sign, answer) is the unit's own, as without the twins.
_TWIN_STAGES = frozenset({Stage.PARSE, Stage.MAP, Stage.BUILD})


@dataclass
class Channel:
    """How one input format is read, mapped, built and answered."""

    format: str
    adapter: Any  # gateway.adapters.base.Adapter
    map: Callable[[SourceMessage], None]
    build: Callable[[SourceMessage], dict[str, Any]]
    answer: Callable[[SourceMessage, str], bytes]
    code_for: Callable[[SourceMessage], str]
    answer_type: str = "x-application/hl7-v2+er7"  # media type of ``answer`` (CDA, CSV: application/fhir+json)
    #: (header-only message, note) -> the answer that a unit is held, for answering on receipt (HL7 v2 only)
    receipt: Callable[[SourceMessage, str], tuple[str, bytes]] | None = None
    #: (message, Bundle, profile problems) -> the problems as the sender's own format names them (HL7 fields)
    explain: Callable[[SourceMessage, dict[str, Any], list[Issue]], list[Issue]] | None = None
    #: the same reading, mapping and building by the compiled twins of their modules (gateway.native), tried
    #: first by Pipeline._work; a unit they fail on is worked again by this channel's own. (Code that replaces
    #: this channel's adapter, map or build replaces them here too, or sets this to None.)
    fast: Channel | None = None
    #: (message, what storing made of each resource: gateway.store.store.Written) -> the answer of a stored unit,
    #: made as its outcome is recorded (a FHIR transaction-response saying which resources were created and which
    #: are new versions); ``answer`` gives it until then and whenever storing fails
    answer_stored: Callable[[SourceMessage, list[Any]], bytes] | None = None


@dataclass
class _Repeat:
    """A request carrying a document an earlier request carried (CDA), stored as message ``id``: ``kind``
    ``duplicate`` (the same content: answered with ``first``'s outcome), ``conflict`` (other content under a
    文档流水号 ``first`` stored) or ``busy`` (``first`` is being worked now). ``where``: the 文档流水号's XPath."""

    id: int
    kind: str
    first: Any  # gateway.store.store.MessageRecord
    where: str = ""


@dataclass
class _Keyed:
    """What tells a unit carrying a document (CDA) apart, read before the write lock is taken: its
    ``key`` (:meth:`gateway.adapters.cda.CDAAdapter.document_key`; None when no document can be read), and
    the content digests of earlier copies under its 文档流水号 stored before digests were kept, read from
    their raw input then too (record id -> digest, empty when unreadable)."""

    key: Any  # gateway.adapters.cda.DocumentKey | None
    earlier: dict[int, str] = field(default_factory=dict)


class ReceiveLater(GatewayError):
    """A pushed Bundle that cannot be answered now (another request is working it); the sender sends it again."""

    code = "transient"
    http_status = 503


#: Channels whose senders name their resources by id (FHIR) or by a number the ids derive from (a CDC export's
#: 体检编号): a Bundle naming another patient's stored resource is refused (Pipeline._same_identities).
_OWN_IDS = ("fhir", "cdc-csv")


class _Clash(Exception):
    """Internal: a submitted Bundle names by id a stored resource that is another patient's, person or test; its
    ``issues`` say which (the Bundle is refused, nothing of it stored)."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__(issues)
        self.issues = issues


class _AlreadyReceived(Exception):
    """Internal: the document was stored by another request first (its message record is ``record_id``)."""

    def __init__(self, record_id: int) -> None:
        super().__init__(record_id)
        self.record_id = record_id


@dataclass
class ReceiveResult:
    """The answer to a pushed signed Bundle."""

    status: int
    receipt: bytes
    duplicate: bool = False
    decisions: list[dict[str, Any]] | None = None


#: The format of signed Bundles received from other members (the exchange's channel).
SIGNED_FORMAT = "fhir-signed"
#: How a refusal of a received Bundle is audited, by its HTTP status.
_REFUSALS = {401: "bad-signature", 403: "unknown-issuer", 400: "invalid", 422: "invalid",
             425: "signed-later"}  # (425: the signer's clock ahead: not an unknown issuer)
Checker = Callable[[dict[str, Any]], list[Issue]]
#: Seconds at most a queue reader waits for the outcome of an earlier message of the same sender before it puts the
#: later one back in the queue (and at most half the processing lease): a reader never looks hung to ``/health``.
TURN_WAIT = 10.0
_BATCH = 32  # units stored and processed per pair of commits when a body or file holds many
#: Statuses of an earlier copy of a document whose outcome answers a resend of the same content.
_ANSWERED = ("stored", "filtered", "failed")
#: Times a message may be taken on without finishing (its process died each time) before it is set aside as failed.
MAX_ATTEMPTS = 3
#: Seconds a batch's resends wait, together, for the live processes that hold their first copies (another node's
#: listener, a background loop taking over a dead node's messages) to record those copies' outcomes, so that they
#: are answered with them rather than asked to retry. Working a message takes milliseconds; common LIS senders wait
#: 5–30 s for an ACK. The batch's other messages are worked and recorded first.
RESEND_WAIT = 3.0
#: Seconds since its holder took a message within which a resend waits for it (a holder that has had it longer is
#: stuck, or on a machine that is gone, and the resend is told to retry at once).
RESEND_FRESH = 5.0
AfterStore = Callable[[Database, Outcome], None]


class Pipeline:
    """One member gateway's processing of inbound results."""

    def __init__(self, settings: Settings, mappings: MappingSet | None = None, *,
                 clock: Callable[[], _dt.datetime] | None = None,
                 checker: Checker | None = None, member: Member | None = None) -> None:
        """``member``: the parts :func:`gateway.member.build_member` made (built here from the settings, the
        mapping tables, clock and checker given, when not given).

        :raises ConfigError: mapping tables, profiles, keys or the registry snapshot are missing or invalid.
        """
        self.settings = settings
        self.member = member or build_member(settings, mappings=mappings, clock=clock, checker=checker)
        self.mappings = self.member.mappings
        self.clock = self.member.clock
        self.issuer = Issuer(settings.issuer_uscc, settings.issuer_name, settings.issuer_miplrn)
        self.checker: Checker | None = self.member.checker
        self.after_store: list[AfterStore] = []
        self.channels: dict[str, Channel] = {}
        self.busy_wait = 20.0  # seconds a received Bundle waits for another request working the same document
        # leases this process could not give up (the database went away meanwhile): given up as soon as it answers
        # again, so that a resend is worked at once rather than answered "being processed" until they expire
        self._unreleased: set[int] = set()
        self._uncounted: set[int] = set()  # of those, the ones a database fault left (their attempt uncounted)
        self.exchange = self._exchange()
        self.add_channel(self._hl7v2_channel())
        self.add_channel(self._cda_channel())
        self.add_channel(self._cdc_csv_channel())
        self.add_channel(self._fhir_channel())
        self.add_channel(self._service_report_channel())

    # -- set-up --------------------------------------------------------------------------

    def _exchange(self) -> Any:
        """Exchange with other members, when keys or a snapshot are configured."""
        from gateway.exchange.service import Exchange

        if self.member.holder is None and self.member.identity is None:
            return None
        return Exchange(self.member)

    def _hl7v2_channel(self) -> Channel:
        structure = self.mappings.structure("hl7v2-oru-r01")

        def parts(hl7: Any, concepts: Any, bundles: Any) -> tuple[Any, Any, Any]:
            """(adapter, map, build) made of these modules: the plain ones, or their compiled twins."""
            adapter = hl7.HL7v2Adapter(structure, default_offset=self.settings.timezone,
                                       max_message_bytes=self.settings.max_message_bytes,
                                       senders=self.mappings.structures.get("hl7v2-senders"))
            terms = concepts.Terminology.for_structure(self.mappings, structure)
            return (adapter, lambda msg: concepts.map_message(msg, terms, self.issuer.uscc),
                    lambda msg: bundles.build_bundle(msg, self.issuer))

        adapter, map_hl7, build = parts(hl7v2_module, concepts_module, bundle_module)
        fields = self.mappings.structures.get("hl7v2-fhir-fields", {})

        def answer(msg: SourceMessage, code: str, note: str | None = None) -> bytes:
            text = build_ack(msg, code, application=self.settings.ack_application,
                             facility=self.settings.issuer_uscc, now=self.clock(), note=note)
            try:
                return text.encode(msg.charset or "utf-8")
            except UnicodeEncodeError:
                # what the sender's character set cannot write (the Chinese of a reason, to an analyser declaring
                # ASCII or a Latin-1 LIS) is '?' in it: the answer stays in the character set its MSH-18 names (it
                # was sent in UTF-8 under that name)
                return text.encode(msg.charset or "utf-8", errors="replace")
            except (ValueError, LookupError):  # an unknown or malformed character set name: UTF-8
                return text.encode("utf-8")

        def receipt(msg: SourceMessage, note: str) -> tuple[str, bytes]:
            # Enhanced acknowledgment mode (MSH-15 set): CA, "commit accept". Original mode has no such code:
            # AA, whose MSA-3 says the message is held and what happens next.
            code = "CA" if msg.header.get("accept_ack_type") else "AA"
            return code, answer(msg, code, note)

        fast = _twin_channel("hl7v2", lambda: Channel(
            "hl7v2", *parts(native.load("gateway.adapters.hl7v2"), native.load("gateway.mapping.concepts"),
                            native.load("gateway.fhir.bundle")), answer=answer, code_for=ack_code_for))
        return Channel(
            format="hl7v2",
            adapter=adapter,
            map=map_hl7,
            build=build,
            answer=answer,
            code_for=ack_code_for,
            receipt=receipt,
            explain=lambda msg, bundle, found: explain_issues(msg, bundle, found, fields),
            fast=fast,
        )

    def _cda_channel(self) -> Channel:
        from gateway.adapters import hl7v3

        structure = self.mappings.structure("cda-wst500-7-lab-report")
        adapter = CDAAdapter(structure, member_uscc=self.settings.issuer_uscc,
                             member_miplrn=self.settings.issuer_miplrn, default_offset=self.settings.timezone,
                             max_document_bytes=self.settings.max_message_bytes)
        terms = Terminology.for_structure(self.mappings, structure)
        xpaths = self.mappings.structures.get("cda-fhir-xpaths", {})

        def issuer_of(msg: SourceMessage) -> Issuer:
            # The custodian issues a CDA report; this member's licence number only when it is this member.
            uscc = msg.extra.get("issuer_uscc", self.issuer.uscc)
            return Issuer(uscc, msg.extra.get("issuer_name") or self.issuer.name,
                          self.issuer.miplrn if uscc == self.issuer.uscc else "")

        def build(msg: SourceMessage) -> dict[str, Any]:
            bundle = build_bundle(msg, issuer_of(msg))
            institution = msg.extra.get("institution_id", "")
            if institution and institution != issuer_of(msg).uscc:
                org = entries_of(bundle, "Organization")[0]
                org["identifier"].append({"system": SYSTEM_INSTITUTION, "value": institution})
            return bundle

        def answer(msg: SourceMessage, code: str) -> bytes:
            # An HL7 v3 message (bare or in SOAP) is acknowledged in kind; a bare document gets an OperationOutcome.
            if msg.extra.get("v3") is not None:
                return hl7v3.acknowledgement(msg, code, sender=self.settings.issuer_uscc, now=self.clock())
            return _outcome_answer(msg, code)

        return Channel(
            format="cda",
            adapter=adapter,
            map=lambda msg: _located(msg, lambda: map_message(msg, terms, issuer_of(msg).uscc)),
            build=build,
            answer=answer,
            code_for=answer_code,
            answer_type="application/fhir+json",  # HL7 v3 messages: see gateway.adapters.hl7v3.answer_media_type
            explain=lambda msg, bundle, found: explain_cda(msg, bundle, found, xpaths, structure),
        )

    def _cdc_csv_channel(self) -> Channel:
        from gateway.mapping.hazards import check_radiation_conclusion

        layouts = [s for s in self.mappings.structures.values() if s.get("format") == "cdc-csv"]

        def parts(csv: Any, concepts: Any, exams: Any) -> tuple[Any, Any, Any]:
            """(adapter, map, build) made of these modules: the plain ones, or their compiled twins."""
            terms = {str(layout["id"]): concepts.Terminology.for_structure(self.mappings, layout)
                     for layout in layouts}
            exam_terms = {str(layout["id"]): exams.ExamTerminology.for_structure(self.mappings, layout)
                          for layout in layouts}
            # factor names that hold a separator (磷化氢、磷化锌、磷化铝) are never cut apart in a cell
            adapter = csv.LabCSVAdapter(layouts, default_offset=self.settings.timezone,
                                        max_exam_bytes=self.settings.max_message_bytes,
                                        factor_names=[n for t in exam_terms.values() for n in t.hazard_factors.names()])

            def map_csv(msg: SourceMessage) -> None:
                layout = msg.extra.get("layout", "")
                if layout not in terms:
                    return  # refused while reading (no layout matched the header)
                _located(msg, lambda: concepts.map_message(msg, terms[layout], self.issuer.uscc))
                exams.map_exam(msg, exam_terms[layout])
                check_radiation_conclusion(msg)

            return adapter, map_csv, lambda msg: exams.build_exam_bundle(msg, self.issuer)

        adapter, map_csv, build = parts(labcsv_module, concepts_module, occupational_module)
        fast = _twin_channel("cdc-csv", lambda: Channel(
            "cdc-csv", *parts(native.load("gateway.adapters.labcsv"), native.load("gateway.mapping.concepts"),
                              native.load("gateway.fhir.occupational")), answer=_outcome_answer,
            code_for=ack_code_for, answer_type="application/fhir+json"))
        return Channel(
            format="cdc-csv",
            adapter=adapter,
            map=map_csv,
            build=build,
            answer=_outcome_answer,
            code_for=ack_code_for,
            answer_type="application/fhir+json",
            explain=adapter.explain,  # profile problems as the exam's row and column
            fast=fast,
        )

    def _service_report_channel(self) -> Channel:
        """职业卫生 / 放射卫生 technical-service reports: a signed PDF with its metadata (JSON or multipart)."""
        from gateway.adapters.servicereport import ServiceReportAdapter
        from gateway.fhir.servicereport import build_service_report_bundle

        adapter = ServiceReportAdapter(member_uscc=self.settings.issuer_uscc,
                                       max_pdf_bytes=self.settings.max_message_bytes)
        return Channel(format="service-report", adapter=adapter, map=lambda msg: None,
                       build=lambda msg: build_service_report_bundle(msg, self.issuer), answer=_outcome_answer,
                       code_for=ack_code_for, answer_type="application/fhir+json")

    def _fhir_channel(self) -> Channel:
        from gateway.adapters.fhirjson import FHIRSubmissionAdapter
        from gateway.naming import sd_url

        adapter = FHIRSubmissionAdapter(max_bytes=self.settings.max_request_bytes)

        def build(msg: SourceMessage) -> dict[str, Any]:
            bundle = dict(msg.extra["bundle"])
            bundle["type"] = "collection"  # stored like every report Bundle; the request parts are not kept
            bundle["entry"] = [{"fullUrl": e.get("fullUrl") or f"urn:uuid:{e['resource']['id']}",
                                "resource": e["resource"]} for e in bundle["entry"]]
            # every submission is held to the report Bundle profile (checked next, like every Bundle we store)
            meta = dict(bundle.get("meta") or {})
            profiles = list(meta.get("profile") or [])
            if not any(str(p).split("|")[0] == sd_url("cyhr-report-bundle") for p in profiles):
                meta["profile"] = profiles + [sd_url("cyhr-report-bundle")]
            bundle["meta"] = meta
            return bundle

        def answer(msg: SourceMessage, code: str) -> bytes:
            if code != "AA":
                return _outcome_answer(msg, code)
            entries = [{"response": {"status": "201 Created",
                                     "location": f"{e['resource']['resourceType']}/{e['resource']['id']}"}}
                       for e in msg.extra["bundle"].get("entry", [])]
            return jsonutil.dumps({"resourceType": "Bundle", "type": "transaction-response",
                                   "entry": entries}).encode("utf-8")

        def answer_stored(msg: SourceMessage, written: list[Any]) -> bytes:
            """Each entry as R4 says a transaction-response gives it: ``201 Created`` for a resource stored for the
            first time, ``200 OK`` for a new version of one stored before or for the same content again (its
            version stays current), with the version's location, ETag and time."""
            became = {(w.type, w.id): w for w in written}
            entries = []
            for e in msg.extra["bundle"].get("entry", []):
                rtype, rid = e["resource"]["resourceType"], e["resource"]["id"]
                w = became.get((rtype, rid))
                if w is None:  # (every resource of a stored Bundle is written: said as the answer made before)
                    entries.append({"response": {"status": "201 Created", "location": f"{rtype}/{rid}"}})
                    continue
                entries.append({"response": {"status": "201 Created" if w.change == "created" else "200 OK",
                                             "location": f"{rtype}/{rid}/_history/{w.version}",
                                             "etag": f'W/"{w.version}"', "lastModified": w.last_updated}})
            return jsonutil.dumps({"resourceType": "Bundle", "type": "transaction-response",
                                   "entry": entries}).encode("utf-8")

        return Channel(format="fhir", adapter=adapter, map=lambda msg: None, build=build, answer=answer,
                       code_for=ack_code_for, answer_type="application/fhir+json", answer_stored=answer_stored)

    def add_channel(self, channel: Channel) -> None:
        """Take another input format (CDA, CDC CSV, ...)."""
        self.channels[channel.format] = channel

    def channel(self, fmt: str) -> Channel:
        """:raises UnsupportedFormat: no channel for this format."""
        try:
            return self.channels[fmt]
        except KeyError:
            raise UnsupportedFormat(f"format {fmt!r} is not supported (supported: {', '.join(sorted(self.channels))})",
                                    "format") from None

    @property
    def store(self) -> Store:
        """This thread's database connection (:attr:`gateway.member.Member.store`)."""
        return self.member.store

    def close(self) -> None:
        self.member.close()

    # -- running -------------------------------------------------------------------------

    def convert(self, data: bytes | IO[bytes], fmt: str, origin: str = "") -> Iterator[Outcome]:
        """Dry run: read, map, build and check every unit of ``data``; store nothing.

        ``data`` may be a binary file object: adapters that can stream (CDC CSV)
        then read it unit by unit, so a large file converts in constant memory.

        :raises UnsupportedFormat: unknown format.
        """
        ch = self.channel(fmt)
        for unit in _units(ch, data, origin):
            yield self._work(ch, unit, record_id=None)

    def ingest(self, data: bytes | IO[bytes], fmt: str, *, channel: str, origin: str = "") -> list[Outcome]:
        """Store and process every unit of ``data`` (bytes or a binary file object); one outcome per unit.

        :raises UnsupportedFormat: unknown format.
        """
        ch = self.channel(fmt)
        outcomes: list[Outcome] = []
        batch: list[RawUnit] = []
        for unit in _units(ch, data, origin):  # a file of many messages: two commits per 32, not per message
            batch.append(unit)
            if len(batch) == _BATCH:
                outcomes += self.ingest_batch(ch, batch, channel=channel)
                batch = []
        if batch:
            outcomes += self.ingest_batch(ch, batch, channel=channel)
        return outcomes

    def ingest_batch(self, ch: Channel, units: list[RawUnit], *, channel: str) -> list[Outcome]:
        """:meth:`ingest_unit` for several units with two commits instead of two per unit.

        The raw units are committed together first (nothing is lost if processing
        fails), each held by this process's lease; then they are processed —
        reading, mapping, checking and signing hold no database lock, so other
        writers go on meanwhile — and every outcome is recorded in one
        transaction, each in a savepoint of its own (one that cannot be recorded
        is recorded as failed, and the others are recorded all the same);
        answers are valid only once this returns, i.e. after both commits. A
        unit repeated within the batch is answered as a duplicate of its first
        copy. A resent unit whose first copy was left unfinished by a process
        that died is taken over and worked now; one whose first copy a live
        process took moments ago waits for that outcome (:meth:`_await_resent`),
        after the batch's other units are recorded, all such units together.
        """
        from gateway.store.db import transaction

        if self._unreleased:
            self._release_pending()
        keys = [self._document_key(ch, unit) for unit in units]  # parsed before the write lock is taken
        if getattr(ch.adapter, "former_id", None) is not None:
            for unit in units:  # (a CSV exam's id is the digest of what it says: worked out before the lock too)
                try:
                    ch.adapter.identify(unit)
                except Exception:  # noqa: BLE001 - said when the unit is stored and read
                    pass
        try:
            with transaction(self.store.db):
                stored = [(unit, *self._insert_raw(ch, unit, channel, keyed=keyed))
                          for unit, keyed in zip(units, keys)]
        except Exception as exc:
            if fault_reason(exc) is not None:
                _doubt(units)
            raise
        held = {record_id for _, record_id, existing in stored if existing is None}  # leases this call holds
        outcomes: list[Outcome] = []
        worked: list[tuple[RawUnit, int]] = []  # (unit, its place in outcomes): recorded here
        copies: list[tuple[int, int]] = []  # (place of a repeat within the batch, place of its first copy)
        first_of: dict[int, int] = {}  # record id -> place of the outcome worked in this batch
        waiting: list[tuple[int, RawUnit, Any]] = []  # (place, unit, first copy) of resends another process works
        fault = False
        try:
            for unit, record_id, existing in stored:
                if existing is not None and existing.id in first_of:  # the same message twice in one batch
                    copies.append((len(outcomes), first_of[existing.id]))
                    outcomes.append(Outcome(Status.DUPLICATE, ""))
                    continue
                if existing is not None:
                    taken = self._resent(ch, unit, existing)
                    if taken is None:  # its first copy is being worked by a live process: waited for below
                        first_of[existing.id] = len(outcomes)
                        waiting.append((len(outcomes), unit, existing))
                        outcomes.append(Outcome(Status.DUPLICATE, ""))
                        continue
                    if isinstance(taken, Outcome):
                        outcomes.append(taken)
                        continue
                    held.add(existing.id)
                    unit, outcome = taken
                else:
                    outcome = self._work(ch, unit, record_id)
                first_of[record_id if existing is None else existing.id] = len(outcomes)
                worked.append((unit, len(outcomes)))
                outcomes.append(outcome)
            self._record_worked(ch, channel, worked, outcomes, held)
            if waiting:  # after the batch's own work is recorded: another process may be waiting for it too
                for record_id in list(held):  # not recorded: free before waiting, for a resend or the next start
                    self._release(record_id)
                    held.discard(record_id)
                worked = []
                deadline = time.monotonic() + RESEND_WAIT  # one wait for the whole batch
                for place, unit, existing in waiting:
                    taken = self._await_resent(ch, unit, existing, deadline)
                    if isinstance(taken, Outcome):
                        outcomes[place] = taken
                        continue
                    held.add(existing.id)
                    unit, outcomes[place] = taken
                    worked.append((unit, place))
                self._record_worked(ch, channel, worked, outcomes, held)
        except Exception as exc:
            fault = fault_reason(exc) is not None  # the database could not take it: the attempt does not count
            raise
        finally:
            for record_id in held:  # not recorded: free at once for a resend or the next start
                self._release(record_id, uncounted=fault)
        for place, first_place in copies:
            first = outcomes[first_place]
            outcomes[place] = Outcome(Status.DUPLICATE, first.label, ack_code=first.ack_code,
                                      record_id=first.record_id, answer=first.answer)
        metrics.count_outcomes(channel, ch.format, outcomes)
        return outcomes

    def _record_worked(self, ch: Channel, channel: str, worked: list[tuple[RawUnit, int]], outcomes: list[Outcome],
                       held: set[int]) -> None:
        """Record the outcomes at the places ``worked`` names, in one transaction; a lease whose message is
        recorded is no longer ``held``."""
        if not worked:
            return
        results = self._record_all([(ch, unit, outcomes[place], channel) for unit, place in worked])
        for (unit, place), (outcome, recorded) in zip(worked, results):
            outcomes[place] = outcome
            if recorded:
                held.discard(outcome.record_id)

    def _record_all(self, worked: list[tuple[Channel, RawUnit, Outcome, str]]) -> list[tuple[Outcome, bool]]:
        """Record worked units (channel, unit, outcome, channel name) in one transaction, each in a savepoint of
        its own (:meth:`_record_safely`): (the outcome recorded, whether anything was) for each.

        The rows of the stored outcomes' Bundles (:meth:`Store.prepare`) and their signed copies as kept
        (deflated) are made before the transaction begins: other writers (the listeners' receipts, other nodes)
        then wait only for the writing. One that cannot be made is left to :meth:`_commit`, whose failure is that
        outcome's own."""
        from gateway.store.db import transaction

        for _, _, outcome, _ in worked:
            self._made_ready(outcome)
        with transaction(self.store.db):
            return [self._record_safely(ch, unit, outcome, channel) for ch, unit, outcome, channel in worked]

    def _made_ready(self, outcome: Outcome) -> Outcome:
        """``outcome`` with what its recording writes made beforehand: the rows of a stored Bundle
        (:meth:`Store.prepare`) and its signed copy as kept (deflated). Made once; what cannot be made is left to
        :meth:`_commit`, whose failure is then that outcome's own."""
        from gateway.store.exchange import packed

        if outcome.status is Status.STORED and outcome.bundle is not None and outcome.prepared is None:
            try:
                outcome.prepared = self.store.prepare(outcome.bundle)
            except Exception:  # noqa: BLE001 - made again inside, where its failure is recorded as the unit's
                outcome.prepared = None
        if outcome.status is Status.STORED and outcome.signed is not None and outcome.packed is None:
            outcome.packed = packed(outcome.signed)
        return outcome

    def _insert_raw(self, ch: Channel, unit: RawUnit, channel: str, status: str = "received", *,
                    keyed: _Keyed | None = None) -> tuple[int, Any]:
        """Store one raw unit; a unit being worked now (``received``) is held by this process's lease.

        A sender or id the database cannot hold (an adapter's mistake) never
        loses the unit: it is stored without them (and so without a duplicate check).
        ``keyed``: the unit's document key, read by :meth:`_document_key` before the caller's transaction
        (read here when not given).
        """
        from gateway.store.db import savepoint

        lease = float(self.settings.processing_lease) if status == "received" else None
        if keyed is None:
            keyed = self._document_key(ch, unit)
        if keyed is not None and keyed.key is not None:
            repeat = self._insert_document(ch, unit, channel, status, lease, keyed)
            if repeat is not None:
                return repeat
        try:
            sender, message_id = ch.adapter.identify(unit)
        except Exception as exc:  # the unit is still stored; its reading will say what is wrong with it
            _log_internal(Stage.RECEIVE, ch, unit.index, None, exc)
            sender, message_id = "", ""
        former = getattr(ch.adapter, "former_id", None)  # (a CSV exam stored by an earlier release: its bytes' id)
        if message_id and former is not None and (old_id := former(unit)) and old_id != message_id \
                and self.store.find_message(ch.format, sender, message_id) is None:
            old = self.store.find_message(ch.format, sender, old_id)
            if old is not None and old.sha256 == hashlib.sha256(unit.data).hexdigest():
                return old.id, old
            old = self._exam_stored_before(ch, unit, message_id)
            if old is not None:
                return old.id, old
        db = self.store.db
        joined = db.conn.in_transaction
        try:
            with savepoint(db, "raw"):
                stored = self.store.insert_raw(channel=channel, fmt=ch.format, sender=sender, message_id=message_id,
                                               origin=unit.origin, raw=unit.data, status=status, lease=lease)
                if stored[1] is not None and message_id and ch.format == "hl7v2":
                    stored = self._other_content(ch, unit, channel, status, lease, sender, message_id, stored)
                return stored
        except UNSTORABLE as exc:
            if (joined and not db.conn.in_transaction) or not (sender or message_id):
                raise
            _log_internal(Stage.RECEIVE, ch, unit.index, None, exc)
        return self.store.insert_raw(channel=channel, fmt=ch.format, sender="", message_id="", origin=unit.origin,
                                     raw=unit.data, status=status, lease=lease)

    def _exam_stored_before(self, ch: Channel, unit: RawUnit, message_id: str) -> Any:
        """A CSV exam an earlier release stored under the digest of its bytes, sent again in another form (other
        line ends, GBK instead of UTF-8, quotes, row order): the stored copy saying the same (its content digest
        worked out again from its raw input), or None. Only the versions of its 体检编号 this member issued are read
        (an indexed lookup, made only for an exam whose id was not found); without this, such a resend was taken
        as a correction of the exam, sent to the members and their decisions withdrawn."""
        from gateway.store.reports import versions_of

        exam = str(unit.meta.get("exam") or "")
        if not exam:
            return None
        for version in versions_of(self.store.db, self.issuer.uscc, exam):
            if version.direction != "issued" or version.message_ref is None:
                continue
            try:
                rec = self.store.get_message(version.message_ref)
            except NotFound:
                continue
            if rec.format != ch.format or rec.message_id == message_id or rec.status not in _ANSWERED:
                continue
            try:
                stored = list(ch.adapter.split_stream(io.BytesIO(self.store.raw_of(rec.id)), rec.origin))
            except Exception:  # noqa: BLE001 - a stored copy that no longer reads is no copy of this one
                continue
            if any(ch.adapter.identify(u)[1] == message_id for u in stored):
                log.info("message format=%s record=%s: the exam stored by an earlier release, sent again in another "
                         "form", ch.format, rec.id)
                return rec
        return None

    def _other_content(self, ch: Channel, unit: RawUnit, channel: str, status: str, lease: float | None,
                       sender: str, message_id: str, stored: tuple[int, Any]) -> tuple[int, Any]:
        """An HL7 v2 message whose sender and control id (MSH-10) were stored before: the same message resent
        (the copy stored with that content, answered with its answer), or other content under the same id — a
        message fixed after it was refused and sent again under its control id, or a sender whose counter started
        again — which is a message of its own: stored under ``id#2``, ``#3``, … (as many as there are) and
        worked, never answered with what became of another message. The same content: the same segments,
        whatever the line ends, and whatever the time of sending (MSH-7), which a sender may write afresh when it
        resends. Each copy stored apart keeps the digest of that content; the first, stored before its id was
        seen twice, is read again to compare."""
        digest, mine = hashlib.sha256(unit.data).hexdigest(), _content_of(unit.data)
        content = hashlib.sha256(b"\r".join(mine)).hexdigest()
        for _ in range(_COPY_ATTEMPTS):
            copies = self.store.messages_keyed(ch.format, sender, message_id)
            for rec in copies:
                if rec.sha256 == digest or rec.content_digest == content or (
                        rec.content_digest is None and _content_of(self.store.raw_of(rec.id)) == mine):
                    return rec.id, rec
            taken = {rec.message_id for rec in copies}
            n = len(copies) + 1
            while f"{message_id}#{n}" in taken:
                n += 1
            record_id, existing = self.store.insert_raw(
                channel=channel, fmt=ch.format, sender=sender, message_id=f"{message_id}#{n}", origin=unit.origin,
                raw=unit.data, status=status, lease=lease, content_digest=content)
            if existing is None:
                log.info("message format=%s record=%s: other content under an id stored before (copy %d)",
                         ch.format, record_id, n)
                return record_id, None
            # another process stored copy n meanwhile: looked at again
        # (still racing after so many tries: stored under a key no other copy can take, never dropped)
        return self.store.insert_raw(channel=channel, fmt=ch.format, sender=sender,
                                     message_id=f"{message_id}#{uuid.uuid4().hex[:12]}", origin=unit.origin,
                                     raw=unit.data, status=status, lease=lease, content_digest=content)

    def _document_key(self, ch: Channel, unit: RawUnit) -> _Keyed | None:
        """What tells a unit carrying a document apart (None: its format carries none), read without the
        write lock: parsing a large document (base64, XML in XML, canonical form) holds up no other writer."""
        if getattr(ch.adapter, "document_key", None) is None:
            return None
        try:
            key = ch.adapter.document_key(unit)
        except Exception as exc:  # stored as any unit is; its reading will say what is wrong with it
            _log_internal(Stage.RECEIVE, ch, unit.index, None, exc)
            return _Keyed(None)
        if key is None:
            return _Keyed(None)
        raw_digest = hashlib.sha256(unit.data).hexdigest()
        earlier = {rec.id: self._digest_of(ch, unit, rec) for rec in
                   self.store.messages_keyed(ch.format, key.sender, key.document_id)
                   if rec.status in _ANSWERED and rec.content_digest is None and rec.sha256 != raw_digest}
        return _Keyed(key, earlier)

    def _digest_of(self, ch: Channel, unit: RawUnit, rec: Any) -> str:
        """The content digest of an earlier copy stored without one, read from its raw input ("" when no
        document can be read from it)."""
        try:
            key = ch.adapter.document_key(RawUnit(self.store.raw_of(rec.id), 1, rec.origin))
        except Exception as exc:
            _log_internal(Stage.RECEIVE, ch, unit.index, rec.id, exc)
            return ""
        return str(key.digest) if key is not None else ""

    def _insert_document(self, ch: Channel, unit: RawUnit, channel: str, status: str,
                         lease: float | None, keyed: _Keyed) -> tuple[int, Any] | None:
        """Store a unit that carries a document (CDA) as a message of its own, and say what earlier requests
        carrying the same 文档流水号 make of it: (id, None) to work it, (id, :class:`_Repeat`) to answer it from
        an earlier outcome; None when it has no readable document (stored as any unit is).

        The document's content decides, not the request's bytes: the same content (in any wrapper) is a
        duplicate of the copy that was stored, filtered or failed; a refused copy is no obstacle (the sender
        fixed the document and sends it again); other content under a 文档流水号 already stored is refused; a
        copy being worked now asks the sender to retry. Each request is stored under the key ``文档流水号``
        (the first) or ``文档流水号#n``, so every request leaves a record. Runs inside the caller's
        transaction, so that no two processes take the same document as new; the document was read before it
        (``keyed``), and earlier copies are compared by the content digest stored with each. A repeat is stored
        as ``duplicate`` at once (under this process's lease, until its outcome is recorded), so that a crash
        before then never has it worked as a new document.
        """
        key = keyed.key
        if key is None:
            return None
        earlier = self.store.messages_keyed(ch.format, key.sender, key.document_id)
        repeat: _Repeat | None = None
        if earlier:
            kept = self._same_content(ch, unit, key.digest, earlier, keyed.earlier)
            kept.sort(key=lambda r: ("stored", "filtered", "failed").index(r.status))
            busy = [r for r in earlier if r.status in ("received", "queued")]
            accepted = [r for r in earlier if r.status == "stored"]
            if kept:
                repeat = _Repeat(0, "duplicate", kept[0], key.where)
            elif busy:
                repeat = _Repeat(0, "busy", busy[-1], key.where)
            elif accepted:
                repeat = _Repeat(0, "conflict", accepted[-1], key.where)
        from gateway.store.db import savepoint

        # the next free key: one past the highest taken (not the count, which a key an earlier release gave out
        # of turn would make collide with a stored request)
        taken = [1 if r.message_id == key.document_id else int(r.message_id.rpartition("#")[2]) for r in earlier]
        message_id = key.document_id if not earlier else f"{key.document_id}#{max(taken) + 1}"
        if repeat is not None:  # never worked as new, not even after a crash: its outcome is decided now
            status = "duplicate"
        db = self.store.db
        joined = db.conn.in_transaction
        try:
            with savepoint(db, "raw"):
                record_id, existing = self.store.insert_raw(
                    channel=channel, fmt=ch.format, sender=key.sender, message_id=message_id, origin=unit.origin,
                    raw=unit.data, status=status, lease=lease, content_digest=key.digest)
        except UNSTORABLE as exc:
            if joined and not db.conn.in_transaction:
                raise
            _log_internal(Stage.RECEIVE, ch, unit.index, None, exc)
            return None
        if existing is not None or repeat is None:
            return record_id, existing
        repeat.id = record_id
        return record_id, repeat

    def _same_content(self, ch: Channel, unit: RawUnit, digest: str, earlier: list[Any],
                      known: dict[int, str]) -> list[Any]:
        """The earlier requests stored, filtered or failed whose document has the content ``digest``: the same
        bytes, or the same digest as stored with the copy (or, for a copy stored without one, in ``known``).
        Only a copy stored without a digest after ``known`` was read — by a process of an earlier release
        beside this one — is read again here."""
        raw_digest = hashlib.sha256(unit.data).hexdigest()
        same = []
        for rec in earlier:
            if rec.status not in _ANSWERED:
                continue  # refused (no obstacle), being worked, or answered from an earlier copy (in the list too)
            if rec.sha256 != raw_digest:
                theirs = rec.content_digest or known.get(rec.id)
                if theirs is None:
                    theirs = self._digest_of(ch, unit, rec)
                if theirs != digest:
                    continue
            same.append(rec)
        return same

    def receive_batch(self, ch: Channel, units: list[RawUnit], *, channel: str) -> list[Outcome]:
        """Accept, then process: hold each unit durably and answer it on receipt (MLLP ``mllp_ack = received``).

        Units whose header reads cleanly are committed as ``queued`` in one
        transaction and answered at once with a receipt (CA in HL7's enhanced
        acknowledgment mode, AA otherwise); :meth:`process_queued` works them
        later, in arrival order, and keeps each one's application ACK with it. A
        unit whose header is already wrong is worked and answered at once, as
        :meth:`ingest_batch` does, so that its sender still learns which field
        is wrong. A resent unit that is already held gets a receipt again.

        :raises UnsupportedFormat: the format cannot answer on receipt (only HL7 v2 can).
        """
        if ch.receipt is None:
            raise UnsupportedFormat(f"format {ch.format!r} cannot be answered on receipt", "format")
        if self._unreleased:
            self._release_pending()
        headers = [self._header(ch, unit) for unit in units]
        held = [i for i, msg in enumerate(headers) if not msg.errors]
        at_once = [i for i, msg in enumerate(headers) if msg.errors]
        from gateway.store.db import transaction

        keys = {i: self._document_key(ch, units[i]) for i in held}  # read before the write lock is taken
        with transaction(self.store.db, poll=True):  # the queue reader's transactions are short: no long sleeps
            stored = [self._insert_raw(ch, units[i], channel, "queued", keyed=keys[i]) for i in held]
        outcomes: list[Outcome | None] = [None] * len(units)
        for i, (record_id, existing) in zip(held, stored):
            msg = headers[i]
            if existing is None:
                code, answer = self._receipt(ch, msg, "received and stored; it is processed next, in order of arrival")
                log.info("message format=%s record=%s status=queued", ch.format, record_id)
                status = Status.QUEUED
            elif existing.ack is not None and existing.ack_code in ("AE", "AR") and \
                    not msg.header.get("accept_ack_type"):
                # worked already and not taken: its application ACK says so (a receipt's AA would say "accepted" of
                # a message that was refused); in enhanced mode the sender asked for a commit ACK, and has it
                record_id, code, answer = existing.id, existing.ack_code, existing.ack
                status = Status.DUPLICATE
            else:
                record_id = existing.id
                code, answer = self._receipt(ch, msg, f"already received (record {existing.id}, {existing.status})")
                status = Status.DUPLICATE
            outcomes[i] = Outcome(status, msg.label(), ack_code=code, record_id=record_id, answer=answer,
                                  message=msg)
        metrics.count_outcomes(channel, ch.format, [o for o in outcomes if o is not None])  # at_once: counted below
        if at_once:
            for i, outcome in zip(at_once, self.ingest_batch(ch, [units[i] for i in at_once], channel=channel)):
                outcomes[i] = self._as_commit_answer(ch, outcome) if headers[i].header.get("accept_ack_type") \
                    else outcome
        return [o for o in outcomes if o is not None]

    def _as_commit_answer(self, ch: Channel, outcome: Outcome) -> Outcome:
        """In enhanced acknowledgment mode (MSH-15 set) a sender answered on receipt is answered at the commit
        level (HL7 v2 2.9.3): a message refused as it arrived — its version, type or character set not taken —
        gets CR (CE for another fault), as the messages it sends before and after get CA; the application ACK
        (AR, AE) is kept with the message (``gateway messages show``). It was answered AR on that connection."""
        code = {"AR": "CR", "AE": "CE", "AA": "CA"}.get(outcome.ack_code or "")
        if code is None or outcome.message is None:
            return outcome
        try:
            answer = ch.answer(outcome.message, code)
        except Exception as exc:  # noqa: BLE001 - the application ACK stands then
            _log_internal(Stage.ANSWER, ch, None, outcome.record_id, exc)
            return outcome
        return dataclasses.replace(outcome, ack_code=code, answer=answer)

    def process_queued(self, limit: int = _BATCH, *, group: int | None = None, in_turn: bool = False,
                       stop: threading.Event | None = None) -> list[Outcome]:
        """Work up to ``limit`` held units, oldest first, recorded ``group`` at a time, each group in one transaction.

        Processing is what :meth:`ingest_unit` does after storing the raw input:
        the application ACK (AA/AE/AR with its ERR segments) is kept with the
        message (``gateway messages show``). Each unit is taken under this
        process's lease, so two readers never work the same one. Besides the
        queue, a message whose worker died before finishing it is taken too; one
        taken on more than :data:`MAX_ATTEMPTS` times without finishing is set
        aside as failed (``gateway messages retry`` works it again).

        ``group`` (default: the ``queue_record_group`` setting): how many worked units are recorded together, in one
        transaction, each in a savepoint of its own (one that cannot be recorded is recorded as failed, and the
        others are recorded all the same, as :meth:`ingest_batch` records). Reading, mapping, checking and
        signing hold no lock; a group holds the write lock while its units are written, so it stays small: the
        listeners' receipts wait for that lock.

        ``in_turn``: several readers work the queue together (``queue_readers``), each taking the next messages
        of any sender; each unit is recorded in its turn, once every earlier message of its sender has its outcome
        (:meth:`_process_in_turn`), so one sender's messages are worked side by side and still recorded in the
        order they came. Without it, a sender's message is not taken while a live process holds an earlier one.
        ``stop``: once set, a unit waiting for its turn goes back to the queue at once (the reader is stopping).
        """
        if self._unreleased:
            self._release_pending()
        if in_turn:
            return self._process_in_turn(limit, group, stop)
        size = max(1, int(self.settings.queue_record_group) if group is None else group)
        outcomes: list[Outcome] = []
        claimed = self.store.claim_queued(limit, float(self.settings.processing_lease), tuple(self.channels))
        worked: list[tuple[Channel, RawUnit, Outcome, str]] = []
        recorded_up_to = 0  # claimed[:recorded_up_to] are recorded (or given up)
        try:
            for n, (record_id, fmt, channel, origin, raw, attempts) in enumerate(claimed):
                ch = self.channel(fmt)
                unit = RawUnit(raw, 1, origin)
                outcome = (self._set_aside(ch, unit, record_id, attempts) if attempts > MAX_ATTEMPTS
                           else self._work(ch, unit, record_id))
                worked.append((ch, unit, outcome, channel))
                if len(worked) >= size or n == len(claimed) - 1:
                    outcomes += self._record_group(worked)
                    worked = []
                    recorded_up_to = n + 1
        except BaseException:  # the database failed: what this call took and did not record is free again at once
            for left in claimed[recorded_up_to:]:
                self._release(left[0])
            raise
        return outcomes

    def _process_in_turn(self, limit: int, group: int | None, stop: threading.Event | None) -> list[Outcome]:
        """:meth:`process_queued` with ``in_turn``: take up to ``limit`` units, work them all (no lock held),
        then record them oldest first, each once its turn has come, up to ``group`` in one transaction. A unit
        whose turn does not come (the earlier message is left to nobody, or still worked after
        :data:`TURN_WAIT`) goes back to the queue with those after it."""
        size = max(1, int(self.settings.queue_record_group) if group is None else group)
        lease = float(self.settings.processing_lease)
        formats = tuple(self.channels)
        began = time.monotonic()
        claimed = self.store.claim_queued(limit, lease, formats, in_turn=True, patience=TURN_WAIT)
        outcomes: list[Outcome] = []
        worked: list[tuple[Channel, RawUnit, Outcome, str]] = []
        pending: list[tuple[Channel, RawUnit, Outcome, str]] = []  # worked, whose turn has come, not recorded yet
        left = 0  # claimed[:left] are recorded (or given up)
        try:
            for record_id, fmt, channel, origin, raw, attempts in claimed:
                ch = self.channel(fmt)
                unit = RawUnit(raw, 1, origin)
                # what its recording writes is made here too, beside the other readers: only the writing waits
                # for the unit's turn
                worked.append((ch, unit, self._set_aside(ch, unit, record_id, attempts) if attempts > MAX_ATTEMPTS
                               else self._made_ready(self._work(ch, unit, record_id)), channel))
            # a turn is awaited TURN_WAIT from now, and never past half the lease the units are held under
            deadline = min(time.monotonic() + TURN_WAIT, began + lease / 2)
            for n, item in enumerate(worked):
                record_id = claimed[n][0]
                mine = frozenset(c[0] for c in claimed[n - len(pending):n])
                came = self._turn_came(record_id, formats, mine, None)
                if not came and pending:
                    outcomes += self._record_group(pending)  # what may be recorded now, before waiting
                    pending, left = [], n
                if not came and not self._turn_came(record_id, formats, frozenset(), deadline, stop):
                    self.store.give_back([c[0] for c in claimed[n:]])
                    return outcomes
                pending.append(item)
                if len(pending) >= size or n == len(worked) - 1:
                    outcomes += self._record_group(pending)
                    pending, left = [], n + 1
        except BaseException:  # the database failed: what this call took and did not record goes back to the queue
            try:  # (queued, not left "received" for the background's rework, which would record it out of turn)
                self.store.give_back([c[0] for c in claimed[left:]])
            except Exception:  # noqa: BLE001 - the database is gone: the leases are given up, or expire
                for unfinished in claimed[left:]:
                    self._release(unfinished[0])
            raise
        return outcomes

    def _turn_came(self, record_id: int, formats: tuple[str, ...], mine: frozenset[int],
                   deadline: float | None, stop: threading.Event | None = None) -> bool:
        """Whether message ``record_id`` may be recorded now: no earlier message of its sender is without an
        outcome, those in ``mine`` (recorded before it, in the same transaction) aside. With a ``deadline``, wait
        while a live process works the earlier one (until then, or ``stop``); without, answer at once. False when
        the earlier one is left to nobody (waiting in the queue, or its holder died): it is to be taken first."""
        pause = 0.0005
        while True:
            earlier = self.store.earlier_unfinished(record_id, formats, mine)
            if earlier is None:
                return True
            if deadline is None or not holder_alive(earlier[1], earlier[2], self.store.epoch()):
                return False
            if stop is not None and stop.is_set():
                return False
            if time.monotonic() > deadline:
                log.warning("message record=%s waited too long for the outcome of record=%s, from the same sender "
                            "(worked by %s); it goes back to the queue", record_id, earlier[0], earlier[1])
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.001)  # (the earlier one's recording takes a few ms: a longer nap is lost time)

    def _record_group(self, worked: list[tuple[Channel, RawUnit, Outcome, str]]) -> list[Outcome]:
        """Record worked queued units in one transaction (see :meth:`process_queued`); a unit that could not be
        recorded has its lease given up."""
        outcomes = []
        for (ch, _, outcome, channel), (done, recorded) in zip(worked, self._record_all(worked)):
            if not recorded and outcome.record_id is not None:
                self._release(outcome.record_id)
            outcomes.append(done)
            metrics.count_outcomes(channel, ch.format, (done,))
        return outcomes

    def ingest_unit(self, ch: Channel, unit: RawUnit, *, channel: str) -> Outcome:
        """Store one unit raw, then process it (or answer it as a duplicate)."""
        return self.ingest_batch(ch, [unit], channel=channel)[0]

    def recover(self) -> int:
        """At start-up, before any listener or reader runs: work again every message that a process which
        stopped (killed, crashed) left unfinished, from its raw bytes, and record its real outcome.

        Messages still held by a live process are left to it; messages waiting
        in the queue are the queue reader's. Returns how many were worked.
        """
        formats = tuple(self.channels)
        self.store.fail_in_flight(keep=formats)  # what only other parts work (received exchange Bundles)
        done = 0
        for record_id in self.store.abandoned(formats, limit=100_000):
            if self.store.earlier_unfinished(record_id, formats) is not None:
                continue  # its turn comes after an earlier message of its sender (the queue's, or still worked)
            outcome = self._rework(record_id)
            if outcome is not None:
                done += 1
                log.info("message record=%s interrupted by the last stop, worked again: %s", record_id,
                         outcome.status.value)
        return done

    def rework_abandoned(self, limit: int = 50, seconds: float = 5.0) -> int:
        """Work again messages whose process died before it finished them (killed, crashed) or whose lease
        expired, oldest first, while the gateway runs: at most ``limit`` of them and no more once ``seconds``
        have passed, so that the background loop's other work is never starved. A message a live process
        holds is left to it. Returns how many were worked.
        """
        done = 0
        deadline = time.monotonic() + seconds
        formats = tuple(self.channels)
        for record_id in self.store.abandoned(formats, limit=limit):
            if time.monotonic() > deadline:
                break
            if self.store.earlier_unfinished(record_id, formats) is not None:
                continue  # recorded in its turn: after the earlier messages of its sender (a reader's, the queue's)
            outcome = self._rework(record_id)
            if outcome is not None:
                done += 1
                log.warning("message record=%s left unfinished by a process that is gone, worked again: %s",
                            record_id, outcome.status.value)
        return done

    def retry(self, record_id: int, user: str) -> Outcome:
        """Work a message again from its raw bytes (an operator's retry): a failed one, or one left unfinished
        by a process that is gone (or whose lease expired); the new outcome is recorded with an audit entry
        naming ``user`` and the old and new status.

        :raises NotFound: no such message.
        :raises InputError: the message is neither failed nor left unfinished, is not one the pipeline works,
            or is being worked now.
        """
        rec = self.store.get_message(record_id)
        if rec.status == "received" and holder_alive(rec.lease_owner, rec.lease_until, self.store.epoch()):
            raise InputError(f"message {record_id} is being worked by process {rec.lease_owner} now; try again "
                             "later", "messages.id")
        if rec.status not in ("failed", "received"):
            raise InputError(f"message {record_id} is {rec.status}, not failed: only failed messages and "
                             "messages left unfinished by a process that is gone are worked again", "messages.status")
        if rec.format not in self.channels:
            raise InputError(f"message {record_id} is a {rec.format} message, which is not worked again here",
                             "messages.format")
        outcome = self._rework(record_id, retried_by=user or "cli")
        if outcome is None:
            raise InputError(f"message {record_id} is being worked by another process now; try again later",
                             "messages.id")
        return outcome

    def _rework(self, record_id: int, *, retried_by: str | None = None) -> Outcome | None:
        """Take a stored message (unless a live process holds it), work it again and record the outcome."""
        rec = self.store.take(record_id, float(self.settings.processing_lease), retry=retried_by is not None)
        if rec is None:
            return None
        try:
            ch = self.channel(rec.format)
            unit = RawUnit(self.store.raw_of(record_id), 1, rec.origin)
            if retried_by is None and rec.attempts > MAX_ATTEMPTS:
                outcome = self._set_aside(ch, unit, record_id, rec.attempts)
            else:
                outcome = self._work(ch, unit, record_id)
            retried = (retried_by, rec.status) if retried_by is not None else None
            outcome, recorded = self._record_safely(ch, unit, outcome, rec.channel, retried)
        except BaseException as exc:
            # a database that could not take the outcome (a full disk, the server away) is no process that died on
            # the message: the attempt does not count towards setting it aside (it was set aside as "taken on 8
            # times without finishing" after a disk filled up, and its resends were answered AE)
            self._release(record_id, uncounted=isinstance(exc, Exception) and fault_reason(exc) is not None)
            raise
        if not recorded:
            self._release(record_id)
        metrics.count_outcomes(rec.channel, rec.format, (outcome,))  # worked again: it ends again
        return outcome

    def _resent(self, ch: Channel, unit: RawUnit, existing: Any) -> Outcome | tuple[RawUnit, Outcome] | None:
        """The answer to a resent unit, or — when its first copy was left unfinished by a process that died —
        that copy taken over and worked: (its stored unit, its outcome, to be recorded by the caller); None when
        a live process works the first copy now (:meth:`_await_resent` says what then).
        A request repeating a document (:class:`_Repeat`) is answered for itself and recorded as its own
        message."""
        if isinstance(existing, _Repeat):
            return unit, self._repeat(ch, unit, existing)
        if existing.ack is not None:
            log.info("duplicate format=%s record=%s status=%s", ch.format, existing.id, existing.status)
            return self._sent_before(ch, unit, existing)
        mine = _doubted(existing)
        rec = self.store.take(existing.id, float(self.settings.processing_lease), mine=mine)
        if rec is None:
            return None
        if mine:
            log.info("message format=%s record=%s: stored by this process although the database's answer was lost "
                     "(its connection ended); its resend takes it on", ch.format, existing.id)
            _DOUBTFUL.pop(existing.sha256, None)
        return self._taken_over(ch, unit, rec)

    def _sent_before(self, ch: Channel, unit: RawUnit, first: Any) -> Outcome:
        """The answer to a unit whose identical copy was answered before: that first answer (``first.ack``), and for
        the answers that list units (CSV exams, HTTP outcomes) the unit named as its answer names it, a note that
        it was sent before and the first copy's issues. (A resent CSV file whose exam was refused answered 422 with
        "B2#d577a75ebe033b12: duplicate" and nothing of why.)"""
        header = self._header(ch, unit)
        label = header.label() if header.extra.get("label") or header.message_id else (
            first.message_id.partition("#")[0] or f"unit {unit.index}")
        when = str(first.received_at)[:19].replace("T", " ")
        note = Issue("information", "duplicate", "", f"sent before: received on {when} (message {first.id}) and "
                     f"{first.status}; not processed again, its outcome follows", "0")
        earlier = [Issue(str(i.get("severity", "error")), str(i.get("code", "")), str(i.get("location", "")),
                         str(i.get("message", ""))) for i in first.issues or []]
        return Outcome(Status.DUPLICATE, label, ack_code=first.ack_code or "", record_id=first.id,
                       answer=first.ack, filtered_reason=first.status, issues=[note, *earlier])

    def _taken_over(self, ch: Channel, unit: RawUnit, rec: Any) -> tuple[RawUnit, Outcome]:
        """A message left unfinished, now held by this process: (its stored unit, its outcome)."""
        log.info("message format=%s record=%s left unfinished (%s), taken over: attempt %d", ch.format, rec.id,
                 rec.status, rec.attempts)
        stored = RawUnit(self.store.raw_of(rec.id), unit.index, rec.origin or unit.origin)
        if rec.attempts > MAX_ATTEMPTS:
            return stored, self._set_aside(ch, stored, rec.id, rec.attempts)
        return stored, self._work(ch, stored, rec.id)

    def _await_resent(self, ch: Channel, unit: RawUnit, existing: Any,
                      deadline: float) -> Outcome | tuple[RawUnit, Outcome]:
        """The answer to a resent unit whose first copy a live process works: when that process took it moments
        ago (another node's listener, a background loop taking a killed node's messages over: working a message
        takes milliseconds), its outcome once recorded, waiting until ``deadline`` (monotonic) at most; the
        copy taken over when its holder dies or gives it up meanwhile; otherwise "being processed; retry later",
        at once for a holder that has had it for longer (stuck, or on a machine that is gone). No transaction is
        open while this waits."""
        lease = float(self.settings.processing_lease)
        pause = 0.02
        while True:
            now = self.store.get_message(existing.id)
            if now.ack is not None:
                log.info("duplicate format=%s record=%s status=%s (its holder finished it)", now.format, now.id,
                         now.status)
                return self._sent_before(ch, unit, now)
            epoch = self.store.epoch()
            if not holder_alive(now.lease_owner, now.lease_until, epoch):
                rec = self.store.take(existing.id, lease)
                if rec is not None:
                    return self._taken_over(ch, unit, rec)
            elif now.lease_until is None or epoch - (float(now.lease_until) - lease) > RESEND_FRESH:
                break  # held for a while already: not worth waiting for
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.2)
        return self._busy(ch, unit, existing)

    def _repeat(self, ch: Channel, unit: RawUnit, repeat: _Repeat) -> Outcome:
        """The outcome of a request repeating a document, with its answer built for this request (its own
        message id, envelope and media type): the earlier outcome (duplicate), a refusal (other content
        under a 文档流水号 already stored) or retry later (the earlier copy is being worked now)."""
        try:
            msg = ch.adapter.read(unit)
        except Exception as exc:
            _log_internal(Stage.PARSE, ch, unit.index, repeat.id, exc)
            failed = self._failed(ch, None, Stage.PARSE)
            failed.record_id = repeat.id
            failed.answer = self._answer(ch, failed)
            return failed
        first = repeat.first
        label = getattr(ch.adapter, "document_label", "文档流水号")
        hint = getattr(ch.adapter, "correction_hint", "a correction is a new document with relatedDocument RPLC "
                                                      "naming it")
        document = first.message_id.partition("#")[0] if ch.format == "fhir" else (
            msg.message_id or first.message_id.partition("#")[0])
        when = first.received_at[:19].replace("T", " ")
        if repeat.kind == "conflict":
            issue = Issue("error", "conflict", repeat.where,
                          f"{label} {shown(document)} was accepted on {when} (message {first.id}) with other "
                          f"content; {hint}", "205")
            msg.issues = [issue]
            status, code = Status.REFUSED, "AE"
        elif repeat.kind == "busy":
            issue = Issue("error", "duplicate", repeat.where,
                          f"{label} {shown(document)} is being processed now (message {first.id}); retry later",
                          "205")
            msg.issues = [issue]
            status, code = Status.DUPLICATE, "AE"
        else:
            note = Issue("information", "duplicate", repeat.where,
                         f"{label} {shown(document)} with the same content was received on {when} (message "
                         f"{first.id}) and {first.status}: not processed again; its outcome follows", "0")
            earlier = [Issue(str(i.get("severity", "error")), str(i.get("code", "")), str(i.get("location", "")),
                             str(i.get("message", ""))) for i in first.issues]
            msg.issues = [note, *earlier]
            status, code = Status.DUPLICATE, first.ack_code or ch.code_for(msg)
        msg.filtered = ""
        log.info("duplicate format=%s record=%s of record=%s: %s", ch.format, repeat.id, first.id, repeat.kind)
        outcome = Outcome(status, msg.label(), ack_code=code, issues=list(msg.issues), record_id=repeat.id,
                          message=msg, filtered_reason=first.status if repeat.kind == "duplicate" else "")
        outcome.answer = self._answer(ch, outcome)
        if repeat.kind == "duplicate" and ch.answer_stored is not None and first.status == "stored" and first.ack:
            outcome.answer = first.ack  # what storing it made of each resource, as the first copy was answered
        return outcome

    def _busy(self, ch: Channel, unit: RawUnit, existing: Any) -> Outcome:
        """The answer while another live process works the first copy: retry later."""
        msg = self._header(ch, unit)
        where = "MSH[1]-10" if ch.format == "hl7v2" else "identifier"
        issue = Issue("error", "duplicate", where,
                      f"a message with this id is already being processed (record {existing.id}); "
                      "retry later", "205")
        msg.issues = [issue]
        label = f"{existing.message_id}" if existing.message_id else f"unit {unit.index}"
        outcome = Outcome(Status.DUPLICATE, label, ack_code="AE", issues=[issue], record_id=existing.id, message=msg)
        outcome.answer = self._answer(ch, outcome)
        return outcome

    def _set_aside(self, ch: Channel, unit: RawUnit, record_id: int, attempts: int) -> Outcome:
        """A message taken on again and again without finishing (each time its process died): failed, kept."""
        msg = self._header(ch, unit)
        issue = Issue("error", "exception", "", f"taken on {attempts - 1} times without finishing (the gateway "
                      "stopped each time); the message is kept and can be worked again (gateway messages retry)",
                      "207")
        msg.issues = [issue]
        outcome = Outcome(Status.FAILED, msg.label(), ack_code="AE", issues=[issue], message=msg,
                          record_id=record_id)
        outcome.answer = self._answer(ch, outcome)
        return outcome

    def _header(self, ch: Channel, unit: RawUnit) -> SourceMessage:
        """What an answer needs of a unit, read without failing: its header (HL7 v2) or the unit as read."""
        try:
            read = getattr(ch.adapter, "read_header", None) or ch.adapter.read
            msg: SourceMessage = read(unit)
            return msg
        except Exception as exc:
            _log_internal(Stage.PARSE, ch, unit.index, None, exc)
            msg = SourceMessage(format=ch.format)
            msg.issues = [Issue("error", "exception", "", "internal error in the gateway while reading the "
                                "message; it is kept and can be worked again", "207")]
            return msg

    def _work(self, ch: Channel, unit: RawUnit, record_id: int | None) -> Outcome:
        """Read, filter, map, build, check and sign one unit, and make its answer; writes nothing (see
        :meth:`_record`). Never raises: a failure in any stage is the unit's own ``failed`` outcome.

        With the compiled twins built (:mod:`gateway.native`), they read, map and build the unit first; should
        they fail on it in any way, the channel's own modules work it again from its raw input, and theirs is
        the unit's outcome: the twins are faster, never different."""
        if ch.fast is not None:
            outcome = self._work_on(ch, ch.fast, unit, record_id)
            if outcome is not None:
                return outcome
        outcome = self._work_on(ch, ch, unit, record_id)
        assert outcome is not None
        return outcome

    def _work_on(self, ch: Channel, parts: Channel, unit: RawUnit, record_id: int | None) -> Outcome | None:
        """:meth:`_work` with ``parts``' reading, mapping and building (``ch``'s own or its twins'); with the
        twins, None instead of a failed outcome."""
        msg: SourceMessage | None = None
        stage = Stage.PARSE
        watch = metrics.Stopwatch(held=parts is not ch)  # (the twins' laps count once the unit is theirs)
        try:
            msg = parts.adapter.read(unit)
            watch.lap(Stage.PARSE)
            outcome = Outcome(Status.REFUSED, msg.label(), message=msg)
            if msg.filtered:
                outcome.status, outcome.filtered_reason = Status.FILTERED, msg.filtered
            elif not msg.errors:
                stage = Stage.MAP
                if record_id is not None and ch.format == "cdc-csv":
                    self._exam_sent_again(msg)
                parts.map(msg)
                if record_id is not None and ch.format == "hl7v2" and not msg.errors:
                    self._panel_keys(msg)
                watch.lap(Stage.MAP)
                if not msg.errors:
                    stage = Stage.BUILD
                    bundle = parts.build(msg)
                    watch.lap(Stage.BUILD)
                    stage = Stage.CHECK
                    if self.checker is not None:
                        found = self.checker(bundle)
                        msg.issues.extend(ch.explain(msg, bundle, found) if ch.explain and found else found)
                        watch.lap(Stage.CHECK)
                    if not msg.errors:
                        outcome.bundle = bundle
                        outcome.status = Status.STORED if record_id is not None else Status.CONVERTED
                        if record_id is not None:
                            corrects = msg.extra.get("corrects")
                            if corrects is not None:  # (said once it is stored: a CDC exam sent again, changed)
                                label = str(msg.extra.get("label") or "the exam")
                                msg.issues.append(Issue(
                                    "information", "informational", msg.reports[0].location if msg.reports else "",
                                    f"{label} was stored before with other content: this exam corrects it (the "
                                    "members it was sent to are sent this one)", "0"))
                            msg.issues.extend(self._results_left_out(bundle, corrects, msg if ch.format == "hl7v2"
                                                                     else None))
                            if ch.format == "cda" or msg.extra.get("number_stored"):
                                msg.issues.extend(self._not_current(bundle, msg))
                            if ch.format == "cda":
                                msg.issues.extend(self._stored_beside(bundle, msg))
                        if record_id is not None and self.member.signer is not None:
                            # sign stage: what this member issues leaves it signed, with its marks
                            stage = Stage.SIGN
                            if self.member.marks is not None:
                                self.member.marks.stamp(bundle)
                            outcome.signed, outcome.signed_digest = self.member.signer.sign_with_digest(bundle)
                            watch.lap(Stage.SIGN)
            stage = Stage.ANSWER
            outcome.issues = list(msg.issues)
            outcome.ack_code = ch.code_for(msg)
        except Exception as exc:  # a bug must not lose the message or reach the sender as a stack trace
            if parts is not ch and stage in _TWIN_STAGES:
                _twins_stepped_aside(ch, stage, unit, exc)
                return None
            if isinstance(exc, (ConfigError, TrustError)):  # this gateway's own setup: its signing certificate or
                # registry snapshot expired (what the error says names no patient): said, not a bug
                log.error("stage %s of %s unit %s (record %s) cannot be done: %s", stage.value, ch.format,
                          unit.index, record_id, exc.message)
                outcome = self._failed(ch, msg, stage, f"this gateway cannot {_STAGE_VERBS.get(stage, 'go on')}: "
                                                       f"{exc.message}")
            else:
                _log_internal(stage, ch, unit.index, record_id, exc)
                outcome = self._failed(ch, msg, stage)
        watch.record()
        outcome.record_id = record_id
        outcome.answer = self._answer(ch, outcome)
        if ch.answer_stored is not None and outcome.status is Status.STORED and outcome.message is not None:
            outcome.answer_after = functools.partial(ch.answer_stored, outcome.message)
        return outcome

    def _results_left_out(self, bundle: dict[str, Any], corrects: str | None = None,
                          message: SourceMessage | None = None) -> list[Issue]:
        """A warning for each report of ``bundle`` stored before (the same report, so the same id) whose stored
        version lists results this copy does not: the report is stored again with this copy's results alone, and
        the others stay stored as they were, listed by no current report — an export re-sent with fewer rows, a
        message with fewer OBX. Nothing is changed; the sender is told which results are no longer in the report.
        Read without the write lock (a warning: another copy recorded meanwhile may make it out of date); a
        database that cannot be read for it leaves it out."""
        entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        reports = [e["resource"] for e in entries if e["resource"].get("resourceType") == "DiagnosticReport"
                   and isinstance(e["resource"].get("id"), str)]
        if not reports:
            return []
        try:
            if corrects is not None and len(reports) == 1:  # a CDC exam correcting the version stored before
                return self._items_left_out(bundle, reports[0], corrects)
            stored = {r.get("id"): r for r in self.store.read_many([f"DiagnosticReport/{r['id']}" for r in reports])}
            if not stored:  # (a report not stored before: the common case, one indexed lookup)
                return []
            local = {e.get("fullUrl"): f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}"
                     for e in entries}
            numbers = {v["report_ref"]: v["report_number"] for v in versions_in(bundle)}
            issues: list[Issue] = []
            for report in reports:
                before = stored.get(report["id"])
                if before is None:
                    continue
                now = {local.get(ref, ref) for ref in _result_refs(report)}
                gone = [ref for ref in _result_refs(before) if ref not in now]
                if not gone:
                    continue
                named = {f"Observation/{o.get('id')}": _result_name(o) for o in self.store.read_many(gone)}
                names = [named.get(ref) or ref for ref in gone]
                shown = _names_shown(names)
                number = numbers.get(f"DiagnosticReport/{report['id']}", "")
                # an HL7 v2 report's warning names its OBR-3 (ERR-2): the field the number was read from
                facts = next((r for r in message.reports if r.number == number), None) if message else None
                issues.append(Issue(
                    "warning", "business-rule", f"{facts.location}-3" if facts is not None
                    else f"report {number}" if number else "DiagnosticReport",
                    f"{f'(report {number}) ' if facts is not None else ''}was stored before with "
                    f"{len(_result_refs(before))} results; this copy leaves out {len(gone)} "
                    f"of them: {shown}. They stay stored as they were, but no current report lists them (the "
                    f"earlier version: DiagnosticReport/{report['id']}/_history/"
                    f"{(before.get('meta') or {}).get('versionId', '')}). If they still hold, send the report again "
                    "with them in a new message (HL7 v2: a new MSH-10); a copy identical to one stored before (the "
                    "same message, the same CSV exam) is answered as that copy's duplicate and changes nothing",
                    "205"))
            return issues
        except Exception as exc:  # noqa: BLE001 - only a warning: the unit is worked and stored without it
            log.warning("results left out of a report stored before could not be looked for: %s", type(exc).__name__)
            return []

    def _not_current(self, bundle: dict[str, Any], msg: SourceMessage) -> list[Issue]:
        """A warning for each report of ``bundle`` that a stored correction or cancellation of it supersedes (a final
        report sent again after its correction, or after it was taken back): it is stored as an earlier version,
        and no search, 调阅 or decision takes it. It was answered with a plain AA, and its sender took it as live.
        Read without the write lock (a warning); a database that cannot be read for it leaves it out."""
        from gateway.store.reports import superseded_in

        try:
            found = superseded_in(self.store.db, bundle)
        except Exception as exc:  # noqa: BLE001 - only a warning
            log.warning("whether a stored correction supersedes a report could not be read: %s", type(exc).__name__)
            return []
        issues: list[Issue] = []
        for report_id, current in found.items():
            number = report_id.rpartition("|")[2]
            facts = next((r for r in msg.reports if r.number == number), None)
            where = (f"{facts.location}-3" if msg.format == "hl7v2" else facts.location) if facts is not None \
                else f"report {number}"
            issues.append(Issue(
                "warning", "business-rule", where,
                f"report {number} is superseded by {current}, stored before: this copy is stored as an earlier "
                "version, and searches, 调阅 and decisions take the current one. To change the report, send a "
                "correction of it (HL7 v2: OBR-25 C) after that one", "205"))
        return issues

    def _stored_beside(self, bundle: dict[str, Any], msg: SourceMessage) -> list[Issue]:
        """CDA: a warning for a report whose 检验报告单号 (and test) another document of this member holds current, not
        replaced by this one (a new 文档流水号 without relatedDocument RPLC: a LIS issuing the report again). Both
        stay current, two final versions of one report side by side, and both can be recognised; it went by
        without a word. Read without the write lock (a warning)."""
        from gateway.store.reports import versions_in, versions_of

        issues: list[Issue] = []
        try:
            for version in versions_in(bundle):
                if version["issuer_uscc"] != self.issuer.uscc or version["replaces"] or version["status"] in (
                        "corrected", "amended", "cancelled", "entered-in-error"):
                    continue  # (a correction, or a report taken back, supersedes what it replaces)
                beside = [v for v in versions_of(self.store.db, self.issuer.uscc, version["report_number"],
                                                 version["report_code"])
                          if v.direction == "issued" and v.superseded_by is None and v.bundle_key !=
                          version["bundle_key"] and (v.status or "") not in ("cancelled", "entered-in-error")]
                if not beside:
                    continue
                facts = next((r for r in msg.reports if r.number == version["report_number"]), None)
                where = (f"{facts.location if facts else '/ClinicalDocument'}/recordTarget/patientRole/"
                         "id[@root='2.16.156.10011.1.33']/@extension")
                issues.append(Issue(
                    "warning", "business-rule", where,
                    f"检验报告单号 {version['report_number']} is held current by another document of this member "
                    f"({beside[-1].describe()}): this one is stored beside it, two final versions of one report. "
                    "A document that replaces another names it in relatedDocument RPLC", "205"))
        except Exception as exc:  # noqa: BLE001 - only a warning
            log.warning("other documents of a report number could not be looked for: %s", type(exc).__name__)
        return issues

    def _items_left_out(self, bundle: dict[str, Any], report: dict[str, Any], corrects: str) -> list[Issue]:
        """A warning naming the items of the version a CDC exam corrects that the correction lists no more (an
        export of the changed rows alone would leave the exam's other items out of the current report)."""
        def codes(observation: dict[str, Any]) -> str:
            code = observation.get("code")
            codings = code.get("coding") if isinstance(code, dict) else None
            first = next((c for c in codings or [] if isinstance(c, dict)), {})
            return f"{first.get('system', '')}|{first.get('code', '')}"

        found = self.store.read_many([corrects])
        if not found:
            return []
        before = found[0]
        local = {e.get("fullUrl"): e["resource"] for e in bundle.get("entry") or [] if isinstance(e, dict)}
        now = {codes(o) for o in (local.get(ref) for ref in _result_refs(report)) if isinstance(o, dict)}
        earlier = self.store.read_many(_result_refs(before))
        gone = [_result_name(o) for o in earlier if codes(o) not in now]
        if not gone:
            return []
        shown = _names_shown(gone)
        number = next((v["report_number"] for v in versions_in(bundle)), "")
        return [Issue("warning", "business-rule", f"report {number}" if number else "DiagnosticReport",
                      f"corrects a version with {len(earlier)} results and leaves out {len(gone)} of them: {shown}. "
                      f"The corrected version lists only this export's (the earlier one stays readable: {corrects}); "
                      "if they still hold, export the exam again with all its rows", "205")]

    def _exam_sent_again(self, msg: SourceMessage) -> None:
        """A CDC exam whose 体检编号 this member stored before with other content, for the same person (an export
        made again after results or the conclusion were changed): a correction of it, as an HL7 v2 report with
        OBR-25 C is. Its resources are a new version (their own ids), the stored one is superseded, and it
        follows the earlier one to every member that was sent it (stored over it as one more final report, the
        exam stayed as first sent at those members, decided on the old conclusion). Another person's exam under
        the number is left to :meth:`_same_identities`, which refuses it."""
        from gateway.store.reports import versions_of

        report = msg.reports[0] if len(msg.reports) == 1 else None
        if report is None or not report.number or report.status not in ("", "original"):
            return
        earlier = [v for v in versions_of(self.store.db, self.issuer.uscc, report.number) if v.direction == "issued"]
        if not earlier:
            return
        current = self.store.read_many([earlier[-1].report_ref])
        subject = current[0].get("subject", {}).get("reference") if current else None
        patients = self.store.read_many([subject]) if isinstance(subject, str) else []
        cards = {str(i.get("value")).upper() for p in patients for i in p.get("identifier") or []
                 if isinstance(i, dict) and i.get("system") == SYSTEM_ID_CARD}
        if cards and msg.patient is not None and msg.patient.id_card and msg.patient.id_card.upper() not in cards:
            return  # another person's: refused when recorded
        report.status = "RPLC"  # (mappings/concepts/source-report-status.csv: a correction, as a CDA's RPLC is)
        msg.extra["corrects"] = earlier[-1].report_ref
        report.replaces, report.replaces_system = report.number, ""
        report.key = f"{report.number}|corrected|{msg.message_id}"

    def _panel_keys(self, msg: SourceMessage) -> None:
        """HL7 v2: a report whose 检验报告单号 (OBR-3) this member stored before for another test, in a message of its
        own — a LIS that uses the specimen barcode as filler number and sends each panel of one specimen apart.
        Its resources are keyed on the number and OBR-4, as two such panels of one message are
        (``HL7v2Adapter._distinct_reports``); keyed on the number alone, its DiagnosticReport was the
        earlier panel's, and stored over it (that panel's report was no longer current, its results listed by
        none). A panel stored before keeps the key it was stored under, so a copy sent again is the same report.
        Read without the write lock, as :meth:`_results_left_out` is."""
        from gateway.fhir.parties import stable_id
        from gateway.store.reports import versions_of

        for report in msg.reports:
            if not report.number:
                continue
            held: dict[str, set[str]] = {}  # report_ref -> the tests stored under it
            for v in versions_of(self.store.db, self.issuer.uscc, report.number):
                if v.direction == "issued":
                    held.setdefault(v.report_ref, set()).add(v.report_code)
            if not held:
                continue
            msg.extra["number_stored"] = True  # (its patient is compared with the stored one's: _same_patient)
            if report.key or report.replaces:  # (told apart already; a correction's resources have ids of their own)
                continue
            codings = report.std.get("codings") or [{"system": SYSTEM_LOINC, "code": "11502-2"}]  # (as built)
            code = f"{codings[0].get('system') or ''}|{codings[0].get('code') or ''}"
            by_number = f"DiagnosticReport/{stable_id('DiagnosticReport', self.issuer.uscc, report.number)}"
            apart = f"{report.number}|{report.code.code}"
            if code in held.get(f"DiagnosticReport/{stable_id('DiagnosticReport', self.issuer.uscc, apart)}", ()):
                report.key = apart  # this panel, stored before beside another of its number
            elif held.get(by_number) and code not in held[by_number]:
                report.key = apart  # another panel holds the number alone

    def _same_patient(self, bundle: dict[str, Any], msg: SourceMessage) -> None:
        """HL7 v2 and CDA: refuse a report whose 检验报告单号 names a stored report of another patient (numbers
        restarted, another branch's LIS), or that replaces one (a correction naming another patient's number). An
        HL7 v2 report's resource ids derive from the number: it was stored over the other patient's report, results
        and all; a CDA document's are its own, and its correction — or the other patient's — superseded both,
        taking a report of someone else out of every search, 调阅 and decision. A number whose report was taken
        back (cancelled, entered in error) stays that patient's: an HL7 v2 report under it is stored under that
        report's resource ids, in its history, and superseded by the cancellation. The same person is the same
        Patient, or one sharing an
        identifier with it (a 身份证号 sent the second time only, the same MRN). Read inside the write lock.

        :raises _Clash: naming where each such number was read (OBR-3; the CDA element).
        """
        from gateway.store.reports import versions_in, versions_of

        entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        by_url = {e.get("fullUrl"): e["resource"] for e in entries}
        by_ref = {f"DiagnosticReport/{e['resource'].get('id')}": e["resource"] for e in entries
                  if e["resource"].get("resourceType") == "DiagnosticReport"}
        issues: list[Issue] = []
        for version in versions_in(bundle):
            if version["issuer_uscc"] != self.issuer.uscc:
                continue
            report = by_ref.get(version["report_ref"], {})
            patient = by_url.get((report.get("subject") or {}).get("reference"))
            for number, replaced in ((version["report_number"], False), (version["replaces"], True)):
                if not number or (replaced and number == version["report_number"]):
                    continue
                current = [v for v in versions_of(self.store.db, self.issuer.uscc, number)
                           if v.direction == "issued" and v.superseded_by is None
                           and v.report_ref != version["report_ref"]]
                stored = {f"DiagnosticReport/{r.get('id')}": r
                          for r in self.store.read_many(sorted({v.report_ref for v in current}))}
                others = [r for r in stored.values()
                          if not self._same_person((r.get("subject") or {}).get("reference"), patient)]
                same_id = self.store.read_many([version["report_ref"]]) if not replaced else []
                others += [r for r in same_id
                           if not self._same_person((r.get("subject") or {}).get("reference"), patient)]
                if not others:
                    continue
                facts = next((r for r in msg.reports if r.number == version["report_number"]), None)
                if msg.format == "cda":
                    where = (f"{facts.location if facts else '/ClinicalDocument'}/"
                             + ("relatedDocument/parentDocument/id/@extension" if replaced
                                else "recordTarget/patientRole/id[@root='2.16.156.10011.1.33']/@extension"))
                else:
                    where = f"{facts.location}-3" if facts is not None else "OBR-3"
                said = (f"replaces 检验报告单号 {number}, a report stored for another patient" if replaced
                        else f"检验报告单号 {number} was stored for another patient")
                issues.append(Issue(
                    "error", "conflict", where,
                    f"{said}: a report number names one report of one patient for good, and this report is not "
                    "stored over it nor supersedes it. Give it a number of its own (numbers restarted, or another "
                    "branch's?); a report stored for the wrong patient is taken back (HL7 v2: OBR-25 X; a cancelled "
                    "report), and the right patient's sent under a number of its own", "205"))
        if issues:
            raise _Clash(list(dict.fromkeys(issues)))

    def _same_person(self, stored_ref: Any, patient: Any) -> bool:
        """Whether the stored Patient ``stored_ref`` and the Bundle's ``patient`` are one person: the same Patient,
        or one sharing an identifier with it (a 身份证号 sent the second time only, the same MRN) — but never two
        with different 身份证号."""
        if not isinstance(stored_ref, str) or not isinstance(patient, dict):
            return True  # (nothing to tell them apart by)
        if stored_ref == f"Patient/{patient.get('id')}":
            return True

        def names(res: dict[str, Any]) -> set[tuple[str, str]]:
            return {(str(i.get("system")), str(i.get("value")).upper()) for i in res.get("identifier") or []
                    if isinstance(i, dict) and i.get("value")}

        earlier = self.store.read_many([stored_ref])
        if not earlier:
            return False
        was, now = names(earlier[0]), names(patient)
        cards = ({v for s, v in was if s == SYSTEM_ID_CARD}, {v for s, v in now if s == SYSTEM_ID_CARD})
        if all(cards) and not cards[0] & cards[1]:
            return False  # two 身份证号: two people, whatever else they share (a visit number reused)
        return bool(was & now)

    def _same_identities(self, bundle: dict[str, Any], exam: SourceMessage | None = None) -> None:
        """Refuse a submitted Bundle whose entries name by id a stored resource that is someone else's: a new
        version keeps the patient of what it replaces (``subject``), a Patient its 身份证号, an Observation or
        DiagnosticReport its test (``code``). A member system choosing ids (R4 lets a client put any id in a POST
        entry, ``obs-1`` in every Bundle) would otherwise write over another patient's results, silently.

        ``exam``: a CDC export's exam, whose resource ids derive from its 体检编号: one reused for another person (exam
        numbers restarted, another branch's) moved the stored exam, results and all, to that person. Refused once,
        naming the number.

        :raises _Clash: naming each such entry (``Bundle.entry[n].resource.id``), as a conflict (HTTP 409).
        """
        entries = [(n, e) for n, e in enumerate(bundle.get("entry") or [])
                   if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        refs = {f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}": n for n, e in entries}
        stored = {f"{r.get('resourceType')}/{r.get('id')}": r for r in self.store.read_many(list(refs))}
        if not stored:  # (new resources: the common case, one indexed lookup)
            return
        local = {e.get("fullUrl"): f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}"
                 for _, e in entries if isinstance(e.get("fullUrl"), str)}

        def subject(res: dict[str, Any], within: dict[Any, str]) -> str | None:
            about = res.get("subject")
            ref = about.get("reference") if isinstance(about, dict) else None
            return within.get(ref, ref) if isinstance(ref, str) else None

        def codes(res: dict[str, Any]) -> set[tuple[Any, Any]]:
            code = res.get("code")
            coding = code.get("coding") if isinstance(code, dict) else None
            return {(c.get("system"), c.get("code")) for c in coding or [] if isinstance(c, dict)}

        def id_cards(res: dict[str, Any]) -> set[str]:
            return {str(i.get("value")).upper() for i in res.get("identifier") or []
                    if isinstance(i, dict) and i.get("system") == SYSTEM_ID_CARD and i.get("value")}

        issues: list[Issue] = []
        for n, entry in entries:
            new = entry["resource"]
            ref = f"{new.get('resourceType')}/{new.get('id')}"
            old = stored.get(ref)
            if old is None:
                continue
            was, now = subject(old, {}), subject(new, local)
            if was != now and (was or now):
                why = f"is stored for another patient ({was or 'none'}; this entry's: {now or 'none'})"
            elif new.get("resourceType") == "Patient" and id_cards(old) and id_cards(new) \
                    and not id_cards(old) & id_cards(new):
                why = "is stored as another person (another 身份证号)"
            elif new.get("resourceType") in ("Observation", "DiagnosticReport") and codes(old) and codes(new) \
                    and not codes(old) & codes(new):
                why = "is stored as another test (another code)"
            else:
                continue
            issues.append(Issue("error", "conflict", f"Bundle.entry[{n}].resource.id",
                                f"{ref} {why}: an id names one resource for good (a correction keeps its patient "
                                "and test); give this resource an id of its own"))
        if issues and exam is not None:
            label = str(exam.extra.get("label") or "the exam number")
            where = exam.reports[0].location if exam.reports else "row 2"
            issues = [Issue("error", "conflict", where, f"{label} was stored for another person (another 身份证号, "
                            "or another test under it): an exam number names one exam of one person for good; give "
                            "this exam a number of its own (numbers restarted, or another branch's?)", "205")]
        if issues:
            raise _Clash(issues)

    def _refused_for(self, ch: Channel, outcome: Outcome, issues: list[Issue]) -> Outcome:
        """``outcome`` refused for ``issues`` found as it was to be recorded: nothing of its Bundle is stored."""
        msg = copy.copy(outcome.message) if outcome.message is not None else SourceMessage(format=ch.format)
        msg.issues, msg.filtered = list(issues), ""
        refused = Outcome(Status.REFUSED, msg.label(), issues=list(issues), message=msg,
                          record_id=outcome.record_id)
        refused.ack_code = ch.code_for(msg)
        refused.answer = self._answer(ch, refused)
        return refused

    def _failed(self, ch: Channel, msg: SourceMessage | None, stage: Stage, why: str = "") -> Outcome:
        """The outcome of a unit the gateway failed on: its raw input is kept and it can be worked again. ``why``:
        what in the gateway's own setup stopped it (a bug otherwise, which the answer does not describe)."""
        issue = Issue("error", "exception", "", f"{why or f'internal error in the gateway ({stage.value} stage)'}; "
                      "the message is kept and can be worked again", "207")
        failed = copy.copy(msg) if msg is not None else SourceMessage(format=ch.format)
        failed.issues, failed.filtered = [issue], ""
        return Outcome(Status.FAILED, failed.label(), ack_code="AE", issues=[issue], message=failed)

    def _answer(self, ch: Channel, outcome: Outcome) -> bytes:
        """The unit's answer; when the channel cannot build it, a plain one that cannot fail."""
        msg = outcome.message or SourceMessage(format=ch.format)
        try:
            return ch.answer(msg, outcome.ack_code or "AE")
        except Exception as exc:
            _log_internal(Stage.ANSWER, ch, None, outcome.record_id, exc)
            return self._plain_answer(ch, msg, outcome.ack_code or "AE")

    def _receipt(self, ch: Channel, msg: SourceMessage, note: str) -> tuple[str, bytes]:
        """A receipt (answer on receipt); a plain one when the channel cannot build it."""
        assert ch.receipt is not None
        try:
            return ch.receipt(msg, note)
        except Exception as exc:
            _log_internal(Stage.ANSWER, ch, None, None, exc)
            code = "CA" if msg.header.get("accept_ack_type") else "AA"
            return code, self._plain_answer(ch, msg, code, note)

    def _plain_answer(self, ch: Channel, msg: SourceMessage, code: str, note: str | None = None) -> bytes:
        """An answer built only from what cannot break it: header fields and texts with every control
        character and HL7 separator removed, UTF-8; at worst a fixed one."""
        issues = [dataclasses.replace(i, message=_plain(i.message, 200), location=_plain(i.location, 60),
                                      extra={}) for i in msg.issues]
        code = code if code in ("AA", "AE", "AR", "CA", "CE", "CR") else "AE"
        if not ch.answer_type.startswith("x-application/hl7"):
            try:
                clean = SourceMessage(format=ch.format, issues=issues)
                clean.extra["label"] = _plain(msg.label(), 60) or "(no id)"
                return _outcome_answer(clean, code)
            except Exception:
                return (b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception",'
                        b'"diagnostics":"internal error in the gateway; the input is kept"}]}')
        version = msg.version or msg.header.get("version", "")
        version = version if version in _VERSIONS else "2.5.1"
        message_id = _plain(msg.message_id, 50, _HL7_SEPARATORS)
        try:
            header = {key: _plain(str(msg.header.get(key, "")), 180, "|~\\") for key in _ACK_HEADER}
            header["trigger"] = "".join(c for c in header["trigger"] if c.isascii() and c.isalnum())[:3]
            clean = SourceMessage(format=ch.format, message_id=message_id, version=version, issues=issues,
                                  filtered=_plain(msg.filtered, 80), header=header)
            text = build_ack(clean, code, application=self.settings.ack_application,
                             facility=self.settings.issuer_uscc, now=self.clock(),
                             note=_plain(note, 80) if note is not None else None)
            return text.encode("utf-8")
        except Exception:
            return (f"MSH|^~\\&|CYHR-GATEWAY||||{uuid.uuid4().hex[:14]}||ACK|{uuid.uuid4().hex[:20]}|P|{version}\r"
                    f"MSA|{code}|{message_id}\r").encode("utf-8")

    def _record_safely(self, ch: Channel, unit: RawUnit, outcome: Outcome, channel: str,
                       retried: tuple[str, str] | None = None) -> tuple[Outcome, bool]:
        """Record one outcome so that its failure is its own: (the outcome recorded, whether anything was).

        Inside a caller's transaction the unit is recorded in a savepoint; a submitted Bundle naming another
        patient's stored resources is recorded as refused instead (:meth:`_same_identities`); when recording
        fails, the unit is recorded as failed instead; when even that fails, nothing is written for it and its
        answer asks the sender to send it again (its raw input is kept, and its lease is given up by the caller).
        A failure of the whole transaction (the database itself) is raised.
        """
        try:
            if self._recorded(ch, unit, outcome, channel, retried, check=True):
                return outcome, True
        except _Clash as clash:
            outcome = self._refused_for(ch, outcome, clash.issues)
            if self._recorded(ch, unit, outcome, channel, retried):
                return outcome, True
        failed = self._failed(ch, outcome.message, Stage.STORE)
        failed.record_id = outcome.record_id
        failed.answer = self._answer(ch, failed)
        if self._recorded(ch, unit, failed, channel, retried):
            return failed, True
        issue = Issue("error", "exception", "", "the gateway could not record this message; its raw input is kept: "
                      "send it again", "207")
        msg = copy.copy(outcome.message) if outcome.message is not None else SourceMessage(format=ch.format)
        msg.issues, msg.filtered = [issue], ""
        unrecorded = Outcome(Status.FAILED, msg.label(), ack_code="AE", issues=[issue], message=msg,
                             record_id=outcome.record_id)
        unrecorded.answer = self._answer(ch, unrecorded)
        return unrecorded, False

    def _recorded(self, ch: Channel, unit: RawUnit, outcome: Outcome, channel: str,
                  retried: tuple[str, str] | None, *, check: bool = False) -> bool:
        """:meth:`_record` in a savepoint of its own: whether it was recorded (a failure of its own is logged and
        rolled back). ``check``: a submitted FHIR Bundle's ids are compared with what they name stored first.

        :raises _Clash: (``check``) the Bundle names another patient's, person's or test's stored resource.
        :raises Exception: the caller's transaction itself failed (the database).
        """
        from gateway.store.db import savepoint

        db = self.store.db
        joined = db.conn.in_transaction
        try:
            with savepoint(db, "outcome"):
                if check and ch.format in _OWN_IDS and outcome.status is Status.STORED and outcome.bundle is not None:
                    # (read inside the write lock: no other Bundle between)
                    self._same_identities(outcome.bundle, outcome.message if ch.format == "cdc-csv" else None)
                elif check and outcome.status is Status.STORED and outcome.bundle is not None \
                        and outcome.message is not None and (ch.format == "cda" or (
                            ch.format == "hl7v2" and outcome.message.extra.get("number_stored"))):
                    self._same_patient(outcome.bundle, outcome.message)
                self._record(ch, unit, outcome, channel, retried)
            return True
        except _Clash:
            raise
        except Exception as exc:
            if joined and not db.conn.in_transaction:
                raise
            if isinstance(exc, DatabaseUnavailable) or (fault_reason(exc) is not None and (
                    dialect(db) == "postgresql" or storage_fault(exc))):
                # the server went away (a failover, a restart, the session ended): not the message's own failure,
                # and no other statement of this transaction can be written (recorded as failed on the next
                # connection, every resend of it was answered AE): the whole transaction fails, the sender is
                # answered as while the database is away, and its resend is worked
                raise
            _log_internal(Stage.STORE, ch, unit.index, outcome.record_id, exc)
            return False

    def _release(self, record_id: int, *, uncounted: bool = False) -> None:
        """Give up this process's lease on a message it did not finish; when the database cannot be written now, as
        soon as it can (:meth:`_release_pending`; the lease expires by itself all the same). ``uncounted``: see
        :meth:`Store.release` (a database fault, not a process that died)."""
        try:
            self.store.release(record_id, uncounted=uncounted)
        except Exception as exc:
            if len(self._unreleased) < _UNRELEASED_MAX:
                self._unreleased.add(record_id)
                if uncounted:
                    self._uncounted.add(record_id)
            log.warning("lease of message record=%s not given up (%s): given up once the database answers again",
                        record_id, type(exc).__name__)

    def _release_pending(self) -> None:
        """Give up the leases :meth:`_release` could not (before this process takes new work): a resend of such a
        message, to this node or another, is then worked at once. Stops at the first that still fails."""
        for record_id in sorted(self._unreleased):
            try:
                self.store.release(record_id, uncounted=record_id in self._uncounted)
            except Exception:  # noqa: BLE001 - the database is still away: the next batch tries again
                return
            self._unreleased.discard(record_id)
            self._uncounted.discard(record_id)
            log.info("lease of message record=%s given up now that the database answers again", record_id)

    def _record(self, ch: Channel, unit: RawUnit, outcome: Outcome, channel: str,
                retried: tuple[str, str] | None = None) -> None:
        """Record a worked unit's outcome, resources, signed copy and audit entry (one transaction).

        ``retried``: (who, status before) when an operator had the message worked again; audited too.
        """
        from gateway.audit.events import ingest_record, retried_record
        from gateway.audit.log import prepare

        assert outcome.record_id is not None
        msg = outcome.message
        message_id = _plain((msg.message_id if msg else "") or unit.origin, 200)
        # made before the write lock is taken (as the resources' rows are, in Store.finish)
        records = [ingest_record(
            at=self.clock(), member=self.issuer.uscc, member_name=self.issuer.name,
            sender=_plain(msg.sender if msg else "", 200), message_id=message_id, fmt=ch.format,
            status=outcome.status.value, channel=channel or "file",
            reason=outcome.errors[0].line() if outcome.errors else None)]
        if retried is not None:
            records.append(retried_record(at=self.clock(), member=self.issuer.uscc, member_name=self.issuer.name,
                                          user=retried[0], record_id=outcome.record_id, message_id=message_id,
                                          fmt=ch.format, old_status=retried[1], new_status=outcome.status.value))
        watch = metrics.Stopwatch()
        self._commit(outcome, prepare(records))
        watch.lap(Stage.STORE)
        log.info("message format=%s record=%s status=%s ack=%s reports=%d issues=%d",
                 ch.format, outcome.record_id, outcome.status.value, outcome.ack_code,
                 len(msg.reports) if msg else 0, len(outcome.issues))

    def _commit(self, outcome: Outcome, audit: list[bytes], *, held: bool = True) -> bool:
        """Record an outcome — the one way every channel, in both directions, does it — in one unit of work:
        the message's outcome and its resources, the signed copy (issued here, or received), the audit entries,
        the decisions (received), the supersession of corrected reports and the extra hooks. All are committed
        together, or none. ``held``: the message was taken under this process's lease; False when another process
        has taken it over since (nothing is written then).

        :raises _AlreadyReceived: (received) the same signed document was stored by another request first.
        """
        from gateway.audit.log import chain
        from gateway.store.exchange import SignedBundles, packed
        from gateway.store.reports import held_for_other_reports

        assert outcome.record_id is not None
        store = self.store
        stored = outcome.bundle if outcome.status is Status.STORED else None
        # the resources' rows are made before the write lock is taken: other writers wait only for the writing
        prepared = None
        if stored is not None:
            prepared = outcome.prepared if outcome.prepared is not None else store.prepare(stored)
        if outcome.signed is not None and stored is not None and outcome.packed is None:
            outcome.packed = packed(outcome.signed)  # (as the signed copy is kept)
        at = self.clock()
        with store.unit_of_work() as db:
            if outcome.direction == "received" and stored is not None:
                # under the write lock, "received already?" has a single answer
                first = SignedBundles(db).received_message(outcome.signed_digest)
                if first is not None:
                    raise _AlreadyReceived(first)
                other = held_for_other_reports(db, outcome.signed_bundle or stored)
                if other is not None:
                    raise Conflict("Bundle.identifier names a Bundle received here before about another report "
                                   f"({other.report_ref}, stored {other.recorded_at}): one identifier names one "
                                   "Bundle; its issuer gives a new Bundle an identifier of its own",
                                   "Bundle.identifier")
            if not store.finish(outcome.record_id, status=outcome.status.value, ack_code=outcome.ack_code,
                                ack=outcome.answer if outcome.answer or outcome.direction == "issued" else None,
                                issues=outcome.issues, bundle=stored, prepared=prepared,
                                owner=lease_owner() if held else None,
                                ack_for=self._answer_stored(outcome) if stored is not None else None):
                return False
            if outcome.signed is not None and stored is not None:
                SignedBundles(db).keep_bundle(outcome.signed_bundle or stored, outcome.signed_digest,
                                              outcome.direction, outcome.signed,
                                              at.isoformat(timespec="milliseconds"), outcome.record_id,
                                              packed_text=outcome.packed)
            chain(db, audit)
            if outcome.decided is not None:
                outcome.decided.record(db, at)
            if stored is not None:
                self._supersede(outcome)
            for hook in self.after_store:
                hook(db, outcome)
        return True

    @staticmethod
    def _answer_stored(outcome: Outcome) -> Callable[[list[Any]], bytes] | None:
        """What :meth:`Store.finish` makes the kept answer with (``ack_for``), when the outcome's channel makes its
        answer from what storing did (:attr:`Channel.answer_stored`): it becomes the outcome's answer too. The answer
        made before stays the outcome's when this one cannot be made (logged)."""
        after = outcome.answer_after
        if after is None:
            return None

        def answer(written: list[Any]) -> bytes:
            try:
                outcome.answer = after(written)
            except Exception as exc:  # noqa: BLE001 - the answer made before says the same, less precisely
                log.error("the answer of message record=%s could not be made from what was stored (%s at %s); "
                          "the one made before it is kept", outcome.record_id, type(exc).__name__,
                          code_place(exc.__traceback__))
            return outcome.answer
        return answer

    def _supersede(self, outcome: Outcome) -> None:
        """A stored report that corrects one stored before (or that a stored correction supersedes): the
        superseded version is marked, the decisions on it withdrawn, and a correction issued here is queued
        for every member the superseded version was pushed to (inside the recording unit of work)."""
        from gateway.store.reports import supersede

        assert outcome.bundle is not None
        changes = supersede(self.store, outcome.signed_bundle or outcome.bundle, direction=outcome.direction,
                            message_ref=outcome.record_id, at=self.clock(), member=self.issuer.uscc)
        if changes and outcome.direction == "issued" and self.exchange is not None:
            self.exchange.forward_corrections(changes, str(outcome.bundle.get("id") or ""))

    # -- received signed Bundles: the exchange's channel ----------------------------------------------------

    def receive_signed(self, text: bytes, peer: str) -> ReceiveResult:
        """Take a signed Bundle pushed by authenticated member ``peer``: the exchange's channel of the pipeline.

        Its stages: receive (the signature verified against the registry
        snapshot: the signer must be the report's issuer, and the document is
        known by the hash of what the signature covers), the raw text stored
        under that hash, check (our profiles), decide (recognition for this
        member), answer (a signed receipt) and store (outcome, resources, signed
        copy, decisions and audit entries in one unit of work, :meth:`_commit`,
        as every channel records).

        The same document received again — resent, pretty-printed, re-ordered,
        with another ``id`` or ``meta``, or pushed by several requests at once —
        is stored, decided and audited once, and every copy is answered with
        the first one's receipt. A copy that does not verify is refused and kept
        apart under the hash of its bytes; it never touches the Bundle already
        received.

        :raises BadSignature: (401) the signature does not verify.
        :raises TrustError: (403) signer not listed, not the issuer, or snapshot problems.
        :raises ProfileViolation: (422) the Bundle breaks our profiles.
        :raises ParseError: (400) not strict JSON.
        :raises ReceiveLater: (503) the same Bundle is still being worked by another request; send it again.
        """
        from gateway.signing.jws import check_signer_is_issuer, verify_bundle

        watch = metrics.Stopwatch()
        try:
            verified = verify_bundle(text, self.member.snapshot(), at=self.clock())
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
        watch.lap(Stage.RECEIVE)
        doc_sha = verified.document_sha256
        lease = float(self.settings.processing_lease)
        record_id, existing = self.store.insert_raw(channel="exchange", fmt=SIGNED_FORMAT, sender=issuer,
                                                    message_id=doc_sha, origin=f"peer:{peer}", raw=text, lease=lease)
        deadline = time.monotonic() + self.busy_wait
        while existing is not None:  # the same document was pushed before, or is being worked right now
            if existing.ack is not None:
                return ReceiveResult(200, existing.ack, duplicate=True)
            if self._take_received(record_id, lease):
                if existing.sha256 != hashlib.sha256(text).hexdigest():
                    self._keep_apart(record_id, existing, text, peer)
                break
            if time.monotonic() >= deadline:
                raise ReceiveLater("is being received by another request now: send it again later", "Bundle")
            time.sleep(0.05)
            existing = self.store.get_message(record_id)
        return self._work_received(verified, issuer, text, peer, record_id, watch)

    def _take_received(self, record_id: int, lease: float) -> bool:
        """Hold a received Bundle that has no answer and no live holder (an earlier attempt died or was refused)."""
        from gateway.store.exchange import SignedBundles

        now = self.clock().timestamp()
        return SignedBundles(self.store.db).take_message(record_id, lease_owner(), now + lease,
                                                         lambda owner, until: holder_alive(owner, until, now))

    def _keep_apart(self, record_id: int, earlier: Any, text: bytes, peer: str) -> None:
        """An earlier copy of this document (refused, or left unfinished) was other bytes: they are kept apart under
        the hash of their bytes with what became of them, and the message held now carries the copy worked now
        (its raw input and who sent it), so that the stored Bundle's provenance is the copy that was accepted."""
        store = self.store
        old = store.raw_of(record_id)
        digest_raw = hashlib.sha256(old).hexdigest()
        kept, _ = store.insert_raw(channel="exchange", fmt=SIGNED_FORMAT, sender=earlier.sender, message_id=digest_raw,
                                   origin=earlier.origin, raw=old)
        status = earlier.status if earlier.status in ("refused", "failed") else "failed"
        issues = [Issue(i.get("severity", "error"), i.get("code", "exception"), i.get("location", ""),
                        i.get("message", "")) for i in earlier.issues if isinstance(i, dict)]
        issues = issues or [Issue("error", "exception", "",
                                  "left unfinished; a copy of the same document sent later was worked instead")]
        store.finish(kept, status=status, ack_code=earlier.ack_code, ack=None, issues=issues)
        store.replace_raw(record_id, text, origin=f"peer:{peer}")
        log.info("exchange record=%s: an earlier copy of the document was kept apart as record=%s", record_id, kept)

    def _refused(self, key: str, peer: str, record_id: int, exc: GatewayError) -> tuple[Outcome, list[bytes]]:
        """The outcome of a received Bundle refused with ``exc``, and its audit entry."""
        from gateway.audit.events import exchange_record
        from gateway.audit.log import prepare

        audit = prepare([exchange_record("refused", at=self.clock(), member=self.settings.issuer_uscc, peer=peer,
                                         bundle_hash=key, reason=_REFUSALS.get(exc.http_status, "invalid"),
                                         detail=exc.message[:200])])
        return Outcome(Status.REFUSED, key, ack_code=str(exc.http_status), issues=exc.issues(), record_id=record_id,
                       direction="received"), audit

    def refuse_unlisted(self, text: bytes, member: str, exc: GatewayError) -> None:
        """Keep a Bundle pushed by ``member``, refused at authentication because the registry no longer lists it
        (revoked), as refused under the hash of its bytes, with its audit entry: as a push that does not verify.
        The same bytes pushed again add nothing (their refusal is kept and audited once)."""
        metrics.signature_failed("receive", exc)
        log.warning("exchange push from member=%s refused: not listed in the registry snapshot", member)
        earlier = self.store.find_message(SIGNED_FORMAT, member, hashlib.sha256(text).hexdigest())
        if earlier is not None and earlier.status == "refused":
            return
        self._refuse_unverified(text, member, exc)

    def _refuse_unverified(self, text: bytes, peer: str, exc: GatewayError) -> None:
        """Keep a push that did not verify, under the hash of its bytes, as refused, with its audit entry."""
        from gateway.audit.log import chain

        digest_raw = hashlib.sha256(text).hexdigest()
        record_id, existing = self.store.insert_raw(channel="exchange", fmt=SIGNED_FORMAT, sender=peer,
                                                    message_id=digest_raw, origin=f"peer:{peer}", raw=text)
        refused, audit = self._refused(digest_raw, peer, record_id, exc)
        if existing is not None and existing.ack is not None:  # accepted once (before a revocation): keep that
            with self.store.unit_of_work() as db:
                chain(db, audit)
            return
        self._commit(refused, audit, held=False)

    def _work_received(self, verified: Any, issuer: str, text: bytes, peer: str, record_id: int,
                       watch: metrics.Stopwatch) -> ReceiveResult:
        """Check, decide, answer and record a verified Bundle held by this request."""
        from gateway.audit.events import exchange_record
        from gateway.audit.log import prepare

        doc_sha = verified.document_sha256
        try:
            outcome = self._decide_received(verified, issuer, peer, record_id, watch)
            audit = prepare([exchange_record("received", at=outcome.received_at or self.clock(),
                                             member=self.settings.issuer_uscc,
                                             peer=peer, bundle_hash=doc_sha, bundle_id=verified.bundle.get("id"),
                                             kid=verified.kid, bundle=verified.bundle)])
            outcome.signed = text
            if not self._commit(outcome, audit):
                raise ReceiveLater("was taken over by another process: send it again later", "Bundle")
            watch.lap(Stage.STORE)
        except _AlreadyReceived as dup:  # another request stored the same document first: its receipt answers
            first = self.store.get_message(dup.record_id)
            if dup.record_id != record_id:
                self.store.finish(record_id, status="stored", ack_code="200", ack=first.ack, issues=[],
                                  owner=lease_owner())
            return ReceiveResult(200, first.ack or b"", duplicate=True)
        except ReceiveLater:
            raise
        except GatewayError as exc:
            self._commit(*self._refused(doc_sha, peer, record_id, exc))
            raise
        except Exception as exc:  # noqa: BLE001 - kept as failed; the sender's next attempt works it again
            log.exception("exchange record=%s could not be worked (%s); raw input kept", record_id,
                          type(exc).__name__)
            issue = Issue("error", "exception", "", "internal error in the gateway; the Bundle is kept and is "
                          "worked again when it is sent again")
            self.store.finish(record_id, status="failed", ack_code="503", ack=None, issues=[issue],
                              owner=lease_owner())
            raise ReceiveLater("could not be worked now; it is kept: send it again later", "Bundle") from None
        assert outcome.decided is not None
        log.info("exchange received record=%s issuer=%s decisions=%s", record_id, issuer, outcome.label)
        return ReceiveResult(200, outcome.answer, decisions=[d.to_dict() for d in outcome.decided.decisions])

    def _decide_received(self, verified: Any, issuer: str, peer: str, record_id: int,
                         watch: metrics.Stopwatch) -> Outcome:
        """The check, decide and answer stages of a verified Bundle: its outcome, ready to record.

        :raises ProfileViolation: the Bundle breaks our profiles. :raises TrustError: ``signature.who`` names
            another member than the one whose signature verified.
        """
        from gateway.recognition.facts import facts_from_bundle
        from gateway.recognition.record import decide

        snapshot = self.member.snapshot()
        now = self.clock()
        bundle = verified.bundle
        bundle["id"] = received_name(bundle)  # (the id the sender wrote is outside the signature)
        if self.checker is not None:
            problems = [i for i in self.checker(bundle) if i.severity == "error"]
            if problems:
                raise ProfileViolation(problems, "the received Bundle does not conform to our profiles")
        watch.lap(Stage.CHECK)
        # the signer is the verified one: Bundle.signature.who is not signed, so it must name the same member
        read = facts_from_bundle(bundle)
        claimed = {f.signer_uscc for f in read if f.signer_uscc}
        if claimed and claimed != {verified.signer_uscc}:
            raise TrustError(f"Bundle.signature.who names {', '.join(sorted(claimed))} but the signature is "
                             f"{verified.signer_uscc}'s", "Bundle.signature.who")
        read = [f if f.signer_uscc == verified.signer_uscc else dataclasses.replace(f, signer_uscc=verified.signer_uscc)
                for f in read]  # (Bundle.signature.who names the signer already, most often)
        doc_sha = verified.document_sha256
        # decided, and the decisions' audit entries made, before the write lock is taken; only their storing
        # and chaining are inside (a report a stored correction supersedes is decided as superseded)
        made = decide(read, bundle, snapshot, self.settings.issuer_uscc, now, db=self.store.db, bundle_hash=doc_sha,
                      kid=verified.kid)
        watch.lap(Stage.DECIDE)
        counts: dict[str, int] = {}
        for d in made.decisions:
            counts[d.outcome] = counts.get(d.outcome, 0) + 1
        receipt = self.member.require_signer().receipt({
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
        watch.lap(Stage.ANSWER)
        unsigned = {k: v for k, v in bundle.items() if k != "signature"}
        return Outcome(Status.STORED, str(counts), ack_code="200", bundle=unsigned, record_id=record_id,
                       answer=receipt, signed_digest=doc_sha, direction="received", decided=made,
                       signed_bundle=bundle, received_at=now)


#: HL7 v2 versions an answer may echo (anything else is answered as 2.5.1).
_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9")
#: Header fields an ACK echoes.
_ACK_HEADER = ("sending_application", "sending_facility", "processing_id", "trigger", "accept_ack_type")
_HL7_SEPARATORS = "|^~\\&"


#: Leases a process remembers to give up once its database answers again (beyond, they expire by themselves).
_UNRELEASED_MAX = 10_000
#: Tries to store other content under a control id as its next copy while other processes store copies too.
_COPY_ATTEMPTS = 5


_URN_UUID = re.compile(r"urn:uuid:([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})")


def received_name(bundle: dict[str, Any]) -> str:
    """What a received Bundle is known by here: its signed ``identifier``, not its ``id``, which the signature does
    not cover (a copy of one member's signed Bundle sent under another Bundle's id verifies all the same, and was
    stored under it, so that the genuine Bundle could then be refused or its receipt name the wrong one). The
    uuid of an ``urn:uuid:`` identifier (every report Bundle this product issues: the same as its id), else a name
    made from the identifier (a uuid5 of ``system|value``); the id as sent when it has none."""
    ident = bundle.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"]:
        found = _URN_UUID.fullmatch(ident["value"].strip())
        if found:
            return found.group(1).lower()
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ident.get('system') or ''}|{ident['value']}"))
    return str(bundle.get("id") or "")


def _content_of(raw: bytes) -> list[bytes]:
    """What tells two HL7 v2 messages with the same id apart: their segments, without the time of sending (MSH-7)
    and whatever separates them (CR, LF, CRLF, a trailing one)."""
    if not raw.startswith(b"MSH") or len(raw) < 9:
        return [raw]
    segments = [s.rstrip() for s in raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r") if s.strip()]
    fields = segments[0].split(raw[3:4])
    if len(fields) > 6:
        fields[6] = b""
    return [raw[3:4].join(fields), *segments[1:]]


#: Results named in the warning of :meth:`Pipeline._results_left_out`; the others are counted.
_NAMES_SHOWN = 10


def _names_shown(names: list[str]) -> str:
    """Names of results for an answer: the first :data:`_NAMES_SHOWN`, and how many more."""
    return "; ".join(names[:_NAMES_SHOWN]) + (f"; and {len(names) - _NAMES_SHOWN} more"
                                              if len(names) > _NAMES_SHOWN else "")


def _result_refs(report: dict[str, Any]) -> list[str]:
    """The references of a report's ``result`` (as written: ``urn:uuid:`` in a Bundle, ``Observation/id`` stored)."""
    results = report.get("result")
    return [r["reference"] for r in results if isinstance(r, dict) and isinstance(r.get("reference"), str)] \
        if isinstance(results, list) else []


def _result_name(observation: dict[str, Any]) -> str:
    """What names a stored result for a person: its code's text or first display, with the sender's code."""
    code: dict[str, Any] = observation["code"] if isinstance(observation.get("code"), dict) else {}
    codings = [c for c in code.get("coding") or [] if isinstance(c, dict)]
    text = code.get("text") or next((c.get("display") for c in codings if c.get("display")), "")
    local = next((c.get("code") for c in codings if c.get("code")), "")
    name = f"{text} ({local})" if text and local and local not in text else str(text or local)
    return _plain(name, 80) or f"Observation/{observation.get('id')}"


def _plain(text: str | None, limit: int, drop: str = "") -> str:
    """``text`` without control characters (nor those in ``drop``), at most ``limit`` characters."""
    return "".join(c for c in str(text or "") if c.isprintable() and c not in drop)[:limit]


def _twin_channel(fmt: str, make: Callable[[], Channel]) -> Channel | None:
    """The channel of format ``fmt`` made of the compiled twins (:mod:`gateway.native`), when they are in use and
    take this member's mapping tables; None otherwise (the plain modules do the work, with a warning)."""
    if not native.compiled():
        return None
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - what the twins cannot set up, the plain modules do
        log.warning("the compiled twins of the %s channel could not be set up (%s); the plain modules work its "
                    "units (gateway.native)", fmt, type(exc).__name__)
        return None


#: Raw inputs (SHA-256 -> when) whose storing transaction failed in this process with a database fault: when a
#: commit's answer was lost (the connection ended as it committed), the unit is stored all the same, held by this
#: process's lease though nothing here works it. A resend of it takes it on at once rather than being told, until
#: the lease runs out, that it is being processed.
_DOUBTFUL: dict[str, float] = {}
_DOUBTFUL_MAX = 1024


def _doubt(units: Iterable[RawUnit]) -> None:
    if len(_DOUBTFUL) >= _DOUBTFUL_MAX:
        _DOUBTFUL.clear()
    now = time.monotonic()
    for unit in units:
        _DOUBTFUL[hashlib.sha256(unit.data).hexdigest()] = now


def _doubted(existing: Any) -> bool:
    """Whether a stored message is one this process stored without learning so (see :data:`_DOUBTFUL`)."""
    from gateway.store.store import lease_owner

    return bool(_DOUBTFUL) and getattr(existing, "sha256", None) in _DOUBTFUL and \
        getattr(existing, "lease_owner", None) == lease_owner()


def _twins_stepped_aside(ch: Channel, stage: Stage, unit: RawUnit, exc: BaseException) -> None:
    """Count a unit the compiled twins failed on (the plain modules work it again), naming where in the code
    (never the exception's text: it may quote the message)."""
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ is not None else []
    at = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno}" if where else ""
    native.fell_back((ch.format, stage.value), f"the compiled twins failed on {ch.format} unit {unit.index} in stage "
                     f"{stage.value} ({type(exc).__name__}{at}); the plain modules work it")


#: What a stage does, for an answer saying that this gateway's setup keeps it from doing it.
_STAGE_VERBS = {Stage.SIGN: "sign reports", Stage.CHECK: "check reports", Stage.MAP: "map codes"}


def _log_internal(stage: Stage, ch: Channel, index: int | None, record_id: int | None, exc: BaseException) -> None:
    """Log a failure of the gateway itself: where in the code, never the exception's text (it may quote
    patient data). A database fault (the server gone, the file locked or full) is not the gateway's: it is logged
    in the database's own words, as a WARNING, at most once per :data:`gateway.logs.DATABASE_FAULT_LOG_EVERY`
    seconds."""
    reason = fault_reason(exc)
    if reason is not None:
        database_fault(log, "pipeline", "database unavailable in stage %s of %s unit %s (record %s): %s",
                       stage.value, ch.format, index if index is not None else "-", record_id, reason)
        return
    log.error("internal error in stage %s of %s unit %s (record %s): %s at %s", stage.value, ch.format,
              index if index is not None else "-", record_id, type(exc).__name__, code_place(exc.__traceback__))


def _units(ch: Channel, data: bytes | IO[bytes], origin: str) -> Iterator[RawUnit]:
    """The units of bytes or of a binary file object (streamed when the adapter can).

    When the adapter fails to cut the input, what it had not cut yet becomes one
    unit (all of it, for bytes), stored and answered like any other: nothing is lost.
    """
    done = 0
    try:
        for unit in _split(ch, data, origin):
            done = unit.index
            yield unit
    except Exception as exc:
        _log_internal(Stage.RECEIVE, ch, done + 1, None, exc)
        rest = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else _rest(data)
        yield RawUnit(rest, done + 1, origin)


def _rest(stream: IO[bytes]) -> bytes:
    try:
        return stream.read()
    except Exception:
        return b""


def _split(ch: Channel, data: bytes | IO[bytes], origin: str) -> Iterable[RawUnit]:
    """The units of bytes or of a binary file object (streamed when the adapter can)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return ch.adapter.split(bytes(data), origin)  # type: ignore[no-any-return]
    stream = getattr(ch.adapter, "split_stream", None)
    if stream is not None:
        return stream(data, origin)  # type: ignore[no-any-return]
    return ch.adapter.split(data.read(), origin)  # type: ignore[no-any-return]


# Issue locations the shared mapping stage writes as "<location>-<HL7 field>", and the fact each names.
_FIELD_FACTS = {"3": "code", "5": "value", "6": "unit", "7": "reference_range", "8": "flags", "11": "status"}


def _located(msg: SourceMessage, run: Callable[[], None]) -> None:
    """Run the shared mapping stage, then give its new issues the source's own locations.

    ``gateway.mapping.concepts`` locates issues HL7-style (``OBX[3]-6``). For
    CDA and CSV each record knows where its facts were (``where``: an XPath,
    ``row 3 column 单位``); issues are relocated there, so no HL7 field number
    reaches a CDA or CSV sender.
    """
    before = len(msg.issues)
    run()
    if len(msg.issues) == before:
        return  # (the common case: nothing to relocate)
    places: dict[str, str] = {}
    if msg.patient is not None and "sex" in msg.patient.where:
        places[f"{msg.patient.location}-8"] = msg.patient.where["sex"]
    for report in msg.reports:
        for res in report.results:
            for fld, fact in _FIELD_FACTS.items():
                places[f"{res.location}-{fld}"] = res.where.get(fact) or res.where.get("value") or res.location
    msg.issues[before:] = [dataclasses.replace(i, location=places.get(i.location, i.location))
                           for i in msg.issues[before:]]


def _outcome_answer(msg: SourceMessage, code: str) -> bytes:
    """The answer to a CDA or CSV unit: an OperationOutcome (UTF-8 JSON), each issue naming the unit."""
    label = msg.label()
    issues = [dataclasses.replace(i, extra={**i.extra, "label": label}) for i in msg.issues]
    verdict = "accepted" if code == "AA" else "refused"
    return jsonutil.dumps(operation_outcome(issues, empty_text=f"{label}: {verdict}")).encode("utf-8")
