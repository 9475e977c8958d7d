"""The OPC UA demo simulator: an asyncua ``Server`` in-process, with values that move.

``plantbus demo`` runs it (``registry.DEMO_SIMULATORS["opcua"]``) on a free loopback port
and reads it with the real ``opcua`` connector, in both modes:

* ``oven4`` (poll, every 500 ms): ``Oven4.Temp`` (Double, heats towards the setpoint and
  cools with the door open), ``Oven4.Setpoint`` (Double, 180 / 220 °C every 30 s),
  ``Oven4.Heating`` (Boolean), ``Oven4.DoorOpen`` (Boolean, open 3 s every 20 s);
* ``line5`` (subscribe, publishing every 250 ms): ``Line5.Count`` (Int64, one part per
  200 ms while running), ``Line5.Speed`` (Double, a random walk reported beyond a 0.5
  deadband), ``Line5.State`` (String, ``running`` / ``changeover``).

All values change together every ``UPDATE_INTERVAL`` with one source timestamp, so the
polled device emits one record per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from datetime import UTC, datetime
from typing import Any

__all__ = ["OpcUaDemoSimulator", "demo_simulator"]

UPDATE_INTERVAL = 0.2  # seconds between changes of the simulated values
NAMESPACE = "urn:plantbus:demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Plant:
    """The simulated oven and line: pure state, advanced by ``step``."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.temp = 20.0
        self.setpoint = 180.0
        self.heating = True
        self.door_open = False
        self.count = 0
        self.speed = 60.0
        self.state = "running"

    def step(self, t: float, dt: float) -> None:
        self.setpoint = 180.0 if int(t // 30) % 2 == 0 else 220.0
        self.door_open = (t % 20.0) < 3.0
        self.heating = self.temp < self.setpoint and not self.door_open
        # first-order heating and cooling, towards the setpoint or towards the room
        target = self.setpoint + 10.0 if self.heating else 20.0
        rate = 0.15 if not self.door_open else 0.4
        self.temp += (target - self.temp) * min(1.0, rate * dt)
        self.state = "changeover" if (t % 45.0) >= 40.0 else "running"
        if self.state == "running":
            self.speed = min(90.0, max(30.0, self.speed + self.rng.uniform(-1.5, 1.5)))
            self.count += 1
        else:
            self.speed = 0.0


class OpcUaDemoSimulator:
    """The in-process server and the two device tables reading it (see the module doc)."""

    name = "opcua"

    def __init__(self, seed: int | None = None):
        self.port = _free_port()
        self.url = f"opc.tcp://127.0.0.1:{self.port}/plantbus-demo/"
        self._plant = _Plant(random.Random(seed))
        self._server: Any = None
        self._nodes: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None

    def device_config(self) -> str:
        """Two ``[[devices.opcua]]`` tables: ``oven4`` polled, ``line5`` subscribed."""
        node = f"nsu={NAMESPACE};s="
        return (
            "[[devices.opcua]]\n"
            'name = "oven4"\n'
            'topic = "demo/opcua/oven4"\n'
            f'url = "{self.url}"\n'
            'interval = "500ms"\n'
            'tags = { line = "L3" }\n'
            "points = [\n"
            f'  {{ name = "temp", node = "{node}Oven4.Temp" }},\n'
            f'  {{ name = "setpoint", node = "{node}Oven4.Setpoint" }},\n'
            f'  {{ name = "heating", node = "{node}Oven4.Heating" }},\n'
            f'  {{ name = "door_open", node = "{node}Oven4.DoorOpen" }},\n'
            "]\n\n"
            "[[devices.opcua]]\n"
            'name = "line5"\n'
            'topic = "demo/opcua/line5"\n'
            f'url = "{self.url}"\n'
            'mode = "subscribe"\n'
            'interval = "250ms"\n'
            'tags = { line = "L5" }\n'
            "points = [\n"
            f'  {{ name = "count", node = "{node}Line5.Count" }},\n'
            f'  {{ name = "speed", node = "{node}Line5.Speed", deadband = 0.5 }},\n'
            f'  {{ name = "state", node = "{node}Line5.State" }},\n'
            "]\n"
        )

    async def start(self) -> None:
        from asyncua import Server, ua

        server = Server()
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("plantbus demo")
        idx = await server.register_namespace(NAMESPACE)
        p = self._plant
        layout = {
            "Oven4": [
                ("Temp", p.temp, ua.VariantType.Double),
                ("Setpoint", p.setpoint, ua.VariantType.Double),
                ("Heating", p.heating, ua.VariantType.Boolean),
                ("DoorOpen", p.door_open, ua.VariantType.Boolean),
            ],
            "Line5": [
                ("Count", p.count, ua.VariantType.Int64),
                ("Speed", p.speed, ua.VariantType.Double),
                ("State", p.state, ua.VariantType.String),
            ],
        }
        for obj_name, variables in layout.items():
            obj = await server.nodes.objects.add_object(idx, obj_name)
            for name, value, vtype in variables:
                key = f"{obj_name}.{name}"
                node = await obj.add_variable(
                    ua.NodeId(key, idx), ua.QualifiedName(name, idx), ua.Variant(value, vtype)
                )
                self._nodes[key] = (node.nodeid, vtype)
        self._server = server
        await self._write(datetime.now(UTC))  # one source time from the first read on
        await server.start()
        self._task = asyncio.create_task(self._run(), name="opcua demo simulator")

    async def _run(self) -> None:
        p = self._plant
        t0 = last = time.monotonic()
        while True:
            await asyncio.sleep(UPDATE_INTERVAL)
            now = time.monotonic()
            p.step(now - t0, now - last)
            last = now
            await self._write(datetime.now(UTC))

    async def _write(self, stamp: datetime) -> None:
        """Write the plant's state, every value with the same source timestamp."""
        from asyncua import ua

        p = self._plant
        values = {
            "Oven4.Temp": round(p.temp, 2),
            "Oven4.Setpoint": p.setpoint,
            "Oven4.Heating": p.heating,
            "Oven4.DoorOpen": p.door_open,
            "Line5.Count": p.count,
            "Line5.Speed": round(p.speed, 2),
            "Line5.State": p.state,
        }
        for key, value in values.items():
            nodeid, vtype = self._nodes[key]
            dv = ua.DataValue(
                ua.Variant(value, vtype), SourceTimestamp=stamp, ServerTimestamp=stamp
            )
            await self._server.write_attribute_value(nodeid, dv)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            await self._server.stop()
            self._server = None


def demo_simulator() -> OpcUaDemoSimulator:
    """The demo's OPC UA simulator (raises ImportError without the ``opcua`` extra)."""
    import asyncua  # noqa: F401 - fail here, so the demo leaves the simulator out with a note

    return OpcUaDemoSimulator()
