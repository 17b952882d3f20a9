"""HTTP server: the gateway's API on waitress, safe against slow and large clients.

Why waitress: it reads every request — headers and body — in one event loop
(asyncore) and hands it to a worker thread only once it is complete, so a
client that trickles a byte every few seconds costs a socket in that loop, not
a thread; hundreds of them do not delay anyone else. Bodies larger than 512 KiB
are spooled to a temporary file while they arrive, and answers are buffered by
the loop, so a large upload or a slow reader holds no thread and little memory.
It is pure Python, well kept, and needs no monkey-patching (unlike gevent), so
SQLite connections and the signing code run in ordinary threads.

On top of waitress this module adds what it lacks:

- a deadline for the whole request: a client has ``http_read_timeout`` seconds
  from connecting (or, on a kept-alive connection, from the first byte of its
  next request) to send all of it, or it is answered 408 and disconnected;
- a shorter deadline for the first byte: a new connection that sends nothing
  within ``http_first_byte_timeout`` seconds is closed;
- bounded connections that never lock others out: one client address holds at
  most ``http_connections_per_client`` of a worker's connections, and a worker
  at ``http_connection_limit`` goes on accepting — a new connection closes the
  oldest idle one (of the same client first) instead of waiting behind it, so
  thousands of idle connections cannot keep ``/health`` from being answered;
- its own errors (413, 400, 431) as FHIR OperationOutcomes, like every other error;
- an access log line per request, with its time, carrying the path only (a
  query string may hold a 身份证号), the account name and the request id sent
  back in ``X-Request-Id`` (a JSON line with ``log_format = json``).

Several worker processes serve one listening socket (bound by ``gateway serve``):
each runs :func:`serve_http` with its own event loop and threads.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask

from gateway.config import Settings

__all__ = ["build_server", "serve_http", "access_log"]

log = logging.getLogger(__name__)
access = logging.getLogger("gateway.access")

_ISSUE_CODES = {400: "invalid", 408: "timeout", 413: "too-long", 431: "too-long", 503: "transient"}


def _outcome(code: int, text: str) -> bytes:
    """A one-issue OperationOutcome (no patient data: the texts are the server's own)."""
    issue = {"severity": "error", "code": _ISSUE_CODES.get(code, "exception"), "diagnostics": text}
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode("utf-8")


class _ErrorTask(ErrorTask):  # type: ignore[misc]
    """A request the server itself refuses (too large, malformed) is answered with an OperationOutcome."""

    def execute(self) -> None:
        error = self.request.error
        body = _outcome(error.code, f"{error.reason}: {error.body}")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/fhir+json; charset=utf-8"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):  # type: ignore[misc]
    """One client connection; it remembers when the request being read began."""

    error_task_class = _ErrorTask

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_started: float | None = self.creation_time  # the first request is due from connecting
        self.silent = True  # nothing received yet on this connection
        self.client = self.addr[0] if isinstance(self.addr, tuple) and self.addr else str(self.addr)
        self.counted = False

    def idle(self) -> bool:
        """Whether closing this connection loses nothing: no request arriving, being answered or flushing."""
        return (not self.requests and self.request is None and not self.total_outbufs_len
                and not self.will_close and not self.close_when_flushed)

    def del_channel(self, map: Any = None) -> None:
        if self.counted:
            self.counted = False
            self.server.forget(self)
        super().del_channel(map)

    def received(self, data: bytes) -> bool:
        if data:
            self.silent = False
        if self.request_started is None and data:
            self.request_started = time.time()
        before = self.request
        result: bool = super().received(data)
        if self.request is None:
            self.request_started = None  # everything received so far forms complete requests
        elif before is not None and self.request is not before:
            self.request_started = time.time()  # one request completed and the next one began
        return result

    def arriving(self) -> bool:
        """Whether a request is still arriving (not yet being answered): closing it loses only that request."""
        return (self.request is not None and not self.requests and not self.will_close
                and not self.close_when_flushed)

    def cut(self, timeout: float) -> None:
        """Answer 408 and close: the request was not received within ``timeout`` seconds."""
        self.refuse(408, "Request Timeout", f"the request was not received completely within {timeout:g} s; "
                                            "the connection is closed")

    def refuse(self, code: int, reason: str, text: str) -> None:
        """Answer ``code`` with an OperationOutcome saying ``text`` in place of the request arriving, and close."""
        body = _outcome(code, text)
        data = (b"HTTP/1.1 %d %s\r\nContent-Type: application/fhir+json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (code, reason.encode(), len(body))) + body
        with self.outbuf_lock:
            self.outbufs[-1].append(data)
            self.current_outbuf_count += len(data)
            self.total_outbufs_len += len(data)
        self.request = None
        self.request_started = None
        self.close_when_flushed = True


class _Server(TcpWSGIServer):  # type: ignore[misc]
    """waitress's TCP server with a deadline for each request and a bounded number of connections."""

    channel_class = _Channel
    read_timeout = 30.0
    first_byte_timeout = 10.0
    per_client = 100
    next_channel_cleanup: float  # waitress's (set there); declared for the type checker

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.clients: dict[str, list[_Channel]] = {}  # open connections by client address, oldest first
        super().__init__(*args, **kwargs)

    def readable(self) -> bool:
        """Always accept while listening: at the connection limit a new connection displaces an idle one."""
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return bool(self.accepting)

    def handle_accept(self) -> None:
        """Accept a connection; past the client's share or the worker's limit, close the oldest idle one."""
        before = set(self.active_channels)
        super().handle_accept()
        for fd in set(self.active_channels) - before:
            channel = self.active_channels[fd]
            if isinstance(channel, _Channel):
                self.admit(channel)

    def admit(self, channel: _Channel) -> None:
        """Count ``channel`` for its client and make room for it if the client or the worker is at its limit."""
        mine = self.clients.setdefault(channel.client, [])
        mine.append(channel)
        channel.counted = True
        if len(mine) > self.per_client and not self._displace(mine[:-1]):
            channel.handle_close()  # all the client's other connections are being answered: this one waits
            return
        if len(self.active_channels) > self.adj.connection_limit:
            others = [c for c in self.active_channels.values() if c is not channel and isinstance(c, _Channel)]
            if not self._displace(sorted(others, key=lambda c: c.last_activity)):
                channel.handle_close()

    def _displace(self, channels: list[_Channel]) -> bool:
        """Make room: close the first idle connection of ``channels`` or, when none is idle, the one whose request
        has been arriving longest (answered 503); a connection being answered is never closed. Whether one was."""
        for old in channels:
            if old.idle():
                old.handle_close()
                return True
        slow = [c for c in channels if c.arriving()]
        if slow:
            oldest = min(slow, key=lambda c: c.request_started or c.creation_time)
            oldest.refuse(503, "Service Unavailable", "too many connections are open from this client or to this "
                                                      "gateway; the connection is closed: send the request again")
            return True
        return False

    def forget(self, channel: _Channel) -> None:
        """A connection closed: it no longer counts for its client."""
        mine = self.clients.get(channel.client, [])
        if channel in mine:
            mine.remove(channel)
        if not mine:
            self.clients.pop(channel.client, None)

    def maintenance(self, now: float) -> None:
        """Close what is late: a new connection silent after ``first_byte_timeout``, a request still arriving
        after ``read_timeout``, an idle connection after ``channel_timeout`` (a connection in the middle of a
        request is not idle)."""
        idle_cutoff, cutoff = now - self.adj.channel_timeout, now - self.read_timeout
        silent_cutoff = now - self.first_byte_timeout
        late = silent = 0
        for channel in list(self.active_channels.values()):
            if channel.requests or channel.will_close or channel.close_when_flushed:
                continue  # being answered, or closing already
            started = getattr(channel, "request_started", None)
            if getattr(channel, "silent", False) and channel.creation_time < silent_cutoff:
                channel.will_close = True
                silent += 1
            elif started is not None and started < cutoff:
                channel.cut(self.read_timeout)
                late += 1
            elif channel.request is None and channel.last_activity < idle_cutoff:
                channel.will_close = True
        if late:
            log.info("%d HTTP connection(s) closed: request not received within %g s", late, self.read_timeout)
        if silent:
            log.info("%d HTTP connection(s) closed: nothing sent within %g s of connecting", silent,
                     self.first_byte_timeout)


def build_server(app: Callable[..., Any], sock: socket.socket, settings: Settings) -> _Server:
    """A server for ``app`` on a listening socket, with the settings' threads, timeouts and connection limit."""
    adj = Adjustments(
        threads=settings.threads,
        connection_limit=settings.http_connection_limit,
        channel_timeout=settings.http_idle_timeout,
        cleanup_interval=1,  # deadlines are checked every second
        max_request_body_size=settings.max_request_bytes,
        asyncore_use_poll=True,  # no select() limit of 1024 descriptors
        backlog=1024,
        ident="cyhr-gateway",
        expose_tracebacks=False,
        log_socket_errors=False,
    )
    sockinfo = (sock.family, sock.type, sock.proto, sock.getsockname())
    server = _Server(app, map={}, _sock=sock, adj=adj, bind_socket=False, sockinfo=sockinfo)
    server.read_timeout = float(settings.http_read_timeout)
    server.first_byte_timeout = float(max(1, settings.http_first_byte_timeout))
    server.per_client = max(1, settings.http_connections_per_client)
    return server


def access_log(app: Callable[..., Any]) -> Callable[..., Any]:
    """Log each request as ``client "METHOD /path" status seconds user=NAME id=REQUEST-ID`` (the path only,
    never the query string); with ``log_format = json`` the same fields are a JSON line's (gateway.logs).

    The request id is chosen here, before the app runs, so that the app's own log lines and its
    ``X-Request-Id`` header carry the same one; the app names the user it authenticated in the environ.
    """
    from gateway.api.metrics import ENVIRON_ID, ENVIRON_USER
    from gateway.logs import request_id

    def logged(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        status = ["-"]
        rid = environ[ENVIRON_ID] = request_id(environ.get("HTTP_X_REQUEST_ID"))

        def recording(code: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[0] = code.split(" ", 1)[0]
            return start_response(code, headers, exc_info)

        try:
            return app(environ, recording)  # type: ignore[no-any-return]
        finally:
            seconds = time.monotonic() - started
            client = environ.get("REMOTE_ADDR", "-")
            method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
            user = environ.get(ENVIRON_USER)
            access.info('%s "%s %s" %s %.3fs user=%s id=%s', client, method, path, status[0], seconds, user or "-",
                        rid, extra={"request_id": rid, "user": user, "method": method, "route": path,
                                    "status": int(status[0]) if status[0].isdigit() else None,
                                    "latency_ms": round(seconds * 1000, 3), "client": client})

    return logged


def serve_http(app: Callable[..., Any], sock: socket.socket, settings: Settings) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT (requests being answered get a few seconds to finish)."""
    server = build_server(access_log(app), sock, settings)
    # "task queue depth" warnings: requests waiting for a thread are normal under load, not a fault
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    log.info("HTTP worker serving %s:%d with %d threads", settings.http_host, settings.http_port, settings.threads)
    server.run()
