"""Values of settings as a member's administrator writes them: the kind each setting takes, refused in one line naming
the setting when it is another (never converted into something else), log levels in any case, a config file saved
by Windows Notepad (with a byte order mark)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import cli
from gateway.config import load_settings
from gateway.errors import ConfigError


def _config(tmp_path: Path, text: str, *, bom: bool = False) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("line, setting, expected", [
    ("mllp_port = true", "mllp_port", "must be a whole number, not true/false (true)"),
    ("http_port = 27310.5", "http_port", "must be a whole number, not a decimal number (27310.5)"),
    ("workers = [2]", "workers", "must be a whole number, not a list"),
    ('issuer_name = ["通江县人民医院"]', "issuer_name", "must be text in quotes, not a list"),
    ("ack_application = 42", "ack_application", "must be text in quotes, not a number (42)"),
    ("timezone = 08:00:00", "timezone", "must be text in quotes, not a date or time (08:00:00)"),
])
def test_a_value_of_the_wrong_kind_is_refused_naming_the_setting(runner, tmp_path: Path, line: str, setting: str,
                                                                 expected: str) -> None:
    config = _config(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert caught.value.location == setting and f"{setting} {expected}" in caught.value.message
    result = runner.invoke(cli, ["--config", str(config), "settings"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"Error: configuration: {setting}: config file {config}: "
                                                  f"{setting} {expected}"]


def test_values_of_their_own_kind_are_taken(tmp_path: Path) -> None:
    config = _config(tmp_path, 'http_port = 27310\nmllp_port = "2576"\nissuer_name = "通江县人民医院"\n')
    settings = load_settings(config, environ={})
    assert (settings.http_port, settings.mllp_port, settings.issuer_name) == (27310, 2576, "通江县人民医院")


@pytest.mark.parametrize("url", ["mysql://gw@db/gw", "sqlite:///var/lib/gw.db", "https://db.example.org/gw"])
def test_a_database_url_of_another_kind_is_refused(runner, tmp_path: Path, url: str) -> None:
    """Not a SQLite file named ./mysql:/gw@db/gw beside the config file."""
    config = _config(tmp_path, f"database = {json.dumps(url)}\n")
    for given in ([str(config)], None):
        with pytest.raises(ConfigError) as caught:
            if given:
                load_settings(config, environ={})
            else:
                load_settings(environ={"GATEWAY_DATABASE": url})
        assert caught.value.location == "database"
        assert "is neither a SQLite file nor a PostgreSQL URL" in caught.value.message
    result = runner.invoke(cli, ["--config", str(config), "users", "list"])
    assert result.exit_code == 2 and result.stderr.startswith("Error: configuration: database: database ")
    assert not (tmp_path / "mysql:").exists()


@pytest.mark.parametrize("value", ["gw.db", "data/gw.db", "postgresql://gw@db:5432/gw", "postgres://gw@db/gw"])
def test_sqlite_files_and_postgresql_urls_are_still_taken(tmp_path: Path, value: str) -> None:
    config = _config(tmp_path, f"database = {json.dumps(value)}\n")
    settings = load_settings(config, environ={})
    if value.startswith("postgres"):
        assert settings.database_locator == value
    else:
        assert settings.database_locator == tmp_path / value


@pytest.mark.parametrize("written", ["debug", "Warning", "ERROR", " info "])
def test_log_level_is_taken_in_any_case(tmp_path: Path, written: str) -> None:
    assert load_settings(environ={"GATEWAY_LOG_LEVEL": written}).log_level == written.strip().upper()
    config = _config(tmp_path, f'log_level = "{written}"\n')
    assert load_settings(config, environ={}).log_level == written.strip().upper()


def test_serve_starts_with_a_lower_case_log_level(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``GATEWAY_LOG_LEVEL=debug`` stopped `gateway serve` with "internal error (ValueError)"."""
    import gateway.serve

    seen = []
    monkeypatch.setattr(gateway.serve, "serve", lambda settings, announce=None: seen.append(settings.log_level) or 0)
    result = runner.invoke(cli, ["--data-dir", str(tmp_path / "gw"), "serve"], env={"GATEWAY_LOG_LEVEL": "debug"})
    assert result.exit_code == 0 and "internal error" not in result.output, result.output
    assert seen == ["DEBUG"]


@pytest.mark.parametrize("how", ["env", "toml"])
def test_an_unknown_log_level_is_a_configuration_error_for_every_command(runner, tmp_path: Path, how: str) -> None:
    config = _config(tmp_path, 'log_level = "loud"\n')
    args = ["--config", str(config)] if how == "toml" else []
    env = {"GATEWAY_LOG_LEVEL": "loud"} if how == "env" else {}
    for command in (["settings"], ["mappings", "check"], ["serve"]):
        result = runner.invoke(cli, [*args, "--data-dir", str(tmp_path / "gw"), *command], env=env)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip().splitlines() == [
            "Error: configuration: log_level: log_level 'LOUD' is not a logging level: write one of DEBUG, INFO, "
            "WARNING, ERROR (in any case)"], command


def test_a_config_file_with_a_byte_order_mark_is_read(runner, tmp_path: Path) -> None:
    """Windows Notepad saves UTF-8 with a byte order mark: not "invalid TOML at line 1, column 1"."""
    config = _config(tmp_path, '[gateway]\nissuer_name = "通江县人民医院"\nhttp_port = 8081\n', bom=True)
    settings = load_settings(config, environ={})
    assert (settings.issuer_name, settings.http_port) == ("通江县人民医院", 8081)
    assert runner.invoke(cli, ["--config", str(config), "settings"]).exit_code == 0


@pytest.mark.parametrize("text, named", [
    ('data_dir = "/srv/tj"\nhttp_port = 21801\n[gateway]\nissuer_name = "通江县人民医院"\n', "data_dir"),
    ('[gateway]\nissuer_name = "通江县人民医院"\n[gatway]\nsigning_key = "x"\n', "gatway"),
    ('issuer_name = "通江县人民医院"\n[mllp]\nport = 2575\n', "mllp"),
])
def test_settings_outside_the_table_that_holds_them_are_refused_not_dropped(runner, tmp_path: Path, text: str,
                                                                            named: str) -> None:
    """Keys above a [gateway] table were dropped without a word (the gateway then ran on a new database in the
    working folder, under the built-in identity), and so was a table of another name: refused in one line."""
    config = _config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert caught.value.location == named
    result = runner.invoke(cli, ["--config", str(config), "settings"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert named in result.stderr


@pytest.mark.parametrize("url", ["not a url", "ftp://x", "http://a b", "https://gw.example/?q=1", "gw.example"])
def test_a_public_url_that_is_no_http_url_is_refused(url: str) -> None:
    """Every link the gateway answers is made from public_url: "not a url/fhir/DiagnosticReport/…" was served."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={}, overrides={"public_url": url})
    assert caught.value.location == "public_url"
    for fine in ("https://gw.tongjiang.example", "http://127.0.0.1:8081", "https://gw.example/member/"):
        assert load_settings(environ={}, overrides={"public_url": fine}).public_url == fine
