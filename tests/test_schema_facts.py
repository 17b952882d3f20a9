"""Facts a connection learns about its database's layout (gateway.store.schema.learn) on SQLite.

A table made by a connection inside a transaction is asked about again until a later transaction finds it (it
may yet be rolled back); once settled, storing a report asks nothing about the layout.
"""
from __future__ import annotations

import pytest

from gateway.store import reports
from gateway.store.db import connect, savepoint, transaction


def _layout_queries(db) -> list[str]:
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    return seen


def _asks_layout(statements: list[str]) -> bool:
    return any("sqlite_master" in s or "table_info" in s for s in statements)


def test_a_table_made_in_a_rolled_back_savepoint_is_made_again(tmp_path):
    db = connect(tmp_path / "g.db")
    with transaction(db):
        with pytest.raises(RuntimeError):
            with savepoint(db, "outcome"):
                reports.ensure_schema(db)
                assert reports._exists(db)
                raise RuntimeError("the recording of this message fails")
    with transaction(db):
        reports.ensure_schema(db)  # the fact was never settled: asked again, and the table made again
    assert db.execute("SELECT count(*) FROM report_versions").fetchone()[0] == 0


def test_a_table_made_in_a_rolled_back_transaction_is_made_again(tmp_path):
    db = connect(tmp_path / "g.db")
    with pytest.raises(RuntimeError):
        with transaction(db):
            reports.ensure_schema(db)
            raise RuntimeError("the whole unit of work fails")
    with transaction(db):
        reports.ensure_schema(db)
    assert db.execute("SELECT count(*) FROM report_versions").fetchone()[0] == 0


def test_the_fact_settles_once_a_later_transaction_finds_the_table(tmp_path):
    db = connect(tmp_path / "g.db")
    with transaction(db):
        reports.ensure_schema(db)  # made here: not settled while this transaction may roll back
        seen = _layout_queries(db)
        reports.ensure_schema(db)
        assert _asks_layout(seen)
    seen = _layout_queries(db)
    with transaction(db):
        reports.ensure_schema(db)  # found by a later transaction: settled
    assert _asks_layout(seen)
    seen = _layout_queries(db)
    for _ in range(3):
        with transaction(db):
            reports.ensure_schema(db)
    assert not _asks_layout(seen), seen
