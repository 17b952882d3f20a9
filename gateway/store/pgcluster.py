"""A throwaway PostgreSQL cluster on a loopback port, for the test suite and ``gateway bench``.

``initdb`` and ``pg_ctl`` from the machine's PostgreSQL (Debian's
``postgresql`` package: ``/usr/lib/postgresql/<version>/bin``) make a cluster in
a temporary directory, started on 127.0.0.1 and a free port, with its socket in
that directory too, and trust authentication (nothing but this machine reaches a
loopback port, and the cluster is deleted when stopped). Run as root, the
server runs as the ``postgres`` user, since PostgreSQL refuses to run as root.

Not for production: a deployment uses the PostgreSQL its operators run
(``docs/operations.md``).
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["Cluster", "find_bindir", "ClusterError"]


class ClusterError(RuntimeError):
    """PostgreSQL is not installed here, or the cluster would not start."""


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's ``bin`` directory, or None."""
    override = os.environ.get("GATEWAY_PG_BINDIR")
    if override:
        return Path(override)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


#: Ports tried when the one picked is taken before PostgreSQL binds it.
_PORT_ATTEMPTS = 3


def _free_port() -> int:
    """A free loopback port: one the system picks, or one of ``GATEWAY_PG_PORTS`` (``29000-29999``) when set (a
    machine shared with other work, where each has its range)."""
    first, _, last = os.environ.get("GATEWAY_PG_PORTS", "").partition("-")
    candidates = [0]
    if first.strip().isdigit():
        low = int(first)
        high = int(last) if last.strip().isdigit() else low
        candidates = random.sample(range(low, high + 1), min(64, high - low + 1))
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise ClusterError(f"no free port in GATEWAY_PG_PORTS {os.environ.get('GATEWAY_PG_PORTS')}")


class Cluster:
    """``with Cluster() as pg: pg.url("name")`` — started on entry, stopped and deleted on exit."""

    def __init__(self, *, fast: bool = True, settings: dict[str, str] | None = None) -> None:
        self.bindir = find_bindir()
        if self.bindir is None:
            raise ClusterError("PostgreSQL is not installed (apt-get install postgresql)")
        self.fast = fast
        self.settings = dict(settings or {})
        self.port = 0
        self.dir: Path | None = None
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise ClusterError(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def start(self) -> "Cluster":
        self.dir = Path(tempfile.mkdtemp(prefix="cyhr-pg-"))
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        for attempt in range(_PORT_ATTEMPTS):
            # PostgreSQL binds the port itself, after it is picked here: another program may take it meanwhile
            self.port = _free_port()
            options = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                       "unix_socket_directories": str(self.dir), "max_connections": "200", "shared_buffers": "128MB"}
            if self.fast:  # a throwaway cluster: an OS crash may lose it; a killed client never does
                options.update({"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"})
            options.update(self.settings)
            opts = " ".join(f"-c {k}={v}" for k, v in options.items())
            try:
                self._run("pg_ctl", "-D", str(data), "-l", str(self.dir / "server.log"), "-o", opts, "-w", "-t",
                          "60", "start")
                return self
            except ClusterError:
                server_log = self.dir / "server.log"
                taken = server_log.exists() and "Address already in use" in server_log.read_text(
                    encoding="utf-8", errors="replace")
                if not taken or attempt == _PORT_ATTEMPTS - 1:
                    raise
                server_log.unlink()  # (the next attempt's log is its own)
        return self

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def url(self, database: str = "postgres", **query: str) -> str:
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}" + (f"?{tail}" if tail else "")

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
