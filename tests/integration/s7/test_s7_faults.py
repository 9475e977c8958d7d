"""Faults, each against a real python-snap7 server: a PLC absent at start, switched off and
on again, a reply that comes too late, a reply that comes twice, a peer that never answers.

Faults a server cannot produce on demand come from ``S7Proxy`` (a late or doubled reply) or
a bare TCP listener (a hung peer); the PLC's values always come from the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

from s7_harness import PlcServer, running, s7_config, wait_for
from s7_plc import EXPECTED, POINTS, PlcProcess
from s7_proxy import S7Proxy
from servers import free_port

from plantbus.broker.config import parse_config
from plantbus.broker.record import Quality, Record
from plantbus.broker.runtime import Runtime
from plantbus.broker.supervisor import Phase
from plantbus.connectors.s7.link import LinkClosed, LinkDesync, LinkTimeout
from plantbus.connectors.s7.status import (
    BAD_COMMUNICATION_ERROR,
    BAD_CONNECTION_CLOSED,
    BAD_TIMEOUT,
)

ALL_POINTS = set(EXPECTED)


def _points_toml() -> str:
    items = []
    for p in POINTS:
        extra = f', type = "{p["type"]}"' if "type" in p else ""
        items.append(f'  {{ name = "{p["name"]}", address = "{p["address"]}"{extra} }},')
    return "points = [\n" + "\n".join(items) + "\n]\n"


async def test_plc_absent_at_start_the_daemon_keeps_running_and_retries(
    tmp_path: Path,
) -> None:
    """The runtime's own supervisor and backoff (equal jitter from 0.5 s) retry the PLC
    while another device keeps flowing; once the PLC is there, its records flow."""
    port = free_port()
    config = parse_config(
        f"""
[node]
name = "edge"
state_dir = "{tmp_path}"
[api]
enabled = false

[[devices.sim]]
name = "sim1"
interval = "20ms"
points = [{{ name = "n", signal = "counter" }}]

[[devices.s7]]
name = "plc1"
topic = "plant/h1/plc1"
host = "127.0.0.1"
port = {port}
interval = "50ms"
timeout = "1s"
{_points_toml()}
""",
        tmp_path / "plantbus.toml",
    )
    runtime = Runtime(config)
    sub = runtime.bus.subscribe(["plant/h1/plc1"], size=10_000, name="test")
    await runtime.start()
    try:
        plc = runtime.devices["plc1"]
        sim = runtime.devices["sim1"]
        delays: list[float] = []

        def note_delay() -> bool:
            st = plc.supervisor.status
            backing_off = st.phase is Phase.BACKING_OFF and st.retry_in is not None
            if backing_off and len(delays) < st.restarts:
                delays.append(st.retry_in)
            return st.restarts >= 3

        await wait_for(note_delay, "three failed connects", limit=10)
        status = plc.supervisor.status
        assert status.last_error is not None
        assert status.last_error.startswith("LinkClosed: cannot connect to 127.0.0.1:")
        # equal jitter: each delay between half and all of 0.5 s, 1 s, 2 s ...
        for n, delay in enumerate(delays[:3]):
            step = 0.5 * 2**n
            assert step / 2 <= delay <= step, delays
        assert sim.emitted > 0 and sim.supervisor.status.phase is Phase.RUNNING
        assert plc.emitted == 0

        with PlcProcess(port):
            batch = await asyncio.wait_for(sub.get(), 15)
        record = batch[0]
        assert record.fields == EXPECTED and record.quality is Quality.GOOD
        assert runtime.devices["plc1"].connector.connects == 1  # type: ignore[attr-defined]
    finally:
        await runtime.shutdown()


async def test_plc_switched_off_and_on_again_is_reconnected(tmp_path: Path) -> None:
    port = free_port()
    first = PlcProcess(port, generation=1).start()
    try:
        async with running(s7_config(port, timeout="500ms")) as dev:
            before = await dev.next_records(2)
            assert all(r.fields == EXPECTED for r in before)

            first.kill()  # power off: the connection is cut
            lost = await wait_for(
                lambda: next((r for r in dev.records if r.status), None), "a Bad record"
            )
            # the poll that found the connection gone: every point Bad, nothing as a value
            assert lost.fields == {}
            assert set(lost.status or {}) == ALL_POINTS
            assert set((lost.status or {}).values()) <= {BAD_CONNECTION_CLOSED, BAD_TIMEOUT}
            await wait_for(lambda: dev.supervisor.status.phase is Phase.BACKING_OFF, "backing off")

            with PlcProcess(port, generation=2):
                record = await wait_for(
                    lambda: next((r for r in dev.records if r.fields.get("generation") == 2), None),
                    "a record from the restarted PLC",
                )
                assert record.fields == {**EXPECTED, "generation": 2}
                assert record.quality is Quality.GOOD
        c = dev.connector
        assert c.connects == 2 and c.faults == 1
        # between the lost poll and the first record of the new PLC nothing was emitted
        i = dev.records.index(lost)
        assert dev.records[i + 1].fields.get("generation") == 2
    finally:
        first.kill()


def _strokes(records: list[Record]) -> list[int | None]:
    return [r.fields.get("strokes") for r in records]  # type: ignore[misc]


async def test_after_a_timeout_the_connection_is_dropped_and_a_late_reply_never_used(
    own_plc: PlcServer,
) -> None:
    """The proxy holds one reply (strokes = -1234) for 1 s; the device times out after
    0.3 s. Meanwhile the PLC's value changes to 4321: a client that kept the connection
    would now read the held, stale reply as the answer to its next request."""
    db1 = own_plc.areas[("DB", 1)]
    async with S7Proxy(own_plc.port) as proxy:
        config = s7_config(proxy.port, interval="20ms", timeout="300ms")
        async with running(config) as dev:
            await dev.next_records(3)
            proxy.delay_reply(1.0)
            await asyncio.wait_for(proxy.fault_done.wait(), 5)
            db1[8:10] = struct.pack(">h", 4321)
            late = await wait_for(
                lambda: next((r for r in dev.records if r.status), None), "the timed-out poll"
            )
            assert late.fields == {}
            assert late.status == dict.fromkeys(ALL_POINTS, BAD_TIMEOUT)
            await wait_for(
                lambda: len([r for r in dev.records[dev.records.index(late) :] if r.fields]) >= 5,
                "records after the timeout",
            )
        after = dev.records[dev.records.index(late) + 1 :]
        assert after and all(r.fields.get("strokes") == 4321 for r in after), _strokes(after)
        assert all(r.quality is Quality.GOOD for r in after)
        assert proxy.connections == 2 and proxy.fault_connection == 1
        c = dev.connector
        assert c.connects == 2 and c.faults == 1
        assert (dev.supervisor.status.last_error or "").startswith("LinkTimeout: no reply")


async def test_a_reply_out_of_step_is_never_taken_for_the_next_one(own_plc: PlcServer) -> None:
    """The proxy sends one reply twice: the copy arrives as the answer to the next request.
    Its PDU reference is the earlier one, so the device refuses it and reconnects."""
    db1 = own_plc.areas[("DB", 1)]
    async with S7Proxy(own_plc.port) as proxy:
        async with running(s7_config(proxy.port, interval="50ms", timeout="1s")) as dev:
            await dev.next_records(2)
            proxy.duplicate_reply()
            await asyncio.wait_for(proxy.fault_done.wait(), 5)
            db1[8:10] = struct.pack(">h", 777)
            bad = await wait_for(
                lambda: next((r for r in dev.records if r.status), None), "the refused reply"
            )
            assert bad.status == dict.fromkeys(ALL_POINTS, BAD_COMMUNICATION_ERROR)
            await wait_for(
                lambda: len(dev.records) > dev.records.index(bad) + 3, "records after it"
            )
        after = dev.records[dev.records.index(bad) + 1 :]
        assert all(r.fields.get("strokes") == 777 for r in after), _strokes(after)
        assert proxy.connections == 2
        assert (dev.supervisor.status.last_error or "").startswith("LinkDesync: ")


@contextlib.asynccontextmanager
async def _silent_listener() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers (a hung PLC)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_peer_that_never_answers_times_out_and_is_retried() -> None:
    async with _silent_listener() as port, running(s7_config(port, timeout="200ms")) as dev:
        await wait_for(lambda: dev.supervisor.status.restarts >= 2, "two restarts")
    assert dev.records == []
    assert (dev.supervisor.status.last_error or "").startswith(
        f"LinkTimeout: no answer from 127.0.0.1:{port} within 0.2s"
    )
    assert dev.connector.connects == 0


def test_link_errors_carry_the_bad_code_of_their_points() -> None:
    assert LinkTimeout.status == BAD_TIMEOUT
    assert LinkClosed.status == BAD_CONNECTION_CLOSED
    assert LinkDesync.status == BAD_COMMUNICATION_ERROR
