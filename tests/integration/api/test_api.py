"""The consumer API against a real runtime: subscribe, publish, ``/healthz``.

A ``sim`` device and a file sink run in a real runtime; clients talk to the API over real
TCP (and a Unix socket). What is checked is what a consumer app sees: records by uid and
counter value, the frames they come in, the answers to bad requests, and that a refused
request published nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from api_harness import eventually, receive_json, running
from servers import free_port

CONFIG = """
[node]
name = "edge"
state_dir = "{dir}/state"

[api]
listen = "127.0.0.1:{port}"
unix = "{dir}/api.sock"

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "20ms"
batch = 50
points = [{ name = "n", signal = "counter" }]

[[sinks.file]]
path = "out.lp"
subscribe = ["app/#"]
flush_interval = "20ms"
"""


async def test_subscribers_get_every_record_in_frames_of_whole_deliveries(tmp_path: Path) -> None:
    async with running(tmp_path, CONFIG) as d, aiohttp.ClientSession() as session:
        async with session.ws_connect(d.subscribe_url("plant/#")) as ws:
            hello = await receive_json(ws)
            assert hello == {
                "subscribed": ["plant/#"],
                "queue": {"size": 10_000, "policy": "drop_oldest"},
            }
            frames = []
            while sum(len(f) for f in frames) < 2000:
                frames.append(await receive_json(ws))
        records = [r for f in frames for r in f]
        # one frame per delivery of the device's 50-record reads (or several that queued)
        assert all(len(f) % 50 == 0 for f in frames), [len(f) for f in frames]
        assert len(frames) < len(records) / 10
        ns = [r["fields"]["n"] for r in records]
        assert ns == list(range(ns[0], ns[0] + len(ns)))  # none missing, none doubled
        assert len({r["uid"] for r in records}) == len(records)
        first = records[0]
        assert set(first) == {"uid", "topic", "measurement", "time", "tags", "fields", "quality"}
        assert first["topic"] == "plant/press"
        assert first["tags"] == {"device": "press"}
        assert first["quality"] == "good"
        assert isinstance(first["time"], int)


async def test_publish_fills_in_uid_time_and_measurement_and_keeps_what_is_given(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, CONFIG) as d, aiohttp.ClientSession() as session:
        async with session.ws_connect(d.subscribe_url("app/#")) as ws:
            await receive_json(ws)
            given = {
                "uid": "01a24e4a-0000-7000-8000-000000000001",
                "topic": "app/b",
                "measurement": "scores",
                "time": 1_700_000_000_123_456_789,
                "tags": {"line": "L1"},
                "fields": {"z": 2.5, "ok": True, "label": "fine"},
                "quality": "uncertain",
                "parent": "01a24e4a-0000-7000-8000-000000000000",
            }
            body = json.dumps([{"fields": {"a": 1}}, {"fields": {"a": 2}}, given])
            async with session.post(d.publish_url("app/a"), data=body) as r:
                assert r.status == 200
                answer = await r.json()
            assert answer["published"] == 3
            assert answer["uids"][2] == given["uid"]
            got = []
            while len(got) < 3:
                got.extend(await receive_json(ws))
        a1, a2, b = got
        assert [a1["uid"], a2["uid"]] == answer["uids"][:2]
        assert a1["topic"] == "app/a" and a1["measurement"] == "a" and a1["tags"] == {}
        assert a1["fields"] == {"a": 1} and a2["fields"] == {"a": 2}
        assert a1["time"] == a2["time"] > 1_700_000_000_123_456_789  # the time of arrival
        assert b == given
    # the sink got them too (complete once the runtime drained)
    lines = (tmp_path / "out.lp").read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("scores,line=L1 ")


BAD = [
    (b"[{", "not a JSON array of records: not JSON"),
    (b'{"topic": "app/a"}', "record: missing 'fields'"),
    (b'[{"fields": {"a": 1}}, {"fields": {"a": NaN}}]', "NaN is not a JSON value"),
    (b'[{"fields": {"a": 1}}, {"fields": {"a": [1]}}]', "[1].fields.a: expected a number"),
    (b'[{"fields": {"a": 1}, "colour": "red"}]', "[0]: unknown key 'colour'"),
    (b'[{"topic": "app/+", "fields": {"a": 1}}]', "[0]: topic: topic 'app/+' holds a wildcard"),
    (b'[{"fields": {"a": 1}}, {"fields": {"a": 1}, "quality": "meh"}]', "[1].quality"),
    (b'[{"fields": {"a": 1}, "uid": ""}]', "[0]: uid is empty (leave it out: a new one is given)"),
    (b'[{"fields": {"a": 1}, "parent": ""}]', "[0]: parent is empty (leave it out"),
]


async def test_bad_records_are_a_400_with_the_reason_and_nothing_is_published(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, CONFIG) as d, aiohttp.ClientSession() as session:
        async with session.ws_connect(d.subscribe_url("app/#")) as ws:
            await receive_json(ws)
            for body, reason in BAD:
                async with session.post(d.publish_url("app/a"), data=body) as r:
                    doc = await r.json()
                    assert r.status == 400, (body, doc)
                    assert reason in doc["error"], (body, doc)
            # a record without a topic and no ?topic=
            async with session.post(
                d.publish_url(), data=b'[{"topic": "app/a", "fields": {"a": 1}}, {"fields": {}}]'
            ) as r:
                assert r.status == 400
                assert (await r.json())["error"] == (
                    "[1]: no 'topic': give it in the record or as ?topic="
                )
            # then a good one: the first record the subscriber sees is that one
            async with session.post(d.publish_url("app/ok"), data=b'{"fields": {"a": 7}}') as r:
                assert r.status == 200
            (rec,) = await receive_json(ws)
            assert rec["topic"] == "app/ok" and rec["fields"] == {"a": 7}
        assert d.api.published == 1
        assert d.api.refused[400] == len(BAD) + 1


async def test_a_body_over_max_request_size_is_a_413(tmp_path: Path) -> None:
    text = CONFIG.replace('unix = "{dir}/api.sock"', 'max_request_size = "4KiB"')
    async with running(tmp_path, text) as d, aiohttp.ClientSession() as session:
        body = json.dumps([{"fields": {"s": "x" * 5000}}])
        async with session.post(d.publish_url("app/a"), data=body) as r:
            assert r.status == 413
            assert (await r.json())["status"] == 413
        assert d.api.published == 0


async def test_publishing_over_the_websocket_is_answered_in_order(tmp_path: Path) -> None:
    async with running(tmp_path, CONFIG) as d, aiohttp.ClientSession() as session:
        async with session.ws_connect(d.subscribe_url("app/#")) as ws:
            await receive_json(ws)
            await ws.send_str('[{"topic": "app/w", "fields": {"a": 1}}]')
            await ws.send_str('[{"fields": {"a": 1}}]')  # no topic: refused
            await ws.send_str('[{"topic": "$cmd/plant/press", "fields": {"n": 1}}]')
            frames = [await receive_json(ws) for _ in range(4)]
        acks = [f for f in frames if isinstance(f, dict)]
        records = [r for f in frames if isinstance(f, list) for r in f]
        assert acks[0]["published"] == 1
        assert acks[1] == {
            "error": "[0]: no 'topic': give it in the record or as ?topic=",
            "status": 400,
        }
        assert acks[2]["status"] == 403 and "local_commands" in acks[2]["error"]
        assert [r["uid"] for r in records] == acks[0]["uids"]


async def test_the_unix_socket_serves_the_same_api(tmp_path: Path) -> None:
    async with running(tmp_path, CONFIG):
        unix = aiohttp.UnixConnector(path=str(tmp_path / "api.sock"))
        url = "http://plantbus/v1/subscribe?filter=plant/press"
        async with (
            aiohttp.ClientSession(connector=unix) as session,
            session.ws_connect(url) as ws,
        ):
            await receive_json(ws)
            records = await receive_json(ws)
            assert records and records[0]["topic"] == "plant/press"
    assert not (tmp_path / "api.sock").exists()  # removed when the API stopped


async def test_stopping_sends_what_is_queued_and_closes_with_1001(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        async with running(tmp_path, CONFIG) as d:
            ws = await session.ws_connect(d.subscribe_url("plant/#"))
            await receive_json(ws)
            device = d.runtime.devices["press"]
            first = device.emitted

            async def emitted_more() -> bool:
                return device.emitted >= first + 500

            await eventually(emitted_more, 30, "500 more records")
        # the runtime drained, then the API stopped: the socket closes after the last record
        ns = []
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            ns.extend(r["fields"]["n"] for r in json.loads(msg.data))
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert (msg.data, msg.extra) == (1001, "plantbus is stopping")
        assert len(ns) >= 500
        assert ns == list(range(device.emitted - len(ns), device.emitted))
        await ws.close()


HEALTH = """
[node]
name = "edge"
state_dir = "{dir}/state"
shutdown_timeout = "1s"  # the sink that is down keeps its records

[api]
listen = "127.0.0.1:{port}"

[[devices.sim]]
name = "press"
topic = "plant/press"
interval = "50ms"
points = [{ name = "n", signal = "counter" }]

[[sinks.file]]
path = "out.lp"
subscribe = ["plant/#"]

[[sinks.influxdb]]
name = "down"
url = "http://127.0.0.1:%d"
database = "plant"
subscribe = ["plant/#"]
flush_interval = "50ms"
retry_initial = "50ms"
retry_max = "200ms"
"""


async def test_healthz_is_503_naming_the_sink_while_a_sink_fails(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: every write fails to connect
    async with running(tmp_path, HEALTH % closed) as d, aiohttp.ClientSession() as session:

        async def failing() -> tuple[int, dict] | None:  # type: ignore[type-arg]
            async with session.get(f"{d.url}/healthz") as r:
                return (r.status, await r.json()) if r.status == 503 else None

        _, doc = await eventually(failing, 30, "/healthz to report the sink down")
        assert doc["status"] == "failing"
        assert doc["failing"] == ["down"]
        assert doc["sinks"]["down"]["health"] == "retrying"
        assert "127.0.0.1" in doc["sinks"]["down"]["last_error"]
        assert doc["sinks"]["file"]["health"] == "ok"
        assert doc["devices"]["press"]["state"] == "running"
        assert doc["devices"]["press"]["emitted"] > 0
