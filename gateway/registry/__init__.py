"""Registry: the signed recognition registry every gateway decides against, offline.

The registry authority edits a source file (``source.py``, described by
``source.schema.json``): members and their signing certificates,
qualifications, EQA results and recognition catalogues. ``snapshot.py`` turns it
into one signed, versioned snapshot and verifies snapshots on arrival
(:class:`RegistryHolder` refuses unsigned, tampered, expired and older ones);
``models.py`` holds the parsed snapshot, which is also the trust source for
member signatures; ``policy.py`` answers "active / qualified / passed EQA / in
the catalogue on date D?"; ``fhir.py`` renders the snapshot as FHIR.
"""

from __future__ import annotations

from gateway.registry.models import Catalogue, CatalogueItem, Coding, EqaResult, Member, Qualification, Snapshot
from gateway.registry.snapshot import RegistryHolder, build_snapshot, unsigned_snapshot, verify_snapshot
from gateway.registry.source import RegistrySource, RegistrySourceError, load_source, parse_source

__all__ = [
    "Catalogue",
    "CatalogueItem",
    "Coding",
    "EqaResult",
    "Member",
    "Qualification",
    "Snapshot",
    "RegistryHolder",
    "build_snapshot",
    "unsigned_snapshot",
    "verify_snapshot",
    "RegistrySource",
    "RegistrySourceError",
    "load_source",
    "parse_source",
]
