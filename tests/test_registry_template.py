"""The registry authority's path from nothing to a snapshot: init-authority, issue-cert (a default validity),
``gateway registry template`` listing members with their certificates and endpoints, ``build --version``; and the
endpoint form a registry may list (the gateway's base URL, or its FHIR base ``…/fhir``)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.demo.registry import build_demo_registry
from gateway.exchange.service import Exchange
from gateway.registry.source import RegistrySourceError, load_source
from gateway.signing.keys import load_certificate

TJ, FL = "12511921MB0001003C", "12500102MB0002006J"
CST = _dt.timezone(_dt.timedelta(hours=8))


def invoke(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture()
def authority_and_members(runner: CliRunner, tmp_path: Path) -> Path:
    invoke(runner, "registry", "init-authority", "--uscc", "11500000MB00050043", "--name", "川渝卫生健康联合办公室",
           "--out", str(tmp_path / "authority"))
    for uscc, name in ((TJ, "通江县人民医院"), (FL, "重庆市涪陵中心医院")):
        invoke(runner, "keys", "init", "--uscc", uscc, "--name", name, "--out", str(tmp_path / "keys"))
        invoke(runner, "registry", "issue-cert", str(tmp_path / "keys" / f"{uscc}.csr.pem"),
               "--authority-key", str(tmp_path / "authority" / "authority.key.pem"),
               "--authority-cert", str(tmp_path / "authority" / "authority.cert.pem"),
               "--out", str(tmp_path / f"{uscc}.cert.pem"))
    return tmp_path


def test_issue_cert_without_days_is_valid_for_a_year(authority_and_members: Path) -> None:
    cert = load_certificate(str(authority_and_members / f"{TJ}.cert.pem"))
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 365


def test_template_lists_members_and_builds(runner: CliRunner, authority_and_members: Path) -> None:
    tmp = authority_and_members
    source = tmp / "registry.yaml"
    invoke(runner, "registry", "template", "--authority-cert", str(tmp / "authority" / "authority.cert.pem"),
           "--member", str(tmp / f"{TJ}.cert.pem"), "http://127.0.0.1:8081/",
           "--member", str(tmp / f"{FL}.cert.pem"), "https://fuling.example.cn/fhir", "--out", str(source))
    body = load_source(source).body  # the ordinary checks pass as written
    # the comment beside each member's kind lists every kind the schema allows
    assert "kind: hospital    # hospital, cdc, independent-lab, exam-centre, primary-care or technical-service" in \
        source.read_text(encoding="utf-8")
    members = {m["uscc"]: m for m in body["members"]}
    assert members[TJ]["endpoint"] == "http://127.0.0.1:8081" and members[TJ]["name"] == "通江县人民医院"
    assert members[TJ]["division"] == "511921" and members[FL]["division"] == "500102"
    assert members[FL]["certificates"][0]["pem"] == (tmp / f"{FL}.cert.pem").read_text()
    assert body["authority"]["uscc"] == "11500000MB00050043"

    printed = invoke(runner, "registry", "template", "--authority-cert", str(tmp / "authority" / "authority.cert.pem"))
    assert printed.startswith("# Registry source") and "members: []" in printed

    # run again over the source the authority has edited since: refused, the edits kept
    edited = source.read_text(encoding="utf-8") + "# catalogues added by the authority\n"
    source.write_text(edited, encoding="utf-8")
    authority = str(tmp / "authority" / "authority.cert.pem")
    again = runner.invoke(cli, ["registry", "template", "--authority-cert", authority,
                                "--member", str(tmp / f"{TJ}.cert.pem"), "http://127.0.0.1:8081", "--out", str(source)])
    assert again.exit_code == 1 and "already exists; not overwritten" in again.output
    assert source.read_text(encoding="utf-8") == edited
    forced = runner.invoke(cli, ["registry", "template", "--authority-cert", authority,
                                 "--member", str(tmp / f"{TJ}.cert.pem"), "http://127.0.0.1:8081", "--out", str(source),
                                 "--force"])
    assert forced.exit_code == 0 and "catalogues added" not in source.read_text(encoding="utf-8")
    invoke(runner, "registry", "template", "--authority-cert", str(tmp / "authority" / "authority.cert.pem"),
           "--member", str(tmp / f"{TJ}.cert.pem"), "http://127.0.0.1:8081/",
           "--member", str(tmp / f"{FL}.cert.pem"), "https://fuling.example.cn/fhir", "--out", str(source), "--force")

    out = tmp / "snapshot.json"
    text = invoke(runner, "registry", "build", str(source), "--out", str(out), "--version", "3",
                  "--key", str(tmp / "authority" / "authority.key.pem"),
                  "--cert", str(tmp / "authority" / "authority.cert.pem"))
    assert "version 3" in text and json.loads(out.read_text())["version"] == 3


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8081", "http://gw.example.cn/?a=1", "ftp://gw.example.cn"])
def test_template_refuses_an_endpoint_that_is_not_a_base_url(runner: CliRunner, authority_and_members: Path,
                                                             endpoint: str) -> None:
    tmp = authority_and_members
    authority = str(tmp / "authority" / "authority.cert.pem")
    result = runner.invoke(cli, ["registry", "template", "--authority-cert", authority,
                                 "--member", str(tmp / f"{TJ}.cert.pem"), endpoint])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "must be the gateway's base URL" in result.output


def test_source_refuses_an_exchange_url_as_endpoint(authority_and_members: Path) -> None:
    tmp = authority_and_members
    source = tmp / "registry.yaml"
    CliRunner().invoke(cli, ["registry", "template", "--authority-cert", str(tmp / "authority" / "authority.cert.pem"),
                             "--member", str(tmp / f"{TJ}.cert.pem"), "http://127.0.0.1:8081", "--out", str(source)])
    source.write_text(source.read_text().replace('"http://127.0.0.1:8081"',
                                                 '"http://127.0.0.1:8081/exchange/bundles"'))
    with pytest.raises(RegistrySourceError) as caught:
        load_source(source)
    assert [i.location for i in caught.value.issues()] == ["members[0].endpoint"]


def test_a_fhir_base_endpoint_names_the_same_gateway() -> None:
    now = _dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
    for listed in ("https://tongjiang.example.cn/fhir", "https://tongjiang.example.cn/fhir/",
                   "https://tongjiang.example.cn", "https://tongjiang.example.cn/"):
        snapshot = build_demo_registry(now, endpoints={TJ: listed}).snapshot(now)
        exchange = SimpleNamespace(_snapshot=lambda snapshot=snapshot: snapshot, clock=lambda: now)
        assert Exchange.endpoint_of(exchange, TJ) == "https://tongjiang.example.cn/exchange/bundles"
