"""Keys: member key pairs, certificate requests and certificates.

The trust model follows the EU DCC one (ANCHORS §2.2): the registry authority
holds a self-signed certificate (CA, path length 0, keyCertSign) and issues
each member a short-lived signing certificate (digitalSignature only, AKI = the
authority's SKI). A member's 统一社会信用代码 (USCC) travels in the certificate
subject as ``organizationIdentifier`` (OID 2.5.4.97), so a verifier learns whom a
signature speaks for from the certificate, not from the signed document.

Keys are NIST P-256 (ES256). The ``kid`` of a certificate is the first 8 bytes of
the SHA-256 of its DER, base64url without padding, as in DCC: short, therefore
not unique, so verifiers try every certificate with a matching kid.

Nothing here touches the network, a database or the clock: validity times are
parameters.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import logging
import os
import shlex
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Union

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import ConfigError, IdentifierError, InputError
from gateway.identifiers import check_uscc

if TYPE_CHECKING:
    from gateway.config import Settings

__all__ = [
    "PrivateKey",
    "PathOrPem",
    "generate_private_key",
    "private_key_pem",
    "load_private_key",
    "load_certificate",
    "load_certificates",
    "cert_pem",
    "kid_of",
    "uscc_of",
    "name_of",
    "make_csr",
    "make_authority",
    "issue_certificate",
    "is_authority",
    "certificates_in",
    "check_private_file",
    "read_password_file",
    "load_signing_identity",
    "signing_identity",
]

log = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey
#: A file path, or the PEM (or, where noted, DER) content itself.
PathOrPem = Union[str, bytes, "os.PathLike[str]"]

_PEM_MARK = b"-----BEGIN"


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A new NIST P-256 private key (the curve of ES256)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of ``key``, encrypted with ``password`` when one is given.

    :raises ConfigError: an empty password (it would silently mean "no password").
    """
    if password is not None and not password:
        raise ConfigError("a private key password must not be empty", "password")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _read(source: PathOrPem) -> tuple[bytes, str]:
    """The content of ``source`` and a label for error messages (the path, or ``<PEM>``)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), "<PEM>" if _PEM_MARK in source else "<DER>"
    if isinstance(source, str) and "-----BEGIN" in source:
        return source.encode("ascii", "replace"), "<PEM>"
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            return fh.read(), path
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", path) from None


def load_private_key(path_or_pem: PathOrPem, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 private key from a PEM/DER file or PEM text.

    :raises ConfigError: unreadable, wrong password, not a key, or not P-256.
    """
    data, label = _read(path_or_pem)
    try:
        if _PEM_MARK in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError:
        # cryptography says TypeError for "password given but key not encrypted" and the reverse.
        raise ConfigError("private key password does not fit the key (missing or not needed)", label) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError("cannot read private key: not a key, or wrong password", label) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("private key must be an EC P-256 key (ES256)", label)
    return key


def load_certificates(path_or_pem: PathOrPem) -> list[x509.Certificate]:
    """All certificates in a PEM file or PEM text (a single DER certificate is accepted too).

    :raises ConfigError: unreadable, or no certificate in it.
    """
    data, label = _read(path_or_pem)
    try:
        if _PEM_MARK in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError("not a certificate (PEM or DER expected)", label) from None
    if not certs:
        raise ConfigError("no certificate found", label)
    return certs


def load_certificate(path_or_pem_or_der: PathOrPem) -> x509.Certificate:
    """The first certificate of a PEM/DER file, PEM text or DER bytes.

    :raises ConfigError: unreadable, or not a certificate.
    """
    return load_certificates(path_or_pem_or_der)[0]


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def kid_of(cert: x509.Certificate) -> str:
    """Key id: base64url (no padding) of the first 8 bytes of SHA-256(DER certificate)."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()[:8]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _subject_value(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _uscc_in(name: x509.Name) -> str | None:
    value = _subject_value(name, NameOID.ORGANIZATION_IDENTIFIER)
    if value is None:
        return None
    # ETSI EN 319 412-1 writes legal-person identifiers as "NTR" + country + "-" + id;
    # accept that spelling too, so certificates from a commercial CA also work.
    if value.upper().startswith("NTRCN-"):
        value = value[6:]
    try:
        return check_uscc(value)
    except IdentifierError:
        log.warning("certificate subject carries an organizationIdentifier that is not a valid USCC")
        return None


def uscc_of(cert: x509.Certificate) -> str | None:
    """The member's 统一社会信用代码 from the subject ``organizationIdentifier`` (2.5.4.97).

    None when the subject carries none, or one that fails the GB 32100 check.
    """
    return _uscc_in(cert.subject)


def name_of(cert: x509.Certificate) -> str | None:
    """The organisation name (O) in the certificate subject, if any."""
    return _subject_value(cert.subject, NameOID.ORGANIZATION_NAME)


def _member_name(uscc: str, name: str) -> x509.Name:
    if not name or not name.strip():
        raise InputError("the organisation name must not be empty", "name")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name.strip()),
            x509.NameAttribute(NameOID.ORGANIZATION_IDENTIFIER, uscc),
            x509.NameAttribute(NameOID.COMMON_NAME, name.strip()),
        ]
    )


def _require_p256(public_key: object, location: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise InputError("key must be an EC P-256 key (ES256)", location)
    return public_key


def _require_window(not_before: _dt.datetime, not_after: _dt.datetime) -> None:
    for label, value in (("not_before", not_before), ("not_after", not_after)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InputError(f"{label} must carry a UTC offset", label)
    if not not_before < not_after:
        raise InputError("not_before must be earlier than not_after", "not_after")


def make_csr(key: ec.EllipticCurvePrivateKey, uscc: str, name: str) -> x509.CertificateSigningRequest:
    """A certificate signing request for a member, signed with its key.

    :raises IdentifierError: ``uscc`` fails the GB 32100 check.
    :raises InputError: empty name or a key that is not P-256.
    """
    uscc = check_uscc(uscc)
    _require_p256(key.public_key(), "key")
    builder = x509.CertificateSigningRequestBuilder().subject_name(_member_name(uscc, name))
    return builder.sign(key, hashes.SHA256())


def make_authority(
    key: ec.EllipticCurvePrivateKey,
    uscc: str,
    name: str,
    not_before: _dt.datetime,
    not_after: _dt.datetime,
) -> x509.Certificate:
    """A self-signed registry-authority certificate: CA, path length 0, keyCertSign + cRLSign.

    :raises IdentifierError: ``uscc`` fails the GB 32100 check.
    :raises InputError: empty name, non-P-256 key, naive or reversed validity.
    """
    uscc = check_uscc(uscc)
    public_key = _require_p256(key.public_key(), "key")
    _require_window(not_before, not_after)
    subject = _member_name(uscc, name)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def is_authority(cert: x509.Certificate) -> bool:
    """True for a CA certificate that may sign certificates (basicConstraints CA, keyCertSign)."""
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not basic.ca:
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(usage.key_cert_sign)


def issue_certificate(
    csr_or_public_key: x509.CertificateSigningRequest | ec.EllipticCurvePublicKey,
    uscc: str,
    name: str,
    authority_key: ec.EllipticCurvePrivateKey,
    authority_cert: x509.Certificate,
    not_before: _dt.datetime,
    not_after: _dt.datetime,
) -> x509.Certificate:
    """The registry authority issues a member signing certificate (digitalSignature only).

    The subject is built from ``uscc`` and ``name`` (the authority decides what a
    certificate says, not the requester); a CSR must be self-consistent and, if it
    names a USCC, name the same one. The validity must lie within the authority's.

    :raises IdentifierError: ``uscc`` fails the GB 32100 check.
    :raises InputError: bad CSR signature, CSR for another USCC, non-P-256 key,
        validity outside the authority's, naive or reversed times.
    :raises ConfigError: the authority key does not belong to the authority
        certificate, or that certificate is not a CA.
    """
    uscc = check_uscc(uscc)
    if isinstance(csr_or_public_key, x509.CertificateSigningRequest):
        csr = csr_or_public_key
        if not csr.is_signature_valid:
            raise InputError("the certificate request's own signature does not verify", "CSR")
        requested = _uscc_in(csr.subject)
        if requested is not None and requested != uscc:
            raise InputError(f"the certificate request is for {requested}, not {uscc}", "CSR.subject")
        public_key = _require_p256(csr.public_key(), "CSR.publicKey")
    else:
        public_key = _require_p256(csr_or_public_key, "publicKey")
    _require_window(not_before, not_after)
    if authority_key.public_key() != authority_cert.public_key():
        raise ConfigError("the authority key does not belong to the authority certificate", "authority_key")
    if not is_authority(authority_cert):
        raise ConfigError("the authority certificate is not a CA certificate", "authority_cert")
    first, last = authority_cert.not_valid_before_utc, authority_cert.not_valid_after_utc
    # Shell model: a certificate outliving its issuer would stop verifying early. The end that lies outside is named.
    if not_before < first:
        raise InputError(f"{not_before.isoformat()} is before the authority certificate is valid: validity must lie "
                         f"within the authority's ({first.isoformat()} to {last.isoformat()})", "not_before")
    if not_after > last:
        raise InputError(f"{not_after.isoformat()} is after the authority certificate expires: validity must lie "
                         f"within the authority's ({first.isoformat()} to {last.isoformat()})", "not_after")
    try:
        authority_ski = authority_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_member_name(uscc, name))
        .issuer_name(authority_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(authority_key, hashes.SHA256())


def certificates_in(sources: Iterable[PathOrPem]) -> list[x509.Certificate]:
    """Every certificate in several PEM files (helper for command-line trust lists).

    :raises ConfigError: a file is unreadable or holds no certificate.
    """
    out: list[x509.Certificate] = []
    for source in sources:
        out.extend(load_certificates(source))
    return out


def check_private_file(path: str | os.PathLike[str], setting: str, *, reader: str = "the gateway's user") -> None:
    """Refuse a secret file (a private key, a key's password) that other users of this host may open.

    The gateway starts only when group and others have no access at all, as ssh
    does with its keys; the error names the file, its mode and the command that
    fixes it. ``reader``: who alone may read it, as the error says it (the
    registry authority's commands check its key the same way).

    :raises ConfigError: the file cannot be examined, or group or others have access to it.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}", setting) from None
    if stat.S_ISDIR(st.st_mode):  # (its mode is a folder's, not the file's that is meant: no chmod helps)
        raise ConfigError(f"{name} is a directory: {setting} names a file", setting)
    mode = stat.S_IMODE(st.st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"{name} is open to group or others (mode {mode:04o}); only {reader} may read it: "
            f"chmod 600 {shlex.quote(name)}",
            setting,
        )


def read_password_file(path: str | os.PathLike[str], setting: str = "signing_key_password_file") -> bytes:
    """The password held in ``path`` (its content without the final line break).

    The file must be private (:func:`check_private_file`), as the key it opens.

    :raises ConfigError: unreadable, open to group or others, or empty.
    """
    check_private_file(path, setting)
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            password = fh.read().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror}", setting) from None
    if not password:
        raise ConfigError(f"{name} is empty: it must hold the signing key's password", setting)
    return password


def _not_a_certificate(key_name: str) -> None:
    """Refuse a ``signing_key`` that holds a certificate and no private key (the two settings swapped, or the
    certificate named twice).

    :raises ConfigError: so.
    """
    try:
        with open(key_name, "rb") as fh:
            data = fh.read(1 << 20)
    except OSError:
        return  # (said by the checks after)
    if _PEM_MARK in data:
        certificate = b"-----BEGIN CERTIFICATE-----" in data and b"PRIVATE KEY-----" not in data
    else:
        try:
            x509.load_der_x509_certificate(data)
            certificate = True
        except ValueError:
            certificate = False
    if certificate:
        raise ConfigError(f"{key_name} is a certificate, not a private key: signing_key names the member's private "
                          "key file (<USCC>.key.pem), signing_cert its certificate", "signing_key")


def load_signing_identity(
    key_path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    *,
    password_file: str | os.PathLike[str] | None = None,
    issuer_uscc: str | None = None,
) -> tuple[str, ec.EllipticCurvePrivateKey, tuple[x509.Certificate, ...]]:
    """This member's signing identity as a gateway starts: (member USCC, key, certificate chain, leaf first).

    Checked before anything is signed: the key file (and the password file) is
    private to the gateway's user; an encrypted key opens with the password, an
    unencrypted one is given none; the key is P-256 and belongs to the first
    certificate; that certificate names a member, and that member is
    ``issuer_uscc`` when one is given (what the gateway issues is signed by the
    member it names as issuer).

    :raises ConfigError: any of these fails; the message names the setting and the file.
    """
    key_name, cert_name = os.fspath(key_path), os.fspath(cert_path)
    _not_a_certificate(key_name)  # (said before its mode: a certificate is public, and no chmod makes it a key)
    check_private_file(key_name, "signing_key")
    password = read_password_file(password_file) if password_file else None
    try:
        with open(key_name, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {key_name}: {exc.strerror}", "signing_key") from None
    try:
        if _PEM_MARK in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError:
        # cryptography says TypeError for "password given but key not encrypted" and the reverse.
        if password is None:
            raise ConfigError(
                f"{key_name} is encrypted: set signing_key_password_file to the file holding its password",
                "signing_key",
            ) from None
        raise ConfigError(
            f"{key_name} is not encrypted, but signing_key_password_file {os.fspath(password_file or '')} is set: "
            "leave signing_key_password_file empty",
            "signing_key",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if password is None:
            raise ConfigError(f"{key_name} is not a private key (PEM or DER)", "signing_key") from None
        raise ConfigError(
            f"{key_name} does not open with the password in {os.fspath(password_file or '')}: "
            "wrong password, or not a private key",
            "signing_key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{key_name} must be an EC P-256 key (ES256)", "signing_key")
    try:
        chain = tuple(load_certificates(cert_name))
    except ConfigError as exc:
        reason = exc.message if cert_name in exc.message else f"{cert_name}: {exc.message}"
        raise ConfigError(reason, "signing_cert") from None
    if chain[0].public_key() != key.public_key():
        raise ConfigError(f"the key {key_name} does not belong to the certificate {cert_name}", "signing_key")
    member = uscc_of(chain[0])
    if member is None:
        raise ConfigError(
            f"{cert_name} names no member 统一社会信用代码 (subject organizationIdentifier)", "signing_cert"
        )
    if issuer_uscc is not None and member != issuer_uscc:
        raise ConfigError(
            f"issuer_uscc {issuer_uscc} is not the member the signing certificate {cert_name} was issued to "
            f"({member}): set issuer_uscc to {member}, or configure this member's own key and certificate",
            "issuer_uscc",
        )
    return member, key, chain


def signing_identity(
    settings: "Settings",
) -> tuple[str, ec.EllipticCurvePrivateKey, tuple[x509.Certificate, ...]] | None:
    """The identity named by ``signing_key``, ``signing_cert`` and ``signing_key_password_file``, checked
    against ``issuer_uscc`` (see :func:`load_signing_identity`); None when no key is configured.

    :raises ConfigError: only one of key and certificate is set, a password file without a key, or a
        check of :func:`load_signing_identity` fails.
    """
    if not settings.signing_key and not settings.signing_cert:
        if settings.signing_key_password_file:
            raise ConfigError(
                "signing_key_password_file is set but no signing_key: set both, or neither",
                "signing_key_password_file",
            )
        return None
    if not settings.signing_key:
        raise ConfigError("signing_cert is set but no signing_key: set both, or neither", "signing_key")
    if not settings.signing_cert:
        raise ConfigError("signing_key is set but no signing_cert: set both, or neither", "signing_cert")
    return load_signing_identity(
        settings.signing_key,
        settings.signing_cert,
        password_file=settings.signing_key_password_file or None,
        issuer_uscc=settings.issuer_uscc,
    )
