"""Audit query: FHIR search over the audit log (``GET /fhir/AuditEvent``).

Supported parameters, as the R4 AuditEvent search parameters define them:

=====================  ===========  ==============================================
``date``               date         AuditEvent.recorded; prefixes eq ne lt le gt ge sa eb;
                                    partial dates (``2025``, ``2025-05``, ``2025-05-01``,
                                    ``...T08:00``) are ranges; no offset = the gateway's
``type``, ``subtype``  token        ``[system]|[code]``, ``code``, ``|code``, ``system|``
``outcome``            token        ``0`` ``4`` ``8`` ``12``
``agent``              reference    agent.who (``Type/id``); ``agent:identifier`` token
``entity``             reference    entity.what; ``entity:identifier`` / ``entity-id`` token
``patient``            reference    who/what that is a Patient; ``patient:identifier`` token
``_id``                token        the entry number
``_count``             number       page size (default 50, at most 1000; 0 = total only)
``_sort``              -            ``date`` or ``-date`` (default ``-date``: newest first)
=====================  ===========  ==============================================

A comma inside one parameter means OR; repeating a parameter means AND.
``\\,`` ``\\|`` ``\\$`` ``\\\\`` escape. Anything else is refused with the
parameter named (FHIR: a server SHALL NOT silently ignore parameters it was
asked to honour when ``handling=strict``; we are always strict).

Paging is by key set, not offset: the ``next`` link carries an opaque
``_cursor`` holding the last (date, entry) returned and the newest entry that
existed when the first page was read, so later pages neither skip nor repeat
entries while new ones are appended.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

from gateway.audit.log import Entry, epoch_ms
from gateway.audit.records import PatientRef
from gateway.audit.render import patient_key
from gateway.errors import InputError, InvalidSearch
from gateway.fhir.search import date_bounds
from gateway.identifiers import id_card_or_none
from gateway.naming import SYSTEM_ID_CARD
from gateway.store.audit import audit_store, date_condition
from gateway.store.db import Database

__all__ = [
    "DateRange",
    "Search",
    "Page",
    "parse_search",
    "parse_date",
    "parse_offset",
    "run",
    "count",
    "iter_matches",
    "searchset",
    "PARAMETERS",
]

DEFAULT_COUNT = 50
MAX_COUNT = 1000

#: Every parameter name accepted (with its modifier, where one is allowed).
PARAMETERS = (
    "date",
    "type",
    "subtype",
    "outcome",
    "agent",
    "agent:identifier",
    "entity",
    "entity:identifier",
    "entity-id",
    "patient",
    "patient:identifier",
    "_id",
    "_count",
    "_summary",
    "_sort",
    "_cursor",
    "_format",
    "_pretty",
)
_PREFIXES = ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap")
#: Token parameters held in a column of their own (the rest are search keys).
_COLUMN_TOKENS = ("type", "subtype", "outcome")
_KEY_PARAMS = {
    "agent": "agent",
    "agent:identifier": "agent:identifier",
    "entity": "entity",
    "entity:identifier": "entity:identifier",
    "entity-id": "entity:identifier",
    "patient": "patient",
    "patient:identifier": "patient:identifier",
}
_OUTCOME_SYSTEM = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
_FORMATS = ("json", "application/json", "application/fhir+json")


@dataclass(frozen=True)
class DateRange:
    """One ``date`` value: a prefix and the half-open range ``[low, high)`` in ms since 1970 UTC."""

    prefix: str
    low: int
    high: int

    def sql(self) -> tuple[str, list[int]]:
        """SQL condition on ``l.t`` for an instant (a point) against this range, per the FHIR prefix rules."""
        return date_condition(self)


@dataclass(frozen=True)
class Token:
    """One token value: ``system`` None = any system, ``""`` = no system; ``code`` None = any code."""

    system: str | None
    code: str | None


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after (t, seq); entries newer than ``upto`` are out of this search."""

    upto: int
    t: int
    seq: int


@dataclass(frozen=True)
class Search:
    """A parsed search: AND of OR-lists per parameter, page size, order and position."""

    dates: tuple[tuple[DateRange, ...], ...] = ()
    columns: tuple[tuple[str, tuple[Token, ...]], ...] = ()
    keys: tuple[tuple[str, tuple[Token, ...]], ...] = ()
    ids: tuple[tuple[int, ...], ...] = ()
    count: int = DEFAULT_COUNT
    descending: bool = True
    cursor: Cursor | None = None
    params: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def query_string(self, *, cursor: Cursor | None = None) -> str:
        """The search as a query string (without ``_cursor`` unless one is given)."""
        pairs = [(k, v) for k, v in self.params if k != "_cursor"]
        if cursor is not None:
            pairs.append(("_cursor", _encode_cursor(cursor)))
        return urlencode(pairs)

    def patient(self) -> PatientRef | None:
        """The patient the search names (``patient`` or ``patient:identifier``), for the audit entry of the search."""
        for name, value in self.params:
            if name == "patient":
                return PatientRef(reference=_reference(value, name).code)
            if name == "patient:identifier":
                system, sep, code = value.partition("|")
                return PatientRef(code, system or None) if sep else PatientRef(value)
        return None


@dataclass(frozen=True)
class Page:
    """One page of results and where the next one starts (None on the last page)."""

    entries: list[Entry]
    next: Cursor | None
    total: int | None = None
    #: The last entry the search looked at (a paging cursor's snapshot: entries appended later are not counted).
    upto: int | None = None


def parse_offset(offset: str) -> _dt.tzinfo:
    """A tzinfo from ``+08:00``.

    :raises InputError: not an offset.
    """
    m = re.match(r"^([+-])(\d{2}):(\d{2})$", offset or "")
    if not m:
        raise InputError(f"time zone offset {offset!r} must look like +08:00", "timezone")
    delta = _dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
    return _dt.timezone(-delta if m.group(1) == "-" else delta)


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` not escaped with a backslash, then unescape (FHIR search escaping)."""
    parts, current, i = [], [], 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            current.append(value[i:i + 2])
            i += 2
            continue
        if char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\([\\,|$])", r"\1", value)


def parse_date(value: str, tz: _dt.tzinfo, *, name: str = "date") -> DateRange:
    """One ``date`` search value: optional prefix, then a partial date/time, as a range.

    :raises InvalidSearch: unknown prefix, ``ap``, or not a (partial) date/time.
    """
    raw = value.strip()
    prefix = "eq"
    if raw[:2].isalpha():
        prefix, raw = raw[:2], raw[2:]
        if prefix not in _PREFIXES:
            raise InvalidSearch(f"{name}: unknown prefix {prefix!r} (use eq, ne, lt, le, gt, ge, sa or eb)", name)
        if prefix == "ap":
            raise InvalidSearch(f"{name}: prefix 'ap' (approximately) is not supported", name, code="not-supported")
    # An unencoded '+' in a query string arrives as a space: read "08:00:00 08:00" as "+08:00".
    raw = re.sub(r" (\d{2}:\d{2})$", r"+\1", raw)
    try:
        low, high = date_bounds(raw, tz)
    except InputError as exc:
        raise InvalidSearch(f"{name}: {exc.message}", name) from None
    return DateRange(prefix, _ceil_ms(low), _ceil_ms(high))


def _ceil_ms(at: _dt.datetime) -> int:
    """Milliseconds, rounded up: an instant t (whole ms) is >= ``at`` exactly when t >= this."""
    floor = epoch_ms(at)
    return floor + (1 if at.microsecond % 1000 else 0)


def _id_card_forms(token: Token) -> list[str | None]:
    """The values a patient identifier is searched by: as typed, and for a 身份证号 (asked with its system or without
    one) also as entries name it, normalised (``x`` as ``X``)."""
    if not token.code or token.system not in (None, "", SYSTEM_ID_CARD):
        return [token.code]
    normal = id_card_or_none(token.code)
    return [token.code] if normal in (None, token.code) else [token.code, normal]


def _token(value: str, name: str) -> Token:
    parts = _split(value, "|")
    if len(parts) == 1:
        code = _unescape(parts[0])
        if not code:
            raise InvalidSearch(f"{name}: empty value", name)
        return Token(None, code)
    if len(parts) != 2:
        raise InvalidSearch(f"{name}: {value[:60]!r} has more than one '|'", name)
    system, code = _unescape(parts[0]), _unescape(parts[1])
    if not system and not code:
        raise InvalidSearch(f"{name}: empty value", name)
    return Token(system, code or None)


def _reference(value: str, name: str) -> Token:
    ref = _unescape(value).strip()
    # An absolute URL names the same resource by its last two segments (Type/id).
    m = re.match(r"^(?:https?://.*/)?([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]+)?$", ref)
    if m:
        ref = m.group(1)
    elif name == "patient" and re.match(r"^[A-Za-z0-9\-.]{1,64}$", ref):
        ref = f"Patient/{ref}"
    else:
        raise InvalidSearch(f"{name}: {value[:60]!r} is not a reference (Type/id)", name)
    if name == "patient" and not ref.startswith("Patient/"):
        raise InvalidSearch(f"{name}: {value[:60]!r} is not a Patient reference", name)
    return Token("", ref)


def _ors(value: str, name: str) -> list[str]:
    values = [v for v in _split(value, ",")]
    if any(not v.strip() for v in values):
        raise InvalidSearch(f"{name}: empty value", name)
    return values


def parse_search(
    params: Iterable[tuple[str, str]] | Mapping[str, str],
    *,
    tz: _dt.tzinfo,
    default_count: int = DEFAULT_COUNT,
    max_count: int = MAX_COUNT,
) -> Search:
    """Parse search parameters (``(name, value)`` pairs, repeats allowed).

    :raises InvalidSearch: an unknown parameter or modifier, or a malformed value;
        ``location`` names the parameter.
    """
    pairs = list(params.items() if isinstance(params, Mapping) else params)
    dates: list[tuple[DateRange, ...]] = []
    columns: list[tuple[str, tuple[Token, ...]]] = []
    keys: list[tuple[str, tuple[Token, ...]]] = []
    ids: list[tuple[int, ...]] = []
    count, descending, cursor = default_count, True, None
    summary_count = False
    for name, value in pairs:
        if name not in PARAMETERS:
            base = name.split(":", 1)[0]
            if base in PARAMETERS and base != name:
                raise InvalidSearch(f"modifier of {name!r} is not supported", name, code="not-supported")
            raise InvalidSearch(f"unknown search parameter {name!r} for AuditEvent", name, code="not-supported")
        if name == "date":
            dates.append(tuple(parse_date(v, tz) for v in _ors(value, name)))
        elif name in _COLUMN_TOKENS:
            tokens = tuple(_token(v, name) for v in _ors(value, name))
            if name == "outcome":
                for token in tokens:
                    if token.system not in (None, "", _OUTCOME_SYSTEM) or token.code not in ("0", "4", "8", "12"):
                        raise InvalidSearch(f"outcome: {value[:60]!r} is not 0, 4, 8 or 12", name)
                tokens = tuple(Token(None, t.code) for t in tokens)
            columns.append((name, tokens))
        elif name in _KEY_PARAMS:
            param = _KEY_PARAMS[name]
            if param in ("agent", "entity", "patient"):
                tokens = tuple(_reference(v, name) for v in _ors(value, name))
            else:
                tokens = tuple(_token(v, name) for v in _ors(value, name))
                if param == "patient:identifier":
                    tokens = tuple(Token(t.system, patient_key(code) if code else None)
                                   for t in tokens for code in _id_card_forms(t))
            keys.append((param, tokens))
        elif name == "_id":
            try:
                ids.append(tuple(_entry_number(v) for v in _ors(value, name)))
            except ValueError:
                raise InvalidSearch(f"_id: {value[:60]!r} is not an AuditEvent id", name) from None
        elif name == "_count":
            if not (value.isascii() and value.isdigit()) or len(value) > 12:
                raise InvalidSearch(f"_count: {value[:20]!r} is not a whole number (at most {max_count})", name)
            count = min(int(value), max_count)
        elif name == "_summary":
            if value != "count":
                raise InvalidSearch(f"_summary: {value[:60]!r} is not supported (count only)", name,
                                    code="not-supported")
            summary_count = True
        elif name == "_sort":
            if value not in ("date", "-date"):
                raise InvalidSearch(
                    f"_sort: {value[:60]!r} is not supported (use date or -date)", name, code="not-supported"
                )
            descending = value == "-date"
        elif name == "_cursor":
            cursor = _decode_cursor(value)
        elif name == "_format" and value not in _FORMATS:
            raise InvalidSearch(f"_format: {value[:60]!r} is not supported (JSON only)", name, code="not-supported")
    if summary_count:  # the total only, as _count=0 gives it
        count = 0
    return Search(tuple(dates), tuple(columns), tuple(keys), tuple(ids), count, descending, cursor, tuple(pairs))


def _encode_cursor(cursor: Cursor) -> str:
    raw = json.dumps([cursor.upto, cursor.t, cursor.seq], separators=(",", ":")).encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _entry_number(value: str) -> int:
    """An entry's number (its AuditEvent id): a whole number a database integer holds.

    :raises ValueError: not one.
    """
    number = int(value)
    if not -_INT64 <= number < _INT64:
        raise ValueError(value)
    return number


_INT64 = 2 ** 63


def _decode_cursor(value: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        upto, t, seq = json.loads(raw)
        if not all(type(v) is int and -_INT64 <= v < _INT64 for v in (upto, t, seq)):
            raise ValueError("not a cursor")
        return Cursor(upto, t, seq)
    except (ValueError, TypeError):
        raise InvalidSearch(
            "_cursor: not a paging cursor of this server (follow the next link as given)", "_cursor"
        ) from None


#: A key filter matching fewer entries than this drives the query (its entries are fetched, then
#: sorted); one matching more is checked entry by entry while walking the date index.
DRIVE_LIMIT = 2000


def _plan(db: Database, search: Search) -> frozenset[int]:
    """Which key filter (if any) is selective enough to drive the query: the one matching fewest entries."""
    store = audit_store(db)
    best: tuple[int, int] | None = None
    for i, (param, tokens) in enumerate(search.keys):
        n = store.key_matches(param, tokens, DRIVE_LIMIT)
        if n < DRIVE_LIMIT and (best is None or n < best[1]):
            best = (i, n)
    return frozenset() if best is None else frozenset([best[0]])


def count(db: Database, search: Search, upto: int | None = None) -> int:
    """How many entries match (ignores paging); with ``upto``, of the entries up to that one (a page's
    :attr:`Page.upto`: the total stays the same page after page while entries are appended)."""
    store = audit_store(db)
    store.ensure_schema()
    return store.count(search, upto)


def run(db: Database, search: Search) -> Page:
    """One page of matching entries, in the order asked; ``_count=0`` gives the total only."""
    store = audit_store(db)
    store.ensure_schema()
    if search.count == 0:
        return Page([], None, count(db, search))
    upto = search.cursor.upto if search.cursor else store.last_seq()
    after = (search.cursor.t, search.cursor.seq) if search.cursor else None
    rows = store.page(search, upto=upto, drive=_plan(db, search), after=after, descending=search.descending,
                      limit=search.count + 1)
    more = len(rows) > search.count
    rows = rows[: search.count]
    entries = [Entry.from_row(r[0], r[1], r[2], r[3]) for r in rows]
    nxt = Cursor(upto, rows[-1][4], rows[-1][0]) if more and rows else None
    return Page(entries, nxt, upto=upto)


def iter_matches(db: Database, search: Search, *, batch: int = 500) -> Iterator[Entry]:
    """Every matching entry, page by page (for exports: constant memory however many there are)."""
    current = replace(search, count=batch)
    while True:
        page = run(db, current)
        yield from page.entries
        if page.next is None:
            return
        current = replace(current, cursor=page.next)


def searchset(
    page: Page, search: Search, *, base_url: str, path: str, events: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The page as a FHIR searchset Bundle with ``self`` and ``next`` links.

    ``base_url`` is the FHIR base (``https://host/fhir``), ``path`` the search
    URL without query (``https://host/fhir/AuditEvent``); ``events`` the
    rendered entries when the caller rendered them already.
    """
    rendered = list(events) if events is not None else [e.event() for e in page.entries]
    query = search.query_string(cursor=search.cursor)  # (a later page's self is that page: its cursor with it)
    links = [{"relation": "self", "url": f"{path}?{query}" if query else path}]
    if page.next is not None:
        links.append({"relation": "next", "url": f"{path}?{search.query_string(cursor=page.next)}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    if rendered:
        bundle["entry"] = [
            {
                "fullUrl": f"{base_url.rstrip('/')}/AuditEvent/{event['id']}",
                "resource": event,
                "search": {"mode": "match"},
            }
            for event in rendered
        ]
    return bundle
