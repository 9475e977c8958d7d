"""The S7 demo simulator: a python-snap7 ``Server`` in-process, with values that move.

``plantbus demo`` runs it (``registry.DEMO_SIMULATORS["s7"]``) on a free loopback port and
reads it with the real ``s7`` connector. Its memory is a small filling machine:

====================  =====================  ==========================================
address               point                  what it does
====================  =====================  ==========================================
``DB1.DBD0`` REAL      ``temp``               sine 20-80 °C over 60 s
``DB1.DBW4`` INT       ``speed``              sine 0-1200 bottles/min over 30 s
``DB1.DBX6.0``         ``running``            true while the speed is above 100
``DB1.DBD8`` DINT      ``bottles``            counts up with the speed
``DB1.DBD12`` REAL     ``pressure``           random walk around 2.5 bar
``DB1.DBD16:LREAL``    ``energy_kwh``         grows with the speed
``DB1.DBB24:STRING``   ``recipe``             ``COLA-0.5L`` / ``WATER-1L``, every 20 s
``DB1.DBB50`` DT       ``plc_clock``          the PLC's clock (local time)
``M0.0``               ``heartbeat``          toggles every second
``MW2``                ``cycle_ms``           scan time, 8-12 ms
``I0.0``               ``door_closed``        opens for 2 s every 15 s
``QW2`` INT            ``valve_pct``          follows the speed, 0-100
====================  =====================  ==========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import struct
import time
from datetime import datetime
from typing import Any

__all__ = ["S7DemoSimulator", "demo_simulator"]

UPDATE_INTERVAL = 0.1  # seconds between changes of the simulated values
DB1_SIZE = 64

POINTS = [
    ("temp", "DB1.DBD0", "real"),
    ("speed", "DB1.DBW4", "int"),
    ("running", "DB1.DBX6.0", None),
    ("bottles", "DB1.DBD8", "dint"),
    ("pressure", "DB1.DBD12", "real"),
    ("energy_kwh", "DB1.DBD16:LREAL", None),
    ("recipe", "DB1.DBB24", "string[24]"),
    ("plc_clock", "DB1.DBB50", "date_and_time"),
    ("heartbeat", "M0.0", None),
    ("cycle_ms", "MW2", "uint"),
    ("door_closed", "I0.0", None),
    ("valve_pct", "QW2", "int"),
]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bcd(n: int) -> int:
    return (n // 10) << 4 | n % 10


def _dt_bytes(t: datetime) -> bytes:
    ms = t.microsecond // 1000
    weekday = t.isoweekday() % 7 + 1  # S7: 1 = Sunday
    return bytes(
        [
            _bcd(t.year % 100),
            _bcd(t.month),
            _bcd(t.day),
            _bcd(t.hour),
            _bcd(t.minute),
            _bcd(t.second),
            _bcd(ms // 10),
            (ms % 10) << 4 | weekday,
        ]
    )


def _string_bytes(text: str, max_chars: int) -> bytes:
    data = text.encode("latin-1")[:max_chars]
    return bytes([max_chars, len(data)]) + data.ljust(max_chars, b" ")


class S7DemoSimulator:
    """A python-snap7 server on a free loopback port whose memory changes over time.

    Args:
        host: the loopback address to listen on.
        port: the port (default: a free one, picked now so ``device_config`` is known).
        interval: the demo device's poll interval (TOML duration).
        seed: seed of the random walk.
    """

    name = "s7 (python-snap7 server)"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        interval: str = "250ms",
        seed: int | None = None,
    ):
        self.host = host
        self.port = port or _free_port(host)
        self.interval = interval
        self.db1 = bytearray(DB1_SIZE)
        self.mk = bytearray(16)
        self.inputs = bytearray(4)
        self.outputs = bytearray(4)
        self._rng = random.Random(seed)
        self._pressure = 2.5
        self._bottles = 0.0
        self._energy = 0.0
        self._t0 = time.monotonic()
        self._last = self._t0
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self.update(self._t0)

    def device_config(self) -> str:
        """The ``[[devices.s7]]`` table reading this server (topic ``demo/s7/filler1``)."""
        points = "\n".join(
            f'  {{ name = "{n}", address = "{a}"' + (f', type = "{t}"' if t else "") + " },"
            for n, a, t in POINTS
        )
        return (
            "[[devices.s7]]\n"
            'name = "filler1"\n'
            'topic = "demo/s7/filler1"\n'
            f'host = "{self.host}"\n'
            f"port = {self.port}\n"
            "rack = 0\n"
            "slot = 1\n"
            f'interval = "{self.interval}"\n'
            'timeout = "1s"\n'
            'tags = { line = "L3" }\n'
            f"points = [\n{points}\n]\n"
        )

    def update(self, now: float) -> None:
        """Move every value to where it is at monotonic time ``now``.

        Each value is written with one slice assignment, which the server's threads see
        whole (the GIL), so a reader never gets half of an old and half of a new value.
        """
        t = now - self._t0
        dt = max(0.0, now - self._last)
        self._last = now
        speed = round(600 + 600 * math.sin(2 * math.pi * t / 30.0))
        self._bottles += speed / 60.0 * dt
        self._energy += (0.5 + speed / 1000.0) * dt / 3600.0
        self._pressure = min(3.0, max(2.0, self._pressure + self._rng.uniform(-0.02, 0.02)))
        db = self.db1
        db[0:4] = struct.pack(">f", 50.0 + 30.0 * math.sin(2 * math.pi * t / 60.0))
        db[4:6] = struct.pack(">h", speed)
        db[6:7] = bytes([1 if speed > 100 else 0])
        db[8:12] = struct.pack(">i", int(self._bottles))
        db[12:16] = struct.pack(">f", self._pressure)
        db[16:24] = struct.pack(">d", self._energy)
        recipe = "COLA-0.5L" if int(t // 20) % 2 == 0 else "WATER-1L"
        db[24:50] = _string_bytes(recipe, 24)
        db[50:58] = _dt_bytes(datetime.now())
        self.mk[0:1] = bytes([int(t) % 2])
        self.mk[2:4] = struct.pack(">H", 8 + int(t * 7) % 5)
        self.inputs[0:1] = bytes([0 if t % 15.0 < 2.0 else 1])
        self.outputs[2:4] = struct.pack(">h", min(100, max(0, round(speed / 12))))

    async def start(self) -> None:
        """Start the server and the task that moves its values."""
        from snap7.server import Server
        from snap7.type import SrvArea

        # the demo's own server: its per-client info lines would crowd the live view
        logging.getLogger("snap7.server").setLevel(logging.WARNING)
        server = Server(log=False)
        server.register_area(SrvArea.DB, 1, self.db1)
        server.register_area(SrvArea.MK, 0, self.mk)
        server.register_area(SrvArea.PE, 0, self.inputs)
        server.register_area(SrvArea.PA, 0, self.outputs)
        server.start_to(self.host, self.port)
        self._server = server
        self._task = asyncio.create_task(self._run(), name="demo:s7-simulator")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(UPDATE_INTERVAL)
            self.update(time.monotonic())

    async def stop(self) -> None:
        """Stop moving values and stop the server (its threads join off the event loop)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.stop)


def demo_simulator() -> S7DemoSimulator:
    """The simulator ``plantbus demo`` runs (raises ImportError without python-snap7)."""
    from plantbus.connectors.s7.link import check_driver

    check_driver()
    return S7DemoSimulator()
