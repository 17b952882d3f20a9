"""Demo: the whole story on one machine, no services to install.

DEMO DATA ONLY: the members, patients and identifiers are made up (identifiers
carry valid check digits so that the gateway's checks pass). A registry
authority and three member gateways run in this process, each a real gateway
with its own SQLite database, keys and settings, talking real MLLP and HTTP on
loopback:

1. the registry authority publishes a signed snapshot (members, certificates,
   qualifications, EQA results, catalogues);
2. 通江县人民医院 (Sichuan) takes its LIS's HL7 v2 over MLLP, 涪陵中心医院
   (Chongqing) takes GBK HL7 v2 over HTTP: stored, filtered or refused with reasons;
3. 通江 refers a patient to 涪陵: the signed report Bundle crosses the provincial
   border while 涪陵 is down, waits in the outbox, is delivered when 涪陵 is back,
   verified and recognised item by item, with reasons;
4. a tampered copy is refused; 涪陵 looks up (调阅) the patient's reports at 通江;
5. 涪陵 refers (移送) the report of an issuer that failed EQA to the authority that graded it;
6. 涪陵 decides two chest CTs of 邻水, made before and after its promotion from 二级 to 三级: the level held on
   the study date decides;
7. a CT and an ECG performed at a township centre, read and signed by 涪陵 and pushed to 通江, are recognised;
8. 重庆渝安 (a 放射卫生技术服务机构) sends a 放射卫生防护检测报告 (metadata + PDF) to 通江: recognised under its
   qualification;
9. 通江 corrects the blood count 涪陵 already decided: 涪陵 withdraws those decisions and decides the correction;
10. the auditor verifies 涪陵's log and reads the recognition rate.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import click

from gateway.store.views import ReadModels

__all__ = ["DemoMember", "MEMBERS", "run_demo", "free_port", "DemoClock"]


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

_CST = _dt.timezone(_dt.timedelta(hours=8))
_SIGNS = {"passed": "✓", "failed": "✗"}  # anything else: "?" (a fact was missing)
#: The demo's story time: the sample results were collected on 2026-11-20 and 21.
DEMO_START = _dt.datetime(2026, 11, 22, 10, 0, tzinfo=_CST)


class DemoClock:
    """Story time: starts at :data:`DEMO_START`, runs with real time, and can jump ahead."""

    def __init__(self, start: _dt.datetime = DEMO_START) -> None:
        self.start = start
        self.t0 = time.monotonic()
        self.jumped = _dt.timedelta()

    def __call__(self) -> _dt.datetime:
        return self.start + self.jumped + _dt.timedelta(seconds=time.monotonic() - self.t0)

    def jump(self, **delta: float) -> None:
        self.jumped += _dt.timedelta(**delta)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _data(name: str) -> bytes:
    return resources.files("gateway.demo").joinpath("data", name).read_bytes()


def _held_port(port: int = 0, *, listening: bool = True) -> socket.socket:
    """A socket bound on loopback to ``port`` (0: one the system picks), the port this process's: listening (no
    other socket can take it then, whatever its options; connections wait for the server), or only bound (a
    connection is refused, as by a gateway that is down; the system gives the port to nobody asking for a free one,
    and a program binding it by number is told it is in use unless it shares ports on purpose, SO_REUSEADDR)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (its last connections may still be closing)
    sock.bind(("127.0.0.1", port))
    if listening:
        sock.listen(128)
    return sock


def _held_again(port: int, tries: int = 40) -> socket.socket:
    """:func:`_held_port` (only bound) of a port a server of this process has just closed: on a busy machine the
    system may still count the closed server's socket for a moment, and says the port is in use; asked again every
    50 ms, up to ``tries`` times, before that is the answer."""
    for _ in range(tries - 1):
        try:
            return _held_port(port, listening=False)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            time.sleep(0.05)
    return _held_port(port, listening=False)


class _Server:
    """A member gateway's HTTP server on loopback that can be stopped and started again on its port.

    It holds its port from the moment it is made, also while stopped (a connection is then refused, as by a gateway
    that is down): a port picked, let go and bound again later could be taken meanwhile by another program, which
    ended the demo with "Address already in use"."""

    def __init__(self, app: Any, held: socket.socket) -> None:
        self.app = app
        self.held: socket.socket | None = held
        self.port = int(held.getsockname()[1])
        self.server: Any = None

    def start(self) -> None:
        from werkzeug.serving import make_server

        if self.held is None:
            self.held = _held_port(self.port)
        self.held.listen(128)  # (again, for a port held while stopped)
        self.server = make_server("127.0.0.1", self.port, self.app, threaded=True, fd=self.held.fileno())
        self.held.close()  # (the server serves a copy of it)
        self.held = None
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self, *, hold: bool = True) -> None:
        """Stopped; its port ``hold``: kept, refusing connections, until it starts again."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
            if hold:
                self.held = _held_again(self.port)

    def close(self) -> None:
        """Stopped, and the port given up."""
        self.stop(hold=False)
        if self.held is not None:
            self.held.close()
            self.held = None


def run_demo(workdir: str | None = None, *, mappings_dir: str | None = None,
             echo: Callable[[str], Any] = click.echo) -> dict[str, Any]:
    """Run the demo, print what happens, and return the figures it printed."""
    import requests
    from hl7.client import MLLPClient

    from gateway.adapters.hl7v2 import split_messages
    from gateway.audit.stats import compute
    from gateway.audit.verify import verify
    from gateway.audit.records import Party
    from gateway.audit.stats import catalogue_scopes, load_fees, member_provinces
    from gateway.demo.world import AUTHORITY_KEY, SERVICE_KEY, add_authority, add_member_gateway, build_world
    from gateway.referrals import Referrals
    from gateway.mllp import MLLPServer
    from gateway.recognition.overrides import make_override
    from gateway.recognition.store import add_override, list_decisions
    from gateway.signing.canonical import parse_json

    for name in ("gateway", "werkzeug"):  # the demo prints its own story; keep operational logs quiet
        logging.getLogger(name).setLevel(logging.ERROR)
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    if workdir:
        _prepare_folder(base, echo)
    base.mkdir(parents=True, exist_ok=True)
    (base / _MARKER).write_text("a folder of `gateway demo --dir`; running the demo again replaces it\n",
                                encoding="utf-8")
    clock = DemoClock()
    held = {key: _held_port() for key in (*MEMBERS, "schealth", "yuan")}  # (each member's URL is in the registry)
    urls = {key: f"http://127.0.0.1:{sock.getsockname()[1]}" for key, sock in held.items()}
    figures: dict[str, Any] = {"acks": {}, "stored": 0, "refused": 0, "filtered": 0}
    servers: dict[str, _Server] = {}
    mllp: MLLPServer | None = None
    try:
        echo("川渝 result-recognition gateway — demo (all members, patients and keys are DEMO DATA)")
        echo(f"working directory: {base}   story time: {clock().isoformat(timespec='minutes')}\n")
        world = build_world(base, clock, {k: urls[k] for k in MEMBERS}, mappings_dir=mappings_dir)
        # 四川省卫生健康委员会（演示） runs a gateway too: referrals (移送) of Sichuan members' reports reach it there
        add_authority(world, clock, urls[AUTHORITY_KEY])
        # 重庆渝安职业卫生技术服务有限公司（演示） runs one too: it issues 职业卫生/放射卫生 technical-service reports
        add_member_gateway(world, clock, urls[SERVICE_KEY])
        snap = world.registry.snapshot(clock())
        echo(f"[registry authority] 川渝卫生健康联合办公室（演示） publishes snapshot v{snap.version}: "
             f"{len(snap.members)} members, {len(snap.catalogues)} catalogues, "
             f"{len(snap.supervising_authorities())} supervising authorities, signed")
        for key, gw in world.gateways.items():
            servers[key] = _Server(gw.app, held.pop(key))
            servers[key].start()
        tj, fl = world.gateways["tongjiang"], world.gateways["fuling"]

        # -- 1. results in ---------------------------------------------------------------
        mllp = MLLPServer(tj.pipeline, "127.0.0.1", 0)
        mllp.start_in_thread()
        echo(f"\n[{tj.member.name} {tj.member.uscc}, Sichuan] LIS -> MLLP 127.0.0.1:{mllp.port}")
        with MLLPClient("127.0.0.1", mllp.port) as client:
            for raw in split_messages(_data("hl7v2/tongjiang-county-lis.hl7")):
                _print_ack(echo, client.send_message(raw).decode("utf-8", "replace"), figures)
        echo(f"\n[{fl.member.name} {fl.member.uscc}, Chongqing] LIS -> HTTP POST {fl.url}/ingest/hl7v2 (GBK, v2.4)")
        for raw in split_messages(_data("hl7v2/fuling-central-lis.hl7")):
            resp = requests.post(f"{fl.url}/ingest/hl7v2", data=raw, timeout=30,
                                 headers={"Authorization": f"Bearer {fl.token}"})
            _print_ack(echo, resp.content.decode("gb18030", "replace"), figures, http_status=resp.status_code)

        cdc = world.gateways["sccdc"]
        echo(f"\n[{cdc.member.name} {cdc.member.uscc}, Sichuan] occupational-health exam export -> "
             f"HTTP POST {cdc.url}/ingest/cdc-csv")
        resp = requests.post(f"{cdc.url}/ingest/cdc-csv", data=_data("csv/sccdc-occupational-exams.csv"), timeout=30,
                             headers={"Authorization": f"Bearer {cdc.token}"})
        for issue in resp.json()["issue"]:
            echo(f"  {issue['severity']}: {issue['diagnostics']}")
        figures["cdc_status"] = resp.status_code

        # -- 2. referral across the border, through an outage -------------------------------
        issued = ReadModels(tj.pipeline.store.db).issued_bundles()
        echo(f"\n[referral] patient 王建国 is referred from {tj.member.name} (Sichuan) to {fl.member.name} (Chongqing)")
        for bundle_id, text in issued:
            marks = [e["valueString"] for ent in parse_json(bytes(text))["entry"]
                     for e in ent["resource"].get("extension", []) if ent["resource"]["resourceType"] == "Observation"]
            echo(f"  report Bundle {bundle_id[:8]}… signed by 通江; recognition marks: "
                 f"{', '.join(sorted(set(marks))) or 'none'} on {len(marks)} result(s)")
        signed_text = bytes(issued[0][1])
        servers["fuling"].stop()
        echo(f"  {fl.member.name} is down (maintenance)")
        rows = [tj.pipeline.exchange.push(bundle_id, fl.member.uscc) for bundle_id, _ in issued]
        counts = tj.pipeline.exchange.deliver(wait=None)
        entry = tj.pipeline.exchange.outbox.get(rows[0])
        echo(f"  outbox: {counts['retry']} deliveries waiting: attempt {entry.attempts}: {entry.last_error}; "
             f"next try in {entry.next_attempt_at - clock().timestamp():.0f} s, nothing lost")
        figures["outage_retry"] = counts["retry"]
        clock.jump(hours=1)
        servers["fuling"].start()
        echo(f"  one hour later {fl.member.name} is back")
        counts = tj.pipeline.exchange.deliver(wait=None)
        figures["delivered"] = counts["delivered"]
        for row in rows:
            entry = tj.pipeline.exchange.outbox.get(row)
            receipt = entry.receipt or {}
            echo(f"  outbox #{row}: {entry.status} after {entry.attempts} attempts; receipt signed by 涪陵: "
                 f"{receipt.get('decisions')} (snapshot v{receipt.get('snapshot')})")
        # The CDC's exam of the same worker goes to 涪陵 too (occupational-health reports are recognised
        # across the border when the issuer's 备案 covers each hazard factor).
        exam_id = ReadModels(cdc.pipeline.store.db).issued_bundles()[0][0]
        cdc.pipeline.exchange.push(exam_id, fl.member.uscc)
        cdc.pipeline.exchange.deliver(wait=None)
        echo(f"  {cdc.member.name} sends its occupational-health exam of the same worker to {fl.member.name}: "
             "delivered")

        # -- 3. the decisions, with their reasons -------------------------------------------
        echo(f"\n[{fl.member.name}] recognition decisions (互认), each rule checked (✓ passed, ✗ failed, ? no fact):")
        figures["decisions"] = {}
        decisions = [d.to_dict() for d in list_decisions(fl.pipeline.store.db)]
        for data in decisions:
            issuer = next((k for k, m in MEMBERS.items() if m.uscc == data["result"]["issuer"]), "?")
            figures["decisions"][f"{issuer}:{data['result']['item']}"] = data["outcome"]
            item = data.get("catalogue_item") or {}
            rules = " ".join(f"{r['rule']}{_SIGNS.get(r['status'], '?')}" for r in data["rules"])
            echo(f"  {data['result']['item']:<12} {item.get('code', '-'):<8} {data['outcome']:<15} {rules}")
            for r in data["rules"]:
                if r["status"] != "passed":
                    echo(f"      {r['rule']}: {r['message']}")
        plt = next(d for d in decisions if d["result"]["item"].startswith("血小板"))
        override = make_override(plt["decision_id"], "critical-item", "FL-DR-0231", clock(),
                                 "术前复查血小板 (re-test before surgery)")
        add_override(fl.pipeline.store.db, override)
        echo("  the receiving physician FL-DR-0231 orders a re-test of 血小板计数 anyway: reason critical-item "
             "(手术、输血等重大医疗措施前); recorded beside the decision, which stays as it was")

        # -- 4. a tampered copy, and 调阅 ---------------------------------------------------
        tampered = signed_text.replace(b'"value":6.8', b'"value":5.8', 1)
        url = f"{fl.url}/exchange/bundles"
        resp = requests.post(url, data=tampered, timeout=30, headers=tj.pipeline.exchange.assertion_for(url))
        figures["tampered_status"] = resp.status_code
        echo(f"\n[tampered] a copy with WBC changed from 6.8 to 5.8 sent to {fl.member.name}: HTTP {resp.status_code} "
             f"{resp.json()['issue'][0]['diagnostics']}")
        found = fl.pipeline.exchange.pull(tj.member.uscc, "urn:oid:2.16.156.10011.1.3|511921196612120011")
        figures["lookup"] = len(found)
        echo(f"[调阅] {fl.member.name} asks {tj.member.name} for patient 5119…0011: {len(found)} signed report(s), "
             + ", ".join(f"verified (signer {v.signer_uscc}, kid {v.kid})" for v in found))

        # -- 5. 移送: the report of an issuer not qualified for an item goes to its authority ------
        authority = world.gateways[AUTHORITY_KEY]
        alt = next(d for d in decisions if d["outcome"] == "not-recognized" and d.get("catalogue_item"))
        referrals = Referrals(fl.pipeline.exchange)
        made = referrals.create(alt["decision_id"], "unqualified", by=Party.user(fl.member.uscc, "qc-officer"),
                                note="2026 年室间质评未通过，报告仍出具该项目 (EQA failed in 2026, item still reported)")
        echo(f"\n[移送 referral] {fl.member.name} refers the {alt['result']['item']} report of {tj.member.name} to "
             f"{authority.member.name} (which graded it, per the registry): FHIR Task {made.id[:8]}…, reason "
             f"unqualified, evidence: signed Bundle sha256 {(made.bundle_hash or '')[:12]}…, decision, "
             "failing rule eqa-pass")
        fl.pipeline.exchange.deliver(wait=None)
        echo(f"  delivered over the exchange, signed; status at {fl.member.name}: {referrals.get(made.id).status}")
        at_authority = Referrals(authority.pipeline.exchange)
        at_authority.update(made.id, "accepted", note="已受理，责令整改 (accepted; correction ordered)",
                            by=Party.user(authority.member.uscc, "inspector"))
        authority.pipeline.exchange.deliver(wait=None)
        figures["referral"] = referrals.get(made.id).status
        echo(f"  {authority.member.name} answers, signed as the authority: status at {fl.member.name} now "
             f"{figures['referral']} (已受理，责令整改); both sides audited each step")

        # -- 6. a hospital's level changed: the level held on the study date decides --------------
        _levels_step(echo, fl, figures)

        # -- 7. 基层检查、上级诊断: performed at a township centre, read and signed by 涪陵 -----------
        _remote_reading_step(echo, fl, tj, figures)

        # -- 8. a technical-service report (谁报告、谁负责) across the border --------------------
        _service_report_step(echo, world.gateways[SERVICE_KEY], tj, figures)

        # -- 9. a correction after the original crossed the border ------------------------------
        _correction_step(echo, clock, mllp.port, tj, fl, figures)

        # -- 10. the auditor ----------------------------------------------------------------
        report = verify(fl.pipeline.store.db)
        fees = load_fees(Path(fl.settings.mappings_dir) / "fees")
        stats = compute(fl.pipeline.store.db, fees=fees, alliances=catalogue_scopes(snap),
                        names={uscc: m.name for uscc, m in snap.members.items()}, provinces=member_provinces(snap))
        total = stats["total"]
        figures["audit_ok"] = report.ok
        figures["rate"] = total["rate"]
        echo(f"\n[auditor at {fl.member.name}] audit log: {report.entries} entries, chain "
             f"{'verified OK' if report.ok else 'BROKEN'}; 互认率 {total['accepted']}/{total['eligible']} = "
             f"{total['rate']:.1%} (recognised and not re-tested ÷ eligible; {total['needs_review']} need review); "
             f"exchanges received {stats['exchanges']['received']}, refused {stats['exchanges']['refused']}; "
             f"overrides {stats['overrides']['total']}")
        sv, hr = stats["savings"], stats["hr_items"]
        figures["savings_yuan"], figures["hr_items"] = sv["total_yuan"], hr["results"]
        echo(f"  节约费用 (savings) {sv['total_yuan']:.2f} 元 for {sv['results']} accepted results "
             f"({'DEMO fees, illustrative' if sv['demo_fees'] else ', '.join(sv['fee_sources'])}); HR items per "
             "institution: " + "; ".join(f"{r['name'] or r['key']} {r['results']} "
                                         f"({', '.join(f'{m} {n}' for m, n in r['by_mark'].items())})"
                                         for r in hr["by_issuer"]))
        echo("  互认率 by alliance: " + ", ".join(
            f"{g['key']} {g['accepted']}/{g['eligible']}" for g in stats["by_alliance"]))
        # 通江's two reports, the CDC's exam, 涪陵's remote reading, 渝安's report and 通江's correction
        crossed = (figures["delivered"] + 1 + figures["remote_reading_delivered"] + figures["service_report_delivered"]
                   + figures["correction_delivered"])
        echo(f"\nsummary: {figures['stored']} stored, {figures['refused']} refused with reasons, "
             f"{figures['filtered']} filtered (QC); {crossed} signed reports crossed the border and were decided "
             "item by item, with reasons")
        if workdir:
            from gateway.demo.world import SERVE_PORTS, leave_configs

            configs = leave_configs(world, _dt.datetime.now(_CST), mappings_dir=mappings_dir)
            echo(f"\neach member's gateway stays in {base}, ready to serve (registry snapshot and certificates "
                 "renewed as of now):")
            for key, path in configs.items():
                echo(f"  gateway --config {path} serve    # HTTP {SERVE_PORTS[key][0]}, MLLP {SERVE_PORTS[key][1]}, "
                     f"admin token in {path.parent / 'admin.token'}")
        else:
            echo("next: `gateway demo --dir DIR` leaves each member ready for `gateway serve`; see README.md")
        return figures
    finally:
        if mllp is not None:
            mllp.stop()
        for server in servers.values():
            server.close()
        for sock in held.values():  # (ports of servers never made)
            sock.close()
        if not workdir:
            shutil.rmtree(base, ignore_errors=True)


#: Marks a folder the demo made, so that running it again may replace it (and nothing else).
_MARKER = ".gateway-demo"


def _prepare_folder(base: Path, echo: Callable[[str], Any]) -> None:
    """An empty or new folder is used as it is; an earlier demo's folder is replaced; anything else is refused.

    :raises click.ClickException: the folder holds files the demo did not make (nothing is deleted).
    """
    if base.exists() and not base.is_dir():
        raise click.ClickException(f"{base} is a file, not a folder; give --dir a new or empty folder")
    if not base.exists() or not any(base.iterdir()):
        return
    if not (base / _MARKER).exists():
        raise click.ClickException(f"{base} is not empty and holds no earlier demo; give --dir a new or empty folder "
                                   "(the demo never deletes files it did not make)")
    echo(f"replacing the earlier demo in {base}")
    for name in (*MEMBERS, "registry", "schealth", "yuan"):
        shutil.rmtree(base / name, ignore_errors=True)


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


# -- the steps of this round's capabilities ------------------------------------------------------------------------

#: 邻水县人民医院（演示）'s two chest CTs (DEMO data): (file, the day the CT reached 涪陵, when 涪陵 decided it).
_LINSHUI_CTS = (("fhir/linshui-chest-ct-2025-06-20.json", "2025-06-25T09:00:00+08:00"),
                ("fhir/linshui-chest-ct-2025-07-20.json", "2025-07-25T09:00:00+08:00"))
_WANG = "511921196612120011"  # 王建国's 身份证号 (DEMO)


def _recognize(gw: Any, bundle: dict[str, Any], receiver: str, at: str | None = None) -> list[dict[str, Any]]:
    """``POST /fhir/$recognize`` at a member's gateway: each decision as outcome, item and rules."""
    import requests

    params: dict[str, Any] = {"resourceType": "Parameters", "parameter": [
        {"name": "bundle", "resource": bundle}, {"name": "receiver", "valueString": receiver}]}
    if at:
        params["parameter"].append({"name": "at", "valueDateTime": at})
    resp = requests.post(f"{gw.url}/fhir/$recognize", timeout=30, data=json.dumps(params, ensure_ascii=False).encode(),
                         headers={"Authorization": f"Bearer {gw.token}", "Content-Type": "application/fhir+json"})
    resp.raise_for_status()
    out = []
    for param in resp.json()["parameter"]:
        parts = param.get("part", [])
        item = next((p["valueCoding"] for p in parts if p["name"] == "item" and "valueCoding" in p), None)
        if param["name"] != "decision" or item is None:
            continue  # a report's diagnostic conclusion is never recognised: not shown here
        rules = [{q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in p["part"]}
                 for p in parts if p["name"] == "rule"]
        out.append({"outcome": next(p["valueCode"] for p in parts if p["name"] == "outcome"), "item": item,
                    "rules": [{"rule": r["id"], "status": r["status"], "message": r["message"]} for r in rules]})
    return out


def _status(rules: list[dict[str, Any]], rule: str) -> str | None:
    """The status of one rule of a decision (None: the rule did not apply)."""
    return next((r["status"] for r in rules if r["rule"] == rule), None)


def _echo_decision(echo: Callable[[str], Any], label: str, code: str, outcome: str, rules: list[dict[str, Any]],
                   show: tuple[str, ...]) -> None:
    """A decision as the story prints it: every rule checked, then the message of each rule in ``show`` and of
    every rule that did not pass."""
    marks = " ".join(f"{r['rule']}{_SIGNS.get(r['status'], '?')}" for r in rules)
    echo(f"  {label:<12} {code:<8} {outcome:<15} {marks}")
    for r in rules:
        if r["rule"] in show or r["status"] != "passed":
            echo(f"      {r['rule']}: {r['message']}")


def _levels_step(echo: Callable[[str], Any], fl: Any, figures: dict[str, Any]) -> None:
    """涪陵 decides two chest CTs of 邻水, made before and after its promotion to 三级, as of the day each arrived."""
    from gateway.signing.canonical import parse_json

    echo("\n[hospital level] 邻水县人民医院（演示） was 二级甲等 until 2025-06-30 and is 三级乙等 since 2025-07-01 "
         "(its dated hospital-grade qualifications in the registry)")
    echo(f"  {fl.member.name} (三级甲等) decides two chest CTs 邻水 made, each as of the day it arrived "
         f"(POST {fl.url}/fhir/$recognize with at); imaging is recognised from a not-lower level only:")
    figures["levels"] = {}
    for name, at in _LINSHUI_CTS:
        bundle = parse_json(_data(name))
        study = next(e["resource"]["effectiveDateTime"] for e in bundle["entry"]
                     if e["resource"]["resourceType"] == "DiagnosticReport")[:10]
        for d in _recognize(fl, bundle, fl.member.uscc, at):
            figures["levels"][study] = {"outcome": d["outcome"], "direction": _status(d["rules"], "direction")}
            _echo_decision(echo, f"CT {study}", d["item"]["code"], d["outcome"], d["rules"], ("direction",))


def _remote_reading_step(echo: Callable[[str], Any], fl: Any, tj: Any, figures: dict[str, Any]) -> None:
    """A CT and an ECG performed at 清溪镇中心卫生院 and read by 涪陵: signed by 涪陵, pushed to 通江, decided there."""
    from gateway.recognition.store import list_decisions
    from gateway.signing.canonical import parse_json

    echo("\n[基层检查、上级诊断] 重庆市涪陵区清溪镇中心卫生院（演示） (a township centre with no hospital level) performs "
         f"a chest CT and an ECG; {fl.member.name} reads both remotely and signs the report Bundle")
    bundle = parse_json(_data("fhir/qingxi-remote-reading.json"))
    ex = fl.pipeline.exchange
    signed = fl.pipeline.member.require_signer().sign(bundle)
    row = ex.outbox.enqueue(tj.member.uscc, ex.endpoint_of(tj.member.uscc), signed)
    ex.deliver(wait=None)
    entry = ex.outbox.get(row)
    figures["remote_reading_delivered"] = int(entry.status == "delivered")
    echo(f"  pushed to {tj.member.name} (Sichuan): {entry.status}; receipt signed by 通江: "
         f"{(entry.receipt or {}).get('decisions')} (the CT report's conclusion is never recognised); imaging and "
         "ECG are judged by the institution that read them:")
    figures["remote_reading"] = {}
    decided = [d.to_dict() for d in list_decisions(tj.pipeline.store.db)]
    for d in sorted((d for d in decided if d["result"]["bundle"].endswith(bundle["id"]) and d["catalogue_item"]),
                    key=lambda d: str(d["catalogue_item"]["code"])):
        item = d["catalogue_item"]
        figures["remote_reading"][d["result"]["item"]] = {
            "outcome": d["outcome"], "reading-signature": _status(d["rules"], "reading-signature")}
        _echo_decision(echo, d["result"]["item"], item["code"], d["outcome"], d["rules"],
                       ("member-active", "reading-signature"))


def _service_report_step(echo: Callable[[str], Any], ya: Any, tj: Any, figures: dict[str, Any]) -> None:
    """重庆渝安 submits a 放射卫生防护检测 report (metadata + PDF) to its gateway; it is pushed to 通江 and decided."""
    import requests

    from gateway.recognition.store import list_decisions

    meta = json.loads(_data("service-report/tongjiang-radiation-protection-testing.json"))
    pdf_name = meta.pop("pdf_file")
    echo(f"\n[{ya.member.name} {ya.member.uscc}, Chongqing] 放射卫生防护检测报告 {meta['report_number']} of "
         f"{meta['employer']['name']}'s DR and CT rooms: metadata + PDF -> HTTP POST {ya.url}/ingest/service-report")
    resp = requests.post(f"{ya.url}/ingest/service-report", timeout=30,
                         headers={"Authorization": f"Bearer {ya.token}"},
                         files={"metadata": (None, json.dumps(meta, ensure_ascii=False).encode(), "application/json"),
                                "pdf": (pdf_name, _data(f"service-report/{pdf_name}"), "application/pdf")})
    figures["service_report_status"] = resp.status_code
    echo(f"  HTTP {resp.status_code} {resp.json()['issue'][0]['diagnostics']}")
    bundle_id = ReadModels(ya.pipeline.store.db).latest_issued_bundle_id()
    row = ya.pipeline.exchange.push(bundle_id, tj.member.uscc)
    ya.pipeline.exchange.deliver(wait=None)
    entry = ya.pipeline.exchange.outbox.get(row)
    echo(f"  signed by 渝安 and pushed to {tj.member.name} (Sichuan): {entry.status}; receipt signed by 通江: "
         f"{(entry.receipt or {}).get('decisions')}")
    figures["service_report_delivered"] = int(entry.status == "delivered")
    [found] = [d.to_dict() for d in list_decisions(tj.pipeline.store.db, issuer=ya.member.uscc)]
    figures["service_report"] = {"outcome": found["outcome"], "technical-service-qualification": _status(
        found["rules"], "technical-service-qualification")}
    item = found.get("catalogue_item") or {}
    echo(f"  {tj.member.name} decides it (谁报告、谁负责: the issuer answers for its report under its qualification):")
    _echo_decision(echo, item.get("display", "-"), item.get("code", "-"), found["outcome"], found["rules"],
                   ("technical-service-qualification",))


def _correction_step(echo: Callable[[str], Any], clock: DemoClock, port: int, tj: Any, fl: Any,
                     figures: dict[str, Any]) -> None:
    """通江 corrects the blood count 涪陵 already decided: 涪陵 withdraws those decisions and decides the correction."""
    from hl7.client import MLLPClient

    from gateway.adapters.hl7v2 import split_messages
    from gateway.recognition.overrides import make_override
    from gateway.recognition.store import add_override, list_decisions

    echo(f"\n[correction] {tj.member.name}'s LIS sends a corrected blood count R2611200001 (OBR-25 C; WBC 6.8 -> 7.1) "
         f"over MLLP, after the original went to {fl.member.name}")
    with MLLPClient("127.0.0.1", port) as client:
        for raw in split_messages(_data("hl7v2/tongjiang-correction.hl7")):
            _print_ack(echo, client.send_message(raw).decode("utf-8", "replace"), figures)
    corrected = ReadModels(tj.pipeline.store.db).latest_issued_bundle_id()
    counts = tj.pipeline.exchange.deliver(wait=None)
    figures["correction_delivered"] = counts["delivered"]
    echo(f"  通江's gateway sends the correction where the original went: {counts['delivered']} delivered to "
         f"{fl.member.name}, verified and decided")
    decisions = [d.to_dict() for d in list_decisions(fl.pipeline.store.db, patient=_WANG)]

    def by_code(d: dict[str, Any]) -> str:
        return str((d["catalogue_item"] or {}).get("code"))

    withdrawn = sorted((d for d in decisions if d.get("withdrawn")), key=by_code)
    current = sorted((d for d in decisions if d["result"]["bundle"].endswith(corrected)), key=by_code)
    figures["withdrawn"] = len(withdrawn)
    figures["correction"] = {d["result"]["item"]: d["outcome"] for d in current}
    echo(f"  {fl.member.name} withdraws its {len(withdrawn)} decisions on the original (audited, each):")
    for d in withdrawn:
        echo(f"    {d['result']['item']:<8} decided {d['decided_outcome']}, now {d['outcome']}: "
             f"{d['withdrawn']['reason']}")
    echo("  and decides the correction: " + ", ".join(f"{d['result']['item']} {d['outcome']}" for d in current))
    plt = next(d for d in current if d["result"]["item"].startswith("血小板"))
    add_override(fl.pipeline.store.db, make_override(plt["decision_id"], "critical-item", "FL-DR-0231", clock(),
                                                     "术前复查血小板 (re-test before surgery)"))
    echo("  FL-DR-0231's re-test order of 血小板计数 stays beside the withdrawn decision; FL-DR-0231 orders it "
         "again on the corrected one")
