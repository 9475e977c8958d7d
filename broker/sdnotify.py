"""systemd's notify protocol (``sd_notify``) and the service watchdog, without a dependency.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``: a Unix datagram socket (a path, or
an abstract-namespace name written with a leading ``@``). Each message is one datagram of
``KEY=value`` lines: ``READY=1`` once the config is loaded and the outlets run,
``RELOADING=1`` / ``READY=1`` around a SIGHUP reload, ``STOPPING=1`` when the drain begins,
``STATUS=...`` free text for ``systemctl status``, and ``WATCHDOG=1`` as the keep-alive.

With ``WatchdogSec=`` systemd also passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``); the
``Watchdog`` task pings at half that interval *from the event loop* and only while every
supervisor is alive. A frozen loop (a blocking call, a stuck write to stderr) or a
supervisor task that has died stops the pings, so systemd restarts the daemon. A device or
sink that is down is not a reason: its supervisor is alive, backing off, and the pings go on.

Without ``NOTIFY_SOCKET`` (a terminal, a test) every call is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

__all__ = ["Notifier", "Watchdog", "watchdog_interval"]

log = logging.getLogger("plantbus.systemd")


class Notifier:
    """Sends ``sd_notify`` messages to ``NOTIFY_SOCKET`` (nothing when it is unset).

    Args:
        address: the socket; default ``$NOTIFY_SOCKET``. A leading ``@`` names an
            abstract-namespace socket.
    """

    def __init__(self, address: str | None = None):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            # abstract namespace: the kernel name starts with a NUL byte instead of '@'
            self._address = b"\0" + address[1:].encode()
        else:
            self._address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when not sent (never raises).

        A missing or full socket must not stop the daemon: systemd then times the service
        out itself, which is the right outcome for a broken notify channel.
        """
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", lines, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to its request
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when not asked.

    ``WATCHDOG_PID`` set to another process (a wrapper forwarded the variables) means the
    watchdog is not ours to feed.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds while ``alive()`` holds.

    Runs as a task on the event loop, so a loop that does not turn sends nothing.

    Args:
        notifier: where the pings go.
        interval: seconds between pings.
        alive: the liveness check (the runtime: every supervisor task still runs).
    """

    def __init__(self, notifier: Notifier, interval: float, alive: Callable[[], str | None]):
        self._notifier = notifier
        self.interval = interval
        self._alive = alive
        self.pings = 0
        self._withheld: str | None = None

    async def run(self) -> None:
        while True:
            problem = self._alive()
            if problem is None:
                if self._withheld is not None:
                    log.info("watchdog: pings resumed")
                    self._withheld = None
                self._notifier.notify("WATCHDOG=1")
                self.pings += 1
            elif problem != self._withheld:
                # logged once: systemd will restart the service when WatchdogSec runs out
                log.error("watchdog: pings withheld: %s", problem)
                self._withheld = problem
            await asyncio.sleep(self.interval)
