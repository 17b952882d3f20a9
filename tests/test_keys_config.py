"""Keys and configuration that fail early: encrypted keys with a password file, private files, issuer_uscc.

Each problem is a one-line configuration error and exit 2, at start (``gateway serve``) and in every command
that loads this member's signing identity; ``users add`` follows ``--config``/``GATEWAY_CONFIG``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FULING, TONGJIANG

from gateway.cli import cli
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.signing.issuing import MemberIdentity
from gateway.signing.keys import (
    cert_pem,
    generate_private_key,
    issue_certificate,
    load_signing_identity,
    make_authority,
    private_key_pem,
    uscc_of,
)
from gateway.store.db import connect

CST = _dt.timezone(_dt.timedelta(hours=8))
NOW = _dt.datetime.now(CST)
AUTHORITY = "11500000MB00050043"
SAMPLE = Path(__file__).resolve().parent / "data" / "hl7v2" / "lis-v24-crlf.hl7"


@dataclass
class Files:
    dir: Path
    key: Path
    cert: Path
    password: Path

    def config(self, name: str = "gateway.toml", **settings: str) -> Path:
        values = {
            "data_dir": str(self.dir / "data"),
            "issuer_uscc": TONGJIANG,
            "signing_key": str(self.key),
            "signing_cert": str(self.cert),
            "signing_key_password_file": str(self.password),
            **settings,
        }
        path = self.dir / name
        path.write_text("[gateway]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()), "utf-8")
        return path


@pytest.fixture(scope="module")
def authority():
    key = generate_private_key()
    return key, make_authority(key, AUTHORITY, "川渝联合办公室（测试）", NOW - _dt.timedelta(days=2),
                               NOW + _dt.timedelta(days=365))


def _member_cert(authority, key, uscc: str = TONGJIANG):
    authority_key, authority_cert = authority
    return issue_certificate(key.public_key(), uscc, "通江县人民医院（测试）", authority_key, authority_cert,
                             NOW - _dt.timedelta(days=1), NOW + _dt.timedelta(days=90))


@pytest.fixture
def files(tmp_path: Path, authority) -> Files:
    """A member key made by `gateway keys init --password-file` (encrypted, mode 0600) and its certificate."""
    password = tmp_path / "key-password"
    password.write_text("correct horse battery staple\n", encoding="utf-8")
    password.chmod(0o600)
    made = CliRunner().invoke(cli, ["keys", "init", "--uscc", TONGJIANG, "--name", "通江县人民医院",
                                    "--out", str(tmp_path / "keys"), "--password-file", str(password)])
    assert made.exit_code == 0, made.output
    key_path = tmp_path / "keys" / f"{TONGJIANG}.key.pem"
    assert b"ENCRYPTED" in key_path.read_bytes()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_path.read_bytes(), b"correct horse battery staple")
    cert = tmp_path / "member.cert.pem"
    cert.write_bytes(cert_pem(_member_cert(authority, key)))
    return Files(tmp_path, key_path, cert, password)


def gateway(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def one_config_line(code: int, out: str) -> str:
    """The one line a configuration error gives (exit 2)."""
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: configuration: "), out
    return lines[0]


# -- encrypted keys ----------------------------------------------------------------------------------------------


def test_an_encrypted_key_opens_with_its_password_file(files: Files) -> None:
    settings = load_settings(files.config(), environ={})
    identity = MemberIdentity.from_settings(settings)
    assert identity is not None and identity.uscc == TONGJIANG and uscc_of(identity.chain[0]) == TONGJIANG
    # Every command that signs uses it: an audit checkpoint signed with the configured, encrypted key.
    code, out = gateway("--config", str(files.config()), "audit", "checkpoint")
    assert code == 0, out
    assert out.startswith("checkpoint 1: 0 entries") and f"signed by {TONGJIANG}" in out


def test_a_wrong_or_missing_password_is_one_line(files: Files) -> None:
    wrong = files.dir / "wrong-password"
    wrong.write_text("tr0ub4dor&3\n", encoding="utf-8")
    wrong.chmod(0o600)
    line = one_config_line(*gateway("--config", str(files.config(signing_key_password_file=str(wrong))),
                                    "convert", str(SAMPLE)))
    assert line == (f"Error: configuration: signing_key: {files.key} does not open with the password in {wrong}: "
                    "wrong password, or not a private key")
    line = one_config_line(*gateway("--config", str(files.config(signing_key_password_file="")),
                                    "convert", str(SAMPLE)))
    assert line == (f"Error: configuration: signing_key: {files.key} is encrypted: set signing_key_password_file "
                    "to the file holding its password")
    line = one_config_line(*gateway("--config", str(files.config(signing_key_password_file=str(files.dir / "no"))),
                                    "audit", "checkpoint"))
    assert "signing_key_password_file" in line and "No such file" in line
    empty = files.dir / "empty"
    empty.write_bytes(b"\n")
    empty.chmod(0o600)
    line = one_config_line(*gateway("--config", str(files.config(signing_key_password_file=str(empty))),
                                    "audit", "checkpoint"))
    assert line == f"Error: configuration: signing_key_password_file: {empty} is empty: it must hold the signing " \
                   "key's password"


def test_a_password_for_a_key_that_has_none(files: Files) -> None:
    plain = files.dir / "plain.key.pem"
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(files.key.read_bytes(), b"correct horse battery staple")
    plain.write_bytes(private_key_pem(key))  # type: ignore[arg-type]
    plain.chmod(0o600)
    line = one_config_line(*gateway("--config", str(files.config(signing_key=str(plain))), "convert", str(SAMPLE)))
    assert f"{plain} is not encrypted, but signing_key_password_file {files.password} is set" in line
    settings = load_settings(files.config(signing_key=str(plain), signing_key_password_file=""), environ={})
    assert MemberIdentity.from_settings(settings) is not None


@pytest.mark.slow
def test_serve_signs_with_an_encrypted_key(files: Files) -> None:
    # The HTTP worker opens the encrypted key with the password file and signs an audit checkpoint with it.
    config = files.config()
    code, out = gateway("--config", str(config), "users", "add", "li.admin", "--role", "admin")
    assert code == 0, out
    token = out.strip().splitlines()[-1]
    http = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_CONFIG=str(config), GATEWAY_HTTP_PORT=str(http), GATEWAY_MLLP_PORT="0",
               GATEWAY_WORKERS="1", GATEWAY_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        made = None
        deadline = time.monotonic() + 60
        while made is None and time.monotonic() < deadline and proc.poll() is None:
            request = urllib.request.Request(f"http://127.0.0.1:{http}/audit/checkpoints", data=b"", method="POST",
                                             headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    made = (answer.status, json.loads(answer.read()))
            except OSError:  # not listening yet, or the worker still starting (the port is bound before it)
                time.sleep(0.3)
        assert made is not None, proc.stderr.read().decode() if proc.poll() is not None else "no answer"
        assert made[0] == 201 and made[1]["member"] == TONGJIANG
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


# -- private files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused(files: Files, mode: int) -> None:
    files.key.chmod(mode)
    line = one_config_line(*gateway("--config", str(files.config()), "convert", str(SAMPLE)))
    assert line == (f"Error: configuration: signing_key: {files.key} is open to group or others (mode {mode:04o}); "
                    f"only the gateway's user may read it: chmod 600 {files.key}")


def test_a_password_file_readable_by_others_is_refused(files: Files) -> None:
    files.password.chmod(0o644)
    line = one_config_line(*gateway("--config", str(files.config()), "audit", "checkpoint"))
    assert line.startswith(f"Error: configuration: signing_key_password_file: {files.password} is open to group "
                           "or others (mode 0644)")
    assert line.endswith(f"chmod 600 {files.password}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_refuses_a_readable_key_at_start(files: Files) -> None:
    files.key.chmod(0o644)
    http, mllp = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_CONFIG=str(files.config()), GATEWAY_HTTP_PORT=str(http), GATEWAY_MLLP_PORT=str(mllp))
    done = subprocess.run([sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, timeout=120)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"Error: configuration: signing_key: {files.key} is open to group or others (mode 0644); only the "
        f"gateway's user may read it: chmod 600 {files.key}")
    with socket.socket() as s:  # nothing was left listening
        s.bind(("127.0.0.1", http))


# -- the certificate names this member ---------------------------------------------------------------------------


def test_issuer_uscc_must_be_the_certificates_member(files: Files) -> None:
    line = one_config_line(*gateway("--config", str(files.config(issuer_uscc=FULING)), "convert", str(SAMPLE)))
    assert line == (f"Error: configuration: issuer_uscc: issuer_uscc {FULING} is not the member the signing "
                    f"certificate {files.cert} was issued to ({TONGJIANG}): set issuer_uscc to {TONGJIANG}, or "
                    "configure this member's own key and certificate")


def test_key_and_certificate_must_belong_together(files: Files, authority) -> None:
    other = files.dir / "other.cert.pem"
    other.write_bytes(cert_pem(_member_cert(authority, generate_private_key())))
    line = one_config_line(*gateway("--config", str(files.config(signing_cert=str(other))), "audit", "checkpoint"))
    assert line == f"Error: configuration: signing_key: the key {files.key} does not belong to the certificate {other}"
    line = one_config_line(*gateway("--config", str(files.config(signing_cert="")), "convert", str(SAMPLE)))
    assert line == "Error: configuration: signing_cert: signing_key is set but no signing_cert: set both, or neither"
    line = one_config_line(*gateway("--config", str(files.config(signing_key="")), "convert", str(SAMPLE)))
    assert "signing_cert is set but no signing_key" in line
    junk = files.dir / "junk.pem"
    junk.write_text("not a certificate\n", encoding="utf-8")
    line = one_config_line(*gateway("--config", str(files.config(signing_cert=str(junk))), "convert", str(SAMPLE)))
    assert line == f"Error: configuration: signing_cert: {junk}: not a certificate (PEM or DER expected)"


def test_load_signing_identity_directly(files: Files) -> None:
    member, key, chain = load_signing_identity(files.key, files.cert, password_file=files.password,
                                               issuer_uscc=TONGJIANG)
    assert member == TONGJIANG and chain[0].public_key() == key.public_key()
    with pytest.raises(ConfigError) as caught:
        load_signing_identity(files.key, files.cert, password_file=files.password, issuer_uscc=FULING)
    assert caught.value.location == "issuer_uscc"


# -- users follow the configuration ------------------------------------------------------------------------------


@pytest.fixture
def bare_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_users_add_follows_the_configuration(files: Files, bare_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = files.config()
    # Without a configuration nothing is written to ./gateway-data: the user is told what to give.
    code, out = gateway("users", "add", "li.admin", "--role", "admin")
    assert code == 1
    assert out.strip() == (f"Error: no gateway database at {Path('gateway-data') / 'gateway.db'}: name the gateway's "
                           "configuration (gateway --config FILE users add ..., or GATEWAY_CONFIG) or give --db")
    code, out = gateway("users", "list")
    assert code == 1 and "no such database" in out
    assert list(bare_cwd.iterdir()) == []
    # With --config the account lands in the configured database, where `gateway serve` looks for it.
    code, out = gateway("--config", str(config), "users", "add", "li.admin", "--role", "admin")
    assert code == 0, out
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    code, out = gateway("users", "add", "wang.auditor", "--role", "auditor")
    assert code == 0, out
    code, out = gateway("users", "list")
    assert code == 0 and "li.admin" in out and "wang.auditor" in out
    db = connect(files.dir / "data" / "gateway.db")
    names = [row[0] for row in db.execute("SELECT name FROM gateway_user ORDER BY name")]
    db.conn.close()
    assert names == ["li.admin", "wang.auditor"]
    assert list(bare_cwd.iterdir()) == []
    # --data-dir names a new gateway's database too.
    code, out = gateway("--data-dir", str(bare_cwd / "new"), "users", "add", "zhao", "--role", "admin")
    assert code == 0 and (bare_cwd / "new" / "gateway.db").exists()


def test_decisions_follow_the_configuration(files: Files, bare_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = gateway("decisions", "list")
    assert code == 1 and out.strip() == f"Error: {Path('gateway-data') / 'gateway.db'}: no such database"
    config = files.config(signing_key="", signing_cert="", signing_key_password_file="")
    assert gateway("--config", str(config), "users", "add", "li.admin", "--role", "admin")[0] == 0
    code, out = gateway("--config", str(config), "decisions", "list")
    assert code == 0 and "0 decision(s)" in out
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    code, out = gateway("decisions", "show", "no-such-decision")
    assert code == 1 and "no-such-decision" in out and "no such database" not in out
