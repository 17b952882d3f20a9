"""职业卫生 / 放射卫生 technical-service reports: a signed PDF with its metadata.

A 职业卫生技术服务机构 or 放射卫生技术服务机构 issues its 检测报告, 评价报告 and
个人剂量监测报告 as signed PDF documents. The issuer's system sends one report
per request, in either of two bodies (one unit each, stored raw as received):

- ``multipart/form-data`` with a part ``metadata`` (the JSON object below, or
  one form field per metadata key: ``service_type``, ``employer.uscc``, ...) and
  a part ``pdf`` (the file). The body is read on its own: its first line is the
  boundary, so a stored body can be worked again without its HTTP headers.
  Every part and every metadata key is given once: a second ``pdf`` or
  ``metadata`` part, a key given both by the metadata part and by a form field
  (or by two form fields), and a field name nesting deeper than one dot are
  refused, naming them.
- ``application/json``: the metadata object with the PDF in ``pdf`` as base64.

Metadata (every error names its field, e.g. ``metadata.employer.uscc``)::

    {"report_number": "...", "service_type": "occupational-hazard-testing" (or 职业病危害因素检测),
     "project": "...", "employer": {"name": "...", "uscc": "..."},
     "service_start": "YYYY-MM-DD", "service_end": "YYYY-MM-DD" (optional), "report_date": "YYYY-MM-DD",
     "issuer": {"name": "...", "uscc": "..."}, "qualification_number": "...",
     "status": "final" | "corrected" (optional), "replaces": "<report number>" (corrections), "title": "..."}

The PDF is checked to be a PDF (``%PDF-`` header, ``%%EOF`` in its last
kilobyte, at most ``max_message_bytes``); its SHA-256 and SHA-1 are kept, and
whether it carries a PDF signature dictionary (``/ByteRange`` with ``/Sig``)
is recorded. That signature is **not verified** here: the Bundle the gateway
builds is signed like every other (JWS over the canonical Bundle, which holds
the PDF bytes and their hash), and that is what receivers verify.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gateway.adapters.base import Coded, RawUnit, ReportFacts, SourceMessage
from gateway.adapters.cda import DocumentKey
from gateway.errors import IdentifierError, InputError, Issue
from gateway.identifiers import check_uscc
from gateway.registry.models import TECHNICAL_SERVICE_TYPES

__all__ = ["ServiceReportAdapter", "SERVICE_TYPES", "pack_metadata_file"]

#: Service types (CodeSystem technical-service-type): code -> 中文名称.
SERVICE_TYPES: dict[str, str] = {code: name for code, (name, _) in TECHNICAL_SERVICE_TYPES.items()}
_BY_NAME = {name: code for code, name in SERVICE_TYPES.items()}
_STATUSES = ("final", "corrected", "amended")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TEXT_LIMIT = 500  # characters of one metadata text (a project name is long, not unbounded)
_NUMBER_LIMIT = 64
_META_KEYS = {"report_number", "service_type", "project", "employer", "service_start", "service_end",
              "report_date", "issuer", "qualification_number", "status", "replaces", "title", "pdf", "pdf_file"}
_BOM = b"\xef\xbb\xbf"
_B64_SPACE = re.compile(r"[ \t\r\n]+")  # (FHIR base64Binary allows whitespace; `base64` wraps at 76 characters)
_SIG_DICT = re.compile(rb"/Type\s*/Sig\b|/FT\s*/Sig\b")


def pack_metadata_file(path: Path) -> bytes:
    """The JSON body for a metadata file that names its PDF (``pdf_file``, beside the metadata file).

    :raises InputError: the metadata is not a JSON object, names no PDF, or the PDF cannot be read.
    """
    try:
        meta = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path.name}: not a JSON metadata file ({type(exc).__name__})", "metadata") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path.name}: the metadata must be a JSON object", "metadata")
    name = meta.pop("pdf_file", None)
    if "pdf" not in meta:
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise InputError(f"{path.name}: pdf_file must name the PDF beside the metadata file",
                             "metadata.pdf_file")
        try:
            meta["pdf"] = base64.b64encode((path.parent / name).read_bytes()).decode("ascii")
        except OSError as exc:
            raise InputError(f"{path.name}: the PDF {name} cannot be read ({exc.strerror})",
                             "metadata.pdf_file") from None
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


class ServiceReportAdapter:
    """Reads one technical-service report (metadata + PDF) per unit."""

    format = "service-report"

    def __init__(self, *, member_uscc: str, max_pdf_bytes: int) -> None:
        self.member_uscc = member_uscc
        self.max_pdf_bytes = max_pdf_bytes

    # -- cutting --------------------------------------------------------------------------------

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """The whole body is one report."""
        if data.strip():
            yield RawUnit(bytes(data), 1, origin)

    #: How an answer names what tells a resent report apart, and how a changed one is sent instead.
    document_label = "report_number"
    correction_hint = ("a changed report is sent as a correction: status corrected (or amended), under its own "
                       "number or a new one with replaces naming it")

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """(issuer USCC, report key) as :meth:`document_key` gives them; empty when the metadata does not read
        (such a body is stored without a key, and its reading says what is wrong with it)."""
        key = self.document_key(unit)
        return (key.sender, key.document_id) if key is not None else ("", "")

    def document_key(self, unit: RawUnit) -> DocumentKey | None:
        """What tells a resent report apart: issuer, report key and a digest of the report's content (the
        metadata as read, whatever its wrapper — JSON or multipart, keys in any order, base64 wrapped or not —
        and the PDF's SHA-256). The report key is the report number; a correction (status corrected or amended)
        may keep the number, so its key adds its status and its PDF's digest (the key earlier releases gave it:
        their copies are still found). The pipeline answers the same content as the first copy was answered,
        refuses other content under a key already stored (a conflict) and works a report refused before, fixed
        and sent again, as new. None when the metadata does not read or names no issuer and number."""
        try:
            meta, pdf = _parts(unit.data)
        except (InputError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        issuer = meta.get("issuer")
        uscc = issuer.get("uscc") if isinstance(issuer, Mapping) else None
        number = meta.get("report_number")
        if not isinstance(uscc, str) or not uscc.strip() or not isinstance(number, str) or not number.strip():
            return None
        key = number[:_NUMBER_LIMIT]  # (as earlier releases keyed it, unstripped: their copies are still found)
        status = meta.get("status")
        if isinstance(status, str) and status.strip().lower() in ("corrected", "amended") and pdf:
            key = f"{key}|{status.strip().lower()}|{hashlib.sha256(pdf).hexdigest()[:16]}"
        # ('#' is written %23: the requests carrying one report are stored as key, key#2, key#3 ...)
        key = key.replace("%", "%25").replace("#", "%23") if "#" in key else key
        content = _trimmed({k: v for k, v in meta.items() if k not in ("pdf", "pdf_file")})
        try:
            canonical = json.dumps(content, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            return None
        digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass") + b"\x00"
                                + (hashlib.sha256(pdf).digest() if pdf is not None else b"")).hexdigest()
        return DocumentKey(uscc[:40], key, digest, "metadata.report_number")

    # -- reading --------------------------------------------------------------------------------

    def read(self, unit: RawUnit) -> SourceMessage:
        """Metadata and PDF checked; every problem is an issue naming its field."""
        msg = SourceMessage(format=self.format)
        try:
            meta, pdf = _parts(unit.data)
        except InputError as exc:
            msg.issues.append(Issue("error", "structure", exc.location, exc.message))
            number = exc.meta.get("report_number") if isinstance(exc, _Unreadable) else None
            if isinstance(number, str) and number.strip() and len(number.strip()) <= _NUMBER_LIMIT:
                msg.message_id = number.strip()
                msg.extra["label"] = f"report {msg.message_id}"
            return msg
        unknown = sorted(k for k in meta if k not in _META_KEYS)
        for key in unknown[:5]:
            msg.issues.append(Issue("warning", "not-supported", f"metadata.{key[:40]}", "unknown metadata field, "
                                    "ignored"))
        fields = _Fields(meta, msg.issues)
        number = fields.text("report_number", limit=_NUMBER_LIMIT)
        msg.message_id = number
        msg.extra["label"] = f"report {number}" if number else "(no report number)"
        service = fields.service_type()
        project = fields.text("project")
        employer = fields.party("employer")
        issuer = fields.party("issuer")
        start = fields.date("service_start")
        end = fields.date("service_end", required=False)
        report_date = fields.date("report_date")
        qualification = fields.text("qualification_number", limit=_NUMBER_LIMIT)
        status = fields.choice("status", _STATUSES, default="final")
        replaces = fields.text("replaces", required=False, limit=_NUMBER_LIMIT)
        title = fields.text("title", required=False)
        if start and end and end < start:
            msg.issues.append(Issue("error", "value", "metadata.service_end",
                                    f"the service ends ({end}) before it starts ({start})"))
        if start and report_date and report_date < start:
            msg.issues.append(Issue("error", "value", "metadata.report_date",
                                    f"the report date ({report_date}) is before the service started ({start})"))
        today = _dt.datetime.now(_dt.timezone(_dt.timedelta(hours=8))).date().isoformat()
        if report_date and report_date > today:  # (no member recognises it before then: rule validity-window)
            msg.issues.append(Issue("warning", "value", "metadata.report_date",
                                    f"the report date ({report_date}) is in the future by this gateway's clock "
                                    f"(today {today}): the date or the sending system's clock is wrong; kept as sent"))
        if end and report_date and report_date < end:
            msg.issues.append(Issue("error", "value", "metadata.report_date",
                                    f"the report date ({report_date}) is before the service ended ({end})"))
        if issuer and issuer[1] != self.member_uscc:
            msg.issues.append(Issue("error", "business-rule", "metadata.issuer.uscc",
                                    f"{issuer[1]} is not this gateway's member ({self.member_uscc}): a report is "
                                    "sent and signed by the institution that issued it (谁报告、谁负责)"))
        if replaces and status == "final":
            msg.issues.append(Issue("error", "business-rule", "metadata.replaces",
                                    "only a corrected or amended report replaces another (set status)"))
        pdf_facts = self._pdf(pdf, msg.issues)
        msg.sender = issuer[1] if issuer else ""
        if msg.errors:
            return msg
        assert employer is not None and issuer is not None and pdf_facts is not None
        if status != "final" and not replaces:
            replaces = number  # a correction under the report's own number replaces the version stored before it
        msg.reports.append(ReportFacts(
            location="metadata", number=number, status=status, kind="technical-service", replaces=replaces,
            code=_coded(service), issued_at="", extra={
                "service_type": service, "project": project, "employer_name": employer[0],
                "employer_uscc": employer[1], "issuer_name": issuer[0], "issuer_uscc": issuer[1],
                "service_start": start, "service_end": end, "report_date": report_date,
                "qualification_number": qualification, "title": title or f"{SERVICE_TYPES[service]}报告 {number}",
                **pdf_facts}))
        return msg

    def _pdf(self, pdf: bytes | None, issues: list[Issue]) -> dict[str, Any] | None:
        where = "pdf"
        if pdf is None:
            issues.append(Issue("error", "required", where, "the report's PDF is missing"))
            return None
        if len(pdf) > self.max_pdf_bytes:
            issues.append(Issue("error", "too-costly", where, f"the PDF is {len(pdf)} bytes, more than the "
                                f"{self.max_pdf_bytes} bytes taken (max_message_bytes)"))
            return None
        if not re.match(rb"%PDF-\d\.\d", pdf):
            issues.append(Issue("error", "invalid", where, "not a PDF: it does not start with %PDF-"))
            return None
        if b"%%EOF" not in pdf[-1024:]:
            issues.append(Issue("error", "invalid", where, "the PDF is cut short: no %%EOF in its last kilobyte"))
            return None
        signed = b"/ByteRange" in pdf and _SIG_DICT.search(pdf) is not None
        return {"pdf": pdf, "pdf_size": len(pdf), "pdf_sha256": hashlib.sha256(pdf).hexdigest(),
                "pdf_sha1": base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii"),
                "pdf_signature_dictionary": signed}


def _trimmed(value: Any) -> Any:
    """A metadata value as it is read: its texts without the spaces around them (which reading strips)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Mapping):
        return {str(k): _trimmed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trimmed(v) for v in value]
    return value


def _coded(service: str) -> Coded:
    return Coded(service, SERVICE_TYPES.get(service, ""), "technical-service-type")


class _Fields:
    """Reads metadata fields, recording an issue naming each field that is wrong."""

    def __init__(self, meta: Mapping[str, Any], issues: list[Issue]) -> None:
        self.meta, self.issues = meta, issues

    def _error(self, key: str, code: str, message: str) -> None:
        self.issues.append(Issue("error", code, f"metadata.{key}", message))

    def text(self, key: str, *, required: bool = True, limit: int = _TEXT_LIMIT,
             within: Mapping[str, Any] | None = None, prefix: str = "") -> str:
        source = self.meta if within is None else within
        value = source.get(key)
        name = f"{prefix}{key}"
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                self._error(name, "required", "is missing")
            return ""
        if not isinstance(value, str):
            self._error(name, "value", "must be text")
            return ""
        value = value.strip()
        if len(value) > limit:
            self._error(name, "value", f"is {len(value)} characters, more than {limit}")
            return ""
        if any(not c.isprintable() for c in value):
            self._error(name, "value", "holds control characters")
            return ""
        return value

    def date(self, key: str, *, required: bool = True) -> str:
        value = self.text(key, required=required, limit=_NUMBER_LIMIT)  # (a longer text is not a date either)
        if not value:
            return ""
        try:
            if not _DATE.match(value):
                raise ValueError
            _dt.date.fromisoformat(value)
        except ValueError:
            self._error(key, "value", f"{value!r} is not a date (YYYY-MM-DD)")
            return ""
        return value

    def choice(self, key: str, allowed: tuple[str, ...], *, default: str) -> str:
        value = self.text(key, required=False, limit=20) or default
        if value not in allowed:
            self._error(key, "code-invalid", f"{value!r} is not one of {', '.join(allowed)}")
            return default
        return value

    def service_type(self) -> str:
        value = self.text("service_type", limit=60)
        if not value:
            return ""
        code = value if value in SERVICE_TYPES else _BY_NAME.get(value.removesuffix("报告"), "")
        if not code:
            self._error("service_type", "code-invalid", f"{value!r} is not a technical-service type (one of "
                        f"{', '.join(SERVICE_TYPES)}, or its Chinese name)")
        return code

    def party(self, key: str) -> tuple[str, str] | None:
        value = self.meta.get(key)
        if value is None:
            self._error(key, "required", "is missing (an object with name and uscc)")
            return None
        if not isinstance(value, Mapping):
            self._error(key, "value", "must be an object with name and uscc")
            return None
        name = self.text("name", within=value, prefix=f"{key}.")
        uscc = self.text("uscc", within=value, prefix=f"{key}.", limit=18)
        if uscc:
            try:
                uscc = check_uscc(uscc)
            except IdentifierError as exc:
                self._error(f"{key}.uscc", "value", exc.message)
                return None
        return (name, uscc) if name and uscc else None


def _parts(data: bytes) -> tuple[dict[str, Any], bytes | None]:
    """(metadata, PDF bytes or None) of a JSON or multipart body.

    :raises InputError: the body is neither, or its metadata is not an object.
    """
    data = data.removeprefix(_BOM)  # (Windows Notepad saves UTF-8 with a BOM)
    head = data.lstrip()[:2]
    if head.startswith(b"{"):
        return _json_body(data)
    if head == b"--":
        return _multipart_body(data)
    raise InputError("the body is neither a JSON object nor multipart/form-data (its first line must be the "
                     "boundary)", "body")


def _json_body(data: bytes) -> tuple[dict[str, Any], bytes | None]:
    meta = _load_metadata(data, "the metadata")
    if not isinstance(meta, dict):
        raise InputError("the metadata must be a JSON object", "metadata")
    encoded = meta.get("pdf")
    if encoded is None:
        return meta, None
    if not isinstance(encoded, str):
        raise InputError("pdf must be the PDF as base64 text", "pdf")
    try:
        return meta, base64.b64decode(_B64_SPACE.sub("", encoded), validate=True)
    except (binascii.Error, ValueError):
        raise _Unreadable("pdf is not valid base64", "pdf", meta) from None


_DISPOSITION_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)


def _multipart_body(data: bytes) -> tuple[dict[str, Any], bytes | None]:
    start = data.index(b"--")
    line_end = data.find(b"\n", start)
    if line_end < 0:
        raise InputError("the multipart body has no parts", "body")
    boundary = data[start:line_end].rstrip(b"\r")
    if len(boundary) < 3 or len(boundary) > 72 or b" " in boundary.strip():
        raise InputError("the multipart boundary line is malformed", "body")
    meta: dict[str, Any] = {}
    given: dict[tuple[str, ...], str] = {}  # metadata key (an object's key after it) -> the part that gave it
    pdf: bytes | None = None
    pdf_part = metadata_part = 0
    for n, chunk in enumerate(data[line_end + 1:].split(b"\r\n" + boundary), start=1):
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        chunk = chunk.removeprefix(b"\r\n") if n > 1 else chunk
        head, sep, body = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InputError(f"part {n} of the multipart body has no header end", f"body part {n}")
        found = _DISPOSITION_NAME.search(head)
        name = found.group(1).decode("utf-8", "replace") if found else ""
        if name == "pdf":
            if pdf_part:
                raise InputError(f"parts {pdf_part} and {n} of the multipart body are both named pdf: send one PDF "
                                 "per report", "pdf")
            pdf_part, pdf = n, body
        elif name == "metadata":
            if metadata_part:
                raise InputError(f"parts {metadata_part} and {n} of the multipart body are both named metadata: "
                                 "send the metadata once", "metadata")
            metadata_part = n
            loaded = _load_metadata(body, "the metadata part")
            if not isinstance(loaded, dict):
                raise InputError("the metadata part must be a JSON object", "metadata")
            if "pdf" in loaded:
                raise InputError("a multipart body carries its PDF as the part named pdf, not as metadata.pdf",
                                 "metadata.pdf")
            for key, value in loaded.items():
                _give(meta, given, (key,), value, f"the metadata part (part {n})")
        elif name:
            shown_name = name[:40]
            path = tuple(name.split("."))
            if len(path) > 2 or not all(path):
                raise InputError(f"form field {shown_name} is not a metadata key: a field is named by the key, or "
                                 "by an object and its key with one dot (employer.uscc)", f"metadata.{shown_name}")
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"form field {shown_name} is not UTF-8", f"metadata.{shown_name}") from None
            _give(meta, given, path, text, f"form field {shown_name} (part {n})")
        else:
            raise InputError(f"part {n} of the multipart body has no name", f"body part {n}")
    if not meta and not metadata_part:
        raise InputError("the multipart body has no metadata (a part named metadata, or form fields)", "metadata")
    return meta, pdf


def _give(meta: dict[str, Any], given: dict[tuple[str, ...], str], path: tuple[str, ...], value: Any,
          origin: str) -> None:
    """Put one metadata value given by a multipart part at ``path`` (a key, or an object and its key).

    :raises InputError: the key, the object holding it or a key within it was given already by another part.
    """
    clash = next((k for k in given if k[:len(path)] == path or path[:len(k)] == k), None)
    if clash is not None:
        raise InputError(f"metadata.{'.'.join(clash)[:81]} is given twice: by {given[clash]} and by {origin}",
                         f"metadata.{'.'.join(path)[:81]}")
    given[path] = origin
    if len(path) == 1:
        meta[path[0]] = value
    else:
        meta.setdefault(path[0], {})[path[1]] = value


class _Unreadable(InputError):
    """A body whose metadata reads but whose PDF does not: the metadata names the report in the answer."""

    def __init__(self, message: str, location: str, meta: Mapping[str, Any]) -> None:
        super().__init__(message, location)
        self.meta = meta


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Duplicate(key)
        obj[key] = value
    return obj


def _load_metadata(data: bytes, what: str) -> Any:
    """The JSON value of ``data``.

    :raises InputError: not UTF-8, not JSON, nested too deeply, or a key given twice in one object.
    """
    try:
        return json.loads(data.removeprefix(_BOM).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as dup:
        raise InputError(f"{what} gives the key {dup.key[:40]} twice in one object", "metadata") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{what} is not JSON in UTF-8 ({type(exc).__name__})", "metadata") from None
    except RecursionError:
        raise InputError(f"{what} nests too deeply", "metadata") from None
