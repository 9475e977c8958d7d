"""Honouring a cancellation that a library lost on the way.

A task asked to stop keeps the request counted (``Task.cancelling()``) even when the
``CancelledError`` never reaches it:

- Python 3.11's ``asyncio.wait_for`` returns the result and drops a cancellation that
  arrives as its awaitable completes (CPython gh-86296). asyncua, pymodbus and
  python-snap7 use it for every request; with data always ready (fast polls) it happens,
  and a device told to stop would poll on.
- Some drivers turn a cancellation that lands mid-connect into their own error (aiormq
  during a failing TLS handshake raises ``AMQPConnectionError``), which a retry loop
  catches like any failure; asyncio does not cancel again, so the loop would retry forever.

Loops that may meet either call ``raise_if_cancelling()`` once a turn.
"""

from __future__ import annotations

import asyncio

__all__ = ["raise_if_cancelling"]


def raise_if_cancelling(task: asyncio.Task[object] | None = None) -> None:
    """Raise ``CancelledError`` if ``task`` (default: the current one) was asked to stop."""
    if task is None:
        task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
