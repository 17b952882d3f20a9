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

A third kind, a **catalogue** (``# kind: hazard-catalogue``, e.g.
``mappings/concepts/hazard-catalogue.csv``), lists a published code list once,
one row per entry with its names and aliases; at load time it adds its rows to
the concept table it ``extends`` (see :class:`HazardCatalogue`), so the list
is written in one place only. That table then also finds a name written with
half-width brackets, and a catalogue name without its trailing bracketed
remarks (``铅及其化合物`` for ``铅及其化合物（不包括四乙基铅）``) unless two
entries would share it (:func:`factor_key`, :attr:`ConceptTable.loose`).

Every file declares ``id``, ``version`` and ``target`` (YAML keys; ``# key: value``
lines at the top of a CSV). Everything is loaded and checked once at start-up;
any problem raises :class:`~gateway.errors.ConfigError` listing every bad line.
"""
from __future__ import annotations

import csv
import hashlib
import io
import pickle
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError, UnmappedCode
from gateway.naming import SYSTEM_LOINC, SYSTEM_UCUM, local_item_system

__all__ = ["Target", "ConceptTable", "MappingSet", "HazardEntry", "HazardCatalogue", "load_mappings",
           "loinc_check_digit", "fold_brackets", "factor_key", "short_names", "CATEGORY_SYSTEM", "CATEGORY_DISPLAY",
           "not_utf8"]

_COLUMNS = ["source_system", "source_code", "target_system", "target_code", "display"]
_UCUM_OK = re.compile(r"^[!-~]+$")  # printable ASCII, no spaces: UCUM case-sensitive codes
_CATALOGUE_COLUMNS = ["class", "seq", "name", "cas", "aliases", "code", "national_code", "national_code_status",
                      "name_check"]
_CODE_STATUS = ("verified", "likely", "unknown")
_NAME_CHECK = ("public-copy", "recollection")
#: The exposure categories (the 目录's six classes) and how the 职业健康检查 备案 names them.
CATEGORY_SYSTEM = "https://fhir.cyhr.org.cn/CodeSystem/exposure-category"
CATEGORY_DISPLAY = {"dust": "粉尘", "chemical": "化学因素", "physical": "物理因素", "radiation": "放射性因素",
                    "biological": "生物因素", "other": "其他"}
# Half-width punctuation a factor name is written with as often as the 目录's full-width one (one character each).
_FULL_WIDTH = str.maketrans({"(": "（", ")": "）", ";": "；", ",": "，", ":": "："})
_TRAILING_REMARK = re.compile(r"（[^（）]*）$")
_SPACE = re.compile(r"\s+")


def fold_brackets(text: str) -> str:
    """``text`` with half-width brackets, semicolons, commas and colons written full-width (same length)."""
    return text.translate(_FULL_WIDTH)


def factor_key(name: str) -> str:
    """How a hazard-factor name is looked up loosely: punctuation full-width, no white space."""
    return _SPACE.sub("", fold_brackets(name))


def short_names(name: str) -> list[str]:
    """``name`` (as :func:`factor_key`) without its trailing bracketed remarks, one remark more each time.

    ``麻尘（亚麻、黄麻和苎麻）（游离SiO2含量<10%）`` gives ``麻尘（亚麻、黄麻和苎麻）`` and ``麻尘``; a name that is
    all brackets keeps them.
    """
    out: list[str] = []
    key = factor_key(name)
    while (m := _TRAILING_REMARK.search(key)) is not None and m.start() > 0:
        key = key[:m.start()]
        out.append(key)
    return out


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
    #: Names looked up loosely (:func:`factor_key`) when neither the exact system nor ``*`` has the code: filled
    #: for a table a catalogue extends (half-width brackets, names without their trailing remarks).
    loose: dict[str, list[Target]] = field(default_factory=dict)

    def lookup(self, source_system: str, code: str) -> list[Target]:
        """Targets for a code: the exact source system first, then ``*``, then :attr:`loose`.

        Returns ``[]`` when the code is not in the table.

        :raises UnmappedCode: the table says the code is unmapped on purpose.
        """
        found = self.rows.get((source_system, code))
        if found is None:
            found = self.rows.get(("*", code))
        if found is None and self.loose:
            found = self.loose.get(factor_key(code))
        if found is None:
            return []
        if not found[0].code:
            raise UnmappedCode(f"code {code!r} is marked unmapped on purpose in {self.id}")
        return found

    def names(self) -> list[str]:
        """Every name looked up under ``*`` (and loosely), for readers that must not cut a name apart."""
        return [code for system, code in self.rows if system == "*"] + list(self.loose)

    def first(self, source_system: str, code: str) -> Target | None:
        """The first target, or None (also when unmapped on purpose)."""
        try:
            hits = self.lookup(source_system, code)
        except UnmappedCode:
            return None
        return hits[0] if hits else None


@dataclass(frozen=True)
class HazardEntry:
    """One factor of 《职业病危害因素分类目录》 as the catalogue table lists it."""

    category: str
    seq: int
    name: str
    cas: str
    aliases: tuple[str, ...]
    code: str
    national_code: str
    national_code_status: str
    name_check: str


@dataclass
class HazardCatalogue:
    """A hazard-factor catalogue table (``# kind: hazard-catalogue``): entries in file order."""

    id: str
    version: str
    target: str
    path: str
    extends: str
    entries: list[HazardEntry] = field(default_factory=list)
    #: Short names (a name without its trailing remarks) two or more entries would share, with their codes:
    #: not looked up, the full name is required.
    ambiguous: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Entries per exposure category."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.category] = out.get(e.category, 0) + 1
        return out


@dataclass
class MappingSet:
    """All tables of a ``mappings/`` directory, loaded once."""

    root: str
    structures: dict[str, dict[str, Any]]
    concepts: dict[str, ConceptTable]
    catalogues: dict[str, HazardCatalogue] = field(default_factory=dict)

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


def not_utf8(path: str | Path, exc: UnicodeDecodeError, data: bytes | None = None) -> str:
    """Why the file ``path`` (its bytes ``data``, when known) cannot be read as UTF-8, naming the line: a table or
    source saved in another encoding (GBK, by a Chinese Windows editor or ``iconv -t gbk``)."""
    decoded = bytes(exc.object)  # (what was decoded: after a byte order mark taken off)
    line = decoded.count(b"\n", 0, exc.start) + 1
    at = exc.start + (len(data) - len(decoded) if data is not None else 0)
    return (f"{path}: line {line}: not UTF-8 text (byte {at}: {exc.reason}); save the file as UTF-8 "
            "(from GBK: iconv -f gbk -t utf-8)")


def _read_text(path: Path, problems: list[str]) -> str | None:
    """The text of ``path``; None (with the problem noted) when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(not_utf8(path, exc, data))
        return None


def _read_table(path: Path) -> tuple[dict[str, str], list[str]]:
    """The ``# key: value`` lines and the CSV lines of a table file.

    :raises UnicodeDecodeError: it is not UTF-8 text (:func:`not_utf8` says so).
    """
    text = path.read_text(encoding="utf-8-sig")
    meta: dict[str, str] = {}
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            if value and key.strip() not in meta:
                meta[key.strip()] = value.strip()
        elif line.strip():
            body.append(line)
    return meta, body


def _rows(path: Path, problems: list[str], meta: dict[str, str], body: list[str], keys: tuple[str, ...],
          columns: list[str]) -> Any:
    """The CSV rows after the header (a reader), once the ``# key:`` lines and the header are as they must be;
    None (with the problem noted) when the header is not."""
    for key in keys:
        if key not in meta:
            problems.append(f"{path}: missing '# {key}: ...' line")
    reader = csv.reader(io.StringIO("\n".join(body)))
    header = next(reader, None)
    if header != columns:
        problems.append(f"{path}: header must be {','.join(columns)}, found {header}")
        return None
    return reader


def _load_concepts(path: Path, problems: list[str], meta: dict[str, str], body: list[str]) -> ConceptTable | None:
    reader = _rows(path, problems, meta, body, ("id", "version", "target"), _COLUMNS)
    if reader is None:
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


def _load_catalogue(path: Path, problems: list[str], meta: dict[str, str], body: list[str]) -> HazardCatalogue | None:
    reader = _rows(path, problems, meta, body, ("id", "version", "target", "extends"), _CATALOGUE_COLUMNS)
    if reader is None:
        return None
    cat = HazardCatalogue(meta.get("id", path.stem), meta.get("version", ""), meta.get("target", ""), str(path),
                          meta.get("extends", ""))
    codes: set[str] = set()
    numbers: set[tuple[str, int]] = set()
    for lineno, row in enumerate(reader, start=2):
        where = f"{path}:{lineno}"
        if len(row) != len(_CATALOGUE_COLUMNS):
            problems.append(f"{where}: expected {len(_CATALOGUE_COLUMNS)} columns, found {len(row)}")
            continue
        category, seq, name, cas, aliases, code, national, status, check = (c.strip() for c in row)
        if category not in CATEGORY_DISPLAY:
            problems.append(f"{where}: class {category!r} is not one of {', '.join(CATEGORY_DISPLAY)}")
            continue
        if not seq.isdigit() or (category, int(seq)) in numbers:
            problems.append(f"{where}: seq {seq!r} is not a new number within class {category}")
            continue
        if not name or not re.match(r"^[a-z][a-z0-9-]*$", code) or code in codes:
            problems.append(f"{where}: needs a name and a new code of lower-case letters, digits and '-'")
            continue
        if status not in _CODE_STATUS or (status != "unknown") != bool(national):
            problems.append(f"{where}: national_code_status must be one of {', '.join(_CODE_STATUS)} "
                            "(unknown exactly when national_code is empty)")
            continue
        if check not in _NAME_CHECK:
            problems.append(f"{where}: name_check must be one of {', '.join(_NAME_CHECK)}")
            continue
        numbers.add((category, int(seq)))
        codes.add(code)
        names = tuple(a.strip() for a in aliases.split("|") if a.strip())
        cat.entries.append(HazardEntry(category, int(seq), name, cas, names, code, national, status, check))
    return cat


def _extend(table: ConceptTable, cat: HazardCatalogue, problems: list[str]) -> None:
    """Add every catalogue name and alias to ``table`` ('*' rows: factor + exposure category).

    Rows the table already has for a name must give the same factor; their display becomes the catalogue's
    name (one source). A name two entries share goes to the entry that also lists it among its aliases.
    """
    claims: dict[str, list[tuple[HazardEntry, bool]]] = {}
    for entry in cat.entries:
        for key in dict.fromkeys((entry.name,) + entry.aliases):
            claims.setdefault(key, []).append((entry, key in entry.aliases))
    names = {e.code: e.name for e in cat.entries}
    for key, claimants in claims.items():
        chosen = [e for e, as_alias in claimants if as_alias] if len(claimants) > 1 else [claimants[0][0]]
        if len(chosen) != 1:
            problems.append(f"{cat.path}: {key!r} names {len(claimants)} entries; list it among the aliases of "
                            "exactly one of them")
            continue
        entry = chosen[0]
        factor = Target(cat.target, entry.code, entry.name)
        category = Target(CATEGORY_SYSTEM, entry.category, CATEGORY_DISPLAY[entry.category])
        existing = table.rows.get(("*", key))
        if existing is None:
            table.rows[("*", key)] = [factor, category]
        elif [(t.system, t.code) for t in existing] != [(factor.system, factor.code), (category.system, category.code)]:
            problems.append(f"{table.path}: {key!r} maps to {', '.join(t.code for t in existing)} but "
                            f"{cat.path} lists it under {entry.code} ({entry.category})")
    for row_key, targets in table.rows.items():  # the catalogue's name is the display of its codes everywhere
        table.rows[row_key] = [Target(t.system, t.code, names[t.code]) if t.system == cat.target and t.code in names
                               else t for t in targets]
    _loosen(table, cat)


def _loosen(table: ConceptTable, cat: HazardCatalogue) -> None:
    """Fill ``table.loose``: every ``*`` name as :func:`factor_key` writes it, then each catalogue name and alias
    without its trailing remarks, where that short name names one entry only (else it is left out and listed in
    ``cat.ambiguous``). A name the table lists itself always wins over a short name."""
    loose: dict[str, list[Target]] = {}
    clashes: set[str] = set()
    for (system, code), targets in table.rows.items():
        if system != "*" or not targets[0].code:
            continue
        key = factor_key(code)
        if key in loose and [(t.system, t.code) for t in loose[key]] != [(t.system, t.code) for t in targets]:
            clashes.add(key)
        loose.setdefault(key, targets)
    shorts: dict[str, dict[str, HazardEntry]] = {}
    for entry in cat.entries:
        for name in (entry.name,) + entry.aliases:
            for short in short_names(name):
                shorts.setdefault(short, {})[entry.code] = entry
    for short, entries in shorts.items():
        if short in loose:
            continue
        if len(entries) > 1:
            cat.ambiguous[short] = tuple(entries)
            continue
        entry = next(iter(entries.values()))
        loose[short] = [Target(cat.target, entry.code, entry.name),
                        Target(CATEGORY_SYSTEM, entry.category, CATEGORY_DISPLAY[entry.category])]
    for key in clashes:
        del loose[key]
    table.loose = loose


#: libyaml's safe loader when PyYAML has it (the same documents, read about ten times faster: every process of
#: the gateway, and every command, reads the mapping tables when it starts), else PyYAML's own.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_structure(path: Path, problems: list[str]) -> dict[str, Any] | None:
    text = _read_text(path, problems)
    if text is None:
        return None
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
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


#: Tables read and checked before, by directory and content (a process that makes several pipelines of one
#: directory — the demo's members, tests — reads and checks them once); each caller gets a copy of its own.
_LOADED: dict[tuple[str, str], bytes] = {}
_LOADED_MAX = 8
_LOADED_LOCK = threading.Lock()


def _fingerprint(base: Path) -> tuple[str, str]:
    """``base`` and a digest of the name and bytes of every file :func:`load_mappings` reads there."""
    digest = hashlib.sha256()
    for path in sorted([*base.rglob("*.yaml"), *base.rglob("concepts/*.csv")]):
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return str(base), digest.hexdigest()  # (as it was named: the tables' paths are named from it)


def load_mappings(root: str | Path) -> MappingSet:
    """Load and check every table under ``root``. Tables read before with the same content are not read and
    checked again: the caller gets a fresh copy of them.

    :raises ConfigError: the directory is missing, or any table has problems
        (all problems are listed, one per line).
    """
    base = Path(root)
    if not base.is_dir():
        from gateway.config import REPO_ROOT

        hint = ("; the gateway runs from its checkout, which holds mappings/ and profiles/: install it there with "
                "pip install -e <checkout>, or set mappings_dir" if base == REPO_ROOT / "mappings" else "")
        raise ConfigError(f"mappings directory {base} does not exist{hint}", "mappings_dir")
    try:
        key: tuple[str, str] | None = _fingerprint(base)
    except OSError:  # (a file that cannot be read is said by the reading below)
        key = None
    with _LOADED_LOCK:
        kept = _LOADED.get(key) if key is not None else None
    if kept is not None:
        return pickle.loads(kept)  # type: ignore[no-any-return]  # (bytes this process pickled itself)
    loaded = _load_mappings(base)
    try:
        unchanged = key is not None and _fingerprint(base) == key  # (not a file changed while it was read)
    except OSError:
        unchanged = False
    if unchanged:
        assert key is not None
        kept = pickle.dumps(loaded, protocol=pickle.HIGHEST_PROTOCOL)
        with _LOADED_LOCK:
            while len(_LOADED) >= _LOADED_MAX:
                _LOADED.pop(next(iter(_LOADED)))
            _LOADED[key] = kept
    return loaded


def _load_mappings(base: Path) -> MappingSet:
    problems: list[str] = []
    structures: dict[str, dict[str, Any]] = {}
    concepts: dict[str, ConceptTable] = {}
    catalogues: dict[str, HazardCatalogue] = {}
    for path in sorted(base.rglob("*.yaml")):
        data = _load_structure(path, problems)
        if data is not None:
            if data.get("id") in structures:
                problems.append(f"{path}: id {data['id']!r} is used twice")
            structures[str(data.get("id"))] = data
    for path in sorted(base.rglob("*.csv")):
        if path.parent.name != "concepts":
            continue  # layouts and samples may live elsewhere
        try:
            meta, body = _read_table(path)
        except UnicodeDecodeError as exc:
            problems.append(not_utf8(path, exc))
            continue
        if meta.get("kind") == "hazard-catalogue":
            cat = _load_catalogue(path, problems, meta, body)
            if cat is not None:
                if cat.id in catalogues:
                    problems.append(f"{path}: id {cat.id!r} is used twice")
                catalogues[cat.id] = cat
            continue
        table = _load_concepts(path, problems, meta, body)
        if table is not None:
            if table.id in concepts:
                problems.append(f"{path}: id {table.id!r} is used twice")
            concepts[table.id] = table
    for cat in catalogues.values():
        if cat.extends not in concepts:
            problems.append(f"{cat.path}: extends {cat.extends!r}, which is not a concept table")
        else:
            _extend(concepts[cat.extends], cat, problems)
    if problems:
        raise ConfigError("mapping tables have problems:\n  " + "\n  ".join(problems), str(base))
    return MappingSet(str(base), structures, concepts, catalogues)
