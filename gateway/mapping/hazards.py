"""The hazard-factor code system, generated from the catalogue and concept tables.

``profiles/CodeSystem-hazard-factor.json`` lists every factor of
《职业病危害因素分类目录》 (``mappings/concepts/hazard-catalogue.csv``) and the
GBZ 188 factors outside it (``mappings/concepts/hazard-factors.csv``); a test
keeps the published file equal to :func:`hazard_concepts`. To rewrite it after
changing a table: ``python -m gateway.mapping.hazards profiles/CodeSystem-hazard-factor.json``.

:func:`check_radiation_conclusion` warns when an exam's conclusion is one of
GBZ 98's, which only radiation workers' exams give, but none of the exam's
hazard factors is a 放射性因素.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gateway.adapters.base import SourceMessage
from gateway.errors import Issue, shown
from gateway.mapping.tables import CATEGORY_SYSTEM, MappingSet, load_mappings
from gateway.naming import cs_url

__all__ = ["hazard_concepts", "write_code_system", "check_radiation_conclusion", "RADIATION_WORK_CONCLUSIONS"]

_HAZARD = cs_url("hazard-factor")
#: Conclusions (CodeSystem exam-conclusion) GBZ 98-2020 gives on radiation workers' exams only.
RADIATION_WORK_CONCLUSIONS = frozenset({"fit-for-radiation-work", "unfit-for-radiation-work",
                                        "continue-radiation-work", "temporary-removal",
                                        "reassign-non-radiation-work"})


def hazard_concepts(mappings: MappingSet, catalogue: str = "hazard-catalogue",
                    table: str = "hazard-factors") -> list[dict[str, Any]]:
    """Concepts of CodeSystem hazard-factor: catalogue entries in order, then the table's other factors."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for e in mappings.catalogues[catalogue].entries:
        props: list[dict[str, Any]] = [{"code": "category", "valueCode": e.category},
                                       {"code": "seq", "valueInteger": e.seq}]
        if e.cas:
            props.append({"code": "cas", "valueString": e.cas})
        out.append({"code": e.code, "display": e.name, "property": props})
        seen.add(e.code)
    for targets in mappings.concept(table).rows.values():
        factor = next((t for t in targets if t.system == _HAZARD), None)
        category = next((t for t in targets if t.system == CATEGORY_SYSTEM), None)
        if factor is None or category is None or factor.code in seen:
            continue
        seen.add(factor.code)
        out.append({"code": factor.code, "display": factor.display,
                    "definition": "GBZ 188-2014 所列、不在分类目录中的因素或特殊作业。 / A factor or special operation of "
                                  "GBZ 188-2014 that is not an entry of the classification catalogue.",
                    "property": [{"code": "category", "valueCode": category.code}]})
    return out


def check_radiation_conclusion(msg: SourceMessage) -> None:
    """Warn, at the conclusion's column, about a GBZ 98 conclusion on an exam without a 放射性因素 factor.

    The conclusion belongs to radiation workers' exams (GBZ 98-2020); given
    for a worker exposed to, say, 噪声 alone it is most likely a slip of the
    chief physician or of the export, so the exam is stored but the sender is told.
    A 疑似职业性放射性疾病 conclusion is GBZ 98's as well.
    """
    for report in msg.reports:
        conclusion = report.std.get("conclusion") or {}
        text, where = report.extra.get("conclusion", ("", report.location))
        if conclusion.get("code") not in RADIATION_WORK_CONCLUSIONS and "放射性疾病" not in str(text):
            continue
        known: list[str] = []
        unknown: list[str] = []
        for parts in report.std.get("hazards", []):
            by_url = {p.get("url"): p.get("valueCoding") or {} for p in parts}
            if by_url.get("category", {}).get("code") == "radiation":
                break
            sent = by_url.get("source") or by_url.get("factor") or {}
            (known if "category" in by_url else unknown).append(str(sent.get("display") or sent.get("code") or ""))
        else:
            named = "; ".join(([f"the exam's factors: {', '.join(known)}"] if known else [])
                              + ([f"not in the 目录: {', '.join(unknown)}"] if unknown else []))
            named = f" ({named})" if named else ""
            msg.issues.append(Issue("warning", "business-rule", str(where),
                                    f"conclusion {shown(str(text))} is a GBZ 98 conclusion, given on radiation "
                                    "workers' exams, but no hazard factor of the exam is a 放射性因素 of "
                                    f"《职业病危害因素分类目录》{named}: check the conclusion and the hazard factors",
                                    "207"))


def write_code_system(path: Path, mappings: MappingSet) -> None:
    """Rewrite the concepts (and count) of the CodeSystem file at ``path``."""
    cs = json.loads(path.read_text(encoding="utf-8"))
    cs["concept"] = hazard_concepts(mappings)
    cs["count"] = len(cs["concept"])
    path.write_text(json.dumps(cs, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    write_code_system(Path(sys.argv[1]), load_mappings(Path(__file__).resolve().parents[2] / "mappings"))
