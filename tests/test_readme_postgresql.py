"""The README's "Running a member on PostgreSQL, with several nodes", run as written.

Steps 1–5 of "Running a member gateway" make the member's keys, certificate and snapshot; then the PostgreSQL
section's ``sh`` blocks run in order in bash against a throwaway PostgreSQL cluster (its address and the node ports
are the only things changed): a database and its owner, two node configurations, ``gateway db upgrade``, two
``gateway serve`` nodes on one database, a result sent to node 1 over MLLP read back from node 2, ``gateway audit
verify``, and the stop.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import free_port
from test_readme_deploy import README, run, section_blocks, with_variables

SECTION = "## Running a member on PostgreSQL, with several nodes"
BIN = str(Path(sys.executable).parent)


def pg_blocks(text: str) -> list[str]:
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"^```sh\n(.*?)^```$", text[start:end], flags=re.S | re.M)


def test_section_has_the_steps() -> None:
    joined = "\n".join(pg_blocks(README.read_text(encoding="utf-8")))
    for step in ("createdb", "PGPASSFILE", 'database = "postgresql://', "db upgrade", " serve ", "mllp_send",
                 "audit verify", "kill "):
        assert step in joined, f"the README's PostgreSQL section no longer shows {step.strip()!r}"


@pytest.mark.slow
def test_readme_postgresql_runs_as_written(tmp_path: Path, pg_cluster: Any) -> None:
    text = README.read_text(encoding="utf-8")
    member = section_blocks(text)
    gw = tmp_path / "gw"
    ports = {name: str(free_port()) for name in ("TJ_HTTP", "TJ_MLLP", "FL_HTTP", "FL_MLLP")}
    member[0] = with_variables(member[0], {"GW": str(gw), **ports})
    setup = member[:5]  # authority, keys, certificates and snapshot: what a node's configuration names
    assert "issue-cert" in "\n".join(setup) and "snapshot.json" in "\n".join(setup)

    blocks = pg_blocks(text)
    nodes = {name: str(free_port()) for name in ("N1_HTTP", "N1_MLLP", "N2_HTTP", "N2_MLLP")}
    blocks[0] = with_variables(blocks[0], {"PGHOST": "127.0.0.1", "PGPORT": str(pg_cluster.port), **nodes})
    *steps, stop = blocks
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PG"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{pg_cluster.bindir}{os.pathsep}{os.environ.get('PATH', '')}",
                "GATEWAY_LOG_LEVEL": "WARNING", "GATEWAY_WORKERS": "1"})
    result = run("\n".join(setup + steps), tmp_path, env, timeout=180)
    try:
        assert result.returncode == 0, f"a README step failed:\n{result.stdout}\n{result.stderr}"
        out = result.stdout
        assert "(PostgreSQL 15" in out or "(PostgreSQL 1" in out  # gateway db upgrade / status name the engine
        assert re.search(r"^\s+core\s+layout \d+$", out, flags=re.M), out
        assert "MSA|AA|TJ2611200002" in out  # node 1 acknowledged the message
        assert '"total":1' in out.replace(" ", "")  # node 2 finds the report node 1 stored
        assert re.search(r"^OK: \d+ entries", out, flags=re.M), out
        assert (gw / "tongjiang" / "pgpass").stat().st_mode & 0o077 == 0
        assert "change-me-too" not in out + result.stderr + (gw / "tongjiang" / "node1.toml").read_text()
    finally:
        pids = [int(p.read_text()) for p in (gw / "tongjiang").glob("node*.pid")]
        stopped = run(stop.replace("$GW", str(gw)), tmp_path, env, timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(pid) for pid in pids), "a node did not stop on SIGTERM"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
