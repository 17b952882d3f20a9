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
(调阅) by reading member (another member's: a member's own staff reading its own
results are not counted), and exchanges (sent, received, refused by reason; a push that did not succeed is
audited at the sender with its reason and counted apart, as a send failure, never as sent).

A decision withdrawn because its report was superseded by a correction
(a ``withdrawal`` entry), a decision that found its report superseded
already, and a decision on a report its issuer took back (cancelled, entered
in error) are not counted at all: the result is counted once, by the decision
on the correction, whichever order the versions arrived in.

A date filter selects entries by the time they were recorded; an override
recorded after the period still marks a decision inside it as overridden, and
a withdrawal recorded after the period still takes its decision out.
A selection (issuer, receiver, item, catalogue) narrows the decisions, the
refusals and the overrides (those of a selected decision) alike; lookups and
exchanges are not about one issuer's results and are never narrowed.
Cross views (``by=[("month", "issuer")]``) count the same results in the
cells of two or more dimensions. Names come from the decisions, else from
``names`` (the registry snapshot), so no issuer is shown blank.

**By alliance**: the scope of the catalogue a result was decided against
(川渝, one province, or a 医联体/专科联盟 by name), from ``alliances`` (catalogue
id -> scope, the registry snapshot's catalogues); a catalogue the snapshot no
longer lists is counted under ``unknown``.

**节约费用 (savings) = accepted results × the item's fee** in the receiver's
province (the patient would have paid for the repeat there; the province is
the division code inside the receiver's 统一社会信用代码, GB 32100 characters
3–8). Fees come from a table per catalogue item and province kept as data
(``mappings/fees/*.csv``, :func:`load_fees`); accepted results of an item
without a fee there are counted as ``unpriced``, never guessed.

**HR items per institution**: results carrying a recognition mark (川渝HR,
四川HR…) as the issuer printed it, per issuer and mark; a result decided for
several receivers counts once.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from gateway.audit.query import DateRange
from gateway.errors import InputError
from gateway.naming import SYSTEM_LAB_REPORT_NO
from gateway.recognition.overrides import RETEST_REASONS, retest_reason_code
from gateway.store.audit import audit_store
from gateway.store.db import Database

__all__ = ["DEFINITION", "DIMENSIONS", "SELECTABLE", "SAVINGS_DEFINITION", "compute", "decisions", "format_tables",
           "Group", "Fee", "load_fees", "catalogue_scopes"]

#: One-line definition, repeated in the JSON output and the command help.
DEFINITION = (
    "互认率 = accepted / eligible; eligible = catalogue results (issuer, report, item, receiver; latest decision "
    "each) decided recognized or not-recognized (needs-review, results outside every catalogue and diagnostic "
    "conclusions excluded); accepted = eligible results recognized and not re-tested on a physician's override"
)


SAVINGS_DEFINITION = (
    "节约费用 = accepted results × the item's fee in the receiver's province (fee table per catalogue item and "
    "province); accepted results of an item without a fee there are counted as unpriced"
)

#: Dimensions a 互认率 is given by; a cross view names two or more of them.
DIMENSIONS = ("issuer", "receiver", "item", "catalogue", "alliance", "month")
#: Dimensions a selection may narrow (the period is chosen with dates).
SELECTABLE = ("issuer", "receiver", "item", "catalogue", "alliance")
_MONTH = re.compile(r"^[0-9]{4}-(?:0[1-9]|1[0-2])$")


@dataclass(frozen=True)
class Fee:
    """The fee of one catalogue item in one province (元), with where it comes from."""

    item: str
    province: str
    yuan: Decimal
    source: str
    date: str
    demo: bool


_FEE_COLUMNS = ("item_code", "province", "fee_yuan", "source", "date")


def load_fees(path: str | Path) -> dict[tuple[str, str], Fee]:
    """The fee table: one CSV file, or every ``*.csv`` of a folder (``mappings/fees``), ``#`` lines comments.

    Columns ``item_code`` (catalogue item code), ``province`` (50 重庆, 51 四川), ``fee_yuan``, ``source``,
    ``date`` and optional ``demo`` (``true`` for illustrative fees, shown as such).

    :raises InputError: a missing column, a bad value or an item listed twice for a province, named by file,
        row and column.
    """
    where = Path(path)
    files = sorted(where.glob("*.csv")) if where.is_dir() else [where]
    fees: dict[tuple[str, str], Fee] = {}
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8-sig").splitlines()
        except OSError as exc:
            raise InputError(f"cannot read the fee table: {exc.strerror or exc}", str(file)) from None
        rows = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
        if not rows:
            continue
        reader = csv.reader([line for _, line in rows])
        header = [h.strip() for h in next(reader)]
        missing = [c for c in _FEE_COLUMNS if c not in header]
        if missing:
            raise InputError(f"the fee table has no column {missing[0]}", f"{file.name} row {rows[0][0]}")
        for (n, _), values in zip(rows[1:], reader):
            row = dict(zip(header, (v.strip() for v in values)))

            def bad(column: str, why: str, row_no: int = n) -> InputError:
                return InputError(why, f"{file.name} row {row_no}, column {column}")

            if row.get("province") not in ("50", "51"):
                raise bad("province", f"province {row.get('province')!r} is not 50 (重庆) or 51 (四川)")
            try:
                yuan = Decimal(row.get("fee_yuan", ""))
            except InvalidOperation:
                raise bad("fee_yuan", f"fee {row.get('fee_yuan')!r} is not a number of 元") from None
            if not yuan.is_finite() or yuan < 0:
                raise bad("fee_yuan", f"fee {row.get('fee_yuan')!r} is not a number of 元 ≥ 0")
            if not row.get("item_code") or not row.get("source"):
                raise bad("item_code" if not row.get("item_code") else "source", "empty")
            key = (row["item_code"], row["province"])
            if key in fees:
                raise bad("item_code", f"item {key[0]} has a fee for province {key[1]} already")
            fees[key] = Fee(key[0], key[1], yuan, row["source"], row.get("date", ""),
                            row.get("demo", "").lower() in ("true", "yes", "1"))
    return fees


def member_provinces(snapshot: Any) -> dict[str, str]:
    """Member USCC -> the province its registry entry places it in (``"51"`` 四川, ``"50"`` 重庆: its administrative
    division's first two digits), for pricing the savings at the receiver's fees."""
    return {uscc: m.province for uscc, m in getattr(snapshot, "members", {}).items() if getattr(m, "division", "")}


def catalogue_scopes(snapshot: Any) -> dict[str, str]:
    """Catalogue id -> its scope as shown by alliance: 川渝, 四川省 / 重庆市, or the alliance's name."""
    out: dict[str, str] = {}
    for catalogue in getattr(snapshot, "catalogues", ()):
        if catalogue.scope_type == "chuanyu":
            out[catalogue.id] = "川渝"
        elif catalogue.scope_type == "provincial":
            out[catalogue.id] = {"51": "四川省", "50": "重庆市"}.get(catalogue.province or "", "省级")
        else:
            out[catalogue.id] = catalogue.alliance_name or catalogue.id
    return out


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
        default_factory=lambda: {k: {} for k in DIMENSIONS}
    )
    total: Group = field(default_factory=lambda: Group("all"))
    refusals: Counter[str] = field(default_factory=Counter)
    refused_results: int = 0
    outside_catalogue: int = 0
    overrides: Counter[str] = field(default_factory=Counter)
    lookups: dict[str, dict[str, Any]] = field(default_factory=dict)
    exchanges: Counter[str] = field(default_factory=Counter)
    exchange_refusals: Counter[str] = field(default_factory=Counter)


# The facts each kind contributes, extracted by the database in one go per entry: parsing the
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
        "$.facts.marks",
    ),
    "override": ("$.facts.decision_id", "$.facts.reason"),
    "withdrawal": ("$.facts.decision_id", "$.facts.reason"),
    "read": (
        "$.facts.member.value",
        "$.facts.member.display",
        "$.facts.patient.system",
        "$.facts.patient.value",
        "$.facts.patient.reference",
        "$.facts.asked_elsewhere",
        "$.facts.gateway.value",
    ),
    "exchange": ("$.facts.direction", "$.facts.reason"),
}


def _rows(db: Database, kind: str, dates: Sequence[Sequence[DateRange]]) -> Iterable[tuple[int, list[Any]]]:
    return audit_store(db).facts(kind, _FIELDS[kind], dates)


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


@dataclass(frozen=True)
class _Result:
    """The latest decision of one result, with the dimensions it is counted in."""

    seq: int
    decision_id: str
    outcome: str
    recorded: str
    dims: dict[str, str]
    names: dict[str, str]
    rules: list[dict[str, Any]]
    report: str = ""
    marks: tuple[str, ...] = ()


def _dims(key: Sequence[str], recorded: str, catalogue: str, alliances: Mapping[str, str]) -> dict[str, str]:
    return {"issuer": key[1], "receiver": key[7], "item": f"{key[4]}|{key[5]}", "catalogue": catalogue,
            "alliance": alliances.get(catalogue) or "unknown", "month": recorded[:7]}


def _selected(dims: Mapping[str, str], selection: Mapping[str, str]) -> bool:
    """True when a result lies in the selection (an item may be named by its code alone)."""
    for dim, wanted in selection.items():
        if not wanted:
            continue
        have = dims.get(dim, "")
        if have != wanted and not (dim == "item" and have.rsplit("|", 1)[-1] == wanted):
            return False
    return True


def _check_selection(selection: Mapping[str, str] | None, by: Sequence[Sequence[str]]) -> dict[str, str]:
    chosen = {k: v for k, v in (selection or {}).items() if v}
    unknown = [k for k in chosen if k not in SELECTABLE]
    unknown += [d for dims in by for d in dims if d not in DIMENSIONS]
    if unknown:
        raise InputError(f"unknown dimension {unknown[0]!r}: use {', '.join(DIMENSIONS)}", "by")
    if any(len(dims) < 2 or len(set(dims)) != len(dims) for dims in by):
        raise InputError("a cross view names two or more different dimensions, e.g. month,issuer", "by")
    return chosen


def _result_key(values: Sequence[Any]) -> tuple[str, ...]:
    """(issuer system, issuer, report system, report, item system, item, receiver system, receiver) of a decision
    entry. Entries of earlier releases named the report ``system|value`` under the lab report system: read as
    the entries written since name it, so that a later decision on the same report replaces theirs."""
    key = [v or "" for v in values[:8]]
    if key[2] == SYSTEM_LAB_REPORT_NO and "|" in key[3]:
        key[2], _, key[3] = key[3].partition("|")
    return tuple(key)


def _latest(
    db: Database, dates: Sequence[Sequence[DateRange]], selection: Mapping[str, str],
    alliances: Mapping[str, str] | None = None,
) -> tuple[list[_Result], set[str], int, set[str] | None]:
    """(latest decision of each selected catalogue result, the overridden decision ids, results outside every
    catalogue, the decision ids in the selection over all time or None without a selection)."""
    audit_store(db).ensure_schema()
    alliances = alliances or {}
    latest: dict[tuple[str, ...], tuple[int, list[Any]]] = {}
    withdrawn = {decision_id for _, (decision_id, _reason) in _rows(db, "withdrawal", ())}
    for seq, values in _rows(db, "decision", dates):
        if values[8] in withdrawn or _on_superseded(values[15]):
            continue  # the decision on a superseded report version: the correction's decision counts instead
        latest[_result_key(values)] = (seq, values[8:])  # a later decision replaces an earlier one
    current = {values[0]: seq for seq, values in latest.values() if values[0]}  # decision id -> its entry
    overridden: set[str] = set()
    for seq, (decision_id, _reason) in _rows(db, "override", ()):  # an override after the period counts too
        if decision_id in current and seq > current[decision_id]:
            overridden.add(decision_id)
    chosen_ids: set[str] | None = None
    if selection:  # overrides are narrowed by their decision, wherever it lies in time
        chosen_ids = set()
        for _, values in _rows(db, "decision", ()):
            key = _result_key(values)
            if values[8] and _selected(_dims(key, values[10] or "", values[14] or "", alliances), selection):
                chosen_ids.add(values[8])
    results: list[_Result] = []
    outside = 0
    for key, (
        seq,
        (decision_id, outcome, recorded, issuer_name, receiver_name, item_name, catalogue, rules, marks),
    ) in latest.items():
        dims = _dims(key, recorded, catalogue or "", alliances)
        if not _selected(dims, selection):
            continue
        if catalogue in ("", "-", None):  # not a catalogue item (or a diagnostic conclusion): no 互认 to count
            outside += 1
            continue
        names = {"issuer": issuer_name or "", "receiver": receiver_name or "", "item": item_name or ""}
        results.append(_Result(seq, decision_id or "", outcome, recorded, dims, names, list(rules or []),
                               f"{key[2]}|{key[3]}", tuple(m for m in marks or [] if isinstance(m, str))))
    results.sort(key=lambda r: r.seq)
    return results, overridden, outside, chosen_ids


def _on_superseded(rules: Any) -> bool:
    """Whether a decision failed rule ``report-status`` because its report was superseded, or was taken back by
    its issuer (cancelled, entered in error: there is no result to recognise)."""
    return any(
        r.get("id") == "report-status" and r.get("passed") is False and any(
            why in str(r.get("detail", "")) for why in _NOT_A_RESULT)
        for r in rules or []
        if isinstance(r, Mapping)
    )


#: What rule ``report-status`` says of a decision that is not counted (gateway.recognition.engine).
_NOT_A_RESULT = ("superseded", "the report is cancelled", "the report is entered-in-error")


def _named(dim: str, key: str, found: str, names: Mapping[str, str]) -> str:
    if found:
        return found
    if dim in ("issuer", "receiver", "catalogue"):
        return names.get(key, "")
    return ""


def compute(
    db: Database,
    dates: Sequence[Sequence[DateRange]] = (),
    *,
    selection: Mapping[str, str] | None = None,
    by: Sequence[Sequence[str]] = (),
    names: Mapping[str, str] | None = None,
    fees: Mapping[tuple[str, str], Fee] | None = None,
    alliances: Mapping[str, str] | None = None,
    provinces: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Statistics over the entries recorded in the period ``dates`` selects (all when empty).

    ``dates`` is what :func:`gateway.audit.query.parse_date` gives, AND of OR-lists. ``selection`` narrows to
    one issuer, receiver, item (``system|code`` or the code) or catalogue; ``by`` adds cross views (each a
    tuple of dimensions, e.g. ``("month", "issuer")``, given as ``by_month_issuer``); ``names`` (USCC or
    catalogue id -> name) fills names the decisions do not carry; ``fees`` (:func:`load_fees`) prices the
    savings; ``alliances`` (catalogue id -> scope, :func:`catalogue_scopes`) gives the alliance dimension;
    ``provinces`` (member USCC -> province, :func:`member_provinces`) the province whose fees price a receiver's
    savings (a receiver the registry does not place: by its USCC's registering division, characters 3-4).
    Returns JSON-ready data; :func:`format_tables` prints it.

    :raises InputError: an unknown dimension, or a cross view of fewer than two.
    """
    chosen = _check_selection(selection, by)
    names = names or {}
    t = _Totals()
    results, overridden, t.outside_catalogue, chosen_ids = _latest(db, dates, chosen, alliances)
    for _, (decision_id, reason) in _rows(db, "override", dates):
        if chosen_ids is None or decision_id in chosen_ids:
            t.overrides[retest_reason_code(reason)] += 1  # an entry written with a retired code counts as today's

    crosses: dict[tuple[str, ...], dict[str, Group]] = {tuple(dims): {} for dims in by}
    for res in results:
        is_overridden = res.decision_id in overridden
        _add(t.total, res.outcome, is_overridden)
        for dim in DIMENSIONS:
            key = res.dims[dim]
            _count_into(t.groups[dim], key, _named(dim, key, res.names.get(dim, ""), names), res.outcome,
                        is_overridden)
        for dims, cells in crosses.items():
            key = "|".join(res.dims[d] for d in dims)
            name = " / ".join(_named(d, res.dims[d], res.names.get(d, ""), names) for d in dims if d != "month")
            _count_into(cells, key, name.strip(" /"), res.outcome, is_overridden)
        if res.outcome == "not-recognized":
            t.refused_results += 1
            for rule in {r["id"] for r in res.rules if r.get("passed") is False}:
                t.refusals[rule] += 1

    patients: dict[str, set[str]] = {}
    for _, (member, member_name, p_system, p_value, p_reference, elsewhere, server) in _rows(db, "read", dates):
        if elsewhere:  # (a 调阅 this member made at another: counted where it was served)
            continue
        if member and member == server:  # this member's own staff reading its own results: not a 调阅
            continue
        row = t.lookups.setdefault(member, {"key": member, "name": member_name or "", "lookups": 0, "patients": 0})
        row["lookups"] += 1
        patients.setdefault(member, set()).add(f"{p_system}|{p_value or p_reference}")
    for member, seen in patients.items():
        t.lookups[member]["patients"] = len(seen)

    for _, (direction, reason) in _rows(db, "exchange", dates):
        if direction == "sent" and reason:
            # a push that did not succeed (audited at its first failure and at its end, with the reason): no
            # Bundle was sent
            t.exchanges["send-failures"] += 1
            continue
        t.exchanges[direction] += 1
        if direction == "refused":
            t.exchange_refusals[reason or "unspecified"] += 1

    def groups(dim: str) -> list[dict[str, Any]]:
        return [g.as_json() for g in sorted(t.groups[dim].values(), key=lambda g: g.key)]

    def cross(dims: tuple[str, ...]) -> list[dict[str, Any]]:
        rows = []
        for g in sorted(crosses[dims].values(), key=lambda g: g.key):
            row = g.as_json()
            row.update(zip(dims, _split_key(g.key, dims)))
            rows.append(row)
        return rows

    out: dict[str, Any] = {
        "definition": DEFINITION,
        "selection": dict(sorted(chosen.items())),
        "total": t.total.as_json(),
        "by_issuer": groups("issuer"),
        "by_receiver": groups("receiver"),
        "by_item": groups("item"),
        "by_catalogue": groups("catalogue"),
        "by_alliance": groups("alliance"),
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
            "send_failures": t.exchanges["send-failures"],
        },
    }
    out["savings"] = _savings(results, overridden, fees or {}, names, provinces or {})
    out["hr_items"] = _hr_items(results, names)
    for dims in crosses:
        out["by_" + "_".join(dims)] = cross(dims)
    return out


def _money(yuan: Decimal) -> float:
    return float(yuan.quantize(Decimal("0.01")))


def _savings(results: Sequence[_Result], overridden: set[str], fees: Mapping[tuple[str, str], Fee],
             names: Mapping[str, str], provinces: Mapping[str, str]) -> dict[str, Any]:
    """节约费用 of the accepted results, by province and item, with the fees used: each at the fee of the province the
    registry places its receiver in (a USCC's characters 3-8 are the division that registered it, not where the
    hospital is: a hospital registered by a national body reads 10)."""
    by_item: dict[tuple[str, str], dict[str, Any]] = {}
    by_province: dict[str, dict[str, Any]] = {}
    unpriced: Counter[str] = Counter()
    total, priced = Decimal(0), 0
    used: dict[tuple[str, str], Fee] = {}
    for res in results:
        if res.outcome != "recognized" or res.decision_id in overridden:
            continue
        receiver = res.dims["receiver"]
        code, province = res.dims["item"].rsplit("|", 1)[-1], provinces.get(receiver) or receiver[2:4]
        fee = fees.get((code, province))
        if fee is None:
            unpriced[f"{code}|{province}"] += 1
            continue
        used[(code, province)] = fee
        priced += 1
        total += fee.yuan
        row = by_item.setdefault((code, province), {"item": code, "name": res.names.get("item", ""),
                                                    "province": province, "results": 0, "fee_yuan": _money(fee.yuan),
                                                    "yuan": Decimal(0), "demo": fee.demo})
        row["results"] += 1
        row["yuan"] += fee.yuan
        prov = by_province.setdefault(province, {"province": province, "results": 0, "yuan": Decimal(0)})
        prov["results"] += 1
        prov["yuan"] += fee.yuan
    for row in [*by_item.values(), *by_province.values()]:
        row["yuan"] = _money(row["yuan"])
    return {
        "definition": SAVINGS_DEFINITION,
        "total_yuan": _money(total),
        "results": priced,
        "unpriced": sum(unpriced.values()),
        "unpriced_by_item": _ranked(unpriced, "item"),
        "by_province": [by_province[k] for k in sorted(by_province)],
        "by_item": [by_item[k] for k in sorted(by_item)],
        "demo_fees": any(f.demo for f in used.values()),
        "fee_sources": sorted({f"{f.source} ({f.date})" if f.date else f.source for f in used.values()}),
    }


def _hr_items(results: Sequence[_Result], names: Mapping[str, str]) -> dict[str, Any]:
    """Results carrying a recognition mark, per issuer and mark (each issued result once)."""
    seen: dict[tuple[str, str, str], tuple[str, ...]] = {}
    issuer_names: dict[str, str] = {}
    for res in results:
        if res.marks:
            seen[(res.dims["issuer"], res.report, res.dims["item"])] = res.marks
            issuer_names.setdefault(res.dims["issuer"], res.names.get("issuer") or names.get(res.dims["issuer"], ""))
    rows: dict[str, dict[str, Any]] = {}
    marks: Counter[str] = Counter()
    for (issuer, _, _), result_marks in seen.items():
        row = rows.setdefault(issuer, {"key": issuer, "name": issuer_names.get(issuer, ""), "results": 0,
                                       "by_mark": Counter()})
        row["results"] += 1
        for mark in sorted(set(result_marks)):
            row["by_mark"][mark] += 1
            marks[mark] += 1
    out_rows = []
    for issuer in sorted(rows):
        row = rows[issuer]
        out_rows.append({**row, "by_mark": dict(sorted(row["by_mark"].items()))})
    return {"results": len(seen), "by_mark": dict(sorted(marks.items())), "by_issuer": out_rows}


def _split_key(key: str, dims: Sequence[str]) -> list[str]:
    """The parts of a cross view's key; an item (``system|code``) holds a ``|`` of its own."""
    parts = key.split("|")
    out = []
    for dim in dims:
        take = 2 if dim == "item" else 1
        out.append("|".join(parts[:take]))
        parts = parts[take:]
    return out


def decisions(
    db: Database,
    dates: Sequence[Sequence[DateRange]] = (),
    *,
    selection: Mapping[str, str] | None = None,
    outcome: str | None = None,
    overridden: bool | None = None,
    month: str | None = None,
    rule: str | None = None,
    alliances: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The decisions behind a figure of :func:`compute` for the same period and selection: the latest decision
    of each catalogue result, oldest first, narrowed to an ``outcome`` (``recognized``, ``not-recognized``,
    ``needs-review``, or ``eligible`` / ``accepted``), to ``overridden`` ones, a ``month`` or a failing ``rule``.

    :raises InputError: an unknown dimension or outcome.
    """
    from gateway.recognition.engine import RULES

    if outcome not in (None, "", "recognized", "not-recognized", "needs-review", "eligible", "accepted"):
        raise InputError(f"unknown outcome {outcome!r}", "outcome")
    if month and not _MONTH.match(month):
        raise InputError(f"month {month!r} is not a month (YYYY-MM)", "month")
    if rule and rule not in RULES:
        raise InputError(f"unknown rule {rule!r} (one of {', '.join(RULES)})", "rule")
    results, overridden_ids, _, _ = _latest(db, dates, _check_selection(selection, ()), alliances)
    out = []
    for res in results:
        is_overridden = res.decision_id in overridden_ids
        if outcome == "eligible" and res.outcome not in ("recognized", "not-recognized"):
            continue
        if outcome == "accepted" and (res.outcome != "recognized" or is_overridden):
            continue
        if outcome in ("recognized", "not-recognized", "needs-review") and res.outcome != outcome:
            continue
        if overridden is not None and (is_overridden and res.outcome == "recognized") != overridden:
            continue
        if month and res.dims["month"] != month:
            continue
        failed = sorted({r["id"] for r in res.rules if r.get("passed") is False})
        if rule and (res.outcome != "not-recognized" or rule not in failed):
            continue
        out.append({"seq": res.seq, "decision_id": res.decision_id, "recorded": res.recorded,
                    "outcome": res.outcome, "overridden": is_overridden and res.outcome == "recognized",
                    **res.dims, **{f"{k}_name": v for k, v in res.names.items()}, "failed_rules": failed})
    return out


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
        ("by_alliance", "By alliance (catalogue scope)"),
        ("by_month", "By month"),
    ):
        out += _table(title, ("key", "name", *_RATE_HEADERS), _rate_rows(stats[dim]))
    for name, rows in stats.items():
        dims = name[3:].split("_") if name.startswith("by_") else []
        if len(dims) > 1 and all(d in DIMENSIONS for d in dims):
            out += _table(
                "By " + " × ".join(dims),
                (*dims, "name", *_RATE_HEADERS),
                [[*(r[d] for d in dims), *_rate_rows([r])[0][1:]] for r in rows],
            )
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
    sv = stats["savings"]
    demo = " — DEMO fees, illustrative only" if sv["demo_fees"] else ""
    out += _table(
        f"节约费用 (savings): {sv['total_yuan']:.2f} 元 for {sv['results']} accepted results, "
        f"{sv['unpriced']} without a fee{demo}",
        ("item", "name", "province", "results", "fee 元", "元"),
        [[r["item"], r["name"], r["province"], r["results"], f"{r['fee_yuan']:.2f}", f"{r['yuan']:.2f}"]
         for r in sv["by_item"]],
    )
    hr = stats["hr_items"]
    out += _table(
        f"HR items per institution ({hr['results']} results carrying a recognition mark)",
        ("issuer", "name", "results", "by mark"),
        [[r["key"], r["name"], r["results"], ", ".join(f"{m} {n}" for m, n in r["by_mark"].items())]
         for r in hr["by_issuer"]],
    )
    ex = stats["exchanges"]
    out += _table(
        f"Exchanges: {ex['sent']} sent, {ex['received']} received, {ex['refused']} refused"
        + (f" ({ex['send_failures']} failures of pushes audited)" if ex.get("send_failures") else ""),
        ("refusal reason", "count"),
        [[r["reason"], r["count"]] for r in ex["refused_by_reason"]],
    )
    return "\n".join(out).rstrip() + "\n"
