"""Runtime: build from config, supervise, drain exactly, reload only what changed.

Sim devices and a recording in-memory sink kind (registered for the test) keep this free of
servers; the drain against a real InfluxDB is in tests/integration/test_drain.py.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plantbus.broker import registry
from plantbus.broker.backoff import Backoff
from plantbus.broker.config import PlantbusConfig, parse_config
from plantbus.broker.connector import BuildContext, DeviceConfig, Emit
from plantbus.broker.runtime import BuildError, Runtime
from plantbus.broker.sinks.base import EncodedBatch, SinkConfig
from plantbus.broker.supervisor import Phase

# -- test kinds -----------------------------------------------------------------------------


class RecordingSink:
    """Keeps every payload line it is given; shared per sink name across rebuilds."""

    codec = "line_protocol"
    written: dict[str, list[bytes]] = {}  # noqa: RUF012 - one registry per test (cleared)
    builds: dict[str, int] = {}  # noqa: RUF012

    def __init__(self, name: str):
        self.name = name
        self.lines = RecordingSink.written.setdefault(name, [])
        RecordingSink.builds[name] = RecordingSink.builds.get(name, 0) + 1

    async def connect(self) -> None:
        pass

    async def write(self, batch: EncodedBatch) -> None:
        self.lines.extend(batch.payload.splitlines())

    async def close(self) -> None:
        pass


class MemoryConfig(SinkConfig):
    label: str = ""  # changing it is a config change that does not affect grouping


def _build_memory(config: MemoryConfig, ctx: BuildContext) -> RecordingSink:
    if config.label == "explode":
        raise OSError("cannot open the memory sink")
    return RecordingSink(config.name)


class FlakyConfig(DeviceConfig):
    fail_after: int = 1  # emits this many reads, then raises


class FlakyConnector:
    """Emits a few reads, then fails like a PLC dropping its connection."""

    attempts: dict[str, int] = {}  # noqa: RUF012

    def __init__(self, config: FlakyConfig, ctx: BuildContext):
        self.name = config.name
        self.config = config
        from plantbus.broker.record import Series

        self.series = Series(ctx.topic(config), ctx.measurement(config), ctx.series_tags(config))
        self.n = 0

    async def run(self, emit: Emit) -> None:
        from plantbus.broker.ids import new_id
        from plantbus.broker.record import Record

        FlakyConnector.attempts[self.name] = FlakyConnector.attempts.get(self.name, 0) + 1
        for _ in range(self.config.fail_after):
            await emit([Record(self.series, {"n": self.n}, 1_000_000 + self.n, new_id())])
            self.n += 1
            await asyncio.sleep(0)
        raise ConnectionResetError("peer reset the connection")


@pytest.fixture(autouse=True)
def test_kinds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    sink_mod = types.ModuleType("plantbus_test_memory_sink")
    sink_mod.Config = MemoryConfig  # type: ignore[attr-defined]
    sink_mod.build = _build_memory  # type: ignore[attr-defined]
    dev_mod = types.ModuleType("plantbus_test_flaky_device")
    dev_mod.Config = FlakyConfig  # type: ignore[attr-defined]
    dev_mod.build = FlakyConnector  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, sink_mod.__name__, sink_mod)
    monkeypatch.setitem(sys.modules, dev_mod.__name__, dev_mod)
    monkeypatch.setitem(registry.SINK_KINDS, "memory", sink_mod.__name__)
    monkeypatch.setitem(registry.DEVICE_KINDS, "flaky", dev_mod.__name__)
    RecordingSink.written.clear()
    RecordingSink.builds.clear()
    FlakyConnector.attempts.clear()
    yield


NODE = """
[node]
name = "t"
state_dir = "state"
shutdown_timeout = "5s"
[api]
enabled = false
"""


def sim(name: str, interval: str = "1ms", batch: int = 10, extra: str = "") -> str:
    return f"""
[[devices.sim]]
name = "{name}"
topic = "t/{name}"
interval = "{interval}"
batch = {batch}
points = [{{ name = "n", signal = "counter" }}]
{extra}
"""


def memory(name: str, subscribe: str = '["#"]', label: str = "") -> str:
    return f"""
[[sinks.memory]]
name = "{name}"
subscribe = {subscribe}
flush_interval = "10ms"
label = "{label}"
"""


def config(tmp_path: Path, *parts: str) -> PlantbusConfig:
    return parse_config(NODE + "".join(parts), tmp_path / "plantbus.toml")


def fast_backoff() -> Backoff:
    return Backoff(0.001, 0.002, jitter="none")


async def wait_for(predicate, limit: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    # the counters have no event to wait on; polling them with a deadline waits for state,
    # never for a guessed amount of time
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def counters(lines: list[bytes], device: str) -> list[int]:
    out = []
    for line in lines:
        if line.startswith(device.encode() + b","):
            field = line.split(b" ")[1]
            n = next(f for f in field.split(b",") if f.startswith(b"n="))
            out.append(int(n[2:].rstrip(b"i")))
    return out


# -- tests ------------------------------------------------------------------------------------


async def test_run_and_drain_deliver_exactly_what_was_emitted(tmp_path: Path) -> None:
    rt = Runtime(config(tmp_path, sim("a"), sim("b", batch=3), memory("mem")))
    await rt.start()
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("device:")]
    await wait_for(lambda: all(d.emitted >= 300 for d in rt.devices.values()))
    await rt.shutdown()

    lines = RecordingSink.written["mem"]
    for name in ("a", "b"):
        emitted = rt.devices[name].emitted
        assert counters(lines, name) == list(range(emitted)), name
    assert len(lines) == rt.bus.published
    for d in rt.devices.values():
        assert d.supervisor.status.phase is Phase.STOPPED
    o = rt.outlets["mem"]
    assert o.supervisor.status.phase is Phase.FINISHED
    assert o.outlet.metrics()["records_out"] == len(lines)


async def test_stop_event_and_default_shutdown_timeout(tmp_path: Path) -> None:
    cfg = parse_config(sim("a") + memory("mem"), tmp_path / "plantbus.toml")
    rt = Runtime(cfg)
    assert rt.shutdown_timeout == 10.0  # node.shutdown_timeout's default
    stop = asyncio.Event()
    task = asyncio.create_task(rt.run(stop))
    await wait_for(lambda: "a" in rt.devices and rt.devices["a"].emitted > 0)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert counters(RecordingSink.written["mem"], "a") == list(range(rt.devices["a"].emitted))


async def test_crashing_device_restarts_and_never_stops_the_others(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        sim("steady", interval="1ms", batch=1),
        '[[devices.flaky]]\nname = "plc"\ntopic = "t/plc"\nfail_after = 2\n',
        memory("mem"),
    )
    rt = Runtime(cfg, device_backoff=fast_backoff)
    await rt.start()
    plc, steady = rt.devices["plc"], rt.devices["steady"]
    await wait_for(lambda: plc.supervisor.status.restarts >= 5)
    before = steady.emitted
    await wait_for(lambda: steady.emitted > before + 20)
    await wait_for(lambda: plc.supervisor.status.restarts >= 10)
    assert steady.supervisor.status.restarts == 0
    assert steady.supervisor.status.phase is Phase.RUNNING
    assert plc.supervisor.status.last_error == "ConnectionResetError: peer reset the connection"
    metrics = rt.metrics()
    assert metrics["devices"]["plc"]["restarts"] >= 10
    assert metrics["devices"]["steady"]["state"] == "running"
    assert metrics["devices"]["steady"]["overruns"] >= 0
    assert metrics["outlets"]["mem"]["sinks"] == ["mem"]
    await rt.shutdown()
    # the restarted device resumed where it left off (its state lives on the connector)
    assert counters(RecordingSink.written["mem"], "plc") == list(range(plc.emitted))
    restarts = plc.supervisor.status.restarts
    # stopped while running (one more attempt than restarts) or while backing off
    assert FlakyConnector.attempts["plc"] in (restarts, restarts + 1)


async def test_sink_build_failure_is_a_build_error_naming_file_and_sink(tmp_path: Path) -> None:
    rt = Runtime(config(tmp_path, sim("a"), memory("bad", label="explode")))
    with pytest.raises(BuildError) as err:
        await rt.start()
    msg = str(err.value)
    assert "plantbus.toml: sinks.memory[0]" in msg
    assert "sink 'bad' could not be built: OSError: cannot open the memory sink" in msg
    assert not rt.devices or all(d.task is None for d in rt.devices.values())


async def test_disabled_device_is_not_started(tmp_path: Path) -> None:
    rt = Runtime(config(tmp_path, sim("a"), sim("off", extra="enabled = false"), memory("m")))
    await rt.start()
    assert set(rt.devices) == {"a"}
    await rt.shutdown()


async def test_reload_restarts_only_what_changed(tmp_path: Path) -> None:
    old = config(
        tmp_path,
        sim("keep", batch=1),
        sim("change", batch=1),
        sim("remove", batch=1),
        memory("m1", subscribe='["t/#"]'),
        memory("m2", subscribe='["t/keep"]'),
    )
    rt = Runtime(old)
    await rt.start()
    await wait_for(lambda: all(d.emitted > 10 for d in rt.devices.values()))
    keep, change = rt.devices["keep"], rt.devices["change"]
    keep_task, m1 = keep.task, rt.outlets["m1"]

    new = config(
        tmp_path,
        sim("keep", batch=1),
        sim("change", batch=2),  # changed
        sim("added", batch=1),  # new
        memory("m1", subscribe='["t/#"]'),  # unchanged
        memory("m2", subscribe='["t/keep"]', label="v2"),  # changed
    )
    await rt.apply(new)

    assert rt.devices["keep"] is keep and keep.task is keep_task and not keep_task.done()
    assert rt.devices["change"] is not change and change.task is not None and change.task.done()
    assert "remove" not in rt.devices and "added" in rt.devices
    assert rt.outlets["m1"] is m1 and m1.supervisor.status.phase is Phase.RUNNING
    assert RecordingSink.builds == {"m1": 1, "m2": 2}
    assert rt.config is new

    n_keep = keep.emitted
    await wait_for(lambda: keep.emitted > n_keep + 10 and rt.devices["added"].emitted > 10)
    await rt.shutdown()
    # the unchanged device and sink never paused: one unbroken counter sequence in m1
    assert counters(RecordingSink.written["m1"], "keep") == list(range(keep.emitted))
    # the retired m2 and its successor together lost nothing of "keep" and doubled nothing
    got = sorted(counters(RecordingSink.written["m2"], "keep"))
    assert got == list(range(keep.emitted))


async def test_reload_from_file_keeps_running_on_a_bad_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "plantbus.toml"
    path.write_text(NODE + sim("a", batch=1) + memory("m"))
    from plantbus.broker.config import load_config

    rt = Runtime(load_config(path), config_path=path)
    await rt.start()
    handle = rt.devices["a"]

    path.write_text(NODE + sim("a", batch=1) + memory("m") + "\n[[devices.sim]]\nnam = 1\n")
    rt.request_reload()
    await wait_for(lambda: "reload refused: keeping the running config" in caplog.text)
    assert rt.devices["a"] is handle and not handle.task.done()  # type: ignore[union-attr]
    assert "devices.sim[1].nam: unknown key" in caplog.text

    path.write_text(NODE + sim("a", batch=1) + sim("b", batch=1) + memory("m"))
    rt.request_reload()
    await wait_for(lambda: "b" in rt.devices and rt.devices["b"].emitted > 0)
    assert rt.devices["a"] is handle
    await rt.shutdown()


async def test_reload_reports_node_and_api_changes_and_keeps_the_running_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = config(tmp_path, sim("a", batch=1), memory("m"))
    rt = Runtime(old)
    await rt.start()
    handle = rt.devices["a"]
    changed = NODE.replace('name = "t"', 'name = "t2"\ntags = { hall = "h1" }').replace(
        "enabled = false",
        'enabled = false\nlisten = "127.0.0.1:9999"\nqueue = { size = 5 }\n'
        '[[api.tokens]]\ntoken = "not-in-the-log"',
    )
    # the device changes too: it restarts, built with the running node name
    new = parse_config(changed + sim("a", batch=2) + memory("m"), tmp_path / "plantbus.toml")
    await rt.apply(new)
    text = caplog.text
    assert (
        "reload: [node] changed (node.name, node.tags); restart plantbus to apply it "
        "(until then the running [node] settings stay)" in text
    )
    assert (
        "reload: [api] changed (api.listen, api.tokens, api.queue.size); restart plantbus "
        "to apply it (until then the running [api] settings stay)" in text
    )
    assert "not-in-the-log" not in text
    assert rt.config.node == old.node and rt.config.api == old.api
    assert rt.config.devices == new.devices
    assert rt.devices["a"] is not handle
    await wait_for(lambda: rt.devices["a"].emitted > 0)
    assert rt.devices["a"].last.series.topic == "t/a"  # type: ignore[union-attr]
    assert "hall" not in dict(rt.devices["a"].last.series.tags)  # type: ignore[union-attr]

    # a later reload still says so: the restart is still pending
    caplog.clear()
    await rt.apply(new)
    assert "reload: [node] changed (node.name, node.tags)" in caplog.text
    assert "reload: device" not in caplog.text
    await rt.shutdown()


def test_changed_keys_names_paths_not_values() -> None:
    from plantbus.broker.config import ApiConfig, NodeConfig
    from plantbus.broker.runtime import changed_keys

    a = ApiConfig.model_validate({"tokens": [{"token": "s1", "publish": ["a/#"]}]})
    b = ApiConfig.model_validate({"tokens": [{"token": "s2", "publish": ["b/#"]}]})
    assert changed_keys(a, b, "api") == ["api.tokens[0].token", "api.tokens[0].publish"]
    c = ApiConfig.model_validate({"tokens": [{"token": "s1"}, {"token": "s3"}]})
    assert changed_keys(a, c, "api") == ["api.tokens"]  # an entry added: the list as a whole
    assert changed_keys(a, a, "api") == []
    n = NodeConfig(name="x")
    assert changed_keys(n, NodeConfig(name="x", shutdown_timeout=3), "node") == [
        "node.shutdown_timeout"
    ]


async def test_drained_lines_report_emitted_and_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="plantbus.runtime")
    rt = Runtime(config(tmp_path, sim("a"), memory("mem")))
    await rt.start()
    await wait_for(lambda: rt.devices["a"].emitted >= 100)
    await rt.shutdown()
    n = rt.devices["a"].emitted
    text = caplog.text
    assert f"drained: device a emitted={n} " in text
    assert f"drained: sink mem delivered={n} undelivered=0 dropped=0 rejected=0" in text


async def test_reload_with_an_outlet_that_cannot_be_built_leaves_sinks_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from plantbus.broker import runtime as runtime_module

    real_outlet = runtime_module.Outlet

    def outlet(name: str, bus: Any, group: Any, **kw: Any) -> Any:
        if name == "m3":
            raise ValueError("buffer kind 'disk' is not available in this build")
        return real_outlet(name, bus, group, **kw)

    monkeypatch.setattr(runtime_module, "Outlet", outlet)
    rt = Runtime(config(tmp_path, sim("a", batch=1), memory("m1")))
    await rt.start()
    subs = set(rt.bus.subscriptions)
    new = config(
        tmp_path,
        sim("a", batch=1),
        memory("m1", label="changed"),
        memory("m2", subscribe='["t/x"]'),
        memory("m3", subscribe='["t/y"]'),
    )
    await rt.apply(new)
    assert "outlet 'm3' could not be built: ValueError: buffer kind 'disk'" in caplog.text
    assert "sinks left as they were" in caplog.text
    # m2 was built (and subscribed) before m3 failed: it must not be left on the bus, where
    # its unread `block` queue would stall the devices
    assert set(rt.bus.subscriptions) == subs
    assert list(rt.outlets) == ["m1"]
    a = rt.devices["a"]
    n = a.emitted
    await wait_for(lambda: a.emitted > n + 200)
    await rt.shutdown()
    assert counters(RecordingSink.written["m1"], "a") == list(range(a.emitted))


async def test_running_runtime_sets_gc_thresholds_and_freezes_what_it_built(
    tmp_path: Path,
) -> None:
    import gc

    from plantbus.broker.runtime import GC_THRESHOLDS

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        rt = Runtime(config(tmp_path, sim("a"), memory("mem")))
        await rt.start()
        assert gc.get_threshold() == GC_THRESHOLDS
        # start-up objects (config, devices, outlets) are out of every later collection
        assert gc.get_freeze_count() > 0
        await rt.shutdown()
    finally:
        gc.set_threshold(*saved)


async def test_a_disk_buffer_lives_under_state_dir_and_survives_a_reload(tmp_path: Path) -> None:
    disk = '\nbuffer = { kind = "disk", sync_interval = "10ms" }\n'
    rt = Runtime(config(tmp_path, sim("a", batch=1), memory("m1") + disk))
    await rt.start()
    folder = tmp_path / "state" / "buffers" / "memory" / "m1"  # relative state_dir: the file's
    assert rt.outlets["m1"].outlet.channels[0].buffer.path == folder  # type: ignore[attr-defined]
    await wait_for(lambda: len(RecordingSink.written.get("m1", [])) > 10)
    old = rt.outlets["m1"]
    # a changed sink: its outlet drains into the folder and closes it before the new one opens
    await rt.apply(config(tmp_path, sim("a", batch=1), memory("m1", label="v2") + disk))
    assert rt.outlets["m1"] is not old and old.outlet.channels[0].buffer.closed  # type: ignore[attr-defined]
    n = len(RecordingSink.written["m1"])
    await wait_for(lambda: len(RecordingSink.written["m1"]) > n + 10)
    await rt.shutdown()
    # records published while the old outlet drained waited in the successor's queue:
    # nothing lost in the handover, nothing twice, in order
    assert counters(RecordingSink.written["m1"], "a") == list(range(rt.devices["a"].emitted))
    assert (folder / "synced").exists()


async def test_a_disk_buffered_sink_whose_successor_cannot_be_built_is_stopped_and_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from plantbus.broker import runtime as runtime_module

    real_outlet = runtime_module.Outlet
    fail = {"m1": False}

    def outlet(name: str, bus: Any, group: Any, **kw: Any) -> Any:
        if fail.get(name):
            raise OSError("the buffer folder is not writable")
        return real_outlet(name, bus, group, **kw)

    monkeypatch.setattr(runtime_module, "Outlet", outlet)
    disk = '\nbuffer = { kind = "disk", sync_interval = "10ms" }\n'
    rt = Runtime(config(tmp_path, sim("a", batch=1), memory("m1") + disk))
    await rt.start()
    others = {s for s in rt.bus.subscriptions if s.name != "m1"}
    await wait_for(lambda: len(RecordingSink.written.get("m1", [])) > 10)
    fail["m1"] = True
    await rt.apply(config(tmp_path, sim("a", batch=1), memory("m1", label="v2") + disk))
    assert "outlet 'm1' could not be built: OSError: the buffer folder is not writable" in (
        caplog.text
    )
    assert "sinks m1 stopped (a disk buffer keeps what it held); fix the config" in caplog.text
    # the successor's queue taken for the handover is not left on the bus to fill up
    assert set(rt.bus.subscriptions) == others and "m1" not in rt.outlets
    n = len(RecordingSink.written["m1"])
    fail["m1"] = False
    await rt.apply(config(tmp_path, sim("a", batch=1), memory("m1", label="v3") + disk))
    await wait_for(lambda: len(RecordingSink.written["m1"]) > n + 10)
    await rt.shutdown()
    got = counters(RecordingSink.written["m1"], "a")
    assert len(got) == len(set(got)) and got == sorted(got)
