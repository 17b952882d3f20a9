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
from gateway.store import schema
from gateway.store.accounts import Accounts
from gateway.store.db import connect, dialect


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
    assert res.headers["WWW-Authenticate"] == "Bearer"  # RFC 6750 3.1: no credentials, no error code
    body = res.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "login"
    assert head(db)[0] == before  # nothing was read, nothing is logged as read


@pytest.mark.parametrize("header, error", [("Bearer cyhr_not-a-real-token", "invalid_token"),
                                           ("Bearer something-else", "invalid_token"),
                                           ("Bearer ", "invalid_request"), ("Bearer two tokens", "invalid_request")])
def test_unknown_token_is_401(audit_client, header: str, error: str) -> None:
    client, _, _ = audit_client
    res = client.get("/audit/stats", headers={"Authorization": header})
    assert res.status_code == 401 and res.get_json()["issue"][0]["code"] == "login"
    # RFC 6750 3.1: a token sent and refused is said to be so (a client library then gets a new one)
    challenge = res.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer error="{error}", error_description="') and challenge.endswith('"')


def test_other_schemes_are_not_credentials(audit_client) -> None:
    client, _, _ = audit_client
    res = client.get("/audit/stats", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert res.status_code == 401 and res.headers["WWW-Authenticate"] == "Bearer"  # (no bearer token was sent)


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
    assert not any(token in _dump(db) for token in tokens.values())


def _dump(db: Any) -> str:
    """Everything the database holds, as text."""
    if dialect(db) == "sqlite":
        return "\n".join(db.conn.iterdump())
    tables = [r[0] for r in db.execute("SELECT table_name FROM information_schema.tables"
                                       " WHERE table_schema = current_schema() ORDER BY table_name")]
    return "\n".join(repr(row) for table in tables for row in db.execute(f"SELECT * FROM {table}"))


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


def test_user_rules(tmp_path: Path, clock: Any, database: str) -> None:
    db = connect(database or tmp_path / "u.db")
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


def test_users_cli(tmp_path: Path, database: str) -> None:
    runner = CliRunner()
    db = database or str(tmp_path / "gw.db")
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


def test_one_leaked_token_is_revoked_and_the_accounts_other_tokens_still_work(tmp_path: Path, database: str) -> None:
    """A LIS token that leaked could only be stopped with `users disable`: every token of the account, no way back
    (the LIS moved to a new account name). `users tokens` lists each token by its first characters; `users revoke`
    stops one, by those characters or by the token itself (--token-file); audited; the others keep working."""
    runner = CliRunner()
    db = database or str(tmp_path / "gw.db")
    first = runner.invoke(users, ["add", "lis", "--role", "submitter", "--db", db]).output.strip().splitlines()[-1]
    second = runner.invoke(users, ["token", "lis", "--db", db]).output.strip().splitlines()[-1]
    third = runner.invoke(users, ["token", "lis", "--db", db]).output.strip().splitlines()[-1]
    listed = runner.invoke(users, ["tokens", "lis", "--db", db])
    assert listed.exit_code == 0 and listed.output.count(" live") == 3 and first not in listed.output
    assert f"{first[:9]}…" in listed.output
    by_start = runner.invoke(users, ["revoke", "lis", first[:9], "--db", db])
    assert by_start.exit_code == 0 and "revoked" in by_start.output and first not in by_start.output, by_start.output
    leaked = tmp_path / "leaked.txt"
    leaked.write_text(second + "\n", encoding="utf-8")
    by_token = runner.invoke(users, ["revoke", "lis", "--token-file", str(leaked), "--db", db])
    assert by_token.exit_code == 0, by_token.output
    database_ = connect(db)
    try:
        for gone in (first, second):
            with pytest.raises(auth.NotAuthenticated):
                auth.authenticate_token(database_, gone)
        assert auth.authenticate_token(database_, third).name == "lis"
        from gateway.audit.log import entries

        revoked = [e for e in entries(database_) if e.kind == "security" and e.facts.get("action") == "token-revoked"]
        assert len(revoked) == 2
    finally:
        database_.conn.close()
    listed = runner.invoke(users, ["tokens", "lis", "--db", db])
    assert listed.output.count(" live") == 1 and listed.output.count("revoked") == 2
    again = runner.invoke(users, ["revoke", "lis", "--token-file", str(leaked), "--db", db])
    assert again.exit_code == 1 and again.output.startswith("Error: ") and second not in again.output
    assert len(again.output.strip().splitlines()) == 1
    neither = runner.invoke(users, ["revoke", "lis", "--db", db])
    assert neither.exit_code == 2 and "TOKEN_START" in neither.output


def test_every_users_command_has_help() -> None:
    runner = CliRunner()
    for name, command in users.commands.items():
        assert command.help, name
        assert runner.invoke(users, [name, "--help"]).exit_code == 0
        for param in command.params:
            if hasattr(param, "help") and param.param_type_name == "option":
                assert param.help, f"{name} {param.name}"


T = "2026-11-22T09:30:00.000+08:00"


def test_accounts_are_stored_alike_on_both_engines(tmp_path: Path, database: str) -> None:
    db = connect(database or tmp_path / "a.db")
    accounts = Accounts(db)
    assert accounts.token_owner("0" * 64) is None  # a new database: the tables are made on first use
    assert schema.version(db, "accounts") == 2
    assert accounts.add_user("b.user", "auditor", None, T)
    assert not accounts.add_user("b.user", "admin", None, T)  # the name is taken: nothing written
    for name in ("a_x", "a.x", "B"):
        assert accounts.add_user(name, "auditor", None, T)
    assert [u.name for u in accounts.users()] == ["B", "a.x", "a_x", "b.user"]  # byte order, on both engines
    for i, expires in enumerate(["2027-03-01", None, "2027-01-01"]):
        accounts.add_token(f"h{i}", "b.user", "cyhr_x", T, expires)
    assert accounts.token_expiries("b.user") == ["2027-03-01", None, "2027-01-01"]  # made in one instant: in order
    assert accounts.token_owner("h1") == ("b.user", "auditor", None, None)
    assert accounts.user("b.user") == ("b.user", "auditor", None, T, None, 3)
    accounts.disable_user("b.user", "2026-11-23")
    assert accounts.token_owner("h1") is None and accounts.token_expiries("b.user") == []
    assert accounts.user("b.user") == ("b.user", "auditor", None, T, "2026-11-23", 0)

    assert accounts.login_state("a.x") == ("auditor", None, None, None, None) and accounts.login_state("z") is None
    accounts.set_password("a.x", "hash-1", T)
    accounts.record_login_failures("a.x", 3, "2026-11-22T10:00:00+08:00")
    assert accounts.login_state("a.x") == ("auditor", None, "hash-1", 3, "2026-11-22T10:00:00+08:00")
    accounts.set_password("a.x", "hash-2", T)  # a new password lifts the lock-out
    assert accounts.login_state("a.x") == ("auditor", None, "hash-2", 0, None)
    assert accounts.password_hash("a.x") == "hash-2" and accounts.password_hash("B") is None

    accounts.open_session("k1", "a.x", "csrf-1", T)
    assert accounts.live_session("k1") == ("a.x", "csrf-1", T, "auditor", None)
    accounts.touch_session("k1", "2026-11-22T09:40:00.000+08:00")
    assert accounts.live_session("k1").seen == "2026-11-22T09:40:00.000+08:00"
    accounts.end_session("k1", "2026-11-22T09:41:00.000+08:00")
    assert accounts.live_session("k1") is None

    assert accounts.add_client("lis", "submitter", "system/Bundle.c", '{"keys": []}', None, T)
    assert not accounts.add_client("lis", "admin", "system/*.rs", None, "https://x", T)
    assert accounts.add_client("LIS-2", "auditor", "system/AuditEvent.rs", None, "https://x/jwks", T)
    assert [c.client_id for c in accounts.clients()] == ["LIS-2", "lis"]
    accounts.add_access_token("t1", "lis", "system/Bundle.c", T, 100.0, forget_before=0.0)
    accounts.add_access_token("t2", "lis", "system/Bundle.c", T, 200.5, forget_before=150.0)  # t1 is forgotten
    assert accounts.access_token("t1") is None
    assert accounts.access_token("t2") == ("lis", "system/Bundle.c", 200.5, "submitter")
    accounts.disable_client("lis", "2026-11-23")
    assert accounts.access_token("t2") is None and accounts.client("lis").disabled == "2026-11-23"
    db.conn.close()


@pytest.mark.parametrize("via", ["access", "api"])
def test_a_request_s_token_costs_one_query(tmp_path: Path, clock: Any, database: str, via: str) -> None:
    from gateway import clients

    locator = database or tmp_path / "gw.db"
    setup = connect(locator)
    _, token = auth.add_user(setup, "lis", ["submitter"], at=clock(), gateway=ME, by=SETUP)
    clients.ensure_schema(setup)
    setup.conn.close()
    db = connect(locator)  # as each request opens one
    statements: list[str] = []
    execute = db.execute

    def counted(sql: str, *args: Any) -> Any:
        statements.append(sql)
        return execute(sql, *args)

    db.execute = counted
    if via == "api":
        assert auth.authenticate_token(db, token, clock()).name == "lis"
    else:
        with pytest.raises(auth.NotAuthenticated):
            clients.authenticate_access_token(db, clients.ACCESS_TOKEN_PREFIX + "unknown", at=clock())
    assert len(statements) == 1, statements
    db.conn.close()


_OLD_LAYOUT = """
CREATE TABLE gateway_user (name TEXT PRIMARY KEY, roles TEXT NOT NULL, member TEXT, created TEXT NOT NULL,
                           disabled TEXT);
CREATE TABLE gateway_token (hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES gateway_user (name),
                            hint TEXT NOT NULL, created TEXT NOT NULL, revoked TEXT);
"""


@pytest.mark.parametrize("first", ["authenticate", "add"])
def test_a_database_made_before_tokens_expired_is_brought_up_to_date(
        tmp_path: Path, clock: Any, first: str) -> None:
    """An SQLite file of an earlier release: its tokens keep working and are listed as never expiring."""
    path = tmp_path / "old.db"
    old = connect(path)
    old.conn.executescript(_OLD_LAYOUT)
    old.execute("INSERT INTO gateway_user VALUES ('li.auditor', 'auditor', NULL, ?, NULL)", [T])
    old.execute("INSERT INTO gateway_token VALUES (?, 'li.auditor', 'cyhr_abcd', ?, NULL)",
                [auth.token_hash("cyhr_old-token"), T])
    old.conn.close()
    db = connect(path)
    if first == "authenticate":
        assert auth.authenticate_token(db, "cyhr_old-token", clock()).name == "li.auditor"
    else:
        auth.add_user(db, "wang.admin", ["admin"], at=clock(), gateway=ME, by=SETUP)
        assert auth.authenticate_token(db, "cyhr_old-token", clock()).name == "li.auditor"
    assert "expires" in schema.columns(db, "gateway_token") and schema.version(db, "accounts") == 2
    assert auth.get_user(db, "li.auditor").token_expiries == (None,)
    db.conn.close()
