"""Make vectors: regenerate the signing test vectors in this directory.

Run from the repository root: ``python tests/data/signing/make_vectors.py``.

Keys (tests/data/keys/TEST-*) and certificates are created only when missing, so
re-running keeps the committed ones; everything derived from them is rewritten
and, because ES256 signatures here are deterministic (RFC 6979), comes out byte
for byte the same. A changed output therefore means the signing code changed
what it signs: that breaks every Bundle already signed in the field.
"""
from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from gateway.signing import (  # noqa: E402
    cert_pem,
    document_bytes,
    dumps,
    generate_private_key,
    issue_certificate,
    load_certificate,
    load_private_key,
    make_authority,
    make_csr,
    parse_json,
    private_key_pem,
    sign_bundle,
    signer_reference,
)
from gateway.signing.jws import sign_detached  # noqa: E402

CST = dt.timezone(dt.timedelta(hours=8))
KEYS = ROOT / "tests" / "data" / "keys"

AUTHORITY_USCC = "11510000MB00000434"  # synthetic; passes the GB 32100 check
AUTHORITY_NAME = "川渝互认登记机构（测试）"
MEMBER_USCC = "12510121MB00000193"  # the issuer in report-bundle.json
MEMBER_NAME = "测试县人民医院（测试数据）"
AUTHORITY_VALIDITY = (dt.datetime(2025, 1, 1, tzinfo=CST), dt.datetime(2035, 1, 1, tzinfo=CST))
MEMBER_VALIDITY = (dt.datetime(2025, 1, 1, tzinfo=CST), dt.datetime(2030, 1, 1, tzinfo=CST))
SIG_TIME = dt.datetime(2025, 6, 1, 10, 30, tzinfo=CST)


def _key(name: str):  # type: ignore[no-untyped-def]
    path = KEYS / name
    if not path.exists():
        KEYS.mkdir(parents=True, exist_ok=True)
        path.write_bytes(private_key_pem(generate_private_key()))
        print("created", path.relative_to(ROOT))
    return load_private_key(path)


def main() -> None:
    authority_key = _key("TEST-authority.key.pem")
    member_key = _key("TEST-member-sichuan.key.pem")

    authority_path = HERE / "authority.cert.pem"
    if not authority_path.exists():
        authority = make_authority(authority_key, AUTHORITY_USCC, AUTHORITY_NAME, *AUTHORITY_VALIDITY)
        authority_path.write_bytes(cert_pem(authority))
        print("created", authority_path.relative_to(ROOT))
    authority = load_certificate(authority_path)

    member_path = HERE / "member-sichuan.cert.pem"
    if not member_path.exists():
        csr = make_csr(member_key, MEMBER_USCC, MEMBER_NAME)
        cert = issue_certificate(csr, MEMBER_USCC, MEMBER_NAME, authority_key, authority, *MEMBER_VALIDITY)
        member_path.write_bytes(cert_pem(cert))
        print("created", member_path.relative_to(ROOT))
    member = load_certificate(member_path)

    bundle = parse_json((HERE / "report-bundle.json").read_bytes())
    payload = document_bytes(bundle)
    (HERE / "report-bundle.document.jcs").write_bytes(payload)
    jws = sign_detached(payload, member_key, [member], sig_time=SIG_TIME)
    (HERE / "report-bundle.jws").write_text(jws + "\n", encoding="ascii")
    signed = sign_bundle(bundle, member_key, [member], who=signer_reference(member), when=SIG_TIME)
    (HERE / "report-bundle.signed.json").write_text(dumps(signed, indent=2) + "\n", encoding="utf-8")
    print("wrote report-bundle.document.jcs, report-bundle.jws, report-bundle.signed.json")


if __name__ == "__main__":
    main()
