"""A PostgreSQL member whose connection the server ends while a message is stored (a failover, a restart, an
administrator's ``pg_terminate_backend``): the message is answered as while the database is away (no ACK, 503) and
its resend is worked, never recorded as ``failed`` and answered AE for good, nor held for the whole processing
lease by the process that stored it without learning so.

The connection is really ended, by ``pg_terminate_backend`` from another connection, at the moment named; input:
the MLLP sample's first message (``tests/data/hl7v2/mllp-framed.hl7``)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import DATA
from test_connection_reuse import backend_pid, terminate
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.pipeline import Pipeline
from gateway.store import db as store_db
from gateway.store.db import connect, fault_reason

GOOD = split_messages((DATA / "hl7v2" / "mllp-framed.hl7").read_bytes())[0]


def msa(ack: bytes) -> list[str]:
    return next(s for s in ack.decode("utf-8").split("\r") if s.startswith("MSA")).split("|")


def end_connection(locator: str, db: Any) -> None:
    """End ``db``'s server process from another connection and wait until it is gone."""
    terminate(locator, backend_pid(db))


@pytest.fixture
def pipeline(settings: Any, clock: Any, backend: str) -> Iterator[Pipeline]:
    if backend != "postgresql":
        pytest.skip("a PostgreSQL server ending the gateway's connection (run with --backend postgresql)")
    p = Pipeline(settings, clock=clock)
    yield p
    p.close()


def status_of(settings: Any, message_id: str) -> list[tuple[str, str | None]]:
    db = connect(settings.database)
    try:
        return [(r[0], r[1]) for r in db.execute(
            "SELECT status, ack_code FROM messages WHERE message_id = ? ORDER BY id", [message_id]).fetchall()]
    finally:
        db.close()


def test_the_connection_ended_while_the_outcome_is_recorded(pipeline: Pipeline, settings: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The server ends the connection as the worked message's outcome is written: the ingest fails as a database
    fault (the listener sends no ACK, HTTP answers 503), the message stays unfinished, and its resend is stored
    and answered AA (it was recorded as failed, on the next connection, and every resend answered AE)."""
    original = Pipeline._record
    ended: list[int] = []

    def record(self: Pipeline, *args: Any, **kw: Any) -> None:
        if not ended:
            ended.append(1)
            end_connection(settings.database, self.store.db)
        original(self, *args, **kw)

    monkeypatch.setattr(Pipeline, "_record", record)
    with pytest.raises(Exception) as raised:
        pipeline.ingest(GOOD, "hl7v2", channel="mllp")
    assert fault_reason(raised.value) is not None, raised.value
    assert status_of(settings, "TJ2406100001") == [("received", None)]

    outcome = pipeline.ingest(GOOD, "hl7v2", channel="mllp")[0]
    assert outcome.status.value == "stored" and msa(outcome.answer)[1] == "AA", outcome.issues
    assert status_of(settings, "TJ2406100001") == [("stored", "AA")]


def test_the_connection_ended_as_the_raw_message_was_committed(pipeline: Pipeline, settings: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw message is committed and the server ends the connection before its answer arrives: the process
    holds a lease on a message it does not know it stored. Its resend is taken on at once and stored (it was
    answered "already being processed; retry later" until the 300 s lease ran out)."""
    import psycopg

    original = store_db.transaction
    calls: list[int] = []

    @contextlib.contextmanager
    def transaction(db: Any, **kw: Any) -> Iterator[Any]:
        first = not calls and not db.conn.in_transaction
        calls.append(1)
        with original(db, **kw) as inner:
            yield inner
        if first:  # committed; the answer "lost": the connection ends and the caller learns only that
            end_connection(settings.database, db)
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(store_db, "transaction", transaction)
    with pytest.raises(psycopg.OperationalError):
        pipeline.ingest(GOOD, "hl7v2", channel="mllp")
    monkeypatch.setattr(store_db, "transaction", original)
    assert status_of(settings, "TJ2406100001") == [("received", None)]  # stored, held by this live process

    started = time.monotonic()
    outcome = pipeline.ingest(GOOD, "hl7v2", channel="mllp")[0]
    assert outcome.status.value == "stored" and msa(outcome.answer)[1] == "AA", outcome.issues
    assert time.monotonic() - started < 2.5  # taken on, not waited for (the resend wait is 3 s)
    assert status_of(settings, "TJ2406100001") == [("stored", "AA")]


def test_a_message_another_live_process_of_this_machine_holds_is_still_waited_for(
        pipeline: Pipeline, settings: Any) -> None:
    """Only this process's own doubtful leases are taken on: a message held by this process that it did not
    store in doubt stays held (the resend is told to retry), as before."""
    ch = pipeline.channel("hl7v2")
    sender, message_id = ch.adapter.identify(RawUnit(GOOD, 1))
    pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender=sender, message_id=message_id, origin="mllp:x",
                              raw=GOOD, lease=300.0)
    outcome = pipeline.ingest(GOOD, "hl7v2", channel="mllp")[0]
    assert msa(outcome.answer)[1] == "AE" and "being processed" in outcome.issues[0].message
