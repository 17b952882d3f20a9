"""Audit log: the append-only, hash-chained record of what the gateway did.

Entries live in the gateway's database, SQLite or PostgreSQL (``audit_log``;
the tables, their guards and every statement are in :mod:`gateway.store.audit`).
:func:`append` is called inside the transaction of the action it records
(``gateway.store.db.transaction``), so both commit or neither does. Database
triggers refuse every UPDATE and DELETE, and refuse an INSERT that does not
follow the last entry. Appends are serialised by the transaction's write lock
(SQLite's ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so several gateway
nodes appending to one PostgreSQL database still write one chain.

Each entry holds ``content``: the RFC 8785 (JCS) text of ::

    {"facts": {...}, "k": [[param, system, value], ...], "kind": "decision",
     "outcome": "0", "recorded": "2025-05-01T08:00:00.123+08:00",
     "subtype": [system, code], "t": 1746057600123, "type": [system, code]}

(``facts`` renders the AuditEvent; the rest is its search index, derived from
the rendered event), and is chained by ::

    hash = SHA-256( prev_hash || ASCII(seq) || "\\n" || content )

with ``prev_hash`` the hash of entry ``seq - 1`` (32 zero bytes for entry 1).
Changing, removing, inserting or reordering an entry therefore breaks the
chain at that entry, and rewriting the whole tail is caught by the signed
checkpoints (``gateway.audit.checkpoint``). ``gateway.audit.verify`` walks it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import rfc8785

from gateway.audit.records import KINDS, Record
from gateway.audit.render import decision_index, index_values, render
from gateway.errors import InputError, NotFound
from gateway.signing.canonical import canonicalize_plain
from gateway.store.audit import audit_store, statements
from gateway.store.db import Database, transaction

__all__ = [
    "GENESIS",
    "Entry",
    "ensure_schema",
    "has_log",
    "append",
    "append_many",
    "append_prepared",
    "chain",
    "prepare",
    "entry_hash",
    "head",
    "get",
    "entries",
    "instant",
    "epoch_ms",
    "schema_statements",
]

log = logging.getLogger(__name__)

#: prev_hash of the first entry.
GENESIS = bytes(32)

_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
#: Reads back content this module has just written (strings, integers, booleans, null: nothing to lose).
_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True)
class Entry:
    """One log entry as stored: position, hashes and the content the hash covers."""

    seq: int
    content: dict[str, Any]
    hash: bytes
    prev_hash: bytes

    @property
    def id(self) -> str:
        """The id of the entry's AuditEvent."""
        return str(self.seq)

    @property
    def kind(self) -> str:
        """Record kind (exchange, decision, ...)."""
        return str(self.content["kind"])

    @property
    def recorded(self) -> str:
        """When it happened: a FHIR instant with offset."""
        return str(self.content["recorded"])

    @property
    def facts(self) -> dict[str, Any]:
        """The facts the AuditEvent renders from."""
        return dict(self.content["facts"])

    def event(self) -> dict[str, Any]:
        """The entry as an R4 AuditEvent.

        :raises ConfigError: an entry this gateway version cannot render.
        """
        return render(
            self.kind,
            self.recorded,
            self.content["facts"],
            seq=self.seq,
            entry_hash=self.hash,
            prev_hash=self.prev_hash,
        )

    @classmethod
    def from_row(cls, seq: int, content: str, entry_hash: bytes, prev_hash: bytes) -> Entry:
        """An entry from its database columns."""
        return cls(seq, json.loads(content), bytes(entry_hash), bytes(prev_hash))


def instant(at: _dt.datetime) -> str:
    """A FHIR instant with milliseconds and the offset ``at`` carries.

    :raises InputError: ``at`` has no offset.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise InputError("an audit time must carry a UTC offset", "recorded")
    return at.isoformat(timespec="milliseconds")


def epoch_ms(at: _dt.datetime) -> int:
    """Milliseconds since 1970-01-01T00:00Z, truncated like :func:`instant`."""
    return (at - _EPOCH) // _dt.timedelta(milliseconds=1)


def entry_hash(seq: int, prev_hash: bytes, content: bytes) -> bytes:
    """SHA-256 over the previous hash, the position and the canonical content."""
    return hashlib.sha256(prev_hash + b"%d\n" % seq + content).digest()


def schema_statements() -> list[str]:
    """The statements of the SQLite schema file, one by one (``executescript`` would commit the caller's
    transaction)."""
    return statements()


def has_log(db: Database) -> bool:
    """True when the database holds an audit log (its table exists)."""
    return audit_store(db).has_log()


def ensure_schema(db: Database) -> None:
    """Create the audit tables, indexes and guard triggers in a database that has no audit log yet.

    A database that has one is left as it is: were its guard triggers dropped,
    recreating them here would hide that from ``gateway audit verify``.
    Safe inside a caller's transaction (it joins it).
    """
    audit_store(db).ensure_schema()


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _content(record: Record) -> bytes:
    if record.kind not in KINDS:
        raise InputError(f"audit record kind {record.kind!r} is not one of {', '.join(KINDS)}", "kind")
    recorded = instant(record.recorded)
    facts = dict(record.facts)
    content: dict[str, Any] = {"facts": facts, "kind": record.kind, "recorded": recorded}
    content["t"] = epoch_ms(record.recorded)
    if record.well_formed and record.kind == "decision":
        content.update(decision_index(facts))  # (what rendering would index: a builder's facts always render)
    else:
        try:
            event = render(record.kind, recorded, facts)
        except (KeyError, TypeError) as exc:
            raise InputError(f"audit facts of a {record.kind} record are incomplete ({exc})", "facts") from None
        content.update(index_values(event))
    try:
        data = canonicalize_plain(content)
        if b"\\u0000" in data:  # U+0000 in a fact: recorded as U+FFFD, on every engine (PostgreSQL cannot hold it)
            data = canonicalize_plain(_without_nul(content))
        return data
    except rfc8785.CanonicalizationError as exc:
        # Facts are strings, integers, booleans and lists/objects of them; a float or a
        # Decimal has no place in an audit record (its canonical form would lose precision).
        raise InputError(f"audit facts are not canonical JSON: {exc}", "facts") from None


def append(db: Database, record: Record) -> Entry:
    """Append one record to the log, inside the caller's transaction (or a new one).

    :raises InputError: an unknown kind, facts that do not render, a naive time.
    :raises gateway.store.db.IntegrityError: only if the chain guard was bypassed by a concurrent writer
        (cannot happen under the transaction's write lock).
    """
    return append_many(db, [record])[0]


def append_many(db: Database, records: Sequence[Record]) -> list[Entry]:
    """Append records in order, chained one to the next, with one read of the log's end and one insert.

    Inside the caller's transaction (or a new one); every record is rendered and
    checked before anything is written, so a bad one leaves the log as it was.

    :raises InputError: see :func:`append`.
    """
    return append_prepared(db, prepare(records))


def prepare(records: Sequence[Record]) -> list[bytes]:
    """The checked, canonical contents of records, for :func:`append_prepared`.

    Needs no database, so a caller can make them before it takes the write
    lock. :raises InputError: see :func:`append`.
    """
    return [_content(record) for record in records]


def append_prepared(db: Database, contents: Sequence[bytes]) -> list[Entry]:
    """Append contents made by :func:`prepare`, in order, chained; inside the caller's transaction (or a new one)."""
    chained = _chain(db, contents)
    return [Entry(seq, _decode(data), digest, prev) for data, (seq, digest, prev) in zip(contents, chained)]


def chain(db: Database, contents: Sequence[bytes]) -> int:
    """:func:`append_prepared` for a caller that does not read the entries back (a message's outcome, a received
    Bundle's decisions): none of them is decoded again. Returns how many were appended."""
    return len(_chain(db, contents))


def _chain(db: Database, contents: Sequence[bytes]) -> list[tuple[int, bytes, bytes]]:
    """(seq, hash, previous hash) of each of ``contents`` once appended."""
    if not contents:
        return []
    store = audit_store(db)
    chained: list[tuple[int, bytes, bytes]] = []
    with transaction(db):
        store.ensure_schema()
        seq, prev = store.last() or (0, GENESIS)
        rows = []
        for data in contents:
            seq += 1
            digest = entry_hash(seq, prev, data)
            rows.append((seq, data.decode("utf-8"), prev, digest))
            chained.append((seq, digest, prev))
            prev = digest
        store.insert(rows)
    log.debug("audit entries %d to %d appended", chained[0][0], chained[-1][0])
    return chained


def head(db: Database) -> tuple[int, bytes]:
    """``(count, hash of the last entry)``; ``(0, GENESIS)`` for an empty log."""
    store = audit_store(db)
    store.ensure_schema()
    return store.last() or (0, GENESIS)


def get(db: Database, seq: int | str) -> Entry:
    """One entry by its sequence number (the AuditEvent id).

    :raises NotFound: no such entry.
    """
    store = audit_store(db)
    store.ensure_schema()
    try:
        number = int(str(seq))
    except ValueError:
        raise NotFound(f"AuditEvent/{seq} does not exist", "AuditEvent.id") from None
    row = store.entry(number) if -2**63 <= number < 2**63 else None
    if row is None:
        raise NotFound(f"AuditEvent/{seq} does not exist", "AuditEvent.id")
    return Entry.from_row(*row)


def entries(db: Database, start: int = 1, stop: int | None = None) -> Iterator[Entry]:
    """Entries ``start`` to ``stop`` (inclusive; to the end when None), in order, streamed."""
    store = audit_store(db)
    store.ensure_schema()
    for row in store.entries(start, stop):
        yield Entry.from_row(*row)
