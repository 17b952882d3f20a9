"""Queue readers give way to the listeners (``mllp_ack = received``), and several readers wait only to write.

- ``queue_reader_nice`` (default 10): a queue reader process of ``gateway serve`` runs that much below the
  listeners' CPU priority, so that a receipt never waits for a core a reader's work holds; 0 leaves it as it is.
- With several readers (``queue_readers`` above 1) a reader makes what a message's recording writes (its rows, its
  signed copy deflated) while it works the message, beside the other readers: only the writing waits for the
  message's turn, which comes once the earlier messages of its sender are recorded.

Input: the first message of the MLLP sample (``tests/data/hl7v2/mllp-framed.hl7``, see tests/data/README.md), its
control id and report number made distinct per message (``test_queue_in_turn.numbered``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TONGJIANG, children_of, mllp_codes, wait_port
from gateway.config import load_settings
from gateway.demo import free_port
from gateway.errors import ConfigError
from test_mllp_receipt import GOOD
from test_queue_in_turn import numbered, queue


def nice_of(pid: int) -> int:
    """The nice value of process ``pid`` (field 19 of /proc/PID/stat; the command name may hold spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])


def test_the_setting_is_0_to_19_and_10_unless_set(tmp_path) -> None:
    assert load_settings(environ={}, overrides={"data_dir": str(tmp_path)}).queue_reader_nice == 10
    assert load_settings(environ={"GATEWAY_QUEUE_READER_NICE": "0"},
                         overrides={"data_dir": str(tmp_path)}).queue_reader_nice == 0
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match=r"queue_reader_nice .* must be 0 to 19") as caught:
            load_settings(environ={}, overrides={"data_dir": str(tmp_path), "queue_reader_nice": bad})
        assert caught.value.location == "queue_reader_nice"


@pytest.mark.parametrize("step", [7, 0])
def test_gateway_serve_runs_its_queue_readers_below_the_listeners_priority(tmp_path: Path, step: int) -> None:
    """Two queue readers at ``queue_reader_nice`` below the listener that started them; they still store every
    message the listener answered on receipt."""
    from gateway.store.store import Store

    port = free_port()
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "gw"), "issuer_uscc": TONGJIANG, "mllp_port": port, "mllp_ack": "received",
        "log_level": "WARNING", "queue_readers": 2, "queue_reader_nice": step})
    proc = subprocess.Popen([sys.executable, "-m", "gateway.serve", json.dumps(dataclasses.asdict(settings))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        readers = [pid for pid in children_of(proc.pid)
                   if b"--queue" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        assert len(readers) == 2
        listener = nice_of(proc.pid)
        codes = mllp_codes(port, GOOD, clients=2, each=3, tag="N")
        store = Store.open(settings.database_locator)
        try:
            deadline = time.monotonic() + 60
            while store.counts().get("stored", 0) < 6 and time.monotonic() < deadline:
                time.sleep(0.1)
            counts = store.counts()
        finally:
            store.close()
        # (lowered as a reader starts, before it opens the database: a reader that has not started yet is waited for)
        expected = [min(19, listener + step)] * 2
        deadline = time.monotonic() + 30
        while [nice_of(pid) for pid in readers] != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [nice_of(pid) for pid in readers] == expected
        assert nice_of(proc.pid) == listener, "the listener's own priority is left as it was"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert codes == {0: ["AA"] * 3, 1: ["AA"] * 3}
    assert counts == {"stored": 6}
    assert b"Traceback" not in err, err.decode("utf-8", "replace")[-2000:]


def test_a_priority_the_system_refuses_is_said_and_the_reader_goes_on(monkeypatch, caplog) -> None:
    from gateway import serve

    def refused(step: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refused)
    serve._lower_priority(10, "queue-1")
    assert "queue-1: its CPU priority could not be lowered (queue_reader_nice 10)" in caplog.text


def test_readers_in_turn_make_what_they_write_before_waiting_for_the_turn(pipeline, monkeypatch) -> None:
    """A reader taking four messages makes the rows of all four as it works them, before it asks whose turn it is:
    two readers make rows side by side, and only the writing is done one message after the other."""
    from gateway.pipeline import Pipeline

    queue(pipeline, [numbered(n) for n in range(1, 5)])
    events: list[str] = []
    prepare, turn = pipeline.store.prepare, Pipeline._turn_came

    def prepared(bundle):
        events.append("rows made")
        return prepare(bundle)

    def asked(self, *args, **kwargs):
        events.append("turn asked")
        return turn(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.store, "prepare", prepared)
    monkeypatch.setattr(Pipeline, "_turn_came", asked)
    done = pipeline.process_queued(4, in_turn=True)
    assert len(done) == 4 and pipeline.store.counts() == {"stored": 4}
    assert events.count("rows made") == 4
    assert events.index("turn asked") > max(i for i, e in enumerate(events) if e == "rows made"), events
