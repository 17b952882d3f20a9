"""`gateway demo --dir D` may be run again on its own folder, and never deletes what it did not make."""
from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.demo import MEMBERS, _prepare_folder


def test_a_new_or_empty_folder_is_used_as_it_is(tmp_path: Path) -> None:
    said: list[str] = []
    _prepare_folder(tmp_path / "new", said.append)
    _prepare_folder(tmp_path, said.append)
    assert said == []


def test_an_earlier_demo_is_replaced(tmp_path: Path) -> None:
    (tmp_path / ".gateway-demo").write_text("x", encoding="utf-8")
    for name in (*MEMBERS, "registry", "schealth", "yuan"):  # the authority's and 渝安's gateways too
        (tmp_path / name / "data").mkdir(parents=True)
        (tmp_path / name / "data" / "gateway.db").write_bytes(b"old")
    said: list[str] = []
    _prepare_folder(tmp_path, said.append)
    assert said == [f"replacing the earlier demo in {tmp_path}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gateway-demo"]


def test_a_folder_with_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(click.ClickException, match="not empty and holds no earlier demo"):
        _prepare_folder(tmp_path, print)
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "holds no earlier demo" in result.output and "Traceback" not in result.output
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
