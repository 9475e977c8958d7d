"""The s7 device's config: keys, TSAPs, messages with file and key path, the shipped sample,
the registry, and no driver import at check time. Also the status codes and the reply parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from plantbus.broker import registry
from plantbus.broker.config import ConfigError, check_config, parse_config
from plantbus.connectors.s7 import Config, build
from plantbus.connectors.s7.connector import parse_tsap
from plantbus.connectors.s7.link import _parse_items
from plantbus.connectors.s7.status import describe, header_error_status, item_status

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "connectors" / "s7" / "sample.toml"
HEAD = '[node]\nname = "edge"\n\n[[devices.s7]]\nname = "press7"\nhost = "10.0.0.7"\n'


def errors(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(HEAD + extra, "conf.d/press7.toml")
    return e.value.errors


def config(**kw: object) -> Config:
    kw.setdefault("name", "press7")
    kw.setdefault("host", "10.0.0.7")
    kw.setdefault("points", [{"name": "a", "address": "DB1.DBW0"}])
    return Config.model_validate(kw)


def test_defaults() -> None:
    c = config()
    assert (c.port, c.timeout, c.interval, c.pdu_size, c.max_gap) == (102, 3.0, 1.0, 960, 16)
    assert c.tsaps() == (0x0100, 0x0101)  # PG, rack 0, slot 1


@pytest.mark.parametrize(
    ("keys", "tsaps"),
    [
        ({"rack": 0, "slot": 2}, (0x0100, 0x0102)),  # an S7-300
        ({"rack": 1, "slot": 3, "connection_type": "op"}, (0x0100, 0x0223)),
        ({"slot": 1, "connection_type": "basic"}, (0x0100, 0x0301)),
        ({"local_tsap": "10.00", "remote_tsap": "20.00"}, (0x1000, 0x2000)),  # a LOGO!
        ({"remote_tsap": "0x0302"}, (0x0100, 0x0302)),
        ({"local_tsap": 512, "remote_tsap": 0x0301}, (0x0200, 0x0301)),
    ],
)
def test_tsaps(keys: dict[str, object], tsaps: tuple[int, int]) -> None:
    assert config(**keys).tsaps() == tsaps


def test_tsap_forms() -> None:
    assert parse_tsap("01.00") == parse_tsap("0x0100") == parse_tsap("100") == 256
    for bad in ("1.2.3", "0x10000", -1, True, 1.5):
        with pytest.raises(ValueError):
            parse_tsap(bad)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'points = [{ name = "f", address = "DB1.DBW4", type = "real" }]',
            "devices.s7[0].points[0].type: address 'DB1.DBW4': type real is 4 bytes but a W "
            "address is 2: use DB1.DBD4",
        ),
        (
            'points = [{ name = "f", address = "DB1.DBX4" }]',
            "devices.s7[0].points[0].address: address 'DB1.DBX4': a bit address needs its bit",
        ),
        (
            'points = [{ name = "f", address = "DB1.DBW4", type = "float" }]',
            "devices.s7[0].points[0].type: unknown S7 type 'float'",
        ),
        (
            'points = [{ name = "f\\\\", address = "DB1.DBW4" }]',
            "devices.s7[0].points[0].name: point name 'f\\\\' ends with a backslash",
        ),
        (
            'points = [{ name = "f", address = "MW0" }, { name = "f", address = "MW2" }]',
            "devices.s7[0]: point name 'f' is used twice",
        ),
        (
            'rack = 0\nremote_tsap = "03.01"\npoints = [{ name = "f", address = "MW0" }]',
            "devices.s7[0]: set either rack and slot or remote_tsap, not both",
        ),
        (
            'remote_tsap = "zz"\npoints = [{ name = "f", address = "MW0" }]',
            "devices.s7[0].remote_tsap: TSAP 'zz' is not a number",
        ),
        (
            'timeout = "0s"\npoints = [{ name = "f", address = "MW0" }]',
            "devices.s7[0].timeout: timeout must be longer than 0s",
        ),
        (
            'pdu_size = 100\npoints = [{ name = "f", address = "MW0" }]',
            "devices.s7[0].pdu_size: must be greater than or equal to 240",
        ),
        ("points = []", "devices.s7[0].points: must not be empty"),
        ('points = [{ name = "f", adress = "MW0" }]', "points[0].adress: unknown key"),
    ],
)
def test_mistakes_name_the_file_and_key(extra: str, message: str) -> None:
    errs = errors(extra)
    assert any(e.startswith("press7.toml: ") and message in e for e in errs), errs


def test_the_sample_passes_check(tmp_path: Path) -> None:
    assert check_config(SAMPLE) == []
    out = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "check", "-c", str(SAMPLE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "config OK: 1 device" in out.stdout + out.stderr


def test_check_does_not_load_the_driver() -> None:
    code = (
        "import sys\n"
        "from plantbus.broker.config import check_config\n"
        f"assert check_config({str(SAMPLE)!r}) == []\n"
        "assert not any(m == 'snap7' or m.startswith('snap7.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_kind_is_registered() -> None:
    module = registry.load_device_module("s7")
    assert module.Config is Config and module.build is build
    assert registry.DEMO_SIMULATORS["s7"] == "plantbus.connectors.s7.demo"


def test_status_codes_are_opc_ua_bad_codes_with_the_s7_reason() -> None:
    assert item_status(0x0A) == 0x8034000A  # Bad_NodeIdUnknown
    assert item_status(0x05) == 0x80370005  # Bad_IndexRangeNoData
    assert item_status(0x03) == 0x803A0003  # Bad_NotReadable
    assert item_status(0x42) == 0x80010042  # Bad_UnexpectedError
    assert header_error_status(0x8104) == 0x80058104  # Bad_CommunicationError
    for code in (item_status(0x0A), header_error_status(0x8500)):
        assert code >> 30 == 0b10  # severity Bad
    assert describe(item_status(0x0A)) == "Bad_NodeIdUnknown (S7 0x0A object does not exist)"
    assert describe(0x800A0000) == "Bad_Timeout"


def test_read_replies_are_split_per_item() -> None:
    raw = bytes.fromhex(
        "ff04 0028 0102030405 00"  # 5 bytes (40 bits), then a fill byte
        "0a00 0000"  # item 2: object does not exist
        "ff09 0002 aabb"  # transport 9 (octet string): length in bytes
        "ff03 0001 01"  # transport 3 (bit): 1 bit, 1 byte, the last item: no fill byte
    )
    assert _parse_items(raw, [5, 4, 2, 1]) == [
        (0xFF, bytes.fromhex("0102030405")),
        (0x0A, b""),
        (0xFF, bytes.fromhex("aabb")),
        (0xFF, b"\x01"),
    ]
    with pytest.raises(ValueError, match="holds 5 bytes, 6 were asked for"):
        _parse_items(raw, [6, 4, 2, 1])
    with pytest.raises(ValueError, match="item 4 missing"):
        _parse_items(raw, [5, 4, 2, 1, 1])
