"""Logs: how every process of the gateway writes its log lines, as text or as JSON.

``log_format = "text"`` (the default) writes ``time level logger: message``.
``log_format = "json"`` writes one JSON object a line, for a log collector
(Loki, Elasticsearch, a SIEM)::

    {"timestamp": "2026-11-22T09:30:00.123+08:00", "level": "INFO", "process": "http-1", "pid": 4242,
     "logger": "gateway.access", "message": "...", "request_id": "6f1c...", "user": "auditor1",
     "method": "GET", "route": "/audit/stats", "status": 200, "latency_ms": 3.2}

``process`` is the part of ``gateway serve`` that wrote the line (``serve``
for the supervisor, ``http-1``, ``mllp-1``, ``queue``, ``background``; ``cli``
for a command). A line written while an HTTP request is answered carries that
request's id (also sent back in the ``X-Request-Id`` header) and, once known,
the account name. The route is the path only, never the query string (a
search may carry a patient identifier), and an exception is logged as its type
and where it happened, never its text (which may quote the input). The
gateway's own messages hold no patient data (see the house style), so neither
does a JSON line.
"""
from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import uuid
from types import TracebackType
from typing import Any

from gateway.errors import ConfigError

__all__ = ["FORMATS", "TEXT_FORMAT", "TextFormatter", "JsonFormatter", "configure", "check_format", "request_context",
           "current_request", "request_id", "database_fault", "DATABASE_FAULT_LOG_EVERY"]

FORMATS = ("text", "json")
#: The text format of every process (``gateway.supervise`` tests and operators' tools read it).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The HTTP request being answered in this thread: {"request_id": ..., "user": ...} (None outside a request).
request_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "gateway_request", default=None)

#: Fields an access-log line may carry (given as ``extra=``), in the order written.
_REQUEST_FIELDS = ("request_id", "user", "method", "route", "status", "latency_ms", "client")


#: A caller's own request id is kept when it is a short token like this (a load balancer's); else a new one is made.
_GOOD_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


def request_id(sent: str | None = None) -> str:
    """The id of a new HTTP request: ``sent`` (the caller's ``X-Request-Id``) when well-formed, else a new one."""
    return sent if sent and _GOOD_ID.fullmatch(sent) else uuid.uuid4().hex


def current_request() -> dict[str, Any] | None:
    """The request being answered in this thread, if any."""
    return request_context.get()


def check_format(value: str) -> str:
    """``value`` if it is a log format this gateway writes.

    :raises ConfigError: neither ``text`` nor ``json``.
    """
    if value not in FORMATS:
        raise ConfigError(f"log_format {value!r} must be 'text' or 'json'", "log_format")
    return value


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, stamped as the JSON lines, ACKs and ``gateway messages list`` are: local time with its
    UTC offset, to the millisecond (``2026-12-07T08:32:04.642+08:00``), so that a line can be set beside them."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's
        return _stamp(record)


def _stamp(record: logging.LogRecord) -> str:
    return _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp, level, process, logger, message and the request's fields."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _stamp(record),
            "level": record.levelname,
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = request_context.get()
        if context:
            line.update({k: v for k, v in context.items() if v is not None})
        for name in _REQUEST_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            # the type and where, never the text: an exception's message may quote patient data
            line["error"] = record.exc_info[0].__name__
            line["where"] = code_place(record.exc_info[2])
        return json.dumps(line, ensure_ascii=False, default=str)


def code_place(tb: TracebackType | None, depth: int = 6) -> str:
    """Where in the code an exception was raised, innermost first (``store.py:12 put < pipeline.py:40 work``): what
    a log line says of a failure instead of the exception's text, which may quote patient data."""
    frames = traceback.extract_tb(tb)[-depth:] if tb is not None else []
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames)) or "?"


def debug_wanted() -> bool:
    """Whether ``GATEWAY_DEBUG`` asks for tracebacks (any value but empty, 0, false, no or off)."""
    return os.environ.get("GATEWAY_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def configure(level: str, log_format: str, process: str) -> None:
    """Send this process's log lines to stderr in ``log_format`` (replacing any handler set before).

    :raises ConfigError: an unknown ``log_format``.
    """
    check_format(log_format)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    psycopg_log = logging.getLogger("psycopg")
    if _pipeline_end_on_a_lost_connection not in psycopg_log.filters:
        psycopg_log.addFilter(_pipeline_end_on_a_lost_connection)


def _pipeline_end_on_a_lost_connection(record: logging.LogRecord) -> bool:
    """Leave out psycopg's own WARNING when a pipeline ends on a connection the server ended ("error ignored
    terminating <psycopg.Pipeline [BAD] at 0x…>: the connection is lost"): the work it was part of has failed and
    said so in the gateway's words already."""
    return not (record.levelno == logging.WARNING and record.getMessage().startswith("error ignored terminating"))


#: While the database is away, each kind of line about it is written at most once per this many seconds, with how
#: many were left out since: a sender retrying its messages, a dashboard polling, every request would each write one,
#: and an operator's alert on the log would fire for a routine database restart.
DATABASE_FAULT_LOG_EVERY = 10.0
_faults: dict[str, tuple[float, int]] = {}  # kind -> (when last written, how many left out since)
_faults_lock = threading.Lock()


def database_fault(logger: logging.Logger, kind: str, text: str, *args: Any) -> None:
    """Log a WARNING about the database being away (``text % args``), at most once per
    :data:`DATABASE_FAULT_LOG_EVERY` seconds for each ``kind``; the next line written says how many were left out.
    ``args`` must carry no patient data (the database's own words, counts, stages, peers' addresses)."""
    now = time.monotonic()
    with _faults_lock:
        last, left_out = _faults.get(kind, (-1e18, 0))
        if now - last < DATABASE_FAULT_LOG_EVERY:
            _faults[kind] = (last, left_out + 1)
            return
        _faults[kind] = (now, 0)
    if left_out:
        text += f" (and {left_out} more since the last such line)"
    logger.warning(text, *args)
