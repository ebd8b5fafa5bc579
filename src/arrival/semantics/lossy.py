"""At-most-once queues: bounded buffers that hand each message out once per group.

Invariants:
1. A message leaves a group's buffer when it is handed out, before the caller sees it,
   so no group can get it twice; nothing of it is kept to redeliver.
2. A buffer never holds more than ``capacity`` messages: on overflow it drops the oldest
   or refuses the newest (``drop``) and counts the dropped message.
3. With ``conflate``, a buffer holds at most one message per key: a newer message of the
   key replaces the queued one in its place (counted as conflated, not dropped).
4. A group created later starts with the messages still retained (the last
   ``capacity``), so messages sent before the first consumer arrived are not missed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from arrival.model import DropPolicy

__all__ = ["LossyBuffer", "LossyQueue"]

T = TypeVar("T")


class LossyBuffer(Generic[T]):
    """One bounded FIFO of items, optionally conflated by key."""

    __slots__ = ("_items", "_keyed", "capacity", "conflated", "drop", "dropped")

    def __init__(self, capacity: int, drop: DropPolicy, conflate: bool) -> None:
        self.capacity = capacity
        self.drop = drop
        self._keyed: OrderedDict[object, T] | None = OrderedDict() if conflate else None
        self._items: deque[T] = deque()
        self.dropped = 0
        self.conflated = 0

    def __len__(self) -> int:
        return len(self._keyed) if self._keyed is not None else len(self._items)

    def put(self, item: T, key: object) -> None:
        """Queue ``item``; ``key`` is its conflation key (unique per item when it has none)."""
        keyed = self._keyed
        if keyed is not None:
            if key in keyed:
                keyed[key] = item
                self.conflated += 1
                return
            if len(keyed) >= self.capacity:
                self.dropped += 1
                if self.drop is DropPolicy.NEWEST:
                    return
                keyed.popitem(last=False)
            keyed[key] = item
            return
        items = self._items
        if len(items) >= self.capacity:
            self.dropped += 1
            if self.drop is DropPolicy.NEWEST:
                return
            items.popleft()
        items.append(item)

    def put_many(self, items: list[T], keys: list[object]) -> None:
        """``put`` each item in order; one step for the whole batch when not conflating
        (``keys`` is then ignored and may be empty)."""
        if self._keyed is not None:
            for item, key in zip(items, keys, strict=True):
                self.put(item, key)
            return
        q = self._items
        room = self.capacity - len(q)
        n = len(items)
        if n <= room:
            q.extend(items)
            return
        self.dropped += n - max(room, 0)
        if self.drop is DropPolicy.NEWEST:
            if room > 0:
                q.extend(items[:room])
            return
        if n >= self.capacity:
            q.clear()
            q.extend(items[n - self.capacity :])
            return
        for _ in range(n - room):
            q.popleft()
        q.extend(items)

    def take(self, limit: int) -> list[T]:
        """Remove and return up to ``limit`` items, oldest first."""
        keyed = self._keyed
        if keyed is not None:
            n = min(limit, len(keyed))
            return [keyed.popitem(last=False)[1] for _ in range(n)]
        items = self._items
        if limit >= len(items):
            out = list(items)
            items.clear()
            return out
        return [items.popleft() for _ in range(limit)]

    def items(self) -> Iterable[T]:
        return tuple(self._keyed.values()) if self._keyed is not None else tuple(self._items)

    def first(self) -> T | None:
        """The item ``take`` would hand out next (without taking it); None when empty."""
        if self._keyed is not None:
            return next(iter(self._keyed.values()), None)
        return self._items[0] if self._items else None


class LossyQueue(Generic[T]):
    """An at-most-once queue: a retained buffer for groups to come and one buffer per group."""

    def __init__(self, capacity: int, drop: DropPolicy, conflate: bool) -> None:
        self.capacity = capacity
        self.drop = drop
        self.conflate = conflate
        self.retained: LossyBuffer[T] = LossyBuffer(capacity, drop, conflate)
        self.groups: dict[str, LossyBuffer[T]] = {}
        self.sent = 0
        self._unclaimed_drops = 0  # dropped while no group existed

    @property
    def dropped(self) -> int:
        return self._unclaimed_drops + sum(b.dropped for b in self.groups.values())

    def put(self, item: T, key: object) -> None:
        self.sent += 1
        before = self.retained.dropped
        self.retained.put(item, key)
        if not self.groups:
            self._unclaimed_drops += self.retained.dropped - before
        for buf in self.groups.values():
            buf.put(item, key)

    def put_many(self, items: list[T], keys: list[object]) -> None:
        self.sent += len(items)
        before = self.retained.dropped
        self.retained.put_many(items, keys)
        if not self.groups:
            self._unclaimed_drops += self.retained.dropped - before
        for buf in self.groups.values():
            buf.put_many(items, keys)

    def add_group(self, group: str, latest: bool, key_of: Callable[[T], object]) -> LossyBuffer[T]:
        """Create ``group``; it starts with the retained messages unless ``latest``."""
        buf: LossyBuffer[T] = LossyBuffer(self.capacity, self.drop, self.conflate)
        if not latest:
            for item in self.retained.items():
                buf.put(item, key_of(item))
        self.groups[group] = buf
        return buf
