"""Scan a Modbus unit for readable registers and print a ready conf.d snippet.

``plantbus discover modbus HOST --unit N --scan holding:0-999`` reads each scanned range in
requests as large as the protocol allows; a request the unit refuses (exception 2 or 3, or
no reply) is split in halves until the readable ranges are found to the register. An area
the unit does not offer at all (exception 1) is reported as such. The snippet has one
``uint16`` point per readable register (``bool`` per coil and discrete input), named after
its area and address, with the value read as a comment, to be renamed and retyped.

Only argparse and the config module are imported with this module (``plantbus`` builds its
command line from it); pymodbus is loaded when the scan starts.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any

from plantbus.broker.connector import DiscoverError
from plantbus.connectors.modbus.config import (
    BIT_AREAS,
    MAX_BITS_PER_REQUEST,
    MAX_REGISTERS_PER_REQUEST,
    Config,
)

__all__ = ["AreaScan", "ScanRange", "add_arguments", "discover", "render", "scan"]

_SCAN = re.compile(r"^(?P<area>coil|discrete|holding|input):(?P<first>\d+)(?:-(?P<last>\d+))?$")
MAX_TIMEOUTS = 20
"""Requests without a reply after which a scan gives up on the rest (each costs a timeout)."""


@dataclass(frozen=True)
class ScanRange:
    """``area:first-last`` of ``--scan``."""

    area: str
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.area}:{self.first}-{self.last}"


def _scan_range(text: str) -> ScanRange:
    m = _SCAN.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected AREA:FIRST-LAST with AREA one of coil, discrete, holding, "
            "input (e.g. holding:0-999)"
        )
    first = int(m["first"])
    last = int(m["last"]) if m["last"] is not None else first
    if not first <= last <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r}: need FIRST <= LAST <= 65535")
    return ScanRange(m["area"], first, last)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``plantbus discover modbus``."""
    parser.description = (
        "Scan a Modbus unit for readable registers and print a conf.d snippet "
        "(one point per readable register) to start its register map from."
    )
    parser.add_argument(
        "host", help="host name or IP address (tcp, rtu-over-tcp), or the serial port (rtu)"
    )
    parser.add_argument("--port", type=int, default=502, help="TCP port (default 502)")
    parser.add_argument(
        "--transport",
        choices=["tcp", "rtu-over-tcp", "rtu"],
        default="tcp",
        help="how the unit is reached (default tcp)",
    )
    parser.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    parser.add_argument(
        "--scan",
        type=_scan_range,
        action="append",
        metavar="AREA:FIRST-LAST",
        help="what to scan; repeatable (default holding:0-999)",
    )
    parser.add_argument(
        "--timeout", type=_positive, default=1.0, metavar="S", help="reply timeout (default 1s)"
    )
    parser.add_argument("--baudrate", type=int, default=19200, help="rtu only (default 19200)")
    parser.add_argument("--parity", choices=["N", "E", "O"], default="E", help="rtu only")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1, help="rtu only")
    parser.add_argument("--bytesize", type=int, choices=[7, 8], default=8, help="rtu only")
    parser.add_argument("--name", help="device name in the snippet (default from host and unit)")


@dataclass
class AreaScan:
    """What a scan of one range found."""

    range: ScanRange
    readable: list[tuple[int, int]] = field(default_factory=list)  # (first, last) runs
    values: dict[int, int | bool] = field(default_factory=dict)
    unsupported: bool = False  # exception 1: the unit has no such area
    incomplete: str | None = None  # why the scan stopped early

    def add(self, address: int, values: list[Any]) -> None:
        for i, v in enumerate(values):
            self.values[address + i] = v
        last = address + len(values) - 1
        if self.readable and self.readable[-1][1] == address - 1:
            self.readable[-1] = (self.readable[-1][0], last)
        else:
            self.readable.append((address, last))


def _device_config(args: argparse.Namespace) -> Config:
    base: dict[str, Any] = {
        "name": "discover",
        "transport": args.transport,
        "unit": args.unit,
        "timeout": args.timeout,
        "points": [{"name": "x", "address": 0}],
    }
    if args.transport == "rtu":
        base["serial"] = {
            "port": args.host,
            "baudrate": args.baudrate,
            "parity": args.parity,
            "stopbits": args.stopbits,
            "bytesize": args.bytesize,
        }
    else:
        base.update(host=args.host, port=args.port)
    try:
        return Config.model_validate(base)
    except ValueError as exc:
        raise DiscoverError(" ".join(str(exc).split())) from None


async def scan(args: argparse.Namespace) -> list[AreaScan]:
    """Scan every ``--scan`` range of the unit.

    Raises:
        DiscoverError: no connection, or no reply to the first request.
    """
    from plantbus.connectors.modbus.link import (
        Link,
        LinkError,
        LinkSettings,
        ModbusExceptionResponse,
        NotConnected,
        ReplyTimeout,
    )

    config = _device_config(args)
    link = Link(LinkSettings.of(config))
    unit, timeout = config.unit, float(config.timeout)
    delay = config.effective_frame_delay()
    results: list[AreaScan] = []
    answered = False
    timeouts = 0

    async def read(area: str, address: int, count: int) -> list[Any] | int | None:
        """The values; or the exception code; or None without a reply."""
        nonlocal answered, timeouts
        try:
            values = await link.read("discover", unit, area, address, count, timeout, delay)
        except ModbusExceptionResponse as exc:
            answered = True
            return exc.exception_code
        except NotConnected as exc:
            raise DiscoverError(str(exc)) from None
        except ReplyTimeout as exc:
            if not answered:
                raise DiscoverError(
                    f"{link.label}: unit {unit} did not answer within {timeout:g}s"
                ) from exc
            timeouts += 1
            return None
        except LinkError as exc:
            if not answered:
                raise DiscoverError(str(exc)) from None
            return None
        answered = True
        return list(values[:count])

    async def probe(found: AreaScan, address: int, count: int) -> None:
        if found.unsupported or found.incomplete:
            return
        if timeouts >= MAX_TIMEOUTS:
            found.incomplete = f"stopped after {MAX_TIMEOUTS} requests without a reply"
            return
        got = await read(found.range.area, address, count)
        if isinstance(got, list):
            found.add(address, got)
            return
        if got == 1:
            found.unsupported = True
            return
        if count == 1:
            return  # this address is not readable
        half = count // 2
        await probe(found, address, half)
        await probe(found, address + half, count - half)

    async with link.use():
        for r in args.scan or [ScanRange("holding", 0, 999)]:
            found = AreaScan(r)
            step = MAX_BITS_PER_REQUEST if r.area in BIT_AREAS else MAX_REGISTERS_PER_REQUEST
            for address in range(r.first, r.last + 1, step):
                await probe(found, address, min(step, r.last + 1 - address))
            results.append(found)
    return results


def _default_name(args: argparse.Namespace) -> str:
    host = re.sub(r"[^A-Za-z0-9]+", "_", args.host).strip("_") or "device"
    return f"modbus_{host}_unit{args.unit}"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(args: argparse.Namespace, results: list[AreaScan]) -> str:
    """The conf.d snippet for what ``scan`` found."""
    scanned = " ".join(f"--scan {r.range}" for r in results)
    where = f"{args.host}" if args.transport == "rtu" else f"{args.host} --port {args.port}"
    lines = [
        f"# plantbus discover modbus {where} --transport {args.transport} "
        f"--unit {args.unit} {scanned}",
    ]
    points: list[str] = []
    for found in results:
        area = found.range.area
        if found.unsupported:
            lines.append(f"# {area}: not offered by this unit (exception 1, illegal function)")
            continue
        runs = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in found.readable)
        n = sum(b - a + 1 for a, b in found.readable)
        unit_name = "bits" if area in BIT_AREAS else "registers"
        lines.append(
            f"# {area} {found.range.first}-{found.range.last}: {n} readable {unit_name}"
            + (f": {runs}" if runs else "")
        )
        if found.incomplete:
            lines.append(f"#   scan incomplete: {found.incomplete}")
        for address in sorted(found.values):
            value = found.values[address]
            if area in BIT_AREAS:
                points.append(
                    f'  {{ name = "{area}_{address}", area = "{area}", address = {address}, '
                    f'type = "bool" }},  # {str(value).lower()}'
                )
            else:
                points.append(
                    f'  {{ name = "{area}_{address}", area = "{area}", address = {address}, '
                    f'type = "uint16" }},  # {value}'
                )
    lines.append("# Values as read; rename the points and set their types (see the modbus README).")
    if not points:
        lines.append("# nothing readable was found: no device table")
        return "\n".join(lines) + "\n"
    lines += ["", "[[devices.modbus]]", f"name = {_toml_string(args.name or _default_name(args))}"]
    lines.append(f'transport = "{args.transport}"')
    if args.transport == "rtu":
        lines.append(
            f"serial = {{ port = {_toml_string(args.host)}, baudrate = {args.baudrate}, "
            f'parity = "{args.parity}", stopbits = {args.stopbits}, bytesize = {args.bytesize} }}'
        )
    else:
        lines += [f"host = {_toml_string(args.host)}", f"port = {args.port}"]
    lines += [
        f"unit = {args.unit}",
        'interval = "1s"',
        f'timeout = "{args.timeout:g}s"',
        "points = [",
        *points,
        "]",
    ]
    return "\n".join(lines) + "\n"


async def discover(args: argparse.Namespace) -> str:
    """``plantbus discover modbus``: scan, then the snippet.

    Raises:
        DiscoverError: the unit could not be reached or did not answer.
    """
    try:
        import pymodbus  # noqa: F401
    except ImportError:
        raise DiscoverError("pymodbus is not installed (install plantbus[modbus])") from None
    return render(args, await scan(args))
