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

from typing import Any

import msgspec
import simplejson

__all__ = ["dumps", "loads", "dumps_pretty"]

_encode = msgspec.json.Encoder(decimal_format="number").encode


def dumps(obj: Any) -> str:
    """Compact JSON text, UTF-8 characters kept as they are (no ``\\uXXXX``)."""
    try:
        return _encode(obj).decode("utf-8")
    except (UnicodeEncodeError, TypeError):
        # what msgspec cannot write (a lone surrogate, an unusual type) simplejson writes or refuses as before
        return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")))


def dumps_pretty(obj: Any) -> str:
    """Indented JSON text for people and golden files."""
    return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, indent=2))


def loads(text: str | bytes) -> Any:
    """Parse JSON, keeping decimals as :class:`~decimal.Decimal`.

    :raises ValueError: the text is not JSON.
    """
    return simplejson.loads(text, use_decimal=True)
