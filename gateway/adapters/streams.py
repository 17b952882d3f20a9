"""Streams the adapters and the HTTP intake read units from."""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, Any

__all__ = ["Rejoined"]


class Rejoined(io.RawIOBase):
    """The bytes already read from a stream (to look at its start), followed by the rest of it; each piece passed
    through ``translate`` when one is given (a CSV whose lines end with CR alone is read with each CR as LF)."""

    def __init__(self, head: bytes, rest: IO[bytes], translate: Callable[[bytes], bytes] | None = None) -> None:
        super().__init__()
        self.head, self.rest, self.translate = head, rest, translate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            data, self.head = self.head[:len(buffer)], self.head[len(buffer):]
        else:
            data = self.rest.read(len(buffer)) or b""
        if self.translate is not None:
            data = self.translate(data)
        buffer[:len(data)] = data
        return len(data)
