"""``line``: legacy devices that send text frames over TCP (client or server) or a serial port.

See ``README.md`` in this folder for the config keys and ``sample.toml`` for an example.
pyserial is imported only when a serial device runs, never by ``plantbus check``.
"""

from plantbus.connectors.line.config import ColumnConfig, Config, CsvConfig


def build(config: Config, ctx):  # type: ignore[no-untyped-def]
    """Build a ``line`` device (imports the connector module on first use)."""
    from plantbus.connectors.line.connector import build as _build

    return _build(config, ctx)


__all__ = ["ColumnConfig", "Config", "CsvConfig", "build"]
