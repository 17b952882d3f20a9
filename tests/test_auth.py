"""Access: bearer tokens stored as hashes, roles, 401/403 as OperationOutcome, auditors read only, users CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import FULING
from test_audit_support import ME, ROLES, SETUP, serving

from gateway import auth
from gateway.audit.log import entries, head
from gateway.commands.users import users
from gateway.errors import InputError, NotFound
from gateway.store.db import connect


@pytest.fixture
def audit_client(settings, clock):
    with serving(settings, clock) as served:
        yield served


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_token_is_401_with_a_challenge(audit_client) -> None:
    client, _, db = audit_client
    before = head(db)[0]
    res = client.get("/fhir/AuditEvent")
    assert res.status_code == 401
    assert res.headers["WWW-Authenticate"].startswith("Bearer")
    body = res.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"
    assert head(db)[0] == before  # nothing was read, nothing is logged as read


@pytest.mark.parametrize("header", ["Bearer cyhr_not-a-real-token", "Bearer something-else", "Bearer "])
def test_unknown_token_is_401(audit_client, header: str) -> None:
    client, _, _ = audit_client
    res = client.get("/audit/stats", headers={"Authorization": header})
    assert res.status_code == 401 and res.get_json()["issue"][0]["code"] == "login"


def test_other_schemes_are_not_credentials(audit_client) -> None:
    client, _, _ = audit_client
    assert client.get("/audit/stats", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401


@pytest.mark.parametrize(
    "role, method, path, status",
    [
        ("auditor", "GET", "/fhir/AuditEvent", 200),
        ("admin", "GET", "/fhir/AuditEvent", 200),
        ("submitter", "GET", "/fhir/AuditEvent", 403),
        ("peer", "GET", "/fhir/AuditEvent", 403),
        ("auditor", "GET", "/fhir/AuditEvent/1", 200),
        ("submitter", "GET", "/fhir/AuditEvent/1", 403),
        ("auditor", "GET", "/audit/stats", 200),
        ("peer", "GET", "/audit/stats", 403),
        ("auditor", "GET", "/audit/checkpoints", 200),
        ("peer", "GET", "/audit/checkpoints", 200),
        ("submitter", "GET", "/audit/checkpoints", 403),
        ("auditor", "POST", "/audit/checkpoints", 403),  # auditors change nothing
        ("submitter", "POST", "/audit/checkpoints", 403),
    ],
)
def test_roles(audit_client, role: str, method: str, path: str, status: int) -> None:
    client, tokens, _ = audit_client
    res = client.open(path, method=method, headers=bearer(tokens[role]))
    assert res.status_code == status, res.get_data(as_text=True)
    if status == 403:
        issue = res.get_json()["issue"][0]
        assert issue["code"] == "forbidden" and f"{role}1" in issue["diagnostics"]


def test_tokens_are_stored_only_as_hashes(audit_client) -> None:
    _, tokens, db = audit_client
    stored = db.execute("SELECT hash, hint FROM gateway_token").fetchall()
    for token in tokens.values():
        assert token.startswith("cyhr_") and len(token) > 40
        assert (hashlib.sha256(token.encode()).hexdigest(), token[:9]) in stored
    dump = "\n".join(db.conn.iterdump())
    assert not any(token in dump for token in tokens.values())


def test_disabled_user_is_locked_out(audit_client, clock: Any) -> None:
    client, tokens, db = audit_client
    assert client.get("/audit/stats", headers=bearer(tokens["auditor"])).status_code == 200
    auth.disable_user(db, "auditor1", at=clock(), gateway=ME, by=SETUP)
    assert client.get("/audit/stats", headers=bearer(tokens["auditor"])).status_code == 401
    with pytest.raises(InputError, match="disabled"):
        auth.issue_token(db, "auditor1", at=clock(), gateway=ME, by=SETUP)


def test_every_read_of_the_log_is_itself_logged(audit_client) -> None:
    client, tokens, db = audit_client
    before = head(db)[0]
    res = client.get(
        "/fhir/AuditEvent?patient:identifier=510104199001011232&_count=5",
        headers={**bearer(tokens["auditor"]), "User-Agent": "audit-browser/1.0"},
    )
    assert res.status_code == 200
    logged = list(entries(db, before + 1))
    assert len(logged) == 1
    event = logged[0].event()
    assert event["meta"]["profile"] == [
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery"
    ]
    user = next(a for a in event["agent"] if a["type"]["coding"][0]["code"] == "IRCP")
    assert user["who"]["identifier"]["value"] == "auditor1" and user["requestor"] is True
    assert user["role"][0]["coding"][0]["code"] == "auditor"
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    assert query["description"] == "GET /fhir/AuditEvent?patient:identifier=510104199001011232&_count=5"
    client.get("/audit/stats", headers=bearer(tokens["admin"]))
    client.get(f"/fhir/AuditEvent/{before}", headers=bearer(tokens["admin"]))
    kinds = [(e.kind, e.event()["subtype"][0]["code"]) for e in entries(db, before + 2)]
    assert kinds == [("query", "operation"), ("query", "read")]


def test_user_changes_are_logged(audit_client) -> None:
    _, _, db = audit_client
    events = [e.event() for e in entries(db, 1, len(ROLES))]
    assert {e["type"]["code"] for e in events} == {"110113"}  # DICOM Security Alert
    assert [e["entity"][0]["what"]["identifier"]["value"] for e in events] == [f"{r}1" for r in ROLES]


def test_pluggable_authenticators(audit_client) -> None:
    client, _, _ = audit_client

    def signed_peer(request: Any, db: Any) -> auth.Principal | None:
        if request.headers.get("X-Test-Peer") != FULING:
            return None
        return auth.Principal("gw-" + FULING, frozenset({"peer"}), FULING, via="jwt")

    client.application.extensions["gateway.authenticators"] = [signed_peer, auth.bearer_token]
    assert client.get("/audit/checkpoints", headers={"X-Test-Peer": FULING}).status_code == 200
    assert client.get("/fhir/AuditEvent", headers={"X-Test-Peer": FULING}).status_code == 403
    assert client.get("/audit/checkpoints").status_code == 401


def test_require_role_knows_its_roles() -> None:
    with pytest.raises(ValueError):
        auth.require_role("superuser")
    with pytest.raises(ValueError):
        auth.require_role()


def test_user_rules(tmp_path: Path, clock: Any) -> None:
    db = connect(tmp_path / "u.db")
    with pytest.raises(InputError, match="exists already"):
        auth.add_user(db, "a", ["auditor"], at=clock(), gateway=ME, by=SETUP)
        auth.add_user(db, "a", ["admin"], at=clock(), gateway=ME, by=SETUP)
    with pytest.raises(InputError, match="unknown role"):
        auth.add_user(db, "b", ["root"], at=clock(), gateway=ME, by=SETUP)
    with pytest.raises(InputError, match="member"):
        auth.add_user(db, "c", ["peer"], at=clock(), gateway=ME, by=SETUP)
    with pytest.raises(InputError, match="member"):
        auth.add_user(db, "d", ["auditor"], member=FULING, at=clock(), gateway=ME, by=SETUP)
    with pytest.raises(InputError, match="name"):
        auth.add_user(db, "no spaces", ["auditor"], at=clock(), gateway=ME, by=SETUP)
    with pytest.raises(NotFound):
        auth.disable_user(db, "nobody", at=clock(), gateway=ME, by=SETUP)
    db.conn.close()


def test_users_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    db = str(tmp_path / "gw.db")
    added = runner.invoke(users, ["add", "li.auditor", "--role", "auditor", "--db", db])
    assert added.exit_code == 0, added.output
    token = added.output.strip().splitlines()[-1]
    assert token.startswith("cyhr_") and "shown only now" in added.output
    peer = runner.invoke(users, ["add", "fuling-gw", "--role", "peer", "--member", FULING, "--db", db])
    assert peer.exit_code == 0, peer.output
    listed = runner.invoke(users, ["list", "--db", db])
    assert "li.auditor" in listed.output and "auditor" in listed.output and token not in listed.output
    assert FULING in listed.output
    again = runner.invoke(users, ["add", "li.auditor", "--role", "admin", "--db", db])
    assert again.exit_code == 1 and again.output.strip() == "Error: name: user 'li.auditor' exists already"
    bad = runner.invoke(users, ["add", "x", "--role", "root", "--db", db])
    assert bad.exit_code == 2 and "root" in bad.output
    second = runner.invoke(users, ["token", "li.auditor", "--db", db])
    assert second.exit_code == 0 and second.output.strip().splitlines()[-1] != token
    off = runner.invoke(users, ["disable", "li.auditor", "--db", db])
    assert off.exit_code == 0 and "disabled" in off.output
    database = connect(db)
    with pytest.raises(auth.NotAuthenticated):
        auth.authenticate_token(database, token)
    assert (
        auth.authenticate_token(
            database, runner.invoke(users, ["token", "fuling-gw", "--db", db]).output.strip().splitlines()[-1]
        ).member
        == FULING
    )
    database.conn.close()
    missing = runner.invoke(users, ["disable", "nobody", "--db", db])
    assert missing.exit_code == 1 and "no user 'nobody'" in missing.output


def test_every_users_command_has_help() -> None:
    runner = CliRunner()
    for name, command in users.commands.items():
        assert command.help, name
        assert runner.invoke(users, [name, "--help"]).exit_code == 0
        for param in command.params:
            if hasattr(param, "help") and param.param_type_name == "option":
                assert param.help, f"{name} {param.name}"
