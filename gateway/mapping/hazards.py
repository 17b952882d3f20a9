"""The hazard-factor code system, generated from the catalogue and concept tables.

``profiles/CodeSystem-hazard-factor.json`` lists every factor of
《职业病危害因素分类目录》 (``mappings/concepts/hazard-catalogue.csv``) and the
GBZ 188 factors outside it (``mappings/concepts/hazard-factors.csv``); a test
keeps the published file equal to :func:`hazard_concepts`. To rewrite it after
changing a table: ``python -m gateway.mapping.hazards profiles/CodeSystem-hazard-factor.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gateway.mapping.tables import CATEGORY_SYSTEM, MappingSet, load_mappings
from gateway.naming import cs_url

__all__ = ["hazard_concepts", "write_code_system"]

_HAZARD = cs_url("hazard-factor")


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


def write_code_system(path: Path, mappings: MappingSet) -> None:
    """Rewrite the concepts (and count) of the CodeSystem file at ``path``."""
    cs = json.loads(path.read_text(encoding="utf-8"))
    cs["concept"] = hazard_concepts(mappings)
    cs["count"] = len(cs["concept"])
    path.write_text(json.dumps(cs, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    write_code_system(Path(sys.argv[1]), load_mappings(Path(__file__).resolve().parents[2] / "mappings"))
