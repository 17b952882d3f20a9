"""Recognition engine: decides, for one result, whether the receiver may recognise it (互认), and why.

:func:`decide` is a pure function of the result facts, the registry snapshot,
the receiving member and the decision time: no clock, no I/O, so the same
inputs always give the same decision and an auditor can replay it. Every rule
that applies is listed with a stable id, its status and the facts it used:

- ``passed``: the fact is there and satisfies the rule;
- ``failed``: the fact is there and does not;
- ``not-evaluable``: a fact is missing (or unreadable): the rule cannot say.

Outcome: any failed rule gives ``not-recognized``; otherwise any rule that
could not be evaluated gives ``needs-review`` (never a guess); otherwise
``recognized``. "Missing" means missing from the *result* (no collection time,
no mark, no 主检医师). The registry is complete by construction (removal is
revocation), so an issuer, EQA pass or qualification the snapshot does not list
is a fact that fails, not one that is missing.

When a result matches items of several catalogues (a 川渝 and a provincial
one, say), each is evaluated and the best outcome is kept, ties going to the
catalogue listed first in the snapshot; the others are listed as alternatives.
When its codes name *different* items (the issuer's local code one item, its
LOINC another), DOMAIN §5.3 gives no precedence between the matches: the
decision is ``needs-review`` saying the codes disagree and naming the items,
never the most favourable of them.

Some results are not a recognition at all and are decided by one rule alone:
a diagnostic conclusion, a result the receiver issued itself (recognition is
between institutions), and an Observation with no value (dataAbsentReason: an
empty OBX-5). They are decided against no catalogue item, so they stay out of
互认率 and savings.

The receiving physician always has the last word (以接诊医师判断为标准): see
:mod:`gateway.recognition.overrides`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.errors import InputError
from gateway.identifiers import check_uscc
from gateway.naming import IG_BASE
from gateway.recognition.facts import HazardFactor, ResultFacts
from gateway.registry.models import (
    CN_TZ,
    CatalogueItem,
    Coding,
    EXPOSURE_CATEGORIES,
    LevelFact,
    QUALIFICATION_TYPES,
    SYSTEM_TECHNICAL_SERVICE_TYPE,
    TECHNICAL_SERVICE_TYPES,
    Member,
    Snapshot,
    china_date,
    service_scope_words,
)
from gateway.registry.policy import (
    catalogue_items_for,
    diagnosis_categories_for,
    eqa_passed,
    eqa_results,
    filing_covers,
    physician_qualified,
)
from gateway.registry.reference import resolve_factor
from gateway.uuids import uuid5

__all__ = [
    "RECOGNIZED",
    "NOT_RECOGNIZED",
    "NEEDS_REVIEW",
    "PASSED",
    "FAILED",
    "NOT_EVALUABLE",
    "RULES",
    "RuleInfo",
    "RuleResult",
    "Decision",
    "MarkGrant",
    "decide",
    "decide_all",
    "codes_disagree",
    "marks_for",
    "result_day",
]

RECOGNIZED = "recognized"
NOT_RECOGNIZED = "not-recognized"
NEEDS_REVIEW = "needs-review"

PASSED = "passed"
FAILED = "failed"
NOT_EVALUABLE = "not-evaluable"

_OUTCOME_RANK = {RECOGNIZED: 0, NEEDS_REVIEW: 1, NOT_RECOGNIZED: 2}
# Namespace of decision ids: uuid5 over the inputs, so a replay gives the same id.
_DECISION_NS = uuid.uuid5(uuid.NAMESPACE_URL, f"{IG_BASE}/recognition-decision")


@dataclass(frozen=True)
class RuleInfo:
    """A rule's stable id with what it checks, in Chinese and English."""

    id: str
    zh: str
    en: str


#: Every rule the engine knows, in the order decisions list them.
RULES: dict[str, RuleInfo] = {
    r.id: r
    for r in (
        RuleInfo("member-active", "发出机构在结果日期为有效成员", "The issuer is an active member on the result date"),
        RuleInfo(
            "catalogue-item",
            "项目属于在结果日期有效的互认目录",
            "The item is in a recognition catalogue valid on the result date",
        ),
        RuleInfo(
            "catalogue-scope",
            "目录范围覆盖发出机构和接收机构（川渝跨省、省内、医联体内）",
            "The catalogue's scope covers issuer and receiver "
            "(川渝 across the border, provincial within one, alliance among members)",
        ),
        RuleInfo(
            "eqa-pass",
            "发出机构该项目室间质评在覆盖结果日期的周期内合格",
            "The issuer passed EQA for the item in the cycle covering the result date",
        ),
        RuleInfo(
            "validity-window",
            "自采样（检验）或检查日期起至决定日期仍在有效时限内（按北京时间自然日计）",
            "The result is within the item's validity window, counted in calendar days (China Standard Time) from "
            "the collection (lab) or study (imaging) date to the decision date",
        ),
        RuleInfo(
            "report-status",
            "报告为最终或更正状态，未被取代；检验、检查报告须有审核医师",
            "The report is final or corrected, not preliminary, not superseded; a lab or imaging report names its "
            "审核医师 (reviewing physician)",
        ),
        RuleInfo("mark", "结果带有目录规定的互认标识", "The result carries the catalogue's recognition mark"),
        RuleInfo(
            "direction",
            "符合目录按机构级别规定的互认方向（发出机构取结果日期的级别，接收机构取决定日期的级别）",
            "The catalogue's direction rule by institution level holds "
            "(the issuer's level on the result date, the receiver's on the decision date)",
        ),
        RuleInfo(
            "occupational-filing",
            "体检日发出机构职业健康检查备案覆盖每个危害因素：备案列出该类因素时按因素，否则按类别（放射需放射类）",
            "On the exam date the issuer's 职业健康检查 filing covers each hazard factor: the factor itself when the "
            "filing lists factors of its class, else the class (放射 needs 放射)",
        ),
        RuleInfo(
            "occupational-physician",
            "主检医师在体检日具有相应类别的职业病诊断资格，并在该机构执业注册（多点执业）",
            "The 主检医师 holds the matching 职业病诊断 qualification on the exam date and is registered to "
            "practise at the issuer then (多点执业)",
        ),
        RuleInfo(
            "technical-service-qualification",
            "服务期间（起止日）及报告日出具机构持有覆盖该服务类型的有效甲/乙级技术服务资质：甲级由国家卫生健康委员会审批（全国有效）"
            "或由川渝卫生健康行政部门审批，乙级由川渝卫生健康行政部门审批或备案",
            "Over the service period (start to end) and on the report date the issuer holds a valid 甲/乙 "
            "technical-service qualification covering the service: a 甲级 one approved by the national health "
            "commission (valid nationwide) or by a 川渝 (Sichuan or Chongqing) health authority, a 乙级 one approved "
            "or filed by a 川渝 health authority",
        ),
        RuleInfo(
            "reading-signature",
            "目录规定以诊断机构为准的项目（基层检查、上级诊断），报告包须由报告所列的诊断机构签名",
            "Where the catalogue makes the reading institution the one that counts (exam at one member, read by "
            "another), the Bundle is signed by the reading institution the report names",
        ),
        RuleInfo(
            "between-institutions",
            "互认发生在不同机构之间：接收机构不对本机构出具的结果作互认",
            "Recognition is between institutions: the receiver is not the issuer of the result",
        ),
        RuleInfo(
            "result-value",
            "结果有数值（无数值、仅有缺失原因的结果无可互认）",
            "The result has a value (an Observation with only a dataAbsentReason has nothing to recognise)",
        ),
        RuleInfo(
            "diagnostic-conclusion",
            "医师出具的诊断结论不属于互认结果",
            "A physician's diagnostic conclusion is never recognised",
        ),
    )
}


@dataclass(frozen=True)
class RuleResult:
    """One rule checked: id, status, a readable line and the facts it used."""

    rule: str
    status: str
    message: str
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"rule": self.rule, "status": self.status, "message": self.message, "facts": self.facts}


@dataclass(frozen=True)
class Decision:
    """The decision about one result for one receiver at one time, with every rule checked."""

    decision_id: str
    outcome: str
    rules: tuple[RuleResult, ...]
    facts: ResultFacts
    receiver: str
    decided_at: _dt.datetime
    snapshot_version: int
    snapshot_digest: str
    item: CatalogueItem | None = None
    alternatives: tuple[dict[str, str], ...] = ()
    #: ``performer`` or ``interpreter``: whose level, qualifications and signature the item's rules looked at.
    responsible: str | None = None

    def rule(self, rule_id: str) -> RuleResult | None:
        """The result of one rule, or None when it did not apply."""
        return next((r for r in self.rules if r.rule == rule_id), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: what the CLI prints with ``--json``, the store keeps and ``$recognize`` returns."""
        f = self.facts
        return {
            "decision_id": self.decision_id,
            "outcome": self.outcome,
            "receiver": self.receiver,
            "decided_at": self.decided_at.isoformat(),
            "snapshot": {"version": self.snapshot_version, "digest": self.snapshot_digest},
            "result": {
                "kind": f.kind,
                "bundle": f.bundle_id,
                "entry": f.entry,
                "location": f.location,
                "report": f.report_id,
                "issuer": f.issuer_uscc,
                **({"interpreter": f.interpreter_uscc, "judged_by": self.responsible} if f.interpreter_uscc else {}),
                "item": f.item_label(),
                "codings": [{"system": c.system, "code": c.code} for c in f.codings],
            },
            "catalogue_item": self.item.ref() if self.item else None,
            "alternatives": list(self.alternatives),
            "rules": [r.to_dict() for r in self.rules],
        }


@dataclass(frozen=True)
class MarkGrant:
    """A recognition mark an issuer may print on a result, and the catalogue item that grants it."""

    mark: str
    catalogue: str
    code: str
    display: str


# -- time -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Moment:
    """A FHIR date or dateTime as sent, parsed: a date-only value keeps day precision."""

    text: str
    moment: _dt.datetime | None
    day: _dt.date


def _moment(value: str | None) -> _Moment | None | str:
    """The parsed value; None when absent; a reason string when unusable.

    A partial date (``2024-06``, ``2024``) is unusable: the rules need the day.
    """
    if not value:
        return None
    if type(value) is str and len(value) <= 40:
        return _remembered_moment(value)
    return _read_moment(str(value))


def _read_moment(text: str) -> _Moment | str:
    """:func:`_moment` of a text, read."""
    if "T" not in text:
        if len(text) != 10:
            return f"{text[:40]!r} is not precise to the day"
        try:
            return _Moment(text, None, _dt.date.fromisoformat(text))
        except ValueError:
            return f"{text[:40]!r} is not a date"
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return f"{text[:40]!r} is not a dateTime"
    if moment.tzinfo is None:
        return f"{text[:40]!r} has a time but no UTC offset"
    try:
        return _Moment(text, moment, china_date(moment))
    except OverflowError:  # e.g. 9999-12-31T23:00:00-05:00 is past the last representable day in China
        return f"{text[:40]!r} is out of range"


#: What :func:`_moment` read from a text (a _Moment is immutable; a reason is a string), the 4,096 latest: the
#: results of one report share their times, and a report's times come again in the next one.
_remembered_moment = functools.lru_cache(maxsize=4096)(_read_moment)


def result_day(value: str | None) -> tuple[_dt.date | None, str | None]:
    """The China Standard Time calendar day of a FHIR ``date``/``dateTime``: (day, None) or (None, why not).

    The same reading the rules make: a partial date (``2024-06``, ``2024``), a time
    without an offset or a value that is not a date has no day, and says why.
    """
    parsed = _moment(value)
    if isinstance(parsed, _Moment):
        return parsed.day, None
    return None, parsed or "no date"


_ANCHOR_SOURCES = {
    # time anchor -> facts consulted, in order, with the FHIR path each comes from
    "collection": (
        ("collected", "Specimen.collection.collectedDateTime"),
        ("effective", "Observation.effectiveDateTime"),
    ),
    "study": (
        ("effective", "Observation.effectiveDateTime"),
        ("report_effective", "DiagnosticReport.effectiveDateTime"),
    ),
    "exam": (
        ("report_effective", "DiagnosticReport.effectiveDateTime"),
        ("effective", "Observation.effectiveDateTime"),
    ),
    "report": (("report_date", "DiagnosticReport.extension:reportDate"),),
}


def _default_anchor(facts: ResultFacts) -> str:
    return {"occupational": "exam", "imaging": "study", "ecg": "study", "technical-service": "report"}.get(
        facts.report_class or "", "collection"
    )


def _anchor(facts: ResultFacts, kind: str) -> tuple[_Moment | str | None, str | None]:
    for attr, path in _ANCHOR_SOURCES[kind]:
        value = getattr(facts, attr)
        if value:
            return _moment(value), path
    return None, None


# -- the rules -------------------------------------------------------------------------------------


def _r(rule: str, status: str, message: str, **facts: Any) -> RuleResult:
    return RuleResult(rule, status, message, facts)


class _Context:
    """What every rule of one evaluation shares.

    ``levels`` keeps the hospital levels already looked up in the snapshot, by member and day: shared by the
    decisions of one Bundle (the same receiver on the same decision day, mostly the same issuer and result day).
    """

    def __init__(self, facts: ResultFacts, snapshot: Snapshot, receiver: str, at: _dt.datetime,
                 levels: dict[tuple[str | None, _dt.date], LevelFact | None]) -> None:
        self.facts = facts
        self.snapshot = snapshot
        self.receiver = receiver
        self.at = at
        self.levels = levels
        self.issuer: Member | None = snapshot.member(facts.issuer_uscc)
        self.receiver_member: Member | None = snapshot.member(receiver)
        #: The performing institution when the rules look at the reading one instead (see ``judged_by``).
        self.performer: str | None = None

    def judged_by(self, item: CatalogueItem | None) -> "_Context":
        """The context whose issuer is the institution the item's rules look at.

        For an item the catalogue judges by its reader (``responsible: interpreter``) and a report naming a
        reading institution other than its performer (基层检查、上级诊断), that is the reading institution:
        member, scope, EQA and direction rules then use it. Otherwise this context.
        """
        reader = self.facts.interpreter_uscc
        if item is None or item.responsible != "interpreter" or not reader or reader == self.facts.issuer_uscc:
            return self
        ctx = _Context(dataclasses.replace(self.facts, issuer_uscc=reader), self.snapshot, self.receiver, self.at,
                       self.levels)
        ctx.performer = self.facts.issuer_uscc
        return ctx

    def level_on(self, uscc: str | None, day: _dt.date) -> LevelFact | None:
        """:meth:`Snapshot.level_on`, looked up once per member and day."""
        key = (uscc, day)
        if key not in self.levels:
            self.levels[key] = self.snapshot.level_on(uscc, day)
        return self.levels[key]


def _result_day(ctx: _Context, item: CatalogueItem | None) -> tuple[_dt.date | None, dict[str, Any]]:
    kind = item.time_anchor if item else _default_anchor(ctx.facts)
    parsed, path = _anchor(ctx.facts, kind)
    if isinstance(parsed, _Moment):
        return parsed.day, {"result_date": parsed.day.isoformat(), "result_date_from": path}
    return None, {"result_date": None, "result_date_problem": parsed or f"no {kind} time in the result"}


def _rule_member(ctx: _Context, day: _dt.date | None, day_facts: dict[str, Any]) -> RuleResult:
    rid = "member-active"
    issuer = ctx.facts.issuer_uscc
    if issuer is None:
        return _r(rid, NOT_EVALUABLE, "the result names no issuing organisation with a 统一社会信用代码", issuer=None)
    member = ctx.issuer
    if member is None:
        return _r(rid, FAILED, f"{issuer} is not a member in registry snapshot {ctx.snapshot.version}", issuer=issuer)
    info = {"issuer": issuer, "member_status": member.status, **member.period.as_dict(), **day_facts}
    if member.status_date:
        info["status_date"] = member.status_date.isoformat()
    if day is None:
        return _r(rid, NOT_EVALUABLE, "the result date is unknown", **info)
    if member.active_on(day):
        return _r(rid, PASSED, f"{member.name} is an active member on {day}", **info)
    return _r(rid, FAILED, f"{member.name} is not an active member on {day}", **info)


def codes_disagree(
    snapshot: Snapshot, codings: Iterable[Coding]
) -> tuple[tuple[Coding, tuple[CatalogueItem, ...]], ...] | None:
    """The codings that name catalogue items, each with its items, when two of them name different items; None
    when they agree.

    Two codings agree when they name a common catalogue item or items sharing a LOINC code (the same analyte in
    a 川渝 and a provincial catalogue). DOMAIN §5.3 gives no precedence between an issuer's local-code map, LOINC
    and a catalogue code, so a disagreement is for a person to settle.
    """
    named = [(c, snapshot.items_for_coding(c)) for c in codings]
    named = [(c, items) for c, items in named if items]
    for i, (_, one) in enumerate(named):
        refs = {(it.catalogue_id, it.code) for it in one}
        loincs = {code for it in one for code in it.loinc}
        for _, other in named[i + 1:]:
            if not (refs & {(it.catalogue_id, it.code) for it in other}
                    or loincs & {code for it in other for code in it.loinc}):
                return tuple(named)
    return None


def _disagreement(named: tuple[tuple[Coding, tuple[CatalogueItem, ...]], ...]) -> tuple[str, list[dict[str, Any]]]:
    """The reason's text and facts for codes naming different catalogue items."""
    parts, facts = [], []
    for coding, items in named:
        listed = ", ".join(f"{it.catalogue_id}:{it.code} {it.display}" for it in items)
        parts.append(f"{coding.system}|{coding.code} → {listed}")
        facts.append({"coding": f"{coding.system}|{coding.code}", "items": [it.ref() for it in items]})
    return "; ".join(parts), facts


def _rule_item(
    ctx: _Context, item: CatalogueItem | None, day: _dt.date | None, day_facts: dict[str, Any],
    disagreeing: tuple[tuple[Coding, tuple[CatalogueItem, ...]], ...] | None = None,
) -> RuleResult:
    rid = "catalogue-item"
    codes = [f"{c.system}|{c.code}" for c in ctx.facts.codings]
    if disagreeing:
        text, matches = _disagreement(disagreeing)
        return _r(rid, NOT_EVALUABLE, f"the result's codes name different catalogue items ({text}): an issuer's "
                  "local code, LOINC and a catalogue code are matches of equal standing, so which item this is "
                  "must be settled by a person（结果的编码指向不同的互认项目，需人工确认）", codings=codes,
                  matches=matches)
    if item is None:
        if not codes:
            return _r(rid, NOT_EVALUABLE, "the result carries no coded item", codings=codes)
        return _r(rid, FAILED, "no recognition catalogue lists this item", codings=codes)
    info = {"codings": codes, **item.ref(), **item.period.as_dict(), **day_facts}
    if day is None:
        return _r(rid, NOT_EVALUABLE, "the result date is unknown", **info)
    if item.period.covers(day):
        return _r(rid, PASSED, f"{item.catalogue_id}:{item.code} {item.display} is in the catalogue on {day}", **info)
    return _r(rid, FAILED, f"{item.catalogue_id}:{item.code} is not in the catalogue on {day}", **info)


def _rule_scope(ctx: _Context, item: CatalogueItem) -> RuleResult:
    rid = "catalogue-scope"
    catalogue = ctx.snapshot.catalogue(item.catalogue_id)
    assert catalogue is not None  # items come from the snapshot's catalogues
    issuer, receiver = ctx.issuer, ctx.receiver_member
    at_day = china_date(ctx.at)
    info: dict[str, Any] = {
        "catalogue": catalogue.id,
        "scope": catalogue.scope_type,
        "scope_label": catalogue.scope_label(),
        "issuer": ctx.facts.issuer_uscc,
        "issuer_province": issuer.province if issuer else None,
        "receiver": ctx.receiver,
        "receiver_province": receiver.province if receiver else None,
    }
    if issuer is None:
        if ctx.facts.issuer_uscc is None:
            return _r(rid, NOT_EVALUABLE, "the issuer is unknown", **info)
        return _r(rid, FAILED, "the issuer is not a member, so no catalogue covers it", **info)
    if receiver is None or not receiver.active_on(at_day):
        return _r(rid, FAILED, f"the receiver {ctx.receiver} is not an active member on {at_day}", **info)
    border = "across the border" if issuer.province != receiver.province else "within one province"
    info["crosses_border"] = issuer.province != receiver.province
    if catalogue.includes(issuer) and catalogue.includes(receiver):
        return _r(rid, PASSED, f"{catalogue.scope_label()} scope covers issuer and receiver ({border})", **info)
    outside = [who for who, m in (("issuer", issuer), ("receiver", receiver)) if not catalogue.includes(m)]
    return _r(
        rid, FAILED, f"{catalogue.scope_label()} scope does not cover the {' and '.join(outside)} ({border})", **info
    )


def _rule_eqa(ctx: _Context, item: CatalogueItem, day: _dt.date | None, day_facts: dict[str, Any]) -> RuleResult:
    rid = "eqa-pass"
    info: dict[str, Any] = {"issuer": ctx.facts.issuer_uscc, **item.ref(), **day_facts}
    if ctx.facts.issuer_uscc is None:
        return _r(rid, NOT_EVALUABLE, "the issuer is unknown", **info)
    if day is None:
        return _r(rid, NOT_EVALUABLE, "the result date is unknown, so the EQA cycle is too", **info)
    results = eqa_results(ctx.snapshot, ctx.facts.issuer_uscc, item, day)
    info["eqa"] = [e.facts() for e in results]
    if not results:
        return _r(rid, FAILED, f"no EQA result on record for {item.display} in the cycle covering {day}", **info)
    if all(e.passed for e in results):
        return _r(
            rid,
            PASSED,
            f"EQA passed for {item.display} ({', '.join(f'{e.provider} {e.year}' for e in results)})",
            **info,
        )
    failed = [e for e in results if not e.passed]
    return _r(
        rid, FAILED, f"EQA failed for {item.display} ({', '.join(f'{e.provider} {e.year}' for e in failed)})", **info
    )


_Day = TypeVar("_Day", _dt.date, _dt.datetime)


def _window_end(start: _Day, days: int) -> _Day | None:
    """``start`` + ``days``; None when that lies beyond the calendar (past the year 9999): no decision reaches it."""
    try:
        return start + _dt.timedelta(days=days)
    except OverflowError:
        return None


def _rule_window(ctx: _Context, item: CatalogueItem) -> RuleResult:
    """One rule whatever the precision sent: the window counts calendar days in China Standard Time (+08:00), from
    the anchor's day to the decision's day (DOMAIN §1.4: compared with the receiving encounter's date); its last
    day is the anchor's day + ``window_days``, valid through its end."""
    rid = "validity-window"
    parsed, path = _anchor(ctx.facts, item.time_anchor)
    info: dict[str, Any] = {
        "time_anchor": item.time_anchor,
        "anchor_from": path,
        "window_days": item.window_days,
        "decided_at": ctx.at.isoformat(),
    }
    if parsed is None:
        return _r(rid, NOT_EVALUABLE, f"the result has no {item.time_anchor} time", **info)
    if isinstance(parsed, str):
        return _r(rid, NOT_EVALUABLE, f"the {item.time_anchor} time is unusable: {parsed}", **info)
    info["anchor"] = parsed.text
    info["anchor_day"] = parsed.day.isoformat()
    today = china_date(ctx.at)
    info["decision_day"] = today.isoformat()
    if parsed.moment is not None and ctx.at < parsed.moment:
        # checked first: a date far in the future has no representable window end
        when = parsed.moment.astimezone(CN_TZ).isoformat()
        return _r(rid, FAILED, f"the {item.time_anchor} time ({when}) is after the decision time "
                  f"({ctx.at.astimezone(CN_TZ).isoformat()})", **info)
    if today < parsed.day:
        return _r(rid, FAILED, f"the {item.time_anchor} date ({parsed.day}) is after the decision date ({today}, "
                  "China time)", **info)
    last_day = _window_end(parsed.day, item.window_days)
    if last_day is None:
        return _r(rid, PASSED, f"within {item.window_days} days of {item.time_anchor} (a window that ends beyond the "
                  "calendar)", **info)
    info["valid_until"] = last_day.isoformat()
    span = f"{item.time_anchor} on {parsed.day}, decided on {today}; valid through {last_day}, China time"
    if today <= last_day:
        return _r(rid, PASSED, f"within {item.window_days} days of {span}", **info)
    return _r(rid, FAILED, f"more than {item.window_days} days since {span}", **info)


_ACCEPTED = {"final", "corrected"}
#: Report classes whose signer other rules check: the 主检医师 (occupational-physician), the issuing institution's
#: qualification (technical-service-qualification).
_SIGNED_ELSEWHERE = ("occupational", "technical-service")
_UNDECIDED = {"amended", "appended", "unknown"}  # later changes or unknown state: a person should look


def _rule_status(ctx: _Context) -> RuleResult:
    rid = "report-status"
    f = ctx.facts
    info: dict[str, Any] = {
        "observation_status": f.observation_status,
        "report": f.report_id,
        "report_status": f.report_status,
        "superseded_by": f.superseded_by,
    }
    if f.superseded_by:
        # the correction in the same Bundle, or one stored before (gateway.store.reports)
        return _r(rid, FAILED, f"the report has been superseded by {f.superseded_by}", **info)
    failed = [
        f"{what} is {status}"
        for what, status in (("the result", f.observation_status), ("the report", f.report_status))
        if status and status not in _ACCEPTED and status not in _UNDECIDED
    ]
    if failed:
        return _r(rid, FAILED, "; ".join(failed), **info)
    if f.report_entry is None:
        return _r(
            rid, NOT_EVALUABLE, "the result belongs to no DiagnosticReport, so the report status is unknown", **info
        )
    missing = [
        f"{what} status is {status or 'missing'}"
        for what, status in (("the result", f.observation_status), ("the report", f.report_status))
        if status not in _ACCEPTED
    ]
    signed = f.report_class in _SIGNED_ELSEWHERE or f.kind != "observation" or f.reviewer_named
    if f.report_class not in _SIGNED_ELSEWHERE and f.kind == "observation":
        info["reviewer_named"] = f.reviewer_named
    if not signed:
        # DOMAIN C6: final and signed (审核医师 present; WS/T 500.7 legalAuthenticator, [V]). The report does not
        # say who reviewed it: a fact missing from the result, so a person looks (as for a missing mark), rather
        # than a report shown to be unsigned.
        missing.append("the report names no 审核医师 (resultsInterpreter naming a physician), so it cannot be "
                       "shown to be signed（报告未注明审核医师，无法确认已审核签发）")
    if missing:
        return _r(rid, NOT_EVALUABLE, "; ".join(missing), **info)
    who = ", 审核医师 named" if f.kind == "observation" and f.report_class not in _SIGNED_ELSEWHERE else ""
    return _r(rid, PASSED, f"result {f.observation_status}, report {f.report_status}{who}", **info)


def _rule_mark(ctx: _Context, item: CatalogueItem) -> RuleResult:
    rid = "mark"
    info = {"expected": item.mark, "marks": list(ctx.facts.marks)}
    if not ctx.facts.marks:
        return _r(rid, NOT_EVALUABLE, f"the result carries no recognition mark (expected {item.mark})", **info)
    if item.mark in ctx.facts.marks:
        return _r(rid, PASSED, f"marked {item.mark}", **info)
    return _r(rid, FAILED, f"marked {', '.join(ctx.facts.marks)}, the catalogue needs {item.mark}", **info)


def _rule_direction(
    ctx: _Context, item: CatalogueItem, day: _dt.date | None, day_facts: dict[str, Any]
) -> RuleResult:
    """Levels are dated (hospital-grade qualifications): the issuer's on the result date, the receiver's on
    the decision date."""
    rid = "direction"
    at_day = china_date(ctx.at)
    issuer_level = ctx.level_on(ctx.facts.issuer_uscc, day) if day is not None else None
    receiver_level = ctx.level_on(ctx.receiver, at_day)
    issuer_rank = issuer_level.rank if issuer_level else None
    receiver_rank = receiver_level.rank if receiver_level else None
    info: dict[str, Any] = {
        "direction": item.direction,
        "min_issuer_level": item.min_issuer_level,
        "issuer_level": issuer_level.level if issuer_level else None,
        "issuer_level_fact": issuer_level.facts() if issuer_level else None,
        "receiver_level": receiver_level.level if receiver_level else None,
        "receiver_level_fact": receiver_level.facts() if receiver_level else None,
        "decision_date": at_day.isoformat(),
        **day_facts,
    }
    needs_issuer = item.direction == "not-lower" or item.min_issuer_level is not None
    if needs_issuer and day is None:
        return _r(rid, NOT_EVALUABLE, "the result date is unknown, so the issuer's hospital level on it is too "
                  "（结果日期不明，无法确定发出机构当日级别）", **info)
    if needs_issuer and issuer_rank is None:
        return _r(rid, NOT_EVALUABLE, f"the issuer's hospital level on {day} is not on record "
                  f"（发出机构在 {day} 的医院级别无记录）", **info)
    if item.min_issuer_level is not None and (issuer_rank or 0) < item.min_issuer_level:
        assert issuer_level is not None
        return _r(
            rid, FAILED, f"the issuer was {issuer_level.level} on {day}, the item needs level "
            f"{item.min_issuer_level} or above（发出机构在结果日期为{issuer_level.level}，该项目要求"
            f"{'一二三'[item.min_issuer_level - 1]}级及以上）", **info
        )
    if item.direction == "not-lower":
        if receiver_rank is None:
            return _r(rid, NOT_EVALUABLE, f"the receiver's hospital level on {at_day} is not on record "
                      f"（接收机构在 {at_day} 的医院级别无记录）", **info)
        assert issuer_level is not None and issuer_rank is not None and receiver_level is not None
        if issuer_rank < receiver_rank:
            return _r(
                rid,
                FAILED,
                f"a {receiver_level.level} receiver does not recognise a result issued while the issuer was "
                f"{issuer_level.level} ({day}) for this item（{receiver_level.level}接收机构不认可发出机构"
                f"{issuer_level.level}期间出具的该项目结果）",
                **info,
            )
        return _r(rid, PASSED, f"{issuer_level.level} issuer on {day}, {receiver_level.level} receiver: "
                  "not a lower level（发出机构级别不低于接收机构）", **info)
    return _r(
        rid, PASSED, "any direction" + (f", issuer level {issuer_level.level} on {day}" if issuer_level else ""),
        **info
    )


def _exam_day(ctx: _Context) -> tuple[_dt.date | None, str | None]:
    parsed, _ = _anchor(ctx.facts, "exam")
    if isinstance(parsed, _Moment):
        return parsed.day, None
    return None, parsed or "the exam date is missing"


def _catalogue_factor(factor: HazardFactor, entry: dict[str, Any]) -> str | None:
    """The factor code the rules look up: a factor written by a name or alias of 《职业病危害因素分类目录》 (铅, with
    no code or as its code) is that catalogue factor; ``entry`` (the decision's facts) records one found so. The
    exposure category is the one sent."""
    hit, how = resolve_factor(factor.code, factor.name)
    if hit is None or how == "code":
        return factor.code
    entry["catalogue_factor"] = hit.code
    entry["found_by"] = how
    return hit.code


def _rule_filing(ctx: _Context) -> RuleResult:
    rid = "occupational-filing"
    day, problem = _exam_day(ctx)
    factors = ctx.facts.hazard_factors
    info: dict[str, Any] = {"issuer": ctx.facts.issuer_uscc, "exam_date": day.isoformat() if day else None}
    if not factors:
        return _r(rid, NOT_EVALUABLE, "the exam report names no hazard factor", **info)
    if day is None or ctx.facts.issuer_uscc is None:
        return _r(rid, NOT_EVALUABLE, problem or "the issuer is unknown", **info)
    checked, uncovered, unknown, unlisted = [], [], [], []
    for factor in factors:
        entry: dict[str, Any] = {"factor": factor.code, "name": factor.name, "category": factor.category}
        label = factor.name or factor.code or "?"
        code = _catalogue_factor(factor, entry)
        if factor.category not in EXPOSURE_CATEGORIES:
            unknown.append(label)
        else:
            # A filing that lists factors of the class covers those only; one that lists none covers the class.
            found = filing_covers(ctx.snapshot, ctx.facts.issuer_uscc, factor.category, code, day)
            entry["filing"] = found.filing.id if found.filing else None
            entry["covered_by"] = found.by
            if found.filed_factors:
                entry["filed_factors"] = len(found.filed_factors)
            cls = EXPOSURE_CATEGORIES[factor.category]
            if found.unknown_factor:
                unlisted.append(f"{label} ({cls}: the filing lists {len(found.filed_factors)} factors and this "
                                "code is not in 《职业病危害因素分类目录》)")
            elif found.filing is None and found.filed_factors:
                uncovered.append(f"{label} ({cls}: the filing lists {len(found.filed_factors)} factors of the "
                                 f"class, not this one（备案的{cls}中无此因素）)")
            elif found.filing is None:
                uncovered.append(f"{label} ({cls})")
        checked.append(entry)
    info["factors"] = checked
    info["radiation_exam"] = any(f.category == "radiation" for f in factors)
    if uncovered:
        return _r(rid, FAILED, f"no 职业健康检查 filing on {day} covers {', '.join(uncovered)}", **info)
    if unknown or unlisted:
        missing = [f"exposure category missing or unknown for {', '.join(unknown)}"] if unknown else []
        missing += [f"cannot tell whether the filing covers {', '.join(unlisted)}"] if unlisted else []
        return _r(rid, NOT_EVALUABLE, "; ".join(missing), **info)
    return _r(rid, PASSED, f"the issuer's filing covers every hazard factor on {day}（备案覆盖全部危害因素）", **info)


def _rule_physician(ctx: _Context) -> RuleResult:
    rid = "occupational-physician"
    day, problem = _exam_day(ctx)
    physician = ctx.facts.chief_physician
    id_card = ctx.facts.chief_physician_id_card
    factors = ctx.facts.hazard_factors
    info: dict[str, Any] = {"physician": physician, "exam_date": day.isoformat() if day else None}
    if physician is None and id_card is None:
        by_name = ctx.facts.chief_physician_name
        if by_name:  # (a CDC export's 主检医师 column: a name, no number)
            return _r(rid, NOT_EVALUABLE, f"the report names the 主检医师 by name alone ({by_name}), with no staff "
                      "number or 身份证号: whose qualification it is cannot be checked", **info)
        return _r(rid, NOT_EVALUABLE, "the report names no 主检医师", **info)
    if not factors:
        return _r(rid, NOT_EVALUABLE, "the exam report names no hazard factor", **info)
    if day is None or ctx.facts.issuer_uscc is None:
        return _r(rid, NOT_EVALUABLE, problem or "the issuer is unknown", **info)
    # 多点执业: a physician listed with their own qualifications counts only where and while registered.
    if physician is not None:
        named, registration = ctx.snapshot.registered_physician(ctx.facts.issuer_uscc, physician, day)
    else:  # named by 身份证号: only a physician the registry lists can be found that way
        assert id_card is not None
        named, registration = ctx.snapshot.physician_by_id_card(ctx.facts.issuer_uscc, id_card, day)
        if named is None:
            return _r(rid, FAILED, "the 主检医师 named by 身份证号 is not a physician listed in registry snapshot "
                      f"{ctx.snapshot.version}（主检医师未在互认登记中）", **info)
        physician = registration.staff_id if registration else None
        info["physician"] = physician
    if named is not None:
        info["registered_physician"] = {"id": named.id, "name": named.name, "certificate": named.certificate}
        info["registration"] = (
            {"member": registration.member, "staff_id": registration.staff_id, **registration.period.as_dict()}
            if registration else None
        )
        if registration is None:
            periods = ", ".join(
                f"{r.period.start or '…'} – {r.period.end or ''}".rstrip()
                for r in named.registrations_at(ctx.facts.issuer_uscc, physician)
            ) or "never here"
            return _r(rid, FAILED, f"the 主检医师 {named.name or named.id} is not registered to practise at the issuer "
                      f"on {day} (registered {periods})（主检医师在体检日未在该机构执业注册）", **info)
    assert physician is not None  # a staff id, or the registration's when named by 身份证号
    issuer = ctx.facts.issuer_uscc
    if named is None and not any(q.physician_id == physician for q in ctx.snapshot.qualifications_held(issuer)):
        # neither a registered physician (多点执业) nor one of the issuer's own per-physician entries
        where = f"{ctx.issuer.name} ({issuer})" if ctx.issuer else issuer
        return _r(rid, FAILED, f"no physician is registered at {where} under staff id {physician} in registry "
                  f"snapshot {ctx.snapshot.version}（该机构无此医务人员ID的登记医师）", **info)
    checked, lacking, unmapped = [], [], []
    for factor in factors:
        entry: dict[str, Any] = {"factor": factor.code, "category": factor.category}
        categories = diagnosis_categories_for(ctx.snapshot, _catalogue_factor(factor, entry), factor.category)
        entry["needs_any_of"] = list(categories)
        found = None
        for category in categories:
            found = physician_qualified(
                ctx.snapshot, ctx.facts.issuer_uscc, physician, "occupational-diagnosis-physician", category, day
            ).qualification
            if found:
                break
        entry["qualification"] = found.id if found else None
        if not categories:
            unmapped.append(factor.name or factor.code or "?")
        elif found is None:
            lacking.append(f"{factor.name or factor.code} ({'/'.join(categories)})")
        checked.append(entry)
    info["factors"] = checked
    if lacking:
        return _r(
            rid, FAILED, f"the 主检医师 holds no diagnosis qualification on {day} for {', '.join(lacking)}", **info
        )
    if unmapped:
        return _r(rid, NOT_EVALUABLE, f"no diagnosis category is known for {', '.join(unmapped)}", **info)
    return _r(rid, PASSED, f"the 主检医师 is qualified for every hazard factor on {day}", **info)


_CHUANYU_PROVINCES = ("50", "51")


def _rule_service_qualification(ctx: _Context) -> RuleResult:
    """谁报告、谁负责: the qualification the report names, held by its issuer, for this service, on the report date."""
    rid = "technical-service-qualification"
    f = ctx.facts
    service = next((c.code for c in f.codings if c.system == SYSTEM_TECHNICAL_SERVICE_TYPE), None)
    day, problem = result_day(f.report_date)
    info: dict[str, Any] = {
        "issuer": f.issuer_uscc,
        "issuer_name": ctx.issuer.name if ctx.issuer else None,
        "qualification_number": f.qualification_number,
        "service_type": service,
        "report_date": day.isoformat() if day else None,
    }
    if service not in TECHNICAL_SERVICE_TYPES:
        return _r(rid, NOT_EVALUABLE, "the report names no known technical-service type", **info)
    needed = TECHNICAL_SERVICE_TYPES[service][1]
    info["needs"] = needed
    if f.issuer_uscc is None:
        return _r(rid, NOT_EVALUABLE, "the issuer is unknown", **info)
    if day is None:
        return _r(rid, NOT_EVALUABLE, f"the report date is unusable: {problem}", **info)
    if not f.qualification_number:
        return _r(rid, NOT_EVALUABLE, "the report names no qualification number", **info)
    held = [q for q in ctx.snapshot.qualifications_held(f.issuer_uscc) if q.number == f.qualification_number]
    if not held:
        return _r(rid, FAILED, f"the issuer holds no qualification numbered {f.qualification_number} in registry "
                  f"snapshot {ctx.snapshot.version}", **info)
    q = held[0]
    info["qualification"] = {**q.facts(), "number": q.number, "authority_province": q.authority_province}
    if q.type != needed:
        return _r(rid, FAILED, f"qualification {q.number} is {QUALIFICATION_TYPES.get(q.type, q.type)}; "
                  f"{TECHNICAL_SERVICE_TYPES[service][0]} needs {QUALIFICATION_TYPES.get(needed, needed)}", **info)
    if q.grade not in ("甲", "乙"):
        return _r(rid, FAILED, f"qualification {q.number} has no 甲/乙 grade on record", **info)
    # The work is done under the qualification: it must hold over the service period (start to end) as well as on
    # the report date. A period is one span and a suspension lasts from its date on, so its ends and the report
    # date are enough.
    start, start_problem = result_day(f.report_effective)
    end, end_problem = result_day(f.service_end) if f.service_end else (start, None)
    info["service_period"] = {"start": start.isoformat() if start else None, "end": end.isoformat() if end else None}
    if start is None:
        return _r(rid, NOT_EVALUABLE, "the service period is unusable (effectivePeriod.start): "
                  f"{start_problem or 'missing'}", **info)
    if end is None:
        return _r(rid, NOT_EVALUABLE, f"the service period's end is unusable (effectivePeriod.end): {end_problem}",
                  **info)
    for when, what in ((start, "the service start"), (end, "the service end"), (day, "the report date")):
        if not q.valid_on(when):
            state = q.status if q.status != "active" and q.status_date and q.status_date <= when \
                else "expired or not yet valid"
            valid = f"{q.period.start or '…'} – {q.period.end or ''}".rstrip()
            return _r(rid, FAILED, f"qualification {q.number} ({q.grade}级, valid {valid}) is not valid on {when}, "
                      f"{what} ({state}): it must cover the service period {start} – {end} and the report date "
                      f"{day}（资质须覆盖服务期间及报告日）", **info)
    if q.scope and not any(w in q.scope for w in service_scope_words(service)):
        return _r(rid, FAILED, f"the 业务范围 of qualification {q.number} ({', '.join(q.scope)}) does not cover "
                  f"{TECHNICAL_SERVICE_TYPES[service][0]}", **info)
    # 甲级 is approved by the national health commission and valid nationwide; 乙级 by a province, valid there.
    national = q.authority_province not in _CHUANYU_PROVINCES and q.grade == "甲" and q.nationally_approved
    info["qualification"]["national_approval"] = q.nationally_approved
    if q.authority_province not in _CHUANYU_PROVINCES and not national:
        needs = ("the national health commission (valid nationwide) or a 川渝 (Sichuan or Chongqing) health authority"
                 if q.grade == "甲" else "a 川渝 (Sichuan or Chongqing) health authority: 乙级 qualifications are "
                 "approved by a province and valid there")
        return _r(rid, FAILED, f"qualification {q.number} ({q.grade}级) was approved by {q.authority_name}, not by "
                  f"{needs}", **info)
    approval = f"{q.authority_name}: national approval, valid nationwide" if national else q.authority_name
    return _r(rid, PASSED, f"{info['issuer_name'] or f.issuer_uscc} answers for this report under {q.grade}级 "
              f"qualification {q.number} ({approval}), valid over the service period {start} – {end} and on the "
              f"report date {day}", **info)


def _rule_signature(ctx: _Context, item: CatalogueItem | None) -> RuleResult | None:
    """The reading institution's signature counts for an item judged by its reader.

    None (not listed) when the report names no reading institution apart from its performer and the Bundle
    is unsigned or signed by the performer: the usual report, read where it was made.
    """
    rid = "reading-signature"
    f = ctx.facts
    performer, reader, signer = f.issuer_uscc, f.interpreter_uscc or f.issuer_uscc, f.signer_uscc
    if item is None or item.responsible != "interpreter":
        # The issuer answers for this result: only its own signature counts. (A member that signs a report
        # another member performed, naming itself as the reader, is taken at its word only where the
        # catalogue has the item judged by its reader.)
        if signer is None or signer == performer:
            return None
        what = f"a {item.item_class} item" if item is not None else "a result outside every catalogue"
        return _r(rid, FAILED, f"signed by {signer}, not by {performer} who performed it: for {what} only the "
                  "performing institution's signature counts", performer=performer, interpreter=reader,
                  signer=signer, item_class=item.item_class if item is not None else None)
    separate = reader != performer
    if not separate and signer in (None, performer):
        return None
    info: dict[str, Any] = {
        "performer": performer,
        "interpreter": reader,
        "signer": signer,
        "item_class": item.item_class,
    }
    if signer is None:
        return _r(rid, NOT_EVALUABLE, f"the Bundle is not signed, so the reading institution {reader}'s "
                  "signature cannot be checked", **info)
    if reader is None:
        return _r(rid, NOT_EVALUABLE, "the report names no performing or reading institution", **info)
    if signer == reader:
        return _r(rid, PASSED, f"signed by the reading institution {reader}", **info)
    what = f"the reading institution {reader}" + (f" (the exam was performed by {performer})" if separate else "")
    return _r(
        rid,
        FAILED,
        f"signed by {signer}, but for a {item.item_class} item the catalogue counts the signature of {what}",
        **info,
    )


def _outcome(rules: Iterable[RuleResult]) -> str:
    statuses = {r.status for r in rules}
    if FAILED in statuses:
        return NOT_RECOGNIZED
    if NOT_EVALUABLE in statuses:
        return NEEDS_REVIEW
    return RECOGNIZED


def _both_members(reader: RuleResult, performer: RuleResult, performer_uscc: str) -> RuleResult:
    """基层检查、上级诊断: the reading and the performing institution must both be active members on the result date."""
    statuses = {reader.status, performer.status}
    status = FAILED if FAILED in statuses else NOT_EVALUABLE if NOT_EVALUABLE in statuses else PASSED
    return RuleResult(
        reader.rule,
        status,
        f"{reader.message} (the reading institution; the exam was performed by {performer_uscc}: "
        f"{performer.message})",
        {**reader.facts, "judged_by": "interpreter", "performer": performer_uscc,
         "performer_membership": {"status": performer.status, **performer.facts}},
    )


def _evaluate(performed: _Context, item: CatalogueItem | None,
              disagreeing: tuple[tuple[Coding, tuple[CatalogueItem, ...]], ...] | None = None) -> list[RuleResult]:
    ctx = performed.judged_by(item)
    day, day_facts = _result_day(ctx, item)
    member = _rule_member(ctx, day, day_facts)
    if ctx.performer is not None:
        member = _both_members(member, _rule_member(performed, day, day_facts), ctx.performer)
    rules = [member, _rule_item(ctx, item, day, day_facts, disagreeing)]
    if item is None:
        why = "no catalogue item to check against"
        rules.append(_r("catalogue-scope", NOT_EVALUABLE, why))
        rules.append(_r("eqa-pass", NOT_EVALUABLE, why))
        rules.append(_r("validity-window", NOT_EVALUABLE, why))
    else:
        rules.append(_rule_scope(ctx, item))
        if item.eqa_required:
            rules.append(_rule_eqa(ctx, item, day, day_facts))
        rules.append(_rule_window(ctx, item))
    rules.append(_rule_status(ctx))
    if ctx.facts.report_class == "technical-service":
        # A technical-service report carries no 互认标识: it is recognised by its issuer's qualification
        # (沪卫职健〔2023〕24号), checked below; hospital levels do not apply.
        rules.append(_rule_service_qualification(ctx))
    elif item is None:
        rules.append(_r("mark", NOT_EVALUABLE, "no catalogue item to check against"))
        rules.append(_r("direction", NOT_EVALUABLE, "no catalogue item to check against"))
    else:
        rules.append(_rule_mark(ctx, item))
        rules.append(_rule_direction(ctx, item, day, day_facts))
    signature = _rule_signature(performed, item)  # every class: whose signature counts
    if signature is not None:
        rules.append(signature)
    if ctx.facts.report_class == "occupational":
        rules.append(_rule_filing(ctx))
        rules.append(_rule_physician(ctx))
    return rules


def _decision_id(facts: ResultFacts, receiver: str, at: _dt.datetime, snapshot: Snapshot) -> str:
    key = "|".join([facts.bundle_id or "", facts.entry, receiver, at.isoformat(), str(snapshot.version)])
    return uuid5(_DECISION_NS, key)


def _check_at(at: _dt.datetime) -> None:
    if not isinstance(at, _dt.datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise InputError("the decision time must be a date-time with a UTC offset", "at")


def decide(facts: ResultFacts, snapshot: Snapshot, receiver_uscc: str, at: _dt.datetime) -> Decision:
    """Decide whether ``receiver_uscc`` may recognise one result at time ``at``.

    Pure: reads nothing but its arguments.

    :raises IdentifierError: ``receiver_uscc`` fails the GB 32100 check.
    :raises InputError: ``at`` has no UTC offset.
    """
    _check_at(at)
    return _decide(facts, snapshot, check_uscc(receiver_uscc), at, {})


def _not_a_recognition(facts: ResultFacts, receiver: str) -> RuleResult | None:
    """The one rule deciding a result that is no recognition at all, or None.

    A receiver does not recognise what it issued itself (互认 is between institutions); an Observation without a
    value (dataAbsentReason) holds no result. Decided against no catalogue item: out of 互认率 and savings.
    """
    if facts.issuer_uscc is not None and facts.issuer_uscc == receiver:
        return _r("between-institutions", FAILED, f"the receiver {receiver} issued this result itself: recognition "
                  "(互认) is between institutions, so there is nothing to recognise（本机构出具的结果不属于互认）",
                  issuer=facts.issuer_uscc, receiver=receiver)
    if facts.kind == "observation" and not facts.has_value:
        why = f" (dataAbsentReason {facts.value_absent_reason})" if facts.value_absent_reason else ""
        return _r("result-value", FAILED, f"the result has no value{why}: there is no result to recognise"
                  "（结果无数值，无可互认的结果）", data_absent_reason=facts.value_absent_reason,
                  codings=[f"{c.system}|{c.code}" for c in facts.codings])
    return None


def _decide(facts: ResultFacts, snapshot: Snapshot, receiver: str, at: _dt.datetime,
            levels: dict[tuple[str | None, _dt.date], LevelFact | None]) -> Decision:
    """:func:`decide` for a checked receiver and time, with the levels already looked up (see :class:`_Context`)."""
    decision_id = _decision_id(facts, receiver, at, snapshot)
    if facts.kind == "conclusion":
        rule = _r(
            "diagnostic-conclusion",
            FAILED,
            "a diagnostic conclusion is the issuing physician's statement, not a recognisable result",
            report=facts.report_id,
            conclusion_codes=[f"{c.system}|{c.code}" for c in facts.codings],
        )
        return Decision(decision_id, NOT_RECOGNIZED, (rule,), facts, receiver, at, snapshot.version, snapshot.digest())

    alone = _not_a_recognition(facts, receiver)
    if alone is not None:
        outcome = NOT_RECOGNIZED if alone.status == FAILED else NEEDS_REVIEW
        return Decision(decision_id, outcome, (alone,), facts, receiver, at, snapshot.version, snapshot.digest())

    ctx = _Context(facts, snapshot, receiver, at, levels)
    disagreeing = codes_disagree(snapshot, facts.codings)
    if disagreeing:
        # never the most favourable of the items: decided against none, each listed with what it would give
        rules = _evaluate(ctx, None, disagreeing)
        seen: list[CatalogueItem] = []
        for _, items in disagreeing:
            seen += [it for it in items if it not in seen]
        return Decision(decision_id, _outcome(rules), tuple(rules), facts, receiver, at, snapshot.version,
                        snapshot.digest(), alternatives=tuple(
                            {**it.ref(), "outcome": _outcome(_evaluate(ctx, it))} for it in seen))
    candidates: list[CatalogueItem | None] = list(catalogue_items_for(snapshot, facts.codings)) or [None]
    evaluated = []
    for position, item in enumerate(candidates):
        rules = _evaluate(ctx, item)
        outcome = _outcome(rules)
        failed = sum(1 for r in rules if r.status == FAILED)
        evaluated.append(((_OUTCOME_RANK[outcome], failed, position), item, rules, outcome))
    evaluated.sort(key=lambda e: e[0])
    _, item, rules, outcome = evaluated[0]
    alternatives = tuple(
        {**other.ref(), "outcome": other_outcome} for _, other, _, other_outcome in evaluated[1:] if other is not None
    )
    return Decision(
        decision_id,
        outcome,
        tuple(rules),
        facts,
        receiver,
        at,
        snapshot.version,
        snapshot.digest(),
        item=item,
        alternatives=alternatives,
        responsible=item.responsible if item is not None else None,
    )


def decide_all(
    facts: Iterable[ResultFacts], snapshot: Snapshot, receiver_uscc: str, at: _dt.datetime
) -> list[Decision]:
    """:func:`decide` for every result of a Bundle, in order.

    :raises IdentifierError: ``receiver_uscc`` fails the GB 32100 check.
    :raises InputError: ``at`` has no UTC offset.
    """
    results = list(facts)
    if not results:
        return []
    _check_at(at)
    receiver = check_uscc(receiver_uscc)
    levels: dict[tuple[str | None, _dt.date], LevelFact | None] = {}
    return [_decide(f, snapshot, receiver, at, levels) for f in results]


def marks_for(issuer_uscc: str, coding: Coding, on_date: _dt.date, snapshot: Snapshot) -> list[MarkGrant]:
    """The recognition marks an issuer may print on a result with this coding on ``on_date``.

    A mark is granted by each catalogue item the coding names that is valid that
    day, whose catalogue's scope includes the issuer, whose minimum issuer level
    the issuer meets and (where required) for which the issuer passed EQA in the
    cycle covering the day. Direction rules depend on the receiver and are
    checked when the result is received. Widest catalogue first (snapshot order);
    each mark once.

    :raises IdentifierError: ``issuer_uscc`` fails the GB 32100 check.
    """
    issuer = snapshot.member(check_uscc(issuer_uscc))
    if issuer is None or not issuer.active_on(on_date):
        return []
    grants: list[MarkGrant] = []
    held = snapshot.level_on(issuer.uscc, on_date)  # the level on the result date
    rank = (held.rank if held else None) or 0
    for item in catalogue_items_for(snapshot, [coding], on_date):
        catalogue = snapshot.catalogue(item.catalogue_id)
        if catalogue is None or not catalogue.includes(issuer):
            continue
        if item.min_issuer_level is not None and rank < item.min_issuer_level:
            continue
        if item.eqa_required and not eqa_passed(snapshot, issuer.uscc, item, on_date):
            continue
        if all(g.mark != item.mark for g in grants):
            grants.append(MarkGrant(item.mark, item.catalogue_id, item.code, item.display))
    return grants
