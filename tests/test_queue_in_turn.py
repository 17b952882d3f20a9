"""Several queue readers on one sender's messages (``queue_readers`` above 1, ``mllp_ack = received``).

Readers take the next messages of any sender, a few at a time, and work them side by side; each message is
recorded in its turn, once every earlier message of its sender has its outcome. What must hold: every message is
recorded once, a sender's messages are recorded in the order they came (a correction never lands before the
report it corrects), a message whose earlier one is left to nobody goes back to the queue without being counted as
an attempt, a reader never waits for a turn longer than half the processing lease (nor 10 s), nor once it is
stopping, and a sender whose message a stuck process holds never keeps the other senders waiting.

Input: the first message of the MLLP sample (``tests/data/hl7v2/mllp-framed.hl7``, see tests/data/README.md), its
control id (MSH-10) and report number (OBR-3) made distinct per message.
"""
from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
import time

from gateway.audit.log import entries
from gateway.pipeline import Pipeline, Status
from gateway.store.store import lease_owner
from test_mllp_receipt import GOOD, hl7, readers_in_turn, units

#: The control id and report number the sample carries.
CONTROL_ID, REPORT = b"TJ2406100001", b"R2406100001"


def numbered(n: int, report: int | None = None, *, corrected: bool = False) -> bytes:
    """The sample as message ``n`` of its sender, about report ``report`` (``n`` when not given); ``corrected``:
    a correction of that report (OBR-25 ``C``, its WBC 7.1 instead of 6.3)."""
    assert GOOD.count(CONTROL_ID) == 1 and REPORT in GOOD
    message = GOOD.replace(CONTROL_ID, f"IT{n:010d}".encode()).replace(REPORT, f"R{report or n:010d}".encode())
    if corrected:
        assert message.count(b"|||F\r") >= 1 and message.count(b"||6.3|10*9/L|") == 1
        obr_end = message.index(b"\r", message.index(b"\rOBR|") + 1)
        message = message[:obr_end - 1] + b"C" + message[obr_end:]
        message = message.replace(b"||6.3|10*9/L|", b"||7.1|10*9/L|")
    return message


def wbc_now(pipeline: Pipeline, report: int) -> float:
    """The WBC value report ``report`` holds now (its current DiagnosticReport's result)."""
    found = pipeline.store.search("DiagnosticReport", [("identifier", f"R{report:010d}")]).resources
    assert len(found) == 1
    for ref in found[0]["result"]:
        observation = pipeline.store.read(*ref["reference"].split("/"))
        if observation["code"]["coding"][0]["code"] == "WBC":
            return float(observation["valueQuantity"]["value"])
    raise AssertionError("no WBC result")


def recorded_order(pipeline: Pipeline) -> list[str]:
    """The control ids of the messages recorded, in the order their outcomes were recorded (the audit log's)."""
    found = []
    for entry in entries(pipeline.store.db):
        text = str(entry.content)
        if "IT0" in text:
            found.append(text[text.index("IT0"):text.index("IT0") + 12])
    return found


def queue(pipeline: Pipeline, messages: list[bytes]) -> list[int]:
    receipts = pipeline.receive_batch(hl7(pipeline), units(*messages), channel="mllp")
    assert {o.status for o in receipts} == {Status.QUEUED}
    return [int(o.record_id) for o in receipts if o.record_id is not None]


def test_two_readers_work_one_senders_messages_side_by_side_and_record_them_in_arrival_order(
        pipeline, settings, clock) -> None:
    """One busy sender, two readers: both work its messages, and the outcomes are recorded in arrival order —
    also where a message corrects the report of the one before it."""
    sent = [numbered(n, report=(n + 1) // 2, corrected=n % 2 == 0) for n in range(1, 25)]  # a report, its correction
    ids = queue(pipeline, sent)
    worked = readers_in_turn(settings, clock)
    assert sorted(worked[0] + worked[1]) == ids, "every message recorded once"
    assert worked[0] and worked[1], "both readers worked the sender's messages"
    assert pipeline.store.counts() == {"stored": 24}
    assert recorded_order(pipeline) == [f"IT{n:010d}" for n in range(1, 25)], "recorded in arrival order"
    assert [wbc_now(pipeline, report) for report in range(1, 13)] == [7.1] * 12, "every correction holds"


def held_by(pipeline: Pipeline, record_id: int, *, since: float = 0.0) -> subprocess.Popen[bytes]:
    """Message ``record_id`` taken ``since`` seconds ago by another process of this machine, alive (and working
    nothing) until the test kills it."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    owner = lease_owner().rpartition(":")[0] + f":{holder.pid}"
    until = pipeline.store.epoch() - since + float(pipeline.settings.processing_lease)
    pipeline.store.db.execute("UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ?,"
                              " attempts = 1 WHERE id = ?", [owner, until, record_id])
    return holder


def dies_when(pipeline: Pipeline, holder: subprocess.Popen[bytes], record_id: int,
              status: str | None = None) -> threading.Thread:
    """A thread that kills ``holder`` once this process holds message ``record_id`` (a reader waits with it), or,
    with ``status``, once that message has it."""
    def watch() -> None:
        from gateway.store.store import Store

        looking = Store.open(pipeline.settings.database_locator)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                found = looking.get_message(record_id)
                if (found.status == status) if status else (found.lease_owner == lease_owner()):
                    break
                time.sleep(0.01)
            time.sleep(0.05)
        finally:
            looking.close()
            holder.kill()
            holder.wait(30)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def test_a_message_whose_earlier_one_is_left_to_nobody_goes_back_uncounted(pipeline, settings, clock) -> None:
    """The process working the earlier message of the same sender dies while a reader waits with the later one:
    the reader gives the later one back as it was (its attempt not counted), and the next pass takes the earlier
    one first and records both, in order."""
    first, second = queue(pipeline, [numbered(1), numbered(2)])
    holder = held_by(pipeline, first)
    watcher = dies_when(pipeline, holder, second)
    try:
        assert pipeline.process_queued(2, in_turn=True) == [], "the later one waited, then went back"
    finally:
        watcher.join(90)
    later = pipeline.store.get_message(second)
    assert (later.status, later.lease_owner, later.attempts) == ("queued", None, 0)
    done = pipeline.process_queued(2, in_turn=True)
    assert [(o.record_id, o.status) for o in done] == [(first, Status.STORED), (second, Status.STORED)]
    assert pipeline.store.get_message(first).attempts == 2 and pipeline.store.get_message(second).attempts == 1
    assert recorded_order(pipeline) == ["IT0000000001", "IT0000000002"]


def test_the_background_rework_of_abandoned_messages_keeps_each_senders_turn(pipeline) -> None:
    """A reader died holding a later message while an earlier one of its sender is still worked (or waits in the
    queue): the background pass that works abandoned messages again leaves the later one for its turn; once the
    earlier one has its outcome, the later one is worked again and recorded after it."""
    first, second = queue(pipeline, [numbered(1), numbered(2)])
    holder = held_by(pipeline, first)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(30)
        pipeline.store.db.execute("UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ?"
                                  " WHERE id = ?", [lease_owner().rpartition(":")[0] + f":{dead.pid}",
                                                    pipeline.store.epoch() + 60, second])
        assert pipeline.rework_abandoned() == 0, "the later one waits for the earlier one, still being worked"
        assert pipeline.store.get_message(second).status == "received"
    finally:
        holder.kill()
        holder.wait(30)
    assert pipeline.rework_abandoned() == 2
    assert recorded_order(pipeline) == ["IT0000000001", "IT0000000002"]


def test_a_reader_waits_for_a_live_process_at_most_half_the_processing_lease(settings, clock, caplog) -> None:
    """While a live process works the earlier message, the later one waits for its turn; past half the
    processing lease it goes back to the queue, said in the log, and is recorded once the earlier one is."""
    reader = Pipeline(dataclasses.replace(settings, processing_lease=0.6), clock=clock)
    try:
        first, second = queue(reader, [numbered(1), numbered(2)])
        holder = held_by(reader, first)
        try:
            began = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
                assert reader.process_queued(2, in_turn=True) == []
            waited = time.monotonic() - began
            assert 0.3 <= waited < 5, waited
            assert (f"message record={second} waited too long for the outcome of record={first}, from the same "
                    f"sender (worked by {lease_owner().rpartition(':')[0]}:{holder.pid}); it goes back to the queue"
                    ) in caplog.text
            assert reader.store.get_message(second).lease_owner is None
            assert reader.store.get_message(second).attempts == 0
        finally:
            holder.kill()
            holder.wait(30)
        done = reader.process_queued(2, in_turn=True)
        assert [o.record_id for o in done] == [first, second]
        assert recorded_order(reader) == ["IT0000000001", "IT0000000002"]
    finally:
        reader.close()


def test_recorded_in_groups_each_group_stops_before_a_message_whose_turn_has_not_come(pipeline, monkeypatch) -> None:
    """``queue_record_group`` 2 with readers in turn, a reader holding messages 1 and 3 while another process works
    2: message 1 is recorded before the reader waits for 3's turn; once 2's process is gone, 3 goes back to the
    queue, and the next pass records 2 and 3, in order."""
    first, second, third = queue(pipeline, [numbered(1), numbered(2), numbered(3)])
    holder = held_by(pipeline, second)
    store = pipeline.store
    taken = [store.take(first, 60.0), store.take(third, 60.0)]  # as a claim by this reader would hold them
    claim = [(r.id, r.format, r.channel, r.origin, store.raw_of(r.id), r.attempts) for r in taken if r is not None]
    monkeypatch.setattr(store, "claim_queued", lambda *args, **kwargs: claim)
    watcher = dies_when(pipeline, holder, first, status="stored")
    try:
        done = pipeline.process_queued(3, group=2, in_turn=True)
    finally:
        watcher.join(90)
    assert [o.record_id for o in done] == [first], "recorded before the wait; the third went back"
    assert store.get_message(third).status == "queued"
    monkeypatch.undo()
    done = pipeline.process_queued(3, group=2, in_turn=True)
    assert [o.record_id for o in done] == [second, third]
    assert recorded_order(pipeline) == ["IT0000000001", "IT0000000002", "IT0000000003"]


def test_a_reader_that_is_stopping_gives_its_waiting_messages_back_at_once(pipeline) -> None:
    """``gateway serve`` stopping (SIGTERM sets the reader's stop event) while a message waits for its turn: the
    message goes back to the queue at once, not after the wait's limit."""
    first, second = queue(pipeline, [numbered(1), numbered(2)])
    holder = held_by(pipeline, first)
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    try:
        timer.start()
        began = time.monotonic()
        assert pipeline.process_queued(2, in_turn=True, stop=stop) == []
        assert time.monotonic() - began < 5
    finally:
        timer.cancel()
        holder.kill()
        holder.wait(30)
    later = pipeline.store.get_message(second)
    assert (later.status, later.lease_owner, later.attempts) == ("queued", None, 0)


def test_a_sender_whose_message_a_stuck_process_holds_never_keeps_the_other_senders_waiting(pipeline) -> None:
    """One sender's first message has been held for 30 s by a live process that makes no progress (stopped,
    hung) and its later messages fill the queue's head; another sender's message comes after them all: the reader
    takes and records the other sender's message, and leaves the held sender's ones waiting; once no other sender
    has any, still not the held sender's (its holder is stuck: each would wait its 10 s for nothing)."""
    from test_mllp_receipt import msh_field

    held_sender = queue(pipeline, [numbered(n) for n in range(1, 81)])  # more than a reader's first look
    other = queue(pipeline, [msh_field(numbered(99), 3, "LIS-B")])
    holder = held_by(pipeline, held_sender[0], since=30.0)
    try:
        began = time.monotonic()
        done = pipeline.process_queued(2, in_turn=True)
        assert time.monotonic() - began < 5, "no wait for the held sender's turn"
        assert [o.record_id for o in done] == other
        began = time.monotonic()
        assert pipeline.process_queued(2, in_turn=True) == []
        assert time.monotonic() - began < 5, "the stuck holder's sender is left alone, not waited for"
    finally:
        holder.kill()
        holder.wait(30)
    assert {pipeline.store.get_message(i).status for i in held_sender[1:]} == {"queued"}


def test_whose_turn_it_is_is_answered_as_a_reading_of_the_whole_queue_answers_it(pipeline) -> None:
    """:meth:`Store.earlier_unfinished` reads the messages being worked and the first few a sender has waiting (its
    own index of the queue), not every unfinished message before the one asked about: on random queues of several
    senders and formats, with random messages held by this process, it answers what the reading of the whole queue
    it replaced answers (that statement is the reference, here)."""
    import random

    store = pipeline.store
    reference = ("SELECT w.id, w.lease_owner, w.lease_until FROM messages m JOIN messages w ON w.sender = m.sender"
                 " AND w.id < m.id WHERE m.id = ? AND w.status IN ('queued', 'received') AND w.format IN ({})"
                 " ORDER BY w.id")
    rng = random.Random(20261206)
    received = pipeline.receive_batch(hl7(pipeline), units(*[numbered(n) for n in range(1, 61)]), channel="mllp")
    ids = [o.record_id for o in received]
    checked = 0
    for _ in range(40):
        with store.unit_of_work():  # a random state of the queue: who sent each message, what became of it
            store.db.conn.executemany(
                "UPDATE messages SET sender = ?, format = ?, status = ?, lease_owner = ?, lease_until = ? WHERE id = ?",
                [(rng.choice("ABC"), rng.choice(("hl7v2", "hl7v2", "cda")),
                  status := rng.choice(("queued", "queued", "received", "stored", "refused")),
                  f"host:{rng.randint(1, 3)}" if status == "received" else None,
                  1e12 if status == "received" else None, i) for i in ids])
        held = [i for i in ids if rng.random() < 0.2]
        for record_id in rng.sample(ids, 15):
            for formats in (("hl7v2",), ("hl7v2", "cda")):
                mine = frozenset(rng.sample(held, min(len(held), rng.randint(0, 4))))
                rows = store.db.execute(reference.format(",".join("?" * len(formats))),
                                        [record_id, *formats]).fetchall()
                wanted = next(((int(i), o, u) for i, o, u in rows if int(i) not in mine), None)
                assert store.earlier_unfinished(record_id, formats, mine) == wanted, (record_id, formats, mine)
                checked += wanted is not None
    assert checked > 100, "most questions found an earlier message"


def test_whose_turn_it_is_is_found_without_reading_the_queue(pipeline) -> None:
    """However long the queue, the question reads the few messages being worked and one a sender has waiting: its
    statement is planned on indexes, the waiting messages on the queued messages' index of their senders."""
    if not str(pipeline.settings.database_locator).endswith(".db"):
        return  # SQLite's planner (PostgreSQL's sees the index in test_query_plans' generic plans)
    from test_query_plans import _plan_problems

    received = pipeline.receive_batch(hl7(pipeline), units(*[numbered(n) for n in range(1, 21)]), channel="mllp")
    ids = [o.record_id for o in received]
    seen: list[str] = []
    conn = pipeline.store.db.conn
    conn.set_trace_callback(seen.append)
    try:
        assert pipeline.store.earlier_unfinished(ids[-1], ("hl7v2",), frozenset(ids[:2]))[0] == ids[2]
    finally:
        conn.set_trace_callback(None)
    statements = [s for s in seen if "FROM messages m JOIN messages w" in s]
    assert len(statements) == 1 and not _plan_problems(conn, statements)
    plans = [" ".join(str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + s)) for s in statements]
    assert any("USING INDEX messages_queued_sender (sender=? AND id<?)" in p for p in plans), plans
