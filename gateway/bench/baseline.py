"""Bench baseline: the straightforward pipeline, built directly on the same libraries.

What a careful engineer writes first, and what the gateway's speed is measured
against (as a ratio, so that the figure holds on a noisy machine):

1. python-hl7 parses the message (``hl7.parse``) and fields are read through
   its containers;
2. codes, units and flags are looked up in the same concept tables
   (``mappings/concepts/*.csv``);
3. the report Bundle (same resources and elements as the gateway's) is built as
   fhir.resources R4B models (``Bundle.model_validate``: pydantic model
   validation of every resource);
4. the signed bytes are ``rfc8785.dumps`` of the Bundle without ``id``,
   ``meta`` and ``signature``;
5. jwcrypto makes the ES256 JWS (payload detached afterwards);
6. one SQLite row per message, one transaction each (WAL, ``synchronous=NORMAL``,
   the gateway's own durability setting).

It checks less than the gateway (no profile rules, no identifier check digits,
no ACK); it is a floor for cost, not a product.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import hl7
import rfc8785
from jwcrypto import jwk, jws

from gateway.naming import (
    SYSTEM_ID_CARD,
    SYSTEM_INTERPRETATION,
    SYSTEM_LAB_REPORT_NO,
    SYSTEM_LOINC,
    SYSTEM_OBS_CATEGORY,
    SYSTEM_SPECIMEN_NO,
    SYSTEM_UCUM,
    SYSTEM_USCC,
    SYSTEM_V2_0074,
    local_item_system,
    local_mrn_system,
    sd_url,
)
from gateway.signing.jws import SIGNATURE_TYPE_SYSTEM, VERIFICATION_SIGNATURE

__all__ = ["Baseline"]

_NS = uuid.UUID("9d3c1f2e-8b7a-4c5d-9e0f-112233445566")
_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*-\s*([+-]?\d+(?:\.\d+)?)\s*$")
_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "X": "cancelled"}


def _csv_rows(path: Path) -> list[list[str]]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    return list(csv.reader(io.StringIO("\n".join(lines))))[1:]


def _ts(value: str) -> str:
    """HL7 TS ``YYYYMMDDHHMMSS+ZZZZ`` (or a date) as a FHIR dateTime."""
    v = value.strip()
    if len(v) <= 8:
        return f"{v[:4]}-{v[4:6]}-{v[6:8]}"
    tz = v[14:] or "+0800"
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}T{v[8:10]}:{v[10:12]}:{v[12:14]}{tz[:3]}:{tz[3:5]}"


def _f(seg: Any, field: int, comp: int = 1, rep: int = 1) -> str:
    """One component of a field, unescaped (python-hl7's own accessor)."""
    return str(seg.extract_field(1, field, rep, comp))


def _uid(*parts: str) -> str:
    return str(uuid.uuid5(_NS, "|".join(parts)))


class Baseline:
    """The straightforward HL7 v2 -> validated, signed, stored Bundle pipeline."""

    def __init__(self, database: Path, mappings_dir: str | Path, issuer_uscc: str, issuer_name: str,
                 key_pem: bytes, kid: str) -> None:
        concepts = Path(mappings_dir) / "concepts"
        local = f"local:{issuer_uscc}"
        self.items = {r[1]: (r[3], r[4]) for r in _csv_rows(concepts / "lab-items.csv") if r[0] == local}
        self.units = {r[1]: r[3] for r in _csv_rows(concepts / "units.csv")}
        self.flags = {r[1]: (r[3], r[4]) for r in _csv_rows(concepts / "interpretation.csv")}
        self.uscc, self.name = issuer_uscc, issuer_name
        self.key = jwk.JWK.from_pem(key_pem)
        self.kid = kid
        self.conn = sqlite3.connect(str(database), isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS bundles (id TEXT PRIMARY KEY, message_id TEXT, raw BLOB,"
                          " json TEXT, jws TEXT)")

    def close(self) -> None:
        self.conn.close()

    def process(self, raw: bytes) -> dict[str, Any]:
        """One message in, the signed Bundle stored (and returned as JSON data)."""
        from fhir.resources.R4B.bundle import Bundle

        msg = hl7.parse(raw.decode("utf-8"))
        control_id = _f(msg.segment("MSH"), 10)
        bundle = self._bundle(msg)
        # Model validation of every resource; the validated data is then used as built (serialising
        # through the model again would only add cost, not checks).
        Bundle.model_validate(bundle)
        data = bundle
        payload = rfc8785.dumps({k: v for k, v in data.items() if k not in ("id", "meta", "signature")})
        token = jws.JWS(payload)
        token.add_signature(self.key, alg="ES256", protected=json.dumps({"alg": "ES256", "kid": self.kid}))
        header, _, signature = token.serialize(compact=True).split(".")
        detached = f"{header}..{signature}"
        data["signature"] = {
            "type": [{"system": SIGNATURE_TYPE_SYSTEM, "code": VERIFICATION_SIGNATURE}],
            "when": data["timestamp"], "who": {"identifier": {"system": SYSTEM_USCC, "value": self.uscc}},
            "sigFormat": "application/jose", "data": base64.b64encode(detached.encode("ascii")).decode("ascii"),
        }
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("INSERT INTO bundles VALUES (?,?,?,?,?)",
                          [data["id"], control_id, raw, json.dumps(data, ensure_ascii=False),
                           detached])
        self.conn.execute("COMMIT")
        return data

    def _bundle(self, msg: hl7.Message) -> dict[str, Any]:
        msh, pid = msg.segment("MSH"), msg.segment("PID")
        control_id = _f(msh, 10)
        org = {"resourceType": "Organization", "id": _uid("Organization", self.uscc),
               "meta": {"profile": [sd_url("cyhr-organization")]},
               "identifier": [{"system": SYSTEM_USCC, "value": self.uscc}],
               "active": True, "name": self.name}
        patient: dict[str, Any] = {"resourceType": "Patient", "meta": {"profile": [sd_url("cyhr-patient")]},
                                   "identifier": []}
        for rep in range(1, len(pid[3]) + 1):
            value, id_type = _f(pid, 3, 1, rep), _f(pid, 3, 5, rep)
            if id_type == "NNCHN":
                patient["identifier"].append({"use": "official", "system": SYSTEM_ID_CARD, "value": value})
            elif value:
                patient["identifier"].append({"system": local_mrn_system(self.uscc),
                                              "value": value})
        patient["id"] = _uid("Patient", patient["identifier"][-1]["value"])
        family, given = _f(pid, 5, 1), _f(pid, 5, 2)
        patient["name"] = [{"text": family + given, "family": family, "given": [given]}]
        patient["gender"] = {"M": "male", "F": "female"}.get(_f(pid, 8), "unknown")
        patient["birthDate"] = _ts(_f(pid, 7))
        subject = {"reference": f"urn:uuid:{patient['id']}"}
        performer = [{"reference": f"urn:uuid:{org['id']}"}]
        resources: list[dict[str, Any]] = [org, patient]
        observations: list[dict[str, Any]] = []
        reports: list[dict[str, Any]] = []
        specimens: list[dict[str, Any]] = []
        groups: list[tuple[Any, list[Any], Any]] = []
        for seg in msg:
            name = str(seg[0])
            if name == "OBR":
                groups.append((seg, [], None))
            elif name == "OBX" and groups:
                groups[-1][1].append(seg)
            elif name == "SPM" and groups:
                groups[-1] = (groups[-1][0], groups[-1][1], seg)
        for obr, obxs, spm in groups:
            number = _f(obr, 3)
            spec = {"resourceType": "Specimen", "id": _uid("Specimen", number), "subject": subject,
                    "identifier": [{"system": SYSTEM_SPECIMEN_NO, "value": _f(spm, 2)}],
                    "type": {"text": _f(spm, 4, 2)},
                    "collection": {"collectedDateTime": _ts(_f(spm, 17))}, "receivedTime": _ts(_f(spm, 18))}
            specimens.append(spec)
            results = []
            for obx in obxs:
                code, text = _f(obx, 3, 1), _f(obx, 3, 2)
                codings = [{"system": local_item_system(self.uscc), "code": code, "display": text}]
                if self.items.get(code, ("", ""))[0]:
                    loinc, display = self.items[code]
                    codings.append({"system": SYSTEM_LOINC, "code": loinc, "display": display})
                obs: dict[str, Any] = {
                    "resourceType": "Observation", "id": _uid("Observation", number, code),
                    "meta": {"profile": [sd_url("cyhr-lab-observation")]},
                    "status": _STATUS.get(_f(obx, 11), "unknown"),
                    "category": [{"coding": [{"system": SYSTEM_OBS_CATEGORY,
                                              "code": "laboratory"}]}],
                    "code": {"coding": codings, "text": text}, "subject": subject,
                    "effectiveDateTime": _ts(_f(obr, 7)), "issued": _ts(_f(obr, 22)), "performer": performer,
                    "specimen": {"reference": f"urn:uuid:{spec['id']}"},
                }
                unit = _f(obx, 6)
                vtype = _f(obx, 2)
                if vtype in ("NM", "SN"):
                    value = _f(obx, 5, 2) if vtype == "SN" else _f(obx, 5)
                    q: dict[str, Any] = {"value": float(value), "unit": unit}
                    if vtype == "SN" and _f(obx, 5, 1):
                        q["comparator"] = _f(obx, 5, 1)
                    if unit in self.units:
                        q.update({"system": SYSTEM_UCUM, "code": self.units[unit]})
                    obs["valueQuantity"] = q
                else:
                    obs["valueString"] = _f(obx, 5)
                flag = _f(obx, 8)
                if flag in self.flags:
                    fcode, fdisplay = self.flags[flag]
                    coding = {"system": SYSTEM_INTERPRETATION, "code": fcode, "display": fdisplay}
                    obs["interpretation"] = [{"coding": [coding]}]
                m = _RANGE.match(_f(obx, 7))
                if m:
                    obs["referenceRange"] = [{"low": {"value": float(m.group(1))},
                                              "high": {"value": float(m.group(2))}, "text": _f(obx, 7)}]
                observations.append(obs)
                results.append({"reference": f"urn:uuid:{obs['id']}"})
            reports.append({
                "resourceType": "DiagnosticReport", "id": _uid("DiagnosticReport", number),
                "meta": {"profile": [sd_url("cyhr-lab-report")]},
                "identifier": [{"system": SYSTEM_LAB_REPORT_NO, "value": number}],
                "status": "final", "category": [{"coding": [{"system": SYSTEM_V2_0074,
                                                             "code": "LAB"}]}],
                "code": {"text": _f(obr, 4, 2)}, "subject": subject, "effectiveDateTime": _ts(_f(obr, 7)),
                "issued": _ts(_f(obr, 22)), "performer": performer,
                "specimen": [{"reference": f"urn:uuid:{spec['id']}"}], "result": results,
            })
        resources += specimens + observations + reports
        bundle_id = _uid("Bundle", self.uscc, control_id)
        return {"resourceType": "Bundle", "id": bundle_id, "meta": {"profile": [sd_url("cyhr-report-bundle")]},
                "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{bundle_id}"},
                "type": "collection", "timestamp": _ts(_f(msh, 7)),
                "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
