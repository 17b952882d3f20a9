"""CLI: whatever the input, `gateway validate` and `gateway convert` answer in readable lines, never a traceback.

Deep JSON and XML, 5,000-digit numbers, binary files, missing files and
directories each give one line per problem and a non-zero exit. Anything
unexpected inside a command is one line naming it and a hint; ``GATEWAY_DEBUG=1``
lets the exception through for a bug report. One real subprocess run checks the
installed command the way an operator meets it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, TONGJIANG
from gateway.cli import cli

HUGE = "9" * 5000
DEEP = 100_000


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Hostile inputs, one file each."""
    (tmp_path / "deep.json").write_text('{"resourceType":"Observation","extension":' + "[" * DEEP + "]" * DEEP + "}")
    (tmp_path / "deep-array.json").write_text("[" * DEEP + "]" * DEEP)
    (tmp_path / "huge-integer.json").write_text(
        '{"resourceType":"Observation","status":"final","code":{"text":"Hb"},"valueInteger":' + HUGE + "}")
    (tmp_path / "huge-decimal.json").write_text(
        '{"resourceType":"Observation","status":"final","code":{"text":"Hb"},"valueQuantity":{"value":' + HUGE
        + "}}")
    (tmp_path / "huge-exponent.json").write_text(
        '{"resourceType":"Observation","status":"final","code":{"text":"Hb"},"valueQuantity":{"value":'
        '1E+99999999999999999999}}')
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "deep.xml").write_text('<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
                                       + "<a>" * DEEP + "</a>" * DEEP + "</ClinicalDocument>")
    message = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes().split(b"\r")
    obx = next(i for i, seg in enumerate(message) if seg.startswith(b"OBX") and b"|NM|" in seg)
    fields = message[obx].split(b"|")
    fields[5] = HUGE.encode()
    message[obx] = b"|".join(fields)
    (tmp_path / "huge-number.hl7").write_bytes(b"\r".join(message))
    export = (DATA / "csv" / "cdc-exams-utf8-bom.csv").read_bytes().split(b"\n")
    header = export[0].decode("utf-8-sig").rstrip("\r").split(",")
    row = export[2].split(b",")  # (the exam's white cell count: a number)
    row[header.index("结果")] = HUGE.encode()
    (tmp_path / "huge-number.csv").write_bytes(b"\n".join([export[0], export[1], b",".join(row)]) + b"\n")
    return tmp_path


def gateway(runner, tmp_path: Path, *args: str):
    return runner.invoke(cli, ["--data-dir", str(tmp_path / "gw"), "--issuer-uscc", TONGJIANG, *args])


def no_traceback(result) -> None:
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


# -- validate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deep.json", "deep-array.json"])
def test_validate_deep_json_is_one_error_naming_the_depth(runner, files: Path, name: str) -> None:
    result = gateway(runner, files, "validate", "--compact", str(files / name))
    no_traceback(result)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{files / name}: 1 error, 0 warnings"]
    [issue] = json.loads(result.stdout)["issue"]
    assert issue["severity"] == "error" and "nested too deeply" in issue["diagnostics"]


def test_validate_a_5000_digit_integer_is_out_of_range_and_not_echoed(runner, files: Path) -> None:
    result = gateway(runner, files, "validate", "--compact", str(files / "huge-integer.json"))
    no_traceback(result)
    assert result.exit_code == 1
    [issue] = json.loads(result.stdout)["issue"]
    assert issue["expression"] == ["Observation.valueInteger"]
    assert "(5000 digits) is out of range for integer" in issue["diagnostics"]
    assert len(issue["diagnostics"]) < 200


def test_validate_an_exponent_too_large_for_a_decimal_is_one_error(runner, files: Path) -> None:
    result = gateway(runner, files, "validate", "--compact", str(files / "huge-exponent.json"))
    no_traceback(result)
    assert result.exit_code == 1
    [issue] = json.loads(result.stdout)["issue"]
    assert issue["severity"] == "error" and "exponent is too large" in issue["diagnostics"]


def test_validate_a_5000_digit_decimal_is_answered_in_lines(runner, files: Path) -> None:
    result = gateway(runner, files, "validate", "--compact", str(files / "huge-decimal.json"))
    no_traceback(result)
    assert result.exit_code in (0, 1)
    assert json.loads(result.stdout)["resourceType"] == "OperationOutcome"
    assert HUGE[:300] not in result.stdout + result.stderr


def test_validate_a_binary_file_is_not_utf8_text(runner, files: Path) -> None:
    result = gateway(runner, files, "validate", "--compact", str(files / "binary.bin"))
    no_traceback(result)
    assert result.exit_code == 1
    [issue] = json.loads(result.stdout)["issue"]
    assert "not UTF-8 text" in issue["diagnostics"]


def test_validate_a_missing_file_cannot_be_read_and_the_others_are_still_checked(runner, files: Path) -> None:
    result = gateway(runner, files, "validate", "--compact", str(files / "missing.json"),
                     str(files / "huge-integer.json"))
    no_traceback(result)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{files / 'missing.json'}: 1 error, 0 warnings",
                                          f"{files / 'huge-integer.json'}: 1 error, 0 warnings"]
    texts = [i["diagnostics"] for i in json.loads(result.stdout)["issue"]]
    assert "cannot be read: No such file or directory" in texts[0]


def test_validate_a_directory_is_a_usage_error(runner, files: Path) -> None:
    result = gateway(runner, files, "validate", str(files / "a-directory"))
    no_traceback(result)
    assert result.exit_code == 2 and "is a directory" in result.stderr


# -- convert -----------------------------------------------------------------------------------------------


def test_convert_a_5000_digit_number_names_the_field_and_quotes_a_prefix(runner, files: Path) -> None:
    result = gateway(runner, files, "convert", str(files / "huge-number.hl7"))
    no_traceback(result)
    assert result.exit_code == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "OBX[1]-5" in line and "(5000 characters)" in line and "beyond the range of a number" in line
    assert len(line) < 300


def test_convert_a_5000_digit_number_in_a_csv_export_names_the_row_and_column(runner, files: Path) -> None:
    result = gateway(runner, files, "convert", "--format", "cdc-csv", str(files / "huge-number.csv"))
    no_traceback(result)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert lines == ["体检编号 TJ2024001: row 3 column 结果: result '" + HUGE[:60] + "'… (5000 characters) is beyond the "
                     "range of a number (±1.7e308)"]


def test_convert_deep_xml_is_one_refusal(runner, files: Path) -> None:
    result = gateway(runner, files, "convert", "--format", "cda", str(files / "deep.xml"))
    no_traceback(result)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("document 1: /: not well-formed XML")


def test_convert_deep_json_is_one_refusal(runner, files: Path) -> None:
    result = gateway(runner, files, "convert", "--format", "fhir", str(files / "deep.json"))
    no_traceback(result)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "nested too deeply" in line


@pytest.mark.parametrize("fmt", ["hl7v2", "cda", "cdc-csv"])
def test_convert_a_binary_file_is_refused_in_lines(runner, files: Path, fmt: str) -> None:
    result = gateway(runner, files, "convert", "--format", fmt, str(files / "binary.bin"))
    no_traceback(result)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() and all(len(line) < 400 for line in result.stderr.splitlines())


@pytest.mark.parametrize("name, reason", [("missing.hl7", "No such file or directory"),
                                          ("a-directory", "Is a directory")])
def test_convert_a_file_it_cannot_read_is_one_line(runner, files: Path, name: str, reason: str) -> None:
    result = gateway(runner, files, "convert", str(files / name))
    no_traceback(result)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: {files / name}: cannot read: {reason}"]


# -- anything unexpected -----------------------------------------------------------------------------------


def _broken_convert(*args, **kwargs):
    raise RuntimeError("the text of an internal error, with 张三 in it")


def test_an_unexpected_error_is_one_line_with_a_hint_and_no_detail(runner, files: Path, monkeypatch) -> None:
    monkeypatch.delenv("GATEWAY_DEBUG", raising=False)
    monkeypatch.setattr("gateway.pipeline.Pipeline.convert", _broken_convert)
    result = gateway(runner, files, "convert", str(DATA / "hl7v2" / "lis-v251-utf8.hl7"))
    no_traceback(result)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line == ("Error: internal error (RuntimeError) in `gateway convert`; rerun with GATEWAY_DEBUG=1 to see "
                    "where, and report it")


@pytest.mark.parametrize("value, shows", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_gateway_debug_lets_the_exception_through(runner, files: Path, monkeypatch, value: str, shows: bool) -> None:
    monkeypatch.setenv("GATEWAY_DEBUG", value)
    monkeypatch.setattr("gateway.pipeline.Pipeline.convert", _broken_convert)
    result = gateway(runner, files, "convert", str(DATA / "hl7v2" / "lis-v251-utf8.hl7"))
    assert result.exit_code == 1
    if shows:
        assert isinstance(result.exception, RuntimeError)
    else:
        assert isinstance(result.exception, SystemExit) and "internal error (RuntimeError)" in result.stderr


def test_an_os_error_inside_a_command_is_one_line(runner, files: Path, monkeypatch) -> None:
    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/var/lib/gateway/mappings/hl7v2.yaml")

    monkeypatch.delenv("GATEWAY_DEBUG", raising=False)
    monkeypatch.setattr("gateway.pipeline.Pipeline.convert", unreadable)
    result = gateway(runner, files, "convert", str(DATA / "hl7v2" / "lis-v251-utf8.hl7"))
    no_traceback(result)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["Error: /var/lib/gateway/mappings/hl7v2.yaml: Permission denied"]


# -- the installed command ---------------------------------------------------------------------------------


def test_the_installed_command_prints_lines_not_tracebacks(files: Path) -> None:
    exe = shutil.which("gateway")
    command = [exe] if exe else [sys.executable, "-m", "gateway"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_DATA_DIR=str(files / "gw"), GATEWAY_ISSUER_USCC=TONGJIANG)
    convert = subprocess.run([*command, "convert", str(files / "huge-number.hl7"), str(files / "binary.bin"),
                              str(files / "missing.hl7")], capture_output=True, env=env, timeout=120)
    stderr = convert.stderr.decode("utf-8", "replace")
    assert convert.returncode == 1, stderr
    assert "Traceback" not in stderr and HUGE[:300] not in stderr
    assert "OBX[1]-5" in stderr and f"Error: {files / 'missing.hl7'}: cannot read" in stderr
    validate = subprocess.run([*command, "validate", str(files / "deep.json"), str(files / "huge-integer.json"),
                               str(files / "binary.bin")], capture_output=True, env=env, timeout=120)
    stderr = validate.stderr.decode("utf-8", "replace")
    assert validate.returncode == 1, stderr
    assert "Traceback" not in stderr and "Traceback" not in validate.stdout.decode("utf-8", "replace")
    assert stderr.splitlines() == [f"{files / name}: 1 error, 0 warnings"
                                   for name in ("deep.json", "huge-integer.json", "binary.bin")]


# -- settings and databases that cannot be used: one line naming what, exit 2 for configuration ---------------------


def _gateway(*args: str, env_extra: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str]:
    exe = shutil.which("gateway")
    command = [exe] if exe else [sys.executable, "-m", "gateway"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(env_extra or {})
    done = subprocess.run([*command, *args], capture_output=True, env=env, timeout=120, cwd=cwd)
    return done.returncode, done.stderr.decode("utf-8", "replace")


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_bytes(b"\xff\xfe issuer_uscc = 1\n")
    code, err = _gateway("--config", str(bad), "users", "list")
    assert (code, err.strip()) == (2, f"Error: configuration: --config: config file {bad} is not UTF-8 text "
                                      "(a TOML file is)")
    code, err = _gateway("users", "list", env_extra={"GATEWAY_CONFIG": str(tmp_path / "missing.toml")})
    assert code == 2 and err.strip().startswith("Error: configuration: GATEWAY_CONFIG: config file")


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    notdb = tmp_path / "gateway.db"
    notdb.write_text("exported by mistake\n" * 200)
    for args, status in ((["users", "list"], 1), (["audit", "verify"], 2)):  # (verify: exit 1 says the log is wrong)
        code, err = _gateway("--database", str(notdb), *args)
        assert (code, err.strip()) == (status, f"Error: the database {notdb} cannot be used: file is not a database"), \
            (args, err)


@pytest.mark.parametrize("url", ["postgresql://cyhr gateway@[bad/x", "postgresql://gw@[::1/gw"])
def test_a_database_url_that_cannot_be_read_is_a_configuration_error(tmp_path: Path, url: str) -> None:
    for args in (["users", "list"], ["--database", url, "audit", "verify"]):
        code, err = _gateway(*args, env_extra={"GATEWAY_DATABASE": url})
        assert code == 2 and err.startswith("Error: configuration: database: database URL"), (args, err)
        assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("url", ["postgresql:///cyhr_gateway", "postgresql://gw@h1:5432,h2:5433/gw",
                                 "postgresql:///gw?service=gw", "postgresql://gw@[::1]:5432/gw",
                                 "postgresql://gw@%2Fvar%2Frun%2Fpostgresql/gw"])
def test_database_urls_libpq_reads_are_taken(url: str) -> None:
    """A Unix socket, several hosts for failover, a service name, IPv6: libpq reads them when it connects."""
    from gateway.config import load_settings

    assert load_settings(environ={"GATEWAY_DATABASE": url}).database == url


def test_a_registry_source_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "registry.yaml"
    source.write_bytes("members: []\n# 通江\n".encode("gbk"))
    code, err = _gateway("registry", "check", str(source))
    assert code == 2 and "internal error" not in err and err.count("\n") == 1, err
    assert f"{source}: line 2: not UTF-8 text" in err and "save the file as UTF-8" in err, err


@pytest.mark.parametrize("fmt, data", [("hl7v2", b""), ("hl7v2", b"\r\n\r\n"), ("cda", b"   \n"),
                                       ("cdc-csv", b"\xef\xbb\xbf"), ("hl7v2", b"\xef\xbb\xbf\n")])
def test_convert_a_file_with_nothing_in_it_says_so(runner, tmp_path: Path, fmt: str, data: bytes) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(data)
    result = gateway(runner, tmp_path, "convert", "--format", fmt, str(empty))
    assert result.exit_code == 1, result.output
    assert f"{empty}: no {fmt} message or exam in it" in result.output and "Traceback" not in result.output


def test_convert_a_cda_error_that_lxml_words_on_two_lines_is_one_line(runner, tmp_path: Path) -> None:
    odd = tmp_path / "ebcdic.xml"
    # a CDA document saved in EBCDIC (cp500) by a mainframe export: lxml's error text spans two lines
    odd.write_bytes('<?xml version="1.0" encoding="UTF-8"?><ClinicalDocument xmlns="urn:hl7-org:v3"/>'.encode("cp500"))
    result = gateway(runner, tmp_path, "convert", "--format", "cda", str(odd))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not begin with '<'" in lines[0], result.output  # (refused before lxml reads it)


def test_output_read_by_a_pipe_that_closes_early_is_no_error() -> None:
    """``gateway settings | head -1``: the reader has what it wanted; "Error: Broken pipe" was printed."""
    gateway = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
    done = subprocess.run(f"'{gateway}' settings | head -c 20; '{gateway}' settings --help | head -c 1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("data_dir") and done.stderr == ""


# -- databases: the real cause named, "try again" only for what passes by itself -------------------------------------


def _sqlite_error(kind: str, tmp_path: Path) -> Exception:
    """A real error of SQLite's own, made the way it comes about (run as root, permissions cannot be taken away)."""
    import sqlite3

    if kind == "readonly":
        path = tmp_path / "ro.db"
        sqlite3.connect(path).close()
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        statement = "CREATE TABLE t (a)"
    elif kind == "full":
        conn = sqlite3.connect(":memory:")
        conn.execute("PRAGMA max_page_count = 2")
        conn.execute("CREATE TABLE t (a)")
        statement = "INSERT INTO t VALUES (zeroblob(100000))"
    elif kind == "cantopen":
        try:
            sqlite3.connect(tmp_path / "no" / "such" / "folder.db")
        except sqlite3.Error as exc:
            return exc
        raise AssertionError("no error for cantopen")
    else:
        path = tmp_path / "busy.db"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        conn = sqlite3.connect(path, timeout=0)
        statement = "SELECT * FROM sqlite_master"
    try:
        conn.execute(statement)
    except sqlite3.Error as exc:
        return exc
    raise AssertionError(f"no error for {kind}")


@pytest.mark.parametrize("kind, said, code", [
    ("readonly", "cannot be written (attempt to write a readonly database)", 2),
    ("full", "cannot be written (database or disk is full): free space on the disk where it lives", 1),
    ("cantopen", "cannot be opened (unable to open database file)", 2),
])
def test_a_database_that_cannot_be_used_names_the_file_and_the_cause(runner, tmp_path: Path, monkeypatch,
                                                                     kind: str, said: str, code: int) -> None:
    """Permissions, a read-only file or mount and a full disk do not pass by themselves: not "try again"."""
    database, result = _listed_on_failing_database(runner, tmp_path, monkeypatch, kind)
    no_traceback(result)
    assert result.exit_code == code, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: the database {database} {said}"), line
    assert "try again" not in line and "right now" not in line


def _listed_on_failing_database(runner, tmp_path: Path, monkeypatch, kind: str):
    """(the database, what `messages list` said) when reading it raises the real SQLite error ``kind``."""
    from gateway.store.store import Store

    error = _sqlite_error(kind, tmp_path)
    database = tmp_path / "gw" / "gateway.db"
    Store.open(database).close()

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(Store, "list_messages", fails)
    return database, gateway(runner, tmp_path, "messages", "list")


def test_a_database_locked_by_another_writer_is_worth_trying_again(runner, tmp_path: Path, monkeypatch) -> None:
    database, result = _listed_on_failing_database(runner, tmp_path, monkeypatch, "busy")
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: the database {database} is in use by another process (database is "
                                     "locked); try again")


def test_a_database_error_names_the_database_given_with_db(runner, tmp_path: Path, monkeypatch) -> None:
    import gateway.auth as auth

    error = _sqlite_error("full", tmp_path)
    copy = tmp_path / "copy.db"
    gateway(runner, tmp_path, "users", "add", "li.admin", "--role", "admin", "--db", str(copy))

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(auth, "list_users", fails)
    result = runner.invoke(cli, ["--data-dir", str(tmp_path / "gw"), "users", "list", "--db", str(copy)])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: the database {copy} cannot be written"), \
        result.output


# -- gateway audit verify: exit 1 says the log is wrong; what cannot be read is exit 2 --------------------------------


def _audited_database(tmp_path: Path) -> Path:
    database = tmp_path / "gw" / "gateway.db"
    for name in ("li.admin", "wang.auditor", "zhao.auditor"):
        code, err = _gateway("--data-dir", str(tmp_path / "gw"), "users", "add", name, "--role", "admin")
        assert code == 0, err
    return database


def test_audit_verify_exits_2_when_what_it_is_given_cannot_be_read(tmp_path: Path) -> None:
    database = _audited_database(tmp_path)
    notdb = tmp_path / "exported.db"
    notdb.write_text("exported by mistake\n" * 200)
    held = tmp_path / "held.json"
    held.write_text("{ not json", encoding="utf-8")
    for args, said in ((["--db", str(tmp_path / "none.db")], "no such database"),
                       (["--db", str(notdb)], "file is not a database"),
                       (["--db", str(database), "--checkpoint", str(held)], "not a readable JSON file")):
        code, err = _gateway("audit", "verify", *args)
        assert code == 2 and said in err and err.count("\n") == 1, (args, err)
    code, err = _gateway("audit", "verify", "--db", str(database))
    assert code == 0, err


def test_audit_verify_of_a_damaged_database_is_one_line(tmp_path: Path) -> None:
    """A page of the log written over: one line, not a traceback of a generator closed after its connection."""
    import sqlite3

    database = _audited_database(tmp_path)
    damaged = tmp_path / "damaged.db"
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode = DELETE")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [row[0] for row in conn.execute("SELECT pageno FROM dbstat WHERE name = 'audit_log' AND pagetype = 'leaf'")]
    conn.close()
    data = bytearray(database.read_bytes())
    page = pages[-1]
    data[(page - 1) * page_size:page * page_size] = bytes(page_size)
    damaged.write_bytes(bytes(data))
    code, err = _gateway("audit", "verify", "--db", str(damaged))
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert code == 2 and err == f"Error: the database {damaged} cannot be used: database disk image is malformed\n"


# -- files that are not UTF-8: the file and its line named, exit 2 ------------------------------------------------


def test_a_mapping_table_saved_as_gbk_is_named_with_its_line(runner, tmp_path: Path) -> None:
    from gateway.config import REPO_ROOT

    tables = tmp_path / "mappings"
    shutil.copytree(REPO_ROOT / "mappings", tables)
    table = tables / "concepts" / "lab-items.csv"
    text = table.read_text(encoding="utf-8")
    table.write_bytes(text.encode("gbk"))
    line = next(n for n, row in enumerate(text.splitlines(), 1) if not row.isascii())
    hl7 = DATA / "hl7v2" / "lis-v251-utf8.hl7"
    for command in (["mappings", "check"], ["convert", str(hl7)]):
        result = gateway(runner, tmp_path, "--mappings-dir", str(tables), *command)
        no_traceback(result)
        assert result.exit_code == 2, (command, result.output)
        assert f"{table}: line {line}: not UTF-8 text" in result.stderr and "save the file as UTF-8" in result.stderr
    code, err = _gateway("--data-dir", str(tmp_path / "gw"), "--mappings-dir", str(tables), "serve", "--http-port", "0",
                         "--mllp-port", "0")
    assert code == 2 and f"{table}: line {line}: not UTF-8 text" in err and "Traceback" not in err, err


# -- messages: a database that is not there; what senders wrote, escaped --------------------------------------------


@pytest.mark.parametrize("command", [["messages", "list"], ["messages", "show", "1"], ["messages", "retry", "1"]])
def test_messages_refuse_a_data_dir_that_is_not_there(runner, tmp_path: Path, command: list[str]) -> None:
    typo = tmp_path / "gatway-data"
    result = runner.invoke(cli, ["--data-dir", str(typo), *command])
    assert result.exit_code == 1 and result.stderr.strip() == f"Error: {typo / 'gateway.db'}: no such database"
    assert not typo.exists()


def test_messages_show_what_senders_wrote_with_control_characters_escaped(runner, tmp_path: Path) -> None:
    from gateway.store.store import Store

    store = Store.open(tmp_path / "gw" / "gateway.db")
    record, _ = store.insert_raw(channel="mllp", fmt="hl7v2", sender="LIS\x1b]0;pwned\x07", origin="test",
                                 message_id="ORU\x1b[2J\x1b[31mX\rY\u202e", raw=b"MSH|^~\\&|")
    store.close()
    listed = gateway(runner, tmp_path, "messages", "list")
    shown = gateway(runner, tmp_path, "messages", "show", str(record))
    for result in (listed, shown):
        assert result.exit_code == 0, result.output
        assert not any(c in result.stdout for c in "\x1b\x07\r\u202e"), repr(result.stdout)
        assert "ORU\\x1b[2J\\x1b[31mX\\x0dY\\u202e" in result.stdout
    assert "from LIS\\x1b]0;pwned\\x07 via mllp" in shown.stdout
    raw = gateway(runner, tmp_path, "messages", "show", str(record), "--raw")
    assert raw.stdout_bytes == b"MSH|^~\\&|"  # (--raw: the bytes as received)


def test_a_message_in_another_character_set_than_it_declares_is_recorded_under_its_name(runner, tmp_path) -> None:
    """GBK bytes under a UTF-8 MSH-18 are refused naming MSH-18, as before; the record had no sender or control id
    (its answer named them) and `messages show` said "MSH-18 MSH-18 declares…"."""
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline

    text = ("MSH|^~\\&|LIS|TJXRMYY|||20240601090000||ORU^R01|DECX|P|2.5.1||||||UNICODE UTF-8\r"
            "PID|1||511921198001011237^^^^NNCHN||王^建国||19800101|M\r")
    pipeline = Pipeline(load_settings(overrides={"data_dir": str(tmp_path / "gw")}))
    try:
        [outcome] = pipeline.ingest(text.encode("gbk"), "hl7v2", channel="mllp")
    finally:
        pipeline.close()
    assert outcome.status.value == "refused" and outcome.errors[0].location == "MSH-18"
    listed = gateway(runner, tmp_path, "messages", "list")
    assert "DECX" in listed.stdout, listed.stdout
    shown = gateway(runner, tmp_path, "messages", "show", str(outcome.record_id))
    assert "DECX from LIS|TJXRMYY via mllp" in shown.stdout, shown.stdout
    assert "error: MSH-18 declares 'UNICODE UTF-8'" in shown.stdout and "MSH-18 MSH-18" not in shown.stdout


# -- the start banner with JSON logs --------------------------------------------------------------------------------


def test_with_json_logs_the_start_banner_is_a_json_line(runner, tmp_path: Path, monkeypatch) -> None:
    import gateway.serve

    def started(settings, announce=None):
        announce()
        return 0

    monkeypatch.setattr(gateway.serve, "serve", started)
    result = runner.invoke(cli, ["--data-dir", str(tmp_path / "gw"), "serve", "--mllp-port", "0"],
                           env={"GATEWAY_LOG_FORMAT": "json"})
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # (every one a JSON object)
    [banner] = [line for line in lines if line["message"].startswith("gateway ")]
    assert banner["level"] == "INFO" and banner["logger"] == "gateway.serve" and "MLLP off" in banner["message"]
    text = runner.invoke(cli, ["--data-dir", str(tmp_path / "gw"), "serve", "--mllp-port", "0"])
    assert text.stderr.startswith("gateway ")  # (text logs: the banner as it was)


# -- smaller ones ---------------------------------------------------------------------------------------------------


def test_settings_refuses_a_config_file_that_is_not_there(runner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["--config", str(tmp_path / "nonexistent.toml"), "settings"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: configuration: --config: config file {tmp_path / 'nonexistent.toml'} "
                                     "does not exist")


def test_messages_list_refuses_a_limit_below_one(runner, tmp_path: Path) -> None:
    for limit in ("-1", "0"):
        result = gateway(runner, tmp_path, "messages", "list", "--limit", limit)
        assert result.exit_code == 2 and "Invalid value for '--limit'" in result.stderr


def test_users_passwd_names_a_password_file_it_cannot_read(runner, tmp_path: Path) -> None:
    result = gateway(runner, tmp_path, "users", "passwd", "li.auditor", "--password-file", str(tmp_path / "missing"))
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: --password-file {tmp_path / 'missing'}: cannot read the password (No "
                                     "such file or directory)")


def test_a_bad_value_from_the_environment_names_the_variable(runner, tmp_path: Path) -> None:
    config = runner.invoke(cli, ["settings"], env={"GATEWAY_CONFIG": str(tmp_path)})
    assert config.exit_code == 2
    assert "Invalid value for 'GATEWAY_CONFIG' (environment variable)" in config.stderr
    assert "--config" not in config.stderr.splitlines()[-1]
    database = runner.invoke(cli, ["users", "list"], env={"GATEWAY_DATABASE": str(tmp_path)})
    assert database.exit_code == 2
    assert "Invalid value for 'GATEWAY_DATABASE' (environment variable)" in database.stderr
    flag = runner.invoke(cli, ["users", "list", "--db", str(tmp_path)])
    assert flag.exit_code == 2 and "Invalid value for '--db'" in flag.stderr


@pytest.mark.parametrize("args", [
    ["messages", "show", "99999999999999999999"], ["messages", "retry", "9223372036854775808"],
    ["outbox", "show", "99999999999999999999"], ["outbox", "retry", "99999999999999999999"],
    ["messages", "list", "--limit", "99999999999999999999"], ["outbox", "list", "--limit", "-5"],
    ["outbox", "list", "--limit", "0"],
])
def test_a_number_no_record_can_have_is_a_usage_error_not_an_internal_error(tmp_path, args) -> None:
    """A record number larger than the database's integers was "internal error (OverflowError) … report it"; an
    outbox --limit of -5 listed every row. Refused in one line naming the argument (exit 2)."""
    from click.testing import CliRunner

    from gateway.cli import cli

    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2, (args, result.output)
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert "range" in result.output, result.output
