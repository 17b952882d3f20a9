"""Recognition decisions, physicians' overrides and withdrawals: the SQL of :mod:`gateway.recognition.store`.

Three append-only tables (``sql/<engine>/decisions.sql``; triggers refuse UPDATE
and DELETE on both engines). Every write runs in the caller's transaction when
there is one, so that a decision commits together with its audit entry.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gateway.store import parts, schema, tallies
from gateway.store.db import Database, dialect

__all__ = ["DecisionsPort", "DecisionStore", "PART", "DECISION_COLUMNS"]

PART = "decisions"
#: Indexes added to ``decisions.sql`` after its tables were first released (made at the next use of a database made
#: before).
ADDED_INDEXES = ("recognition_decisions_report",)
_LAST_TABLE = "recognition_withdrawals"

#: Columns of a decision row, in the order :meth:`DecisionStore.add_decision` takes them.
DECISION_COLUMNS = ("decision_id", "bundle_id", "entry", "report_id", "patient_system", "patient_value",
                    "issuer_uscc", "receiver_uscc", "catalogue_id", "item_code", "item_label", "outcome",
                    "snapshot_version", "snapshot_digest", "decided_at", "recorded_at", "decision_json")
_INSERT_DECISION = (f"INSERT INTO recognition_decisions ({', '.join(DECISION_COLUMNS)})"
                    f" VALUES ({', '.join('?' * len(DECISION_COLUMNS))}) ON CONFLICT DO NOTHING")

#: SQLite: many decisions as one statement (rows of :data:`_ROW`), at most _SQLITE_CHUNK of them (bound values stay
#: well under SQLite's limit of 999 in older builds).
_INSERT_MANY = f"INSERT INTO recognition_decisions ({', '.join(DECISION_COLUMNS)}) VALUES "
_ROW = f"({', '.join('?' * len(DECISION_COLUMNS))})"
_SQLITE_CHUNK = 999 // len(DECISION_COLUMNS)

#: PostgreSQL: many decisions as one statement over arrays of column values, in the order given.
_INSERT_DECISIONS = (
    f"INSERT INTO recognition_decisions ({', '.join(DECISION_COLUMNS)}) SELECT {', '.join(DECISION_COLUMNS)}"
    " FROM unnest(" + ", ".join(f"CAST(? AS {'bigint' if c == 'snapshot_version' else 'text'}[])"
                                for c in DECISION_COLUMNS)
    + f") WITH ORDINALITY AS d ({', '.join(DECISION_COLUMNS)}, n) ORDER BY n ON CONFLICT DO NOTHING")


class DecisionsPort(Protocol):
    """What the recognition module asks of the decisions' storage."""

    def ensure_schema(self) -> None:
        """Create the tables when missing (inside the caller's transaction, if any)."""

    def exists(self) -> bool:
        """Whether decisions were ever stored here (a read-only check: nothing is created)."""

    def add_decision(self, values: Sequence[Any]) -> int:
        """Store one decision (:data:`DECISION_COLUMNS`); 1 when new, 0 when kept already."""

    def add_decisions(self, rows: Sequence[Sequence[Any]]) -> int:
        """Store decisions (each :data:`DECISION_COLUMNS`), in order; how many were new (the others are kept
        already). On PostgreSQL one statement for all of them."""

    def receiver_of(self, decision_id: str) -> str | None:
        """The receiver a decision was made for, or None when there is no such decision."""

    def about(self, decision_id: str) -> tuple[str | None, ...] | None:
        """What a decision was about: (receiver, issuer, report id, patient system, patient value), or None when
        there is no such decision."""

    def add_override(self, decision_id: str, reason: str, physician_system: str, physician: str,
                     note: str | None, recorded_at: str) -> int:
        """Record an override beside its decision; returns its id."""

    def overrides(self, decision_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """(override_id, decision_id, reason, physician_system, physician_id, note, recorded_at), oldest first."""

    def withdrawals(self, decision_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """(decision_id, reason, superseded_by, withdrawn_at) of those withdrawn."""

    def standing_on_report(self, bundle_id: str, report_id: str) -> list[tuple[Any, ...]]:
        """Decisions on one report version not withdrawn yet, oldest first: (decision_id, decision_json,
        receiver_uscc, issuer_uscc, patient_system, patient_value, outcome)."""

    def add_withdrawal(self, decision_id: str, reason: str, superseded_by: str, withdrawn_at: str) -> None:
        """Record a withdrawal beside its decision."""

    def decision(self, decision_id: str) -> tuple[str, str] | None:
        """(decision_json, recorded_at) of one decision, or None."""

    def listed(self, *, patient: tuple[str, str] | None, issuer: str | None, item: str | None,
               outcome: str | None, withdrawn_reads_as: str, limit: int) -> list[tuple[str, str, str]]:
        """(decision_id, decision_json, recorded_at), newest decision time first, filtered."""


class DecisionStore:
    """:class:`DecisionsPort` on SQLite and PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        if parts.ensure(self.db, PART, _LAST_TABLE, ADDED_INDEXES):
            tallies.ensure(self.db, ("decisions",))  # made now: its count starts with it, in the same transaction

    def exists(self, table: str = "recognition_decisions") -> bool:
        return parts.ready(self.db, PART) or bool(schema.columns(self.db, table))

    def add_decision(self, values: Sequence[Any]) -> int:
        return int(self.db.execute(_INSERT_DECISION, list(values)).rowcount)

    def add_decisions(self, rows: Sequence[Sequence[Any]]) -> int:
        if len(rows) < 2:
            return sum(self.add_decision(values) for values in rows)
        if dialect(self.db) != "postgresql":
            # one statement per _SQLITE_CHUNK rows, in order: SQLite journals the pages a statement changes (so
            # that the running count's trigger can be undone with it) once per statement, not once per row
            added = 0
            for start in range(0, len(rows), _SQLITE_CHUNK):
                chunk = rows[start:start + _SQLITE_CHUNK]
                added += int(self.db.execute(
                    _INSERT_MANY + ", ".join([_ROW] * len(chunk)) + " ON CONFLICT DO NOTHING",
                    [x for values in chunk for x in values]).rowcount)
            return added
        return int(self.db.conn.execute_arrays(_INSERT_DECISIONS, [list(column) for column in zip(*rows)]).rowcount)

    def receiver_of(self, decision_id: str) -> str | None:
        row = self.db.execute("SELECT receiver_uscc FROM recognition_decisions WHERE decision_id = ?",
                              [decision_id]).fetchone()
        return None if row is None else str(row[0])

    def about(self, decision_id: str) -> tuple[str | None, ...] | None:
        row = self.db.execute("SELECT receiver_uscc, issuer_uscc, report_id, patient_system, patient_value"
                              " FROM recognition_decisions WHERE decision_id = ?", [decision_id]).fetchone()
        return None if row is None else tuple(None if v is None else str(v) for v in row)

    def add_override(self, decision_id: str, reason: str, physician_system: str, physician: str,
                     note: str | None, recorded_at: str) -> int:
        row = self.db.execute(
            "INSERT INTO recognition_overrides (decision_id, reason, physician_system, physician_id, note, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, ?) RETURNING override_id",
            [decision_id, reason, physician_system, physician, note, recorded_at]).fetchone()
        return int(row[0])

    def overrides(self, decision_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        if not decision_ids:
            return []
        marks = ",".join("?" * len(decision_ids))
        return [tuple(r) for r in self.db.execute(
            "SELECT override_id, decision_id, reason, physician_system, physician_id, note, recorded_at"
            f" FROM recognition_overrides WHERE decision_id IN ({marks}) ORDER BY override_id",
            list(decision_ids)).fetchall()]

    def withdrawals(self, decision_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        if not decision_ids or not self.exists(_LAST_TABLE):
            return []
        marks = ",".join("?" * len(decision_ids))
        return [tuple(r) for r in self.db.execute(
            "SELECT decision_id, reason, superseded_by, withdrawn_at FROM recognition_withdrawals"
            f" WHERE decision_id IN ({marks}) ORDER BY decision_id", list(decision_ids)).fetchall()]

    def standing_on_report(self, bundle_id: str, report_id: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.db.execute(
            "SELECT d.decision_id, d.decision_json, d.receiver_uscc, d.issuer_uscc,"
            " d.patient_system, d.patient_value, d.outcome FROM recognition_decisions d"
            " LEFT JOIN recognition_withdrawals w ON w.decision_id = d.decision_id"
            " WHERE d.bundle_id = ? AND d.report_id = ? AND w.decision_id IS NULL ORDER BY d.decided_at, d.decision_id",
            [bundle_id, report_id]).fetchall()]

    def add_withdrawal(self, decision_id: str, reason: str, superseded_by: str, withdrawn_at: str) -> None:
        self.db.execute("INSERT INTO recognition_withdrawals (decision_id, reason, superseded_by, withdrawn_at)"
                        " VALUES (?, ?, ?, ?)", [decision_id, reason, superseded_by, withdrawn_at])

    def decision(self, decision_id: str) -> tuple[str, str] | None:
        if not self.exists():
            return None
        row = self.db.execute("SELECT decision_json, recorded_at FROM recognition_decisions WHERE decision_id = ?",
                              [decision_id]).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def listed(self, *, patient: tuple[str, str] | None, issuer: str | None, item: str | None,
               outcome: str | None, withdrawn_reads_as: str, limit: int) -> list[tuple[str, str, str]]:
        if not self.exists():
            return []
        where: list[str] = []
        params: list[Any] = []
        if patient is not None:
            where.append("patient_value = ? AND patient_system = ?")
            params += list(patient)
        if issuer is not None:
            where.append("issuer_uscc = ?")
            params.append(issuer)
        if item is not None:
            where.append("item_code = ?")
            params.append(item)
        if outcome is not None and not self.exists(_LAST_TABLE):
            where.append("outcome = ?")
            params.append(outcome)
        elif outcome is not None:
            withdrawn = "decision_id IN (SELECT decision_id FROM recognition_withdrawals)"
            if outcome == withdrawn_reads_as:
                where.append(f"(outcome = ? OR {withdrawn})")
            else:
                where.append(f"(outcome = ? AND NOT {withdrawn})")
            params.append(outcome)
        sql = "SELECT decision_id, decision_json, recorded_at FROM recognition_decisions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY decided_at DESC, decision_id LIMIT ?"
        return [(str(r[0]), str(r[1]), str(r[2])) for r in self.db.execute(sql, [*params, limit]).fetchall()]
