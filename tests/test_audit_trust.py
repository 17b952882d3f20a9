"""`gateway audit verify` checks checkpoint signatures with the gateway's configured trust, without flags.

The trust is the registry authority (``registry_authority``), the member certificates of the registry
snapshot (``registry_snapshot``) and this member's certificate (``signing_cert``); ``--trust`` adds more.
Forged checkpoints are named and the exit is 1; with no trust at all the checkpoints cannot be vouched for
(exit 3); a genuine checkpoint checked with only the authority's certificate verifies.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FULING, TONGJIANG
from test_audit_support import Pki, locator
from test_audit_verify import rehash_from, tamper

from gateway.audit import checkpoint as cp
from gateway.audit import records as r
from gateway.audit.log import append
from gateway.cli import cli
from gateway.demo.registry import build_demo_registry
from gateway.signing.keys import cert_pem, private_key_pem
from gateway.store.db import connect

CST = _dt.timezone(_dt.timedelta(hours=8))
#: When the snapshot was issued and the checkpoints made: long enough ago that the snapshot has expired
#: since (it still vouches for what it listed then).
ISSUED = _dt.datetime(2026, 5, 1, 9, 0, tzinfo=CST)
ME = r.Party.member(TONGJIANG, "通江县人民医院")


@dataclass
class Member:
    """One member's files: authority, snapshot, key and certificate, a database with checkpoints."""

    dir: Path
    authority: Path
    snapshot: Path
    key: Path
    cert: Path
    db: Path | str
    registry: object

    def config(self, name: str = "gateway.toml", **settings: str) -> Path:
        """A gateway.toml for this member; ``settings`` replace or (when "") empty the defaults."""
        values = {
            "data_dir": str(self.dir / "data"),
            "issuer_uscc": TONGJIANG,
            "registry_authority": str(self.authority),
            "registry_snapshot": str(self.snapshot),
            "signing_key": str(self.key),
            "signing_cert": str(self.cert),
            **({"database": self.db} if isinstance(self.db, str) else {}),  # PostgreSQL: its URL
            **settings,
        }
        path = self.dir / name
        path.write_text("[gateway]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()), "utf-8")
        return path


def _entries(db, start: int, stop: int) -> None:
    for i in range(start, stop):
        at = ISSUED + _dt.timedelta(minutes=i)
        peer = r.Party.member(FULING)
        append(db, r.exchange("received", at=at, gateway=ME, peer=peer, bundle_hash=f"sha256:{i:064x}"))


@pytest.fixture(scope="module")
def registry():
    return build_demo_registry(ISSUED)


@pytest.fixture
def member(tmp_path: Path, registry, database: str) -> Member:
    """A member gateway's files: 9 audit entries with checkpoints after entries 3, 6 and 9."""
    (tmp_path / "data").mkdir()
    authority, snapshot = tmp_path / "authority.cert.pem", tmp_path / "snapshot.json"
    authority.write_bytes(cert_pem(registry.authority_cert))
    snapshot.write_text(registry.text(), encoding="utf-8")
    key, cert = tmp_path / "member.key.pem", tmp_path / "member.cert.pem"
    key.write_bytes(private_key_pem(registry.member_keys[TONGJIANG]))
    key.chmod(0o600)
    cert.write_bytes(cert_pem(registry.member_certs[TONGJIANG]))
    path = locator(database, tmp_path / "data", "gateway")
    db = connect(path)
    signer = cp.Signer(registry.member_keys[TONGJIANG], [registry.member_certs[TONGJIANG]])
    for n in range(3):
        _entries(db, 3 * n + 1, 3 * n + 4)
        cp.make(db, signer, at=ISSUED + _dt.timedelta(minutes=3 * n + 3, seconds=30))
    db.conn.close()
    return Member(tmp_path, authority, snapshot, key, cert, path, registry)


def gateway(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def _add_checkpoint(member: Member, key, chain, minutes: int = 20) -> None:
    db = connect(member.db)
    _entries(db, 10, 12)
    cp.make(db, cp.Signer(key, chain), at=ISSUED + _dt.timedelta(minutes=minutes))
    db.conn.close()


def test_configured_trust_verifies_without_flags(member: Member) -> None:
    code, out = gateway("--config", str(member.config()), "audit", "verify")
    assert code == 0, out
    assert out.startswith("OK: 9 entries") and "3 checkpoints match" in out
    certificates = len(member.registry.member_certs)  # every demo member's certificate is in the snapshot
    assert "trust: registry authority" in out and f"registry snapshot 1 ({certificates} member certificates)" in out
    # GATEWAY_CONFIG does the same as --config.
    code, out = gateway("audit", "verify", env={"GATEWAY_CONFIG": str(member.config())})
    assert code == 0 and "3 checkpoints match" in out


def test_checkpoint_signed_by_an_unknown_key_is_forged(member: Member) -> None:
    forger = Pki(TONGJIANG)  # a look-alike authority that "issued" a certificate for the same member
    _add_checkpoint(member, forger.key, [forger.cert, forger.authority])
    code, out = gateway("--config", str(member.config()), "audit", "verify")
    assert code == 1
    assert "checkpoint 4 (count 11, made 2026-05-01T09:20:00.000+08:00) is forged: signature verification failed" in out


def test_checkpoint_whose_signature_does_not_match_is_forged(member: Member) -> None:
    tamper(member.db, "DELETE FROM audit_log WHERE seq > 8", "UPDATE audit_checkpoint SET count = 8 WHERE id = 3")
    code, out = gateway("--config", str(member.config()), "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and report["verdict"] == "failed"
    assert any(f["message"].startswith("checkpoint 3 (count 8") and "is forged" in f["message"]
               for f in report["findings"])


def test_checkpoint_over_a_changed_chain(member: Member) -> None:
    db = connect(member.db)
    before = db.execute("SELECT content FROM audit_log WHERE seq = 5").fetchone()[0]
    db.conn.close()
    changed = before.replace(f"{5:064x}", f"{99:064x}")
    assert changed != before
    tamper(member.db, "UPDATE audit_log SET content = ? WHERE seq = 5", params=[[changed]])
    rehash_from(member.db, 5)  # hashes recomputed: only the signed checkpoints can tell
    code, out = gateway("--config", str(member.config()), "audit", "verify")
    assert code == 1
    assert "entries 4 to 6 were rewritten since checkpoint 2" in out


def test_only_the_authority_certificate_verifies_a_genuine_checkpoint(member: Member, tmp_path: Path) -> None:
    # What an auditor outside the gateway holds: the authority's certificate and a copy of the database.
    config = member.config("auditor.toml", registry_snapshot="", signing_key="", signing_cert="")
    code, out = gateway("--config", str(config), "audit", "verify", "--db", str(member.db))
    assert code == 0, out
    assert "3 checkpoints match" in out and "no registry snapshot" in out
    # The same with --trust and no configuration at all (today's false forgery).
    code, out = gateway("--data-dir", str(tmp_path / "none"), "audit", "verify", "--db", str(member.db),
                        "--trust", str(member.authority), env={"GATEWAY_REGISTRY_AUTHORITY": ""})
    assert code == 0, out
    # A certificate from another authority is still a forgery.
    forger = Pki(TONGJIANG)
    _add_checkpoint(member, forger.key, [forger.cert])
    code, out = gateway("--config", str(config), "audit", "verify", "--db", str(member.db))
    assert code == 1 and "checkpoint 4 (count 11" in out and "is forged" in out


def test_a_certificate_removed_from_the_snapshot_is_not_trusted(member: Member, registry) -> None:
    revoked = build_demo_registry(ISSUED, version=2, drop_members=(TONGJIANG,), reuse=registry)
    member.snapshot.write_text(revoked.text(), encoding="utf-8")
    config = member.config(signing_key="", signing_cert="")
    code, out = gateway("--config", str(config), "audit", "verify")
    assert code == 1
    assert "checkpoint 1 (count 3" in out and "was not listed in the trust list" in out


def test_a_checkpoint_of_another_member_in_this_log(member: Member, registry) -> None:
    # A genuine signature of another member (listed in the snapshot) on a checkpoint kept in this member's log.
    _add_checkpoint(member, registry.member_keys[FULING], [registry.member_certs[FULING]])
    code, out = gateway("--config", str(member.config()), "audit", "verify")
    assert code == 1
    assert f"checkpoint 4 (count 11, made 2026-05-01T09:20:00.000+08:00) is forged: it is about {FULING}" in out


def test_without_trust_the_checkpoints_cannot_be_vouched_for(member: Member) -> None:
    config = member.config("bare.toml", registry_authority="", registry_snapshot="", signing_key="",
                           signing_cert="")
    code, out = gateway("--config", str(config), "audit", "verify")
    assert code == 3
    lines = out.splitlines()
    assert lines[0].startswith("NOT VERIFIED: the chain of 9 entries is intact")
    assert "3 signed checkpoints cannot be vouched for" in lines[0]
    assert "  - checkpoint 1: signature not checked" in lines
    assert any("no registry authority certificate to check checkpoint signatures with" in line for line in lines)
    code, out = gateway("--config", str(config), "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 3 and report["verdict"] == "unverified" and report["ok"] is False
    assert report["entries"] == 9
    assert report["unverified_checkpoints"] == ["checkpoint 1", "checkpoint 2", "checkpoint 3"]
    # A member certificate alone (no authority) is no trust either.
    code, out = gateway("--config", str(config), "audit", "verify", "--trust", str(member.cert))
    assert code == 3
    # A broken chain is still reported as broken.
    tamper(member.db, "DELETE FROM audit_log WHERE seq = 2", "DELETE FROM audit_key WHERE seq = 2")
    code, out = gateway("--config", str(config), "audit", "verify")
    assert code == 1 and "entry 2 is missing" in out


def test_a_snapshot_that_does_not_verify_is_one_line(member: Member) -> None:
    doc = json.loads(member.snapshot.read_text("utf-8"))
    doc["version"] += 1
    member.snapshot.write_text(json.dumps(doc), encoding="utf-8")
    code, out = gateway("--config", str(member.config()), "audit", "verify")
    assert code == 2
    assert out.strip().splitlines() == [
        f"Error: configuration: registry_snapshot: registry snapshot {member.snapshot} does not verify against "
        "the registry authority: signature verification failed"
    ]


def test_checkpoint_command_signs_with_the_configured_key_and_imports_with_the_configured_trust(
    member: Member, registry, tmp_path: Path, database: str
) -> None:
    config = member.config()
    db = connect(member.db)
    _entries(db, 10, 12)
    db.conn.close()
    code, out = gateway("--config", str(config), "audit", "checkpoint", "--at", "2026-05-01T10:00:00+08:00")
    assert code == 0, out
    assert out.startswith("checkpoint 4: 11 entries, head ") and f"signed by {TONGJIANG}" in out
    code, out = gateway("--config", str(config), "audit", "checkpoint", "--export", str(tmp_path / "cp.json"))
    assert code == 0 and "wrote checkpoint 4" in out
    # Fuling's gateway holds it, checked with its own configured trust (no --trust).
    peer = tmp_path / "peer"
    peer.mkdir()
    peer_config = peer / "gateway.toml"
    peer_database = f'database = "{locator(database, tmp_path, "peer")}"\n' if database else ""
    peer_config.write_text(
        f'[gateway]\ndata_dir = "{peer}"\nissuer_uscc = "{FULING}"\nregistry_authority = "{member.authority}"\n'
        f'registry_snapshot = "{member.snapshot}"\n{peer_database}', "utf-8")
    code, out = gateway("--config", str(peer_config), "audit", "checkpoint", "--import", str(tmp_path / "cp.json"))
    assert code == 0, out
    assert out.startswith(f"holding checkpoint of {TONGJIANG}: 11 entries")
    # Without any trust an import is refused in one line.
    bare = peer / "bare.toml"
    bare.write_text(f'[gateway]\ndata_dir = "{peer}"\nissuer_uscc = "{FULING}"\nregistry_authority = ""\n'
                    f'{peer_database}', "utf-8")
    code, out = gateway("--config", str(bare), "audit", "checkpoint", "--import", str(tmp_path / "cp.json"))
    assert code == 1 and len(out.strip().splitlines()) == 1 and "--trust" in out
