"""Idle HTTP connections cannot lock other clients out: a connection that sends nothing is closed after
http_first_byte_timeout, one client address holds at most http_connections_per_client connections (its oldest idle
one is closed for a new one), and a worker at http_connection_limit closes its oldest idle connection for a new
client instead of no longer accepting."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.config import Settings
from gateway.httpserver import build_server


RELEASE = threading.Event()


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    if environ["PATH_INFO"] == "/slow":
        RELEASE.wait(10)  # a request being answered
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "15")])
    return [b'{"status":"ok"}']


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[int, Any]]]:
    servers: list[Any] = []

    def start(**changes: Any) -> tuple[int, Any]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # reached from 127.0.0.1 and 127.0.0.2: two clients on loopback
        sock.listen(1024)
        settings = Settings(issuer_uscc="12511921MB0001003C", threads=2, **changes)
        server = build_server(_app, sock, settings)
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        return sock.getsockname()[1], server

    yield start
    for server in servers:
        server.accepting = False
        for channel in list(server.active_channels.values()):
            channel.will_close = True
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)


def _get(port: int, source: str = "127.0.0.2", timeout: float = 5.0) -> tuple[float, bytes]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return time.monotonic() - started, data


def _idle(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    conns = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        conns.append(conn)
    return conns


def _closed(conn: socket.socket, wait: float) -> bool:
    """Whether the server closed ``conn`` within ``wait`` seconds."""
    conn.settimeout(wait)
    try:
        return conn.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_idle_connections_past_the_limit_do_not_stop_another_client(serve: Any) -> None:
    port, server = serve(http_connection_limit=50)
    conns = _idle(port, 300)
    try:
        seconds, answer = _get(port)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert seconds < 1.0, seconds
        seconds, answer = _get(port, source="127.0.0.1")  # the same client gets in too, displacing its oldest
        assert answer.startswith(b"HTTP/1.1 200") and seconds < 1.0
        time.sleep(0.3)
        assert len(server.active_channels) <= 50
        assert _closed(conns[0], 1.0)  # the oldest idle connections were the ones closed
        assert not _closed(conns[-1], 0.2)
    finally:
        for conn in conns:
            conn.close()


def test_one_client_holds_at_most_its_share(serve: Any) -> None:
    port, server = serve(http_connections_per_client=20)
    conns = _idle(port, 100)
    try:
        time.sleep(0.3)
        assert len(server.clients["127.0.0.1"]) == 20
        assert sum(_closed(conn, 0.05) for conn in conns[:80]) == 80
        assert not any(_closed(conn, 0.05) for conn in conns[80:])
        seconds, answer = _get(port)
        assert answer.startswith(b"HTTP/1.1 200") and seconds < 1.0
    finally:
        for conn in conns:
            conn.close()


def test_a_request_still_arriving_gives_way_but_one_being_answered_never_does(serve: Any) -> None:
    port, server = serve(http_connections_per_client=2)
    RELEASE.clear()
    answered, arriving = _idle(port, 2)
    try:
        answered.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        arriving.sendall(b"GET /health HTTP/1.1\r\n")  # the rest never comes
        time.sleep(0.2)
        seconds, answer = _get(port, source="127.0.0.1")  # a third connection: the one still arriving gives way
        assert answer.startswith(b"HTTP/1.1 200") and seconds < 1.0
        arriving.settimeout(2)
        refused = arriving.recv(65536)
        assert refused.startswith(b"HTTP/1.1 503") and b"too many connections" in refused
        late = _idle(port, 2)  # the second displaces the first (idle), never the one being answered
        assert _closed(late[0], 1.0) and not _closed(late[1], 0.2)
        RELEASE.set()
        answered.settimeout(5)
        assert answered.recv(65536).startswith(b"HTTP/1.1 200"), "the request being answered was never cut"
        for conn in late:
            conn.close()
    finally:
        RELEASE.set()
        answered.close()
        arriving.close()


def test_a_silent_connection_is_closed_after_the_first_byte_timeout(serve: Any) -> None:
    port, _ = serve(http_first_byte_timeout=1, http_read_timeout=30)
    silent, talking = _idle(port, 2)
    try:
        talking.sendall(b"GET /health HTTP/1.1\r\n")  # started in time: it has http_read_timeout to finish
        started = time.monotonic()
        assert _closed(silent, 4.0)
        assert 0.9 < time.monotonic() - started < 3.5
        assert not _closed(talking, 0.5)
        talking.sendall(b"Host: x\r\n\r\n")
        assert talking.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        silent.close()
        talking.close()
