"""Clients: SMART Backend Services for the systems that call the gateway.

A hospital's integration engine, a LIS or an auditors' tool is registered as a
*client* (``gateway clients add NAME --role ... --scopes ... --jwks-url|--jwks-file|--public-key``)
with one role (submitter, auditor, admin), the scopes it may ask for, and its
public keys: a JWKS given by URL (fetched with a time-out and a size cap, and
cached), a JWKS file, or one PEM public key. The client's id is its NAME.

To get an access token the client posts to ``/auth/token`` (OAuth 2.0 client
credentials, RFC 6749 §4.4) a *client assertion* (RFC 7523): a JWT it signs
with its private key (ES256, ES384 or RS384; header ``kid`` naming the key),
with ``iss`` = ``sub`` = its client id, ``aud`` = the token endpoint, ``exp``
at most five minutes ahead and a ``jti`` never used before (the replay cache
of :mod:`gateway.exchange.peer_auth`). The answer is an access token living
:data:`ACCESS_TOKEN_SECONDS`, with the requested scopes the registration
allows. Every token issued and every request refused is written to the audit
log (kind ``token``), with the reason; the client is only told the OAuth error.

Access tokens are opaque random strings stored as SHA-256 with their client,
scopes and expiry (not JWTs signed by the gateway): the gateway is the only
party that reads them, so nothing needs to verify them elsewhere; disabling a
client stops its live tokens at once; and the gateway needs no signing key of
its own (a gateway that does not exchange with members has none).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import requests
from jwcrypto import jwk, jws
from jwcrypto.common import JWException

from gateway.audit import records
from gateway.audit.log import append, instant
from gateway.auth import NotAuthenticated, Principal
from gateway.errors import InputError, NotFound, TrustError
from gateway.naming import IG_BASE
from gateway.scopes import PERMISSIONS, parse_scopes, grant
from gateway.store.accounts import Accounts, ClientRow
from gateway.store.db import Database, transaction

__all__ = [
    "CLIENT_ROLES",
    "ACCESS_TOKEN_PREFIX",
    "ACCESS_TOKEN_SECONDS",
    "ASSERTION_TYPE",
    "SIGNING_ALGS",
    "Client",
    "TokenRefused",
    "NOT_AUTHENTICATED",
    "Issued",
    "ensure_schema",
    "client_system",
    "add_client",
    "disable_client",
    "list_clients",
    "get_client",
    "request_token",
    "authenticate_access_token",
    "smart_configuration",
    "smart_security",
    "token_endpoint",
    "scopes_supported",
]

log = logging.getLogger(__name__)

#: Roles a client may have (a peer gateway authenticates with its member certificate instead).
CLIENT_ROLES = ("submitter", "auditor", "admin")
ACCESS_TOKEN_PREFIX = "cyhat_"
#: Seconds an access token lives.
ACCESS_TOKEN_SECONDS = 300
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Signature algorithms accepted for client assertions (SMART asks for RS384 or ES384; ES256 as members use).
SIGNING_ALGS = ("ES256", "ES384", "RS384")
_KTY = {"ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "RS384": ("RSA", None)}
MAX_ASSERTION_SECONDS = 300
_SKEW = 60  # seconds of clock difference tolerated with a client
_MAX_ASSERTION = 16_384  # characters: a JWT with an RSA-4096 signature and x5c is far smaller
_JWKS_MAX_BYTES = 65_536
_JWKS_TIMEOUT = 5.0
_JWKS_TTL = 300.0  # seconds a fetched JWKS is used before it is fetched again
_JWKS_RETRY = 30.0  # an unknown kid refetches the JWKS, at most this often
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class TokenRefused(TrustError):
    """A token request refused: an OAuth 2.0 ``error`` (RFC 6749 §5.2) and its HTTP status; ``reason``
    (the precise check that failed) goes to the audit log only."""

    code = "security"

    def __init__(self, error: str, description: str, reason: str | None = None, status: int = 400) -> None:
        super().__init__(description, "client_assertion")
        self.error = error
        self.description = description
        self.reason = reason or description
        self.http_status = status


#: What a client that could not be authenticated is told, whichever way it failed: no enabled client with this
#: id, no registered key with this kid, a signature the key does not verify, a jku not registered, keys that could
#: not be fetched (the precise reason is in the audit entry and the log only). Different answers told a caller
#: which client ids exist, and which kids they have.
NOT_AUTHENTICATED = ("client authentication failed: no enabled client (unknown or disabled) has a registered key "
                     "with this kid that verifies the client_assertion")


def _invalid_client(description: str, reason: str | None = None) -> TokenRefused:
    # SMART Backend Services: every failure to authenticate the client is invalid_client (401).
    return TokenRefused("invalid_client", description, reason, 401)


@dataclass(frozen=True)
class Client:
    """A registered backend client, as listed."""

    client_id: str
    role: str
    scopes: tuple[str, ...]
    keys: str  # "jwks-url <url>" or "<n> registered key(s): kid, ..."
    created: str
    disabled: str | None

    @property
    def active(self) -> bool:
        """True until disabled."""
        return self.disabled is None


@dataclass(frozen=True)
class Issued:
    """An access token as answered to its client (RFC 6749 §5.1)."""

    access_token: str
    expires_in: int
    scope: str
    client_id: str

    def response(self) -> dict[str, Any]:
        """The token response body."""
        return {"access_token": self.access_token, "token_type": "bearer", "expires_in": self.expires_in,
                "scope": self.scope}


def ensure_schema(db: Database) -> None:
    """Create the client and access-token tables if missing (with the other account tables; once per
    connection; joins a caller's transaction)."""
    Accounts(db).ensure_schema()


def client_system(member_uscc: str) -> str:
    """Identifier system of one member gateway's registered backend clients (new URI, defined here)."""
    return f"{IG_BASE}/sid/smart-client/{member_uscc}"


def _party(gateway: records.Party, client_id: str) -> records.Party:
    return records.Party(client_id[:64] or "(none)", client_system(gateway.value))


# --------------------------------------------------------------------------- registration


def _keyset(jwks_text: str | None, pem: str | None, kid: str | None) -> str:
    """Registered keys as JWKS JSON, public parts only.

    :raises InputError: not a JWKS, a private key, no usable key, or a key without kid in a JWKS.
    """
    keys = jwk.JWKSet()
    try:
        if pem is not None:
            key = jwk.JWK.from_pem(pem.encode("utf-8"))
            if key.has_private:
                raise InputError("give the client's PUBLIC key, never its private key", "public-key")
            key = jwk.JWK(**{**json.loads(key.export_public()), "kid": kid or key.thumbprint()})
            keys.add(key)
        else:
            keys.import_keyset(jwks_text or "")
    except (JWException, ValueError, TypeError) as exc:
        raise InputError(f"not a usable public key or JWKS ({type(exc).__name__})", "jwks") from None
    exported = json.loads(keys.export(private_keys=False))
    if not exported.get("keys"):
        raise InputError("the JWKS holds no key", "jwks")
    for item in exported["keys"]:
        if item.get("kty") not in ("EC", "RSA") or not item.get("kid"):
            raise InputError("every key needs a kid and must be EC or RSA", "jwks")
    if any(k.has_private for k in keys):
        raise InputError("the JWKS holds a private key: register public keys only", "jwks")
    return json.dumps(exported, sort_keys=True)


def add_client(
    db: Database,
    client_id: str,
    role: str,
    scopes: str | Iterable[str],
    *,
    at: _dt.datetime,
    gateway: records.Party,
    by: records.Party,
    jwks: str | None = None,
    jwks_url: str | None = None,
    public_key_pem: str | None = None,
    kid: str | None = None,
) -> Client:
    """Register a backend client with its role, the scopes it may ask for and its keys (exactly one of a
    JWKS, a JWKS URL or a PEM public key); audited.

    :raises InputError: bad id, role, scope or keys; id taken.
    """
    if not _NAME.match(client_id or ""):
        raise InputError(f"client id {client_id!r} must be 1-64 letters, digits, . _ @ -", "name")
    if role not in CLIENT_ROLES:
        raise InputError(f"a client's role is one of {', '.join(CLIENT_ROLES)}", "role")
    parsed = parse_scopes(scopes)
    if not parsed:
        raise InputError("a client needs at least one scope (e.g. system/DiagnosticReport.rs)", "scopes")
    if sum(x is not None for x in (jwks, jwks_url, public_key_pem)) != 1:
        raise InputError("give the client's keys one way: a JWKS file, a JWKS URL or a PEM public key", "keys")
    if jwks_url is not None:
        if not re.match(r"^https?://[^\s/]+", jwks_url):
            raise InputError("the JWKS URL must be an http(s) URL", "jwks-url")
        keyset = None
    else:
        keyset = _keyset(jwks, public_key_pem, kid)
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        if not accounts.add_client(client_id, role, " ".join(s.text for s in parsed), keyset, jwks_url,
                                   instant(at)):
            raise InputError(f"client {client_id!r} exists already", "name")
        append(db, records.user_admin(at=at, gateway=gateway, admin=by, user=_party(gateway, client_id),
                                      action="added", roles=[role]))
    log.info("backend client added with role %s", role)
    return get_client(db, client_id)


def disable_client(
    db: Database, client_id: str, *, at: _dt.datetime, gateway: records.Party, by: records.Party
) -> Client:
    """Disable a client: its live access tokens stop working at once; audited (it stays listed).

    :raises NotFound: no such client.
    """
    accounts = Accounts(db)
    accounts.ensure_schema()
    with transaction(db):
        client = get_client(db, client_id)
        if client.active:
            accounts.disable_client(client_id, instant(at))
            append(db, records.user_admin(at=at, gateway=gateway, admin=by, user=_party(gateway, client_id),
                                          action="disabled", roles=[client.role]))
    return get_client(db, client_id)


def _client(row: ClientRow) -> Client:
    client_id, role, scopes, keyset, url, created, disabled = row
    if url:
        keys = f"jwks-url {url}"
    else:
        kids = [k.get("kid", "?") for k in json.loads(keyset or "{}").get("keys", [])]
        keys = f"{len(kids)} registered key(s): {', '.join(kids)}"
    return Client(client_id, role, tuple(scopes.split()), keys, created, disabled)


def get_client(db: Database, client_id: str) -> Client:
    """One client.

    :raises NotFound: no such client.
    """
    row = Accounts(db).client(client_id)
    if row is None:
        raise NotFound(f"no client {client_id!r}", "name")
    return _client(row)


def list_clients(db: Database) -> list[Client]:
    """Every client, by id."""
    return [_client(r) for r in Accounts(db).clients()]


# --------------------------------------------------------------------------- keys published at a URL


class _JwksCache:
    """JWKS fetched from clients' URLs, kept :data:`_JWKS_TTL` seconds (per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, jwk.JWKSet]] = {}

    def get(self, url: str, kid: str) -> jwk.JWKSet:
        """The JWKS at ``url``, fetched again when stale or (at most every 30 s) when ``kid`` is not in it.

        :raises TokenRefused: it cannot be fetched or read.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._entries.get(url)
        if cached is not None:
            fetched, keys = cached
            fresh = now - fetched < _JWKS_TTL
            if fresh and (keys.get_key(kid) is not None or now - fetched < _JWKS_RETRY):
                return keys
        keys = self._fetch(url)
        with self._lock:
            self._entries[url] = (now, keys)
        return keys

    @staticmethod
    def _fetch(url: str) -> jwk.JWKSet:
        try:
            with requests.get(url, timeout=_JWKS_TIMEOUT, stream=True, allow_redirects=False,
                              headers={"Accept": "application/json"}) as response:
                response.raise_for_status()
                body = response.raw.read(_JWKS_MAX_BYTES + 1, decode_content=True)
            if len(body) > _JWKS_MAX_BYTES:
                raise ValueError("JWKS too large")
            keys = jwk.JWKSet()
            keys.import_keyset(body)
            return keys
        except (requests.RequestException, JWException, ValueError, TypeError) as exc:
            log.warning("client JWKS could not be fetched or read (%s)", type(exc).__name__)
            raise _invalid_client(NOT_AUTHENTICATED, f"jwks fetch failed ({type(exc).__name__})") from None

    def clear(self) -> None:
        """Forget every fetched JWKS (tests, key rotation)."""
        with self._lock:
            self._entries.clear()


JWKS_CACHE = _JwksCache()


# --------------------------------------------------------------------------- the token endpoint


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def _header(assertion: str) -> dict[str, Any]:
    """The header of an assertion, checked for what any client's assertion must have (before the client is looked
    up: the answer is the same whether the client exists or not).

    :raises TokenRefused: not a JWT, an unsupported algorithm, no kid, a typ other than JWT.
    """
    parts = assertion.split(".")
    if len(parts) != 3:
        raise _invalid_client("client_assertion is not a signed JWT", "malformed assertion")
    try:
        header = _b64json(parts[0])
    except (ValueError, TypeError):
        raise _invalid_client("client_assertion is not a signed JWT", "malformed assertion") from None
    if not isinstance(header, dict):
        raise _invalid_client("client_assertion is not a signed JWT", "malformed assertion")
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in SIGNING_ALGS:
        raise _invalid_client(f"client_assertion must be signed with {', '.join(SIGNING_ALGS)}",
                              f"algorithm {str(alg)[:20]!r}")
    if not isinstance(kid, str) or not kid:
        raise _invalid_client("client_assertion header needs the kid of the signing key", "no kid")
    if header.get("typ") not in (None, "JWT"):
        raise _invalid_client("client_assertion typ must be JWT", "typ")
    return header


def _verify(assertion: str, header: dict[str, Any], row: ClientRow) -> dict[str, Any]:
    """The verified claims of an assertion (its :func:`_header`) signed by one of the client's keys.

    :raises TokenRefused: jku not the registered URL, the JWKS not fetched, no key with its kid, or a signature
        that does not verify: each told as :data:`NOT_AUTHENTICATED` (the reason audited).
    """
    alg, kid = header["alg"], header["kid"]
    keyset_json, url = row.jwks, row.jwks_url
    jku = header.get("jku")
    if jku is not None and jku != url:
        raise _invalid_client(NOT_AUTHENTICATED, "jku not registered")
    keyset = JWKS_CACHE.get(url, kid) if url else jwk.JWKSet.from_json(keyset_json)
    kty, crv = _KTY[alg]
    candidates = [k for k in keyset if k.get("kid") == kid and k.get("kty") == kty
                  and (crv is None or k.get("crv") == crv)]
    if not candidates:
        raise _invalid_client(NOT_AUTHENTICATED, "unknown kid")
    for key in candidates:
        token = jws.JWS()
        try:
            token.deserialize(assertion)
            token.allowed_algs = [alg]
            token.verify(key, alg=alg)
        except JWException:
            continue
        try:
            claims = json.loads(token.payload)
        except ValueError:
            break
        if isinstance(claims, dict):
            return claims
        break
    raise _invalid_client(NOT_AUTHENTICATED, "bad signature")


def _check_time_claim(claims: dict[str, Any], name: str) -> None:
    """A time claim (``exp``, ``iat``, ``nbf``), when present, is a finite number of seconds since 1970
    (:func:`gateway.signing.jws.time_claim_problem`: a NaN ``exp`` failed the token request with a 500).

    :raises TokenRefused: (invalid_client) naming the claim.
    """
    from gateway.signing.jws import time_claim_problem

    problem = time_claim_problem(claims, name)
    if problem is not None:
        raise _invalid_client(f"client_assertion {name} {problem[0]}", problem[1])


def _check_claims(claims: dict[str, Any], client_id: str, audiences: set[str], now: float) -> None:
    """:raises TokenRefused: iss/sub, aud, exp, nbf/iat (not finite numbers, or out of their window) or jti
        wrong."""
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise _invalid_client("iss and sub must both be the client id", "iss/sub")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if not any(isinstance(a, str) and a.rstrip("/") in audiences for a in auds):
        raise _invalid_client("aud must be this token endpoint's URL", "wrong aud")
    if claims.get("exp") is None:
        raise _invalid_client("client_assertion needs an exp", "no exp")
    for name in ("exp", "iat", "nbf"):
        _check_time_claim(claims, name)
    exp = claims["exp"]
    if exp <= now - _SKEW:
        raise _invalid_client("client_assertion has expired", "expired assertion")
    if exp > now + MAX_ASSERTION_SECONDS + _SKEW:
        raise _invalid_client("client_assertion exp must be at most 5 minutes ahead", "exp too far")
    for name in ("iat", "nbf"):
        value = claims.get(name)
        if value is not None and value > now + _SKEW:
            raise _invalid_client(f"client_assertion {name} is in the future", f"{name} in the future")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 255:
        raise _invalid_client("client_assertion needs a jti", "no jti")


def _remember(db: Database, client_id: str, jti: str, exp: float, now: float) -> None:
    from gateway.exchange.peer_auth import PeerAuthError, ReplayCache

    try:
        ReplayCache(db).remember(f"smart-client:{client_id}", jti, exp, now)
    except PeerAuthError:
        raise _invalid_client("client_assertion jti was used before", "jti replayed") from None


def _audit(db: Database, *, at: _dt.datetime, gateway: records.Party, client_id: str,
           address: str, ok: bool, reason: str | None, scopes: Iterable[str], role: str | None) -> None:
    append(db, records.token_request(
        at=at, gateway=gateway, client=_party(gateway, client_id), client_address=address or "unknown",
        outcome=records.Outcome.SUCCESS if ok else records.Outcome.MINOR_FAILURE, reason=reason,
        scopes=list(scopes), roles=[role] if role else []))


def request_token(
    db: Database,
    form: dict[str, str],
    *,
    audiences: Iterable[str],
    at: _dt.datetime,
    gateway: records.Party,
    address: str,
) -> Issued:
    """Answer a token request (the form fields as posted); the issued token or the refusal is audited.

    :raises TokenRefused: an OAuth error: ``invalid_request``, ``unsupported_grant_type``,
        ``invalid_client`` (401) or ``invalid_scope``.
    """
    accounts = Accounts(db)  # the client's look-up below makes the tables of a new database
    client_id = ""
    role: str | None = None
    requested: list[str] = []
    try:
        if form.get("grant_type") != "client_credentials":
            if not form.get("grant_type"):
                raise TokenRefused("invalid_request", "grant_type is required (client_credentials)")
            raise TokenRefused("unsupported_grant_type", "only grant_type=client_credentials is supported")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise TokenRefused("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion") or ""
        if not assertion:
            raise TokenRefused("invalid_request", "client_assertion (a signed JWT) is required")
        if len(assertion) > _MAX_ASSERTION:
            raise TokenRefused("invalid_request", f"client_assertion is too large ({len(assertion)} characters; "
                               f"at most {_MAX_ASSERTION})", "assertion too large")
        scope_text = form.get("scope") or ""
        if not scope_text.strip():
            raise TokenRefused("invalid_scope", "scope is required, e.g. system/DiagnosticReport.rs")
        requested = scope_text.split()[:50]
        try:
            claims_unverified = _b64json(assertion.split(".")[1]) if assertion.count(".") == 2 else None
        except (ValueError, TypeError):
            claims_unverified = None
        iss = claims_unverified.get("iss") if isinstance(claims_unverified, dict) else None
        client_id = iss if isinstance(iss, str) else ""
        if form.get("client_id") and form["client_id"] != client_id:
            raise _invalid_client("client_id is not the assertion's iss", "client_id differs from iss")
        header = _header(assertion)  # (the same answer for any client, known or not)
        row = accounts.client(client_id)
        if row is None or row.disabled is not None:
            raise _invalid_client(NOT_AUTHENTICATED, "unknown client" if row is None else "disabled")
        role = row.role
        claims = _verify(assertion, header, row)
        now = at.timestamp()
        _check_claims(claims, client_id, {a.rstrip("/") for a in audiences}, now)
        try:
            wanted = parse_scopes(requested)
        except InputError as exc:
            raise TokenRefused("invalid_scope", exc.message) from None
        granted = grant(wanted, parse_scopes(row.scopes))
        if not granted:
            raise TokenRefused("invalid_scope", "none of the requested scopes is registered for this client",
                               f"scope not registered: {' '.join(requested)[:200]}")
        scope = " ".join(s.text for s in granted)
        token = ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(32)
        with transaction(db):
            _remember(db, client_id, claims["jti"], float(claims["exp"]), now)
            accounts.add_access_token(_hash(token), client_id, scope, instant(at), now + ACCESS_TOKEN_SECONDS,
                                      forget_before=now - 3600)
            _audit(db, at=at, gateway=gateway, client_id=client_id, address=address, ok=True, reason=None,
                   scopes=scope.split(), role=role)
    except TokenRefused as refused:
        with transaction(db):
            _audit(db, at=at, gateway=gateway, client_id=client_id, address=address, ok=False,
                   reason=f"{refused.error}: {refused.reason}"[:300], scopes=requested[:20], role=role)
        log.info("token request refused (%s: %r)", refused.error, refused.reason[:100])
        raise
    log.info("access token issued, %d scope(s)", len(granted))
    return Issued(token, ACCESS_TOKEN_SECONDS, scope, client_id)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def authenticate_access_token(db: Database, token: str, *, at: _dt.datetime) -> Principal:
    """The client of a live access token, with its role and granted scopes.

    :raises NotAuthenticated: unknown token, expired, or its client disabled.
    """
    row = Accounts(db).access_token(_hash(token))
    if row is None:
        raise NotAuthenticated("the access token is not valid (unknown, or its client is disabled)",
                               "Authorization")
    if row.expires <= at.timestamp():
        raise NotAuthenticated("the access token has expired: get another from the token endpoint",
                               "Authorization")
    return Principal(row.client_id, frozenset([row.role]), None, via="smart", scopes=frozenset(row.scopes.split()))


# --------------------------------------------------------------------------- discovery


def token_endpoint(settings: Any) -> str:
    """The token endpoint's URL, as clients put it in ``aud``."""
    return f"{settings.base_url}/auth/token"


def scopes_supported() -> list[str]:
    """The scopes worth asking for here (v2 and v1 forms)."""
    out = []
    for rtype in ("DiagnosticReport", "Observation", "Patient", "Specimen", "Organization", "AuditEvent"):
        out += [f"system/{rtype}.rs", f"system/{rtype}.read"]
    out += ["system/Bundle.c", "system/Bundle.write", "system/AuditEvent.c", "system/*.rs", "system/*.read"]
    return out


def smart_configuration(settings: Any, endpoint: str | None = None) -> dict[str, Any]:
    """``/.well-known/smart-configuration`` (SMART App Launch 2.x, Backend Services)."""
    return {
        "token_endpoint": endpoint or token_endpoint(settings),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(SIGNING_ALGS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": scopes_supported(),
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }


def smart_security(settings: Any) -> dict[str, Any]:
    """``CapabilityStatement.rest.security``: the SMART-on-FHIR service with its token endpoint."""
    return {
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": token_endpoint(settings)}],
        }],
        "service": [{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
            "text": "SMART Backend Services (OAuth 2.0 client credentials, private_key_jwt)",
        }],
        "description": "Systems authenticate with SMART Backend Services: a client registered with its public "
        f"keys posts a signed JWT assertion to {token_endpoint(settings)} and gets a {ACCESS_TOKEN_SECONDS}-second "
        f"bearer token with system scopes ({PERMISSIONS} or read/write). Static API tokens (Bearer cyhr_...) "
        "also work. See /.well-known/smart-configuration.",
    }
