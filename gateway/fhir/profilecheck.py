"""A check-only pass over a resource: is anything at all wrong with it against our guide?

:meth:`gateway.fhir.profiles.Guide.validate` reports every issue with its location,
severity and rule, which costs location strings, issue objects and a second pass
over each Bundle for its references. Most Bundles the gateway sees have nothing
to report. :class:`CleanCheck` answers one question, "would the full validation
find no issue at all (error or warning)?", and the full validation only runs
when the answer is no or the check cannot vouch for the input:

- the base shape is walked through a graph of element shapes (one per type and
  element path, built on first use), so no location or path string is made;
- every profile, and every extension of the guide, is compiled once into
  closures that answer pass/fail for one value;
- the references between a Bundle's entries (cyhr-bdl-6) are gathered during the
  walk instead of by a second pass; the duplicate ``fullUrl`` rule (bdl-7) and the
  Bundle's other rules about its entries (cyhr-bdl-1 to -5) are decided while the
  entries are visited;
- strings, like the formats the full validation already remembers, are remembered
  once found good (plain strings and references too), so an object made of known
  strings (a coding, a reference) is decided without a call of its own; checks on
  an identifier's value alone (USCC and identity-card check characters) are
  remembered by that value.

Whatever is not the common, well-formed case (a string subclass, an integral
Decimal where an integer belongs, an error raised by a check) makes the answer
"not clean", so the full validation decides. ``tests/test_profiles_fastpath.py``
holds the two equal on a corpus of good and broken Bundles.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gateway.fhir.profiles import (
    _ANY_STRING, _CODED, _COMPLEX, _CORE_SD, _FORBIDDEN, _FORMATTED, _INTEGER_TYPES, _LOCAL_ITEM, _MAX_DEPTH, _MISSING,
    _OBSERVATION_VALUES, _PLAIN, _RESOURCE, _SCALAR, _SD, _SEEN_LONGEST, _SEEN_MAX, NoDiscriminatorValue, _Binding,
    _any_at, _Constraint, _declares,
    _evaluate_fhirpath, _native_a_report, _native_entries_profiled, _native_entries_urn_uuid,
    _native_id_card_birth_date, _native_id_card_check_digit, _native_miplrn_characters, _native_one_patient,
    _native_local_code_first, _native_references_resolve, _native_reports_profiled, _native_uscc,
    _native_value_or_reason, _Node, _references, _same, _well_formed, has_items, slice_tests,
)

if TYPE_CHECKING:
    from gateway.fhir.profiles import Guide

__all__ = ["CleanCheck"]

#: Element shapes kept at most (one per type and element path met); past this, unusual inputs go to the full
#: validation rather than grow memory without bound.
_MAX_SHAPES = 20000
#: Short plain strings (string, markdown, xhtml) last found good: not blank, no forbidden character. As for
#: the formatted types (``profiles._SEEN``): bounded, and strings are immutable, so what is remembered stays true.
_PLAIN_SEEN: set[str] = set()
_REFERENCES_SEEN: set[str] = set()  # the same, for Reference.reference (a string too)
_NUMBERS = frozenset({Decimal, int, float})  # what a JSON number is parsed as: a valid decimal, any of them


_MAX_DECLARATIONS = 1024  # distinct (type, meta.profile, profiles asked for) remembered

# One element of a shape: (kind, array, type code, strings seen well formed, extensions, reference, integer low)
_Entry = tuple[int, "bool | None", str, Any, bool, bool, "int | None"]
_Check = Callable[[Any, "_Ctx", str], bool]
# per type: its elements; strings known good for its one-string elements, and for its string-array ones; its decimals
_TypeEntries = tuple[dict[str, _Entry], dict[str, AbstractSet[str]], dict[str, AbstractSet[str]], frozenset[str]]


class _Ctx:
    """What a compiled check may need beyond the value: ``%resource``, and what a Bundle's entries hold."""

    __slots__ = ("root", "facts")

    def __init__(self, root: Any, facts: _BundleFacts | None = None) -> None:
        self.root = root
        self.facts = facts


class _Shape:
    """The elements an object may have at one element path (``Observation.code``) of one type."""

    __slots__ = ("type_key", "ctx_path", "entries", "strings", "texts", "numbers", "children", "objects", "lists",
                 "element_type", "resource_level", "allowed", "required")

    def __init__(self, type_key: str, ctx_path: str, entries: dict[str, _Entry],
                 strings: dict[str, AbstractSet[str]], texts: dict[str, AbstractSet[str]],
                 numbers: frozenset[str], required: tuple[tuple[str, ...], ...]) -> None:
        self.type_key = type_key
        self.required = required  # the elements R4 requires here, each as the keys any one of which is it
        self.ctx_path = ctx_path
        self.entries = entries
        self.resource_level = ctx_path == type_key and "." not in type_key  # (not a backbone element: see Guide)
        if self.resource_level:  # a resource's own resourceType is not walked (Guide._validate_resource checks it)
            strings = {**strings, "resourceType": _ANY_STRING}
        self.strings = strings  # element -> strings already found good for it, for a one-string element
        self.texts = texts  # the same, for an element holding an array of strings (meta.profile)
        self.numbers = numbers  # elements holding one decimal: any JSON number will do
        self.children: dict[str, _Shape] = {}
        # filled in as the walk meets them: elements holding one object (a datatype or backbone element), and
        # those holding an array of objects (no extension, no reference), by the shape of their objects
        self.objects: dict[str, _Shape] = {}
        self.lists: dict[str, _Shape] = {}
        self.element_type = type_key if "." not in type_key else ""
        self.allowed: dict[str, bool] = {}  # extension url -> whether its context allows it here


class CleanCheck:
    """Whether a resource passes the guide with no issue at all; built once per :class:`Guide`."""

    def __init__(self, guide: Guide) -> None:
        self._guide = guide
        self._model = guide._model
        self._resource_types = guide._model.resource_types
        self._profiles = guide._profiles
        self._extensions = guide._extensions
        self._ext_prefix = guide._ext_prefix
        self._entries: dict[str, _TypeEntries] = {}
        self._shapes: dict[tuple[str, str], _Shape] = {}
        self._compiled: dict[int, tuple[_Node, _Check]] = {}
        # elements whose whole check is that some of their own elements are present: {id(node): ((name, min), ...)}
        self._required_only: dict[int, tuple[tuple[str, int], ...]] = {}
        self._declared_names: dict[tuple[tuple[Any, ...], tuple[str, ...]], bool] = {}
        self._roots: dict[str, _Shape] = {}
        self._declarations: dict[tuple[str, tuple[Any, ...], tuple[str, ...]], tuple[_Check, ...] | None] = {}
        self._profile_checks = {url: self._node_check(p.root) for url, p in self._profiles.items()}
        self._extension_checks = {url: self._node_check(p.root) for url, p in self._extensions.items()}

    # -------------------------------------------------------------- entry point

    def clean(self, resource: Any, profiles: tuple[str, ...]) -> bool:
        """True only when full validation of ``resource`` (with ``profiles``) would report no issue at all."""
        if type(resource) is not dict:
            return False
        rtype = resource.get("resourceType")
        if type(rtype) is not str or rtype not in self._resource_types:
            return False
        try:
            return self._resource(resource, rtype, profiles, 0, [], True)
        except Exception:  # noqa: BLE001 - anything unexpected: the full validation decides (and reports)
            return False

    # -------------------------------------------------------------- resources

    def _declared(self, rtype: str, claimed: tuple[str, ...], extra: tuple[str, ...]) -> tuple[_Check, ...] | None:
        """The compiled profiles a resource of ``rtype`` naming ``claimed`` is checked against (None: an issue)."""
        key = (rtype, claimed, extra)
        found = self._declarations.get(key, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[no-any-return]
        declared = [p for p in claimed if type(p) is str]
        named = {ref.partition("|")[0] for ref in declared}
        declared += [p for p in extra if p.partition("|")[0] not in named]
        checks: list[_Check] | None = []
        for ref in declared:
            url, _, version = ref.partition("|")
            profile = self._profiles.get(url)
            if profile is None:
                if url == _CORE_SD + rtype:
                    continue
                checks = None
                break
            if (version and version != profile.version) or profile.type != rtype:
                checks = None
                break
            assert checks is not None
            checks.append(self._profile_checks[url])
        result = None if checks is None else tuple(checks)
        if len(self._declarations) >= _MAX_DECLARATIONS:
            self._declarations.clear()
        self._declarations[key] = result
        return result

    def _resource(self, res: dict[str, Any], rtype: str, extra: tuple[str, ...], depth: int, sink: list[Any],
                  top: bool) -> bool:
        bundle = rtype == "Bundle"
        own: list[Any] = []
        shape = self._roots.get(rtype)
        if shape is None:
            shape = self._roots[rtype] = self._shape(rtype, rtype)
        if not self._walk(res, shape, depth, bundle, res, own if bundle else sink):
            return False
        meta = res.get("meta")
        if meta is None:
            claimed: Any = ()
        elif type(meta) is not dict:
            return False
        else:
            claimed = meta.get("profile", ())
            if type(claimed) is list:
                claimed = tuple(claimed)
            elif claimed != ():
                return False  # the walk has reported its shape already
        checks = self._declared(rtype, claimed, extra)
        if checks is None:
            return False
        facts: _BundleFacts | None = None
        if bundle:
            facts = _BundleFacts()
            entries = res.get("entry")
            if entries is not None and not self._entries_clean(entries, depth, top, facts):
                return False
        if checks:
            ctx = _Ctx(res, facts)
            for check in checks:
                if not check(res, ctx, ""):
                    return False
        if facts is not None:
            sink += own
            sink += facts.refs
        return True

    def _entries_clean(self, entries: Any, depth: int, top: bool, facts: _BundleFacts) -> bool:
        """A Bundle's entries, each a resource of its own; what the Bundle's own rules need is noted on the way."""
        if type(entries) is not list:
            return False
        first: set[tuple[str, Any]] = set()
        full_urls = facts.full_urls
        refs = facts.refs
        resource_types = self._resource_types
        for entry in entries:
            if type(entry) is not dict:
                return False
            inner = entry.get("resource")
            url = entry.get("fullUrl")
            full_urls.add(url)
            if not (isinstance(url, str) and url.startswith("urn:uuid:")):
                facts.urn_uuid = False
            elif type(url) is str and len(url) <= _SEEN_LONGEST and url not in _REFERENCES_SEEN:
                # the walk found it a well-formed uri, so it is a good reference string too: the references
                # to this entry need not be looked at again
                if len(_REFERENCES_SEEN) >= _SEEN_MAX:
                    _REFERENCES_SEEN.clear()
                _REFERENCES_SEEN.add(url)
            if inner is None:
                if top and isinstance(url, str):
                    if (url, None) in first:
                        return False  # bdl-7
                    first.add((url, None))
                continue
            if type(inner) is not dict or depth >= 4:
                return False
            if top and isinstance(url, str):
                imeta = inner.get("meta")
                key = (url, imeta.get("versionId") if isinstance(imeta, dict) else None)
                if key in first:
                    return False  # bdl-7
                first.add(key)
            itype = inner.get("resourceType")
            if type(itype) is not str or itype not in resource_types:
                return False
            if not self._resource(inner, itype, (), depth + 1, refs, False):
                return False
            if itype == "Patient":
                facts.patients += 1
                if facts.profiled and not self._declares(inner, (_PATIENT,)):
                    facts.profiled = False
            elif itype == "Observation":
                if facts.profiled and not self._declares(inner, (_OBSERVATION,)):
                    facts.profiled = False
            elif itype == "DiagnosticReport":
                facts.report = True
                if facts.reports_profiled and not self._declares(inner, _REPORTS):
                    facts.reports_profiled = False
        return True

    def _declares(self, resource: dict[str, Any], prefixes: tuple[str, ...]) -> bool:
        """profiles._declares, remembered by ``meta.profile`` (of a resource already walked: strings)."""
        meta = resource.get("meta")
        declared = meta.get("profile") if type(meta) is dict else None
        if type(declared) is not list:
            return _declares(resource, *prefixes)
        key = (tuple(declared), prefixes)
        found = self._declared_names.get(key)
        if found is None:
            found = _declares(resource, *prefixes)
            if len(self._declared_names) >= _MAX_DECLARATIONS:
                self._declared_names.clear()
            self._declared_names[key] = found
        return found

    # -------------------------------------------------------------- base shape

    def _shape(self, type_key: str, ctx_path: str) -> _Shape:
        shape = self._shapes.get((type_key, ctx_path))
        if shape is None:
            if len(self._shapes) >= _MAX_SHAPES:
                raise OverflowError("too many element shapes")  # (caught by clean: the full validation runs)
            entries, strings, texts, numbers = self._entries.get(type_key) or self._type_entries(type_key)
            required = tuple(keys for _, keys in self._model.required(type_key))
            shape = self._shapes.setdefault((type_key, ctx_path),
                                            _Shape(type_key, ctx_path, entries, strings, texts, numbers, required))
        return shape

    def _type_entries(self, type_key: str) -> _TypeEntries:
        entries: dict[str, _Entry] = {}
        strings: dict[str, AbstractSet[str]] = {}
        texts: dict[str, AbstractSet[str]] = {}
        numbers: set[str] = set()
        for name, slot in self._model.slots(type_key).items():
            low = _INTEGER_TYPES.get(slot.type_code, -2147483648) if slot.kind == _SCALAR else None
            entries[name] = (slot.kind, slot.array, slot.type_code, slot.seen, slot.extensions, name == "reference",
                             low)
            if slot.array is not False and name != "reference" and not slot.extensions:
                if slot.kind == _FORMATTED or slot.kind == _CODED:  # (a _CODED element's seen: all its codes)
                    texts[name] = slot.seen
                elif slot.kind == _PLAIN:
                    texts[name] = _PLAIN_SEEN
            if slot.array is not True:
                if name == "reference":
                    if slot.kind == _PLAIN:
                        strings[name] = _REFERENCES_SEEN  # (a hit is still noted for cyhr-bdl-6)
                elif slot.kind == _FORMATTED or slot.kind == _CODED:
                    strings[name] = slot.seen
                elif slot.kind == _PLAIN:
                    strings[name] = _PLAIN_SEEN
                elif slot.type_code == "decimal":
                    numbers.add(name)
        result = self._entries[type_key] = (entries, strings, texts, frozenset(numbers))
        return result

    def _child(self, shape: _Shape, key: str) -> _Shape:
        child = shape.children.get(key)
        if child is None:
            slot = self._model.slots(shape.type_key)[key]
            child = shape.children[key] = self._shape(slot.child_key, f"{shape.ctx_path}.{key}")
        return child

    def _walk(self, obj: dict[str, Any], shape: _Shape, depth: int, skip: bool, root: Any, sink: list[Any]) -> bool:
        """The base walk of :meth:`Guide._walk` as pass/fail: no location, no issue, stop at the first doubt.

        An object whose values are all strings already found good for their elements is decided in place,
        without a call of its own (the codings, quantities and references most objects are).
        """
        if depth > _MAX_DEPTH or not obj or (shape.required and not _has_required(obj, shape.required)):
            return False
        strings = shape.strings
        inline = depth < _MAX_DEPTH  # (an object below is at depth + 1: still allowed)
        for key, val in obj.items():
            t = type(val)
            if t is str:
                seen = strings.get(key)
                if seen is not None and val in seen:  # the common case: a string this element has had before
                    if seen is _REFERENCES_SEEN:
                        sink.append(val)
                    continue
            elif t is dict:
                child = shape.objects.get(key)
                if child is None and skip and key == "resource" and shape.ctx_path == "Bundle.entry":
                    continue  # each entry is checked as a resource of its own
                if child is not None:
                    if val and inline and not child.required:
                        known = child.strings
                        for k, v in val.items():
                            if type(v) is str:
                                seen = known.get(k)
                                if seen is None or v not in seen:
                                    break
                                if seen is _REFERENCES_SEEN:
                                    sink.append(v)
                            elif type(v) not in _NUMBERS or k not in child.numbers:
                                break
                        else:
                            continue
                    if not self._walk(val, child, depth + 1, skip, root, sink):
                        return False
                    continue
            elif t is list:
                child = shape.lists.get(key)
                if child is None:
                    seen = shape.texts.get(key)
                    if seen is not None and val:
                        for item in val:
                            if type(item) is not str or item not in seen:
                                break
                        else:
                            continue
                elif val:
                    known = child.strings
                    for item in val:
                        if type(item) is not dict:
                            return False
                        if item and inline and not child.required:
                            for k, v in item.items():
                                if type(v) is str:
                                    seen = known.get(k)
                                    if seen is None or v not in seen:
                                        break
                                    if seen is _REFERENCES_SEEN:
                                        sink.append(v)
                                elif type(v) not in _NUMBERS or k not in child.numbers:
                                    break
                            else:
                                continue
                        if not self._walk(item, child, depth + 1, skip, root, sink):
                            return False
                    continue
            elif t in _NUMBERS and key in shape.numbers:
                continue
            if not self._member(shape, key, val, depth, skip, root, sink):
                return False
        return True

    def _member(self, shape: _Shape, key: str, val: Any, depth: int, skip: bool, root: Any, sink: list[Any]) -> bool:
        """One member of an object that is not one of the common cases :meth:`_walk` decides in place."""
        entry = shape.entries.get(key)
        if entry is None:
            if key == "resourceType" and shape.resource_level:
                return True
            if key[:1] == "_" and len(key) > 1 and isinstance(val, (dict, list)):
                _references(val, sink)  # not walked, but its references count (cyhr-bdl-6)
                return True
            return False
        kind, array, type_code, seen, extensions, reference, low = entry
        t = type(val)
        if t is list:
            if array is False or not val:
                return False
            if kind == _COMPLEX:
                child = shape.children.get(key) or self._child(shape, key)
                if not extensions and not reference:
                    shape.lists[key] = child
                for item in val:
                    if type(item) is not dict or not self._walk(item, child, depth + 1, skip, root, sink):
                        return False
            elif kind == _FORMATTED:
                for item in val:
                    if type(item) is not str or not (item in seen or _well_formed(type_code, item)):
                        return False
            elif kind == _CODED:
                for item in val:
                    if type(item) is not str or item not in seen:
                        return False
            else:
                for item in val:
                    if not self._value(kind, type_code, seen, low, item, shape, key, depth, skip, root, sink):
                        return False
            if reference:
                sink += val
            return not extensions or self._extensions_ok(val, shape, root)
        if array:
            return False
        if kind == _FORMATTED:
            if t is not str or not (val in seen or _well_formed(type_code, val)):
                return False
            if reference:
                sink.append(val)
            return True
        if kind == _CODED:
            return t is str and val in seen
        if kind == _COMPLEX:
            if t is not dict:
                return False
            child = shape.children.get(key) or self._child(shape, key)
            shape.objects[key] = child
            return self._walk(val, child, depth + 1, skip, root, sink)
        if kind == _PLAIN:
            if t is not str or not val.strip() or not (val.isprintable() or not _FORBIDDEN.search(val)):
                return False
            remember = _PLAIN_SEEN
            if reference:
                sink.append(val)
                remember = _REFERENCES_SEEN
            if len(val) <= _SEEN_LONGEST:
                if len(remember) >= _SEEN_MAX:
                    remember.clear()
                remember.add(val)
            return True
        if t is Decimal and type_code == "decimal":
            return True
        return self._value(kind, type_code, seen, low, val, shape, key, depth, skip, root, sink)

    def _value(self, kind: int, type_code: str, seen: Any, low: int | None, item: Any, shape: _Shape, key: str,
               depth: int, skip: bool, root: Any, sink: list[Any]) -> bool:
        """One value of element ``key`` of ``shape``: whether the base walk finds nothing wrong with it."""
        t = type(item)
        if kind == _FORMATTED:
            return t is str and (item in seen or _well_formed(type_code, item))
        if kind == _CODED:
            return t is str and item in seen
        if kind == _PLAIN:
            return t is str and bool(item.strip()) and (item.isprintable() or not _FORBIDDEN.search(item))
        if kind == _COMPLEX:
            return t is dict and self._walk(item, self._child(shape, key), depth + 1, skip, root, sink)
        if kind == _SCALAR:
            if type_code == "boolean":
                return t is bool
            if type_code == "decimal":
                return t is Decimal or t is int or t is float
            return t is int and -2147483648 <= item <= 2147483647 and (low is None or item >= low)
        if t is not dict:
            return False
        if skip and key == "resource" and shape.ctx_path == "Bundle.entry":
            return True  # each entry is checked as a resource of its own
        inner = item.get("resourceType")
        if type(inner) is not str or inner not in self._resource_types:
            return False
        return kind == _RESOURCE and self._walk(item, self._shape(inner, inner), depth + 1, False, root, sink)

    def _extensions_ok(self, exts: list[Any], shape: _Shape, root: Any) -> bool:
        for ext in exts:
            if type(ext) is not dict:
                return False
            has_value = False
            for k in ext:
                if k.startswith("value"):
                    has_value = True
                    break
            if has_value == ("extension" in ext):
                return False
            url = ext.get("url")
            if type(url) is not str or not url:
                return False
            if not url.startswith(self._ext_prefix):
                continue
            check = self._extension_checks.get(url)
            if check is None:
                return False
            allowed = shape.allowed.get(url)
            if allowed is None:
                contexts = self._extensions[url].contexts
                allowed = shape.allowed[url] = any(
                    c == shape.ctx_path or c == shape.element_type or c == "Element" for c in contexts)
            if not allowed or not check(ext, _Ctx(root), ""):
                return False
        return True

    # -------------------------------------------------------------- profiles, compiled

    def _node_check(self, node: _Node) -> _Check:
        """``node`` (a profile element) as one closure: does a value pass every check of Guide._check_value?

        Only what the element has is looked at: the closure is put together from the checks it needs.
        """
        done = self._compiled.get(id(node))
        if done is not None:
            return done[1]
        tests: list[_Check] = []
        if node.fixed is not _MISSING:
            same = _equal(node.fixed)
            tests.append(lambda item, ctx, type_code: same(item))
        if node.matches_pattern is not None:
            pattern = _pattern(node.pattern)
            tests.append(lambda item, ctx, type_code: pattern(item))
        if node.binding is not None:
            binding = node.binding
            default_type = node.types[0] if len(node.types) == 1 else ""
            tests.append(lambda item, ctx, type_code: _binding_ok(binding, item, type_code or default_type))
        natives: list[Callable[[Any], bool]] = []  # invariants with a Python twin, called as they are
        for constraint in node.constraints:
            native = constraint.native
            if native is not None and native not in _FUSED:
                natives.append(_TWINS.get(native, native))
            else:
                tests.append(self._constraint_check(constraint))
        required: list[tuple[str, int]] = []  # present, at least so many times, nothing else to check
        counted: list[tuple[str, int, int | None, _Check | None, tuple[tuple[str, int], ...] | None]] = []
        others: list[Callable[[dict[str, Any], _Ctx], bool]] = []
        for child in node.plan:
            if not child.plain:
                others.append(self._child_check(child))
            elif child.max is None and not child.checks_values and child.min > 0:
                required.append((child.name, child.min))
            elif not child.checks_values:
                counted.append((child.name, child.min, child.max, None, None))
            else:
                # a child whose values only need some elements of their own present is checked here, in place
                each = self._node_check(child)
                counted.append((child.name, child.min, child.max, each, self._required_only.get(id(child))))

        def check_plan(item: Any, ctx: _Ctx) -> bool:
            if not isinstance(item, dict):
                return True
            get = item.get
            for name, low in required:
                val = get(name, _MISSING)
                if val is _MISSING:
                    return False
                if isinstance(val, list):
                    if len(val) < low:
                        return False
                elif low > 1:
                    return False
            for name, low, high, each, inner in counted:
                val = get(name, _MISSING)
                if val is _MISSING:
                    if low > 0:
                        return False
                    continue
                if isinstance(val, list):
                    if len(val) < low or (high is not None and len(val) > high):
                        return False
                    values = val
                else:
                    if low > 1 or (high is not None and high < 1):
                        return False
                    values = [val]
                if inner is not None:
                    for value in values:
                        if isinstance(value, dict):
                            for inner_name, inner_low in inner:
                                got = value.get(inner_name, _MISSING)
                                if got is _MISSING:
                                    return False
                                if isinstance(got, list):
                                    if len(got) < inner_low:
                                        return False
                                elif inner_low > 1:
                                    return False
                elif each is not None:
                    for value in values:
                        if not each(value, ctx, ""):
                            return False
            for other in others:
                if not other(item, ctx):
                    return False
            return True

        if required and not tests and not natives and not counted and not others:
            self._required_only[id(node)] = tuple(required)
        check: _Check
        if not tests and not natives:
            if not node.plan:
                def check(item: Any, ctx: _Ctx, type_code: str) -> bool:
                    return True
            else:
                def check(item: Any, ctx: _Ctx, type_code: str) -> bool:
                    return check_plan(item, ctx)
        elif not tests:
            def check(item: Any, ctx: _Ctx, type_code: str) -> bool:
                for native in natives:
                    if not native(item):
                        return False
                return check_plan(item, ctx)
        else:
            def check(item: Any, ctx: _Ctx, type_code: str) -> bool:
                for test in tests:
                    if not test(item, ctx, type_code):
                        return False
                for native in natives:
                    if not native(item):
                        return False
                return check_plan(item, ctx)

        self._compiled[id(node)] = (node, check)
        return check

    def _child_check(self, node: _Node) -> Callable[[dict[str, Any], _Ctx], bool]:
        """A choice or sliced child of an object, as Guide._check_child decides it."""
        items_check = self._items_check(node)
        absent_ok = node.absent_ok
        name = node.name
        if node.choice is not None:
            choice = node.choice
            keys = frozenset(choice)
            types = node.types

            def check_choice(obj: dict[str, Any], ctx: _Ctx) -> bool:
                found = obj.keys() & keys
                if not found:
                    return absent_ok or items_check([], ctx, "", 0)
                if len(found) > 1:
                    return False
                (key,) = found
                type_code = choice[key]
                if types and type_code not in types:
                    return False
                return items_check([obj[key]], ctx, type_code, 1)

            if node.slices or node.checks_values:
                return check_choice
            # only how many: one value of an allowed type is all there is to it
            one_ok = node.min <= 1 and (node.max is None or node.max >= 1)
            allowed = frozenset(k for k, t in choice.items() if not types or t in types)

            def count_choice(obj: dict[str, Any], ctx: _Ctx) -> bool:
                found = obj.keys() & keys
                if not found:
                    return absent_ok or node.min <= 0
                return len(found) == 1 and one_ok and found <= allowed

            return count_choice

        def check_element(obj: dict[str, Any], ctx: _Ctx) -> bool:
            val = obj.get(name, _MISSING)
            if val is _MISSING:
                return absent_ok or items_check([], ctx, "", 0)
            return items_check(val if isinstance(val, list) else [val], ctx, "", None)

        return check_element

    def _items_check(self, node: _Node) -> Callable[[list[Any], _Ctx, str, int | None], bool]:
        """Guide._check_items as pass/fail: slices, cardinality, then each value."""
        pieces = [(_matcher(node, piece), self._items_check(piece)) for piece in node.slices]
        closed = node.closed
        low, high = node.min, node.max
        each = self._node_check(node) if node.checks_values else None
        one_piece = pieces[0] if len(pieces) == 1 else None
        by_url = _url_slices(pieces, node) if len(pieces) > 1 else None

        def check(items: list[Any], ctx: _Ctx, type_code: str, count: int | None) -> bool:
            if count is None:
                count = len(items)
            if count < low or (high is not None and count > high):
                return False
            if one_piece is not None:
                matcher, piece_check = one_piece
                bucket = []
                for item in items:
                    if matcher is not None and matcher(item):
                        bucket.append(item)
                    elif closed:
                        return False
                if not piece_check(bucket, ctx, type_code, None):
                    return False
            elif by_url is not None:  # extensions: each item's slice by its url
                sorted_out: list[list[Any]] = [[] for _ in pieces]
                for item in items:
                    url = item.get("url") if isinstance(item, dict) else None
                    place = by_url.get(url) if isinstance(url, str) else None
                    if place is not None:
                        sorted_out[place].append(item)
                    elif closed:
                        return False
                for bucket, (_, piece_check) in zip(sorted_out, pieces):
                    if not piece_check(bucket, ctx, type_code, None):
                        return False
            elif pieces:
                buckets: list[list[Any]] = [[] for _ in pieces]
                for item in items:
                    for bucket, (matcher, _) in zip(buckets, pieces):
                        if matcher is not None and matcher(item):
                            bucket.append(item)
                            break
                    else:
                        if closed:
                            return False
                for bucket, (_, piece_check) in zip(buckets, pieces):
                    if not piece_check(bucket, ctx, type_code, None):
                        return False
            if each is not None:
                for item in items:
                    if not each(item, ctx, type_code):
                        return False
            return True

        return check

    def _constraint_check(self, constraint: _Constraint) -> _Check:
        native = constraint.native
        fused = _FUSED.get(native)  # type: ignore[arg-type]
        if native is not None and fused is not None:
            def bundle_rule(item: Any, ctx: _Ctx, type_code: str) -> bool:
                facts = ctx.facts
                if facts is None or item is not ctx.root:
                    return bool(native(item))
                return fused(facts)
            return bundle_rule
        if native is not None:
            return lambda item, ctx, type_code: bool(native(item))
        return lambda item, ctx, type_code: _evaluate_fhirpath(constraint, item, ctx.root)


def _has_required(obj: dict[str, Any], required: tuple[tuple[str, ...], ...]) -> bool:
    """Whether ``obj`` holds every element R4 requires of it (each: any one of its keys)."""
    for keys in required:
        for key in keys:
            if key in obj:
                break
        else:
            return False
    return True


class _BundleFacts:
    """What a Bundle's own invariants ask of its entries, noted while the entries are checked."""

    __slots__ = ("refs", "full_urls", "urn_uuid", "patients", "report", "profiled", "reports_profiled")

    def __init__(self) -> None:
        self.refs: list[Any] = []  # every reference found in the entries' resources
        self.full_urls: set[Any] = set()
        self.urn_uuid = True
        self.patients = 0
        self.report = False
        self.profiled = True  # every Patient and Observation names its profile
        self.reports_profiled = True


def _references_resolve(facts: _BundleFacts) -> bool:
    full_urls = facts.full_urls
    return all(r in full_urls for r in facts.refs if isinstance(r, str) and r.startswith("urn:uuid:"))


#: The Bundle invariants whose answer :meth:`CleanCheck._entries_clean` works out on its way through the entries,
#: by the Python twin they stand for.
_FUSED: dict[Callable[[Any], bool], Callable[[_BundleFacts], bool]] = {
    _native_references_resolve: _references_resolve,
    _native_entries_urn_uuid: lambda facts: facts.urn_uuid,
    _native_one_patient: lambda facts: facts.patients == 1,
    _native_a_report: lambda facts: facts.report,
    _native_entries_profiled: lambda facts: facts.profiled,
    _native_reports_profiled: lambda facts: facts.reports_profiled,
}
_PATIENT = _SD + "cyhr-patient"
_OBSERVATION = _SD + "cyhr-lab-observation"
_REPORTS = (_SD + "cyhr-lab-report", _SD + "cyhr-occupational-exam-report")


def _binding_ok(binding: _Binding, item: Any, type_code: str) -> bool:
    """Guide._check_binding's verdict."""
    if type_code == "CodeableConcept" or (not type_code and isinstance(item, dict) and "coding" in item):
        codings = item.get("coding") if isinstance(item, dict) else None
        return isinstance(codings, list) and any(
            isinstance(c, dict) and binding.accepts(c.get("system"), c.get("code")) for c in codings)
    if type_code == "Coding" or isinstance(item, dict):
        return isinstance(item, dict) and binding.accepts(item.get("system"), item.get("code"))
    return binding.accepts_code(item)


# ------------------------------------------------------------------ slices and patterns


def _matcher(base: _Node, piece: _Node) -> Callable[[Any], bool] | None:
    """Whether a value belongs to slice ``piece`` of ``base``: ``piece.matcher`` (profiles.slice_matcher), made
    of compiled tests here (patterns as :func:`_pattern`)."""
    if piece.matcher is None:
        return None
    try:
        found = slice_tests(base, piece)
    except NoDiscriminatorValue:
        return piece.matcher  # (the guide refuses such a profile when it loads)
    tests = [_slice_test(steps, kind, value) for steps, kind, value in found]
    if len(tests) == 1:
        return tests[0]
    every = tuple(tests)

    def all_of(item: Any) -> bool:
        for test in every:
            if not test(item):
                return False
        return True

    return all_of


def _slice_test(steps: tuple[str, ...], kind: str, value: Any) -> Callable[[Any], bool]:
    """One of profiles.slice_matcher's tests (_has_url, _same, a pattern; at _any_below or _any_at), compiled."""
    if kind == "url":
        url = value

        def has_url(item: Any) -> bool:
            return isinstance(item, dict) and item.get("url") == url

        return has_url
    test = _equal(value) if kind == "fixed" else _pattern(value)
    if not steps:
        return test
    if len(steps) > 1:
        return functools.partial(_any_at, steps, test)
    step = steps[0]

    def any_below(item: Any) -> bool:
        if not isinstance(item, dict) or step not in item:
            return False
        got = item[step]
        if isinstance(got, list):
            for v in got:
                if test(v):
                    return True
            return False
        return test(got)

    return any_below


def _equal(fixed: Any) -> Callable[[Any], bool]:
    """``_same(value, fixed)`` as a test, a string compared in place."""
    if type(fixed) is str:
        text: str = fixed

        def same_text(value: Any) -> bool:
            return value == text if type(value) is str else _same(value, text)

        return same_text
    return functools.partial(_same, b=fixed)


def _url_slices(pieces: list[tuple[Callable[[Any], bool] | None, Any]], node: _Node) -> dict[str, int] | None:
    """Extension slices told apart by their ``url`` alone, as {url: the first slice with it}: an item's slice found
    by one lookup instead of a test per slice; None when some slice is told apart otherwise."""
    by_url: dict[str, int] = {}
    for i, piece in enumerate(node.slices):
        if pieces[i][0] is None:
            return None
        try:
            found = slice_tests(node, piece)
        except NoDiscriminatorValue:
            return None
        if len(found) != 1 or found[0][1] != "url":
            return None
        by_url.setdefault(str(found[0][2]), i)
    return by_url


def _pattern(pattern: Any) -> Callable[[Any], bool]:
    """profiles._pattern_test, with the strings of a pattern compared in place rather than by a call each."""
    if isinstance(pattern, dict):
        texts = tuple((k, p) for k, p in pattern.items() if type(p) is str)
        parts = tuple((k, _pattern(p)) for k, p in pattern.items() if type(p) is not str)

        def has_properties(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            for k, text in texts:
                if k not in value:
                    return False
                v = value[k]
                if not (v == text if type(v) is str else _same(v, text)):
                    return False
            for k, part in parts:
                if k not in value or not part(value[k]):
                    return False
            return True

        return has_properties
    if isinstance(pattern, list):
        return has_items(tuple(_pattern(p) for p in pattern))
    return functools.partial(_same, b=pattern)


_VALUE_KEYS = frozenset(_OBSERVATION_VALUES)


def _value_or_reason(obs: Any) -> bool:
    """cyhr-obs-2's twin (_native_value_or_reason), with the value[x] keys looked up as one set."""
    if type(obs) is not dict:
        return _native_value_or_reason(obs)
    return (not _VALUE_KEYS.isdisjoint(obs)
            or "dataAbsentReason" in obs
            or obs.get("status") in ("cancelled", "entered-in-error"))


def _by_value(native: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A twin on an Identifier whose answer depends on its ``value`` string alone, remembered by that string.

    The issuing organisation's USCC comes back in every Bundle a member sends: its check characters are
    worked out once. Bounded like the strings the walk remembers.
    """
    memo: dict[str, bool] = {}

    def remembered(identifier: Any) -> bool:
        if type(identifier) is dict:
            value = identifier.get("value")
            if type(value) is str:
                found = memo.get(value)
                if found is None:
                    found = bool(native(identifier))
                    if len(memo) >= _SEEN_MAX:
                        memo.clear()
                    memo[value] = found
                return found
        return native(identifier)

    return remembered


def _local_code_first(obs: Any) -> bool:
    """cyhr-obs-1's twin (_native_local_code_first), compiled."""
    if type(obs) is not dict:
        return _native_local_code_first(obs)
    code = obs.get("code")
    coding = code.get("coding") if isinstance(code, dict) else None
    first = coding[0] if isinstance(coding, list) and coding else coding
    system = first.get("system") if isinstance(first, dict) else None
    return isinstance(system, str) and system.startswith(_LOCAL_ITEM)


#: Quicker equals of some Python twins, used by the compiled checks.
_TWINS: dict[Callable[[Any], bool], Callable[[Any], bool]] = {
    _native_value_or_reason: _value_or_reason,
    _native_local_code_first: _local_code_first,
    **{native: _by_value(native) for native in (_native_uscc, _native_miplrn_characters,
                                                _native_id_card_check_digit, _native_id_card_birth_date)},
}
