"""Ingest: member systems submit results over HTTP.

``POST /ingest/hl7v2`` takes one or more ER7 messages (plain or MLLP-framed)
and answers with the HL7 ACK of each (``AA`` 200, ``AE`` 422, ``AR`` 400); a
client that sends ``Accept: application/fhir+json`` gets an OperationOutcome
with one issue per problem instead. ``POST /ingest/cda`` (one WS/T 500.7
document, ``application/xml``) and ``POST /ingest/cdc-csv`` (an occupational-
health exam export, ``text/csv``) are always answered with an OperationOutcome
(``application/fhir+json``), with the same status codes. An HL7 v3
互联互通 message (``POLB_IN224000UV01``, bare or in a SOAP envelope) posted
to ``/ingest/cda`` is answered in kind: an ``MCCI_IN000002UV01``
acknowledgement (``application/hl7-v3+xml``; in a SOAP envelope,
``application/soap+xml`` or ``text/xml`` by the SOAP version), HTTP 200 with
the code in the acknowledgement and ``X-Ack-Code``, unless the client asks
for ``application/fhir+json``. Other formats register the same way.

The body is read as a stream: a CDC export is worked exam by exam while it is
read (the server has spooled a large body to a temporary file), 32 units at a
time, and nothing of a unit is kept once its batch is done but a short summary
for the answer, so a large export takes little memory. The answer never echoes
unbounded input and stays bounded as a whole: each unit's label and issues are
cut to a bounded size and number, and past :data:`ISSUES_IN_ANSWER` issues in
all the rest are only counted — the answer ends with how many units ended in
each status and the range of their message records, for ``gateway messages
list`` and ``gateway messages show ID``, where everything about a unit stays.
"""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import IO, Any

from flask import Blueprint, Response, current_app, request

from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v3 import answer_media_type
from gateway.adapters.streams import Rejoined
from gateway.api.app import pipeline_of
from gateway.api.errors import outcome_response
from gateway.auth import require_role
from gateway.errors import InputError, Issue, ParseError, WaitingBehind, shown

bp = Blueprint("ingest", __name__)

_HTTP_FOR_ACK = {"AA": 200, "AE": 422, "AR": 400}
#: Formats whose file may come as a browser's form upload (multipart/form-data) as well as the body itself.
_UPLOADED = ("cdc-csv", "cda", "hl7v2")
_RANK = {"AA": 0, "AE": 1, "AR": 2}
_BATCH = 32  # units stored and worked together (two commits per batch)
_PEEK = 65536
_ISSUES_PER_UNIT = 20  # more are counted, not listed
_LABEL_CHARS = 80
#: Issues listed in one answer at most, whatever the number of units; the rest are counted.
ISSUES_IN_ANSWER = 200


def _units(adapter: Any, stream: IO[bytes], origin: str) -> Iterator[Any]:
    """The units of the request body, read lazily where the format allows it.

    :raises ParseError: the body is empty (400).
    """
    head = stream.read(_PEEK)
    if len(head) < _PEEK and not head.strip():
        raise ParseError("is empty: send the message(s) as the body", "body", code="required")
    if len(head) < _PEEK:
        return iter(adapter.split(head, origin))
    split_stream = getattr(adapter, "split_stream", None)
    if split_stream is not None:
        return iter(split_stream(io.BufferedReader(Rejoined(head, stream), buffer_size=_PEEK), origin))
    return iter(adapter.split(head + stream.read(), origin))  # bounded by max_request_bytes


def _label(text: str) -> str:
    return text if len(text) <= _LABEL_CHARS else f"{text[:_LABEL_CHARS]}… ({len(text)} characters)"


class _Tally:
    """What an answer says of a request's units: their first issues, up to :data:`ISSUES_IN_ANSWER`; then only
    counts by status and the range of message records (constant memory, however many units there are).

    The units refused or failed come first, whatever their place in the request: a LIS reading an answer's
    errors finds the exam to correct even when thousands of units stored with warnings came before it; and
    when some were not listed, the account says so as an error."""

    def __init__(self) -> None:
        self.failing: list[Issue] = []  # of units refused or failed
        self.issues: list[Issue] = []  # of the others
        self.statuses: dict[str, int] = {}
        self.unlisted = 0
        self.first: int | None = None
        self.last: int | None = None

    def add(self, o: Any) -> None:
        self.statuses[o.status.value] = self.statuses.get(o.status.value, 0) + 1
        if o.record_id is not None:
            self.first = o.record_id if self.first is None else min(self.first, o.record_id)
            self.last = o.record_id if self.last is None else max(self.last, o.record_id)
        kept = self.failing if o.status.value in _NOT_TAKEN else self.issues
        if len(kept) >= ISSUES_IN_ANSWER:
            self.unlisted += len(o.issues) + (o.bundle is not None or o.status.value in ("filtered", "duplicate"))
            return
        summary = _summary(o)
        room = ISSUES_IN_ANSWER - len(kept)
        kept += summary[:room]
        self.unlisted += max(0, len(summary) - room)

    def answer(self, count: int) -> list[Issue]:
        """The issues of the answer: those listed (the refused and failed units' first), then — when some were
        not — the whole request's account."""
        listed = self.failing + self.issues
        unlisted = self.unlisted + max(0, len(listed) - ISSUES_IN_ANSWER)
        listed = listed[:ISSUES_IN_ANSWER]
        if not unlisted:
            return listed
        statuses = ", ".join(f"{status} {n}" for status, n in sorted(self.statuses.items()))
        records = (f"; they are messages {self.first} to {self.last}: see `gateway messages list` and "
                   "`gateway messages show ID`" if self.first is not None else "")
        not_taken = sum(n for status, n in self.statuses.items() if status in _NOT_TAKEN)
        return [*listed, Issue("error" if not_taken else "information", "processing" if not_taken else "informational",
                               "", f"{count} unit(s) in all ({statuses}); {unlisted} more issue(s) not "
                                   f"listed here (an answer lists {ISSUES_IN_ANSWER} at most){records}")]


#: What became of a unit that was not taken: its issues come first in an answer.
_NOT_TAKEN = frozenset({"refused", "failed"})


def _summary(o: Any) -> list[Issue]:
    """A bounded account of one unit: what became of it and its first issues."""
    label = _label(o.label)
    issues: list[Issue] = []
    if o.bundle is not None or o.status.value in ("filtered", "duplicate"):
        detail = f"Bundle/{o.bundle['id']}" if o.bundle else o.status.value
        issues.append(Issue("information", "informational", "", f"{label}: {o.status.value} ({detail})"))
    issues += [Issue(i.severity, i.code, i.location, i.message, extra={"label": label})
               for i in o.issues[:_ISSUES_PER_UNIT]]
    if len(o.issues) > _ISSUES_PER_UNIT:
        where = f"`gateway messages show {o.record_id}`" if o.record_id else "the gateway's message list"
        issues.append(Issue("information", "informational", "",
                            f"{label}: {len(o.issues) - _ISSUES_PER_UNIT} more issue(s); see {where}"))
    return issues


def _not_before_the_queue(pipeline: Any, channel: Any, batch: list[RawUnit]) -> None:
    """:class:`WaitingBehind` when a message's sender has earlier messages waiting in the processing queue (queued
    by the MLLP listeners with ``mllp_ack = received``, or by an earlier run and being worked by the catch-up as a
    gateway starts): worked now, it would be recorded before them — a correction before the report it corrects."""
    senders = []
    for unit in batch:
        try:
            senders.append(channel.adapter.identify(unit)[0])
        except Exception:  # noqa: BLE001 - unreadable: its reading says what is wrong with it
            continue
    waiting = pipeline.store.queued_from(channel.format, senders)
    if waiting:
        raise WaitingBehind(f"earlier messages of the sender {shown(waiting[0])} wait in the processing queue, and "
                            "a sender's messages are recorded in the order they came: send this again in a few "
                            "seconds (what this request already had answered is recognised as a resend)", "MSH-3")


@bp.post("/ingest/<fmt>")
@require_role("submitter", "admin")
def ingest(fmt: str) -> Response:
    """Store and process the submitted messages; answer each.

    :raises ParseError: empty body (400).
    :raises UnsupportedFormat: no such input format.
    """
    pipeline = pipeline_of(current_app)
    channel = pipeline.channel(fmt)
    wants_outcome = "application/fhir+json" in request.headers.get("Accept", "")
    as_outcome = channel.answer_type == "application/fhir+json" or wants_outcome
    stream: IO[bytes] = request.stream
    if request.mimetype == "multipart/form-data" and fmt in _UPLOADED:
        # a browser's form upload (curl -F file=@exams.csv): the file it carries, not the form's own bytes (whose
        # boundary line was read as a title above the CSV header)
        files = [f for f in request.files.values() if f.filename]
        if len(files) != 1:
            raise InputError(f"a form upload here carries one file, this one carries {len(files)}: send each file "
                             "on its own (or the file itself as the body)", "body")
        stream = files[0].stream
    units = _units(channel.adapter, stream, request.remote_addr or "")
    worst, count = "AA", 0
    refused_for_good = 0  # answers other than AA that are not "its first copy is being worked now: retry"
    tally = _Tally()
    answers: list[bytes] = []
    v3_answers: list[tuple[bytes, str]] = []  # HL7 v3 acknowledgements (CDA channel) and their media types
    while batch := list(itertools.islice(units, _BATCH)):
        if channel.receipt is not None:  # a format the MLLP listeners may queue: a sender's messages in their order
            _not_before_the_queue(pipeline, channel, batch)
        for o in pipeline.ingest_batch(channel, batch, channel="http"):  # outcomes are dropped batch by batch
            count += 1
            code = o.ack_code or "AA"
            if _RANK.get(code, 1) > _RANK.get(worst, 1):
                worst = code
            if code != "AA" and not o.retry_later:
                refused_for_good += 1
            v3_type = None if wants_outcome or fmt != "cda" else answer_media_type(o.answer)
            if v3_type is not None:
                v3_answers.append((o.answer, v3_type))
            if as_outcome:
                tally.add(o)
            else:
                answers.append(o.answer)
    if not count:
        raise InputError("no message found in the request body", "body")
    if v3_answers and len(v3_answers) == count:
        # An HL7 v3 message is answered in kind: its MCCI_IN000002UV01 acknowledgement says AA/AE/AR, and the
        # HTTP status is 200 as web-service clients of the 互联互通 platforms expect (X-Ack-Code repeats the code).
        body, media_type = v3_answers[0] if count == 1 else (b"".join(a for a, _ in v3_answers), v3_answers[0][1])
        return Response(body, status=200, content_type=f"{media_type}; charset=utf-8",
                        headers={"X-Ack-Code": worst})
    status = _HTTP_FOR_ACK.get(worst, 422)
    headers = {"X-Ack-Code": worst}
    if worst != "AA" and not refused_for_good:
        # what was not taken is only a copy sent while its first copy is being worked (two requests at once): a
        # passing state, to be sent again shortly — not a 422, which a client takes as final
        status, headers["Retry-After"] = 503, "5"
    if as_outcome:
        return outcome_response(tally.answer(count), status, headers=headers)
    return Response(b"".join(answers), status=status, mimetype="x-application/hl7-v2+er7", headers=headers)
