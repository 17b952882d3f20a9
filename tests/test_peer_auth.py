"""Peer authentication: signed, short-lived, audience-bound, single-use assertions from listed members."""
from __future__ import annotations

import datetime as _dt

import pytest

from gateway.errors import TrustError, UnknownIssuer
from gateway.exchange.peer_auth import PeerAuthError, ReplayCache, make_assertion, verify_assertion
from gateway.signing.keys import generate_private_key, issue_certificate, make_authority
from gateway.signing.trust import StaticTrust
from gateway.store.db import connect

CST = _dt.timezone(_dt.timedelta(hours=8))
NOW = _dt.datetime(2026, 11, 22, 10, 0, tzinfo=CST)
TJ, FL = "12511921MB0001003C", "12500102MB0002006J"
AUD = "http://127.0.0.1:8080/exchange"


@pytest.fixture(scope="module")
def pki():
    start, end = NOW - _dt.timedelta(days=30), NOW + _dt.timedelta(days=365)
    ca_key = generate_private_key()
    ca = make_authority(ca_key, "11500000MB00050043", "川渝卫生健康联合办公室（测试）", start, end)
    keys, certs = {}, {}
    for uscc in (TJ, FL):
        keys[uscc] = generate_private_key()
        certs[uscc] = issue_certificate(keys[uscc].public_key(), uscc, f"member {uscc}", ca_key, ca, start, end)
    rogue_key = generate_private_key()
    rogue_ca = make_authority(rogue_key, "11500000MB00050043", "rogue", start, end)
    rogue = issue_certificate(keys[TJ].public_key(), TJ, "rogue", rogue_key, rogue_ca, start, end)
    return ca, keys, certs, rogue


@pytest.fixture
def trust(pki):
    ca, _, certs, _ = pki
    t = StaticTrust([ca])
    for cert in certs.values():
        t.add_member(cert)
    return t


@pytest.fixture
def replay(tmp_path, database):
    db = connect(database or tmp_path / "r.db")
    yield ReplayCache(db)
    db.conn.close()


def token(pki, uscc=TJ, **kw):
    _, keys, certs, _ = pki
    return make_assertion(keys[uscc], [certs[uscc]], issuer_uscc=kw.pop("iss", uscc), audience=kw.pop("aud", AUD),
                          now=kw.pop("now", NOW), **kw)


def test_valid_assertion_names_the_caller(pki, trust, replay) -> None:
    assert verify_assertion(token(pki), trust, audiences=[AUD], now=NOW, replay=replay) == TJ


def test_replayed_assertion_is_refused(pki, trust, replay) -> None:
    t = token(pki)
    verify_assertion(t, trust, audiences=[AUD], now=NOW, replay=replay)
    with pytest.raises(PeerAuthError, match="replayed"):
        verify_assertion(t, trust, audiences=[AUD], now=NOW + _dt.timedelta(seconds=5), replay=replay)


@pytest.mark.parametrize("kwargs, at, message", [
    ({"aud": "http://elsewhere/exchange"}, NOW, "another audience"),
    ({}, NOW + _dt.timedelta(minutes=10), r"expired \d+ s before this gateway's clock \(compare the two members' "
                                          "clocks"),
    ({"lifetime": 3600}, NOW, None),  # capped to 5 minutes by the maker; accepted
    ({"now": NOW + _dt.timedelta(minutes=10)}, NOW, "the sender's clock (is|may be) ahead"),
])
def test_audience_and_time_window(pki, trust, replay, kwargs, at, message) -> None:
    t = token(pki, **kwargs)
    if message is None:
        assert verify_assertion(t, trust, audiences=[AUD], now=at, replay=replay) == TJ
        return
    with pytest.raises(PeerAuthError, match=message):
        verify_assertion(t, trust, audiences=[AUD], now=at, replay=replay)


def test_tampered_claims_fail_as_a_bad_signature(pki, trust, replay) -> None:
    import base64
    import json

    h, p, s = token(pki).split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["iss"] = claims["sub"] = FL
    forged = ".".join([h, base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode(), s])
    with pytest.raises(PeerAuthError) as exc:
        verify_assertion(forged, trust, audiences=[AUD], now=NOW, replay=replay)
    assert exc.value.http_status == 401 and exc.value.message == "peer authentication failed"


def test_member_claiming_to_be_another_member(pki, trust, replay) -> None:
    with pytest.raises(UnknownIssuer, match="another member") as exc:
        verify_assertion(token(pki, iss=FL), trust, audiences=[AUD], now=NOW, replay=replay)
    assert exc.value.member is None  # (listed, but not for what it claims: not a removed member)


def test_revoked_member_is_refused_with_403(pki, trust, replay) -> None:
    _, _, certs, _ = pki
    trust.remove(certs[TJ])
    with pytest.raises(TrustError) as exc:
        verify_assertion(token(pki), trust, audiences=[AUD], now=NOW, replay=replay)
    assert exc.value.http_status == 403
    # who it is, proven by the authority's certificate: the receiver keeps and audits what it pushed
    assert isinstance(exc.value, UnknownIssuer) and exc.value.member == TJ


def test_certificate_from_another_authority_is_refused(pki, trust, replay) -> None:
    _, keys, _, rogue = pki
    t = make_assertion(keys[TJ], [rogue], issuer_uscc=TJ, audience=AUD, now=NOW)
    with pytest.raises((PeerAuthError, UnknownIssuer)) as exc:
        verify_assertion(t, trust, audiences=[AUD], now=NOW, replay=replay)
    assert getattr(exc.value, "member", None) is None  # no trusted authority says who it is


@pytest.mark.parametrize("garbage", ["", "a.b", "a.b.c", "x" * 50, "e30.e30.AAAA"])
def test_garbage_tokens(trust, replay, garbage) -> None:
    with pytest.raises(PeerAuthError):
        verify_assertion(garbage, trust, audiences=[AUD], now=NOW, replay=replay)


def test_the_replay_cache_is_per_caller_and_forgets_expired_assertions(replay) -> None:
    replay.remember(TJ, "j1", 1000.0, 900.0)
    replay.remember("another-caller", "j1", 1000.0, 900.0)  # the same jti from another caller is no replay
    with pytest.raises(PeerAuthError, match="replayed"):
        replay.remember(TJ, "j1", 1000.0, 950.0)
    replay.remember(TJ, "j1", 1200.0, 1070.0)  # expired more than the tolerated skew ago: forgotten
    with pytest.raises(PeerAuthError, match="replayed"):
        replay.remember(TJ, "j1", 1200.0, 1075.0)


def test_the_receivers_reason_for_a_refusal_is_kept_by_the_sender() -> None:
    """A revoked certificate, a clock difference and a tampered Bundle were all 'HTTP 401/403 (refused by the
    receiver)' in the sender's outbox: the receiver's OperationOutcome says which, and the sender keeps it (long
    digit runs masked: the outbox is shown and logged)."""
    import json

    from gateway.exchange.transports import classify

    refused = classify(401, json.dumps({"resourceType": "OperationOutcome", "issue": [{
        "severity": "error", "code": "security",
        "diagnostics": "Authorization: assertion expired 95 s before this gateway's clock\n(compare)"}]}).encode())
    assert not refused.ok and not refused.retryable
    assert refused.error == "HTTP 401: Authorization: assertion expired 95 s before this gateway's clock (compare)"
    quoted = classify(422, json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "value", "diagnostics": "身份证号 511921196612120011 check digit"}]}).encode())
    assert quoted.error == "HTTP 422: 身份证号 … check digit"
    assert classify(503, b"<html>busy</html>").error == "HTTP 503" and classify(502, b"").error == "HTTP 502"
    assert len(classify(403, json.dumps({"issue": [{"diagnostics": "x" * 1000}]}).encode()).error) < 320


def test_an_answer_nested_too_deep_is_no_reason_and_no_exception() -> None:
    from gateway.exchange.transports import classify

    assert classify(400, b'{"issue":' + b"[" * 60000).error == "HTTP 400"
