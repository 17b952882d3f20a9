"""SMART Backend Services: a backend client whose JWT assertion is built by an outside library (Authlib) gets
an access token and reads results; every way of getting it wrong is refused with the OAuth error SMART asks
for, and audited; scopes are enforced per route; static API tokens expire."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from authlib.oauth2.rfc7523 import private_key_jwt_sign
from click.testing import CliRunner
from conftest import DATA, TONGJIANG, make_token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk

from gateway import auth, clients
from gateway.audit.log import entries
from gateway.audit.records import Party
from gateway.cli import cli
from gateway.scopes import required_scope

UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
GATEWAY = shutil.which("gateway") or str(Path(sys.executable).with_name("gateway"))
FORM = "application/x-www-form-urlencoded"
SCOPES = "system/DiagnosticReport.rs system/Observation.read system/Bundle.c"


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _joserfc(key: Any) -> Any:
    """The private key as Authlib's JOSE layer (joserfc) takes it."""
    from joserfc.jwk import ECKey, RSAKey

    return (RSAKey if isinstance(key, rsa.RSAPrivateKey) else ECKey).import_key(_pem(key))


def _jwks(key: Any, kid: str) -> str:
    public = jwk.JWK.from_pem(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return json.dumps({"keys": [{**json.loads(public.export_public()), "kid": kid}]})


class Backend:
    """A backend system: its private key, and assertions signed with Authlib (RFC 7523 private_key_jwt)."""

    def __init__(self, client_id: str, key: Any, kid: str, alg: str = "ES256") -> None:
        self.client_id, self.key, self.kid, self.alg = client_id, key, kid, alg

    def assertion(self, aud: str, now: float, *, lifetime: int = 240, jti: str | None = None,
                  key: Any = None, iss: str | None = None) -> str:
        claims = {"jti": jti} if jti else None
        return private_key_jwt_sign(_joserfc(key or self.key), iss or self.client_id, aud, alg=self.alg,
                                    claims=claims, header={"kid": self.kid, "typ": "JWT"},
                                    issued_at=int(now), expires_at=int(now) + lifetime)

    def form(self, assertion: str, scope: str = SCOPES) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_assertion_type": clients.ASSERTION_TYPE,
                "client_assertion": assertion, "scope": scope}


@pytest.fixture
def world(app: Any, clock: Any) -> Any:
    """The app, its database, a registered ES256 client (JWKS) and the token endpoint the client addresses."""
    pipe = app.extensions["gateway.pipeline"]
    settings = app.extensions["gateway.settings"]
    me = Party.member(settings.issuer_uscc)
    key = ec.generate_private_key(ec.SECP256R1())
    clients.add_client(pipe.store.db, "lis-engine", "submitter", SCOPES, at=clock(), gateway=me,
                       by=Party("test-setup"), jwks=_jwks(key, "lis-2026"))

    class World:
        pass

    w = World()
    w.app, w.db, w.clock, w.me = app, pipe.store.db, clock, me
    w.http = app.test_client()
    w.backend = Backend("lis-engine", key, "lis-2026")
    w.aud = clients.token_endpoint(settings)  # http://127.0.0.1:8080/auth/token, the configured form
    return w


def _token(w: Any, **kwargs: Any) -> Any:
    scope = kwargs.pop("scope", SCOPES)
    assertion = w.backend.assertion(kwargs.pop("aud", w.aud), w.clock().timestamp(), **kwargs)
    return w.http.post("/auth/token", data=w.backend.form(assertion, scope), content_type=FORM)


def _token_log(w: Any) -> list[dict[str, Any]]:
    return [dict(e.facts) for e in entries(w.db) if e.kind == "token"]


def test_discovery_names_the_token_endpoint_and_what_it_accepts(world: Any) -> None:
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        res = world.http.get(path)
        assert res.status_code == 200 and res.mimetype == "application/json"
        conf = res.get_json()
        assert conf["token_endpoint"] == "http://localhost/auth/token"  # no public_url: as the client reached us
        assert conf["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
        assert {"ES256", "RS384", "ES384"} <= set(conf["token_endpoint_auth_signing_alg_values_supported"])
        assert conf["grant_types_supported"] == ["client_credentials"]
        assert "client-confidential-asymmetric" in conf["capabilities"]
        assert "system/DiagnosticReport.rs" in conf["scopes_supported"]
    security = clients.smart_security(world.app.extensions["gateway.settings"])
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert security["extension"][0]["extension"][0] == {"url": "token", "valueUri": world.aud}


def test_a_backend_client_gets_a_token_and_reads_reports(world: Any) -> None:
    res = _token(world)
    assert res.status_code == 200, res.get_data(as_text=True)
    assert res.headers["Cache-Control"] == "no-store"
    body = res.get_json()
    assert body["token_type"] == "bearer" and body["expires_in"] == clients.ACCESS_TOKEN_SECONDS
    assert body["scope"].split() == SCOPES.split()
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    sent = world.http.post("/ingest/hl7v2", data=UTF8, headers=headers)  # system/Bundle.c
    assert sent.status_code == 200 and sent.headers["X-Ack-Code"] == "AA"
    found = world.http.get("/fhir/DiagnosticReport", headers=headers)
    assert found.status_code == 200, found.get_data(as_text=True)
    reports = [e["resource"] for e in found.get_json().get("entry", [])]
    assert reports and reports[0]["resourceType"] == "DiagnosticReport"
    one = world.http.get(f"/fhir/DiagnosticReport/{reports[0]['id']}", headers=headers)
    assert one.status_code == 200
    issued = _token_log(world)[-1]
    assert issued["outcome"] == "0" and issued["client"]["value"] == "lis-engine"
    assert issued["scopes"] == SCOPES.split() and issued["roles"] == ["submitter"]


def test_the_request_url_form_of_the_endpoint_is_an_audience_too(world: Any) -> None:
    """Without a public_url the gateway does not know which name it is reached by: the request's form is taken."""
    assert not world.app.extensions["gateway.settings"].public_url
    assert _token(world, aud="http://localhost/auth/token").status_code == 200


def test_with_a_public_url_an_assertion_for_another_server_is_refused_whatever_the_host_header(world: Any) -> None:
    """An assertion made for another member's gateway (or any server), posted here with a Host header naming that
    server, got a token: ``aud`` is checked against the public_url only once there is one."""
    settings = world.app.extensions["gateway.settings"]
    world.app.extensions["gateway.settings"] = settings.replace(public_url="https://tj.example.cn")
    try:
        other = "http://fl.example.cn/auth/token"
        assertion = world.backend.assertion(other, world.clock().timestamp())
        refused = world.http.post("/auth/token", data=world.backend.form(assertion, SCOPES), content_type=FORM,
                                  headers={"Host": "fl.example.cn"})
        assert refused.status_code == 401 and "aud" in refused.get_json()["error_description"], refused.get_json()
        ours = world.backend.assertion("https://tj.example.cn/auth/token", world.clock().timestamp())
        assert world.http.post("/auth/token", data=world.backend.form(ours, SCOPES), content_type=FORM,
                               headers={"Host": "fl.example.cn"}).status_code == 200
    finally:
        world.app.extensions["gateway.settings"] = settings


def test_only_registered_scopes_are_granted(world: Any) -> None:
    res = _token(world, scope="system/DiagnosticReport.rs system/AuditEvent.rs")
    assert res.status_code == 200 and res.get_json()["scope"] == "system/DiagnosticReport.rs"
    refused = _token(world, scope="system/AuditEvent.read")
    assert refused.status_code == 400 and refused.get_json()["error"] == "invalid_scope"
    assert _token(world, scope="patient/Observation.read").get_json()["error"] == "invalid_scope"
    assert _token(world, scope="").get_json()["error"] == "invalid_scope"
    assert "scope not registered" in _token_log(world)[-3]["reason"]


def _refused(res: Any, error: str = "invalid_client", status: int = 401) -> str:
    assert res.status_code == status, res.get_data(as_text=True)
    body = res.get_json()
    assert body["error"] == error and body["error_description"]
    assert "Traceback" not in res.get_data(as_text=True)
    return str(body["error_description"])


def test_wrong_key_expired_replayed_wrong_aud_and_unknown_client_are_refused(world: Any) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    _refused(_token(world, key=other))
    world.clock.advance(minutes=-10)  # an assertion made ten minutes ago has expired
    stale = world.backend.assertion(world.aud, world.clock().timestamp())
    world.clock.advance(minutes=10)
    _refused(world.http.post("/auth/token", data=world.backend.form(stale), content_type=FORM))
    assert "at most 5 minutes" in _refused(_token(world, lifetime=3600))
    assert _token(world, jti="once-only").status_code == 200
    assert "used before" in _refused(_token(world, jti="once-only"))
    assert "aud" in _refused(_token(world, aud="https://elsewhere.example/auth/token"))
    assert "unknown or disabled" in _refused(_token(world, iss="nobody"))
    reasons = [e["reason"] for e in _token_log(world) if e["outcome"] != "0"]
    assert reasons == ["invalid_client: bad signature", "invalid_client: expired assertion",
                       "invalid_client: exp too far", "invalid_client: jti replayed", "invalid_client: wrong aud",
                       "invalid_client: unknown client"]
    assert _token_log(world)[-1]["client"]["value"] == "nobody"


def test_malformed_requests_get_oauth_errors(world: Any) -> None:
    post = world.http.post
    assert _refused(post("/auth/token", json={"grant_type": "client_credentials"}), "invalid_request", 400)
    form = world.backend.form(world.backend.assertion(world.aud, world.clock().timestamp()))
    assert _refused(post("/auth/token", data={**form, "grant_type": "password"}, content_type=FORM),
                    "unsupported_grant_type", 400)
    assert _refused(post("/auth/token", data={**form, "client_assertion_type": "x"}, content_type=FORM),
                    "invalid_request", 400)
    _refused(post("/auth/token", data={**form, "client_assertion": "not.a.jwt"}, content_type=FORM))
    # RFC 6749 3.2: a parameter sent twice is refused, whichever of its values would have been taken
    from urllib.parse import urlencode

    twice = urlencode([*form.items(), ("grant_type", "client_credentials")])
    answer = post("/auth/token", data=twice, content_type=FORM)
    assert _refused(answer, "invalid_request", 400) and "grant_type" in answer.get_json()["error_description"]
    assert post("/auth/token", data=urlencode(list(form.items())), content_type=FORM).status_code == 200


def test_a_disabled_client_gets_no_token_and_its_tokens_stop(world: Any) -> None:
    access = _token(world).get_json()["access_token"]
    headers = {"Authorization": f"Bearer {access}"}
    assert world.http.get("/fhir/DiagnosticReport", headers=headers).status_code == 200
    clients.disable_client(world.db, "lis-engine", at=world.clock(), gateway=world.me, by=Party("it"))
    assert world.http.get("/fhir/DiagnosticReport", headers=headers).status_code == 401
    assert "unknown or disabled" in _refused(_token(world))
    assert _token_log(world)[-1]["reason"] == "invalid_client: disabled"


def test_an_access_token_expires(world: Any) -> None:
    access = _token(world).get_json()["access_token"]
    world.clock.advance(seconds=clients.ACCESS_TOKEN_SECONDS + 1)
    res = world.http.get("/fhir/DiagnosticReport", headers={"Authorization": f"Bearer {access}"})
    assert res.status_code == 401 and "expired" in res.get_json()["issue"][0]["diagnostics"]


def test_scopes_are_enforced_per_route_beside_roles(world: Any) -> None:
    access = _token(world, scope="system/Observation.read").get_json()["access_token"]
    headers = {"Authorization": f"Bearer {access}"}
    assert world.http.get("/fhir/Observation", headers=headers).status_code == 200
    res = world.http.get("/fhir/DiagnosticReport", headers=headers)
    assert res.status_code == 403
    issue = res.get_json()["issue"][0]
    assert issue["code"] == "forbidden" and "system/DiagnosticReport.s" in issue["diagnostics"]
    # RFC 6750 3.1: the refusal says so to the client's library too, with the scope it needs
    assert res.headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="system/DiagnosticReport.s"'
    refused = world.http.post("/ingest/hl7v2", data=UTF8, headers=headers)
    assert refused.status_code == 403 and "system/Bundle.c" in refused.get_json()["issue"][0]["diagnostics"]
    # The role still applies: a submitter client may not read the audit log whatever its scopes.
    pipe_db, me = world.db, world.me
    key = ec.generate_private_key(ec.SECP256R1())
    clients.add_client(pipe_db, "greedy", "submitter", "system/*.read", at=world.clock(), gateway=me,
                       by=Party("t"), jwks=_jwks(key, "k1"))
    greedy = Backend("greedy", key, "k1")
    form = greedy.form(greedy.assertion(world.aud, world.clock().timestamp()), "system/AuditEvent.read")
    token = world.http.post("/auth/token", data=form, content_type=FORM).get_json()["access_token"]
    assert world.http.get("/fhir/AuditEvent", headers={"Authorization": f"Bearer {token}"}).status_code == 403


def test_included_resources_are_only_those_the_token_may_read(world: Any) -> None:
    """_include and _revinclude add other types' resources to a search: an access token gets only those of the
    types its scopes let it read (system/{type}.r), as if it had read them one by one."""
    submitted = world.http.post("/ingest/hl7v2", data=UTF8, headers={
        "Authorization": f"Bearer {make_token(world.app, 'lis-test', ['submitter'])}"})
    assert submitted.status_code == 200, submitted.get_data(as_text=True)
    query = ("/fhir/DiagnosticReport?_include=DiagnosticReport:subject&_include=DiagnosticReport:result"
             "&_include=DiagnosticReport:performer")

    def types(scope: str) -> set[str]:
        access = _token(world, scope=scope).get_json()["access_token"]
        res = world.http.get(query, headers={"Authorization": f"Bearer {access}"})
        assert res.status_code == 200, res.get_data(as_text=True)
        return {e["resource"]["resourceType"] for e in res.get_json()["entry"]}

    assert types("system/DiagnosticReport.rs") == {"DiagnosticReport"}
    assert types("system/DiagnosticReport.rs system/Observation.read") == {"DiagnosticReport", "Observation"}
    # an API token of a role that reads everything still gets every included resource
    everything = world.http.get(query, headers={"Authorization": f"Bearer {make_token(world.app, 'it', ['admin'])}"})
    assert {"DiagnosticReport", "Observation", "Patient"} <= {e["resource"]["resourceType"]
                                                              for e in everything.get_json()["entry"]}
    access = _token(world, scope="system/Observation.read").get_json()["access_token"]
    revinclude = world.http.get("/fhir/Observation?_revinclude=DiagnosticReport:result",
                                headers={"Authorization": f"Bearer {access}"})
    assert revinclude.status_code == 200
    assert {e["resource"]["resourceType"] for e in revinclude.get_json()["entry"]} == {"Observation"}


def test_an_auditor_tool_with_rs384_and_a_pem_key_reads_the_audit_log(world: Any) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    client = clients.add_client(world.db, "qc-tool", "auditor", "system/AuditEvent.rs", at=world.clock(),
                                gateway=world.me, by=Party("t"), public_key_pem=pem, kid="qc-1")
    assert client.keys == "1 registered key(s): qc-1"
    tool = Backend("qc-tool", key, "qc-1", alg="RS384")
    form = tool.form(tool.assertion(world.aud, world.clock().timestamp()), "system/AuditEvent.rs")
    token = world.http.post("/auth/token", data=form, content_type=FORM).get_json()["access_token"]
    res = world.http.get("/fhir/AuditEvent?_count=5", headers={"Authorization": f"Bearer {token}"})
    assert res.status_code == 200 and res.get_json()["resourceType"] == "Bundle"
    events = res.get_json().get("entry", [])
    token_events = [e["resource"] for e in events
                    if e["resource"]["type"]["code"] == "110114"]
    assert token_events, "token requests are AuditEvents too"


def test_keys_published_at_a_url_are_fetched_and_jku_must_match(world: Any, tmp_path: Path) -> None:
    import http.server
    import threading

    key = ec.generate_private_key(ec.SECP256R1())
    body = _jwks(key, "url-1").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        clients.add_client(world.db, "engine", "submitter", "system/*.rs", at=world.clock(), gateway=world.me,
                           by=Party("t"), jwks_url=url)
        engine = Backend("engine", key, "url-1")
        ok = world.http.post("/auth/token", content_type=FORM, data=engine.form(
            engine.assertion(world.aud, world.clock().timestamp()), "system/Observation.rs"))
        assert ok.status_code == 200, ok.get_data(as_text=True)
        bad_jku = private_key_jwt_sign(_joserfc(key), "engine", world.aud, alg="ES256",
                                       header={"kid": "url-1", "jku": "http://127.0.0.1:1/evil.json"},
                                       issued_at=int(world.clock().timestamp()),
                                       expires_at=int(world.clock().timestamp()) + 60)
        _refused(world.http.post("/auth/token", content_type=FORM, data=engine.form(bad_jku, "system/Observation.rs")))
    finally:
        server.shutdown()
        clients.JWKS_CACHE.clear()


def test_route_scope_table() -> None:
    assert str(required_scope("GET", "/fhir/Observation/abc/_history/2")) .startswith("system/Observation.r ")
    assert required_scope("POST", "/fhir/DiagnosticReport/_search").letter == "s"
    assert required_scope("POST", "/fhir/Observation/$validate").letter == "r"
    assert required_scope("POST", "/fhir").type == "Bundle"
    assert required_scope("GET", "/console/") is None


def test_static_tokens_expire_and_old_ones_are_listed_without_expiry(app: Any, clock: Any, tmp_path: Path) -> None:
    http = app.test_client()
    token = make_token(app, "short", ["submitter"])  # default lifetime: a year
    assert http.get("/fhir/DiagnosticReport", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    db = app.extensions["gateway.pipeline"].store.db
    me = Party.member(TONGJIANG)
    brief = auth.issue_token(db, "short", at=clock(), gateway=me, by=Party("t"), expires_days=1)
    db.execute("UPDATE gateway_token SET expires = NULL WHERE hash = ?", [auth.token_hash(token)])  # pre-expiry
    clock.advance(days=2)
    res = http.get("/fhir/DiagnosticReport", headers={"Authorization": f"Bearer {brief}"})
    assert res.status_code == 401 and "expired" in res.get_json()["issue"][0]["diagnostics"]
    assert http.get("/fhir/DiagnosticReport", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    database = str(app.extensions["gateway.settings"].database_locator)
    listed = CliRunner().invoke(cli, ["users", "list", "--db", database])
    assert listed.exit_code == 0 and "no expiry" in listed.output and "expired" in listed.output


def test_clients_cli_add_list_disable(tmp_path: Path, database: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "lis.jwks.json"
    jwks.write_text(_jwks(key, "k1"), encoding="utf-8")
    db = database or str(tmp_path / "gw.db")
    runner = CliRunner()
    added = runner.invoke(cli, ["clients", "add", "lis", "--role", "submitter", "--scopes", SCOPES,
                                "--jwks-file", str(jwks), "--db", db])
    assert added.exit_code == 0, added.output
    assert "1 registered key(s): k1" in added.output and "/auth/token" in added.output
    assert runner.invoke(cli, ["clients", "add", "x", "--role", "submitter", "--scopes", "system/Foo.zz",
                               "--jwks-file", str(jwks), "--db", db]).exit_code == 1
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [{**json.loads(jwk.JWK.from_pem(_pem(key)).export()), "kid": "p"}]}))
    leaked = runner.invoke(cli, ["clients", "add", "y", "--role", "submitter", "--scopes", SCOPES,
                                 "--jwks-file", str(private), "--db", db])
    assert leaked.exit_code == 1 and "private" in leaked.output and "Traceback" not in leaked.output
    listed = runner.invoke(cli, ["clients", "list", "--json", "--db", db])
    assert [c["client_id"] for c in json.loads(listed.output)] == ["lis"]
    assert runner.invoke(cli, ["clients", "disable", "lis", "--db", db]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["clients", "list", "--json", "--db", db]).output)[0]["disabled"]


def test_a_real_gateway_serve_issues_tokens_to_an_authlib_session(tmp_path: Path, database: str) -> None:
    """Authlib's requests OAuth2Session does the whole dance against `gateway serve` on a free port."""
    from authlib.integrations.requests_client import OAuth2Session
    from authlib.oauth2.rfc7523 import PrivateKeyJWT

    from gateway.demo import free_port

    http = free_port()
    base = f"http://127.0.0.1:{http}"
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "gw"), "GATEWAY_ISSUER_USCC": TONGJIANG,
           "GATEWAY_HTTP_PORT": str(http), "GATEWAY_MLLP_PORT": "0", "GATEWAY_WORKERS": "1",
           "GATEWAY_THREADS": "2", "GATEWAY_LOG_LEVEL": "WARNING"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("GATEWAY_DATABASE", None)
    if database:
        env["GATEWAY_DATABASE"] = database
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "engine.jwks.json"
    jwks.write_text(_jwks(key, "engine-1"), encoding="utf-8")
    added = subprocess.run([GATEWAY, "clients", "add", "engine", "--role", "submitter", "--scopes", SCOPES,
                            "--jwks-file", str(jwks)], env=env, capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    proc = subprocess.Popen([GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conf = requests.get(f"{base}/.well-known/smart-configuration", timeout=5).json()
                break
            except (requests.ConnectionError, requests.Timeout):
                assert proc.poll() is None and time.monotonic() < deadline, "gateway serve did not start"
                time.sleep(0.3)
        endpoint = conf["token_endpoint"]
        assert endpoint == f"{base}/auth/token"
        auth_method = PrivateKeyJWT(endpoint, headers={"kid": "engine-1"}, alg="ES256",
                                    claims={"exp": int(time.time()) + 240})  # Authlib's default is an hour
        session = OAuth2Session("engine", _joserfc(key), token_endpoint_auth_method=auth_method,
                                scope="system/DiagnosticReport.rs")
        token = session.fetch_token(endpoint, grant_type="client_credentials")
        assert token["token_type"].lower() == "bearer" and token["scope"] == "system/DiagnosticReport.rs"
        found = session.get(f"{base}/fhir/DiagnosticReport", timeout=10)
        assert found.status_code == 200 and found.json()["resourceType"] == "Bundle"
        assert session.post(f"{base}/ingest/hl7v2", data=UTF8, timeout=10).status_code == 403  # not granted
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
