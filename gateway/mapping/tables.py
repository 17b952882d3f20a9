"""Mapping tables: loading and checking everything in ``mappings/``.

Two kinds of file, both reviewed by lab and domain people like code:

- **structure files** (YAML, ``mappings/<format>/*.yaml``): where each fact
  sits in a source format (``OBX-5``, an XPath, a CSV column), which
  messages are filtered out, which versions and character sets are taken;
- **concept tables** (CSV, ``mappings/concepts/*.csv``): code maps with the
  columns ``source_system,source_code,target_system,target_code,display``.
  ``source_system`` ``local:<USCC>`` is that issuer's own item code system,
  ``*`` matches any source system. An empty ``target_code`` means "unmapped
  on purpose" (looking it up raises :class:`~gateway.errors.UnmappedCode`).

Every file declares ``id``, ``version`` and ``target`` (YAML keys; ``# key: value``
lines at the top of a CSV). Everything is loaded and checked once at start-up;
any problem raises :class:`~gateway.errors.ConfigError` listing every bad line.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError, UnmappedCode
from gateway.naming import SYSTEM_LOINC, SYSTEM_UCUM, local_item_system

__all__ = ["Target", "ConceptTable", "MappingSet", "load_mappings", "loinc_check_digit"]

_COLUMNS = ["source_system", "source_code", "target_system", "target_code", "display"]
_UCUM_OK = re.compile(r"^[!-~]+$")  # printable ASCII, no spaces: UCUM case-sensitive codes


@dataclass(frozen=True)
class Target:
    """One standard code a source code maps to."""

    system: str
    code: str
    display: str

    def coding(self) -> dict[str, str]:
        """As a FHIR Coding."""
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


@dataclass
class ConceptTable:
    """One concept table: (source system, source code) -> targets."""

    id: str
    version: str
    target: str
    path: str
    rows: dict[tuple[str, str], list[Target]] = field(default_factory=dict)

    def lookup(self, source_system: str, code: str) -> list[Target]:
        """Targets for a code: the exact source system first, then ``*``.

        Returns ``[]`` when the code is not in the table.

        :raises UnmappedCode: the table says the code is unmapped on purpose.
        """
        found = self.rows.get((source_system, code))
        if found is None:
            found = self.rows.get(("*", code))
        if found is None:
            return []
        if not found[0].code:
            raise UnmappedCode(f"code {code!r} is marked unmapped on purpose in {self.id}")
        return found

    def first(self, source_system: str, code: str) -> Target | None:
        """The first target, or None (also when unmapped on purpose)."""
        try:
            hits = self.lookup(source_system, code)
        except UnmappedCode:
            return None
        return hits[0] if hits else None


@dataclass
class MappingSet:
    """All tables of a ``mappings/`` directory, loaded once."""

    root: str
    structures: dict[str, dict[str, Any]]
    concepts: dict[str, ConceptTable]

    def structure(self, table_id: str) -> dict[str, Any]:
        """A structure file by its id.

        :raises ConfigError: no such table.
        """
        try:
            return self.structures[table_id]
        except KeyError:
            raise ConfigError(f"mapping table {table_id!r} is missing from {self.root}", table_id) from None

    def concept(self, table_id: str) -> ConceptTable:
        """A concept table by its id.

        :raises ConfigError: no such table.
        """
        try:
            return self.concepts[table_id]
        except KeyError:
            raise ConfigError(f"concept table {table_id!r} is missing from {self.root}", table_id) from None

    def summary(self) -> list[tuple[str, str, str, int]]:
        """(id, version, path, entries) of every table, for ``gateway mappings check``."""
        out = [(s["id"], str(s["version"]), s["_path"], len(s) - 1) for s in self.structures.values()]
        out += [(c.id, c.version, c.path, sum(len(v) for v in c.rows.values())) for c in self.concepts.values()]
        return sorted(out)


def loinc_check_digit(number: str) -> str:
    """The LOINC mod-10 check digit of the part before the hyphen.

    Double every other digit from the right (starting with the rightmost),
    add all digits, and the check digit brings the sum to a multiple of ten.
    """
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            total += d // 10 + d % 10
        else:
            total += d
    return str((10 - total % 10) % 10)


def _expand_system(value: str) -> str:
    if value.startswith("local:"):
        return local_item_system(value[len("local:"):])
    return value


def _check_target(system: str, code: str, where: str, problems: list[str]) -> None:
    if not code:
        return
    if system == SYSTEM_LOINC:
        m = re.match(r"^(\d{1,7})-(\d)$", code)
        if not m:
            problems.append(f"{where}: LOINC code {code!r} is not NNNNN-N")
        elif loinc_check_digit(m.group(1)) != m.group(2):
            problems.append(f"{where}: LOINC code {code!r} has a wrong check digit")
    elif system == SYSTEM_UCUM:
        if not _UCUM_OK.match(code) or code.count("[") != code.count("]") or code.count("(") != code.count(")"):
            problems.append(f"{where}: {code!r} is not a UCUM code (case-sensitive, no spaces)")
    if not re.match(r"^[a-z][a-z0-9+.-]*:", system):
        problems.append(f"{where}: target_system {system!r} is not an absolute URI")


def _load_concepts(path: Path, problems: list[str]) -> ConceptTable | None:
    text = path.read_text(encoding="utf-8-sig")
    meta: dict[str, str] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            if value:
                meta[key.strip()] = value.strip()
        elif line.strip():
            body.append(line)
    for key in ("id", "version", "target"):
        if key not in meta:
            problems.append(f"{path}: missing '# {key}: ...' line")
    reader = csv.reader(io.StringIO("\n".join(body)))
    header = next(reader, None)
    if header != _COLUMNS:
        problems.append(f"{path}: header must be {','.join(_COLUMNS)}, found {header}")
        return None
    table = ConceptTable(meta.get("id", path.stem), meta.get("version", ""), meta.get("target", ""), str(path))
    for lineno, row in enumerate(reader, start=2):
        where = f"{path}:{lineno}"
        if len(row) != 5:
            problems.append(f"{where}: expected 5 columns, found {len(row)}")
            continue
        source_system, source_code, target_system, target_code, display = (c.strip() for c in row)
        if not source_system or not source_code:
            problems.append(f"{where}: source_system and source_code are required")
            continue
        target_system = _expand_system(target_system)
        _check_target(target_system, target_code, where, problems)
        targets = table.rows.setdefault((_expand_system(source_system), source_code), [])
        if any(t.system == target_system for t in targets):
            problems.append(f"{where}: {source_code!r} is mapped twice to {target_system}")
        if targets and (not target_code) != (not targets[0].code):
            problems.append(f"{where}: {source_code!r} is both mapped and marked unmapped")
        targets.append(Target(target_system, target_code, display))
    return table


def _load_structure(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {exc}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: must be a mapping of keys")
        return None
    for key in ("id", "version", "target"):
        if key not in data:
            problems.append(f"{path}: missing key {key!r}")
    data["_path"] = str(path)
    return data


def load_mappings(root: str | Path) -> MappingSet:
    """Load and check every table under ``root``.

    :raises ConfigError: the directory is missing, or any table has problems
        (all problems are listed, one per line).
    """
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"mappings directory {base} does not exist", "mappings_dir")
    problems: list[str] = []
    structures: dict[str, dict[str, Any]] = {}
    concepts: dict[str, ConceptTable] = {}
    for path in sorted(base.rglob("*.yaml")):
        data = _load_structure(path, problems)
        if data is not None:
            if data.get("id") in structures:
                problems.append(f"{path}: id {data['id']!r} is used twice")
            structures[str(data.get("id"))] = data
    for path in sorted(base.rglob("*.csv")):
        if path.parent.name != "concepts":
            continue  # layouts and samples may live elsewhere
        table = _load_concepts(path, problems)
        if table is not None:
            if table.id in concepts:
                problems.append(f"{path}: id {table.id!r} is used twice")
            concepts[table.id] = table
    if problems:
        raise ConfigError("mapping tables have problems:\n  " + "\n  ".join(problems), str(base))
    return MappingSet(str(base), structures, concepts)
