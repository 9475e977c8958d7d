"""Kind name -> module path, for devices and sinks. Modules are imported only when used."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "DEMO_SIMULATORS",
    "DEVICE_KINDS",
    "DISCOVERERS",
    "SINK_KINDS",
    "load_device_module",
    "load_sink_module",
]

DEVICE_KINDS: dict[str, str] = {
    "sim": "plantbus.connectors.sim",
    "modbus": "plantbus.connectors.modbus",
    "opcua": "plantbus.connectors.opcua",
    "mqtt": "plantbus.connectors.mqtt",
    "line": "plantbus.connectors.line",
    "s7": "plantbus.connectors.s7",
}

SINK_KINDS: dict[str, str] = {
    "influxdb": "plantbus.broker.sinks.influxdb",
    "file": "plantbus.broker.sinks.file",
    "mqtt": "plantbus.broker.sinks.mqtt",
    "amqp": "plantbus.broker.sinks.amqp",
    "kafka": "plantbus.broker.sinks.kafka",
    "punt": "plantbus.broker.sinks.punt",
    "kapacitor": "plantbus.broker.sinks.kapacitor",
}


DEMO_SIMULATORS: dict[str, str] = {
    "modbus": "plantbus.connectors.modbus.demo",
    "opcua": "plantbus.connectors.opcua.demo",
    "s7": "plantbus.connectors.s7.demo",
}
"""Device kind -> module with ``demo_simulator() -> DemoSimulator`` (see broker/demo.py):
an in-process protocol server that ``plantbus demo`` runs and reads with the real connector."""


DISCOVERERS: dict[str, str] = {
    "opcua": "plantbus.connectors.opcua.discover",
    "modbus": "plantbus.connectors.modbus.discover",
}
"""Device kind -> module for ``plantbus discover <kind>``. The module has
``add_arguments(parser)`` (argparse; keep the module's imports light) and
``async discover(args) -> str``: a ready conf.d snippet (TOML) for what it found; it raises
``DiscoverError`` (``plantbus.broker.connector``) with a one-line message on failure."""


def _load(table: dict[str, str], kind: str, what: str) -> ModuleType:
    try:
        path = table[kind]
    except KeyError:
        known = ", ".join(sorted(table))
        raise KeyError(f"unknown {what} kind {kind!r} (known: {known})") from None
    return importlib.import_module(path)


def load_device_module(kind: str) -> ModuleType:
    """The module of device kind ``kind``: it has ``Config`` and ``build(config, ctx)``."""
    return _load(DEVICE_KINDS, kind, "device")


def load_sink_module(kind: str) -> ModuleType:
    """The module of sink kind ``kind``: it has ``Config`` and ``build(config, ctx)``."""
    return _load(SINK_KINDS, kind, "sink")
