"""``plantbus discover modbus`` against a real server, and the demo's Modbus simulator."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from modbus_servers import ServerThread, eventually

from plantbus.broker.cli import build_parser
from plantbus.broker.config import load_config
from plantbus.broker.connector import DiscoverError
from plantbus.broker.demo import demo_config
from plantbus.broker.record import Quality, Record
from plantbus.broker.runtime import Runtime
from plantbus.connectors.modbus.demo import demo_simulator
from plantbus.connectors.modbus.discover import discover, scan

PLANTBUS = [sys.executable, "-m", "plantbus.broker.cli"]


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["discover", "modbus", *argv])


# -- discover ----------------------------------------------------------------------------------


async def test_discover_finds_the_readable_ranges(tcp_server: ServerThread) -> None:
    a = args(
        "127.0.0.1",
        "--port",
        str(tcp_server.port),
        "--unit",
        "4",
        "--scan",
        "holding:0-999",
        "--scan",
        "coil:0-99",
    )
    holding, coils = await scan(a)
    # unit 4 maps holding 0-9 and 20-29 and no coils at the start
    assert holding.readable == [(0, 9), (20, 29)]
    assert holding.values[0] == 400 and holding.values[29] == 429
    assert coils.readable == [] and not coils.unsupported


def test_discover_prints_a_snippet_that_check_accepts(
    tcp_server: ServerThread, tmp_path: Path
) -> None:
    out = subprocess.run(
        [
            *PLANTBUS,
            "discover",
            "modbus",
            "127.0.0.1",
            "--port",
            str(tcp_server.port),
            "--unit",
            "2",
            "--scan",
            "holding:0-999",
            "--scan",
            "coil:0-15",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    snippet = out.stdout
    assert "# holding 0-999: 10 readable registers: 0-9" in snippet
    assert (
        '{ name = "holding_3", area = "holding", address = 3, type = "uint16" },  # 203' in snippet
    )
    assert '{ name = "coil_2", area = "coil", address = 2, type = "bool" },  # true' in snippet
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "found.toml").write_text(snippet)
    (tmp_path / "plantbus.toml").write_text('[node]\nname = "edge"\n')
    config = load_config(tmp_path / "plantbus.toml")
    (device,) = config.devices
    assert device.kind == "modbus" and device.config.port == tcp_server.port
    assert len(device.config.points) == 10 + 16


async def test_discover_reports_an_unreachable_unit() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DiscoverError, match="cannot connect"):
        await discover(args("127.0.0.1", "--port", str(port)))


def test_discover_cli_exits_1_with_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [*PLANTBUS, "discover", "modbus", "127.0.0.1", "--port", "1", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("discover modbus: tcp 127.0.0.1:1: cannot connect")
    assert "Traceback" not in out.stderr


def test_discover_refuses_a_bad_scan_range(tmp_path: Path) -> None:
    out = subprocess.run(
        [*PLANTBUS, "discover", "modbus", "h", "--scan", "holdings:0-9"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "expected AREA:FIRST-LAST" in out.stderr


# -- the demo simulator -----------------------------------------------------------------------


async def test_the_demo_simulator_is_read_by_the_real_connector(tmp_path: Path) -> None:
    sim = demo_simulator()
    config = demo_config(tmp_path / "demo", simulators=[sim])
    modbus = [d for d in config.devices if d.kind == "modbus"]
    assert [d.config.topic for d in modbus] == ["demo/modbus/press", "demo/modbus/meter"]
    runtime = Runtime(config)
    sub = runtime.bus.subscribe(["demo/modbus/#"], policy="drop_oldest")
    seen: dict[str, list[Record]] = {}

    def have(topic: str, n: int) -> bool:
        for r in sub.get_nowait():
            seen.setdefault(r.series.topic, []).append(r)
        return len(seen.get(topic, ())) >= n

    await sim.start()
    try:
        task = asyncio.create_task(runtime.run())
        await eventually(lambda: have("demo/modbus/press", 4) and have("demo/modbus/meter", 1))
        runtime.request_stop("test done")
        await task
    finally:
        await sim.stop()
    press = seen["demo/modbus/press"]
    assert all(r.quality is Quality.GOOD for r in press)
    last = press[-1].fields
    assert 20.0 <= last["temp"] <= 80.0 and 180.0 <= last["pressure"] <= 220.0
    assert last["state"] in ("RUN", "IDLE") and isinstance(last["running"], bool)
    assert isinstance(last["door_open"], bool) and isinstance(last["strokes"], int)
    meter = seen["demo/modbus/meter"][-1].fields
    assert 29.0 <= meter["power_kw"] <= 51.0 and 225.0 <= meter["voltage"] <= 235.0
    assert meter["energy_kwh"] >= 0
