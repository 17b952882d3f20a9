"""Accept, then process (``mllp_ack = received``): the ACK says the raw message is stored; a queue reader works it.

Inputs are the MLLP sample (``tests/data/hl7v2/mllp-framed.hl7``, see tests/data/README.md): its first message is
good, its second has ``高`` in a numeric OBX-5. Each test compares the queued way with what the same message gets
when it is worked before the answer (the default), so the two modes cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hl7.client import MLLPClient

from conftest import DATA, TONGJIANG, children_of, mllp_codes, wait_port
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.config import load_settings
from gateway.demo import free_port
from gateway.errors import ConfigError, UnsupportedFormat
from gateway.mllp import MLLPServer, QueueReader
from gateway.pipeline import Pipeline, Status
from gateway.store.store import lease_owner

GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))

FRAMED = DATA / "hl7v2" / "mllp-framed.hl7"
GOOD, BAD_VALUE = split_messages(FRAMED.read_bytes())[:2]


def segments(ack: bytes, name: str) -> list[list[str]]:
    return [s.split("|") for s in ack.decode("utf-8").split("\r") if s.startswith(name)]


def msh_field(message: bytes, n: int, value: str) -> bytes:
    """``message`` with MSH-n set to ``value`` (MSH-1 is the separator, so MSH-n is the n-1th piece)."""
    first, _, rest = message.partition(b"\r")
    fields = first.split(b"|")
    fields += [b""] * (n - len(fields))
    fields[n - 1] = value.encode()
    return b"|".join(fields) + b"\r" + rest


def units(*messages: bytes) -> list[RawUnit]:
    return [RawUnit(m, i, "mllp:test") for i, m in enumerate(messages, start=1)]


def hl7(pipeline: Pipeline):
    return pipeline.channel("hl7v2")


def test_receipt_first_then_the_outcome_the_message_gets_when_worked_at_once(
        pipeline, settings, clock, tmp_path) -> None:
    receipts = pipeline.receive_batch(hl7(pipeline), units(GOOD, BAD_VALUE), channel="mllp")
    assert [o.status for o in receipts] == [Status.QUEUED, Status.QUEUED]
    for outcome, control_id in zip(receipts, ["TJ2406100001", "TJ2406100002"]):
        msa = segments(outcome.answer, "MSA")[0]
        assert msa[1:3] == ["AA", control_id]  # original mode (MSH-15 empty): AA, and MSA-3 says what it means
        assert msa[3] == "received and stored; it is processed next, in order of arrival"
        assert not segments(outcome.answer, "ERR")
    # durable before the answer: both are held, nothing is worked yet
    assert pipeline.store.counts() == {"queued": 2}
    assert pipeline.store.queue_length() == 2
    assert pipeline.store.raw_of(receipts[1].record_id) == BAD_VALUE

    worked = pipeline.process_queued()
    assert [o.record_id for o in worked] == [receipts[0].record_id, receipts[1].record_id]
    assert [o.status for o in worked] == [Status.STORED, Status.REFUSED]
    assert pipeline.store.counts() == {"stored": 1, "refused": 1}
    assert pipeline.process_queued() == []

    # the application ACK kept with each message is the one the default mode would have sent
    other = Pipeline(dataclasses.replace(settings, data_dir=str(tmp_path / "other"), database=""), clock=clock)
    try:
        at_once = other.ingest_batch(hl7(other), units(GOOD, BAD_VALUE), channel="mllp")
    finally:
        other.close()
    for outcome, direct in zip(worked, at_once):
        kept = pipeline.store.get_message(outcome.record_id)
        assert kept.ack_code == direct.ack_code
        assert segments(kept.ack or b"", "MSA") == segments(direct.answer, "MSA")
        assert segments(kept.ack or b"", "ERR") == segments(direct.answer, "ERR")
    assert segments(pipeline.store.get_message(worked[1].record_id).ack or b"", "ERR")[0][2] == "OBX^1^5"


def test_enhanced_mode_senders_get_a_commit_accept(pipeline) -> None:
    enhanced = msh_field(msh_field(GOOD, 15, "AL"), 16, "NE")
    [outcome] = pipeline.receive_batch(hl7(pipeline), units(enhanced), channel="mllp")
    assert segments(outcome.answer, "MSA")[0][1:3] == ["CA", "TJ2406100001"]
    assert outcome.ack_code == "CA"


def test_a_message_whose_header_is_wrong_is_answered_with_its_error_at_once(pipeline) -> None:
    no_id = msh_field(GOOD, 10, "")
    old_version = msh_field(BAD_VALUE, 12, "2.1")
    outcomes = pipeline.receive_batch(hl7(pipeline), units(GOOD, no_id, old_version), channel="mllp")
    assert [o.status for o in outcomes] == [Status.QUEUED, Status.REFUSED, Status.REFUSED]
    # an empty MSH-10 is a field in error (AE); an unsupported version is not taken at all (AR)
    assert [segments(o.answer, "MSA")[0][1] for o in outcomes[1:]] == ["AE", "AR"]
    assert segments(outcomes[1].answer, "ERR")[0][2] == "MSH^1^10"
    assert segments(outcomes[2].answer, "ERR")[0][2] == "MSH^1^12"
    assert pipeline.store.counts() == {"queued": 1, "refused": 2}


def test_in_enhanced_mode_a_message_refused_as_it_arrives_gets_a_commit_reject(pipeline) -> None:
    """MSH-15 set: the sender asked for commit ACKs on this connection, and gets CA for what is held. A message whose
    version is not taken got AR there (an application code among commit codes): CR now (CE for a field in error),
    its ERR segments the same; the application ACK kept with it is still the AR it is."""
    enhanced = [msh_field(m, 15, "AL") for m in (GOOD, msh_field(GOOD, 10, ""), msh_field(BAD_VALUE, 12, "2.1"))]
    outcomes = pipeline.receive_batch(hl7(pipeline), units(*enhanced), channel="mllp")
    assert [segments(o.answer, "MSA")[0][1] for o in outcomes] == ["CA", "CE", "CR"]
    assert [o.ack_code for o in outcomes] == ["CA", "CE", "CR"]
    assert segments(outcomes[2].answer, "ERR")[0][2] == "MSH^1^12"
    kept = pipeline.store.get_message(outcomes[2].record_id)
    assert kept.ack_code == "AR" and segments(kept.ack or b"", "MSA")[0][1] == "AR"


def test_in_enhanced_mode_a_frame_refused_before_it_is_read_gets_a_commit_reject(pipeline) -> None:
    server = MLLPServer(pipeline, "127.0.0.1", 0, ack="received")
    enhanced = msh_field(GOOD, 15, "AL")
    answer = server._reject("MLLP block does not start with 0x0B", b"\x0b" + enhanced[:200])
    assert segments(answer, "MSA")[0][1:3] == ["CR", "TJ2406100001"]
    plain = MLLPServer(pipeline, "127.0.0.1", 0, ack="processed")
    assert segments(plain._reject("too long", b"\x0b" + enhanced[:200]), "MSA")[0][1] == "AR"


def test_a_resent_message_gets_a_receipt_again_and_is_held_once(pipeline) -> None:
    [first] = pipeline.receive_batch(hl7(pipeline), units(GOOD), channel="mllp")
    again = pipeline.receive_batch(hl7(pipeline), units(GOOD, GOOD), channel="mllp")
    assert [o.status for o in again] == [Status.DUPLICATE, Status.DUPLICATE]
    assert {o.record_id for o in again} == {first.record_id}
    assert segments(again[0].answer, "MSA")[0][1:4] == ["AA", "TJ2406100001",
                                                        f"already received (record {first.record_id}, queued)"]
    pipeline.process_queued()
    [late] = pipeline.receive_batch(hl7(pipeline), units(GOOD), channel="mllp")
    assert segments(late.answer, "MSA")[0][3] == f"already received (record {first.record_id}, stored)"
    assert pipeline.store.counts() == {"stored": 1}


def test_a_refused_message_fixed_and_sent_again_under_its_control_id_is_taken(pipeline) -> None:
    """The LIS fixes a message the queue reader refused and sends it again with the same MSH-10: it got AA "already
    received (refused)" and its fixed content was never stored. The same content again is answered with the stored
    application ACK (AE, not a receipt saying it was taken); other content is a message of its own, held and worked."""
    [first] = pipeline.receive_batch(hl7(pipeline), units(BAD_VALUE), channel="mllp")
    assert first.status is Status.QUEUED
    [worked] = pipeline.process_queued()
    assert worked.ack_code == "AE"
    control_id = segments(BAD_VALUE, "MSH")[0][9]
    [same] = pipeline.receive_batch(hl7(pipeline), units(BAD_VALUE.replace(b"\r", b"\r\n")), channel="mllp")
    assert same.status is Status.DUPLICATE and same.record_id == first.record_id
    assert segments(same.answer, "MSA")[0][1:3] == ["AE", control_id]
    assert "'abc' is not a number" in same.answer.decode()
    fixed = BAD_VALUE.replace(b"||abc|", b"||139|")
    assert fixed != BAD_VALUE
    [taken] = pipeline.receive_batch(hl7(pipeline), units(fixed), channel="mllp")
    assert taken.status is Status.QUEUED and taken.record_id != first.record_id
    assert segments(taken.answer, "MSA")[0][1:3] == ["AA", control_id]
    [stored] = pipeline.process_queued()
    assert stored.status is Status.STORED and stored.ack_code == "AA"
    assert pipeline.store.counts() == {"refused": 1, "stored": 1}
    assert pipeline.store.get_message(taken.record_id).message_id == f"{control_id}#2"


def test_a_queue_reader_gives_up_a_lease_the_database_would_not_let_go_once_it_answers(
        pipeline, monkeypatch) -> None:
    """The database went away while the queue reader recorded a message: its lease could not be given up either.
    The reader gives it up before its next batch, once the database answers, and works the message then (it
    waited for the lease to expire)."""
    from gateway.errors import DatabaseUnavailable

    def away(*_: object, **__: object) -> None:
        raise DatabaseUnavailable("the database cannot be reached right now")

    [queued] = pipeline.receive_batch(hl7(pipeline), units(GOOD), channel="mllp")
    with monkeypatch.context() as m:
        m.setattr(Pipeline, "_commit", away)
        m.setattr(type(pipeline.store), "release", away)
        with pytest.raises(DatabaseUnavailable):  # (the reader's loop says so and tries again every second)
            pipeline.process_queued()
    assert pipeline.store.get_message(queued.record_id).lease_owner
    [stored] = pipeline.process_queued()
    assert stored.status is Status.STORED and stored.record_id == queued.record_id
    assert pipeline.store.counts() == {"stored": 1}


def test_held_messages_survive_a_restart_and_are_worked_then(pipeline, settings, clock) -> None:
    pipeline.receive_batch(hl7(pipeline), units(GOOD, BAD_VALUE), channel="mllp")
    pipeline.close()
    restarted = Pipeline(settings, clock=clock)
    try:
        assert restarted.recover() == 0, "a held message is waiting, not interrupted"
        assert restarted.store.counts() == {"queued": 2}
        reader = QueueReader(restarted, idle=0.01)
        thread = reader.start_in_thread()
        deadline = time.monotonic() + 30
        while restarted.store.queue_length() and time.monotonic() < deadline:
            time.sleep(0.02)
        reader.stop()
        thread.join(10)
        assert reader.processed == 2
        assert restarted.store.counts() == {"stored": 1, "refused": 1}
    finally:
        restarted.close()


def _queued(pipeline, count: int) -> list[int]:
    """``count`` good messages, each with its own control id, answered on receipt: their record ids."""
    messages = [msh_field(GOOD, 10, f"TJQ{n:09}") for n in range(count)]
    receipts = pipeline.receive_batch(hl7(pipeline), units(*messages), channel="mllp")
    assert [o.status for o in receipts] == [Status.QUEUED] * count
    return [o.record_id for o in receipts]


def _commits(pipeline, monkeypatch) -> list[str]:
    """The transactions the pipeline begins from now on (the store's own, such as a claim, are not counted)."""
    import gateway.store.db as db_module

    seen: list[str] = []
    real = db_module.transaction

    def counted(db, **kw):
        if not db.conn.in_transaction:
            seen.append("transaction")
        return real(db, **kw)

    monkeypatch.setattr(db_module, "transaction", counted)
    return seen


def test_the_reader_records_a_few_messages_per_commit_and_a_failure_stays_its_own(pipeline, monkeypatch) -> None:
    ids = _queued(pipeline, 6)
    real_commit = pipeline._commit
    failing = {ids[1]}

    def commit(outcome, audit, **kw):
        if outcome.record_id in failing and outcome.status is Status.STORED:
            raise RuntimeError("this message's resources cannot be written")
        return real_commit(outcome, audit, **kw)

    monkeypatch.setattr(pipeline, "_commit", commit)
    real_prepare, prepared_inside = pipeline.store.prepare, []

    def prepare(bundle):
        prepared_inside.append(bool(pipeline.store.db.conn.in_transaction))
        return real_prepare(bundle)

    monkeypatch.setattr(pipeline.store, "prepare", prepare)
    commits = _commits(pipeline, monkeypatch)
    worked = pipeline.process_queued(group=4)
    assert prepared_inside == [False] * 6, "each Bundle's rows made before its group's transaction began"
    assert [o.record_id for o in worked] == ids, "in arrival order"
    assert [o.status for o in worked] == [Status.STORED, Status.FAILED] + [Status.STORED] * 4
    assert len(commits) == 2, "one transaction per group of four (4 + 2)"
    assert pipeline.store.counts() == {"stored": 5, "failed": 1}
    for record_id in ids:
        kept = pipeline.store.get_message(record_id)
        assert kept.lease_owner is None and kept.ack, "recorded, with its answer, and no longer held"
    assert "internal error in the gateway (store stage)" in pipeline.store.get_message(ids[1]).issues[0]["message"]


def test_one_message_per_commit_when_the_group_is_one(pipeline, monkeypatch) -> None:
    ids = _queued(pipeline, 3)
    commits = _commits(pipeline, monkeypatch)
    assert [o.status for o in pipeline.process_queued(group=1)] == [Status.STORED] * 3
    assert len(commits) == 3
    assert pipeline.store.counts() == {"stored": len(ids)}


def test_a_database_failure_in_a_group_frees_what_was_not_recorded(pipeline, monkeypatch) -> None:
    ids = _queued(pipeline, 6)
    real = pipeline._record_safely
    calls = []

    def record_safely(ch, unit, outcome, channel, *rest):
        calls.append(outcome.record_id)
        if outcome.record_id == ids[4]:  # the second group: the database goes away in the middle of it
            raise sqlite3.OperationalError("disk I/O error")
        return real(ch, unit, outcome, channel, *rest)

    monkeypatch.setattr(pipeline, "_record_safely", record_safely)
    with pytest.raises(sqlite3.OperationalError):
        pipeline.process_queued(group=4)
    assert [pipeline.store.get_message(i).status for i in ids] == ["stored"] * 4 + ["received"] * 2
    assert all(pipeline.store.get_message(i).lease_owner is None for i in ids), "nothing left held"
    monkeypatch.undo()
    assert [o.record_id for o in pipeline.process_queued(group=4)] == ids[4:], "worked again at once"
    assert pipeline.store.counts() == {"stored": 6}


def test_only_hl7_v2_can_be_answered_on_receipt(pipeline) -> None:
    with pytest.raises(UnsupportedFormat, match="cannot be answered on receipt"):
        pipeline.receive_batch(pipeline.channel("cda"), units(b"<ClinicalDocument/>"), channel="http")


def test_the_setting_takes_two_values(tmp_path) -> None:
    with pytest.raises(ConfigError, match="mllp_ack 'sometimes' must be 'processed' or 'received'"):
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), "mllp_ack": "sometimes"})


def test_listener_answers_on_receipt_and_the_reader_works_every_message(pipeline) -> None:
    server = MLLPServer(pipeline, "127.0.0.1", 0, ack="received")
    server.start_in_thread()
    sent = [GOOD.replace(b"TJ2406100001", f"RC{i:04d}".encode()) for i in range(12)]
    try:
        with MLLPClient("127.0.0.1", server.port) as client:
            acks = [client.send_message(m) for m in sent]
    finally:
        server.stop()
    assert [segments(a, "MSA")[0][1:3] for a in acks] == [["AA", f"RC{i:04d}"] for i in range(12)]
    assert pipeline.store.counts() == {"queued": 12}
    while pipeline.process_queued(5):
        pass
    assert pipeline.store.counts() == {"stored": 12}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc (Linux)")
def test_gateway_serve_answers_on_receipt_and_its_queue_reader_stores_every_message(tmp_path: Path,
                                                                                    database: str) -> None:
    """``gateway serve`` with ``mllp_ack = received``: receipts from the listener, the work by its queue reader
    processes (``queue_readers`` 2, working the queue side by side)."""
    from gateway.store.store import Store

    port = free_port()
    overrides = {"data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG, "mllp_port": port,
                 "mllp_ack": "received", "log_level": "WARNING", "database": database, "queue_readers": 2}
    settings = load_settings(environ={}, overrides=overrides)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    codes: dict[int, list[str]] = {}
    try:
        wait_port(port)
        helpers = children_of(proc.pid)
        assert sorted(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-3:-1] for pid in helpers) == [
            [b"--queue", b"1"], [b"--queue", b"2"]], "the MLLP process starts a process per queue reader"

        codes = mllp_codes(port, GOOD, clients=4, each=5, tag="Q")
        store = Store.open(settings.database_locator)
        try:
            deadline = time.monotonic() + 60
            while store.counts().get("stored", 0) < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
            counts = store.counts()
        finally:
            store.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert codes == {n: ["AA"] * 5 for n in range(4)}
    assert counts == {"stored": 20}
    assert b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in helpers), "the queue reader stopped with the gateway"


def readers_in_turn(settings: Any, clock: Any, readers: int = 2) -> dict[int, list[int]]:
    """``readers`` queue readers working in turn, each a thread with its own pipeline (started together, so that each
    takes its part), until nothing is queued or being worked: the record ids each recorded."""
    worked: dict[int, list[int]] = {k: [] for k in range(readers)}
    errors: list[BaseException] = []
    start = threading.Barrier(readers, timeout=60)

    def reader(k: int) -> None:
        mine = Pipeline(settings, clock=clock)
        try:
            start.wait()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                done = mine.process_queued(2, in_turn=True)
                worked[k] += [int(o.record_id) for o in done if o.record_id is not None]
                if not {"queued", "received"} & set(mine.store.counts()):
                    return
                if not done:
                    time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    return worked


def test_two_queue_readers_work_several_senders_and_record_each_senders_messages_in_order(
        pipeline, settings, clock) -> None:
    """``queue_readers`` 2: the readers take the next messages of any sender, so every message is worked once,
    both readers work, and each sender's messages are recorded in arrival order (the audit log's order)."""
    from gateway.audit.log import entries

    senders = ["LIS-A", "LIS-B", "LIS-C", "LIS-D", "LIS-E", "LIS-F"]
    sent = [msh_field(GOOD.replace(b"TJ2406100001", f"SR{n:03d}".encode()), 3, senders[n % len(senders)])
            for n in range(36)]
    receipts = pipeline.receive_batch(hl7(pipeline), units(*sent), channel="mllp")
    assert {o.status for o in receipts} == {Status.QUEUED}

    worked = readers_in_turn(settings, clock)
    assert sorted(worked[0] + worked[1]) == sorted(o.record_id for o in receipts), "every message worked once"
    assert worked[0] and worked[1], "both readers worked"
    assert pipeline.store.counts() == {"stored": 36}
    recorded = [n for e in entries(pipeline.store.db) for n in range(36) if f"SR{n:03d}" in str(e.content)]
    assert sorted(recorded) == list(range(36))
    for k in range(len(senders)):
        theirs = [n for n in recorded if n % len(senders) == k]
        assert theirs == sorted(theirs), f"{senders[k]}'s messages recorded in arrival order"


def test_queue_readers_is_a_positive_number_and_serve_runs_that_many_readers(tmp_path) -> None:
    from gateway.serve import _reader, queue_parts

    with pytest.raises(ConfigError, match="queue_readers must be positive"):
        load_settings(environ={}, overrides={"data_dir": str(tmp_path), "queue_readers": 0})
    three = load_settings(environ={"GATEWAY_QUEUE_READERS": "3"}, overrides={"data_dir": str(tmp_path)})
    assert queue_parts(three) == ["queue-1", "queue-2", "queue-3"]
    assert [_reader(three, part) for part in queue_parts(three)] == [(0, 3), (1, 3), (2, 3)]
    one = load_settings(environ={}, overrides={"data_dir": str(tmp_path)})
    assert queue_parts(one) == ["queue"] and _reader(one, "queue") == (0, 1)


@pytest.mark.parametrize("args", [["--queue", "4"], ["--queue", "0"], ["--queue"], ["--queue", "x"]])
def test_a_queue_reader_started_by_hand_must_name_its_number(tmp_path, capsys, args) -> None:
    """``python -m gateway.serve SETTINGS --queue K`` with ``queue_readers`` 3: a missing or wrong K names no reader
    of the three (each works in turn beside the others); it is refused with one line instead."""
    from gateway.serve import _main

    three = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "queue_readers": 3})
    assert _main([json.dumps(dataclasses.asdict(three)), *args]) == 2
    assert capsys.readouterr().err == "gateway: --queue takes the reader's number, 1 to 3 (queue_readers)\n"


def test_a_polling_transaction_waits_for_another_writer_and_gives_up_at_the_busy_timeout(tmp_path) -> None:
    """The receipt's transaction tries every half millisecond while another connection writes.

    SQLite only: its file lock and busy timeout (on PostgreSQL a writer waits for the write lock itself)."""
    import sqlite3

    from gateway.store.db import connect, transaction

    path = tmp_path / "gw.db"
    db = connect(path)
    db.execute("CREATE TABLE t (x INTEGER)")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock

    release = threading.Timer(0.15, lambda: other.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    with transaction(db, poll=True):
        db.execute("INSERT INTO t VALUES (1)")
    waited = time.monotonic() - started
    release.join()
    assert waited >= 0.1, "it waited for the other writer"
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000, "the busy timeout is put back"

    db.execute("PRAGMA busy_timeout = 200")
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            with transaction(db, poll=True):
                pass
        assert 0.2 <= time.monotonic() - started < 5
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 200
        assert not db.conn.in_transaction
    finally:
        other.execute("ROLLBACK")
        other.close()
        db.conn.close()


def test_queue_record_group_is_a_positive_whole_number_and_reaches_the_reader(tmp_path, clock, monkeypatch) -> None:
    for bad, said in (("0", "queue_record_group must be positive"), ("x", "must be a whole number, not 'x'")):
        with pytest.raises(ConfigError, match=said):
            load_settings(environ={"GATEWAY_QUEUE_RECORD_GROUP": bad}, overrides={"data_dir": str(tmp_path)})
    settings = load_settings(environ={"GATEWAY_QUEUE_RECORD_GROUP": "3"},
                             overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG})
    pipeline = Pipeline(settings, clock=clock)
    try:
        _queued(pipeline, 7)
        groups: list[int] = []
        real = pipeline._record_all
        monkeypatch.setattr(pipeline, "_record_all", lambda worked: groups.append(len(worked)) or real(worked))
        assert [o.status for o in pipeline.process_queued()] == [Status.STORED] * 7
        assert groups == [3, 3, 1]
    finally:
        pipeline.close()


def test_a_senders_message_another_node_works_holds_back_its_later_ones(pipeline, settings, clock) -> None:
    """Two nodes on one database each run a reader over every sender: while node B works a sender's message (a
    correction), node A's reader leaves that sender's later messages waiting (it took them, and a newer correction
    could be stored before an older one); other senders' messages go on."""
    from gateway.store.db import transaction

    sent = [msh_field(GOOD.replace(b"TJ2406100001", f"NO{n:03d}".encode()), 3, sender)
            for n, sender in enumerate(("LIS-A", "LIS-A", "LIS-B"))]
    receipts = pipeline.receive_batch(hl7(pipeline), units(*sent), channel="mllp")
    first, second, other = (o.record_id for o in receipts)
    db = pipeline.store.db
    with transaction(db):  # node B (another machine) holds LIS-A's first message, working it now
        db.execute("UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ? WHERE id = ?",
                   ["node-b.example:4242:1", pipeline.store._epoch() + 300, first])
    for in_turn in (False, True):  # one reader on node A, or several working in turn
        done = pipeline.process_queued(10, in_turn=in_turn)
        assert [o.record_id for o in done] == ([other] if not in_turn else [])  # LIS-A's second waits for its first
        assert pipeline.store.get_message(second).status == "queued"
    with transaction(db):  # node B is done with it
        db.execute("UPDATE messages SET status = 'stored', lease_owner = NULL, lease_until = NULL WHERE id = ?",
                   [first])
    assert [o.record_id for o in pipeline.process_queued(10, in_turn=True)] == [second]


def test_messages_queued_before_a_switch_to_processed_are_worked_by_the_start(pipeline, caplog) -> None:
    """A gateway switched from ``mllp_ack = received`` to ``processed`` runs no queue reader: what was queued (and
    answered) before is worked as it starts, in the order it came, saying so."""
    import logging

    from gateway.serve import work_left_queued

    ids = _queued(pipeline, 5)
    with caplog.at_level(logging.WARNING, logger="gateway.serve"):
        assert work_left_queued(pipeline, progress_every=0) == 5
    assert pipeline.store.counts() == {"stored": 5}
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.serve"]
    assert said[0].startswith("5 message(s) wait in the processing queue, queued while mllp_ack was 'received'")
    assert any(line.startswith("worked ") and " of the 5 queued message(s)" in line for line in said), said
    assert said[-1] == "worked 5 message(s): 5 waited in the queue; the MLLP listeners start now"
    assert [pipeline.store.get_message(i).attempts for i in ids] == [1] * 5, "each worked once"
    caplog.clear()
    assert work_left_queued(pipeline) == 0 and not caplog.records, "nothing queued: nothing said"


def test_the_catch_up_also_works_what_a_process_that_is_gone_left_behind_queued_messages(pipeline) -> None:
    """Message 3 of a sender was being worked by a reader that was killed, 1, 2, 4 and 5 wait in the queue: the
    start's recovery leaves 3 for its turn (after 1 and 2), so the catch-up works it too, and 4 and 5 after it,
    leaving nothing for the sender's new messages to overtake."""
    from gateway.serve import work_left_queued
    from test_queue_in_turn import numbered

    received = pipeline.receive_batch(hl7(pipeline), units(*[numbered(n) for n in range(1, 6)]), channel="mllp")
    ids = [o.record_id for o in received]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pipeline.store.unit_of_work():
        pipeline.store.db.conn.execute(
            "UPDATE messages SET status = 'received', lease_owner = ?, lease_until = 1e12 WHERE id = ?",
            [lease_owner().rpartition(":")[0] + f":{gone.pid}", ids[2]])
    assert pipeline.recover() == 0, "its turn comes after 1 and 2"
    assert work_left_queued(pipeline) == 5
    assert pipeline.store.counts() == {"stored": 5}


def _queued_by_an_earlier_run(tmp_path: Path, count: int, *, http: int, mllp: int,
                              log_level: str) -> tuple[Any, dict[str, str]]:
    """A gateway's settings with ``count`` messages queued (answered on receipt, not worked), and the environment
    that runs it as ``gateway serve`` with ``mllp_ack = processed`` on ``http`` and ``mllp``."""
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG})
    queued = Pipeline(settings)
    try:
        _queued(queued, count)
    finally:
        queued.close()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
           "GATEWAY_DATA_DIR": settings.data_dir, "GATEWAY_ISSUER_USCC": TONGJIANG, "GATEWAY_HTTP_PORT": str(http),
           "GATEWAY_MLLP_PORT": str(mllp), "GATEWAY_MLLP_ACK": "processed", "GATEWAY_WORKERS": "1",
           "GATEWAY_LOG_LEVEL": log_level}
    return settings, env


@pytest.mark.slow
def test_gateway_serve_with_mllp_ack_processed_works_what_an_earlier_run_queued(tmp_path: Path) -> None:
    """A part of its own (``catchup``) works what an earlier run queued while the HTTP API answers (``/health``
    saying the listener waits for it); the MLLP listener starts once it is done, so a message sent meanwhile is
    answered then and recorded after every queued one of its sender."""
    import requests

    from conftest import wait_until
    from gateway.audit.log import entries
    from gateway.store.store import Store

    http, port = free_port(), free_port()
    settings, env = _queued_by_an_earlier_run(tmp_path, 800, http=http, mllp=port, log_level="INFO")
    log_file = tmp_path / "serve.log"  # (a pipe nobody reads while it runs would fill and stop the gateway)
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log_file.open("wb"),
                            start_new_session=True)
    try:
        status, body = wait_until(lambda: (r := requests.get(f"http://127.0.0.1:{http}/health", timeout=5))
                                  .status_code == 503 and "mllp-1" in r.json()["checks"] and (r.status_code, r.json()),
                                  120, "the HTTP API answering while the queued messages are worked")
        assert body["checks"]["mllp-1"] == {
            "ok": False, "detail": "MLLP listener 1 waits for the catch-up of queued messages to end before it starts"}
        scraped = requests.get(f"http://127.0.0.1:{http}/metrics", timeout=10).text.splitlines()
        assert 'gateway_part_waiting{part="mllp-1"} 1.0' in scraped, [s for s in scraped if "gateway_part" in s]
        assert not [line for line in scraped if line.startswith('gateway_part_up{part="mllp-1"}')], \
            "a listener waiting for the catch-up is not down: an alert on gateway_part_up == 0 stays quiet"
        assert 'gateway_part_up{part="catchup"} 1.0' in scraped
        codes = mllp_codes(port, GOOD, clients=1, each=1, tag="P")  # answered once the listener runs
        assert codes == {0: ["AA"]}
        wait_until(lambda: requests.get(f"http://127.0.0.1:{http}/health", timeout=5).status_code == 200, 60,
                   "healthy once the catch-up ended")
        body = requests.get(f"http://127.0.0.1:{http}/health", timeout=5).json()
        assert "catchup" not in body["checks"] and body["checks"]["mllp-1"]["ok"], body
        store = Store.open(settings.database_locator)
        try:
            assert store.counts() == {"stored": 801}
            order = [str(e.content) for e in entries(store.db) if e.content.get("kind") == "ingest"]
        finally:
            store.close()
        assert len(order) == 801 and "P0M000" in order[-1] and not any("P0M000" in text for text in order[:-1])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    text = log_file.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert ("800 message(s) queued while mllp_ack was 'received' wait in the processing queue: the part 'catchup' "
            "works them, and the MLLP listeners start once it has") in text, text[-3000:]
    assert "worked 800 message(s): 800 waited in the queue; the MLLP listeners start now" in text, text[-3000:]
    assert "catch-up of queued messages (pid " in text and ") done" in text, text[-3000:]


@pytest.mark.slow
def test_a_start_working_what_an_earlier_run_queued_stops_cleanly_at_sigterm(tmp_path: Path) -> None:
    """SIGTERM while ``gateway serve`` works what an earlier run queued (its MLLP listener not started yet): the
    catch-up stops after the messages in hand, the gateway with exit 0, saying how far it got; the others are worked
    at the next start."""
    settings, env = _queued_by_an_earlier_run(tmp_path, 400, http=free_port(), mllp=free_port(), log_level="WARNING")
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    said = b""
    while b"working them now, before the MLLP listeners start" not in said:  # the catch-up's own line
        line = proc.stderr.readline()
        assert line, said.decode()
        said += line
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(60) == 0, (said + rest).decode()
    text = (said + rest).decode()
    assert "Traceback" not in text and "MLLP listener 1 started" not in text, text
    from gateway.store.store import Store

    store = Store.open(settings.database_locator)
    try:
        counts = store.counts()
    finally:
        store.close()
    assert counts.get("stored", 0) + counts.get("queued", 0) == 400 and 0 < counts.get("queued", 0) < 400, counts
    assert (f"stopped before the MLLP listeners started: worked {counts['stored']} of the 400 queued message(s); "
            "the others are worked at the next start") in text, text


def test_a_message_over_http_waits_behind_its_senders_queued_messages(pipeline, client) -> None:
    """A sender whose earlier messages wait in the processing queue (answered on receipt over MLLP, or queued by an
    earlier run and being worked by the catch-up) and who sends over HTTP meanwhile is answered 503 with
    Retry-After: worked at once, its message would be recorded before them (a correction before the report it
    corrects). Nothing of it is kept; another sender's message goes through; once the queue is worked it does too."""
    _queued(pipeline, 2)
    later = msh_field(GOOD, 10, "TJH000000001")
    answer = client.post("/ingest/hl7v2", data=later)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.get_data(as_text=True)
    issue = answer.get_json()["issue"][0]
    assert issue["code"] == "transient" and issue["expression"] == ["MSH-3"]
    assert "wait in the processing queue" in issue["diagnostics"], issue
    assert pipeline.store.counts() == {"queued": 2}, "nothing of it kept"
    other = msh_field(msh_field(GOOD, 3, "OTHERLIS"), 10, "TJH000000002")
    assert client.post("/ingest/hl7v2", data=other).status_code == 200, "another sender is not held up"
    reader = QueueReader(pipeline, idle=0.01)
    thread = reader.start_in_thread()
    try:
        deadline = time.monotonic() + 30
        while pipeline.store.queue_length() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        reader.stop()
        thread.join(10)
    assert client.post("/ingest/hl7v2", data=later).status_code == 200
    assert pipeline.store.counts() == {"stored": 4}
