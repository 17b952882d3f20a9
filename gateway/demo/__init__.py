"""Demo: the whole story on one machine, no services to install.

DEMO DATA ONLY: the members, patients and identifiers below are made up
(identifiers carry valid check digits so that the gateway's checks pass).
Each member gateway is a real :class:`~gateway.pipeline.Pipeline` with its own
SQLite database; results travel over real MLLP and HTTP on loopback.
"""
from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import click
import requests
from hl7.client import MLLPClient
from werkzeug.serving import make_server

from gateway.adapters.hl7v2 import split_messages
from gateway.config import Settings, load_settings

__all__ = ["DemoMember", "MEMBERS", "run_demo", "free_port"]


@dataclass(frozen=True)
class DemoMember:
    """A demo member institution."""

    key: str
    name: str
    uscc: str
    division: str


#: The demo members (DEMO DATA). The registry authority is 川渝卫生健康联合办公室（演示） 11500000MB00050043.
MEMBERS = {
    "tongjiang": DemoMember("tongjiang", "通江县人民医院（演示）", "12511921MB0001003C", "511921"),
    "fuling": DemoMember("fuling", "重庆市涪陵中心医院（演示）", "12500102MB0002006J", "500102"),
    "sccdc": DemoMember("sccdc", "四川省疾病预防控制中心（演示）", "12510000MB00030095", "510000"),
}


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data(name: str) -> bytes:
    return resources.files("gateway.demo").joinpath("data", name).read_bytes()


def _member_settings(member: DemoMember, base: Path, mappings_dir: str) -> Settings:
    return load_settings(environ={}, overrides={
        "data_dir": str(base / member.key), "issuer_uscc": member.uscc, "issuer_name": member.name,
        "mappings_dir": mappings_dir, "log_level": "WARNING",
    })


def run_demo(workdir: str | None = None, *, mappings_dir: str | None = None,
             echo: Callable[[str], Any] = click.echo) -> dict[str, Any]:
    """Run the demo, print what happens, and return the figures it printed."""
    from gateway.api.app import create_app
    from gateway.mllp import MLLPServer
    from gateway.pipeline import Pipeline

    for name in ("gateway", "werkzeug"):  # the demo prints its own story; keep operational logs quiet
        logging.getLogger(name).setLevel(logging.WARNING)
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    mappings = mappings_dir or load_settings(environ={}).mappings_dir
    figures: dict[str, Any] = {"acks": {}, "stored": 0, "refused": 0, "filtered": 0}
    servers: list[Any] = []
    try:
        echo("川渝 result-recognition gateway — demo (all members and patients are DEMO DATA)")
        echo(f"working directory: {base}\n")

        # 1. 通江县人民医院: its LIS sends over MLLP, as most Chinese LIS do.
        tj = MEMBERS["tongjiang"]
        tj_pipe = Pipeline(_member_settings(tj, base, mappings))
        mllp = MLLPServer(tj_pipe, "127.0.0.1", 0)
        mllp.start_in_thread()
        servers.append(mllp)
        echo(f"[{tj.name} {tj.uscc}] LIS -> MLLP 127.0.0.1:{mllp.port}")
        with MLLPClient("127.0.0.1", mllp.port) as client:
            for raw in split_messages(_data("hl7v2/tongjiang-county-lis.hl7")):
                ack = client.send_message(raw).decode("utf-8", "replace")
                _print_ack(echo, ack, figures)

        # 2. 重庆市涪陵中心医院: its LIS posts GBK-encoded HL7 v2.4 over HTTP.
        fl = MEMBERS["fuling"]
        fl_settings = _member_settings(fl, base, mappings)
        app = create_app(fl_settings)
        http = make_server("127.0.0.1", free_port(), app, threaded=True)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        servers.append(http)
        url = f"http://127.0.0.1:{http.server_port}"
        echo(f"\n[{fl.name} {fl.uscc}] LIS -> HTTP POST {url}/ingest/hl7v2 (GBK, v2.4)")
        for raw in split_messages(_data("hl7v2/fuling-central-lis.hl7")):
            resp = requests.post(f"{url}/ingest/hl7v2", data=raw, timeout=30)
            _print_ack(echo, resp.content.decode("gb18030", "replace"), figures, http_status=resp.status_code)

        # 3. A FHIR search by the patient's 身份证号 finds what was stored.
        echo(f"\n[{fl.name}] FHIR search: DiagnosticReport?patient.identifier=urn:oid:2.16.156.10011.1.3|5001...")
        found = requests.get(f"{url}/fhir/DiagnosticReport", timeout=30, params={
            "patient.identifier": "urn:oid:2.16.156.10011.1.3|500102197506152342"}).json()
        figures["search_total"] = found["total"]
        for entry in found.get("entry", []):
            report = entry["resource"]
            echo(f"  DiagnosticReport/{report['id']} {report['code']['text']} status={report['status']} "
                 f"issued={report.get('issued', '-')} results={len(report.get('result', []))}")
            for ref in report.get("result", []):
                obs = requests.get(f"{url}/fhir/{ref['reference']}", timeout=30).json()
                codes = ", ".join(f"{c['code']}" for c in obs["code"]["coding"])
                value = obs.get("valueQuantity", {})
                flag = obs.get("interpretation", [{}])[0].get("coding", [{}])[0].get("code", "")
                echo(f"    {obs['code']['text']:8} {value.get('value', '')!s:>6} {value.get('code', ''):9} "
                     f"{flag:2} [{codes}]")

        echo(f"\nsummary: {figures['stored']} stored, {figures['refused']} refused with reasons, "
             f"{figures['filtered']} filtered (QC)")
        return figures
    finally:
        for server in servers:
            if hasattr(server, "shutdown"):
                server.shutdown()
            else:
                server.stop()
        if not workdir:
            shutil.rmtree(base, ignore_errors=True)


def _print_ack(echo: Callable[[str], Any], ack: str, figures: dict[str, Any], http_status: int | None = None) -> None:
    segments = [s for s in ack.replace("\n", "\r").split("\r") if s]
    msa = next((s.split("|") for s in segments if s.startswith("MSA")), ["MSA", "?", "?", ""])
    code, control = msa[1], msa[2]
    text = (msa[3] if len(msa) > 3 else "").replace("\\S\\", "^")
    figures["acks"][control] = code
    if code == "AA" and text.startswith("filtered"):
        figures["filtered"] += 1
    elif code == "AA":
        figures["stored"] += 1
    else:
        figures["refused"] += 1
    via = f" HTTP {http_status}" if http_status else ""
    echo(f"  {control:20} ACK {code}{via}  {text}")
