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
import math
import re
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from gateway.jsonutil import MAX_DEPTH, nesting_depth

from gateway.adapters.base import RawUnit, SourceMessage
from gateway.adapters.cda import DocumentKey
from gateway.errors import GatewayError, Issue, shown
from gateway.fhir.profiles import forbidden_character
from gateway.signing.canonical import document_bytes, parse_json

__all__ = ["FHIRSubmissionAdapter", "ACCEPTED_TYPES"]

#: What FHIR takes as a resource id.
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_RESOURCE_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
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

    #: How an answer names what tells a resent Bundle apart, and how a changed one is sent instead.
    document_label = "Bundle.identifier"
    correction_hint = ("a correction is sent as a new Bundle with an identifier of its own (its resources keep their "
                       "ids and become new versions)")

    def document_key(self, unit: RawUnit) -> DocumentKey | None:
        """What tells a resent Bundle apart: its ``identifier`` and a digest of its content (the signed form's bytes:
        RFC 8785 JSON without ``id``, ``meta`` and ``signature``, so a Bundle sent again pretty-printed, with its
        keys in another order or with a new ``meta.lastUpdated`` is the same). None without an identifier (the
        body's own SHA-256 tells it apart then) or when the body is not a Bundle."""
        try:
            doc = parse_json(unit.data)
        except GatewayError:
            return None
        ident = doc.get("identifier") if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" else None
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str) or not ident["value"]:
            return None
        value = ident["value"]
        try:
            digest = hashlib.sha256(document_bytes(doc)).hexdigest()
        except GatewayError:  # a number I-JSON cannot carry: read will refuse it; the bytes tell it apart meanwhile
            digest = "sha256:" + hashlib.sha256(unit.data).hexdigest()
        # ('#' is written %23: the requests carrying one Bundle are stored as key, key#2, key#3 ...)
        key = f"{ident.get('system', '')}|{value}".replace("%", "%25").replace("#", "%23")
        return DocumentKey("fhir", key, digest, "Bundle.identifier")

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
        if nesting_depth(doc) > MAX_DEPTH:
            msg.issues.append(Issue("error", "structure", "Bundle", f"nested more than {MAX_DEPTH} levels deep"))
            return msg
        msg.issues.extend(_value_issues(doc))
        if msg.errors:
            return msg
        msg.message_id = str(doc.get("id") or "")
        msg.extra["label"] = f"Bundle {msg.message_id}" if msg.message_id else "Bundle"
        meta = doc.get("meta")
        if meta is not None and (not isinstance(meta, dict) or not isinstance(meta.get("profile", []), list)):
            msg.issues.append(Issue("error", "structure", "Bundle.meta",
                                    "Bundle.meta must be an object whose profile is a list of canonical URLs"))
        if doc.get("type") not in ACCEPTED_TYPES:
            msg.issues.append(Issue("error", "not-supported", "Bundle.type",
                                    f"Bundle.type {shown(doc.get('type'))} is not accepted "
                                    f"(accepted: {', '.join(ACCEPTED_TYPES)})"))
        entries = doc.get("entry")
        if not isinstance(entries, list) or not entries:
            msg.issues.append(Issue("error", "required", "Bundle.entry", "the Bundle has no entries"))
        else:
            seen: dict[tuple[str, str], int] = {}  # (type, id) -> the entry that has it first
            for n, entry in enumerate(entries):
                res = entry.get("resource") if isinstance(entry, dict) else None
                request = entry.get("request") if isinstance(entry, dict) else None
                if isinstance(request, dict) and request.get("method") not in _STORING:  # (a GET has no resource)
                    msg.issues.extend(_request_issues(request, res if isinstance(res, dict) else {}, n))
                elif isinstance(entry, dict) and entry.get("response") is not None:  # R4 bdl-4
                    msg.issues.append(Issue("error", "structure", f"Bundle.entry[{n}].response",
                                            "an entry of a submitted Bundle carries no response (R4 bdl-4: only "
                                            "the entries of a batch- or transaction-response do)"))
                elif doc.get("type") == "transaction" and not isinstance(request, dict):  # R4 bdl-3
                    msg.issues.append(Issue("error", "required", f"Bundle.entry[{n}].request",
                                            "every entry of a transaction carries its request (R4 bdl-3): "
                                            "{\"method\": \"POST\", \"url\": \"<its resource type>\"}, or a PUT "
                                            "to <type>/<id>; or send the Bundle as a collection"))
                elif doc.get("type") == "collection" and request is not None:  # R4 bdl-3
                    msg.issues.append(Issue("error", "structure", f"Bundle.entry[{n}].request",
                                            "the entries of a collection carry no request (R4 bdl-3); send the "
                                            "Bundle as a transaction to give each entry its request"))
                elif not isinstance(res, dict) or not isinstance(res.get("resourceType"), str) \
                        or not res["resourceType"]:
                    msg.issues.append(Issue("error", "structure", f"Bundle.entry[{n}].resource",
                                            "every entry carries a resource"))
                elif not _RESOURCE_TYPE.match(res["resourceType"]):
                    msg.issues.append(Issue("error", "structure", f"Bundle.entry[{n}].resource.resourceType",
                                            f"{shown(res['resourceType'])} is not a resource type"))
                elif not isinstance(res.get("id"), str) or not _FHIR_ID.match(res["id"]):
                    msg.issues.append(Issue("error", "required", f"Bundle.entry[{n}].resource.id",
                                            "every submitted resource needs an id of 1-64 letters, digits, '-' "
                                            "and '.' (its fullUrl is urn:uuid:<id>)"))
                elif not isinstance(entry.get("fullUrl", ""), str):
                    msg.issues.append(Issue("error", "structure", f"Bundle.entry[{n}].fullUrl",
                                            "fullUrl must be a string (a URI)"))
                elif (res["resourceType"], res["id"]) in seen:  # R4: a transaction whose entries overlap fails
                    msg.issues.append(Issue("error", "invalid", f"Bundle.entry[{n}].resource.id",
                                            f"{res['resourceType']}/{res['id']} is also entry["
                                            f"{seen[(res['resourceType'], res['id'])]}]'s: each entry is a resource "
                                            "of its own, with an id of its own"))
                elif isinstance(entry.get("request"), dict):
                    msg.issues.extend(_request_issues(entry["request"], res, n))
                if isinstance(res, dict) and isinstance(res.get("id"), str):
                    seen.setdefault((str(res.get("resourceType")), res["id"]), n)
        msg.extra["bundle"] = doc
        return msg


_STORING = ("POST", "PUT")  # the request methods of a transaction entry that store its resource
#: Conditions a transaction entry may carry, none of which the gateway evaluates: refused rather than ignored.
_CONDITIONS = ("ifNoneMatch", "ifModifiedSince", "ifMatch", "ifNoneExist")


def _request_issues(request: dict[str, Any], resource: dict[str, Any], n: int) -> list[Issue]:
    """What a transaction entry's ``request`` asks that the gateway does not do, rather than ignore: another method
    than storing (a delete, read or patch would be stored as a create), a condition, no URL, a PUT whose URL names
    another resource than the entry's (R4: the id in the URL is the resource's), or a POST whose URL names another
    type than the entry's resource."""
    at = f"Bundle.entry[{n}].request"
    method = request.get("method")
    if method not in _STORING:
        return [Issue("error", "not-supported", f"{at}.method", f"request method {shown(method)} is not taken: a "
                      "submitted Bundle's entries are stored (POST or PUT)")]
    asked = [c for c in _CONDITIONS if request.get(c) not in (None, "")]
    if asked:
        return [Issue("error", "not-supported", f"{at}.{asked[0]}", f"conditional {', '.join(asked)} is not "
                      "evaluated by this gateway: send the entry without it")]
    url, rtype = request.get("url"), str(resource.get("resourceType"))
    own = f"{rtype}/{resource.get('id')}"
    if not isinstance(url, str) or not url.strip():
        return [Issue("error", "required", f"{at}.url", f"the request names its URL: {rtype} (POST) or {own} (PUT)")]
    path = url.split("?", 1)[0].rstrip("/")
    if method == "PUT" and path != own and not path.endswith("/" + own):  # (this server's absolute URL too)
        return [Issue("error", "invalid", f"{at}.url", f"PUT {shown(url)} names another resource than the entry's "
                      f"{own}")]
    if method == "POST" and path != rtype and not path.endswith("/" + rtype):
        return [Issue("error", "invalid", f"{at}.url", f"POST {shown(url)} names another type than the entry's "
                      f"{rtype}")]
    return []


def _value_issues(doc: Any, limit: int = 10) -> list[Issue]:
    """Values no signed report can carry: numbers beyond the range of an IEEE 754 double (RFC 8785 writes
    doubles), strings (and names) holding a control character or a lone surrogate, which FHIR strings forbid.

    Located by FHIRPath (``Bundle.entry[1].resource.valueQuantity.value``); at most ``limit``.
    """
    issues: list[Issue] = []
    stack: list[tuple[Any, str]] = [(doc, "Bundle")]
    while stack and len(issues) < limit:
        value, path = stack.pop()
        if isinstance(value, str):
            bad = forbidden_character(value)
            if bad:
                issues.append(Issue("error", "value", path, f"holds a {bad}, which FHIR strings do not allow"))
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                bad = forbidden_character(key)
                if bad:  # reported, not walked into: its location could not be shown
                    issues.append(Issue("error", "structure", f"{path}.{shown(key)}",
                                        f"the name holds a {bad}, which FHIR JSON does not allow"))
                else:
                    stack.append((item, f"{path}.{key}"))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            if isinstance(value, Decimal):
                too_large = not (value.is_finite() and math.isfinite(float(value)))
            else:  # an int compares with a float exactly, where float() of a huge int would overflow
                too_large = abs(value) > sys.float_info.max
            if too_large:
                issues.append(Issue("error", "value", path,
                                    f"number {shown(value)} is beyond the range of a number (±1.7e308)"))
    return issues
