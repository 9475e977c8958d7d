"""JSON payloads of devices (MQTT): values picked by path, optional timestamp path.

Devices publish JSON in every shape; this decoder maps it onto a row of fields:

* ``fields`` maps a point name to a *path* into the document and a type. A path is dotted
  (``motor.rpm``, ``axes.0.pos``: a number indexes an array) or, for keys holding dots, a JSON
  Pointer (``/motor.v2/rpm``, RFC 6901).
* Without ``fields``, every scalar member becomes a field, nested objects flattened with dots
  (``{"motor": {"rpm": 3}}`` gives ``motor.rpm``); arrays and nulls are left out.
* ``time`` is the path of the timestamp (with a ``TimeSpec``: epoch unit or text format); it is
  never a field. Without it the connector uses the receive time.
* A payload that is a JSON array holds several readings: one row per element.

Types: ``auto`` (the default) keeps JSON's kinds, except that **every JSON number becomes a
float**: a sensor that sends ``20`` and later ``20.5`` would otherwise create an integer field
and then a float one, which InfluxDB refuses (field type conflict). ``float`` / ``int`` /
``bool`` / ``string`` force a type and accept the value's text as well (``"21.5"``); a value
that cannot be converted marks its point Bad (``BAD_TYPE_MISMATCH``) and is reported as a
problem, the other points of the payload are kept. A configured path that is absent is simply
not a value this time (devices leave out what did not change); null is the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from plantbus.broker.record import FieldValue
from plantbus.codecs.payload import (
    BAD_TYPE_MISMATCH,
    PayloadError,
    Row,
    TimeSpec,
    convert,
)

__all__ = ["FIELD_TYPES", "JsonFieldsDecoder", "parse_path"]

FIELD_TYPES = ("auto", "float", "int", "bool", "string")

Path = tuple[str | int, ...]
_MISSING = object()
_NO_PROBLEMS: list[str] = []


def parse_path(path: str) -> Path:
    """Split a dotted path or a JSON Pointer into its steps (digits index arrays).

    Raises:
        ValueError: an empty path or an empty step.
    """
    if not path:
        raise ValueError("a JSON path cannot be empty")
    if path.startswith("/"):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    else:
        parts = path.split(".")
    steps: list[str | int] = []
    for p in parts:
        if p == "":
            raise ValueError(f"JSON path {path!r} has an empty step")
        steps.append(int(p) if p.isdigit() else p)
    return tuple(steps)


def _get(doc: Any, path: Path) -> Any:
    node = doc
    for step in path:
        t = type(node)
        if t is dict:
            # a digit step also works as an object key ("0")
            node = node.get(step if type(step) is str else str(step), _MISSING)
        elif t is list and type(step) is int:
            node = node[step] if step < len(node) else _MISSING
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _kind(v: object) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }.get(type(v), type(v).__name__)


def _float(v: int) -> float:
    """An integer as a float; beyond float64 it is ±inf, as a JSON ``1e400`` already is.

    ``float()`` raises OverflowError there (a 400-digit number in a payload), which no
    caller expects; the encoders drop an infinite value and mark its point Bad.
    """
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _typed(v: Any, vtype: str) -> FieldValue:
    """``v`` (a JSON value, not null) as ``vtype``; PayloadError if it cannot be."""
    t = type(v)
    if vtype == "auto":
        if t is float or t is str or t is bool:
            return v  # type: ignore[no-any-return]
        if t is int:
            return _float(v)
    elif vtype == "float":
        if t is float:
            return v  # type: ignore[no-any-return]
        if t is int:
            return _float(v)
        if t is str:
            return convert(v, "float")
    elif vtype == "int":
        if t is int:
            return v  # type: ignore[no-any-return]
        if t is float and v.is_integer():
            return int(v)
        if t is str:
            return convert(v, "int")
    elif vtype == "bool":
        if t is bool:
            return v  # type: ignore[no-any-return]
        if t is int and v in (0, 1):
            return bool(v)
        if t is str:
            return convert(v, "bool")
    elif vtype == "string":
        if t is str:
            return v  # type: ignore[no-any-return]
        if t is int or t is float:
            return json.dumps(v)
        if t is bool:
            return "true" if v else "false"
    raise PayloadError(f"expected {'a value' if vtype == 'auto' else vtype}, got {_kind(v)}")


def _no_constant(name: str) -> Any:
    raise PayloadError(f"{name} is not a JSON value")


_decode = json.JSONDecoder(parse_constant=_no_constant).decode


class JsonFieldsDecoder:
    """Decode JSON payloads into rows (see the module doc).

    Args:
        fields: point name -> ``(path, type)``; None or empty for "every scalar member".
        time: path of the timestamp, or None.
        time_spec: how the timestamp is written (default: Unix ms).
    """

    __slots__ = ("fields", "time", "time_spec")

    def __init__(
        self,
        fields: Mapping[str, tuple[str, str]] | None = None,
        time: str | None = None,
        time_spec: TimeSpec | None = None,
    ):
        self.fields: list[tuple[str, Path, str]] = []
        for name, (path, vtype) in (fields or {}).items():
            if vtype not in FIELD_TYPES:
                raise ValueError(f"field {name!r}: unknown type {vtype!r}")
            self.fields.append((name, parse_path(path), vtype))
        self.time = parse_path(time) if time else None
        self.time_spec = time_spec or TimeSpec("ms")

    def decode(self, payload: bytes) -> tuple[list[Row], list[str]]:
        """The rows of one payload and the problems met (values of the wrong type).

        Raises:
            PayloadError: not JSON, not an object (or array of objects), or nothing in it.
        """
        try:
            # JSON is UTF-8 (RFC 8259); one decoder built once, not one per json.loads call
            doc = _decode(payload.decode("utf-8"))
        except PayloadError:
            raise
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise PayloadError(f"not JSON ({e})") from None
        if type(doc) is dict:
            docs = [doc]
        elif type(doc) is list and doc and all(type(d) is dict for d in doc):
            docs = doc
        else:
            raise PayloadError(f"expected a JSON object or an array of objects, got {_kind(doc)}")
        rows: list[Row] = []
        problems = _NO_PROBLEMS
        for d in docs:
            row, found = self._row(d)
            if found:
                if problems is _NO_PROBLEMS:
                    problems = []
                problems.extend(found)
            if row.fields or row.status:
                rows.append(row)
        if not rows:
            raise PayloadError("no values in the payload")
        return rows, problems

    def _row(self, doc: dict[str, Any]) -> tuple[Row, list[str]]:
        problems: list[str] = []
        time_ns = None
        if self.time is not None:
            t = _get(doc, self.time)
            if t is _MISSING or t is None:
                raise PayloadError(f"no timestamp at {_show(self.time)}")
            time_ns = self.time_spec.parse(t)
        row = Row({}, time_ns)
        fields = row.fields
        if self.fields:
            for name, path, vtype in self.fields:
                v = _get(doc, path)
                if v is _MISSING or v is None:
                    continue
                try:
                    fields[name] = _typed(v, vtype)
                except PayloadError as e:
                    row.bad(name, BAD_TYPE_MISMATCH)
                    problems.append(f"point {name!r} at {_show(path)}: {e}")
        else:
            _flatten(doc, "", fields)
            if self.time is not None:
                fields.pop(_show(self.time), None)  # the timestamp is never a field
        return row, problems


def _flatten(doc: dict[str, Any], prefix: str, out: dict[str, FieldValue]) -> None:
    for k, v in doc.items():
        t = type(v)
        if t is float or t is str or t is bool:
            out[prefix + k] = v
        elif t is int:
            out[prefix + k] = _float(v)
        elif t is dict:
            _flatten(v, f"{prefix}{k}.", out)


def _show(path: Path) -> str:
    return ".".join(str(p) for p in path)
