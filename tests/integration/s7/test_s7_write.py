"""Write-back to a real python-snap7 server: the server's memory holds what was written
(read there with ``snap7.util``, an encoder independent of the connector's), for every type
the reader supports, in DBs and in the M and Q areas; a bit write leaves the other bits of
its byte; a string longer than one PDU goes in several requests; refused and out-of-range
commands change nothing; the PLC's item errors are ``device error``; a late reply (fault
proxy) is ``timeout`` and the next command goes over a new connection. With ``read_back``
the reply holds what the PLC's memory holds, and a late read-back leaves the write ``ok``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from s7_harness import PlcServer, running, s7_config, wait_for
from s7_plc import POINTS, build_areas, start_server
from s7_proxy import S7Proxy
from snap7 import util

from plantbus.broker.bus import Bus
from plantbus.broker.commands import CommandRouter
from plantbus.broker.config import ConfigError, parse_config
from plantbus.broker.connector import WritableConnector
from plantbus.broker.ids import new_id
from plantbus.broker.record import Record, Series

READ_ONLY = {"door_closed", "estop", "inputs_1", "in_word"}  # inputs cannot be writable
WRITE_POINTS = [
    {**p, **({} if p["name"] in READ_ONLY else {"writable": True})} for p in POINTS
] + [
    {"name": "long_text", "address": "DB3.DBB0", "type": "string[254]", "writable": True},
    {"name": "limited", "address": "DB3.DBW300", "type": "int", "writable": True,
     "write_limits": [0, 1000]},
    {"name": "missing_db", "address": "DB9.DBW0", "type": "int", "writable": True},
    {"name": "past_end", "address": "DB2.DBW100", "type": "int", "writable": True},
]  # fmt: skip


@pytest.fixture
def plc() -> Iterator[PlcServer]:
    """A server of its own (the tests change its memory), with a DB3 of 320 bytes."""
    areas = build_areas()
    areas[("DB", 3)] = bytearray(320)
    server = start_server(areas)
    try:
        yield PlcServer(server, areas)
    finally:
        server.stop()


def db(plc: PlcServer, n: int) -> bytearray:
    return plc.areas[("DB", n)]


async def test_the_plc_holds_every_type_written(plc: PlcServer) -> None:
    values = {
        "flag0": True,
        "mode": 17,
        "letter": "q",
        "small": -5,
        "usmall": 9,
        "status_word": 0x1234,
        "strokes": -32768,
        "rpm": 1,
        "status_dword": 0xCAFEBABE,
        "total": 2**31 - 1,
        "big_total": 7,
        "pressure": 2.5,
        "temp": -40.25,
        "energy": 2.718281828459045,
        "ltotal": -(2**63),
        "ultotal": 2**64 - 1,
        "lmask": 0xFEDCBA9876543210,
        "recipe": "Grün 2",
        "label": "Welle ✓",
        "changed": "2025-01-02T03:04:05.678",
        "changed_l": "2025-01-02T03:04:05.123456789",
        "db2_count": 43,
        "merker": False,
        "merker_word": 4321,
        "gravity": 1.5,
        "motor_on": False,
        "valve": 65535,
        "out_dint": -1,
    }
    # python-snap7's server takes an S7 bit write as a write of the whole byte (it ignores
    # the bit transport size), so the bits go as read-modify-write of their byte here
    config = s7_config(plc.port, points=WRITE_POINTS, bit_writes="byte")
    async with running(config) as r:
        dev = r.connector
        assert isinstance(dev, WritableConnector)
        await wait_for(lambda: dev.connected, "a connection")
        result = await dev.write(values)
        assert result.errors == dict.fromkeys(values)  # all None: written
        d1, d2, m, q = db(plc, 1), db(plc, 2), plc.areas[("M", 0)], plc.areas[("Q", 0)]
        assert util.get_bool(d1, 0, 0) is True
        assert util.get_bool(d1, 0, 1) is True and util.get_bool(d1, 0, 7) is True  # untouched
        assert util.get_byte(d1, 1) == 17 and util.get_char(d1, 2) == "q"
        assert util.get_sint(d1, 3) == -5 and util.get_usint(d1, 4) == 9
        assert util.get_word(d1, 6) == 0x1234 and util.get_int(d1, 8) == -32768
        assert util.get_uint(d1, 10) == 1 and util.get_dword(d1, 12) == 0xCAFEBABE
        assert util.get_dint(d1, 16) == 2**31 - 1 and util.get_udint(d1, 20) == 7
        assert util.get_real(d1, 24) == 2.5 and util.get_real(d1, 28) == -40.25
        assert util.get_lreal(d1, 32) == 2.718281828459045
        assert util.get_lint(d1, 40) == -(2**63) and util.get_ulint(d1, 48) == 2**64 - 1
        assert util.get_lword(d1, 56) == 0xFEDCBA9876543210
        assert util.get_string(d1, 64) == "Grün 2"
        assert util.get_wstring(d1, 82) == "Welle ✓"
        assert util.get_dt(d1, 102) == "2025-01-02T03:04:05.678000"
        assert util.get_dtl(d1, 110) == datetime(2025, 1, 2, 3, 4, 5, 123456)
        assert util.get_int(d2, 0) == 43
        assert util.get_bool(m, 10, 2) is False and util.get_int(m, 20) == 4321
        assert util.get_real(m, 30) == 1.5
        assert util.get_bool(q, 0, 7) is False and util.get_uint(q, 2) == 65535
        assert util.get_dint(q, 4) == -1
        # and the device reads back what it wrote
        start = len(r.records)
        await wait_for(lambda: len(r.records) > start + 1, "two more polls")
        last = r.records[-1].fields
        assert {k: last[k] for k in values} == values | {
            "changed": "2025-01-02T03:04:05.678",
            "changed_l": "2025-01-02T03:04:05.123456789",
        }


async def test_a_string_longer_than_a_pdu_goes_in_several_requests(plc: PlcServer) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(254))
    async with running(s7_config(plc.port, points=WRITE_POINTS, pdu_size=240)) as r:
        dev = r.connector
        await wait_for(lambda: dev.connected, "a connection")
        assert dev.pdu_size == 240
        writes = dev.writes
        assert (await dev.write({"long_text": text})).errors == {"long_text": None}
        assert dev.writes - writes == 2  # 256 bytes, 212 per request
    assert util.get_string(db(plc, 3), 0) == text


async def test_refused_out_of_range_and_device_errors_change_nothing(plc: PlcServer) -> None:
    before = {k: bytes(v) for k, v in plc.areas.items()}
    async with running(s7_config(plc.port, points=WRITE_POINTS)) as r:
        dev = r.connector
        await wait_for(lambda: dev.connected, "a connection")
        bus = Bus()
        router = CommandRouter(bus, lambda topic: dev if topic == dev.series.topic else None)
        replies = bus.subscribe(["$reply/#"], name="replies")
        task = asyncio.create_task(router.run())
        try:
            command = Record(
                Series("$cmd/plant/h1/plc1", "cmd"),
                {
                    "small": 200,
                    "ultotal": -1,
                    "pressure": 1e39,
                    "letter": "too long",
                    "recipe": "x" * 17,
                    "flag0": 1,
                    "door_closed": False,
                    "limited": 1001,
                    "changed": "yesterday",
                    "missing_db": 1,
                    "past_end": 1,
                },
                0,
                new_id(),
            )
            await bus.publish([command])
            async with asyncio.timeout(20):
                (reply,) = await replies.get()
        finally:
            task.cancel()
            await asyncio.wait({task})
    assert reply.parent == command.id and reply.series.topic == "$reply/plant/h1/plc1"
    assert reply.fields == {
        "small": "out of range: 200 does not fit sint [-128, 127]",
        "ultotal": "out of range: -1 does not fit ulint [0, 18446744073709551615]",
        "pressure": "out of range: 1e+39 does not fit a REAL",
        "letter": "out of range: a CHAR holds one Latin-1 character, not 'too long'",
        "recipe": "out of range: 17 characters do not fit the 16 of string[16]",
        "flag0": "refused: point 'flag0' takes true or false, not 1",
        "door_closed": "refused: point 'door_closed' is not writable",
        "limited": "out of range: 1001 is outside write_limits [0, 1000]",
        "changed": "refused: 'yesterday' is not a DATE_AND_TIME "
        "(ISO 8601 text such as 2024-03-27T14:30:00.250)",
        # python-snap7's server refuses a write to a missing DB or past the end of one
        # as a whole request (header error 0x8404) rather than with an item code
        "missing_db": "device error: Bad_CommunicationError (S7 header error 0x8404)",
        "past_end": "device error: Bad_CommunicationError (S7 header error 0x8404)",
    }
    assert {k: bytes(v) for k, v in plc.areas.items()} == before


async def test_a_late_write_reply_is_a_timeout_and_the_next_write_reconnects(
    plc: PlcServer,
) -> None:
    async with S7Proxy(plc.port) as proxy:
        config = s7_config(proxy.port, points=WRITE_POINTS, timeout="300ms", interval="100ms")
        async with running(config) as r:
            dev = r.connector
            await wait_for(lambda: dev.connected, "a connection")
            proxy.delay_write_reply(1.0)
            result = await dev.write({"db2_count": 7, "merker": False})
            why = f"timeout: no reply from 127.0.0.1:{proxy.port} within 0.3s"
            assert result.errors == {"db2_count": why, "merker": why}
            await wait_for(lambda: proxy.connections >= 2 and dev.connected, "a new connection")
            assert (await dev.write({"db2_count": 8})).errors == {"db2_count": None}
    assert util.get_int(db(plc, 2), 0) == 8
    assert util.get_bool(plc.areas[("M", 0)], 10, 2) is True  # the timed-out one not retried


@pytest.mark.parametrize(
    ("point", "message"),
    [
        (
            '{ name = "x", address = "I0.0", writable = true }',
            "points[0]: point 'x': writable applies to DB, M and Q addresses; I0.0 is an "
            "input, which the PLC reads from its input modules",
        ),
        (
            '{ name = "x", address = "DB1.DBB0", type = "string[4]", writable = true, '
            "write_limits = [0, 1] }",
            "points[0]: point 'x': write_limits applies only to numbers, not to string[4]",
        ),
        (
            '{ name = "x", address = "DB1.DBW0", write_limits = [0, 1] }',
            "points[0]: write_limits is set but writable is not true",
        ),
    ],
)
def test_check_refuses_write_keys_where_they_cannot_apply(
    tmp_path: Path, point: str, message: str
) -> None:
    text = f'[[devices.s7]]\nname = "d"\nhost = "h"\npoints = [{point}]\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "plantbus.toml")
    assert err.value.messages == [f"plantbus.toml: devices.s7[0].{message}"]


# -- read-back -------------------------------------------------------------------------------


async def test_read_back_reports_what_the_plc_holds_after_the_write(plc: PlcServer) -> None:
    text = "".join(chr(ord("A") + i % 26) for i in range(254))
    points = [dict(p) for p in WRITE_POINTS]
    for p in points:
        if p["name"] == "db2_count":
            p["read_back"] = False  # this point opts out of the device's read_back
    config = s7_config(
        plc.port, points=points, bit_writes="byte", pdu_size=240, read_back=True, interval="1h"
    )
    async with running(config) as r:
        dev = r.connector
        await wait_for(lambda: dev.connected and r.records, "the first poll")
        bus = Bus()
        router = CommandRouter(bus, lambda topic: dev if topic == dev.series.topic else None)
        replies = bus.subscribe(["$reply/#"], name="replies")
        task = asyncio.create_task(router.run())
        try:
            command = Record(
                Series("$cmd/plant/h1/plc1", "cmd"),
                {"strokes": -7, "pressure": 2.5, "recipe": "B 2", "merker": False,
                 "long_text": text, "changed": "2025-01-02T03:04:05.678", "db2_count": 9},
                0,
                new_id(),
            )  # fmt: skip
            await bus.publish([command])
            async with asyncio.timeout(20):
                (reply,) = await replies.get()
        finally:
            task.cancel()
            await asyncio.wait({task})
    d1, d3, m = db(plc, 1), db(plc, 3), plc.areas[("M", 0)]
    assert reply.fields == {
        "strokes": "ok",
        "strokes.read_back": -7,
        "pressure": "ok",
        "pressure.read_back": 2.5,
        "recipe": "ok",
        "recipe.read_back": "B 2",
        "merker": "ok",
        "merker.read_back": False,
        "long_text": "ok",
        "long_text.read_back": text,  # 256 bytes: two reads at PDU 240
        "changed": "ok",
        "changed.read_back": "2025-01-02T03:04:05.678",
        "db2_count": "ok",
    }
    # what the PLC's memory holds, read there with snap7.util
    assert util.get_int(d1, 8) == -7
    assert util.get_real(d1, 24) == 2.5 and util.get_string(d1, 64) == "B 2"
    assert util.get_bool(m, 10, 2) is False and util.get_string(d3, 0) == text
    assert util.get_dt(d1, 102) == "2025-01-02T03:04:05.678000"
    assert util.get_int(db(plc, 2), 0) == 9


async def test_a_late_read_back_is_its_error_and_the_write_stays_ok(plc: PlcServer) -> None:
    async with S7Proxy(plc.port) as proxy:
        config = s7_config(
            proxy.port, points=WRITE_POINTS, timeout="300ms", interval="1h", read_back=True
        )
        async with running(config) as r:
            dev = r.connector
            await wait_for(lambda: dev.connected and r.records, "the first poll")
            proxy.delay_reply(1.0)  # the next read reply: the read-back's (polls are 1h apart)
            result = await dev.write({"db2_count": 7, "merker_word": 99})
    why = f"timeout: no reply from 127.0.0.1:{proxy.port} within 0.3s"
    assert result.errors == {"db2_count": None, "merker_word": None}
    assert result.read_back == {}
    # the connection is gone after the timeout: the second point is not tried on it
    assert result.read_back_errors == {"db2_count": why, "merker_word": why}
    assert util.get_int(db(plc, 2), 0) == 7 and util.get_int(plc.areas[("M", 0)], 20) == 99
