"""Transports: how the outbox and peer queries reach other member gateways.

``HTTPTransport`` (requests, TLS verification on) in production and
``MockTransport`` (a function answers) in tests, like httpx's MockTransport.
Network failures come back as retryable results, never as exceptions.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from gateway.errors import GatewayError
from gateway.exchange.outbox import SendResult
from gateway.identifiers import check_uscc

__all__ = ["HTTPTransport", "MockTransport", "classify"]

log = logging.getLogger(__name__)

_RETRYABLE = {408, 425, 429, 500, 502, 503, 504}


def classify(status: int, body: bytes = b"") -> SendResult:
    """2xx delivered; 408/425/429/5xx retryable; any other 4xx permanent, but a 401 whose OperationOutcome names
    ``Authorization``: the receiver did not take this call's signed assertion (a clock difference, an address it
    does not answer to, a certificate its registry snapshot does not list yet), which its operators or ours can
    set right, so it is tried again with the back-off until then (a Bundle's own bad signature stays permanent).
    The error names the receiver's reason when it answered an OperationOutcome (a revoked certificate and a clock
    difference read alike otherwise)."""
    if 200 <= status < 300:
        return SendResult(True, status=status, body=body)
    first = _first_issue(body)
    retryable = (status in _RETRYABLE or status >= 500
                 or (status == 401 and first.get("expression") == ["Authorization"]))
    reason = receiver_reason(body, first)
    return SendResult(False, retryable=retryable, status=status, body=body,
                      error=f"HTTP {status}: {reason}" if reason else f"HTTP {status}")


_LONG_NUMBER = re.compile(r"[0-9]{6,}[0-9Xx]*")  # (an identity card number, a record number: not kept)
_USCC_LIKE = re.compile(r"[0-9A-HJ-NP-RT-UW-Y]{18}")


def _first_issue(body: bytes) -> dict[str, Any]:
    """The first issue of an OperationOutcome answer; {} when the answer is not one."""
    try:
        outcome = json.loads(body[:65536].decode("utf-8")) if body.lstrip()[:1] == b"{" else None
    except (UnicodeDecodeError, ValueError, RecursionError):  # (a hostile answer nested too deep)
        return {}
    issues = outcome.get("issue") if isinstance(outcome, dict) else None
    return issues[0] if isinstance(issues, list) and issues and isinstance(issues[0], dict) else {}


def receiver_reason(body: bytes, first: dict[str, Any] | None = None) -> str:
    """The first diagnostics of an OperationOutcome answer, on one line, at most 300 characters, long digit runs
    masked (it is kept in the outbox and logged); "" when the answer is not one. ``first``: its first issue, when
    the caller read it already."""
    if first is None:
        first = _first_issue(body)
    text = first.get("diagnostics")
    if not isinstance(text, str):
        return ""
    text = _LONG_NUMBER.sub(_masked, " ".join("".join(c if c.isprintable() else " " for c in text).split()))
    return text if len(text) <= 300 else text[:299] + "…"


def _masked(found: re.Match[str]) -> str:
    """A long digit run masked, unless it is part of a member's 统一社会信用代码 (a letter among its first 17
    characters, its check character right: no identity card number is such), which names no patient."""
    text, start, end = found.string, found.start(), found.end()
    for at in range(max(0, start - 17), min(start, len(text) - 17) + 1):
        token = text[at:at + 18]
        if at + 18 >= end and _USCC_LIKE.fullmatch(token) and any(c.isalpha() for c in token[:17]) and \
                (at == 0 or not text[at - 1].isalnum()) and (at + 18 == len(text) or not text[at + 18].isalnum()):
            try:
                check_uscc(token)
            except GatewayError:
                continue
            return found.group(0)
    return "…"


class _Unanswered(Exception):
    """Internal: the answer took longer than the timeout, or grew beyond what is read."""


class HTTPTransport:
    """POSTs FHIR JSON over HTTP(S).

    ``timeout`` bounds the connection, each wait for data and the whole answer
    (a receiver that trickles its answer is cut off like one that never
    answers). An answer larger than ``max_answer_bytes`` (``max_query_bytes``
    for 调阅 queries) is not read. Safe to use from several threads: each has
    its own connection pool.
    """

    def __init__(self, *, timeout: float = 30.0, verify: bool | str = True,
                 cert: tuple[str, str] | None = None, max_answer_bytes: int = 1 << 20,
                 max_query_bytes: int = 256 << 20) -> None:
        self._local = threading.local()
        self.timeout = timeout
        self.verify = verify
        self.cert = cert  # client certificate and key, for mutual TLS where deployed
        self.max_answer_bytes = max_answer_bytes
        self.max_query_bytes = max_query_bytes

    @property
    def session(self) -> requests.Session:
        """This thread's session."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _read(self, resp: requests.Response, deadline: float, limit: int) -> bytes:
        """The answer's body, read as it arrives (``read1``), so that a trickle is cut off at the deadline."""
        body = bytearray()
        while True:
            chunk = resp.raw.read1(65536, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise _Unanswered(f"the answer is larger than {limit} bytes")
            if time.monotonic() > deadline:
                raise _Unanswered("timed out")

    def _call(self, method: str, url: str, headers: dict[str, str], payload: bytes | None, limit: int,
              unreachable: str) -> SendResult:
        deadline = time.monotonic() + self.timeout
        try:
            with self.session.request(method, url, data=payload, timeout=self.timeout, verify=self.verify,
                                      cert=self.cert, headers=headers, stream=True) as resp:
                body = self._read(resp, deadline, limit)
                status = resp.status_code
        except requests.Timeout:
            return SendResult(False, retryable=True, error="timed out")
        except _Unanswered as exc:
            return SendResult(False, retryable=True, error=str(exc))
        except requests.RequestException as exc:
            return SendResult(False, retryable=True, error=f"{unreachable}: {type(exc).__name__}")
        return classify(status, body)

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        return self._call("POST", url, {"Content-Type": "application/fhir+json", **headers}, payload,
                          self.max_answer_bytes, "cannot reach the receiver")

    def get(self, url: str, headers: dict[str, str]) -> SendResult:
        """GET (调阅 queries); network problems come back as retryable results."""
        return self._call("GET", url, {"Accept": "application/fhir+json", **headers}, None, self.max_query_bytes,
                          "cannot reach the peer")


class MockTransport:
    """Answers with a function ``handler(url, payload, headers) -> SendResult``; records every call."""

    def __init__(self, handler: Callable[[str, bytes, dict[str, str]], SendResult],
                 get_handler: Callable[[str, dict[str, str]], SendResult] | None = None) -> None:
        self.handler = handler
        self.get_handler = get_handler
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        self.calls.append((url, payload, headers))
        return self.handler(url, payload, headers)

    def get(self, url: str, headers: dict[str, str]) -> SendResult:
        self.calls.append((url, b"", headers))
        if self.get_handler is None:
            return SendResult(False, retryable=False, status=405, error="GET not handled")
        return self.get_handler(url, headers)
