"""Deduplication state: idempotent producers and message ids, as pure decisions.

Two mechanisms, both kept in the same atomic write as the messages they guard:

``ProducerTable``: each producer has an id, an epoch and a sequence number per send. The
broker remembers, per producer, the last sequence it stored and the results of the last
``RECENT`` sends, so a retried send gets its original result instead of a second copy.
A producer's state is kept ``horizon`` seconds after its last send; a retry after that
raises ``DedupHorizonPassed`` instead of risking a duplicate.

``IdIndex``: the ids of the messages stored in one queue, kept while the message is
retained and at least ``window`` seconds after it was stored.

Invariants:
1. A sequence is stored at most once per producer epoch: ``check`` answers a retry with
   the original result, and refuses a gap (an earlier send was lost) or an old epoch.
2. A stale epoch never writes: a newer ``register`` fences every earlier epoch.
3. Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec

from arrival.errors import DedupHorizonPassed, ProducerFenced, SequenceError, StorageError

__all__ = ["RECENT", "Duplicate", "IdIndex", "ProducerState", "ProducerTable"]

RECENT = 64
"""Sends per producer whose results are remembered: a client pipelines at most this many
unconfirmed sends, so every retry it can make finds its original result."""


class _Stored(msgspec.Struct, array_like=True):
    epoch: int
    last_seq: int
    last_send: float
    recent: list[tuple[int, str, int]]  # (seq, queue, first offset)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Stored)


@dataclass(slots=True)
class ProducerState:
    epoch: int
    last_seq: int = 0
    last_send: float = 0.0
    recent: deque[tuple[int, str, int]] = field(default_factory=lambda: deque(maxlen=RECENT))


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The send was stored before: answer with its original result."""

    queue: str
    offset: int


class ProducerTable:
    """Per-producer epochs and sequences; see the module docstring for the invariants.

    Epochs are ``(broker epoch << 32) | n``: the broker's epoch grows at every restart, so
    an epoch is never handed out twice, even after the producer's state expired. A
    registration is durable before its epoch is handed out (the engine's job), so a
    producer the table does not know has expired: its sends are refused rather than risk
    storing a retry twice.
    """

    def __init__(self, horizon: float, broker_epoch: int = 1) -> None:
        self.horizon = horizon
        self.broker_epoch = broker_epoch
        self._counter = 0
        self.states: dict[str, ProducerState] = {}
        self.dirty: set[str] = set()  # changed since the last drain; absent -> deleted

    def register(self, producer: str, now: float) -> int:
        """A new incarnation of ``producer``: fences every earlier one; returns its epoch."""
        self._counter += 1
        st = ProducerState(epoch=(self.broker_epoch << 32) | self._counter, last_send=now)
        self.states[producer] = st
        self.dirty.add(producer)
        return st.epoch

    def check(self, producer: str, epoch: int, seq: int, queue: str) -> Duplicate | None:
        """Decide a send: None if it is new (call ``record`` once it is queued), or the
        Duplicate it repeats. Raises for a fenced epoch, a gap or a forgotten retry."""
        if seq < 1:
            raise SequenceError(producer, seq, "sequence numbers start at 1")
        st = self.states.get(producer)
        if st is None or st.epoch < epoch:
            # unknown (or an epoch it never stored): the producer's state expired, and
            # whatever it sent before may or may not be stored
            raise DedupHorizonPassed(producer, seq, self.horizon)
        if epoch < st.epoch:
            raise ProducerFenced(
                "producer", producer, f"epoch {epoch} was replaced by epoch {st.epoch}"
            )
        if seq == st.last_seq + 1:
            return None
        if seq > st.last_seq:
            raise SequenceError(
                producer,
                seq,
                f"the last stored sequence is {st.last_seq}, so sends "
                f"{st.last_seq + 1}..{seq - 1} were lost; resend them in order",
                gap=True,
            )
        for s, q, off in st.recent:
            if s == seq:
                if q != queue:
                    raise SequenceError(
                        producer, seq, f"it was used for queue {q!r}, not {queue!r}"
                    )
                return Duplicate(q, off)
        raise SequenceError(
            producer,
            seq,
            f"it is older than the last {RECENT} sends the broker remembers for this "
            f"producer (the last stored is {st.last_seq})",
        )

    def record(
        self, producer: str, epoch: int, seq: int, queue: str, offset: int, now: float
    ) -> None:
        st = self.states.get(producer)
        if st is None or st.epoch != epoch:
            st = self.states[producer] = ProducerState(epoch=epoch)
        st.last_seq = seq
        st.last_send = now
        st.recent.append((seq, queue, offset))
        self.dirty.add(producer)

    def expire(self, now: float) -> list[str]:
        """Forget producers idle longer than the horizon; returns their ids."""
        gone = [p for p, st in self.states.items() if now - st.last_send > self.horizon]
        for p in gone:
            del self.states[p]
            self.dirty.add(p)
        return gone

    def drain(self) -> dict[str, bytes | None]:
        """Encoded states changed since the last drain (None: deleted)."""
        out: dict[str, bytes | None] = {}
        for p in self.dirty:
            st = self.states.get(p)
            out[p] = (
                None
                if st is None
                else _enc.encode(_Stored(st.epoch, st.last_seq, st.last_send, list(st.recent)))
            )
        self.dirty = set()
        return out

    def restore(self, stored: dict[str, bytes]) -> None:
        for p, data in stored.items():
            try:
                s = _dec.decode(data)
            except msgspec.DecodeError as exc:
                raise StorageError(f"state of producer {p!r} is unreadable ({exc})") from exc
            self.states[p] = ProducerState(
                s.epoch, s.last_seq, s.last_send, deque(s.recent, maxlen=RECENT)
            )


class _IdSet(msgspec.Struct, array_like=True):
    ids: list[str]
    offsets: list[int]


_set_enc = msgspec.msgpack.Encoder()
_set_dec = msgspec.msgpack.Decoder(_IdSet)

IdSetRow = tuple[int, int, float, bytes]
"""A stored set of ids: (first offset, last offset, stored at, encoded ids and offsets)."""


class IdIndex:
    """The message ids stored in one queue, for deduplication by id.

    Ids are stored as sets, one per commit that added any (not one row per id), and
    forgotten a whole set at a time: when the newest id of the set is older than the
    window and every message of the set is deleted.
    """

    __slots__ = ("_added_ids", "_added_offs", "_added_ts", "by_id", "order", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self.by_id: dict[str, int] = {}
        self.order: deque[tuple[float, int, list[str], list[int]]] = deque()  # ts, last, ...
        self._added_ids: list[str] = []  # not yet drained
        self._added_offs: list[int] = []
        self._added_ts = 0.0

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def added(self) -> bool:
        return bool(self._added_ids)

    def get(self, mid: str) -> int | None:
        return self.by_id.get(mid)

    def add(self, mid: str, offset: int, now: float) -> None:
        self.by_id[mid] = offset
        self._added_ids.append(mid)
        self._added_offs.append(offset)
        self._added_ts = now

    def drain(self) -> IdSetRow | None:
        """The ids added since the last drain as one set to store, or None."""
        ids, offs = self._added_ids, self._added_offs
        if not ids:
            return None
        self._added_ids, self._added_offs = [], []
        first, last = min(offs), max(offs)
        self.order.append((self._added_ts, last, ids, offs))
        return (first, last, self._added_ts, _set_enc.encode(_IdSet(ids, offs)))

    def load(self, rows: list[IdSetRow]) -> None:
        """Rebuild from stored sets, oldest first."""
        for _first, last, ts, data in rows:
            try:
                s = _set_dec.decode(data)
            except msgspec.DecodeError as exc:
                raise StorageError(f"a stored set of message ids is unreadable ({exc})") from exc
            if len(s.ids) != len(s.offsets):
                raise StorageError("a stored set of message ids is damaged (lengths differ)")
            for mid, off in zip(s.ids, s.offsets, strict=True):
                self.by_id[mid] = off
            self.order.append((ts, last, s.ids, s.offsets))

    def expire(self, now: float, low: int) -> tuple[float, int] | None:
        """Forget the sets stored before ``now - window`` whose messages are all deleted
        (below ``low``). Returns (stored at or before, last offset below) for the store,
        or None."""
        order = self.order
        horizon = now - self.window
        trim: tuple[float, int] | None = None
        while order and order[0][0] < horizon and order[0][1] < low:
            ts, last, ids, offs = order.popleft()
            by_id = self.by_id
            for mid, off in zip(ids, offs, strict=True):
                if by_id.get(mid) == off:
                    del by_id[mid]
            trim = (ts, last + 1)
        return trim
