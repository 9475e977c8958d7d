"""The ``punt`` sink: batches of records to a function container, its results back onto the bus.

Each batch (codec ``json``: a JSON array of records, ``plantbus.codecs.json``) is POSTed to
the function's ``url``. The function answers with a JSON array of result records in the same
shape; what a result leaves out is filled in:

* ``topic``: ``result_topic``; ``measurement``: the topic's last level; ``tags``: none;
* ``uid``: a new record ID; ``time``: the time of its source record;
* ``parent`` (the source record's ``uid``): the function sets it; when it answers exactly one
  result per input, in order, a missing ``parent`` is the input at the same place.

The results are published on the bus (the runtime hands the sink the bus's ``publish`` in
``BuildContext.extra["publish"]``; a sink never imports connectors), and only then is the
batch acknowledged. A batch whose answer was taken but whose results could not all be
published before a retry (the outlet's timeout fell while the bus pushed back) is not sent
to the function again: the retry publishes the rest of the answer it already has.

How answers map onto the outlet's retry rules:

==========================================  ====================================================
2xx with valid results (204: none)         published; the batch is acknowledged
2xx that is not an array of JSON records    ``PermanentSinkError`` naming the fault and quoting
                                            the answer (shortened): the batch is rejected and
                                            counted (``invalid_answers``), never retried
a result that cannot be placed (no          counted (``invalid_results``) and left out; the
``parent`` and not one result per input, a  batch's other results are published
``parent`` not in the batch, a ``topic``
this sink subscribes to)
400, 413, 422 and other 4xx                 ``PermanentSinkError`` with the function's text
408, 429, 5xx, connection errors, timeouts  ``RetryableSinkError`` (``Retry-After`` honoured),
                                            and a failure for the circuit breaker
401, 403, 404                               ``MisconfiguredSinkError`` (retried, the sink shown
                                            unhealthy), and a failure for the breaker
==========================================  ====================================================

The circuit breaker (``breaker = { failures, cool_down }``) opens after ``failures``
consecutive failures; while open, writes are turned away without contacting the function
(``RetryableSinkError`` with the cool-down left as ``retry_after``), so batches wait in the
outlet's buffer. After ``cool_down`` one probe goes through: its success closes the breaker,
its failure opens it again. ``max_in_flight`` limits the requests in flight; ``timeout``
each request (the outlet's write timeout).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, ClassVar, Literal, Protocol

import aiohttp
from pydantic import Field, ValidationInfo, field_validator, model_validator

from plantbus.broker.configtypes import Duration, Size, StrictModel, TlsConfig
from plantbus.broker.connector import BuildContext
from plantbus.broker.ids import new_ids
from plantbus.broker.record import Record
from plantbus.broker.sinks.base import (
    EncodedBatch,
    MisconfiguredSinkError,
    PermanentSinkError,
    RetryableSinkError,
    SinkConfig,
    retry_after_seconds,
)
from plantbus.broker.sinks.breaker import CircuitBreaker
from plantbus.broker.sinks.bridge import ssl_context
from plantbus.broker.topics import matches, validate_topic
from plantbus.codecs.json import DecodeError, SeriesCache, decode, to_record

__all__ = ["BreakerConfig", "Config", "Publish", "PuntSink", "build"]

log = logging.getLogger(__name__)

ANSWER_PREVIEW = 300
"""Characters of a function's answer quoted in an error (enough to recognise an HTML page or
a stack trace, short enough for one log line)."""

_MISCONFIGURED = frozenset({401, 403, 404})
"""Answers only an operator can fix (credentials, a wrong path): retried, the sink marked
unhealthy (``MisconfiguredSinkError``); a config fix brings the batches through."""

_BUSY = frozenset({408, 429})
"""Client errors that say the function is busy, not that the batch is wrong: retried."""

_INVALID_LOG_INTERVAL = 60.0  # seconds between warnings about results that were left out


class Publish(Protocol):
    """The bus's ``publish``: one batch of records of one topic (awaiting it is back-pressure)."""

    async def __call__(self, records: list[Record], /) -> None: ...


class BreakerConfig(StrictModel):
    """``breaker = { failures, cool_down }``.

    Attributes:
        failures: consecutive failed requests that open the breaker.
        cool_down: how long it stays open before one probe request goes through.
    """

    failures: int = Field(default=5, ge=1)
    cool_down: Duration = 10.0


class Config(SinkConfig):
    """``[[sinks.punt]]``: a function container fed with batches, its results on the bus.

    Attributes:
        url: where batches are POSTed (``http://`` or ``https://``).
        result_topic: topic of results that name none; must not match ``subscribe``
            (results would be fed back to the function).
        breaker: the circuit breaker.
        max_answer_bytes: a longer answer is refused (the function is misbehaving).
        tls: the shared TLS table, for https URLs.
    """

    MAX_IN_FLIGHT_LIMIT: ClassVar[int] = 16

    url: str
    result_topic: str
    codec: Literal["json"] = "json"
    batch_size: int = Field(default=1000, ge=1)
    flush_interval: Duration = 0.1
    timeout: Duration = 5.0
    breaker: BreakerConfig = BreakerConfig()
    max_answer_bytes: Size = 64 * 1024 * 1024
    tls: TlsConfig | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r}: expected http://… or https://…")
        return v

    @field_validator("result_topic")
    @classmethod
    def _check_result_topic(cls, v: str, info: ValidationInfo) -> str:
        validate_topic(v)
        # subscribe is declared (so validated) before result_topic
        for flt in info.data.get("subscribe", ()):
            if matches(flt, v):
                raise ValueError(
                    f"{v!r} matches subscribe filter {flt!r}: results would be sent to the "
                    "function again"
                )
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> Config:
        if self.tls is not None and not self.url.startswith("https:"):
            raise ValueError("tls is set but the url is not https://")
        return self


class _Answer:
    """The results of one batch, published run by run (``done``: records published so far)."""

    __slots__ = ("done", "records")

    def __init__(self, records: list[Record]):
        self.records = records
        self.done = 0


class PuntSink:
    """POSTs encoded JSON batches to a function and publishes its results on the bus.

    Args:
        config: the sink's config.
        publish: the bus's ``publish``.
        name: for logs and metrics.

    Attributes:
        requests: requests sent to the function.
        results_out: result records published on the bus.
        invalid_answers: answers that were not an array of JSON records (batch rejected).
        invalid_results: results left out (see the module doc); ``last_invalid`` says why.
        refused: batches the function refused with a 4xx (batch rejected).
        breaker: the circuit breaker.
    """

    codec = "json"
    PUBLISHES: ClassVar[bool] = True
    """It publishes onto the bus: the runtime drains it before the outlets that may take its
    results."""

    def __init__(self, config: Config, publish: Publish, name: str = "punt"):
        self.config = config
        self.name = name
        self._publish = publish
        self._url = config.url
        self.breaker = CircuitBreaker(config.breaker.failures, config.breaker.cool_down)
        self._session: aiohttp.ClientSession | None = None
        self._answers: dict[tuple[int, str, str], _Answer] = {}
        self._series = SeriesCache()
        self._invalid_logged = -_INVALID_LOG_INTERVAL
        self.requests = 0
        self.results_out = 0
        self.invalid_answers = 0
        self.invalid_results = 0
        self.refused = 0
        self.last_invalid = ""

    async def connect(self) -> None:
        """Open the HTTP session. The function need not be up: the breaker deals with that."""
        if self._session is None:
            tls = self.config.tls
            connector = aiohttp.TCPConnector(
                limit=self.config.max_in_flight,
                ssl=ssl_context(tls) if tls is not None else None,
            )
            self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        self._answers.clear()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def write(self, batch: EncodedBatch) -> None:
        """Call the function with ``batch`` (unless its answer is already here) and publish.

        Raises:
            RetryableSinkError: the function is down, busy, or the breaker is open.
            PermanentSinkError: the function refused the batch or answered nonsense.
        """
        key = (batch.seq, batch.first_id, batch.last_id)
        answer = self._answers.get(key)
        if answer is None:
            records = await self._call(batch)
            answer = self._answers[key] = _Answer(records)
        await self._publish_answer(answer)
        del self._answers[key]

    # -- calling the function ----------------------------------------------------------------

    async def _call(self, batch: EncodedBatch) -> list[Record]:
        wait = self.breaker.admit()
        if wait is not None:
            raise RetryableSinkError(
                f"circuit open after {self.breaker.consecutive_failures} consecutive failures; "
                "the function is not called until a probe succeeds",
                retry_after=wait or None,
            )
        if self._session is None:
            await self.connect()
        assert self._session is not None
        self.requests += 1
        try:
            async with self._session.post(
                self._url,
                data=batch.payload,
                headers={"Content-Type": "application/json"},
            ) as resp:
                status = resp.status
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                body = await _read_limited(resp, self.config.max_answer_bytes)
        except PermanentSinkError:
            self.breaker.success()  # it answered, too much: up, but not for this batch
            raise
        except BaseException as e:
            # a timeout reaches here as the outlet cancelling the write: a failure too (at
            # shutdown the breaker's state no longer matters)
            self.breaker.failure()
            if isinstance(e, aiohttp.ClientError | OSError):
                raise RetryableSinkError(f"{self._url}: {_describe(e)}") from e
            raise
        if 200 <= status < 300:
            self.breaker.success()
            return [] if status == 204 else self._results(batch, body)
        text = _preview(body)
        if status >= 500 or status in _BUSY or status in _MISCONFIGURED:
            self.breaker.failure()
            error = MisconfiguredSinkError if status in _MISCONFIGURED else RetryableSinkError
            raise error(f"{self._url}: HTTP {status}: {text}", retry_after=retry_after)
        # the function is up and refuses this batch: retrying it cannot help
        self.breaker.success()
        self.refused += 1
        raise PermanentSinkError(f"{self._url}: HTTP {status}: {text}")

    # -- results -----------------------------------------------------------------------------

    def _results(self, batch: EncodedBatch, body: bytes) -> list[Record]:
        """The answer's result records, completed; an answer that is not records raises."""
        try:
            docs = decode(body) if body.strip() else _not_records()
        except DecodeError as e:
            self.invalid_answers += 1
            raise PermanentSinkError(
                f"{self._url}: the function's answer is not a JSON array of records ({e}); "
                f"answer: {_preview(body)}"
            ) from None
        if not docs:
            return []
        sources = _sources(batch.payload)
        one_each = len(docs) == len(sources)
        source_time = dict(sources)
        uids = new_ids(len(docs))
        own = self.config.subscribe
        out: list[Record] = []
        for i, doc in enumerate(docs):
            parent = doc.get("parent")
            if parent is None:
                if not one_each:
                    self._invalid(
                        f"result [{i}] has no 'parent' and the function answered "
                        f"{len(docs)} results for {len(sources)} records"
                    )
                    continue
                parent = sources[i][0]
            elif parent not in source_time:
                self._invalid(f"result [{i}]: parent {parent!r} is not a record of the batch")
                continue
            topic = doc.get("topic", self.config.result_topic)
            if any(matches(flt, topic) for flt in own):
                self._invalid(
                    f"result [{i}]: topic {topic!r} is one this sink subscribes to "
                    "(it would be sent to the function again)"
                )
                continue
            try:
                record = to_record(
                    doc,
                    topic=self.config.result_topic,
                    time_ns=source_time[parent],
                    uid=uids[i],
                    parent=parent,
                    series=self._series,
                )
            except DecodeError as e:
                self._invalid(f"result [{i}]: {e}")
                continue
            out.append(record)
        return out

    def _invalid(self, reason: str) -> None:
        self.invalid_results += 1
        self.last_invalid = reason
        now = time.monotonic()
        if now - self._invalid_logged >= _INVALID_LOG_INTERVAL:
            self._invalid_logged = now
            log.warning(
                "punt sink %s: a result was left out (%d so far): %s",
                self.name,
                self.invalid_results,
                reason,
            )

    async def _publish_answer(self, answer: _Answer) -> None:
        """Publish the results not yet published, one run of equal topics at a time."""
        records = answer.records
        n = len(records)
        while answer.done < n:
            start = answer.done
            topic = records[start].series.topic
            end = start + 1
            while end < n and records[end].series.topic == topic:
                end += 1
            await self._publish(records[start:end])
            answer.done = end
            self.results_out += end - start

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self) -> dict[str, float | int]:
        """The function's side: requests, results, what was refused, and the breaker."""
        m: dict[str, float | int] = {
            "requests": self.requests,
            "results_out": self.results_out,
            "invalid_answers": self.invalid_answers,
            "invalid_results": self.invalid_results,
            "refused": self.refused,
        }
        m.update(self.breaker.metrics())
        return m


def build(config: Config, ctx: BuildContext) -> PuntSink:
    """The sink; ``ctx.extra["publish"]`` must be the bus's ``publish`` (the runtime sets it).

    Raises:
        ValueError: built without a bus to publish results on.
    """
    publish = ctx.extra.get("publish")
    if publish is None:
        raise ValueError(
            "the punt sink publishes results on the bus: build it with "
            'BuildContext.extra["publish"] (the runtime does)'
        )
    return PuntSink(config, publish, config.name or "punt")


# -- helpers -------------------------------------------------------------------------------------


def _not_records() -> list[dict[str, Any]]:
    raise DecodeError("the answer is empty")


def _sources(payload: bytes) -> list[tuple[str, int]]:
    """(uid, time) of each record of an encoded JSON batch, in order."""
    return [(doc["uid"], doc["time"]) for doc in json.loads(payload)]


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise PermanentSinkError(
            f"the function's answer has {resp.content_length} bytes, more than "
            f"max_answer_bytes ({limit})"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PermanentSinkError(
                f"the function's answer is longer than max_answer_bytes ({limit})"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _preview(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if len(text) > ANSWER_PREVIEW:
        return repr(text[:ANSWER_PREVIEW]) + f" … ({len(text)} characters)"
    return repr(text)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
