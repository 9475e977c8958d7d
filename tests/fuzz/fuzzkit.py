"""Shared pieces of the fuzz targets: settings profiles, the per-input hang guard, mutators.

Profiles (``PLANTBUS_FUZZ``, default ``ci``):

* ``ci``: 10,000 inputs per target; what ``make test`` (and so CI) runs.
* ``fuzz``: 200,000 inputs per target (``PLANTBUS_FUZZ_EXAMPLES`` overrides), for
  ``make fuzz`` (nightly-style).
* ``quick``: 300 inputs per target, for iterating on a target.

The profiles are applied per test (``@FUZZ``) rather than loaded globally, so the other
Hypothesis tests of the suite keep their own settings. Seeds are random: a failure prints the
falsifying input and a ``@reproduce_failure`` blob, and the example database replays it on
the next run.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = {
    # a deadline per input (it is re-run before being reported, so a GC pause is not a failure)
    "deadline": timedelta(seconds=2),
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
    "print_blob": True,
}
settings.register_profile("plantbus-fuzz-ci", max_examples=10_000, **_COMMON)
settings.register_profile(
    "plantbus-fuzz-fuzz",
    max_examples=int(os.environ.get("PLANTBUS_FUZZ_EXAMPLES", "200000")),
    **_COMMON,
)
settings.register_profile("plantbus-fuzz-quick", max_examples=300, **_COMMON)

PROFILE = os.environ.get("PLANTBUS_FUZZ", "ci")
if PROFILE not in ("ci", "fuzz", "quick"):
    raise RuntimeError(f"PLANTBUS_FUZZ={PROFILE!r}: use ci, fuzz or quick")
FUZZ = settings.get_profile(f"plantbus-fuzz-{PROFILE}")
"""The settings of every fuzz target (``@FUZZ`` above ``@given``)."""

ROUND_TRIP = settings(FUZZ, max_examples=max(100, FUZZ.max_examples // 5))
"""Round-trip properties (encode -> decode is the identity): a fifth of the inputs. They
check correctness on valid data rather than survival, and Hypothesis spends about 1 ms per
input on its own, so the fuzz directory stays within a few minutes on CI's 2 cores."""

HANG_SECONDS = 10.0
"""Hard limit per input: far beyond the deadline, it catches a real hang (an endless loop,
a range of 10^18 ordinals) that the deadline, measured only after the call returns, cannot."""


MEMORY_HEADROOM = 2 << 30
"""Address space one input may add (RLIMIT_AS, during the input only): a runaway allocation
is a MemoryError in the test, not the kernel's OOM killer on a shared machine. A signal
cannot interrupt one long C call (``set.update(range(10**18))``), so the hang guard alone
would not stop it."""


def _vm_size() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class Hang(Exception):
    """Raised inside the code under test when one input runs past ``HANG_SECONDS``."""


@contextlib.contextmanager
def within(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Fail the input if the block runs longer than ``seconds`` (SIGALRM, main thread) or
    grows the address space by more than ``MEMORY_HEADROOM``.

    The code under test may swallow ``Hang`` (a decoder that maps every exception onto its
    own error type), so whether the alarm fired is checked after the block as well.
    """
    fired = False

    def alarm(signum: int, frame: object) -> None:
        nonlocal fired
        fired = True
        raise Hang(f"one input ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or cap < soft:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    # pytest-timeout's own alarm (the whole test's limit) is put back afterwards, less the
    # time this input took
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))
    if fired:
        raise AssertionError(f"one input ran longer than {seconds} s (swallowed Hang)")


def expect_error(error: type[BaseException], call: Callable[[], object]) -> object | None:
    """``call()``'s result, or None if it raised ``error`` with a message; anything else fails.

    The hang guard is around the call; an exception other than ``error`` propagates, which
    is the failure Hypothesis then shrinks.
    """
    with within():
        try:
            return call()
        except error as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return None


# -- byte mutators --------------------------------------------------------------------------------

INTERESTING = (
    b"\\",
    b'"',
    b"'",
    b"\n",
    b"\r\n",
    b"\r",
    b"=",
    b",",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",  # an encoded lone surrogate (invalid UTF-8)
    b"-",
    b"+",
    b".",
    b"e",
    b"E",
    b"i",
    b"u",
    b"#",
    b"[",
    b"]",
    b"{",
    b"}",
    b":",
    b"9" * 25,
    b"9" * 5000,
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"null",
    b"true",
    b"[" * 3000,
)


def mutate(data: bytes, seed: int, max_ops: int = 4) -> bytes:
    """``data`` with 1..``max_ops`` mutations: bit flips, cuts, inserts, duplications.

    Structure-aware by construction: most of the input stays valid, so the mutation is met
    deep inside the decoder rather than at its first byte.
    """
    rng = random.Random(seed)
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        n = len(buf)
        op = rng.randrange(7)
        at = rng.randint(0, n)
        if op == 0 and n:  # flip one bit
            buf[min(at, n - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # cut a slice (truncation when it reaches the end)
            del buf[at : rng.randint(at, n)]
        elif op == 2:  # insert something interesting
            buf[at:at] = rng.choice(INTERESTING)
        elif op == 3:  # insert random bytes
            buf[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # duplicate a slice
            buf[at:at] = buf[at : rng.randint(at, min(n, at + 64))]
        elif op == 5 and n:  # overwrite one byte with any value
            buf[min(at, n - 1)] = rng.randrange(256)
        else:  # truncate
            del buf[at:]
    return bytes(buf)


def mutated(valid: bytes | st.SearchStrategy[bytes], max_ops: int = 4) -> st.SearchStrategy[bytes]:
    """Valid inputs with a few random mutations (``mutate``).

    The mutations come from a seed Hypothesis draws: a mutator built from Hypothesis draws
    costs about 1 ms per input, this a tenth of that (the budget is 10,000 inputs per target
    in CI). The failing input is printed in full.
    """
    base = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    return st.tuples(base, st.integers(0, 2**64)).map(lambda t: mutate(t[0], t[1], max_ops))


def noise(max_size: int = 300) -> st.SearchStrategy[bytes]:
    """Random bytes, and random text as UTF-8 (which gets further than bytes)."""
    return st.one_of(
        st.binary(max_size=max_size),
        st.text(max_size=max_size).map(lambda s: s.encode("utf-8", "surrogatepass")),
    )
