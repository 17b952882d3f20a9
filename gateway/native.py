"""Compiled twins of the gateway's hottest pure-Python modules, used when they were built and are current.

At install (``pip install .``, ``pip install -e .``), ``setup.py`` copies each module named in
:data:`NATIVE` to ``gateway/_native/`` (a twin's imports of the other modules of the list are
pointed at their twins) and compiles the copies to C extensions with mypyc (part of mypy, a build
requirement) when a C compiler is there; ``gateway/_native/__init__.py`` lists the SHA-256 of every
source they were made from or type-checked against (the twinned modules and the gateway modules
they import). Where it cannot (no compiler, ``GATEWAY_NATIVE_BUILD=0``), the install goes on and
the modules run as plain Python: the twins are a speed-up, never a dependency.

A twin is the same source compiled, so it gives what its module gives; what mypyc adds is a check,
at run time, that values have the types the source declares, which raises ``TypeError`` where the
plain module would have gone on (a twin that would catch such an error itself lets it through:
``_TWIN`` in :mod:`gateway.adapters.hl7v2`). So a twin only works where a failure sends the work to
the plain module, which then decides:

- the clean check (:mod:`gateway.fhir.profilecheck`): "not clean" on any exception hands the
  resource to the full validation, and a guide the twin cannot compile is checked by the plain one;
- reading, mapping and building a unit of HL7 v2 or CDC CSV (the adapters, the terminology
  mapping and the Bundle builders): a unit the twins fail on is worked again, from its raw input,
  by the plain modules (:meth:`gateway.pipeline.Pipeline._work`), whose outcome is the unit's
  (:data:`fallbacks` counts them; the first of each kind is logged as a warning);
- the walks over whole documents of :mod:`gateway.walks` (does an encoder's text need vouching for
  RFC 8785, a Bundle's references as stored): pure functions, the plain one answering whenever the
  twin raises.

``tests/test_native.py`` holds the twins equal to their modules on the test corpus and mutations of it.

:func:`load` gives the twin of a module when every twin is built and none of their sources changed
since (they call each other: one edited since the install — which then runs as it is, with one
warning — turns them all off until ``pip install -e .`` compiles them again), and not
``GATEWAY_NATIVE=0``; otherwise the module itself. ``gateway bench`` prints which run (:func:`status`).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import importlib.machinery
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

__all__ = ["NATIVE", "load", "compiled", "status", "twin_name", "source_digest", "enabled", "fallbacks",
           "fell_back"]

log = logging.getLogger(__name__)

#: Modules compiled at install when a compiler is there (``setup.py`` reads this list).
NATIVE: tuple[str, ...] = (
    "gateway.fhir.profilecheck",
    "gateway.adapters.hl7v2",
    "gateway.adapters.labcsv",
    "gateway.mapping.concepts",
    "gateway.fhir.report",
    "gateway.fhir.bundle",
    "gateway.fhir.occupational",
    "gateway.walks",
)

_OFF = ("0", "false", "no", "off")

#: Work the twins handed back to the plain modules in this process, by (format, stage), ("walk", name) or
#: ("guide", "clean check") (none on the test suite's inputs: tests/conftest.py).
fallbacks: collections.Counter[tuple[str, str]] = collections.Counter()


def twin_name(module: str) -> str:
    """``gateway.fhir.profilecheck`` -> ``gateway._native.profilecheck``."""
    return "gateway._native." + module.rsplit(".", 1)[1]


def source_digest(path: str | Path) -> str:
    """SHA-256 hex of a source file's bytes, as ``setup.py`` lists it in ``gateway/_native/__init__.py``."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def enabled() -> bool:
    """False when ``GATEWAY_NATIVE`` turns the compiled twins off (0, false, no, off)."""
    return os.environ.get("GATEWAY_NATIVE", "").strip().lower() not in _OFF


def _built() -> tuple[dict[str, str], str] | None:
    """What setup.py wrote beside the twins: (SHA-256 of every source they were made from or type-checked against,
    the build's own stamp, which every twin carries too); None when it wrote nothing."""
    try:
        package = importlib.import_module("gateway._native")
        return dict(package.SOURCES), str(package.BUILD)
    except Exception:  # noqa: BLE001 - no twins built, or from a release that wrote no stamp
        return None


def _stale(sources: dict[str, str]) -> list[str]:
    """The files of ``sources`` that changed since the twins were built, or are gone."""
    root = Path(__file__).resolve().parent.parent
    changed = []
    for path, digest in sources.items():
        try:
            if source_digest(root / path) != digest:
                changed.append(path)
        except OSError:
            changed.append(path)
    return changed


def _twin(name: str, build: str) -> tuple[ModuleType | None, str]:
    """(the compiled twin of module ``name``, "compiled"), or (None, why not)."""
    try:
        twin = importlib.import_module(twin_name(name))
    except Exception as exc:  # noqa: BLE001 - missing, or a module it imports changed under it: not used
        return None, "not built" if isinstance(exc, ImportError) else f"does not load ({type(exc).__name__})"
    if not str(twin.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return None, "not built"  # the copy is there, its compilation is not
    if getattr(twin, "_BUILD", None) != build:
        return None, "not built from these sources (a later build did not complete)"
    return twin, "compiled"


@functools.cache
def _twins() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """({module: its twin} when every twin is built and current, else {}; {module: "compiled" or why not}).

    The sources are compared before any twin is imported: a twin compiled against an older module may not even
    import (its module-level code checks types too)."""
    if not enabled():
        return {}, {name: "off (GATEWAY_NATIVE)" for name in NATIVE}
    built = _built()
    if built is None:
        return {}, {name: "not built" for name in NATIVE}
    sources, build = built
    changed = _stale(sources)
    if changed:
        note = (f"stale ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed since they were "
                "built: installing again compiles them, pip install -e . in a checkout)")
        log.warning("the compiled twins of %d modules are not used: %s", len(NATIVE), note)
        return {}, {name: note for name in NATIVE}
    found: dict[str, ModuleType] = {}
    why: dict[str, str] = {}
    for name in NATIVE:
        twin, why[name] = _twin(name, build)
        if twin is not None:
            found[name] = twin
    if len(found) == len(NATIVE):
        return found, why
    problems = sorted({text for text in why.values() if text != "compiled"})
    if any(not text.startswith("not built") for text in problems):
        log.warning("the compiled twins of %d modules are not used: %s", len(NATIVE), "; ".join(problems))
    return {}, {name: (text if text != "compiled" else "not used (another twin is not)") for name, text in why.items()}


_COUNTING = threading.Lock()


def fell_back(key: tuple[str, str], what: str) -> None:
    """Count one more unit or call a twin handed back to its plain module (:data:`fallbacks`, and
    ``gateway_native_fallbacks_total`` in ``/metrics``); ``what`` happened, as the log says it: a warning the first
    time in this process for ``key``, then at debug level (never patient data: the callers name places in code)."""
    from gateway import metrics

    metrics.native_fallback(*key)
    with _COUNTING:
        fallbacks[key] += 1
        first = fallbacks[key] == 1
    log.log(logging.WARNING if first else logging.DEBUG, "%s (gateway.native)", what)


def load(name: str) -> ModuleType:
    """The compiled twin of module ``name`` (one of :data:`NATIVE`) when every twin is current, else the module."""
    return _twins()[0].get(name) or importlib.import_module(name)


def compiled() -> bool:
    """Whether the twins are in use."""
    return bool(_twins()[0])


def status() -> dict[str, str]:
    """Each module of :data:`NATIVE`: "compiled", or why it runs as plain Python."""
    return dict(_twins()[1])
