"""HL7 v2 files cut into messages as they are read, for ``gateway convert``.

:func:`messages` gives exactly what :func:`gateway.adapters.hl7v2.split_messages` gives for the whole file, read a
block at a time: memory holds the messages of about one block, however large the file, and the bytes read so far
say how far the conversion is. The whole file is cut where ``split_messages`` cuts it, and each piece is given to
``split_messages`` in a form that it cuts as it would have cut that part of the whole:

- a file that holds MLLP framing bytes anywhere (0x0B, 0x1C: ``split_messages`` then reads all of it as frames) is
  cut after a frame's end (0x1C followed by 0x0B or 0x0D); each piece, a run of whole frames, is given with a frame
  start before it and a frame end after it (a 0x1C ends a frame only by what follows it, so neither changes
  which 0x1C end frames in it); the rest, at the end, with a frame start before it;
- any other file is cut at the line break before a message's ``MSH`` (as ``split_messages`` cuts messages: a BOM
  between them is dropped); a piece starts with that line break, which ``split_messages`` drops.

Whether a file holds framing bytes is found first, by a read of the whole file that keeps nothing (a stream that
cannot be read twice, standard input, is read whole, as before).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import IO

from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import split_messages

__all__ = ["BLOCK", "framed", "messages", "units"]

#: Bytes read at a time.
BLOCK = 1 << 16
_SB, _EB, _CR = b"\x0b", b"\x1c", b"\r"
#: After a frame's end (as split_messages' _FRAME_END, but for its end of the data, which is the whole file's).
_FRAME_CUT = re.compile(rb"\x1c(?=[\x0b\x0d])")
#: The line break before a message (split_messages' _MSG_START, on bytes whose line breaks are not made CR yet).
_MESSAGE_CUT = re.compile(rb"[\r\n](?=(?:\xef\xbb\xbf)?MSH[^\r\n]{4})")
#: How far back a cut can start in bytes read before (a match waits for the bytes its look-ahead needs).
_LOOK_BACK = 16


def framed(stream: IO[bytes]) -> bool | None:
    """Whether ``stream`` holds MLLP framing bytes anywhere; None when it cannot be read twice. The stream is put
    back where it was."""
    try:
        if not stream.seekable():
            return None
        start = stream.tell()
    except (OSError, ValueError):
        return None
    found = False
    while not found:
        block = stream.read(BLOCK)
        if not block:
            break
        found = _SB in block or _EB in block
    stream.seek(start)
    return found


def messages(stream: IO[bytes], is_framed: bool | None, *, block: int = BLOCK) -> Iterator[bytes]:
    """The messages of ``stream``, as :func:`split_messages` gives those of all of it, read ``block`` bytes at a
    time. ``is_framed``: :func:`framed` of the stream (None: it is read whole)."""
    if is_framed is None:
        yield from split_messages(stream.read())
        return
    cut = _FRAME_CUT if is_framed else _MESSAGE_CUT
    buf = bytearray()
    while True:
        data = stream.read(block)
        if not data:
            break
        searched = max(0, len(buf) - _LOOK_BACK)  # (a cut before this was found, or waited for more bytes)
        buf += data
        last = None
        for last in cut.finditer(buf, searched):
            pass
        if last is None or last.start() == 0:
            continue
        at = last.start()
        if is_framed:
            yield from split_messages(_SB + bytes(buf[:at]) + _EB + _CR)
            del buf[:at + 1]  # (the 0x1C that ended the frame)
        else:
            yield from split_messages(bytes(buf[:at]))
            del buf[:at]  # (the line break stays: the next piece starts with it)
    yield from split_messages(_SB + bytes(buf) if is_framed else bytes(buf))


def units(stream: IO[bytes], origin: str = "") -> Iterator[RawUnit]:
    """The messages of ``stream`` as units numbered from 1, as ``HL7v2Adapter.split`` numbers those of bytes (an
    adapter's ``split_stream``)."""
    for n, message in enumerate(messages(stream, framed(stream)), start=1):
        yield RawUnit(message, n, origin)
