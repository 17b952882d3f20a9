"""Registry source: the DEMO source loads; every kind of problem is reported with its path."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from gateway.demo.registry import DEMO_SOURCE
from gateway.errors import ConfigError
from gateway.registry.source import RegistrySourceError, load_source, parse_source, read_source_data, source_schema
from gateway.signing.keys import cert_pem, generate_private_key, issue_certificate, make_authority

DATA = Path(__file__).parent / "data" / "registry"
CST = dt.timezone(dt.timedelta(hours=8))
TONGJIANG = "12511921MB0001003C"

# DOMAIN.md §4 test vectors: valid 统一社会信用代码, and corrupted ones.
VALID_USCC = ["91350100M000100Y43", "11500000MB1670604W", "11500103MB1849823N", "12330000470051726F"]
BAD_USCC = [
    ("91350100M000100Y44", "check character"),  # last character changed
    ("11500000MB1670604I", "characters outside"),  # I never occurs
    ("1150000MB1670604W", "17 characters"),  # one short
    ("11010519491231002X", "check character"),  # an ID card number is not a USCC
]

_BASE = read_source_data(DEMO_SOURCE)
_Q = {q["id"]: i for i, q in enumerate(_BASE["qualifications"])}  # where each DEMO qualification is listed


def _parse(mutate: Callable[[dict[str, Any]], None]) -> Any:
    data = copy.deepcopy(_BASE)
    mutate(data)
    return parse_source(json.dumps(data, ensure_ascii=False), origin="test", is_json=True)


def _qualification(data: dict[str, Any], qid: str) -> dict[str, Any]:
    return next(q for q in data["qualifications"] if q["id"] == qid)


def _problems(mutate: Callable[[dict[str, Any]], None]) -> dict[str, str]:
    with pytest.raises(RegistrySourceError) as info:
        _parse(mutate)
    return {i.location: i.message for i in info.value.issues()}


def test_demo_source_loads_and_is_marked_demo() -> None:
    src = load_source(DEMO_SOURCE)
    body = src.body
    assert src.version == 1 and body["demo"] is True
    assert "DEMO" in DEMO_SOURCE.name and "DEMO" in DEMO_SOURCE.read_text(encoding="utf-8")[:200]
    assert {TONGJIANG, "12500102MB0002006J", "12510000MB00030095", "12511623MB0009005R"} <= {
        m["uscc"] for m in body["members"]
    }
    assert all("（演示）" in m["name"] for m in body["members"])
    # The HL7 v2 demo's common lab items, each by LOINC.
    loinc = {code for c in body["catalogues"] for it in c["items"] for code in it["loinc"]}
    assert {
        "6690-2",
        "789-8",
        "718-7",
        "777-3",
        "1742-6",
        "1920-8",
        "14749-6",
        "14682-9",
        "2823-3",
        "2951-2",
        "14647-2",
        "14927-8",
    } <= loinc
    assert any(it["class"] == "occupational" for c in body["catalogues"] for it in c["items"])
    assert all("illustrative" in (c.get("note") or "") for c in body["catalogues"])


def test_defaults_are_filled_in() -> None:
    body = load_source(DEMO_SOURCE).body
    chuanyu = next(c for c in body["catalogues"] if c["id"] == "chuanyu")
    wbc, ct = chuanyu["items"][0], next(it for it in chuanyu["items"] if it["code"] == "CY-I001")
    assert (wbc["time_anchor"], wbc["mark"], wbc["direction"], wbc["eqa_required"]) == (
        "collection",
        "川渝HR",
        "any",
        True,
    )
    assert wbc["min_issuer_level"] == 2 and wbc["valid_from"] == "2024-01-01" and wbc["valid_to"] is None
    assert (ct["time_anchor"], ct["direction"]) == ("study", "not-lower")
    occ = next(c for c in body["catalogues"] if c["id"] == "chuanyu-occupational")["items"][0]
    assert (occ["time_anchor"], occ["eqa_required"]) == ("exam", False)
    eqa = body["eqa"][0]
    assert (eqa["valid_from"], eqa["valid_to"]) == (f"{eqa['year']}-01-01", f"{eqa['year']}-12-31")


@pytest.mark.parametrize("uscc", VALID_USCC)
def test_valid_uscc_vectors_are_accepted(uscc: str) -> None:
    def member_of_its_province(d: dict[str, Any]) -> None:
        d["members"][0]["uscc"] = uscc
        if uscc[2:4] == "50":  # registered in Chongqing: a member there (a division of Sichuan would contradict it)
            d["members"][0]["division"] = "500103"
        _rename_refs(d, TONGJIANG, uscc)

    src = _parse(member_of_its_province)
    assert src.body["members"][0]["uscc"] == uscc


def test_a_division_in_the_other_province_than_the_uscc_was_registered_in_is_refused() -> None:
    problems = _problems(lambda d: d["members"][0].__setitem__("division", "500102"))
    assert "its 统一社会信用代码 12511921MB0001003C was registered in Sichuan (51) (511921)" in problems[
        "members[0].division"] and "division 500102 is in Chongqing (50)" in problems["members[0].division"]


def test_contradictory_eqa_results_of_one_cycle_are_refused() -> None:
    def twice(d: dict[str, Any]) -> None:
        again = dict(d["eqa"][0], result="fail" if d["eqa"][0]["result"] == "pass" else "pass")
        d["eqa"].append(again)
        d["eqa"].append(dict(d["eqa"][0]))  # the same result twice: harmless

    problems = _problems(twice)
    [(where, why)] = [(k, v) for k, v in problems.items() if k.startswith("eqa[")]
    assert why.endswith("contradicts eqa[0] (pass): the same member, item, year and provider") or \
        why.endswith("contradicts eqa[0] (fail): the same member, item, year and provider")


def _rename_refs(data: dict[str, Any], old: str, new: str) -> None:
    text = json.dumps(data, ensure_ascii=False).replace(old, new)
    data.clear()
    data.update(json.loads(text))


@pytest.mark.parametrize("uscc,why", BAD_USCC)
def test_bad_uscc_is_reported_with_its_path(uscc: str, why: str) -> None:
    problems = _problems(lambda d: d["members"][2].__setitem__("uscc", uscc))
    assert why in problems["members[2].uscc"]


def test_every_problem_is_reported_at_once() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["members"][1]["uscc"] = "12500102MB0002006K"  # bad check character
        d["authority"]["uscc"] = "11500000MB00050044"
        d["qualifications"][0]["member"] = "12330000470051726F"  # valid, but no such member
        d["eqa"][0]["item"] = {"catalogue": "chuanyu", "code": "CY-X999"}
        d["catalogues"][0]["items"][0]["loinc"] = ["6690-3"]  # wrong LOINC check digit
        d["catalogues"][0]["items"][1]["code"] = "CY-L001"  # duplicate item code
        d["members"][0]["valid_to"] = "2022-12-31"  # before valid_from
        d["qualifications"][1]["valid_to"] = "2027-02-30"  # no such date

    problems = _problems(mutate)
    assert "check character" in problems["members[1].uscc"]
    assert "check character" in problems["authority.uscc"]
    assert "not a member" in problems["qualifications[0].member"]
    assert "does not exist" in problems["eqa[0].item"]
    assert "check digit" in problems["catalogues[0].items[0].loinc[0]"]
    assert "used twice" in problems["catalogues[0].items[1].code"]
    assert "before valid_from" in problems["members[0].valid_to"]
    assert "not a calendar date" in problems["qualifications[1].valid_to"]
    # References to the member whose USCC is broken are reported too.
    assert any(loc.startswith("catalogues[0].items[0].local_codes") for loc in problems)


@pytest.mark.parametrize(
    "mutate,location,fragment",
    [
        (lambda d: d["members"][0].pop("division"), "members[0]", "'division' is a required property"),
        (lambda d: d["members"][0].__setitem__("division", 511921), "members[0].division", "not of type 'string'"),
        (lambda d: d["members"][0].__setitem__("division", "440100"), "members[0].division", "GB/T 2260 division"),
        (lambda d: d["members"][0].__setitem__("level", "四级"), "members[0].level", "does not match"),
        (
            lambda d: d["catalogues"][0]["items"][0].__setitem__("window_days", -1),
            "catalogues[0].items[0].window_days",
            "less than the minimum",
        ),
        (
            lambda d: d["catalogues"][0]["items"][0].__setitem__("window_days", 999_999_999),
            "catalogues[0].items[0].window_days",
            "greater than the maximum",
        ),
        (lambda d: d["catalogues"][0].__setitem__("scope", {"type": "provincial"}), "catalogues[0].scope", "province"),
        (
            lambda d: _qualification(d, "cdc-filing").__setitem__("scope", ["dust", "noise"]),
            f"qualifications[{_Q['cdc-filing']}].scope[1]",
            "is not one of",
        ),
        (
            lambda d: _qualification(d, "cdc-physician-1").pop("physician"),
            f"qualifications[{_Q['cdc-physician-1']}]",
            "'physician' is a required property",
        ),
        (lambda d: d.__setitem__("surprise", 1), "", "Additional properties"),
        (lambda d: d["eqa"][0].__setitem__("result", "passed"), "eqa[0].result", "is not one of"),
    ],
)
def test_schema_problems_carry_paths(mutate: Callable[[dict[str, Any]], None], location: str, fragment: str) -> None:
    problems = _problems(mutate)
    assert location in problems, problems
    assert fragment in problems[location]


def test_occupational_items_need_diagnosis_categories_for_every_exposure() -> None:
    problems = _problems(lambda d: d["diagnosis_categories"]["by_exposure"].pop("radiation"))
    assert "radiation" in problems["diagnosis_categories.by_exposure"]


def test_item_period_must_lie_within_its_catalogue() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["catalogues"][0]["valid_to"] = "2026-12-31"
        d["catalogues"][0]["items"][0]["valid_from"] = "2023-01-01"
        d["catalogues"][0]["items"][1]["valid_to"] = "2027-06-30"

    problems = _problems(mutate)
    assert "before its catalogue" in problems["catalogues[0].items[0].valid_from"]
    assert "after its catalogue" in problems["catalogues[0].items[1].valid_to"]


def test_member_certificates_are_checked(tmp_path: Path) -> None:
    now = dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
    ca_key = generate_private_key()
    ca = make_authority(
        ca_key, "11500000MB00050043", "川渝卫生健康联合办公室（演示）", now, now + dt.timedelta(days=30)
    )
    member_cert = issue_certificate(
        generate_private_key().public_key(),
        TONGJIANG,
        "通江县人民医院（演示）",
        ca_key,
        ca,
        now,
        now + dt.timedelta(days=10),
    )
    (tmp_path / "tj.pem").write_bytes(cert_pem(member_cert))

    def with_certs(d: dict[str, Any]) -> None:
        d["members"][0]["certificates"] = [{"path": "tj.pem"}]
        d["members"][1]["certificates"] = [{"pem": cert_pem(member_cert).decode()}]  # names another member
        d["members"][2]["certificates"] = [{"pem": cert_pem(ca).decode()}, {"path": "missing.pem"}]

    data = copy.deepcopy(_BASE)
    with_certs(data)
    with pytest.raises(RegistrySourceError) as info:
        parse_source(json.dumps(data, ensure_ascii=False), base_dir=tmp_path, is_json=True)
    problems = {i.location: i.message for i in info.value.issues()}
    assert "members[0].certificates[0]" not in problems and "members[0].certificates[0].path" not in problems
    assert TONGJIANG in problems["members[1].certificates[0]"]
    assert "authority" in problems["members[2].certificates[0]"] or "names" in problems["members[2].certificates[0]"]
    assert "cannot read" in problems["members[2].certificates[1].path"]


def test_unreadable_and_malformed_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_source(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("members: [\n", encoding="utf-8")
    with pytest.raises(RegistrySourceError, match="not valid YAML"):
        load_source(bad)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(RegistrySourceError, match="mapping"):
        load_source(listing)


def test_error_is_one_readable_line_naming_the_file() -> None:
    with pytest.raises(RegistrySourceError) as info:
        _parse(lambda d: d["qualifications"][0].__setitem__("member", "91350100M000100Y44"))
    line = str(info.value)
    assert "\n" not in line and line.startswith("test: registry source has 1 problem(s): qualifications[0].member:")
    assert len(info.value.issues()) == 1


def test_schema_documents_every_section() -> None:
    schema = source_schema()
    assert set(schema["required"]) == {"format", "version", "authority", "members", "catalogues"}
    assert {"member", "certificate", "qualification", "eqa", "catalogue", "item", "scope"} <= set(schema["$defs"])
    assert all("description" in schema["properties"][k] for k in ("version", "authority", "diagnosis_categories"))


def test_an_eqa_window_far_from_its_year_is_refused() -> None:
    """A result of 2020 valid in 2026 (a year typed wrong, or a window copied from another row) is refused; one
    used the year after its own is taken."""
    def far(d: dict[str, Any]) -> None:
        d["eqa"][0] = dict(d["eqa"][0], year=2020, valid_from="2026-01-01", valid_to="2026-12-05")

    problems = _problems(far)
    assert "an EQA result of 2020 valid from 2026-01-01" in problems["eqa[0].valid_from"], problems

    def next_year(d: dict[str, Any]) -> None:
        d["eqa"][0] = dict(d["eqa"][0], year=2025, valid_from="2026-01-01", valid_to="2026-12-31")

    _parse(next_year)


@pytest.mark.parametrize("grade,taken", [("三级特等", True), ("二级甲等", True), ("二级特等", False),
                                         ("一级特等", False), ("未定级", True)])
def test_only_a_三级_hospital_has_a_特等_grade(grade: str, taken: bool) -> None:
    def graded(d: dict[str, Any]) -> None:
        q = next(q for q in d["qualifications"] if q["type"] == "hospital-grade")
        q["grade"] = grade

    if taken:
        _parse(graded)
    else:
        assert any(grade in why or "does not match" in why for why in _problems(graded).values())
