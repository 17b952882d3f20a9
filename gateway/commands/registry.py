"""Registry commands: check a registry source, build and sign a snapshot, verify it, show it.

- ``gateway registry check SRC``: every problem of a source file, with its path;
- ``gateway registry build SRC --out SNAPSHOT --key K --cert C``: the signed, versioned snapshot;
- ``gateway registry verify SNAPSHOT --authority CERT [--current HELD]``: what a gateway checks
  before it uses a snapshot (signature, authority, expiry, no version regress);
- ``gateway registry show SNAPSHOT``: a readable summary;
- ``gateway registry schema``: the JSON Schema of the source format;
- ``gateway registry template``: a source to start from, listing members with their certificates;
- ``gateway registry demo --out DIR``: the DEMO snapshot with run-time generated keys.

Errors reach the user as one line and a non-zero exit (2 for configuration).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from gateway.commands.common import AWARE, AwareDateTime, now_cst, one_line_errors

from gateway.config import REPO_ROOT
from gateway.registry.models import QUALIFICATION_TYPES, Snapshot, china_date
from gateway.registry.snapshot import (
    MAX_VERSION,
    RegistryHolder,
    build_snapshot,
    check_no_bom,
    read_snapshot_unverified,
    verify_snapshot,
)
from gateway.registry.source import RegistrySource, load_source, parse_source, source_schema
from gateway.signing.canonical import dumps
from gateway.signing.keys import (
    cert_pem,
    kid_of,
    load_certificate,
    load_certificates,
    load_private_key,
    name_of,
    private_key_pem,
    uscc_of,
)

__all__ = [
    "registry",
    "AwareDateTime",
    "one_line_errors",
    "write_atomic",
    "authority_certificates",
    "DEFAULT_AUTHORITY",
]

_CST = _dt.timezone(_dt.timedelta(hours=8))


_AWARE = AWARE


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)  # before any byte is written: a key is never readable by others
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Where a gateway keeps the registry authority's certificate unless told otherwise.
DEFAULT_AUTHORITY = REPO_ROOT / "certs" / "registry-authority.pem"


def authority_certificates(paths: tuple[str, ...]) -> list[x509.Certificate]:
    """The trusted registry authority certificates: the given files, else ``certs/registry-authority.pem``.

    :raises click.ClickException: none given and no default file.
    :raises ConfigError: a file holds no certificate.
    """
    if not paths:
        configured = _configured_authority()
        if configured:
            paths = (configured,)
        elif not DEFAULT_AUTHORITY.exists():
            raise click.ClickException(
                "no registry authority certificate: give --authority (or GATEWAY_REGISTRY_AUTHORITY, or "
                f"registry_authority in the --config file), or place it at {DEFAULT_AUTHORITY}"
            )
        else:
            paths = (str(DEFAULT_AUTHORITY),)
    return [cert for path in paths for cert in load_certificates(path)]


def _configured_authority() -> str:
    """``registry_authority`` of the gateway named by ``--config`` (or ``GATEWAY_CONFIG``), when one is named: the
    settings file is read as every command reads it, below the environment and the command's own options."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    if root is None or not isinstance(root.obj, dict) or not root.obj.get("config"):
        return ""
    from gateway.commands.audit import settings_for

    return str(settings_for(ctx).registry_authority or "")  # type: ignore[arg-type]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read: {exc.strerror}") from None


@click.group()
def registry() -> None:
    """The recognition registry: members, qualifications, EQA results, catalogues; signed snapshots."""


@registry.command("check")
@click.argument("source", type=click.Path(dir_okay=False))
def check(source: str) -> None:
    """Check registry SOURCE (YAML or JSON) and list every problem with its path."""
    with one_line_errors():
        src = load_source(source)
    body = src.body
    click.echo(
        f"OK: {source} version {src.version}: {len(body['members'])} members, {len(body['qualifications'])} "
        f"qualifications, {len(body['eqa'])} EQA results, {len(body['catalogues'])} catalogues"
    )


@registry.command("schema")
def schema() -> None:
    """Print the JSON Schema of the registry source format."""
    click.echo(json.dumps(source_schema(), ensure_ascii=False, indent=2))


def _yaml_text(value: str) -> str:
    """A YAML scalar for ``value`` (JSON strings are YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _template(authority: x509.Certificate, members: list[tuple[x509.Certificate, str, str]], today: _dt.date) -> str:
    """The text of a registry source listing ``members`` (certificate, its file, endpoint), ready to edit."""
    lines = [
        f"# Registry source written by `gateway registry template` on {today.isoformat()}.",
        "# Edit it, check it with `gateway registry check FILE` and sign a snapshot with `gateway registry build`.",
        "# Every field: `gateway registry schema`; a complete example: gateway/demo/registry/DEMO-registry.yaml.",
        "format: cyhr-registry-source/1",
        "version: 1",
        "authority:",
        f"  uscc: {_yaml_text(uscc_of(authority) or '')}",
        f"  name: {_yaml_text(name_of(authority) or '')}",
        "members:" if members else "members: []    # give --member CERT ENDPOINT for each member",
    ]
    kinds = source_schema()["$defs"]["member"]["properties"]["kind"]["enum"]
    for cert, path, endpoint in members:
        uscc = uscc_of(cert) or ""
        lines += [
            f"  - uscc: {_yaml_text(uscc)}",
            f"    name: {_yaml_text(name_of(cert) or '')}",
            f"    division: {_yaml_text(uscc[2:8])}    # GB/T 2260 division (the USCC's registration division)",
            f"    kind: hospital    # {', '.join(kinds[:-1])} or {kinds[-1]}",
            "    # the hospital level is dated: a hospital-grade qualification (grade: 三级甲等, valid_from/valid_to)",
            f"    endpoint: {_yaml_text(endpoint)}    # the member gateway's public_url",
            f"    valid_from: {_yaml_text(today.isoformat())}",
            "    certificates:",
            f"      - path: {_yaml_text(path)}",
        ]
    lines += [
        "qualifications: []    # practice licences, grades, ISO 15189, 职业健康检查备案 ... (see the schema)",
        "eqa: []               # 室间质评 results: member, item, year, provider, result",
        "catalogues:",
        "  # AN EXAMPLE to replace with the published catalogue: one item, recognised across the border.",
        "  - id: example",
        "    name: 示例互认目录（请替换）",
        "    version: \"0\"",
        "    scope: {type: chuanyu}",
        "    mark: 川渝HR",
        f"    valid_from: {_yaml_text(today.isoformat())}",
        "    items:",
        "      - {code: EX-L001, display: 血红蛋白, class: lab, loinc: [718-7], window_days: 7}",
    ]
    return "\n".join(lines) + "\n"


@registry.command("template")
@click.option(
    "--authority-cert",
    "authority_cert",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The registry authority's certificate (PEM), as `gateway registry init-authority` wrote it.",
)
@click.option(
    "--member",
    "members",
    multiple=True,
    type=(click.Path(exists=True, dir_okay=False), str),
    metavar="CERT ENDPOINT",
    help="A member: its certificate (PEM, from `gateway registry issue-cert`) and the base URL of its gateway "
    "(its public_url, e.g. https://gw.example.cn; other members post to ENDPOINT/exchange/bundles). Repeatable.",
)
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Write the source here instead of printing it (an existing file is not overwritten).")
@click.option("--force", is_flag=True, help="With --out: overwrite an existing file (an edited source is lost).")
def template(authority_cert: str, members: tuple[tuple[str, str], ...], out: str | None, force: bool) -> None:
    """Print a registry source listing the authority and each member with its certificate and endpoint."""
    with one_line_errors():
        authority = load_certificate(authority_cert)
        listed = []
        for i, (cert_path, endpoint) in enumerate(members):
            cert = load_certificate(cert_path)
            if not uscc_of(cert):
                raise click.ClickException(f"--member {cert_path}: the certificate names no 统一社会信用代码")
            listed.append((cert, str(Path(cert_path).resolve()), _check_endpoint(endpoint, f"--member {cert_path}")))
        text = _template(authority, listed, china_date(now_cst()))
        # What the template says must pass the ordinary checks (the example catalogue included).
        parse_source(text, origin="template")
    if out:
        if Path(out).exists() and not force:
            raise click.ClickException(f"{out} already exists; not overwritten (it may hold catalogues and EQA results "
                                       "the authority added): give another --out, or --force")
        write_atomic(Path(out), text)
        click.echo(f"wrote {out}: {len(members)} member(s); edit it, then `gateway registry check {out}`")
    else:
        click.echo(text, nl=False)


def _check_endpoint(endpoint: str, where: str) -> str:
    """A member endpoint as the registry lists it: the gateway's base URL, without a trailing slash."""
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise click.ClickException(
            f"{where}: endpoint {endpoint!r} must be the gateway's base URL, like https://gw.example.cn"
        )
    return endpoint.rstrip("/")


@registry.command("build")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Snapshot file to write.")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Registry authority private key (PEM).",
)
@click.option(
    "--cert",
    "cert_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Registry authority certificate (PEM, self-signed CA).",
)
@click.option(
    "--key-password-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File holding the private key's password, if it is encrypted.",
)
@click.option(
    "--valid-days",
    type=click.IntRange(1, 366),
    default=7,
    show_default=True,
    help="Days the snapshot stays valid; gateways refuse it afterwards.",
)
@click.option("--issued", type=_AWARE, help="Issue time (ISO 8601 with offset); default now.")
@click.option(
    "--version",
    "version",
    type=click.IntRange(1, MAX_VERSION),
    help="Snapshot version instead of the source's own (1 to 2147483647); a renewed snapshot needs a higher one "
    "than before.",
)
def build(
    source: str,
    out: str,
    key_path: str,
    cert_path: str,
    key_password_file: str | None,
    valid_days: int,
    issued: _dt.datetime | None,
    version: int | None,
) -> None:
    """Build the signed, versioned registry snapshot of SOURCE.

    Gateways refuse a snapshot once it has expired (--valid-days), and a running gateway applies a newer
    version written over its snapshot file by itself: renew by building again with a higher version.

    A snapshot once issued does not change under its version: when --out already holds a snapshot of the same
    version with other content, nothing is written (exit 2: raise the version); with the same content, nothing
    changed and nothing is written (exit 0). Nor does a version go back: when --out holds a higher version, nothing
    is written (exit 2; members holding it would refuse the lower one).
    """
    with one_line_errors():
        src = load_source(source)
        if version is not None:
            src = RegistrySource({**src.body, "version": version}, src.origin)
        from gateway.commands.signing import _read_password, private_file

        # the authority's key (and its password) kept from other users of this host, as a member gateway's is
        key = load_private_key(private_file(key_path, "--key"),
                               _read_password(key_password_file, "--key-password-file"))
        cert = load_certificates(cert_path)[0]
        doc = build_snapshot(
            src, key=key, cert=cert, issued=issued or now_cst(), valid_for=_dt.timedelta(days=valid_days)
        )
        held = _issued_before(Path(out), doc)
        if held is not None:
            click.echo(f"registry snapshot version {doc['version']} in {out} is unchanged: it holds this content "
                       f"already (issued {held.get('issued')}, valid until {held.get('valid_until')}); nothing "
                       "written (to renew it, build with a higher --version)")
            return
        write_atomic(Path(out), dumps(doc, indent=2) + "\n")
    click.echo(f"registry snapshot version {doc['version']} written to {out}, valid until {doc['valid_until']}")


#: What a rebuild of the same registry content changes: its dates and its signature.
_DATED = ("issued", "valid_until", "signature")


def _issued_before(out: Path, doc: dict[str, Any]) -> dict[str, Any] | None:
    """The snapshot ``out`` holds when it is of ``doc``'s version with the same content (None: no such snapshot, or
    one of another version, which ``doc`` may replace).

    :raises click.ClickException: (exit 2) ``out`` holds a snapshot of the same version with other content, or one
        of a higher version (a version once issued is not followed by a lower one).
    """
    try:
        held = json.loads(out.read_bytes())
    except (OSError, ValueError):
        return None  # (nothing there, or no snapshot: written as before)
    if not isinstance(held, dict) or "signature" not in held:
        return None
    version = held.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and doc["version"] < version <= MAX_VERSION:
        back = click.ClickException(
            f"{out} holds registry snapshot version {version} (issued {held.get('issued')}), higher than version "
            f"{doc['version']}: members holding version {version} refuse a lower one; build with --version "
            f"{version + 1} or higher (or write to another --out)")
        back.exit_code = 2
        raise back
    if version != doc["version"]:
        return None
    same = dumps({k: v for k, v in held.items() if k not in _DATED}) == dumps(
        {k: v for k, v in doc.items() if k not in _DATED})
    if same:
        return held
    refused = click.ClickException(
        f"{out} holds registry snapshot version {doc['version']} (issued {held.get('issued')}) with other content: "
        "a version once issued does not change; build with a higher --version")
    refused.exit_code = 2
    raise refused


@registry.command("verify")
@click.argument("snapshot", type=click.Path(dir_okay=False))
@click.option(
    "--authority",
    "--authority-cert",  # (the spelling of template, issue-cert and registry build)
    "authority",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    envvar="GATEWAY_REGISTRY_AUTHORITY",
    help="Trusted registry authority certificate(s), PEM (repeatable; GATEWAY_REGISTRY_AUTHORITY); "
    "default certs/registry-authority.pem.",
)
@click.option(
    "--current",
    "current",
    type=click.Path(exists=True, dir_okay=False),
    help="The snapshot the gateway holds now: refuse SNAPSHOT if it is older.",
)
@click.option("--at", "at", type=_AWARE, help="Verification time (ISO 8601 with offset); default now.")
def verify(snapshot: str, authority: tuple[str, ...], current: str | None, at: _dt.datetime | None) -> None:
    """Verify SNAPSHOT: signed by a trusted registry authority, untampered, unexpired, not a version regress."""
    moment = at or now_cst()
    with one_line_errors():
        holder = RegistryHolder(authority_certificates(authority), clock=lambda: moment)
        if current:
            holder.load_file(current)
        snap = holder.load_file(snapshot)
    signer = snap.authority_certificates[0]
    click.echo(
        f"OK: registry snapshot version {snap.version} of {snap.authority_name} ({snap.authority_uscc}), "
        f"signed with key {kid_of(signer)}, issued {snap.issued.isoformat()}, "
        f"valid until {snap.valid_until.isoformat()}" + (" [DEMO]" if snap.demo else "")
    )


def _summary(snap: Snapshot, verified: str, on: _dt.date) -> list[str]:
    lines = [
        f"Registry snapshot version {snap.version}{'  [DEMO 演示数据]' if snap.demo else ''}  ({verified})",
        f"  authority    {snap.authority_uscc}  {snap.authority_name}",
        f"  issued       {snap.issued.isoformat()}    valid until {snap.valid_until.isoformat()}",
        f"  digest       sha256:{snap.digest()}",
    ]
    if snap.note:
        lines.append(f"  note         {snap.note}")
    lines.append(f"\nMembers ({len(snap.members)}), as of {on}:")
    lines.append(f"  {'USCC':<20}{'PROV':<6}{'DIVISION':<10}{'KIND':<17}{'LEVEL':<10}{'ACTIVE':<8}{'CERTS':<6}NAME")
    for m in snap.members.values():
        level = snap.level_on(m.uscc, on)  # levels are dated: the one held on the date shown
        lines.append(
            f"  {m.uscc:<20}{m.province:<6}{m.division:<10}{m.kind:<17}{(level.level if level else '-'):<10}"
            f"{('yes' if m.active_on(on) else 'no'):<8}{len(m.certificates):<6}{m.name}"
        )
    lines.append(f"\nCatalogues ({len(snap.catalogues)}):")
    for c in snap.catalogues:
        classes = Counter(it.item_class for it in c.items)
        valid = f"{c.period.start or '…'} – {c.period.end or '…'}"
        lines.append(
            f"  {c.id:<28}{c.scope_label():<22}{c.mark:<10}{len(c.items):>3} items "
            f"({', '.join(f'{n} {k}' for k, n in sorted(classes.items()))})  {valid}  {c.name} v{c.version}"
        )
    lines.append(f"\nQualifications ({len(snap.qualifications)}):")
    by_type = Counter(q.type for q in snap.qualifications)
    for q_type, n in sorted(by_type.items()):
        held = sum(1 for q in snap.qualifications if q.type == q_type and q.valid_on(on))
        lines.append(f"  {q_type:<44}{n:>3} ({held} valid today)  {QUALIFICATION_TYPES.get(q_type, '')}")
    passed = sum(1 for e in snap.eqa if e.passed)
    years = sorted({e.year for e in snap.eqa})
    lines.append(
        f"\nEQA results ({len(snap.eqa)}): {passed} pass, {len(snap.eqa) - passed} fail; "
        f"years {', '.join(map(str, years))}"
    )
    return lines


@registry.command("show")
@click.argument("snapshot", type=click.Path(dir_okay=False))
@click.option(
    "--authority",
    "--authority-cert",  # (the spelling of template, issue-cert and registry build)
    "authority",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    envvar="GATEWAY_REGISTRY_AUTHORITY",
    help="Verify against these authority certificates first (otherwise shown unverified).",
)
@click.option("--at", "at", type=_AWARE, help="Date to show member status for (ISO 8601 with offset); default now.")
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot document instead of a summary.")
def show(snapshot: str, authority: tuple[str, ...], at: _dt.datetime | None, as_json: bool) -> None:
    """Print a readable summary of SNAPSHOT."""
    moment = at or now_cst()
    data = _read(snapshot)
    with one_line_errors():
        check_no_bom(data, snapshot)
        if authority:
            snap = verify_snapshot(data, authority_certificates(authority), moment)
            verified = "verified"
        else:
            snap = read_snapshot_unverified(data)
            verified = "NOT verified: give --authority to check the signature"
    if as_json:
        click.echo(dumps(snap.document, indent=2))
        return
    click.echo("\n".join(_summary(snap, verified, china_date(moment))))


@registry.command("demo")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the DEMO snapshot, authority certificate and member keys.",
)
@click.option("--at", "at", type=_AWARE, help="Issue time (ISO 8601 with offset); default now.")
def demo(out: str, at: _dt.datetime | None) -> None:
    """Write the DEMO registry: snapshot, authority certificate, and member keys and certificates.

    Keys are generated now and are demonstration material only; inside a git
    checkout they may only go to a directory whose path names demo or test.
    """
    from gateway.commands.signing import key_dir_allowed
    from gateway.demo.registry import build_demo_registry

    allowed, checkout = key_dir_allowed(out)
    if not allowed:
        raise click.ClickException(
            f"{out} is inside the checkout {checkout}: demo keys go outside it or under a directory named demo or test"
        )
    with one_line_errors():
        demo_registry = build_demo_registry(at or now_cst())
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "DEMO-snapshot.json", demo_registry.text() + "\n")
    write_atomic(directory / "DEMO-authority.pem", cert_pem(demo_registry.authority_cert).decode("ascii"))
    for uscc, cert in demo_registry.member_certs.items():
        write_atomic(directory / f"DEMO-{uscc}.pem", cert_pem(cert).decode("ascii"))
        key_path = directory / f"DEMO-{uscc}.key"
        write_atomic(key_path, private_key_pem(demo_registry.member_keys[uscc]).decode("ascii"), mode=0o600)
    click.echo(
        f"DEMO registry written to {out}: DEMO-snapshot.json (version {demo_registry.document['version']}, valid until "
        f"{demo_registry.document['valid_until']}), DEMO-authority.pem, member certificates and keys"
    )
