"""CSV adapter: occupational-health exam exports (职业健康检查) in, one neutral record per exam out.

Syntax only, driven by the column layouts in ``mappings/csv/*.yaml`` (one file
per layout, ``format: cdc-csv``): which header names which fact. The layout of
a file is the one whose headers all appear in its first row, so a CDC or
hospital whose system writes other headers needs a new table, not new code.

Reading rules:

- One row per exam item; **rows sharing an exam number (体检编号) form one
  exam and must be contiguous** — exports are written exam by exam. A number
  that reappears after other exams is refused (its earlier rows were already
  taken as a complete exam) and reported with its rows.
- UTF-8 with or without BOM, or GBK/GB18030: decided from the header row,
  which always holds Chinese text; a row that does not decode is an error of
  its exam only.
- The file is read as a stream, exam by exam: memory does not grow with the
  number of rows. It grows only by one small hash per exam number, kept to
  detect a number that reappears; an exam is limited to ``max_exam_rows``
  rows and ``max_exam_bytes`` bytes (the gateway's ``max_message_bytes``): the
  rows past either limit are counted, not held, and the exam is refused naming
  the row where it went over. One cell holds at most 64 KiB.
- A cell holding a control character (below 0x20 but tab, CR and LF) is
  refused: no report may carry one.
- Exam-level columns (patient, employer, exam type, conclusion, dates) are
  taken from the exam's first row; a later row that says something else is an
  error, an empty cell in a later row is not.

Every problem is an :class:`~gateway.errors.Issue` located as ``row 3 column
身份证号`` (row 1 is the header, as a spreadsheet numbers rows); other exams of
the file are still read. That holds for the problems the profile check finds
on the converted report as well: :meth:`LabCSVAdapter.explain` traces each one
back to the row and column its element was built from (a sex that disagrees
with the 身份证号 is ``row 3 column 性别``), never answering with a FHIR path.

Several hazard factors in one cell are cut at the layout's separators, except
inside brackets (``麻尘（亚麻、黄麻和苎麻）`` is one name) and where a factor name
the hazard table knows holds a separator itself (``磷化氢、磷化锌、磷化铝``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import operator
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import IO, Any

from gateway.adapters.base import (
    FULL_WIDTH,
    Coded,
    PatientFacts,
    RawUnit,
    ReportFacts,
    ResultFacts,
    MAX_TEXT_BYTES,
    SourceMessage,
    number_problem,
    parse_number,
    text_too_long,
    warn_of_repeated_items,
)
from gateway.datetimes import DateTimeError, to_fhir_date, to_fhir_datetime, to_fhir_instant
from gateway.adapters.streams import Rejoined
from gateway.adapters.tracing import INDEX, INVARIANT
from gateway.errors import ConfigError, IdentifierError, Issue, shown
from gateway.identifiers import (
    birth_date_problem,
    check_id_card,
    check_uscc,
    id_card_birth_date,
    id_card_sex,
    id_card_warnings,
    message_date,
)
from gateway.mapping.tables import factor_key, fold_brackets

__all__ = ["Layout", "LabCSVAdapter", "parse_exposure_years"]

_BOM = b"\xef\xbb\xbf"
# Bytes no cell may hold: control characters but tab, CR and LF (GBK, GB18030 and UTF-8 never use them inside
# a multi-byte character, so the raw row is searched before decoding).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_SKIP_CHUNK = 65_536  # how much of an over-long row is read at a time to skip it
# years (6.5, 6年), years and months (3年6个月: the 年 is needed then) or months (8个月); each number read one way
_NOTE = re.compile(r"\s*[(（][^()（）]*[)）]\s*$")  # a note in brackets after a column's name
_YEARS = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(?:(?:年|岁)\s*(?:(\d+)\s*(?:个月|月))?)?|(\d+)\s*(?:个月|月))\s*$",
                    re.ASCII)  # (digits 0-9; full-width ones are made ASCII first, others are no digits here)
_YEARS_CHARS = 32  # no number of years and months is longer
_REQUIRED_FACTS = ("exam_number", "name", "id_card", "exam_type", "exam_date", "item_code", "value", "conclusion",
                   "report_date")
# Facts of the exam as a whole: read from its first row; later rows may leave them empty but not contradict them.
_EXAM_FACTS = ("name", "id_card", "sex", "birth_date", "employer_name", "employer_uscc", "occupation",
               "exposure_years", "exam_type", "exam_date", "conclusion", "chief_physician", "chief_physician_id",
               "report_date")
_DATE_FACTS = ("exam_date", "report_date", "birth_date")  # (read as dates: their spelling is form, not content)
_PRIVATE = {"name", "id_card", "birth_date"}  # never echoed in error lines
_ITEM_FACTS = ("item_code", "item_name", "value", "unit", "reference_range", "flag")  # one row's own columns

# Which facts (the layout's columns) each element of the converted exam report is built from, so that a problem
# the profile check finds on it is answered as the exam's row and column. Per resource type: element paths
# (without indices and [x]; the first prefix that matches wins) -> facts and what the element is, for the text.
_Rule = tuple[tuple[str, ...], str]
_ELEMENT_FACTS: dict[str, list[tuple[str, _Rule]]] = {
    "Patient": [
        ("identifier", (("id_card",), "the 身份证号")),
        ("name", (("name",), "the worker's name")),
        ("birthDate", (("birth_date", "id_card"), "the date of birth")),
        ("gender", (("sex", "id_card"), "the sex")),
    ],
    "Observation": [
        ("valueQuantity.unit", (("unit",), "the unit")),
        ("valueQuantity.code", (("unit",), "the unit")),
        ("valueQuantity.system", (("unit",), "the unit")),
        ("value", (("value", "unit"), "the result")),
        ("dataAbsentReason", (("value",), "the result")),
        ("code", (("item_code", "item_name"), "the exam item code")),
        ("referenceRange", (("reference_range",), "the reference range")),
        ("interpretation", (("flag",), "the abnormal flag")),
        ("effective", (("exam_date",), "the exam date")),
        ("issued", (("report_date",), "the report date")),
        ("status", (("value",), "the result status")),
    ],
    "DiagnosticReport": [
        ("effective", (("exam_date",), "the exam date")),
        ("issued", (("report_date",), "the report date")),
        ("identifier", (("exam_number",), "the exam number")),
        ("conclusion", (("conclusion",), "the conclusion (主检结论)")),
        ("resultsInterpreter", (("chief_physician", "chief_physician_id"), "the chief examining physician")),
        ("result", (("item_code",), "the exam items")),
    ],
    "Bundle": [("timestamp", (("report_date",), "the report date"))],
    "Employer": [
        ("identifier", (("employer_uscc",), "the employer's 统一社会信用代码")),
        ("name", (("employer_name",), "the employer's name")),
    ],
}
#: Extensions of the exam report, by the last part of their URL.
_EXTENSION_FACTS: dict[str, _Rule] = {
    "exam-type": (("exam_type",), "the exam type"),
    "hazard-factor": (("hazard_name", "hazard_code"), "the hazard factor"),
    "exposure-years": (("exposure_years",), "the years of exposure"),
    "occupation": (("occupation",), "the occupation"),
    "employer": (("employer_uscc", "employer_name"), "the employer"),
}
#: Profile rules (constraint keys) that concern a whole resource or extension.
_INVARIANT_FACTS: dict[str, _Rule] = {
    "cyhr-pat-1": (("id_card",), "the 身份证号 (17 digits and a GB 11643 check character)"),
    "cyhr-pat-2": (("id_card",), "the date of birth inside the 身份证号"),
    "cyhr-pat-3": (("birth_date", "id_card"), "a date of birth agreeing with the 身份证号"),
    "cyhr-pat-4": (("sex", "id_card"), "a sex agreeing with digit 17 of the 身份证号"),
    "cyhr-pat-5": (("id_card",), "the 身份证号"),
    "cyhr-pat-6": (("name",), "the worker's name"),
    "cyhr-obs-1": (("item_code",), "the exam item code"),
    "cyhr-obs-2": (("value",), "a result"),
    "cyhr-haz-1": (("hazard_name", "hazard_code"), "a hazard factor with its exposure category"),
    "cyhr-expo-1": (("exposure_years",), "years of exposure that are not negative"),
    "cyhr-org-1": (("employer_uscc",), "the employer's 统一社会信用代码"),
    "cyhr-bdl-2": (("id_card", "name"), "exactly one worker"),
    "cyhr-bdl-3": (("item_code",), "at least one exam report"),
}
#: When no element or rule matches: the facts of the whole resource.
_RESOURCE_FACTS: dict[str, _Rule] = {
    "Patient": (("id_card", "sex", "birth_date", "name"), "the worker"),
    "Observation": (("value", "unit", "item_code"), "the exam item"),
    "DiagnosticReport": (("report_date", "exam_date", "conclusion"), "the exam report"),
    "Employer": (("employer_uscc", "employer_name"), "the employer"),
}
_ENTRY_PATH = re.compile(r"^Bundle\.entry\[(\d+)\]\.resource(?:\.(.*))?$")
_EXTENSION_AT = re.compile(r"^extension\[(\d+)\]")
# FHIR element paths in a problem's text: "(Patient.identifier:idCard)" is cut, "Observation.value[x]" becomes "value".
_PATH_IN_BRACKETS = re.compile(r"\s*\((?:Bundle|[A-Z][A-Za-z]+)\.[^)]*\)")
_PATH = re.compile(r"\b(?:Bundle|[A-Z][A-Za-z]+)((?:\.[A-Za-z][A-Za-z0-9]*(?:\[[^\]]*\])?(?::[A-Za-z0-9_-]+)?)+)")


def parse_exposure_years(text: str) -> Decimal:
    """接害工龄 in years: ``6.5``, ``6``, ``6年``, ``3年6个月``, ``8个月`` (months as twelfths, two decimals).

    :raises ValueError: not a number of years and months, or months of 12 or more.
    """
    if not text.isascii():
        text = text.translate(FULL_WIDTH)
    m = _YEARS.match(text) if len(text) <= _YEARS_CHARS else None
    if not m:
        raise ValueError(f"{shown(text)} is not a number of years (e.g. 6.5, 6年, 3年6个月)")
    years = Decimal(m.group(1) or "0")
    months = int(m.group(2) or m.group(3) or 0)
    if months >= 12:
        raise ValueError(f"{shown(text)} has {months} months; write 12 months or more as years")
    if not months:
        return years
    return (years + Decimal(months) / Decimal(12)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Layout:
    """One CSV layout (``mappings/csv/<name>.yaml``): which header holds which fact."""

    id: str
    columns: dict[str, str]
    separators: tuple[str, ...]
    hazard_code_system: str
    report_code: Coded
    description: str = ""

    @classmethod
    def from_structure(cls, structure: dict[str, Any]) -> "Layout":
        """:raises ConfigError: a required fact has no column, or the report code is missing."""
        where = str(structure.get("_path", structure.get("id", "")))
        columns = {str(k): str(v).strip() for k, v in (structure.get("columns") or {}).items()}
        missing = [f for f in _REQUIRED_FACTS if f not in columns]
        if missing:
            raise ConfigError(f"CSV layout {where} names no column for: {', '.join(missing)}", where)
        if len(set(columns.values())) != len(columns):
            raise ConfigError(f"CSV layout {where} names one header for two facts", where)
        code = structure.get("report_code") or {}
        if not code.get("code"):
            raise ConfigError(f"CSV layout {where} needs report_code: {{code, display}}", where)
        return cls(str(structure["id"]), columns, tuple(structure.get("list_separators", ["、", ";", "；"])),
                   str(structure.get("hazard_code_system", "")), Coded(str(code["code"]), str(code.get("display", ""))),
                   str(structure.get("description", "")))


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class LabCSVAdapter:
    """Reads occupational-health exam exports in any of the given layouts."""

    format = "cdc-csv"

    def __init__(self, layouts: list[dict[str, Any]], *, default_offset: str = "+08:00",
                 max_exam_rows: int = 2000, max_exam_bytes: int = 1_048_576, factor_names: Iterable[str] = ()) -> None:
        """``max_exam_bytes``: the most the rows of one exam (and so any one row) may take. ``factor_names``:
        the hazard-factor names the mapping knows; one that holds a layout's separator is never cut apart.

        :raises ConfigError: a layout is incomplete.
        """
        self.layouts = [Layout.from_structure(s) for s in layouts]
        self.offset = default_offset
        self.max_exam_rows = max_exam_rows
        self.max_exam_bytes = max_exam_bytes
        names = list(dict.fromkeys(factor_names))
        self._whole_names = {lay.id: _name_guard(names, _separators(lay)) for lay in self.layouts}

    # -- cutting -------------------------------------------------------------------------

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """Exams of a whole file or request body (see :meth:`split_stream`)."""
        yield from self.split_stream(io.BytesIO(data), origin, whole=data)

    def split_stream(self, stream: IO[bytes], origin: str = "", *, whole: bytes | None = None) -> Iterator[RawUnit]:
        """Exams of a binary stream, one unit per run of rows with the same exam number, read lazily."""
        header_raw = stream.readline(_SKIP_CHUNK)
        if b"\n" not in header_raw and b"\r" in header_raw:
            # Lines ended by CR alone (Excel's "CSV (Macintosh)"): read as LF, as a CSV reader opened with newline=""
            # reads them. No byte of a GBK, GB18030 or UTF-8 character is a CR; a CR inside a quoted cell is a line
            # break either way.
            stream = io.BufferedReader(Rejoined(header_raw, stream, _cr_as_lf))
            whole = whole.replace(b"\r", b"\n") if whole is not None else None
            header_raw = stream.readline(_SKIP_CHUNK)
        if not header_raw.endswith(b"\n") and len(header_raw) >= _SKIP_CHUNK:
            yield RawUnit(header_raw[:256], 1, origin, meta={"label": "header", "error": Issue(
                "error", "too-long", "row 1", f"the header row is longer than {_SKIP_CHUNK} bytes", "207")})
            return
        settled: list[str] | None = None  # (the header is plain ASCII: the first row past it says, _records)
        if header_raw.startswith(_BOM):
            header_raw, codec = header_raw[len(_BOM):], "utf-8"
        else:
            codec = "utf-8"
            try:
                header_raw.decode("utf-8")
            except UnicodeDecodeError:
                codec = "gb18030"
            if header_raw.isascii():
                settled = [codec]
        if not header_raw.strip():
            return
        header_fields, unreadable = _row(header_raw.decode(codec, errors="replace"))
        if unreadable:
            refusal = Issue("error", "structure", "row 1", f"the header {unreadable}", "100")
            yield RawUnit(whole if whole is not None else header_raw[:256], 1, origin,
                          meta={"label": "header", "error": refusal})
            return
        headers = [h.translate(_INVISIBLE).strip() for h in header_fields]
        named = self._names(headers)  # (接害工龄（年） is the layout's 接害工龄)
        layout, problem = self._layout(named)
        if layout is None and problem is not None and problem.code == "not-supported":
            problem = _header_trouble(header_raw, headers) or problem
        if layout is None:
            yield RawUnit(whole if whole is not None else header_raw, 1, origin,
                          meta={"error": problem, "label": "header"})
            return
        index = {h: i for i, h in enumerate(named)}
        cols = {fact: index[h] for fact, h in layout.columns.items() if h in index}
        number_col = cols["exam_number"]
        base = {"layout": layout.id, "codec": codec, "headers": headers, "cols": cols,
                "renamed": [(headers[i], named[i]) for i in sorted(cols.values()) if headers[i] != named[i]]}
        seen: set[int] = set()
        group: list[tuple[int, bytes, list[str], str]] = []
        key: str | None = None
        extra_rows = 0
        first_row = last_row = 0
        size = 0  # bytes of the exam so far, header included
        over_row = 0  # the row with which the exam went over max_exam_bytes
        units = 0

        def unit() -> RawUnit:
            nonlocal units
            units += 1
            meta = dict(base, exam=key or "", first_row=first_row, last_row=last_row, rows=list(group),
                        continued=list(continued),
                        dropped=extra_rows, over_row=over_row, max_bytes=self.max_exam_bytes,
                        reappears=bool(key) and _digest(key or "") in seen,
                        swallowed_by=swallowed.get(key or "", 0) if first_row > swallowed.get(key or "", 0) else 0)
            data = header_raw + b"".join(raw for _, raw, _, _ in group)
            return RawUnit(data, units, origin, meta=meta)

        swallowed: dict[str, int] = {}  # exam number -> the row whose quoted cell swallowed rows of it
        continued: list[int] = []  # rows of the exam read as its own though they carry no 体检编号 (merged cells)
        for row_no, raw, fields, bad in _records(stream, codec, self.max_exam_bytes, settled):
            if settled is not None and settled[0] != codec:  # (the rows said GB18030: this exam on is read so)
                codec = base["codec"] = settled[0]
            number = fields[number_col].strip() if number_col < len(fields) else ""
            if not number and key and _continues(fields, cols):
                number = key  # (a merged cell: the exam's rows after its first carry no 体检编号, name or 身份证号)
                continued.append(row_no)
            if b"\n" in raw.rstrip(b"\r\n"):
                for other in _swallowed(raw, number_col, codec, len(headers)):
                    swallowed.setdefault(other, row_no)
            if last_row and number != key:
                out = unit()
                if key:
                    seen.add(_digest(key))
                yield out
                group, extra_rows, over_row, last_row = [], 0, 0, 0
                continued = []
            if not last_row:
                first_row, size = row_no, len(header_raw)
            key, last_row = number, row_no
            size += len(raw)
            if over_row or size > self.max_exam_bytes:
                over_row = over_row or row_no  # counted from here on, not held: memory stays within the limit
                extra_rows += 1
            elif len(group) < self.max_exam_rows:
                group.append((row_no, raw, fields, bad))
            else:
                extra_rows += 1  # counted, not held: one runaway exam cannot exhaust memory
        if last_row:
            yield unit()

    def _names(self, headers: list[str]) -> list[str]:
        """Each header as the layouts name it: itself, or, when no layout has it and none has it already, the name
        before a note in brackets it carries (``接害工龄（年）``, ``参考范围(正常值)``): such a column was left unread,
        and a file sent again so dropped the units and ranges of results stored before."""
        known = {h for lay in self.layouts for h in lay.columns.values()}
        named = []
        for h in headers:
            bare = _NOTE.sub("", h).strip() if h not in known else h
            named.append(bare if bare in known and bare not in headers else h)
        return named if len(set(named)) == len(named) else headers  # (two notes of one name: neither is taken)

    def _layout(self, headers: list[str]) -> tuple[Layout | None, Issue | None]:
        present = set(headers)
        fits = [lay for lay in self.layouts if all(h in present for f, h in lay.columns.items()
                                                   if f in _REQUIRED_FACTS)]
        if fits:
            layout = max(fits, key=lambda lay: sum(h in present for h in lay.columns.values()))
            twice = [h for h in dict.fromkeys(layout.columns.values()) if headers.count(h) > 1]
            if twice:  # which of the two holds the value cannot be told
                where = ", ".join(f"{h} (columns {', '.join(str(i + 1) for i, x in enumerate(headers) if x == h)})"
                                  for h in twice)
                return None, Issue("error", "structure", "row 1",
                                   f"the header names a column of layout {layout.id} more than once: {where}", "100")
            return layout, None
        if not self.layouts:
            return None, Issue("error", "not-supported", "row 1", "no CSV layout is configured (mappings/csv/)", "200")
        closest = min(self.layouts, key=lambda lay: sum(h not in present for h in lay.columns.values()))
        missing = [h for f, h in closest.columns.items() if f in _REQUIRED_FACTS and h not in present]
        return None, Issue("error", "not-supported", "row 1",
                           f"the header matches no CSV layout in mappings/csv/; closest is {closest.id}, which "
                           f"needs the columns {', '.join(missing)}", "200")

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """(layout id, exam number + content digest): the same exam sent again is a duplicate, a changed one is not.

        The digest is of what the exam says (:meth:`content_digest`), not of its bytes: an export made again with
        only its form changed (line ends, GBK or UTF-8, quotes, a column the layout does not read, rows in another
        order, a date written 2026/11/16 16:30) is the same exam, not a correction of it."""
        if "error" in unit.meta or not unit.meta.get("exam"):
            return "", ""
        known = unit.meta.get("identity")  # (worked out once: before the write lock, then read under it)
        if isinstance(known, tuple):
            return known
        identity = str(unit.meta["layout"]), f"{unit.meta['exam']}#{self.content_digest(unit)[:16]}"
        unit.meta["identity"] = identity
        return identity

    def former_id(self, unit: RawUnit) -> str:
        """The id earlier releases gave the unit (exam number + digest of its bytes): a copy stored under it with
        the same bytes is this unit sent again ("" when the unit has no id)."""
        if "error" in unit.meta or not unit.meta.get("exam"):
            return ""
        return f"{unit.meta['exam']}#{hashlib.sha256(unit.data).hexdigest()[:16]}"

    def content_digest(self, unit: RawUnit) -> str:
        """SHA-256 of what the exam says: each cell of a column the layout reads, as read (trimmed, a spreadsheet's
        ``="…"`` as its text, a date or date and time as FHIR writes it, a result as the number it is, years of
        exposure as years), the exam's own columns once (each value they hold), its rows in a canonical order.
        Columns the layout does not read, the encoding, quotes and line ends change nothing; any value read does.
        An exam whose rows cannot all be read is told by its bytes (it is refused anyway)."""
        meta = unit.meta
        rows: list[tuple[int, bytes, list[str], str]] = meta.get("rows") or []
        width = len(meta.get("headers") or ())
        if (meta.get("over_row") or meta.get("dropped") or meta.get("reappears") or meta.get("swallowed_by")
                or any(problem or (len(f) != width and not _trailing_empty(f, width)) for _, _, f, problem in rows)):
            return hashlib.sha256(b"raw\x00" + unit.data).hexdigest()
        cols: dict[str, int] = meta["cols"]
        exam_facts = sorted(f for f in _EXAM_FACTS if f in cols)
        row_facts = sorted(f for f in cols if f not in _EXAM_FACTS and f != "exam_number")
        exam: dict[str, set[str]] = {f: set() for f in exam_facts}
        items: list[list[str]] = []
        for _, _, fields, _ in rows:
            for fact in exam_facts:
                value = fields[cols[fact]].strip()
                if value:
                    exam[fact].add(self._as_read(fact, value))
            items.append([self._as_read(f, fields[cols[f]].strip()) for f in row_facts])
        items.sort()
        content = [str(meta.get("layout", "")), str(meta.get("exam", "")),
                   [[f, sorted(exam[f])] for f in exam_facts], row_facts, items]
        return hashlib.sha256(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass")).hexdigest()

    def _as_read(self, fact: str, value: str) -> str:
        """A cell's value as the exam reads it, for :meth:`content_digest` (as it is when it does not read)."""
        if not value:
            return value
        try:
            if fact in _DATE_FACTS:
                return to_fhir_datetime(value, self.offset)
            if fact == "value":
                q = parse_number(value)
                return value if q is None else f"{q.comparator}{q.value}"
            if fact == "exposure_years":
                return str(parse_exposure_years(value))
            if fact == "id_card":
                return "".join(value.translate(FULL_WIDTH).split()).upper()
        except (DateTimeError, ValueError, ArithmeticError):
            return value
        return value

    # -- reading -------------------------------------------------------------------------

    def read(self, unit: RawUnit) -> SourceMessage:
        """The exam of one unit; problems become issues, never exceptions."""
        msg = SourceMessage(format=self.format)
        meta = unit.meta if unit.meta else self._meta_of(unit)
        if "error" in meta:
            msg.extra["label"] = str(meta.get("label", "file"))
            msg.issues.append(meta["error"])
            return msg
        layout = next(lay for lay in self.layouts if lay.id == meta["layout"])
        cols: dict[str, int] = meta["cols"]
        rows: list[tuple[int, bytes, list[str], str]] = meta["rows"]
        number = str(meta["exam"])
        number_header = layout.columns["exam_number"]
        msg.extra.update(layout=layout.id,
                         label=f"{number_header} {_short(number)}" if number else f"row {meta['first_row']}")
        msg.sender, msg.charset = layout.id, str(meta["codec"])
        # (the exam's bytes name its Bundle, as before content digests: a Bundle converted before keeps its id)
        msg.message_id = self.former_id(RawUnit(unit.data, unit.index, unit.origin, meta))
        issues = msg.issues

        def at(row_no: int, fact: str) -> str:
            return f"row {row_no} column {layout.columns.get(fact, fact)}"

        def cell(fields: list[str], fact: str) -> str:
            i = cols.get(fact)
            return fields[i].strip() if i is not None and i < len(fields) else ""

        if meta.get("continued"):  # (said: rows taken as this exam's though they carry no 体检编号)
            rows_said = ", ".join(str(n) for n in meta["continued"][:10]) + ("…" if len(meta["continued"]) > 10 else "")
            issues.append(Issue("information", "informational", f"row {meta['continued'][0]}",
                                f"rows {rows_said} carry no {number_header}, name or 身份证号 (cells merged in the "
                                f"spreadsheet): read as rows of {number_header} {_short(number)}", ""))
        for header, name in meta.get("renamed", ()):  # (said: a column read under another name than it has)
            issues.append(Issue("information", "informational", "row 1",
                                f"column {shown(header)} read as {shown(name)} of layout {layout.id}", ""))
        if meta.get("over_row"):
            issues.append(Issue("error", "too-long", f"row {meta['over_row']}",
                                f"the exam's rows exceed {meta['max_bytes']} bytes (the gateway's max_message_bytes, "
                                "header row included) from this row on: refused. An exam is taken whole: raise "
                                "max_message_bytes to take one this large (its rows sent in parts would each be "
                                "taken as a correction of the part before, leaving that part's items out)", "207"))
            return msg
        first_no, _, first, _ = rows[0]
        if not number and not any(problem for _, _, _, problem in rows):  # (an unreadable row says why itself)
            issues.append(Issue("error", "required", at(first_no, "exam_number"),
                                "exam number is empty: the exam cannot be identified", "101"))
        if meta.get("reappears"):
            issues.append(Issue("error", "duplicate", _rows(meta),
                                f"{number_header} {_short(number)} already appeared earlier in the file: rows of "
                                "one exam "
                                "must be contiguous; these later rows are refused (the earlier ones were taken as "
                                "the complete exam)", "205"))
            return msg
        if meta.get("dropped"):
            issues.append(Issue("error", "too-long", _rows(meta),
                                f"the exam has more than {self.max_exam_rows} rows: refused", "207"))
            return msg
        if meta.get("swallowed_by"):  # refused, not stored without the rows the quote took
            issues.append(Issue("error", "structure", _rows(meta),
                                f"rows of this exam are inside a quoted cell of row {meta['swallowed_by']}, whose "
                                "quote is not closed before its line ends: the exam is incomplete here and is refused; "
                                "close or remove that quote and send the file again", "100"))
            return msg
        for row_no, raw, fields, problem in rows:
            if problem:
                named = [n for n in _swallowed(raw, int(cols["exam_number"]), str(meta["codec"]), len(meta["headers"]))
                         if n != number] if "not closed" in problem else []
                also = f"; the lines after it, read as part of that field, are rows of {_exams(named)}"
                issues.append(Issue("error", "structure", f"row {row_no}", problem + (also if named else ""), "102"))
            elif b"\n" in raw.rstrip(b"\r\n") and _joined_lines(raw, meta, rows_only=True):
                # (as many cells as a row all the same, by chance: a row of one line is never such)
                issues.append(Issue("error", "structure", f"row {row_no}",
                                    "the row holds whole rows in one of its cells" + _joined_lines(raw, meta), "100"))
            elif len(fields) != len(meta["headers"]) and not _trailing_empty(fields, len(meta["headers"])):
                issues.append(Issue("error", "structure", f"row {row_no}",
                                    f"row has {len(fields)} columns, the header has {len(meta['headers'])}"
                                    + _joined_lines(raw, meta), "100"))
            else:
                del fields[len(meta["headers"]):]  # (empty cells past the header's last column: read as absent)
                _cell_issues(row_no, raw, fields, meta["headers"], issues)
        if msg.errors:
            return msg

        # Exam-level facts: the first non-empty value; a different value in a later row is an error.
        # (Rows have as many fields as the header here, so columns index directly: this loop is the hot one.)
        exam: dict[str, tuple[str, int]] = {}
        exam_cols = [(fact, cols[fact]) for fact in _EXAM_FACTS if fact in cols]
        pick = operator.itemgetter(*(i for _, i in exam_cols))
        previous: Any = None
        for row_no, _, fields, _ in rows:
            current = pick(fields)
            if current == previous:
                continue  # exports repeat the exam's columns on every row: nothing new to compare
            previous = current
            for fact, i in exam_cols:
                value = fields[i].strip()
                if not value:
                    continue
                known = exam.get(fact)
                if known is None:
                    exam[fact] = (value, row_no)
                elif known[0] != value:
                    both = "" if fact in _PRIVATE else f" ({shown(value)} here, {shown(known[0])} there)"
                    issues.append(Issue("error", "value", at(row_no, fact),
                                        f"differs from row {known[1]} of the same exam{both}", "102"))

        msg.extra["fact_rows"] = {fact: row_no for fact, (_, row_no) in exam.items()}
        msg.extra["first_row"] = first_no

        def fact_of(fact: str) -> tuple[str, str]:
            value, row_no = exam.get(fact, ("", first_no))
            return value, at(row_no, fact) if fact in layout.columns else f"row {row_no}"

        msg.patient = self._patient(fact_of, at(first_no, "name"), issues)
        report = ReportFacts(location=f"row {first_no}", number=number, kind="occupational-health",
                             status="original", code=layout.report_code)
        exam_date, where = fact_of("exam_date")
        report.where["collected"] = where
        if not exam_date:
            issues.append(Issue("error", "required", where, "exam date is empty", "101"))
        else:
            try:
                report.collected_at = to_fhir_date(exam_date)
            except DateTimeError as exc:
                issues.append(Issue("error", "value", where, str(exc), "102"))
        report_date = fact_of("report_date")
        report.issued_at = self._report_time(report_date, issues)
        report.where["issued"] = report_date[1]
        report.issued_day_only = report.issued_at.endswith("T00:00:00" + self.offset) and ":" not in report_date[0]
        msg.sent_at = report.issued_at
        report.interpreter_name = fact_of("chief_physician")[0]
        report.interpreter_id = fact_of("chief_physician_id")[0]
        report.extra = self._exam_extra(fact_of, rows, cell, at, layout, issues)

        seen: dict[str, int] = {}
        item_cols = _ItemColumns(layout, cols)
        for row_no, _, fields, _ in rows:
            res = item_cols.result(row_no, fields, issues)
            if res is not None:
                seen[res.code.code] = seen.get(res.code.code, 0) + 1
                res.occurrence = seen[res.code.code]
                report.results.append(res)
        warn_of_repeated_items(report.results, issues)
        msg.reports.append(report)
        return msg

    def _meta_of(self, unit: RawUnit) -> dict[str, Any]:
        """Meta of a unit read back from storage (re-split its own bytes)."""
        units = list(self.split(unit.data, unit.origin))
        return units[0].meta if units else {"error": Issue("error", "required", "row 2", "no rows"), "label": "file"}

    def _patient(self, fact_of: Any, where: str, issues: list[Issue]) -> PatientFacts:
        p = PatientFacts(location=f"{where} patient")
        p.name = fact_of("name")[0]
        if not p.name:
            issues.append(Issue("error", "required", fact_of("name")[1], "the worker's name is empty", "101"))
        card, card_at = fact_of("id_card")
        on = message_date(self._written(fact_of("report_date")[0]))  # the report date is the file's time
        if card:
            spaced = "".join(card.split())
            if spaced != card and len(spaced) in (15, 18) and spaced[:-1].isdigit():
                card = spaced  # (typed in groups, 5104 0219 8506 1200 1X, as a card prints it)
            try:
                p.id_card = check_id_card(card, on=on)
                issues.extend(Issue("warning", "value", card_at, w, "102") for w in id_card_warnings(p.id_card))
            except IdentifierError as exc:
                why = exc.message
                if _EXCEL_NUMBER.match(card):  # 5.10402E+17: the spreadsheet turned the number into a float
                    why = ("身份证号 is a number the spreadsheet shortened (written as 5.1E+17: its last digits are "
                           "lost): format the column as text and export the file again")
                issues.append(Issue("error", "value", card_at, why, "102"))
        else:
            issues.append(Issue("warning", "required", card_at,
                                "no 身份证号: the worker cannot be matched across institutions", "101"))
        sex, sex_at = fact_of("sex")
        p.sex, p.where["sex"] = sex, sex_at
        if not sex and len(p.id_card) == 18:
            # (GB 11643: digit 17 odd is male) an exam whose 性别 is empty still says the worker's sex, which the
            # shared Patient would lose otherwise; a 性别 given is kept, and one that contradicts is refused (cyhr-pat-4)
            p.sex, p.where["sex"] = ("男" if id_card_sex(p.id_card) == "male" else "女"), card_at
        birth, birth_at = fact_of("birth_date")
        if not birth and len(p.id_card) == 18:
            p.birth_date, p.where["birth_date"] = id_card_birth_date(p.id_card), card_at  # (digits 7-14)
        if birth:
            try:
                p.birth_date = to_fhir_date(birth)
            except DateTimeError as exc:
                issues.append(Issue("error", "value", birth_at, str(exc), "102"))
            future = birth_date_problem(p.birth_date, on)
            if future:
                p.birth_date = ""
                issues.append(Issue("error", "value", birth_at, future, "102"))
        return p

    def _written(self, value: str) -> str:
        """The report date as a FHIR dateTime or date ("" when unreadable): the time birth dates are checked at."""
        for convert in (lambda v: to_fhir_instant(v, self.offset), to_fhir_date):
            try:
                return convert(value)
            except DateTimeError:
                continue
        return ""

    def _report_time(self, found: tuple[str, str], issues: list[Issue]) -> str:
        value, where = found
        if not value:
            issues.append(Issue("error", "required", where, "report date is empty", "101"))
            return ""
        try:
            return to_fhir_instant(value, self.offset)
        except DateTimeError as exc:
            if "no time of day" not in str(exc):
                issues.append(Issue("error", "value", where, str(exc), "102"))
                return ""
        # A report date without a time: FHIR's instant needs one, and the day is what is known.
        try:
            return f"{to_fhir_date(value)}T00:00:00{self.offset}"
        except DateTimeError as exc:  # pragma: no cover - to_fhir_instant already parsed it
            issues.append(Issue("error", "value", where, str(exc), "102"))
            return ""

    def _exam_extra(self, fact_of: Any, rows: list[tuple[int, bytes, list[str], str]], cell: Any, at: Any,
                    layout: Layout, issues: list[Issue]) -> dict[str, Any]:
        extra: dict[str, Any] = {"layout": layout.id, "hazard_code_system": layout.hazard_code_system,
                                 "hazard_where": at(rows[0][0], "hazard_code")}
        extra["exam_type"] = fact_of("exam_type")
        extra["conclusion"] = fact_of("conclusion")
        extra["occupation"] = fact_of("occupation")[0]
        years, years_at = fact_of("exposure_years")
        extra["exposure_years"] = None
        if years:
            try:
                extra["exposure_years"] = parse_exposure_years(years)
            except ValueError as exc:
                issues.append(Issue("error", "value", years_at, str(exc), "102"))
        name, name_at = fact_of("employer_name")
        uscc, uscc_at = fact_of("employer_uscc")
        extra["employer"] = None
        if uscc:
            try:
                extra["employer"] = {"name": name, "uscc": check_uscc(uscc)}
            except IdentifierError as exc:
                issues.append(Issue("error", "value", uscc_at, f"employer {exc.message}", "102"))
        elif "employer_uscc" in layout.columns:
            issues.append(Issue("warning", "required", uscc_at,
                                f"no 统一社会信用代码 for the employer{' ' + shown(name) if name else ''}: "
                                "the employer is named only in the report", "101"))
            if name:
                extra["employer"] = {"name": name, "uscc": ""}
        # Hazard factors: the union over the exam's rows; several in a cell are split on the separators.
        hazards: list[dict[str, str]] = []
        keys: set[tuple[str, str]] = set()
        split = _separators(layout)
        guard = self._whole_names[layout.id]

        def parts(text: str) -> list[str]:
            return [p.strip() for p in _split_outside_brackets(text, split) if p.strip()]

        cells_seen: set[tuple[str, str]] = set()
        for row_no, _, fields, _ in rows:
            pair = (cell(fields, "hazard_code"), cell(fields, "hazard_name"))
            if pair in cells_seen:
                continue  # exports repeat the exam's factors on every row
            cells_seen.add(pair)
            codes, names = parts(pair[0]), guard.cut(pair[1])
            if codes and len(codes) != len(names) and len(parts(pair[1])) == len(codes):
                names = parts(pair[1])  # as many codes as separate names: the sender meant them apart
            if codes and names and len(codes) != len(names):
                issues.append(Issue("error", "value", at(row_no, "hazard_code"),
                                    f"{len(codes)} hazard factor codes but {len(names)} names "
                                    f"(column {layout.columns.get('hazard_name', '?')})", "102"))
                continue
            for i in range(max(len(codes), len(names))):
                code = codes[i] if i < len(codes) else ""
                hname = names[i] if i < len(names) else ""
                if (code, hname) in keys:
                    continue
                keys.add((code, hname))
                hazards.append({"code": code, "name": hname,
                                "where": at(row_no, "hazard_code" if code else "hazard_name")})
        extra["hazards"] = hazards
        return extra

    # -- answering -----------------------------------------------------------------------

    def explain(self, msg: SourceMessage, bundle: dict[str, Any], issues: list[Issue]) -> list[Issue]:
        """Problems the profile check found on the converted exam report, located as the exam's row and column.

        Each problem at ``Bundle.entry[n].resource...`` is traced to what the
        resource was built from (the worker: the exam's patient columns; an
        Observation: its row; the report: the exam's columns; the employer)
        and its element to the columns it came from: ``row 3 column 性别: does
        not give a sex agreeing with digit 17 of the 身份证号 (see also column
        身份证号): fails cyhr-pat-4: …``. A problem no column is mapped to names
        the exam's first row. The FHIR path is kept in ``extra["fhir_path"]``,
        never in the answer.
        """
        layout = next((lay for lay in self.layouts if lay.id == msg.extra.get("layout")), None)
        first = int(msg.extra.get("first_row", 2))
        sources = _sources(msg, bundle)
        entries = bundle.get("entry") or []
        out: list[Issue] = []
        for issue in issues:
            text = _plain(issue.message)
            m = _ENTRY_PATH.match(issue.location or "")
            n = int(m.group(1)) if m else -1
            kind, record = sources[n] if 0 <= n < len(sources) else ("", None)
            path = m.group(2) or "" if m else ""
            if m is None and re.match(r"^Bundle(\.|$)", issue.location or "") and "entry" not in issue.location:
                kind, path = "Bundle", issue.location[len("Bundle."):]  # the Bundle's own elements
            entry = entries[n] if 0 <= n < len(entries) and isinstance(entries[n], dict) else {}
            found = entry.get("resource")
            resource: dict[str, Any] = found if isinstance(found, dict) else {}
            extension = _extension_of(resource, path) if kind == "DiagnosticReport" else {}
            rule = _rule_of(kind, path, extension, str(issue.extra.get("rule") or ""), issue.message)
            places: list[tuple[int, str]] = []
            if layout is not None and rule is not None:
                places = _places(layout, msg, kind, record, rule[0], extension, first)
            extra = {**issue.extra, "fhir_path": issue.location}
            if not places or rule is None:
                out.append(Issue(issue.severity, issue.code, f"row {first}", "the converted exam report fails a "
                                 f"profile rule no column is mapped to: {text}", issue.hl7_error, extra))
                continue
            (row, header), others = places[0], places[1:]
            also = ""
            if others:
                also = " (see also " + _joined([f"column {h}" if r == row else f"row {r} column {h}"
                                                for r, h in others]) + ")"
            if issue.code == "required" and not INVARIANT.match(issue.message):
                message = f"is empty: {rule[1]} is required{also}"
            else:
                message = f"does not give {rule[1]}{also}: {text}"
            out.append(Issue(issue.severity, issue.code, f"row {row} column {header}", message, issue.hl7_error,
                             extra))
        return out


def _sources(msg: SourceMessage, bundle: dict[str, Any]) -> list[tuple[str, Any]]:
    """(kind, record) of each Bundle entry: Patient, Observation (its result), DiagnosticReport (its report),
    Employer, or "" (the issuing member: nothing of the file)."""
    results = iter([res for rep in msg.reports for res in rep.results])
    reports = iter(msg.reports)
    employers = {str((rep.extra.get("employer") or {}).get("uscc") or "") for rep in msg.reports} - {""}
    out: list[tuple[str, Any]] = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        kind = str(resource.get("resourceType", "")) if isinstance(resource, dict) else ""
        record: Any = None
        if kind == "Observation":
            record = next(results, None)
        elif kind == "DiagnosticReport":
            record = next(reports, None)
        elif kind == "Organization":  # the first is the issuing member, any other the employer
            kind = "Employer" if out and employers else ""
        if kind not in ("Patient", "Employer") and record is None:
            kind = ""
        out.append((kind, record))
    return out


def _rule_of(kind: str, path: str, extension: dict[str, Any], key: str, message: str) -> _Rule | None:
    """The facts and words for a problem at ``path`` of a ``kind`` resource: a profile rule's key first, then the
    extension the path is in (by its URL), then the element."""
    if not kind:
        return None
    m = INVARIANT.match(message)
    key = key if key in _INVARIANT_FACTS else (m.group(1) if m else "")
    if key in _INVARIANT_FACTS:
        return _INVARIANT_FACTS[key]
    if extension:
        found_ext = _EXTENSION_FACTS.get(str(extension.get("url", "")).rsplit("/", 1)[-1])
        if found_ext is not None:
            return found_ext
    bare = INDEX.sub("", path)
    found = next((rule for prefix, rule in _ELEMENT_FACTS.get(kind, []) if bare.startswith(prefix)), None)
    return found or _RESOURCE_FACTS.get(kind)


def _extension_of(resource: dict[str, Any], path: str) -> dict[str, Any]:
    """The extension ``path`` starts in ({} when it is not in one)."""
    m = _EXTENSION_AT.match(path)
    found = resource.get("extension") if m else None
    if m and isinstance(found, list) and int(m.group(1)) < len(found) and isinstance(found[int(m.group(1))], dict):
        return dict(found[int(m.group(1))])
    return {}


def _hazard_cell(record: ReportFacts, extension: dict[str, Any]) -> tuple[int, str] | None:
    """Row and column of the factor a hazard-factor extension was built from (the first factor's if unknown)."""
    sent = [p["valueCoding"] for p in extension.get("extension") or [] if isinstance(p, dict)
            and p.get("url") in ("source", "factor") and isinstance(p.get("valueCoding"), dict)]
    hazards = [h for h in record.extra.get("hazards", []) if isinstance(h, dict)]

    def built_from(hazard: dict[str, str]) -> bool:
        return any((hazard.get("code") and c.get("code") == hazard["code"])
                   or (hazard.get("name") and c.get("display") == hazard["name"]) for c in sent)

    for hazard in [h for h in hazards if built_from(h)] + hazards:
        m = re.match(r"^row (\d+) column (.+)$", str(hazard.get("where", "")))
        if m:
            return int(m.group(1)), m.group(2)
    return None


def _places(layout: Layout, msg: SourceMessage, kind: str, record: Any, facts: tuple[str, ...],
            extension: dict[str, Any], first: int) -> list[tuple[int, str]]:
    """(row, header) of each fact of the record a resource came from; a DiagnosticReport extension by its URL."""
    rows: dict[str, int] = msg.extra.get("fact_rows", {})
    if "hazard_name" in facts and isinstance(record, ReportFacts):
        cell = _hazard_cell(record, extension)
        if cell is not None:
            return [cell]
    item_row = first
    if kind == "Observation" and isinstance(record, ResultFacts):
        m = re.match(r"^row (\d+)", record.location)
        item_row = int(m.group(1)) if m else first
    out: list[tuple[int, str]] = []
    for fact in facts:
        if fact not in layout.columns:
            continue
        row = item_row if kind == "Observation" and fact in _ITEM_FACTS else rows.get(fact, first)
        out.append((row, layout.columns[fact]))
    return out


def _plain(text: str) -> str:
    """A profile problem's text without FHIR paths: what a CSV sender reads."""
    text = _PATH_IN_BRACKETS.sub("", text)
    text = _PATH.sub(lambda m: re.sub(r"[\[:].*$", "", m.group(1).rsplit(".", 1)[-1]), text)
    return re.sub(r"(?i)resource", "record", text.replace("[x]", "")).strip()


def _joined(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"


class _ItemColumns:
    """Reads one row's exam item: column indexes and error locations prepared once per exam."""

    def __init__(self, layout: Layout, cols: dict[str, int]) -> None:
        facts = ("item_code", "item_name", "value", "unit", "reference_range", "flag")
        self.idx = {fact: cols.get(fact) for fact in facts}
        named = ("item_code", "value", "unit", "flag", "reference_range")
        self.names = {fact: layout.columns.get(fact, fact) for fact in named}

    def result(self, row_no: int, fields: list[str], issues: list[Issue]) -> ResultFacts | None:
        def get(fact: str) -> str:
            i = self.idx[fact]
            return fields[i].strip() if i is not None else ""

        names = self.names
        code = get("item_code")
        if not code:
            issues.append(Issue("error", "required", f"row {row_no} column {names['item_code']}",
                                "item code is empty", "101"))
            return None
        res = ResultFacts(location=f"row {row_no}", code=Coded(code, get("item_name")))
        res.where = {"code": f"row {row_no} column {names['item_code']}",
                     "value": f"row {row_no} column {names['value']}",
                     "unit": f"row {row_no} column {names['unit']}",
                     "flags": f"row {row_no} column {names['flag']}",
                     "reference_range": f"row {row_no} column {names['reference_range']}",
                     "status": f"row {row_no}"}
        res.unit = get("unit")
        res.reference_range = get("reference_range")
        flag = get("flag")
        if flag:
            res.flags.append(flag)
        value = get("value")
        arrow = _ARROWS.get(value[-1:]) if len(value) > 1 else None
        if arrow is not None and parse_number(value[:-1].rstrip()) is not None:
            # (5.1↑: the flag typed into the result cell, as result tables print it) the number, and its flag
            value = value[:-1].rstrip()
            if not res.flags:
                res.flags.append(arrow)
        if value:
            q = parse_number(value)
            if q is not None:
                res.value_kind, res.value = "quantity", q
            elif (problem := number_problem(value)) != "is not a number":  # a number no signed report can carry
                issues.append(Issue("error", "value", res.where["value"], f"result {shown(value)} {problem}", "102"))
                return None
            else:
                res.value_kind, res.value = "string", value
                if res.unit and _NUMBER_LIKE.match(value.translate(FULL_WIDTH)):  # (1,230; 6,8; 6.8.1; １，２３０)
                    issues.append(Issue("warning", "value", res.where["value"],
                                        f"result {shown(value)} is not a number: kept as text, without its unit "
                                        f"{shown(res.unit)} (write a number as 6.8 or 1230)", "102"))
                elif res.unit and not any(c.isdigit() for c in value):
                    # (text with no figure where a unit says a number was meant: abc with 10^9/L; a semi-quantitative
                    # 0-3 /HP or 1:320 titre is text as meant)
                    issues.append(Issue("warning", "value", res.where["value"],
                                        f"result {shown(value)} is not a number: kept as text, without its unit "
                                        f"{shown(res.unit)}", "102"))
        return res


def _continues(fields: list[str], cols: dict[str, int]) -> bool:
    """Whether a row with no 体检编号 is the next row of the exam before it, written under merged cells: no name and
    no 身份证号 either (another worker's row is not), and an item of its own (a blank row is not)."""
    def cell(fact: str) -> str:
        i = cols.get(fact)
        return fields[i].strip() if i is not None and i < len(fields) else ""

    return not cell("name") and not cell("id_card") and bool(cell("item_code"))


def _separators(layout: Layout) -> re.Pattern[str] | None:
    """The layout's list separators as one pattern (None: a cell is never cut)."""
    return re.compile("|".join(re.escape(s) for s in layout.separators)) if layout.separators else None


def _cut(text: str, split: re.Pattern[str] | None) -> list[tuple[str, str]]:
    """(piece, the separator after it) of ``text`` cut at the separators that are not inside brackets."""
    if split is None:
        return [(text, "")]
    out: list[tuple[str, str]] = []
    depth = start = 0
    last = 0
    for m in split.finditer(text):
        segment = text[last:m.start()]
        depth += segment.count("（") + segment.count("(") - segment.count("）") - segment.count(")")
        last = m.start()
        if depth <= 0:
            out.append((text[start:m.start()], m.group()))
            start = m.end()
            depth = 0
    out.append((text[start:], ""))
    return out


def _split_outside_brackets(text: str, split: re.Pattern[str] | None) -> list[str]:
    """``text`` cut at the separators that are not inside brackets (（）or ()): 麻尘（亚麻、黄麻和苎麻）is one name."""
    return [piece for piece, _ in _cut(text, split)]


class _NameGuard:
    """The factor names that hold a separator outside brackets (磷化氢、磷化锌、磷化铝), kept whole in a cell."""

    def __init__(self, names: list[str], split: re.Pattern[str] | None) -> None:
        self.split = split
        self.whole: set[str] = set()
        self.most = 1  # pieces in the longest such name
        if split is None:
            return
        for name in names:
            pieces = max(len([p for p in _split_outside_brackets(n, split) if p.strip()])
                         for n in (name, fold_brackets(name)))
            if pieces > 1:
                self.whole.add(factor_key(name))
                self.most = max(self.most, pieces)

    def cut(self, text: str) -> list[str]:
        """The names in a cell: at each piece the longest known name that starts there, else the piece alone."""
        pieces = _cut(text, self.split)
        out: list[str] = []
        i = 0
        while i < len(pieces):
            taken, name = 1, pieces[i][0]
            for j in range(min(len(pieces), i + self.most), i + 1, -1):
                joined = "".join(p + sep for p, sep in pieces[i:j - 1]) + pieces[j - 1][0]
                if factor_key(joined) in self.whole:
                    taken, name = j - i, joined
                    break
            out.append(name)
            i += taken
        return [n.strip() for n in out if n.strip()]


#: Guards made before, by the names and the separators (each adapter of a process with one mapping shares them: a
#: guard is not changed once made).
_GUARDS: dict[tuple[tuple[str, ...], str | None], _NameGuard] = {}


def _name_guard(names: list[str], split: re.Pattern[str] | None) -> _NameGuard:
    key = (tuple(names), split.pattern if split is not None else None)
    guard = _GUARDS.get(key)
    if guard is None:
        if len(_GUARDS) >= 16:
            _GUARDS.clear()
        guard = _GUARDS[key] = _NameGuard(names, split)
    return guard


def _cell_issues(row_no: int, raw: bytes, fields: list[str], headers: list[str], issues: list[Issue]) -> None:
    """A cell beyond :data:`MAX_TEXT_BYTES`, or holding a control character, named by row and column."""
    long_row = len(raw) > MAX_TEXT_BYTES
    if not long_row and _CONTROL_BYTES.search(raw) is None:
        return  # the common case: one search of the row's bytes
    for i, value in enumerate(fields):
        where = f"row {row_no} column {headers[i]}"
        if long_row and text_too_long(value):
            issues.append(Issue("error", "too-long", where, f"cell of {len(value.encode('utf-8'))} bytes (UTF-8): at "
                                f"most {MAX_TEXT_BYTES} are taken in one cell", "102"))
        else:
            bad = _CONTROL.search(value)
            if bad is not None:
                issues.append(Issue("error", "value", where,
                                    f"holds the control character 0x{ord(bad.group()):02X} at character "
                                    f"{bad.start() + 1}, which no report may carry", "102"))


def _records(stream: IO[bytes], codec: str, limit: int = 0,
             settled: list[str] | None = None) -> Iterator[tuple[int, bytes, list[str], str]]:
    """(row number, raw bytes, fields, problem or "") per CSV record after the header (row 2 on).

    ``settled``: the header told nothing (plain ASCII, no byte order mark): the first row past ASCII settles the
    file's character set — UTF-8 when it is, else GB18030 — and ``settled[0]`` says which from then on (a GBK
    export of a layout with pinyin headers, TJBH and XM, was refused row by row as "not valid utf-8").

    A quoted field may span lines; multi-byte GBK and UTF-8 characters never
    contain the bytes of ``"``, CR or LF, so records are cut safely before decoding.
    A record longer than ``limit`` bytes (when given) is read no further than
    that: the rest is skipped unheld and the record comes back as its first
    ``limit + 1`` bytes, which its exam cannot hold.
    """
    row_no = 1
    pending = b""
    state = _FIELD_START
    while True:
        line = stream.readline(limit + 1 - len(pending)) if limit else stream.readline()
        if not line:
            break
        pending += line
        state = _quotes_after(line, state)
        if limit and len(pending) > limit:
            _skip_record(stream, state, pending.endswith(b"\n"))
            row_no += 1
            fields, problem = _row(pending.decode(codec, errors="replace"))
            yield row_no, pending, fields, problem
            pending, state = b"", _FIELD_START
            continue
        if state == _QUOTED:
            continue  # inside a quoted field: the record goes on
        raw, pending, state = pending, b"", _FIELD_START
        row_no += 1  # a spreadsheet's row number: blank rows count too
        if _BLANK_ROW.match(raw):
            continue  # blank, or only separators (a formatted row Excel saves as ",,,,"): no record
        problem = ""
        if settled is not None and not settled[1:] and not raw.isascii():
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                codec = "gb18030"
            settled[:] = [codec, "settled"]
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            text, problem = raw.decode(codec, errors="replace"), f"row is not valid {codec} text (the header is)"
        fields, unreadable = _row(text)
        yield row_no, raw, fields, problem or unreadable
    if pending.strip():
        yield row_no + 1, pending, _row(pending.decode(codec, errors="replace"))[0], \
            "a quoted field is not closed before the end of the file"


_BLANK_ROW = re.compile(rb'^(?:[ \t\r\n,]|"")*$')


def _swallowed(raw: bytes, column: int, codec: str, width: int) -> list[str]:
    """The exam numbers (column ``column``) of the lines after a record's first that are whole rows (as many cells
    as the header's ``width``, or more): rows a quote left open took into one of the record's cells. (A cell that
    truly spans lines, free text with a line break, leaves fewer cells on its last line than a row has.)"""
    named: list[str] = []
    for line in raw.rstrip(b"\r\n").split(b"\n")[1:]:
        cells = line.decode(codec, errors="replace").split(",")
        if len(cells) < width:
            continue
        number = cells[column].strip().strip('"')
        if number and number not in named and len(number) <= 40:
            named.append(number)
    return named


def _exams(numbers: list[str]) -> str:
    return ", ".join(shown(n) for n in numbers[:5]) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


def _joined_lines(raw: bytes, meta: dict[str, Any], rows_only: bool = False) -> str:
    """For a record that runs over several lines of the file: how (a quote opening a cell, not closed before its line
    ends, joins the lines after it to that cell, as every CSV reader reads it) and the exams whose rows those lines
    are, which are then read nowhere else ("" for a record on one line; with ``rows_only``, "" unless some of those
    lines are whole rows)."""
    lines = raw.rstrip(b"\r\n").split(b"\n")
    if len(lines) < 2:
        return ""
    named = _swallowed(raw, int(meta["cols"]["exam_number"]), str(meta["codec"]), len(meta["headers"]))
    if rows_only and not named:
        return ""
    others = [n for n in named if n != meta["exam"]]
    exams = f"; they are rows of {_exams(others)}" if others else "; they are rows" if named else ""
    return (f"; it runs over {len(lines)} lines of the file: a quote opening one of its cells is not closed before "
            f"the line ends, so the lines after it are read as part of that cell, not as rows{exams}: close or "
            "remove the quote and send the file again")


def _cr_as_lf(data: bytes) -> bytes:
    """A piece of a file whose lines end with CR alone, each CR as LF."""
    return data.replace(b"\r", b"\n")


def _skip_record(stream: IO[bytes], state: int, ended: bool) -> None:
    """Read past the rest of a record, a chunk at a time: to the line end outside a quoted field (``state``: where
    the record's quotes stand so far, :func:`_quotes_after`)."""
    while not ended or state == _QUOTED:
        chunk = stream.readline(_SKIP_CHUNK)
        if not chunk:
            return
        state = _quotes_after(chunk, state)
        ended = chunk.endswith(b"\n")


#: Where a record's quotes stand (:func:`_quotes_after`): at a field's start, in a field not quoted, in a quoted field,
#: just after a quote inside a quoted field (it closes the field, or is the first of a doubled quote).
_FIELD_START, _UNQUOTED, _QUOTED, _QUOTE_IN_QUOTED = 0, 1, 2, 3
_QUOTE, _COMMA = 34, 44


def _quotes_after(data: bytes, state: int) -> int:
    """Where a record's quotes stand after ``data`` (bytes of it, read on from ``state``), as Python's csv module reads
    them, so that records are cut where it would cut them: a quote opens a quoted field only at a field's start; in a
    quoted field a doubled quote is a quote and a single one closes it; anywhere else a quote is a character like any
    other (``纯音听阈(4"耳机)``), which must not hold the records after it as one quoted field. Byte by byte is safe:
    no byte of a multi-byte GBK, GB18030 or UTF-8 character is a quote or a comma."""
    if _QUOTE not in data:  # the common case: where a field ends is all that can change
        if state == _QUOTED or not data:
            return state
        return _FIELD_START if data[-1] == _COMMA else _UNQUOTED
    for c in data:
        if state == _QUOTED:
            if c == _QUOTE:
                state = _QUOTE_IN_QUOTED
        elif state == _QUOTE_IN_QUOTED:
            state = _QUOTED if c == _QUOTE else _FIELD_START if c == _COMMA else _UNQUOTED
        elif c == _COMMA:
            state = _FIELD_START
        elif state == _FIELD_START and c == _QUOTE:
            state = _QUOTED
        else:
            state = _UNQUOTED
    return state


def _row(text: str) -> tuple[list[str], str]:
    """(the fields of a record, "") or ([], why it cannot be read as CSV): a quoted cell longer than the csv
    module takes (131,072 characters) is that row's problem, not the file's."""
    try:
        return _fields(text), ""
    except csv.Error as exc:
        return [], f"cannot be read as CSV ({exc}); a cell may hold at most {MAX_TEXT_BYTES} bytes"


def _fields(text: str) -> list[str]:
    line = text.rstrip("\r\n")
    if '"' not in line:
        fields = line.split(",")  # the common case, much faster than the csv module
    else:
        fields = next(csv.reader(io.StringIO(line, newline="")), [])
    if "=" in line or "'" in line:  # (cheap: most rows have neither)
        fields = [_as_text(f) for f in fields]
    return fields


# A cell kept as text the ways spreadsheet users do, so that Excel shows an 18-digit 身份证号 or an exam number
# with leading zeros as written (not as 5.11322E+17): a formula ="..." or a leading apostrophe before digits.
_FORMULA_TEXT = re.compile(r'^\s*="([^"]*)"\s*$')
_APOSTROPHE_DIGITS = re.compile(r"^\s*'\s*([0-9A-Za-z][0-9A-Za-z._-]*)\s*$")  # (an ID, a code: no other text)


def _as_text(cell: str) -> str:
    """The text a cell holds: ``="511..."`` and ``'511...`` are ``511...``; any other cell as it is."""
    if cell[:1] not in ("=", "'", " ", "\t"):
        return cell
    m = _FORMULA_TEXT.match(cell) or _APOSTROPHE_DIGITS.match(cell)
    return m.group(1) if m else cell


# What is meant as a number but is not one — a thousands separator or a decimal comma (1,230; 6,8; 1 230), a point too
# many (6.8.1, 6..8): not read as one, and said so. (Not 0-3 or 1:320 with a unit: semi-quantitative results are text.)
#: A number a spreadsheet wrote in scientific notation (an 18-digit 身份证号 as 5.10402E+17).
_EXCEL_NUMBER = re.compile(r"^\d(\.\d+)?[Ee]\+\d{1,2}$")
#: A flag typed after a number in the result cell (5.1↑), as a result table prints it: the flag it is.
_ARROWS = {"↑": "H", "↓": "L"}
_NUMBER_LIKE = re.compile(r"^\s*[<>≤≥]?\s*[+-]?[\d.,\s]*\d[\d.,\s]*$")
#: Characters no one sees in a header cell (zero-width spaces and joiners, a BOM inside the row): left out.
_INVISIBLE = dict.fromkeys([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF])
_GZIP = b"\x1f\x8b"
_SPREADSHEETS = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")  # .xlsx (a ZIP), .xls (an OLE file)


def _header_trouble(raw: bytes, headers: list[str]) -> Issue | None:
    """What is wrong with a first row that matches no layout when it is not the columns (None: the columns)."""
    def refused(text: str) -> Issue:
        return Issue("error", "structure", "row 1", text, "100")

    if raw.startswith(_GZIP):
        return refused("the file is gzip-compressed: send it uncompressed (a .csv, not a .gz)")
    if raw.startswith(_SPREADSHEETS):
        return refused("the file is a spreadsheet (.xlsx or .xls), not CSV: save it as CSV in UTF-8 or GBK")
    # UTF-16: a byte order mark, or the commas between its columns written as two bytes (Chinese text has no NUL)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw.count(b",\x00") + raw.count(b"\x00,") >= 3:
        return refused("the file is UTF-16 (or another encoding with two or more bytes per character): save it as "
                       "CSV in UTF-8 or GBK")
    if sum(1 for b in raw[:512] if b < 0x09 or 0x0E <= b < 0x20) > 4:
        return refused("the file is not text (CSV): a spreadsheet (.xlsx, .xls) or another binary file? save it as "
                       "CSV in UTF-8 or GBK")
    if len(headers) == 1:
        for separator, name in (("\t", "tabs"), (";", "semicolons"), ("|", "vertical bars")):
            if headers[0].count(separator) >= 3:
                return refused(f"row 1 separates its columns with {name}, not commas: save the file as CSV "
                               "(comma-separated)")
    filled = [h for h in headers if h]
    if 1 <= len(filled) <= 2:
        return refused(f"row 1 holds {'a single cell' if len(filled) == 1 else 'two cells'} "
                       f"({', '.join(shown(h[:40]) for h in filled)}): a title above the header? the header of the "
                       "columns must be row 1")
    return None


def _trailing_empty(fields: list[str], columns: int) -> bool:
    """Whether a row is longer than the header by empty cells only (a spreadsheet saved with trailing commas)."""
    return len(fields) > columns and not any(f.strip() for f in fields[columns:])


def _rows(meta: dict[str, Any]) -> str:
    first, last = meta["first_row"], meta["last_row"]
    return f"row {first}" if first == last else f"rows {first}-{last}"


def _short(value: str, limit: int = 64) -> str:
    """An identifier as a label shows it: whole when it is of a sane length, else its start."""
    return value if len(value) <= limit else f"{value[:limit]}…"
