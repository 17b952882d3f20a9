"""FHIR submission adapter: report Bundles that member systems already speak FHIR for.

``POST /fhir`` (a ``transaction`` or ``collection`` Bundle) and ``POST /fhir/Bundle``
take a report Bundle in JSON. Syntax only here: strict JSON (duplicate keys,
NaN and a size limit refused), a Bundle of an accepted type, entries that are
resources. The pipeline then checks it against our profiles — the report Bundle
profile and every profile its resources declare — before anything but the raw
submission is stored.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from gateway.adapters.base import RawUnit, SourceMessage
from gateway.errors import GatewayError, Issue
from gateway.signing.canonical import parse_json

__all__ = ["FHIRSubmissionAdapter", "ACCEPTED_TYPES"]

#: Bundle types a member system may submit.
ACCEPTED_TYPES = ("transaction", "collection")


class FHIRSubmissionAdapter:
    """Reads one FHIR JSON Bundle per request."""

    format = "fhir"

    def __init__(self, *, max_bytes: int = 16_777_216) -> None:
        self.max_bytes = max_bytes

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """The whole body is one unit."""
        if data.strip():
            yield RawUnit(data, 1, origin)

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """("fhir", Bundle.identifier value or the SHA-256 of the body): a resubmission is a duplicate."""
        try:
            doc = parse_json(unit.data)
            ident = doc.get("identifier", {}) if isinstance(doc, dict) else {}
            value = ident.get("value") if isinstance(ident, dict) else None
            if isinstance(value, str) and value:
                return "fhir", f"{ident.get('system', '')}|{value}"
        except GatewayError:
            pass
        return "fhir", "sha256:" + hashlib.sha256(unit.data).hexdigest()

    def read(self, unit: RawUnit) -> SourceMessage:
        """Parse and check the Bundle's outline; problems become issues located by FHIRPath."""
        msg = SourceMessage(format=self.format)
        msg.extra["label"] = "Bundle"
        if len(unit.data) > self.max_bytes:
            msg.issues.append(Issue("error", "too-long", "Bundle",
                                    f"submission is {len(unit.data)} bytes, the limit is {self.max_bytes}"))
            return msg
        try:
            doc: Any = parse_json(unit.data)
        except GatewayError as exc:
            msg.issues.append(Issue("error", "structure", "Bundle", f"not strict JSON: {exc.message}"))
            return msg
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
            msg.issues.append(Issue("error", "not-supported", "resourceType",
                                    "submit a report Bundle (resourceType Bundle)"))
            return msg
        msg.message_id = str(doc.get("id") or "")
        msg.extra["label"] = f"Bundle {msg.message_id}" if msg.message_id else "Bundle"
        if doc.get("type") not in ACCEPTED_TYPES:
            msg.issues.append(Issue("error", "not-supported", "Bundle.type",
                                    f"Bundle.type {doc.get('type')!r} is not accepted "
                                    f"(accepted: {', '.join(ACCEPTED_TYPES)})"))
        entries = doc.get("entry")
        if not isinstance(entries, list) or not entries:
            msg.issues.append(Issue("error", "required", "Bundle.entry", "the Bundle has no entries"))
        else:
            for n, entry in enumerate(entries):
                res = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(res, dict) or not res.get("resourceType"):
                    msg.issues.append(Issue("error", "structure", f"Bundle.entry[{n}].resource",
                                            "every entry carries a resource"))
                elif not res.get("id"):
                    msg.issues.append(Issue("error", "required", f"Bundle.entry[{n}].resource.id",
                                            "every submitted resource needs an id (its fullUrl is urn:uuid:<id>)"))
        msg.extra["bundle"] = doc
        return msg
