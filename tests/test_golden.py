"""Golden files: every sample in tests/data/{hl7v2,cda,csv}/ converts to the reviewed expected output.

A new sample file is a new test. Expected outputs live in tests/data/expected/:
``<stem>.<n>.json`` for the n-th message's Bundle and ``<stem>.problems`` for the
stderr lines of refused/filtered messages. They were generated once, reviewed by
hand (values, units, codes, times and offsets against the source message), and are
checked here against the code AND against three independent FHIR validators.
Regenerate with GATEWAY_REGEN_GOLDEN=1 and review the git diff before committing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import DATA, issuer_for, validate_fhir
from gateway import jsonutil
from gateway.config import load_settings
from gateway.pipeline import Pipeline, Status

# Input format of each sample folder.
FORMATS = {"hl7v2": "hl7v2", "cda": "cda", "csv": "cdc-csv"}
SAMPLES = sorted([*(DATA / "hl7v2").glob("*.hl7"), *(DATA / "cda").glob("*.xml"), *(DATA / "csv").glob("*.csv")])
EXPECTED = DATA / "expected"
REGEN = os.environ.get("GATEWAY_REGEN_GOLDEN") == "1"
#: The member whose gateway converts each CSV export (the issuer of its Bundles); CDA documents name their
#: issuer (the custodian) and are converted at that member's gateway (another member's document is refused):
#: 通江县人民医院's, but for the two 涪陵 keeps.
CSV_MEMBERS = {"cdc": ("12510000MB00030095", "四川省疾病预防控制中心（演示）"),
               "hospital": ("12500102MB0002006J", "重庆市涪陵中心医院（演示）")}
_FULING_CDA = {"lab-report-mixed", "v3-hip-soap11-cdata"}


def member_for(path: Path) -> tuple[str, str]:
    if path.parent.name == "csv":
        return CSV_MEMBERS[path.stem.split("-")[0]]
    if path.parent.name == "cda":
        return CSV_MEMBERS["hospital"] if path.stem in _FULING_CDA else ("12511921MB0001003C", "通江县人民医院（演示）")
    return issuer_for(path.stem), "demo issuer"


def convert(path: Path, tmp_path: Path) -> tuple[dict[int, dict], list[str]]:
    uscc, name = member_for(path)
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path), "issuer_uscc": uscc,
                                                    "issuer_name": name})
    bundles: dict[int, dict] = {}
    problems: list[str] = []
    fmt = FORMATS[path.parent.name]
    for n, outcome in enumerate(Pipeline(settings).convert(path.read_bytes(), fmt, path.name), start=1):
        for issue in outcome.issues:
            problems.append(f"{outcome.label}: {issue.severity}: {issue.line()}")
        if outcome.status is Status.FILTERED:
            problems.append(f"{outcome.label}: filtered: {outcome.filtered_reason}")
        if outcome.bundle is not None:
            bundles[n] = outcome.bundle
    return bundles, problems


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_sample_matches_reviewed_output(sample: Path, tmp_path: Path) -> None:
    bundles, problems = convert(sample, tmp_path)
    problems_file = EXPECTED / f"{sample.stem}.problems"
    if REGEN:
        for old in EXPECTED.glob(f"{sample.stem}.*.json"):
            old.unlink()
        for n, bundle in bundles.items():
            (EXPECTED / f"{sample.stem}.{n}.json").write_text(jsonutil.dumps_pretty(bundle) + "\n", encoding="utf-8")
        problems_file.write_text("".join(p + "\n" for p in problems), encoding="utf-8")
    expected_files = sorted(EXPECTED.glob(f"{sample.stem}.*.json"))
    assert {int(p.name.split(".")[-2]) for p in expected_files} == set(bundles), "converted messages differ"
    for path in expected_files:
        n = int(path.name.split(".")[-2])
        assert json.loads(jsonutil.dumps(bundles[n])) == json.loads(path.read_text(encoding="utf-8")), path.name
    assert problems == problems_file.read_text(encoding="utf-8").splitlines()


def test_every_sample_has_reviewed_output() -> None:
    stems = {p.stem for p in SAMPLES}
    assert stems, "no samples found"
    assert stems == {p.name.split(".")[0] for p in EXPECTED.glob("*.problems")}


def test_golden_bundles_pass_independent_validators() -> None:
    files = sorted(EXPECTED.glob("*.json"))
    assert len(files) >= 6
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_golden_bundles_parse_with_fhir_resources_r4b() -> None:
    from fhir.resources.R4B.bundle import Bundle

    for path in sorted(EXPECTED.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        model = Bundle.model_validate(data)
        again = json.loads(model.model_dump_json(exclude_none=True))
        assert again["id"] == data["id"]
        assert len(again["entry"]) == len(data["entry"])
        assert [e["resource"]["resourceType"] for e in again["entry"]] == \
            [e["resource"]["resourceType"] for e in data["entry"]]
