"""Faults: late replies, cut connections, hung peers, dead devices.

The normal path runs against the real pymodbus servers; the faults come from ``ModbusProxy``
(delays a reply, cuts, swallows) in front of them, and from closed ports.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from modbus_servers import ModbusProxy, ServerThread, eventually

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality, Record
from plantbus.connectors.modbus import Config, ModbusConnector, build
from plantbus.connectors.modbus.connector import SILENT_POLLS, DeviceSilent
from plantbus.connectors.modbus.link import NotConnected
from plantbus.connectors.modbus.status import BAD_CONNECTION_CLOSED, BAD_TIMEOUT

CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))
# unit 4 of the session servers: holding 0-9 = 400..409, 20-29 = 420..429
A = (400 << 16) | 401
B = (420 << 16) | 421
POINTS = [
    {"name": "a", "address": 0, "type": "uint32"},
    {"name": "b", "address": 20, "type": "uint32"},
]


def device(port: int, transport: str = "tcp", **kw: Any) -> ModbusConnector:
    kw.setdefault("name", "dev")
    kw.setdefault("points", POINTS)
    config = Config.model_validate(
        {"transport": transport, "host": "127.0.0.1", "port": port, "unit": 4, **kw}
    )
    return build(config, CTX)


class Collect:
    """An emit that keeps the records and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    async def __call__(self, records: list[Record]) -> None:
        self.records.extend(records)

    async def wait(self, n: int, limit: float = 10) -> None:
        await eventually(lambda: len(self.records) >= n, limit)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- a late reply is never taken for the answer to a newer request ------------------------------


@pytest.mark.parametrize("transport", ["rtu-over-tcp", "tcp"])
async def test_a_late_reply_is_never_taken_for_a_newer_request(
    transport: str, tcp_server: ServerThread, rtu_over_tcp_server: ServerThread
) -> None:
    server = rtu_over_tcp_server if transport == "rtu-over-tcp" else tcp_server
    async with ModbusProxy(server.port) as proxy:
        proxy.delay_reply(1, 0.45)  # the reply to `a` of the first poll comes 0.15 s too late
        dev = device(proxy.port, transport, timeout="300ms", interval="50ms")
        out = Collect()
        task = asyncio.create_task(dev.run(out))
        try:
            await out.wait(6)
            await eventually(lambda: proxy.count("late-dropped"), 5)
        finally:
            await stop(task)
    first, *rest = out.records
    assert first.fields == {} and first.quality is Quality.BAD
    assert first.status == {"a": BAD_TIMEOUT, "b": BAD_TIMEOUT}
    assert all(r.fields == {"a": A, "b": B} and r.quality is Quality.GOOD for r in rest)
    # the request after the timeout went out on a new connection; the late reply found the
    # old one closed
    assert proxy.conn_of_requests()[:3] == [1, 2, 2]
    assert proxy.count("late-delivered") == 0 and proxy.count("late-dropped") == 1


async def test_the_proxy_really_makes_a_naive_client_take_the_late_reply(
    rtu_over_tcp_server: ServerThread,
) -> None:
    """Control for the test above: without the teardown the late reply answers the next read."""
    from pymodbus.client import AsyncModbusTcpClient
    from pymodbus.exceptions import ModbusIOException
    from pymodbus.framer import FramerType

    async with ModbusProxy(rtu_over_tcp_server.port) as proxy:
        proxy.delay_reply(1, 0.45)
        client = AsyncModbusTcpClient(
            "127.0.0.1", port=proxy.port, framer=FramerType.RTU, timeout=0.3, retries=0
        )
        assert await client.connect()
        try:
            with pytest.raises(ModbusIOException):
                await client.read_holding_registers(0, count=2, device_id=4)
            wrong = await client.read_holding_registers(20, count=2, device_id=4)
        finally:
            client.close()
    assert wrong.registers == [400, 401]  # `a`'s registers, taken for `b`'s


# -- a cut connection -------------------------------------------------------------------------


async def test_a_cut_connection_fails_the_read_at_once_and_the_next_poll_reconnects(
    tcp_server: ServerThread,
) -> None:
    async with ModbusProxy(tcp_server.port) as proxy:
        proxy.cut_at(2)  # `b` of the first poll
        dev = device(proxy.port, timeout="5s")
        async with dev.link.use():
            t = time.monotonic()
            first = await dev.poll()
            took = time.monotonic() - t
            second = await dev.poll()
    assert first.fields == {"a": A}
    assert first.status == {"b": BAD_CONNECTION_CLOSED}
    assert took < 2.5, f"the cut was noticed only after {took:.1f}s (timeout 5s)"
    assert second.fields == {"a": A, "b": B} and second.quality is Quality.GOOD
    assert proxy.connections == 2


# -- a hung peer --------------------------------------------------------------------------------


async def test_a_silent_device_is_handed_to_the_supervisor_after_some_polls(
    tcp_server: ServerThread,
) -> None:
    async with ModbusProxy(tcp_server.port) as proxy:
        proxy.swallow_from(1)
        dev = device(proxy.port, timeout="100ms", interval="10ms")
        out = Collect()
        with pytest.raises(DeviceSilent, match=f"answered none of the last {SILENT_POLLS} polls"):
            async with asyncio.timeout(10):
                await dev.run(out)
    assert len(out.records) == SILENT_POLLS
    assert all(r.status == {"a": BAD_TIMEOUT, "b": BAD_TIMEOUT} for r in out.records)
    # every timeout tore its connection down: one connection per poll
    assert proxy.connections == SILENT_POLLS
    assert dev.link.timeouts >= SILENT_POLLS


# -- a dead device ------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_attempts_wait_out_a_jittered_backoff() -> None:
    dev = device(closed_port())
    link = dev.link
    async with link.use():
        with pytest.raises(NotConnected, match="cannot connect"):
            await dev.poll()
        # within the backoff window a poll fails at once, without touching the network
        with pytest.raises(NotConnected, match=r"next attempt in \d+\.\ds"):
            await dev.poll()
    assert link.connect_failures == 1


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_dead_devices_cost_the_daemon_almost_no_cpu(tmp_path: Path) -> None:
    """`plantbus run` with 3 units behind a dead gateway and 1 hung peer: CPU over 3 s."""
    refused = closed_port()
    # a listening socket that never accepts: connects succeed (the kernel's backlog),
    # requests are never answered
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    devices = "".join(
        textwrap.dedent(
            f"""
            [[devices.modbus]]
            name = "{name}"
            host = "127.0.0.1"
            port = {port}
            unit = {unit}
            interval = "100ms"
            timeout = "200ms"
            points = [{{ name = "v", address = 0 }}]
            """
        )
        for name, port, unit in [
            ("dead1", refused, 1),
            ("dead2", refused, 2),
            ("dead3", refused, 3),
            ("hung", hung.getsockname()[1], 1),
        ]
    )
    config = tmp_path / "plantbus.toml"
    config.write_text(
        textwrap.dedent(
            """
            [node]
            name = "edge"
            state_dir = "state"
            [api]
            enabled = false
            [[sinks.file]]
            path = "out.lp"
            """
        )
        + devices
    )
    log = tmp_path / "plantbus.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plantbus.broker.cli", "run", "-c", str(config)],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while "device hung failed" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3)
        cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
    finally:
        proc.terminate()
        proc.wait(20)
        hung.close()
    text = log.read_text()
    print(f"\ndead-device daemon CPU: {100 * cpu:.2f} % of a core (4 dead devices, 3 s)")
    assert cpu < 0.05, f"{100 * cpu:.1f} % of a core"
    # restarts back off: the delays logged for one device grow
    delays = [float(d) for d in re.findall(r"device dead1 failed: .*? in (\d+\.\d)s", text)]
    assert 1 <= len(delays) <= 8, text
    assert "NotConnected: tcp 127.0.0.1" in text and "DeviceSilent" in text
