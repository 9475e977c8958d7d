"""``opcua``: reads variables of OPC UA servers, polled or subscribed (asyncua).

See ``README.md`` in this folder for the config keys and ``sample.toml`` for an example.
Importing this package does not import asyncua (``plantbus check`` stays light): the
connector module, which does, is imported by ``build``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plantbus.broker.connector import BuildContext
from plantbus.connectors.opcua.config import Config, PointConfig, SecurityConfig

if TYPE_CHECKING:
    from plantbus.connectors.opcua.connector import OpcUaConnector

__all__ = ["Config", "PointConfig", "SecurityConfig", "build"]


def build(config: Config, ctx: BuildContext) -> OpcUaConnector:
    """Build an ``opcua`` device from its config.

    Raises:
        SecurityError: a certificate, key or trust file named in ``security`` cannot be used.
    """
    from plantbus.connectors.opcua.connector import OpcUaConnector

    return OpcUaConnector(config, ctx)
