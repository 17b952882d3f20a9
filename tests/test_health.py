"""/health names what is wrong (503) and says ok (200) only when every part of the gateway works; the registry
routes answer on a real app built with a registry (they answered 500 on every such gateway before).

In-process, on apps built like production's (``create_app`` on the demo world's settings); the processes of
``gateway serve`` are stood in for by the run folder they keep (tests/test_serve_supervision.py runs the real ones).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import MEMBERS
from gateway.demo.world import build_world
from gateway.heartbeat import run_dir, write_manifest
from gateway.store.db import transaction

DATA = Path(__file__).parent / "data"
CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc


class Clock:
    def __init__(self) -> None:
        self.now = _dt.datetime.now(CST)

    def __call__(self) -> _dt.datetime:
        return self.now


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo world of two members on a backend (built on first use, once per backend per module)."""
    built: dict[str, Any] = {}

    def world(backend: str, cluster: Any) -> Any:
        if backend not in built:
            clock = Clock()
            base = tmp_path_factory.mktemp(f"world-{backend}")
            database = None if cluster is None else (
                lambda key: str(cluster.url("gw", schema=f"health_{os.getpid()}_{key}")))
            w = build_world(base, clock, {"tongjiang": "http://127.0.0.1:9", "fuling": "http://127.0.0.1:10"},
                            members=("tongjiang", "fuling"), database=database)
            w.clock = clock
            built[backend] = w
        return built[backend]

    return world


@pytest.fixture
def world(worlds: Any, backend: str, request: pytest.FixtureRequest) -> Any:
    return worlds(backend, request.getfixturevalue("pg_cluster") if backend == "postgresql" else None)


@pytest.fixture
def gw(world: Any) -> Any:
    """通江's gateway, with its clock back at now and its outbox, queue and run folder emptied."""
    gateway = world.gateways["tongjiang"]
    world.clock.now = _dt.datetime.now(CST)
    gateway.clock = world.clock
    db = gateway.pipeline.store.db
    with transaction(db):
        db.execute("DELETE FROM outbox")
        db.execute("DELETE FROM message_stages WHERE message_ref IN (SELECT id FROM messages WHERE status = 'queued')")
        db.execute("DELETE FROM messages WHERE status = 'queued'")
    folder = run_dir(gateway.settings)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    return gateway


def get(gateway: Any, path: str, **kw: Any) -> Any:
    client = gateway.app.test_client()
    return client.get(path, headers={"Authorization": f"Bearer {gateway.token}"}, **kw)


def health(gateway: Any) -> tuple[int, dict[str, Any]]:
    response = gateway.app.test_client().get("/health")  # open: no token
    return response.status_code, response.get_json()


def test_registry_routes_answer_on_a_gateway_with_a_registry(gw: Any) -> None:
    snap = get(gw, "/registry/snapshot")
    assert snap.status_code == 200, snap.get_data(as_text=True)
    # it carries the physicians' 身份证号: for this gateway's accounts only
    assert gw.app.test_client().get("/registry/snapshot").status_code == 401
    assert json.loads(snap.get_data())["format"].startswith("cyhr-registry-snapshot")
    orgs = get(gw, "/registry/fhir/Organization")
    assert orgs.status_code == 200 and orgs.get_json()["total"] >= 2
    one = get(gw, f"/registry/fhir/Organization/{FL}")
    assert one.status_code == 200 and one.get_json()["resourceType"] == "Organization"
    assert get(gw, "/registry/fhir/Endpoint").status_code == 200
    bundle = json.loads((DATA / "registry" / "bundle-lab-tongjiang.json").read_text(encoding="utf-8"))
    params = [{"name": "bundle", "resource": bundle}, {"name": "receiver", "valueString": FL}]
    body = {"resourceType": "Parameters", "parameter": params}
    decided = gw.app.test_client().post("/fhir/$recognize", json=body,
                                        headers={"Authorization": f"Bearer {gw.token}"})
    assert decided.status_code == 200, decided.get_data(as_text=True)
    assert decided.get_json()["resourceType"] == "Parameters"


def test_the_gateway_runs_on_the_backend_chosen(gw: Any, backend: str) -> None:
    from gateway.store.db import dialect

    assert dialect(gw.pipeline.store.db) == backend
    assert health(gw)[1]["checks"]["database"] == {"ok": True, "detail": "answers"}


def test_health_is_ok_when_everything_is(gw: Any) -> None:
    status, body = health(gw)
    assert status == 200, body
    assert body["status"] == "ok" and body["failing"] == []
    assert body["checks"]["registry"]["ok"] and "valid until" in body["checks"]["registry"]["detail"]
    assert {"database", "backlog", "dead_letters", "deliveries", "registry"} <= set(body["checks"])


def test_a_write_refused_for_a_full_disk_fails_the_database_check_until_one_goes_through(gw: Any) -> None:
    """A SQLite (or PostgreSQL) transaction refused because the disk is full: /health said the database "answers"
    while every write failed. The database check now fails naming the refusal, until a write goes through."""
    import sqlite3

    db = gw.pipeline.store.db
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]  # SQLITE_FULL, as the driver sets it
    with pytest.raises(sqlite3.OperationalError):
        with transaction(db):
            db.execute("SELECT 1")
            raise full
    status, body = health(gw)
    assert status == 503 and "database" in body["failing"]
    assert "refused a write" in body["checks"]["database"]["detail"]
    assert "database or disk is full" in body["checks"]["database"]["detail"]
    with transaction(db):  # a transaction that writes nothing proves nothing
        db.execute("DELETE FROM outbox WHERE id < 0")
    assert "refused a write" in health(gw)[1]["checks"]["database"]["detail"]
    with transaction(db):
        db.execute("UPDATE schema_versions SET applied_at = applied_at WHERE part = 'core'")
    assert health(gw)[1]["checks"]["database"] == {"ok": True, "detail": "answers"}


def test_dead_letters_fail_health(gw: Any) -> None:
    db = gw.pipeline.store.db
    now = gw.pipeline.clock().isoformat()
    with transaction(db):
        db.execute("INSERT INTO outbox (destination, url, kind, payload, payload_sha256, status, attempts,"
                   " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   [FL, "http://127.0.0.1:10/exchange", "bundle", b"{}", "d" * 64, "dead", 9, 0, now, now])
    status, body = health(gw)
    assert status == 503 and body["status"] == "failing" and body["failing"] == ["dead_letters"]
    assert "1 delivery" in body["checks"]["dead_letters"]["detail"]


def test_a_delivery_waiting_too_long_fails_health(gw: Any) -> None:
    db = gw.pipeline.store.db
    then = (gw.pipeline.clock() - _dt.timedelta(seconds=gw.settings.health_max_delivery_wait + 60)).isoformat()
    with transaction(db):
        db.execute("INSERT INTO outbox (destination, url, kind, payload, payload_sha256, status, attempts,"
                   " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   [FL, "http://127.0.0.1:10/exchange", "bundle", b"{}", "e" * 64, "pending", 3, 0, then, then])
    status, body = health(gw)
    assert status == 503 and body["failing"] == ["deliveries"]
    assert "has waited" in body["checks"]["deliveries"]["detail"]


def _queue(gw: Any, n: int) -> None:
    for i in range(n):
        gw.pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender="LIS|TJ", message_id=f"Q{time.time_ns()}{i}",
                                     origin="test", raw=b"MSH|^~\\&|", status="queued")


def test_a_long_queue_fails_health(gw: Any) -> None:
    _queue(gw, gw.settings.health_max_backlog + 1)
    status, body = health(gw)
    assert status == 503 and body["failing"] == ["backlog"]
    assert f"more than {gw.settings.health_max_backlog}" in body["checks"]["backlog"]["detail"]


def test_an_old_queue_fails_health(gw: Any) -> None:
    _queue(gw, 1)
    assert health(gw)[0] == 200
    gw.clock.now += _dt.timedelta(seconds=gw.settings.health_max_backlog_age + 1)
    status, body = health(gw)
    assert status == 503 and body["failing"] == ["backlog"]
    assert "has waited" in body["checks"]["backlog"]["detail"]


def test_a_snapshot_expiring_soon_fails_health(gw: Any) -> None:
    until = gw.pipeline.exchange.holder.current.valid_until
    gw.clock.now = until - _dt.timedelta(days=gw.settings.snapshot_warn_days, seconds=-60)
    status, body = health(gw)
    assert status == 503 and body["failing"] == ["registry"]
    assert "within 2 day(s)" in body["checks"]["registry"]["detail"]
    gw.clock.now = until - _dt.timedelta(days=gw.settings.snapshot_warn_days, seconds=60)
    assert health(gw)[0] == 200
    gw.clock.now = until + _dt.timedelta(seconds=1)
    status, body = health(gw)
    assert status == 503 and "expired" in body["checks"]["registry"]["detail"]


@pytest.fixture
def child() -> Any:
    """A process standing in for a part of `gateway serve`."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _manifest(gw: Any, parts: dict[str, dict[str, Any]]) -> Path:
    folder = run_dir(gw.settings)
    write_manifest(folder, {"pid": os.getpid(), "started": time.time(), "restarts": 0, "restart_limit": 5,
                            "parts": parts})
    return folder


def _part(title: str, pid: int, **kw: Any) -> dict[str, Any]:
    return {"title": title, "pid": pid, "state": "running", "started": time.time(), "restarts": 0,
            "last_exit": None, "beats": True, **kw}


def test_a_dead_listener_fails_health_by_name(gw: Any, child: Any) -> None:
    folder = _manifest(gw, {
        "http-1": _part("HTTP worker 1", os.getpid(), beats=False),
        "mllp-1": _part("MLLP listener 1", child.pid, state="restarting", last_exit=-9, restarts=2),
        "background": _part("background loop", child.pid),
    })
    (folder / "background.beat").write_text(str(child.pid))
    status, body = health(gw)
    assert status == 503 and body["failing"] == ["mllp-1"]
    assert body["checks"]["mllp-1"]["detail"] == ("MLLP listener 1 died with exit code -9 (killed by SIGKILL); "
                                                  "it is being restarted; restarted 2 time(s)")
    assert body["checks"]["background"] == {"ok": True, "detail": "background loop alive"}
    assert body["checks"]["http"] == {"ok": True, "detail": "1 of 1 HTTP worker(s) running"}
    _manifest(gw, {"queue": _part("queue reader", child.pid, state="restarting", last_exit=75, restarts=3)})
    status, body = health(gw)  # restarted while the database was away: said as such, not as a death
    assert status == 503 and body["checks"]["queue"]["detail"] == (
        "queue reader could not reach the database as it started; it is started again until the database "
        "answers; restarted 3 time(s)")


def test_a_hung_part_and_a_vanished_one_fail_health(gw: Any, child: Any) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = _manifest(gw, {"queue": _part("queue reader", child.pid),
                            "background": _part("background loop", gone.pid)})
    beat = folder / "queue.beat"
    beat.write_text(str(child.pid))
    os.utime(beat, (time.time() - 40, time.time() - 40))
    status, body = health(gw)
    assert status == 503 and body["failing"] == ["background", "queue"]
    assert "last reported alive 40 s ago (hung?)" in body["checks"]["queue"]["detail"]
    assert body["checks"]["background"]["detail"] == "background loop is not running; it is being restarted"
    os.utime(beat)  # it beats again
    assert "queue" not in health(gw)[1]["failing"]


def test_a_part_restarted_sooner_than_15_s_when_hung_is_said_hung_as_soon(gw: Any, child: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """hung_restart_after 10: a part silent for 12 s is about to be killed as hung, and /health says so (it said
    'alive' until the kill: its threshold was 15 s whatever the setting)."""
    folder = _manifest(gw, {"queue": _part("queue reader", child.pid)})
    beat = folder / "queue.beat"
    beat.write_text(str(child.pid))
    os.utime(beat, (time.time() - 12, time.time() - 12))
    assert "queue" not in health(gw)[1]["failing"], "silent 12 s: alive, with hung parts restarted after 30 s"
    monkeypatch.setitem(gw.app.extensions, "gateway.settings", gw.settings.replace(hung_restart_after=10))
    status, body = health(gw)
    assert status == 503 and "last reported alive 12 s ago (hung?)" in body["checks"]["queue"]["detail"]


def test_a_part_that_never_beats_fails_once_past_its_start(gw: Any, child: Any) -> None:
    _manifest(gw, {"mllp-1": _part("MLLP listener 1", child.pid)})
    status, body = health(gw)
    assert status == 200 and body["checks"]["mllp-1"]["detail"] == "MLLP listener 1 is starting"
    _manifest(gw, {"mllp-1": _part("MLLP listener 1", child.pid, started=time.time() - 120)})
    status, body = health(gw)
    assert status == 503 and "has not reported alive" in body["checks"]["mllp-1"]["detail"]


def test_a_run_folder_left_by_a_stopped_gateway_is_ignored(gw: Any) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_manifest(run_dir(gw.settings), {"pid": gone.pid, "parts": {"mllp-1": _part("MLLP listener 1", gone.pid)}})
    status, body = health(gw)
    assert status == 200 and "mllp-1" not in body["checks"]


def test_health_names_no_patient(gw: Any) -> None:
    lis = (Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2"
           / "tongjiang-county-lis.hl7").read_bytes()
    gw.app.test_client().post("/ingest/hl7v2", data=lis, headers={"Authorization": f"Bearer {gw.token}"})
    _queue(gw, 1)
    text = gw.app.test_client().get("/health").get_data(as_text=True)
    assert "5119" not in text and "PID" not in text and "MSH" not in text


def test_a_sqlite_database_that_cannot_be_written_fails_health_and_is_reopened_once_it_can(
        tmp_path: Path, clock: Any) -> None:
    """SQLite opens a file it cannot open for writing read-only, without saying so, and such a connection stays
    read-only after the file can be written again. While the files cannot be written, /health says so (the node
    answers reads, but every message sent to it would fail); once they can, the next message is stored: the
    connection that found itself read-only is replaced. The files are made immutable (``chattr +i``, as root), which
    no permission bit can stand for when the tests run as root."""
    import shutil as _shutil
    import subprocess as _subprocess

    from conftest import DATA, TONGJIANG, make_token
    from gateway.api.app import create_app
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline

    if _shutil.which("chattr") is None or os.geteuid() != 0:
        pytest.skip("needs chattr and root to make the database files immutable")
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG,
                                                    "issuer_name": "通江县人民医院（演示）"})
    pipeline = Pipeline(settings, clock=clock)
    app = create_app(settings, pipeline)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {make_token(app, 'lis', ['submitter'])}"}
    message = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes().split(b"MSH|")[1]
    first, second, third = (b"MSH|" + message.replace(b"|P|2.5.1", f"-{n}|P|2.5.1".encode(), 1) for n in (1, 2, 3))
    assert client.post("/ingest/hl7v2", data=first, headers=auth).status_code == 200
    pipeline.close()  # the next use opens the database again, as a new thread or a restarted listener would
    # another process's connection keeps the log files (-wal, -shm) as a running gateway's other parts do; the
    # database and its log files cannot be written for a while (a restore by another user, a read-only remount)
    hold = ("import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1])\n"
            "c.execute('SELECT count(*) FROM messages').fetchone()\nprint('open', flush=True)\ntime.sleep(120)")
    other = _subprocess.Popen([sys.executable, "-c", hold, str(settings.database_locator)], stdout=_subprocess.PIPE,
                              text=True)
    assert other.stdout is not None and other.stdout.readline().strip() == "open"
    files = [str(p) for p in Path(settings.database_locator).parent.glob("gateway.db*")]
    assert len(files) == 4, files  # (the database, its -wal, -shm, and -receipts: see gateway.store.db._ShortFirst)
    made = _subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
    if made.returncode != 0:
        other.kill()
        pytest.skip(f"this file system has no immutable flag: {made.stderr.strip()}")
    try:
        refused = client.post("/ingest/hl7v2", data=second, headers=auth)
        assert refused.status_code == 503, refused.get_data(as_text=True)
        down = client.get("/health")
        assert down.status_code == 503
        check = down.get_json()["checks"]["database"]
        assert not check["ok"] and "cannot be written" in check["detail"] and "gateway.db" in check["detail"]
    finally:
        _subprocess.run(["chattr", "-i", *files], check=True)
    assert client.get("/health").get_json()["checks"]["database"]["ok"]
    stored = client.post("/ingest/hl7v2", data=third, headers=auth)
    assert stored.status_code == 200, stored.get_data(as_text=True)
    again = client.post("/ingest/hl7v2", data=second, headers=auth)
    assert again.status_code == 200, again.get_data(as_text=True)  # and what was refused can be sent again
    other.kill()
    other.wait()
    pipeline.close()


def test_a_signing_certificate_that_expires_or_has_expired_fails_health_and_is_said_in_the_answer(gw: Any) -> None:
    """Every report this member issues is signed: a certificate near its end fails /health (certificate_warn_days)
    before it stops that; once it has expired, a report taken in is kept and answered AE saying so (it was an
    'internal error' with nothing in the log but the error's type)."""
    from conftest import DATA

    cert = gw.pipeline.member.signer.identity.chain[0]
    end = cert.not_valid_after_utc.astimezone(CST)
    gw.clock.now = end - _dt.timedelta(days=gw.settings.certificate_warn_days, seconds=60)
    status, body = health(gw)
    assert body["checks"]["signing"]["ok"] and "valid until" in body["checks"]["signing"]["detail"]
    gw.clock.now = end - _dt.timedelta(days=gw.settings.certificate_warn_days, seconds=-60)
    status, body = health(gw)
    assert status == 503 and "signing" in body["failing"]
    assert "within 14 day(s) (certificate_warn_days)" in body["checks"]["signing"]["detail"]
    gw.clock.now = end + _dt.timedelta(seconds=1)
    status, body = health(gw)
    assert status == 503 and "expired at" in body["checks"]["signing"]["detail"]
    message = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
    [out] = gw.pipeline.ingest(message, "hl7v2", channel="file")  # (the registry snapshot has expired long before)
    assert out.status.value == "failed" and out.ack_code == "AE"
    assert "this gateway cannot sign reports: registry snapshot 1 expired at" in out.issues[0].message
    marks, gw.pipeline.member.marks = gw.pipeline.member.marks, None  # a member that stamps no marks
    try:
        [out] = gw.pipeline.ingest(message.replace(b"|TJ2405200099|", b"|TJ2405200098|", 1), "hl7v2", channel="file")
    finally:
        gw.pipeline.member.marks = marks
    assert out.status.value == "failed" and out.ack_code == "AE"
    assert "this gateway cannot sign reports: the signing certificate is not valid at" in out.issues[0].message
    assert b"cannot sign reports" in out.answer


def test_a_signing_certificate_the_registry_no_longer_lists_fails_health(gw: Any, monkeypatch) -> None:
    """The registry authority revoked this member's certificate (or its listing ended): every member refuses what
    it signs while its LIS still gets AA; /health said "signing: ok" until someone read the dead deliveries."""
    member = gw.pipeline.member
    real = member.snapshot()

    class Delisted:  # the snapshot in force, as one that no longer lists this member's certificate
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def is_listed(self, cert: Any, at: Any) -> bool:
            return False

    status, body = health(gw)
    assert body["checks"]["signing"]["ok"], body["checks"]["signing"]
    monkeypatch.setattr(member, "snapshot", lambda: Delisted())
    status, body = health(gw)
    assert status == 503 and "signing" in body["failing"]
    detail = body["checks"]["signing"]["detail"]
    assert f"registry snapshot in force (version {real.version}) does not vouch" in detail and "refuse" in detail


def test_a_full_disk_fails_the_database_check(gw: Any, monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """The database answers reads on a full disk while every write is refused ('database or disk is full'): the
    check says so (it said "answers" while ingest and pushes got 503). The file system is asked as it is; the
    test makes it report 3 MiB free where the database lives (a full disk cannot be made here without root)."""
    if backend == "postgresql":
        pytest.skip("the PostgreSQL server watches its own disk")
    real = os.statvfs
    folder = os.path.dirname(os.path.realpath(gw.settings.database_locator))

    def nearly_full(path: Any) -> Any:
        got = real(path)
        if os.path.realpath(path) != folder:
            return got
        return os.statvfs_result((got.f_bsize, got.f_frsize, got.f_blocks, 1, 3 * 1048576 // got.f_frsize,
                                  got.f_files, got.f_ffree, got.f_favail, got.f_flag, got.f_namemax))

    assert health(gw)[1]["checks"]["database"]["ok"]
    monkeypatch.setattr(os, "statvfs", nearly_full)
    status, body = health(gw)
    assert status == 503 and "database" in body["failing"]
    assert body["checks"]["database"]["detail"] == ("answers, but its disk is full: 3072 KiB free where it lives "
                                                    "(writes fail below 8 MiB)")


def test_a_database_that_went_away_is_said_in_words_not_a_class_name(tmp_path: Path, clock: Any, backend: str,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """/health's database check says why (the driver's or server's words), never a bare exception class: here a
    PostgreSQL server stopped under a running node, then started again (the next /health answers ok)."""
    import logging

    from conftest import TONGJIANG, make_token
    from gateway import logs
    from gateway.api.app import create_app
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline
    from gateway.store.pgcluster import Cluster

    if backend != "postgresql":
        pytest.skip("a PostgreSQL server stopped under a node (run with --backend postgresql)")
    with Cluster() as own:
        settings = load_settings(environ={}, overrides={
            "data_dir": str(tmp_path / "gw"), "database": own.url("postgres"), "issuer_uscc": TONGJIANG,
            "issuer_name": "通江县人民医院（演示）"})
        pipeline = Pipeline(settings, clock=clock)
        app = create_app(settings, pipeline)
        client = app.test_client()
        auth = {"Authorization": f"Bearer {make_token(app, 'reader', ['submitter'])}"}
        assert client.get("/health").get_json()["checks"]["database"] == {"ok": True, "detail": "answers"}
        assert client.get("/fhir/Patient", headers=auth).status_code == 200
        assert own.dir is not None
        data = str(own.dir / "data")
        own._run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        # requests meanwhile: 503 (Retry-After), and one WARNING for them all in the window, not one each
        monkeypatch.setattr(logs, "_faults", {})
        with caplog.at_level(logging.WARNING, logger="gateway"):
            for _ in range(3):
                away = client.get("/fhir/Patient", headers=auth)
                assert away.status_code == 503 and away.headers["Retry-After"] == "5"
                text = away.get_json()["issue"][0]["diagnostics"]
                assert text == "the database cannot be reached right now; send the request again later"
            for _ in range(2):  # the console too: a page saying so (503), not an internal error with a traceback
                page = client.get("/console/")
                assert page.status_code == 503 and page.headers["Retry-After"] == "5"
                assert "数据库暂时无法访问" in page.get_data(as_text=True)
                assert str(own.port) not in page.get_data(as_text=True)
        said = [r.getMessage() for r in caplog.records if r.name.startswith("gateway")]
        assert len([m for m in said if m.startswith("database unavailable for requests: ")]) == 1, said
        assert len([m for m in said if m.startswith("database unavailable for console pages: ")]) == 1, said
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        response = client.get("/health")
        assert response.status_code == 503
        check = response.get_json()["checks"]["database"]
        assert not check["ok"]
        # (/health is open: which database, its host, port and user, is the log's, not anyone's)
        assert check["detail"].startswith("cannot be read: cannot connect to the database: "), check
        assert "refused" in check["detail"].lower() and str(own.port) not in check["detail"], check
        own._run("pg_ctl", "-D", data, "-l", str(own.dir / "server.log"), "-o",
                 f"-c listen_addresses=127.0.0.1 -c port={own.port} -c unix_socket_directories={own.dir}",
                 "-w", "start")
        assert client.get("/health").get_json()["checks"]["database"] == {"ok": True, "detail": "answers"}
        pipeline.close()
