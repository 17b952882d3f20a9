"""Signed Bundles kept by the exchange: the SQL of :mod:`gateway.exchange.service` (and of the referrals that
cite them as evidence), on SQLite and PostgreSQL.

The ``signed_bundles`` and ``messages`` tables belong to the core part (``sql/<engine>/core.sql``).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, Protocol

from gateway import jsonutil
from gateway.store import schema
from gateway.store.db import Database, dialect, transaction

__all__ = ["SignedBundlesPort", "SignedBundles", "issuer_of", "patient_keys", "keys_pattern"]


def issuer_of(bundle: dict[str, Any]) -> str:
    """The USCC of the Bundle's issuing Organization ('' when it names none)."""
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Organization":
            for ident in res.get("identifier", []):
                if ident.get("system", "").endswith("/sid/uscc"):
                    return str(ident.get("value", ""))
    return ""


def patient_keys(bundle: dict[str, Any]) -> list[str]:
    """``system|value`` of every identifier of the Bundle's patients (how 调阅 finds a patient's Bundles)."""
    keys: list[str] = []
    for entry in bundle.get("entry", []):
        res = entry.get("resource", {})
        if res.get("resourceType") == "Patient":
            keys += [f"{i.get('system', '')}|{i['value']}" for i in res.get("identifier", []) if i.get("value")]
    return keys


def keys_pattern(identifier: str) -> str:
    """The LIKE pattern (escaped with ``\\``) of a patient identifier (``system|value``, or a ``value`` of any
    system) in ``signed_bundles.patient_keys``, a JSON list of ``"system|value"``: it narrows, the caller then
    checks each key exactly."""
    needle = identifier if "|" in identifier else f"|{identifier}"
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f'%"{escaped}"%' if "|" in identifier else f'%{escaped}"%'


class SignedBundlesPort(Protocol):
    """What the exchange asks of the signed Bundles' storage."""

    def keep(self, bundle_id: str, digest: str, issuer: str, patient_keys: str, direction: str, text: bytes,
             signed_at: str, message_ref: int | None, *, keys_list: list[str] | None = None) -> bool:
        """Record a signed Bundle once per document hash (inside the caller's transaction); True when new. An issued
        Bundle's patient identifiers (``patient_keys``, JSON; ``keys_list``, the same as a list) are recorded in
        ``signed_bundle_patients`` too."""

    def latest_issued(self, bundle_id: str) -> bytes | None:
        """The text of the latest signed copy of a Bundle issued here, or None."""

    def issued_texts(self, bundle_id: str) -> list[bytes]:
        """Every signed copy of a Bundle issued here, oldest first."""

    def latest_received(self, bundle_id: str) -> tuple[str, str] | None:
        """(doc_sha256, bundle_id) of the latest verified copy of a Bundle received here, or None."""

    def received_message(self, digest: str) -> int | None:
        """The message a received document was stored with, or None when it was not received."""

    def issued_for_identifier(self, identifier: str) -> list[tuple[bytes, str]]:
        """(text, patient_keys) of the current Bundles issued here naming a patient identifier (``system|value``,
        or a ``value`` of any system), oldest first."""

    def issued_for_patient(self, pattern: str) -> list[tuple[bytes, str]]:
        """(text, patient_keys) of the current Bundles issued here whose keys match a LIKE ``pattern``
        (escaped with ``\\``), oldest first."""

    def take_message(self, record_id: int, owner: str, until: float,
                     alive: Callable[[str | None, float | None], bool]) -> bool:
        """Hold a received message that has no answer and no live holder (``alive(owner, until)``)."""


def packed(text: bytes) -> bytes:
    """A signed text as ``signed_bundles.text`` keeps it: deflated (zlib, fastest level; a report Bundle's 40 kB
    become about 6 kB, which the database writes twice, to its log and its file, for every message)."""
    return zlib.compress(text, 1)


def unpacked(kept: bytes | memoryview) -> bytes:
    """The signed text exactly as signed, from ``signed_bundles.text``: a zlib stream (its first byte is 0x78,
    ``x``, which no JSON text starts with) is inflated; a text an earlier release kept as is is returned as is."""
    data = bytes(kept)
    return zlib.decompress(data) if data[:1] == b"x" else data


class SignedBundles:
    """:class:`SignedBundlesPort` on SQLite and PostgreSQL. The texts are kept :func:`packed`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def keep(self, bundle_id: str, digest: str, issuer: str, patient_keys: str, direction: str, text: bytes,
             signed_at: str, message_ref: int | None, *, keys_list: list[str] | None = None,
             packed_text: bytes | None = None) -> bool:
        """Keep a signed text (``packed_text``: :func:`packed` of it, when made already, before the write lock)."""
        kept = bool(self.db.execute(
            "INSERT INTO signed_bundles (bundle_id, doc_sha256, issuer_uscc, patient_keys, direction, text,"
            " signed_at, message_ref) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            [bundle_id, digest, issuer, patient_keys, direction, packed(text) if packed_text is None else packed_text,
             signed_at, message_ref]).rowcount)
        if kept and direction == "issued" and self._patient_table():
            listed = jsonutil.loads(patient_keys) if keys_list is None else keys_list
            keys = {tuple(reversed(key.split("|", 1))) for key in listed if "|" in key}
            if keys:
                self.db.conn.executemany("INSERT INTO signed_bundle_patients (value, system, doc_sha256)"
                                         " VALUES (?,?,?) ON CONFLICT DO NOTHING",
                                         [(value, system, digest) for value, system in sorted(keys)])
        return kept

    def keep_bundle(self, bundle: dict[str, Any], digest: str, direction: str, text: bytes, signed_at: str,
                    message_ref: int | None, *, packed_text: bytes | None = None) -> bool:
        """:meth:`keep` a signed Bundle, its issuer and patient keys read from ``bundle`` (the document signed)."""
        keys = patient_keys(bundle)
        return self.keep(str(bundle.get("id") or ""), digest, issuer_of(bundle), jsonutil.dumps(keys), direction, text,
                         signed_at, message_ref, keys_list=keys, packed_text=packed_text)

    def latest_issued(self, bundle_id: str) -> bytes | None:
        row = self.db.execute("SELECT text FROM signed_bundles WHERE bundle_id = ? AND direction = 'issued'"
                              " ORDER BY signed_at DESC, doc_sha256 LIMIT 1", [bundle_id]).fetchone()
        return None if row is None else unpacked(row[0])

    def issued_texts(self, bundle_id: str) -> list[bytes]:
        return [unpacked(r[0]) for r in self.db.execute(
            "SELECT text FROM signed_bundles WHERE bundle_id = ? AND direction = 'issued'"
            " ORDER BY signed_at, doc_sha256", [bundle_id]).fetchall()]

    def latest_received(self, bundle_id: str) -> tuple[str, str] | None:
        row = self.db.execute("SELECT doc_sha256, bundle_id FROM signed_bundles WHERE bundle_id = ? AND"
                              " direction = 'received' ORDER BY signed_at DESC, doc_sha256 LIMIT 1",
                              [bundle_id]).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def received_message(self, digest: str) -> int | None:
        row = self.db.execute("SELECT message_ref FROM signed_bundles WHERE doc_sha256 = ? AND direction = 'received'",
                              [digest]).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _patient_table(self) -> bool:
        """Whether ``signed_bundle_patients`` is there (on PostgreSQL, not before ``gateway db upgrade`` or a start
        of ``gateway serve`` made it: a Bundle kept meanwhile is filled in by them, :func:`ensure_patient_keys`)."""
        if schema.known(self.db, "table:signed_bundle_patients"):
            return True
        if not schema.columns(self.db, "signed_bundle_patients"):
            return False
        schema.learn(self.db, "table:signed_bundle_patients")
        return True

    def issued_for_identifier(self, identifier: str) -> list[tuple[bytes, str]]:
        """(text, patient_keys) of the current Bundles issued here naming a patient identifier (``system|value``,
        or a ``value`` of any system), oldest first, found through ``signed_bundle_patients``; by a reading of
        every issued Bundle's keys only where that table is not there yet (a PostgreSQL node opened before
        ``gateway db upgrade`` made it)."""
        if not self._patient_table():
            return self.issued_for_patient(keys_pattern(identifier))
        if "|" in identifier:
            system, value = identifier.split("|", 1)
            which, params = "p.value = ? AND p.system = ?", [value, system]
        else:
            which, params = "p.value = ?", [identifier]
        join = "JOIN" if dialect(self.db) == "postgresql" else "CROSS JOIN"  # SQLite: from the patient's keys
        rows = self.db.execute(
            "SELECT DISTINCT s.text, s.patient_keys, s.signed_at, s.doc_sha256 FROM signed_bundle_patients p"
            f" {join} signed_bundles s ON s.doc_sha256 = p.doc_sha256"
            f" WHERE {which} AND s.direction = 'issued'{self._current('s.')} ORDER BY s.signed_at, s.doc_sha256",
            params).fetchall()
        return [(unpacked(r[0]), str(r[1])) for r in rows]

    def _current(self, prefix: str) -> str:
        """The condition that leaves out a Bundle whose every report a correction superseded (asked of each
        Bundle found, through report_versions' index by Bundle); ``prefix`` names the signed_bundles row
        (``s.``), which the subqueries must not read as their own."""
        if not schema.columns(self.db, "report_versions"):
            return ""
        return (f" AND (NOT EXISTS (SELECT 1 FROM report_versions r WHERE r.direction = 'issued' AND r.bundle_id ="
                f" {prefix}bundle_id) OR EXISTS (SELECT 1 FROM report_versions r WHERE r.direction = 'issued' AND"
                f" r.bundle_id = {prefix}bundle_id AND r.superseded_by IS NULL))")

    def issued_for_patient(self, pattern: str) -> list[tuple[bytes, str]]:
        current = self._current("s.")  # a Bundle whose every report a correction superseded is not answered
        rows = self.db.execute("SELECT s.text, s.patient_keys FROM signed_bundles s WHERE s.direction = 'issued'"
                               f" AND s.patient_keys LIKE ? ESCAPE '\\'{current} ORDER BY s.signed_at, s.doc_sha256",
                               [pattern]).fetchall()
        return [(unpacked(r[0]), str(r[1])) for r in rows]

    def take_message(self, record_id: int, owner: str, until: float,
                     alive: Callable[[str | None, float | None], bool]) -> bool:
        db = self.db
        with transaction(db, poll=True):
            row: Any = db.execute("SELECT ack IS NOT NULL, lease_owner, lease_until FROM messages WHERE id = ?",
                                  [record_id]).fetchone()
            if row is None or row[0] or alive(row[1], row[2]):
                return False
            db.execute("UPDATE messages SET status = 'received', lease_owner = ?, lease_until = ?,"
                       " attempts = attempts + 1 WHERE id = ?", [owner, until, record_id])
        return True
