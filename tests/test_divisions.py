"""GB/T 2260 divisions of 四川 and 重庆, versioned: the table, members' divisions and 身份证号 address codes.

身份证号 numbers below are synthetic: given valid check digits with gateway.identifiers.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from conftest import DATA
from gateway.adapters.base import RawUnit
from gateway.adapters.hl7v2 import HL7v2Adapter
from gateway.commands.registry import registry
from gateway.config import REPO_ROOT, load_settings
from gateway.demo.registry import DEMO_SOURCE
from gateway.divisions import (
    TABLE_PATH,
    PROVINCE_PREFIXES,
    division_problem,
    division_table,
    load_division_table,
)
from gateway.errors import ConfigError, IdentifierError
from gateway.identifiers import check_id_card, id_card_check_char, id_card_warnings
from gateway.mapping.tables import load_mappings
from gateway.pipeline import Pipeline, Status
from gateway.registry.source import RegistrySourceError, parse_source, read_source_data

CST = dt.timezone(dt.timedelta(hours=8))
SOURCE = read_source_data(DEMO_SOURCE)
LINSHUI = "12511623MB0009005R"


def card(address: str, birth: str, seq: str = "001") -> str:
    body = f"{address}{birth}{seq}"
    return body + id_card_check_char(body)


# -- the table -------------------------------------------------------------------------------------


def test_table_loads_and_every_row_says_where_it_came_from() -> None:
    table = division_table()
    assert len(table) > 250 and table.version
    for code in table.codes():
        assert code[:2] in ("50", "51"), code
        rows = table.versions(code)
        for row in rows:
            assert row.name and row.source and row.confidence in ("verified", "likely", "recollection")
            for successor in row.replaced_by:
                assert table.versions(successor), f"{code} is replaced by {successor}, which the table lacks"
        # The standard periods of one code never overlap: on any day a code means one place.
        standard = sorted((r for r in rows if r.standard), key=lambda r: r.start or dt.date.min)
        for a, b in zip(standard, standard[1:]):
            assert a.end is not None and b.start is not None and a.end < b.start, code


@pytest.mark.parametrize("old, new, last_old_day, first_new_day", [
    ("510124", "510117", "2016-11-23", "2016-11-24"),  # 郫县 → 郫都区
    ("510132", "510118", "2020-05-31", "2020-06-01"),  # 新津县 → 新津区
    ("512081", "510185", "2016-04-30", "2016-05-01"),  # 简阳市, 资阳 → 成都
    ("510122", "510116", "2015-12-02", "2015-12-03"),  # 双流县 → 双流区
    ("500222", "500110", "2011-10-26", "2011-10-27"),  # 綦江县 → 綦江区
    ("500225", "500111", "2011-10-26", "2011-10-27"),  # 大足县 → 大足区
    ("500223", "500152", "2015-06-04", "2015-06-05"),  # 潼南
    ("500224", "500151", "2014-05-15", "2014-05-16"),  # 铜梁
    ("500226", "500153", "2015-06-04", "2015-06-05"),  # 荣昌
    ("500227", "500120", "2014-05-15", "2014-05-16"),  # 璧山
    ("500228", "500155", "2016-11-23", "2016-11-24"),  # 梁平
    ("500232", "500156", "2016-11-23", "2016-11-24"),  # 武隆
    ("500234", "500154", "2016-06-07", "2016-06-08"),  # 开县 → 开州区
    ("500381", "500116", "2006-10-21", "2006-10-22"),  # 江津
    ("500382", "500117", "2006-10-21", "2006-10-22"),  # 合川
    ("500383", "500118", "2006-10-21", "2006-10-22"),  # 永川
    ("500384", "500119", "2006-10-21", "2006-10-22"),  # 南川
    ("510202", "500103", "1997-03-13", "1997-03-14"),  # 重庆 under 四川 before 1997
])
def test_changes_of_code_are_dated(old: str, new: str, last_old_day: str, first_new_day: str) -> None:
    table = division_table()
    last, first = dt.date.fromisoformat(last_old_day), dt.date.fromisoformat(first_new_day)
    assert table.valid_on(old, last) is not None and table.valid_on(old, first) is None
    assert table.valid_on(new, first) is not None
    assert any(new in r.replaced_by for r in table.versions(old))


def test_one_code_two_places_over_time() -> None:
    table = division_table()
    before, after = table.valid_on("500110", dt.date(2010, 1, 1)), table.valid_on("500110", dt.date(2012, 1, 1))
    assert before is not None and before.name == "万盛区"
    assert after is not None and after.name == "綦江区"


def test_statistical_codes_are_flagged_not_standard() -> None:
    table = division_table()
    for code in ("500131", "500132", "500133"):
        flagged = table.non_standard(code)
        assert flagged is not None and "统一直报" in flagged.name
        assert table.valid_on(code, dt.date(2024, 1, 1)) is None


def test_a_malformed_table_is_refused_with_its_row_and_column(tmp_path: Path) -> None:
    text = TABLE_PATH.read_text(encoding="utf-8")
    bad = tmp_path / "t.csv"
    bad.write_text(text.replace("510117,郫都区,2016-11-24", "510117,郫都区,2016-13-24"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"row \d+ column valid_from"):
        load_division_table(bad)


def test_province_prefixes() -> None:
    assert {"11", "15", "21", "23", "31", "37", "41", "46", "50", "54", "61", "65", "71", "81", "82", "83"} <= \
        PROVINCE_PREFIXES
    assert not {"10", "16", "20", "24", "30", "38", "40", "47", "49", "55", "60", "66", "70", "72", "80", "84",
                "91", "99"} & PROVINCE_PREFIXES


# -- members' divisions -----------------------------------------------------------------------------


def test_division_problem_says_what_is_wrong() -> None:
    assert division_problem("511623", dt.date(2023, 1, 1)) is None
    retired = division_problem("510124", dt.date(2023, 1, 1))
    assert retired is not None and "510117" in retired and "2023-01-01" in retired
    unknown = division_problem("519999", dt.date(2023, 1, 1))
    assert unknown is not None and "any version" in unknown
    flagged = division_problem("500132", dt.date(2023, 1, 1))
    assert flagged is not None and "两江新区" in flagged and "not a GB/T 2260" in flagged and "统一直报" in flagged


def _source_problems(change: Any) -> dict[str, str]:
    data = copy.deepcopy(SOURCE)
    change(next(m for m in data["members"] if m["uscc"] == LINSHUI))
    with pytest.raises(RegistrySourceError) as info:
        parse_source(json.dumps(data, ensure_ascii=False), is_json=True)
    return {i.location: i.message for i in info.value.issues()}


@pytest.mark.parametrize("division, listed, words", [
    ("519999", "2023-01-01", "any version"),
    ("510124", "2023-01-01", "not a valid GB/T 2260 division on 2023-01-01"),  # 郫县, gone since 2016
    ("510117", "2015-01-01", "not a valid GB/T 2260 division on 2015-01-01"),  # 郫都区, not yet
    ("500131", "2023-01-01", "万盛经开区"),
])
def test_a_member_division_must_be_valid_on_its_listing_date(division: str, listed: str, words: str) -> None:
    problems = _source_problems(lambda m: m.update(division=division, valid_from=listed))
    index = [m["uscc"] for m in SOURCE["members"]].index(LINSHUI)
    message = problems[f"members[{index}].division"]
    assert "邻水县人民医院（演示）" in message and words in message


def test_registry_check_prints_the_division_problem_on_one_line(tmp_path: Path) -> None:
    data = copy.deepcopy(SOURCE)
    next(m for m in data["members"] if m["uscc"] == LINSHUI)["division"] = "500133"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    result = CliRunner().invoke(registry, ["check", str(bad)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = next(x for x in result.output.splitlines() if "500133" in x)
    assert "division" in line and "高新区" in line and "统一直报" in line


# -- 身份证号 address codes and birth dates ------------------------------------------------------------


@pytest.mark.parametrize("number", [
    card("510124", "20150301"),  # 郫县 code, born while it was valid
    card("510124", "20161123"),  # its last day
    card("510117", "19800101"),  # 郫都区 code before it existed: the number was issued later (or re-issued)
    card("512081", "19700101"),  # 简阳 under 资阳
    card("510202", "19900101"),  # 重庆 under 四川, before 1997
    card("500110", "20050101"),  # 万盛区 then, 綦江区 now
    card("110105", "19491231"),  # 北京: only the prefix is checked
    card("810000", "19900101"),  # 香港居民居住证
    card("951156", "19900101"),  # 外国人永久居留身份证 (2023): 9, 四川 51, a nationality code
])
def test_address_codes_valid_on_or_after_the_birth_date_are_accepted(number: str) -> None:
    assert check_id_card(number, on=dt.date(2026, 11, 22)) == number
    assert id_card_warnings(number) == []


@pytest.mark.parametrize("number, words", [
    (card("510124", "20190101"), "stopped being valid on 2016-11-23"),  # 郫县 code, born two years after 郫都区
    (card("510132", "20220101"), "stopped being valid on 2020-05-31"),
    (card("500381", "20100101"), "stopped being valid on 2006-10-21"),
    (card("500132", "19900101"), "not a GB/T 2260 code"),
    (card("990101", "19900101"), "no province"),
    (card("200101", "19900101"), "no province"),
])
def test_impossible_address_codes_are_refused(number: str, words: str) -> None:
    with pytest.raises(IdentifierError, match=words):
        check_id_card(number, on=dt.date(2026, 11, 22))


@pytest.mark.parametrize("number", [
    card("510124", "20170101"),  # 郫县 retired 2016-11-23: registries issued it for a while after
    card("510132", "20210101"),  # 新津县 retired 2020-05-31, born within the year after
    card("510202", "20000101"),  # 重庆市市中区 under 四川's code: a retirement the table only recollects
])
def test_a_code_retired_shortly_before_birth_or_on_a_recollected_date_is_a_warning(number: str) -> None:
    assert check_id_card(number, on=dt.date(2026, 11, 22)) == number
    [warning] = id_card_warnings(number)
    assert "stopped being valid" in warning and "it is accepted" in warning


def test_a_川渝_code_the_table_does_not_know_is_only_a_warning() -> None:
    number = card("519999", "19900101")
    assert check_id_card(number, on=dt.date(2026, 11, 22)) == number
    [warning] = id_card_warnings(number)
    assert "519999" in warning and "accepted" in warning


def test_a_birth_date_after_the_message_date_is_refused() -> None:
    number = card("511921", "20261123")
    assert check_id_card(number) == number  # no message date: not checked here
    assert check_id_card(number, on=dt.date(2026, 11, 23)) == number  # born that day
    with pytest.raises(IdentifierError, match="after the message date 2026-11-22"):
        check_id_card(number, on=dt.date(2026, 11, 22))


# -- the adapters --------------------------------------------------------------------------------------

MSH = "MSH|^~\\&|LIS|TJXRMYY|||20240601090000||ORU^R01^ORU_R01|M1|P|2.5.1||||||UNICODE UTF-8"
OBR = "OBR|1||R1|BLRT^血常规^L|||20240601080000|||||||||||||||20240601085900|||F"
OBX = "OBX|1|NM|WBC^白细胞^L||6.1|10*9/L|3.5-9.5|N|||F"


@pytest.fixture(scope="module")
def hl7() -> HL7v2Adapter:
    return HL7v2Adapter(load_mappings(REPO_ROOT / "mappings").structure("hl7v2-oru-r01"))


def _hl7(adapter: HL7v2Adapter, pid: str) -> Any:
    return adapter.read(RawUnit("\r".join([MSH, pid, OBR, OBX, ""]).encode("utf-8"), 1))


def test_hl7_future_birth_and_impossible_address_are_errors_of_their_field(hl7: HL7v2Adapter) -> None:
    ok = _hl7(hl7, f"PID|1||{card('511921', '19800101')}^^^^NNCHN||张^三||19800101|M")
    assert ok.errors == [] and ok.patient.birth_date == "1980-01-01"
    born_later = _hl7(hl7, f"PID|1||{card('511921', '19800101')}^^^^NNCHN||张^三||20240602|M")
    assert [(i.location, i.message) for i in born_later.errors] == [
        ("PID[1]-7", "birth date 2024-06-02 is after the message date 2024-06-01")
    ]
    # The 身份证号's birth date is after MSH-7 too.
    in_number = _hl7(hl7, f"PID|1||{card('511921', '20240605')}^^^^NNCHN||张^三|||M")
    assert any(i.location == "PID[1]-3" and "after the message date 2024-06-01" in i.message for i in in_number.errors)
    gone = _hl7(hl7, f"PID|1||{card('510124', '20180101')}^^^^NNCHN||张^三|||M")
    assert any(i.location == "PID[1]-3" and "510124" in i.message for i in gone.errors)
    unknown = _hl7(hl7, f"PID|1||{card('519999', '19800101')}^^^^NNCHN||张^三|||M")
    assert unknown.errors == []
    assert any(i.severity == "warning" and i.location == "PID[1]-3" and "519999" in i.message for i in unknown.issues)


def test_hl7_partial_birth_dates_are_in_the_future_only_from_their_first_day(hl7: HL7v2Adapter) -> None:
    assert _hl7(hl7, "PID|1||MR1^^^^MR||张^三||2024|M").errors == []
    assert _hl7(hl7, "PID|1||MR1^^^^MR||张^三||202406|M").errors == []
    assert [i.location for i in _hl7(hl7, "PID|1||MR1^^^^MR||张^三||202407|M").errors] == ["PID[1]-7"]


@pytest.fixture
def cdc(tmp_path: Path, clock: Any, database: str) -> Iterator[Pipeline]:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "database": database,
                                                    "issuer_uscc": "12510000MB00030095",
                                                    "issuer_name": "四川省疾病预防控制中心（演示）"})
    p = Pipeline(settings, clock=clock)
    yield p
    p.close()


CSV_HEADER = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,接害工龄,"
              "体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标识,主检结论,主检医师,报告日期")


def _csv_row(number: str, birth: str) -> str:
    return (f"TJ9,王演示,{number},男,{birth},通江演示建材有限公司,91511921MA62Q0A1XC,破碎工,1001,矽尘,6.5,在岗期间,"
            "2024-03-15,XCG-WBC,白细胞计数,6.8,10^9/L,3.5-9.5,,目前未见异常,吴主检,2024-03-22 16:30:00")


def test_csv_birth_date_after_the_report_date_is_refused(cdc: Pipeline) -> None:
    number = card("511322", "19800707")
    [ok] = cdc.convert(f"{CSV_HEADER}\n{_csv_row(number, '1980-07-07')}\n".encode(), "cdc-csv", "t.csv")
    assert ok.status is Status.CONVERTED, ok.issues
    [bad] = cdc.convert(f"{CSV_HEADER}\n{_csv_row(number, '2024-03-23')}\n".encode(), "cdc-csv", "t2.csv")
    assert bad.status is Status.REFUSED
    assert any(i.location == "row 2 column 出生日期" and "after the message date 2024-03-22" in i.message
               for i in bad.errors), bad.issues


def test_cda_birth_time_after_the_document_date_is_refused(pipeline: Pipeline) -> None:
    full = (DATA / "cda" / "lab-report-full.xml").read_bytes()
    [out] = pipeline.convert(full.replace(b'<birthTime value="19750608"/>', b'<birthTime value="20241106"/>'),
                             "cda", "t.xml")
    assert out.status is Status.REFUSED
    assert any("birthTime" in i.location and "after the message date 2024-11-05" in i.message
               for i in out.errors), out.issues
