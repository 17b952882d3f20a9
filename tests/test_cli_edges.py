"""Command-line edges: patient searches audited, signals that stop a benchmark, a trust anchor that does not match,
a snapshot version issued twice, HL7 v2 files read as streams, unreadable files among several, Ctrl-C on a
follow, error lines that say what is wrong, and databases on read-only media."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import cli

DATA = Path(__file__).parent / "data"
TONGJIANG, FULING = "12511921MB0001003C", "12500102MB0002006J"
PATIENT = "11010519491231002X"  # (the made-up worker of tests/data/registry/bundle-occupational-cdc.json)


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """``paths`` (files or folders) made unwritable for this process: immutable when it runs as root (for whom
    permissions are moot), else without write permission; put back afterwards."""
    done: list[tuple[Path, int]] = []
    try:
        for path in paths:
            if os.geteuid() == 0:
                if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
                    pytest.skip("cannot make a file immutable here (chattr +i)")
                done.append((path, -1))
            else:
                mode = path.stat().st_mode & 0o7777
                path.chmod(mode & ~0o222)
                done.append((path, mode))
        yield
    finally:
        for path, mode in reversed(done):
            if mode < 0:
                subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            else:
                path.chmod(mode)


# ---------------------------------------------------------------------------------------------------- 1. audited


@pytest.fixture(scope="module")
def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-registry"
    result = CliRunner().invoke(cli, ["registry", "demo", "--out", str(out), "--at", "2026-11-22T09:00:00+08:00"])
    assert result.exit_code == 0, result.output
    return out


def _stored_decisions(demo: Path, db: Path) -> None:
    """A database holding decisions, at ``db`` alone (no -wal, no -shm beside it), as a backup copied there is: made
    by `gateway recognize --db` in a folder of its own, then copied with SQLite's backup (a connection of this
    process may still hold the made one open, with its -wal and -shm)."""
    import sqlite3

    made = db.parent.parent / f"{db.parent.name}-made" / db.name
    made.parent.mkdir(exist_ok=True)
    result = CliRunner().invoke(cli, [
        "recognize", str(DATA / "registry" / "bundle-occupational-cdc.json"), "--registry",
        str(demo / "DEMO-snapshot.json"), "--authority", str(demo / "DEMO-authority.pem"), "--receiver", FULING,
        "--at", "2026-11-22T10:00:00+08:00", "--db", str(made)])
    assert result.exit_code == 0, result.output
    source, copy = sqlite3.connect(made), sqlite3.connect(db)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    db.chmod(0o600)


def _reads(db: Path) -> list[dict]:
    from gateway.audit.log import entries
    from gateway.store.db import connect

    opened = connect(db, readonly=True)
    try:
        return [e.facts for e in entries(opened) if e.kind == "read"]
    finally:
        opened.conn.close()


def test_a_search_by_patient_is_audited_with_the_patient_and_the_os_user(demo_registry: Path, tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    _stored_decisions(demo_registry, db)
    listed = CliRunner().invoke(cli, ["decisions", "list", "--db", str(db), "--patient", PATIENT])
    assert listed.exit_code == 0, listed.output
    assert "3 decision(s)" in listed.stderr
    reads = _reads(db)
    assert len(reads) == 1, reads
    assert reads[0]["patient"] == {"value": PATIENT, "system": "urn:oid:2.16.156.10011.1.3"}
    assert reads[0]["client_address"] == "command line" and "(command line)" in reads[0]["user"]["display"]
    assert f"--patient {PATIENT}" in reads[0]["query"]
    # a list that names no patient only reads, as before
    assert CliRunner().invoke(cli, ["decisions", "list", "--db", str(db)]).exit_code == 0
    assert len(_reads(db)) == 1


def test_a_search_by_patient_that_cannot_be_audited_shows_nothing(demo_registry: Path, tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    _stored_decisions(demo_registry, db)
    with read_only(db, tmp_path):
        listed = CliRunner().invoke(cli, ["decisions", "list", "--db", str(db), "--patient", PATIENT])
        anonymous = CliRunner().invoke(cli, ["decisions", "list", "--db", str(db)])
    assert listed.exit_code == 2, listed.output
    assert listed.stdout == ""
    lines = listed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: patient data not shown"), lines
    assert str(db) in lines[0]
    assert anonymous.exit_code == 0, anonymous.output
    assert _reads(db) == []


# ------------------------------------------------------------------------------------- 9. read-only media


def test_read_only_commands_read_a_database_on_read_only_media(demo_registry: Path, tmp_path: Path) -> None:
    """A restored backup on a DVD, a mounted snapshot: the file and its folder cannot be written, not even the
    -shm SQLite reads a WAL database with; `audit verify` and `db check` read it as it is."""
    folder = tmp_path / "snapshot"
    folder.mkdir()
    db = folder / "gw.db"
    _stored_decisions(demo_registry, db)
    assert sorted(p.name for p in folder.iterdir()) == ["gw.db"]  # (no -wal, no -shm: none can be made)
    with read_only(db, folder):
        verified = CliRunner().invoke(cli, ["audit", "verify", "--db", str(db)])
        checked = CliRunner().invoke(cli, ["db", "check", "--db", str(db)])
        status = CliRunner().invoke(cli, ["db", "status", "--db", str(db)])
        assert sorted(p.name for p in folder.iterdir()) == ["gw.db"]
    writable = CliRunner().invoke(cli, ["audit", "verify", "--db", str(db)])
    assert verified.exit_code == writable.exit_code, verified.output
    assert verified.stdout == writable.stdout
    assert checked.exit_code == 0 and checked.stdout == f"database: {db}: ok (quick_check)\n", checked.output
    assert status.exit_code == 0 and "layout" in status.stdout, status.output


def test_a_wal_file_that_cannot_be_read_on_read_only_media_is_said(demo_registry: Path, tmp_path: Path) -> None:
    """A -wal file with changes and no -shm beside it, where none can be made: reading the file alone would miss
    those changes; said, one line, exit 2."""
    import sqlite3

    folder = tmp_path / "snapshot"
    folder.mkdir()
    db = folder / "gw.db"
    _stored_decisions(demo_registry, db)
    # a copy taken while a writer held the database: committed pages still in the -wal file
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE later (x)")
    writer.commit()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("gw.db", "gw.db-wal"):
        (copy / name).write_bytes((folder / name).read_bytes())
    writer.close()
    with read_only(copy / "gw.db", copy / "gw.db-wal", copy):
        checked = CliRunner().invoke(cli, ["db", "check", "--db", str(copy / "gw.db")])
    assert checked.exit_code == 2, checked.output
    lines = checked.stderr.strip().splitlines()
    assert len(lines) == 1 and "gw.db-wal holds changes" in lines[0], lines


# ------------------------------------------------------------------------------------------ 2. bench and SIGTERM


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_to_bench_stops_the_server_it_started(tmp_path: Path) -> None:
    import signal
    import sys
    import time

    from conftest import children_of

    work = tmp_path / "bench"
    bench = subprocess.Popen([sys.executable, "-m", "gateway", "bench", "--stages", "http", "--http-clients", "1",
                              "--http-requests", "5000", "--workdir", str(work)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not servers and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.2)
            if (work / "http-server.log").exists():
                servers = [pid for pid in children_of(bench.pid)
                           if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert servers, "the bench started no server"
        time.sleep(1.5)  # (the load is under way)
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=60)
        stopped_by = time.monotonic() + 30
        while any(_alive(pid) for pid in servers) and time.monotonic() < stopped_by:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in servers), "the server the bench started is still running"
        assert bench.returncode == 143, err
        assert err.decode().strip().splitlines()[-1] == ("gateway bench: stopped by SIGTERM before the end; the "
                                                         "servers it started are stopped")
    finally:
        for pid in servers:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait()


# ------------------------------------------------------------------------------ 3. a trust anchor that does not match


def _log_with_checkpoints(path: Path, pki) -> None:
    import datetime as dt

    from test_audit_support import T0

    from gateway.audit import checkpoint as cp
    from gateway.audit import records as r
    from gateway.audit.log import append
    from gateway.store.db import connect

    db = connect(path)
    me = r.Party.member(TONGJIANG, "通江县人民医院")
    for n in range(2):
        for i in range(3):
            at = T0 + dt.timedelta(minutes=3 * n + i)
            append(db, r.exchange("received", at=at, gateway=me, peer=r.Party.member(FULING),
                                  bundle_hash=f"sha256:{3 * n + i:064x}"))
        cp.make(db, pki.signer, at=T0 + dt.timedelta(minutes=3 * n + 2, seconds=30))
    db.conn.close()


def test_a_trust_anchor_that_does_not_match_the_signer_cannot_vouch_rather_than_say_forged(tmp_path: Path) -> None:
    from test_audit_support import Pki

    signer = Pki(TONGJIANG)  # the log's own authority and member certificate
    _log_with_checkpoints(tmp_path / "gw.db", signer)
    other = Pki(TONGJIANG, authority="11500000MB00050043")  # another authority altogether: the wrong file given
    other.pem(tmp_path / "other.pem")
    signer.pem(tmp_path / "right.pem")
    env = {"GATEWAY_REGISTRY_AUTHORITY": "", "GATEWAY_REGISTRY_SNAPSHOT": "", "GATEWAY_SIGNING_CERT": ""}
    base = ["--data-dir", str(tmp_path / "none"), "audit", "verify", "--db", str(tmp_path / "gw.db")]
    wrong = CliRunner().invoke(cli, [*base, "--trust", str(tmp_path / "other.pem")], env=env)
    assert wrong.exit_code == 3, wrong.output
    lines = wrong.stdout.splitlines()
    assert lines[0].startswith("NOT VERIFIED: the chain of 6 entries is intact"), lines
    assert "2 signed checkpoints cannot be vouched for: the trusted certificates given do not include their " \
           "signer's" in lines[0]
    assert any(line.startswith("  - checkpoint 1: signed with certificate ") and "an authority the trust given "
               "does not hold" in line for line in lines), lines
    assert "forged" not in wrong.stdout
    as_json = json.loads(CliRunner().invoke(cli, [*base, "--trust", str(tmp_path / "other.pem"), "--json"],
                                            env=env).stdout)
    assert as_json["verdict"] == "unverified" and as_json["findings"] == []
    # the right authority vouches for them
    right = CliRunner().invoke(cli, [*base, "--trust", str(tmp_path / "right.pem")], env=env)
    assert right.exit_code == 0 and "2 checkpoints match" in right.stdout, right.output
    # a peer posting such a checkpoint is told only that its signature does not verify (which signers this gateway
    # trusts is for its auditor, not for a caller)
    from test_audit_support import T0

    from gateway.audit import checkpoint as cp
    from gateway.errors import BadSignature
    from gateway.store.db import connect

    db = connect(tmp_path / "gw.db")
    [first, *_] = cp.checkpoints(db)
    held = connect(tmp_path / "peer.db")
    with pytest.raises(BadSignature) as refused:
        cp.import_peer(held, first.as_json(), other.trust, now=T0, me=FULING)
    assert type(refused.value) is BadSignature
    db.conn.close()
    held.conn.close()


# ------------------------------------------------------------------------- 4. a snapshot version issued once


def test_a_snapshot_version_once_issued_is_not_overwritten_with_other_content(tmp_path: Path) -> None:
    import datetime as dt

    import yaml

    from gateway.demo.registry import DEMO_SOURCE
    from gateway.signing.keys import cert_pem, generate_private_key, make_authority, private_key_pem

    cst = dt.timezone(dt.timedelta(hours=8))
    now = dt.datetime(2026, 11, 22, 9, 0, tzinfo=cst)
    key = generate_private_key()
    cert = make_authority(key, "11500000MB00050043", "川渝卫生健康联合办公室（演示）", now - dt.timedelta(days=1),
                          now + dt.timedelta(days=365))
    (tmp_path / "authority.key").write_bytes(private_key_pem(key))
    (tmp_path / "authority.key").chmod(0o600)
    (tmp_path / "authority.pem").write_bytes(cert_pem(cert))
    out = tmp_path / "snapshot.json"
    sign = ["--out", str(out), "--key", str(tmp_path / "authority.key"), "--cert", str(tmp_path / "authority.pem")]

    def build(source: Path, *more: str):
        return CliRunner().invoke(cli, ["registry", "build", str(source), *sign, *more])

    first = build(Path(DEMO_SOURCE), "--issued", "2026-11-22T09:00:00+08:00")
    assert first.exit_code == 0, first.output
    issued = out.read_bytes()
    # the same content again (another day): nothing changed, the file is left as issued
    again = build(Path(DEMO_SOURCE), "--issued", "2026-11-23T09:00:00+08:00")
    assert again.exit_code == 0, again.output
    assert "version 1" in again.stdout and "unchanged" in again.stdout and out.read_bytes() == issued
    # other content under the same version: refused, naming the file and the version
    changed = yaml.safe_load(Path(DEMO_SOURCE).read_text(encoding="utf-8"))
    changed["note"] = "another note"
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed, allow_unicode=True), encoding="utf-8")
    refused = build(other, "--issued", "2026-11-23T09:00:00+08:00")
    assert refused.exit_code == 2, refused.output
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "version 1" in lines[0] and "higher --version" in lines[0]
    assert out.read_bytes() == issued
    # a higher version is written
    renewed = build(other, "--issued", "2026-11-23T09:00:00+08:00", "--version", "2")
    assert renewed.exit_code == 0 and json.loads(out.read_bytes())["version"] == 2, renewed.output


# ------------------------------------------------------------------------------- 5. HL7 v2 files read as streams


def _hl7v2_inputs() -> list[Path]:
    """Every HL7 v2 file of the test data (plain, MLLP-framed, batches, BOMs, CRLF, GBK)."""
    return sorted(p for p in (DATA / "hl7v2").iterdir() if p.is_file() and p.suffix in (".hl7", ".mllp"))


#: Inputs made to cut at every awkward place: line breaks and frame ends across blocks, a BOM between messages,
#: 0x1C inside a message and before white space at the end, batches, a frame that ends with LF.
_MSH = b"MSH|^~\\&|LIS|TJ|GW|TJ|20240610083000||ORU^R01|M%d|P|2.5.1\r"
_EDGES = [
    b"",
    b"\r\n\r\n",
    _MSH % 1 + b"PID|1\r\n" + _MSH % 2 + b"PID|2\n\xef\xbb\xbf" + _MSH % 3 + b"OBX|1",
    b"\xef\xbb\xbf" + _MSH % 1 + b"\r\n\r\nMSH|short\r" + _MSH % 2,
    b"FHS|^~\\&\rBHS|^~\\&\r" + _MSH % 1 + b"PID|1\r" + _MSH % 2 + b"BTS|2\rFTS|1\r",
    b"\x0b" + _MSH % 1 + b"OBX|1|ST|x\x1cy\r\x1c\r\x0b" + _MSH % 2 + b"\x1c\r",
    b"\x0b" + _MSH % 1 + b"\x1c\n\x0b" + _MSH % 2 + b"\x1c\r\n",
    b"\x0b" + _MSH % 1 + b"OBX|1\x1c  \x1c\r\x0b" + _MSH % 2 + b"PID\x1c \t\r\n",
    b"  \xef\xbb\xbf" + _MSH % 1 + b"\x1c\x0b\x0b\xef\xbb\xbf" + _MSH % 2 + b"\x1c\x0b" + _MSH % 3,
    _MSH % 1 + b"\x1c",
    b"\x1c\x0b" + _MSH % 1,
]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 16, 61, 4096, 1 << 16])
def test_hl7v2_streamed_messages_are_those_of_the_whole_file(block: int) -> None:
    import io

    from gateway.adapters.hl7v2 import split_messages
    from gateway.commands.hl7stream import framed, messages

    inputs = [p.read_bytes() for p in _hl7v2_inputs()] + _EDGES
    inputs.append(b"".join(p.read_bytes() for p in _hl7v2_inputs() if p.suffix == ".hl7"
                           and b"\x0b" not in p.read_bytes()))
    assert len(inputs) > 25
    for n, data in enumerate(inputs):
        stream = io.BytesIO(data)
        assert list(messages(stream, framed(stream), block=block)) == split_messages(data), n
    assert list(messages(io.BytesIO(_EDGES[2]), None)) == split_messages(_EDGES[2])  # (a stream read once: whole)


def test_hl7v2_convert_reads_a_large_file_a_block_at_a_time(tmp_path: Path) -> None:
    """Memory holds about a block, not the file; the bytes read when the first message is given are a block or
    two of the file, so progress says how far it is."""
    import tracemalloc

    from gateway.commands.hl7stream import BLOCK, framed, messages

    one = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes().rstrip(b"\r\n") + b"\r"
    big = tmp_path / "big.hl7"
    with big.open("wb") as out:
        for _ in range((16 << 20) // len(one)):
            out.write(one)
    size = big.stat().st_size
    with big.open("rb") as stream:
        found = framed(stream)
        assert found is False and stream.tell() == 0
        cut = messages(stream, found)
        next(cut)
        assert stream.tell() <= 2 * BLOCK < size // 100
        tracemalloc.start()
        try:
            count = 1 + sum(1 for _ in cut)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert count == size // len(one)
    assert peak < 8 * BLOCK, peak


def test_convert_of_hl7v2_files_gives_what_it_gave_read_whole(tmp_path: Path) -> None:
    """The command's Bundles and refusals are those of each file read whole (Pipeline.convert on its bytes)."""
    from gateway import jsonutil
    from gateway.config import load_settings
    from gateway.pipeline import Pipeline, Status

    files = _hl7v2_inputs()
    result = CliRunner().invoke(cli, ["--issuer-uscc", TONGJIANG, "--data-dir", str(tmp_path), "convert",
                                      *map(str, files)])
    pipeline = Pipeline(load_settings(overrides={"issuer_uscc": TONGJIANG, "data_dir": str(tmp_path)}))
    whole = [o for p in files for o in pipeline.convert(p.read_bytes(), "hl7v2", str(p))]
    assert result.stdout.splitlines() == [jsonutil.dumps(o.bundle) for o in whole
                                          if o.status is not Status.FILTERED and o.bundle is not None]
    refused = [o.label for o in whole if o.status is not Status.FILTERED and o.bundle is None]
    assert refused and all(label in result.stderr for label in refused)
    assert result.exit_code == 1


# ------------------------------------------------------------------------------- 6. unreadable files among several


def test_convert_goes_on_past_files_it_cannot_read(tmp_path: Path) -> None:
    good = [DATA / "hl7v2" / "analyser-v231-chemistry.hl7", DATA / "hl7v2" / "lis-v24-crlf.hl7"]
    (tmp_path / "a-folder").mkdir()
    files = [good[0], tmp_path / "missing.hl7", tmp_path / "a-folder", good[1]]
    result = CliRunner().invoke(cli, ["--issuer-uscc", TONGJIANG, "convert", *map(str, files)])
    assert result.exit_code == 1, result.output
    # both good files converted, the second after the unreadable ones
    assert len(result.stdout.splitlines()) == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {tmp_path / 'missing.hl7'}: cannot read: No such file or directory",
                      f"Error: {tmp_path / 'a-folder'}: cannot read: Is a directory"]
    assert result.stderr.splitlines()[-1] == "2 of 4 files could not be read; 2 converted, 0 refused, 1 filtered"
    # a metadata file that is not text, among good ones
    (tmp_path / "meta.json").write_bytes(b'{"report": "\xff\xfe"}')
    report = DATA / "service-report" / "yuan-radiation-protection-testing.json"
    result = CliRunner().invoke(cli, ["--issuer-uscc", "91500105MA5U0A1B2R", "convert", "--format", "service-report",
                                      str(tmp_path / "meta.json"), str(report)])
    assert result.exit_code == 1 and len(result.stdout.splitlines()) == 1, result.output
    assert result.stderr.splitlines()[0].startswith(f"Error: {tmp_path / 'meta.json'}: ")
    assert result.stderr.splitlines()[-1] == "1 of 2 files could not be read; 1 converted, 0 refused, 0 filtered"


def test_convert_goes_on_past_a_file_it_may_not_read(tmp_path: Path) -> None:
    """Permission denied. Root may read any file: as root, it runs without the capabilities that let it."""
    import shutil
    import sys

    good = tmp_path / "good.hl7"
    good.write_bytes((DATA / "hl7v2" / "lis-v24-crlf.hl7").read_bytes())
    secret = tmp_path / "secret.hl7"
    secret.write_bytes(good.read_bytes())
    secret.chmod(0)
    command = [sys.executable, "-m", "gateway", "--issuer-uscc", TONGJIANG, "--data-dir", str(tmp_path / "gw"),
               "convert", str(secret), str(good)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("runs as root, and setpriv is not there to drop the capabilities that read any file")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(command, capture_output=True, env=env, timeout=120)
    errors = [line for line in done.stderr.decode().splitlines() if "WARNING" not in line]
    assert done.returncode == 1, errors
    assert len(done.stdout.splitlines()) == 1
    assert errors == [f"Error: {secret}: cannot read: Permission denied",
                      "1 of 2 files could not be read; 1 converted, 0 refused, 0 filtered"]


# ---------------------------------------------------------------------------------- 7. Ctrl-C on audit tail --follow


def test_ctrl_c_ends_a_follow_quietly(demo_registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.commands import audit as audit_commands

    db = tmp_path / "gw.db"
    _stored_decisions(demo_registry, db)
    looks = []

    def interrupted(seconds: float) -> None:
        looks.append(seconds)
        if len(looks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(audit_commands, "_sleep", interrupted)
    result = CliRunner().invoke(cli, ["audit", "tail", "--db", str(db), "--follow", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    assert "Aborted" not in result.output and result.stderr == ""
    # the 4 entries there, and the read by `audit tail` itself
    assert len(looks) == 2 and len(result.stdout.splitlines()) == 5


# ------------------------------------------------------------------------------------ 8. messages that say what is


def _member_files(tmp_path: Path) -> tuple[Path, Path]:
    """A member's key (0600) and certificate, as `gateway keys init` and `registry issue-cert` leave them."""
    import datetime as dt

    from gateway.signing.keys import (cert_pem, generate_private_key, issue_certificate, make_authority,
                                      private_key_pem)

    now = dt.datetime.now(dt.timezone.utc)
    authority_key = generate_private_key()
    authority = make_authority(authority_key, "11500000MB00050043", "测试", now - dt.timedelta(days=1),
                               now + dt.timedelta(days=400))
    key = generate_private_key()
    cert = issue_certificate(key.public_key(), TONGJIANG, "通江县人民医院", authority_key, authority,
                             now - dt.timedelta(hours=1), now + dt.timedelta(days=300))
    key_path, cert_path = tmp_path / f"{TONGJIANG}.key.pem", tmp_path / f"{TONGJIANG}.cert.pem"
    key_path.write_bytes(private_key_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert_pem(cert))
    cert_path.chmod(0o644)
    return key_path, cert_path


def test_a_password_file_that_is_a_directory_is_said_to_be_one(tmp_path: Path) -> None:
    from gateway.errors import ConfigError
    from gateway.signing.keys import load_signing_identity

    key, cert = _member_files(tmp_path)
    folder = tmp_path / "password"
    folder.mkdir()
    with pytest.raises(ConfigError) as refused:
        load_signing_identity(key, cert, password_file=folder)
    assert str(refused.value) == f"signing_key_password_file: {folder} is a directory: signing_key_password_file " \
                                 "names a file"
    assert "chmod" not in str(refused.value)


def test_a_signing_key_that_is_a_certificate_is_said_to_be_one(tmp_path: Path) -> None:
    from gateway.errors import ConfigError
    from gateway.signing.keys import load_signing_identity

    _, cert = _member_files(tmp_path)  # (mode 0644, as a certificate is)
    with pytest.raises(ConfigError) as refused:
        load_signing_identity(cert, cert)
    assert str(refused.value).startswith(f"signing_key: {cert} is a certificate, not a private key")
    assert "chmod" not in str(refused.value)
    der = tmp_path / "cert.der"
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der.write_bytes(x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER))
    with pytest.raises(ConfigError, match="is a certificate, not a private key"):
        load_signing_identity(der, cert)


@pytest.mark.parametrize("host, said", [
    ("no-such-host.invalid", "'no-such-host.invalid' is not a name this machine can resolve"),
    ("192.0.2.1", "192.0.2.1 is not an address of this machine"),  # (TEST-NET-1: no machine's)
])
def test_an_address_to_listen_on_that_is_not_this_machines_is_not_a_port_in_use(tmp_path: Path, host: str,
                                                                                said: str) -> None:
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path), "serve", "--http-host", host, "--http-port",
                                      "23987", "--mllp-port", "0"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"Error: configuration: http_host: {said}"), lines
    assert "in use" not in lines[0] and "port" not in lines[0]


def test_issue_cert_names_the_start_of_validity_when_that_is_wrong(tmp_path: Path) -> None:
    keys_dir = DATA / "keys"
    made = CliRunner().invoke(cli, ["keys", "init", "--uscc", "12500000MB00000277", "--name", "测试市第一医院", "--out",
                                    str(tmp_path)])
    assert made.exit_code == 0, made.output
    authority_key = tmp_path / "TEST-authority.key.pem"  # (git checks it out 0644: the authority's key is refused so)
    authority_key.write_bytes((keys_dir / "TEST-authority.key.pem").read_bytes())
    authority_key.chmod(0o600)
    args = ["registry", "issue-cert", str(tmp_path / "12500000MB00000277.csr.pem"), "--authority-key",
            str(authority_key), "--authority-cert", str(DATA / "signing" / "authority.cert.pem"),
            "--out", str(tmp_path / "member.pem")]
    early = CliRunner().invoke(cli, [*args, "--not-before", "1999-01-01T00:00:00+08:00"])
    assert early.exit_code == 1, early.output
    [line] = early.stderr.strip().splitlines()
    assert line.startswith("Error: --not-before: 1999-01-01T00:00:00+08:00 is before the authority certificate is "
                           "valid"), line
    assert "not_after" not in line
    late = CliRunner().invoke(cli, [*args, "--not-before", "2025-03-01T00:00:00+08:00", "--days", "3650"])
    assert late.exit_code == 1 and "--not-before and --days: " in late.stderr and "after the authority" \
        in late.stderr, late.output


def test_read_only_commands_read_a_database_in_a_folder_without_write_permission(demo_registry: Path,
                                                                                 tmp_path: Path) -> None:
    """The same with permissions (a restored copy: file 0444, folder 0555), as a user they bind: root runs it
    without the capabilities that pass over permissions."""
    import shutil
    import sys

    folder = tmp_path / "restored"
    folder.mkdir()
    db = folder / "gw.db"
    _stored_decisions(demo_registry, db)
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("runs as root, and setpriv is not there to drop the capabilities that pass over permissions")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    assert sorted(p.name for p in folder.iterdir()) == ["gw.db"], "before"
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        runs = [subprocess.run([*prefix, sys.executable, "-m", "gateway", "--data-dir", str(tmp_path / "none"),
                                *command, "--db", str(db)], capture_output=True, env=env, timeout=120)
                for command in (["db", "check"], ["audit", "verify"])]
    finally:
        folder.chmod(0o755)
    checked, verified = runs
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.decode() == f"database: {db}: ok (quick_check)\n"
    assert verified.returncode == 0 and verified.stdout.decode().startswith("OK: 4 entries"), verified.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["gw.db"]
