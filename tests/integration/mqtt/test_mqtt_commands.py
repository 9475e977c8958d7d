"""An ``mqtt`` device as a source of commands, end to end with real servers: a message
published to a real Mosquitto becomes a record on ``$cmd/<device topic>``, the runtime's
command router writes it to a real pymodbus server (which then holds the value) and the
reply (``parent`` = the command's uid) comes back on ``$reply/<device topic>``."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modbus"))  # modbus_servers

from modbus_maps import encode
from modbus_servers import ServerThread, UnitMap

from plantbus.broker.config import ConfigError, parse_config
from plantbus.broker.record import Record
from plantbus.broker.runtime import Runtime

Mosquitto = Any


def publish(port: int, topic: str, payload: bytes) -> None:
    """Publish at QoS 1 and wait until the broker has it (runs in a thread)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


async def apublish(port: int, topic: str, payload: bytes) -> None:
    await asyncio.to_thread(publish, port, topic, payload)


def config_text(mqtt_port: int, modbus_port: int, state: Path) -> str:
    return textwrap.dedent(
        f"""
        [node]
        name = "edge"
        state_dir = "{state}"
        [api]
        enabled = false

        [[devices.modbus]]
        name = "press"
        host = "127.0.0.1"
        port = {modbus_port}
        interval = "100ms"
        [[devices.modbus.points]]
        name = "setpoint"
        area = "holding"
        address = 0
        type = "float32"
        writable = true
        write_limits = [0, 100]
        [[devices.modbus.points]]
        name = "run"
        area = "coil"
        address = 0
        writable = true

        [[devices.mqtt]]
        name = "hmi"
        url = "mqtt://127.0.0.1:{mqtt_port}"
        topic = "edge/hmi"

        # Node-RED style: one value per topic, the point name in the last level
        [[devices.mqtt.subscriptions]]
        filter = "plant/press/set/+"
        codec = "number"
        field = "{{4}}"
        topic = "edge/press"
        commands = true

        # several points in one JSON object
        [[devices.mqtt.subscriptions]]
        filter = "plant/press/cmd"
        codec = "json"
        topic = "edge/press"
        commands = true
        """
    )


async def next_reply(replies: Any, within: float = 20.0) -> Record:
    async with asyncio.timeout(within):
        (reply,) = await replies.get()
    return reply


async def test_mqtt_messages_are_commands_written_to_the_device(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    unit = UnitMap(1, holding=[0] * 4, coil=[False] * 2)
    with ServerThread([unit]) as server:
        runtime = Runtime(
            parse_config(
                config_text(mosquitto.plain, server.port, tmp_path), tmp_path / "plantbus.toml"
            )
        )
        await runtime.start()
        try:
            commands = runtime.bus.subscribe(["$cmd/edge/press"], name="test-commands")
            replies = runtime.bus.subscribe(["$reply/edge/press"], name="test-replies")
            hmi = runtime.devices["hmi"].connector
            async with asyncio.timeout(20):
                await hmi.ready.wait()  # connected and subscribed
            await apublish(mosquitto.plain, "plant/press/set/setpoint", b"42.5")
            reply = await next_reply(replies)
            (command,) = commands.get_nowait()
            assert command.series.topic == "$cmd/edge/press"
            assert command.fields == {"setpoint": 42.5}
            assert reply.parent == command.id and reply.fields == {"setpoint": "ok"}
            assert server.get_values(1, "holding", 0, 2) == encode(42.5, "float32")

            await apublish(mosquitto.plain, "plant/press/cmd", b'{"setpoint": 150, "run": true}')
            reply = await next_reply(replies)
            assert reply.fields == {
                "setpoint": "out of range: 150.0 is outside write_limits [0, 100]",
                "run": "ok",
            }
            assert server.get_values(1, "holding", 0, 2) == encode(42.5, "float32")
            assert server.get_values(1, "coil", 0, 1) == [True]
        finally:
            await runtime.shutdown()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            'codec = "number"\ncommands = true',
            "subscriptions[0]: commands = true needs topic: the topic of the device the "
            'commands are for (e.g. topic = "edge/press"; their records go to $cmd/<topic>)',
        ),
        (
            'codec = "number"\ncommands = true\ntopic = "$cmd/edge/press"',
            "subscriptions[0]: topic '$cmd/edge/press': give the device's topic; "
            "commands = true puts $cmd/ in front of it",
        ),
    ],
)
def test_check_refuses_command_subscriptions_without_a_device_topic(
    tmp_path: Path, keys: str, message: str
) -> None:
    text = f'[[devices.mqtt]]\nname = "m"\n[[devices.mqtt.subscriptions]]\nfilter = "a/+"\n{keys}\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "plantbus.toml")
    assert err.value.messages == [f"plantbus.toml: devices.mqtt[0].{message}"]
