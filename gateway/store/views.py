"""Read models: the read-only queries behind the console's pages, ``/metrics``, ``/health``, the demo and the bench.

Every statement here only reads, answers the same on SQLite and PostgreSQL,
and names its row order (PostgreSQL has no implicit one). The few places where
the engines differ (the list of tables, a field inside a JSON text) branch on
:func:`gateway.store.db.dialect`.

The figures of ``/metrics`` and the checks of ``/health`` are read at scrape
time from these short, indexed queries (``messages(status, id)``,
``outbox(status, next_attempt_at)``), so they are right whichever process
changed the database.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.store import schema, tallies
from gateway.store.db import Database, dialect
from gateway.store.exchange import unpacked

#: Messages whose channels the console's filter offers (the latest ones).
_CHANNELS_SEEN = 20_000
#: What the audit log's key index leaves out of a value (as gateway.audit.render.index_values does).
_CONTROL = re.compile(r"[\x00-\x1f]")

__all__ = ["ReadModelsPort", "ReadModels", "MessageFilter", "OPEN_DELIVERY_STATES", "WAITING_DELIVERY_STATES"]

#: Outbox states a delivery waits in, or ends in without being delivered.
OPEN_DELIVERY_STATES = ("pending", "delivering", "dead")
#: Outbox states of a delivery not yet delivered nor given up.
WAITING_DELIVERY_STATES = ("pending", "delivering")

_MESSAGE_COLUMNS = ("id", "received_at", "channel", "format", "sender", "message_id", "status", "ack_code")
_ERROR_COLUMNS = ("id", "received_at", "channel", "sender", "message_id", "status", "issues")
_OUTBOX_COLUMNS = ("id", "destination", "url", "status", "attempts", "last_error", "receipt", "created_at",
                   "updated_at", "next_attempt_at", "lease_until", "lease_owner", "earlier_attempts")
_RECEIVED_COLUMNS = ("bundle_id", "doc_sha256", "issuer_uscc", "signed_at")


@dataclass(frozen=True)
class MessageFilter:
    """A search of received messages: each field that is set must match (dates: YYYY-MM-DD, both included)."""

    status: str = ""
    channel: str = ""
    sender: str = ""
    message_id: str = ""
    received_from: str = ""
    received_to: str = ""

    @classmethod
    def of(cls, args: Mapping[str, Any]) -> "MessageFilter":
        """From a page's query arguments: ``status``, ``channel``, ``sender``, ``control_id``, ``from``, ``to``."""
        def arg(name: str) -> str:
            return str(args.get(name) or "")

        return cls(status=arg("status"), channel=arg("channel"), sender=arg("sender"), message_id=arg("control_id"),
                   received_from=arg("from")[:10], received_to=arg("to")[:10])

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("status", self.status), ("channel", self.channel), ("sender", self.sender),
                              ("message_id", self.message_id)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.received_from:
            clauses.append("substr(received_at, 1, 10) >= ?")
            params.append(self.received_from)
        if self.received_to:
            clauses.append("substr(received_at, 1, 10) <= ?")
            params.append(self.received_to)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class ReadModelsPort(Protocol):
    """What the console, ``/metrics``, ``/health``, the demo and the bench read from a gateway's database."""

    def tables(self) -> set[str]: ...

    def database_bytes(self) -> int: ...

    # messages
    def queue_depth(self) -> int: ...
    def queued_up_to(self, limit: int) -> int: ...
    def oldest_queued_at(self) -> str | None: ...
    def newest_queued_id(self) -> int | None: ...
    def message_times(self, since: _dt.datetime | None = None) -> Iterator[tuple[str, str, str]]: ...
    def latest_errors(self, limit: int) -> list[dict[str, Any]]: ...
    def search_messages(self, search: MessageFilter, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]: ...
    def message_channels(self, also: str = "") -> list[str]: ...
    def message_status_counts(self) -> dict[str, int]: ...

    # deliveries and exchange
    def deliveries_by_state(self, states: Sequence[str] | None = None) -> list[tuple[str, str, int]]: ...
    def deliveries_in(self, state: str) -> int: ...
    def oldest_waiting_delivery_at(self) -> str | None: ...
    def outbox_rows(self, destination: str, state: str, limit: int) -> list[dict[str, Any]]: ...
    def received_bundles(self, limit: int) -> list[dict[str, Any]]: ...
    def issued_bundles(self) -> list[tuple[str, bytes]]: ...
    def latest_issued_bundle_id(self) -> str | None: ...

    # audit log, decisions, registry
    def audit_entries(self, kind: str, limit: int) -> list[tuple[int, dict[str, Any]]]: ...
    def decision_entries(self, kind: str, decision_id: str) -> list[tuple[int, dict[str, Any]]]: ...
    def last_own_checkpoint_at(self) -> str | None: ...
    def decision_outcomes(self) -> dict[str, int]: ...
    def registry_history(self) -> list[dict[str, Any]]: ...


class ReadModels:
    """:class:`ReadModelsPort` on a gateway database, SQLite or PostgreSQL (reads only; no transaction needed)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = dialect(db)
        self._tables: set[str] | None = None

    def database_bytes(self) -> int:
        """The database's size on disk: tables, indexes and TOAST (PostgreSQL), or the file's pages (SQLite)."""
        if self.dialect == "postgresql":
            return int(self.db.execute("SELECT pg_database_size(current_database())").fetchone()[0])
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        return int(pages) * int(self.db.execute("PRAGMA page_size").fetchone()[0])

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.db.execute(sql, list(params)).fetchone()
        return row[0] if row else None

    def tables(self) -> set[str]:
        """The names of the tables the database holds (parts are created when first used); read once per object."""
        if self._tables is not None:
            return self._tables
        if self.dialect == "postgresql":
            # (the catalog itself: information_schema.tables slows with every schema the database holds)
            sql = ("SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relnamespace = (SELECT oid FROM"
                   " pg_catalog.pg_namespace WHERE nspname = current_schema()) AND c.relkind IN ('r', 'v', 'f', 'p')")
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        self._tables = {str(r[0]) for r in self.db.execute(sql).fetchall()}
        return self._tables

    # -- messages ----------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Messages answered on receipt and waiting for the queue reader."""
        return int(self._one("SELECT count(*) FROM messages WHERE status = 'queued'") or 0)

    def queued_up_to(self, limit: int) -> int:
        """Messages waiting in the queue, counted up to ``limit`` (cheap however long the queue is)."""
        return int(self._one("SELECT count(*) FROM (SELECT 1 FROM messages WHERE status = 'queued' LIMIT ?) AS q",
                             [limit]) or 0)

    def oldest_queued_at(self) -> str | None:
        """When the message waiting longest in the queue was received (None: none waits)."""
        found = self._one("SELECT received_at FROM messages WHERE status = 'queued' ORDER BY id LIMIT 1")
        return None if found is None else str(found)

    def newest_queued_id(self) -> int | None:
        """The record id of the message that came last of those waiting in the queue (None: none waits)."""
        found = self._one("SELECT id FROM messages WHERE status = 'queued' ORDER BY id DESC LIMIT 1")
        return None if found is None else int(found)

    def message_times(self, since: _dt.datetime | None = None) -> Iterator[tuple[str, str, str]]:
        """(received_at, channel, status) of every message in the order received, or of those received since
        ``since`` (and a day before it, which covers a time kept with another UTC offset; the caller sorts them by
        the time it reads) in the order of their times, for the overview's charts: read through
        ``messages_received``, not by reading every message ever received."""
        if since is None:
            rows = self.db.execute("SELECT received_at, channel, status FROM messages ORDER BY id")
        else:
            rows = self.db.execute("SELECT received_at, channel, status FROM messages WHERE received_at >= ?"
                                   " ORDER BY received_at, id", [(since - _dt.timedelta(days=1)).isoformat()])
        for received, channel, status in rows:
            yield str(received), str(channel), str(status)

    def latest_errors(self, limit: int) -> list[dict[str, Any]]:
        """The last refused or failed messages, newest first, with their issues (a list)."""
        rows = [dict(zip(_ERROR_COLUMNS, r)) for r in self.db.execute(
            f"SELECT {', '.join(_ERROR_COLUMNS)} FROM messages WHERE status IN ('refused', 'failed')"
            " ORDER BY id DESC LIMIT ?", [limit])]
        for row in rows:
            try:
                row["issues"] = json.loads(row["issues"] or "[]")
            except (TypeError, ValueError):
                row["issues"] = []
        return rows

    def search_messages(self, search: MessageFilter, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
        """How many messages match, and one page of them (newest first)."""
        where, params = search.where()
        total = int(self._one(f"SELECT count(*) FROM messages{where}", params) or 0)
        rows = [dict(zip(_MESSAGE_COLUMNS, r)) for r in self.db.execute(
            f"SELECT {', '.join(_MESSAGE_COLUMNS)} FROM messages{where} ORDER BY id DESC LIMIT ? OFFSET ?",
            [*params, limit, offset])]
        return total, rows

    def message_channels(self, also: str = "") -> list[str]:
        """The channels of the latest :data:`_CHANNELS_SEEN` messages (and ``also``, the one chosen now), sorted:
        what the console's filter offers, read without going through every message ever received."""
        found = {str(r[0]) for r in self.db.execute(
            "SELECT DISTINCT channel FROM (SELECT channel FROM messages ORDER BY id DESC LIMIT ?) AS latest",
            [_CHANNELS_SEEN])}
        return sorted(found | ({also} if also else set()))

    def message_status_counts(self) -> dict[str, int]:
        return tallies.figures(self.db, "messages")

    # -- deliveries and exchange ---------------------------------------------------------------

    def deliveries_by_state(self, states: Sequence[str] | None = None) -> list[tuple[str, str, int]]:
        """(destination, state, count) of the outbox, in those ``states`` (all when None)."""
        where, params = "", list(states or ())
        if states is not None:
            where = f" WHERE status IN ({', '.join('?' for _ in params)})" if params else " WHERE 1 = 0"
        return [(str(d), str(s), int(n)) for d, s, n in self.db.execute(
            f"SELECT destination, status, count(*) FROM outbox{where} GROUP BY destination, status"
            " ORDER BY destination, status", params)]

    def deliveries_in(self, state: str) -> int:
        kept = tallies.counts(self.db, "deliveries")
        if kept is not None:
            return kept.get(state, 0)
        return int(self._one("SELECT count(*) FROM outbox WHERE status = ?", [state]) or 0)

    def oldest_waiting_delivery_at(self) -> str | None:
        """When the oldest delivery not yet delivered nor given up was put in the outbox (None: none waits)."""
        found = self._one("SELECT created_at FROM outbox WHERE status IN ('pending', 'delivering') ORDER BY id LIMIT 1")
        return None if found is None else str(found)

    def outbox_rows(self, destination: str, state: str, limit: int) -> list[dict[str, Any]]:
        """Deliveries (to ``destination``, in ``state`` when given), by destination, newest first; receipts parsed."""
        clauses, params = [], []
        if destination:
            clauses.append("destination = ?")
            params.append(destination)
        if state:
            clauses.append("status = ?")
            params.append(state)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        present = schema.columns(self.db, "outbox")  # (a database no release of these columns has opened to write:
        # an earlier release's, read on read-only media, lacks the holder and the attempts before a put-back)
        chosen = [c if c in present or not present else ("NULL" if c == "lease_owner" else "0") + f" AS {c}"
                  for c in _OUTBOX_COLUMNS]
        rows = [dict(zip(_OUTBOX_COLUMNS, r)) for r in self.db.execute(
            f"SELECT {', '.join(chosen)} FROM outbox{where} ORDER BY destination, id DESC LIMIT ?",
            [*params, limit])]
        for row in rows:
            row["receipt"] = json.loads(row["receipt"]) if row["receipt"] else None
            row["earlier_attempts"] = int(row["earlier_attempts"] or 0)
            row["total_attempts"] = int(row["attempts"] or 0) + row["earlier_attempts"]  # (as OutboxRow counts them)
        return rows

    def received_bundles(self, limit: int) -> list[dict[str, Any]]:
        """Signed Bundles received from other members, newest first."""
        return [dict(zip(_RECEIVED_COLUMNS, r)) for r in self.db.execute(
            f"SELECT {', '.join(_RECEIVED_COLUMNS)} FROM signed_bundles WHERE direction = 'received'"
            " ORDER BY signed_at DESC, doc_sha256 LIMIT ?", [limit])]

    def _issued_order(self, descending: bool) -> str:
        way = " DESC" if descending else ""
        # Bundles signed in the same instant: in the order they were signed (SQLite's rowid), else by id.
        tie = "rowid" if self.dialect == "sqlite" else "bundle_id"
        return f"ORDER BY signed_at{way}, {tie}{way}"

    def issued_bundles(self) -> list[tuple[str, bytes]]:
        """(bundle id, signed text) of every Bundle this member signed, oldest first."""
        return [(str(b), unpacked(t)) for b, t in self.db.execute(
            "SELECT bundle_id, text FROM signed_bundles WHERE direction = 'issued' " + self._issued_order(False))]

    def latest_issued_bundle_id(self) -> str | None:
        found = self._one("SELECT bundle_id FROM signed_bundles WHERE direction = 'issued' "
                          + self._issued_order(True) + " LIMIT 1")
        return None if found is None else str(found)

    # -- audit log, decisions, registry ----------------------------------------------------------

    def audit_entries(self, kind: str, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """The last ``limit`` audit entries of ``kind`` (sequence number and content), newest first."""
        return [(int(seq), json.loads(content)) for seq, content in self.db.execute(
            "SELECT seq, content FROM audit_log WHERE kind = ? ORDER BY seq DESC LIMIT ?", [kind, limit])]

    def decision_entries(self, kind: str, decision_id: str) -> list[tuple[int, dict[str, Any]]]:
        """Audit entries of ``kind`` (decision, override...) about one decision, in the order they were written.

        Looked up through the audit log's key index, never by reading every entry of the kind: each of these
        entries names the decision as an entity (``urn:uuid:<id>``, or the id itself when it is no UUID). Only
        an id the index cannot hold (one with a control character) is searched for among all entries.
        """
        if self.dialect == "postgresql":
            field = "CAST(content AS jsonb) -> 'facts' ->> 'decision_id'"
        else:
            field = "json_extract(content, '$.facts.decision_id')"
        if _CONTROL.search(decision_id):
            return [(int(seq), json.loads(content)) for seq, content in self.db.execute(
                f"SELECT seq, content FROM audit_log WHERE kind = ? AND {field} = ? ORDER BY seq",
                [kind, decision_id])]
        # driven by the key index (CROSS JOIN keeps SQLite, which has no statistics, from walking every entry of
        # the kind instead); the few entries naming the decision are then told apart by their kind and facts
        join = "JOIN" if self.dialect == "postgresql" else "CROSS JOIN"
        return [(int(seq), json.loads(content)) for seq, content in self.db.execute(
            f"SELECT DISTINCT l.seq, l.content FROM audit_key k {join} audit_log l ON l.seq = k.seq"
            " WHERE k.p = 'entity:identifier' AND k.v IN (?, ?) AND l.kind = ? AND "
            + field.replace("content", "l.content") + " = ? ORDER BY l.seq",
            [f"urn:uuid:{decision_id}", decision_id, kind, decision_id])]

    def last_own_checkpoint_at(self) -> str | None:
        """When this member last signed a checkpoint of its audit log (None: never, or no checkpoint table yet)."""
        if "audit_checkpoint" not in self.tables():
            return None
        # CAST: ``own`` is an integer 0/1 on SQLite and may be a boolean on PostgreSQL; both cast to 1 for "ours".
        found = self._one("SELECT time FROM audit_checkpoint WHERE CAST(own AS INTEGER) = 1 ORDER BY id DESC LIMIT 1")
        return None if found is None else str(found)

    def decision_outcomes(self) -> dict[str, int]:
        """Recognition decisions recorded, by outcome (empty before the first decision made the table)."""
        if "recognition_decisions" not in self.tables():
            return {}
        return tallies.figures(self.db, "decisions")

    def registry_history(self) -> list[dict[str, Any]]:
        """Registry snapshots applied here (version, digest, when), newest first; empty before the first."""
        if "registry_applied" not in self.tables():
            return []
        return [dict(zip(("version", "digest", "applied_at"), r)) for r in self.db.execute(
            "SELECT version, digest, applied_at FROM registry_applied ORDER BY version DESC, applied_at DESC")]
