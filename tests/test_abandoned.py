"""Messages left behind by a killed process, while the gateway runs: a process holding a message is killed with
SIGKILL; the background pass works the message again (bounded per pass, never taking one a live process holds),
``gateway messages show`` says who left it instead of naming a dead process as its worker, ``gateway messages retry``
takes it, and /health fails its ``abandoned`` check while one stays past two background passes. Input: the MLLP
sample's first message (``tests/data/hl7v2/mllp-framed.hl7``)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.cli import cli
from gateway.pipeline import Pipeline
from gateway.serve import background_pass

GOOD = split_messages((DATA / "hl7v2" / "mllp-framed.hl7").read_bytes())[0]

HOLDER = textwrap.dedent("""
    import sys, time
    from gateway.adapters.base import RawUnit
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline
    settings = load_settings(environ={}, overrides={"data_dir": sys.argv[1], "issuer_uscc": sys.argv[2],
                                                    "database": sys.argv[3]})
    pipeline = Pipeline(settings)
    ch = pipeline.channel("hl7v2")
    # stored raw and held, as ingest_batch does before it works a message; then it hangs as if stuck in a stage
    for raw in sys.stdin.buffer.read().split(b"\\x1c"):
        sender, message_id = ch.adapter.identify(RawUnit(raw, 1))
        pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender=sender, message_id=message_id,
                                  origin="mllp:x", raw=raw, lease=300.0)
    print("held", flush=True)
    time.sleep(120)
""")


def copy_of(tag: str) -> bytes:
    return GOOD.replace(b"TJ2406100001", tag.encode())


def msa(ack: bytes) -> list[str]:
    return next(s for s in ack.decode("utf-8").split("\r") if s.startswith("MSA")).split("|")


def killed_holder(settings: Any, *messages: bytes) -> int:
    """Have another process store and hold ``messages``, then kill it with SIGKILL; its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, settings.data_dir, settings.issuer_uscc,
                             settings.database],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"\x1c".join(messages))
    proc.stdin.close()
    assert proc.stdout.readline() == b"held\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    return proc.pid


def test_the_background_pass_works_again_what_a_killed_process_held(settings: Any) -> None:
    pipeline = Pipeline(settings)  # the real clock: the dead holder's lease has not expired
    pid = killed_holder(settings, copy_of("A001"), copy_of("A002"))
    rec = pipeline.store.find_message("hl7v2", pipeline.store.list_messages()[0].sender, "A001")
    assert rec is not None and rec.status == "received" and rec.lease_owner.endswith(f":{pid}")  # type: ignore
    live = pipeline.channel("hl7v2").adapter.identify(RawUnit(copy_of("A003"), 1))
    held_here, _ = pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender=live[0], message_id=live[1],
                                             origin="mllp:test", raw=copy_of("A003"), lease=300.0)

    done = background_pass(pipeline)
    assert done.get("reworked") == 2
    for tag in ("A001", "A002"):
        rec = pipeline.store.find_message("hl7v2", rec.sender, tag)
        assert rec is not None and (rec.status, rec.ack_code, rec.lease_owner) == ("stored", "AA", None)
        assert rec.ack is not None and msa(rec.ack)[1:3] == ["AA", tag], "its real outcome and stored answer"
        assert any(s["stage"] == "take" for s in pipeline.store.stages_of(rec.id))
    assert pipeline.store.get_message(held_here).status == "received", "a live holder's message is left to it"
    assert background_pass(pipeline).get("reworked") is None
    pipeline.close()


def test_a_pass_is_bounded(settings: Any, monkeypatch: Any) -> None:
    import gateway.serve as serve

    pipeline = Pipeline(settings)
    killed_holder(settings, *(copy_of(f"B{n:03}") for n in range(5)))
    monkeypatch.setattr(serve, "ABANDONED_PER_PASS", 2)
    assert [background_pass(pipeline).get("reworked") for _ in range(4)] == [2, 2, 1, None]
    assert pipeline.store.counts() == {"stored": 5}
    pipeline.close()


def test_show_and_retry_say_who_left_a_message(settings: Any, runner: Any, tmp_path: Path) -> None:
    pipeline = Pipeline(settings)
    pid = killed_holder(settings, copy_of("C001"))
    rec = pipeline.store.list_messages()[0]
    env = {"GATEWAY_DATA_DIR": settings.data_dir, "GATEWAY_ISSUER_USCC": settings.issuer_uscc,
           "GATEWAY_DATABASE": settings.database}
    shown = runner.invoke(cli, ["messages", "show", str(rec.id)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "being worked" not in shown.output
    assert f"left by process {rec.lease_owner}, which is gone" in shown.output and str(pid) in shown.output
    assert f"gateway messages retry {rec.id}" in shown.output

    retried = runner.invoke(cli, ["messages", "retry", str(rec.id)], env=env)
    assert retried.exit_code == 0, retried.output
    assert f"message {rec.id}: received -> stored AA (left by process {rec.lease_owner}, which is gone)" \
        in retried.output
    assert pipeline.store.get_message(rec.id).status == "stored"
    again = runner.invoke(cli, ["messages", "retry", str(rec.id)], env=env)
    assert again.exit_code == 1 and "is stored, not failed" in again.output
    pipeline.close()


def test_retry_refuses_a_message_a_live_process_holds(settings: Any, runner: Any) -> None:
    pipeline = Pipeline(settings)
    sender, message_id = pipeline.channel("hl7v2").adapter.identify(RawUnit(copy_of("D001"), 1))
    record_id, _ = pipeline.store.insert_raw(channel="mllp", fmt="hl7v2", sender=sender, message_id=message_id,
                                             origin="mllp:test", raw=copy_of("D001"), lease=300.0)
    env = {"GATEWAY_DATA_DIR": settings.data_dir, "GATEWAY_ISSUER_USCC": settings.issuer_uscc,
           "GATEWAY_DATABASE": settings.database}
    shown = runner.invoke(cli, ["messages", "show", str(record_id)], env=env)
    assert f"being worked by process {pipeline.store.get_message(record_id).lease_owner}" in shown.output
    retried = runner.invoke(cli, ["messages", "retry", str(record_id)], env=env)
    assert retried.exit_code == 1 and "is being worked by process" in retried.output
    assert pipeline.store.get_message(record_id).status == "received"
    pipeline.close()


def test_health_names_messages_left_past_two_passes(settings: Any, app: Any, anon: Any, pipeline: Any,
                                                    clock: Any) -> None:
    killed_holder(settings, copy_of("E001"), copy_of("E002"))
    # the holder wrote real times; the test's clock decides how long ago that was
    stamp = pipeline.store.db.execute("SELECT updated_at FROM messages LIMIT 1").fetchone()[0]
    clock.now = _dt.datetime.fromisoformat(stamp) + _dt.timedelta(seconds=1)
    body = json.loads(anon.get("/health").get_data())
    assert body["checks"]["abandoned"]["ok"], "within the grace period the background loop has its turn"
    clock.advance(seconds=2 * settings.delivery_interval + 1)
    answer = anon.get("/health")
    body = json.loads(answer.get_data())
    assert answer.status_code == 503 and "abandoned" in body["failing"]
    assert body["checks"]["abandoned"]["detail"].startswith("2 message(s) left unfinished by a process that is gone")
    background_pass(pipeline)
    body = json.loads(anon.get("/health").get_data())
    assert body["checks"]["abandoned"]["ok"] and "abandoned" not in body["failing"]


def test_a_running_gateway_works_again_what_a_killed_process_left(tmp_path: Path, database: str) -> None:
    import shutil
    import time

    import requests

    from conftest import wait_port
    from gateway.config import load_settings
    from gateway.demo import free_port

    gateway = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
    port = free_port()
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "gw"), "GATEWAY_ISSUER_USCC": "12511921MB0001003C",
           "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0", "GATEWAY_WORKERS": "1",
           "GATEWAY_DELIVERY_INTERVAL": "1", "GATEWAY_LOG_LEVEL": "WARNING", "GATEWAY_DATABASE": database}
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "database": database,
                                                    "issuer_uscc": "12511921MB0001003C"})
    proc = subprocess.Popen([gateway, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_port(port)
        requests.get(f"http://127.0.0.1:{port}/health", timeout=120)
        killed_holder(settings, copy_of("F001"))  # after start: the start-up recovery is not what works it
        pipeline = Pipeline(settings)
        deadline = time.monotonic() + 15
        while pipeline.store.counts() != {"stored": 1} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pipeline.store.counts() == {"stored": 1}
        rec = pipeline.store.list_messages()[0]
        assert rec.ack is not None and msa(rec.ack)[1:3] == ["AA", "F001"]
        body = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert body["checks"]["abandoned"]["ok"]
        pipeline.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]


def test_a_database_that_cannot_take_the_outcome_does_not_count_as_an_attempt(settings: Any, monkeypatch: Any) -> None:
    """A full disk under the background pass: every try to record the message's outcome fails. It was counted as a
    process that died on the message, and after a few passes the message was set aside as failed ("taken on 8 times
    without finishing") and its resends answered AE. A database fault is not the message's: its attempts stay as they
    were, and once the disk takes writes again the message is stored."""
    import sqlite3

    from gateway.pipeline import MAX_ATTEMPTS

    pipeline = Pipeline(settings)
    killed_holder(settings, copy_of("F001"))
    sender = pipeline.store.list_messages()[0].sender
    before = pipeline.store.find_message("hl7v2", sender, "F001")
    assert before is not None

    def full(*args: Any, **kwargs: Any) -> Any:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = 13  # type: ignore[attr-defined]  # SQLITE_FULL, as the driver sets it
        raise exc

    monkeypatch.setattr(pipeline.store, "finish", full)
    for _ in range(MAX_ATTEMPTS + 2):
        with pytest.raises(sqlite3.OperationalError):  # (the background loop says so, and tries again later)
            background_pass(pipeline)
    rec = pipeline.store.find_message("hl7v2", sender, "F001")
    assert rec is not None and rec.status == "received" and rec.lease_owner is None
    assert rec.attempts <= before.attempts + 1, rec.attempts
    monkeypatch.undo()
    background_pass(pipeline)
    rec = pipeline.store.find_message("hl7v2", sender, "F001")
    assert rec is not None and (rec.status, rec.ack_code) == ("stored", "AA")
    pipeline.close()
