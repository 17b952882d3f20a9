"""Store: messages, stage status and FHIR resources, in SQLite or PostgreSQL.

The one place that knows the gateway's core schema (``sql/<engine>/core.sql``). Raw
input is written first, in its own transaction, so nothing a member sent is
lost whatever happens next; a resent message hits the unique key
``(format, sender, message_id)`` and is answered from what was stored.

A message being worked is held by a *lease*: the process working it
(``host:pid``) and until when. Only a live holder with an unexpired lease
keeps others off it; a message whose holder died (killed, crashed) is taken
over by whoever comes next — the start-up recovery, the queue reader or a
resend of the same message — and worked again from its raw bytes.

Both engines run the same statements where they speak the same SQL; where they
differ (JSON inside a stored resource, the order stages were written in, string
search) :class:`Store` branches on :func:`gateway.store.db.dialect`. On both
engines the strings of HumanNames are indexed (``search_string``), folded by
:func:`fold_string` as they are written, so that a name search finds the same
resources on either and reads the names of one parameter, not every resource.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import logging
import math
import os
import socket
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway import jsonutil
from gateway.errors import InputError, InvalidSearch, Issue, NotFound
from gateway.fhir.search import (
    IMPLICIT_SYSTEMS,
    PARAM_ALIASES,
    SEARCH_PARAMS,
    check_sort,
    date_matches_sql,
    index_resource,
    parse_date_query,
    parse_token_query,
    split_or,
    unescape,
)
from gateway.naming import cs_url
from gateway.store import schema, tallies
from gateway.store.parts import statements
from gateway.store.db import Database, connect, dialect, spilling, transaction

__all__ = ["Store", "StorePort", "MessageRecord", "SearchResult", "IN_FLIGHT", "SCHEMA_VERSION", "ensure_core_schema",
           "message_patients_stored",
           "ensure_patient_keys",
           "lease_owner", "holder_alive", "holder_state", "UNSTORABLE", "fold_string",
           "Prepared", "Written"]

log = logging.getLogger(__name__)

#: Statuses of a message whose processing has not finished (held by a lease while it is worked).
IN_FLIGHT = ("received",)

#: Errors of a value the database cannot hold (a NUL in a text, a number out of range, a lone surrogate), on
#: either engine: raised by :meth:`Store.insert_raw` before anything is written.
UNSTORABLE: tuple[type[Exception], ...] = (ValueError, TypeError, OverflowError, sqlite3.InterfaceError,
                                           sqlite3.DataError)


def _data_error(exc: BaseException) -> bool:
    """True for PostgreSQL's "this value cannot be held" (psycopg's DataError), told without loading the driver."""
    return type(exc).__module__.startswith("psycopg") and any(c.__name__ == "DataError" for c in type(exc).__mro__)


def _this_host() -> str:
    """This machine as lease owners name it: its host name, and where the kernel tells them, the boot and the
    process-id namespace, so that containers or hosts that share a host name never take each other's process
    ids for their own (a lease of another namespace is judged by its time alone)."""
    name = socket.gethostname()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()[:8]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the host name alone
        return name
    return f"{name}/{boot}-{namespace}"


_HOST = _this_host()


#: Ids of one document's requests looked up at once (:meth:`Store.messages_keyed`).
_KEYED_CHUNK = 16


def lease_owner() -> str:
    """Who holds a lease taken by this process: ``host:pid`` (read at each call: workers are forked)."""
    return f"{_HOST}:{os.getpid()}"


def holder_alive(owner: str | None, until: float | None, now: float) -> bool:
    """Whether a lease still keeps others off a message: unexpired, and its holder not known to be dead.

    A holder on this host is looked up by its process id, so a message whose
    worker was killed is free at once rather than when its lease runs out.
    """
    if not owner or until is None or until <= now:
        return False
    host, _, pid = owner.rpartition(":")
    if host != _HOST or not pid.isdigit():
        return True  # another machine's process: its lease is all there is to go by
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped by its parent is a zombie: dead all the same
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def holder_state(owner: str | None, until: float | None, now: float) -> str:
    """What became of the process that took a message, in words: ``alive``, ``gone`` (it died or gave the
    message up) or ``expired`` (its lease ran out)."""
    if holder_alive(owner, until, now):
        return "alive"
    return "expired" if owner and holder_alive(owner, float("inf"), now) else "gone"


def _seconds_since(stamp: str | None, now: float) -> float:
    """Seconds from an ISO time the store wrote to ``now`` (epoch seconds); a long time when unreadable."""
    try:
        return now - _dt.datetime.fromisoformat(stamp or "").timestamp()
    except ValueError:
        return float("inf")


@dataclass
class MessageRecord:
    """One stored unit of input and what became of it."""

    id: int
    channel: str
    format: str
    sender: str
    message_id: str
    origin: str
    received_at: str
    size: int
    sha256: str
    status: str
    ack_code: str | None
    ack: bytes | None
    issues: list[dict[str, Any]]
    bundle_id: str | None
    lease_owner: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    #: sha256 of the document it carries, in exclusive canonical XML (CDA; None for other formats, or when
    #: stored before digests were kept): a resend in another wrapper is told by it without reading this again
    content_digest: str | None = None


@dataclass
class SearchResult:
    """One page of a search."""

    total: int
    resources: list[dict[str, Any]]
    #: where each resource of the page stands in the search's order: its sort keys (``search(after=...)`` with
    #: those of a page's last resource gives the page after it)
    keys: list[list[Any]] = field(default_factory=list)
    #: (a history) the ``last_updated`` its pages are held to: ``up_to`` as asked, or the newest when not asked
    until: str | None = None


#: A new message; nothing when its key is stored already (a resend).
_INSERT_MESSAGE = ("INSERT INTO messages (channel, format, sender, message_id, origin, received_at, size, sha256,"
                   " raw, status, updated_at, lease_owner, lease_until, attempts, content_digest)"
                   " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING RETURNING id")
#: A stage of a message (columns named: PostgreSQL's table has a ``seq`` column first).
_INSERT_STAGE = "INSERT INTO message_stages (message_ref, stage, status, at, detail) VALUES (?,?,?,?,?)"


def _now(clock: Callable[[], _dt.datetime]) -> str:
    return clock().isoformat(timespec="milliseconds")


def _issue_dicts(issues: list[Issue]) -> list[dict[str, Any]]:
    return [{"severity": i.severity, "code": i.code, "location": i.location, "message": i.message} for i in issues]


class StorePort(Protocol):
    """What the gateway asks of its core store: messages under leases, their outcome, resources and search."""

    db: Database

    def insert_raw(self, *, channel: str, fmt: str, sender: str, message_id: str, origin: str, raw: bytes,
                   status: str = ..., lease: float | None = ..., content_digest: str | None = ...
                   ) -> tuple[int, MessageRecord | None]: ...

    def messages_keyed(self, fmt: str, sender: str, key: str) -> list[MessageRecord]: ...

    def claim_queued(self, limit: int, lease: float, formats: tuple[str, ...] = ..., *,
                     in_turn: bool = ..., patience: float = ...) -> list[tuple[int, str, str, str, bytes, int]]: ...

    def earlier_unfinished(self, record_id: int, formats: tuple[str, ...],
                           mine: frozenset[int] = ...) -> tuple[int, str | None, float | None] | None: ...

    def queued_from(self, fmt: str, senders: list[str]) -> list[str]: ...

    def give_back(self, record_ids: list[int]) -> None: ...

    def take(self, record_id: int, lease: float, *, retry: bool = ..., mine: bool = ...) -> MessageRecord | None: ...

    def replace_raw(self, record_id: int, raw: bytes, *, origin: str) -> None: ...

    def release(self, record_id: int, *, uncounted: bool = ...) -> None: ...

    def abandoned(self, formats: tuple[str, ...], limit: int = ..., *, idle: float = ...) -> list[int]: ...

    def find_message(self, fmt: str, sender: str, message_id: str) -> MessageRecord | None: ...

    def get_message(self, record_id: int) -> MessageRecord: ...

    def raw_of(self, record_id: int) -> bytes: ...

    def stages_of(self, record_id: int) -> list[dict[str, Any]]: ...

    def record_stage(self, record_id: int, stage: str, status: str, detail: str = ...) -> None: ...

    def prepare(self, bundle: dict[str, Any]) -> Prepared: ...

    def unit_of_work(self) -> AbstractContextManager[Database]: ...

    def finish(self, record_id: int, *, status: str, ack_code: str | None, ack: bytes | None,
               issues: list[Issue], bundle: dict[str, Any] | None = ...,
               prepared: Prepared | None = ..., owner: str | None = ...,
               ack_for: Callable[[list[Written]], bytes] | None = ...) -> bool: ...

    def fail_in_flight(self, keep: tuple[str, ...] = ...) -> int: ...

    def tag_superseded(self, report_ref: str, message_ref: int | None, tag: dict[str, str]) -> int: ...

    def restore_over(self, record_id: int, current_ref: int | None) -> int: ...

    def read(self, rtype: str, rid: str) -> dict[str, Any]: ...

    def version(self, rtype: str, rid: str, version: str) -> dict[str, Any]: ...

    def history(self, rtype: str, rid: str | None = ..., *, count: int = ..., offset: int = ...,
                since: float | None = ..., up_to: str | None = ...,
                after: Sequence[Any] | None = ...) -> SearchResult: ...

    def last_row(self) -> int: ...

    def search(self, rtype: str, params: list[tuple[str, str]], *, count: int = ..., offset: int = ...,
               strict: bool = ..., sort: list[tuple[str, bool]] | None = ...,
               up_to: int | None = ..., after: Sequence[Any] | None = ...) -> SearchResult: ...

    def referencing(self, rtype: str, path: str, references: list[str], limit: int) -> list[dict[str, Any]]: ...

    def read_many(self, references: list[str]) -> list[dict[str, Any]]: ...


class Store:
    """A member gateway's database (SQLite or PostgreSQL): the one implementation of :class:`StorePort`.
    One instance per thread."""

    #: (monotonic) Until when a queue reader working in turn does not look past a held sender's messages again
    #: (:meth:`claim_queued`): the last look found nothing.
    _none_further_until = 0.0

    def __init__(self, db: Database, clock: Callable[[], _dt.datetime] | None = None) -> None:
        self.db = db
        self.clock = clock or (lambda: _dt.datetime.now(_dt.timezone(_dt.timedelta(hours=8))))

    @classmethod
    def open(cls, path: str | Path, clock: Callable[[], _dt.datetime] | None = None) -> "Store":
        """Open the database at ``path`` and make sure the schema exists."""
        store = cls(connect(path), clock)
        store.migrate()
        return store

    def migrate(self) -> None:
        """Create missing tables and indexes (idempotent)."""
        ensure_core_schema(self.db)

    def close(self) -> None:
        self.db.conn.close()

    # -- messages ------------------------------------------------------------------------

    def insert_raw(self, *, channel: str, fmt: str, sender: str, message_id: str, origin: str,
                   raw: bytes, status: str = "received", lease: float | None = None,
                   content_digest: str | None = None) -> tuple[int, MessageRecord | None]:
        """Store raw input before anything else. Returns (new id, None) or (existing id, existing record).

        A second message with the same format, sender and id is not stored: the
        unique index refuses it and the first one's record is returned. ``status``
        is ``received`` (processed next, by the caller) or ``queued`` (answered on
        receipt; processed later, in order, by :meth:`queued`'s reader).
        ``lease``: seconds this process holds the new message while it works it. ``content_digest``: the
        digest of the document it carries (:attr:`MessageRecord.content_digest`).
        """
        now = _now(self.clock)
        digest = hashlib.sha256(raw).hexdigest()
        owner, until, attempts = (lease_owner(), self._epoch() + lease, 1) if lease else (None, None, 0)
        values = [channel, fmt, sender, message_id, origin, now, len(raw), digest, raw, status, now,
                  owner, until, attempts, content_digest]
        try:
            with transaction(self.db):
                # ON CONFLICT: a resend is told by the unique key without an error, which on PostgreSQL would
                # abort a caller's transaction this joins
                if self._batched():  # the message and its first stage in one statement (one round trip)
                    row = self.db.execute(f"WITH m AS ({_INSERT_MESSAGE}), s AS (INSERT INTO message_stages"
                                          " (message_ref, stage, status, at, detail) SELECT id, 'receive', ?, ?, ''"
                                          " FROM m) SELECT id FROM m", [*values, status, now]).fetchone()
                    if row is not None:
                        return int(row[0]), None
                else:
                    row = self.db.execute(_INSERT_MESSAGE, values).fetchone()
                    if row is not None:
                        new_id = int(row[0])
                        self.db.execute(_INSERT_STAGE, [new_id, "receive", status, now, ""])
                        return new_id, None
        except Exception as exc:
            if _data_error(exc):  # one of UNSTORABLE, as SQLite's is
                raise ValueError(f"the message cannot be stored as it is: {type(exc).__name__}") from exc
            raise
        existing = self.find_message(fmt, sender, message_id)
        if existing is None:  # pragma: no cover - the key was just seen
            raise sqlite3.IntegrityError(f"message {fmt} {sender} {message_id} is neither new nor stored")
        return existing.id, existing

    def messages_keyed(self, fmt: str, sender: str, key: str) -> list[MessageRecord]:
        """Every message of ``fmt`` from ``sender`` whose id is ``key`` or ``key#n``, oldest first: the requests
        that carried one document (a CDA 文档流水号), each stored under a key of its own."""
        if not key:
            return []
        found: list[MessageRecord] = []
        first = 1
        while True:  # key, key#2, key#3 ... (each stored one past the highest taken, under the write lock):
            # looked up by value through messages_dedup, a chunk at a time, until a chunk ends short; no LIKE, which
            # neither engine can read through the index whatever the collation
            ids = [key if n == 1 else f"{key}#{n}" for n in range(first, first + _KEYED_CHUNK)]
            marks = ",".join("?" * len(ids))
            rows = [self._record(row) for row in self.db.query(
                f"SELECT {self._record_columns()} FROM messages WHERE format = ? AND sender = ? AND message_id IN"
                f" ({marks})"
                " AND message_id <> ''", [fmt, sender, *ids])]
            found += rows
            if ids[-1] not in {r.message_id for r in rows}:
                break
            first += _KEYED_CHUNK
        return sorted(found, key=lambda r: r.id)

    def _epoch(self) -> float:
        """Now, in epoch seconds, for leases (the store's clock: tests decide what time it is)."""
        return self.clock().timestamp()

    def epoch(self) -> float:
        """Now, in epoch seconds, as leases are judged."""
        return self._epoch()

    def queued(self, limit: int) -> list[tuple[int, str, str, str, bytes]]:
        """The oldest messages answered on receipt and not yet processed: (id, format, channel, origin, raw)."""
        return [(row[0], row[1], row[2], row[3], bytes(row[4])) for row in self.db.execute(
            "SELECT id, format, channel, origin, raw FROM messages WHERE status = 'queued' ORDER BY id LIMIT ?",
            [limit])]

    def claim_queued(self, limit: int, lease: float, formats: tuple[str, ...] = ("hl7v2",), *,
                     in_turn: bool = False, patience: float = 10.0) -> list[tuple[int, str, str, str, bytes, int]]:
        """Take up to ``limit`` messages to work, oldest first: (id, format, channel, origin, raw, attempts).

        Those waiting in the queue, and those whose worker died before it
        finished (``received`` with a dead holder or an expired lease); each is
        held by this process for ``lease`` seconds and counted as an attempt.

        A sender's message is not taken while a live process holds an earlier one of that sender. With
        ``in_turn``, while a live process of another machine does: the caller records each message it takes only
        once every earlier message of its sender has its outcome (:meth:`earlier_unfinished`), so that the readers
        of one machine may work one sender's messages at once and still record them in the order they came. The
        messages of senders this machine's processes hold nothing earlier of come first (further down the queue
        if need be); a sender whose earlier message has been held longer than ``patience`` seconds (its lease
        ``lease`` long) is left waiting. Another machine's hold is looked at before the write lock only: a
        message taken meanwhile waits for its turn.
        """
        now = self._epoch()
        marks = ",".join("?" * len(formats))

        # A sender's message waits while a live process (another node's reader, a listener) holds an earlier one
        # of that sender: its messages are worked in the order they came, whichever node took them in. Holders
        # on other machines are live while their lease runs (left out in SQL, so a busy sender never fills the
        # page); those on this machine while their process is (an earlier message whose holder died here is
        # itself taken first).
        page = ("SELECT id, format, channel, origin, lease_owner, lease_until, sender FROM messages"
                f" WHERE status IN ('queued', 'received') AND format IN ({marks}){{but}}"
                " AND (lease_until IS NULL OR lease_until <= ? OR lease_owner LIKE ?)"
                " AND NOT EXISTS (SELECT 1 FROM messages w WHERE w.status = 'received' AND w.sender ="
                " messages.sender AND w.id < messages.id AND w.lease_until > ? AND w.lease_owner NOT LIKE ?)"
                " ORDER BY id LIMIT ?")

        def before_held(row: Any, held: dict[Any, tuple[int, float]]) -> bool:
            """Whether ``row`` came before anything a live process of this machine holds of its sender."""
            return int(row[0]) < held.get(row[6], (int(row[0]) + 1, 0.0))[0]

        def held_here() -> dict[Any, tuple[int, float]]:
            """Sender -> (its earliest message a live process of this machine holds, that lease's end)."""
            held: dict[Any, tuple[int, float]] = {}
            for sender, rid, owner, until in self.db.execute(
                    "SELECT sender, id, lease_owner, lease_until FROM messages WHERE status = 'received'"
                    f" AND format IN ({marks}) AND lease_owner LIKE ?", [*formats, f"{_HOST}:%"]).fetchall():
                if holder_alive(owner, until, now) and int(rid) < held.get(sender, (int(rid) + 1, 0.0))[0]:
                    held[sender] = (int(rid), float(until))
            return held

        def free() -> list[Any]:
            rows = self.db.execute(page.format(but=""), [*formats, now, f"{_HOST}:%", now, f"{_HOST}:%",
                                                         limit * 4]).fetchall()
            if not rows:
                return []
            held = held_here()
            return [r for r in rows if not holder_alive(r[4], r[5], now) and before_held(r, held)][:limit]

        def in_turn_free() -> list[Any]:
            # Readers working in turn take the messages of senders this machine's processes hold nothing earlier
            # of, further down the queue if need be (a sender whose message a stuck process holds never keeps the
            # others waiting); only when there are none, the next messages of the senders they hold (worked side
            # by side, each recorded after the earlier ones), unless that hold has lasted past ``patience``.
            size = max(limit * 4, 64)  # (past the messages the other readers of this machine hold)
            rows = self.db.execute(page.format(but=""), [*formats, now, f"{_HOST}:%", now, f"{_HOST}:%",
                                                         size]).fetchall()
            claimable = [r for r in rows if not holder_alive(r[4], r[5], now)]
            held = held_here()
            first = [r for r in claimable if before_held(r, held)]
            if len(first) < limit and held and len(rows) == size and time.monotonic() >= self._none_further_until:
                senders = list(held)
                but = f" AND sender NOT IN ({','.join('?' * len(senders))})"
                further = self.db.execute(page.format(but=but), [*formats, *senders, now, f"{_HOST}:%", now,
                                                                 f"{_HOST}:%", limit * 4]).fetchall()
                seen = {r[0] for r in first}
                more = [r for r in further if r[0] not in seen and not holder_alive(r[4], r[5], now)]
                if not more:  # (a search of the queue past one busy sender's messages: not again for a second)
                    self._none_further_until = time.monotonic() + 1.0
                first = sorted(first + more, key=lambda r: int(r[0]))
            if first:
                return first[:limit]
            return [r for r in claimable if r[6] not in held or now - (held[r[6]][1] - lease) <= patience][:limit]

        found = in_turn_free() if in_turn else free()
        if not found:  # looked at without the write lock: an idle reader never holds up the writers
            return []
        # Selected, then updated, under the write lock (SQLite's BEGIN IMMEDIATE; on PostgreSQL the advisory
        # lock transaction() takes): no other writer — another process, another gateway node on the same
        # PostgreSQL — runs between the two, so two readers never take the same message. In turn, those chosen
        # are looked at again, by their ids alone.
        with transaction(self.db, poll=True):
            if in_turn:
                ids = [r[0] for r in found]
                still = {int(i): (owner, until) for i, status, owner, until in self.db.execute(
                    "SELECT id, status, lease_owner, lease_until FROM messages WHERE id IN"
                    f" ({','.join('?' * len(ids))})", ids).fetchall() if status in ("queued", "received")}
                found = [r for r in found if int(r[0]) in still and not holder_alive(*still[int(r[0])], now)]
                if not found:  # another reader took them first: the next ones
                    found = in_turn_free()
            else:
                found = free()
            if not found:
                return []
            owner, until = lease_owner(), now + lease
            self.db.conn.executemany(
                "UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ?, attempts = attempts + 1"
                " WHERE id = ?", [(owner, until, r[0]) for r in found])
            taken = {r[0]: r for r in found}
            marks = ",".join("?" * len(taken))
            found = self.db.execute(f"SELECT id, raw, attempts FROM messages WHERE id IN ({marks})",
                                    list(taken)).fetchall()
        return sorted((i, taken[i][1], taken[i][2], taken[i][3], bytes(raw), n) for i, raw, n in found)

    def earlier_unfinished(self, record_id: int, formats: tuple[str, ...],
                           mine: frozenset[int] = frozenset()) -> tuple[int, str | None, float | None] | None:
        """The earliest message of ``formats`` from the sender of message ``record_id`` that came before it and
        has no outcome yet (waiting in the queue, or being worked), those in ``mine`` left out: (id, lease
        owner, lease until), or None when the message's turn to be recorded has come. Read without the write
        lock."""
        marks = ",".join("?" * len(formats))
        # those being worked (few: what the readers hold) through the status index; those waiting through the
        # queued messages' own index of senders, the first few only however long the queue (``mine`` are never
        # more than the rows to skip). One statement: read at one moment, so a message that moves from the queue
        # to a reader meanwhile is seen in one place or the other (two reads could miss it in both).
        of = ("SELECT w.id, w.lease_owner, w.lease_until FROM messages m JOIN messages w ON w.sender = m.sender"
              f" AND w.id < m.id WHERE m.id = ? AND w.status = '{{status}}' AND w.format IN ({marks})")
        for found, owner, until in self.db.execute(
                f"SELECT id, lease_owner, lease_until FROM ({of.format(status='received')} UNION ALL SELECT id,"
                f" lease_owner, lease_until FROM ({of.format(status='queued')} ORDER BY w.id LIMIT {len(mine) + 1})"
                " AS waiting) AS unfinished ORDER BY id", [record_id, *formats, record_id, *formats]).fetchall():
            if int(found) not in mine:
                return int(found), owner, until
        return None

    def queued_from(self, fmt: str, senders: list[str]) -> list[str]:
        """Those of ``senders`` that have messages of format ``fmt`` waiting in the processing queue (through the
        queued messages' index of senders: as cheap however long the queue)."""
        wanted = sorted({s for s in senders if s})
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        return sorted(str(r[0]) for r in self.db.execute(
            f"SELECT DISTINCT sender FROM messages WHERE status = 'queued' AND sender IN ({marks}) AND format = ?",
            [*wanted, fmt]).fetchall())

    def give_back(self, record_ids: list[int]) -> None:
        """Put messages this process took from the queue and did not record back in it, uncounted (their attempts
        as before they were taken): an earlier message of their sender is to be worked first."""
        if not record_ids:
            return
        with transaction(self.db, poll=True):
            self.db.conn.executemany(
                "UPDATE messages SET status = 'queued', lease_owner = NULL, lease_until = NULL,"
                " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
                " WHERE id = ? AND status = 'received' AND lease_owner = ?", [(i, lease_owner()) for i in record_ids])

    def take(self, record_id: int, lease: float, *, retry: bool = False, mine: bool = False) -> MessageRecord | None:
        """Take one message over to work it again; None when a live process holds it.

        Without ``retry``: a message that has no answer yet (interrupted, or
        waiting in the queue). With ``retry``: a ``failed`` one (an operator's
        retry); its stored answer stays until the new outcome replaces it. ``mine``: a lease of this process is no
        hold either (it stored the message without learning so: the database's answer was lost).

        :raises NotFound: no such message. :raises InputError: with ``retry``, the message is neither failed
            nor left unfinished (``received``).
        """
        now = self._epoch()
        with transaction(self.db, poll=True):
            rec = self.get_message(record_id)
            if retry and rec.status not in ("failed", "received"):
                raise InputError(f"message {record_id} is {rec.status}, not failed: only failed messages and "
                                 "messages left unfinished by a process that is gone are worked again",
                                 "messages.status")
            if not retry and (rec.ack is not None or rec.status not in ("received", "queued", "failed")):
                return None
            if holder_alive(rec.lease_owner, rec.lease_until, now) and not (mine and rec.lease_owner == lease_owner()):
                return None
            self.db.execute("UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ?,"
                            " attempts = attempts + 1, updated_at = ? WHERE id = ?",
                            [lease_owner(), now + lease, _now(self.clock), record_id])
            self.db.execute(_INSERT_STAGE,
                            [record_id, "take", "received", _now(self.clock),
                             f"attempt {rec.attempts + 1}, was {rec.status}"])
        rec.attempts += 1
        return rec

    def replace_raw(self, record_id: int, raw: bytes, *, origin: str) -> None:
        """Let a message carry another copy of what it was received as (the same signed document in other
        bytes, worked after an earlier copy was refused): its raw input, digest, size and origin."""
        with transaction(self.db):
            self.db.execute("UPDATE messages SET raw = ?, sha256 = ?, size = ?, origin = ?, updated_at = ?"
                            " WHERE id = ?",
                            [raw, hashlib.sha256(raw).hexdigest(), len(raw), origin, _now(self.clock), record_id])

    def release(self, record_id: int, *, uncounted: bool = False) -> None:
        """Give up this process's lease on a message it could not finish (another process may take it).
        ``uncounted``: the attempt does not count towards the ones a message is set aside after (the database
        could not take what it made: a full disk, the server away; not a process that died on it)."""
        refund = ", attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END" if uncounted else ""
        with transaction(self.db):
            self.db.execute(f"UPDATE messages SET lease_owner = NULL, lease_until = NULL{refund} WHERE id = ?"
                            " AND lease_owner = ?", [record_id, lease_owner()])

    def abandoned(self, formats: tuple[str, ...], limit: int = 1000, *, idle: float = 0.0) -> list[int]:
        """Messages left without an answer by a process that died: ``received`` (or, from an older release,
        ``failed`` without an answer) whose holder is dead or whose lease expired, oldest first.

        ``idle``: only those untouched (received or taken) for at least this many seconds. Messages held by
        live processes do not count towards ``limit``.
        """
        now = self._epoch()
        marks = ",".join("?" * len(formats))
        found: list[int] = []
        cursor = self.db.execute(
            "SELECT id, lease_owner, lease_until, updated_at FROM messages WHERE (status = 'received'"
            f" OR (status = 'failed' AND ack IS NULL)) AND format IN ({marks})"
            " AND (lease_until IS NULL OR lease_until <= ? OR lease_owner LIKE ?) ORDER BY id",
            [*formats, now, f"{_HOST}:%"])
        for record_id, owner, until, updated in cursor:
            if holder_alive(owner, until, now) or (idle and _seconds_since(updated, now) < idle):
                continue
            found.append(record_id)
            if len(found) >= limit:
                break
        cursor.close()
        return found

    def queue_length(self) -> int:
        """How many messages wait in the processing queue."""
        return int(self.db.execute("SELECT count(*) FROM messages WHERE status = 'queued'").fetchone()[0])

    def find_message(self, fmt: str, sender: str, message_id: str) -> MessageRecord | None:
        """The message of ``fmt`` from ``sender`` with id ``message_id`` (None for an empty id: such messages are
        never told apart by it). ``message_id <> ''`` is spelt out so that both engines read it through the
        partial unique index ``messages_dedup`` (a bound value does not prove it to their planners)."""
        if not message_id:
            return None
        rows = list(self.db.query(
            f"SELECT {self._record_columns()} FROM messages WHERE format = ? AND sender = ? AND message_id = ?"
            " AND message_id <> ''",
            [fmt, sender, message_id]))
        return self._record(rows[0]) if rows else None

    def get_message(self, record_id: int) -> MessageRecord:
        """:raises NotFound: no such message."""
        rows = list(self.db.query(f"SELECT {self._record_columns()} FROM messages WHERE id = ?", [record_id]))
        if not rows:
            raise NotFound(f"no message with id {record_id}", "messages.id")
        return self._record(rows[0])

    def raw_of(self, record_id: int) -> bytes:
        """The bytes exactly as received.

        :raises NotFound: no such message.
        """
        rows = list(self.db.query("SELECT raw FROM messages WHERE id = ?", [record_id]))
        if not rows:
            raise NotFound(f"no message with id {record_id}", "messages.id")
        return bytes(rows[0]["raw"])

    def stages_of(self, record_id: int) -> list[dict[str, Any]]:
        """What happened to a message, stage by stage, in the order it happened."""
        order = "seq" if dialect(self.db) == "postgresql" else "rowid"
        return list(self.db.query(
            f"SELECT stage, status, at, detail FROM message_stages WHERE message_ref = ? ORDER BY {order}",
            [record_id]))

    def list_messages(self, status: str | None = None, limit: int = 50) -> list[MessageRecord]:
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self.db.query(f"SELECT {self._record_columns()} FROM messages {where} ORDER BY id DESC LIMIT ?",
                             [*args, limit])
        return [self._record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Messages by status (those with none left out): the running count where it is kept
        (:mod:`gateway.store.tallies`), counted otherwise."""
        return tallies.figures(self.db, "messages")

    def record_stage(self, record_id: int, stage: str, status: str, detail: str = "") -> None:
        self.db.execute(_INSERT_STAGE, [record_id, stage, status, _now(self.clock), detail])

    def prepare(self, bundle: dict[str, Any]) -> Prepared:
        """A Bundle's resources made ready to store (:meth:`finish` ``prepared``), before the write lock is taken:
        other writers then wait only for the writing."""
        return self._prepare_bundle(bundle, _now(self.clock))

    @contextmanager
    def unit_of_work(self) -> Iterator[Database]:
        """One transaction under the write lock for everything an outcome records: ``with store.unit_of_work() as
        db:`` then :meth:`finish` and the caller's own records (signed copy, decisions, audit entries) on ``db``;
        all are committed together, or none (an exception rolls back)."""
        with transaction(self.db):
            yield self.db

    def finish(self, record_id: int, *, status: str, ack_code: str | None, ack: bytes | None,
               issues: list[Issue], bundle: dict[str, Any] | None = None, prepared: Prepared | None = None,
               owner: str | None = None, ack_for: Callable[[list[Written]], bytes] | None = None) -> bool:
        """Record the outcome of a message, and its resources, in one transaction; its lease ends.

        Inside a caller's :meth:`unit_of_work` it joins it, and the caller's records commit with it.
        ``prepared``: ``bundle`` as :meth:`prepare` made it before the unit of work began (made here otherwise).
        ``owner``: the lease this outcome was worked under; when another process
        has taken the message over since (this one's lease ran out), nothing is
        written and False is returned. ``ack_for``: the answer kept with the message made from what became of each
        of ``bundle``'s resources (:class:`Written`, in the Bundle's order) instead of ``ack``: an answer that says
        which resources were created and which are new versions (a FHIR transaction-response).
        """
        now = _now(self.clock)
        if prepared is None and bundle is not None:
            prepared = self._prepare_bundle(bundle, now)
        with transaction(self.db):
            # PostgreSQL: the lease, the stored versions and the next row number are asked in one round trip,
            # and every row is written in a second one (all read before anything is written, as on SQLite)
            with self._pipelined():
                lease = (self.db.execute("SELECT lease_owner FROM messages WHERE id = ?", [record_id])
                         if owner is not None else None)
                looked = (self._look_up([(r["resourceType"], r["id"]) for r in prepared.resources])
                          if self._pipe is not None and prepared is not None and prepared.first is not None
                          else None)
                if lease is not None:
                    if looked is None:
                        self._sync()
                    row = lease.fetchone()
                    if row is None or row[0] != owner:
                        log.warning("message %s was taken over by another process; this outcome is not recorded",
                                    record_id)
                        return False
                written = self._save_prepared(prepared, record_id, now, looked) if prepared is not None else []
                if ack_for is not None:
                    ack = ack_for(written)
                self.db.execute(
                    "UPDATE messages SET status = ?, ack_code = ?, ack = ?, issues = ?, bundle_id = ?,"
                    " updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                    [status, ack_code, ack, jsonutil.dumps(_issue_dicts(issues)),
                     bundle.get("id") if bundle else None, now, record_id],
                )
                self.db.execute(_INSERT_STAGE, [record_id, "finish", status, now, ack_code or ""])
        return True

    def fail_in_flight(self, keep: tuple[str, ...] = ()) -> int:
        """Mark messages left half-processed by a crash as failed, except those of the formats in ``keep``
        (which are worked again instead); only those nobody holds. Returns how many."""
        now = _now(self.clock)
        epoch = self._epoch()
        marks = ",".join("?" * len(keep))
        where = f"status = 'received' AND format NOT IN ({marks})" if keep else "status = 'received'"
        with transaction(self.db):
            ids = [r[0] for r in self.db.execute(f"SELECT id, lease_owner, lease_until FROM messages WHERE {where}",
                                                 list(keep)).fetchall() if not holder_alive(r[1], r[2], epoch)]
            issues = jsonutil.dumps([{"severity": "error", "code": "exception", "location": "",
                                      "message": "processing was interrupted (gateway stopped); raw input kept"}])
            self.db.conn.executemany(
                "UPDATE messages SET status = 'failed', updated_at = ?, issues = ?, lease_owner = NULL,"
                " lease_until = NULL WHERE id = ?", [(now, issues, i) for i in ids])
            changed = len(ids)
        if changed:
            log.warning("marked %d interrupted message(s) as failed", changed)
        return changed

    _columns_read: str | None = None

    def _record_columns(self) -> str:
        """The columns of ``messages`` a :class:`MessageRecord` is made of: all but the raw bytes, which it does
        not hold (a waiting resend asks for its first copy's record again and again). Asked once per Store."""
        if self._columns_read is None:
            present = schema.columns(self.db, "messages")
            self._columns_read = ", ".join(sorted(present - {"raw"})) if present else "*"
        return self._columns_read

    @staticmethod
    def _record(row: dict[str, Any]) -> MessageRecord:
        return MessageRecord(
            id=row["id"], channel=row["channel"], format=row["format"], sender=row["sender"],
            message_id=row["message_id"], origin=row["origin"], received_at=row["received_at"], size=row["size"],
            sha256=row["sha256"], status=row["status"], ack_code=row["ack_code"],
            ack=bytes(row["ack"]) if row["ack"] is not None else None,
            issues=jsonutil.loads(row["issues"] or "[]"), bundle_id=row["bundle_id"],
            lease_owner=row.get("lease_owner"), lease_until=row.get("lease_until"), attempts=row.get("attempts") or 0,
            content_digest=row.get("content_digest"),
        )

    # -- resources -----------------------------------------------------------------------

    def _prepare_bundle(self, bundle: dict[str, Any], now: str) -> Prepared:
        """The Bundle's resources as stored (``urn:uuid:`` references rewritten), with the rows of a first version.

        Needs no database: made before the write lock is taken. Only a resource
        that turns out to be stored already is worked again inside the lock.
        """
        by_url: dict[str, dict[str, Any]] = {}
        for entry in bundle.get("entry", []):
            res = entry["resource"]
            by_url[entry.get("fullUrl", "")] = res
        local = {url: f"{r['resourceType']}/{r['id']}" for url, r in by_url.items()}
        by_ref = {local[url]: r for url, r in by_url.items()}
        stored = [_rewrite_refs(res, local) for res in by_url.values()]
        keys = [(r["resourceType"], r["id"]) for r in stored]
        if len(set(keys)) != len(keys):
            # The same resource twice in one Bundle: each copy may version the one before; keep that order.
            return Prepared(stored, by_ref.get, None)
        first = [_first_version(res, now, by_ref.get) for res in stored]
        return Prepared(stored, by_ref.get, first, now)

    def _save_prepared(self, prepared: Prepared, record_id: int, now: str,
                       looked: tuple[dict[tuple[str, str], _Stored], int] | None = None) -> list[Written]:
        if prepared.first is None:
            return [w for res in prepared.resources for w in self._put_all([res], record_id, now, prepared.resolve)]
        return self._put_all(prepared.resources, record_id, now, prepared.resolve, prepared.first, looked=looked,
                             first_at=prepared.at)

    # On PostgreSQL the rows of a Bundle are written with one statement per table (arrays of column values,
    # ``unnest``), sent together in pipeline mode; SQLite, in-process, runs its statements row by row. ``batched``
    # False keeps PostgreSQL row by row too (the reference the batched statements are tested against).
    batched = True
    _pipe: Any = None

    def _batched(self) -> bool:
        return self.batched and dialect(self.db) == "postgresql"

    @contextmanager
    def _pipelined(self) -> Iterator[None]:
        """PostgreSQL (batched): statements inside are sent without waiting for each answer (see
        :meth:`_sync`); elsewhere nothing changes."""
        if self._pipe is not None or not self._batched():
            yield
            return
        with self.db.conn.pipeline() as pipe:
            self._pipe = pipe
            try:
                yield
            finally:
                self._pipe = None

    def _sync(self) -> None:
        """Inside :meth:`_pipelined`: wait for the answers of the statements sent (before reading one)."""
        if self._pipe is not None:
            self._pipe.sync()

    def _look_up(self, keys: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], _Stored], int]:
        """The stored versions among ``keys`` (:meth:`_current`) and the next free ``rid``; on PostgreSQL
        (batched) with one statement for all types, both in one round trip."""
        conn = self.db.conn
        if not self._batched():
            current = self._current(keys)
            return current, int(conn.execute("SELECT coalesce(max(rid), 0) FROM resources").fetchone()[0]) + 1
        with self._pipelined():
            found = conn.execute_arrays(
                "SELECT r.type, r.id, r.rid, r.version, r.last_updated, r.message_ref, r.json FROM resources r"
                " JOIN unnest(CAST(? AS text[]), CAST(? AS text[])) AS k (type, id) ON r.type = k.type"
                " AND r.id = k.id", [[k[0] for k in keys], [k[1] for k in keys]])
            top = conn.execute("SELECT coalesce(max(rid), 0) FROM resources")
            self._sync()
            current = {(rtype, rid): (row_number, version, updated, ref, text)
                       for rtype, rid, row_number, version, updated, ref, text in found.fetchall()}
            return current, int(top.fetchone()[0]) + 1

    def _put_all(self, resources: list[dict[str, Any]], record_id: int | None, now: str, resolve: Any,
                 first: list[_Rows] | None = None, *,
                 looked: tuple[dict[tuple[str, str], _Stored], int] | None = None, first_at: str = "") -> list[Written]:
        """Store distinct resources as new versions, with one statement of each kind; inside a transaction. Returns
        what became of each, in order (:class:`Written`).

        An identical resend is not a new version; a changed resource keeps its
        ``rid``, its previous version goes to ``resource_history`` and its index
        rows are replaced. ``resolve(reference)`` finds the resources chained
        search parameters need (the subject Patient, the performer). ``first``:
        each resource's rows as a first version (:func:`_first_version`), made
        beforehand (``first_at``: the lastUpdated their JSON carries, which their
        rows carry too); used for the resources not stored yet. ``looked``: what
        :meth:`_look_up` answered for these resources, when asked already.
        """
        conn = self.db.conn
        assert conn.in_transaction, "resources are written inside the caller's transaction"
        current, next_rid = looked or self._look_up([(r["resourceType"], r["id"]) for r in resources])
        history: list[tuple[Any, ...]] = []
        replaced: list[int] = []
        rows: list[tuple[Any, ...]] = []
        tokens: list[tuple[str, str, str, str, int]] = []
        dates: list[tuple[str, str, float, float, int]] = []
        strings: list[tuple[str, str, str, str, int]] = []
        written: list[Written] = []
        for n, res in enumerate(resources):
            rtype, rid = res["resourceType"], res["id"]
            old = current.get((rtype, rid))
            if old is not None:
                row_number, old_version, old_updated, old_ref, old_json = old
                if _same_content(old_json, res):
                    # a resent or re-converted identical resource is not a new version
                    written.append(Written(rtype, rid, old_version, old_updated, "unchanged"))
                    continue
                history.append((rtype, rid, old_version, old_updated, old_ref, old_json))
                replaced.append(row_number)
                text, found_tokens, found_dates = _rows_of(_versioned(res, old_version + 1, now), resolve)
                version = old_version + 1
                stamp = now
            else:
                row_number, next_rid = next_rid, next_rid + 1
                made = first[n] if first is not None else _first_version(res, now, resolve)
                stamp = first_at if first is not None and first_at else now
                text, found_tokens, found_dates = made
                version = 1
            written.append(Written(rtype, rid, version, stamp, "created" if version == 1 else "updated"))
            rows.append((row_number, rtype, rid, version, stamp, record_id, text))
            tokens += [(rtype, p, code, system, row_number) for p, system, code in found_tokens]
            dates += [(rtype, p, lo, hi, row_number) for p, lo, hi in found_dates]
            strings += _name_strings(res, row_number)
        if self._batched():
            with self._pipelined():
                _write_columns(conn, history, replaced, rows, tokens, dates, strings)
            return written
        if history:
            conn.executemany("INSERT INTO resource_history (type, id, version, last_updated, message_ref, json)"
                             " VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING", history)
            conn.executemany("DELETE FROM search_token WHERE res = ?", [(r,) for r in replaced])
            conn.executemany("DELETE FROM search_date WHERE res = ?", [(r,) for r in replaced])
            conn.executemany("DELETE FROM search_string WHERE res = ?", [(r,) for r in replaced])
        if rows:
            conn.executemany(_UPSERT_RESOURCE + " VALUES (?,?,?,?,?,?,?)" + _UPSERT_RESOURCE_SET, rows)
        _insert_index(conn, tokens, dates, strings, _known_keys(self.db))
        return written

    def _current(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], _Stored]:
        """(rid, version, last_updated, message_ref, json) of the stored resources among ``keys``; a query per type."""
        by_type: dict[str, list[str]] = {}
        for rtype, rid in keys:
            by_type.setdefault(rtype, []).append(rid)
        found: dict[tuple[str, str], tuple[int, int, str, Any, str]] = {}
        for rtype, ids in by_type.items():
            for start in range(0, len(ids), 500):  # well under SQLite's limit of bound parameters
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for rid, row_number, version, last_updated, message_ref, text in self.db.conn.execute(
                        "SELECT id, rid, version, last_updated, message_ref, json FROM resources"
                        f" WHERE type = ? AND id IN ({marks})", [rtype, *chunk]):
                    found[(rtype, rid)] = (row_number, version, last_updated, message_ref, text)
        return found

    def _resolver(self) -> Callable[[str], dict[str, Any] | None]:
        """Finds a stored resource by ``Type/id`` (for the search index of a resource written again)."""
        def resolve(reference: str) -> dict[str, Any] | None:
            rtype, _, rid = reference.partition("/")
            row = self.db.conn.execute("SELECT json FROM resources WHERE type = ? AND id = ?", [rtype, rid]).fetchone()
            return dict(jsonutil.loads(row[0])) if row else None
        return resolve

    def tag_superseded(self, report_ref: str, message_ref: int | None, tag: dict[str, str]) -> int:
        """Tag the stored DiagnosticReport ``report_ref`` and its results as superseded, each while what is
        stored under its id is still the version ``message_ref`` stored (a new version of the resource, its
        content otherwise unchanged; the signed copy stays as it was). Inside the caller's transaction.
        Returns how many resources were tagged.
        """
        def current(ref: str) -> dict[str, Any] | None:
            rtype, _, rid = ref.partition("/")
            row = self.db.conn.execute("SELECT message_ref, json FROM resources WHERE type = ? AND id = ?",
                                       [rtype, rid]).fetchone()
            if row is None or row[0] != message_ref:
                return None  # the id holds another version now (a correction stored under the same id)
            return dict(jsonutil.loads(row[1]))

        report = current(report_ref)
        if report is None:
            return 0
        tagged = [report]
        for result in report.get("result") or []:
            ref = result.get("reference") if isinstance(result, dict) else None
            found = current(ref) if isinstance(ref, str) and ref.startswith("Observation/") else None
            if found is not None:
                tagged.append(found)
        for res in tagged:
            meta = dict(res.get("meta") or {})
            meta["tag"] = [*(t for t in meta.get("tag") or [] if t.get("system") != tag["system"]), dict(tag)]
            res["meta"] = meta
        self._put_all(tagged, message_ref, _now(self.clock), self._resolver())
        return len(tagged)

    def restore_over(self, record_id: int, current_ref: int | None) -> int:
        """Put back, as current, the versions message ``current_ref`` stored of resources that message
        ``record_id`` (a report version stored later but superseded) has just written over; inside the
        caller's transaction. What ``record_id`` wrote stays in the resources' history. Returns how many.
        """
        if current_ref is None:
            return 0
        rows = self.db.conn.execute(
            "SELECT h.json FROM resources r JOIN resource_history h ON h.type = r.type AND h.id = r.id"
            " WHERE r.message_ref = ? AND h.message_ref = ? AND h.version = (SELECT max(version) FROM"
            " resource_history x WHERE x.type = r.type AND x.id = r.id AND x.message_ref = ?)",
            [record_id, current_ref, current_ref]).fetchall()
        resources = []
        for (text,) in rows:
            res = dict(jsonutil.loads(text))
            meta = {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
            res["meta"] = meta
            if not meta:
                del res["meta"]
            resources.append(res)
        if resources:
            self._put_all(resources, current_ref, _now(self.clock), self._resolver())
        return len(resources)

    def read(self, rtype: str, rid: str) -> dict[str, Any]:
        """The current version of a resource.

        :raises NotFound: no such resource.
        """
        rows = list(self.db.query("SELECT json FROM resources WHERE type = ? AND id = ?", [rtype, rid]))
        if not rows:
            raise NotFound(f"{rtype}/{rid} is not known", f"{rtype}/{rid}")
        return dict(jsonutil.loads(rows[0]["json"]))

    def version(self, rtype: str, rid: str, version: str) -> dict[str, Any]:
        """One version of a resource, current or earlier (vread).

        :raises NotFound: no such resource, or no such version of it.
        """
        if not version.isascii() or not version.isdigit() or len(version) > 12:
            raise NotFound(f"{rtype}/{rid} has no version {version[:20]!r}", f"{rtype}/{rid}")
        rows = list(self.db.query(
            "SELECT json FROM resources WHERE type = ? AND id = ? AND version = ?"
            " UNION ALL SELECT json FROM resource_history WHERE type = ? AND id = ? AND version = ?",
            [rtype, rid, int(version), rtype, rid, int(version)]))
        if not rows:
            self.read(rtype, rid)  # an unknown resource says so
            raise NotFound(f"{rtype}/{rid} has no version {version}", f"{rtype}/{rid}")
        return dict(jsonutil.loads(rows[0]["json"]))

    def history(self, rtype: str, rid: str | None = None, *, count: int = 20, offset: int = 0,
                since: float | None = None, up_to: str | None = None,
                after: Sequence[Any] | None = None) -> SearchResult:
        """Every version of one resource (``rid``), or of every resource of a type, newest first.

        ``since``: only versions made at or after that time (seconds since 1970, UTC). ``up_to``: only versions
        made up to the ``last_updated`` of the newest one when a history's first page was made (its
        :attr:`SearchResult.until`; without it, the newest now): versions made meanwhile do not shift the pages
        after it.
        ``after``: the page that follows the version whose :attr:`SearchResult.keys` these are (``offset`` then
        counts from there).

        :raises NotFound: ``rid`` is given and no such resource is stored.
        :raises InvalidSearch: ``after`` is not a version's keys.
        """
        where = "type = ? AND id = ?" if rid is not None else "type = ?"
        args: list[Any] = [rtype, rid] if rid is not None else [rtype]
        if rid is not None and not self.db.execute(
                "SELECT 1 FROM resources WHERE type = ? AND id = ?", [rtype, rid]).fetchone():
            raise NotFound(f"{rtype}/{rid} is not known", f"{rtype}/{rid}")
        if since is not None:
            where += f" AND {_UPDATED_EPOCH[dialect(self.db)]} >= ?"
            args = [*args, since]
        if up_to is None:  # the first page: the history as it is now
            union = (f"SELECT last_updated FROM resources WHERE {where}"
                     f" UNION ALL SELECT last_updated FROM resource_history WHERE {where}")
            up_to = str(self.db.execute(f"SELECT coalesce(max(last_updated), '') FROM ({union}) AS v",
                                        args * 2).fetchone()[0])
        where += " AND last_updated <= ?"
        args = [*args, up_to]
        union = (f"SELECT id, version, last_updated FROM resources WHERE {where}"
                 f" UNION ALL SELECT id, version, last_updated FROM resource_history WHERE {where}")
        total = int(self.db.execute(f"SELECT count(*) FROM ({union}) AS v", args * 2).fetchone()[0])
        page, page_args = "", []
        if after is not None:
            if (len(after) != 4 or after[0] != "_history" or not all(
                    type(v) is str and len(v) <= 200 and "\x00" not in v for v in after[1:3])
                    or type(after[3]) is not int or not 0 <= after[3] < 2 ** 31):
                raise InvalidSearch("_page_after does not belong to this history (the link was edited): start it "
                                    "again", "_page_after")
            after = after[1:]
            page = (" WHERE last_updated < ? OR (last_updated = ? AND id > ?)"
                    " OR (last_updated = ? AND id = ? AND version < ?)")
            page_args = [after[0], after[0], after[1], after[0], after[1], after[2]]
            offset = max(0, offset)
        # the page's keys are sorted, not the versions' JSON (a large _offset sorts that many keys only); the
        # JSON of the page's versions is read after
        keys = [(r[0], int(r[1]), str(r[2])) for r in self.db.execute(
            f"SELECT id, version, last_updated FROM ({union}) AS v{page}"
            " ORDER BY last_updated DESC, id, version DESC LIMIT ? OFFSET ?",
            [*args, *args, *page_args, count, offset]).fetchall()]
        found: dict[tuple[str, int], str] = {}
        for start in range(0, len(keys), _PAGE_READ):
            chunk = keys[start:start + _PAGE_READ]
            pairs = " OR ".join(["(id = ? AND version = ?)"] * len(chunk))
            flat = [v for key in chunk for v in key[:2]]
            for r in self.db.execute(f"SELECT id, version, json FROM resources WHERE type = ? AND ({pairs})"
                                     f" UNION ALL SELECT id, version, json FROM resource_history"
                                     f" WHERE type = ? AND ({pairs})", [rtype, *flat, rtype, *flat]).fetchall():
                found[(r[0], int(r[1]))] = r[2]
        # (a version gone between the two reads is left out of the page)
        kept = [k for k in keys if k[:2] in found]
        return SearchResult(total, [dict(jsonutil.loads(found[k[:2]])) for k in kept],
                            [["_history", updated, i, version] for i, version, updated in kept], up_to)

    def last_row(self) -> int:
        """The row number of the resource stored last (0: none): a search's paging bound (``search(up_to=...)``)."""
        return int(self.db.execute("SELECT coalesce(max(rid), 0) FROM resources").fetchone()[0])

    def search(self, rtype: str, params: list[tuple[str, str]], *, count: int = 20, offset: int = 0,
               strict: bool = True, sort: list[tuple[str, bool]] | None = None,
               up_to: int | None = None, after: Sequence[Any] | None = None) -> SearchResult:
        """Resources of ``rtype`` matching every parameter (values within one parameter are ORed).

        ``up_to``: only resources first stored up to that row number (:meth:`last_row` when a search's first page
        was made): the pages after it are not shifted by results stored meanwhile.

        ``after``: the page that follows the resource whose :attr:`SearchResult.keys` these are (``offset`` then
        counts from there): a resource before it that left the search meanwhile (a report superseded by a
        correction) shifts none of the pages after it. One updated meanwhile moves to where its new
        ``_lastUpdated`` sorts it: read again later in an ascending order of it, or not at all in the default
        (newest first) if it had not been read yet — the next search has it.

        ``sort`` orders them by date parameters, each ``(name, descending)``, the first one first
        (resources without the date last); without it the latest updated come first.

        :raises InvalidSearch: unknown parameter (when strict), a malformed value or a parameter that cannot
            sort, located at the parameter.
        """
        known = SEARCH_PARAMS.get(rtype, {})
        clauses: list[str] = []
        args: list[Any] = []
        engine = dialect(self.db)
        if engine == "sqlite":
            self.db.conn.create_function("fhir_starts", 2, str.startswith, deterministic=True)
        updated_epoch = _UPDATED_EPOCH[engine]
        for raw_name, value in params:
            name = PARAM_ALIASES.get(raw_name, raw_name)
            modifier = ""
            if ":" in name and known.get(name.partition(":")[0]) == "string":
                name, _, modifier = name.partition(":")
                if modifier not in ("exact", "contains"):
                    raise InvalidSearch(f"modifier :{modifier[:20]!r} is not supported for {name} (supported: "
                                        ":exact, :contains)", raw_name, code="not-supported")
            kind = known.get(name)
            if kind is None:
                if strict:
                    raise InvalidSearch(f"search parameter {raw_name!r} is not supported for {rtype} "
                                        f"(supported: {', '.join(sorted(known))})", raw_name, code="not-supported")
                continue
            ors: list[str] = []
            if name == "_id":  # the resource's own key
                ids = [unescape(v) for v in split_or(value)]
                clauses.append(f"id IN ({','.join('?' * len(ids))})")
                args += ids
                continue
            for part in split_or(value):
                if kind != "token":  # (a token's bar is told apart from an escaped one: parse_token_query)
                    part = unescape(part)
                if name == "_lastUpdated":  # the resources table's own column, an instant to the millisecond
                    q = parse_date_query(part, raw_name)
                    cond, cargs = date_matches_sql(q, updated_epoch, f"({updated_epoch} + 0.0005)")
                    ors.append(cond)
                    args += cargs
                elif kind == "string":
                    cond, cargs = _string_match(engine, rtype, name, modifier,
                                                part if modifier == "exact" else fold_string(part))
                    ors.append(cond)
                    args += cargs
                elif kind == "date":
                    q = parse_date_query(part, raw_name)
                    cond, cargs = date_matches_sql(q)
                    ors.append(f"rid IN (SELECT res FROM search_date WHERE type = ? AND param = ? AND {cond})")
                    args += [rtype, name, *cargs]
                else:
                    if kind == "reference" and "/" not in part:
                        part = f"Patient/{part}"
                    t_system: str | None
                    t_code: str | None
                    if kind == "reference":
                        t_system, t_code = None, part
                    else:
                        tq = parse_token_query(part)
                        t_system, t_code = tq.system, tq.code
                        if t_system and t_system == IMPLICIT_SYSTEMS.get((rtype, name)):
                            t_system = ""  # a code element's values are indexed without the system they imply
                        if t_code and (name in _CHAINED or (rtype == "Patient" and name == "identifier")):
                            t_code = _searched_id_card(t_system, t_code)
                    if name in _CHAINED:
                        # the identifiers the subject Patient has now (not those it had when each resource was
                        # stored: a Patient's later version may add, drop or correct one)
                        pcond, pargs = _token_value("k2", "Patient", "identifier", t_code, t_system)
                        ors.append("rid IN (SELECT t.res FROM search_key k JOIN search_token t ON t.key = k.key"
                                   " WHERE k.type = ? AND k.param = 'patient' AND k.system = '' AND k.code IN"
                                   " (SELECT 'Patient/' || pt.id FROM resources pt WHERE pt.rid IN (SELECT t2.res"
                                   f" FROM search_key k2 JOIN search_token t2 ON t2.key = k2.key WHERE {pcond})))")
                        args += [rtype, *pargs]
                        continue
                    cond, targs = _token_value("k", rtype, name, t_code, t_system)
                    ors.append("rid IN (SELECT t.res FROM search_key k JOIN search_token t ON t.key = k.key"
                               f" WHERE {cond})")
                    args += targs
            clauses.append("(" + " OR ".join(ors) + ")")
        by_id = any(PARAM_ALIASES.get(n, n) == "_id" for n, _ in params)
        if rtype in ("DiagnosticReport", "Observation") and not by_id:
            # a report superseded by a correction, and its results, are read by id (and history), not searched
            clauses.append(_NOT_SUPERSEDED[engine])
            args.append(_SUPERSEDED_SYSTEM)
        if up_to is not None:
            clauses.append("rid <= ?")
            args.append(up_to)
        where = " AND ".join(["type = ?"] + clauses)
        total = self.db.execute(f"SELECT count(*) FROM resources WHERE {where}", [rtype, *args]).fetchone()[0]
        # the page's keys are sorted, not the resources' JSON (SQLite's sorter and PostgreSQL's hold whole rows): a
        # large _offset sorts that many keys; the page's JSON is joined to them after, in the same statement (so
        # what it returns is what matched), in the same order
        keys: list[tuple[str, list[Any], str, bool]] = []  # (SQL expression, its arguments, direction, may be NULL)
        check_sort(rtype, sort or [])
        for name, descending in sort or []:
            direction = "DESC" if descending else "ASC"
            if name == "_lastUpdated":
                keys.append((updated_epoch, [], direction, True))
            else:
                keys.append(("(SELECT min(lo) FROM search_date d WHERE d.type = ? AND d.param = ? "
                             "AND d.res = resources.rid)", [rtype, name], direction, True))
        keys += [("last_updated", [], "DESC", False), ("id", [], "ASC", False)] if not keys else [
            ("id", [], "ASC", False)]
        columns = "".join(f", {expr} AS k{i}" for i, (expr, _, _, _) in enumerate(keys))
        column_args = [a for _, kargs, _, _ in keys for a in kargs]
        inner_order = ", ".join((f"{expr} IS NULL, " if nullable else "") + f"{expr} {direction}"
                                for expr, _, direction, nullable in keys)
        order_args = [a for _, kargs, _, nullable in keys for a in (kargs * 2 if nullable else kargs)]
        outer_order = ", ".join((f"p.k{i} IS NULL, " if nullable else "") + f"p.k{i} {direction}"
                                for i, (_, _, direction, nullable) in enumerate(keys))
        page_where, page_args = where, list(args)
        if after is not None:
            cond, cargs = _after_keys(keys, after, _sort_signature(sort))
            page_where, page_args = f"{where} AND {cond}", [*args, *cargs]
        outer_columns = "".join(f", p.k{i}" for i in range(len(keys)))
        rows = self.db.execute(
            f"SELECT r.json{outer_columns} FROM (SELECT rid{columns} FROM resources WHERE {page_where}"
            f" ORDER BY {inner_order} LIMIT ? OFFSET ?) AS p JOIN resources r ON r.rid = p.rid ORDER BY {outer_order}",
            [*column_args, rtype, *page_args, *order_args, count, offset]).fetchall()
        return SearchResult(int(total), [dict(jsonutil.loads(r[0])) for r in rows],
                            [[_sort_signature(sort), *(_plain_key(v) for v in r[1:])] for r in rows])

    def referencing(self, rtype: str, path: str, references: list[str], limit: int) -> list[dict[str, Any]]:
        """Resources of ``rtype`` whose reference element ``path`` (one or a list) names any of ``references``.

        At most ``limit`` of them, in the order they were first stored.
        """
        found: list[dict[str, Any]] = []
        engine = dialect(self.db)
        postgresql = engine == "postgresql"
        # a report superseded by a correction, and its results, are read by id (and history), not found by a search
        current, current_args = ((f" AND {_NOT_SUPERSEDED[engine]}", [_SUPERSEDED_SYSTEM])
                                 if rtype in ("DiagnosticReport", "Observation") else ("", []))
        for start in range(0, len(references), 500):
            chunk = references[start:start + 500]
            marks = ",".join("?" * len(chunk))
            if postgresql:
                element = path.split(".")
                rows = self.db.conn.execute(
                    "SELECT resources.json FROM resources WHERE resources.type = ? AND ((CAST(resources.json AS"
                    f" jsonb) #>> CAST(? AS text[])) IN ({marks}) OR EXISTS (SELECT 1 FROM jsonb_array_elements(CASE"
                    " WHEN jsonb_typeof(CAST(resources.json AS jsonb) #> CAST(? AS text[])) = 'array' THEN"
                    " CAST(resources.json AS jsonb) #> CAST(? AS text[]) ELSE CAST('[]' AS jsonb) END) e WHERE"
                    f" e ->> 'reference' IN ({marks}))){current} ORDER BY resources.rid LIMIT ?",
                    [rtype, [*element, "reference"], *chunk, element, element, *chunk, *current_args,
                     limit - len(found)])
            else:
                rows = self.db.conn.execute(
                    "SELECT resources.json FROM resources WHERE resources.type = ? AND (json_extract(resources.json,"
                    f" ?) IN ({marks}) OR EXISTS (SELECT 1 FROM json_each(resources.json, ?) e WHERE CASE WHEN"
                    f" e.type = 'object' THEN json_extract(e.value, '$.reference') END IN ({marks}))){current}"
                    " ORDER BY resources.rid LIMIT ?",
                    [rtype, f"$.{path}.reference", *chunk, f"$.{path}", *chunk, *current_args, limit - len(found)])
            found += [dict(jsonutil.loads(text)) for (text,) in rows]
            if len(found) >= limit:
                break
        return found

    def read_many(self, references: list[str]) -> list[dict[str, Any]]:
        """The current versions of the resources ``references`` name (``Type/id``); unknown ones are left out."""
        keys = [(ref.partition("/")[0], ref.partition("/")[2]) for ref in references if "/" in ref]
        found = self._current(keys)
        return [dict(jsonutil.loads(found[key][4])) for key in keys if key in found]

    def iter_resources(self, rtype: str) -> Iterator[dict[str, Any]]:
        for row in self.db.query("SELECT json FROM resources WHERE type = ? ORDER BY id", [rtype]):
            yield dict(jsonutil.loads(row["json"]))


#: ``meta.tag`` system of a report superseded by a correction (``gateway.store.reports.SUPERSEDED_TAG``).
_SUPERSEDED_SYSTEM = cs_url("report-version-status")


def _string_match(engine: str, rtype: str, param: str, modifier: str, value: str) -> tuple[str, list[Any]]:
    """SQL condition and its arguments: a name part of the resource matches ``value`` as a FHIR string search
    does.

    Plain: starts with the value, ignoring case and accents (``value`` folded by :func:`fold_string`);
    ``:contains``: holds it anywhere, likewise; ``:exact``: equals it, case and accents included. Both engines
    read the name parts from ``search_string``, folded by the same function when the resource was stored: a
    plain search reads one range of it (on SQLite a ``GLOB`` on the value, its own wildcards escaped, which
    SQLite reads as a range of the index), an exact one looks one value up (its folded form first).
    """
    if modifier == "exact":
        return ("rid IN (SELECT res FROM search_string WHERE type = ? AND param = ? AND folded = ? AND exact = ?)",
                [rtype, param, fold_string(value), value])
    if modifier == "contains":
        test = "strpos(folded, ?) > 0" if engine == "postgresql" else "instr(folded, ?) > 0"
    elif engine == "postgresql":
        test = "starts_with(folded, ?)"
    elif "\x00" in value:  # GLOB ends at a NUL: compared in Python instead (a name holds none)
        test = "fhir_starts(folded, ?)"
    else:
        test, value = "folded GLOB ?", "".join(_GLOB_LITERAL.get(ch, ch) for ch in value) + "*"
    return f"rid IN (SELECT res FROM search_string WHERE type = ? AND param = ? AND {test})", [rtype, param, value]


#: GLOB's wildcards, each written as the one character it is.
_GLOB_LITERAL = {"*": "[*]", "?": "[?]", "[": "[[]"}


#: Resource types with string search parameters (their HumanNames are indexed in ``search_string``).
_STRING_TYPES = frozenset(t for t, known in SEARCH_PARAMS.items() if "string" in known.values())


def _name_strings(res: Mapping[str, Any], row_number: int) -> list[tuple[str, str, str, str, int]]:
    """``search_string`` rows of a resource: (type, param, folded, exact, rid) for every string of its names
    that a string parameter looks at (``family``: the direct ``family``; ``given``: the items of ``given``;
    ``name``: those and the direct ``text`` and the items of ``prefix`` and ``suffix``), each once."""
    rtype = str(res.get("resourceType"))
    names = res.get("name")
    if rtype not in _STRING_TYPES or not isinstance(names, list):
        return []
    found: set[tuple[str, str]] = set()
    for name in names:
        if not isinstance(name, Mapping):
            continue
        for key, params in (("family", ("family", "name")), ("text", ("name",))):
            if isinstance(name.get(key), str):
                found.update((param, name[key]) for param in params)
        for key, params in (("given", ("given", "name")), ("prefix", ("name",)), ("suffix", ("name",))):
            items = name.get(key)
            for item in items if isinstance(items, list) else ():
                if isinstance(item, str):
                    found.update((param, item) for param in params)
    return [(rtype, param, fold_string(atom), atom, row_number) for param, atom in sorted(found)]


def fold_string(value: str) -> str:
    """A string as FHIR string search compares it: lower case, accents and other marks removed."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


#: ``resources.last_updated`` in epoch seconds (SQL), for ``_lastUpdated`` searches and sorting: a tenth of a
#: millisecond into the millisecond it names, so that rounding never moves it into a neighbouring one.
_UPDATED_EPOCH = {
    "sqlite": ("(CAST(strftime('%s', last_updated) AS REAL) + CASE WHEN substr(last_updated, 20, 1) = '.' "
               "THEN CAST(substr(last_updated, 21, 3) AS REAL) / 1000.0 ELSE 0 END + 0.0001)"),
    "postgresql": "(CAST(EXTRACT(EPOCH FROM CAST(last_updated AS timestamptz)) AS DOUBLE PRECISION) + 0.0001)",
}


def _token_value(alias: str, rtype: str, param: str, code: str | None, system: str | None) -> tuple[str, list[Any]]:
    """The condition on ``search_key`` (as ``alias``) for one token value of ``param`` of ``rtype`` (``code`` or
    ``system`` None: any), and its arguments."""
    cond = f"{alias}.type = ? AND {alias}.param = ?"
    args: list[Any] = [rtype, param]
    if code is not None:
        cond += f" AND {alias}.code = ?"
        args.append(code)
    if system is not None:
        cond += f" AND {alias}.system = ?"
        args.append(system)
    return cond, args


#: Chained parameters answered from the subject Patient as it is now (its identifier index), not from the values
#: copied into each resource's index when it was stored.
_CHAINED = frozenset({"patient.identifier"})


def _searched_id_card(system: str | None, code: str) -> str:
    """A 身份证号 searched for as it is stored: typed in full-width digits, with a lower-case x, or in the old
    15-digit form, it is the same number (what an ID card number is stored as: gateway.identifiers.check_id_card).
    With the 身份证 system named, any such form; with no system, only one that is not plain ASCII (an ASCII value
    may be another identifier's: a 15-digit record number stays as it is); anything else unchanged."""
    from gateway.identifiers import check_id_card
    from gateway.errors import IdentifierError
    from gateway.naming import SYSTEM_ID_CARD

    if system == SYSTEM_ID_CARD or (system is None and not code.isascii()):
        try:
            return check_id_card(code)
        except IdentifierError:  # not an ID card number: searched as typed (and not found)
            return code
    return code


#: Rows of a search or history page read by one statement, once the page's keys are sorted.
_PAGE_READ = 200


def _sort_signature(sort: list[tuple[str, bool]] | None) -> str:
    """A search's order as a page's sort keys name it (a next link of one order is not taken by another)."""
    return ",".join(f"{'-' if descending else ''}{name}" for name, descending in sort or []) or "-_lastUpdated,_id"


#: The sort keys that are texts (the others are numbers: seconds since 1970).
_TEXT_KEYS = frozenset({"last_updated", "id"})
_MAX_KEY_NUMBER = 1e300  # (an epoch, or an open end of a Period: infinite)


def _after_keys(keys: list[tuple[str, list[Any], str, bool]], after: Sequence[Any],
                signature: str) -> tuple[str, list[Any]]:
    """SQL condition (and its arguments): a resource comes after ``after`` — the order's signature, then the sort
    keys of a page's last resource — in the order ``keys`` gives: each ``(expression, its arguments, ASC or DESC,
    may be NULL)``, NULLs last, the last key unique. Lexicographic: equal on the keys before one, after on that one.

    :raises InvalidSearch: ``after`` is not such keys of this order (a link of another search, edited or cut).
    """
    problem = InvalidSearch("_page_after does not belong to this search (its order changed, or the link was "
                            "edited): start the search again", "_page_after")
    if len(after) != len(keys) + 1 or after[0] != signature:
        raise problem
    parts: list[tuple[str, list[Any], Any, str]] = []  # (expression, its arguments, value, direction)
    for (expr, kargs, direction, nullable), value in zip(keys, after[1:]):
        if value is None:
            if not nullable:
                raise problem
        elif expr in _TEXT_KEYS:
            if type(value) is not str or len(value) > 200 or "\x00" in value:
                raise problem
        else:
            value = _key_number(value)
            if value is None:
                raise problem
        if nullable:
            parts.append((f"(CASE WHEN {expr} IS NULL THEN 1 ELSE 0 END)", kargs, 1 if value is None else 0, "ASC"))
            if value is None:
                continue  # every NULL is equal here: the keys after it decide
        parts.append((expr, kargs, value, direction))
    ors: list[str] = []
    args: list[Any] = []
    for i, (expr, kargs, value, direction) in enumerate(parts):
        equal = [f"{e} = ?" for e, _, _, _ in parts[:i]]
        ors.append("(" + " AND ".join([*equal, f"{expr} {'<' if direction == 'DESC' else '>'} ?"]) + ")")
        for e_args, e_value in ((a, v) for _, a, v, _ in parts[:i]):
            args += [*e_args, e_value]
        args += [*kargs, value]
    return "(" + " OR ".join(ors) + ")", args


def _key_number(value: Any) -> float | None:
    """A numeric sort key as a link carries it (a number; ``"inf"``, ``"-inf"`` for an open end), as a float; None:
    not one."""
    if value in ("inf", "-inf"):
        return float(value)
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) <= _MAX_KEY_NUMBER else None


def _plain_key(value: Any) -> Any:
    """A sort key as a page's link carries it (JSON): a text, a number, ``"inf"``/``"-inf"`` (the open end of a
    Period, which JSON has no number for), or None."""
    if value is None or isinstance(value, str):
        return value
    number = float(value)
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return value if isinstance(value, int) else number


#: SQL condition: the resource carries no ``meta.tag`` of the system given (``?``) with code ``superseded``.
_NOT_SUPERSEDED = {
    "sqlite": ("(json_extract(resources.json, '$.meta.tag') IS NULL OR NOT EXISTS (SELECT 1 FROM"
               " json_each(resources.json, '$.meta.tag') t WHERE json_extract(t.value, '$.system') = ?"
               " AND json_extract(t.value, '$.code') = 'superseded'))"),
    # the text is looked at first: only a resource that mentions the code at all is read as JSON
    "postgresql": ("(strpos(resources.json, 'superseded') = 0 OR NOT coalesce(CAST(resources.json AS jsonb)"
                   " -> 'meta' -> 'tag' @> jsonb_build_array(jsonb_build_object('system', CAST(? AS text),"
                   " 'code', 'superseded')), false))"),
}

#: What is stored of a resource's current version: (rid, version, last_updated, message_ref, json).
_Stored = tuple[int, int, str, Any, str]

#: A stored resource's JSON text and its search index rows: (text, [(param, system, code)], [(param, lo, hi)]).
_Rows = tuple[str, list[tuple[str, str, str]], list[tuple[str, float, float]]]


@dataclass(frozen=True)
class Written:
    """What storing made of one resource: its type, id, the version it now has and when that version was stored,
    and whether it was ``created`` (version 1), ``updated`` (a new version) or left ``unchanged`` (the same content
    as the version stored, which stays current)."""

    type: str
    id: str
    version: int
    last_updated: str
    change: str


@dataclass
class Prepared:
    """A Bundle's resources ready to store: as stored, how to resolve references, rows of first versions."""

    resources: list[dict[str, Any]]
    resolve: Callable[[str], dict[str, Any] | None]
    first: list[_Rows] | None  # None: the Bundle holds a resource twice and is stored one resource at a time
    at: str = ""  # the lastUpdated the rows of ``first`` carry in their JSON (when they were made)


def _rows_of(body: dict[str, Any], resolve: Any) -> _Rows:
    found_tokens, found_dates = index_resource(body, resolve)
    return jsonutil.dumps(body), found_tokens, found_dates


def _first_version(res: dict[str, Any], now: str, resolve: Any) -> _Rows:
    return _rows_of(_versioned(res, 1, now), resolve)


def _versioned(res: dict[str, Any], version: int, now: str) -> dict[str, Any]:
    """The resource as stored: ``meta`` after ``resourceType`` and ``id``, with ``versionId`` and ``lastUpdated``."""
    meta = dict(res.get("meta", {}))
    meta["versionId"] = str(version)
    meta["lastUpdated"] = now
    stored = {"resourceType": res["resourceType"], "id": res["id"], "meta": meta}
    stored.update(res)  # (a key already there keeps its place: the rest follow in the resource's order)
    stored["meta"] = meta
    return stored


#: Columns of ``messages`` added after the first release (added to an older SQLite database when it is opened).
_LEASE_COLUMNS = (("lease_owner", "TEXT"), ("lease_until", "REAL"), ("attempts", "INTEGER NOT NULL DEFAULT 0"))
#: Columns of ``messages`` that ``sql/sqlite/core.sql`` does not declare: added to every SQLite database when it
#: is opened (PostgreSQL's ``core.sql`` declares them).
_ADDED_COLUMNS = (("content_digest", "TEXT"),)

#: Layout of the resource tables and search index this code writes (SQLite: ``PRAGMA user_version``; both
#: engines: part ``core`` in ``schema_versions``).
#: 2: ``resources.rid`` and a search index keyed by it (1: index rows keyed by resource id).
#: 3: token values numbered once (``search_key``) and narrow token rows (key, res).
#: 4: ``date`` indexes a report's or result's effective time also when it is a Period or an instant (layout 3
#: indexed ``effectiveDateTime`` alone): the rows of the resources stored before are added (:func:`_effective_dates`).
SCHEMA_VERSION = 4
#: Indexes of ``core.sql`` added after its layout 3 was first released. On SQLite every opening runs the whole
#: file, which makes them; on PostgreSQL, whose openings only read, :func:`gateway.store.schema.build_indexes`
#: does (``gateway db upgrade``, ``gateway serve``'s start).
ADDED_CORE_INDEXES = ("messages_received", "outbox_payload", "signed_bundles_received", "messages_queued_sender")


def message_patients_stored(db: Database, record_id: int) -> tuple[list[tuple[str, str]], list[str]]:
    """What a stored message says of its patients: (``(id, json)`` of every Patient version stored from it, current
    or earlier; the ``patient_keys`` JSON lists of the signed Bundles it carried). For naming the patients of a view
    of its raw bytes in the audit log (:func:`gateway.commands.audit.message_patients`)."""
    patients = [(str(r["id"]), str(r["json"])) for r in db.query(
        "SELECT id, json FROM resources WHERE type = 'Patient' AND message_ref = ?"
        " UNION ALL SELECT id, json FROM resource_history WHERE type = 'Patient' AND message_ref = ?",
        [record_id, record_id])]
    keys = [str(r["patient_keys"] or "[]") for r in db.query(
        "SELECT patient_keys FROM signed_bundles WHERE message_ref = ?", [record_id])]
    return patients, keys


def ensure_core_schema(db: Database) -> None:
    """Create the tables of ``core.sql`` that are missing, and bring an older layout up to date.

    Refuses a database this release cannot work on (:func:`gateway.store.layout.check_layouts`), before writing.
    Idempotent, and done once per connection (later calls return at once). On
    SQLite it commits, so not inside a transaction; a database written by an
    earlier release keeps every resource and version: its resources move to
    the current table (each given a ``rid``) and the search index is rebuilt
    from them, in one transaction per step, logged with its progress. On
    PostgreSQL there is no earlier layout: the schema file runs in one
    transaction holding the write lock (nodes starting together do not race).
    """
    if not schema.once(db, "core"):
        return
    from gateway.store.layout import check_layouts

    check_layouts(db)  # (a later release's database, another program's record: refused before anything is written)
    if dialect(db) == "postgresql":
        if schema.recorded_version(db, "core") >= SCHEMA_VERSION:
            return  # the layout is there: asked by reading, so a start never waits for another node's writes
        with transaction(db):
            ensure_patient_keys(db)
            _narrow_tokens(db)  # layout 2's token rows, converted (PostgreSQL has no layout 1)
            db.executescript(schema.script(db, "core"))
            if schema.version(db, "core") < SCHEMA_VERSION:
                _effective_dates(db)
                schema.set_version(db, "core", SCHEMA_VERSION)
            tallies.ensure(db)  # (a database made now; an older one's counts start at gateway db upgrade)
        return
    with spilling(db):  # (an earlier release's tables are rewritten whole)
        _ensure_core_sqlite(db)


def _ensure_core_sqlite(db: Database) -> None:
    """:func:`ensure_core_schema` on SQLite."""
    conn = db.conn
    script = schema.script(db, "core")
    ensure_patient_keys(db)  # before the script, which would make the table empty
    ensure_name_strings(db)  # likewise
    message_columns = schema.columns(db, "messages")
    added = [(name, kind) for name, kind in _LEASE_COLUMNS if message_columns and name not in message_columns]
    if added:  # an earlier release's messages table: leases of messages being worked
        log.warning("database layout: adding %s to messages", ", ".join(name for name, _ in added))
        conn.executescript("BEGIN IMMEDIATE;" + "".join(f" ALTER TABLE messages ADD COLUMN {name} {kind};"
                                                        for name, kind in added) + " COMMIT;")
    columns = schema.columns(db, "resources")
    if columns and "rid" not in columns:
        log.warning("database layout %d found: moving resources and rebuilding the search index",
                    conn.execute("PRAGMA user_version").fetchone()[0] or 1)
        # One script, one transaction: the old tables are renamed or dropped and the new ones made and filled.
        conn.executescript(
            "BEGIN IMMEDIATE;"
            " ALTER TABLE resources RENAME TO resources_layout1;"
            " DROP TABLE IF EXISTS search_token; DROP TABLE IF EXISTS search_date;"
            f" {script};"
            " INSERT INTO resources (type, id, version, last_updated, message_ref, json)"
            "  SELECT type, id, version, last_updated, message_ref, json FROM resources_layout1 ORDER BY rowid;"
            " DROP TABLE resources_layout1;"
            " COMMIT;")
    else:
        if _wide_tokens(db):
            _narrow_tokens(db)
        conn.executescript(script)
    if any(name not in schema.columns(db, "messages") for name, _ in _ADDED_COLUMNS):
        with transaction(db):  # looked at again under the write lock: another process may be opening it too
            present = schema.columns(db, "messages")
            for name, kind in _ADDED_COLUMNS:
                if name not in present:
                    log.debug("database layout: adding %s to messages", name)
                    conn.execute(f"ALTER TABLE messages ADD COLUMN {name} {kind}")
    if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
        with transaction(db):
            layout = conn.execute("PRAGMA user_version").fetchone()[0]  # (another process may have upgraded it)
            if layout == 3:
                _effective_dates(db)
            elif layout < 3:
                _reindex(db)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            schema.set_version(db, "core", SCHEMA_VERSION)
    elif schema.version(db, "core") < SCHEMA_VERSION:  # upgraded by a release that kept only user_version
        with transaction(db):
            schema.set_version(db, "core", SCHEMA_VERSION)
    tallies.ensure(db)  # the counts /health and /metrics read (started here for an earlier release's database)


#: The patient identifiers of the Bundles issued without their rows in ``signed_bundle_patients``, from their JSON
#: keys (``"system|value"``, split at the first ``|`` as the keys were joined).
_PATIENT_KEYS_FILL = {
    "sqlite": ("INSERT INTO signed_bundle_patients (value, system, doc_sha256) SELECT substr(j.value,"
               " instr(j.value, '|') + 1), substr(j.value, 1, instr(j.value, '|') - 1), s.doc_sha256 FROM"
               " signed_bundles s, json_each(s.patient_keys) j WHERE s.direction = 'issued' AND j.type = 'text'"
               " AND instr(j.value, '|') > 0 ON CONFLICT DO NOTHING"),
    "postgresql": ("INSERT INTO signed_bundle_patients (value, system, doc_sha256) SELECT substr(k, strpos(k, '|')"
                   " + 1), substr(k, 1, strpos(k, '|') - 1), s.doc_sha256 FROM signed_bundles s CROSS JOIN LATERAL"
                   " jsonb_array_elements_text(CAST(s.patient_keys AS jsonb)) AS k WHERE s.direction = 'issued'"
                   " AND strpos(k, '|') > 0 AND NOT EXISTS (SELECT 1 FROM signed_bundle_patients p WHERE"
                   " p.doc_sha256 = s.doc_sha256) ON CONFLICT DO NOTHING"),
}


def ensure_patient_keys(db: Database, *, missing: bool = False) -> int:
    """Make ``signed_bundle_patients`` where a database whose issued Bundles were kept before it existed lacks it,
    filled from their keys, in one transaction (the caller's, when it has one) holding the write lock. Nothing
    to do for a new database (the schema file makes it empty). Returns the rows filled in.

    ``missing`` (``gateway db upgrade`` and ``gateway serve``'s start): on PostgreSQL, where a node's opening only
    reads, a process of this release may keep Bundles before the table is made (it keeps them without their
    rows), and so may a node of the earlier release beside it: their rows are filled in too, by one statement
    outside the write lock (an anti-join: one pass over the issued Bundles). On SQLite the first opening by this
    release makes the table, and an earlier release's processes must be stopped before it (as for any upgrade)."""
    if not schema.columns(db, "signed_bundles"):
        return 0
    if not schema.columns(db, "signed_bundle_patients"):
        create = schema.statement(db, "core", "CREATE TABLE IF NOT EXISTS signed_bundle_patients ")
        with transaction(db):
            if schema.columns(db, "signed_bundle_patients"):  # another process made it meanwhile
                return 0
            db.execute(create)
            filled = int(db.execute(_PATIENT_KEYS_FILL[dialect(db)]).rowcount or 0)
        log.warning("database layout: signed_bundle_patients made, %d patient identifiers of Bundles issued "
                    "before it", filled)
        return filled
    if not missing or dialect(db) != "postgresql" or db.conn.in_transaction:
        return 0
    filled = int(db.execute(_PATIENT_KEYS_FILL["postgresql"]).rowcount or 0)
    if filled:
        log.warning("database layout: %d patient identifiers of Bundles kept before signed_bundle_patients was made "
                    "filled in", filled)
    return filled


def ensure_name_strings(db: Database, *, missing: bool = False) -> int:
    """SQLite: make ``search_string`` where a database whose resources were stored before it existed lacks it,
    filled from the names of the resources stored (:func:`_name_strings`), in one transaction holding the write
    lock. Nothing to do for a new database, nor on PostgreSQL (whose layout has always had it). Returns the rows
    filled in.

    ``missing`` (``gateway db upgrade`` and ``gateway serve``'s start): also fill in the names of the resources
    stored without them since, by a process of an earlier release that knows nothing of the table (one pass over
    the resources with names, through the table's index of resources)."""
    if dialect(db) == "postgresql" or "rid" not in schema.columns(db, "resources"):
        return 0  # (a layout without ``rid`` has its whole index rebuilt, names included)
    types = sorted(_STRING_TYPES)
    marks = ",".join("?" * len(types))
    if schema.columns(db, "search_string"):
        if not missing or db.conn.in_transaction:
            return 0
        with transaction(db):
            filled = _fill_names(db, f"SELECT rid, json FROM resources r WHERE type IN ({marks}) AND NOT EXISTS"
                                     " (SELECT 1 FROM search_string s WHERE s.res = r.rid) ORDER BY rid", types)
        if filled:
            log.warning("database layout: %d name strings of resources stored without them (by an earlier release)"
                        " filled in", filled)
        return filled
    made = [schema.statement(db, "core", "CREATE TABLE IF NOT EXISTS search_string "),
            schema.statement(db, "core", "CREATE INDEX IF NOT EXISTS search_string_owner ")]
    with transaction(db):
        if schema.columns(db, "search_string"):  # another process made it meanwhile
            return 0
        for statement in made:
            db.execute(statement)
        filled = _fill_names(db, f"SELECT rid, json FROM resources WHERE type IN ({marks}) ORDER BY rid", types)
    log.warning("database layout: search_string made, %d name strings of the resources stored before it", filled)
    return filled


def _fill_names(db: Database, select: str, args: list[Any]) -> int:
    """Insert the name strings of the resources ``select`` gives (rid, json), a few thousand at a time."""
    filled = 0
    cursor = db.conn.execute(select, args)
    while True:
        found = cursor.fetchmany(2000)
        if not found:
            return filled
        rows: list[tuple[str, str, str, str, int]] = []
        for row_number, text in found:
            rows += _name_strings(jsonutil.loads(text), int(row_number))
        _insert_index(db.conn, [], [], rows)
        filled += len(rows)


def _wide_tokens(db: Database) -> bool:
    """Whether the token index is layout 2's, one wide row per value and resource (converted at layout 3)."""
    return "type" in schema.columns(db, "search_token")


#: Layout 2 -> 3 in SQL: each distinct value numbered once, then every row kept, as a (number, resource) row.
_NARROW_KEYS = ("INSERT INTO search_key (type, param, code, system) SELECT DISTINCT type, param, code, system"
                " FROM search_token_layout2 WHERE true ON CONFLICT DO NOTHING")
_NARROW_ROWS = ("INSERT INTO search_token (key, res) SELECT k.key, o.res FROM search_token_layout2 o JOIN search_key k"
                " ON k.type = o.type AND k.param = o.param AND k.code = o.code AND k.system = o.system WHERE true"
                " ON CONFLICT DO NOTHING")


def _narrow_tokens(db: Database) -> None:
    """Convert layout 2's wide token rows into numbered values and narrow rows, in SQL, in one transaction (the
    caller's, when it has one) holding the write lock.

    Every row is kept as it was, the chained ones (``patient.identifier`` as the
    patient was when the resource was stored) included, which rebuilding the
    index from today's resources would change; nothing is read into this
    process, and a crash leaves layout 2 as it was. Nothing happens when another
    process has converted it already. It records layout 3 (on SQLite, in the file's user_version too).
    """
    postgresql = dialect(db) == "postgresql"
    with transaction(db):  # looked at again under the write lock: another process may be upgrading it too
        if not _wide_tokens(db):
            return
        log.warning("database layout 2 found: converting its search token rows to numbered values (layout 3)")
        db.execute("DROP INDEX IF EXISTS search_token_owner")
        if postgresql:  # its primary key's index is named after the table: out of the new table's way
            db.execute("ALTER TABLE search_token RENAME CONSTRAINT search_token_pkey TO search_token_layout2_pkey")
        db.execute("ALTER TABLE search_token RENAME TO search_token_layout2")
        for statement in statements(schema.script(db, "core")):  # CREATE ... IF NOT EXISTS: the new tables
            db.execute(statement)
        db.execute(_NARROW_KEYS)
        total = db.execute(_NARROW_ROWS).rowcount
        db.execute("DROP TABLE search_token_layout2")
        if not postgresql:
            db.execute("PRAGMA user_version = 3")
        schema.set_version(db, "core", 3)  # (layout 4's step follows: ensure_core_schema)
        log.warning("database layout 3: %d search token rows kept as numbered values", total)


def _reindex(db: Database) -> None:
    """Rebuild the whole search index from the stored resources (inside a transaction)."""
    conn = db.conn
    conn.execute("DELETE FROM search_token")
    conn.execute("DELETE FROM search_date")
    conn.execute("DELETE FROM search_string")
    total = conn.execute("SELECT count(*) FROM resources").fetchone()[0]

    def resolve(reference: str) -> dict[str, Any] | None:
        rtype, _, rid = reference.partition("/")
        row = conn.execute("SELECT json FROM resources WHERE type = ? AND id = ?", [rtype, rid]).fetchone()
        return dict(jsonutil.loads(row[0])) if row else None

    done = 0
    tokens: list[tuple[str, str, str, str, int]] = []
    dates: list[tuple[str, str, float, float, int]] = []
    strings: list[tuple[str, str, str, str, int]] = []
    for row_number, rtype, text in conn.execute("SELECT rid, type, json FROM resources ORDER BY rid"):
        body = jsonutil.loads(text)
        found_tokens, found_dates = index_resource(body, resolve)
        tokens += [(rtype, p, code, system, row_number) for p, system, code in found_tokens]
        dates += [(rtype, p, lo, hi, row_number) for p, lo, hi in found_dates]
        strings += _name_strings(body, row_number)
        done += 1
        if len(tokens) > 50_000 or done == total:
            _insert_index(conn, tokens, dates, strings, _known_keys(db))
            tokens, dates, strings = [], [], []
            log.info("search index rebuilt for %d of %d resources", done, total)


#: Reports and results that may have an effective time layout 3 did not index (a Period, an instant).
_EFFECTIVE_SPANS = ("SELECT rid, type, json FROM resources WHERE type IN ('DiagnosticReport', 'Observation') AND"
                    " (json LIKE '%\"effectivePeriod\"%' OR json LIKE '%\"effectiveInstant\"%') ORDER BY rid")


def _effective_dates(db: Database) -> int:
    """Layout 3 to 4, inside the caller's transaction: the ``date`` rows of the stored reports and results whose
    effective time is a Period or an instant (one pass over the resources); returns the rows added."""
    cursor = db.conn.execute(_EFFECTIVE_SPANS)
    added = 0
    while True:
        found = cursor.fetchmany(2000)
        if not found:
            break
        dates = [(str(rtype), param, lo, hi, int(row_number)) for row_number, rtype, text in found
                 for param, lo, hi in index_resource(jsonutil.loads(text))[1] if param == "date"]
        _insert_index(db.conn, [], dates)
        added += len(dates)
    if added:
        log.warning("database layout %d: the dates of %d reports and results whose effective time is a period or "
                    "an instant added to the search index", SCHEMA_VERSION, added)
    return added


_VALUES4 = "(?,?,?,?),"


class _KnownKeys:
    """The numbers of token values one SQLite connection has found in ``search_key`` committed, so that storing a
    report asks the database only for values it has not met yet (a laboratory's codes, its patients, ``final``).

    A value's number never changes once committed: ``search_key`` rows are never updated or removed (a rebuilt
    index keeps them). A number is remembered only when found by a transaction that did not add it itself (those it
    added are in :attr:`made` until the transaction ends: its rollback would free the number for another value).
    Kept on the connection's :class:`Database` (``known_keys``): a connection replaced starts with none. Only
    :func:`_key_numbers` adds values while it is in use (the layout steps of :func:`_narrow_tokens` add theirs by
    themselves, in a transaction of their own before anything is stored). A value met once (a patient's identifier,
    a report's number) is added and never remembered unless a later report has it again; at the bound, some 5 MB of
    values, the half remembered first is forgotten and asked again when met.
    """

    #: values remembered at most; the oldest half is forgotten when full (a laboratory's values come back often)
    limit = 20_000

    def __init__(self) -> None:
        self.known: dict[tuple[str, str, str, str], int] = {}
        self.transaction: int | None = None  # (Database.sqlite_begun of the transaction :attr:`made` belongs to)
        self.made: set[tuple[str, str, str, str]] = set()

    def remember(self, numbers: dict[tuple[str, str, str, str], int]) -> None:
        if len(self.known) + len(numbers) > self.limit:
            for key in list(self.known)[:len(self.known) // 2]:
                del self.known[key]
        self.known.update(numbers)


def _known_keys(db: Database) -> _KnownKeys | None:
    """The :class:`_KnownKeys` of ``db``'s connection for its transaction under way; None outside a transaction
    begun by :func:`gateway.store.db.transaction` (numbered on the connection), and on PostgreSQL (whose rows are
    numbered by the server in the statement that adds them)."""
    begun = getattr(db, "sqlite_begun", None)
    if begun is None or not db.conn.in_transaction:
        return None
    known: _KnownKeys | None = getattr(db, "known_keys", None)
    if known is None:
        known = _KnownKeys()
        db.known_keys = known
    if known.transaction != begun:
        known.transaction = begun
        known.made.clear()
    return known


def _key_numbers(conn: Any, keys: list[tuple[str, str, str, str]],
                 known: _KnownKeys | None = None) -> dict[tuple[str, str, str, str], int]:
    """The numbers of token values (type, param, code, system) in ``search_key``; those not there yet are added.

    Asked inside the caller's transaction (one statement per 200 values, and one INSERT per 200 values not there),
    but for the values ``known`` holds: a number kept from an earlier transaction could name a value its rollback
    removed, so only those found committed are kept (:class:`_KnownKeys`).
    """
    if known is None:
        numbers = _numbered(conn, keys)
    else:
        numbers = {}
        asked = []
        for key in keys:
            number = known.known.get(key)
            if number is None:
                asked.append(key)
            else:
                numbers[key] = number
        if not asked:
            return numbers
        found = _numbered(conn, asked)
        numbers.update(found)
        committed = {key: number for key, number in found.items() if key not in known.made}
        if committed:
            known.remember(committed)
        keys = asked
    missing = [key for key in keys if key not in numbers]
    if missing:
        added: dict[tuple[str, str, str, str], int] = {}
        for start in range(0, len(missing), 200):
            chunk = missing[start:start + 200]
            values = (_VALUES4 * len(chunk))[:-1]  # (without the last comma)
            rows = conn.execute(f"INSERT INTO search_key (type, param, code, system) VALUES {values}"
                                " ON CONFLICT DO NOTHING RETURNING key, type, param, code, system",
                                [v for key in chunk for v in key]).fetchall()
            added.update({(t, p, c, s): int(k) for k, t, p, c, s in rows})
        if len(added) < len(missing):  # (a value given twice is added once, and given back once)
            added.update(_numbered(conn, [key for key in missing if key not in added]))
        if known is not None:
            known.made.update(added)
        numbers.update(added)
    return numbers


def _numbered(conn: Any, keys: list[tuple[str, str, str, str]]) -> dict[tuple[str, str, str, str], int]:
    """The numbers ``search_key`` has for those of ``keys`` it holds; each value read through its unique index."""
    numbers: dict[tuple[str, str, str, str], int] = {}
    for start in range(0, len(keys), 200):
        chunk = keys[start:start + 200]
        rows = conn.execute(f"SELECT k.key, k.type, k.param, k.code, k.system FROM (VALUES {_VALUES4 * len(chunk)}"
                            " (NULL, NULL, NULL, NULL)) v JOIN search_key k ON k.type = v.column1 AND k.param ="
                            " v.column2 AND k.code = v.column3 AND k.system = v.column4",
                            [v for key in chunk for v in key]).fetchall()
        numbers.update({(t, p, c, s): int(k) for k, t, p, c, s in rows})
    return numbers


#: The current version of a resource by row number (``rid``): a new one, or a new version of one stored.
_UPSERT_RESOURCE = "INSERT INTO resources (rid, type, id, version, last_updated, message_ref, json)"
_UPSERT_RESOURCE_SET = (" ON CONFLICT (rid) DO UPDATE SET type = excluded.type, id = excluded.id,"
                        " version = excluded.version, last_updated = excluded.last_updated,"
                        " message_ref = excluded.message_ref, json = excluded.json")

#: PostgreSQL: each table's rows as one statement over arrays of column values, in the column types.
_BATCH_HISTORY = ("INSERT INTO resource_history (type, id, version, last_updated, message_ref, json)"
                  " SELECT * FROM unnest(CAST(? AS text[]), CAST(? AS text[]), CAST(? AS integer[]),"
                  " CAST(? AS text[]), CAST(? AS bigint[]), CAST(? AS text[])) ON CONFLICT DO NOTHING")
_BATCH_RESOURCES = (_UPSERT_RESOURCE + " SELECT * FROM unnest(CAST(? AS bigint[]), CAST(? AS text[]),"
                    " CAST(? AS text[]), CAST(? AS integer[]), CAST(? AS text[]), CAST(? AS bigint[]),"
                    " CAST(? AS text[]))" + _UPSERT_RESOURCE_SET)
_BATCH_KEYS = ("INSERT INTO search_key (type, param, code, system) SELECT * FROM unnest(CAST(? AS text[]),"
               " CAST(? AS text[]), CAST(? AS text[]), CAST(? AS text[])) ON CONFLICT DO NOTHING")
_BATCH_TOKENS = ("INSERT INTO search_token (key, res) SELECT k.key, t.res FROM unnest(CAST(? AS text[]),"
                 " CAST(? AS text[]), CAST(? AS text[]), CAST(? AS text[]), CAST(? AS bigint[]))"
                 " AS t (type, param, code, system, res) JOIN search_key k ON k.type = t.type AND k.param = t.param"
                 " AND k.code = t.code AND k.system = t.system ON CONFLICT DO NOTHING")
_BATCH_DATES = ("INSERT INTO search_date (type, param, lo, hi, res) SELECT * FROM unnest(CAST(? AS text[]),"
                " CAST(? AS text[]), CAST(? AS double precision[]), CAST(? AS double precision[]),"
                " CAST(? AS bigint[])) ON CONFLICT DO NOTHING")
_BATCH_STRINGS = ("INSERT INTO search_string (type, param, folded, exact, res) SELECT * FROM unnest("
                  "CAST(? AS text[]), CAST(? AS text[]), CAST(? AS text[]), CAST(? AS text[]), CAST(? AS bigint[]))"
                  " ON CONFLICT DO NOTHING")


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as lists of column values (the arrays a batched statement takes)."""
    return [list(column) for column in zip(*rows)] if rows else [[] for _ in range(width)]


def _write_columns(conn: Any, history: list[tuple[Any, ...]], replaced: list[int], rows: list[tuple[Any, ...]],
                   tokens: list[tuple[str, str, str, str, int]], dates: list[tuple[str, str, float, float, int]],
                   strings: list[tuple[str, str, str, str, int]]) -> None:
    """PostgreSQL: what :meth:`Store._put_all` writes row by row, one statement per table, in the same order
    (history, old index rows deleted, resources, index rows); a value a resource holds twice is indexed once."""
    if history:
        conn.execute_arrays(_BATCH_HISTORY, _columns(history, 6))
        for table in ("search_token", "search_date", "search_string"):
            conn.execute_arrays(f"DELETE FROM {table} WHERE res = ANY(CAST(? AS bigint[]))", [replaced])
    if rows:
        if len({r[0] for r in rows}) != len(rows):  # pragma: no cover - resources are distinct by contract
            raise ValueError("a batch of resources holds one row number twice")
        conn.execute_arrays(_BATCH_RESOURCES, _columns(rows, 7))
    if tokens:
        conn.execute_arrays(_BATCH_KEYS, _columns(list(dict.fromkeys(t[:4] for t in tokens)), 4))
        conn.execute_arrays(_BATCH_TOKENS, _columns(tokens, 5))
    if dates:
        lo_hi = [(t, p, float(lo), float(hi), r) for t, p, lo, hi, r in dates]  # one element type per array
        conn.execute_arrays(_BATCH_DATES, _columns(lo_hi, 5))
    if strings:
        conn.execute_arrays(_BATCH_STRINGS, _columns(strings, 5))


def _insert_index(conn: Any, tokens: list[tuple[str, str, str, str, int]],
                  dates: list[tuple[str, str, float, float, int]],
                  strings: list[tuple[str, str, str, str, int]] | None = None,
                  known: _KnownKeys | None = None) -> None:
    """Add search index rows; a value a resource holds twice is indexed once. ``strings``: ``search_string``
    rows; ``known``: the token values' numbers found committed before (:func:`_known_keys`)."""
    if tokens:
        numbers = _key_numbers(conn, list(dict.fromkeys(t[:4] for t in tokens)), known)
        conn.executemany("INSERT INTO search_token (key, res) VALUES (?,?) ON CONFLICT DO NOTHING",
                         [(numbers[t[:4]], t[4]) for t in tokens])
    if dates:
        conn.executemany("INSERT INTO search_date (type, param, lo, hi, res) VALUES (?,?,?,?,?)"
                         " ON CONFLICT DO NOTHING", dates)
    if strings:
        conn.executemany("INSERT INTO search_string (type, param, folded, exact, res) VALUES (?,?,?,?,?)"
                         " ON CONFLICT DO NOTHING", strings)


def _same_content(old_json: str, new: dict[str, Any]) -> bool:
    old = dict(jsonutil.loads(old_json))
    old_meta = {k: v for k, v in old.pop("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    new_body = dict(new)
    new_meta = new_body.pop("meta", {})
    return bool(old == new_body and old_meta == new_meta)


def _rewrite_refs(obj: Any, local: dict[str, str]) -> Any:
    """Replace in-Bundle ``urn:uuid:`` references by ``Type/id`` for storage, copy on write:
    :func:`gateway.walks.rewrite_refs` (compiled when built)."""
    return _refs_walk()(obj, local)


@functools.cache
def _refs_walk() -> Callable[..., Any]:
    from gateway import walks

    return walks.fast("rewrite_refs")
