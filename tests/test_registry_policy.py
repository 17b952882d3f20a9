"""Registry policy queries on the DEMO registry: active, qualified, EQA passed, catalogue items, scope;
dates just inside and just outside each period."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.errors import IssuerNotQualified, UnknownIssuer
from gateway.registry.models import Coding, Period, level_rank
from gateway.registry.policy import (
    catalogue_items_for,
    diagnosis_categories_for,
    eqa_passed,
    eqa_results,
    member_active,
    qualifications_of,
    qualified,
    require_member,
    require_qualified,
    scope_covers,
)
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import load_source

CST = dt.timezone(dt.timedelta(hours=8))
SNAP = unsigned_snapshot(load_source(DEMO_SOURCE), dt.datetime(2026, 11, 1, tzinfo=CST), dt.timedelta(days=60))
TONGJIANG, FULING, CDC, STRANGER = (
    "12511921MB0001003C",
    "12500102MB0002006J",
    "12510000MB00030095",
    "12330000470051726F",
)
D = dt.date
IG = "https://fhir.cyhr.org.cn"


@pytest.mark.parametrize(
    "uscc,day,active",
    [
        (TONGJIANG, D(2023, 1, 1), True),  # first day of membership
        (TONGJIANG, D(2022, 12, 31), False),  # the day before
        (FULING, D(2030, 1, 1), True),  # open-ended
        (STRANGER, D(2026, 11, 20), False),
    ],
)
def test_member_active(uscc: str, day: dt.date, active: bool) -> None:
    assert member_active(SNAP, uscc, day) is active


def test_require_member() -> None:
    assert require_member(SNAP, CDC, D(2026, 11, 20)).name == "四川省疾病预防控制中心（演示）"
    with pytest.raises(UnknownIssuer, match="not a member"):
        require_member(SNAP, STRANGER, D(2026, 11, 20))
    with pytest.raises(UnknownIssuer, match="not an active member"):
        require_member(SNAP, CDC, D(2022, 12, 31))


@pytest.mark.parametrize(
    "qtype,scope,day,physician,expected",
    [
        ("occupational-health-exam-filing", "dust", D(2020, 3, 1), None, "cdc-filing"),
        ("occupational-health-exam-filing", "dust", D(2020, 2, 29), None, None),
        ("occupational-health-exam-filing", "biological", D(2026, 11, 20), None, None),
        ("radiation-health-service", None, D(2025, 6, 30), None, "cdc-rhs"),
        ("radiation-health-service", None, D(2025, 7, 1), None, None),
        (
            "occupational-disease-diagnosis-physician",
            "radiation",
            D(2026, 6, 30),
            "DEMO-510000-D002",
            "cdc-physician-2",
        ),
        ("occupational-disease-diagnosis-physician", "radiation", D(2026, 7, 1), "DEMO-510000-D002", None),
        ("occupational-disease-diagnosis-physician", "radiation", D(2026, 6, 1), "DEMO-510000-D001", None),
    ],
)
def test_qualified(qtype: str, scope: str | None, day: dt.date, physician: str | None, expected: str | None) -> None:
    found = qualified(SNAP, CDC, qtype, scope, day, physician=physician)
    assert (found.id if found else None) == expected


def test_require_qualified_and_listing() -> None:
    assert require_qualified(SNAP, FULING, "iso15189", "6690-2", D(2026, 11, 20)).id == "fl-iso15189"
    with pytest.raises(IssuerNotQualified, match="iso15189 for 6690-2"):
        require_qualified(SNAP, TONGJIANG, "iso15189", "6690-2", D(2026, 11, 20))
    physicians = qualifications_of(SNAP, CDC, "occupational-disease-diagnosis-physician", D(2026, 11, 20))
    assert [q.physician_id for q in physicians] == ["DEMO-510000-D001"]


def _item(catalogue: str, code: str):  # type: ignore[no-untyped-def]
    cat = SNAP.catalogue(catalogue)
    assert cat is not None
    return next(it for it in cat.items if it.code == code)


@pytest.mark.parametrize(
    "uscc,item,day,passed",
    [
        (TONGJIANG, ("chuanyu", "CY-L005"), D(2025, 12, 31), True),  # last day of the passed 2025 cycle
        (TONGJIANG, ("chuanyu", "CY-L005"), D(2026, 1, 1), False),  # first day of the failed 2026 cycle
        (TONGJIANG, ("chuanyu", "CY-L001"), D(2024, 12, 31), False),  # no result on record for 2024
        (FULING, ("chuanyu", "CY-I002"), D(2026, 11, 20), True),  # imaging QC by catalogue item
        (TONGJIANG, ("chuanyu", "CY-I002"), D(2026, 11, 20), False),
        (TONGJIANG, ("sichuan", "SC-L001"), D(2026, 11, 20), True),  # a LOINC result counts in every catalogue
    ],
)
def test_eqa_passed(uscc: str, item: tuple[str, str], day: dt.date, passed: bool) -> None:
    assert eqa_passed(SNAP, uscc, _item(*item), day) is passed


def test_eqa_results_quote_provider_and_year() -> None:
    results = eqa_results(SNAP, FULING, _item("chuanyu", "CY-L001"), D(2026, 3, 1))
    assert [(e.provider, e.year, e.passed) for e in results] == [("国家卫生健康委临床检验中心（演示）", 2026, True)]


@pytest.mark.parametrize(
    "coding,codes",
    [
        (Coding("http://loinc.org", "6690-2"), [("chuanyu", "CY-L001"), ("sichuan", "SC-L001")]),
        (Coding(f"{IG}/sid/local-item/{FULING}", "1001"), [("chuanyu", "CY-L001")]),
        (Coding(f"{IG}/sid/local-item/{TONGJIANG}", "1001"), []),  # another issuer's code system
        (Coding(f"{IG}/CodeSystem/catalogue-chuanyu", "CY-I001"), [("chuanyu", "CY-I001")]),
        (Coding("http://loinc.org", "4548-4"), [("sichuan", "SC-L002"), ("tongjiang-fuling-alliance", "AL-L001")]),
    ],
)
def test_catalogue_items_for(coding: Coding, codes: list[tuple[str, str]]) -> None:
    assert [(it.catalogue_id, it.code) for it in catalogue_items_for(SNAP, [coding])] == codes


def test_catalogue_items_for_a_date() -> None:
    hba1c = [Coding("http://loinc.org", "4548-4")]
    assert [it.code for it in catalogue_items_for(SNAP, hba1c, D(2024, 12, 31))] == ["SC-L002"]  # alliance from 2025
    assert [it.code for it in catalogue_items_for(SNAP, hba1c, D(2025, 1, 1))] == ["SC-L002", "AL-L001"]
    assert catalogue_items_for(SNAP, hba1c, D(2023, 12, 31)) == []


@pytest.mark.parametrize(
    "catalogue,issuer,receiver,covered",
    [
        ("chuanyu", TONGJIANG, FULING, True),  # across the border
        ("chuanyu", TONGJIANG, CDC, True),  # within Sichuan
        ("sichuan", TONGJIANG, CDC, True),
        ("sichuan", TONGJIANG, FULING, False),
        ("sichuan", FULING, TONGJIANG, False),
        ("tongjiang-fuling-alliance", FULING, TONGJIANG, True),
        ("tongjiang-fuling-alliance", TONGJIANG, CDC, False),
    ],
)
def test_scope_covers(catalogue: str, issuer: str, receiver: str, covered: bool) -> None:
    cat, a, b = SNAP.catalogue(catalogue), SNAP.member(issuer), SNAP.member(receiver)
    assert cat is not None and a is not None and b is not None
    assert scope_covers(cat, a, b) is covered


def test_diagnosis_categories() -> None:
    assert diagnosis_categories_for(SNAP, "DEMO-HF-NOISE", "physical") == ("physical", "ent-oral")
    assert diagnosis_categories_for(SNAP, None, "radiation") == ("radiation",)
    assert diagnosis_categories_for(SNAP, None, None) == ()


def test_periods_are_inclusive_and_levels_ranked() -> None:
    p = Period(D(2026, 1, 1), D(2026, 12, 31))
    assert p.covers(D(2026, 1, 1)) and p.covers(D(2026, 12, 31))
    assert not p.covers(D(2025, 12, 31)) and not p.covers(D(2027, 1, 1))
    assert Period().covers(D(1900, 1, 1))
    # 未定级 is a recorded level below 一级 (DOMAIN §3: the IG's level codes list it, #14), not "no level"
    assert [level_rank(x) for x in ("三级甲等", "二级乙等", "一级", "未定级", None)] == [3, 2, 1, 0, None]
