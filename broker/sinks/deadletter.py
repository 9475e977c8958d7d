"""A dead-letter file: lines an upstream refused for good, each with the upstream's reason.

Format (line protocol, so the file can be fixed up and written again as it is, e.g. with
``curl --data-binary @local.lp``: InfluxDB skips ``#`` comment lines)::

    # 2026-11-28T14:05:39.123Z sink=local batch=17 HTTP 400: partial write: field type ...
    conflict,device=c temp=20.5,uid="0193…" 1732790000123456789

Each refused line follows one comment line that gives the UTC time it was refused, the
sink, the batch's sequence number and the upstream's answer (on one line). The file is
appended to with one ``write`` per batch and synced, so a crash loses no dead letter that
was counted. Past ``max_size`` bytes nothing more is appended: those lines are counted as
``dropped`` and logged once, so a device that keeps sending refused values cannot fill the
disk.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DeadLetterFile"]

log = logging.getLogger(__name__)


def _comment(reason: str) -> str:
    """``reason`` as the text of one comment line (no line breaks in it)."""
    return " ".join(reason.split())


class DeadLetterFile:
    """Appends refused lines with their reasons to one file, up to a size limit.

    Args:
        path: the file (its folder is created on the first append).
        max_size: bytes the file may grow to; what would pass it is dropped and counted.
        owner: who writes, for the comment lines and logs (e.g. ``sink=local``).

    Attributes:
        lines: lines written to the file by this process.
        dropped: lines not written because the file was full or could not be written.
    """

    def __init__(self, path: Path, max_size: int, owner: str):
        self.path = path
        self.max_size = max_size
        self.owner = owner
        self.lines = 0
        self.dropped = 0
        self._full_logged = False

    def append(self, entries: Sequence[tuple[bytes, str]], context: str = "") -> int:
        """Append ``(line, reason)`` pairs; returns how many lines went into the file.

        Lines that do not fit within ``max_size`` or cannot be written (the error is
        logged) are counted in ``dropped``.
        """
        if not entries:
            return 0
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        stamp = now.replace("+00:00", "Z")
        head = f"# {stamp} {self.owner}{' ' + context if context else ''} "
        parts: list[bytes] = []
        for line, reason in entries:
            parts.append(f"{head}{_comment(reason)}\n".encode())
            parts.append(line if line.endswith(b"\n") else line + b"\n")
        data = b"".join(parts)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                size = f.tell()
                if size + len(data) > self.max_size:
                    self._full(len(entries), size)
                    return 0
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.dropped += len(entries)
            log.error(
                "%s: cannot write %d refused lines to the dead-letter file %s: %s",
                self.owner,
                len(entries),
                self.path,
                e,
            )
            return 0
        self.lines += len(entries)
        self._full_logged = False  # the file was moved away or emptied: say so if it fills again
        return len(entries)

    def _full(self, count: int, size: int) -> None:
        self.dropped += count
        if not self._full_logged:
            self._full_logged = True
            log.error(
                "%s: dead-letter file %s is full (%d bytes, limit %d): refused lines are "
                "now only counted; move the file away to keep the next ones",
                self.owner,
                self.path,
                size,
                self.max_size,
            )
