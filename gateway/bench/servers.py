"""Bench servers: the MLLP listener and ``gateway serve`` under load, on loopback only.

Both servers run as separate processes, started exactly as production starts
them (the MLLP listener process: ``python -m gateway.serve``; the HTTP API:
``python -m gateway serve``, waitress worker processes under its supervisor), each on its own
database in the bench's working directory. Load comes from client threads in
this process over real TCP. Every run is bounded in messages and in time, and
the server processes are stopped (by their process id) whatever happens.

MLLP latency is counted from the moment a message was *due* to be sent (its
slot in the fixed-rate schedule), not from when the client managed to send it,
so a server that falls behind shows in the percentiles instead of slowing the
load down (no coordinated omission). Messages still unanswered when the drain
time is over count with the time waited so far.
"""
from __future__ import annotations

import gc
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gateway.bench.context import BenchContext, free_port
from gateway.bench.inputs import OBX_PER_MESSAGE
from gateway.bench.measure import NotAvailable, StageResult

__all__ = ["run_mllp_load", "run_http_load", "process_cpu_s"]

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int, *, children: bool = True) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and, on Linux, its live child processes."""
    total = 0.0
    pids = [pid]
    if children:
        pids += _children(pid)
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(name))
    return found


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-400:] if log_path.exists() else ""
            raise RuntimeError(f"server exited with status {proc.returncode} before listening: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout:g} s")


@contextmanager
def _server(args: list[str], env: dict[str, str], port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait for its port, and stop it (this process only) afterwards."""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            _wait_for_port(port, proc, 30.0, log_path)
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server this run started: SIGTERM (gateway serve and the MLLP listener stop gracefully on it), SIGKILL
    after 20 s, or at once when a second Ctrl-C comes while it stops (then said on: the run stops; a second SIGTERM
    is the same stop, not a faster one)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except KeyboardInterrupt:
        proc.kill()
        proc.wait(5)
        raise


@contextmanager
def _no_collector_pauses() -> Iterator[None]:
    """This process as a load generator: its own garbage collection must not be counted as the server's latency.

    Earlier stages leave hundreds of MiB of objects here; a full collection of them
    while the clients wait for answers would stop every client thread (the GIL) and
    add its pause to the measured latencies. What exists is frozen (left alone by the
    collector) and collection is off while the clients run.
    """
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


# ---------------------------------------------------------------------- MLLP


def _read_ack(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        end = buf.find(EB + CR)
        if end >= 0:
            start = buf.find(SB)
            block = bytes(buf[start + 1:end])
            del buf[:end + 2]
            return block
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK")
        buf += chunk


def run_mllp_load(ctx: BenchContext, title: str, ack: str = "processed") -> StageResult:
    """ACK latency of the MLLP listener process at ``mllp_rate`` messages/s from ``mllp_clients`` connections.

    With ``ack = received`` the listener answers on receipt; the queue reader's
    work is then measured apart: how many messages it stored while the load ran,
    and how long it took to store them all (waited for up to ``drain_cap`` s).
    """
    opts = ctx.options
    port = free_port()
    name = "mllp" if ack == "processed" else "mllp-queued"
    group = {"queue_record_group": opts.queue_record_group} if opts.queue_record_group is not None else {}
    settings = ctx.settings(name, mllp_port=port, mllp_host="127.0.0.1", log_level="INFO",
                            mllp_workers=opts.mllp_workers, mllp_ack=ack, queue_readers=opts.queue_readers,
                            **group)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    total = max(opts.mllp_clients, int(opts.mllp_rate * opts.mllp_duration))
    messages = ctx.fresh_messages(total)
    interval = 1.0 / opts.mllp_rate
    drain = 1.5 if opts.quick else 10.0
    latencies: list[float] = []
    codes: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    from gateway.serve import SETTINGS_ENV, part_command

    args, part_env = part_command(settings)  # (the settings in the environment, as gateway serve gives them)
    log_path = ctx.workdir / f"{name}-server.log"
    queue: dict[str, Any] = {}
    with _server(args, _env({SETTINGS_ENV: part_env[SETTINGS_ENV]}), port, log_path) as proc:
        cpu0 = process_cpu_s(proc.pid)
        start = time.perf_counter() + 0.2
        stop_at = start + opts.mllp_duration + drain

        def client(k: int) -> None:
            mine = range(k, total, opts.mllp_clients)
            buf = bytearray()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=drain + 5) as sock:
                    for i in mine:
                        due = start + i * interval
                        wait = due - time.perf_counter()
                        if wait > 0:
                            time.sleep(wait)
                        now = time.perf_counter()
                        if now > stop_at:
                            with lock:
                                latencies.append((now - due) * 1000)
                                codes["unanswered"] = codes.get("unanswered", 0) + 1
                            continue
                        sock.settimeout(max(0.1, stop_at - now))
                        sock.sendall(SB + messages[i] + EB + CR)
                        ack = _read_ack(sock, buf)
                        got = time.perf_counter()
                        code = _msa_code(ack)
                        with lock:
                            latencies.append((got - due) * 1000)
                            codes[code] = codes.get(code, 0) + 1
            except socket.timeout:
                pass  # the drain time is over: what is still unanswered is counted below
            except (OSError, ConnectionError) as exc:
                with lock:
                    errors.append(f"client {k}: {exc}")  # its unanswered messages are counted below

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(opts.mllp_clients)]
        with _no_collector_pauses():
            for t in threads:
                t.start()
            for t in threads:
                t.join(opts.mllp_duration + drain + 10)
        wall = time.perf_counter() - start
        if ack == "received":
            queue = _drain_queue(settings.database_locator, start, opts.mllp_duration, 15.0 if opts.quick else 120.0)
            # what was still queued when the load stopped, in seconds of the reader's work (when the bench stopped
            # waiting first: at least the time it waited)
            queue["backlog_s"] = round(max(0.0, (queue["drained_s"] if queue["drained_s"] is not None
                                                 else queue["waited_s"]) - opts.mllp_duration), 3)
        cpu = process_cpu_s(proc.pid) - cpu0
    answered = sum(v for c, v in codes.items() if c != "unanswered")
    missing = total - len(latencies)
    if missing > 0:  # clients that failed: their messages were never answered
        latencies += [(stop_at - start) * 1000] * missing
        codes["unanswered"] = codes.get("unanswered", 0) + missing
    result = StageResult(name, title, items=answered, observations=answered * OBX_PER_MESSAGE,
                         wall_s=wall, cpu_s=cpu, latencies_ms=latencies)
    # each listener process works its connections' messages; on receipt, the queue readers are more processes
    result.cores = float(opts.mllp_workers + (opts.queue_readers if ack == "received" else 0))
    result.extra = {"offered_rate": opts.mllp_rate, "clients": opts.mllp_clients, "duration_s": opts.mllp_duration,
                    "sent": total, "answers": codes, "server_cpu_s": round(cpu, 3), "ack": ack,
                    "server_cpu_ms_per_msg": round(cpu / answered * 1000, 3) if answered else None, **queue}
    note = [f"{opts.mllp_rate:g} msg/s offered by {opts.mllp_clients} clients for {opts.mllp_duration:g} s"
            f" to {opts.mllp_workers} listener process(es)"
            + ((" and a queue reader" if opts.queue_readers == 1 else f" and {opts.queue_readers} queue readers")
               + f" recording {settings.queue_record_group} per transaction" if ack == "received" else ""),
            f"answers {codes}"]
    if queue:
        if queue["drained_s"] is not None:
            done = (f"all {queue['stored']} stored {queue['drained_s']:.1f} s after the load began "
                    f"({queue['store_rate']:.1f} msg/s; backlog {queue['backlog_s']:.1f} s when it stopped)")
        else:
            done = f"{queue['stored']} stored, {queue['still_queued']} still queued when the bench stopped waiting"
        note.append(f"stored {queue['stored_during_load']} while the load ran; {done}")
    if errors:
        note.append(f"client errors: {errors[0]}")
    result.note = "; ".join(note)
    if sum(codes.get(code, 0) for code in ("AA", "CA")) != total:
        result.status = "failed" if not answered else "ok"
    return result


def _drain_queue(db_path: Path | str, start: float, duration: float, cap: float) -> dict[str, Any]:
    """Wait for the queue reader to store what the listener took (up to ``cap`` s after the load): its figures."""
    from gateway.store.db import connect
    from gateway.store.views import ReadModels

    def counts() -> tuple[int, int]:
        db = connect(db_path if isinstance(db_path, str) else Path(db_path).absolute(), readonly=True)
        try:
            rows = ReadModels(db).message_status_counts()
        finally:
            db.conn.close()
        return rows.get("queued", 0), sum(n for s, n in rows.items() if s != "queued")

    queued, stored = counts()
    during = stored
    deadline = start + duration + cap
    while queued and time.perf_counter() < deadline:
        time.sleep(0.25)
        queued, stored = counts()
    drained = time.perf_counter() - start if not queued else None
    return {"stored_during_load": during, "stored": stored, "still_queued": queued,
            "waited_s": round(time.perf_counter() - start, 2),
            "drained_s": round(drained, 2) if drained is not None else None,
            "store_rate": round(stored / drained, 1) if drained else None}


def _msa_code(ack: bytes) -> str:
    for seg in ack.split(b"\r"):
        if seg.startswith(b"MSA"):
            parts = seg.split(b"|")
            return parts[1].decode("ascii", "replace") if len(parts) > 1 else "?"
    return "?"


# ---------------------------------------------------------------------- HTTP


def run_http_load(ctx: BenchContext, title: str) -> StageResult:
    """Requests/s and latency of ``POST /ingest/hl7v2`` on ``gateway serve`` (waitress) from concurrent clients."""
    try:
        import waitress  # noqa: F401
    except ImportError:
        raise NotAvailable("waitress is not installed") from None
    opts = ctx.options
    port = free_port()
    settings = ctx.settings("http", http_port=port, mllp_port=0)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    env = _env({
        "GATEWAY_DATA_DIR": settings.data_dir, "GATEWAY_ISSUER_USCC": settings.issuer_uscc,
        "GATEWAY_ISSUER_NAME": settings.issuer_name, "GATEWAY_HTTP_HOST": "127.0.0.1",
        "GATEWAY_HTTP_PORT": str(port), "GATEWAY_MLLP_PORT": "0", "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_WORKERS": str(settings.workers), "GATEWAY_THREADS": str(settings.threads),
    })
    headers = {"Content-Type": "x-application/hl7-v2+er7"}
    token = _submitter_token(settings)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    total = opts.http_count
    messages = ctx.fresh_messages(total)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    cap = 6.0 if opts.quick else 40.0
    log_path = ctx.workdir / "http-server.log"
    with _server([sys.executable, "-m", "gateway", "serve"], env, port, log_path) as proc:
        _warm_up(port)
        cpu0 = process_cpu_s(proc.pid)
        start = time.perf_counter()
        deadline = start + cap
        counter = iter(range(total))

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                while time.perf_counter() < deadline:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    t0 = time.perf_counter()
                    conn.request("POST", "/ingest/hl7v2", body=messages[i], headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    took = (time.perf_counter() - t0) * 1000
                    with lock:
                        latencies.append(took)
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(str(exc))
            finally:
                conn.close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(opts.http_clients)]
        with _no_collector_pauses():
            for t in threads:
                t.start()
            for t in threads:
                t.join(cap + 30)
        wall = time.perf_counter() - start
        cpu = process_cpu_s(proc.pid) - cpu0
    ok = statuses.get(200, 0)
    result = StageResult("http", title, items=ok, observations=ok * OBX_PER_MESSAGE, wall_s=wall, cpu_s=cpu,
                         latencies_ms=latencies)
    # Per core: the server's CPU time is what the requests cost; the client threads run beside it.
    result.cores = max(1.0, cpu / wall) if wall > 0 else 1.0
    result.extra = {"clients": opts.http_clients, "requests": len(latencies), "statuses": statuses,
                    "workers": settings.workers, "threads": settings.threads, "server_cpu_s": round(cpu, 3),
                    "server_cores_busy": round(cpu / wall, 2) if wall > 0 else None,
                    "server_cpu_ms_per_request": round(cpu / ok * 1000, 3) if ok else None}
    note = [f"{opts.http_clients} clients, waitress {settings.workers} workers x {settings.threads} threads",
            f"statuses {statuses}"]
    if errors:
        note.append(f"client errors: {errors[0]}")
    if len(latencies) < total:
        note.append(f"time cap {cap:g} s reached after {len(latencies)} of {total} requests")
    result.note = "; ".join(note)
    if not ok:
        result.status = "failed"
    return result


def _submitter_token(settings: Any) -> str | None:
    """An API token of a ``submitter`` user (the LIS), made in the server's database before it starts.

    None when the gateway has no user accounts yet (then ingest is not authenticated either).
    """
    try:
        from gateway.audit import records
        from gateway.auth import add_user
    except ImportError:
        return None
    from gateway.bench.context import BENCH_NOW
    from gateway.store.db import connect

    db = connect(settings.database_locator)
    try:
        _, token = add_user(db, "bench-lis", ["submitter"], at=BENCH_NOW,
                            gateway=records.Party.member(settings.issuer_uscc),
                            by=records.Party.user(settings.issuer_uscc, "bench"))
    finally:
        db.conn.close()
    return str(token)


def _warm_up(port: int) -> None:
    """One request per worker, so that app start-up is not timed."""
    for _ in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            time.sleep(0.2)
        finally:
            conn.close()
