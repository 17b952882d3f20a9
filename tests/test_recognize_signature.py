"""`gateway recognize` and `$recognize` take the signer of a Bundle from a verified signature only.

The remote-reading rule (基层检查、上级诊断) passes when the reading institution signed the Bundle. A Bundle given to
the command or the API is held to what the exchange does on receipt: a signature must verify against the registry
snapshot's certificates. Here 涪陵 (the reading hospital) signs the township's CT and ECG with its real key; copies
whose `signature.who` was rewritten, or whose signature value is made up, are refused with one line; an unsigned
Bundle is decided as unsigned (needs-review), never as signed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import cli

DATA = Path(__file__).parent / "data" / "registry"
FULING, QINGXI, TONGJIANG = "12500102MB0002006J", "12500102MB00090052", "12511921MB0001003C"
AT = "2026-11-22T10:00:00+08:00"


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sig") / "demo"
    code, output = run("registry", "demo", "--out", str(out), "--at", "2026-11-22T09:00:00+08:00")
    assert code == 0, output
    return out


def signed_by(demo: Path, uscc: str, tmp: Path) -> Path:
    out = tmp / f"signed-by-{uscc}.json"
    code, output = run("sign", str(DATA / "bundle-remote-reading-qingxi.json"), "--key", str(demo / f"DEMO-{uscc}.key"),
                       "--cert", str(demo / f"DEMO-{uscc}.pem"), "--at", "2026-11-22T09:30:00+08:00", "--out", str(out))
    assert code == 0, output
    return out


def recognize(demo: Path, bundle: Path) -> tuple[int, str]:
    return run("recognize", "--registry", str(demo / "DEMO-snapshot.json"),
               "--authority", str(demo / "DEMO-authority.pem"), "--receiver", TONGJIANG, "--at", AT, "--json",
               str(bundle))


def outcomes(output: str) -> list[tuple[str, str]]:
    doc = json.loads(output[: output.rindex("}") + 1])
    out = [(d["outcome"], r["status"]) for d in doc["decisions"] for r in d["rules"]
           if r["rule"] == "reading-signature"]
    assert len(out) == 2, "the CT and the ECG"  # the CT's written conclusion is never recognised, and not here
    return out


def test_signed_by_the_reading_hospital_passes(demo: Path, tmp_path: Path) -> None:
    code, output = recognize(demo, signed_by(demo, FULING, tmp_path))
    assert code == 0, output
    assert {status for _, status in outcomes(output)} == {"passed"}


def test_a_rewritten_signer_or_a_made_up_signature_is_refused(demo: Path, tmp_path: Path) -> None:
    township = json.loads(signed_by(demo, QINGXI, tmp_path).read_text(encoding="utf-8"))
    township["signature"]["who"]["identifier"]["value"] = FULING  # claims the reading hospital signed
    forged = tmp_path / "forged-who.json"
    forged.write_text(json.dumps(township, ensure_ascii=False), encoding="utf-8")
    made_up = json.loads((DATA / "bundle-remote-reading-qingxi.json").read_text(encoding="utf-8"))
    made_up["signature"] = {"type": township["signature"]["type"], "when": township["signature"]["when"],
                            "who": township["signature"]["who"], "sigFormat": "application/jose", "data": "AAAA"}
    fake = tmp_path / "made-up.json"
    fake.write_text(json.dumps(made_up, ensure_ascii=False), encoding="utf-8")
    for path, words in ((forged, f"names {FULING} but the signature is {QINGXI}'s"), (fake, "does not verify")):
        code, output = recognize(demo, path)
        assert code != 0 and words in output, output
        assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output


def test_an_unsigned_bundle_is_decided_as_unsigned(demo: Path) -> None:
    code, output = recognize(demo, DATA / "bundle-remote-reading-qingxi.json")
    assert code == 0, output
    assert {o for o in outcomes(output)} == {("needs-review", "not-evaluable")}


def test_the_api_holds_a_bundle_to_its_signature_too(demo: Path, tmp_path: Path, database: str) -> None:
    """POST /fhir/$recognize: the genuine signature decides as signed; a made-up one is an OperationOutcome."""
    # the app as the registry API tests build it, with this member's submitter account
    from test_registry_api import authed, build_demo_registry, recognize_body, Clock, NOW, RegistryHolder, Flask
    from gateway.api.errors import register_error_handlers
    from gateway.api.registry import bp, install
    from gateway import auth
    from gateway.audit.records import Party
    from gateway.config import load_settings
    from gateway.store.db import connect
    import datetime as dt

    registry = build_demo_registry(NOW)
    clock = Clock(NOW + dt.timedelta(hours=1))
    holder = RegistryHolder([registry.authority_cert], clock=clock)
    holder.apply(registry.text())
    application = Flask("signature")
    register_error_handlers(application)
    application.register_blueprint(bp)
    locator = database or tmp_path / "gw.db"  # the backend chosen with --backend
    install(application, holder, clock=clock, database=locator)
    application.extensions["gateway.settings"] = load_settings(
        environ={},
        overrides={"data_dir": str(tmp_path), "database": str(locator), "issuer_uscc": TONGJIANG})
    _, token = auth.add_user(connect(locator), "his", ["submitter"], at=clock(),
                             gateway=Party.member(TONGJIANG), by=Party.user(TONGJIANG, "setup"))
    application.config["TEST_TOKEN"] = token
    client = authed(application)

    from gateway.signing.jws import sign_bundle, signer_reference
    source = json.loads((DATA / "bundle-remote-reading-qingxi.json").read_text(encoding="utf-8"))
    signed = sign_bundle(source, registry.member_keys[FULING], [registry.member_certs[FULING]],
                         who=signer_reference(registry.member_certs[FULING]),
                         when=dt.datetime(2026, 11, 22, 9, 30, tzinfo=NOW.tzinfo))
    ok = client.post("/fhir/$recognize", json=recognize_body(signed, receiver=TONGJIANG))
    assert ok.status_code == 200, ok.get_data(as_text=True)
    made_up = dict(source, signature=dict(signed["signature"], data="AAAA"))
    refused = client.post("/fhir/$recognize", json=recognize_body(made_up, receiver=TONGJIANG))
    body = refused.get_json()
    assert refused.status_code in (400, 422) and body["resourceType"] == "OperationOutcome", body
    assert "does not verify" in json.dumps(body, ensure_ascii=False)
