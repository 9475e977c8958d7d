"""Poll mode against a real asyncua server: values, types, status codes, timestamps, chunking."""

from __future__ import annotations

import time

from opcua_harness import BULK, UaServer, device, running

from plantbus.broker.record import Quality

UNCERTAIN_LAST_USABLE = 0x40900000
BAD_SENSOR_FAILURE = 0x808B0000
BAD_NODE_ID_UNKNOWN = 0x80340000
BAD_NO_VALUE = 0x80F00000


def points(server: UaServer, **names: str) -> list[dict[str, str]]:
    return [{"name": name, "node": server.node(ident)} for name, ident in names.items()]


def bulk(server: UaServer, n: int = BULK) -> list[dict[str, str]]:
    return [{"name": f"v{i}", "node": server.node(f"s=Bulk.v{i}")} for i in range(n)]


async def test_each_poll_is_one_record_with_every_type_as_the_server_holds_it(
    ua_server: UaServer,
) -> None:
    config = device(
        ua_server.url,
        points(
            ua_server,
            temp="s=Line1.Temp",
            count="s=Line1.Count",
            big="s=Line1.Big",
            small="s=Line1.Small",
            ratio="s=Line1.Ratio",
            running="s=Line1.Running",
            name="s=Line1.Name",
            stamp="s=Line1.Stamp",
            raw="s=Line1.Raw",
            label="s=Line1.Label",
            numeric="i=1001",
            vector="s=Line1.Vector",
        ),
        interval="50ms",
        timestamp="read",
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: len(out.batches) >= 3, what="3 polls")
    assert all(len(batch) == 1 for batch in out.batches)  # one record per poll
    first = out.batches[0][0]
    assert first.fields == {
        "temp": 21.5,
        "count": 7,
        "big": 2**40 + 3,
        "small": 65535,
        "ratio": 0.25,
        "running": True,
        "name": "press 7",
        "stamp": 1_700_000_000_123_456_000,
        "raw": "00ff10",
        "label": "Betrieb",
        "numeric": 3.5,
        "vector": "[1.5,2.5,3.5]",
    }
    assert first.quality is Quality.GOOD and first.status is None
    assert type(first.fields["count"]) is int and type(first.fields["running"]) is bool
    assert first.series.topic == "edge/ua1"
    assert first.series.tag_dict == {"device": "ua1", "site": "test"}
    assert connector.values >= 3 * 12 and connector.emitted == len(out.records)


async def test_status_codes_map_to_quality_and_bad_values_are_never_fields(
    ua_server: UaServer,
) -> None:
    config = device(
        ua_server.url,
        points(
            ua_server,
            temp="s=Line1.Temp",
            stale="s=Line1.Stale",
            broken="s=Line1.Broken",
            empty="s=Line1.Empty",
            missing="s=Line1.NoSuchVariable",
        ),
        interval="50ms",
        timestamp="read",
    )
    async with running(config) as (_, out):
        await out.wait(lambda: out.batches, what="a poll")
    (record,) = out.batches[0]
    # Uncertain keeps its value and is listed; Bad ones are listed and left out
    assert record.fields == {"temp": 21.5, "stale": 5.5}
    assert record.status == {
        "stale": UNCERTAIN_LAST_USABLE,
        "broken": BAD_SENSOR_FAILURE,
        "empty": BAD_NO_VALUE,
        "missing": BAD_NODE_ID_UNKNOWN,
    }
    assert record.quality is Quality.BAD  # the worst of its points


async def test_source_timestamps_make_one_record_per_distinct_time(ua_server: UaServer) -> None:
    t1 = time.time_ns() // 1000 * 1000 - 5_000_000_000  # µs precision, as OPC UA carries it
    t2 = t1 + 1_000_000
    first = [{"node": f"s=Bulk.v{i}", "type": "Double", "value": float(i)} for i in range(4)]
    second = [{"node": f"s=Bulk.v{i}", "type": "Double", "value": float(i)} for i in range(4, 6)]
    await ua_server.acall("write_many", items=first, source_ns=t1)
    await ua_server.acall("write_many", items=second, source_ns=t2)
    async with running(device(ua_server.url, bulk(ua_server, 6), interval="50ms")) as (_, out):
        await out.wait(lambda: out.batches, what="a poll")
    records = out.batches[0]
    assert [(r.time_ns, r.fields) for r in records] == [
        (t1, {"v0": 0.0, "v1": 1.0, "v2": 2.0, "v3": 3.0}),
        (t2, {"v4": 4.0, "v5": 5.0}),
    ]
    assert len({r.id for r in records}) == 2


async def test_server_timestamps_group_by_the_servers_time(ua_server: UaServer) -> None:
    items = [{"node": f"s=Bulk.v{i}", "type": "Double", "value": float(i)} for i in range(3)]
    before = time.time_ns()
    await ua_server.acall("write_many", items=items, source_ns=before - 10**10)
    after = time.time_ns()
    config = device(ua_server.url, bulk(ua_server, 3), interval="50ms", timestamp="server")
    async with running(config) as (_, out):
        await out.wait(lambda: out.batches, what="a poll")
    (record,) = out.batches[0]
    assert record.fields == {"v0": 0.0, "v1": 1.0, "v2": 2.0}
    assert before - 1000 <= record.time_ns <= after  # the server's time, not the source's


async def test_reads_are_chunked_by_the_servers_max_nodes_per_read(ua_server: UaServer) -> None:
    await ua_server.acall("limit", value=7)  # published and enforced: 8 nodes are refused
    try:
        await ua_server.acall("reads")
        config = device(ua_server.url, bulk(ua_server), interval="50ms", timestamp="read")
        async with running(config) as (_, out):
            await out.wait(lambda: len(out.batches) >= 2, what="2 polls")
        sizes = (await ua_server.acall("reads"))["sizes"]
    finally:
        await ua_server.acall("limit", value=10000)
    assert out.batches[0][0].fields == {f"v{i}": float(i) for i in range(BULK)}
    assert out.batches[0][0].status is None
    assert max(sizes) == 7 and sorted(sizes[:3]) == [6, 7, 7]


async def test_chunk_size_applies_when_the_server_publishes_no_limit(ua_server: UaServer) -> None:
    await ua_server.acall("limit", value=0)
    try:
        await ua_server.acall("reads")
        config = device(
            ua_server.url, bulk(ua_server), interval="50ms", timestamp="read", chunk_size=8
        )
        async with running(config) as (_, out):
            await out.wait(lambda: out.batches, what="a poll")
        sizes = (await ua_server.acall("reads"))["sizes"]
    finally:
        await ua_server.acall("limit", value=10000)
    assert out.batches[0][0].fields == {f"v{i}": float(i) for i in range(BULK)}
    assert sorted(sizes[:3]) == [4, 8, 8]


async def test_connections_spread_the_points_over_sessions(ua_server: UaServer) -> None:
    await ua_server.acall("reads")
    config = device(
        ua_server.url, bulk(ua_server), interval="50ms", timestamp="read", connections=3
    )
    async with running(config) as (connector, out):
        await out.wait(lambda: out.batches, what="a poll")
    sizes = (await ua_server.acall("reads"))["sizes"]
    assert [len(batch) for batch in out.batches[:1]] == [1]  # still one record per poll
    assert out.batches[0][0].fields == {f"v{i}": float(i) for i in range(BULK)}
    assert sorted(sizes[:3]) == [6, 7, 7]  # one Read per session
    assert connector.connects == 1


async def test_namespace_uris_are_resolved_on_the_server(ua_server: UaServer) -> None:
    config = device(
        ua_server.url,
        [
            {"name": "temp", "node": "nsu=urn:plantbus:test;s=Line1.Temp"},
            {"name": "other", "node": "nsu=urn:nobody:knows;s=Line1.Temp"},
        ],
        interval="50ms",
        timestamp="read",
    )
    async with running(config) as (_, out):
        await out.wait(lambda: out.batches, what="a poll")
    (record,) = out.batches[0]
    assert record.fields == {"temp": 21.5}
    assert record.status is not None and record.status["other"] >= 0x80000000
