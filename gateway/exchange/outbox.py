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
- **retryable** failures (timeouts, connection errors, 5xx, 429, a 401 for the
  call's assertion: a clock difference an operator sets right) are told apart
  from **permanent** ones (other 4xx: a bad signature will not get better);
- a row being delivered is **leased** by its process (``host:pid``); a sender
  killed mid-delivery leaves a lease that expires, and the row is delivered
  again after restart — at once when the process is one of this machine's and
  known gone — the receiver's idempotency makes that safe; a sender that stops
  (Ctrl-C, a clean stop) gives its deliveries back, due at once;
- each destination has its own **lane** (:class:`Lanes`): its deliveries run
  in its own threads, a few at a time, so a slow or hung member holds up only
  its own deliveries, never another member's;
- a delivery goes to the endpoint the registry names **when it is sent** (not
  when it was queued), so a member that moved is reached at its new address;
- operators list, retry (dead → pending) and replay (delivered → send again);
  the attempts made before are kept (``earlier_attempts``) beside the fresh
  budget;
- the end states that are not a delivery (given up, refused) and the first
  failure of each budget are handed to ``on_failed`` (the sender's audit entry),
  not every retry.

Pure of network code: a :class:`Transport` does the sending.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import jsonutil, metrics
from gateway.errors import GatewayError, NotFound
from gateway.store.db import Database, transaction
from gateway.store.outbox import OutboxPort, OutboxStore

__all__ = ["Outbox", "OutboxRow", "Delivery", "Failure", "Lanes", "Transport", "SendResult", "backoff_seconds"]

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
    lease_until: float | None = None  # (delivering) when the sender's hold on it ends, epoch seconds
    lease_owner: str | None = None  # (delivering) the process holding it, host:pid
    earlier_attempts: int = 0  # attempts made before an operator put it back (retry, replay, a send again)

    @property
    def total_attempts(self) -> int:
        """Every attempt made, those before an operator put it back included."""
        return self.attempts + self.earlier_attempts

    @property
    def leased_since(self) -> str | None:
        """(delivering) when its holder took it: the row is not written meanwhile."""
        return self.updated_at if self.status == "delivering" else None


@dataclass(frozen=True)
class Failure:
    """An attempt that did not deliver and is worth an audit entry: the end of a delivery that failed, or the first
    failure of its attempt budget (the retries between are not)."""

    status: str  # pending (to be tried again) or dead
    reason: str  # retrying, gave-up, refused-by-receiver, not-sent
    error: str  # as the outbox keeps it (last_error)
    attempts: int  # this one included, of the current budget
    max_attempts: int
    http_status: int  # 0: no answer (or nothing sent)

    @property
    def refused(self) -> bool:
        """Refused by the destination (a 4xx, or for good) or not sendable, rather than a destination that could not
        be reached or failed: an audit outcome of 4, not 8."""
        return self.reason in ("refused-by-receiver", "not-sent") or 400 <= self.http_status < 500

    @property
    def then(self) -> str:
        """What becomes of the delivery, in the words of its audit entry."""
        return ("tried again later" if self.status == "pending" else
                "not tried again unless an operator puts it back (gateway outbox retry)")


@dataclass(frozen=True)
class Delivery:
    """One delivery taken from the outbox to be sent now."""

    id: int
    destination: str
    url: str
    payload: bytes
    payload_sha256: str
    attempts: int  # attempts made before this one


class Lanes:
    """One lane per destination: its deliveries run in its own threads, ``concurrency`` at a time.

    Kept by a long-running sender across delivery passes: a delivery still
    waiting on a slow member when a pass ends goes on in its lane, and its
    result waits in :attr:`finished` for the next pass to record. Lanes never
    touch the database; only the pass that records does.
    """

    def __init__(self, concurrency: int = 2) -> None:
        self.concurrency = max(1, int(concurrency))
        self.finished: queue.SimpleQueue[tuple[Delivery, SendResult, dict[str, Any] | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self._threads: dict[str, int] = {}
        self._work: dict[str, queue.SimpleQueue[Any]] = {}
        self._flying: set[int] = set()

    def free(self, destination: str) -> int:
        """How many more deliveries to ``destination`` may start now."""
        with self._lock:
            return self.concurrency - self._busy.get(destination, 0)

    def in_flight(self) -> int:
        """Deliveries started and not yet finished, all lanes together."""
        with self._lock:
            return sum(self._busy.values())

    def in_flight_ids(self) -> list[int]:
        """The outbox rows of the deliveries started and not yet finished."""
        with self._lock:
            return sorted(self._flying)

    def submit(self, delivery: Delivery,
               job: Callable[[Delivery], tuple[SendResult, dict[str, Any] | None]]) -> None:
        """Run ``job(delivery)`` in the destination's lane; its outcome goes to :attr:`finished`."""
        dest = delivery.destination
        with self._lock:
            self._busy[dest] = self._busy.get(dest, 0) + 1
            self._flying.add(delivery.id)
            work = self._work.setdefault(dest, queue.SimpleQueue())
            if self._threads.get(dest, 0) < min(self.concurrency, self._busy[dest]):
                self._threads[dest] = self._threads.get(dest, 0) + 1
                threading.Thread(target=self._run, args=(dest, work), daemon=True,
                                 name=f"outbox-lane-{dest}").start()
        work.put((delivery, job))

    def _run(self, destination: str, work: queue.SimpleQueue[Any]) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            delivery, job = item
            try:
                result, receipt = job(delivery)
            except Exception as exc:  # noqa: BLE001 - a lane outlives any one delivery
                log.warning("outbox delivery id=%s failed in its lane: %s", delivery.id, type(exc).__name__)
                result = SendResult(False, retryable=True, error=f"delivery failed: {type(exc).__name__}")
                receipt = None
            self.finished.put((delivery, result, receipt))
            with self._lock:
                self._busy[destination] -= 1
                self._flying.discard(delivery.id)

    def close(self) -> None:
        """Stop the lanes' threads once their current deliveries are done."""
        with self._lock:
            for dest, work in self._work.items():
                for _ in range(self._threads.get(dest, 0)):
                    work.put(None)
            self._threads.clear()
            self._work.clear()


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
    """The outbox table of one gateway database.

    Its rows are read and written through :class:`gateway.store.outbox.OutboxStore`
    (SQLite or PostgreSQL); several gateway nodes may deliver from one shared
    database, as a delivery is claimed under a lease in one transaction.
    """

    def __init__(self, db: Database, *, clock: Callable[[], _dt.datetime],
                 max_attempts: int = 12, lease_seconds: float = 120.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.db = db
        self.clock = clock
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.rand = rand
        self.store: OutboxPort = OutboxStore(db)
        self.store.ensure_table()

    def _now(self) -> tuple[float, str]:
        now = self.clock()
        return now.timestamp(), now.isoformat(timespec="milliseconds")

    def enqueue(self, destination: str, url: str, payload: bytes, kind: str = "bundle") -> int:
        """Add a delivery (call inside the transaction of the action it belongs to).

        The same payload to the same destination is queued once; its existing id is returned.
        """
        ts, iso = self._now()
        digest = hashlib.sha256(payload).hexdigest()
        return self.store.add(destination, url, kind, payload, digest, ts, iso)[0]

    def _due(self, ts: float) -> bool:
        """Whether anything may be claimed now (a read: no write lock taken when there is nothing)."""
        return self.store.any_due(ts)

    def _claim(self, limit: int, free: Callable[[str], int] | None = None,
               per_destination: int | None = None, skip: set[int] | frozenset[int] = frozenset()) -> list[Delivery]:
        """Lease up to ``limit`` due deliveries, oldest first, at most ``free(destination)`` per destination.

        ``skip``: deliveries not to take again (those already tried by the calling pass).
        """
        ts, iso = self._now()
        if limit <= 0 or not self._due(ts):
            return []
        cap = per_destination or limit

        def choose(candidates: list[tuple[int, str]]) -> list[int]:
            room: dict[str, int] = {}
            chosen: list[int] = []
            for row_id, dest in candidates:
                if row_id in skip:
                    continue
                if dest not in room:
                    room[dest] = free(dest) if free is not None else limit
                if room[dest] > 0 and len(chosen) < limit:
                    room[dest] -= 1
                    chosen.append(row_id)
            return chosen

        # select the due rows and lease the chosen ones: one transaction under the write lock (see OutboxStore.claim)
        claimed = self.store.claim(ts, iso, ts + self.lease_seconds, cap + len(skip), choose)
        return [Delivery(*row) for row in claimed]

    def deliver_due(self, transport: Transport, *, limit: int = 50,
                    headers: Callable[[str], dict[str, str]] | None = None,
                    on_receipt: Callable[[Delivery, SendResult], dict[str, Any]] | None = None,
                    on_delivered: Callable[[Database, Delivery, dict[str, Any] | None], None]
                    | None = None,
                    url_for: Callable[[str], str] | None = None,
                    lanes: Lanes | None = None, wait: float | None = None,
                    on_failed: Callable[[Database, Delivery, Failure], None] | None = None) -> dict[str, int]:
        """Try every due delivery once, each destination in its own lane. Returns counts by result.

        ``headers(url)`` adds per-request headers (the peer authentication
        assertion); ``on_receipt(delivery, result)`` checks the receiver's answer
        in the lane and returns the receipt to keep (raise to treat the answer as
        a failure); ``on_delivered(db, delivery, receipt)`` runs inside the
        transaction that records a delivery (e.g. its audit entry);
        ``url_for(destination)`` names the endpoint in force now (default: the
        one stored when the delivery was queued), and a destination it refuses
        is not sent to. ``on_failed(db, delivery, failure)`` runs inside the
        transaction that records a delivery's end that is not one (dead) or the
        first failure of its attempt budget (e.g. their audit entries).

        ``lanes``: a long-running sender's lanes, kept between calls; the call
        then returns when its deliveries are done or after ``wait`` seconds,
        whichever comes first, and a delivery still waiting on a slow member is
        recorded by a later call. While it waits, newly due deliveries to other
        destinations are started too. With ``wait`` None the call returns when
        nothing is on its way any more. Without ``lanes`` the call has its own.
        """
        own = lanes is None
        used = lanes if lanes is not None else Lanes()
        deadline = None if wait is None else time.monotonic() + wait
        counts = {"delivered": 0, "retry": 0, "dead": 0}
        started: set[int] = set()
        tried: set[int] = set()  # each delivery is tried once per call, however long the call waits

        def job(delivery: Delivery) -> tuple[SendResult, dict[str, Any] | None]:
            extra = headers(delivery.url) if headers else {}
            result = transport.send(delivery.url, delivery.payload,
                                    {"Idempotency-Key": delivery.payload_sha256, **extra})
            receipt: dict[str, Any] | None = None
            if result.ok and on_receipt is not None:
                try:
                    receipt = on_receipt(delivery, result)
                except Exception as exc:  # noqa: BLE001 - an unverifiable receipt is not a delivery
                    result = SendResult(False, retryable=True, status=result.status,
                                        error=f"receipt not accepted: {exc}"[:300])
            return result, receipt

        def record(item: tuple[Delivery, SendResult, dict[str, Any] | None]) -> None:
            delivery, result, receipt = item
            started.discard(delivery.id)
            tried.add(delivery.id)
            counts[self._record(delivery, result, receipt, on_delivered, on_failed)] += 1

        try:
            while True:
                while True:  # record what the lanes finished (this call's deliveries and earlier ones)
                    try:
                        record(used.finished.get_nowait())
                    except queue.Empty:
                        break
                for delivery in self._claim(limit - len(tried), used.free, used.concurrency, tried):
                    tried.add(delivery.id)
                    if url_for is not None:
                        try:
                            delivery = Delivery(delivery.id, delivery.destination, url_for(delivery.destination),
                                                delivery.payload, delivery.payload_sha256, delivery.attempts)
                        except GatewayError as exc:  # no longer a member with an endpoint, or no registry now
                            refused = SendResult(False, retryable=exc.http_status >= 500, error=exc.message)
                            counts[self._record(delivery, refused, None, None, on_failed)] += 1
                            continue
                    started.add(delivery.id)
                    used.submit(delivery, job)
                if deadline is not None and (not started or time.monotonic() >= deadline):
                    break
                if deadline is None and not started and not used.in_flight() and used.finished.empty():
                    break  # without a limit: until nothing is on its way, earlier calls' deliveries too
                pause = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
                try:  # wait for the next finished delivery; after a pause, look for newly due ones
                    record(used.finished.get(timeout=pause))
                except queue.Empty:
                    pass
        finally:
            if own:
                used.close()
        return counts

    def _record(self, delivery: Delivery, result: SendResult, receipt: dict[str, Any] | None,
                on_delivered: Callable[[Database, Delivery, dict[str, Any] | None], None] | None,
                on_failed: Callable[[Database, Delivery, Failure], None] | None = None) -> str:
        attempts = delivery.attempts + 1
        ts, iso = self._now()
        failure: Failure | None = None
        if result.ok:
            status, error, next_at = "delivered", "", ts
        elif result.retryable and attempts < self.max_attempts:
            status = "pending"
            error = result.error or f"HTTP {result.status}"
            next_at = ts + backoff_seconds(attempts, rand=self.rand)
            if delivery.attempts == 0:  # the first failure of its budget (queued, retried or replayed): said once
                failure = Failure(status, "retrying", error, attempts, self.max_attempts, result.status)
        else:
            status, next_at = "dead", ts
            why, reason = (("gave up after the last attempt", "gave-up") if result.retryable
                           else ("refused by the receiver", "refused-by-receiver") if result.status
                           else ("not sent: it cannot be", "not-sent"))  # (a status 0 failure never reached it)
            error = f"{result.error or f'HTTP {result.status}'} ({why})"
            failure = Failure(status, reason, error, attempts, self.max_attempts, result.status)
        with transaction(self.db):
            self.store.record(delivery.id, status, attempts, next_at, delivery.url, error,
                              jsonutil.dumps(receipt) if receipt else None, iso)
            if status == "delivered" and on_delivered is not None:
                on_delivered(self.db, delivery, receipt)
            if failure is not None and on_failed is not None:
                on_failed(self.db, delivery, failure)
        level = logging.INFO if status == "delivered" else logging.WARNING
        log.log(level, "outbox delivery id=%s to=%s attempt=%d status=%s %s", delivery.id, delivery.destination,
                attempts, status, error if status != "delivered" else "")
        ended = "delivered" if status == "delivered" else ("dead" if status == "dead" else "retry")
        metrics.delivery_attempt(delivery.destination, ended)
        return ended

    # -- operators -----------------------------------------------------------------------

    def list(self, status: str | None = None, limit: int = 100) -> list[OutboxRow]:
        return [self._row(r) for r in self.store.rows(status, limit)]

    def get(self, row_id: int) -> OutboxRow:
        """:raises NotFound: no such delivery."""
        found = self.store.row(row_id)
        if found is None:
            raise NotFound(f"no outbox entry {row_id}", "outbox.id")
        return self._row(found)

    def retry(self, row_id: int) -> None:
        """Put a dead (or waiting) delivery back to be tried now, with a fresh attempt budget; the attempts made
        so far are kept (:attr:`OutboxRow.earlier_attempts`).

        :raises NotFound: no such delivery.
        """
        self._reset(row_id, ("dead", "pending"))

    def replay(self, row_id: int) -> None:
        """Send a delivered payload again (the receiver answers with its first receipt); the attempts made so far
        are kept, as by :meth:`retry`.

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
        self.store.reset(row_id, ts, iso)

    def give_back(self, row_ids: Sequence[int]) -> int:
        """Deliveries this sender started and stops without an answer for (it is stopping), due again now rather
        than when their leases end: the next sender tries them at once (a receiver that took one answers the next
        attempt with its first receipt). How many were given back."""
        ts, iso = self._now()
        return self.store.give_back(row_ids, ts, iso)

    def give_back_own(self) -> Sequence[int]:
        """Every delivery this process holds (it stops: interrupted), due again now with its attempts unchanged,
        rather than when its lease ends. The ids given back."""
        ts, iso = self._now()
        return self.store.give_back_own(ts, iso)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    @staticmethod
    def _row(r: dict[str, Any]) -> OutboxRow:
        return OutboxRow(id=r["id"], destination=r["destination"], url=r["url"], kind=r["kind"],
                         payload_sha256=r["payload_sha256"], status=r["status"], attempts=r["attempts"],
                         next_attempt_at=r["next_attempt_at"], last_error=r["last_error"],
                         receipt=jsonutil.loads(r["receipt"]) if r["receipt"] else None,
                         created_at=r["created_at"], updated_at=r["updated_at"], lease_until=r.get("lease_until"),
                         lease_owner=r.get("lease_owner"), earlier_attempts=int(r.get("earlier_attempts") or 0))
