"""Registry snapshots: signed by the authority; unsigned, tampered, expired or older snapshots are refused;
the snapshot is the trust source for member signatures; and the registry commands."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.commands.registry import registry
from gateway.demo.registry import DEMO_SOURCE, DemoRegistry, build_demo_registry
from gateway.errors import BadSignature, ConfigError, InputError, TrustError, UnknownIssuer
from gateway.registry.snapshot import RegistryHolder, build_snapshot, read_snapshot_unverified, verify_snapshot
from gateway.registry.source import RegistrySource, load_source
from gateway.signing.canonical import dumps
from gateway.signing.jws import sign_bundle, signer_reference, verify_bundle
from gateway.signing.keys import (
    cert_pem,
    generate_private_key,
    kid_of,
    make_authority,
    private_key_pem,
)
from gateway.signing.trust import TrustSource, check_certificate

CST = dt.timezone(dt.timedelta(hours=8))
NOW = dt.datetime(2026, 11, 22, 9, 0, tzinfo=CST)
TONGJIANG, FULING, CDC = "12511921MB0001003C", "12500102MB0002006J", "12510000MB00030095"
DATA = Path(__file__).parent / "data" / "registry"


@pytest.fixture(scope="module")
def demo() -> DemoRegistry:
    return build_demo_registry(NOW)


def _source_of(demo: DemoRegistry, **changes: Any) -> RegistrySource:
    body = {k: copy.deepcopy(v) for k, v in demo.document.items() if k not in ("signature", "issued", "valid_until")}
    body.update(changes)
    return RegistrySource(body, "test")


def _text(doc: dict[str, Any]) -> str:
    return dumps(doc, indent=2)


def test_signed_snapshot_verifies(demo: DemoRegistry) -> None:
    snap = verify_snapshot(demo.text(), [demo.authority_cert], NOW)
    assert snap.version == 1 and snap.demo
    assert snap.issued == NOW and snap.valid_until == NOW + dt.timedelta(days=7)
    assert snap.authority_uscc == "11500000MB00050043"
    assert snap.authority_certificates == (demo.authority_cert,)
    header = json.loads(__import__("base64").urlsafe_b64decode(demo.document["signature"]["jws"].split(".")[0] + "=="))
    assert header["alg"] == "ES256" and header["kid"] == kid_of(demo.authority_cert)
    # Verification works on the received text in any formatting: compact or indented.
    assert verify_snapshot(dumps(demo.document), [demo.authority_cert], NOW).digest() == snap.digest()


def test_unsigned_snapshot_is_refused(demo: DemoRegistry) -> None:
    doc = {k: v for k, v in demo.document.items() if k != "signature"}
    with pytest.raises(BadSignature, match="not signed"):
        verify_snapshot(_text(doc), [demo.authority_cert], NOW)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["members"][0].__setitem__("level", "三级甲等"),  # promote a member
        lambda d: d["eqa"][16].__setitem__("result", "pass"),  # turn a failed EQA into a pass
        lambda d: d.__setitem__("valid_until", "2027-11-29T09:00:00+08:00"),  # extend the validity
        lambda d: d.__setitem__("version", 99),
        lambda d: d["catalogues"][0]["items"][0].__setitem__("window_days", 70),
        lambda d: d["signature"].__setitem__("jws", d["signature"]["jws"][:-4] + "AAAA"),
        lambda d: d["signature"].__setitem__("jws", "not a jws"),
    ],
)
def test_tampered_snapshot_is_refused(demo: DemoRegistry, tamper: Any) -> None:
    doc = copy.deepcopy(demo.document)
    tamper(doc)
    with pytest.raises(BadSignature) as info:
        verify_snapshot(_text(doc), [demo.authority_cert], NOW)
    assert info.value.location == "snapshot.signature"


def test_snapshot_signed_by_another_authority_is_refused(demo: DemoRegistry) -> None:
    other = build_demo_registry(NOW)  # same authority name and USCC, different key
    with pytest.raises(BadSignature):
        verify_snapshot(other.text(), [demo.authority_cert], NOW)


def test_expired_snapshot_is_refused_and_just_valid_is_accepted(demo: DemoRegistry) -> None:
    last = NOW + dt.timedelta(days=7)
    assert verify_snapshot(demo.text(), [demo.authority_cert], last).version == 1
    with pytest.raises(TrustError, match="expired"):
        verify_snapshot(demo.text(), [demo.authority_cert], last + dt.timedelta(seconds=1))


def test_snapshot_from_the_future_is_refused(demo: DemoRegistry) -> None:
    with pytest.raises(TrustError, match="future"):
        verify_snapshot(demo.text(), [demo.authority_cert], NOW - dt.timedelta(hours=1))


def test_naive_time_and_non_json_are_input_errors(demo: DemoRegistry) -> None:
    with pytest.raises(InputError):
        verify_snapshot(demo.text(), [demo.authority_cert], NOW.replace(tzinfo=None))
    with pytest.raises(InputError):
        verify_snapshot(b"{not json", [demo.authority_cert], NOW)
    with pytest.raises(ConfigError, match="not a registry snapshot"):
        verify_snapshot(b'{"resourceType": "Bundle"}', [demo.authority_cert], NOW)


def test_build_refuses_a_certificate_that_cannot_vouch_for_the_snapshot(demo: DemoRegistry) -> None:
    source = _source_of(demo)
    member_key = demo.member_keys[TONGJIANG]
    with pytest.raises(ConfigError, match="CA certificate"):
        build_snapshot(source, key=member_key, cert=demo.member_certs[TONGJIANG], issued=NOW)
    with pytest.raises(ConfigError, match="does not cover"):
        build_snapshot(
            source, key=demo.authority_key, cert=demo.authority_cert, issued=NOW, valid_for=dt.timedelta(days=400)
        )
    stranger_key = generate_private_key()
    stranger = make_authority(
        stranger_key, "12330000470051726F", "另一机构", NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30)
    )
    with pytest.raises(ConfigError, match="names 12330000470051726F"):
        build_snapshot(source, key=stranger_key, cert=stranger, issued=NOW)
    with pytest.raises(InputError):
        build_snapshot(source, key=demo.authority_key, cert=demo.authority_cert, issued=NOW, valid_for=dt.timedelta(0))


def test_holder_applies_newer_and_refuses_older(demo: DemoRegistry) -> None:
    clock = {"now": NOW + dt.timedelta(hours=1)}
    holder = RegistryHolder([demo.authority_cert], clock=lambda: clock["now"])
    with pytest.raises(ConfigError, match="no registry snapshot"):
        holder.snapshot_at()
    v1 = holder.apply(demo.text())
    assert holder.current is v1 and holder.current_text == demo.text().encode()
    assert holder.apply(demo.text()) is v1  # the same again: no change

    def signed(version: int, issued: dt.datetime, **changes: Any) -> str:
        doc = build_snapshot(
            _source_of(demo, version=version, **changes),
            key=demo.authority_key,
            cert=demo.authority_cert,
            issued=issued,
        )
        return _text(doc)

    v3 = holder.apply(signed(3, NOW + dt.timedelta(minutes=30)))
    assert holder.current is v3 and v3.version == 3
    with pytest.raises(TrustError, match="older than version 3"):
        holder.apply(signed(2, NOW + dt.timedelta(minutes=40)))
    with pytest.raises(TrustError, match="differs from the one held"):
        holder.apply(signed(3, NOW + dt.timedelta(minutes=50), note="changed"))
    assert holder.current is v3
    # An expired current snapshot decides nothing.
    clock["now"] = NOW + dt.timedelta(days=8)
    with pytest.raises(TrustError, match="expired"):
        holder.snapshot_at()
    # A restarted gateway refuses what it had already replaced.
    restarted = RegistryHolder([demo.authority_cert], clock=lambda: NOW + dt.timedelta(hours=1), min_version=3)
    with pytest.raises(TrustError, match="older"):
        restarted.apply(demo.text())


def test_holder_needs_an_authority_certificate(demo: DemoRegistry) -> None:
    with pytest.raises(ConfigError):
        RegistryHolder([demo.member_certs[TONGJIANG]])


def test_snapshot_is_the_trust_source_for_member_signatures(demo: DemoRegistry) -> None:
    snap = demo.snapshot(NOW)
    assert isinstance(snap, TrustSource)
    cert = demo.member_certs[TONGJIANG]
    assert snap.certificates_for_kid(kid_of(cert)) == [cert]
    assert snap.authorities() == [demo.authority_cert]
    assert check_certificate(cert, snap, NOW + dt.timedelta(hours=1)) == TONGJIANG
    # A Bundle signed by a member verifies against the snapshot directly.
    bundle = json.loads((DATA / "bundle-lab-tongjiang.json").read_text(encoding="utf-8"))
    signed = sign_bundle(
        bundle, demo.member_keys[TONGJIANG], [cert], who=signer_reference(cert), when=NOW + dt.timedelta(minutes=5)
    )
    verified = verify_bundle(dumps(signed), snap, at=NOW + dt.timedelta(minutes=10))
    assert verified.signer_uscc == TONGJIANG


def test_build_refuses_a_member_certificate_another_authority_issued(demo: DemoRegistry) -> None:
    """Listed, it would be refused by every gateway once the member signs with it ("not issued by a trusted
    registry authority", found only by the member's /health): the build names it instead."""
    from gateway.signing.keys import issue_certificate

    stranger_key = generate_private_key()
    stranger = make_authority(stranger_key, "11500000MB00050043", "川渝卫生健康联合办公室（演示）",
                              NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    evil = issue_certificate(generate_private_key().public_key(), TONGJIANG, "通江县人民医院（演示）", stranger_key,
                             stranger, NOW, NOW + dt.timedelta(days=10))
    body = _source_of(demo).body
    body["members"][0]["certificates"].append({"pem": cert_pem(evil).decode()})
    with pytest.raises(ConfigError) as refused:
        build_snapshot(RegistrySource(body, "test"), key=demo.authority_key, cert=demo.authority_cert, issued=NOW)
    assert "members[0].certificates[1]" in refused.value.message and TONGJIANG in refused.value.message
    assert "was not issued by the registry authority certificate" in refused.value.message
    body["members"][0]["certificates"].pop()
    build_snapshot(RegistrySource(body, "test"), key=demo.authority_key, cert=demo.authority_cert, issued=NOW)


def test_removal_from_the_snapshot_is_revocation(demo: DemoRegistry) -> None:
    body = _source_of(demo).body
    body["members"][0]["certificates"] = []  # the authority drops 通江's certificate
    doc = build_snapshot(
        RegistrySource(body, "test"),
        key=demo.authority_key,
        cert=demo.authority_cert,
        issued=NOW + dt.timedelta(minutes=1),
    )
    snap = verify_snapshot(_text(doc), [demo.authority_cert], NOW + dt.timedelta(minutes=2))
    cert = demo.member_certs[TONGJIANG]
    assert snap.certificates_for_kid(kid_of(cert)) == []
    assert not snap.is_listed(cert, NOW + dt.timedelta(minutes=2))
    with pytest.raises(UnknownIssuer):
        check_certificate(cert, snap, NOW + dt.timedelta(minutes=2))


def test_listing_follows_member_period_and_listing_dates(demo: DemoRegistry) -> None:
    body = _source_of(demo).body
    by_uscc = {m["uscc"]: m for m in body["members"]}
    by_uscc[FULING]["valid_to"] = "2026-11-30"
    by_uscc[CDC]["certificates"][0]["valid_to"] = "2026-11-25"
    doc = build_snapshot(RegistrySource(body, "t"), key=demo.authority_key, cert=demo.authority_cert, issued=NOW)
    snap = verify_snapshot(_text(doc), [demo.authority_cert], NOW)
    fuling, cdc = demo.member_certs[FULING], demo.member_certs[CDC]
    assert snap.is_listed(fuling, dt.datetime(2026, 11, 30, 23, 59, tzinfo=CST))
    assert not snap.is_listed(fuling, dt.datetime(2026, 12, 1, 0, 0, tzinfo=CST))
    assert snap.is_listed(cdc, dt.datetime(2026, 11, 25, 23, 59, tzinfo=CST))
    assert not snap.is_listed(cdc, dt.datetime(2026, 11, 26, 0, 0, tzinfo=CST))
    # Outside the certificate's own validity it is not listed either.
    assert not snap.is_listed(fuling, NOW - dt.timedelta(days=2))


def test_read_unverified_for_display(demo: DemoRegistry) -> None:
    snap = read_snapshot_unverified(demo.text())
    assert snap.version == 1 and snap.authority_certificates == ()


# -- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("authority")
    key = generate_private_key()
    cert = make_authority(
        key,
        "11500000MB00050043",
        "川渝卫生健康联合办公室（演示）",
        NOW - dt.timedelta(days=1),
        NOW + dt.timedelta(days=365),
    )
    (d / "TEST-authority.key").write_bytes(private_key_pem(key, b"secret"))
    (d / "password").write_text("secret\n")
    for private in ("TEST-authority.key", "password"):  # (the authority's key is refused when others may read it)
        (d / private).chmod(0o600)
    (d / "authority.pem").write_bytes(cert_pem(cert))
    return {"key": d / "TEST-authority.key", "cert": d / "authority.pem", "password": d / "password", "dir": d}


def test_cli_build_verify_show(authority_files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "snapshot.json"
    result = runner.invoke(
        registry,
        [
            "build",
            str(DEMO_SOURCE),
            "--out",
            str(out),
            "--key",
            str(authority_files["key"]),
            "--key-password-file",
            str(authority_files["password"]),
            "--cert",
            str(authority_files["cert"]),
            "--issued",
            "2026-11-22T09:00:00+08:00",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "version 1" in result.output and "2026-11-29T09:00:00+08:00" in result.output
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["signature"]["jws"].count(".") == 2 and ".." in doc["signature"]["jws"]

    result = runner.invoke(
        registry, ["verify", str(out), "--authority", str(authority_files["cert"]), "--at", "2026-11-23T09:00:00+08:00"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: registry snapshot version 1") and "[DEMO]" in result.output
    # the spelling of template, issue-cert and build is taken too (it was "No such option")
    same = runner.invoke(registry, ["verify", str(out), "--authority-cert", str(authority_files["cert"]), "--at",
                                    "2026-11-23T09:00:00+08:00"])
    assert same.exit_code == 0 and same.output == result.output, same.output

    result = runner.invoke(
        registry, ["verify", str(out), "--authority", str(authority_files["cert"]), "--at", "2026-12-01T09:00:00+08:00"]
    )
    assert result.exit_code == 1 and "expired" in result.output and "Traceback" not in result.output

    # without --authority: the registry_authority of the gateway --config names, as every setting is read
    from gateway.cli import cli

    config = tmp_path / "gateway.toml"
    config.write_text(f'registry_authority = "{authority_files["cert"]}"\n', encoding="utf-8")
    result = runner.invoke(cli, ["--config", str(config), "registry", "verify", str(out),
                                 "--at", "2026-11-23T09:00:00+08:00"], env={"GATEWAY_REGISTRY_AUTHORITY": None})
    assert result.exit_code == 0 and result.output.startswith("OK: registry snapshot version 1"), result.output

    result = runner.invoke(
        registry, ["show", str(out), "--authority", str(authority_files["cert"]), "--at", "2026-11-23T09:00:00+08:00"]
    )
    assert result.exit_code == 0, result.output
    eqa = len(load_source(DEMO_SOURCE).body["eqa"])
    for text in ("version 1", "DEMO", "(verified)", "通江县人民医院（演示）", "川渝HR", f"EQA results ({eqa})"):
        assert text in result.output
    # Levels are dated: the one held on the date shown (邻水 became 三级乙等 on 2025-07-01).
    linshui = next(x for x in result.output.splitlines() if "邻水县人民医院（演示）" in x)
    assert "三级乙等" in linshui
    result = runner.invoke(registry, ["show", str(out)])
    assert "NOT verified" in result.output

    tampered = tmp_path / "tampered.json"
    tampered.write_text(out.read_text(encoding="utf-8").replace("二级甲等", "三级甲等", 1), encoding="utf-8")
    result = runner.invoke(
        registry,
        ["verify", str(tampered), "--authority", str(authority_files["cert"]), "--at", "2026-11-23T09:00:00+08:00"],
    )
    assert result.exit_code == 1 and "signature verification failed" in result.output


def test_cli_verify_refuses_version_regress(authority_files: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    data = load_source(DEMO_SOURCE)
    base = [
        "--key",
        str(authority_files["key"]),
        "--key-password-file",
        str(authority_files["password"]),
        "--cert",
        str(authority_files["cert"]),
        "--issued",
        "2026-11-22T09:00:00+08:00",
    ]
    newer_src = tmp_path / "v2.json"
    newer_src.write_text(json.dumps({**_raw_source(), "version": 2}, ensure_ascii=False), encoding="utf-8")
    assert data.version == 1
    for src, name in ((DEMO_SOURCE, "v1.json"), (newer_src, "v2.json")):
        result = runner.invoke(registry, ["build", str(src), "--out", str(tmp_path / f"snap-{name}"), *base])
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        registry,
        [
            "verify",
            str(tmp_path / "snap-v1.json"),
            "--current",
            str(tmp_path / "snap-v2.json"),
            "--authority",
            str(authority_files["cert"]),
            "--at",
            "2026-11-22T10:00:00+08:00",
        ],
    )
    assert result.exit_code == 1 and "older than version 2" in result.output


def _raw_source() -> dict[str, Any]:
    from gateway.registry.source import read_source_data

    return read_source_data(DEMO_SOURCE)


def test_cli_check_schema_and_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(registry, ["check", str(DEMO_SOURCE)])
    assert result.exit_code == 0 and result.output.startswith("OK:")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({**_raw_source(), "authority": {"uscc": "11500000MB00050044", "name": "x"}}), encoding="utf-8"
    )
    result = runner.invoke(registry, ["check", str(bad)])
    assert result.exit_code == 2 and "authority.uscc" in result.output and "check character" in result.output
    assert result.output.count("\n") == 1
    result = runner.invoke(registry, ["schema"])
    assert result.exit_code == 0 and json.loads(result.output)["title"].startswith("川渝")


def test_cli_demo_writes_keys_only_where_allowed(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "demo-registry"
    result = runner.invoke(registry, ["demo", "--out", str(out), "--at", "2026-11-22T09:00:00+08:00"])
    assert result.exit_code == 0, result.output
    assert (out / "DEMO-snapshot.json").exists() and (out / "DEMO-authority.pem").exists()
    key = out / f"DEMO-{TONGJIANG}.key"
    assert key.stat().st_mode & 0o777 == 0o600
    result = runner.invoke(
        registry,
        [
            "verify",
            str(out / "DEMO-snapshot.json"),
            "--authority",
            str(out / "DEMO-authority.pem"),
            "--at",
            "2026-11-22T09:30:00+08:00",
        ],
    )
    assert result.exit_code == 0, result.output
    inside = Path(__file__).resolve().parent.parent / "gateway" / "registry-keys"
    result = runner.invoke(registry, ["demo", "--out", str(inside)])
    assert result.exit_code == 1 and "inside the checkout" in result.output
    assert not inside.exists()


def test_every_registry_command_has_help() -> None:
    runner = CliRunner()
    for name, command in registry.commands.items():
        assert command.help, name
        result = runner.invoke(registry, [name, "--help"])
        assert result.exit_code == 0
        for param in command.params:
            if isinstance(param, __import__("click").Option):
                assert param.help, f"{name} {param.name}"


def test_certificate_lookups_equal_the_search_they_replace(demo: DemoRegistry) -> None:
    """``is_listed`` and ``member_of_certificate`` look the certificate up by fingerprint (every verified signature
    and every peer's TLS certificate asks); they answer what the search through every member answered, also for a
    certificate no member lists and once the members are replaced."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from gateway.signing.keys import uscc_of

    snap = demo.snapshot(NOW)

    def fingerprint(cert: Any) -> str:
        return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def listed_reference(cert: Any, at: dt.datetime) -> bool:
        from gateway.registry.models import china_date

        for member in snap.members.values():
            for mc in member.certificates:
                if mc.fingerprint == fingerprint(cert) and member.uscc == uscc_of(cert):
                    return member.active_on(china_date(at)) and mc.valid_at(at)
        return False

    def member_reference(cert: Any) -> Any:
        return next((m for m in snap.members.values()
                     if any(mc.fingerprint == fingerprint(cert) for mc in m.certificates)), None)

    stranger = make_authority(generate_private_key(), "12330000470051726F", "外省机构（演示）",
                              NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    certs = [*demo.member_certs.values(), demo.authority_cert, stranger]
    assert len(demo.member_certs) >= 3
    tongjiang = demo.member_certs[TONGJIANG]
    assert snap.member_of_certificate(tongjiang).uscc == TONGJIANG and snap.is_listed(tongjiang, NOW)
    assert snap.certificates_for_kid(kid_of(tongjiang)) == [tongjiang]
    import dataclasses

    # 通江's certificate listed under 涪陵 too, 涪陵 first: the member of the certificate is the first listing it, and
    # it is listed for the member it names (通江) only
    fuling = snap.members[FULING]
    shared = dataclasses.replace(fuling, certificates=(*fuling.certificates, *snap.members[TONGJIANG].certificates))
    snap.members = {FULING: shared, **{k: m for k, m in snap.members.items() if k != FULING}}
    assert snap.member_of_certificate(tongjiang) is shared and snap.is_listed(tongjiang, NOW)
    assert not snap.is_listed(demo.member_certs[FULING], NOW - dt.timedelta(days=4000))
    for round_ in range(3):
        if round_ == 1:
            snap.members = {k: snap.members[k] for k in reversed(snap.members)}  # another order: the last listing
        if round_ == 2:
            snap.members = {k: m for k, m in snap.members.items() if k != TONGJIANG}  # replaced: looked up anew
            assert snap.member_of_certificate(tongjiang) is shared and not snap.is_listed(tongjiang, NOW)
            assert snap.certificates_for_kid(kid_of(tongjiang)) == [tongjiang]  # (listed by 涪陵 still)
        for cert in certs:
            assert snap.member_of_certificate(cert) is member_reference(cert)
            for at in (NOW - dt.timedelta(days=4000), NOW, NOW + dt.timedelta(days=400)):
                assert snap.is_listed(cert, at) is listed_reference(cert, at)
