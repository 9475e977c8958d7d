"""The modbus device against a real pymodbus ``ModbusTcpServer``: decoding, the plan, shared
connections, exceptions, and the runtime writing what it read to a file sink."""

from __future__ import annotations

import asyncio
import math
import random
import textwrap
from pathlib import Path
from typing import Any

import pytest
from modbus_maps import VALUES, TypedMap, encode, values_equal
from modbus_servers import ModbusProxy, ServerThread, eventually

from plantbus.broker.config import parse_config
from plantbus.broker.connector import BuildContext
from plantbus.broker.record import Quality, Record
from plantbus.broker.runtime import Runtime
from plantbus.connectors.modbus import Config, ModbusConnector, build
from plantbus.connectors.modbus.status import (
    BAD_NODE_ID_UNKNOWN,
    BAD_TIMEOUT,
    exception_code_of,
)

CTX = BuildContext(node_name="edge", node_tags={"site": "ulm"}, state_dir=Path("/nonexistent"))


def device(port: int, points: list[dict[str, Any]], **kw: Any) -> ModbusConnector:
    kw.setdefault("name", "dev")
    config = Config.model_validate(
        {"host": "127.0.0.1", "port": port, "points": points, "timeout": "2s", **kw}
    )
    return build(config, CTX)


async def poll_once(dev: ModbusConnector) -> Record:
    async with dev.link.use():
        return await dev.poll()


def assert_fields(record: Record, expect: dict[str, Any]) -> None:
    wrong = {
        name: (record.fields.get(name, "<missing>"), value)
        for name, value in expect.items()
        if not values_equal(record.fields.get(name), value)
    }
    assert not wrong, f"{len(wrong)} points decoded wrong (got, expected): {wrong}"
    assert set(record.fields) == set(expect)


# -- decoding ----------------------------------------------------------------------------------


async def test_every_area_type_and_order_decodes_to_what_the_server_holds(
    tcp_server: ServerThread, typed: TypedMap
) -> None:
    dev = device(tcp_server.port, typed.points, unit=typed.unit)
    record = await poll_once(dev)
    assert record.quality is Quality.GOOD and record.status is None
    assert_fields(record, typed.expect)
    # the extremes really are there: NaN, infinities, -0.0, the 64-bit limits, a subnormal
    f = record.fields
    assert math.isnan(f["h_float32_bb_8"]) and math.isnan(f["i_float64_ll_4"])
    assert f["h_float32_lb_6"] == math.inf and f["h_float64_bl_5"] == -math.inf
    assert math.copysign(1.0, f["h_float32_ll_1"]) == -1.0
    assert f["h_int64_bl_0"] == -(2**63) and f["i_uint64_lb_1"] == 2**64 - 1
    assert f["h_float32_bb_5"] == 1.401298464324817e-45
    assert f["s_utf8"] == "Grüße µ" and f["s_full"] == "ABCD"
    assert type(f["scaled"]) is float and f["scaled"] == pytest.approx(-5.0)
    # 431 registers and 58 bits in 6 requests: 4 of holding (125 each at most), 1 of input
    # would not do (input holds more than 125), so the plan is the fewest that fit
    assert dev.requests == len(dev.reads)
    assert all(r.count <= 125 for r in dev.reads)


async def test_values_follow_the_server_between_polls(tcp_server: ServerThread) -> None:
    dev = device(
        tcp_server.port,
        [
            {"name": "t", "address": 0, "type": "float32", "word_order": "little"},
            {"name": "c", "area": "coil", "address": 1},
            {"name": "i", "area": "input", "address": 2},
        ],
        unit=3,
    )
    async with dev.link.use():
        first = await dev.poll()
        assert first.fields == {"c": False, "i": 3002, "t": _f32([300, 301], "little")}
        tcp_server.set_values(3, "holding", 0, [0x0000, 0x4120])  # 10.0, words swapped
        tcp_server.set_values(3, "input", 2, [65535])
        second = await dev.poll()
    assert second.fields["t"] == 10.0 and second.fields["i"] == 65535
    assert second.time_ns > first.time_ns and second.id > first.id


def _f32(regs: list[int], word_order: str) -> float:
    import struct

    if word_order == "little":
        regs = list(reversed(regs))
    return struct.unpack(">f", struct.pack(">2H", *regs))[0]


# -- the plan ------------------------------------------------------------------------------------


async def test_merged_reads_deliver_the_same_values_as_one_read_per_point(
    tcp_server: ServerThread, typed: TypedMap
) -> None:
    points = typed.points[:60]
    merged = device(tcp_server.port, points, max_gap=10)
    single = device(tcp_server.port, points, max_registers_per_request=4)
    a, b = await poll_once(merged), await poll_once(single)
    assert a.quality is b.quality is Quality.GOOD
    assert (
        all(values_equal(a.fields[k], b.fields[k]) for k in a.fields)
        and a.fields.keys() == b.fields.keys()
    )
    assert len(merged.reads) < len(single.reads)


# -- several units behind one gateway --------------------------------------------------------


async def test_units_behind_one_gateway_share_one_connection(tcp_server: ServerThread) -> None:
    async with ModbusProxy(tcp_server.port) as gateway:  # counts the connections it accepts
        devices = [
            device(
                gateway.port, [{"name": "v", "address": 5}], name=f"u{u}", unit=u, interval="10ms"
            )
            for u in (2, 3, 4)
        ]
        assert devices[0].link is devices[1].link is devices[2].link
        link = devices[0].link
        got: dict[str, list[Record]] = {d.name: [] for d in devices}

        async def emit(records: list[Record]) -> None:
            got[records[0].series.tag_dict["device"]].extend(records)

        tasks = [asyncio.create_task(d.run(emit)) for d in devices]
        try:
            await eventually(lambda: min(len(v) for v in got.values()) >= 10)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert gateway.connections == 1 and link.connects == 1
        assert gateway.requests == link.requests >= 30
    assert link.max_in_flight == 1
    assert {r.fields["v"] for r in got["u2"]} == {205}
    assert {r.fields["v"] for r in got["u3"]} == {305}
    assert {r.fields["v"] for r in got["u4"]} == {405}
    assert not link.connected  # the last device out closed it


# -- Modbus exceptions ---------------------------------------------------------------------------


async def test_an_exception_marks_only_the_points_of_that_read_bad(
    tcp_server: ServerThread,
) -> None:
    dev = device(
        tcp_server.port,
        [
            {"name": "ok", "address": 2},
            {"name": "hole", "address": 12},
            {"name": "hole2", "address": 15, "type": "int32"},
            {"name": "later", "address": 25},
        ],
        unit=4,
    )
    record = await poll_once(dev)
    assert record.fields == {"ok": 402, "later": 425}
    assert record.quality is Quality.BAD
    assert record.status == {"hole": BAD_NODE_ID_UNKNOWN | 2, "hole2": BAD_NODE_ID_UNKNOWN | 2}
    assert exception_code_of(record.status["hole"]) == 2


async def test_a_read_spanning_unmapped_registers_is_split_and_delivers(
    tcp_server: ServerThread,
) -> None:
    dev = device(
        tcp_server.port,
        [{"name": "a", "address": 8}, {"name": "b", "address": 21, "type": "uint32"}],
        unit=4,
        max_gap=20,
    )
    assert dev.plan_text() == ["holding 8-22 (15): a, b"]
    record = await poll_once(dev)
    assert record.fields == {"a": 408, "b": (421 << 16) | 422}
    assert record.quality is Quality.GOOD
    assert dev.plan_text() == ["holding 8-8 (1): a", "holding 21-22 (2): b"]
    assert dev.splits == 1


async def test_a_unit_the_gateway_does_not_hold_answers_with_an_exception(
    tcp_server: ServerThread,
) -> None:
    # the gateway answers exception 11, "gateway target device failed to respond"
    dev = device(tcp_server.port, [{"name": "x", "address": 0}], unit=9)
    async with dev.link.use():
        record = await dev.poll()
        assert dev.link.connected  # an exception is an answer: the connection stays
    assert record.fields == {} and record.quality is Quality.BAD
    assert record.status == {"x": BAD_TIMEOUT | 11}


# -- through the runtime -------------------------------------------------------------------------


async def test_runtime_writes_the_polls_to_a_file_sink(
    tcp_server: ServerThread, tmp_path: Path
) -> None:
    text = textwrap.dedent(
        f"""
        [node]
        name = "edge"
        state_dir = "state"
        [api]
        enabled = false

        [[devices.modbus]]
        name = "press7"
        topic = "plant/h1/press7"
        host = "127.0.0.1"
        port = {tcp_server.port}
        unit = 4
        interval = "20ms"
        tags = {{ line = "L1" }}
        points = [
          {{ name = "ok", area = "holding", address = 0 }},
          {{ name = "gone", area = "holding", address = 10 }},
        ]

        [[sinks.file]]
        name = "lp"
        path = "out.lp"
        flush_interval = "20ms"
        """
    )
    config = parse_config(text, tmp_path / "plantbus.toml")
    runtime = Runtime(config)
    task = asyncio.create_task(runtime.run())
    out = tmp_path / "out.lp"
    try:
        await eventually(lambda: out.exists() and out.read_text().count("\n") >= 5)
    finally:
        runtime.request_stop("test done")
        await task
    lines = out.read_text().splitlines()
    assert lines[0].startswith("press7,device=press7,line=L1 ok=400i,gone_status=2150891522i,")
    assert all(' quality="bad"' in ln or ',quality="bad"' in ln for ln in lines)
    assert len(lines) == runtime.devices["press7"].emitted


# -- stopping --------------------------------------------------------------------------------


async def test_a_cancelled_device_always_stops(tcp_server: ServerThread) -> None:
    """Cancel a device polling flat out at many moments: it stops every time.

    On Python 3.11 pymodbus's ``asyncio.wait_for`` swallows a cancellation that arrives
    together with the reply; the link re-raises it, or a drain would wait forever.
    """
    dev = device(tcp_server.port, [{"name": "v", "address": 5}], unit=2, interval="0s")

    async def emit(records: list[Record]) -> None:
        pass

    rng = random.Random(7)
    for _ in range(150):
        task = asyncio.create_task(dev.run(emit))
        await asyncio.sleep(rng.uniform(0, 0.003))
        task.cancel()
        async with asyncio.timeout(2):
            await asyncio.gather(task, return_exceptions=True)
    assert dev.polls > 150


def test_the_maps_reference_encoding_agrees_with_pymodbus() -> None:
    """The registers the typed map is built from (``modbus_maps.encode``) are what pymodbus's
    own ``convert_to_registers`` makes, in both word orders (pymodbus has no byte order)."""
    from pymodbus.client import AsyncModbusTcpClient as Client

    types = {
        "int16": Client.DATATYPE.INT16,
        "uint16": Client.DATATYPE.UINT16,
        "int32": Client.DATATYPE.INT32,
        "uint32": Client.DATATYPE.UINT32,
        "int64": Client.DATATYPE.INT64,
        "uint64": Client.DATATYPE.UINT64,
        "float32": Client.DATATYPE.FLOAT32,
        "float64": Client.DATATYPE.FLOAT64,
    }
    for type_, values in VALUES.items():
        for value in values:
            if isinstance(value, float) and math.isnan(value):
                continue  # NaN payloads may differ; the bits of our NaN are checked by decoding
            for word_order in ("big", "little"):
                ours = encode(value, type_, "big", word_order)
                theirs = Client.convert_to_registers(value, types[type_], word_order=word_order)
                assert ours == theirs, (type_, value, word_order)
