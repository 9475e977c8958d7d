"""Sparkplug B (Eclipse Sparkplug 3.0) payloads, decoded as a host application sees them.

Topics are ``spBv1.0/<group_id>/<message_type>/<edge_node_id>[/<device_id>]``. The payload is
the protobuf ``Payload`` of ``sparkplug_b.proto`` (generated module ``sparkplug_b_pb2``, checked
in; see the ``.proto`` for how to regenerate it). ``SparkplugDecoder`` keeps the state a host
needs between messages:

* **NBIRTH / DBIRTH** define the metrics of an edge node / device: name, alias and datatype.
  Their values are decoded like data. An NBIRTH also forgets the node's devices (the edge node
  publishes a DBIRTH for each after it) and records the node's ``bdSeq``.
* **NDATA / DDATA** carry values, usually by alias only; the datatype comes from the birth.
  A metric with an alias (or name) that no birth defined is reported as a problem and skipped.
* **NDEATH / DDEATH** mark every metric of the node (and all its devices) / of the device
  **Bad** with ``BAD_NO_COMMUNICATION``: one row per entity with no values and a status per
  metric. The definitions are forgotten until the next birth. An NDEATH whose ``bdSeq`` differs
  from the current NBIRTH's is the late will of an older session and is ignored.
* NCMD, DCMD and STATE are commands and host state, not data: ignored.

Values by datatype: Int8/16/32/64 are two's complement in the unsigned protobuf fields and come
back signed; UInt8..64 as ints; Float and Double as floats; Boolean; String, Text and UUID as
strings; DateTime as an int of Unix ms. A null metric (``is_null``) is Bad with
``BAD_NO_DATA``. A value stored in a field its datatype cannot use is Bad with
``BAD_TYPE_MISMATCH``. Bytes, File, DataSet, Template and the array types have no field form and
are reported as problems and skipped, as are transient metrics (the specification says hosts do
not store them) and the ``bdSeq`` control metric.

Each metric takes its own timestamp, else the payload's, else the receive time; the values of
one entity and one timestamp make one row. Rows come back with their entity,
``(group_id, edge_node_id, device_id)`` with ``device_id`` "" for the edge node itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from plantbus.broker.record import FieldValue
from plantbus.codecs.payload import (
    BAD_NO_COMMUNICATION,
    BAD_NO_DATA,
    BAD_TYPE_MISMATCH,
    PayloadError,
    Row,
    preview,
)

__all__ = [
    "DATA_TYPES",
    "NAMESPACE",
    "Entity",
    "SparkplugDecoder",
    "SparkplugTopic",
    "parse_topic",
]

NAMESPACE = "spBv1.0"

Entity = tuple[str, str, str]
"""``(group_id, edge_node_id, device_id)``; device_id is "" for the edge node itself."""

# Sparkplug B DataType numbers (sparkplug_b.proto)
DATA_TYPES: dict[int, str] = {
    0: "Unknown",
    1: "Int8",
    2: "Int16",
    3: "Int32",
    4: "Int64",
    5: "UInt8",
    6: "UInt16",
    7: "UInt32",
    8: "UInt64",
    9: "Float",
    10: "Double",
    11: "Boolean",
    12: "String",
    13: "DateTime",
    14: "Text",
    15: "UUID",
    16: "DataSet",
    17: "Bytes",
    18: "File",
    19: "Template",
    20: "PropertySet",
    21: "PropertySetList",
    22: "Int8Array",
    23: "Int16Array",
    24: "Int32Array",
    25: "Int64Array",
    26: "UInt8Array",
    27: "UInt16Array",
    28: "UInt32Array",
    29: "UInt64Array",
    30: "FloatArray",
    31: "DoubleArray",
    32: "BooleanArray",
    33: "StringArray",
    34: "DateTimeArray",
}
_SIGNED_BITS = {1: 8, 2: 16, 3: 32, 4: 64}
_UNSIGNED_BITS = {5: 8, 6: 16, 7: 32, 8: 64}
_STRINGS = frozenset({12, 14, 15})
_MESSAGE_TYPES = frozenset(
    {"NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD", "STATE"}
)
_IGNORED = frozenset({"NCMD", "DCMD", "STATE"})
BD_SEQ = "bdSeq"


class SparkplugTopic(NamedTuple):
    """The parts of a Sparkplug B topic (``device_id`` "" for edge-node messages)."""

    group_id: str
    message_type: str
    edge_node_id: str
    device_id: str


def parse_topic(topic: str) -> SparkplugTopic:
    """Split a Sparkplug B topic.

    Raises:
        PayloadError: not a Sparkplug B topic.
    """
    parts = topic.split("/")
    if len(parts) >= 2 and parts[0] == NAMESPACE and parts[1] == "STATE":
        return SparkplugTopic("", "STATE", "", "/".join(parts[2:]))
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        raise PayloadError(f"not a Sparkplug B topic ({NAMESPACE}/group/TYPE/node[/device])")
    mtype = parts[2]
    if mtype not in _MESSAGE_TYPES:
        raise PayloadError(f"unknown Sparkplug message type {mtype!r}")
    device = parts[4] if len(parts) == 5 else ""
    if (mtype[0] == "D") != bool(device):
        raise PayloadError(f"{mtype} {'needs' if mtype[0] == 'D' else 'takes no'} device id")
    if not parts[1] or not parts[3]:
        raise PayloadError("empty group or edge node id")
    return SparkplugTopic(parts[1], mtype, parts[3], device)


class _Defs:
    """The metric definitions of one edge node or device, from its birth."""

    __slots__ = ("by_alias", "by_name")

    def __init__(self) -> None:
        self.by_alias: dict[int, tuple[str, int]] = {}
        self.by_name: dict[str, int] = {}


class _Node:
    __slots__ = ("bd_seq", "defs", "devices", "seq")

    def __init__(self) -> None:
        self.bd_seq: int | None = None
        self.seq: int | None = None
        self.defs = _Defs()
        self.devices: dict[str, _Defs] = {}


class _Mismatch(Exception):
    pass


class _Unsupported(Exception):
    pass


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _text(v: str | bytes) -> str:
    # proto2 strings are not checked for UTF-8 when parsed: invalid text comes back as bytes
    if type(v) is not str:
        raise _Mismatch("text that is not UTF-8")
    return v


def _value(m: Any, dt: int) -> FieldValue:
    """The value of metric ``m`` as datatype ``dt``.

    Raises:
        _Mismatch: the value is in a protobuf field the datatype cannot use.
        _Unsupported: a datatype with no field form (bytes, datasets, templates, arrays).
    """
    which = m.WhichOneof("value")
    if dt in _SIGNED_BITS or dt in _UNSIGNED_BITS:
        if which == "int_value":
            raw = m.int_value
        elif which == "long_value":
            raw = m.long_value
        else:
            raise _Mismatch(which)
        if dt in _SIGNED_BITS:
            return _signed(raw, _SIGNED_BITS[dt])
        return int(raw & ((1 << _UNSIGNED_BITS[dt]) - 1))
    if dt == 9 or dt == 10:
        if which == "float_value":
            return float(m.float_value)
        if which == "double_value":
            return float(m.double_value)
        raise _Mismatch(which)
    if dt == 11:
        if which == "boolean_value":
            return bool(m.boolean_value)
        raise _Mismatch(which)
    if dt in _STRINGS:
        if which == "string_value":
            return _text(m.string_value)
        raise _Mismatch(which)
    if dt == 13:
        if which == "long_value":
            return int(m.long_value)
        raise _Mismatch(which)
    if dt == 0:
        # no datatype known (a DATA metric by name without birth): go by the protobuf field
        if which in ("int_value", "long_value"):
            return int(getattr(m, which))
        if which in ("float_value", "double_value"):
            return float(getattr(m, which))
        if which == "boolean_value":
            return bool(m.boolean_value)
        if which == "string_value":
            return _text(m.string_value)
    raise _Unsupported(DATA_TYPES.get(dt, f"datatype {dt}"))


class SparkplugDecoder:
    """Decode Sparkplug B messages into rows per entity, keeping birth definitions.

    Attributes:
        seq_gaps: messages whose ``seq`` was not the previous one + 1 (mod 256): a message of
            the edge node was lost or came out of order.
        stale_deaths: NDEATHs ignored because their bdSeq was not the current session's.
    """

    def __init__(self) -> None:
        from plantbus.codecs import sparkplug_b_pb2  # protobuf only where Sparkplug is used

        self._payload = sparkplug_b_pb2.Payload
        self.nodes: dict[tuple[str, str], _Node] = {}
        self.seq_gaps = 0
        self.stale_deaths = 0

    def decode(
        self, topic: str | SparkplugTopic, payload: bytes, now_ns: int
    ) -> tuple[list[tuple[Entity, Row]], list[str]]:
        """The rows of one message (with their entity) and the problems met.

        Args:
            topic: the MQTT topic (or its parsed form).
            payload: the protobuf payload.
            now_ns: the receive time, for values without a timestamp.

        Raises:
            PayloadError: not a Sparkplug B topic, or not a Sparkplug B payload.
        """
        t = parse_topic(topic) if isinstance(topic, str) else topic
        if t.message_type in _IGNORED:
            return [], []
        try:
            msg = self._payload.FromString(payload)
        except Exception as e:  # protobuf's DecodeError, or anything a garbled buffer raises
            raise PayloadError(f"not a Sparkplug B payload ({e})") from None
        node_key = (t.group_id, t.edge_node_id)
        node = self.nodes.get(node_key)
        problems: list[str] = []
        mtype = t.message_type
        if mtype == "NBIRTH":
            node = self.nodes[node_key] = _Node()
            node.bd_seq = _bd_seq(msg)
        elif node is None:
            node = self.nodes[node_key] = _Node()
        self._check_seq(node, msg, mtype, t, problems)
        now_ms_ns = now_ns
        if msg.HasField("timestamp"):
            now_ms_ns = _time_ns(msg.timestamp, now_ns, t, problems)
        if mtype == "NDEATH":
            return self._node_death(t, node, msg, now_ms_ns, problems), problems
        if mtype == "DDEATH":
            defs = node.devices.pop(t.device_id, None)
            rows = [_death_row((t.group_id, t.edge_node_id, t.device_id), defs, now_ms_ns)]
            return [r for r in rows if r[1].status], problems
        if mtype == "DBIRTH":
            defs = node.devices[t.device_id] = _Defs()
        elif mtype == "DDATA":
            defs = node.devices.get(t.device_id) or _Defs()
        else:  # NBIRTH, NDATA
            defs = node.defs
        birth = mtype.endswith("BIRTH")
        entity = (t.group_id, t.edge_node_id, t.device_id)
        rows: dict[int, Row] = {}
        for m in msg.metrics:
            self._metric(m, defs, birth, entity, rows, now_ms_ns, problems)
        return [(entity, row) for row in rows.values()], problems

    def _check_seq(
        self, node: _Node, msg: Any, mtype: str, t: SparkplugTopic, problems: list[str]
    ) -> None:
        if mtype == "NDEATH" or not msg.HasField("seq"):
            return
        seq = int(msg.seq)
        if mtype != "NBIRTH" and node.seq is not None and seq != (node.seq + 1) % 256:
            self.seq_gaps += 1
            problems.append(
                f"{t.group_id}/{t.edge_node_id}: seq {seq} after {node.seq} "
                "(a message was lost or reordered)"
            )
        node.seq = seq

    def _metric(
        self,
        m: Any,
        defs: _Defs,
        birth: bool,
        entity: Entity,
        rows: dict[int, Row],
        now_ns: int,
        problems: list[str],
    ) -> None:
        name = m.name if m.HasField("name") else None
        if name is not None and type(name) is not str:
            problems.append(f"{_where(entity)}: a metric name that is not UTF-8: {preview(name)}")
            return
        dt = m.datatype if m.HasField("datatype") else None
        if birth:
            if name is None:
                problems.append(f"{_where(entity)}: birth metric without a name")
                return
            if dt is None:
                problems.append(f"{_where(entity)}: birth metric {name!r} has no datatype")
                return
            defs.by_name[name] = dt
            if m.HasField("alias"):
                defs.by_alias[m.alias] = (name, dt)
        else:
            if name is None:
                found = defs.by_alias.get(m.alias) if m.HasField("alias") else None
                if found is None:
                    what = f"alias {m.alias}" if m.HasField("alias") else "a metric without name"
                    problems.append(f"{_where(entity)}: {what} is not defined by a birth")
                    return
                name, birth_dt = found
            else:
                birth_dt = defs.by_name.get(name, 0)
            if dt is None:
                dt = birth_dt
        if name == BD_SEQ or m.is_transient:
            return
        t_ns = (
            _time_ns(m.timestamp, now_ns, entity, problems) if m.HasField("timestamp") else now_ns
        )
        row = rows.get(t_ns)
        if row is None:
            row = rows[t_ns] = Row({}, t_ns)
        if m.is_null:
            row.bad(name, BAD_NO_DATA)
            return
        try:
            row.fields[name] = _value(m, dt)
        except _Mismatch as e:
            row.bad(name, BAD_TYPE_MISMATCH)
            problems.append(
                f"{_where(entity)}: metric {name!r} is {DATA_TYPES.get(dt, dt)} but holds {e}"
            )
        except _Unsupported as e:
            if not row.fields and not row.status:
                del rows[t_ns]
            problems.append(f"{_where(entity)}: metric {name!r}: {e} values are not supported")

    def _node_death(
        self, t: SparkplugTopic, node: _Node, msg: Any, now_ns: int, problems: list[str]
    ) -> list[tuple[Entity, Row]]:
        bd = _bd_seq(msg)
        if bd is not None and node.bd_seq is not None and bd != node.bd_seq:
            self.stale_deaths += 1
            problems.append(
                f"{t.group_id}/{t.edge_node_id}: NDEATH bdSeq {bd} is not the current "
                f"session's ({node.bd_seq}); ignored"
            )
            return []
        out = [_death_row((t.group_id, t.edge_node_id, ""), node.defs, now_ns)]
        for device, defs in node.devices.items():
            out.append(_death_row((t.group_id, t.edge_node_id, device), defs, now_ns))
        del self.nodes[(t.group_id, t.edge_node_id)]
        return [r for r in out if r[1].status]


_MAX_MS = ((1 << 63) - 1) // 1_000_000  # the last ms in int64 ns (year 2262)


def _time_ns(ms: int, now_ns: int, where: Entity | SparkplugTopic, problems: list[str]) -> int:
    """A Sparkplug timestamp (uint64 ms) in ns; beyond int64 ns the receive time, a problem.

    Every decoder hands out int64 ns times (what InfluxDB takes); a uint64 can hold 2^64 ms.
    """
    if ms <= _MAX_MS:
        return ms * 1_000_000
    entity = (
        (where.group_id, where.edge_node_id, where.device_id)
        if isinstance(where, SparkplugTopic)
        else where
    )
    problems.append(
        f"{_where(entity)}: timestamp {ms} ms is out of range; the receive time is used"
    )
    return now_ns


def _bd_seq(msg: Any) -> int | None:
    for m in msg.metrics:
        if m.name == BD_SEQ:
            which = m.WhichOneof("value")
            return int(getattr(m, which)) if which in ("long_value", "int_value") else None
    return None


def _death_row(entity: Entity, defs: _Defs | None, now_ns: int) -> tuple[Entity, Row]:
    row = Row({}, now_ns)
    if defs is not None:
        status = {n: BAD_NO_COMMUNICATION for n in defs.by_name if n != BD_SEQ}
        row.status = status or None
    return entity, row


def _where(entity: Entity) -> str:
    return "/".join(p for p in entity if p)
