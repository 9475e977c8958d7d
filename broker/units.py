"""Durations ("100ms", "5s", "1h30m") and sizes ("512MiB", "10kB") as config strings."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration", "parse_size"]

_DUR_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_DUR_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d|w)")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kKMGT]i?B|B)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "kiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}


def parse_duration(text: str) -> float:
    """Parse a duration string into seconds (float).

    Raises:
        ValueError: with a message naming the accepted form.
    """
    if not isinstance(text, str):
        raise ValueError(f'a duration must be a string such as "100ms" or "5s", not {text!r}')
    s = text.strip()
    pos = 0
    total = 0.0
    for m in _DUR_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit (ns, us, ms, s, m, h, d, w), "
            'e.g. "100ms", "5s", "1h30m"'
        )
    return total


def parse_size(text: str | int) -> int:
    """Parse a size ("512MiB", "10kB", "4096") into bytes."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f'a size must be a string such as "512MiB", not {text!r}')
    m = _SIZE.match(text)
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: use a number with B, kB, MB, GB, KiB, MiB or GiB, "
            'e.g. "512MiB"'
        )
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_duration(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"
