"""Physician overrides: the receiving physician's last word on a recognition decision.

互认 is judged by the receiving physician (以接诊医师判断为标准). A physician who
orders a re-test despite a decision records one of the six national re-test
reasons (NHC, 2022 Measures; DOMAIN.md §1.1) and their own identifier. The
override is stored beside the decision and never replaces it, so the audit
trail shows both what the rules said and what the physician decided.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gateway.errors import InputError
from gateway.naming import SYSTEM_STAFF, cs_url

__all__ = [
    "RetestReason",
    "RETEST_REASONS",
    "RETIRED_RETEST_REASONS",
    "CS_RETEST_REASON",
    "Override",
    "make_override",
    "retest_reason_code",
]

#: Code system of the re-test reasons below (ours: the national list has no published codes).
CS_RETEST_REASON = cs_url("retest-reason")


@dataclass(frozen=True)
class RetestReason:
    """One national re-test reason: stable code, Chinese and English text."""

    code: str
    zh: str
    en: str


_REASONS: dict[str, RetestReason] = {
    r.code: r
    for r in (
        RetestReason(
            "condition-changed",
            "因病情变化，检查检验结果与患者临床表现、疾病诊断不符，难以满足临床诊疗需求",
            "The patient's condition changed and the result no longer fits the clinical picture or diagnosis",
        ),
        RetestReason(
            "rapid-change",
            "检查检验结果在疾病发展演变过程中变化较快",
            "The result changes quickly as the disease evolves",
        ),
        RetestReason(
            "critical-item",
            "检查检验项目对于疾病诊疗意义重大（如手术、输血等重大医疗措施前）",
            "The item is critical to treatment, e.g. before surgery or transfusion",
        ),
        RetestReason("emergency", "急诊、急救等抢救生命的紧急状态下", "Emergency or life-saving care"),
        RetestReason(
            "appraisal",
            "涉及司法、伤残及病退等鉴定的",
            "Judicial, disability, medical-retirement or other appraisal",
        ),
        RetestReason("other-necessary", "其他情形确需复查的", "Other situations that genuinely need a re-test"),
    )
}


#: Codes written before the list followed CodeSystem retest-reason, and the code each one means now.
#: Audit entries and stored overrides keep what was written; readers translate.
RETIRED_RETEST_REASONS: dict[str, str] = {"other": "other-necessary"}


class _Reasons(Mapping[str, RetestReason]):
    """The six reasons by code (CodeSystem retest-reason), answering to a retired code as well.

    Iterating gives the six current codes only, so lists and messages show what
    the CodeSystem publishes; looking up a retired code finds the reason it means.
    """

    def __getitem__(self, code: str) -> RetestReason:
        return _REASONS[RETIRED_RETEST_REASONS.get(code, code)]

    def __iter__(self) -> Iterator[str]:
        return iter(_REASONS)

    def __len__(self) -> int:
        return len(_REASONS)

    def __contains__(self, code: object) -> bool:
        return isinstance(code, str) and RETIRED_RETEST_REASONS.get(code, code) in _REASONS


#: The six re-test reasons, in the order of the national list (codes of CodeSystem retest-reason).
RETEST_REASONS: Mapping[str, RetestReason] = _Reasons()


def retest_reason_code(code: str) -> str:
    """The current CodeSystem code of a re-test reason code (a retired one is translated)."""
    return RETIRED_RETEST_REASONS.get(code, code)


@dataclass(frozen=True)
class Override:
    """A physician's re-test decision about one recognition decision."""

    decision_id: str
    reason: str
    physician: str
    recorded_at: _dt.datetime
    note: str | None = None
    physician_system: str = SYSTEM_STAFF

    @property
    def reason_info(self) -> RetestReason:
        """The reason's texts."""
        return RETEST_REASONS[self.reason]


def make_override(
    decision_id: str,
    reason: str,
    physician: str,
    recorded_at: _dt.datetime,
    note: str | None = None,
    *,
    physician_system: str = SYSTEM_STAFF,
) -> Override:
    """A checked override. A retired reason code (``other``) is taken as the code it now is.

    :raises InputError: unknown reason code, missing physician identifier or decision id,
        or ``recorded_at`` without UTC offset.
    """
    if reason not in RETEST_REASONS:
        raise InputError(f"re-test reason {reason!r} is not one of {', '.join(RETEST_REASONS)}", "reason")
    if not (physician or "").strip():
        raise InputError("the physician's identifier is required", "physician")
    if not (decision_id or "").strip():
        raise InputError("the decision id is required", "decision_id")
    if recorded_at.tzinfo is None or recorded_at.utcoffset() is None:
        raise InputError("recorded_at must carry a UTC offset", "recorded_at")
    return Override(
        decision_id.strip(),
        retest_reason_code(reason),
        physician.strip(),
        recorded_at,
        (note or "").strip() or None,
        physician_system,
    )
