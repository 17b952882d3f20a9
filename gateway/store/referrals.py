"""Referrals (移送) kept by this gateway: the SQL of :mod:`gateway.referrals`, on SQLite and PostgreSQL."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.store import parts
from gateway.store.db import Database

__all__ = ["ReferralsPort", "ReferralStore", "COLUMNS", "PART"]

PART = "referrals"

#: Columns of a referral as read and written (the receipt is kept apart).
COLUMNS = ("id", "side", "status", "reason", "requester", "owner", "issuer", "report", "decision_id",
           "bundle_hash", "note", "task", "created_at", "updated_at")
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM referrals"


class ReferralsPort(Protocol):
    """What referrals ask of their storage."""

    def ensure_schema(self) -> None:
        """Create the table when missing."""

    def row(self, referral_id: str) -> tuple[Any, ...] | None:
        """One referral (:data:`COLUMNS`), or None."""

    def rows(self, *, status: str | None, focus: str | None, limit: int) -> list[tuple[Any, ...]]:
        """Referrals, newest first, narrowed to a status and/or a focus (a reference, or the id it ends with)."""

    def standing(self, issuer: str, report: str, statuses: Sequence[str]) -> list[tuple[Any, ...]]:
        """Referrals made here (:data:`COLUMNS`) of one issuer's report, in one of ``statuses``, oldest first."""

    def add(self, values: Sequence[Any]) -> None:
        """A referral made here (:data:`COLUMNS`)."""

    def add_received(self, values: Sequence[Any], receipt: str) -> bool:
        """A referral received as its authority, with the receipt given; False when it is known already."""

    def side_and_receipt(self, referral_id: str) -> tuple[str, str | None] | None:
        """(side, receipt) of a referral, or None."""

    def side_and_status(self, referral_id: str) -> tuple[str, str] | None:
        """(side, status) of a referral, or None."""

    def evidence(self, referral_id: str) -> tuple[Any, ...] | None:
        """(issuer, report, decision_id, bundle_hash) of a referral, or None."""

    def answer(self, referral_id: str, status: str, task: str, note: str | None, at: str, was: str) -> bool:
        """Move a referral from status ``was`` to ``status`` (its note kept when ``note`` is None); False when it
        was no longer ``was``."""

    def set_status(self, referral_id: str, status: str, task: str, at: str) -> None:
        """Record a referral's new status and Task."""


class ReferralStore:
    """:class:`ReferralsPort` on SQLite and PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        parts.ensure(self.db, PART, "referrals")

    def row(self, referral_id: str) -> tuple[Any, ...] | None:
        found = self.db.execute(f"{_SELECT} WHERE id = ?", [referral_id]).fetchone()
        return None if found is None else tuple(found)

    def rows(self, *, status: str | None, focus: str | None, limit: int) -> list[tuple[Any, ...]]:
        where: list[str] = []
        args: list[Any] = []
        if status:
            where.append("status = ?")
            args.append(status)
        if focus:
            # the id a reference ends with, as SQLite's LIKE matches it (ASCII letters in either case)
            where.append("(report = ? OR lower(report) LIKE lower(?))")
            args += [focus, f"%/{focus}"]
        sql = _SELECT + ((" WHERE " + " AND ".join(where)) if where else "")
        return [tuple(r) for r in self.db.execute(sql + " ORDER BY created_at DESC, id LIMIT ?",
                                                  [*args, limit]).fetchall()]

    def standing(self, issuer: str, report: str, statuses: Sequence[str]) -> list[tuple[Any, ...]]:
        marks = ", ".join("?" * len(statuses))
        return [tuple(r) for r in self.db.execute(
            f"{_SELECT} WHERE side = 'requester' AND issuer = ? AND report = ? AND status IN ({marks})"
            " ORDER BY created_at, id", [issuer, report, *statuses]).fetchall()]

    def add(self, values: Sequence[Any]) -> None:
        self.db.execute(f"INSERT INTO referrals ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        list(values))

    def add_received(self, values: Sequence[Any], receipt: str) -> bool:
        return int(self.db.execute(
            f"INSERT INTO referrals ({', '.join(COLUMNS)}, receipt) VALUES "
            f"({', '.join('?' * (len(COLUMNS) + 1))}) ON CONFLICT (id) DO NOTHING",
            [*values, receipt]).rowcount) == 1

    def side_and_receipt(self, referral_id: str) -> tuple[str, str | None] | None:
        found = self.db.execute("SELECT side, receipt FROM referrals WHERE id = ?", [referral_id]).fetchone()
        return None if found is None else (str(found[0]), found[1])

    def side_and_status(self, referral_id: str) -> tuple[str, str] | None:
        found = self.db.execute("SELECT side, status FROM referrals WHERE id = ?", [referral_id]).fetchone()
        return None if found is None else (str(found[0]), str(found[1]))

    def evidence(self, referral_id: str) -> tuple[Any, ...] | None:
        found = self.db.execute("SELECT issuer, report, decision_id, bundle_hash FROM referrals WHERE id = ?",
                                [referral_id]).fetchone()
        return None if found is None else tuple(found)

    def answer(self, referral_id: str, status: str, task: str, note: str | None, at: str, was: str) -> bool:
        return int(self.db.execute(
            "UPDATE referrals SET status = ?, task = ?, note = COALESCE(?, note), updated_at = ?"
            " WHERE id = ? AND status = ?", [status, task, note, at, referral_id, was]).rowcount) == 1

    def set_status(self, referral_id: str, status: str, task: str, at: str) -> None:
        self.db.execute("UPDATE referrals SET status = ?, task = ?, updated_at = ? WHERE id = ?",
                        [status, task, at, referral_id])
