"""One ISO-on-TCP connection to a PLC, on python-snap7 3.x's native asyncio transport.

python-snap7 3.x is pure Python. Its ``AsyncISOTCPConnection`` (TPKT / COTP on asyncio
streams) and ``S7Protocol`` (PDU encoding) are used as they are; ``AsyncClient`` is not,
because (as of 3.3) its ``read_multi_vars`` sends one request per item and raises on the
first failed item, losing the per-item return codes that let one unknown DB mark only
its own points Bad, and its ``connect`` derives the remote TSAP from rack and slot only.

A ``Link`` sends one request at a time and checks that each reply carries the PDU
reference of its request. A timeout, a reply out of step or a broken connection raise a
``LinkError``: the connection is then unusable (a late reply could be read as the answer
to the next request) and the connector closes it and connects anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Sequence
from typing import Any

from plantbus.broker.cancel import raise_if_cancelling
from plantbus.connectors.s7.status import (
    BAD_COMMUNICATION_ERROR,
    BAD_CONNECTION_CLOSED,
    BAD_TIMEOUT,
    ITEM_OK,
)

__all__ = [
    "Link",
    "LinkClosed",
    "LinkDesync",
    "LinkError",
    "LinkTimeout",
    "ReadItem",
    "RequestRefused",
    "check_driver",
]

log = logging.getLogger("plantbus.connectors.s7")

ReadItem = tuple[int, int, int, int]
"""``(area code, db, start byte, byte count)`` of one item of a read request."""

_ACK_TYPES = (0x02, 0x03)  # ACK, ACK_DATA: the reply types with an error class and code
_READ_VAR = 0x04
_WRITE_VAR = 0x05
_BIT_LENGTH_TRANSPORTS = (0x03, 0x04, 0x05)  # BIT, BYTE/WORD/DWORD, INTEGER: length in bits
_CLOSE_WAIT = 1.0  # seconds an orderly disconnect may take before the socket is aborted


class LinkError(ConnectionError):
    """The connection failed; ``status`` is the Bad code for the points it left unread."""

    status = BAD_COMMUNICATION_ERROR


class LinkTimeout(LinkError):
    status = BAD_TIMEOUT


class LinkClosed(LinkError):
    status = BAD_CONNECTION_CLOSED


class LinkDesync(LinkError):
    """A reply that does not answer the request sent (PDU reference) or cannot be parsed."""

    status = BAD_COMMUNICATION_ERROR


class RequestRefused(Exception):
    """The PLC answered a request with a header error; the connection is still fine.

    Attributes:
        error: the 16-bit error class and code.
    """

    def __init__(self, error: int):
        super().__init__(f"PLC refused the request: header error 0x{error:04X}")
        self.error = error


def check_driver() -> None:
    """Raise ``ImportError`` unless python-snap7 3.x (pure Python, asyncio) is installed."""
    try:
        from snap7.async_client import AsyncISOTCPConnection  # noqa: F401
        from snap7.s7protocol import S7Protocol  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the s7 device needs python-snap7 3.x (pip install 'plantbus[s7]'): {e}"
        ) from e


class Link:
    """A connection to one PLC: ``open``, then ``read`` requests, then ``close``.

    Args:
        host / port: where the PLC listens (ISO-on-TCP, port 102).
        local_tsap / remote_tsap: the TSAPs of the COTP connection.
        pdu_request: the PDU size asked for; the PLC answers with what it grants.
        timeout: seconds for connecting and for each reply.

    Attributes:
        pdu_size: the negotiated PDU size (after ``open``).
        max_jobs: the PLC's limit of parallel jobs (max AMQ callee), for the logs.
    """

    def __init__(
        self,
        host: str,
        port: int,
        local_tsap: int,
        remote_tsap: int,
        pdu_request: int,
        timeout: float,
    ):
        self.host = host
        self.port = port
        self.local_tsap = local_tsap
        self.remote_tsap = remote_tsap
        self.pdu_request = pdu_request
        self.timeout = timeout
        self.pdu_size = 0
        self.max_jobs = 0
        self._conn: Any = None
        self._protocol: Any = None
        self._turn = asyncio.Lock()  # one request on the wire at a time (polls and writes)

    @property
    def is_open(self) -> bool:
        return self._conn is not None and bool(self._conn.connected)

    @property
    def peer(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self) -> None:
        """Connect (TCP, COTP with the TSAPs) and negotiate the PDU size.

        Raises:
            LinkError: the PLC cannot be reached or refused the connection.
        """
        from snap7.async_client import AsyncISOTCPConnection
        from snap7.error import S7Error
        from snap7.s7protocol import S7Protocol

        self._protocol = S7Protocol()
        conn = AsyncISOTCPConnection(
            self.host, self.port, local_tsap=self.local_tsap, remote_tsap=self.remote_tsap
        )
        try:
            async with asyncio.timeout(self.timeout):
                await conn.connect(timeout=self.timeout)
        except TimeoutError:
            await self._abort(conn)
            raise LinkTimeout(f"no answer from {self.peer} within {self.timeout:g}s") from None
        except S7Error as e:
            raise LinkClosed(f"cannot connect to {self.peer}: {_reason(e)}") from None
        except BaseException:
            await self._abort(conn)  # cancelled while connecting: snap7 leaves the socket open
            raise
        self._conn = conn  # from here on ``close`` (idempotent) releases it
        raise_if_cancelling()
        request = self._protocol.build_setup_communication_request(
            max_amq_caller=1, max_amq_callee=1, pdu_length=self.pdu_request
        )
        try:
            response = await self._exchange(request)
        except RequestRefused as e:
            await self.close()
            raise LinkClosed(f"{self.peer} refused the S7 session: {e}") from None
        except LinkError:
            await self.close()
            raise
        params = response.get("parameters") or {}
        granted = int(params.get("pdu_length", 0))
        if granted < 240 or granted > self.pdu_request:
            # below 240 no S7 CPU exists; above the request the PLC ignored the negotiation
            log.warning(
                "%s: PLC granted PDU size %d for %d asked; using %d",
                self.peer,
                granted,
                self.pdu_request,
                min(max(granted, 240), self.pdu_request),
            )
            granted = min(max(granted, 240), self.pdu_request)
        self.pdu_size = granted
        self.max_jobs = int(params.get("max_amq_callee", 1))

    async def read(self, items: Sequence[ReadItem]) -> list[tuple[int, bytes]]:
        """Read the items in one request; per item its S7 return code and its bytes.

        An item that failed has a return code other than ``0xFF`` and no bytes.

        Raises:
            RequestRefused: the PLC refused the request as a whole (connection still fine).
            LinkError: timeout, broken connection or a reply out of step (now unusable).
        """
        request = self._protocol.build_multi_read_request(list(items))
        response = await self._exchange(request)
        params = response.get("parameters") or {}
        if params.get("function_code") != _READ_VAR or params.get("item_count") != len(items):
            await self.close()
            raise LinkDesync(
                f"{self.peer}: reply is not the read of {len(items)} items that was sent"
            )
        try:
            return _parse_items(response.get("raw_data", b""), [n for *_, n in items])
        except ValueError as e:
            await self.close()
            raise LinkDesync(f"{self.peer}: malformed read reply: {e}") from None

    async def write(self, area: int, db: int, start: int, data: bytes, *, bit: bool = False) -> int:
        """Write ``data`` in one request; the item's S7 return code (``0xFF``: written).

        Args:
            area / db: the S7 area code and DB number (0 outside DBs).
            start: the first byte, or with ``bit`` the bit number (byte * 8 + bit).
            data: the bytes; with ``bit`` one byte, 1 or 0.

        Raises:
            RequestRefused: the PLC refused the request as a whole (connection still fine).
            LinkError: timeout, broken connection or a reply out of step (now unusable).
        """
        from snap7.datatypes import S7WordLen

        word_len = S7WordLen.BIT if bit else S7WordLen.BYTE
        request = self._protocol.build_write_request(area, db, start, word_len, data)
        response = await self._exchange(request)
        params = response.get("parameters") or {}
        raw = response.get("raw_data", b"")
        if params.get("function_code") != _WRITE_VAR or params.get("item_count") != 1 or not raw:
            await self.close()
            raise LinkDesync(f"{self.peer}: reply is not the write of 1 item that was sent")
        return int(raw[0])

    async def _exchange(self, request: bytes) -> dict[str, Any]:
        async with self._turn:
            return await self._exchange_now(request)

    async def _exchange_now(self, request: bytes) -> dict[str, Any]:
        from snap7.error import S7ConnectionError, S7Error, S7TimeoutError

        conn = self._conn
        if conn is None or not conn.connected:
            raise LinkClosed(f"not connected to {self.peer}")
        expected = request[4:6]  # the PDU reference this request carries
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send_data(request)
                pdu = await conn.receive_data()
                raise_if_cancelling()
        except (TimeoutError, S7TimeoutError):
            await self.close()
            raise LinkTimeout(f"no reply from {self.peer} within {self.timeout:g}s") from None
        except S7ConnectionError as e:
            await self.close()
            raise LinkClosed(f"connection to {self.peer} lost: {_reason(e)}") from None
        except OSError as e:
            await self.close()
            raise LinkClosed(f"connection to {self.peer} lost: {e}") from None
        if len(pdu) < 12 or pdu[0] != 0x32:
            await self.close()
            raise LinkDesync(f"{self.peer}: reply is not an S7 PDU")
        if pdu[4:6] != expected:
            # an earlier request's reply (or a duplicate): the stream is out of step, and
            # only a new connection is certain to pair replies with requests again
            await self.close()
            got, want = struct.unpack(">H", pdu[4:6])[0], struct.unpack(">H", expected)[0]
            raise LinkDesync(f"{self.peer}: reply to request {got} arrived for request {want}")
        if pdu[1] in _ACK_TYPES and (pdu[10] or pdu[11]):
            raise RequestRefused((pdu[10] << 8) | pdu[11])
        try:
            return self._protocol.parse_response(pdu)  # type: ignore[no-any-return]
        except S7Error as e:
            await self.close()
            raise LinkDesync(f"{self.peer}: malformed reply: {_reason(e)}") from None

    async def close(self) -> None:
        """Close the connection (an orderly disconnect, else abort); idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_WAIT):
                await conn.disconnect()
        except TimeoutError:
            # a peer that stopped reading can hold an orderly close forever
            await self._abort(conn)

    @staticmethod
    async def _abort(conn: Any) -> None:
        writer = getattr(conn, "_writer", None)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        conn.connected = False


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _parse_items(raw: bytes, sizes: Sequence[int]) -> list[tuple[int, bytes]]:
    """Split a read reply's data section into ``(return code, bytes)`` per item.

    Each item is: return code, transport size, length (bits for transport sizes 3, 4, 5,
    else bytes), the data, and a fill byte after odd-length data unless it is the last.
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    last = len(sizes) - 1
    for i, want in enumerate(sizes):
        if pos + 4 > len(raw):
            raise ValueError(f"item {i} missing")
        code, transport = raw[pos], raw[pos + 1]
        length = (raw[pos + 2] << 8) | raw[pos + 3]
        pos += 4
        if code != ITEM_OK:
            out.append((code, b""))
            continue
        n = (length + 7) // 8 if transport in _BIT_LENGTH_TRANSPORTS else length
        if n != want:
            raise ValueError(f"item {i} holds {n} bytes, {want} were asked for")
        if pos + n > len(raw):
            raise ValueError(f"item {i} truncated")
        out.append((code, raw[pos : pos + n]))
        pos += n
        if n & 1 and i < last:
            pos += 1
    return out
