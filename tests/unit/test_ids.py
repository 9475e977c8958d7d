"""UUIDv7 record IDs: unique, strictly increasing, RFC 9562 bits, parseable."""

import time
import uuid
from itertools import pairwise

import pytest

from plantbus.broker import ids


@pytest.fixture(autouse=True)
def _restore_generator_state():
    # tests that move the clock must not leave the process-wide generator in the future:
    # later IDs would borrow that future millisecond (correct for a real clock step)
    saved = (ids._last_ms, ids._counter, ids._prefix)
    yield
    ids._last_ms, ids._counter, ids._prefix = saved


def test_million_ids_unique_and_strictly_increasing():
    out = [ids.new_id() for _ in range(500_000)] + ids.new_ids(500_000)
    assert len(out) == 1_000_000
    assert all(a < b for a, b in pairwise(out))  # implies unique
    assert len(set(out)) == len(out)


def test_version_variant_and_parse():
    for uid in [*ids.new_ids(1000), ids.new_id()]:
        u = uuid.UUID(uid)
        assert str(u) == uid
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert len(uid) == 36


def test_embedded_time_is_now():
    before = time.time_ns() // 1_000_000
    uid = ids.new_id()
    after = time.time_ns() // 1_000_000
    assert before <= ids.id_time_ms(uid) <= after + 1


def test_clock_stepping_back_keeps_order(monkeypatch):
    now = [time.time_ns()]
    monkeypatch.setattr(ids, "_time_ns", lambda: now[0])
    a = ids.new_id()
    now[0] -= 5_000_000_000  # the wall clock steps back 5 s
    b = ids.new_id()
    c = ids.new_ids(10)
    assert a < b < c[0]


def test_counter_overflow_borrows_next_millisecond(monkeypatch):
    frozen = time.time_ns()
    monkeypatch.setattr(ids, "_time_ns", lambda: frozen)
    first = ids.new_id()
    monkeypatch.setattr(ids, "_counter", ids._COUNTER_MAX - 2)
    batch = ids.new_ids(5)
    assert first < batch[0]
    assert all(a < b for a, b in pairwise(batch))
    assert ids.id_time_ms(batch[-1]) == frozen // 1_000_000 + 1


def test_batch_crosses_the_low_counter_boundary(monkeypatch):
    frozen = time.time_ns() + 10**12  # a millisecond no other test has used
    monkeypatch.setattr(ids, "_time_ns", lambda: frozen)
    ids.new_id()
    monkeypatch.setattr(ids, "_counter", (1 << 14) - 3)
    batch = ids.new_ids(10)
    assert len(set(batch)) == 10
    assert all(a < b for a, b in pairwise(batch))
    assert all(uuid.UUID(u).version == 7 for u in batch)
