"""Deliveries in lanes, one per destination, to the endpoint the registry names when they are sent.

A hung receiver (a loopback server that accepts and never answers) with three
waiting deliveries does not hold up another member's delivery, whether queued
with them or while they hang. A member whose endpoint changes in a newer registry
snapshot is reached at its new address by waiting, retried, replayed and newly
sent deliveries.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

from conftest import Clock
from gateway.demo import MEMBERS
from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.exchange.outbox import Lanes, Outbox, SendResult
from gateway.exchange.transports import HTTPTransport, classify
from gateway.store.db import connect

CST = _dt.timezone(_dt.timedelta(hours=8))
TJ, FL, CDC = MEMBERS["tongjiang"].uscc, MEMBERS["fuling"].uscc, MEMBERS["sccdc"].uscc
LIS = Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2" / "tongjiang-county-lis.hl7"


class Hung:
    """A loopback server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class _Fast(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hung():
    server = Hung()
    yield server
    server.close()


@pytest.fixture
def fast():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fast)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_hung_receiver_does_not_hold_up_other_destinations(tmp_path, database, hung, fast) -> None:
    outbox = Outbox(connect(database or tmp_path / "o.db"), clock=lambda: _dt.datetime.now(CST))
    for i in range(3):
        outbox.enqueue("HUNG", hung.url + "/exchange/bundles", f"report {i}".encode())
    first = outbox.enqueue("FAST", fast + "/exchange/bundles", b"report to another member")
    transport = HTTPTransport(timeout=3)
    lanes = Lanes(concurrency=2)
    started = time.monotonic()
    counts = outbox.deliver_due(transport, lanes=lanes, wait=1.0)
    assert time.monotonic() - started < 2.0
    assert counts == {"delivered": 1, "retry": 0, "dead": 0}
    assert outbox.get(first).status == "delivered"
    hung_rows = sorted(r.status for r in outbox.list() if r.destination == "HUNG")
    assert hung_rows == ["delivering", "delivering", "pending"]
    # another report for the other member while the hung one still holds its lane
    second = outbox.enqueue("FAST", fast + "/exchange/bundles", b"a later report")
    started = time.monotonic()
    assert outbox.deliver_due(transport, lanes=lanes, wait=1.0)["delivered"] == 1
    assert time.monotonic() - started < 2.0 and outbox.get(second).status == "delivered"
    # the hung member's deliveries time out in their own lane and wait for a retry; the third one goes next
    counts = outbox.deliver_due(transport, lanes=lanes, wait=None)
    assert counts["retry"] == 3 and counts["delivered"] == 0
    assert all(r.status == "pending" and "timed out" in r.last_error for r in outbox.list()
               if r.destination == "HUNG")
    lanes.close()


def test_lanes_keep_to_their_concurrency(tmp_path, database) -> None:
    outbox = Outbox(connect(database or tmp_path / "o.db"), clock=lambda: _dt.datetime.now(CST))
    for i in range(6):
        outbox.enqueue("D", "http://d.test/exchange/bundles", f"r{i}".encode())
    lock, now, peak = threading.Lock(), [0], [0]

    def slow(url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return classify(200)

    from gateway.exchange.transports import MockTransport

    transport = MockTransport(slow)
    assert outbox.deliver_due(transport, lanes=Lanes(concurrency=3), wait=None)["delivered"] == 6
    assert peak[0] == 3
    assert [c[1] for c in transport.calls][:3] == [b"r0", b"r1", b"r2"]  # started in the order queued


# -- a member gateway delivering through its lanes, and endpoints that move --------------------------------------


def message(n: int) -> bytes:
    """通江's blood count as a new message ``n`` (its own message id and report number)."""
    framed = LIS.read_bytes()
    text = framed[framed.index(b"\x0b") + 1:framed.index(b"\x1c")]
    return text.replace(b"TJ2611200001", f"TJL{n:07d}".encode()).replace(b"R2611200001", f"RL{n:07d}".encode())


def issue(world, n: int) -> str:
    outcomes = world.gateways["tongjiang"].pipeline.ingest(message(n), "hl7v2", channel="mllp")
    return next(o.bundle["id"] for o in outcomes if o.signed is not None)


@pytest.fixture
def clock() -> Clock:
    return Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))


def test_a_member_gateway_delivers_to_others_while_one_hangs(tmp_path, clock, hung, member_database) -> None:
    target: dict[str, object] = {}
    server = make_server("127.0.0.1", 0, lambda env, start: target["app"](env, start), threaded=True)  # type: ignore
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cdc_url = f"http://127.0.0.1:{server.server_port}"
    try:
        world = build_world(tmp_path, clock, {"tongjiang": "http://tongjiang.test", "fuling": hung.url,
                                              "sccdc": cdc_url}, database=member_database)
        target["app"] = world.gateways["sccdc"].app
        tj = world.gateways["tongjiang"].pipeline.exchange
        tj.transport = HTTPTransport(timeout=4)
        for n in range(3):
            tj.push(issue(world, n), FL)
        to_cdc = tj.push(issue(world, 3), CDC)
        results: list[dict[str, int]] = []
        passing = threading.Thread(target=lambda: results.append(tj.deliver(wait=6.0)))
        started = time.monotonic()
        passing.start()

        def status(row: int) -> str:
            db = connect(world.gateways["tongjiang"].settings.database_locator)
            try:
                return str(db.execute("SELECT status FROM outbox WHERE id = ?", [row]).fetchone()[0])
            finally:
                db.conn.close()

        while status(to_cdc) != "delivered" and time.monotonic() - started < 10:
            time.sleep(0.05)
        assert time.monotonic() - started < 2.5, "the hung member held up the delivery to another member"
        # queued while the pass still waits on the hung member: started by the same pass, at once
        later = tj.push(issue(world, 4), CDC)
        queued = time.monotonic()
        while status(later) != "delivered" and time.monotonic() - queued < 10:
            time.sleep(0.05)
        assert time.monotonic() - queued < 2.5
        passing.join(timeout=30)
        assert results and results[0]["delivered"] == 2
        assert world.gateways["sccdc"].pipeline.store.search("DiagnosticReport", []).total == 2
    finally:
        server.shutdown()


class Routed:
    """Hands each request to the member app its host names; records every URL; some hosts are down."""

    def __init__(self, apps: dict[str, object]) -> None:
        self.apps = apps
        self.down: set[str] = set()
        self.urls: list[str] = []

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        self.urls.append(url)
        host = urlsplit(url).netloc
        if host in self.down or host not in self.apps:
            return SendResult(False, retryable=True, error="cannot reach the receiver: ConnectionError")
        resp = self.apps[host].test_client().post(urlsplit(url).path, data=payload, headers=headers)  # type: ignore
        return classify(resp.status_code, resp.data)

    def get(self, url: str, headers: dict[str, str]) -> SendResult:
        return SendResult(False, status=405, error="GET not handled")


def test_deliveries_follow_an_endpoint_that_moved(tmp_path, clock, member_database) -> None:
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
    world = build_world(tmp_path, clock, urls, database=member_database)
    fl_gw = world.gateways["fuling"]
    routed = Routed({"fuling.test": fl_gw.app})
    tj = world.gateways["tongjiang"].pipeline.exchange
    tj.transport = routed
    waiting, dead, fresh, delivered = (issue(world, n) for n in range(4))
    done = tj.push(delivered, FL)
    tj.deliver()
    assert tj.outbox.get(done).status == "delivered"

    routed.down.add("fuling.test")  # 涪陵 moves: its old address no longer answers
    row_waiting = tj.push(waiting, FL)
    row_dead = tj.push(dead, FL)
    row_fresh = tj.push(fresh, FL)
    tj.outbox.max_attempts = 1  # every failure of this pass is the last one
    tj.deliver()
    tj.outbox.max_attempts = 12
    for row in (row_waiting, row_dead, row_fresh):
        assert tj.outbox.get(row).status == "dead"
    tj.outbox.retry(row_waiting)
    clock.advance(minutes=1)
    tj.deliver()  # still the old address
    assert tj.outbox.get(row_waiting).status == "pending"

    # the authority publishes 涪陵's new address; its gateway answers there
    moved = {MEMBERS[k].uscc: u for k, u in urls.items()} | {FL: "http://fuling-new.test"}
    world.publish(build_demo_registry(clock(), version=2, endpoints=moved, reuse=world.registry))
    fl_gw.pipeline.exchange.settings = dataclasses.replace(fl_gw.settings, public_url="http://fuling-new.test")
    routed.apps["fuling-new.test"] = fl_gw.app
    routed.urls.clear()

    clock.advance(hours=2)  # the waiting one is due again
    tj.outbox.retry(row_dead)  # an operator puts the dead one back
    assert tj.push(fresh, FL) == row_fresh  # a fresh send of the third
    tj.outbox.replay(done)  # and sends the delivered one again
    counts = tj.deliver()
    assert counts == {"delivered": 4, "retry": 0, "dead": 0}
    assert routed.urls and all(u == "http://fuling-new.test/exchange/bundles" for u in routed.urls)
    for row in (row_waiting, row_dead, row_fresh, done):
        entry = tj.outbox.get(row)
        assert entry.status == "delivered" and entry.url == "http://fuling-new.test/exchange/bundles"
    assert tj.endpoint_of(FL) == "http://fuling-new.test/exchange/bundles"


def test_a_destination_not_in_the_registry_now_is_not_sent_to(tmp_path, clock, member_database) -> None:
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
    world = build_world(tmp_path, clock, urls, database=member_database)
    routed = Routed({"fuling.test": world.gateways["fuling"].app})
    tj = world.gateways["tongjiang"].pipeline.exchange
    tj.transport = routed
    tj.push(issue(world, 1), FL)
    signed = tj.outbox.list()[0]
    payload = bytes(tj.db.execute("SELECT payload FROM outbox WHERE id = ?", [signed.id]).fetchone()[0])
    gone = tj.outbox.enqueue("91510000MA00000000", "http://gone.test/exchange/bundles", payload)  # left the registry
    assert tj.deliver() == {"delivered": 1, "retry": 0, "dead": 1}
    assert routed.urls == ["http://fuling.test/exchange/bundles"]
    assert "not in the registry snapshot" in tj.outbox.get(gone).last_error


class _Trickle(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        if self.path == "/big":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_an_answer_that_trickles_or_grows_is_cut_off() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        transport = HTTPTransport(timeout=1.0, max_answer_bytes=1 << 20)
        started = time.monotonic()
        slow = transport.send(base + "/slow", b"{}", {})
        assert time.monotonic() - started < 2.5
        assert not slow.ok and slow.retryable and slow.error == "timed out"
        big = transport.send(base + "/big", b"{}", {})
        assert not big.ok and "larger than" in big.error
    finally:
        server.shutdown()
