"""The outbox's rows: the SQL of :mod:`gateway.exchange.outbox`, on SQLite and PostgreSQL.

The ``outbox`` table itself belongs to the core part (``sql/<engine>/core.sql``).

Several gateway nodes may share one PostgreSQL database, each with its own
delivery workers. A delivery is taken by :meth:`OutboxStore.claim`, which is
one transaction: it hands back deliveries whose lease ran out, reads the due
rows and marks the chosen ones ``delivering`` with a lease, all while holding
the write lock (``BEGIN IMMEDIATE`` on SQLite, the advisory write lock taken at
``BEGIN`` on PostgreSQL). Every read in it runs after the lock is held, so it
sees every earlier claim committed: no two workers, on one node or several,
ever hold the same row at the same time, and a row whose worker died is taken
again once its lease has run out — or at once when that worker was a process
of this machine that is gone (``lease_owner``, ``host:pid``, looked up as the
leases of messages are: :func:`gateway.store.store.holder_alive`).

Two columns are added to an ``outbox`` table that lacks them when it is first
opened (``ALTER TABLE``, as the lease columns of ``messages`` were):
``lease_owner``, the process holding a delivery's lease, and
``earlier_attempts``, the attempts made before an operator put the delivery
back (retry, replay, a send again of a dead one), whose ``attempts`` then
counts afresh against the attempt budget.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.store import schema, tallies
from gateway.store.db import Database, transaction

__all__ = ["OutboxPort", "OutboxStore", "Claimed", "ADDED_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns of ``outbox`` that ``core.sql`` does not declare: added when a database lacking them is opened.
ADDED_COLUMNS = (("lease_owner", "TEXT"), ("earlier_attempts", "INTEGER NOT NULL DEFAULT 0"))

#: (id, destination, url, payload, payload_sha256, attempts) of a claimed delivery.
Claimed = tuple[int, str, str, bytes, str, int]


class OutboxPort(Protocol):
    """What the outbox asks of its storage."""

    def ensure_table(self) -> None:
        """Create the core tables (the outbox among them) when the outbox table is missing, and add the columns
        of :data:`ADDED_COLUMNS` it lacks."""

    def add(self, destination: str, url: str, kind: str, payload: bytes, digest: str, ts: float, iso: str
            ) -> tuple[int, bool]:
        """Queue a payload once per destination: (its id, True when queued again rather than new).

        A row queued before that is pending or dead is made due now, at ``url``; a dead one gets a fresh
        attempt budget (its attempts kept in ``earlier_attempts``). Inside the caller's transaction.
        """

    def any_due(self, ts: float) -> bool:
        """Whether anything may be claimed at ``ts`` (a read: no write lock)."""

    def claim(self, ts: float, iso: str, lease_until: float, per_destination: int,
              choose: Callable[[list[tuple[int, str]]], list[int]]) -> list[Claimed]:
        """In one transaction: expired leases, and leases of processes of this machine that are gone, back to
        pending; due rows (id, destination) oldest first (at most ``per_destination`` each) to ``choose``, and the
        chosen ones leased until ``lease_until`` by this process."""

    def record(self, row_id: int, status: str, attempts: int, next_at: float, url: str, error: str,
               receipt: str | None, iso: str) -> None:
        """The outcome of one attempt (inside the caller's transaction, if any)."""

    def rows(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        """Rows, newest first."""

    def row(self, row_id: int) -> dict[str, Any] | None:
        """One row, or None."""

    def reset(self, row_id: int, ts: float, iso: str) -> None:
        """Due again now, with a fresh attempt budget; the attempts made so far are kept (``earlier_attempts``)."""

    def give_back(self, row_ids: Sequence[int], ts: float, iso: str) -> int:
        """Deliveries still leased (``delivering``) by this process due again now, their leases ended; how many."""

    def give_back_own(self, ts: float, iso: str) -> list[int]:
        """Every delivery this process holds (``delivering``) due again now, its lease ended, attempts unchanged:
        the ids."""

    def counts(self) -> dict[str, int]:
        """How many rows in each status."""

    def destinations(self, digests: Sequence[str]) -> list[str]:
        """The destinations any of these payloads was queued for, in order."""


def _owner() -> str:
    from gateway.store.store import lease_owner

    return lease_owner()


def _gone(owner: str | None, until: float | None, ts: float) -> bool:
    """Whether a lease still unexpired at ``ts`` was taken by a process known to be gone (one of this machine
    that no longer runs: killed, crashed). Another machine's process is known by its lease alone."""
    from gateway.store.store import holder_alive

    return bool(owner) and until is not None and until >= ts and not holder_alive(owner, until, ts)


class OutboxStore:
    """:class:`OutboxPort` on SQLite and PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ensure_table(self) -> None:
        present = schema.columns(self.db, "outbox")
        if not present:
            from gateway.store.store import ensure_core_schema

            ensure_core_schema(self.db)  # the outbox table is defined with the core tables
            present = schema.columns(self.db, "outbox")
        if all(name in present for name, _ in ADDED_COLUMNS):
            return
        with transaction(self.db):  # looked at again under the write lock: another process may be adding them too
            present = schema.columns(self.db, "outbox")
            for name, kind in ADDED_COLUMNS:
                if name not in present:
                    log.info("database layout: adding %s to outbox", name)
                    self.db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {kind}")

    def add(self, destination: str, url: str, kind: str, payload: bytes, digest: str, ts: float, iso: str
            ) -> tuple[int, bool]:
        with transaction(self.db):
            row = self.db.execute("SELECT id, status FROM outbox WHERE destination = ? AND payload_sha256 = ?",
                                  [destination, digest]).fetchone()
            if row is None:
                new = self.db.execute(
                    "INSERT INTO outbox (destination, url, kind, payload, payload_sha256, status,"
                    " next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,'pending',?,?,?) RETURNING id",
                    [destination, url, kind, payload, digest, ts, iso, iso]).fetchone()
                return int(new[0]), False
            if row[1] in ("pending", "dead"):
                self.db.execute(
                    "UPDATE outbox SET url = ?, status = 'pending', next_attempt_at = ?, updated_at = ?,"
                    " earlier_attempts = earlier_attempts + CASE status WHEN 'dead' THEN attempts ELSE 0 END,"
                    " attempts = CASE status WHEN 'dead' THEN 0 ELSE attempts END,"
                    " last_error = CASE status WHEN 'dead' THEN '' ELSE last_error END WHERE id = ?",
                    [url, ts, iso, row[0]])
        return int(row[0]), True

    def _leased(self, ts: float) -> list[tuple[int, str | None, float | None]]:
        """(id, lease_owner, lease_until) of the deliveries leased and not expired at ``ts``: a few (those on
        their way now, ``delivery_concurrency`` per destination and sender)."""
        return [(int(r[0]), r[1], r[2]) for r in self.db.execute(
            "SELECT id, lease_owner, lease_until FROM outbox WHERE status = 'delivering' AND lease_until >= ?",
            [ts]).fetchall()]

    def any_due(self, ts: float) -> bool:
        if self.db.execute(
                "SELECT 1 FROM outbox WHERE (status = 'pending' AND next_attempt_at <= ?)"
                " OR (status = 'delivering' AND lease_until < ?) LIMIT 1", [ts, ts]).fetchone() is not None:
            return True
        return any(_gone(owner, until, ts) for _, owner, until in self._leased(ts))

    def claim(self, ts: float, iso: str, lease_until: float, per_destination: int,
              choose: Callable[[list[tuple[int, str]]], list[int]]) -> list[Claimed]:
        # One transaction under the write lock, from the first read to the last write: see the module's description.
        with transaction(self.db):
            # A lease that ran out belongs to a sender that died mid-delivery: deliver again.
            self.db.execute("UPDATE outbox SET status = 'pending', lease_owner = NULL, updated_at = ?"
                            " WHERE status = 'delivering' AND lease_until < ?", [iso, ts])
            # So does one whose holder, a process of this machine, is gone (killed, crashed): at once, not when the
            # lease runs out (attempts unchanged: the attempt it made has no outcome)
            for row_id, owner, until in self._leased(ts):
                if _gone(owner, until, ts):
                    log.warning("outbox delivery id=%s was left on its way by process %s, which is gone: due again "
                                "now", row_id, owner)
                    self.db.execute("UPDATE outbox SET status = 'pending', lease_owner = NULL, lease_until = NULL,"
                                    " next_attempt_at = ?, updated_at = ? WHERE id = ? AND status = 'delivering'",
                                    [ts, iso, row_id])
            candidates = [(int(r[0]), str(r[1])) for r in self.db.execute(
                "SELECT id, destination FROM (SELECT id, destination, next_attempt_at, row_number() OVER"
                " (PARTITION BY destination ORDER BY next_attempt_at, id) AS n FROM outbox"
                " WHERE status = 'pending' AND next_attempt_at <= ?) AS due WHERE n <= ?"
                " ORDER BY next_attempt_at, id", [ts, per_destination]).fetchall()]
            chosen = choose(candidates)
            if not chosen:
                return []
            owner = _owner()
            self.db.conn.executemany("UPDATE outbox SET status = 'delivering', lease_until = ?, lease_owner = ?,"
                                     " updated_at = ? WHERE id = ?", [(lease_until, owner, iso, i) for i in chosen])
            marks = ",".join("?" * len(chosen))
            rows = {int(r[0]): r for r in self.db.execute(
                f"SELECT id, destination, url, payload, payload_sha256, attempts FROM outbox WHERE id IN ({marks})",
                list(chosen)).fetchall()}
        return [(i, str(rows[i][1]), str(rows[i][2]), bytes(rows[i][3]), str(rows[i][4]), int(rows[i][5]))
                for i in chosen]

    def record(self, row_id: int, status: str, attempts: int, next_at: float, url: str, error: str,
               receipt: str | None, iso: str) -> None:
        self.db.execute(
            "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL, lease_owner = NULL,"
            " url = ?, last_error = ?, receipt = COALESCE(?, receipt), updated_at = ? WHERE id = ?",
            [status, attempts, next_at, url, error, receipt, iso, row_id])

    def rows(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        return list(self.db.query(f"SELECT * FROM outbox {where} ORDER BY id DESC LIMIT ?", [*args, limit]))

    def row(self, row_id: int) -> dict[str, Any] | None:
        found = list(self.db.query("SELECT * FROM outbox WHERE id = ?", [row_id]))
        return found[0] if found else None

    def reset(self, row_id: int, ts: float, iso: str) -> None:
        with transaction(self.db):
            self.db.execute("UPDATE outbox SET status = 'pending', earlier_attempts = earlier_attempts + attempts,"
                            " attempts = 0, next_attempt_at = ?, last_error = '', updated_at = ? WHERE id = ?",
                            [ts, iso, row_id])

    def give_back(self, row_ids: Sequence[int], ts: float, iso: str) -> int:
        if not row_ids:
            return 0
        with transaction(self.db):
            return sum(self.db.execute("UPDATE outbox SET status = 'pending', lease_until = NULL, lease_owner = NULL,"
                                       " next_attempt_at = ?, updated_at = ? WHERE id = ? AND status = 'delivering'"
                                       " AND (lease_owner IS NULL OR lease_owner = ?)",
                                       [ts, iso, row_id, _owner()]).rowcount for row_id in row_ids)

    def give_back_own(self, ts: float, iso: str) -> list[int]:
        with transaction(self.db):
            return [int(r[0]) for r in self.db.execute(
                "UPDATE outbox SET status = 'pending', lease_until = NULL, lease_owner = NULL, next_attempt_at = ?,"
                " updated_at = ? WHERE status = 'delivering' AND lease_owner = ? RETURNING id",
                [ts, iso, _owner()]).fetchall()]

    def counts(self) -> dict[str, int]:
        return tallies.figures(self.db, "deliveries")

    def destinations(self, digests: Sequence[str]) -> list[str]:
        if not digests:
            return []
        marks = ",".join("?" * len(digests))
        return [str(r[0]) for r in self.db.execute(
            f"SELECT DISTINCT destination FROM outbox WHERE payload_sha256 IN ({marks}) ORDER BY destination",
            list(digests)).fetchall()]
