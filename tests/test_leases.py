"""Leases: "already being processed" only while a live process holds the message; MLLP idle and read timeouts.

A message being worked is held by a lease (``host:pid`` and an expiry, ``processing_lease``). A process killed
with SIGKILL in the middle leaves its messages to whoever comes next: a resend, the start-up recovery or the
queue reader, which work them from the raw bytes and record their real outcome. Input: the MLLP sample's first
message (``tests/data/hl7v2/mllp-framed.hl7``).
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hl7.client import MLLPClient

from conftest import DATA
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.mllp import MLLPServer, frame
import gateway.pipeline as pipeline_module
from gateway.pipeline import MAX_ATTEMPTS, Pipeline, Status
from gateway.store.store import Store

GOOD = split_messages((DATA / "hl7v2" / "mllp-framed.hl7").read_bytes())[0]


def copy_of(tag: str) -> bytes:
    return GOOD.replace(b"TJ2406100001", tag.encode())


def msa(ack: bytes) -> list[str]:
    return next(s for s in ack.decode("utf-8").split("\r") if s.startswith("MSA")).split("|")


def ingest(pipeline: Pipeline, message: bytes) -> Any:
    return pipeline.ingest_batch(pipeline.channel("hl7v2"), [RawUnit(message, 1, "mllp:test")], channel="mllp")[0]


def hold(pipeline: Pipeline, message: bytes, *, lease: float = 300.0, status: str = "received") -> int:
    """Store ``message`` as a process that then stops working on it would (this process holds the lease)."""
    sender, message_id = pipeline.channel("hl7v2").adapter.identify(RawUnit(message, 1))
    record_id, _ = pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender=sender, message_id=message_id,
                                             origin="mllp:test", raw=message, status=status,
                                             lease=lease if status == "received" else None)
    return record_id


# -- resends ------------------------------------------------------------------------------


def test_a_live_lease_is_answered_being_processed_and_an_expired_one_is_taken_over(
        pipeline: Pipeline, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "RESEND_WAIT", 0.3)
    record_id = hold(pipeline, copy_of("L001"))  # held by this very process: alive
    started = time.monotonic()
    busy = ingest(pipeline, copy_of("L001"))
    assert time.monotonic() - started >= 0.3, "the resend waited for the holder first"
    assert busy.status is Status.DUPLICATE and msa(busy.answer)[1] == "AE"
    assert "already being processed" in msa(busy.answer)[3]
    assert pipeline.store.get_message(record_id).status == "received"

    clock.advance(seconds=pipeline.settings.processing_lease + 1)  # the holder is late: its lease ran out
    taken = ingest(pipeline, copy_of("L001"))
    assert taken.status is Status.STORED and taken.record_id == record_id
    assert msa(taken.answer)[1:3] == ["AA", "L001"]
    rec = pipeline.store.get_message(record_id)
    assert (rec.status, rec.ack, rec.lease_owner, rec.attempts) == ("stored", taken.answer, None, 2)
    assert ingest(pipeline, copy_of("L001")).answer == taken.answer, "from now on, the stored answer"


def test_a_lease_of_a_process_that_is_gone_is_free_at_once(pipeline: Pipeline) -> None:
    record_id = hold(pipeline, copy_of("L002"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    host = pipeline.store.get_message(record_id).lease_owner.rsplit(":", 1)[0]  # type: ignore[union-attr]
    pipeline.store.db.execute("UPDATE messages SET lease_owner = ? WHERE id = ?", [f"{host}:{pid}", record_id])
    assert ingest(pipeline, copy_of("L002")).status is Status.STORED


def test_an_interrupted_message_marked_failed_by_an_earlier_release_is_worked_on_resend(pipeline: Pipeline) -> None:
    record_id = hold(pipeline, copy_of("L003"))
    pipeline.store.db.execute("UPDATE messages SET status = 'failed', lease_owner = NULL, lease_until = NULL")
    outcome = ingest(pipeline, copy_of("L003"))
    assert outcome.status is Status.STORED and outcome.record_id == record_id


HOLDER = textwrap.dedent("""
    import sys, time
    from gateway.adapters.base import RawUnit
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline
    settings = load_settings(environ={}, overrides={"data_dir": sys.argv[1], "issuer_uscc": sys.argv[2],
                                                        "database": sys.argv[3]})
    pipeline = Pipeline(settings)
    raw = sys.stdin.buffer.read()
    # stored raw and held, as ingest_batch does before it works a message; then it hangs as if stuck in a stage
    ch = pipeline.channel("hl7v2")
    sender, message_id = ch.adapter.identify(RawUnit(raw, 1))
    record_id, _ = pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender=sender, message_id=message_id,
                                             origin="mllp:x", raw=raw, lease=300.0)
    print("held", flush=True)
    if sys.argv[4] == "never":
        time.sleep(120)
    time.sleep(float(sys.argv[4]))  # then it finishes the message, as a slow listener or another node would
    unit = RawUnit(raw, 1, "mllp:x")
    pipeline._record_safely(ch, unit, pipeline._work(ch, unit, record_id), "mllp")
    print("finished", flush=True)
    time.sleep(120)
""")


def _holder(settings: Any, message: bytes, finish_after: str = "never") -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, settings.data_dir, settings.issuer_uscc,
                             settings.database, finish_after],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(message)
    proc.stdin.close()
    assert proc.stdout.readline() == b"held\n"
    return proc


def test_a_resend_while_another_process_works_the_first_copy_is_answered_with_its_outcome(settings: Any) -> None:
    """Another node's listener, or a background loop taking over a killed node's messages, holds the first copy
    when the LIS sends it again: the resend waits for that outcome and is answered with it (AA), not told to
    retry (AE), which a LIS would show as an error to a person."""
    pipeline = Pipeline(settings)
    proc = _holder(settings, copy_of("W001"), finish_after="0.5")
    try:
        started = time.monotonic()
        outcome = ingest(pipeline, copy_of("W001"))
        waited = time.monotonic() - started
        assert outcome.status is Status.DUPLICATE and msa(outcome.answer)[1:3] == ["AA", "W001"]
        assert 0.2 < waited < pipeline_module.RESEND_WAIT
        rec = pipeline.store.find_message("hl7v2", "LIS|TJXRMYY", "W001")
        assert rec is not None and rec.status == "stored" and rec.ack == outcome.answer, "the holder's own answer"
        assert rec.attempts == 1, "worked once, by its holder"
        assert pipeline.store.counts() == {"stored": 1}
    finally:
        proc.kill()
        proc.wait(10)
        pipeline.close()


def test_a_resend_waiting_for_a_holder_that_is_killed_takes_the_message_over(settings: Any) -> None:
    pipeline = Pipeline(settings)
    proc = _holder(settings, copy_of("W002"))
    killer = threading.Timer(0.4, lambda: (os.kill(proc.pid, signal.SIGKILL), proc.wait(10)))
    try:
        killer.start()
        outcome = ingest(pipeline, copy_of("W002"))
        assert outcome.status is Status.STORED and msa(outcome.answer)[1:3] == ["AA", "W002"]
        rec = pipeline.store.find_message("hl7v2", "LIS|TJXRMYY", "W002")
        assert rec is not None and (rec.status, rec.attempts, rec.lease_owner) == ("stored", 2, None)
    finally:
        killer.join()
        proc.kill()
        pipeline.close()


def test_a_batchs_resends_wait_once_together_after_its_new_messages_are_recorded(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four resends whose first copies a live process took moments ago, and one new message, in one batch (an MLLP
    listener's): the new message is worked and recorded before any waiting, and the four wait once, together."""
    monkeypatch.setattr(pipeline_module, "RESEND_WAIT", 0.5)
    for n in range(4):
        hold(pipeline, copy_of(f"B00{n}"))  # held by this very process: alive, taken just now
    seen: list[str] = []
    real = pipeline_module.Pipeline._await_resent

    def waiting(self: Any, ch: Any, unit: Any, existing: Any, deadline: float) -> Any:
        seen.append(pipeline.store.find_message("hl7v2", "LIS|TJXRMYY", "B009").status)  # type: ignore[union-attr]
        return real(self, ch, unit, existing, deadline)

    monkeypatch.setattr(pipeline_module.Pipeline, "_await_resent", waiting)
    units = [RawUnit(copy_of(f"B00{n}"), n + 1, "mllp:test") for n in (0, 1, 9, 2, 3)]
    started = time.monotonic()
    outcomes = pipeline.ingest_batch(pipeline.channel("hl7v2"), units, channel="mllp")
    took = time.monotonic() - started
    assert [msa(o.answer)[1] for o in outcomes] == ["AE", "AE", "AA", "AE", "AE"]
    assert seen == ["stored"] * 4, "the new message was recorded before the resends waited"
    assert 0.5 <= took < 1.5, f"one wait for the batch, not one per resend ({took:.1f} s)"


def test_a_resend_of_a_message_held_for_long_is_answered_at_once(pipeline: Pipeline, clock: Any) -> None:
    """A holder that took the message more than a few seconds ago (stuck, or on a machine that is gone, whose
    lease is all there is to go by) is not waited for: the resend is told to retry at once."""
    record_id = hold(pipeline, copy_of("S001"))
    pipeline.store.db.execute("UPDATE messages SET lease_owner = 'elsewhere:1' WHERE id = ?", [record_id])
    clock.advance(seconds=pipeline_module.RESEND_FRESH + 1)
    started = time.monotonic()
    busy = ingest(pipeline, copy_of("S001"))
    assert time.monotonic() - started < 0.5
    assert busy.status is Status.DUPLICATE and "already being processed" in msa(busy.answer)[3]


def test_a_message_held_by_a_process_killed_with_sigkill_is_worked_on_resend(
        settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "RESEND_WAIT", 0.3)
    pipeline = Pipeline(settings)  # the real clock: the holder's lease has not expired
    proc = _holder(settings, copy_of("K001"))
    try:
        busy = ingest(pipeline, copy_of("K001"))
        assert "already being processed" in msa(busy.answer)[3], "a live holder keeps it"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        outcome = ingest(pipeline, copy_of("K001"))
        assert outcome.status is Status.STORED and msa(outcome.answer)[1:3] == ["AA", "K001"]
        assert pipeline.store.counts() == {"stored": 1}
    finally:
        proc.kill()
        pipeline.close()


def test_a_message_held_by_a_process_killed_with_sigkill_is_worked_at_start(settings: Any) -> None:
    proc = _holder(settings, copy_of("K002"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    restarted = Pipeline(settings)
    try:
        assert restarted.recover() == 1
        rec = restarted.store.find_message("hl7v2", "LIS|TJXRMYY", "K002")
        assert rec is not None and rec.status == "stored" and rec.ack is not None and msa(rec.ack)[1] == "AA"
        assert rec.lease_owner is None
        assert restarted.recover() == 0
    finally:
        restarted.close()


def test_recovery_leaves_a_live_holders_message_alone(pipeline: Pipeline) -> None:
    record_id = hold(pipeline, copy_of("K003"))
    assert pipeline.recover() == 0
    assert pipeline.store.get_message(record_id).status == "received"


# -- the queue reader ---------------------------------------------------------------------


def test_the_queue_reader_takes_queued_and_abandoned_messages_under_a_lease(pipeline: Pipeline, clock: Any) -> None:
    queued = hold(pipeline, copy_of("Q001"), status="queued")
    held = hold(pipeline, copy_of("Q002"))  # being worked by a live process (this one)
    pipeline.store.db.execute("UPDATE messages SET lease_owner = 'elsewhere:1', lease_until = ? WHERE id = ?",
                              [clock().timestamp() + 60, held])  # another machine's worker, lease running
    done = pipeline.process_queued()
    assert [o.record_id for o in done] == [queued]
    assert pipeline.store.get_message(held).status == "received"
    clock.advance(seconds=61)  # that worker's lease ran out: the reader takes the message over
    assert [o.status for o in pipeline.process_queued()] == [Status.STORED]
    assert pipeline.store.counts() == {"stored": 2}


def test_a_message_that_kills_its_worker_every_time_is_set_aside_as_failed(pipeline: Pipeline, clock: Any) -> None:
    record_id = hold(pipeline, copy_of("P001"))
    for _ in range(MAX_ATTEMPTS):  # each time, its worker died before it finished
        clock.advance(seconds=pipeline.settings.processing_lease + 1)
        pipeline.store.take(record_id, 300.0)
    clock.advance(seconds=pipeline.settings.processing_lease + 1)
    [outcome] = pipeline.process_queued()
    assert outcome.status is Status.FAILED and msa(outcome.answer)[1] == "AE"
    assert "without finishing" in msa(outcome.answer)[3]
    assert pipeline.store.get_message(record_id).ack == outcome.answer
    assert pipeline.retry(record_id, "ops").status is Status.STORED


def test_two_readers_of_one_queue_never_claim_the_same_message(pipeline: Pipeline) -> None:
    for n in range(6):  # four messages of one LIS, then two of another
        message = copy_of(f"Q{n:03}")
        hold(pipeline, message if n < 4 else message.replace(b"|LIS|", b"|LIS2|", 1), status="queued")
    other = Store.open(pipeline.settings.database_locator, pipeline.store.clock)  # another connection, as a node
    try:
        first = pipeline.store.claim_queued(4, 300.0)
        second = other.claim_queued(4, 300.0)
        assert [r[0] for r in first] == sorted(r[0] for r in first) and len(first) == 4, "oldest first"
        assert len(second) == 2 and not {r[0] for r in first} & {r[0] for r in second}
        assert [r[5] for r in first + second] == [1] * 6, "each taken once, counted as an attempt"
        assert other.claim_queued(4, 300.0) == [], "held by a live process: nothing left to take"
    finally:
        other.close()


def test_a_later_message_of_a_sender_waits_while_another_reader_works_an_earlier_one(pipeline: Pipeline) -> None:
    """Another node's reader took a LIS's first messages: this node's reader leaves that LIS's later ones alone
    until they are done (their order is the LIS's), and takes another LIS's."""
    for n in range(4):
        message = copy_of(f"W{n:03}")
        hold(pipeline, message if n < 3 else message.replace(b"|LIS|", b"|LIS2|", 1), status="queued")
    other = Store.open(pipeline.settings.database_locator, pipeline.store.clock)
    try:
        first = other.claim_queued(1, 300.0)  # the other node: the LIS's first message
        mine = pipeline.store.claim_queued(4, 300.0)
        assert [r[0] for r in mine] == [4], "only the other LIS's: the first LIS's next ones wait"
    finally:
        other.close()
    assert len(first) == 1


# -- an older database ----------------------------------------------------------------------


def test_an_older_database_gets_the_lease_columns_when_opened(tmp_path: Path) -> None:
    """SQLite only: a file of an earlier release (PostgreSQL databases start at today's layout)."""
    path = tmp_path / "old.db"
    store = Store.open(path)
    store.insert_raw(channel="mllp", fmt="hl7v2", sender="LIS|X", message_id="OLD1", origin="", raw=b"MSH|x")
    store.close()
    conn = sqlite3.connect(path)
    for column in ("lease_owner", "lease_until", "attempts"):
        conn.execute(f"ALTER TABLE messages DROP COLUMN {column}")
    conn.commit()
    conn.close()
    reopened = Store.open(path)
    try:
        rec = reopened.find_message("hl7v2", "LIS|X", "OLD1")
        assert rec is not None and (rec.status, rec.lease_owner, rec.attempts) == ("received", None, 0)
        assert reopened.abandoned(("hl7v2",)) == [rec.id], "an old in-flight message is free to be worked again"
    finally:
        reopened.close()


# -- MLLP timeouts ----------------------------------------------------------------------------


@pytest.fixture
def quick_server(pipeline: Pipeline) -> Any:
    server = MLLPServer(pipeline, "127.0.0.1", 0, idle_timeout=0.5, read_timeout=0.5)
    server.start_in_thread()
    yield server
    server.stop()


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (fails if it did not within ``seconds``)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    while True:
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        if not data:
            return time.monotonic() - start


def test_an_idle_connection_is_closed(quick_server: MLLPServer) -> None:
    with socket.create_connection(("127.0.0.1", quick_server.port), timeout=5) as sock:
        sock.sendall(frame(copy_of("T001")))
        assert msa(_ack(sock))[1] == "AA", "a connection is idle between messages, not while one is read"
        assert _closed_within(sock, 5) < 2


def test_a_message_not_finished_in_time_is_dropped_and_nothing_stored(quick_server: MLLPServer,
                                                                      pipeline: Pipeline) -> None:
    message = frame(copy_of("T002"))
    with socket.create_connection(("127.0.0.1", quick_server.port), timeout=5) as sock:
        start = time.monotonic()
        try:
            for byte in message[:30]:  # one byte every 0.1 s: alive, but far too slow
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        _closed_within(sock, 5)
        assert time.monotonic() - start < 4
    assert pipeline.store.counts() == {}


def test_a_trickling_sender_does_not_delay_other_connections(pipeline: Pipeline) -> None:
    server = MLLPServer(pipeline, "127.0.0.1", 0, read_timeout=30)
    server.start_in_thread()
    tricklers = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        for sock in tricklers:
            sock.sendall(b"\x0bMSH|^~\\&|SLOW")  # a message begun and never finished
        worst = 0.0
        with MLLPClient("127.0.0.1", server.port) as client:
            for n in range(5):
                for sock in tricklers:
                    sock.sendall(b"x")
                start = time.monotonic()
                assert msa(client.send_message(copy_of(f"T1{n:02d}")))[1] == "AA"
                worst = max(worst, time.monotonic() - start)
        assert worst < 1.0
    finally:
        for sock in tricklers:
            sock.close()
        server.stop()
    assert pipeline.store.counts() == {"stored": 5}


def _ack(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = sock.recv(4096)
        assert chunk, "closed before the ACK"
        data += chunk
    return data.strip(b"\x0b\x1c\r")


def test_a_busy_senders_burst_never_hides_another_senders_message(pipeline: Pipeline, clock: Any) -> None:
    """Ten messages of a LIS whose first another machine works, then one of another LIS: a reader asking for two
    takes the other LIS's (the burst waits; it filled the page the reader looked at, which came back empty)."""
    ids = [hold(pipeline, copy_of(f"B{n:03}"), status="queued") for n in range(10)]
    other = hold(pipeline, copy_of("T001").replace(b"|LIS|", b"|LIS2|", 1), status="queued")
    pipeline.store.db.execute("UPDATE messages SET status = 'received', lease_owner = 'elsewhere:1', lease_until = ?"
                              " WHERE id = ?", [clock().timestamp() + 60, ids[0]])
    assert [r[0] for r in pipeline.store.claim_queued(2, 300.0)] == [other]
