"""One module per scenario, each with ``main() -> dict`` printing its JSON line.

``SCENARIOS`` is the order ``python -m bench`` runs them in.
"""

SCENARIOS = (
    "ids",
    "encode",
    "bus",
    "e2e_influx",
    "influx_gzip",
    "outage",
    "bridges",
    "modbus",
    "opcua",
    "s7",
    "api",
    "control_loop",
)
