"""A slow WebSocket client loses records to its own queue only, and is told how many.

Beside it run a fast client and a file sink. 20,000 records of about 2 kB each (40 MB of
JSON per client, far more than the socket buffers hold) are published through the API while
the slow client reads nothing. The publisher must finish, the fast client and the sink must
get every record, and the slow client, once it reads, must get records in publish order
with ``{"dropped": n}`` frames before each gap, the received and the dropped adding up to
everything published.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from api_harness import receive_json, running

CONFIG = """
[node]
name = "edge"
state_dir = "{dir}/state"
shutdown_timeout = "30s"

[api]
listen = "127.0.0.1:{port}"
queue = { size = 50000, policy = "drop_oldest" }

[[sinks.file]]
path = "out.lp"
subscribe = ["app/#"]
flush_interval = "50ms"
"""

TOTAL = 20_000
PER_REQUEST = 500
PAD = "x" * 2000


async def test_a_slow_client_drops_its_own_records_and_nobody_else_waits(tmp_path: Path) -> None:
    async with running(tmp_path, CONFIG) as d, aiohttp.ClientSession() as session:
        slow = await session.ws_connect(d.subscribe_url("app/#", queue_size=1000))
        assert (await receive_json(slow))["queue"] == {"size": 1000, "policy": "drop_oldest"}
        fast = await session.ws_connect(d.subscribe_url("app/#"))
        assert (await receive_json(fast))["queue"] == {"size": 50000, "policy": "drop_oldest"}
        fast_uids: list[str] = []
        fast_control: list[object] = []

        async def read_fast() -> None:
            while len(fast_uids) < TOTAL:
                frame = await receive_json(fast)
                if isinstance(frame, list):
                    fast_uids.extend(r["uid"] for r in frame)
                else:
                    fast_control.append(frame)

        reader = asyncio.create_task(read_fast())
        published: list[str] = []
        for i in range(0, TOTAL, PER_REQUEST):
            body = json.dumps([{"fields": {"n": n, "pad": PAD}} for n in range(i, i + PER_REQUEST)])
            async with session.post(d.publish_url("app/stream"), data=body) as r:
                assert r.status == 200
                published.extend((await r.json())["uids"])
        # the publisher finished while the slow client read nothing at all
        await asyncio.wait_for(reader, 120)
        assert fast_uids == published
        assert fast_control == []
        (slow_client,) = [
            c for c in d.api.metrics()["per_client"].values() if c["records_sent"] < TOTAL
        ]
        assert slow_client["dropped"] > 0

        # now the slow client reads: in order, gaps announced, nothing unaccounted for
        got: list[str] = []
        reported = 0
        gaps_before: list[int] = []
        while not got or got[-1] != published[-1]:
            frame = await receive_json(slow)
            if isinstance(frame, dict):
                reported += frame["dropped"]
                assert frame["dropped_total"] == reported
                gaps_before.append(len(got))
            else:
                got.extend(r["uid"] for r in frame)
        position = {uid: i for i, uid in enumerate(published)}
        indexes = [position[u] for u in got]
        assert indexes == sorted(indexes)  # in publish order, none twice
        assert len(got) + reported == TOTAL
        assert gaps_before  # the client was told
        # each announced gap is a real gap in what it received
        for at in gaps_before:
            if 0 < at < len(indexes):
                assert indexes[at] > indexes[at - 1] + 1
        await slow.close()
        await fast.close()
    # the sink took every record (checked after the drain)
    lines = (tmp_path / "out.lp").read_text().splitlines()
    assert len(lines) == TOTAL
    assert all(f'uid="{u}"' in line for u, line in zip(published, lines, strict=True))
