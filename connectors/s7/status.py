"""S7 errors as OPC UA StatusCodes (the codes ``Record.status`` carries).

A point that could not be read is Bad. Its code is the OPC UA StatusCode that says what
happened, and where the PLC gave a reason, that reason sits in the code's low bits so
nothing is lost (``0x8034000A`` = Bad_NodeIdUnknown from S7 item return code ``0x0A``):

==========================================  ==========================  ==============
what happened                               OPC UA StatusCode           record code
==========================================  ==========================  ==============
item ``0x0A`` object does not exist          Bad_NodeIdUnknown           ``0x8034000A``
(unknown DB, area not present)
item ``0x05`` invalid address                Bad_IndexRangeNoData        ``0x80370005``
(beyond the end of the DB / area)
item ``0x03`` access not allowed             Bad_NotReadable             ``0x803A0003``
item ``0x01`` hardware error                 Bad_DeviceFailure           ``0x808B0001``
item ``0x06`` data type not supported        Bad_NotSupported            ``0x803D0006``
item ``0x07`` data type inconsistent         Bad_TypeMismatch            ``0x80740007``
any other item return code ``rc``           Bad_UnexpectedError         ``0x800100rc``
the PLC refused the whole request            Bad_CommunicationError      ``0x8005cccc``
(header error class and code ``cccc``)
no reply within ``timeout``                  Bad_Timeout                 ``0x800A0000``
connection closed or reset by the PLC        Bad_ConnectionClosed        ``0x80AE0000``
a reply out of step (wrong PDU reference,   Bad_CommunicationError      ``0x80050000``
malformed)
bytes read but not a valid value             Bad_DataEncodingInvalid     ``0x80380000``
(BCD digit > 9, string longer than read)
==========================================  ==========================  ==============
"""

from __future__ import annotations

__all__ = [
    "BAD_COMMUNICATION_ERROR",
    "BAD_CONNECTION_CLOSED",
    "BAD_DATA_ENCODING_INVALID",
    "BAD_TIMEOUT",
    "ITEM_OK",
    "describe",
    "header_error_status",
    "item_status",
]

ITEM_OK = 0xFF
"""S7 data item return code: success."""

BAD_TIMEOUT = 0x800A0000
BAD_CONNECTION_CLOSED = 0x80AE0000
BAD_COMMUNICATION_ERROR = 0x80050000
BAD_DATA_ENCODING_INVALID = 0x80380000
BAD_NODE_ID_UNKNOWN = 0x80340000
BAD_INDEX_RANGE_NO_DATA = 0x80370000
BAD_NOT_READABLE = 0x803A0000
BAD_DEVICE_FAILURE = 0x808B0000
BAD_NOT_SUPPORTED = 0x803D0000
BAD_TYPE_MISMATCH = 0x80740000
BAD_UNEXPECTED_ERROR = 0x80010000

_ITEM = {
    0x01: BAD_DEVICE_FAILURE,
    0x03: BAD_NOT_READABLE,
    0x05: BAD_INDEX_RANGE_NO_DATA,
    0x06: BAD_NOT_SUPPORTED,
    0x07: BAD_TYPE_MISMATCH,
    0x0A: BAD_NODE_ID_UNKNOWN,
}

_ITEM_TEXT = {
    0x01: "hardware error",
    0x03: "access not allowed",
    0x05: "invalid address (beyond the end of the area)",
    0x06: "data type not supported",
    0x07: "data type inconsistent",
    0x0A: "object does not exist",
}

_NAMES = {
    BAD_TIMEOUT: "Bad_Timeout",
    BAD_CONNECTION_CLOSED: "Bad_ConnectionClosed",
    BAD_COMMUNICATION_ERROR: "Bad_CommunicationError",
    BAD_DATA_ENCODING_INVALID: "Bad_DataEncodingInvalid",
    BAD_NODE_ID_UNKNOWN: "Bad_NodeIdUnknown",
    BAD_INDEX_RANGE_NO_DATA: "Bad_IndexRangeNoData",
    BAD_NOT_READABLE: "Bad_NotReadable",
    BAD_DEVICE_FAILURE: "Bad_DeviceFailure",
    BAD_NOT_SUPPORTED: "Bad_NotSupported",
    BAD_TYPE_MISMATCH: "Bad_TypeMismatch",
    BAD_UNEXPECTED_ERROR: "Bad_UnexpectedError",
}


def item_status(return_code: int) -> int:
    """The Bad code of an S7 data item return code (not ``ITEM_OK``)."""
    return _ITEM.get(return_code, BAD_UNEXPECTED_ERROR) | (return_code & 0xFF)


def header_error_status(error: int) -> int:
    """The Bad code of a request the PLC refused (16-bit header error class and code)."""
    return BAD_COMMUNICATION_ERROR | (error & 0xFFFF)


def describe(code: int) -> str:
    """``Bad_NodeIdUnknown (S7 0x0A object does not exist)``, for logs and messages."""
    base = code & 0xFFFF0000
    name = _NAMES.get(base, f"0x{base:08X}")
    low = code & 0xFFFF
    if not low:
        return name
    if base == BAD_COMMUNICATION_ERROR:
        return f"{name} (S7 header error 0x{low:04X})"
    text = _ITEM_TEXT.get(low, "")
    return f"{name} (S7 0x{low:02X}{' ' + text if text else ''})"
