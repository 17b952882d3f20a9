"""Audit: the recognition log auditors can trust and query.

Every exchange, recognition decision and override, read of patient results,
registry snapshot applied and message taken in is written once, in the
transaction of the action itself, to an append-only hash-chained log in the
gateway's database, and rendered on demand as an R4 AuditEvent (IHE BALP where
it applies). Signed checkpoints, held by peers too, make rewriting history
visible to ``gateway audit verify``.

For the rest of the gateway::

    from gateway.audit import append, records

    with transaction(db):
        ...  # the action
        append(db, records.exchange("received", at=now, gateway=me, peer=sender, bundle_hash=h))

Modules: :mod:`~gateway.audit.records` (typed record helpers), :mod:`~gateway.audit.log`
(append, read), :mod:`~gateway.audit.render` (AuditEvent), :mod:`~gateway.audit.query`
(FHIR search), :mod:`~gateway.audit.stats` (互认率 and other figures),
:mod:`~gateway.audit.export` (CSV, NDJSON), :mod:`~gateway.audit.verify` (chain walk),
:mod:`~gateway.audit.checkpoint` (signed heads).
"""

from __future__ import annotations

from gateway.audit import records
from gateway.audit.log import Entry, append, ensure_schema

__all__ = ["records", "append", "ensure_schema", "Entry"]
