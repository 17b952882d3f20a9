"""The shipped systemd units and node configuration (deploy/), run as written.

A unit's ``ExecStart`` and ``Environment`` are read from the file and run with only the install locations moved
into a temporary directory (``/opt/cyhr-gateway/venv/bin/gateway`` → this checkout's ``gateway``, ``/etc/cyhr-gateway``
→ a folder holding the example configuration with its paths filled in): the node starts on PostgreSQL, answers
``/health``, and stops cleanly on the unit's ``KillSignal`` within ``TimeoutStopSec``. The backup unit's command
makes a dump that ``pg_restore`` can read. ``systemd-analyze verify`` checks the units' syntax where it is installed.
"""
from __future__ import annotations

import configparser
import datetime as _dt
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import wait_port
from gateway.demo import free_port
from gateway.demo.world import build_world

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GATEWAY = shutil.which("gateway") or str(Path(sys.executable).parent / "gateway")
CST = _dt.timezone(_dt.timedelta(hours=8))


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text(encoding="utf-8"))
    return parser


def environment(service: configparser.SectionProxy) -> dict[str, str]:
    """``Environment=`` lines (several are joined by configparser with newlines)."""
    env: dict[str, str] = {}
    for line in service.get("Environment", "").splitlines():
        for word in shlex.split(line):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def test_units_parse_with_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    for path in (DEPLOY / "systemd").iterdir():
        copy = tmp_path / path.name
        copy.write_text(path.read_text(encoding="utf-8").replace("/opt/cyhr-gateway/venv/bin/gateway", GATEWAY),
                        encoding="utf-8")
    result = subprocess.run([analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir())],
                            capture_output=True, text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if any(word in line for word in ("Unknown key", "Unknown section", "Failed to parse", "Invalid",
                                                 "bad-setting", "is not executable"))]
    assert problems == []


@pytest.mark.slow
def test_node_unit_and_example_configuration_run_as_written(tmp_path: Path, pg_url: str) -> None:
    service = unit("cyhr-gateway@.service")["Service"]
    instance = "node1"
    etc = tmp_path / "etc"
    http, mllp = free_port(), free_port()
    world = build_world(tmp_path / "world", lambda: _dt.datetime.now(CST), {"tongjiang": f"http://127.0.0.1:{http}"},
                        members=("tongjiang",))
    made = world.gateways["tongjiang"].settings
    for source, target in ((made.registry_snapshot, "registry/snapshot.json"),
                           (made.registry_authority, "registry/authority.cert.pem"),
                           (made.signing_key, "keys/12511921MB0001003C.key.pem"),
                           (made.signing_cert, "keys/12511921MB0001003C.cert.pem")):
        (etc / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, etc / target)
        (etc / target).chmod(0o600)
    config = (DEPLOY / "node.example.toml").read_text(encoding="utf-8")
    for old, new in (("/etc/cyhr-gateway", str(etc)), ("/var/lib/cyhr-gateway", str(tmp_path / "var")),
                     ("postgresql://cyhr_gateway@db.internal:5432/cyhr_gateway", pg_url),
                     ('"0.0.0.0"', '"127.0.0.1"'), ("http_port = 8080", f"http_port = {http}"),
                     ("mllp_port = 2575", f"mllp_port = {mllp}"),
                     ("https://gateway.tongjiang.example.invalid", f"http://127.0.0.1:{http}")):
        assert old in config, f"deploy/node.example.toml no longer holds {old!r}"
        config = config.replace(old, new)
    (etc / f"{instance}.toml").write_text(config, encoding="utf-8")

    def placed(text: str) -> str:
        return (text.replace("%i", instance).replace("/etc/cyhr-gateway", str(etc))
                .replace("/opt/cyhr-gateway/venv/bin/gateway", GATEWAY))

    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({k: placed(v) for k, v in environment(service).items()})
    command = shlex.split(placed(service["ExecStart"]))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_port(http, timeout=60)
        health: Any = None
        # the port is bound before the parts start: the first answer waits for a worker, longer on a busy machine
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                health = requests.get(f"http://127.0.0.1:{http}/health", timeout=30)
            except requests.RequestException:
                continue
            if health.status_code == 200:
                break
            time.sleep(0.5)
        assert health is not None and health.status_code == 200, health.text
        assert (tmp_path / "var" / instance).is_dir()
        os.kill(proc.pid, getattr(signal, service["KillSignal"]))
        status = proc.wait(timeout=float(service["TimeoutStopSec"]))
        output = proc.stdout.read().decode("utf-8", "replace") if proc.stdout else ""
        assert status == 0, output
        assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_backup_unit_makes_a_dump_pg_restore_reads(tmp_path: Path, pg_cluster: Any) -> None:
    service = unit("cyhr-gateway-backup.service")["Service"]
    url = pg_cluster.create_database("backup_source")
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('互认')")
    env = {**os.environ, **environment(service), "BACKUP_DIR": str(tmp_path / "backups"), "DATABASE": "backup_source",
           "PGHOST": "127.0.0.1", "PGPORT": str(pg_cluster.port), "PGUSER": "postgres",
           "PATH": f"{pg_cluster.bindir}:{os.environ['PATH']}"}
    command = shlex.split(service["ExecStart"].replace("%%", "%"))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    dumps = list((tmp_path / "backups").glob("backup_source-*.dump"))
    assert len(dumps) == 1
    assert dumps[0].stat().st_mode & 0o077 == 0  # patient data: the postgres user's alone
    # the folder is made by root before (the postgres user cannot make it under Debian's /var/backups), its own
    assert service["UMask"] == "0077"
    assert service["ExecStartPre"].startswith("+/usr/bin/install -d -o postgres -g postgres -m 0700 ${BACKUP_DIR}")
    listing = subprocess.run([str(pg_cluster.bindir / "pg_restore"), "--list", str(dumps[0])],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "TABLE public kept" in listing.stdout
