"""The request planner: the plan for sample maps, and the fewest reads for any small map."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from plantbus.broker.connector import BuildContext
from plantbus.connectors.modbus import Config, build
from plantbus.connectors.modbus.codec import Point, resolve_points
from plantbus.connectors.modbus.planner import plan

REPO = Path(__file__).resolve().parents[2]
CTX = BuildContext(node_name="edge", node_tags={}, state_dir=Path("/nonexistent"))


def plan_of(points: list[dict[str, object]], **kw: object) -> list[str]:
    config = Config.model_validate({"name": "d", "host": "h", "points": points, **kw})
    return build(config, CTX).plan_text()


def holding(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("holding")]


def test_the_plan_of_the_sample_map() -> None:
    sample = tomllib.loads((REPO / "connectors" / "modbus" / "sample.toml").read_text())
    press7 = sample["devices"]["modbus"][0]
    config = Config.model_validate(press7)
    assert build(config, CTX).plan_text() == [
        "coil 3-3 (1): running",
        "discrete 0-0 (1): door_open",
        # max_gap = 8: 0-7 then 10-17 (gap 2) then 20 (gap 2): one read
        "holding 0-20 (21): temp, pressure, strokes, recipe, alarm",
        "input 0-3 (4): energy_wh",
    ]


def test_a_plan_within_the_request_limit_and_the_gap() -> None:
    points = [
        {"name": "a", "address": 0, "type": "float32"},
        {"name": "b", "address": 2},
        {"name": "c", "address": 10, "type": "uint64"},  # 7 unused before it
        {"name": "d", "address": 20},  # 6 unused before it
        {"name": "e", "address": 100, "type": "string", "length": 30},
        {"name": "f", "address": 129},  # inside e's registers: overlaps
        {"name": "g", "address": 129, "bit": 3},  # a bit of f's register
        {"name": "x", "area": "input", "address": 5},
        {"name": "y", "area": "input", "address": 5, "type": "int16"},
        {"name": "k0", "area": "coil", "address": 0},
        {"name": "k1", "area": "coil", "address": 90},  # 89 unused bits: within 16 × 6
        {"name": "k2", "area": "coil", "address": 300},  # 209 unused bits: a new read
    ]
    assert plan_of(points, max_gap=6) == [
        "coil 0-90 (91): k0, k1",
        "coil 300-300 (1): k2",
        "holding 0-2 (3): a, b",
        "holding 10-20 (11): c, d",
        "holding 100-129 (30): e, f, g",
        "input 5-5 (1): x, y",
    ]
    assert holding(plan_of(points, max_gap=7)) == [
        "holding 0-20 (21): a, b, c, d",
        "holding 100-129 (30): e, f, g",
    ]
    # the request limit caps a merge: 0-129 would be 130 registers, more than 125
    assert plan_of(points, max_gap=100) == [
        "coil 0-300 (301): k0, k1, k2",
        "holding 0-20 (21): a, b, c, d",
        "holding 100-129 (30): e, f, g",
        "input 5-5 (1): x, y",
    ]
    assert holding(plan_of(points, max_gap=0)) == [
        "holding 0-2 (3): a, b",
        "holding 10-13 (4): c",
        "holding 20-20 (1): d",
        "holding 100-129 (30): e, f, g",
    ]


def test_contiguous_points_fill_requests_of_125() -> None:
    points = [{"name": f"r{i}", "address": i, "type": "float32"} for i in range(0, 300, 2)]
    lines = plan_of(points)
    assert [ln.split(":")[0] for ln in lines] == [
        "holding 0-123 (124)",  # 62 float32: the 63rd would need register 125
        "holding 124-247 (124)",
        "holding 248-299 (52)",
    ]


# -- the fewest reads, against an exhaustive search ---------------------------------------------


def _valid(block: list[Point], limit: int, gap: int) -> bool:
    block = sorted(block, key=lambda p: p.address)
    start, end = block[0].address, block[0].end
    for p in block[1:]:
        if p.address - end > gap:
            return False
        end = max(end, p.end)
    return end - start <= limit


def _partitions(items: list[Point]) -> Iterator[list[list[Point]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


_point = st.tuples(st.integers(0, 40), st.sampled_from([1, 1, 2, 4, 6]))


@settings(max_examples=150, deadline=None)
@given(
    spans=st.lists(_point, min_size=1, max_size=6), limit=st.integers(6, 16), gap=st.integers(0, 5)
)
def test_no_plan_needs_fewer_reads(spans: list[tuple[int, int]], limit: int, gap: int) -> None:
    points = [
        Point(name=f"p{i}", area="holding", address=a, type="uint16", size=n, index=i)
        for i, (a, n) in enumerate(spans)
    ]
    reads = plan(points, max_registers=limit, max_gap=gap)
    # every point in exactly one read that covers it, within the limit
    placed = sorted(p.name for r in reads for p in r.points)
    assert placed == sorted(p.name for p in points)
    for r in reads:
        assert r.count <= limit and all(r.address <= p.address and p.end <= r.end for p in r.points)
        assert _valid(list(r.points), limit, gap)
    best = min(
        len(part) for part in _partitions(points) if all(_valid(b, limit, gap) for b in part)
    )
    assert len(reads) == best


def test_resolve_points_applies_the_device_orders() -> None:
    config = Config.model_validate(
        {
            "name": "d",
            "host": "h",
            "byte_order": "little",
            "word_order": "little",
            "points": [
                {"name": "a", "address": 0, "type": "float32"},
                {"name": "b", "address": 2, "type": "float32", "word_order": "big"},
            ],
        }
    )
    a, b = resolve_points(config)
    assert (a.byte_order, a.word_order, b.byte_order, b.word_order) == (
        "little",
        "little",
        "little",
        "big",
    )
