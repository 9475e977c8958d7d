"""The command router's checks and reply shape, with a device kind that cannot be written
(the ``sim`` device, built from config) and the pure value checks; the writes themselves
are tested against real servers in tests/integration/*/test_write_*.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from plantbus.broker.bus import Bus
from plantbus.broker.commands import CommandRouter, check_value
from plantbus.broker.connector import BuildContext, WritablePointConfig, WritePoint
from plantbus.broker.ids import new_id
from plantbus.broker.record import Record, Series
from plantbus.codecs import json as json_codec
from plantbus.connectors.sim import build as build_sim
from plantbus.connectors.sim.connector import Config as SimConfig

NUMBER = WritePoint("sp", True, "float", (0.0, 10.0))


@pytest.mark.parametrize(
    ("point", "value", "reason"),
    [
        (NUMBER, 10.0, None),
        (NUMBER, 0, None),
        (NUMBER, 10.5, "out of range: 10.5 is outside write_limits [0, 10]"),
        (NUMBER, True, "refused: point 'sp' takes a number, not True"),
        (NUMBER, "5", "refused: point 'sp' takes a number, not '5'"),
        (NUMBER, float("nan"), "refused: nan is not a finite number"),
        (None, 1, "refused: the device has no point 'sp'"),
        (WritePoint("sp", False, "float"), 1, "refused: point 'sp' is not writable"),
        (WritePoint("sp", True, "int"), 2.5, "refused: point 'sp' takes an integer, not 2.5"),
        (WritePoint("sp", True, "int"), 2.0, None),
        (WritePoint("sp", True, "bool"), 1, "refused: point 'sp' takes true or false, not 1"),
        (WritePoint("sp", True, "str"), 1, "refused: point 'sp' takes a string, not 1"),
        (WritePoint("sp", True, None), "any", None),
        (
            WritePoint("sp", True, None, (0.0, 1.0)),
            "x",
            "refused: point 'sp' has write_limits and takes a number, not 'x'",
        ),
    ],
)
def test_check_value(point: WritePoint | None, value: object, reason: str | None) -> None:
    assert check_value(point, "sp", value) == reason  # type: ignore[arg-type]


async def test_a_device_kind_without_write_refuses_and_the_reply_names_the_command() -> None:
    ctx = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))
    sim = build_sim(
        SimConfig.model_validate({"name": "s1", "points": [{"name": "n", "signal": "counter"}]}),
        ctx,
    )
    bus = Bus()
    router = CommandRouter(bus, lambda topic: sim if topic == "edge/s1" else None)
    replies = bus.subscribe(["$reply/#"])
    task = asyncio.create_task(router.run())
    try:
        command = Record(Series("$cmd/edge/s1", "cmd"), {"n": 1}, 0, new_id())
        await bus.publish([command])
        async with asyncio.timeout(5):
            (reply,) = await replies.get()
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert reply.fields == {"n": "refused: device 's1' does not take commands"}
    assert reply.series.topic == "$reply/edge/s1" and reply.series.measurement == "s1"
    doc = json.loads(json_codec.encode([reply]))[0]
    assert doc["parent"] == command.id and doc["uid"] == reply.id
    assert doc["fields"] == {"n": "refused: device 's1' does not take commands"}


@pytest.mark.parametrize(
    ("device", "point", "writable", "expected"),
    [
        (False, None, True, False),
        (True, None, True, True),
        (True, False, True, False),  # the point opts out
        (False, True, True, True),  # the point opts in
        (True, None, False, False),  # never for a point commands cannot write
    ],
)
def test_read_back_is_the_points_own_else_the_devices(
    device: bool, point: bool | None, writable: bool, expected: bool
) -> None:
    cfg = WritablePointConfig.model_validate(
        {"writable": writable, **({} if point is None else {"read_back": point})}
    )
    assert cfg.write_point("sp", "float", device_read_back=device).read_back is expected


def test_read_back_on_a_point_that_is_not_writable_is_refused() -> None:
    with pytest.raises(ValueError, match="read_back is set but writable is not true"):
        WritablePointConfig.model_validate({"read_back": True})
