"""Profiles: load our implementation guide (``profiles/``) and validate resources against it.

The guide is a small FHIR R4 package: StructureDefinitions (profiles and
extensions, as differentials), CodeSystems and ValueSets, one JSON file each,
plus ``package.json``. :func:`load_guide` reads it once at start-up into
``{canonical_url: resource}`` and compiles every profile into a tree of checks,
so validating a resource never parses a profile or a FHIRPath expression again
(the cost HAPI users complain about most).

What :meth:`Guide.validate` checks, returning *every* issue with a FHIRPath-style
location (``Observation.code.coding[0].system``) and a severity:

- base shape, for every element: unknown elements, an object where a primitive
  belongs (or the reverse), empty strings/arrays/objects, ``null``, primitive
  formats (``dateTime`` without an offset, bad ``instant``, ``code`` with
  spaces, ...), extension ``url`` present and ``ext-1``; an array where one value
  belongs or the reverse; an element R4 requires that is missing;
  and R4's own required bindings on codes whose value sets can be listed
  (``Observation.status``, ``Patient.gender``, ``Identifier.use``, ``Bundle.type``...: 337
  elements, ``r4-required-codes.json``, made from HL7's definitions);
- our extensions wherever they appear: known URL, allowed context, value type;
- each profile named in ``meta.profile`` (``url`` or ``url|version``; an unknown
  one is an error): cardinality, slices (value/pattern discriminators),
  ``fixed[x]``/``pattern[x]``, required bindings to our ValueSets, allowed
  choice types, and the profiles' FHIRPath invariants (fhirpathpy, compiled once);
- a Bundle: itself, then each ``entry.resource`` against the profiles *it*
  declares, located as ``Bundle.entry[3].resource...``.

R4's own cardinalities are checked for every resource type and datatype: an element
it requires (``Observation.status``, ``Patient.link.other``; a primitive may be there
with its ``_status`` extensions alone) and the array shape of every element
(``r4-elements.json``, made from HL7's definitions; an element a profile requires too
is reported once, by the profile). Base invariants (``obs-6``, ``dom-3``...),
terminology outside our own ValueSets and R4's listable required bindings (MIME
types, currencies; the extensible and preferred ones), and the few resource types whose
published definitions are of a later FHIR version (``ResearchStudy``...: their
array shapes) are left to a full R4 validator (the tests run three on the guide and
on the golden files). A few invariants also have a Python twin
(:data:`NATIVE_CHECKS`) used instead of fhirpathpy on the hot path; a test keeps
each twin equal to its published FHIRPath.

Most resources have nothing to report, so :meth:`Guide.validate` first asks a
check-only pass (:mod:`gateway.fhir.profilecheck`: no locations, no issue
objects, the profiles compiled into closures) whether there is anything at all;
only then, or when that pass cannot vouch for the input, does the reporting walk
(:meth:`Guide.validate_reference`) run. ``tests/test_profiles_fastpath.py`` holds
the two to the same issues on a corpus of good and broken Bundles.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from gateway.errors import ConfigError, Issue, ProfileViolation, shown
from gateway.identifiers import id_card_check_char, uscc_check_char
from gateway.naming import IG_BASE, IG_VERSION

if TYPE_CHECKING:
    from gateway.fhir.profilecheck import CleanCheck

__all__ = [
    "FHIR_VERSION",
    "CONFORMANCE_TYPES",
    "Guide",
    "load_guide",
    "default_profiles_dir",
    "validate",
    "check",
    "has_errors",
    "NATIVE_CHECKS",
    "NATIVE_EXPRESSIONS",
    "twin_for",
    "forbidden_character",
]

log = logging.getLogger(__name__)

FHIR_VERSION = "4.0.1"
#: Resource types a guide file may hold.
CONFORMANCE_TYPES = ("StructureDefinition", "CodeSystem", "ValueSet")
_CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
_MISSING: Any = object()
_MAX_DEPTH = 64  # deeper JSON than this is refused rather than walked (hostile input)

# ------------------------------------------------------------------ primitive types

# R4 primitive formats (datatypes.html), anchored. A dateTime with a time part
# must carry an offset: the gateway's own rule and the specification's.
_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TZ = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_FORMATS: dict[str, re.Pattern[str]] = {
    "date": re.compile(rf"^{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?$"),
    "dateTime": re.compile(rf"^{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T{_TIME}{_TZ})?)?)?$"),
    "instant": re.compile(rf"^{_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T{_TIME}{_TZ}$"),
    "time": re.compile(rf"^{_TIME}$"),
    "code": re.compile(r"^[^\s]+( [^\s]+)*$"),
    "id": re.compile(r"^[A-Za-z0-9\-\.]{1,64}$"),
    "oid": re.compile(r"^urn:oid:[0-2](\.(0|[1-9][0-9]*))+$"),
    "uuid": re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
    "uri": re.compile(r"^\S*$"),
    "url": re.compile(r"^\S*$"),
    "canonical": re.compile(r"^\S*$"),
    # (the specification's (\s*([0-9a-zA-Z\+/=]){4}\s*)+ read with one way to match: linear, not exponential)
    "base64Binary": re.compile(r"^\s*(?:[0-9a-zA-Z+/=]{4}\s*)+$"),
}
_STRING_TYPES = frozenset(
    {"string", "code", "id", "markdown", "uri", "url", "canonical", "oid", "uuid", "base64Binary", "xhtml",
     "date", "dateTime", "instant", "time"}
)
_INTEGER_TYPES = {"integer": None, "positiveInt": 1, "unsignedInt": 0}
# What no FHIR string may hold (R4 string: ``[ \r\n\t\S]+``): characters below U+0020 other than tab, CR and
# LF, and lone surrogates (not characters at all: no UTF-8 can carry them). Searched only in a string that is
# not printable, which every such string is: the well-formed common case costs one str.isprintable().
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
PRIMITIVES = _STRING_TYPES | {"boolean", "decimal"} | set(_INTEGER_TYPES)
_PLAIN_STRINGS = frozenset({"string", "markdown", "xhtml"})

# Which elements are JSON arrays (R4 max > 1), for the types this guide's resources are made of.
# fhirpathpy's model has no cardinality, so this is spelled out (a test holds it equal to R4's definitions); for
# any other owner, R4's own table (r4-elements.json, made from them) says. extension, modifierExtension and
# contained repeat everywhere.
_ALWAYS_REPEATING = frozenset({"extension", "modifierExtension", "contained"})
_REPEATING: dict[str, frozenset[str]] = {
    owner: frozenset(names.split())
    for owner, names in {
        "CodeableConcept": "coding", "HumanName": "given prefix suffix", "Address": "line",
        "Meta": "profile security tag", "Signature": "type", "Timing": "event",
        "Timing.repeat": "dayOfWeek timeOfDay when",
        "Coding": "", "Identifier": "", "Reference": "", "Quantity": "", "SimpleQuantity": "", "Age": "",
        "Duration": "", "Count": "", "Distance": "", "Money": "", "Range": "", "Ratio": "", "Period": "",
        "Attachment": "", "Annotation": "", "ContactPoint": "", "Narrative": "", "SampledData": "", "Extension": "",
        "Observation": "identifier basedOn partOf category focus performer interpretation note referenceRange "
                       "hasMember derivedFrom component",
        "Observation.referenceRange": "appliesTo", "Observation.component": "interpretation referenceRange",
        "DiagnosticReport": "identifier basedOn category performer resultsInterpreter specimen result "
                            "imagingStudy media conclusionCode presentedForm",
        "DiagnosticReport.media": "",
        "Patient": "identifier name telecom address photo contact communication generalPractitioner link",
        "Patient.contact": "relationship telecom", "Patient.communication": "", "Patient.link": "",
        "Organization": "identifier type alias telecom address contact endpoint", "Organization.contact": "telecom",
        "Bundle": "link entry", "Bundle.link": "", "Bundle.entry": "link", "Bundle.entry.search": "",
        "Bundle.entry.request": "", "Bundle.entry.response": "",
        "Specimen": "identifier parent request processing container condition note",
        "Specimen.collection": "", "Specimen.processing": "additive", "Specimen.container": "identifier",
    }.items()
}

_HL7_ERROR = {"required": "101", "code-invalid": "103"}  # HL7 table 0357, for ACK ERR segments


# The same codes, code systems and times come back in every Bundle a member
# sends (twenty Observations share one status, one category, one issued time),
# and matching a format costs more than all the rest of checking a string. So
# the short strings last found well formed are remembered, by type: a bounded
# set, and strings are immutable, so what is remembered stays true.
_SEEN: dict[str, set[str]] = {type_code: set() for type_code in _FORMATS}
_SEEN_MAX = 2048  # per type; then the set starts afresh rather than keep every identifier ever sent
_SEEN_LONGEST = 128  # longer strings are checked every time, so a hostile client cannot fill memory


def _well_formed(type_code: str, value: str) -> bool:
    """Whether ``value`` is a valid ``type_code`` string (one of :data:`_FORMATS`), remembering it if so."""
    if not value.strip() or not _FORMATS[type_code].match(value) or forbidden_character(value):
        return False
    if len(value) <= _SEEN_LONGEST:
        seen = _SEEN[type_code]
        if len(seen) >= _SEEN_MAX:
            seen.clear()
        seen.add(value)
    return True


def forbidden_character(value: str) -> str:
    """How a character no FHIR string may hold is named (``U+0000 at character 4``); empty when there is none."""
    if value.isprintable():
        return ""
    m = _FORBIDDEN.search(value)
    if m is None:
        return ""
    kind = "lone surrogate" if m.group() >= "\ud800" else "control character"
    return f"{kind} U+{ord(m.group()):04X} at character {m.start() + 1}"


def _primitive_problem(type_code: str, value: Any) -> str | None:
    """Why ``value`` is not a valid JSON form of primitive ``type_code`` (None when it is)."""
    if type_code == "boolean":
        return None if isinstance(value, bool) else "must be true or false (boolean)"
    if type_code == "decimal":
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            return "must be a JSON number (decimal)"
        return None
    if type_code in _INTEGER_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, Decimal) and value == value.to_integral_value() and "." not in str(value):
                value = int(value)
            else:
                return f"must be a whole JSON number ({type_code})"
        low = _INTEGER_TYPES[type_code]
        if not -2147483648 <= value <= 2147483647 or (low is not None and value < low):
            digits = str(Decimal(value))  # (str() of an int refuses more than 4,300 digits)
            if len(digits) > 60:
                digits = f"{digits[:60]}… ({len(digits)} digits)"
            return f"{digits} is out of range for {type_code}"
        return None
    if not isinstance(value, str):
        return f"must be a JSON string ({type_code})"
    if not value.strip():
        return f"must not be empty or blank ({type_code})"
    bad = forbidden_character(value)
    if bad:
        return f"holds a {bad}, which FHIR strings do not allow ({type_code})"
    pattern = _FORMATS.get(type_code)
    if pattern is not None and not pattern.match(value):
        if type_code in ("dateTime", "instant") and "T" in value:
            return f"{shown(value)} is not a valid {type_code} (a time needs seconds and a UTC offset such as +08:00)"
        return f"{shown(value)} is not a valid {type_code}"
    return None


# ------------------------------------------------------------------ the R4 type model


class _Model:
    """Which type each R4 element has, from fhirpathpy's R4 model (no network, no snapshots)."""

    def __init__(self) -> None:
        from fhirpathpy.models import models  # deferred: only a loaded guide needs it

        m = models["r4"]
        self.fhirpath_model: dict[str, Any] = m
        self._parent: dict[str, str] = m["type2Parent"]
        self._choices: dict[str, list[str]] = m["choiceTypePaths"]
        # owner (a type name, or the path of a backbone element) -> {element name: (type code, owner of its children)}
        own: dict[str, dict[str, tuple[str, str]]] = {}
        for key, type_code in m["path2Type"].items():
            owner, _, name = key.rpartition(".")
            if type_code.startswith("System."):
                type_code = "string"
            own.setdefault(owner, {})[name] = (type_code, type_code)
            parts = key.split(".")
            for i in range(2, len(parts)):  # backbone elements are only implied by their children's paths
                path = ".".join(parts[:i])
                if path not in m["path2Type"]:
                    own.setdefault(".".join(parts[: i - 1]), {})[parts[i - 1]] = ("BackboneElement", path)
        for key, target in m["pathsDefinedElsewhere"].items():
            owner, _, name = key.rpartition(".")
            own.setdefault(owner, {})[name] = ("BackboneElement", target)
        self._own = own
        self._children: dict[str, dict[str, tuple[str, str]]] = {}
        self._slots: dict[str, dict[str, _Slot]] = {}
        self._required: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
        self.resource_types = frozenset(
            t for t in self._parent if self._is_a(t, "Resource") and t not in ("Resource", "DomainResource")
        )

    def _is_a(self, type_name: str, ancestor: str) -> bool:
        for _ in range(10):
            if type_name == ancestor:
                return True
            type_name = self._parent.get(type_name, "")
            if not type_name:
                return False
        return False

    def children_of(self, owner: str) -> dict[str, tuple[str, str]]:
        """Every element an element keyed ``owner`` may have: ``{name: (type code, owner of its children)}``."""
        table = self._children.get(owner)
        if table is None:
            table = {}
            chain: list[str] = []
            current: str | None = owner if "." not in owner else "BackboneElement"
            while current:
                chain.append(current)
                current = self._parent.get(current)
            if "." in owner:
                chain.insert(0, owner)
            for link in reversed(chain):  # the most specific definition wins
                table.update(self._own.get(link, {}))
            self._children[owner] = table
        return table

    def slots(self, owner: str) -> dict[str, _Slot]:
        """What the base walk needs of every element an element keyed ``owner`` may have, worked out once."""
        table = self._slots.get(owner)
        if table is None:
            repeating = _REPEATING.get(owner)
            if repeating is None:
                repeating = _r4_elements()[1].get(owner)
            table = {}
            for name, (type_code, child_key) in self.children_of(owner).items():
                array: bool | None = None  # None: the array shape is left to a full R4 validator
                if name in _ALWAYS_REPEATING:
                    array = True
                elif repeating is not None:
                    array = name in repeating
                bound = _r4_required_codes().get(f"{owner}.{name}") if type_code == "code" else None
                if bound is not None:
                    kind = _CODED
                elif type_code in _PLAIN_STRINGS:
                    kind = _PLAIN
                elif type_code in _STRING_TYPES:
                    kind = _FORMATTED
                elif type_code in PRIMITIVES:
                    kind = _SCALAR
                else:
                    kind = _RESOURCE if type_code == "Resource" else _COMPLEX
                table[name] = _Slot(type_code, child_key, array, kind,
                                    bound[1] if bound is not None else _SEEN.get(type_code, frozenset()),
                                    name in ("extension", "modifierExtension"), bound[0] if bound is not None else "")
            self._slots[owner] = table
        return table

    def required(self, owner: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The elements R4 requires of an element keyed ``owner`` (its own and those of the types it derives from):
        ``((name, JSON keys any one of which is it), ...)``; a primitive is there with its ``_name`` object alone,
        a choice element with any of its types (``value[x]``: ``valueQuantity``, ``valueString``...)."""
        found = self._required.get(owner)
        if found is None:
            table = _r4_elements()[0]
            names: list[str] = []
            current: str | None = owner if "." not in owner else "BackboneElement"
            chain = [owner] if "." in owner else []
            while current:
                chain.append(current)
                current = self._parent.get(current)
            for link in chain:
                names += [n for n in table.get(link, ())
                          if n not in names and (link, n) not in _REQUIRED_SAID_ELSEWHERE]
            children = self.children_of(owner)
            result: list[tuple[str, tuple[str, ...]]] = []
            for name in names:
                if name.endswith("[x]"):
                    base = name[:-3]
                    keys = [k for k in children if k.startswith(base) and k[len(base):len(base) + 1].isupper()]
                else:
                    keys = [name]
                result.append((name, tuple(keys) + tuple("_" + k for k in keys)))
            found = self._required[owner] = tuple(result)
        return found

    def child(self, owner: str, name: str) -> tuple[str, str] | None:
        """``(type code, owner of its children)`` of element ``name`` under ``owner``, or None if R4 has none."""
        return self.children_of(owner).get(name)

    def choice_types(self, owner: str, name: str) -> list[str]:
        """FHIR type codes a choice element ``name[x]`` may take (``Quantity``, ``string``, ...)."""
        current: str | None = owner
        while current:
            types = self._choices.get(f"{current}.{name}")
            if types is not None:
                return [t if t not in _CAPITALISED_PRIMITIVES else t[0].lower() + t[1:] for t in types]
            current = self._parent.get(current)
        return []


# How the base walk treats the values of an element, by its type.
_PLAIN = 0  # string, markdown, xhtml: any JSON string that is not blank
_FORMATTED = 1  # the other string types: not blank, and in their R4 format
_SCALAR = 2  # boolean, decimal and the integer types
_COMPLEX = 3  # a datatype or backbone element: a JSON object, walked in turn
_RESOURCE = 4  # a resource inside another (contained, Bundle.entry.resource)
_CODED = 5  # a code with a required binding in R4 (Observation.status): one of its value set's codes


@functools.lru_cache(maxsize=1)
def _r4_required_codes() -> dict[str, tuple[str, frozenset[str]]]:
    """R4's ``code`` elements bound (required) to a value set whose codes can be listed:
    ``{element path: (value set url, its codes)}``, from ``r4-required-codes.json`` beside this module (made from
    the HL7 definitions by ``tests/tools/r4codes/generate.py``; the test suite holds the two equal)."""
    data = json.loads((Path(__file__).with_name("r4-required-codes.json")).read_text(encoding="utf-8"))
    return {path: (bound["valueSet"], frozenset(bound["codes"])) for path, bound in data["elements"].items()}


#: Required elements the walk reports in its own words (an extension's url: ``_check_extensions``).
_REQUIRED_SAID_ELSEWHERE = frozenset({("Extension", "url")})


@functools.lru_cache(maxsize=1)
def _r4_elements() -> tuple[dict[str, list[str]], dict[str, frozenset[str]]]:
    """R4's required elements (``min`` 1 or more) and repeating ones (``max`` above 1), each as ``{owner:
    elements}``, from ``r4-elements.json`` beside this module (made from the HL7 definitions by
    ``tests/tools/r4codes/elements.py``; the test suite holds the two equal)."""
    data = json.loads((Path(__file__).with_name("r4-elements.json")).read_text(encoding="utf-8"))
    return ({owner: list(names) for owner, names in data["required"].items()},
            {owner: frozenset(names) for owner, names in data["repeating"].items()})


@functools.lru_cache(maxsize=1)
def r4_summary_elements() -> dict[str, frozenset[str]]:
    """Each resource type's own elements R4 marks ``isSummary`` (what ``_summary=true`` keeps; a choice element
    as ``value[x]``), from ``r4-elements.json``."""
    data = json.loads((Path(__file__).with_name("r4-elements.json")).read_text(encoding="utf-8"))
    return {owner: frozenset(names) for owner, names in data["summary"].items()}


@functools.lru_cache(maxsize=1)
def r4_required_of(rtype: str) -> frozenset[str]:
    """A resource type's own elements R4 requires (a choice element as ``value[x]``)."""
    return frozenset(_r4_elements()[0].get(rtype, ()))


class _Slot(NamedTuple):
    """One element as the base walk sees it (see :meth:`_Model.slots`)."""

    type_code: str
    child_key: str  # owner of its children
    array: bool | None  # whether it must be a JSON array; None when this gateway does not check
    kind: int  # _PLAIN, _FORMATTED, ...
    seen: AbstractSet[str]  # for a _FORMATTED value: strings already found well formed; for _CODED: its codes
    extensions: bool  # extension or modifierExtension: our extensions are checked here
    value_set: str = ""  # for a _CODED value: the value set its codes come from


# fhirpathpy spells choice types capitalised; these are primitives all the same.
_CAPITALISED_PRIMITIVES = {
    "Base64Binary", "Boolean", "Canonical", "Code", "Date", "DateTime", "Decimal", "Id", "Instant", "Integer",
    "Markdown", "Oid", "PositiveInt", "String", "Time", "UnsignedInt", "Uri", "Url", "Uuid",
}


# ------------------------------------------------------------------ compiled checks


@dataclass(eq=False)
class _Constraint:
    key: str
    severity: str
    human: str
    expression: str
    type_key: str
    compiled: Callable[..., list[Any]] | None = None
    native: Callable[[Any], bool] | None = None
    model: Any = None  # fhirpathpy's model, for compiling the expression when it is first needed


@dataclass(eq=False)
class _Binding:
    value_set: str
    codes: frozenset[tuple[str, str]]
    any_code_systems: frozenset[str]  # systems whose codes the guide cannot list (content not-present)

    def accepts(self, system: Any, code: Any) -> bool:
        try:
            return (system, code) in self.codes or system in self.any_code_systems
        except TypeError:  # a list or object where a string belongs (the walk reports its shape): in no value set
            return False

    def accepts_code(self, code: Any) -> bool:
        return bool(self.any_code_systems) or any(c == code for _, c in self.codes)


@dataclass(eq=False, slots=True)
class _Node:
    """One element of a profile's differential, with everything checked on it."""

    name: str  # JSON key; for a choice element the stem ("value" of "value[x]")
    label: str  # e.g. "Patient.identifier:idCard", for messages
    type_key: str  # where the model finds this element's children / FHIRPath type
    types: tuple[str, ...] = ()  # type codes this element may have
    choice: dict[str, str] | None = None  # for value[x]: JSON key -> type code, every base type
    min: int = 0
    max: int | None = None  # None: no limit stated
    fixed: Any = _MISSING
    pattern: Any = _MISSING
    binding: _Binding | None = None
    constraints: list[_Constraint] = field(default_factory=list)
    children: dict[str, _Node] = field(default_factory=dict)
    discriminators: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False
    slices: list[_Node] = field(default_factory=list)
    ext_url: str | None = None  # an Extension slice typed with one of our extensions
    matcher: Callable[[Any], bool] | None = None
    # Worked out by Guide._finish once the whole differential is read, so that
    # validating a resource does not work them out again for every value:
    matches_pattern: Callable[[Any], bool] | None = None  # ``pattern`` as a test
    plan: list[_Node] = field(default_factory=list)  # the children with something to check, in order
    checks_values: bool = False  # each value needs looking at (beyond counting)
    plain: bool = False  # neither a choice nor sliced: how many values, then each value, is all there is to it
    absent_ok: bool = False  # no value at all is fine: neither it nor any of its slices is required


@dataclass(eq=False)
class _Profile:
    url: str
    version: str
    type: str
    root: _Node
    contexts: tuple[str, ...] = ()  # for extensions: element paths or types they may sit on


@dataclass
class _Run:
    """State of one validation: the resource being checked and where issues go."""

    out: list[Issue]
    root: dict[str, Any]
    profile: str = ""


def _evaluate_fhirpath(constraint: _Constraint, element: Any, root: Any) -> bool:
    """fhirpathpy's verdict; as in the HL7 validator only a single ``true`` passes (empty fails)."""
    from fhirpathpy.engine.nodes import ResourceNode

    if constraint.compiled is None:  # an invariant with a Python twin: parsed only when asked for (tests)
        from fhirpathpy import compile as fhirpath_compile

        constraint.compiled = fhirpath_compile(constraint.expression, constraint.model)
    assert constraint.compiled is not None
    node = element
    if not (isinstance(element, dict) and "resourceType" in element):
        node = ResourceNode.create_node(element, constraint.type_key)  # type: ignore[no-untyped-call]
    return constraint.compiled(node, {"resource": root, "rootResource": root}) == [True]


def _count_issue(run: _Run, node: _Node, count: int, where: str) -> None:
    """Report ``count`` values of ``node`` where its cardinality allows fewer or more."""
    if count < node.min:
        _issue(run, "error", "required", where, f"needs at least {node.min} ({node.label}), found {count}",
               "cardinality")
    else:
        _issue(run, "error", "structure", where, f"allows at most {node.max} ({node.label}), found {count}",
               "cardinality")


def _said_once(out: list[Issue], start: int) -> None:
    """An element R4 requires that a profile requires too is reported once, by the profile (which names it)."""
    by_profile = {i.location for i in out[start:] if i.code == "required" and "profile" in i.extra}
    if by_profile:
        out[start:] = [i for i in out[start:]
                       if not (i.extra.get("rule") == "base-cardinality" and i.location in by_profile)]


def _duplicate_full_urls(bundle: dict[str, Any], run: _Run) -> None:
    """FHIR bdl-7: no two entries of a Bundle with the same fullUrl (and version); a reference to it would
    point at either, and a store would keep only one."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return
    first: dict[tuple[str, Any], int] = {}
    for n, entry in enumerate(entries):
        url = entry.get("fullUrl") if isinstance(entry, dict) else None
        if not isinstance(url, str):
            continue
        res = entry.get("resource")
        meta = res.get("meta") if isinstance(res, dict) else None
        key = (url, meta.get("versionId") if isinstance(meta, dict) else None)
        if key in first:
            _issue(run, "error", "duplicate", f"Bundle.entry[{n}].fullUrl",
                   f"fails bdl-7: its fullUrl {shown(url)} is also the one of entry {first[key]}: two resources of "
                   "the Bundle have one identity", "bdl-7")
        else:
            first[key] = n


def _issue(run: _Run, severity: str, code: str, location: str, message: str, rule: str) -> None:
    extra: dict[str, Any] = {"rule": rule}
    if run.profile:
        extra["profile"] = run.profile
    run.out.append(Issue(severity, code, location, message, _HL7_ERROR.get(code, "102"), extra))


# ------------------------------------------------------------------ value matching


def _same(a: Any, b: Any) -> bool:
    """JSON equality where 5 and 5.0 are equal but True and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _pattern_test(pattern: Any) -> Callable[[Any], bool]:
    """FHIR ``pattern[x]`` as a test: every property of the pattern is present in the value, recursively.

    Each pattern of the guide is turned into a test once, when the guide loads.
    """
    if isinstance(pattern, dict):
        parts = [(k, _pattern_test(p)) for k, p in pattern.items()]

        def has_properties(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            for k, part in parts:
                if k not in value or not part(value[k]):
                    return False
            return True

        return has_properties
    if isinstance(pattern, list):
        return has_items([_pattern_test(p) for p in pattern])
    return functools.partial(_same, b=pattern)


def has_items(wanted: Sequence[Callable[[Any], bool]]) -> Callable[[Any], bool]:
    """A list pattern as a test: for every item of the pattern (``wanted``, each as a test), some item of the value
    passes it."""
    def test(value: Any) -> bool:
        if not isinstance(value, list):
            return False
        for part in wanted:
            for v in value:
                if part(v):
                    break
            else:
                return False
        return True

    return test


def _values_at(item: Any, steps: Sequence[str]) -> list[Any]:
    values = [item]
    for step in steps:
        nxt: list[Any] = []
        for v in values:
            if isinstance(v, dict) and step in v:
                got = v[step]
                nxt.extend(got if isinstance(got, list) else [got])
        values = nxt
    return values


def _has_url(url: str, item: Any) -> bool:
    return isinstance(item, dict) and item.get("url") == url


def _any_at(steps: Sequence[str], test: Callable[[Any], bool], item: Any) -> bool:
    return any(test(v) for v in _values_at(item, steps))


def _any_below(step: str, test: Callable[[Any], bool], item: Any) -> bool:
    """:func:`_any_at` for a path of one step (``system``), the usual discriminator, without the lists."""
    if not isinstance(item, dict) or step not in item:
        return False
    got = item[step]
    if isinstance(got, list):
        return any(test(v) for v in got)
    return test(got)


def _all_of(tests: list[Callable[[Any], bool]], item: Any) -> bool:
    return all(t(item) for t in tests)


def _short(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):  # nested too deeply to show (hostile input): say what it is instead
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------ native twins of FHIRPath invariants

_ID_CARD = re.compile(r"^[0-9]{17}[0-9X]$")
_USCC = re.compile(r"^[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}$")


def _str_value(element: Any) -> str | None:
    value = element.get("value") if isinstance(element, dict) else None
    return value if isinstance(value, str) else None


def _native_id_card_check_digit(identifier: Any) -> bool:
    value = _str_value(identifier)
    return bool(value and _ID_CARD.match(value) and id_card_check_char(value[:17]) == value[17])


def _native_id_card_birth_date(identifier: Any) -> bool:
    import datetime as _dt

    value = _str_value(identifier)
    if not value or not _ID_CARD.match(value) or int(value[6:10]) < 1880:
        return False
    try:
        _dt.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    return True


def _native_uscc(identifier: Any) -> bool:
    value = _str_value(identifier)
    return bool(value and _USCC.match(value) and uscc_check_char(value[:17]) == value[17])


_LOCAL_ITEM = f"{IG_BASE}/sid/local-item/"
# Observation.value[x] keys in R4: what FHIRPath ``value`` finds on an Observation
_OBSERVATION_VALUES = tuple(
    "value" + t for t in ("Quantity", "CodeableConcept", "String", "Boolean", "Integer", "Range", "Ratio",
                          "SampledData", "Time", "DateTime", "Period")
)
_MARK = re.compile(r"^[^\s]+HR$")


def _native_local_code_first(obs: Any) -> bool:
    code = obs.get("code")
    coding = code.get("coding") if isinstance(code, dict) else None
    first = coding[0] if isinstance(coding, list) and coding else coding
    system = first.get("system") if isinstance(first, dict) else None
    return isinstance(system, str) and system.startswith(_LOCAL_ITEM)


def _native_value_or_reason(obs: Any) -> bool:
    return (
        any(k in obs for k in _OBSERVATION_VALUES)
        or "dataAbsentReason" in obs
        or obs.get("status") in ("cancelled", "entered-in-error")
    )


def _native_mark_text(ext: Any) -> bool:
    value = ext.get("valueString")
    return isinstance(value, str) and _MARK.match(value) is not None


def _native_catalogue_coding(ext: Any) -> bool:
    value = ext.get("valueCoding", _MISSING)
    return value is _MISSING or (isinstance(value, dict) and "system" in value and "code" in value)


def _entry_resources(bundle: Any) -> list[dict[str, Any]]:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    return [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def _native_entries_urn_uuid(bundle: Any) -> bool:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return True
    return all(
        isinstance(e, dict) and isinstance(e.get("fullUrl"), str) and e["fullUrl"].startswith("urn:uuid:")
        for e in entries
    )


def _declares(resource: dict[str, Any], *prefixes: str) -> bool:
    meta = resource.get("meta")
    declared = meta.get("profile") if isinstance(meta, dict) else None
    return isinstance(declared, list) and any(isinstance(p, str) and p.startswith(prefixes) for p in declared)


_SD = f"{IG_BASE}/StructureDefinition/"


def _native_entries_profiled(bundle: Any) -> bool:
    wanted = {"Patient": _SD + "cyhr-patient", "Observation": _SD + "cyhr-lab-observation"}
    return all(
        _declares(r, wanted[r["resourceType"]]) for r in _entry_resources(bundle) if r.get("resourceType") in wanted
    )


def _native_reports_profiled(bundle: Any) -> bool:
    return all(
        _declares(r, _SD + "cyhr-lab-report", _SD + "cyhr-occupational-exam-report")
        for r in _entry_resources(bundle)
        if r.get("resourceType") == "DiagnosticReport"
    )


def _references(node: Any, found: list[Any]) -> None:
    if isinstance(node, dict):
        if "reference" in node:
            found.append(node["reference"])
        for value in node.values():
            if isinstance(value, (dict, list)):
                _references(value, found)
    elif isinstance(node, list):
        for value in node:
            _references(value, found)


def _native_references_resolve(bundle: Any) -> bool:
    entries = bundle.get("entry")
    full_urls = {e.get("fullUrl") for e in entries if isinstance(e, dict)} if isinstance(entries, list) else set()
    found: list[Any] = []
    for resource in _entry_resources(bundle):
        for value in resource.values():
            _references(value, found)
    return all(r in full_urls for r in found if isinstance(r, str) and r.startswith("urn:uuid:"))


#: Python twins of published FHIRPath invariants, by constraint key, for the
#: hot path: fhirpathpy needs 0.1-0.3 ms per invariant (1-3 ms for the
#: checksums), these need microseconds. The profiles keep the FHIRPath, which
#: other members' validators run; ``tests/test_profiles_invariants.py`` proves
#: each twin gives the same answer as fhirpathpy on the same inputs.
_REPLACES = IG_BASE + "/StructureDefinition/replaces"
_ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"


def _has_replaces(report: Any) -> bool:
    ext = report.get("extension")
    return isinstance(ext, list) and any(isinstance(e, dict) and e.get("url") == _REPLACES for e in ext)


def _native_replaces_only_on_corrections(report: Any) -> bool:
    # extension.where(url = replaces).exists() implies (status = 'corrected' or status = 'amended')
    return not _has_replaces(report) or report.get("status") in ("corrected", "amended")


def _native_corrections_name_what_they_replace(report: Any) -> bool:
    # status = 'corrected' implies extension.where(url = replaces).exists(); an absent status is empty,
    # and "empty implies false" is empty, which fails the invariant like false does.
    status = report.get("status")
    if status is None or status == "corrected":
        return _has_replaces(report)
    return True


def _native_one_patient(bundle: Any) -> bool:
    return sum(1 for r in _entry_resources(bundle) if r.get("resourceType") == "Patient") == 1


def _native_a_report(bundle: Any) -> bool:
    return any(r.get("resourceType") == "DiagnosticReport" for r in _entry_resources(bundle))


def _id_card_of(patient: Any) -> str | None:
    """identifier.where(system = 身份证号 and value.matches(...)).value.first()"""
    idents = patient.get("identifier")
    for ident in idents if isinstance(idents, list) else []:
        if isinstance(ident, dict) and ident.get("system") == _ID_CARD_SYSTEM:
            value = ident.get("value")
            if isinstance(value, str) and _ID_CARD.match(value):
                return value
    return None


def _native_birth_date_matches_id_card(patient: Any) -> bool:
    number, birth = _id_card_of(patient), patient.get("birthDate")
    if birth is None or number is None:
        return True
    return isinstance(birth, str) and number[6:14] == birth.replace("-", "")


def _native_gender_matches_id_card(patient: Any) -> bool:
    number, gender = _id_card_of(patient), patient.get("gender")
    if gender not in ("male", "female") or number is None:
        return True
    return bool(gender == ("male" if int(number[16]) % 2 == 1 else "female"))


def _native_has_id_card(patient: Any) -> bool:
    idents = patient.get("identifier")
    return isinstance(idents, list) and any(isinstance(i, dict) and i.get("system") == _ID_CARD_SYSTEM
                                            for i in idents)


def _native_name_has_text_or_family(name: Any) -> bool:
    return name.get("text") is not None or name.get("family") is not None


_MIPLRN = re.compile(r"^[0-9A-Z-]+$", re.DOTALL)  # as fhirpathpy's matches(): re.search with DOTALL


def _native_miplrn_characters(identifier: Any) -> bool:
    # value.matches('^[0-9A-Z-]+$'): an absent value is empty, which fails like false; a one-item list is its item
    value = identifier.get("value") if isinstance(identifier, dict) else None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return isinstance(value, str) and _MIPLRN.search(value) is not None


def _native_exposure_not_negative(ext: Any) -> bool:
    # value.ofType(decimal).all($this >= 0): only valueDecimal is looked at; none (or an empty list) passes
    value = ext.get("valueDecimal")
    return all(v is None or (not isinstance(v, bool) and isinstance(v, (int, float, Decimal)) and v >= 0)
               for v in (value if isinstance(value, list) else [value]))


def _native_replaced_identifier_complete(ext: Any) -> bool:
    # value.ofType(Identifier).all(system.exists() and value.exists()); FHIRPath flattens lists
    value = ext.get("valueIdentifier")
    if value is None:
        return True
    return all(isinstance(i, dict) and i.get("system") not in (None, []) and i.get("value") not in (None, [])
               for i in (value if isinstance(value, list) else [value]))


_HAZARD_FACTOR_SYSTEM = IG_BASE + "/CodeSystem/hazard-factor"


def _native_catalogue_factor_has_category(extension: Any) -> bool:
    # extension.where(url = 'factor').value.ofType(Coding).where(system = <hazard-factor>).exists()
    #   implies extension.where(url = 'category').exists()
    parts = extension.get("extension")
    parts = [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []

    def catalogue(coding: Any) -> bool:
        return isinstance(coding, dict) and coding.get("system") == _HAZARD_FACTOR_SYSTEM

    from_catalogue = any(p.get("url") == "factor" and catalogue(p.get("valueCoding")) for p in parts)
    return not from_catalogue or any(p.get("url") == "category" for p in parts)


NATIVE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "cyhr-dr-1": _native_replaces_only_on_corrections,
    "cyhr-dr-2": _native_corrections_name_what_they_replace,
    "cyhr-bdl-2": _native_one_patient,
    "cyhr-bdl-3": _native_a_report,
    "cyhr-pat-3": _native_birth_date_matches_id_card,
    "cyhr-pat-4": _native_gender_matches_id_card,
    "cyhr-pat-5": _native_has_id_card,
    "cyhr-pat-6": _native_name_has_text_or_family,
    "cyhr-pat-1": _native_id_card_check_digit,
    "cyhr-pat-2": _native_id_card_birth_date,
    "cyhr-org-1": _native_uscc,
    "cyhr-obs-1": _native_local_code_first,
    "cyhr-obs-2": _native_value_or_reason,
    "cyhr-mark-1": _native_mark_text,
    "cyhr-cat-1": _native_catalogue_coding,
    "cyhr-bdl-1": _native_entries_urn_uuid,
    "cyhr-bdl-4": _native_entries_profiled,
    "cyhr-bdl-5": _native_reports_profiled,
    "cyhr-bdl-6": _native_references_resolve,
    "cyhr-org-2": _native_miplrn_characters,
    "cyhr-expo-1": _native_exposure_not_negative,
    "cyhr-rpl-1": _native_replaced_identifier_complete,
    "cyhr-haz-1": _native_catalogue_factor_has_category,
}
#: The FHIRPath each twin stands for (SHA-256 of the expression, first 32 hex digits): a guide whose invariant of
#: that key says anything else is checked by its own FHIRPath, never by a twin written for other words. An invariant
#: with its twin is not parsed when the guide loads (the twin decides; the parse took most of a second at every
#: start); the tests parse the guide's every expression and hold each twin to it.
NATIVE_EXPRESSIONS: dict[str, str] = {
    "cyhr-dr-1": "a42ebc2a379b59f72c0a7843d17df1e3",
    "cyhr-dr-2": "39b93a79643d7242ede64a75346e36f0",
    "cyhr-bdl-2": "2f2a84db9083c45e0348fee21ee41274",
    "cyhr-bdl-3": "0c85fdcab05b5016745d6bfad6a7bf06",
    "cyhr-pat-3": "a701fa0254f2662dad8e3030da0da45c",
    "cyhr-pat-4": "959016ac3385b1f60a37c0d6acc14258",
    "cyhr-pat-5": "0fc2a982ab8d7397ff62d752653edddd",
    "cyhr-pat-6": "be4ca7d9326e93c975366ccf2eff6627",
    "cyhr-pat-1": "ffb7681291ba6ba37b2bc18637c3bf4f",
    "cyhr-pat-2": "7d3f1c86504a408f0b015a8fb6ebe8da",
    "cyhr-org-1": "3b0eb2b8b0897854aa8e2f829ae84d5c",
    "cyhr-obs-1": "3a29d1bacbafaa7ac23889c40171eb61",
    "cyhr-obs-2": "61f8f5f9a40a93538c4c495770867e55",
    "cyhr-mark-1": "20042196046f8d514a54a096484af74d",
    "cyhr-cat-1": "6339e4b0554beb943378c212d2a53d58",
    "cyhr-bdl-1": "d9ade1c3a3c8d0143cbab1ab3b695e57",
    "cyhr-bdl-4": "c4c0d2022512888ccaba24ce1ba0347f",
    "cyhr-bdl-5": "9d3204e849ce40647975639bd7e89d48",
    "cyhr-bdl-6": "ace7098b370b8a08840cf881002913c1",
    "cyhr-org-2": "41411f1b4f2fe59430aee83c9bef15e3",
    "cyhr-expo-1": "484c4db9d6b80f9aa64145471f300db6",
    "cyhr-rpl-1": "52fe53722bc9b76d167b4e8c56300263",
    "cyhr-haz-1": "847a5c2761fde9aaf39fde3e7c946c35",
}


def twin_for(key: str, expression: str) -> Callable[[Any], bool] | None:
    """The Python twin of invariant ``key`` when ``expression`` is the FHIRPath it was written for, else None."""
    native = NATIVE_CHECKS.get(key)
    if native is None or hashlib.sha256(expression.encode("utf-8")).hexdigest()[:32] != NATIVE_EXPRESSIONS.get(key):
        return None
    return native


# ------------------------------------------------------------------ the guide


class _AnyString(frozenset[str]):
    """Holds every string: a resource's resourceType, which the clean check's base walk passes over (here, not in
    gateway.fhir.profilecheck, which may be compiled: a compiled module cannot subclass a built-in type)."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY_STRING = _AnyString()


class NoDiscriminatorValue(Exception):
    """A slice whose discriminator path leads to no fixed or pattern value (the guide refuses such a profile)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


#: One discriminator of a slice, as the test to make of it: (the steps to the value, ``"url"``, ``"fixed"`` or
#: ``"pattern"``, the value to compare).
SliceTest = tuple[tuple[str, ...], str, Any]


def slice_tests(base: _Node, piece: _Node) -> list[SliceTest]:
    """What tells a value of slice ``piece`` of ``base`` apart, by ``base``'s discriminators: an extension's own
    ``url`` (``((), "url", url)``), or the fixed or pattern value ``piece`` has at a discriminator's path.

    :raises NoDiscriminatorValue: a discriminator path of ``piece`` has no fixed or pattern value.
    """
    tests: list[SliceTest] = []
    for _, path in base.discriminators:
        if path == "url" and piece.ext_url:
            tests.append(((), "url", piece.ext_url))
            continue
        target: _Node | None = piece
        steps = () if path == "$this" else tuple(path.split("."))
        for step in steps:
            target = target.children.get(step) if target else None
        if target is None or (target.fixed is _MISSING and target.pattern is _MISSING):
            raise NoDiscriminatorValue(path)
        if target.fixed is not _MISSING:
            tests.append((steps, "fixed", target.fixed))
        else:
            tests.append((steps, "pattern", target.pattern))
    return tests


def slice_matcher(base: _Node, piece: _Node,
                  pattern_test: Callable[[Any], Callable[[Any], bool]]) -> Callable[[Any], bool]:
    """Whether a value belongs to slice ``piece`` of ``base`` (:func:`slice_tests`); ``pattern_test`` makes the test
    of a pattern value.

    :raises NoDiscriminatorValue: a discriminator path of ``piece`` has no fixed or pattern value.
    """
    tests: list[Callable[[Any], bool]] = []
    for steps, kind, value in slice_tests(base, piece):
        if kind == "url":
            tests.append(functools.partial(_has_url, value))
            continue
        test = functools.partial(_same, b=value) if kind == "fixed" else pattern_test(value)
        if not steps:
            tests.append(test)
        elif len(steps) == 1:
            tests.append(functools.partial(_any_below, steps[0], test))
        else:
            tests.append(functools.partial(_any_at, steps, test))
    if len(tests) == 1:
        return tests[0]
    return functools.partial(_all_of, tests)


class Guide:
    """Our implementation guide, loaded and compiled: look resources up, validate against it.

    Build one with :func:`load_guide`; it is immutable and safe to share between threads.
    """

    def __init__(self, directory: Path, package: dict[str, Any], resources: dict[str, dict[str, Any]],
                 files: dict[str, Path]) -> None:
        self.directory = directory
        self.package = package
        self.version: str = package["version"]
        self.canonical: str = package["canonical"]
        #: ``{canonical_url: resource}`` for every StructureDefinition, CodeSystem and ValueSet.
        self.resources: Mapping[str, dict[str, Any]] = resources
        self._files = files
        self._by_id = {(r["resourceType"], r["id"]): r for r in resources.values()}
        self._model = _Model()
        self._value_sets: dict[str, _Binding] = {}
        self._profiles: dict[str, _Profile] = {}
        self._extensions: dict[str, _Profile] = {}
        self._constraints: dict[str, _Constraint] = {}
        self._ext_prefix = f"{IG_BASE}/StructureDefinition/"
        for url, res in resources.items():
            if res["resourceType"] == "StructureDefinition":
                profile = self._compile_profile(res)
                (self._extensions if res["type"] == "Extension" else self._profiles)[url] = profile
        from gateway.native import load  # (the clean check builds on this module; compiled when built)

        try:
            self._clean: CleanCheck = load("gateway.fhir.profilecheck").CleanCheck(self)
        except Exception as exc:  # noqa: BLE001 - the compiled twin cannot take this guide: the plain module decides
            from gateway.fhir.profilecheck import CleanCheck as PlainCleanCheck
            from gateway.native import fell_back

            fell_back(("guide", "clean check"), f"the compiled clean check cannot take the guide in {directory} "
                      f"({type(exc).__name__}); the plain one checks")
            self._clean = PlainCleanCheck(self)

    # -------------------------------------------------------------- look-up

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """One of the guide's resources by type and id (``StructureDefinition``, ``cyhr-patient``)."""
        return self._by_id.get((resource_type, resource_id))

    def find(self, resource_type: str, url: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """The guide's resources of one type, optionally those with this canonical ``url`` (and ``version``)."""
        if url and "|" in url and version is None:
            url, version = url.split("|", 1)
        return [
            r for r in self.resources.values()
            if r["resourceType"] == resource_type
            and (url is None or r["url"] == url)
            and (version is None or r.get("version") == version)
        ]

    def supported_profiles(self) -> dict[str, list[str]]:
        """Resource type -> canonical URLs of the profiles this guide defines for it (extensions excluded)."""
        out: dict[str, list[str]] = {}
        for url, profile in sorted(self._profiles.items()):
            out.setdefault(profile.type, []).append(url)
        return out

    def invariant_keys(self) -> list[str]:
        """Keys of every FHIRPath invariant in the guide (``cyhr-pat-1``, ...)."""
        return sorted(self._constraints)

    def evaluate_invariant(self, key: str, element: Any, *, native: bool, root: Any = None) -> bool:
        """Whether ``element`` satisfies invariant ``key``, by fhirpathpy or by its Python twin.

        The validator uses the twin when there is one; this lets a test hold the
        two side by side. ``root`` is ``%resource`` (default: ``element``).

        :raises KeyError: no such invariant, or no twin when ``native`` is asked for.
        :raises Exception: whatever fhirpathpy raises on a value it cannot evaluate.
        """
        constraint = self._constraints[key]
        if native:
            if constraint.native is None:
                raise KeyError(f"{key} has no Python twin")
            return constraint.native(element)
        return _evaluate_fhirpath(constraint, element, element if root is None else root)

    def is_profile(self, ref: str) -> bool:
        """Whether ``ref`` (``url`` or ``url|version``) names one of this guide's profiles (not an extension)."""
        url, _, version = ref.partition("|")
        profile = self._profiles.get(url)
        return profile is not None and version in ("", profile.version)

    @property
    def resource_types(self) -> frozenset[str]:
        """Every R4 resource type name (for checking what a client sent)."""
        return self._model.resource_types

    # -------------------------------------------------------------- validation

    def validate(self, resource: Any, profiles: Iterable[str] = ()) -> list[Issue]:
        """Every issue ``resource`` has against the base shape and its profiles; never raises for bad input.

        :param profiles: canonical URLs to check against in addition to the ones
            the resource names in ``meta.profile``.
        :raises: nothing for bad input: whatever is wrong with it (even an invariant
            fhirpathpy cannot evaluate on it) comes back as an issue.

        A conforming resource, the common case, is recognised by a check-only pass
        (:mod:`gateway.fhir.profilecheck`); anything else gets the full report of
        :meth:`validate_reference`, so the answer is the same either way.
        """
        extra = tuple(profiles)
        if self._clean.clean(resource, extra):
            return []
        return self.validate_reference(resource, extra)

    def is_clean(self, resource: Any, profiles: Iterable[str] = ()) -> bool:
        """The check-only verdict :meth:`validate` starts with: True only if there is no issue at all to report."""
        return self._clean.clean(resource, tuple(profiles))

    def validate_reference(self, resource: Any, profiles: Iterable[str] = ()) -> list[Issue]:
        """:meth:`validate` by the reporting walk alone: every issue, in order, located (the reference answer)."""
        out: list[Issue] = []
        if not isinstance(resource, dict):
            run = _Run(out, {})
            _issue(run, "error", "structure", "", "a FHIR resource must be a JSON object", "structure")
            return out
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or rtype not in self._model.resource_types:
            run = _Run(out, resource)
            what = f"{shown(rtype)} is not an R4 resource type" if rtype is not None else "is missing"
            _issue(run, "error", "structure", "resourceType", what, "structure")
            return out
        self._validate_resource(resource, rtype, tuple(profiles), out, 0)
        if rtype == "Bundle":
            _duplicate_full_urls(resource, _Run(out, resource))
        return out

    def check(self, resource: Any, profiles: Iterable[str] = ()) -> list[Issue]:
        """Validate and raise when there is any error; returns the warnings otherwise.

        :raises ProfileViolation: carrying every issue, when at least one is an error.
        """
        issues = self.validate(resource, profiles)
        if has_errors(issues):
            raise ProfileViolation(issues)
        return issues

    def _validate_resource(self, res: dict[str, Any], loc: str, extra: tuple[str, ...], out: list[Issue],
                           depth: int) -> None:
        rtype: str = res["resourceType"]
        run = _Run(out, res)
        start = len(out)
        try:
            self._walk(res, rtype, rtype, loc, run, depth, rtype == "Bundle")
        except RecursionError:
            _issue(run, "error", "too-costly", loc, "is nested too deeply to check", "structure")
        declared: list[tuple[str, str]] = []
        meta = res.get("meta")
        claimed = meta.get("profile") if isinstance(meta, dict) else None
        if isinstance(claimed, str):  # the wrong shape is reported above; the claim is still honoured
            declared = [(claimed, f"{loc}.meta.profile")]
        elif isinstance(claimed, list):
            declared = [(p, f"{loc}.meta.profile[{i}]") for i, p in enumerate(claimed) if isinstance(p, str)]
        named = {ref.partition("|")[0] for ref, _ in declared}
        declared += [(p, loc) for p in extra if p.partition("|")[0] not in named]  # a profile is checked once
        for ref, where in declared:
            url, _, version = ref.partition("|")
            profile = self._profiles.get(url)
            if profile is None:
                if url == _CORE_SD + rtype:
                    continue  # the base definition itself: the base checks above cover it
                what = "an extension, not a profile" if url in self._extensions else "not a profile of this guide"
                _issue(run, "error", "not-supported", where, f"names unknown profile {shown(ref)}: {what}",
                       "unknown-profile")
                continue
            if version and version != profile.version:
                _issue(run, "error", "not-supported", where,
                       f"names profile {url} version {version}, which is not loaded (this gateway has "
                       f"{profile.version})",
                       "unknown-profile")
                continue
            if profile.type != rtype:
                _issue(run, "error", "invalid", where, f"names profile {url}, which is for {profile.type}, not {rtype}",
                       "profile-type")
                continue
            prun = _Run(out, res, url)
            self._check_value(profile.root, res, loc, prun)
        _said_once(out, start)
        entries = res.get("entry") if rtype == "Bundle" else None
        if isinstance(entries, (list, dict)):
            # an entry object where an array belongs is reported by the walk; its resource is still checked
            for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
                inner = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(inner, dict):
                    itype = inner.get("resourceType")
                    where = f"{loc}.entry[{i}].resource" if isinstance(entries, list) else f"{loc}.entry.resource"
                    if isinstance(itype, str) and itype in self._model.resource_types:
                        if depth >= 4:
                            _issue(run, "error", "too-costly", where, "nests Bundles more than 4 deep", "structure")
                            continue
                        self._validate_resource(inner, where, (), out, depth + 1)
                    else:
                        _issue(run, "error", "structure", f"{where}.resourceType",
                               f"{shown(itype)} is not an R4 resource type", "structure")

    # -------------------------------------------------------------- base walk

    def _walk(self, obj: dict[str, Any], type_key: str, ctx_path: str, loc: str, run: _Run, depth: int,
              skip_entry_resources: bool = False) -> None:
        """Base shape of every element below ``obj`` and our extensions wherever they are.

        Every Bundle the gateway stores passes through here, so the common cases (a
        well-formed string, code or date; a datatype object) are decided inline, and
        a location is only spelled out when an issue needs it or the walk goes deeper.
        """
        if depth > _MAX_DEPTH:
            _issue(run, "error", "too-costly", loc, f"is nested more than {_MAX_DEPTH} levels deep", "structure")
            return
        if not obj:
            _issue(run, "error", "structure", loc, "must have a value or children (ele-1)", "structure")
            return
        # (a backbone element's key is its path, with a dot: there resourceType is an element like any other)
        is_resource = "resourceType" in obj and ctx_path == type_key and "." not in type_key
        slots = self._model.slots(type_key)
        for key, val in obj.items():
            if key == "resourceType" and is_resource:
                continue
            slot = slots.get(key)
            if slot is None:
                if key.startswith("_") and len(key) > 1:
                    # primitive extensions (``_birthDate``): only their extensions are of interest here
                    if not (isinstance(val, (dict, list))):
                        _issue(run, "error", "structure", f"{loc}.{key}", "must be an object (or array of objects)",
                               "structure")
                    continue
                _issue(run, "error", "structure", f"{loc}.{key}", f"is not an element of {ctx_path}",
                       "unknown-element")
                continue
            type_code, child_key, array, kind, seen, extensions, _ = slot
            listed = isinstance(val, list)
            if array is not None and array != listed and val is not None:
                _issue(run, "error", "structure", f"{loc}.{key}",
                       "must be a JSON array" if array else "holds one value, not an array", "array")
            if not listed:
                # one value: the common cases decided here, the rest in full by _walk_value
                if kind == _PLAIN:
                    if type(val) is str and val.strip() and not forbidden_character(val):
                        continue
                elif kind == _FORMATTED:
                    if type(val) is str and (val in seen or _well_formed(type_code, val)):
                        continue
                elif kind == _CODED:
                    if type(val) is str and val in seen:
                        continue
                elif kind == _COMPLEX and type(val) is dict:
                    self._walk(val, child_key, f"{ctx_path}.{key}", f"{loc}.{key}", run, depth + 1,
                               skip_entry_resources)
                    continue
                self._walk_value(slot, key, val, f"{loc}.{key}", ctx_path, run, depth, skip_entry_resources)
                continue
            if not val:
                _issue(run, "error", "structure", f"{loc}.{key}", "must not be an empty array", "structure")
                continue
            for i, item in enumerate(val):  # an array: the same, item by item
                if kind == _PLAIN:
                    if type(item) is str and item.strip() and not forbidden_character(item):
                        continue
                elif kind == _FORMATTED:
                    if type(item) is str and (item in seen or _well_formed(type_code, item)):
                        continue
                elif kind == _CODED:
                    if type(item) is str and item in seen:
                        continue
                elif kind == _COMPLEX and type(item) is dict:
                    self._walk(item, child_key, f"{ctx_path}.{key}", f"{loc}.{key}[{i}]", run, depth + 1,
                               skip_entry_resources)
                    continue
                self._walk_value(slot, key, item, f"{loc}.{key}[{i}]", ctx_path, run, depth, skip_entry_resources)
            if extensions:
                self._check_extensions(val, type_key, ctx_path, f"{loc}.{key}", run)
        for name, keys in self._model.required(type_key):
            if not any(k in obj for k in keys):
                _issue(run, "error", "required", f"{loc}.{name}", f"is missing: FHIR R4 requires {ctx_path}.{name}",
                       "base-cardinality")

    def _walk_value(self, slot: _Slot, key: str, item: Any, iloc: str, ctx_path: str, run: _Run, depth: int,
                    skip_entry_resources: bool) -> None:
        """One value of element ``key`` that is not the common case: what is wrong with it, or walk it."""
        if item is None:
            _issue(run, "error", "structure", iloc, "null is not allowed in FHIR JSON", "structure")
        elif slot.kind <= _SCALAR or slot.kind == _CODED:
            problem = _primitive_problem(slot.type_code, item)
            if problem:
                _issue(run, "error", "value", iloc, problem, "format")
            elif slot.kind == _CODED and item not in slot.seen:  # (a str subclass holding one of its codes is one)
                listed = f" (one of {', '.join(sorted(slot.seen))})" if len(slot.seen) <= 12 else ""
                _issue(run, "error", "code-invalid", iloc,
                       f"code {shown(item)} is not in the required value set {slot.value_set}{listed}", "binding")
        elif not isinstance(item, dict):
            _issue(run, "error", "structure", iloc,
                   f"must be a JSON object ({slot.type_code}), not {type(item).__name__}", "type")
        elif slot.kind == _RESOURCE:
            if skip_entry_resources and key == "resource" and ctx_path == "Bundle.entry":
                return  # each entry is validated as a resource of its own
            inner = item.get("resourceType")
            if not isinstance(inner, str) or inner not in self._model.resource_types:
                _issue(run, "error", "structure", f"{iloc}.resourceType",
                       f"{shown(inner)} is not an R4 resource type", "structure")
            else:
                self._walk(item, inner, inner, iloc, run, depth + 1)
        else:
            self._walk(item, slot.child_key, f"{ctx_path}.{key}", iloc, run, depth + 1, skip_entry_resources)

    def _check_extensions(self, exts: list[Any], type_key: str, ctx_path: str, where: str, run: _Run) -> None:
        for i, ext in enumerate(exts):
            if not isinstance(ext, dict):
                continue  # reported by the walk
            eloc = f"{where}[{i}]"
            url = ext.get("url")
            has_value = any(k.startswith("value") for k in ext)
            if has_value == ("extension" in ext):
                _issue(run, "error", "invariant", eloc,
                       "must have either a value or extensions, not both or neither (ext-1)", "ext-1")
            if not isinstance(url, str) or not url:
                _issue(run, "error", "required", f"{eloc}.url", "is required: an extension needs its url",
                       "cardinality")
                continue
            if not url.startswith(self._ext_prefix):
                continue  # someone else's extension, or a part of a complex one
            profile = self._extensions.get(url)
            if profile is None:
                _issue(run, "error", "extension", f"{eloc}.url",
                       f"names an extension this guide does not define: {url}", "unknown-extension")
                continue
            element_type = type_key if "." not in type_key else ""
            if not any(c == ctx_path or c == element_type or c == "Element" for c in profile.contexts):
                _issue(run, "error", "extension", eloc,
                       f"is not allowed here: extension {url} may sit on {', '.join(profile.contexts)}, not {ctx_path}",
                       "extension-context")
            self._check_value(profile.root, ext, eloc, _Run(run.out, run.root, url))

    # -------------------------------------------------------------- profile checks

    def _check_value(self, node: _Node, item: Any, loc: str, run: _Run, type_code: str = "") -> None:
        if node.fixed is not _MISSING and not _same(item, node.fixed):
            _issue(run, "error", "value", loc, f"must be exactly {_short(node.fixed)}, found {_short(item)}", "fixed")
        if node.matches_pattern is not None and not node.matches_pattern(item):
            _issue(run, "error", "value", loc, f"must contain {_short(node.pattern)}, found {_short(item)}",
                   "pattern")
        if node.binding is not None:
            self._check_binding(node, item, loc, run, type_code or (node.types[0] if len(node.types) == 1 else ""))
        for constraint in node.constraints:
            self._check_constraint(constraint, item, loc, run)
        if node.plan and isinstance(item, dict):
            for child in node.plan:
                if not child.plain:
                    self._check_child(child, item, loc, run)
                    continue
                # most elements of a profile only set a cardinality or a fixed value: done here, without
                # the (value, location) pairs slicing needs
                val = item.get(child.name, _MISSING)
                count = 0 if val is _MISSING else len(val) if isinstance(val, list) else 1
                if count < child.min or (child.max is not None and count > child.max):
                    _count_issue(run, child, count, f"{loc}.{child.name}")
                if count and child.checks_values:
                    if isinstance(val, list):
                        for i, value in enumerate(val):
                            self._check_value(child, value, f"{loc}.{child.name}[{i}]", run)
                    else:
                        self._check_value(child, val, f"{loc}.{child.name}", run)

    def _check_child(self, node: _Node, obj: dict[str, Any], loc: str, run: _Run) -> None:
        """A choice element, or a sliced one, of ``obj`` (the others are checked by _check_value)."""
        if node.choice is not None:
            found = [(k, node.choice[k]) for k in obj if k in node.choice]
            if not found and node.absent_ok:
                return
            where = f"{loc}.{node.name}[x]"
            if len(found) > 1:
                _issue(run, "error", "structure", where,
                       f"only one of {', '.join(k for k, _ in found)} may be present", "cardinality")
            items: list[tuple[Any, str]] = []
            for key, tcode in found:
                if node.types and tcode not in node.types:
                    _issue(run, "error", "structure", f"{loc}.{key}",
                           f"is not allowed: {node.label} may be {' | '.join(node.types)}, not {tcode}", "type")
                else:
                    items.append((obj[key], f"{loc}.{key}"))
            # a value of a type the profile forbids still counts: it is reported once, as the wrong type
            self._check_items(node, items, where, run, found[0][1] if len(found) == 1 else "", len(found))
            return
        val = obj.get(node.name, _MISSING)
        if val is _MISSING and node.absent_ok:
            return
        where = f"{loc}.{node.name}"
        if val is _MISSING:
            items = []
        elif isinstance(val, list):
            items = [(v, f"{where}[{i}]") for i, v in enumerate(val)]
        else:
            items = [(val, where)]
        self._check_items(node, items, where, run)

    def _check_items(self, node: _Node, items: list[tuple[Any, str]], where: str, run: _Run,
                     type_code: str = "", count: int | None = None) -> None:
        count = len(items) if count is None else count
        buckets: list[list[tuple[Any, str]]] = []
        if node.slices:
            buckets = [[] for _ in node.slices]
            for item, iloc in items:
                for bucket, piece in zip(buckets, node.slices):
                    if piece.matcher is not None and piece.matcher(item):
                        bucket.append((item, iloc))
                        break
                else:
                    if node.closed:
                        _issue(run, "error", "structure", iloc,
                               f"matches none of the slices of {node.label} (closed slicing)", "slicing")
        if count < node.min:
            # a required slice that is missing says more than the bare count; report that one instead
            if not any(len(b) < piece.min for b, piece in zip(buckets, node.slices)):
                _count_issue(run, node, count, where)
        elif node.max is not None and count > node.max:
            _count_issue(run, node, count, where)
        for bucket, piece in zip(buckets, node.slices):
            self._check_items(piece, bucket, where, run, type_code)
        if node.checks_values:
            for item, iloc in items:
                self._check_value(node, item, iloc, run, type_code)

    def _check_binding(self, node: _Node, item: Any, loc: str, run: _Run, type_code: str) -> None:
        binding = node.binding
        assert binding is not None
        if type_code == "CodeableConcept" or (not type_code and isinstance(item, dict) and "coding" in item):
            codings = item.get("coding") if isinstance(item, dict) else None
            ok = isinstance(codings, list) and any(
                isinstance(c, dict) and binding.accepts(c.get("system"), c.get("code")) for c in codings
            )
            what = "none of its codings is"
        elif type_code == "Coding" or isinstance(item, dict):
            ok = isinstance(item, dict) and binding.accepts(item.get("system"), item.get("code"))
            what = f"{_short(item.get('system') if isinstance(item, dict) else item)}#" \
                   f"{item.get('code') if isinstance(item, dict) else ''} is not"
        else:
            ok = binding.accepts_code(item)
            what = f"code {_short(item)} is not"
        if not ok:
            _issue(run, "error", "code-invalid", loc, f"{what} in the required value set {binding.value_set}",
                   "binding")

    def _check_constraint(self, constraint: _Constraint, item: Any, loc: str, run: _Run) -> None:
        try:
            if constraint.native is not None:
                ok = constraint.native(item)
            else:
                ok = _evaluate_fhirpath(constraint, item, run.root)
        except Exception as exc:  # noqa: BLE001 - a hostile value must not take the validator down
            log.info("invariant %s could not be evaluated: %s", constraint.key, type(exc).__name__)
            _issue(run, "error", "invariant", loc,
                   f"fails {constraint.key}, which could not be evaluated on this value ({type(exc).__name__}): "
                   f"{constraint.human}", constraint.key)
            return
        if not ok:
            _issue(run, constraint.severity, "invariant", loc, f"fails {constraint.key}: {constraint.human}",
                   constraint.key)

    # -------------------------------------------------------------- compiling

    def _fail(self, url: str, message: str) -> ConfigError:
        # str(ConfigError) is "location: message", so the file is named once, by its path
        return ConfigError(message, str(self._files.get(url) or url))

    def _compile_profile(self, sd: dict[str, Any]) -> _Profile:
        url = sd["url"]
        type_name = sd.get("type")
        if not isinstance(type_name, str):
            raise self._fail(url, "StructureDefinition.type is missing")
        if sd.get("derivation") != "constraint" or sd.get("baseDefinition") != _CORE_SD + type_name:
            raise self._fail(url, f"only constraints on the core {type_name} are supported "
                                  f"(derivation constraint, baseDefinition {_CORE_SD}{type_name})")
        elements = (sd.get("differential") or {}).get("element")
        if not isinstance(elements, list) or not elements:
            raise self._fail(url, "the profile has no differential elements")
        root = _Node(name=type_name, label=type_name, type_key=type_name)
        for element in elements:
            self._apply(url, root, type_name, element)
        self._finish(url, root)
        contexts: tuple[str, ...] = ()
        if type_name == "Extension":
            contexts = tuple(c.get("expression", "") for c in sd.get("context") or [] if isinstance(c, dict))
            if not contexts:
                raise self._fail(url, "an extension must say where it may be used (context)")
        return _Profile(url, sd.get("version", ""), type_name, root, contexts)

    def _apply(self, url: str, root: _Node, type_name: str, element: Any) -> None:
        if not isinstance(element, dict) or not isinstance(element.get("path"), str):
            raise self._fail(url, "a differential element has no path")
        eid = element.get("id") or element["path"] + (f":{element['sliceName']}" if element.get("sliceName") else "")
        segments = [seg.partition(":") for seg in eid.split(".")]
        if segments[0][0] != type_name:
            raise self._fail(url, f"element {eid} does not start with {type_name}")
        node = root
        for name, _, slice_name in segments[1:]:
            node = self._child(url, node, name)
            if slice_name:
                found = next((s for s in node.slices if s.label.endswith(f":{slice_name}")), None)
                if found is None:
                    found = _Node(name=node.name, label=f"{node.label}:{slice_name}", type_key=node.type_key,
                                  types=node.types, choice=node.choice)
                    node.slices.append(found)
                node = found
        self._apply_properties(url, node, element, eid)

    def _child(self, url: str, parent: _Node, name: str) -> _Node:
        if name in parent.children:
            return parent.children[name]
        label = f"{parent.label}.{name}"
        if name.endswith("[x]"):
            stem = name[:-3]
            types = self._model.choice_types(parent.type_key, stem)
            if not types:
                raise self._fail(url, f"{label} is not a choice element of R4")
            choice = {stem + t[0].upper() + t[1:]: t for t in types}
            child = _Node(name=stem, label=label, type_key=parent.type_key, types=tuple(types), choice=choice)
        else:
            info = self._model.child(parent.type_key, name)
            if info is None:
                raise self._fail(url, f"{label} is not an R4 element")
            child = _Node(name=name, label=label, type_key=info[1], types=(info[0],))
        parent.children[name] = child
        return child

    def _apply_properties(self, url: str, node: _Node, element: dict[str, Any], eid: str) -> None:
        if "min" in element:
            node.min = int(element["min"])
        if "max" in element:
            node.max = None if element["max"] == "*" else int(element["max"])
        if element.get("type"):
            codes = tuple(t["code"] for t in element["type"])
            node.types = codes
            if len(codes) == 1 and node.choice is None:
                node.type_key = codes[0] if codes[0] not in ("BackboneElement", "Element") else node.type_key
            for t in element["type"]:
                if t["code"] == "Extension" and t.get("profile"):
                    node.ext_url = t["profile"][0]
                    if node.ext_url not in self.resources:
                        raise self._fail(url, f"{eid} uses extension {node.ext_url}, which the guide does not define")
                for ref in list(t.get("profile") or []) + list(t.get("targetProfile") or []):
                    if ref.startswith(IG_BASE) and ref.split("|")[0] not in self.resources:
                        raise self._fail(url, f"{eid} refers to {ref}, which the guide does not define")
        for key, value in element.items():
            if key.startswith("fixed"):
                node.fixed = value
            elif key.startswith("pattern"):
                node.pattern = value
        binding = element.get("binding")
        if isinstance(binding, dict) and binding.get("valueSet"):
            vs = binding["valueSet"].split("|")[0]
            if vs.startswith(IG_BASE) and vs not in self.resources:
                raise self._fail(url, f"{eid} is bound to {vs}, which the guide does not define")
            if binding.get("strength") == "required" and vs.startswith(IG_BASE):
                node.binding = self._value_set(vs)
        for c in element.get("constraint") or []:
            node.constraints.append(self._compile_constraint(url, node, c, eid))
        slicing = element.get("slicing")
        if isinstance(slicing, dict):
            for d in slicing.get("discriminator") or []:
                if d.get("type") not in ("value", "pattern"):
                    raise self._fail(url, f"{eid}: discriminator type {d.get('type')!r} is not supported "
                                          "(use value or pattern)")
                node.discriminators.append((d["type"], d["path"]))
            node.closed = slicing.get("rules") == "closed"

    def _compile_constraint(self, url: str, node: _Node, c: dict[str, Any], eid: str) -> _Constraint:
        key, expression = c.get("key"), c.get("expression")
        if not key or c.get("severity") not in ("error", "warning") or not c.get("human"):
            raise self._fail(url, f"{eid}: a constraint needs key, severity (error|warning) and human")
        type_key = node.types[0] if len(node.types) == 1 and node.types[0][0].isupper() else node.type_key
        if not expression:
            raise self._fail(url, f"{eid}: constraint {key} has no FHIRPath expression")
        same_key = self._constraints.get(key)
        if same_key is not None and same_key.expression != expression:
            raise self._fail(url, f"{eid}: constraint {key} is defined twice with different expressions")
        constraint = _Constraint(key, c["severity"], c["human"], expression, type_key, native=twin_for(key, expression),
                                 model=self._model.fhirpath_model)
        self._constraints.setdefault(key, constraint)
        if constraint.native is not None:  # its twin decides: the expression (tested to parse) is parsed when asked
            return constraint
        from fhirpathpy import compile as fhirpath_compile

        try:
            _check_fhirpath_syntax(expression)  # fhirpathpy itself recovers from syntax errors silently
            constraint.compiled = fhirpath_compile(expression, self._model.fhirpath_model)
        except Exception as exc:  # noqa: BLE001 - the parser raises assorted types
            raise self._fail(url, f"{eid}: constraint {key} does not compile: {exc}") from None
        return constraint

    def _finish(self, url: str, node: _Node, chosen_by_pattern: bool = False) -> None:
        """Once the whole differential is read: slice matchers, and what each element needs checking.

        ``chosen_by_pattern``: ``node`` is a slice whose values are picked by its own
        ``pattern[x]`` (discriminator ``$this``), so each of them already has it.
        """
        for child in node.children.values():
            self._finish(url, child)
        by_this = any(path == "$this" for _, path in node.discriminators)
        for piece in node.slices:
            self._finish(url, piece, by_this and piece.fixed is _MISSING)
            if not node.discriminators:
                raise self._fail(url, f"{node.label} has slices but no slicing discriminator")
            piece.matcher = self._matcher(url, node, piece)
        if node.pattern is not _MISSING and not chosen_by_pattern:
            node.matches_pattern = _pattern_test(node.pattern)
        if node.ext_url is None:  # an extension slice's children are checked by the extension's own profile
            # an optional, unbounded child with nothing else to check cannot fail: it is left out
            node.plan = [c for c in node.children.values()
                         if not (c.plain and not c.checks_values and c.min == 0 and c.max is None)]
        node.checks_values = bool(node.fixed is not _MISSING or node.matches_pattern or node.binding
                                  or node.constraints or node.plan)
        node.plain = node.choice is None and not node.slices
        node.absent_ok = node.min == 0 and all(piece.absent_ok for piece in node.slices)

    def _matcher(self, url: str, base: _Node, piece: _Node) -> Callable[[Any], bool]:
        try:
            return slice_matcher(base, piece, _pattern_test)
        except NoDiscriminatorValue as exc:
            raise self._fail(url, f"{piece.label}: no fixed or pattern value at discriminator path {exc.path!r}"
                             ) from None

    def _value_set(self, url: str) -> _Binding:
        if url in self._value_sets:
            return self._value_sets[url]
        vs = self.resources[url]
        codes: set[tuple[str, str]] = set()
        any_code: set[str] = set()
        compose = vs.get("compose") or {}
        for part, sign in (("include", 1), ("exclude", -1)):
            for inc in compose.get(part) or []:
                got, loose = self._include(url, inc)
                if sign > 0:
                    codes |= got
                    any_code |= loose
                else:
                    codes -= got
        binding = _Binding(url, frozenset(codes), frozenset(any_code))
        self._value_sets[url] = binding
        return binding

    def _include(self, url: str, inc: dict[str, Any]) -> tuple[set[tuple[str, str]], set[str]]:
        if inc.get("filter"):
            raise self._fail(url, "value set filters are not supported; list the codes or include a whole system")
        codes: set[tuple[str, str]] = set()
        loose: set[str] = set()
        for ref in inc.get("valueSet") or []:
            ref = ref.split("|")[0]
            if ref not in self.resources:
                raise self._fail(url, f"includes value set {ref}, which the guide does not define")
            nested = self._value_set(ref)
            codes |= nested.codes
            loose |= nested.any_code_systems
        system = inc.get("system")
        if system:
            if inc.get("concept"):
                codes |= {(system, c["code"]) for c in inc["concept"]}
            elif system in self.resources:
                cs = self.resources[system]
                if cs.get("content") == "complete":
                    codes |= {(system, code) for code in _all_codes(cs.get("concept") or [])}
                else:
                    loose.add(system)
            elif system.startswith(IG_BASE):
                raise self._fail(url, f"includes code system {system}, which the guide does not define")
            else:
                loose.add(system)  # an outside code system this gateway cannot enumerate
        return codes, loose


def _check_fhirpath_syntax(expression: str) -> None:
    """Parse ``expression`` strictly: any syntax error, or text left over, raises ValueError."""
    from antlr4 import CommonTokenStream, InputStream, Token
    from antlr4.error.ErrorListener import ErrorListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    class _Raise(ErrorListener):  # type: ignore[misc]
        def syntaxError(self, recognizer: Any, symbol: Any, line: int, column: int, msg: str, e: Any) -> None:
            raise ValueError(f"column {column + 1}: {msg}")

    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(_Raise())
    parser = FHIRPathParser(CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(_Raise())
    parser.expression()
    rest = parser.getCurrentToken()
    if rest.type != Token.EOF:
        raise ValueError(f"unexpected {rest.text!r} at column {rest.column + 1}")


def _all_codes(concepts: list[dict[str, Any]]) -> Iterable[str]:
    for c in concepts:
        yield c["code"]
        yield from _all_codes(c.get("concept") or [])


# ------------------------------------------------------------------ loading


def default_profiles_dir() -> Path:
    """The ``profiles/`` directory shipped beside the package (``Settings.profiles_dir`` default)."""
    from gateway.config import REPO_ROOT

    return REPO_ROOT / "profiles"


_EXPECTED_URL = {
    "StructureDefinition": f"{IG_BASE}/StructureDefinition/",
    "CodeSystem": f"{IG_BASE}/CodeSystem/",
    "ValueSet": f"{IG_BASE}/ValueSet/",
}


@functools.lru_cache(maxsize=4)
def _load(directory: Path) -> Guide:
    manifest = directory / "package.json"
    if not manifest.is_file():
        raise ConfigError("the implementation guide has no package.json", str(manifest))
    package = _read_json(manifest)
    if package.get("canonical") != IG_BASE or package.get("version") != IG_VERSION:
        raise ConfigError(
            f"canonical/version {package.get('canonical')}|{package.get('version')} "
            f"do not match gateway.naming ({IG_BASE}|{IG_VERSION})", str(manifest))
    if package.get("fhirVersions") != [FHIR_VERSION]:
        raise ConfigError(f"fhirVersions must be [{FHIR_VERSION!r}]", str(manifest))
    resources: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == "package.json":
            continue
        res = _read_json(path)
        rtype, rid, url = res.get("resourceType"), res.get("id"), res.get("url")
        problem: str | None = None
        if rtype not in CONFORMANCE_TYPES:
            problem = f"resourceType {rtype!r} is not one of {', '.join(CONFORMANCE_TYPES)}"
        elif not isinstance(rid, str) or path.name != f"{rtype}-{rid}.json":
            problem = f"the file must be named {rtype}-<id>.json after its id ({rid!r})"
        elif url != _EXPECTED_URL[rtype] + rid:
            problem = f"url {url!r} must be {_EXPECTED_URL[rtype] + rid}"
        elif res.get("version") != package["version"]:
            problem = f"version {res.get('version')!r} differs from the package version {package['version']}"
        elif res.get("fhirVersion", FHIR_VERSION) != FHIR_VERSION:
            problem = f"fhirVersion must be {FHIR_VERSION}"
        elif url in resources:
            problem = f"url {url} is also defined by {files[url].name}"
        if problem or not isinstance(url, str):
            raise ConfigError(problem or "url is missing", str(path))
        resources[url] = res
        files[url] = path
    for url, res in resources.items():
        refs = [res.get("valueSet")] if res["resourceType"] == "CodeSystem" else []
        for ref in refs:
            if ref and ref not in resources:
                raise ConfigError(f"valueSet {ref} is not defined by the guide", str(files[url]))
    guide = Guide(directory, package, resources, files)
    log.info("implementation guide %s|%s loaded: %d profiles, %d extensions, %d terminology resources",
             guide.canonical, guide.version, len(guide._profiles), len(guide._extensions),
             sum(1 for r in resources.values() if r["resourceType"] != "StructureDefinition"))
    return guide


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot be read: {exc.strerror if isinstance(exc, OSError) else exc}", str(path)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"is not valid JSON: {exc}", str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("must hold one JSON object", str(path))
    return data


def load_guide(directory: str | Path | None = None) -> Guide:
    """Load and compile the guide in ``directory`` (default: the shipped ``profiles/``), once per directory.

    :raises ConfigError: a file is unreadable or inconsistent, naming the file.
    """
    path = Path(directory) if directory else default_profiles_dir()
    if not path.is_dir():
        raise ConfigError(f"the implementation guide directory {path} does not exist", "profiles_dir")
    return _load(path.resolve())


# ------------------------------------------------------------------ conveniences


def validate(resource: Any, profiles: Iterable[str] = ()) -> list[Issue]:
    """Validate against the shipped guide (see :meth:`Guide.validate`).

    :raises ConfigError: the shipped guide itself cannot be loaded.
    """
    return load_guide().validate(resource, profiles)


def check(resource: Any, profiles: Iterable[str] = ()) -> list[Issue]:
    """Validate against the shipped guide and raise on errors (see :meth:`Guide.check`).

    :raises ProfileViolation: the resource has at least one error.
    :raises ConfigError: the shipped guide itself cannot be loaded.
    """
    return load_guide().check(resource, profiles)


def has_errors(issues: Iterable[Issue]) -> bool:
    """Whether any issue refuses the input (severity error or fatal)."""
    return any(i.severity in ("error", "fatal") for i in issues)
