"""Registry policy: the questions a gateway asks a snapshot, answered for a given date.

Every query takes the date explicitly (a China Standard Time calendar date);
nothing here reads the clock. Queries return what they found, so that a
decision can quote it; ``require_*`` variants raise instead, for callers that
only need a yes.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import IssuerNotQualified, UnknownIssuer
from gateway.registry.models import (
    Catalogue,
    CatalogueItem,
    Coding,
    EqaResult,
    Member,
    Physician,
    PracticeRegistration,
    Qualification,
    Snapshot,
    qualification_type_code,
)
from gateway.registry.reference import factor_code

__all__ = [
    "member_active",
    "require_member",
    "qualifications_of",
    "qualified",
    "require_qualified",
    "eqa_results",
    "eqa_passed",
    "catalogue_items_for",
    "scope_covers",
    "diagnosis_categories_for",
    "FilingCheck",
    "filing_covers",
    "PhysicianCheck",
    "physician_qualified",
]


def member_active(snapshot: Snapshot, uscc: str, on: _dt.date) -> bool:
    """Is ``uscc`` an active member on ``on``?"""
    member = snapshot.member(uscc)
    return member is not None and member.active_on(on)


def require_member(snapshot: Snapshot, uscc: str, on: _dt.date) -> Member:
    """The member ``uscc``, active on ``on``.

    :raises UnknownIssuer: not in the snapshot, or not active on that date.
    """
    member = snapshot.member(uscc)
    if member is None:
        raise UnknownIssuer(f"{uscc} is not a member in registry snapshot {snapshot.version}", "uscc")
    if not member.active_on(on):
        raise UnknownIssuer(f"{uscc} is not an active member on {on.isoformat()}", "uscc")
    return member


def qualifications_of(
    snapshot: Snapshot, uscc: str, qualification_type: str, on: _dt.date, *, physician: str | None = None
) -> list[Qualification]:
    """Qualifications of a type that ``uscc`` (or one of its physicians) holds on ``on``."""
    wanted = qualification_type_code(qualification_type)
    return [
        q
        for q in snapshot.qualifications_held(uscc)
        if q.type == wanted and (physician is None or q.physician_id == physician) and q.valid_on(on)
    ]


def qualified(
    snapshot: Snapshot,
    uscc: str,
    qualification_type: str,
    scope: str | None,
    on: _dt.date,
    *,
    physician: str | None = None,
) -> Qualification | None:
    """The first qualification of the type valid on ``on`` whose scope includes ``scope``.

    ``scope`` is an item code, an exposure category or a diagnosis category,
    depending on the type; ``None`` asks only whether the qualification is held.
    """
    for q in qualifications_of(snapshot, uscc, qualification_type, on, physician=physician):
        if scope is None or scope in q.scope:
            return q
    return None


def require_qualified(
    snapshot: Snapshot,
    uscc: str,
    qualification_type: str,
    scope: str | None,
    on: _dt.date,
    *,
    physician: str | None = None,
) -> Qualification:
    """Like :func:`qualified`, but raises when nothing qualifies.

    :raises IssuerNotQualified: no such qualification valid on ``on``.
    """
    found = qualified(snapshot, uscc, qualification_type, scope, on, physician=physician)
    if found is None:
        what = f"{qualification_type} for {scope}" if scope else qualification_type
        raise IssuerNotQualified(f"{uscc} holds no {what} valid on {on.isoformat()}", "uscc")
    return found


def eqa_results(snapshot: Snapshot, uscc: str, item: CatalogueItem, on: _dt.date) -> list[EqaResult]:
    """EQA results of ``uscc`` for ``item`` whose cycle covers ``on``."""
    return [e for e in snapshot.eqa_of(uscc) if e.concerns(item) and e.period.covers(on)]


def eqa_passed(snapshot: Snapshot, uscc: str, item: CatalogueItem, on: _dt.date) -> bool:
    """Did ``uscc`` pass EQA for ``item`` in the cycle covering ``on``?

    A failed round in the same cycle outweighs a pass: the lab is not 合格 for that cycle.
    """
    results = eqa_results(snapshot, uscc, item, on)
    return bool(results) and all(e.passed for e in results)


def catalogue_items_for(
    snapshot: Snapshot, codings: Iterable[Coding], on: _dt.date | None = None
) -> list[CatalogueItem]:
    """Catalogue items a result's codings name (catalogue code, LOINC or the issuer's local code).

    With ``on``, only items valid on that date. Catalogue order, then item order;
    each item once.
    """
    found: dict[tuple[str, str], CatalogueItem] = {}
    for coding in codings:
        for item in snapshot.items_for_coding(coding):
            if on is None or item.period.covers(on):
                found.setdefault((item.catalogue_id, item.code), item)
    if len(found) < 2:
        return list(found.values())
    return sorted(found.values(), key=snapshot.catalogue_position)


def scope_covers(catalogue: Catalogue, issuer: Member, receiver: Member) -> bool:
    """Does the catalogue's scope take in both issuer and receiver?

    川渝: both in Sichuan or Chongqing (across the border too); provincial: both in
    that province; alliance: both among its members.
    """
    return catalogue.includes(issuer) and catalogue.includes(receiver)


def diagnosis_categories_for(
    snapshot: Snapshot, factor_code: str | None, exposure_category: str | None
) -> tuple[str, ...]:
    """The 职业病诊断类别 that cover a hazard factor: by factor code if the registry lists it, else by category."""
    if factor_code and factor_code in snapshot.diagnosis_by_factor:
        return snapshot.diagnosis_by_factor[factor_code]
    if exposure_category:
        return snapshot.diagnosis_by_exposure.get(exposure_category, ())
    return ()


@dataclass(frozen=True)
class FilingCheck:
    """Whether a 职业健康检查 filing covers one hazard factor on a day, and how.

    ``by`` is ``class`` (a filing of the class that lists no factors of it), ``factor`` (a filing that lists
    the factor), or None when nothing covers it; ``unknown_factor`` when a filing lists factors of the class
    but the result's factor code is not one of the catalogue, so whether it is filed cannot be said.
    """

    filing: Qualification | None
    by: str | None
    filed_factors: tuple[str, ...] = ()
    unknown_factor: bool = False


def _factor_classes_of(code: str) -> set[str]:
    hit = factor_code(code)
    return {hit.category} if hit is not None else set()


def _factor_classes(q: Qualification) -> set[str]:
    return {c for code in q.factors for c in _factor_classes_of(code)}


def filing_covers(
    snapshot: Snapshot, uscc: str, category: str, factor: str | None, on: _dt.date
) -> FilingCheck:
    """Does a filing of ``uscc`` valid on ``on`` cover ``factor`` of exposure class ``category``?

    A filing whose scope lists the class covers all of it unless it lists factors of that class; then it
    covers those factors only (a county hospital that filed 56 化学因素 is not filed for the other 319).
    """
    filings = [q for q in qualifications_of(snapshot, uscc, "occupational-exam-filing", on) if category in q.scope]
    whole = next((q for q in filings if category not in _factor_classes(q)), None)
    if whole is not None:
        return FilingCheck(whole, "class")
    hit = factor_code(factor)
    listed = tuple(c for q in filings for c in q.factors if category in _factor_classes_of(c))
    if hit is not None:
        for q in filings:
            if hit.code in q.factors:
                return FilingCheck(q, "factor", listed)
    if filings and hit is None:
        return FilingCheck(None, None, listed, unknown_factor=True)
    return FilingCheck(None, None, listed)


@dataclass(frozen=True)
class PhysicianCheck:
    """Who a member's staff id names and the qualification found: a registered physician's own
    (``physician`` and ``registration`` set) or, in an older source, the member's per-physician entry."""

    qualification: Qualification | None
    physician: Physician | None = None
    registration: PracticeRegistration | None = None


def physician_qualified(
    snapshot: Snapshot, uscc: str, staff_id: str, qualification_type: str, scope: str | None, on: _dt.date
) -> PhysicianCheck:
    """The qualification of the physician ``uscc`` writes as ``staff_id``, valid on ``on`` for ``scope``.

    A physician listed under ``physicians`` with a registration at ``uscc`` under that staff id is looked up
    by their own qualifications, which count only while the registration covers ``on`` (多点执业); otherwise the
    member's own per-physician qualifications (older sources) are searched.
    """
    physician, registration = snapshot.registered_physician(uscc, staff_id, on)
    if physician is not None:
        if registration is None:
            return PhysicianCheck(None, physician, None)
        wanted = qualification_type_code(qualification_type)
        for q in snapshot.physician_qualifications(physician.id):
            if q.type == wanted and q.valid_on(on):
                if scope is None or scope in q.scope:
                    return PhysicianCheck(q, physician, registration)
        return PhysicianCheck(None, physician, registration)
    return PhysicianCheck(qualified(snapshot, uscc, qualification_type, scope, on, physician=staff_id))
