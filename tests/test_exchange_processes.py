"""Two member gateways as real `gateway serve` processes on loopback: push, outage, operator commands."""
from __future__ import annotations

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
from gateway.demo import DEMO_START, MEMBERS, free_port
from gateway.demo.world import build_world

BIN = Path(sys.executable).parent
GATEWAY = shutil.which("gateway") or str(BIN / "gateway")
LIS = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"


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
        self.env = {**os.environ, "GATEWAY_DATA_DIR": s.data_dir, "GATEWAY_ISSUER_USCC": s.issuer_uscc,
                    "GATEWAY_ISSUER_NAME": s.issuer_name, "GATEWAY_REGISTRY_SNAPSHOT": s.registry_snapshot,
                    "GATEWAY_REGISTRY_AUTHORITY": s.registry_authority, "GATEWAY_SIGNING_KEY": s.signing_key,
                    "GATEWAY_SIGNING_CERT": s.signing_cert, "GATEWAY_PUBLIC_URL": s.public_url,
                    "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0", "GATEWAY_WORKERS": "1",
                    "GATEWAY_DELIVERY_INTERVAL": "1", "GATEWAY_LOG_LEVEL": "WARNING"}
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
        return requests.get(f"http://127.0.0.1:{self.port}{path}", params=params, timeout=30,
                            headers={"Authorization": f"Bearer {self.gw.token}"}).json()


@pytest.mark.slow
def test_push_between_serve_processes_survives_a_receiver_outage(tmp_path: Path) -> None:
    ports = {"tongjiang": free_port(), "fuling": free_port()}
    world = build_world(tmp_path, lambda: DEMO_START, {k: f"http://127.0.0.1:{p}" for k, p in ports.items()},
                        members=("tongjiang", "fuling"))
    for gw in world.gateways.values():
        gw.pipeline.close()
    tj, fl = Member(world.gateways["tongjiang"], ports["tongjiang"]), Member(world.gateways["fuling"], ports["fuling"])
    errors = b""
    tj.start()
    try:
        resp = requests.post(f"http://127.0.0.1:{tj.port}/ingest/hl7v2", data=LIS.read_bytes(), timeout=30,
                             headers={"Authorization": f"Bearer {tj.gw.token}"})
        assert resp.status_code == 422  # two of the five messages are refused; the others are stored
        shown = tj.cli("messages", "show", "1").stdout
        bundle_id = shown.split("bundle ")[1].split()[0]
        # the receiver is down: the push waits in the outbox
        sent = tj.cli("send", bundle_id, "--to", MEMBERS["fuling"].uscc)
        assert sent.returncode == 0 and "queued as outbox #1" in sent.stdout, sent.stderr
        wait_for(lambda: "cannot reach the receiver" in tj.cli("outbox", "list").stdout, what="a failed attempt")
        fl.start()
        # back up: the background loop of 通江's `gateway serve` delivers it
        wait_for(lambda: "delivered" in tj.cli("outbox", "list").stdout, timeout=60, what="delivery")
        shown = tj.cli("outbox", "show", "1").stdout
        assert '"receiver":"12500102MB0002006J"' in shown and '"recognized":4' in shown
        found = fl.get("/fhir/DiagnosticReport", **{"patient.identifier": "511921196612120011"})
        assert found["total"] == 1
        # the operator sends it again: the receiver keeps one copy and answers with the same receipt
        assert tj.cli("outbox", "replay", "1").returncode == 0
        wait_for(lambda: "delivered" in tj.cli("outbox", "list").stdout, timeout=30, what="replay")
        assert fl.get("/fhir/DiagnosticReport", **{"patient.identifier": "511921196612120011"})["total"] == 1
        assert fl.cli("audit", "verify").returncode == 0
    finally:
        errors += tj.stop() if tj.proc else b""
        errors += fl.stop() if fl.proc else b""
    assert b"Traceback" not in errors, errors.decode("utf-8", "replace")[-3000:]
