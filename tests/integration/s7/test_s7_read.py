"""The s7 device against a real python-snap7 server: every area and type, the read plan on
the wire, unknown DBs and bad addresses, values that change."""

from __future__ import annotations

import logging
import struct

import pytest
from s7_harness import PlcServer, running, s7_config, wait_for
from s7_plc import EXPECTED, POINTS
from snap7.type import SrvArea

from plantbus.broker.record import Quality
from plantbus.connectors.s7.status import item_status

BAD_UNKNOWN_DB = 0x8034000A  # Bad_NodeIdUnknown + S7 item return code 0x0A
BAD_BEYOND_END = 0x80370005  # Bad_IndexRangeNoData + S7 item return code 0x05


@pytest.mark.parametrize(
    ("pdu_size", "granted"),
    [(240, 240), (960, 480)],  # the snap7 server grants at most 480
)
async def test_every_area_and_type_decodes_to_what_the_plc_holds(
    plc: PlcServer, pdu_size: int, granted: int
) -> None:
    async with running(s7_config(plc.port, pdu_size=pdu_size)) as dev:
        (record,) = await dev.next_records(1)
    assert record.fields == EXPECTED
    assert record.quality is Quality.GOOD and record.status is None
    assert record.series.topic == "plant/h1/plc1"
    assert record.series.tag_dict == {"site": "ulm", "device": "plc1"}
    c = dev.connector
    assert c.pdu_size == granted
    assert c.plan is not None and c.plan.pdu_size == granted
    # one poll = exactly the plan's requests, each answered
    assert c.requests == c.polls * len(c.plan.requests)


async def test_records_are_one_per_poll_with_increasing_times_and_ids(plc: PlcServer) -> None:
    async with running(s7_config(plc.port, interval="20ms")) as dev:
        records = await dev.next_records(5)
    assert len({r.id for r in records}) == 5
    times = [r.time_ns for r in records]
    assert times == sorted(times) and len(set(times)) == 5
    assert all(len(r.fields) == len(POINTS) for r in records)
    assert dev.connector.connects == 1 and dev.connector.faults == 0


async def test_a_large_map_is_read_in_requests_that_fit_the_pdu(plc: PlcServer) -> None:
    """120 points over DB1 and M at PDU 240: several requests, values spanning item cuts."""
    points = [
        {"name": f"w{i}", "address": f"DB1.DBW{2 * i}", "type": "uint"} for i in range(80)
    ] + [{"name": f"m{i}", "address": f"MB{i}"} for i in range(40)]
    async with running(s7_config(plc.port, pdu_size=240, points=points)) as dev:
        (record,) = await dev.next_records(1)
    db1, mk = plc.areas[("DB", 1)], plc.areas[("M", 0)]
    assert record.fields == {
        **{f"w{i}": struct.unpack_from(">H", db1, 2 * i)[0] for i in range(80)},
        **{f"m{i}": mk[i] for i in range(40)},
    }
    plan = dev.connector.plan
    assert plan is not None
    # DB1 0..159 is one range of 160 bytes, cut at 222 bytes (240 - 18): one item; M one more
    assert [(r.where, r.start, r.size) for r in plan.ranges] == [("DB1", 0, 160), ("M", 0, 40)]
    assert len(plan.requests) == 1
    for req in plan.requests:
        assert req.request_bytes <= 240 and req.response_bytes <= 240


async def test_values_that_straddle_two_requests_are_joined(own_plc: PlcServer) -> None:
    """A DINT at DB1.DBD220 lies across the 222-byte cut of a PDU 240 plan."""
    big = bytearray(range(256)) * 2
    struct.pack_into(">i", big, 220, -7654321)
    own_plc.server.register_area(SrvArea.DB, 5, big)
    points = [
        {"name": "head", "address": "DB5.DBB0"},
        {"name": "across", "address": "DB5.DBD220", "type": "dint"},
        {"name": "tail", "address": "DB5.DBB511"},
    ]
    async with running(s7_config(own_plc.port, pdu_size=240, points=points, max_gap=512)) as dev:
        (record,) = await dev.next_records(1)
    assert record.fields == {"head": 0, "across": -7654321, "tail": 255}
    plan = dev.connector.plan
    assert plan is not None
    assert [(it.start, it.size) for it in plan.items] == [(0, 222), (222, 222), (444, 68)]
    assert plan.point_items[1] == (0, 1)  # the DINT needs both pieces
    assert len(plan.requests) == 3


async def test_an_unknown_db_marks_its_points_bad_and_the_rest_flow(plc: PlcServer) -> None:
    points = [
        *POINTS,
        {"name": "ghost", "address": "DB99.DBW0", "type": "int"},
        {"name": "ghost_flag", "address": "DB99.DBX2.0"},
    ]
    async with running(s7_config(plc.port, points=points)) as dev:
        records = await dev.next_records(3)
    for record in records:
        assert record.fields == EXPECTED  # every other point, good
        assert record.status == {"ghost": BAD_UNKNOWN_DB, "ghost_flag": BAD_UNKNOWN_DB}
        assert record.quality is Quality.BAD
    assert dev.connector.faults == 0 and dev.connector.connects == 1


async def test_an_address_beyond_the_end_does_not_take_its_merged_neighbours_down(
    plc: PlcServer,
) -> None:
    """DB2 holds 8 bytes; a point at DB2.DBW10 merges with DB2's good points into one item
    the server refuses (0x05). The connector isolates that range's points and reads again,
    so from the first record on only the bad address is Bad."""
    points = [
        {"name": "db2_count", "address": "DB2.DBW0", "type": "int"},
        {"name": "db2_level", "address": "DB2.DBD2", "type": "real"},
        {"name": "past_end", "address": "DB2.DBW10", "type": "int"},
    ]
    async with running(s7_config(plc.port, points=points)) as dev:
        records = await dev.next_records(3)
    for record in records:
        assert record.fields == {"db2_count": 42, "db2_level": 0.5}
        assert record.status == {"past_end": BAD_BEYOND_END}
    plan = dev.connector.plan
    assert plan is not None and len(plan.ranges) == 3  # isolated: one range per point
    assert item_status(0x05) == BAD_BEYOND_END


async def test_values_follow_the_plc(own_plc: PlcServer) -> None:
    db1 = own_plc.areas[("DB", 1)]
    async with running(s7_config(own_plc.port, interval="20ms")) as dev:
        (first,) = await dev.next_records(1)
        assert first.fields["strokes"] == -1234
        db1[8:10] = struct.pack(">h", 4321)
        db1[0:1] = bytes([0b0000_0001])  # flag0 on, flag1 and flag7 off
        record = await wait_for(
            lambda: next((r for r in dev.records if r.fields["strokes"] == 4321), None),
            "a record with the new value",
        )
    assert (record.fields["flag0"], record.fields["flag1"], record.fields["flag7"]) == (
        True,
        False,
        False,
    )


async def test_a_device_polling_flat_out_stops_when_cancelled(plc: PlcServer) -> None:
    """python-snap7 reads with ``asyncio.wait_for``, which on Python 3.11 can drop a
    cancellation that arrives as a read completes: a drain must still stop the device."""
    for _ in range(3):
        async with running(s7_config(plc.port, interval="0s")) as dev:
            await wait_for(lambda: dev.connector.polls >= 300, "300 polls")
        # leaving the block cancelled the supervisor and awaited it: it ended
        assert dev.supervisor.status.phase.value == "stopped"
        assert dev.connector.connected is False


async def test_bytes_that_are_no_valid_value_mark_only_that_point_bad(
    own_plc: PlcServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="plantbus.connectors.s7")
    db1 = own_plc.areas[("DB", 1)]
    db1[102:110] = bytes.fromhex("2413010000000001")  # DATE_AND_TIME with month 13
    async with running(s7_config(own_plc.port, interval="20ms")) as dev:
        records = await dev.next_records(4)
        db1[102:110] = bytes.fromhex("2403270000000001")  # 2024-03-27 again
        await wait_for(lambda: dev.records[-1].status is None, "the point good again")
    for record in records:
        assert record.status == {"changed": 0x80380000}  # Bad_DataEncodingInvalid
        assert record.fields == {k: v for k, v in EXPECTED.items() if k != "changed"}
    assert dev.records[-1].fields["changed"] == "2024-03-27T00:00:00.000"
    # turning Bad and good again is logged once each, not every poll
    bad = [
        r for r in caplog.records if "point changed (DB1.DBB102:DATE_AND_TIME) is Bad" in r.message
    ]
    assert len(bad) == 1 and "invalid DATE_AND_TIME" in bad[0].message
    assert sum("points good again: changed" in r.message for r in caplog.records) == 1
