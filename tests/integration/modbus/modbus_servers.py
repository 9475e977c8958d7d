"""Real Modbus servers for the tests and the bench, and a fault-injecting Modbus TCP proxy.

* ``ServerThread``: pymodbus ``ModbusTcpServer`` (Modbus TCP or RTU-over-TCP framing) or
  ``ModbusSerialServer`` on its own event loop in a background thread, so it keeps serving
  whatever loop a test runs on (session-scoped fixtures, function-scoped test loops).
* ``SocatPair``: a pty pair from socat (``pty,raw,echo=0``) standing in for a serial line.
* ``ModbusProxy``: an asyncio TCP proxy in front of a server that delays chosen replies (in
  order, as a slow device would), cuts connections, or swallows requests. A late Modbus
  reply, a cut connection and a hung peer are faults a real server does not produce on
  demand; the normal path always runs against the real server.
* ``python modbus_servers.py --registers N``: a server in its own process (the bench), which
  prints its port on stdout.

A unit's map is ``UnitMap``: lists of values per area from address 0 (``None`` marks an
address the unit does not map, which it refuses with exception 2, "illegal data address").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModbusProxy",
    "ServerThread",
    "SocatPair",
    "UnitMap",
    "eventually",
    "simdevices",
]

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_FC = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


async def eventually(predicate: Callable[[], object], limit: float = 10.0) -> None:
    """Wait until ``predicate()`` is true, at most ``limit`` seconds (TimeoutError then).

    Counters, proxy events and files have no event to wait on; polling them with a deadline
    waits for state, never for a guessed amount of time.
    """
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@dataclass
class UnitMap:
    """What one unit holds, per area, from address 0 (``None``: not mapped)."""

    unit: int
    coil: Sequence[bool | None] = ()
    discrete: Sequence[bool | None] = ()
    holding: Sequence[int | None] = ()
    input: Sequence[int | None] = ()


def _blocks(values: Sequence[Any], bits: bool) -> list[Any]:
    """SimData blocks for ``values`` (runs of mapped addresses; ``None`` gaps left out)."""
    from pymodbus.simulator import DataType, SimData

    out = []
    start = None
    for i, v in enumerate([*values, None]):
        if v is not None and start is None:
            start = i
        elif v is None and start is not None:
            run = list(values[start:i])
            dtype = DataType.BITS if bits else DataType.REGISTERS
            out.append(SimData(start, values=run, datatype=dtype))
            start = None
    if not out:
        # a unit needs every block; one unmapped far address keeps the area empty in effect
        dtype = DataType.BITS if bits else DataType.REGISTERS
        out.append(SimData(65000, values=[False] * 16 if bits else [0], datatype=dtype))
    return out


def simdevices(units: Sequence[UnitMap]) -> list[Any]:
    """pymodbus ``SimDevice``s (four separate blocks each) holding ``units``."""
    from pymodbus.simulator import SimDevice

    devices = []
    for u in units:
        devices.append(
            SimDevice(
                id=u.unit,
                simdata=(
                    _blocks(u.coil, True),
                    _blocks(u.discrete, True),
                    _blocks(u.holding, False),
                    _blocks(u.input, False),
                ),
            )
        )
    return devices


def _report_missing_units(context: Any) -> None:
    """Make a request for a unit the server lacks raise pymodbus's ``NoSuchIdException``.

    pymodbus 3.16's simulator datastore raises ``KeyError`` there, which the server answers
    with exception 4 whatever ``ignore_missing_devices`` says; with ``NoSuchIdException``
    it answers exception 11 ("gateway target device failed to respond"), or nothing at all
    with ``ignore_missing_devices``, as a unit missing from a serial line does.
    """
    from pymodbus.exceptions import NoSuchIdException

    known = set(context.device_ids())
    get_values = context.async_getValues

    async def async_getValues(device_id: int, *args: Any, **kwargs: Any) -> Any:
        if device_id not in known:
            raise NoSuchIdException(f"no unit {device_id}")
        return await get_values(device_id, *args, **kwargs)

    context.async_getValues = async_getValues


class ServerThread:
    """A pymodbus server on its own loop in a daemon thread.

    Args:
        units: what the server holds.
        kind: ``tcp``, ``rtu-over-tcp`` or ``rtu`` (serial, on ``serial_port``).
        serial_port: the pty (or device) of an ``rtu`` server.
        baudrate: of an ``rtu`` server.
        ignore_missing: do not answer for units the server does not hold (as a serial
            line would; the default for ``rtu``).
    """

    def __init__(
        self,
        units: Sequence[UnitMap],
        *,
        kind: str = "tcp",
        serial_port: str | None = None,
        baudrate: int = 115200,
        ignore_missing: bool | None = None,
    ):
        self.units = list(units)
        self.kind = kind
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.ignore_missing = kind == "rtu" if ignore_missing is None else ignore_missing
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._main, name=f"modbus-{self.kind}", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise TimeoutError(f"modbus {self.kind} server did not start")
        if self._error is not None:
            raise RuntimeError(f"modbus {self.kind} server failed: {self._error}")
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def _serve(self) -> None:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer

        devices = simdevices(self.units)
        if self.kind == "rtu":
            assert self.serial_port is not None
            self.server = ModbusSerialServer(
                devices,
                port=self.serial_port,
                baudrate=self.baudrate,
                ignore_missing_devices=self.ignore_missing,
            )
        else:
            framer = FramerType.RTU if self.kind == "rtu-over-tcp" else FramerType.SOCKET
            self.server = ModbusTcpServer(
                devices,
                address=("127.0.0.1", 0),
                framer=framer,
                ignore_missing_devices=self.ignore_missing,
            )
        _report_missing_units(self.server.context)
        await self.server.serve_forever(background=True)
        if self.kind != "rtu":
            self.port = self.server.transport.sockets[0].getsockname()[1]

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run ``coro`` on the server's loop and return its result."""
        assert self.loop is not None
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def set_values(self, unit: int, area: str, address: int, values: Sequence[Any]) -> None:
        """Change what the server holds (any area, input registers too)."""
        result = self.call(
            self.server.context.async_setValues(unit, _FC[area], address, list(values))
        )
        if result is not None:
            raise ValueError(f"cannot set {area} {address}+{len(values)} of unit {unit}: {result}")

    def get_values(self, unit: int, area: str, address: int, count: int) -> list[Any]:
        """What the server holds now (its own datastore, not through a client)."""
        return list(self.call(self.server.context.async_getValues(unit, _FC[area], address, count)))

    @property
    def connections(self) -> int:
        """Client connections open right now (TCP servers)."""
        return len(getattr(self.server, "active_connections", {}) or {})

    def stop(self) -> None:
        if self.loop is None or self._thread is None:
            return
        if self.server is not None:
            self.call(self.server.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even without its teardown
    (a killed pytest would otherwise leave socat running)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class SocatPair:
    """Two linked ptys (``a`` and ``b``) from ``socat``, as a serial line with two ends."""

    def __init__(self, folder: Path):
        if shutil.which("socat") is None:
            raise RuntimeError("socat not found: run `make test` (it installs Debian's socat)")
        self.a = str(folder / "ttyA")
        self.b = str(folder / "ttyB")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> SocatPair:
        self.proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"socat exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("socat did not create its ptys")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> SocatPair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ProxyEvent:
    """What the proxy did with one request or reply."""

    conn: int
    what: str  # "request", "delayed", "late-delivered", "late-dropped", "cut", "swallowed"
    time: float = field(default_factory=time.monotonic)


class ModbusProxy:
    """A TCP proxy in front of a Modbus server, on the test's event loop.

    Requests are counted over all connections in the order they arrive (``n`` = 1, 2, ...).
    A request is one chunk read from the client (clients write each request in one call;
    on loopback it arrives as one chunk), which works for MBAP and RTU framing alike.
    Replies on a connection keep their order: a delayed reply holds back the ones after it,
    as a slow device or serial gateway would.

    Args:
        upstream_port: the real server's port on 127.0.0.1.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.events: list[ProxyEvent] = []
        self._delays: dict[int, float] = {}
        self._cut: set[int] = set()
        self._swallow_from: int | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.on_request: Callable[[int, bytes], None] | None = None

    def delay_reply(self, n: int, seconds: float) -> None:
        """Hold back the reply to request number ``n`` (counting from 1) by ``seconds``."""
        self._delays[n] = seconds

    def cut_at(self, n: int) -> None:
        """Close the client's connection when request ``n`` arrives (it is not forwarded)."""
        self._cut.add(n)

    def swallow_from(self, n: int | None) -> None:
        """From request ``n`` on, never forward nor answer (a hung peer); None ends it."""
        self._swallow_from = n

    def count(self, what: str) -> int:
        return sum(1 for e in self.events if e.what == what)

    def conn_of_requests(self) -> list[int]:
        """The connection number of each request, in order."""
        return [e.conn for e in self.events if e.what == "request"]

    async def start(self) -> ModbusProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ModbusProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        self._writers.add(c_writer)
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            c_writer.close()
            return
        self._writers.add(s_writer)
        # replies are delivered in request order; each request puts its hold time here
        holds: asyncio.Queue[float] = asyncio.Queue()
        self._spawn(self._replies(conn, s_reader, c_writer, holds))
        try:
            while True:
                data = await c_reader.read(4096)
                if not data:
                    break
                self.requests += 1
                n = self.requests
                self.events.append(ProxyEvent(conn, "request"))
                if self.on_request is not None:
                    self.on_request(n, data)
                if n in self._cut:
                    self.events.append(ProxyEvent(conn, "cut"))
                    break
                if self._swallow_from is not None and n >= self._swallow_from:
                    self.events.append(ProxyEvent(conn, "swallowed"))
                    continue
                holds.put_nowait(self._delays.get(n, 0.0))
                s_writer.write(data)
                await s_writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            # the reply pump lives on: a delayed reply still pending then finds the client
            # gone and is dropped, not sent (stop() ends the pumps)
            c_writer.close()
            s_writer.close()
            self._writers.discard(c_writer)
            self._writers.discard(s_writer)

    async def _replies(
        self,
        conn: int,
        s_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        holds: asyncio.Queue[float],
    ) -> None:
        hold = 0.0
        try:
            while True:
                hold = await holds.get()
                data = await s_reader.read(4096)
                if not data:
                    return
                if hold > 0:
                    self.events.append(ProxyEvent(conn, "delayed"))
                    await asyncio.sleep(hold)
                if c_writer.is_closing():
                    if hold > 0:
                        self.events.append(ProxyEvent(conn, "late-dropped"))
                    return
                if hold > 0:
                    self.events.append(ProxyEvent(conn, "late-delivered"))
                c_writer.write(data)
                await c_writer.drain()
        except (ConnectionError, OSError):
            if hold > 0:
                self.events.append(ProxyEvent(conn, "late-dropped"))


# -- a server in its own process (the bench) -------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A pymodbus TCP server; prints its port.")
    p.add_argument("--registers", type=int, default=1000, help="holding/input registers 0..N-1")
    p.add_argument("--units", type=int, default=1, help="units 1..N, all alike")
    p.add_argument("--framer", choices=["tcp", "rtu-over-tcp"], default="tcp")
    args = p.parse_args(argv)
    regs = [(i * 7) & 0xFFFF for i in range(args.registers)]
    units = [
        UnitMap(u, holding=regs, input=regs, coil=[i % 3 == 0 for i in range(2000)])
        for u in range(1, args.units + 1)
    ]
    server = ServerThread(units, kind=args.framer).start()
    print(server.port, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()  # serve until stdin closes (or a signal ends the process)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
