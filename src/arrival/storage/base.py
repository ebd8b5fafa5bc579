"""The storage interface: what the engine needs from a store, in bytes, ints and records.

Contract, for every implementation:
1. ``commit(ws)`` is atomic: after a crash at any instant, either all of ``ws`` is
   stored or none of it is. When ``ws.sync`` is true it is durable when ``commit``
   returns (fsynced); when false it may be lost by a power cut, but never torn, and a
   later synced commit makes it durable too (commits are durable in order).
2. Every stored blob is checksummed; ``read`` and ``load`` raise ``CorruptData``
   rather than return damaged bytes.
3. A batch is identified by ``(queue, first)``; ``read`` returns exactly the bytes given.
4. A group record with ``snapshot=True`` replaces every earlier record of its group.
5. Producer states and message ids are stored in the same atomic commit as the batches
   they guard, so a crash keeps both or neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["GroupRecord", "Loaded", "Storage", "WriteSet"]


@dataclass(frozen=True, slots=True)
class GroupRecord:
    queue: str
    group: str
    seq: int
    snapshot: bool
    data: bytes


@dataclass(slots=True)
class WriteSet:
    """Everything one commit stores, atomically."""

    meta: dict[str, bytes] = field(default_factory=dict)
    specs: dict[str, bytes | None] = field(default_factory=dict)  # None drops the queue
    batches: list[tuple[str, int, int, bytes]] = field(default_factory=list)  # queue, first, count
    groups: list[GroupRecord] = field(default_factory=list)
    trims: dict[str, int] = field(default_factory=dict)  # queue -> drop batches ending <= offset
    producers: dict[str, bytes | None] = field(default_factory=dict)  # None deletes
    # sets of message ids: (queue, first offset, last offset, stored at, data)
    ids: list[tuple[str, int, int, float, bytes]] = field(default_factory=list)
    # queue -> (ts, offset): forget the id sets stored at or before ts whose last offset
    # is below offset
    id_trims: dict[str, tuple[float, int]] = field(default_factory=dict)
    sync: bool = True

    def __bool__(self) -> bool:
        return bool(
            self.meta
            or self.specs
            or self.batches
            or self.groups
            or self.trims
            or self.producers
            or self.ids
            or self.id_trims
        )


@dataclass(frozen=True, slots=True)
class Loaded:
    """The state found when a store is opened; batch contents are read lazily."""

    meta: dict[str, bytes]
    specs: dict[str, bytes]
    batches: dict[str, list[tuple[int, int]]]  # queue -> [(first, count)] in offset order
    groups: dict[tuple[str, str], list[tuple[int, bool, bytes]]]  # -> [(seq, snapshot, data)]
    producers: dict[str, bytes] = field(default_factory=dict)
    # queue -> [(first, last, stored at, data)], by stored time then first offset
    ids: dict[str, list[tuple[int, int, float, bytes]]] = field(default_factory=dict)


class Storage(Protocol):
    """A store for queues: specs, message batches, consumer-group records and dedup state."""

    syncs: int  # durable commits so far
    commits: int  # all commits so far

    @property
    def description(self) -> dict[str, str]:
        """Facts for ``describe()``: where the data lives and the fsync policy."""
        ...

    def load(self) -> Loaded: ...

    def commit(self, ws: WriteSet) -> None: ...

    def read(self, queue: str, first: int) -> bytes: ...

    def close(self) -> None: ...
