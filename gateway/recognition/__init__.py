"""Recognition: the explainable 互认 decision for every result a member receives.

``facts.py`` reads report Bundles into :class:`ResultFacts`; ``engine.py`` is
the pure decision (:func:`decide`: facts, snapshot, receiver, time -> decision
with every rule checked) and :func:`marks_for` for the issuing side;
``overrides.py`` the physician's re-test override with the six national
reasons; ``store.py`` keeps decisions and overrides; ``fhir.py`` speaks
``$recognize`` Parameters.
"""

from __future__ import annotations

from gateway.recognition.engine import RULES, Decision, MarkGrant, RuleResult, decide, decide_all, marks_for
from gateway.recognition.facts import HazardFactor, ResultFacts, facts_from_bundle
from gateway.recognition.overrides import RETEST_REASONS, Override, make_override

__all__ = [
    "RULES",
    "Decision",
    "MarkGrant",
    "RuleResult",
    "decide",
    "decide_all",
    "marks_for",
    "HazardFactor",
    "ResultFacts",
    "facts_from_bundle",
    "RETEST_REASONS",
    "Override",
    "make_override",
]
