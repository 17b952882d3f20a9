"""gateway demo: the embedded story runs end to end over loopback MLLP/HTTP and says what happened."""
from __future__ import annotations

import errno
import os
import signal
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import wait_port
from gateway.cli import cli
from gateway.demo import MEMBERS, free_port, run_demo

GATEWAY = shutil.which("gateway") or str(Path(sys.executable).parent / "gateway")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str], Path]:
    """The demo, run once into a folder it leaves behind."""
    lines: list[str] = []
    base = tmp_path_factory.mktemp("demo-dir") / "demo"
    figures = run_demo(str(base), echo=lines.append)
    return figures, lines, base


def test_demo_figures(demo_run: tuple[dict[str, Any], list[str], Path]) -> None:
    figures, lines, base = demo_run
    # 通江: blood count and liver panel stored, QC filtered, '高' in a numeric field and a bad 身份证号 refused,
    # and later the blood count's correction stored; 涪陵: GBK blood count stored, an ADT message rejected.
    assert figures["acks"] == {"TJ2611200001": "AA", "9001": "AA", "TJ2611200002": "AA", "TJ2611200004": "AE",
                               "TJ2611200003": "AE", "LIS20261121000731": "AA", "HIS20261121004411": "AR",
                               "TJ2611220101": "AA"}
    assert (figures["stored"], figures["refused"], figures["filtered"]) == (4, 3, 1)
    assert figures["cdc_status"] == 200
    # 涪陵 was down: both pushes waited, then were delivered after it came back
    assert figures["outage_retry"] == 2 and figures["delivered"] == 2
    # Checked by hand against the DEMO registry: the blood count and AST are recognised; ALT is not
    # (通江 failed EQA for ALT in 2026); the CDC exam items need review (the export names no 主检医师
    # identifier), and its conclusion is never recognised.
    assert figures["decisions"] == {
        "tongjiang:白细胞计数": "recognized", "tongjiang:红细胞计数": "recognized", "tongjiang:血红蛋白": "recognized",
        "tongjiang:血小板计数": "recognized", "tongjiang:天门冬氨酸氨基转移酶": "recognized",
        "tongjiang:丙氨酸氨基转移酶": "not-recognized",
        "sccdc:胸部X射线摄片": "needs-review", "sccdc:纯音听阈测试": "needs-review", "sccdc:白细胞计数": "needs-review",
        "sccdc:目前未见异常": "not-recognized",
    }
    assert figures["tampered_status"] == 401
    assert figures["lookup"] == 2
    # 移送: 涪陵 refers the ALT report to 四川省卫生健康委员会（演示）, whose gateway receives it and accepts it
    assert figures["referral"] == "accepted"

    # 邻水 was 二级甲等 until 2025-06-30, 三级乙等 since; 涪陵 (三级甲等) decides its chest CTs (direction
    # not-lower) as of the day each arrived: the one of 2025-06-20 was made while 二级, the one of 2025-07-20 while 三级.
    assert figures["levels"] == {"2025-06-20": {"outcome": "not-recognized", "direction": "failed"},
                                 "2025-07-20": {"outcome": "recognized", "direction": "passed"}}
    # 清溪 performed, 涪陵 read, signed and pushed: 通江 judges both by 涪陵 and recognises them on receipt.
    assert figures["remote_reading_delivered"] == 1
    assert figures["remote_reading"] == {
        "胸部CT平扫": {"outcome": "recognized", "reading-signature": "passed"},
        "常规十二导联心电图": {"outcome": "recognized", "reading-signature": "passed"}}
    # 渝安's 放射卫生防护检测报告 (report date 2026-11-12) crosses to 通江 under its 乙级 qualification DEMO-FWJ-500000-0007.
    assert figures["service_report_status"] == 200 and figures["service_report_delivered"] == 1
    assert figures["service_report"] == {"outcome": "recognized", "technical-service-qualification": "passed"}
    # 通江's correction of the blood count reaches 涪陵: its 4 decisions on the original are withdrawn, the
    # correction's 4 results recognised.
    assert figures["correction_delivered"] == 1 and figures["withdrawn"] == 4
    assert figures["correction"] == {"白细胞计数": "recognized", "红细胞计数": "recognized", "血红蛋白": "recognized",
                                     "血小板计数": "recognized"}

    # The auditor at 涪陵, by hand. Eligible (recognised or not, withdrawn decisions left out) = the correction's 4
    # + AST + ALT + 邻水's 2 CTs = 8; accepted = those recognised (4 + AST + the CT of 2025-07-20 = 6) minus the
    # platelet count the physician re-tests (the order recorded again on the corrected decision) = 5.
    assert figures["audit_ok"] is True and figures["rate"] == round(5 / 8, 4)
    # savings (DEMO fees, receiver 涪陵 in 50): WBC 3 + RBC 3 + HGB 3 + AST 5 + chest CT 160 元 = 174.00 元;
    # HR items: 通江's 5 marked results of the blood count and liver panel (ALT unmarked) + the CDC's 3 marked items
    # + 邻水's 2 marked CTs = 10, less the CDC's 白细胞计数: its local code XCG-WBC names CY-O007 血常规（职业健康检查）
    # and its LOINC 6690-2 names CY-L001/SC-L001 白细胞计数; DOMAIN §5.3 gives no precedence, so it gets no mark and
    # is decided against no item (needs-review, as before) = 9
    assert figures["savings_yuan"] == 174.0 and figures["hr_items"] == 9
    text = "\n".join(lines)
    assert "status at 重庆市涪陵中心医院（演示） now accepted" in text and "互认率 by alliance: 川渝 5/8" in text
    assert "节约费用 (savings) 174.00 元 for 5 accepted results (DEMO fees, illustrative)" in text
    assert "通江县人民医院（演示） 5 (四川HR 1, 川渝HR 5)" in text and "邻水县人民医院（演示） 2 (川渝HR 2)" in text
    assert "direction: a 三级甲等 receiver does not recognise a result issued while the issuer was 二级甲等 (2025-06-20)" \
        in text
    assert "direction: 三级乙等 issuer on 2025-07-20, 三级甲等 receiver" in text
    assert text.count("reading-signature: signed by the reading institution 12500102MB0002006J") == 2
    assert ("technical-service-qualification: 重庆渝安职业卫生技术服务有限公司（演示） answers for this report under 乙级 "
            "qualification DEMO-FWJ-500000-0007") in text
    assert text.count("decided recognized, now not-recognized: superseded by DiagnosticReport/") == 4
    # 通江's 2 reports, the CDC's exam, 涪陵's remote reading, 渝安's report, 通江's correction
    assert "6 signed reports crossed the border" in text
    assert "eqa-pass: EQA failed for 丙氨酸氨基转移酶" in text
    assert "OBX[1]-5 '高' is not a number for value type NM" in text
    assert (base / "fuling" / "gateway.db").exists()


@pytest.mark.slow
def test_demo_dir_leaves_each_member_ready_to_serve(demo_run: tuple[dict[str, Any], list[str], Path]) -> None:
    _, lines, base = demo_run
    for key, member in MEMBERS.items():
        config = base / key / "gateway.toml"
        assert f"gateway --config {config} serve" in "\n".join(lines)
        settings = tomllib.loads(config.read_text(encoding="utf-8"))
        assert settings["issuer_uscc"] == member.uscc
        for name in ("data_dir", "registry_snapshot", "registry_authority", "signing_key", "signing_cert"):
            assert Path(settings[name]).is_relative_to(base.resolve()), name  # nothing outside the folder
            assert Path(settings[name]).exists(), name
        for private in (settings["signing_key"], base / key / "admin.token"):
            assert os.stat(private).st_mode & 0o777 == 0o600, private

    # 涪陵's folder, served as it is (only the ports moved, to free ones), on the real clock
    http_port, mllp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_HTTP_PORT=str(http_port), GATEWAY_MLLP_PORT=str(mllp_port), GATEWAY_WORKERS="1",
               GATEWAY_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([GATEWAY, "--config", str(base / "fuling" / "gateway.toml"), "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(http_port, timeout=60)
        wait_port(mllp_port, timeout=60)
        url = f"http://127.0.0.1:{http_port}"
        health = requests.get(f"{url}/health", timeout=30)
        assert health.status_code == 200, health.text
        token = (base / "fuling" / "admin.token").read_text().strip()
        # the GBK blood count 涪陵 took in the story, read back with the admin token kept for it
        found = requests.get(f"{url}/fhir/DiagnosticReport", params={"patient.identifier": "500102197506152342"},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert found.status_code == 200, found.text
        assert found.json()["total"] >= 1
        assert requests.get(f"{url}/fhir/DiagnosticReport", timeout=30).status_code == 401
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    assert b"Traceback" not in err, err.decode("utf-8", "replace")


def test_demo_command_cleans_up_its_temporary_directory(runner) -> None:
    result = runner.invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    assert "summary: 4 stored, 3 refused with reasons, 1 filtered (QC)" in result.stdout
    workdir = next(line for line in result.stdout.splitlines() if line.startswith("working directory: "))
    assert not Path(workdir.split(": ", 1)[1].split()[0]).exists()


def test_a_demo_members_server_holds_its_port_from_the_start_and_while_it_is_down() -> None:
    """The demo's member servers hold their ports from the moment the registry names them: a port picked, let go
    and bound later was once taken meanwhile by another program, and the demo ended with "Address already in use".
    While a member is down (the outage the demo plays) its port refuses connections and stays its own."""
    import errno
    import socket

    import requests

    from gateway.demo import _held_port, _Server

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"up"]

    def taken(port: int, *, reuse: bool = True) -> bool:
        """Whether another program binding ``port`` (and listening, with ``reuse``) is told it is in use."""
        with socket.socket() as other:
            if reuse:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                other.bind(("127.0.0.1", port))
                other.listen(1)
            except OSError as exc:
                assert exc.errno == errno.EADDRINUSE
                return True
            return False

    server = _Server(app, _held_port())
    port = server.port
    assert taken(port)  # before it serves
    server.start()
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "up"
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    # while it is down: refused and still its own (a program binding the port is told it is in use; one asking the
    # system for a free port is never given it)
    assert taken(port, reuse=False)
    server.start()
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "up"
    server.close()
    assert server.held is None and server.server is None
    # given up: another program may bind it (asked a few times: on a busy machine the kernel may take a moment)
    for _ in range(10):
        if not taken(port):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"port {port} is still held after close")


def test_a_stopped_members_port_still_counted_in_use_for_a_moment_is_held_once_free() -> None:
    """A member stopped holds its port again: while the system still counts another socket on it (the closed
    server's, on a busy machine), it asks again until the port is free; a port taken for good is said to be in use."""
    import socket
    import threading

    from gateway.demo import _held_again

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    threading.Timer(0.3, blocker.close).start()
    held = _held_again(port)
    try:
        assert held.getsockname()[1] == port
    finally:
        held.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError) as refused:
            _held_again(taken.getsockname()[1], tries=3)
        assert refused.value.errno == errno.EADDRINUSE
