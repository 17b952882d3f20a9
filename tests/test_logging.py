"""Log lines: JSON lines (log_format = json) carry timestamp, level, process, request id, user, route, status and
latency and never patient data; text access lines carry a timestamp; a bad log_format stops the start.

`gateway serve` writing JSON from every process is checked in tests/test_metrics.py (one real server for both).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from conftest import DATA, make_token
from gateway.errors import ConfigError
from gateway.httpserver import access_log
from gateway.logs import JsonFormatter, check_format

UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
PATIENT = ("王", "建国", "511921196612120011", "Z0099812")  # PID-3 and PID-5 of the sample
GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))


class Lines(logging.Handler):
    """Keeps every formatted line (JSON, as a worker named http-1 writes it)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("http-1"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("gateway")
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def test_an_access_line_names_request_user_route_status_and_latency_never_the_query(
        app: Any, json_lines: Lines) -> None:
    token = make_token(app, "lis", ["submitter"])
    client = Client(access_log(app.wsgi_app))
    response = client.post("/ingest/hl7v2?patient.identifier=511921196612120011", data=UTF8,
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "x-application/hl7-v2+er7"})
    assert response.status_code == 200
    rid = response.headers["X-Request-Id"]
    lines = [json.loads(line) for line in json_lines.lines]
    access = [e for e in lines if e["logger"] == "gateway.access"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == rid and line["user"] == "lis" and line["process"] == "http-1"
    assert line["route"] == "/ingest/hl7v2" and line["method"] == "POST" and line["status"] == 200
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0 and line["level"] == "INFO"
    assert _dt.datetime.fromisoformat(line["timestamp"]).tzinfo is not None
    # what the pipeline logged while answering carries the same request id
    worked = [e for e in lines if e["logger"] == "gateway.pipeline"]
    assert worked and all(e["request_id"] == rid for e in worked)
    text = "\n".join(json_lines.lines)
    for needle in PATIENT:
        assert needle not in text, f"patient data in the log: {needle}"


def test_a_refused_request_names_the_account_that_was_refused(app: Any, json_lines: Lines) -> None:
    """An auditor's token on patient data (403): the access line names who tried (it said user=-)."""
    token = make_token(app, "aud1", ["auditor"])
    client = Client(access_log(app.wsgi_app))
    response = client.get("/fhir/Patient?identifier=511921196612120011", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    line = json.loads(next(x for x in json_lines.lines if '"gateway.access"' in x))
    assert line["user"] == "aud1" and line["status"] == 403 and line["route"] == "/fhir/Patient", line


def test_a_caller_request_id_is_kept_and_an_anonymous_request_names_no_user(app: Any, json_lines: Lines) -> None:
    client = Client(access_log(app.wsgi_app))
    response = client.get("/health", headers={"X-Request-Id": "edge-4f2a91c3"})
    assert response.headers["X-Request-Id"] == "edge-4f2a91c3"
    line = json.loads(next(x for x in json_lines.lines if '"gateway.access"' in x))
    assert line["request_id"] == "edge-4f2a91c3" and "user" not in line and line["route"] == "/health"


def test_an_exception_is_logged_by_type_and_place_never_by_its_text(json_lines: Lines) -> None:
    log = logging.getLogger("gateway.test")
    try:
        raise ValueError("王建国 511921196612120011 cannot be read")
    except ValueError:
        log.exception("a unit could not be read")
    line = json.loads(json_lines.lines[-1])
    assert line["error"] == "ValueError" and "test_logging.py:" in line["where"]
    assert line["message"] == "a unit could not be read" and line["level"] == "ERROR"
    assert "511921196612120011" not in json_lines.lines[-1] and "王" not in json_lines.lines[-1]
    assert "request_id" not in line, "no request outside a request"


_SCRIPT = """
import logging, sys
from gateway.httpserver import access_log
from gateway.logs import configure
from werkzeug.test import Client
from werkzeug.wrappers import Response

configure("INFO", sys.argv[1], "http-3")
logging.getLogger("gateway.test").info("started")
Client(access_log(Response("ok"))).get("/registry/snapshot?q=511921196612120011")
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_process_writes_its_lines_in_the_configured_format(fmt: str) -> None:
    # stamped in local time with its offset, as the JSON lines, ACKs and `gateway messages list` are
    done = subprocess.run([sys.executable, "-c", _SCRIPT, fmt], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TZ": "Asia/Shanghai"})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    assert "511921196612120011" not in done.stderr
    if fmt == "text":
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+08:00"
        assert re.fullmatch(rf"{stamp} INFO gateway\.test: started", lines[0]), lines[0]
        assert re.fullmatch(rf'{stamp} INFO gateway\.access: - "GET /registry/snapshot" 200 \d+\.\d{{3}}s '
                            r'user=- id=[0-9a-f]{32}', lines[1]), lines[1]
    else:
        first, access = (json.loads(line) for line in lines)
        assert first["process"] == access["process"] == "http-3" and first["message"] == "started"
        assert access["route"] == "/registry/snapshot" and access["status"] == 200
        assert re.fullmatch(r"[0-9a-f]{32}", access["request_id"]) and access["pid"] > 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+08:00", first["timestamp"])


def test_an_unknown_log_format_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        check_format("xml")
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "gw"), "GATEWAY_LOG_FORMAT": "xml",
           "GATEWAY_HTTP_PORT": "0", "GATEWAY_MLLP_PORT": "0"}
    done = subprocess.run([GATEWAY, "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["Error: configuration: log_format: log_format 'xml' must be 'text' "
                                                "or 'json'"]


def test_database_faults_are_one_warning_in_the_database_s_words_not_an_error_per_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the database is away every message fails the same way: one WARNING in the database's own words per
    window (with how many failed since), not an 'internal error' with a code place for each; the gateway's own
    failures are still ERRORs naming where in the code."""
    import sqlite3
    import types

    from gateway import pipeline as pipeline_module
    from gateway.errors import DatabaseUnavailable
    from gateway.pipeline import Stage

    held = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)
    held.execute("CREATE TABLE t (x)")
    held.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(tmp_path / "locked.db", timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as locked:  # a real fault: another writer holds the file
        other.execute("BEGIN IMMEDIATE")
    held.close()
    other.close()
    ch = types.SimpleNamespace(format="hl7v2")
    from gateway import logs

    monkeypatch.setattr(logs, "_faults", {})
    caplog.set_level(logging.WARNING, logger="gateway.pipeline")
    for index in range(1, 6):
        pipeline_module._log_internal(Stage.STORE, ch, index, 100 + index, locked.value)
    lines = [r for r in caplog.records if r.name == "gateway.pipeline"]
    assert [(r.levelname, r.getMessage()) for r in lines] == [
        ("WARNING", "database unavailable in stage store of hl7v2 unit 1 (record 101): database is locked")]
    caplog.clear()
    monkeypatch.setattr(logs, "DATABASE_FAULT_LOG_EVERY", 0.0)  # the window has passed
    gone = DatabaseUnavailable("cannot connect to the PostgreSQL database postgresql://gw:***@db/gw: "
                               "Connection refused", "database")
    pipeline_module._log_internal(Stage.RECEIVE, ch, 6, None, gone)
    assert [r.getMessage() for r in caplog.records] == [
        "database unavailable in stage receive of hl7v2 unit 6 (record None): cannot connect to the PostgreSQL "
        "database postgresql://gw:***@db/gw: Connection refused (and 4 more since the last such line)"]
    caplog.clear()
    try:
        raise KeyError("王建国")
    except KeyError as bug:
        pipeline_module._log_internal(Stage.MAP, ch, 7, 107, bug)
    (record,) = caplog.records
    assert record.levelname == "ERROR" and "internal error in stage map" in record.getMessage()
    assert "KeyError at test_logging.py:" in record.getMessage() and "王建国" not in record.getMessage()


def test_psycopg_s_own_line_about_a_pipeline_on_a_lost_connection_is_left_out(
        capsys: pytest.CaptureFixture[str]) -> None:
    """psycopg warns, naming a Python object, when a pipeline ends on a connection the server ended; the work it
    was part of has failed and said so in the gateway's words. Its other warnings still reach the log."""
    from gateway.logs import configure

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure("INFO", "text", "test")
        psycopg_log = logging.getLogger("psycopg")
        psycopg_log.warning("error ignored terminating %r: the connection is lost", "<psycopg.Pipeline [BAD] at 0x1>")
        psycopg_log.warning("some other thing psycopg has to say")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Pipeline [BAD]" not in err and "some other thing psycopg has to say" in err
