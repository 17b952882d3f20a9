"""HL7 v3 互联互通 messages on the CDA channel: the WS/T 500.7 document they carry, and their acknowledgement.

Hospital platforms of the 互联互通 assessment send a 检验报告 as an HL7 v3
message (``POLB_IN224000UV01``), bare or in a SOAP envelope, sometimes as the
text of a web-service parameter (``<HIPMessageServer><message>`` holding the
message as escaped XML or CDATA). The message carries the ClinicalDocument
under ``controlActProcess/subject``: as an element, or as the base64 or
escaped-XML text of an element (an ED such as ``<text representation="B64"
mediaType="text/xml">``). :func:`unwrap` finds it; the CDA adapter reads it as
it reads a bare document. One report per message: a second ClinicalDocument
(as an element or as text), a second element in the SOAP ``Body`` or a second
message in a web-service operation is refused, naming its XPath, never
dropped. The sender is answered with an ``MCCI_IN000002UV01``
acknowledgement (:func:`acknowledgement`): ``acknowledgement/@typeCode``
AA/AE/AR, ``targetMessage`` naming the request's id, one
``acknowledgementDetail`` per issue with the XPath it names.

Every text payload is held to the same rules as the request: the size limit,
no DTD or entity declaration, the safe parser (the caller's ``parse``).
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from gateway.adapters.base import SourceMessage
from gateway.errors import Issue, shown

__all__ = ["V3_NS", "Envelope", "unwrap", "sniff", "acknowledgement", "answer_media_type"]

V3_NS = "urn:hl7-org:v3"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
#: Media type of the acknowledgement by the request's envelope.
MEDIA_TYPES = {SOAP12: "application/soap+xml", SOAP11: "text/xml", "": "application/hl7-v3+xml"}
#: OIDs of the 互联互通 message header: message id, interaction id, device (system) id.
MESSAGE_ID_OID = "2.16.156.10011.2.5.1.1"
INTERACTION_OID = "2.16.156.10011.2.5.1.2"
DEVICE_OID = "2.16.156.10011.2.5.1.3"
_INTERACTION = re.compile(r"^[A-Z]{4}_IN\d{6}(UV\d{0,2})?$")
_SNIFF = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?([A-Z]{4}_IN\d{6}(?:UV\d{0,2})?|Envelope)[\s>/]")
_SNIFF_SOAP = re.compile(rb"(http://schemas\.xmlsoap\.org/soap/envelope/|http://www\.w3\.org/2003/05/soap-envelope)")
_ID_CHARS = 64  # message and system ids echoed in the acknowledgement at most
_DETAILS = 50  # acknowledgementDetail elements at most; the rest are counted
_TEXT_CHARS = 500
_DETAIL_TYPE = {"error": "E", "warning": "W", "information": "I"}

Parse = Callable[[bytes, str], tuple[Any, list[Issue]]]


@dataclass
class Envelope:
    """What the acknowledgement of a v3 message needs of the request."""

    interaction: str = ""  # the message type (root element), e.g. POLB_IN224000UV01
    message_id: str = ""
    message_id_root: str = ""
    sender: str = ""  # the sending system (device id)
    receiver: str = ""
    soap: str = ""  # the SOAP namespace of the request, "" when bare
    carrier: str = ""  # where the ClinicalDocument was found

    def as_extra(self) -> dict[str, str]:
        return dict(self.__dict__)


def _local(el: Any) -> str:
    return str(etree.QName(el).localname) if isinstance(el.tag, str) else ""


def _ns(el: Any) -> str:
    return str(etree.QName(el).namespace or "") if isinstance(el.tag, str) else ""


def _elements(el: Any) -> list[Any]:
    return [c for c in el if isinstance(c.tag, str)]


def _path(el: Any) -> str:
    from gateway.adapters.cda import _path as cda_path

    return cda_path(el)


def _device(message: Any, role: str) -> str:
    for xpath in (f"v3:{role}/v3:device/v3:id/v3:item/@extension", f"v3:{role}/v3:device/v3:id/@extension",
                  f"v3:{role}/@code"):
        found = [str(v).strip() for v in message.xpath(xpath, namespaces={"v3": V3_NS}) if str(v).strip()]
        if found:
            return found[0]
    return ""


def sniff(data: bytes) -> Envelope | None:
    """Whether unparsed bytes look like a v3 message or a SOAP envelope (to answer a refusal in kind)."""
    head = data[:65536]
    m = _SNIFF.search(head)
    if m is None:
        return None
    soap = _SNIFF_SOAP.search(head)
    name = m.group(1).decode("ascii")
    return Envelope(interaction="" if name == "Envelope" else name,
                    soap=soap.group(1).decode("ascii") if soap else "")


def unwrap(root: Any, parse: Parse, taken: list[str], depth: int = 0) -> tuple[Any, Envelope | None, list[Issue]]:
    """(the ClinicalDocument element, the envelope when it came in one, issues refusing the input).

    ``root`` is the parsed input's root; a bare ClinicalDocument comes back as it is with no envelope.
    ``parse(bytes, where)`` parses a text payload under the request's rules.
    """
    env = Envelope()
    node = root
    if _local(node) == "Envelope" and _ns(node) in (SOAP11, SOAP12):
        env.soap = _ns(node)
        body = next((c for c in _elements(node) if _local(c) == "Body"), None)
        content = _elements(body) if body is not None else []
        if not content:
            return None, env, [Issue("error", "structure", f"{_path(node)}/Body",
                                     "SOAP envelope has an empty Body: no HL7 v3 message in it", "100")]
        if len(content) > 1:
            return None, env, [Issue("error", "structure", _path(content[1]),
                                     f"the SOAP Body holds {len(content)} elements "
                                     f"({', '.join(shown(_local(c)) for c in content[:5])}); send one HL7 v3 "
                                     "message or web-service operation per request", "100")]
        node = content[0]
        if not _carried(node):
            # A web-service operation (e.g. HIPMessageServer) whose parameters carry the message, as elements
            # or as escaped text.
            found = _outermost([d for d in node.iter() if d is not node and _carried(d)])
            if len(found) > 1:
                return None, env, [Issue("error", "structure", _path(found[1]),
                                         f"SOAP operation {shown(_local(node))} carries {len(found)} HL7 v3 "
                                         "messages or ClinicalDocuments; send one report per request", "100")]
            inner = found[0] if found else None
            if inner is None:
                holders = [d for d in node.iter() if isinstance(d.tag, str) and not _elements(d)
                           and (d.text or "").lstrip().startswith("<")]
                if len(holders) > 1 and not depth:
                    return None, env, [Issue("error", "structure", _path(holders[1]),
                                             f"SOAP operation {shown(_local(node))} carries {len(holders)} "
                                             "parameters holding XML text; send one HL7 v3 message per request",
                                             "100")]
                text_holder = holders[0] if holders else None
                if text_holder is None or depth:
                    return None, env, [Issue("error", "not-supported", _path(node),
                                             f"SOAP operation {shown(_local(node))} carries no HL7 v3 message or "
                                             "ClinicalDocument", "200")]
                parsed, issues = parse(_text_payload(text_holder.text or ""), _path(text_holder))
                if parsed is None:
                    return None, env, issues
                document, inner_env, issues = unwrap(parsed, parse, taken, depth + 1)
                merged = inner_env or Envelope()
                merged.soap = env.soap
                merged.carrier = merged.carrier or _path(text_holder)
                return document, merged, issues
            node = inner
    if _local(node) == "ClinicalDocument":
        return node, (env if env.soap else None), []
    if _ns(node) != V3_NS or not _INTERACTION.match(_local(node)):
        return node, (env if env.soap else None), []  # not a v3 message: the CDA adapter names what it is
    env.interaction = _local(node)
    ns = {"v3": V3_NS}
    ident = node.xpath("v3:id", namespaces=ns)
    if ident:
        env.message_id = (ident[0].get("extension") or "").strip()
        env.message_id_root = (ident[0].get("root") or "").strip()
    env.sender, env.receiver = _device(node, "sender")[:_ID_CHARS], _device(node, "receiver")[:_ID_CHARS]
    where = _path(node)
    if len(env.message_id) > _ID_CHARS or len(env.message_id_root) > _ID_CHARS:
        env.message_id = env.message_id_root = ""  # never echoed
        return None, env, [Issue("error", "value", f"{where}/id",
                                 f"the message id (消息流水号) is longer than {_ID_CHARS} characters", "102")]
    if env.interaction not in taken:
        return None, env, [Issue("error", "not-supported", where,
                                 f"HL7 v3 interaction {shown(env.interaction)} is not taken here; this channel "
                                 f"takes {', '.join(taken)} carrying a WS/T 500.7 检验报告 ClinicalDocument", "200")]
    declared = [str(v).strip() for v in node.xpath("v3:interactionId/@extension", namespaces=ns)]
    if declared and declared[0] != env.interaction:
        return None, env, [Issue("error", "not-supported", f"{where}/interactionId/@extension",
                                 f"the interactionId {shown(declared[0][:_ID_CHARS])} is not the message's type "
                                 f"{env.interaction}: the message cannot be read as a {env.interaction}", "200")]
    if not env.message_id:
        return None, env, [Issue("error", "required", f"{where}/id/@extension",
                                 "the message has no id (消息流水号): it cannot be acknowledged", "101")]
    act = node.xpath("v3:controlActProcess", namespaces=ns)
    if not act:
        return None, env, [Issue("error", "required", f"{where}/controlActProcess",
                                 "the message has no controlActProcess: it carries no report", "101")]
    # Every ClinicalDocument the message carries, as an element or as the text of an element: one is taken.
    inside = set(act[0].xpath(".//v3:ClinicalDocument", namespaces=ns))
    carried: list[tuple[Any, Any]] = []  # (where it is, the ClinicalDocument), in document order
    for holder in act[0].iter():
        if holder in inside:
            carried.append((holder, holder))
            continue
        if not isinstance(holder.tag, str) or _elements(holder):
            continue
        if inside and any(a in inside for a in holder.iterancestors()):
            continue  # a text of a document carried as an element (e.g. an observationMedia value)
        text = (holder.text or "").strip()
        if not text:
            continue
        payload: bytes | None = None
        media = (holder.get("mediaType") or "").strip().lower()
        if media and "xml" not in media:
            continue  # an attachment the sender declares as something else (a PDF, an image): not a report
        if (holder.get("representation") or "").upper() == "B64":
            try:
                payload = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
            except (binascii.Error, ValueError):
                return None, env, [Issue("error", "value", _path(holder),
                                         "the base64 text of the document cannot be decoded", "102")]
        elif text.startswith("<"):
            payload = _text_payload(text)
        if payload is None:
            continue
        parsed, issues = parse(payload, _path(holder))
        if parsed is None:
            return None, env, issues
        if _local(parsed) != "ClinicalDocument":
            return None, env, [Issue("error", "not-supported", _path(holder),
                                     f"the text of this element is a {shown(_local(parsed))}, not a ClinicalDocument",
                                     "200")]
        carried.append((holder, parsed))
    if len(carried) > 1:
        return None, env, [Issue("error", "structure", _path(carried[1][0]),
                                 f"the message carries {len(carried)} ClinicalDocuments (the first at "
                                 f"{_path(carried[0][0])}); send one report per message", "100")]
    if carried:
        env.carrier = _path(carried[0][0])
        return carried[0][1], env, []
    return None, env, [Issue("error", "required", f"{_path(act[0])}/subject",
                             "the message carries no ClinicalDocument (as an element or as base64/XML text): "
                             "a status update without a report is not taken here", "101")]


def _carried(el: Any) -> bool:
    """Whether an element is an HL7 v3 message or a ClinicalDocument."""
    return isinstance(el.tag, str) and _ns(el) == V3_NS and bool(
        _INTERACTION.match(_local(el)) or _local(el) == "ClinicalDocument")


def _outermost(found: list[Any]) -> list[Any]:
    """The elements of ``found`` (in document order) not inside another of them."""
    chosen = set(found)
    return [el for el in found if not any(a in chosen for a in el.iterancestors())]


def answer_media_type(answer: bytes) -> str | None:
    """The media type of an acknowledgement built here; None when the answer is not one (an OperationOutcome)."""
    if b"MCCI_IN000002UV01" not in answer[:4096]:
        return None
    head = answer[:1024]
    if SOAP12.encode() in head:
        return MEDIA_TYPES[SOAP12]
    if SOAP11.encode() in head:
        return MEDIA_TYPES[SOAP11]
    return MEDIA_TYPES[""]


def acknowledgement(msg: SourceMessage, code: str, *, sender: str, now: _dt.datetime) -> bytes:
    """The ``MCCI_IN000002UV01`` answering a v3 message (in the request's SOAP envelope, if it came in one)."""
    env = dict(msg.extra.get("v3") or {})
    e = etree.Element(f"{{{V3_NS}}}MCCI_IN000002UV01", nsmap={None: V3_NS}, ITSVersion="XML_1.0")

    def sub(parent: Any, name: str, **attrs: str) -> Any:
        return etree.SubElement(parent, f"{{{V3_NS}}}{name}", {k: v for k, v in attrs.items()})

    def device(role: str, type_code: str, ident: str) -> None:
        dev = sub(sub(e, role, typeCode=type_code), "device", classCode="DEV", determinerCode="INSTANCE")
        if ident:
            sub(sub(dev, "id"), "item", root=DEVICE_OID, extension=ident)

    sub(e, "id", root=MESSAGE_ID_OID, extension=str(uuid.uuid4()))
    sub(e, "creationTime", value=now.strftime("%Y%m%d%H%M%S"))
    sub(e, "interactionId", root=INTERACTION_OID, extension="MCCI_IN000002UV01")
    sub(e, "processingCode", code="P")
    sub(e, "processingModeCode")
    sub(e, "acceptAckCode", code="NE")
    device("receiver", "RCV", str(env.get("sender", "")))
    device("sender", "SND", str(env.get("receiver", "")) or sender)
    code = code if code in ("AA", "AE", "AR") else "AE"
    ack = sub(e, "acknowledgement", typeCode=code)
    target = sub(ack, "targetMessage")
    if env.get("message_id"):
        sub(target, "id", root=str(env.get("message_id_root") or MESSAGE_ID_OID), extension=str(env["message_id"]))
    else:
        sub(target, "id", nullFlavor="UNK")
    label = _clean(msg.label())
    issues = list(msg.issues)
    if not issues or (code == "AA" and not msg.errors):
        detail = sub(ack, "acknowledgementDetail", typeCode="I")
        verdict = "accepted" if code == "AA" else "refused"
        sub(detail, "text", value=f"{label}: {verdict}")
    for issue in issues[:_DETAILS]:
        detail = sub(ack, "acknowledgementDetail", typeCode=_DETAIL_TYPE.get(issue.severity, "E"))
        sub(detail, "code", code=issue.code or "processing")
        sub(detail, "text", value=_clean(f"{label}: {issue.message}"))
        if issue.location:
            sub(detail, "location", value=_clean(issue.location))
    if len(issues) > _DETAILS:
        detail = sub(ack, "acknowledgementDetail", typeCode="I")
        sub(detail, "text", value=f"{len(issues) - _DETAILS} more issue(s) not listed; see the gateway's message "
                                  "list")
    body = e
    soap = str(env.get("soap") or "")
    if soap in (SOAP11, SOAP12):
        envelope = etree.Element(f"{{{soap}}}Envelope", nsmap={"soap": soap})
        etree.SubElement(envelope, f"{{{soap}}}Body").append(e)
        body = envelope
    return bytes(etree.tostring(body, xml_declaration=True, encoding="UTF-8"))


def _text_payload(text: str) -> bytes:
    """XML carried as text, as UTF-8 bytes: its declaration (naming the encoding of bytes it no longer is) dropped."""
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", text).strip().encode("utf-8")


def _clean(text: str) -> str:
    """Text that XML can carry: bounded, without control characters."""
    text = "".join(c if c >= " " or c in "\t\n" else " " for c in text)
    text = "".join(c for c in text if not (0xD800 <= ord(c) <= 0xDFFF) and c not in "\ufffe\uffff")
    return text if len(text) <= _TEXT_CHARS else f"{text[:_TEXT_CHARS]}… ({len(text)} characters)"
