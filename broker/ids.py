"""Record IDs: UUIDv7 (RFC 9562) strings, unique across nodes and time-sortable.

Layout (RFC 9562 section 5.7, "method 1" fixed-length counter):

    48 bits unix_ts_ms | ver=7 | 12 bits counter high | var=0b10 | 14 bits counter low | 48 random

The 26-bit counter starts at a random value below 2**25 each millisecond, so a process can
issue 2**25 IDs in one millisecond before it borrows the next millisecond (which keeps IDs
strictly increasing even if the wall clock steps back). The 48 trailing random bits keep
IDs of different nodes apart without coordination.
"""

from __future__ import annotations

import random
import time

__all__ = ["id_time_ms", "new_id", "new_ids"]

_COUNTER_MAX = (1 << 26) - 1
_rng = random.Random()  # seeded from os.urandom; getrandbits is ~5x cheaper than secrets
_getrandbits = _rng.getrandbits
_time_ns = time.time_ns

_last_ms = -1
_counter = 0
_prefix = ""  # "tttttttt-tttt-" for _last_ms, formatted once per millisecond


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
    _prefix = f"{h[:8]}-{h[8:]}-"


def new_id() -> str:
    """Return one new UUIDv7 as its canonical 36-character string."""
    global _counter
    ms = _time_ns() // 1_000_000
    if ms == _last_ms and _counter < _COUNTER_MAX:
        _counter += 1
    else:
        _advance(ms)
    c = _counter
    return f"{_prefix}7{c >> 14:03x}-{0x8000 | (c & 0x3FFF):04x}-{_getrandbits(48):012x}"


def new_ids(n: int) -> list[str]:
    """Return ``n`` new, strictly increasing IDs (one clock read for the whole batch)."""
    global _counter
    ms = _time_ns() // 1_000_000
    if ms == _last_ms and _counter < _COUNTER_MAX:
        _counter += 1
    else:
        _advance(ms)
    out: list[str] = []
    append = out.append
    grb = _getrandbits
    for _ in range(n):
        if _counter > _COUNTER_MAX:
            _advance(_last_ms)
        c = _counter
        append(f"{_prefix}7{c >> 14:03x}-{0x8000 | (c & 0x3FFF):04x}-{grb(48):012x}")
        _counter = c + 1
    _counter -= 1  # the next call pre-increments
    return out


def id_time_ms(uid: str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7 string."""
    return int(uid[:8] + uid[9:13], 16)
