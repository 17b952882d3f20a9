"""Peer authentication: who is calling, proven by a short-lived signed assertion.

Every gateway-to-gateway request carries ``Authorization: Bearer <JWT>``, a
client assertion in the style of SMART Backend Services / RFC 7523, signed
(ES256) with the calling member's key whose certificate is in the registry
snapshot:

- header ``alg`` ES256, ``typ`` JWT, ``kid`` (as for Bundle signatures), ``x5c``;
- claims ``iss`` = ``sub`` = the caller's 统一社会信用代码, ``aud`` = the
  receiver's exchange URL, ``iat``, ``exp`` at most 5 minutes ahead, ``jti``.

The receiver checks the signature against the snapshot (every key with the
kid), that the certificate is listed for ``iss`` now, ``aud``, the time window,
and that the ``jti`` was not seen before for that ``iss`` (a replay cache kept
as long as an assertion can live). Unknown or revoked callers get 403, every
other failure 401, and the answer never says which check failed beyond that.
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import uuid
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import BadSignature, TrustError, UnknownIssuer, shown
from gateway.signing.canonical import canonicalize
from gateway.signing.jws import sign_detached, unverified_header, verify_detached, x5c_leaf
from gateway.signing.trust import TrustSource, check_certificate
from gateway.store.accounts import Accounts
from gateway.store.db import Database

__all__ = ["make_assertion", "verify_assertion", "ReplayCache", "PeerAuthError", "MAX_LIFETIME"]

#: Longest accepted assertion lifetime (SMART Backend Services: exp at most 5 minutes ahead).
MAX_LIFETIME = 300
_SKEW = 60  # seconds of clock difference tolerated between member gateways


class PeerAuthError(TrustError):
    """The caller could not be authenticated (401)."""

    http_status = 401

    def __init__(self, message: str = "peer authentication failed") -> None:
        super().__init__(message, "Authorization")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_assertion(key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate], *, issuer_uscc: str,
                   audience: str, now: _dt.datetime, lifetime: int = 240, jti: str | None = None) -> str:
    """A signed client assertion for one request to ``audience``.

    :raises ConfigError: the key does not belong to ``chain[0]``.
    """
    claims = {
        "iss": issuer_uscc,
        "sub": issuer_uscc,
        "aud": audience,
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + min(lifetime, MAX_LIFETIME),
        "jti": jti or uuid.uuid4().hex,
    }
    payload = canonicalize(claims)
    detached = sign_detached(payload, key, chain, sig_time=now, extra_header={"typ": "JWT"})
    header, _, signature = detached.split(".")
    return f"{header}.{_b64url(payload)}.{signature}"


class ReplayCache:
    """``jti`` values seen per caller, kept until their assertion has expired."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._accounts = Accounts(db)
        if not self._accounts.replay_cache_ready():
            from gateway.store.store import ensure_core_schema

            ensure_core_schema(db)  # the peer_jti table is defined with the rest, in the core part

    def remember(self, iss: str, jti: str, exp: float, now: float) -> None:
        """Record a ``jti``.

        :raises PeerAuthError: seen before for this caller (a replay).
        """
        if not self._accounts.remember_assertion(iss, jti, exp, forget_before=now - _SKEW):
            raise PeerAuthError("assertion already used (jti replayed)")


def _check_time_claim(claims: dict[str, Any], name: str) -> None:
    """A time claim (``exp``, ``iat``, ``nbf``), when present, is a finite number of seconds since 1970
    (:func:`gateway.signing.jws.time_claim_problem`).

    :raises PeerAuthError: naming the claim (401).
    """
    from gateway.signing.jws import time_claim_problem

    problem = time_claim_problem(claims, name)
    if problem is not None:
        raise PeerAuthError(f"assertion {name} {problem[0]}")


def verify_assertion(token: str, trust: TrustSource, *, audiences: Iterable[str], now: _dt.datetime,
                     replay: ReplayCache) -> str:
    """Authenticate a caller; returns its 统一社会信用代码.

    :raises PeerAuthError: malformed, bad signature, wrong audience, an ``exp``, ``iat`` or ``nbf`` that is
        not a finite number, outside its time window, or replayed (401).
    :raises UnknownIssuer: the signing certificate is not listed for a member now (403).
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise PeerAuthError()
    try:
        payload = _b64url_decode(parts[1])
        header = unverified_header(f"{parts[0]}..{parts[2]}")
        claims: dict[str, Any] = json.loads(payload)
    except (ValueError, BadSignature):
        raise PeerAuthError() from None
    if header.get("typ") not in (None, "JWT") or not isinstance(claims, dict):
        raise PeerAuthError()

    def candidates(kid: str) -> list[x509.Certificate]:
        # The caller's own x5c certificate is tried too, so that a removed (revoked) member is told
        # so below (403) instead of failing as an unknown signature; it must still pass every trust check.
        return trust.certificates_for_kid(kid) + x5c_leaf(header, kid)

    try:
        _, cert = verify_detached(f"{parts[0]}..{parts[2]}", payload, candidates)
    except BadSignature:
        raise PeerAuthError() from None
    iss, sub, aud, jti = claims.get("iss"), claims.get("sub"), claims.get("aud"), claims.get("jti")
    exp, iat = claims.get("exp"), claims.get("iat")
    ts = now.timestamp()
    if not isinstance(iss, str) or iss != sub or not isinstance(jti, str) or not jti:
        raise PeerAuthError("assertion must carry iss = sub and a jti")
    audience_ok = aud in set(audiences) if isinstance(aud, str) else False
    if not audience_ok:
        raise PeerAuthError(f"assertion is for another audience ({shown(str(aud)[:200])}; this gateway takes "
                            f"{' or '.join(audiences)}): the sender addresses it otherwise than the registry lists it, "
                            "or the registry lists another address than this gateway's public_url")
    if exp is None:
        raise PeerAuthError("assertion must carry exp")
    for name in ("exp", "iat", "nbf"):
        _check_time_claim(claims, name)
    if exp <= ts - _SKEW:
        raise PeerAuthError(f"assertion expired {ts - exp:.0f} s before this gateway's clock (compare the two "
                            "members' clocks if the sender made it just now)")
    if exp > ts + MAX_LIFETIME + _SKEW:
        raise PeerAuthError(f"assertion lives longer than 5 minutes by this gateway's clock (ends {exp - ts:.0f} s "
                            "from now: the sender's clock may be ahead)")
    if iat is not None and iat > ts + _SKEW:
        raise PeerAuthError(f"assertion issued {iat - ts:.0f} s in the future by this gateway's clock (the sender's "
                            "clock is ahead)")
    nbf = claims.get("nbf")
    if nbf is not None and nbf > ts + _SKEW:
        raise PeerAuthError(f"assertion is not valid before {nbf - ts:.0f} s from now by this gateway's clock (the "
                            "sender's clock is ahead)")
    try:
        member = check_certificate(cert, trust, now, location="Authorization")
    except UnknownIssuer as exc:
        if exc.member is not None and exc.member == iss:
            # a removed member, whom the receiver keeps a trace of: an assertion serves once for that too
            replay.remember(iss, jti, float(exp), ts)
        raise
    if member != iss:
        raise UnknownIssuer("assertion signed with another member's certificate", "Authorization")
    replay.remember(iss, jti, float(exp), ts)
    return iss
