"""Pipeline: the named stages every input goes through, whoever delivers it.

::

    receive -> store raw -> parse -> filter -> map -> build -> check -> store
                              \\-> refused (AE/AR)    \\-> filtered (QC: not an error)

The HTTP API, the MLLP listener and the CLI all call :meth:`Pipeline.ingest`
(or :meth:`Pipeline.convert`, the dry run that stores nothing), so there is
exactly one flow. Raw input is stored before parsing; a duplicate (same
format, sender and message id) is answered with the answer it got the first
time and is not processed again. Each message ends in one status —
``stored``, ``filtered``, ``refused`` or ``failed`` — recorded with every
issue found, and gets an answer (an HL7 ACK for HL7 v2).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import sqlite_utils

from gateway import jsonutil
from gateway.adapters.base import RawUnit, SourceMessage
from gateway.adapters.cda import CDAAdapter, answer_code
from gateway.adapters.hl7v2 import HL7v2Adapter, ack_code_for, build_ack
from gateway.adapters.labcsv import LabCSVAdapter
from gateway.config import Settings
from gateway.errors import Issue, UnsupportedFormat
from gateway.fhir.bundle import build_bundle, entries_of
from gateway.fhir.occupational import ExamTerminology, build_exam_bundle, map_exam
from gateway.fhir.outcome import operation_outcome
from gateway.fhir.parties import Issuer
from gateway.mapping.concepts import Terminology, map_message
from gateway.mapping.tables import MappingSet, load_mappings
from gateway.naming import SYSTEM_INSTITUTION
from gateway.store.store import Store

__all__ = ["Stage", "Status", "Outcome", "Channel", "Pipeline"]

log = logging.getLogger(__name__)


class Stage(str, enum.Enum):
    """The named stages, in order."""

    RECEIVE = "receive"
    PARSE = "parse"
    FILTER = "filter"
    MAP = "map"
    BUILD = "build"
    CHECK = "check"
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

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]


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


Checker = Callable[[dict[str, Any]], list[Issue]]
_BATCH = 32  # units stored and processed per pair of commits when a body or file holds many
AfterStore = Callable[[sqlite_utils.Database, Outcome], None]


class Pipeline:
    """One member gateway's processing of inbound results."""

    def __init__(self, settings: Settings, mappings: MappingSet | None = None, *,
                 clock: Callable[[], _dt.datetime] | None = None,
                 checker: Checker | None = None) -> None:
        """:raises ConfigError: mapping tables are missing or invalid."""
        self.settings = settings
        self.mappings = mappings if mappings is not None else load_mappings(settings.mappings_dir)
        self.clock = clock or (lambda: _dt.datetime.now(_dt.timezone(_dt.timedelta(hours=8))))
        self.issuer = Issuer(settings.issuer_uscc, settings.issuer_name, settings.issuer_miplrn)
        if checker is None:
            # Every Bundle we emit is checked against our implementation guide (profiles/).
            from gateway.fhir.profiles import load_guide

            checker = load_guide(settings.profiles_dir).validate
        self.checker = checker
        self.after_store: list[AfterStore] = []
        self.channels: dict[str, Channel] = {}
        self._local = threading.local()
        self.exchange = self._exchange()
        self.add_channel(self._hl7v2_channel())
        self.add_channel(self._cda_channel())
        self.add_channel(self._cdc_csv_channel())
        self.add_channel(self._fhir_channel())

    # -- set-up --------------------------------------------------------------------------

    def _exchange(self) -> Any:
        """Signing, registry and exchange with other members, when keys or a snapshot are configured."""
        from gateway.exchange.service import Exchange, MemberIdentity
        from gateway.exchange.transports import HTTPTransport
        from gateway.registry.holder import holder_from_settings

        holder = holder_from_settings(self.settings, self.clock)
        identity = MemberIdentity.from_settings(self.settings)
        if holder is None and identity is None:
            return None
        return Exchange(self.settings, lambda: self.store, holder=holder, identity=identity, clock=self.clock,
                        checker=self.checker, transport=HTTPTransport())

    def _hl7v2_channel(self) -> Channel:
        structure = self.mappings.structure("hl7v2-oru-r01")
        adapter = HL7v2Adapter(structure, default_offset=self.settings.timezone,
                               max_message_bytes=self.settings.max_message_bytes)
        terms = Terminology.for_structure(self.mappings, structure)

        def answer(msg: SourceMessage, code: str, note: str | None = None) -> bytes:
            text = build_ack(msg, code, application=self.settings.ack_application,
                             facility=self.settings.issuer_uscc, now=self.clock(), note=note)
            try:
                return text.encode(msg.charset or "utf-8")
            except (UnicodeEncodeError, LookupError):
                return text.encode("utf-8")

        def receipt(msg: SourceMessage, note: str) -> tuple[str, bytes]:
            # Enhanced acknowledgment mode (MSH-15 set): CA, "commit accept". Original mode has no such code:
            # AA, whose MSA-3 says the message is held and what happens next.
            code = "CA" if msg.header.get("accept_ack_type") else "AA"
            return code, answer(msg, code, note)

        return Channel(
            format="hl7v2",
            adapter=adapter,
            map=lambda msg: map_message(msg, terms, self.issuer.uscc),
            build=lambda msg: build_bundle(msg, self.issuer),
            answer=answer,
            code_for=ack_code_for,
            receipt=receipt,
        )

    def _cda_channel(self) -> Channel:
        structure = self.mappings.structure("cda-wst500-7-lab-report")
        adapter = CDAAdapter(structure, member_uscc=self.settings.issuer_uscc,
                             member_miplrn=self.settings.issuer_miplrn, default_offset=self.settings.timezone,
                             max_document_bytes=self.settings.max_message_bytes)
        terms = Terminology.for_structure(self.mappings, structure)

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

        return Channel(
            format="cda",
            adapter=adapter,
            map=lambda msg: _located(msg, lambda: map_message(msg, terms, issuer_of(msg).uscc)),
            build=build,
            answer=_outcome_answer,
            code_for=answer_code,
            answer_type="application/fhir+json",
        )

    def _cdc_csv_channel(self) -> Channel:
        layouts = [s for s in self.mappings.structures.values() if s.get("format") == "cdc-csv"]
        adapter = LabCSVAdapter(layouts, default_offset=self.settings.timezone)
        terms = {str(layout["id"]): Terminology.for_structure(self.mappings, layout) for layout in layouts}
        exam_terms = {str(layout["id"]): ExamTerminology.for_structure(self.mappings, layout) for layout in layouts}

        def map_csv(msg: SourceMessage) -> None:
            layout = msg.extra.get("layout", "")
            if layout not in terms:
                return  # refused while reading (no layout matched the header)
            _located(msg, lambda: map_message(msg, terms[layout], self.issuer.uscc))
            map_exam(msg, exam_terms[layout])

        return Channel(
            format="cdc-csv",
            adapter=adapter,
            map=map_csv,
            build=lambda msg: build_exam_bundle(msg, self.issuer),
            answer=_outcome_answer,
            code_for=ack_code_for,
            answer_type="application/fhir+json",
        )

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

        return Channel(format="fhir", adapter=adapter, map=lambda msg: None, build=build, answer=answer,
                       code_for=ack_code_for, answer_type="application/fhir+json")

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
        """This thread's database connection (opened on first use)."""
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = Store.open(self.settings.database_path, self.clock)
            self._local.store = store
        return store

    def close(self) -> None:
        store = getattr(self._local, "store", None)
        if store is not None:
            store.close()
            self._local.store = None

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
        fails), then they are processed — reading, mapping, checking and signing
        hold no database lock, so other writers go on meanwhile — and every outcome
        is recorded in one transaction; answers are valid only once this returns,
        i.e. after both commits. A unit repeated within the batch is answered as a
        duplicate of its first copy.
        """
        from gateway.store.db import transaction

        with transaction(self.store.db):
            stored = [(unit, *self._insert_raw(ch, unit, channel)) for unit in units]
        outcomes: list[Outcome] = []
        done: dict[int, Outcome] = {}  # processed in this batch, by record id
        for unit, record_id, existing in stored:
            if existing is not None and existing.id in done:  # the same message twice in one batch
                first = done[existing.id]
                outcomes.append(Outcome(Status.DUPLICATE, first.label, ack_code=first.ack_code,
                                        record_id=existing.id, answer=first.answer))
            elif existing is not None:
                outcomes.append(self._duplicate(ch, unit, existing))
            else:
                done[record_id] = self._work(ch, unit, record_id)
                outcomes.append(done[record_id])
        with transaction(self.store.db):
            for (unit, record_id, existing), outcome in zip(stored, outcomes):
                if existing is None:
                    self._record(ch, unit, outcome, channel)
        return outcomes

    def _insert_raw(self, ch: Channel, unit: RawUnit, channel: str, status: str = "received") -> tuple[int, Any]:
        sender, message_id = ch.adapter.identify(unit)
        return self.store.insert_raw(channel=channel, fmt=ch.format, sender=sender, message_id=message_id,
                                     origin=unit.origin, raw=unit.data, status=status)

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
        receipt = ch.receipt
        if receipt is None:
            raise UnsupportedFormat(f"format {ch.format!r} cannot be answered on receipt", "format")
        headers = [ch.adapter.read_header(unit) for unit in units]
        held = [i for i, msg in enumerate(headers) if not msg.errors]
        at_once = [i for i, msg in enumerate(headers) if msg.errors]
        from gateway.store.db import transaction

        with transaction(self.store.db, poll=True):  # the queue reader's transactions are short: no long sleeps
            stored = [self._insert_raw(ch, units[i], channel, "queued") for i in held]
        outcomes: list[Outcome | None] = [None] * len(units)
        for i, (record_id, existing) in zip(held, stored):
            msg = headers[i]
            if existing is None:
                code, answer = receipt(msg, "received and stored; it is processed next, in order of arrival")
                log.info("message format=%s record=%s status=queued", ch.format, record_id)
                status = Status.QUEUED
            else:
                record_id = existing.id
                code, answer = receipt(msg, f"already received (record {existing.id}, {existing.status})")
                status = Status.DUPLICATE
            outcomes[i] = Outcome(status, msg.label(), ack_code=code, record_id=record_id, answer=answer,
                                  message=msg)
        if at_once:
            for i, outcome in zip(at_once, self.ingest_batch(ch, [units[i] for i in at_once], channel=channel)):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def process_queued(self, limit: int = _BATCH) -> list[Outcome]:
        """Work up to ``limit`` held units, oldest first, each recorded in its own transaction.

        Processing is what :meth:`ingest_unit` does after storing the raw input:
        the application ACK (AA/AE/AR with its ERR segments) is kept with the
        message (``gateway messages show``). Run one queue reader per database: a
        second one would work the same units. A unit left ``queued`` by a crash is
        simply worked when the reader starts again.
        """
        outcomes: list[Outcome] = []
        for record_id, fmt, channel, origin, raw in self.store.queued(limit):
            ch = self.channel(fmt)
            unit = RawUnit(raw, 1, origin)
            outcome = self._work(ch, unit, record_id)
            self._record(ch, unit, outcome, channel)
            outcomes.append(outcome)
        return outcomes

    def ingest_unit(self, ch: Channel, unit: RawUnit, *, channel: str) -> Outcome:
        """Store one unit raw, then process it (or answer it as a duplicate)."""
        record_id, existing = self._insert_raw(ch, unit, channel)
        if existing is not None:
            return self._duplicate(ch, unit, existing)
        outcome = self._work(ch, unit, record_id)
        self._record(ch, unit, outcome, channel)
        return outcome

    def _duplicate(self, ch: Channel, unit: RawUnit, existing: Any) -> Outcome:
        label = f"{existing.message_id}" if existing.message_id else f"unit {unit.index}"
        if existing.ack is not None:
            log.info("duplicate format=%s record=%s status=%s", ch.format, existing.id, existing.status)
            return Outcome(Status.DUPLICATE, label, ack_code=existing.ack_code or "", record_id=existing.id,
                           answer=existing.ack, filtered_reason=existing.status)
        # The first copy is still being processed (or was interrupted): ask the sender to retry later.
        msg = ch.adapter.read(unit)
        where = "MSH[1]-10" if ch.format == "hl7v2" else "identifier"
        issue = Issue("error", "duplicate", where,
                      f"a message with this id is already being processed (record {existing.id}); "
                      "retry later", "205")
        msg.issues = [issue]
        return Outcome(Status.DUPLICATE, label, ack_code="AE", issues=[issue], record_id=existing.id,
                       answer=ch.answer(msg, "AE"))

    def _work(self, ch: Channel, unit: RawUnit, record_id: int | None) -> Outcome:
        """Read, filter, map, build, check and sign one unit; writes nothing (see :meth:`_record`)."""
        msg: SourceMessage | None = None
        try:
            msg = ch.adapter.read(unit)
            outcome = Outcome(Status.REFUSED, msg.label(), message=msg)
            if msg.filtered:
                outcome.status, outcome.filtered_reason = Status.FILTERED, msg.filtered
            elif not msg.errors:
                ch.map(msg)
                if not msg.errors:
                    bundle = ch.build(msg)
                    if self.checker is not None:
                        msg.issues.extend(self.checker(bundle))
                    if not msg.errors:
                        outcome.bundle = bundle
                        outcome.status = Status.STORED if record_id is not None else Status.CONVERTED
                        if record_id is not None and self.exchange is not None and self.exchange.identity:
                            # sign stage: what this member issues leaves it signed, with its marks
                            self.exchange.stamp_marks(bundle)
                            outcome.signed, outcome.signed_digest = self.exchange.sign_with_digest(bundle)
            outcome.issues = list(msg.issues)
            outcome.ack_code = ch.code_for(msg)
        except Exception:  # a bug must not lose the message or reach the sender as a stack trace
            log.exception("internal error processing %s unit %s (record %s)", ch.format, unit.index, record_id)
            issue = Issue("error", "exception", "", "internal error in the gateway; the message is kept and "
                          "can be reprocessed", "207")
            msg = msg or SourceMessage(format=ch.format)
            msg.issues = [issue]
            outcome = Outcome(Status.FAILED, msg.label(), ack_code="AE", issues=[issue], message=msg)
        outcome.answer = ch.answer(msg, outcome.ack_code)
        outcome.record_id = record_id
        return outcome

    def _record(self, ch: Channel, unit: RawUnit, outcome: Outcome, channel: str) -> None:
        """Record a worked unit's outcome, resources, signed copy and audit entry (one transaction)."""
        from gateway.audit.events import ingest_record
        from gateway.audit.log import prepare

        assert outcome.record_id is not None
        msg = outcome.message
        # made before the write lock is taken (as the resources' rows are, in Store.finish)
        audit = prepare([ingest_record(
            at=self.clock(), member=self.issuer.uscc, member_name=self.issuer.name, sender=msg.sender if msg else "",
            message_id=(msg.message_id if msg else "") or unit.origin, fmt=ch.format, status=outcome.status.value,
            channel=channel or "file", reason=outcome.errors[0].line() if outcome.errors else None)])
        self.store.finish(outcome.record_id, status=outcome.status.value, ack_code=outcome.ack_code,
                          ack=outcome.answer, issues=outcome.issues,
                          bundle=outcome.bundle if outcome.status is Status.STORED else None,
                          after=lambda db: self._after(db, outcome, audit))
        log.info("message format=%s record=%s status=%s ack=%s reports=%d issues=%d",
                 ch.format, outcome.record_id, outcome.status.value, outcome.ack_code,
                 len(msg.reports) if msg else 0, len(outcome.issues))

    def _after(self, db: sqlite_utils.Database, outcome: Outcome, audit: list[bytes]) -> None:
        """Inside the transaction that records the outcome: signed copy, audit entry, extra hooks."""
        from gateway.audit.log import append_prepared

        if outcome.signed is not None and self.exchange is not None:
            self.exchange.keep_signed(db, outcome.signed, "issued", outcome.record_id, bundle=outcome.bundle,
                                      digest=outcome.signed_digest or None)
        append_prepared(db, audit)
        for hook in self.after_store:
            hook(db, outcome)

    def recover(self) -> int:
        """At start-up: mark messages interrupted by a crash as failed. Returns how many."""
        return self.store.fail_in_flight()


def _units(ch: Channel, data: bytes | IO[bytes], origin: str) -> Iterable[RawUnit]:
    """The units of bytes or of a binary file object (streamed when the adapter can)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return ch.adapter.split(bytes(data), origin)  # type: ignore[no-any-return]
    stream = getattr(ch.adapter, "split_stream", None)
    if stream is not None:
        return stream(data, origin)  # type: ignore[no-any-return]
    return ch.adapter.split(data.read(), origin)  # type: ignore[no-any-return]


# Issue locations the shared mapping stage writes as "<location>-<HL7 field>", and the fact each names.
_FIELD_FACTS = {"3": "code", "5": "value", "6": "unit", "8": "flags", "11": "status"}


def _located(msg: SourceMessage, run: Callable[[], None]) -> None:
    """Run the shared mapping stage, then give its new issues the source's own locations.

    ``gateway.mapping.concepts`` locates issues HL7-style (``OBX[3]-6``). For
    CDA and CSV each record knows where its facts were (``where``: an XPath,
    ``row 3 column 单位``); issues are relocated there, so no HL7 field number
    reaches a CDA or CSV sender.
    """
    before = len(msg.issues)
    run()
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
