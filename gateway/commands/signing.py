"""Signing commands: member keys, certificates, and signing/verifying Bundle files.

- ``gateway keys init``: a member's P-256 key (file mode 0600) and a CSR for the registry authority;
- ``gateway keys show``: kid, member and validity of certificates;
- ``gateway sign`` / ``gateway verify``: Bundle files, with ``Bundle.signature``;
- ``gateway registry issue-cert`` and ``gateway registry init-authority``: the
  registry authority's side (mounted under the ``registry`` group by ``gateway.cli``).

Private keys never go into the git checkout, except into a directory whose path
inside it names ``demo`` or ``test`` (clearly marked demo and test material).
Errors reach the user as one line and exit status 1.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import IO, Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from gateway.commands.common import AWARE, now_cst, one_line_errors
from gateway.config import REPO_ROOT
from gateway.errors import InputError
from gateway.identifiers import check_uscc
from gateway.signing.canonical import dumps, parse_json
from gateway.signing.jws import check_signer_is_issuer, format_instant, sign_bundle, signer_reference, verify_bundle
from gateway.signing.keys import (
    cert_pem,
    certificates_in,
    check_private_file,
    generate_private_key,
    issue_certificate,
    kid_of,
    load_certificate,
    load_certificates,
    load_private_key,
    make_authority,
    make_csr,
    name_of,
    private_key_pem,
    uscc_of,
)
from gateway.signing.trust import StaticTrust

__all__ = ["keys", "sign", "verify", "issue_cert", "init_authority", "key_dir_allowed", "private_file"]

log = logging.getLogger(__name__)


_one_line_errors = one_line_errors
_now = now_cst


#: Who alone may read the registry authority's key and its password file (as a refusal says it).
AUTHORITY_READER = "the registry authority's user"


def private_file(path: str, option: str) -> str:
    """``path`` of the registry authority's key (or its password file) when no other user of this host may open it,
    as a member gateway requires of its own key.

    :raises ConfigError: (exit 2) open to group or others, one line naming the option, the file and ``chmod 600``.
    """
    check_private_file(path, option, reader=AUTHORITY_READER)
    return path


def _read_password(path: str | None, option: str = "") -> bytes | None:
    """The password in file ``path`` (None: none given); ``option``: the registry authority's password file given
    by that option, which must be private as its key is."""
    if not path:
        return None
    if option:
        private_file(path, option)
    data = Path(path).read_bytes().rstrip(b"\r\n")
    if not data:
        raise click.ClickException(f"password file {path} is empty")
    return data


def _checkout_roots(path: Path) -> list[Path]:
    roots = [parent for parent in (path, *path.parents) if (parent / ".git").exists()]
    if (REPO_ROOT / ".git").exists():
        roots.append(REPO_ROOT.resolve())
    return roots


def key_dir_allowed(out_dir: str | os.PathLike[str]) -> tuple[bool, Path | None]:
    """May a private key be written to ``out_dir``? Returns (allowed, the checkout it is in).

    Outside any git checkout: yes. Inside one: only when a directory of the path
    below the checkout root names ``demo`` or ``test`` (``certs/demo/``, ``tests/data/keys/``).
    """
    path = Path(out_dir).resolve()
    for root in _checkout_roots(path):
        try:
            inside = path.relative_to(root)
        except ValueError:
            continue
        if not any("demo" in part.lower() or "test" in part.lower() for part in inside.parts):
            return False, root
    return True, None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode``; never overwrite (a lost private key cannot be recovered)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise click.ClickException(f"{path} already exists; not overwritten") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # the umask may have narrowed it; make the intent exact


def _key_dir(out: str) -> Path:
    allowed, root = key_dir_allowed(out)
    if not allowed:
        raise click.ClickException(
            f"refusing to write a private key inside the git checkout {root}: choose a directory outside it "
            "(only directories named *demo* or *test* may hold demo or test keys there)"
        )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return out_dir


@click.group()
def keys() -> None:
    """Member signing keys and certificates."""


@keys.command("init")
@click.option("--uscc", required=True, help="统一社会信用代码 of the member (GB 32100 checked).")
@click.option("--name", required=True, help="Name of the member institution, as in the certificate.")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for <USCC>.key.pem (mode 0600) and <USCC>.csr.pem; must lie outside the git checkout.",
)
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False),
    envvar="GATEWAY_KEY_PASSWORD_FILE",
    help="File holding a password to encrypt the private key with (first line).",
)
def init(uscc: str, name: str, out: str, password_file: str | None) -> None:
    """Create a member's P-256 key pair and a certificate request (CSR) for the registry authority."""
    with _one_line_errors():
        key = generate_private_key()
        csr = make_csr(key, uscc, name)
        member = check_uscc(uscc)
        out_dir = _key_dir(out)
        key_path = out_dir / f"{member}.key.pem"
        csr_path = out_dir / f"{member}.csr.pem"
        if csr_path.exists():
            raise click.ClickException(f"{csr_path} already exists; not overwritten")
        _write_new(key_path, private_key_pem(key, _read_password(password_file)), 0o600)
        _write_new(csr_path, csr.public_bytes(serialization.Encoding.PEM), 0o644)
    click.echo(f"wrote {key_path} (private, mode 0600) and {csr_path}: send the CSR to the registry authority")


@keys.command("show")
@click.argument("certs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def show(certs: tuple[str, ...]) -> None:
    """Print kid, member USCC, name and validity of each certificate in CERTS (PEM files)."""
    with _one_line_errors():
        for cert in certificates_in(certs):
            click.echo(
                f"kid {kid_of(cert)}  {uscc_of(cert) or '-'}  {name_of(cert) or '-'}  "
                f"valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}"
            )


@click.command()
@click.argument("bundle", type=click.File("rb"))
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The member's private key (PEM).")
@click.option("--cert", "cert_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The member's signing certificate (PEM), issued by the registry authority.")
@click.option("--chain", "chain_path", type=click.Path(exists=True, dir_okay=False),
              help="More certificates to put in x5c after the signing one (PEM), e.g. the authority's.")
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Write the signed Bundle here instead of standard output.")
@click.option("--at", "at", type=AWARE, help="Signature time (ISO 8601 with offset); default now.")
@click.option("--key-password-file", type=click.Path(exists=True, dir_okay=False),
              envvar="GATEWAY_KEY_PASSWORD_FILE", help="File holding the private key's password (first line).")
def sign(
    bundle: IO[bytes],
    key_path: str,
    cert_path: str,
    chain_path: str | None,
    out: str | None,
    at: _dt.datetime | None,
    key_password_file: str | None,
) -> None:
    """Sign the report Bundle in file BUNDLE ('-' for standard input) and print the signed Bundle. A Bundle whose
    reports another member issued is signed with a warning on stderr: `verify` and a receiving gateway refuse it."""
    with _one_line_errors():
        key = load_private_key(key_path, _read_password(key_password_file))
        cert = load_certificate(cert_path)
        chain = [cert] + [c for c in (load_certificates(chain_path) if chain_path else []) if c != cert]
        document = parse_json(bundle.read())
        if not isinstance(document, dict):
            raise click.ClickException("BUNDLE does not hold a JSON object")
        when = at or _now()
        _warn_unless_issuer(document, uscc_of(cert))
        signed = sign_bundle(document, key, chain, who=signer_reference(cert), when=when)
        text = dumps(signed, indent=2) + "\n"
    if out:
        Path(out).write_text(text, encoding="utf-8")
        click.echo(f"signed by {uscc_of(cert)} kid {kid_of(cert)} at {format_instant(when)}: wrote {out}")
    else:
        click.echo(text, nl=False)


def _warn_unless_issuer(document: dict[str, Any], signer: str | None) -> None:
    """Say before signing when the signer is not the issuer of every report (``verify`` and every receiver require
    it; a remote reading's township may still sign it for the engine's reading-signature rule to judge). It was
    signed without a word, and refused only where it was sent."""
    from types import SimpleNamespace

    from gateway.errors import TrustError
    from gateway.signing.jws import check_signer_is_issuer

    try:
        check_signer_is_issuer(SimpleNamespace(bundle=document, signer_uscc=signer))  # type: ignore[arg-type]
    except TrustError as exc:
        click.echo(f"warning: {exc.location} {exc.message}: `gateway verify` and receiving gateways refuse a report "
                   "not signed by its issuer", err=True)


@click.command()
@click.argument("bundle", type=click.File("rb"))
@click.option("--trust", "trust_files", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="PEM file of trusted certificates: registry authorities and listed member certificates. "
              "Repeat for several files.")
@click.option("--at", "at", type=AWARE, help="Verification time (ISO 8601 with offset); default now.")
@click.option("--no-issuer-check", is_flag=True,
              help="Do not require the signer to be the issuer of every DiagnosticReport in the Bundle.")
def verify(bundle: IO[bytes], trust_files: tuple[str, ...], at: _dt.datetime | None, no_issuer_check: bool) -> None:
    """Verify the signed Bundle in file BUNDLE ('-' for standard input); exit 1 if it fails."""
    with _one_line_errors():
        trust = StaticTrust.from_certificates(certificates_in(trust_files))
        if not trust.authorities():
            raise click.ClickException("no registry authority (CA) certificate in the --trust files")
        verified = verify_bundle(bundle.read(), trust, at=at or _now())
        if not no_issuer_check:
            check_signer_is_issuer(verified)
    name = name_of(verified.certificate)
    click.echo(
        f"verified: signed by {verified.signer_uscc}{f' ({name})' if name else ''} "
        f"kid {verified.kid} at {format_instant(verified.signed_at)}"
    )


@click.command("issue-cert")
@click.argument("csr", type=click.Path(exists=True, dir_okay=False))
@click.option("--authority-key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The registry authority's private key (PEM).")
@click.option("--authority-cert", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The registry authority's certificate (PEM).")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650),
              help="Validity of the certificate in days (renew it before then: a new CSR, a new certificate).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the member certificate (PEM); an existing file is not overwritten.")
@click.option("--uscc", help="Member 统一社会信用代码; default: the one in the CSR, which must agree.")
@click.option("--name", help="Member name for the certificate; default: the organisation name in the CSR.")
@click.option("--not-before", type=AWARE, help="Start of validity (ISO 8601 with offset); default now.")
@click.option("--authority-key-password-file", type=click.Path(exists=True, dir_okay=False),
              help="File holding the authority key's password (first line).")
def issue_cert(
    csr: str,
    authority_key: str,
    authority_cert: str,
    days: int,
    out: str,
    uscc: str | None,
    name: str | None,
    not_before: _dt.datetime | None,
    authority_key_password_file: str | None,
) -> None:
    """Issue a member signing certificate for the request in file CSR (registry authority only)."""
    with _one_line_errors():
        try:
            request = x509.load_pem_x509_csr(Path(csr).read_bytes())
        except ValueError:
            raise click.ClickException(f"{csr} is not a PEM certificate request") from None
        member = uscc or _csr_value(request, "uscc")
        member_name = name or _csr_value(request, "name")
        start = not_before or _now()
        try:
            cert = issue_certificate(
                request,
                member,
                member_name,
                load_private_key(private_file(authority_key, "--authority-key"),
                                 _read_password(authority_key_password_file, "--authority-key-password-file")),
                load_certificate(authority_cert),
                start,
                start + _dt.timedelta(days=days),
            )
        except InputError as exc:  # the end of the validity that is wrong, named by the option that sets it
            flag = {"not_before": "--not-before",
                    "not_after": "--days" if not_before is None else "--not-before and --days"}.get(exc.location)
            if flag is None:
                raise
            raise click.ClickException(f"{flag}: {exc.message}") from None
        _write_new(Path(out), cert_pem(cert), 0o644)
    click.echo(
        f"issued {out} for {uscc_of(cert)} ({name_of(cert)}), kid {kid_of(cert)}, "
        f"valid {cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}"
    )


def _csr_value(request: x509.CertificateSigningRequest, what: str) -> str:
    oid = NameOID.ORGANIZATION_IDENTIFIER if what == "uscc" else NameOID.ORGANIZATION_NAME
    attrs = request.subject.get_attributes_for_oid(oid)
    if not attrs:
        raise click.ClickException(f"the CSR names no {what}; give --{what}")
    return str(attrs[0].value)


@click.command("init-authority")
@click.option("--uscc", required=True, help="统一社会信用代码 of the registry authority (GB 32100 checked).")
@click.option("--name", required=True, help="Name of the registry authority, as in its certificate.")
@click.option("--days", default=1461, show_default=True, type=click.IntRange(1, 7305),
              help="Validity of the authority certificate in days.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for authority.key.pem (mode 0600) and authority.cert.pem; outside the git checkout.")
@click.option("--not-before", type=AWARE, help="Start of validity (ISO 8601 with offset); default now.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="File holding a password to encrypt the authority key with (first line).")
def init_authority(
    uscc: str, name: str, days: int, out: str, not_before: _dt.datetime | None, password_file: str | None
) -> None:
    """Create the registry authority's key and self-signed certificate (CA, path length 0)."""
    with _one_line_errors():
        key = generate_private_key()
        start = not_before or _now()
        cert = make_authority(key, uscc, name, start, start + _dt.timedelta(days=days))
        out_dir = _key_dir(out)
        cert_path = out_dir / "authority.cert.pem"
        if cert_path.exists():
            raise click.ClickException(f"{cert_path} already exists; not overwritten")
        _write_new(out_dir / "authority.key.pem", private_key_pem(key, _read_password(password_file)), 0o600)
        _write_new(cert_path, cert_pem(cert), 0o644)
    click.echo(f"wrote {out_dir / 'authority.key.pem'} (private, mode 0600) and {cert_path}, kid {kid_of(cert)}")
