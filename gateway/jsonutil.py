"""JSON: reading and writing FHIR JSON without losing decimal precision.

FHIR decimals carry their precision (``5.60`` is not ``5.6``: two significant
decimals were measured). The standard library turns decimals into floats, so
the gateway reads numbers with a fractional part as :class:`decimal.Decimal`
and writes them back exactly as they were (simplejson ``use_decimal``).
"""
from __future__ import annotations

from typing import Any

import simplejson

__all__ = ["dumps", "loads", "dumps_pretty"]


def dumps(obj: Any) -> str:
    """Compact JSON text, UTF-8 characters kept as they are (no ``\\uXXXX``)."""
    return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":")))


def dumps_pretty(obj: Any) -> str:
    """Indented JSON text for people and golden files."""
    return str(simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, indent=2))


def loads(text: str | bytes) -> Any:
    """Parse JSON, keeping decimals as :class:`~decimal.Decimal`.

    :raises ValueError: the text is not JSON.
    """
    return simplejson.loads(text, use_decimal=True)
