"""CLI: help everywhere, convert's output and errors, settings layering, operator commands."""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from conftest import DATA, FULING, TONGJIANG
from gateway.cli import cli
from gateway.config import load_settings
from gateway.errors import ConfigError


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append(prefix + (name,))
        if isinstance(cmd, click.Group):
            out += all_commands(cmd, prefix + (name,))
    return out


def test_every_command_has_help(runner) -> None:
    commands = all_commands(cli)
    assert {("serve",), ("convert",), ("demo",), ("mappings", "check"), ("messages", "list")} <= set(commands)
    for path in commands:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path
        cmd = cli
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        assert cmd.help or cmd.short_help, f"{' '.join(path)} has no help text"
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name not in ("help",):
                assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"


def test_convert_prints_one_bundle_per_line_and_problems_on_stderr(runner) -> None:
    result = runner.invoke(cli, ["--issuer-uscc", TONGJIANG, "convert", str(DATA / "hl7v2" / "malformed.hl7")])
    assert result.exit_code == 1
    bundles = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(bundles) == 1 and bundles[0]["resourceType"] == "Bundle"
    assert result.stderr.splitlines() == [
        "MSH-10 ORU0042: OBX[3]-5 'abc' is not a number for value type NM",
        "MSH-10 ORU0044: PID[1]-3 repetition 1 (type NNCHN): 身份证号 check digit is '0', expected '7'",
        "MSH-10 ADT0045: MSH[1]-9 message type ADT^A01 is not supported (supported: ORU^R01)",
        "MSH-10 ORU0046: MSH[1]-12 HL7 version 2.2 is older than 2.3, the first version whose ORU^R01 is taken "
        "(2.3 to 2.8.2); send the message as v2.3.1 or later",
        "MSH-10 ORU0047: OBR[1]-7 month 13 in '20241345080000' does not exist",
    ]


def test_convert_good_files_exit_zero_and_name_files_when_several(runner) -> None:
    files = [str(DATA / "hl7v2" / "analyser-v231-chemistry.hl7"), str(DATA / "hl7v2" / "lis-v24-crlf.hl7")]
    result = runner.invoke(cli, ["--issuer-uscc", TONGJIANG, "convert", *files])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr.splitlines() == [
        f"filtered: {files[0]}: MSH-10 1002: no PID segment: analyser quality-control or calibration message"]


def test_convert_reads_stdin_and_uses_the_issuers_code_system(runner) -> None:
    data = (DATA / "hl7v2" / "lis-v24-gbk.hl7").read_bytes()
    result = runner.invoke(cli, ["--issuer-uscc", FULING, "convert", "-"], input=data)
    assert result.exit_code == 0
    bundle = json.loads(result.stdout)
    obs = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    assert obs["code"]["coding"][0]["system"].endswith(f"/local-item/{FULING}")


def test_convert_errors_are_one_line(runner, tmp_path: Path) -> None:
    missing = runner.invoke(cli, ["convert", str(tmp_path / "nope.hl7")])
    assert missing.exit_code == 1 and missing.stderr.strip().startswith("Error:") and "nope.hl7" in missing.stderr
    fmt = runner.invoke(cli, ["convert", "--format", "pdf", str(tmp_path / "x")])
    assert fmt.exit_code == 2 and "format 'pdf' is not supported" in fmt.stderr  # (bad input, as a usage error)
    bad_uscc = runner.invoke(cli, ["--issuer-uscc", "12511921MB0001003X", "convert", "-"], input=b"")
    assert bad_uscc.exit_code == 2
    assert bad_uscc.stderr.strip().splitlines() == [
        "Error: configuration: issuer_uscc: 统一社会信用代码 '12511921MB0001003X' check character is 'X', expected 'C'"]


def test_mappings_check_lists_tables_and_fails_on_a_bad_one(runner, tmp_path: Path) -> None:
    ok = runner.invoke(cli, ["mappings", "check"])
    assert ok.exit_code == 0 and "lab-items" in ok.stdout and "tables OK" in ok.stdout
    bad = tmp_path / "mappings" / "concepts"
    bad.mkdir(parents=True)
    (bad / "x.csv").write_text("# id: x\n# version: 1\n# target: http://loinc.org\n"
                               "source_system,source_code,target_system,target_code,display\n"
                               "*,GLU,http://loinc.org,2345-8,Glucose\n", encoding="utf-8")
    result = runner.invoke(cli, ["--mappings-dir", str(tmp_path / "mappings"), "mappings", "check"])
    assert result.exit_code == 2
    assert "x.csv:2: LOINC code '2345-8' has a wrong check digit" in result.stderr
    (tmp_path / "empty").mkdir()  # a folder with no table at all: a wrong path, said now rather than at the start
    empty = runner.invoke(cli, ["--mappings-dir", str(tmp_path / "empty"), "mappings", "check"])
    assert empty.exit_code == 2 and empty.stderr.strip().splitlines() == [
        f"Error: configuration: mappings_dir: {tmp_path / 'empty'} holds no mapping tables (*.yaml structures,"
        " concepts/*.csv)"]


@pytest.mark.parametrize("command", [["audit", "stats"], ["decisions", "list"]])
def test_a_uscc_filter_that_cannot_exist_is_refused_on_one_line(runner, tmp_path: Path, command: list[str]) -> None:
    """A filter naming a 统一社会信用代码 with a wrong check character finds nothing ever: said, exit 2."""
    result = runner.invoke(cli, ["--data-dir", str(tmp_path), *command, "--db", str(tmp_path / "gateway.db"),
                                 "--issuer", "12511921MB0001003X"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == ("Error: Invalid value for '--issuer': 统一社会信用代码 "
                                                      "'12511921MB0001003X' check character is 'X', expected 'C'")


def test_messages_list_and_show(runner, settings, database: str) -> None:
    from gateway.pipeline import Pipeline

    pipe = Pipeline(settings)  # the backend chosen with --backend
    pipe.ingest((DATA / "hl7v2" / "malformed.hl7").read_bytes(), "hl7v2", channel="file")
    pipe.close()
    where = ["--data-dir", settings.data_dir, *(["--database", database] if database else [])]
    listed = runner.invoke(cli, [*where, "messages", "list", "--status", "refused"])
    assert listed.exit_code == 0 and len(listed.stdout.splitlines()) == 5
    assert "'abc' is not a number" in listed.stdout
    assert "OBX[3]-5 'abc' is not a number" in listed.stdout  # where, as the ACK and `messages show` say it
    shown = runner.invoke(cli, [*where, "messages", "show", "1"])
    assert "status refused, answer AE" in shown.stdout and "OBX[3]-5" in shown.stdout
    raw = runner.invoke(cli, [*where, "messages", "show", "1", "--raw"])
    assert raw.stdout_bytes.startswith(b"MSH|^~\\&|LIS|TJXRMYY")
    # the raw bytes (patient data) read on the command line are audited, as the console's view of them is
    from gateway.audit.log import entries
    from gateway.store.db import connect

    db = connect(database or str(Path(settings.data_dir) / "gateway.db"))
    try:
        viewed = [e.facts for e in entries(db) if e.kind == "operator" and e.facts["action"] == "message-raw-viewed"]
    finally:
        db.conn.close()
    assert len(viewed) == 1 and viewed[0]["target"] == "messages/1"
    assert viewed[0]["client_address"] == "command line" and "(command line)" in viewed[0]["user"]["display"]
    missing = runner.invoke(cli, [*where, "messages", "show", "99"])
    assert missing.exit_code == 1 and "no message with id 99" in missing.stderr


def test_messages_list_gives_the_error_a_message_was_refused_for(runner, settings, database: str) -> None:
    """An exam refused for its conclusion (复查: not final) after a warning (a local item code with no mapping) was
    listed with the warning as its reason."""
    from gateway.pipeline import Pipeline

    pipe = Pipeline(settings)
    outcomes = pipe.ingest((DATA / "csv" / "cdc-exams-utf8-bom.csv").read_bytes(), "cdc-csv", channel="file")
    pipe.close()
    refused = [o for o in outcomes if o.status.value == "refused"
               and o.issues and o.issues[0].severity == "warning" and o.errors]
    assert refused, [(o.status, o.issues[:2]) for o in outcomes]
    where = ["--data-dir", settings.data_dir, *(["--database", database] if database else [])]
    listed = runner.invoke(cli, [*where, "messages", "list", "--status", "refused"]).stdout
    for outcome in refused:
        [line] = [row for row in listed.splitlines() if row.split()[0] == str(outcome.record_id)]
        assert outcome.errors[0].message[:40] in line and outcome.issues[0].message[:40] not in line, line


def test_settings_layers_defaults_toml_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "gw.toml"
    toml.write_text('[gateway]\nhttp_port = 9001\nmllp_port = 9002\nissuer_name = "来自文件"\n', encoding="utf-8")
    env = {"GATEWAY_CONFIG": str(toml), "GATEWAY_MLLP_PORT": "9003"}
    s = load_settings(environ=env, overrides={"issuer_name": "来自参数"})
    assert (s.http_port, s.mllp_port, s.issuer_name, s.workers) == (9001, 9003, "来自参数", 2)


@pytest.mark.parametrize("toml, message", [
    ("colour = 1\n", "unknown setting 'colour'"),
    ("http_port = 'eighty'\n", "http_port must be a whole number"),
    ("http_port = 70000\n", "http_port 70000 is not a TCP port"),
    ("timezone = 'CST'\n", "timezone 'CST' must look like +08:00"),
    ("not toml at all = = \n", "is not valid TOML"),
])
def test_bad_settings_are_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={})
    assert message in str(exc.value)


def test_settings_command_documents_every_setting(runner) -> None:
    from dataclasses import fields

    from gateway.config import Settings

    out = runner.invoke(cli, ["settings"]).stdout
    for f in fields(Settings):
        assert f"GATEWAY_{f.name.upper()}" in out


def test_readme_documents_every_setting_and_command() -> None:
    from dataclasses import fields

    from gateway.config import REPO_ROOT, Settings

    from gateway.config import settings_table

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_table() in readme, "README settings table is stale: run python -m gateway.config"
    for f in fields(Settings):
        assert f"`{f.name}`" in readme, f"setting {f.name} is not in the README"
    for path in all_commands(cli):
        if len(path) == 1 or path[0] in ("mappings", "messages"):
            assert f"gateway {' '.join(path)}" in readme, f"command {' '.join(path)} is not in the README"


@pytest.mark.parametrize("command", [["users", "list"], ["clients", "list"], ["audit", "verify"], ["audit", "stats"],
                                     ["decisions", "list"]])
def test_reading_commands_refuse_a_database_that_is_not_there(runner, tmp_path: Path, database: str,
                                                              command: list[str]) -> None:
    """A mistyped database is named and refused, never created empty to answer "nothing": a missing SQLite
    file, or a PostgreSQL schema that does not exist."""
    missing = f"{database}_missing" if database else str(tmp_path / "missing.db")
    said = "has no schema" if database else "no such database"
    for _ in range(2):  # asked again: still not there
        result = runner.invoke(cli, ["--data-dir", str(tmp_path / "gw"), *command, "--db", missing])
        assert result.exit_code in (1, 2) and said in result.output, result.output
    assert not (tmp_path / "missing.db").exists()


def test_every_area_command_loads_when_used_and_only_then() -> None:
    """`gateway X` imports only X's module: each area's command resolves under its name, and starting the
    command-line tool loads neither the web framework nor the benchmark nor the PostgreSQL driver."""
    import subprocess
    import sys

    import click

    from gateway.cli import AREAS, cli

    ctx = click.Context(cli)
    for name in AREAS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name, name
    registry = cli.get_command(ctx, "registry")
    assert isinstance(registry, click.Group) and {"issue-cert", "init-authority"} <= set(registry.commands)
    assert set(AREAS) <= set(cli.list_commands(ctx))
    probe = ("import sys, gateway.cli; print(sorted(m for m in ('flask', 'psycopg', 'gateway.bench', 'jsonschema')"
             " if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
