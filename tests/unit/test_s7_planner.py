"""The read planner: the plan of a sample map, and the PDU limits for any map."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from plantbus.connectors.s7.address import Address, parse_address
from plantbus.connectors.s7.planner import (
    MAX_ITEMS,
    ReadPlan,
    plan_reads,
    request_size,
    response_size,
)

# a press: status bits, counters, a recipe name, a long log string, a curve, I/O and merkers
SAMPLE = [
    ("running", "DB1.DBX0.0", None),
    ("fault", "DB1.DBX0.1", None),
    ("mode", "DB1.DBB1", None),
    ("strokes", "DB1.DBW2", "int"),
    ("force", "DB1.DBD4", "real"),
    ("energy", "DB1.DBD8:LREAL", None),
    ("recipe", "DB1.DBB16", "string[32]"),
    ("changed", "DB1.DBB60", "date_and_time"),
    ("setpoint", "DB1.DBD100", "real"),
    ("log", "DB3.DBB0", "string[254]"),
    ("curve", "DB10.DBB0", "string[200]"),
    ("door", "I0.0", None),
    ("estop", "I0.1", None),
    ("iw", "IW64", "int"),
    ("motor", "Q0.0", None),
    ("valve", "QW2", "int"),
    ("heartbeat", "M10.2", None),
    ("cycle", "MW20", "uint"),
    ("far_merker", "MD100", "real"),
]
NAMES = [n for n, _, _ in SAMPLE]
ADDRESSES = [parse_address(a, t) for _, a, t in SAMPLE]


def test_the_plan_of_a_sample_map_at_pdu_240() -> None:
    """An S7-300's PDU: the 256-byte log string does not fit one response (240 - 18 = 222
    bytes of data), so it is cut in two; its tail fills the first request's spare room."""
    assert plan_reads(ADDRESSES, 240).describe(NAMES) == (
        "PDU 240: 19 points in 9 ranges, 10 items, 3 requests\n"
        "request 1: 8 items, 108 bytes out, 176 bytes back\n"
        "  DB1 0..67 (68 B): running, fault, mode, strokes, force, energy, recipe, changed\n"
        "  DB1 100..103 (4 B): setpoint\n"
        "  DB3 222..255 (34 B): log\n"
        "  I 0..0 (1 B): door, estop\n"
        "  I 64..65 (2 B): iw\n"
        "  M 10..21 (12 B): heartbeat, cycle\n"
        "  M 100..103 (4 B): far_merker\n"
        "  Q 0..3 (4 B): motor, valve\n"
        "request 2: 1 item, 24 bytes out, 240 bytes back\n"
        "  DB3 0..221 (222 B): log\n"
        "request 3: 1 item, 24 bytes out, 220 bytes back\n"
        "  DB10 0..201 (202 B): curve"
    )


def test_the_plan_of_a_sample_map_at_pdu_480() -> None:
    """An S7-1200's PDU: the log string fits whole; the curve needs a second request."""
    assert plan_reads(ADDRESSES, 480).describe(NAMES) == (
        "PDU 480: 19 points in 9 ranges, 9 items, 2 requests\n"
        "request 1: 8 items, 108 bytes out, 398 bytes back\n"
        "  DB1 0..67 (68 B): running, fault, mode, strokes, force, energy, recipe, changed\n"
        "  DB1 100..103 (4 B): setpoint\n"
        "  DB3 0..255 (256 B): log\n"
        "  I 0..0 (1 B): door, estop\n"
        "  I 64..65 (2 B): iw\n"
        "  M 10..21 (12 B): heartbeat, cycle\n"
        "  M 100..103 (4 B): far_merker\n"
        "  Q 0..3 (4 B): motor, valve\n"
        "request 2: 1 item, 24 bytes out, 220 bytes back\n"
        "  DB10 0..201 (202 B): curve"
    )


def test_max_gap_decides_what_is_merged() -> None:
    merged = plan_reads(ADDRESSES, 480, max_gap=16)
    apart = plan_reads(ADDRESSES, 480, max_gap=0)
    wide = plan_reads(ADDRESSES, 480, max_gap=100)
    # gap 0 still merges what touches or overlaps: the bits and bytes at DB1 0..49
    assert [(r.where, r.start, r.size) for r in apart.ranges[:2]] == [
        ("DB1", 0, 50),
        ("DB1", 60, 8),
    ]
    assert len(apart.ranges) == 12 > len(merged.ranges) == 9 > len(wide.ranges)
    assert ("DB1", 0, 104) in [(r.where, r.start, r.size) for r in wide.ranges]


def test_isolated_points_get_ranges_of_their_own() -> None:
    plan = plan_reads(ADDRESSES, 480, isolate={NAMES.index("strokes")})
    strokes = plan.ranges[plan.point_range[NAMES.index("strokes")]]
    assert (strokes.start, strokes.size, len(strokes.points)) == (2, 2, 1)
    # the others of DB1 0..67 still share one range (it spans the isolated point)
    running = plan.ranges[plan.point_range[NAMES.index("running")]]
    assert (running.start, running.size) == (0, 68)


def test_twenty_items_at_most_per_request() -> None:
    spread = [parse_address(f"DB{i + 1}.DBB0") for i in range(45)]
    plan = plan_reads(spread, 960)
    assert [len(r.items) for r in plan.requests] == [20, 20, 5]


def test_wire_sizes() -> None:
    assert request_size(1) == 24 and request_size(20) == 252
    assert response_size([222]) == 240
    assert response_size([1, 1]) == 14 + 5 + 1 + 5  # a fill byte after the first odd item
    assert response_size([2, 1]) == 14 + 6 + 5


addresses = st.lists(
    st.builds(
        lambda area, db, offset, t: parse_address(
            f"DB{db}.DBB{offset}" if area == "DB" else f"{area}B{offset}", t
        ),
        st.sampled_from(["DB", "M", "I", "Q"]),
        st.integers(1, 4),
        st.integers(0, 2000),
        st.sampled_from(["byte", "lreal", "string[10]", "string[254]", "dtl", "wstring[200]"]),
    ),
    min_size=1,
    max_size=60,
)


def _check(plan: ReadPlan, addrs: list[Address]) -> None:
    assert sorted(i for r in plan.requests for i in r.items) == list(range(len(plan.items)))
    for req in plan.requests:
        assert len(req.items) <= MAX_ITEMS
        assert req.request_bytes == request_size(len(req.items)) <= plan.pdu_size
        assert req.response_bytes == response_size([plan.items[i].size for i in req.items])
        assert req.response_bytes <= plan.pdu_size
    for p, a in enumerate(addrs):
        rng = plan.ranges[plan.point_range[p]]
        assert (rng.area, rng.db) == (a.area, a.db)
        assert rng.start <= a.offset and a.end <= rng.end
        # the point's items cover exactly its bytes, with nothing missing
        covered = set()
        for i in plan.point_items[p]:
            it = plan.items[i]
            assert it.range == plan.point_range[p]
            covered.update(range(it.start, it.start + it.size))
        assert set(range(a.offset, a.end)) <= covered


@settings(max_examples=150, deadline=None)
@given(
    addresses,
    st.sampled_from([240, 480, 960]),
    st.integers(0, 64),
    st.sets(st.integers(0, 59), max_size=10),
)
def test_every_plan_fits_the_pdu_and_covers_every_point(
    addrs: list[Address], pdu: int, gap: int, isolate: set[int]
) -> None:
    plan = plan_reads(addrs, pdu, max_gap=gap, isolate=isolate)
    _check(plan, addrs)
    for p in isolate:
        if p < len(addrs):
            assert plan.ranges[plan.point_range[p]].points == (p,)
