"""Build: the package as setup.cfg declares it, plus compiled twins of its hottest modules when possible.

Each module named in ``gateway.native.NATIVE`` is copied to ``gateway/_native/`` (the copies import each other)
and the copies are compiled to C extensions with mypyc (from mypy, a build requirement in pyproject.toml).
``gateway/_native/__init__.py`` lists the SHA-256 of every source the twins were made from, or type-checked
against: the twinned modules and the gateway modules they import. A twin whose sources changed since is not used
(gateway/native.py), nor one of another build (each carries its build's stamp). No C compiler, a mypyc failure or
a read-only tree: the install goes on without them, and the gateway runs those modules as plain Python.
``GATEWAY_NATIVE_BUILD=0`` compiles nothing (twins an earlier install compiled from the very same sources stay in
use; ``GATEWAY_NATIVE=0`` turns them off at run time).
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
#: The commands that build what is installed (setup.py runs for metadata and requirements too: no compiling then).
_BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _native_modules() -> tuple[str, ...]:
    """``NATIVE`` as gateway/native.py declares it (read, not imported: the build has none of its dependencies)."""
    tree = ast.parse((ROOT / "gateway" / "native.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "NATIVE":
            return tuple(ast.literal_eval(node.value))  # type: ignore[arg-type]
    return ()


def _twin(name: str) -> str:
    """As gateway.native.twin_name: ``gateway.fhir.report`` -> ``gateway._native.report``."""
    return "gateway._native." + name.rsplit(".", 1)[1]


def _source(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def _imported(name: str) -> set[str]:
    """The gateway modules module ``name`` imports (any depth of its code, not theirs)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(_source(name).read_bytes())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway") and not node.level:
            for alias in node.names:  # ``from gateway import native``: a module; ``from gateway.x import y``: x
                whole = f"{node.module}.{alias.name}"
                found.add(whole if _source(whole).is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gateway")}
    return {m for m in found if _source(m).is_file() or (ROOT / m.replace(".", "/") / "__init__.py").is_file()}


def _note(text: str) -> None:
    print(f"cyhr-gateway: {text}", file=sys.stderr)


def _closure(names: tuple[str, ...]) -> list[str]:
    """``names`` and every gateway module they import, at any remove, with the packages holding them."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        seen |= {".".join(parts[:i]) for i in range(1, len(parts))}  # the packages' __init__.py
        if _source(module).is_file():
            todo += sorted(_imported(module) - seen)
    return sorted(seen)


def _path_of(module: str) -> Path:
    return _source(module) if _source(module).is_file() else ROOT / module.replace(".", "/") / "__init__.py"


def _native_extensions() -> list:
    if os.environ.get("GATEWAY_NATIVE_BUILD", "").strip().lower() in ("0", "false", "no", "off"):
        _note("compiled modules not built (GATEWAY_NATIVE_BUILD); they run as plain Python")
        return []
    if not _BUILDING & set(sys.argv[1:]):
        return []
    out = ROOT / "gateway" / "_native"
    try:
        names = _native_modules()
        manifest = {_path_of(m).relative_to(ROOT).as_posix(): hashlib.sha256(_path_of(m).read_bytes()).hexdigest()
                    for m in _closure(names)}
        # this build's stamp, carried by every twin it compiles: a twin of another build (an earlier editable
        # install's, a build that failed half way) is never taken for one of this build
        build = hashlib.sha256(repr((names, sorted(manifest.items()))).encode("utf-8")).hexdigest()
        out.mkdir(exist_ok=True)
        copies = {name.rsplit(".", 1)[1] + ".py" for name in names}
        for old in out.glob("*.py"):  # copies of modules no longer in the list
            if old.name != "__init__.py" and old.name not in copies:
                old.unlink()
        (out / "__init__.py").write_text(
            '"""Compiled twins of gateway modules, written by setup.py (see gateway/native.py); not kept in git."""'
            f"\n\n#: SHA-256 of every source the twins were made from or type-checked against\nSOURCES = {manifest!r}"
            f"\n#: this build's stamp (each twin holds it as _BUILD)\nBUILD = {build!r}\n", encoding="utf-8")
        paths = []
        for name in names:
            text = _source(name).read_text(encoding="utf-8")
            for other in names:  # the twins import each other (compiled code calling compiled code)
                text = re.sub(rf"^(\s*from ){re.escape(other)}( import )", rf"\g<1>{_twin(other)}\g<2>", text,
                              flags=re.M)
            copy = out / (name.rsplit(".", 1)[1] + ".py")
            copy.write_text(f"{text}\n\n_BUILD = {build!r}  # the build that compiled this twin (setup.py)\n",
                            encoding="utf-8")
            paths.append(copy.relative_to(ROOT).as_posix())
        # Checked as the build sees them: the gateway's own dependencies are not installed in pip's build
        # environment (their names are Any), so the strict settings of setup.cfg would only report that.
        config = ROOT / "build" / "mypyc.ini"
        config.parent.mkdir(exist_ok=True)
        config.write_text("[mypy]\npython_version = 3.11\nignore_missing_imports = True\n", encoding="utf-8")
        from mypyc.build import mypycify

        extensions = mypycify(["--config-file", str(config), *paths], opt_level="3",
                              group_name="gateway._native.twins")
    except (Exception, SystemExit) as exc:  # mypy missing or refusing, a read-only tree: the plain modules work
        _note(f"compiled modules not built ({type(exc).__name__}: {exc}); they run as plain Python")
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: the install goes on without them
    return extensions


setup(ext_modules=_native_extensions())
