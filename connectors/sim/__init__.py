"""``sim``: the built-in signal generator device (demos, tests, benchmarks).

See ``README.md`` in this folder for the config keys and ``sample.toml`` for an example.
"""

from plantbus.connectors.sim.connector import Config, PointConfig, SimConnector, build

__all__ = ["Config", "PointConfig", "SimConnector", "build"]
