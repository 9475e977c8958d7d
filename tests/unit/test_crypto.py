"""Payload encryption: the envelope opens only with the right key and unaltered, nonces never
repeat, keys rotate without loss, the file sink writes framed envelopes that
``plantbus decrypt`` turns back into the lines, and bad key files fail ``check``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from plantbus.broker.bus import Bus
from plantbus.broker.config import check_config
from plantbus.broker.connector import BuildContext
from plantbus.broker.crypto import (
    EncryptConfig,
    EnvelopeError,
    KeyError_,
    KeyRing,
    Sealer,
    frame,
    iter_frames,
    load_key,
    open_all,
    open_envelope,
)
from plantbus.broker.ids import new_ids
from plantbus.broker.outlet import Outlet
from plantbus.broker.record import Record, Series
from plantbus.broker.registry import load_sink_module
from plantbus.broker.sinks.base import EncodedBatch
from plantbus.broker.sinks.bridge import Splitter
from plantbus.broker.sinks.file import Config as FileConfig
from plantbus.codecs.json import encode as encode_batch

CTX = BuildContext(node_name="edge-07", node_tags={}, state_dir=Path("/nonexistent"))
SERIES = Series("plant/h1/press7", "press7", {"device": "press7"})
UID = re.compile(r'uid="([^"]+)"')


def key_file(folder: Path, kid: str, form: str = "raw") -> Path:
    key = os.urandom(32)
    p = folder / f"{kid}.key"
    if form == "hex":
        p.write_text(key.hex() + "\n")
    elif form == "base64":
        import base64

        p.write_text(base64.b64encode(key).decode() + "\n")
    else:
        p.write_bytes(key)
    return p


def records(n: int, start: int = 0) -> list[Record]:
    ids = new_ids(n)
    return [
        Record(SERIES, {"n": start + i}, 1_700_000_000_000_000_000 + i, ids[i]) for i in range(n)
    ]


def test_round_trip_with_every_key_file_form(tmp_path: Path) -> None:
    for form in ("raw", "hex", "base64"):
        p = key_file(tmp_path, f"k-{form}", form)
        ring = KeyRing.from_files([p], active=f"k-{form}")
        env = Sealer(ring).seal(b"temp=21.5")
        assert env.startswith(b"PBE1" + bytes([len(f"k-{form}")]) + f"k-{form}".encode())
        assert b"temp" not in env
        assert open_envelope(KeyRing.from_files([p]), env) == b"temp=21.5"


def test_flipped_bit_wrong_key_truncation_are_rejected(tmp_path: Path) -> None:
    k1 = key_file(tmp_path, "k1")
    ring = KeyRing.from_files([k1], "k1")
    env = Sealer(ring).seal(b'[{"uid":"x"}]')
    for i in (0, 3, 4, 6, 10, len(env) - 20, len(env) - 1):  # magic, version, id, nonce, ct, tag
        bad = bytearray(env)
        bad[i] ^= 0x01
        with pytest.raises(EnvelopeError):
            open_envelope(ring, bytes(bad))
    with pytest.raises(EnvelopeError, match="failed authentication"):
        open_envelope(ring, env[:10] + bytes([env[10] ^ 0x80]) + env[11:])  # in the nonce
    # a different key under the same id: authentication fails
    other = tmp_path / "other"
    other.mkdir()
    wrong = KeyRing.from_files([key_file(other, "k1")])
    with pytest.raises(EnvelopeError, match="failed authentication"):
        open_envelope(wrong, env)
    # a ring without the id says which key is missing
    k2 = KeyRing.from_files([key_file(tmp_path, "k2")])
    with pytest.raises(EnvelopeError, match="sealed with key 'k1', which is not in the key ring"):
        open_envelope(k2, env)
    for n in (0, 4, 5, 20, len(env) - 1):
        with pytest.raises(EnvelopeError, match=r"truncated|failed authentication"):
            open_envelope(ring, env[:n])
    with pytest.raises(EnvelopeError, match="not a plantbus envelope"):
        open_envelope(ring, b"temp=1 uid=2")
    with pytest.raises(EnvelopeError, match="version"):
        open_envelope(ring, b"PBE2" + env[4:])


def test_nonces_never_repeat_and_the_prefix_is_redrawn_before_the_counter_wraps(
    tmp_path: Path,
) -> None:
    ring = KeyRing.from_files([key_file(tmp_path, "k1")], "k1")
    sealer = Sealer(ring)
    nonces = {sealer.seal(b"x")[7:19] for _ in range(5000)}
    assert len(nonces) == 5000
    # two sealers (two processes, or a restart) draw different prefixes
    assert Sealer(ring).seal(b"x")[7:15] != sealer.seal(b"x")[7:15]
    # near the end of the counter a new prefix is drawn: no wrap to counter 0 under the same prefix
    sealer._counter = (1 << 31) - 1
    last = sealer.seal(b"x")
    after = sealer.seal(b"x")
    assert last[15:19] == b"\x7f\xff\xff\xff"
    assert after[15:19] == b"\x00\x00\x00\x00" and after[7:15] != last[7:15]
    assert sealer.prefix_draws == 2
    assert open_envelope(ring, after) == b"x"


def test_rotation_keeps_every_payload_readable_with_the_ring(tmp_path: Path) -> None:
    k1, k2 = key_file(tmp_path, "k1"), key_file(tmp_path, "k2")
    sealer = Sealer(KeyRing.from_files([k1], "k1"))
    before = [sealer.seal(f"m{i}".encode()) for i in range(10)]
    sealer.rotate(KeyRing.from_files([k1, k2], "k2"))
    after = [sealer.seal(f"m{i}".encode()) for i in range(10, 20)]
    ring = KeyRing.from_files([k1, k2])
    assert [open_envelope(ring, e) for e in before + after] == [f"m{i}".encode() for i in range(20)]
    only_new = KeyRing.from_files([k2])
    with pytest.raises(EnvelopeError, match="'k1'"):
        open_envelope(only_new, before[0])
    assert open_envelope(only_new, after[0]) == b"m10"


def test_frames_and_torn_files(tmp_path: Path) -> None:
    ring = KeyRing.from_files([key_file(tmp_path, "k1")], "k1")
    s = Sealer(ring)
    data = b"".join(frame(s.seal(f"line {i}\n".encode())) for i in range(3))
    assert list(open_all(ring, data)) == [b"line 0\n", b"line 1\n", b"line 2\n"]
    with pytest.raises(EnvelopeError, match="truncated frame"):
        list(iter_frames(data[:-1]))
    with pytest.raises(EnvelopeError, match="truncated frame header"):
        list(iter_frames(data + b"\x00"))


def test_bad_key_files(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"0123456789")
    with pytest.raises(KeyError_, match="holds 10 bytes, not a 256-bit key"):
        load_key(short)
    with pytest.raises(KeyError_, match="cannot read key file"):
        load_key(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="active = 'k9' is none of the key ids"):
        EncryptConfig.model_validate({"key_files": ["a/k1.key"], "active": "k9"})
    with pytest.raises(ValueError, match="two key files have the id 'k1'"):
        EncryptConfig.model_validate({"key_files": ["a/k1.key", "b/k1.bin"]})
    assert EncryptConfig.model_validate({"key_files": ["k1.key", "k2.key"]}).active_id == "k2"
    assert "key" not in repr(KeyRing.from_files([key_file(tmp_path, "k1")])).replace("KeyRing", "")


def test_check_exits_2_naming_file_and_key_path(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "short.key").write_bytes(b"abc")
    key_file(tmp_path / "keys", "good")
    (tmp_path / "plantbus.toml").write_text(
        "[[sinks.file]]\npath = 'out.lp'\n"
        "encrypt = { key_files = ['keys/good.key', 'keys/short.key', 'keys/none.key'], "
        "active = 'good' }\n"
    )
    msgs = check_config(tmp_path / "plantbus.toml")
    assert any(
        m.startswith("plantbus.toml: sinks.file[0].encrypt.key_files[1]: key file")
        and "holds 3 bytes" in m
        for m in msgs
    ), msgs
    assert any("sinks.file[0].encrypt.key_files[2]: cannot read key file" in m for m in msgs), msgs
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "plantbus.broker.cli",
            "check",
            "-c",
            str(tmp_path / "plantbus.toml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "encrypt.key_files[1]" in out.stderr
    assert "Traceback" not in out.stderr


def test_bridge_splitter_seals_each_message(tmp_path: Path) -> None:
    k1 = key_file(tmp_path, "k1")
    ring = KeyRing.from_files([k1], "k1")
    recs = records(50)
    payload = encode_batch(recs)
    batch = EncodedBatch(
        payload=payload, records=50, codec="json", seq=1, first_id=recs[0].id, last_id=recs[-1].id
    )
    splitter: Splitter[str] = Splitter(
        "json",
        lambda rk: rk.topic,
        needs_device=False,
        max_records=20,
        max_bytes=1 << 20,
        sealer=Sealer(ring),
    )
    messages = splitter.split(batch)
    assert len(messages) == 3 and sum(m.records for m in messages) == 50
    uids = [d["uid"] for m in messages for d in json.loads(open_envelope(ring, m.payload))]
    assert uids == [r.id for r in recs]
    assert splitter.slow_splits == 0


async def write_encrypted(out: Path, k1: Path, k2: Path) -> list[str]:
    """Two runs of a file sink: the first seals with k1, the second (a reload) with k2."""
    sent: list[str] = []
    for n, enc in enumerate(
        (
            {"key_files": [str(k1)], "active": "k1"},
            {"key_files": [str(k1), str(k2)], "active": "k2"},
        )
    ):
        cfg = FileConfig.model_validate(
            {"name": "file", "path": str(out), "batch_size": 30, "encrypt": enc}
        )
        sink = load_sink_module("file").build(cfg, CTX)
        bus = Bus()
        outlet = Outlet("o", bus, [(cfg, sink)])
        task = asyncio.create_task(outlet.run())
        for b in range(5):
            batch = records(25, start=1000 * n + 25 * b)
            sent += [r.id for r in batch]
            await bus.publish(batch)
        await outlet.stop(10.0)
        await task
    return sent


def test_file_sink_encrypted_rotation_mid_stream_and_decrypt_cli(tmp_path: Path) -> None:
    k1, k2 = key_file(tmp_path, "k1"), key_file(tmp_path, "k2")
    out = tmp_path / "out.lp"
    sent = asyncio.run(write_encrypted(out, k1, k2))
    assert len(sent) == 250
    data = out.read_bytes()
    assert b"press7" not in data and b"uid=" not in data
    # the library: every record back, counted by uid
    text = b"".join(open_all(KeyRing.from_files([k1, k2]), data)).decode()
    assert UID.findall(text) == sent
    # the command, for consumers
    cmd = [
        sys.executable,
        "-m",
        "plantbus.broker.cli",
        "decrypt",
        "--key",
        str(k1),
        "--key",
        str(k2),
    ]
    done = subprocess.run([*cmd, str(out)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert UID.findall(done.stdout.decode()) == sent
    assert done.stdout.decode() == text
    # only the old key: the first part opens, then a clear error naming the missing key
    old = subprocess.run([*cmd[:-2], str(out)], capture_output=True, text=True, check=False)
    assert old.returncode == 1
    assert "which is not in the key ring ['k1']" in old.stderr
    assert len(UID.findall(old.stdout)) == 125
    # a flipped bit in the file
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x04
    (tmp_path / "bad.lp").write_bytes(bytes(bad))
    flipped = subprocess.run(
        [*cmd, str(tmp_path / "bad.lp")], capture_output=True, text=True, check=False
    )
    assert flipped.returncode == 1 and "failed authentication" in flipped.stderr
    # a bad key file is a usage error
    short = tmp_path / "s.key"
    short.write_bytes(b"x")
    bad_key = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "decrypt", "--key", str(short), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad_key.returncode == 2 and "not a 256-bit key" in bad_key.stderr


def test_decrypt_a_single_json_payload_gives_json_lines(tmp_path: Path) -> None:
    k1 = key_file(tmp_path, "k1")
    recs = records(3)
    env = Sealer(KeyRing.from_files([k1], "k1")).seal(encode_batch(recs))
    done = subprocess.run(
        [sys.executable, "-m", "plantbus.broker.cli", "decrypt", "--key", str(k1)],
        input=env,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert [json.loads(line)["uid"] for line in lines] == [r.id for r in recs]
