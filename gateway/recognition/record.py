"""Deciding recognition and recording it: the one way every entry point does it.

``POST /fhir/$recognize``, a signed Bundle received from another member and
``gateway recognize --db`` all decide the results of a Bundle against the
registry snapshot and keep the decisions with their audit entries. They do it
here, in two steps, so that the work that needs no lock is done before the
caller takes the write lock:

1. :func:`decide` — the decisions (a report that a stored correction
   supersedes is decided as superseded) and their audit entries, made ready;
2. :meth:`Decided.record` — inside the caller's transaction: the decisions
   stored and their audit entries chained, committed with whatever else the
   caller records (a received Bundle's signed copy and its exchange entry).
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Mapping

from gateway.audit import events as audit_events
from gateway.audit import log as audit_log
from gateway.audit.records import Party
from gateway.recognition.engine import Decision, decide_all
from gateway.recognition.facts import ResultFacts, with_superseded
from gateway.recognition.store import save_decisions
from gateway.registry.models import Snapshot
from gateway.store.db import Database, transaction
from gateway.store.reports import superseded_in

__all__ = ["Decided", "decide", "decide_and_record"]


@dataclass(frozen=True)
class Decided:
    """Decisions made and their audit entries ready to chain."""

    decisions: list[Decision]
    entries: list[bytes]

    def record(self, db: Database, recorded_at: _dt.datetime) -> int:
        """Store the decisions and append their audit entries, inside the caller's transaction (or a new one);
        returns how many decisions were new."""
        with transaction(db):
            added = save_decisions(db, self.decisions, recorded_at)
            audit_log.chain(db, self.entries)
        return added


def decide(facts: Sequence[ResultFacts], bundle: Mapping[str, Any], snapshot: Snapshot, receiver: str,
           at: _dt.datetime, *, db: Database | None = None, bundle_hash: str | None = None,
           kid: str | None = None, recorded: _dt.datetime | None = None, client: Party | None = None,
           client_address: str | None = None) -> Decided:
    """Decide every result for ``receiver`` at ``at``; with ``db``, a report a stored correction supersedes is
    decided as superseded. ``recorded``: when the audit entries are written, when it is not ``at`` (a decision as of
    another time: the entries are dated when they are written, and say what time they decided for). ``client``:
    who asked for the decisions (an account of this gateway, from ``client_address``), named in their entries.
    Needs no lock: reads only."""
    if db is not None:
        facts = with_superseded(list(facts), superseded_in(db, bundle))
    decisions = decide_all(list(facts), snapshot, receiver, at)
    records = audit_events.decision_records(decisions, member=receiver, bundle_hash=bundle_hash, kid=kid,
                                            recorded=recorded, client=client, client_address=client_address)
    entries = audit_log.prepare(records)
    return Decided(decisions, entries)


def decide_and_record(db: Database, facts: Sequence[ResultFacts], bundle: Mapping[str, Any], snapshot: Snapshot,
                      receiver: str, at: _dt.datetime, *, recorded_at: _dt.datetime, client: Party | None = None,
                      client_address: str | None = None) -> tuple[list[Decision], int]:
    """:func:`decide`, then :meth:`Decided.record` in a transaction of its own: (decisions, how many were new)."""
    made = decide(facts, bundle, snapshot, receiver, at, db=db, recorded=recorded_at, client=client,
                  client_address=client_address)
    return made.decisions, made.record(db, recorded_at)
