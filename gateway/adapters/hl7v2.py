"""HL7 v2 adapter: ORU^R01 lab results in, neutral records out, ACKs back.

Syntax only, driven by ``mappings/hl7v2/ORU_R01.yaml``: which versions and
message types are taken, how MSH-18 names character sets, which messages are
QC/calibration and filtered, and where each fact sits. Parsing uses
python-hl7; components, repetitions and escapes are split from each field's
text so that a field is read the same way in every version.

Every problem becomes an :class:`~gateway.errors.Issue` located as the ACK
needs it (``OBX[3]-5``: the third OBX segment of the message, field 5), and
the message is never half-read: one error refuses the whole message.
"""
from __future__ import annotations

import codecs
import datetime as _dt
import functools
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import hl7
import hl7.containers
import hl7.util
from hl7.util import unescape as _hl7_unescape

from gateway.adapters.base import (
    COMPARATORS,
    MAX_TEXT_BYTES,
    Coded,
    PatientFacts,
    RawUnit,
    ReportFacts,
    ResultFacts,
    SourceMessage,
    SpecimenFacts,
    gbk_run,
    number_problem,
    parse_number,
    text_too_long,
)
from gateway.datetimes import DateTimeError, to_fhir_date, to_fhir_instant
from gateway.datetimes import to_fhir_datetime as _to_fhir_datetime
from gateway.adapters.tracing import joined, trace
from gateway.errors import IdentifierError, Issue, shown
from gateway.identifiers import birth_date_problem, check_id_card, check_uscc, id_card_warnings, message_date

__all__ = ["HL7v2Adapter", "split_messages", "split_er7", "ack_code_for", "build_ack", "explain_issues"]

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
# 0x1C ends an MLLP frame only as framing: followed by CR (0x0B ... 0x1C 0x0D), by the next frame's 0x0B, or
# by nothing but white space to the end; anywhere else it is a byte of the message (and refused there).
_FRAME_END = re.compile(rb"\x1c(?=[\x0b\x0d]|\s*\Z)")
# Characters no HL7 field may carry into a report (FHIR strings forbid them): below 0x20 but tab, CR and LF.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MSG_START = re.compile(rb"(?:^|\r)(?:\xef\xbb\xbf)?(?=MSH[^\r]{4})")  # (a byte order mark before it is dropped)
_UNIT_ENDS = frozenset({"MSH", "FHS", "BHS", "BTS", "FTS"})  # segments no single message holds
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}\Z")
_INDENTED = re.compile(r"\r[ \t]+")
_ID_LIKE = re.compile(r"^(\d{17}[\dXx]|\d{15})$")
_CJK = re.compile(r"[\u3400-\u9fff]")
#: Whether this is the compiled twin of this module (gateway.native): it lets a TypeError through where this module
#: turns errors into a refusal, since a type check mypyc adds must send the message to the plain module instead.
_TWIN = __name__.startswith("gateway._native.")

# python-hl7 logs every escape sequence it cannot read (keeping it as text), with the field's text, i.e. patient
# data, under loggers named by its file paths: the gateway's log never takes those lines
for _module in (hl7.util, hl7.containers):
    logging.getLogger(_module.__file__).setLevel(logging.CRITICAL + 1)


@functools.lru_cache(maxsize=4096)
def _datetime_or_error(text: str, offset: str) -> tuple[str, str | None]:
    try:
        return _to_fhir_datetime(text, offset), None
    except DateTimeError as exc:
        return "", str(exc)


def to_fhir_datetime(text: str, default_offset: str = "+08:00") -> str:
    """:func:`gateway.datetimes.to_fhir_datetime`, remembered: a pure function of its arguments.

    :raises DateTimeError: as the original does (a new exception each time).
    """
    value, error = _datetime_or_error(text, default_offset)
    if error is not None:
        raise DateTimeError(error)
    return value


def split_messages(data: bytes) -> list[bytes]:
    """Cut a file or stream into single ER7 messages.

    Takes MLLP-framed data (``0x0B ... 0x1C 0x0D``) as well as plain files with
    ``\\r``, ``\\n`` or ``\\r\\n`` between segments and messages one after
    another. Segment separators come back as ``\\r``. Neither GBK nor UTF-8
    multi-byte characters contain the bytes 0x0A, 0x0B, 0x0D or 0x1C, so this
    is safe before decoding.

    A message ends at 0x1C as the MLLP listener ends a frame: 0x1C followed by
    0x0D, by the next frame's 0x0B, or by the end of the data. A 0x1C anywhere
    else stays in its message, which is then refused naming the field that holds it.
    """
    framing = SB + CR + b"\n\r \t"
    if SB in data or EB in data:
        chunks = [c.strip(framing).removeprefix(_BOM).strip(framing) for c in _FRAME_END.split(data)]
    else:
        chunks = [data.removeprefix(_BOM)]
    messages: list[bytes] = []
    for chunk in chunks:
        if not chunk.strip():
            continue
        text = chunk.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        parts = [_unwrapped(p.strip(b"\r \t")) for p in _MSG_START.split(text)]
        messages.extend(p for p in parts if p)
    return messages


def _unwrapped(part: bytes) -> bytes:
    """A message without the segments of a batch around it (FHS, BHS before it; BTS, FTS after it): a file of
    batches is read as the messages it holds."""
    if not any(name in part for name in _ENVELOPE):
        return part
    kept = [seg for seg in part.split(b"\r") if not (seg[:3] in _ENVELOPE and not seg[3:4].isalnum())]
    return b"\r".join(kept).strip(b"\r \t")


_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")  # a batch's header and trailer segments
_BOM = codecs.BOM_UTF8  # a UTF-8 byte order mark some editors and senders put first


#: Codecs that decode any byte (ISO 8859-1 and its like): a message in another character set still decodes, as
#: nonsense, so what decoded is looked at (:func:`_check_single_byte`).
_SINGLE_BYTE = {"latin-1": True, "latin1": True, "iso-8859-1": True, "iso8859-1": True, "iso8859_1": True,
                "8859-1": True}


def _check_single_byte(data: bytes, text: str, codec: str) -> None:
    """Whether a message decoded with a single-byte character set is likely to be in it.

    :raises UnicodeDecodeError: its bytes past ASCII are UTF-8 (a UTF-8 message under a wrong MSH-18), or a run of
        them reads in GBK as two Chinese characters or more in a row (ISO 8859-1 text has its accented letters
        alone or in pairs between ASCII ones; a GBK name or item is a run of them). A single Chinese character in
        GBK, or text in Windows-1252 under an ISO 8859-1 MSH-18, is not told apart.
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        raise UnicodeDecodeError(codec, data, 0, 1, "the message is UTF-8 (its bytes past ASCII read as UTF-8 "
                                                    "characters): declare UNICODE UTF-8 in MSH-18")
    found = gbk_run(data)
    if found:  # (the text itself is not quoted: it is a patient's name as often as not)
        start, end = found
        raise UnicodeDecodeError(codec, data, start, end, f"the message holds bytes {start} to {end - 1} that read as "
                                 "Chinese text in GBK: declare the character set the LIS sends")


def _common_hanzi() -> frozenset[str]:
    """The 3,755 characters of GB 2312 level 1 (the commonest in Chinese text: names, items, units)."""
    found = set()
    for lead in range(0xB0, 0xD8):
        for trail in range(0xA1, 0xFF):
            try:
                found.add(bytes((lead, trail)).decode("gb2312"))
            except UnicodeDecodeError:
                continue
    return frozenset(found)


_COMMON_HANZI = _common_hanzi()
#: Characters past ASCII a laboratory's message holds in practice: Chinese, its punctuation and full-width forms,
#: the signs of units and flags (° ± ² ³ µ × ℃ ↑ ↓ Ⅰ ①), a few Greek letters (γ-GT, β2-MG).
_PLAUSIBLE = re.compile("[\u00b0-\u00b7\u00d7\u00f7\u03b1-\u03c9\u2010-\u206f\u2100-\u21ff\u2460-\u24ff"
                        "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]")


def _strangeness(text: str) -> tuple[int, int]:
    """How unlike a Chinese laboratory's message ``text`` reads: (characters past ASCII no such message holds,
    Chinese characters outside the commonest 3,755). GBK bytes read as UTF-8 give Armenian, Greek or Cyrillic
    letters (郑伟 reads ``֣ ΰ``) or rare characters; UTF-8 bytes read as GBK give rare characters."""
    odd = rare = 0
    for ch in text:
        if ch < "\x80":
            continue
        if not _PLAUSIBLE.match(ch):
            odd += 1
        elif "\u3400" <= ch and ch not in _COMMON_HANZI and ("\u3400" <= ch <= "\u9fff" or ch >= "\uf900") \
                and not "\uff00" <= ch <= "\uffef":
            rare += 1
    return odd, rare


def ack_code_for(msg: SourceMessage) -> str:
    """AA, AE or AR for a read (and mapped) message.

    AR (reject) when the message could not be taken at all — unreadable,
    unsupported type or version, too large; AE (error) when it was understood
    but a field is wrong; AA otherwise (filtered QC messages included).
    """
    errors = msg.errors
    if not errors:
        return "AA"
    if any(e.code in ("not-supported", "structure", "too-long") for e in errors):
        return "AR"
    return "AE"


def _plain(value: str, limit: int = 60) -> str:
    """A short value as it is; a long one cut, saying how long it was (an answer never echoes it whole)."""
    return value if len(value) <= limit else f"{value[:limit]}… ({len(value)} characters)"


def _escape(text: str, seps: dict[str, str]) -> str:
    esc = seps["escape"]
    out = text.replace(esc, f"{esc}E{esc}")
    for key, letter in (("field", "F"), ("component", "S"), ("repetition", "R"), ("subcomponent", "T")):
        out = out.replace(seps[key], f"{esc}{letter}{esc}")
    out = out.replace("\r", " ").replace("\n", " ")
    return out if out.isprintable() else _hex_escaped(out, esc)


def _hex_escaped(text: str, esc: str = "\\") -> str:
    """Control characters as HL7 hex escapes (``\\X00\\``): an answer never carries them raw."""
    return _CONTROL.sub(lambda m: f"{esc}X{ord(m.group()):02X}{esc}", text)


def _echo(raw: str, limit: int) -> str:
    """A field of the message as an answer echoes it: cut to ``limit``, control characters hex-escaped."""
    raw = raw[:limit]
    return raw if raw.isprintable() else _hex_escaped(raw)


#: The longest MSH-10 taken (ST, 199 characters in v2.5 and later); an ACK echoes it in MSA-2.
_MAX_CONTROL_ID = 199
#: The longest sender application or facility an ACK echoes (HD).
_MAX_ECHO = 227
_DEFAULT_SEPS = {"field": "|", "component": "^", "repetition": "~", "escape": "\\", "subcomponent": "&"}


def build_ack(
    msg: SourceMessage,
    code: str,
    *,
    application: str,
    facility: str,
    now: _dt.datetime,
    control_id: str | None = None,
    max_errors: int = 50,
    note: str | None = None,
) -> str:
    """The ACK for ``msg`` as ER7 text (segments separated by ``\\r``).

    ``note`` replaces the MSA-3 text (a receipt says what happens next).

    ERR segments name each issue's segment, sequence and field in the form the
    message's own version expects: ERR-1 (ELD) for v2.3.1/2.4, ERR-2/3/4/8 for
    v2.5 and later. Warnings are sent as ERR segments with severity W in 2.5+;
    earlier versions have no severity, so an AA's MSA-3 says how many warnings
    there were and the first of them.
    """
    h = msg.header
    seps = _DEFAULT_SEPS
    version = msg.version or h.get("version") or "2.5.1"
    old = version.startswith("2.3") or version.startswith("2.4")
    trigger = _echo(h.get("trigger") or "R01", 3)
    msg_type = f"ACK^{trigger}" if version.startswith("2.3") else f"ACK^{trigger}^ACK"
    ts = now.strftime("%Y%m%d%H%M%S") + now.strftime("%z")
    ctrl = control_id or uuid.uuid4().hex[:20]
    msh = [
        "MSH", "^~\\&", _escape(application, seps), _escape(facility, seps),
        _echo(h.get("sending_application", ""), _MAX_ECHO), _echo(h.get("sending_facility", ""), _MAX_ECHO), ts, "",
        msg_type, ctrl, _echo(h.get("processing_id") or "P", 3), _echo(version, 60),
    ]
    if h.get("charset_field") and len(h["charset_field"]) <= 60 and h["charset_field"].isprintable():
        msh += ["", "", "", "", "", h["charset_field"]]
    errors = [i for i in msg.issues if i.severity == "error"]
    warned = [i for i in msg.issues if i.severity == "warning"]
    warnings = warned if not old else []
    if note is not None:
        text = note
    elif code == "AA" and msg.filtered:
        text = f"filtered: {msg.filtered}"
    elif code == "AA" and old and warned:
        # v2.3.1/2.4 have no ERR severity (an ERR there reads as an error): the text says there were warnings,
        # and the first of them, as far as MSA-3's 80 characters go
        text = f"accepted, {len(warned)} warning{'s' if len(warned) > 1 else ''}: {warned[0].line()}"
        if len(text) > 80:
            text = text[:77].rstrip() + "..."  # (said to go on)
    elif code == "AA":
        text = "accepted"
    else:
        text = errors[0].line() if errors else "rejected"
    msa = ["MSA", code, _escape(msg.message_id[:_MAX_CONTROL_ID], seps), _escape(text[:80], seps)]
    segments = ["|".join(msh), "|".join(msa)]
    for issue in (errors + warnings)[:max_errors]:
        seg, seq, fld = _erl(issue)
        hl7_code = issue.hl7_error or "207"
        err_text = _TABLE_0357.get(hl7_code, "Application internal error")
        if old:
            eld = f"{seg}^{seq}^{fld}^{hl7_code}&{err_text}&HL70357"
            segments.append(f"ERR|{eld}")
        else:
            erl = f"{seg}^{seq}^{fld}".rstrip("^") if seg else ""
            severity = {"error": "E", "warning": "W"}.get(issue.severity, "I")
            segments.append(
                "|".join(["ERR", "", erl, f"{hl7_code}^{err_text}^HL70357", severity, "", "", "",
                          _escape(issue.line(), seps)])
            )
    return "\r".join(segments) + "\r"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) if x.isdigit() else 0 for x in version.split("."))


_TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "205": "Duplicate key identifier",
    "207": "Application internal error",
}
_LOC = re.compile(r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<seq>\d+)\])?(?:-(?P<fld>\d+))?")


def _erl(issue: Issue) -> tuple[str, str, str]:
    m = _LOC.match(issue.location or "")
    if not m:
        return "", "", ""
    if not m.group("fld") and issue.extra.get("erl"):
        # a segment that is missing (an OBR group without OBX): the field it should have brought, no sequence
        seg, _, fld = str(issue.extra["erl"]).partition("-")
        return seg, "", fld
    return m.group("seg"), m.group("seq") or "1", m.group("fld") or ""


class _Escaping:
    """What python-hl7's ``unescape`` reads from a message: its escape character and separators."""

    __slots__ = ("esc", "separators")

    def __init__(self, esc: str, separators: str) -> None:
        self.esc = esc
        self.separators = separators


_SPECIAL_FIRST = ("MSH", "BHS", "FHS")


def split_er7(text: str) -> tuple[list[list[str]], str, str]:
    """Segments and fields of one ER7 message, exactly as python-hl7 reads them.

    Returns ``(segments, separators, esc)``: each segment a list of field texts
    with the segment name first (for MSH: name, MSH-1, MSH-2, MSH-3, ...), i.e.
    ``str(seg[n])`` for every field of ``hl7.parse(text)``; ``separators`` and
    ``esc`` as python-hl7 derives them from MSH-1/MSH-2 (``"\\r|~^&"``, ``"\\"``).
    Components, repetitions and escapes are split later, field by field, and only
    for the fields read, which is what makes this faster than building
    python-hl7's containers for every field. python-hl7 stays the reference:
    ``tests/test_fastpath_er7.py`` checks both agree on every sample and on
    generated variants.

    :raises ValueError: the text does not start with an MSH/BHS/FHS segment
        (python-hl7 refuses it too); the adapter then reads it with python-hl7.
    """
    strmsg = text.strip()
    if strmsg[:3] not in _SPECIAL_FIRST or len(strmsg) < 4:
        raise ValueError("not an ER7 message")
    # create_parse_plan: separators from MSH-1/MSH-2 (defaults for the ones not given)
    sep0 = strmsg[3]
    seps = strmsg[3:strmsg.find(sep0, 4)]
    field_sep = seps[0]
    rep = seps[2] if len(seps) > 2 else "~"
    comp = seps[1] if len(seps) > 1 else "^"
    sub = seps[4] if len(seps) > 4 else "&"
    esc = seps[3] if len(seps) > 3 else "\\"
    separators = "\r" + field_sep + rep + comp + sub
    segments: list[list[str]] = []
    for seg in strmsg.split("\r"):
        if seg[:3] in _SPECIAL_FIRST and (field_sep in seg or rep in seg or comp in seg or sub in seg):
            # python-hl7 takes MSH-1 and MSH-2 of any MSH/BHS/FHS segment from the segment itself
            own = seg[3]
            end = seg.find(own, 4)
            fields = [seg[:3], own, seg[4:end]]
            rest = seg[end + 1:]
            if rest:
                fields += rest.split(field_sep)
            segments.append(fields)
        else:
            segments.append(seg.split(field_sep))
    return segments, separators, esc


class _Msg:
    """Field access over one parsed message: locators, components, escapes."""

    def __init__(self, segments: list[list[str]], separators: str, esc: str) -> None:
        # separators: "\r|~^&": segment, field, repetition, component, subcomponent
        self.seps = {"field": separators[1], "repetition": separators[2], "component": separators[3],
                     "subcomponent": separators[4], "escape": esc}
        self._esc = esc
        self._rep, self._comp, self._sub = separators[2], separators[3], separators[4]
        self._escaping = _Escaping(esc, separators)
        self.codec = "utf-8"  # the message's character set (\X escapes are bytes in it): set by the reader
        self.undecoded: list[str] = []  # \X escapes whose bytes are no text in it (kept as written)
        self.segments = segments
        self.names: list[str] = [seg[0] for seg in segments]
        self.counts: dict[int, int] = {}
        self.bases: list[str] = []
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            seen[name] = seen.get(name, 0) + 1
            self.counts[i] = seen[name]
            self.bases.append(f"{name}[{seen[name]}]")

    @classmethod
    def from_hl7(cls, parsed: hl7.Message) -> "_Msg":
        """From python-hl7's parse (the reference reading): every field as python-hl7 prints it."""
        return cls([[str(f) for f in seg] for seg in parsed], parsed.separators, parsed.esc)

    @classmethod
    def from_text(cls, text: str) -> "_Msg":
        """From :func:`split_er7` (the fast reading, equal to the reference).

        :raises ValueError: not an ER7 message.
        """
        return cls(*split_er7(text))

    def name(self, i: int) -> str:
        return self.names[i]

    def where(self, i: int, fld: int | None = None) -> str:
        """``OBX[3]-5``: segment name, occurrence in the message, field."""
        base = self.bases[i]
        return f"{base}-{fld}" if fld is not None else base

    def raw(self, i: int, fld: int) -> str:
        seg = self.segments[i]
        if fld >= len(seg):
            return ""
        return seg[fld]

    def unescape(self, text: str) -> str:
        esc = self._esc
        if esc not in text:
            return text
        # python-hl7 drops formatting escapes; \.br\ is a line break in FT and TX values.
        text = text.replace(f"{esc}.br{esc}", "\n")
        if f"{esc}X" in text:  # bytes given in hexadecimal: characters of the message's character set
            return self._unescape_hex(text)
        return str(_hl7_unescape(self._escaping, text))

    def _unescape_hex(self, text: str) -> str:
        """:meth:`unescape` of a text holding ``\\Xhh...\\``: those bytes read in the message's character set
        (``\\XE5BBBAE59BBD\\`` is 建国 in UTF-8, ``\\XBDA8B9FA\\`` in GBK), where python-hl7 makes each byte the
        character of that number; bytes that do not read in it are left to python-hl7."""
        esc = self._esc
        pattern = re.compile(re.escape(esc) + "X((?:[0-9A-Fa-f]{2})+)" + re.escape(esc))
        out: list[str] = []
        for k, part in enumerate(pattern.split(text)):
            if k % 2:
                try:
                    out.append(bytes.fromhex(part).decode(self.codec or "utf-8"))
                    continue
                except (UnicodeDecodeError, LookupError):
                    # not text in the message's character set: read byte by byte (ISO 8859-1, as senders writing
                    # \XFC\ for ü mean), and said: GBK bytes in a UTF-8 message (中 as ÖÐ) went by without a word
                    if part not in self.undecoded:
                        self.undecoded.append(part)
                    part = f"{esc}X{part}{esc}"
            out.append(str(_hl7_unescape(self._escaping, part)) if esc in part else part)
        return "".join(out)

    def reps(self, i: int, fld: int) -> list[list[str]]:
        """Repetitions of a field, each as its (still escaped) components."""
        raw = self.raw(i, fld)
        if not raw:
            return []
        comp = self._comp
        return [rep.split(comp) for rep in raw.split(self._rep)]

    def comps(self, i: int, fld: int) -> list[str]:
        """Components of the first repetition, unescaped (subcomponents kept raw)."""
        raw = self.raw(i, fld)
        if not raw:
            return []
        first = raw.split(self._rep, 1)[0].split(self._comp)
        esc = self._esc
        return [self.unescape(c) if esc in c else c for c in first]

    def value(self, i: int, fld: int, comp: int = 1) -> str:
        """Component ``comp`` of the first repetition, unescaped, first subcomponent, stripped."""
        seg = self.segments[i]
        if fld >= len(seg) or not seg[fld]:
            return ""
        comps = seg[fld].split(self._rep, 1)[0].split(self._comp)
        if len(comps) < comp:
            return ""
        text = comps[comp - 1]
        if self._esc in text:
            text = self.unescape(text)
        return text.split(self._sub)[0].strip()

    def first_index(self, name: str) -> int | None:
        try:
            return self.names.index(name)
        except ValueError:
            return None


def _control_issue(text: str, field_sep: str, esc: str) -> Issue | None:
    """The first control character of a message (raw, or as a hex escape such as ``\\X00\\``), located.

    One search of the whole text when the message is clean (every sane message);
    the segment and field are worked out only for a message that holds one.
    """
    at = -1
    what = ""
    m = _CONTROL.search(text)
    if m is not None:
        at, what = m.start(), f"the control character 0x{ord(m.group()):02X}"
    if f"{esc}X" in text:  # hex escapes are rare: only then looked at
        for m in re.finditer(f"{re.escape(esc)}X([0-9A-Fa-f]*){re.escape(esc)}", text):
            digits = m.group(1)
            codes = [int(digits[k:k + 2], 16) for k in range(0, len(digits) - 1, 2)]
            bad = next((c for c in codes if c < 0x20 and c not in (0x09, 0x0A, 0x0D)), None)
            if bad is not None and (at < 0 or m.start() < at):
                at, what = m.start(), f"the control character 0x{bad:02X} (as the escape {m.group()})"
                break
    if at < 0:
        return None
    seg_no = text.count("\r", 0, at)
    seg_start = text.rfind("\r", 0, at) + 1
    name = text[seg_start:seg_start + 3]
    if not _SEGMENT_NAME.match(name):  # the segment's name itself is broken: no field to name
        return Issue("error", "structure", "MSH", f"segment {seg_no + 1} holds {what} where its name or first field "
                     "should be, which no message may carry", "100")
    occurrence = sum(1 for seg in text.split("\r")[:seg_no + 1] if seg[:3] == name)
    fld = text.count(field_sep, seg_start, at) + (1 if name in _SPECIAL_FIRST else 0)
    where = f"{name}[{occurrence}]" + (f"-{fld}" if fld else "")
    return Issue("error", "value", where, f"holds {what}, which no report may carry (only tab, CR and LF are "
                 "taken below 0x20)", "102")


_RESULT_DEFAULTS = {"code": "OBX-3", "value_type": "OBX-2", "value": "OBX-5", "status": "OBX-11",
                    "reference_range": "OBX-7", "flags": "OBX-8", "unit": "OBX-6", "observed_at": "OBX-14"}


def _reading_org(value: str, where: str, issues: list[Issue]) -> str:
    """The checked 统一社会信用代码 of a reading institution; empty (with an error naming ``where``) if it fails."""
    value = value.strip()
    if not value:
        return ""
    try:
        return check_uscc(value)
    except IdentifierError as exc:
        issues.append(Issue("error", "value", where, f"reading institution: {exc.message}", "102"))
        return ""


@functools.lru_cache(maxsize=256)
def _locator(text: str) -> tuple[str, int]:
    seg, _, fld = text.partition("-")
    return seg, int(fld)


def _fast_msg(text: str) -> _Msg | None:
    """The fast reading, or None when python-hl7 must read it (and report its own error)."""
    try:
        return _Msg.from_text(text)
    except (ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=64)
def _zone(offset: str) -> _dt.tzinfo:
    """``+08:00`` as a time zone (China Standard Time when it cannot be read)."""
    m = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", offset.strip())
    if not m:
        return _dt.timezone(_dt.timedelta(hours=8))
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return _dt.timezone(_dt.timedelta(minutes=-minutes if m.group(1) == "-" else minutes))


def _instant(text: str, tz: _dt.tzinfo) -> _dt.datetime | None:
    """The first instant a FHIR date or dateTime (``2026``, ``2026-11``, ``2026-11-20T07:30:00+08:00``) can
    mean; a date without offset in ``tz``. None when it is empty or cannot be read."""
    if not text:
        return None
    try:
        if "T" in text:
            at = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            return at if at.tzinfo is not None else at.replace(tzinfo=tz)
        day = _first_day(text)
        return _dt.datetime(day.year, day.month, day.day, tzinfo=tz) if day is not None else None
    except ValueError:
        return None


#: How long an HL7 v2 time sent with so many digits (before its offset) lasts: to the hour, the minute, the second.
_SENT_PRECISION = {10: _dt.timedelta(hours=1), 12: _dt.timedelta(minutes=1), 14: _dt.timedelta(seconds=1)}


def _sent_digits(raw: str) -> int:
    """How many digits an HL7 v2 time was sent with before its fraction or offset (``202612060800+0800``: 12)."""
    digits = 0
    for ch in raw.strip():
        if not "0" <= ch <= "9":
            break
        digits += 1
    return digits


def _span(text: str, tz: _dt.tzinfo, digits: int = 0) -> tuple[_dt.datetime, _dt.datetime] | None:
    """The first and the last instant a FHIR date or dateTime can mean: a time is all of the hour, minute or second
    it was sent to (``digits``: :func:`_sent_digits` of the HL7 v2 value; a fraction of a second counts as the
    second); a day, a month or a year without a time is all of it, in ``tz``. None when it is empty or cannot be
    read."""
    first = _instant(text, tz)
    if first is None:
        return None
    if "T" in text:
        lasts = _SENT_PRECISION.get(min(digits, 14)) if digits >= 10 else None
        return first, (first + lasts - _dt.timedelta(microseconds=1) if lasts is not None else first)
    try:
        if len(text) >= 10:
            after = first + _dt.timedelta(days=1)
        elif len(text) >= 7:
            after = (first.replace(day=28) + _dt.timedelta(days=4)).replace(day=1)
        else:
            after = first.replace(year=first.year + 1)
    except (OverflowError, ValueError):  # (the last day a datetime holds: 9999-12-31)
        return first, _dt.datetime.max.replace(tzinfo=tz)
    return first, after - _dt.timedelta(microseconds=1)


def _first_day(text: str) -> _dt.date | None:
    """The first day a FHIR date or dateTime can mean, as the sender wrote it (its own date, not UTC's)."""
    parts = (text or "")[:10].split("-")
    try:
        return _dt.date(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, int(parts[2]) if len(parts) > 2 else 1)
    except (ValueError, IndexError):
        return None


def _alternate_triplet(comps: list[str]) -> Coded | None:
    """Components 4-6 of a CE/CWE (alternate identifier, text, coding system), if an identifier is sent."""
    if len(comps) < 4 or not comps[3].strip():
        return None
    return Coded(comps[3].strip(), comps[4].strip() if len(comps) > 4 else "",
                 comps[5].strip() if len(comps) > 5 else "")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


class HL7v2Adapter:
    """Reads HL7 v2 ORU^R01 messages as the structure table describes them."""

    format = "hl7v2"

    def __init__(self, structure: dict[str, Any], *, default_offset: str = "+08:00",
                 max_message_bytes: int = 1_048_576, reference_parser: bool = False,
                 senders: dict[str, Any] | None = None) -> None:
        """``reference_parser``: read with python-hl7's containers instead of :func:`split_er7`
        (same result, slower; for differential tests). ``senders``: the per-sender rules
        (``mappings/hl7v2/senders.yaml``), keyed by ``MSH-3|MSH-4``."""
        self.reference_parser = reference_parser
        self.table = structure
        self.offset = default_offset
        self.max_bytes = max_message_bytes
        self.charsets: dict[str, str] = {k.upper(): v for k, v in structure.get("charsets", {}).items()}
        self.fallbacks: list[str] = list(structure.get("fallback_charsets", ["utf-8", "gb18030"]))
        self.lenient = {c.upper() for c in structure.get("lenient_charsets", [])}
        self.types = set(structure.get("message_types", ["ORU^R01"]))
        self.versions = set(structure.get("versions", []))
        self.refused_versions = set(structure.get("refused_versions", []))
        self.senders: dict[str, dict[str, Any]] = dict((senders or {}).get("senders") or {})
        self.value_types: dict[str, str] = dict(structure.get("value_types", {}))
        result_spec = structure.get("result", {})
        # Where each fact of an OBX sits, resolved once: the table does not change while running.
        self._result_fields: dict[str, int] = {
            key: _locator(result_spec.get(key, default))[1] for key, default in _RESULT_DEFAULTS.items()}

    # -- cutting and identifying ---------------------------------------------------------

    def split(self, data: bytes, origin: str = "") -> Iterator[RawUnit]:
        """Messages of a file or request body, numbered from 1."""
        for n, chunk in enumerate(split_messages(data), start=1):
            yield RawUnit(chunk, n, origin)

    def identify(self, unit: RawUnit) -> tuple[str, str]:
        """(sender, MSH-10) read cheaply for duplicate detection; ``("", "")`` if unreadable. A message whose
        character set cannot be read (GBK under a UTF-8 MSH-18) is still named by its MSH fields that are plain
        ASCII, as its answer names it (its record had no sender or control id, and each resend made another)."""
        text, _, _ = self._decode(unit.data)
        if text is None:
            head = SourceMessage(format=self.format)
            self.read_first_segment(unit.data, head)
            h = head.header
            sender = f"{h.get('sending_application', '')}|{h.get('sending_facility', '')}"
            return (sender if sender != "|" else ""), head.message_id
        first = text.split("\r", 1)[0]
        if not first.startswith("MSH") or len(first) < 4:
            return "", ""
        sep = first[3:4]
        fields = ["MSH", sep] + first[4:].split(sep)

        def get(n: int) -> str:
            return fields[n].strip() if n < len(fields) else ""

        return f"{get(3)}|{get(4)}", get(10)

    # -- decoding ------------------------------------------------------------------------

    def _declared(self, data: bytes) -> str:
        """MSH-18 as declared, read from a byte view of the MSH segment."""
        first = data.split(b"\r", 1)[0].split(b"\n", 1)[0]
        if not first.startswith(b"MSH") or len(first) < 4:
            return ""
        sep = first[3:4]
        fields = first.split(sep)
        # fields[0] = "MSH", fields[1] = encoding characters = MSH-2, so MSH-n is fields[n-1]
        if len(fields) > 17:
            return fields[17].split(b"^")[0].strip().decode("latin-1")
        return ""

    def _decode(self, data: bytes) -> tuple[str | None, str, list[Issue]]:
        if data.startswith(_BOM):  # a byte order mark some editors and senders put first: not part of the message
            data = data[len(_BOM):]
        declared = self._declared(data)
        issues: list[Issue] = []
        if declared:
            codec = self.charsets.get(declared.upper())
            if codec is None:
                return None, "", [Issue("error", "not-supported", "MSH-18",
                                        f"character set {shown(declared)} is not supported "
                                        f"(supported: {', '.join(sorted(self.charsets))})", "103")]
            try:
                text = data.decode(codec)
                if _SINGLE_BYTE.get(codec) and not data.isascii():
                    _check_single_byte(data, text, codec)
                return text, codec, issues
            except UnicodeDecodeError as exc:
                if declared.upper() not in self.lenient:
                    return None, codec, [Issue("error", "structure", "MSH-18",
                                               f"MSH-18 declares {shown(declared)} but "
                                               + (exc.reason if exc.reason.startswith("the message") else
                                                  f"byte {exc.start} is not valid {codec}"), "102")]
                issues.append(Issue("warning", "value", "MSH-18",
                                    f"MSH-18 declares {shown(declared)} but the message is not {codec}; "
                                    "decoded by fallback", "102"))
        read: list[tuple[str, str]] = []
        for codec in self.fallbacks:
            try:
                read.append((data.decode(codec), codec))
            except UnicodeDecodeError:
                continue
            if data.isascii():
                break
        if read:
            # bytes that read in two of them (GBK bytes are often UTF-8 too): the reading that looks like a
            # laboratory's Chinese text, the first of them when both do
            text, codec = min(read, key=lambda pair: _strangeness(pair[0])) if len(read) > 1 else read[0]
            return text, codec, issues
        return None, "", [Issue("error", "structure", "MSH-18",
                                "message is neither UTF-8 nor GB18030/GBK and MSH-18 names no character set",
                                "102")]

    # -- reading -------------------------------------------------------------------------

    def read(self, unit: RawUnit) -> SourceMessage:
        """Decode, parse and extract one message; problems become issues, never exceptions."""
        msg, m = self._start(unit)
        if m is None or msg.errors:
            return msg
        reason = self._filter(m)
        if reason:
            msg.filtered = reason
            return msg
        self._body(m, msg)
        if "T" not in msg.sent_at and not msg.errors:
            # the report Bundle is timed to the second: MSH-7 with a time of day, else the report's issue time
            msg.sent_at = next((r.issued_at for r in msg.reports if "T" in r.issued_at), "")
            if not msg.sent_at:
                msg.issues.append(Issue("error", "required", "MSH[1]-7",
                                        "message date/time has no time of day (or is empty) and no report has an "
                                        "issue time (OBR-22): the report cannot be timed", "101"))
        self._impossible_times(m, msg)
        for hexes in m.undecoded:
            written = f"{m.seps['escape']}X{hexes}{m.seps['escape']}"
            where = next((m.where(i, f) for i, seg in enumerate(m.segments) for f, value in enumerate(seg)
                          if f and written in value), m.where(0, 18))
            charset = (msg.charset or "utf-8").upper()
            latin = bytes.fromhex(hexes).decode("latin-1")
            msg.issues.append(Issue("warning", "value", where,
                                    f"escape {written} holds bytes that are not {charset} text (the message's "
                                    f"character set, MSH-18): read one character per byte (ISO 8859-1), as "
                                    f"{shown(latin)}; is the text right?", "102"))
        # A field read for two facts (OBR-7: report and specimen time) reports its problem once.
        msg.issues = list(dict.fromkeys(msg.issues))
        return msg

    def read_header(self, unit: RawUnit) -> SourceMessage:
        """Decode and read the MSH segment only (what a receipt ACK needs); problems become issues.

        A message with no error here may still be refused by :meth:`read` for its body.
        """
        return self._start(unit)[0]

    def _start(self, unit: RawUnit) -> tuple[SourceMessage, _Msg | None]:
        """The message with its header read, and the parsed segments (None when it could not be parsed)."""
        msg = SourceMessage(format=self.format)
        msg.extra["label"] = f"message {unit.index}"
        if len(unit.data) > self.max_bytes:
            msg.issues.append(Issue("error", "too-long", "MSH",
                                    f"message is {len(unit.data)} bytes, the limit is {self.max_bytes}", "207"))
            self.read_first_segment(unit.data, msg)
            return msg, None
        text, codec, issues = self._decode(unit.data)
        msg.issues.extend(issues)
        msg.charset = codec
        if text is None:
            self.read_first_segment(unit.data, msg)
            return msg, None
        # (a byte order mark at a segment's start, as files joined with cat leave, is no part of it: a second MSH
        # behind one is still a second MSH)
        text = text.replace("\r\n", "\r").replace("\n", "\r").replace("\r\ufeff", "\r").strip("\r")
        if "\r " in text or "\r\t" in text:  # a segment indented (a file wrapped for reading): its name is after
            text = _INDENTED.sub("\r", text)
        if not text.startswith("MSH") or len(text) < 8:
            batch = text.startswith(("FHS", "BHS"))  # a batch file's header, sent as one block
            msg.issues.append(Issue("error", "structure", "MSH", "message does not start with an MSH segment" + (
                f" ({text[:3]}: a batch is not taken as one message; send its messages one to an MLLP block, or "
                "the batch as a file: POST /ingest/hl7v2)" if batch else ""), "100"))
            return msg, None
        try:
            m = None if self.reference_parser else _fast_msg(text)
            if m is None:
                m = _Msg.from_hl7(hl7.parse(text))
        except Exception as exc:  # python-hl7 raises assorted errors on broken input
            if _TWIN and isinstance(exc, TypeError):
                raise  # a compiled twin's type check, maybe: the plain module reads this message (gateway.native)
            msg.issues.append(Issue("error", "structure", "MSH", f"message cannot be parsed: {exc}", "100"))
            return msg, None
        m.codec = codec or "utf-8"
        self._header(m, msg)
        bad = _control_issue(text, m.seps["field"], m.seps["escape"])
        if bad is not None:
            msg.issues.append(bad)
        for i in range(1, len(m.segments)):
            if m.name(i) and not _SEGMENT_ID.match(m.name(i)):
                # a segment the reader cannot name (obx for OBX) would be passed over as unknown, and its result
                # or patient lost with an AA
                before = m.where(max(j for j in range(i) if m.name(j)))  # (MSH, at least)
                msg.issues.append(Issue("error", "structure", before,
                                        f"the segment after {before} is named {shown(m.name(i)[:6])}, "
                                        "which is no segment name (three capital letters or digits, such as OBX): "
                                        "it cannot be read", "100"))
                break
            if m.name(i) in _UNIT_ENDS:
                # one unit (an MLLP block) holds one message: the segments after a second MSH are another
                # message's, never this patient's
                msg.issues.append(Issue("error", "structure", m.where(i),
                                        f"a second message ({m.name(i)} segment) in the same block: send one "
                                        "message per MLLP block (a batch file or HTTP body may hold several)",
                                        "100"))
                break
        return msg, m

    def read_first_segment(self, data: bytes, msg: SourceMessage) -> None:
        """Fill what an answer echoes (MSH-10 in MSA-2, the sender, the version) from the MSH segment alone.

        For a message refused before it could be read (too large, a character set
        that cannot be decoded): a field is taken only when it is plain printable
        ASCII, which every control id and application name in practice is.
        """
        first = data[:65_536].removeprefix(_BOM).split(b"\r", 1)[0].split(b"\n", 1)[0]
        m = _fast_msg(first.decode("ascii", errors="replace"))
        if m is None:
            return
        head = SourceMessage(format=self.format, extra={"label": ""})
        self._header(m, head)

        def plain(value: str) -> bool:
            return value.isascii() and value.isprintable()

        if head.message_id and plain(head.message_id):
            msg.message_id = head.message_id
            msg.extra["label"] = f"MSH-10 {msg.message_id}"
        for key in ("sending_application", "sending_facility", "processing_id", "version", "trigger",
                    "accept_ack_type"):
            value = head.header.get(key, "")
            if value and plain(value):
                msg.header[key] = value
        msg.version = msg.header.get("version", "")

    def _header(self, m: _Msg, msg: SourceMessage) -> None:
        i = 0
        h = msg.header
        h["sending_application"] = m.raw(i, 3)
        h["sending_facility"] = m.raw(i, 4)
        h["receiving_application"] = m.raw(i, 5)
        h["receiving_facility"] = m.raw(i, 6)
        h["processing_id"] = m.value(i, 11)
        h["charset_field"] = m.raw(i, 18)
        h["accept_ack_type"] = m.value(i, 15)  # set: the sender uses enhanced acknowledgment mode
        msg.message_id = m.value(i, 10)
        msg.sender = f"{m.value(i, 3)}|{m.value(i, 4)}"
        msg.version = m.value(i, 12)
        h["version"] = msg.version
        if len(msg.message_id) > _MAX_CONTROL_ID:
            msg.issues.append(Issue("error", "value", "MSH[1]-10",
                                    f"message control id has {len(msg.message_id)} characters, at most "
                                    f"{_MAX_CONTROL_ID} are taken", "102"))
            msg.message_id = msg.message_id[:_MAX_CONTROL_ID]
        msg.extra["label"] = f"MSH-10 {msg.message_id}" if msg.message_id else msg.extra["label"]
        mtype = m.comps(i, 9)
        msg.message_type = "^".join(c.split(m.seps["subcomponent"])[0] for c in mtype[:2])
        h["trigger"] = mtype[1] if len(mtype) > 1 else ""
        ts = m.value(i, 7)
        if ts:
            try:
                msg.sent_at = to_fhir_datetime(ts, self.offset)
            except DateTimeError as exc:
                msg.issues.append(Issue("error", "value", "MSH[1]-7", str(exc), "102"))
        if not msg.message_id:
            msg.issues.append(Issue("error", "required", "MSH[1]-10",
                                    "message control id is empty: the message cannot be acknowledged or "
                                    "de-duplicated", "101"))
        if msg.message_type not in self.types:
            msg.issues.append(Issue("error", "not-supported", "MSH[1]-9",
                                    f"message type {_plain(msg.message_type) or '(empty)'} "
                                    "is not supported "
                                    f"(supported: {', '.join(sorted(self.types))})", "200"))
        if msg.version in self.refused_versions:
            msg.issues.append(Issue("error", "not-supported", "MSH[1]-12",
                                    f"HL7 version {msg.version} is older than 2.3, the first version whose ORU^R01 "
                                    f"is taken (2.3 to {max(self.versions, key=_version_key)}); send the message "
                                    "as v2.3.1 or later", "203"))
        elif msg.version not in self.versions:
            msg.issues.append(Issue("error", "not-supported", "MSH[1]-12",
                                    f"HL7 version {_plain(msg.version) or '(empty)'} is not supported "
                                    f"(supported: {', '.join(sorted(self.versions, key=_version_key))})", "203"))

    def _filter(self, m: _Msg) -> str:
        names = {m.name(i) for i in range(len(m.segments))}
        for rule in self.table.get("filters", []):
            when = rule.get("when", {})
            if "segment_missing" in when and when["segment_missing"] not in names:
                return str(rule["reason"])
            if "field" in when:
                seg, fld = _locator(when["field"])
                for i in range(len(m.segments)):
                    if m.name(i) == seg and m.value(i, fld) in when.get("in", []):
                        return str(rule["reason"])
        return ""

    def _body(self, m: _Msg, msg: SourceMessage) -> None:
        pid_rows = [i for i in range(len(m.segments)) if m.name(i) == "PID"]
        if len(pid_rows) > 1:
            msg.issues.append(Issue("error", "not-supported", m.where(pid_rows[1]),
                                    "more than one patient (PID) in one message is not supported; "
                                    "send one message per patient", "100"))
            return
        msg.patient = self._patient(m, pid_rows[0], msg.issues, on=message_date(msg.sent_at))
        report: ReportFacts | None = None
        spm_row: int | None = None
        last_result: ResultFacts | None = None
        code_seen: dict[tuple[str, str], int] = {}
        group_notes: list[str] = []  # NTE after an OBR, before its first OBX: about every result of the group
        for i in range(len(m.segments)):
            name = m.name(i)
            if name == "OBR":
                if report is not None:
                    self._finish_report(m, report, spm_row, msg.issues)
                report = self._report(m, i, msg)
                spm_row, last_result, group_notes = None, None, []
                msg.reports.append(report)
            elif name == "OBX":
                if report is None:
                    msg.issues.append(Issue("error", "structure", m.where(i), "OBX before any OBR", "100"))
                    continue
                last_result = self._result(m, i, msg.issues)
                if last_result is not None:
                    alternate = self._alternate(m, i)
                    if alternate and alternate != last_result.code:
                        msg.extra.setdefault("alternate_codes", {})[last_result.location] = alternate
                    value_alternate = self._value_alternate(m, i, last_result)
                    if value_alternate:
                        msg.extra.setdefault("value_alternates", {})[last_result.location] = value_alternate
                    key = (str(len(msg.reports)), last_result.code.code)
                    code_seen[key] = code_seen.get(key, 0) + 1
                    last_result.occurrence = code_seen[key]
                    if group_notes:
                        last_result.notes[:0] = group_notes
                    report.results.append(last_result)
            elif name == "SPM" and report is not None:
                spm_row = i
            elif name == "PRT" and report is not None and last_result is None:
                self._participation(m, i, report, msg.issues)
            elif name == "NTE":
                # NTE-3 repeats (FT): each repetition a line of the comment
                note = "\n".join(m.unescape(part) for part in m.raw(i, 3).split(m.seps["repetition"])).strip()
                if text_too_long(note):
                    msg.issues.append(Issue("error", "value", m.where(i, 3),
                                            f"comment of {len(note.encode('utf-8'))} bytes (UTF-8): at most "
                                            f"{MAX_TEXT_BYTES} are taken in one field", "102"))
                elif note and last_result is not None:
                    last_result.notes.append(note)
                elif note and report is not None:
                    # a comment on the report (标本溶血，结果仅供参考): a note of each of its results, which it is
                    # about; it was left out without a word
                    group_notes.append(note)
        if report is not None:
            self._finish_report(m, report, spm_row, msg.issues)
        if not msg.reports:
            msg.issues.append(Issue("error", "required", "OBR", "message has no OBR segment: no results to take",
                                    "100"))
        self._distinct_reports(m, msg)

    # -- patient -------------------------------------------------------------------------

    def _patient(self, m: _Msg, i: int, issues: list[Issue],
                 on: _dt.date | None = None) -> PatientFacts:
        spec = self.table.get("patient", {})
        p = PatientFacts(location=m.where(i))
        used: set[str] = set()
        for rule in spec.get("id_card", []):
            seg, fld = _locator(rule["field"])
            if seg != "PID" or p.id_card:
                continue
            for rep_no, rep in enumerate(m.reps(i, fld), start=1):
                value = m.unescape(rep[0]).split(m.seps["subcomponent"])[0].strip()
                id_type = m.unescape(rep[4]).strip().upper() if len(rep) > 4 else ""
                if not value:
                    continue
                if "id_types" in rule:
                    if id_type not in rule["id_types"]:
                        continue
                elif rule.get("untyped") and id_type:
                    continue
                elif not _ID_LIKE.match(value):
                    continue
                where = f"PID[{m.counts[i]}]-{fld}"
                try:
                    p.id_card = check_id_card(value, on=on)
                    used.add(value)
                    issues.extend(Issue("warning", "value", where, w, "102") for w in id_card_warnings(p.id_card))
                except IdentifierError as exc:
                    typed = f" (type {id_type})" if id_type else ""
                    rep_txt = f"repetition {rep_no}{typed}: " if fld == 3 else ""
                    issues.append(Issue("error", "value", where, f"{rep_txt}{exc.message}", "102"))
                    used.add(value)
                break
        if not p.id_card and not any(x.location.startswith("PID") and x.severity == "error" for x in issues):
            issues.append(Issue("warning", "required", f"PID[{m.counts[i]}]-3",
                                "no 身份证号 (PID-3 type NNCHN/ID, or PID-19): the patient cannot be matched "
                                "across institutions", "101"))
        _, other_fld = _locator(spec.get("other_ids", "PID-3"))
        for rep in m.reps(i, other_fld):
            value = m.unescape(rep[0]).split(m.seps["subcomponent"])[0].strip()
            id_type = m.unescape(rep[4]).strip().upper() if len(rep) > 4 else ""
            if value and value not in used:
                p.other_ids.append((id_type or "MR", value))
        _, name_fld = _locator(spec.get("name", "PID-5"))
        name = m.comps(i, name_fld)
        family = name[0].split(m.seps["subcomponent"])[0].strip() if name else ""
        given = name[1].strip() if len(name) > 1 else ""
        p.family, p.given = family, given
        if family and given:
            p.name = family + given if _CJK.search(family + given) else f"{family} {given}"
        else:
            p.name = family or given
        if not p.name:
            issues.append(Issue("error", "required", f"PID[{m.counts[i]}]-{name_fld}",
                                "the patient's name is empty", "101"))
        if not p.id_card and not p.other_ids and not any(x.location.startswith("PID") and x.severity == "error"
                                                         for x in issues):
            issues.append(Issue("error", "required", f"PID[{m.counts[i]}]-3",
                                "the patient has no identifier (PID-3, or 身份证号 in PID-19)", "101"))
        _, dob_fld = _locator(spec.get("birth_date", "PID-7"))
        dob = m.value(i, dob_fld)
        if dob:
            try:
                p.birth_date = to_fhir_date(dob)
            except DateTimeError as exc:
                issues.append(Issue("error", "value", f"PID[{m.counts[i]}]-{dob_fld}", str(exc), "102"))
            future = birth_date_problem(p.birth_date, on)
            if future:
                p.birth_date = ""
                issues.append(Issue("error", "value", f"PID[{m.counts[i]}]-{dob_fld}", future, "102"))
        _, sex_fld = _locator(spec.get("sex", "PID-8"))
        p.sex = m.value(i, sex_fld)
        return p

    # -- reports -------------------------------------------------------------------------

    def _first(self, m: _Msg, rows: dict[str, int | None], locators: Any) -> tuple[str, int, int]:
        """(value, segment row, field) of the first locator with a value; ``("", -1, 0)`` if none."""
        for loc in _as_list(locators):
            seg, fld = _locator(loc)
            row = rows.get(seg)
            if row is None:
                continue
            value = m.value(row, fld)
            if value:
                return value, row, fld
        return "", -1, 0

    def _time(self, m: _Msg, rows: dict[str, int | None], locators: Any, issues: list[Issue],
              instant: bool = False) -> str:
        value, row, fld = self._first(m, rows, locators)
        if not value:
            return ""
        where = m.where(row, fld)
        try:
            return to_fhir_instant(value, self.offset) if instant else to_fhir_datetime(value, self.offset)
        except DateTimeError as exc:
            if instant and "no time of day" in str(exc):
                issues.append(Issue("warning", "value", where, f"{exc}; report issue time left out", "102"))
                return ""
            issues.append(Issue("error", "value", where, str(exc), "102"))
            return ""

    def _report(self, m: _Msg, i: int, msg: SourceMessage) -> ReportFacts:
        spec = self.table.get("report", {})
        rows: dict[str, int | None] = {"OBR": i, "MSH": 0}
        r = ReportFacts(location=m.where(i))
        r.number = self._first(m, rows, spec.get("number", ["OBR-3", "OBR-2"]))[0]
        r.placer_number = self._first(m, rows, spec.get("placer_number", "OBR-2"))[0]
        policy = self.senders.get(msg.sender)
        if not r.number and policy:
            r.number = self._policy_number(m, i, msg, policy.get("report_number") or [])
        if not r.number:
            known = " (the sender has no report-number policy)" if policy is None else ""
            msg.issues.append(Issue("error", "required", m.where(i, 3),
                                    "filler order number (检验报告单号) OBR-3 and placer number OBR-2 are both "
                                    f"empty: the report cannot be identified{known}", "101"))
        seg, fld = _locator(spec.get("code", "OBR-4"))
        code = m.comps(i, fld)
        r.code = Coded(code[0].strip() if code else "", code[1].strip() if len(code) > 1 else "",
                       code[2].strip() if len(code) > 2 else "")
        alternate = _alternate_triplet(code)
        if alternate is not None and not r.code.code:
            r.code = alternate  # only the alternate triplet sent: it stands for the first
        elif alternate is not None and alternate != r.code:
            msg.extra.setdefault("alternate_codes", {})[r.location] = alternate
        r.collected_at = self._time(m, rows, spec.get("collected_at", "OBR-7"), msg.issues)
        r.extra["collected_sent"] = bool(self._first(m, rows, spec.get("collected_at", "OBR-7"))[0])
        r.issued_at = self._time(m, rows, spec.get("issued_at", ["OBR-22", "MSH-7"]), msg.issues, instant=True)
        r.status = self._first(m, rows, spec.get("status", "OBR-25"))[0]
        seg, fld = _locator(spec.get("interpreter", "OBR-32"))
        interp = m.comps(i, fld)
        if interp and interp[0]:
            parts = [m.unescape(x).strip() for x in interp[0].split(m.seps["subcomponent"])]
            if len(parts) == 1 and _CJK.search(parts[0]):  # a name alone (no id&family&given), as analysers send it
                parts = ["", parts[0]]
            r.interpreter_id = parts[0]
            names = [x for x in parts[1:3] if x]
            r.interpreter_name = "".join(names) if all(_CJK.search(x) for x in names) else " ".join(names)
        if len(interp) > 6 and interp[6]:  # NDL-7 facility (HD): the reading institution, its USCC as HD-2
            facility = interp[6].split(m.seps["subcomponent"])
            r.reading_org = _reading_org(facility[1] if len(facility) > 1 else "", f"{m.where(i)}-{fld}.7.2",
                                         msg.issues)
        return r

    def _finish_report(self, m: _Msg, r: ReportFacts, spm_row: int | None, issues: list[Issue]) -> None:
        spec = self.table.get("report", {})
        obr_row = next(i for i in range(len(m.segments)) if m.where(i) == r.location)
        rows: dict[str, int | None] = {"OBR": obr_row, "SPM": spm_row, "MSH": 0}
        rest = m.names[obr_row + 1:]
        group = rest[:rest.index("OBR")] if "OBR" in rest else rest
        if "OBX" not in group:
            # a report needs a result: the answer names the OBR group and the field its first OBX would bring
            issues.append(Issue("error", "required", r.location, "has no OBX: at least one result is required",
                                "101", {"erl": "OBX-3"}))
        s = SpecimenFacts()
        type_value, row, fld = self._first(m, rows, spec.get("specimen_type", ["SPM-4", "OBR-15"]))
        if type_value:
            comps = m.comps(row, fld)
            sub = comps[0].split(m.seps["subcomponent"]) if comps else [""]
            if m.name(row) == "OBR" and len(sub) > 1:  # SPS: code&text&system in component 1
                s.type = Coded(sub[0].strip(), sub[1].strip())
            else:
                s.type = Coded(sub[0].strip(), comps[1].strip() if len(comps) > 1 else "")
        s.number = self._first(m, rows, spec.get("specimen_number", ["SPM-2"]))[0]
        s.collected_at = self._time(m, rows, spec.get("specimen_collected_at", ["SPM-17", "OBR-7"]), issues)
        s.received_at = self._time(m, rows, spec.get("specimen_received_at", ["SPM-18", "OBR-14"]), issues)
        if s.type or s.number or s.collected_at:
            r.specimen = s
        if spm_row is not None:
            r.extra["spm"] = m.where(spm_row)
        if not r.collected_at and not r.extra.pop("collected_sent", False):
            self._collection_fallback(m, r, obr_row, spm_row, issues)
        else:
            r.extra.pop("collected_sent", None)
        self._correction(m, r, obr_row, issues)

    def _collection_fallback(self, m: _Msg, r: ReportFacts, obr_row: int, spm_row: int | None,
                             issues: list[Issue]) -> None:
        """A report without OBR-7: the specimen's collection time (SPM-17), else the earliest OBX-14."""
        fallback = _as_list(self.table.get("report", {}).get("collected_fallback", ["SPM-17", "OBX-14"]))
        tried: list[str] = [m.where(obr_row, 7)]
        for loc in fallback:
            seg, fld = _locator(loc)
            if seg == "SPM":
                if spm_row is None:
                    continue
                tried.append(m.where(spm_row, fld))
                r.collected_at = self._time(m, {"SPM": spm_row}, loc, issues)
            elif seg == "OBX":
                tried.extend(f"{res.location}-{fld}" for res in r.results[:2])
                times = sorted(res.observed_at for res in r.results if res.observed_at)
                r.collected_at = times[0] if times else ""
            if r.collected_at:
                return
        verb = "are" if len(tried) > 1 else "is"
        issues.append(Issue("error", "required", joined(tried),
                            f"{verb} empty: the collection time is required (validity windows are counted from it)",
                            "101"))

    def _distinct_reports(self, m: _Msg, msg: SourceMessage) -> None:
        """Each OBR group its own identity when OBR groups share one 检验报告单号.

        LIS systems that use the specimen barcode as filler number send one OBR group per ordered
        test with the same OBR-3. Their resources are then keyed on the number and OBR-4, and the
        检验报告单号 identifier stays as sent; a number used once keeps the key it always had. Two groups
        with the same number and the same OBR-4 cannot be told apart and are refused.
        """
        groups: dict[str, list[ReportFacts]] = {}
        for r in msg.reports:
            if r.number:
                groups.setdefault(r.number, []).append(r)
        for number, same in groups.items():
            if len(same) < 2:
                continue
            first_by_code: dict[str, ReportFacts] = {}
            for r in same:
                first = first_by_code.setdefault(r.code.code, r)
                if first is not r:
                    service = f"the same OBR-4 {shown(r.code.code)}" if r.code.code else "no OBR-4 either"
                    msg.issues.append(Issue("error", "duplicate", m.where(self._row(m, r), 3),
                                            f"检验报告单号 {shown(number)} is the one of {first.location}, with "
                                            f"{service}: the two reports cannot be told apart; send them with "
                                            "different numbers or in different messages", "205"))
                    continue
                corrected = f"{number}|corrected|"
                base = f"{number}|{r.code.code}"
                r.key = f"{base}|corrected|{r.key[len(corrected):]}" if r.key.startswith(corrected) else base

    def _impossible_times(self, m: _Msg, msg: SourceMessage) -> None:
        """Times no report can have: a patient born after the collection, a collection (OBR-7, SPM-17,
        OBX-14) later than the message time MSH-7 (beyond ``clock_skew_minutes`` of clock difference between
        the sender's machines). A report issued (OBR-22) before its collection is only a warning."""
        tz = _zone(self.offset)
        sent = _instant(msg.sent_at, tz) if "T" in msg.sent_at else None
        skew = _dt.timedelta(minutes=float(self.table.get("clock_skew_minutes", 10)))
        drift = _dt.timedelta(hours=float(self.table.get("clock_drift_hours", 24)))
        spec = self.table.get("report", {})
        _, dob_fld = _locator(self.table.get("patient", {}).get("birth_date", "PID-7"))
        birth_text = msg.patient.birth_date if msg.patient is not None else ""
        birth = _first_day(birth_text) if birth_text else None
        birth_where = f"{msg.patient.location}-{dob_fld}" if msg.patient is not None else ""
        for r in msg.reports:
            row = self._row(m, r)
            spm_row = m.bases.index(r.extra["spm"]) if r.extra.get("spm") else None
            rows: dict[str, int | None] = {"OBR": row, "SPM": spm_row, "MSH": 0}
            times: dict[str, str] = {}
            collected_where = ""
            if r.collected_at:
                _, c_row, c_fld = self._first(m, rows, spec.get("collected_at", "OBR-7"))
                if c_row < 0:
                    _, c_row, c_fld = self._first(m, rows, [x for x in _as_list(spec.get("collected_fallback"))
                                                            if not x.startswith("OBX")])
                if c_row >= 0:
                    collected_where = m.where(c_row, c_fld)
                else:
                    collected_where = next((f"{res.location}-{self._result_fields['observed_at']}"
                                            for res in r.results if res.observed_at == r.collected_at), "")
                times[collected_where] = r.collected_at
            if r.specimen is not None and r.specimen.collected_at:
                _, s_row, s_fld = self._first(m, rows, spec.get("specimen_collected_at", ["SPM-17", "OBR-7"]))
                if s_row >= 0:
                    times.setdefault(m.where(s_row, s_fld), r.specimen.collected_at)
            for res in r.results:
                if res.observed_at:
                    times.setdefault(f"{res.location}-{self._result_fields['observed_at']}", res.observed_at)
            for where, text in times.items():
                at = _instant(text, tz)
                if sent is not None and at is not None and where and at - sent > drift:
                    msg.issues.append(Issue("error", "value", where,
                                            f"collection time {text} is later than the message time "
                                            f"{msg.sent_at} (MSH-7): a sample cannot be taken after the "
                                            "results were sent", "102"))
                elif sent is not None and at is not None and where and at - sent > skew:
                    # within a day: an analyser or LIS clock set wrong, not an impossible report
                    msg.issues.append(Issue("warning", "value", where,
                                            f"collection time {text} is later than the message time "
                                            f"{msg.sent_at} (MSH-7); kept as sent: check the clocks of the "
                                            "analyser, the LIS and the interface engine", "102"))
            collected = _first_day(r.collected_at)
            if birth is not None and collected is not None and collected_where and birth > collected:
                msg.issues.append(Issue("error", "value", f"{birth_where} and {collected_where}",
                                        f"birth date {birth_text} is after the collection time {r.collected_at}: "
                                        "the patient was not born yet", "102"))
            _, i_row, i_fld = self._first(m, rows, spec.get("issued_at", ["OBR-22", "MSH-7"]))
            issued, start = _instant(r.issued_at, tz), _instant(r.collected_at, tz)
            if issued is not None and start is not None and i_row == row and issued < start:
                msg.issues.append(Issue("warning", "value", m.where(i_row, i_fld),
                                        f"report issue time {r.issued_at} is before the collection time "
                                        f"{r.collected_at} ({collected_where}); kept as sent", "102"))
            if r.specimen is not None and r.specimen.received_at:
                self._received_before_collected(m, msg, rows, r, r.specimen, tz)

    def _received_before_collected(self, m: _Msg, msg: SourceMessage, rows: dict[str, int | None],
                                   r: ReportFacts, s: SpecimenFacts, tz: _dt.tzinfo) -> None:
        """A warning for a specimen received in the laboratory (SPM-18, OBR-14) before it was collected (SPM-17,
        OBR-7): both are kept as sent, which of the two is wrong cannot be told. Said only when every instant the
        received time can mean (a time is all of the hour, minute or second it was sent to; a day, a month or a year
        without one is all of it, in the sender's zone) lies before every instant the collection time can mean."""
        spec = self.table.get("report", {})
        collected_text = s.collected_at or r.collected_at
        rc_raw, rc_row, rc_fld = self._first(m, rows, spec.get("specimen_received_at", ["SPM-18", "OBR-14"]))
        locators = spec.get("specimen_collected_at", ["SPM-17", "OBR-7"]) if s.collected_at else \
            spec.get("collected_at", "OBR-7")
        c_raw, c_row, c_fld = self._first(m, rows, locators)
        if rc_row < 0:
            return
        received = _span(s.received_at, tz, _sent_digits(rc_raw))
        collected = _span(collected_text, tz, _sent_digits(c_raw) if c_row >= 0 else 14)
        if received is None or collected is None or not received[1] < collected[0]:
            return
        where = f" ({m.where(c_row, c_fld)})" if c_row >= 0 else ""
        msg.issues.append(Issue("warning", "value", m.where(rc_row, rc_fld),
                                f"the specimen was received in the laboratory at {s.received_at}, before it was "
                                f"collected at {collected_text}{where}: one of the two times is wrong; both are kept "
                                "as sent", "102"))

    @staticmethod
    def _row(m: _Msg, r: ReportFacts | ResultFacts) -> int:
        """The segment row a record was read from."""
        return m.bases.index(r.location)

    def _correction(self, m: _Msg, r: ReportFacts, obr_row: int, issues: list[Issue]) -> None:
        """OBR-25 C (or an OBX-11 C): the report corrects the one with its 检验报告单号."""
        when = self.table.get("report", {}).get("corrected_when", {})
        by_report = r.status.upper() in when.get("report_status", [])
        by_result = any(res.status in when.get("result_status", []) for res in r.results)
        if not (by_report or by_result) or not r.number:
            return
        if not by_report and r.status.upper() in ("", "F"):
            r.status = "C"  # a final report with corrected results is a corrected report
        r.replaces = r.number
        # the correction is a new version of the report: its resources get their own ids
        r.key = f"{r.number}|corrected|{m.value(0, 10)}"

    def _participation(self, m: _Msg, i: int, r: ReportFacts, issues: list[Issue]) -> None:
        """A v2.7+ PRT segment of the OBR group naming the principal result interpreter (and, in PRT-8, the
        institution that read the exam: its USCC as XON-10)."""
        spec = self.table.get("report", {}).get("interpreter_participation")
        if not spec:
            return
        _, part_fld = _locator(spec.get("participation", "PRT-4"))
        if m.value(i, part_fld).upper() not in [c.upper() for c in spec.get("codes", ["PI"])]:
            return
        _, org_fld = _locator(spec.get("organization", "PRT-8"))
        if not r.reading_org:
            r.reading_org = _reading_org(m.value(i, org_fld, 10), f"{m.where(i)}-{org_fld}.10", issues)
        if r.interpreter_id or r.interpreter_name:
            return
        _, person_fld = _locator(spec.get("person", "PRT-5"))
        person = [m.unescape(c).split(m.seps["subcomponent"])[0].strip() for c in m.comps(i, person_fld)]
        if not person or not any(person[:3]):
            return
        r.interpreter_id = person[0]
        names = [x for x in person[1:3] if x]
        r.interpreter_name = "".join(names) if all(_CJK.search(x) for x in names) else " ".join(names)

    def _policy_number(self, m: _Msg, i: int, msg: SourceMessage, steps: list[str]) -> str:
        """The report number by the sender's policy (``senders.yaml``); empty if no step has a value."""
        spm_row = None
        for k in range(i + 1, len(m.segments)):
            if m.name(k) == "OBR":
                break
            if m.name(k) == "SPM":
                spm_row = k
                break
        used = {r.number for r in msg.reports}
        for step in steps:
            parts: list[str] = []
            places: list[str] = []
            for loc in step.split("+"):
                seg, fld = _locator(loc.strip())
                row = {"OBR": i, "MSH": 0, "SPM": spm_row, "PID": m.first_index("PID")}.get(seg)
                if row is None:
                    break
                value = m.value(row, fld)
                if seg == "SPM" and fld == 2 and not value:
                    value = m.value(row, fld, 2)  # EIP: placer id, else filler id
                if not value:
                    break
                parts.append(value)
                places.append(m.where(row, fld))
            else:
                number = "-".join(parts)
                if number in used:
                    number = f"{number}-{m.value(i, 1) or m.counts[i]}"
                msg.issues.append(Issue("information", "informational", m.where(i, 3),
                                        f"OBR-3 and OBR-2 are empty: report number {shown(number)} taken from "
                                        f"{' and '.join(places)} as this sender's identity policy says", "0"))
                return number
        return ""

    def _alternate(self, m: _Msg, i: int) -> Coded | None:
        """The alternate triplet of OBX-3 (components 4-6), if sent."""
        _, fld = _locator(self.table.get("result", {}).get("alternate_code", "OBX-3"))
        return _alternate_triplet(m.comps(i, fld))

    def _value_alternate(self, m: _Msg, i: int, res: ResultFacts) -> Coded | None:
        """The alternate triplet of a coded OBX-5 (CE/CWE components 4-6, e.g. a SNOMED CT code), if sent."""
        if res.value_kind != "coded":
            return None
        reps = m.reps(i, self._result_fields["value"])
        alternate = _alternate_triplet([m.unescape(c) for c in reps[0]]) if reps else None
        return alternate if alternate != res.value else None

    # -- results -------------------------------------------------------------------------

    def _result(self, m: _Msg, i: int, issues: list[Issue]) -> ResultFacts | None:
        fields = self._result_fields

        def fld(key: str, default: str) -> int:
            return fields[key]

        code = m.comps(i, fld("code", "OBX-3"))
        coded = Coded(code[0].strip() if code else "", code[1].strip() if len(code) > 1 else "",
                      code[2].strip() if len(code) > 2 else "")
        if not coded.code:
            # only the alternate triplet sent (``^^^4544-3^Hct^LN``): it stands for the first, as a code sent
            # there alone would (a LOINC kept as LOINC and as the sender's own code)
            coded = self._alternate(m, i) or coded
        if not coded.code:
            issues.append(Issue("error", "required", m.where(i, 3),
                                "observation identifier (local item code) is empty", "101"))
            return None
        res = ResultFacts(location=m.where(i), code=coded)
        vt_fld = fld("value_type", "OBX-2")
        value_type = m.value(i, vt_fld).upper()
        val_fld = fld("value", "OBX-5")
        reps = m.reps(i, val_fld)
        res.status = m.value(i, fld("status", "OBX-11")).upper()
        res.reference_range = m.unescape(m.raw(i, fld("reference_range", "OBX-7"))).strip()
        flags = (m.unescape(r[0]).strip() for r in m.reps(i, fld("flags", "OBX-8")) if r)
        res.flags = [f for f in flags if f]
        res.unit = self._unit(m, i, fld("unit", "OBX-6"), issues)
        obs_time = m.value(i, fld("observed_at", "OBX-14"))
        if obs_time:
            try:
                res.observed_at = to_fhir_datetime(obs_time, self.offset)
            except DateTimeError as exc:
                issues.append(Issue("error", "value", m.where(i, 14), str(exc), "102"))
        if not reps or not any(any(c.strip() for c in rep) for rep in reps):
            return res  # no value: the mapping stage decides on dataAbsentReason
        kind = self.value_types.get(value_type)
        where = m.where(i, val_fld)
        if kind is None:
            issues.append(Issue("error", "not-supported", m.where(i, vt_fld),
                                f"value type {_plain(value_type) or '(empty)'} is not supported "
                                f"(supported: {', '.join(sorted(self.value_types))})", "102"))
            return None
        if kind in ("coded", "datetime", "structured-numeric") and sum(
                1 for rep in reps if any(c.strip() for c in rep)) > 1:
            # one Observation holds one value of these types: which repetition is the result cannot be told
            issues.append(Issue("error", "value", where,
                                f"value type {value_type} takes one value, {len(reps)} repetitions sent: send one "
                                "OBX per value (or value type ST for a text of several)", "102"))
            return None
        if kind == "string":
            res.value_kind = "string"
            res.value = "\n".join(m.unescape(m.seps["component"].join(rep)) for rep in reps)
            if res.unit:
                issues.append(Issue("warning", "value", m.where(i, fld("unit", "OBX-6")),
                                    f"unit {shown(res.unit)} is not kept: value type {value_type} holds text "
                                    "(a number with a unit is sent as NM or SN)", "102"))
            if text_too_long(res.value):
                issues.append(Issue("error", "value", where,
                                    f"text of {len(res.value.encode('utf-8'))} bytes (UTF-8): at most "
                                    f"{MAX_TEXT_BYTES} are taken in one field", "102"))
                return None
        elif kind == "coded":
            c = [m.unescape(x).strip() for x in reps[0]]
            res.value_kind = "coded"
            res.value = Coded(c[0], c[1] if len(c) > 1 else "", c[2] if len(c) > 2 else "")
        elif kind == "datetime":
            try:
                res.value = to_fhir_datetime(m.unescape(reps[0][0]), self.offset)
                res.value_kind = "datetime"
            except DateTimeError as exc:
                issues.append(Issue("error", "value", where, f"{exc} for value type {value_type}", "102"))
        elif kind == "quantity":
            if len(reps) > 1:
                issues.append(Issue("error", "value", where,
                                    f"value type {value_type} takes one number, {len(reps)} repetitions sent",
                                    "102"))
                return None
            text = m.unescape(m.seps["component"].join(reps[0])).strip()
            q = parse_number(text)
            if q is None:
                issues.append(Issue("error", "value", where, f"{shown(text)} {number_problem(text)} for value type "
                                    f"{value_type}", "102"))
                return None
            res.value_kind, res.value = "quantity", q
        elif kind == "structured-numeric":
            self._structured_numeric(m, reps[0], where, res, issues)
        return res

    def _unit(self, m: _Msg, i: int, fld: int, issues: list[Issue]) -> str:
        comps = m.comps(i, fld)
        if not comps:
            return ""
        unit = comps[0].strip()
        if not unit and len(comps) > 1 and comps[1].strip():
            return comps[1].strip()  # sent as its text alone (``^10*9/L``): the text is the unit
        # "10^9/L" sent without escaping the ^ arrives as components "10" and "9/L".
        if unit.isdigit() and len(comps) > 1 and comps[1][:1].isdigit():
            joined = f"{unit}^{comps[1].strip()}"
            issues.append(Issue("warning", "value", m.where(i, fld),
                                f"unit {shown(joined)} contains an unescaped '^' (should be \\S\\); read as one unit",
                                "102"))
            return joined
        return unit

    def _structured_numeric(self, m: _Msg, comps: list[str], where: str, res: ResultFacts,
                            issues: list[Issue]) -> None:
        c = [m.unescape(x).strip() for x in comps] + ["", "", "", ""]
        comparator, num1, sep, num2 = c[0], c[1], c[2], c[3]
        first = parse_number(num1)
        if first is None and not num1 and comparator and comparator not in COMPARATORS and comparator != "=":
            # (a value written as NM's under SN, 'abc' or '6.8': its first component is the comparator's place)
            issues.append(Issue("error", "value", where, f"{shown(comparator)} is not a value of type SN (written "
                                "comparator^number, e.g. <^0.05 or ^6.8)", "102"))
            return
        if first is None or first.comparator:
            issues.append(Issue("error", "value", where, f"{shown(num1)} {number_problem(num1)} for value type SN",
                                "102"))
            return
        if sep in ("-", "~") and num2:
            second = parse_number(num2)
            if second is None or comparator:
                issues.append(Issue("error", "value", where, f"{shown('^'.join(c[:4]))} is not a valid SN range",
                                    "102"))
                return
            res.value_kind, res.value = "range", (first, second)
        elif sep in (":", "/") and num2:
            second = parse_number(num2)
            if second is None or comparator:
                issues.append(Issue("error", "value", where, f"{shown('^'.join(c[:4]))} is not a valid SN ratio",
                                    "102"))
                return
            res.value_kind, res.value = "ratio", (first, second)
        elif sep or num2:
            issues.append(Issue("error", "value", where, f"SN separator {shown(sep)} is not supported", "102"))
        else:
            if comparator and comparator not in COMPARATORS and comparator != "=":
                issues.append(Issue("error", "value", where, f"SN comparator {shown(comparator)} is not supported",
                                    "102"))
                return
            first.comparator = COMPARATORS.get(comparator, "")
            res.value_kind, res.value = "quantity", first


# -- profile problems in HL7 terms ---------------------------------------------------------

def _fields_of(fields: list[str], kind: str, record: Any, report: ReportFacts | None) -> list[str]:
    """HL7 locations (``OBR[1]-7``) of ``fields`` for the record a resource came from."""
    out: list[str] = []
    for loc in fields:
        seg, _, fld = loc.partition("-")
        if seg == "OBX":
            if kind == "Observation":
                out.append(f"{record.location}-{fld}")
            elif report is not None:
                out.extend(f"{res.location}-{fld}" for res in report.results[:2])
        elif seg == "OBR" and report is not None:
            out.append(f"{report.location}-{fld}")
        elif seg == "SPM" and report is not None and report.extra.get("spm"):
            out.append(f"{report.extra['spm']}-{fld}")
        elif seg == "PID" and kind == "Patient":
            out.append(f"{record.location}-{fld}")
        elif seg in ("MSH", "PRT", "NTE") and (seg == "MSH" or report is not None):
            out.append(f"{seg}[1]-{fld}" if seg == "MSH" else f"{seg}-{fld}")
    return list(dict.fromkeys(out))


def explain_issues(msg: SourceMessage, bundle: dict[str, Any], issues: list[Issue],
                   table: dict[str, Any]) -> list[Issue]:
    """Problems found on the converted report, located and worded as HL7 fields for the sender's ACK.

    ``table`` is ``mappings/hl7v2/fhir-fields.yaml``. Each problem located at
    ``Bundle.entry[n].resource...`` is traced to the record (OBX, OBR, PID, SPM)
    the resource was built from, and its element to the fields it came from:
    ``OBR[1]-7 and OBX[1]-14 are empty: the collection time is required``. A
    problem that cannot be traced keeps an HL7-worded text naming the segment
    it can (or none); its FHIR path is kept in ``extra["fhir_path"]``, never in
    the answer.
    """
    return trace(msg, bundle, issues, table, lambda rule, kind, record, report: _fields_of(
        list(rule["fields"]), kind, record, report), untraced="no HL7 field is mapped to")
