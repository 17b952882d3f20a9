"""FHIR search: parameter parsing and resource indexing, without I/O.

Dates follow the FHIR search rules: a value stands for the range its precision
implies (``2024-03`` is the whole of March 2024), resource dates likewise,
and the prefixes ``eq ne lt gt le ge sa eb ap`` compare those ranges.
Tokens take the forms ``code``, ``system|code``, ``|code`` and ``system|``.
The store keeps the index; this module says what goes into it and what a
query means.
"""
from __future__ import annotations

import calendar
import datetime as _dt
import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.errors import InputError, InvalidSearch, shown

__all__ = [
    "check_sort",
    "IMPLICIT_SYSTEMS",
    "DateQuery",
    "TokenQuery",
    "date_range",
    "date_bounds",
    "parse_date_query",
    "parse_token_query",
    "SEARCH_PARAMS",
    "INCLUDES",
    "PARAM_ALIASES",
    "index_resource",
    "date_matches_sql",
]

_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<mo>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,9}))?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$",
    re.ASCII,  # digits 0-9 only: int() would read other scripts' digits too
)
_CST = _dt.timezone(_dt.timedelta(hours=8))


def date_bounds(value: str, default_tz: _dt.tzinfo = _CST) -> tuple[_dt.datetime, _dt.datetime]:
    """[low, high) of a FHIR date/dateTime/instant, by its precision (``2024-03`` is all of March).

    A value without a zone is read in ``default_tz`` (China Standard Time unless told otherwise);
    fractional seconds count to their last digit (``.5`` is a tenth of a second wide).

    :raises InputError: not a FHIR date, or not a calendar date/time.
    """
    m = _DATE.match(value.strip())
    if not m:
        raise InputError(f"{shown(value)} is not a FHIR date "
                         "(YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss][zone])", "date")
    g = m.groupdict()
    zone: _dt.tzinfo = default_tz
    if g["tz"] and g["tz"] != "Z":
        tz = g["tz"]
        if int(tz[1:3]) > 23 or int(tz[4:6]) > 59:
            raise InputError(f"{shown(value)} has the UTC offset {tz}, outside -23:59 to +23:59", "date")
        zone = _dt.timezone(_dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * (1 if tz[0] == "+" else -1))
    elif g["tz"]:
        zone = _dt.timezone.utc
    try:
        year = int(g["y"])
        if g["mo"] is None:
            low = _dt.datetime(year, 1, 1, tzinfo=zone)
            return low, _later(low, _dt.timedelta(days=366 if calendar.isleap(year) else 365))
        if g["d"] is None:
            month = int(g["mo"])
            low = _dt.datetime(year, month, 1, tzinfo=zone)
            return low, _later(low, _dt.timedelta(days=calendar.monthrange(year, month)[1]))
        day = _dt.datetime(year, int(g["mo"]), int(g["d"]), tzinfo=zone)
        if g["h"] is None:
            return day, _later(day, _dt.timedelta(days=1))
        low = day.replace(hour=int(g["h"]), minute=int(g["mi"]), second=int(g["s"] or 0))
        if g["s"] is None:
            return low, _later(low, _dt.timedelta(minutes=1))
        if g["f"] is None:
            return low, _later(low, _dt.timedelta(seconds=1))
        digits = g["f"][:6]
        low = low.replace(microsecond=int(digits.ljust(6, "0")))
        return low, _later(low, _dt.timedelta(microseconds=10 ** (6 - len(digits))))
    except ValueError as exc:
        raise InputError(f"{shown(value)} is not a calendar date/time ({exc})", "date") from None


def _later(moment: _dt.datetime, width: _dt.timedelta) -> _dt.datetime:
    """The end of a period starting at ``moment``; the last moment a datetime holds for one ending after 9999."""
    try:
        return moment + width
    except OverflowError:
        return _dt.datetime.max.replace(tzinfo=moment.tzinfo)


@functools.lru_cache(maxsize=4096)
def date_range(value: str, default_tz: _dt.tzinfo = _CST) -> tuple[float, float]:
    """:func:`date_bounds` in epoch seconds (remembered: the Observations of a report share their times).

    :raises InputError: not a FHIR date.
    """
    low, high = date_bounds(value, default_tz)
    return low.timestamp(), high.timestamp()


@dataclass(frozen=True)
class DateQuery:
    """One ``date=`` value: prefix and the range of the value."""

    prefix: str
    lo: float
    hi: float


@dataclass(frozen=True)
class TokenQuery:
    """One token value: ``system`` None means any system, ``""`` means no system."""

    system: str | None
    code: str | None


def parse_date_query(value: str, param: str = "date") -> DateQuery:
    """``ge2024-01-01`` -> DateQuery("ge", ...).

    :raises InputError: unknown prefix or not a date (location = the parameter).
    """
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    rest = value[2:] if value[:2] in _PREFIXES else value
    # a zone's "+" sent unencoded in a query string arrives as a space: "08:00:00 08:00" is read as "+08:00"
    rest = re.sub(r" (\d{2}:\d{2})$", r"+\1", rest)
    try:
        lo, hi = date_range(rest)
    except InputError as exc:
        raise InvalidSearch(f"search parameter {param}: {exc.message}", param) from None
    return DateQuery(prefix, lo, hi)


def date_matches_sql(q: DateQuery, lo_col: str = "lo", hi_col: str = "hi") -> tuple[str, list[float]]:
    """SQL condition (and arguments) for a resource range [lo, hi) matching the query.

    eq: the resource range lies within the value's range; ne: not eq;
    gt/lt: the resource range extends above/below the value's range;
    ge/le: gt or eq / lt or eq; sa/eb: starts after / ends before the value's
    range; ap: the ranges overlap (the gateway's reading of "approximately").
    """
    eq = f"({lo_col} >= ? AND {hi_col} <= ?)"
    conditions = {
        "eq": (eq, [q.lo, q.hi]),
        "ne": (f"NOT {eq}", [q.lo, q.hi]),
        "gt": (f"{hi_col} > ?", [q.hi]),
        "lt": (f"{lo_col} < ?", [q.lo]),
        "ge": (f"({hi_col} > ? OR {eq})", [q.hi, q.lo, q.hi]),
        "le": (f"({lo_col} < ? OR {eq})", [q.lo, q.lo, q.hi]),
        "sa": (f"{lo_col} >= ?", [q.hi]),
        "eb": (f"{hi_col} <= ?", [q.lo]),
        "ap": (f"({lo_col} < ? AND {hi_col} > ?)", [q.hi, q.lo]),
    }
    return conditions[q.prefix]


def parse_token_query(value: str) -> TokenQuery:
    """``system|code``, ``code``, ``|code`` or ``system|`` (one of :func:`split_or`'s values: ``\\|`` is a bar
    inside the system or the code, not the one between them)."""
    if "\\" in value:
        bar = re.search(r"(?<!\\)(?:\\\\)*\|", value)
        if bar is None:
            return TokenQuery(None, unescape(value))
        system, code = value[:bar.end() - 1], value[bar.end():]
        return TokenQuery(unescape(system), unescape(code) or None)
    if "|" not in value:
        return TokenQuery(None, value)
    system, _, code = value.partition("|")
    return TokenQuery(system, code or None)


_ESCAPED = re.compile(r"\\([,$|\\])")


def split_or(value: str) -> list[str]:
    """The values of one search parameter, separated by commas (any of them matches). R4 search.html, "Escaping
    search parameters": ``\\,`` is a comma inside a value (a name, an identifier with a comma in it), and ``\\$``,
    ``\\|`` and ``\\\\`` a dollar, a bar and a backslash; the values keep their escapes (:func:`unescape`)."""
    if "\\" not in value:
        return value.split(",")
    parts: list[str] = []
    start = n = 0
    while n < len(value):
        if value[n] == "\\" and n + 1 < len(value):
            n += 2
            continue
        if value[n] == ",":
            parts.append(value[start:n])
            start = n + 1
        n += 1
    parts.append(value[start:])
    return parts


def unescape(value: str) -> str:
    """One of :func:`split_or`'s values as the text it searches for."""
    return _ESCAPED.sub(r"\1", value) if "\\" in value else value


#: Search parameters per resource type: name -> (kind, what it indexes).
SEARCH_PARAMS: dict[str, dict[str, str]] = {
    "DiagnosticReport": {
        "_id": "token", "identifier": "token", "code": "token", "status": "token", "category": "token",
        "date": "date", "issued": "date", "patient": "reference",
        "patient.identifier": "token", "performer.identifier": "token",
    },
    "Observation": {
        "_id": "token", "code": "token", "status": "token", "category": "token", "date": "date",
        "patient": "reference", "patient.identifier": "token",
        "performer.identifier": "token",
    },
    "Patient": {"_id": "token", "identifier": "token", "gender": "token", "birthdate": "date",
                "name": "string", "family": "string", "given": "string"},
    "Organization": {"_id": "token", "identifier": "token"},
    "Specimen": {"_id": "token", "identifier": "token", "patient": "reference", "patient.identifier": "token"},
}

#: Token parameters on a ``code`` element, whose values are indexed without a system: the code system the element's
#: required binding implies, so that ``gender=http://hl7.org/fhir/administrative-gender|male`` matches ``male``.
IMPLICIT_SYSTEMS: dict[tuple[str, str], str] = {
    ("Patient", "gender"): "http://hl7.org/fhir/administrative-gender",
    ("Observation", "status"): "http://hl7.org/fhir/observation-status",
    ("DiagnosticReport", "status"): "http://hl7.org/fhir/diagnostic-report-status",
}

for _params in SEARCH_PARAMS.values():  # when the gateway last stored each resource (``meta.lastUpdated``)
    _params["_lastUpdated"] = "date"

#: References ``_include`` follows and ``_revinclude`` follows back: source type -> element -> type it names.
INCLUDES: dict[str, dict[str, str]] = {
    "DiagnosticReport": {"subject": "Patient", "result": "Observation", "specimen": "Specimen",
                         "performer": "Organization"},
    "Observation": {"subject": "Patient", "specimen": "Specimen", "performer": "Organization"},
    "Specimen": {"subject": "Patient"},
}

#: Other spellings of the same parameter (chained search on the subject).
PARAM_ALIASES = {
    "subject:Patient.identifier": "patient.identifier",
    "patient:Patient.identifier": "patient.identifier",
    "subject.identifier": "patient.identifier",
    "subject:Patient": "patient",
    "subject": "patient",  # every subject the gateway stores is a Patient
    "performer:Organization.identifier": "performer.identifier",
    # the R4 :identifier modifier: the identifier of the resource the reference names
    "subject:identifier": "patient.identifier",
    "patient:identifier": "patient.identifier",
    "performer:identifier": "performer.identifier",
}


def _codings(cc: Any) -> Iterable[tuple[str, str]]:
    for coding in (cc or {}).get("coding", []):
        if coding.get("code"):
            yield coding.get("system", ""), coding["code"]


def index_resource(res: dict[str, Any], resolve: Any = None) -> tuple[list[tuple[str, str, str]],
                                                                      list[tuple[str, float, float]]]:
    """(tokens, dates) to index for one resource.

    ``resolve(reference) -> resource | None`` finds referenced resources (the
    subject Patient, the performer Organization) for chained parameters.
    """
    rtype = res.get("resourceType", "")
    # _id is the resources table's own key (no index row needed)
    tokens: list[tuple[str, str, str]] = []
    dates: list[tuple[str, float, float]] = []

    def add_date(param: str, value: Any) -> None:
        if isinstance(value, str) and value:
            try:
                lo, hi = date_range(value)
            except InputError:
                return
            dates.append((param, lo, hi))

    def add_period(param: str, period: Any) -> None:
        # [start's low, end's high): a Period without a start began at an unknown time, one without an end goes on
        if not isinstance(period, dict):
            return
        start, end = period.get("start"), period.get("end")
        try:
            lo = date_range(start)[0] if isinstance(start, str) and start else -math.inf
            hi = date_range(end)[1] if isinstance(end, str) and end else math.inf
        except InputError:
            return
        if lo < hi and (lo, hi) != (-math.inf, math.inf):
            dates.append((param, lo, hi))

    for ident in res.get("identifier", []) if isinstance(res.get("identifier"), list) else []:
        if ident.get("value"):
            tokens.append(("identifier", ident.get("system", ""), ident["value"]))
    if rtype in ("DiagnosticReport", "Observation"):
        tokens += [("code", s, c) for s, c in _codings(res.get("code"))]
        for cat in res.get("category", []):
            tokens += [("category", s, c) for s, c in _codings(cat)]
        if res.get("status"):
            tokens.append(("status", "", res["status"]))
        add_date("date", res.get("effectiveDateTime"))  # effective[x]: the one of the four the resource has
        add_date("date", res.get("effectiveInstant"))  # (Observation only)
        add_period("date", res.get("effectivePeriod"))
        add_date("issued", res.get("issued"))
    if rtype == "Patient":
        if res.get("gender"):
            tokens.append(("gender", "", res["gender"]))
        add_date("birthdate", res.get("birthDate"))
    subject = res.get("subject", {}).get("reference", "")
    if subject:
        # (patient.identifier is answered from the subject Patient's own identifier index, as it is now: see
        # gateway.store.store, _CHAINED; nothing of the Patient is copied into this resource's index)
        tokens.append(("patient", "", subject))
    for perf in res.get("performer", []) if rtype in ("DiagnosticReport", "Observation") else []:
        target = resolve(perf.get("reference", "")) if resolve else None
        if target is not None:
            for ident in target.get("identifier", []):
                if ident.get("value"):
                    tokens.append(("performer.identifier", ident.get("system", ""), ident["value"]))
    return tokens, dates


def check_sort(rtype: str, sort: Iterable[tuple[str, bool]]) -> None:
    """Each ``_sort`` key of a search of ``rtype`` is one of its date parameters (the ones results are sorted by).

    :raises InvalidSearch: another key, naming ``_sort`` and the keys taken.
    """
    known = SEARCH_PARAMS.get(rtype, {})
    for name, _ in sort:
        if known.get(name) != "date":
            raise InvalidSearch(f"_sort by {name!r} is not supported for {rtype} (supported: "
                                f"{', '.join(sorted(n for n, k in known.items() if k == 'date'))})", "_sort",
                                code="not-supported")
