"""The in-process pub/sub bus: batches of records routed by topic to bounded queues.

Publishing takes the records of one device read (one topic). Which subscriptions a topic
reaches is computed once per topic and cached until the set of subscriptions changes.
Each subscription has a queue bounded in records and a policy for when it is full:

* ``block``: the publisher waits (back-pressure; the device's poll overrun is counted there),
* ``drop_oldest``: the oldest queued records make room (counted),
* ``drop_newest``: the incoming records are refused (counted).

One slow subscriber never stalls the others unless it asked for ``block``.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Iterable, Sequence

from plantbus.broker.record import Record
from plantbus.broker.topics import matches, validate_filter

__all__ = ["Bus", "QueuePolicy", "Subscription"]


class QueuePolicy(enum.StrEnum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class Subscription:
    """A bounded queue of record batches fed by the bus for a set of topic filters.

    Attributes:
        name: for logs and metrics.
        filters: the MQTT topic filters it receives.
        size: capacity in records.
        policy: what happens when full.
        received: records accepted into the queue.
        dropped: records lost to the policy.
        blocked: number of times a publisher had to wait for room.
    """

    def __init__(self, bus: Bus, name: str, filters: Sequence[str], size: int, policy: QueuePolicy):
        if size < 1:
            raise ValueError("queue size must be at least 1 record")
        for f in filters:
            validate_filter(f)
        self._bus = bus
        self.name = name
        self.filters = tuple(filters)
        self.size = size
        self.policy = QueuePolicy(policy)
        self._batches: deque[list[Record]] = deque()
        self._count = 0
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        self.received = 0
        self.dropped = 0
        self.blocked = 0

    def __len__(self) -> int:
        """Records queued."""
        return self._count

    def wants(self, topic: str) -> bool:
        return any(matches(f, topic) for f in self.filters)

    # -- producer side (the bus) -------------------------------------------------------------

    def _append(self, batch: list[Record]) -> None:
        self._batches.append(batch)
        self._count += len(batch)
        self.received += len(batch)
        self._readable.set()
        if self._count >= self.size:
            self._writable.clear()

    def offer(self, batch: list[Record]) -> None:
        """Queue ``batch`` without waiting, applying a drop policy if it does not fit."""
        n = len(batch)
        room = self.size - self._count
        if n <= room:
            self._append(batch)
            return
        if self.policy is QueuePolicy.DROP_NEWEST or self.policy is QueuePolicy.BLOCK:
            if room > 0:
                self._append(batch[:room])
            self.dropped += n - max(room, 0)
            return
        # drop_oldest: make room from the head; a batch bigger than the queue keeps its tail
        if n >= self.size:
            self.dropped += self._count + (n - self.size)
            self._batches.clear()
            self._count = 0
            self._append(batch[n - self.size :])
            return
        need = n - room
        while need > 0:
            head = self._batches[0]
            if len(head) <= need:
                self._batches.popleft()
                self._count -= len(head)
                self.dropped += len(head)
                need -= len(head)
            else:
                self._batches[0] = head[need:]
                self._count -= need
                self.dropped += need
                need = 0
        self._append(batch)

    async def put(self, batch: list[Record]) -> None:
        """Queue ``batch``; with ``block``, wait until there is room for it."""
        if self.policy is not QueuePolicy.BLOCK:
            self.offer(batch)
            return
        if self._count + len(batch) > self.size and self._count > 0:
            self.blocked += 1
            while self._count + len(batch) > self.size and self._count > 0 and not self.closed:
                self._writable.clear()
                await self._writable.wait()
        if self.closed:
            self.dropped += len(batch)
            return
        # an empty queue takes even an oversized batch, or block could deadlock
        self._append(batch)

    # -- consumer side -----------------------------------------------------------------------

    def get_nowait(self, max_records: int | None = None) -> list[Record]:
        """Take up to ``max_records`` queued records (all if None), oldest first."""
        if not self._batches:
            return []
        limit = self._count if max_records is None else max_records
        out: list[Record] = []
        while self._batches and len(out) < limit:
            head = self._batches[0]
            take = limit - len(out)
            if len(head) <= take:
                self._batches.popleft()
                if out:
                    out.extend(head)
                else:
                    out = head if len(head) == take or not self._batches else list(head)
            else:
                out.extend(head[:take])
                self._batches[0] = head[take:]
        self._count -= len(out)
        if not self._batches:
            self._readable.clear()
        if self._count < self.size:
            self._writable.set()
        return out

    async def get(self, max_records: int | None = None) -> list[Record]:
        """Wait for records and take up to ``max_records``; ``[]`` once closed and drained."""
        while not self._batches:
            if self.closed:
                return []
            await self._readable.wait()
        return self.get_nowait(max_records)

    async def wait_readable(self) -> None:
        await self._readable.wait()

    def close(self) -> None:
        """Stop receiving; queued records can still be taken. Wakes waiting readers/writers."""
        if not self.closed:
            self.closed = True
            self._bus._remove(self)
            self._readable.set()
            self._writable.set()


class Bus:
    """Topic-routed fan-out of record batches to subscriptions."""

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self.published = 0
        self.unrouted = 0

    def subscribe(
        self,
        filters: Iterable[str],
        *,
        size: int = 10_000,
        policy: QueuePolicy | str = QueuePolicy.BLOCK,
        name: str = "",
    ) -> Subscription:
        sub = Subscription(self, name, tuple(filters), size, QueuePolicy(policy))
        self._subs.append(sub)
        self._routes.clear()
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._routes.clear()

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subs)

    def route(self, topic: str) -> tuple[Subscription, ...]:
        subs = self._routes.get(topic)
        if subs is None:
            subs = tuple(s for s in self._subs if s.wants(topic))
            self._routes[topic] = subs
        return subs

    async def publish(self, records: list[Record]) -> None:
        """Deliver the records of one read (all of one topic) to every matching subscription.

        The list is shared between subscriptions, never copied: consumers must not mutate it.
        """
        if not records:
            return
        subs = self.route(records[0].series.topic)
        self.published += len(records)
        if not subs:
            self.unrouted += len(records)
            return
        for sub in subs:
            if sub.policy is QueuePolicy.BLOCK:
                await sub.put(records)
            else:
                sub.offer(records)

    def publish_nowait(self, records: list[Record]) -> None:
        """Like publish, but never waits: a full ``block`` queue counts the records dropped."""
        if not records:
            return
        subs = self.route(records[0].series.topic)
        self.published += len(records)
        if not subs:
            self.unrouted += len(records)
        for sub in subs:
            sub.offer(records)
