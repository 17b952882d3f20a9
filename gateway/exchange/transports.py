"""Transports: how the outbox and peer queries reach other member gateways.

``HTTPTransport`` (requests, TLS verification on) in production and
``MockTransport`` (a function answers) in tests, like httpx's MockTransport.
Network failures come back as retryable results, never as exceptions.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import requests

from gateway.exchange.outbox import SendResult

__all__ = ["HTTPTransport", "MockTransport", "classify"]

log = logging.getLogger(__name__)

_RETRYABLE = {408, 425, 429, 500, 502, 503, 504}


def classify(status: int, body: bytes = b"") -> SendResult:
    """2xx delivered; 408/425/429/5xx retryable; any other 4xx permanent."""
    if 200 <= status < 300:
        return SendResult(True, status=status, body=body)
    retryable = status in _RETRYABLE or status >= 500
    return SendResult(False, retryable=retryable, status=status, body=body, error=f"HTTP {status}")


class HTTPTransport:
    """POSTs FHIR JSON over HTTP(S)."""

    def __init__(self, *, timeout: float = 30.0, verify: bool | str = True,
                 cert: tuple[str, str] | None = None) -> None:
        self.session = requests.Session()
        self.timeout = timeout
        self.verify = verify
        self.cert = cert  # client certificate and key, for mutual TLS where deployed

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> SendResult:
        try:
            resp = self.session.post(url, data=payload, timeout=self.timeout, verify=self.verify, cert=self.cert,
                                     headers={"Content-Type": "application/fhir+json", **headers})
        except requests.Timeout:
            return SendResult(False, retryable=True, error="timed out")
        except requests.RequestException as exc:
            return SendResult(False, retryable=True, error=f"cannot reach the receiver: {type(exc).__name__}")
        return classify(resp.status_code, resp.content)

    def get(self, url: str, headers: dict[str, str]) -> SendResult:
        """GET (调阅 queries); network problems come back as retryable results."""
        try:
            resp = self.session.get(url, timeout=self.timeout, verify=self.verify, cert=self.cert,
                                    headers={"Accept": "application/fhir+json", **headers})
        except requests.Timeout:
            return SendResult(False, retryable=True, error="timed out")
        except requests.RequestException as exc:
            return SendResult(False, retryable=True, error=f"cannot reach the peer: {type(exc).__name__}")
        return classify(resp.status_code, resp.content)


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
