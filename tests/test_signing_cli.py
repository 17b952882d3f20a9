"""Signing CLI tests: keys init, registry issue-cert/init-authority, sign and verify on files.

The commands are mounted on a local group the way ``gateway.cli`` mounts them
(``keys``, ``sign``, ``verify`` at the top; ``issue-cert`` and ``init-authority``
under ``registry``). Times are passed with ``--at`` / ``--not-before``.
"""
from __future__ import annotations

import json
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography import x509

from gateway.commands.signing import init_authority, issue_cert, key_dir_allowed, keys, sign, verify
from gateway.config import REPO_ROOT
from gateway.signing import kid_of, load_certificate, load_private_key, uscc_of

DATA = Path(__file__).parent / "data" / "signing"
KEYS = Path(__file__).parent / "data" / "keys"
SICHUAN = "12510121MB00000193"
CHONGQING = "12500000MB00000277"
AUTHORITY_KEY = str(KEYS / "TEST-authority.key.pem")
AUTHORITY_CERT = str(DATA / "authority.cert.pem")
MEMBER_KEY = str(KEYS / "TEST-member-sichuan.key.pem")
MEMBER_CERT = str(DATA / "member-sichuan.cert.pem")
SIGNED = str(DATA / "report-bundle.signed.json")
AT = "2025-06-02T08:00:00+08:00"


@click.group()
def cli() -> None:
    """Stand-in for the gateway command group."""


@cli.group()
def registry() -> None:
    """Stand-in for the registry group."""


cli.add_command(keys)
cli.add_command(sign)
cli.add_command(verify)
registry.add_command(issue_cert)
registry.add_command(init_authority)


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def test_every_command_and_option_has_help(runner: CliRunner) -> None:
    commands: list[tuple[list[str], click.Command]] = [
        (["keys"], keys), (["keys", "init"], keys.commands["init"]), (["keys", "show"], keys.commands["show"]),
        (["sign"], sign), (["verify"], verify), (["registry", "issue-cert"], issue_cert),
        (["registry", "init-authority"], init_authority),
    ]
    for path, command in commands:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path
        assert command.help, path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, (path, param.name)


def test_keys_init_writes_a_private_key_0600_and_a_csr(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "member-keys"
    result = runner.invoke(cli, ["keys", "init", "--uscc", CHONGQING.lower(), "--name", "测试市第一医院", "--out", str(out)])
    assert result.exit_code == 0, result.output
    key_path, csr_path = out / f"{CHONGQING}.key.pem", out / f"{CHONGQING}.csr.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    load_private_key(key_path)
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert "registry authority" in one_line(result.output)
    again = runner.invoke(cli, ["keys", "init", "--uscc", CHONGQING, "--name", "x", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in one_line(again.output)


def test_keys_init_refuses_a_bad_uscc_in_one_line(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["keys", "init", "--uscc", "12510121MB00000190", "--name", "x", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "统一社会信用代码" in one_line(result.output)
    assert list(tmp_path.iterdir()) == []


def test_keys_init_refuses_the_git_checkout(runner: CliRunner) -> None:
    target = REPO_ROOT / "member-keys-must-not-be-created"
    result = runner.invoke(cli, ["keys", "init", "--uscc", SICHUAN, "--name", "x", "--out", str(target)])
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not running from a git checkout")
    assert result.exit_code == 1
    assert "refusing to write a private key inside the git checkout" in one_line(result.output)
    assert not target.exists()


def test_key_directory_rule(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    assert key_dir_allowed(tmp_path / "elsewhere") == (True, None)
    assert key_dir_allowed(checkout / "secrets") == (False, checkout)
    assert key_dir_allowed(checkout) == (False, checkout)
    assert key_dir_allowed(checkout / "certs" / "demo")[0]
    assert key_dir_allowed(checkout / "tests" / "data" / "keys")[0]
    assert key_dir_allowed(checkout / "Demo-Keys")[0]
    assert not key_dir_allowed(checkout / "certs" / "prod")[0]


def test_issue_cert_from_a_csr(runner: CliRunner, tmp_path: Path) -> None:
    runner.invoke(cli, ["keys", "init", "--uscc", CHONGQING, "--name", "测试市第一医院", "--out", str(tmp_path)])
    out = tmp_path / "member.cert.pem"
    authority_key = tmp_path / "TEST-authority.key.pem"  # (git checks it out 0644: the authority's key is refused so)
    authority_key.write_bytes(Path(AUTHORITY_KEY).read_bytes())
    authority_key.chmod(0o600)
    args = ["registry", "issue-cert", str(tmp_path / f"{CHONGQING}.csr.pem"), "--authority-key", str(authority_key),
            "--authority-cert", AUTHORITY_CERT, "--days", "365", "--not-before", "2025-03-01T00:00:00+08:00"]
    result = runner.invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    cert = load_certificate(out)
    assert uscc_of(cert) == CHONGQING
    assert kid_of(cert) in one_line(result.output)
    assert cert.not_valid_after_utc.isoformat() == "2026-02-28T16:00:00+00:00"
    cert.verify_directly_issued_by(load_certificate(AUTHORITY_CERT))
    # never overwritten; the request's USCC must agree; validity must fit the authority's
    assert runner.invoke(cli, [*args, "--out", str(out)]).exit_code == 1
    mismatch = runner.invoke(cli, [*args, "--out", str(tmp_path / "b.pem"), "--uscc", SICHUAN])
    assert mismatch.exit_code == 1 and "is for" in one_line(mismatch.output)
    too_long = runner.invoke(cli, [*args[:-4], "--days", "3650", "--out", str(tmp_path / "c.pem")])
    assert too_long.exit_code == 1 and "within the authority" in one_line(too_long.output)


def test_issue_cert_refuses_what_is_not_a_csr(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["registry", "issue-cert", MEMBER_CERT, "--authority-key", AUTHORITY_KEY,
                                 "--authority-cert", AUTHORITY_CERT, "--days", "30", "--out", str(tmp_path / "x.pem")])
    assert result.exit_code == 1 and "not a PEM certificate request" in one_line(result.output)


def test_sign_reproduces_the_shipped_signed_bundle(runner: CliRunner, tmp_path: Path) -> None:
    args = ["sign", str(DATA / "report-bundle.json"), "--key", MEMBER_KEY, "--cert", MEMBER_CERT,
            "--at", "2025-06-01T10:30:00+08:00"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    signed = json.loads(result.stdout)
    assert signed["signature"]["when"] == "2025-06-01T10:30:00+08:00"
    if signed["signature"]["data"] == json.loads(Path(SIGNED).read_bytes())["signature"]["data"]:
        assert result.stdout == Path(SIGNED).read_text(encoding="utf-8")  # deterministic ECDSA
    out = tmp_path / "signed.json"
    to_file = runner.invoke(cli, [*args, "--out", str(out)])
    assert to_file.exit_code == 0
    assert f"kid {kid_of(load_certificate(MEMBER_CERT))}" in one_line(to_file.output)
    assert runner.invoke(cli, ["verify", str(out), "--trust", AUTHORITY_CERT, "--trust", MEMBER_CERT]).exit_code == 0


def test_sign_refuses_an_expired_certificate_and_a_foreign_key(runner: CliRunner) -> None:
    late = runner.invoke(cli, ["sign", str(DATA / "report-bundle.json"), "--key", MEMBER_KEY, "--cert", MEMBER_CERT,
                               "--at", "2031-01-01T00:00:00+08:00"])
    assert late.exit_code == 2 and "not valid at" in one_line(late.output)  # a configuration problem
    foreign = runner.invoke(cli, ["sign", str(DATA / "report-bundle.json"), "--key", AUTHORITY_KEY,
                                  "--cert", MEMBER_CERT])
    assert foreign.exit_code == 2 and "does not belong" in one_line(foreign.output)
    naive = runner.invoke(cli, ["sign", str(DATA / "report-bundle.json"), "--key", MEMBER_KEY, "--cert", MEMBER_CERT,
                                "--at", "2025-06-01T10:30:00"])
    assert naive.exit_code == 2 and "UTC offset" in naive.output


def test_verify_names_signer_and_kid(runner: CliRunner, tmp_path: Path) -> None:
    both = tmp_path / "trust.pem"
    both.write_bytes(Path(AUTHORITY_CERT).read_bytes() + Path(MEMBER_CERT).read_bytes())
    result = runner.invoke(cli, ["verify", SIGNED, "--trust", str(both), "--at", AT])
    assert result.exit_code == 0, result.output
    line = one_line(result.output)
    assert line.startswith(f"verified: signed by {SICHUAN}") and kid_of(load_certificate(MEMBER_CERT)) in line
    stdin = runner.invoke(cli, ["verify", "-", "--trust", str(both)], input=Path(SIGNED).read_bytes())
    assert stdin.exit_code == 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trust", AUTHORITY_CERT], "not listed"),  # member certificate removed from the trust list
        (["--trust", MEMBER_CERT], "no registry authority"),
        (["--trust", AUTHORITY_CERT, "--trust", MEMBER_CERT, "--at", "2025-06-01T09:00:00+08:00"], "later than"),
    ],
)
def test_verify_fails_with_one_readable_line(runner: CliRunner, args: list[str], expected: str) -> None:
    result = runner.invoke(cli, ["verify", SIGNED, *args])
    assert result.exit_code == 1
    assert expected in one_line(result.output)


def test_verify_tampered_bundle(runner: CliRunner, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.json"
    tampered.write_text(Path(SIGNED).read_text(encoding="utf-8").replace("4.50", "5.40"), encoding="utf-8")
    result = runner.invoke(cli, ["verify", str(tampered), "--trust", AUTHORITY_CERT, "--trust", MEMBER_CERT])
    assert result.exit_code == 1
    assert one_line(result.output) == "Error: Bundle.signature: signature verification failed"
    broken = tmp_path / "broken.json"
    broken.write_text('{"resourceType": "Bundle", "type": "collection", "type": "document"}')
    result = runner.invoke(cli, ["verify", str(broken), "--trust", AUTHORITY_CERT, "--trust", MEMBER_CERT])
    assert result.exit_code == 1 and "duplicate key" in one_line(result.output)


def test_whole_story_on_files(runner: CliRunner, tmp_path: Path) -> None:
    """Authority, member request, certificate, signature, verification, issuer check: all from the CLI."""
    authority_dir, member_dir = tmp_path / "authority", tmp_path / "member"
    start = "2025-01-01T00:00:00+08:00"
    assert runner.invoke(cli, ["registry", "init-authority", "--uscc", "11510000MB00000434", "--name", "测试登记机构",
                               "--out", str(authority_dir), "--not-before", start]).exit_code == 0
    assert stat.S_IMODE((authority_dir / "authority.key.pem").stat().st_mode) == 0o600
    assert runner.invoke(cli, ["keys", "init", "--uscc", CHONGQING, "--name", "测试市第一医院",
                               "--out", str(member_dir)]).exit_code == 0
    cert = tmp_path / "member.cert.pem"
    issued = runner.invoke(cli, ["registry", "issue-cert", str(member_dir / f"{CHONGQING}.csr.pem"),
                                 "--authority-key", str(authority_dir / "authority.key.pem"),
                                 "--authority-cert", str(authority_dir / "authority.cert.pem"),
                                 "--days", "365", "--not-before", start, "--out", str(cert)])
    assert issued.exit_code == 0, issued.output
    shown = runner.invoke(cli, ["keys", "show", str(cert)])
    assert CHONGQING in one_line(shown.output)
    signed = tmp_path / "signed.json"
    member_key = str(member_dir / f"{CHONGQING}.key.pem")
    args = ["sign", str(DATA / "report-bundle.json"), "--key", member_key, "--cert", str(cert), "--chain",
            str(authority_dir / "authority.cert.pem"), "--at", "2025-06-01T10:30:00+08:00", "--out", str(signed)]
    # the report is the Sichuan hospital's: Chongqing's key signs it, saying that no receiver will take it
    made = runner.invoke(cli, args)
    assert made.exit_code == 0 and signed.exists()
    assert "warning: Bundle.entry[" in made.stderr and f"the report was issued by {SICHUAN}" in made.stderr
    trust = ["--trust", str(authority_dir / "authority.cert.pem"), "--trust", str(cert)]
    # The Bundle's report was issued by the Sichuan hospital, so Chongqing's signature is refused ...
    refused = runner.invoke(cli, ["verify", str(signed), *trust, "--at", AT])
    assert refused.exit_code == 1
    assert f"signed by {CHONGQING} but the report was issued by {SICHUAN}" in one_line(refused.output)
    # ... unless the caller only asks about the signature itself.
    accepted = runner.invoke(cli, ["verify", str(signed), *trust, "--at", AT, "--no-issuer-check"])
    assert accepted.exit_code == 0 and CHONGQING in one_line(accepted.output)
