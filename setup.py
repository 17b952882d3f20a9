"""Build: the package as setup.cfg declares it, plus compiled twins of its hottest modules when possible.

Each module named in ``gateway.native.NATIVE`` is copied to ``gateway/_native/`` with the SHA-256 of its
source stamped on it, and the copies are compiled to C extensions with mypyc (from mypy, a build
requirement in pyproject.toml). No C compiler, a mypyc failure or ``GATEWAY_NATIVE_BUILD=0``: the
install goes on without them and the gateway runs those modules as plain Python (gateway/native.py).
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


def _note(text: str) -> None:
    print(f"cyhr-gateway: {text}", file=sys.stderr)


def _native_extensions() -> list:
    if os.environ.get("GATEWAY_NATIVE_BUILD", "").strip().lower() in ("0", "false", "no", "off"):
        _note("compiled modules not built (GATEWAY_NATIVE_BUILD); they run as plain Python")
        return []
    out = ROOT / "gateway" / "_native"
    out.mkdir(exist_ok=True)
    (out / "__init__.py").write_text('"""Compiled twins of gateway modules, written by setup.py (see '
                                     'gateway/native.py); not kept in git."""\n', encoding="utf-8")
    paths = []
    names = _native_modules()
    for name in names:
        source = (ROOT / (name.replace(".", "/") + ".py")).read_bytes()
        stamp = f'\n\nSOURCE_DIGEST = "{hashlib.sha256(source).hexdigest()}"  # of its module, by setup.py\n'
        # the twins import each other (compiled code calling compiled code); everything else stays the module's own
        text = source.decode("utf-8")
        for other in names:
            text = re.sub(rf"^(\s*from ){re.escape(other)}( import )", rf"\g<1>{_twin(other)}\g<2>", text, flags=re.M)
        copy = out / (name.rsplit(".", 1)[1] + ".py")
        copy.write_bytes(text.encode("utf-8") + stamp.encode("ascii"))
        paths.append(copy.relative_to(ROOT).as_posix())
    if not paths:
        return []
    try:
        from mypyc.build import mypycify

        extensions = mypycify(["--ignore-missing-imports", *paths], opt_level="3", group_name="gateway._native.twins")
    except BaseException as exc:  # noqa: BLE001 - mypy missing or refusing: the plain modules do the work
        _note(f"compiled modules not built ({type(exc).__name__}: {exc}); they run as plain Python")
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: the install goes on without them
    return extensions


setup(ext_modules=_native_extensions())
