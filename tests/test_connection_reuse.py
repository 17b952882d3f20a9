"""Per-request database connections: borrowed and given back (kept per thread on PostgreSQL, opened per borrow on
SQLite), given back clean, replaced when the server ended them."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_audit_support import serving

from gateway.errors import DatabaseUnavailable
from gateway.store import db as dbmodule
from gateway.store import layout, schema
from gateway.store import db as store_db
from gateway.store.db import borrowed, close_borrowed, connect, dialect, transaction


class Opened:
    """Every connection :func:`borrowed` opens, with the thread that opened it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.made: list[tuple[int, Any]] = []

    def __call__(self, locator: Any, **kw: Any) -> Any:
        db = self.real(locator, **kw)
        self.made.append((threading.get_ident(), db))
        return db

    def __len__(self) -> int:
        return len(self.made)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[Opened]:
    close_borrowed()  # connections kept by earlier tests of this thread do not count
    counter = Opened(dbmodule.connect)
    monkeypatch.setattr(dbmodule, "connect", counter)
    yield counter
    close_borrowed()


@pytest.fixture
def served(settings: Any, clock: Any) -> Iterator[tuple[Any, dict[str, str], Any]]:
    with serving(settings, clock) as s:
        yield s


def closed(db: Any) -> bool:
    """Whether a connection has been closed (either engine)."""
    if dialect(db) == "postgresql":
        return bool(db.conn.raw.closed)
    try:
        db.conn.execute("SELECT 1")
    except Exception:
        return True
    return False


def backend_pid(db: Any) -> int:
    return int(db.conn.raw.info.backend_pid)


def terminate(locator: str, pid: int) -> None:
    """End a server process from another connection, as an administrator or a server restart would."""
    other = connect(locator)
    try:
        assert other.execute("SELECT pg_terminate_backend(?)", [pid]).fetchone()[0] is True
        deadline = time.monotonic() + 10
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ?", [pid]).fetchone() is not None:
            assert time.monotonic() < deadline, "the server process did not end"
            time.sleep(0.02)
    finally:
        other.close()


def postgresql_only(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("a PostgreSQL connection's life (run with --backend postgresql)")


def auditor(tokens: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['auditor']}"}


# --------------------------------------------------------------------------- requests on one thread


def test_requests_on_one_thread_reuse_its_connection(served, settings, opened: Opened) -> None:
    client, tokens, _ = served
    for _ in range(3):
        assert client.get("/audit/stats", headers=auditor(tokens)).status_code == 200
    if dialect(opened.made[0][1]) == "postgresql":
        # the token check and the audit read of all three requests: one connection, still open for the next
        assert len(opened) == 1
        kept = opened.made[0][1]
        assert not closed(kept)
        with borrowed(settings.database_locator) as db:
            assert db is kept and not db.conn.in_transaction
    else:
        # SQLite: each borrow opens the file and closes it after, as before
        assert len(opened) >= 6
        assert all(closed(db) for _, db in opened.made)


def test_threads_get_connections_of_their_own(served, settings, opened: Opened) -> None:
    _, tokens, _ = served
    app = served[0].application
    statuses: list[int] = []
    both_lent = threading.Barrier(2, timeout=30)
    lent: dict[int, Any] = {}
    pids: list[int] = []

    def worker() -> None:
        client = app.test_client()
        for _ in range(2):
            statuses.append(client.get("/audit/stats", headers=auditor(tokens)).status_code)
        with borrowed(settings.database_locator) as db:
            lent[threading.get_ident()] = db
            if dialect(db) == "postgresql":
                pids.append(backend_pid(db))
            both_lent.wait()  # both threads hold theirs at the same time

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert statuses == [200] * 4
    first, second = lent.values()
    assert first is not second
    by_thread = {ident for ident, _ in opened.made}
    assert by_thread == set(lent)
    if dialect(first) == "postgresql":
        assert len(opened) == 2  # one per thread, for all its requests
        assert len(set(pids)) == 2  # two server sessions
        assert all(db is lent[ident] for ident, db in opened.made)
    # a thread's connections end with it (SQLite: each one with its borrow)
    deadline = time.monotonic() + 10
    while not all(closed(db) for _, db in opened.made):
        assert time.monotonic() < deadline, "a finished thread's connection is still open"
        gc.collect()
        time.sleep(0.01)


# --------------------------------------------------------------------------- given back clean


def test_a_transaction_left_open_is_rolled_back_when_given_back(settings, opened: Opened, caplog) -> None:
    locator = settings.database_locator
    with borrowed(locator) as db:
        layout.upgrade(db)  # (the gateway's database, with a table of the test's beside its own)
        db.execute("CREATE TABLE IF NOT EXISTS left_open (x INTEGER)")
    caplog.set_level(logging.WARNING, logger="gateway.store.db")
    with borrowed(locator) as db:
        if dialect(db) == "postgresql":  # a path that began and never finished
            db.conn.begin()
        else:
            db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO left_open (x) VALUES (1)")
        first = db
    assert any("left open" in r.getMessage() for r in caplog.records)
    assert closed(first) or not first.conn.in_transaction
    with borrowed(locator) as db:
        assert not db.conn.in_transaction
        assert db.execute("SELECT count(*) FROM left_open").fetchone()[0] == 0
        if dialect(db) == "postgresql":
            assert db is first  # rolled back and kept
    # the write lock went with the transaction: another writer gets it at once
    other = connect(locator)
    try:
        with transaction(other):
            other.execute("INSERT INTO left_open (x) VALUES (2)")
    finally:
        other.conn.close()


def test_a_failed_transaction_is_rolled_back_and_the_connection_kept(backend, settings, opened: Opened) -> None:
    postgresql_only(backend)
    locator = settings.database_locator
    with borrowed(locator) as db:
        db.execute("BEGIN")
        with pytest.raises(Exception):
            db.execute("SELECT no_such_column FROM no_such_table")
        first = db  # the caller caught the error and left the aborted transaction
    with borrowed(locator) as db:
        assert db is first
        assert db.execute("SELECT 1").fetchone()[0] == 1
    assert len(opened) == 1


def test_a_borrow_inside_another_gets_its_own_connection(settings, opened: Opened) -> None:
    locator = settings.database_locator
    with borrowed(locator) as outer:
        with borrowed(locator) as inner:
            assert inner is not outer
        assert closed(inner)
        assert not closed(outer)
    if dialect(outer) == "postgresql":
        with borrowed(locator) as again:
            assert again is outer


# --------------------------------------------------------------------------- a PostgreSQL connection's end


def test_a_connection_the_server_ended_is_replaced_without_an_error(backend, served, settings, opened) -> None:
    postgresql_only(backend)
    client, tokens, _ = served
    locator = settings.database_locator
    assert client.get("/audit/stats", headers=auditor(tokens)).status_code == 200
    with borrowed(locator) as db:
        old, old_pid = db, backend_pid(db)
        schema.once(db, "reuse-test")
        assert not schema.once(db, "reuse-test")  # remembered on the kept connection
    terminate(locator, old_pid)
    assert client.get("/audit/stats", headers=auditor(tokens)).status_code == 200  # no error to the client
    assert len(opened) == 2
    with borrowed(locator) as db:
        assert db is not old and backend_pid(db) != old_pid
        assert schema.once(db, "reuse-test")  # the schema checks went with the old connection
    assert closed(old)


def test_a_kept_store_connection_the_server_ended_is_replaced_before_its_next_use(
        backend, stored_pipeline, settings) -> None:
    """A member's store (the pipeline's, /health's, the exchange's) keeps its thread's connection across requests:
    after a server restart every one of them is gone, and none may fail a request to say so."""
    postgresql_only(backend)
    member = stored_pipeline.member
    store = member.store
    before = store.counts()
    old_pid = backend_pid(store.db)
    terminate(settings.database_locator, old_pid)
    again = member.store
    assert again is not store and again.counts() == before  # no error for the first use after
    assert backend_pid(again.db) != old_pid
    assert member.store is again  # a live connection is kept
    # one the server ended without a word reaching this side yet (a firewall's silent drop) is asked once idle
    kept_pid = backend_pid(again.db)
    terminate(settings.database_locator, kept_pid)
    again.db.looked_at -= dbmodule.IDLE_CHECK_SECONDS + 1
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(dbmodule, "_readable", lambda fd: False)  # the socket says nothing
        third = member.store
    assert third is not again and backend_pid(third.db) != kept_pid and third.counts() == before


def test_an_idle_connection_is_asked_before_it_is_lent_again(backend, settings, opened, monkeypatch) -> None:
    """A connection whose end has not reached this side yet (a firewall's silent drop) answers ``SELECT 1`` first."""
    postgresql_only(backend)
    locator = settings.database_locator
    with borrowed(locator) as db:
        old_pid = backend_pid(db)
    terminate(locator, old_pid)
    monkeypatch.setattr(dbmodule, "_readable", lambda fd: False)  # the socket says nothing
    monkeypatch.setattr(dbmodule, "IDLE_CHECK_SECONDS", 0.0)  # but it has been idle long enough to be asked
    with borrowed(locator) as db:
        assert backend_pid(db) != old_pid
        assert db.execute("SELECT 1").fetchone()[0] == 1


def test_a_connection_ended_during_a_request_fails_that_request_only(backend, settings, opened) -> None:
    postgresql_only(backend)
    locator = settings.database_locator
    with borrowed(locator):  # (PostgreSQL's error classes join store_db.OperationalError with a first connection)
        pass
    with pytest.raises(store_db.OperationalError):
        with borrowed(locator) as db:
            old = db
            terminate(locator, backend_pid(db))
            db.execute("SELECT 1")  # the caller's work is not tried again
    assert closed(old)
    with borrowed(locator) as db:
        assert db is not old and db.execute("SELECT 1").fetchone()[0] == 1


def test_connect_is_tried_once_more_then_the_error_is_told(backend, settings, monkeypatch) -> None:
    postgresql_only(backend)
    close_borrowed()
    real = dbmodule.connect
    calls: list[str] = []

    def flaky(locator: Any, **kw: Any) -> Any:
        calls.append(str(locator))
        if len(calls) == 1:
            raise DatabaseUnavailable("the server is restarting", "database")
        return real(locator, **kw)

    monkeypatch.setattr(dbmodule, "_RETRY_PAUSE", 0.0)
    monkeypatch.setattr(dbmodule, "connect", flaky)
    with borrowed(settings.database_locator) as db:
        assert db.execute("SELECT 1").fetchone()[0] == 1
    assert len(calls) == 2

    close_borrowed()
    down: list[str] = []

    def refused(locator: Any, **kw: Any) -> Any:
        down.append(str(locator))
        raise DatabaseUnavailable("the server is down", "database")

    monkeypatch.setattr(dbmodule, "connect", refused)
    with pytest.raises(DatabaseUnavailable):
        with borrowed(settings.database_locator):
            pass
    assert len(down) == 2  # one retry, no more


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_process_opens_its_own_and_leaves_the_parents_alone(backend, settings, opened) -> None:
    postgresql_only(backend)
    locator = settings.database_locator
    with borrowed(locator) as db:
        parent, parent_pid = db, backend_pid(db)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            with borrowed(locator) as mine:
                os.write(write, str(backend_pid(mine)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer:
        child_pid = int(answer.read() or 0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_pid and child_pid != parent_pid
    with borrowed(locator) as db:  # the parent's connection survived the child
        assert db is parent and db.execute("SELECT 1").fetchone()[0] == 1


def test_a_database_that_cannot_be_reached_is_answered_without_naming_it() -> None:
    """The answer to anyone, even without a token, says the database cannot be reached and when to try again; the
    database's role, host, port and name stay in the log."""
    from flask import Flask

    from gateway.api.errors import register_error_handlers

    app = Flask("down")
    register_error_handlers(app)

    @app.post("/ingest/hl7v2")
    def ingest() -> None:
        raise DatabaseUnavailable("cannot connect to the PostgreSQL database postgresql://cyhr_gateway@10.0.0.5:5432/"
                                  "cyhr_gateway: connection refused", "database")

    answer = app.test_client().post("/ingest/hl7v2", data=b"MSH|")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    text = answer.get_data(as_text=True)
    assert "cannot be reached right now" in text and "postgresql://" not in text and "10.0.0.5" not in text
