"""What several nodes of one member sharing one PostgreSQL database do once, not once per node.

Each test opens several connections to one database, as the background loops of several ``gateway serve``
nodes would, and lets them race; the real PostgreSQL decides who wins.
"""
from __future__ import annotations

import datetime as _dt
import threading
from typing import Any

from gateway.audit import checkpoint as cp
from gateway.audit import records as r
from gateway.audit.log import append
from gateway.demo.registry import build_demo_registry
from gateway.store import layout
from gateway.store.db import connect, transaction

CST = _dt.timezone(_dt.timedelta(hours=8))
ISSUED = _dt.datetime(2026, 11, 20, 8, 0, tzinfo=CST)
TONGJIANG, FULING = "12511921MB0001003C", "12500102MB0002006J"


def race(count: int, work: Any) -> list[Any]:
    """Run ``work(i)`` on ``count`` threads released together; their results, in thread order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def test_a_due_checkpoint_is_made_by_one_node(pg_url: str) -> None:
    registry = build_demo_registry(ISSUED)
    signer = cp.Signer(registry.member_keys[TONGJIANG], [registry.member_certs[TONGJIANG]])
    db = connect(pg_url)
    me, peer = r.Party.member(TONGJIANG), r.Party.member(FULING)
    for i in range(5):
        append(db, r.exchange("received", at=ISSUED + _dt.timedelta(minutes=i), gateway=me, peer=peer,
                              bundle_hash=f"sha256:{i:064x}"))
    nodes = [connect(pg_url) for _ in range(4)]
    made = race(4, lambda i: cp.maybe_make(nodes[i], signer, now=ISSUED + _dt.timedelta(minutes=10)))
    assert sum(m is not None for m in made) == 1
    assert [c.count for c in cp.checkpoints(db)] == [5]
    for conn in [db, *nodes]:
        conn.conn.close()


def test_writers_on_several_connections_take_turns(pg_url: str) -> None:
    """The write lock: a read-then-write inside ``transaction()`` is never interleaved with another's."""
    db = connect(pg_url)
    layout.upgrade(db)  # (the gateway's database, with a table of the test's beside its own)
    db.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
    db.execute("INSERT INTO counter VALUES (0)")
    nodes = [connect(pg_url) for _ in range(4)]

    def bump(i: int) -> None:
        for _ in range(25):
            with transaction(nodes[i]):
                n = nodes[i].execute("SELECT n FROM counter").fetchone()[0]
                nodes[i].execute("UPDATE counter SET n = ?", [n + 1])
    race(4, bump)
    assert db.execute("SELECT n FROM counter").fetchone()[0] == 100
    for conn in [db, *nodes]:
        conn.conn.close()


def test_nodes_started_from_one_configuration_keep_their_run_folders_apart(tmp_path: Any, pg_url: str) -> None:
    """Two nodes on one host with the same data_dir (only the ports differ) never share heartbeats or manifests."""
    from gateway.config import load_settings
    from gateway.heartbeat import run_dir

    def node(port: int, database: str) -> Any:
        return load_settings(environ={}, overrides={"data_dir": str(tmp_path), "database": database,
                                                    "http_port": port})
    assert run_dir(node(8091, pg_url)) != run_dir(node(8092, pg_url))
    assert run_dir(node(8091, pg_url)).parent == tmp_path
    assert run_dir(node(8091, "")) == run_dir(node(8092, "")) == tmp_path / "gateway.db.run"  # SQLite: one gateway
