"""The hand-written sd_notify client against real Unix datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path

from plantbus.broker.sdnotify import Notifier, Watchdog, watchdog_interval


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_path_socket_gets_one_datagram_per_message(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        n = Notifier(path)
        assert n.ready("running: 1 device")
        assert rx.recv(4096) == b"READY=1\nSTATUS=running: 1 device"
        assert n.stopping()
        assert rx.recv(4096) == b"STOPPING=1"
        n.close()


def test_abstract_socket_written_with_at() -> None:
    name = f"plantbus-unit-{uuid.uuid4().hex}"
    with _receiver(b"\0" + name.encode()) as rx:
        n = Notifier("@" + name)
        assert n.reloading()
        lines = rx.recv(4096).decode().split("\n")
        assert lines[0] == "RELOADING=1"
        assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
        n.close()


def test_without_socket_nothing_is_sent_and_nothing_raises(tmp_path: Path) -> None:
    assert not Notifier("").enabled
    assert not Notifier("").ready()
    # a socket path nobody listens on: the daemon must carry on
    gone = Notifier(str(tmp_path / "absent"))
    assert gone.enabled and not gone.notify("WATCHDOG=1")


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": mine}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "bad"}) is None


def test_watchdog_withholds_pings_while_a_supervisor_is_dead(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    checks = 0

    async def main() -> tuple[int, list[bytes]]:
        done = asyncio.Event()

        def alive() -> str | None:
            nonlocal checks
            checks += 1
            if checks >= 6:
                done.set()
            # alive for two checks, then a dead supervisor
            return None if checks <= 2 else "device x: its supervisor has ended"

        with _receiver(path) as rx:
            rx.setblocking(False)
            wd = Watchdog(Notifier(path), 0.001, alive)
            task = asyncio.create_task(wd.run())
            await done.wait()
            task.cancel()
            got = []
            while True:
                try:
                    got.append(rx.recv(64))
                except BlockingIOError:
                    break
            return wd.pings, got

    pings, got = asyncio.run(main())
    assert pings == 2
    assert got == [b"WATCHDOG=1", b"WATCHDOG=1"]
