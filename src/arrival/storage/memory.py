"""The reference store: plain dicts, atomic by construction, checksummed like the real one.

A MemoryStorage outlives the engines opened on it, so a test can "crash" an engine
(drop it without closing) and open a new one on the same store: whatever was committed
survives, whatever was not is gone, exactly like the durable store after SIGKILL.
"""

from __future__ import annotations

import bisect
import zlib

from arrival.errors import CorruptData, StorageError
from arrival.storage.base import Loaded, WriteSet

__all__ = ["MemoryStorage"]


def _crc(data: bytes, *header: object) -> int:
    return zlib.crc32(data, zlib.crc32("\x1f".join(map(str, header)).encode()))


class MemoryStorage:
    def __init__(self) -> None:
        self._meta: dict[str, bytes] = {}
        self._specs: dict[str, bytes] = {}
        self._batches: dict[str, dict[int, tuple[int, int, bytes]]] = {}  # first -> count,crc,data
        self._groups: dict[tuple[str, str], list[tuple[int, bool, bytes]]] = {}
        self._producers: dict[str, bytes] = {}
        self._ids: dict[str, dict[int, tuple[int, float, int, bytes]]] = {}  # first -> ...
        self._open = False
        self.syncs = 0
        self.commits = 0

    def __repr__(self) -> str:
        n = sum(len(b) for b in self._batches.values())
        return f"<MemoryStorage queues={len(self._specs)} batches={n}>"

    @property
    def description(self) -> dict[str, str]:
        return {"storage": "memory (lost when the process exits)", "fsync": "none (memory)"}

    def _check_open(self) -> None:
        if not self._open:
            raise StorageError(f"{self!r} is closed")

    def load(self) -> Loaded:
        if self._open:
            raise StorageError("this MemoryStorage is already open by another engine")
        self._open = True
        return Loaded(
            meta=dict(self._meta),
            specs=dict(self._specs),
            batches={
                q: [(first, v[0]) for first, v in sorted(b.items())]
                for q, b in self._batches.items()
                if b
            },
            groups={k: list(v) for k, v in self._groups.items()},
            producers=dict(self._producers),
            ids={q: self._id_sets(q) for q, sets in self._ids.items() if sets},
        )

    def commit(self, ws: WriteSet) -> None:
        self._check_open()
        self.commits += 1
        self.syncs += ws.sync
        self._meta.update(ws.meta)
        for name, spec in ws.specs.items():
            if spec is None:
                self._specs.pop(name, None)
                self._batches.pop(name, None)
                self._ids.pop(name, None)
                for key in [k for k in self._groups if k[0] == name]:
                    del self._groups[key]
            else:
                self._specs[name] = spec
        for queue, first, count, data in ws.batches:
            self._batches.setdefault(queue, {})[first] = (
                count,
                _crc(data, queue, first, count),
                data,
            )
        for r in ws.groups:
            recs = self._groups.setdefault((r.queue, r.group), [])
            if r.snapshot:
                recs.clear()
            recs.append((r.seq, r.snapshot, r.data))
        for queue, below in ws.trims.items():
            b = self._batches.get(queue, {})
            for first in [f for f, v in b.items() if f + v[0] <= below]:
                del b[first]
        for pid, state in ws.producers.items():
            if state is None:
                self._producers.pop(pid, None)
            else:
                self._producers[pid] = state
        for queue, first, last, ts, data in ws.ids:
            crc = _crc(data, queue, first, last, ts)
            self._ids.setdefault(queue, {})[first] = (last, ts, crc, data)
        for queue, (before, below) in ws.id_trims.items():
            sets = self._ids.get(queue, {})
            for first in [
                f for f, (last, t, _c, _d) in sets.items() if t <= before and last < below
            ]:
                del sets[first]

    def read(self, queue: str, first: int) -> bytes:
        self._check_open()
        try:
            count, crc, data = self._batches[queue][first]
        except KeyError:
            raise StorageError(f"no batch at offset {first} of queue {queue!r}") from None
        if _crc(data, queue, first, count) != crc:
            raise CorruptData(f"batch at offset {first} of queue {queue!r} fails its checksum")
        return data

    def _id_sets(self, queue: str) -> list[tuple[int, int, float, bytes]]:
        out = []
        for first, (last, ts, crc, data) in sorted(
            self._ids[queue].items(), key=lambda kv: (kv[1][1], kv[0])
        ):
            if _crc(data, queue, first, last, ts) != crc:
                raise CorruptData(f"message ids at offset {first} of queue {queue!r} are damaged")
            out.append((first, last, ts, data))
        return out

    def close(self) -> None:
        self._open = False

    # -- test helpers ----------------------------------------------------------------

    def corrupt(self, queue: str, first: int) -> None:
        """Flip a bit of a stored batch, as a failing disk would."""
        count, crc, data = self._batches[queue][first]
        flipped = bytes([data[0] ^ 1]) + data[1:]
        self._batches[queue][first] = (count, crc, flipped)

    def firsts(self, queue: str) -> list[int]:
        b = self._batches.get(queue, {})
        out: list[int] = []
        for first in b:
            bisect.insort(out, first)
        return out
