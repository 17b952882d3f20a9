"""CDC CSV channel: occupational-health exam exports to exam Bundles; layouts as tables; errors per exam and column."""
from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import DATA, make_token
from gateway import jsonutil
from gateway.adapters.base import RawUnit
from gateway.adapters.labcsv import LabCSVAdapter, parse_exposure_years
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.fhir import profiles
from gateway.fhir.bundle import entries_of
from gateway.mapping.tables import load_mappings
from gateway.pipeline import Pipeline, Status
from gateway.recognition.facts import facts_from_bundle

CSV = DATA / "csv"
CDC = "12510000MB00030095"
FULING = "12500102MB0002006J"
HEADER = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,接害工龄,"
          "体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标志,主检结论,主检医师,报告日期")
EXAM = "TJ9,王演示,51132219800707331X,男,1980-07-07,通江演示建材有限公司,91511921MA62Q0A1XC,破碎工,1001,矽尘,6.5,在岗期间,2024-03-15"
TAIL = "目前未见异常,吴主检,2024-03-22 16:30:00"


def row(exam: str = EXAM, item: str = "XCG-WBC,白细胞计数,6.8,10^9/L,3.5-9.5,", tail: str = TAIL) -> str:
    return f"{exam},{item},{tail}"


def csv_bytes(*rows: str, header: str = HEADER, encoding: str = "utf-8") -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode(encoding)


@pytest.fixture
def cdc(tmp_path: Path, clock, database: str) -> Pipeline:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "issuer_name": "四川省疾病预防控制中心（演示）", "database": database})
    p = Pipeline(settings, clock=clock)
    yield p
    p.close()


def outcomes(p: Pipeline, data: bytes):
    return list(p.convert(data, "cdc-csv", "test.csv"))


def report_of(bundle: dict) -> dict:
    return entries_of(bundle, "DiagnosticReport")[0]


def ext(report: dict, name: str) -> list[dict]:
    url = f"https://fhir.cyhr.org.cn/StructureDefinition/{name}"
    return [e for e in report.get("extension", []) if e["url"] == url]


# -- a good exam ----------------------------------------------------------------------------


def test_rows_of_one_exam_become_one_occupational_report(cdc: Pipeline) -> None:
    data = csv_bytes(row(), row(item="XY-SBP,收缩压,128,mmHg,90-139,"), row(item="XP,胸部X射线摄片,未见异常,,,"))
    [out] = outcomes(cdc, data)
    assert out.status is Status.CONVERTED and out.label == "体检编号 TJ9"
    bundle = out.bundle
    assert profiles.validate(bundle) == []
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == \
        ["Organization", "Patient", "Organization", "Observation", "Observation", "Observation", "DiagnosticReport"]
    issuer, employer = entries_of(bundle, "Organization")
    assert issuer["identifier"][0]["value"] == CDC  # the configured member issues the Bundle
    assert employer["identifier"][0]["value"] == "91511921MA62Q0A1XC" and employer["name"] == "通江演示建材有限公司"
    report = report_of(bundle)
    assert report["meta"]["profile"] == ["https://fhir.cyhr.org.cn/StructureDefinition/cyhr-occupational-exam-report"]
    assert report["category"][0]["coding"][0]["code"] == "occupational-health"
    assert report["identifier"][0]["value"] == "TJ9"
    assert ext(report, "exam-type")[0]["valueCoding"] == {"system": "https://fhir.cyhr.org.cn/CodeSystem/exam-type",
                                                          "code": "periodic", "display": "在岗期间"}
    [hazard] = ext(report, "hazard-factor")
    assert [p["valueCoding"].get("code") for p in hazard["extension"]] == ["silica-dust", "dust", "1001"]
    assert hazard["extension"][2]["valueCoding"] == {"system": "https://fhir.cyhr.org.cn/sid/hazard-code/cdc-zyjk",
                                                     "code": "1001", "display": "矽尘"}  # the sender's own code
    assert ext(report, "exposure-years")[0]["valueDecimal"] == Decimal("6.5")
    assert ext(report, "occupation")[0]["valueString"] == "破碎工"
    assert ext(report, "employer")[0]["valueReference"]["reference"] == f"urn:uuid:{employer['id']}"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "no-abnormality"
    assert report["resultsInterpreter"] == [{"display": "吴主检"}]
    assert report["effectiveDateTime"] == "2024-03-15" and report["issued"] == "2024-03-22T16:30:00+08:00"
    obs = entries_of(bundle, "Observation")
    assert [o["code"]["coding"][0]["code"] for o in obs] == ["XCG-WBC", "XY-SBP", "XP"]
    assert obs[0]["code"]["coding"][1]["code"] == "6690-2" and obs[2]["valueString"] == "未见异常"
    assert all(o["status"] == "final" and o["effectiveDateTime"] == "2024-03-15" for o in obs)


def test_recognition_reads_exam_type_hazards_and_conclusion_apart(cdc: Pipeline) -> None:
    [out] = outcomes(cdc, csv_bytes(row()))
    facts = facts_from_bundle(out.bundle)
    observation = [f for f in facts if f.kind == "observation"][0]
    assert observation.exam_type == "periodic" and observation.report_class == "occupational"
    assert [(h.code, h.category) for h in observation.hazard_factors] == [("silica-dust", "dust")]
    assert [f.kind for f in facts].count("conclusion") == 1  # the conclusion is never a recognised result


def test_conclusion_text_is_kept_and_its_head_is_coded(cdc: Pipeline) -> None:
    [out] = outcomes(cdc, csv_bytes(row(tail="职业禁忌证：中度贫血,吴主检,2024-03-22 16:30:00")))
    report = report_of(out.bundle)
    assert report["conclusion"] == "职业禁忌证：中度贫血"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "contraindication"


def test_several_hazard_factors_in_a_cell_and_across_rows(cdc: Pipeline) -> None:
    exam = EXAM.replace(",1001,矽尘,", ",1001、3001,矽尘、噪声,")
    other = EXAM.replace(",1001,矽尘,", ",2001,铅及其无机化合物,")
    [out] = outcomes(cdc, csv_bytes(row(exam), row(other, item="XCG-HGB,血红蛋白,140,g/L,130-175,")))
    factors = [[p["valueCoding"]["code"] for p in e["extension"][:2]]
               for e in ext(report_of(out.bundle), "hazard-factor")]
    assert factors == [["silica-dust", "dust"], ["noise", "physical"], ["lead", "chemical"]]


def test_report_date_without_time_and_employer_without_uscc(cdc: Pipeline) -> None:
    exam = EXAM.replace(",91511921MA62Q0A1XC,", ",,")
    [out] = outcomes(cdc, csv_bytes(row(exam, tail="目前未见异常,吴主检,2024-03-22")))
    assert out.status is Status.CONVERTED
    assert [(i.severity, i.location) for i in out.issues] == [("warning", "row 2 column 用人单位统一社会信用代码")]
    report = report_of(out.bundle)
    assert report["issued"] == "2024-03-22T00:00:00+08:00" and out.bundle["timestamp"] == report["issued"]
    assert ext(report, "employer")[0]["valueReference"] == {"display": "通江演示建材有限公司"}
    assert len(entries_of(out.bundle, "Organization")) == 1
    assert profiles.validate(out.bundle) == []


# -- errors name the exam and the column; other exams still convert ----------------------------


@pytest.mark.parametrize("change, location, words", [
    (("51132219800707331X", "511322198007073310"), "row 2 column 身份证号", "check digit"),
    ((",在岗期间,", ",入职体检,"), "row 2 column 体检类型", "unknown exam type '入职体检'"),
    ((TAIL, "复查," + TAIL.split(",", 1)[1]), "row 2 column 主检结论", "复查 is not a final conclusion"),
    ((TAIL, "基本正常," + TAIL.split(",", 1)[1]), "row 2 column 主检结论", "unknown conclusion '基本正常'"),
    (("91511921MA62Q0A1XC", "91511921MA62Q0A1XD"), "row 2 column 用人单位统一社会信用代码", "check character"),
    ((",1001,矽尘,", ",,,"), "row 2 column 接害因素代码", "no hazard factor"),
    ((",6.5,", ",六年,"), "row 2 column 接害工龄", "not a number of years"),
    ((",2024-03-15", ",2024-02-30"), "row 2 column 体检日期", "not a calendar date"),
    ((",1980-07-07,", ",1980-13-07,"), "row 2 column 出生日期", "does not exist"),
])
def test_bad_values_refuse_only_their_exam(cdc: Pipeline, change: tuple[str, str], location: str,
                                           words: str) -> None:
    bad = row().replace(*change)
    good = row(EXAM.replace("TJ9", "TJ10"))
    first, second = outcomes(cdc, csv_bytes(bad, good))
    assert first.status is Status.REFUSED and first.ack_code == "AE" and first.label == "体检编号 TJ9"
    assert any(i.location == location and words in i.message for i in first.errors), first.issues
    assert second.status is Status.CONVERTED


def test_an_exam_whose_rows_disagree_is_refused(cdc: Pipeline) -> None:
    [out] = outcomes(cdc, csv_bytes(row(), row(tail=TAIL.replace("目前未见异常", "其他疾病或异常")),
                                    row(EXAM.replace("王演示", "王另一"))))
    located = {i.location: i.message for i in out.errors}
    assert located["row 3 column 主检结论"] == "differs from row 2 of the same exam ('其他疾病或异常' here, '目前未见异常' there)"
    assert located["row 4 column 姓名"] == "differs from row 2 of the same exam"  # names are not echoed


def test_a_reappearing_exam_number_is_refused(cdc: Pipeline) -> None:
    other = EXAM.replace("TJ9", "TJ10")
    outs = outcomes(cdc, csv_bytes(row(), row(), row(other), row(), row()))
    assert [o.status for o in outs] == [Status.CONVERTED, Status.CONVERTED, Status.REFUSED]
    assert [(i.location, i.code) for i in outs[2].errors] == [("rows 5-6", "duplicate")]
    assert "must be contiguous" in outs[2].errors[0].message


def test_header_that_matches_no_layout(cdc: Pipeline) -> None:
    [out] = outcomes(cdc, csv_bytes(row(), header=HEADER.replace("身份证号", "证件号")))
    assert out.ack_code == "AR" and out.label == "header"
    assert out.errors[0].location == "row 1"
    assert "closest is csv-cdc-occupational-exam, which needs the columns 身份证号" in out.errors[0].message


def test_rows_with_wrong_column_count_or_broken_bytes(cdc: Pipeline) -> None:
    short = row().rsplit(",", 1)[0]
    good = row(EXAM.replace("TJ9", "TJ10"))
    data = csv_bytes(short, good) + b"TJ11," + "王演示".encode("utf-8")[:4] + b"\xff," + row()[5:].encode()
    outs = outcomes(cdc, data)
    assert [o.status for o in outs] == [Status.REFUSED, Status.CONVERTED, Status.REFUSED]
    assert outs[0].errors[0].message == "row has 21 columns, the header has 22"
    assert outs[2].errors[0].location == "row 4" and "not valid utf-8" in outs[2].errors[0].message


def test_quoted_fields_with_commas_and_line_breaks(cdc: Pipeline) -> None:
    text = row(item='XP,胸部X射线摄片,"双肺纹理清晰,\n心影不大",,,')
    [out] = outcomes(cdc, csv_bytes(text, row(item="XCG-HGB,血红蛋白,140,g/L,130-175,")))
    obs = entries_of(out.bundle, "Observation")
    assert obs[0]["valueString"] == "双肺纹理清晰,\n心影不大"
    assert out.issues == []


def test_a_quote_inside_a_cell_not_quoted_is_a_character_and_every_exam_keeps_its_rows(cdc: Pipeline) -> None:
    """``纯音听阈测试(4"耳机)``: a quote that does not open its cell is a character (as the csv module and
    spreadsheets read it); it held the rows after it as one quoted field, so that an exam lost rows and the exams
    after it vanished without a word."""
    other, third = EXAM.replace("TJ9,", "TJ10,", 1), EXAM.replace("TJ9,", "TJ11,", 1)
    data = csv_bytes(row(item='TL,纯音听阈测试(4"耳机),22,dB HL,≤25,'), row(item="XCG-HGB,血红蛋白,140,g/L,130-175,"),
                     row(other, item='XY-SBP,收缩压(袖带12"),128,mmHg,90-139,'),
                     row(other, item="XCG-WBC,白细胞计数,6.8,10^9/L,3.5-9.5,"),
                     row(third, item='XP,胸部X射线摄片,"双肺纹理清晰,""未见""异常\n心影不大",,,'),
                     row(third, item="XCG-HGB,血红蛋白,150,g/L,130-175,"))
    found = outcomes(cdc, data)
    assert [o.status for o in found] == [Status.CONVERTED] * 3, [i.line() for o in found for i in o.issues]
    values = [[o.get("valueString") or str(o["valueQuantity"]["value"]) for o in entries_of(out.bundle, "Observation")]
              for out in found]
    assert values == [["22", "140"], ["128", "6.8"], ['双肺纹理清晰,"未见"异常\n心影不大', "150"]]
    names = [obs["code"]["coding"][-1].get("display") for obs in entries_of(found[0].bundle, "Observation")]
    assert '纯音听阈测试(4"耳机)' in names


def test_rows_a_quote_left_open_takes_in_are_named_and_their_exam_refused_not_stored_incomplete(
        cdc: Pipeline) -> None:
    """A quote opening a cell and not closed on its line takes the lines after it into that cell, as every CSV
    reader reads it: the exams those lines belong to were stored without them, or vanished without a word."""
    other = EXAM.replace("TJ9,", "TJ10,", 1)
    data = csv_bytes(row(item='XP,"胸部X射线摄片,双肺纹理清晰,,,'),
                     row(other, item='TL,纯音听阈测试(4"耳机),22,dB HL,≤25,'),
                     row(other, item="XCG-HGB,血红蛋白,140,g/L,130-175,"))
    first, second = outcomes(cdc, data)
    assert first.status is second.status is Status.REFUSED
    [joined] = first.errors
    assert "runs over 2 lines" in joined.message and "'TJ10'" in joined.message
    [incomplete] = second.errors
    assert incomplete.location == "row 3" and "inside a quoted cell of row 2" in incomplete.message
    never = outcomes(cdc, csv_bytes(row(item='XP,"胸部X射线摄片,双肺纹理清晰,,,'), row(other), row(other)))
    assert len(never) == 1 and "are rows of 'TJ10'" in never[0].errors[0].message


def test_records_are_cut_where_the_csv_module_cuts_them() -> None:
    """The records the adapter cuts, before it decodes them, are the csv module's, for quotes anywhere: at a cell's
    start, inside it, doubled, closing before other characters, over line ends; in bytes of GBK and UTF-8. (Every
    line starts with a letter, so that no record is a blank row, which the adapter skips.)"""
    import csv
    import random

    from gateway.adapters.labcsv import _records

    pieces = ["a", "测试", '"', '""', ",", "\nk", "\r\nk", " ", 'x"y', '"q,r"', '"多\nk行"', '4"耳机', '",']
    rng = random.Random(20261207)
    for case in range(4000):
        text = "k" + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) + "\n"
        expected = list(csv.reader(io.StringIO(text, newline="")))
        for codec in ("utf-8", "gbk"):
            found = list(_records(io.BytesIO(text.encode(codec)), codec))
            assert len(found) == len(expected), (case, codec, text)
            # a quoted field the file leaves open is its last record's problem (its fields are not taken), and only its
            problems = [problem for _, _, _, problem in found]
            assert all(not p for p in problems[:-1]), (case, text)
            whole = expected
            if problems[-1]:
                assert "not closed" in problems[-1], (case, text)
                found, whole = found[:-1], expected[:-1]
            assert [fields for _, _, fields, _ in found] == whole, (case, codec, text)


def test_a_report_dated_before_its_exam_or_in_the_future_is_said_at_its_cell(cdc: Pipeline) -> None:
    early = outcomes(cdc, csv_bytes(row(tail=TAIL.replace("2024-03-22 16:30:00", "2024-03-01 10:00:00"))))[0]
    [said] = [i for i in early.issues if "after the report was issued" in i.message]
    assert said.severity == "warning" and said.location == "row 2 column 体检日期"
    late = outcomes(cdc, csv_bytes(row(tail=TAIL.replace("2024-03-22", "2099-03-22"))))[0]
    [said] = [i for i in late.issues if "in the future" in i.message]
    assert said.severity == "warning" and said.location == "row 2 column 报告日期"
    assert early.status is late.status is Status.CONVERTED


# -- encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [
    lambda text: text.encode("utf-8"),
    lambda text: b"\xef\xbb\xbf" + text.encode("utf-8"),
    lambda text: text.encode("gbk"),
    lambda text: text.replace("\n", "\r\n").encode("gb18030"),
])
def test_utf8_with_or_without_bom_and_gbk_read_the_same(cdc: Pipeline, encode) -> None:
    text = "\n".join([HEADER, row(), row(item="XY-SBP,收缩压,128,mmHg,90-139,")]) + "\n"
    [out] = outcomes(cdc, encode(text))
    assert out.status is Status.CONVERTED
    assert entries_of(out.bundle, "Patient")[0]["name"] == [{"text": "王演示"}]
    assert ext(report_of(out.bundle), "occupation")[0]["valueString"] == "破碎工"


# -- layouts are tables ---------------------------------------------------------------------


def test_the_hospital_layout_is_chosen_by_its_headers(tmp_path: Path, clock) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": FULING,
                                                    "issuer_name": "重庆市涪陵中心医院（演示）"})
    outs = list(Pipeline(settings, clock=clock).convert((CSV / "hospital-exams.csv").read_bytes(), "cdc-csv"))
    assert [o.label for o in outs] == ["检查编号 FL-ZY-20240501", "检查编号 FL-ZY-20240502"]
    report = report_of(outs[0].bundle)
    assert ext(report, "exposure-years")[0]["valueDecimal"] == Decimal("3.5")  # 3年6个月
    assert report["effectiveDateTime"] == "2024-05-06"  # 2024/5/6
    assert report["resultsInterpreter"][0]["identifier"]["value"] == "FL0087"  # 主检医生工号
    assert entries_of(outs[0].bundle, "Patient")[0]["gender"] == "female"  # GB/T 2261.1 code 2


def test_a_new_layout_needs_a_table_not_code(tmp_path: Path, clock) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(load_settings(environ={}).mappings_dir, mappings)
    (mappings / "csv" / "district-cdc.yaml").write_text("""\
id: csv-district-cdc
version: 1.0.0
target: https://fhir.cyhr.org.cn/StructureDefinition/cyhr-occupational-exam-report
format: cdc-csv
columns:
  exam_number: 编号
  name: 劳动者姓名
  id_card: 公民身份号码
  sex: 性别
  employer_name: 企业名称
  employer_uscc: 信用代码
  hazard_name: 职业病危害因素
  exam_type: 检查种类
  exam_date: 检查时间
  item_code: 指标代码
  item_name: 指标名称
  value: 指标结果
  unit: 计量单位
  conclusion: 检查结论
  chief_physician: 主检
  report_date: 出具日期
report_code: {code: ZYJK, display: 职业健康检查}
concept_tables: {items: cdc-items, exam_types: exam-types, conclusions: exam-conclusions,
                 hazard_factors: hazard-factors, report_status: source-report-status}
""", encoding="utf-8")
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "issuer_name": "x", "mappings_dir": str(mappings)})
    data = ("指标代码,指标名称,指标结果,计量单位,编号,劳动者姓名,公民身份号码,性别,企业名称,信用代码,职业病危害因素,"
            "检查种类,检查时间,检查结论,主检,出具日期\n"
            "XCG-WBC,白细胞计数,6.8,10^9/L,QX-1,王演示,51132219800707331X,男,通江演示建材有限公司,91511921MA62Q0A1XC,噪声,"
            "上岗前,2024-06-01,目前未见异常,吴主检,2024-06-05 10:00\n").encode("utf-8")
    [out] = list(Pipeline(settings, clock=clock).convert(data, "cdc-csv"))
    assert out.status is Status.CONVERTED and out.label == "编号 QX-1", out.issues
    report = report_of(out.bundle)
    assert ext(report, "exam-type")[0]["valueCoding"]["code"] == "pre-employment"
    assert [p["valueCoding"].get("code") for p in ext(report, "hazard-factor")[0]["extension"]] == \
        ["noise", "physical", None]  # the sender wrote a name only: kept as its display


def test_incomplete_layouts_and_hazard_tables_fail_at_start_up(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(load_settings(environ={}).mappings_dir, mappings)
    layout = mappings / "csv" / "cdc-occupational-exam.yaml"
    layout.write_text(layout.read_text(encoding="utf-8").replace("  id_card: 身份证号\n", ""), encoding="utf-8")
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "mappings_dir": str(mappings)})
    with pytest.raises(ConfigError, match="names no column for: id_card"):
        Pipeline(settings)
    shutil.rmtree(mappings)
    shutil.copytree(load_settings(environ={}).mappings_dir, mappings)
    table = mappings / "concepts" / "hazard-factors.csv"
    lines = table.read_text(encoding="utf-8").splitlines()
    category_row = "*,手传振动,https://fhir.cyhr.org.cn/CodeSystem/exposure-category"
    table.write_text("\n".join(line for line in lines if not line.startswith(category_row)) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'手传振动' needs one"):
        Pipeline(settings)


@pytest.mark.parametrize("text, years", [("6.5", "6.5"), ("6", "6"), ("6年", "6"), ("3年6个月", "3.50"),
                                         ("3年6月", "3.50"), ("8个月", "0.67"), ("0.5年", "0.5"), (" 2年 1个月 ", "2.08")])
def test_exposure_years(text: str, years: str) -> None:
    assert parse_exposure_years(text) == Decimal(years)


@pytest.mark.parametrize("text", ["", "年", "六年", "3年12个月", "-1", "3.5.1"])
def test_exposure_years_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_exposure_years(text)


def test_a_unit_read_back_from_storage_is_read_the_same() -> None:
    structures = load_mappings(load_settings(environ={}).mappings_dir).structures.values()
    adapter = LabCSVAdapter([s for s in structures if s.get("format") == "cdc-csv"])
    data = (CSV / "cdc-exams-gbk.csv").read_bytes()
    units = list(adapter.split(data))
    assert [u.meta["exam"] for u in units] == ["TJ2024101", "TJ2024102"]
    again = adapter.read(RawUnit(units[1].data, 1))  # no meta: as reprocessed from the stored raw bytes
    first = adapter.read(units[1])
    assert again.message_id == first.message_id  # same exam, same duplicate key
    assert (again.patient.id_card, again.patient.name) == (first.patient.id_card, first.patient.name)
    assert again.reports[0].results[0].location == "row 2"  # rows are counted within the stored unit
    assert len(again.reports[0].results) == 2


# -- storage, HTTP, search, CLI -------------------------------------------------------------


def test_ingest_is_idempotent_and_a_changed_export_is_a_new_version(cdc: Pipeline) -> None:
    data = csv_bytes(row(), row(item="XY-SBP,收缩压,128,mmHg,90-139,"))
    first = cdc.ingest(data, "cdc-csv", channel="file")[0]
    again = cdc.ingest(data, "cdc-csv", channel="file")[0]
    assert first.status is Status.STORED and again.status is Status.DUPLICATE
    changed = cdc.ingest(data.replace(b",128,", b",126,"), "cdc-csv", channel="file")[0]
    assert changed.status is Status.STORED
    # the exam exported again with a changed result corrects the one stored: a new version of its own, the earlier
    # one superseded (still readable), searches answer the correction
    found = cdc.store.search("DiagnosticReport", [("identifier", "urn:oid:2.16.156.10011.1.33|TJ9")])
    assert found.total == 1 and found.resources[0]["status"] == "corrected"
    assert found.resources[0]["id"] != entries_of(first.bundle, "DiagnosticReport")[0]["id"]
    [sbp] = cdc.store.search("Observation", [("code", "http://loinc.org|8480-6")]).resources
    assert str(sbp["valueQuantity"]["value"]) == "126"


def test_an_id_card_number_in_full_width_digits_is_read_as_the_number(cdc: Pipeline) -> None:
    full_width = str.maketrans("0123456789X", "０１２３４５６７８９Ｘ")
    exam = EXAM.replace("51132219800707331X", "51132219800707331X".translate(full_width))
    [out] = outcomes(cdc, csv_bytes(row(exam)))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    [patient] = entries_of(out.bundle, "Patient")
    assert patient["identifier"][0]["value"] == "51132219800707331X"


def test_an_exam_sent_again_with_fewer_rows_names_the_items_left_out(cdc: Pipeline) -> None:
    """An export re-sent with fewer rows of an exam stored before: the exam is stored with this copy's rows, and the
    answer names the items the copy leaves out, which stay stored as they were (listed by no current report)."""
    rows = [row(), row(item="XY-SBP,收缩压,128,mmHg,90-139,"), row(item="XP,胸部X射线摄片,未见异常,,,")]
    assert cdc.ingest(csv_bytes(*rows), "cdc-csv", channel="file")[0].status is Status.STORED
    out = cdc.ingest(csv_bytes(rows[0]), "cdc-csv", channel="file")[0]
    assert out.status is Status.STORED
    [warning] = [i for i in out.issues if "leaves out" in i.message]
    assert warning.severity == "warning" and warning.location == "report TJ9"
    assert "corrects a version with 3 results and leaves out 2 of them: " in warning.message
    assert "收缩压" in warning.message and "胸部X射线摄片 (XP)" in warning.message and "白细胞" not in warning.message
    report = cdc.store.search("DiagnosticReport", [("identifier", "urn:oid:2.16.156.10011.1.33|TJ9")]).resources[0]
    assert len(report["result"]) == 1 and report["status"] == "corrected"


def test_post_ingest_cdc_csv_answers_per_exam_and_reports_are_searchable(tmp_path: Path, clock, database: str) -> None:
    from gateway.api.app import create_app

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "issuer_name": "四川省疾病预防控制中心（演示）", "database": database})
    pipeline = Pipeline(settings, clock=clock)
    app = create_app(settings, pipeline)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, 'cdc-system', ['submitter'])}"
    resp = client.post("/ingest/cdc-csv", data=(CSV / "cdc-exams-utf8-bom.csv").read_bytes(), content_type="text/csv")
    assert resp.status_code == 422 and resp.mimetype == "application/fhir+json"
    texts = [i["diagnostics"] for i in resp.get_json()["issue"]]
    assert any(t.startswith("体检编号 TJ2024001: stored (Bundle/") for t in texts)
    assert "体检编号 TJ2024003: row 9 column 身份证号 身份证号 check digit is '5', expected '4'" in texts
    found = client.get("/fhir/DiagnosticReport", query_string={
        "patient.identifier": "urn:oid:2.16.156.10011.1.3|510302197904125617"}).get_json()
    assert found["total"] == 1
    report = found["entry"][0]["resource"]
    assert report["identifier"][0]["value"] == "TJ2024004" and report["conclusion"] == "职业禁忌证：中度贫血"
    pipeline.close()


@pytest.fixture
def cdc_http(tmp_path: Path, clock) -> Iterator[Any]:
    """The CDC's gateway over HTTP, its CSV system's token set (SQLite: these answer per exam, whatever stores)."""
    from gateway.api.app import create_app

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "issuer_name": "四川省疾病预防控制中心（演示）"})
    pipeline = Pipeline(settings, clock=clock)
    try:
        client = create_app(settings, pipeline).test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(client.application, 'cdc', ['submitter'])}"
        yield client
    finally:
        pipeline.close()


def test_a_browsers_form_upload_of_an_export_is_the_file_it_carries(cdc_http: Any) -> None:
    """curl -F file=@exams.csv (a form upload, as a browser sends a file): the form's bytes were read as the CSV, its
    boundary line taken for "a title above the header"; the file it carries is read, as if posted alone."""
    client = cdc_http
    data = (CSV / "cdc-exams-utf8-bom.csv").read_bytes()
    uploaded = client.post("/ingest/cdc-csv", data={"file": (io.BytesIO(data), "exams.csv")},
                           content_type="multipart/form-data")
    texts = [i["diagnostics"] for i in uploaded.get_json()["issue"]]
    assert any(t.startswith("体检编号 TJ2024001: stored (Bundle/") for t in texts), texts[:3]
    assert not any("title above the header" in t for t in texts)
    two = client.post("/ingest/cdc-csv", content_type="multipart/form-data",
                      data={"a": (io.BytesIO(data), "a.csv"), "b": (io.BytesIO(data), "b.csv")})
    assert two.status_code == 422 and "carries one file, this one carries 2" in two.get_data(as_text=True)


def test_a_file_sent_again_is_answered_with_each_exams_first_outcome_and_why(cdc_http: Any) -> None:
    """The same export posted twice: every exam a duplicate, answered 422 (one was refused) with lines like
    "B2#d577a75ebe033b12: duplicate (duplicate)" — an internal key, and nothing of why B2 was refused. Each exam is
    named as the first answer named it, said to be sent before, with its first outcome's issues."""
    client = cdc_http
    data = (CSV / "cdc-exams-utf8-bom.csv").read_bytes()
    first = client.post("/ingest/cdc-csv", data=data, content_type="text/csv")
    again = client.post("/ingest/cdc-csv", data=data, content_type="text/csv")
    assert first.status_code == again.status_code == 422
    said = [i["diagnostics"] for i in again.get_json()["issue"]]
    assert not any("#" in line.split(":")[0] for line in said), said[:4]
    refused = [line for line in said if line.startswith("体检编号 TJ2024003:")]
    assert any("sent before" in line for line in refused), refused
    assert any("check digit is '5', expected '4'" in line for line in refused), refused


def test_cli_convert_names_exam_row_and_column(runner) -> None:
    from gateway.cli import cli

    path = str(CSV / "cdc-exams-utf8-bom.csv")
    result = runner.invoke(cli, ["--issuer-uscc", CDC, "convert", "--format", "cdc-csv", path])
    assert result.exit_code == 1
    bundles = [json.loads(line) for line in result.stdout.splitlines()]
    assert [report_of(b)["identifier"][0]["value"] for b in bundles] == ["TJ2024001", "TJ2024004", "TJ2024007"]
    lines = result.stderr.splitlines()
    assert "体检编号 TJ2024003: row 9 column 身份证号: 身份证号 check digit is '5', expected '4'" in lines
    assert ("体检编号 TJ2024002: row 7 column 主检结论: 复查 is not a final conclusion (GBZ 188): send the exam "
            "when the recheck has given its final conclusion") in lines
    assert "warning: 体检编号 TJ2024001: row 3 column 单位: unit 'dB HL' is not in table units; kept as text" in lines
    assert not any("-6" in line.split(":")[1] for line in lines)  # no HL7 field numbers for a CSV


def test_bundles_are_json_round_trippable(cdc: Pipeline) -> None:
    from fhir.resources.R4B.bundle import Bundle

    [out] = outcomes(cdc, csv_bytes(row()))
    model = Bundle.model_validate(json.loads(jsonutil.dumps(out.bundle)))
    assert model.id == out.bundle["id"]


def test_a_conclusion_ended_as_a_sentence_is_the_conclusion(cdc: Pipeline) -> None:
    """主检结论 目前未见异常。 (a full stop, as a sentence ends): it was an unknown conclusion, the exam refused."""
    [out] = outcomes(cdc, csv_bytes(row(tail=TAIL.replace("目前未见异常,", "目前未见异常。,"))))
    assert out.bundle is not None, out.issues
    assert report_of(out.bundle)["conclusion"] == "目前未见异常。"


def test_a_column_named_with_a_note_in_brackets_is_the_layouts_column(cdc: Pipeline) -> None:
    """接害工龄（年）, 单位（计量）, 参考范围(正常值): the columns were left unread without a word (the results stored
    without units, ranges or years, over a copy that had them); each is the layout's column, and said to be."""
    noted = (HEADER.replace("接害工龄", "接害工龄（年）").replace(",单位,", ",单位（计量）,")
             .replace("参考范围", "参考范围(正常值)"))
    [plain] = outcomes(cdc, csv_bytes(row()))
    [out] = outcomes(cdc, csv_bytes(row().replace("TJ9,", "TJ8,"), header=noted))
    assert out.bundle is not None, out.issues

    def facts(bundle: dict) -> tuple:
        obs = entries_of(bundle, "Observation")[0]
        return obs["valueQuantity"], obs["referenceRange"], ext(report_of(bundle), "exposure-years")

    assert facts(out.bundle) == facts(plain.bundle)
    said = sorted(i.message for i in out.issues if i.location == "row 1")
    assert said == [f"column '{h}' read as '{h.split('（')[0].split('(')[0]}' of layout csv-cdc-occupational-exam"
                    for h in sorted(["接害工龄（年）", "单位（计量）", "参考范围(正常值)"])]


@pytest.mark.parametrize("word, gender", [("男性", "male"), ("女性", "female"), ("未知", "unknown"),
                                          ("未说明的性别", "unknown"), ("男", "male"), ("2", "female")])
def test_the_standards_own_words_for_sex_are_a_gender(cdc: Pipeline, word: str, gender: str) -> None:
    """GB/T 2261.1 names the sexes 男性, 女性, 未知的性别, 未说明的性别: 男性 was "not a known code; gender left out"."""
    [out] = outcomes(cdc, csv_bytes(row(EXAM.replace(",男,", f",{word},"))))
    assert out.bundle is not None, out.issues
    assert entries_of(out.bundle, "Patient")[0].get("gender") == gender
    assert not [i for i in out.issues if "not a known code" in i.message]  # (女性 disagrees with the 身份证号: said)


def test_mapping_warnings_name_row_and_column(cdc: Pipeline) -> None:
    data = csv_bytes(row(EXAM.replace(",男,", ",未知性别,"), item="XCG-WBC,白细胞计数,6.8,10^9/L,3.5-9.5,?"))
    [out] = outcomes(cdc, data)
    assert out.status is Status.CONVERTED
    located = {i.location: i.message for i in out.issues if i.location.startswith("row")}
    assert located == {"row 2 column 性别": "sex '未知性别' is not a known code; gender left out",
                       "row 2 column 异常标志": "abnormal flag '?' is not in table interpretation; kept as text"}


# -- problems the profile check finds, answered as row and column ---------------------------------

FHIR_WORDS = ("Bundle.", "entry[", "resource", "[x]")


def no_fhir_path(text: str) -> bool:
    return not any(w in text for w in FHIR_WORDS)


def test_a_sex_disagreeing_with_the_id_card_is_answered_as_row_and_column(cdc: Pipeline) -> None:
    data = csv_bytes(row(), row(EXAM.replace("TJ9", "TJ8").replace(",男,", ",女,")))
    first, second = outcomes(cdc, data)
    assert first.status is Status.CONVERTED and not [i for i in first.issues if i.location == "row 2 column 性别"]
    assert second.status is Status.CONVERTED
    [warning] = [i for i in second.issues if "cyhr-pat-4" in i.message]
    assert warning.severity == "warning" and warning.location == "row 3 column 性别"
    assert warning.message.startswith("does not give a sex agreeing with digit 17 of the 身份证号 (see also column "
                                      "身份证号): fails cyhr-pat-4: ")
    assert warning.extra["fhir_path"] == "Bundle.entry[1].resource"  # kept for the log, never answered
    answer = json.loads(second.answer)
    assert all(no_fhir_path(json.dumps(i, ensure_ascii=False)) for i in answer["issue"])
    assert {"row 3 column 性别"} <= {e for i in answer["issue"] for e in i.get("expression", [])}


def _res(bundle: dict, kind: str, n: int = 0) -> dict:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind][n]


def _ext(bundle: dict, name: str) -> dict:
    return ext(_res(bundle, "DiagnosticReport"), name)[0]


# (change to the converted Bundle, where the answer must say the problem is, and words it must hold)
BROKEN = [
    (lambda b: _res(b, "Patient").__setitem__("gender", "female"), "row 2 column 性别", "cyhr-pat-4"),
    (lambda b: _res(b, "Patient").__setitem__("birthDate", "1981-01-01"), "row 2 column 出生日期", "cyhr-pat-3"),
    (lambda b: _res(b, "Patient").pop("name"), "row 2 column 姓名", "is empty: the worker's name is required"),
    (lambda b: _res(b, "Patient")["identifier"][0].__setitem__("value", "51132219800707331Y"),
     "row 2 column 身份证号", "cyhr-pat-1"),
    (lambda b: _res(b, "Observation", 1).__setitem__("valueString", "x"), "row 3 column 结果",
     "only one of valueQuantity, valueString may be present"),
    (lambda b: _res(b, "Observation", 1)["valueQuantity"].__setitem__("unit", ""), "row 3 column 单位",
     "must not be empty"),
    (lambda b: _res(b, "Observation", 1).pop("code"), "row 3 column 项目代码", "the exam item code"),
    (lambda b: _res(b, "Observation", 1)["referenceRange"][0].__setitem__("low", "x"), "row 3 column 参考范围",
     "must be a JSON object"),
    (lambda b: _res(b, "Observation", 1).pop("status"), "row 3 column 结果", "the result status is required"),
    (lambda b: _res(b, "DiagnosticReport").__setitem__("issued", "2024-03-22"), "row 2 column 报告日期",
     "not a valid instant"),
    (lambda b: _res(b, "DiagnosticReport").__setitem__("effectiveDateTime", "2024-13-01"), "row 2 column 体检日期",
     "not a valid dateTime"),
    (lambda b: _res(b, "DiagnosticReport").pop("identifier"), "row 2 column 体检编号", "the exam number is required"),
    (lambda b: _res(b, "DiagnosticReport").__setitem__("conclusion", " "), "row 2 column 主检结论", "blank"),
    (lambda b: _ext(b, "hazard-factor").__setitem__("extension", _ext(b, "hazard-factor")["extension"][::2]),
     "row 2 column 接害因素代码", "cyhr-haz-1"),
    (lambda b: _ext(b, "exposure-years").__setitem__("valueDecimal", -1), "row 2 column 接害工龄", "cyhr-expo-1"),
    (lambda b: _ext(b, "exam-type")["valueCoding"].__setitem__("code", ""), "row 2 column 体检类型", "empty"),
    (lambda b: _ext(b, "occupation").__setitem__("valueString", " "), "row 2 column 工种", "blank"),
    (lambda b: _res(b, "Organization", 1).__setitem__("name", " "), "row 2 column 用人单位名称", "blank"),
    (lambda b: _res(b, "Organization", 1)["identifier"][0].__setitem__("value", " "),
     "row 2 column 用人单位统一社会信用代码", "blank"),
    (lambda b: b.__setitem__("timestamp", "bad"), "row 2 column 报告日期", "not a valid instant"),
    (lambda b: _res(b, "Organization", 0).__setitem__("name", " "), "row 2", "no column is mapped to"),
]


@pytest.mark.parametrize("change, location, words", BROKEN)
def test_every_profile_problem_is_traced_to_a_row_and_column(cdc: Pipeline, change, location: str,
                                                             words: str) -> None:
    import copy

    [out] = outcomes(cdc, csv_bytes(row(), row(item="XY-SBP,收缩压,128,mmHg,90-139,")))
    bundle = copy.deepcopy(out.bundle)
    change(bundle)
    found = profiles.validate(bundle)
    assert found, "the change must break a profile rule"
    explained = cdc.channels["cdc-csv"].explain(out.message, bundle, found)
    assert len(explained) == len(found)
    for issue in explained:
        assert no_fhir_path(issue.location) and no_fhir_path(issue.message), issue
        assert issue.location.startswith("row "), issue
    assert any(i.location == location and words in i.message for i in explained), [str(i) for i in explained]


def test_profile_problems_at_any_element_never_reach_the_sender_as_fhir_paths(tmp_path: Path, clock,
                                                                              database: str) -> None:
    """Whatever the profile check says, and wherever: the OperationOutcome and the CLI lines name rows and columns."""
    from gateway.errors import Issue

    def checker(bundle: dict) -> list:
        out = []
        for n, entry in enumerate(bundle["entry"]):
            kind = entry["resource"]["resourceType"]
            for path in ("", ".value[x]", ".extension[0].extension[1].valueCoding", ".identifier[0].value",
                         ".code.coding[0]", ".meta.profile[0]"):
                out.append(Issue("warning", "structure", f"Bundle.entry[{n}].resource{path}",
                                 f"allows at most 1 ({kind}{path.replace('[0]', '')}), found 2; see "
                                 f"Bundle.entry[{n}].resource and {kind}.value[x]"))
        return out + [Issue("warning", "value", "Bundle", "is not a resource of this guide (Bundle.type)")]

    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "issuer_name": "四川省疾病预防控制中心（演示）", "database": database})
    p = Pipeline(settings, clock=clock, checker=checker)
    try:
        [out] = list(p.convert(csv_bytes(row(), row(item="XY-SBP,收缩压,128,mmHg,90-139,")), "cdc-csv", "t.csv"))
        assert out.status is Status.CONVERTED and len(out.issues) > 30
        for issue in out.issues:
            assert issue.location.startswith("row ") and no_fhir_path(issue.line()), issue.line()
        for entry in json.loads(out.answer)["issue"]:
            assert no_fhir_path(json.dumps(entry, ensure_ascii=False)), entry
    finally:
        p.close()


def test_cli_convert_answers_profile_problems_by_row_and_column(runner, tmp_path: Path) -> None:
    from gateway.cli import cli

    path = tmp_path / "sex.csv"
    path.write_bytes(csv_bytes(row(EXAM.replace(",男,", ",女,"))))
    result = runner.invoke(cli, ["--issuer-uscc", CDC, "convert", "--format", "cdc-csv", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(line.startswith("warning: 体检编号 TJ9: row 2 column 性别: does not give a sex agreeing") for line in lines)
    assert all(no_fhir_path(line) for line in lines), lines


def test_a_quoted_cell_longer_than_the_csv_module_takes_refuses_its_row_only(
        tmp_path: Path, clock, database: str) -> None:
    """A quoted cell of 140,000 characters (over the csv module's field limit, well under the request limit) is
    its row's problem: the exams before it are converted and stored, the raw input kept (it answered 500 and lost
    the whole file)."""
    from gateway.api.app import create_app

    cell = '"' + "x" * 140_000 + '"'
    data = csv_bytes(row(), row(EXAM.replace("TJ9", "TJ10"), item=f"XP,胸部X射线摄片,{cell},,,"))
    outs = outcomes(Pipeline(load_settings(environ={}, overrides={
        "data_dir": str(tmp_path / "c"), "issuer_uscc": CDC, "issuer_name": "四川省疾病预防控制中心（演示）"})), data)
    assert [o.status for o in outs] == [Status.CONVERTED, Status.REFUSED]
    assert [(i.location, i.message.split(" (")[0]) for i in outs[1].errors] == [
        ("row 3", "cannot be read as CSV")]
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "issuer_name": "四川省疾病预防控制中心（演示）", "database": database})
    pipeline = Pipeline(settings, clock=clock)
    client = create_app(settings, pipeline).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(client.application, 'cdc', ['submitter'])}"
    resp = client.post("/ingest/cdc-csv", data=data, content_type="text/csv")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert "row 3 cannot be read as CSV" in resp.get_data(as_text=True)
    assert [r.status for r in pipeline.store.list_messages(None, 10)] == ["refused", "stored"]
    assert sum(len(pipeline.store.raw_of(r.id)) for r in pipeline.store.list_messages(None, 10)) > 140_000
    pipeline.close()


def test_blank_rows_inside_an_exam_are_skipped_and_rows_are_numbered_as_a_spreadsheet_shows_them(
        cdc: Pipeline) -> None:
    """A formatted blank row Excel saves as ",,,,", a blank line, a row of spaces: no record, and the exam around
    them stays whole (it was cut in two, the second part refused as a reappearing exam and the first stored as
    final without it); errors name the row a spreadsheet shows (blank rows were not counted)."""
    blank_cells = "," * (HEADER.count(","))
    last = row(item="XCG-HGB,血红蛋白,140,g/L,130-175,")
    lines = [HEADER, row(), blank_cells, "", "   ", row(item="XY-SBP,收缩压,128,mmHg,90-139,"),
             '"","",' + blank_cells[2:], last]
    [whole] = outcomes(cdc, ("\n".join(lines) + "\n").encode("utf-8"))
    assert whole.status is Status.CONVERTED, [i.line() for i in whole.issues]
    assert len(entries_of(whole.bundle, "Observation")) == 3
    lines[-1] = last.rsplit(",", 1)[0]  # the 8th row of the sheet one column short
    [out] = outcomes(cdc, ("\r\n".join(lines) + "\r\n").encode("utf-8"))
    assert [(i.location, i.message) for i in out.errors] == [("row 8", "row has 21 columns, the header has 22")]


def test_an_upside_down_reference_range_is_kept_as_text_and_warned_of(cdc: Pipeline) -> None:
    [out] = outcomes(cdc, csv_bytes(row(item="XCG-WBC,白细胞计数,6.8,10^9/L,9.5-3.5,")))
    [obs] = entries_of(out.bundle, "Observation")
    assert obs["referenceRange"] == [{"text": "9.5-3.5"}]  # no Range with low above high (FHIR rng-2)
    assert [(i.location, i.message) for i in out.issues if "low above" in i.message] == [
        ("row 2 column 参考范围", "reference range '9.5-3.5' names its low above its high: kept as text only")]
    [wide] = outcomes(cdc, csv_bytes(row(item="XCG-WBC,白细胞计数,6.8,10^9/L,3.5－9.5,")))  # a full-width hyphen
    assert entries_of(wide.bundle, "Observation")[0]["referenceRange"][0]["low"]["value"] == Decimal("3.5")


def test_an_item_reported_twice_in_one_exam_is_kept_twice_and_said(cdc: Pipeline) -> None:
    wbc = "XCG-WBC,白细胞计数,{},10^9/L,3.5-9.5,"
    [out] = outcomes(cdc, csv_bytes(row(item=wbc.format("6.8")), row(item=wbc.format("9.9")),
                                    row(item=wbc.format("6.8"))))
    assert len(entries_of(out.bundle, "Observation")) == 3
    again = "item 'XCG-WBC' is reported again in this report with "
    assert [(i.location, i.message) for i in out.issues if "reported again" in i.message] == [
        ("row 3 column 结果", again + "another result ('9.9 10^9/L' here, '6.8 10^9/L' at row 2 column 结果): both "
         "are kept"),
        ("row 4 column 结果", again + "the same result as at row 2 column 结果: both are kept")]


def test_a_hazard_factor_code_and_a_name_naming_another_factor_are_said(cdc: Pipeline) -> None:
    """接害因素代码 1001 (矽尘) sent with the name 噪声, another factor of the catalogue: one of the two is mistyped.
    The code is taken, and the exam says so where the code was read."""
    [out] = outcomes(cdc, csv_bytes(row(EXAM.replace(",1001,矽尘,", ",1001,噪声,"))))
    assert out.bundle is not None
    assert [(i.location, i.message) for i in out.issues if "hazard factor code" in i.message] == [
        ("row 2 column 接害因素代码", "hazard factor code '1001' is '矽尘（游离SiO2含量≥10%）', but the name sent with "
         "it, '噪声', is '噪声': the code is taken; check which one is meant")]
    [same] = outcomes(cdc, csv_bytes(row()))  # 1001 with 矽尘: nothing to say
    assert not [i for i in same.issues if "hazard factor code" in i.message]


def _exams(p: Pipeline, data: bytes) -> list[tuple[str, list, list]]:
    """(status, the Patient's identifiers, the results' codes and values) of each exam of an export."""
    found = []
    for o in outcomes(p, data):
        if o.bundle is None:
            found.append((o.status.value, [i.line() for i in o.errors], []))
            continue
        patient = entries_of(o.bundle, "Patient")[0]
        results = [(r["code"]["coding"][0]["code"], r.get("valueQuantity", {}).get("value", r.get("valueString")))
                   for r in entries_of(o.bundle, "Observation")]
        found.append((o.status.value, patient["identifier"], results))
    return found


def test_ids_kept_as_text_the_spreadsheet_way_and_trailing_empty_cells_read_as_the_plain_export(
        cdc: Pipeline) -> None:
    """Staff keep an 18-digit 身份证号 and an exam number as text in Excel by writing ="..." or a leading
    apostrophe, and a sheet saved with formatted empty columns ends every data row (not the header) in ",,,":
    read as the plain export, exam for exam (the real-shaped export of tests/data/csv)."""
    import re

    plain = (CSV / "cdc-exams-utf8-bom.csv").read_bytes()
    expected = _exams(cdc, plain)
    assert [s for s, _, _ in expected].count("converted") >= 3  # (and the export's refused exams, refused alike)
    head, _, body = plain.partition(b"\n")
    formula = re.sub(rb"^(TJ\d+),([^,]*),(\d{17}[\dX])", rb'="\1",\2,="\3"', body, flags=re.M)
    apostrophe = re.sub(rb"^(TJ\d+),([^,]*),(\d{17}[\dX])", rb"'\1,\2,'\3", body, flags=re.M)  # (the exam number too)
    trailing = re.sub(rb"\r?\n", b",,,\n", body)
    assert formula != body and apostrophe != body and trailing.count(b",,,\n") == body.count(b"\n")
    for variant in (formula, apostrophe, trailing):
        assert _exams(cdc, head + b"\n" + variant) == expected, variant[:200]
    # a row longer than the header by a value is refused as before, naming it
    refused = _exams(cdc, head + b"\n" + re.sub(rb"\r?\n", b",,x\n", body, count=1))
    assert refused[0][0] == "refused" and "row 2 row has 24 columns, the header has 22" in refused[0][1][0]


def test_a_result_with_a_unit_that_is_not_a_number_says_its_unit_is_left_out(cdc: Pipeline) -> None:
    """1,230 or 6,8 with a unit was kept as text and the unit dropped without a word; ６．８ is the number 6.8."""
    data = csv_bytes(row(item="XCG-WBC,白细胞计数,６．８,10^9/L,3.5-9.5,"),
                     row(item="XCG-RBC,红细胞计数,\"4,52\",10^12/L,4.3-5.8,"),
                     row(item="NJ-RBC,尿沉渣红细胞,0-3,/HP,0-3,"),  # semi-quantitative: text, as meant
                     row(item="MY-ANA,抗核抗体滴度,1:320,titre,,"),
                     row(item="XCG-PLT,血小板计数,１，２３０,10^9/L,125-350,"),  # (full-width: as typed)
                     row(item="XCG-HGB,血红蛋白,１３８．５．１,g/L,130-175,"),  # a point too many
                     row(item="XCG-MCV,平均红细胞体积,88..2,fL,82-100,"))
    (out,) = outcomes(cdc, data)
    assert out.bundle is not None, [i.line() for i in out.issues]
    values = {o["code"]["coding"][0]["code"]: o.get("valueQuantity", o.get("valueString"))
              for o in entries_of(out.bundle, "Observation")}
    assert values["XCG-WBC"]["value"] == Decimal("6.8") or values["XCG-WBC"]["value"] == 6.8
    assert values["XCG-RBC"] == "4,52"
    warned = [i for i in out.issues if "is not a number" in i.message]
    assert [(i.severity, i.location) for i in warned] == [("warning", "row 3 column 结果"),
                                                          ("warning", "row 6 column 结果"),
                                                          ("warning", "row 7 column 结果"),
                                                          ("warning", "row 8 column 结果")]
    assert values["XCG-HGB"] == "１３８．５．１" and "without its unit 'g/L'" in warned[2].message
    assert "10^12/L" in warned[0].message


def _variants() -> dict[str, bytes]:
    import gzip
    import zipfile
    from io import BytesIO

    plain = (CSV / "cdc-exams-utf8-bom.csv").read_bytes()
    text = plain.decode("utf-8-sig")
    sheet = BytesIO()
    with zipfile.ZipFile(sheet, "w") as z:  # what an .xlsx is
        z.writestr("[Content_Types].xml", "<Types/>" * 50)
        z.writestr("xl/worksheets/sheet1.xml", text)
    return {
        "UTF-16": text.encode("utf-16"),
        "tabs": text.replace(",", "\t").encode("utf-8"),
        "semicolons": text.replace(",", ";").encode("utf-8"),
        "UTF-16 ": text.encode("utf-16-le"),  # (without a byte order mark: Chinese text has no NUL byte)
        "a single cell": ("职业健康检查结果导出（2024年3月）\n" + text).encode("utf-8"),
        "two cells": ("职业健康检查结果,导出时间:2026-11-20\n" + text).encode("gbk"),
        "gzip": gzip.compress(plain),
        "spreadsheet": sheet.getvalue(),
        "spreadsheet ": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 4,  # an .xls (OLE) file
        "not text": b"\x00\x01\x02\x03\x04\x05\x06\x07" * 64,
    }


@pytest.mark.parametrize("what", ["UTF-16", "UTF-16 ", "tabs", "semicolons", "a single cell", "two cells", "gzip",
                                  "spreadsheet", "spreadsheet ", "not text"])
def test_a_first_row_that_is_not_a_header_says_what_it_is(cdc: Pipeline, what: str) -> None:
    """A UTF-16 file, a tab- or semicolon-separated one, a title row above the header, a gzip body, a spreadsheet
    saved as .xlsx: each was 'the header matches no CSV layout … needs the columns 体检编号, …' (columns a user can
    see are there); each is said for what it is, in one line naming row 1."""
    (out,) = outcomes(cdc, _variants()[what])
    assert out.bundle is None and len(out.errors) == 1
    error = out.errors[0]
    said = what.strip()
    assert error.location == "row 1" and said in error.message and "matches no CSV layout" not in error.message


def test_invisible_characters_in_the_header_are_left_out(cdc: Pipeline) -> None:
    plain = (CSV / "cdc-exams-utf8-bom.csv").read_bytes()
    expected = _exams(cdc, plain)
    hidden = plain.replace("体检编号".encode(), "\u200b体检编号".encode(), 1).replace("姓名".encode(), "姓\u200d名".encode(), 1)
    assert hidden != plain and _exams(cdc, hidden) == expected


def test_convert_prints_a_warning_said_the_same_way_a_few_times_then_counts_it(tmp_path: Path) -> None:
    """A 50,000-row export whose every exam has the same unmapped local codes wrote 60,000 warning lines, the
    errors lost among them: a warning said the same way is printed three times, then counted once at the end;
    errors are always printed; --every-warning prints each."""
    from click.testing import CliRunner

    from gateway.cli import cli

    exams = [row(exam=EXAM.replace("TJ9", f"TJ9{n}"), item="ZZ-LOCAL,本院项目,6.8,10^9/L,3.5-9.5,")
             for n in range(7)]
    bad = row(exam=EXAM.replace("TJ9", "TJ99").replace("51132219800707331X", "51132219800707331Y"))
    path = tmp_path / "export.csv"
    path.write_bytes(csv_bytes(*exams, bad))
    base = ["--issuer-uscc", CDC, "--data-dir", str(tmp_path / "gw"), "convert", "--format", "cdc-csv"]
    result = CliRunner().invoke(cli, [*base, str(path)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    unmapped = [line for line in lines if "'ZZ-LOCAL'" in line]
    assert len(unmapped) == 4 and unmapped[-1].startswith("warning: 4 more of: local item code 'ZZ-LOCAL'")
    assert any("TJ99" in line and "身份证号" in line and not line.startswith("warning") for line in lines)
    every = CliRunner().invoke(cli, [*base, "--every-warning", str(path)])
    assert len([line for line in every.stderr.splitlines() if "'ZZ-LOCAL'" in line]) == 7


PINYIN = {"体检编号": "TJBH", "姓名": "XM", "身份证号": "SFZH", "性别": "XB", "出生日期": "CSRQ", "用人单位名称": "DWMC",
          "用人单位统一社会信用代码": "DWXYDM", "工种": "GZ", "接害因素代码": "JHYSDM", "接害因素名称": "JHYSMC",
          "接害工龄": "JHGL", "体检类型": "TJLX", "体检日期": "TJRQ", "项目代码": "XMDM", "项目名称": "XMMC", "结果": "JG",
          "单位": "DW", "参考范围": "CKFW", "异常标志": "YCBZ", "主检结论": "ZJJL", "主检医师": "ZJYS", "报告日期": "BGRQ"}


def test_a_gbk_export_whose_header_is_plain_ascii_is_read_by_its_rows(tmp_path: Path, clock) -> None:
    """A layout with pinyin headers (TJBH, XM, SFZH: as "How to add a CSV layout" invites) and a GBK export: the
    header said nothing of the character set, UTF-8 was taken, and every row was refused as "not valid utf-8"."""
    from gateway.config import REPO_ROOT

    mappings = tmp_path / "mappings"
    shutil.copytree(REPO_ROOT / "mappings", mappings)
    layout = (mappings / "csv" / "cdc-occupational-exam.yaml").read_text(encoding="utf-8")
    layout = layout.replace("id: csv-cdc-occupational-exam", "id: csv-pinyin-exam")
    for chinese, pinyin in PINYIN.items():
        layout = re.sub(rf"^(  \w+): {chinese}$", rf"\1: {pinyin}", layout, flags=re.M)
    (mappings / "csv" / "pinyin.yaml").write_text(layout, encoding="utf-8")
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "gw"), "issuer_uscc": CDC,
                                                    "mappings_dir": str(mappings)})
    header = ",".join(PINYIN[h] for h in HEADER.split(","))
    ascii_first = row().replace("TJ9,王演示", "TJ7,Wang Yanshi")  # (an exam of plain ASCII rows first)
    data = ("\n".join([header, *[ascii_first.replace(",目前未见异常,吴主检", ",目前未见异常,Wu")]]) + "\n").encode("gbk")
    data += (row() + "\n").encode("gbk")
    outs = list(Pipeline(settings, clock=clock).convert(data, "cdc-csv"))
    assert [o.status is Status.CONVERTED for o in outs] == [True, True], [o.issues[:2] for o in outs]
    assert entries_of(outs[1].bundle, "Patient")[0]["name"][0]["text"] == "王演示"


def test_an_exam_number_reused_for_another_person_is_refused_and_the_first_exam_kept(stored_pipeline) -> None:
    """体检编号 restarted (a new year, another branch) and reused for another worker: the exam's resource ids derive
    from the number, so the second export moved the stored exam, results and all, to the other person (both
    answered stored). It is refused naming the number; the first person's exam stays theirs."""
    from gateway.pipeline import Status

    header = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,"
              "接害工龄,体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标志,主检结论,主检医师,报告日期")
    row = ("TJ2025-0001,{name},{card},男,1985-06-12,通江演示建材有限公司,91511921MA62Q0A1XC,破碎工,3001,噪声,6.5,在岗期间,"
           "2025-03-15,TL,纯音听阈测试,{value},dB HL,≤25,,目前未见异常,吴主检,2025-03-22 16:30:00")
    first = f"{header}\n{row.format(name='张甲', card='51040219850612001X', value='22')}\n".encode("utf-8")
    second = f"{header}\n{row.format(name='李乙', card='510402198506120036', value='24')}\n".encode("utf-8")
    [stored] = stored_pipeline.ingest(first, "cdc-csv", channel="test")
    assert stored.status is Status.STORED, stored.issues
    [refused] = stored_pipeline.ingest(second, "cdc-csv", channel="test")
    assert refused.status is Status.REFUSED, refused.issues
    assert refused.issues[0].location == "row 2" and refused.issues[0].code == "conflict"
    assert "体检编号 TJ2025-0001 was stored for another person" in refused.issues[0].message
    store = stored_pipeline.store
    assert store.search("DiagnosticReport", [("patient.identifier", "51040219850612001X")]).total == 1
    assert store.search("DiagnosticReport", [("patient.identifier", "510402198506120036")]).total == 0
    again = stored_pipeline.ingest(first.replace(b",22,", b",23,"), "cdc-csv", channel="test")[0]
    assert again.status is Status.STORED, again.issues  # the same person's exam sent again, changed: taken


def test_a_flag_typed_after_the_number_is_its_flag_and_text_with_a_unit_is_said(cdc: Pipeline) -> None:
    """5.1↑ (the flag typed into the result cell, as result tables print it) is the number 5.1 flagged H; abc with a
    unit is kept as text with a warning that its unit is left out (it was left out without a word)."""
    [out] = outcomes(cdc, csv_bytes(row(item="XCG-WBC,白细胞计数,10.1↑,10^9/L,3.5-9.5,"),
                                    row(item="XCG-PLT,血小板计数,abc,10^9/L,125-350,")))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    wbc, plt = entries_of(out.bundle, "Observation")
    assert str(wbc["valueQuantity"]["value"]) == "10.1" and wbc["valueQuantity"]["unit"] == "10^9/L"
    assert wbc["interpretation"][0]["coding"][0]["code"] == "H"
    assert plt["valueString"] == "abc"
    said = [i for i in out.issues if i.severity == "warning" and "abc" in i.message]
    assert said and "without its unit '10^9/L'" in said[0].message and said[0].location == "row 3 column 结果"


def test_factors_separated_by_a_full_width_comma_are_two(cdc: Pipeline) -> None:
    """1001，3001 / 矽尘，噪声 (the most common Chinese list separator): two factors, each with its class (it was one
    unknown factor, and the exam needed review)."""
    exam = EXAM.replace(",1001,矽尘,", ",1001，3001,矽尘，噪声,")
    [out] = outcomes(cdc, csv_bytes(row(exam)))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    factors = [e for e in report_of(out.bundle)["extension"] if e["url"].endswith("/hazard-factor")]
    names = [p["valueCoding"]["display"] for f in factors for p in f["extension"] if p["url"] == "factor"]
    assert len(names) == 2 and names[0].startswith("矽尘") and names[1] == "噪声", names
    assert not [i for i in out.issues if "not in" in i.message and "目录" in i.message]


@pytest.mark.parametrize("written,code", [("目前未见明显异常", "no-abnormality"), ("其它疾病或异常", "other-abnormality"),
                                          ("其它疾病或异常：高血压", "other-abnormality")])
def test_conclusions_as_clerks_write_them(cdc: Pipeline, written: str, code: str) -> None:
    """目前未见明显异常 and 其它 (它) were refused as unknown conclusions."""
    [out] = outcomes(cdc, csv_bytes(row(tail=TAIL.replace("目前未见异常", written))))
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    assert report_of(out.bundle)["conclusionCode"][0]["coding"][0]["code"] == code
    assert report_of(out.bundle)["conclusion"] == written


def test_an_id_card_number_typed_in_groups_is_the_number_and_excels_float_is_said(cdc: Pipeline) -> None:
    """5113 2219 8007 0733 1X (as a card prints it) is the number (it was refused, "has 22 characters"); 5.11322E+17
    (Excel's float of an 18-digit number: its last digits lost) says so (it said "has 11 characters")."""
    [grouped] = outcomes(cdc, csv_bytes(row(EXAM.replace("51132219800707331X", "5113 2219 8007 0733 1X"))))
    assert grouped.status is Status.CONVERTED, [i.line() for i in grouped.issues]
    [excel] = outcomes(cdc, csv_bytes(row(EXAM.replace("51132219800707331X", "5.11322E+17"))))
    assert excel.status is Status.REFUSED
    assert any("a number the spreadsheet shortened" in i.message and i.location == "row 2 column 身份证号"
               for i in excel.issues), [i.line() for i in excel.issues]


def test_rows_under_merged_cells_are_the_exams_own(cdc: Pipeline) -> None:
    """A spreadsheet with the exam's columns merged: its rows after the first carry no 体检编号, name or 身份证号.
    They are the exam's, and said so (the first row was stored as the whole exam, the others refused as an exam
    with no number). A row with no number but a name of its own is still refused as before."""
    blank_exam = ",".join([""] * 3 + EXAM.split(",")[3:])
    data = csv_bytes(row(), row(blank_exam, item="XY-SBP,收缩压,128,mmHg,90-139,"),
                     row(blank_exam, item="XP,胸部X射线摄片,未见异常,,,"))
    [out] = outcomes(cdc, data)
    assert out.status is Status.CONVERTED, [i.line() for i in out.issues]
    assert len(entries_of(out.bundle, "Observation")) == 3
    said = [i for i in out.issues if "merged" in i.message]
    assert said and said[0].location == "row 3" and "rows 3, 4 carry no 体检编号" in said[0].message
    stranger = ",".join(["", "李乙", "510402198506120036"] + EXAM.split(",")[3:])
    first, second = outcomes(cdc, csv_bytes(row(), row(stranger, item="XY-SBP,收缩压,128,mmHg,90-139,")))
    assert first.status is Status.CONVERTED and second.status is Status.REFUSED
