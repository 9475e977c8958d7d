"""Real Modbus servers for the Modbus connector's tests, started once per session.

Each server runs on its own event loop in a background thread (``modbus_servers``), so it
serves the tests whatever loop they run on; the serial line is a socat pty pair.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # modbus_servers, modbus_maps

from modbus_maps import TypedMap, typed_map
from modbus_servers import ServerThread, SocatPair, UnitMap

# units besides the typed map (unit 1) on the session's TCP servers
SHARED_UNITS = [
    UnitMap(2, holding=[200 + i for i in range(10)], coil=[True, False, True, True]),
    UnitMap(
        3,
        holding=[300 + i for i in range(10)],
        input=[3000 + i for i in range(10)],
        coil=[False, False, True],
    ),
    # mapped 0-9 and 20-29, not 10-19: reads there fail with exception 2
    UnitMap(4, holding=[*range(400, 410), *([None] * 10), *range(420, 430)]),
]
# the units of the serial line
BUS_UNITS = [UnitMap(u, holding=[u * 100 + i for i in range(40)]) for u in (1, 2, 3)]


@pytest.fixture(scope="session")
def typed() -> TypedMap:
    """The typed map of unit 1 (every type and order; see ``modbus_maps``)."""
    return typed_map(1)


@pytest.fixture(scope="session")
def tcp_server(typed: TypedMap) -> Iterator[ServerThread]:
    """A pymodbus ``ModbusTcpServer`` holding the typed map (unit 1) and units 2-4."""
    with ServerThread([typed.unit_map(), *SHARED_UNITS]) as server:
        yield server


@pytest.fixture(scope="session")
def rtu_over_tcp_server(typed: TypedMap) -> Iterator[ServerThread]:
    """The same units behind RTU framing over TCP (as a serial gateway speaks it)."""
    with ServerThread([typed.unit_map(), *SHARED_UNITS], kind="rtu-over-tcp") as server:
        yield server


@pytest.fixture(scope="session")
def serial_line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerThread]]:
    """A ``ModbusSerialServer`` with units 1-3 on one end of a socat pty pair.

    Yields the other end (the client's serial port) and the server.
    """
    with (
        SocatPair(tmp_path_factory.mktemp("tty")) as pair,
        ServerThread(BUS_UNITS, kind="rtu", serial_port=pair.a, baudrate=115200) as server,
    ):
        yield pair.b, server
