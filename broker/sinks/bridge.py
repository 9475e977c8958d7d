"""What the bridge sinks (``mqtt``, ``amqp``, ``kafka``) share: keys, targets, messages.

A bridge turns one ``EncodedBatch`` from its outlet into broker messages. With the ``json``
codec the batch is a JSON array of records (``plantbus.codecs.json``); the bridge splits it
into one message per *target* (an MQTT topic, an AMQP routing key, a Kafka topic and key,
each rendered from a template over the record's ``topic``, ``measurement`` and ``device``),
each message a JSON array of at most ``max_records`` records and ``max_message_bytes``
bytes, the records of a target in batch order. With ``line_protocol`` a message is the whole
batch, sent to a fixed target: lines carry no topic, and a raw newline may sit inside a
string field, so the bytes cannot be split by record without parsing them.

Splitting reads bytes, not records: the sink only gets the encoded batch, and decoding and
re-encoding it would cost as much again as the encoding. The codec writes every record as
``{"uid":"…","topic":"…","measurement":"…","time":…,"tags":{…},"fields":{…},…}`` with
compact separators, so ``},{"uid":"`` marks exactly the record boundaries (a ``"`` inside a
string is always escaped) and ``","topic":"``, ``","time":`` and ``},"fields":`` find a
record's routing keys. The bytes between them are identical for every record of a series,
so a target is rendered once per series and looked up by those bytes afterwards. A payload
not in that shape is decoded and re-encoded instead (correct, slower, counted in
``slow_splits``).

Delivery bookkeeping is shared too (``Delivery``): a batch that failed half-way is retried
by the outlet; the messages the broker already acknowledged are not sent again, and the
records of messages that were sent but not acknowledged and are now sent again are counted
(``resent_records``): these, and only these, may reach a consumer twice.
"""

from __future__ import annotations

import json
import logging
import ssl
import string
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import Field, SecretStr, model_validator

from plantbus.broker.configtypes import Size, TlsConfig
from plantbus.broker.crypto import EncryptConfig, KeyRing, Sealer
from plantbus.broker.sinks.base import EncodedBatch, SinkConfig

__all__ = [
    "PLACEHOLDERS",
    "BridgeConfig",
    "BridgeCounters",
    "Delivery",
    "Message",
    "RecordKey",
    "Splitter",
    "Template",
    "check_template",
    "describe",
    "sealer_of",
    "ssl_context",
]

log = logging.getLogger(__name__)

PLACEHOLDERS = ("topic", "measurement", "device")

_HEAD = b'[{"uid":"'
_SEP = b'},{"uid":"'
_TAIL = b"}]"
_TOPIC = b'","topic":"'
_TIME = b'","time":'
_TAGS = b',"tags":'
_FIELDS = b'},"fields":'
_dumps = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode

T = TypeVar("T", bound=Hashable)


class Template:
    """A target template such as ``"plantbus/{topic}"``: ``{topic}``, ``{measurement}``,
    ``{device}`` are replaced by the record's values (``{{`` and ``}}`` are literal braces).

    Raises:
        ValueError: for an unknown placeholder, a format spec or a malformed template.
    """

    def __init__(self, text: str):
        self.text = text
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise ValueError(f"template {text!r}: {e}") from None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if name not in PLACEHOLDERS:
                raise ValueError(
                    f"template {text!r}: unknown placeholder {{{name}}}; use "
                    + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                )
            if spec or conversion:
                raise ValueError(f"template {text!r}: no format specs or conversions")
            fields.append(name)
        self.fields = tuple(fields)

    @property
    def static(self) -> bool:
        """Whether the template has no placeholders (the same target for every record)."""
        return not self.fields

    def render(self, values: dict[str, str]) -> str:
        return self.text.format_map(values)

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A TLS client context from the shared ``tls = { ca, certificate, private_key, verify }``."""
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    if tls.certificate:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key) if tls.private_key else None)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class BridgeConfig(SinkConfig):
    """Keys every bridge sink has, beyond those of every sink.

    Attributes:
        codec: ``json`` (default; records are routed by target) or ``line_protocol`` (one
            message per batch, to a fixed target).
        max_records: records per message at most (JSON).
        max_message_bytes: bytes per message at most (JSON; a single larger record still
            goes, alone).
        username / password: credentials (the broker's own login; SASL PLAIN for Kafka).
        tls: the shared TLS table (CA, client certificate and key, verify).
        encrypt: seal every message in an AES-256-GCM envelope with the active key of
            this key ring (``docs/encryption.md``); None: plain messages.
    """

    codec: Literal["json", "line_protocol"] = "json"
    max_records: int = Field(default=1000, ge=1)
    max_message_bytes: Size = Field(default=1024 * 1024, ge=1024)
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    encrypt: EncryptConfig | None = None

    @model_validator(mode="after")
    def _check_bridge(self) -> BridgeConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not")
        if self.codec == "line_protocol":
            for key, template in self.templates().items():
                if not Template(template).static:
                    raise ValueError(
                        f"{key} = {template!r}: with codec 'line_protocol' a message is a "
                        "whole batch of lines, which carry no topic; use a fixed "
                        f"{key} or codec 'json'"
                    )
        return self

    def templates(self) -> dict[str, str]:
        """Config key -> template text of each target template the sink has."""
        return {}


def check_template(v: str) -> str:
    """A pydantic field validator body: the template must parse."""
    Template(v)
    return v


def sealer_of(config: EncryptConfig | None) -> Sealer | None:
    """The sealer of a sink's ``encrypt`` table (keys read now), or None without one.

    Raises:
        plantbus.broker.crypto.KeyError_: a key file that is missing or not a 256-bit key.
    """
    return None if config is None else Sealer(KeyRing.from_config(config))


@dataclass(frozen=True, slots=True)
class Message(Generic[T]):
    """One broker message: where it goes, its bytes and how many records it holds."""

    target: T
    payload: bytes
    records: int


@dataclass(frozen=True, slots=True)
class RecordKey:
    """The routing values of one series, decoded once."""

    topic: str
    measurement: str
    device: str

    def values(self) -> dict[str, str]:
        return {"topic": self.topic, "measurement": self.measurement, "device": self.device}


def _device(tags: dict[str, Any], topic: str) -> str:
    # every connector's series has a `device` tag; records published through the API may not
    device = tags.get("device")
    if isinstance(device, str) and device:
        return device
    return topic.rsplit("/", 1)[-1]


class Splitter(Generic[T]):
    """Splits encoded batches into messages per target.

    Args:
        codec: the batch codec (``json`` or ``line_protocol``).
        target_of: the target of a record's routing values (called once per series).
        needs_device: whether ``target_of`` uses the device (reads the tags of each record).
        max_records / max_bytes: bounds of one JSON message.
        fixed: the target of every message when ``codec`` is ``line_protocol``.
        sealer: seals each message's payload into an envelope (after splitting, so the
            size bounds apply to the plaintext; an envelope adds 33 bytes + the key id).

    Attributes:
        slow_splits: JSON batches that were not in the codec's shape and had to be decoded.
    """

    def __init__(
        self,
        codec: str,
        target_of: Callable[[RecordKey], T],
        *,
        needs_device: bool,
        max_records: int,
        max_bytes: int,
        fixed: T | None = None,
        sealer: Sealer | None = None,
    ):
        self.codec = codec
        self.sealer = sealer
        self._target_of = target_of
        self._needs_device = needs_device
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._fixed = fixed
        # raw routing bytes of a series -> index into _targets (ints group fast)
        self._index: dict[Hashable, int] = {}
        self._targets: list[T] = []
        self._target_index: dict[T, int] = {}
        self.slow_splits = 0

    def split(self, batch: EncodedBatch) -> list[Message[T]]:
        """The messages of ``batch``, per target in batch order (sealed with a sealer).

        Raises:
            ValueError: a JSON payload that is not an array of records (a bug upstream).
        """
        messages = self._split_plain(batch)
        seal = self.sealer
        if seal is None:
            return messages
        return [Message(m.target, seal.seal(m.payload), m.records) for m in messages]

    def _split_plain(self, batch: EncodedBatch) -> list[Message[T]]:
        if self.codec != "json":
            assert self._fixed is not None
            return [Message(self._fixed, batch.payload, batch.records)]
        groups = self._groups_fast(batch)
        if groups is None:
            self.slow_splits += 1
            return self._split_slow(batch.payload)
        out: list[Message[T]] = []
        for i, chunks in groups.items():
            self._pack(self._targets[i], chunks, out)
        return out

    # -- the fast path: bytes only ----------------------------------------------------------

    def _groups_fast(self, batch: EncodedBatch) -> dict[int, list[bytes]] | None:
        payload = batch.payload
        if not (payload.startswith(_HEAD) and payload.endswith(_TAIL)):
            return None
        chunks = payload[len(_HEAD) : -len(_TAIL)].split(_SEP)
        if len(chunks) != batch.records:
            return None
        index = self._index
        groups: dict[int, list[bytes]] = {}
        needs_device = self._needs_device
        for c in chunks:
            a = c.find(_TOPIC)
            e = c.find(_TIME, a)
            if a < 0 or e < 0:
                return None
            key: Hashable = c[a:e]
            if needs_device:
                t = c.find(_TAGS, e)
                f = c.find(_FIELDS, t)
                if t < 0 or f < 0:
                    return None
                key = (key, c[t:f])
            i = index.get(key)
            if i is None:
                i = self._learn(key)
            g = groups.get(i)
            if g is None:
                groups[i] = [c]
            else:
                g.append(c)
        return groups

    def _learn(self, key: Hashable) -> int:
        """Decode the routing bytes of a new series and render its target (once)."""
        if isinstance(key, tuple):
            names_raw, tags_raw = key
        else:
            names_raw, tags_raw = key, b',"tags":{'
        # names_raw is `","topic":"…","measurement":"…` and tags_raw `,"tags":{…}`
        doc = json.loads(b'{"x":"' + names_raw + b'"' + tags_raw + b"}}")
        topic, measurement = str(doc["topic"]), str(doc["measurement"])
        rk = RecordKey(topic, measurement, _device(doc["tags"], topic))
        i = self._intern(self._target_of(rk))
        self._index[key] = i
        return i

    def _intern(self, target: T) -> int:
        i = self._target_index.get(target)
        if i is None:
            i = self._target_index[target] = len(self._targets)
            self._targets.append(target)
        return i

    def _pack(
        self,
        target: T,
        items: list[Any],
        out: list[Message[T]],
        join: Callable[[list[Any]], bytes] | None = None,
    ) -> None:
        """Append ``items`` (records of one target) as messages within the bounds."""
        join = join or _join_chunks
        step = self.max_records
        for s in range(0, len(items), step):
            self._fit(target, items[s : s + step], out, join)

    def _fit(
        self,
        target: T,
        part: list[Any],
        out: list[Message[T]],
        join: Callable[[list[Any]], bytes],
    ) -> None:
        payload = join(part)
        if len(payload) > self.max_bytes and len(part) > 1:
            # rare (large records): halve until each message fits or holds one record
            half = len(part) // 2
            self._fit(target, part[:half], out, join)
            self._fit(target, part[half:], out, join)
        else:
            out.append(Message(target, payload, len(part)))

    # -- the slow path: decode and encode again ---------------------------------------------

    def _split_slow(self, payload: bytes) -> list[Message[T]]:
        docs = json.loads(payload)
        if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
            raise ValueError("a JSON batch must be an array of records")
        groups: dict[int, list[dict[str, Any]]] = {}
        for d in docs:
            topic = str(d.get("topic", ""))
            tags = d.get("tags")
            tags = tags if isinstance(tags, dict) else {}
            rk = RecordKey(topic, str(d.get("measurement", "")), _device(tags, topic))
            groups.setdefault(self._intern(self._target_of(rk)), []).append(d)
        out: list[Message[T]] = []
        for i, part in groups.items():
            self._pack(self._targets[i], part, out, _join_docs)
        return out


def _join_chunks(chunks: list[bytes]) -> bytes:
    return _HEAD + _SEP.join(chunks) + _TAIL


def _join_docs(docs: list[dict[str, Any]]) -> bytes:
    return _dumps(docs).encode("utf-8")


class Delivery:
    """Which messages of the batch being written the broker has acknowledged.

    The outlet retries a failed batch as a whole; ``pending`` leaves out what was
    acknowledged before, and counts what is sent again after an unknown outcome.

    Attributes:
        messages_out / records_out: acknowledged by the broker.
        resent_messages / resent_records: sent again after a failure left their outcome
            unknown (they may reach a consumer twice).
    """

    def __init__(self) -> None:
        self._key: tuple[int, str, str] | None = None
        self.messages: list[Message[Any]] = []
        self._acked: set[int] = set()
        self._sent: set[int] = set()
        self.messages_out = 0
        self.records_out = 0
        self.resent_messages = 0
        self.resent_records = 0

    def start(
        self, batch: EncodedBatch, split: Callable[[EncodedBatch], list[Message[Any]]]
    ) -> list[int]:
        """Begin (or resume) ``batch``: the indexes of its messages still to send."""
        key = (batch.seq, batch.first_id, batch.last_id)
        if key != self._key:
            self._key = key
            self.messages = split(batch)
            self._acked = set()
            self._sent = set()
        return [i for i in range(len(self.messages)) if i not in self._acked]

    def sent(self, i: int) -> None:
        """Message ``i`` is handed to the client (it may reach the broker from now on)."""
        if i in self._sent:
            self.resent_messages += 1
            self.resent_records += self.messages[i].records
        else:
            self._sent.add(i)

    def acked(self, i: int) -> None:
        if i not in self._acked:
            self._acked.add(i)
            self.messages_out += 1
            self.records_out += self.messages[i].records

    def unacked_sent(self) -> list[int]:
        """Messages sent but not acknowledged (their outcome is unknown)."""
        return [i for i in self._sent if i not in self._acked]

    def done(self) -> None:
        """The batch is complete: forget it."""
        self._key = None
        self.messages = []
        self._acked = set()
        self._sent = set()


class BridgeCounters:
    """The delivery counters every bridge sink shows, read from its Delivery and Splitter."""

    _delivery: Delivery
    _splitter: Splitter[Any]

    @property
    def messages_out(self) -> int:
        return self._delivery.messages_out

    @property
    def records_out(self) -> int:
        return self._delivery.records_out

    @property
    def resent_records(self) -> int:
        return self._delivery.resent_records

    @property
    def slow_splits(self) -> int:
        return self._splitter.slow_splits
