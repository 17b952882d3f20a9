"""Slow and large clients against a real `gateway serve` on loopback: 200 connections trickling a byte at a time
do not delay anyone else; a request not received within http_read_timeout is answered 408 and closed; an idle
kept-alive connection is closed after http_idle_timeout; a 15 MB CDC export streams through a worker whose memory
grows by less than twice the body, and the answer is a bounded summary, not an echo of the input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import peak_during, wait_port
from gateway.bench.inputs import write_cdc_csv
from gateway.demo import free_port

GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
TONGJIANG = "12511921MB0001003C"
READ_TIMEOUT, IDLE_TIMEOUT = 6, 3


class Server:
    def __init__(self, port: int, token: str, proc: subprocess.Popen[bytes], data_dir: Path) -> None:
        self.port, self.token, self.proc, self.data_dir = port, token, proc, data_dir
        self.url = f"http://127.0.0.1:{port}"

    def worker_pid(self) -> int:
        parts = json.loads((self.data_dir / "gateway.db.run" / "serve.json").read_text())["parts"]
        return int(parts["http-1"]["pid"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("slow") / "gw"
    port = free_port()
    env = {**os.environ, "GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_ISSUER_USCC": TONGJIANG,
           "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0", "GATEWAY_WORKERS": "1", "GATEWAY_THREADS": "4",
           "GATEWAY_HTTP_READ_TIMEOUT": str(READ_TIMEOUT), "GATEWAY_HTTP_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
           "GATEWAY_LOG_LEVEL": "WARNING"}
    added = subprocess.run([GATEWAY, "users", "add", "lis", "--role", "submitter"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    srv = Server(port, token, proc, data_dir)
    try:
        wait_port(port)
        requests.get(f"{srv.url}/health", timeout=120)  # the worker has loaded the app
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode == 0, err.decode("utf-8", "replace")[-2000:]
        assert b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]


def _timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def test_trickling_clients_do_not_delay_others(server: Server) -> None:
    slow: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"P")  # then one byte at a time: "POST /ingest/hl7v2 HTTP/1.1" ...
            slow.append(sock)
        auth = {"Authorization": f"Bearer {server.token}"}
        took: list[float] = []
        rest = b"OST /ingest/hl7v2 HTTP/1.1\r\n"
        for second in range(5):
            for sock in slow:
                try:
                    sock.sendall(rest[second:second + 1])
                except OSError:
                    pass
            for _ in range(2):
                spent, response = _timed(lambda: requests.get(f"{server.url}/health", timeout=10))
                assert response.status_code == 200
                took.append(spent)
            spent, response = _timed(lambda: requests.get(f"{server.url}/fhir/Observation", headers=auth,
                                                          params={"_count": "1"}, timeout=10))
            assert response.status_code == 200
            took.append(spent)
            time.sleep(1)
        assert max(took) < 1.0, took
    finally:
        for sock in slow:
            sock.close()


def _read_all(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    sock.settimeout(limit)
    started, data = time.monotonic(), b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def test_a_request_never_completed_is_cut_after_the_read_timeout(server: Server) -> None:
    partial = socket.create_connection(("127.0.0.1", server.port))
    silent = socket.create_connection(("127.0.0.1", server.port))
    with partial, silent:
        partial.sendall(b"POST /ingest/hl7v2 HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\nMSH|")
        answer, after = _read_all(partial, READ_TIMEOUT + 10)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["resourceType"] == "OperationOutcome"
        assert READ_TIMEOUT - 1 <= after <= READ_TIMEOUT + 3
        _read_all(silent, 5)  # a client that sends nothing is closed too (by now: it would raise a timeout)


def test_an_idle_kept_alive_connection_is_closed(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        sock.settimeout(10)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        rest, after = _read_all(sock, IDLE_TIMEOUT + 10)
        assert after <= IDLE_TIMEOUT + 3


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process memory from /proc (Linux)")
def test_a_15_mb_export_streams_in_bounded_memory_and_gets_a_bounded_answer(server: Server, tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    write_cdc_csv(export, 3200)  # 400 exams of 8 rows; the chest X-ray findings are long free text
    lines = export.read_bytes().decode("utf-8").splitlines(keepends=True)
    pad = "，未见明显异常" * 1660
    body = (lines[0] + "".join(line.replace("未见尘肺样改变", "未见尘肺样改变" + pad) for line in lines[1:]))
    data = body.encode("utf-8")
    assert 14_000_000 < len(data) < 16_000_000
    pid = server.worker_pid()
    before = _rss_kib(pid)["VmRSS"]
    response, peak = peak_during(  # the worker's resident memory while it reads and works the export
        lambda: _rss_kib(pid)["VmRSS"],
        lambda: requests.post(f"{server.url}/ingest/cdc-csv", data=data, timeout=600,
                              headers={"Authorization": f"Bearer {server.token}", "Content-Type": "text/csv"}))
    assert response.status_code == 200, response.text[:1000]
    grown = peak - before
    assert grown * 1024 < 2 * len(data), f"the worker grew by {grown} KiB for a {len(data)} byte export"
    outcome = response.json()
    stored = [i for i in outcome["issue"] if ": stored (Bundle/" in i["diagnostics"]]
    assert stored and outcome["issue"][-1]["diagnostics"].startswith("400 unit(s) in all (stored 400)")
    assert len(response.content) < 400 * 4000, "a bounded summary per exam (here 8 warnings each)"
    assert pad not in response.text


def test_an_answer_never_echoes_a_huge_field(server: Server, tmp_path: Path) -> None:
    export = tmp_path / "one.csv"
    write_cdc_csv(export, 8)
    lines = export.read_bytes().decode("utf-8").splitlines(keepends=True)
    cells = lines[1].split(",")
    cells[11] = "X" * 3_000_000  # 体检类型: a value no export has
    data = (lines[0] + ",".join(cells) + "".join(lines[2:])).encode("utf-8")
    response = requests.post(f"{server.url}/ingest/cdc-csv", data=data, timeout=300,
                             headers={"Authorization": f"Bearer {server.token}", "Content-Type": "text/csv"})
    assert response.status_code in (400, 422), response.text[:1000]
    assert len(response.content) < 20_000
    assert response.json()["resourceType"] == "OperationOutcome"


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /ingest/cdc-csv HTTP/1.1\r\nHost: gw\r\nContent-Type: text/csv\r\n"
                     b"Content-Length: 17000000\r\n\r\n")
        answer, _ = _read_all(sock, 10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    issue = json.loads(body)["issue"][0]
    assert issue["code"] == "too-long" and "16777216" in issue["diagnostics"]
