"""《职业病危害因素分类目录》 (2015) as a table: counts, aliases, conversion of every name, unknown factors, GBZ 98."""
from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from gateway.config import load_settings
from gateway.fhir import profiles
from gateway.fhir.bundle import entries_of
from gateway.fhir.occupational import sender_hazard_system
from gateway.mapping.hazards import hazard_concepts
from gateway.mapping.tables import load_mappings
from gateway.pipeline import Pipeline, Status
from gateway.recognition.engine import decide
from gateway.recognition.facts import facts_from_bundle
from test_recognition_rules import BASE, CDC, CST, FULING

EXAM_WEEK = dt.datetime(2024, 3, 25, 10, 0, tzinfo=CST)

MAPPINGS = load_mappings(ROOT / "mappings")
CATALOGUE = MAPPINGS.catalogues["hazard-catalogue"]
HAZARDS = MAPPINGS.concept("hazard-factors")
HAZARD_CS = "https://fhir.cyhr.org.cn/CodeSystem/hazard-factor"
HEADER = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,接害工龄,"
          "体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标志,主检结论,主检医师,报告日期")
PERSON = "TJ9,王演示,51132219800707331X,男,1980-07-07,通江演示建材有限公司,91511921MA62Q0A1XC,破碎工"


def exam_csv(codes: str, names: str, conclusion: str = "目前未见异常", exam_type: str = "在岗期间",
             number: str = "TJ9") -> bytes:
    person = PERSON.replace("TJ9", number, 1)
    names = f'"{names}"' if "," in names else names  # as exports quote a cell holding a comma
    row = (f"{person},{codes},{names},6.5,{exam_type},2024-03-15,XCG-WBC,白细胞计数,6.8,10^9/L,3.5-9.5,,"
           f"{conclusion},吴主检,2024-03-22 16:30:00")
    return (HEADER + "\n" + row + "\n").encode("utf-8")


@pytest.fixture(scope="module")
def cdc(tmp_path_factory: pytest.TempPathFactory):
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path_factory.mktemp("gw")),
                                                    "issuer_uscc": CDC, "issuer_name": "四川省疾病预防控制中心（演示）"})
    p = Pipeline(settings)
    yield p
    p.close()


def report_of(bundle: dict) -> dict:
    return entries_of(bundle, "DiagnosticReport")[0]


def factors_of(bundle: dict) -> list[dict[str, dict]]:
    url = "https://fhir.cyhr.org.cn/StructureDefinition/hazard-factor"
    return [{p["url"]: p["valueCoding"] for p in e["extension"]} for e in report_of(bundle)["extension"]
            if e["url"] == url]


# -- the table ------------------------------------------------------------------------------------


def test_the_catalogue_has_the_six_classes_of_the_2015_list() -> None:
    assert CATALOGUE.counts() == {"dust": 52, "chemical": 375, "physical": 15, "radiation": 8, "biological": 6,
                                  "other": 3}
    for category in CATALOGUE.counts():
        numbers = [e.seq for e in CATALOGUE.entries if e.category == category]
        assert numbers == list(range(1, len(numbers) + 1)), category
        last = [e.name for e in CATALOGUE.entries if e.category == category][-1]
        assert category == "other" or last.startswith("以上未提及的可导致职业病的其他"), last


def test_codes_are_unique_and_the_guides_earlier_codes_stay() -> None:
    codes = [e.code for e in CATALOGUE.entries]
    assert len(codes) == len(set(codes)) == 459
    by_name = {e.name: e.code for e in CATALOGUE.entries}
    assert by_name["苯"] == "benzene" and by_name["噪声"] == "noise" and by_name["煤尘"] == "coal-dust"
    assert by_name["X射线装置（含CT机）产生的电离辐射"] == "x-ray-device"
    assert by_name["密封放射源产生的电离辐射"] == "radiation-001"


@pytest.mark.parametrize("alias, code, category", [
    ("矽尘", "silica-dust", "dust"), ("游离二氧化硅粉尘", "silica-dust", "dust"),
    ("纯苯", "benzene", "chemical"), ("苯", "benzene", "chemical"),
    ("电离辐射", "x-ray-device", "radiation"), ("X射线", "x-ray-device", "radiation"),
    ("噪声", "noise", "physical"), ("生产性噪声", "noise", "physical"),
    ("高温", "high-temperature", "physical"), ("高温作业", "high-temperature", "physical"),
    ("紫外辐射", "physical-010", "physical"), ("铀及其化合物", "radiation-007", "radiation"),
    ("手传振动", "hand-arm-vibration", "physical"), ("高处作业", "work-at-height", "other"),
])
def test_aliases_find_their_factor_and_category(alias: str, code: str, category: str) -> None:
    factor, cat = HAZARDS.lookup("*", alias)
    assert (factor.system, factor.code, cat.code) == (HAZARD_CS, code, category)


def test_the_published_code_system_is_generated_from_the_tables() -> None:
    cs = json.loads((ROOT / "profiles" / "CodeSystem-hazard-factor.json").read_text(encoding="utf-8"))
    assert cs["content"] == "complete" and cs["concept"] == hazard_concepts(MAPPINGS)
    assert cs["count"] == len(cs["concept"]) == 459 + 3  # and the three GBZ 188 factors outside the 目录
    assert {c["code"] for c in cs["concept"]} >= {e.code for e in CATALOGUE.entries}


def test_a_name_the_catalogue_gives_two_codes_is_refused(tmp_path: Path) -> None:
    import shutil

    from gateway.errors import ConfigError

    shutil.copytree(ROOT / "mappings", tmp_path / "m")
    table = tmp_path / "m" / "concepts" / "hazard-factors.csv"
    table.write_text(table.read_text(encoding="utf-8") + "*,苯,https://fhir.cyhr.org.cn/CodeSystem/hazard-factor,"
                     "toluene,甲苯\n*,苯,https://fhir.cyhr.org.cn/CodeSystem/exposure-category,chemical,化学因素\n",
                     encoding="utf-8")
    with pytest.raises(ConfigError, match="'苯' maps to toluene"):
        load_mappings(tmp_path / "m")


def _variants(name: str) -> list[str]:
    """A 目录 name as senders write it: whole, without each trailing remark, and each with half-width brackets."""
    shorter = [name]
    while (m := re.search(r"（[^（）]*）$", shorter[-1])) is not None and m.start() > 0:
        shorter.append(shorter[-1][:m.start()])
    return list(dict.fromkeys(v for s in shorter for v in (s, s.replace("（", "(").replace("）", ")"))))


def test_every_catalogue_name_is_found_without_its_remarks_and_with_half_width_brackets() -> None:
    assert CATALOGUE.ambiguous == {}  # no two rows share a name without its remarks (today)
    checked = 0
    for entry in CATALOGUE.entries:
        for variant in _variants(entry.name):
            hits = HAZARDS.lookup("*", variant)
            # 铀及其化合物 is the name of two rows: it goes to the one listing it among its aliases
            want = ("radiation-007", "radiation") if entry.code == "chemical-011" else (entry.code, entry.category)
            assert [(t.code) for t in hits] == list(want), (entry.name, variant)
            checked += 1
    assert checked > 459 + 80  # names with remarks give more than one variant
    for short, code in (("麻尘（亚麻、黄麻和苎麻）", "dust-030"), ("麻尘(亚麻、黄麻和苎麻)", "dust-030"),
                        ("麻尘（亚麻、黄麻和苎麻)", "dust-030"), ("铅及其化合物", "lead"), ("磷及其化合物", "chemical-009"),
                        ("镍及其化合物", "chemical-153"), ("艾滋病病毒", "biological-001")):
        assert HAZARDS.lookup("*", short)[0].code == code, short


def test_a_short_name_two_rows_would_share_is_not_looked_up(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ROOT / "mappings", tmp_path / "m")
    table = tmp_path / "m" / "concepts" / "hazard-catalogue.csv"
    table.write_text(table.read_text(encoding="utf-8")
                     + "chemical,376,演示尘（甲型）,,,chemical-376,,unknown,recollection\n"
                     + "chemical,377,演示尘（乙型）,,,chemical-377,,unknown,recollection\n"
                     + "chemical,378,示例粉（注）,,,chemical-378,,unknown,recollection\n"
                     + "chemical,379,示例粉,,,chemical-379,,unknown,recollection\n", encoding="utf-8")
    mappings = load_mappings(tmp_path / "m")
    hazards = mappings.concept("hazard-factors")
    assert mappings.catalogues["hazard-catalogue"].ambiguous == {"演示尘": ("chemical-376", "chemical-377")}
    assert hazards.lookup("*", "演示尘") == []  # the full name is required
    assert hazards.lookup("*", "演示尘(乙型)")[0].code == "chemical-377"
    assert hazards.lookup("*", "示例粉")[0].code == "chemical-379"  # a row's own name wins over a short name
    assert hazards.lookup("*", "示例粉（注）")[0].code == "chemical-378"


def test_the_chemical_class_is_not_extended_and_ozone_goes_to_review(cdc: Pipeline) -> None:
    assert CATALOGUE.counts()["chemical"] == 375 and HAZARDS.lookup("*", "臭氧") == []
    [out] = cdc.convert(exam_csv("", "电焊烟尘、氮氧化物、臭氧"), "cdc-csv", "t.csv")
    assert out.status is Status.CONVERTED
    [warning] = [i for i in out.issues if "hazard factor" in i.message]
    assert "'臭氧' is not in 《职业病危害因素分类目录》" in warning.message and warning.severity == "warning"


# -- through the real pipeline ----------------------------------------------------------------------


def test_every_catalogue_name_converts_keeping_the_senders_code(cdc: Pipeline) -> None:
    rows = [HEADER]
    # 磷化氢、磷化锌、磷化铝 holds the separator 、 but is one name of the 目录: one code goes with it
    split = {e.code for e in CATALOGUE.entries if "、" in e.name.split("（")[0]}
    for i, e in enumerate(CATALOGUE.entries):
        rows.append(exam_csv(f"X{i:03d}", e.name, number=f"TJ{i:03d}").decode("utf-8").splitlines()[1])
    names = {f"TJ{i:03d}": e for i, e in enumerate(CATALOGUE.entries)}
    outs = list(cdc.convert(("\n".join(rows) + "\n").encode("utf-8"), "cdc-csv", "all.csv"))
    assert len(outs) == 459 and split == {"chemical-022", "chemical-359"}
    for out in outs:
        number = out.label.split()[-1]
        entry = names[number]
        assert out.status is Status.CONVERTED, (entry.name, [str(i) for i in out.issues])
        assert not [i for i in out.issues if "hazard factor" in i.message], entry.name
        factors = factors_of(out.bundle)
        # a name two entries share goes to the one listing it as an alias: 铀及其化合物 is read as 放射性因素
        want = (entry.code, entry.category) if entry.code != "chemical-011" else ("radiation-007", "radiation")
        assert {(f["factor"]["code"], f["category"]["code"]) for f in factors} == {want}
        assert factors[0]["source"] == {"system": sender_hazard_system("cdc-zyjk"),
                                        "code": f"X{int(number[2:]):03d}", "display": entry.name}


def test_several_factors_in_a_cell_keep_each_senders_code(cdc: Pipeline) -> None:
    [out] = cdc.convert(exam_csv("1001、2030、3010", "矽尘、二甲苯、紫外辐射"), "cdc-csv", "t.csv")
    assert out.status is Status.CONVERTED
    got = [(f["factor"]["code"], f["category"]["code"], f["source"]["code"]) for f in factors_of(out.bundle)]
    assert got == [("silica-dust", "dust", "1001"), ("chemical-030", "chemical", "2030"),
                   ("physical-010", "physical", "3010")]


def test_an_unknown_factor_is_stored_with_a_warning_and_the_exam_needs_review(cdc: Pipeline) -> None:
    [out] = cdc.convert(exam_csv("1001、9999", "矽尘、某新型溶剂"), "cdc-csv", "t.csv", )
    assert out.status is Status.CONVERTED
    [warning] = [i for i in out.issues if "某新型溶剂" in i.message]
    assert warning.severity == "warning" and warning.location == "row 2 column 接害因素代码"
    known, unknown = factors_of(out.bundle)
    assert known["factor"]["code"] == "silica-dust"
    assert unknown == {"factor": {"system": sender_hazard_system("cdc-zyjk"), "code": "9999", "display": "某新型溶剂"}}
    assert profiles.validate(out.bundle) == []
    conclusion = [f for f in facts_from_bundle(out.bundle) if f.kind == "conclusion"]
    observation = [f for f in facts_from_bundle(out.bundle) if f.kind == "observation"][0]
    decision = decide(observation, BASE, FULING, EXAM_WEEK)  # within the result's validity window
    filing = decision.rule("occupational-filing")
    assert filing is not None and filing.status == "not-evaluable" and "某新型溶剂" in filing.message
    assert decision.outcome == "needs-review", decision.to_dict()
    assert conclusion  # the conclusion is still there, never recognised


def test_a_catalogue_factor_without_its_category_is_still_refused(cdc: Pipeline) -> None:
    [out] = cdc.convert(exam_csv("1001", "矽尘"), "cdc-csv", "t.csv")
    bundle = copy.deepcopy(out.bundle)
    report = report_of(bundle)
    hazard = next(e for e in report["extension"] if e["url"].endswith("/hazard-factor"))
    hazard["extension"] = [p for p in hazard["extension"] if p["url"] != "category"]
    issues = profiles.validate(bundle)
    assert [i.extra["rule"] for i in issues if i.severity == "error"] == ["cyhr-haz-1"]


# -- GBZ 98-2020 conclusions -------------------------------------------------------------------------


@pytest.mark.parametrize("text, exam_type, code", [
    ("可从事放射工作", "上岗前", "fit-for-radiation-work"),
    ("不应(不宜)从事放射工作", "上岗前", "unfit-for-radiation-work"),
    ("不应（不宜）从事放射工作", "上岗前", "unfit-for-radiation-work"),
    ("可继续原放射工作", "在岗期间", "continue-radiation-work"),
    ("暂时脱离放射工作（三个月后复查）", "在岗期间", "temporary-removal"),
    ("不宜再做放射工作而调整做其他非放射工作", "在岗期间", "reassign-non-radiation-work"),
    ("对疑似职业性放射性疾病，应提出进一步诊断的意见", "在岗期间", "suspected-occupational-disease"),
])
def test_gbz98_conclusions_are_final_and_accepted(cdc: Pipeline, text: str, exam_type: str, code: str) -> None:
    [out] = cdc.convert(exam_csv("4101", "密封放射源产生的电离辐射", conclusion=text, exam_type=exam_type),
                        "cdc-csv", "t.csv")
    assert out.status is Status.CONVERTED, [str(i) for i in out.issues]
    report = report_of(out.bundle)
    assert report["conclusionCode"][0]["coding"][0]["code"] == code and report["conclusion"] == text
    assert factors_of(out.bundle)[0]["category"]["code"] == "radiation"
    assert profiles.validate(out.bundle) == []


def test_recheck_is_still_refused(cdc: Pipeline) -> None:
    [out] = cdc.convert(exam_csv("1001", "矽尘", conclusion="复查"), "cdc-csv", "t.csv")
    assert out.status is not Status.CONVERTED and any("复查 is not a final" in i.message for i in out.issues)


# -- names as the 目录 writes them, in a cell of several ----------------------------------------------


@pytest.mark.parametrize("codes, names, want", [
    ("", "麻尘（亚麻、黄麻和苎麻）", [("dust-030", "麻尘（亚麻、黄麻和苎麻）")]),
    ("", "麻尘(亚麻、黄麻和苎麻)", [("dust-030", "麻尘(亚麻、黄麻和苎麻)")]),
    ("1030、2001", "麻尘（亚麻、黄麻和苎麻）、铅及其化合物", [
        ("dust-030", "麻尘（亚麻、黄麻和苎麻）"), ("lead", "铅及其化合物")]),
    ("2022", "磷化氢、磷化锌、磷化铝", [("chemical-022", "磷化氢、磷化锌、磷化铝")]),
    ("", "苯、磷化氢、磷化锌、磷化铝；三氧化铬、铬酸盐、重铬酸盐", [
        ("benzene", "苯"), ("chemical-022", "磷化氢、磷化锌、磷化铝"), ("chemical-359", "三氧化铬、铬酸盐、重铬酸盐")]),
    # three codes: the sender meant the three names apart (each still finds the row)
    ("2022a、2022b、2022c", "磷化氢、磷化锌、磷化铝", [
        ("chemical-022", "磷化氢"), ("chemical-022", "磷化锌"), ("chemical-022", "磷化铝")]),
    ("", "磷化氢、磷化锌", [("chemical-022", "磷化氢"), ("chemical-022", "磷化锌")]),  # not the whole name: cut
])
def test_catalogue_names_holding_a_separator_are_kept_whole(
        cdc: Pipeline, codes: str, names: str, want: list[tuple[str, str]]) -> None:
    [out] = cdc.convert(exam_csv(codes, names), "cdc-csv", "t.csv")
    assert out.status is Status.CONVERTED, [str(i) for i in out.issues]
    assert not [i for i in out.issues if "hazard factor" in i.message], [str(i) for i in out.issues]
    got = [(f["factor"]["code"], f["source"]["display"]) for f in factors_of(out.bundle)]
    assert got == want


# -- a GBZ 98 conclusion on an exam without a radiation factor ------------------------------------------


@pytest.mark.parametrize("codes, names, conclusion, warned", [
    ("3001", "噪声", "可从事放射工作", True),
    ("", "苯", "不宜再做放射工作而调整做其他非放射工作", True),
    ("", "苯", "疑似职业性放射性疾病", True),
    ("", "噪声、某新型射线", "可继续原放射工作", True),  # an unknown factor: warned as well (it also goes to review)
    ("4101", "密封放射源产生的电离辐射", "可从事放射工作", False),
    ("", "噪声、X射线装置（含CT机）产生的电离辐射", "可继续原放射工作", False),
    ("", "噪声", "目前未见异常", False),
])
def test_a_radiation_conclusion_without_a_radiation_factor_is_a_warning(cdc: Pipeline, codes: str, names: str,
                                                                        conclusion: str, warned: bool) -> None:
    exam_type = "上岗前" if conclusion == "可从事放射工作" else "在岗期间"
    [out] = cdc.convert(exam_csv(codes, names, conclusion=conclusion, exam_type=exam_type), "cdc-csv", "t.csv")
    assert out.status is Status.CONVERTED, [str(i) for i in out.issues]
    found = [i for i in out.issues if "GBZ 98" in i.message]
    assert bool(found) is warned, [str(i) for i in out.issues]
    if warned:
        [warning] = found
        assert warning.severity == "warning" and warning.location == "row 2 column 主检结论"
        assert f"'{conclusion}' is a GBZ 98 conclusion" in warning.message and "放射性因素" in warning.message
