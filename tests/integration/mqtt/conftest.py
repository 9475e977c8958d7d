"""A real Mosquitto for the mqtt device tests: started once per session, stopped by PID.

Four listeners on free loopback ports, in a temp dir:

* ``plain``: anonymous MQTT;
* ``tls``: TLS with a server certificate signed by a CA made here (``cryptography``);
* ``mtls``: TLS that also requires a client certificate signed by that CA;
* ``auth``: username / password (``mosquitto_passwd``), no anonymous clients.

Also a ``TcpCutter``: a TCP proxy that can cut every connection through it, for the test of a
lost connection (Mosquitto itself keeps running for the other tests).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import free_port, wait_until

USER, PASSWORD = "plant", "s3cret-pw"


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing the broker uses


def _key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert(subject_cn: str, key, issuer_cn: str, issuer_key, *, ca: bool, server: bool = False):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(d: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 / localhost, a client certificate, and an
    unrelated second CA, as PEM files in ``d``."""
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    ca_key, other_key, srv_key, cli_key = _key(), _key(), _key(), _key()
    ca = _cert("plantbus test CA", ca_key, "plantbus test CA", ca_key, ca=True)
    other = _cert("some other CA", other_key, "some other CA", other_key, ca=True)
    srv = _cert("127.0.0.1", srv_key, "plantbus test CA", ca_key, ca=False, server=True)
    cli = _cert("plantbus-client", cli_key, "plantbus test CA", ca_key, ca=False)
    c = Certs(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )
    c.ca.write_bytes(ca.public_bytes(pem))
    c.other_ca.write_bytes(other.public_bytes(pem))
    c.server_cert.write_bytes(srv.public_bytes(pem))
    c.client_cert.write_bytes(cli.public_bytes(pem))
    _write_key(srv_key, c.server_key)
    _write_key(cli_key, c.client_key)
    return c


class Mosquitto:
    """``mosquitto`` with a plain, a TLS, a mutual-TLS and a password listener."""

    user = USER
    password = PASSWORD

    def __init__(self, base: Path):
        self.base = base
        self.certs = make_certs(base)
        self.plain, self.tls, self.mtls, self.auth = (free_port() for _ in range(4))
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        c = self.certs
        tls = f"cafile {c.ca}\ncertfile {c.server_cert}\nkeyfile {c.server_key}\n"
        passwd = self.base / "passwd"
        passwd.write_text("")
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), USER, PASSWORD],
            check=True,
            capture_output=True,
        )
        # as root, mosquitto would switch to user "mosquitto", who cannot read the temp dir
        user = "user root\n" if os.geteuid() == 0 else ""
        return (
            user + "per_listener_settings true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 100000\n"
            f"listener {self.plain} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls} 127.0.0.1\nallow_anonymous true\n{tls}"
            f"listener {self.mtls} 127.0.0.1\nallow_anonymous true\n{tls}"
            "require_certificate true\n"
            f"listener {self.auth} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        )

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            raise RuntimeError(
                "mosquitto not found: run `make test` (scripts/install-test-deps.sh)"
            )
        conf = self.base / "mosquitto.conf"
        conf.write_text(self._config())
        log = open(self.base / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.base / "mosquitto.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{tail}")
            for port in (self.plain, self.tls, self.mtls, self.auth):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) != 0:
                        return False
            return True

        wait_until(up, 15, "mosquitto listeners")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    server = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class TcpCutter:
    """A TCP proxy to ``127.0.0.1:target`` that can cut every open connection (own thread)."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.update((w, uw))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    def start(self) -> TcpCutter:
        self._thread.start()
        self._ready.wait(5)
        return self

    def cut(self) -> None:
        """Close every connection through the proxy (new ones still pass)."""

        def close_all() -> None:
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()

        self.loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(5)


@pytest.fixture
def tcp_cutter() -> Iterator[Callable[[int], TcpCutter]]:
    """Make ``TcpCutter``s to a port; they are closed after the test."""
    made: list[TcpCutter] = []

    def make(target: int) -> TcpCutter:
        c = TcpCutter(target).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
