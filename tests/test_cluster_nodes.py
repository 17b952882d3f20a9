"""Three `gateway serve` nodes of one member on one PostgreSQL database, one of them killed mid-stream.

What a regional platform runs: several nodes behind a TCP/HTTP load balancer, one database. The test plays
the load balancer's part (each LIS connection goes to one node; a connection that breaks is opened again on
another node) with python-hl7's MLLP client, and a second member (涪陵, its own gateway on SQLite) receives the
reports 通江's nodes deliver. Mid-stream one node is killed with SIGKILL — the supervisor and every process it
started, as a power cut of that host would — and started again. Then:

- every message a node acknowledged is stored exactly once, with all its reports, and nothing is left half done;
- every queued delivery was delivered and 涪陵 stored each Bundle once. A front proxy before 涪陵 counts the
  requests: each is an attempt the outbox counts (a timed-out one is sent again), but for a delivery the killed
  node had in flight, which another node sends again once its lease ends (at-least-once on the wire, answered
  from 涪陵's first receipt), and only those may be uncounted.
- ``gateway audit verify`` accepts the one audit chain all three nodes appended to.

``GATEWAY_CLUSTER_MESSAGES`` sets how many messages are sent (600 by default, which keeps the suite short; the
kill comes after a third of them are acknowledged, mid-stream either way).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hl7.client
import pytest

from conftest import wait_port
from gateway.bench.inputs import oru_batch
from gateway.demo import MEMBERS, free_port
from gateway.demo.world import build_world

GATEWAY = shutil.which("gateway") or str(Path(sys.executable).parent / "gateway")
CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc
MESSAGES = int(os.environ.get("GATEWAY_CLUSTER_MESSAGES", "600"))
DELIVERIES = 60


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Node:
    """One `gateway serve` process group."""

    def __init__(self, name: str, env: dict[str, str], http: int, mllp: int, log: Path) -> None:
        self.name, self.env, self.http, self.mllp, self.log = name, env, http, mllp, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.spawn()
        self.ready()

    def spawn(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([GATEWAY, "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def ready(self) -> None:
        wait_port(self.http, timeout=60)
        wait_port(self.mllp, timeout=60)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


class CountingProxy(http.server.ThreadingHTTPServer):
    """涪陵's front: forwards every request to its gateway and counts the Bundle pushes by their bytes."""

    def __init__(self, port: int, target: str) -> None:
        self.target = target
        self.pushes: dict[str, int] = {}
        self.count_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Forward)


class _Forward(http.server.BaseHTTPRequestHandler):
    server: CountingProxy

    def _forward(self, method: str) -> None:
        import requests

        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if method == "POST" and self.path.startswith("/exchange/bundles"):
            with self.server.count_lock:
                key = hashlib.sha256(body).hexdigest()
                self.server.pushes[key] = self.server.pushes.get(key, 0) + 1
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        got = requests.request(method, self.server.target + self.path, data=body, headers=headers, timeout=60)
        self.send_response(got.status_code)
        for name, value in got.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(got.content)))
        self.end_headers()
        self.wfile.write(got.content)

    def do_POST(self) -> None:
        self._forward("POST")

    def do_GET(self) -> None:
        self._forward("GET")

    def log_message(self, *args: Any) -> None:
        pass


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAY, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_three_nodes_one_database_one_killed(tmp_path: Path, pg_cluster: Any) -> None:
    import psycopg

    url = pg_cluster.create_database("cluster_tongjiang")
    ports = {"tongjiang": free_port(), "fuling": free_port()}  # 通江's public port is not used; 涪陵's is the proxy
    fl_http = free_port()
    clock = lambda: _dt.datetime.now(CST)  # noqa: E731 - the processes run on the machine's clock
    world = build_world(tmp_path / "world", clock, {k: f"http://127.0.0.1:{p}" for k, p in ports.items()},
                        members=("tongjiang", "fuling"))
    tj = world.gateways["tongjiang"].settings
    fl = world.gateways["fuling"].settings
    base = {**os.environ, "GATEWAY_ISSUER_USCC": tj.issuer_uscc, "GATEWAY_ISSUER_NAME": tj.issuer_name,
            "GATEWAY_REGISTRY_SNAPSHOT": tj.registry_snapshot, "GATEWAY_REGISTRY_AUTHORITY": tj.registry_authority,
            "GATEWAY_SIGNING_KEY": tj.signing_key, "GATEWAY_SIGNING_CERT": tj.signing_cert,
            "GATEWAY_PUBLIC_URL": tj.public_url, "GATEWAY_DATABASE": url, "GATEWAY_WORKERS": "1",
            "GATEWAY_MLLP_WORKERS": "1", "GATEWAY_DELIVERY_INTERVAL": "1", "GATEWAY_DELIVERY_CONCURRENCY": "2",
            "GATEWAY_DELIVERY_TIMEOUT": "5",
            "GATEWAY_LOG_LEVEL": "WARNING"}
    nodes = []
    for i in range(3):
        http, mllp = free_port(), free_port()
        env = {**base, "GATEWAY_DATA_DIR": str(tmp_path / f"node{i + 1}"), "GATEWAY_HTTP_PORT": str(http),
               "GATEWAY_MLLP_PORT": str(mllp)}
        nodes.append(Node(f"node{i + 1}", env, http, mllp, tmp_path / f"node{i + 1}.log"))
    fl_env = {**os.environ, "GATEWAY_DATA_DIR": fl.data_dir, "GATEWAY_ISSUER_USCC": fl.issuer_uscc,
              "GATEWAY_ISSUER_NAME": fl.issuer_name, "GATEWAY_REGISTRY_SNAPSHOT": fl.registry_snapshot,
              "GATEWAY_REGISTRY_AUTHORITY": fl.registry_authority, "GATEWAY_SIGNING_KEY": fl.signing_key,
              "GATEWAY_SIGNING_CERT": fl.signing_cert, "GATEWAY_PUBLIC_URL": fl.public_url,
              "GATEWAY_HTTP_PORT": str(fl_http), "GATEWAY_MLLP_PORT": str(free_port()),
              "GATEWAY_WORKERS": "1", "GATEWAY_LOG_LEVEL": "WARNING"}
    receiver = Node("fuling", fl_env, fl_http, int(fl_env["GATEWAY_MLLP_PORT"]), tmp_path / "fuling.log")
    proxy = CountingProxy(ports["fuling"], f"http://127.0.0.1:{fl_http}")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()

    messages = oru_batch(MESSAGES, seed=31)
    acked: dict[str, bytes] = {}
    answers: dict[str, bytes] = {}  # every acknowledgement other than AA, whole
    lock = threading.Lock()
    killed = threading.Event()
    try:
        for node in [*nodes, receiver]:  # (started side by side, as a platform's hosts start)
            node.spawn()
        for node in [*nodes, receiver]:
            node.ready()

        def lis(number: int, batch: list[bytes]) -> None:
            """One LIS: its messages in order, over one connection; a broken connection goes to the next node."""
            target = number
            client: hl7.client.MLLPClient | None = None
            for message in batch:
                control = message.split(b"\r", 1)[0].split(b"|")[9].decode()
                for _ in range(200):
                    try:
                        if client is None:
                            node = nodes[target % 3]
                            client = hl7.client.MLLPClient("127.0.0.1", node.mllp, encoding="utf-8")
                        ack = client.send_message(message)
                        if b"MSA|" not in ack:
                            raise ConnectionError("no acknowledgement")
                        with lock:
                            acked[control] = ack.split(b"MSA|", 1)[1][:2]
                            if acked[control] != b"AA":
                                answers[control] = ack
                        break
                    except (OSError, ConnectionError, IndexError):
                        if client is not None:
                            client.close()
                        client, target = None, target + 1
                        time.sleep(0.2)
                else:
                    raise AssertionError(f"message {control} was never acknowledged")
            if client is not None:
                client.close()

        senders = [threading.Thread(target=lis, args=(i, messages[i::6]), daemon=True) for i in range(6)]
        for thread in senders:
            thread.start()
        wait_for(lambda: len(acked) >= MESSAGES // 3, timeout=600, what="a third of the messages")

        # deliveries queued to 涪陵 while the stream goes on; the background loops of all three nodes work them
        from gateway.config import load_settings
        from gateway.pipeline import Pipeline

        here = Pipeline(load_settings(environ={k: v for k, v in base.items() if k.startswith("GATEWAY_")},
                                      overrides={"data_dir": str(tmp_path / "cli")}))
        with psycopg.connect(url) as conn:
            bundles = [r[0] for r in conn.execute(
                "SELECT bundle_id FROM messages WHERE status = 'stored' AND bundle_id IS NOT NULL"
                " ORDER BY id LIMIT %s", [DELIVERIES])]
        assert len(bundles) == DELIVERIES
        assert here.exchange is not None
        rows = [here.exchange.push(bundle, FL) for bundle in bundles]
        here.close()

        time.sleep(1.0)
        nodes[1].kill()  # the supervisor and all its processes, mid-stream and mid-delivery
        killed.set()
        time.sleep(2.0)
        nodes[1].start()

        for thread in senders:
            thread.join(timeout=900)
            assert not thread.is_alive(), "a sender did not finish"
        assert len(acked) == MESSAGES

        def settled() -> bool:
            with psycopg.connect(url) as conn:
                open_messages = conn.execute(
                    "SELECT count(*) FROM messages WHERE status IN ('received', 'queued')").fetchone()[0]
                open_deliveries = conn.execute(
                    "SELECT count(*) FROM outbox WHERE status NOT IN ('delivered', 'dead')").fetchone()[0]
            return open_messages == 0 and open_deliveries == 0
        wait_for(settled, timeout=300, what="every message worked and every delivery made")

        with psycopg.connect(url) as conn:
            stored = dict(conn.execute(
                "SELECT message_id, count(*) FROM messages GROUP BY message_id").fetchall())
            statuses = dict(conn.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall())
            outbox = conn.execute("SELECT id, status FROM outbox ORDER BY id").fetchall()
        assert set(stored) == set(acked), "a message was acknowledged but not stored, or stored but never answered"
        assert set(stored.values()) == {1}
        assert statuses == {"stored": MESSAGES}, statuses
        assert all(ack == b"AA" for ack in acked.values()), answers
        assert [row for row in outbox if row[1] != "delivered"] == []
        assert sorted(r[0] for r in outbox) == sorted(rows)

        # 涪陵 stored every Bundle once; only deliveries in flight on the killed node may have been sent twice
        import sqlite3

        with sqlite3.connect(Path(fl.data_dir) / "gateway.db") as conn:
            received = conn.execute("SELECT count(*), count(DISTINCT message_id) FROM messages"
                                    " WHERE channel = 'exchange' AND status = 'stored'").fetchone()
        assert received == (DELIVERIES, DELIVERIES), received
        assert len(proxy.pushes) == DELIVERIES
        # each push 涪陵 saw is an attempt its outbox row counts (a slow answer past the delivery timeout is one,
        # sent again after its back-off), but for the attempts the killed node had in flight, which it never
        # recorded: at most one a delivery, and no more than one node sends to one member at a time
        with psycopg.connect(url) as conn:
            attempts = dict(conn.execute("SELECT payload_sha256, attempts FROM outbox").fetchall())
        unrecorded = {key: n - attempts[key] for key, n in proxy.pushes.items() if n != attempts.get(key)}
        assert set(unrecorded.values()) <= {1}, (unrecorded, attempts)
        assert len(unrecorded) <= int(base["GATEWAY_DELIVERY_CONCURRENCY"]), unrecorded

        # every report of every message, once
        added = cli(nodes[0].env, "users", "add", "cluster-check", "--role", "submitter")
        token = added.stdout.strip().splitlines()[-1]
        import requests

        got = requests.get(f"http://127.0.0.1:{nodes[2].http}/fhir/DiagnosticReport",
                           params={"_summary": "count"}, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert got.status_code == 200 and got.json()["total"] == 3 * MESSAGES

        verified = cli(nodes[0].env, "audit", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "OK" in verified.stdout
    finally:
        for node in [*nodes, receiver]:
            node.stop()
        proxy.shutdown()
