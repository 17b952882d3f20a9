"""A SQLite writer's commits are copied back into the database file beside it, so that it never waits for the disk.

:func:`gateway.store.db.transaction` asks this process's checkpoint thread after
each commit; the thread checkpoints (``PASSIVE``) with a connection of its own.
Here the writer's own checkpoint (the safety net) is turned off, so the database
file can only grow if the thread did the copying.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.store import db as dbmod
from gateway.store.db import connect, transaction

ROW = "x" * 20_000


def _write(path: Path, commits: int) -> dbmod.Database:
    db = connect(path)
    db.conn.execute("PRAGMA wal_autocheckpoint = 0")  # the writer never checkpoints by itself
    db.conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, body TEXT)")
    for _ in range(commits):
        with transaction(db):
            db.conn.execute("INSERT INTO t (body) VALUES (?)", (ROW,))
    return db


def _grows_past(path: Path, size: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.stat().st_size >= size:
            return True
        time.sleep(0.02)
    return False


def test_commits_are_checkpointed_beside_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    db = _write(path, 50)  # 1 MB of rows, in the WAL
    try:
        assert _grows_past(path, 900_000), "the rows reached the database file without the writer checkpointing"
    finally:
        db.conn.close()


def test_without_the_thread_the_writer_alone_leaves_the_rows_in_the_wal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above cannot pass by itself: with no request to the thread, the file does not grow."""
    monkeypatch.setattr(dbmod._CHECKPOINTS, "request", lambda path: None)
    path = tmp_path / "gateway.db"
    db = _write(path, 50)
    try:
        assert not _grows_past(path, 900_000, seconds=1.0)
    finally:
        db.conn.close()


def test_a_database_deleted_after_its_commit_does_not_stop_the_thread(tmp_path: Path) -> None:
    gone = tmp_path / "gone.db"
    _write(gone, 1).conn.close()
    for leftover in (gone, Path(f"{gone}-wal"), Path(f"{gone}-shm")):
        leftover.unlink(missing_ok=True)
    path = tmp_path / "gateway.db"
    db = _write(path, 50)
    try:
        assert _grows_past(path, 900_000)
    finally:
        db.conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_process_checkpoints_with_a_thread_of_its_own(tmp_path: Path) -> None:
    _write(tmp_path / "first.db", 1).conn.close()  # the thread is running in this process now
    path = tmp_path / "child.db"
    pid = os.fork()
    if pid == 0:  # the child: its commits must be checkpointed although it inherited no thread
        code = 1
        signal.alarm(60)  # (a child stuck in SQLite ends, and fails the test, instead of holding up the suite)
        try:
            db = _write(path, 50)
            code = 0 if _grows_past(path, 900_000) else 3
            db.conn.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_process_that_ends_right_after_its_last_commit_leaves_everything_in_the_file(tmp_path: Path) -> None:
    """A command writes, closes and ends: the last connection to close copies the WAL back and removes it. The
    checkpoint thread's connection may be that last one; the process waits for it rather than end in the middle,
    so that the database file alone holds every row (what a copy of the file would see)."""
    script = (
        "import sys\n"
        "from gateway.store.db import connect, transaction\n"
        "db = connect(sys.argv[1])\n"
        "db.conn.execute('CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, body TEXT)')\n"
        "for _ in range(3):\n"
        "    with transaction(db):\n"
        "        db.conn.execute('INSERT INTO t (body) VALUES (?)', ('x' * 5000,))\n"
        "db.conn.close()\n"
    )
    for n in range(15):
        path = tmp_path / f"cli-{n}.db"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
        assert not Path(f"{path}-wal").exists(), f"run {n}: the WAL was left behind"
        rows = sqlite3.connect(f"{path.as_uri()}?immutable=1", uri=True).execute("SELECT count(*) FROM t").fetchone()
        assert rows == (3,), f"run {n}"


def _temporary_files() -> list[str]:
    """SQLite's temporary files this process holds open (``etilqs_*``: deleted on opening, still open)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "etilqs_" in target:
            found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc to see open files")
@pytest.mark.parametrize("spill", [False, True])
def test_storing_a_report_opens_no_temporary_file(tmp_path: Path, clock: object, spill: bool) -> None:
    """Storing a report upserts its resources, search keys and audit entry: statements that keep a statement
    journal, which SQLite writes to a temporary file once it outgrows its memory (one write call per page, some
    thirty per statement). The gateway's write transactions keep it in memory (``temp_store = MEMORY`` while they
    are open): storing a report opens no temporary file. Under :func:`spilling` (bulk work, temporary storage on
    disk) the same report opens one: the check tells the two apart."""
    from conftest import DATA, TONGJIANG

    from gateway.config import load_settings
    from gateway.pipeline import Pipeline, Status
    from gateway.store.db import spilling

    pipeline = Pipeline(load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "data"), "issuer_uscc": TONGJIANG, "issuer_name": "通江县人民医院（演示）"}),
        clock=clock)  # type: ignore[arg-type]
    db = pipeline.store.db
    try:
        before = set(_temporary_files())
        held: set[str] = set()
        modes: set[int] = set()

        def watch(statement: str) -> None:
            held.update(set(_temporary_files()) - before)

        db.conn.set_trace_callback(watch)
        report = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
        if spill:
            with spilling(db):
                outcomes = pipeline.ingest(report, "hl7v2", channel="file")
        else:
            with transaction(db):
                modes.add(db.conn.execute("PRAGMA temp_store").fetchone()[0])
            outcomes = pipeline.ingest(report, "hl7v2", channel="file")
        db.conn.set_trace_callback(None)
        assert [o.status for o in outcomes] == [Status.STORED]
        if spill:
            assert held, "under spilling a statement journal went to a temporary file"
        else:
            assert held == set() and modes == {2}  # (2: MEMORY)
        assert db.conn.execute("PRAGMA temp_store").fetchone()[0] == 0  # outside: SQLite's default again
    finally:
        pipeline.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc to see open files")
def test_a_large_sort_outside_a_write_transaction_spills_to_disk(tmp_path: Path) -> None:
    """Reads keep SQLite's default, temporary storage on disk: a sort larger than SQLite's memory for it (a search
    with a large offset, an audit statistic) goes to temporary files, so memory stays bounded whatever the
    database's size. In memory, SQLite's sorter never spills: inside a write transaction the same sort opens no
    file, which shows the check can tell."""
    import random

    db = connect(tmp_path / "gateway.db")
    try:
        db.conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, body TEXT)")
        rng = random.Random(5)
        with transaction(db):
            db.conn.executemany("INSERT INTO t (body) VALUES (?)",
                                [("".join(rng.choice("abcdefgh") for _ in range(400)),) for _ in range(30_000)])
        before = set(_temporary_files())
        seen: set[str] = set()

        def sort() -> int:
            seen.clear()

            def look() -> int:
                seen.update(set(_temporary_files()) - before)
                return 0

            db.conn.set_progress_handler(look, 20_000)
            try:
                return len(db.conn.execute("SELECT body FROM t ORDER BY body").fetchall())
            finally:
                db.conn.set_progress_handler(None, 0)

        assert sort() == 30_000
        assert seen, "a 12 MB sort outside a transaction went to temporary files"
        with transaction(db):
            assert sort() == 30_000
            assert not seen
    finally:
        db.conn.close()


def test_a_new_database_and_its_log_files_are_for_their_owner_only(tmp_path: Path) -> None:
    """Patient data: a database the gateway creates is mode 0600, and so are the -wal and -shm files SQLite makes
    beside it (it gives them the database file's mode), whatever the umask leaves to others."""
    import stat

    old = os.umask(0o022)
    try:
        db = connect(tmp_path / "gw" / "gateway.db")
        with transaction(db):
            db.conn.execute("CREATE TABLE t (x)")
            db.conn.execute("INSERT INTO t VALUES (1)")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "gw").iterdir()}
        db.conn.close()
    finally:
        os.umask(old)
    # (-receipts: the lock file that lets short writes go first, empty: see gateway.store.db._ShortFirst)
    assert modes == {"gateway.db": 0o600, "gateway.db-wal": 0o600, "gateway.db-shm": 0o600,
                     "gateway.db-receipts": 0o600}
