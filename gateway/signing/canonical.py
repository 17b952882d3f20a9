"""Canonical JSON: the exact bytes a Bundle signature covers.

The gateway signs the RFC 8785 (JSON Canonicalization Scheme, JCS) form of a
Bundle without its ``signature``, ``id`` and ``meta`` (FHIR ``#document``
canonicalization). Sender and receiver must arrive at the same bytes from
*different* texts (pretty-printed or compact, any key order), so three things
matter:

- numbers follow JCS, i.e. the IEEE 754 double the text denotes, written the way
  ECMAScript ``JSON.stringify`` writes it: ``4.50`` -> ``4.5``, ``1E30`` ->
  ``1e+30``, an integer beyond 2**53 -> its nearest double (``12345678901234567890``
  -> ``12345678901234567000``), exactly as a JavaScript verifier would;
- the received text is parsed with FHIR decimals kept as :class:`decimal.Decimal`
  (so nothing is rounded twice and :func:`dumps` can write ``4.50`` back as sent),
  and converted to the JCS double only when canonicalised;
- input that different parsers read differently is refused: duplicate keys (the
  classic way to make a signer and a verifier see different documents), ``NaN``
  and ``Infinity``, and unpaired UTF-16 surrogates (I-JSON, RFC 7493).

A consequence to keep in mind: JCS erases decimal precision, so ``4.50`` and
``4.5`` canonicalise alike and a signature does not protect the number of
significant digits of a FHIR decimal.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import msgspec
import rfc8785

from gateway.errors import ParseError

__all__ = ["canonicalize", "canonicalize_plain", "holds_plain_json", "parse_json", "parse_received", "document_bytes",
           "dumps", "DOCUMENT_EXCLUDED"]

#: Root Bundle members left out of the signed bytes (FHIR ``#document`` plus the signature itself).
DOCUMENT_EXCLUDED = ("signature", "id", "meta")

# The largest integer an IEEE 754 double holds exactly; beyond it JCS (and every
# JavaScript verifier) sees the nearest double, and so must we.
_SAFE_INTEGER = 2**53 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def canonicalize(obj: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of a JSON value.

    ``obj`` is what :func:`parse_json` or :func:`json.loads` returns: dicts with
    string keys, lists (or tuples), strings, booleans, ``None``, ints, floats and
    :class:`~decimal.Decimal`.

    Four ways give the same bytes, tried cheapest first: msgspec's encoder straight on
    ``obj`` (:func:`_msgspec_canonical`), the standard library's C encoder straight on
    it (:func:`_fast_canonical`, for string subclasses msgspec does not write), the same
    encoder on a copy with every number converted (:func:`_converted_canonical`, for the
    few documents neither can vouch for, such as a float ``5.0`` or a non-dict mapping),
    and the reference rfc8785 package, which also finds what is not JSON.

    :raises ParseError: the value is not representable in I-JSON (non-string key,
        NaN or infinite number, unpaired surrogate, unsupported type).
    """
    fast = _msgspec_canonical(obj)
    if fast is None:
        fast = _fast_canonical(obj)
    if fast is None:
        fast = _converted_canonical(obj)
    if fast is not None:
        return fast
    try:
        return rfc8785.dumps(_to_jcs_values(obj, "$"))
    except rfc8785.CanonicalizationError as exc:
        raise ParseError(f"cannot canonicalise JSON: {exc}", "$") from None
    except UnicodeEncodeError:  # rfc8785 meets a key's unpaired surrogate while sorting, before its own check
        raise ParseError("cannot canonicalise JSON: a key holds an unpaired UTF-16 surrogate", "$") from None
    except RecursionError:
        raise ParseError("JSON nested too deeply to canonicalise", "$") from None


class _Slow(Exception):
    """The document needs the reference canonicaliser (or is not canonicalisable at all)."""


def _jcs_number(value: Any) -> int | float:
    """A :class:`Decimal` as the int or float Python writes exactly as JCS does; raise :class:`_Slow` otherwise.

    Called by the C encoder for every value it does not know: a FHIR decimal becomes
    the double it denotes (``float(Decimal)`` is correctly rounded, as ``JSON.parse`` is),
    written as an int when integral within ±(2**53-1) and as a float when Python's
    shortest round-trip repr has no exponent, the same choice :func:`_fast_values`
    makes. Anything else (a decimal beyond 2**53 or one Python would write with an
    exponent, NaN, a mapping that is not a dict, an unknown type) goes the slower way.
    """
    if isinstance(value, Decimal) and value.is_finite():
        found = _remembered_double(value)  # (equal decimals denote one double: 5.6 and 5.60 are written alike)
        if found is not _SLOW:
            return found  # type: ignore[return-value]
    raise _Slow


def _jcs_double(value: Decimal) -> int | float | object:
    """:func:`_jcs_number` of a finite Decimal, worked out: the int or float, or :data:`_SLOW`."""
    number = float(value)
    if number.is_integer():
        if abs(number) <= _SAFE_INTEGER:
            return int(number)
    elif math.isfinite(number) and "e" not in repr(number):
        return number
    return _SLOW


_SLOW = object()
#: What :func:`_jcs_number` gave for a decimal, the 4,096 latest (a report's values and ranges come again and again).
_remembered_double = functools.lru_cache(maxsize=4096)(_jcs_double)


# Sorted keys, no whitespace, raw UTF-8, and the escapes JCS uses: ``\b \t \n \f \r``,
# other controls as lowercase ``\u00xx``, ``"`` and ``\\``, nothing else. No check for
# cycles: a document that contains itself ends in RecursionError, which is cheaper than
# keeping track of every container and sends it the slower way just the same.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                            check_circular=False, default=_jcs_number)


# Sorted keys, no whitespace, raw UTF-8, JCS's escapes; a Decimal through _jcs_number (the double it denotes, or
# _Slow). It refuses keys that are not strings, string subclasses and cycles; NaN, which it would write as null, and
# whatever else it writes otherwise than JCS (integral or exponent floats, big integers, keys beyond the BMP, types
# that are not JSON) are found afterwards by _encodes_as_jcs.
# (A msgspec too old to take a callable decimal_format skips this way; the others remain.)
def _msgspec_jcs_encoder() -> Callable[[Any], bytes] | None:
    try:
        return msgspec.json.Encoder(order="sorted", decimal_format=_jcs_number).encode
    except (TypeError, ValueError):
        return None


_MSGSPEC_JCS = _msgspec_jcs_encoder()


def _msgspec_canonical(obj: Any) -> bytes | None:
    """RFC 8785 bytes from msgspec's encoder straight on ``obj``, or None when it cannot vouch.

    The fastest way, some five times faster than the standard library's encoder on a
    report Bundle: the same vouching as :func:`_fast_canonical` (the walk of
    :func:`_encodes_as_jcs` over the document, every Decimal through :func:`_jcs_number`),
    only the encoder differs. It writes strings, literals, sorted objects and the
    floats the walk lets through digit for digit as JCS does (``canonicalize_plain``
    relies on the same), and refuses what it cannot write (an unpaired surrogate, a key
    that is not a string, a string subclass, a cycle, nesting too deep). The tests
    compare it with rfc8785 on the samples and on tens of thousands of random documents.
    """
    if _MSGSPEC_JCS is None:
        return None
    try:
        data = _MSGSPEC_JCS(obj)
    except (_Slow, TypeError, ValueError, OverflowError, RecursionError, UnicodeEncodeError):
        return None
    return data if _encodes_as_jcs(obj) else None


def _fast_canonical(obj: Any) -> bytes | None:
    """RFC 8785 bytes from the standard library's C encoder straight on ``obj``, or None when it cannot vouch.

    The encoder writes strings, literals and sorted objects as JCS does, and FHIR
    decimals through :func:`_jcs_number`. Whatever it would write differently is
    refused on the way (NaN and infinite floats, keys of mixed types and, as too deep,
    cycles by the encoder, an unpaired surrogate by UTF-8) or found afterwards by
    :func:`_encodes_as_jcs`, which looks at the document without copying it. Both
    checks only ever send a document the slower way. The rfc8785 package stays the
    reference: tests compare the two on every sample and on thousands of random documents.
    """
    try:
        text = _ENCODER.encode(obj)
        if not _encodes_as_jcs(obj):
            return None
        return text.encode("utf-8")
    except (_Slow, TypeError, ValueError, RecursionError):
        return None


def _encodes_as_jcs(obj: Any, *, decimals: bool = True) -> bool:
    """True when the text an encoder (the C encoder or msgspec's) wrote for ``obj`` without error is RFC 8785's:
    :func:`gateway.walks.encodes_as_jcs` (compiled when built). Call it only after an encoder has written ``obj``."""
    return bool(_jcs_walk()(obj, decimals))


@functools.cache
def _jcs_walk() -> Callable[..., Any]:
    from gateway import walks  # (on first use: the compiled twins import modules that import this one)

    return walks.fast("encodes_as_jcs")


def holds_plain_json(obj: Any) -> bool:
    """True when ``obj`` holds only what every JSON writer and reader agree on: dicts with string keys (none beyond
    the Basic Multilingual Plane), lists, tuples, strings, booleans, ``None``, integers within ±(2**53-1) and
    floats written alike by Python and ECMAScript; no Decimal, no subclass, no other type. ``obj`` must hold no
    cycle (call it on what an encoder has written without error)."""
    return _encodes_as_jcs(obj, decimals=False)


# Sorted keys, no whitespace, raw UTF-8, JCS's escapes (the same table as ECMAScript's JSON.stringify);
# a Decimal as it holds it and NaN as null, which is why _encodes_as_jcs(decimals=False) looks afterwards.
_MSGSPEC_SORTED = msgspec.json.Encoder(order="sorted").encode


def canonicalize_plain(obj: Any) -> bytes:
    """What ``rfc8785.dumps(obj)`` gives — the same bytes, the same refusals — through msgspec's encoder when it can.

    For JSON the gateway writes itself from strings, integers, booleans, null,
    lists and objects (audit records): a :class:`~decimal.Decimal` is refused as
    rfc8785 refuses it, rather than turned into a double as :func:`canonicalize`
    does for a received Bundle. msgspec raises on a cycle, a key that is not a
    string and an unpaired surrogate; whatever else it writes that
    :func:`_encodes_as_jcs` cannot vouch for is left to rfc8785 itself.

    :raises rfc8785.CanonicalizationError: as ``rfc8785.dumps`` raises it.
    """
    try:
        data = _MSGSPEC_SORTED(obj)
        if _encodes_as_jcs(obj, decimals=False):
            return data
    except (TypeError, ValueError, OverflowError, RecursionError, UnicodeEncodeError):
        pass
    return rfc8785.dumps(obj)


def _fast_values(value: Any) -> Any:
    """Copy ``value`` with numbers as Python writes them identically to JCS; raise :class:`_Slow` otherwise.

    Integral numbers within ±2**53 become ints; other finite numbers stay floats when
    Python's shortest round-trip repr has no exponent — then it is digit for digit what
    ECMAScript writes. Keys must lie in the Basic Multilingual Plane (so that sorting by
    code point equals RFC 8785's sort by UTF-16 code units). Anything else is left to rfc8785.
    """
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -_SAFE_INTEGER <= value <= _SAFE_INTEGER:
            return value
        raise _Slow
    if isinstance(value, (float, Decimal)):
        if isinstance(value, Decimal) and not value.is_finite():
            raise _Slow
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            raise _Slow
        if number.is_integer():
            # beyond 2**53 ECMAScript pads the shortest digits with zeros; int() would give the exact value
            if abs(number) <= _SAFE_INTEGER:
                return int(number)
            raise _Slow
        if "e" in repr(number):
            raise _Slow
        return number
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or (key and max(key) > "\uffff"):
                raise _Slow
            out[key] = _fast_values(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_fast_values(item) for item in value]
    raise _Slow


def _converted_canonical(obj: Any) -> bytes | None:
    """RFC 8785 bytes through the C encoder on a converted copy of ``obj``, or None when only rfc8785 can say.

    Slower than :func:`_fast_canonical` (every value is visited in Python) but it takes
    what that one turns down for the encoder's sake alone: integral floats, mappings
    other than dicts, subclasses of the JSON types. An unpaired surrogate cannot be
    encoded as UTF-8 and falls back.
    """
    try:
        return _ENCODER.encode(_fast_values(obj)).encode("utf-8")
    except (_Slow, UnicodeEncodeError, RecursionError):
        return None


def _to_jcs_values(value: Any, path: str) -> Any:
    """Copy ``value`` with every number turned into the double JCS serialises."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_SAFE_INTEGER <= value <= _SAFE_INTEGER else _finite(float(value), path)
    if isinstance(value, float):
        return _finite(value, path)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ParseError(f"number {value} is not allowed in JSON", path)
        # float(Decimal) is correctly rounded, the same double JSON.parse yields.
        return _finite(float(value), path)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ParseError(f"object key {key!r} is not a string", path)
            out[key] = _to_jcs_values(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_jcs_values(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise ParseError(f"a {type(value).__name__} is not a JSON value", path)


def _finite(number: float, path: str) -> float:
    if math.isnan(number) or math.isinf(number):
        raise ParseError("number is not finite as an IEEE 754 double", path)
    return number


def _parse_int(text: str) -> int | Decimal:
    # Python refuses to turn more than 4300 digits into an int; such a number stays a Decimal (and, beyond the
    # range of a double, is refused where it is canonicalised or checked)
    return int(text) if len(text) <= 4000 else Decimal(text)


def _reject_constant(name: str) -> Any:
    raise ParseError(f"{name} is not a JSON number", "$")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for key, _ in pairs:  # the first key met twice, as the reader meets it
        if key in seen:
            raise ParseError(f"duplicate key {key!r} in a JSON object", key)
        seen.add(key)
    raise AssertionError("unreachable: fewer members than pairs without a repeated key")  # pragma: no cover


def parse_json(text: bytes | str) -> Any:
    """Parse received JSON text strictly, keeping decimals as :class:`Decimal`.

    Bytes must be UTF-8. Integers stay ``int`` and fractions/exponents become
    ``Decimal``, so canonicalising the result gives the bytes the signer signed
    whatever number spelling the text uses.

    :raises ParseError: not UTF-8, not JSON, a duplicate key, ``NaN``/``Infinity``,
        an unpaired surrogate, or nesting too deep.
    """
    return _parse(text, _parse_int)[0]


def parse_received(text: bytes | str) -> tuple[Any, bool]:
    """:func:`parse_json`, and whether the value is *plain*: pass it on to :func:`document_bytes` unchanged.

    The reader makes only dicts with string keys, lists, strings, booleans, ``None``,
    ints and Decimals, so what :func:`canonicalize` otherwise walks the document to
    learn is known here from the text: the value is plain when no integer has more
    than 15 digits (so none lies beyond 2**53-1) and no character lies beyond the BMP
    (so keys sort alike by code point and by UTF-16 code units). The document bytes of
    a plain value come from msgspec's encoder without that walk.

    :raises ParseError: as :func:`parse_json`.
    """
    long_ints: list[str] = []

    def parse_int(digits: str) -> int | Decimal:
        if len(digits) > 15:
            long_ints.append(digits)
        return _parse_int(digits)

    value, raw, decoded = _parse(text, parse_int)
    if long_ints or "\\ud" in decoded or "\\uD" in decoded:  # an escaped surrogate may pair into an astral one
        return value, False
    return value, raw.translate(None, _NOT_ASTRAL_LEAD) == b""


# Every byte but the leading bytes of 4-byte UTF-8 sequences (characters beyond the BMP).
_NOT_ASTRAL_LEAD = bytes(b for b in range(256) if not 0xF0 <= b <= 0xF4)


def _parse(text: bytes | str, parse_int: Callable[[str], Any]) -> tuple[Any, bytes, str]:
    """(value, text as UTF-8, text as str) of :func:`parse_json`, with its own integer reader."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON text is not UTF-8 (byte {exc.start})", "$") from None
        from_utf8 = True
    else:
        decoded, from_utf8 = text, False
    try:
        value = json.loads(
            decoded,
            parse_float=Decimal,
            parse_int=parse_int,
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON: {exc.msg}", f"line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise ParseError("JSON nested too deeply", "$") from None
    except ArithmeticError:  # decimal.InvalidOperation, an exponent too large for a Decimal (1E+99999999999999999999)
        raise ParseError("not valid JSON: a number's exponent is too large for a decimal", "$") from None
    # Text decoded from UTF-8 holds no surrogate (the decoder refuses them); an escaped one is spelt \\uD8xx-\\uDFxx.
    if not from_utf8 and _SURROGATE.search(decoded):
        raise ParseError("JSON text contains an unpaired UTF-16 surrogate", "$")
    if ("\\ud" in decoded or "\\uD" in decoded) and _has_surrogate(value):
        raise ParseError("JSON text contains an unpaired UTF-16 surrogate", "$")
    if not from_utf8:
        raw = decoded.encode("utf-8")  # no surrogate left: it encodes
    return value, raw, decoded


def _has_surrogate(value: Any) -> bool:
    """True when an escaped ``\\udXXX`` decoded to a lone surrogate somewhere in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def document_bytes(bundle: Mapping[str, Any], *, plain: bool = False) -> bytes:
    """The signed bytes of a Bundle: JCS of it without root ``signature``, ``id``, ``meta``.

    ``plain`` is what :func:`parse_received` said of ``bundle`` (which must be the
    value it returned, unchanged): msgspec's encoder then writes the bytes without
    the walk that vouches for other documents.

    :raises ParseError: ``bundle`` is not a JSON object or holds a value I-JSON
        cannot represent.
    """
    if not isinstance(bundle, Mapping):
        raise ParseError("a Bundle must be a JSON object", "Bundle")
    document = {k: v for k, v in bundle.items() if k not in DOCUMENT_EXCLUDED}
    if plain and type(bundle) is dict and _MSGSPEC_JCS is not None:
        try:
            return _MSGSPEC_JCS(document)
        except (_Slow, TypeError, ValueError, OverflowError, RecursionError, UnicodeEncodeError):
            pass  # a decimal JCS writes with an exponent, nesting too deep: the checked way says
    return canonicalize(document)


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Serialise JSON for people and peers, writing decimals as parsed (``4.50`` stays ``4.50``).

    Not canonical (use :func:`canonicalize` for signed bytes); keys keep their
    order and non-ASCII text is written as is.

    :raises ParseError: a value that is not JSON (see :func:`canonicalize`).
    """
    parts: list[str] = []
    _write(obj, parts, indent, 0, "$")
    return "".join(parts)


def _write(value: Any, out: list[str], indent: int | None, level: int, path: str) -> None:
    if isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif value is None:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(float.__repr__(_finite(value, path)))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ParseError(f"number {value} is not allowed in JSON", path)
        out.append(str(value))
    elif isinstance(value, Mapping):
        items = list(value.items())
        if not items:
            out.append("{}")
            return
        inner, close = _breaks(indent, level)
        out.append("{")
        for i, (key, item) in enumerate(items):
            if not isinstance(key, str):
                raise ParseError(f"object key {key!r} is not a string", path)
            out.append(("," if i else "") + inner + json.dumps(key, ensure_ascii=False) + (": " if indent else ":"))
            _write(item, out, indent, level + 1, f"{path}.{key}")
        out.append(close + "}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        inner, close = _breaks(indent, level)
        out.append("[")
        for i, item in enumerate(value):
            out.append(("," if i else "") + inner)
            _write(item, out, indent, level + 1, f"{path}[{i}]")
        out.append(close + "]")
    else:
        raise ParseError(f"a {type(value).__name__} is not a JSON value", path)


def _breaks(indent: int | None, level: int) -> tuple[str, str]:
    if indent is None:
        return "", ""
    return "\n" + " " * (indent * (level + 1)), "\n" + " " * (indent * level)
