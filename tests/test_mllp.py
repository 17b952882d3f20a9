"""MLLP: ACKs over real TCP on loopback, with python-hl7's own client and its mllp_send tool."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from hl7.client import MLLPClient

from conftest import DATA, TONGJIANG, children_of, mllp_codes, wait_port
from test_input_holes import read_acks
from gateway.adapters.hl7v2 import split_messages
from gateway.demo import free_port
from gateway.mllp import MLLPServer, frame

FRAMED = DATA / "hl7v2" / "mllp-framed.hl7"


@pytest.fixture
def server(pipeline):
    srv = MLLPServer(pipeline, "127.0.0.1", 0)
    srv.start_in_thread()
    yield srv
    srv.stop()


def msa(ack: bytes) -> list[str]:
    seg = next(s for s in ack.decode("utf-8").split("\r") if s.startswith("MSA"))
    return seg.split("|")


def test_ack_per_message_over_one_connection(server, pipeline) -> None:
    with MLLPClient("127.0.0.1", server.port) as client:
        acks = [client.send_message(m) for m in split_messages(FRAMED.read_bytes())]
    assert [msa(a)[1:3] for a in acks] == [["AA", "TJ2406100001"], ["AE", "TJ2406100002"]]
    assert b"ERR||OBX^1^5|102^Data type error^HL70357|E" in acks[1]
    # the ACK was sent after the message was durable: it is in the database now
    assert pipeline.store.counts() == {"stored": 1, "refused": 1}


def test_resent_message_is_acked_again_not_stored_twice(server, pipeline) -> None:
    first = split_messages(FRAMED.read_bytes())[0]
    with MLLPClient("127.0.0.1", server.port) as client:
        a1 = client.send_message(first)
        a2 = client.send_message(first)
    assert a1 == a2 and msa(a1)[1] == "AA"
    assert pipeline.store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_oversized_message_is_refused_and_the_connection_closed(pipeline) -> None:
    srv = MLLPServer(pipeline, "127.0.0.1", 0, max_message_bytes=200)
    srv.start_in_thread()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(frame(split_messages(FRAMED.read_bytes())[0]))
            data = b""
            while not data.endswith(b"\x1c\x0d"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert msa(data.strip(b"\x0b\x1c\x0d"))[1] == "AR"
            assert b"larger than 200 bytes" in data
            sock.settimeout(5)
            assert sock.recv(10) == b""  # closed by the server
    finally:
        srv.stop()


def test_a_frame_started_over_or_after_what_is_not_mllp_is_read_from_its_start(server, pipeline, caplog) -> None:
    """A sender that leaves a frame unfinished and starts a new one (0x0B) on the same connection: the new one was
    read as the rest of the first — refused for its 0x0B, stored with the other message's data, and the first
    message, sent again whole, was then answered with that stale refusal. Bytes that are not MLLP before a frame (an
    HTTP request) took the frame with them (AR, an empty MSA-2). Both are dropped now, nothing of them stored, and
    the frame after them is answered as it would be alone."""
    import logging
    import time

    good, bad = split_messages(FRAMED.read_bytes())[:2]
    with caplog.at_level(logging.WARNING, logger="gateway"), \
            socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(b"\x0b" + good[:150])
        time.sleep(0.3)
        sock.sendall(frame(bad))
        [ack] = read_acks(sock, 1)
        assert msa(ack)[1:3] == ["AE", "TJ2406100002"] and b"0x0B" not in ack  # its own error: OBX-5, not 0x0B
        sock.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n" + frame(good))
        [ack] = read_acks(sock, 1)
        assert msa(ack)[1:3] == ["AA", "TJ2406100001"]
    assert pipeline.store.counts() == {"stored": 1, "refused": 1}
    rows = pipeline.store.db.execute("SELECT message_id, raw FROM messages ORDER BY id").fetchall()
    assert [(r[0], bytes(r[1])) for r in rows] == [("TJ2406100002", bad), ("TJ2406100001", good)]
    said = [r.getMessage() for r in caplog.records if "before the start of a message dropped" in r.getMessage()]
    assert len(said) == 2 and ": 151 byte(s) before" in said[0] and ": 33 byte(s) before" in said[1]
    assert "王" not in " ".join(said)


def test_what_is_not_mllp_up_to_a_0x1c_gets_no_answer_of_its_own(server, pipeline, caplog) -> None:
    """Bytes that are not MLLP ending in a 0x1C (junk, an HTTP request, a bare 0x1C) were answered AR with an empty
    MSA-2: a sender took that answer for its next message's and every later ACK came one message late. They are
    dropped unanswered; a message framed without its 0x0B is still answered AR, with its own MSH-10; a 0x0B inside
    a message (not before an MSH) is a byte of it: refused naming the field, as before."""
    good, bad = split_messages(FRAMED.read_bytes())[:2]
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        for junk in (b"junk data\x1c\r", b"\x1c\r", b"POST / HTTP/1.1\r\n\r\n\x1c\r", b"\x0b\x1c\r",
                     b"\x0b\r\r\x1c\r", b"\x0b\xef\xbb\xbf\x1c\r", b"\x0b\xef\xbb\xbf\r\n\x1c\r"):
            # (the last four: empty frames, a keep-alive, a byte-order mark alone: no message, no answer; the BOM's
            # was answered AR with an empty MSA-2 and recorded as a refused message)
            sock.sendall(junk + frame(good))
            [ack] = read_acks(sock, 1)
            assert msa(ack)[1:3] == ["AA", "TJ2406100001"], junk
        sock.sendall(bad + b"\x1c\r")  # no 0x0B: answered, and the answer names the message
        [ack] = read_acks(sock, 1)
        assert msa(ack)[1:3] == ["AR", "TJ2406100002"] and b"does not start with 0x0B" in ack
        # nothing of it is stored: the log says so (it said nothing)
        assert any("without the 0x0B" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
        inside = bad.replace(b"|abc|", b"|1\x0b2|").replace(b"TJ2406100002", b"TJ2406100003")
        sock.sendall(frame(inside))
        [ack] = read_acks(sock, 1)
        assert msa(ack)[1:3] == ["AE", "TJ2406100003"] and b"0x0B" in ack
    assert pipeline.store.counts() == {"stored": 1, "refused": 1}


def test_many_messages_in_a_row(server, pipeline) -> None:
    base = split_messages(FRAMED.read_bytes())[0]
    with MLLPClient("127.0.0.1", server.port) as client:
        for n in range(30):
            ack = client.send_message(base.replace(b"TJ2406100001", f"BULK{n:04d}".encode()))
            assert msa(ack)[1:3] == ["AA", f"BULK{n:04d}"]
    assert pipeline.store.counts() == {"stored": 30}


@pytest.mark.slow
def test_gateway_serve_with_mllp_send_and_http(tmp_path: Path, database: str) -> None:
    """A real client nobody here wrote (python-hl7's mllp_send) against `gateway serve`."""
    mllp_send = shutil.which("mllp_send") or str(Path(sys.executable).with_name("mllp_send"))
    gateway = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
    http_port, mllp_port = free_port(), free_port()
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "gw"), "GATEWAY_ISSUER_USCC": TONGJIANG,
           "GATEWAY_WORKERS": "1", "GATEWAY_LOG_LEVEL": "WARNING",
           **({"GATEWAY_DATABASE": database} if database else {})}
    added = subprocess.run([gateway, "users", "add", "his", "--role", "submitter"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {token}"}
    proc = subprocess.Popen([gateway, "serve", "--http-port", str(http_port), "--mllp-port", str(mllp_port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(mllp_port)
        wait_port(http_port)
        sent = subprocess.run([mllp_send, "--port", str(mllp_port), "--file", str(FRAMED), "127.0.0.1"],
                              capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        acks = [a for a in sent.stdout.split(b"\n") if a.strip()]
        codes = [msa(a.strip(b"\x0b\x1c\r"))[1:3] for a in acks]
        assert codes == [["AA", "TJ2406100001"], ["AE", "TJ2406100002"]]
        found = requests.get(f"http://127.0.0.1:{http_port}/fhir/DiagnosticReport", timeout=30, headers=auth,
                             params={"patient.identifier": "511921198001011237"}).json()
        assert found["total"] == 1
        health = requests.get(f"http://127.0.0.1:{http_port}/health", timeout=30).json()
        assert health["messages"] == {"stored": 1, "refused": 1}
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]
    # the access log never carries the query string (it may hold a 身份证号)
    assert b"511921198001011237" not in err and b"511921198001011237" not in out


def test_batch_gives_each_message_the_answer_it_gets_alone(pipeline, tmp_path, database) -> None:
    """Pipeline.ingest_batch (what the MLLP listener uses) answers like ingest_unit, with fewer commits."""
    from gateway.adapters.base import RawUnit
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline

    units = [RawUnit(m, 1, "mllp:test") for m in split_messages((DATA / "hl7v2" / "malformed.hl7").read_bytes())]
    units.append(units[1])  # the same message twice in one batch
    ch = pipeline.channel("hl7v2")
    batched = pipeline.ingest_batch(ch, units, channel="mllp")
    alone_db = f"{database}_alone" if database else ""  # a database of its own (on PostgreSQL: a schema)
    alone_pipe = Pipeline(load_settings(environ={}, overrides={"data_dir": str(tmp_path / "alone"),
                                                               "database": alone_db, "issuer_uscc": TONGJIANG}),
                          clock=pipeline.clock)
    alone = [alone_pipe.ingest_unit(ch, u, channel="mllp") for u in units]
    assert [o.ack_code for o in batched] == [o.ack_code for o in alone] == ["AE", "AA", "AE", "AR", "AR", "AE", "AA"]
    assert [o.status.value for o in batched][-1] == "duplicate"
    assert batched[-1].answer == batched[1].answer
    assert pipeline.store.counts() == alone_pipe.store.counts() == {"refused": 5, "stored": 1}


def test_concurrent_connections_are_batched_and_all_acked(server, pipeline) -> None:
    base = split_messages(FRAMED.read_bytes())[0]
    results = mllp_codes(server.port, base, clients=4, each=10, tag="C")
    assert results == {n: ["AA"] * 10 for n in range(4)}
    assert pipeline.store.counts() == {"stored": 40}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads child processes from /proc (Linux)")
def test_several_listener_processes_share_the_port_and_stop_together(tmp_path: Path, database: str) -> None:
    """mllp_workers 2: a second listener process accepts on the same socket; every message is ACKed once."""
    import dataclasses
    import json

    from gateway.config import load_settings

    port = free_port()
    overrides = {"data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG, "mllp_port": port,
                 "mllp_workers": 2, "log_level": "WARNING", "database": database}
    settings = load_settings(environ={}, overrides=overrides)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = split_messages(FRAMED.read_bytes())[0]
    results: dict[int, list[str]] = {}
    try:
        wait_port(port)
        listeners = children_of(proc.pid)
        assert len(listeners) == 1, "one further listener process beside the first"
        # its settings came in its environment, not on its command line, which every user of the machine can read
        # (ps): they may hold a database password
        cmdline = Path(f"/proc/{listeners[0]}/cmdline").read_bytes()
        assert b"gateway.serve\x00-\x00--mllp-fd" in cmdline and b"data_dir" not in cmdline, cmdline

        results = mllp_codes(port, base, clients=6, each=5, tag="P")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert results == {n: ["AA"] * 5 for n in range(6)}
    assert b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]
    assert not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in listeners), "the further listener stopped with the first"
    from gateway.store.store import Store

    store = Store.open(settings.database_locator)
    assert store.counts() == {"stored": 30}
    store.close()


_SIGNALLED_LISTENER = """
import signal, sys, threading, time
from gateway.config import load_settings
from gateway.mllp import MLLPServer
from gateway.pipeline import Pipeline

settings = load_settings(environ={}, overrides={"data_dir": sys.argv[1], "issuer_uscc": sys.argv[2]})
server = MLLPServer(Pipeline(settings), "127.0.0.1", 0)
if sys.argv[3] == "part":  # as a part of gateway serve: SIGINT (and SIGTERM until it listens) interrupt it once
    from gateway import serve
    serve._stop_on_signals()


def ready():
    server.ready.wait()
    while getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "stop_once":  # its SIGTERM handler is in
        time.sleep(0.01)
    print("ready", flush=True)


threading.Thread(target=ready, daemon=True).start()
server.serve_forever()
print("stopped", flush=True)
"""


@pytest.mark.parametrize("first, how", [("SIGTERM", "alone"), ("SIGTERM", "part"), ("SIGINT", "part")])
def test_a_listener_signalled_again_and_again_while_it_stops_stops_cleanly(tmp_path: Path, first: str,
                                                                           how: str) -> None:
    """A listener stops at its first SIGTERM (or, as a part of ``gateway serve``, a Ctrl-C's SIGINT) and takes the
    SIGTERMs after it quietly: a foreground gateway's Ctrl-C reaches every process of its group, and the
    supervisor's SIGTERM follows. Left to the event loop, one landing while the loop closed printed "Exception
    ignored when trying to write to the signal wakeup fd" with a traceback (a quarter of such runs), and one landing
    after it killed the process (every run after a SIGINT)."""
    import signal
    import time

    for run in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED_LISTENER, str(tmp_path / f"gw{run}"), TONGJIANG,
                                 how], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        proc.send_signal(getattr(signal, first))
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:  # a SIGTERM every 0.2 ms until it has stopped
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.0002)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out.split()) == (0, [b"stopped"]), err.decode("utf-8", "replace")[-2000:]
        assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode("utf-8", "replace")[-2000:]


def test_a_listener_stopping_while_a_message_waits_for_the_database_logs_no_traceback(
        settings, clock, caplog: pytest.LogCaptureFixture) -> None:
    """The database busy (another writer holds its lock) as the listener stops: the connection waiting for its
    answer is closed without an ACK and said in a line, not an asyncio error with a traceback."""
    import logging
    import sqlite3
    import threading
    import time

    from gateway.pipeline import Pipeline

    if settings.database_file is None:
        return  # the lock held by hand is SQLite's
    listener = Pipeline(settings, clock=clock)
    listener.store.counts()  # the database made
    srv = MLLPServer(listener, "127.0.0.1", 0)
    taken = threading.Event()  # the batch is being worked: its message waits for the lock
    work = srv._process_batch

    def process_batch(items: list[tuple[bytes, str]]) -> list[bytes]:
        taken.set()
        return work(items)

    srv._process_batch = process_batch  # type: ignore[method-assign]
    said = "closed as the listener stops: a message was still being answered, no ACK sent"

    def closed() -> bool:
        return any(said in r.getMessage() for r in caplog.records)

    thread = srv.start_in_thread()
    holder = sqlite3.connect(str(settings.database_file), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, busy
    try:
        # (the gateway's logger at INFO whatever an earlier test of this process left it at: the demo quietens it)
        with caplog.at_level(logging.INFO, logger="gateway"), \
                socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(frame(split_messages(FRAMED.read_bytes())[0]))
            assert taken.wait(20), "the message never reached the pipeline"
            srv.stop()
            deadline = time.monotonic() + 20  # the listener lets its connections go (after 1 s) on a busy machine
            while not closed() and time.monotonic() < deadline:
                time.sleep(0.05)
            holder.execute("ROLLBACK")
            thread.join(40)
            assert not thread.is_alive()
            assert sock.recv(65536) == b"", "no ACK: the message was not answered"
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        listener.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert closed()


def test_messages_sent_while_the_database_is_away_get_no_ack_and_one_warning(
        tmp_path: Path, clock, backend: str, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    """PostgreSQL stopped under a running listener: each message sent meanwhile is answered by no ACK (its
    connection closed: the sender sends it again), and the log says so in one WARNING in the database's words
    for the whole outage window, not an ERROR per message; once the server is back, the resends are stored."""
    import logging
    import time

    from gateway import logs, metrics
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline
    from gateway.store.pgcluster import Cluster

    if backend != "postgresql":
        pytest.skip("a PostgreSQL server stopped under a listener (run with --backend postgresql)")
    monkeypatch.setattr(logs, "_faults", {})
    template = split_messages(FRAMED.read_bytes())[0]
    assert template.count(b"TJ2406100001") == 1
    first, *others = [template.replace(b"TJ2406100001", f"TJ24061000{n:02d}".encode()) for n in range(10, 15)]
    with Cluster() as own:
        settings = load_settings(environ={}, overrides={
            "data_dir": str(tmp_path / "gw"), "database": own.url("postgres"), "issuer_uscc": TONGJIANG,
            "issuer_name": "通江县人民医院（演示）"})
        pipeline = Pipeline(settings, clock=clock)
        srv = MLLPServer(pipeline, "127.0.0.1", 0)
        srv.start_in_thread()
        try:
            with MLLPClient("127.0.0.1", srv.port) as client:
                assert msa(client.send_message(first))[1] == "AA"
            assert own.dir is not None
            data = str(own.dir / "data")
            own._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
            unstored = metrics.MESSAGES.labels("mllp", "hl7v2", "unstored")
            before = unstored._value.get()
            with caplog.at_level(logging.INFO, logger="gateway"):
                for message in others:
                    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                        sock.sendall(frame(message))
                        assert sock.recv(4096) == b""  # closed, no ACK
            lines = [r for r in caplog.records if r.name.startswith("gateway") and r.levelno >= logging.WARNING]
            assert not [r for r in lines if r.levelno >= logging.ERROR], [r.getMessage() for r in lines]
            said = [r.getMessage() for r in lines if "cannot be stored while the database is away" in r.getMessage()]
            assert len(said) == 1 and "no ACK sent" in said[0], [r.getMessage() for r in lines]
            assert "Connection refused" in said[0] or "connect" in said[0], said
            assert unstored._value.get() == before + len(others)  # counted, each with its own outcome
            own._run("pg_ctl", "-D", data, "-l", str(own.dir / "server.log"), "-o",
                     f"-c listen_addresses=127.0.0.1 -c port={own.port} -c unix_socket_directories={own.dir}",
                     "-w", "start")
            with MLLPClient("127.0.0.1", srv.port) as client:
                assert [msa(client.send_message(m))[1] for m in others] == ["AA"] * len(others)
            assert pipeline.store.counts().get("stored") == 1 + len(others)
            # a queue reader (mllp_ack = received) while the database is away: one line, no traceback each second
            from gateway.mllp import QueueReader

            reader = QueueReader(Pipeline(settings, clock=clock), idle=0.01)
            caplog.clear()
            own._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
            with caplog.at_level(logging.INFO, logger="gateway"):
                thread = reader.start_in_thread()
                time.sleep(3.5)  # three tries or more
                reader.stop()
                thread.join(30)
            lines = [r for r in caplog.records if r.name.startswith("gateway") and r.levelno >= logging.WARNING]
            assert [r.getMessage()[:60] for r in lines] == [
                "processing queue: the database cannot be reached (cannot con"], [r.getMessage() for r in lines]
            assert not any(r.exc_info for r in caplog.records)
        finally:
            srv.stop()
            pipeline.close()
