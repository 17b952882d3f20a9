"""Two member gateways as real `gateway serve` processes on loopback: push through an outage, failure modes
over real HTTP, a newly published snapshot revoking a member, and the operator commands.

The gateways run on the machine's clock (their certificates and snapshot are issued now), so nothing
here depends on the day the tests run except the recognition outcomes, which are not asserted here
(tests/test_exchange.py decides them at a fixed time).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import wait_port
from gateway.demo import MEMBERS, free_port
from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.store.exchange import unpacked

BIN = Path(sys.executable).parent
GATEWAY = shutil.which("gateway") or str(BIN / "gateway")
LIS = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"
CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc


def wait_for(check, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Member:
    def __init__(self, gw, port: int) -> None:
        self.gw, self.port = gw, port
        s = gw.settings
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "GATEWAY_DATA_DIR": s.data_dir, "GATEWAY_ISSUER_USCC": s.issuer_uscc,
                    "GATEWAY_ISSUER_NAME": s.issuer_name, "GATEWAY_REGISTRY_SNAPSHOT": s.registry_snapshot,
                    "GATEWAY_REGISTRY_AUTHORITY": s.registry_authority, "GATEWAY_SIGNING_KEY": s.signing_key,
                    "GATEWAY_SIGNING_CERT": s.signing_cert, "GATEWAY_PUBLIC_URL": s.public_url,
                    "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0", "GATEWAY_WORKERS": "1",
                    "GATEWAY_DELIVERY_INTERVAL": "1", "GATEWAY_LOG_LEVEL": "WARNING",
                    **({"GATEWAY_DATABASE": s.database} if s.database else {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([GATEWAY, "serve"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_port(self.port)

    def stop(self) -> bytes:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
        self.proc = None
        return err

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([GATEWAY, *args], env=self.env, capture_output=True, text=True, timeout=60)

    def get(self, path: str, **params: str) -> dict:
        return requests.get(f"{self.url}{path}", params=params, timeout=30,
                            headers={"Authorization": f"Bearer {self.gw.token}"}).json()

    def outbox(self, row: int) -> str:
        return self.cli("outbox", "show", str(row)).stdout


@pytest.mark.slow
def test_exchange_between_serve_processes(tmp_path: Path, member_database) -> None:
    ports = {"tongjiang": free_port(), "fuling": free_port()}
    clock = lambda: _dt.datetime.now(CST)  # noqa: E731 - the processes run on the same clock
    world = build_world(tmp_path, clock, {k: f"http://127.0.0.1:{p}" for k, p in ports.items()},
                        members=("tongjiang", "fuling"), database=member_database)
    tj, fl = Member(world.gateways["tongjiang"], ports["tongjiang"]), Member(world.gateways["fuling"], ports["fuling"])
    sender = world.gateways["tongjiang"].pipeline.exchange  # 通江's keys, to forge requests with below

    def row(n: int):  # read in this process while the gateways run (cheaper to poll than a command)
        return sender.outbox.get(n)
    errors = b""
    tj.start()
    try:
        resp = requests.post(f"{tj.url}/ingest/hl7v2", data=LIS.read_bytes(), timeout=30,
                             headers={"Authorization": f"Bearer {tj.gw.token}"})
        assert resp.status_code == 422  # two of the five messages are refused; the others are stored
        bundle_id = tj.cli("messages", "show", "1").stdout.split("bundle ")[1].split()[0]

        # 1. the receiver is down: the push waits in the outbox, then goes when it is back
        sent = tj.cli("send", bundle_id, "--to", FL)
        assert sent.returncode == 0 and "queued as outbox #1" in sent.stdout, sent.stderr
        wait_for(lambda: row(1).attempts >= 1, what="a failed attempt")
        assert "cannot reach the receiver" in tj.cli("outbox", "list").stdout
        fl.start()
        wait_for(lambda: row(1).status == "delivered", timeout=60, what="delivery")
        assert "#1     delivered" in tj.cli("outbox", "list").stdout
        receipt = json.loads(tj.outbox(1).split("receipt, signed by the receiver: ", 1)[1])
        assert receipt["receiver"] == FL and receipt["issuer"] == TJ and sum(receipt["decisions"].values()) == 4
        assert fl.get("/fhir/DiagnosticReport", **{"patient.identifier": "511921196612120011"})["total"] == 1

        # 2. sent again by the operator: stored once, the same receipt
        assert tj.cli("outbox", "replay", "1").returncode == 0
        wait_for(lambda: row(1).status == "delivered", timeout=30, what="replay")
        assert "#1     delivered" in tj.cli("outbox", "list").stdout
        assert json.loads(tj.outbox(1).split("receipt, signed by the receiver: ", 1)[1]) == receipt
        assert fl.get("/fhir/DiagnosticReport", **{"patient.identifier": "511921196612120011"})["total"] == 1

        # 3. failure modes over real HTTP
        signed = unpacked(sender.db.execute("SELECT text FROM signed_bundles WHERE bundle_id = ?",
                                            [bundle_id]).fetchone()[0])
        url = f"{fl.url}/exchange/bundles"
        tampered = signed.replace(b'"value":6.8', b'"value":5.8', 1)
        assert requests.post(url, data=tampered, headers=sender.assertion_for(url), timeout=30).status_code == 401
        headers = sender.assertion_for(url)
        assert requests.post(url, data=signed, headers=headers, timeout=30).status_code == 200  # a duplicate
        replayed = requests.post(url, data=signed, headers=headers, timeout=30)
        assert replayed.status_code == 401 and "replayed" in replayed.text
        assert requests.post(url, data=signed, timeout=30).status_code == 401  # no assertion at all

        # 4. the authority publishes snapshot v2 without 通江's certificate: 涪陵 applies it while running
        v2 = build_demo_registry(clock(), version=2, endpoints={TJ: tj.url, FL: fl.url}, drop_members=(TJ,),
                                 reuse=world.registry)
        Path(fl.gw.settings.registry_snapshot).write_text(v2.text(), encoding="utf-8")
        time.sleep(2.5)  # gateways look at the snapshot file every two seconds at most
        revoked = requests.post(url, data=signed, headers=sender.assertion_for(url), timeout=30)
        assert revoked.status_code == 403
        # and a push queued by 通江 now dies as a permanent refusal instead of retrying forever
        row2 = world.gateways["tongjiang"].pipeline.store.db.execute(
            "SELECT bundle_id FROM signed_bundles WHERE direction = 'issued' AND bundle_id <> ?",
            [bundle_id]).fetchone()[0]
        assert tj.cli("send", row2, "--to", FL).returncode == 0
        wait_for(lambda: row(2).status == "dead", timeout=30, what="dead")
        assert "dead" in tj.cli("outbox", "list", "--status", "dead").stdout
        assert "refused by the receiver" in tj.outbox(2)

        # 5. the receiver's audit log holds all of it, and verifies
        verified = fl.cli("audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        errors += tj.stop() if tj.proc else b""
        errors += fl.stop() if fl.proc else b""
    assert b"Traceback" not in errors, errors.decode("utf-8", "replace")[-3000:]
