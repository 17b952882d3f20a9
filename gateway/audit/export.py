"""Audit export: matching entries as NDJSON (one AuditEvent a line) or CSV, streamed.

Both read the log page by page (:func:`gateway.audit.query.iter_matches`) and
yield one line at a time, so an export of a million entries needs no more
memory than one page. NDJSON carries the full R4 AuditEvents (FHIR bulk-data
style); CSV one row per event with the columns auditors sort and filter on,
plus the entry's hash and the hash it follows so a spreadsheet can be checked
against ``gateway audit verify``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from gateway.audit.log import Entry

__all__ = ["FORMATS", "CSV_COLUMNS", "ndjson_lines", "csv_lines", "lines"]

FORMATS = ("ndjson", "csv")

CSV_COLUMNS = (
    "id",
    "recorded",
    "kind",
    "type",
    "subtype",
    "action",
    "outcome",
    "outcome_desc",
    "agents",
    "patient",
    "entities",
    "hash",
    "prev_hash",
)


def ndjson_lines(entries: Iterable[Entry]) -> Iterator[str]:
    """One AuditEvent per line (UTF-8 text kept as is), each line ending in a newline."""
    for entry in entries:
        yield json.dumps(entry.event(), ensure_ascii=False, separators=(",", ":")) + "\n"


def _ref(ref: dict[str, Any]) -> str:
    if ref.get("reference"):
        return str(ref["reference"])
    ident = ref.get("identifier") or {}
    text = f"{ident.get('system', '')}|{ident.get('value', '')}" if ident.get("system") else str(ident.get("value", ""))
    return text or str(ref.get("display", ""))


def _row(entry: Entry) -> list[str]:
    event = entry.event()
    agents: list[str] = []
    patients: list[str] = []
    entities: list[str] = []
    for agent in event.get("agent", []):
        role = agent["type"]["coding"][0]["code"] if agent.get("type") else ""
        name = agent.get("name") or agent.get("who", {}).get("display")
        agents.append(f"{role}={_ref(agent.get('who', {}))}" + (f" ({name})" if name else ""))
    for entity in event.get("entity", []):
        if entity.get("type", {}).get("code") == "log-entry" or not entity.get("what"):
            continue
        (patients if entity.get("role", {}).get("code") == "1" else entities).append(_ref(entity["what"]))
    subtype = event.get("subtype", [{}])[0]
    return [
        event["id"],
        event["recorded"],
        entry.kind,
        f"{event['type'].get('system', '')}|{event['type']['code']}",
        f"{subtype.get('system', '')}|{subtype.get('code', '')}",
        event.get("action", ""),
        event.get("outcome", ""),
        event.get("outcomeDesc", ""),
        "; ".join(agents),
        "; ".join(patients),
        "; ".join(entities),
        entry.hash.hex(),
        entry.prev_hash.hex(),
    ]


def csv_lines(entries: Iterable[Entry]) -> Iterator[str]:
    """A header line, then one CSV line per entry (RFC 4180 quoting, ``\\r\\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(CSV_COLUMNS)
    yield flush()
    for entry in entries:
        writer.writerow(_row(entry))
        yield flush()


def lines(entries: Iterable[Entry], fmt: str) -> Iterator[str]:
    """The export in format ``fmt`` (``ndjson`` or ``csv``).

    :raises ValueError: an unknown format (the CLI and API offer only these two).
    """
    if fmt == "ndjson":
        return ndjson_lines(entries)
    if fmt == "csv":
        return csv_lines(entries)
    raise ValueError(f"unknown export format {fmt!r}")
