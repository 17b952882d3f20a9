"""Recognition marks (e.g. 川渝HR) a member prints on the results it issues.

A pure service: decided by the registry snapshot alone (catalogue item, issuer
scope and level, EQA for the cycle of the collection date). The pipeline stamps
every report Bundle it signs with it.
"""
from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from typing import Any

from gateway.naming import ext_url
from gateway.recognition.engine import codes_disagree, marks_for, result_day
from gateway.recognition.facts import observation_value
from gateway.registry.models import Coding, Snapshot

__all__ = ["EXT_MARK", "MarkStamper"]

log = logging.getLogger(__name__)

EXT_MARK = ext_url("recognition-mark")
_CACHE_LIMIT = 10_000


class MarkStamper:
    """Stamps the marks member ``issuer_uscc`` may print, under the snapshot ``snapshot()`` gives at the time."""

    def __init__(self, issuer_uscc: str, snapshot: Callable[[], Snapshot]) -> None:
        self.issuer_uscc = issuer_uscc
        self.snapshot = snapshot
        self._grants: dict[tuple[str, str, str, _dt.date], list[str]] = {}
        #: (snapshot digest, the result's codings) -> whether they name different catalogue items: asked once per
        #: code set under a snapshot (a LIS sends the same items over and over)
        self._disagree: dict[tuple[str, tuple[tuple[str, str], ...]], bool] = {}

    def stamp(self, bundle: dict[str, Any]) -> int:
        """Add the marks this member may print on each result of ``bundle``; returns how many.

        Results without a mark stay unmarked. The day is read as the recognition
        rules read it: a result whose date is not precise to the day (``2024-06``,
        ``2024``) or has a time without an offset gets no mark, as its recognition
        would be "not evaluable". A result without a value (dataAbsentReason: there
        is no result to recognise) and one whose codes name different catalogue
        items (which item it is must be settled by a person) get none either.

        :raises ConfigError: no registry snapshot is configured or in force.
        """
        snapshot = self.snapshot()
        added = 0
        for entry in bundle.get("entry", []):
            obs = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(obs, dict) or obs.get("resourceType") != "Observation":
                continue
            if not observation_value(obs)[0]:
                log.debug("no recognition mark for an Observation without a value")
                continue
            when = obs.get("effectiveDateTime") or obs.get("issued")
            day, why_not = result_day(when if isinstance(when, str) else None)
            if day is None:
                log.debug("no recognition mark for an Observation: %s", why_not)
                continue
            marks: list[str] = []
            code = obs.get("code")
            codings = code.get("coding") if isinstance(code, dict) else None
            codings = [c for c in codings if isinstance(c, dict)] if isinstance(codings, list) else []
            pairs = tuple((str(c.get("system", "")), str(c.get("code", ""))) for c in codings)
            disagree = self._disagree.get((snapshot.digest(), pairs)) if len(pairs) > 1 else False
            if disagree is None:
                if len(self._disagree) > _CACHE_LIMIT:
                    self._disagree.clear()
                disagree = self._disagree[(snapshot.digest(), pairs)] = codes_disagree(
                    snapshot, [Coding(system, code) for system, code in pairs]) is not None
            if disagree:
                log.debug("no recognition mark for an Observation whose codes name different catalogue items")
                continue
            for coding in codings:
                key = (snapshot.digest(), str(coding.get("system", "")), str(coding.get("code", "")), day)
                grants = self._grants.get(key)
                if grants is None:  # the same item on the same day under the same snapshot: same marks
                    if len(self._grants) > _CACHE_LIMIT:
                        self._grants.clear()
                    grants = self._grants[key] = [g.mark for g in marks_for(
                        self.issuer_uscc, Coding(key[1], key[2]), day, snapshot)]
                marks += [m for m in grants if m not in marks]
            if marks:
                extensions = obs.setdefault("extension", [])
                if not isinstance(extensions, list):
                    continue
                extensions.extend({"url": EXT_MARK, "valueString": m} for m in marks)
                added += len(marks)
        return added
