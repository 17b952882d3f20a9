"""Numbers and reference ranges are read once per text: what is remembered equals what reading finds.

:func:`gateway.adapters.base.parse_number`, :func:`parse_reference_range` and :func:`reversed_range` remember
(``functools.lru_cache``) what they found for each short text (a lab sends the same values and ranges again and
again). The readers they remember (``_read_number``, ``_read_range``, and the range pattern) stay the reference:
on every OBX-5 and OBX-7 of the test messages and on thousands of generated texts, the first call and every later
one answer as the reference does, and each call gives a Quantity of its own.
"""
from __future__ import annotations

import random
import re
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.adapters import base

DATA = Path(__file__).parent / "data"


def _message_texts() -> list[str]:
    """OBX-5 and OBX-7 of every HL7 v2 message under tests/data (the values and ranges labs really send)."""
    texts: list[str] = []
    for path in sorted((DATA / "hl7v2").glob("*")):
        raw = path.read_bytes().decode("utf-8", "replace")
        for segment in re.split(r"[\r\n]+", raw):
            if segment.startswith("OBX"):
                fields = segment.split("|")
                texts += [f for i, f in enumerate(fields) if i in (5, 7)]
    return texts


def _generated(count: int) -> list[str]:
    rng = random.Random(7)
    pieces = ["", " ", "<", ">", "<=", ">=", "≤", "≥", "＜", "+", "-", "0", "1", "9", "12", ".", "5", "00",
              "E+05", "e-2", "E400", "E-400", "６", "．", "８", "-", "~", "～", "－", "—", "x", "阴性", "\t"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))) for _ in range(count)]


def _reference_reversed(text: str) -> bool:
    return base._read_reversed(text)


_MEMORIES = (base._remembered_number, base._remembered_range, base._remembered_reversed)


def _kept(memory: object) -> int:
    """How many texts a reader remembers now."""
    return int(memory.cache_info().currsize)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _forgotten() -> None:
    for memory in _MEMORIES:
        memory.cache_clear()


def test_remembered_readings_equal_the_reference() -> None:
    texts = _message_texts()
    assert len(texts) > 100  # the corpus is there
    texts += _generated(5000)
    for _ in range(2):  # read, then remembered
        for text in texts:
            q = base.parse_number(text)
            expected = base._read_number(text)
            if expected is None:
                assert q is None, text
            else:
                assert q is not None and (q.value, q.comparator) == expected, text
                assert str(q.value) == str(expected[0]), text  # the same precision (5.60 stays 5.60)
            assert base.parse_reference_range(text) == base._read_range(text), text
            assert base.reversed_range(text) is _reference_reversed(text), text
    assert _kept(base._remembered_number) <= base._READ_MAX


def test_each_call_gives_its_own_quantity() -> None:
    first = base.parse_number("5.60")
    again = base.parse_number("5.60")
    assert first is not None and again is not None and first is not again
    first.comparator = "<"  # a builder changing its copy changes nobody else's
    third = base.parse_number("5.60")
    assert third is not None and third.comparator == "" and str(third.value) == "5.60"


def test_long_texts_are_not_remembered_and_the_memory_is_bounded() -> None:
    narrative = "见附件报告" * 2000
    assert base.parse_number(narrative) is None
    assert base.parse_reference_range(narrative) == (None, None)
    assert _kept(base._remembered_number) == 0 and _kept(base._remembered_range) == 0  # (not remembered)
    for i in range(base._READ_MAX + 10):
        base.parse_number(str(i))
    assert _kept(base._remembered_number) <= base._READ_MAX
    assert base.parse_number("4105") is not None and str(base.parse_number("4105").value) == "4105"


def test_remembered_moments_equal_the_reference() -> None:
    """The recognition rules read each date text once (gateway.recognition.engine._moment remembers it): every
    later reading answers as reading it again does — days, instants, and the reasons a text has no day."""
    from gateway.recognition import engine

    engine._remembered_moment.cache_clear()
    rng = random.Random(11)
    texts = ["2026-05-20", "2026-05-20T08:00:00+08:00", "2026-05-20T23:30:00-05:00", "2026-05", "2026",
             "2026-02-30", "2026-05-20T08:00:00", "2026-05-20T08:00:00Z", "9999-12-31T23:00:00-05:00", "x"]
    for _ in range(3000):
        day = f"{rng.randint(1900, 2100):04d}-{rng.randint(0, 13):02d}-{rng.randint(0, 32):02d}"
        time = f"T{rng.randint(0, 24):02d}:{rng.randint(0, 60):02d}:{rng.randint(0, 60):02d}"
        texts.append(day + rng.choice(["", time, time + "+08:00", time + "Z", time + ".5-03:30", time + "+14:00"]))
    for _ in range(2):
        for text in texts:
            assert engine._moment(text) == engine._read_moment(text), text
            assert engine.result_day(text) == (lambda m: (m.day, None) if isinstance(m, engine._Moment) else (
                None, m))(engine._read_moment(text))
    assert 0 < _kept(engine._remembered_moment) <= 4096
    assert engine._moment(None) is None and engine._moment("") is None
    long_text = "2026-05-20T08:00:00.123456789012345678901234567890+08:00"
    kept = _kept(engine._remembered_moment)
    assert engine._moment(long_text) == engine._read_moment(long_text) and _kept(engine._remembered_moment) == kept


@pytest.mark.parametrize("text, low, high, backwards", [
    ("-3--1", "-3", "-1", False),  # a base excess: it was read -3 to 1 (the second bound's sign taken as a hyphen)
    ("-3 - -1", "-3", "-1", False),
    ("-3~-1", "-3", "-1", False),
    ("-3-3", "-3", "3", False),
    ("3.5--5.5", "3.5", "5.5", False),  # two hyphens between the bounds, as some LIS write them
    ("3.5-5.5", "3.5", "5.5", False),
    ("6.1-3.9", None, None, True),
    ("6.1--3.9", None, None, True),
])
def test_a_hyphen_before_the_second_bound_is_its_sign_when_that_makes_a_range(text, low, high, backwards) -> None:
    found = base.parse_reference_range(text)
    assert found == (Decimal(low) if low else None, Decimal(high) if high else None)
    assert base.reversed_range(text) is backwards
