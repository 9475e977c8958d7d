"""The S7 demo simulator: a real python-snap7 server in-process that the real connector reads,
with values that move; registered for ``plantbus demo``."""

from __future__ import annotations

import importlib
from pathlib import Path

from s7_harness import running, wait_for

from plantbus.broker.config import parse_config
from plantbus.broker.demo import load_simulators
from plantbus.broker.record import Quality
from plantbus.connectors.s7.demo import POINTS, S7DemoSimulator, demo_simulator


async def test_the_demo_simulator_is_read_by_the_real_connector(tmp_path: Path) -> None:
    sim = demo_simulator()
    assert sim.port != 102  # a free loopback port, no root needed
    config = parse_config(
        f'[node]\nname = "demo"\nstate_dir = "{tmp_path}"\n\n{sim.device_config()}',
        tmp_path / "demo.toml",
    )
    (entry,) = config.devices
    assert entry.kind == "s7" and entry.config.topic.startswith("demo/")
    await sim.start()
    try:
        async with running(entry.config) as dev:
            await wait_for(lambda: len(dev.records) >= 2, "two polls")
            first = dev.records[0]
            # the simulated clock moves on at least every 100 ms; polls are 250 ms apart
            await wait_for(
                lambda: dev.records[-1].fields["plc_clock"] != first.fields["plc_clock"],
                "a value that moved",
            )
            last = dev.records[-1]
    finally:
        await sim.stop()
    assert set(first.fields) == {name for name, _, _ in POINTS}
    assert first.quality is Quality.GOOD and last.quality is Quality.GOOD
    assert 20.0 <= first.fields["temp"] <= 80.0  # type: ignore[operator]
    assert first.fields["recipe"] in ("COLA-0.5L", "WATER-1L")
    assert last.fields["plc_clock"] > first.fields["plc_clock"]  # type: ignore[operator]
    assert last.fields["bottles"] >= first.fields["bottles"]  # type: ignore[operator]


def test_the_module_offers_what_plantbus_demo_loads() -> None:
    """``registry.DEMO_SIMULATORS["s7"]`` names this module: ``demo_simulator()`` returns a
    ``DemoSimulator`` with its port picked, so its device table is known before it starts."""
    module = importlib.import_module("plantbus.connectors.s7.demo")
    sim = module.demo_simulator()
    assert isinstance(sim, S7DemoSimulator) and isinstance(sim.name, str)
    assert sim.device_config().startswith("[[devices.s7]]\n")
    assert f"port = {sim.port}\n" in sim.device_config()


def test_plantbus_demo_runs_the_s7_simulator() -> None:
    sims, notes = load_simulators()
    assert any(isinstance(s, S7DemoSimulator) for s in sims), notes
