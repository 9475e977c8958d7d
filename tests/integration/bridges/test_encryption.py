"""Encrypted bridges: every message through the real Mosquitto, RabbitMQ and tansu is a
plantbus envelope that only the owner's key ring opens, and rotating the active key between
two runs (what a reload with a new ``active`` does) keeps every record readable.

The consumer is a real client on the broker, keeping the raw payloads; records are counted
by uid after opening them with ``plantbus.broker.crypto`` (the reference opener of
``docs/encryption.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bridge_harness import BRIDGES, Bridge, Consumer, Run, until

from plantbus.broker.crypto import EnvelopeError, KeyRing, open_envelope

pytestmark = pytest.mark.timeout(180)


def key(folder: Path, kid: str) -> Path:
    p = folder / f"{kid}.key"
    p.write_bytes(os.urandom(32))
    return p


def opened_uids(consumer: Consumer, ring: KeyRing) -> list[str]:
    return [d["uid"] for m in consumer.snapshot() for d in json.loads(open_envelope(ring, m.raw))]


@pytest.mark.parametrize("bridge", BRIDGES, indirect=True)
async def test_encrypted_round_trip_and_rotation_mid_stream(bridge: Bridge, tmp_path: Path) -> None:
    k1, k2 = key(tmp_path, "k1"), key(tmp_path, "k2")
    consumer = await bridge.consume()
    consumer.decode = False  # payloads are envelopes, kept raw
    ring = KeyRing.from_files([k1, k2])

    sent: list[str] = []
    for enc in (
        {"key_files": [str(k1)], "active": "k1"},
        {"key_files": [str(k1), str(k2)], "active": "k2"},  # the reload with a new key
    ):
        run = Run(bridge, encrypt=enc)
        run.start()
        await run.publish(reads=10, per_read=10)
        await run.stop()
        sent += run.uids
        assert run.sink.records_out == len(run.uids)

    await until(lambda: set(sent) <= set(opened_uids(consumer, ring)), 60, "every sealed record")
    received = consumer.snapshot()
    for m in received:
        assert b'"uid":"' not in m.raw and bridge.prefix.encode() not in m.raw
        assert sent[0].encode() not in m.raw
    # each record exactly once, and both keys were used
    assert sorted(opened_uids(consumer, ring)) == sorted(sent)
    kids = {m.raw[5 : 5 + m.raw[4]] for m in received}
    assert kids == {b"k1", b"k2"}

    # with only the old key the new messages are refused, naming the key they need
    old = KeyRing.from_files([k1])
    readable = 0
    for m in received:
        try:
            readable += len(json.loads(open_envelope(old, m.raw)))
        except EnvelopeError as e:
            assert "'k2'" in str(e)
    assert readable == len(sent) // 2
