"""Audit command line and checkpoint exchange: query, export (CSV, NDJSON), tail, checkpoints between peers."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CST, FULING, TONGJIANG
from test_audit_support import ROLES, T0, Pki, locator, serving

from gateway.audit import checkpoint as cp
from gateway.audit import records as r
from gateway.audit.log import append, entries, head
from gateway.audit.verify import verify
from gateway.commands import audit as audit_commands
from gateway.commands.audit import audit
from gateway.errors import BadSignature, InputError, TrustError
from gateway.signing import keys
from gateway.store.db import connect

ME = r.Party.member(TONGJIANG, "通江县人民医院")
PEER = r.Party.member(FULING, "涪陵中心医院")
PATIENT = r.PatientRef.id_card("510104199001011232")


@pytest.fixture
def audit_client(settings, clock):
    with serving(settings, clock) as served:
        yield served


def fill(db, n: int = 5) -> None:
    for i in range(n):
        at = T0 + _dt.timedelta(hours=i)
        if i % 2:
            append(
                db,
                r.exchange("received", at=at, gateway=ME, peer=PEER, bundle_hash=f"sha256:{i:064x}", patient=PATIENT),
            )
        else:
            append(
                db,
                r.ingest(
                    at=at,
                    gateway=ME,
                    source=r.Party.application(TONGJIANG, "LIS"),
                    message_id=f"M{i}",
                    fmt="hl7v2",
                    status="stored",
                ),
            )


@pytest.fixture
def db_path(tmp_path: Path, database: str) -> Path | str:
    path = locator(database, tmp_path)
    db = connect(path)
    fill(db)
    db.conn.close()
    return path


def test_query_lines_and_bundle(db_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(audit, ["query", "--db", str(db_path), "type=110107", "subtype=bundle-received"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert [line.split()[0] for line in lines] == ["4", "2"]  # newest first
    assert "510104199001011232" not in res.output  # one line per event, no patient identifiers
    bundle = json.loads(runner.invoke(audit, ["query", "--db", str(db_path), "--json", "_count=1"]).output)
    assert bundle["type"] == "searchset" and len(bundle["entry"]) == 1
    bad = runner.invoke(audit, ["query", "--db", str(db_path), "colour=red"])
    assert (
        bad.exit_code == 1 and bad.output.strip() == "Error: colour: unknown search parameter 'colour' for AuditEvent"
    )
    bad = runner.invoke(audit, ["query", "--db", str(db_path), "date"])
    assert bad.exit_code == 1 and "name=value" in bad.output


def test_query_pages(db_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(audit, ["query", "--db", str(db_path), "_count=2", "_sort=date"])
    assert [line.split()[0] for line in first.stdout.splitlines()] == ["1", "2"]
    cursor = first.stderr.strip().split("_cursor=")[1]
    second = runner.invoke(audit, ["query", "--db", str(db_path), "_count=2", "_sort=date", f"_cursor={cursor}"])
    assert [line.split()[0] for line in second.stdout.splitlines()] == ["3", "4"]


def test_export_ndjson_and_csv(db_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(audit, ["export", "--db", str(db_path), "--format", "ndjson", "type=110107"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.output.splitlines()]
    assert [e["id"] for e in events] == ["1", "2", "3", "4", "5"]  # oldest first
    assert all(e["resourceType"] == "AuditEvent" for e in events)
    out = tmp_path / "audit.csv"
    res = runner.invoke(
        audit,
        ["export", "--db", str(db_path), "--format", "csv", "--out", str(out), "patient:identifier=510104199001011232"],
    )
    assert res.exit_code == 0 and "2 entries written" in res.output
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [row["id"] for row in rows] == ["2", "4"]
    assert rows[0]["patient"] == "urn:oid:2.16.156.10011.1.3|510104199001011232"
    assert rows[0]["type"] == "http://dicom.nema.org/resources/ontology/DCM|110107"
    db = connect(db_path)
    second = db.execute("SELECT hash, prev_hash FROM audit_log WHERE seq = 2").fetchone()
    assert (rows[0]["hash"], rows[0]["prev_hash"]) == (second[0].hex(), second[1].hex())
    # Both exports were looked at: both are in the log.
    assert [e.event()["subtype"][0]["code"] for e in entries(db, 6)] == ["operation", "operation"]
    db.conn.close()


def test_export_streams_page_by_page(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.audit import query

    pages: list[int] = []
    real_run = query.run

    def spy(db, search):  # type: ignore[no-untyped-def]
        page = real_run(db, search)
        pages.append(len(page.entries))
        return page

    monkeypatch.setattr(query, "run", spy)
    entries_seen = list(query.iter_matches(connect(db_path), query.parse_search([], tz=CST), batch=2))
    assert len(entries_seen) == 5 and pages == [2, 2, 1]


def test_tail(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    res = runner.invoke(audit, ["tail", "--db", str(db_path), "-n", "2"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.splitlines()] == ["4", "5"]
    db = connect(db_path)

    def sleep(seconds: float) -> None:  # instead of waiting: something happens meanwhile
        append(db, r.ingest(at=T0, gateway=ME, source=ME, message_id="late", fmt="csv"))

    monkeypatch.setattr(audit_commands, "_sleep", sleep)
    res = runner.invoke(audit, ["tail", "--db", str(db_path), "-n", "1", "--follow", "--polls", "1"])
    shown = [line.split()[0] for line in res.output.splitlines()]
    assert shown == ["6", "7", "8"]  # the last entry (the first tail's), then this tail's own and the new one
    db.conn.close()


def test_checkpoint_cli_and_exchange_between_peers(db_path: Path, tmp_path: Path, database: str) -> None:
    me, peer = Pki(TONGJIANG), Pki(FULING)
    for pki, name in ((me, "me"), (peer, "peer")):
        (tmp_path / f"{name}.key").write_bytes(keys.private_key_pem(pki.key))
        (tmp_path / f"{name}.key").chmod(0o600)  # a key others can read is refused
        (tmp_path / f"{name}.crt").write_bytes(keys.cert_pem(pki.cert))
    runner = CliRunner()
    made = runner.invoke(
        audit,
        [
            "checkpoint",
            "--db",
            str(db_path),
            "--key",
            str(tmp_path / "me.key"),
            "--cert",
            str(tmp_path / "me.crt"),
            "--at",
            "2026-05-02T09:00:00+08:00",
            "--export",
            str(tmp_path / "cp.json"),
        ],
    )
    assert made.exit_code == 0, made.output
    assert made.output.startswith("checkpoint 1: 5 entries")
    doc = json.loads((tmp_path / "cp.json").read_text())
    assert (doc["member"], doc["count"], doc["time"]) == (TONGJIANG, 5, "2026-05-02T09:00:00.000+08:00")

    # The peer gateway holds our checkpoint after checking it against the registry's certificates.
    peer_db = locator(database, tmp_path, "peer")
    trust = me.pem(tmp_path / "trust.pem")
    held = runner.invoke(
        audit, ["checkpoint", "--db", str(peer_db), "--import", str(tmp_path / "cp.json"), "--trust", str(trust)]
    )
    assert held.exit_code == 0, held.output
    assert held.output.startswith(f"holding checkpoint of {TONGJIANG}: 5 entries")
    listing = runner.invoke(audit, ["checkpoint", "--db", str(peer_db), "--list"])
    assert f"peer {TONGJIANG}" in listing.output
    # A forged copy (another key for the same member) is refused.
    forged = Pki(TONGJIANG)
    bad = cp.Checkpoint(TONGJIANG, 5, bytes(32), doc["time"], "")
    bad_doc = {**doc, "head": "00" * 32, "jws": keys_sign(forged, bad)}
    (tmp_path / "forged.json").write_text(json.dumps(bad_doc))
    refused = runner.invoke(
        audit, ["checkpoint", "--db", str(peer_db), "--import", str(tmp_path / "forged.json"), "--trust", str(trust)]
    )
    assert refused.exit_code == 1 and refused.output.strip() == "Error: checkpoint: signature verification failed"
    # And verify takes the copy the peer held.
    ok = runner.invoke(
        audit, ["verify", "--db", str(db_path), "--trust", str(trust), "--checkpoint", str(tmp_path / "cp.json")]
    )
    assert ok.exit_code == 0 and "2 checkpoints match" in ok.output


def keys_sign(pki: Pki, unsigned: cp.Checkpoint) -> str:
    from gateway.signing.jws import sign_detached

    return sign_detached(unsigned.payload(), pki.key, [pki.cert], sig_time=T0)


def test_checkpoint_cli_needs_what_it_signs_with(db_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(audit, ["checkpoint", "--db", str(db_path)])
    assert res.exit_code == 1 and "--key and --cert" in res.output
    res = runner.invoke(audit, ["checkpoint", "--db", str(db_path), "--export", str(tmp_path / "x.json")])
    assert res.exit_code == 1 and "no checkpoint yet" in res.output
    (tmp_path / "j.json").write_text("{}")
    res = runner.invoke(audit, ["checkpoint", "--db", str(db_path), "--import", str(tmp_path / "j.json")])
    assert res.exit_code == 1 and "--trust" in res.output


def test_equivocation_is_caught(tmp_path: Path, database: str) -> None:
    """A member that signs two different heads for the same entry count has rewritten its log."""
    peer = Pki(FULING)
    theirs = connect(locator(database, tmp_path, "theirs"))
    fill(theirs, 3)
    first = cp.make(theirs, peer.signer, at=T0)
    mine = connect(locator(database, tmp_path, "mine"))
    cp.import_peer(mine, first.as_json(), peer.trust, now=T0, me=TONGJIANG)
    assert cp.import_peer(mine, first.as_json(), peer.trust, now=T0, me=TONGJIANG).id == 1  # again: same one
    rewritten = connect(locator(database, tmp_path, "rewritten"))
    fill(rewritten, 2)
    append(rewritten, r.ingest(at=T0, gateway=PEER, source=PEER, message_id="other", fmt="csv"))
    second = cp.make(rewritten, peer.signer, at=T0 + _dt.timedelta(hours=1))
    with pytest.raises(TrustError, match="signed two different heads for entry 3"):
        cp.import_peer(mine, second.as_json(), peer.trust, now=T0, me=TONGJIANG)
    with pytest.raises(InputError, match="own log"):
        cp.import_peer(mine, first.as_json(), peer.trust, now=T0, me=FULING)
    with pytest.raises(InputError, match="format"):
        cp.import_peer(mine, {"count": 3}, peer.trust, now=T0)
    with pytest.raises(BadSignature):
        cp.import_peer(mine, {**first.as_json(), "count": 2}, peer.trust, now=T0)
    for handle in (theirs, mine, rewritten):
        handle.conn.close()


def test_periodic_checkpoints(tmp_path: Path, database: str) -> None:
    pki = Pki(TONGJIANG)
    db = connect(locator(database, tmp_path))
    assert not cp.due(db, now=T0)  # nothing to sign yet
    fill(db, 2)
    assert cp.maybe_make(db, pki.signer, now=T0) is not None  # the first one is due at once
    assert cp.maybe_make(db, pki.signer, now=T0 + _dt.timedelta(hours=1)) is None  # nothing new since
    fill(db, 1)
    assert not cp.due(db, now=T0 + _dt.timedelta(minutes=4), every=_dt.timedelta(minutes=5))
    assert cp.due(db, now=T0 + _dt.timedelta(minutes=5), every=_dt.timedelta(minutes=5))
    assert cp.due(db, now=T0, every_entries=1)
    made = cp.maybe_make(db, pki.signer, now=T0 + _dt.timedelta(minutes=6))
    assert made is not None and made.count == 3
    claims, _ = cp.claims(db, pki.trust)
    assert verify(db, claims).checkpoints == 2
    db.conn.close()


def test_checkpoints_over_http(audit_client, tmp_path: Path, clock, database: str) -> None:
    client, tokens, db = audit_client
    me, peer = Pki(TONGJIANG), Pki(FULING)
    app = client.application
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    assert client.post("/audit/checkpoints", headers=admin).status_code == 500  # no signing key configured
    app.extensions["gateway.audit.signer"] = me.signer
    made = client.post("/audit/checkpoints", headers=admin)
    assert made.status_code == 201
    assert (made.get_json()["count"], made.get_json()["member"]) == (len(ROLES), TONGJIANG)
    listed = client.get("/audit/checkpoints?latest=1", headers={"Authorization": f"Bearer {tokens['peer']}"})
    assert [d["count"] for d in listed.get_json()] == [len(ROLES)]
    # The peer sends us its own checkpoint to hold.
    theirs = connect(locator(database, tmp_path, "theirs"))
    fill(theirs, 2)
    doc = cp.make(theirs, peer.signer, at=clock()).as_json()
    theirs.conn.close()
    peer_auth = {"Authorization": f"Bearer {tokens['peer']}", "Content-Type": "application/json"}
    assert client.post("/audit/checkpoints", headers=peer_auth, data=json.dumps(doc)).status_code == 500  # no trust
    app.extensions["gateway.trust"] = peer.trust
    held = client.post("/audit/checkpoints", headers=peer_auth, data=json.dumps(doc))
    assert held.status_code == 201 and held.get_json()["member"] == FULING
    mine = client.get(f"/audit/checkpoints?member={FULING}", headers=admin).get_json()
    assert [d["count"] for d in mine] == [2]
    forged = client.post("/audit/checkpoints", headers=peer_auth, data=json.dumps({**doc, "count": 1}))
    assert forged.status_code == 401 and forged.get_json()["resourceType"] == "OperationOutcome"
    junk = client.post("/audit/checkpoints", headers=peer_auth, data="not json")
    assert junk.status_code == 422
    # A peer cannot make this gateway sign.
    assert client.post("/audit/checkpoints", headers={"Authorization": f"Bearer {tokens['peer']}"}).status_code == 422
    assert head(db)[0] == len(ROLES)  # checkpoint traffic reads no entries and adds none


def test_every_audit_command_has_help() -> None:
    runner = CliRunner()
    assert audit.help
    for name, command in audit.commands.items():
        assert command.help, name
        res = runner.invoke(audit, [name, "--help"])
        assert res.exit_code == 0, name
        for param in command.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"{name} {param.name}"
    assert set(audit.commands) == {"verify", "query", "export", "stats", "checkpoint", "tail"}


def test_an_export_cut_short_is_audited_and_its_file_is_private(
        db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway audit export | head` (or Ctrl-C) showed entries — patient data — and wrote no audit entry: the look
    was recorded only after the whole export. It is recorded however the export ends, with the entries read out so
    far. An export file was 0644 (every user of the machine could read it): it is this user's alone."""
    import stat

    from gateway.audit import export as exporting

    real = exporting.lines

    def cut_short(items, fmt):  # type: ignore[no-untyped-def]
        for n, text in enumerate(real(items, fmt)):
            if n == 2:
                raise KeyboardInterrupt
            yield text

    monkeypatch.setattr(exporting, "lines", cut_short)
    out = tmp_path / "cut.ndjson"
    res = CliRunner().invoke(audit, ["export", "--db", str(db_path), "--format", "ndjson", "--out", str(out)])
    assert res.exit_code != 0
    db = connect(db_path)
    [looked] = list(entries(db, 6))
    assert looked.event()["subtype"][0]["code"] == "operation"
    assert "export" in json.dumps(looked.content, ensure_ascii=False)
    db.conn.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    monkeypatch.undo()
    old = tmp_path / "old.csv"
    old.write_text("")
    old.chmod(0o644)
    assert CliRunner().invoke(audit, ["export", "--db", str(db_path), "--out", str(old)]).exit_code == 0
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
