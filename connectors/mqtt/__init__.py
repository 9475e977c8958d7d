"""``mqtt``: a subscriber device (paho-mqtt) with payload codecs and Sparkplug B.

See ``README.md`` in this folder for the config keys and ``sample.toml`` for an example.
paho-mqtt and protobuf are imported only when a device runs, never by ``plantbus check``.
"""

from plantbus.connectors.mqtt.config import Config, Subscription


def build(config: Config, ctx):  # type: ignore[no-untyped-def]
    """Build an ``mqtt`` device (imports the connector module on first use)."""
    from plantbus.connectors.mqtt.connector import build as _build

    return _build(config, ctx)


__all__ = ["Config", "Subscription", "build"]
