"""Write-back to a real asyncua server: the server holds what a command wrote, with the
variable's own type (read on the server side); refused and out-of-range commands change
nothing; a read-only node answers the server's ``device error: BadUserAccessDenied``; a
frozen (SIGSTOPped) server answers ``timeout`` and the connection is made afresh. With
``read_back`` the reply holds what the server holds (a clamped value too), and a read-back
that fails (BadNotReadable, a server stalled after the write) leaves the write ``ok``."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opcua_harness import CTX, UaServer, device, running

from plantbus.broker.bus import Bus
from plantbus.broker.commands import CommandRouter
from plantbus.broker.config import ConfigError, parse_config
from plantbus.broker.connector import WritableConnector
from plantbus.broker.ids import new_id
from plantbus.broker.record import FieldValue, Record, Series

VARIABLES: list[dict[str, Any]] = [
    {"node": "s=W.Setpoint", "name": "Setpoint", "parent": "W", "type": "Double", "value": 0.0},
    {"node": "s=W.Count", "name": "Count", "parent": "W", "type": "Int32", "value": 0},
    {"node": "s=W.Small", "name": "Small", "parent": "W", "type": "UInt16", "value": 0},
    {"node": "s=W.Ratio", "name": "Ratio", "parent": "W", "type": "Float", "value": 0.0},
    {"node": "s=W.Run", "name": "Run", "parent": "W", "type": "Boolean", "value": False},
    {"node": "s=W.Recipe", "name": "Recipe", "parent": "W", "type": "String", "value": "none"},
    {"node": "s=W.Locked", "name": "Locked", "parent": "W", "type": "Double", "value": 1.5,
     "readonly": True},
    {"node": "s=W.Temp", "name": "Temp", "parent": "W", "type": "Double", "value": 20.0},
]  # fmt: skip


def points(server: UaServer) -> list[dict[str, Any]]:
    def p(name: str, **keys: Any) -> dict[str, Any]:
        return {"name": name.lower(), "node": server.node(f"s=W.{name}"), **keys}

    return [
        p("Setpoint", writable=True, write_limits=[0, 100]),
        p("Count", writable=True),
        p("Small", writable=True),
        p("Ratio", writable=True),
        p("Run", writable=True),
        p("Recipe", writable=True),
        p("Locked", writable=True),  # writable in plantbus, read-only on the server
        p("Temp"),
    ]


@pytest.fixture
def server(server_factory: Callable[..., UaServer]) -> UaServer:
    return server_factory(variables=VARIABLES)


def held(server: UaServer, name: str) -> tuple[Any, str]:
    answer = server.call("read", node=f"s=W.{name}")
    return answer["value"], answer["type"]


class Commands:
    """A bus with a router for one running device, and the command publisher."""

    def __init__(self, dev: Any):
        self.bus = Bus()
        self.router = CommandRouter(
            self.bus, lambda topic: dev if topic == dev.series.topic else None
        )
        self.replies = self.bus.subscribe(["$reply/#"], name="replies")
        self.series = Series("$cmd/" + dev.series.topic, "cmd")

    async def __aenter__(self) -> Commands:
        self._task = asyncio.create_task(self.router.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.wait({self._task})

    async def send(self, fields: dict[str, FieldValue]) -> Record:
        command = Record(self.series, fields, 0, new_id())
        await self.bus.publish([command])
        async with asyncio.timeout(30):
            (reply,) = await self.replies.get()
        assert reply.parent == command.id
        return reply


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
async def test_the_server_holds_each_value_with_the_nodes_type(server: UaServer, mode: str) -> None:
    config = device(server.url, points(server), mode=mode, interval="50ms", timeout="5s")
    async with running(config) as (dev, out):
        assert isinstance(dev, WritableConnector)
        await out.wait(lambda: dev.connected, what="a connection")
        async with Commands(dev) as commands:
            reply = await commands.send(
                {
                    "setpoint": 42.5,
                    "count": -7,
                    "small": 65535,
                    "ratio": 0.5,
                    "run": True,
                    "recipe": "weld B",
                }
            )
            assert reply.fields == dict.fromkeys(
                ["setpoint", "count", "small", "ratio", "run", "recipe"], "ok"
            )
            assert reply.series.topic == "$reply/edge/ua1"
            # an integer to a Double node goes as a Double
            assert (await commands.send({"setpoint": 7})).fields == {"setpoint": "ok"}
        assert held(server, "Setpoint") == (7.0, "Double")
        assert held(server, "Count") == (-7, "Int32")
        assert held(server, "Small") == (65535, "UInt16")
        assert held(server, "Ratio") == (0.5, "Float")
        assert held(server, "Run") == (True, "Boolean")
        assert held(server, "Recipe") == ("weld B", "String")
        # and the device reads back what it wrote
        await out.wait(lambda: out.last("recipe") == "weld B" and out.last("setpoint") == 7.0)
        assert dev.connects == 1


async def test_refused_and_out_of_range_commands_change_nothing(server: UaServer) -> None:
    config = device(server.url, points(server), interval="50ms", timeout="5s")
    async with running(config) as (dev, out):
        await out.wait(lambda: dev.connected, what="a connection")
        async with Commands(dev) as commands:
            reply = await commands.send(
                {
                    "setpoint": 150.0,
                    "count": 2**31,
                    "small": -1,
                    "ratio": 1e39,
                    "run": 1,
                    "recipe": 5,
                    "temp": 30.0,
                    "nosuch": 1,
                    "locked": 2.5,
                }
            )
    assert reply.fields == {
        "setpoint": "out of range: 150.0 is outside write_limits [0, 100]",
        "count": "out of range: 2147483648 does not fit Int32 [-2147483648, 2147483647]",
        "small": "out of range: -1 does not fit UInt16 [0, 65535]",
        "ratio": "out of range: 1e+39 does not fit a Float",
        "run": "refused: point 'run' is a Boolean and takes true or false, not 1",
        "recipe": "refused: point 'recipe' is a String and takes a string, not 5",
        "temp": "refused: point 'temp' is not writable",
        "nosuch": "refused: the device has no point 'nosuch'",
        "locked": "device error: BadUserAccessDenied (0x801F0000)",
    }
    assert held(server, "Setpoint") == (0.0, "Double")
    assert held(server, "Count") == (0, "Int32")
    assert held(server, "Small") == (0, "UInt16")
    assert held(server, "Ratio") == (0.0, "Float")
    assert held(server, "Run") == (False, "Boolean")
    assert held(server, "Recipe") == ("none", "String")
    assert held(server, "Temp") == (20.0, "Double")
    assert held(server, "Locked") == (1.5, "Double")


async def test_a_frozen_server_answers_timeout_and_the_connection_is_made_afresh(
    server: UaServer,
) -> None:
    config = device(server.url, points(server), interval="100ms", timeout="1s")
    async with running(config) as (dev, out):
        await out.wait(lambda: dev.connected, what="a connection")
        async with Commands(dev) as commands:
            assert (await commands.send({"count": 1})).fields == {"count": "ok"}
            server.pause()
            try:
                reply = await commands.send({"count": 2, "run": True})
            finally:
                server.resume()
            why = "timeout: no answer to a write within 1s"
            assert reply.fields == {"count": why, "run": why}
            await out.wait(lambda: dev.connects >= 2, within=30, what="a new connection")
            await out.wait(lambda: dev.connected, within=30, what="connected again")
            assert (await commands.send({"count": 3})).fields == {"count": "ok"}
    assert held(server, "Count") == (3, "Int32")


async def test_a_command_while_disconnected_is_a_device_error(tmp_path: Path) -> None:
    from plantbus.connectors.opcua import build

    dev = build(device("opc.tcp://127.0.0.1:1/", [{"name": "x", "node": "ns=2;i=1",
                                                    "writable": True}]), CTX)  # fmt: skip
    result = await dev.write({"x": 1.0})
    assert result.errors == {"x": "device error: not connected to opc.tcp://127.0.0.1:1/"}


def test_check_refuses_write_limits_without_writable(tmp_path: Path) -> None:
    text = textwrap.dedent(
        """
        [[devices.opcua]]
        name = "d"
        url = "opc.tcp://h:4840"
        points = [{ name = "x", node = "ns=2;i=1", write_limits = [0, 1] }]
        """
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "plantbus.toml")
    assert err.value.messages == [
        "plantbus.toml: devices.opcua[0].points[0]: write_limits is set but writable is not true"
    ]


# -- read-back -------------------------------------------------------------------------------

READ_BACK_VARIABLES: list[dict[str, Any]] = [
    *VARIABLES,
    # the server keeps at most 80 whatever it is sent, as a drive clamps a speed
    {"node": "s=W.Limited", "name": "Limited", "parent": "W", "type": "Double", "value": 0.0,
     "clamp": [0, 80]},
    # written, but its Value cannot be read (AccessLevel without CurrentRead)
    {"node": "s=W.WriteOnly", "name": "WriteOnly", "parent": "W", "type": "Int32", "value": 0,
     "unreadable": True},
]  # fmt: skip


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
async def test_read_back_reports_what_the_server_holds_after_the_write(
    server_factory: Callable[..., UaServer], mode: str
) -> None:
    server = server_factory(variables=READ_BACK_VARIABLES)
    pts = [
        *points(server)[:6],
        {"name": "limited", "node": server.node("s=W.Limited"), "writable": True},
        {"name": "writeonly", "node": server.node("s=W.WriteOnly"), "writable": True},
    ]
    pts[5]["read_back"] = False  # recipe: this point opts out of the device's read_back
    config = device(server.url, pts, mode=mode, interval="50ms", timeout="5s", read_back=True)
    async with running(config) as (dev, out):
        await out.wait(lambda: dev.connected, what="a connection")
        async with Commands(dev) as commands:
            reply = await commands.send(
                {"setpoint": 42.5, "count": -7, "run": True, "recipe": "weld B",
                 "limited": 95.0, "writeonly": 5}
            )  # fmt: skip
    assert reply.fields == {
        "setpoint": "ok",
        "setpoint.read_back": 42.5,
        "count": "ok",
        "count.read_back": -7,
        "run": "ok",
        "run.read_back": True,
        "recipe": "ok",
        "limited": "ok",
        "limited.read_back": 80.0,  # not the 95.0 commanded: the server clamped it
        "writeonly": "ok",  # written all the same
        "writeonly.read_back_error": "device error: BadNotReadable (0x803A0000)",
    }
    for name in ("Setpoint", "Count", "Run", "Limited"):
        assert reply.fields[f"{name.lower()}.read_back"] == held(server, name)[0]
    assert held(server, "WriteOnly") == (5, "Int32")
    assert held(server, "Recipe") == ("weld B", "String")


async def test_a_read_back_timeout_leaves_the_write_ok(
    server_factory: Callable[..., UaServer],
) -> None:
    stalling = {"node": "s=W.Stalls", "name": "Stalls", "parent": "W", "type": "Int32",
                "value": 0, "stall_reads": 2.0}  # fmt: skip
    server = server_factory(variables=[*VARIABLES, stalling])
    pts = [{"name": "stalls", "node": server.node("s=W.Stalls"), "writable": True}]
    # polled once an hour: the read after the write is the read-back, not a poll
    config = device(server.url, pts, interval="1h", timeout="1s", read_back=True)
    async with running(config) as (dev, out):
        await out.wait(lambda: dev.connected and out.records, what="the first poll")
        async with Commands(dev) as commands:
            reply = await commands.send({"stalls": 11})
    assert reply.fields == {
        "stalls": "ok",
        "stalls.read_back_error": "timeout: no answer to the read-back within 1s",
    }
    assert held(server, "Stalls") == (11, "Int32")
