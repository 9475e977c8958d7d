"""Record IDs: UUIDv7 (RFC 9562) strings, unique across nodes and time-sortable.

Layout (RFC 9562 section 5.7, "method 1" fixed-length counter):

    48 bits unix_ts_ms | ver=7 | 12 bits counter high | var=0b10 | 14 bits counter low | 48 random

The 26-bit counter starts at a random value below 2**25 each millisecond, so a process can
issue 2**25 IDs in one millisecond before it borrows the next millisecond (which keeps IDs
strictly increasing even if the wall clock steps back). The 48 trailing random bits keep
IDs of different nodes apart without coordination.
"""

from __future__ import annotations

import os
import random
import time

__all__ = ["id_time_ms", "new_id", "new_ids"]

_COUNTER_MAX = (1 << 26) - 1
_rng = random.Random()  # seeded from os.urandom; getrandbits is ~5x cheaper than secrets
_getrandbits = _rng.getrandbits
_time_ns = time.time_ns

_last_ms = -1
_counter = 0
_prefix = ""  # "tttttttt-tttt-7" for _last_ms, formatted once per millisecond
# variant bits + the low 14 counter bits, formatted once: most of an ID is table lookups
_LOW = [f"{0x8000 | i:04x}-" for i in range(1 << 14)]


def _advance(ms: int) -> None:
    global _last_ms, _counter, _prefix
    if ms > _last_ms:
        _last_ms = ms
        _counter = _getrandbits(25)
    else:
        # same millisecond, or the clock stepped back: keep counting on the last one
        _counter += 1
        if _counter > _COUNTER_MAX:
            _last_ms += 1
            _counter = _getrandbits(25)
    h = f"{_last_ms:012x}"
    _prefix = f"{h[:8]}-{h[8:]}-7"


def new_id() -> str:
    """Return one new UUIDv7 as its canonical 36-character string."""
    global _counter
    ms = _time_ns() // 1_000_000
    if ms == _last_ms and _counter < _COUNTER_MAX:
        _counter += 1
    else:
        _advance(ms)
    c = _counter
    return f"{_prefix}{c >> 14:03x}-{_LOW[c & 0x3FFF]}{_getrandbits(48):012x}"


def new_ids(n: int) -> list[str]:
    """Return ``n`` new, strictly increasing IDs (one clock read for the whole batch)."""
    global _counter
    ms = _time_ns() // 1_000_000
    if ms == _last_ms and _counter < _COUNTER_MAX:
        _counter += 1
    else:
        _advance(ms)
    rnd = os.urandom(6 * n).hex()  # the 48 random bits of every ID in one call
    out: list[str] = []
    low = _LOW
    i = 0
    while i < n:
        c = _counter
        if c > _COUNTER_MAX:
            _advance(_last_ms)
            c = _counter
        # a run of IDs that share the millisecond and the high 12 counter bits
        lo = c & 0x3FFF
        k = min(n - i, (1 << 14) - lo, _COUNTER_MAX + 1 - c)
        head = f"{_prefix}{c >> 14:03x}-"
        j = 12 * i
        out += [head + low[lo + m] + rnd[j + 12 * m : j + 12 * m + 12] for m in range(k)]
        i += k
        _counter = c + k
    _counter -= 1  # the next call pre-increments
    return out


def id_time_ms(uid: str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7 string."""
    return int(uid[:8] + uid[9:13], 16)
