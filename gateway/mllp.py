"""MLLP listener: HL7 v2 over TCP from LIS, HIS and analysers.

Framing is MLLP's (``0x0B message 0x1C 0x0D``), read as python-hl7's
reader does, with two allowances for senders that leave out the final CR: a
frame also ends at ``0x1C`` followed at once by the next frame's ``0x0B``, and
at a ``0x1C`` after which nothing arrives for a second (or the connection
ends). A ``0x1C`` followed by anything else is a byte of the message, which is
then refused naming the field that holds it (as HTTP ingest does). Each
message goes through the same pipeline as HTTP ingest; the ACK is written
only after the raw message and its outcome are committed to SQLite, so an
ACK always means "durably received". With ``mllp_ack = received`` (accept,
then process) the ACK goes out as soon as the raw message is committed, and a
:class:`QueueReader` works it afterwards (``Pipeline.receive_batch``); a
burst from a LIS then waits in the database, not in the senders' sockets.
Messages waiting from all connections
are taken together as one batch (two commits for the batch, not two per
message) by a single worker thread (SQLite has one writer anyway), so the
event loop keeps accepting and reading connections meanwhile. A message larger than
``max_message_bytes`` is refused with an AR and the connection closed,
because the rest of the oversized frame cannot be told apart from the next.

A connection idle between messages for ``mllp_idle_timeout`` seconds is
closed, and so is one whose message is not complete ``mllp_read_timeout``
seconds after its first byte arrived (nothing of it is stored): a sender that
trickles bytes holds no worker and never delays other connections' ACKs. One
message that fails in any way is answered alone; if a whole batch fails, its
messages are worked again one by one, so every other sender still gets its ACK.
"""
from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import logging
import re
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any, cast

from hl7.mllp.exceptions import InvalidBlockError
from hl7.mllp.streams import CARRIAGE_RETURN, END_BLOCK, START_BLOCK, MLLPStreamReader

from gateway import metrics
from gateway.adapters.base import RawUnit, SourceMessage
from gateway.errors import Issue
from gateway.logs import database_fault
from gateway.pipeline import Pipeline
from gateway.signals import ignore_later_signals
from gateway.store import db as _db

__all__ = ["MLLPServer", "QueueReader"]

log = logging.getLogger(__name__)


def frame(data: bytes) -> bytes:
    """Wrap bytes in an MLLP block."""
    return bytes(START_BLOCK + data + END_BLOCK + CARRIAGE_RETURN)


class _NoStart(InvalidBlockError):  # type: ignore[misc]  # python-hl7 has no type information
    """A message framed without its 0x0B; ``head`` is its start (to read MSH-10 from for the answer)."""

    def __init__(self, head: bytes) -> None:
        super().__init__("Block does not begin with Start Block character <VT>")
        self.head = head


class _Oversized(Exception):
    """A frame larger than the limit; ``head`` is its start (to read MSH-10 from for the answer)."""

    def __init__(self, head: bytes) -> None:
        super().__init__("MLLP frame larger than the limit")
        self.head = head


_HEAD_BYTES = 4096  # what is kept of an oversized frame to answer it (its MSH segment)
_BETWEEN_FRAMES = b"\r\n \t"  # bytes dropped between frames (see wait_message)
_MAX_BETWEEN_FRAMES = 4096  # ... at most so many between two frames
_BOM = codecs.BOM_UTF8
#: How a message begins; a 0x0B before one of them inside a frame starts the frame afresh (see readframe).
_MESSAGE_STARTS = (b"MSH", b"FHS", b"BHS")
_RESTART = re.compile(rb"\x0b(?=MSH|FHS|BHS)")


class _Reader(MLLPStreamReader):  # type: ignore[misc]  # python-hl7 has no type information
    """python-hl7's MLLP reader that can also wait for a message to begin without reading it."""

    #: Seconds a 0x1C may wait for its 0x0D before the frame is taken as ended.
    end_pause = 1.0
    #: Bytes before the start of the last frame read that were no frame (see :meth:`readframe`); the caller
    #: says so and sets it back to 0.
    dropped = 0

    async def wait_message(self) -> None:
        """Return once a byte of the next message (or the end of the stream) has arrived.

        What some senders write between frames — a line feed or carriage return after the ``0x1C 0x0D``, a 0x0D
        that came after the frame was taken as ended, spaces, a UTF-8 byte order mark before the ``0x0B`` — is
        dropped: it is no message, and left in place it would be read as the start of one that never ends.
        """
        dropped = 0
        while True:
            buf = self._buffer
            while buf:
                blank = len(buf) - len(buf.lstrip(_BETWEEN_FRAMES))
                if blank:
                    del buf[:blank]
                    dropped += blank
                elif buf[:3] == _BOM:
                    del buf[:3]
                    dropped += 3
                elif _BOM.startswith(bytes(buf[:3])):
                    break  # (the rest of a byte order mark may still come)
                else:
                    return
            if self._eof or dropped > _MAX_BETWEEN_FRAMES:
                return  # (past the limit: what follows is read as a frame, and answered as one)
            self._maybe_resume_transport()
            await self._wait_for_data("wait_message")  # what StreamReader's own reads wait with

    async def readframe(self, limit: int) -> bytes | None:
        """The next frame without its framing bytes.

        A frame ends at ``0x1C 0x0D``, at ``0x1C`` followed by the next frame's
        ``0x0B`` (which is left for the next read), and at a ``0x1C`` that nothing
        follows for :attr:`end_pause` seconds or before the connection ends.

        :raises InvalidBlockError: the frame does not start with ``0x0B`` (it is consumed).
        :raises _Oversized: the frame is longer than ``limit`` bytes (what arrived of it is dropped).
        :raises asyncio.IncompleteReadError: the connection ended in the middle of a frame.
        """
        buf = self._buffer
        start = 0  # where the search for 0x1C goes on
        while True:
            end = buf.find(END_BLOCK, start)
            while end >= 0 and end + 1 < len(buf) and buf[end + 1] not in (0x0B, 0x0D):
                end = buf.find(END_BLOCK, end + 1)  # a 0x1C inside the message: a byte of it
            if end >= 0 and end + 1 < len(buf):
                block = bytes(buf[:end])
                del buf[:end + 2 if buf[end + 1] == 0x0D else end + 1]
                break
            if end >= 0:  # 0x1C last: the frame ends unless its 0x0D (or more of the message) comes soon
                if not self._eof:
                    try:
                        await asyncio.wait_for(self._wait_for_data("readframe"), self.end_pause)
                    except asyncio.TimeoutError:
                        pass
                    if len(buf) > end + 1:
                        start = end
                        continue
                block = bytes(buf[:end])
                del buf[:end + 1]
                break
            if len(buf) > limit + 1:
                head = bytes(buf[:_HEAD_BYTES])
                buf.clear()
                self._maybe_resume_transport()
                raise _Oversized(head)
            if self._eof:
                partial = bytes(buf)
                buf.clear()
                raise asyncio.IncompleteReadError(partial, None)
            start = len(buf)
            await self._wait_for_data("readframe")
        self._maybe_resume_transport()
        if len(block) > limit + 1:  # the end came in the same read as the bytes past the limit
            raise _Oversized(block[:_HEAD_BYTES])
        # A 0x0B followed by the start of a message (MSH, or a batch's FHS/BHS) past the frame's first byte begins
        # a frame afresh. What came before it is no message — a frame its sender left unfinished and started over,
        # or bytes that are not MLLP (an HTTP request, a port scan) — and is dropped, nothing of it stored, as a
        # frame never finished is; the frame that follows is read and answered as it would be alone. (A 0x0B
        # followed by anything else is a byte of the message: refused with the field that holds it named.)
        restart = -1
        for found in _RESTART.finditer(block, 1):
            restart = found.start()
        if restart > 0:
            self.dropped += restart
            block = block[restart:]
        elif block[:1] != START_BLOCK and not block.lstrip().startswith(_MESSAGE_STARTS):
            # no message at all, only what is not MLLP up to a 0x1C: dropped too, and not answered (an answer
            # with no MSH-10 to echo would be taken by the sender for its next message's)
            self.dropped += len(block) + 1
            return None
        if block[:1] != START_BLOCK:
            raise _NoStart(block.lstrip()[:_HEAD_BYTES])
        if not block[1:].replace(_BOM, b"").strip(b"\r\n\t "):  # an empty frame (some senders keep a connection
            # alive so; a byte-order mark alone is nothing more): no message, so no answer either (one with no
            # MSH-10 would be taken for the next message's)
            return None
        return block[1:]


class MLLPServer:
    """An asyncio MLLP server feeding a :class:`~gateway.pipeline.Pipeline`."""

    def __init__(self, pipeline: Pipeline, host: str, port: int, *, max_message_bytes: int | None = None,
                 sock: socket.socket | None = None, ack: str | None = None, idle_timeout: float | None = None,
                 read_timeout: float | None = None) -> None:
        """``sock``: a listening socket to accept on (shared by several listener processes) instead of binding.
        ``ack``: ``processed`` or ``received`` (default: the pipeline's ``mllp_ack`` setting).
        ``idle_timeout``, ``read_timeout``: seconds (default: ``mllp_idle_timeout``, ``mllp_read_timeout``)."""
        self.pipeline = pipeline
        self.on_receipt = (ack or pipeline.settings.mllp_ack) == "received"
        self.idle_timeout = float(idle_timeout or pipeline.settings.mllp_idle_timeout)
        self.read_timeout = float(read_timeout or pipeline.settings.mllp_read_timeout)
        self.host = host
        self.port = port
        self.sock = sock
        self.max_bytes = max_message_bytes or pipeline.settings.max_message_bytes
        # One worker: SQLite has a single writer, and one connection per thread.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllp-worker")
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.max_batch = 32
        self._writers: set[asyncio.StreamWriter] = set()
        self.queue: asyncio.Queue[tuple[bytes, str, asyncio.Future[bytes]]]
        self._batch_task: asyncio.Task[None] | None = None

    def _process_batch(self, items: list[tuple[bytes, str]]) -> list[bytes]:
        channel = self.pipeline.channel("hl7v2")
        units = [RawUnit(block, 1, f"mllp:{peer}") for block, peer in items]
        work = self.pipeline.receive_batch if self.on_receipt else self.pipeline.ingest_batch
        return [o.answer for o in work(channel, units, channel="mllp")]

    async def _batcher(self) -> None:
        """Take every message waiting from all connections, process them as one batch, answer each.

        Two commits per batch instead of two per message; an ACK still goes out
        only after its message and outcome are committed.
        """
        loop = asyncio.get_running_loop()
        queue = self.queue
        while True:
            first = await queue.get()
            batch = [first]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            items = [(block, peer) for block, peer, _ in batch]
            answers: list[bytes | BaseException]
            try:
                answers = list(await loop.run_in_executor(self.executor, self._process_batch, items))
            except Exception as exc:  # one at a time, so that only a message that cannot be stored goes unanswered
                if _db.fault_reason(exc) is None:  # (the database away: said once per message kind below)
                    log.error("mllp batch of %d messages failed (%s); each is worked alone", len(batch),
                              type(exc).__name__)
                answers = []
                for item in items:
                    try:
                        answers += await loop.run_in_executor(self.executor, self._process_batch, [item])
                    except Exception as alone:  # the database failed: no ACK, the sender resends
                        reason = _db.fault_reason(alone)
                        metrics.count_unstored("mllp", "hl7v2")
                        if reason is not None:
                            database_fault(log, "mllp", "mllp messages cannot be stored while the database is away "
                                           "(%s): no ACK sent, their senders send them again", reason)
                        else:
                            log.error("mllp message from %s could not be stored (%s); no ACK sent", item[1],
                                      type(alone).__name__)
                        answers.append(alone)
            for (_, _, fut), answer in zip(batch, answers):
                if fut.done():
                    continue
                if isinstance(answer, BaseException):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)

    def _reject(self, text: str, head: bytes = b"") -> bytes:
        """An AR for a frame that is not taken; MSA-2 echoes its MSH-10 when ``head`` shows it readable."""
        channel = self.pipeline.channel("hl7v2")
        msg = SourceMessage(format="hl7v2")
        msg.issues.append(Issue("error", "too-long", "MSH", text, "207"))
        if head.startswith(START_BLOCK):
            channel.adapter.read_first_segment(head[1:], msg)
        # answered on receipt in enhanced mode (MSH-15 set): the commit level's reject, as its other messages get CA
        return channel.answer(msg, "CR" if self.on_receipt and msg.header.get("accept_ack_type") else "AR")

    async def _client(self, reader: _Reader, writer: asyncio.StreamWriter) -> None:
        peer_info: Any = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else str(peer_info)
        loop = asyncio.get_running_loop()
        self._writers.add(writer)
        answering = False  # a message of this connection waits for its answer
        try:
            while True:
                try:
                    await asyncio.wait_for(reader.wait_message(), self.idle_timeout)
                except asyncio.TimeoutError:
                    log.info("mllp connection %s idle for %g s: closed", peer, self.idle_timeout)
                    break
                try:
                    block = await asyncio.wait_for(reader.readframe(self.max_bytes), self.read_timeout)
                except asyncio.TimeoutError:
                    log.warning("mllp connection %s did not finish a message within %g s: closed, nothing of it "
                                "stored", peer, self.read_timeout)
                    break
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        log.warning("mllp connection %s closed in the middle of a message", peer)
                    break
                except _Oversized as exc:
                    log.warning("mllp message from %s larger than %d bytes refused", peer, self.max_bytes)
                    writer.write(frame(self._reject(f"message larger than {self.max_bytes} bytes refused", exc.head)))
                    await asyncio.wait_for(writer.drain(), self.read_timeout)
                    break
                except InvalidBlockError as exc:  # a message whose sender left out the 0x0B: AR, MSA-2 its MSH-10
                    # (said in the log too: nothing of it is stored, and the AR tells the sender not to send it again)
                    log.warning("mllp connection %s: a message without the 0x0B that starts an MLLP frame refused "
                                "(AR), nothing of it stored: the sender's MLLP framing is to be fixed", peer)
                    head = START_BLOCK + exc.head if isinstance(exc, _NoStart) else b""
                    writer.write(frame(self._reject("MLLP block does not start with 0x0B", head)))
                    await asyncio.wait_for(writer.drain(), self.read_timeout)
                    continue
                finally:
                    if reader.dropped:
                        log.warning("mllp connection %s: %d byte(s) before the start of a message dropped (a "
                                    "message left unfinished and started over, or what is not MLLP)", peer,
                                    reader.dropped)
                        reader.dropped = 0
                if block is None:  # only what is not MLLP: dropped (said above), nothing to answer
                    continue
                future: asyncio.Future[bytes] = loop.create_future()
                answering = True
                await self.queue.put((block, peer, future))
                answer = await future
                answering = False
                writer.write(frame(answer))
                await asyncio.wait_for(writer.drain(), self.read_timeout)  # a sender that reads no ACK is let go
        except (ConnectionResetError, BrokenPipeError):
            log.info("mllp connection %s reset", peer)
        except asyncio.TimeoutError:
            log.warning("mllp connection %s does not read its ACKs: closed", peer)
        except Exception as exc:  # the message could not be stored: no ACK, the sender resends (its raw copy may be
            # kept); while the database is away that is said once per ten seconds above, not once per connection
            log.log(logging.DEBUG if _db.fault_reason(exc) is not None else logging.WARNING,
                    "mllp connection %s closed: a message could not be stored, no ACK sent", peer)
        except asyncio.CancelledError:  # the listener stops (a message may wait for its answer: the database
            # busy; no ACK then, the sender resends). Ended here, not cancelled: Python 3.11's stream protocol
            # would log the cancellation as an error, with a traceback, when it asks this task how it ended
            log.info("mllp connection %s closed as the listener stops%s", peer,
                     ": a message was still being answered, no ACK sent" if answering else "")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        """Start listening (on the running loop)."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.queue = asyncio.Queue()
        self._batch_task = loop.create_task(self._batcher())

        def factory() -> asyncio.StreamReaderProtocol:
            reader = _Reader(limit=self.max_bytes)
            # the protocol hands _client the reader it was made with: always a _Reader
            client = cast(Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], self._client)
            return asyncio.StreamReaderProtocol(reader, client)

        if self.sock is not None:
            self.server = await loop.create_server(factory, sock=self.sock)
        else:
            self.server = await loop.create_server(factory, self.host, self.port)
        sock = self.server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("mllp listening on %s:%d", self.host, self.port)
        self.ready.set()

    def serve_forever(self) -> None:
        """Run until interrupted or, in the main thread, until SIGTERM (then stop accepting, close connections).

        In the main thread the first SIGTERM stops the listener and the ones after it are ignored while it stops,
        as in every part of ``gateway serve`` (a Ctrl-C on a foreground gateway reaches every process of its group,
        and the supervisor's SIGTERM follows). The handler is a plain one, not the event loop's: the loop puts the
        default action back when it closes (a SIGTERM then killed the process), and closes its wakeup pipe before
        removing its handler (one landing in between printed a traceback).
        """
        installed: list[Any] = []  # (our handler, the one it replaced), once set

        async def main() -> None:
            await self.start()
            assert self.server is not None
            if threading.current_thread() is threading.main_thread():
                loop = asyncio.get_running_loop()

                def stop_once(signum: int, frame: Any) -> None:
                    ignore_later_signals(signal.SIGTERM)  # first: the later ones are ignored from here on
                    loop.call_soon_threadsafe(self._shutdown)

                installed.extend((stop_once, signal.signal(signal.SIGTERM, stop_once)))
            try:
                async with self.server:
                    await self.server.serve_forever()
            except asyncio.CancelledError:  # stop() closed the server
                pass
            for _ in range(100):  # connections end on their own once closed; an ACK being worked on is not sent
                if not self._writers:
                    break
                await asyncio.sleep(0.01)

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            pass
        finally:
            if installed and signal.getsignal(signal.SIGTERM) is installed[0]:  # stopped otherwise: as it was
                signal.signal(signal.SIGTERM, installed[1])
            self.executor.shutdown(wait=True)

    def _shutdown(self) -> None:
        """Stop accepting and close every connection (on the loop): their tasks end without being cancelled."""
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.close()

    def start_in_thread(self) -> threading.Thread:
        """Serve from a daemon thread (demo and tests); returns once listening."""
        thread = threading.Thread(target=self.serve_forever, name="mllp-listener", daemon=True)
        thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("MLLP listener did not start")
        return thread

    def stop(self) -> None:
        """Stop a server started with :meth:`start_in_thread`."""
        if self.loop is not None and self.server is not None:
            self.loop.call_soon_threadsafe(self._shutdown)


class QueueReader:
    """Works the messages an MLLP listener answered on receipt, oldest first (``Pipeline.process_queued``).

    ``gateway serve`` runs each in a process of its own, so that its work
    never holds up a listener's ACK: ``queue_readers`` of them, reader k of n
    (``reader``, (k - 1, n)). One reader works the messages one after the
    other, in arrival order. Several take the next messages of any sender, a
    few at a time (:data:`IN_TURN_BATCH`), and work them side by side; each
    message is recorded in its turn, once every earlier message of its sender
    has its outcome, so a sender's messages are recorded in arrival order all
    the same (``Pipeline.process_queued``, ``in_turn``).
    :meth:`run` returns after :meth:`stop`, once the message being worked is
    recorded; a message it had not finished stays queued and is worked when a
    reader runs again.
    """

    #: Messages one of several readers takes at a time: few, so that the next ones are the other readers' to work
    #: meanwhile (each reader records its own after the earlier ones of their senders).
    IN_TURN_BATCH = 4

    def __init__(self, pipeline: Pipeline, *, idle: float = 0.05, batch: int | None = None,
                 reader: tuple[int, int] = (0, 1)) -> None:
        self.pipeline, self.idle, self.reader = pipeline, idle, reader
        self.in_turn = reader[1] > 1
        self.batch = batch if batch is not None else (self.IN_TURN_BATCH if self.in_turn else 32)
        self._stop = threading.Event()
        self.processed = 0

    def run(self) -> None:
        try:
            waiting = self.pipeline.store.queue_length()
        except Exception as exc:  # the database away as the reader starts: the loop below waits for it
            if _db.fault_reason(exc) is None:
                raise
            waiting = 0
        if waiting:
            log.info("processing queue: %d message(s) waiting%s", waiting,
                     f" (reader {self.reader[0] + 1} of {self.reader[1]})" if self.in_turn else "")
        while not self._stop.is_set():
            try:
                done = (self.pipeline.process_queued(self.batch, in_turn=True, stop=self._stop) if self.in_turn
                        else self.pipeline.process_queued(self.batch))
            except Exception as exc:  # the messages stay queued; try again shortly
                reason = _db.fault_reason(exc)
                if reason is not None:  # the database is restarting or gone: said once per ten seconds
                    database_fault(log, "queue", "processing queue: the database cannot be reached (%s); retrying "
                                   "every second", reason)
                else:
                    log.exception("processing queue: a message could not be recorded; retrying in 1 s")
                self._stop.wait(1.0)
                continue
            self.processed += len(done)
            if not done:
                self._stop.wait(self.idle)

    def stop(self) -> None:
        self._stop.set()

    def start_in_thread(self) -> threading.Thread:
        """Run from a daemon thread (demo and tests)."""
        thread = threading.Thread(target=self.run, name="mllp-queue", daemon=True)
        thread.start()
        return thread
