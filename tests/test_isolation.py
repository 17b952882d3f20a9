"""Isolation: whatever one message does, it ends alone, and every other message of its batch gets its own answer.

Inputs are the MLLP sample's first message (``tests/data/hl7v2/mllp-framed.hl7``), each copy with its own MSH-10,
and the same message with a NUL byte in MSH-18 (a character set name no codec has). Stages are broken for one
message only (by its MSH-10) with monkeypatch; the others must be stored and answered as if nothing happened.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from hl7.client import MLLPClient

from conftest import DATA, TONGJIANG, mllp_codes
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.cli import cli
from gateway.mllp import MLLPServer
from gateway.pipeline import Pipeline, Status

GOOD = split_messages((DATA / "hl7v2" / "mllp-framed.hl7").read_bytes())[0]
PATIENT_ID = b"511921198001011237"  # the sample patient's 身份证号: never in a log line or audit entry


def copy_of(tag: str, message: bytes = GOOD) -> bytes:
    return message.replace(b"TJ2406100001", tag.encode())


def with_charset(message: bytes, charset: bytes) -> bytes:
    first, _, rest = message.partition(b"\r")
    fields = first.split(b"|")
    fields += [b""] * (18 - len(fields))
    fields[17] = charset
    return b"|".join(fields) + b"\r" + rest


NUL_CHARSET = with_charset(copy_of("NUL0001"), b"UNICODE UTF-8\x00")


def msa(ack: bytes) -> list[str]:
    return next(s for s in ack.decode("utf-8").split("\r") if s.startswith("MSA")).split("|")


def err_locations(ack: bytes) -> list[str]:
    return [s.split("|")[2] for s in ack.decode("utf-8").split("\r") if s.startswith("ERR")]


def units(*messages: bytes) -> list[RawUnit]:
    return [RawUnit(m, 1, "mllp:test") for m in messages]


def statuses(pipeline: Pipeline) -> dict[str, str]:
    return {r["message_id"]: r["status"] for r in pipeline.store.db.query("SELECT message_id, status FROM messages")}


def no_lease_left(pipeline: Pipeline) -> bool:
    return not pipeline.store.db.execute("SELECT count(*) FROM messages WHERE lease_owner IS NOT NULL"
                                         " OR status = 'received'").fetchone()[0]


# -- one batch, one bad message -----------------------------------------------------------


def test_nul_byte_in_msh18_is_refused_alone_within_its_batch(pipeline: Pipeline) -> None:
    goods = [copy_of(f"G{i:03d}") for i in range(10)]
    outcomes = pipeline.ingest_batch(pipeline.channel("hl7v2"), units(*goods[:5], NUL_CHARSET, *goods[5:]),
                                     channel="mllp")
    codes = [msa(o.answer)[1] for o in outcomes]
    assert codes == ["AA"] * 5 + ["AR"] + ["AA"] * 5
    assert err_locations(outcomes[5].answer) == ["MSH^1^18"]
    assert b"\x00" not in outcomes[5].answer
    assert pipeline.store.counts() == {"stored": 10, "refused": 1}
    assert no_lease_left(pipeline)


def test_nul_byte_over_mllp_beside_ten_other_connections(pipeline: Pipeline) -> None:
    server = MLLPServer(pipeline, "127.0.0.1", 0)
    server.start_in_thread()
    bad: list[bytes] = []
    try:
        sender = threading.Thread(target=lambda: bad.append(_send(server.port, NUL_CHARSET)))
        sender.start()
        codes = mllp_codes(server.port, GOOD, clients=10, each=1, tag="OTHER")
        sender.join(30)
        again = _send(server.port, NUL_CHARSET)  # a resend is answered the same, never "being processed"
    finally:
        server.stop()
    assert codes == {n: ["AA"] for n in range(10)}
    assert msa(bad[0])[1] == "AR" and err_locations(bad[0]) == ["MSH^1^18"]
    assert msa(again)[1] == "AR" and err_locations(again) == ["MSH^1^18"]
    # its character set cannot be read, but its MSH fields are plain ASCII: it is known again by its sender and
    # control id, as its answer names them, and the resend is answered with the first answer, not kept again
    assert pipeline.store.counts() == {"stored": 10, "refused": 1}
    assert no_lease_left(pipeline)


def _send(port: int, message: bytes) -> bytes:
    with MLLPClient("127.0.0.1", port) as client:
        return client.send_message(message)  # type: ignore[no-any-return]


def test_nul_byte_over_http_is_answered_not_a_500(app: Any, client: Any) -> None:
    body = copy_of("H001") + b"\r\n" + NUL_CHARSET + b"\r\n" + copy_of("H002")
    res = client.post("/ingest/hl7v2", data=body, content_type="x-application/hl7-v2+er7")
    assert res.status_code != 500
    pipeline = app.extensions["gateway.pipeline"]
    assert statuses(pipeline) == {"H001": "stored", "H002": "stored", "NUL0001": "refused"}
    assert no_lease_left(pipeline)


# -- a stage that raises for one message --------------------------------------------------


def _raise_for_boom(real: Any) -> Any:
    """``real``, except that it raises for a message whose MSH-10 holds BOOM (the exception names the patient)."""
    def stage(subject: Any, *rest: Any, **kwargs: Any) -> Any:
        text = subject.data.decode("latin-1") if isinstance(subject, RawUnit) else subject.message_id
        if "BOOM" in text:
            raise RuntimeError(f"stage broke on patient {PATIENT_ID.decode()}")
        return real(subject, *rest, **kwargs)
    return stage


@pytest.mark.parametrize("stage", ["read", "identify", "map", "build", "code_for", "answer", "checker"])
def test_a_stage_raising_for_one_message_fails_it_alone(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, stage: str) -> None:
    ch = pipeline.channel("hl7v2")
    # the channel's own modules (with the compiled twins built, a unit they fail on comes back to these:
    # tests/test_native.py)
    monkeypatch.setattr(ch, "fast", None)
    if stage in ("read", "identify"):
        monkeypatch.setattr(ch.adapter, stage, _raise_for_boom(getattr(ch.adapter, stage)))
    elif stage == "checker":
        real_check = pipeline.checker
        assert real_check is not None

        calls: list[int] = []

        def check(bundle: dict[str, Any]) -> Any:
            calls.append(1)
            if len(calls) == 2:  # the Bundle of the second message, BOOM001
                raise RuntimeError(f"checker broke on patient {PATIENT_ID.decode()}")
            return real_check(bundle)
        monkeypatch.setattr(pipeline, "checker", check)
    else:
        monkeypatch.setattr(ch, stage, _raise_for_boom(getattr(ch, stage)))
    messages = [copy_of("A001"), copy_of("BOOM001"), copy_of("A002")]
    outcomes = pipeline.ingest_batch(ch, units(*messages), channel="mllp")
    good, broken, other = outcomes
    assert (good.status, other.status) == (Status.STORED, Status.STORED)
    assert msa(good.answer)[1] == msa(other.answer)[1] == "AA"
    if stage == "answer":  # the message itself was fine: stored, answered with a plain ACK that cannot fail
        assert broken.status is Status.STORED and msa(broken.answer)[1:3] == ["AA", "BOOM001"]
    elif stage == "identify":  # stored without its id (no duplicate check), then read and stored as usual
        assert broken.status is Status.STORED
    else:
        assert broken.status is Status.FAILED and msa(broken.answer)[1] == "AE"
        assert b"internal error" in broken.answer and b"RuntimeError" not in broken.answer
        rec = pipeline.store.get_message(broken.record_id)  # type: ignore[arg-type]
        assert rec.status == "failed" and rec.ack == broken.answer, "the answer is stored with the message"
        assert pipeline.store.raw_of(rec.id) == messages[1], "its raw input is kept"
    assert no_lease_left(pipeline)
    assert "internal error in stage" in caplog.text
    assert PATIENT_ID.decode() not in caplog.text, "no patient data in the log"


def test_a_cda_failure_is_answered_with_an_operation_outcome(pipeline: Pipeline,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    document = (DATA / "cda" / "lab-report-corrected.xml").read_bytes()
    ch = pipeline.channel("cda")

    def broken(msg: Any) -> Any:
        raise RuntimeError("build broke")
    monkeypatch.setattr(ch, "build", broken)
    monkeypatch.setattr(ch, "answer", lambda msg, code: (_ for _ in ()).throw(ValueError("answer broke")))
    [outcome] = pipeline.ingest(document, "cda", channel="http")
    assert outcome.status is Status.FAILED
    assert outcome.answer.startswith(b'{"resourceType":"OperationOutcome"')
    assert pipeline.store.get_message(outcome.record_id).ack == outcome.answer  # type: ignore[arg-type]


# -- recording one outcome fails ----------------------------------------------------------


def test_recording_one_message_fails_the_others_are_recorded(pipeline: Pipeline) -> None:
    """The outcome is written (resources, message row, audit entry), then a hook of the same transaction fails:
    only that message's writes are undone, it is recorded as failed, and the rest of the batch commits."""
    store = pipeline.store
    tries: list[str] = []

    def hook(db: Any, outcome: Any) -> None:
        if outcome.message is not None and outcome.message.message_id == "BOOM002":
            tries.append(outcome.status.value)
            if len(tries) == 1:
                raise OverflowError("Python int too large to convert to SQLite INTEGER")
    pipeline.after_store.append(hook)
    outcomes = pipeline.ingest_batch(pipeline.channel("hl7v2"), units(copy_of("B001"), copy_of("BOOM002"),
                                                                      copy_of("B003")), channel="mllp")
    assert [o.status for o in outcomes] == [Status.STORED, Status.FAILED, Status.STORED]
    assert tries == ["stored", "failed"]
    assert statuses(pipeline) == {"B001": "stored", "BOOM002": "failed", "B003": "stored"}
    failed = outcomes[1].record_id
    assert store.get_message(failed).ack == outcomes[1].answer  # type: ignore[arg-type]
    refs = {r[0] for r in store.db.execute("SELECT DISTINCT message_ref FROM resources")}
    assert failed not in refs, "nothing of the attempt that failed was kept"
    assert no_lease_left(pipeline)


def test_rows_are_made_before_the_write_lock_and_one_that_cannot_be_made_fails_alone(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resources' rows of a batch are made before its recording transaction begins (other writers wait only
    for the writing); a Bundle whose rows cannot be made fails alone, recorded as failed."""
    store = pipeline.store
    real_prepare = store.prepare
    inside: list[bool] = []

    broken: list[int] = []

    def prepare(bundle: dict[str, Any]) -> Any:
        inside.append(bool(store.db.conn.in_transaction))
        if len(inside) == 2:  # the second message's Bundle
            broken.append(id(bundle))
        if id(bundle) in broken:
            raise RecursionError("nested too deeply")
        return real_prepare(bundle)

    monkeypatch.setattr(store, "prepare", prepare)
    outcomes = pipeline.ingest_batch(pipeline.channel("hl7v2"), units(copy_of("D001"), copy_of("BOOM004"),
                                                                      copy_of("D003")), channel="mllp")
    assert [o.status for o in outcomes] == [Status.STORED, Status.FAILED, Status.STORED]
    assert inside[:3] == [False, False, False], "made before the transaction"
    assert inside[3:] == [True], "the one that failed is made again inside, where its failure is recorded"
    assert statuses(pipeline) == {"D001": "stored", "BOOM004": "failed", "D003": "stored"}
    assert no_lease_left(pipeline)


def test_a_message_nothing_can_be_recorded_for_is_answered_and_worked_on_resend(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    store = pipeline.store
    real_finish = store.finish
    broken = {"on": True}

    def finish(record_id: int, **kwargs: Any) -> bool:
        if broken["on"] and store.get_message(record_id).message_id == "BOOM003":
            raise ValueError("cannot write")
        return real_finish(record_id, **kwargs)
    monkeypatch.setattr(store, "finish", finish)
    ch = pipeline.channel("hl7v2")
    first = pipeline.ingest_batch(ch, units(copy_of("C001"), copy_of("BOOM003")), channel="mllp")
    assert [o.status for o in first] == [Status.STORED, Status.FAILED]
    assert b"send it again" in first[1].answer
    rec = store.get_message(first[1].record_id)  # type: ignore[arg-type]
    assert rec.status == "received" and rec.lease_owner is None, "kept, and free for whoever comes next"
    broken["on"] = False
    [again] = pipeline.ingest_batch(ch, units(copy_of("BOOM003")), channel="mllp")
    assert again.status is Status.STORED and msa(again.answer)[1:3] == ["AA", "BOOM003"]
    assert again.record_id == rec.id and store.counts() == {"stored": 2}


def test_a_whole_batch_failing_over_mllp_still_answers_each_message_alone(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener works a failed batch again one message at a time: only the one that cannot be stored goes
    without an ACK (its sender resends); every other connection is answered."""
    real = Pipeline.ingest_batch

    def batch(self: Pipeline, ch: Any, batch_units: list[RawUnit], *, channel: str) -> Any:
        if len(batch_units) > 1 or b"BOOM" in batch_units[0].data:
            raise OSError("disk full")
        return real(self, ch, batch_units, channel=channel)
    monkeypatch.setattr(Pipeline, "ingest_batch", batch)
    server = MLLPServer(pipeline, "127.0.0.1", 0)
    server.start_in_thread()
    lost: list[bytes] = []
    try:
        def bad() -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"\x0b" + copy_of("BOOM004") + b"\x1c\r")
                lost.append(sock.recv(100))  # closed without an ACK
        sender = threading.Thread(target=bad)
        sender.start()
        codes = mllp_codes(server.port, GOOD, clients=6, each=2, tag="D")
        sender.join(30)
    finally:
        server.stop()
    assert codes == {n: ["AA", "AA"] for n in range(6)}
    assert lost == [b""]
    assert pipeline.store.counts() == {"stored": 12}


# -- an operator works a failed message again ---------------------------------------------


def test_messages_retry_works_a_failed_message_again_and_audits_it(
        pipeline: Pipeline, settings: Any, runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.audit.log import entries

    ch = pipeline.channel("hl7v2")
    with monkeypatch.context() as patched:
        patched.setattr(ch, "fast", None)  # the channel's own modules (the compiled twins: tests/test_native.py)
        patched.setattr(ch, "build", _raise_for_boom(ch.build))
        failed, stored = pipeline.ingest_batch(ch, units(copy_of("BOOM005"), copy_of("E001")), channel="mllp")
    assert failed.status is Status.FAILED
    before = len(list(entries(pipeline.store.db)))
    args = ["--data-dir", settings.data_dir, "--database", settings.database, "--issuer-uscc", TONGJIANG,
            "messages", "retry"]

    done = runner.invoke(cli, [*args, str(failed.record_id)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == f"message {failed.record_id}: failed -> stored AA"
    rec = pipeline.store.get_message(failed.record_id)  # type: ignore[arg-type]
    assert rec.status == "stored" and msa(rec.ack or b"")[1:3] == ["AA", "BOOM005"] and rec.lease_owner is None
    new = list(entries(pipeline.store.db))[before:]
    retried = [e for e in new if e.facts.get("channel") == "retry"]
    assert len(retried) == 1
    assert f"record {failed.record_id} worked again by " in retried[0].facts["reason"]
    assert retried[0].facts["reason"].endswith("failed -> stored")
    assert retried[0].facts["source"]["value"]  # the OS user who asked
    assert all(PATIENT_ID.decode() not in str(e.facts) for e in new)

    again = runner.invoke(cli, [*args, str(failed.record_id), "99999"])
    assert again.exit_code == 1
    assert f"message {failed.record_id} is stored, not failed" in again.output
    assert "message 99999: no message with id 99999" in again.output
    assert "Traceback" not in again.output
    nothing = runner.invoke(cli, [*args])
    assert nothing.exit_code == 2 and "--failed" in nothing.output


def test_messages_retry_failed_works_every_failed_message(pipeline: Pipeline, settings: Any, runner: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ch = pipeline.channel("hl7v2")
    with monkeypatch.context() as patched:
        patched.setattr(ch, "fast", None)  # the channel's own modules (the compiled twins: tests/test_native.py)
        patched.setattr(ch, "map", _raise_for_boom(ch.map))
        pipeline.ingest_batch(ch, units(copy_of("BOOM006"), copy_of("BOOM007"), copy_of("F001")), channel="mllp")
    assert pipeline.store.counts() == {"failed": 2, "stored": 1}
    done = runner.invoke(cli, ["--data-dir", settings.data_dir, "--database", settings.database,
                               "--issuer-uscc", TONGJIANG, "messages", "retry",
                               "--failed"])
    assert done.exit_code == 0, done.output
    assert len(done.output.strip().splitlines()) == 2
    assert pipeline.store.counts() == {"stored": 3}
