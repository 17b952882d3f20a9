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
again once its lease has run out.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.store import schema, tallies
from gateway.store.db import Database, transaction

__all__ = ["OutboxPort", "OutboxStore", "Claimed"]

#: (id, destination, url, payload, payload_sha256, attempts) of a claimed delivery.
Claimed = tuple[int, str, str, bytes, str, int]


class OutboxPort(Protocol):
    """What the outbox asks of its storage."""

    def ensure_table(self) -> None:
        """Create the core tables (the outbox among them) when the outbox table is missing."""

    def add(self, destination: str, url: str, kind: str, payload: bytes, digest: str, ts: float, iso: str
            ) -> tuple[int, bool]:
        """Queue a payload once per destination: (its id, True when queued again rather than new).

        A row queued before that is pending or dead is made due now, at ``url``; a dead one gets a fresh
        attempt budget. Inside the caller's transaction.
        """

    def any_due(self, ts: float) -> bool:
        """Whether anything may be claimed at ``ts`` (a read: no write lock)."""

    def claim(self, ts: float, iso: str, lease_until: float, per_destination: int,
              choose: Callable[[list[tuple[int, str]]], list[int]]) -> list[Claimed]:
        """In one transaction: expired leases back to pending, due rows (id, destination) oldest first (at
        most ``per_destination`` each) to ``choose``, and the chosen ones leased until ``lease_until``."""

    def record(self, row_id: int, status: str, attempts: int, next_at: float, url: str, error: str,
               receipt: str | None, iso: str) -> None:
        """The outcome of one attempt (inside the caller's transaction, if any)."""

    def rows(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        """Rows, newest first."""

    def row(self, row_id: int) -> dict[str, Any] | None:
        """One row, or None."""

    def reset(self, row_id: int, ts: float, iso: str) -> None:
        """Due again now, with a fresh attempt budget."""

    def give_back(self, row_ids: Sequence[int], ts: float, iso: str) -> int:
        """Deliveries still leased (``delivering``) due again now, their leases ended; how many."""

    def counts(self) -> dict[str, int]:
        """How many rows in each status."""

    def destinations(self, digests: Sequence[str]) -> list[str]:
        """The destinations any of these payloads was queued for, in order."""


class OutboxStore:
    """:class:`OutboxPort` on SQLite and PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ensure_table(self) -> None:
        if not schema.columns(self.db, "outbox"):
            from gateway.store.store import ensure_core_schema

            ensure_core_schema(self.db)  # the outbox table is defined with the core tables

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
                    " attempts = CASE status WHEN 'dead' THEN 0 ELSE attempts END,"
                    " last_error = CASE status WHEN 'dead' THEN '' ELSE last_error END WHERE id = ?",
                    [url, ts, iso, row[0]])
        return int(row[0]), True

    def any_due(self, ts: float) -> bool:
        return self.db.execute(
            "SELECT 1 FROM outbox WHERE (status = 'pending' AND next_attempt_at <= ?)"
            " OR (status = 'delivering' AND lease_until < ?) LIMIT 1", [ts, ts]).fetchone() is not None

    def claim(self, ts: float, iso: str, lease_until: float, per_destination: int,
              choose: Callable[[list[tuple[int, str]]], list[int]]) -> list[Claimed]:
        # One transaction under the write lock, from the first read to the last write: see the module's description.
        with transaction(self.db):
            # A lease that ran out belongs to a sender that died mid-delivery: deliver again.
            self.db.execute("UPDATE outbox SET status = 'pending', updated_at = ? WHERE status = 'delivering'"
                            " AND lease_until < ?", [iso, ts])
            candidates = [(int(r[0]), str(r[1])) for r in self.db.execute(
                "SELECT id, destination FROM (SELECT id, destination, next_attempt_at, row_number() OVER"
                " (PARTITION BY destination ORDER BY next_attempt_at, id) AS n FROM outbox"
                " WHERE status = 'pending' AND next_attempt_at <= ?) AS due WHERE n <= ?"
                " ORDER BY next_attempt_at, id", [ts, per_destination]).fetchall()]
            chosen = choose(candidates)
            if not chosen:
                return []
            self.db.conn.executemany("UPDATE outbox SET status = 'delivering', lease_until = ?, updated_at = ?"
                                     " WHERE id = ?", [(lease_until, iso, i) for i in chosen])
            marks = ",".join("?" * len(chosen))
            rows = {int(r[0]): r for r in self.db.execute(
                f"SELECT id, destination, url, payload, payload_sha256, attempts FROM outbox WHERE id IN ({marks})",
                list(chosen)).fetchall()}
        return [(i, str(rows[i][1]), str(rows[i][2]), bytes(rows[i][3]), str(rows[i][4]), int(rows[i][5]))
                for i in chosen]

    def record(self, row_id: int, status: str, attempts: int, next_at: float, url: str, error: str,
               receipt: str | None, iso: str) -> None:
        self.db.execute(
            "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, lease_until = NULL, url = ?,"
            " last_error = ?, receipt = COALESCE(?, receipt), updated_at = ? WHERE id = ?",
            [status, attempts, next_at, url, error, receipt, iso, row_id])

    def rows(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        return list(self.db.query(f"SELECT * FROM outbox {where} ORDER BY id DESC LIMIT ?", [*args, limit]))

    def row(self, row_id: int) -> dict[str, Any] | None:
        found = list(self.db.query("SELECT * FROM outbox WHERE id = ?", [row_id]))
        return found[0] if found else None

    def reset(self, row_id: int, ts: float, iso: str) -> None:
        with transaction(self.db):
            self.db.execute("UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?,"
                            " last_error = '', updated_at = ? WHERE id = ?", [ts, iso, row_id])

    def give_back(self, row_ids: Sequence[int], ts: float, iso: str) -> int:
        if not row_ids:
            return 0
        with transaction(self.db):
            return sum(self.db.execute("UPDATE outbox SET status = 'pending', lease_until = NULL, next_attempt_at = ?,"
                                       " updated_at = ? WHERE id = ? AND status = 'delivering'",
                                       [ts, iso, row_id]).rowcount for row_id in row_ids)

    def counts(self) -> dict[str, int]:
        return tallies.figures(self.db, "deliveries")

    def destinations(self, digests: Sequence[str]) -> list[str]:
        if not digests:
            return []
        marks = ",".join("?" * len(digests))
        return [str(r[0]) for r in self.db.execute(
            f"SELECT DISTINCT destination FROM outbox WHERE payload_sha256 IN ({marks}) ORDER BY destination",
            list(digests)).fetchall()]
