"""Deliveries that fail, and senders that stop mid-delivery, between two member gateways over real HTTP on loopback.

通江 sends its blood-count Bundle to 涪陵, whose gateway answers on a loopback port behind a switch: answering,
down (503), or holding each request without an answer. The sender is 通江's pipeline in this process, or the
``gateway`` command in a process of its own (interrupted with SIGINT, killed with SIGKILL).

- a push that fails is audited at the sender: its first failure and its end (given up, refused), naming the
  member, the Bundle, the outbox record and why; ``GET /fhir/AuditEvent`` and ``gateway audit query`` find them;
- a delivery a killed process held is tried again at once, not when its lease ends; ``gateway outbox show`` and
  ``list`` say which process holds it, since when, and that it is gone;
- Ctrl-C on ``gateway send --now`` gives the delivery back: due now, attempts unchanged, said in one line;
- ``gateway outbox retry`` and ``replay`` keep a delivery's attempts: shown, with those before the retry.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from conftest import Clock, wait_port
from gateway.audit.log import entries
from gateway.demo import MEMBERS, free_port
from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.exchange.transports import HTTPTransport

CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc
ID_CARD = "511921196612120011"  # the demo LIS's patient
LIS = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"
GATEWAY = shutil.which("gateway") or str(Path(sys.executable).parent / "gateway")


class Switch:
    """涪陵's gateway on a loopback port: ``forward`` (its app answers), ``down`` (503) or ``hold`` (each request
    waits, unanswered, until :attr:`release` is set, then gets a 503)."""

    def __init__(self) -> None:
        self.mode = "forward"
        self.app: Any = None
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.server = make_server("127.0.0.1", 0, self, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __call__(self, environ: dict[str, Any], start: Any) -> Any:
        if self.mode == "forward":
            return self.app(environ, start)
        if self.mode == "hold":
            self.arrived.set()
            self.release.wait(60)
        start("503 Service Unavailable", [("Content-Type", "text/plain"), ("Retry-After", "1")])
        return [b"down for maintenance"]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def switch():
    made = Switch()
    yield made
    made.close()


@pytest.fixture
def clock() -> Clock:
    # the machine's time (the `gateway` commands run on it), settable here for back-off
    return Clock(_dt.datetime.now(CST).replace(microsecond=0))


@pytest.fixture
def world(tmp_path, clock, switch, member_database):
    made = build_world(tmp_path, clock, {"tongjiang": "http://tongjiang.test", "fuling": switch.url},
                       members=("tongjiang", "fuling"), database=member_database)
    switch.app = made.gateways["fuling"].app
    made.gateways["tongjiang"].pipeline.exchange.transport = HTTPTransport(timeout=30)
    return made


def blood_count(world) -> str:
    """通江's LIS sends its messages; the id of the blood count's signed Bundle."""
    tj = world.gateways["tongjiang"].pipeline
    return next(o.bundle["id"] for o in tj.ingest(LIS.read_bytes(), "hl7v2", channel="mllp") if o.signed is not None)


def env_of(gw) -> dict[str, str]:
    """The environment a `gateway` command of this member runs with (its configuration)."""
    s = gw.settings
    return {**os.environ, "GATEWAY_DATA_DIR": s.data_dir, "GATEWAY_ISSUER_USCC": s.issuer_uscc,
            "GATEWAY_ISSUER_NAME": s.issuer_name, "GATEWAY_REGISTRY_SNAPSHOT": s.registry_snapshot,
            "GATEWAY_REGISTRY_AUTHORITY": s.registry_authority, "GATEWAY_SIGNING_KEY": s.signing_key,
            "GATEWAY_SIGNING_CERT": s.signing_cert, "GATEWAY_PUBLIC_URL": s.public_url,
            "GATEWAY_LOG_LEVEL": "WARNING", **({"GATEWAY_DATABASE": s.database} if s.database else {})}


def command(gw, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAY, *args], env=env_of(gw), capture_output=True, text=True, timeout=60)


def failures_audited(gw) -> list[dict[str, Any]]:
    """The facts of the sender's audit entries of pushes that did not succeed."""
    return [e.facts for e in entries(gw.pipeline.store.db)
            if e.kind == "exchange" and e.facts["direction"] == "sent" and e.facts["outcome"] != "0"]


def audit_events(gw, **params: str) -> list[dict[str, Any]]:
    found = gw.app.test_client().get("/fhir/AuditEvent", query_string={**params, "_count": "100"},
                                     headers={"Authorization": f"Bearer {gw.token}"}).get_json()
    assert found.get("resourceType") == "Bundle", found
    return [e["resource"] for e in found.get("entry", []) if e.get("search", {}).get("mode") == "match"]


# -- 1. failed pushes are audited at the sender -------------------------------------------------------------------


def test_a_push_given_up_is_audited_at_its_first_failure_and_its_end(world, switch, clock) -> None:
    tj_gw = world.gateways["tongjiang"]
    tj = tj_gw.pipeline.exchange
    bundle_id = blood_count(world)
    switch.mode = "down"
    row = tj.push(bundle_id, FL)
    tj.outbox.max_attempts = 3
    for _ in range(3):
        tj.deliver()
        clock.advance(hours=2)
    assert tj.outbox.get(row).status == "dead"
    failed = failures_audited(tj_gw)
    assert [f["reason"] for f in failed] == ["retrying", "gave-up"], failed  # not every retry: the first, the end
    for facts in failed:
        assert facts["peer"]["value"] == FL and facts["bundle_id"] == bundle_id
        assert facts["bundle_hash"].startswith("sha256:") and facts["outcome"] == "8"  # the receiver away: serious
        assert f"outbox #{row}" in facts["detail"] and "HTTP 503" in facts["detail"]
        assert facts["patient"]["value"] == ID_CARD  # an auditor finds it by the patient
    assert "attempt 1 of 3" in failed[0]["detail"] and "attempt 3 of 3" in failed[1]["detail"]

    # the auditor's searches find them, by kind, outcome and patient
    events = audit_events(tj_gw, subtype="bundle-sent", outcome="8")
    assert len(events) == 2 and {e["outcomeDesc"].split(";")[0] for e in events} == {"retrying", "gave-up"}
    assert len(audit_events(tj_gw, **{"patient:identifier": ID_CARD, "subtype": "bundle-sent"})) == 2
    from gateway.cli import cli

    found = CliRunner().invoke(cli, ["audit", "query", "--db", str(tj_gw.settings.database_locator),
                                     "subtype=bundle-sent", "outcome=8"], env=env_of(tj_gw))
    assert found.exit_code == 0 and found.output.count("bundle-sent") == 2, found.output
    # delivered after an operator's retry: audited as sent, the failures still there
    switch.mode = "forward"
    tj.outbox.retry(row)
    assert tj.deliver()["delivered"] == 1
    sent = [e.facts for e in entries(tj_gw.pipeline.store.db) if e.kind == "exchange"]
    assert [(f["outcome"], f.get("reason")) for f in sent] == [("8", "retrying"), ("8", "gave-up"), ("0", None)]


def test_a_push_the_receiver_refuses_for_good_is_audited_once(world, switch, clock) -> None:
    tj_gw = world.gateways["tongjiang"]
    tj = tj_gw.pipeline.exchange
    bundle_id = blood_count(world)
    endpoints = {TJ: "http://tongjiang.test", FL: switch.url}
    # the authority removed 通江's certificate: 涪陵 refuses it for good (403), and 通江's own snapshot agrees
    world.publish(build_demo_registry(clock(), version=2, endpoints=endpoints, drop_members=(TJ,),
                                      reuse=world.registry))
    row = tj.push(bundle_id, FL)
    assert tj.deliver()["dead"] == 1
    failed = failures_audited(tj_gw)
    assert len(failed) == 1, failed  # dead at its first failure: one entry, its end
    facts = failed[0]
    assert facts["reason"] == "refused-by-receiver" and facts["outcome"] == "4"  # refused: a minor failure
    assert facts["peer"]["value"] == FL and facts["bundle_id"] == bundle_id
    assert f"outbox #{row}" in facts["detail"] and "HTTP 403" in facts["detail"]
    event = audit_events(tj_gw, subtype="bundle-sent", outcome="4")
    assert len(event) == 1 and event[0]["type"]["code"] == "110106"
    assert any(a.get("who", {}).get("identifier", {}).get("value") == FL for a in event[0]["agent"])


# -- 2. a delivery a killed process held ---------------------------------------------------------------------------


def held_then(world, switch, sig: int, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``gateway send <blood count> --to 涪陵 --now`` in a process of its own, while 涪陵 holds the request
    unanswered; then ``sig`` to that process. (what it wrote, its pid)"""
    tj_gw = world.gateways["tongjiang"]
    bundle_id = blood_count(world)
    switch.mode = "hold"
    proc = subprocess.Popen([GATEWAY, "send", bundle_id, "--to", FL, "--now", *args], env=env_of(tj_gw),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert switch.arrived.wait(60), "the delivery never reached 涪陵"
        assert tj_gw.pipeline.exchange.outbox.get(1).status == "delivering"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    switch.release.set()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def test_a_delivery_a_killed_sender_held_is_shown_and_tried_again_at_once(world, switch) -> None:
    tj_gw = world.gateways["tongjiang"]
    tj = tj_gw.pipeline.exchange
    _, pid = held_then(world, switch, signal.SIGKILL)
    row = tj.outbox.get(1)
    assert row.status == "delivering" and row.lease_until is not None
    assert row.lease_until - time.time() > 30  # its lease has a long way to go
    shown = command(tj_gw, "outbox", "show", "1").stdout
    assert f":{pid} since " in shown and "gone" in shown, shown
    listed = command(tj_gw, "outbox", "list").stdout
    assert f":{pid} since " in listed and "gone" in listed, listed
    switch.mode = "forward"
    started = time.monotonic()
    assert tj.deliver() == {"delivered": 1, "retry": 0, "dead": 0}
    assert time.monotonic() - started < 20
    assert tj.outbox.get(1).attempts == 1


def background_of(session: int) -> int:
    """The pid of the background part of the `gateway serve` whose session is ``session``."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getsid(int(proc.name)) == session \
                    and b"--part\0background\0" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError("no background part")


@pytest.mark.slow
def test_a_delivery_the_killed_background_process_held_goes_at_once_after_its_restart(world, switch) -> None:
    """`gateway serve` delivers in its background process; killed with SIGKILL mid-delivery, it is started again
    by the supervisor, which takes the delivery again at once (its lease had about 90 s to run)."""
    tj_gw = world.gateways["tongjiang"]
    tj = tj_gw.pipeline.exchange
    bundle_id = blood_count(world)
    switch.mode = "hold"
    port = free_port()
    serve = subprocess.Popen([GATEWAY, "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True,
                             env={**env_of(tj_gw), "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0",
                                  "GATEWAY_WORKERS": "1", "GATEWAY_DELIVERY_INTERVAL": "1"})
    try:
        wait_port(port)
        queued = command(tj_gw, "send", bundle_id, "--to", FL)
        assert queued.returncode == 0 and "queued as outbox #1" in queued.stdout, queued.stderr
        assert switch.arrived.wait(60), "the delivery never reached 涪陵"
        row = tj.outbox.get(1)
        assert row.status == "delivering" and row.lease_until - time.time() > 30
        os.kill(background_of(serve.pid), signal.SIGKILL)
        switch.mode = "forward"
        switch.release.set()
        deadline = time.monotonic() + 40
        while tj.outbox.get(1).status != "delivered" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tj.outbox.get(1).status == "delivered", command(tj_gw, "outbox", "show", "1").stdout
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            _, err = serve.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            _, err = serve.communicate()
    assert b"Traceback" not in err, err.decode("utf-8", "replace")[-3000:]


# -- 3. Ctrl-C on `gateway send --now` ------------------------------------------------------------------------------


def test_ctrl_c_on_send_now_gives_the_delivery_back(world, switch, clock) -> None:
    tj_gw = world.gateways["tongjiang"]
    tj = tj_gw.pipeline.exchange
    done, _ = held_then(world, switch, signal.SIGINT)
    assert "Traceback" not in done.stderr, done.stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if "interrupted" in line]
    assert len(said) == 1 and "outbox #1" in said[0] and "due now" in said[0], done.stdout + done.stderr
    assert done.returncode != 0
    row = tj.outbox.get(1)
    assert row.status == "pending" and row.lease_until is None and row.attempts == 0
    assert row.next_attempt_at <= time.time() + 1
    switch.mode = "forward"
    clock.advance(seconds=30)  # (this process's clock: set when the test began, behind the command's)
    assert tj.deliver() == {"delivered": 1, "retry": 0, "dead": 0}


# -- 4. an operator's retry keeps the attempts ----------------------------------------------------------------------


def test_retry_and_replay_keep_the_attempts_made(world, switch, clock) -> None:
    tj_gw = world.gateways["tongjiang"]
    tj = tj_gw.pipeline.exchange
    row = tj.push(blood_count(world), FL)
    switch.mode = "down"
    tj.outbox.max_attempts = 2
    for _ in range(2):
        tj.deliver()
        clock.advance(hours=2)
    assert tj.outbox.get(row).status == "dead"
    retried = command(tj_gw, "outbox", "retry", str(row))
    assert retried.returncode == 0, retried.stderr
    shown = command(tj_gw, "outbox", "show", str(row)).stdout
    assert "attempts 0 (2 in all: 2 before it was put back)" in shown, shown  # a fresh budget; the two made kept
    entry = tj.outbox.get(row)
    assert entry.status == "pending" and entry.total_attempts == 2
    switch.mode = "forward"
    assert tj.deliver()["delivered"] == 1
    entry = tj.outbox.get(row)
    assert entry.status == "delivered" and entry.total_attempts == 3
    shown = command(tj_gw, "outbox", "show", str(row)).stdout
    assert "3 in all" in shown, shown
    assert command(tj_gw, "outbox", "replay", str(row)).returncode == 0
    assert tj.outbox.get(row).total_attempts == 3
    assert tj.deliver()["delivered"] == 1
    assert tj.outbox.get(row).total_attempts == 4
    assert "4 in all" in command(tj_gw, "outbox", "list").stdout
