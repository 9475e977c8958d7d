"""The ``opcua`` device's config as ``plantbus check`` sees it: the sample, node ids, URLs,
mode-specific keys, security, and the exact messages of mistakes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plantbus.broker.config import ConfigError, parse_config
from plantbus.connectors.opcua.config import NodeRef, parse_node_id

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "connectors" / "opcua" / "sample.toml"

DEVICE = """
[[devices.opcua]]
name = "press7"
url = "opc.tcp://10.0.0.21:4840"
points = [{ name = "temp", node = "ns=2;s=Line1.Temp" }]
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "/etc/plantbus/plantbus.toml")
    return info.value.errors


def device(**lines: str) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in lines.items())
    return DEVICE + extra


def test_the_sample_passes_plantbus_check(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "plantbus.toml").write_text('[node]\nname = "edge"\nstate_dir = "state"\n')
    shutil.copy(SAMPLE, tmp_path / "conf.d" / "opcua.toml")
    # in a fresh interpreter, so that what `check` imports can be seen
    code = (
        "import sys\n"
        "from plantbus.broker.cli import main\n"
        f"rc = main(['check', '-c', {str(tmp_path / 'plantbus.toml')!r}])\n"
        "assert 'asyncua' not in sys.modules, 'plantbus check imported asyncua'\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "config OK: 2 devices, 0 sinks"


def test_sample_values_and_defaults() -> None:
    config = parse_config(SAMPLE.read_text(), REPO / "conf.d" / "opcua.toml")
    press, oven = (d.config for d in config.devices)
    assert (press.mode, press.interval, press.timestamp, press.timeout) == (
        "poll",
        0.1,
        "source",
        5.0,
    )
    assert [p.ref for p in press.points][2] == NodeRef(3, "i", 1001)
    assert press.points[3].ref == NodeRef("urn:press7:plc", "s", "Status.Running")
    assert oven.mode == "subscribe" and oven.points[0].deadband == 0.5
    assert oven.password is not None and oven.password.get_secret_value() == "change-me"
    assert oven.security is not None and oven.security.policy == "Basic256Sha256"
    # relative paths resolve against the folder of the file that names them
    assert oven.security.trust == [REPO / "conf.d" / ".." / "pki" / "trusted"]


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("ns=2;s=Line1.Temp", NodeRef(2, "s", "Line1.Temp")),
        ("ns=3;i=1001", NodeRef(3, "i", 1001)),
        ("i=2258", NodeRef(0, "i", 2258)),
        ("ns=2;s=a;b=c", NodeRef(2, "s", "a;b=c")),  # a string id keeps ; and =
        ("ns=1;b=AAEC", NodeRef(1, "b", b"\x00\x01\x02")),
        ("nsu=urn:x:y;s=T", NodeRef("urn:x:y", "s", "T")),
    ],
)
def test_node_ids_parse(text: str, ref: NodeRef) -> None:
    assert parse_node_id(text) == ref


def test_a_guid_node_id_round_trips() -> None:
    ref = parse_node_id("ns=4;g=09087e75-8e5e-499b-954f-f2a9603db28a")
    assert str(ref) == "ns=4;g=09087e75-8e5e-499b-954f-f2a9603db28a"


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        ("Line1.Temp", "is not of the form [ns=<index>;]<i|s|g|b>=<identifier>"),
        ("ns=2", "has a namespace but no identifier"),
        ("ns=x;s=T", "namespace index 'x' must be an integer 0-65535"),
        ("ns=70000;s=T", "namespace index '70000' must be an integer 0-65535"),
        ("ns=2;i=-4", "a numeric identifier must be an integer 0-4294967295"),
        ("ns=2;i=4294967296", "a numeric identifier must be an integer 0-4294967295"),
        ("ns=2;s=", "the string identifier is empty"),
        ("ns=2;g=1234", "a GUID identifier must look like"),
        ("ns=2;b=!!", "an opaque identifier must be base64"),
        ("nsu=;s=T", "the namespace URI after nsu= is empty"),
        ("ns=2;x=5", "is not of the form"),
    ],
)
def test_bad_node_ids_are_refused_at_check_time(node: str, reason: str) -> None:
    text = DEVICE.replace('"ns=2;s=Line1.Temp"', f'"{node}"')
    (msg,) = errors(text)
    assert msg.startswith("plantbus.toml: devices.opcua[0].points[0].node: node id ")
    assert reason in msg


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ('"http://10.0.0.21:4840"', "must start with opc.tcp://"),
        ('"opc.tcp://:4840"', "has no host"),
        ('"opc.tcp://host:99999"', "has an invalid port"),
        ('"opc.tcp://op:secret@host:4840"', "holds credentials: set them as username and password"),
    ],
)
def test_bad_urls(url: str, reason: str) -> None:
    text = DEVICE.replace('"opc.tcp://10.0.0.21:4840"', url)
    (msg,) = errors(text)
    assert msg.startswith("plantbus.toml: devices.opcua[0].url: url ")
    assert reason in msg


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            {"intervall": '"1s"'},
            "plantbus.toml: devices.opcua[0].intervall: unknown key (did you mean 'interval'?)",
        ),
        (
            {"mode": '"push"'},
            "plantbus.toml: devices.opcua[0].mode: must be 'poll' or 'subscribe', "
            "not the string 'push'",
        ),
        (
            {"timestamp": '"device"'},
            "plantbus.toml: devices.opcua[0].timestamp: must be 'source', 'server' or 'read', "
            "not the string 'device'",
        ),
        (
            {"password": '"x"'},
            "plantbus.toml: devices.opcua[0]: password is set but username is not",
        ),
        (
            {"username": '"op"'},
            "plantbus.toml: devices.opcua[0]: username 'op' is set but password is not",
        ),
        (
            {"queue_size": "4"},
            'plantbus.toml: devices.opcua[0]: queue_size applies only to mode = "subscribe"',
        ),
        (
            {"mode": '"subscribe"', "interval": '"0s"'},
            'plantbus.toml: devices.opcua[0]: mode = "subscribe" needs an interval longer than 0s',
        ),
        (
            {"timeout": '"0s"'},
            "plantbus.toml: devices.opcua[0].timeout: must be longer than 0s",
        ),
        (
            {"reconnect_initial": '"5s"', "reconnect_max": '"1s"'},
            "plantbus.toml: devices.opcua[0]: reconnect_max must not be shorter than "
            "reconnect_initial",
        ),
        (
            {"connections": "2"},
            "plantbus.toml: devices.opcua[0]: connections (2) is more than the number of "
            "points (1)",
        ),
    ],
)
def test_device_key_mistakes(lines: dict[str, str], expected: str) -> None:
    assert errors(device(**lines)) == [expected]


def test_a_deadband_in_poll_mode_is_an_error_not_ignored() -> None:
    text = DEVICE.replace('Line1.Temp" }', 'Line1.Temp", deadband = 0.5 }')
    assert errors(text) == [
        'plantbus.toml: devices.opcua[0]: points[0].deadband applies only to mode = "subscribe"'
    ]


def test_point_names_and_nodes_are_unique() -> None:
    names = DEVICE.replace("points = [{", 'points = [{ name = "temp", node = "ns=2;s=Other" }, {')
    assert errors(names) == [
        "plantbus.toml: devices.opcua[0]: points[1]: point name 'temp' is used twice"
    ]
    nodes = DEVICE.replace(
        "points = [{", 'points = [{ name = "t2", node = "ns=02;s=Line1.Temp" }, {'
    )
    assert errors(nodes) == [
        "plantbus.toml: devices.opcua[0]: points[1] ('temp'): node 'ns=2;s=Line1.Temp' is "
        "already read by point 't2'"
    ]


def test_point_names_must_be_line_protocol_encodable() -> None:
    text = DEVICE.replace('name = "temp"', 'name = "temp\\\\"')
    (msg,) = errors(text)
    assert msg.startswith("plantbus.toml: devices.opcua[0].points[0].name: point name 'temp\\\\'")
    assert "ends with a backslash" in msg


def test_the_password_is_never_shown_in_messages() -> None:
    (msg,) = errors(device(username='"op"', password="12345"))
    assert "12345" not in msg and "secret" in msg


@pytest.mark.parametrize(
    ("security", "expected"),
    [
        (
            '{ policy = "Basic256", certificate = "c.der", private_key = "k.pem", trust = ["t"] }',
            "plantbus.toml: devices.opcua[0].security.policy: must be 'Basic256Sha256', "
            "'Aes128_Sha256_RsaOaep' or 'Aes256_Sha256_RsaPss', not the string 'Basic256'",
        ),
        (
            '{ mode = "None", certificate = "c.der", private_key = "k.pem", trust = ["t"] }',
            "plantbus.toml: devices.opcua[0].security.mode: must be 'Sign' or 'SignAndEncrypt', "
            "not the string 'None'",
        ),
        (
            '{ certificate = "c.der", private_key = "k.pem", trust = [] }',
            "plantbus.toml: devices.opcua[0].security.trust: must not be empty",
        ),
        (
            '{ certificate = "c.der", trust = ["t"] }',
            "plantbus.toml: devices.opcua[0].security.private_key: missing required key",
        ),
    ],
)
def test_security_mistakes(security: str, expected: str) -> None:
    assert errors(device(security=security)) == [expected]
