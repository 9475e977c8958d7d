"""Message security and user authentication against a real asyncua server with certificates
generated here: every policy and mode, the trust check of the server certificate, passwords."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opcua_harness import UaServer, base_variables, device, make_cert, running

from plantbus.broker.record import Quality

SERVER_URI = "urn:plantbus:test-server"
CLIENT_URI = "urn:edge:plantbus"
BAD_SECURITY_CHECKS_FAILED = 0x80130000
BAD_IDENTITY_TOKEN_REJECTED = 0x80210000
BAD_USER_ACCESS_DENIED = 0x801F0000

COMBOS = [
    (policy, mode)
    for policy in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
    for mode in ("Sign", "SignAndEncrypt")
]


class Pki:
    def __init__(self, folder: Path):
        self.server_cert, self.server_key, _, _ = make_cert(
            folder / "server", "ua-server", SERVER_URI
        )
        self.client_cert, self.client_key, _, _ = make_cert(
            folder / "client", "edge-07", CLIENT_URI
        )
        # a certificate of some other server: trusting only it must not let ours in
        self.other_cert, _, _, _ = make_cert(folder / "other", "someone-else", "urn:other")

    def security(self, policy: str = "Basic256Sha256", mode: str = "SignAndEncrypt", **keys: Any):
        return {
            "policy": policy,
            "mode": mode,
            "certificate": str(self.client_cert),
            "private_key": str(self.client_key),
            "trust": [str(self.server_cert)],
            **keys,
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UaServer]:
    """Offers every policy in Sign and SignAndEncrypt, no unsecured endpoint; users only."""
    policies = [
        f"{p}_{m}"
        for p in ("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss")
        for m in ("Sign", "SignAndEncrypt")
    ]
    spec = {
        "variables": base_variables(),
        "security": {
            "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key),
            "application_uri": SERVER_URI,
            "policies": policies,
            "users": {"operator": "s3cret"},
        },
    }
    with UaServer(spec, tmp_path_factory.mktemp("secure")) as server:
        yield server


def temp_point(server: UaServer) -> list[dict[str, str]]:
    return [{"name": "temp", "node": server.node("s=Line1.Temp")}]


@pytest.mark.parametrize(("policy", "mode"), COMBOS, ids=[f"{p}-{m}" for p, m in COMBOS])
async def test_reads_over_every_policy_and_mode(
    secure_server: UaServer, pki: Pki, policy: str, mode: str
) -> None:
    config = device(
        secure_server.url,
        temp_point(secure_server),
        interval="50ms",
        username="operator",
        password="s3cret",
        security=pki.security(policy, mode),
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: out.last("temp") == 21.5, what="temp over a secure channel")
    assert connector.connects == 1 and connector.last_error is None


async def test_subscribe_over_a_secure_channel(secure_server: UaServer, pki: Pki) -> None:
    config = device(
        secure_server.url,
        temp_point(secure_server),
        mode="subscribe",
        interval="50ms",
        username="operator",
        password="s3cret",
        security=pki.security("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
    )
    async with running(config) as (_, out):
        await out.wait(lambda: out.last("temp") == 21.5, what="temp")


async def test_a_trust_folder_holding_the_server_certificate_is_accepted(
    secure_server: UaServer, pki: Pki
) -> None:
    security = pki.security(trust=[str(pki.server_cert.parent)])
    config = device(
        secure_server.url,
        temp_point(secure_server),
        interval="50ms",
        username="operator",
        password="s3cret",
        security=security,
    )
    async with running(config) as (_, out):
        await out.wait(lambda: out.last("temp") == 21.5, what="temp")


async def test_an_untrusted_server_certificate_is_refused_with_a_clear_error(
    secure_server: UaServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="plantbus.opcua")
    config = device(
        secure_server.url,
        temp_point(secure_server),
        interval="50ms",
        username="operator",
        password="s3cret",
        security=pki.security(trust=[str(pki.other_cert)]),
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: connector.last_error, what="the refusal")
    assert connector.connects == 0
    assert connector.last_error.startswith("UntrustedCertificate: server certificate CN=ua-server")
    assert "is not trusted: neither it nor its issuer is in security.trust" in connector.last_error
    assert "cannot connect to " + secure_server.url in caplog.text
    assert "CN=ua-server (SHA-256 " in caplog.text
    # the outage shows as one record with every point Bad, never as a value
    (record,) = out.records
    assert record.fields == {} and record.quality is Quality.BAD
    assert record.status == {"temp": BAD_SECURITY_CHECKS_FAILED}


async def test_a_wrong_password_is_refused(secure_server: UaServer, pki: Pki) -> None:
    config = device(
        secure_server.url,
        temp_point(secure_server),
        interval="50ms",
        username="operator",
        password="guess",
        security=pki.security(),
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: out.records, what="the refusal")
    assert connector.connects == 0
    assert connector.last_error is not None and "Bad" in connector.last_error
    (record,) = out.records
    assert record.fields == {}
    assert record.status is not None
    assert record.status["temp"] in (BAD_IDENTITY_TOKEN_REJECTED, BAD_USER_ACCESS_DENIED)


async def test_no_security_is_refused_by_a_secure_only_server(secure_server: UaServer) -> None:
    config = device(
        secure_server.url,
        temp_point(secure_server),
        interval="50ms",
        username="operator",
        password="s3cret",
        timeout="2s",
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: out.records, what="the refusal")
    assert connector.connects == 0 and connector.last_error
    assert out.records[0].fields == {}


def _plantbus(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_discover_over_a_secure_channel_writes_the_security_table(
    secure_server: UaServer, pki: Pki, tmp_path: Path
) -> None:
    secret = tmp_path / "ua-password"
    secret.write_text("s3cret\n")
    args = [
        "discover", "opcua", secure_server.url, "--limit", "2",
        "--username", "operator", "--password-file", str(secret),
        "--policy", "Aes128_Sha256_RsaOaep", "--security-mode", "Sign",
        "--certificate", str(pki.client_cert), "--private-key", str(pki.client_key),
        "--trust", str(pki.server_cert),
    ]  # fmt: skip
    out = _plantbus(tmp_path, *args)
    assert out.returncode == 0, out.stderr
    assert (
        f'security = {{ policy = "Aes128_Sha256_RsaOaep", mode = "Sign", '
        f'certificate = "{pki.client_cert}", private_key = "{pki.client_key}", '
        f'trust = ["{pki.server_cert}"] }}'
    ) in out.stdout
    assert f'# username = "operator"\n# password_file = "{secret}"\n' in out.stdout
    assert "s3cret" not in out.stdout
    # and an untrusted server is refused here too
    untrusted = [*args[:-1], str(pki.other_cert)]
    out = _plantbus(tmp_path, *untrusted)
    assert out.returncode == 1
    assert "UntrustedCertificate: server certificate CN=ua-server" in out.stderr
    # the password really comes from the file: a wrong one is refused by the server
    secret.write_text("wrong\n")
    out = _plantbus(tmp_path, *args)
    assert out.returncode == 1 and "cannot connect to" in out.stderr, out.stderr
    assert "wrong" not in out.stderr
    both = _plantbus(tmp_path, *args, "--password", "x")
    assert both.returncode == 2
    assert "--password: not allowed with argument --password-file" in both.stderr
