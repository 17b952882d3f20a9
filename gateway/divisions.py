"""GB/T 2260 administrative divisions of 四川 (51) and 重庆 (50), versioned.

The table is ``mappings/divisions/gb2260-chuanyu.csv``: one row per code and
period, each with where the fact came from and how sure it is. A code is valid
on a day when one of its rows covers that day; codes change (郫县 510124 became
郫都区 510117, 重庆's places had Sichuan codes before 1997), so questions are
always asked for a date.

Two uses:

- a registry member's ``division`` must be a standard code valid on its
  listing date (:func:`division_problem`);
- the address code of a 身份证号 is the code at first registration and never
  changes, so it must have been valid at some time on or after the birth date
  (:func:`id_card_region_problem`); a 川渝 code in no version of the table is
  only a warning (:func:`id_card_region_warning`), the table may miss history.

Outside 川渝 only the province prefix is checked (a 2023 外国人永久居留身份证,
``9`` + province + nationality, passes on its province).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gateway.errors import ConfigError

__all__ = [
    "TABLE_PATH",
    "PROVINCE_PREFIXES",
    "Division",
    "DivisionTable",
    "division_table",
    "load_division_table",
    "division_problem",
    "id_card_region_problem",
    "id_card_region_warning",
]

#: The versioned table (kept with the other tables under mappings/).
TABLE_PATH = Path(__file__).resolve().parent.parent / "mappings" / "divisions" / "gb2260-chuanyu.csv"

#: GB/T 2260 province-level prefixes (31 provinces, 台湾 71, 香港 81, 澳门 82; 83 for 台湾 residence permits).
PROVINCE_PREFIXES: frozenset[str] = frozenset(
    [str(n) for n in (*range(11, 16), *range(21, 24), *range(31, 38), *range(41, 47), *range(50, 55))]
    + [str(n) for n in (*range(61, 66), 71, 81, 82, 83)]
)

_STATUSES = ("standard", "non-standard")
_CONFIDENCE = ("verified", "likely", "recollection")


@dataclass(frozen=True)
class Division:
    """One code over one period."""

    code: str
    name: str
    start: _dt.date | None
    end: _dt.date | None
    replaced_by: tuple[str, ...]
    standard: bool
    source: str
    confidence: str

    def covers(self, day: _dt.date) -> bool:
        """True when this row is valid on ``day``."""
        return (self.start is None or self.start <= day) and (self.end is None or day <= self.end)

    def period_text(self) -> str:
        """``2016-11-24 – `` style text for messages."""
        return f"{self.start or '…'} – {self.end or ''}".rstrip()


class DivisionTable:
    """The rows of the table, by code."""

    def __init__(self, rows: list[Division], version: str = "") -> None:
        self.version = version
        self._by_code: dict[str, tuple[Division, ...]] = {}
        for row in rows:
            self._by_code[row.code] = (*self._by_code.get(row.code, ()), row)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_code.values())

    def versions(self, code: str) -> tuple[Division, ...]:
        """Every row of ``code`` (empty when the table does not know it)."""
        return self._by_code.get(code, ())

    def codes(self) -> list[str]:
        """Every code the table knows."""
        return sorted(self._by_code)

    def valid_on(self, code: str, day: _dt.date) -> Division | None:
        """The standard row of ``code`` valid on ``day``, or None."""
        return next((r for r in self.versions(code) if r.standard and r.covers(day)), None)

    def non_standard(self, code: str) -> Division | None:
        """The row flagging ``code`` as not a GB/T 2260 code, or None."""
        return next((r for r in self.versions(code) if not r.standard), None)

    def valid_since(self, code: str, day: _dt.date) -> bool:
        """True when a standard row of ``code`` is valid at some time on or after ``day``."""
        return any(r.standard and (r.end is None or day <= r.end) for r in self.versions(code))


def _date(text: str, where: str) -> _dt.date | None:
    if not text:
        return None
    try:
        return _dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a YYYY-MM-DD date", where) from None


def load_division_table(path: Path = TABLE_PATH) -> DivisionTable:
    """Read and check a division table.

    :raises ConfigError: unreadable, or a row is malformed (the message names the row and column).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        hint = ("; the gateway runs from its checkout, which holds mappings/ and profiles/: install it there with "
                "pip install -e <checkout>" if path == TABLE_PATH and not path.parent.parent.exists() else "")
        raise ConfigError(f"cannot read the division table {path}: {exc.strerror or exc}{hint}", str(path)) from None
    version = ""
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            if line.startswith("# version:"):
                version = line.split(":", 1)[1].strip()
            continue
        lines.append(line)
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    rows: list[Division] = []
    for n, rec in enumerate(reader, start=2):
        where = f"{path.name} row {n}"
        code = (rec.get("code") or "").strip()
        if len(code) != 6 or not code.isdigit():
            raise ConfigError(f"{where} column code: {code!r} is not a 6-digit code", where)
        status = rec.get("status") or ""
        if status not in _STATUSES:
            raise ConfigError(f"{where} column status: {status!r} is not one of {', '.join(_STATUSES)}", where)
        confidence = rec.get("confidence") or ""
        if confidence not in _CONFIDENCE:
            raise ConfigError(f"{where} column confidence: {confidence!r} is not one of {', '.join(_CONFIDENCE)}",
                              where)
        start = _date(rec.get("valid_from") or "", f"{where} column valid_from")
        end = _date(rec.get("valid_to") or "", f"{where} column valid_to")
        if start and end and end < start:
            raise ConfigError(f"{where} column valid_to: {end} is before valid_from {start}", where)
        rows.append(
            Division(
                code=code,
                name=(rec.get("name") or "").strip(),
                start=start,
                end=end,
                replaced_by=tuple(c for c in (rec.get("replaced_by") or "").split("|") if c),
                standard=status == "standard",
                source=rec.get("source") or "",
                confidence=confidence,
            )
        )
    return DivisionTable(rows, version)


@lru_cache(maxsize=1)
def division_table() -> DivisionTable:
    """The table shipped with the gateway (read once)."""
    return load_division_table()


def division_problem(code: str, on: _dt.date | None, table: DivisionTable | None = None) -> str | None:
    """Why ``code`` cannot be an institution's division on ``on`` (its listing date), or None when it can."""
    table = table or division_table()
    flagged = table.non_standard(code)
    if flagged is not None:
        return (f"{code} ({flagged.name}) is not a GB/T 2260 division code: it comes from another code list "
                "(统一直报); use the GB/T 2260 code of the district or county it lies in")
    versions = table.versions(code)
    if not versions:
        return f"{code} is not a GB/T 2260 division code of 四川 or 重庆 in any version known to the gateway"
    if on is not None and table.valid_on(code, on) is None:
        periods = "; ".join(f"{r.name} {r.period_text()}" for r in versions)
        later = sorted({c for r in versions for c in r.replaced_by})
        hint = f" (replaced by {', '.join(later)})" if later else ""
        return f"{code} is not a valid GB/T 2260 division on {on} (valid: {periods}){hint}"
    return None


def id_card_region_problem(number: str, birth: _dt.date, table: DivisionTable | None = None) -> str | None:
    """Why the address code of a 身份证号 born on ``birth`` is impossible, or None.

    川渝 codes the table knows must be valid at some time on or after the birth date (a number keeps the code
    of its first registration); codes the table does not know pass here (see :func:`id_card_region_warning`).
    Elsewhere the province prefix must exist.
    """
    code = number[:6]
    if code[0] == "9" and code[1:3] in PROVINCE_PREFIXES:
        return None  # 外国人永久居留身份证 (2023): 9, the issuing province, a nationality code; same check digit
    if code[:2] not in PROVINCE_PREFIXES:
        return f"身份证号 address code {code} starts with {code[:2]}, which is no province of GB/T 2260"
    if code[:2] not in ("50", "51"):
        return None
    table = table or division_table()
    flagged = table.non_standard(code)
    if flagged is not None:
        return f"身份证号 address code {code} ({flagged.name}) is not a GB/T 2260 code and is never issued"
    retired = _retired_before(code, birth, table)
    if retired is not None and not _within_doubt(retired, birth):
        return (f"身份证号 address code {code} ({retired.name}) stopped being valid on {retired.end}, before the birth "
                f"date {birth}: no number born then carries it")
    return None


#: How long after a code's retirement registries may still have issued it (systems are updated late): a birth in
#: that time is a warning, not a refusal. So is any retirement the table only recollects.
ISSUE_LAG = _dt.timedelta(days=366)


def _retired_before(code: str, birth: _dt.date, table: DivisionTable) -> Division | None:
    """The last row of a known 川渝 ``code`` when every row of it ended before ``birth``, else None."""
    versions = table.versions(code)
    if not versions or table.valid_since(code, birth):
        return None
    return max((r for r in versions if r.end is not None), key=lambda r: r.end or _dt.date.min)


def _within_doubt(row: Division, birth: _dt.date) -> bool:
    return row.confidence == "recollection" or (row.end is not None and birth - row.end <= ISSUE_LAG)


def id_card_region_warning(number: str, table: DivisionTable | None = None) -> str | None:
    """A warning when a 川渝 address code is in no version of the table (it may still be real), or was retired
    shortly before the birth date (or on a date the table only recollects), else None."""
    code = number[:6]
    if code[:2] not in ("50", "51"):
        return None
    table = table or division_table()
    if not table.versions(code):
        return (f"身份证号 address code {code} is not in the gateway's GB/T 2260 table of 四川/重庆 codes "
                f"(version {table.version}); it is accepted, check it if the number was typed by hand")
    try:
        birth = _dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return None
    retired = _retired_before(code, birth, table)
    if retired is not None and _within_doubt(retired, birth):
        return (f"身份证号 address code {code} ({retired.name}) stopped being valid on {retired.end}, before the birth "
                f"date {birth}; it is accepted (registries issued retired codes for a while), check it if the "
                "number was typed by hand")
    return None
