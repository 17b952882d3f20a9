"""Relative paths in a config file are relative to the file, not to wherever a command happens to run."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import PATH_SETTINGS, load_settings


def test_relative_paths_in_a_config_file_are_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    member = tmp_path / "member"
    member.mkdir()
    config = member / "gateway.toml"
    config.write_text('data_dir = "data"\nsigning_key = "keys/m.key.pem"\nregistry_snapshot = "../snapshot.json"\n'
                      'signing_cert = "/etc/gateway/m.pem"\nissuer_name = "data"\n', encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(config, environ={})
    assert s.data_dir == str(member / "data")
    assert s.database_locator == member / "data" / "gateway.db"
    assert s.signing_key == str(member / "keys" / "m.key.pem")
    assert Path(s.registry_snapshot).resolve() == tmp_path / "snapshot.json"
    assert s.signing_cert == "/etc/gateway/m.pem"  # absolute stays as written
    assert s.issuer_name == "data"  # not a path setting


def test_environment_and_flags_stay_relative_to_the_current_directory(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('data_dir = "data"\n', encoding="utf-8")
    s = load_settings(config, environ={"GATEWAY_DATA_DIR": "here"})
    assert s.data_dir == "here"
    s = load_settings(config, overrides={"data_dir": "there"}, environ={})
    assert s.data_dir == "there"


def test_every_path_setting_exists() -> None:
    from dataclasses import fields

    from gateway.config import Settings

    names = {f.name for f in fields(Settings)}
    assert PATH_SETTINGS <= names


def test_public_url_given_as_the_fhir_base_is_the_gateway_base() -> None:
    from gateway.config import Settings

    for given in ("https://gw.tongjiang.example", "https://gw.tongjiang.example/", "https://gw.tongjiang.example/fhir",
                  "https://gw.tongjiang.example/fhir/"):
        assert Settings(public_url=given).base_url == "https://gw.tongjiang.example", given
    assert Settings(public_url="https://gw.example/gateway").base_url == "https://gw.example/gateway"
