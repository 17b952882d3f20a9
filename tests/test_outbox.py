"""Outbox: backoff with jitter, retryable vs permanent, dead letters, leases after a crash, operator commands."""
from __future__ import annotations

import threading

import pytest

from gateway.errors import InputError, NotFound
from gateway.exchange.outbox import Outbox, SendResult, backoff_seconds
from gateway.exchange.transports import MockTransport, classify
from gateway.store.db import connect

URL = "http://127.0.0.1:1/exchange/bundles"


@pytest.fixture
def locator(tmp_path, database):
    """The outbox's database on the backend chosen with ``--backend``."""
    return database or tmp_path / "o.db"


@pytest.fixture
def outbox(locator, clock):
    return Outbox(connect(locator), clock=clock, max_attempts=4, lease_seconds=60, rand=lambda: 0.5)


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert [backoff_seconds(n, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [2.5, 5.0, 10.0, 20.0]
    assert [backoff_seconds(n, rand=lambda: 1.0) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert backoff_seconds(40, rand=lambda: 1.0) == 3600.0
    assert backoff_seconds(40, rand=lambda: 0.0) == 1800.0


@pytest.mark.parametrize("status, ok, retryable", [(200, True, False), (201, True, False), (400, False, False),
                                                   (401, False, False), (409, False, False), (429, False, True),
                                                   (500, False, True), (503, False, True)])
def test_classify(status: int, ok: bool, retryable: bool) -> None:
    result = classify(status)
    assert (result.ok, result.retryable) == (ok, retryable)


def test_same_payload_to_same_destination_is_queued_once(outbox) -> None:
    a = outbox.enqueue("12500102MB0002006J", URL, b"{}")
    b = outbox.enqueue("12500102MB0002006J", URL, b"{}")
    c = outbox.enqueue("12510000MB00030095", URL, b"{}")
    assert a == b != c
    assert outbox.counts() == {"pending": 2}


def test_receiver_down_then_back_loses_nothing(outbox, clock) -> None:
    outbox.enqueue("D", URL, b"payload")
    down = MockTransport(lambda u, p, h: SendResult(False, retryable=True, error="cannot reach the receiver"))
    assert outbox.deliver_due(down) == {"delivered": 0, "retry": 1, "dead": 0}
    assert outbox.deliver_due(down) == {"delivered": 0, "retry": 0, "dead": 0}  # not due yet
    clock.advance(seconds=10)  # backoff after attempt 1 with rand 0.5: 3.75 s
    assert outbox.deliver_due(down)["retry"] == 1
    clock.advance(seconds=3600)
    up = MockTransport(lambda u, p, h: SendResult(True, status=200, body=b'{"ok":1}'))
    assert outbox.deliver_due(up)["delivered"] == 1
    row = outbox.list()[0]
    assert row.status == "delivered" and row.attempts == 3
    assert up.calls[0][1] == b"payload"
    assert up.calls[0][2]["Idempotency-Key"] == row.payload_sha256


def test_permanent_refusal_goes_straight_to_dead(outbox) -> None:
    outbox.enqueue("D", URL, b"x")
    refused = MockTransport(lambda u, p, h: classify(401, b"bad signature"))
    assert outbox.deliver_due(refused)["dead"] == 1
    row = outbox.list()[0]
    assert row.status == "dead" and row.attempts == 1 and "refused by the receiver" in row.last_error


def test_a_delivery_that_cannot_be_sent_is_not_said_to_be_refused_by_the_receiver(outbox) -> None:
    """A failure before anything reached the receiver (no endpoint for the member in the registry snapshot) is
    this gateway's own: dead, saying it was not sent."""
    outbox.enqueue("D", URL, b"x")
    local = MockTransport(lambda u, p, h: SendResult(False, retryable=False,
                                                     error="member D has no endpoint in the registry snapshot"))
    assert outbox.deliver_due(local)["dead"] == 1
    row = outbox.list()[0]
    assert row.last_error == "member D has no endpoint in the registry snapshot (not sent: it cannot be)"


def test_retry_budget_ends_in_dead_then_operator_retry(outbox, clock) -> None:
    outbox.enqueue("D", URL, b"x")
    down = MockTransport(lambda u, p, h: classify(503))
    for _ in range(4):
        outbox.deliver_due(down)
        clock.advance(hours=2)
    row = outbox.list()[0]
    assert row.status == "dead" and row.attempts == 4 and "gave up" in row.last_error
    assert outbox.deliver_due(down) == {"delivered": 0, "retry": 0, "dead": 0}  # dead rows are left alone
    outbox.retry(row.id)
    assert outbox.get(row.id).status == "pending" and outbox.get(row.id).attempts == 0
    assert outbox.deliver_due(MockTransport(lambda u, p, h: classify(200)))["delivered"] == 1


def test_sender_killed_mid_delivery_resumes_after_the_lease(outbox, clock) -> None:
    outbox.enqueue("D", URL, b"x")
    outbox._claim(10)  # claimed, then the process died before recording the result
    assert outbox.list()[0].status == "delivering"
    ok = MockTransport(lambda u, p, h: classify(200))
    assert outbox.deliver_due(ok)["delivered"] == 0  # still leased
    clock.advance(seconds=61)
    assert outbox.deliver_due(ok)["delivered"] == 1
    assert len(ok.calls) == 1


def test_unverifiable_receipt_is_not_a_delivery(outbox) -> None:
    outbox.enqueue("D", URL, b"x")

    def check(row_id, result):
        raise ValueError("receipt signature does not verify")

    counts = outbox.deliver_due(MockTransport(lambda u, p, h: classify(200, b"{}")), on_receipt=check)
    assert counts["retry"] == 1 and "receipt not accepted" in outbox.list()[0].last_error


def test_replay_and_bad_operator_requests(outbox) -> None:
    row_id = outbox.enqueue("D", URL, b"x")
    outbox.deliver_due(MockTransport(lambda u, p, h: classify(200)), on_receipt=lambda i, r: {"hash": "h"})
    assert outbox.get(row_id).receipt == {"hash": "h"}
    outbox.replay(row_id)
    assert outbox.get(row_id).status == "pending"
    with pytest.raises(InputError, match="is pending; only dead can be sent again"):
        outbox._reset(row_id, ("dead",))
    with pytest.raises(NotFound):
        outbox.retry(999)


def test_nodes_sharing_one_database_never_take_the_same_delivery(outbox, locator, clock) -> None:
    """Delivery workers of several gateway nodes claim from one database: each row goes to one of them."""
    ids = {outbox.enqueue(f"D{n % 5}", URL, f"payload {n}".encode()) for n in range(40)}
    workers = 4
    taken: list[list[int]] = [[] for _ in range(workers)]
    start = threading.Barrier(workers)
    failed: list[BaseException] = []

    def work(n: int) -> None:
        node = Outbox(connect(locator), clock=clock, lease_seconds=60)  # a connection per node (and thread)
        try:
            start.wait()
            while True:
                claimed = node._claim(3)
                if not claimed:
                    return
                taken[n] += [d.id for d in claimed]
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)
        finally:
            node.db.conn.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failed
    every = [i for of_node in taken for i in of_node]
    assert sorted(every) == sorted(ids)  # every delivery taken, none twice
    assert outbox.counts() == {"delivering": 40}
    other = Outbox(connect(locator), clock=clock, lease_seconds=60)
    try:
        assert other._claim(50) == []  # all leased
        clock.advance(seconds=61)  # the workers died: their leases ran out, another node takes the rows again
        again = other._claim(50)
        assert sorted(d.id for d in again) == sorted(ids)
        assert outbox._claim(50) == []
    finally:
        other.db.conn.close()


def test_a_sender_stopping_gives_back_the_deliveries_on_their_way(outbox, clock) -> None:
    """A clean stop while a receiver has not answered: the delivery is due again at once for the next start, rather
    than held as 'delivering' until its lease ends (some 95 s by default), which no operator command could change."""
    from gateway.exchange.outbox import Lanes

    outbox.enqueue("D", URL, b"payload")
    release = threading.Event()

    def hung(url, payload, headers):
        release.wait(10)
        return SendResult(True, status=200, body=b"{}")

    lanes = Lanes(2)
    try:
        assert outbox.deliver_due(MockTransport(hung), lanes=lanes, wait=0.2) == {"delivered": 0, "retry": 0, "dead": 0}
        [row] = outbox.list()
        assert row.status == "delivering" and row.lease_until == clock().timestamp() + 60
        assert lanes.in_flight_ids() == [row.id]
        assert outbox.give_back(lanes.in_flight_ids()) == 1
        [back] = outbox.list()
        assert back.status == "pending" and back.next_attempt_at == clock().timestamp() and back.attempts == 0
        assert outbox.give_back([back.id]) == 0  # (only a delivery still leased)
    finally:
        release.set()
        lanes.close()


def test_the_background_loop_gives_back_its_deliveries_as_it_stops() -> None:
    from types import SimpleNamespace

    from gateway.serve import _background_loop

    calls: list[int] = []
    stop = threading.Event()
    stop.set()
    pipeline = SimpleNamespace(exchange=SimpleNamespace(give_back_in_flight=lambda: calls.append(1) or 1))
    _background_loop(SimpleNamespace(delivery_interval=0.01), stop, pipeline=pipeline)
    assert calls == [1]
