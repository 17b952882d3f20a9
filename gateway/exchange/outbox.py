"""Outbox: reliable delivery of signed Bundles to other member gateways.

What operators of Mirth and OpenHIM complain about, designed out:

- a message is put in the outbox **in the same transaction** as the action that
  produced it, so a crash never loses or half-sends it;
- each delivery has an **idempotency key** (destination + SHA-256 of what is
  sent); the receiver stores a Bundle once and answers a repeat with the same
  receipt, so retrying after a timeout never duplicates;
- retries back off exponentially **with jitter** up to ``max_attempts``, then the
  row goes to **dead** (the dead-letter state) instead of retrying forever or
  blocking the rows behind it;
- **retryable** failures (timeouts, connection errors, 5xx, 429) are told apart
  from **permanent** ones (other 4xx: a bad signature will not get better);
- a row being delivered is **leased**; a sender killed mid-delivery leaves a
  lease that expires, and the row is delivered again after restart — the
  receiver's idempotency makes that safe;
- operators list, retry (dead → pending) and replay (delivered → send again).

Pure of network code: a :class:`Transport` does the sending.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlite_utils

from gateway import jsonutil
from gateway.errors import NotFound
from gateway.store.db import transaction

__all__ = ["Outbox", "OutboxRow", "Transport", "SendResult", "backoff_seconds"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    """What a transport got back."""

    ok: bool
    retryable: bool = False
    status: int = 0
    body: bytes = b""
    error: str = ""


class Transport(Protocol):
    """Sends one payload to one URL (HTTP in production, a fake in tests)."""

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        """Deliver; never raise for network problems (return a retryable result)."""

    def get(self, url: str, headers: dict[str, str]) -> SendResult:
        """Query (调阅); never raise for network problems."""


@dataclass
class OutboxRow:
    """One delivery."""

    id: int
    destination: str
    url: str
    kind: str
    payload_sha256: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str
    receipt: dict[str, Any] | None
    created_at: str
    updated_at: str


def backoff_seconds(attempts: int, *, base: float = 5.0, cap: float = 3600.0,
                    rand: Callable[[], float] = random.random) -> float:
    """Delay before attempt ``attempts + 1``: exponential, capped, with full jitter.

    ``base * 2**(attempts-1)`` capped at ``cap``, then a random point in its
    upper half, so that many senders coming back after a receiver outage do
    not all retry in the same second.
    """
    ceiling = min(cap, base * (2 ** max(0, attempts - 1)))
    return float(ceiling / 2 + rand() * ceiling / 2)


class Outbox:
    """The outbox table of one gateway database."""

    def __init__(self, db: sqlite_utils.Database, *, clock: Callable[[], _dt.datetime],
                 max_attempts: int = 12, lease_seconds: float = 120.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.db = db
        self.clock = clock
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.rand = rand
        if not db.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'outbox'").fetchone():
            from gateway.store.store import ensure_core_schema

            ensure_core_schema(db)  # the outbox table is defined with the rest, in store/schema.sql

    def _now(self) -> tuple[float, str]:
        now = self.clock()
        return now.timestamp(), now.isoformat(timespec="milliseconds")

    def enqueue(self, destination: str, url: str, payload: bytes, kind: str = "bundle") -> int:
        """Add a delivery (call inside the transaction of the action it belongs to).

        The same payload to the same destination is queued once; its existing id is returned.
        """
        ts, iso = self._now()
        digest = hashlib.sha256(payload).hexdigest()
        with transaction(self.db):
            self.db.execute(
                "INSERT OR IGNORE INTO outbox (destination, url, kind, payload, payload_sha256, status,"
                " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,'pending',?,?,?)",
                [destination, url, kind, payload, digest, ts, iso, iso])
            row = self.db.execute("SELECT id FROM outbox WHERE destination = ? AND payload_sha256 = ?",
                                  [destination, digest]).fetchone()
        return int(row[0])

    def _claim(self, limit: int) -> list[tuple[int, str, bytes, int, str]]:
        ts, iso = self._now()
        with transaction(self.db):
            # A lease that ran out belongs to a sender that died mid-delivery: deliver again.
            self.db.execute("UPDATE outbox SET status = 'pending', updated_at = ? WHERE status = 'delivering'"
                            " AND lease_until < ?", [iso, ts])
            rows = self.db.execute(
                "SELECT id, url, payload, attempts, payload_sha256 FROM outbox WHERE status = 'pending'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?", [ts, limit]).fetchall()
            for row in rows:
                self.db.execute("UPDATE outbox SET status = 'delivering', lease_until = ?, updated_at = ?"
                                " WHERE id = ?", [ts + self.lease_seconds, iso, row[0]])
        return [(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), str(r[4])) for r in rows]

    def deliver_due(self, transport: Transport, *, limit: int = 50,
                    headers: Callable[[str], dict[str, str]] | None = None,
                    on_receipt: Callable[[int, SendResult], dict[str, Any]] | None = None) -> dict[str, int]:
        """Try every due delivery once. Returns counts by result.

        ``headers(url)`` adds per-request headers (the peer authentication
        assertion); ``on_receipt(row_id, result)`` checks the receiver's answer
        and returns the receipt to keep (raise to treat the answer as a failure).
        """
        counts = {"delivered": 0, "retry": 0, "dead": 0}
        for row_id, url, payload, attempts, digest in self._claim(limit):
            extra = headers(url) if headers else {}
            result = transport.send(url, payload, {"Idempotency-Key": digest, **extra})
            receipt: dict[str, Any] | None = None
            if result.ok and on_receipt is not None:
                try:
                    receipt = on_receipt(row_id, result)
                except Exception as exc:  # an unverifiable receipt is not a delivery
                    result = SendResult(False, retryable=True, status=result.status,
                                        error=f"receipt not accepted: {exc}")
            counts[self._record(row_id, attempts + 1, result, receipt)] += 1
        return counts

    def _record(self, row_id: int, attempts: int, result: SendResult, receipt: dict[str, Any] | None) -> str:
        ts, iso = self._now()
        if result.ok:
            status, error, next_at = "delivered", "", ts
        elif result.retryable and attempts < self.max_attempts:
            status = "pending"
            error = result.error or f"HTTP {result.status}"
            next_at = ts + backoff_seconds(attempts, rand=self.rand)
        else:
            status, next_at = "dead", ts
            why = "gave up after the last attempt" if result.retryable else "refused by the receiver"
            error = f"{result.error or f'HTTP {result.status}'} ({why})"
        with transaction(self.db):
            self.db.execute(
                "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL,"
                " last_error = ?, receipt = COALESCE(?, receipt), updated_at = ? WHERE id = ?",
                [status, attempts, next_at, error, jsonutil.dumps(receipt) if receipt else None, iso, row_id])
        level = logging.INFO if status == "delivered" else logging.WARNING
        log.log(level, "outbox delivery id=%s attempt=%d status=%s %s", row_id, attempts, status,
                error if status != "delivered" else "")
        return "delivered" if status == "delivered" else ("dead" if status == "dead" else "retry")

    # -- operators -----------------------------------------------------------------------

    def list(self, status: str | None = None, limit: int = 100) -> list[OutboxRow]:
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self.db.query(f"SELECT * FROM outbox {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        return [self._row(r) for r in rows]

    def get(self, row_id: int) -> OutboxRow:
        """:raises NotFound: no such delivery."""
        rows = list(self.db.query("SELECT * FROM outbox WHERE id = ?", [row_id]))
        if not rows:
            raise NotFound(f"no outbox entry {row_id}", "outbox.id")
        return self._row(rows[0])

    def retry(self, row_id: int) -> None:
        """Put a dead (or waiting) delivery back to be tried now, with a fresh attempt budget.

        :raises NotFound: no such delivery.
        """
        self._reset(row_id, ("dead", "pending"))

    def replay(self, row_id: int) -> None:
        """Send a delivered payload again (the receiver answers with its first receipt).

        :raises NotFound: no such delivery.
        """
        self._reset(row_id, ("delivered", "dead", "pending"))

    def _reset(self, row_id: int, allowed: tuple[str, ...]) -> None:
        row = self.get(row_id)
        if row.status not in allowed:
            from gateway.errors import InputError

            raise InputError(f"outbox entry {row_id} is {row.status}; only {', '.join(allowed)} can be sent again",
                             "outbox.status")
        ts, iso = self._now()
        with transaction(self.db):
            self.db.execute("UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?,"
                            " last_error = '', updated_at = ? WHERE id = ?", [ts, iso, row_id])

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.db.query("SELECT status, count(*) AS n FROM outbox GROUP BY 1")}

    @staticmethod
    def _row(r: dict[str, Any]) -> OutboxRow:
        return OutboxRow(id=r["id"], destination=r["destination"], url=r["url"], kind=r["kind"],
                         payload_sha256=r["payload_sha256"], status=r["status"], attempts=r["attempts"],
                         next_attempt_at=r["next_attempt_at"], last_error=r["last_error"],
                         receipt=jsonutil.loads(r["receipt"]) if r["receipt"] else None,
                         created_at=r["created_at"], updated_at=r["updated_at"])
