"""Name-based UUIDs (version 5, RFC 4122 § 4.3) as text, the way ``str(uuid.uuid5(namespace, name))`` writes them.

Every resource of a Bundle the gateway builds, and every recognition decision,
gets such an id (about 30 per report message), so they are made here without
the :class:`uuid.UUID` object the standard library builds and formats each time
(three times faster). ``tests/test_uuids.py`` holds the two equal on every id the
test inputs make and on thousands of random names; the standard library stays the
reference.
"""
from __future__ import annotations

import hashlib
import uuid

__all__ = ["uuid5"]

_VARIANT = "89ab"  # the high hex digit of clock_seq_hi once its two top bits are RFC 4122's variant (10)


def uuid5(namespace: uuid.UUID, name: str) -> str:
    """``str(uuid.uuid5(namespace, name))``: SHA-1 of the namespace's bytes and the name's UTF-8, its version
    nibble set to 5 and its variant bits to RFC 4122's."""
    h = hashlib.sha1(namespace.bytes + name.encode("utf-8"), usedforsecurity=False).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"
