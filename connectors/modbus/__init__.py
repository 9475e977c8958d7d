"""``modbus``: Modbus TCP, RTU and RTU-over-TCP devices (pymodbus).

See ``README.md`` in this folder for the config keys and ``sample.toml`` for an example.
pymodbus is imported only when a device connects, so ``plantbus check`` never loads it.
"""

from plantbus.connectors.modbus.config import Config, PointConfig, SerialConfig
from plantbus.connectors.modbus.connector import ModbusConnector, build

__all__ = ["Config", "ModbusConnector", "PointConfig", "SerialConfig", "build"]
