"""``gateway validate FILE...``: the OperationOutcome it prints and its exit codes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import DATA, ROOT, validate_fhir
from gateway.commands.validate import validate
from gateway.naming import sd_url

EXAMPLES = ROOT / "profiles" / "examples"
VALID = str(EXAMPLES / "Bundle-lab-report.json")
BAD_PATIENT = str(EXAMPLES / "invalid" / "Patient-id-card-check-digit.json")
SAMPLES = DATA / "profiles"


def run(*args: str, **kwargs) -> click.testing.Result:
    return CliRunner().invoke(validate, list(args), catch_exceptions=False, **kwargs)


def outcome(result: click.testing.Result) -> dict:
    body = json.loads(result.stdout)
    assert body["resourceType"] == "OperationOutcome" and body["issue"]
    return body


def test_a_valid_bundle_exits_0_with_an_all_ok_outcome() -> None:
    result = run(VALID)
    assert result.exit_code == 0
    assert outcome(result)["issue"] == [{"severity": "information", "code": "informational", "diagnostics": "all OK"}]
    assert result.stderr.strip() == f"{VALID}: OK"


def test_an_invalid_resource_exits_1_naming_location_and_rule() -> None:
    result = run(BAD_PATIENT)
    assert result.exit_code == 1
    [issue] = outcome(result)["issue"]
    assert issue["severity"] == "error" and issue["code"] == "invariant"
    assert issue["expression"] == ["Patient.identifier[0]"]
    assert issue["diagnostics"].startswith("Patient.identifier[0] fails cyhr-pat-1: ")
    assert result.stderr.strip() == f"{BAD_PATIENT}: 1 error, 0 warnings"


def test_several_files_share_one_outcome_each_issue_naming_its_file() -> None:
    result = run(VALID, BAD_PATIENT, str(EXAMPLES / "invalid" / "Observation-mark-text-and-type.json"))
    assert result.exit_code == 1
    issues = outcome(result)["issue"]
    assert len(issues) == 4
    assert issues[0]["diagnostics"].startswith(f"{BAD_PATIENT}: Patient.identifier[0] fails cyhr-pat-1")
    assert all(i["diagnostics"].split(": ")[0].endswith(".json") for i in issues)
    assert result.stderr.splitlines() == [f"{VALID}: OK", f"{BAD_PATIENT}: 1 error, 0 warnings",
                                          f"{EXAMPLES / 'invalid' / 'Observation-mark-text-and-type.json'}: "
                                          "3 errors, 0 warnings"]


def test_warnings_alone_exit_0(tmp_path: Path) -> None:
    patient = json.loads((EXAMPLES / "Patient-example.json").read_text(encoding="utf-8"))
    patient["birthDate"] = "1985-03-08"
    path = tmp_path / "patient.json"
    path.write_text(json.dumps(patient, ensure_ascii=False), encoding="utf-8")
    result = run(str(path))
    assert result.exit_code == 0
    assert [i["severity"] for i in outcome(result)["issue"]] == ["warning"]
    assert "1 warning" in result.stderr


@pytest.mark.parametrize("name, text", [
    ("observation-gbk.json", "is not UTF-8 text"),
    ("truncated.json", "is not JSON"),
    ("missing.json", "cannot be read"),
])
def test_unreadable_input_is_one_readable_error(name: str, text: str) -> None:
    result = run(str(SAMPLES / name))
    assert result.exit_code == 1
    [issue] = outcome(result)["issue"]
    assert issue["severity"] == "error" and text in issue["diagnostics"]
    assert "Traceback" not in result.output


def test_stdin_and_compact_output() -> None:
    result = run("--compact", "-", input=(EXAMPLES / "Observation-glucose.json").read_bytes())
    assert result.exit_code == 0 and result.stdout.count("\n") == 1
    assert result.stderr.strip() == "<stdin>: OK"


def test_profile_option_adds_a_profile_and_refuses_unknown_ones(tmp_path: Path) -> None:
    obs = json.loads((EXAMPLES / "Observation-glucose.json").read_text(encoding="utf-8"))
    del obs["meta"], obs["performer"]
    path = tmp_path / "obs.json"
    path.write_text(json.dumps(obs, ensure_ascii=False), encoding="utf-8")
    assert run(str(path)).exit_code == 0
    checked = run("--profile", sd_url("cyhr-lab-observation"), str(path))
    assert checked.exit_code == 1 and outcome(checked)["issue"][0]["expression"] == ["Observation.performer"]
    unknown = CliRunner().invoke(validate, ["--profile", sd_url("cyhr-blood"), str(path)])
    assert unknown.exit_code == 2 and "not a profile of this guide" in unknown.output


def test_a_broken_guide_exits_2_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "profiles"
    shutil.copytree(ROOT / "profiles", broken, ignore=shutil.ignore_patterns("examples"))
    (broken / "ValueSet-exam-type.json").write_text("[]", encoding="utf-8")
    result = CliRunner().invoke(validate, ["--profiles-dir", str(broken), VALID])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == \
        f"Error: implementation guide: {broken / 'ValueSet-exam-type.json'}: must hold one JSON object"


def test_under_the_gateway_group_the_settings_name_the_guide(tmp_path: Path) -> None:
    from gateway.cli import cli

    added = "validate" not in cli.commands
    if added:
        cli.add_command(validate)
    try:
        runner = CliRunner()
        ok = runner.invoke(cli, ["validate", VALID], env={"GATEWAY_PROFILES_DIR": str(ROOT / "profiles")})
        assert ok.exit_code == 0, ok.output
        missing = runner.invoke(cli, ["validate", VALID], env={"GATEWAY_PROFILES_DIR": str(tmp_path / "none")})
        assert missing.exit_code == 2 and "does not exist" in missing.output
    finally:
        if added:
            cli.commands.pop("validate")


def test_every_option_has_help() -> None:
    assert validate.help and "OperationOutcome" in validate.help
    for param in validate.params:
        if isinstance(param, click.Option):
            assert param.help, param.name


def test_the_printed_outcome_is_valid_r4(tmp_path: Path) -> None:
    files = []
    for i, args in enumerate([(VALID,), (BAD_PATIENT, VALID), (str(SAMPLES / "truncated.json"),)]):
        path = tmp_path / f"outcome-{i}.json"
        path.write_text(run(*args).stdout, encoding="utf-8")
        files.append(path)
    result = validate_fhir(files)
    assert result.returncode == 0, result.stdout + result.stderr
