"""CDA adapter: WS/T 500.7 检验报告 documents in, neutral records out.

Syntax only, driven by ``mappings/cda/WST500.7-lab-report.yaml``: which
document type is taken (templateId 2.16.156.10011.2.1.1.27, code C0007) and
the XPath of every fact — header (文档流水号, 检验报告单号, 电子申请单编号,
patient, custodian, 检验报告医师, 审核医师, relatedDocument), the 实验室检查
section's items, the 诊断记录 section and the 检验报告 section.

The items are read whichever of the three layouts senders use, item by item
(:class:`_Layout`): an organizer per item, the parts nested in the item
observation, or the standard's sample layout of sibling entries. A document
is refused only where it is ambiguous (a part that belongs to no item, two
parts of one kind for one item), naming the entries by XPath. A document
carried by an HL7 v3 互联互通 message (``POLB_IN224000UV01``, bare or in a SOAP
envelope) is unwrapped first (:mod:`gateway.adapters.hl7v3`).

Safety first: documents come from other systems and may be hostile. Before
anything is parsed the size is checked and a document declaring a DTD
(``<!DOCTYPE``, ``<!ENTITY``: the vehicle of XXE and entity-expansion attacks)
is refused; CDA never needs one. The parser itself (:func:`safe_parser`)
resolves no entities, loads no DTD, never touches the network and keeps
libxml2's size limits, and a DTD found after parsing refuses the document
too. A refused document is answered and recorded; nothing else happens.

Every problem becomes an :class:`~gateway.errors.Issue` located by an XPath of
local names (``/ClinicalDocument/recordTarget/patientRole/patient/id/@extension``).
The diagnosis section is read apart from the results: a diagnostic conclusion
is never part of a recognised result.
"""
from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from lxml import etree

from gateway.adapters import hl7v3
from gateway.adapters.base import (
    Coded,
    PatientFacts,
    Quantity,
    RawUnit,
    ReportFacts,
    ResultFacts,
    SourceMessage,
    SpecimenFacts,
    gbk_run,
    number_problem,
    parse_number,
    parse_reference_range,
    warn_of_repeated_items,
)
from gateway.datetimes import DateTimeError, to_fhir_date, to_fhir_datetime, to_fhir_instant
from gateway.adapters.tracing import trace
from gateway.errors import IdentifierError, Issue, shown
from gateway.identifiers import birth_date_problem, check_id_card, check_uscc, id_card_warnings, message_date

__all__ = ["CDAAdapter", "DocumentKey", "safe_parser", "declares_dtd", "encoding_refusal", "answer_code"]

_DTD_MARKERS = tuple(m.encode(enc) for m in ("<!DOCTYPE", "<!ENTITY") for enc in ("ascii", "utf-16-le", "utf-16-be"))
_CODED_TYPES = {"CD", "CE", "CV", "CS", "CO"}
# HL7 v3 NullFlavor on a 检验结果 -> FHIR data-absent-reason (after FHIR's v3 NullFlavor map): why there is none
_ABSENT = {"NI": "unknown", "UNK": "unknown", "OTH": "unknown", "NP": "unknown", "ASKU": "asked-unknown",
           "NAV": "temp-unknown", "NASK": "not-asked", "MSK": "masked", "NA": "not-applicable",
           "NINF": "negative-infinity", "PINF": "positive-infinity"}
_NUMERIC_TYPES = {"REAL", "INT", "PQ", "MO"}
#: Intervals taken as a 检验定量结果 (a bound is a quantity with a comparator, both bounds a range): IVL_PQ, and the
#: same without a unit.
_INTERVAL_TYPES = {"IVL_PQ", "IVL_INT", "IVL_REAL"}
#: Types of a 检验定量结果 read as text ("": no type said, nor a value or code attribute).
_TEXT_TYPES = {"ST", "SC", ""}
#: Types of a 检验定量结果 that are not a lab result's value as this gateway carries it.
_UNTAKEN_TYPES = {"BL": "a true or false", "ED": "encapsulated data, such as an image", "BIN": "binary data"}
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
# The institution of the 审核医师 when another member read the exam (基层检查、上级诊断); absent or the custodian
# itself otherwise. A layout may name another path as header key ``interpreter_org``.
_READING_ORG = ("hl7:legalAuthenticator/hl7:assignedEntity/hl7:representedOrganization/"
                "hl7:id[@root='2.16.156.10011.1.5']/@extension")


def safe_parser() -> etree.XMLParser:
    """An lxml parser that cannot be made to read files, fetch URLs or expand entities."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        collect_ids=False,
    )


#: Encodings a document may declare when its bytes are ASCII-compatible: every byte of markup (``<!DOCTYPE``) is
#: then the ASCII byte itself, so :func:`declares_dtd` sees it (what Chinese HIS/LIS write: UTF-8 and the GB family).
_ASCII_COMPATIBLE = frozenset({"utf-8", "utf8", "gbk", "gb2312", "gb-2312-80", "gb2312-80", "gb18030", "cp936",
                               "euc-cn", "x-gbk", "windows-936", "big5", "us-ascii", "ascii", "iso-8859-1", "latin1",
                               "latin-1", "iso8859-1", "iso-8859-15", "windows-1252", "cp1252"})
_UTF16_STARTS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, b"<\x00?\x00", b"\x00<\x00?")
_UTF32_STARTS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, b"<\x00\x00\x00", b"\x00\x00\x00<", b"\x00\x00<\x00",
                 b"\x00<\x00\x00")


def encoding_refusal(data: bytes) -> str:
    """Why a document's encoding is refused before it is parsed ("" when it is not): only UTF-8, UTF-16 and the GB
    family, in which :func:`declares_dtd` can see a DTD. In any other (UTF-32, UTF-7, EBCDIC, ...) its markup is
    other bytes, and libxml2 would read a DTD the check never saw."""
    if data.startswith(_UTF32_STARTS):  # (before UTF-16: a UTF-32 LE byte order mark begins with UTF-16 LE's)
        return "document is UTF-32: refused unread (send UTF-8, UTF-16 or GB18030)"
    if data.startswith(_UTF16_STARTS):
        return ""
    text = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    if not text.lstrip(b" \t\r\n").startswith(b"<"):
        return "document does not begin with '<' in UTF-8, UTF-16 or GB18030: refused unread"
    declared = _declared(data)
    name = "utf-8" if declared is None else declared
    if name.replace("-", "") in ("utf16", "utf16le", "utf16be", "ucs2", "unicode"):
        # (what .NET's StringWriter writes: the declaration of its own strings, over bytes saved as UTF-8)
        return (f"document declares the encoding {shown(name)}, but its bytes are not UTF-16 (no byte order mark, "
                "and '<' is one byte): refused unread; declare the encoding its bytes are in (encoding=\"UTF-8\" for "
                "UTF-8), or send it as UTF-16")
    if name not in _ASCII_COMPATIBLE:
        return (f"document declares the encoding {shown(name)}: refused unread (send UTF-8, UTF-16 or "
                "GB18030/GBK/GB2312)")
    return ""


def _undeclared_gb(data: bytes, reason: str) -> str:
    """A hint for a document whose bytes are not UTF-8 and that declares no other encoding (so it is read as UTF-8),
    when they read as GB 18030 (GBK, GB2312): what HIS systems write without saying so."""
    if "encoding" not in reason.lower() and "utf-8" not in reason.lower():
        return ""
    if _declared(data) not in (None, "utf-8", "utf8"):
        return ""
    try:
        data.decode("utf-8")
        return ""
    except UnicodeDecodeError:
        pass
    try:
        data.decode("gb18030")
    except UnicodeDecodeError:
        return ""
    return ("; its bytes are not UTF-8 but read as GB 18030 (GBK, GB2312): declare the encoding, "
            "<?xml version=\"1.0\" encoding=\"GB18030\"?>, or send it as UTF-8")


def _not_xml(data: bytes) -> bool:
    """Whether a refused body is not markup at all (plain text, JSON): said as the wrong kind of document, not as a
    hostile one."""
    text = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    if data.startswith(_UTF16_STARTS + _UTF32_STARTS) or text.lstrip(b" \t\r\n").startswith(b"<"):
        return False
    try:  # (UTF-8 text: a plain text or JSON body; other bytes, such as EBCDIC's, may still hide markup)
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: The GB family's names: GB 18030 encodes every GB 2312 and GBK character with the same bytes.
_GB_NAMES = frozenset({"gb2312", "gb-2312-80", "gb2312-80", "gbk", "cp936", "euc-cn", "x-gbk", "windows-936"})
_LATIN_NAMES = frozenset({"iso-8859-1", "latin1", "latin-1", "iso8859-1", "iso-8859-15", "windows-1252", "cp1252"})
_DECLARATION = re.compile(rb"""^((?:\xef\xbb\xbf)?[ \t\r\n]*<\?xml\s[^>]*?\bencoding\s*=\s*["'])([^"']{0,40})(["'])""")


def _declared(data: bytes) -> str | None:
    """The encoding a document's XML declaration names, lower case (None: no declaration names one)."""
    m = _DECLARATION.match(data)
    return m.group(2).decode("ascii", "replace").strip().lower().replace("_", "-") if m else None


def _gb_as_gb18030(data: bytes) -> bytes:
    """A document declared GB2312 or GBK read as GB 18030, their superset: HIS systems label GBK text "GB2312"
    (as browsers read that label), and a name such as 李喆 (喆 is GBK's, not GB 2312's) then refused the
    whole document as not well-formed."""
    if _declared(data) not in _GB_NAMES:
        return data
    return _DECLARATION.sub(rb"\1GB18030\3", data, count=1)


def _utf8_declared_latin(data: bytes) -> str:
    """Why a document declared ISO-8859-1 or windows-1252 whose bytes are UTF-8 text is refused ("" when it is not
    such): read as declared, 李 would be stored as three Latin letters and control characters, and signed."""
    if _declared(data) not in _LATIN_NAMES or data.isascii() or data.startswith(codecs.BOM_UTF8):
        return ""  # (with a byte order mark, libxml2 reads UTF-8 whatever the declaration says)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return (f"document declares the encoding {shown(_declared(data) or '')} but its text is UTF-8: read as declared "
            "its Chinese would be garbled; declare encoding=\"UTF-8\" (or send it in the encoding it declares)")


def _gb_declared_latin(data: bytes) -> str:
    """Why a document declared ISO-8859-1 or windows-1252 whose text is GBK (GB 18030) is refused ("" when it is not
    such): ISO 8859-1 decodes any byte, so 李演示 would be stored as ÀîÑÝÊ¾ (over the shared Patient) and signed. A
    run of bytes past ASCII that reads as two Chinese characters or more in a row is GBK; a single one is not told
    apart."""
    declared = _declared(data)
    if declared not in _LATIN_NAMES or data.isascii() or data.startswith(codecs.BOM_UTF8):
        return ""
    found = gbk_run(data)
    if found:  # (the text itself is not quoted: it is a patient's name as often as not)
        return (f"document declares the encoding {shown(declared or '')} in its XML declaration, but its bytes "
                f"{found[0]} to {found[1] - 1} read as Chinese text in GB 18030 (GBK, GB2312): read as declared its "
                "Chinese would be garbled; declare the encoding its bytes are in, "
                "<?xml version=\"1.0\" encoding=\"GB18030\"?>, or send it as UTF-8")
    return ""


def declares_dtd(data: bytes) -> bool:
    """Whether raw bytes contain a DTD or entity declaration (in ASCII-compatible or UTF-16 encodings)."""
    if any(marker in data for marker in _DTD_MARKERS):
        return True
    return b"<!doctype" in data[:4096].lower()


def answer_code(msg: SourceMessage) -> str:
    """AA accepted, AE an error in an understood document, AR refused outright (unreadable, hostile, wrong type)."""
    errors = msg.errors
    if not errors:
        return "AA"
    if any(e.code in ("not-supported", "structure", "too-long", "security") for e in errors):
        return "AR"
    return "AE"


def _unit_key(unit: str) -> str:
    """A unit as compared for agreement: without spaces, case folded, micro sign as u."""
    return "".join(unit.split()).casefold().replace("μ", "u").replace("µ", "u")


def _localname(el: Any) -> str:
    return str(etree.QName(el).localname)


def _path(el: Any) -> str:
    """``/ClinicalDocument/component/structuredBody/component[2]/section``: local names, positions where needed."""
    parts: list[str] = []
    while el is not None:
        name = el.tag.rpartition("}")[2]
        parent = el.getparent()
        if parent is not None:
            position = count = 0
            for sibling in parent:  # (a tag is "{namespace}name"; comments and processing instructions have none)
                tag = sibling.tag
                if isinstance(tag, str) and tag.rpartition("}")[2] == name:
                    count += 1
                    if sibling is el:
                        position = count
            if count > 1:
                name = f"{name}[{position}]"
        parts.append(name)
        el = parent
    return "/" + "/".join(reversed(parts))


def _plain_join(base: str, xpath: str) -> str:
    """Where a configured XPath would point, for facts that are missing."""
    plain = xpath.replace("hl7:", "")
    if plain.startswith(".//"):
        return base + plain[1:]
    if plain.startswith("./"):
        plain = plain[2:]
    return f"{base}/{plain}" if plain not in ("", ".") else base


def _text(el: Any) -> str:
    return " ".join("".join(el.itertext()).split())


class _Found:
    """A value read from the document and where it was."""

    __slots__ = ("value", "where", "node")

    def __init__(self, value: str, where: str, node: Any = None) -> None:
        self.value, self.where, self.node = value, where, node

    def __bool__(self) -> bool:
        return bool(self.value)


class _Reader:
    """XPath access with readable locations over one parsed document."""

    def __init__(self, ns: dict[str, str]) -> None:
        self.ns = ns

    def nodes(self, ctx: Any, xpath: str) -> list[Any]:
        result = ctx.xpath(xpath, namespaces=self.ns)
        return list(result) if isinstance(result, list) else [result]

    def value(self, ctx: Any, xpaths: Any) -> _Found:
        """The first non-empty value of one XPath or a list of them; empty with the configured location if none."""
        paths = xpaths if isinstance(xpaths, list) else [xpaths]
        for xpath in paths:
            for node in self.nodes(ctx, xpath):
                found = self._found(node)
                if found.value:
                    return found
        return _Found("", _plain_join(_path(ctx), paths[0]))

    def element(self, ctx: Any, xpath: str) -> Any:
        hits = [n for n in self.nodes(ctx, xpath) if isinstance(n, etree._Element)]
        return hits[0] if hits else None

    @staticmethod
    def _found(node: Any) -> _Found:
        if isinstance(node, etree._Element):
            return _Found(_text(node), _path(node), node)
        if isinstance(node, etree._ElementUnicodeResult):
            parent = node.getparent()
            if node.is_attribute:
                return _Found(str(node).strip(), f"{_path(parent)}/@{node.attrname}", parent)
            return _Found(" ".join(str(node).split()), f"{_path(parent)}/text()", parent)
        return _Found(str(node).strip(), "", None)


class _Item:
    """One 检验项目: its 检验项目代码 observation, where it is located and its parts by kind."""

    __slots__ = ("code", "location", "parts")

    def __init__(self, code: Any, location: Any) -> None:
        self.code, self.location = code, location
        self.parts: dict[str, Any] = {}


class _Layout:
    """Finds the 检验项目 of a 实验室检查 section and the parts of each, whichever layout the sender used.

    Items are the observations coded 检验项目代码. A part (an observation coded as one of ``parts`` in the
    structure table) belongs to

    a. the item observation it is nested in (entryRelationship, also through a nested organizer), else
    b. the one item of the nearest organizer around it that holds exactly one item, else
    c. the last item before it in the same sequence: the entries of the section, or the components of an
       organizer holding several items (an only item of such a sequence owns every part of it).

    A part nested in another part (the unit inside its 检验定量结果) is read with that part.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.item_code = str(spec.get("code", "DE04.30.019.00"))
        self.kinds: dict[str, str] = {str(v): str(k) for k, v in (spec.get("parts") or {}).items()}

    def items(self, lab: Any, msg: SourceMessage) -> list[_Item] | None:
        """The section's items in document order; None (and errors naming the entries) when it is ambiguous."""
        order: dict[Any, int] = {}
        item_nodes: list[Any] = []
        part_nodes: list[tuple[str, Any]] = []
        for n, el in enumerate(lab.iter()):
            order[el] = n
            if not isinstance(el.tag, str) or _localname(el) != "observation":
                continue
            code = next((c.get("code") for c in el if isinstance(c.tag, str) and _localname(c) == "code"), None)
            if code == self.item_code:
                item_nodes.append(el)
            elif code in self.kinds:
                part_nodes.append((self.kinds[str(code)], el))
        if not item_nodes:
            return []  # no item at all: said once, by the caller
        items = {el: _Item(el, el) for el in item_nodes}
        in_item = set(item_nodes)
        counts: dict[Any, int] = {}

        def items_in(organizer: Any) -> int:
            if organizer not in counts:
                counts[organizer] = sum(1 for el in organizer.iter() if el in in_item)
            return counts[organizer]

        def scope(el: Any) -> tuple[Any, Any]:
            """(the only item of the nearest single-item organizer, else None; the sequence el is in)."""
            node = el.getparent()
            while node is not None and node is not lab:
                if _localname(node) == "organizer":
                    n = items_in(node)
                    if n == 1:
                        return next(i for i in node.iter() if i in in_item), node
                    if n > 1:
                        return None, node
                node = node.getparent()
            return None, lab

        sequences: dict[Any, list[Any]] = {}
        for el in item_nodes:
            only, seq = scope(el)
            if only is el:
                items[el].location = el.getparent()
                while _localname(items[el].location) != "organizer":
                    items[el].location = items[el].location.getparent()
                seq = scope(items[el].location)[1]
            sequences.setdefault(seq, []).append(el)
        errors: list[Issue] = []
        owned: dict[Any, dict[str, list[Any]]] = {el: {} for el in item_nodes}
        part_set = {el for _, el in part_nodes}
        for kind, el in part_nodes:
            owner = None
            node = el.getparent()
            nested_in_part = False
            while node is not None and node is not lab:
                if node in in_item:
                    owner = node
                    break
                if node in part_set:
                    nested_in_part = True
                    break
                node = node.getparent()
            if nested_in_part:
                continue
            if owner is None:
                only, seq = scope(el)
                if only is not None:
                    owner = only
                else:
                    candidates = sequences.get(seq, [])
                    before = [i for i in candidates if order[i] < order[el]]
                    # an only item owns the parts around it, but never a result before it (a result or unit
                    # ahead of every 检验项目代码 is an orphan, however many items follow)
                    alone = len(candidates) == 1 and kind not in _RESULT_PARTS
                    owner = before[-1] if before else (candidates[0] if alone else None)
            if owner is None:
                errors.append(Issue("error", "structure", _path(el),
                                    f"{_PART_NAMES.get(kind, kind)} entry belongs to no 检验项目: no 检验项目代码 "
                                    "(DE04.30.019.00) comes before it in its section or organizer, and it is not "
                                    "nested in one", "100"))
                continue
            owned[owner].setdefault(kind, []).append(el)
        for el in item_nodes:
            for kind, nodes in owned[el].items():
                if len(nodes) > 1:
                    value = el.find("{urn:hl7-org:v3}value")
                    code = (value.get("code") or _text(value)) if value is not None else ""
                    errors.append(Issue("error", "structure", _path(el),
                                        f"检验项目 {shown(code)} has {len(nodes)} {_PART_NAMES.get(kind, kind)} "
                                        f"entries ({', '.join(_path(n) for n in nodes)}) and nothing tells them "
                                        "apart: send one per item", "100"))
                else:
                    items[el].parts[kind] = nodes[0]
        if errors:
            msg.issues.extend(errors)
            return None
        return [items[el] for el in item_nodes]


#: Parts that carry the result itself: never given to an item that comes after them.
_RESULT_PARTS = ("quantity", "unit")
_PART_NAMES = {"name": "检验项目名称", "result_code": "检验结果代码", "quantity": "检验定量结果", "unit": "计量单位",
               "specimen": "标本类别", "specimen_state": "标本状态"}


@dataclass
class _TranslatedCode(Coded):
    """A coded value with its CD/CE ``translation``s: the same meaning in other code systems, carried as further
    codings (a FHIR builder reads ``translations`` where it is there)."""

    translations: list[Coded] = field(default_factory=list)


def _code_of(el: Any) -> Coded:
    """(code, displayName, codeSystem) of a CD/CE element or of one of its translations."""
    return Coded((el.get("code") or "").strip(), (el.get("displayName") or "").strip(),
                 (el.get("codeSystem") or "").strip())


#: The LOINC OID: a translation of an item code into it is the item's LOINC (as OBX-3's alternate triplet).
_LOINC_OID = "2.16.840.1.113883.6.1"


@dataclass(frozen=True)
class DocumentKey:
    """A document as duplicate detection sees it: who keeps it, its 文档流水号, the digest of its content and
    where its 文档流水号 is (an XPath)."""

    sender: str
    document_id: str
    digest: str
    where: str = field(default="", compare=False)


class CDAAdapter:
    """Reads WS/T 500.7 检验报告 documents as the structure table describes them.

    ``member_uscc`` / ``member_miplrn`` are this gateway's own member: the
    custodian must be this member (its reports are signed by this gateway), by
    its 统一社会信用代码, or by its organisation code or licence number.
    """

    format = "cda"

    def __init__(self, structure: dict[str, Any], *, member_uscc: str, member_miplrn: str = "",
                 default_offset: str = "+08:00", max_document_bytes: int = 1_048_576) -> None:
        self.table = structure
        self.ns: dict[str, str] = dict(structure.get("namespaces", {"hl7": "urn:hl7-org:v3"}))
        self.doc = structure.get("document", {})
        self.header: dict[str, Any] = structure.get("header", {})
        self.member_uscc = member_uscc
        self.member_miplrn = (member_miplrn or "").upper()
        self.offset = default_offset
        self.max_bytes = max_document_bytes
        self.reader = _Reader(self.ns)
        self.v3_interactions = [str(i) for i in (structure.get("hl7v3") or {}).get("interactions",
                                                                                   ["POLB_IN224000UV01"])]

    # -- cutting and identifying ---------------------------------------------------------

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """One document per file or request body."""
        if data.strip():
            yield RawUnit(data, 1, origin)

    def split_stream(self, stream: IO[bytes], origin: str = "") -> Iterator[RawUnit]:
        """One document from a binary stream, read no further than one byte past the size limit."""
        data = stream.read(self.max_bytes + 1)
        if data.strip():
            yield RawUnit(data, 1, origin)

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """(custodian id, 文档流水号) for duplicate detection; ``("", "")`` if unreadable or refused."""
        root, _, _ = self._parse(unit.data)
        if root is None:
            return "", ""
        custodian = self.reader.value(root, self.header.get("custodian_id", "hl7:custodian//hl7:id/@extension"))
        doc_id = self.reader.value(root, self.header.get("document_id", "hl7:id/@extension"))
        return custodian.value, doc_id.value

    def document_key(self, unit: RawUnit) -> DocumentKey | None:
        """What tells a resent document apart: custodian, 文档流水号 and a digest of the document's content
        (exclusive XML canonical form, so the same document carried bare, in a v3 message or in SOAP, as an
        element, escaped text or base64, has the same digest). None when no document can be read."""
        root, _, _ = self._parse(unit.data)
        if root is None:
            return None
        custodian = self.reader.value(root, self.header.get("custodian_id", "hl7:custodian//hl7:id/@extension"))
        doc_id = self.reader.value(root, self.header.get("document_id", "hl7:id/@extension"))
        if not doc_id:
            return None
        canonical = etree.tostring(root, method="c14n", exclusive=True, with_comments=False)
        return DocumentKey(custodian.value, doc_id.value, hashlib.sha256(canonical).hexdigest(), doc_id.where)

    # -- parsing -------------------------------------------------------------------------

    def _parse(self, data: bytes) -> tuple[Any, list[Issue], hl7v3.Envelope | None]:
        """The ClinicalDocument element (unwrapped from an HL7 v3 message or SOAP envelope, which is returned
        too), or None and the issues that refuse the input."""
        root, issues = self._parse_bytes(data, "/")
        if root is None:
            return None, issues, hl7v3.sniff(data)
        document, envelope, issues = hl7v3.unwrap(root, self._parse_bytes, self.v3_interactions)
        return document, issues, envelope

    def _parse_bytes(self, data: bytes, where: str) -> tuple[Any, list[Issue]]:
        """The root element of ``data`` (the input, or a text payload found at ``where`` in it), or None and
        the issues that refuse it."""
        if len(data) > self.max_bytes:
            return None, [Issue("error", "too-long", where, f"document is larger than the limit of {self.max_bytes} "
                                "bytes", "207")]
        refusal = encoding_refusal(data)
        if refusal:
            # (a wrong label, not a hostile document: unless it declares a DTD as well)
            mislabel = _not_xml(data) or ("its bytes are not UTF-16" in refusal and not declares_dtd(data))
            return None, [Issue("error", "structure" if mislabel else "security", where, refusal, "100")]
        if declares_dtd(data):
            return None, [Issue("error", "security", where,
                                "document declares a DTD or entities (<!DOCTYPE/<!ENTITY): refused unread; "
                                "CDA documents never need them and they are the vehicle of XXE and "
                                "entity-expansion attacks", "100")]
        mislabelled = _utf8_declared_latin(data) or _gb_declared_latin(data)
        if mislabelled:
            return None, [Issue("error", "structure", where, mislabelled, "100")]
        try:
            tree = etree.fromstring(_gb_as_gb18030(data), safe_parser()).getroottree()
        except etree.XMLSyntaxError as exc:
            line = f"line {exc.lineno}" if exc.lineno else "unknown line"
            reason = " ".join(str(exc.msg).split())[:120]  # (lxml's text may hold line breaks: one line)
            return None, [Issue("error", "structure", where, f"not well-formed XML ({line}): {reason}"
                                + _undeclared_gb(data, reason), "100")]
        except ValueError as exc:  # e.g. an encoding lxml does not know
            return None, [Issue("error", "structure", where,
                                f"document cannot be read as XML: {' '.join(str(exc).split())[:200]}", "100")]
        if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
            return None, [Issue("error", "security", where, "document carries a DTD: refused", "100")]
        return tree.getroot(), []

    # -- reading -------------------------------------------------------------------------

    def read(self, unit: RawUnit) -> SourceMessage:
        """Parse and extract one document; problems become issues, never exceptions."""
        msg = SourceMessage(format=self.format)
        msg.extra["label"] = f"document {unit.index}"
        root, issues, envelope = self._parse(unit.data)
        msg.issues.extend(issues)
        if envelope is not None:
            msg.extra["v3"] = envelope.as_extra()
            if envelope.message_id:
                msg.extra["label"] = f"{envelope.interaction or 'message'} {envelope.message_id}"
        if root is None:
            return msg
        doc_id = self.reader.value(root, self.header.get("document_id", "hl7:id/@extension"))
        if doc_id:
            msg.extra["label"] = f"文档流水号 {doc_id.value}"
        if not self._document_type(root, msg):
            return msg
        report = self._header(root, msg)
        if report is not None and not any(i.code in ("not-supported",) for i in msg.errors):
            self._body(root, msg, report)
        msg.issues = list(dict.fromkeys(msg.issues))
        return msg

    def _document_type(self, root: Any, msg: SourceMessage) -> bool:
        ns_main = self.ns.get("hl7", "urn:hl7-org:v3")
        expected = self.doc.get("root", "ClinicalDocument")
        qname = etree.QName(root)
        if qname.localname != expected or qname.namespace != ns_main:
            msg.issues.append(Issue("error", "not-supported", _path(root),
                                    f"root element is {shown(qname.localname)} in namespace "
                                    f"{shown(qname.namespace or '(none)')}; "
                                    f"expected a CDA {expected} in namespace {ns_main}", "200"))
            return False
        template = str(self.doc.get("template_id"))
        templates = [str(t) for t in self.reader.nodes(root, "hl7:templateId/@root")]
        known: dict[str, str] = {str(k): str(v) for k, v in self.doc.get("known_templates", {}).items()}
        if template not in templates:
            sent = ", ".join(f"{t} = {known[t]}" if t in known else shown(t) for t in templates[:5]) or "none"
            where = _path(self.reader.element(root, "hl7:templateId")) if templates else f"{_path(root)}/templateId"
            msg.issues.append(Issue("error", "not-supported", where,
                                    f"document template {sent} is not taken here; this channel takes "
                                    f"{known.get(template, template)}, templateId {template}", "200"))
            return False
        code = self.reader.value(root, "hl7:code/@code")
        system = self.reader.value(root, "hl7:code/@codeSystem")
        wrong_system = bool(system.value) and system.value != str(self.doc.get("code_system"))
        if code.value != str(self.doc.get("code")) or wrong_system:
            msg.issues.append(Issue("error", "not-supported", code.where or f"{_path(root)}/code/@code",
                                    f"document code {code.value or '(empty)'} does not match templateId {template}: "
                                    f"expected {self.doc.get('code')} in {self.doc.get('code_system')}", "200"))
            return False
        return True

    def _time(self, found: _Found, msg: SourceMessage, *, date_only: bool = False) -> str:
        if not found:
            return ""
        try:
            return to_fhir_date(found.value) if date_only else to_fhir_datetime(found.value, self.offset)
        except DateTimeError as exc:
            msg.issues.append(Issue("error", "value", found.where, str(exc), "102"))
            return ""

    def _header(self, root: Any, msg: SourceMessage) -> ReportFacts | None:
        h = self.header
        r = self.reader

        def get(key: str) -> _Found:
            return r.value(root, h[key]) if key in h else _Found("", "")

        for key, name in self.table.get("required", {}).items():
            found = get(key)
            if not found and not (key in h and r.element(root, h[key]) is not None):
                msg.issues.append(Issue("error", "required", found.where, f"{name} is missing", "101"))
        doc_id = get("document_id")
        msg.message_id = doc_id.value
        msg.version = get("version_number").value
        msg.message_type = f"{self.doc.get('code')}"
        sent = get("effective_time")
        msg.sent_at = self._time(sent, msg)

        report = ReportFacts(location=_path(root), number=get("report_number").value)
        report.placer_number = get("order_number").value
        report.key = f"cda|{doc_id.value}" if doc_id else ""
        if doc_id:
            report.other_ids.append((get("document_id_root").value or str(self.table.get("document_id_oid", "")),
                                     doc_id.value))
        if report.placer_number:  # 电子申请单编号: the order this report answers
            report.other_ids.append((str(h.get("order_number_oid", "2.16.156.10011.1.24")), report.placer_number))
        author_id, author_name = get("author_id"), get("author_name")
        if author_id or author_name:
            report.extra["author"] = {"id": author_id.value, "name": author_name.value,
                                      "system": get("author_id_root").value if author_id else ""}

        self._custodian(root, msg)
        self._patient(root, msg)
        report.issued_at = self._issued(root, msg, report)
        if msg.sent_at and "T" not in msg.sent_at:
            msg.sent_at = report.issued_at  # the Bundle's time needs a time of day

        interp_id, interp_name = get("interpreter_id"), get("interpreter_name")
        report.interpreter_id, report.interpreter_name = interp_id.value, interp_name.value
        reader = r.value(root, h.get("interpreter_org", _READING_ORG))  # 基层检查、上级诊断: who read it
        if reader and reader.value.strip().upper() not in ("", msg.extra.get("institution_id")):
            try:
                report.reading_org = check_uscc(reader.value.strip().upper())
            except IdentifierError as exc:
                msg.issues.append(Issue("error", "value", reader.where, f"reading institution: {exc.message}", "102"))

        related = get("related_type")
        report.status = "original"
        relations = [n for n in r.nodes(root, h.get("related_document", "hl7:relatedDocument"))
                     if isinstance(n, etree._Element)]
        if len(relations) > 1:  # (the replaced number was read from one, the 文档流水号 from the other)
            msg.issues.append(Issue("error", "structure", _path(relations[1]),
                                    f"the document has {len(relations)} relatedDocuments "
                                    f"({', '.join(_path(n) for n in relations)}): which report it corrects cannot be "
                                    "told; a correction replaces one document, send one relatedDocument", "100"))
            return report
        if related:
            allowed = [str(t) for t in self.table.get("related_types", ["RPLC"])]
            if related.value not in allowed:
                msg.issues.append(Issue("error", "not-supported", related.where,
                                        f"relatedDocument type {shown(related.value)} is not taken (taken: "
                                        f"{', '.join(allowed)}); send the complete corrected report as RPLC", "200"))
                return report
            report.status = related.value
            parent = self._parent_document(root)
            if related.value == "RPLC":
                if not parent:
                    msg.issues.append(Issue("error", "required", parent.where,
                                            "relatedDocument RPLC names no parentDocument id: the replaced report "
                                            "cannot be identified", "101"))
                elif parent.value == doc_id.value:
                    msg.issues.append(Issue("error", "value", parent.where,
                                            "the document replaces itself (parentDocument id = document id)", "102"))
                else:
                    # The correction names the report it corrects by its 检验报告单号 (a correction keeps the
                    # number of the report it replaces unless the parentDocument names another).
                    replaced_number = get("replaced_report_number")
                    report.replaces = replaced_number.value or report.number
                    report.replaces_system = ""
                    report.extra["replaced_document"] = ((parent.node.get("root") if parent.node is not None
                                                          else "") or str(self.table.get("document_id_oid", "")),
                                                         parent.value)
                    msg.issues.append(Issue("information", "informational", parent.where,
                                            f"corrects 检验报告单号 {report.replaces} (文档流水号 {parent.value}, "
                                            "relatedDocument RPLC)", "0"))
        return report

    def _parent_document(self, root: Any) -> _Found:
        """The replaced document's id (文档流水号): the first parentDocument id that is not a 检验报告单号."""
        xpath = self.header.get("replaced_document_id", "hl7:relatedDocument/hl7:parentDocument/hl7:id/@extension")
        number_oid = str(self.header.get("report_number_oid", "2.16.156.10011.1.33"))
        for node in self.reader.nodes(root, xpath):
            found = _Reader._found(node)
            if found and (found.node is None or found.node.get("root") != number_oid):
                return found
        return _Found("", _plain_join(_path(root), xpath))

    def _custodian(self, root: Any, msg: SourceMessage) -> None:
        ident = self.reader.value(root, self.header["custodian_id"])
        name = self.reader.value(root, self.header["custodian_name"])
        msg.sender = ident.value
        if not ident:
            return  # reported as a missing required part
        value = ident.value.strip().upper()
        if len(value) == 18:
            try:
                uscc = check_uscc(value)
            except IdentifierError as exc:
                msg.issues.append(Issue("error", "value", ident.where, f"custodian id: {exc.message}", "102"))
                return
            if self.member_uscc and uscc != self.member_uscc:
                # (this gateway signs what it stores as its member's: another member's report would be signed as
                # issued by that member, and refused by every verifier)
                msg.issues.append(Issue("error", "value", ident.where,
                                        f"custodian id {uscc} is another institution's 统一社会信用代码 than this "
                                        f"gateway's member, {self.member_uscc}: a report is taken only at its "
                                        "custodian's own gateway, which signs it; send it there", "102"))
                return
        elif value == self.member_miplrn or (len(value) >= 9 and value[:9] == self.member_uscc[8:17]):
            uscc = self.member_uscc
            msg.issues.append(Issue("information", "informational", ident.where,
                                    f"custodian id {shown(value)} is not a 统一社会信用代码; it names this member, whose "
                                    f"统一社会信用代码 {uscc} is used", "0"))
        else:
            msg.issues.append(Issue("error", "value", ident.where,
                                    f"custodian id {shown(value)} is neither a 统一社会信用代码 nor this member's "
                                    "organisation code or licence number: the issuing institution cannot be "
                                    "identified", "102"))
            return
        msg.extra.update(issuer_uscc=uscc, issuer_name=name.value, institution_id=value)

    def _patient(self, root: Any, msg: SourceMessage) -> None:
        h, r = self.header, self.reader
        node = r.element(root, h["patient"])
        p = PatientFacts(location=_path(node) if node is not None else f"{_path(root)}/recordTarget")
        msg.patient = p
        others = [n for n in r.nodes(root, h["patient"]) if isinstance(n, etree._Element)][1:]
        if others:  # (results given to the first patient would be another's)
            msg.issues.append(Issue("error", "structure", _path(others[0]),
                                    f"a document reports on one patient, and this one names {len(others) + 1} "
                                    f"({p.location}, {', '.join(_path(n) for n in others)}): its results cannot be "
                                    "given to either; send one document per patient", "100"))
        cards = [f for f in (r._found(n) for n in r.nodes(root, h["id_card"])) if f.value]
        first_card = unicodedata.normalize("NFKC", cards[0].value).strip().upper() if cards else ""
        differing = [f for f in cards[1:] if unicodedata.normalize("NFKC", f.value).strip().upper() != first_card]
        if differing and not others:
            msg.issues.append(Issue("error", "value", differing[0].where,
                                    f"the patient has {len(differing) + 1} different 身份证号 (here and at "
                                    f"{cards[0].where}): which is theirs cannot be told; send the document with one",
                                    "102"))
        card = r.value(root, h["id_card"])
        if card:
            try:
                p.id_card = check_id_card(card.value, on=message_date(msg.sent_at))
                msg.issues.extend(Issue("warning", "value", card.where, w, "102") for w in id_card_warnings(p.id_card))
            except IdentifierError as exc:
                msg.issues.append(Issue("error", "value", card.where, exc.message, "102"))
        else:
            msg.issues.append(Issue("warning", "required", card.where,
                                    "no 身份证号 (patient id @root 2.16.156.10011.1.3): the patient cannot be "
                                    "matched across institutions", "101"))
        for rule in self.table.get("patient_ids", []):
            other = r.value(root, rule["path"])
            if other:
                p.other_ids.append((str(rule.get("type", "MR")), other.value))
        p.name = r.value(root, h["name"]).value
        sex = r.value(root, h["sex"])
        p.sex, p.where["sex"] = sex.value, sex.where
        system = r.value(root, h.get("sex_system", "hl7:none"))
        expected = str(self.table.get("sex_code_system", ""))
        if sex and system and expected and system.value != expected:
            msg.issues.append(Issue("warning", "code-invalid", system.where,
                                    f"sex code system {system.value} is not GB/T 2261.1 ({expected}); "
                                    "the code is read as GB/T 2261.1", "103"))
        birth = r.value(root, h["birth_time"])
        p.birth_date = self._time(birth, msg, date_only=True)
        future = birth_date_problem(p.birth_date, message_date(msg.sent_at))
        if future:
            p.birth_date = ""
            msg.issues.append(Issue("error", "value", birth.where, future, "102"))

    def _issued(self, root: Any, msg: SourceMessage, report: ReportFacts) -> str:
        candidates = self.header.get("issued_at", [])
        first_date_only: _Found | None = None
        for xpath in candidates if isinstance(candidates, list) else [candidates]:
            found = self.reader.value(root, xpath)
            if not found:
                continue
            try:
                issued = to_fhir_instant(found.value, self.offset)
                report.where["issued"] = found.where
                if first_date_only is not None:  # (said: the report's own date gives way to another time)
                    msg.issues.append(Issue("warning", "value", first_date_only.where,
                                            f"report time {shown(first_date_only.value)} has no time of day: the "
                                            f"time at {found.where} ({issued}) is the report's issue time", "102"))
                return issued
            except DateTimeError as exc:
                if "no time of day" not in str(exc):
                    msg.issues.append(Issue("error", "value", found.where, str(exc), "102"))
                    return ""
                first_date_only = first_date_only or found
        if first_date_only is not None:
            # FHIR's instant needs a time of day, and the day is what is known: its first moment, said (as a CSV
            # export's date-only 报告日期 is read); it was left out, and the report then refused as having none
            try:
                day = f"{to_fhir_date(first_date_only.value)}T00:00:00{self.offset}"
            except DateTimeError as exc:
                msg.issues.append(Issue("error", "value", first_date_only.where, str(exc), "102"))
                return ""
            msg.issues.append(Issue("warning", "value", first_date_only.where,
                                    f"report time {shown(first_date_only.value)} has no time of day: read as the day's "
                                    f"first moment ({day})", "102"))
            report.where["issued"], report.issued_day_only = first_date_only.where, True
            return day
        return ""

    # -- body ----------------------------------------------------------------------------

    def _body(self, root: Any, msg: SourceMessage, report: ReportFacts) -> None:
        r = self.reader
        sections = self.table.get("sections", {})
        labs = [n for n in r.nodes(root, sections["lab"]) if isinstance(n, etree._Element)]
        if not labs:
            msg.issues.append(Issue("error", "required", _plain_join(_path(root), sections["lab"]),
                                    "no 实验室检查 section (LOINC 30954-2): the document carries no results", "101"))
            return
        lab = labs[0]
        spec = self.table.get("lab_section", {})
        category = next((found for found in (r.value(section, spec["category"]) for section in labs) if found), None)
        if category:
            report.code = Coded("", category.value)
        layout = _Layout(self.table.get("item", {}))
        items: list[Any] = []
        for section in labs:  # a document may split its results over several 实验室检查 sections: all are read
            found = layout.items(section, msg)
            if found is None:
                return  # refused: the layout is ambiguous (issues say where)
            items += found
        if not items:
            msg.issues.append(Issue("error", "required", f"{_path(lab)}/entry",
                                    "the 实验室检查 section has no 检验项目 (an observation coded DE04.30.019.00 "
                                    "检验项目代码): no results", "101"))
            return
        seen: dict[str, int] = {}
        specimen: SpecimenFacts | None = None
        for item in items:
            res, item_specimen = self._item(item, msg)
            if res is None:
                continue
            seen[res.code.code] = seen.get(res.code.code, 0) + 1
            res.occurrence = seen[res.code.code]
            report.results.append(res)
            if item_specimen is not None:
                if specimen is None:
                    specimen = item_specimen
                    report.where.update({k: res.where[k] for k in ("collected", "received") if k in res.where})
                elif item_specimen.type.display and item_specimen.type.display != specimen.type.display:
                    msg.issues.append(Issue("warning", "value", res.where.get("specimen", res.location),
                                            f"item specimen {shown(item_specimen.type.display)} differs from the "
                                            f"first item's {shown(specimen.type.display)}; the report names the "
                                            "first", "102"))
        warn_of_repeated_items(report.results, msg.issues)
        number = self.reader.value(root, self.header.get("specimen_number", "hl7:none"))
        if specimen is None and number:
            specimen = SpecimenFacts()
        if specimen is not None:
            specimen.number = number.value
            report.specimen = specimen
            report.collected_at = specimen.collected_at
        if not report.collected_at:
            msg.issues.append(Issue("warning", "required", _path(lab),
                                    "no specimen collection time (标本采样日期时间): validity windows cannot be "
                                    "counted; the test time is used as the report time", "101"))
            report.collected_at = next((res.observed_at for res in report.results if res.observed_at), "")
        self._diagnoses(root, report)
        self._report_section(root, report)
        msg.reports.append(report)

    def _item(self, item: _Item, msg: SourceMessage) -> tuple[ResultFacts | None, SpecimenFacts | None]:
        r = self.reader
        code_obs = item.code
        code_value = r.element(code_obs, "hl7:value")
        code = self._coded(code_value)
        if not code.code:
            loc = _path(code_value) if code_value is not None else f"{_path(code_obs)}/value"
            msg.issues.append(Issue("error", "required", loc, "检验项目代码 (local item code) is empty", "101"))
            return None, None
        name = r.value(item.parts["name"], "hl7:value") if "name" in item.parts else _Found("", "")
        if name and not code.display:
            code.display = name.value
        res = ResultFacts(location=_path(item.location), code=code)
        res.where["code"] = _path(code_value)
        translations: list[Coded] = getattr(code, "translations", [])
        if translations:  # read as HL7 v2 reads OBX-3's alternate triplet: a LOINC one first
            alternate = next((t for t in translations if t.system == _LOINC_OID), translations[0])
            msg.extra.setdefault("alternate_codes", {})[res.location] = alternate
        tested = self._time(r.value(code_obs, "hl7:effectiveTime/@value"), msg)
        specimen = self._specimen(item.parts.get("specimen"), msg, res)
        res.observed_at = (specimen.collected_at if specimen is not None else "") or tested
        state = r.value(item.parts["specimen_state"], "hl7:value") if "specimen_state" in item.parts else None
        if state:
            res.notes.append(f"标本状态：{state.value}")
        result_code = r.value(item.parts["result_code"], "hl7:value/@code") if "result_code" in item.parts else None
        if result_code:
            # The display says what the code means (senders disagree on the codes); the code when there is none.
            display = (result_code.node.get("displayName") or "").strip() if result_code.node is not None else ""
            res.flags.append(display or result_code.value)
            res.where["flags"] = result_code.where
        quantity = item.parts.get("quantity")
        if quantity is not None:
            unit = r.value(item.parts["unit"], "hl7:value") if "unit" in item.parts else None
            self._value(quantity, msg, res, unit)
        elif "unit" in item.parts:
            msg.issues.append(Issue("warning", "value", _path(item.parts["unit"]),
                                    "计量单位 (DE04.30.016.00) without a 检验定量结果 (DE04.30.015.00) for item "
                                    f"{shown(code.code)}: ignored", "102"))
        return res, specimen

    def _specimen(self, node: Any, msg: SourceMessage, res: ResultFacts) -> SpecimenFacts | None:
        r = self.reader
        if node is None:
            return None
        s = SpecimenFacts()
        value = r.element(node, "hl7:value")
        coded = self._coded(value)
        s.type = Coded(coded.code if coded.display else "", coded.display or coded.code)
        res.where["specimen"] = _path(node)
        low = r.value(node, "hl7:effectiveTime/hl7:low/@value")
        high = r.value(node, "hl7:effectiveTime/hl7:high/@value")
        s.collected_at, s.received_at = self._time(low, msg), self._time(high, msg)
        res.where["collected"], res.where["received"] = low.where, high.where
        return s if (s.type or s.collected_at or s.received_at) else None

    @staticmethod
    def _coded(value: Any) -> Coded:
        """A CD/CE value as (code, displayName, codeSystem) with its translations (the same meaning in other code
        systems; the first stands for the code when there is none: ``nullFlavor="OTH"``); an ST value as its
        text."""
        if value is None:
            return Coded()
        xsi = (value.get(_XSI_TYPE) or "").split(":")[-1].upper()
        if xsi in _CODED_TYPES or (value.get("code") is not None and not _text(value)):
            translations = [_code_of(t) for t in value if isinstance(t.tag, str) and _localname(t) == "translation"]
            translations = [t for t in translations if t.code]
            coded = _code_of(value)
            if not coded.code and translations:
                coded = translations.pop(0)
            return _TranslatedCode(coded.code, coded.display, coded.system, translations) if translations else coded
        return Coded(_text(value))

    def _value(self, obs: Any, msg: SourceMessage, res: ResultFacts, own_unit: _Found | None = None) -> None:
        """The 检验定量结果 ``obs``; ``own_unit``: a 计量单位 the item sent as a part of its own."""
        r = self.reader
        spec = self.table.get("item", {})
        values = [n for n in r.nodes(obs, "hl7:value") if isinstance(n, etree._Element)]
        if len(values) > 1:  # (the first was taken, the others dropped without a word)
            msg.issues.append(Issue("error", "structure", _path(values[1]),
                                    f"检验定量结果 has {len(values)} values ({', '.join(_path(v) for v in values)}) "
                                    "and nothing tells which is the result: send one", "100"))
            return
        value = values[0] if values else None
        unit = self._unit(obs, value, msg, own_unit)
        if value is not None:
            xsi = (value.get(_XSI_TYPE) or "").split(":")[-1].upper()
            res.where["value"] = _path(value)
            res.absent = _ABSENT.get((value.get("nullFlavor") or "").strip().upper(), "")
            empty = value.get("value") is None and value.get("code") is None and not len(value) and not _text(value)
            if res.absent and empty:
                pass  # a nullFlavor and nothing else, whatever the type: no value, for the reason it says
            elif xsi in _NUMERIC_TYPES or (not xsi and value.get("value") is not None):
                raw = (value.get("value") or "").strip()
                res.where["value"] = f"{_path(value)}/@value"
                if not raw and value.get("value") is None and _text(value):  # <value xsi:type="REAL">8.20</value>
                    raw = _text(value)
                    res.where["value"] = _path(value)
                    msg.issues.append(Issue("warning", "value", res.where["value"],
                                            f"检验定量结果 {shown(raw)} is written as the element's text: HL7 v3 "
                                            f"writes a {xsi or 'REAL'} in its value attribute; read all the same",
                                            "102"))
                if raw:
                    q = parse_number(raw)
                    if q is None:
                        msg.issues.append(Issue("error", "value", res.where["value"],
                                                f"{shown(raw)} {number_problem(raw)} for 检验定量结果 "
                                                f"({xsi or 'REAL'})", "102"))
                    else:
                        res.value_kind, res.value = "quantity", q
            elif xsi in _INTERVAL_TYPES:
                self._interval(value, msg, res, xsi)
            elif xsi in _CODED_TYPES or (not xsi and value.get("code") is not None):
                if not xsi:  # a code with no type said (a negative HBsAg was stored as "unknown")
                    msg.issues.append(Issue("warning", "value", res.where["value"],
                                            "检验定量结果 has a code but no xsi:type (or its xsi prefix is not "
                                            "http://www.w3.org/2001/XMLSchema-instance): read as the coded value "
                                            "(CD) its attributes say", "102"))
                coded = self._coded(value)
                if coded:
                    res.value_kind, res.value = "coded", coded
            elif xsi in _UNTAKEN_TYPES:  # (an ED's base64 was stored as text, a BL's value left out)
                msg.issues.append(Issue("error", "not-supported", res.where["value"],
                                        f"a 检验定量结果 of type {xsi} ({_UNTAKEN_TYPES[xsi]}) is not taken: send the "
                                        "result as a number (PQ, REAL), a code (CD) or text (ST)", "102"))
            elif xsi.startswith("RTO"):
                self._ratio(value, msg, res, xsi)
            elif xsi == "TS":
                raw = (value.get("value") or "").strip()
                if raw:  # (the same checks as the document's other times: 20241305 is no date)
                    res.where["value"] = f"{_path(value)}/@value"
                    res.value = self._time(_Found(raw, res.where["value"], value), msg)
                    res.value_kind = "datetime" if res.value else ""
            elif xsi not in _TEXT_TYPES:
                if not res.absent:  # (a type not known, with a nullFlavor: no value, for the reason it says)
                    msg.issues.append(Issue("error", "not-supported", res.where["value"],
                                            f"a 检验定量结果 of type {shown(xsi)} is not taken: its value cannot be "
                                            "carried as sent; send the result as a number (PQ, REAL, INT), an "
                                            "interval (IVL_PQ, IVL_INT), a ratio (RTO), a time (TS), a code (CD) or "
                                            "text (ST)", "102"))
            else:
                text = _text(value)
                q = parse_number(text) if text and unit and xsi in ("ST", "") else None
                if q is not None:  # 8.20 typed ST beside a 计量单位: a quantity, whose unit a string cannot carry
                    res.value_kind, res.value = "quantity", q
                    msg.issues.append(Issue("warning", "value", res.where["value"],
                                            f"检验定量结果 {shown(text)} is written as {'an ST' if xsi else 'untyped'} "
                                            f"text with the unit {shown(unit.value)}: read as a quantity in that unit "
                                            "(HL7 v3 writes it as a PQ)", "102"))
                elif text:
                    res.value_kind, res.value = "string", text
                    if unit:
                        msg.issues.append(Issue("warning", "value", unit.where,
                                                f"unit {shown(unit.value)} is left out: the 检验定量结果 {shown(text)} "
                                                "is text, which carries no unit", "102"))
                        unit = _Found("", "")
            if unit and res.value_kind in ("ratio", "datetime"):
                msg.issues.append(Issue("warning", "value", unit.where,
                                        f"unit {shown(unit.value)} is left out: the 检验定量结果 is a "
                                        f"{'ratio of numbers' if res.value_kind == 'ratio' else 'time'} ({xsi}), "
                                        "which carries no unit", "102"))
                unit = _Found("", "")
        if unit:
            res.unit, res.where["unit"] = unit.value, unit.where
        if "reference_range" in spec:
            rng = r.element(obs, spec["reference_range"])
            if rng is not None:
                res.reference_range = self._range(rng, res.unit, msg)
                res.where["reference_range"] = _path(rng)
        if "interpretation" in spec:
            flag = r.value(obs, spec["interpretation"])
            if flag:
                res.flags.append(flag.value)
                res.where.setdefault("flags", flag.where)

    def _interval(self, value: Any, msg: SourceMessage, res: ResultFacts, xsi: str = "IVL_PQ") -> None:
        """An IVL_PQ (IVL_INT, IVL_REAL: the same without a unit) 检验定量结果: one bound is a quantity with a
        comparator (``<high value="0.05" inclusive="false"/>`` is "<0.05", as HL7 v2 SN ``<^0.05``); both bounds are
        a range."""
        bounds: dict[str, tuple[Any, Any]] = {}
        for el in value:
            name = _localname(el) if isinstance(el.tag, str) else ""
            if name in ("center", "width"):
                msg.issues.append(Issue("error", "not-supported", _path(el),
                                        f"an {xsi} 检验定量结果 given by its {name} is not taken: send low and/or "
                                        "high", "102"))
                return
            if name not in ("low", "high") or name in bounds or el.get("value") is None:
                continue
            raw = (el.get("value") or "").strip()
            q = parse_number(raw)
            if q is None or q.comparator:
                problem = "is not a plain number (the bound itself says < or >)" if q else number_problem(raw)
                msg.issues.append(Issue("error", "value", f"{_path(el)}/@value",
                                        f"{shown(raw)} {problem} for 检验定量结果 ({xsi} {name})", "102"))
                return
            bounds[name] = (q, el)
        if not bounds:
            msg.issues.append(Issue("error", "value", _path(value),
                                    f"{xsi} 检验定量结果 has neither a low nor a high value", "102"))
            return
        if len(bounds) == 2:
            (low, low_el), (high, high_el) = bounds["low"], bounds["high"]
            open_ends = [el for el in (low_el, high_el) if (el.get("inclusive") or "").strip() == "false"]
            if open_ends:
                msg.issues.append(Issue("error", "value", f"{_path(open_ends[0])}/@inclusive",
                                        f"an {xsi} 检验定量结果 with both bounds and an excluded one cannot be "
                                        "carried (a FHIR Range includes its bounds)", "102"))
                return
            if low.value > high.value:
                msg.issues.append(Issue("error", "value", _path(value),
                                        f"{xsi} 检验定量结果 low {low.value} is above high {high.value}", "102"))
                return
            res.value_kind, res.value = "range", (low, high)
            res.where["value"] = _path(value)
            return
        [(name, (q, el))] = bounds.items()
        inclusive = (el.get("inclusive") or "true").strip() != "false"
        q.comparator = ("<=" if inclusive else "<") if name == "high" else (">=" if inclusive else ">")
        res.value_kind, res.value = "quantity", q
        res.where["value"] = f"{_path(el)}/@value"

    def _ratio(self, value: Any, msg: SourceMessage, res: ResultFacts, xsi: str) -> None:
        """An RTO (RTO_INT_INT, RTO_PQ_PQ, ...) 检验定量结果, such as a titre 1:320: a ratio of two numbers, as HL7 v2
        SN ``^1^:^320``. Its parts are plain numbers: a part with a unit (``<numerator value="1" unit="mg"/>``) is
        refused naming it, as a FHIR ratio of this gateway carries numbers only (the unit "1" is no unit)."""
        parts: list[Quantity] = []
        for name in ("numerator", "denominator"):
            el = next((c for c in value if isinstance(c.tag, str) and _localname(c) == name), None)
            if el is None:
                msg.issues.append(Issue("error", "value", _path(value),
                                        f"ratio 检验定量结果 ({xsi}) has no {name}: send both parts", "102"))
                return
            raw = (el.get("value") or "").strip()
            q = parse_number(raw) if raw else None
            if q is None or q.comparator:
                problem = ("has no value" if not raw else "is not a plain number (it says < or >)" if q else
                           f"{shown(raw)} {number_problem(raw)}")
                msg.issues.append(Issue("error", "value", f"{_path(el)}/@value",
                                        f"the {name} of the ratio 检验定量结果 ({xsi}) {problem}", "102"))
                return
            unit = (el.get("unit") or "").strip()
            if unit not in ("", "1"):
                msg.issues.append(Issue("error", "not-supported", f"{_path(el)}/@unit",
                                        f"the {name} of the ratio 检验定量结果 ({xsi}) has the unit {shown(unit)}, "
                                        "which cannot be carried (a ratio is carried as two numbers): send the "
                                        "ratio of numbers (RTO_INT_INT), or the result as a PQ in its unit", "102"))
                return
            if name == "denominator" and q.value == 0:
                msg.issues.append(Issue("error", "value", f"{_path(el)}/@value",
                                        f"the denominator of the ratio 检验定量结果 ({xsi}) is zero", "102"))
                return
            parts.append(q)
        res.value_kind, res.value = "ratio", (parts[0], parts[1])

    def _unit(self, obs: Any, value: Any, msg: SourceMessage, own_unit: _Found | None) -> _Found:
        """The unit of the 检验定量结果 ``obs``, wherever the sender put it: the ``unit`` of its PQ value, a
        计量单位 nested in it, a 计量单位 entry of the item (``own_unit``). When two of them disagree the
        document is refused, naming both by XPath: one wrong unit makes a different result."""
        spec = self.table.get("item", {})
        places: list[tuple[_Found, str]] = []
        xsi = (value.get(_XSI_TYPE) or "").split(":")[-1].upper() if value is not None else ""
        # a PQ's unit; and the unit of a value whose type was left out (or its xsi prefix bound to another namespace,
        # so that no type is found): its number was read, and its unit dropped without a word
        if value is not None and xsi in ("PQ", "IVL_PQ", ""):
            for el in [value, *value]:  # a PQ, or the bounds of an IVL_PQ
                if isinstance(el.tag, str) and (el.get("unit") or "").strip():
                    places.append((_Found(el.get("unit").strip(), f"{_path(el)}/@unit"), "of the 检验定量结果 value"))
        nested = self.reader.value(obs, spec["unit"]) if "unit" in spec else _Found("", "")
        if nested:
            places.append((nested, "of the 计量单位 inside the 检验定量结果"))
        if own_unit:
            places.append((own_unit, "of the item's 计量单位 entry"))
        if len(places) > 1:  # unit="1" is the PQ's default (no unit given), not a claim against a 计量单位
            places = [p for p in places if p[1] != "of the 检验定量结果 value" or p[0].value != "1"] or places
        if not places:
            return _Found("", "")
        first, what = places[0]
        for other, _ in places[1:]:
            if _unit_key(other.value) != _unit_key(first.value):
                msg.issues.append(Issue("error", "value", other.where,
                                        f"计量单位 {shown(other.value)} contradicts the unit {shown(first.value)} "
                                        f"{what} at {first.where}: the unit of the value is ambiguous", "102"))
                break
        # a 计量单位 entry names the unit as the standard has it; the PQ attribute is read when it is all there is
        return next((f for f, w in places if w != "of the 检验定量结果 value"), first)

    def _range(self, rng: Any, unit: str, msg: SourceMessage) -> str:
        """A reference range as text (``3.9-6.1``, ``≥3.9``, ``<5``); bounds in another unit than the result's keep
        their unit in the text (``70-110 mg/dL``), which is then not read as the result's low and high. A ``text``
        beside IVL_PQ bounds is kept when the two agree; when they do not, the bounds are kept (they are what a
        machine reads: the low and high of the range) and the sender is told, naming both."""
        text = self.reader.value(rng, "hl7:text")
        bounds = self._bounds(rng, unit)
        if not text or not bounds:
            return text.value or bounds
        read = parse_reference_range(text.value)
        if read != (None, None) and read == parse_reference_range(bounds):
            return text.value
        kept, left = (bounds, text.value) if parse_reference_range(bounds) != (None, None) else (text.value, bounds)
        msg.issues.append(Issue("warning", "value", _path(rng),
                                f"reference range {shown(text.value)} (its text) disagrees with its bounds "
                                f"{shown(bounds)} (its IVL_PQ value): {shown(kept)} is kept, {shown(left)} left out",
                                "102"))
        return kept

    def _bounds(self, rng: Any, unit: str) -> str:
        """The IVL_PQ bounds of a reference range as text: ``3.9-6.1``; one bound says whether it is included
        (HL7 v3 bounds are, unless ``inclusive="false"``): ``≥3.9``, ``>3.9``, ``≤6.1``, ``<6.1``."""
        found = {b: self.reader.element(rng, f"hl7:value/hl7:{b}[@value]") for b in ("low", "high")}
        ends = {b: el for b, el in found.items() if el is not None and (el.get("value") or "").strip()}
        units = {(el.get("unit") or "").strip() for el in ends.values()} - {""}
        own = next(iter(units)) if len(units) == 1 else ""
        suffix = f" {' '.join(sorted(units))}" if units and (len(units) > 1 or _unit_key(own) != _unit_key(unit)) \
            else ""
        signs = {"low": ("≥", ">"), "high": ("≤", "<")}
        said = {b: (signs[b][(el.get("inclusive") or "").strip() == "false"], el.get("value", "").strip())
                for b, el in ends.items()}
        if len(said) == 2 and said["low"][0] == "≥" and said["high"][0] == "≤":
            return f"{said['low'][1]}-{said['high'][1]}{suffix}"
        return ", ".join(f"{sign}{value}" for sign, value in said.values()) + (suffix if said else "")

    def _sections(self, root: Any, name: str) -> list[Any]:
        """Every section of kind ``name`` (a document may split one kind over several sections)."""
        xpath = self.table.get("sections", {}).get(name)
        return [n for n in self.reader.nodes(root, xpath) if isinstance(n, etree._Element)] if xpath else []

    def _diagnoses(self, root: Any, report: ReportFacts) -> None:
        for section in self._sections(root, "diagnosis"):
            for value in self.reader.nodes(section, self.table["diagnosis"]["entries"]):
                coded = self._coded(value)
                if coded:
                    report.conclusion_codes.append(coded)

    def _report_section(self, root: Any, report: ReportFacts) -> None:
        """The conclusion: every 检验报告结果 (joined), then the 检验报告备注 if any (a remark such as 标本溶血 bears on
        the results); else the diagnoses."""
        spec = self.table.get("report_section", {})
        results: list[str] = []
        remarks: list[str] = []
        for section in self._sections(root, "report"):
            for wanted, out in (("result", results), ("remark", remarks)):
                for node in self.reader.nodes(section, spec[wanted]) if spec.get(wanted) else []:
                    text = self.reader._found(node).value
                    if text and text not in out:
                        out.append(text)
        report.conclusion = "；".join(results)
        if not report.conclusion and report.conclusion_codes:
            report.conclusion = "；".join(c.display or c.code for c in report.conclusion_codes)
        if remarks:
            report.conclusion = "。".join(filter(None, (report.conclusion.rstrip("。"), "备注：" + "；".join(remarks))))


# -- profile problems by XPath -----------------------------------------------------------------


def explain_issues(msg: SourceMessage, bundle: dict[str, Any], issues: list[Issue], table: dict[str, Any],
                   structure: dict[str, Any]) -> list[Issue]:
    """Problems the profile check found on the converted report, located by XPath for the CDA sender.

    ``table`` is ``mappings/cda/fhir-xpaths.yaml``, ``structure`` the document's structure table. Each
    problem located at ``Bundle.entry[n].resource...`` is traced to the record (item, patient, report) the
    resource was built from, and its element to where in the document it was read: ``/ClinicalDocument/
    recordTarget/patientRole/patient/administrativeGenderCode/@code and .../id[@root='2.16.156.10011.1.3']/
    @extension do not give a sex agreeing with digit 17 of the 身份证号``. A problem that cannot be traced is
    located at the document (or the record it came from) with its FHIR path cut out of the text; the FHIR
    path is kept in ``extra["fhir_path"]``, never in the answer.
    """
    root = msg.reports[0].location if msg.reports else "/ClinicalDocument"

    def places_of(rule: dict[str, Any], kind: str, record: Any, report: ReportFacts | None) -> list[str]:
        report = report if report is not None else (msg.reports[0] if msg.reports else None)
        return _xpaths_of([str(p) for p in rule["places"]], kind, record, report, root, structure)

    return trace(msg, bundle, issues, table, places_of, untraced="no part of the document is mapped to",
                 default_where=root)


def _xpaths_of(places: list[str], kind: str, record: Any, report: ReportFacts | None, root: str,
               structure: dict[str, Any]) -> list[str]:
    """XPaths of ``places`` (``header.KEY``, ``section.KEY``, ``result.FACT``) for the record a resource came
    from."""
    out: list[str] = []
    header: dict[str, Any] = structure.get("header", {})
    for place in places:
        scope, _, key = place.partition(".")
        if scope in ("header", "section"):
            paths = (header if scope == "header" else structure.get("sections", {})).get(key)
            first = paths[0] if isinstance(paths, list) and paths else paths
            patient = getattr(record, "where", {}) if kind == "Patient" else {}
            if key in patient:  # where the fact was actually read
                out.append(str(patient[key]))
            elif isinstance(first, str) and first:
                out.append(_plain_join(root, first))
        elif scope == "result":
            results = [record] if kind == "Observation" else (report.results[:2] if report is not None else [])
            for res in results:
                found = res.where.get(key)
                if found:
                    out.append(str(found))
                elif kind == "Observation":
                    out.append(str(res.location))
    return list(dict.fromkeys(out))
