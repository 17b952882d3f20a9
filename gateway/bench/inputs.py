"""Bench inputs: realistic, generated (and made-up) results for the benchmark.

Every input is generated from a seed, so two runs (and two commits) measure
the same bytes. Nothing here is patient data: names, numbers and 身份证号 are
invented (with valid GB 11643 check digits, so that the gateway's checks pass
as they would on real traffic).

- :func:`oru_r01`: an HL7 v2.5.1 ORU^R01 of the demo county hospital (通江县人民医院)
  with three report groups and 20 OBX: 血常规, 生化 and a 复查 group, using that
  member's own item codes from ``mappings/concepts/lab-items.csv`` so that mapping
  does real work (19 mapped items, one remark deliberately unmapped), escaped
  units (``10\\S\\9/L``), SN values, a formatted text remark and Chinese text.
- :func:`oru_batch`: ``n`` distinct messages (distinct control ids, patients, values).
- :func:`write_cdc_csv`: a CDC occupational-health exam export (``mappings/csv/cdc-occupational-exam.yaml``
  layout) of the demo CDC (四川省疾病预防控制中心) with its own item codes from
  ``mappings/concepts/cdc-items.csv``: 8 rows per exam, written as a stream.
"""
from __future__ import annotations

import datetime as _dt
import random
from dataclasses import dataclass
from pathlib import Path

from gateway.identifiers import id_card_check_char, uscc_check_char

__all__ = ["BENCH_ISSUER_USCC", "BENCH_ISSUER_NAME", "OBX_PER_MESSAGE", "CDC_USCC", "CDC_NAME", "CSV_ROWS_PER_EXAM",
           "Item", "oru_r01", "oru_batch", "id_card", "write_cdc_csv"]

#: The demo member whose local codes the generated messages use (see mappings/concepts/lab-items.csv).
BENCH_ISSUER_USCC = "12511921MB0001003C"
BENCH_ISSUER_NAME = "通江县人民医院（演示）"
#: Results per generated message.
OBX_PER_MESSAGE = 20


@dataclass(frozen=True)
class Item:
    """One lab item as the demo hospital's LIS sends it."""

    code: str
    name: str
    unit: str  # as written in OBX-6, already escaped for ER7
    low: float
    high: float
    decimals: int


_CBC = [
    Item("WBC", "白细胞计数", "10\\S\\9/L", 3.5, 9.5, 2),
    Item("RBC", "红细胞计数", "10\\S\\12/L", 4.3, 5.8, 2),
    Item("HGB", "血红蛋白", "g/L", 130, 175, 0),
    Item("HCT", "红细胞压积", "%", 40, 50, 1),
    Item("PLT", "血小板计数", "10\\S\\9/L", 125, 350, 0),
]
_CHEM = [
    Item("ALT", "丙氨酸氨基转移酶", "U/L", 9, 50, 0),
    Item("AST", "天门冬氨酸氨基转移酶", "U/L", 15, 40, 0),
    Item("GLU", "葡萄糖", "mmol/L", 3.9, 6.1, 2),
    Item("CREA", "肌酐", "umol/L", 57, 111, 0),
    Item("UREA", "尿素", "mmol/L", 3.1, 8.0, 2),
    Item("K", "钾", "mmol/L", 3.5, 5.3, 2),
    Item("NA", "钠", "mmol/L", 137, 147, 1),
    Item("TC", "总胆固醇", "mmol/L", 2.8, 5.2, 2),
    Item("TG", "甘油三酯", "mmol/L", 0.45, 1.70, 2),
]
_RECHECK = [_CHEM[2], _CHEM[5], _CHEM[6], _CHEM[3], _CHEM[4]]
_FAMILY = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
_GIVEN = ["建国", "秀英", "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明"]
_DIVISIONS = ["511921", "511902", "510104", "500102", "500103", "511923"]
_REMARKS = ["标本轻度溶血，\\.br\\结果仅供参考", "已复查\\E\\确认", "脂血标本", "请结合临床"]


def id_card(rng: random.Random) -> tuple[str, str, str]:
    """A made-up 身份证号 with a valid check digit, its birth date (YYYYMMDD) and HL7 sex (M/F)."""
    birth = _dt.date(1940, 1, 1) + _dt.timedelta(days=rng.randrange(0, 365 * 65))
    seq = rng.randrange(0, 1000)
    body = f"{rng.choice(_DIVISIONS)}{birth:%Y%m%d}{seq:03d}"
    return body + id_card_check_char(body), f"{birth:%Y%m%d}", "M" if seq % 2 else "F"


def _value(rng: random.Random, item: Item) -> tuple[str, str]:
    """(value text, abnormal flag): mostly normal, some high or low."""
    span = item.high - item.low
    roll = rng.random()
    if roll < 0.1:
        value, flag = item.high + span * rng.uniform(0.02, 0.5), "H"
    elif roll < 0.18:
        value, flag = max(item.low - span * rng.uniform(0.02, 0.4), 0.01), "L"
    else:
        value, flag = item.low + span * rng.uniform(0.05, 0.95), "N"
    return f"{value:.{item.decimals}f}", flag


def _range(item: Item) -> str:
    fmt = f".{item.decimals}f" if item.decimals else ".0f"
    return f"{item.low:{fmt}}-{item.high:{fmt}}"


def oru_r01(n: int, seed: int = 8, when: _dt.datetime | None = None) -> bytes:
    """The ``n``-th generated ORU^R01 (v2.5.1, UTF-8, 20 OBX): ER7 bytes, segments separated by ``\\r``."""
    rng = random.Random(seed * 1_000_003 + n)
    base = when or _dt.datetime(2026, 5, 20, 7, 30, tzinfo=_dt.timezone(_dt.timedelta(hours=8)))
    collected = base + _dt.timedelta(minutes=n % 600)
    received = collected + _dt.timedelta(minutes=40)
    reported = collected + _dt.timedelta(hours=8, minutes=30)

    def ts(t: _dt.datetime) -> str:
        return t.strftime("%Y%m%d%H%M%S") + "+0800"

    number, dob, sex = id_card(rng)
    family, given = rng.choice(_FAMILY), rng.choice(_GIVEN)
    ctrl = f"TJ{seed:02d}{n:010d}"
    segs = [
        f"MSH|^~\\&|LIS|TJXRMYY|GATEWAY|CYHR|{ts(reported)}||ORU^R01^ORU_R01|{ctrl}|P|2.5.1|||AL|NE||UNICODE UTF-8",
        f"PID|1||Z{n:08d}^^^TJXRMYY^MR~{number}^^^^NNCHN||{family}^{given}||{dob}|{sex}|||"
        f"四川省巴中市通江县诺江镇{rng.randrange(1, 300)}号",
    ]
    groups = [("CBC", "血常规", _CBC, "BLD", "全血"), ("CHEM", "生化全套", _CHEM, "SER", "血清"),
              ("RECHK", "生化复查", _RECHECK, "SER", "血清")]
    for g, (panel, panel_name, items, spec_code, spec_name) in enumerate(groups, start=1):
        placer, filler = f"O{seed:02d}{n:08d}{g}", f"R{seed:02d}{n:08d}{g}"
        segs.append(f"ORC|RE|{placer}|{filler}")
        segs.append(f"OBR|{g}|{placer}|{filler}|{panel}^{panel_name}^L|||{ts(collected)}|||||||{ts(received)}"
                    f"||||||||{ts(reported)}|||F|||||||2033&陈&明")
        for k, item in enumerate(items, start=1):
            value, flag = _value(rng, item)
            if item.code == "GLU" and panel == "RECHK":
                # an SN value, as analysers send results below the measuring range
                segs.append(f"OBX|{k}|SN|{item.code}^{item.name}^L||<^{item.low}|{item.unit}|{_range(item)}|L"
                            f"|||F|||{ts(received)}")
                continue
            segs.append(f"OBX|{k}|NM|{item.code}^{item.name}^L||{value}|{item.unit}|{_range(item)}|{flag}"
                        f"|||F|||{ts(received)}")
        if panel == "RECHK":
            segs.append(f"OBX|{len(items) + 1}|TX|REMARK^备注^L||{rng.choice(_REMARKS)}||||||F")
        segs.append(f"SPM|1|S{seed:02d}{n:08d}{g}||{spec_code}^{spec_name}^HL70487|||||||P^Patient^HL70369"
                    f"||||||{ts(collected)}|{ts(received)}")
    return ("\r".join(segs) + "\r").encode("utf-8")


def oru_batch(count: int, seed: int = 8, start: int = 0) -> list[bytes]:
    """``count`` distinct generated messages, numbered from ``start``."""
    return [oru_r01(n, seed) for n in range(start, start + count)]


#: The demo CDC whose export layout and item codes the generated CSV uses.
CDC_USCC = "12510000MB00030095"
CDC_NAME = "四川省疾病预防控制中心（演示）"
_CSV_HEADER = ("体检编号,姓名,身份证号,性别,出生日期,用人单位名称,用人单位统一社会信用代码,工种,接害因素代码,接害因素名称,"
               "接害工龄,体检类型,体检日期,项目代码,项目名称,结果,单位,参考范围,异常标志,主检结论,主检医师,报告日期")
_CSV_ITEMS = [
    ("XCG-WBC", "白细胞计数", "10^9/L", Item("", "", "", 3.5, 9.5, 1)),
    ("XCG-HGB", "血红蛋白", "g/L", Item("", "", "", 130, 175, 0)),
    ("XCG-PLT", "血小板计数", "10^9/L", Item("", "", "", 125, 350, 0)),
    ("SH-ALT", "丙氨酸氨基转移酶", "U/L", Item("", "", "", 9, 50, 0)),
    ("XQ-PB", "血铅", "μg/L", Item("", "", "", 0, 400, 0)),
    ("XY-SBP", "收缩压", "mmHg", Item("", "", "", 90, 139, 0)),
    ("XY-DBP", "舒张压", "mmHg", Item("", "", "", 60, 89, 0)),
    ("XP", "胸部X射线摄片", "", Item("", "", "", 0, 0, 0)),
]
#: Rows per generated exam (one per item).
CSV_ROWS_PER_EXAM = len(_CSV_ITEMS)
_HAZARDS = [("1001", "矽尘"), ("3001", "噪声"), ("2001", "铅及其化合物（不包括四乙基铅）"), ("1001、3001", "矽尘、噪声")]
_EMPLOYERS = ["通江演示建材有限公司", "演示矿业有限公司", "自贡演示化工有限公司", "重庆演示机械制造有限公司"]
_USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def _employer_uscc(rng: random.Random) -> str:
    body = "91" + f"{rng.choice(_DIVISIONS)}" + "".join(rng.choice(_USCC_CHARS) for _ in range(9))
    return body + uscc_check_char(body)


def write_cdc_csv(path: Path, rows: int, seed: int = 8) -> int:
    """Write a CDC exam export of about ``rows`` rows (whole exams) to ``path``, streaming; returns the rows written."""
    rng = random.Random(seed)
    exams = max(1, rows // CSV_ROWS_PER_EXAM)
    with open(path, "w", encoding="utf-8-sig", newline="") as out:
        out.write(_CSV_HEADER + "\r\n")
        for n in range(exams):
            number, dob, sex = id_card(rng)
            name = rng.choice(_FAMILY) + "演示"
            code, hazard = rng.choice(_HAZARDS)
            employer = rng.choice(_EMPLOYERS)
            day = _dt.date(2026, 3, 1) + _dt.timedelta(days=n % 60)
            head = (f"ZY{seed:02d}{n:09d},{name},{number},{'男' if sex == 'M' else '女'},"
                    f"{dob[:4]}-{dob[4:6]}-{dob[6:]},{employer},{_employer_uscc(rng)},操作工,{code},{hazard},"
                    f"{rng.randrange(1, 30)},在岗期间,{day.isoformat()}")
            tail = f"目前未见异常,吴主检,{(day + _dt.timedelta(days=7)).isoformat()} 16:30:00"
            lines = []
            for item_code, item_name, unit, item in _CSV_ITEMS:
                if item_code == "XP":
                    value, rng_text, flag = "双肺纹理清晰，未见尘肺样改变", "", ""
                else:
                    value, flag = _value(rng, item)
                    rng_text = f"<{item.high:.0f}" if item.low == 0 else _range(item)
                    flag = {"H": "↑", "L": "↓"}.get(flag, "")
                lines.append(f"{head},{item_code},{item_name},{value},{unit},{rng_text},{flag},{tail}\r\n")
            out.write("".join(lines))
    return exams * CSV_ROWS_PER_EXAM
