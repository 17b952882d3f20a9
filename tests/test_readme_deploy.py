"""The README's "Running a member gateway", run as written: its ``sh`` blocks, in order, in bash.

Everything happens in a temporary prefix on loopback: the variables of the first block (``GW`` and the four
ports) are the only thing changed. Two real ``gateway serve`` processes start in the background, a real HL7 v2
message goes in by MLLP (python-hl7's ``mllp_send``), a signed report crosses from one member to the other, the
auditor reads the log, a renewed snapshot is picked up by the running gateways, and the last block stops them.
A step of the README that no longer works fails this test, so the README and the product cannot drift.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gateway.demo import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Running a member gateway"
BIN = str(Path(sys.executable).parent)


def section_blocks(text: str) -> list[str]:
    """The ``sh`` blocks of the README section on running a member gateway, in order."""
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    body = text[start:end if end >= 0 else len(text)]
    return re.findall(r"^```sh\n(.*?)^```$", body, flags=re.S | re.M)


def with_variables(block: str, values: dict[str, str]) -> str:
    """``block`` with each ``NAME=value`` assignment of ``values`` replaced; every one must be there once."""
    for name, value in values.items():
        block, count = re.subn(rf"(?<![\w$]){name}=\S+", f"{name}={value}", block)
        assert count == 1, f"the README's first block no longer assigns {name} once"
    return block


def applied_version(database: Path) -> int:
    """The highest registry snapshot version a gateway's database says it applied."""
    with sqlite3.connect(database, timeout=10) as conn:
        return int(conn.execute("SELECT max(version) FROM registry_applied").fetchone()[0] or 0)


def stop_group(proc: subprocess.Popen[str]) -> None:
    """End whatever the script left running (it runs in a session of its own)."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def run(script: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"the README's steps took longer than {timeout} s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_section_has_the_steps() -> None:
    blocks = section_blocks(README.read_text(encoding="utf-8"))
    joined = "\n".join(blocks)
    for step in ("registry init-authority", "keys init", "registry issue-cert", "registry template",
                 "registry build", "users add", " serve ", "mllp_send", " send ", "audit verify", "kill "):
        assert step in joined, f"the README no longer shows {step.strip()!r}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's steps use curl")
def in_force(base: str) -> int | None:
    """The registry snapshot version a served gateway has in force, as its /health says (the signed snapshot itself
    is for its accounts: it carries the physicians' 身份证号)."""
    detail = requests.get(f"{base}/health", timeout=10).json()["checks"].get("registry", {}).get("detail", "")
    found = re.match(r"registry snapshot (\d+) ", detail)
    return int(found.group(1)) if found else None


def test_readme_deployment_runs_as_written(tmp_path: Path) -> None:
    blocks = section_blocks(README.read_text(encoding="utf-8"))
    gw = tmp_path / "gw"
    ports = {name: str(free_port()) for name in ("TJ_HTTP", "TJ_MLLP", "FL_HTTP", "FL_MLLP")}
    blocks[0] = with_variables(blocks[0], {"GW": str(gw), **ports})
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "GATEWAY_LOG_LEVEL": "WARNING",
           "GATEWAY_WORKERS": "1", "GATEWAY_DELIVERY_INTERVAL": "1"}
    for name in [k for k in env if k.startswith("GATEWAY_") and k not in ("GATEWAY_LOG_LEVEL", "GATEWAY_WORKERS",
                                                                          "GATEWAY_DELIVERY_INTERVAL")]:
        del env[name]  # the README's configuration files say everything else

    *steps, stop = blocks
    result = run("\n".join(steps), tmp_path, env, timeout=150)
    try:
        assert result.returncode == 0, f"a README step failed:\n{result.stdout}\n{result.stderr}"
        out = result.stdout
        # the keys are private to their owner
        for key in (gw / "authority" / "authority.key.pem", gw / "tongjiang" / "keys" / "12511921MB0001003C.key.pem",
                    gw / "fuling" / "keys" / "12500102MB0002006J.key.pem"):
            assert key.stat().st_mode & 0o077 == 0, key
        assert "MSA|AA|TJ2611200001" in out  # the MLLP ACK
        assert '"resourceType":"Bundle"' in out and "DiagnosticReport" in out  # the LIS account reads it back
        assert "outbox #1: delivered" in out  # the report crossed to 涪陵 with a verified receipt
        assert "EX-L001" in out  # and 涪陵 decided the catalogue item
        assert "AuditEvent" in out and "互认率" in out  # the auditor's reads over HTTP
        assert re.search(r"^OK: \d+ entries", out, flags=re.M), out  # gateway audit verify
        fl_db = gw / "fuling" / "data" / "gateway.db"
        with sqlite3.connect(fl_db) as conn:
            received = conn.execute("SELECT count(*) FROM signed_bundles WHERE direction = 'received'").fetchone()[0]
        assert received == 1
        # the renewed snapshot (version 2) is applied by the running gateway, without a restart, when it next
        # consults the registry: here a peer's request (refused, its assertion is no good) makes it look
        base = f"http://127.0.0.1:{ports['FL_HTTP']}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            requests.get(f"{base}/exchange/DiagnosticReport", params={"patient.identifier": "x"}, timeout=10,
                         headers={"Authorization": "Bearer not-an-assertion"})
            if in_force(base) == 2:
                break
            time.sleep(1)
        assert in_force(base) == 2
        assert applied_version(fl_db) == 2

        pids = [int((gw / m / "serve.pid").read_text()) for m in ("tongjiang", "fuling")]
        stopped = run(stop.replace('"$GW', f'"{gw}').replace("$GW", str(gw)), tmp_path, env, timeout=30)
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "a gateway did not stop on SIGTERM"
    finally:
        _stop_leftovers(gw)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a child that exited but was not reaped yet
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _stop_leftovers(gw: Path) -> None:
    """Stop the gateways the README started, if a failed step left them running."""
    for member in ("tongjiang", "fuling"):
        pid_file = gw / member / "serve.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _alive(pid):
                break
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
