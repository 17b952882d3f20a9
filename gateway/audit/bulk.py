"""Audit bulk: fill a log with many realistic synthetic entries, fast, to measure search and verify at scale.

For benchmarks and load tests only, never for real events. The entries are the
ones the gateway writes (received Bundles, recognition decisions, lookups,
ingested messages and auditors' queries, in that mix), made by the record
helpers and rendered and indexed exactly as :func:`gateway.audit.log.append`
does, so searches and verification see a real log. It is faster than appending
one by one because it writes one transaction per batch.
"""

from __future__ import annotations

import datetime as _dt
import random
from collections.abc import Iterator
from typing import Any, Literal

from gateway.audit import records as r
from gateway.audit.log import GENESIS, entry_hash, ensure_schema, epoch_ms, instant
from gateway.audit.render import index_values, render
from gateway.signing.canonical import canonicalize_plain
from gateway.store.audit import audit_store
from gateway.store.db import Database, transaction

__all__ = ["synthetic_records", "fill"]

_GATEWAY = r.Party.member("12511921MB0001003C", "通江县人民医院（合成数据）")
_PEERS = [r.Party.member(f"125000{i:02d}MB000{i:04d}", f"成员医院{i}（合成数据）") for i in range(20)]
_ITEMS = [("https://fhir.cyhr.org.cn/CodeSystem/catalogue-bench", f"I{i:03d}", f"项目{i}") for i in range(200)]
_RULES = ("member-active", "catalogue-item", "catalogue-scope", "eqa-pass", "validity-window", "report-status")


def _patient(rng: random.Random) -> r.PatientRef:
    # Synthetic 18-character numbers shaped like 身份证号; they are search keys here, never checked.
    return r.PatientRef.id_card(
        f"510104{rng.randrange(1950, 2020)}{rng.randrange(1, 13):02d}01{rng.randrange(10**4):04d}"
    )


def synthetic_records(
    count: int, *, start: _dt.datetime, step: _dt.timedelta = _dt.timedelta(seconds=1), seed: int = 1
) -> Iterator[r.Record]:
    """``count`` records a busy member gateway might write, one every ``step`` from ``start`` (reproducible by seed)."""
    rng = random.Random(seed)
    for i in range(count):
        at = start + i * step
        peer = _PEERS[rng.randrange(len(_PEERS))]
        patient = _patient(rng)
        kind = i % 5
        if kind == 0:
            yield r.exchange(
                "received",
                at=at,
                gateway=_GATEWAY,
                peer=peer,
                bundle_hash=f"sha256:{rng.getrandbits(256):064x}",
                peer_address="10.1.2.3",
                patient=patient,
            )
        elif kind == 1:
            outcome: Literal["recognized", "not-recognized", "needs-review"] = rng.choice(
                ("recognized", "recognized", "recognized", "not-recognized", "needs-review")
            )
            rules = [r.RuleResult(rule, True) for rule in _RULES]
            if outcome == "not-recognized":
                rules[3] = r.RuleResult("eqa-pass", False, "no EQA pass in the cycle")
            elif outcome == "needs-review":
                rules[4] = r.RuleResult("validity-window", None, "no collection time")
            yield r.decision(
                at=at,
                gateway=_GATEWAY,
                receiver=_GATEWAY,
                issuer=peer,
                report=f"R{i}",
                item=_ITEMS[rng.randrange(len(_ITEMS))],
                catalogue="bench",
                outcome=outcome,
                rules=rules,
                snapshot_version=1,
                decision_id=f"bench-{i}",
                patient=patient,
            )
        elif kind == 2:
            yield r.patient_read(
                at=at,
                gateway=_GATEWAY,
                server_address="https://gw.example/fhir",
                client=peer,
                client_address="10.1.2.4",
                member=peer,
                patient=patient,
                resources=[f"DiagnosticReport/{i}"],
            )
        elif kind == 3:
            yield r.ingest(
                at=at,
                gateway=_GATEWAY,
                source=r.Party.application(_GATEWAY.value, "LIS"),
                message_id=f"MSG{i}",
                fmt="hl7v2",
                status="stored",
                channel="mllp",
            )
        else:
            yield r.audit_query(
                at=at,
                gateway=_GATEWAY,
                server_address="https://gw.example",
                client=r.Party("", display="browser"),
                client_address="10.0.0.9",
                user=r.Party.user(_GATEWAY.value, "auditor1"),
                user_roles=["auditor"],
                query=f"GET /fhir/AuditEvent?agent:identifier={peer.value}",
                results=50,
            )


def _content(record: r.Record) -> dict[str, Any]:
    recorded = instant(record.recorded)
    content: dict[str, Any] = {"facts": dict(record.facts), "kind": record.kind, "recorded": recorded}
    content["t"] = epoch_ms(record.recorded)
    content.update(index_values(render(record.kind, recorded, content["facts"])))
    return content


def fill(
    db: Database,
    count: int,
    *,
    start: _dt.datetime,
    step: _dt.timedelta = _dt.timedelta(seconds=1),
    seed: int = 1,
    batch: int = 5000,
) -> int:
    """Append ``count`` synthetic entries after the log's current end; return how many were added."""
    ensure_schema(db)
    pending = synthetic_records(count, start=start, step=step, seed=seed)
    added = 0
    with audit_store(db).big_cache():  # while filling, the indexes of a big log stay in memory
        while added < count:
            added += _fill_batch(db, pending, min(batch, count - added))
    return added


def _fill_batch(db: Database, pending: Iterator[r.Record], size: int) -> int:
    """Append ``size`` records in one transaction."""
    store = audit_store(db)
    with transaction(db):
        seq, prev = store.last() or (0, GENESIS)
        rows = []
        for _, record in zip(range(size), pending):
            data = canonicalize_plain(_content(record))
            seq += 1
            digest = entry_hash(seq, prev, data)
            rows.append((seq, data.decode("utf-8"), prev, digest))
            prev = digest
        store.insert(rows)
    return len(rows)
