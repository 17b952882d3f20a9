"""Queue readers give way to the listeners (``mllp_ack = received``), and several readers wait only to write.

- ``queue_reader_nice`` (default 10): a queue reader process of ``gateway serve`` runs that much below the
  listeners' CPU priority, so that a receipt never waits for a core a reader's work holds; 0 leaves it as it is.
- With several readers (``queue_readers`` above 1) a reader makes what a message's recording writes (its rows, its
  signed copy deflated) while it works the message, beside the other readers: only the writing waits for the
  message's turn, which comes once the earlier messages of its sender are recorded.

Input: the first message of the MLLP sample (``tests/data/hl7v2/mllp-framed.hl7``, see tests/data/README.md), its
control id and report number made distinct per message (``test_queue_in_turn.numbered``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TONGJIANG, children_of, mllp_codes, wait_port, wait_until
from gateway.config import load_settings
from gateway.demo import free_port
from gateway.errors import ConfigError
from test_mllp_receipt import GOOD
from test_queue_in_turn import numbered, queue


def nice_of(pid: int) -> int:
    """The nice value of process ``pid`` (field 19 of /proc/PID/stat; the command name may hold spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])


def test_the_setting_is_0_to_19_and_10_unless_set(tmp_path) -> None:
    assert load_settings(environ={}, overrides={"data_dir": str(tmp_path)}).queue_reader_nice == 10
    assert load_settings(environ={"GATEWAY_QUEUE_READER_NICE": "0"},
                         overrides={"data_dir": str(tmp_path)}).queue_reader_nice == 0
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match=r"queue_reader_nice .* must be 0 to 19") as caught:
            load_settings(environ={}, overrides={"data_dir": str(tmp_path), "queue_reader_nice": bad})
        assert caught.value.location == "queue_reader_nice"


@pytest.mark.parametrize("step", [7, 0])
def test_gateway_serve_runs_its_queue_readers_below_the_listeners_priority(tmp_path: Path, step: int) -> None:
    """Two queue readers at ``queue_reader_nice`` below the listener that started them; they still store every
    message the listener answered on receipt."""
    from gateway.store.store import Store

    port = free_port()
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG, "mllp_port": port, "mllp_ack": "received",
        "log_level": "WARNING", "queue_readers": 2, "queue_reader_nice": step})
    proc = subprocess.Popen([sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        readers = [pid for pid in children_of(proc.pid)
                   if b"--queue" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert len(readers) == 2
        listener = nice_of(proc.pid)
        codes = mllp_codes(port, GOOD, clients=2, each=3, tag="N")
        store = Store.open(settings.database_locator)
        try:
            wait_until(lambda: store.counts().get("stored", 0) >= 6, 60, "the readers storing the six messages")
            counts = store.counts()
        finally:
            store.close()
        # (lowered as a reader starts, before it opens the database: a reader that has not started yet is waited for)
        expected = [min(19, listener + step)] * 2
        wait_until(lambda: [nice_of(pid) for pid in readers] == expected, 30, f"both readers at nice {expected[0]}")
        assert nice_of(proc.pid) == listener, "the listener's own priority is left as it was"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert codes == {0: ["AA"] * 3, 1: ["AA"] * 3}
    assert counts == {"stored": 6}
    assert b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]


def test_a_priority_the_system_refuses_is_said_and_the_reader_goes_on(monkeypatch, caplog) -> None:
    from gateway import serve

    def refused(step: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refused)
    with caplog.at_level(logging.WARNING, logger="gateway.serve"):
        serve._lower_priority(10, "queue-1")
    assert "queue-1: its CPU priority could not be lowered (queue_reader_nice 10)" in caplog.text


def test_readers_in_turn_make_what_they_write_before_waiting_for_the_turn(pipeline, monkeypatch) -> None:
    """A reader taking four messages makes the rows of all four as it works them, before it asks whose turn it is:
    two readers make rows side by side, and only the writing is done one message after the other."""
    from gateway.pipeline import Pipeline

    queue(pipeline, [numbered(n) for n in range(1, 5)])
    events: list[str] = []
    prepare, turn = pipeline.store.prepare, Pipeline._turn_came

    def prepared(bundle):
        events.append("rows made")
        return prepare(bundle)

    def asked(self, *args, **kwargs):
        events.append("turn asked")
        return turn(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.store, "prepare", prepared)
    monkeypatch.setattr(Pipeline, "_turn_came", asked)
    done = pipeline.process_queued(4, in_turn=True)
    assert len(done) == 4 and pipeline.store.counts() == {"stored": 4}
    assert events.count("rows made") == 4
    assert events.index("turn asked") > max(i for i, e in enumerate(events) if e == "rows made"), events


# -- short write transactions go first (``transaction(poll=True)``: a receipt, a claim) ------------------------------

def _announcer(path: Path, seconds: float, *, exclusive: bool = False) -> subprocess.Popen[bytes]:
    """Another process saying a short transaction of ``path`` waits, for ``seconds`` (as an MLLP listener's receipt
    does: a shared lock on ``<database>-receipts``); ``exclusive``: one holding the file as a long write tries it,
    stopped there. It returns once the other process holds the lock."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(path) + '-receipts'!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
            f"fcntl.flock(fd, fcntl.{'LOCK_EX' if exclusive else 'LOCK_SH'})\n"
            "print('held', flush=True)\n"
            f"time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    return proc


def _began_after(db, *, poll: bool = False) -> float:
    """Seconds a write transaction on ``db`` took to begin (and then commit an empty write)."""
    from gateway.store.db import transaction

    began = time.monotonic()
    with transaction(db, poll=poll):
        waited = time.monotonic() - began
        db.execute("CREATE TABLE IF NOT EXISTS t (x)")
    return waited


def test_a_long_write_waits_while_another_process_says_a_short_one_waits(tmp_path, monkeypatch) -> None:
    """A recording (a long write) begins once the receipt another process said is done — not before, and never
    later than the patience allows."""
    from gateway.store import db as dbmod

    db = dbmod.connect(tmp_path / "gw.db")
    try:
        monkeypatch.setattr(dbmod._SHORT_FIRST, "patience", 5.0)
        with _announcer(tmp_path / "gw.db", 0.4) as other:
            assert _began_after(db) >= 0.3, "began while a receipt was said"
            other.wait(10)
        assert _began_after(db) < 0.2, "nothing said: at once"
        monkeypatch.setattr(dbmod._SHORT_FIRST, "patience", 0.1)
        with _announcer(tmp_path / "gw.db", 3.0) as other:
            waited = _began_after(db)
            other.kill()
        assert 0.09 <= waited < 1.5, "a receipt said for long holds a recording back for the patience at most"
    finally:
        db.conn.close()


def test_short_writes_never_wait_for_each_other_and_threads_of_one_process_are_told_apart(tmp_path, monkeypatch):
    """Receipts (short writes) do not give way to each other; a long write of one thread gives way to a short one
    of another thread of the same process."""
    import threading

    from gateway.store import db as dbmod

    path = tmp_path / "gw.db"
    first, second = dbmod.connect(path), dbmod.connect(path)
    try:
        monkeypatch.setattr(dbmod._SHORT_FIRST, "patience", 5.0)
        with _announcer(path, 0.5) as other:
            assert _began_after(first, poll=True) < 0.3, "a short write does not wait for a short one said"
            other.kill()
        said, release = threading.Event(), threading.Event()

        def short() -> None:
            assert dbmod._SHORT_FIRST.announce(str(path))
            said.set()
            release.wait(10)
            dbmod._SHORT_FIRST.done(str(path))

        thread = threading.Thread(target=short)
        thread.start()
        said.wait(10)
        threading.Timer(0.3, release.set).start()
        waited = _began_after(second)
        thread.join(10)
        assert 0.25 <= waited < 3.0
    finally:
        first.conn.close()
        second.conn.close()


def test_where_the_file_beside_the_database_cannot_be_made_writes_go_on_as_before(tmp_path) -> None:
    from gateway.store import db as dbmod

    (tmp_path / "gw.db-receipts").mkdir()  # (something else in its place)
    db = dbmod.connect(tmp_path / "gw.db")
    try:
        assert _began_after(db, poll=True) < 1.0 and _began_after(db) < 1.0
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()[0] == 1
    finally:
        db.conn.close()


def test_a_process_keeps_the_files_of_a_few_databases_open_only(tmp_path) -> None:
    """A process that writes to many databases one after the other (a tool, a test run) keeps the descriptors of
    the last few only."""
    from gateway.store import db as dbmod

    def receipts_open() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}").endswith("-receipts")
                   and str(tmp_path) in os.path.realpath(f"/proc/self/fd/{fd}"))

    for n in range(3 * dbmod._SHORT_FIRST.kept):
        db = dbmod.connect(tmp_path / f"gw{n}.db")
        try:
            _began_after(db, poll=n % 2 == 0)
        finally:
            db.conn.close()
    assert 0 < receipts_open() <= 2 * dbmod._SHORT_FIRST.kept


def test_a_forked_child_leaves_its_parents_short_transaction_said(tmp_path) -> None:
    """A process forked while a short transaction of its parent is said (a part started by ``gateway serve``) makes
    its own descriptors, and its end takes nothing from the parent: the receipt stays said."""
    from gateway.store import db as dbmod

    path = str(tmp_path / "gw.db")
    dbmod.connect(path).conn.close()
    assert dbmod._SHORT_FIRST.announce(path)
    try:
        child = os.fork()
        if child == 0:  # (the child: a long write of its own gives way to its parent's receipt, then it ends)
            began = time.monotonic()
            dbmod._SHORT_FIRST.give_way(path)
            os._exit(0 if time.monotonic() - began >= dbmod._SHORT_FIRST.patience * 0.9 else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child gave way to its parent's receipt"
        probe = subprocess.run([sys.executable, "-c", (
            "import fcntl, os\n"
            f"fd = os.open({path + '-receipts'!r}, os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    print('said')\n")],
            capture_output=True, text=True, timeout=30)
        assert probe.stdout.strip() == "said", "the receipt is still said after the child's end"
    finally:
        dbmod._SHORT_FIRST.done(path)


def test_a_short_write_never_waits_for_a_process_stopped_holding_the_file(tmp_path) -> None:
    """A process stopped at the instant its long write tried the file (holding it exclusively) never holds up a
    receipt: the receipt goes on without saying itself, only not first."""
    import threading

    from gateway.store import db as dbmod

    path = tmp_path / "gw.db"
    dbmod.connect(path).conn.close()
    holder = _announcer(path, 60.0, exclusive=True)
    try:
        took: list[float] = []

        def receipt() -> None:  # (in a thread: a receipt that hung would not hang the test run)
            db = dbmod.connect(path)
            try:
                took.append(_began_after(db, poll=True))
            finally:
                db.conn.close()

        thread = threading.Thread(target=receipt, daemon=True)
        thread.start()
        thread.join(5)
        assert took and took[0] < 1.0, "the receipt waited for a process stopped holding the file"
    finally:
        holder.kill()
        holder.wait()


def test_after_giving_way_for_all_its_patience_a_long_write_gives_way_a_quarter_as_long(tmp_path, monkeypatch):
    """Receipts one after the other (said all the time) would hold every recording back for the whole patience:
    the one after a wait that ran out waits a quarter of it, and one that found the file free waits in full again."""
    from gateway.store import db as dbmod

    path = tmp_path / "gw.db"
    db = dbmod.connect(path)
    try:
        monkeypatch.setattr(dbmod._SHORT_FIRST, "patience", 0.8)
        with _announcer(path, 30.0) as other:
            first, second = _began_after(db), _began_after(db)
            other.kill()
        assert 0.75 <= first < 2.0 and 0.15 <= second < 0.6, (first, second)
        assert _began_after(db) < 0.15, "free: at once"
        with _announcer(path, 1.0) as other:
            assert _began_after(db) >= 0.75, "after one that found the file free, the whole patience again"
            other.kill()
    finally:
        db.conn.close()


def test_a_database_named_through_a_link_is_ordered_with_the_file_itself(tmp_path, monkeypatch) -> None:
    """Parts that name the database through a symbolic link and parts that name the file itself lock the same
    -receipts (beside the file), so their writes are ordered together."""
    from gateway.store import db as dbmod

    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "gw.db"
    dbmod.connect(real).conn.close()
    (tmp_path / "gw.db").symlink_to(real)
    linked = dbmod.connect(tmp_path / "gw.db")
    try:
        monkeypatch.setattr(dbmod._SHORT_FIRST, "patience", 5.0)
        with _announcer(real, 0.4) as other:
            assert _began_after(linked) >= 0.3, "the link's writes gave way to the file's receipt"
            other.wait(10)
        assert not (tmp_path / "gw.db-receipts").exists()
    finally:
        linked.conn.close()


def test_a_lock_file_deleted_while_the_gateway_runs_is_made_again_and_locked_by_all(tmp_path, monkeypatch) -> None:
    """A clean-up of the folder deletes ``-receipts`` while the processes hold it open: within a second each makes
    and locks the new one, so a part started since (which makes a new file) and the others still order together."""
    from gateway.store import db as dbmod

    path = tmp_path / "gw.db"
    db = dbmod.connect(path)
    try:
        _began_after(db, poll=True)
        receipts = tmp_path / "gw.db-receipts"
        assert receipts.exists()
        receipts.unlink()
        time.sleep(1.1)
        _began_after(db, poll=True)
        assert receipts.exists(), "made again"
        monkeypatch.setattr(dbmod._SHORT_FIRST, "patience", 5.0)
        with _announcer(path, 0.4) as other:  # (a process started since: it locks the new file)
            assert _began_after(db) >= 0.3, "this process's long write gives way to it: the same file"
            other.wait(10)
    finally:
        db.conn.close()


def test_a_lock_file_another_process_holds_is_said_once_and_costs_receipts_nothing_meanwhile(tmp_path, caplog):
    from gateway.store import db as dbmod

    path = tmp_path / "gw.db"
    dbmod.connect(path).conn.close()
    holder = _announcer(path, 60.0, exclusive=True)
    db = dbmod.connect(path)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.store.db"):
            took = [_began_after(db, poll=True) for _ in range(30)]
        said = [r.getMessage() for r in caplog.records if "-receipts is held by another process" in r.getMessage()]
        assert len(said) == 1, said
        assert sum(took) < 1.0, took
    finally:
        holder.kill()
        holder.wait()
        db.conn.close()


def test_a_lock_file_that_cannot_be_made_is_said_once(tmp_path, caplog) -> None:
    from gateway.store import db as dbmod

    (tmp_path / "gw.db-receipts").mkdir()
    db = dbmod.connect(tmp_path / "gw.db")
    try:
        with caplog.at_level(logging.DEBUG, logger="gateway.store.db"):
            _began_after(db, poll=True)
            _began_after(db)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "-receipts cannot be used" in
                  r.getMessage()]
        assert len(warned) == 1 and "not put before the queue readers' recordings" in warned[0].getMessage()
    finally:
        db.conn.close()
