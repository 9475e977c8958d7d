"""Store-and-forward buffers of encoded batches between an outlet's encoder and one sink.

A buffer holds every batch that its sink has not acknowledged yet, oldest first. The sender
takes the next batch with ``get()`` (the batch is then *in flight*), writes it, and calls
``ack(batch)``; only then is the batch released. Batches acknowledged out of order (several
in flight) are released in order, so a restart never skips one.

The buffer is bounded in bytes. When an appended batch does not fit, ``when_full`` decides:

* ``block``: ``append`` waits for room (back-pressure up to the bus subscription),
* ``drop_oldest``: the oldest batches not yet in flight make room (counted),
* ``drop_newest``: the incoming batch is refused (counted).

In-flight batches are never dropped (the sink may be taking them right now), so with
``drop_oldest`` the bytes held can pass ``max_size`` by at most the batches in flight. An
empty buffer takes a batch of any size, or a batch larger than ``max_size`` could never pass.

``MemoryBuffer`` is the in-memory implementation; the disk buffer implements the same
``Buffer`` protocol with segment files and replays what is held after a restart.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, Literal, Protocol, TypeVar

from plantbus.broker.sinks.base import EncodedBatch

__all__ = ["BoundedBuffer", "Buffer", "MemoryBuffer", "WhenFull"]

WhenFull = Literal["block", "drop_oldest", "drop_newest"]
_POLICIES = ("block", "drop_oldest", "drop_newest")


class _Counted(Protocol):
    records: int


_Item = TypeVar("_Item", bound=_Counted)


class Buffer(Protocol):
    """What an Outlet needs from a buffer (memory now, disk segments later).

    Attributes:
        name: for logs and metrics.
        max_size: the bound in bytes.
        when_full: the policy when an appended batch does not fit.
        dropped_records / dropped_batches: lost to ``when_full`` since creation.
    """

    name: str
    max_size: int
    when_full: WhenFull
    dropped_records: int
    dropped_batches: int

    async def append(self, batch: EncodedBatch) -> bool:
        """Add ``batch``; ``False`` if it was refused (``drop_newest`` or closed)."""
        ...

    async def get(self) -> EncodedBatch | None:
        """Wait for the oldest batch not yet in flight; ``None`` once sealed and drained."""
        ...

    def get_nowait(self) -> EncodedBatch | None: ...

    def ack(self, batch: EncodedBatch) -> None:
        """The sink took ``batch`` (or refused it for good): release it."""
        ...

    def rewind(self) -> None:
        """Hand unacknowledged in-flight batches out again (after a sender restart)."""
        ...

    def seal(self) -> None:
        """No more appends: ``get()`` returns ``None`` once everything was handed out."""
        ...

    async def close(self) -> None:
        """Release resources; what is held stays counted (a disk buffer keeps it on disk)."""
        ...

    def __len__(self) -> int: ...

    @property
    def bytes(self) -> int:
        """Payload bytes held (what ``max_size`` bounds), in flight included."""
        ...

    @property
    def records(self) -> int:
        """Records not yet acknowledged, in flight included."""
        ...

    @property
    def pending(self) -> int: ...

    @property
    def undelivered_batches(self) -> int:
        """Batches not yet acknowledged: pending and in flight."""
        ...


class BoundedBuffer(Generic[_Item]):
    """What both buffers share: the byte bound, ``when_full`` and the counters.

    Subclasses hold ``_items`` (oldest first; the first ``_sent`` of them in flight) and
    provide ``_push`` (hold a batch that fits), ``_size`` (the bytes an item counts for)
    and, for ``drop_oldest``, ``_evicted`` (after items were dropped to make room).

    Args:
        max_size: bound in bytes of the payloads held (in flight included).
        when_full: ``block``, ``drop_oldest`` or ``drop_newest``.
        name: for logs and metrics.
    """

    def __init__(self, max_size: int, when_full: WhenFull, name: str):
        if max_size < 1:
            raise ValueError("buffer max_size must be at least 1 byte")
        if when_full not in _POLICIES:
            raise ValueError(f"unknown when_full policy {when_full!r} (use {', '.join(_POLICIES)})")
        self.name = name
        self.max_size = max_size
        self.when_full: WhenFull = when_full
        # every held batch, oldest first; the first ``_sent`` of them are in flight
        self._items: deque[_Item] = deque()
        self._sent = 0
        self._bytes = 0
        self._records = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.sealed = False
        self.closed = False
        self.dropped_records = 0
        self.dropped_batches = 0
        self.blocked = 0  # times an append had to wait for room

    # -- state -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches held, in flight included."""
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Payload bytes held (what ``max_size`` bounds), in flight included."""
        return self._bytes

    @property
    def pending(self) -> int:
        """Batches not yet handed out."""
        return len(self._items) - self._sent

    def _fits(self, size: int) -> bool:
        return not self._items or self._bytes + size <= self.max_size

    # -- producer side -----------------------------------------------------------------------

    async def _push(self, batch: EncodedBatch) -> None:
        raise NotImplementedError

    def _size(self, item: _Item) -> int:
        raise NotImplementedError

    def _evicted(self, items: list[_Item]) -> None:
        """Items ``drop_oldest`` took out to make room (already uncounted)."""

    def _drop(self, batch: EncodedBatch | _Item) -> None:
        self.dropped_records += batch.records
        self.dropped_batches += 1

    async def append(self, batch: EncodedBatch) -> bool:
        """Add ``batch`` at the tail, applying ``when_full`` if it does not fit.

        Returns:
            ``True`` if the batch is now held, ``False`` if it was refused (and counted).

        Raises:
            RuntimeError: after ``seal()`` (a bug in the caller).
        """
        if self.sealed and not self.closed:
            raise RuntimeError(f"buffer {self.name!r} is sealed: no more appends")
        size = len(batch.payload)
        if self.closed:
            self._drop(batch)
            return False
        if self._fits(size):
            await self._push(batch)
            return True
        if self.when_full == "drop_newest":
            self._drop(batch)
            return False
        if self.when_full == "drop_oldest":
            # the oldest batches not in flight go first; in-flight ones stay (see module doc)
            evicted: list[_Item] = []
            while self._bytes + size > self.max_size and len(self._items) > self._sent:
                old = self._items[self._sent]
                del self._items[self._sent]
                self._bytes -= self._size(old)
                self._records -= old.records
                self._drop(old)
                evicted.append(old)
            if evicted:
                self._evicted(evicted)
            await self._push(batch)
            return True
        self.blocked += 1
        while not self._fits(size):
            if self.closed:
                self._drop(batch)
                return False
            self._room.clear()
            await self._room.wait()
        if self.closed:
            self._drop(batch)
            return False
        await self._push(batch)
        return True

    def seal(self) -> None:
        """No more appends: ``get()`` returns ``None`` once everything was handed out."""
        if not self.sealed:
            self.sealed = True
            self._readable.set()


class MemoryBuffer(BoundedBuffer[EncodedBatch]):
    """A byte-bounded in-memory queue of encoded batches with in-flight tracking.

    Args:
        max_size: bound in bytes of the payloads held (in flight included).
        when_full: ``block``, ``drop_oldest`` or ``drop_newest``.
        name: for logs and metrics.
    """

    def __init__(self, max_size: int, when_full: WhenFull = "drop_oldest", *, name: str = ""):
        super().__init__(max_size, when_full, name)
        self._acked: set[int] = set()  # id() of in-flight batches acked out of order

    # -- state -------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        """Records not yet acknowledged (still to deliver), in flight included.

        A batch acknowledged while an older one is still in flight stays held (in ``len``
        and ``bytes``) until the older one leaves, but its records are delivered: they are
        not counted here.
        """
        return self._records

    @property
    def in_flight(self) -> int:
        """Batches handed out and not yet acknowledged."""
        return self._sent - len(self._acked)

    @property
    def undelivered_batches(self) -> int:
        """Batches not yet acknowledged: pending and in flight."""
        return len(self._items) - len(self._acked)

    # -- producer side -----------------------------------------------------------------------

    async def _push(self, batch: EncodedBatch) -> None:
        self._items.append(batch)
        self._bytes += len(batch.payload)
        self._records += batch.records
        self._readable.set()

    def _size(self, item: EncodedBatch) -> int:
        return len(item.payload)

    # -- consumer side -----------------------------------------------------------------------

    def get_nowait(self) -> EncodedBatch | None:
        """The oldest batch not yet in flight (now marked in flight), or ``None``."""
        if self._sent >= len(self._items):
            return None
        batch = self._items[self._sent]
        self._sent += 1
        if self._sent == len(self._items) and not self.sealed:
            self._readable.clear()
        return batch

    async def get(self) -> EncodedBatch | None:
        """Wait for a batch to send; ``None`` once sealed (or closed) and nothing is left."""
        while self._sent >= len(self._items):
            if self.sealed or self.closed:
                return None
            await self._readable.wait()
        return self.get_nowait()

    def ack(self, batch: EncodedBatch) -> None:
        """Release an in-flight ``batch``; batches leave in order, whatever order acks come in.

        Raises:
            ValueError: ``batch`` is not in flight here (a bug in the caller).
        """
        for i in range(self._sent):
            if self._items[i] is batch:
                break
        else:
            raise ValueError(f"buffer {self.name!r}: batch seq={batch.seq} is not in flight")
        if id(batch) in self._acked:
            raise ValueError(f"buffer {self.name!r}: batch seq={batch.seq} was acknowledged twice")
        self._acked.add(id(batch))
        self._records -= batch.records  # delivered, even while an older batch holds it here
        while self._sent and id(self._items[0]) in self._acked:
            head = self._items.popleft()
            self._acked.discard(id(head))
            self._sent -= 1
            self._bytes -= len(head.payload)
        self._room.set()

    def rewind(self) -> None:
        """Make every unacknowledged in-flight batch pending again, in order."""
        if self._acked:
            self._items = deque(b for b in self._items if id(b) not in self._acked)
            self._acked.clear()
            self._bytes = sum(len(b.payload) for b in self._items)
            self._records = sum(b.records for b in self._items)
        self._sent = 0
        if self._items:
            self._readable.set()

    async def close(self) -> None:
        """Seal and wake every waiter; held batches stay here (and counted) until collected."""
        self.closed = True
        self.seal()
        self._room.set()

    def __repr__(self) -> str:
        return (
            f"MemoryBuffer({self.name!r}, batches={len(self._items)}, bytes={self._bytes}, "
            f"max_size={self.max_size}, when_full={self.when_full!r})"
        )
