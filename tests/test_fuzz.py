"""Fuzzing: tens of thousands of mutated inputs through the four intakes, none unhandled.

Seeded mutations of the real samples (tests/fuzzing.py) go through each
channel's reader, mapping and answer (ACK, OperationOutcome: most of them, as
it is the quickest way in), through the dry run (:meth:`Pipeline.convert`:
read, map, build, profile check), through real ingest
at a member with a signing key and a registry snapshot (store, marks, signing),
and over HTTP (``POST /ingest/*``, ``POST /fhir``, ``$validate``, searches with
odd query strings). For every input: nothing raises, no message ends ``failed``
(the pipeline's catch-all hides a bug), every refusal names the field it is
about, no answer quotes a long value back whole, the dry run and real ingest
give the same verdict and issues, and HTTP never answers 500.

The seed is fixed (``GATEWAY_FUZZ_SEED`` changes it): 51,600 inputs in all.
``GATEWAY_FUZZ_SCALE=20`` runs twenty times as many (about 1 M, in about 20
minutes); a failure prints each kind of problem with its first input and traceback.
"""
from __future__ import annotations

import collections
import datetime as _dt
import json
import logging
import os
import random
import re
import time
import traceback
from typing import Any

import pytest

import fuzzing
from conftest import Clock
from gateway.pipeline import Status

pytestmark = pytest.mark.filterwarnings("ignore:The .warn. method is deprecated:DeprecationWarning")

SEED = int(os.environ.get("GATEWAY_FUZZ_SEED", "20261122"))
SCALE = float(os.environ.get("GATEWAY_FUZZ_SCALE", "1"))
CST = _dt.timezone(_dt.timedelta(hours=8))
#: Inputs per format read, mapped and answered by each channel; through the whole dry run (build and profile
#: check too); through real ingest; and over HTTP. At scale 1: over 50,000 in all, in well under a minute.
READ = {"hl7v2": 32_000, "cdc-csv": 4_500, "cda": 1_500, "fhir": 2_000}
CONVERT = {"hl7v2": 6_500, "cdc-csv": 1_200, "cda": 400, "fhir": 900}
INGEST = {"hl7v2": 600, "cdc-csv": 160, "cda": 100, "fhir": 140}
HTTP = {"hl7v2": 300, "cdc-csv": 150, "cda": 100, "fhir": 200, "validate": 200, "search": 650}
#: Where a refusal of each format points: an HL7 field, an XPath, a CSV row (and column), a FHIR path.
LOCATION = {
    # (a Bundle the message's fields build that breaks a profile rule: the FHIRPath of the element, e.g. a report
    # without results at Bundle.entry[4].resource.result)
    "hl7v2": re.compile(r"^([A-Z][A-Z0-9]{2}(\[\d+\])?(-\d+)?|Bundle\.entry\[\d+\]\.resource\.)"),
    "cda": re.compile(r"^/"),
    "cdc-csv": re.compile(r"^(rows? \d|file$)"),
    "fhir": re.compile(r"^([A-Z][A-Za-z]+(\.|\[|$)|line \d+, column \d+$|resourceType$)"),
}
#: What no answer may contain: a run of the long values the mutations insert (an ACK may echo an HL7 ST of 199).
ECHOES = (b"x" * 250, b"9" * 250, "中".encode("utf-8") * 250)


def n(count: int) -> int:
    return max(1, int(count * SCALE))


def test_fuzz_mix_drives_at_least_50000_inputs() -> None:
    """The fixed run (scale 1) of the tests below drives at least 50,000 inputs in all."""
    assert sum(sum(share.values()) for share in (READ, CONVERT, INGEST, HTTP)) >= 50_000


class Bugs:
    """Every unhandled input, grouped by kind, with the first input and traceback of each."""

    def __init__(self) -> None:
        self.count: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.first: dict[tuple[str, ...], str] = {}

    def add(self, key: tuple[str, ...], data: bytes, detail: str = "") -> None:
        self.count[key] += 1
        self.first.setdefault(key, f"{data[:300]!r}{'...' if len(data) > 300 else ''}\n{detail}")

    def report(self) -> str:
        lines = [f"{sum(self.count.values())} unhandled inputs in {len(self.count)} kinds:"]
        for key, c in self.count.most_common(20):
            lines.append(f"  {c} x {' | '.join(key)}\n    first input: {self.first[key]}")
        return "\n".join(lines)


class Exceptions(logging.Handler):
    """Keeps the exception the pipeline logs when it turns an internal error into a ``failed`` outcome."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str = ""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))[-1500:]
        self.last = text


def test_the_hl7_library_logs_nothing_of_a_message(pipeline, caplog) -> None:
    """python-hl7 logs escapes it cannot read with the field's text: patient data, so the adapter mutes it."""
    sample = next(m for m in fuzzing.hl7_samples() if b"\rPID|" in m)
    data = re.sub(rb"\rPID\|([^|\r]*)\|([^|\r]*)\|", rb"\rPID|\1|\2|WANG\\Z99\\WU\\X0\\^", sample, count=1)
    assert b"WANG\\Z99\\WU" in data
    ch = pipeline.channel("hl7v2")
    with caplog.at_level(logging.DEBUG):
        for unit in ch.adapter.split(data, "test"):
            ch.map(ch.adapter.read(unit))
    assert not [r for r in caplog.records if "WANG" in r.getMessage() or "WU" in r.getMessage()], \
        [r.getMessage() for r in caplog.records]


@pytest.fixture
def exceptions():
    handler = Exceptions()
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{tb[-1].filename.rsplit('/', 2)[-1]}:{tb[-1].lineno}" if tb else ""


def check_outcome(fmt: str, outcome: Any, data: bytes, bugs: Bugs, exceptions: Exceptions) -> None:
    """One outcome: not failed, refusals located, no long echo."""
    if outcome.status is Status.FAILED:
        last = exceptions.last.strip().splitlines()
        bugs.add((fmt, "failed", (last[-1] if last else "")[-160:]), data, exceptions.last)
        return
    for issue in outcome.issues:
        if issue.severity == "error" and not LOCATION[fmt].match(issue.location or ""):
            bugs.add((fmt, "refusal without a field", issue.location[:40], issue.message[:80]), data)
    for echo in ECHOES:
        if echo in outcome.answer:
            bugs.add((fmt, "long value echoed", repr(echo[:6])), data,
                     outcome.answer[:600].decode("utf-8", "replace"))


def test_fuzz_read_map_answer(convert_pipeline) -> None:
    """Mutated HL7 v2, CDA, CDC CSV and FHIR JSON read, mapped and answered (ACK, OperationOutcome) by each channel."""
    pipeline = convert_pipeline
    rng = random.Random(SEED + 3)
    bugs = Bugs()
    total = 0
    for fmt, count in READ.items():
        ch = pipeline.channel(fmt)
        for data in fuzzing.inputs(rng, fmt, n(count)):
            total += 1
            try:
                for unit in ch.adapter.split(data, "fuzz"):
                    ch.adapter.identify(unit)
                    msg = ch.adapter.read(unit)
                    if not msg.errors and not msg.filtered:
                        ch.map(msg)
                    answer = ch.answer(msg, ch.code_for(msg))
                    for issue in msg.errors:
                        if not LOCATION[fmt].match(issue.location or ""):
                            bugs.add((fmt, "refusal without a field", issue.location[:40], issue.message[:80]), data)
                    for echo in ECHOES:
                        if echo in answer:
                            bugs.add((fmt, "long value echoed", repr(echo[:6])), data,
                                     answer[:600].decode("utf-8", "replace"))
            except Exception as exc:  # noqa: BLE001 - every escape is the bug reported
                bugs.add((fmt, "raised", type(exc).__name__, _where(exc)), data, traceback.format_exc()[-1500:])
    assert total >= n(sum(READ.values()))
    assert not bugs.count, bugs.report()


def test_fuzz_dry_run(convert_pipeline, exceptions) -> None:
    """Mutated HL7 v2, CDA, CDC CSV and FHIR JSON through read, map, build and profile check."""
    pipeline = convert_pipeline
    rng = random.Random(SEED)
    bugs = Bugs()
    total = 0
    for fmt, count in CONVERT.items():
        for data in fuzzing.inputs(rng, fmt, n(count)):
            total += 1
            try:
                for outcome in pipeline.convert(data, fmt, "fuzz"):
                    check_outcome(fmt, outcome, data, bugs, exceptions)
            except Exception as exc:  # noqa: BLE001 - every escape is the bug reported
                bugs.add((fmt, "raised", type(exc).__name__, _where(exc)), data, traceback.format_exc()[-1500:])
    assert total >= n(sum(CONVERT.values()))
    assert not bugs.count, bugs.report()


@pytest.fixture
def member(tmp_path):
    """A member gateway with a signing key, certificate and registry snapshot (the demo's 通江)."""
    from gateway.demo.world import build_world

    world = build_world(tmp_path, Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)),
                        {"tongjiang": "http://tongjiang.test"}, members=("tongjiang",))
    gw = world.gateways["tongjiang"]
    yield gw
    gw.pipeline.close()


#: What only a stored report can tell (a dry run stores nothing to compare with): the results a copy leaves out of a
#: report stored before, a CDC exam correcting the one stored before (and what it leaves out of it), a report a
#: stored correction supersedes, a CDA report another document holds current.
_STORED_STATE = ("was stored before with ", "corrects a version with ", "is superseded by ",
                 "is held current by another document")
#: ... and an HL7 v2 report whose number is stored for another patient (a mutated PID under the same OBR-3): refused
#: when stored, which a dry run cannot tell
_OTHER_PATIENT = "was stored for another patient: a report number names one report of one patient for good"


def _verdict(outcome: Any) -> tuple[str, list[tuple[str, str, str, str]]]:
    """Status and issues, but for what only a stored report can tell (:data:`_STORED_STATE`)."""
    status = {Status.CONVERTED: "accepted", Status.STORED: "accepted"}.get(outcome.status, outcome.status.value)
    errors = [i for i in outcome.issues if i.severity == "error"]
    if errors and all(_OTHER_PATIENT in i.message for i in errors):
        return "stored state", []
    return status, [(i.severity, i.code, i.location, i.message) for i in outcome.issues
                    if not (i.code == "business-rule" and any(s in i.message for s in _STORED_STATE))
                    and "was stored before with other content: this exam corrects it" not in i.message]


def _unique(fmt: str, data: bytes, tag: str) -> bytes:
    """The input with its message ids made unique, so that real ingest does not answer it as a duplicate."""
    if fmt == "hl7v2":
        return re.sub(rb"^(MSH\|[^\r]*?\|[^|\r]*\|[^|\r]*\|[^|\r]*\|[^|\r]*\|[^|\r]*\|[^|\r]*\|[^|\r]*\|)",
                      lambda m: m.group(1) + tag.encode(), data, count=1)
    if fmt == "cda":  # the 文档流水号: other content under a stored one is refused as a conflict
        return re.sub(rb'(<id root="2\.16\.156\.10011\.1\.1" extension=")', lambda m: m.group(1) + tag.encode(),
                      data, count=1)
    if fmt == "fhir":  # Bundle.identifier: likewise
        return re.sub(rb'("identifier"\s*:\s*\{[^{}]*?"value"\s*:\s*")', lambda m: m.group(1) + tag.encode(), data,
                      count=1)
    return data


def test_fuzz_dry_run_and_ingest_agree(member, exceptions) -> None:
    """Real ingest (store, marks, signing) of mutated inputs: never failed, and the same verdict as the dry run."""
    rng = random.Random(SEED + 1)
    bugs = Bugs()
    pipe = member.pipeline
    for fmt, count in INGEST.items():
        for k, data in enumerate(fuzzing.inputs(rng, fmt, n(count))):
            data = _unique(fmt, data, f"FZ{k}")
            try:
                dry = list(pipe.convert(data, fmt, "fuzz"))
                real = pipe.ingest(data, fmt, channel="http", origin="fuzz")
            except Exception as exc:  # noqa: BLE001
                bugs.add((fmt, "raised", type(exc).__name__, _where(exc)), data, traceback.format_exc()[-1500:])
                continue
            for outcome in real:
                check_outcome(fmt, outcome, data, bugs, exceptions)
            if len(dry) != len(real):
                bugs.add((fmt, "dry run and ingest differ in units"), data)
                continue
            for d, r in zip(dry, real):
                if r.status is Status.DUPLICATE or r.status is Status.FAILED:
                    continue
                if _verdict(r)[0] != "stored state" and _verdict(d) != _verdict(r):
                    bugs.add((fmt, "dry run and ingest disagree", _verdict(d)[0], _verdict(r)[0]), data,
                             f"dry run: {_verdict(d)}\ningest: {_verdict(r)}"[:1500])
    assert not bugs.count, bugs.report()


def _said(method: str, resp: Any) -> bytes:
    """What an answer says of the request itself: all of it, but of a search result only its links, and nothing of
    a resource read (results stored earlier may hold long values: they were sent as such, not echoed)."""
    if method != "GET" or resp.status_code != 200 or not resp.is_json:
        return resp.data
    body = resp.get_json(silent=True)
    if isinstance(body, dict) and body.get("resourceType") == "Bundle" and body.get("type") == "searchset":
        return json.dumps(body.get("link", [])).encode()
    return b"" if isinstance(body, dict) and body.get("resourceType") != "OperationOutcome" else resp.data


def test_fuzz_http(member) -> None:
    """Mutated bodies and query strings over HTTP: never a 500, never a long value echoed."""
    rng = random.Random(SEED + 2)
    bugs = Bugs()
    client = member.app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {member.token}"
    started = time.monotonic()
    requests: list[tuple[str, str, bytes]] = []
    for fmt in ("hl7v2", "cdc-csv", "cda"):
        requests += [("POST", f"/ingest/{fmt}", _unique(fmt, d, f"HT{k}"))
                     for k, d in enumerate(fuzzing.inputs(rng, fmt, n(HTTP[fmt])))]
    requests += [("POST", "/fhir", d) for d in fuzzing.inputs(rng, "fhir", n(HTTP["fhir"]))]
    requests += [("POST", rng.choice(["/fhir/Observation/$validate", "/fhir/Bundle/$validate"]), d)
                 for d in fuzzing.inputs(rng, "fhir", n(HTTP["validate"]))]
    for _ in range(n(HTTP["search"])):
        path = rng.choice(["/fhir/Observation", "/fhir/DiagnosticReport", "/fhir/Patient", "/fhir/AuditEvent",
                           "/fhir/StructureDefinition", "/fhir/Observation/" + rng.choice(["x", "9" * 400, "%00"])])
        requests.append(("GET", f"{path}?{fuzzing.mutate_query(rng)}", b""))
    for method, path, body in requests:
        try:
            resp = client.open(path, method=method, data=body)
        except Exception as exc:  # noqa: BLE001
            bugs.add((path.split("?")[0][:30], "raised", type(exc).__name__, _where(exc)), body,
                     traceback.format_exc()[-1500:])
            continue
        if resp.status_code >= 500:
            bugs.add((method, path.split("?")[0][:30], str(resp.status_code)), path.encode() + b" " + body,
                     resp.get_data(as_text=True)[:300])
        for echo in ECHOES:
            if echo in _said(method, resp):
                bugs.add((method, path.split("?")[0][:30], "long value echoed"), path.encode() + b" " + body,
                         resp.get_data(as_text=True)[:300])
    assert not bugs.count, bugs.report()
    assert time.monotonic() - started < 120 * SCALE
