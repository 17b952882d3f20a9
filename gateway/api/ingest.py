"""Ingest: member systems submit results over HTTP.

``POST /ingest/hl7v2`` takes one or more ER7 messages (plain or MLLP-framed)
and answers with the HL7 ACK of each (``AA`` 200, ``AE`` 422, ``AR`` 400); a
client that sends ``Accept: application/fhir+json`` gets an OperationOutcome
with one issue per problem instead. ``POST /ingest/cda`` (one WS/T 500.7
document, ``application/xml``) and ``POST /ingest/cdc-csv`` (an occupational-
health exam export, ``text/csv``) are always answered with an OperationOutcome
(``application/fhir+json``), with the same status codes. Other formats
register the same way.

The body is read as a stream: a CDC export is worked exam by exam while it is
read (the server has spooled a large body to a temporary file), 32 units at a
time, and only a short summary of each unit is kept for the answer, so a large
export takes little memory. The answer never echoes unbounded input: each
unit's label and issues are cut to a bounded size and number; everything about
a unit stays available to the operator with ``gateway messages show ID``.
"""
from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import IO, Any

from flask import Blueprint, Response, current_app, request

from gateway.api.app import pipeline_of
from gateway.api.errors import outcome_response
from gateway.auth import require_role
from gateway.errors import InputError, Issue

bp = Blueprint("ingest", __name__)

_HTTP_FOR_ACK = {"AA": 200, "AE": 422, "AR": 400}
_RANK = {"AA": 0, "AE": 1, "AR": 2}
_BATCH = 32  # units stored and worked together (two commits per batch)
_PEEK = 65536
_ISSUES_PER_UNIT = 20  # more are counted, not listed
_LABEL_CHARS = 80


class _Rejoined(io.RawIOBase):
    """The bytes already read from a stream, followed by the rest of it."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        super().__init__()
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _units(adapter: Any, stream: IO[bytes], origin: str) -> Iterator[Any]:
    """The units of the request body, read lazily where the format allows it.

    :raises InputError: the body is empty.
    """
    head = stream.read(_PEEK)
    if len(head) < _PEEK and not head.strip():
        raise InputError("request body is empty: send the message(s) as the body", "body")
    if len(head) < _PEEK:
        return iter(adapter.split(head, origin))
    split_stream = getattr(adapter, "split_stream", None)
    if split_stream is not None:
        return iter(split_stream(io.BufferedReader(_Rejoined(head, stream), buffer_size=_PEEK), origin))
    return iter(adapter.split(head + stream.read(), origin))  # bounded by max_request_bytes


def _label(text: str) -> str:
    return text if len(text) <= _LABEL_CHARS else f"{text[:_LABEL_CHARS]}… ({len(text)} characters)"


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


@bp.post("/ingest/<fmt>")
@require_role("submitter", "admin")
def ingest(fmt: str) -> Response:
    """Store and process the submitted messages; answer each.

    :raises InputError: empty body.
    :raises UnsupportedFormat: no such input format.
    """
    pipeline = pipeline_of(current_app)
    channel = pipeline.channel(fmt)
    as_outcome = (channel.answer_type == "application/fhir+json"
                  or "application/fhir+json" in request.headers.get("Accept", ""))
    units = _units(channel.adapter, request.stream, request.remote_addr or "")
    worst, count = "AA", 0
    issues: list[Issue] = []
    answers: list[bytes] = []
    while batch := list(itertools.islice(units, _BATCH)):
        for o in pipeline.ingest_batch(channel, batch, channel="http"):  # outcomes are dropped batch by batch
            count += 1
            code = o.ack_code or "AA"
            if _RANK.get(code, 1) > _RANK.get(worst, 1):
                worst = code
            if as_outcome:
                issues += _summary(o)
            else:
                answers.append(o.answer)
    if not count:
        raise InputError("no message found in the request body", "body")
    status = _HTTP_FOR_ACK.get(worst, 422)
    if as_outcome:
        return outcome_response(issues, status, headers={"X-Ack-Code": worst})
    return Response(b"".join(answers), status=status, mimetype="x-application/hl7-v2+er7",
                    headers={"X-Ack-Code": worst})
