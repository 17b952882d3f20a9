"""Audit statistics: the figures regional platforms report (DOMAIN §6), from the log alone.

**互认率 (recognition rate) = accepted ÷ eligible**, where

- a *result* is one item of one report of one issuer, decided for one
  receiver; when it was decided more than once (a ``needs-review`` followed by
  a final decision, a re-run after a registry update) only its **latest
  decision** counts, so every result is counted once;
- only results that match an item of a recognition catalogue count: a result
  outside every catalogue, and a report's diagnostic conclusion (never
  recognisable), are reported separately as ``outside_catalogue``;
- **eligible** results are those whose latest decision is ``recognized`` or
  ``not-recognized``. ``needs-review`` results are excluded: nothing has been
  decided for them yet, and counting them either way would move the rate
  with the review backlog;
- **accepted** results are eligible results decided ``recognized`` whose
  decision was *not* followed by a physician's re-test override. The national rule makes the receiving
  physician's judgement the standard (以接诊医师判断为标准): a result the
  rules recognise but the physician has re-tested was not 互认 for the patient,
  who paid for the test again. So the rate answers "of the results that
  could be decided, how many spared the patient a repeat test".

The rate is given per issuer, receiver, item, catalogue and month (of the
decision, in the offset it was recorded with), with its parts (recognized,
not recognized, needs review, overridden), so the headline figure can always
be recomputed by hand. Also reported: refusals by failing rule id (each rule a
not-recognized result failed counts once), overrides by re-test reason, lookups
(调阅) by reading member, and exchanges (sent, received, refused by reason).

A date filter selects entries by the time they were recorded; an override
recorded after the period still marks a decision inside it as overridden.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from gateway.audit.log import ensure_schema
from gateway.audit.query import DateRange
from gateway.recognition.overrides import RETEST_REASONS

__all__ = ["DEFINITION", "compute", "format_tables", "Group"]

#: One-line definition, repeated in the JSON output and the command help.
DEFINITION = (
    "互认率 = accepted / eligible; eligible = catalogue results (issuer, report, item, receiver; latest decision "
    "each) decided recognized or not-recognized (needs-review, results outside every catalogue and diagnostic "
    "conclusions excluded); accepted = eligible results recognized and not re-tested on a physician's override"
)


@dataclass
class Group:
    """Decision counts of one group (an issuer, a receiver, an item, a catalogue, a month)."""

    key: str
    name: str = ""
    recognized: int = 0
    not_recognized: int = 0
    needs_review: int = 0
    overridden: int = 0

    @property
    def eligible(self) -> int:
        """Results that could be decided: recognized + not recognized."""
        return self.recognized + self.not_recognized

    @property
    def accepted(self) -> int:
        """Recognized results the physician did not re-test."""
        return self.recognized - self.overridden

    @property
    def rate(self) -> float | None:
        """互认率, rounded to 4 places; None when nothing was eligible."""
        return round(self.accepted / self.eligible, 4) if self.eligible else None

    def as_json(self) -> dict[str, Any]:
        """The group as JSON, with the derived figures."""
        out: dict[str, Any] = {"key": self.key}
        if self.name:
            out["name"] = self.name
        out.update(
            {
                "decisions": self.recognized + self.not_recognized + self.needs_review,
                "recognized": self.recognized,
                "not_recognized": self.not_recognized,
                "needs_review": self.needs_review,
                "overridden": self.overridden,
                "eligible": self.eligible,
                "accepted": self.accepted,
                "rate": self.rate,
            }
        )
        return out


@dataclass
class _Totals:
    groups: dict[str, dict[str, Group]] = field(
        default_factory=lambda: {k: {} for k in ("issuer", "receiver", "item", "catalogue", "month")}
    )
    total: Group = field(default_factory=lambda: Group("all"))
    refusals: Counter[str] = field(default_factory=Counter)
    refused_results: int = 0
    outside_catalogue: int = 0
    overrides: Counter[str] = field(default_factory=Counter)
    lookups: dict[str, dict[str, Any]] = field(default_factory=dict)
    exchanges: Counter[str] = field(default_factory=Counter)
    exchange_refusals: Counter[str] = field(default_factory=Counter)


def _date_sql(dates: Sequence[Sequence[DateRange]]) -> tuple[str, list[Any]]:
    clauses, params = [], []
    for ranges in dates:
        parts = [r.sql() for r in ranges]
        clauses.append("(" + " OR ".join(p[0] for p in parts) + ")")
        params += [x for p in parts for x in p[1]]
    return (" AND " + " AND ".join(clauses) if clauses else ""), params


# The facts each kind contributes, fetched with one json_extract per entry: parsing the
# whole content in Python would cost several times more at a million entries.
_FIELDS = {
    "decision": (
        "$.facts.issuer.system",
        "$.facts.issuer.value",
        "$.facts.report.system",
        "$.facts.report.value",
        "$.facts.item.system",
        "$.facts.item.code",
        "$.facts.receiver.system",
        "$.facts.receiver.value",
        "$.facts.decision_id",
        "$.facts.outcome",
        "$.recorded",
        "$.facts.issuer.display",
        "$.facts.receiver.display",
        "$.facts.item.display",
        "$.facts.catalogue",
        "$.facts.rules",
    ),
    "override": ("$.facts.decision_id", "$.facts.reason"),
    "read": (
        "$.facts.member.value",
        "$.facts.member.display",
        "$.facts.patient.system",
        "$.facts.patient.value",
        "$.facts.patient.reference",
    ),
    "exchange": ("$.facts.direction", "$.facts.reason"),
}


def _rows(db: sqlite_utils.Database, kind: str, where: str, params: list[Any]) -> Iterable[tuple[int, list[Any]]]:
    paths = ", ".join(f"'{p}'" for p in _FIELDS[kind])
    sql = f"SELECT l.seq, json_extract(l.content, {paths}) FROM audit_log l WHERE l.kind = ?{where} ORDER BY l.seq"
    for seq, values in db.execute(sql, [kind, *params]):
        yield seq, json.loads(values)


def _count_into(groups: dict[str, Group], key: str, name: str, outcome: str, overridden: bool) -> None:
    group = groups.get(key)
    if group is None:
        group = groups[key] = Group(key, name)
    elif name and not group.name:
        group.name = name
    _add(group, outcome, overridden)


def _add(group: Group, outcome: str, overridden: bool) -> None:
    if outcome == "recognized":
        group.recognized += 1
        group.overridden += int(overridden)
    elif outcome == "not-recognized":
        group.not_recognized += 1
    else:
        group.needs_review += 1


def _ranked(counter: Counter[str], label: str) -> list[dict[str, Any]]:
    return [{label: k, "count": n} for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def compute(db: sqlite_utils.Database, dates: Sequence[Sequence[DateRange]] = ()) -> dict[str, Any]:
    """Statistics over the entries recorded in the period ``dates`` selects (all when empty).

    ``dates`` is what :func:`gateway.audit.query.parse_date` gives, AND of OR-lists.
    Returns JSON-ready data; :func:`format_tables` prints it.
    """
    ensure_schema(db)
    where, params = _date_sql(dates)
    t = _Totals()

    latest: dict[tuple[str, ...], tuple[int, list[Any]]] = {}
    for seq, values in _rows(db, "decision", where, params):
        latest[tuple(v or "" for v in values[:8])] = (seq, values[8:])  # a later decision replaces an earlier one
    current = {values[0]: seq for seq, values in latest.values() if values[0]}  # decision id -> its entry
    overridden: set[str] = set()
    for seq, (decision_id, _reason) in _rows(db, "override", "", []):  # an override after the period counts too
        if decision_id in current and seq > current[decision_id]:
            overridden.add(decision_id)
    for _, (_decision_id, reason) in _rows(db, "override", where, params):
        t.overrides[reason] += 1

    for key, (
        seq,
        (decision_id, outcome, recorded, issuer_name, receiver_name, item_name, catalogue, rules),
    ) in latest.items():
        is_overridden = decision_id in overridden
        if catalogue in ("", "-"):  # not a catalogue item (or a diagnostic conclusion): no 互认 to count
            t.outside_catalogue += 1
            continue
        _add(t.total, outcome, is_overridden)
        for dim, gkey, name in (
            ("issuer", key[1], issuer_name),
            ("receiver", key[7], receiver_name),
            ("item", f"{key[4]}|{key[5]}", item_name),
            ("catalogue", catalogue, None),
            ("month", recorded[:7], None),
        ):
            _count_into(t.groups[dim], gkey, name or "", outcome, is_overridden)
        if outcome == "not-recognized":
            t.refused_results += 1
            for rule in {r["id"] for r in rules if r.get("passed") is False}:
                t.refusals[rule] += 1

    patients: dict[str, set[str]] = {}
    for _, (member, member_name, p_system, p_value, p_reference) in _rows(db, "read", where, params):
        row = t.lookups.setdefault(member, {"key": member, "name": member_name or "", "lookups": 0, "patients": 0})
        row["lookups"] += 1
        patients.setdefault(member, set()).add(f"{p_system}|{p_value or p_reference}")
    for member, seen in patients.items():
        t.lookups[member]["patients"] = len(seen)

    for _, (direction, reason) in _rows(db, "exchange", where, params):
        t.exchanges[direction] += 1
        if direction == "refused":
            t.exchange_refusals[reason or "unspecified"] += 1

    def groups(dim: str) -> list[dict[str, Any]]:
        return [g.as_json() for g in sorted(t.groups[dim].values(), key=lambda g: g.key)]

    return {
        "definition": DEFINITION,
        "total": t.total.as_json(),
        "by_issuer": groups("issuer"),
        "by_receiver": groups("receiver"),
        "by_item": groups("item"),
        "by_catalogue": groups("catalogue"),
        "by_month": groups("month"),
        "outside_catalogue": t.outside_catalogue,
        "refusals": {"results": t.refused_results, "by_rule": _ranked(t.refusals, "rule")},
        "overrides": {
            "total": sum(t.overrides.values()),
            "by_reason": [
                {**row, "description": RETEST_REASONS[row["reason"]].zh if row["reason"] in RETEST_REASONS else ""}
                for row in _ranked(t.overrides, "reason")
            ],
        },
        "lookups": {
            "total": sum(r["lookups"] for r in t.lookups.values()),
            "by_member": sorted(t.lookups.values(), key=lambda r: (-r["lookups"], r["key"])),
        },
        "exchanges": {
            "sent": t.exchanges["sent"],
            "received": t.exchanges["received"],
            "refused": t.exchanges["refused"],
            "refused_by_reason": _ranked(t.exchange_refusals, "reason"),
        },
    }


# --------------------------------------------------------------------------- terminal tables


def _width(text: str) -> int:
    """Columns a string takes on a terminal (CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int, right: bool) -> str:
    gap = " " * (width - _width(text))
    return gap + text if right else text + gap


def _table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    body = [["" if v is None else (f"{v:.2%}" if isinstance(v, float) else str(v)) for v in row] for row in rows]
    if not body:
        return [title, "  (none)", ""]
    widths = [max(_width(h), *(_width(r[i]) for r in body)) for i, h in enumerate(headers)]
    numeric = [
        all(r[i].replace(".", "").replace("%", "").isdigit() or r[i] == "" for r in body) for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(_pad(c, w, n) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return [title, line(list(headers)), "  " + "  ".join("-" * w for w in widths), *(line(r) for r in body), ""]


_RATE_HEADERS = ("decisions", "recognized", "not recog.", "review", "overridden", "eligible", "accepted", "互认率")


def _rate_rows(groups: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    return [
        [
            g["key"],
            g.get("name", ""),
            g["decisions"],
            g["recognized"],
            g["not_recognized"],
            g["needs_review"],
            g["overridden"],
            g["eligible"],
            g["accepted"],
            g["rate"],
        ]
        for g in groups
    ]


def format_tables(stats: Mapping[str, Any]) -> str:
    """The statistics as plain-text tables for a terminal."""
    out = [stats["definition"], ""]
    out += _table("Total", ("", "", *_RATE_HEADERS), _rate_rows([stats["total"]]))
    for dim, title in (
        ("by_issuer", "By issuer"),
        ("by_receiver", "By receiver"),
        ("by_item", "By item"),
        ("by_catalogue", "By catalogue"),
        ("by_month", "By month"),
    ):
        out += _table(title, ("key", "name", *_RATE_HEADERS), _rate_rows(stats[dim]))
    out += _table(
        f"Refusals by failing rule ({stats['refusals']['results']} results not recognized)",
        ("rule", "results"),
        [[r["rule"], r["count"]] for r in stats["refusals"]["by_rule"]],
    )
    out += _table(
        f"Overrides by re-test reason ({stats['overrides']['total']})",
        ("reason", "count", "description"),
        [[r["reason"], r["count"], r["description"]] for r in stats["overrides"]["by_reason"]],
    )
    out += _table(
        f"Lookups (调阅) by member ({stats['lookups']['total']})",
        ("member", "name", "lookups", "patients"),
        [[r["key"], r["name"], r["lookups"], r["patients"]] for r in stats["lookups"]["by_member"]],
    )
    ex = stats["exchanges"]
    out += _table(
        f"Exchanges: {ex['sent']} sent, {ex['received']} received, {ex['refused']} refused",
        ("refusal reason", "count"),
        [[r["reason"], r["count"]] for r in ex["refused_by_reason"]],
    )
    return "\n".join(out).rstrip() + "\n"
