"""The registry authority's edges (an outside tester's findings, files in tests/data/registry-authority/ where they
are needed): a snapshot file that does not verify leaves the stored snapshot in force across restarts; a refused
file is tried again; one key or one endpoint for two members; the authority's key kept private; duplicate keys,
versions out of range or going back; one catalogue code on two items; the messages of unreadable sources."""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CST

from gateway.cli import cli
from gateway.demo.registry import build_demo_registry
from gateway.demo.world import build_world
from gateway.errors import ConfigError
from gateway.registry.holder import SnapshotFile, holder_from_settings
from gateway.serve import background_pass

DATA = Path(__file__).parent / "data" / "registry-authority"
TJ, FL = "12511921MB0001003C", "12500102MB0002006J"


class Clock:
    def __init__(self, now: _dt.datetime) -> None:
        self.now = now

    def __call__(self) -> _dt.datetime:
        return self.now


def _world(tmp_path: Path, member_database, clock: Clock):
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test"}
    return build_world(tmp_path, clock, urls, members=("tongjiang", "fuling"), database=member_database)


# -- 5: a snapshot file that does not verify, at a restart -----------------------------------------------------


def test_a_restart_keeps_the_stored_snapshot_when_the_file_does_not_verify(
        tmp_path, member_database, caplog) -> None:
    """A file tampered in place: the running gateway keeps version 1, and so does every process started after (an
    MLLP child, the background loop, `gateway send`), which refused to start though the database held version 1."""
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    world = _world(tmp_path, member_database, clock)
    ex = world.gateways["tongjiang"].pipeline.exchange
    settings = ex.settings
    path = Path(settings.registry_snapshot)
    path.write_text(path.read_text(encoding="utf-8").replace('"version": 1,', '"version": 7,', 1), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="gateway.registry.holder"):
        holder = holder_from_settings(settings, clock)
    assert holder is not None and holder.current is not None and holder.current.version == 1
    assert any("refused" in r.getMessage() and "version 1 kept in the database stays in force" in r.getMessage()
               for r in caplog.records), caplog.text
    watcher = SnapshotFile(settings, holder, clock)
    assert watcher.refused and "signature" in watcher.refused
    # /health of the restarted process says the file is refused and which version stays in force
    ex.holder, ex.snapshot_file = holder, watcher
    check = world.gateways["tongjiang"].app.test_client().get("/health").get_json()["checks"]["registry"]
    assert not check["ok"] and "was refused" in check["detail"] and "version 1 stays in force" in check["detail"]

    for damage in (b"", b"{\"format\": ", None):  # empty, cut short, missing: the stored snapshot stays too
        if damage is None:
            path.unlink()
        else:
            path.write_bytes(damage)
        again = holder_from_settings(settings, clock)
        assert again is not None and again.current.version == 1 and again.file_refused, damage


def test_a_gateway_with_no_stored_snapshot_still_refuses_a_file_that_does_not_verify(
        tmp_path, member_database) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    world = _world(tmp_path, member_database, clock)
    settings = world.gateways["tongjiang"].pipeline.exchange.settings
    import dataclasses

    fresh = dataclasses.replace(settings, data_dir=str(tmp_path / "fresh"), database="")
    os.makedirs(fresh.data_dir)
    path = Path(settings.registry_snapshot)
    path.write_text(path.read_text(encoding="utf-8").replace('"version": 1,', '"version": 7,', 1), encoding="utf-8")
    with pytest.raises(ConfigError, match="refused"):
        holder_from_settings(fresh, clock)


# -- 6: a snapshot refused as issued in the future is tried again ------------------------------------------------


def test_a_snapshot_issued_ahead_of_this_clock_is_applied_once_its_time_has_come(tmp_path, member_database) -> None:
    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    world = _world(tmp_path, member_database, clock)
    pipeline = world.gateways["tongjiang"].pipeline
    ex = pipeline.exchange
    ahead = build_demo_registry(clock() + _dt.timedelta(hours=1), version=2, reuse=world.registry)
    path = ex.settings.registry_snapshot
    with open(path + ".new", "w", encoding="utf-8") as fh:
        fh.write(ahead.text())
    os.replace(path + ".new", path)
    ex.snapshot_file._checked = 0.0
    assert background_pass(pipeline).get("registry") is None
    assert ex.holder.current.version == 1 and "in the future" in (ex.snapshot_file.refused or "")
    clock.now += _dt.timedelta(hours=2)  # the file is unchanged; its issued time has passed
    ex.snapshot_file._checked = 0.0
    ex.snapshot_file.retry = 0.0  # (a refused file is tried again every minute; no need to wait in a test)
    assert background_pass(pipeline).get("registry") == 1
    assert ex.holder.current.version == 2 and ex.snapshot_file.refused is None


# -- the registry authority's files: an authority, two members with keys and certificates, a source -------------


def _cli(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """init-authority, keys init and issue-cert for 通江 and 涪陵, and the source `registry template` lists them in."""
    d = tmp_path_factory.mktemp("authority-edges")
    _cli("registry", "init-authority", "--uscc", "11500000MB00050043", "--name", "川渝卫生健康联合办公室",
         "--out", d / "authority")
    for uscc, name in ((TJ, "通江县人民医院"), (FL, "重庆市涪陵中心医院")):
        _cli("keys", "init", "--uscc", uscc, "--name", name, "--out", d / "keys")
        _cli("registry", "issue-cert", d / "keys" / f"{uscc}.csr.pem", *_authority(d), "--out", d / f"{uscc}.cert.pem")
    _cli("registry", "template", "--authority-cert", d / "authority" / "authority.cert.pem",
         "--member", d / f"{TJ}.cert.pem", "http://127.0.0.1:30081",
         "--member", d / f"{FL}.cert.pem", "http://127.0.0.1:30082", "--out", d / "registry.yaml")
    return d


def _authority(d: Path) -> list[str]:
    return ["--authority-key", str(d / "authority" / "authority.key.pem"),
            "--authority-cert", str(d / "authority" / "authority.cert.pem")]


def _build(d: Path, source: Path, out: Path, *more: str, ok: bool = True):
    return _cli("registry", "build", source, "--out", out, "--key", d / "authority" / "authority.key.pem",
                "--cert", d / "authority" / "authority.cert.pem", *more, ok=ok)


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip() and "compiled twins" not in line]
    assert len(lines) == 1, result.output
    return lines[0]


# -- 3: the authority's key (and its password file) kept private ----------------------------------------------


def test_the_authority_key_open_to_others_is_refused_by_build_and_issue_cert(pki: Path, tmp_path: Path) -> None:
    key = pki / "authority" / "authority.key.pem"
    try:
        key.chmod(0o644)
        built = _build(pki, pki / "registry.yaml", tmp_path / "snapshot.json", ok=False)
        line = _one_line(built)
        assert built.exit_code == 2 and "--key" in line and str(key) in line and "chmod 600" in line, line
        assert not (tmp_path / "snapshot.json").exists()
        issued = _cli("registry", "issue-cert", pki / "keys" / f"{TJ}.csr.pem", *_authority(pki),
                      "--out", tmp_path / "tj.pem", ok=False)
        line = _one_line(issued)
        assert issued.exit_code == 2 and "--authority-key" in line and "chmod 600" in line, line
        assert not (tmp_path / "tj.pem").exists()
    finally:
        key.chmod(0o600)
    _build(pki, pki / "registry.yaml", tmp_path / "snapshot.json")


def test_the_authority_key_password_file_open_to_others_is_refused(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("correct horse battery\n", encoding="utf-8")
    password.chmod(0o600)
    _cli("registry", "init-authority", "--uscc", "11500000MB00050043", "--name", "川渝卫生健康联合办公室",
         "--out", tmp_path / "authority", "--password-file", password)
    _cli("keys", "init", "--uscc", TJ, "--name", "通江县人民医院", "--out", tmp_path / "keys")
    args = ["registry", "issue-cert", tmp_path / "keys" / f"{TJ}.csr.pem", *_authority(tmp_path),
            "--authority-key-password-file", password, "--out", tmp_path / "tj.pem"]
    password.chmod(0o644)
    refused = _cli(*args, ok=False)
    line = _one_line(refused)
    assert refused.exit_code == 2 and "--authority-key-password-file" in line and "chmod 600" in line, line
    assert "correct horse" not in refused.output
    password.chmod(0o600)
    _cli(*args)
    _cli("registry", "template", "--authority-cert", tmp_path / "authority" / "authority.cert.pem",
         "--member", tmp_path / "tj.pem", "http://127.0.0.1:30081", "--out", tmp_path / "registry.yaml")
    build = ["registry", "build", tmp_path / "registry.yaml", "--out", tmp_path / "snapshot.json",
             "--key", tmp_path / "authority" / "authority.key.pem",
             "--cert", tmp_path / "authority" / "authority.cert.pem", "--key-password-file", password]
    password.chmod(0o640)
    refused = _cli(*build, ok=False)
    line = _one_line(refused)
    assert refused.exit_code == 2 and "--key-password-file" in line and "chmod 600" in line, line
    password.chmod(0o600)
    _cli(*build)


# -- 8 and 7: a version does not go back, and stays one a gateway can keep --------------------------------------


def test_build_refuses_to_write_a_lower_version_over_a_higher_one(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "snapshot.json"
    _build(pki, pki / "registry.yaml", out, "--version", "3")
    held = out.read_bytes()
    lower = _build(pki, pki / "registry.yaml", out, "--version", "2", ok=False)
    line = _one_line(lower)
    assert lower.exit_code == 2 and "version 3" in line and "version 2" in line, line
    assert out.read_bytes() == held
    _build(pki, pki / "registry.yaml", out, "--version", "4")
    assert json.loads(out.read_text(encoding="utf-8"))["version"] == 4


def test_a_version_past_what_a_gateway_keeps_is_refused(pki: Path, tmp_path: Path) -> None:
    out = tmp_path / "snapshot.json"
    huge = _build(pki, pki / "registry.yaml", out, "--version", "99999999999999999999999", ok=False)
    assert huge.exit_code == 2 and "2147483647" in huge.output and not out.exists(), huge.output
    _build(pki, pki / "registry.yaml", out, "--version", "2147483647")
    source = tmp_path / "registry.yaml"
    text = (pki / "registry.yaml").read_text(encoding="utf-8")
    source.write_text(text.replace("version: 1\n", "version: 2147483648\n", 1), encoding="utf-8")
    refused = _build(pki, source, tmp_path / "other.json", ok=False)
    line = _one_line(refused)
    assert refused.exit_code == 2 and "2147483648" in line and "2147483647" in line, line
    # a snapshot signed with such a version (the tester's, built before) is refused when verified or loaded
    verified = _cli("registry", "verify", DATA / "snapshot-version-huge.json", "--authority",
                    DATA / "authority.cert.pem", "--at", "2026-12-09T00:00:00+08:00", ok=False)
    line = _one_line(verified)
    assert verified.exit_code == 2 and "out of range" in line and "2147483647" in line, line


# -- 11: messages name the file ----------------------------------------------------------------------------------


def test_a_snapshot_with_a_byte_order_mark_is_refused_naming_the_file() -> None:
    for command in ("verify", "show"):
        result = _cli("registry", command, DATA / "snapshot-bom.json", "--authority", DATA / "authority.cert.pem",
                      "--at", "2026-12-09T00:00:00+08:00", ok=False)
        line = _one_line(result)
        assert result.exit_code != 0 and "snapshot-bom.json" in line and "byte order mark" in line, line


# -- 10: a renewed member certificate: the old one stays listed, with its valid_to -------------------------------


def test_a_renewed_certificate_kept_listed_with_its_valid_to_keeps_earlier_signatures_verifiable(
        pki: Path, tmp_path: Path) -> None:
    """README step 11 said a later snapshot drops the old certificate: every report signed with it then fails
    调阅 verification. Listed on with a valid_to (the day of the change-over), it verifies what was signed before,
    and nothing signed after."""
    from gateway.commands.common import now_cst
    from gateway.errors import UnknownIssuer
    from gateway.registry.models import china_date
    from gateway.registry.snapshot import verify_snapshot
    from gateway.signing.jws import sign_bundle, signer_reference, verify_bundle
    from gateway.signing.keys import load_certificate, load_certificates, load_private_key

    new_keys = tmp_path / "keys-2027"
    _cli("keys", "init", "--uscc", TJ, "--name", "通江县人民医院", "--out", new_keys)
    _cli("registry", "issue-cert", new_keys / f"{TJ}.csr.pem", *_authority(pki), "--out", tmp_path / "tj-2027.pem")
    old_key = load_private_key(str(pki / "keys" / f"{TJ}.key.pem"))
    old_cert = load_certificate(str(pki / f"{TJ}.cert.pem"))
    now = now_cst()
    bundle = json.loads((Path(__file__).parent / "data" / "registry" / "bundle-lab-tongjiang.json").read_text(
        encoding="utf-8"))
    signed = sign_bundle(bundle, old_key, [old_cert], who=signer_reference(old_cert), when=now)
    text = json.dumps(signed, ensure_ascii=False)
    changeover = china_date(now).isoformat()
    source = (pki / "registry.yaml").read_text(encoding="utf-8")
    old_entry = f'      - path: "{pki / f"{TJ}.cert.pem"}"\n'
    assert old_entry in source
    kept = source.replace("version: 1\n", "version: 2\n", 1).replace(
        old_entry, f'{old_entry}        valid_to: "{changeover}"\n      - path: "{tmp_path / "tj-2027.pem"}"\n', 1)
    dropped = source.replace("version: 1\n", "version: 3\n", 1).replace(
        old_entry, f'      - path: "{tmp_path / "tj-2027.pem"}"\n', 1)
    authority = load_certificates(str(pki / "authority" / "authority.cert.pem"))
    later = now + _dt.timedelta(days=3)
    for name, text_of_source, verifies in (("kept", kept, True), ("dropped", dropped, False)):
        (tmp_path / f"{name}.yaml").write_text(text_of_source, encoding="utf-8")
        _cli("registry", "check", tmp_path / f"{name}.yaml")
        _build(pki, tmp_path / f"{name}.yaml", tmp_path / f"{name}.json")
        snapshot = verify_snapshot((tmp_path / f"{name}.json").read_bytes(), authority, later)
        if verifies:
            assert verify_bundle(text, snapshot, at=later).signer_uscc == TJ
            # a signature made with the old key after its listing ended is refused
            after = sign_bundle(bundle, old_key, [old_cert], who=signer_reference(old_cert),
                                when=now + _dt.timedelta(days=2))
            with pytest.raises(UnknownIssuer):
                verify_bundle(json.dumps(after, ensure_ascii=False), snapshot, at=later)
        else:
            with pytest.raises(UnknownIssuer):
                verify_bundle(text, snapshot, at=later)


# -- 1: one public key certified for two members -----------------------------------------------------------------


def test_one_public_key_certified_for_two_members_is_refused_by_check_and_build(pki: Path, tmp_path: Path) -> None:
    """A CSR signed with 通江's key naming 涪陵's USCC is certified (the authority cannot know whose key it is);
    listed under 涪陵 beside 通江's own, 通江's key would sign as 涪陵: check and build refuse it."""
    from cryptography.hazmat.primitives import serialization

    from gateway.signing.keys import load_private_key, make_csr

    tj_key = load_private_key(str(pki / "keys" / f"{TJ}.key.pem"))
    csr = tmp_path / "fl-with-tj-key.csr.pem"
    csr.write_bytes(make_csr(tj_key, FL, "重庆市涪陵中心医院").public_bytes(serialization.Encoding.PEM))
    _cli("registry", "issue-cert", csr, *_authority(pki), "--out", tmp_path / "fl-with-tj-key.pem")
    source = tmp_path / "registry.yaml"
    fl_entry = f'      - path: "{pki / f"{FL}.cert.pem"}"\n'
    text = (pki / "registry.yaml").read_text(encoding="utf-8")
    assert fl_entry in text
    source.write_text(text.replace(fl_entry, f'{fl_entry}      - path: "{tmp_path / "fl-with-tj-key.pem"}"\n', 1),
                      encoding="utf-8")
    for result in (_cli("registry", "check", source, ok=False),
                   _build(pki, source, tmp_path / "snapshot.json", ok=False)):
        line = _one_line(result)
        assert result.exit_code == 2, result.output
        assert "members[1].certificates[1]" in line and "members[0].certificates[0]" in line, line
        assert FL in line and TJ in line and "重庆市涪陵中心医院" in line and "通江县人民医院" in line, line
        assert "same public key" in line, line
    assert not (tmp_path / "snapshot.json").exists()


# -- 2: one endpoint for two members -------------------------------------------------------------------------------


@pytest.mark.parametrize("second", ["http://127.0.0.1:30081", "http://127.0.0.1:30081/", "http://127.0.0.1:30081/fhir",
                                    "http://127.0.0.1:30081/fhir/"])
def test_two_members_with_one_endpoint_are_refused(pki: Path, tmp_path: Path, second: str) -> None:
    text = (pki / "registry.yaml").read_text(encoding="utf-8")
    assert '"http://127.0.0.1:30082"' in text
    source = tmp_path / "registry.yaml"
    source.write_text(text.replace('"http://127.0.0.1:30082"', json.dumps(second), 1), encoding="utf-8")
    for result in (_cli("registry", "check", source, ok=False),
                   _build(pki, source, tmp_path / "snapshot.json", ok=False)):
        line = _one_line(result)
        assert result.exit_code == 2, result.output
        assert "members[1].endpoint" in line and "members[0].endpoint" in line and TJ in line and FL in line, line


def test_the_default_port_names_the_same_endpoint(pki: Path, tmp_path: Path) -> None:
    text = (pki / "registry.yaml").read_text(encoding="utf-8")
    source = tmp_path / "registry.yaml"
    source.write_text(text.replace('"http://127.0.0.1:30081"', '"https://gw.example.cn"', 1).replace(
        '"http://127.0.0.1:30082"', '"https://GW.example.cn:443/"', 1), encoding="utf-8")
    result = _cli("registry", "check", source, ok=False)
    assert result.exit_code == 2 and "members[1].endpoint" in result.output, result.output
    # another port or another path is another gateway
    source.write_text(text.replace('"http://127.0.0.1:30082"', '"http://127.0.0.1:30083"', 1), encoding="utf-8")
    _cli("registry", "check", source)


# -- 4: a key given twice in the source ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, key, lines", [
    ("source-dupkey.yaml", "eqa", "line 20 and line 42"),
    ("source-dupkey2.yaml", "certificates", "line 18 and line 19"),
    ("source-dupkey.json", "version", "line 1 (columns 38 and 52)"),
])
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(name: str, key: str, lines: str) -> None:
    result = _cli("registry", "check", DATA / name, ok=False)
    line = _one_line(result)
    assert result.exit_code == 2 and f"key '{key}' is given twice" in line and lines in line, line


def test_keys_a_yaml_merge_brings_in_may_be_overridden(tmp_path: Path) -> None:
    from gateway.registry.source import read_source_data

    source = tmp_path / "merge.yaml"
    source.write_text("base: &b {uscc: a, name: b}\nmember:\n  <<: *b\n  uscc: c\n", encoding="utf-8")
    assert read_source_data(source)["member"] == {"uscc": "c", "name": "b"}
    source.write_text("member:\n  uscc: a\n  name: b\n  uscc: c\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'uscc' is given twice in one mapping on line 2 and line 4"):
        read_source_data(source)


# -- 9: one code on two items of one catalogue -----------------------------------------------------------------


def test_a_code_on_two_items_of_one_catalogue_is_refused_naming_both(pki: Path, tmp_path: Path) -> None:
    text = (pki / "registry.yaml").read_text(encoding="utf-8")
    item = "      - {code: EX-L001, display: 血红蛋白, class: lab, loinc: [718-7], window_days: 7}\n"
    assert item in text
    source = tmp_path / "registry.yaml"
    second = "      - {code: EX-L002, display: 血红蛋白（复查）, class: lab, loinc: [718-7], window_days: 30}\n"
    source.write_text(text.replace(item, item + second, 1), encoding="utf-8")
    result = _cli("registry", "check", source, ok=False)
    line = _one_line(result)
    assert result.exit_code == 2 and "catalogues[0].items[1].loinc[0]" in line, line
    assert "LOINC 718-7" in line and "EX-L001" in line and "EX-L002" in line and "'example'" in line, line
    # the same code in another catalogue is another catalogue's item (a chuanyu and an alliance catalogue)
    other = text + ("  - id: example-2\n    name: 另一目录\n    version: \"0\"\n    scope: {type: chuanyu}\n"
                    "    mark: 川渝HR\n    valid_from: \"2026-01-01\"\n    items:\n"
                    "      - {code: EX-L001, display: 血红蛋白, class: lab, loinc: [718-7], window_days: 3}\n")
    source.write_text(other, encoding="utf-8")
    _cli("registry", "check", source)


# -- 11 and 7: what a source that cannot be read says -------------------------------------------------------------


def test_a_yaml_syntax_error_names_the_file_in_one_line(pki: Path, tmp_path: Path) -> None:
    source = tmp_path / "broken.yaml"
    source.write_text((pki / "registry.yaml").read_text(encoding="utf-8") + "eqa: [\n", encoding="utf-8")
    result = _cli("registry", "check", source, ok=False)
    line = _one_line(result)
    assert result.exit_code == 2 and "<unicode string>" not in line and f'"{source}", line' in line, line


def test_a_utf16_source_is_said_to_be_utf16() -> None:
    result = _cli("registry", "check", DATA / "source-u16.yaml", ok=False)
    line = _one_line(result)
    assert result.exit_code == 2 and "UTF-16" in line and "iconv -f utf-16 -t utf-8" in line, line
    assert "GBK" not in line and "gbk" not in line, line


def test_check_refuses_a_source_version_no_gateway_can_keep(pki: Path, tmp_path: Path) -> None:
    source = tmp_path / "registry.yaml"
    text = (pki / "registry.yaml").read_text(encoding="utf-8")
    source.write_text(text.replace("version: 1\n", "version: 99999999999999999999999\n", 1), encoding="utf-8")
    result = _cli("registry", "check", source, ok=False)
    line = _one_line(result)
    assert result.exit_code == 2 and "version: 99999999999999999999999" in line and "2147483647" in line, line
