"""JSON: reading and writing FHIR JSON without losing decimal precision.

FHIR decimals carry their precision (``5.60`` is not ``5.6``: two significant
decimals were measured). The standard library turns decimals into floats, so
the gateway reads numbers with a fractional part as :class:`decimal.Decimal`
and writes them back exactly as they were.

Reading uses simplejson (``use_decimal``). Writing uses msgspec's encoder,
which writes a :class:`~decimal.Decimal` as the number it holds (``4.50``) and
is about ten times faster than simplejson on a report Bundle: every stored
resource and every signed Bundle goes through :func:`dumps`. Its text is the
same as simplejson's except for floats with an exponent (msgspec writes
``1e16``, simplejson ``1e+16``: the same number); ``tests/test_fastpath_json.py``
compares the two. A string msgspec cannot encode (an unpaired surrogate, which
UTF-8 cannot hold) is written by simplejson as before.
"""
from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import msgspec
import simplejson

__all__ = ["dumps", "dumps_bytes", "encode", "loads", "dumps_pretty", "parse_int", "nesting_depth", "MAX_DEPTH",
           "OBJECT"]

#: How deep JSON received from outside may nest: FHIR resources need a few dozen levels at most, and deeper
#: documents would exhaust the stack of whatever walks them.
MAX_DEPTH = 100
#: ``isinstance(x, OBJECT)``: whether ``x`` is a JSON object as read (a dict, answered at once) or any other Mapping
#: (as ``isinstance(x, Mapping)`` answers it, through the ABC's slower check).
OBJECT = (dict, Mapping)
#: Integers with more digits than this are read as Decimal: Python refuses to convert longer digit strings to int.
_INT_DIGITS = 4000

_encode = msgspec.json.Encoder(decimal_format="number").encode


def dumps(obj: Any) -> str:
    """Compact JSON text, UTF-8 characters kept as they are (no ``\\uXXXX``)."""
    try:
        return _encode(obj).decode("utf-8")
    except (UnicodeEncodeError, TypeError):
        # what msgspec cannot write (a lone surrogate, an unusual type) simplejson writes or refuses as before
        return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")))


def dumps_bytes(obj: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes, without decoding msgspec's bytes to text and back."""
    try:
        return _encode(obj)
    except (UnicodeEncodeError, TypeError):
        return dumps(obj).encode("utf-8")


def encode(obj: Any) -> bytes:
    """msgspec's compact UTF-8 text of ``obj``, which is :func:`dumps_bytes` when it does not raise.

    :raises UnicodeEncodeError: a string UTF-8 cannot hold (an unpaired surrogate).
    :raises TypeError: a value msgspec does not write.
    """
    return _encode(obj)


def dumps_pretty(obj: Any) -> str:
    """Indented JSON text for people and golden files."""
    return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, indent=2))


def loads(text: str | bytes) -> Any:
    """Parse JSON, keeping decimals as :class:`~decimal.Decimal`.

    :raises ValueError: the text is not JSON, or is nested too deeply to read.
    """
    try:
        return simplejson.loads(text, use_decimal=True, parse_int=parse_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ArithmeticError:  # decimal.InvalidOperation: 1E+99999999999999999999
        raise ValueError("a number's exponent is too large for a decimal") from None


def parse_int(text: str) -> int | Decimal:
    """A JSON integer: an int, or a :class:`~decimal.Decimal` when it has too many digits for one."""
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep ``value`` nests (a scalar is 0), counted without recursion and only up to ``limit`` + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
