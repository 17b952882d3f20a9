"""PostgreSQL faults an outside tester found with several nodes on one database, each against the suite's throwaway
cluster (a real PostgreSQL):

- a node stopped (``kill -STOP``) while it held the write lock stalled every write of every node for good: psycopg
  ended each pipeline with a flush request after its sync, so the server never started the
  ``idle_in_transaction_session_timeout`` the gateway relies on; and ``/health`` said ok meanwhile;
- after a pipeline the server aborted (a full disk), psycopg listed as prepared a statement the server never made,
  and every later use of it failed (``InvalidSqlStatementName``, answered 500) on a connection lent again and again;
- on a full disk ``/health`` said the database answers, and writes were answered "cannot be reached".
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask

from gateway.api.errors import register_error_handlers
from gateway.store import db as store_db
from gateway.store import postgresql
from gateway.store.db import borrowed, connection_lost, fault_reason, transaction
from gateway.store.postgresql import connect

from test_health import CST, Clock, health

#: A server error as PostgreSQL raises it when it cannot extend a table's file (SQLSTATE 53100, disk_full).
DISK_FULL = ("DO $$ BEGIN RAISE EXCEPTION 'could not extend file \"base/16384/16385\": No space left on device'"
             " USING ERRCODE = 'disk_full'; END $$")


@pytest.fixture(autouse=True)
def no_write_failure() -> Iterator[None]:
    """The last refused write is kept per process: none before and after each test."""
    postgresql.write_succeeded()
    yield
    postgresql.write_succeeded()


@pytest.fixture(scope="module")
def gw(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """通江's gateway of the demo world on PostgreSQL, built like production's (as in tests/test_health.py, in
    schemas of its own), for /health."""
    import datetime as _dt
    import os

    from gateway.demo.world import build_world

    clock = Clock()
    w = build_world(tmp_path_factory.mktemp("faults-world"), clock,
                    {"tongjiang": "http://127.0.0.1:9", "fuling": "http://127.0.0.1:10"},
                    members=("tongjiang", "fuling"),
                    database=lambda key: str(pg_cluster.url("gw", schema=f"faults_{os.getpid()}_{key}")))
    clock.now = _dt.datetime.now(CST)
    return w.gateways["tongjiang"]


def session(locator: str, pid: int) -> tuple[Any, ...] | None:
    """(state, wait_event) of a server process, seen from another connection; None once it has ended."""
    other = connect(locator)
    try:
        row = other.execute("SELECT state, wait_event FROM pg_stat_activity WHERE pid = ?", [pid]).fetchone()
        return tuple(row) if row is not None else None
    finally:
        other.close()


def wait_gone(locator: str, pid: int, seconds: float) -> tuple[Any, ...] | None:
    deadline = time.monotonic() + seconds
    while (seen := session(locator, pid)) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


# -- 1. a node stopped while it holds the write lock ------------------------------------------------------------------

def test_a_client_stopped_after_a_pipeline_in_a_transaction_has_its_session_ended(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server ends a transaction whose client stops after a pipelined block (as a frozen node after
    ``Store.finish``): no flush request follows the pipeline's last sync, so the server's idle clock runs."""
    monkeypatch.setattr(postgresql, "IDLE_IN_TRANSACTION_S", 1)
    db = connect(pg_url)
    pid = int(db.conn.raw.info.backend_pid)
    db.conn.begin()
    with db.conn.pipeline() as pipe:
        db.execute("SELECT ?", [1])
        db.execute("SELECT ?", [2])
        pipe.sync()
        db.execute("SELECT ?", [3])
    # the client sends nothing more: the server ends the session after 1 s, and the write lock with it
    assert wait_gone(pg_url, pid, 6) is None, "the session stayed idle in its transaction, holding the write lock"
    other = connect(pg_url)
    try:
        with transaction(other):
            other.execute("SELECT 1")
    finally:
        other.close()
        db.close()


@pytest.mark.parametrize("stopped", ["idle in transaction, no server timeout", "in the middle of a pipeline"])
def test_a_writer_ends_a_holder_stopped_for_longer_than_the_bound(
        pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stopped: str) -> None:
    """A writer whose wait for the lock times out ends a holder that has waited on its client for longer than
    IDLE_IN_TRANSACTION_S (which no server timeout ends), names it in a WARNING and writes."""
    monkeypatch.setattr(postgresql, "IDLE_IN_TRANSACTION_S", 1)
    monkeypatch.setattr(postgresql, "LOCK_TIMEOUT_S", 1)
    holder = connect(pg_url)
    pid = int(holder.conn.raw.info.backend_pid)
    holder.execute("CREATE TABLE IF NOT EXISTS written (n int)")
    pipe = None
    if stopped.startswith("idle"):
        holder.conn.raw.execute("SET idle_in_transaction_session_timeout = 0")
        holder.conn.begin()
    else:
        holder.conn.begin()
        pipe = holder.conn.pipeline()
        pipe.__enter__()
        holder.execute("INSERT INTO written VALUES (?)", [1])  # sent; the sync never comes
    time.sleep(1.3)
    writer = connect(pg_url)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.store.postgresql"):
            with transaction(writer):
                writer.execute("INSERT INTO written VALUES (?)", [2])
        assert writer.execute("SELECT n FROM written").fetchall() == [(2,)]
        assert wait_gone(pg_url, pid, 5) is None
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("write lock was held by cyhr-gateway" in line and f"server pid {pid}" in line for line in said)
    finally:
        writer.close()
        if pipe is not None:
            with pytest.raises(psycopg.Error):
                pipe.__exit__(None, None, None)
        holder.close()


def test_a_holder_that_only_works_long_is_left_alone(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder busy on the server (a statement running) is not ended: the writer's wait times out as before."""
    monkeypatch.setattr(postgresql, "IDLE_IN_TRANSACTION_S", 0)
    monkeypatch.setattr(postgresql, "LOCK_TIMEOUT_S", 1)
    holder = connect(pg_url)
    writer = connect(pg_url)
    pid = int(holder.conn.raw.info.backend_pid)
    holder.conn.begin()
    busy = threading.Thread(target=lambda: holder.conn.raw.execute("SELECT pg_sleep(3)"))
    busy.start()
    try:
        time.sleep(0.3)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            writer.conn.begin()
        assert session(pg_url, pid) is not None
    finally:
        busy.join()
        holder.close()
        writer.close()


def test_health_says_when_writes_wait_for_a_holder_of_the_write_lock(gw: Any, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """/health fails its database check, naming the holder and for how long, while a transaction holds the write
    lock longer than WRITE_STALL_SECONDS (every node's writes wait); ok again once it is let go."""
    from gateway.api import health as health_api

    monkeypatch.setattr(health_api, "WRITE_STALL_SECONDS", 0.5)
    assert health(gw)[0] == 200
    holder = connect(gw.settings.database)
    waiter = connect(gw.settings.database)
    waiting = threading.Thread(target=waiter.conn.begin)  # waits for the lock
    try:
        holder.conn.begin()
        waiting.start()
        time.sleep(0.8)
        status, body = health(gw)
        assert status == 503 and "database" in body["failing"]
        detail = body["checks"]["database"]["detail"]
        assert "writes are stalled: the write lock is held by cyhr-gateway" in detail
        assert f"server pid {holder.conn.raw.info.backend_pid}" in detail and "idle in transaction" in detail
        assert "1 session(s) wait for it" in detail
        holder.conn.raw.execute("ROLLBACK")
        waiting.join()
        waiter.conn.raw.execute("ROLLBACK")
        assert health(gw)[0] == 200
    finally:
        holder.close()
        waiter.close()


# -- 2. psycopg's prepared statements out of step with the server's ---------------------------------------------------

def test_a_statement_prepared_in_an_aborted_pipeline_is_not_used_after(pg_url: str) -> None:
    """A statement run often enough to be prepared, queued after a failing one in a pipeline (the server skips it):
    its next use works (it failed with "prepared statement _pg3_0 does not exist" on every later use)."""
    db = connect(pg_url)
    try:
        db.execute("CREATE TABLE small (v int CHECK (v < 100))")
        query = "SELECT count(*) FROM small WHERE v = ?"
        with pytest.raises(KeyError), transaction(db):  # (a transaction rolled back before, as in a long-lived node)
            raise KeyError
        for n in range(5):
            db.execute(query, [n]).fetchone()
        with pytest.raises(psycopg.errors.CheckViolation), transaction(db):
            with db.conn.pipeline() as pipe:
                db.execute("INSERT INTO small VALUES (?)", [1000])
                db.execute(query, [5])  # the sixth time: prepared here
                pipe.sync()
        for n in range(3):
            assert db.execute(query, [n]).fetchone() == (0,)
    finally:
        db.close()


def test_a_connection_out_of_step_with_its_prepared_statements_is_dropped_as_a_fault(pg_url: str) -> None:
    """InvalidSqlStatementName (a statement psycopg lists as prepared, the server not) is a connection fault: the
    connection is closed (not lent again) and the error is one of the database being away (503, no ACK)."""
    db = connect(pg_url)
    query = "SELECT ?::int + 1"
    for n in range(6):
        db.execute(query, [n]).fetchone()
    db.conn.raw.pgconn.exec_(b"DEALLOCATE ALL")  # behind psycopg's back
    with pytest.raises(Exception) as raised:
        db.execute(query, [1])
    assert isinstance(raised.value, store_db.OperationalError) and fault_reason(raised.value) is not None
    assert "out of step" in str(raised.value)
    assert db.conn.raw.closed and connection_lost(db)
    # a request's borrowed connection is replaced: the next borrow works
    with borrowed(pg_url) as lent:
        for n in range(6):
            lent.execute(query, [n]).fetchone()
        first = lent
        lent.conn.raw.pgconn.exec_(b"DEALLOCATE ALL")
        with pytest.raises(psycopg.OperationalError):
            lent.execute(query, [1])
    with borrowed(pg_url) as again:
        assert again is not first and again.execute(query, [1]).fetchone() == (2,)
    # answered 503 (the database away), never 500
    app = Flask("t")
    register_error_handlers(app)

    @app.get("/x")
    def x() -> Any:
        raise raised.value

    answer = app.test_client().get("/x")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"


# -- 3. a full disk ---------------------------------------------------------------------------------------------------

def test_a_write_refused_for_want_of_space_fails_health_and_is_answered_as_such(gw: Any) -> None:
    """A write the database refuses with "No space left on device" fails /health's database check (which said
    "answers"), naming it, until a write goes through; the request is answered 503 saying the database refused
    the write (its disk is full), not that it cannot be reached."""
    db = connect(gw.settings.database)
    try:
        with pytest.raises(psycopg.errors.DiskFull) as raised, transaction(db):
            db.execute(DISK_FULL)
        status, body = health(gw)
        assert status == 503 and "database" in body["failing"]
        assert "refused a write" in body["checks"]["database"]["detail"]
        assert "No space left on device" in body["checks"]["database"]["detail"]
        # in a pipeline too (the error comes at its sync)
        postgresql.write_succeeded()
        with pytest.raises(psycopg.errors.DiskFull), transaction(db):
            with db.conn.pipeline() as pipe:
                db.execute("SELECT ?", [1])
                db.execute(DISK_FULL)
                pipe.sync()
        assert postgresql.write_failure() is not None
        with transaction(db):  # a transaction that writes nothing proves nothing
            db.execute("SELECT 1")
        assert health(gw)[0] == 503
        with transaction(db):
            db.execute("UPDATE schema_versions SET applied_at = applied_at WHERE part = 'core'")
        assert health(gw)[0] == 200
    finally:
        db.close()
    app = Flask("t")
    register_error_handlers(app)

    @app.post("/x")
    def x() -> Any:
        raise raised.value

    answer = app.test_client().post("/x")
    assert answer.status_code == 503
    text = answer.get_json()["issue"][0]["diagnostics"]
    assert "refused the write" in text and "disk is full" in text and "cannot be reached" not in text
