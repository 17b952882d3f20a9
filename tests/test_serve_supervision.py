"""`gateway serve` runs whole or not at all: a killed part is restarted (counted, logged) and /health follows it;
a part that keeps dying stops the whole gateway with a non-zero exit; a port in use is one line and exit 2.

The supervisor itself is tested with stand-in children (fast); then real `gateway serve` processes on loopback.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import wait_until

from gateway.demo import free_port
from gateway.demo.world import build_world
from gateway.heartbeat import run_dir
from gateway.supervise import Part, Supervisor

GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
CST = _dt.timezone(_dt.timedelta(hours=8))


def stand_in(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_part_that_keeps_dying_stops_every_part(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parts = [Part("background", "background loop", stand_in("import sys; sys.exit(3)"), beats=True),
             Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(60)"))]
    supervisor = Supervisor(parts, restart_limit=2, run_dir=tmp_path, backoff=0.05, grace=5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gateway.supervise"):
        code = supervisor.run()
    assert code == 1 and time.monotonic() - started < 20
    assert parts[1].proc is not None and parts[1].proc.poll() is not None, "the healthy part was stopped too"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(w.startswith("background loop (pid ") and "died with exit code 3; restarting it in" in w
               for w in warnings)
    assert "restart 2 of at most 2 within 10 minutes" in warnings[1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "stopping the whole gateway" in errors[0] and "restart_limit 2" in errors[0]
    assert parts[0].restarts == 2
    assert not (tmp_path / "serve.json").exists(), "nothing is left to say a gateway runs"


def test_a_hangup_stops_every_part_cleanly_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`gateway serve &` in an SSH session that drops gets SIGHUP: it ended at once, its parts saying only that it
    was gone. It stops as on SIGTERM, exit 0, and the log says why."""
    import threading

    parts = [Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(60)"))]
    supervisor = Supervisor(parts, restart_limit=2, run_dir=tmp_path, backoff=0.05, grace=5)

    def hang_up() -> None:
        wait_until(lambda: parts[0].proc is not None and parts[0].state == "running", 20, "the part running")
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(10)
        supervisor.stopping = True  # (a supervisor that let the hangup by is stopped all the same, and fails below)

    def ours(signum: int, frame: Any) -> None:  # (this test process must not end by it if the supervisor lets it by)
        pass

    before = signal.signal(signal.SIGHUP, ours)
    try:
        threading.Thread(target=hang_up, daemon=True).start()
        with caplog.at_level(logging.INFO, logger="gateway.supervise"):
            started = time.monotonic()
            code = supervisor.run()
        assert code == 0 and time.monotonic() - started < 9
        assert parts[0].proc is not None and parts[0].proc.poll() is not None
        assert any("SIGHUP" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        assert signal.getsignal(signal.SIGHUP) is ours  # (as it was before the run)
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_part_that_cannot_reach_the_database_is_started_again_without_counting_against_the_limit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A part restarted while the database is away (a restart, a failover) exits DATABASE_AWAY at once, again and
    again: it is started again until the database answers, and an outage never stops the whole gateway."""
    import threading

    from gateway.supervise import DATABASE_AWAY

    tries = tmp_path / "tries"
    code = ("import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) if p.exists() else 0;"
            f" p.write_text(str(n + 1)); sys.exit({DATABASE_AWAY}) if n < 4 else time.sleep(60)")
    parts = [Part("queue", "queue reader", stand_in(code) + [str(tries)]),
             Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(60)"))]
    supervisor = Supervisor(parts, restart_limit=1, run_dir=tmp_path, backoff=0.05, backoff_cap=0.2, grace=5)

    def stop_once_it_runs() -> None:
        deadline = time.monotonic() + 30
        while not (tries.exists() and tries.read_text() == "5") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # running, not exited again
        supervisor.stopping = True

    threading.Thread(target=stop_once_it_runs, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="gateway.supervise"):
        assert supervisor.run() == 0  # stopped as asked, not over restart_limit 1
    assert tries.read_text() == "5" and parts[0].restarts == 4
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not said, said
    waits = [r.getMessage() for r in caplog.records if "could not reach the database" in r.getMessage()]
    assert len(waits) == 4 and all("starting it again in 0.2 s" in w for w in waits), waits


def test_a_part_that_refuses_its_configuration_stops_the_gateway_with_2(tmp_path: Path) -> None:
    parts = [Part("queue", "queue reader", stand_in("import sys; sys.exit(2)")),
             Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(60)"))]
    assert Supervisor(parts, restart_limit=5, backoff=0.05, grace=5).run() == 2
    assert parts[0].restarts == 0 and parts[1].proc is not None and parts[1].proc.poll() is not None


def test_a_part_that_stops_beating_is_killed_and_started_again_as_hung(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # beats once (its pid in its beat file, as gateway.heartbeat.Beat writes it), then hangs: stopped by a signal,
    # which SIGTERM cannot end; the second time over the restart limit stops the gateway
    hangs = stand_in(f"import os, signal; open({str(tmp_path / 'queue.beat')!r}, 'w').write(str(os.getpid())); "
                     "os.kill(os.getpid(), signal.SIGSTOP)")
    parts = [Part("queue", "queue reader", hangs, beats=True),
             Part("mllp-1", "MLLP listener 1", stand_in("import time; time.sleep(60)"), beats=True)]
    (tmp_path / "mllp-1.beat").write_text("0")  # another process's beat: never this listener's, which is starting
    supervisor = Supervisor(parts, restart_limit=1, run_dir=tmp_path, backoff=0.05, grace=5, hung_after=1.5)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gateway.supervise"):
        code = supervisor.run()
    assert code == 1 and time.monotonic() - started < 30
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    hung = [e for e in errors if "has not reported alive for" in e]
    assert len(hung) == 2 and all(e.startswith("queue reader (pid ") and "(hung_restart_after 1.5 s)" in e
                                  for e in hung), errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "died with exit code -9 (killed by SIGKILL), killed as hung (" in warnings[0]
    assert "stopping the whole gateway" in errors[-1] and "killed as hung" in errors[-1]
    assert parts[0].restarts == 1 and parts[1].restarts == 0, "a part starting, not beaten yet, is not hung"
    assert all(p.proc is not None and p.proc.poll() is not None for p in parts)


def test_how_long_a_part_has_not_beaten_is_counted_on_the_supervisors_own_clock(tmp_path: Path) -> None:
    """A wall clock stepped forward (a heartbeat's time stamp an hour old) kills nothing, nor a pause of the whole
    gateway (the supervisor not running either: every part is given its full time again); a part the supervisor
    saw not beat for longer than hung_restart_after is killed."""
    beat = tmp_path / "queue.beat"
    parts = [Part("queue", "queue reader", stand_in(f"import os, time; open({str(beat)!r}, 'w').write(str("
                                                    "os.getpid())); time.sleep(60)"), beats=True)]
    supervisor = Supervisor(parts, restart_limit=1, run_dir=tmp_path, backoff=0.05, grace=5, hung_after=10)
    supervisor._start(parts[0])
    part, proc = parts[0], parts[0].proc
    assert proc is not None
    try:
        wait_until(lambda: beat.exists() and beat.read_text(), 20, "the stand-in's beat")
        supervisor.looked = time.monotonic() - 1.5
        assert supervisor._check() and part.beat is not None
        os.utime(beat, (time.time() - 3600, time.time() - 3600))  # the wall clock stepped an hour forward
        supervisor.looked = time.monotonic() - 1.5
        assert supervisor._check() and proc.poll() is None and part.hung is None
        part.beat_seen = time.monotonic() - 20  # not seen to beat for 20 s, but the supervisor did not look either
        supervisor.looked = time.monotonic() - 20
        assert supervisor._check() and proc.poll() is None and part.hung is None
        part.beat_seen = time.monotonic() - 20  # not seen to beat for 20 s while the supervisor looked
        supervisor.looked = time.monotonic() - 1.5
        assert supervisor._check() and part.hung is not None and part.hung >= 20
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        supervisor._stop_all()


def test_hung_parts_are_left_running_and_said_once_when_hung_restart_after_is_0(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    beat = tmp_path / "queue.beat"
    parts = [Part("queue", "queue reader", stand_in(f"import os, time; open({str(beat)!r}, 'w').write(str("
                                                    "os.getpid())); time.sleep(60)"), beats=True)]
    supervisor = Supervisor(parts, restart_limit=1, run_dir=tmp_path, backoff=0.05, grace=5, hung_after=0)
    supervisor._start(parts[0])
    try:
        wait_until(lambda: beat.exists() and beat.read_text(), 20, "the stand-in's beat")
        with caplog.at_level(logging.WARNING, logger="gateway.supervise"):
            for _ in range(3):
                supervisor.looked = time.monotonic() - 1.5
                assert supervisor._check()
                parts[0].beat_seen = time.monotonic() - 3600  # an hour without a beat
        assert parts[0].proc is not None and parts[0].proc.poll() is None and parts[0].restarts == 0
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith("queue reader (pid ") and said[0].endswith(
            "has not reported alive for 3600 s (hung?); hung_restart_after is 0: left running"), said
    finally:
        supervisor._stop_all()


def test_parts_after_a_job_start_once_it_is_done_and_a_failed_job_runs_again(tmp_path: Path) -> None:
    """A job (``once``: the catch-up of queued messages) that fails is started again like any part; once it ends
    with 0 it is done, not restarted, and the parts waiting for it (``after``: the MLLP listeners) start."""
    marker = tmp_path / "tried"
    job = stand_in(f"import pathlib, sys, time; p = pathlib.Path({str(marker)!r}); first = not p.exists(); "
                   "p.touch(); time.sleep(0.5); sys.exit(3 if first else 0)")
    parts = [Part("catchup", "catch-up of queued messages", job, once=True),
             Part("mllp-1", "MLLP listener 1", stand_in("import time; time.sleep(60)"), after="catchup"),
             Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(60)"))]
    supervisor = Supervisor(parts, restart_limit=3, run_dir=tmp_path, backoff=0.05, grace=5)
    states: list[tuple[str, str, str]] = []
    for part in parts:
        if part.after:
            part.state = "waiting"
        else:
            supervisor._start(part)
    try:
        deadline = time.monotonic() + 30
        while parts[1].state != "running" and time.monotonic() < deadline:
            assert supervisor._check()
            now = tuple(p.state for p in parts)
            if not states or states[-1] != now:
                states.append(now)  # type: ignore[arg-type]
            time.sleep(0.05)
        manifest = json.loads((tmp_path / "serve.json").read_text())["parts"]
    finally:
        supervisor._stop_all()
    assert states[0] == ("running", "waiting", "running")
    assert ("restarting", "waiting", "running") in states, "the job that failed is started again"
    assert states[-1] == ("done", "running", "running") and parts[0].restarts == 1 and parts[0].last_exit == 0
    assert manifest["catchup"]["state"] == "done" and manifest["mllp-1"]["after"] == "catchup"


def test_a_stopped_part_stops_at_once_with_the_others(tmp_path: Path) -> None:
    """SIGTERM to the gateway: a part stopped by a signal is continued, so it acts on its SIGTERM at once instead
    of being killed after the grace period."""
    parts = [Part("queue", "queue reader", stand_in("import os, signal; os.kill(os.getpid(), signal.SIGSTOP)"))]
    supervisor = Supervisor(parts, restart_limit=1, run_dir=tmp_path, backoff=0.05, grace=15)
    supervisor._start(parts[0])
    proc = parts[0].proc
    assert proc is not None
    wait_until(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "T", 20,
               "the part stopped")
    started = time.monotonic()
    supervisor._stop_all()
    assert time.monotonic() - started < 5 and proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize("value, refused", [
    ("0", False), ("10", False), ("30", False), ("1", True), ("9", True), ("-1", True), ("2.5", True)])
def test_hung_restart_after_is_0_or_at_least_ten_seconds(value: str, refused: bool) -> None:
    from gateway.config import load_settings
    from gateway.errors import ConfigError

    if not refused:
        assert load_settings(environ={"GATEWAY_HUNG_RESTART_AFTER": value}).hung_restart_after == int(value)
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"GATEWAY_HUNG_RESTART_AFTER": value})
    assert "hung_restart_after" in str(caught.value)


def test_a_start_names_a_process_of_the_last_run_still_there_instead_of_waiting_for_the_database(
        tmp_path: Path) -> None:
    """The supervisor of the last run was killed, and one of its parts is stopped (SIGSTOP) — it may hold the
    database's write lock, which had the next start wait for it and fail naming nothing: the start says which."""
    data = tmp_path / "gw"
    data.mkdir()
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "gateway.serve",
                                 "--part", "queue"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # the dead supervisor's process id
    try:
        os.kill(leftover.pid, signal.SIGSTOP)
        folder = data / "gateway.db.run"
        folder.mkdir()
        from gateway.heartbeat import boot_id, process_start

        reused = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--part", "gateway"])
        (folder / "serve.json").write_text(json.dumps({"pid": gone.pid, "boot": boot_id(), "parts": {
            "queue": {"title": "queue reader", "pid": leftover.pid, "state": "running", "beats": True,
                      "since": process_start(leftover.pid)},
            "mllp-1": {"title": "MLLP listener 1", "pid": reused.pid, "state": "running",  # its id taken since
                       "since": (process_start(reused.pid) or 0) - 1},
            "http-1": {"title": "HTTP worker 1", "pid": gone.pid, "state": "running", "since": 1}}}))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
               "GATEWAY_DATA_DIR": str(data), "GATEWAY_ISSUER_USCC": "12511921MB0001003C",
               "GATEWAY_HTTP_PORT": str(free_port()), "GATEWAY_MLLP_PORT": str(free_port())}
        started = time.monotonic()
        done = subprocess.run([GATEWAY, "serve"], env=env, capture_output=True, timeout=120)
        assert done.returncode == 1 and time.monotonic() - started < 30, done.stderr[-2000:]
        lines = done.stderr.decode().strip().splitlines()
        assert lines == [f"gateway: a process of the last run of this gateway is still there and may hold its "
                         f"database: queue reader (pid {leftover.pid}, stopped); stop it (kill -CONT {leftover.pid}; "
                         f"kill {leftover.pid}) and start again"], lines
    finally:
        for process in (leftover, locals().get("reused")):
            if process is not None:
                process.kill()
                process.wait()


def _serve_env(s: Any, url: str, http: int, mllp: int, **more: str) -> dict[str, str]:
    """The environment of a `gateway serve` of the member whose settings are ``s`` on these ports (its settings as
    GATEWAY_* variables: one HTTP worker, WARNING logs), with ``more``."""
    return {**os.environ, "GATEWAY_DATA_DIR": s.data_dir, "GATEWAY_ISSUER_USCC": s.issuer_uscc,
            "GATEWAY_ISSUER_NAME": s.issuer_name, "GATEWAY_REGISTRY_SNAPSHOT": s.registry_snapshot,
            "GATEWAY_REGISTRY_AUTHORITY": s.registry_authority, "GATEWAY_SIGNING_KEY": s.signing_key,
            "GATEWAY_SIGNING_CERT": s.signing_cert, "GATEWAY_PUBLIC_URL": url, "GATEWAY_HTTP_PORT": str(http),
            "GATEWAY_MLLP_PORT": str(mllp), "GATEWAY_WORKERS": "1", "GATEWAY_LOG_LEVEL": "WARNING", **more}


@pytest.mark.slow
def test_serve_starts_a_stopped_queue_reader_again(tmp_path: Path) -> None:
    """A queue reader stopped by a signal (SIGSTOP) would hold the queue forever: serve kills it and starts
    another, which works what came meanwhile; /health says the restart."""
    http, mllp = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    world = build_world(tmp_path, lambda: _dt.datetime.now(CST), {"tongjiang": url}, members=("tongjiang",))
    s = world.gateways["tongjiang"].settings
    env = _serve_env(s, url, http, mllp, GATEWAY_MLLP_ACK="received", GATEWAY_HUNG_RESTART_AFTER="10")
    folder = run_dir(s.replace(http_port=http))
    sample = Path(__file__).parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"
    first, _, second = [m.lstrip(b"\x0b\r\n") for m in sample.read_bytes().split(b"\x1c")[:3]]
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)

    def queue() -> dict[str, Any]:
        return json.loads((folder / "serve.json").read_text())["parts"]["queue"]

    def worked() -> int:
        with sqlite3.connect(f"file:{s.database_file}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM messages WHERE status NOT IN ('queued', 'received')").fetchone()[0]

    try:
        wait_until(lambda: _health(url)[0] == 200, 120, "a healthy gateway")
        assert b"MSA|" in _mllp(mllp, first)
        wait_until(lambda: worked() == 1, 60, "the first message worked")
        old = queue()["pid"]
        os.kill(old, signal.SIGSTOP)
        assert b"MSA|" in _mllp(mllp, second), "the listener keeps taking messages meanwhile"
        time.sleep(1)
        assert worked() == 1, "the stopped reader works nothing"
        wait_until(lambda: queue()["restarts"] == 1 and queue()["pid"] != old, 60, "the reader started again")
        wait_until(lambda: worked() == 2, 60, "the message that came meanwhile worked by the new reader")
        status, body = wait_until(lambda: (h := _health(url))[0] == 200 and h, 60, "health after the restart")
        assert body["checks"]["queue"]["detail"].endswith("restarted 1 time(s)"), body["checks"]["queue"]
        assert not Path(f"/proc/{old}").exists() or "zombie" in Path(f"/proc/{old}/status").read_text()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    text = err.decode("utf-8", "replace")
    assert "Traceback" not in text, text[-3000:]
    assert "queue reader (pid " in text and "has not reported alive for" in text, text[-3000:]
    assert "killed as hung" in text, text[-3000:]


@pytest.mark.parametrize("which", ["HTTP", "MLLP"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, which: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        ports = {"HTTP": port, "MLLP": free_port()} if which == "HTTP" else {"HTTP": free_port(), "MLLP": port}
        env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "gw"), "GATEWAY_LOG_LEVEL": "INFO"}
        done = subprocess.run([GATEWAY, "serve", "--http-port", str(ports["HTTP"]), "--mllp-port",
                               str(ports["MLLP"])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"gateway: {which} port {port} on 127.0.0.1 is already in use (another gateway or program listens "
        f"there); stop the other program or choose another port (--{which.lower()}-port / {which.lower()}_port)"]


@pytest.mark.slow
def test_a_second_serve_on_one_database_is_refused_and_the_first_runs_on(tmp_path: Path) -> None:
    """Started again on the same SQLite file with other ports (a second terminal, a second unit), `gateway serve`
    says the database is served already, in one line, exit 2. It started, and the two supervisors took each other's
    parts for hung and killed them until the first stopped for too many restarts."""
    http, mllp = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    world = build_world(tmp_path, lambda: _dt.datetime.now(CST), {"tongjiang": url}, members=("tongjiang",))
    s = world.gateways["tongjiang"].settings
    env = _serve_env(s, url, http, mllp)
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_until(lambda: _health(url)[0] == 200, 120, "a healthy gateway")
        other = {**env, "GATEWAY_HTTP_PORT": str(free_port()), "GATEWAY_MLLP_PORT": str(free_port())}
        done = subprocess.run([GATEWAY, "serve"], env=other, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        [line] = done.stderr.splitlines()
        assert line.startswith(f"gateway: another gateway serve (pid {proc.pid}) runs on the database "), line
        assert "one gateway serve per database file" in line
        assert proc.poll() is None and _health(url)[0] == 200
    finally:
        _stop(proc)
    assert proc.returncode == 0
    # once it stopped, the database is free to serve again (the lock went with the process)
    from gateway.serve import _one_serve

    os.close(_one_serve(s))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a `gateway serve` this test started (SIGTERM to its process group; SIGKILL after a minute)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _health(url: str) -> tuple[int, dict[str, Any]]:
    response = requests.get(f"{url}/health", timeout=10)
    return response.status_code, response.json()


def _mllp(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x0b" + message + b"\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.slow
def test_serve_restarts_killed_parts_and_stops_whole_when_they_keep_dying(tmp_path: Path, database: str) -> None:
    http, mllp = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    world = build_world(tmp_path, lambda: _dt.datetime.now(CST), {"tongjiang": url}, members=("tongjiang",),
                        database=(lambda key: database) if database else None)
    gw = world.gateways["tongjiang"]
    s = gw.settings
    env = _serve_env(s, url, http, mllp, GATEWAY_MLLP_ACK="received", GATEWAY_RESTART_LIMIT="2",
                     GATEWAY_DELIVERY_INTERVAL="1", **({"GATEWAY_DATABASE": s.database} if s.database else {}))
    folder = run_dir(s.replace(http_port=http))  # the run folder of the node serve starts (its HTTP port)
    message = (Path(__file__).parent.parent / "gateway" / "demo" / "data" / "hl7v2"
               / "tongjiang-county-lis.hl7").read_bytes().split(b"\x1c")[0].lstrip(b"\x0b")
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    children: set[int] = set()

    def manifest() -> dict[str, Any]:
        return json.loads((folder / "serve.json").read_text())["parts"]

    try:
        status, body = wait_until(lambda: (h := _health(url))[0] == 200 and h, 120, "a healthy gateway")
        assert {"http", "mllp-1", "queue", "background", "registry"} <= set(body["checks"]), body
        assert requests.get(f"{url}/registry/snapshot", timeout=10).status_code == 401  # (physicians' 身份证号)
        # no part has its settings on its command line, which every user of the machine can read (ps); a database
        # password would be there (database = postgresql://user:password@...)
        for part in manifest().values():
            cmdline = Path(f"/proc/{part['pid']}/cmdline").read_bytes()
            assert b"gateway.serve\x00-\x00--part" in cmdline and s.data_dir.encode() not in cmdline, cmdline
        assert b"MSA|" in _mllp(mllp, message)

        for n, part in enumerate(("mllp-1", "background"), start=1):
            old = manifest()[part]["pid"]
            children.add(old)
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: manifest()[part]["restarts"] == 1 and manifest()[part]["pid"] != old, 60,
                       f"{part} restarted")
            status, body = wait_until(lambda: (h := _health(url))[0] == 200 and h, 90, f"health after {part} restart")
            assert body["checks"][part]["detail"].endswith("restarted 1 time(s)"), body["checks"][part]
            children.add(manifest()[part]["pid"])
        assert b"MSA|" in _mllp(mllp, message), "the new listener answers"

        children |= {p["pid"] for p in manifest().values()}
        os.kill(manifest()["queue"]["pid"], signal.SIGKILL)  # a third restart within 10 minutes: over the limit
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    text = err.decode("utf-8", "replace")
    assert "Traceback" not in text, text[-3000:]
    warnings = [line for line in text.splitlines() if " WARNING gateway.supervise: " in line]
    assert len(warnings) == 2, text[-3000:]
    assert "MLLP listener 1 (pid " in warnings[0] and "died with exit code -9 (killed by SIGKILL)" in warnings[0]
    assert "background loop (pid " in warnings[1] and "(restart 2 of at most 2 within 10 minutes)" in warnings[1]
    assert "queue reader (pid" in text and "stopping the whole gateway" in text
    time.sleep(0.5)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()], "every part stopped with it"


@pytest.mark.parametrize("handler", ["_interrupt_once", "default"])
def test_a_part_signalled_twice_while_it_stops_stops_without_a_traceback(handler: str) -> None:
    """systemd and the supervisor both send SIGTERM to every process of the group: a part that is already stopping
    (waiting for its threads) must take the second one quietly."""
    script = textwrap.dedent(f"""
        import signal, sys, threading, time
        from gateway import serve
        if {handler!r} == "default":
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        else:
            serve._stop_on_signals()
        threading.Thread(target=time.sleep, args=(1.5,)).start()  # a thread the interpreter waits for at exit
        try:
            print("ready", flush=True)
            time.sleep(30)
        except KeyboardInterrupt:
            print("stopping", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # stopping: the interpreter waits for the thread
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    if handler == "default":  # what the parts did before: the second interrupt lands in the shutdown
        assert b"KeyboardInterrupt" in err
        return
    assert b"stopping" in out and proc.returncode == 0 and b"Traceback" not in err, err.decode()


@pytest.mark.parametrize("args, started", [(["--mllp-fd", "5"], "run_listener"), (["--queue"], "run_queue"),
                                           ([], "run_background")])
def test_a_helper_process_stopped_while_it_starts_stops_without_a_traceback(
        args: list[str], started: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The further listeners and the queue readers ``python -m gateway.serve`` starts get SIGTERM from it when it
    stops; one that was still starting (importing, loading its pipeline) when its handler turned the signal into
    KeyboardInterrupt printed a traceback. It stops quietly, as a part of ``gateway serve`` does."""
    import dataclasses
    import json

    from gateway import serve
    from gateway.config import load_settings

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(serve, started, interrupted)
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path)})
    try:
        code = serve._main([json.dumps(dataclasses.asdict(settings)), *args])
    except KeyboardInterrupt:  # (left to escape, it would stop the test run itself)
        pytest.fail("the interrupt escaped: the process would print a traceback")
    assert code == 0


@pytest.mark.parametrize("wait", [0.0, 1.5])
def test_a_part_whose_starter_dies_while_it_starts_stops_by_itself(tmp_path: Path, wait: float) -> None:
    """A supervisor killed while its parts were still starting (importing, loading their pipeline) left them
    running on their own: they took the process that adopted them for their starter, a listener went on answering
    and storing, unsupervised. A part knows its starter by the pid the starter wrote, and stops: at once when the
    starter is gone before it looks, within its watch's second when later (``wait``: the starter dies after that)."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from gateway import serve
        from gateway.config import load_settings
        settings = load_settings(environ={{}}, overrides={{"data_dir": {str(tmp_path)!r}, "mllp_ack": "received"}})
        command, env = serve.part_command(settings)
        part = subprocess.Popen(command + ["--part", "queue"], env=env, stdout=subprocess.DEVNULL,
                                stderr=open({str(tmp_path / "part.log")!r}, "wb"))
        print(part.pid, flush=True)
        time.sleep({wait})
        os._exit(0)  # as a kill -9 would: nothing stops the part
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(done.stdout.split()[0])

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (ended, not yet reaped by init) is gone too
            return stat.read().rpartition(")")[2].split()[0] == "Z"

    try:
        wait_until(gone, 60, "the part to stop without its starter")
    finally:
        if not gone():
            os.kill(pid, signal.SIGKILL)
    said = (tmp_path / "part.log").read_text()
    assert "Traceback" not in said
    assert "the process that started this part is gone" in said or "is gone: stopping" in said


def test_a_part_stopping_at_a_signal_imports_nothing_in_its_handler() -> None:
    """The handler runs wherever the part stands, an import of its own included: importing from there once met a
    half-made module (an HTTP worker stopped while it imported printed an ImportError's traceback)."""
    script = textwrap.dedent("""
        import os, signal, sys
        from gateway import serve
        serve._stop_on_signals()
        before = set(sys.modules)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
        except KeyboardInterrupt:
            print(sorted(set(sys.modules) - before))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "[]", "")


def test_a_failing_background_pass_is_logged_by_type_and_place_never_its_text(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that is down makes every background pass fail: each is one log line naming the exception's type
    and where, under the gateway's own logger name — no traceback, and never the exception's text, which may quote
    patient data."""
    from gateway import serve

    class Pipeline:
        exchange = None

        def rework_abandoned(self, limit: int, seconds: float) -> int:
            raise RuntimeError("row for 王建国 511921196612120011 could not be read")

    monkeypatch.delenv("GATEWAY_DEBUG", raising=False)
    with caplog.at_level("WARNING", logger="gateway"):  # (whatever level an earlier test left it at)
        assert serve.background_pass(Pipeline()) == {}
    [record] = [r for r in caplog.records if "left unfinished" in r.getMessage()]
    assert record.name == "gateway.serve" and not record.exc_info
    text = record.getMessage()
    assert "RuntimeError at test_serve_supervision.py:" in text and "rework_abandoned" in text
    assert "王建国" not in text and "5119211966" not in text


def test_a_run_folder_that_cannot_be_written_does_not_stop_the_gateway(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk (or the run folder gone) makes ``serve.json`` unwritable: the supervisor logs it and goes on
    supervising, rather than dying and taking every part with it."""
    blocked = tmp_path / "run"
    blocked.write_text("a file where the run folder would be")  # mkdir and writes under it fail (an OSError)
    parts = [Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(1)")),
             Part("queue", "queue reader", stand_in("import time, sys; time.sleep(2); sys.exit(2)"))]
    supervisor = Supervisor(parts, restart_limit=2, run_dir=blocked, backoff=0.05, grace=5)
    with caplog.at_level(logging.ERROR, logger="gateway.supervise"):
        code = supervisor.run()  # (the HTTP worker is restarted when it ends; the queue reader's 2 stops it all)
    assert code == 2
    assert any("cannot be written" in r.getMessage() for r in caplog.records)


def test_serve_json_is_written_again_once_the_run_folder_can_be(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a full disk, the manifest /health reads is written again as soon as it can be: /health stayed on the
    last state it could write (a part restarted meanwhile still read as dead) for as long as the gateway ran."""
    import json
    import threading

    from gateway import supervise

    run = tmp_path / "run"
    run.write_text("a file where the run folder would be (writes fail, as on a full disk)")
    parts = [Part("http-1", "HTTP worker 1", stand_in("import time; time.sleep(30)"))]
    supervisor = Supervisor(parts, restart_limit=2, run_dir=run, backoff=0.05, grace=5)
    seen: dict[str, object] = {}

    def operator() -> None:  # (the supervisor runs in the main thread: it takes the signals)
        try:
            time.sleep(0.5)
            seen["failed_first"] = supervisor.unsaved is not None
            run.unlink()  # space again
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (run / "serve.json").exists():
                time.sleep(0.05)
            seen["manifest"] = json.loads((run / "serve.json").read_text(encoding="utf-8"))
            seen["leftovers"] = [p.name for p in run.iterdir() if p.name.startswith(".serve.json")]
            seen["unsaved"] = supervisor.unsaved
        finally:
            supervisor.stopping = True

    supervise._RESAVE_SECONDS, before = 0.2, supervise._RESAVE_SECONDS
    helper = threading.Thread(target=operator)
    try:
        with caplog.at_level(logging.INFO, logger="gateway.supervise"):
            helper.start()
            supervisor.run()
    finally:
        helper.join(20)
        supervise._RESAVE_SECONDS = before
    assert seen["failed_first"] is True
    assert seen["manifest"]["parts"]["http-1"]["state"] == "running"  # type: ignore[index]
    assert seen["leftovers"] == [] and seen["unsaved"] is None  # no half-written file left
    assert any("can be written again" in r.getMessage() for r in caplog.records)


def test_a_part_that_cannot_open_its_database_stops_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A disk that fills (or a folder that goes) while a part starts: one line saying so and exit 1, which the
    supervisor restarts, instead of a traceback per attempt in the log."""
    from gateway import serve
    from gateway.config import load_settings

    (tmp_path / "blocker").write_text("a file where the database's folder would be")
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc":
                                                    "12511921MB0001003C",
                                                    "database": str(tmp_path / "blocker" / "gw.db")})
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:  # (a part sends its log lines to this process's stderr, here the capture: put back as it was after)
        assert serve.run_part(settings, "background", None) == 1
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("gateway: background stopped: the database or its folder cannot be used right now (")


def test_a_part_that_cannot_reach_its_postgresql_says_so_and_asks_to_be_started_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A part started while PostgreSQL is away: one line in the database's words, and DATABASE_AWAY (the supervisor
    starts it again until the database answers, not counting it against restart_limit), for each kind of part."""
    from gateway import serve
    from gateway.supervise import DATABASE_AWAY

    world = build_world(tmp_path, lambda: _dt.datetime.now(CST), {"tongjiang": "http://127.0.0.1:9"},
                        members=("tongjiang",))  # a member with its keys and registry: its pipeline opens the database
    settings = world.gateways["tongjiang"].settings.replace(mllp_ack="received",
                                                            database="postgresql://gw@127.0.0.1:1/gw")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        for part in ("queue",):
            assert serve.run_part(settings, part, None) == DATABASE_AWAY, part
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("gateway: ")]
    assert len(err) == 1 and not any("Traceback" in line for line in err), err
    assert all(" could not reach the database (cannot connect to the PostgreSQL database" in line
               and "starts it again every few seconds until it answers" in line for line in err), err


def test_a_data_directory_that_cannot_be_written_stops_the_start_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only data directory (a mount, permissions) is said as such before anything starts, not as the first
    heartbeat file some part fails to write. (This machine's tests run as root, which permissions do not stop, so
    the file system's answer is given here.)"""
    from gateway import serve
    from gateway.config import load_settings
    from gateway.errors import ConfigError
    from gateway.store import db

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc":
                                                    "12511921MB0001003C"})
    monkeypatch.setattr(db, "unwritable", lambda locator: [f"{tmp_path / 'gw'}/"])
    with pytest.raises(ConfigError, match=r"this user cannot write .*/gw/ where the database .* lives \(permissions "
                                          r"or a read-only file system\)"):
        serve.serve(settings)


def test_a_data_directory_to_be_made_where_none_can_be_is_said_as_such(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data directory that is not there yet, under a folder this user cannot write (or a read-only mount): one
    configuration line and exit status 2 naming the folder (it was "Error: …/data: Permission denied", exit 1)."""
    from click.testing import CliRunner

    from gateway.cli import cli
    from gateway.store import db

    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(db.os, "access", lambda p, mode: False if Path(p) == parent else real(p, mode))
    assert db.unwritable(parent / "data" / "gateway.db") == [f"{parent}/ (to make {parent / 'data'} in)"]
    result = CliRunner().invoke(cli, ["serve"], env={"GATEWAY_DATA_DIR": str(parent / "data"),
                                                     "GATEWAY_HTTP_PORT": str(free_port()),
                                                     "GATEWAY_MLLP_PORT": str(free_port())})
    assert result.exit_code == 2, result.output
    assert f"this user cannot write {parent}/ (to make {parent / 'data'} in)" in result.output
    assert not (parent / "data").exists()


def _part_pid(supervisor: int, part: str) -> int | None:
    """The process id of ``gateway serve``'s part ``part`` (a child of ``supervisor``), from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == supervisor and part.encode() in cmdline and b"--part" in cmdline:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_full_data_disk_stops_no_part(tmp_path: Path) -> None:
    """The data disk fills up (a real filesystem of 24 MB, filled): an HTTP worker started meanwhile answers
    /health with 503 naming the disk (each process counts its metrics in a file mapped into memory; one made on
    the full disk killed its worker with SIGBUS at the first request, and the restarts stopped the whole gateway).
    Needs a tmpfs mount (root with CAP_SYS_ADMIN); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    proc = None
    try:
        http, mllp = free_port(), free_port()
        url = f"http://127.0.0.1:{http}"
        world = build_world(disk, lambda: _dt.datetime.now(CST), {"tongjiang": url}, members=("tongjiang",))
        s = world.gateways["tongjiang"].settings
        folder = run_dir(s.replace(http_port=http))
        proc = subprocess.Popen([GATEWAY, "serve"], env=_serve_env(s, url, http, mllp), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        wait_until(lambda: _health(url)[0] == 200, 120, "a healthy gateway")
        with open(disk / "filler", "wb") as filler:  # the disk filled by something else on the machine
            with contextlib.suppress(OSError):
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
        old = _part_pid(proc.pid, "http-1")
        assert old == json.loads((folder / "serve.json").read_text())["parts"]["http-1"]["pid"]
        os.kill(old, signal.SIGKILL)  # an HTTP worker started while the disk is full (its manifest cannot be written)
        new = wait_until(lambda: (pid := _part_pid(proc.pid, "http-1")) not in (None, old) and pid, 60,
                         "the HTTP worker started again")
        for _ in range(8):
            status, body = wait_until(lambda: _health(url), 60, "an answer")
            assert status == 503 and "disk is full" in body["checks"]["database"]["detail"], body
        assert proc.poll() is None and _part_pid(proc.pid, "http-1") == new  # answered, and never died again
    finally:
        if proc is not None:
            _stop(proc)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
