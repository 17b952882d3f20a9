"""Adapter records: the neutral, FHIR-free facts every adapter yields.

An adapter knows one source syntax (HL7 v2, CDA, a CSV layout) and nothing of
FHIR or HTTP. It turns one *unit* of input (an HL7 message, a CDA document, the
rows of one exam) into a :class:`SourceMessage` holding patients, reports and
results as plain strings and parsed primitives, plus every :class:`Issue` found
on the way, each located in source terms (``OBX[3]-5``, an XPath, a column).

The mapping stage (``gateway.mapping``) turns local codes, units and flags into
standard ones; the FHIR builders (``gateway.fhir``) turn the result into a Bundle.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from gateway.errors import Issue, shown

__all__ = [
    "FULL_WIDTH",
    "Coded",
    "Quantity",
    "PatientFacts",
    "SpecimenFacts",
    "ResultFacts",
    "ReportFacts",
    "SourceMessage",
    "RawUnit",
    "Adapter",
    "parse_number",
    "number_problem",
    "parse_reference_range",
    "reversed_range",
    "warn_of_repeated_items",
    "COMPARATORS",
    "MAX_TEXT_BYTES",
    "text_too_long",
]

#: Comparator spellings labs use before a number, to FHIR Quantity.comparator.
COMPARATORS = {"≤": "<=", "≥": ">=", "<": "<", ">": ">", "<=": "<=", ">=": ">="}
#: The most one free-text field (a comment, a text result, a CSV cell) may hold, in bytes of UTF-8.
MAX_TEXT_BYTES = 65_536
_LABEL_CHARS = 80  # how much of a unit's id its label (in answers and error lines) shows
_NUMBER = re.compile(r"^\s*(?:(<=|>=|<|>|≤|≥)\s*)?([+-]?(?:\d+(?:\.\d*)?|\.\d+))([eE][+-]?\d{1,4})?\s*$",
                     re.ASCII)  # (digits are 0-9: \d would take ٣ or ১২ for a number; full-width ones are made ASCII)
# (one way to match: linear)
#: Full-width forms of ASCII (U+FF01 to U+FF5E) and the ideographic space, as their ASCII characters: only those
#: (NFKC would also make 10² the number 102). ``text.translate(FULL_WIDTH)``.
FULL_WIDTH = {**{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}, 0x3000: 0x20}


#: :func:`parse_number`, :func:`parse_reference_range` and :func:`reversed_range` remember what a text of up to
#: _READ_LONGEST characters read as (a lab sends the same values and ranges again and again: each is read once), the
#: _READ_MAX latest of each (``functools.lru_cache``, as ``gateway.fhir.search.date_range``).
_READ_MAX = 4096
_READ_LONGEST = 40


def parse_number(text: str) -> "Quantity | None":
    """A decimal with its precision and optional comparator (``<0.5``, ``≥ 10``, ``5.60``); None if not a number.

    Scientific notation, as analysers write large counts (HBV-DNA ``1.23E+05``) and HL7 v3 REAL allows, is taken
    as the decimal it names (``123000``, ``8.2E-1`` as ``0.82``; the trailing zeros of a large one then read as
    significant). A number beyond the range of an IEEE 754 double, or so small that a double holds it as 0, is not
    taken either: a signed Bundle carries its numbers as doubles (RFC 8785), so it could not be signed as sent.

    Each call gives a :class:`Quantity` of its own (what was read is remembered, the object is not).
    """
    found = _remembered_number(text) if len(text) <= _READ_LONGEST else _read_number(text)
    return None if found is None else Quantity(found[0], found[1])


def _read_number(text: str) -> tuple[Decimal, str] | None:
    """(value, FHIR comparator) of :func:`parse_number`, read from the text."""
    if not text.isascii():  # full-width digits, point and signs as a Chinese input method types them: ６．８, ＜０．５
        text = text.translate(FULL_WIDTH)
    m = _NUMBER.match(text)
    if not m:
        return None
    try:
        value = Decimal(m.group(2).lstrip("+") + (m.group(3) or ""))
    except InvalidOperation:
        return None
    as_double = float(value)
    if not math.isfinite(as_double) or (as_double == 0 and value != 0):  # (1E-400 would be signed as 0)
        return None
    if m.group(3):
        value = Decimal(format(value, "f"))
    return value, COMPARATORS.get(m.group(1) or "", "")


_remembered_number = functools.lru_cache(maxsize=_READ_MAX)(_read_number)


#: A run of bytes past ASCII, and Chinese characters in a row (:func:`gbk_run`).
_HIGH_RUN = re.compile(rb"[\x80-\xff]{4,}")
_CJK_RUN = re.compile(r"[\u3400-\u9fff]{2,}")


def gbk_run(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the first run of bytes past ASCII that reads in GB 18030 (GBK, GB2312) as two Chinese
    characters or more in a row; None when none does. What tells GBK text under a single-byte declaration (ISO
    8859-1 decodes any byte): Latin-1 text has its accented letters alone or in pairs between ASCII ones, a GBK name
    or item is such a run. A single Chinese character is not told apart."""
    for run in _HIGH_RUN.finditer(data):
        try:
            chinese = run.group().decode("gb18030")
        except UnicodeDecodeError:
            continue
        if _CJK_RUN.search(chinese):
            return run.start(), run.end()
    return None


_RANGE_NUMBER = r"([+-]?\d+(?:\.\d+)?)"
_RANGE = re.compile(rf"^\s*{_RANGE_NUMBER}\s*(?:-|~|～|—|–|－)\s*{_RANGE_NUMBER}\s*$")
#: ``3.5--5.5``: two hyphens between the bounds, read so only when one (the second bound negative) gives no range
_RANGE_TWO_HYPHENS = re.compile(rf"^\s*{_RANGE_NUMBER}\s*--\s*(\d+(?:\.\d+)?)\s*$")
_UPPER = re.compile(rf"^\s*(?:<=?|≤|＜)\s*{_RANGE_NUMBER}\s*$")
_LOWER = re.compile(rf"^\s*(?:>=?|≥|＞)\s*{_RANGE_NUMBER}\s*$")


def parse_reference_range(text: str) -> tuple[Decimal | None, Decimal | None]:
    """(low, high) from a range as labs write it: ``3.5-5.5``, ``3.5~5.5``, ``3.9－6.1``, ``<5``, ``>10``. A range
    whose low lies above its high (``6.1-3.9``) gives neither: it is kept as text (FHIR's rng-2)."""
    return _remembered_range(text) if len(text) <= _READ_LONGEST else _read_range(text)


def _bounds(text: str) -> tuple[Decimal, Decimal] | None:
    """The two bounds of ``low-high`` as written: a hyphen before the second bound is its sign when the first
    is not above it (``-3--1`` is -3 to -1, a base excess; it was read -3 to 1), else the two hyphens part them
    (``3.5--5.5``)."""
    m = _RANGE.match(text)
    if m:
        low, high = Decimal(m.group(1)), Decimal(m.group(2))
        if low <= high:
            return low, high
    m2 = _RANGE_TWO_HYPHENS.match(text)
    if m2:
        return Decimal(m2.group(1)), Decimal(m2.group(2))
    return (Decimal(m.group(1)), Decimal(m.group(2))) if m else None


def _read_range(text: str) -> tuple[Decimal | None, Decimal | None]:
    bounds = _bounds(text)
    if bounds is not None:
        low, high = bounds
        return (low, high) if low <= high else (None, None)
    m = _UPPER.match(text)
    if m:
        return None, Decimal(m.group(1))
    m = _LOWER.match(text)
    if m:
        return Decimal(m.group(1)), None
    return None, None


def reversed_range(text: str) -> bool:
    """Whether a reference range names its low above its high (``6.1-3.9``)."""
    return _remembered_reversed(text) if len(text) <= _READ_LONGEST else _read_reversed(text)


def _read_reversed(text: str) -> bool:
    bounds = _bounds(text)
    return bounds is not None and bounds[0] > bounds[1]


_remembered_range = functools.lru_cache(maxsize=_READ_MAX)(_read_range)
_remembered_reversed = functools.lru_cache(maxsize=_READ_MAX)(_read_reversed)


def _said(res: "ResultFacts") -> str:
    value = res.value
    text = f"{value.comparator}{value.value}" if isinstance(value, Quantity) else str(
        value if value is not None else "")
    return f"{text} {res.unit}".strip()


def warn_of_repeated_items(results: "list[ResultFacts]", issues: "list[Issue]") -> None:
    """An item reported twice in one report: both results are kept, and said (a mistyped item code, a row pasted
    twice, or a re-test the sender should send as a correction), where the second was read."""
    first: dict[tuple[str, str], ResultFacts] = {}
    for res in results:
        earlier = first.setdefault((res.code.system, res.code.code), res)
        if earlier is res:
            continue
        where = earlier.where.get("value") or earlier.location
        if _said(earlier) != _said(res):
            what = f"with another result ({shown(_said(res))} here, {shown(_said(earlier))} at {where})"
        else:
            what = f"with the same result as at {where}"
        issues.append(Issue("warning", "value", res.where.get("value") or res.location,
                            f"item {shown(res.code.code)} is reported again in this report {what}: both are kept",
                            "102"))


def text_too_long(text: str) -> bool:
    """Whether ``text`` is more than :data:`MAX_TEXT_BYTES` bytes of UTF-8 (counted only when it may be)."""
    return len(text) > MAX_TEXT_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES


def number_problem(text: str) -> str:
    """Why :func:`parse_number` did not take ``text``: not a number at all, or one too large to carry."""
    if not text.isascii():
        text = text.translate(FULL_WIDTH)
    return "is beyond the range of a number (±1.7e308)" if _NUMBER.match(text) else "is not a number"


@dataclass
class Coded:
    """A code as the source sent it. ``system`` is a source-side name (HL7 coding system, OID) or empty."""

    code: str = ""
    display: str = ""
    system: str = ""

    def __bool__(self) -> bool:
        return bool(self.code or self.display)


@dataclass
class Quantity:
    """A parsed number with an optional comparator (``<``, ``<=``, ``>=``, ``>``)."""

    value: Decimal
    comparator: str = ""


@dataclass
class PatientFacts:
    """Who the results are about."""

    id_card: str = ""  # 身份证号, already GB 11643 checked
    other_ids: list[tuple[str, str]] = field(default_factory=list)  # (v2-0203 type code, value)
    name: str = ""
    family: str = ""
    given: str = ""
    birth_date: str = ""  # FHIR date
    sex: str = ""  # FHIR administrative gender
    location: str = ""
    where: dict[str, str] = field(default_factory=dict)  # locations of single facts ("sex": an XPath, a column)


@dataclass
class SpecimenFacts:
    """The sample the results were measured on."""

    number: str = ""
    type: Coded = field(default_factory=Coded)
    collected_at: str = ""  # FHIR dateTime
    received_at: str = ""


@dataclass
class ResultFacts:
    """One measured or observed item (an OBX, a CDA entry, a CSV row)."""

    location: str  # where it came from, e.g. "OBX[3]"
    code: Coded
    value_kind: str = ""  # quantity | string | coded | range | ratio | datetime | "" (absent)
    value: Any = None  # Quantity | str | Coded | (Quantity, Quantity) | str (dateTime)
    unit: str = ""  # unit as sent
    reference_range: str = ""  # as sent, e.g. "3.5-5.5"
    flags: list[str] = field(default_factory=list)  # abnormal flags as sent
    status: str = ""  # source status code as sent (OBX-11 F/C/P/...)
    observed_at: str = ""  # FHIR dateTime, if the item has its own time
    notes: list[str] = field(default_factory=list)
    absent: str = ""  # why there is no value, as FHIR's data-absent-reason code, when the source said (nullFlavor)
    occurrence: int = 1  # nth result with this code in its report: keeps resource ids stable
    # Locations of single facts ("code", "value", "unit", "flags", "status") for formats whose
    # locations are not "<segment>-<field>" (an XPath, "row 3 column 结果"); empty for HL7 v2.
    where: dict[str, str] = field(default_factory=dict)
    std: dict[str, Any] = field(default_factory=dict)  # filled by the mapping stage


@dataclass
class ReportFacts:
    """One report (an OBR group, a CDA document, one exam)."""

    location: str
    number: str = ""  # 检验报告单号 / filler order number / 体检编号
    placer_number: str = ""
    code: Coded = field(default_factory=Coded)
    status: str = ""  # source status as sent
    collected_at: str = ""
    issued_at: str = ""  # FHIR instant
    interpreter_id: str = ""  # 审核医师 / 主检医师
    interpreter_name: str = ""
    reading_org: str = ""  # 统一社会信用代码 of the institution that read the exam, when another than the issuer
    specimen: SpecimenFacts | None = None
    results: list[ResultFacts] = field(default_factory=list)
    kind: str = "lab"  # lab | occupational-health
    replaces: str = ""  # number of the report this one corrects
    replaces_system: str = ""  # OID of the identifier in ``replaces`` when it is not a 检验报告单号 (CDA: document id)
    # Business key of this report version for resource ids when the number alone does not tell versions
    # apart (a CDA correction keeps its 检验报告单号 but is a new document); empty: the number.
    key: str = ""
    other_ids: list[tuple[str, str]] = field(default_factory=list)  # (source OID, value), e.g. the CDA document id
    conclusion: str = ""  # diagnostic conclusion as sent: kept apart from the results, never recognised
    conclusion_codes: list[Coded] = field(default_factory=list)  # e.g. ICD-10 diagnoses of a CDA 诊断记录 section
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific facts (exam type, hazard factors, ...)
    std: dict[str, Any] = field(default_factory=dict)  # filled by the mapping stage
    # where the report's times were read, as the sender's format names places ("issued", "collected", "received");
    # the HL7 v2 fields of ``location`` (OBR-22, -7, -14) where a time is not named
    where: dict[str, str] = field(default_factory=dict)
    issued_day_only: bool = False  # ``issued_at`` is the first moment of a day sent without a time of day


@dataclass
class SourceMessage:
    """Everything one unit of input said, plus the issues found reading it.

    ``message_id`` and ``sender`` identify the unit for duplicate detection and
    for error lines (``MSH-10 ORU0042: ...``). ``filtered`` holds the reason
    when the unit is not patient data (QC, calibration) and must not be mapped.
    """

    format: str
    message_id: str = ""
    sender: str = ""
    sent_at: str = ""
    version: str = ""
    charset: str = ""
    message_type: str = ""
    patient: PatientFacts | None = None
    reports: list[ReportFacts] = field(default_factory=list)
    filtered: str = ""
    issues: list[Issue] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)  # what an answer (ACK) needs to echo
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Issue]:
        """Issues that refuse the unit."""
        return [i for i in self.issues if i.severity == "error"]

    def label(self) -> str:
        """How error lines name this unit, e.g. ``MSH-10 ORU0042``; an id as long as no id is, is cut."""
        label = str(self.extra.get("label", self.message_id) or "(no id)")
        return label if len(label) <= _LABEL_CHARS else f"{label[:_LABEL_CHARS]}… ({len(label)} characters)"


@dataclass
class RawUnit:
    """One unit of raw input cut from a file or stream, before decoding."""

    data: bytes
    index: int  # 1-based position in its file or stream
    origin: str = ""  # file name, peer address
    meta: dict[str, Any] = field(default_factory=dict)  # what the splitter learnt (CSV: first row, encoding)


class Adapter(Protocol):
    """What every adapter offers the pipeline."""

    format: str

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """Cut a file or request body into units (messages, documents, exams)."""

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """(sender, unit id) read cheaply, for storing the raw unit before parsing; empty if unknown."""

    def read(self, unit: RawUnit) -> SourceMessage:
        """Decode and parse one unit; never raises for bad input, records issues instead."""
