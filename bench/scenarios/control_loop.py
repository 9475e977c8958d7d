"""``control_loop``: a device's value change → a consumer app → its command written back.

Three processes besides this one's daemon, as in a plant:

* **the device**: a real pymodbus ``ModbusTcpServer`` or asyncua ``Server`` in its own
  process (``python -m bench.scenarios.control_loop server modbus|opcua``). It runs the
  loops: for loop k it sets its ``trigger`` value to k and notes ``time.monotonic_ns()``
  right before; its write callback (pymodbus: the datastore's ``async_setValues``; asyncua:
  the Write service) notes the time a client's write of ``response`` = k lands. Both
  times come from one process's CLOCK_MONOTONIC, so loop latency = landing − change. Then
  it waits a random 5-15 ms (a thread's sleep, not the loop's millisecond timer, so that
  changes fall at every phase of the poll or publish cycle) and starts loop k + 1.
  ``WARMUP_LOOPS`` first, then ``LOOPS`` (``BENCH_CONTROL_LOOPS``, default 1000) measured;
  a loop without its write within ``LOOP_TIMEOUT_S`` is ``lost``.
* **the daemon** (this process): ``Runtime`` and ``ConsumerApi`` built from a config text, as
  ``plantbus run`` does: one device (Modbus TCP polled every 2 ms: ``trigger`` and
  ``response`` in one read; or OPC UA in subscribe mode at the smallest publishing interval
  plantbus asks for, 1 ms, with the interval the server granted in the result), the API on
  loopback TCP with ``local_commands = true``.
* **the consumer app** (``… client URL TOPIC``): aiohttp on uvloop, one WebSocket subscribed
  to the device topic; on a record whose ``trigger`` differs from the last one seen it sends
  a command frame ``[{"topic": "$cmd/<topic>", "fields": {"response": k}}]`` on the same
  WebSocket. It notes (CLOCK_MONOTONIC) when each such frame arrived, which splits a loop
  into ``detect`` (device change → the app has the record: poll or publish wait, connector,
  bus, API, WebSocket) and ``act`` (app → write landed: WebSocket publish, bus, command
  router, connector write, device). A subscriber of the daemon's bus beside the API's
  notes when the record was taken off the bus, which splits ``detect`` into
  ``device_to_bus`` (poll or publish wait, the connector) and ``bus_to_app`` (API, WebSocket,
  the app's parsing).

One JSON line per protocol: ``p50_ms`` / ``p99_ms`` / ``max_ms`` per loop (change → write
landed), ``detect_*`` and ``act_*``, ``loops``, ``lost``, ``records_per_s`` = loops per
second, ``cpu_us_per_record`` = daemon CPU per loop (it polls all along, so this is mostly
polling), ``interval_ms`` (the poll interval, or the granted publishing interval),
``goal_p99_ms`` = 10 ms + that interval and ``goal_met``; ``daemon_cpu_pct``,
``client_cpu_pct``, ``device_cpu_pct`` and ``others_cpu_pct`` (what other processes took
meanwhile: all cores, % of one), and the router's ``commands`` / ``points_failed``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Window,
    log,
    percentiles_ms,
    proc_cpu_seconds,
    report,
    run_loop,
    system_busy_seconds,
)

PROTOCOLS = ("modbus", "opcua")
LOOPS = int(os.environ.get("BENCH_CONTROL_LOOPS", "1000"))
WARMUP_LOOPS = 50
GAP_S = (0.005, 0.015)
LOOP_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.002
PUBLISH_INTERVAL_S = 0.001
"""The publishing interval plantbus asks the OPC UA server for (its smallest: subscribe mode
needs one above 0; asyncua's 0 would mean publishing on every change without keep-alives)."""
BUDGET_MS = 10.0
TOPIC = "bench/press"
TRIGGER, RESPONSE = 0, 1  # Modbus holding registers
UA_TRIGGER, UA_RESPONSE = "ns=2;s=C.Trigger", "ns=2;s=C.Response"


def config_text(state: Path, api_port: int, protocol: str, device_port: int) -> str:
    text = (
        "[node]\n"
        'name = "bench"\n'
        f'state_dir = "{state}"\n\n'
        "[api]\n"
        f'listen = "127.0.0.1:{api_port}"\n'
        "local_commands = true\n\n"
    )
    if protocol == "modbus":
        return text + (
            "[[devices.modbus]]\n"
            'name = "press"\n'
            f'topic = "{TOPIC}"\n'
            'host = "127.0.0.1"\n'
            f"port = {device_port}\n"
            f'interval = "{POLL_INTERVAL_S * 1000:g}ms"\n'
            "points = [\n"
            f'  {{ name = "trigger", address = {TRIGGER} }},\n'
            f'  {{ name = "response", address = {RESPONSE}, writable = true }},\n'
            "]\n"
        )
    return text + (
        "[[devices.opcua]]\n"
        'name = "press"\n'
        f'topic = "{TOPIC}"\n'
        f'url = "opc.tcp://127.0.0.1:{device_port}/bench/"\n'
        'mode = "subscribe"\n'
        f'interval = "{PUBLISH_INTERVAL_S * 1000:g}ms"\n'
        'timestamp = "read"\n'
        "points = [\n"
        f'  {{ name = "trigger", node = "{UA_TRIGGER}" }},\n'
        f'  {{ name = "response", node = "{UA_RESPONSE}", writable = true }},\n'
        "]\n"
    )


async def _line(stream: asyncio.StreamReader, within: float) -> dict[str, Any]:
    line = await asyncio.wait_for(stream.readline(), within)
    if not line:
        raise RuntimeError("a helper process ended early")
    return json.loads(line)  # type: ignore[no-any-return]


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def run_protocol(protocol: str) -> dict[str, Any]:
    """One protocol on a fresh device, daemon and consumer app; the scenario's JSON line."""
    from plantbus.broker.api import ConsumerApi
    from plantbus.broker.config import parse_config
    from plantbus.broker.runtime import Runtime

    sys.path.insert(0, str(REPO / "tests"))
    from servers import free_port

    me = [sys.executable, "-m", "bench.scenarios.control_loop"]
    pipe = asyncio.subprocess.PIPE
    device = await asyncio.create_subprocess_exec(
        *me, "server", protocol, cwd=REPO, stdin=pipe, stdout=pipe
    )
    client: asyncio.subprocess.Process | None = None
    assert device.stdin is not None and device.stdout is not None
    try:
        ready = await _line(device.stdout, 60)
        api_port = free_port()
        state = Path(tempfile.mkdtemp(prefix="plantbus-bench-control-"))
        text = config_text(state, api_port, protocol, ready["port"])
        config = parse_config(text, state / "plantbus.toml")
        rt = Runtime(config)
        api = ConsumerApi(config.api, rt)
        await api.start()
        try:
            await rt.start()
            connector: Any = rt.devices["press"].connector
            on_bus: dict[str, int] = {}  # k -> when its record was taken off the bus (ns)
            tap = asyncio.create_task(_bus_times(rt.bus.subscribe([TOPIC], name="tap"), on_bus))
            client = await asyncio.create_subprocess_exec(
                *me, "client", f"http://127.0.0.1:{api_port}", TOPIC, cwd=REPO, stdout=pipe
            )
            assert client.stdout is not None
            assert (await _line(client.stdout, 60)) == {"ready": True}
            deadline = time.monotonic() + 30
            while not rt.devices["press"].emitted:  # the device delivers: start the loops
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {protocol} device delivered nothing in 30 s")
                await asyncio.sleep(0.05)
            device.stdin.write(f"go {WARMUP_LOOPS} {LOOPS}\n".encode())
            await device.stdin.drain()
            assert (await _line(device.stdout, 120)) == {"warm": True}
            c0, d0 = proc_cpu_seconds(client.pid), proc_cpu_seconds(device.pid)
            s0 = system_busy_seconds()
            w = Window()
            result = await _line(device.stdout, 60 + LOOPS * (LOOP_TIMEOUT_S + GAP_S[1]))
            w.stop()
            client_cpu = proc_cpu_seconds(client.pid) - c0
            device_cpu = proc_cpu_seconds(device.pid) - d0
            others = system_busy_seconds() - s0 - w.cpu - client_cpu - device_cpu
            router = rt.commands
            commands = router.commands if router is not None else 0
            failed = router.points_failed if router is not None else 0
            granted = getattr(connector, "publishing_interval", None)
        finally:
            tap.cancel()
            await rt.shutdown()
            await api.stop()  # closes the WebSocket: the app prints what it saw and exits
        assert client.stdout is not None
        seen = json.loads(await asyncio.wait_for(client.stdout.read(), 60) or b"{}")
    finally:
        if client is not None:
            await _stop(client)
        await _stop(device)

    loops = result["loops"]  # k -> [changed_ns, landed_ns] of the measured loops
    total = [(t1 - t0) / 1e9 for t0, t1 in loops.values()]
    detect, act, device_to_bus, bus_to_app = [], [], [], []
    for k, (t0, t1) in loops.items():
        t = seen.get(k)
        if t is not None:
            detect.append((t - t0) / 1e9)
            act.append((t1 - t) / 1e9)
        b = on_bus.get(k)
        if b is not None and t is not None:
            device_to_bus.append((b - t0) / 1e9)
            bus_to_app.append((t - b) / 1e9)
    interval_ms = POLL_INTERVAL_S * 1000 if protocol == "modbus" else (granted or 0) * 1000
    goal = BUDGET_MS + interval_ms
    latency = percentiles_ms(total)
    lost = result["lost"]
    log(
        f"control_loop {protocol}: {len(total)} loops, p50 {latency['p50_ms']} / p99 "
        f"{latency['p99_ms']} ms (goal {goal:g}), lost {lost}, "
        f"others {max(0.0, others / w.elapsed * 100):.0f} %"
    )
    d, a = percentiles_ms(detect), percentiles_ms(act)
    db, ba = percentiles_ms(device_to_bus), percentiles_ms(bus_to_app)
    return report(
        "control_loop",
        records_per_s=len(total) / w.elapsed,
        cpu_us_per_record=w.cpu / len(total) * 1e6 if total else float("nan"),
        latency=latency,
        protocol=protocol,
        loops=len(total),
        lost=lost,
        interval_ms=round(interval_ms, 3),
        interval=(
            "polled every 2 ms"
            if protocol == "modbus"
            else f"publishing interval requested {PUBLISH_INTERVAL_S * 1000:g} ms, "
            f"granted {interval_ms:g} ms"
        ),
        detect_p50_ms=d["p50_ms"],
        detect_p99_ms=d["p99_ms"],
        act_p50_ms=a["p50_ms"],
        act_p99_ms=a["p99_ms"],
        device_to_bus_p50_ms=db["p50_ms"],
        device_to_bus_p99_ms=db["p99_ms"],
        bus_to_app_p50_ms=ba["p50_ms"],
        bus_to_app_p99_ms=ba["p99_ms"],
        commands=commands,
        points_failed=failed,
        daemon_cpu_pct=round(w.cpu / w.elapsed * 100),
        client_cpu_pct=round(client_cpu / w.elapsed * 100),
        device_cpu_pct=round(device_cpu / w.elapsed * 100),
        others_cpu_pct=round(max(0.0, others / w.elapsed * 100)),
        goal_p99_ms=goal,
        goal_met=latency["p99_ms"] is not None and latency["p99_ms"] <= goal and not lost,
    )


async def _bus_times(sub: Any, out: dict[str, int]) -> None:
    """Note when each new ``trigger`` value is taken off the bus (a subscriber of its own,
    beside the API's): splits ``detect`` into the connector's part and the API's."""
    last = None
    while True:
        batch = await sub.get()
        now = time.monotonic_ns()
        for r in batch:
            k = r.fields.get("trigger")
            if k is not None and k != last:
                last = k
                out[str(k)] = now


async def _run() -> list[dict[str, Any]]:
    wanted = os.environ.get("BENCH_CONTROL_PROTOCOLS", ",".join(PROTOCOLS)).split(",")
    return [await run_protocol(p) for p in PROTOCOLS if p in wanted]


def main() -> list[dict[str, Any]]:
    return run_loop(_run())  # type: ignore[no-any-return]


# -- the device process ---------------------------------------------------------------------------


class Loops:
    """The device's side of the loops: the change, and the write that answers it."""

    def __init__(self) -> None:
        self.k = 0
        self.changed_ns = 0
        self.answered = asyncio.Event()
        self.loops: dict[str, list[int]] = {}

    def written(self, value: int) -> None:
        """The write callback: a client wrote ``response`` = ``value``."""
        now = time.monotonic_ns()
        if value == self.k and not self.answered.is_set():
            self.loops[str(value)] = [self.changed_ns, now]
            self.answered.set()

    async def run(self, change: Any, warmup: int, count: int) -> None:
        lost = 0
        out = sys.stdout
        loop = asyncio.get_running_loop()
        for k in range(1, warmup + count + 1):
            if k == warmup + 1:
                self.loops.clear()
                lost = 0
                out.write(json.dumps({"warm": True}) + "\n")
                out.flush()
            self.answered.clear()
            self.k = k
            self.changed_ns = time.monotonic_ns()
            await change(k)
            try:
                async with asyncio.timeout(LOOP_TIMEOUT_S):
                    await self.answered.wait()
            except TimeoutError:
                lost += 1
            # not asyncio.sleep: (uv)loop timers fire on whole milliseconds of
            # CLOCK_MONOTONIC, as the daemon's poll timer does, which would phase-lock each
            # change to the polls; a thread's nanosleep wakes the loop at any phase
            await loop.run_in_executor(None, time.sleep, random.uniform(*GAP_S))
        out.write(json.dumps({"loops": self.loops, "lost": lost}) + "\n")
        out.flush()


async def _modbus_device(loops: Loops) -> tuple[int, Any]:
    from pymodbus.server import ModbusTcpServer

    sys.path.insert(0, str(REPO / "tests" / "integration" / "modbus"))
    from modbus_servers import UnitMap, simdevices

    server = ModbusTcpServer(simdevices([UnitMap(1, holding=[0] * 4)]), address=("127.0.0.1", 0))
    context = server.context
    set_values = context.async_setValues

    async def async_setValues(device_id: int, fc: int, address: int, values: list[Any]) -> Any:
        # functions 6 and 16 are a client's writes; 3 is the loop's own change (below)
        if fc in (6, 16) and address <= RESPONSE < address + len(values):
            result = await set_values(device_id, fc, address, values)
            loops.written(int(values[RESPONSE - address]))
            return result
        return await set_values(device_id, fc, address, values)

    context.async_setValues = async_setValues
    await server.serve_forever(background=True)
    port = server.transport.sockets[0].getsockname()[1]

    async def change(k: int) -> None:
        await set_values(1, 3, TRIGGER, [k])

    return port, change


async def _opcua_device(loops: Loops) -> tuple[int, Any]:
    from asyncua import Server, ua

    sys.path.insert(0, str(REPO / "tests"))
    from servers import free_port

    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
    idx = await server.register_namespace("urn:plantbus:bench:control")
    assert idx == 2
    parent = await server.nodes.objects.add_object(idx, "C")
    trigger = ua.NodeId.from_string(UA_TRIGGER)
    response = ua.NodeId.from_string(UA_RESPONSE)
    await parent.add_variable(trigger, "Trigger", ua.Variant(0, ua.VariantType.Int32))
    node = await parent.add_variable(response, "Response", ua.Variant(0, ua.VariantType.Int32))
    await node.set_writable()
    service = server.iserver.attribute_service
    write = service.write

    async def on_write(params: ua.WriteParameters, *args: Any, **kwargs: Any) -> Any:
        result = await write(params, *args, **kwargs)
        for w in params.NodesToWrite:
            if w.NodeId == response and w.Value.Value is not None:
                loops.written(int(w.Value.Value.Value))
        return result

    service.write = on_write
    await server.start()

    async def change(k: int) -> None:
        value = ua.DataValue(ua.Variant(k, ua.VariantType.Int32))
        await server.write_attribute_value(trigger, value)

    return port, change


async def _device(protocol: str) -> None:
    import logging

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    loops = Loops()
    port, change = await (_modbus_device if protocol == "modbus" else _opcua_device)(loops)
    print(json.dumps({"ready": True, "port": port}), flush=True)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    command = (await reader.readline()).split()
    if not command:
        return
    _, warmup, count = command
    gc.collect()
    gc.freeze()
    await loops.run(change, int(warmup), int(count))
    await reader.read()  # until the bench ends this process


# -- the consumer app -----------------------------------------------------------------------------


async def _client(url: str, topic: str) -> dict[str, int]:
    """React to each new ``trigger`` with a command; k -> when its record arrived (ns)."""
    import aiohttp

    mono = time.monotonic_ns
    seen: dict[str, int] = {}
    last = None
    cmd_topic = "$cmd/" + topic
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/v1/subscribe?filter={topic}", max_msg_size=0) as ws,
    ):
        hello = await ws.receive()
        assert "subscribed" in json.loads(hello.data)
        gc.collect()
        gc.freeze()  # as the daemon does (see the api scenario's CLIENT_GC)
        print(json.dumps({"ready": True}), flush=True)
        while True:
            msg = await ws.receive()
            now = mono()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break  # the daemon stopped
            frame = json.loads(msg.data)
            if isinstance(frame, dict):
                continue  # the answer to a command frame, or a drop notice
            for r in frame:
                k = r["fields"].get("trigger")
                if k is None or k == last:
                    continue
                last = k
                if k > 0:
                    seen[str(k)] = now
                    await ws.send_str(json.dumps([{"topic": cmd_topic, "fields": {"response": k}}]))
    return seen


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "server":
        run_loop(_device(sys.argv[2]))
    elif role == "client":
        print(json.dumps(run_loop(_client(sys.argv[2], sys.argv[3]))), flush=True)
    else:
        sys.exit(f"unknown role {role!r}")
