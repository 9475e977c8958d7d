"""The ``modbus`` device's config: what `plantbus check` accepts and refuses, and how it says so."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from plantbus.broker.config import ConfigError, check_config, parse_config
from plantbus.connectors.modbus import Config

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "connectors" / "modbus" / "sample.toml"


def config(**kw: Any) -> Config:
    kw.setdefault("name", "dev")
    kw.setdefault("host", "10.0.0.7")
    kw.setdefault("points", [{"name": "v", "address": 0}])
    return Config.model_validate(kw)


def test_defaults() -> None:
    c = config()
    assert (c.transport, c.port, c.unit, c.timeout) == ("tcp", 502, 1, 1.0)
    assert (c.max_registers_per_request, c.max_gap) == (125, 0)
    assert (c.byte_order, c.word_order, c.interval) == ("big", "big", 1.0)
    p = c.points[0]
    assert (p.area, p.kind, p.registers) == ("holding", "uint16", 1)
    assert c.effective_frame_delay() == 0.0


def test_rtu_line_defaults_and_frame_delay() -> None:
    c = config(host=None, transport="rtu", serial={"port": "/dev/ttyUSB0"})
    assert c.serial is not None
    assert (c.serial.baudrate, c.serial.parity, c.serial.stopbits, c.serial.bytesize) == (
        19200,
        "E",
        1,
        8,
    )
    # 3.5 characters of 11 bits at 19200 baud
    assert c.effective_frame_delay() == pytest.approx(3.5 * 11 / 19200)
    fast = config(host=None, transport="rtu", serial={"port": "/dev/ttyS1", "baudrate": 115200})
    assert fast.effective_frame_delay() == 0.00175
    assert config(frame_delay="5ms").effective_frame_delay() == 0.005


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (
            {"name": "x", "area": "coil", "address": 0, "type": "uint16"},
            'a coil is one bit: its type is "bool"',
        ),
        (
            {"name": "x", "area": "discrete", "address": 0, "scale": 2},
            "scale does not apply to a discrete",
        ),
        ({"name": "x", "area": "coil", "address": 0, "bit": 1}, "bit does not apply to a coil"),
        (
            {"name": "x", "address": 0, "type": "int32", "bit": 3},
            "its type is \"bool\", not 'int32'",
        ),
        ({"name": "x", "address": 0, "bit": 16}, "bit"),
        ({"name": "x", "address": 0, "type": "string"}, "a string needs length"),
        (
            {"name": "x", "address": 0, "type": "uint16", "length": 2},
            'length applies only to type "string"',
        ),
        (
            {"name": "x", "address": 0, "type": "int16", "word_order": "little"},
            "word_order applies only to 32- and 64-bit types",
        ),
        (
            {"name": "x", "address": 0, "type": "string", "length": 2, "scale": 2},
            "scale and offset apply only to numbers",
        ),
        (
            {"name": "x", "address": 0, "type": "bool", "offset": 1},
            "scale and offset apply only to numbers",
        ),
        ({"name": "x", "address": 0, "scale": 0}, "scale 0 would make every value"),
        ({"name": "x", "address": 0, "scale": float("nan")}, "finite"),
        (
            {"name": "x", "address": 65535, "type": "float32"},
            "registers 65535-65536 run past the last address 65535",
        ),
        ({"name": "x", "address": 65536}, "address"),
        ({"name": "x", "address": -1}, "address"),
        ({"name": "x", "address": 0, "type": "float16"}, "type"),
        ({"name": "x", "address": 0, "area": "holdings"}, "area"),
        ({"name": "x", "address": 0, "byte_order": "middle"}, "byte_order"),
        ({"name": "x", "address": 0, "adress": 1}, "adress"),
        (
            {"name": "x\\", "address": 0},
            "cannot be written in line protocol: it ends with a backslash",
        ),
        ({"name": "time", "address": 0}, "which InfluxDB refuses as a field key"),
        ({"name": "", "address": 0}, "name"),
    ],
)
def test_point_errors(point: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        config(points=[point])
    assert message in str(exc.value)


def test_the_last_registers_are_addressable() -> None:
    c = config(points=[{"name": "x", "address": 65534, "type": "float32"}])
    assert c.points[0].registers == 2


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"points": []}, "points"),
        (
            {"points": [{"name": "a", "address": 0}, {"name": "a", "address": 1}]},
            "point name 'a' is used twice (points[0] and points[1])",
        ),
        ({"host": None}, "transport 'tcp' needs host"),
        ({"transport": "rtu-over-tcp", "host": None}, "transport 'rtu-over-tcp' needs host"),
        ({"transport": "rtu"}, 'transport "rtu" needs serial'),
        (
            {"transport": "rtu", "serial": {"port": "/dev/ttyS0"}},
            'host does not apply to transport "rtu"',
        ),
        (
            {"host": None, "transport": "rtu", "port": 502, "serial": {"port": "/dev/ttyS0"}},
            'port does not apply to transport "rtu"',
        ),
        (
            {"host": None, "transport": "rtu", "unit": 0, "serial": {"port": "/dev/ttyS0"}},
            "a serial line addresses units 1-247",
        ),
        ({"serial": {"port": "/dev/ttyS0"}}, "serial does not apply to transport 'tcp'"),
        (
            {"host": None, "transport": "rtu", "serial": {"port": "/dev/ttyS0", "parity": "even"}},
            "parity",
        ),
        (
            {"host": None, "transport": "rtu", "serial": {"port": "/dev/ttyS0", "stopbits": 3}},
            "stopbits",
        ),
        ({"transport": "udp"}, "transport"),
        ({"unit": 256}, "unit"),
        ({"port": 0}, "port"),
        ({"timeout": "0s"}, "timeout must be longer than 0s"),
        ({"max_registers_per_request": 126}, "max_registers_per_request"),
        ({"max_gap": -1}, "max_gap"),
        (
            {
                "max_registers_per_request": 10,
                "points": [{"name": "s", "address": 0, "type": "string", "length": 20}],
            },
            "a string of 20 registers does not fit in one request (max_registers_per_request = 10)",
        ),
        ({"baudrate": 9600}, "baudrate"),
    ],
)
def test_device_errors(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        config(**keys)
    assert message in str(exc.value)


def test_errors_name_the_file_and_key_path(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """
        [node]
        name = "edge"
        [[devices.modbus]]
        name = "press7"
        host = "10.0.0.7"
        points = [
          { name = "ok", address = 0 },
          { name = "bad", area = "coil", address = 1, type = "float32" },
        ]
        """
    )
    with pytest.raises(ConfigError) as exc:
        parse_config(text, tmp_path / "plantbus.toml")
    (message,) = exc.value.messages
    assert message.startswith("plantbus.toml: devices.modbus[0].points[1]: ")
    assert 'a coil is one bit: its type is "bool"' in message


def test_the_sample_passes_check_without_loading_pymodbus(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "modbus.toml").write_text(SAMPLE.read_text())
    main = tmp_path / "plantbus.toml"
    main.write_text('[node]\nname = "edge"\n')
    assert check_config(main) == []
    code = (
        "import sys\n"
        "from plantbus.broker.cli import main\n"
        f"rc = main(['check', '-c', {str(main)!r}])\n"
        "assert 'pymodbus' not in sys.modules, 'check imported pymodbus'\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "config OK: 2 devices, 0 sinks\n"
