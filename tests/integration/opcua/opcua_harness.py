"""Helpers of the opcua tests (and the opcua benchmark): a server process, certificates, and
a connector run that collects what it emits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Record

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/servers.py

from servers import free_port

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "opcua_server.py"

__all__ = [
    "BULK",
    "Collector",
    "UaServer",
    "base_variables",
    "make_cert",
    "running",
]


BULK = 20  # Bulk.v0 … v19, for chunking


def base_variables() -> list[dict[str, Any]]:
    """The address space of the shared server: one variable per type and status, and bulk."""
    line = [
        ("s=Line1.Temp", "Temp", "Double", 21.5),
        ("s=Line1.Count", "Count", "Int32", 7),
        ("s=Line1.Big", "Big", "Int64", 2**40 + 3),
        ("s=Line1.Small", "Small", "UInt16", 65535),
        ("s=Line1.Ratio", "Ratio", "Float", 0.25),
        ("s=Line1.Running", "Running", "Boolean", True),
        ("s=Line1.Name", "Name", "String", "press 7"),
        ("s=Line1.Stamp", "Stamp", "DateTime", 1_700_000_000_123_456_000),
        ("s=Line1.Raw", "Raw", "ByteString", "00ff10"),
        ("s=Line1.Label", "Label", "LocalizedText", "Betrieb"),
        ("i=1001", "Numeric", "Double", 3.5),
    ]
    out = [
        {"node": n, "name": name, "parent": "Line1", "type": t, "value": v}
        for n, name, t, v in line
    ]
    out += [
        # Uncertain_LastUsableValue and Bad_SensorFailure, each with a value the server holds
        {"node": "s=Line1.Stale", "name": "Stale", "parent": "Line1", "type": "Double",
         "value": 5.5, "status": 0x40900000},
        {"node": "s=Line1.Broken", "name": "Broken", "parent": "Line1", "type": "Double",
         "value": 9.9, "status": 0x808B0000},
        {"node": "s=Line1.Vector", "name": "Vector", "parent": "Line1", "value": [1.5, 2.5, 3.5]},
        {"node": "s=Line1.Empty", "name": "Empty", "parent": "Line1", "value": None},
        # taken away by the node-deletion tests, one per mode
        {"node": "s=Doomed.poll", "name": "poll", "parent": "Doomed", "type": "Double",
         "value": 1.0},
        {"node": "s=Doomed.subscribe", "name": "subscribe", "parent": "Doomed", "type": "Double",
         "value": 1.0},
    ]  # fmt: skip
    out += [
        {
            "node": f"s=Bulk.v{i}",
            "name": f"v{i}",
            "parent": "Bulk",
            "type": "Double",
            "value": float(i),
        }
        for i in range(BULK)
    ]
    return out


class UaServer:
    """``opcua_server.py`` in its own process, on a fixed loopback port (kept on restart).

    Args:
        spec: the server spec (see ``opcua_server.py``); ``port`` is filled in.
        workdir: where the spec file goes (a temp dir by default).
    """

    def __init__(self, spec: dict[str, Any], workdir: Path | None = None):
        self.spec = dict(spec)
        self.spec.setdefault("port", free_port())
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="plantbus-opcua-"))
        self.proc: subprocess.Popen[str] | None = None
        self.ns = 2

    @property
    def port(self) -> int:
        return int(self.spec["port"])

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/plantbus/"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> UaServer:
        spec_path = self.workdir / f"spec-{self.port}.json"
        spec_path.write_text(json.dumps(self.spec))
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        ready = self._reply(timeout)
        if not ready.get("ready"):
            raise RuntimeError(f"opcua test server did not start: {ready}")
        self.ns = int(ready["ns"])
        return self

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"opcua test server (pid {self.proc.pid}) gave no answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"opcua test server exited ({self.proc.poll()})")
        return dict(json.loads(line))

    def call(self, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one command and return its answer (raises if the server reports an error)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"opcua test server: {op}: {reply.get('error')}")
        return reply

    async def acall(self, op: str, **args: Any) -> dict[str, Any]:
        """``call`` off the event loop, so the connector under test keeps running."""
        return await asyncio.to_thread(self.call, op, **args)

    def node(self, ident: str) -> str:
        """The full node id of a variable of the spec (``s=Line1.Temp`` → ``ns=2;s=…``)."""
        return f"ns={self.ns};{ident}"

    def pause(self) -> None:
        """SIGSTOP: the kernel keeps its sockets open and accepting, nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> UaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_cert(
    folder: Path,
    name: str,
    app_uri: str,
    *,
    issuer: tuple[x509.Certificate, Any] | None = None,
    ca: bool = False,
) -> tuple[Path, Path, x509.Certificate, Any]:
    """A certificate as OPC UA wants one: the application URI in subjectAltName, key usages
    for signing and encryption. Self-signed, or signed by ``issuer`` (cert, key).

    Returns:
        (certificate path (DER), private key path (PEM), certificate, key).
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    issuer_name, signer = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(app_uri),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=ca or issuer is None,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    cert = builder.sign(signer, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = folder / f"{name}.der"
    key_path = folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert, key


class Collector:
    """The ``emit`` of a connector under test: keeps every batch, wakes waiters."""

    def __init__(self) -> None:
        self.batches: list[list[Record]] = []
        self.times: list[float] = []  # monotonic time of each batch
        self._changed = asyncio.Event()

    async def emit(self, records: list[Record]) -> None:
        self.batches.append(records)
        self.times.append(time.monotonic())
        self._changed.set()

    @property
    def records(self) -> list[Record]:
        return [r for b in self.batches for r in b]

    def last(self, point: str) -> Any:
        """The latest value of ``point`` (None if it never came)."""
        for r in reversed(self.records):
            if point in r.fields:
                return r.fields[point]
        return None

    def last_status(self, point: str) -> int | None:
        for r in reversed(self.records):
            if r.status and point in r.status:
                return r.status[point]
            if point in r.fields:
                return None
        return None

    async def wait(self, predicate: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
        """Wait until ``predicate()`` is truthy (re-checked after every batch), at most
        ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {within}s waiting for {what or predicate}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.2)):
                    await self._changed.wait()


CTX = BuildContext(node_name="edge", node_tags={"site": "test"}, state_dir=Path("/nonexistent"))


def device(url: str, points: list[dict[str, Any]], **keys: Any) -> Any:
    """A validated ``opcua`` device config."""
    from plantbus.connectors.opcua import Config

    return Config.model_validate(
        {"name": keys.pop("name", "ua1"), "url": url, "points": points, **keys}
    )


@contextlib.asynccontextmanager
async def running(config: Any) -> AsyncIterator[tuple[Any, Collector]]:
    """Build the connector for ``config`` and run it until the block ends."""
    from plantbus.connectors.opcua import build

    connector = build(config, CTX)
    out = Collector()
    task = asyncio.create_task(connector.run(out.emit), name=f"opcua:{config.name}")
    try:
        yield connector, out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # run() ends only by cancellation; anything else it raised surfaces here
