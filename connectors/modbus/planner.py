"""The request planner: a device's points merged into the fewest reads.

Points are grouped by area and sorted by address. A read starts at the first point not yet
covered and takes the following points while the read stays within the request limit
(``max_registers_per_request`` registers, or 2000 bits for coils and discrete inputs) and
the unused stretch before the next point is at most ``max_gap`` registers (``16 × max_gap``
bits). Points may overlap (a register and one of its bits, say). Starting each read at the
first uncovered point is optimal for this kind of covering: no plan needs fewer reads.

Reads are issued in a fixed order (coils, discrete inputs, holding registers, input
registers; ascending addresses), the same every poll.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from plantbus.connectors.modbus.codec import Decoder, Point, compile_decoder
from plantbus.connectors.modbus.config import BIT_AREAS, MAX_BITS_PER_REQUEST

__all__ = ["AREA_ORDER", "Read", "plan", "split_gaps"]

AREA_ORDER = ("coil", "discrete", "holding", "input")


@dataclass(eq=False)
class Read:
    """One request: ``count`` registers (or bits) of ``area`` from ``address``.

    Attributes:
        points: the points it covers, by address.
        decode: ``decode(registers_or_bits, fields)`` for its reply.
        unused: registers (or bits) it reads that no point uses.
    """

    area: str
    address: int
    count: int
    points: tuple[Point, ...]
    decode: Decoder = field(repr=False)
    unused: int = 0

    @property
    def end(self) -> int:
        return self.address + self.count

    def describe(self) -> str:
        """``holding 0-9 (10)``, for logs and the plan shown by tests."""
        return f"{self.area} {self.address}-{self.end - 1} ({self.count})"


def _make_read(area: str, points: Sequence[Point]) -> Read:
    start = min(p.address for p in points)
    end = max(p.end for p in points)
    covered: set[int] = set()
    for p in points:
        covered.update(range(p.address, p.end))
    count = end - start
    return Read(
        area=area,
        address=start,
        count=count,
        points=tuple(points),
        decode=compile_decoder(area, start, count, points),
        unused=count - len(covered),
    )


def plan(
    points: Iterable[Point],
    *,
    max_registers: int = 125,
    max_gap: int = 0,
    max_bits: int = MAX_BITS_PER_REQUEST,
) -> list[Read]:
    """Merge ``points`` into the fewest reads within the request limit and ``max_gap``.

    Args:
        points: the device's points (any order).
        max_registers: registers per read at most (``max_registers_per_request``).
        max_gap: unused registers between two points a read may span.
        max_bits: bits per read of coils and discrete inputs at most.

    Returns:
        the reads, in the order they are issued each poll.
    """
    by_area: dict[str, list[Point]] = {}
    for p in points:
        by_area.setdefault(p.area, []).append(p)
    reads: list[Read] = []
    for area in AREA_ORDER:
        group = sorted(by_area.get(area, ()), key=lambda p: (p.address, -p.size, p.index))
        if not group:
            continue
        bits = area in BIT_AREAS
        limit = max_bits if bits else max_registers
        gap = 16 * max_gap if bits else max_gap
        current: list[Point] = []
        start = end = 0
        for p in group:
            if current and p.address - end <= gap and max(end, p.end) - start <= limit:
                current.append(p)
                end = max(end, p.end)
                continue
            if current:
                reads.append(_make_read(area, current))
            current, start, end = [p], p.address, p.end
        reads.append(_make_read(area, current))
    return reads


def split_gaps(read: Read, max_registers: int) -> list[Read]:
    """``read`` re-planned without unused registers (after the device refused the gaps)."""
    return plan(read.points, max_registers=max_registers, max_gap=0)
