"""Modbus faults as OPC UA StatusCodes (the record's ``status``, see ``broker/record.py``).

A Modbus exception response becomes a Bad code chosen by its meaning, with the exception
number in the low 16 bits, so ``code & 0xFFFF`` gives the device's own exception code back
(e.g. ``0x80340002``: Bad_NodeIdUnknown, exception 2 "illegal data address"). Faults below
Modbus (no reply, a lost connection, a malformed reply) are plain Bad codes with the low 16
bits zero. The table is in this folder's README.
"""

from __future__ import annotations

__all__ = [
    "BAD_COMMUNICATION_ERROR",
    "BAD_CONNECTION_CLOSED",
    "BAD_DECODING_ERROR",
    "BAD_DEVICE_FAILURE",
    "BAD_NODE_ID_UNKNOWN",
    "BAD_NOT_CONNECTED",
    "BAD_NOT_SUPPORTED",
    "BAD_NO_COMMUNICATION",
    "BAD_OUT_OF_RANGE",
    "BAD_SERVER_TOO_BUSY",
    "BAD_TIMEOUT",
    "BAD_UNEXPECTED_ERROR",
    "EXCEPTION_NAMES",
    "exception_code_of",
    "status_for_exception",
]

# OPC UA StatusCodes (Part 4 / Part 6 StatusCode.csv): severity 0b10 in the top bits is Bad
BAD_UNEXPECTED_ERROR = 0x80010000
BAD_COMMUNICATION_ERROR = 0x80050000
BAD_DECODING_ERROR = 0x80070000
BAD_TIMEOUT = 0x800A0000
BAD_NO_COMMUNICATION = 0x80310000
BAD_NODE_ID_UNKNOWN = 0x80340000
BAD_OUT_OF_RANGE = 0x803C0000
BAD_NOT_SUPPORTED = 0x803D0000
BAD_NOT_CONNECTED = 0x808A0000
BAD_DEVICE_FAILURE = 0x808B0000
BAD_CONNECTION_CLOSED = 0x80AE0000
BAD_SERVER_TOO_BUSY = 0x80EE0000

EXCEPTION_NAMES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
"""The exception codes of the Modbus Application Protocol v1.1b3, section 7."""

_BASE: dict[int, int] = {
    1: BAD_NOT_SUPPORTED,  # the device does not offer this function (e.g. no coils)
    2: BAD_NODE_ID_UNKNOWN,  # the address (range) does not exist on the device
    3: BAD_OUT_OF_RANGE,  # the quantity or a value is outside what the device accepts
    4: BAD_DEVICE_FAILURE,
    5: BAD_SERVER_TOO_BUSY,  # accepted but not done yet: no value for this read
    6: BAD_SERVER_TOO_BUSY,
    8: BAD_DEVICE_FAILURE,
    10: BAD_NO_COMMUNICATION,  # the gateway has no path to the unit
    11: BAD_TIMEOUT,  # the gateway's unit did not answer: a timeout, seen from the gateway
}


def status_for_exception(exception_code: int) -> int:
    """The Bad StatusCode for a Modbus exception response, carrying its code in the low bits.

    Args:
        exception_code: the exception code of the response (1-255).

    Returns:
        e.g. ``0x80340002`` for exception 2; an unknown exception code maps onto
        Bad_UnexpectedError with the code in the low bits.
    """
    return _BASE.get(exception_code, BAD_UNEXPECTED_ERROR) | (exception_code & 0xFF)


def exception_code_of(status: int) -> int | None:
    """The Modbus exception code a StatusCode made by this module carries, else ``None``."""
    if status & 0xC0000000 != 0x80000000:
        return None
    return status & 0xFFFF or None
