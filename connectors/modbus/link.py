"""Links: one connection (a TCP connection or a serial line) shared by every device on it.

Devices with the same endpoint (transport, host and port; or serial port) share one ``Link``:
several unit ids behind one gateway use one TCP connection, and the units of one RS-485
bus use one serial port. A link carries one request at a time (Modbus RTU allows nothing
else, and many TCP gateways serialise anyway) and hands the turns out round-robin over the
devices waiting, so a device with many reads per poll cannot starve the others on the bus.
Before each request the line is kept silent for the requesting device's ``frame_delay``
after the end of the previous transaction.

Faults:

* **timeout**: the connection is torn down at once, so a reply that arrives late can never
  be taken for the answer to a newer request (Modbus RTU frames carry no transaction id;
  a gateway may still answer). The next request opens a new connection; on a serial line
  the port is reopened and its input discarded.
* **connection lost or malformed reply**: the same teardown.
* **cannot connect**: the attempt fails, and further attempts wait a jittered exponential
  backoff (``plantbus.broker.backoff``); requests in that window fail at once without
  touching the network, so a dead gateway costs no CPU and no storm of connects however
  many devices sit behind it.

pymodbus is imported when the first connection is made, never at module import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from plantbus.broker.backoff import Backoff
from plantbus.broker.cancel import raise_if_cancelling
from plantbus.connectors.modbus.config import Config, SerialConfig
from plantbus.connectors.modbus.status import (
    BAD_COMMUNICATION_ERROR,
    BAD_CONNECTION_CLOSED,
    BAD_DECODING_ERROR,
    BAD_NOT_CONNECTED,
    BAD_TIMEOUT,
    EXCEPTION_NAMES,
    status_for_exception,
)

__all__ = [
    "CONNECT_BACKOFF",
    "Link",
    "LinkError",
    "LinkSettings",
    "ModbusExceptionResponse",
    "NotConnected",
    "ReplyTimeout",
    "link_for",
]

log = logging.getLogger("plantbus.connectors.modbus")

CONNECT_BACKOFF = (0.5, 30.0)
"""(initial, maximum) seconds between connection attempts of a link (equal jitter)."""

_CLIENT_TIMEOUT = 3600.0
# pymodbus's own reply and connect timeouts are set out of the way: every request and
# connect runs under the device's own `timeout` (asyncio.timeout), which differs per device
# on a shared link and must not trigger pymodbus's in-connection retries.

_METHODS = {
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
    "holding": "read_holding_registers",
    "input": "read_input_registers",
}


class LinkError(Exception):
    """A read got no usable reply. ``status`` is the StatusCode its points are marked with."""

    status = BAD_COMMUNICATION_ERROR


class ReplyTimeout(LinkError):
    """No reply within the timeout; the connection was torn down."""

    status = BAD_TIMEOUT


class ConnectionLost(LinkError):
    """The connection broke during the request; it was torn down."""

    status = BAD_CONNECTION_CLOSED


class BadReply(LinkError):
    """The reply did not fit the request (e.g. fewer registers); the connection was torn down."""

    status = BAD_DECODING_ERROR


class NotConnected(LinkError):
    """No connection could be made (or the link is waiting out its reconnect backoff)."""

    status = BAD_NOT_CONNECTED


class ModbusExceptionResponse(LinkError):
    """The device answered with a Modbus exception (the connection is fine)."""

    def __init__(self, exception_code: int, what: str):
        name = EXCEPTION_NAMES.get(exception_code, "unknown exception")
        super().__init__(f"{what}: exception {exception_code} ({name})")
        self.exception_code = exception_code
        self.status = status_for_exception(exception_code)


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What identifies a link and how to open it."""

    transport: str
    host: str | None = None
    port: int = 502
    serial: SerialConfig | None = None

    @classmethod
    def of(cls, config: Config) -> LinkSettings:
        if config.transport == "rtu":
            return cls("rtu", serial=config.serial)
        return cls(config.transport, host=config.host, port=config.port)

    @property
    def key(self) -> Hashable:
        """Devices whose settings have the same key share the link."""
        if self.transport == "rtu":
            assert self.serial is not None
            return ("rtu", self.serial.port)
        return (self.transport, self.host, self.port)

    @property
    def label(self) -> str:
        if self.transport == "rtu":
            assert self.serial is not None
            return f"rtu {self.serial.port}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.transport} {host}:{self.port}"


class _Turns:
    """One holder at a time; waiting owners are served round-robin, each in FIFO order.

    An owner that is served goes to the back of the rotation if it has more requests
    waiting, so every waiting device gets one request per round.
    """

    __slots__ = ("_busy", "_waiting")

    def __init__(self) -> None:
        self._busy = False
        self._waiting: dict[Hashable, deque[asyncio.Future[None]]] = {}

    async def acquire(self, owner: Hashable) -> None:
        if not self._busy and not self._waiting:
            self._busy = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the turn was handed to us as we were cancelled: pass it on
            else:
                queue = self._waiting.get(owner)
                if queue is not None:
                    with contextlib.suppress(ValueError):
                        queue.remove(fut)
                    if not queue:
                        del self._waiting[owner]
            raise

    def release(self) -> None:
        waiting = self._waiting
        while waiting:
            owner = next(iter(waiting))
            queue = waiting.pop(owner)
            fut = queue.popleft()
            if queue:
                waiting[owner] = queue  # to the back of the rotation
            if not fut.done():
                fut.set_result(None)
                return
        self._busy = False


class Link:
    """One shared connection; see the module doc.

    Attributes:
        settings: endpoint and line settings.
        requests: requests sent.
        timeouts: requests that got no reply in time.
        connects: connections opened.
        connect_failures: connection attempts that failed.
        max_in_flight: the most requests ever outstanding at once (1 by design).
        trace: when a list, ``(owner, start, end)`` monotonic times of each transaction are
            appended (tests check fairness and the inter-frame delay with it).
    """

    def __init__(self, settings: LinkSettings, *, clock: Any = time.monotonic):
        self.settings = settings
        self.label = settings.label
        self._clock = clock
        self._turns = _Turns()
        self._client: Any = None
        self._users = 0
        self._last_end = 0.0
        self._retry_at = 0.0
        self._last_error = ""
        self._backoff = Backoff(*CONNECT_BACKOFF, jitter="equal")
        self._in_flight = 0
        self.requests = 0
        self.timeouts = 0
        self.connects = 0
        self.connect_failures = 0
        self.max_in_flight = 0
        self.trace: list[tuple[Hashable, float, float]] | None = None

    # -- users --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Link]:
        """Hold the link while a device runs; the last user out closes the connection."""
        self._users += 1
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0:
                self.close()

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and bool(client.connected)

    def close(self) -> None:
        """Tear the connection down (the next request opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- connecting -----------------------------------------------------------------------------

    def _new_client(self) -> Any:
        from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
        from pymodbus.framer import FramerType

        _quiet_pymodbus()

        s = self.settings
        common: dict[str, Any] = {
            "timeout": _CLIENT_TIMEOUT,
            "retries": 0,  # a resend on the same connection could pair with a late reply
            "reconnect_delay": 0,  # reconnects are ours, with jittered backoff
            "trace_connect": self._on_connect_change,
        }
        if s.transport == "rtu":
            assert s.serial is not None
            return AsyncModbusSerialClient(
                s.serial.port,
                baudrate=s.serial.baudrate,
                parity=s.serial.parity,
                stopbits=s.serial.stopbits,
                bytesize=s.serial.bytesize,
                **common,
            )
        framer = FramerType.RTU if s.transport == "rtu-over-tcp" else FramerType.SOCKET
        assert s.host is not None
        return AsyncModbusTcpClient(s.host, port=s.port, framer=framer, **common)

    def _on_connect_change(self, connected: bool) -> None:
        # pymodbus calls this when the transport goes away; fail the request in flight at
        # once instead of letting it run into its timeout (best effort: the future is a
        # pymodbus internal, so without it the request simply times out)
        if connected:
            return
        client = self._client
        fut = getattr(getattr(client, "ctx", None), "response_future", None)
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionResetError("connection lost"))

    async def _connect(self, connect_timeout: float) -> Any:
        now = self._clock()
        if now < self._retry_at:
            raise NotConnected(
                f"{self.label}: {self._last_error}; next attempt in {self._retry_at - now:.1f}s"
            )
        self.close()
        client = self._new_client()
        reasons = _capture_connect_errors(client)
        error = "cannot connect"
        ok = False
        try:
            async with asyncio.timeout(connect_timeout):
                ok = bool(await client.connect())
        except TimeoutError:
            error = f"no connection within {connect_timeout:g}s"
        except OSError as exc:
            reasons.append(exc)
        if not ok:
            if reasons and error == "cannot connect":
                error = f"cannot connect: {_describe_os_error(reasons[-1])}"
            client.close()
            self.connect_failures += 1
            delay = self._backoff.next()
            self._retry_at = self._clock() + delay
            self._last_error = error
            raise NotConnected(f"{self.label}: {error}")
        self._backoff.reset()
        self._retry_at = 0.0
        self.connects += 1
        if self.settings.transport == "rtu":
            # bytes that arrived for an earlier request (a late reply) must not reach the next
            serial = getattr(getattr(client.ctx, "transport", None), "sync_serial", None)
            if serial is not None:
                with contextlib.suppress(Exception):
                    serial.reset_input_buffer()
        self._client = client
        return client

    # -- requests -------------------------------------------------------------------------------

    async def read(
        self,
        owner: Hashable,
        unit: int,
        area: str,
        address: int,
        count: int,
        reply_timeout: float,
        frame_delay: float = 0.0,
    ) -> Sequence[int] | Sequence[bool]:
        """Read ``count`` registers (or bits) of ``area`` from ``address`` of ``unit``.

        Args:
            owner: the requesting device (round-robin key).
            reply_timeout: seconds for the reply (and for connecting, when a connection is
                needed).
            frame_delay: silence on the line after the previous transaction.

        Returns:
            the registers (ints), or the bits (bools; possibly padded past ``count``).

        Raises:
            ModbusExceptionResponse: the device answered with an exception.
            ReplyTimeout / ConnectionLost / BadReply: the connection was torn down.
            NotConnected: no connection (the link is backing off).
        """
        what = f"{area} {address}+{count}"
        reply = await self._transact(
            owner,
            unit,
            what,
            lambda client: getattr(client, _METHODS[area])(address, count=count, device_id=unit),
            reply_timeout,
            frame_delay,
        )
        self._check(reply, unit, what)
        values = reply.bits if area in ("coil", "discrete") else reply.registers
        if len(values) < count:
            self.close()
            raise BadReply(
                f"{self.label} unit {unit}: {area} {address}+{count}: the reply holds "
                f"{len(values)} values"
            )
        return values  # type: ignore[no-any-return]

    async def write(
        self,
        owner: Hashable,
        unit: int,
        area: str,
        address: int,
        values: Sequence[int] | Sequence[bool],
        reply_timeout: float,
        frame_delay: float = 0.0,
    ) -> None:
        """Write coils or holding registers of ``unit`` from ``address`` on.

        One value is written with the single-write function (5 or 6), several with the
        multiple-write one (15 or 16). The request takes its turn on the link like a read,
        so writes interleave with polls without ever sharing a transaction.

        Raises:
            ModbusExceptionResponse: the device answered with an exception.
            ReplyTimeout / ConnectionLost / BadReply: the connection was torn down.
            NotConnected: no connection (the link is backing off).
        """
        n = len(values)
        if area == "coil":
            method, single = "write_coils", "write_coil"
        elif area == "holding":
            method, single = "write_registers", "write_register"
        else:
            raise ValueError(f"{area} cannot be written")
        what = f"write {area} {address}+{n}"

        def call(client: Any) -> Any:
            if n == 1:
                return getattr(client, single)(address, values[0], device_id=unit)
            return getattr(client, method)(address, list(values), device_id=unit)

        reply = await self._transact(owner, unit, what, call, reply_timeout, frame_delay)
        self._check(reply, unit, what)

    async def mask_write(
        self,
        owner: Hashable,
        unit: int,
        address: int,
        and_mask: int,
        or_mask: int,
        reply_timeout: float,
        frame_delay: float = 0.0,
    ) -> None:
        """Set bits of one holding register in place (function 22, Mask Write Register).

        The device applies ``(register AND and_mask) OR (or_mask AND NOT and_mask)`` itself,
        so writing one bit never overwrites the others, whatever else writes the register.

        Raises:
            as ``write``; a device without function 22 answers exception 1.
        """
        what = f"mask write holding {address}"
        reply = await self._transact(
            owner,
            unit,
            what,
            lambda client: client.mask_write_register(
                address=address, and_mask=and_mask, or_mask=or_mask, device_id=unit
            ),
            reply_timeout,
            frame_delay,
        )
        self._check(reply, unit, what)

    def _check(self, reply: Any, unit: int, what: str) -> None:
        if reply.isError():
            code = getattr(reply, "exception_code", None)
            if not code:
                self.close()
                raise BadReply(f"{self.label} unit {unit}: {what}: {reply}")
            raise ModbusExceptionResponse(code, f"{self.label} unit {unit} {what}")

    async def _transact(
        self,
        owner: Hashable,
        unit: int,
        what: str,
        call: Callable[[Any], Awaitable[Any]],
        reply_timeout: float,
        frame_delay: float,
    ) -> Any:
        """One request on the link in ``owner``'s turn: its reply (see ``read`` for faults)."""
        await self._turns.acquire(owner)
        try:
            client = self._client
            if client is None or not client.connected:
                client = await self._connect(reply_timeout)
            if frame_delay:
                wait = self._last_end + frame_delay - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            self.requests += 1
            self._in_flight += 1
            if self._in_flight > self.max_in_flight:
                self.max_in_flight = self._in_flight
            start = self._clock() if self.trace is not None else 0.0
            try:
                async with asyncio.timeout(reply_timeout):
                    reply = await call(client)
            except TimeoutError:
                self.timeouts += 1
                self.close()
                raise ReplyTimeout(
                    f"{self.label} unit {unit}: no reply to {what} within {reply_timeout:g}s"
                ) from None
            except asyncio.CancelledError:
                self.close()  # the reply may still come: never on this connection
                raise
            except Exception as exc:
                self.close()
                raise ConnectionLost(
                    f"{self.label} unit {unit}: {what}: {type(exc).__name__}: {exc}"
                ) from exc
            finally:
                self._in_flight -= 1
                self._last_end = end = self._clock()
                if self.trace is not None:
                    self.trace.append((owner, start, end))
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # pymodbus's wait_for lost it (broker/cancel.py); the link is mid-request
                self.close()
                raise_if_cancelling(task)
        finally:
            self._turns.release()
        return reply


def _quiet_pymodbus() -> None:
    """pymodbus's warnings (failed connects, timeouts) repeat what the devices report
    themselves, once per attempt: keep its errors only, unless its logger was configured."""
    logger = logging.getLogger("pymodbus")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def _capture_connect_errors(client: Any) -> list[BaseException]:
    """A list that collects why ``client.connect()`` failed.

    pymodbus logs the reason and returns False; wrapping its transport factory (an
    internal, so only where it exists) keeps the reason for the device's own error.
    """
    reasons: list[BaseException] = []
    ctx = getattr(client, "ctx", None)
    create = getattr(ctx, "call_create", None)
    if create is None:
        return reasons

    async def call_create() -> Any:
        try:
            return await create()
        except BaseException as exc:
            reasons.append(exc)
            raise

    ctx.call_create = call_create
    return reasons


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


_links: weakref.WeakValueDictionary[Hashable, Link] = weakref.WeakValueDictionary()


def link_for(config: Config) -> Link:
    """The link of ``config``'s endpoint, shared with every other device on it.

    Raises:
        ValueError: a device on the same serial port uses other line settings.
    """
    settings = LinkSettings.of(config)
    link = _links.get(settings.key)
    if link is None:
        link = Link(settings)
        _links[settings.key] = link
    elif link.settings != settings:
        raise ValueError(
            f"{settings.label} is already used with other line settings "
            f"({_describe(link.settings)}); every device on one serial line needs the same "
            f"serial settings, not {_describe(settings)}"
        )
    return link


def _describe(s: LinkSettings) -> str:
    if s.serial is None:
        return s.label
    c = s.serial
    return f"{c.baudrate} baud {c.bytesize}{c.parity}{c.stopbits}"
