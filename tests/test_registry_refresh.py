"""A registry snapshot installed while a gateway is idle is applied by its background pass and shown at once."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil

from conftest import CST

from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.registry.holder import SnapshotFile, highest_version, holder_from_settings, remember_version
from gateway.serve import background_pass
from gateway.store.db import connect


class Clock:
    def __init__(self, now: _dt.datetime) -> None:
        self.now = now

    def __call__(self) -> _dt.datetime:
        return self.now


def test_an_idle_gateway_applies_a_new_snapshot_file_within_a_pass(tmp_path, member_database) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"), database=member_database)
    pipeline = world.gateways["tongjiang"].pipeline
    ex = pipeline.exchange
    assert ex.holder.current.version == 1

    newer = build_demo_registry(clock(), version=2, reuse=world.registry)
    path = ex.settings.registry_snapshot
    with open(path + ".new", "w", encoding="utf-8") as fh:
        fh.write(newer.text())
    os.replace(path + ".new", path)  # the operator's one move
    ex.snapshot_file._checked = 0.0  # the file is looked at every few seconds; no need to wait in a test

    done = background_pass(pipeline)
    assert done.get("registry") == 1
    assert ex.holder.current.version == 2

    app = world.gateways["tongjiang"].app
    body = app.test_client().get("/registry/snapshot", headers={
        "Authorization": f"Bearer {world.gateways['tongjiang'].token}"}).get_json()
    assert body["version"] == 2, body


def test_a_snapshot_file_that_does_not_verify_leaves_the_one_in_force(tmp_path, member_database) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"), database=member_database)
    pipeline = world.gateways["tongjiang"].pipeline
    ex = pipeline.exchange
    text = build_demo_registry(clock(), version=2, reuse=world.registry).text()
    with open(ex.settings.registry_snapshot, "w", encoding="utf-8") as fh:
        changed = text.replace('"version": 2,', '"version": 3,', 1)
        assert changed != text
        fh.write(changed)  # changed after signing
    ex.snapshot_file._checked = 0.0
    assert background_pass(pipeline).get("registry") is None
    assert ex.holder.current.version == 1
    # /health says so (it said ok while the refusal was a log line, and the next start refuses the file)
    client = world.gateways["tongjiang"].app.test_client()
    answer = client.get("/health")
    check = answer.get_json()["checks"]["registry"]
    assert answer.status_code == 503 and not check["ok"], check
    assert "was refused" in check["detail"] and "version 1 stays in force" in check["detail"], check
    with open(ex.settings.registry_snapshot, "w", encoding="utf-8") as fh:
        fh.write(text)  # the authority's own file: applied, and the check is back
    ex.snapshot_file._checked = 0.0
    assert background_pass(pipeline).get("registry") == 1
    check = client.get("/health").get_json()["checks"]["registry"]
    assert check["ok"] and check["detail"].startswith("registry snapshot 2 valid until"), check


def test_a_snapshot_one_node_applies_is_applied_by_every_node_sharing_the_database(tmp_path, member_database) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"), database=member_database)
    pipeline = world.gateways["tongjiang"].pipeline
    ex = pipeline.exchange
    # a second node of the same gateway: the same database, a snapshot file of its own (still version 1)
    own_file = tmp_path / "node-b-snapshot.json"
    shutil.copyfile(ex.settings.registry_snapshot, own_file)
    node_b = dataclasses.replace(ex.settings, registry_snapshot=str(own_file))
    holder_b = holder_from_settings(node_b, clock)
    assert holder_b is not None and holder_b.current.version == 1
    watcher_b = SnapshotFile(node_b, holder_b, clock)

    newer = build_demo_registry(clock(), version=2, reuse=world.registry)
    path = ex.settings.registry_snapshot
    with open(path + ".new", "w", encoding="utf-8") as fh:
        fh.write(newer.text())
    os.replace(path + ".new", path)  # installed on the first node only
    ex.snapshot_file._checked = 0.0
    assert background_pass(pipeline).get("registry") == 1
    assert ex.holder.current.version == 2

    db = connect(node_b.database_locator)
    try:
        assert watcher_b.refresh() is False  # its own file did not change
        assert watcher_b.refresh(db=db) is True  # its background pass finds version 2 in the database
        assert holder_b.current.version == 2 and holder_b.current.digest() == ex.holder.current.digest()
        assert watcher_b.refresh(db=db, force=True) is False  # nothing newer now
    finally:
        db.conn.close()
    # a node restarted with its older file starts with the newer snapshot and never goes back
    restarted = holder_from_settings(node_b, clock)
    assert restarted is not None and restarted.current.version == 2
    assert highest_version(node_b.database_locator) == 2


def test_a_database_of_an_earlier_release_keeps_its_floor_and_gains_the_snapshot_text(tmp_path) -> None:
    """SQLite only: a file of an earlier release (PostgreSQL databases start at today's layout)."""
    path = tmp_path / "old.db"
    old = connect(path)
    old.execute("CREATE TABLE registry_applied (version INTEGER NOT NULL, digest TEXT NOT NULL,"
                " applied_at TEXT NOT NULL, PRIMARY KEY (version, digest))")
    old.execute("INSERT INTO registry_applied VALUES (3, 'abc', '2026-11-01T00:00:00+08:00')")
    old.conn.close()
    assert highest_version(path) == 3
    at = _dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
    remember_version(path, 3, "abc", at, text=b"signed snapshot")  # kept once, its text added
    db = connect(path)
    try:
        rows = db.execute("SELECT version, digest, applied_at, snapshot FROM registry_applied").fetchall()
    finally:
        db.conn.close()
    assert rows == [(3, "abc", "2026-11-01T00:00:00+08:00", b"signed snapshot")]


def test_recognize_decides_by_a_snapshot_installed_meanwhile_without_a_background_pass(
        tmp_path, member_database) -> None:
    """An HTTP worker is another process than the background pass that logs the new snapshot as applied: its
    ``$recognize`` looks for a newly installed file itself, as the registry view does, and decides by it."""
    import json

    from conftest import DATA, FULING

    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"), database=member_database)
    gateway = world.gateways["tongjiang"]
    ex = gateway.pipeline.exchange
    bundle = json.loads((DATA / "registry" / "bundle-lab-tongjiang.json").read_text(encoding="utf-8"))
    body = {"resourceType": "Parameters", "parameter": [{"name": "bundle", "resource": bundle},
                                                        {"name": "receiver", "valueString": FULING}]}

    def decided_by() -> int:
        answer = gateway.app.test_client().post("/fhir/$recognize", json=body,
                                                headers={"Authorization": f"Bearer {gateway.token}"})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        return next(p["valueInteger"] for p in answer.get_json()["parameter"] if p["name"] == "snapshotVersion")

    assert decided_by() == 1
    newer = build_demo_registry(clock(), version=2, reuse=world.registry)
    path = ex.settings.registry_snapshot
    with open(path + ".new", "w", encoding="utf-8") as fh:
        fh.write(newer.text())
    os.replace(path + ".new", path)
    ex.snapshot_file._checked = 0.0  # (looked at every few seconds)
    assert decided_by() == 2


def test_health_and_metrics_report_the_snapshot_another_node_applied(tmp_path, member_database) -> None:
    """A node whose own snapshot file is older: its /health and /metrics report the newer snapshot another node of
    the gateway applied (read from the shared database), as its background pass and registry view do — they
    reported the node's own file's version (and a node whose file was near its end failed /health)."""
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"), database=member_database)
    gateway = world.gateways["tongjiang"]
    ex = gateway.pipeline.exchange
    newer = build_demo_registry(clock(), version=2, reuse=world.registry)
    remember_version(ex.settings.database_locator, 2, newer.snapshot(clock()).digest(), clock(),
                     member=ex.settings.issuer_uscc, text=newer.text().encode("utf-8"))  # as another node applied it
    ex.snapshot_file._checked = ex.snapshot_file._db_checked = 0.0  # (looked at every few seconds)
    client = gateway.app.test_client()
    body = client.get("/health").get_json()
    assert body["checks"]["registry"]["detail"].startswith("registry snapshot 2 valid until"), body
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {gateway.token}"}).get_data(as_text=True)
    assert "gateway_registry_snapshot_version 2.0" in metrics
