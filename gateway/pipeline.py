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

import datetime as _dt
import enum
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from gateway.adapters.base import RawUnit, SourceMessage
from gateway.adapters.hl7v2 import HL7v2Adapter, ack_code_for, build_ack
from gateway.config import Settings
from gateway.errors import Issue, UnsupportedFormat
from gateway.fhir.bundle import build_bundle
from gateway.fhir.parties import Issuer
from gateway.mapping.concepts import Terminology, map_message
from gateway.mapping.tables import MappingSet, load_mappings
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


Checker = Callable[[dict[str, Any]], list[Issue]]
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
        self.checker = checker
        self.after_store: list[AfterStore] = []
        self.channels: dict[str, Channel] = {}
        self._local = threading.local()
        self.add_channel(self._hl7v2_channel())

    # -- set-up --------------------------------------------------------------------------

    def _hl7v2_channel(self) -> Channel:
        structure = self.mappings.structure("hl7v2-oru-r01")
        adapter = HL7v2Adapter(structure, default_offset=self.settings.timezone,
                               max_message_bytes=self.settings.max_message_bytes)
        terms = Terminology.for_structure(self.mappings, structure)

        def answer(msg: SourceMessage, code: str) -> bytes:
            text = build_ack(msg, code, application=self.settings.ack_application,
                             facility=self.settings.issuer_uscc, now=self.clock())
            try:
                return text.encode(msg.charset or "utf-8")
            except (UnicodeEncodeError, LookupError):
                return text.encode("utf-8")

        return Channel(
            format="hl7v2",
            adapter=adapter,
            map=lambda msg: map_message(msg, terms, self.issuer.uscc),
            build=lambda msg: build_bundle(msg, self.issuer),
            answer=answer,
            code_for=ack_code_for,
        )

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

    def convert(self, data: bytes, fmt: str, origin: str = "") -> Iterator[Outcome]:
        """Dry run: read, map, build and check every unit of ``data``; store nothing.

        :raises UnsupportedFormat: unknown format.
        """
        ch = self.channel(fmt)
        for unit in ch.adapter.split(data, origin):
            yield self._process(ch, unit, record_id=None)

    def ingest(self, data: bytes, fmt: str, *, channel: str, origin: str = "") -> list[Outcome]:
        """Store and process every unit of ``data``; one outcome (with its answer) per unit.

        :raises UnsupportedFormat: unknown format.
        """
        ch = self.channel(fmt)
        return [self.ingest_unit(ch, unit, channel=channel) for unit in ch.adapter.split(data, origin)]

    def ingest_unit(self, ch: Channel, unit: RawUnit, *, channel: str) -> Outcome:
        """Store one unit raw, then process it (or answer it as a duplicate)."""
        sender, message_id = ch.adapter.identify(unit)
        record_id, existing = self.store.insert_raw(channel=channel, fmt=ch.format, sender=sender,
                                                    message_id=message_id, origin=unit.origin, raw=unit.data)
        if existing is not None:
            return self._duplicate(ch, unit, existing)
        return self._process(ch, unit, record_id=record_id)

    def _duplicate(self, ch: Channel, unit: RawUnit, existing: Any) -> Outcome:
        label = f"{existing.message_id}" if existing.message_id else f"unit {unit.index}"
        if existing.ack is not None:
            log.info("duplicate format=%s record=%s status=%s", ch.format, existing.id, existing.status)
            return Outcome(Status.DUPLICATE, label, ack_code=existing.ack_code or "", record_id=existing.id,
                           answer=existing.ack, filtered_reason=existing.status)
        # The first copy is still being processed (or was interrupted): ask the sender to retry later.
        msg = ch.adapter.read(unit)
        issue = Issue("error", "duplicate", "MSH[1]-10",
                      f"a message with this id is already being processed (record {existing.id}); "
                      "retry later", "205")
        msg.issues = [issue]
        return Outcome(Status.DUPLICATE, label, ack_code="AE", issues=[issue], record_id=existing.id,
                       answer=ch.answer(msg, "AE"))

    def _process(self, ch: Channel, unit: RawUnit, record_id: int | None) -> Outcome:
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
        if record_id is not None:
            outcome.record_id = record_id
            self.store.finish(record_id, status=outcome.status.value, ack_code=outcome.ack_code,
                              ack=outcome.answer, issues=outcome.issues,
                              bundle=outcome.bundle if outcome.status is Status.STORED else None,
                              after=(lambda db: self._after(db, outcome)) if self.after_store else None)
        log.info("message format=%s record=%s status=%s ack=%s reports=%d issues=%d",
                 ch.format, record_id, outcome.status.value, outcome.ack_code,
                 len(msg.reports) if msg else 0, len(outcome.issues))
        return outcome

    def _after(self, db: sqlite_utils.Database, outcome: Outcome) -> None:
        for hook in self.after_store:
            hook(db, outcome)

    def recover(self) -> int:
        """At start-up: mark messages interrupted by a crash as failed. Returns how many."""
        return self.store.fail_in_flight()
