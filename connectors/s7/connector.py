"""The ``s7`` device: polls a Siemens S7 PLC (S7-300/400/1200/1500, LOGO!) over ISO-on-TCP.

Each poll reads every point with as few requests as the negotiated PDU size allows (see
``planner``), decodes them (see ``decode``) and emits one record with one field per point.
A point the PLC could not deliver is Bad with an OPC UA code (see ``status``); the other
points of the record keep their values.

Connection faults end ``run`` with a ``LinkError`` after the record of the failed poll (its
unread points Bad) has been emitted; the runtime's supervisor logs it, waits a jittered,
capped exponential backoff and calls ``run`` again, which connects anew. So a PLC that is
absent at start, switched off, or restarted is retried without ever stopping the daemon,
and after a timeout the old connection is never used again.

Write-back (``write``): each point of a command goes out as one S7 write request on the
polling connection (requests take turns on it): a ``bool`` as an S7 bit write (the PLC
changes that bit alone), every other type as a byte write of its encoding (see
``encode``), split into requests that fit the negotiated PDU. A return code other than
success is ``device error: …``; a timeout answers ``timeout: …`` and ends the connection,
as it does for a poll. With ``read_back`` each written point's bytes are then read again
and decoded as a poll decodes them; a read that fails is that point's read-back error,
not a failed write.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from plantbus.broker.cancel import raise_if_cancelling
from plantbus.broker.configtypes import Duration
from plantbus.broker.connector import (
    BuildContext,
    DeviceConfig,
    Emit,
    WritablePointConfig,
    WritePoint,
    WriteResult,
)
from plantbus.broker.ids import new_id
from plantbus.broker.record import FieldValue, Quality, Record, Series
from plantbus.broker.schedule import FixedRate, PolledCounters
from plantbus.broker.topics import validate_topic
from plantbus.codecs.line_protocol import check_name
from plantbus.connectors.s7.address import AREA_CODES, Address, parse_address, parse_type
from plantbus.connectors.s7.decode import DecodeError, Decoder, decoder
from plantbus.connectors.s7.encode import EncodeError, encode, value_kind
from plantbus.connectors.s7.link import (
    Link,
    LinkError,
    LinkTimeout,
    ReadItem,
    RequestRefused,
    check_driver,
)
from plantbus.connectors.s7.planner import RESPONSE_OVERHEAD, ReadPlan, plan_reads
from plantbus.connectors.s7.status import (
    BAD_DATA_ENCODING_INVALID,
    ITEM_OK,
    describe,
    header_error_status,
    item_status,
)

__all__ = ["Config", "PointConfig", "S7Connector", "build", "parse_tsap"]

log = logging.getLogger("plantbus.connectors.s7")

CONNECTION_TYPES = {"pg": 1, "op": 2, "basic": 3}
"""The high byte of the remote TSAP derived from rack and slot (PG, OP, S7 basic)."""

DEFAULT_RACK = 0
DEFAULT_SLOT = 1
_UNKNOWN_OBJECT = 0x0A  # S7 item error: the whole DB / area is missing

_TSAP_DOTTED = re.compile(r"^([0-9a-fA-F]{1,2})\.([0-9a-fA-F]{1,2})$")


def parse_tsap(value: object) -> int:
    """A TSAP from an int (``256``), hex (``"0x0100"``) or the dotted form (``"01.00"``)."""
    if isinstance(value, bool):
        raise ValueError('a TSAP is a number such as 0x0100 or "01.00"')
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip()
        m = _TSAP_DOTTED.match(text)
        try:
            n = int(m.group(1), 16) << 8 | int(m.group(2), 16) if m else int(text, 16)
        except ValueError:
            raise ValueError(
                f'TSAP {value!r} is not a number such as "0x0100" or "01.00"'
            ) from None
    else:
        raise ValueError('a TSAP is a number such as 0x0100 or "01.00"')
    if not 0 <= n <= 0xFFFF:
        raise ValueError(f"a TSAP is 16 bits (0 to 0xFFFF), not {n}")
    return n


class PointConfig(WritablePointConfig):
    """One point: a field of every record.

    Attributes:
        name: the field name (line-protocol encodable).
        address: where it is, in S7 form: ``DB1.DBW4``, ``M10.2``, ``DB1.DBD10:LREAL``.
        type: the data type when the address's size letter does not say it (``int`` for a
            ``W`` address, ``real`` for a ``D`` one, ``string[20]``, ``date_and_time``);
            the same as a ``:TYPE`` suffix on the address.
        writable: commands may write it (DB, M and Q addresses; inputs are the PLC's own
            image of its input modules); see ``WritablePointConfig``.
        write_limits: ``[low, high]``: the range of a command value (numeric types).
        read_back: read it back after a write, into the reply (default: the device's).
    """

    name: str = Field(min_length=1)
    address: str = Field(min_length=1)
    type: str | None = None

    @field_validator("name")
    @classmethod
    def _encodable(cls, v: str) -> str:
        reason = check_name(v, kind="field_key")
        if reason is not None:
            raise ValueError(f"point name {v!r} {reason}")
        return v

    @field_validator("address")
    @classmethod
    def _valid_address(cls, v: str) -> str:
        parse_address(v)
        return v

    @field_validator("type")
    @classmethod
    def _type_fits_address(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        parse_type(v)
        address = info.data.get("address")
        if address is not None:  # else the address has its own error
            parse_address(address, v)
        return v

    @model_validator(mode="after")
    def _writable_address(self) -> PointConfig:
        if not self.writable:
            return self
        address = self.parsed
        if address.area == "I":
            raise ValueError(
                f"point {self.name!r}: writable applies to DB, M and Q addresses; "
                f"{self.address} is an input, which the PLC reads from its input modules"
            )
        kind = value_kind(address)
        if self.write_limits is not None and kind == "str":
            raise ValueError(
                f"point {self.name!r}: write_limits applies only to numbers, "
                f"not to {address.type.name}"
            )
        return self

    @property
    def parsed(self) -> Address:
        """The parsed address (cached; it was validated with the config)."""
        return parse_address(self.address, self.type)


class Config(DeviceConfig):
    """``[[devices.s7]]``: the device keys plus the PLC and its points.

    Attributes:
        host: the PLC's address.
        port: ISO-on-TCP port (102).
        rack / slot: where the CPU sits (default 0 / 1: S7-1200/1500; an S7-300 CPU is
            usually rack 0, slot 2). They give the remote TSAP; not with ``remote_tsap``.
        local_tsap / remote_tsap: the TSAPs themselves, for LOGO! and CPs addressed that
            way (``"0x0100"``, ``"01.00"``, or a number).
        connection_type: ``pg`` (default), ``op`` or ``basic``: the resource the PLC
            assigns the connection to (the remote TSAP's high byte with rack/slot).
        pdu_size: the PDU size asked for; the PLC grants at most its own (240 on S7-300,
            480 on S7-1200, 960 on S7-1500).
        timeout: for connecting and for each reply; then the connection is dropped.
        max_gap: bytes of unused data read to merge two ranges into one item.
        bit_writes: how a command writes a ``bool`` point: ``bit`` (an S7 bit write, which
            the PLC applies to that bit alone) or ``byte`` (read the byte, change the bit,
            write the byte: for PLCs and simulators that do not take bit writes; a bit the
            PLC's own program changes in between is overwritten).
        read_back: after a command wrote a point, read its bytes back (one more request
            per written point) and put the decoded value in the reply; a point may set its
            own ``read_back``.
        points: at least one; names unique.
    """

    host: str = Field(min_length=1)
    port: int = Field(default=102, ge=1, le=65535)
    rack: int | None = Field(default=None, ge=0, le=7)
    slot: int | None = Field(default=None, ge=0, le=31)
    local_tsap: int = 0x0100
    remote_tsap: int | None = None
    connection_type: Literal["pg", "op", "basic"] = "pg"
    pdu_size: int = Field(default=960, ge=240, le=960)
    timeout: Duration = 3.0
    max_gap: int = Field(default=16, ge=0, le=1024)
    bit_writes: Literal["bit", "byte"] = "bit"
    read_back: bool = False
    points: list[PointConfig] = Field(min_length=1)

    @field_validator("local_tsap", "remote_tsap", mode="before")
    @classmethod
    def _tsap(cls, v: object) -> int | None:
        return None if v is None else parse_tsap(v)

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("timeout must be longer than 0s")
        return v

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.remote_tsap is not None and (self.rack is not None or self.slot is not None):
            raise ValueError("set either rack and slot or remote_tsap, not both")
        if self.remote_tsap is not None and "connection_type" in self.model_fields_set:
            raise ValueError("connection_type applies to rack and slot, not to remote_tsap")
        seen: set[str] = set()
        for p in self.points:
            if p.name in seen:
                raise ValueError(f"point name {p.name!r} is used twice")
            seen.add(p.name)
        return self

    def tsaps(self) -> tuple[int, int]:
        """``(local, remote)`` TSAPs, the remote one from rack and slot unless given."""
        if self.remote_tsap is not None:
            return self.local_tsap, self.remote_tsap
        rack = DEFAULT_RACK if self.rack is None else self.rack
        slot = DEFAULT_SLOT if self.slot is None else self.slot
        return self.local_tsap, CONNECTION_TYPES[self.connection_type] << 8 | rack << 5 | slot


class S7Connector(PolledCounters):
    """Polls one PLC on a fixed-rate schedule and emits one record per poll.

    State that outlives a restart by the supervisor (counters, the isolated points, the
    last timestamp) lives on this object.

    Attributes:
        name: the device name.
        series: the one Series of its records.
        addresses: per point, its parsed address.
        plan: the read plan of the current (or last) connection.
        connected: a connection is open.
        pdu_size: the PDU size negotiated on the last connect (0 before).
        polls / emitted: polls completed and records emitted (emit returned).
        requests: read requests answered.
        connects: connections opened.
        writes: write requests sent (write-back).
        faults: connections lost to a timeout, a broken connection or a reply out of step.
        overruns / missed: polls that ended after the next was due / polls skipped for it.
    """

    def __init__(
        self,
        config: Config,
        ctx: BuildContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        time_ns: Callable[[], int] = time.time_ns,
    ):
        """Build the device (no connection yet: ``run`` connects).

        Args:
            config: the validated device config.
            ctx: node name and tags, for the topic, measurement and tags.
            clock: monotonic seconds for the schedule.
            sleep: the awaitable sleep matching ``clock``.
            time_ns: wall-clock Unix ns for record timestamps.
        """
        self.name = config.name
        self.config = config
        topic = ctx.topic(config)
        validate_topic(topic)
        self.series = Series(topic, ctx.measurement(config), ctx.series_tags(config))
        self.interval = float(config.interval)
        self.point_names: tuple[str, ...] = tuple(p.name for p in config.points)
        self.addresses: tuple[Address, ...] = tuple(p.parsed for p in config.points)
        self._decoders: tuple[Decoder, ...] = tuple(decoder(a) for a in self.addresses)
        self.local_tsap, self.remote_tsap = config.tsaps()
        self.plan: ReadPlan | None = None
        self._isolated: frozenset[int] = frozenset()
        self._specs: list[ReadItem] = []
        self._layout: list[tuple[int, str, int, int, tuple[int, ...], Decoder]] = []
        self._bad: dict[int, int] = {}  # point -> code of the last poll, for log lines
        self._clock = clock
        self._sleep = sleep
        self._time_ns = time_ns
        self._last_ns = 0
        self.write_points: dict[str, WritePoint] = {
            p.name: p.write_point(p.name, value_kind(a), device_read_back=config.read_back)
            for p, a in zip(config.points, self.addresses, strict=True)
        }
        self._index = {name: i for i, name in enumerate(self.point_names)}
        self._link: Link | None = None  # the open connection, for write
        self.writes = 0
        self.connected = False
        self.pdu_size = 0
        self.polls = 0
        self.emitted = 0
        self.requests = 0
        self.connects = 0
        self.faults = 0
        self._ticks = FixedRate(self.interval, clock)

    # -- planning ----------------------------------------------------------------------------

    def make_plan(self, pdu_size: int) -> ReadPlan:
        """Plan the reads for ``pdu_size`` (and the points isolated so far); keep it."""
        plan = plan_reads(
            self.addresses, pdu_size, max_gap=self.config.max_gap, isolate=self._isolated
        )
        self.plan = plan
        self._specs = [(AREA_CODES[it.area], it.db, it.start, it.size) for it in plan.items]
        self._layout = [
            (
                p,
                self.point_names[p],
                plan.point_range[p],
                self.addresses[p].offset - plan.ranges[plan.point_range[p]].start,
                plan.point_items[p],
                self._decoders[p],
            )
            for p in range(len(self.addresses))
        ]
        return plan

    def _isolate_refused(self, refused: list[int]) -> bool:
        """Isolate the points of merged ranges whose items the PLC refused; True if the plan
        changed. ``refused``: indexes of items with an S7 item error other than "object does
        not exist" (a missing DB: isolating its points cannot help)."""
        assert self.plan is not None
        plan = self.plan
        more: set[int] = set()
        for i in refused:
            rng = plan.ranges[plan.items[i].range]
            if len(rng.points) > 1:
                more.update(rng.points)
        if not more - self._isolated:
            return False
        self._isolated = self._isolated | more
        log.info(
            "%s: the PLC refused a merged read; reading %d points on their own from now on",
            self.name,
            len(more),
        )
        self.make_plan(plan.pdu_size)
        return True

    # -- reading -----------------------------------------------------------------------------

    async def _read_all(
        self, link: Link
    ) -> tuple[list[bytearray], list[int], list[int], LinkError | None]:
        """Run the plan's requests.

        Returns:
            per range its bytes; per item 0 or its Bad code; the items the PLC refused
            with an item error worth isolating (see ``_isolate_refused``); the fault that
            ended the connection, if one did.
        """
        plan = self.plan
        assert plan is not None
        buffers = [bytearray(r.size) for r in plan.ranges]
        codes = [0] * len(plan.items)
        refused: list[int] = []
        fault: LinkError | None = None
        specs, items = self._specs, plan.items
        for req in plan.requests:
            if fault is not None:
                for i in req.items:
                    codes[i] = fault.status
                continue
            try:
                results = await link.read([specs[i] for i in req.items])
            except RequestRefused as e:
                code = header_error_status(e.error)
                for i in req.items:
                    codes[i] = code
                continue
            except LinkError as e:
                fault = e
                for i in req.items:
                    codes[i] = e.status
                continue
            self.requests += 1
            for i, (rc, data) in zip(req.items, results, strict=True):
                if rc == ITEM_OK:
                    it = items[i]
                    buffers[it.range][it.offset : it.offset + it.size] = data
                else:
                    codes[i] = item_status(rc)
                    if rc != _UNKNOWN_OBJECT:
                        refused.append(i)
        return buffers, codes, refused, fault

    async def poll(self, link: Link) -> tuple[Record, LinkError | None]:
        """Read every point once: the record, and the connection fault if one happened."""
        t = self._time_ns()
        if t <= self._last_ns:
            t = self._last_ns + 1
        self._last_ns = t
        while True:
            buffers, codes, refused, fault = await self._read_all(link)
            # a merged range refused as a whole may hold one bad address among good ones:
            # isolate its points and read again (at most once per newly isolated set)
            if fault is not None or not refused or not self._isolate_refused(refused):
                break
        fields: dict[str, FieldValue] = {}
        bad: list[tuple[int, str, int, str]] = []  # point, name, code, why (for the log)
        failed = any(codes)
        for p, name, r, pos, item_ids, decode in self._layout:
            if failed:
                code = next((codes[i] for i in item_ids if codes[i]), 0)
                if code:
                    bad.append((p, name, code, describe(code)))
                    continue
            try:
                fields[name] = decode(buffers[r], pos)
            except DecodeError as e:
                bad.append((p, name, BAD_DATA_ENCODING_INVALID, f"{e}"))
        record = Record(self.series, fields, t, new_id())
        for _, name, code, _ in bad:
            record.mark(name, Quality.BAD, code)
        if fault is None:
            self._note_bad(bad)
        return record, fault

    def _note_bad(self, bad: list[tuple[int, str, int, str]]) -> None:
        """Log the points that turned Bad or recovered since the last poll (not every poll)."""
        now = {p: code for p, _, code, _ in bad}
        if now == self._bad:
            return
        for p, name, code, why in bad:
            if self._bad.get(p) != code:
                log.warning("%s: point %s (%s) is Bad: %s", self.name, name, self.addresses[p], why)
        recovered = [self.point_names[p] for p in self._bad if p not in now]
        if recovered:
            log.info("%s: points good again: %s", self.name, ", ".join(recovered))
        self._bad = now

    # -- running -----------------------------------------------------------------------------

    def new_link(self) -> Link:
        """A (not yet open) connection to this device's PLC."""
        c = self.config
        return Link(c.host, c.port, self.local_tsap, self.remote_tsap, c.pdu_size, float(c.timeout))

    async def run(self, emit: Emit) -> None:
        """Connect, then poll on a fixed-rate schedule until cancelled or a connection fault.

        The schedule is fixed-rate on the monotonic clock (as the ``sim`` device's): a poll
        that ends after the next was due counts an overrun and the polls whose time passed
        are skipped (``missed``). ``interval = "0s"`` polls flat out.

        Raises:
            LinkError: the PLC cannot be reached, or the connection failed (after the
                failed poll's record was emitted); the supervisor retries with backoff.
        """
        link = self.new_link()
        try:
            await link.open()
            self.connects += 1
            self.connected = True
            self._link = link
            self.pdu_size = link.pdu_size
            if self.plan is None or self.plan.pdu_size != link.pdu_size:
                self.make_plan(link.pdu_size)
            assert self.plan is not None
            log.info(
                "%s: connected to %s (TSAP %04X/%04X), PDU %d: %d points in %d requests",
                self.name,
                link.peer,
                self.local_tsap,
                self.remote_tsap,
                link.pdu_size,
                len(self.addresses),
                len(self.plan.requests),
            )
            log.debug("%s: %s", self.name, self.plan.describe(self.point_names))
            await self._schedule(link, emit)
        finally:
            self.connected = False
            self._link = None
            await link.close()

    # -- write-back --------------------------------------------------------------------------

    async def write(self, points: Mapping[str, FieldValue]) -> WriteResult:
        """Write each point of ``points`` in order (see the module doc).

        Returns:
            per point ``None`` (written) or the reason it was not; after a timeout or a lost
            connection the points not yet written get the same reason.
        """
        errors: dict[str, str | None] = {}
        link = self._link
        fatal: str | None = None
        if link is None or not link.is_open:
            fatal = f"device error: not connected to {self.config.host}:{self.config.port}"
        for name, value in points.items():
            if fatal is not None:
                errors[name] = fatal
                continue
            assert link is not None
            i = self._index.get(name)
            if i is None or not self.write_points[name].writable:
                errors[name] = f"refused: point {name!r} is not writable"
                continue
            address = self.addresses[i]
            try:
                data = encode(name, address, value)
            except EncodeError as exc:
                errors[name] = str(exc)
                continue
            try:
                rc = await self._write_bytes(link, address, data)
            except RequestRefused as exc:
                errors[name] = f"device error: {describe(header_error_status(exc.error))}"
                continue
            except LinkTimeout as exc:
                self.faults += 1
                fatal = errors[name] = f"timeout: {exc}"
                continue
            except LinkError as exc:
                self.faults += 1
                fatal = errors[name] = f"device error: {exc}"
                continue
            errors[name] = None if rc == ITEM_OK else f"device error: {describe(item_status(rc))}"
        wanted = [
            name
            for name, why in errors.items()
            if why is None and self.write_points[name].read_back
        ]
        if not wanted:
            return WriteResult(errors)
        if fatal is not None:  # the connection is gone: nothing can be read back now
            return WriteResult(errors, read_back_errors=dict.fromkeys(wanted, fatal))
        assert link is not None
        values, failed = await self._read_back(link, wanted)
        return WriteResult(errors, values, failed)

    async def _read_back(
        self, link: Link, names: list[str]
    ) -> tuple[dict[str, FieldValue], dict[str, str]]:
        """Read the bytes of each point of ``names`` afresh (one request per point, more for
        one longer than a PDU carries) and decode them as a poll does: their values, and per
        point that could not be read the reason."""
        values: dict[str, FieldValue] = {}
        failed: dict[str, str] = {}
        fatal: str | None = None
        room = link.pdu_size - RESPONSE_OVERHEAD
        for name in names:
            if fatal is not None:
                failed[name] = fatal
                continue
            i = self._index[name]
            address = self.addresses[i]
            area = AREA_CODES[address.area]
            data = bytearray()
            try:
                for pos in range(0, address.size, room):
                    item = (area, address.db, address.offset + pos, min(room, address.size - pos))
                    ((rc, part),) = await link.read([item])
                    self.requests += 1
                    if rc != ITEM_OK:
                        failed[name] = f"device error: {describe(item_status(rc))}"
                        break
                    data += part
            except RequestRefused as exc:
                failed[name] = f"device error: {describe(header_error_status(exc.error))}"
                continue
            except LinkTimeout as exc:
                self.faults += 1
                fatal = failed[name] = f"timeout: {exc}"
                continue
            except LinkError as exc:
                self.faults += 1
                fatal = failed[name] = f"device error: {exc}"
                continue
            if name in failed:
                continue
            try:
                values[name] = self._decoders[i](data, 0)
            except DecodeError as exc:
                failed[name] = f"device error: {describe(BAD_DATA_ENCODING_INVALID)}: {exc}"
        return values, failed

    async def _write_bytes(self, link: Link, address: Address, data: bytes) -> int:
        """Write ``data`` at ``address`` (a bit write for a bool); the S7 return code."""
        area = AREA_CODES[address.area]
        if address.bit is not None:
            self.writes += 1
            if self.config.bit_writes == "bit":
                return await link.write(
                    area, address.db, address.offset * 8 + address.bit, data, bit=True
                )
            # read-modify-write of the byte, for PLCs (and simulators) without bit writes;
            # the router writes one command per device at a time, so no write of ours races
            ((rc, now),) = await link.read([(area, address.db, address.offset, 1)])
            if rc != ITEM_OK:
                return rc
            mask = 1 << address.bit
            byte = now[0] | mask if data[0] else now[0] & ~mask
            return await link.write(area, address.db, address.offset, bytes((byte,)))
        # request header 10 + parameters 14 + data header 4 bytes, the rest is data
        room = max(2, (link.pdu_size - 28) & ~1)
        for pos in range(0, len(data), room):
            self.writes += 1
            rc = await link.write(area, address.db, address.offset + pos, data[pos : pos + room])
            if rc != ITEM_OK:
                return rc
        return ITEM_OK

    async def _schedule(self, link: Link, emit: Emit) -> None:
        ticks = self._ticks
        ticks.restart()
        while True:
            record, fault = await self.poll(link)
            await emit([record])
            self.polls += 1
            self.emitted += 1
            if fault is not None:
                self.faults += 1
                raise fault
            raise_if_cancelling()  # a drain must stop the device even when it polls flat out
            await self._sleep(ticks.next_pause() or 0)  # overdue: yield, then at once

    def metrics(self) -> dict[str, Any]:
        """Counters for tests, logs and the bench."""
        return {
            "connected": self.connected,
            "pdu_size": self.pdu_size,
            "polls": self.polls,
            "requests": self.requests,
            "connects": self.connects,
            "faults": self.faults,
            "overruns": self.overruns,
            "missed": self.missed,
        }


def build(config: Config, ctx: BuildContext) -> S7Connector:
    """Build an ``s7`` device from its config (checks that python-snap7 3.x is installed)."""
    check_driver()
    return S7Connector(config, ctx)
