"""Outbox: backoff with jitter, retryable vs permanent, dead letters, leases after a crash, operator commands."""
from __future__ import annotations

import pytest

from gateway.errors import InputError, NotFound
from gateway.exchange.outbox import Outbox, SendResult, backoff_seconds
from gateway.exchange.transports import MockTransport, classify
from gateway.store.db import connect

URL = "http://127.0.0.1:1/exchange/bundles"


@pytest.fixture
def outbox(tmp_path, clock):
    return Outbox(connect(tmp_path / "o.db"), clock=clock, max_attempts=4, lease_seconds=60, rand=lambda: 0.5)


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
