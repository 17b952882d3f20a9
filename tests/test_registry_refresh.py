"""A registry snapshot installed while a gateway is idle is applied by its background pass and shown at once."""
from __future__ import annotations

import datetime as _dt
import os

from conftest import CST

from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.serve import background_pass


class Clock:
    def __init__(self, now: _dt.datetime) -> None:
        self.now = now

    def __call__(self) -> _dt.datetime:
        return self.now


def test_an_idle_gateway_applies_a_new_snapshot_file_within_a_pass(tmp_path) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"))
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
    body = app.test_client().get("/registry/snapshot").get_json()
    assert body["version"] == 2, body


def test_a_snapshot_file_that_does_not_verify_leaves_the_one_in_force(tmp_path) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}
    world = build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"))
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
