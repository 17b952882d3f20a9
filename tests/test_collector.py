"""Python's garbage collector never holds the write lock, and a gateway part's start-up is left out of collections.

A full collection in a busy gateway process took 30 to 80 ms — in a queue reader, one came every half second or
so. Started inside a write transaction, it held every other writer up: an MLLP listener storing a message before
its ACK waited for it (ACKs of 50 to 85 ms at 200 msg/s). So :func:`gateway.store.db.transaction` turns automatic
collection off while it is open and back on after, on both engines, and every part of ``gateway serve`` freezes
what it made while starting (:func:`gateway.serve.settle_collector`), so that later full collections go through
what it makes afterwards only.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from conftest import TONGJIANG, wait_port

from gateway.config import load_settings
from gateway.demo import free_port
from gateway.store import layout
from gateway.store.db import transaction


class _Node:
    """An object that can be part of a reference cycle and be watched by a weak reference."""

    me: Any = None


def _cycle() -> weakref.ref[_Node]:
    """A reference cycle nothing else holds (only a collection frees it): a weak reference to it."""
    node = _Node()
    node.me = node
    return weakref.ref(node)


@pytest.fixture
def started() -> Any:
    """The generations of the collections that start while the test runs."""
    seen: list[int] = []

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        yield seen
    finally:
        gc.callbacks.remove(watch)


def test_no_collection_starts_while_a_write_transaction_is_open(pipeline, started) -> None:
    db = pipeline.store.db
    assert gc.isenabled()
    with transaction(db):
        assert not gc.isenabled()
        started.clear()  # (one may have started before the transaction began)
        junk = [[n] for n in range(200_000)]  # hundreds of times the allocations that start a collection
        with transaction(db):  # a nested one joins the open transaction: still off when it ends
            pass
        assert not gc.isenabled()
        assert started == []
        orphan = _cycle()
    del junk
    assert gc.isenabled(), "the collector is on again once the transaction has committed"
    more = [[n] for n in range(5_000)]
    assert started, "the allocations after it start collections again"
    gc.collect()
    assert orphan() is None, "what the transaction left is collected afterwards"
    del more


def test_the_collector_is_on_again_after_a_rollback_and_stays_off_if_it_was_off(pipeline) -> None:
    db = pipeline.store.db
    with pytest.raises(RuntimeError):
        with transaction(db):
            assert not gc.isenabled()
            raise RuntimeError("the caller's work failed")
    assert gc.isenabled()
    assert not db.conn.in_transaction
    gc.disable()  # the caller's own choice (a benchmark's load generator does this) is left alone
    try:
        with transaction(db):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_threads_taking_turns_at_the_write_lock_never_let_a_collection_in(tmp_path: Path, started) -> None:
    """An HTTP worker's threads write in turn: one commits (and so frees the lock) while the next begins. The
    collector stays off until the last of them ends, and is on again afterwards."""
    import threading

    from gateway.store.db import connect

    inside: set[int] = set()
    during: list[int] = []

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and inside:
            during.append(info["generation"])

    failures: list[BaseException] = []

    def work(k: int) -> None:
        db = connect(tmp_path / "turns.db")
        try:
            for n in range(1200):
                with transaction(db, poll=True):
                    inside.add(k)
                    db.execute("INSERT INTO t VALUES (?)", [n])
                    junk = [[j] for j in range(300)]
                    loop: list[Any] = []
                    loop.append(loop)  # garbage only a collection frees: the counts keep growing
                    inside.discard(k)
                del junk, loop
        except BaseException as exc:  # noqa: BLE001 - said by the test, not lost in a thread
            failures.append(exc)
        finally:
            db.conn.close()

    setup = connect(tmp_path / "turns.db")
    layout.upgrade(setup)  # (the gateway's database, with a table of the test's beside its own)
    setup.execute("CREATE TABLE t (n INTEGER)")
    setup.conn.close()
    gc.callbacks.append(watch)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        gc.callbacks.remove(watch)
    assert failures == [] and not any(thread.is_alive() for thread in threads)
    check = connect(tmp_path / "turns.db")
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 4 * 1200
    check.conn.close()
    assert during == []
    assert started, "collections ran between the transactions"
    assert gc.isenabled()


def test_settling_freezes_what_exists_and_later_objects_are_collected_as_before() -> None:
    from gateway.serve import settle_collector

    before = gc.get_freeze_count()
    node = _Node()
    node.me = node  # a cycle still in use when the part settles: part of its start-up
    kept = weakref.ref(node)
    try:
        frozen = settle_collector("test")
        assert frozen > before  # (a frozen object may still go when nothing refers to it any more)
        del node
        gc.collect()
        assert kept() is not None, "a frozen object is left alone by collections"
        later = _cycle()
        gc.collect()
        assert later() is None, "an object made after settling is collected as before"
    finally:
        gc.unfreeze()
    gc.collect()
    assert kept() is None


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace what makes a part run for ever, and what touches the process, by records of the order of events."""
    import gateway.serve as serve

    events: list[str] = []
    monkeypatch.setattr(serve, "settle_collector", lambda name: events.append(f"settled {name}") or 0)
    monkeypatch.setattr(serve, "_logging", lambda settings, process: None)
    monkeypatch.setattr(serve, "_stop_on_signals", lambda: None)
    monkeypatch.setattr(serve, "_watch_parent", lambda: None)
    monkeypatch.setattr(serve.signal, "signal", lambda *args: None)
    return events


@pytest.mark.parametrize("part", ["http-1", "mllp-1", "queue", "background"])
def test_every_part_of_gateway_serve_settles_once_started_and_before_it_serves(
        part: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.httpserver
    import gateway.mllp
    import gateway.pipeline
    import gateway.serve as serve

    events = _recording(monkeypatch)
    monkeypatch.setattr(gateway.httpserver, "serve_http",
                        lambda app, sock, settings: sock.close() or events.append("served"))
    monkeypatch.setattr(gateway.mllp.MLLPServer, "serve_forever",
                        lambda self: (self.sock.close() if self.sock else None) or events.append("served"))
    monkeypatch.setattr(gateway.mllp.QueueReader, "run", lambda self: events.append("served"))
    monkeypatch.setattr(serve, "_background_loop", lambda *args, **kwargs: events.append("served"))
    made = gateway.pipeline.Pipeline.__init__

    def making(self: Any, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        events.append("pipeline made")

    monkeypatch.setattr(gateway.pipeline.Pipeline, "__init__", making)
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG,
                                                    "mllp_ack": "received"})
    listening = socket.create_server(("127.0.0.1", 0))
    fd = listening.detach() if part in ("http-1", "mllp-1") else None
    try:
        assert serve.run_part(settings, part, fd) == 0
    finally:
        if fd is None:
            listening.close()
    # what the part keeps (its pipeline) is made before it settles
    assert events[-2:] == [f"settled {part}", "served"] and "pipeline made" in events[:-2], events


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc (Linux)")
def test_the_listeners_and_the_queue_reader_say_they_settled(tmp_path: Path) -> None:
    """The processes themselves (``python -m gateway.serve``: two listeners and a queue reader), at log level
    DEBUG."""
    port = free_port()
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG, "mllp_port": port, "mllp_ack": "received",
        "mllp_workers": 2, "log_level": "DEBUG"})
    proc = subprocess.Popen([sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    assert proc.stderr is not None
    reading = threading.Thread(target=lambda: lines.extend(line.decode("utf-8", "replace") for line in proc.stderr),
                               daemon=True)
    reading.start()

    def said() -> list[str]:
        return [line for line in list(lines) if "objects made at start left out of garbage collection" in line]

    try:
        wait_port(port)
        deadline = time.monotonic() + 60  # the helpers start after the port opens
        while len(said()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reading.join(10)
    text = "".join(lines)
    # "... DEBUG gateway.serve: mllp: 104426 objects made at start left out of garbage collection": the part's name
    settled = sorted(line.split(" objects made at start")[0].rsplit(" ", 2)[-2].rstrip(":") for line in said())
    assert settled == ["mllp", "mllp", "queue"], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
