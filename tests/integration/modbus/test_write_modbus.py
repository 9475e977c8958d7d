"""Write-back to a real pymodbus ``ModbusTcpServer``: the server holds what a command wrote
(checked in the server's own datastore), refused and out-of-range commands change nothing,
a hung device answers ``timeout``, and writes interleave with polling on one connection."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from modbus_maps import encode, encode_string
from modbus_servers import ModbusProxy, ServerThread, UnitMap

from plantbus.broker.bus import Bus
from plantbus.broker.commands import CommandRouter
from plantbus.broker.config import ConfigError, parse_config
from plantbus.broker.connector import BuildContext, WritableConnector
from plantbus.broker.ids import new_id
from plantbus.broker.record import FieldValue, Record, Series
from plantbus.broker.runtime import Runtime
from plantbus.connectors.modbus import Config, ModbusConnector, build

CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))

POINTS: list[dict[str, Any]] = [
    {"name": "setpoint", "area": "holding", "address": 0, "type": "float32", "writable": True,
     "write_limits": [0.0, 100.0]},
    {"name": "speed", "area": "holding", "address": 2, "type": "int16", "scale": 0.1,
     "offset": 5.0, "writable": True},
    {"name": "cdab", "area": "holding", "address": 3, "type": "uint32", "word_order": "little",
     "writable": True},
    {"name": "badc", "area": "holding", "address": 5, "type": "float64", "byte_order": "little",
     "writable": True},
    {"name": "label", "area": "holding", "address": 9, "type": "string", "length": 3,
     "writable": True},
    {"name": "flag", "area": "holding", "address": 12, "type": "bool", "bit": 3,
     "writable": True},
    {"name": "swapped_flag", "area": "holding", "address": 12, "type": "bool", "bit": 9,
     "byte_order": "little", "writable": True},
    {"name": "locked", "area": "holding", "address": 13, "type": "uint16"},
    {"name": "run", "area": "coil", "address": 0, "writable": True},
    {"name": "count", "area": "input", "address": 0},
]  # fmt: skip


@pytest.fixture
def server() -> Iterator[ServerThread]:
    """A server of its own: the tests change what it holds."""
    unit = UnitMap(1, holding=[0] * 20, coil=[False] * 4, input=[7] * 4)
    with ServerThread([unit]) as srv:
        yield srv


def device(port: int, **kw: Any) -> ModbusConnector:
    kw.setdefault("name", "press")
    config = Config.model_validate(
        {"host": "127.0.0.1", "port": port, "points": POINTS, "timeout": "1s", **kw}
    )
    return build(config, CTX)


async def write(dev: ModbusConnector, points: dict[str, FieldValue]) -> dict[str, str | None]:
    async with dev.link.use():
        return dict((await dev.write(points)).errors)


async def test_the_server_holds_each_type_and_order_written(server: ServerThread) -> None:
    dev = device(server.port)
    assert isinstance(dev, WritableConnector)
    errors = await write(
        dev,
        {
            "setpoint": 42.5,
            "speed": 25.0,  # raw = (25 - 5) / 0.1 = 200
            "cdab": 0x12345678,
            "badc": -1234.5625,
            "label": "ab",
            "flag": True,
            "run": True,
        },
    )
    assert errors == dict.fromkeys(errors)  # all None: written
    assert server.get_values(1, "holding", 0, 2) == encode(42.5, "float32")
    assert server.get_values(1, "holding", 2, 1) == [200]
    assert server.get_values(1, "holding", 3, 2) == encode(0x12345678, "uint32", "big", "little")
    assert server.get_values(1, "holding", 5, 4) == encode(-1234.5625, "float64", "little", "big")
    assert server.get_values(1, "holding", 9, 3) == encode_string(b"ab", 3)
    assert server.get_values(1, "holding", 12, 1) == [1 << 3]
    assert server.get_values(1, "coil", 0, 1) == [True]
    # and the connector reads back what it wrote
    async with dev.link.use():
        record = await dev.poll()
    assert record.fields["setpoint"] == 42.5 and record.fields["speed"] == 25.0
    assert record.fields["cdab"] == 0x12345678 and record.fields["badc"] == -1234.5625
    assert record.fields["label"] == "ab" and record.fields["flag"] is True


async def test_a_bit_write_leaves_the_other_bits_of_the_register(server: ServerThread) -> None:
    server.set_values(1, "holding", 12, [0b1010_0000_0000_0001])
    dev = device(server.port)
    assert await write(dev, {"flag": True}) == {"flag": None}
    assert server.get_values(1, "holding", 12, 1) == [0b1010_0000_0000_1001]
    assert await write(dev, {"flag": False, "swapped_flag": True}) == {
        "flag": None,
        "swapped_flag": None,
    }
    # bit 9 of a byte-swapped register is bit 1 of the register as transmitted
    assert server.get_values(1, "holding", 12, 1) == [0b1010_0000_0000_0011]


async def test_values_the_type_cannot_hold_are_refused_and_change_nothing(
    server: ServerThread,
) -> None:
    dev = device(server.port)
    errors = await write(dev, {"speed": 4000.0, "label": "too long", "setpoint": 7.0})
    assert errors["speed"] == (
        "out of range: 4000.0 is 39950 on the device, outside int16 [-32768, 32767]"
    )
    assert errors["label"] == "out of range: 8 bytes do not fit the 6 of point 'label'"
    assert errors["setpoint"] is None
    assert server.get_values(1, "holding", 2, 1) == [0]
    assert server.get_values(1, "holding", 9, 3) == [0, 0, 0]


async def test_a_device_exception_is_a_device_error(server: ServerThread) -> None:
    # address 30 is beyond the unit's 20 holding registers: exception 2
    points = [{"name": "far", "area": "holding", "address": 30, "writable": True}]
    config = Config.model_validate(
        {"name": "far", "host": "127.0.0.1", "port": server.port, "points": points}
    )
    dev = build(config, CTX)
    errors = await write(dev, {"far": 1})
    assert errors["far"] is not None
    assert errors["far"].startswith("device error: ")
    assert "exception 2 (illegal data address)" in errors["far"]


# -- through the command router ------------------------------------------------------------------


class Commands:
    """A bus with a router for one device, a reply subscription and the command publisher."""

    def __init__(self, dev: ModbusConnector):
        self.bus = Bus()
        self.dev = dev
        self.router = CommandRouter(
            self.bus, lambda topic: dev if topic == dev.series.topic else None
        )
        self.replies = self.bus.subscribe(["$reply/#"], name="replies")
        self.series = Series("$cmd/" + dev.series.topic, "cmd")

    async def __aenter__(self) -> Commands:
        self._use = self.dev.link.use()
        await self._use.__aenter__()
        self._task = asyncio.create_task(self.router.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.wait({self._task})
        await self._use.__aexit__(None, None, None)

    async def send(self, fields: dict[str, FieldValue], topic: str | None = None) -> Record:
        series = self.series if topic is None else Series("$cmd/" + topic, "cmd")
        command = Record(series, fields, 0, new_id())
        await self.bus.publish([command])
        async with asyncio.timeout(10):
            (reply,) = await self.replies.get()
        assert reply.parent == command.id
        return reply


async def test_a_command_is_written_and_answered_ok(server: ServerThread) -> None:
    async with Commands(device(server.port)) as commands:
        reply = await commands.send({"setpoint": 12.25, "run": True})
    assert reply.series.topic == "$reply/edge/press"
    assert reply.fields == {"setpoint": "ok", "run": "ok"}
    assert server.get_values(1, "holding", 0, 2) == encode(12.25, "float32")
    assert server.get_values(1, "coil", 0, 1) == [True]


async def test_refused_and_out_of_range_commands_change_nothing(server: ServerThread) -> None:
    async with Commands(device(server.port)) as commands:
        reply = await commands.send(
            {"setpoint": 150.0, "locked": 5, "count": 1, "nosuch": 1, "run": 1, "speed": "fast"}
        )
    assert reply.fields == {
        "setpoint": "out of range: 150.0 is outside write_limits [0, 100]",
        "locked": "refused: point 'locked' is not writable",
        "count": "refused: point 'count' is not writable",
        "nosuch": "refused: the device has no point 'nosuch'",
        "run": "refused: point 'run' takes true or false, not 1",
        "speed": "refused: point 'speed' takes a number, not 'fast'",
    }
    assert server.get_values(1, "holding", 0, 14) == [0] * 14
    assert server.get_values(1, "coil", 0, 1) == [False]
    assert commands.router.points_failed == 6 and commands.router.points_ok == 0


async def test_a_command_to_an_unknown_device_is_refused(server: ServerThread) -> None:
    async with Commands(device(server.port)) as commands:
        reply = await commands.send({"setpoint": 1.0}, topic="edge/nosuch")
    assert reply.series.topic == "$reply/edge/nosuch"
    assert reply.fields == {"setpoint": "refused: no device has topic 'edge/nosuch'"}


async def test_a_hung_device_answers_timeout_and_the_next_command_reconnects(
    server: ServerThread,
) -> None:
    async with ModbusProxy(server.port) as proxy:
        dev = device(proxy.port, timeout="200ms")
        async with Commands(dev) as c:
            proxy.swallow_from(1)
            reply = await c.send({"setpoint": 5.0, "run": True})
            reason = f"timeout: tcp 127.0.0.1:{proxy.port} unit 1: no reply to write holding 0+2"
            assert reply.fields == {
                "setpoint": f"{reason} within 0.2s",
                "run": f"{reason} within 0.2s",  # not tried on the torn-down connection
            }
            assert dev.link.timeouts == 1 and not dev.link.connected
            assert server.get_values(1, "coil", 0, 1) == [False]
            proxy.swallow_from(None)
            reply = await c.send({"run": True})
            assert reply.fields == {"run": "ok"}
            assert server.get_values(1, "coil", 0, 1) == [True]
            assert proxy.connections == 2  # the late reply could never be taken


async def test_writes_interleave_with_fast_polling_on_one_connection(
    server: ServerThread,
) -> None:
    dev = device(server.port, interval="0s")
    records: list[Record] = []

    async def emit(batch: list[Record]) -> None:
        records.extend(batch)

    poller = asyncio.create_task(dev.run(emit))
    try:
        for i in range(50):
            errors = await write(dev, {"speed": 5.0 + i, "run": i % 2 == 0})
            assert errors == {"speed": None, "run": None}
            assert server.get_values(1, "holding", 2, 1) == [i * 10]
        polls = len(records)
        async with asyncio.timeout(10):
            while len(records) < polls + 2:  # noqa: ASYNC110 - records have no event
                await asyncio.sleep(0.001)
        # the last poll saw the last write
        assert records[-1].fields["speed"] == pytest.approx(54.0)
        assert all(r.status is None for r in records)  # no transaction was ever mixed up
        assert dev.link.max_in_flight == 1 and dev.link.connects == 1
    finally:
        poller.cancel()
        await asyncio.wait({poller})


async def test_the_runtime_routes_commands_to_its_modbus_device(
    server: ServerThread, tmp_path: Path
) -> None:
    text = textwrap.dedent(
        f"""
        [node]
        name = "edge"
        state_dir = "{tmp_path}"
        [api]
        enabled = false
        [[devices.modbus]]
        name = "press"
        host = "127.0.0.1"
        port = {server.port}
        interval = "50ms"
        points = [{{ name = "run", area = "coil", address = 1, writable = true }}]
        """
    )
    runtime = Runtime(parse_config(text, tmp_path / "plantbus.toml"))
    await runtime.start()
    try:
        replies = runtime.bus.subscribe(["$reply/edge/press"], name="test")
        command = Record(Series("$cmd/edge/press", "cmd"), {"run": True}, 0, new_id())
        await runtime.bus.publish([command])
        async with asyncio.timeout(10):
            (reply,) = await replies.get()
        assert reply.parent == command.id and reply.fields == {"run": "ok"}
        assert reply.series.measurement == "press"
        assert server.get_values(1, "coil", 1, 1) == [True]
    finally:
        await runtime.shutdown()


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (
            '{ name = "x", area = "input", address = 0, writable = true }',
            "points[0]: point 'x': writable applies only to coils and holding registers; "
            "input registers are read-only in Modbus",
        ),
        (
            '{ name = "x", area = "discrete", address = 0, writable = true }',
            "points[0]: point 'x': writable applies only to coils and holding registers; "
            "discrete inputs are read-only in Modbus",
        ),
        (
            '{ name = "x", area = "coil", address = 0, writable = true, write_limits = [0, 1] }',
            "points[0]: point 'x': write_limits applies only to numbers, not to 'bool'",
        ),
        (
            '{ name = "x", address = 0, write_limits = [0, 1] }',
            "points[0]: write_limits is set but writable is not true",
        ),
        (
            '{ name = "x", address = 0, writable = true, write_limits = [5, 1] }',
            "points[0].write_limits: write_limits [5, 1]: low is above high",
        ),
    ],
)
def test_check_refuses_write_keys_where_they_cannot_apply(
    tmp_path: Path, point: str, message: str
) -> None:
    text = f'[[devices.modbus]]\nname = "d"\nhost = "h"\npoints = [{point}]\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "plantbus.toml")
    assert err.value.messages == [f"plantbus.toml: devices.modbus[0].{message}"]


# -- read-back -------------------------------------------------------------------------------


def clamp_holding(server: ServerThread, address: int, most: int) -> None:
    """Make the unit keep at most ``most`` in holding register ``address`` whatever a client
    writes there (function 6 or 16), as a drive clamps a speed it cannot reach."""
    context = server.server.context
    set_values = context.async_setValues

    async def async_setValues(device_id: int, fc: int, start: int, values: list[Any]) -> Any:
        if fc in (6, 16) and start <= address < start + len(values):
            values = list(values)
            values[address - start] = min(values[address - start], most)
        return await set_values(device_id, fc, start, values)

    context.async_setValues = async_setValues


async def test_read_back_reports_what_the_unit_holds_after_the_write(
    server: ServerThread,
) -> None:
    clamp_holding(server, 2, 150)  # speed: raw 150 at most, i.e. 150 * 0.1 + 5 = 20.0
    points = [dict(p) for p in POINTS]
    points[4]["read_back"] = False  # label: this point opts out of the device's read_back
    dev = build(
        Config.model_validate(
            {"name": "press", "host": "127.0.0.1", "port": server.port, "timeout": "1s",
             "read_back": True, "points": points}
        ),
        CTX,
    )  # fmt: skip
    async with Commands(dev) as commands:
        reply = await commands.send(
            {"setpoint": 42.5, "speed": 25.0, "flag": True, "run": True, "label": "ab",
             "cdab": 0x12345678, "locked": 1}
        )  # fmt: skip
    assert reply.fields == {
        "setpoint": "ok",
        "setpoint.read_back": 42.5,
        "speed": "ok",
        "speed.read_back": 20.0,  # not the 25.0 commanded: the unit clamped it
        "flag": "ok",
        "flag.read_back": True,
        "run": "ok",
        "run.read_back": True,
        "label": "ok",
        "cdab": "ok",
        "cdab.read_back": 0x12345678,
        "locked": "refused: point 'locked' is not writable",
    }
    # what the server's own datastore holds
    assert server.get_values(1, "holding", 2, 1) == [150]
    assert server.get_values(1, "holding", 0, 2) == encode(42.5, "float32")
    assert server.get_values(1, "holding", 3, 2) == encode(0x12345678, "uint32", "big", "little")
    assert server.get_values(1, "holding", 12, 1) == [1 << 3]
    assert server.get_values(1, "coil", 0, 1) == [True]


async def test_without_read_back_the_reply_holds_only_the_outcome(server: ServerThread) -> None:
    async with Commands(device(server.port)) as commands:
        reply = await commands.send({"setpoint": 1.5})
    assert reply.fields == {"setpoint": "ok"}


async def test_a_read_back_that_fails_leaves_the_write_ok(server: ServerThread) -> None:
    async with ModbusProxy(server.port) as proxy:
        dev = device(proxy.port, timeout="200ms", read_back=True)
        async with Commands(dev) as c:
            proxy.swallow_from(3)  # the two writes pass, the read-back hangs
            reply = await c.send({"setpoint": 5.0, "run": True})
            proxy.swallow_from(None)
    why = f"timeout: tcp 127.0.0.1:{proxy.port} unit 1: no reply to coil 0+1 within 0.2s"
    assert reply.fields["setpoint"] == "ok" and reply.fields["run"] == "ok"
    # coils are read first; the connection is then gone, so the register is not tried
    assert reply.fields["run.read_back_error"] == why
    assert reply.fields["setpoint.read_back_error"] == why
    assert "setpoint.read_back" not in reply.fields and "run.read_back" not in reply.fields
    assert server.get_values(1, "holding", 0, 2) == encode(5.0, "float32")  # written all the same
    assert server.get_values(1, "coil", 0, 1) == [True]


async def test_a_device_exception_on_the_read_back_is_its_error(server: ServerThread) -> None:
    context = server.server.context
    get_values = context.async_getValues

    async def async_getValues(device_id: int, fc: int, *args: Any) -> Any:
        if fc == 3:  # this unit's holding registers can be written but not read
            from pymodbus.constants import ExcCodes

            return ExcCodes.ILLEGAL_ADDRESS
        return await get_values(device_id, fc, *args)

    context.async_getValues = async_getValues
    async with Commands(device(server.port, read_back=True)) as commands:
        reply = await commands.send({"setpoint": 5.0, "run": True})
    assert reply.fields["setpoint"] == "ok"
    assert reply.fields["setpoint.read_back_error"].startswith("device error: ")
    assert "exception 2 (illegal data address)" in reply.fields["setpoint.read_back_error"]
    assert reply.fields["run.read_back"] is True
    server.server.context.async_getValues = get_values
    assert server.get_values(1, "holding", 0, 2) == encode(5.0, "float32")


def test_check_refuses_read_back_on_a_point_that_cannot_be_written(tmp_path: Path) -> None:
    text = (
        '[[devices.modbus]]\nname = "d"\nhost = "h"\n'
        'points = [{ name = "x", address = 0, read_back = true }]\n'
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "plantbus.toml")
    assert err.value.messages == [
        "plantbus.toml: devices.modbus[0].points[0]: read_back is set but writable is not true"
    ]
