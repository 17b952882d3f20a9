"""Walks over whole JSON values on every message's path, kept apart so that they can run compiled.

:func:`encodes_as_jcs` vouches that an encoder's text is RFC 8785's (gateway.signing.canonical), and
:func:`rewrite_refs` gives a Bundle's resources as stored, ``urn:uuid:`` references made ``Type/id``
(gateway.store.store). Both are pure: they read their arguments, change nothing and keep nothing.

With the compiled twins built (:mod:`gateway.native`), callers take them through :func:`fast`: the twin
answers, and should it raise (a run-time type check mypyc adds, say), the function here answers instead,
raising what it raises. ``tests/test_native.py`` holds the two equal.
"""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from decimal import Decimal
from itertools import chain
from typing import Any

__all__ = ["encodes_as_jcs", "rewrite_refs", "fast"]

# The largest integer an IEEE 754 double holds exactly; beyond it JCS (and every
# JavaScript verifier) sees the nearest double.
_SAFE_INTEGER = 2**53 - 1
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
# Leaves the encoders write as JCS does whatever their value (Decimals pass through canonical._jcs_number).
_PLAIN_LEAVES = frozenset((str, bool, type(None), Decimal))
_PLAIN_LEAVES_NO_DECIMAL = frozenset((str, bool, type(None)))


def encodes_as_jcs(obj: Any, decimals: bool = True) -> bool:
    """True when the text an encoder (the C encoder or msgspec's) wrote for ``obj`` without error is RFC 8785's.

    The encoder accepts a few things JCS writes differently or refuses, all of them
    found here: an int, float, bool or None key (written as a string, where RFC 8785
    refuses the document); a key beyond the Basic Multilingual Plane (sorted by code
    point, RFC 8785 sorts by UTF-16 code units); an int beyond ±(2**53-1) (JCS writes
    the nearest double); a float that is integral (``5.0``, JCS writes ``5``) or whose
    repr has an exponent (``1e-07``, JCS writes ``1e-7``). Other floats Python writes
    digit for digit as JCS does. Only plain dicts, lists, tuples, strings, booleans,
    ``None``, ints, floats and Decimals pass as values, so that subclasses, which the
    encoder may read otherwise than rfc8785 does, take the slower path; keys need only
    be strings, as on the copying path.

    Call it only after an encoder has written ``obj``: that proves there is no cycle
    (so this walk ends), and with the C encoder every Decimal passed ``canonical._jcs_number``.
    ``decimals=False`` (msgspec's text, which writes a Decimal as it holds it) refuses
    every Decimal. Keys are only gathered during the walk and checked at once.
    """
    dicts: list[Any] = []
    stack: list[Any] = [obj]
    leaves = _PLAIN_LEAVES if decimals else _PLAIN_LEAVES_NO_DECIMAL
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind in leaves:
            continue
        if kind is dict:
            dicts.append(value)
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            stack.extend(value)
        elif kind is int:
            if not -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
                return False
        elif kind is float:
            if not math.isfinite(value) or value.is_integer() or "e" in repr(value):
                return False
        else:
            return False
    try:
        keys = "".join(chain.from_iterable(dicts))  # iterating a dict gives its keys
    except TypeError:  # a key that is not a string
        return False
    return keys.isascii() or _ASTRAL.search(keys) is None


#: Deeper than this, :func:`rewrite_refs` raises RecursionError, the same way compiled or not (compiled code has no
#: recursion limit of its own; every JSON the gateway reads is held to far less: profiles._MAX_DEPTH).
MAX_DEPTH = 500


def rewrite_refs(obj: Any, local: dict[str, str], depth: int = 0) -> Any:
    """Replace in-Bundle ``urn:uuid:`` references by ``Type/id`` for storage.

    Copy on write: ``obj`` is never changed; parts without such a reference are
    shared with it rather than copied (the stored form is serialised at once and
    never modified).

    :raises RecursionError: ``obj`` nests deeper than :data:`MAX_DEPTH`.
    """
    if depth > MAX_DEPTH:
        raise RecursionError("nested too deeply to store")
    if isinstance(obj, dict):
        out: dict[Any, Any] | None = None
        for key, value in obj.items():
            if isinstance(value, (dict, list)):
                new = rewrite_refs(value, local, depth + 1)
            elif key == "reference" and isinstance(value, str) and value in local:
                new = local[value]
            else:
                continue
            if new is not value:
                if out is None:
                    out = dict(obj)
                out[key] = new
        return obj if out is None else out
    if isinstance(obj, list):
        items: list[Any] | None = None
        for i, value in enumerate(obj):
            if isinstance(value, (dict, list)):
                new = rewrite_refs(value, local, depth + 1)
                if new is not value:
                    if items is None:
                        items = list(obj)
                    items[i] = new
        return obj if items is None else items
    return obj


def fast(name: str) -> Callable[..., Any]:
    """Function ``name`` of this module as callers should take it: its compiled twin, with this one answering
    whenever the twin raises; this one alone when the twins are not in use. Made on first use."""
    from gateway import native

    plain: Callable[..., Any] = globals()[name]
    twin_module = native.load(__name__)
    if twin_module is sys.modules[__name__]:
        return plain
    twin: Callable[..., Any] = getattr(twin_module, name)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return twin(*args, **kwargs)
        except Exception:  # noqa: BLE001 - this module's own function decides, raising what it raises
            native.fell_back(("walk", name), f"the compiled twin of gateway.walks.{name} failed; the plain "
                             "function answers")
            return plain(*args, **kwargs)

    guarded.__doc__ = plain.__doc__
    return guarded
