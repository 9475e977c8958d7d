"""The runtime: builds the bus, the outlets and the devices from config and runs them.

Every device connector and every outlet runs as a named task in one ``asyncio.TaskGroup``,
each under its own ``Supervisor`` (log, jittered backoff, restart), so one PLC's fault never
cancels another device or a sink.

Stopping drains in order: connectors first (so nothing new enters the bus), then every
outlet flushes what it queued and buffered within one bounded total time
(``node.shutdown_timeout``), those whose sinks publish onto the bus (punt) before the others,
then the sinks are closed. One ``drained:`` line per device and
per outlet reports what went in and what came out, so an operator (or a test) can check
that nothing was lost.

Reloading (SIGHUP) re-reads the config files and restarts only the devices and sink groups
whose config changed; everything else keeps running without a gap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from plantbus.broker.backoff import Backoff
from plantbus.broker.bus import Bus, Subscription
from plantbus.broker.commands import CommandRouter
from plantbus.broker.config import (
    ApiConfig,
    ConfigError,
    DeviceEntry,
    PlantbusConfig,
    SinkEntry,
    load_config,
)
from plantbus.broker.connector import BuildContext, Connector
from plantbus.broker.outlet import Outlet, buffer_dir, group_sinks, make_buffer
from plantbus.broker.record import Record
from plantbus.broker.registry import load_device_module, load_sink_module
from plantbus.broker.sdnotify import Notifier, Watchdog, watchdog_interval
from plantbus.broker.sinks.base import Sink, SinkConfig
from plantbus.broker.supervisor import DEFAULT_HEALTHY_AFTER, Phase, Supervisor, describe_error

__all__ = [
    "BuildError",
    "DeviceHandle",
    "OutletHandle",
    "Runtime",
    "changed_keys",
    "new_event_loop",
    "run_async",
    "settle_gc",
]

log = logging.getLogger("plantbus.runtime")

DEVICE_BACKOFF = (0.5, 30.0)
OUTLET_BACKOFF = (1.0, 30.0)
"""(initial, maximum) restart delays. Equal jitter: never a near-zero restart of a crash loop."""

GC_THRESHOLDS = (50_000, 20, 100)
"""The garbage collector's thresholds while a runtime runs (the interpreter's are 700, 10, 10).

Not a config key: nothing a user could tune it for. The hot path (records, their field dicts,
encoded batches) makes no reference cycles, so reference counting frees all of it and the
collector's passes find nothing there. With the default thresholds a generation-0 pass ran
every ~700 surviving allocations and full passes over the up to 100k queued records held the
event loop 30-120 ms (bench ``e2e_influx`` max run: 3,700 collections taking 2.1 s of 10 s,
5.1 us CPU/record). A generation-0 threshold of 50k surviving objects: no collection in the
window, 3.9 us/record; 10k: 330 collections, 0.6 s, pauses up to 27 ms (a full queue keeps
that many objects alive). Objects built at start-up are moved out of every pass
(``gc.freeze``), which shortens the rare full passes. Cycles made elsewhere (exceptions with
tracebacks, HTTP clients) are still collected, just later.
"""

_STOP_GRACE = 2.0  # extra seconds an outlet's own bounded stop() gets before we stop waiting
_FORCE_EXIT_AFTER = 3.0  # a forced exit that does not finish by then ends the process hard
_STUCK_GRACE = 60.0  # a backoff wait overrunning its delay by this much: the supervisor is stuck
_ENDED = (Phase.STOPPED, Phase.FINISHED)


class BuildError(Exception):
    """A device or sink could not be built from its (valid) config: the runtime cannot start."""


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed, else asyncio's default one."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(main: Any) -> Any:
    """Run the coroutine ``main`` to completion on a fresh (uvloop when present) loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


def settle_gc() -> None:
    """Collect once, then keep what is alive out of later collections (``GC_THRESHOLDS``).

    Called when a runtime has been built and after a reload: what was frozen before is thawed
    and collected with the rest, so components retired by a reload are freed.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _restart_backoff(spec: tuple[float, float]) -> Backoff:
    return Backoff(spec[0], spec[1], jitter="equal")


class DeviceHandle:
    """One device in the runtime: its config entry, connector, supervisor and counters.

    Args:
        entry: the config entry it was built from (compared on reload).
        connector: the built connector.
        publish: the bus's ``publish``; the device's ``emit`` awaits it.
        backoff: the restart backoff of its supervisor.
        healthy_after: seconds of fault-free running that reset the backoff.

    Attributes:
        supervisor: runs ``connector.run(self.emit)`` and restarts it on faults.
        emitted: records published to the bus (counted after ``publish`` returned).
        last: the last record published, for the live view.
        task: the supervisor's task while running.
        topic: the device's topic (commands to it arrive on ``$cmd/<topic>``).
    """

    def __init__(
        self,
        entry: DeviceEntry,
        connector: Connector,
        publish: Callable[[list[Record]], Awaitable[None]],
        backoff: Backoff,
        healthy_after: float,
    ):
        self.entry = entry
        self.connector = connector
        self._publish = publish
        self.emitted = 0
        self.reads = 0  # emits that carried records: one per read
        self.publish_seconds = 0.0  # time reads waited for the bus (back-pressure)
        self.last_success: float | None = None  # Unix time of the last such read
        self.last: Record | None = None
        self.task: asyncio.Task[None] | None = None
        self.topic = ""  # the device's topic; commands arrive on "$cmd/<topic>"
        self.supervisor = Supervisor(
            connector.name,
            lambda: connector.run(self.emit),
            backoff,
            kind="device",
            healthy_after=healthy_after,
        )

    async def emit(self, records: list[Record]) -> None:
        """The connector's ``Emit``: publish one read's records on the bus."""
        # awaiting publish is the back-pressure of `block` subscribers; count only what the
        # bus accepted, so `emitted` is exact even when a drain cancels mid-publish
        t0 = time.perf_counter()
        await self._publish(records)
        if records:
            # per read, not per record: a few float and int updates
            self.publish_seconds += time.perf_counter() - t0
            self.reads += 1
            self.last_success = time.time()
            self.emitted += len(records)
            self.last = records[-1]

    @property
    def name(self) -> str:
        return self.connector.name

    @property
    def overruns(self) -> int | None:
        """Polls that ended after the next was due, where the connector counts them."""
        value = getattr(self.connector, "overruns", None)
        return value if isinstance(value, int) else None

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.entry.kind,
            "emitted": self.emitted,
            "reads": self.reads,
            "publish_seconds": self.publish_seconds,
            "last_success": self.last_success,
        }
        if self.last is not None:
            out["topic"] = self.last.series.topic
        if self.overruns is not None:
            out["overruns"] = self.overruns
        out.update(self.supervisor.status.as_dict())
        return out


@dataclass(eq=False)
class OutletHandle:
    """One outlet (a group of sinks sharing subscription, codec and batching) in the runtime.

    Attributes:
        name: the sink names of the group joined by ``+``.
        entries: the config entries of its sinks, in group order (compared on reload).
        outlet: the outlet.
        supervisor: runs ``outlet.run()`` and restarts it on faults.
        task: the supervisor's task while running.
    """

    name: str
    entries: list[SinkEntry]
    outlet: Outlet
    supervisor: Supervisor
    task: asyncio.Task[None] | None = None
    sink_names: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.outlet.metrics())
        out["sinks"] = list(self.sink_names)
        out.update(self.supervisor.status.as_dict())
        return out


def _config_key(entries: Sequence[SinkEntry | DeviceEntry]) -> list[tuple[str, Any]]:
    # what decides whether a component must restart on reload: its kind and validated config
    # (not the file it came from nor its position, which move when files are reorganised)
    return [(e.kind, e.config) for e in entries]


class Runtime:
    """Builds and runs devices and outlets on one bus.

    Args:
        config: the loaded config.
        config_path: the file to re-read on reload (``request_reload`` / SIGHUP).
        handle_signals: install SIGTERM/SIGINT (drain; a second SIGINT forces exit) and
            SIGHUP (reload) handlers while ``run`` runs. Needs the main thread.
        healthy_after: seconds of fault-free running after which a restart backoff resets.
        device_backoff / outlet_backoff: factories of the restart backoff (tests shorten it).

    Attributes:
        bus: the bus every device publishes to.
        devices: device name -> handle.
        commands: the write-back router (``$cmd/…`` -> devices, replies on ``$reply/…``),
            built with the devices.
        outlets: outlet name -> handle.
        forced: True when a second SIGINT aborted the drain.
    """

    def __init__(
        self,
        config: PlantbusConfig,
        *,
        config_path: Path | None = None,
        handle_signals: bool = False,
        healthy_after: float = DEFAULT_HEALTHY_AFTER,
        device_backoff: Callable[[], Backoff] = lambda: _restart_backoff(DEVICE_BACKOFF),
        outlet_backoff: Callable[[], Backoff] = lambda: _restart_backoff(OUTLET_BACKOFF),
    ):
        self.config = config
        self.config_path = config_path
        self.bus = Bus()
        self.devices: dict[str, DeviceHandle] = {}
        self.outlets: dict[str, OutletHandle] = {}
        self.commands: CommandRouter | None = None
        self._commands_task: asyncio.Task[None] | None = None
        self.forced = False
        self.started_at: float | None = None
        self._handle_signals = handle_signals
        self._healthy_after = healthy_after
        self._device_backoff = device_backoff
        self._outlet_backoff = outlet_backoff
        self._built = False
        self._wake = asyncio.Event()
        self._stopping = False
        self._reload_pending = False
        # set by a running consumer API: takes reloaded [[api.tokens]] (may raise BuildError)
        self.update_api_tokens: Callable[[ApiConfig], None] | None = None
        self._started = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._signals_installed: list[signal.Signals] = []
        # systemd's notify socket (READY/RELOADING/STOPPING/WATCHDOG); a no-op without one
        self.notifier = Notifier()
        self.watchdog: Watchdog | None = None

    # -- settings ----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """The drain has begun (or is over): nothing new should be published on the bus."""
        return self._stopping

    @property
    def shutdown_timeout(self) -> float:
        """Seconds the whole drain may take (``node.shutdown_timeout``, 10 s by default)."""
        return float(self.config.node.shutdown_timeout)

    # -- building ----------------------------------------------------------------------------

    def _build_device(self, entry: DeviceEntry, ctx: BuildContext) -> DeviceHandle:
        try:
            module = load_device_module(entry.kind)
            connector: Connector = module.build(entry.config, ctx)
        except Exception as exc:
            log.debug("device build traceback", exc_info=exc)
            raise BuildError(
                f"{entry.where}: device {entry.name!r} could not be built: {describe_error(exc)}"
            ) from exc
        handle = DeviceHandle(
            entry, connector, self.bus.publish, self._device_backoff(), self._healthy_after
        )
        handle.topic = ctx.topic(entry.config)
        return handle

    def device_for_topic(self, topic: str) -> Connector | None:
        """The connector of the running device whose topic is ``topic`` (for commands)."""
        for handle in self.devices.values():
            if handle.topic == topic:
                return handle.connector
        return None

    def _build_sinks(
        self, entries: Sequence[SinkEntry], ctx: BuildContext
    ) -> list[tuple[SinkConfig, Sink, SinkEntry]]:
        built: list[tuple[SinkConfig, Sink, SinkEntry]] = []
        for entry in entries:
            try:
                module = load_sink_module(entry.kind)
                sink: Sink = module.build(entry.config, ctx)
            except Exception as exc:
                log.debug("sink build traceback", exc_info=exc)
                raise BuildError(
                    f"{entry.where}: sink {entry.name!r} could not be built: {describe_error(exc)}"
                ) from exc
            built.append((entry.config, sink, entry))
        return built

    def _build_outlets(self, entries: Sequence[SinkEntry], ctx: BuildContext) -> list[OutletHandle]:
        return self._outlets_of(self._build_sinks(entries, ctx))

    def _outlets_of(
        self,
        built: Sequence[tuple[SinkConfig, Sink, SinkEntry]],
        subscriptions: dict[str, Subscription] | None = None,
    ) -> list[OutletHandle]:
        before = set(self.bus.subscriptions)
        try:
            return self._group_outlets(built, subscriptions or {})
        except BuildError:
            # outlets subscribe when constructed: a `block` queue nobody reads would stall
            # every device publishing to it, so the ones built before the failure unsubscribe
            for sub in self.bus.subscriptions:
                if sub not in before:
                    sub.close()
            raise

    @staticmethod
    def _outlet_groups(
        built: Sequence[tuple[SinkConfig, Sink, SinkEntry]],
    ) -> list[tuple[str, list[tuple[SinkConfig, Sink]], list[SinkEntry]]]:
        """(outlet name, group, its entries) per outlet ``built`` makes, in order."""
        entry_of = {id(sink): entry for _, sink, entry in built}
        out = []
        for group in group_sinks([(cfg, sink) for cfg, sink, _ in built]):
            group_entries = [entry_of[id(sink)] for _, sink in group]
            out.append(("+".join(e.name for e in group_entries), group, group_entries))
        return out

    def _group_outlets(
        self,
        built: Sequence[tuple[SinkConfig, Sink, SinkEntry]],
        subscriptions: dict[str, Subscription],
    ) -> list[OutletHandle]:
        handles: list[OutletHandle] = []
        for name, group, group_entries in self._outlet_groups(built):
            names = [e.name for e in group_entries]
            try:
                outlet = Outlet(
                    name,
                    self.bus,
                    group,
                    buffer_factory=self._buffer_factory(group_entries),
                    subscription=subscriptions.get(name),
                )
            except Exception as exc:
                # e.g. a buffer kind this build cannot provide
                log.debug("outlet build traceback", exc_info=exc)
                where = ", ".join(e.where for e in group_entries)
                raise BuildError(
                    f"{where}: outlet {name!r} could not be built: {describe_error(exc)}"
                ) from exc
            supervisor = Supervisor(
                name,
                outlet.run,
                self._outlet_backoff(),
                kind="outlet",
                healthy_after=self._healthy_after,
                returns=True,
            )
            handles.append(
                OutletHandle(
                    name=name,
                    entries=group_entries,
                    outlet=outlet,
                    supervisor=supervisor,
                    sink_names=names,
                )
            )
        return handles

    def _buffer_factory(self, entries: Sequence[SinkEntry]) -> Callable[[SinkConfig, str], Any]:
        """Builds each sink's buffer; a disk buffer by default under ``node.state_dir``."""
        kind_of = {id(e.config): e.kind for e in entries}
        state_dir = self.config.node.state_dir

        def factory(config: SinkConfig, name: str) -> Any:
            directory = buffer_dir(state_dir, kind_of.get(id(config), "sink"), name)
            return make_buffer(config, name, directory=directory)

        return factory

    def build(self) -> None:
        """Build every outlet and every enabled device (idempotent).

        Raises:
            BuildError: a device or sink could not be built (naming its file and kind).
        """
        if self._built:
            return
        # sinks that publish results (punt) get the bus's publish; they never see connectors
        ctx = self.config.build_context(publish=self.bus.publish)
        sinks = [e for e in self.config.sinks if e.config.enabled]
        for handle in self._build_outlets(sinks, ctx):
            self.outlets[handle.name] = handle
        for entry in self.config.devices:
            if not entry.config.enabled:
                log.info("device %s is disabled", entry.config.name)
                continue
            handle = self._build_device(entry, ctx)
            self.devices[handle.name] = handle
        self.commands = CommandRouter(self.bus, self.device_for_topic)
        self._built = True

    # -- running -----------------------------------------------------------------------------

    def _start_outlet(self, handle: OutletHandle) -> None:
        assert self._tg is not None
        handle.task = self._tg.create_task(handle.supervisor.run(), name=f"outlet:{handle.name}")

    def _start_device(self, handle: DeviceHandle) -> None:
        assert self._tg is not None
        handle.task = self._tg.create_task(handle.supervisor.run(), name=f"device:{handle.name}")

    async def run(self, stop_event: asyncio.Event | None = None) -> None:
        """Build, start every outlet and device, run until stopped, then drain.

        Args:
            stop_event: setting it stops the runtime (as ``request_stop`` does).

        Raises:
            BuildError: a component could not be built; nothing was started.
        """
        self._main = asyncio.current_task()
        log.debug("event loop: %s", type(asyncio.get_running_loop()).__module__)
        watcher: asyncio.Task[None] | None = None
        if stop_event is not None:
            watcher = asyncio.create_task(self._watch(stop_event), name="runtime:stop-watcher")
        if self._handle_signals:
            # before building: a SIGTERM during a slow build then drains instead of killing
            self._install_signal_handlers()
        try:
            self.build()
            settle_gc()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                # outlets first: their subscriptions must exist before the first record
                for o in self.outlets.values():
                    self._start_outlet(o)
                if self.commands is not None:
                    self._commands_task = tg.create_task(self.commands.run(), name="commands")
                for d in self.devices.values():
                    self._start_device(d)
                self.started_at = time.monotonic()
                log.info(
                    "running: %s, %s (%s)",
                    _plural(len(self.devices), "device"),
                    _plural(len(self.outlets), "outlet"),
                    ", ".join(self.outlets) or "no sinks",
                )
                self._started.set()
                self.notifier.ready(self._status_text())
                interval = watchdog_interval()
                watchdog_task: asyncio.Task[None] | None = None
                if interval is not None and self.notifier.enabled:
                    self.watchdog = Watchdog(self.notifier, interval, self._liveness_problem)
                    watchdog_task = tg.create_task(self.watchdog.run(), name="watchdog")
                while True:
                    await self._wake.wait()
                    self._wake.clear()
                    if self._stopping:
                        break
                    if self._reload_pending:
                        self._reload_pending = False
                        self.notifier.reloading()
                        await self._reload()
                        self.notifier.ready(self._status_text())
                self.notifier.stopping("draining")
                if watchdog_task is not None:
                    # TimeoutStopSec bounds the drain, not the watchdog; and the task
                    # group ends only when every task has
                    watchdog_task.cancel()
                await self._drain()
        finally:
            self._tg = None
            self.notifier.close()
            if watcher is not None:
                watcher.cancel()
            self._remove_signal_handlers()

    def _status_text(self) -> str:
        devices = _plural(len(self.devices), "device")
        return f"running: {devices}, {_plural(len(self.outlets), 'outlet')}"

    def _liveness_problem(self) -> str | None:
        """Why the watchdog must not ping, or None: a supervisor task that is no longer alive.

        A device that is down does not count: its supervisor is alive, backing off. Only a
        supervisor that ended (an error escaped it) or the command router ending does.
        Checked on the event loop, so a frozen loop sends no ping at all.
        """
        if self._stopping:
            return None  # the drain ends tasks on purpose; TimeoutStopSec bounds it
        now = time.monotonic()
        for kind, handles in (("device", self.devices), ("outlet", self.outlets)):
            for name, handle in handles.items():
                status = handle.supervisor.status
                task = handle.task
                # STOPPED: cancelled on purpose (a reload); FINISHED: returned, logged already
                if task is not None and task.done() and status.phase not in _ENDED:
                    return f"{kind} {name}: its supervisor has ended"
                if (
                    status.phase is Phase.BACKING_OFF
                    and status.retry_in is not None
                    and now - status.since > status.retry_in + _STUCK_GRACE
                ):
                    return f"{kind} {name}: its supervisor is stuck backing off"
        if self._commands_task is not None and self._commands_task.done():
            return "the command router has ended"
        return None

    async def _watch(self, stop_event: asyncio.Event) -> None:
        await stop_event.wait()
        self.request_stop("stop requested")

    async def start(self) -> None:
        """Run in a background task and return once every component has started.

        Raises:
            BuildError: as ``run``.
        """
        self._main = asyncio.create_task(self.run(), name="runtime")
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait({self._main, started}, return_when=asyncio.FIRST_COMPLETED)
        if self._main.done():
            started.cancel()
            self._main.result()  # raises the build error

    async def shutdown(self) -> None:
        """Drain and stop a runtime started with ``start``; returns when it has stopped."""
        self.request_stop()
        if self._main is not None:
            await self._main

    def request_stop(self, reason: str = "", *, hint: str = "") -> None:
        """Begin the drain (idempotent). Safe to call from a signal handler.

        Args:
            reason: why, for the log line (nothing is logged without one).
            hint: appended to the log line, e.g. how to force the exit.
        """
        if not self._stopping:
            self._stopping = True
            if reason:
                log.info("%s: draining (at most %gs%s)", reason, self.shutdown_timeout, hint)
        self._wake.set()

    def request_reload(self) -> None:
        """Re-read the config file and apply what changed (needs ``config_path``)."""
        self._reload_pending = True
        self._wake.set()

    def force_stop(self) -> None:
        """Abandon the drain: cancel everything now. Records not yet delivered are lost."""
        self.forced = True
        log.warning("forced exit: the drain was abandoned; undelivered records are lost")
        if self._main is not None and not self._main.done():
            self._main.cancel()
            # a component that ignores cancellation must not keep the process alive
            asyncio.get_running_loop().call_later(_FORCE_EXIT_AFTER, _hard_exit)

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        handlers: dict[signal.Signals, Callable[[], None]] = {
            signal.SIGTERM: lambda: self._on_stop_signal(signal.SIGTERM),
            signal.SIGINT: lambda: self._on_stop_signal(signal.SIGINT),
            signal.SIGHUP: self._on_hup,
        }
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
            self._signals_installed.append(sig)

    def _remove_signal_handlers(self) -> None:
        if not self._signals_installed:
            return
        loop = asyncio.get_running_loop()
        for sig in self._signals_installed:
            loop.remove_signal_handler(sig)
        self._signals_installed.clear()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if not self._stopping:
            hint = "; Ctrl-C again to force" if sig is signal.SIGINT else ""
            self.request_stop(f"{sig.name} received", hint=hint)
        elif sig is signal.SIGINT:
            self.force_stop()
        else:
            log.info("%s received again: still draining", sig.name)

    def _on_hup(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP received but there is no config file to reload")
            return
        log.info("SIGHUP received: reloading %s", self.config_path)
        self.request_reload()

    # -- reload ------------------------------------------------------------------------------

    async def _reload(self) -> None:
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for message in exc.messages:
                log.error("reload refused: %s", message)
            log.error("reload refused: keeping the running config")
            return
        except Exception as exc:
            log.error("reload failed: %s; keeping the running config", describe_error(exc))
            return
        for warning in new.warnings:
            log.warning("reload: %s", warning)
        try:
            await self.apply(new)
        except Exception as exc:
            # a bug in applying must not take the running devices down with it
            log.error("reload failed: %s", describe_error(exc))
            log.debug("reload traceback", exc_info=exc)

    async def apply(self, new: PlantbusConfig) -> None:
        """Switch to ``new``: restart only the devices and sink groups whose config changed.

        A component whose new config cannot be built is logged and keeps running as before
        (or stays absent if it is new). ``[[api.tokens]]`` go to the running API
        (``update_api_tokens``). Other ``[node]`` and ``[api]`` settings need a restart: a
        change is logged (a WARNING naming the changed keys, never their values) and the
        running ones stay in ``config``, so later reloads build with them too and report
        the change again until plantbus is restarted.
        """
        old = self.config
        running_api = old.api
        if new.api.tokens != old.api.tokens and self.update_api_tokens is not None:
            # tokens are rotated (a token file rewritten, a role's lists changed) without a
            # restart; whatever else of [api] changed still needs one
            try:
                self.update_api_tokens(new.api)
            except BuildError as exc:
                log.error("reload: %s; the running API tokens stay", exc)
            else:
                running_api = old.api.model_copy(update={"tokens": new.api.tokens})
                log.info("reload: api tokens applied")
        for table, running in (("node", old.node), ("api", running_api)):
            keys = changed_keys(running, getattr(new, table), table)
            if keys:
                log.warning(
                    "reload: [%s] changed (%s); restart plantbus to apply it "
                    "(until then the running [%s] settings stay)",
                    table,
                    ", ".join(keys),
                    table,
                )
        if new.node != old.node or new.api != running_api:
            new = dataclasses.replace(new, node=old.node, api=running_api)
        ctx = old.build_context(publish=self.bus.publish)
        await self._apply_sinks(new, ctx)
        await self._apply_devices(new, ctx)
        self.config = new
        settle_gc()

    async def _apply_sinks(self, new: PlantbusConfig, ctx: BuildContext) -> None:
        wanted = [e for e in new.sinks if e.config.enabled]
        # group the new entries the way the outlet groups sinks, without building any sink,
        # so that unchanged groups keep their outlet (and its queue and buffer)
        groups = group_sinks([(e.config, e) for e in wanted])  # type: ignore[misc]
        keep: set[str] = set()
        changed: list[SinkEntry] = []
        for group in groups:
            entries = [e for _, e in group]
            key = _config_key(entries)
            match = next(
                (
                    h
                    for h in self.outlets.values()
                    if h.name not in keep and _config_key(h.entries) == key
                ),
                None,
            )
            if match is not None:
                keep.add(match.name)
            else:
                changed.extend(entries)
        retire = [h for name, h in self.outlets.items() if name not in keep]
        if not changed and not retire:
            return
        try:
            built = self._build_sinks(changed, ctx)
        except BuildError as exc:
            log.error("reload: %s; sinks left as they were", exc)
            return
        # an outlet's subscription is named after it; taken before the successors (which
        # often have the same name) subscribe
        retire_names = {h.name for h in retire}
        retire_subs = [s for s in self.bus.subscriptions if s.name in retire_names]
        on_disk = [h for h in retire if any(_persistent_channel(ch) for ch in h.outlet.channels)]
        if on_disk:
            fresh = await self._hand_over_disk_buffers(built, retire_subs, on_disk)
        else:
            try:
                fresh = self._outlets_of(built)
            except BuildError as exc:
                log.error("reload: %s; sinks left as they were", exc)
                return
            # hand over without an await in between: every record published from here on
            # goes to the new outlets only, and every earlier one is in an old queue and
            # drained below, so nothing is lost and nothing is written twice
            for sub in retire_subs:
                sub.close()
        for h in retire:
            del self.outlets[h.name]
        for h in fresh:
            self.outlets[h.name] = h
            self._start_outlet(h)
            log.info("reload: outlet %s started", h.name)
        rest = [h for h in retire if h not in on_disk]
        await asyncio.gather(*(self._stop_outlet(h, self.shutdown_timeout) for h in rest))
        for h in retire:
            log.info("reload: outlet %s stopped", h.name)

    async def _hand_over_disk_buffers(
        self,
        built: Sequence[tuple[SinkConfig, Sink, SinkEntry]],
        retire_subs: Sequence[Subscription],
        on_disk: Sequence[OutletHandle],
    ) -> list[OutletHandle]:
        """Replace outlets where some hold a disk buffer, losing no record in between.

        A disk buffer's folder is used by one buffer at a time, so a successor can only be
        built once its predecessor has drained into the folder and closed it. The
        successors' subscriptions are taken first, in the same step that closes the old
        ones: records published meanwhile wait in the new queues (under their policy).
        Returns the new outlets, or none when one could not be built (logged: the old ones
        are stopped already, so the changed sinks stay stopped until a good reload).
        """
        subs: dict[str, Subscription] = {}
        for name, group, _ in self._outlet_groups(built):
            cfg = group[0][0]
            subs[name] = self.bus.subscribe(
                cfg.subscribe, size=cfg.queue.size, policy=cfg.queue.policy, name=name
            )
        for sub in retire_subs:
            sub.close()
        await asyncio.gather(*(self._stop_outlet(h, self.shutdown_timeout) for h in on_disk))
        try:
            return self._outlets_of(built, subs)
        except BuildError as exc:
            for sub in subs.values():
                sub.close()
            log.error(
                "reload: %s; sinks %s stopped (a disk buffer keeps what it held); "
                "fix the config and reload",
                exc,
                ", ".join(entry.name for _, _, entry in built),
            )
            return []

    async def _apply_devices(self, new: PlantbusConfig, ctx: BuildContext) -> None:
        wanted = {e.config.name: e for e in new.devices if e.config.enabled}
        for name in [n for n in self.devices if n not in wanted]:
            handle = self.devices.pop(name)
            await self._stop_device(handle)
            log.info("reload: device %s removed", name)
        for name, entry in wanted.items():
            current = self.devices.get(name)
            if current is not None and _config_key([current.entry]) == _config_key([entry]):
                continue
            try:
                handle = self._build_device(entry, ctx)
            except BuildError as exc:
                outcome = "keeping the old one" if current else "not started"
                log.error("reload: %s; %s", exc, outcome)
                continue
            if current is not None:
                await self._stop_device(current)
            self.devices[name] = handle
            self._start_device(handle)
            log.info("reload: device %s %s", name, "restarted" if current else "added")

    async def _stop_device(self, handle: DeviceHandle) -> None:
        if handle.task is not None and not handle.task.done():
            handle.task.cancel()
            await asyncio.wait({handle.task})

    async def _stop_outlet(self, handle: OutletHandle, budget: float) -> None:
        try:
            async with asyncio.timeout(budget + _STOP_GRACE):
                await handle.outlet.stop(budget)
        except TimeoutError:
            log.warning("outlet %s did not stop within %.1fs", handle.name, budget)
        except Exception as exc:
            log.error("outlet %s failed to stop: %s", handle.name, describe_error(exc))
            log.debug("outlet stop traceback", exc_info=exc)
        task = handle.task
        if task is not None and not task.done():
            # run() returns after stop(); if it is stuck (e.g. backing off), end it
            done, _ = await asyncio.wait({task}, timeout=_STOP_GRACE)
            if not done:
                task.cancel()
                await asyncio.wait({task})

    # -- drain -------------------------------------------------------------------------------

    async def _drain(self) -> None:
        t0 = time.monotonic()
        budget = self.shutdown_timeout
        deadline = t0 + budget
        # 1. connectors and the command router: nothing new enters the bus after this
        tasks = [d.task for d in self.devices.values() if d.task is not None and not d.task.done()]
        if self._commands_task is not None and not self._commands_task.done():
            tasks.append(self._commands_task)
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.1, deadline - time.monotonic()))
            for t in pending:
                log.warning("device task %s did not stop in time", t.get_name())
        # 2. outlets whose sinks publish onto the bus (punt results) flush first, while the
        # outlets that may take what they publish still read the bus; 3. then the others.
        # Outlets of one stage stop in parallel (a punt fed by another punt's results is in
        # the same stage: what the first publishes last may miss the second).
        outlets = list(self.outlets.values())
        publishing = [o for o in outlets if _publishes(o)]
        for stage in (publishing, [o for o in outlets if o not in publishing]):
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(self._stop_outlet(o, remaining) for o in stage))
        elapsed = time.monotonic() - t0
        self._log_drained(elapsed, budget)

    def _log_drained(self, elapsed: float, budget: float) -> None:
        emitted = 0
        for d in self.devices.values():
            emitted += d.emitted
            extra = f" overruns={d.overruns}" if d.overruns is not None else ""
            log.info(
                "drained: device %s emitted=%d%s restarts=%d",
                d.name,
                d.emitted,
                extra,
                d.supervisor.status.restarts,
            )
        for o in self.outlets.values():
            om = o.outlet.metrics()
            log.info(
                "drained: outlet %s in=%d encoded=%d invalid=%d non_finite=%d",
                o.name,
                om.get("records_in", 0),
                om.get("records_encoded", 0),
                om.get("encode_invalid", 0),
                om.get("encode_non_finite", 0),
            )
            for ch in o.outlet.channels:
                cm = ch.metrics()
                log.info(
                    "drained: sink %s delivered=%d undelivered=%d dropped=%d rejected=%d "
                    "retries=%d persisted=%d",
                    ch.name,
                    cm.get("records_out", 0),
                    cm.get("undelivered", 0),
                    cm.get("dropped", 0),
                    cm.get("rejected_records", 0),
                    cm.get("retries", 0),
                    cm.get("persisted", 0),
                )
        log.info(
            "drained in %.2fs (budget %gs): devices emitted=%d, bus published=%d",
            elapsed,
            budget,
            emitted,
            self.bus.published,
        )

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """A snapshot for /metrics and the demo view: bus, devices and outlets."""
        return {
            "uptime_s": 0.0 if self.started_at is None else time.monotonic() - self.started_at,
            "bus": {
                "published": self.bus.published,
                "unrouted": self.bus.unrouted,
                "subscriptions": {
                    s.name: {
                        "queued": len(s),
                        "received": s.received,
                        "dropped": s.dropped,
                        "blocked": s.blocked,
                    }
                    for s in self.bus.subscriptions
                },
            },
            "devices": {name: d.metrics() for name, d in self.devices.items()},
            "outlets": {name: o.metrics() for name, o in self.outlets.items()},
        }


def changed_keys(old: Any, new: Any, path: str) -> list[str]:
    """The dotted key paths where two config values differ (``api.tokens[1].publish``).

    Models are compared field by field and lists of models (``tokens``) of equal length
    item by item; anything else that differs is reported at its own path. Only paths are
    returned, never values (a token or password must not reach the log).
    """
    if old == new:
        return []
    if isinstance(old, BaseModel) and type(old) is type(new):
        out: list[str] = []
        for name in type(old).model_fields:
            out += changed_keys(getattr(old, name), getattr(new, name), f"{path}.{name}")
        return out or [path]
    if (
        isinstance(old, list)
        and isinstance(new, list)
        and len(old) == len(new)
        and all(isinstance(x, BaseModel) for x in old)
    ):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += changed_keys(a, b, f"{path}[{i}]")
        return out or [path]
    return [path]


def _persistent_channel(ch: Any) -> bool:
    return hasattr(ch.buffer, "synced_position")


def _publishes(handle: OutletHandle) -> bool:
    """Whether a sink of the outlet publishes onto the bus (``PUBLISHES = True``, e.g. punt)."""
    return any(getattr(ch.sink, "PUBLISHES", False) for ch in handle.outlet.channels)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _hard_exit() -> None:
    logging.shutdown()
    os._exit(1)
