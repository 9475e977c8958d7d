"""The Modbus simulator of ``plantbus demo``: a pymodbus TCP gateway with two units.

It serves, on a free loopback port, a "press" (unit 1) and an "energy meter" (unit 2)
whose registers change over time, and its device tables read them with the real
``modbus`` connector; both units sit behind the one gateway, so the demo also shows two
devices sharing one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import time
from typing import Any

__all__ = ["ModbusDemoSimulator", "demo_simulator"]

UPDATE_EVERY = 0.1  # seconds between register updates

_DEVICES = """\
[[devices.modbus]]
name = "modbus_press"
topic = "demo/modbus/press"
host = "127.0.0.1"
port = {port}
unit = 1
interval = "200ms"
tags = {{ line = "L1" }}
points = [
  {{ name = "temp", area = "holding", address = 0, type = "float32" }},
  {{ name = "pressure", area = "holding", address = 2, type = "int16", scale = 0.1 }},
  {{ name = "strokes", area = "holding", address = 3, type = "uint32", word_order = "little" }},
  {{ name = "state", area = "holding", address = 5, type = "string", length = 4 }},
  {{ name = "running", area = "coil", address = 0 }},
  {{ name = "door_open", area = "discrete", address = 0 }},
]

[[devices.modbus]]
name = "modbus_meter"
topic = "demo/modbus/meter"
host = "127.0.0.1"
port = {port}
unit = 2
interval = "1s"
tags = {{ line = "L1" }}
points = [
  {{ name = "power_kw", area = "input", address = 0, type = "float32" }},
  {{ name = "energy_kwh", area = "input", address = 2, type = "uint64" }},
  {{ name = "voltage", area = "input", address = 6, type = "uint16", scale = 0.1 }},
]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _regs(fmt: str, value: Any) -> list[int]:
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


class ModbusDemoSimulator:
    """A ``ModbusTcpServer`` on a free loopback port whose registers follow the clock.

    Attributes:
        name: shown in the demo's notes.
        port: the server's port (picked when built, so ``device_config`` is known at once).
    """

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.name = f"modbus TCP gateway on 127.0.0.1:{self.port} (units 1 and 2)"
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._strokes = 0
        self._energy = 0.0

    def device_config(self) -> str:
        """Two ``[[devices.modbus]]`` tables (topics under ``demo/``) reading this server."""
        return _DEVICES.format(port=self.port)

    def _press(self, t: float) -> tuple[list[int], bool, bool]:
        running = int(t / 15) % 2 == 0
        if running:
            self._strokes += 1
        temp = 50.0 + 30.0 * math.sin(2 * math.pi * t / 60.0)
        pressure = round(2000 + 150 * math.sin(2 * math.pi * t / 7.0))  # 0.1 bar
        state = (b"RUN" if running else b"IDLE").ljust(8, b"\0")
        strokes = _regs("I", self._strokes & 0xFFFFFFFF)
        regs = [
            *_regs("f", temp),
            *_regs("h", pressure),
            strokes[1],  # uint32, low word first (word_order = "little")
            strokes[0],
            *[int.from_bytes(state[i : i + 2], "big") for i in range(0, 8, 2)],
        ]
        door_open = int(t / 20) % 3 == 2
        return regs, running, door_open

    def _meter(self, t: float) -> list[int]:
        power = 40.0 + 10.0 * math.sin(2 * math.pi * t / 30.0)
        self._energy += power * UPDATE_EVERY / 3600.0
        voltage = round(2300 + 20 * math.sin(2 * math.pi * t / 11.0))
        return [*_regs("f", power), *_regs("Q", round(self._energy * 1000)), voltage]

    def _devices(self) -> list[Any]:
        from pymodbus.simulator import DataType, SimData, SimDevice

        now = time.time()
        regs, running, door = self._press(now)

        def bits(value: bool) -> list[SimData]:
            return [SimData(0, values=[value] + [False] * 15, datatype=DataType.BITS)]

        def registers(values: list[int]) -> list[SimData]:
            return [SimData(0, values=values, datatype=DataType.REGISTERS)]

        press = SimDevice(
            id=1, simdata=(bits(running), bits(door), registers(regs), registers([0]))
        )
        meter = SimDevice(
            id=2, simdata=(bits(False), bits(False), registers([0]), registers(self._meter(now)))
        )
        return [press, meter]

    async def start(self) -> None:
        """Serve, and update the registers every ``UPDATE_EVERY`` seconds."""
        from pymodbus.server import ModbusTcpServer

        self._server = ModbusTcpServer(self._devices(), address=("127.0.0.1", self.port))
        await self._server.serve_forever(background=True)
        self._task = asyncio.create_task(self._update(), name="demo:modbus")

    async def _update(self) -> None:
        context = self._server.context
        while True:
            await asyncio.sleep(UPDATE_EVERY)
            t = time.time()
            regs, running, door = self._press(t)
            await context.async_setValues(1, 3, 0, regs)
            await context.async_setValues(1, 1, 0, [running])
            await context.async_setValues(1, 2, 0, [door])
            await context.async_setValues(2, 4, 0, self._meter(t))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None


def demo_simulator() -> ModbusDemoSimulator:
    """The demo's Modbus simulator (raises ImportError without pymodbus, so the demo
    leaves it out with a note)."""
    import pymodbus  # noqa: F401

    return ModbusDemoSimulator()
