"""Report versions: which stored copy of a report is current, and which ones a correction superseded.

A report is known by its issuer (the USCC of the performer Organization) and
its number: the 检验报告单号 (``DiagnosticReport.identifier``, system
``urn:oid:2.16.156.10011.1.33``) or a technical-service report's number (system
``…/sid/service-report/<issuer's USCC>``). Every stored Bundle — ingested here or
received from another member — adds one row per such report to
``report_versions``. A correction issued under a number of its own names the
number it corrects (extension ``replaces``): the versions under both numbers
are then versions of one report, whichever arrived first. Among the versions of one report the **current** one is
the newest correction: a ``corrected`` or ``amended`` report (or one taken back: ``cancelled``,
``entered-in-error``) over any other,
then the later ``issued`` time, then the one stored later. When at least one
correction is on record, every other version is *superseded* by the current
one, whichever order they arrived in: a correction arriving after the original
(the usual case), in the same batch, or before it (the late original is stored
as superseded at once). Without a correction, versions stored under one
DiagnosticReport id are versions of that one resource — a LIS that sends a final
report again with changed values and a later OBR-22, not marked as a correction —
and the one issued last supersedes those issued before it, in whichever order
they arrived; copies issued at the same time (a report sent again as it was)
stay current together.

A superseded version stays stored and readable (its signed copy is never
changed); its row names the version that superseded it and when. Callers
(``gateway.pipeline`` and ``gateway.exchange.service``) register a Bundle inside
the transaction that stores it and act on what :func:`register` says became
superseded: the decisions on it are withdrawn, the stored DiagnosticReport is
tagged, and a correction issued here follows the original to the members it
was pushed to.
"""
from __future__ import annotations

import datetime as _dt
import importlib.resources as _resources
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.fhir.servicereport import service_report_system
from gateway.jsonutil import OBJECT
from gateway.naming import SYSTEM_USCC, cs_url, ext_url
from gateway.store import schema
from gateway.store.db import Database, dialect, spilling, transaction


__all__ = ["SCHEMA", "SYSTEM_REPORT_NUMBER", "SUPERSEDED_TAG", "ReportVersion", "Change", "ensure_schema",
           "ReportVersionsPort", "ReportVersions",
           "versions_in", "register", "supersede", "superseded_in", "version_of", "versions_of",
           "held_for_other_reports"]

#: 检验报告单号 (WS 364 / 卫生信息数据元): the identifier a report is known by across its versions.
SYSTEM_REPORT_NUMBER = "urn:oid:2.16.156.10011.1.33"
#: ``meta.tag`` on a stored DiagnosticReport that a correction superseded (its status stays as signed).
SUPERSEDED_TAG = {"system": cs_url("report-version-status"), "code": "superseded",
                  "display": "已被更正报告取代"}

_CORRECTIONS = ("corrected", "amended")
#: A report taken back (OBR-25 ``X``; FHIR ``cancelled``, ``entered-in-error``) supersedes its earlier versions as a
#: correction does: the decisions on them are withdrawn, and it follows them to the members they were pushed to.
_TAKEN_BACK = ("cancelled", "entered-in-error")
#: Rows of one INSERT, and numbers looked up by one query (under SQLite's 500 SELECTs of a compound statement).
_CHUNK = 200
_REPLACES = ext_url("replaces")


def _statements(text: str) -> tuple[str, ...]:
    """The statements of a schema file, one by one (``executescript`` would commit a caller's transaction)."""
    plain = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    return tuple(" ".join(part.split()) for part in plain.split(";") if part.strip())


#: The statements that make the table on SQLite (``sql/sqlite/reports.sql``): the table, then its indexes
#: (by report, by Bundle, by the number a correction replaces).
SCHEMA: tuple[str, ...] = _statements(
    _resources.files("gateway.store").joinpath("sql", "sqlite", "reports.sql").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ReportVersion:
    """One stored version of a report."""

    seq: int
    issuer_uscc: str
    report_number: str
    report_code: str
    report_id: str
    report_ref: str
    bundle_key: str
    bundle_id: str
    direction: str
    status: str | None
    issued: str | None
    message_ref: int | None
    recorded_at: str
    superseded_by: int | None = None
    superseded_at: str | None = None
    replaces: str = ""

    @property
    def is_correction(self) -> bool:
        """A correction, or a report taken back: a version that supersedes the others of its report."""
        return (self.status or "") in _CORRECTIONS or (self.status or "") in _TAKEN_BACK

    def describe(self) -> str:
        """How a reason names this version: ``DiagnosticReport/<id> (corrected, issued <time>)``."""
        parts = [p for p in (self.status, f"issued {self.issued}" if self.issued else None) if p]
        return f"{self.report_ref} ({', '.join(parts)})" if parts else self.report_ref

    def to_dict(self) -> dict[str, Any]:
        return {"report": self.report_ref, "number": self.report_number, "issuer": self.issuer_uscc,
                "bundle": self.bundle_id, "status": self.status, "issued": self.issued,
                "direction": self.direction, "recorded_at": self.recorded_at}


@dataclass(frozen=True)
class Change:
    """A version that became superseded, and the current version that superseded it."""

    old: ReportVersion
    current: ReportVersion


_COLUMNS = ("seq, issuer_uscc, report_number, report_code, report_id, report_ref, bundle_key, bundle_id, direction,"
            " status, issued, message_ref, recorded_at, superseded_by, superseded_at, replaces")


def ensure_schema(db: Database) -> None:
    """Create the table if it is missing (statement by statement: a caller's transaction stays open)."""
    if dialect(db) == "postgresql":
        if not _exists(db):  # no earlier layout on PostgreSQL; a caller's transaction is joined
            with transaction(db):
                db.executescript(schema.script(db, "reports"))
            schema.learn(db, _FACT, made=True)
        return
    if schema.known(db, _FACT):  # made sure of on this connection (and committed)
        return
    if _exists(db):
        columns = schema.columns(db, "report_versions")
        with spilling(db):  # (an index built again over the whole table: its sort on disk)
            if "report_code" not in columns:  # a table made before reports were told apart by their code
                db.execute("ALTER TABLE report_versions ADD COLUMN report_code TEXT NOT NULL DEFAULT ''")
                db.execute("DROP INDEX IF EXISTS report_versions_report")
                db.execute(SCHEMA[1])
            if "replaces" not in columns:  # a table made before a correction could name another number
                db.execute("ALTER TABLE report_versions ADD COLUMN replaces TEXT NOT NULL DEFAULT ''")
                db.execute(SCHEMA[3])
        schema.learn(db, _FACT, made="report_code" not in columns or "replaces" not in columns)
        return
    for statement in SCHEMA:
        db.execute(statement)
    schema.learn(db, _FACT, made=True)


#: The fact, kept on a connection (:func:`gateway.store.schema.learn`), that the table exists at its current layout.
_FACT = "part:reports"


def _exists(db: Database) -> bool:
    if dialect(db) == "postgresql":  # asked once per connection once it is there, not once per Bundle
        if schema.known(db, _FACT):
            return True
        found = bool(db.execute("SELECT to_regclass('report_versions') IS NOT NULL").fetchone()[0])
        if found:
            schema.learn(db, _FACT)
        return found
    if schema.known(db, _FACT):
        return True
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'report_versions'"
                      ).fetchone() is not None


def _issuer(report: Mapping[str, Any], by_ref: Mapping[str, Mapping[str, Any]]) -> str:
    for performer in report.get("performer") or []:
        ref = performer.get("reference") if isinstance(performer, OBJECT) else None
        org = by_ref.get(ref) if isinstance(ref, str) else None
        if org is None or org.get("resourceType") != "Organization":
            continue
        for ident in org.get("identifier") or []:
            if isinstance(ident, OBJECT) and ident.get("system") == SYSTEM_USCC and ident.get("value"):
                return str(ident["value"])
    for ident in report.get("identifier") or []:  # the report number's assigner names the issuer too
        assigner = ident.get("assigner", {}).get("identifier", {}) if isinstance(ident, OBJECT) else {}
        if isinstance(assigner, OBJECT) and assigner.get("system") == SYSTEM_USCC and assigner.get("value"):
            return str(assigner["value"])
    return ""


def _number(idents: list[Mapping[str, Any]], issuer: str) -> str:
    """The number a report is known by: its 检验报告单号, else its number as a technical-service report of
    ``issuer``."""
    for system in (SYSTEM_REPORT_NUMBER, service_report_system(issuer)):
        for ident in idents:
            if ident.get("system") == system and ident.get("value"):
                return str(ident["value"])
    return ""


def _replaced(report: Mapping[str, Any], issuer: str, number: str) -> str:
    """The other number of the same issuer a correction names as the one it corrects (extension
    ``replaces``), or ""."""
    if report.get("status") not in _CORRECTIONS:
        return ""
    for ext in report.get("extension") or []:
        if not isinstance(ext, OBJECT) or ext.get("url") != _REPLACES:
            continue
        ident = ext.get("valueIdentifier")
        if not isinstance(ident, OBJECT) or not ident.get("value"):
            continue
        if ident.get("system") not in (SYSTEM_REPORT_NUMBER, service_report_system(issuer)):
            continue  # a number of another kind: not one this table knows reports by
        assigner = ident.get("assigner")
        who = assigner.get("identifier") if isinstance(assigner, OBJECT) else None
        if isinstance(who, OBJECT) and who.get("value") and (who.get("system"), who.get("value")) != (
                SYSTEM_USCC, issuer):
            continue  # another issuer's number: never a version of this issuer's report
        value = str(ident["value"])
        return value if value != number else ""
    return ""


def versions_in(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report versions a Bundle holds: the DiagnosticReports with an issuer and a number (检验报告单号, or a
    technical-service report's number)."""
    by_ref: dict[str, Mapping[str, Any]] = {}
    reports: list[Mapping[str, Any]] = []
    for entry in bundle.get("entry") or []:
        res = entry.get("resource") if isinstance(entry, OBJECT) else None
        if not isinstance(res, OBJECT):
            continue
        if entry.get("fullUrl"):
            by_ref[str(entry["fullUrl"])] = res
        by_ref[f"{res.get('resourceType')}/{res.get('id')}"] = res
        if res.get("resourceType") == "DiagnosticReport":
            reports.append(res)
    ident = bundle.get("identifier")
    bundle_key = str(ident["value"]) if isinstance(ident, OBJECT) and ident.get("value") else str(bundle.get("id"))
    out = []
    for report in reports:
        idents = [i for i in report.get("identifier") or [] if isinstance(i, OBJECT)]
        issuer = _issuer(report, by_ref)
        number = _number(idents, issuer) if issuer else ""
        if not number or not idents or not idents[0].get("value"):
            continue
        out.append({"issuer_uscc": issuer, "report_number": number, "report_code": _code_of(report),
                    "report_id": f"{idents[0].get('system', '')}|{idents[0]['value']}",
                    "report_ref": f"DiagnosticReport/{report.get('id')}", "bundle_key": bundle_key,
                    "bundle_id": str(bundle.get("id") or ""), "status": report.get("status"),
                    "issued": report.get("issued"), "replaces": _replaced(report, issuer, number)})
    return out


def _code_of(report: Mapping[str, Any]) -> str:
    """``system|code`` of the report's first coding: two reports of one 检验报告单号 and issuer are versions of
    each other only when they report the same thing (a LIS may number every panel of one specimen alike)."""
    code = report.get("code")
    codings = code.get("coding") if isinstance(code, OBJECT) else None
    first = codings[0] if isinstance(codings, list) and codings and isinstance(codings[0], OBJECT) else {}
    return f"{first.get('system') or ''}|{first.get('code') or ''}" if first else ""


def _row(row: Any) -> ReportVersion:
    return ReportVersion(*row)


def _moment(text: str | None) -> float:
    if not text:
        return float("-inf")
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return float("-inf")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone(_dt.timedelta(hours=8)))
    return moment.timestamp()


def _newest(versions: list[ReportVersion]) -> ReportVersion:
    """The current version: a correction over any other, then the later ``issued``, then the later stored."""
    return max(versions, key=lambda v: (v.is_correction, _moment(v.issued), v.seq))


def _succession(versions: list[ReportVersion]) -> list[Change]:
    """Which of one report's versions supersede which: (superseded version, the version current over it).

    A correction (or a report taken back) on record: every other version is superseded by the newest one
    (:func:`_newest`). None: among the versions stored under one DiagnosticReport id, those issued before the
    last issued one are superseded by it (a final report sent again with changed values, as a new version of the
    same resources); versions of other ids, and copies issued at the same time, are not (a CDA issued again under
    a new 文档流水号 without RPLC stays beside the first: it is said when stored).
    """
    if any(v.is_correction for v in versions):
        current = _newest(versions)
        return [Change(v, current) for v in versions if v.seq != current.seq]
    by_ref: dict[str, list[ReportVersion]] = {}
    for v in versions:
        by_ref.setdefault(v.report_ref, []).append(v)
    out: list[Change] = []
    for same in by_ref.values():
        if len(same) < 2:
            continue
        current = _newest(same)
        last = _moment(current.issued)
        out.extend(Change(v, current) for v in same if _moment(v.issued) < last)
    return out


def register(db: Database, bundle: Mapping[str, Any], *, direction: str, message_ref: int | None,
             recorded_at: str) -> list[Change]:
    """Record the report versions of a stored Bundle and work out again which versions are current.

    Inside the caller's transaction. Returns the versions that became superseded now (including those of
    this Bundle, when a correction was stored before them), each with the version now current.
    """
    found = versions_in(bundle)
    if not found:
        return []
    ensure_schema(db)
    changes: list[Change] = []
    groups = sorted({(v["issuer_uscc"], v["report_number"], v["replaces"], v["report_code"]) for v in found})
    # one statement for the Bundle's versions (up to _CHUNK of them), stored in the order it lists them
    for start in range(0, len(found), _CHUNK):
        chunk = found[start:start + _CHUNK]
        db.execute("INSERT INTO report_versions (issuer_uscc, report_number, report_code, report_id, report_ref,"
                   " bundle_key, bundle_id, direction, status, issued, message_ref, recorded_at, replaces) VALUES "
                   + ", ".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?)"] * len(chunk)) + " ON CONFLICT DO NOTHING",
                   [x for v in chunk for x in (v["issuer_uscc"], v["report_number"], v["report_code"],
                                               v["report_id"], v["report_ref"], v["bundle_key"], v["bundle_id"],
                                               direction, v["status"], v["issued"], message_ref, recorded_at,
                                               v["replaces"])])
    # every group's versions read at once; a group is read again after a change written for an earlier one
    families = _families(db, [(issuer, {number, replaces}, code) for issuer, number, replaces, code in groups])
    done: set[tuple[int, ...]] = set()
    wrote = False
    for n, (issuer, number, replaces, code) in enumerate(groups):
        versions = _family(db, issuer, {number, replaces}, code) if wrote else families[n]
        if tuple(v.seq for v in versions) in done:
            continue  # two reports of this Bundle that are versions of one report (an original and its correction)
        done.add(tuple(v.seq for v in versions))
        succession = _succession(versions)
        for change in succession:
            version, current = change.old, change.current
            if version.superseded_by == current.seq:
                continue
            db.execute("UPDATE report_versions SET superseded_by = ?, superseded_at = ? WHERE seq = ?",
                       [current.seq, recorded_at, version.seq])
            changes.append(change)
            wrote = True
        for current in {c.current.seq: c.current for c in succession}.values():
            if current.superseded_by is not None:  # the table never names a current version as superseded
                db.execute("UPDATE report_versions SET superseded_by = NULL, superseded_at = NULL WHERE seq = ?",
                           [current.seq])
                wrote = True
    return changes


def versions_of(db: Database, issuer_uscc: str, report_number: str,
                report_code: str | None = None) -> list[ReportVersion]:
    """Every stored version of one report (issuer, 检验报告单号, and what it reports unless ``report_code`` is
    None: then of every report under that number), in the order they were stored."""
    if not _exists(db):
        return []
    ensure_schema(db)
    sql, args = "issuer_uscc = ? AND report_number = ?", [issuer_uscc, report_number]
    if report_code is not None:
        sql, args = sql + " AND report_code = ?", [*args, report_code]
    return [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM report_versions WHERE {sql} ORDER BY seq", args)]


def held_for_other_reports(db: Database, bundle: Mapping[str, Any], direction: str = "received"
                           ) -> ReportVersion | None:
    """A report stored here under ``bundle``'s ``id`` (``direction``) that ``bundle`` does not hold, or None.

    A received Bundle's ``id`` is the name its signed identifier gives it (:func:`gateway.pipeline.received_name`):
    one held already for a document about another report means its issuer gave two Bundles one identifier, and one
    name would stand for both (a receipt, a referral's evidence, the versions of a report would name the wrong one).
    The same report's Bundle worked again by its issuer (a mapping table changed, other recognition marks) holds the
    same reports under the same name, and is no such case.
    """
    bundle_id = str(bundle.get("id") or "")
    if not bundle_id or not _exists(db):
        return None
    ensure_schema(db)
    held = [_row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM report_versions WHERE bundle_id = ? AND direction = ?"
                                        " ORDER BY seq", [bundle_id, direction])]
    here = {(v["issuer_uscc"], v["report_number"], v["report_code"]) for v in versions_in(bundle)}
    return next((v for v in held if (v.issuer_uscc, v.report_number, v.report_code) not in here), None)


#: The versions next to a report number (issuer, code, number): those under the number, and the corrections that
#: name it (``replaces``). Two branches, each read through its own index (``report_versions_report``, and the
#: partial ``report_versions_replaces``, which ``replaces <> ''`` lets the planner use), not a scan of the issuer's
#: reports; a version under the number that also names it is read once.
_ADJACENT = (f"SELECT {_COLUMNS} FROM report_versions WHERE issuer_uscc = ? AND report_number = ? AND report_code = ?"
             f" UNION ALL SELECT {_COLUMNS} FROM report_versions WHERE issuer_uscc = ? AND replaces = ?"
             " AND report_code = ? AND replaces <> '' AND report_number <> ?")


def _adjacent_args(issuer: str, code: str, number: str) -> list[str]:
    return [issuer, number, code, issuer, number, code, number]


def _family(db: Database, issuer_uscc: str, numbers: set[str], report_code: str) -> list[ReportVersion]:
    """Every stored version of one report known by any of ``numbers``, in the order they were stored: those
    under each number, and — followed both ways, as far as they go — those under a number a correction of it
    names (``replaces``) and the corrections that name one of its numbers."""
    found: dict[int, ReportVersion] = {}
    todo, seen = {n for n in numbers if n}, set()
    while todo:
        number = todo.pop()
        seen.add(number)
        for row in db.execute(_ADJACENT, _adjacent_args(issuer_uscc, report_code, number)):
            version = _row(row)
            found[version.seq] = version
            todo |= {n for n in (version.report_number, version.replaces) if n and n not in seen}
    return [found[seq] for seq in sorted(found)]


def _families(db: Database, wanted: list[tuple[str, set[str], str]]) -> list[list[ReportVersion]]:
    """:func:`_family` of each (issuer, numbers, report code), with one query per step of the search for all
    of them together (usually one query in all)."""
    adjacent: dict[tuple[str, str, str], list[ReportVersion]] = {}  # (issuer, code, number) -> its versions
    while True:
        missing: dict[tuple[str, str, str], None] = {}
        for issuer, numbers, code in wanted:
            for node in _closure(adjacent, issuer, numbers, code)[1]:
                missing[node] = None
        if not missing:
            break
        nodes = list(missing)
        rows: list[ReportVersion] = []
        # SQLite takes up to 500 SELECTs in one compound statement: _ADJACENT is two, so 200 nodes make 400
        for start in range(0, len(nodes), _CHUNK):
            chunk = nodes[start:start + _CHUNK]
            rows += [_row(r) for r in db.execute(" UNION ALL ".join([_ADJACENT] * len(chunk)),
                                                 [x for i, c, n in chunk for x in _adjacent_args(i, c, n)])]
        for issuer, code, number in missing:
            adjacent[(issuer, code, number)] = [
                v for v in rows if v.issuer_uscc == issuer and v.report_code == code
                and number in (v.report_number, v.replaces)]
    return [_closure(adjacent, issuer, numbers, code)[0] for issuer, numbers, code in wanted]


def _closure(adjacent: dict[tuple[str, str, str], list[ReportVersion]], issuer: str, numbers: set[str], code: str
             ) -> tuple[list[ReportVersion], list[tuple[str, str, str]]]:
    """The versions :func:`_family` finds from what ``adjacent`` holds, and the numbers it still has to read."""
    found: dict[int, ReportVersion] = {}
    missing: list[tuple[str, str, str]] = []
    todo, seen = {n for n in numbers if n}, set()
    while todo:
        number = todo.pop()
        seen.add(number)
        versions = adjacent.get((issuer, code, number))
        if versions is None:
            missing.append((issuer, code, number))
            continue
        for version in versions:
            found[version.seq] = version
            todo |= {n for n in (version.report_number, version.replaces) if n and n not in seen}
    return [found[seq] for seq in sorted(found)], missing


def version_of(db: Database, seq: int) -> ReportVersion | None:
    if not _exists(db):
        return None
    row = db.execute(f"SELECT {_COLUMNS} FROM report_versions WHERE seq = ?", [seq]).fetchone()
    return _row(row) if row else None


def superseded_in(db: Database, bundle: Mapping[str, Any]) -> dict[str, str]:
    """For the reports of ``bundle`` that a stored version supersedes: report id -> the superseding report.

    Read before deciding on a Bundle, so that the decision on a superseded version says so
    (rule ``report-status``). A version not stored yet is superseded when a stored correction of the same
    report is newer than it, or a version of the same DiagnosticReport issued later (the rules :func:`register`
    applies, :func:`_succession`).
    """
    out: dict[str, str] = {}
    if not _exists(db):
        return out
    ensure_schema(db)
    found = versions_in(bundle)
    families = _families(db, [(v["issuer_uscc"], {v["report_number"], v["replaces"]}, v["report_code"])
                              for v in found])
    for v, stored in zip(found, families):
        others = [s for s in stored if not (s.bundle_key == v["bundle_key"] and s.report_ref == v["report_ref"])]
        if not others:
            continue
        me = ReportVersion(1 << 62, v["issuer_uscc"], v["report_number"], v["report_code"], v["report_id"],
                           v["report_ref"], v["bundle_key"], v["bundle_id"], "", v["status"], v["issued"], None, "",
                           replaces=v["replaces"])
        mine = [s for s in stored if s not in others]
        if mine:
            me = mine[0]
        over = next((c.current for c in _succession([*others, me]) if c.old is me), None)
        if over is not None:
            out[v["report_id"]] = over.describe()
    return out


def supersede(store: Any, bundle: Mapping[str, Any], *, direction: str, message_ref: int | None,
              at: _dt.datetime, member: str) -> list[Change]:
    """Register a stored Bundle's report versions and act on every version that became superseded.

    Inside the transaction that stores the Bundle (``store`` is the :class:`gateway.store.store.Store`
    whose database holds it): each superseded DiagnosticReport still stored under its own id is tagged
    (:data:`SUPERSEDED_TAG`); a late version stored under the id of the correction that supersedes it is
    put back into the history, the correction current again; and every decision on a superseded version
    is withdrawn and audited (:func:`gateway.recognition.store.withdraw_superseded`).
    """
    from gateway.recognition.store import withdraw_superseded

    changes = register(store.db, bundle, direction=direction, message_ref=message_ref,
                       recorded_at=at.isoformat(timespec="milliseconds"))
    restored: set[int | None] = set()
    for change in changes:
        old, current = change.old, change.current
        if old.report_ref == current.report_ref:
            # one resource id for both versions: the id must hold the correction
            if old.message_ref == message_ref and message_ref is not None and message_ref not in restored:
                store.restore_over(message_ref, current.message_ref)
                restored.add(message_ref)
        else:
            store.tag_superseded(old.report_ref, old.message_ref, SUPERSEDED_TAG)
        withdraw_superseded(store.db, bundle_id=old.bundle_key, report_id=old.report_id,
                            superseded_by=current.describe(), at=at, member=member)
    return changes


class ReportVersionsPort(Protocol):
    """What the gateway asks of the report versions it keeps (one database, either engine)."""

    def register(self, bundle: Mapping[str, Any], *, direction: str, message_ref: int | None,
                 recorded_at: str) -> list[Change]: ...

    def versions_of(self, issuer_uscc: str, report_number: str,
                    report_code: str | None = ...) -> list[ReportVersion]: ...

    def version_of(self, seq: int) -> ReportVersion | None: ...

    def superseded_in(self, bundle: Mapping[str, Any]) -> dict[str, str]: ...


class ReportVersions:
    """The report versions of one database (SQLite or PostgreSQL): :class:`ReportVersionsPort` over the
    functions of this module, which callers holding only a database use directly."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def register(self, bundle: Mapping[str, Any], *, direction: str, message_ref: int | None,
                 recorded_at: str) -> list[Change]:
        return register(self.db, bundle, direction=direction, message_ref=message_ref, recorded_at=recorded_at)

    def versions_of(self, issuer_uscc: str, report_number: str,
                    report_code: str | None = None) -> list[ReportVersion]:
        return versions_of(self.db, issuer_uscc, report_number, report_code)

    def version_of(self, seq: int) -> ReportVersion | None:
        return version_of(self.db, seq)

    def superseded_in(self, bundle: Mapping[str, Any]) -> dict[str, str]:
        return superseded_in(self.db, bundle)
