"""``plantbus discover opcua`` against a real server, and the demo's OPC UA simulator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from opcua_harness import CTX, UaServer, running

from plantbus.broker.config import parse_config

PLANTBUS = [sys.executable, "-m", "plantbus.broker.cli"]


def plantbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PLANTBUS, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


async def test_discover_prints_a_snippet_that_check_accepts_and_that_reads(
    ua_server: UaServer, tmp_path: Path
) -> None:
    out = plantbus("discover", "opcua", ua_server.url, "--name", "press7", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"# plantbus discover opcua {ua_server.url}: ")
    assert '[[devices.opcua]]\nname = "press7"\n' in text
    assert '{ name = "Line1.Temp", node = "ns=2;s=Line1.Temp" },  # Double\n' in text
    assert '{ name = "Line1.Numeric", node = "ns=2;i=1001" },  # Double\n' in text
    assert (
        '{ name = "Line1.Vector", node = "ns=2;s=Line1.Vector" },  # Double[] (read as JSON' in text
    )
    assert '{ name = "Bulk.v19", node = "ns=2;s=Bulk.v19" },' in text
    assert "ns=0;" not in text and "i=2258" not in text  # not the server's own nodes

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "plantbus.toml").write_text('[node]\nname = "edge"\nstate_dir = "state"\n')
    (tmp_path / "conf.d" / "press7.toml").write_text(text)
    check = plantbus("check", "-c", "plantbus.toml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "config OK: 1 device, 0 sinks"

    config = parse_config(text, tmp_path / "conf.d" / "press7.toml").devices[0].config
    async with running(config) as (_, records):
        await records.wait(lambda: records.last("Line1.Temp") == 21.5, what="Line1.Temp")
    assert records.last("Line1.Name") == "press 7"


def test_discover_stops_at_the_limit_and_says_so(ua_server: UaServer, tmp_path: Path) -> None:
    out = plantbus("discover", "opcua", ua_server.url, "--limit", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "# stopped at --limit 3: narrow it with --root, or raise --limit" in out.stdout
    assert out.stdout.count("node = ") == 3


def test_discover_from_a_root_node(ua_server: UaServer, tmp_path: Path) -> None:
    out = plantbus(
        "discover", "opcua", ua_server.url, "--root", "i=85", "--depth", "1", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "# no variables found" in out.stdout  # at depth 1 there are only the objects


def test_discover_errors_are_one_line_and_exit_1(ua_server: UaServer, tmp_path: Path) -> None:
    out = plantbus("discover", "opcua", ua_server.url, "--root", "ns=2;s=Nope", cwd=tmp_path)
    assert out.returncode == 1
    # asyncua answers BadNodeIdInvalid where other servers say BadNodeIdUnknown
    assert out.stderr.strip() == (
        "discover opcua: cannot browse ns=2;s=Nope: BadNodeIdInvalid (0x80330000)"
    )
    out = plantbus("discover", "opcua", "opc.tcp://127.0.0.1:9/", "--timeout", "2", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("discover opcua: cannot connect to opc.tcp://127.0.0.1:9/: ")
    assert "Traceback" not in out.stderr


async def test_the_demo_simulator_is_read_by_both_devices(tmp_path: Path) -> None:
    from plantbus.broker.demo import demo_config
    from plantbus.connectors.opcua.demo import demo_simulator

    sim = demo_simulator()
    config = demo_config(tmp_path, simulators=[sim])  # what `plantbus demo` runs
    oven4, line5 = (d.config for d in config.devices if d.kind == "opcua")
    assert (oven4.mode, line5.mode) == ("poll", "subscribe")
    assert oven4.topic.startswith("demo/") and line5.topic.startswith("demo/")
    await sim.start()
    try:
        async with running(oven4) as (_, oven), running(line5) as (_, line):
            await oven.wait(lambda: len(oven.batches) >= 2, what="two polls of oven4")
            await line.wait(
                lambda: len({r.fields.get("count") for r in line.records} - {None}) >= 2,
                what="line5's count moving",
            )
    finally:
        await sim.stop()
    # the simulator writes all values with one source time: one record per poll
    record = oven.batches[1][0]
    assert len(oven.batches[1]) == 1
    assert set(record.fields) == {"temp", "setpoint", "heating", "door_open"}
    assert isinstance(record.fields["temp"], float) and isinstance(record.fields["heating"], bool)
    assert record.series.topic == "demo/opcua/oven4"
    assert record.series.tag_dict["line"] == "L3"
    assert all(isinstance(r.fields.get("count", 0), int) for r in line.records)
    assert CTX.node_name == "edge"  # the harness builds with its own node, not the demo's
