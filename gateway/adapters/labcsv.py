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
the file are still read.
"""
from __future__ import annotations

import csv
import hashlib
import io
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import IO, Any

from gateway.adapters.base import (
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
)
from gateway.datetimes import DateTimeError, to_fhir_date, to_fhir_instant
from gateway.errors import ConfigError, IdentifierError, Issue, shown
from gateway.identifiers import birth_date_problem, check_id_card, check_uscc, id_card_warnings, message_date

__all__ = ["Layout", "LabCSVAdapter", "parse_exposure_years"]

_BOM = b"\xef\xbb\xbf"
# Bytes no cell may hold: control characters but tab, CR and LF (GBK, GB18030 and UTF-8 never use them inside
# a multi-byte character, so the raw row is searched before decoding).
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_SKIP_CHUNK = 65_536  # how much of an over-long row is read at a time to skip it
# years (6.5, 6年), years and months (3年6个月: the 年 is needed then) or months (8个月); each number read one way
_YEARS = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(?:(?:年|岁)\s*(?:(\d+)\s*(?:个月|月))?)?|(\d+)\s*(?:个月|月))\s*$")
_YEARS_CHARS = 32  # no number of years and months is longer
_REQUIRED_FACTS = ("exam_number", "name", "id_card", "exam_type", "exam_date", "item_code", "value", "conclusion",
                   "report_date")
# Facts of the exam as a whole: read from its first row; later rows may leave them empty but not contradict them.
_EXAM_FACTS = ("name", "id_card", "sex", "birth_date", "employer_name", "employer_uscc", "occupation",
               "exposure_years", "exam_type", "exam_date", "conclusion", "chief_physician", "chief_physician_id",
               "report_date")
_PRIVATE = {"name", "id_card", "birth_date"}  # never echoed in error lines


def parse_exposure_years(text: str) -> Decimal:
    """接害工龄 in years: ``6.5``, ``6``, ``6年``, ``3年6个月``, ``8个月`` (months as twelfths, two decimals).

    :raises ValueError: not a number of years and months, or months of 12 or more.
    """
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
                 max_exam_rows: int = 2000, max_exam_bytes: int = 1_048_576) -> None:
        """``max_exam_bytes``: the most the rows of one exam (and so any one row) may take.

        :raises ConfigError: a layout is incomplete.
        """
        self.layouts = [Layout.from_structure(s) for s in layouts]
        self.offset = default_offset
        self.max_exam_rows = max_exam_rows
        self.max_exam_bytes = max_exam_bytes

    # -- cutting -------------------------------------------------------------------------

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """Exams of a whole file or request body (see :meth:`split_stream`)."""
        yield from self.split_stream(io.BytesIO(data), origin, whole=data)

    def split_stream(self, stream: IO[bytes], origin: str = "", *, whole: bytes | None = None) -> Iterator[RawUnit]:
        """Exams of a binary stream, one unit per run of rows with the same exam number, read lazily."""
        header_raw = stream.readline(_SKIP_CHUNK)
        if not header_raw.endswith(b"\n") and len(header_raw) >= _SKIP_CHUNK:
            yield RawUnit(header_raw[:256], 1, origin, meta={"label": "header", "error": Issue(
                "error", "too-long", "row 1", f"the header row is longer than {_SKIP_CHUNK} bytes", "207")})
            return
        if header_raw.startswith(_BOM):
            header_raw, codec = header_raw[len(_BOM):], "utf-8"
        else:
            codec = "utf-8"
            try:
                header_raw.decode("utf-8")
            except UnicodeDecodeError:
                codec = "gb18030"
        if not header_raw.strip():
            return
        headers = [h.strip() for h in _fields(header_raw.decode(codec, errors="replace"))]
        layout, problem = self._layout(headers)
        if layout is None:
            yield RawUnit(whole if whole is not None else header_raw, 1, origin,
                          meta={"error": problem, "label": "header"})
            return
        index = {h: i for i, h in enumerate(headers)}
        cols = {fact: index[h] for fact, h in layout.columns.items() if h in index}
        number_col = cols["exam_number"]
        base = {"layout": layout.id, "codec": codec, "headers": headers, "cols": cols}
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
                        dropped=extra_rows, over_row=over_row, max_bytes=self.max_exam_bytes,
                        reappears=bool(key) and _digest(key or "") in seen)
            data = header_raw + b"".join(raw for _, raw, _, _ in group)
            return RawUnit(data, units, origin, meta=meta)

        for row_no, raw, fields, bad in _records(stream, codec, self.max_exam_bytes):
            number = fields[number_col].strip() if number_col < len(fields) else ""
            if last_row and number != key:
                out = unit()
                if key:
                    seen.add(_digest(key))
                yield out
                group, extra_rows, over_row, last_row = [], 0, 0, 0
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

    def _layout(self, headers: list[str]) -> tuple[Layout | None, Issue | None]:
        present = set(headers)
        fits = [lay for lay in self.layouts if all(h in present for f, h in lay.columns.items()
                                                   if f in _REQUIRED_FACTS)]
        if fits:
            return max(fits, key=lambda lay: sum(h in present for h in lay.columns.values())), None
        if not self.layouts:
            return None, Issue("error", "not-supported", "row 1", "no CSV layout is configured (mappings/csv/)", "200")
        closest = min(self.layouts, key=lambda lay: sum(h not in present for h in lay.columns.values()))
        missing = [h for f, h in closest.columns.items() if f in _REQUIRED_FACTS and h not in present]
        return None, Issue("error", "not-supported", "row 1",
                           f"the header matches no CSV layout in mappings/csv/; closest is {closest.id}, which "
                           f"needs the columns {', '.join(missing)}", "200")

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """(layout id, exam number + content digest): an identical resend is a duplicate, a changed one is not."""
        if "error" in unit.meta or not unit.meta.get("exam"):
            return "", ""
        return str(unit.meta["layout"]), f"{unit.meta['exam']}#{hashlib.sha256(unit.data).hexdigest()[:16]}"

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
        msg.message_id = self.identify(RawUnit(unit.data, unit.index, unit.origin, meta))[1]
        issues = msg.issues

        def at(row_no: int, fact: str) -> str:
            return f"row {row_no} column {layout.columns.get(fact, fact)}"

        def cell(fields: list[str], fact: str) -> str:
            i = cols.get(fact)
            return fields[i].strip() if i is not None and i < len(fields) else ""

        if meta.get("over_row"):
            issues.append(Issue("error", "too-long", f"row {meta['over_row']}",
                                f"the exam's rows exceed {meta['max_bytes']} bytes from this row on: refused "
                                "(send it as a file of its own, or split its rows)", "207"))
            return msg
        first_no, _, first, _ = rows[0]
        if not number:
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
        for row_no, raw, fields, problem in rows:
            if problem:
                issues.append(Issue("error", "structure", f"row {row_no}", problem, "102"))
            elif len(fields) != len(meta["headers"]):
                issues.append(Issue("error", "structure", f"row {row_no}",
                                    f"row has {len(fields)} columns, the header has {len(meta['headers'])}", "100"))
            else:
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

        def fact_of(fact: str) -> tuple[str, str]:
            value, row_no = exam.get(fact, ("", first_no))
            return value, at(row_no, fact) if fact in layout.columns else f"row {row_no}"

        msg.patient = self._patient(fact_of, at(first_no, "name"), issues)
        report = ReportFacts(location=f"row {first_no}", number=number, kind="occupational-health",
                             status="original", code=layout.report_code)
        exam_date, where = fact_of("exam_date")
        if not exam_date:
            issues.append(Issue("error", "required", where, "exam date is empty", "101"))
        else:
            try:
                report.collected_at = to_fhir_date(exam_date)
            except DateTimeError as exc:
                issues.append(Issue("error", "value", where, str(exc), "102"))
        report.issued_at = self._report_time(fact_of("report_date"), issues)
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
            try:
                p.id_card = check_id_card(card, on=on)
                issues.extend(Issue("warning", "value", card_at, w, "102") for w in id_card_warnings(p.id_card))
            except IdentifierError as exc:
                issues.append(Issue("error", "value", card_at, exc.message, "102"))
        else:
            issues.append(Issue("warning", "required", card_at,
                                "no 身份证号: the worker cannot be matched across institutions", "101"))
        sex, sex_at = fact_of("sex")
        p.sex, p.where["sex"] = sex, sex_at
        birth, birth_at = fact_of("birth_date")
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
        split = re.compile("|".join(re.escape(s) for s in layout.separators)) if layout.separators else None

        def parts(text: str) -> list[str]:
            return [p.strip() for p in _split_outside_brackets(text, split) if p.strip()]

        cells_seen: set[tuple[str, str]] = set()
        for row_no, _, fields, _ in rows:
            pair = (cell(fields, "hazard_code"), cell(fields, "hazard_name"))
            if pair in cells_seen:
                continue  # exports repeat the exam's factors on every row
            cells_seen.add(pair)
            codes, names = parts(pair[0]), parts(pair[1])
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


class _ItemColumns:
    """Reads one row's exam item: column indexes and error locations prepared once per exam."""

    def __init__(self, layout: Layout, cols: dict[str, int]) -> None:
        facts = ("item_code", "item_name", "value", "unit", "reference_range", "flag")
        self.idx = {fact: cols.get(fact) for fact in facts}
        self.names = {fact: layout.columns.get(fact, fact) for fact in ("item_code", "value", "unit", "flag")}

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
                     "status": f"row {row_no}"}
        res.unit = get("unit")
        res.reference_range = get("reference_range")
        flag = get("flag")
        if flag:
            res.flags.append(flag)
        value = get("value")
        if value:
            q = parse_number(value)
            if q is not None:
                res.value_kind, res.value = "quantity", q
            elif (problem := number_problem(value)) != "is not a number":  # a number no signed report can carry
                issues.append(Issue("error", "value", res.where["value"], f"result {shown(value)} {problem}", "102"))
                return None
            else:
                res.value_kind, res.value = "string", value
        return res


def _split_outside_brackets(text: str, split: re.Pattern[str] | None) -> list[str]:
    """``text`` cut at the separators that are not inside brackets (（）or ()): 麻尘（亚麻、黄麻和苎麻）is one name."""
    if split is None:
        return [text]
    out: list[str] = []
    depth = start = 0
    last = 0
    for m in split.finditer(text):
        segment = text[last:m.start()]
        depth += segment.count("（") + segment.count("(") - segment.count("）") - segment.count(")")
        last = m.start()
        if depth <= 0:
            out.append(text[start:m.start()])
            start = m.end()
            depth = 0
    out.append(text[start:])
    return out


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


def _records(stream: IO[bytes], codec: str, limit: int = 0) -> Iterator[tuple[int, bytes, list[str], str]]:
    """(row number, raw bytes, fields, problem or "") per CSV record after the header (row 2 on).

    A quoted field may span lines; multi-byte GBK and UTF-8 characters never
    contain the bytes of ``"``, CR or LF, so records are cut safely before decoding.
    A record longer than ``limit`` bytes (when given) is read no further than
    that: the rest is skipped unheld and the record comes back as its first
    ``limit + 1`` bytes, which its exam cannot hold.
    """
    row_no = 1
    pending = b""
    while True:
        line = stream.readline(limit + 1 - len(pending)) if limit else stream.readline()
        if not line:
            break
        pending += line
        if limit and len(pending) > limit:
            _skip_record(stream, pending.count(b'"') % 2 == 1, pending.endswith(b"\n"))
            row_no += 1
            yield row_no, pending, _fields(pending.decode(codec, errors="replace")), ""
            pending = b""
            continue
        if pending.count(b'"') % 2:
            continue  # inside a quoted field: the record goes on
        raw, pending = pending, b""
        if not raw.strip():
            continue
        row_no += 1
        problem = ""
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            text, problem = raw.decode(codec, errors="replace"), f"row is not valid {codec} text (the header is)"
        yield row_no, raw, _fields(text), problem
    if pending.strip():
        yield row_no + 1, pending, _fields(pending.decode(codec, errors="replace")), \
            "a quoted field is not closed before the end of the file"


def _skip_record(stream: IO[bytes], quoted: bool, ended: bool) -> None:
    """Read past the rest of a record, a chunk at a time: to the line end outside a quoted field."""
    while not ended or quoted:
        chunk = stream.readline(_SKIP_CHUNK)
        if not chunk:
            return
        quoted ^= chunk.count(b'"') % 2 == 1
        ended = chunk.endswith(b"\n")


def _fields(text: str) -> list[str]:
    line = text.rstrip("\r\n")
    if '"' not in line:
        return line.split(",")  # the common case, much faster than the csv module
    return next(csv.reader(io.StringIO(line, newline="")), [])


def _rows(meta: dict[str, Any]) -> str:
    first, last = meta["first_row"], meta["last_row"]
    return f"row {first}" if first == last else f"rows {first}-{last}"


def _short(value: str, limit: int = 64) -> str:
    """An identifier as a label shows it: whole when it is of a sane length, else its start."""
    return value if len(value) <= limit else f"{value[:limit]}…"
