"""Fuzz: opening encrypted payloads and files (``plantbus decrypt``, consumers).

``open_all`` takes one envelope (a bridge message) or an encrypted file (length-framed
envelopes). Inputs: random bytes, and valid envelopes and files with flipped bits, cuts,
inserts and duplications. It yields plaintexts or raises ``EnvelopeError``; and whatever it
yields from a mutated input is one of the plaintexts that were sealed (authentication: a
changed byte never yields changed data). ``as_records`` turns any plaintext into record
lines. Round trip: seal -> frame -> open gives the plaintexts back.
"""

from __future__ import annotations

import pytest
from fuzzkit import FUZZ, ROUND_TRIP, mutated, noise, within
from hypothesis import example, given
from hypothesis import strategies as st

from plantbus.broker.crypto import EnvelopeError, KeyRing, Sealer, as_records, frame, open_all

pytestmark = pytest.mark.fuzz

RING = KeyRing({"k2026": bytes(range(32)), "k2027": bytes(range(1, 33))}, active="k2027")
OLD = KeyRing({"k2026": bytes(range(32))}, active="k2026")
PLAINTEXTS = [
    b'[{"uid":"0190a","topic":"plant/a","fields":{"t":21.5}}]',
    b"m,tag=a f=1.5 1714564800000000000\n",
    b"",
    b"x" * 300,
]
ENVELOPES = [Sealer(r).seal(p) for r in (RING, OLD) for p in PLAINTEXTS]
FILES = [
    b"".join(frame(e) for e in ENVELOPES[:3]),
    b"".join(frame(e) for e in ENVELOPES[3:]),
    frame(ENVELOPES[0]),
]
inputs = st.one_of(
    st.binary(max_size=100),
    mutated(st.sampled_from(ENVELOPES)),
    mutated(st.sampled_from(FILES)),
    st.sampled_from(ENVELOPES + FILES),
)


@FUZZ
@given(inputs)
@example(b"PBE1\x00")
@example(b"PBE1\x41" + b"k" * 65)
@example(b"\xff\xff\xff\xff")
@example(b"\x00\x00\x00\x00")  # a zero-length frame
def test_open_all(data: bytes) -> None:
    opened: list[bytes] = []
    with within():
        try:
            for plaintext in open_all(RING, data):
                opened.append(plaintext)
        except EnvelopeError as e:
            assert str(e)
    assert all(p in PLAINTEXTS for p in opened), "a changed input opened into changed data"


@FUZZ
@given(
    st.one_of(
        noise(200),
        mutated(st.sampled_from(PLAINTEXTS)),
        st.sampled_from([b"[", b"[" * 100_000, b"[m] f=1\n", b'["a", {"b": 1}]', b"  [1,2]"]),
    )
)
@example(b"[" * 100_000)  # found: RecursionError, a traceback from `plantbus decrypt`
@example(b"[m],tag=a f=1\n")  # found: line protocol starting with "[" failed as bad JSON
@example(b'[{"a": ' + b"9" * 5000 + b"}]")
@example(b'["\\ud800"]')  # a lone surrogate has no UTF-8 form
def test_as_records(plaintext: bytes) -> None:
    with within():
        out = as_records(plaintext)
    assert type(out) is bytes
    assert out == b"" or out.endswith(b"\n")


@ROUND_TRIP
@given(st.lists(st.binary(max_size=200), max_size=5), st.booleans())
def test_seal_open_round_trip(plaintexts: list[bytes], rotate: bool) -> None:
    sealer = Sealer(OLD)
    envelopes = []
    for i, p in enumerate(plaintexts):
        if rotate and i == len(plaintexts) // 2:
            sealer.rotate(RING)  # keys rotate mid-stream: the ring opens both
        envelopes.append(sealer.seal(p))
    data = b"".join(frame(e) for e in envelopes)
    assert list(open_all(RING, data)) == plaintexts
