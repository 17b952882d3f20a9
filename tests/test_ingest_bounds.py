"""The answer to an ingest request is bounded as a whole: past ``ISSUES_IN_ANSWER`` issues it only counts units by
status and names the range of their message records; a 15 MB CDC export of thousands of small exams streams
through a real worker whose memory grows by less than twice the body, and the answer stays small."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import peak_during, wait_port
from gateway.api import ingest
from gateway.bench.inputs import write_cdc_csv
from gateway.demo import free_port

GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
TONGJIANG = "12511921MB0001003C"


def _export(path: Path, rows: int, *, bad_ids: bool = False) -> bytes:
    """A CDC export of ``rows`` rows (8 per exam); with ``bad_ids`` every exam's 身份证号 is cut short (refused)."""
    write_cdc_csv(path, rows)
    data = path.read_bytes()
    if bad_ids:
        data = re.sub(rb"^(ZY\d+,[^,]*,)\d{17}[\dX]", rb"\g<1>123", data, flags=re.M)
    return data


def test_an_answer_lists_a_bounded_number_of_issues_then_counts(client: Any, monkeypatch: Any,
                                                                tmp_path: Path) -> None:
    monkeypatch.setattr(ingest, "ISSUES_IN_ANSWER", 5)
    data = _export(tmp_path / "bad.csv", 80, bad_ids=True)  # 10 exams, each refused with one issue
    answer = client.post("/ingest/cdc-csv", data=data, content_type="text/csv")
    assert answer.status_code == 422
    issues = answer.get_json()["issue"]
    assert len(issues) == 6
    assert all("身份证号" in i["diagnostics"] for i in issues[:5])
    last = issues[-1]["diagnostics"]
    first_id, last_id = (int(n) for n in re.search(r"messages (\d+) to (\d+)", last).groups())  # type: ignore
    assert last.startswith("10 unit(s) in all (refused 10); 5 more issue(s) not listed here")
    assert last_id - first_id == 9 and "`gateway messages list`" in last


def test_a_refused_exam_after_many_stored_ones_is_listed_first_and_the_account_is_an_error(
        client: Any, monkeypatch: Any, tmp_path: Path) -> None:
    """Thousands of exams stored fill an answer's room before the one refused near the end: listed first all the
    same, so a LIS reading the answer's errors finds the exam to correct, and the account of the rest says
    something was refused."""
    monkeypatch.setattr(ingest, "ISSUES_IN_ANSWER", 5)
    data = _export(tmp_path / "late.csv", 80)  # 10 exams, each stored
    rows = data.split(b"\n")
    rows[-2] = re.sub(rb"^(ZY\d+,[^,]*,)\d{17}[\dX]", rb"\g<1>123", rows[-2])  # the last exam's last row
    answer = client.post("/ingest/cdc-csv", data=b"\n".join(rows), content_type="text/csv")
    assert answer.status_code == 422
    issues = answer.get_json()["issue"]
    assert len(issues) == 6
    assert issues[0]["severity"] == "error" and "身份证号" in issues[0]["diagnostics"], issues[0]
    listed = [i["severity"] for i in issues[:5]]
    assert "information" in listed and listed == sorted(listed, key=lambda v: v != "error"), listed  # then stored ones
    assert issues[-1]["severity"] == "error"
    assert issues[-1]["diagnostics"].startswith("10 unit(s) in all (refused 1, stored 9); ")


def test_a_short_answer_is_listed_whole(client: Any, tmp_path: Path) -> None:
    data = _export(tmp_path / "bad.csv", 24, bad_ids=True)
    issues = client.post("/ingest/cdc-csv", data=data, content_type="text/csv").get_json()["issue"]
    assert len(issues) == 3 and not any("in all" in i["diagnostics"] for i in issues)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    data_dir = tmp_path_factory.mktemp("bounds") / "gw"
    port = free_port()
    env = {**os.environ, "GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_ISSUER_USCC": TONGJIANG,
           "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0", "GATEWAY_WORKERS": "1", "GATEWAY_THREADS": "2",
           "GATEWAY_LOG_LEVEL": "WARNING"}
    added = subprocess.run([GATEWAY, "users", "add", "lis", "--role", "submitter"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_port(port)
        requests.get(f"{url}/health", timeout=120)
        yield url, token, data_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode == 0, err.decode("utf-8", "replace")[-2000:]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process memory from /proc (Linux)")
def test_a_15_mb_export_of_small_exams_gets_a_small_answer_in_flat_memory(server: tuple[str, str, Path],
                                                                          tmp_path: Path) -> None:
    url, token, data_dir = server
    data = _export(tmp_path / "export.csv", 57_000, bad_ids=True)  # about 7,000 exams, each refused
    assert 14_000_000 < len(data) < 16_000_000
    exams = data.count(b"\n") // 8
    parts = json.loads((data_dir / "gateway.db.run" / "serve.json").read_text())["parts"]
    pid = int(parts["http-1"]["pid"])
    before = _rss_kib(pid)
    response, peak = peak_during(  # the worker's resident memory while it reads and works the export
        lambda: _rss_kib(pid),
        lambda: requests.post(f"{url}/ingest/cdc-csv", data=data, timeout=600,
                              headers={"Authorization": f"Bearer {token}", "Content-Type": "text/csv"}),
        every=0.05)
    assert response.status_code == 422, response.text[:1000]
    grown = peak - before
    assert grown * 1024 < 2 * len(data), f"the worker grew by {grown} KiB for a {len(data)} byte export"
    issues = response.json()["issue"]
    assert len(issues) == ingest.ISSUES_IN_ANSWER + 1
    assert issues[-1]["diagnostics"].startswith(f"{exams} unit(s) in all (refused {exams}); "
                                                f"{exams - ingest.ISSUES_IN_ANSWER} more issue(s) not listed")
    assert len(response.content) < 100_000
