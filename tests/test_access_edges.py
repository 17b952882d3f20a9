"""Edges of access found by an outside security test: probes of whether a patient is held here that left no audit
entry ($validate of a stored resource, ``_history?_count=0``, Patient searches by name or a count), 调阅 by a bare
hospital number, time claims that are no numbers in signed assertions, token-endpoint answers that told clients
apart, and a registry self link built from the Host header."""
from __future__ import annotations

import base64
import datetime as _dt
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk, jws

from conftest import DATA, Clock
from gateway import clients
from gateway.audit.log import entries
from gateway.audit.records import Party
from gateway.naming import SYSTEM_ID_CARD, local_mrn_system

UTF8 = (DATA / "hl7v2" / "lis-v251-utf8.hl7").read_bytes()
ID_CARD = "511921196612120011"  # the patient of UTF8 (and of the demo LIS), 王建国, born 1966-12-12
MRN = "Z0099812"  # the same patient's number at 通江 (PID-3, TJXRMYY MR)
FORM = "application/x-www-form-urlencoded"
CST = _dt.timezone(_dt.timedelta(hours=8))


# --------------------------------------------------------------------------- 1. probes are audited


def _reads_after_a_message(client: Any, app: Any) -> Callable[[], list[dict[str, Any]]]:
    """A message stored, then a function giving the facts of the read entries the audit log gained since its last
    call."""
    assert client.post("/ingest/hl7v2", data=UTF8).status_code == 200
    db = app.extensions["gateway.pipeline"].store.db
    before = len(list(entries(db)))

    def new_reads() -> list[dict[str, Any]]:
        nonlocal before
        made = list(entries(db))[before:]
        before += len(made)
        return [dict(e.content["facts"]) for e in made if e.kind == "read"]
    return new_reads


def _patient_id(client: Any) -> str:
    return str(client.get("/fhir/Patient").get_json()["entry"][0]["resource"]["id"])


def test_validate_of_a_stored_patient_is_audited_held_or_not(client: Any, app: Any) -> None:
    """``GET /fhir/Patient/<id>/$validate`` answered 200 for a held patient and 404 otherwise, and wrote nothing
    to the audit log: now it is audited as a read of the stored resource is (a held patient by its 身份证号, one
    not held as the search ``_id=<id>``)."""
    new_reads = _reads_after_a_message(client, app)
    pid = _patient_id(client)
    new_reads()  # (that search's own entry)
    held = client.get(f"/fhir/Patient/{pid}/$validate")
    assert held.status_code == 200, held.get_data(as_text=True)
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"]["value"] == ID_CARD, reads
    assert reads[0]["resources"] == [f"Patient/{pid}"] and reads[0].get("query") is None, reads
    assert client.get("/fhir/Patient/no-such-patient/$validate").status_code == 404
    reads = new_reads()
    assert [r["patient"] for r in reads] == [{"reference": "Patient/no-such-patient"}], reads
    assert reads[0]["query"] == "_id=no-such-patient" and not reads[0].get("resources"), reads
    # a result validated in place names its patient too
    report = client.get("/fhir/DiagnosticReport").get_json()["entry"][0]["resource"]
    new_reads()
    assert client.get(f"/fhir/DiagnosticReport/{report['id']}/$validate").status_code == 200
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"]["value"] == ID_CARD, reads


def test_history_that_returns_no_version_is_audited(client: Any, app: Any) -> None:
    """``GET /fhir/Patient/<id>/_history?_count=0`` answered a total (held) or 404 (not held) with no audit entry:
    an access that answers whether a patient is here is audited even when no resource is returned."""
    new_reads = _reads_after_a_message(client, app)
    pid = _patient_id(client)
    new_reads()
    got = client.get(f"/fhir/Patient/{pid}/_history?_count=0")
    assert got.status_code == 200 and got.get_json()["total"] >= 1 and "entry" not in got.get_json()
    reads = new_reads()
    assert len(reads) == 1 and not reads[0].get("resources"), reads
    assert reads[0]["patient"] == {"reference": f"Patient/{pid}", "system": SYSTEM_ID_CARD, "value": ID_CARD}
    assert reads[0]["query"] == "_count=0", reads
    assert client.get("/fhir/Patient/no-such-patient/_history?_count=0").status_code == 404
    reads = new_reads()
    assert [r["patient"] for r in reads] == [{"reference": "Patient/no-such-patient"}], reads
    # the versions of every patient, counted: recorded too, by what was asked
    assert client.get("/fhir/Patient/_history?_count=0").get_json()["total"] >= 1
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"] == {"reference": "Patient?"} and not reads[0].get("resources")


@pytest.mark.parametrize("query, total", [
    ({"name": "王", "birthdate": "1966-12-12", "_count": "0"}, 1),
    ({"name": "王", "birthdate": "1966-12-12", "_summary": "count"}, 1),
    ({"family": "王", "given": "建国", "_count": "0"}, 1),
    ({"name": "李秀英", "birthdate": "1975-06-15"}, 0),
    ({"gender": "male", "_summary": "count"}, 1),
    ({"identifier": "urn:x-no-such-system|"}, 0),
])
def test_every_search_of_patient_is_audited_by_its_criteria(client: Any, app: Any, query: dict[str, str],
                                                            total: int) -> None:
    """A Patient search by name and birth date, a count of one (``_count=0``, ``_summary=count``) and a name search
    that finds nothing answered whether such a patient is here and wrote nothing to the audit log (only searches
    by ``identifier`` and ``_id`` were): each is one entry now, naming whom it asked about by its criteria (a
    conditional reference, holding no more than the query did), without resources."""
    new_reads = _reads_after_a_message(client, app)
    got = client.get("/fhir/Patient", query_string=query)
    assert got.status_code == 200 and got.get_json()["total"] == total, got.get_json()
    reads = new_reads()
    criteria = [(k, v) for k, v in query.items() if k not in ("_count", "_summary")]
    assert len(reads) == 1 and not reads[0].get("resources"), reads
    assert reads[0]["patient"] == {"reference": f"Patient?{urlencode(criteria)}"}, reads
    assert parse_qsl(reads[0]["query"], keep_blank_values=True) == list(query.items()), reads
    assert ID_CARD not in json.dumps(reads[0], ensure_ascii=False)  # (not more than the query held)
    # the same search posted is recorded the same way
    posted = client.post("/fhir/Patient/_search", data=query, content_type=FORM)
    assert posted.status_code == 200 and posted.get_json()["total"] == total
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"] == {"reference": f"Patient?{urlencode(criteria)}"}, reads


def test_a_patient_search_that_returns_patients_names_them_as_before(client: Any, app: Any) -> None:
    new_reads = _reads_after_a_message(client, app)
    got = client.get("/fhir/Patient", query_string={"name": "王"})
    assert got.get_json()["total"] == 1
    reads = new_reads()
    assert len(reads) == 1 and reads[0]["patient"]["value"] == ID_CARD and reads[0]["resources"], reads


# --------------------------------------------------------------------------- the member world (调阅, peers)


class _Routed:
    """A transport handing each request to the member app its URL names."""

    def __init__(self, world: Any) -> None:
        self.world = world

    def _client(self, url: str) -> Any:
        host = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
        return next(gw.app.test_client() for gw in self.world.gateways.values() if gw.url == host)

    def send(self, url: str, payload: bytes, headers: dict[str, str]) -> Any:
        from gateway.exchange.transports import classify

        resp = self._client(url).post(urlsplit(url).path, data=payload, headers=headers)
        return classify(resp.status_code, resp.data)

    def get(self, url: str, headers: dict[str, str]) -> Any:
        from gateway.exchange.transports import classify

        parts = urlsplit(url)
        resp = self._client(url).get(f"{parts.path}?{parts.query}", headers=headers)
        return classify(resp.status_code, resp.data)


@pytest.fixture
def world(tmp_path: Any, member_database: Any) -> Any:
    from gateway.demo.world import build_world

    clock = Clock(_dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST))
    urls = {"tongjiang": "http://tongjiang.test", "fuling": "http://fuling.test", "sccdc": "http://sccdc.test"}
    w = build_world(tmp_path, clock, urls, database=member_database)
    for gw in w.gateways.values():
        gw.pipeline.exchange.transport = _Routed(w)
    w.clock = clock
    return w


def _lis(world: Any) -> None:
    from pathlib import Path

    lis = (Path(__file__).resolve().parent.parent / "gateway" / "demo" / "data" / "hl7v2"
           / "tongjiang-county-lis.hl7")
    tj = world.gateways["tongjiang"].pipeline
    assert [o for o in tj.ingest(lis.read_bytes(), "hl7v2", channel="mllp") if o.bundle is not None]


def test_a_bare_identifier_in_a_lookup_is_the_id_card_only(world: Any) -> None:
    """调阅 by ``patient.identifier=Z0099812`` (a peer's signed assertion) matched 通江's own medical-record number:
    a peer could walk sequential MRNs. A bare value is the 身份证号 alone; ``system|value`` that system only."""
    _lis(world)
    tj_uscc = world.gateways["tongjiang"].member.uscc
    fl = world.gateways["fuling"].pipeline.exchange
    assert fl.pull(tj_uscc, MRN) == []  # a hospital number asked without its system: no patient
    assert fl.pull(tj_uscc, f"urn:x-other-system|{MRN}") == []
    assert len(fl.pull(tj_uscc, f"{local_mrn_system(tj_uscc)}|{MRN}")) == 1  # with its system: found (the
    # one message of the two naming the patient by that number too)
    assert len(fl.pull(tj_uscc, ID_CARD)) == 2  # a 身份证号 alone: found
    assert len(fl.pull(tj_uscc, f"{SYSTEM_ID_CARD}|{ID_CARD}")) == 2
    assert fl.pull(tj_uscc, f"{local_mrn_system(tj_uscc)}|{ID_CARD}") == []  # (the number under another system)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _peer_assertion(world: Any, caller: str, receiver: str, exp_json: str) -> str:
    """A correctly signed peer assertion from ``caller`` whose ``exp`` is the JSON text given."""
    from gateway.signing.jws import sign_detached

    ident = world.gateways[caller].pipeline.exchange.member.require_signer().identity
    now = int(world.clock().timestamp())
    payload = (f'{{"aud":"{world.gateways[receiver].url}/exchange","exp":{exp_json},"iat":{now},'
               f'"iss":"{ident.uscc}","jti":"j-{abs(hash(exp_json))}","sub":"{ident.uscc}"}}').encode()
    detached = sign_detached(payload, ident.key, list(ident.chain), sig_time=world.clock(),
                             extra_header={"typ": "JWT"})
    header, _, signature = detached.split(".")
    return f"{header}.{_b64(payload)}.{signature}"


@pytest.mark.parametrize("exp, said", [("NaN", "exp is not a finite number"),
                                       ("Infinity", "exp is not a finite number"),
                                       ('"1800000000"', "exp is not a number")])
def test_a_peer_assertion_whose_exp_is_no_number_is_a_401_naming_it(world: Any, exp: str, said: str) -> None:
    """A peer assertion with ``"exp": NaN`` made ``/exchange/DiagnosticReport`` answer 500."""
    token = _peer_assertion(world, "fuling", "tongjiang", exp)
    got = world.gateways["tongjiang"].app.test_client().get(
        "/exchange/DiagnosticReport", query_string={"patient.identifier": ID_CARD},
        headers={"Authorization": f"Bearer {token}"})
    assert got.status_code == 401, got.get_data(as_text=True)
    assert said in got.get_json()["issue"][0]["diagnostics"]


def test_a_peer_assertion_time_claim_that_is_no_number_is_refused() -> None:
    from gateway.exchange.peer_auth import PeerAuthError, _check_time_claim

    for claims, said in (({"iat": float("nan")}, "iat is not a finite number"), ({"nbf": "x"}, "nbf is not a number"),
                         ({"exp": 10 ** 400}, "exp is not a time"), ({"exp": True}, "exp is not a number")):
        with pytest.raises(PeerAuthError, match=said):
            _check_time_claim(claims, next(iter(claims)))
    _check_time_claim({"exp": 1800000000.5}, "exp")
    _check_time_claim({}, "nbf")


# --------------------------------------------------------------------------- 3, 4. the token endpoint


def _jwks(key: Any, kid: str) -> str:
    public = jwk.JWK.from_pem(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return json.dumps({"keys": [{**json.loads(public.export_public()), "kid": kid}]})


@pytest.fixture
def smart(app: Any, clock: Any) -> Any:
    pipe = app.extensions["gateway.pipeline"]
    settings = app.extensions["gateway.settings"]
    key = ec.generate_private_key(ec.SECP256R1())
    clients.add_client(pipe.store.db, "lis-engine", "submitter", "system/DiagnosticReport.rs", at=clock(),
                       gateway=Party.member(settings.issuer_uscc), by=Party("test-setup"), jwks=_jwks(key, "lis-1"))

    class Smart:
        pass

    s = Smart()
    s.app, s.db, s.clock, s.key, s.http = app, pipe.store.db, clock, key, app.test_client()
    s.aud = clients.token_endpoint(settings)
    return s


def _signed(key: Any, payload: str, kid: str = "lis-1") -> str:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    token = jws.JWS(payload.encode("utf-8"))
    token.add_signature(jwk.JWK.from_pem(pem), alg="ES256",
                        protected=json.dumps({"alg": "ES256", "kid": kid, "typ": "JWT"}))
    return str(token.serialize(compact=True))


def _claims(s: Any, client_id: str = "lis-engine", **times: str) -> str:
    now = int(s.clock().timestamp())
    said = {"exp": str(now + 240), "iat": str(now), **times}
    fields = ",".join(f'"{k}":{v}' for k, v in said.items())
    return (f'{{"iss":"{client_id}","sub":"{client_id}","aud":"{s.aud}","jti":"j-{abs(hash(fields))}",'
            f'{fields}}}')


def _post(s: Any, assertion: str) -> Any:
    return s.http.post("/auth/token", content_type=FORM, data={
        "grant_type": "client_credentials", "client_assertion_type": clients.ASSERTION_TYPE,
        "client_assertion": assertion, "scope": "system/DiagnosticReport.rs"})


def _reasons(s: Any) -> list[str]:
    return [str(e.content["facts"].get("reason")) for e in entries(s.db) if e.kind == "token"]


@pytest.mark.parametrize("times, said, reason", [
    ({"exp": "NaN"}, "exp is not a finite number", "exp not finite"),
    ({"exp": "Infinity"}, "exp is not a finite number", "exp not finite"),
    ({"exp": "-Infinity"}, "exp is not a finite number", "exp not finite"),
    ({"exp": '"1900000000"'}, "exp is not a number", "exp not a number"),
    ({"iat": "NaN"}, "iat is not a finite number", "iat not finite"),
    ({"nbf": '"soon"'}, "nbf is not a number", "nbf not a number"),
])
def test_a_client_assertion_time_claim_that_is_no_number_is_invalid_client_naming_it(
        smart: Any, times: dict[str, str], said: str, reason: str) -> None:
    """A correctly signed client assertion with ``"exp": NaN`` made /auth/token answer 500 (the replay cache
    refused to store it), unaudited; one with ``"exp": "..."`` was told it had expired."""
    got = _post(smart, _signed(smart.key, _claims(smart, **times)))
    assert got.status_code == 401, got.get_data(as_text=True)
    body = got.get_json()
    assert body["error"] == "invalid_client" and said in body["error_description"], body
    assert "expired" not in body["error_description"]
    assert _reasons(smart)[-1] == f"invalid_client: {reason}"


def test_a_large_assertion_is_told_it_is_too_large(smart: Any) -> None:
    got = _post(smart, "a" * 20_000)
    assert got.status_code == 400 and got.get_json()["error"] == "invalid_request"
    assert "too large" in got.get_json()["error_description"] and "required" not in got.get_json()[
        "error_description"]


def test_unknown_client_wrong_key_and_wrong_kid_get_the_same_answer(smart: Any) -> None:
    """The token endpoint told an unknown client, a known client with a wrong key and a wrong kid apart; the client
    is told the OAuth error only, the audit entry keeps the reason."""
    other = ec.generate_private_key(ec.SECP256R1())
    answers = [_post(smart, _signed(smart.key, _claims(smart, client_id="nobody"))),
               _post(smart, _signed(other, _claims(smart))),
               _post(smart, _signed(smart.key, _claims(smart), kid="lis-2"))]
    clients.disable_client(smart.db, "lis-engine", at=smart.clock(), gateway=Party.member("x"), by=Party("it"))
    answers.append(_post(smart, _signed(smart.key, _claims(smart))))
    bodies = [a.get_json() for a in answers]
    assert all(a.status_code == 401 for a in answers), bodies
    assert all(b == bodies[0] for b in bodies) and bodies[0]["error"] == "invalid_client", bodies
    assert _reasons(smart)[-4:] == ["invalid_client: unknown client", "invalid_client: bad signature",
                                    "invalid_client: unknown kid", "invalid_client: disabled"]


# --------------------------------------------------------------------------- 5. registry links


def test_registry_links_are_built_from_public_url_not_the_host_header(world: Any) -> None:
    gw = world.gateways["tongjiang"]
    got = gw.app.test_client().get("/registry/fhir/Organization", query_string={"_id": gw.member.uscc},
                                   headers={"Host": "evil.example"})
    assert got.status_code == 200, got.get_data(as_text=True)
    body = got.get_json()
    assert "evil.example" not in json.dumps(body), body["link"]
    assert body["link"] == [{"relation": "self",
                             "url": f"{gw.url}/registry/fhir/Organization?_id={gw.member.uscc}"}]
    # without a public_url, as the FHIR API: the URL the request reached
    settings = gw.app.extensions["gateway.settings"]
    gw.app.extensions["gateway.settings"] = settings.replace(public_url="")
    try:
        got = gw.app.test_client().get("/registry/fhir/Organization", headers={"Host": "here.example"})
        assert got.get_json()["link"] == [{"relation": "self", "url": "http://here.example/registry/fhir/Organization"}]
    finally:
        gw.app.extensions["gateway.settings"] = settings


def test_the_auditor_reads_an_entry_that_names_its_patient_by_criteria(client: Any, app: Any) -> None:
    from conftest import make_token

    _reads_after_a_message(client, app)
    assert client.get("/fhir/Patient", query_string={"name": "李秀英", "birthdate": "1975-06-15"}).status_code == 200
    auditor = {"Authorization": f"Bearer {make_token(app, 'inspector', ['auditor'])}"}
    found = client.get("/fhir/AuditEvent", query_string={"subtype": "search-type", "_count": "50"}, headers=auditor)
    assert found.status_code == 200, found.get_data(as_text=True)
    whats = [entity.get("what", {}).get("reference") for e in found.get_json().get("entry", [])
             for entity in e["resource"].get("entity", [])]
    assert f"Patient?{urlencode({'name': '李秀英', 'birthdate': '1975-06-15'})}" in whats, whats
