"""Recognition rules, table-driven: every rule passes, fails and cannot be evaluated; across the border and
within one province; dates just inside and just outside every window and qualification period.

The Bundles are the hand-built samples in tests/data/registry/ (docs/bundle-shapes.md); each case changes one
fact of a sample or of the DEMO registry and checks the rule it concerns (and, where telling, the outcome).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.errors import IdentifierError, InputError
from gateway.recognition.engine import RULES, Decision, decide, marks_for
from gateway.recognition.facts import facts_from_bundle
from gateway.registry.models import Coding, Snapshot
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import parse_source, read_source_data

DATA = Path(__file__).parent / "data" / "registry"
IG = "https://fhir.cyhr.org.cn"
CST = dt.timezone(dt.timedelta(hours=8))
AT = dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
TONGJIANG, FULING, CDC = "12511921MB0001003C", "12500102MB0002006J", "12510000MB00030095"
STRANGER = "12330000470051726F"  # a valid USCC (DOMAIN §4 vector) that is no member

SOURCE = read_source_data(DEMO_SOURCE)
BUNDLES = {
    "tj": json.loads((DATA / "bundle-lab-tongjiang.json").read_text(encoding="utf-8")),
    "fl": json.loads((DATA / "bundle-lab-imaging-fuling.json").read_text(encoding="utf-8")),
    "cdc": json.loads((DATA / "bundle-occupational-cdc.json").read_text(encoding="utf-8")),
}


def make_snapshot(mutate: Callable[[dict[str, Any]], None] | None = None) -> Snapshot:
    data = copy.deepcopy(SOURCE)
    if mutate:
        mutate(data)
    source = parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
    return unsigned_snapshot(source, dt.datetime(2025, 1, 1, tzinfo=CST), dt.timedelta(days=1000))


BASE = make_snapshot()


# -- helpers that change one fact ----------------------------------------------------------------


def obs(bundle: dict[str, Any], code: str) -> dict[str, Any]:
    return next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"].get("coding", [{}])[0].get("code") == code
    )


def first(bundle: dict[str, Any], rtype: str, n: int = 0) -> dict[str, Any]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype][n]


def member(data: dict[str, Any], uscc: str) -> dict[str, Any]:
    return next(m for m in data["members"] if m["uscc"] == uscc)


def qualification(data: dict[str, Any], qid: str) -> dict[str, Any]:
    return next(q for q in data["qualifications"] if q["id"] == qid)


def item(data: dict[str, Any], catalogue: str, code: str) -> dict[str, Any]:
    cat = next(c for c in data["catalogues"] if c["id"] == catalogue)
    return next(it for it in cat["items"] if it["code"] == code)


def set_obs(code: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda b: obs(b, code).update(values)


def drop_obs(code: str, *keys: str) -> Callable[[dict[str, Any]], None]:
    def run(b: dict[str, Any]) -> None:
        for key in keys:
            obs(b, code).pop(key, None)

    return run


def set_report(n: int = 0, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda b: first(b, "DiagnosticReport", n).update(values)


def set_collection(value: str | None) -> Callable[[dict[str, Any]], None]:
    def run(b: dict[str, Any]) -> None:
        for s in (e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Specimen"):
            if value is None:
                s["collection"].pop("collectedDateTime", None)
            else:
                s["collection"]["collectedDateTime"] = value

    return run


def all_of(*steps: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def run(b: dict[str, Any]) -> None:
        for step in steps:
            step(b)

    return run


def mark(code: str, *marks: str) -> Callable[[dict[str, Any]], None]:
    def run(b: dict[str, Any]) -> None:
        o = obs(b, code)
        o.pop("extension", None)
        if marks:
            o["extension"] = [{"url": f"{IG}/StructureDefinition/recognition-mark", "valueString": m} for m in marks]

    return run


def reissue_as(uscc: str, code_map: dict[str, str]) -> Callable[[dict[str, Any]], None]:
    """The same Bundle, as if another member had issued it with its own local codes."""

    def run(b: dict[str, Any]) -> None:
        text = json.dumps(b, ensure_ascii=False)
        old = first(b, "Organization")["identifier"][0]["value"]
        text = text.replace(old, uscc)
        for a, c in code_map.items():
            text = text.replace(f'"code": "{a}"', f'"code": "{c}"')
        b.clear()
        b.update(json.loads(text))

    return run


def hazard(code: str, name: str, category: str | None) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "factor", "valueCoding": {"system": f"{IG}/CodeSystem/hazard-factor", "code": code, "display": name}}
    ]
    if category:
        parts.append(
            {"url": "category", "valueCoding": {"system": f"{IG}/CodeSystem/exposure-category", "code": category}}
        )
    return {"url": f"{IG}/StructureDefinition/hazard-factor", "extension": parts}


def named_hazard(name: str, category: str | None) -> dict[str, Any]:
    """A factor coded only by its name (a Bundle from a system that does not use CodeSystem hazard-factor codes)."""
    factor = hazard("", name, category)
    del factor["extension"][0]["valueCoding"]["code"]
    return factor


def set_factors(*factors: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def run(b: dict[str, Any]) -> None:
        report = first(b, "DiagnosticReport")
        keep = [e for e in report["extension"] if not e["url"].endswith("/hazard-factor")]
        report["extension"] = keep + list(factors)

    return run


def supersede(b: dict[str, Any]) -> None:
    original = first(b, "DiagnosticReport")
    fix = copy.deepcopy(original)
    fix["id"] = "corrected-report"
    fix["identifier"][0]["value"] += "-R1"
    fix["status"] = "corrected"
    fix["result"] = []
    fix["extension"] = [
        {
            "url": f"{IG}/StructureDefinition/replaces",
            "valueIdentifier": {
                "system": original["identifier"][0]["system"],
                "value": original["identifier"][0]["value"],
            },
        }
    ]
    b["entry"].append({"fullUrl": "urn:uuid:corrected-report", "resource": fix})


def unlink(code: str) -> Callable[[dict[str, Any]], None]:
    def run(b: dict[str, Any]) -> None:
        target = f"urn:uuid:{obs(b, code)['id']}"
        for r in (e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"):
            r["result"] = [x for x in r.get("result", []) if x["reference"] != target]

    return run


# -- the cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    bundle: str
    code: str  # the first (local) code of the Observation decided on
    rule: str
    status: str  # passed / failed / not-evaluable; "absent" when the rule must not apply
    outcome: str | None = None
    receiver: str = FULING
    at: dt.datetime = AT
    change_bundle: Callable[[dict[str, Any]], None] | None = None
    change_registry: Callable[[dict[str, Any]], None] | None = None
    message: str | None = None  # a fragment the rule's message must contain


def t(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, tz: dt.tzinfo = CST) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=tz)


CT_BY_TONGJIANG = reissue_as(TONGJIANG, {"3001": "CT-CHEST", "1001": "WBC", "1003": "HGB"})
NO_LAB_TIME = all_of(set_collection(None), drop_obs("WBC", "effectiveDateTime"))

CASES = [
    # member-active: the issuer is an active member on the result date (2026-11-20)
    Case("member.pass", "tj", "WBC", "member-active", "passed", "recognized"),
    Case(
        "member.ended-day-before",
        "tj",
        "WBC",
        "member-active",
        "failed",
        "not-recognized",
        change_registry=lambda d: member(d, TONGJIANG).update(valid_to="2026-11-19"),
    ),
    Case(
        "member.ends-that-day",
        "tj",
        "WBC",
        "member-active",
        "passed",
        "recognized",
        change_registry=lambda d: member(d, TONGJIANG).update(valid_to="2026-11-20"),
    ),
    Case(
        "member.suspended-that-day",
        "tj",
        "WBC",
        "member-active",
        "failed",
        change_registry=lambda d: member(d, TONGJIANG).update(status="suspended", status_date="2026-11-20"),
    ),
    Case(
        "member.suspended-day-after",
        "tj",
        "WBC",
        "member-active",
        "passed",
        change_registry=lambda d: member(d, TONGJIANG).update(status="suspended", status_date="2026-11-21"),
    ),
    Case(
        "member.not-a-member",
        "tj",
        "WBC",
        "member-active",
        "failed",
        "not-recognized",
        change_bundle=reissue_as(STRANGER, {}),
        message="not a member",
    ),
    Case(
        "member.no-issuer",
        "tj",
        "WBC",
        "member-active",
        "not-evaluable",
        "needs-review",
        change_bundle=lambda b: first(b, "Organization").pop("identifier"),
    ),
    Case("member.no-result-date", "tj", "WBC", "member-active", "not-evaluable", change_bundle=NO_LAB_TIME),
    # catalogue-item: the item is in a catalogue valid on the result date
    Case("item.by-loinc-and-local", "tj", "WBC", "catalogue-item", "passed"),
    Case(
        "item.by-local-code-only",
        "tj",
        "WBC",
        "catalogue-item",
        "passed",
        "recognized",
        change_bundle=lambda b: obs(b, "WBC")["code"]["coding"].pop(1),
    ),
    Case(
        "item.by-catalogue-code",
        "tj",
        "WBC",
        "catalogue-item",
        "passed",
        change_bundle=lambda b: obs(b, "WBC")["code"]["coding"].append(
            {"system": f"{IG}/CodeSystem/catalogue-chuanyu", "code": "CY-L001"}
        ),
    ),
    Case("item.not-in-catalogue", "tj", "REMARK", "catalogue-item", "failed", "not-recognized"),
    Case(
        "item.unknown-codes",
        "tj",
        "WBC",
        "catalogue-item",
        "failed",
        "not-recognized",
        change_bundle=lambda b: obs(b, "WBC")["code"].update(
            coding=[
                {"system": f"{IG}/sid/local-item/{TONGJIANG}", "code": "XYZ"},
                {"system": "http://loinc.org", "code": "2345-7"},
            ]
        ),
    ),
    Case(
        "item.no-codes",
        "tj",
        "WBC",
        "catalogue-item",
        "not-evaluable",
        "needs-review",
        change_bundle=lambda b: obs(b, "WBC")["code"].update(coding=[{"system": "", "code": ""}]),
    ),
    Case(
        "item.withdrawn-day-before",
        "tj",
        "WBC",
        "catalogue-item",
        "failed",
        change_registry=lambda d: item(d, "chuanyu", "CY-L001").update(valid_to="2026-11-19"),
    ),
    Case(
        "item.withdrawn-that-day",
        "tj",
        "WBC",
        "catalogue-item",
        "passed",
        change_registry=lambda d: item(d, "chuanyu", "CY-L001").update(valid_to="2026-11-20"),
    ),
    # catalogue-scope: 川渝 across the border, provincial within one province, alliance among its members
    Case("scope.chuanyu-across-border", "tj", "WBC", "catalogue-scope", "passed", message="across the border"),
    Case(
        "scope.chuanyu-within-province",
        "tj",
        "WBC",
        "catalogue-scope",
        "passed",
        "recognized",
        receiver=CDC,
        message="within one province",
    ),
    Case("scope.provincial-within-province", "tj", "HBA1C", "catalogue-scope", "passed", "recognized", receiver=CDC),
    Case(
        "scope.provincial-across-border",
        "tj",
        "HBA1C",
        "catalogue-scope",
        "failed",
        "not-recognized",
        change_registry=lambda d: d.update(
            catalogues=[c for c in d["catalogues"] if c["id"] != "tongjiang-fuling-alliance"]
        ),
        message="does not cover the receiver",
    ),
    Case("scope.alliance-members", "tj", "HBA1C", "catalogue-scope", "passed", "recognized"),
    Case(
        "scope.alliance-outsider",
        "tj",
        "HBA1C",
        "catalogue-scope",
        "failed",
        "not-recognized",
        receiver=CDC,
        change_registry=lambda d: d.update(catalogues=[c for c in d["catalogues"] if c["id"] != "sichuan"]),
    ),
    Case(
        "scope.chuanyu-made-provincial",
        "tj",
        "WBC",
        "catalogue-scope",
        "failed",
        change_registry=lambda d: d["catalogues"][0].update(scope={"type": "provincial", "province": "50"}),
        message="does not cover the issuer",
    ),
    Case("scope.receiver-not-member", "tj", "WBC", "catalogue-scope", "failed", receiver=STRANGER),
    Case(
        "scope.receiver-left-day-before",
        "tj",
        "WBC",
        "catalogue-scope",
        "failed",
        change_registry=lambda d: member(d, FULING).update(valid_to="2026-11-21"),
    ),
    Case(
        "scope.receiver-left-that-day",
        "tj",
        "WBC",
        "catalogue-scope",
        "passed",
        change_registry=lambda d: member(d, FULING).update(valid_to="2026-11-22"),
    ),
    Case(
        "scope.issuer-unknown",
        "tj",
        "WBC",
        "catalogue-scope",
        "not-evaluable",
        change_bundle=lambda b: first(b, "Organization").pop("identifier"),
    ),
    # eqa-pass: the issuer passed EQA for the item in the cycle covering the result date
    Case("eqa.pass", "tj", "WBC", "eqa-pass", "passed"),
    Case("eqa.failed-round", "tj", "ALT", "eqa-pass", "failed", "not-recognized", message="EQA failed"),
    Case(
        "eqa.no-record",
        "tj",
        "PLT",
        "eqa-pass",
        "failed",
        "not-recognized",
        change_registry=lambda d: d.update(
            eqa=[
                e
                for e in d["eqa"]
                if not (e["member"] == TONGJIANG and e["item"].get("loinc") == "777-3" and e["year"] == 2026)
            ]
        ),
        message="no EQA result",
    ),
    Case(
        "eqa.last-day-of-passed-cycle",
        "tj",
        "ALT",
        "eqa-pass",
        "passed",
        "recognized",
        at=t(2026, 1, 5, 10),
        change_bundle=set_collection("2025-12-31T23:59:00+08:00"),
    ),
    Case(
        "eqa.first-day-of-failed-cycle",
        "tj",
        "ALT",
        "eqa-pass",
        "failed",
        at=t(2026, 1, 5, 10),
        change_bundle=set_collection("2026-01-01T00:00:00+08:00"),
    ),
    Case(
        "eqa.cycle-by-china-date",
        "tj",
        "ALT",
        "eqa-pass",
        "failed",
        at=t(2026, 1, 5, 10),
        change_bundle=set_collection("2025-12-31T16:30:00Z"),
    ),  # 2026-01-01 00:30 in China
    Case("eqa.no-result-date", "tj", "WBC", "eqa-pass", "not-evaluable", change_bundle=NO_LAB_TIME),
    Case("eqa.not-required-for-occupational", "cdc", "ZJ-XP", "eqa-pass", "absent"),
    # validity-window: from the collection (lab), study (imaging) or exam (occupational) day to the decision day,
    # calendar days in China time whatever the precision (DOMAIN §1.4 compares with the encounter's date)
    Case("window.last-second", "tj", "WBC", "validity-window", "passed", at=t(2026, 11, 27, 8, 30)),
    Case("window.last-day-after-the-clock-time", "tj", "WBC", "validity-window", "passed",
         at=t(2026, 11, 27, 23, 59, 59), message="valid through 2026-11-27"),
    Case(
        "window.one-second-late",
        "tj",
        "WBC",
        "validity-window",
        "failed",
        "not-recognized",
        at=t(2026, 11, 28, 0, 0, 0),
    ),
    Case(
        "window.other-offset", "tj", "WBC", "validity-window", "passed", at=t(2026, 11, 27, 0, 30, tz=dt.timezone.utc)
    ),
    Case(
        "window.before-collection",
        "tj",
        "WBC",
        "validity-window",
        "failed",
        at=t(2026, 11, 20, 8, 0),
        message="after the decision time",
    ),
    Case("window.platelets-short", "tj", "PLT", "validity-window", "failed", at=t(2026, 11, 24, 0, 0, 1)),
    Case(
        "window.collection-before-effective",
        "tj",
        "WBC",
        "validity-window",
        "failed",
        at=t(2026, 11, 28, 8, 45),
        change_bundle=set_obs("WBC", effectiveDateTime="2026-11-21T09:00:00+08:00"),
    ),
    Case(
        "window.effective-when-no-collection",
        "tj",
        "WBC",
        "validity-window",
        "passed",
        at=t(2026, 11, 27, 8, 45),
        change_bundle=all_of(set_collection(None), set_obs("WBC", effectiveDateTime="2026-11-21T09:00:00+08:00")),
    ),
    Case(
        "window.no-offset",
        "tj",
        "WBC",
        "validity-window",
        "not-evaluable",
        "needs-review",
        change_bundle=all_of(set_collection("2026-11-20T08:30:00"), drop_obs("WBC", "effectiveDateTime")),
        message="no UTC offset",
    ),
    Case("window.no-time", "tj", "WBC", "validity-window", "not-evaluable", change_bundle=NO_LAB_TIME),
    Case(
        "window.imaging-last-second",
        "fl",
        "3001",
        "validity-window",
        "passed",
        receiver=TONGJIANG,
        at=t(2027, 2, 15, 15, 20),
    ),
    Case(
        "window.imaging-one-second-late",
        "fl",
        "3001",
        "validity-window",
        "failed",
        receiver=TONGJIANG,
        at=t(2027, 2, 16, 0, 0, 1),
    ),
    Case(
        "window.imaging-report-time",
        "fl",
        "3001",
        "validity-window",
        "passed",
        receiver=TONGJIANG,
        change_bundle=drop_obs("3001", "effectiveDateTime"),
        message="study",
    ),
    Case(
        "window.exam-date-last-day",
        "cdc",
        "ZJ-XP",
        "validity-window",
        "passed",
        "recognized",
        at=t(2027, 2, 8, 23, 59, 59),
    ),
    Case("window.exam-date-day-after", "cdc", "ZJ-XP", "validity-window", "failed", at=t(2027, 2, 9)),
    Case(
        "window.exam-date-china-day",
        "cdc",
        "ZJ-XP",
        "validity-window",
        "failed",
        at=t(2027, 2, 8, 16, 0, tz=dt.timezone.utc),
    ),
    # report-status: final or corrected, not preliminary, not superseded
    Case("status.final", "tj", "WBC", "report-status", "passed"),
    Case(
        "status.corrected",
        "tj",
        "WBC",
        "report-status",
        "passed",
        "recognized",
        change_bundle=all_of(set_report(status="corrected"), set_obs("WBC", status="corrected")),
    ),
    Case(
        "status.preliminary-result",
        "tj",
        "WBC",
        "report-status",
        "failed",
        "not-recognized",
        change_bundle=set_obs("WBC", status="preliminary"),
    ),
    Case(
        "status.preliminary-report",
        "tj",
        "WBC",
        "report-status",
        "failed",
        change_bundle=set_report(status="preliminary"),
    ),
    Case("status.cancelled", "tj", "WBC", "report-status", "failed", change_bundle=set_obs("WBC", status="cancelled")),
    Case(
        "status.superseded",
        "tj",
        "WBC",
        "report-status",
        "failed",
        "not-recognized",
        change_bundle=supersede,
        message="superseded",
    ),
    Case(
        "status.amended",
        "tj",
        "WBC",
        "report-status",
        "not-evaluable",
        "needs-review",
        change_bundle=set_report(status="amended"),
    ),
    Case("status.no-report", "tj", "WBC", "report-status", "not-evaluable", change_bundle=unlink("WBC")),
    Case("status.missing", "tj", "WBC", "report-status", "not-evaluable", change_bundle=drop_obs("WBC", "status")),
    # mark: the result carries the catalogue's recognition mark
    Case("mark.present", "tj", "WBC", "mark", "passed"),
    Case("mark.other-scope", "tj", "WBC", "mark", "failed", "not-recognized", change_bundle=mark("WBC", "四川HR")),
    Case("mark.one-of-several", "tj", "WBC", "mark", "passed", change_bundle=mark("WBC", "四川HR", "川渝HR")),
    Case("mark.missing", "tj", "WBC", "mark", "not-evaluable", "needs-review", change_bundle=mark("WBC")),
    # direction: by institution level
    Case("direction.any", "tj", "WBC", "direction", "passed"),
    Case("direction.higher-to-lower", "fl", "3001", "direction", "passed", "recognized", receiver=TONGJIANG),
    Case(
        "direction.lower-to-higher",
        "fl",
        "CT-CHEST",
        "direction",
        "failed",
        "not-recognized",
        change_bundle=CT_BY_TONGJIANG,
    ),
    Case(
        "direction.below-min-level",
        "tj",
        "WBC",
        "direction",
        "failed",
        change_registry=lambda d: qualification(d, "tj-grade").update(grade="一级甲等"),
        message="level 2 or above",
    ),
    Case(
        "direction.issuer-level-unknown",
        "tj",
        "WBC",
        "direction",
        "not-evaluable",
        change_registry=lambda d: d["qualifications"].remove(qualification(d, "tj-grade")),
    ),
    Case(
        "direction.issuer-level-not-yet-on-result-date",
        "tj",
        "WBC",
        "direction",
        "not-evaluable",
        "needs-review",
        change_registry=lambda d: qualification(d, "tj-grade").update(valid_from="2026-12-01"),
        message="not on record",
    ),
    Case(
        "direction.undated-level-of-an-older-source",
        "tj",
        "WBC",
        "direction",
        "passed",
        change_registry=lambda d: (
            d["qualifications"].remove(qualification(d, "tj-grade")),
            member(d, TONGJIANG).update(level="二级甲等"),
        ),
        message="issuer level 二级甲等",
    ),
    Case("direction.receiver-level-unknown", "fl", "3001", "direction", "not-evaluable", receiver=CDC),
    # occupational-filing: the 备案 category covers each hazard factor on the exam date
    Case("filing.covers", "cdc", "ZJ-XP", "occupational-filing", "passed", "recognized"),
    Case(
        "filing.category-not-filed",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "failed",
        "not-recognized",
        change_bundle=set_factors(hazard("DEMO-HF-BRUCELLA", "布鲁氏菌", "biological")),
    ),
    Case(
        "filing.radiation-filed",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "passed",
        change_bundle=set_factors(hazard("DEMO-HF-XRAY", "X射线", "radiation")),
    ),
    Case(
        "filing.radiation-not-filed",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "failed",
        change_bundle=set_factors(hazard("DEMO-HF-XRAY", "X射线", "radiation")),
        change_registry=lambda d: qualification(d, "cdc-filing").update(scope=["dust", "chemical", "physical"]),
        message="放射性因素",
    ),
    Case(
        "filing.starts-day-after-exam",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "failed",
        change_registry=lambda d: qualification(d, "cdc-filing").update(valid_from="2026-11-11"),
    ),
    Case(
        "filing.starts-on-exam-day",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "passed",
        change_registry=lambda d: qualification(d, "cdc-filing").update(valid_from="2026-11-10"),
    ),
    Case(
        "filing.revoked-on-exam-day",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "failed",
        change_registry=lambda d: qualification(d, "cdc-filing").update(status="revoked", status_date="2026-11-10"),
    ),
    Case(
        "filing.revoked-after-exam",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "passed",
        change_registry=lambda d: qualification(d, "cdc-filing").update(status="revoked", status_date="2026-11-11"),
    ),
    Case(
        "filing.no-factors",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "not-evaluable",
        "needs-review",
        change_bundle=set_factors(),
    ),
    Case(
        "filing.factor-without-category",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "not-evaluable",
        change_bundle=set_factors(hazard("DEMO-HF-SILICA", "矽尘", None)),
    ),
    # a filing that lists factors of a class: a factor named by a catalogue name or alias (铅 is lead) is that factor
    Case(
        "filing.factor-by-alias-only",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "passed",
        change_bundle=set_factors(named_hazard("铅", "chemical")),
        change_registry=lambda d: qualification(d, "cdc-filing").update(factors=["lead"]),
    ),
    Case(
        "filing.factor-coded-by-alias",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "passed",
        change_bundle=set_factors(hazard("铅烟", "铅烟", "chemical")),
        change_registry=lambda d: qualification(d, "cdc-filing").update(factors=["lead"]),
    ),
    Case(
        "filing.alias-of-another-factor",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "failed",
        change_bundle=set_factors(named_hazard("苯", "chemical")),
        change_registry=lambda d: qualification(d, "cdc-filing").update(factors=["lead"]),
        message="苯",
    ),
    Case(
        "filing.name-not-in-catalogue",
        "cdc",
        "ZJ-XP",
        "occupational-filing",
        "not-evaluable",
        change_bundle=set_factors(named_hazard("某种演示溶剂", "chemical")),
        change_registry=lambda d: qualification(d, "cdc-filing").update(factors=["lead"]),
    ),
    Case("filing.not-for-lab-reports", "tj", "WBC", "occupational-filing", "absent"),
    # occupational-physician: the 主检医师 holds the matching diagnosis qualification on the exam date
    Case("physician.qualified", "cdc", "ZJ-TL", "occupational-physician", "passed", "recognized"),
    Case(
        "physician.radiation-needs-radiation",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "failed",
        "not-recognized",
        change_bundle=set_factors(hazard("DEMO-HF-XRAY", "X射线", "radiation")),
    ),
    Case(
        "physician.other-physician-expired",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "failed",
        change_bundle=set_report(
            resultsInterpreter=[{"identifier": {"system": "urn:oid:2.16.156.10011.1.4", "value": "DEMO-510000-D002"}}]
        ),
    ),
    Case(
        "physician.expired-day-before-exam",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "failed",
        change_registry=lambda d: qualification(d, "cdc-physician-1").update(valid_to="2026-11-09"),
    ),
    Case(
        "physician.expires-on-exam-day",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "passed",
        change_registry=lambda d: qualification(d, "cdc-physician-1").update(valid_to="2026-11-10"),
    ),
    Case(
        "physician.by-factor-category",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "failed",
        change_registry=lambda d: d["diagnosis_categories"].update(by_factor={"DEMO-HF-NOISE": ["eye"]}),
    ),
    Case(
        "physician.by-factor-category-of-an-alias",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "failed",
        change_bundle=set_factors(named_hazard("铅", "chemical")),
        change_registry=lambda d: d["diagnosis_categories"].update(by_factor={"lead": ["eye"]}),
        message="铅 (eye)",
    ),
    Case(
        "physician.staff-id-of-another-member",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "failed",
        "not-recognized",
        change_bundle=set_report(
            resultsInterpreter=[{"identifier": {"system": "urn:oid:2.16.156.10011.1.4", "value": "DEMO-511623-D001"}}]
        ),
        message=f"no physician is registered at 四川省疾病预防控制中心（演示） ({CDC}) under staff id DEMO-511623-D001",
    ),
    Case(
        "physician.not-named",
        "cdc",
        "ZJ-XP",
        "occupational-physician",
        "not-evaluable",
        "needs-review",
        change_bundle=lambda b: first(b, "DiagnosticReport").pop("resultsInterpreter"),
    ),
]


def run_case(case: Case) -> Decision:
    bundle = copy.deepcopy(BUNDLES[case.bundle])
    original = case.code if case.change_bundle is not CT_BY_TONGJIANG else "3001"
    entry = f"urn:uuid:{obs(bundle, original)['id']}"  # found before the change, which may alter the codes
    if case.change_bundle:
        case.change_bundle(bundle)
    snapshot = make_snapshot(case.change_registry) if case.change_registry else BASE
    facts = next(f for f in facts_from_bundle(bundle) if f.entry == entry)
    return decide(facts, snapshot, case.receiver, case.at)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    decision = run_case(case)
    result = decision.rule(case.rule)
    if case.status == "absent":
        assert result is None, decision.to_dict()
        return
    assert result is not None, [r.rule for r in decision.rules]
    assert result.status == case.status, (result.message, result.facts)
    if case.outcome:
        assert decision.outcome == case.outcome, [(r.rule, r.status, r.message) for r in decision.rules]
    if case.message:
        assert case.message in result.message
    assert result.rule in RULES


#: Rules whose three outcomes are proven in a module of their own, on the reports they are about.
COVERED_IN = {"reading-signature": "tests/test_remote_reading.py",
              "technical-service-qualification": "tests/test_service_reports.py",
              "between-institutions": "tests/test_recognition_domain.py",
              "result-value": "tests/test_recognition_domain.py"}


def test_every_rule_is_covered_every_way() -> None:
    seen = {(c.rule, c.status) for c in CASES}
    for rule in RULES:
        if rule == "diagnostic-conclusion" or rule in COVERED_IN:
            continue
        for status in ("passed", "failed", "not-evaluable"):
            assert (rule, status) in seen, (rule, status)


def test_outcome_follows_the_worst_rule() -> None:
    ok = run_case(CASES[0])
    assert ok.outcome == "recognized" and all(r.status == "passed" for r in ok.rules)
    review = run_case(next(c for c in CASES if c.id == "mark.missing"))
    assert {r.status for r in review.rules} == {"passed", "not-evaluable"} and review.outcome == "needs-review"
    refused = run_case(next(c for c in CASES if c.id == "eqa.failed-round"))
    assert refused.outcome == "not-recognized"


def test_facts_used_are_reported() -> None:
    d = run_case(CASES[0])
    window = d.rule("validity-window")
    assert window is not None
    assert window.facts == {
        "time_anchor": "collection",
        "anchor_from": "Specimen.collection.collectedDateTime",
        "window_days": 7,
        "decided_at": "2026-11-22T10:00:00+08:00",
        "anchor": "2026-11-20T08:30:00+08:00",
        "anchor_day": "2026-11-20",
        "decision_day": "2026-11-22",
        "valid_until": "2026-11-27",
    }
    eqa = d.rule("eqa-pass")
    assert eqa is not None and eqa.facts["eqa"][0]["provider"].startswith("四川省临床检验中心")
    scope = d.rule("catalogue-scope")
    assert scope is not None and scope.facts["issuer_province"] == "51" and scope.facts["receiver_province"] == "50"


def test_diagnostic_conclusions_are_never_recognised() -> None:
    for key, receiver in (("cdc", FULING), ("fl", TONGJIANG)):
        conclusions = [f for f in facts_from_bundle(BUNDLES[key]) if f.kind == "conclusion"]
        assert len(conclusions) == 1
        d = decide(conclusions[0], BASE, receiver, AT)
        assert d.outcome == "not-recognized"
        assert [(r.rule, r.status) for r in d.rules] == [("diagnostic-conclusion", "failed")]


def test_best_catalogue_wins_and_alternatives_are_listed() -> None:
    facts = next(f for f in facts_from_bundle(BUNDLES["tj"]) if f.codings[0].code == "HBA1C")
    to_fuling = decide(facts, BASE, FULING, AT)
    assert to_fuling.item is not None and to_fuling.item.catalogue_id == "tongjiang-fuling-alliance"
    assert to_fuling.alternatives == (
        {"catalogue": "sichuan", "code": "SC-L002", "display": "糖化血红蛋白", "outcome": "not-recognized"},
    )
    to_cdc = decide(facts, BASE, CDC, AT)
    assert to_cdc.item is not None and to_cdc.item.catalogue_id == "sichuan" and to_cdc.outcome == "recognized"


def test_decisions_are_deterministic() -> None:
    facts = facts_from_bundle(BUNDLES["tj"])[0]
    one, two = decide(facts, BASE, FULING, AT), decide(facts, make_snapshot(), FULING, AT)
    assert one.to_dict() == two.to_dict()
    later = decide(facts, BASE, FULING, AT + dt.timedelta(minutes=1))
    assert later.decision_id != one.decision_id
    assert one.to_dict()["snapshot"] == {"version": 1, "digest": BASE.digest()}
    assert one.to_dict()["decided_at"] == "2026-11-22T10:00:00+08:00"


def test_bad_receiver_and_naive_time_are_refused() -> None:
    facts = facts_from_bundle(BUNDLES["tj"])[0]
    with pytest.raises(IdentifierError):
        decide(facts, BASE, "12500102MB0002006K", AT)
    with pytest.raises(InputError, match="UTC offset"):
        decide(facts, BASE, FULING, AT.replace(tzinfo=None))
    assert decide(facts, BASE, FULING.lower(), AT).receiver == FULING


# -- marks_for: what an issuer may print ----------------------------------------------------------

LOINC = "http://loinc.org"


@pytest.mark.parametrize(
    "issuer,coding,day,marks",
    [
        (TONGJIANG, Coding(LOINC, "6690-2"), dt.date(2026, 11, 20), ["川渝HR", "四川HR"]),
        (TONGJIANG, Coding(f"{IG}/sid/local-item/{TONGJIANG}", "WBC"), dt.date(2026, 11, 20), ["川渝HR"]),
        (TONGJIANG, Coding(LOINC, "1742-6"), dt.date(2026, 11, 20), []),  # ALT: EQA failed in 2026
        (TONGJIANG, Coding(LOINC, "1742-6"), dt.date(2025, 6, 1), ["川渝HR"]),
        (TONGJIANG, Coding(LOINC, "4548-4"), dt.date(2026, 11, 20), ["四川HR", "协作体HR"]),
        (FULING, Coding(LOINC, "6690-2"), dt.date(2026, 11, 20), ["川渝HR"]),  # not 四川HR: outside Sichuan
        (CDC, Coding(LOINC, "6690-2"), dt.date(2026, 11, 20), ["四川HR"]),  # no hospital level for 川渝's min level
        (CDC, Coding(f"{IG}/sid/local-item/{CDC}", "ZJ-XP"), dt.date(2026, 11, 10), ["川渝HR"]),
        (STRANGER, Coding(LOINC, "6690-2"), dt.date(2026, 11, 20), []),
        (TONGJIANG, Coding(LOINC, "6690-2"), dt.date(2022, 6, 1), []),  # before membership
        (TONGJIANG, Coding(LOINC, "2345-7"), dt.date(2026, 11, 20), []),  # in no catalogue
    ],
)
def test_marks_for(issuer: str, coding: Coding, day: dt.date, marks: list[str]) -> None:
    assert [g.mark for g in marks_for(issuer, coding, day, BASE)] == marks


def test_marks_for_checks_the_issuer_uscc() -> None:
    with pytest.raises(IdentifierError):
        marks_for("12511921MB0001003D", Coding(LOINC, "6690-2"), dt.date(2026, 11, 20), BASE)


@pytest.mark.parametrize("bundle,code,receiver", [
    ("tj", "WBC", FULING),  # a collection time
    ("cdc", "ZJ-XP", FULING),  # an exam date (day precision)
])
def test_a_window_that_ends_beyond_the_calendar_passes_and_never_fails_the_decision(
        bundle: str, code: str, receiver: str) -> None:
    """A snapshot that an earlier authority release signed with a huge 有效时限 (the source schema now takes at
    most 36500 days): the window reaches past the year 9999, so every decision time lies inside it."""
    baseline = run_case(Case("x", bundle, code, "validity-window", "passed", receiver=receiver))
    assert baseline.item is not None
    snapshot = make_snapshot()
    chosen = next(it for c in snapshot.catalogues for it in c.items
                  if (it.catalogue_id, it.code) == (baseline.item.catalogue_id, baseline.item.code))
    object.__setattr__(chosen, "window_days", 999_999_999)  # (as it was signed; frozen dataclass)
    facts = next(f for f in facts_from_bundle(copy.deepcopy(BUNDLES[bundle]))
                 if f.entry == f"urn:uuid:{obs(BUNDLES[bundle], code)['id']}")
    decision = decide(facts, snapshot, receiver, AT)
    window = decision.rule("validity-window")
    assert window is not None and window.status == "passed", window
    assert "beyond the calendar" in window.message and "valid_until" not in window.facts
