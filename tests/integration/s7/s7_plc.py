"""A python-snap7 ``Server`` holding known values in every area and type, for the s7 tests.

The values are written with python-snap7's own ``snap7.util`` setters, an encoder
independent of the connector's decoder, and ``EXPECTED`` holds what the connector must
decode from them.

Run as a script it is a PLC in its own process, so a test can kill it (power off) and
start it again on the same port::

    python s7_plc.py PORT [GENERATION]

It prints ``ready`` once it listens, then obeys lines on stdin:
``set DB OFFSET HEX`` (write bytes into DB ``DB``), answered ``ok``. ``GENERATION`` goes
into ``DB1.DBB122`` (point ``generation``), so a test can tell a restarted PLC's values.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["EXPECTED", "POINTS", "PlcProcess", "build_areas", "start_server"]

DB1_SIZE = 160

# (name, address, type or None, value the server holds, value the connector decodes)
_TABLE: list[tuple[str, str, str | None, Any, Any]] = [
    ("flag0", "DB1.DBX0.0", None, False, False),
    ("flag1", "DB1.DBX0.1", None, True, True),
    ("flag7", "DB1.DBX0.7", None, True, True),
    ("mode", "DB1.DBB1", None, 200, 200),
    ("letter", "DB1.DBB2", "char", "Z", "Z"),
    ("small", "DB1.DBB3", "sint", -100, -100),
    ("usmall", "DB1.DBB4:USINT", None, 250, 250),
    ("status_word", "DB1.DBW6", None, 0xBEEF, 0xBEEF),
    ("strokes", "DB1.DBW8", "int", -1234, -1234),
    ("rpm", "DB1.DBW10", "uint", 65000, 65000),
    ("status_dword", "DB1.DBD12", None, 0xDEADBEEF, 0xDEADBEEF),
    ("total", "DB1.DBD16", "dint", -123456789, -123456789),
    ("big_total", "DB1.DBD20", "udint", 4_000_000_000, 4_000_000_000),
    ("pressure", "DB1.DBD24", "real", 1.013, 1.013),
    ("temp", "DB1.DBD28:REAL", None, -273.15, -273.15),
    ("energy", "DB1.DBD32:LREAL", None, 3.141592653589793, 3.141592653589793),
    ("ltotal", "DB1.DBB40", "lint", -9_000_000_000_000_000_000, -9_000_000_000_000_000_000),
    ("ultotal", "DB1.DBB48", "ulint", 18_000_000_000_000_000_000, 18_000_000_000_000_000_000),
    ("lmask", "DB1.DBD56", "lword", 0x0123456789ABCDEF, 0x0123456789ABCDEF),
    ("recipe", "DB1.DBB64", "string[16]", "Presse 7 ÄÖÜ", "Presse 7 ÄÖÜ"),
    ("label", "DB1.DBB82:WSTRING[8]", None, "Grüße €", "Grüße €"),
    (
        "changed",
        "DB1.DBB102",
        "date_and_time",
        datetime(2024, 3, 27, 14, 30, 0, 250000),
        "2024-03-27T14:30:00.250",
    ),
    (
        "changed_l",
        "DB1.DBB110:DTL",
        None,
        datetime(2024, 3, 27, 14, 30, 0, 123456),
        "2024-03-27T14:30:00.123456000",
    ),
    ("generation", "DB1.DBB122", None, 1, 1),
    ("db2_count", "DB2.DBW0", "int", 42, 42),
    ("db2_level", "DB2.DBD2", "real", 0.5, 0.5),
    ("merker", "M10.2", None, True, True),
    ("merker_byte", "MB11", None, 0x5A, 0x5A),
    ("merker_word", "MW20", None, 1234, 1234),
    ("gravity", "MD30", "real", 9.81, 9.81),
    ("door_closed", "I0.0", None, True, True),
    ("estop", "I0.3", None, False, False),
    ("inputs_1", "IB1", None, 0x81, 0x81),
    ("in_word", "IW2", "int", -2, -2),
    ("motor_on", "Q0.7", None, True, True),
    ("out_byte", "QB1", None, 7, 7),
    ("valve", "QW2", "uint", 500, 500),
    ("out_dint", "QD4", "dint", 100000, 100000),
]

POINTS: list[dict[str, str]] = [
    {"name": n, "address": a, **({"type": t} if t else {})} for n, a, t, _, _ in _TABLE
]
"""The ``points`` of a device reading every value the server holds."""

EXPECTED: dict[str, Any] = {n: decoded for n, _, _, _, decoded in _TABLE}
"""Point name -> the value the connector must decode (generation 1)."""


def build_areas(generation: int = 1) -> dict[tuple[str, int], bytearray]:
    """The server's memory, keyed ``(area, index)``: ``("DB", 1)``, ``("M", 0)``, ..."""
    from snap7 import util

    areas = {
        ("DB", 1): bytearray(DB1_SIZE),
        ("DB", 2): bytearray(8),
        ("M", 0): bytearray(40),
        ("I", 0): bytearray(8),
        ("Q", 0): bytearray(8),
    }
    setters = {
        "byte": util.set_byte,
        "char": util.set_char,
        "sint": util.set_sint,
        "usint": util.set_usint,
        "word": util.set_word,
        "int": util.set_int,
        "uint": util.set_uint,
        "dword": util.set_dword,
        "dint": util.set_dint,
        "udint": util.set_udint,
        "real": util.set_real,
        "lreal": util.set_lreal,
        "lint": util.set_lint,
        "ulint": util.set_ulint,
        "lword": util.set_lword,
        "date_and_time": util.set_dt,
        "dtl": util.set_dtl,
    }
    from plantbus.connectors.s7.address import parse_address

    for name, address, type_name, value, _ in _TABLE:
        a = parse_address(address, type_name)
        buf = areas[(a.area, a.db)]
        if name == "generation":
            value = generation
        if a.type.base == "bool":
            util.set_bool(buf, a.offset, a.bit or 0, value)
        elif a.type.base == "string":
            util.set_string(buf, a.offset, value, a.type.chars)
        elif a.type.base == "wstring":
            util.set_wstring(buf, a.offset, value, a.type.chars)
        else:
            setters[a.type.base](buf, a.offset, value)
    return areas


def start_server(areas: dict[tuple[str, int], bytearray], port: int = 0) -> Any:
    """A started ``snap7.server.Server`` on 127.0.0.1 serving ``areas`` (port 0: a free one).

    The server's port is ``server.server_socket.getsockname()[1]``.
    """
    import logging

    from snap7.server import Server
    from snap7.type import SrvArea

    # unknown-DB and out-of-range reads are what some tests do on purpose
    logging.getLogger("snap7.server").setLevel(logging.ERROR)
    kinds = {"DB": SrvArea.DB, "M": SrvArea.MK, "I": SrvArea.PE, "Q": SrvArea.PA}
    server = Server(log=False)
    for (area, index), buf in areas.items():
        server.register_area(kinds[area], index, buf)
    server.start_to("127.0.0.1", port)
    return server


class PlcProcess:
    """The script above as a child process: a PLC that can be killed and started again."""

    def __init__(self, port: int, generation: int = 1):
        self.port = port
        self.generation = generation
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> PlcProcess:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), str(self.port), str(self.generation)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready", or "" if the child died
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"s7 PLC process did not start on port {self.port}: {line!r}")
        return self

    def set(self, db: int, offset: int, data: bytes) -> None:
        """Write ``data`` into DB ``db`` of the running PLC."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"set {db} {offset} {data.hex()}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def kill(self) -> None:
        """Power off: SIGKILL, so its connections are cut as a switched-off PLC's are."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> PlcProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _main(argv: list[str]) -> None:
    port = int(argv[0])
    generation = int(argv[1]) if len(argv) > 1 else 1
    areas = build_areas(generation)
    server = start_server(areas, port)
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "set":
            db, offset, data = int(parts[1]), int(parts[2]), bytes.fromhex(parts[3])
            areas[("DB", db)][offset : offset + len(data)] = data
            print("ok", flush=True)
    server.stop()


if __name__ == "__main__":
    _main(sys.argv[1:])
