"""Message security of the ``opcua`` device: the client's certificate and key, and the trust
check of the server's certificate.

asyncua, asked for a secure connection without the server's certificate, fetches it from the
server and uses it unchecked. plantbus instead fetches the endpoints, checks the certificate
of the endpoint it will use against ``security.trust`` (the certificate itself, or the CA
that issued it directly, and its validity period) and only then opens the secure channel
bound to that certificate; asyncua then refuses a session whose certificate differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from plantbus.connectors.opcua.config import SecurityConfig

__all__ = [
    "CERT_SUFFIXES",
    "ClientIdentity",
    "SecurityError",
    "UntrustedCertificate",
    "check_trusted",
    "describe_certificate",
    "load_identity",
    "load_trust",
]

CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


class SecurityError(Exception):
    """A certificate, key or trust setting that cannot be used (a one-line reason)."""


class UntrustedCertificate(SecurityError):
    """The server presented a certificate that ``security.trust`` does not vouch for."""


@dataclass(frozen=True)
class ClientIdentity:
    """What a secure connection needs, loaded (and checked) once when the device is built.

    Attributes:
        policy / mode: as configured.
        certificate: the client certificate, DER.
        private_key: the private key, PEM (PKCS#8, unencrypted).
        application_uri: the URI in the certificate's subjectAltName; OPC UA servers check
            that the client's ApplicationUri equals it.
        trusted: the trusted certificates.
    """

    policy: str
    mode: str
    certificate: bytes
    private_key: bytes
    application_uri: str
    trusted: tuple[x509.Certificate, ...]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def _load_cert(data: bytes, path: Path) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise SecurityError(f"{path} is not an X.509 certificate (PEM or DER): {e}") from None


def describe_certificate(cert: x509.Certificate) -> str:
    """``CN=… (SHA-256 ab:cd:…)``: how messages name a certificate."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = f"CN={names[0].value}" if names else cert.subject.rfc4514_string() or "no subject"
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return f"{subject} (SHA-256 {digest[:16]}…)"


def load_trust(paths: list[Path]) -> tuple[x509.Certificate, ...]:
    """The certificates in ``paths``: files (a PEM file may hold several), or folders.

    In a folder every ``*.der``, ``*.pem``, ``*.crt`` and ``*.cer`` file is read; PEM files
    without a certificate (a private key kept beside it) are passed over.
    """
    out: list[x509.Certificate] = []
    for path in paths:
        if not path.is_dir():
            out += _load_certs(_read(path, "trusted certificate"), path)
            continue
        found = 0
        for f in sorted(p for p in path.iterdir() if p.suffix.lower() in CERT_SUFFIXES):
            data = _read(f, "trusted certificate")
            if data.lstrip().startswith(b"-----BEGIN") and b"CERTIFICATE-----" not in data:
                continue
            certs = _load_certs(data, f)
            out += certs
            found += len(certs)
        if not found:
            raise SecurityError(
                f"security.trust: the folder {path} holds no certificate "
                f"({', '.join('*' + s for s in CERT_SUFFIXES)})"
            )
    return tuple(out)


def _load_certs(data: bytes, path: Path) -> list[x509.Certificate]:
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise SecurityError(f"{path} holds no X.509 certificate: {e}") from None
    return [_load_cert(data, path)]


def load_identity(config: SecurityConfig) -> ClientIdentity:
    """Read and check the client certificate, its key and the trust list.

    Raises:
        SecurityError: a file is missing or unreadable, the key does not belong to the
            certificate, or the certificate has no application URI.
    """
    cert = _load_cert(_read(config.certificate, "client certificate"), config.certificate)
    raw_key = _read(config.private_key, "private key")
    try:
        if raw_key.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(raw_key, password=None)
        else:
            key = serialization.load_der_private_key(raw_key, password=None)
    except (ValueError, TypeError) as e:
        raise SecurityError(
            f"{config.private_key} is not an unencrypted private key (PEM or DER): {e}"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise SecurityError(
            f"the private key {config.private_key} does not belong to the certificate "
            f"{config.certificate}"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise SecurityError(
            f"the client certificate {config.certificate} has no URI in its subjectAltName: "
            "OPC UA identifies a client by that application URI (e.g. URI:urn:edge-07:plantbus)"
        )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ClientIdentity(
        policy=config.policy,
        mode=config.mode,
        certificate=cert.public_bytes(serialization.Encoding.DER),
        private_key=pem_key,
        application_uri=uris[0],
        trusted=load_trust(config.trust),
    )


def check_trusted(der: bytes, trusted: tuple[x509.Certificate, ...], *, now: Any = None) -> None:
    """Accept the server certificate ``der`` if it is valid now and trusted.

    Trusted means: it is one of ``trusted``, or one of ``trusted`` issued and signed it.

    Raises:
        UntrustedCertificate: with the certificate's subject and fingerprint, and why.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as e:
        raise UntrustedCertificate(f"the server sent an unreadable certificate: {e}") from None
    who = describe_certificate(cert)
    moment = now or datetime.now(UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise UntrustedCertificate(
            f"server certificate {who} is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    for t in trusted:
        if t.public_bytes(serialization.Encoding.DER) == der:
            return
        if t.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(t)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise UntrustedCertificate(
        f"server certificate {who} is not trusted: neither it nor its issuer is in "
        "security.trust (add the server's certificate, or the CA that issued it, to trust)"
    )
