"""The read planner: which bytes to fetch in which S7 requests, for a map of points.

S7 "read var" requests carry up to 20 items (area, DB, first byte, length), and both the
request and its response must fit the PDU size negotiated at connect time. A plan:

1. **Ranges**: the points of one area / DB, sorted by address, are merged into ranges of
   bytes when they overlap, touch, or lie at most ``max_gap`` bytes apart (reading a few
   unused bytes costs less than another item: 12 request bytes and 4-5 response bytes).
2. **Items**: a range longer than one response can carry (PDU - 18 bytes) is cut into
   pieces of that size; a value may span two pieces, it is decoded from the joined bytes.
3. **Requests**: items are packed first-fit, in address order, into requests that keep
   both the request (10-byte header, 2 bytes, 12 per item) and the response (12-byte
   header, 2 bytes, then per item 4 bytes + data + a fill byte after odd-length data
   except the last) within the PDU, at most 20 items each.

Points listed in ``isolate`` never share a range: the connector isolates the points of a
merged range that the PLC refused (for instance one point beyond the end of its DB), so
that one bad address does not take its neighbours down with it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from plantbus.connectors.s7.address import Address

__all__ = [
    "MAX_ITEMS",
    "RESPONSE_OVERHEAD",
    "Item",
    "Range",
    "ReadPlan",
    "Request",
    "plan_reads",
    "request_size",
    "response_size",
]

MAX_ITEMS = 20
"""Items per read request: the S7 protocol's limit."""

REQUEST_HEADER = 10 + 2  # job header, function + item count
ITEM_SPEC = 12  # one S7-Any address specification
RESPONSE_HEADER = 12 + 2  # ack-data header (with error class/code), function + item count
ITEM_HEADER = 4  # return code, transport size, length
RESPONSE_OVERHEAD = RESPONSE_HEADER + ITEM_HEADER
"""Bytes of a one-item response besides the data: the most data one item can carry is
``pdu_size - RESPONSE_OVERHEAD``."""


def request_size(n_items: int) -> int:
    """Bytes of a read request with ``n_items`` items."""
    return REQUEST_HEADER + ITEM_SPEC * n_items


def response_size(lengths: Sequence[int]) -> int:
    """Bytes of the response to items of these data lengths (all read successfully)."""
    size = RESPONSE_HEADER
    for i, n in enumerate(lengths):
        size += ITEM_HEADER + n
        if n & 1 and i < len(lengths) - 1:
            size += 1  # fill byte: the next item starts on an even offset
    return size


@dataclass(frozen=True, slots=True)
class Range:
    """Bytes of one area / DB read for one or more points.

    Attributes:
        area / db: where (``db`` 0 outside ``DB``).
        start: first byte.
        size: number of bytes.
        points: indexes of the points decoded from it, in address order.
    """

    area: str
    db: int
    start: int
    size: int
    points: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def where(self) -> str:
        return f"DB{self.db}" if self.area == "DB" else self.area


@dataclass(frozen=True, slots=True)
class Item:
    """One item of a read request: ``size`` bytes from ``start`` of one range.

    Attributes:
        range: index of the range it is part of.
        area / db / start / size: what is read.
        offset: where its bytes go in the range's buffer.
    """

    range: int
    area: str
    db: int
    start: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class Request:
    """One read request: the indexes of its items and its sizes on the wire."""

    items: tuple[int, ...]
    request_bytes: int
    response_bytes: int


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """How to read a map of points within one PDU size.

    Attributes:
        pdu_size: the negotiated PDU size it was made for.
        ranges / items / requests: see the module doc.
        point_range: per point, the index of its range.
        point_items: per point, the indexes of the items holding its bytes.
    """

    pdu_size: int
    ranges: tuple[Range, ...]
    items: tuple[Item, ...]
    requests: tuple[Request, ...]
    point_range: tuple[int, ...]
    point_items: tuple[tuple[int, ...], ...]

    def describe(self, names: Sequence[str]) -> str:
        """The plan as text, one line per request and per item (for tests and ``-v`` logs).

        Args:
            names: the point names, by point index.
        """
        n_points = len(self.point_range)
        lines = [
            f"PDU {self.pdu_size}: {_n(n_points, 'point')} in {_n(len(self.ranges), 'range')}, "
            f"{_n(len(self.items), 'item')}, {_n(len(self.requests), 'request')}"
        ]
        for k, req in enumerate(self.requests, 1):
            lines.append(
                f"request {k}: {_n(len(req.items), 'item')}, {req.request_bytes} bytes out, "
                f"{req.response_bytes} bytes back"
            )
            for i in req.items:
                it = self.items[i]
                rng = self.ranges[it.range]
                lines.append(
                    f"  {rng.where} {it.start}..{it.start + it.size - 1} ({it.size} B): "
                    + ", ".join(names[p] for p in rng.points if i in self.point_items[p])
                )
        return "\n".join(lines)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def plan_reads(
    addresses: Sequence[Address],
    pdu_size: int,
    *,
    max_gap: int = 16,
    max_items: int = MAX_ITEMS,
    isolate: Collection[int] = (),
) -> ReadPlan:
    """Plan the reads of ``addresses`` (one per point, by point index).

    Args:
        addresses: the points' addresses.
        pdu_size: the PDU size negotiated with the PLC.
        max_gap: merge two ranges of one area / DB when at most this many unused bytes
            lie between them (0: only when they touch or overlap).
        max_items: items per request (the protocol allows 20).
        isolate: indexes of points that must be read in a range of their own.

    Raises:
        ValueError: a PDU too small to carry even one byte in a response.
    """
    max_chunk = pdu_size - RESPONSE_OVERHEAD
    if max_chunk < 1 or request_size(1) > pdu_size:
        raise ValueError(f"PDU size {pdu_size} cannot carry a read request")
    ranges = _merge(addresses, max_gap, frozenset(isolate))

    items: list[Item] = []
    for r_index, rng in enumerate(ranges):
        for off in range(0, rng.size, max_chunk):
            n = min(max_chunk, rng.size - off)
            items.append(Item(r_index, rng.area, rng.db, rng.start + off, n, off))

    # first-fit: per open request, its item indexes and the lengths of their data
    open_items: list[list[int]] = []
    open_lengths: list[list[int]] = []
    for i, it in enumerate(items):
        for members, lengths in zip(open_items, open_lengths, strict=True):
            if (
                len(members) < max_items
                and request_size(len(members) + 1) <= pdu_size
                and response_size([*lengths, it.size]) <= pdu_size
            ):
                members.append(i)
                lengths.append(it.size)
                break
        else:
            open_items.append([i])
            open_lengths.append([it.size])
    requests = tuple(
        Request(tuple(m), request_size(len(m)), response_size(lens))
        for m, lens in zip(open_items, open_lengths, strict=True)
    )

    point_range = [0] * len(addresses)
    point_items: list[tuple[int, ...]] = [()] * len(addresses)
    items_of_range: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        items_of_range.setdefault(it.range, []).append(i)
    for r_index, rng in enumerate(ranges):
        for p in rng.points:
            a = addresses[p]
            lo, hi = a.offset - rng.start, a.end - rng.start
            point_range[p] = r_index
            point_items[p] = tuple(
                i
                for i in items_of_range[r_index]
                if items[i].offset < hi and lo < items[i].offset + items[i].size
            )
    return ReadPlan(
        pdu_size, tuple(ranges), tuple(items), requests, tuple(point_range), tuple(point_items)
    )


def _merge(addresses: Sequence[Address], max_gap: int, isolate: frozenset[int]) -> list[Range]:
    def key(p: int) -> tuple[str, int, int, int]:
        a = addresses[p]
        return (a.area, a.db, a.offset, a.end)

    ranges = [
        Range(addresses[p].area, addresses[p].db, addresses[p].offset, addresses[p].size, (p,))
        for p in isolate
        if p < len(addresses)
    ]
    cur: list[int] = []
    start = end = 0

    def close() -> None:
        if cur:
            a = addresses[cur[0]]
            ranges.append(Range(a.area, a.db, start, end - start, tuple(cur)))

    for p in sorted((p for p in range(len(addresses)) if p not in isolate), key=key):
        a = addresses[p]
        if cur and addresses[cur[0]].block == a.block and a.offset <= end + max_gap:
            cur.append(p)
            end = max(end, a.end)
        else:
            close()
            cur = [p]
            start, end = a.offset, a.end
    close()
    ranges.sort(key=lambda r: (r.area, r.db, r.start, r.size))
    return ranges
