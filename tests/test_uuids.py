"""Name-based UUIDs: ``gateway.uuids.uuid5`` against the standard library's ``uuid.uuid5`` (the reference).

Every resource id the pipeline gives is one of these, so the Bundles (and their signatures) depend on the two
being equal: on every id the test inputs' Bundles carry, on decision ids, and on random names over an alphabet
of separators, CJK, control characters and characters beyond the Basic Multilingual Plane.
"""
from __future__ import annotations

import random
import uuid

import pytest

from conftest import DATA
from gateway import native
from gateway.fhir import parties
from gateway.recognition import engine
from gateway.uuids import uuid5

NAMESPACES = [parties._NAMESPACE, engine._DECISION_NS, uuid.NAMESPACE_URL, uuid.NAMESPACE_OID, uuid.UUID(int=0),
              uuid.UUID(int=2**128 - 1)]
ALPHABET = "|^~\\&ab09-_.:/ \t\r\n\x00中文检验报告😀\U0010ffff"


def test_equal_to_the_standard_library_on_random_names() -> None:
    rng = random.Random(19)
    for n in range(20_000):
        name = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        namespace = NAMESPACES[n % len(NAMESPACES)]
        assert uuid5(namespace, name) == str(uuid.uuid5(namespace, name)), (namespace, name)


def test_every_variant_digit_and_the_version_are_written_as_the_standard_library_writes_them() -> None:
    seen = {uuid5(parties._NAMESPACE, str(n))[19] for n in range(200)}
    assert seen == set("89ab")  # all four variant digits occur, each checked against the reference above
    assert {uuid5(parties._NAMESPACE, str(n))[14] for n in range(50)} == {"5"}


def test_a_name_that_is_not_unicode_text_is_refused_as_the_standard_library_refuses_it() -> None:
    with pytest.raises(UnicodeEncodeError):
        uuid.uuid5(parties._NAMESPACE, "\ud800")
    with pytest.raises(UnicodeEncodeError):
        uuid5(parties._NAMESPACE, "\ud800")


def test_the_ids_of_the_bundles_built_from_the_test_inputs_are_the_standard_librarys(
        convert_pipeline, monkeypatch) -> None:
    """Every stable id the pipeline gives, built once with the fast function and once with the reference."""
    made: list[tuple[tuple[str, ...], str]] = []
    fast = parties.stable_id

    def recording(*parts: str) -> str:
        made.append((parts, fast(*parts)))
        return made[-1][1]

    monkeypatch.setattr(parties, "stable_id", recording)
    for module in ("report", "bundle", "occupational", "servicereport"):
        monkeypatch.setattr(f"gateway.fhir.{module}.stable_id", recording)
        if f"gateway.fhir.{module}" in native.NATIVE:  # the compiled twin, when built, calls its own name for it
            monkeypatch.setattr(native.load(f"gateway.fhir.{module}"), "stable_id", recording)
    for path in sorted((DATA / "hl7v2").glob("*.hl7")):
        for _ in convert_pipeline.convert(path.read_bytes(), "hl7v2", path.name):
            pass
    assert len(made) > 100
    for parts, got in made:
        assert got == str(uuid.uuid5(parties._NAMESPACE, "|".join(parts))), parts
