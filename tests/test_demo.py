"""gateway demo: the embedded story runs end to end and says what happened."""
from __future__ import annotations

from pathlib import Path

from gateway.cli import cli
from gateway.demo import run_demo


def test_demo_figures(tmp_path: Path) -> None:
    lines: list[str] = []
    figures = run_demo(str(tmp_path / "demo"), echo=lines.append)
    # 通江: blood count stored, QC filtered, '高' in a numeric field and a bad 身份证号 refused;
    # 涪陵: GBK blood count stored, an ADT message rejected as unsupported.
    assert figures["acks"] == {"TJ2611200001": "AA", "9001": "AA", "TJ2611200002": "AE", "TJ2611200003": "AE",
                               "LIS20261121000731": "AA", "HIS20261121004411": "AR"}
    assert (figures["stored"], figures["refused"], figures["filtered"]) == (2, 3, 1)
    assert figures["search_total"] == 1
    text = "\n".join(lines)
    assert "OBX[2]-5 '高' is not a number for value type NM" in text
    assert "身份证号 check digit is '2', expected '1'" in text
    assert (tmp_path / "demo" / "tongjiang" / "gateway.db").exists()


def test_demo_command_cleans_up_its_temporary_directory(runner) -> None:
    result = runner.invoke(cli, ["demo"])
    assert result.exit_code == 0, result.output
    assert "summary: 2 stored, 3 refused with reasons, 1 filtered (QC)" in result.stdout
    workdir = next(line for line in result.stdout.splitlines() if line.startswith("working directory: "))
    assert not Path(workdir.split(": ", 1)[1]).exists()
