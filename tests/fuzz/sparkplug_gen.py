"""Sparkplug B payloads built from a seed: valid protobuf, Sparkplug-wise anything."""

from __future__ import annotations

import math
import random

from hypothesis import strategies as st

from plantbus.codecs import sparkplug_b_pb2 as pb
from plantbus.codecs.sparkplug import DATA_TYPES

_U64 = 2**64 - 1
_NAMES = ["bdSeq", "temp", "a/b", "", "é", "n", "x" * 200]


def _set_value(m: pb.Payload.Metric, rng: random.Random) -> None:
    k = rng.randrange(9)
    if k == 0:
        m.int_value = rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)])
    elif k == 1:
        m.long_value = rng.choice([0, 2**63, _U64, rng.randrange(2**64)])
    elif k == 2:
        m.float_value = rng.choice([0.5, math.nan, math.inf, -math.inf, 3.4e38])
    elif k == 3:
        m.double_value = rng.choice([0.5, math.nan, math.inf, 1e308, -0.0])
    elif k == 4:
        m.boolean_value = rng.random() < 0.5
    elif k == 5:
        m.string_value = rng.choice(["", "x", "é😀", "\x00"])
    elif k == 6:
        m.bytes_value = rng.randbytes(rng.randrange(5))
    elif k == 7:
        m.dataset_value.num_of_columns = rng.randrange(3)
    # else: no value at all


def payload(seed: int) -> bytes:
    """A Sparkplug B payload built from ``seed``: valid protobuf, Sparkplug-wise anything."""
    rng = random.Random(seed)
    p = pb.Payload()
    if rng.random() < 0.8:
        p.timestamp = rng.choice([1714564800000, 0, _U64, 2**53, rng.randrange(2**64)])
    if rng.random() < 0.8:
        p.seq = rng.choice([0, 1, 255, 256, _U64, rng.randrange(300)])
    for _ in range(rng.randrange(5)):
        m = p.metrics.add()
        if rng.random() < 0.8:
            m.name = rng.choice(_NAMES)
        if rng.random() < 0.5:
            m.alias = rng.choice([0, 1, 2, _U64])
        if rng.random() < 0.8:
            m.datatype = rng.choice([*DATA_TYPES, 35, 2**32 - 1])
        if rng.random() < 0.3:
            m.timestamp = rng.choice([1714564800001, 0, _U64, rng.randrange(2**64)])
        if rng.random() < 0.1:
            m.is_null = True
        if rng.random() < 0.1:
            m.is_transient = True
        _set_value(m, rng)
    if rng.random() < 0.1:
        # a string field with bytes that are not UTF-8 (proto2 does not check them)
        raw = p.SerializeToString()
        bad = pb.Payload.Metric(name="ZZZZ").SerializeToString().replace(b"ZZZZ", b"\xff\xfe\xc3(")
        return raw + b"\x12" + bytes([len(bad)]) + bad
    return p.SerializeToString()


built = st.integers(0, 2**64).map(payload)
"""Sparkplug B payloads (metrics of every datatype, values in any protobuf field, aliases,
nulls, timestamps and sequence numbers up to 2^64)."""
