"""Registry source checks that keep the file, its JSON Schema and the rules in step: who approved a
technical-service qualification and what its 业务范围 may list, one hospital grade at a time, hazard factors by
catalogue name or alias, dates written quoted or not, a window of at least a day, and a mark in words."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any, Callable

import jsonschema
import pytest
import yaml

from gateway.demo.registry import DEMO_SOURCE
from gateway.registry.models import Snapshot
from gateway.registry.snapshot import unsigned_snapshot
from gateway.registry.source import RegistrySourceError, parse_source, read_source_data, source_schema

CST = dt.timezone(dt.timedelta(hours=8))
LINSHUI = "12511623MB0009005R"
_BASE = read_source_data(DEMO_SOURCE)
_Q = {q["id"]: i for i, q in enumerate(_BASE["qualifications"])}


def _data(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(_BASE)
    mutate(data)
    return data


def _parse(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    return parse_source(json.dumps(_data(mutate), ensure_ascii=False), origin="test", is_json=True).body


def _problems(mutate: Callable[[dict[str, Any]], None]) -> dict[str, str]:
    with pytest.raises(RegistrySourceError) as info:
        _parse(mutate)
    return {i.location: i.message for i in info.value.issues()}


def _q(data: dict[str, Any], qid: str) -> dict[str, Any]:
    return next(q for q in data["qualifications"] if q["id"] == qid)


def _schema_errors(data: Any) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(source_schema()).iter_errors(data)]


# -- who approved a technical-service qualification ----------------------------------------------------------------


def test_a_national_authority_has_no_province_and_a_provincial_one_names_it() -> None:
    body = _parse(lambda d: None)
    assert _q(body, "cdc-ohs")["authority"] == {"name": "国家卫生健康委员会（演示）", "level": "national"}
    snapshot = Snapshot.from_document(
        unsigned_snapshot(parse_source(json.dumps(_BASE, ensure_ascii=False), is_json=True),
                          dt.datetime(2025, 1, 1, tzinfo=CST), dt.timedelta(days=10)).document
    )
    held = {q.id: q for q in snapshot.qualifications}
    assert held["cdc-ohs"].nationally_approved and held["cdc-rhs"].nationally_approved
    assert not held["ya-ohs"].nationally_approved  # 重庆市卫健委, province 50

    def national_with_province(d: dict[str, Any]) -> None:
        _q(d, "cdc-ohs")["authority"].update(province="51")

    def provincial_without_province(d: dict[str, Any]) -> None:
        _q(d, "ya-ohs")["authority"] = {"name": "重庆市卫生健康委员会（演示）", "level": "provincial"}

    assert _problems(national_with_province)[f"qualifications[{_Q['cdc-ohs']}].authority"] == \
        "a national authority (level: national) names no province"
    problems = _problems(provincial_without_province)
    assert "'province' is a required property" in problems[f"qualifications[{_Q['ya-ohs']}].authority"]


# -- a technical-service qualification's 业务范围 -------------------------------------------------------------------


@pytest.mark.parametrize("scope", [["radiation-protection-testing"], ["放射卫生防护检测", "个人剂量监测"],
                                   ["放射防护检测", "放射诊疗建设项目职业病危害放射防护评价"]])
def test_a_service_scope_lists_service_types_by_code_or_name(scope: list[str]) -> None:
    body = _parse(lambda d: _q(d, "ya-rhs").update(scope=scope))
    assert _q(body, "ya-rhs")["scope"] == scope


def test_a_service_scope_entry_that_is_no_service_type_is_refused_by_its_path() -> None:
    problems = _problems(lambda d: _q(d, "ya-rhs").update(scope=["放射卫生防护检测", "洗碗"]))
    message = problems[f"qualifications[{_Q['ya-rhs']}].scope[1]"]
    assert "'洗碗' is not a technical-service type of 放射卫生技术服务机构资质" in message
    assert "personal-dose-monitoring (个人剂量监测)" in message and "occupational-hazard-testing" not in message
    assert list(problems) == [f"qualifications[{_Q['ya-rhs']}].scope[1]"]
    # a service of the other kind of qualification is named as such
    problems = _problems(lambda d: _q(d, "ya-ohs").update(scope=["检测", "个人剂量监测"]))
    assert problems[f"qualifications[{_Q['ya-ohs']}].scope[1]"] == (
        "'个人剂量监测' (个人剂量监测) is a service of 放射卫生技术服务机构资质, not of 职业卫生技术服务机构资质")


# -- one hospital grade at a time -----------------------------------------------------------------------------------


def test_overlapping_hospital_grades_of_a_member_are_refused_naming_both() -> None:
    problems = _problems(lambda d: _q(d, "ls-grade-3").update(valid_from="2025-06-01"))
    message = problems[f"qualifications[{_Q['ls-grade-3']}].valid_from"]
    assert "ls-grade-2 (二级甲等, 2021-07-01 – 2025-06-30)" in message
    assert "ls-grade-3 (三级乙等, from 2025-06-01)" in message and LINSHUI in message

    # listed the other way round, the same problem
    def reordered(d: dict[str, Any]) -> None:
        _q(d, "ls-grade-3").update(valid_from="2025-06-01")
        d["qualifications"].append(d["qualifications"].pop(_Q["ls-grade-2"]))

    assert any("ls-grade-2" in m and "ls-grade-3" in m and "overlap" in m for m in _problems(reordered).values())
    # an open-ended earlier grade overlaps every later one
    problems = _problems(lambda d: _q(d, "ls-grade-2").update(valid_to=None))
    assert "open-ended" in problems[f"qualifications[{_Q['ls-grade-3']}].valid_from"]


def test_a_grade_suspended_before_the_next_one_starts_does_not_overlap() -> None:
    def suspended(d: dict[str, Any]) -> None:
        _q(d, "ls-grade-2").update(valid_to="2026-06-30", status="suspended", status_date="2025-07-01")

    body = _parse(suspended)  # ends 2025-06-30, the day before its status date; ls-grade-3 starts 2025-07-01
    assert _q(body, "ls-grade-2")["status"] == "suspended"
    problems = _problems(lambda d: _q(d, "ls-grade-2").update(
        valid_to="2026-06-30", status="suspended", status_date="2025-07-02"))
    assert "overlap" in problems[f"qualifications[{_Q['ls-grade-3']}].valid_from"]


# -- hazard factors by catalogue name or alias ----------------------------------------------------------------------


def test_a_filing_may_list_factors_by_catalogue_name_or_alias() -> None:
    body = _parse(lambda d: _q(d, "ls-filing").update(factors=["铅", "苯", "chemical-030", "mercury"]))
    assert _q(body, "ls-filing")["factors"] == ["lead", "benzene", "chemical-030", "mercury"]
    problems = _problems(lambda d: _q(d, "ls-filing").update(factors=["铅", "lead", "某种演示溶剂"]))
    loc = f"qualifications[{_Q['ls-filing']}].factors"
    assert "listed twice" in problems[f"{loc}[1]"]
    assert "'某种演示溶剂' is not a factor of 《职业病危害因素分类目录》" in problems[f"{loc}[2]"]


# -- the JSON Schema and the check agree ----------------------------------------------------------------------------


def test_an_unquoted_yaml_date_is_accepted_by_the_schema_and_the_check() -> None:
    text = DEMO_SOURCE.read_text(encoding="utf-8").replace('valid_from: "2023-06-01"', "valid_from: 2023-06-01")
    assert "valid_from: 2023-06-01" in text
    as_yaml_11 = yaml.safe_load(text)  # what a YAML 1.1 reader (PyYAML) gives a schema validator
    assert isinstance(_q(as_yaml_11, "tj-grade")["valid_from"], dt.date)
    assert _schema_errors(as_yaml_11) == []
    body = parse_source(text, origin="test", base_dir=DEMO_SOURCE.parent).body
    assert _q(body, "tj-grade")["valid_from"] == "2023-06-01"
    # a wrong date is refused by both, whichever way it is written
    bad = _data(lambda d: _q(d, "tj-grade").update(valid_from="2023-6-1"))
    assert _schema_errors(bad)
    problems = _problems(lambda d: _q(d, "tj-grade").update(valid_from="2023-6-1"))
    assert problems[f"qualifications[{_Q['tj-grade']}].valid_from"] == "'2023-6-1' is not a date written YYYY-MM-DD"
    assert _schema_errors(_data(lambda d: _q(d, "tj-grade").update(valid_from=20230601)))


@pytest.mark.parametrize("days", [0, -1])
def test_a_window_of_less_than_a_day_is_refused_by_the_schema_and_the_check(days: int) -> None:
    def change(d: dict[str, Any]) -> None:
        d["catalogues"][0]["items"][0]["window_days"] = days

    assert _schema_errors(_data(change))
    assert "less than the minimum of 1" in _problems(change)["catalogues[0].items[0].window_days"]
    assert _parse(lambda d: d["catalogues"][0]["items"][0].update(window_days=1))


@pytest.mark.parametrize("mark", ["川渝互认", "HR", "川渝 HR"])
def test_a_mark_problem_says_what_a_mark_is(mark: str) -> None:
    problems = _problems(lambda d: d["catalogues"][0].update(mark=mark))
    assert problems["catalogues[0].mark"] == f"{mark!r} is not a region prefix followed by HR (e.g. 川渝HR)"
