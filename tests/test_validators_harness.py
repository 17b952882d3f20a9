"""The outside FHIR validators' harness (tests/tools/validate-fhir) is the project's own and still tells good from bad.

Every golden output and adapter Bundle is checked through this harness, so a harness that
accepted everything (a failed install, a missing engine) would make those checks vacuous.
Its samples are small hand-written resources, each named for the one thing wrong with it.
"""
from __future__ import annotations

from pathlib import Path

from conftest import ROOT, validate_fhir, validator_path

SAMPLES = ROOT / "tests" / "tools" / "validate-fhir" / "samples"


def test_harness_is_inside_the_project() -> None:
    tool = validator_path()
    assert tool.is_relative_to(ROOT), tool
    lock = tool.parent / "package-lock.json"
    assert '"@medplum/core": "4.5.2"' in lock.read_text(encoding="utf-8")


def test_valid_samples_pass() -> None:
    files = sorted(SAMPLES.glob("valid-*.json"))
    assert files
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stdout, result.stdout


def test_each_invalid_sample_fails() -> None:
    files = sorted(SAMPLES.glob("invalid-*.json"))
    assert len(files) >= 10
    result = validate_fhir(files)  # one run: the validators load the R4 definitions once
    assert result.returncode == 1, result.stdout + result.stderr
    for f in files:
        # an error line from one of the three engines for every sample, not a crash of the harness
        assert any(line.startswith(f"{f}: [") and "] error: " in line for line in result.stdout.splitlines()), \
            f"{f.name}: no engine reported an error\n{result.stdout}{result.stderr}"


def test_unreadable_input_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-json.json"
    bad.write_text("{", encoding="utf-8")
    result = validate_fhir([bad])
    assert result.returncode == 2, result.stdout + result.stderr
