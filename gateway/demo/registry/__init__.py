"""Demo registry: the DEMO registry authority, members and signed snapshot for ``gateway demo``.

Everything here is demonstration material. The source is ``DEMO-registry.yaml``
beside this module (synthetic institutions, illustrative catalogues and
windows). Keys are generated at run time and never written to the repository:
the registry authority gets a self-signed CA certificate, every member a
signing certificate issued by it, and the snapshot lists those certificates, so
the demo members can sign Bundles that the other members verify against it.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.registry.models import Snapshot
from gateway.registry.snapshot import DEFAULT_VALIDITY, build_snapshot, verify_snapshot
from gateway.registry.source import parse_source, read_source_data
from gateway.signing.canonical import dumps
from gateway.signing.keys import cert_pem, generate_private_key, issue_certificate, make_authority

__all__ = ["DEMO_SOURCE", "DEMO_AUTHORITY_USCC", "DEMO_MEMBERS", "DemoRegistry", "build_demo_registry"]

#: The DEMO registry source file.
DEMO_SOURCE = Path(__file__).with_name("DEMO-registry.yaml")

#: The demo registry authority: 川渝卫生健康联合办公室（演示）.
DEMO_AUTHORITY_USCC = "11500000MB00050043"

#: The demo members, USCC -> name.
DEMO_MEMBERS = {
    "12511921MB0001003C": "通江县人民医院（演示）",
    "12500102MB0002006J": "重庆市涪陵中心医院（演示）",
    "12510000MB00030095": "四川省疾病预防控制中心（演示）",
}


@dataclass(frozen=True)
class DemoRegistry:
    """A signed demo snapshot with the keys and certificates behind it (all generated at run time)."""

    document: dict[str, Any]
    authority_key: ec.EllipticCurvePrivateKey
    authority_cert: x509.Certificate
    member_keys: dict[str, ec.EllipticCurvePrivateKey]
    member_certs: dict[str, x509.Certificate]

    def text(self) -> str:
        """The snapshot as JSON text, as a gateway would receive it."""
        return dumps(self.document, indent=2)

    def snapshot(self, at: _dt.datetime) -> Snapshot:
        """The snapshot, verified against the demo authority at ``at``.

        :raises TrustError: expired at ``at``.
        """
        return verify_snapshot(self.text(), [self.authority_cert], at)


def build_demo_registry(
    now: _dt.datetime,
    *,
    version: int | None = None,
    valid_for: _dt.timedelta = DEFAULT_VALIDITY,
    endpoints: dict[str, str] | None = None,
    drop_members: tuple[str, ...] = (),
    reuse: "DemoRegistry | None" = None,
) -> DemoRegistry:
    """Generate the demo authority and member keys, and build the signed DEMO snapshot issued at ``now``.

    ``endpoints`` replaces members' endpoint URLs (the demo's loopback gateways);
    ``drop_members`` leaves those members' certificates out (revocation);
    ``reuse`` keeps the keys of an earlier demo registry for a newer snapshot.

    The authority certificate runs from a day before ``now`` for a year; member
    certificates for 180 days (short-lived, as DCC signer certificates are).

    :raises InputError: ``now`` has no UTC offset.
    """
    data = read_source_data(DEMO_SOURCE)
    if version is not None:
        data["version"] = version
    start = now - _dt.timedelta(days=1)
    if reuse is not None:  # a later snapshot of the same demo world: same keys
        authority_key, authority_cert = reuse.authority_key, reuse.authority_cert
    else:
        authority_key = generate_private_key()
        authority_cert = make_authority(
            authority_key, DEMO_AUTHORITY_USCC, data["authority"]["name"], start, start + _dt.timedelta(days=366)
        )
    member_keys: dict[str, ec.EllipticCurvePrivateKey] = {}
    member_certs: dict[str, x509.Certificate] = {}
    for member in data["members"]:
        if endpoints and member["uscc"] in endpoints:
            member["endpoint"] = endpoints[member["uscc"]]
        if reuse is not None and member["uscc"] in reuse.member_keys:
            key, cert = reuse.member_keys[member["uscc"]], reuse.member_certs[member["uscc"]]
        else:
            key = generate_private_key()
            cert = issue_certificate(
                key.public_key(),
                member["uscc"],
                member["name"],
                authority_key,
                authority_cert,
                start,
                start + _dt.timedelta(days=180),
            )
        member_keys[member["uscc"]], member_certs[member["uscc"]] = key, cert
        if member["uscc"] not in drop_members:  # removal from the snapshot is revocation
            member["certificates"] = [{"pem": cert_pem(cert).decode("ascii")}]
    # Through the ordinary source checks, as if the authority had typed the certificates in.
    source = parse_source(json.dumps(data, ensure_ascii=False), origin=str(DEMO_SOURCE), is_json=True)
    document = build_snapshot(source, key=authority_key, cert=authority_cert, issued=now, valid_for=valid_for)
    return DemoRegistry(document, authority_key, authority_cert, member_keys, member_certs)
