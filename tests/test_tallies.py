"""Running counts (gateway.store.tallies): /health and /metrics read them instead of counting growing tables.

Each count is held equal to a count of the table itself after the changes of a day's work (a message stored,
refused, answered on receipt and worked, failed and retried; deliveries queued, given up, reset and delivered;
decisions recorded), on both engines; a database of an earlier release gets its counts at its next
opening (SQLite) or at ``gateway db upgrade`` (PostgreSQL). Inputs are the MLLP sample's messages
(``tests/data/hl7v2/mllp-framed.hl7``): its first is good, its second has ``高`` in a numeric OBX-5.
"""
from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import DATA
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages
from gateway.pipeline import Pipeline, Status
from gateway.store import layout, tallies
from gateway.store.db import connect, dialect
from gateway.store.decisions import DECISION_COLUMNS, DecisionStore
from gateway.store.store import Store

GOOD, BAD_VALUE = split_messages((DATA / "hl7v2" / "mllp-framed.hl7").read_bytes())[:2]
COUNTED = {"messages": ("messages", "status"), "deliveries": ("outbox", "status"),
           "decisions": ("recognition_decisions", "outcome")}


def copy_of(tag: str, message: bytes = GOOD) -> bytes:
    """``message`` with its control id (MSH-10) replaced by ``tag``."""
    return message.replace(b"TJ2406100001", tag.encode()).replace(b"TJ2406100002", tag.encode())


def counted(db: Any, what: str) -> dict[str, int]:
    table, column = COUNTED[what]
    return {str(k): int(n) for k, n in db.execute(
        f"SELECT {column}, count(*) FROM {table} GROUP BY {column}").fetchall()}


def assert_kept(db: Any, *which: str) -> None:
    for what in which or tuple(COUNTED):
        assert tallies.counts(db, what) == counted(db, what), what


def decision_row(n: int, outcome: str) -> list[Any]:
    values: dict[str, Any] = {c: f"{c}-{n}" for c in DECISION_COLUMNS}
    values.update(outcome=outcome, snapshot_version=1, decided_at="2026-11-22T02:00:00+00:00",
                  recorded_at="2026-11-22T02:00:01+00:00", decision_json=json.dumps({"n": n}))
    return [values[c] for c in DECISION_COLUMNS]


def some_work(pipeline: Pipeline, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The changes a day's work makes to the counted tables (``tag`` keeps one call's messages apart)."""
    from gateway.exchange.outbox import Outbox, SendResult
    from gateway.exchange.transports import MockTransport

    ch = pipeline.channel("hl7v2")
    outcomes = pipeline.ingest_batch(ch, [RawUnit(copy_of(f"{tag}1"), 1, "t"),
                                          RawUnit(copy_of(f"{tag}2", BAD_VALUE), 2, "t")], channel="mllp")
    assert [o.status for o in outcomes] == [Status.STORED, Status.REFUSED]
    pipeline.receive_batch(ch, [RawUnit(copy_of(f"{tag}3"), 1, "t"), RawUnit(copy_of(f"{tag}4"), 2, "t")],
                           channel="mllp")
    assert_kept(pipeline.store.db, "messages")  # two queued
    with monkeypatch.context() as m:  # one of them fails while it is worked
        real = pipeline._commit

        def commit(outcome: Any, audit: Any, **kw: Any) -> Any:
            if outcome.status is Status.STORED and outcome.message.message_id == f"{tag}4":
                raise RuntimeError("this one's resources cannot be written")
            return real(outcome, audit, **kw)
        m.setattr(pipeline, "_commit", commit)
        pipeline.process_queued()
    failed = [r.id for r in pipeline.store.list_messages("failed")]
    assert failed
    assert_kept(pipeline.store.db, "messages")
    assert pipeline.retry(failed[0], "ops").status is Status.STORED

    clock = pipeline.clock
    outbox = Outbox(pipeline.store.db, clock=clock, max_attempts=1, rand=lambda: 0.5)
    for n in range(3):
        outbox.enqueue("12500102MB0002006J", "http://127.0.0.1:1/exchange/bundles", f"{tag}{n}".encode())
    refused = MockTransport(lambda u, p, h: SendResult(False, retryable=False, status=400, error="refused"))
    outbox.deliver_due(refused, limit=1)  # given up: dead
    assert_kept(pipeline.store.db, "deliveries")
    dead = [row.id for row in outbox.list("dead")]
    assert len(dead) == 1
    outbox.retry(dead[0])  # back to pending
    assert_kept(pipeline.store.db, "deliveries")
    delivered = MockTransport(lambda u, p, h: SendResult(True, status=200, body=b"{\"ok\":1}"))
    outbox.deliver_due(delivered, limit=10)
    assert {row.status for row in outbox.list()} >= {"delivered"}
    decisions = DecisionStore(pipeline.store.db)
    from gateway.store.db import transaction
    with transaction(pipeline.store.db):
        decisions.ensure_schema()
        decisions.add_decisions([decision_row(sum(map(ord, tag)) * 10 + n, outcome) for n, outcome in
                                 enumerate(["recognized", "recognized", "needs-review"])])


def test_the_counts_follow_every_change(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    some_work(pipeline, "TA", monkeypatch)
    db = pipeline.store.db
    assert_kept(db)
    assert counted(db, "messages") == {"stored": 3, "refused": 1}
    assert sum(counted(db, "deliveries").values()) == 3 and counted(db, "decisions") == {
        "recognized": 2, "needs-review": 1}
    assert pipeline.store.counts() == counted(db, "messages")


def _forget(db: Any) -> None:
    """What a database of an earlier release lacks: the counts and their triggers."""
    from gateway.store.db import transaction

    with transaction(db):
        for what, (table, _) in COUNTED.items():
            for name in (f"tally_{what}_insert", f"tally_{what}_change", f"tally_{what}_delete"):
                db.execute(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if dialect(db) == "postgresql"
                                                               else ""))
        db.execute("DROP TABLE tallies")


def test_a_database_of_an_earlier_release_gets_its_counts(pipeline: Pipeline, settings: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    some_work(pipeline, "TB", monkeypatch)
    _forget(pipeline.store.db)
    pipeline.close()
    locator = settings.database_locator
    earlier = connect(locator)
    try:
        assert all(tallies.counts(earlier, what) is None for what in COUNTED), "not kept: counted instead"
        assert Store(earlier).counts() == counted(earlier, "messages")
    finally:
        earlier.conn.close()
    store = Store.open(locator)  # SQLite: its opening starts them; PostgreSQL: gateway db upgrade does
    try:
        if dialect(store.db) == "postgresql":
            assert tallies.counts(store.db, "messages") is None, "a PostgreSQL node's opening only reads"
            layout.upgrade(store.db)
        assert_kept(store.db)
    finally:
        store.close()
    again = Pipeline(settings, clock=pipeline.clock)
    try:
        some_work(again, "TC", monkeypatch)
        assert_kept(again.store.db)
    finally:
        again.close()


def test_a_trigger_dropped_by_hand_starts_the_count_again(pipeline: Pipeline, settings: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    some_work(pipeline, "TD", monkeypatch)
    db = pipeline.store.db
    db.execute("DROP TRIGGER tally_messages_change" + (" ON messages" if dialect(db) == "postgresql" else ""))
    db.execute("UPDATE tallies SET n = n + 7")
    pipeline.close()
    fresh = connect(settings.database_locator)
    try:
        assert tallies.counts(fresh, "messages") is None, "no longer kept whole: counted instead"
        assert tallies.ensure(fresh, ("messages",)) == ["messages"]
        assert_kept(fresh, "messages")
    finally:
        fresh.conn.close()


def test_health_and_metrics_read_the_running_counts(app: Any, anon: Any, pipeline: Pipeline) -> None:
    pipeline.ingest(GOOD, "hl7v2", channel="mllp")
    db = pipeline.store.db
    db.execute("UPDATE tallies SET n = 41 WHERE what = 'messages' AND key = 'stored'")
    assert anon.get("/health").get_json()["messages"] == {"stored": 41}, "read, not counted"
    assert counted(db, "messages") == {"stored": 1}


def test_many_decisions_at_once_count_the_new_ones_only(pipeline: Pipeline) -> None:
    """More decisions than one statement takes, some kept already: the new ones are stored in order, counted by
    the store's answer and by the running count alike."""
    from gateway.store.db import transaction

    store = DecisionStore(pipeline.store.db)
    outcomes = ["recognized", "not-recognized", "needs-review"]
    rows = [decision_row(n, outcomes[n % 3]) for n in range(130)]
    with transaction(pipeline.store.db):
        store.ensure_schema()
        assert store.add_decisions(rows[:10]) == 10
        assert store.add_decisions(rows) == 120
    db = pipeline.store.db
    assert tallies.counts(db, "decisions") == counted(db, "decisions") == {
        "recognized": 44, "not-recognized": 43, "needs-review": 43}
    if dialect(db) == "sqlite":
        order = [r[0] for r in db.execute("SELECT decision_id FROM recognition_decisions ORDER BY rowid")]
        assert order == [f"decision_id-{n}" for n in range(130)], "stored in the order given"


def test_a_long_lived_connection_counts_again_once_a_trigger_is_gone(pipeline: Pipeline) -> None:
    """A probe's connection lives long: whether the counts are kept is asked at each reading, not learnt once."""
    pipeline.ingest(GOOD, "hl7v2", channel="mllp")
    db = pipeline.store.db
    assert pipeline.store.counts() == {"stored": 1} == tallies.counts(db, "messages")
    db.execute("DROP TRIGGER tally_messages_insert" + (" ON messages" if dialect(db) == "postgresql" else ""))
    assert tallies.counts(db, "messages") is None
    pipeline.ingest(copy_of("TE2"), "hl7v2", channel="mllp")  # not counted by the running count any more
    assert pipeline.store.counts() == {"stored": 2} == counted(db, "messages"), "counted instead"


def test_the_counts_table_dropped_alone_is_made_again_at_the_next_opening(pipeline: Pipeline, settings: Any) -> None:
    pipeline.ingest(GOOD, "hl7v2", channel="mllp")
    pipeline.store.db.execute("DROP TABLE tallies")
    assert tallies.counts(pipeline.store.db, "messages") is None
    pipeline.close()
    again = Pipeline(settings, clock=pipeline.clock)  # (PostgreSQL: its start, as gateway serve's)
    try:
        if dialect(again.store.db) == "postgresql":
            layout.upgrade(again.store.db)
        again.ingest(copy_of("TF2"), "hl7v2", channel="mllp")
        assert_kept(again.store.db, "messages")
        assert counted(again.store.db, "messages") == {"stored": 2}
    finally:
        again.close()


def test_postgresql_counts_stay_in_the_schema_of_the_table_written(backend: str, request: Any) -> None:
    """A session whose search_path names another member's schema (an operator's script) writing this member's
    table changes this member's counts, not its own."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's schemas (run with --backend postgresql)")
    cluster = request.getfixturevalue("pg_cluster")
    import uuid

    tag = uuid.uuid4().hex[:8]
    stores = {name: Store.open(str(cluster.url("gw", schema=f"tally_{name}_{tag}"))) for name in ("a", "b")}
    try:
        for name, store in stores.items():
            layout.upgrade(store.db)
            store.insert_raw(channel="file", fmt="fhir", sender="t", message_id=f"{name}1", origin="t", raw=b"{}")
        from gateway.store.db import transaction
        with transaction(stores["b"].db):
            stores["b"].db.execute(f"UPDATE tally_a_{tag}.messages SET status = 'failed'")
        for store in stores.values():
            assert_kept(store.db, "messages")
        assert counted(stores["a"].db, "messages") == {"failed": 1}
        assert counted(stores["b"].db, "messages") == {"received": 1}
    finally:
        for store in stores.values():
            store.close()


def test_any_value_is_counted_even_an_empty_one(pipeline: Pipeline, settings: Any) -> None:
    """A status set by hand to '' is a value like any other: counted, and the count started again over it."""
    pipeline.ingest(GOOD, "hl7v2", channel="mllp")
    db = pipeline.store.db
    db.execute("UPDATE messages SET status = ''")
    assert_kept(db, "messages")
    db.execute("DROP TRIGGER tally_messages_delete" + (" ON messages" if dialect(db) == "postgresql" else ""))
    pipeline.close()
    fresh = connect(settings.database_locator)
    try:
        assert tallies.ensure(fresh, ("messages",)) == ["messages"]
        assert tallies.counts(fresh, "messages") == counted(fresh, "messages") == {"": 1}
    finally:
        fresh.conn.close()
