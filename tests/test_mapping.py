"""Mapping tables and the mapping stage: loading checks, lookups, units, flags, statuses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import DATA, TONGJIANG
from gateway.config import REPO_ROOT
from gateway.errors import ConfigError, UnmappedCode
from gateway.mapping.concepts import Terminology
from gateway.mapping.tables import load_mappings, loinc_check_digit
from gateway.naming import local_item_system

HEADER = "source_system,source_code,target_system,target_code,display\n"
META = "# id: t\n# version: 1\n# target: http://loinc.org\n"


@pytest.fixture(scope="module")
def terms() -> Terminology:
    ms = load_mappings(REPO_ROOT / "mappings")
    return Terminology.for_structure(ms, ms.structure("hl7v2-oru-r01"))


def table(tmp_path: Path, body: str, name: str = "t.csv") -> Path:
    folder = tmp_path / "concepts"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(body, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("number, digit", [("6690", "2"), ("789", "8"), ("14749", "6"), ("2345", "7"),
                                           ("11502", "2"), ("1742", "6")])
def test_loinc_check_digit(number: str, digit: str) -> None:
    assert loinc_check_digit(number) == digit


def test_shipped_tables_load_and_every_loinc_is_well_formed() -> None:
    ms = load_mappings(REPO_ROOT / "mappings")
    for concept in ms.concepts.values():
        for targets in concept.rows.values():
            for t in targets:
                if t.system == "http://loinc.org" and t.code:
                    number, digit = t.code.split("-")
                    assert loinc_check_digit(number) == digit, t


@pytest.mark.parametrize("body, problem", [
    (META + "a,b,c\n", "header must be"),
    ("# id: t\n" + HEADER, "missing '# version: ...' line"),
    (META + HEADER + "*,GLU,http://loinc.org,2345-8,Glucose\n", "wrong check digit"),
    (META + HEADER + "*,GLU,http://loinc.org,GLU,Glucose\n", "is not NNNNN-N"),
    (META + HEADER + "*,U,http://unitsofmeasure.org,mg dL,x\n", "is not a UCUM code"),
    (META + HEADER + "*,GLU,loinc,2345-7,Glucose\n", "is not an absolute URI"),
    (META + HEADER + "*,GLU,http://loinc.org,2345-7,a\n*,GLU,http://loinc.org,14749-6,b\n", "mapped twice"),
    (META + HEADER + "*,GLU,http://loinc.org,2345-7\n", "expected 5 columns"),
    (META + HEADER + ",GLU,http://loinc.org,2345-7,a\n", "source_system and source_code are required"),
])
def test_bad_concept_tables_are_config_errors_naming_file_and_line(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_mappings(table(tmp_path, body))
    assert problem in str(exc.value)
    assert "t.csv" in str(exc.value)


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path) -> None:
    body = META + HEADER + "*,A,http://loinc.org,2345-8,x\n*,B,http://loinc.org,6690-3,y\n"
    with pytest.raises(ConfigError) as exc:
        load_mappings(table(tmp_path, body))
    assert "t.csv:2" in str(exc.value) and "t.csv:3" in str(exc.value)


def test_bad_yaml_structure_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("id: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_mappings(tmp_path)
    (tmp_path / "x.yaml").write_text("id: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="missing key 'version'"):
        load_mappings(tmp_path)


def test_missing_directory_and_missing_table() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_mappings("/nonexistent/mappings")
    ms = load_mappings(REPO_ROOT / "mappings")
    with pytest.raises(ConfigError, match="'nope' is missing"):
        ms.concept("nope")


def test_local_code_kept_first_then_loinc(terms: Terminology) -> None:
    from gateway.adapters.base import Coded

    codings, state = terms.item_codings(TONGJIANG, Coded("WBC", "白细胞"))
    assert state == "mapped"
    assert codings == [
        {"system": local_item_system(TONGJIANG), "code": "WBC", "display": "白细胞"},
        {"system": "http://loinc.org", "code": "6690-2",
         "display": "Leukocytes [#/volume] in Blood by Automated count"},
    ]
    # another member's code of the same spelling is not mapped by this member's rows
    assert terms.item_codings("12500102MB0002006J", Coded("WBC"))[1] == "unmapped"
    assert terms.item_codings(TONGJIANG, Coded("REMARK"))[1] == "deliberately-unmapped"
    with pytest.raises(UnmappedCode):
        terms.items.lookup(local_item_system(TONGJIANG), "REMARK")


@pytest.mark.parametrize("unit, ucum", [
    ("mmol/L", "mmol/L"), ("mg/dl", "mg/dL"), ("10^9/L", "10*9/L"), ("×10^12/L", "10*12/L"), ("IU/L", "[IU]/L"),
    ("μmol/L", "umol/L"),  # Greek small letter mu, U+03BC
    ("µmol/L", "umol/L"),  # micro sign, U+00B5
    ("μIU/mL", "u[IU]/mL"), ("fl", "fL"), ("秒", "s"),
])
def test_units_to_ucum_case_sensitive(terms: Terminology, unit: str, ucum: str) -> None:
    assert terms.ucum(unit) == {"system": "http://unitsofmeasure.org", "code": ucum}


def test_unknown_unit_is_none(terms: Terminology) -> None:
    assert terms.ucum("furlongs") is None
    assert terms.ucum("MMOL/L") is None  # UCUM is case-sensitive; an unknown spelling is not guessed


def test_unknown_unit_and_flag_are_kept_as_text_with_warnings(pipeline) -> None:
    msg = (DATA / "hl7v2" / "mllp-framed.hl7").read_bytes().split(b"\x1c")[0].strip(b"\x0b")
    msg = msg.replace(b"|6.3|10*9/L|3.5-9.5|N|", b"|6.3|cells/hpf|3.5-9.5|+++|")
    out = list(pipeline.convert(msg, "hl7v2"))[0]
    obs = next(e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    assert obs["valueQuantity"] == {"value": obs["valueQuantity"]["value"], "unit": "cells/hpf"}
    assert obs["interpretation"] == [{"text": "+++"}]
    assert sorted(i.location for i in out.issues) == ["OBX[1]-6", "OBX[1]-8"]
    assert all(i.severity == "warning" for i in out.issues)


@pytest.mark.parametrize("flags, said", [
    (b"N~H", "'N' and 'H'"), (b"H~L", "'H' and 'L'"), (b"H~HH", None), (b"N", None)])
def test_flags_contradicting_each_other_are_kept_and_said(pipeline, flags: bytes, said: str | None) -> None:
    """正常 beside H (an HL7 v2 OBX-8 that repeats, a CDA 检验结果代码 beside its interpretationCode): both are kept as
    sent, and the sender is told which two disagree."""
    msg = (DATA / "hl7v2" / "mllp-framed.hl7").read_bytes().split(b"\x1c")[0].strip(b"\x0b")
    out = list(pipeline.convert(msg.replace(b"|3.5-9.5|N|", b"|3.5-9.5|" + flags + b"|"), "hl7v2"))[0]
    obs = next(e["resource"] for e in out.bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    assert [i["text"] for i in obs["interpretation"]] == flags.decode().split("~")
    found = [i for i in out.issues if "contradict" in i.message]
    if said is None:
        assert not found
    else:
        [issue] = found
        assert issue.severity == "warning" and issue.location == "OBX[1]-8" and said in issue.message


def test_unknown_result_status_refuses_and_empty_one_follows_the_report(pipeline) -> None:
    base = (DATA / "hl7v2" / "mllp-framed.hl7").read_bytes().split(b"\x1c")[0].strip(b"\x0b")
    bad = list(pipeline.convert(base.replace(b"|3.5-9.5|N|||F", b"|3.5-9.5|N|||Z"), "hl7v2"))[0]
    assert [i.line() for i in bad.errors] == ["OBX[1]-11 result status 'Z' is not in HL7 table 0085"]
    empty = list(pipeline.convert(base.replace(b"|3.5-9.5|N|||F", b"|3.5-9.5|N|||"), "hl7v2"))[0]
    obs = next(e["resource"] for e in empty.bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    assert obs["status"] == "final"  # OBR-25 = F stands for the empty OBX-11


def test_every_datetime_with_a_time_carries_an_offset() -> None:
    """FHIR requires a zone when a time is given; no golden output may break that."""
    stamp = re.compile(r'"(\d{4}-\d{2}-\d{2}T[^"]*)"')
    for path in sorted((DATA / "expected").glob("*.json")):
        for value in stamp.findall(path.read_text(encoding="utf-8")):
            assert re.search(r"(Z|[+-]\d{2}:\d{2})$", value), f"{path.name}: {value}"


def test_a_time_without_an_offset_is_weighed_as_china_time() -> None:
    """(A naive time beside an aware one cannot be compared: the unit would fail as an internal error.)"""
    from gateway.mapping.concepts import _before, _moment

    naive, aware = _moment("2024-11-05T08:30:00"), _moment("2024-11-05T09:30:00+08:00")
    assert naive is not None and aware is not None
    assert _before(naive, aware) and not _before(aware, naive)


def test_tables_read_again_are_copies_and_a_changed_table_is_read_anew(tmp_path: Path) -> None:
    """Tables read before with the same content come from this process's copy (not read and checked again), each
    caller with its own; a table whose bytes changed is read again, even when its size and time did not."""
    import os
    import shutil

    root = tmp_path / "mappings"
    shutil.copytree(REPO_ROOT / "mappings", root)
    first, second = load_mappings(root), load_mappings(root)
    assert first == second and first is not second
    some = next(iter(first.concepts))
    assert first.concepts[some] is not second.concepts[some]
    first.structures.clear()  # (what one caller does to its copy, no other sees)
    assert load_mappings(root).structures == second.structures != {}

    path = root / "concepts" / "administrative-gender.csv"
    text = path.read_text(encoding="utf-8")
    stat = path.stat()
    # the version for another of the same size, the file's times put back: only its bytes tell
    changed = text.replace("# version: 1.0.0", "# version: 1.0.9", 1)
    assert len(changed.encode()) == len(text.encode()) and changed != text
    path.write_text(changed, encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_mappings(root).concept("administrative-gender").version == "1.0.9"
    assert second.concept("administrative-gender").version == "1.0.0"
