"""The client identity and the trust check of server certificates (certificates made here)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "opcua"))

from opcua_harness import make_cert

from plantbus.connectors.opcua.config import SecurityConfig
from plantbus.connectors.opcua.security import (
    SecurityError,
    UntrustedCertificate,
    check_trusted,
    load_identity,
    load_trust,
)


def der(cert) -> bytes:  # type: ignore[no-untyped-def]
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_cert(d / "ca", "plant-ca", "urn:plant:ca", ca=True)
    return {
        "ca": ca,
        "issued": make_cert(d / "issued", "ua-server", "urn:ua:server", issuer=(ca[2], ca[3])),
        "self": make_cert(d / "self", "ua-self", "urn:ua:self"),
        # a CA with the same name as the real one, but another key
        "fake_ca": make_cert(d / "fake", "plant-ca", "urn:plant:ca", ca=True),
        "client": make_cert(d / "client", "edge-07", "urn:edge:plantbus"),
    }


def test_a_listed_certificate_is_trusted(pki: dict[str, tuple]) -> None:
    check_trusted(der(pki["self"][2]), (pki["ca"][2], pki["self"][2]))


def test_a_certificate_issued_by_a_listed_ca_is_trusted(pki: dict[str, tuple]) -> None:
    check_trusted(der(pki["issued"][2]), (pki["ca"][2],))


def test_an_unlisted_certificate_is_refused_naming_it(pki: dict[str, tuple]) -> None:
    with pytest.raises(UntrustedCertificate) as info:
        check_trusted(der(pki["self"][2]), (pki["ca"][2],))
    msg = str(info.value)
    assert msg.startswith("server certificate CN=ua-self (SHA-256 ")
    assert "is not trusted: neither it nor its issuer is in security.trust" in msg


def test_a_ca_with_the_right_name_but_another_key_does_not_vouch(pki: dict[str, tuple]) -> None:
    with pytest.raises(UntrustedCertificate):
        check_trusted(der(pki["issued"][2]), (pki["fake_ca"][2],))


def test_an_expired_certificate_is_refused_even_when_listed(pki: dict[str, tuple]) -> None:
    cert = pki["self"][2]
    later = datetime.now(UTC) + timedelta(days=400)
    with pytest.raises(UntrustedCertificate, match="is not valid now"):
        check_trusted(der(cert), (cert,), now=later)


def test_the_identity_carries_the_application_uri(pki: dict[str, tuple]) -> None:
    cert, key = pki["client"][0], pki["client"][1]
    identity = load_identity(
        SecurityConfig(certificate=cert, private_key=key, trust=[pki["ca"][0].parent])
    )
    assert identity.application_uri == "urn:edge:plantbus"
    assert identity.certificate == cert.read_bytes()
    assert len(identity.trusted) == 1  # the folder's certificate; its key file is passed over


def test_a_key_of_another_certificate_is_refused(pki: dict[str, tuple]) -> None:
    config = SecurityConfig(
        certificate=pki["client"][0], private_key=pki["self"][1], trust=[pki["ca"][0]]
    )
    with pytest.raises(SecurityError, match="does not belong to the certificate"):
        load_identity(config)


def test_missing_files_are_named(tmp_path: Path, pki: dict[str, tuple]) -> None:
    config = SecurityConfig(
        certificate=tmp_path / "nope.der", private_key=pki["client"][1], trust=[pki["ca"][0]]
    )
    with pytest.raises(SecurityError, match=r"cannot read the client certificate .*nope\.der"):
        load_identity(config)


def test_a_certificate_without_an_application_uri_is_refused(
    tmp_path: Path, pki: dict[str, tuple]
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key(pki["client"][1].read_bytes(), None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")])
    now = datetime.now(UTC)
    bare = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[arg-type]
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = tmp_path / "bare.der"
    path.write_bytes(der(bare))
    config = SecurityConfig(certificate=path, private_key=pki["client"][1], trust=[pki["ca"][0]])
    with pytest.raises(SecurityError, match="has no URI in its subjectAltName"):
        load_identity(config)


def test_trust_reads_pem_bundles_and_refuses_empty_folders(
    tmp_path: Path, pki: dict[str, tuple]
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        b"".join(pki[k][2].public_bytes(serialization.Encoding.PEM) for k in ("ca", "self"))
    )
    assert len(load_trust([bundle])) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SecurityError, match="holds no certificate"):
        load_trust([empty])
