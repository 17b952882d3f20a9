"""Registry source: loading and checking the file the registry authority edits.

The source is YAML (or JSON) described by ``source.schema.json`` beside this
module (``gateway registry schema`` prints it). Loading checks the file against
the schema, then everything a schema cannot say: every 统一社会信用代码 by its
GB 32100 check character, that every reference names a member or catalogue
item that exists, that dates are real and in order, that LOINC codes have the
right check digit and that certificates parse. Every problem is reported at
once, each with its path (``members[2].uscc``), so one run fixes a file.

The result is the *normalised* snapshot body: defaults filled in (time anchors,
marks, direction rules, EQA cycles, item periods) and certificates inlined as
PEM, so that a snapshot never depends on anything outside itself.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import ConfigError, IdentifierError, Issue, shown
from gateway.divisions import division_problem
from gateway.identifiers import check_id_card, check_uscc
from gateway.mapping.tables import loinc_check_digit, not_utf8
from gateway.registry.models import (
    DEFAULT_RESPONSIBLE,
    QUALIFICATION_TYPES,
    SNAPSHOT_FORMAT,
    TECHNICAL_SERVICE_TYPES,
    service_scope_words,
)
from gateway.registry.reference import resolve_factor
from gateway.signing.keys import is_authority, kid_of, uscc_of

__all__ = [
    "SOURCE_FORMAT",
    "MAX_VERSION",
    "RegistrySourceError",
    "RegistrySource",
    "source_schema",
    "read_source_data",
    "load_source",
    "parse_source",
]

log = logging.getLogger(__name__)

#: Format marker of a registry source file.
SOURCE_FORMAT = "cyhr-registry-source/1"

#: The highest snapshot version: what every place that keeps one holds (the database's ``registry_applied.version``
#: and ``decisions.snapshot_version``: INTEGER in SQLite, BIGINT in PostgreSQL; a FHIR integer, a metric), with room
#: to spare: a version past it was signed, then broke the running gateway ("OverflowError") and its next start.
MAX_VERSION = 2**31 - 1

_DEFAULT_ANCHOR = {
    "lab": "collection",
    "imaging": "study",
    "ecg": "study",
    "occupational": "exam",
    "technical-service": "report",
}
#: Item classes that need no EQA unless an item says so.
_NO_EQA_CLASSES = ("occupational", "technical-service")


class RegistrySourceError(ConfigError):
    """A registry source file has problems; carries every one of them with its path."""

    def __init__(self, source: str, issues: list[Issue]) -> None:
        lines = "; ".join(f"{i.location}: {i.message}" if i.location else i.message for i in issues[:20])
        more = f" (and {len(issues) - 20} more)" if len(issues) > 20 else ""
        super().__init__(f"registry source has {len(issues)} problem(s): {lines}{more}", source)
        self._issues = list(issues)

    def issues(self) -> list[Issue]:
        return list(self._issues)


@dataclass(frozen=True)
class RegistrySource:
    """A checked registry source: the normalised snapshot body, ready to be dated and signed."""

    body: dict[str, Any]
    origin: str
    #: Findings that do not refuse the source but are worth a look (each also logged as a warning).
    warnings: tuple[Issue, ...] = ()

    @property
    def version(self) -> int:
        """The snapshot version the source declares."""
        return int(self.body["version"])


class _DuplicateKey(yaml.YAMLError):  # type: ignore[misc]  # (PyYAML has no type hints)
    """A mapping of the source gives one key twice (YAML and JSON parsers keep the last and drop the first)."""


def _duplicate_key(key: Any, first: tuple[int, int] | None, second: tuple[int, int] | None) -> _DuplicateKey:
    """The refusal of ``key`` given twice, at (line, column) ``first`` and ``second`` when known."""
    lines = ""
    if first and second:
        lines = (f" on line {first[0]} and line {second[0]}" if first[0] != second[0]
                 else f" on line {first[0]} (columns {first[1]} and {second[1]})")
    return _DuplicateKey(f"key {key!r} is given twice in one mapping{lines}: only the second would count, and the "
                         "first would be dropped without a word; remove one, or merge them")


class _NoDatesLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # no type hints
    """YAML without implicit timestamps: dates stay strings, as the schema expects. On libyaml's parser when PyYAML
    was built with it (six times quicker on a registry source; the same safe constructors and resolvers).

    A key given twice in one mapping is refused (:class:`_DuplicateKey`): YAML keeps the last one, so a second
    ``eqa:`` block replaced the first, and a repeated ``certificates: []`` revoked a member's certificates. Keys a
    merge (``<<: *anchor``) brings in may be overridden, as YAML means them to be."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, tuple[int, int]] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                at = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                try:
                    if key in seen:
                        raise _duplicate_key(key, seen[key], at)
                    seen[key] = at
                except TypeError:
                    continue  # (an unhashable key: the safe constructor refuses it itself)
        return super().construct_mapping(node, deep=deep)


#: The tokens of JSON text: a string, a punctuation mark, or anything else up to the next one (numbers, literals).
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members as a dict; a key given twice refused (``json`` keeps the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _duplicate_key(key, None, None)
        out[key] = value
    return out


def _json_duplicate_lines(text: str) -> tuple[str, tuple[int, int], tuple[int, int]] | None:
    """(key, first (line, column), second) of the first key given twice in one object of well-formed JSON ``text``."""
    stack: list[dict[str, tuple[int, int]] | None] = []  # per open object: its keys, where; None for an array
    line, at, line_start, expect_key = 1, 0, 0, False
    for match in _JSON_TOKEN.finditer(text):
        newlines = text.count("\n", at, match.start())
        if newlines:
            line += newlines
            line_start = text.rindex("\n", at, match.start()) + 1
        at = match.start()
        token = match.group(0)
        if token == "{":
            stack.append({})
            expect_key = True
        elif token == "[":
            stack.append(None)
        elif token in "}]":
            stack.pop()
            expect_key = False
        elif token == ",":
            expect_key = bool(stack) and stack[-1] is not None
        elif token == ":":
            expect_key = False
        elif expect_key and token.startswith('"') and stack and stack[-1] is not None:
            key = json.loads(token)
            where = (line, at - line_start + 1)
            if key in stack[-1]:
                return key, stack[-1][key], where
            stack[-1][key] = where
            expect_key = False
    return None


def _load_json(text: str) -> Any:
    """Strict-enough JSON: a key given twice in one object is refused naming it and both lines.

    :raises ValueError: not JSON.
    :raises _DuplicateKey: a key given twice.
    """
    try:
        return json.loads(text, object_pairs_hook=_pairs)
    except _DuplicateKey:
        found = _json_duplicate_lines(text)
        if found is None:
            raise
        raise _duplicate_key(*found) from None


_NoDatesLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@lru_cache(maxsize=1)
def source_schema() -> dict[str, Any]:
    """The JSON Schema of the registry source format."""
    text = resources.files("gateway.registry").joinpath("source.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _read_source(p: Path) -> str:
    """The text of a source file (a byte order mark left out).

    :raises ConfigError: it is not UTF-8 text (saved as GBK), naming the file and the line.
    :raises OSError: it cannot be read.
    """
    data = p.read_bytes()
    wide = _wide_encoding(data)
    if wide:  # (said as GBK, with the wrong iconv, by the check below)
        raise ConfigError(f"registry source {p} is {wide} text, not UTF-8: save it as UTF-8 (iconv -f {wide.lower()} "
                          f"-t utf-8 {shlex.quote(str(p))})", str(p))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"registry source {not_utf8(p, exc, data)}", str(p)) from None


def _wide_encoding(data: bytes) -> str:
    """"UTF-16" or "UTF-32" when ``data`` is text in one of them (by its byte order mark, or the NUL bytes every
    ASCII character of a YAML or JSON source has in them), else ""."""
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = data[:64]
    if len(head) >= 4 and head.count(0) * 2 >= len(head):
        return "UTF-32" if head.count(0) * 4 >= len(head) * 3 else "UTF-16"
    return ""


def _named(exc: yaml.YAMLError, origin: str) -> str:
    """``exc`` in one line, saying the file ``origin`` where PyYAML says ``"<unicode string>"`` (it parsed text,
    not a file)."""
    for attr in ("context_mark", "problem_mark"):
        mark = getattr(exc, attr, None)
        if mark is not None:  # (libyaml's marks are read-only: replaced, not renamed)
            setattr(exc, attr, yaml.Mark(origin, mark.index, mark.line, mark.column, None, None))
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def read_source_data(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a source file (YAML dates kept as text), before any check: for tools that
    add to a source programmatically and then pass it to :func:`parse_source`.

    :raises ConfigError: unreadable, or not a YAML/JSON mapping.
    """
    p = Path(path)
    try:
        data = yaml.load(_read_source(p), Loader=_NoDatesLoader)  # noqa: S506 (safe loader)
    except OSError as exc:
        raise ConfigError(f"cannot read registry source {p}: {exc}", str(p)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read registry source {p}: {_named(exc, str(p))}", str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"registry source {p} must be a mapping of keys", str(p))
    return data


def load_source(path: str | Path) -> RegistrySource:
    """Read and check a registry source file (``.yaml``, ``.yml`` or ``.json``).

    :raises ConfigError: the file cannot be read.
    :raises RegistrySourceError: the file has problems (all of them, with paths).
    """
    p = Path(path)
    try:
        text = _read_source(p)
    except OSError as exc:
        raise ConfigError(f"cannot read registry source {p}: {exc.strerror or exc}", str(p)) from None
    return parse_source(text, origin=str(p), base_dir=p.parent, is_json=p.suffix.lower() == ".json")


#: Digests of source texts this process found to conform to the schema (a source checked again, as the demo and
#: tests build one registry after another, is not walked by the schema again; the checks after the schema's always
#: run).
_CONFORMING: set[str] = set()


def parse_source(
    text: str, *, origin: str = "<source>", base_dir: str | Path = ".", is_json: bool = False
) -> RegistrySource:
    """Check registry source text; certificate paths are relative to ``base_dir``.

    :raises RegistrySourceError: the text has problems (all of them, with paths).
    """
    try:
        data = _load_json(text) if is_json else yaml.load(text, Loader=_NoDatesLoader)  # noqa: S506 (safe loader)
    except _DuplicateKey as exc:
        raise RegistrySourceError(origin, [Issue("error", "duplicate", "", str(exc))]) from None
    except (ValueError, yaml.YAMLError) as exc:
        said = _named(exc, origin) if isinstance(exc, yaml.YAMLError) else str(exc)
        raise RegistrySourceError(
            origin, [Issue("error", "structure", "", f"not valid {'JSON' if is_json else 'YAML'}: {said}")]
        ) from None
    if not isinstance(data, dict):
        raise RegistrySourceError(origin, [Issue("error", "structure", "", "the top level must be a mapping of keys")])

    digest = hashlib.sha256(("json:" if is_json else "yaml:").encode() + text.encode("utf-8", "surrogatepass")
                            ).hexdigest()
    if digest not in _CONFORMING:
        validator = jsonschema.Draft202012Validator(source_schema())
        problems: list[Issue] = []
        for error in sorted(validator.iter_errors(data), key=lambda e: [str(x) for x in e.absolute_path]):
            best = jsonschema.exceptions.best_match(error.context) if error.context else error
            location = _path(best.absolute_path) if best is not error else _path(error.absolute_path)
            problems.append(Issue("error", "invalid", location, _schema_message(best)))
        if problems:
            raise RegistrySourceError(origin, problems)
        if len(_CONFORMING) >= 64:
            _CONFORMING.clear()
        _CONFORMING.add(digest)

    checker = _Checker(Path(base_dir))
    body = checker.normalise(data)
    if checker.problems:
        raise RegistrySourceError(origin, checker.problems)
    log.info(
        "registry source checked: version=%s members=%d catalogues=%d",
        body["version"],
        len(body["members"]),
        len(body["catalogues"]),
    )
    for issue in checker.warnings:
        log.warning("%s: %s: %s", origin, issue.location, issue.message)
    return RegistrySource(body, origin, tuple(checker.warnings))


#: What a schema pattern asks for, in words (a pattern problem names this instead of the regular expression).
_PATTERN_WORDS = {
    "^[^\\s]+HR$": "a region prefix followed by HR (e.g. 川渝HR)",
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}$": "a date written YYYY-MM-DD",
    "^5[01][0-9]{4}$": "a six-digit GB/T 2260 division code of Sichuan (51…) or Chongqing (50…), quoted in YAML",
}


def _schema_message(error: jsonschema.ValidationError) -> str:
    """The schema's message, in words where it would quote the schema itself (a pattern, a forbidden key)."""
    if error.validator == "pattern" and isinstance(error.validator_value, str):
        words = _PATTERN_WORDS.get(error.validator_value)
        if words:
            return f"{error.instance!r} is not {words}"
    if error.validator == "not" and isinstance(error.validator_value, dict) \
            and list(error.validator_value) == ["required"]:
        keys = ", ".join(error.validator_value["required"])
        if keys == "province" and error.absolute_path and error.absolute_path[-1] == "authority":
            return "a national authority (level: national) names no province"
        return f"{keys} must not be given here"
    return str(error.message)


#: The provinces a member of this registry lies in, by the first two digits of a GB/T 2260 division.
_PROVINCES = {"51": "Sichuan (51)", "50": "Chongqing (50)"}


def _endpoint_key(url: str) -> str:
    """The gateway an endpoint names: scheme and host in lower case, the port (the scheme's default when none is
    written), the path without a trailing slash and without the FHIR base ``/fhir`` (which names the same
    gateway)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    host = (parts.hostname or parts.netloc).lower()
    path = parts.path.rstrip("/").removesuffix("/fhir").rstrip("/")
    return f"{scheme}://{host}:{port}{path}"


def _parse_date(value: Any) -> _dt.date | None:
    if value is None:
        return None
    try:
        return _dt.date.fromisoformat(str(value))
    except ValueError:
        return None


class _Checker:
    """Semantic checks and normalisation; collects problems instead of stopping at the first."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[Issue] = []
        self.warnings: list[Issue] = []
        #: the public keys (SHA-256 of the SubjectPublicKeyInfo) certified so far: (holder's USCC, holder, where)
        self.keys: dict[str, tuple[str, str, str]] = {}
        #: the endpoints listed so far, normalised (:func:`_endpoint_key`): (holder, where)
        self.endpoints: dict[str, tuple[str, str]] = {}

    def problem(self, location: str, message: str, code: str = "value") -> None:
        self.problems.append(Issue("error", code, location, message))

    def warning(self, location: str, message: str, code: str = "business-rule") -> None:
        self.warnings.append(Issue("warning", code, location, message))

    def service_grade(self, q: dict[str, Any], loc: str) -> None:
        """A 甲级 technical-service qualification is normally approved by the national health commission, a 乙级 one by
        a province; the rule is not settled in the regulations this registry follows, so one a provincial authority
        approved is accepted, with a warning to check it against the certificate."""
        authority = q.get("authority") or {}
        if q.get("grade") == "甲" and (authority.get("province") or authority.get("level") == "provincial"):
            self.warning(f"{loc}.authority", f"qualification {q['id']}: a 甲级 {q['type']} qualification approved by "
                         f"{authority.get('name')} (province {authority.get('province') or '?'}); 甲级 is normally "
                         "approved by the national health commission (国家卫生健康委员会) and 乙级 by a province: "
                         "check the grade and the approving authority against the certificate")

    def uscc(self, value: str, location: str) -> str | None:
        try:
            return check_uscc(value)
        except IdentifierError as exc:
            self.problem(location, exc.message)
            return None

    def dates(self, obj: dict[str, Any], location: str, keys: tuple[str, str] = ("valid_from", "valid_to")) -> None:
        parsed = []
        for key in (*keys, "status_date"):
            if obj.get(key) is not None and _parse_date(obj[key]) is None:
                self.problem(f"{location}.{key}", f"{obj[key]!r} is not a calendar date")
        for key in keys:
            parsed.append(_parse_date(obj.get(key)))
        if parsed[0] and parsed[1] and parsed[1] < parsed[0]:
            self.problem(f"{location}.{keys[1]}", f"{keys[1]} {parsed[1]} is before {keys[0]} {parsed[0]}")

    def loinc(self, code: str, location: str) -> None:
        number, _, check = code.partition("-")
        if loinc_check_digit(number) != check:
            self.problem(
                location, f"LOINC code {code!r} has a wrong check digit (expected {loinc_check_digit(number)})"
            )

    def certificate(self, cert: dict[str, Any], location: str, member: str, holder: str = "") -> dict[str, Any] | None:
        pem = cert.get("pem")
        if pem is None:
            path = self.base_dir / cert["path"]
            try:
                pem = path.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                self.problem(f"{location}.path", f"cannot read certificate file {path}: {exc}")
                return None
        try:
            parsed = x509.load_pem_x509_certificate(pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            self.problem(location, "not a PEM X.509 certificate")
            return None
        # A certificate naming another USCC (or none) could never verify a signature of this member.
        named = uscc_of(parsed)
        if named != member:
            self.problem(location, f"the certificate names {named or 'no 统一社会信用代码'}, not the member {member}")
        if is_authority(parsed):
            self.problem(location, "an authority (CA) certificate cannot be a member signing certificate")
        self.one_key_one_member(parsed, location, member, holder or member)
        self.dates(cert, location)
        out: dict[str, Any] = {"pem": pem.strip() + "\n"}
        for key in ("valid_from", "valid_to"):
            if cert.get(key) is not None:
                out[key] = cert[key]
        return out

    def one_key_one_member(self, cert: x509.Certificate, location: str, member: str, holder: str) -> None:
        """A public key is certified for one member (or authority) only: the authority issues a certificate for any
        CSR naming a USCC (it cannot know whose key signed it), so one member's key certified under another's USCC
        would let that member sign as both."""
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashlib.sha256(spki).hexdigest()
        first = self.keys.setdefault(digest, (member, holder, location))
        if first[0] != member:
            self.problem(location, f"this certificate of {holder} ({member}, kid {kid_of(cert)}) certifies the same "
                         f"public key as {first[2]}, the certificate of {first[1]} ({first[0]}): whoever holds that "
                         f"key would sign as both; issue {holder}'s certificate again from a CSR made with its own "
                         "key (`gateway keys init`)", "duplicate")

    def endpoint(self, url: str, location: str, holder: str = "") -> None:
        """A member's endpoint is its gateway's base URL (its ``public_url``) or that gateway's FHIR base ``…/fhir``;
        other members add ``/exchange/bundles`` to it themselves."""
        parts = urlsplit(url)
        path = parts.path.rstrip("/")
        if not parts.netloc or parts.query or parts.fragment or path.endswith(("/exchange", "/exchange/bundles")):
            self.problem(location, f"{url!r} must be the member gateway's base URL (its public_url), like "
                         "https://gw.example.cn, or its FHIR base https://gw.example.cn/fhir")
            return
        key = _endpoint_key(url)
        first = self.endpoints.setdefault(key, (holder, location))
        if first[1] != location:
            self.problem(location, f"{holder}'s endpoint {url!r} is the endpoint of {first[0]} ({first[1]}) too: what "
                         f"is sent to one would reach the other, which stores and decides it; each gateway has its "
                         "own endpoint (its public_url)", "duplicate")

    def one_item_per_code(self, catalogue: str, item: dict[str, Any], location: str,
                          mapped: dict[tuple[str, ...], tuple[dict[str, Any], str]]) -> None:
        """A LOINC code (or an issuer's local code) names one item of a catalogue: on two, a result so coded would be
        judged by whichever item a lookup found first (another window, another EQA)."""
        codes: list[tuple[tuple[str, ...], str, str]] = [
            (("loinc", code), f"{location}.loinc[{k}]", f"LOINC {code}")
            for k, code in enumerate(item.get("loinc", []))]
        codes += [(("local", str(lc["issuer"]), str(lc["code"])), f"{location}.local_codes[{k}]",
                   f"local code {lc['code']} of {lc['issuer']}") for k, lc in enumerate(item.get("local_codes", []))]
        for key, where, said in codes:
            first = mapped.setdefault(key, (item, location))
            if first[1] == location:
                continue  # (the same item twice: said as a duplicate code by the schema's uniqueItems, or harmless)
            other = first[0]
            self.problem(where, f"{said} names item {item['code']} ({item['display']}, {item['window_days']} days) "
                         f"and item {other['code']} ({other['display']}, {other['window_days']} days, {first[1]}) of "
                         f"catalogue {catalogue!r}: a code names one item of a catalogue; map it to one of them",
                         "duplicate")

    def physicians(
        self, entries: list[dict[str, Any]], member_ref: Any
    ) -> tuple[list[dict[str, Any]], set[str]]:
        """Physicians with qualifications of their own (多点执业): 身份证号 checked, registrations at members."""
        out: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        cards: dict[str, str] = {}
        for i, p in enumerate(entries):
            loc = f"physicians[{i}]"
            if p["id"] in seen:
                self.problem(f"{loc}.id", f"physician id {p['id']!r} is already used at {seen[p['id']]}", "duplicate")
            seen[p["id"]] = loc
            try:
                card = check_id_card(p["id_card"])
            except IdentifierError as exc:
                self.problem(f"{loc}.id_card", exc.message)
                card = p["id_card"]
            if card in cards:
                self.problem(f"{loc}.id_card", f"the same 身份证号 is already listed at {cards[card]}", "duplicate")
            cards[card] = loc
            practice = []
            staff_ids: dict[tuple[str, str], str] = {}
            for j, r in enumerate(p.get("practice", [])):
                rloc = f"{loc}.practice[{j}]"
                self.dates(r, rloc)
                member = member_ref(r["member"], f"{rloc}.member")
                practice.append({"member": member, "staff_id": r["staff_id"], "valid_from": r.get("valid_from"),
                                 "valid_to": r.get("valid_to")})
                staff_ids.setdefault((member, r["staff_id"]), rloc)
            entry: dict[str, Any] = {"id": p["id"], "id_card": card, "certificate": p["certificate"],
                                     "practice": practice}
            if p.get("name"):
                entry["name"] = p["name"]
            out.append(entry)
        # One staff id of one member names one physician, or resultsInterpreter would be ambiguous.
        owner: dict[tuple[str, str], str] = {}
        for i, entry in enumerate(out):
            for j, r in enumerate(entry["practice"]):
                key = (r["member"], r["staff_id"])
                if key in owner and owner[key] != entry["id"]:
                    self.problem(f"physicians[{i}].practice[{j}].staff_id",
                                 f"staff id {r['staff_id']!r} of {r['member']} already names physician {owner[key]!r}",
                                 "duplicate")
                owner.setdefault(key, entry["id"])
        return out, set(seen)

    def factors(self, q: dict[str, Any], loc: str) -> list[str]:
        """A filing's hazard factors as catalogue codes (a name or alias of the catalogue is taken as its code);
        each must lie in a class the filing covers."""
        scope = set(q.get("scope", []))
        out: list[str] = []
        for k, code in enumerate(q.get("factors", [])):
            hit, _ = resolve_factor(code)
            if hit is None:
                self.problem(f"{loc}.factors[{k}]", f"{code!r} is not a factor of 《职业病危害因素分类目录》 (a code of "
                             "mappings/concepts/hazard-catalogue.csv, <class>-<seq> such as chemical-028, or a name "
                             "or alias the catalogue lists for one factor only)")
            elif hit.category not in scope:
                self.problem(f"{loc}.factors[{k}]", f"{code} ({hit.name}) is a {hit.category} factor and the filing's "
                             f"scope ({', '.join(sorted(scope))}) does not list that class")
            elif hit.code in out:
                self.problem(f"{loc}.factors[{k}]", f"{code} ({hit.name}) is listed twice", "duplicate")
            else:
                out.append(hit.code)
        return out

    def service_scope(self, q: dict[str, Any], loc: str) -> None:
        """A technical-service qualification's 业务范围: service types of its kind, each by its code, its 中文名称 or
        the short name certificates print (检测, 现状评价, 放射防护检测…)."""
        services = [code for code, (_, needs) in TECHNICAL_SERVICE_TYPES.items() if needs == q["type"]]
        words = {w for code in services for w in service_scope_words(code)}
        for k, entry in enumerate(q.get("scope", [])):
            if entry in words:
                continue
            other = next((code for code, (_, needs) in TECHNICAL_SERVICE_TYPES.items()
                          if needs != q["type"] and entry in service_scope_words(code)), None)
            kind = QUALIFICATION_TYPES.get(q["type"], q["type"])
            if other is not None:
                self.problem(f"{loc}.scope[{k}]", f"{entry!r} ({TECHNICAL_SERVICE_TYPES[other][0]}) is a service of "
                             f"{QUALIFICATION_TYPES[TECHNICAL_SERVICE_TYPES[other][1]]}, not of {kind}", "code-invalid")
            else:
                names = ", ".join(f"{code} ({TECHNICAL_SERVICE_TYPES[code][0]})" for code in services)
                self.problem(f"{loc}.scope[{k}]", f"{entry!r} is not a technical-service type of {kind}: list its "
                             f"services by code or name, from {names}", "code-invalid")

    def grade_periods(self, qualifications: list[dict[str, Any]]) -> None:
        """A member holds one hospital grade at a time: its hospital-grade qualifications may not overlap (a
        suspended or revoked one ends the day before its status date)."""
        by_member: dict[str, list[tuple[_dt.date, _dt.date | None, int]]] = {}
        for i, q in enumerate(qualifications):
            start = _parse_date(q.get("valid_from"))
            if q.get("type") != "hospital-grade" or not q.get("member") or start is None:
                continue
            end = _parse_date(q.get("valid_to"))
            status_date = _parse_date(q.get("status_date"))
            if q.get("status", "active") != "active" and status_date is None:
                continue  # suspended or revoked with no date: held on no day
            if q.get("status", "active") != "active" and status_date is not None:
                last = status_date - _dt.timedelta(days=1)
                end = last if end is None or last < end else end
            if end is not None and end < start:
                continue  # held on no day
            by_member.setdefault(q["member"], []).append((start, end, i))
        for member, periods in by_member.items():
            periods.sort()
            for k, (start, end, i) in enumerate(periods):
                for earlier_start, earlier_end, j in periods[:k]:
                    a, b = qualifications[j], qualifications[i]
                    if a["id"] != b["id"] and (earlier_end is None or earlier_end >= start):  # (same id: duplicate)
                        self.problem(
                            f"qualifications[{i}].valid_from",
                            f"hospital-grade qualifications {a['id']} ({a.get('grade')}, {earlier_start} – "
                            f"{earlier_end or 'open-ended'}) and {b['id']} ({b.get('grade')}, from {start}) of member "
                            f"{member} overlap: a member holds one grade at a time, so end {a['id']} (valid_to, or "
                            f"its status_date) before {b['id']} starts",
                            "business-rule",
                        )

    def levels(self, raw: list[dict[str, Any]], members: list[dict[str, Any]],
               qualifications: list[dict[str, Any]]) -> None:
        """The hospital-grade qualifications are a member's dated level; an undated ``level`` beside them must
        agree with the latest one and is then dropped (one source)."""
        for i, (m, out) in enumerate(zip(raw, members)):
            if m.get("level") is None:
                continue
            grades = sorted(
                (q for q in qualifications if q.get("member") == out["uscc"] and q.get("type") == "hospital-grade"),
                key=lambda q: (str(q.get("valid_from")), str(q["id"])),
            )
            if not grades:
                continue  # an older source: the undated level is taken as held over the whole listing
            latest = grades[-1]
            if latest.get("grade") != m["level"]:
                self.problem(f"members[{i}].level",
                             f"member {m['name']}: level {m['level']} disagrees with its latest hospital-grade "
                             f"qualification {latest['id']} ({latest.get('grade')} from {latest.get('valid_from')}); "
                             "the dated qualifications are the level: remove members[].level")
            out.pop("level", None)

    def normalise(self, data: dict[str, Any]) -> dict[str, Any]:
        if not 1 <= data["version"] <= MAX_VERSION:  # (the schema says a whole number from 1)
            self.problem("version", f"{shown(data['version']).replace(chr(39), '')} is past the highest snapshot "
                         f"version, {MAX_VERSION}: no gateway could keep it")
        authority_uscc = self.uscc(data["authority"]["uscc"], "authority.uscc") or data["authority"]["uscc"]
        authority = {"uscc": authority_uscc, "name": data["authority"]["name"]}

        members: list[dict[str, Any]] = []
        seen_members: dict[str, str] = {}
        for i, m in enumerate(data["members"]):
            loc = f"members[{i}]"
            uscc = self.uscc(m["uscc"], f"{loc}.uscc") or m["uscc"]
            if uscc in seen_members:
                self.problem(f"{loc}.uscc", f"{uscc} is already listed at {seen_members[uscc]}", "duplicate")
            seen_members[uscc] = loc
            self.dates(m, loc)
            division = division_problem(m["division"], _parse_date(m.get("valid_from")))
            if division:
                self.problem(f"{loc}.division", f"member {m['name']}: {division}")
            elif uscc[2:4] in _PROVINCES and str(m["division"])[:2] in _PROVINCES and uscc[2:4] != m["division"][:2]:
                # (a 统一社会信用代码 names the division it was registered in: a member of one province registered
                # in the other is a mistyped division, which would change what its catalogues' scope allows)
                self.problem(f"{loc}.division", f"member {m['name']}: division {m['division']} is in "
                             f"{_PROVINCES[m['division'][:2]]}, but its 统一社会信用代码 {uscc} was registered in "
                             f"{_PROVINCES[uscc[2:4]]} ({uscc[2:8]})")
            out = {k: m[k] for k in ("name", "division", "kind", "valid_from") if k in m}
            out["uscc"] = uscc
            out["valid_to"] = m.get("valid_to")
            out["status"] = m.get("status", "active")
            for key in ("status_date", "level", "miplrn", "endpoint"):
                if m.get(key) is not None:
                    out[key] = m[key]
            if m.get("endpoint") is not None:
                self.endpoint(m["endpoint"], f"{loc}.endpoint", f"member {m['name']} ({uscc})")
            certs = []
            for j, c in enumerate(m.get("certificates", [])):
                cert = self.certificate(c, f"{loc}.certificates[{j}]", uscc, f"member {m['name']}")
                if cert is not None:
                    certs.append(cert)
            out["certificates"] = certs
            members.append(out)

        def member_ref(value: str, location: str) -> str:
            uscc = self.uscc(value, location)
            if uscc is None:
                return value
            if uscc not in seen_members:
                self.problem(location, f"{uscc} is not a member of this registry", "not-found")
            return uscc

        catalogues: list[dict[str, Any]] = []
        items_by_ref: set[tuple[str, str]] = set()
        has_occupational = False
        seen_catalogues: set[str] = set()
        for i, c in enumerate(data["catalogues"]):
            loc = f"catalogues[{i}]"
            if c["id"] in seen_catalogues:
                self.problem(f"{loc}.id", f"catalogue id {c['id']!r} is used twice", "duplicate")
            seen_catalogues.add(c["id"])
            self.dates(c, loc)
            scope = dict(c["scope"])
            if scope["type"] == "alliance":
                scope["members"] = [member_ref(u, f"{loc}.scope.members[{k}]") for k, u in enumerate(scope["members"])]
            cat_from, cat_to = _parse_date(c["valid_from"]), _parse_date(c.get("valid_to"))
            items = []
            seen_codes: set[str] = set()
            #: the LOINC and local codes of the catalogue's items so far: the item each names, and where
            mapped: dict[tuple[str, ...], tuple[dict[str, Any], str]] = {}
            for j, it in enumerate(c["items"]):
                iloc = f"{loc}.items[{j}]"
                if it["code"] in seen_codes:
                    self.problem(
                        f"{iloc}.code", f"item code {it['code']!r} is used twice in catalogue {c['id']!r}", "duplicate"
                    )
                seen_codes.add(it["code"])
                items_by_ref.add((c["id"], it["code"]))
                self.dates(it, iloc)
                for k, code in enumerate(it.get("loinc", [])):
                    self.loinc(code, f"{iloc}.loinc[{k}]")
                self.one_item_per_code(c["id"], it, iloc, mapped)
                item_from = _parse_date(it.get("valid_from")) or cat_from
                item_to = _parse_date(it.get("valid_to")) if it.get("valid_to") is not None else cat_to
                if cat_from and item_from and item_from < cat_from:
                    self.problem(f"{iloc}.valid_from", f"item starts before its catalogue ({cat_from})")
                if cat_to and (item_to is None or item_to > cat_to):
                    self.problem(f"{iloc}.valid_to", f"item ends after its catalogue ({cat_to})")
                local_codes = [
                    {"issuer": member_ref(lc["issuer"], f"{iloc}.local_codes[{k}].issuer"), "code": lc["code"]}
                    for k, lc in enumerate(it.get("local_codes", []))
                ]
                has_occupational = has_occupational or it["class"] == "occupational"
                if it["class"] == "technical-service" and it["code"] not in TECHNICAL_SERVICE_TYPES:
                    self.problem(f"{iloc}.code", f"a technical-service item's code is its service type, one of "
                                 f"{', '.join(TECHNICAL_SERVICE_TYPES)}", "code-invalid")
                out_item: dict[str, Any] = {
                    "code": it["code"],
                    "display": it["display"],
                    "class": it["class"],
                    "loinc": list(it.get("loinc", [])),
                    "local_codes": local_codes,
                    "window_days": it["window_days"],
                    "time_anchor": it.get("time_anchor", _DEFAULT_ANCHOR[it["class"]]),
                    "mark": it.get("mark", c["mark"]),
                    "direction": it.get("direction", c.get("direction", "any")),
                    "eqa_required": it.get("eqa_required", it["class"] not in _NO_EQA_CLASSES),
                    # whose level, qualifications and signature the rules look at (基层检查、上级诊断)
                    "responsible": it.get(
                        "responsible", c.get("responsible", {}).get(it["class"], DEFAULT_RESPONSIBLE[it["class"]])
                    ),
                    "valid_from": item_from.isoformat() if item_from else None,
                    "valid_to": item_to.isoformat() if item_to else None,
                }
                min_level = it.get("min_issuer_level", c.get("min_issuer_level"))
                if min_level is not None:
                    out_item["min_issuer_level"] = min_level
                items.append(out_item)
            out_cat = {
                "id": c["id"],
                "name": c["name"],
                "version": c["version"],
                "scope": scope,
                "mark": c["mark"],
                "valid_from": c["valid_from"],
                "valid_to": c.get("valid_to"),
                "items": items,
            }
            if c.get("note"):
                out_cat["note"] = c["note"]
            catalogues.append(out_cat)

        authorities: list[dict[str, Any]] = []
        seen_authorities: set[str] = set()
        for i, a in enumerate(data.get("authorities", [])):
            loc = f"authorities[{i}]"
            a_uscc = self.uscc(a["uscc"], f"{loc}.uscc") or a["uscc"]
            if a_uscc in seen_authorities or a_uscc in seen_members:
                self.problem(f"{loc}.uscc", f"{a_uscc} is listed twice (authorities or members)", "duplicate")
            seen_authorities.add(a_uscc)
            out_a: dict[str, Any] = {"uscc": a_uscc, "name": a["name"]}
            for key in ("province", "endpoint"):
                if a.get(key) is not None:
                    out_a[key] = a[key]
            if a.get("endpoint") is not None:
                self.endpoint(a["endpoint"], f"{loc}.endpoint", f"authority {a['name']} ({a_uscc})")
                if urlsplit(a["endpoint"]).path.rstrip("/").endswith("/exchange/tasks"):
                    self.problem(f"{loc}.endpoint", f"{a['endpoint']!r} must be the authority gateway's base URL; "
                                 "referrals go to <endpoint>/exchange/tasks")
            out_a["certificates"] = [c for j, cert in enumerate(a.get("certificates", []))
                                     if (c := self.certificate(cert, f"{loc}.certificates[{j}]", a_uscc,
                                                               f"authority {a['name']}")) is not None]
            authorities.append(out_a)

        physicians, seen_physicians = self.physicians(data.get("physicians", []), member_ref)

        qualifications = []
        seen_quals: set[str] = set()
        for i, q in enumerate(data.get("qualifications", [])):
            loc = f"qualifications[{i}]"
            if q["id"] in seen_quals:
                self.problem(f"{loc}.id", f"qualification id {q['id']!r} is used twice", "duplicate")
            seen_quals.add(q["id"])
            self.dates(q, loc)
            out = dict(q)
            ref = (q.get("physician") or {}).get("ref")
            if ref is None:
                out["member"] = member_ref(q["member"], f"{loc}.member")
            elif ref not in seen_physicians:
                self.problem(f"{loc}.physician.ref", f"{ref!r} is not listed in physicians", "not-found")
            if q.get("factors") is not None:
                out["factors"] = self.factors(q, loc)
            if q["type"] in ("occupational-health-service", "radiation-health-service"):
                self.service_scope(q, loc)
                self.service_grade(q, loc)
            q_authority = q["authority"].get("uscc")
            if q_authority is not None and self.uscc(q_authority, f"{loc}.authority.uscc") is not None \
                    and q_authority not in seen_authorities:
                self.problem(f"{loc}.authority.uscc", f"{q_authority} is not listed in authorities", "not-found")
            out["status"] = q.get("status", "active")
            out.setdefault("valid_to", None)
            qualifications.append(out)

        self.grade_periods(qualifications)
        self.levels(data["members"], members, qualifications)

        eqa = []
        results_seen: dict[tuple[Any, ...], tuple[str, str]] = {}  # one cycle's result, where it was first given
        for i, e in enumerate(data.get("eqa", [])):
            loc = f"eqa[{i}]"
            self.dates(e, loc)
            cycle = (e["member"], tuple(sorted(e["item"].items())), e["year"], e["provider"], e.get("valid_from"),
                     e.get("valid_to"))
            first = results_seen.setdefault(cycle, (loc, e["result"]))
            if first[1] != e["result"]:
                self.problem(f"{loc}.result", f"{e['result']} contradicts {first[0]} ({first[1]}): the same member, "
                             "item, year and provider", "duplicate")
            item = e["item"]
            if "catalogue" in item and (item["catalogue"], item["code"]) not in items_by_ref:
                self.problem(
                    f"{loc}.item", f"catalogue item {item['catalogue']}:{item['code']} does not exist", "not-found"
                )
            if "loinc" in item:
                self.loinc(item["loinc"], f"{loc}.item.loinc")
            start = _parse_date(e.get("valid_from"))
            if start is not None and not e["year"] <= start.year <= e["year"] + 1:
                self.problem(f"{loc}.valid_from", f"an EQA result of {e['year']} valid from {start}: a result is "
                             f"used in its own year or the next (is year or valid_from wrong?)", "business-rule")
            out = dict(e)
            out["member"] = member_ref(e["member"], f"{loc}.member")
            # The EQA cycle is the calendar year unless the record says otherwise.
            out["valid_from"] = e.get("valid_from") or f"{e['year']:04d}-01-01"
            out["valid_to"] = e.get("valid_to") or f"{e['year']:04d}-12-31"
            eqa.append(out)

        diagnosis = data.get("diagnosis_categories") or {}
        if has_occupational:
            missing = [
                c
                for c in ("dust", "chemical", "physical", "biological", "radiation", "other")
                if c not in diagnosis.get("by_exposure", {})
            ]
            if missing:
                self.problem(
                    "diagnosis_categories.by_exposure",
                    f"occupational items need a diagnosis category for {', '.join(missing)}",
                    "required",
                )

        body: dict[str, Any] = {
            "format": SNAPSHOT_FORMAT,
            "version": data["version"],
            "demo": bool(data.get("demo", False)),
            "authority": authority,
            "diagnosis_categories": {
                "by_exposure": diagnosis.get("by_exposure", {}),
                "by_factor": diagnosis.get("by_factor", {}),
            },
            "members": members,
            "qualifications": qualifications,
            "eqa": eqa,
            "catalogues": catalogues,
        }
        if authorities:
            body["authorities"] = authorities
        if physicians:
            body["physicians"] = physicians
        if data.get("note"):
            body["note"] = data["note"]
        return body
