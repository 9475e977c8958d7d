"""``s7``: Siemens S7 PLCs (S7-300/400/1200/1500, LOGO!) over ISO-on-TCP with python-snap7 3.x.

See ``README.md`` in this folder for the config keys and ``sample.toml`` for an example.
The driver is imported only when a device is built or run, never with this package.
"""

from plantbus.connectors.s7.connector import Config, PointConfig, S7Connector, build

__all__ = ["Config", "PointConfig", "S7Connector", "build"]
