"""Deciding the results of a received Bundle at once gives the decisions each result gets alone.

:func:`gateway.recognition.engine.decide_all` checks the receiver and the time
once and looks each hospital level up once for the whole Bundle (the rules of
direction ask for the same issuer and receiver on the same days, result after
result); :func:`~gateway.recognition.engine.decide` decides one result as before.
"""

from __future__ import annotations

import copy
import datetime as dt

from test_recognition_rules import BASE, BUNDLES, CASES

from gateway.recognition.engine import decide_all
from gateway.recognition.facts import facts_from_bundle

CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)


def test_deciding_a_bundle_at_once_decides_each_result_as_alone() -> None:
    """:func:`decide_all` looks each hospital level up once for the whole Bundle: the decisions are those
    :func:`decide` makes result by result, in every rule case."""
    from test_recognition_rules import make_snapshot

    from gateway.recognition.engine import decide

    compared = 0
    for case in CASES:
        bundle = copy.deepcopy(BUNDLES[case.bundle])
        if case.change_bundle:
            case.change_bundle(bundle)
        snapshot = make_snapshot(case.change_registry) if case.change_registry else BASE
        facts = facts_from_bundle(bundle)
        for at in (case.at, case.at + dt.timedelta(days=400)):
            together = decide_all(facts, snapshot, case.receiver, at)
            alone = [decide(f, snapshot, case.receiver, at) for f in facts]
            assert together == alone
            assert [d.to_dict() for d in together] == [d.to_dict() for d in alone]
            compared += len(together)
    assert compared > 500
    assert decide_all([], BASE, "not a USCC", AT) == []
