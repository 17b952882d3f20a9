"""Metrics: GET /metrics in Prometheus' text format, read back with prometheus_client's own parser.

In one process (Flask's test client): after N messages the counters moved by exactly N per outcome; stage
histograms counted each stage; database gauges (queue, outbox, recognition, registry snapshot, audit checkpoint)
equal what the database and snapshot say; deliveries and failed signatures are counted where they happen;
the token setting refuses a scrape without it. A real `gateway serve` (HTTP workers, MLLP listener, queue reader
in processes of their own) adds up every process, a restarted one's too.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import CST, DATA, TONGJIANG, Clock, wait_until
from gateway.config import Settings
from gateway.pipeline import Pipeline

MALFORMED = (DATA / "hl7v2" / "malformed.hl7").read_bytes()  # 6 messages: 1 stored, 5 refused
UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
LIS = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"
GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (sample name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter that has not moved yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client: Any, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.get_data(as_text=True))


def test_messages_are_counted_exactly_by_channel_format_and_outcome(app: Any, anon: Any,
                                                                    pipeline: Pipeline) -> None:
    before = scrape(anon)
    pipeline.ingest(MALFORMED, "hl7v2", channel="file")  # 1 stored, 5 refused
    pipeline.ingest(MALFORMED, "hl7v2", channel="file")  # the same six again: duplicates
    pipeline.ingest(UTF8, "hl7v2", channel="mllp")
    after = scrape(anon)

    def moved(channel: str, outcome: str) -> float:
        labels = {"channel": channel, "format": "hl7v2", "outcome": outcome}
        return value(after, "gateway_messages_total", **labels) - value(before, "gateway_messages_total", **labels)

    assert moved("file", "stored") == 1
    assert moved("file", "refused") == 5
    assert moved("file", "duplicate") == 6
    assert moved("mllp", "stored") == 1
    assert moved("mllp", "refused") == moved("file", "failed") == 0
    # every stage of the two stored messages, and the reading of all thirteen, was timed
    for stage, n in (("parse", 13 - 6), ("map", 2), ("build", 2), ("check", 2), ("store", 7)):
        count = (value(after, "gateway_stage_seconds_count", stage=stage)
                 - value(before, "gateway_stage_seconds_count", stage=stage))
        assert count >= n, stage


def test_queued_messages_are_counted_on_receipt_and_again_with_their_outcome(
        pipeline: Pipeline, anon: Any) -> None:
    before = scrape(anon)
    ch = pipeline.channel("hl7v2")
    from gateway.adapters.base import RawUnit

    units = [RawUnit(UTF8.replace(b"|P|2.5.1", f"{i}|P|2.5.1".encode(), 1), 1, "") for i in range(3)]
    pipeline.receive_batch(ch, units, channel="mllp")
    middle = scrape(anon)
    assert value(middle, "gateway_queue_depth") == 3, "the queue gauge is the database's"
    pipeline.process_queued()
    after = scrape(anon)
    labels = {"channel": "mllp", "format": "hl7v2"}
    assert (value(after, "gateway_messages_total", outcome="queued", **labels)
            - value(before, "gateway_messages_total", outcome="queued", **labels)) == 3
    assert value(after, "gateway_queue_depth") == 0


def test_http_requests_are_counted_by_route_template_and_carry_a_request_id(client: Any, anon: Any) -> None:
    before = scrape(anon)
    answer = client.post("/ingest/hl7v2", data=UTF8, headers={"Content-Type": "x-application/hl7-v2+er7"})
    assert answer.status_code == 200
    rid = answer.headers["X-Request-Id"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert anon.get("/health", headers={"X-Request-Id": "lb-7f3a9c2e"}).headers["X-Request-Id"] == "lb-7f3a9c2e"
    odd = anon.get("/health", headers={"X-Request-Id": "x\"; drop"}).headers["X-Request-Id"]
    assert odd != "x\"; drop" and len(odd) == 32, "a malformed id is replaced, never echoed"
    after = scrape(anon)
    labels = {"method": "POST", "route": "/ingest/<fmt>", "status": "200"}
    assert value(after, "gateway_http_requests_total", **labels) - value(before, "gateway_http_requests_total",
                                                                         **labels) == 1
    assert (value(after, "gateway_messages_total", channel="http", format="hl7v2", outcome="stored")
            - value(before, "gateway_messages_total", channel="http", format="hl7v2", outcome="stored")) == 1


def test_outbox_gauges_equal_the_database(app: Any, anon: Any, pipeline: Pipeline, clock: Clock) -> None:
    from gateway.exchange.outbox import Outbox, SendResult
    from gateway.exchange.transports import MockTransport

    outbox = Outbox(pipeline.store.db, clock=clock, max_attempts=2, rand=lambda: 0.5)
    for n in range(3):
        outbox.enqueue("12500102MB0002006J", "http://127.0.0.1:1/exchange/bundles", b"a%d" % n)
    outbox.enqueue("12510000MB00030095", "http://127.0.0.1:1/exchange/bundles", b"b")
    before = scrape(anon)
    refused = MockTransport(lambda u, p, h: SendResult(False, retryable=False, status=400, error="refused"))
    outbox.deliver_due(refused, limit=1)  # one of them is given up
    clock.advance(minutes=5)
    after = scrape(anon)
    db_counts = {(r[0], r[1]): r[2] for r in pipeline.store.db.execute(
        "SELECT destination, status, count(*) FROM outbox GROUP BY 1, 2").fetchall()}
    shown = {(dict(k[1])["destination"], dict(k[1])["state"]): v for k, v in after.items()
             if k[0] == "gateway_deliveries"}
    assert shown == db_counts and sum(shown.values()) == 4 and ("12500102MB0002006J", "dead") in shown
    assert value(after, "gateway_deliveries_delivered") == 0
    assert value(after, "gateway_delivery_oldest_wait_seconds") == 300.0
    assert (value(after, "gateway_delivery_attempts_total", destination="12500102MB0002006J", result="dead")
            - value(before, "gateway_delivery_attempts_total", destination="12500102MB0002006J",
                    result="dead")) == 1


def test_token_setting_refuses_a_scrape_without_it(settings: Settings, pipeline: Pipeline, tmp_path: Path) -> None:
    from gateway.api.app import create_app

    token_file = tmp_path / "metrics.token"
    token_file.write_text("s3cret-scraper-token\n", encoding="utf-8")
    token_file.chmod(0o644)
    open_to_all = create_app(settings.replace(metrics_token_file=str(token_file)), pipeline).test_client()
    refused = open_to_all.get("/metrics", headers={"Authorization": "Bearer s3cret-scraper-token"})
    assert refused.status_code == 503  # a token others can read is no secret: the file is refused, as a key's is
    token_file.chmod(0o600)
    app = create_app(settings.replace(metrics_token_file=str(token_file)), pipeline)
    c = app.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-scraper-token"}):
        refused = c.get("/metrics", headers=headers)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith(
            'Bearer error="invalid_token"' if headers.get("Authorization", "").startswith("Bearer") else "Bearer")
        assert refused.get_json()["resourceType"] == "OperationOutcome"
        assert b"gateway_" not in refused.data
    assert c.get("/metrics", headers={"Authorization": "Bearer s3cret-scraper-token"}).status_code == 200
    token_file.unlink()  # unreadable now: refused, never open by accident, and the path is not told
    gone = c.get("/metrics", headers={"Authorization": "Bearer s3cret-scraper-token"})
    assert gone.status_code == 503 and str(tmp_path) not in gone.get_data(as_text=True)


# -- between members: deliveries, signatures, recognition, snapshot, checkpoints --------------


URLS = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}


class Routed:
    """A transport that hands each request to the member app its URL names."""

    def __init__(self, world: Any) -> None:
        self.world = world

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> Any:
        from gateway.exchange.transports import classify

        host = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
        gw = next(g for g in self.world.gateways.values() if g.url == host)
        resp = gw.app.test_client().post(urlsplit(url).path, data=payload, headers=headers)
        return classify(resp.status_code, resp.data)


def test_exchange_figures(tmp_path: Path, member_database: Any) -> None:
    from gateway.audit import checkpoint
    from gateway.demo import MEMBERS
    from gateway.demo.world import build_world

    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    world = build_world(tmp_path, clock, URLS, members=("tongjiang", "fuling"),
                        database=member_database)
    for gw in world.gateways.values():
        gw.pipeline.exchange.transport = Routed(world)
    tj, fl = world.gateways["tongjiang"], world.gateways["fuling"]
    fuling = MEMBERS["fuling"].uscc
    before = scrape(fl.app.test_client())

    stored = [o for o in tj.pipeline.ingest(LIS.read_bytes(), "hl7v2", channel="mllp") if o.bundle is not None]
    tj.pipeline.exchange.push(stored[0].bundle["id"], fuling)
    assert tj.pipeline.exchange.deliver()["delivered"] == 1
    tampered = stored[1].signed.replace(b'"value":36', b'"value":35')
    assert tampered != stored[1].signed
    url = fl.url + "/exchange/bundles"
    refused = fl.app.test_client().post("/exchange/bundles", data=tampered,
                                        headers=tj.pipeline.exchange.assertion_for(url))
    assert refused.status_code == 401
    ident = fl.pipeline.exchange.identity
    checkpoint.maybe_make(fl.pipeline.store.db, checkpoint.Signer(ident.key, list(ident.chain)), now=clock())
    clock.advance(minutes=10)

    after = scrape(fl.app.test_client())
    assert (value(after, "gateway_signature_failures_total", where="receive", reason="bad-signature")
            - value(before, "gateway_signature_failures_total", where="receive", reason="bad-signature")) == 1
    decided = dict(fl.pipeline.store.db.execute(
        "SELECT outcome, count(*) FROM recognition_decisions GROUP BY outcome").fetchall())
    assert decided == {"recognized": 4}
    assert value(after, "gateway_recognition_decisions_total", outcome="recognized") == 4
    assert value(after, "gateway_recognition_decisions_total", outcome="not-recognized") == 0
    assert value(after, "gateway_audit_checkpoint_age_seconds") == 600.0
    snapshot = fl.pipeline.exchange.holder.current
    assert value(after, "gateway_registry_snapshot_version") == snapshot.version
    assert value(after, "gateway_registry_snapshot_expiry_seconds") == (snapshot.valid_until - clock()).total_seconds()
    assert value(after, "gateway_registry_snapshot_age_seconds") == (clock() - snapshot.issued).total_seconds()

    sender = scrape(tj.app.test_client())
    assert value(sender, "gateway_delivery_attempts_total", destination=fuling, result="delivered") >= 1
    assert value(sender, "gateway_deliveries_delivered") == 1


# -- a real `gateway serve`: every process counted, a restarted one's counts kept -----------------


def _mllp(port: int, message: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x0b" + message + b"\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.slow
def test_serve_adds_up_every_process_and_logs_json_without_patient_data(tmp_path: Path, database: str) -> None:
    from gateway.demo import free_port
    from gateway.heartbeat import run_dir

    http, mllp = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    data_dir = tmp_path / "gw"
    token_file = tmp_path / "metrics.token"
    token_file.write_text("scrape-me-0123456789\n", encoding="utf-8")
    token_file.chmod(0o600)
    env = {**os.environ, "GATEWAY_DATA_DIR": str(data_dir), "GATEWAY_ISSUER_USCC": TONGJIANG,
           "GATEWAY_HTTP_PORT": str(http), "GATEWAY_MLLP_PORT": str(mllp), "GATEWAY_MLLP_ACK": "received",
           "GATEWAY_WORKERS": "2", "GATEWAY_THREADS": "2", "GATEWAY_LOG_LEVEL": "INFO", "GATEWAY_LOG_FORMAT": "json",
           "GATEWAY_METRICS_TOKEN_FILE": str(token_file), "GATEWAY_DELIVERY_INTERVAL": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if database:
        env["GATEWAY_DATABASE"] = database
    added = subprocess.run([GATEWAY, "users", "add", "lis", "--role", "submitter"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    db_path = database or data_dir / "gateway.db"
    from gateway.exchange.outbox import Outbox
    from gateway.store.db import connect, transaction

    outbox_db = connect(db_path)  # deliveries waiting: the gauges must show the database's counts
    outbox = Outbox(outbox_db, clock=lambda: _dt.datetime.now(CST))
    for dest, payload in (("12500102MB0002006J", b"a"), ("12500102MB0002006J", b"b"), ("12510000MB00030095", b"c")):
        outbox.enqueue(dest, "http://127.0.0.1:1/exchange/bundles", payload)
    with transaction(outbox_db):
        outbox_db.execute("UPDATE outbox SET status = 'dead' WHERE payload = ?", [b"b"])
        outbox_db.execute("UPDATE outbox SET next_attempt_at = 4102444800")  # not due while the test runs
    outbox_db.conn.close()
    folder = run_dir(Settings(data_dir=str(data_dir), database=database, http_port=http))
    from gateway.metrics import metrics_folder

    counted_in = metrics_folder(folder)  # (in memory, /dev/shm, where the machine has it: a full disk stops no part)
    old_file = counted_in / "counter_99999999.db"
    old_file.parent.mkdir(parents=True, exist_ok=True)
    old_file.write_bytes(b"left by an earlier run")  # emptied at start: an earlier run's counts never show

    message = LIS.read_bytes().split(b"\x1c")[0].lstrip(b"\x0b")
    patient = ("王", "建国", "511921196612120011", "Z0099812")
    assert all(p.encode() in message for p in patient)
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    auth = {"Authorization": "Bearer scrape-me-0123456789"}

    def scrape_live() -> Samples:
        response = requests.get(f"{url}/metrics", headers=auth, timeout=10)
        assert response.status_code == 200, response.text
        return parse(response.text)

    try:
        def running() -> bool:  # every part; the dead delivery above keeps /health itself at 503
            checks = requests.get(f"{url}/health", timeout=10).json()["checks"]
            return all(checks.get(part, {}).get("ok") for part in ("http", "mllp-1", "queue", "background"))

        wait_until(running, 120, "every part running")
        assert not old_file.exists()
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
        base = scrape_live()
        n_mllp, n_http = 4, 3
        for i in range(n_mllp):
            assert b"MSA|" in _mllp(mllp, message.replace(b"TJ2611200001", f"MLLP{i:08d}".encode()))
        for i in range(n_http):
            # the sender's messages queued over MLLP come first: 503 until they are worked, as a client retries
            answer = wait_until(lambda: (r := requests.post(
                f"{url}/ingest/hl7v2?patient=511921196612120011", timeout=30,
                data=message.replace(b"TJ2611200001", f"HTTP{i:08d}".encode()),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "x-application/hl7-v2+er7"}))
                .status_code != 503 and r, 60, "the HTTP message taken once its sender's queue is worked")
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Request-Id"]

        def moved(samples: Samples, channel: str, outcome: str) -> float:
            labels = {"channel": channel, "format": "hl7v2", "outcome": outcome}
            return value(samples, "gateway_messages_total", **labels) - value(base, "gateway_messages_total",
                                                                              **labels)

        now = wait_until(lambda: (s := scrape_live()) and moved(s, "mllp", "stored") == n_mllp and s, 60,
                         "the queue reader's work counted")
        assert moved(now, "mllp", "queued") == n_mllp, "counted by the listener process"
        assert moved(now, "http", "stored") == n_http, "counted by the HTTP workers"
        assert moved(now, "mllp", "stored") + moved(now, "http", "stored") == n_mllp + n_http
        db = connect(db_path)
        try:
            queued = db.execute("SELECT count(*) FROM messages WHERE status = 'queued'").fetchone()[0]
            outbox = {(r[0], r[1]): r[2] for r in db.execute(
                "SELECT destination, status, count(*) FROM outbox GROUP BY 1, 2").fetchall()}
        finally:
            db.conn.close()
        assert value(now, "gateway_queue_depth") == queued == 0
        shown = {(dict(k[1])["destination"], dict(k[1])["state"]): v for k, v in now.items()
                 if k[0] == "gateway_deliveries"}
        assert shown == outbox and sum(shown.values()) == 3
        assert value(now, "gateway_part_up", part="queue") == 1 and value(now, "gateway_part_up", part="http-2") == 1

        # a killed HTTP worker is restarted; what it counted still adds up
        manifest = folder / "serve.json"
        parts = json.loads(manifest.read_text())["parts"]
        os.kill(parts["http-1"]["pid"], signal.SIGKILL)
        os.kill(parts["http-2"]["pid"], signal.SIGKILL)
        wait_until(lambda: all(p["restarts"] == 1 and p["state"] == "running"
                               for name, p in json.loads(manifest.read_text())["parts"].items()
                               if name.startswith("http")),
                   60, "both HTTP workers restarted")
        again = wait_until(lambda: scrape_live(), 60, "a scrape from a new worker")
        assert moved(again, "http", "stored") == n_http and moved(again, "mllp", "stored") == n_mllp
        assert value(again, "gateway_part_restarts_total", part="http-1") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    text = err.decode("utf-8", "replace")
    assert "Traceback" not in text, text[-3000:]
    assert not counted_in.exists() or counted_in.parent == folder  # (in memory: removed at the stop)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    others = [line for line in text.splitlines() if not line.startswith("{")]
    assert len(others) <= 1 and all(line.startswith("gateway ") for line in others), others  # the banner only
    assert lines and all({"timestamp", "level", "process", "logger", "message"} <= set(e) for e in lines)
    assert {"serve", "http-1", "http-2", "mllp-1", "queue", "background"} <= {e["process"] for e in lines}
    ingests = [e for e in lines if e["logger"] == "gateway.access" and e.get("route") == "/ingest/hl7v2"
               and e.get("status") != 503]  # (asked to wait for the sender's queued messages, and sent again)
    assert len(ingests) == n_http
    for e in ingests:
        assert e["user"] == "lis" and e["status"] == 200 and e["method"] == "POST" and e["latency_ms"] > 0
        assert len(e["request_id"]) == 32 and e["process"].startswith("http-")
        _dt.datetime.fromisoformat(e["timestamp"])
    assert {e["request_id"] for e in ingests} <= {e.get("request_id") for e in lines if e["logger"] != "gateway.access"}
    for needle in patient:
        assert needle not in text, f"patient data in the log: {needle}"


def test_a_scrape_while_the_database_is_away_still_answers_what_the_processes_counted(
        app: Any, anon: Any, pipeline: Pipeline, monkeypatch: Any) -> None:
    """PostgreSQL stopped: every scrape but the first was a 503 OperationOutcome, so Prometheus saw the whole
    gateway down (part_up, restarts, message counters lost). Now a 200 in the text format, with the figures read
    from the database left out and gateway_database_up 0."""
    from gateway.errors import DatabaseUnavailable
    from gateway.member import Member

    pipeline.ingest(MALFORMED, "hl7v2", channel="file")
    up = scrape(anon)
    assert value(up, "gateway_database_up") == 1 and ("gateway_queue_depth", ()) in up

    def away(self: Any) -> Any:
        raise DatabaseUnavailable("the database cannot be reached right now")

    monkeypatch.setattr(Member, "store", property(away))
    down = scrape(anon)
    assert value(down, "gateway_database_up") == 0 and ("gateway_queue_depth", ()) not in down
    counted = {k: v for k, v in down.items() if k[0] == "gateway_messages_total"}
    assert counted and counted == {k: v for k, v in up.items() if k[0] == "gateway_messages_total"}
