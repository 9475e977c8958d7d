"""The ``file`` sink: line protocol appended to a local file, rotated by size.

It is the embedded default sink (``plantbus demo`` and a fresh install write here), and a
handy tap for debugging: ``tail -f var/plantbus.lp``. Each batch is appended with one
``write`` call and ends with a newline. When the next batch would take the file past
``max_size`` the file is rotated: ``path`` becomes ``path.1``, ``path.1`` becomes
``path.2``, …, and the oldest beyond ``max_files`` is deleted. A batch is never split
between files; a single batch larger than ``max_size`` gets a file of its own.

A batch counts as written once it is in the operating system's page cache (the file is
synced to disk only when the sink closes): a power cut can lose the last seconds, which is
what a disk buffer in front of a durable sink is for.

With ``encrypt = { key_files, active }`` each batch is sealed into one AES-256-GCM
envelope and appended as a frame: a 4-byte big-endian length, then the envelope
(``docs/encryption.md``); ``plantbus decrypt --key FILE path`` gives the lines back.

Writes up to 256 KiB run on the event loop (about 50 µs); larger ones run in a thread, as a
4 MiB write to the page cache takes 1-9 ms (measured), and a slow disk far longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from plantbus.broker.configtypes import Size
from plantbus.broker.connector import BuildContext
from plantbus.broker.crypto import EncryptConfig, KeyRing, Sealer, frame
from plantbus.broker.sinks.base import EncodedBatch, RetryableSinkError, SinkConfig

__all__ = ["Config", "FileSink", "build"]

log = logging.getLogger(__name__)

_OFF_LOOP = 256 * 1024


class Config(SinkConfig):
    """``[[sinks.file]]``: keys beyond those every sink has.

    Attributes:
        path: the line-protocol file; rotated files get ``.1``, ``.2``, … appended.
        max_size: rotate before the file would grow past this.
        max_files: rotated files kept besides the current one (0: truncate on rotation).
        uid_field: the line-protocol field that carries the record ID.
        encrypt: seal each batch into a length-prefixed envelope with this key ring's
            active key (None: plain line protocol).
    """

    codec: Literal["line_protocol"] = "line_protocol"
    path: Path = Path("var/plantbus.lp")
    max_size: Size = Field(default=100 * 1024 * 1024, ge=1)
    max_files: int = Field(default=10, ge=0)
    uid_field: str = Field(default="uid", min_length=1)
    encrypt: EncryptConfig | None = None


def _batch_key(batch: EncodedBatch) -> tuple[int, str, str]:
    return (batch.seq, batch.first_id, batch.last_id)


class FileSink:
    """Appends line-protocol batches to ``config.path``, rotating by size.

    Attributes:
        rotations: files rotated since start.
        size: bytes in the current file.
    """

    codec = "line_protocol"

    def __init__(self, config: Config, name: str = "file"):
        self.config = config
        self.name = name
        self.path = Path(config.path)
        self._fd: int | None = None
        self.size = 0
        self.rotations = 0
        # a write that the outlet timed out may still be running in its thread: the next
        # write waits for it, and skips the batch if that write did get it onto disk
        self._busy: asyncio.Future[None] | None = None
        self._last_written: tuple[int, str, str] | None = None
        self.sealer = Sealer(KeyRing.from_config(config.encrypt)) if config.encrypt else None

    # -- blocking helpers (run on the loop for small batches, else in a thread) -------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def _rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.config.max_files == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.config.max_files - 1, 0, -1):
                src = self._rotated(i)
                if src.exists():
                    os.replace(src, self._rotated(i + 1))
            os.replace(self.path, self._rotated(1))
        self.rotations += 1
        self._open()

    def _write_sync(self, batch: EncodedBatch) -> None:
        parts = [batch.payload]
        if not batch.payload.endswith(b"\n"):
            parts.append(b"\n")  # a batch always ends a line, or two batches would share one
        if self.sealer is not None:
            parts = [frame(self.sealer.seal(b"".join(parts)))]
        total = sum(len(p) for p in parts)
        if self._fd is None:
            self._open()
        if self.size > 0 and self.size + total > self.config.max_size:
            self._rotate()
        fd = self._fd
        assert fd is not None
        start = self.size
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError:
            # take back a partial batch (e.g. on ENOSPC) so a retry does not duplicate lines
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        self.size = start + total
        self._last_written = _batch_key(batch)

    # -- the Sink protocol -------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the folder if needed and open the file for appending."""
        if self._fd is not None:
            return
        try:
            await asyncio.to_thread(self._open)
        except OSError as e:
            raise RetryableSinkError(f"cannot open {self.path}: {e}") from e
        log.debug("sink %s: appending to %s (%d bytes)", self.name, self.path, self.size)

    async def write(self, batch: EncodedBatch) -> None:
        """Append one batch (rotating first if it would pass ``max_size``)."""
        if self._busy is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._busy)
            self._busy = None
            if self._last_written == _batch_key(batch):
                return
        try:
            if len(batch.payload) <= _OFF_LOOP:
                self._write_sync(batch)
            else:
                self._busy = asyncio.ensure_future(asyncio.to_thread(self._write_sync, batch))
                await asyncio.shield(self._busy)
                self._busy = None
        except OSError as e:
            self._busy = None
            raise RetryableSinkError(f"writing {self.path} failed: {e}") from e

    async def close(self) -> None:
        """Wait for a write still running, sync the file to disk and close it."""
        if self._busy is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._busy)
            self._busy = None
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                await asyncio.to_thread(os.fsync, fd)
            except OSError as e:
                log.warning("sink %s: syncing %s failed: %s", self.name, self.path, e)
            finally:
                os.close(fd)

    def __repr__(self) -> str:
        return f"FileSink({self.name!r}, {str(self.path)!r})"


def build(config: Config, ctx: BuildContext) -> FileSink:
    """Build the sink; the file is opened when the outlet connects it."""
    return FileSink(config, config.name or "file")
