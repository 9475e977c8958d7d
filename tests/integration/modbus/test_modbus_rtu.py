"""Modbus RTU on a serial line: a pymodbus ``ModbusSerialServer`` with units 1-3 on one end
of a socat pty pair, the devices on the other end, sharing the line."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest
from modbus_servers import ServerThread, eventually

from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality, Record
from plantbus.connectors.modbus import Config, ModbusConnector, build
from plantbus.connectors.modbus.connector import DeviceSilent
from plantbus.connectors.modbus.status import BAD_TIMEOUT

CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))

Line = tuple[str, ServerThread]
# Linux ptys refuse even parity (tcsetattr EINVAL), the spec's default; the line runs 8N1
LINE = {"baudrate": 115200, "parity": "N"}


def device(port: str, unit: int, **kw: Any) -> ModbusConnector:
    kw.setdefault("name", f"u{unit}")
    kw.setdefault(
        "points",
        [
            {"name": "a", "address": 0},
            {"name": "b", "address": 10, "type": "uint32"},
            {"name": "c", "address": 30, "type": "int16"},
        ],
    )
    kw.setdefault("timeout", "500ms")
    config = Config.model_validate(
        {"transport": "rtu", "serial": {"port": port, **LINE}, "unit": unit, **kw}
    )
    return build(config, CTX)


def expect(unit: int) -> dict[str, int]:
    base = unit * 100
    return {"a": base, "b": ((base + 10) << 16) | (base + 11), "c": base + 30}


async def run_all(
    devices: list[ModbusConnector], until: int, limit: float = 20
) -> dict[str, list[Record]]:
    """Run ``devices`` until one has emitted ``until`` records; their records by device."""
    got: dict[str, list[Record]] = {d.name: [] for d in devices}

    async def emit(records: list[Record]) -> None:
        got[records[0].series.tag_dict["device"]].extend(records)

    tasks = [asyncio.create_task(d.run(emit)) for d in devices]
    try:
        await eventually(lambda: max(len(v) for v in got.values()) >= until, limit)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


async def test_units_on_a_serial_line_decode_what_the_server_holds(serial_line: Line) -> None:
    port, _ = serial_line
    for unit in (1, 2, 3):
        dev = device(port, unit)
        async with dev.link.use():
            record = await dev.poll()
        assert record.fields == expect(unit) and record.quality is Quality.GOOD


async def test_devices_on_one_bus_are_served_fairly_one_request_at_a_time(
    serial_line: Line,
) -> None:
    port, _ = serial_line
    devices = [device(port, u, interval="0s") for u in (1, 2, 3)]
    link = devices[0].link
    assert all(d.link is link for d in devices)
    link.trace = []
    try:
        got = await run_all(devices, until=30)
    finally:
        trace, link.trace = link.trace, None
    counts = sorted(len(v) for v in got.values())
    assert counts[0] >= counts[-1] - 2, counts  # round-robin: nobody falls behind
    for name, records in got.items():
        unit = int(name[1:])
        assert all(r.fields == expect(unit) for r in records)
    # one request in flight: each transaction starts after the previous one ended
    assert link.max_in_flight == 1
    assert all(b[1] >= a[2] for a, b in itertools.pairwise(trace))
    # turns rotate: within a window of 3 consecutive requests, 3 different devices
    owners = [t[0].name for t in trace[6:-6]]
    windows = [set(owners[i : i + 3]) for i in range(len(owners) - 2)]
    assert sum(len(w) == 3 for w in windows) >= 0.9 * len(windows)


async def test_the_inter_frame_delay_keeps_the_line_silent(serial_line: Line) -> None:
    port, _ = serial_line
    dev = device(port, 2, interval="0s", frame_delay="15ms")
    dev.link.trace = []
    try:
        await run_all([dev], until=5)
    finally:
        trace, dev.link.trace = dev.link.trace, None
    gaps = [b[1] - a[2] for a, b in itertools.pairwise(trace)]
    assert len(gaps) >= 10
    assert min(gaps) >= 0.015 - 0.0005, gaps


async def test_a_dead_unit_gets_its_turns_then_leaves_the_bus_to_the_others(
    serial_line: Line,
) -> None:
    port, _ = serial_line
    one = [{"name": "a", "address": 0}]
    dead = device(port, 7, name="dead", timeout="100ms", interval="0s", points=one)
    live = device(port, 1, interval="0s", points=one)
    got: dict[str, list[Record]] = {"dead": [], "u1": []}

    async def emit(records: list[Record]) -> None:
        got[records[0].series.tag_dict["device"]].extend(records)

    live_task = asyncio.create_task(live.run(emit))
    try:
        with pytest.raises(DeviceSilent):
            async with asyncio.timeout(10):
                await dead.run(emit)
        # round-robin: while the dead unit ran into its timeouts, the live one had a turn
        # after each of them
        during = len(got["u1"])
        assert during >= 2
        # then the dead unit is the supervisor's to back off, and the bus is the live one's
        await eventually(lambda: len(got["u1"]) >= during + 50, 5)
    finally:
        live_task.cancel()
        await asyncio.gather(live_task, return_exceptions=True)
    assert len(got["dead"]) == 3
    assert all(r.status == {"a": BAD_TIMEOUT} and r.fields == {} for r in got["dead"])
    assert all(r.fields == {"a": 100} and r.quality is Quality.GOOD for r in got["u1"])


def test_devices_on_one_serial_port_need_the_same_line_settings(serial_line: Line) -> None:
    port, _ = serial_line
    first = device(port, 1)
    other = Config.model_validate(
        {
            "name": "x",
            "transport": "rtu",
            "serial": {"port": port, **LINE, "baudrate": 9600},
            "points": [{"name": "a", "address": 0}],
        }
    )
    with pytest.raises(ValueError, match="every device on one serial line needs the same"):
        build(other, CTX)
    assert device(port, 2).link is first.link  # the same settings share the line
