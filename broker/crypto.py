"""User-keyed payload encryption: AES-256-GCM envelopes sealed with keys from key files.

Data leaving the node (the MQTT, AMQP and Kafka bridges, the file sink) can be sealed with
the owner's own keys, so that only holders of the key files can read it outside. The
envelope format is specified in ``docs/encryption.md`` (version 1)::

    magic "PBE1" (4 bytes) | key id length L (1 byte, 1..64) | key id (L bytes, ASCII)
    | nonce (12 bytes) | ciphertext + 16-byte GCM tag

The additional authenticated data (AAD) is the header, everything before the ciphertext
(magic, length, key id, nonce), so a changed key id or version is detected like a changed
ciphertext. The nonce is a 64-bit random prefix drawn when a sealer starts and a 32-bit
big-endian counter; the prefix is drawn again long before the counter wraps (every
2^31 messages), so a nonce never repeats under one key within a process, and across
restarts two draws collide with probability about n^2 / 2^65 for n restarts (the
argument is in the docs page).

A key file holds exactly 32 bytes: raw, or as 64 hex digits, or as base64 (a trailing
newline is ignored). Its id is the file name without its extension (``k2026.key`` ->
``k2026``). ``cryptography`` is imported only when a key ring is built.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from plantbus.broker.configtypes import StrictModel

__all__ = [
    "MAGIC",
    "EncryptConfig",
    "EnvelopeError",
    "KeyError_",
    "KeyRing",
    "Sealer",
    "as_records",
    "frame",
    "iter_frames",
    "key_id_of",
    "load_key",
    "open_all",
    "open_envelope",
]

MAGIC = b"PBE1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FRAME = struct.Struct(">I")
# the counter is 32 bits; the prefix is drawn again well before it could wrap
_REDRAW_AT = 1 << 31
MAX_FRAME = 1 << 30


class EnvelopeError(ValueError):
    """An envelope that cannot be opened: not an envelope, unknown key, or tampered."""


class KeyError_(ValueError):
    """A key file that cannot be used (missing, unreadable, wrong size, bad id)."""


def key_id_of(path: Path) -> str:
    """The key id of a key file: its name without the extension."""
    return Path(path).stem


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path`` (raw, 64 hex digits or base64).

    Raises:
        KeyError_: missing or unreadable file, or not exactly 32 bytes of key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyError_(f"cannot read key file {path}: {e.strerror or e}") from None
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == KEY_BYTES:
        return raw
    raise KeyError_(
        f"key file {path} holds {len(data)} bytes, not a 256-bit key (32 raw bytes, "
        "64 hex digits or base64 of 32 bytes); make one with: "
        "head -c 32 /dev/urandom > FILE"
    )


class EncryptConfig(StrictModel):
    """``encrypt = { key_files = [...], active = "id" }`` on a bridge or file sink.

    Attributes:
        key_files: key files of the ring; each file's id is its name without extension.
        active: the id of the key that seals new payloads (default: the last file's id).
    """

    secret_paths: ClassVar[tuple[str, ...]] = ("key_files",)  # `check` warns if world-readable

    key_files: list[Path] = Field(min_length=1)
    active: str | None = None

    @field_validator("key_files")
    @classmethod
    def _ids(cls, files: list[Path]) -> list[Path]:
        seen: set[str] = set()
        for p in files:
            kid = key_id_of(p)
            if not _ID_RE.match(kid):
                raise ValueError(
                    f"key file {str(p)!r}: its id {kid!r} (the name without extension) must "
                    "be 1-64 of A-Z a-z 0-9 . _ -"
                )
            if kid in seen:
                raise ValueError(f"two key files have the id {kid!r}")
            seen.add(kid)
        return files

    @model_validator(mode="after")
    def _active_known(self) -> EncryptConfig:
        ids = [key_id_of(p) for p in self.key_files]
        if self.active is not None and self.active not in ids:
            raise ValueError(f"active = {self.active!r} is none of the key ids {ids}")
        return self

    @property
    def active_id(self) -> str:
        return self.active if self.active is not None else key_id_of(self.key_files[-1])


def _aesgcm() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:  # pragma: no cover - depends on the install
        raise KeyError_(
            "payload encryption needs the 'cryptography' package: pip install 'plantbus[crypto]'"
        ) from e
    return AESGCM


class KeyRing:
    """Keys by id: all of them open envelopes, the active one seals.

    Args:
        keys: key id -> 32-byte key.
        active: the id of the sealing key (None: the ring only opens).
    """

    def __init__(self, keys: dict[str, bytes], active: str | None = None):
        aesgcm = _aesgcm()
        for kid, key in keys.items():
            if not _ID_RE.match(kid):
                raise KeyError_(f"invalid key id {kid!r}")
            if len(key) != KEY_BYTES:
                raise KeyError_(f"key {kid!r} is {len(key)} bytes, not 32")
        if active is not None and active not in keys:
            raise KeyError_(f"active key {active!r} is not in the ring")
        self._ciphers = {kid: aesgcm(key) for kid, key in keys.items()}
        self.active = active

    @classmethod
    def from_files(cls, files: Iterable[Path], active: str | None = None) -> KeyRing:
        """A ring of key files (ids from their names).

        Raises:
            KeyError_: a file that is missing, unreadable or not a 256-bit key.
        """
        keys: dict[str, bytes] = {}
        for p in files:
            kid = key_id_of(p)
            if kid in keys:
                raise KeyError_(f"two key files have the id {kid!r}")
            keys[kid] = load_key(p)
        return cls(keys, active)

    @classmethod
    def from_config(cls, config: EncryptConfig) -> KeyRing:
        return cls.from_files(config.key_files, config.active_id)

    @property
    def ids(self) -> list[str]:
        return list(self._ciphers)

    def cipher(self, kid: str) -> Any:
        return self._ciphers[kid]

    def __repr__(self) -> str:  # never the keys
        return f"KeyRing(ids={self.ids!r}, active={self.active!r})"


class Sealer:
    """Seals payloads under the ring's active key with never-repeating nonces.

    Nonce = 8-byte random prefix (drawn at start and every 2^31 messages) + 4-byte
    big-endian counter. Thread-safe (the file sink seals large batches in a thread).

    Attributes:
        sealed: payloads sealed since start.
        prefix_draws: random prefixes drawn since start.
    """

    def __init__(self, ring: KeyRing):
        if ring.active is None:
            raise KeyError_("the key ring has no active key to seal with")
        self.ring = ring
        self._lock = threading.Lock()
        self.sealed = 0
        self.prefix_draws = 0
        self._use(ring)

    def _use(self, ring: KeyRing) -> None:
        assert ring.active is not None
        kid = ring.active.encode("ascii")
        self.ring = ring
        self._kid = kid
        self._cipher = ring.cipher(ring.active)
        self._head = MAGIC + bytes([len(kid)]) + kid
        self._draw()

    def _draw(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = 0
        self.prefix_draws += 1

    def rotate(self, ring: KeyRing) -> None:
        """Seal with ``ring`` (a new active key) from now on; a fresh prefix either way."""
        if ring.active is None:
            raise KeyError_("the key ring has no active key to seal with")
        with self._lock:
            self._use(ring)

    @property
    def active(self) -> str:
        return self._kid.decode("ascii")

    def seal(self, plaintext: bytes) -> bytes:
        """One envelope holding ``plaintext``."""
        with self._lock:
            if self._counter >= _REDRAW_AT:
                self._draw()
            nonce = self._prefix + self._counter.to_bytes(4, "big")
            self._counter += 1
            self.sealed += 1
            header = self._head + nonce
            cipher = self._cipher
        return header + cipher.encrypt(nonce, plaintext, header)


def open_envelope(ring: KeyRing, envelope: bytes) -> bytes:
    """The plaintext of one envelope.

    Raises:
        EnvelopeError: not a version-1 envelope, truncated, sealed with a key that is not
            in the ring, or altered (tag mismatch).
    """
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise EnvelopeError("an envelope is bytes")
    env = bytes(envelope)
    if len(env) < 5:
        raise EnvelopeError(f"truncated envelope: {len(env)} bytes")
    if env[:3] != MAGIC[:3]:
        raise EnvelopeError("not a plantbus envelope (no 'PBE' magic)")
    if env[3:4] != MAGIC[3:4]:
        raise EnvelopeError(f"unsupported envelope version {env[3:4]!r} (this reader knows 1)")
    n = env[4]
    if not 1 <= n <= 64:
        raise EnvelopeError(f"invalid key id length {n}")
    head_len = 5 + n + NONCE_BYTES
    if len(env) < head_len + TAG_BYTES:
        raise EnvelopeError(
            f"truncated envelope: {len(env)} bytes, at least {head_len + TAG_BYTES} needed"
        )
    try:
        kid = env[5 : 5 + n].decode("ascii")
    except UnicodeDecodeError:
        raise EnvelopeError("invalid key id (not ASCII)") from None
    if kid not in ring.ids:
        raise EnvelopeError(
            f"sealed with key {kid!r}, which is not in the key ring {ring.ids} "
            "(pass its key file with --key)"
        )
    header = env[:head_len]
    nonce = env[5 + n : head_len]
    from cryptography.exceptions import InvalidTag

    try:
        return ring.cipher(kid).decrypt(nonce, env[head_len:], header)
    except InvalidTag:
        raise EnvelopeError(
            f"envelope sealed with key {kid!r} failed authentication: altered, truncated "
            "or a different key with the same id"
        ) from None


def frame(envelope: bytes) -> bytes:
    """An envelope as one record of an encrypted file: 4-byte big-endian length + bytes."""
    return _FRAME.pack(len(envelope)) + envelope


def iter_frames(data: bytes) -> Iterator[bytes]:
    """The envelopes of an encrypted file's bytes, in order.

    Raises:
        EnvelopeError: a torn last frame or a length beyond the data.
    """
    view = memoryview(data)
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < _FRAME.size:
            raise EnvelopeError(f"truncated frame header at byte {pos}")
        (n,) = _FRAME.unpack_from(view, pos)
        pos += _FRAME.size
        if n > MAX_FRAME or pos + n > end:
            raise EnvelopeError(
                f"truncated frame at byte {pos - _FRAME.size}: length {n}, {end - pos} left"
            )
        yield bytes(view[pos : pos + n])
        pos += n


def open_all(ring: KeyRing, data: bytes) -> Iterator[bytes]:
    """The plaintexts in ``data``: one envelope (a bridge message) or an encrypted file.

    Raises:
        EnvelopeError: any envelope or frame that cannot be opened.
    """
    if data[:3] == MAGIC[:3]:
        yield open_envelope(ring, data)
        return
    for i, env in enumerate(iter_frames(data)):
        try:
            yield open_envelope(ring, env)
        except EnvelopeError as e:
            raise EnvelopeError(f"frame {i}: {e}") from None


def as_records(plaintext: bytes) -> bytes:
    """A payload as record lines: a JSON array becomes JSON lines; lines stay as they are."""
    text = plaintext.lstrip()
    if text[:1] == b"[":
        try:
            docs = json.loads(plaintext)
        except (ValueError, RecursionError):
            # not JSON after all: line protocol may start with "[" (a measurement "[m]")
            docs = None
        if isinstance(docs, list):
            return b"".join(_json_line(d) for d in docs)
    return plaintext if plaintext.endswith(b"\n") or not plaintext else plaintext + b"\n"


def _json_line(doc: object) -> bytes:
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON): keep it escaped
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
