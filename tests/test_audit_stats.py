"""Audit statistics on a small known data set (tests/data/audit/stats-sample.json), figures checked by hand.

Hand calculation (all 20 records; d1..d8 decisions, o = overrides):

- Results (issuer, report, item, receiver) and their latest decision: d1 (F RF1 GLU), d2 (F RF1 ALT),
  d4 (F RF2 GLU; it replaces d3, the needs-review of the same result), d5 (C RC1 HBsAg), d6 (C RC1 GLU),
  d7 (C RC2 ALT, for receiver F), d8 (F RF3 HBsAg): 7 results.
- recognized d1 d4 d5 d7 = 4; not-recognized d2 d6 = 2; needs-review d8 = 1.
- Overridden: d5 (critical-item), d7 (emergency) = 2. The override of d2 ("other") does not count: d2 was
  not recognised, there was nothing to accept.
- eligible = 4 + 2 = 6; accepted = 4 - 2 = 2; 互认率 = 2 / 6 = 0.3333.

By issuer    F: d1 d4 rec, d2 not, d8 review -> eligible 3, accepted 2, rate 0.6667
             C: d5 d7 rec (both overridden), d6 not -> eligible 3, accepted 0, rate 0.0
By receiver  T: d1 d4 d5 rec (d5 overridden), d2 d6 not, d8 review -> eligible 5, accepted 2, rate 0.4
             F: d7 rec, overridden -> eligible 1, accepted 0, rate 0.0
By item      GLU: d1 d4 rec, d6 not -> 3, 2, 0.6667; ALT: d7 rec (ov), d2 not -> 2, 0, 0.0;
             HBsAg: d5 rec (ov), d8 review -> 1, 0, 0.0
By catalogue cy-2026 (GLU, ALT): d1 d4 d7 rec (d7 ov), d2 d6 not -> 5, 2, 0.4; sc-2026: d5 (ov), d8 -> 1, 0, 0.0
By month     2026-01: d1 rec, d2 not -> 2, 1, 0.5 (d3 is replaced by d4, counted in February);
             2026-02: d4 d5 d7 rec (d5 d7 ov), d6 not, d8 review -> 4, 1, 0.25
Refusals     2 results: eqa-pass 1 (d2), catalogue-scope 1, validity-window 1 (d6)
Overrides    3: critical-item 1, emergency 1, other 1
Lookups      F: 3 (patients P1, P2 -> 2); C: 1 (P1 -> 1); total 4
Exchanges    sent 1, received 2, refused 2 (bad-signature 1, unknown-issuer 1)

Savings (fees-sample.csv: GLU 5.00 元 in 51, 5.50 in 50; ALT 5.00 in 51; no HBsAg): accepted d1 d4 (GLU, receiver
T 12511921… -> province 51) -> 2 × 5.00 = 10.00 元; d5 d7 were re-tested, so they saved nothing.
HR items (marks as issued): F d1 GLU 川渝HR, d2 ALT 川渝HR+重庆HR, d4 GLU 川渝HR (d3 replaced) -> 3 results, 川渝HR 3,
重庆HR 1; C d5 HBsAg 四川HR, d7 ALT 川渝HR -> 2 results, 四川HR 1, 川渝HR 1; d6 d8 unmarked. Total 5.
By alliance (cy-2026 -> 川渝, sc-2026 -> 四川省): as by catalogue: 川渝 5, 2, 0.4; 四川省 1, 0, 0.0.

With ``date=ge2026-02`` (from 2026-02-01T00:00+08:00): decisions d4..d8 -> rec d4 d5 d7 (d5 d7 ov), not d6,
review d8 -> eligible 4, accepted 1, 0.25; overrides in the period: critical-item, emergency (2); lookups F 2, C 1.
With ``date=le2026-02-05``: d1 d2 d4 (d3 replaced) d5 d6 -> rec 3, not 2; d5's override (02-06) lies after the period
but still counts -> overridden 1, eligible 5, accepted 2, 0.4; overrides in the period: other (1).
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import CST, DATA
from test_audit_support import ROLES, locator, serving

from gateway.audit import query, records as r, stats
from gateway.audit.log import append, entries
from gateway.commands.audit import audit
from gateway.errors import InputError
from gateway.registry.models import catalogue_system
from gateway.store.db import connect

SAMPLE = json.loads((DATA / "audit" / "stats-sample.json").read_text(encoding="utf-8"))
ME = r.Party.member(*SAMPLE["members"]["T"])


@pytest.fixture
def audit_client(settings, clock):
    with serving(settings, clock) as served:
        yield served


def sample_records() -> list[r.Record]:
    members = {k: r.Party.member(*v) for k, v in SAMPLE["members"].items()}
    out: list[r.Record] = []
    for rec in SAMPLE["records"]:
        at = _dt.datetime.fromisoformat(rec["at"])
        if rec["kind"] == "decision":
            catalogue, display = SAMPLE["items"][rec["item"]]
            rules = [r.RuleResult("member-active", True)]
            rules += [r.RuleResult(rule, False, "fails") for rule in rec.get("failed", [])]
            rules += [r.RuleResult(rule, None, "no data") for rule in rec.get("unknown", [])]
            out.append(
                r.decision(
                    at=at,
                    gateway=ME,
                    receiver=members[rec["receiver"]],
                    issuer=members[rec["issuer"]],
                    report=rec["report"],
                    item=(catalogue_system(catalogue), rec["item"], display),
                    catalogue=catalogue,
                    outcome=rec["outcome"],
                    rules=rules,
                    snapshot_version=5,
                    decision_id=rec["id"],
                    marks=rec.get("marks", []),
                )
            )
        elif rec["kind"] == "override":
            out.append(
                r.override(
                    at=at,
                    gateway=ME,
                    physician=r.Party.staff("D0042"),
                    reason=rec["reason"],
                    decision_id=rec["decision"],
                )
            )
        elif rec["kind"] == "read":
            out.append(
                r.patient_read(
                    at=at,
                    gateway=ME,
                    server_address="https://tj.example/fhir",
                    client=members[rec["member"]],
                    client_address="10.1.2.3",
                    member=members[rec["member"]],
                    patient=r.PatientRef.id_card(SAMPLE["patients"][rec["patient"]]),
                    resources=["DiagnosticReport/1"],
                )
            )
        else:
            out.append(
                r.exchange(
                    rec["direction"],
                    at=at,
                    gateway=ME,
                    peer=members[rec["peer"]],
                    bundle_hash=f"sha256:{len(out):064x}",
                    reason=rec.get("reason"),
                )
            )
    return out


@pytest.fixture
def db(tmp_path: Path, database: str):
    handle = connect(locator(database, tmp_path))
    for record in sample_records():
        append(handle, record)
    yield handle
    handle.conn.close()


def test_results_outside_every_catalogue_do_not_count(db) -> None:
    """A diagnostic conclusion (or an item in no catalogue) is decided, but is no 互认 candidate."""
    before = stats.compute(db)
    members = {k: r.Party.member(*v) for k, v in SAMPLE["members"].items()}
    receiver, issuer = next(iter(members.values())), list(members.values())[-1]
    append(db, r.decision(at=_dt.datetime(2026, 5, 2, 9, 0, tzinfo=CST), gateway=ME, receiver=receiver, issuer=issuer,
                          report="DiagnosticReport/conclusion-1", item=("urn:conclusion", "目前未见异常"), catalogue="-",
                          outcome="not-recognized", rules=[r.RuleResult("diagnostic-conclusion", False, "never")],
                          snapshot_version=5, decision_id="conclusion-1"))
    after = stats.compute(db)
    assert after["total"] == before["total"]
    assert after["outside_catalogue"] == before["outside_catalogue"] + 1


def rate(groups: list[dict[str, Any]], key: str) -> tuple[int, int, float | None]:
    g = next(g for g in groups if g["key"] == key)
    return g["eligible"], g["accepted"], g["rate"]


def test_known_figures(db) -> None:
    s = stats.compute(db)
    total = s["total"]
    assert (total["decisions"], total["recognized"], total["not_recognized"], total["needs_review"]) == (7, 4, 2, 1)
    assert (total["overridden"], total["eligible"], total["accepted"], total["rate"]) == (2, 6, 2, 0.3333)
    f, c, t = (SAMPLE["members"][k][0] for k in "FCT")
    assert rate(s["by_issuer"], f) == (3, 2, 0.6667)
    assert rate(s["by_issuer"], c) == (3, 0, 0.0)
    assert rate(s["by_receiver"], t) == (5, 2, 0.4)
    assert rate(s["by_receiver"], f) == (1, 0, 0.0)
    glu = f"{catalogue_system('cy-2026')}|GLU"
    assert rate(s["by_item"], glu) == (3, 2, 0.6667)
    assert rate(s["by_item"], f"{catalogue_system('cy-2026')}|ALT") == (2, 0, 0.0)
    hbsag = next(g for g in s["by_item"] if g["key"].endswith("|HBsAg"))
    assert (hbsag["eligible"], hbsag["accepted"], hbsag["needs_review"], hbsag["name"]) == (1, 0, 1, "乙肝表面抗原")
    assert rate(s["by_catalogue"], "cy-2026") == (5, 2, 0.4)
    assert rate(s["by_catalogue"], "sc-2026") == (1, 0, 0.0)
    assert rate(s["by_month"], "2026-01") == (2, 1, 0.5)
    assert rate(s["by_month"], "2026-02") == (4, 1, 0.25)
    assert s["refusals"] == {
        "results": 2,
        "by_rule": [
            {"rule": "catalogue-scope", "count": 1},
            {"rule": "eqa-pass", "count": 1},
            {"rule": "validity-window", "count": 1},
        ],
    }
    assert s["overrides"]["total"] == 3
    assert {o["reason"]: o["count"] for o in s["overrides"]["by_reason"]} == {
        "critical-item": 1,
        "emergency": 1,
        "other-necessary": 1,  # written with the retired code "other": counted under today's code
    }
    assert s["lookups"]["total"] == 4
    assert [(m["key"], m["lookups"], m["patients"]) for m in s["lookups"]["by_member"]] == [(f, 3, 2), (c, 1, 1)]
    assert s["exchanges"] == {
        "sent": 1,
        "received": 2,
        "refused": 2,
        "refused_by_reason": [{"reason": "bad-signature", "count": 1}, {"reason": "unknown-issuer", "count": 1}],
        "send_failures": 0,
    }
    assert "needs-review, results outside every catalogue and diagnostic conclusions excluded" in s["definition"]


def test_a_push_that_failed_is_a_send_failure_not_a_bundle_sent(db) -> None:
    """The sender audits a push that did not succeed as the Bundle's export with its reason (its first failure
    and its end): counted apart, never among the Bundles sent."""
    peer = r.Party.member(*SAMPLE["members"]["F"])
    at = _dt.datetime(2026, 3, 1, 9, 0, tzinfo=CST)
    for reason in ("retrying", "gave-up"):
        append(db, r.exchange("sent", at=at, gateway=ME, peer=peer, bundle_hash=f"sha256:{'ab' * 32}",
                              outcome=r.Outcome.SERIOUS_FAILURE, reason=reason, detail="outbox #7: HTTP 503"))
    ex = stats.compute(db)["exchanges"]
    assert (ex["sent"], ex["send_failures"]) == (1, 2)
    assert "1 sent, 2 received, 2 refused (2 failures of pushes audited)" in stats.format_tables(stats.compute(db))


def test_period_filter(db) -> None:
    feb = stats.compute(db, [(query.parse_date("ge2026-02", CST),)])
    assert (feb["total"]["eligible"], feb["total"]["accepted"], feb["total"]["rate"]) == (4, 1, 0.25)
    assert feb["overrides"]["total"] == 2
    assert [(m["lookups"], m["patients"]) for m in feb["lookups"]["by_member"]] == [(2, 2), (1, 1)]
    early = stats.compute(db, [(query.parse_date("le2026-02-05", CST),)])
    assert (early["total"]["overridden"], early["total"]["eligible"], early["total"]["accepted"]) == (1, 5, 2)
    assert early["total"]["rate"] == 0.4
    assert [o["reason"] for o in early["overrides"]["by_reason"]] == ["other-necessary"]


def test_empty_log(tmp_path: Path, database: str) -> None:
    s = stats.compute(connect(locator(database, tmp_path, "empty")))
    assert s["total"]["rate"] is None and s["by_issuer"] == [] and s["lookups"]["total"] == 0
    assert "(none)" in stats.format_tables(s)


def test_cli_table_and_json(db, tmp_path: Path, database: str) -> None:
    path = str(locator(database, tmp_path))
    runner = CliRunner()
    table = runner.invoke(audit, ["stats", "--db", path])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    total = lines[lines.index("Total") + 3].split()
    assert total == ["all", "7", "4", "2", "1", "2", "6", "2", "33.33%"]
    assert "Refusals by failing rule (2 results not recognized)" in table.output
    assert "critical-item" in table.output and "调阅" in table.output
    as_json = runner.invoke(audit, ["stats", "--db", path, "--json", "--date", "ge2026-02"])
    assert json.loads(as_json.output)["total"]["rate"] == 0.25
    bad = runner.invoke(audit, ["stats", "--db", path, "--date", "2026-13"])
    assert bad.exit_code == 1 and "date: '2026-13' is not a calendar date" in bad.output
    # Each look at the statistics is itself in the log.
    assert [e.kind for e in entries(db, len(SAMPLE["records"]) + 1)] == ["query", "query"]


def test_http_stats(audit_client) -> None:
    client, tokens, db = audit_client
    for record in sample_records():
        append(db, record)
    auth = {"Authorization": f"Bearer {tokens['auditor']}"}
    res = client.get("/audit/stats?date=ge2026-01&date=lt2026-03", headers=auth)
    assert res.status_code == 200
    assert res.get_json()["total"]["rate"] == 0.3333
    bad = client.get("/audit/stats?issuer=x", headers=auth)
    assert bad.status_code == 400 and bad.get_json()["issue"][0]["expression"] == ["issuer"]
    assert len(ROLES) + len(SAMPLE["records"]) + 1 == max(e.seq for e in entries(db))


FEES = DATA / "audit" / "fees-sample.csv"
SCOPES = {"cy-2026": "川渝", "sc-2026": "四川省"}


def test_savings_from_the_fee_table(db) -> None:
    figures = stats.compute(db, fees=stats.load_fees(FEES))
    sv = figures["savings"]
    assert (sv["total_yuan"], sv["results"], sv["unpriced"]) == (10.0, 2, 0)
    assert sv["by_province"] == [{"province": "51", "results": 2, "yuan": 10.0}]
    assert [(r["item"], r["province"], r["results"], r["fee_yuan"], r["yuan"]) for r in sv["by_item"]] == [
        ("GLU", "51", 2, 5.0, 10.0)]
    assert sv["demo_fees"] is True and sv["fee_sources"] == ["test fee (2026-01-01)"]
    # without a fee for the item in the receiver's province, accepted results are unpriced, never guessed
    unpriced = stats.compute(db, fees={k: v for k, v in stats.load_fees(FEES).items() if k != ("GLU", "51")})
    assert unpriced["savings"]["total_yuan"] == 0.0 and unpriced["savings"]["unpriced"] == 2
    assert unpriced["savings"]["unpriced_by_item"] == [{"item": "GLU|51", "count": 2}]


def test_savings_are_priced_in_the_province_the_registry_places_the_receiver(db) -> None:
    """A USCC's characters 3-4 are the division that registered the institution, not where it is (one registered by
    a national body reads 10): the receiver's province comes from its registry entry's division when the registry
    knows it."""
    fees = stats.load_fees(FEES)
    members = [uscc for uscc, _ in SAMPLE["members"].values()]
    elsewhere = stats.compute(db, fees=fees, provinces={uscc: "50" for uscc in members})["savings"]
    assert (elsewhere["total_yuan"], elsewhere["results"]) == (11.0, 2)  # at 重庆's 5.50, not 四川's 5.00
    assert elsewhere["by_province"] == [{"province": "50", "results": 2, "yuan": 11.0}]
    placed = stats.compute(db, fees=fees, provinces={uscc: "51" for uscc in members})["savings"]
    assert (placed["total_yuan"], placed["results"]) == (10.0, 2)


def test_hr_items_per_institution(db) -> None:
    hr = stats.compute(db)["hr_items"]
    assert hr["results"] == 5 and hr["by_mark"] == {"四川HR": 1, "川渝HR": 4, "重庆HR": 1}
    rows = {r["key"]: (r["results"], r["by_mark"]) for r in hr["by_issuer"]}
    assert rows == {SAMPLE["members"]["F"][0]: (3, {"川渝HR": 3, "重庆HR": 1}),
                    SAMPLE["members"]["C"][0]: (2, {"四川HR": 1, "川渝HR": 1})}
    # the same issued result decided for a second receiver is still one HR result of its issuer
    members = {k: r.Party.member(*v) for k, v in SAMPLE["members"].items()}
    append(db, r.decision(at=_dt.datetime(2026, 3, 1, 9, 0, tzinfo=CST), gateway=ME, receiver=members["C"],
                          issuer=members["F"], report="RF1", item=(catalogue_system("cy-2026"), "GLU", "葡萄糖"),
                          catalogue="cy-2026", outcome="recognized", rules=[r.RuleResult("member-active", True)],
                          snapshot_version=5, decision_id="d9", marks=["川渝HR"]))
    again = stats.compute(db)["hr_items"]
    assert again["results"] == 5
    assert {x["key"]: x["results"] for x in again["by_issuer"]}[SAMPLE["members"]["F"][0]] == 3


def test_recognition_by_alliance(db) -> None:
    figures = stats.compute(db, alliances=SCOPES)
    assert rate(figures["by_alliance"], "川渝") == (5, 2, 0.4)
    assert rate(figures["by_alliance"], "四川省") == (1, 0, 0.0)
    assert rate(stats.compute(db)["by_alliance"], "unknown") == (6, 2, 0.3333)
    narrowed = stats.compute(db, alliances=SCOPES, selection={"alliance": "四川省"})
    total = narrowed["total"]
    assert (total["eligible"], total["accepted"], total["needs_review"]) == (1, 0, 1)
    crossed = stats.compute(db, alliances=SCOPES, by=[("alliance", "month")])["by_alliance_month"]
    assert [(c["alliance"], c["month"], c["eligible"], c["accepted"]) for c in crossed] == [
        ("四川省", "2026-02", 1, 0), ("川渝", "2026-01", 2, 1), ("川渝", "2026-02", 3, 1)]  # by key, code point order


def test_fee_table_errors_name_the_row_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "fees.csv"
    bad.write_text("item_code,province,fee_yuan,source,date\nGLU,51,5,x,2026-01-01\nALT,52,5,x,2026-01-01\n",
                   encoding="utf-8")
    with pytest.raises(InputError) as err:
        stats.load_fees(bad)
    assert err.value.location == "fees.csv row 3, column province"
    bad.write_text("item_code,province,fee_yuan,source,date\nGLU,51,五元,x,2026-01-01\n", encoding="utf-8")
    with pytest.raises(InputError, match="not a number"):
        stats.load_fees(bad)
    bad.write_text("item_code,province,source,date\n", encoding="utf-8")
    with pytest.raises(InputError, match="no column fee_yuan"):
        stats.load_fees(bad)


def test_demo_fee_table_loads() -> None:
    from conftest import ROOT

    fees = stats.load_fees(ROOT / "mappings" / "fees")
    assert fees[("CY-L007", "51")].demo and all(f.demo for f in fees.values())


def test_cli_prints_savings_hr_and_alliance(db, tmp_path: Path, database: str) -> None:
    db_file = locator(database, tmp_path)
    out = CliRunner().invoke(audit, ["stats", "--db", str(db_file), "--fees", str(FEES), "--json"])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.output)
    assert figures["savings"]["total_yuan"] == 10.0 and figures["hr_items"]["results"] == 5
    table = CliRunner().invoke(audit, ["stats", "--db", str(db_file), "--fees", str(FEES)]).output
    assert "节约费用 (savings): 10.00 元 for 2 accepted results, 0 without a fee — DEMO fees" in table
    assert "HR items per institution (5 results carrying a recognition mark)" in table
    assert "川渝HR 3, 重庆HR 1" in table and "By alliance (catalogue scope)" in table


def test_a_decision_of_an_earlier_release_and_a_later_one_on_the_same_report_count_once(
        tmp_path: Path, database: str) -> None:
    """Entries of earlier releases named the report ``system|value`` under the lab report system; entries since
    name its system and value apart. A later decision on the same report still replaces the earlier one."""
    from gateway.naming import SYSTEM_LAB_REPORT_NO

    db = connect(locator(database, tmp_path, "mixed"))
    members = {k: r.Party.member(*v) for k, v in SAMPLE["members"].items()}
    common = dict(gateway=ME, receiver=members["T"], issuer=members["F"], item=("http://loinc.org", "2345-7"),
                  catalogue="cy-2026", snapshot_version=5)
    ct_system = "urn:oid:2.16.156.10011.1.34"  # a 检查报告单号, not a 检验报告单号
    append(db, r.decision(at=_dt.datetime(2026, 5, 2, 9, 0, tzinfo=CST), report=f"{ct_system}|CT-1",
                          report_system=SYSTEM_LAB_REPORT_NO, outcome="not-recognized",
                          rules=[r.RuleResult("eqa-pass", False, "failed")], decision_id="old-1", **common))
    append(db, r.decision(at=_dt.datetime(2026, 5, 3, 9, 0, tzinfo=CST), report="CT-1", report_system=ct_system,
                          outcome="recognized", rules=[r.RuleResult("eqa-pass", True, "passed")],
                          decision_id="new-1", **common))
    figures = stats.compute(db)
    assert (figures["total"]["decisions"], figures["total"]["recognized"], figures["total"]["eligible"]) == (1, 1, 1)
    db.conn.close()


def test_a_members_own_staff_reading_its_results_is_no_lookup(db) -> None:
    """调阅 is another member reading this member's results: the gateway's own users' reads (a physician of the
    hospital searching its own reports) are audited, and not counted among the lookups by member."""
    before = stats.compute(db)["lookups"]
    append(db, r.patient_read(at=_dt.datetime(2026, 2, 3, 9, 0, tzinfo=CST), gateway=ME,
                              server_address="https://tj.example/fhir", client=r.Party.user(ME.value, "his"),
                              client_address="127.0.0.1", member=ME,
                              patient=r.PatientRef.id_card(SAMPLE["patients"]["P1"]), resources=["DiagnosticReport/1"]))
    after = stats.compute(db)["lookups"]
    assert after == before
