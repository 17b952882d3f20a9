"""Seeded mutation of the real samples, for tests/test_fuzz.py.

Every mutator takes a :class:`random.Random` and one sample (one HL7 v2 message,
one CDA document, one CSV export, one FHIR JSON Bundle) and returns mutated bytes.
Mutations follow each format's structure (fields, components, segments, rows and
columns, XML text and attributes, JSON members) as well as its bytes, so that
they reach the stages after parsing: dates, numbers, codes, identifiers, marks,
signing. The same seed gives the same inputs.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from gateway.adapters.hl7v2 import split_messages

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

#: Long values: no answer may quote them back whole.
LONG = "x" * 5_000
VERY_LONG = "x" * 100_000
HUGE_INT = "9" * 5000
#: Values that broke or might break a stage: partial and malformed dates, numbers beyond double range,
#: control bytes, separators, invalid encodings, very long values.
TEXT_TOKENS = [
    "", " ", "2024", "2024-06", "202406", "2024061", "20240601", "2024060112", "202406011230", "20240601123060",
    "20241301", "20240230", "2024-06-01T25:00:00", "2024-06-01 12:30", "2024/6/1 8:05", "2024-6-1",
    "20240601123000.1234+0800", "20240601123000+9999", "20240601123000-0000", "19000229", "0000", "99991231",
    "1e400", "-1E-400", "1E308", "1.7976931348623159e308", HUGE_INT, "-" + HUGE_INT, "0." + "0" * 400 + "1",
    "0", "-0", "1.", ".5", "+5", "<0.5", ">=10", "≤3", "NaN", "Infinity", "12,5", "١٢٣", "１２３",
    "\x00", "\x01\x02", "\x7f", "\ufeff", "\u202e", "\ud7ff", "&amp;", "]]>", "<x>", "\"", "'", "\\", "|", "^", "~",
    "&", "\\S\\", "\\E\\", "\\X00\\", "\\.br\\", "\\", "\\Z99\\", "M", "F", "U", "9", "男", "未知", "阴性",
    "510402199111283724", "51040219911128372X", "511921198001011237", "91510300MA6AAB012Y", "ZZZZZZ",
    "ORU^R01", "ORU^R01^ORU_R01", "ADT^A01", "2.3.1", "2.5.1", "2.9", "UNICODE UTF-8", "GB 18030-2000", "8859/1",
    "UTF\x008", "F", "C", "P", "X", "mmol/L", "10\\S\\9/L", "μmol/L", "%", "H", "L", "↑", "N",
    LONG, "中" * 5000, VERY_LONG,
]
BYTE_TOKENS = [b"\x00", b"\xff", b"\xfe\xff", b"\x81", b"\xe4\xb8", b"\xd6\xd0", b"\xef\xbb\xbf", b"\x0b", b"\x1c",
               b"\r", b"\n", b"\r\n", b"\t", b"\xc0\x80", b"\xed\xa0\x80"]


def _text(rng: random.Random) -> str:
    return rng.choice(TEXT_TOKENS)


def _bytes(rng: random.Random, codec: str = "utf-8") -> bytes:
    if rng.random() < 0.15:
        return rng.choice(BYTE_TOKENS)
    return _text(rng).encode(codec, "surrogatepass")


def byte_mutation(rng: random.Random, data: bytes) -> bytes:
    """Flip, cut, insert, delete or repeat bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not buf:
            return bytes(rng.choice(BYTE_TOKENS))
        i = rng.randrange(len(buf))
        kind = rng.randrange(5)
        if kind == 0:
            buf[i] = rng.randrange(256)
        elif kind == 1:
            del buf[i:]
        elif kind == 2:
            buf[i:i] = _bytes(rng)
        elif kind == 3:
            del buf[i:i + rng.randint(1, 200)]
        else:
            buf[i:i] = buf[i:i + rng.randint(1, 200)]
    return bytes(buf)


# -- HL7 v2 ------------------------------------------------------------------------------------


def hl7_samples() -> list[bytes]:
    demo = ROOT / "gateway" / "demo" / "data" / "hl7v2"
    files = sorted((DATA / "hl7v2").glob("*.hl7")) + sorted(demo.glob("*.hl7"))
    return [m for f in files for m in split_messages(f.read_bytes())]


def mutate_hl7(rng: random.Random, data: bytes) -> bytes:
    """A mutated ER7 message: fields, components, segments, separators, encoding or bytes."""
    if rng.random() < 0.1:
        return byte_mutation(rng, data)
    codec = "gb18030" if b"GB" in data.split(b"\r", 1)[0] else "utf-8"
    segments = data.split(b"\r")
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        s = rng.randrange(len(segments))
        if kind < 0.6:  # one field (or one component of it) replaced
            fields = segments[s].split(b"|")
            f = rng.randrange(1, max(2, len(fields) + 2))
            while len(fields) <= f:
                fields.append(b"")
            value = _bytes(rng, codec)
            if rng.random() < 0.3 and b"^" in fields[f]:
                comps = fields[f].split(b"^")
                comps[rng.randrange(len(comps))] = value
                value = b"^".join(comps)
            fields[f] = value
            segments[s] = b"|".join(fields)
        elif kind < 0.7:
            segments.insert(s, segments[rng.randrange(len(segments))])
        elif kind < 0.8 and len(segments) > 1:
            del segments[s]
        elif kind < 0.85:
            segments[s] = segments[s][:rng.randrange(len(segments[s]) + 1)]
        elif kind < 0.9 and segments[0].startswith(b"MSH") and len(segments[0]) > 8:
            msh = bytearray(segments[0])  # odd encoding characters
            msh[rng.randrange(3, 8)] = rng.choice(b"|^~\\&#*%$ \x00")
            segments[0] = bytes(msh)
        elif kind < 0.95:
            segments.insert(s, rng.choice([b"OBX|1|NM|", b"OBR|", b"PID|||", b"ZZZ|1", b"NTE|1||" + _bytes(rng),
                                           b"SPM|1|||" + _bytes(rng), b"MSH|^~\\&|"]))
        else:
            segments[s] = segments[s].replace(b"|", rng.choice([b"|", b"||", b"^", b"~"]))
    return b"\r".join(segments)


# -- CDA ------------------------------------------------------------------------------------------

_ATTR = re.compile(rb'="([^"<>]*)"')
_TEXT_NODE = re.compile(rb">([^<>]+)<")
_ELEMENT_LINE = re.compile(rb"\n[ \t]*<[^!?/][^\n]*")


def cda_samples() -> list[bytes]:
    return [f.read_bytes() for f in sorted((DATA / "cda").glob("*.xml"))]


def _xml_escape(value: bytes) -> bytes:
    return value.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b'"', b"&quot;")


def mutate_cda(rng: random.Random, data: bytes) -> bytes:
    """A mutated WS/T 500.7 document: attribute values, text, elements, declarations or bytes."""
    if rng.random() < 0.1:
        return byte_mutation(rng, data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        pattern = _ATTR if kind < 0.55 else _TEXT_NODE if kind < 0.8 else _ELEMENT_LINE
        found = list(pattern.finditer(data))
        if not found:
            continue
        m = rng.choice(found)
        if pattern is _ELEMENT_LINE:
            data = data[:m.start()] + (b"" if rng.random() < 0.7 else m.group(0) * 2) + data[m.end():]
        else:
            value = _bytes(rng)
            if rng.random() < 0.9:
                value = _xml_escape(value)
            data = data[:m.start(1)] + value + data[m.end(1):]
    if rng.random() < 0.03:
        data = data.replace(b"?>", b'?><!DOCTYPE x [<!ENTITY e "' + b"A" * 1000 + b'">]>', 1)
    return data


# -- CDC CSV ---------------------------------------------------------------------------------------


def csv_samples() -> list[bytes]:
    """Each export whole, and cut into one file per exam (header and that exam's rows): smaller, quicker inputs."""
    files = sorted((DATA / "csv").glob("*.csv")) + sorted((ROOT / "gateway" / "demo" / "data" / "csv").glob("*.csv"))
    samples = []
    for f in files:
        data = f.read_bytes()
        samples.append(data)
        end = b"\r\n" if b"\r\n" in data else b"\n"
        header, *rows = data.split(end)
        exams: dict[bytes, list[bytes]] = {}
        for row in rows:
            if row.strip():
                exams.setdefault(row.split(b",", 1)[0], []).append(row)
        samples += [end.join([header, *group]) + end for group in exams.values()]
    return samples


def mutate_csv(rng: random.Random, data: bytes) -> bytes:
    """A mutated export: cells, rows, columns, quoting, line ends, encoding or bytes."""
    if rng.random() < 0.1:
        return byte_mutation(rng, data)
    gbk = not data.startswith(b"\xef\xbb\xbf")
    try:
        data.decode("utf-8")
        gbk = False
    except UnicodeDecodeError:
        pass
    codec = "gb18030" if gbk else "utf-8"
    end = b"\r\n" if b"\r\n" in data else b"\n"
    rows = data.split(end)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        r = rng.randrange(len(rows))
        if kind < 0.65:
            cells = rows[r].split(b",")
            c = rng.randrange(len(cells))
            value = _bytes(rng, codec)
            if rng.random() < 0.2 or b"," in value or b'"' in value:
                value = b'"' + value.replace(b'"', b'""') + b'"'
            cells[c] = value
            rows[r] = b",".join(cells)
        elif kind < 0.75:
            rows.insert(r, rows[rng.randrange(len(rows))])
        elif kind < 0.85 and len(rows) > 1:
            del rows[r]
        elif kind < 0.92:  # one column dropped from every row
            c = rng.randrange(len(rows[0].split(b",")))
            rows = [b",".join(x for i, x in enumerate(row.split(b",")) if i != c) for row in rows]
        else:
            rows[r] = rows[r] + rng.choice([b",", b'"', b',""', b"\r", b"\x00", b"," * 30])
    return end.join(rows)


# -- FHIR JSON -------------------------------------------------------------------------------------


def fhir_samples() -> list[bytes]:
    return [f.read_bytes() for f in sorted((DATA / "registry").glob("*.json"))]


_RAW = "\ue000raw{}\ue000"  # a placeholder replaced by raw JSON text after serialising
_RAW_VALUES = ["1e400", "-1E+999", HUGE_INT, "1E-400", "0.10000000000000000000000000000001", "-0", "1E2",
               "12345678901234567890"]


_NUMBER_MEMBERS = ["valueInteger", "valueDecimal", "valuePositiveInt", "valueUnsignedInt", "multipleBirthInteger",
                   "value", "total", "rank", "numberOfSeries", "sequence"]


def _nodes(value: object, out: list[tuple[object, object]]) -> None:
    """(container, key) of every member and item, iteratively."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                out.append((item, k))
                stack.append(v)
        elif isinstance(item, list):
            for i, v in enumerate(item):
                out.append((item, i))
                stack.append(v)


def _deep(depth: int) -> str:
    """JSON text nesting ``depth`` levels of extensions."""
    return '{"extension":[' * depth + "{}" + "]}" * depth


def mutate_fhir(rng: random.Random, data: bytes) -> bytes:
    """A mutated report Bundle: wrong types, huge numbers, missing members, deep nesting, text or bytes."""
    if rng.random() < 0.1:
        return byte_mutation(rng, data)
    doc = json.loads(data)
    raws: list[str] = []
    nodes: list[tuple[object, object]] = []
    _nodes(doc, nodes)
    for _ in range(rng.randint(1, 3)):
        container, key = rng.choice(nodes)
        if isinstance(container, dict) and key not in container:
            continue  # removed by an earlier mutation
        kind = rng.random()
        if kind < 0.2 and isinstance(container, dict):
            del container[key]  # type: ignore[arg-type]
            continue
        if kind < 0.25 and isinstance(container, dict):  # a number where the type model wants a whole or a decimal
            raws.append(rng.choice(_RAW_VALUES))
            container[rng.choice(_NUMBER_MEMBERS)] = _RAW.format(len(raws) - 1)
            continue
        if kind < 0.45:
            new: object = _text(rng)
        elif kind < 0.6:
            raws.append(rng.choice(_RAW_VALUES))
            new = _RAW.format(len(raws) - 1)
        elif kind < 0.85:
            new = rng.choice([None, True, 0, -1, 1.5, [], {}, [None], {"": ""}, ["x"] * 3, {"value": LONG}])
        elif kind < 0.95:
            raws.append(_deep(rng.choice([5, 120, 2000])))
            new = _RAW.format(len(raws) - 1)
        else:
            new = {"resourceType": rng.choice(["Observation", "Patient", "Bundle", "", "X"]), "id": _text(rng)}
        container[key] = new  # type: ignore[index]
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.3, indent=1 if rng.random() < 0.2 else None)
    for n, raw in enumerate(raws):
        text = text.replace(json.dumps(_RAW.format(n), ensure_ascii=False), raw)
        text = text.replace(json.dumps(_RAW.format(n)), raw)
    if rng.random() < 0.02:
        text = "[" * 100_000 + "]" * 100_000
    return text.encode("utf-8", "surrogatepass")


SAMPLES = {"hl7v2": hl7_samples, "cda": cda_samples, "cdc-csv": csv_samples, "fhir": fhir_samples}
MUTATORS = {"hl7v2": mutate_hl7, "cda": mutate_cda, "cdc-csv": mutate_csv, "fhir": mutate_fhir}


def inputs(rng: random.Random, fmt: str, count: int) -> list[bytes]:
    """``count`` mutated inputs of ``fmt`` (the seed decides which sample and which mutations)."""
    samples = SAMPLES[fmt]()
    return [MUTATORS[fmt](rng, rng.choice(samples)) for _ in range(count)]


def mutate_query(rng: random.Random) -> str:
    """A search query string with odd names, values, repetitions and encodings."""
    names = ["_count", "_offset", "date", "code", "patient.identifier", "subject:Patient.identifier", "status",
             "identifier", "_id", "category", "agent", "entity", "patient", "_sort", "_format", "unknown", "", "date:x"]
    values = ["", "5", "-1", HUGE_INT, "2024", "ge2024-06", "lt2024-13-01", "eq", "1e400", "http://x|1", "|", "a,b,,",
              "%00", "%ff%fe", "ge" + HUGE_INT, "gt2024-06-01T25:00", "x" * 5000, "١٢", "²", "sa2024", "ap2024-06-01"]
    parts = []
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(names)
        value = rng.choice(values)
        parts.append(f"{name}={value}")
    return "&".join(parts)
